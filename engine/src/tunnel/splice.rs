//! [`splice`]: copy bytes both ways between two byte streams (a user's TLS connection and a
//! tunnel stream, or a tunnel stream and a local service) with half-close propagation.
//!
//! One future polls both directions; it owns both streams, so neither is split (no `Mutex`, no
//! second task) and each stream's read and write are polled with the same waker.
//!
//! # Copies
//!
//! When one side is a [`MuxStream`] (the engine's user sessions, the agent's services), the
//! directions touching it use the stream's copy-free calls: towards the tunnel, the other
//! side's `poll_read` fills the room [`MuxStream::poll_write_with`] lends inside the tunnel's
//! send queue; from the tunnel, the other side's `poll_write` takes the bytes
//! [`MuxStream::poll_read_with`] lends from the stream's receive buffer. No splice buffer is
//! allocated for such a direction, and each byte is copied once less on each side than through
//! `poll_read`/`poll_write` and a buffer. A stream of another type that lends its buffers the
//! same way implements [`Lend`] and is spliced with [`splice_lending`] (the engine's cross-shard
//! hop ends, whose buffers are the chunks that travel between shards). Otherwise (two plain byte streams, two tunnel streams, a wrapped
//! `MuxStream` such as the agent's PostgreSQL tap) a direction copies through a
//! [`SPLICE_BUF_BYTES`] buffer, allocated on its first read. Which path a direction takes is
//! decided by type (for [`MuxStream`], this module's own type, `Any`: a `TypeId` comparison the
//! compiler folds; for other lenders, by calling [`splice_lending`]), at no measurable cost.
//!
//! Either way the behaviour is the same: a direction reads only when it can pass the bytes on
//! (backpressure: a full tunnel stream stops the reads from the socket, a slow socket leaves
//! the bytes in the stream's receive buffer, whose window stops the peer), a read's EOF closes
//! the other side's write half once everything before it went out, and the bytes counted are
//! the bytes written.

use std::any::{Any, TypeId};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};

use super::MuxStream;

/// Bytes per read or write of a buffered direction: two TLS records, or half a mux DATA frame.
/// A direction between two plain streams holds a buffer of this size (2 × 32 KiB per session at
/// most).
pub const SPLICE_BUF_BYTES: usize = 32 * 1024;

/// Most bytes a direction into a lending stream reads per read: one whole mux DATA frame
/// ([`crate::mux::MAX_FRAME_PAYLOAD`]), read straight into the tunnel's send queue. The agent's
/// read of a local service's socket is one `recv` per frame, half as many as with
/// [`SPLICE_BUF_BYTES`] (each also acknowledges the service's bytes, which wakes its sends).
pub const LEND_READ_BYTES: usize = crate::mux::MAX_FRAME_PAYLOAD;

/// Reads per direction per poll before yielding to the executor's other tasks. Into a tunnel
/// stream that is 4 frames, 256 KiB: half of a grown stream window
/// ([`crate::mux::MAX_STREAM_WINDOW`]). Yielding there lets the tunnel driver send that half
/// while the splice reads the other, so the peer starts on the first half instead of waiting
/// for a whole window in one write. With 16 reads (1 MiB, more than a window) a bulk download
/// went out in one 512 KiB write per window and the two processes took turns: 514-608 MiB/s
/// against 656-740 MiB/s with 4, for the same CPU per GiB (BENCHMARKS.md, "bulk: the floor of a
/// two-process chain"). The count is of reads, not bytes: from a TLS stream, whose `poll_read`
/// yields one 16 KiB record, a poll moves 64 KiB. A budget of 256 KiB in bytes made those
/// tunnel writes 4x larger for the same CPU per GiB and a lower upload rate, so it was not
/// taken (BENCHMARKS.md, "bulk: the splice's budget in bytes").
const SPLICE_READS_PER_POLL: usize = 4;

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
///
/// A [`MuxStream`] on either side (by value) is driven through its copy-free calls (see the
/// module docs); any other stream through `poll_read`/`poll_write` and a buffer.
pub async fn splice<A, B>(a: A, b: B) -> Result<Spliced, SpliceError>
where
    A: AsyncRead + AsyncWrite + Unpin + 'static,
    B: AsyncRead + AsyncWrite + Unpin + 'static,
{
    Splice {
        a,
        b,
        a_to_b: Half::new(),
        b_to_a: Half::new(),
    }
    .await
}

/// [`splice`] where `b` lends its buffers ([`Lend`]): both directions touching `b` use them
/// (`a`'s `poll_read` fills the room `b` lends; `a`'s `poll_write` takes the bytes `b` lends),
/// so neither direction allocates a splice buffer. For streams other than [`MuxStream`] (which
/// [`splice`] recognises by itself), such as the engine's cross-shard hop ends.
pub async fn splice_lending<A, B>(a: A, b: B) -> Result<Spliced, SpliceError>
where
    A: AsyncRead + AsyncWrite + Unpin + 'static,
    B: Lend + AsyncRead + AsyncWrite + Unpin + 'static,
{
    Lending(Splice {
        a,
        b,
        a_to_b: Half::new(),
        b_to_a: Half::new(),
    })
    .await
}

struct Splice<A, B> {
    a: A,
    b: B,
    a_to_b: Half,
    b_to_a: Half,
}

/// One direction. On the buffered path, `buf[start..end]` was read and not yet written.
struct Half {
    /// Empty until the buffered path first reads.
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

/// A stream that lends a splice its own buffers: room to read into ([`Lend::poll_write_with`])
/// and received bytes to write from ([`Lend::poll_read_with`]), with [`MuxStream`]'s contract
/// for both. Implemented by [`MuxStream`] and by the engine's cross-shard hop ends (whose
/// buffers are the chunks that travel between shards); see [`splice_lending`].
pub trait Lend {
    /// See [`MuxStream::poll_write_with`].
    fn poll_write_with<F>(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        fill: F,
    ) -> Poll<io::Result<usize>>
    where
        F: FnOnce(&mut Context<'_>, &mut [u8]) -> Poll<io::Result<usize>>;

    /// See [`MuxStream::poll_read_with`].
    fn poll_read_with<F>(&mut self, cx: &mut Context<'_>, drain: F) -> Poll<io::Result<usize>>
    where
        F: FnOnce(&mut Context<'_>, &[u8]) -> Poll<io::Result<usize>>;
}

impl Lend for MuxStream {
    fn poll_write_with<F>(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        fill: F,
    ) -> Poll<io::Result<usize>>
    where
        F: FnOnce(&mut Context<'_>, &mut [u8]) -> Poll<io::Result<usize>>,
    {
        MuxStream::poll_write_with(self, cx, max, fill)
    }

    fn poll_read_with<F>(&mut self, cx: &mut Context<'_>, drain: F) -> Poll<io::Result<usize>>
    where
        F: FnOnce(&mut Context<'_>, &[u8]) -> Poll<io::Result<usize>>,
    {
        MuxStream::poll_read_with(self, cx, drain)
    }
}

fn same<T: 'static, U: 'static>() -> bool {
    TypeId::of::<T>() == TypeId::of::<U>()
}

impl Half {
    fn new() -> Half {
        Half {
            buf: Box::default(),
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
        R: AsyncRead + Unpin + 'static,
        W: AsyncWrite + Unpin + 'static,
    {
        // The lending side's buffers, the other side's `poll_read`/`poll_write`. Two streams of
        // one type (possibly of one tunnel, whose state a callback must not touch) take the
        // buffered path.
        if !same::<R, MuxStream>() {
            if let Some(mux) = (w as &mut dyn Any).downcast_mut::<MuxStream>() {
                return self.poll_into(cx, r, mux);
            }
        }
        if !same::<W, MuxStream>() {
            if let Some(mux) = (r as &mut dyn Any).downcast_mut::<MuxStream>() {
                return self.poll_from(cx, mux, w);
            }
        }
        self.poll_buffered(cx, r, w)
    }

    /// `r → w` through the buffer.
    fn poll_buffered<R, W>(
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
                return self.poll_close_writer(cx, w);
            }
            if reads == SPLICE_READS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            reads += 1;
            if self.buf.is_empty() {
                self.buf = vec![0u8; SPLICE_BUF_BYTES].into_boxed_slice();
            }
            match Pin::new(&mut *r).poll_read(cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(n)) => {
                    self.start = 0;
                    self.end = n;
                }
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(e)) => return failed(false, "read", e),
                Poll::Pending => return self.poll_flush_idle(cx, w),
            }
        }
    }

    /// `r → w`: `r` reads straight into the room `w` lends (a tunnel stream: in its send
    /// queue), and only while `w` has credit (else `w` wakes us when it has).
    fn poll_into<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<Result<(), HalfError>>
    where
        R: AsyncRead + Unpin,
        W: Lend + AsyncWrite + Unpin,
    {
        let mut reads = 0;
        loop {
            if self.closed {
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return self.poll_close_writer(cx, w);
            }
            if reads == SPLICE_READS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            reads += 1;
            // Whether `fill` ran: its result is then the reader's (the stream's own errors
            // come without calling it).
            let mut read = false;
            let sent = w.poll_write_with(cx, LEND_READ_BYTES, |cx, room| {
                read = true;
                Pin::new(&mut *r).poll_read(cx, room)
            });
            match sent {
                Poll::Ready(Ok(0)) if read => self.eof = true,
                Poll::Ready(Ok(0)) => {
                    return failed(true, "write", io::ErrorKind::WriteZero.into())
                }
                Poll::Ready(Ok(n)) => self.bytes += n as u64,
                Poll::Ready(Err(e)) if read && e.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(e)) => {
                    return failed(!read, if read { "read" } else { "write" }, e)
                }
                // Either the reader is idle or `w` has no credit; a lending stream needs no
                // flush either way.
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// `r → w`: `w` writes straight from the bytes `r` lends (a tunnel stream: its receive
    /// buffer); what it does not take stays there (and holds back `r`'s window).
    fn poll_from<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<Result<(), HalfError>>
    where
        R: Lend,
        W: AsyncWrite + Unpin,
    {
        let mut reads = 0;
        loop {
            if self.closed {
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return self.poll_close_writer(cx, w);
            }
            if reads == SPLICE_READS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            reads += 1;
            // Whether `drain` ran: its result is then the writer's.
            let mut wrote = false;
            let taken = r.poll_read_with(cx, |cx, data| {
                wrote = true;
                match Pin::new(&mut *w).poll_write(cx, data) {
                    // A 0 here would read as the stream's EOF.
                    Poll::Ready(Ok(0)) => Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    other => other,
                }
            });
            match taken {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(n)) => {
                    self.bytes += n as u64;
                    self.unflushed = true;
                }
                Poll::Ready(Err(e)) if wrote => return failed(true, "write", e),
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(e)) => return failed(false, "read", e),
                // The writer is full: its wake-up is registered, nothing to flush into it.
                Poll::Pending if wrote => return Poll::Pending,
                Poll::Pending => return self.poll_flush_idle(cx, w),
            }
        }
    }

    /// The reader is idle: push out what the writer may still hold (rustls keeps records it
    /// could not write yet) before sleeping.
    fn poll_flush_idle<W>(&mut self, cx: &mut Context<'_>, w: &mut W) -> Poll<Result<(), HalfError>>
    where
        W: AsyncWrite + Unpin,
    {
        if self.unflushed {
            match Pin::new(&mut *w).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => return failed(true, "flush", e),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }

    /// After the reader's EOF (and every byte before it written): close the writer's half.
    fn poll_close_writer<W>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
    ) -> Poll<Result<(), HalfError>>
    where
        W: AsyncWrite + Unpin,
    {
        match Pin::new(&mut *w).poll_close(cx) {
            Poll::Ready(Ok(())) => {
                self.closed = true;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => failed(true, "close", e),
            Poll::Pending => Poll::Pending,
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
    A: AsyncRead + AsyncWrite + Unpin + 'static,
    B: AsyncRead + AsyncWrite + Unpin + 'static,
{
    type Output = Result<Spliced, SpliceError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let forward = this.a_to_b.poll(cx, &mut this.a, &mut this.b);
        let backward = this.b_to_a.poll(cx, &mut this.b, &mut this.a);
        this.outcome(forward, backward)
    }
}

/// A [`Splice`] whose `b` lends both ways (see [`splice_lending`]).
struct Lending<A, B>(Splice<A, B>);

impl<A, B> Future for Lending<A, B>
where
    A: AsyncRead + AsyncWrite + Unpin + 'static,
    B: Lend + AsyncRead + AsyncWrite + Unpin + 'static,
{
    type Output = Result<Spliced, SpliceError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut self.get_mut().0;
        let forward = this.a_to_b.poll_into(cx, &mut this.a, &mut this.b);
        let backward = this.b_to_a.poll_from(cx, &mut this.b, &mut this.a);
        this.outcome(forward, backward)
    }
}

impl<A, B> Splice<A, B> {
    /// What one poll of both directions comes to: the first error (naming its side), done
    /// when both are, else pending.
    fn outcome(
        &self,
        forward: Poll<Result<(), HalfError>>,
        backward: Poll<Result<(), HalfError>>,
    ) -> Poll<Result<Spliced, SpliceError>> {
        let spliced = Spliced {
            a_to_b: self.a_to_b.bytes,
            b_to_a: self.b_to_a.bytes,
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
