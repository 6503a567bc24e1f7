//! [`splice`]: copy bytes both ways between two byte streams (a user's TLS connection and a
//! tunnel stream, or a tunnel stream and a local service) with half-close propagation.
//!
//! One future polls both directions; it owns both streams, so neither is split (no `Mutex`, no
//! second task) and each stream's read and write are polled with the same waker.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};

/// Buffer per direction: two TLS records, or half a mux DATA frame. Per session this costs
/// 2 × 32 KiB, which bounds what a splice holds between its two ends.
pub const SPLICE_BUF_BYTES: usize = 32 * 1024;

/// Reads per direction per poll before yielding to the executor's other tasks.
const SPLICE_READS_PER_POLL: usize = 16;

/// Bytes moved by a [`splice`], each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spliced {
    /// Read from `a` and written to `b`.
    pub a_to_b: u64,
    /// Read from `b` and written to `a`.
    pub b_to_a: u64,
}

/// Which end of a splice failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The first argument of [`splice`].
    A,
    /// The second argument of [`splice`].
    B,
}

/// A [`splice`] stopped on an I/O error; both streams are dropped (a tunnel stream is reset).
#[derive(Debug, thiserror::Error)]
#[error("splice: {op} on side {side:?} failed after {a_to_b} bytes a→b, {b_to_a} bytes b→a: {source}",
    a_to_b = .spliced.a_to_b, b_to_a = .spliced.b_to_a)]
pub struct SpliceError {
    /// The stream whose operation failed.
    pub side: Side,
    /// What failed: `"read"`, `"write"`, `"flush"` or `"close"`.
    pub op: &'static str,
    /// Bytes moved before the failure.
    pub spliced: Spliced,
    /// The I/O error.
    #[source]
    pub source: io::Error,
}

/// Copies `a → b` and `b → a` concurrently until both directions are done. When one side's read
/// reaches EOF, the bytes still buffered are written and the other side's write half is closed
/// (`poll_close`: FIN on a tunnel stream, close_notify + shutdown on TLS), while the opposite
/// direction keeps flowing. Returns the bytes moved each way, or the first error (with the
/// bytes moved until then, for the audit log).
pub async fn splice<A, B>(a: A, b: B) -> Result<Spliced, SpliceError>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    Splice {
        a,
        b,
        a_to_b: Half::new(),
        b_to_a: Half::new(),
    }
    .await
}

struct Splice<A, B> {
    a: A,
    b: B,
    a_to_b: Half,
    b_to_a: Half,
}

/// One direction: `buf[start..end]` read and not yet written.
struct Half {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The reader reached EOF.
    eof: bool,
    /// The writer was closed after EOF: this direction is done.
    closed: bool,
    /// Bytes went to the writer since its last flush.
    unflushed: bool,
    bytes: u64,
}

/// A failed operation: on the reader or the writer of a [`Half`], and which.
struct HalfError {
    on_writer: bool,
    op: &'static str,
    source: io::Error,
}

impl Half {
    fn new() -> Half {
        Half {
            buf: vec![0u8; SPLICE_BUF_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            closed: false,
            unflushed: false,
            bytes: 0,
        }
    }

    /// Moves bytes from `r` to `w`; `Ready(Ok)` once this direction is done. `Pending` either
    /// because both ends wait, or (having woken the task) because its read budget ran out.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<Result<(), HalfError>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut reads = 0;
        loop {
            if self.closed {
                return Poll::Ready(Ok(()));
            }
            if self.start < self.end {
                let pending = self.buf.get(self.start..self.end).unwrap_or_default();
                match Pin::new(&mut *w).poll_write(cx, pending) {
                    Poll::Ready(Ok(0)) => {
                        return failed(true, "write", io::ErrorKind::WriteZero.into())
                    }
                    Poll::Ready(Ok(n)) => {
                        self.start += n;
                        self.bytes += n as u64;
                        self.unflushed = true;
                        continue;
                    }
                    Poll::Ready(Err(e)) => return failed(true, "write", e),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.eof {
                return match Pin::new(&mut *w).poll_close(cx) {
                    Poll::Ready(Ok(())) => {
                        self.closed = true;
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(e)) => failed(true, "close", e),
                    Poll::Pending => Poll::Pending,
                };
            }
            if reads == SPLICE_READS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            reads += 1;
            match Pin::new(&mut *r).poll_read(cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(n)) => {
                    self.start = 0;
                    self.end = n;
                }
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(e)) => return failed(false, "read", e),
                Poll::Pending => {
                    // The reader is idle: push out what the writer may still hold (rustls keeps
                    // records it could not write yet) before sleeping.
                    if self.unflushed {
                        match Pin::new(&mut *w).poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.unflushed = false,
                            Poll::Ready(Err(e)) => return failed(true, "flush", e),
                            Poll::Pending => {}
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

fn failed(on_writer: bool, op: &'static str, source: io::Error) -> Poll<Result<(), HalfError>> {
    Poll::Ready(Err(HalfError {
        on_writer,
        op,
        source,
    }))
}

impl<A, B> Future for Splice<A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    type Output = Result<Spliced, SpliceError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let forward = this.a_to_b.poll(cx, &mut this.a, &mut this.b);
        let backward = this.b_to_a.poll(cx, &mut this.b, &mut this.a);
        let spliced = Spliced {
            a_to_b: this.a_to_b.bytes,
            b_to_a: this.b_to_a.bytes,
        };
        let fail = |e: HalfError, forward: bool| {
            // Forward reads A and writes B; backward reads B and writes A.
            let side = if forward == e.on_writer {
                Side::B
            } else {
                Side::A
            };
            Poll::Ready(Err(SpliceError {
                side,
                op: e.op,
                spliced,
                source: e.source,
            }))
        };
        match (forward, backward) {
            (Poll::Ready(Err(e)), _) => fail(e, true),
            (_, Poll::Ready(Err(e))) => fail(e, false),
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(Ok(spliced)),
            _ => Poll::Pending,
        }
    }
}
