//! Per-stream state of the tunnel multiplexer: who opened it and whether it was answered, both
//! half-close flags, both flow-control windows and the receive buffer.
//!
//! Plain data with small helpers; every transition is driven (and checked) by `conn.rs`.

use super::copy::copy;
use super::INITIAL_STREAM_WINDOW;

/// Where the stream is in the OPEN / OPEN_RESULT exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpenState {
    /// We opened it and await the peer's OPEN_RESULT. We may already send.
    AwaitingResult,
    /// The peer opened it and awaits our answer. We may not send yet.
    AwaitingAnswer,
    /// Accepted.
    Established,
}

#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) open: OpenState,
    /// FIN queued by [`super::Conn::finish`]; nothing more may be sent.
    pub(crate) send_finished: bool,
    /// The peer's FIN arrived; nothing more will be received.
    pub(crate) recv_fin: bool,
    /// `StreamFinished` was emitted (the FIN arrived and the buffer was read empty).
    pub(crate) fin_signaled: bool,
    /// Bytes the peer lets us send.
    pub(crate) send_credit: u32,
    /// Bytes we let the peer send (credit it holds as we see it).
    pub(crate) recv_window: u32,
    /// The stream's receive window: what `recv_window`, the buffered bytes, `recv_unacked` and
    /// the payload still on its way in add up to. [`super::INITIAL_STREAM_WINDOW`] at first,
    /// grown up to [`super::MAX_STREAM_WINDOW`] while the window, not the reader, limits the
    /// stream (`Conn`'s window updates).
    pub(crate) recv_limit: u32,
    /// Bytes read by the application and not yet returned to the peer in a WINDOW_UPDATE.
    pub(crate) recv_unacked: u32,
    pub(crate) recv: RecvBuf,
    /// A `Readable` event is outstanding (cleared when the buffer is read empty).
    pub(crate) readable_signaled: bool,
    /// A `send` was short: a `Writable` event is owed once it can send again.
    pub(crate) blocked: bool,
    /// The stream is on the blocked list (kept apart from `blocked` so that a wake-up by its own
    /// WINDOW_UPDATE need not search the list, and the list never holds it twice).
    pub(crate) listed: bool,
    /// The stream is on the window-update list.
    pub(crate) update_queued: bool,
}

impl Stream {
    pub(crate) fn new(open: OpenState) -> Stream {
        Stream {
            open,
            send_finished: false,
            recv_fin: false,
            fin_signaled: false,
            send_credit: INITIAL_STREAM_WINDOW,
            recv_window: INITIAL_STREAM_WINDOW,
            recv_limit: INITIAL_STREAM_WINDOW,
            recv_unacked: 0,
            recv: RecvBuf::default(),
            readable_signaled: false,
            blocked: false,
            listed: false,
            update_queued: false,
        }
    }

    /// Both directions are done and everything received was read: the stream can go.
    pub(crate) fn is_done(&self) -> bool {
        self.send_finished && self.fin_signaled
    }
}

/// A stream's receive buffer: live bytes in `buf[start..end]`. The whole `buf` is initialized
/// (zeroed when it grows), so the free tail can be handed out for the shell to read socket bytes
/// straight into ([`RecvBuf::spare`] + [`RecvBuf::commit`]) without `unsafe`. The live bytes move
/// to the front only when the tail is too short, so steady streaming neither allocates nor copies
/// more than once per byte. Flow control bounds the live bytes to the stream's receive window
/// (at most [`super::MAX_STREAM_WINDOW`]).
#[derive(Debug, Default)]
pub(crate) struct RecvBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    pub(crate) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or(&[])
    }

    /// Makes `buf[end..end + n]` available, compacting or growing as needed.
    fn reserve(&mut self, n: usize) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end >= n {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < n {
            self.buf.resize(self.end + n, 0);
        }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        copy(self.spare(bytes.len()), bytes);
        self.end += bytes.len();
    }

    /// `n` writable bytes right after the live ones; [`RecvBuf::commit`] makes them live.
    pub(crate) fn spare(&mut self, n: usize) -> &mut [u8] {
        self.reserve(n);
        self.buf.get_mut(self.end..self.end + n).unwrap_or(&mut [])
    }

    /// Makes `n` bytes written into the last [`RecvBuf::spare`] live. Nothing but `commit` may
    /// run in between (`consume` keeps `end` in place for exactly this reason).
    pub(crate) fn commit(&mut self, n: usize) {
        debug_assert!(self.end + n <= self.buf.len());
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Drops up to `n` bytes from the front; returns how many.
    pub(crate) fn consume(&mut self, n: usize) -> usize {
        let n = n.min(self.len());
        self.start += n;
        n
    }

    /// Copies up to `out.len()` bytes out and consumes them; returns how many.
    pub(crate) fn read(&mut self, out: &mut [u8]) -> usize {
        let src = self.as_slice();
        let n = src.len().min(out.len());
        copy(out, src);
        self.consume(n)
    }

    /// Frees the allocation if nothing is buffered (it grows again on the next bytes).
    pub(crate) fn release_if_empty(&mut self) {
        if self.is_empty() {
            *self = RecvBuf::default();
        }
    }

    /// Bytes allocated (for bounds checks).
    #[cfg(any(debug_assertions, test))]
    pub(crate) fn allocated(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recv_buf_keeps_order_across_compaction() {
        let mut b = RecvBuf::default();
        let mut next_in = 0u8;
        let mut next_out = 0u8;
        let mut out = [0u8; 1500];
        for round in 0..2000usize {
            let chunk: Vec<u8> = (0..(round * 37) % 1000)
                .map(|_| {
                    next_in = next_in.wrapping_add(1);
                    next_in
                })
                .collect();
            b.push(&chunk);
            let want = (round * 53) % out.len();
            let n = b.read(&mut out[..want]);
            for &byte in &out[..n] {
                next_out = next_out.wrapping_add(1);
                assert_eq!(byte, next_out);
            }
            assert!(b.buf.capacity() <= 64 * 1024, "buffer grows without bound");
            // Write in place, as the shell does for large DATA payloads.
            let spare = b.spare(3);
            for byte in spare.iter_mut() {
                next_in = next_in.wrapping_add(1);
                *byte = next_in;
            }
            b.commit(3);
        }
        let rest = b.len();
        assert_eq!(b.consume(usize::MAX), rest);
        assert!(b.is_empty());
        // A read that empties the buffer between spare and commit keeps the spare bytes valid.
        b.push(b"ab");
        b.spare(2).copy_from_slice(b"cd");
        assert_eq!(b.read(&mut [0u8; 2]), 2);
        b.commit(2);
        assert_eq!(b.as_slice(), b"cd");
    }
}
