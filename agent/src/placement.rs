//! Where the agent's executor thread runs: beside the engine shard that carries its traffic,
//! when that engine is on the same host ([`CpuPlacement::FollowEngine`], opt-in: the default
//! is [`CpuPlacement::Off`], since on an idle host the co-located chain costs latency; see
//! BENCHMARKS.md, "rr and the agent's CPU").
//!
//! # Why
//!
//! A request through a tunnel wakes the engine's shard, then the agent, then the service, and
//! back. The engine's shards are pinned, one per CPU; the agent's executor is not, and a
//! wake-up of a thread sleeping in io_uring carries no hint to run it where its waker runs, so
//! the scheduler puts the agent on whichever CPU is idle: the other one. A wake-up that crosses
//! CPUs costs 20-30 µs of CPU more than one that does not on this VM (BENCHMARKS.md, "rr CPU:
//! where a request's time goes"), about half of a small request's cost. When the engine is on
//! another host none of this applies (its shard's CPU is not ours), and nothing moves.
//!
//! # What it does
//!
//! Every tunnel socket is wrapped in a [`Watched`] transport that counts the bytes it moves
//! both ways. Every [`TICK`] the [`Placer`] (pure: fed byte counts and CPUs, it answers pin,
//! unpin or stay) looks at the last tick's bytes per tunnel and, for a tunnel whose engine is
//! local, the CPU that processed its last incoming packet (`SO_INCOMING_CPU`: for a loopback
//! peer, the CPU the sending shard runs on). It pins the executor thread to one CPU when
//! tunnels served from that CPU carried at least 90% of the tick's bytes for [`HOLD`] ticks in
//! a row, and unpins it (back to the mask it started with) at once when the traffic spreads
//! over several shards or becomes bulk ([`BULK_BYTES_PER_OP`] per socket read or write, or
//! [`BULK_BYTES`] a tick: a transfer that wants the agent and the shard on two CPUs at once,
//! not one). An idle tick changes nothing.
//!
//! # What is not here
//!
//! The tunnel's traffic itself (the mux, `jaunt_engine::tunnel`); the shard choice of a dial
//! (`coverage.rs`); other threads of the agent (control, DNS lookups, HTTP app workers), which
//! stay where the scheduler puts them. Only the executor thread is ever pinned.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncWrite};

pub use jaunt_config::file::CpuPlacement;

/// How often the placer looks, while some tunnel's engine is local.
pub const TICK: Duration = Duration::from_millis(200);

/// How often it looks while no tunnel's engine is local (only to notice one).
pub const IDLE_TICK: Duration = Duration::from_secs(2);

/// Fewer bytes than this in a tick (all tunnels, both ways) is no evidence: stay as is.
pub const MIN_BYTES: u64 = 2 * 1024;

/// This many bytes or more in a tick through the busy CPU's tunnels is a bulk transfer (20 MiB/s
/// at 200 ms): the agent and the shard then do more on two CPUs than on one, so unpin.
pub const BULK_BYTES: u64 = 4 << 20;

/// Bytes per socket read or write at or above which a tick's traffic is bulk, whatever its rate:
/// requests and keystrokes move a TLS record of a few hundred bytes per call, a transfer fills
/// the 16 KiB records rustls writes and reads many at once (the tunnel's reads and writes are
/// batched up to hundreds of KiB).
pub const BULK_BYTES_PER_OP: u64 = 8 * 1024;

/// Ticks in a row the same CPU must qualify before the executor is pinned there.
pub const HOLD: u32 = 2;

/// One tunnel's tick, as the placer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    /// The tunnel's probe (stable for its life).
    pub id: u64,
    /// Bytes moved both ways since the probe was made (monotonic).
    pub bytes: u64,
    /// Socket reads and writes that moved bytes, since the probe was made (monotonic).
    pub ops: u64,
    /// The CPU its engine shard runs on: `Some` only if the engine is on this host, the kernel
    /// knows the CPU, and this thread may run there.
    pub cpu: Option<usize>,
}

/// What to do with the executor thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Move {
    /// Run only on this CPU.
    Pin(usize),
    /// Back to the CPUs it started with.
    Unpin,
}

/// The decision: pure, fed one tick's [`Reading`]s at a time.
#[derive(Debug, Default)]
pub struct Placer {
    /// Bytes and operations of each live probe at the previous tick.
    last: BTreeMap<u64, (u64, u64)>,
    pinned: Option<usize>,
    candidate: Option<usize>,
    streak: u32,
}

impl Placer {
    /// Where the executor is pinned now, as far as the placer knows.
    #[cfg(test)]
    pub fn pinned(&self) -> Option<usize> {
        self.pinned
    }

    /// Takes one tick's readings (every live tunnel; a tunnel missing from them is gone) and
    /// says whether to move.
    pub fn tick(&mut self, readings: &[Reading]) -> Option<Move> {
        let mut total = 0u64;
        let mut ops = 0u64;
        let mut by_cpu: BTreeMap<usize, u64> = BTreeMap::new();
        let mut next = BTreeMap::new();
        for r in readings {
            // A new probe's first tick counts from zero: its handshake bytes are in it, which
            // is traffic through that shard like any other.
            let (bytes_before, ops_before) = self.last.get(&r.id).copied().unwrap_or((0, 0));
            let delta = r.bytes.saturating_sub(bytes_before);
            next.insert(r.id, (r.bytes, r.ops));
            total = total.saturating_add(delta);
            ops = ops.saturating_add(r.ops.saturating_sub(ops_before));
            if let Some(cpu) = r.cpu {
                *by_cpu.entry(cpu).or_default() += delta;
            }
        }
        self.last = next;
        if total < MIN_BYTES {
            return None;
        }
        // The lowest CPU wins a tie, so the choice is deterministic.
        let (top_cpu, top_bytes) = by_cpu.iter().fold((None, 0u64), |(c, b), (&cpu, &bytes)| {
            if bytes > b {
                (Some(cpu), bytes)
            } else {
                (c, b)
            }
        });
        let concentrated = top_bytes.saturating_mul(10) >= total.saturating_mul(9);
        let bulk = top_bytes >= BULK_BYTES || total >= ops.max(1).saturating_mul(BULK_BYTES_PER_OP);
        let want = match top_cpu {
            Some(cpu) if concentrated && !bulk => Some(cpu),
            _ => None,
        };
        if want == self.pinned {
            self.candidate = None;
            self.streak = 0;
            return None;
        }
        let Some(cpu) = want else {
            // Spread or bulk: give the scheduler back its choice at once.
            self.pinned = None;
            self.candidate = None;
            self.streak = 0;
            return Some(Move::Unpin);
        };
        if self.candidate == Some(cpu) {
            self.streak += 1;
        } else {
            self.candidate = Some(cpu);
            self.streak = 1;
        }
        if self.streak < HOLD {
            return None;
        }
        self.pinned = Some(cpu);
        self.candidate = None;
        self.streak = 0;
        Some(Move::Pin(cpu))
    }

    /// The last [`Move::Pin`] could not be applied: the placer is unpinned again.
    pub fn pin_failed(&mut self) {
        self.pinned = None;
    }
}

/// One tunnel socket's counters, shared by its [`Watched`] transport and the placer.
#[derive(Debug)]
struct Probe {
    id: u64,
    fd: RawFd,
    /// Whether the engine is on this host (set once, at connect).
    local: bool,
    bytes: Cell<u64>,
    ops: Cell<u64>,
    /// Set by the transport's drop, before the socket closes: the placer never reads `fd`
    /// after that (it could be another socket's by then).
    closed: Cell<bool>,
}

thread_local! {
    /// The probes of this thread's tunnel sockets (the agent's executor is one thread).
    static PROBES: RefCell<Vec<Rc<Probe>>> = const { RefCell::new(Vec::new()) };
    static NEXT_ID: Cell<u64> = const { Cell::new(0) };
}

/// A tunnel socket that counts its bytes for the placer; otherwise the socket itself.
pub(crate) struct Watched<S> {
    inner: S,
    probe: Rc<Probe>,
}

impl<S: AsRawFd> Watched<S> {
    /// Wraps a connected socket; `peer` is the engine's address, `local` this end's.
    pub(crate) fn new(inner: S, peer: SocketAddr, local: Option<SocketAddr>) -> Watched<S> {
        let id = NEXT_ID.with(|n| {
            let id = n.get();
            n.set(id.wrapping_add(1));
            id
        });
        let probe = Rc::new(Probe {
            id,
            fd: inner.as_raw_fd(),
            local: engine_is_local(peer, local),
            bytes: Cell::new(0),
            ops: Cell::new(0),
            closed: Cell::new(false),
        });
        PROBES.with(|p| {
            let mut probes = p.borrow_mut();
            // Closed probes go here too, not only in the placer's loop, which does not run with
            // `agent.cpu_placement: off`: the list holds live sockets only.
            probes.retain(|probe| !probe.closed.get());
            probes.push(Rc::clone(&probe));
        });
        Watched { inner, probe }
    }
}

/// Whether an engine at `peer` runs on this host: a loopback address, or the address this end
/// of the connection has (the kernel routes to one of its own addresses over loopback).
pub fn engine_is_local(peer: SocketAddr, local: Option<SocketAddr>) -> bool {
    peer.ip().is_loopback() || local.is_some_and(|l| l.ip() == peer.ip())
}

impl<S> Drop for Watched<S> {
    fn drop(&mut self) {
        // Runs before `inner` (the socket) is dropped and its descriptor closed.
        self.probe.closed.set(true);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            this.probe.count(*n);
        }
        polled
    }

    fn poll_read_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &mut [io::IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_read_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled {
            this.probe.count(*n);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            this.probe.count(*n);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled {
            this.probe.count(*n);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

impl Probe {
    fn count(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.bytes.set(self.bytes.get().wrapping_add(n as u64));
        self.ops.set(self.ops.get().wrapping_add(1));
    }
}

/// This thread's CPU mask, as the kernel has it.
#[allow(unsafe_code)]
fn current_mask() -> io::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain bits; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the size and pointer are the set's own.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc == 0 {
        Ok(set)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[allow(unsafe_code)]
fn set_mask(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: pid 0 is this thread; the size and pointer are the set's own.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(set), set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[allow(unsafe_code)]
fn mask_has(set: &libc::cpu_set_t, cpu: usize) -> bool {
    // SAFETY: CPU_ISSET only reads the set; out-of-range CPUs are checked first.
    cpu < libc::CPU_SETSIZE as usize && unsafe { libc::CPU_ISSET(cpu, set) }
}

/// The set of `cpu` alone (`cpu` is in the thread's start mask, so below `CPU_SETSIZE`).
#[allow(unsafe_code)]
fn only(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: zeroed is the empty set; CPU_SET writes one bit of it, and checks the bound.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut one) };
    one
}

#[allow(unsafe_code)]
fn mask_count(set: &libc::cpu_set_t) -> usize {
    // SAFETY: CPU_COUNT only reads the set.
    usize::try_from(unsafe { libc::CPU_COUNT(set) }).unwrap_or(0)
}

/// The CPU that processed the socket's last incoming packet, if the kernel recorded one.
#[allow(unsafe_code)]
fn incoming_cpu(fd: RawFd) -> Option<usize> {
    let mut cpu: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is open (the caller checked the probe is not closed, and the probe's
    // transport owns the descriptor on this thread); the value and length are ours.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_INCOMING_CPU,
            (&mut cpu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        usize::try_from(cpu).ok()
    } else {
        None
    }
}

/// The placer's task: runs on the agent's executor until the executor ends. Does nothing (and
/// returns) where this thread may run on one CPU only.
pub(crate) async fn follow_engine() {
    let start = match current_mask() {
        Ok(mask) => mask,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the agent's CPU mask: CPU placement off");
            return;
        }
    };
    if mask_count(&start) < 2 {
        return;
    }
    let mut placer = Placer::default();
    loop {
        let (readings, any_local): (Vec<Reading>, bool) = PROBES.with(|p| {
            let mut probes = p.borrow_mut();
            probes.retain(|probe| !probe.closed.get());
            let readings = probes
                .iter()
                .map(|probe| Reading {
                    id: probe.id,
                    bytes: probe.bytes.get(),
                    ops: probe.ops.get(),
                    cpu: if probe.local {
                        incoming_cpu(probe.fd).filter(|&cpu| mask_has(&start, cpu))
                    } else {
                        None
                    },
                })
                .collect();
            (readings, probes.iter().any(|probe| probe.local))
        });
        match placer.tick(&readings) {
            Some(Move::Pin(cpu)) => match set_mask(&only(cpu)) {
                Ok(()) => {
                    crate::metrics::cpu_moved(Some(cpu));
                    tracing::debug!(cpu, "agent executor pinned beside the engine's busy shard");
                }
                Err(e) => {
                    placer.pin_failed();
                    tracing::warn!(cpu, error = %e, "cannot pin the agent's executor: CPU placement off");
                    return;
                }
            },
            Some(Move::Unpin) => match set_mask(&start) {
                Ok(()) => {
                    crate::metrics::cpu_moved(None);
                    tracing::debug!("agent executor unpinned");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot restore the agent's CPU mask: CPU placement off");
                    return;
                }
            },
            None => {}
        }
        let wait = if any_local { TICK } else { IDLE_TICK };
        glommio::timer::sleep(wait).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    /// A reading of small traffic: 200 bytes per socket operation, as requests move.
    fn r(id: u64, bytes: u64, cpu: Option<usize>) -> Reading {
        Reading {
            id,
            bytes,
            ops: bytes / 200,
            cpu,
        }
    }

    /// Feeds `ticks` ticks of `per_tick` bytes on tunnel 0 (served from `cpu`) and returns the
    /// moves.
    fn run(
        p: &mut Placer,
        base: &mut u64,
        ticks: u32,
        per_tick: u64,
        cpu: Option<usize>,
    ) -> Vec<Move> {
        let mut moves = Vec::new();
        for _ in 0..ticks {
            *base += per_tick;
            moves.extend(p.tick(&[r(0, *base, cpu), r(1, 0, Some(0))]));
        }
        moves
    }

    #[test]
    fn small_requests_through_one_local_shard_pin_after_the_hold() {
        let mut p = Placer::default();
        let mut b = 0;
        assert_eq!(run(&mut p, &mut b, HOLD - 1, 100_000, Some(1)), vec![]);
        assert_eq!(run(&mut p, &mut b, 1, 100_000, Some(1)), vec![Move::Pin(1)]);
        assert_eq!(p.pinned(), Some(1));
        // Staying there is no move; nor is an idle stretch.
        assert_eq!(run(&mut p, &mut b, 5, 100_000, Some(1)), vec![]);
        assert_eq!(run(&mut p, &mut b, 20, 0, Some(1)), vec![]);
        assert_eq!(p.pinned(), Some(1));
    }

    #[test]
    fn bulk_unpins_at_once_and_small_traffic_pins_again() {
        let mut p = Placer::default();
        let mut b = 0;
        run(&mut p, &mut b, HOLD, 100_000, Some(0));
        assert_eq!(p.pinned(), Some(0));
        assert_eq!(
            run(&mut p, &mut b, 1, BULK_BYTES, Some(0)),
            vec![Move::Unpin]
        );
        assert_eq!(run(&mut p, &mut b, 3, BULK_BYTES * 2, Some(0)), vec![]);
        assert_eq!(
            run(&mut p, &mut b, HOLD, 50_000, Some(0)),
            vec![Move::Pin(0)]
        );
    }

    #[test]
    fn large_reads_and_writes_are_bulk_at_any_rate() {
        let mut p = Placer::default();
        let mut b = 0;
        run(&mut p, &mut b, HOLD, 100_000, Some(1));
        assert_eq!(p.pinned(), Some(1));
        // 1 MiB a tick, far under BULK_BYTES, in 64 KiB operations: a transfer.
        let (mut bytes, mut ops) = (b, b / 200);
        let mut moves = Vec::new();
        for _ in 0..3 {
            bytes += 1 << 20;
            ops += 16;
            moves.extend(p.tick(&[Reading {
                id: 0,
                bytes,
                ops,
                cpu: Some(1),
            }]));
        }
        assert_eq!(moves, vec![Move::Unpin]);
    }

    #[test]
    fn traffic_spread_over_two_shards_unpins() {
        let mut p = Placer::default();
        let (mut a, mut b) = (0u64, 0u64);
        for _ in 0..HOLD {
            a += 100_000;
            p.tick(&[r(0, a, Some(0)), r(1, b, Some(1))]);
        }
        assert_eq!(p.pinned(), Some(0));
        // 80% / 20%: below the 90% share.
        a += 80_000;
        b += 20_000;
        assert_eq!(
            p.tick(&[r(0, a, Some(0)), r(1, b, Some(1))]),
            Some(Move::Unpin)
        );
        // 95% on the other shard for the hold: pinned there.
        let mut moves = Vec::new();
        for _ in 0..HOLD {
            a += 5_000;
            b += 95_000;
            moves.extend(p.tick(&[r(0, a, Some(0)), r(1, b, Some(1))]));
        }
        assert_eq!(moves, vec![Move::Pin(1)]);
    }

    #[test]
    fn a_remote_engine_never_pins() {
        let mut p = Placer::default();
        let mut b = 0;
        assert_eq!(run(&mut p, &mut b, 10, 100_000, None), vec![]);
        assert_eq!(p.pinned(), None);
    }

    #[test]
    fn a_flapping_cpu_does_not_pin_and_a_gone_tunnel_is_forgotten() {
        let mut p = Placer::default();
        let mut b = 0;
        for i in 0..9 {
            b += 100_000;
            assert_eq!(p.tick(&[r(7, b, Some(i % 2))]), None, "tick {i}");
        }
        // Tunnel 7 is gone; a new tunnel's first tick counts from zero.
        assert_eq!(p.tick(&[r(8, 100_000, Some(1))]), None);
        assert_eq!(p.tick(&[r(8, 200_000, Some(1))]), Some(Move::Pin(1)));
        assert_eq!(p.last.keys().copied().collect::<Vec<_>>(), vec![8]);
    }

    #[test]
    fn a_failed_pin_leaves_the_placer_unpinned() {
        let mut p = Placer::default();
        let mut b = 0;
        run(&mut p, &mut b, HOLD, 100_000, Some(1));
        p.pin_failed();
        assert_eq!(p.pinned(), None);
    }

    #[test]
    fn locality() {
        let lo: SocketAddr = "127.0.0.1:443".parse().unwrap();
        let there: SocketAddr = "10.0.0.2:443".parse().unwrap();
        let here: SocketAddr = "10.0.0.9:50000".parse().unwrap();
        let same: SocketAddr = "10.0.0.9:443".parse().unwrap();
        assert!(engine_is_local(lo, Some(here)));
        assert!(engine_is_local(same, Some(here)));
        assert!(!engine_is_local(there, Some(here)));
        assert!(!engine_is_local(there, None));
    }
}
