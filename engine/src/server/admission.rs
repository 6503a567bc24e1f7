//! Handshake admission: a shard accepts a new connection only while fewer than
//! [`EngineConfig::max_handshakes_per_shard`](crate::server::EngineConfig) of its connections
//! are between accept and an established TLS session (or another route). Beyond that the accept
//! loop waits, and new connections wait in the kernel's accept backlog (`listen.rs`) instead of
//! all being accepted and all progressing slowly, interleaved on one core, into the handshake
//! timeout: after an engine restart thousands of agents reconnect at once, and a shard that
//! takes them all in finishes almost none in time (BENCHMARKS.md, "Shard coverage at scale").
//! With the bound, the handshakes in flight finish in a few tens of milliseconds each and the
//! next ones are accepted as they do.
//!
//! A slot is held from accept until the connection's TLS session is established (or fails), it
//! takes a route that does not terminate TLS here (control pass-through, a refusal, a hand-over
//! to another shard), or it ends; but never longer than [`ADMISSION_HOLD`] after accept. A peer
//! that stalls its handshake therefore blocks the accept loop for at most that long per slot, so
//! stalling every slot costs an attacker `max_handshakes_per_shard` new connections per hold
//! and per shard, not one per handshake timeout; the connection itself keeps its handshake
//! deadline. A legitimate handshake never comes near the hold here: at the bound, one takes
//! about `bound` times the CPU of a handshake (tens of milliseconds), plus its round trips.
//!
//! Connections another shard hands over (`hop.rs`) take a slot too (counted, never waited for:
//! the accepting shard already waited), so the bound counts the handshakes a shard does.
//!
//! Metrics: `jaunt_handshakes_in_flight`, `jaunt_handshake_admission_waits_total` (the accept
//! loop paused at the bound) and `jaunt_handshake_admission_expired_total` (slots released by
//! the hold), each by shard.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crate::server::metrics::ShardMetrics;

/// Longest a connection counts against the bound (see the module doc).
pub const ADMISSION_HOLD: Duration = Duration::from_secs(1);

/// One shard's admission state (single-threaded, like everything in a shard).
pub(crate) struct Admission {
    bound: Cell<usize>,
    hold: Duration,
    in_flight: Cell<usize>,
    /// The slots still counted, oldest first (released ones are skipped lazily).
    queue: RefCell<VecDeque<(Instant, Rc<Cell<bool>>)>>,
    /// Bumped by every release; the accept loop waits for it to change.
    releases: Cell<u64>,
    waker: RefCell<Option<Waker>>,
    metrics: Arc<ShardMetrics>,
}

/// A connection's admission slot: released by [`Slot::release`] or on drop.
pub(crate) struct Slot {
    admission: Rc<Admission>,
    counted: Rc<Cell<bool>>,
}

impl Slot {
    /// The connection's handshake is over (or it took a route without one here): the slot
    /// goes to the next connection. Idempotent.
    pub fn release(&self) {
        if self.counted.replace(false) {
            self.admission.uncount();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.release();
    }
}

impl Admission {
    pub fn new(bound: usize, hold: Duration, metrics: Arc<ShardMetrics>) -> Rc<Admission> {
        Rc::new(Admission {
            bound: Cell::new(bound.max(1)),
            hold,
            in_flight: Cell::new(0),
            queue: RefCell::new(VecDeque::new()),
            releases: Cell::new(0),
            waker: RefCell::new(None),
            metrics,
        })
    }

    /// Handshakes counted now.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// A slot for a connection just accepted (or handed over), counted whatever the bound.
    pub fn take(self: &Rc<Self>) -> Slot {
        let now = Instant::now();
        self.expire(now);
        let counted = Rc::new(Cell::new(true));
        self.queue
            .borrow_mut()
            .push_back((now, Rc::clone(&counted)));
        self.in_flight.set(self.in_flight.get() + 1);
        self.metrics
            .set_handshakes_in_flight(self.in_flight.get() as u64);
        Slot {
            admission: Rc::clone(self),
            counted,
        }
    }

    /// Returns once fewer than the bound are counted; the accept loop calls it before each
    /// accept. A pause is counted once in `jaunt_handshake_admission_waits_total`.
    pub async fn room(&self) {
        self.expire(Instant::now());
        if self.in_flight.get() < self.bound.get() {
            return;
        }
        self.metrics.handshake_admission_wait();
        loop {
            let now = Instant::now();
            self.expire(now);
            if self.in_flight.get() < self.bound.get() {
                return;
            }
            let seen = self.releases.get();
            let oldest = self.queue.borrow().front().map(|(at, _)| *at + self.hold);
            let released = poll_fn(|cx| {
                if self.releases.get() != seen {
                    Poll::Ready(())
                } else {
                    *self.waker.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                }
            });
            match oldest {
                Some(at) => {
                    futures_lite::future::or(released, async {
                        glommio::timer::Timer::new(at.saturating_duration_since(now)).await;
                    })
                    .await;
                }
                // Cannot happen (counted slots are queued); wait for a release anyway.
                None => released.await,
            }
        }
    }

    fn uncount(&self) {
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
        self.metrics
            .set_handshakes_in_flight(self.in_flight.get() as u64);
        self.releases.set(self.releases.get().wrapping_add(1));
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    /// Drops released slots from the front of the queue and releases the ones held longer than
    /// the hold.
    fn expire(&self, now: Instant) {
        loop {
            let front = {
                let queue = self.queue.borrow();
                match queue.front() {
                    None => return,
                    Some((at, counted)) => (*at, counted.get()),
                }
            };
            match front {
                (_, false) => {}
                (at, true) if at + self.hold <= now => {
                    if let Some((_, counted)) = self.queue.borrow().front() {
                        counted.set(false);
                    }
                    self.metrics.handshake_admission_expired();
                    self.uncount();
                }
                _ => return,
            }
            self.queue.borrow_mut().pop_front();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(64 << 10)
            .make()
            .unwrap()
            .run(f)
    }

    #[test]
    fn the_bound_pauses_until_a_release_and_the_hold_expires_stalled_slots() {
        run(async {
            let metrics = Arc::new(ShardMetrics::default());
            let admission = Admission::new(2, Duration::from_millis(200), Arc::clone(&metrics));
            admission.room().await;
            let first = admission.take();
            let second = admission.take();
            assert_eq!(admission.in_flight(), 2);
            assert_eq!(metrics.handshakes_in_flight(), 2);

            // At the bound: `room` waits until a slot is released.
            let done = Rc::new(Cell::new(false));
            let waiter = {
                let admission = Rc::clone(&admission);
                let done = Rc::clone(&done);
                glommio::spawn_local(async move {
                    admission.room().await;
                    done.set(true);
                })
            };
            glommio::executor().yield_now().await;
            assert!(!done.get());
            first.release();
            first.release();
            waiter.await;
            assert!(done.get());
            assert_eq!(admission.in_flight(), 1);
            assert_eq!(metrics.handshake_admission_waits(), 1);

            // A stalled slot stops counting after the hold, without being released (the
            // third, taken just after, may expire too if the timer fires late).
            let third = admission.take();
            let started = Instant::now();
            admission.room().await;
            assert!(started.elapsed() >= Duration::from_millis(150));
            assert!(admission.in_flight() <= 1);
            assert!(metrics.handshake_admission_expired_count() >= 1);
            drop(second);
            drop(third);
            assert_eq!(admission.in_flight(), 0);
            assert_eq!(metrics.handshakes_in_flight(), 0);
        });
    }
}
