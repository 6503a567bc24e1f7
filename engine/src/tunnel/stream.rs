//! [`MuxStream`], one stream of a tunnel as `AsyncRead + AsyncWrite`, and [`Incoming`], a
//! stream the peer opened that awaits our answer.
//!
//! Both are thin: every call borrows the tunnel's [`Shared`] state, calls the mux core, dispatches
//! its events and parks a waker in the stream's [`super::shared::Slot`] when it must wait.

use std::cell::RefCell;
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
        let mut sh = self.shared.borrow_mut();
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

    fn do_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut sh = self.shared.borrow_mut();
        let sh = &mut *sh;
        let Some(slot) = sh.slots.get_mut(&self.id) else {
            return Poll::Ready(Err(gone()));
        };
        if let Some(code) = slot.reset {
            return Poll::Ready(Err(reset_error(code)));
        }
        if slot.fin_received || buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if let Some(end) = &sh.end {
            return Poll::Ready(Err(ended_error(end)));
        }
        match sh.conn.recv(self.id, buf) {
            Ok(0) if sh.read_closed => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "tunnel transport closed before the stream's FIN",
            ))),
            Ok(0) => {
                register(&mut slot.read_waker, cx.waker());
                Poll::Pending
            }
            Ok(n) => {
                sh.after_op();
                Poll::Ready(Ok(n))
            }
            Err(err) => Poll::Ready(Err(mux_error(&err))),
        }
    }

    fn do_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut sh = self.shared.borrow_mut();
        let sh = &mut *sh;
        let Some(slot) = sh.slots.get_mut(&self.id) else {
            return Poll::Ready(Err(gone()));
        };
        if let Some(code) = slot.reset {
            return Poll::Ready(Err(reset_error(code)));
        }
        if slot.send_finished {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after the stream was closed for writing",
            )));
        }
        if let Some(end) = &sh.end {
            return Poll::Ready(Err(ended_error(end)));
        }
        if sh.read_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "tunnel transport closed by the peer",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if slot.accept_pending {
            register(&mut slot.write_waker, cx.waker());
            return Poll::Pending;
        }
        match sh.conn.send(self.id, buf) {
            Ok(0) => {
                register(&mut slot.write_waker, cx.waker());
                Poll::Pending
            }
            Ok(n) => {
                sh.after_op();
                Poll::Ready(Ok(n))
            }
            Err(err) => Poll::Ready(Err(mux_error(&err))),
        }
    }

    fn do_close(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut sh = self.shared.borrow_mut();
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
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_char_boundaries() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("héllo", 3), "hé");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }
}
