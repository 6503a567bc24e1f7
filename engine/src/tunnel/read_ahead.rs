//! [`ReadAhead`]: a socket under rustls, read in large reads.
//!
//! rustls (0.23) reads TLS from its transport at most 4 KiB past what it already holds
//! (`DeframerVecBuffer::prepare_read`), so a full 16 KiB record costs five `recv` calls, and a
//! bulk transfer about 330,000 per GiB on each TLS hop it is read on. [`ReadAhead`] sits between
//! rustls and the socket: a small read takes one read of up to [`READ_AHEAD_BYTES`] from the
//! socket and hands the rest out to the next small reads from memory. One `recv` then brings in
//! several records; the price is one copy of the bytes in memory (rustls' read copies out of our
//! buffer instead of out of the socket).
//!
//! Memory: the buffer is held only while it has bytes not yet handed out; once they are, it goes
//! back to a small per-thread pool (each glommio executor is a thread), so an idle connection
//! holds none and a busy one takes no allocation per read.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::io::{AsyncRead, AsyncWrite};

use crate::mux::copy::copy;

/// Most bytes one read from the socket brings in: a whole `sendmsg` of the peer's tunnel
/// driver in a bulk transfer (a stream window of 256 KiB in 16 full TLS records, their
/// overhead and the batch's frame headers in a 17th: about 262,600 bytes), so the engine reads
/// each in one `recv` (with 64 KiB: five).
pub const READ_AHEAD_BYTES: usize = 272 * 1024;

/// A read asking for at least this much, with nothing held, reads the socket directly.
const DIRECT_READ_MIN: usize = 32 * 1024;

/// Buffers kept per thread for the next read-ahead (about 1 MiB).
const POOLED_BUFFERS: usize = 4;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A read-ahead buffer from the pool, or a new one.
fn take_buffer() -> Vec<u8> {
    POOL.with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| vec![0u8; READ_AHEAD_BYTES])
}

/// Returns a read-ahead buffer to the pool (a buffer of another size, the replayed prefix, is
/// dropped).
fn give_back(buf: Vec<u8>) {
    if buf.len() != READ_AHEAD_BYTES {
        return;
    }
    POOL.with_borrow_mut(|pool| {
        if pool.len() < POOLED_BUFFERS {
            pool.push(buf);
        }
    });
}

/// A byte stream that first hands out `prefix` (bytes already read from `inner`, such as the
/// ClientHello the engine's router read), then reads `inner` in reads of up to
/// [`READ_AHEAD_BYTES`] and hands those bytes out as asked. Writes go straight to `inner`
/// (vectored writes stay vectored).
#[derive(Debug)]
pub struct ReadAhead<S> {
    /// The bytes being handed out, `buf[at..end]`: the prefix, then a read-ahead buffer. Empty
    /// (no allocation) when nothing is held.
    buf: Vec<u8>,
    at: usize,
    end: usize,
    inner: S,
}

impl<S> ReadAhead<S> {
    /// Hands out `prefix` (may be empty), then reads `inner`.
    pub fn new(prefix: Vec<u8>, inner: S) -> ReadAhead<S> {
        let end = prefix.len();
        ReadAhead {
            buf: prefix,
            at: 0,
            end,
            inner,
        }
    }

    /// The wrapped stream; bytes already read ahead from it are not seen there.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Bytes held: read from `inner` and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.end - self.at
    }

    /// Copies held bytes into `out`; releases the buffer once it is handed out.
    fn hand_out(&mut self, out: &mut [u8]) -> usize {
        let held = self.buf.get(self.at..self.end).unwrap_or_default();
        let n = held.len().min(out.len());
        // The mux's copy: rustls' buffer sits at any offset from ours, and a plain `memcpy`
        // in the wrong one of them costs 20x here (see `crate::mux::copy`).
        copy(out, held);
        self.at += n;
        if self.at >= self.end {
            give_back(std::mem::take(&mut self.buf));
            self.at = 0;
            self.end = 0;
        }
        n
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.at < this.end {
            return Poll::Ready(Ok(this.hand_out(out)));
        }
        if out.is_empty() || out.len() >= DIRECT_READ_MIN {
            return Pin::new(&mut this.inner).poll_read(cx, out);
        }
        let mut ahead = take_buffer();
        match Pin::new(&mut this.inner).poll_read(cx, &mut ahead) {
            Poll::Ready(Ok(n)) => {
                this.buf = ahead;
                this.at = 0;
                this.end = n.min(READ_AHEAD_BYTES);
                Poll::Ready(Ok(this.hand_out(out)))
            }
            other => {
                give_back(ahead);
                other
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use futures_lite::io::{AsyncReadExt, Cursor};

    use super::*;

    /// Counts the reads that reach the wrapped stream and how many bytes each asked for.
    struct Reads<R> {
        inner: R,
        asked: Vec<usize>,
    }

    impl<R: AsyncRead + Unpin> AsyncRead for Reads<R> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.asked.push(buf.len());
            Pin::new(&mut this.inner).poll_read(cx, buf)
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn replays_the_prefix_then_reads_inner() {
        futures_lite::future::block_on(async {
            let mut stream = ReadAhead::new(b"hello ".to_vec(), Cursor::new(b"world".to_vec()));
            let mut small = [0u8; 4];
            assert_eq!(stream.read(&mut small).await.ok(), Some(4));
            assert_eq!(&small, b"hell");
            let mut rest = Vec::new();
            assert_eq!(stream.read_to_end(&mut rest).await.ok(), Some(7));
            assert_eq!(rest, b"o world");
        });
    }

    #[test]
    fn empty_prefix_is_transparent() {
        futures_lite::future::block_on(async {
            let mut stream = ReadAhead::new(Vec::new(), Cursor::new(b"abc".to_vec()));
            let mut all = Vec::new();
            assert_eq!(stream.read_to_end(&mut all).await.ok(), Some(3));
            assert_eq!(all, b"abc");
        });
    }

    /// rustls-sized reads (4 KiB) of 1 MiB: every byte arrives in order, and the wrapped
    /// stream sees one large read per 64 KiB instead of one per 4 KiB.
    #[test]
    fn small_reads_become_large_ones() {
        futures_lite::future::block_on(async {
            let data = pattern(1 << 20);
            let reads = Reads {
                inner: Cursor::new(data.clone()),
                asked: Vec::new(),
            };
            let mut stream = ReadAhead::new(Vec::new(), reads);
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = stream.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&chunk[..n]);
            }
            assert!(got == data, "bytes differ");
            let asked = &stream.get_ref().asked;
            // Reads of READ_AHEAD_BYTES until all is in, then the one that sees EOF.
            assert_eq!(
                asked.len(),
                data.len().div_ceil(READ_AHEAD_BYTES) + 1,
                "{asked:?}"
            );
            assert!(asked.iter().all(|&n| n == READ_AHEAD_BYTES));
            assert_eq!(stream.buffered(), 0);
        });
    }

    /// A reader that hands out odd-sized pieces: what a socket does. Reads of varying sizes
    /// (as rustls makes them) must see the same byte sequence.
    #[test]
    fn odd_sizes_keep_every_byte_in_order() {
        struct Pieces {
            data: Vec<u8>,
            at: usize,
            next: Cell<usize>,
        }
        impl AsyncRead for Pieces {
            fn poll_read(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                buf: &mut [u8],
            ) -> Poll<io::Result<usize>> {
                let this = self.get_mut();
                let piece = this.next.get() % 23_000 + 1;
                this.next
                    .set(this.next.get().wrapping_mul(31).wrapping_add(17) % 1_000_003);
                let n = piece.min(buf.len()).min(this.data.len() - this.at);
                buf[..n].copy_from_slice(&this.data[this.at..this.at + n]);
                this.at += n;
                Poll::Ready(Ok(n))
            }
        }
        futures_lite::future::block_on(async {
            let data = pattern(3 << 20);
            let pieces = Pieces {
                data: data.clone(),
                at: 0,
                next: Cell::new(5),
            };
            let mut stream = ReadAhead::new(b"prefix".to_vec(), pieces);
            let mut got = Vec::new();
            let sizes = [5usize, 4096, 1, 18_000, 40_000, 70_000, 333];
            let mut i = 0;
            loop {
                let mut chunk = vec![0u8; sizes[i % sizes.len()]];
                i += 1;
                let n = stream.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&chunk[..n]);
            }
            let mut want = b"prefix".to_vec();
            want.extend_from_slice(&data);
            assert!(got == want, "bytes differ");
        });
    }

    /// Nothing is held between reads once everything read ahead is handed out, so an idle
    /// connection keeps no buffer.
    #[test]
    fn releases_the_buffer_once_handed_out() {
        futures_lite::future::block_on(async {
            let mut stream = ReadAhead::new(Vec::new(), Cursor::new(pattern(10_000)));
            let mut chunk = [0u8; 4096];
            assert_eq!(stream.read(&mut chunk).await.ok(), Some(4096));
            assert_eq!(stream.buffered(), 10_000 - 4096);
            assert_eq!(stream.read(&mut chunk).await.ok(), Some(4096));
            assert_eq!(stream.read(&mut chunk).await.ok(), Some(10_000 - 8192));
            assert_eq!(stream.buffered(), 0);
            assert_eq!(stream.buf.capacity(), 0, "the buffer went back to the pool");
        });
    }
}
