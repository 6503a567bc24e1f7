//! [`TunnelDriver`]: the one task per tunnel that owns the transport. It reads straight into the
//! buffer the mux core hands out ([`crate::mux::Conn::input_buf`]: inside a large DATA payload,
//! the stream's own receive buffer), writes the core's queued frames straight from its queue
//! ([`crate::mux::Conn::transmit_buf`], one write per batch), and keeps the core's timer; see
//! the module docs of [`super`] for why this is one task with a hand-written poll rather than
//! two. So between the TLS plaintext and the core no byte is copied by the driver.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::timer::Timer;

use super::error::CloseReason;
use super::shared::Shared;
use crate::mux::ErrorCode;

/// Bytes read from the transport per round (in as many `poll_read`s as the core's input
/// buffers take; a TLS stream hands over at most a record, 16 KiB, of plaintext per read
/// anyway). Also the size of the buffer that discards input once the tunnel has closed.
pub const READ_BUF_BYTES: usize = 64 * 1024;

/// Rounds of read/write/timer work per poll before the driver yields to the other tasks of its
/// executor: 16 × 64 KiB of input at most, so user streams get to run between batches.
pub const DRIVER_ROUNDS_PER_POLL: usize = 16;

/// Once the tunnel has closed: how long flushing the last frames (GOAWAY), sending the TLS
/// close_notify and waiting for the peer's EOF may take before the socket is dropped anyway.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The future that runs one tunnel; resolves to why it ended. Made by [`super::Tunnel::new`];
/// [`super::Tunnel::spawn`] spawns it. Dropping it ends the tunnel
/// ([`CloseReason::DriverStopped`]) and closes the transport.
pub struct TunnelDriver<S> {
    io: S,
    shared: Rc<RefCell<Shared>>,
    /// Where input goes once the core has closed (allocated then).
    discard: Vec<u8>,
    /// The EOF or error that ended a round of reads after some data: the next read's result.
    stashed: Option<ReadStep>,
    /// Bytes went into the transport since its last successful flush.
    unflushed: bool,
    /// The armed timer and the deadline it was armed for.
    timer: Option<(Instant, Timer)>,
    phase: Phase,
    /// The transport gave a clean EOF: nothing more to read.
    eof: bool,
}

/// Where the driver is in the transport's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The core is open: read, write, keep the timer.
    Running,
    /// The core closed: write out what it still queued (its GOAWAY), reading and discarding
    /// meanwhile so the peer is never blocked on us.
    Flushing { deadline: Instant },
    /// Send close_notify and shut down our write half.
    Closing { deadline: Instant },
    /// Wait for the peer's EOF, so closing our socket does not reset data still in flight.
    Lingering { deadline: Instant },
}

/// What one round of work achieved.
enum Step {
    Progress,
    Idle,
    Done,
}

/// What a read from the transport gave.
enum ReadStep {
    Data,
    Eof,
    Failed(io::Error),
    Pending,
}

impl<S> TunnelDriver<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    pub(crate) fn new(io: S, shared: Rc<RefCell<Shared>>) -> TunnelDriver<S> {
        TunnelDriver {
            io,
            shared,
            discard: Vec::new(),
            stashed: None,
            unflushed: false,
            timer: None,
            phase: Phase::Running,
            eof: false,
        }
    }

    fn round(&mut self, cx: &mut Context<'_>) -> Step {
        match self.phase {
            Phase::Running => self.running(cx),
            Phase::Flushing { deadline } => {
                let mut progress = match self.read_discard(cx) {
                    ReadStep::Data => true,
                    ReadStep::Eof => {
                        self.eof = true;
                        true
                    }
                    ReadStep::Failed(_) => return Step::Done,
                    ReadStep::Pending => false,
                };
                match self.write(cx) {
                    Ok(wrote) => progress |= wrote,
                    Err(_) => return Step::Done,
                }
                let written = !self.shared.borrow().conn.has_pending_transmit();
                if self.eof || (written && !self.unflushed) {
                    self.phase = Phase::Closing { deadline };
                    return Step::Progress;
                }
                self.step_or_deadline(cx, progress, deadline)
            }
            Phase::Closing { deadline } => match Pin::new(&mut self.io).poll_close(cx) {
                Poll::Ready(_) if self.eof => Step::Done,
                Poll::Ready(Ok(())) => {
                    self.phase = Phase::Lingering { deadline };
                    Step::Progress
                }
                Poll::Ready(Err(_)) => Step::Done,
                Poll::Pending => self.step_or_deadline(cx, false, deadline),
            },
            Phase::Lingering { deadline } => match self.read_discard(cx) {
                ReadStep::Data => Step::Progress,
                ReadStep::Eof | ReadStep::Failed(_) => Step::Done,
                ReadStep::Pending => self.step_or_deadline(cx, false, deadline),
            },
        }
    }

    fn running(&mut self, cx: &mut Context<'_>) -> Step {
        let mut progress = false;
        if !self.eof {
            match self.read_input(cx) {
                ReadStep::Data => progress = true,
                ReadStep::Eof => {
                    self.on_clean_eof();
                    progress = true;
                }
                ReadStep::Failed(err) => return self.fail(CloseReason::io(&err)),
                ReadStep::Pending => {}
            }
        }
        if self.shared.borrow().conn.is_closed() {
            self.phase = Phase::Flushing {
                deadline: Instant::now() + CLOSE_TIMEOUT,
            };
            return Step::Progress;
        }
        match self.write(cx) {
            Ok(wrote) => progress |= wrote,
            Err(err) => return self.fail(CloseReason::io(&err)),
        }
        progress |= self.poll_core_timer(cx);
        if self.shared.borrow().conn.is_closed() {
            self.phase = Phase::Flushing {
                deadline: Instant::now() + CLOSE_TIMEOUT,
            };
            return Step::Progress;
        }
        if progress {
            Step::Progress
        } else {
            // Going to sleep: an idle tunnel holds no input or small transmit buffer.
            self.shared.borrow_mut().conn.release_idle_buffers();
            Step::Idle
        }
    }

    /// The peer shut down its sending side cleanly. Nothing more will arrive; streams keep what
    /// they buffered, and the core drains: it closes once every stream handle is done with it.
    fn on_clean_eof(&mut self) {
        self.eof = true;
        let mut sh = self.shared.borrow_mut();
        sh.read_closed = true;
        if !sh.going_away {
            sh.eof_without_goaway = true;
        }
        sh.going_away = true;
        if let Err(crate::mux::MuxError::ControlQueueFull) = sh.conn.go_away() {
            sh.deferred.push_back(super::shared::Deferred::GoAway);
        }
        sh.after_op();
        sh.wake_everything();
    }

    /// The transport failed: the tunnel ends now, and every handle learns it.
    fn fail(&mut self, reason: CloseReason) -> Step {
        let mut sh = self.shared.borrow_mut();
        tracing::debug!(%reason, "tunnel transport failed");
        sh.set_end(reason);
        // Drop the core's streams and queues; the GOAWAY it queues is never written.
        sh.conn.close(ErrorCode::INTERNAL, "transport failed");
        sh.after_op();
        Step::Done
    }

    /// Reads from the transport straight into the core's input buffers, for up to
    /// [`READ_BUF_BYTES`] (or until the transport has no more, or the core closes), and feeds
    /// each read to the core. `Data` when bytes arrived, even if the transport then failed or
    /// reached EOF (that is kept for the next call).
    fn read_input(&mut self, cx: &mut Context<'_>) -> ReadStep {
        if let Some(step) = self.stashed.take() {
            return step;
        }
        let mut total = 0;
        while total < READ_BUF_BYTES {
            let mut guard = self.shared.borrow_mut();
            let sh = &mut *guard;
            if sh.conn.is_closed() {
                break;
            }
            // The transport touches nothing of the tunnel's shared state, so the borrow may
            // span the read; the buffer stays valid until `input_commit`.
            let read = Pin::new(&mut self.io).poll_read(cx, sh.conn.input_buf());
            let n = match read {
                Poll::Ready(Ok(0)) if total == 0 => return ReadStep::Eof,
                Poll::Ready(Ok(n)) if n > 0 => n,
                Poll::Ready(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {
                    cx.waker().wake_by_ref();
                    if total == 0 {
                        return ReadStep::Pending;
                    }
                    break;
                }
                Poll::Ready(Err(err)) if total == 0 => return ReadStep::Failed(err),
                Poll::Pending if total == 0 => return ReadStep::Pending,
                // After some data: the data first, then (next call) the EOF or the error.
                Poll::Ready(Ok(_)) => {
                    self.stashed = Some(ReadStep::Eof);
                    break;
                }
                Poll::Ready(Err(err)) => {
                    self.stashed = Some(ReadStep::Failed(err));
                    break;
                }
                Poll::Pending => break,
            };
            // A protocol error closes the core, which emits `Closed`: handled by the caller.
            let _ = sh.conn.input_commit(n, Instant::now());
            sh.after_op();
            total += n;
        }
        ReadStep::Data
    }

    /// Reads and drops input (once the core has closed).
    fn read_discard(&mut self, cx: &mut Context<'_>) -> ReadStep {
        if self.eof {
            return ReadStep::Pending;
        }
        if let Some(step) = self.stashed.take() {
            return step;
        }
        if self.discard.is_empty() {
            self.discard = vec![0u8; READ_BUF_BYTES];
        }
        match Pin::new(&mut self.io).poll_read(cx, &mut self.discard) {
            Poll::Ready(Ok(0)) => ReadStep::Eof,
            Poll::Ready(Ok(_)) => ReadStep::Data,
            Poll::Ready(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {
                cx.waker().wake_by_ref();
                ReadStep::Pending
            }
            Poll::Ready(Err(err)) => ReadStep::Failed(err),
            Poll::Pending => ReadStep::Pending,
        }
    }

    /// Writes the core's queued frames straight from its queue, batch after batch, until the
    /// transport takes no more or nothing is left, then flushes. `Ok(true)` when bytes moved.
    fn write(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        if self.eof {
            // A clean EOF comes only from a peer whose core has closed: it reads nothing we
            // could still send, and may drop its socket any moment, making our writes fail
            // (which must not cost local streams the data they have yet to read).
            return Ok(false);
        }
        let mut progress = false;
        loop {
            let mut guard = self.shared.borrow_mut();
            let sh = &mut *guard;
            let wrote = {
                let batch = sh.conn.transmit_buf();
                if batch.is_empty() {
                    None
                } else {
                    Some(Pin::new(&mut self.io).poll_write(cx, batch))
                }
            };
            // A new batch took the control queue with it: retry what found it full.
            sh.run_deferred();
            let wrote = match wrote {
                None => {
                    sh.after_op();
                    break;
                }
                Some(wrote) => wrote,
            };
            match wrote {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    sh.conn.transmit_advance(n);
                    self.unflushed = true;
                    progress = true;
                }
                Poll::Ready(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(err)) => return Err(err),
                Poll::Pending => {
                    sh.after_op();
                    return Ok(progress);
                }
            }
            sh.after_op();
        }
        if self.unflushed {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(err)) => return Err(err),
                Poll::Pending => {}
            }
        }
        Ok(progress)
    }

    /// Keeps a glommio timer armed for the core's next deadline and runs `handle_timeout` when
    /// it fires. The deadline moves later with every byte received, so the timer is re-armed
    /// only when the deadline moves earlier or the timer fires (early fires are harmless:
    /// `handle_timeout` does nothing before the deadline).
    fn poll_core_timer(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = self.shared.borrow().conn.poll_timeout();
        let Some(deadline) = deadline else {
            self.timer = None;
            return false;
        };
        if self
            .timer
            .as_ref()
            .is_none_or(|(armed, _)| deadline < *armed)
        {
            self.arm(deadline);
        }
        if !self.timer_fired(cx) {
            return false;
        }
        let mut sh = self.shared.borrow_mut();
        sh.conn.handle_timeout(Instant::now());
        sh.after_op();
        true
    }

    fn arm(&mut self, deadline: Instant) {
        let wait = deadline.saturating_duration_since(Instant::now());
        self.timer = Some((deadline, Timer::new(wait)));
    }

    fn timer_fired(&mut self, cx: &mut Context<'_>) -> bool {
        let fired = match &mut self.timer {
            Some((_, timer)) => Pin::new(timer).poll(cx).is_ready(),
            None => false,
        };
        if fired {
            self.timer = None;
        }
        fired
    }

    /// In the closing phases: `Done` once `deadline` passes, else progress or idle.
    fn step_or_deadline(
        &mut self,
        cx: &mut Context<'_>,
        progress: bool,
        deadline: Instant,
    ) -> Step {
        if progress {
            return Step::Progress;
        }
        if self
            .timer
            .as_ref()
            .is_none_or(|(armed, _)| *armed != deadline)
        {
            self.arm(deadline);
        }
        if self.timer_fired(cx) || Instant::now() >= deadline {
            Step::Done
        } else {
            Step::Idle
        }
    }

    fn finish(&mut self) -> CloseReason {
        let mut sh = self.shared.borrow_mut();
        if sh.end.is_none() {
            // Only a closed core leaves `running`, and its `Closed` event set `end`.
            sh.set_end(CloseReason::DriverStopped);
        }
        let reason = sh.end.clone().unwrap_or(CloseReason::DriverStopped);
        tracing::debug!(%reason, "tunnel ended");
        reason
    }
}

impl<S> Future for TunnelDriver<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Output = CloseReason;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CloseReason> {
        let this = self.get_mut();
        {
            let mut sh = this.shared.borrow_mut();
            sh.set_driver_waker(cx.waker());
            sh.driver_active = true;
        }
        let mut outcome = None;
        for _ in 0..DRIVER_ROUNDS_PER_POLL {
            match this.round(cx) {
                Step::Progress => continue,
                Step::Idle => {
                    outcome = Some(Poll::Pending);
                    break;
                }
                Step::Done => {
                    outcome = Some(Poll::Ready(this.finish()));
                    break;
                }
            }
        }
        this.shared.borrow_mut().driver_active = false;
        outcome.unwrap_or_else(|| {
            // Out of rounds with work left: let the executor's other tasks run, then resume.
            cx.waker().wake_by_ref();
            Poll::Pending
        })
    }
}

impl<S> Drop for TunnelDriver<S> {
    fn drop(&mut self) {
        let Ok(mut sh) = self.shared.try_borrow_mut() else {
            return;
        };
        sh.driver_active = false;
        if sh.end.is_none() {
            sh.set_end(CloseReason::DriverStopped);
            sh.conn.close(ErrorCode::INTERNAL, "tunnel driver stopped");
            sh.after_op();
        }
    }
}
