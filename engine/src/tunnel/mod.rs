//! The tunnel's glommio shell: one agent↔engine TLS connection carrying many user streams,
//! driven by the sans-IO core in [`crate::mux`]. The engine opens a stream per user session
//! ([`Tunnel::open`]), the agent accepts it ([`Tunnel::accept`]), and both sides splice user
//! bytes into it ([`splice`]). What lives here: the driver task, the stream handles and
//! `splice`. What does not: framing, flow control and timers (all in `mux`), TLS set-up, and
//! which tunnel serves which target (routing).
//!
//! # Shape
//!
//! Everything of one tunnel lives on one glommio executor: the [`Conn`] sits in an
//! `Rc<RefCell<Shared>>` owned jointly by the driver and the handles ([`Tunnel`] clones,
//! [`MuxStream`], [`Incoming`]). A handle calls the core directly (`send_buf`/`send_commit`,
//! `read_buf`/`consume`, `finish`, `open_stream`, ...), dispatches the core's events to
//! per-stream wakers, and wakes the driver when the core has frames to write. No `Mutex`, no
//! atomics, no channel per stream.
//!
//! # Where the bytes go
//!
//! No layer of the shell holds a copy of stream data. User bytes towards the agent: [`splice`]
//! has the user's TLS stream read straight into room inside the core's send queue
//! ([`MuxStream::poll_write_with`]); the driver writes the queue's batches straight from it.
//! From the agent: the driver reads the TLS plaintext straight into the core's input buffer
//! (inside a large DATA frame, the stream's own receive buffer); `splice` writes the user's TLS
//! stream straight from there ([`MuxStream::poll_read_with`]). So the only copies are rustls's,
//! in and out of its record buffers. `poll_read`/`poll_write` (one more copy, through the
//! caller's buffer) remain for everything else.
//!
//! # The driver: one task, a hand-written poll
//!
//! [`TunnelDriver`] owns the transport and, in each poll, does rounds of: read straight into the
//! core's `input_buf` (inside a large DATA frame that is the stream's own receive buffer) and
//! `input_commit`, up to [`READ_BUF_BYTES`] per round; write straight from the core's
//! `transmit_buf` and `transmit_advance` by what was written (a batch holds every frame queued
//! since the last one, so many small frames share one TLS write and one syscall, and a frame is
//! never cut), then flush; keep a glommio timer armed for `poll_timeout`. It loops while a round made progress, for at most
//! [`DRIVER_ROUNDS_PER_POLL`] rounds, then yields.
//!
//! Read and write are polled independently in every round, so a pending write never blocks
//! reading: a peer that stops reading still has its frames processed (its WINDOW_UPDATEs,
//! RESETs and pongs keep arriving), and only the streams that need our output to move stall.
//! Doing this in one task rather than splitting the transport into halves for two tasks avoids
//! `futures_lite::io::split` (an `Arc<Mutex>` around the TLS stream) and a second task sharing
//! the core; `futures-rustls` and glommio's `TcpStream` keep separate wakers for read and
//! write readiness, so polling both from one task loses no wake-up.
//!
//! # Bounds
//!
//! The core exposes no "buffers full" signal, and needs none: its flow control bounds what the
//! peer can make us hold, so the driver reads whenever the transport has bytes (it must, to see
//! credit coming back). Memory per tunnel is then: no read buffer or outgoing batch of its
//! own; the received bytes in the core, at most [`crate::mux::CONN_WINDOW`] (16 MiB) across
//! streams and a stream's window ([`crate::mux::INITIAL_STREAM_WINDOW`], grown up to
//! [`crate::mux::MAX_STREAM_WINDOW`] while its reader keeps up) per stream; the send side, at most
//! [`crate::mux::MAX_SEND_QUEUE_BYTES`] of DATA in the core's double-buffered send queue (the
//! batch being written is one of its two buffers, not a copy) plus
//! [`crate::mux::MAX_QUEUED_CONTROL_FRAMES`] control frames; and rustls's own buffer. A writer
//! is `Pending` once its stream's credit or the send queue is exhausted, so nothing above the
//! core grows either, and a [`splice`] into a tunnel stream holds no buffer of its own (it
//! reads the user's socket only when the stream has room). [`Incoming`] streams waiting for
//! `accept` count against [`crate::mux::MAX_STREAMS`].
//!
//! # Ending
//!
//! A tunnel ends when the core closes (drained after a GOAWAY either way, protocol error,
//! peer GOAWAY with an error, dead-peer timeout, [`Tunnel::close`]) or the transport fails.
//! After a core close the driver flushes the last frames, sends close_notify and waits (at most
//! [`CLOSE_TIMEOUT`] for all of it) for the peer's EOF, so no RST discards the GOAWAY. A clean
//! EOF from the peer does not end the tunnel at once: a drained peer closes as soon as its side
//! is done, possibly before we read its last bytes, so the core drains instead and streams keep
//! their buffered data; a read that needs more than that fails. An unclean EOF or an I/O error
//! ends it at once. Every waiting handle is woken with the reason, and the driver resolves to it
//! ([`CloseReason`]). Dropping the last [`Tunnel`] handle starts a drain (GOAWAY): streams
//! already open finish, no new ones start.

mod driver;
mod error;
pub mod policy_push;
mod read_ahead;
mod shared;
mod splice;
mod stream;

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_lite::{future, AsyncRead, AsyncWrite};

pub use driver::{TunnelDriver, CLOSE_TIMEOUT, DRIVER_ROUNDS_PER_POLL, READ_BUF_BYTES};
pub use error::{AcceptError, CloseReason, OpenError};
pub use read_ahead::{ReadAhead, READ_AHEAD_BYTES};
pub use splice::{splice, splice_lending, Lend, Side, SpliceError, Spliced, SPLICE_BUF_BYTES};
pub use stream::{Incoming, MuxStream};

/// rustls' limit on the TLS records it queues for a connection (its default: 64 KiB) on the
/// data path: tunnels (both ends) and the engine's user sessions. A write of bulk data then
/// goes out as up to 16 records in one `sendmsg` instead of 4, so a transfer takes a quarter of
/// the sends and of the peer's wake-ups. Memory: the records wait here only while the socket
/// takes no more (a slow peer), at most this much per connection.
pub const TLS_BUFFER_LIMIT: usize = 256 * 1024;

/// rustls' limit on the TLS records it queues for a tunnel (both ends): one whole transmit
/// batch of the mux ([`crate::mux::MAX_SEND_QUEUE_BYTES`] of DATA plus its frame headers and
/// the control frames sent with it). The driver hands rustls one batch per write; under a
/// smaller limit a batch just over it (a stream window of 256 KiB plus a few 12-byte frame
/// headers, the usual batch of a bulk transfer) went out as two `sendmsg`s, the second one a
/// record of a few dozen bytes, with a wake-up of the peer for each. Memory: records wait here
/// only while the socket takes no more, at most one batch per tunnel.
pub const TUNNEL_TLS_BUFFER_LIMIT: usize = crate::mux::MAX_SEND_QUEUE_BYTES + 128 * 1024;

use crate::mux::{self, Conn, MuxError, Role};
use shared::{Deferred, Shared, Slot};

/// A handle to one tunnel; clones share it. Dropping the last clone drains the tunnel.
#[derive(Clone)]
pub struct Tunnel {
    inner: Rc<Handle>,
}

/// Owned by the `Tunnel` clones only (streams hold `Shared` directly), so its drop marks the
/// moment nobody can open or accept any more.
struct Handle {
    shared: Rc<RefCell<Shared>>,
    role: Role,
}

impl Tunnel {
    /// Wraps a connected transport (normally a TLS stream) and returns the handle and the driver
    /// future, to spawn on the current executor (in the task queue of the caller's choice).
    pub fn new<S>(io: S, role: Role, config: mux::Config) -> (Tunnel, TunnelDriver<S>)
    where
        S: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        let conn = Conn::new(role, config, Instant::now());
        let shared = Rc::new(RefCell::new(Shared::new(conn)));
        let driver = TunnelDriver::new(io, shared.clone());
        (
            Tunnel {
                inner: Rc::new(Handle { shared, role }),
            },
            driver,
        )
    }

    /// [`Tunnel::new`], with the driver spawned on the current glommio executor. The join
    /// handle resolves to why the tunnel ended (`None` only if the task was cancelled).
    pub fn spawn<S>(
        io: S,
        role: Role,
        config: mux::Config,
    ) -> (Tunnel, glommio::task::JoinHandle<CloseReason>)
    where
        S: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        let (tunnel, driver) = Tunnel::new(io, role, config);
        (tunnel, glommio::spawn_local(driver).detach())
    }

    /// Which end of the tunnel this is.
    pub fn role(&self) -> Role {
        self.inner.role
    }

    /// Opens a stream carrying `dial_header` (≤ [`mux::MAX_DIAL_HEADER_LEN`] bytes) and waits
    /// for the peer's answer. Dropping the future before it resolves resets the stream.
    pub async fn open(&self, dial_header: &[u8]) -> Result<MuxStream, OpenError> {
        open(&self.inner.shared, dial_header).await
    }

    /// The next stream the peer opened; `None` once the tunnel is going away or gone (streams
    /// queued before that are still handed out first).
    pub async fn accept(&self) -> Option<Incoming> {
        let shared = &self.inner.shared;
        future::poll_fn(|cx| {
            let mut sh = shared.borrow_mut();
            // Streams the opener reset while queued were dropped from the queue then.
            if let Some((id, header)) = sh.incoming.pop_front() {
                if let Some(slot) = sh.slots.get_mut(&id) {
                    slot.queued = false;
                }
                return Poll::Ready(Some(Incoming::new(shared.clone(), id, header)));
            }
            if sh.end.is_some() || sh.going_away {
                return Poll::Ready(None);
            }
            sh.wait_accept(cx.waker());
            Poll::Pending
        })
        .await
    }

    /// Starts a graceful drain: GOAWAY, no new streams either way; the tunnel ends
    /// ([`mux::CloseReason::Drained`]) once the open streams are done.
    pub fn go_away(&self) {
        self.inner.go_away();
    }

    /// Aborts the tunnel now: every stream fails, the peer gets a GOAWAY with
    /// [`mux::ErrorCode::CANCEL`], then the transport closes.
    pub fn close(&self) {
        let mut sh = self.inner.shared.borrow_mut();
        sh.conn
            .close(mux::ErrorCode::CANCEL, "closed by the application");
        sh.after_op();
        sh.wake_driver();
    }

    /// Whether the tunnel has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.borrow().end.is_some()
    }

    /// Why the tunnel ended, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.inner.shared.borrow().end.clone()
    }

    /// Waits until the tunnel has ended and returns why.
    pub async fn closed(&self) -> CloseReason {
        let shared = &self.inner.shared;
        future::poll_fn(|cx| {
            let mut sh = shared.borrow_mut();
            match &sh.end {
                Some(end) => Poll::Ready(end.clone()),
                None => {
                    sh.wait_end(cx.waker());
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Live streams, both directions, including peer opens not yet answered.
    pub fn stream_count(&self) -> usize {
        self.inner.shared.borrow().conn.stream_count()
    }

    /// Sends a PING and waits for a pong: a round-trip time through both drivers and the peer's
    /// core. If a keepalive PING is already in flight its pong answers this call too.
    pub async fn ping(&self) -> Result<Duration, CloseReason> {
        let shared = &self.inner.shared;
        let target = {
            let mut sh = shared.borrow_mut();
            if let Some(end) = &sh.end {
                return Err(end.clone());
            }
            if let Err(MuxError::Closed(reason)) = sh.conn.ping(Instant::now()) {
                return Err(CloseReason::Mux(reason));
            }
            sh.after_op();
            sh.pongs + 1
        };
        future::poll_fn(|cx| {
            let mut sh = shared.borrow_mut();
            if sh.pongs >= target {
                if let Some(rtt) = sh.last_rtt {
                    return Poll::Ready(Ok(rtt));
                }
            }
            if let Some(end) = &sh.end {
                return Poll::Ready(Err(end.clone()));
            }
            sh.wait_pong(cx.waker());
            Poll::Pending
        })
        .await
    }
}

/// A handle that opens streams on a tunnel without keeping it open ([`Incoming::opener`]):
/// holding one does not delay a drain, and once the tunnel goes away opens fail.
#[derive(Clone)]
pub struct Opener {
    shared: Rc<RefCell<Shared>>,
}

impl Opener {
    pub(crate) fn new(shared: Rc<RefCell<Shared>>) -> Opener {
        Opener { shared }
    }

    /// As [`Tunnel::open`].
    pub async fn open(&self, dial_header: &[u8]) -> Result<MuxStream, OpenError> {
        open(&self.shared, dial_header).await
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener").finish_non_exhaustive()
    }
}

async fn open(shared: &Rc<RefCell<Shared>>, dial_header: &[u8]) -> Result<MuxStream, OpenError> {
    let id = future::poll_fn(|cx| {
        let mut sh = shared.borrow_mut();
        if let Some(end) = &sh.end {
            return Poll::Ready(Err(OpenError::Closed(end.clone())));
        }
        match sh.conn.open_stream(dial_header) {
            Ok(id) => {
                sh.slots.insert(id, Slot::default());
                sh.after_op();
                Poll::Ready(Ok(id))
            }
            Err(MuxError::ControlQueueFull) => {
                sh.wait_control(cx.waker());
                sh.wake_driver();
                Poll::Pending
            }
            Err(MuxError::GoingAway) => Poll::Ready(Err(OpenError::GoingAway)),
            Err(MuxError::TooManyStreams) => Poll::Ready(Err(OpenError::TooManyStreams)),
            Err(MuxError::Closed(reason)) => {
                Poll::Ready(Err(OpenError::Closed(CloseReason::Mux(reason))))
            }
            Err(err) => Poll::Ready(Err(OpenError::Local(err))),
        }
    })
    .await?;
    // From here on, dropping `stream` (an error below, or the caller giving up) resets it.
    let stream = MuxStream::new(shared.clone(), id);
    future::poll_fn(|cx| {
        let mut sh = shared.borrow_mut();
        let sh = &mut *sh;
        let Some(slot) = sh.slots.get_mut(&id) else {
            return Poll::Ready(Err(OpenError::Reset {
                code: mux::ErrorCode::CANCEL,
            }));
        };
        match (&slot.open_result, slot.reset, &sh.end) {
            (Some(Ok(())), _, _) => Poll::Ready(Ok(())),
            (Some(Err(message)), _, _) => Poll::Ready(Err(OpenError::Refused {
                message: message.clone(),
            })),
            (None, Some(code), _) => Poll::Ready(Err(OpenError::Reset { code })),
            (None, None, Some(end)) => Poll::Ready(Err(OpenError::Closed(end.clone()))),
            (None, None, None) => {
                shared::register(&mut slot.open_waker, cx.waker());
                Poll::Pending
            }
        }
    })
    .await?;
    Ok(stream)
}

impl Handle {
    fn go_away(&self) {
        let mut sh = self.shared.borrow_mut();
        match sh.conn.go_away() {
            Ok(()) => sh.going_away = true,
            Err(MuxError::ControlQueueFull) => {
                sh.going_away = true;
                sh.deferred.push_back(Deferred::GoAway);
            }
            Err(_) => {}
        }
        sh.after_op();
        sh.wake_driver();
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if self.shared.try_borrow_mut().is_ok() {
            self.go_away();
        }
    }
}

impl fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sh = self.inner.shared.borrow();
        f.debug_struct("Tunnel")
            .field("role", &self.inner.role)
            .field("streams", &sh.conn.stream_count())
            .field("end", &sh.end)
            .finish()
    }
}
