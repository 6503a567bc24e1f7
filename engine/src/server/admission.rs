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
//! **One peer's share.** A peer address (an IPv4 address, or an IPv6 /64) counts for at most
//! [`peer_share`] of the bound (an eighth: 16 of the default 128). Its connections beyond that
//! are accepted and served as before admission existed, but do not count: so a hostile peer
//! that opens connections and stalls their handshakes holds at most its share of the slots and
//! cannot slow everyone else's accepts (without the share, 128 stalled connections a second
//! from one address would have held every slot of a shard all the time). Many agents behind one
//! NAT address are counted as one peer in the same way: their handshakes beyond the share are
//! not bounded, which is how every connection was handled before the bound.
//!
//! Metrics: `jaunt_handshakes_in_flight`, `jaunt_handshake_admission_waits_total` (the accept
//! loop paused at the bound) and `jaunt_handshake_admission_expired_total` (slots released by
//! the hold), each by shard.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crate::server::metrics::ShardMetrics;

/// Longest a connection counts against the bound (see the module doc).
pub const ADMISSION_HOLD: Duration = Duration::from_secs(1);

/// How many of a shard's `bound` slots one peer address may hold: an eighth, at least one.
pub fn peer_share(bound: usize) -> usize {
    (bound / 8).max(1)
}

/// The address a peer is counted under: an IPv4 address (also when IPv4-mapped), or the /64 of
/// an IPv6 one (one host commonly holds a whole /64).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum PeerKey {
    V4([u8; 4]),
    V6([u8; 8]),
}

impl PeerKey {
    fn of(ip: IpAddr) -> PeerKey {
        match ip {
            IpAddr::V4(v4) => PeerKey::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => PeerKey::V4(v4.octets()),
                None => {
                    let o = v6.octets();
                    PeerKey::V6([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
                }
            },
        }
    }
}

/// A slot's state, shared by the [`Slot`] and the admission queue.
struct Counted {
    counted: Cell<bool>,
    peer: Option<PeerKey>,
}

/// One shard's admission state (single-threaded, like everything in a shard).
pub(crate) struct Admission {
    bound: Cell<usize>,
    hold: Duration,
    in_flight: Cell<usize>,
    /// Counted slots per peer address (entries at zero are removed).
    peers: RefCell<HashMap<PeerKey, usize>>,
    /// The slots still counted, oldest first (released ones are skipped lazily).
    queue: RefCell<VecDeque<(Instant, Rc<Counted>)>>,
    /// Bumped by every release; the accept loop waits for it to change.
    releases: Cell<u64>,
    waker: RefCell<Option<Waker>>,
    metrics: Arc<ShardMetrics>,
}

/// A connection's admission slot: released by [`Slot::release`] or on drop.
pub(crate) struct Slot {
    admission: Rc<Admission>,
    counted: Rc<Counted>,
}

impl Slot {
    /// The connection's handshake is over (or it took a route without one here): the slot
    /// goes to the next connection. Idempotent.
    pub fn release(&self) {
        if self.counted.counted.replace(false) {
            self.admission.uncount(self.counted.peer);
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
            peers: RefCell::new(HashMap::new()),
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

    /// A slot for a connection from `peer` just accepted (or handed over): counted whatever
    /// the bound, unless the peer already holds its share ([`peer_share`]); then the slot
    /// counts for nothing (counted in `jaunt_handshake_admission_over_share_total`). A peer
    /// whose address is unknown is counted without a share.
    pub fn take(self: &Rc<Self>, peer: Option<IpAddr>) -> Slot {
        let now = Instant::now();
        self.expire(now);
        let peer = peer.map(PeerKey::of);
        if let Some(key) = peer {
            let mut peers = self.peers.borrow_mut();
            let held = peers.entry(key).or_insert(0);
            if *held >= peer_share(self.bound.get()) {
                drop(peers);
                self.metrics.handshake_admission_over_share();
                let counted = Rc::new(Counted {
                    counted: Cell::new(false),
                    peer: None,
                });
                return Slot {
                    admission: Rc::clone(self),
                    counted,
                };
            }
            *held += 1;
        }
        let counted = Rc::new(Counted {
            counted: Cell::new(true),
            peer,
        });
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

    fn uncount(&self, peer: Option<PeerKey>) {
        if let Some(key) = peer {
            let mut peers = self.peers.borrow_mut();
            if let Some(held) = peers.get_mut(&key) {
                *held = held.saturating_sub(1);
                if *held == 0 {
                    peers.remove(&key);
                }
            }
        }
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
                    Some((at, counted)) => (*at, counted.counted.get()),
                }
            };
            match front {
                (_, false) => {}
                (at, true) if at + self.hold <= now => {
                    let peer = self.queue.borrow().front().and_then(|(_, counted)| {
                        counted.counted.set(false);
                        counted.peer
                    });
                    self.metrics.handshake_admission_expired();
                    self.uncount(peer);
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
            let first = admission.take(None);
            let second = admission.take(None);
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
            let third = admission.take(None);
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

    #[test]
    fn one_peer_holds_at_most_its_share_of_the_slots() {
        run(async {
            let metrics = Arc::new(ShardMetrics::default());
            let admission = Admission::new(16, Duration::from_secs(60), Arc::clone(&metrics));
            let share = peer_share(16);
            assert_eq!(share, 2);
            let hostile: IpAddr = "192.0.2.7".parse().unwrap();
            // A hostile peer opens 40 connections and stalls every handshake.
            let stalled: Vec<Slot> = (0..40).map(|_| admission.take(Some(hostile))).collect();
            assert_eq!(admission.in_flight(), share);
            assert_eq!(
                metrics.handshake_admission_over_share_count(),
                40 - share as u64
            );
            // Everyone else still finds room at once.
            admission.room().await;
            assert_eq!(metrics.handshake_admission_waits(), 0);
            // IPv4-mapped IPv6 is the same peer; every address of one IPv6 /64 is one peer.
            let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
            drop(admission.take(Some(mapped)));
            assert_eq!(admission.in_flight(), share);
            let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
            let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
            let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
            let v6: Vec<Slot> = [a, b, b, c]
                .iter()
                .map(|ip| admission.take(Some(*ip)))
                .collect();
            assert_eq!(admission.in_flight(), share + 3);
            // Releasing the hostile peer's counted slots gives its share back (uncounted ones
            // release nothing).
            drop(stalled);
            assert_eq!(admission.in_flight(), 3);
            let again = admission.take(Some(hostile));
            assert_eq!(admission.in_flight(), 4);
            drop(again);
            drop(v6);
            assert_eq!(admission.in_flight(), 0);
            assert!(admission.peers.borrow().is_empty());
        });
    }
}
