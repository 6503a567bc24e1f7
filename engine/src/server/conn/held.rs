//! [`Held`]: the client socket under the TLS stream, holding back the TLS 1.3 session ticket
//! that rustls writes right after the handshake until the server's next write, so that both
//! leave in one `sendmsg` (the web route's response, a user route's dial response, a tunnel's
//! hello) instead of two. On loopback every send also runs the peer's receive path and
//! wake-up on the sender's CPU, so a send saved is CPU saved on both ends.
//!
//! Only writes made while the handshake runs ([`Held::new`] until [`Held::release`]) that start
//! with a TLS application-data record (content type 23: the encrypted ticket; the TLS 1.3 flight
//! starts with the ServerHello's handshake record, TLS 1.2's final flight with ChangeCipherSpec)
//! and fit in [`HOLD_MAX`] are held; anything else is written at once, after what is held. The
//! handshake never waits on held bytes: while it runs they go out before a read that has to
//! wait for the peer. After it, what is held is a ticket, which no client waits for: it goes
//! out with the server's next write, on `flush` and on `close`. Every route that terminates TLS
//! writes first after the handshake or closes (a response, a dial response or refusal, the
//! tunnel hello).

use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::io::{AsyncRead, AsyncWrite};

/// Most bytes held back (one session ticket record is about 200).
pub(super) const HOLD_MAX: usize = 4 * 1024;

/// TLS record content type of application data (and of every TLS 1.3 encrypted record).
const APPLICATION_DATA: u8 = 23;

/// See the module doc.
#[derive(Debug)]
pub(crate) struct Held<S> {
    inner: S,
    held: Vec<u8>,
    holding: bool,
    /// The TCP socket `inner` writes to, for [`FinalSend`](crate::server::http::FinalSend).
    socket: Option<RawFd>,
}

impl<S> Held<S> {
    /// Holds post-handshake records written from now until [`Held::release`].
    pub(super) fn new(inner: S) -> Held<S> {
        Held {
            inner,
            held: Vec::new(),
            holding: true,
            socket: None,
        }
    }

    /// `socket` is the descriptor of the TCP socket that `inner` owns and writes to (it must
    /// stay open for as long as `inner` lives).
    pub(super) fn on_socket(mut self, socket: RawFd) -> Held<S> {
        self.socket = Some(socket);
        self
    }

    /// The handshake is over: hold nothing more; what is held goes out with the next write (or
    /// flush, close, or a read that has to wait).
    pub(super) fn release(&mut self) {
        self.holding = false;
    }
}

impl<S: AsyncWrite + Unpin> Held<S> {
    /// Writes `bufs` after whatever is held, in one vectored write where the socket takes it.
    /// `Ready(Ok(n))` counts only `bufs`' bytes; `n` may be 0 only if `bufs` is empty.
    fn write_after_held(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        while !self.held.is_empty() {
            let mut all = Vec::with_capacity(bufs.len() + 1);
            all.push(IoSlice::new(&self.held));
            all.extend(bufs.iter().map(|b| IoSlice::new(b)));
            let n = match Pin::new(&mut self.inner).poll_write_vectored(cx, &all) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            if n < self.held.len() {
                self.held.drain(..n);
                continue;
            }
            let past = n - self.held.len();
            self.held = Vec::new();
            if past > 0 {
                return Poll::Ready(Ok(past));
            }
        }
        if bufs.iter().all(|b| b.is_empty()) {
            // Nothing (more) to write: no system call for it.
            return Poll::Ready(Ok(0));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    /// Sends what is held.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.write_after_held(cx, &[]) {
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The connection's last bytes come next, then its close: `TCP_CORK` on the socket keeps them
/// queued until the `shutdown` of the close, which sends them with the FIN in one segment
/// instead of a segment for the bytes and another for the FIN (on loopback each segment also
/// runs the peer's receive path on this CPU: about 2.5% of a web route handshake's CPU went to
/// the lone FIN). If the connection is dropped without a `shutdown`, `close` sends them with the
/// FIN all the same; the kernel also sends corked bytes after 200 ms at most.
impl<S> crate::server::http::FinalSend for Held<S> {
    fn final_send(&mut self) {
        use std::os::fd::BorrowedFd;
        let Some(socket) = self.socket else {
            return;
        };
        #[allow(unsafe_code)]
        // SAFETY: `socket` is the descriptor of the socket `inner` owns (`Held::on_socket`),
        // open for as long as `self` lives, which outlives this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(socket) };
        // Best effort: without the cork the FIN only goes in a segment of its own.
        let _ = rustix::net::sockopt::set_tcp_cork(fd, true);
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Held<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if read.is_pending() && this.holding && !this.held.is_empty() {
            // About to wait for the peer during the handshake: it must have everything first.
            if let Poll::Ready(Err(e)) = this.poll_send_held(cx) {
                return Poll::Ready(Err(e));
            }
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Held<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        let first = bufs.iter().find(|b| !b.is_empty()).and_then(|b| b.first());
        if this.holding && first == Some(&APPLICATION_DATA) && this.held.len() + len <= HOLD_MAX {
            for buf in bufs {
                this.held.extend_from_slice(buf);
            }
            return Poll::Ready(Ok(len));
        }
        this.write_after_held(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // The handshake's own flush leaves the ticket held: that is the point.
        if !this.holding {
            std::task::ready!(this.poll_send_held(cx))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// A socket that records each write as one send, takes at most `room` bytes per write, and
    /// has `input` to read (then would block).
    #[derive(Default)]
    struct Socket {
        sends: Rc<RefCell<Vec<Vec<u8>>>>,
        room: Option<usize>,
        input: Vec<u8>,
    }

    impl AsyncRead for Socket {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if this.input.is_empty() {
                return Poll::Pending;
            }
            let n = buf.len().min(this.input.len());
            buf[..n].copy_from_slice(&this.input[..n]);
            this.input.drain(..n);
            Poll::Ready(Ok(n))
        }
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            if let Some(room) = self.room {
                all.truncate(room);
            }
            let n = all.len();
            self.sends.borrow_mut().push(all);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn cx() -> Context<'static> {
        Context::from_waker(std::task::Waker::noop())
    }

    fn write(held: &mut Held<Socket>, bytes: &[u8]) -> usize {
        match Pin::new(held).poll_write(&mut cx(), bytes) {
            Poll::Ready(Ok(n)) => n,
            other => unreachable!("write: {other:?}"),
        }
    }

    #[test]
    fn a_ticket_leaves_with_the_next_write() {
        let socket = Socket::default();
        let sends = Rc::clone(&socket.sends);
        let mut held = Held::new(socket);
        // The flight (a handshake record) goes at once; the ticket (application data) waits,
        // also through the handshake's flush.
        assert_eq!(write(&mut held, &[22, 3, 3, 0, 1, 9]), 6);
        assert_eq!(write(&mut held, &[23, 3, 3, 0, 1, 7]), 6);
        assert!(Pin::new(&mut held).poll_flush(&mut cx()).is_ready());
        assert_eq!(sends.borrow().len(), 1);
        held.release();
        assert_eq!(write(&mut held, &[23, 3, 3, 0, 1, 8]), 6);
        assert_eq!(
            *sends.borrow(),
            [
                vec![22, 3, 3, 0, 1, 9],
                vec![23, 3, 3, 0, 1, 7, 23, 3, 3, 0, 1, 8]
            ]
        );
    }

    #[test]
    fn held_bytes_go_out_before_waiting_to_read_and_on_flush_and_close() {
        let socket = Socket::default();
        let sends = Rc::clone(&socket.sends);
        let mut held = Held::new(socket);
        write(&mut held, &[23, 1]);
        // Nothing to read during the handshake: the peer gets what is held before we wait.
        let mut buf = [0u8; 4];
        assert!(Pin::new(&mut held)
            .poll_read(&mut cx(), &mut buf)
            .is_pending());
        assert_eq!(*sends.borrow(), [vec![23, 1]]);

        // After it, a ticket waits for the next write or flush, also while we read.
        write(&mut held, &[23, 2]);
        held.release();
        assert!(Pin::new(&mut held)
            .poll_read(&mut cx(), &mut buf)
            .is_pending());
        assert_eq!(sends.borrow().len(), 1);
        assert!(Pin::new(&mut held).poll_flush(&mut cx()).is_ready());
        assert_eq!(*sends.borrow(), [vec![23, 1], vec![23, 2]]);

        let socket = Socket::default();
        let sends = Rc::clone(&socket.sends);
        let mut held = Held::new(socket);
        write(&mut held, &[23, 3]);
        assert!(Pin::new(&mut held).poll_close(&mut cx()).is_ready());
        assert_eq!(*sends.borrow(), [vec![23, 3]]);
        // Nothing held: a flush or close sends nothing.
        held.release();
        assert!(Pin::new(&mut held).poll_flush(&mut cx()).is_ready());
        assert!(Pin::new(&mut held).poll_close(&mut cx()).is_ready());
        assert_eq!(sends.borrow().len(), 1);
    }

    #[test]
    fn short_writes_keep_the_order() {
        let socket = Socket {
            room: Some(3),
            ..Socket::default()
        };
        let sends = Rc::clone(&socket.sends);
        let mut held = Held::new(socket);
        write(&mut held, &[23, 1, 2, 3, 4]);
        held.release();
        let mut out = 0;
        while out < 4 {
            out += write(&mut held, &[9, 8, 7, 6][out..]);
        }
        let all: Vec<u8> = sends.borrow().iter().flatten().copied().collect();
        assert_eq!(all, [23, 1, 2, 3, 4, 9, 8, 7, 6]);
        assert!(sends.borrow().iter().all(|s| s.len() <= 3));
    }

    #[test]
    fn other_records_and_large_writes_are_not_held() {
        let socket = Socket::default();
        let sends = Rc::clone(&socket.sends);
        let mut held = Held::new(socket);
        // TLS 1.2's final flight starts with ChangeCipherSpec.
        write(&mut held, &[20, 3, 3, 0, 1, 1]);
        let big = vec![23u8; HOLD_MAX + 1];
        write(&mut held, &big);
        assert_eq!(sends.borrow().len(), 2);
    }
}
