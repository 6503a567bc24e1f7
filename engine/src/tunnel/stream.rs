//! [`MuxStream`], one stream of a tunnel as `AsyncRead + AsyncWrite`, and [`Incoming`], a
//! stream the peer opened that awaits our answer.
//!
//! Both are thin: every call borrows the tunnel's [`Shared`] state, calls the mux core, dispatches
//! its events and parks a waker in the stream's [`super::shared::Slot`] when it must wait.

use std::cell::{RefCell, RefMut};
use std::fmt;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};

use super::error::{AcceptError, CloseReason};
use super::shared::{register, Deferred, Shared};
use crate::mux::{ErrorCode, MuxError, StreamId};

/// Reason sent when an [`Incoming`] is dropped without an answer.
const DROPPED_INCOMING_REASON: &str = "stream dropped by the acceptor";

/// One stream of a tunnel, for splicing with `futures_lite::io::copy` or [`super::splice`].
///
/// * `poll_read` returns what the peer sent, `Pending` until more arrives, `Ok(0)` after the
///   peer's FIN (half-close) once every byte before it was read.
/// * `poll_write` takes as much as the stream's credit and the tunnel's send queue allow, and
///   is `Pending` while there is none (woken by the core's `Writable`): that is the backpressure
///   that keeps one slow reader from growing memory anywhere.
/// * `poll_flush` is immediate: written bytes are in the tunnel's queue and the driver writes
///   them as soon as the transport takes them.
/// * `poll_close` half-closes: FIN after the bytes already written. Reading goes on.
/// * Dropping the stream before both directions finished resets it ([`ErrorCode::CANCEL`]);
///   [`MuxStream::reset`] sends another code.
///
/// Errors: `ConnectionReset` after the peer's RESET or when the tunnel ends (or its transport
/// reaches EOF with this stream's FIN still missing); `BrokenPipe` when writing after
/// `poll_close`. The inner error's text says which.
///
/// `&MuxStream` is `AsyncRead + AsyncWrite` too, so one task can read and write the same
/// stream at once (e.g. `future::zip` of a reader and a writer). One reader and one writer at a
/// time: a second concurrent reader (or writer) replaces the first one's wake-up.
///
/// Zero-copy: [`MuxStream::poll_write_with`] lets the caller read the user's socket straight
/// into the tunnel's send queue, and [`MuxStream::poll_read_with`] write the user's socket
/// straight from the stream's receive buffer, where `poll_write`/`poll_read` copy through the
/// caller's buffer; a splice over them copies each byte once less on each side.
pub struct MuxStream {
    shared: Rc<RefCell<Shared>>,
    id: StreamId,
}

/// A stream the peer opened, with its dial header. Answer with [`Incoming::accept`] or
/// [`Incoming::refuse`]; dropping it refuses it.
pub struct Incoming {
    /// The dial header from the peer's OPEN (≤ [`crate::mux::MAX_DIAL_HEADER_LEN`] bytes).
    pub header: Vec<u8>,
    shared: Rc<RefCell<Shared>>,
    id: StreamId,
    answered: bool,
}

impl MuxStream {
    pub(crate) fn new(shared: Rc<RefCell<Shared>>, id: StreamId) -> MuxStream {
        MuxStream { shared, id }
    }

    /// The stream's id in its tunnel.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Aborts both directions with `code` (an application code ≥ 0x100, or one of
    /// [`ErrorCode`]'s); unread data is dropped.
    pub fn reset(self, code: ErrorCode) {
        self.abort(code);
    }

    fn abort(&self, code: ErrorCode) {
        // Busy only when dropped inside another stream's `poll_*_with` callback on the same
        // tunnel (misuse): the stream is then left to the tunnel's end.
        let Ok(mut sh) = self.shared.try_borrow_mut() else {
            return;
        };
        let Some(slot) = sh.slots.remove(&self.id) else {
            return;
        };
        if sh.end.is_some() || slot.reset.is_some() || (slot.send_finished && slot.fin_received) {
            // Gone already, or finished both ways (the core dropped it itself).
            return;
        }
        if let Err(MuxError::ControlQueueFull) = sh.conn.reset(self.id, code) {
            sh.deferred.push_back(Deferred::Reset(self.id, code));
        }
        sh.after_op();
    }

    /// Zero-copy read: hands the bytes received on the stream to `drain` (e.g. a write to the
    /// user's socket, polled with the `cx` it is given) straight from the stream's receive
    /// buffer, and drops as many as it says it took. `Ready(Ok(0))` without calling `drain`
    /// after the peer's FIN (once every byte before it was taken), `Pending` while nothing is
    /// buffered; otherwise `drain`'s result: `Ready(Ok(n))` (`n` bytes taken), `Pending` (it
    /// registered its own wake-up, e.g. for the socket's writability) or its error. So an error
    /// comes from `drain` exactly when `drain` was called and returned it. Errors of the stream
    /// itself as [`MuxStream`]'s `poll_read`.
    ///
    /// `drain` runs while the tunnel's state is borrowed: it must not use the same tunnel (any
    /// [`MuxStream`] of it fails with an error meanwhile).
    pub fn poll_read_with<F>(&self, cx: &mut Context<'_>, drain: F) -> Poll<io::Result<usize>>
    where
        F: FnOnce(&mut Context<'_>, &[u8]) -> Poll<io::Result<usize>>,
    {
        let mut sh = borrow(&self.shared)?;
        let sh = &mut *sh;
        if let Some(done) = read_check(sh, self.id, true) {
            return done;
        }
        let data = match sh.conn.read_buf(self.id) {
            Ok(data) => data,
            Err(err) => return Poll::Ready(Err(mux_error(&err))),
        };
        if data.is_empty() {
            return park_reader(sh, self.id, cx);
        }
        let n = std::task::ready!(drain(cx, data))?;
        if let Err(err) = sh.conn.consume(self.id, n) {
            return Poll::Ready(Err(mux_error(&err)));
        }
        sh.after_op();
        Poll::Ready(Ok(n))
    }

    /// Zero-copy write: lets `fill` write the stream's next bytes (e.g. a read from the user's
    /// socket, polled with the `cx` it is given) straight into the tunnel's send queue, into
    /// room for at most `max` bytes (and at most one 64 KiB frame), and sends as many as it
    /// says it wrote. `Pending` while the stream has no credit (woken as for `poll_write`);
    /// otherwise `fill`'s result: `Ready(Ok(n))` (`n` bytes sent; 0 sends nothing, e.g. at the
    /// socket's EOF), `Pending` (it registered its own wake-up) or its error. So an error comes
    /// from `fill` exactly when `fill` was called and returned it. Errors of the stream itself
    /// as `poll_write`.
    ///
    /// `fill` runs while the tunnel's state is borrowed: it must not use the same tunnel (any
    /// [`MuxStream`] of it fails with an error meanwhile).
    pub fn poll_write_with<F>(
        &self,
        cx: &mut Context<'_>,
        max: usize,
        fill: F,
    ) -> Poll<io::Result<usize>>
    where
        F: FnOnce(&mut Context<'_>, &mut [u8]) -> Poll<io::Result<usize>>,
    {
        let mut sh = borrow(&self.shared)?;
        let sh = &mut *sh;
        if let Some(done) = write_check(sh, self.id, max, cx) {
            return done;
        }
        let room = match sh.conn.send_buf(self.id, max) {
            Ok(room) => room,
            Err(err) => return Poll::Ready(Err(mux_error(&err))),
        };
        if room.is_empty() {
            // No credit: the core owes a `Writable`.
            return park_writer(sh, self.id, cx);
        }
        let n = match fill(cx, room) {
            Poll::Ready(Ok(n)) => n,
            other => {
                // Nothing of the room is sent (the next call voids it).
                return other;
            }
        };
        let sent = sh.conn.send_commit(self.id, n);
        sh.after_op();
        match sent {
            Ok(n) => Poll::Ready(Ok(n)),
            Err(err) => Poll::Ready(Err(mux_error(&err))),
        }
    }

    fn do_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut sh = borrow(&self.shared)?;
        let sh = &mut *sh;
        if let Some(done) = read_check(sh, self.id, !buf.is_empty()) {
            return done;
        }
        match sh.conn.recv(self.id, buf) {
            Ok(0) => park_reader(sh, self.id, cx),
            Ok(n) => {
                sh.after_op();
                Poll::Ready(Ok(n))
            }
            Err(err) => Poll::Ready(Err(mux_error(&err))),
        }
    }

    fn do_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut sh = borrow(&self.shared)?;
        let sh = &mut *sh;
        if let Some(done) = write_check(sh, self.id, buf.len(), cx) {
            return done;
        }
        match sh.conn.send(self.id, buf) {
            Ok(0) => park_writer(sh, self.id, cx),
            Ok(n) => {
                sh.after_op();
                Poll::Ready(Ok(n))
            }
            Err(err) => Poll::Ready(Err(mux_error(&err))),
        }
    }

    fn do_close(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut sh = borrow(&self.shared)?;
        let sh = &mut *sh;
        let Some(slot) = sh.slots.get_mut(&self.id) else {
            return Poll::Ready(Err(gone()));
        };
        if slot.send_finished {
            return Poll::Ready(Ok(()));
        }
        if let Some(code) = slot.reset {
            return Poll::Ready(Err(reset_error(code)));
        }
        if let Some(end) = &sh.end {
            return Poll::Ready(Err(ended_error(end)));
        }
        if slot.accept_pending {
            register(&mut slot.write_waker, cx.waker());
            return Poll::Pending;
        }
        match sh.conn.finish(self.id) {
            Ok(()) => {
                slot.send_finished = true;
                sh.after_op();
                Poll::Ready(Ok(()))
            }
            Err(err) => Poll::Ready(Err(mux_error(&err))),
        }
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        self.abort(ErrorCode::CANCEL);
    }
}

impl fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MuxStream").field("id", &self.id).finish()
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.do_read(cx, buf)
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.do_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.do_close(cx)
    }
}

impl AsyncRead for &MuxStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.do_read(cx, buf)
    }
}

impl AsyncWrite for &MuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.do_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.do_close(cx)
    }
}

impl Incoming {
    pub(crate) fn new(shared: Rc<RefCell<Shared>>, id: StreamId, header: Vec<u8>) -> Incoming {
        Incoming {
            header,
            shared,
            id,
            answered: false,
        }
    }

    /// Opens streams of our own on the tunnel this one came on, without keeping it open (the
    /// agent names a session's recordings to the engine this way).
    pub fn opener(&self) -> super::Opener {
        super::Opener::new(self.shared.clone())
    }

    /// The stream's id in its tunnel.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Accepts the stream. Fails if the opener reset it meanwhile or the tunnel ended.
    pub fn accept(mut self) -> Result<MuxStream, AcceptError> {
        self.answered = true;
        let mut sh = self.shared.borrow_mut();
        let failure = match (&sh.end, sh.slots.get(&self.id).and_then(|s| s.reset)) {
            (_, Some(code)) => Some(AcceptError::Reset { code }),
            (Some(end), None) => Some(AcceptError::Closed(end.clone())),
            (None, None) => None,
        };
        if let Some(err) = failure {
            sh.slots.remove(&self.id);
            return Err(err);
        }
        match sh.conn.open_result(self.id, Ok(())) {
            Ok(()) => {}
            Err(MuxError::ControlQueueFull) => {
                if let Some(slot) = sh.slots.get_mut(&self.id) {
                    slot.accept_pending = true;
                }
                sh.deferred.push_back(Deferred::Accept(self.id));
            }
            Err(MuxError::Closed(reason)) => {
                sh.slots.remove(&self.id);
                return Err(AcceptError::Closed(CloseReason::Mux(reason)));
            }
            Err(_) => {
                // Not awaiting an answer any more: the opener's RESET is in the events below.
                sh.slots.remove(&self.id);
                sh.after_op();
                return Err(AcceptError::Reset {
                    code: ErrorCode::CANCEL,
                });
            }
        }
        sh.after_op();
        drop(sh);
        Ok(MuxStream::new(self.shared.clone(), self.id))
    }

    /// Refuses the stream; the opener's [`super::Tunnel::open`] fails with
    /// [`super::OpenError::Refused`] carrying `message` (cut to
    /// [`crate::mux::MAX_OPEN_ERROR_LEN`] bytes at a character boundary).
    pub fn refuse(mut self, message: &str) {
        self.answer_refused(message);
    }

    fn answer_refused(&mut self, message: &str) {
        self.answered = true;
        let mut sh = self.shared.borrow_mut();
        let Some(slot) = sh.slots.remove(&self.id) else {
            return;
        };
        if sh.end.is_some() || slot.reset.is_some() {
            return;
        }
        let message = truncate_utf8(message, crate::mux::MAX_OPEN_ERROR_LEN);
        if let Err(MuxError::ControlQueueFull) = sh.conn.open_result(self.id, Err(message)) {
            sh.deferred
                .push_back(Deferred::Refuse(self.id, message.to_owned()));
        }
        sh.after_op();
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.answered {
            self.answer_refused(DROPPED_INCOMING_REASON);
        }
    }
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming")
            .field("id", &self.id)
            .field("header_len", &self.header.len())
            .finish()
    }
}

/// The tunnel's state, or an error when it is already borrowed: only inside a `poll_*_with`
/// callback that uses the same tunnel.
fn borrow(shared: &RefCell<Shared>) -> io::Result<RefMut<'_, Shared>> {
    shared.try_borrow_mut().map_err(|_| {
        io::Error::other("tunnel used from inside a poll_read_with/poll_write_with callback")
    })
}

/// What a read must return before looking at the data: gone, reset, finished (or an empty
/// read), tunnel ended. `None` to go on.
fn read_check(sh: &mut Shared, id: StreamId, wants: bool) -> Option<Poll<io::Result<usize>>> {
    let Some(slot) = sh.slots.get(&id) else {
        return Some(Poll::Ready(Err(gone())));
    };
    if let Some(code) = slot.reset {
        return Some(Poll::Ready(Err(reset_error(code))));
    }
    if slot.fin_received || !wants {
        return Some(Poll::Ready(Ok(0)));
    }
    if let Some(end) = &sh.end {
        return Some(Poll::Ready(Err(ended_error(end))));
    }
    None
}

/// Nothing buffered: wait for `Readable`, or fail if nothing more can arrive.
fn park_reader(sh: &mut Shared, id: StreamId, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    if sh.read_closed {
        return Poll::Ready(Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "tunnel transport closed before the stream's FIN",
        )));
    }
    if let Some(slot) = sh.slots.get_mut(&id) {
        register(&mut slot.read_waker, cx.waker());
    }
    Poll::Pending
}

/// What a write of `len` bytes must return before asking the core for room: gone, reset,
/// closed for writing, tunnel ended or read-closed, empty write, accept still deferred.
fn write_check(
    sh: &mut Shared,
    id: StreamId,
    len: usize,
    cx: &mut Context<'_>,
) -> Option<Poll<io::Result<usize>>> {
    let Some(slot) = sh.slots.get_mut(&id) else {
        return Some(Poll::Ready(Err(gone())));
    };
    if let Some(code) = slot.reset {
        return Some(Poll::Ready(Err(reset_error(code))));
    }
    if slot.send_finished {
        return Some(Poll::Ready(Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "write after the stream was closed for writing",
        ))));
    }
    if let Some(end) = &sh.end {
        return Some(Poll::Ready(Err(ended_error(end))));
    }
    if sh.read_closed {
        return Some(Poll::Ready(Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "tunnel transport closed by the peer",
        ))));
    }
    if len == 0 {
        return Some(Poll::Ready(Ok(0)));
    }
    if slot.accept_pending {
        register(&mut slot.write_waker, cx.waker());
        return Some(Poll::Pending);
    }
    None
}

/// No credit or queue space: wait for `Writable`.
fn park_writer(sh: &mut Shared, id: StreamId, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    if let Some(slot) = sh.slots.get_mut(&id) {
        register(&mut slot.write_waker, cx.waker());
    }
    Poll::Pending
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

fn reset_error(code: ErrorCode) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("stream reset by the peer: {code}"),
    )
}

fn ended_error(reason: &CloseReason) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("tunnel closed: {reason}"),
    )
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "stream is gone")
}

fn mux_error(err: &MuxError) -> io::Error {
    let kind = match err {
        MuxError::SendFinished(_) => io::ErrorKind::BrokenPipe,
        _ => io::ErrorKind::ConnectionReset,
    };
    io::Error::new(kind, err.to_string())
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
mod tests {
    use super::*;
    use crate::mux::{self, Role};
    use crate::tunnel::Tunnel;
    use futures_lite::future;
    use std::collections::VecDeque;
    use std::task::Waker;

    /// One direction of an in-memory transport that takes at most `max_write` bytes per write.
    #[derive(Default)]
    struct Wire {
        bytes: VecDeque<u8>,
        reader: Option<Waker>,
        closed: bool,
    }

    struct End {
        rx: Rc<RefCell<Wire>>,
        tx: Rc<RefCell<Wire>>,
        max_write: usize,
    }

    fn transport() -> (End, End) {
        let (a, b) = (
            Rc::<RefCell<Wire>>::default(),
            Rc::<RefCell<Wire>>::default(),
        );
        let end = |rx: &Rc<RefCell<Wire>>, tx: &Rc<RefCell<Wire>>, max_write| End {
            rx: rx.clone(),
            tx: tx.clone(),
            max_write,
        };
        (end(&a, &b, 7_001), end(&b, &a, 50_000))
    }

    impl AsyncRead for End {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let mut wire = self.rx.borrow_mut();
            if wire.bytes.is_empty() {
                if wire.closed {
                    return Poll::Ready(Ok(0));
                }
                wire.reader = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let n = buf.len().min(wire.bytes.len());
            for (dst, src) in buf.iter_mut().zip(wire.bytes.drain(..n)) {
                *dst = src;
            }
            Poll::Ready(Ok(n))
        }
    }

    impl AsyncWrite for End {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let mut wire = self.tx.borrow_mut();
            let n = buf.len().min(self.max_write);
            wire.bytes.extend(&buf[..n]);
            if let Some(w) = wire.reader.take() {
                w.wake();
            }
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            let mut wire = self.tx.borrow_mut();
            wire.closed = true;
            if let Some(w) = wire.reader.take() {
                w.wake();
            }
            Poll::Ready(Ok(()))
        }
    }

    fn byte_at(offset: usize) -> u8 {
        (offset % 251) as u8 ^ (offset / 4099) as u8
    }

    #[test]
    fn zero_copy_read_and_write_move_every_byte() {
        const TOTAL: usize = 3 * 1024 * 1024 + 12_345;
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .name("stream-zero-copy")
            .spawn(|| async move {
                let (a, b) = transport();
                let (engine, _engine_driver) =
                    Tunnel::spawn(a, Role::Server, mux::Config::default());
                let (agent, _agent_driver) = Tunnel::spawn(b, Role::Client, mux::Config::default());
                let accepted = glommio::spawn_local(async move {
                    let incoming = agent.accept().await.unwrap();
                    (agent, incoming.accept().unwrap())
                });
                let sender = engine.open(b"zero-copy").await.unwrap();
                let (_agent, receiver) = accepted.await;

                let writer = glommio::spawn_local(async move {
                    let mut sent = 0;
                    let mut writes = 0usize;
                    while sent < TOTAL {
                        writes += 1;
                        let max = [100, 16 * 1024, usize::MAX][writes % 3];
                        if writes == 5 {
                            // `fill`'s error comes back as it is, and nothing is sent.
                            let err = future::poll_fn(|cx| {
                                sender.poll_write_with(cx, max, |_, room| {
                                    room.fill(0xee);
                                    Poll::Ready(Err(io::Error::other("source failed")))
                                })
                            })
                            .await
                            .unwrap_err();
                            assert_eq!(err.to_string(), "source failed");
                            continue;
                        }
                        let n = future::poll_fn(|cx| {
                            sender.poll_write_with(cx, max, |_, room| {
                                assert!(!room.is_empty() && room.len() <= max);
                                // Sometimes a short read: half the room.
                                let k = if writes.is_multiple_of(7) {
                                    room.len() / 2
                                } else {
                                    room.len()
                                };
                                let k = k.min(TOTAL - sent);
                                for (i, b) in room[..k].iter_mut().enumerate() {
                                    *b = byte_at(sent + i);
                                }
                                room[k..].fill(0xee);
                                Poll::Ready(Ok(k))
                            })
                        })
                        .await
                        .unwrap();
                        sent += n;
                    }
                    future::poll_fn(|cx| Pin::new(&mut &sender).poll_close(cx))
                        .await
                        .unwrap();
                    sender
                });

                let mut received = 0;
                let mut reads = 0usize;
                loop {
                    reads += 1;
                    let n = future::poll_fn(|cx| {
                        receiver.poll_read_with(cx, |cx, data| {
                            assert!(!data.is_empty());
                            if reads == 3 {
                                // The same tunnel from inside the callback: an error, no panic.
                                let mut buf = [0u8; 4];
                                let inner = Pin::new(&mut &receiver).poll_read(cx, &mut buf);
                                assert!(matches!(inner, Poll::Ready(Err(_))));
                            }
                            let take = data.len().min(1 + reads * 997 % 70_000);
                            for (i, &b) in data[..take].iter().enumerate() {
                                assert_eq!(b, byte_at(received + i), "offset {}", received + i);
                            }
                            Poll::Ready(Ok(take))
                        })
                    })
                    .await
                    .unwrap();
                    if n == 0 {
                        break;
                    }
                    received += n;
                }
                assert_eq!(received, TOTAL);
                let _sender = writer.await;
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn truncation_keeps_char_boundaries() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("héllo", 3), "hé");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }
}
