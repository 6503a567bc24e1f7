//! The transmit queue: DATA frames are encoded once, in place, into one of two buffers, and the
//! writer takes them from there as a batch. No byte of payload is copied between being queued
//! and being written out.
//!
//! * The *filling* buffer collects DATA frames in send order at `[HEADROOM..fill]`. A payload
//!   is written straight into it (by `Conn::send`'s copy, or by the application itself through
//!   `Conn::send_buf`), right after a header reserved in place; later bytes on the same stream
//!   extend the newest frame while it is unsealed.
//! * The *writing* buffer holds the batch being written, `[pos..end]`, whole frames only.
//! * When the batch is written out, [`TxQueue::seal`] turns the filling buffer into the next
//!   batch: the control frames due go in front of its data, copied into the [`HEADROOM`] kept
//!   there for them (a batch with more control than that sends the control alone first), and
//!   the two buffers trade roles.
//!
//! Both buffers stay allocated and initialized at their high-water mark while the tunnel is
//! busy, so handing out room for a payload costs neither an allocation nor zeroing (a quiet
//! tunnel frees them: [`TxQueue::release_idle`]). Each holds at most one bound's worth
//! of frames ([`QUEUE_BOUND`]), as the queue and the caller's batch did before.

use super::copy::copy;
use super::frame::{FrameType, Header, FLAG_FIN, HEADER_LEN};
use super::{MAX_FRAME_PAYLOAD, MAX_QUEUED_CONTROL_FRAMES, MAX_SEND_QUEUE_BYTES, MAX_STREAMS};

/// Room kept in front of the queued DATA frames for the control frames that go out ahead of
/// them in the same batch: a dozen window updates and pings without an extra write.
pub(crate) const HEADROOM: usize = 512;

/// Most bytes of queued DATA frames: the payload bound, a header per full frame, and room for
/// a header (or an empty FIN frame) per stream and per interleaving.
pub(crate) const QUEUE_BOUND: usize = MAX_SEND_QUEUE_BYTES
    + HEADER_LEN
        * (MAX_SEND_QUEUE_BYTES / MAX_FRAME_PAYLOAD + 1 + MAX_STREAMS + MAX_QUEUED_CONTROL_FRAMES);

/// A frame that has this much room left is extended by a reservation even when the caller asked
/// for more; below it a new frame starts, so that a reservation is never uselessly small.
const EXTEND_MIN: usize = 4 * 1024;

/// Smallest allocation of a queue buffer.
pub(crate) const MIN_ALLOC: usize = 16 * 1024;

/// Offset of the flags byte inside a frame header.
const FLAGS_OFFSET: usize = 5;

/// Room for one DATA payload at the end of the filling buffer, handed out by
/// [`TxQueue::reserve`] and made part of the queue by [`TxQueue::commit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reservation {
    /// The stream.
    pub(crate) id: u32,
    /// Offset of the payload room in the filling buffer.
    at: usize,
    /// Bytes of room.
    pub(crate) len: usize,
    /// `Some(header offset)` when the room extends the newest frame; `None` when a new frame's
    /// header goes at `at - HEADER_LEN` on commit.
    extends: Option<usize>,
}

#[derive(Debug)]
pub(crate) struct TxQueue {
    bufs: [Vec<u8>; 2],
    /// Which of `bufs` holds the batch being written; the other one fills.
    cur: usize,
    /// The batch still to write: `bufs[cur][pos..end]`.
    pos: usize,
    end: usize,
    /// Queued DATA frames: `bufs[1 - cur][HEADROOM..fill]`.
    fill: usize,
    /// Header offset (in the filling buffer) and stream of the newest DATA frame.
    last: Option<(usize, u32)>,
}

impl Default for TxQueue {
    fn default() -> TxQueue {
        TxQueue {
            bufs: [Vec::new(), Vec::new()],
            cur: 0,
            pos: 0,
            end: 0,
            fill: HEADROOM,
            last: None,
        }
    }
}

impl TxQueue {
    /// Bytes of DATA frames (headers included) queued and not yet in a batch.
    pub(crate) fn queued(&self) -> usize {
        self.fill - HEADROOM
    }

    /// Bytes of the current batch not yet written.
    pub(crate) fn in_flight(&self) -> usize {
        self.end - self.pos
    }

    /// The rest of the current batch.
    pub(crate) fn batch(&self) -> &[u8] {
        self.bufs
            .get(self.cur)
            .and_then(|b| b.get(self.pos..self.end))
            .unwrap_or_default()
    }

    /// Marks `n` bytes of the batch written; returns how many (clamped to the batch).
    pub(crate) fn advance(&mut self, n: usize) -> usize {
        let n = n.min(self.in_flight());
        self.pos += n;
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        }
        n
    }

    /// Starts the next batch: the frames in `control` (taken, leaving it empty), then the queued
    /// DATA frames. Only between batches (`in_flight() == 0`); a no-op otherwise.
    pub(crate) fn seal(&mut self, control: &mut Vec<u8>) {
        if self.in_flight() > 0 || (control.is_empty() && self.queued() == 0) {
            return;
        }
        let filling = 1 - self.cur;
        if control.len() <= HEADROOM {
            let start = HEADROOM - control.len();
            ensure_len(&mut self.bufs[filling], HEADROOM);
            if let Some(dst) = self.bufs[filling].get_mut(start..HEADROOM) {
                dst.copy_from_slice(control);
            }
            control.clear();
            self.cur = filling;
            self.pos = start;
            self.end = self.fill;
            self.fill = HEADROOM;
            self.last = None;
        } else {
            // More control than fits in front: it goes alone, from the idle buffer; the data
            // stays queued (and extendable) for the next batch.
            let idle = &mut self.bufs[self.cur];
            ensure_len(idle, control.len());
            if let Some(dst) = idle.get_mut(..control.len()) {
                dst.copy_from_slice(control);
            }
            self.pos = 0;
            self.end = control.len();
            control.clear();
        }
    }

    /// With nothing in flight or queued, gives buffers at their smallest size back to the
    /// thread's pool (`pool.rs`); larger ones (a tunnel that carried bulk) are kept, unless
    /// `large` (the tunnel has been quiet for a while): then they are freed. Returns whether the
    /// queue was idle (so `large` took effect).
    pub(crate) fn release_idle(&mut self, large: bool) -> bool {
        if self.in_flight() > 0 || self.queued() > 0 || self.last.is_some() {
            return false;
        }
        for buf in &mut self.bufs {
            if buf.len() <= MIN_ALLOC {
                super::pool::give(buf);
            } else if large {
                *buf = Vec::new();
            }
        }
        true
    }

    /// Bytes allocated by both buffers (for tests).
    #[cfg(test)]
    pub(crate) fn allocated(&self) -> usize {
        self.bufs.iter().map(Vec::len).sum()
    }

    /// Drops the queued DATA frames (not the batch in flight: it is written to its end, so the
    /// peer never sees a frame cut short).
    pub(crate) fn clear_queued(&mut self) {
        self.fill = HEADROOM;
        self.last = None;
    }

    /// Room for up to `want` (≥ 1) payload bytes on stream `id`: at the end of the newest frame
    /// when it is this stream's and has room (any room when `pack`, else enough for `want` or
    /// at least [`EXTEND_MIN`]), otherwise in a new frame. At most one frame's worth.
    pub(crate) fn reserve(&mut self, id: u32, want: usize, pack: bool) -> Reservation {
        let mut r = Reservation {
            id,
            at: self.fill + HEADER_LEN,
            len: want.min(MAX_FRAME_PAYLOAD),
            extends: None,
        };
        if let Some((offset, last)) = self.last {
            let room = MAX_FRAME_PAYLOAD.saturating_sub(self.frame_len(offset));
            if last == id && room > 0 && (pack || room >= want || room >= EXTEND_MIN) {
                r = Reservation {
                    id,
                    at: self.fill,
                    len: want.min(room),
                    extends: Some(offset),
                };
            }
        }
        ensure_len(&mut self.bufs[1 - self.cur], r.at + r.len);
        r
    }

    /// The payload room of `r`, to write into before [`TxQueue::commit`].
    pub(crate) fn room(&mut self, r: &Reservation) -> &mut [u8] {
        self.bufs[1 - self.cur]
            .get_mut(r.at..r.at + r.len)
            .unwrap_or_default()
    }

    /// Queues the first `n` bytes of `r`'s room (clamped to it); nothing for 0.
    pub(crate) fn commit(&mut self, r: Reservation, n: usize) {
        let n = n.min(r.len);
        if n == 0 {
            return;
        }
        match r.extends {
            Some(offset) => {
                let len = self.frame_len(offset) + n;
                self.set_frame_len(offset, len);
            }
            None => {
                let offset = r.at - HEADER_LEN;
                let header = Header {
                    len: n as u32,
                    kind: FrameType::Data,
                    flags: 0,
                    stream: r.id,
                };
                if let Some(dst) = self.bufs[1 - self.cur].get_mut(offset..r.at) {
                    dst.copy_from_slice(&header.to_bytes());
                }
                self.last = Some((offset, r.id));
            }
        }
        self.fill = r.at + n;
    }

    /// Queues `payload` on stream `id` by copy, filling the newest frame first.
    pub(crate) fn push(&mut self, id: u32, mut payload: &[u8]) {
        while !payload.is_empty() {
            let r = self.reserve(id, payload.len(), true);
            let (head, rest) = payload.split_at(r.len.min(payload.len()));
            copy(self.room(&r), head);
            self.commit(r, head.len());
            payload = rest;
        }
    }

    /// FIN on stream `id`: on its newest frame if nothing was queued after it, else in an empty
    /// DATA frame.
    pub(crate) fn finish(&mut self, id: u32) {
        if let Some((offset, last)) = self.last {
            if last == id {
                if let Some(flags) = self.bufs[1 - self.cur].get_mut(offset + FLAGS_OFFSET) {
                    *flags |= FLAG_FIN;
                }
                return;
            }
        }
        let offset = self.fill;
        let header = Header {
            len: 0,
            kind: FrameType::Data,
            flags: FLAG_FIN,
            stream: id,
        };
        let buf = &mut self.bufs[1 - self.cur];
        ensure_len(buf, offset + HEADER_LEN);
        if let Some(dst) = buf.get_mut(offset..offset + HEADER_LEN) {
            dst.copy_from_slice(&header.to_bytes());
        }
        self.fill = offset + HEADER_LEN;
        self.last = Some((offset, id));
    }

    fn frame_len(&self, offset: usize) -> usize {
        let mut be = [0u8; 4];
        if let Some(src) = self.bufs[1 - self.cur].get(offset..offset + 4) {
            be.copy_from_slice(src);
        }
        u32::from_be_bytes(be) as usize
    }

    fn set_frame_len(&mut self, offset: usize, len: usize) {
        if let Some(dst) = self.bufs[1 - self.cur].get_mut(offset..offset + 4) {
            dst.copy_from_slice(&(len as u32).to_be_bytes());
        }
    }

    /// Checks the queue's own invariants (debug builds).
    #[cfg(debug_assertions)]
    pub(crate) fn check(&self) {
        assert!(self.cur < 2);
        assert!(self.pos <= self.end && self.end <= self.bufs[self.cur].len());
        assert!(self.end > 0 || self.pos == 0);
        assert!(self.fill >= HEADROOM && self.queued() <= QUEUE_BOUND);
        assert!(self.fill <= self.bufs[1 - self.cur].len() || self.queued() == 0);
        // The queued frames parse back as DATA frames that end exactly at `fill`, the newest
        // being `last`.
        let mut at = HEADROOM;
        let mut newest = None;
        while at < self.fill {
            let header = self.bufs[1 - self.cur]
                .get(at..at + HEADER_LEN)
                .and_then(|h| <&[u8; HEADER_LEN]>::try_from(h).ok())
                .map(Header::decode);
            assert!(
                matches!(header, Some(Ok(_))),
                "queued frame at {at}: {header:?}"
            );
            let Some(Ok(header)) = header else {
                return;
            };
            assert_eq!(header.kind, FrameType::Data);
            newest = Some((at, header.stream));
            at += HEADER_LEN + header.len as usize;
        }
        assert_eq!(at, self.fill, "queued frames end at the fill mark");
        if let Some(last) = self.last {
            assert_eq!(Some(last), newest, "the newest frame is the one tracked");
        }
        // A buffer grows to one bound's worth of DATA frames, or to one batch of control
        // frames sent alone (every queued control frame plus the pongs and updates due).
        let control_batch = MAX_QUEUED_CONTROL_FRAMES * (HEADER_LEN + super::MAX_CONTROL_PAYLOAD)
            + (MAX_STREAMS + 3) * (HEADER_LEN + 8);
        for buf in &self.bufs {
            assert!(buf.len() <= (HEADROOM + QUEUE_BOUND).max(control_batch));
        }
    }
}

/// Grows `buf` (zeroed, amortized doubling) so that it is at least `len` long.
fn ensure_len(buf: &mut Vec<u8>, len: usize) {
    if buf.len() >= len {
        return;
    }
    if buf.is_empty() && len <= MIN_ALLOC {
        *buf = super::pool::take(MIN_ALLOC);
        return;
    }
    let target = (2 * buf.len())
        .clamp(MIN_ALLOC, HEADROOM + QUEUE_BOUND)
        .max(len);
    buf.resize(target, 0);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    /// Frames of the next batch as (stream, payload length, fin).
    fn sealed(q: &mut TxQueue) -> Vec<(u32, usize, bool)> {
        q.seal(&mut Vec::new());
        let mut out = Vec::new();
        let mut rest = q.batch();
        while let Some((head, tail)) = rest.split_first_chunk::<HEADER_LEN>() {
            let h = Header::decode(head).unwrap();
            out.push((h.stream, h.len as usize, h.flags & FLAG_FIN != 0));
            rest = tail.get(h.len as usize..).unwrap();
        }
        let n = q.in_flight();
        q.advance(n);
        out
    }

    #[test]
    fn reservations_extend_the_newest_frame_only_when_worth_it() {
        let mut q = TxQueue::default();
        // 60 KiB on stream 1, then a 16 KiB reservation: 4 KiB of room left is enough to extend.
        q.push(1, &[1u8; 60 * 1024]);
        let r = q.reserve(1, 16 * 1024, false);
        assert_eq!((r.len, r.extends.is_some()), (4 * 1024, true));
        q.commit(r, r.len);
        // A full frame: the next reservation starts a new one.
        let r = q.reserve(1, 16 * 1024, false);
        assert_eq!((r.len, r.extends), (16 * 1024, None));
        q.commit(r, 100);
        // Packed into the second frame: 100 bytes of room are too few for a 64 KiB wish
        // unless packing.
        q.push(1, &[2u8; MAX_FRAME_PAYLOAD - 200]);
        let r = q.reserve(1, MAX_FRAME_PAYLOAD, false);
        assert!(r.extends.is_none());
        q.commit(r, 0);
        let r = q.reserve(1, MAX_FRAME_PAYLOAD, true);
        assert_eq!((r.len, r.extends.is_some()), (100, true));
        // Another stream never extends stream 1's frame.
        let r = q.reserve(3, 10, true);
        assert!(r.extends.is_none());
        q.commit(r, 10);
        q.finish(3);
        q.finish(1);
        assert_eq!(
            sealed(&mut q),
            [
                (1, MAX_FRAME_PAYLOAD, false),
                (1, MAX_FRAME_PAYLOAD - 100, false),
                (3, 10, true),
                (1, 0, true)
            ]
        );
        q.check();
        assert_eq!(q.queued(), 0);
        assert!(sealed(&mut q).is_empty());
    }

    #[test]
    fn buffers_stay_initialized_and_trade_roles() {
        let mut q = TxQueue::default();
        for round in 0..6u8 {
            let r = q.reserve(1, 1000, false);
            q.room(&r).fill(round);
            q.commit(r, 1000);
            let mut control = vec![9u8; 20];
            q.seal(&mut control);
            assert!(control.is_empty());
            let batch = q.batch();
            assert_eq!(batch.len(), 20 + HEADER_LEN + 1000);
            assert!(batch[20 + HEADER_LEN..].iter().all(|&b| b == round));
            q.advance(usize::MAX);
            q.check();
        }
        // Two buffers, grown once each.
        assert!(q.bufs.iter().all(|b| b.len() == MIN_ALLOC));
    }
}
