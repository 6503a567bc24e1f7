//! Seeded simulation of the tunnel multiplexer: two [`Conn`]s (engine and agent) joined by an
//! in-memory pipe that delivers bytes in random-sized chunks, driven by a virtual clock.
//!
//! What is checked here: every byte of every stream arrives intact and in order, FIN only after
//! the last byte; a stalled reader stalls only its stream; GOAWAY refuses new streams and lets
//! old ones finish; keepalive pings and the dead-peer timeout; and that random, truncated and
//! mutated input never panics and closes the tunnel cleanly. Unit tests of frames and single
//! transitions live next to the code in `engine/src/mux/`.
//!
//! Each failure prints its seed. `MUX_SIM_SEEDS=n` runs more (or fewer) seeds of the
//! simulations; the defaults keep `cargo test` at a few seconds in a debug build.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use jaunt_engine::mux::{
    encode, CloseReason, Config, Conn, ErrorCode, Event, FrameType, MuxError, Role, StreamId,
    CONN_WINDOW, HEADER_LEN, INITIAL_STREAM_WINDOW,
};

// ---------------------------------------------------------------------------------------------
// Deterministic randomness and stream contents
// ---------------------------------------------------------------------------------------------

/// xorshift64*: tiny, seeded, good enough to drive a simulation.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03 | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below((hi - lo + 1) as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn seeds(default: u64) -> u64 {
    std::env::var("MUX_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Stream contents come from one random table; byte `o` of direction `dir` on stream `id` is
/// `TABLE[(key(dir, id) + o) % len]`, so senders slice it and receivers check it without storing
/// what was sent.
const TABLE_LEN: usize = 65_599;

fn table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| Rng::new(0x7ab1e).bytes(TABLE_LEN))
}

fn start_of(dir: u8, id: u32, offset: u64) -> usize {
    let key = id as usize * 7919 + dir as usize * 104_729;
    (key + (offset % TABLE_LEN as u64) as usize) % TABLE_LEN
}

/// Up to `max` bytes of the stream's contents from `offset` (fewer where the table wraps).
fn source(dir: u8, id: u32, offset: u64, max: usize) -> &'static [u8] {
    let start = start_of(dir, id, offset);
    &table()[start..(start + max).min(TABLE_LEN)]
}

fn verify(dir: u8, id: u32, mut offset: u64, mut got: &[u8], seed: u64) {
    while !got.is_empty() {
        let want = source(dir, id, offset, got.len());
        assert_eq!(
            &got[..want.len()],
            want,
            "seed {seed}: stream {id} dir {dir}: wrong bytes at offset {offset}"
        );
        got = &got[want.len()..];
        offset += want.len() as u64;
    }
}

// ---------------------------------------------------------------------------------------------
// The pipe and the two endpoints
// ---------------------------------------------------------------------------------------------

/// One direction of the link: bytes written and not yet delivered, optionally recorded.
#[derive(Default)]
struct Pipe {
    bytes: Vec<u8>,
    record: Option<Vec<u8>>,
}

/// One direction of one stream, as the test saw it.
#[derive(Clone, Debug, Default)]
struct Flow {
    sent: u64,
    fin_sent: bool,
    received: u64,
    fin_received: bool,
    /// Reset or refused: only a correct prefix is required.
    aborted: bool,
}

#[derive(Default)]
struct Ledger {
    flows: HashMap<(u8, u32), Flow>,
    dial_headers: HashMap<u32, Vec<u8>>,
}

impl Ledger {
    fn flow(&mut self, dir: u8, id: u32) -> &mut Flow {
        self.flows.entry((dir, id)).or_default()
    }

    fn abort(&mut self, id: u32) {
        self.flow(0, id).aborted = true;
        self.flow(1, id).aborted = true;
    }
}

/// The application's view of one stream on one side.
#[derive(Debug)]
struct AppStream {
    answered: bool,
    send_target: u64,
    sent: u64,
    fin_sent: bool,
    fin_received: bool,
}

struct Endpoint {
    conn: Conn,
    /// Direction of the bytes this side sends: 0 engine→agent, 1 agent→engine.
    dir: u8,
    streams: BTreeMap<u32, AppStream>,
    stalled: BTreeSet<u32>,
    goaway_seen: bool,
    closed: Option<CloseReason>,
    pongs: Vec<Duration>,
    /// `Writable` events seen: how often a sender ran out of credit and got it back.
    writables: usize,
    /// Bytes sent through `send_buf` + `send_commit`.
    zero_copy_sent: u64,
    /// Also answers OPENs only after some steps (optimistic data piles up meanwhile).
    refuse_percent: u64,
    max_stream_bytes: usize,
}

impl Endpoint {
    fn new(role: Role, config: Config, now: Instant) -> Endpoint {
        Endpoint {
            conn: Conn::new(role, config, now),
            dir: if role == Role::Server { 0 } else { 1 },
            streams: BTreeMap::new(),
            stalled: BTreeSet::new(),
            goaway_seen: false,
            closed: None,
            pongs: Vec::new(),
            writables: 0,
            zero_copy_sent: 0,
            refuse_percent: 10,
            max_stream_bytes: 300_000,
        }
    }

    fn peer_dir(&self) -> u8 {
        1 - self.dir
    }

    /// Opens a stream with a dial header the peer will check.
    fn open(&mut self, ledger: &mut Ledger, rng: &mut Rng) -> Result<u32, MuxError> {
        let len = rng.range(0, 300);
        let header = rng.bytes(len);
        let id = self.conn.open_stream(&header)?.get();
        ledger.dial_headers.insert(id, header);
        let target = rng.range(0, self.max_stream_bytes) as u64;
        self.streams.insert(
            id,
            AppStream {
                answered: true,
                send_target: target,
                sent: 0,
                fin_sent: false,
                fin_received: false,
            },
        );
        Ok(id)
    }

    fn drain_events(&mut self, ledger: &mut Ledger, rng: &mut Rng, seed: u64) {
        while let Some(event) = self.conn.poll_event() {
            match event {
                Event::StreamOpened { id, dial_header } => {
                    let id = id.get();
                    assert_eq!(
                        ledger.dial_headers.get(&id),
                        Some(&dial_header),
                        "seed {seed}"
                    );
                    let target = rng.range(0, self.max_stream_bytes) as u64;
                    self.streams.insert(
                        id,
                        AppStream {
                            answered: false,
                            send_target: target,
                            sent: 0,
                            fin_sent: false,
                            fin_received: false,
                        },
                    );
                }
                Event::OpenResult { id, result } => {
                    assert!(self.streams.contains_key(&id.get()), "seed {seed}: {id}");
                    if result.is_err() {
                        self.streams.remove(&id.get());
                        ledger.abort(id.get());
                    }
                }
                Event::Readable { .. } => {}
                Event::Writable { .. } => self.writables += 1,
                Event::StreamFinished { id } => {
                    let id = id.get();
                    let flow = ledger.flow(self.peer_dir(), id).clone();
                    assert!(flow.fin_sent, "seed {seed}: FIN on {id} that was not sent");
                    assert_eq!(
                        flow.received, flow.sent,
                        "seed {seed}: FIN on {id} before all data"
                    );
                    ledger.flow(self.peer_dir(), id).fin_received = true;
                    let s = self.streams.get_mut(&id).expect("finished stream is known");
                    s.fin_received = true;
                    if s.fin_sent {
                        self.streams.remove(&id);
                    }
                }
                Event::StreamReset { id, code } => {
                    let known = self.streams.remove(&id.get()).is_some();
                    assert!(known, "seed {seed}: reset of unknown stream {id} ({code})");
                    ledger.abort(id.get());
                }
                Event::Pong { rtt } => self.pongs.push(rtt),
                Event::GoAway { .. } => self.goaway_seen = true,
                Event::Closed { reason } => {
                    self.closed = Some(reason);
                    self.streams.clear();
                }
            }
        }
    }

    /// One step of application behaviour on every stream.
    fn act(&mut self, ledger: &mut Ledger, rng: &mut Rng, seed: u64, now: Instant) {
        self.drain_events(ledger, rng, seed);
        if self.conn.is_closed() {
            return;
        }
        // An RTT probe now and then, on top of the keepalive timer.
        if rng.below(200) == 0 {
            self.conn.ping(now).unwrap();
        }
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        let mut buf = vec![0u8; 70_000];
        for id in ids {
            let sid = StreamId::new(id).unwrap();
            if rng.chance(3) && !self.stalled.remove(&id) {
                self.stalled.insert(id);
            }
            // Answer a pending OPEN.
            if let Some(s) = self.streams.get_mut(&id) {
                if !s.answered && rng.chance(50) {
                    s.answered = true;
                    if rng.chance(self.refuse_percent) {
                        self.conn.open_result(sid, Err("dial failed")).unwrap();
                        self.streams.remove(&id);
                        ledger.abort(id);
                    } else {
                        self.conn.open_result(sid, Ok(())).unwrap();
                    }
                }
            }
            // Read, by copy or by peek + consume.
            if self.streams.contains_key(&id) && !self.stalled.contains(&id) && rng.chance(70) {
                for _ in 0..rng.range(1, 4) {
                    let peer = self.peer_dir();
                    let offset = ledger.flow(peer, id).received;
                    let n = if rng.chance(50) {
                        let want = rng.range(1, buf.len());
                        let n = self.conn.recv(sid, &mut buf[..want]).unwrap();
                        verify(peer, id, offset, &buf[..n], seed);
                        n
                    } else {
                        let avail = self.conn.read_buf(sid).unwrap();
                        let n = rng.range(0, avail.len());
                        verify(peer, id, offset, &avail[..n], seed);
                        self.conn.consume(sid, n).unwrap()
                    };
                    ledger.flow(peer, id).received += n as u64;
                    self.drain_events(ledger, rng, seed);
                    if n == 0 || !self.streams.contains_key(&id) {
                        break;
                    }
                }
            }
            // Write.
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            if s.answered && !s.fin_sent && s.sent < s.send_target && rng.chance(60) {
                let want = rng.range(1, 40_000).min((s.send_target - s.sent) as usize);
                let n = if rng.chance(50) {
                    let chunk = source(self.dir, id, s.sent, want);
                    self.conn.send(sid, chunk).unwrap()
                } else {
                    // Zero-copy, like reading a socket into the queue's room until it runs out:
                    // all of the room, a prefix of it or nothing (a short read); the rest of the
                    // room holds garbage that must not go out.
                    let mut n = 0;
                    loop {
                        let room = self.conn.send_buf(sid, want - n).unwrap();
                        assert!(room.len() <= want - n, "seed {seed}: room beyond the wish");
                        let chunk = source(self.dir, id, s.sent + n as u64, room.len());
                        let full = chunk.len() == room.len();
                        let mut k = chunk.len();
                        if rng.chance(15) {
                            k = rng.range(0, k);
                        }
                        room[..k].copy_from_slice(&chunk[..k]);
                        room[k..].fill(0xee);
                        if rng.chance(3) {
                            // Another call voids the room: nothing of it is sent.
                            self.conn.send(sid, &[]).unwrap();
                            let voided = self.conn.send_commit(sid, k);
                            assert!(
                                k == 0 || voided == Err(MuxError::NoSendBuf),
                                "seed {seed}: {voided:?}"
                            );
                            break;
                        }
                        assert_eq!(self.conn.send_commit(sid, k).unwrap(), k, "seed {seed}");
                        self.zero_copy_sent += k as u64;
                        n += k;
                        // An empty room means no credit: it armed a Writable.
                        if k == 0 || !full || n == want {
                            break;
                        }
                    }
                    n
                };
                s.sent += n as u64;
                ledger.flow(self.dir, id).sent += n as u64;
            }
            if s.answered && !s.fin_sent && s.sent == s.send_target && rng.chance(30) {
                self.conn.finish(sid).unwrap();
                s.fin_sent = true;
                ledger.flow(self.dir, id).fin_sent = true;
                if s.fin_received {
                    self.streams.remove(&id);
                }
            }
            // Rarely give up on a stream.
            if self.streams.contains_key(&id) && rng.below(1000) < 2 {
                self.conn.reset(sid, ErrorCode(0x1000)).unwrap();
                self.streams.remove(&id);
                ledger.abort(id);
            }
            self.drain_events(ledger, rng, seed);
        }
    }
}

/// Two endpoints, two pipes, a virtual clock.
struct Sim {
    seed: u64,
    rng: Rng,
    now: Instant,
    engine: Endpoint,
    agent: Endpoint,
    to_agent: Pipe,
    to_engine: Pipe,
    ledger: Ledger,
    /// Percent of steps on which a pipe delivers nothing.
    hold_percent: u64,
    /// Every transmit takes all that is ready (else in-place writes may stop part-way, like a
    /// socket that takes no more for now).
    full_transmit: bool,
    /// Bytes written through `transmit_buf`, and writes that left a batch part-way.
    in_place_bytes: u64,
    partial_writes: u64,
}

impl Sim {
    fn new(seed: u64, config: Config) -> Sim {
        let now = Instant::now();
        Sim {
            seed,
            rng: Rng::new(seed),
            now,
            engine: Endpoint::new(Role::Server, config, now),
            agent: Endpoint::new(Role::Client, config, now),
            to_agent: Pipe::default(),
            to_engine: Pipe::default(),
            ledger: Ledger::default(),
            hold_percent: 10,
            full_transmit: false,
            in_place_bytes: 0,
            partial_writes: 0,
        }
    }

    /// Moves queued frames into the pipes: by copy (`poll_transmit`), or in place
    /// (`transmit_buf`) in writes of random size, possibly stopping with a batch half written.
    fn transmit(&mut self) {
        let rng = &mut self.rng;
        for (ep, pipe) in [
            (&mut self.engine, &mut self.to_agent),
            (&mut self.agent, &mut self.to_engine),
        ] {
            let start = pipe.bytes.len();
            if rng.chance(50) {
                ep.conn.poll_transmit(&mut pipe.bytes);
            } else {
                loop {
                    let batch = ep.conn.transmit_buf();
                    if batch.is_empty() {
                        break;
                    }
                    let n = if rng.chance(30) {
                        rng.range(1, batch.len())
                    } else {
                        batch.len()
                    };
                    if n < batch.len() {
                        self.partial_writes += 1;
                    }
                    pipe.bytes.extend_from_slice(&batch[..n]);
                    assert_eq!(ep.conn.transmit_advance(n), n);
                    self.in_place_bytes += n as u64;
                    if !self.full_transmit && rng.chance(10) {
                        break;
                    }
                }
            }
            if let Some(record) = &mut pipe.record {
                record.extend_from_slice(&pipe.bytes[start..]);
            }
        }
    }

    /// Delivers a random prefix of each pipe in random-sized chunks.
    fn deliver(&mut self) {
        let seed = self.seed;
        for (pipe, ep) in [
            (&mut self.to_agent, &mut self.agent),
            (&mut self.to_engine, &mut self.engine),
        ] {
            if pipe.bytes.is_empty() || self.rng.chance(self.hold_percent) {
                continue;
            }
            let total = if self.rng.chance(50) {
                pipe.bytes.len()
            } else {
                self.rng.range(1, pipe.bytes.len())
            };
            let mut done = 0;
            while done < total {
                let chunk = if self.rng.chance(30) {
                    self.rng.range(1, 20)
                } else {
                    self.rng.range(1, 100_000)
                }
                .min(total - done);
                let bytes = &pipe.bytes[done..done + chunk];
                // Half the time through the zero-copy path, in reads of what it asks for (or
                // less, like a short socket read).
                let zero_copy = self.rng.chance(50);
                let mut at = 0;
                while at < bytes.len() {
                    let result = if zero_copy {
                        let buf = ep.conn.input_buf();
                        assert!(!buf.is_empty(), "seed {seed}: empty input_buf");
                        let mut n = buf.len().min(bytes.len() - at);
                        if self.rng.chance(10) {
                            n = self.rng.range(0, n);
                        }
                        buf[..n].copy_from_slice(&bytes[at..at + n]);
                        at += n;
                        ep.conn.input_commit(n, self.now)
                    } else {
                        at = bytes.len();
                        ep.conn.handle_input(bytes, self.now)
                    };
                    match result {
                        Ok(()) => {}
                        // A drained peer may still get our last window updates; that is fine.
                        Err(MuxError::Closed(CloseReason::Drained)) => break,
                        Err(err) => panic!("seed {seed}: input rejected: {err}"),
                    }
                    ep.drain_events(&mut self.ledger, &mut self.rng, seed);
                    // The driver's going to sleep, at any moment: the buffers it gives back
                    // are taken again on the next use.
                    if self.rng.chance(10) {
                        ep.conn.release_idle_buffers();
                    }
                }
                done += chunk;
            }
            pipe.bytes.drain(..total);
        }
    }

    /// Transmits and delivers until both pipes are empty.
    fn flush(&mut self) {
        let hold = std::mem::replace(&mut self.hold_percent, 0);
        self.full_transmit = true;
        loop {
            self.transmit();
            if self.to_agent.bytes.is_empty() && self.to_engine.bytes.is_empty() {
                break;
            }
            self.deliver();
        }
        self.full_transmit = false;
        self.hold_percent = hold;
    }

    fn timers(&mut self) {
        let seed = self.seed;
        for ep in [&mut self.engine, &mut self.agent] {
            if ep.conn.poll_timeout().is_some_and(|t| t <= self.now) {
                ep.conn.handle_timeout(self.now);
                ep.drain_events(&mut self.ledger, &mut self.rng, seed);
            }
        }
    }

    fn step(&mut self) {
        self.now += Duration::from_millis(self.rng.below(4));
        self.timers();
        self.engine
            .act(&mut self.ledger, &mut self.rng, self.seed, self.now);
        self.agent
            .act(&mut self.ledger, &mut self.rng, self.seed, self.now);
        self.transmit();
        self.deliver();
    }

    fn quiet(&self) -> bool {
        self.engine.streams.is_empty()
            && self.agent.streams.is_empty()
            && self.to_agent.bytes.is_empty()
            && self.to_engine.bytes.is_empty()
            && self.engine.conn.stream_count() == 0
            && self.agent.conn.stream_count() == 0
    }

    /// Every flow that was not aborted arrived whole, FIN included.
    fn check_complete(&self) {
        for (&(dir, id), flow) in &self.ledger.flows {
            if !flow.aborted {
                assert!(
                    flow.fin_sent && flow.fin_received,
                    "seed {}: {dir}/{id}: {flow:?}",
                    self.seed
                );
                assert_eq!(flow.received, flow.sent, "seed {}: {dir}/{id}", self.seed);
            }
        }
    }
}

fn sim_config() -> Config {
    Config {
        keepalive_interval: Duration::from_millis(200),
        dead_peer_timeout: Duration::from_secs(60),
    }
}

/// What a batch of random scenarios exercised, so a change that makes them trivial shows.
#[derive(Debug, Default)]
struct Coverage {
    complete_flows: usize,
    aborted_flows: usize,
    bytes: u64,
    largest_flow: u64,
    writables: usize,
    pongs: usize,
    drains: usize,
    zero_copy_sent: u64,
    in_place_bytes: u64,
    partial_writes: u64,
}

/// Runs one random scenario to completion; returns the recorded wire bytes (to agent, to engine).
fn run_random(seed: u64, record: bool, small: bool, cov: &mut Coverage) -> (Vec<u8>, Vec<u8>) {
    let mut sim = Sim::new(seed, sim_config());
    if record {
        sim.to_agent.record = Some(Vec::new());
        sim.to_engine.record = Some(Vec::new());
    }
    let mut rng = Rng::new(seed ^ 0x5eed);
    let streams = if small {
        rng.range(1, 6)
    } else {
        rng.range(1, 24)
    };
    let max_bytes = if small {
        8_000
    } else {
        [2_000, 60_000, 300_000, 1_200_000][rng.range(0, 3)]
    };
    sim.engine.max_stream_bytes = max_bytes;
    sim.agent.max_stream_bytes = max_bytes;
    sim.hold_percent = rng.below(40);
    // Sometimes one side starts a drain part-way through.
    let goaway_at = if rng.chance(25) {
        Some(rng.range(0, 150))
    } else {
        None
    };
    let goaway_by_agent = rng.chance(50);
    let mut opened = 0;
    let mut goaway_done = false;
    for step in 0..400_000 {
        if Some(step) == goaway_at {
            let ep = if goaway_by_agent {
                &mut sim.agent
            } else {
                &mut sim.engine
            };
            ep.conn.go_away().unwrap();
            goaway_done = true;
        }
        let may_open = opened < streams && !goaway_done && !sim.engine.goaway_seen;
        if may_open && sim.rng.chance(20) {
            sim.engine.open(&mut sim.ledger, &mut sim.rng).unwrap();
            opened += 1;
        }
        sim.step();
        let all_opened = opened == streams || goaway_done || sim.engine.goaway_seen;
        if all_opened && sim.quiet() {
            // Flush whatever is left (FINs of a drained side, last window updates), and take the
            // events that calls outside input handling queued (a drain can complete in one).
            sim.flush();
            sim.engine.drain_events(&mut sim.ledger, &mut sim.rng, seed);
            sim.agent.drain_events(&mut sim.ledger, &mut sim.rng, seed);
            sim.check_complete();
            for flow in sim.ledger.flows.values() {
                if flow.aborted {
                    cov.aborted_flows += 1;
                } else {
                    cov.complete_flows += 1;
                    cov.largest_flow = cov.largest_flow.max(flow.received);
                }
                cov.bytes += flow.received;
            }
            cov.writables += sim.engine.writables + sim.agent.writables;
            cov.zero_copy_sent += sim.engine.zero_copy_sent + sim.agent.zero_copy_sent;
            cov.in_place_bytes += sim.in_place_bytes;
            cov.partial_writes += sim.partial_writes;
            cov.pongs += sim.engine.pongs.len() + sim.agent.pongs.len();
            cov.drains += usize::from(goaway_done);
            if goaway_done {
                assert_eq!(sim.engine.closed, Some(CloseReason::Drained), "seed {seed}");
                assert_eq!(sim.agent.closed, Some(CloseReason::Drained), "seed {seed}");
            } else {
                assert_eq!(sim.engine.closed, None, "seed {seed}");
                assert_eq!(sim.agent.closed, None, "seed {seed}");
            }
            let taken = |p: &mut Pipe| p.record.take().unwrap_or_default();
            return (taken(&mut sim.to_agent), taken(&mut sim.to_engine));
        }
    }
    panic!(
        "seed {seed}: no progress; engine streams {:?}, agent streams {:?}",
        sim.engine.streams, sim.agent.streams
    );
}

// ---------------------------------------------------------------------------------------------
// Simulations
// ---------------------------------------------------------------------------------------------

#[test]
fn random_streams_deliver_every_byte_in_order() {
    let mut cov = Coverage::default();
    for seed in 0..seeds(60) {
        run_random(seed, false, false, &mut cov);
    }
    eprintln!("{cov:?}");
    assert!(
        cov.complete_flows > 10 * cov.aborted_flows.max(1) / 4,
        "{cov:?}"
    );
    assert!(
        cov.largest_flow > 2 * u64::from(INITIAL_STREAM_WINDOW),
        "{cov:?}"
    );
    assert!(
        cov.writables > 100 && cov.pongs > 10 && cov.drains > 3,
        "{cov:?}"
    );
    // The zero-copy paths carried a good share of the verified bytes.
    assert!(
        cov.zero_copy_sent > cov.bytes / 5 && cov.in_place_bytes > cov.bytes / 5,
        "{cov:?}"
    );
    assert!(cov.partial_writes > 100, "{cov:?}");
}

#[test]
fn many_small_random_scenarios() {
    let mut cov = Coverage::default();
    for seed in 0..seeds(60) * 10 {
        run_random(1_000_000 + seed, false, true, &mut cov);
    }
    eprintln!("{cov:?}");
    assert!(
        cov.complete_flows > 100 && cov.aborted_flows > 10 && cov.drains > 10,
        "{cov:?}"
    );
}

/// Opens `n` streams from the engine and accepts them on the agent.
fn open_accepted(sim: &mut Sim, n: usize) -> Vec<StreamId> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let id = sim.engine.open(&mut sim.ledger, &mut sim.rng).unwrap();
        ids.push(StreamId::new(id).unwrap());
    }
    sim.flush();
    for &id in &ids {
        sim.agent.conn.open_result(id, Ok(())).unwrap();
    }
    sim.flush();
    ids
}

/// Bulk transfer engine → agent with pattern data, remembering progress across calls.
#[derive(Default)]
struct Bulk {
    sent: HashMap<u32, u64>,
    received: HashMap<u32, u64>,
}

impl Bulk {
    /// The engine sends on each of `ids` (16 KiB writes, up to `goal` bytes per stream) as
    /// credit allows; the agent reads every stream not in `stalled`; stops when `done`.
    fn run(
        &mut self,
        sim: &mut Sim,
        ids: &[StreamId],
        stalled: &[StreamId],
        goal: u64,
        done: impl Fn(&Bulk) -> bool,
    ) {
        let mut buf = vec![0u8; 64 * 1024];
        for _ in 0..200_000 {
            for &id in ids {
                let s = self.sent.entry(id.get()).or_default();
                if *s < goal {
                    let chunk = source(0, id.get(), *s, (goal - *s).min(16 * 1024) as usize);
                    *s += sim.engine.conn.send(id, chunk).unwrap() as u64;
                }
            }
            sim.transmit();
            sim.deliver();
            for &id in ids {
                if stalled.contains(&id) {
                    continue;
                }
                let r = self.received.entry(id.get()).or_default();
                loop {
                    let n = sim.agent.conn.recv(id, &mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    verify(0, id.get(), *r, &buf[..n], sim.seed);
                    *r += n as u64;
                }
            }
            if done(self) {
                return;
            }
        }
        panic!(
            "seed {}: bulk transfer did not finish: {:?}",
            sim.seed, self.received
        );
    }

    fn received(&self, id: StreamId) -> u64 {
        self.received.get(&id.get()).copied().unwrap_or(0)
    }
}

#[test]
fn stalled_reader_stalls_only_its_stream_then_recovers() {
    for seed in 0..seeds(60) / 10 + 1 {
        let mut sim = Sim::new(seed, Config::default());
        let ids = open_accepted(&mut sim, 2);
        let (slow, fast) = (ids[0], ids[1]);
        let goal = 4 * 1024 * 1024;
        let mut bulk = Bulk::default();
        // The fast stream moves 4 MiB while the slow one's reader does nothing.
        bulk.run(&mut sim, &ids, &[slow], goal, |b| b.received(fast) == goal);
        assert_eq!(
            sim.agent.conn.read_buf(slow).unwrap().len(),
            INITIAL_STREAM_WINDOW as usize
        );
        assert_eq!(bulk.sent[&slow.get()], u64::from(INITIAL_STREAM_WINDOW));
        assert_eq!(sim.engine.conn.send_capacity(slow).unwrap(), 0);
        // The reader resumes: the slow stream catches up.
        bulk.run(&mut sim, &ids, &[], goal, |b| b.received(slow) == goal);
    }
}

#[test]
fn tunnel_window_leaves_room_for_a_flowing_stream_beside_63_stalled_ones() {
    let mut sim = Sim::new(7, Config::default());
    let stalled_count = (CONN_WINDOW / INITIAL_STREAM_WINDOW) as usize - 1;
    let ids = open_accepted(&mut sim, stalled_count + 1);
    let (stalled, fast) = (&ids[..stalled_count], ids[stalled_count]);
    let window = u64::from(INITIAL_STREAM_WINDOW);
    let mut bulk = Bulk::default();
    // Fill every stalled stream to its window first ...
    bulk.run(&mut sim, stalled, stalled, window, |b| {
        stalled
            .iter()
            .all(|id| b.sent.get(&id.get()) == Some(&window))
    });
    sim.flush();
    // ... then the flowing stream still moves 8 MiB through the quarter MiB of tunnel window
    // left.
    let goal = 8 * 1024 * 1024;
    bulk.run(&mut sim, &ids, stalled, goal, |b| b.received(fast) == goal);
    for &id in stalled {
        assert_eq!(
            sim.agent.conn.read_buf(id).unwrap().len(),
            INITIAL_STREAM_WINDOW as usize
        );
    }
}

#[test]
fn goaway_refuses_new_streams_and_lets_old_ones_finish() {
    for seed in 0..seeds(60) / 4 + 1 {
        let mut sim = Sim::new(seed, Config::default());
        sim.engine.max_stream_bytes = 100_000;
        sim.agent.max_stream_bytes = 100_000;
        sim.agent.refuse_percent = 0;
        let old: Vec<u32> = (0..3)
            .map(|_| sim.engine.open(&mut sim.ledger, &mut sim.rng).unwrap())
            .collect();
        sim.flush();
        // The agent drains while a new OPEN (and its data) is already on the wire.
        sim.agent.conn.go_away().unwrap();
        let late = sim.engine.open(&mut sim.ledger, &mut sim.rng).unwrap();
        let late_data = source(0, late, 0, 1000);
        sim.engine
            .conn
            .send(StreamId::new(late).unwrap(), late_data)
            .unwrap();
        sim.engine.streams.get_mut(&late).unwrap().sent = 1000;
        sim.ledger.flow(0, late).sent = 1000;
        for _ in 0..200_000 {
            sim.step();
            if sim.quiet() {
                break;
            }
        }
        assert!(sim.quiet(), "seed {seed}: did not drain");
        sim.check_complete();
        assert!(sim.engine.goaway_seen);
        // The late stream was refused; the old ones finished (unless the app reset them).
        assert!(sim.ledger.flows[&(0, late)].aborted, "seed {seed}");
        for id in old {
            let flow = &sim.ledger.flows[&(0, id)];
            assert!(flow.aborted || flow.fin_received, "seed {seed}: {id}");
        }
        assert!(matches!(
            sim.engine.conn.open_stream(b""),
            Err(MuxError::Closed(_))
        ));
        assert_eq!(sim.engine.closed, Some(CloseReason::Drained));
        assert_eq!(sim.agent.closed, Some(CloseReason::Drained));
    }
}

#[test]
fn engine_goaway_blocks_opens_on_both_sides() {
    let now = Instant::now();
    let mut engine = Conn::new(Role::Server, Config::default(), now);
    let mut agent = Conn::new(Role::Client, Config::default(), now);
    let id = engine.open_stream(b"x").unwrap();
    engine.go_away().unwrap();
    assert_eq!(engine.open_stream(b"y"), Err(MuxError::GoingAway));
    let mut wire = Vec::new();
    engine.poll_transmit(&mut wire);
    agent.handle_input(&wire, now).unwrap();
    let events: Vec<Event> = std::iter::from_fn(|| agent.poll_event()).collect();
    assert_eq!(events[1], Event::GoAway { last_stream_id: 0 });
    assert_eq!(agent.open_stream(b"z"), Err(MuxError::GoingAway));
    agent.reset(id, ErrorCode::CANCEL).unwrap();
    assert_eq!(agent.close_reason(), Some(&CloseReason::Drained));
}

// ---------------------------------------------------------------------------------------------
// Keepalive and the dead-peer timeout, on a virtual clock
// ---------------------------------------------------------------------------------------------

#[test]
fn keepalive_pings_are_answered_and_a_silent_peer_is_declared_dead() {
    let config = Config {
        keepalive_interval: Duration::from_secs(1),
        dead_peer_timeout: Duration::from_secs(5),
    };
    let latency = Duration::from_millis(40);
    let start = Instant::now();
    let mut now = start;
    let mut engine = Conn::new(Role::Server, config, now);
    let mut agent = Conn::new(Role::Client, config, now);
    // In flight: (arrival time, to agent?, bytes).
    let mut wire: Vec<(Instant, bool, Vec<u8>)> = Vec::new();
    let mut engine_pongs = Vec::new();
    let mut cut = false;
    let mut engine_heard = start;
    let mut closed_at = None;
    for _ in 0..1000 {
        // Next thing to happen: a timer or an arrival. Arrivals are handled before timers.
        let next_arrival = wire.iter().map(|w| w.0).min();
        let next = [engine.poll_timeout(), agent.poll_timeout(), next_arrival]
            .into_iter()
            .flatten()
            .min();
        let Some(next) = next else { break };
        now = now.max(next);
        let (due, later): (Vec<_>, Vec<_>) = wire.drain(..).partition(|w| w.0 <= now);
        wire = later;
        for (_, to_agent, bytes) in due {
            if !to_agent && !engine.is_closed() {
                engine_heard = now;
            }
            let (conn, name) = if to_agent {
                (&mut agent, "agent")
            } else {
                (&mut engine, "engine")
            };
            if let Err(err) = conn.handle_input(&bytes, now) {
                assert!(matches!(err, MuxError::Closed(_)), "{name}: {err}");
            }
        }
        engine.handle_timeout(now);
        agent.handle_timeout(now);
        while let Some(ev) = engine.poll_event() {
            match ev {
                Event::Pong { rtt } => engine_pongs.push(rtt),
                Event::Closed { reason } => {
                    assert_eq!(reason, CloseReason::Timeout);
                    closed_at = Some(now);
                }
                other => panic!("engine: {other:?}"),
            }
        }
        while let Some(ev) = agent.poll_event() {
            match ev {
                Event::Pong { rtt } => assert_eq!(rtt, 2 * latency),
                Event::Closed { reason } => {
                    assert_eq!(
                        reason,
                        CloseReason::PeerError {
                            code: ErrorCode::TIMEOUT,
                            message: "dead peer timeout".into()
                        }
                    );
                }
                other => panic!("agent: {other:?}"),
            }
        }
        for (conn, to_agent) in [(&mut engine, true), (&mut agent, false)] {
            let mut out = Vec::new();
            // Always drain the core; once cut, the agent's bytes are lost on the way.
            if conn.poll_transmit(&mut out) > 0 && (to_agent || !cut) {
                wire.push((now + latency, to_agent, out));
            }
        }
        // After ten seconds the agent's bytes stop arriving (its host hung).
        if !cut && now >= start + Duration::from_secs(10) {
            cut = true;
        }
        if agent.is_closed() {
            break;
        }
    }
    assert!(engine_pongs.len() >= 5, "pongs: {engine_pongs:?}");
    assert!(engine_pongs.iter().all(|&rtt| rtt == 2 * latency));
    // Declared dead exactly one dead-peer timeout after the last byte it heard.
    let closed_at = closed_at.expect("engine declared the agent dead");
    assert!(engine_heard >= start + Duration::from_secs(10));
    assert_eq!(closed_at, engine_heard + config.dead_peer_timeout);
    assert!(
        agent.is_closed(),
        "the agent got the engine's GOAWAY(TIMEOUT)"
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile input
// ---------------------------------------------------------------------------------------------

/// Mostly well-formed frames addressed to an endpoint of `role`, each with a small chance of one
/// defect, so that random input gets past the header checks into the stream state machine.
struct FrameGen {
    /// Next id the (imagined) peer opens.
    next_open: u32,
    /// Ids the peer opened so far, and ids the endpoint under test opened.
    opened: Vec<u32>,
    local: Vec<u32>,
    /// Local ids the generator has sent an OPEN_RESULT for.
    answered: Vec<u32>,
}

impl FrameGen {
    /// `local_opens`: streams the endpoint under test opened before the input starts.
    fn new(to: Role, local_opens: u32) -> FrameGen {
        // The peer of an agent opens odd ids, the peer of an engine even ones.
        let first = to.first_stream_id();
        FrameGen {
            next_open: if to == Role::Client { 1 } else { 2 },
            opened: Vec::new(),
            local: (0..local_opens).map(|i| first + 2 * i).collect(),
            answered: Vec::new(),
        }
    }

    fn frame(&mut self, rng: &mut Rng, out: &mut Vec<u8>) {
        let live: Vec<u32> = self.opened.iter().chain(&self.answered).copied().collect();
        // Weighted: mostly data and flow control, little GOAWAY (it ends the interesting part).
        let pick = rng.below(100);
        let mut kind = [
            (35, 0u8),
            (50, 1),
            (60, 2),
            (75, 3),
            (83, 4),
            (96, 5),
            (100, 6),
        ]
        .iter()
        .find(|&&(upto, _)| pick < upto)
        .map_or(0, |&(_, k)| k);
        if (kind == FrameType::OpenResult as u8 && self.local.is_empty())
            || (live.is_empty() && rng.chance(70))
        {
            kind = FrameType::Open as u8;
        }
        let mut payload = Vec::new();
        let mut flags = 0u8;
        let mut stream = if !live.is_empty() && rng.chance(90) {
            live[rng.range(0, live.len() - 1)]
        } else {
            rng.range(1, self.next_open as usize + 2) as u32
        };
        match FrameType::from_u8(kind).unwrap() {
            FrameType::Data => {
                let len = rng.range(0, 3000);
                payload = rng.bytes(len);
                flags = u8::from(rng.chance(10));
            }
            FrameType::Open => {
                stream = self.next_open;
                self.opened.push(stream);
                self.next_open += 2;
                let len = rng.range(0, 100);
                payload = rng.bytes(len);
            }
            FrameType::OpenResult => {
                stream = self.local[rng.range(0, self.local.len() - 1)];
                self.answered.push(stream);
                flags = u8::from(rng.chance(80));
                if flags == 0 {
                    payload = b"refused".to_vec();
                }
            }
            FrameType::WindowUpdate => {
                if rng.chance(30) {
                    stream = 0;
                }
                payload = (rng.range(1, 1 << 20) as u32).to_be_bytes().to_vec();
            }
            FrameType::Reset => payload = 8u32.to_be_bytes().to_vec(),
            FrameType::Ping => {
                stream = 0;
                flags = u8::from(rng.chance(50));
                payload = rng.bytes(8);
            }
            FrameType::GoAway => {
                stream = 0;
                payload = (rng.below(8) as u32).to_be_bytes().to_vec();
                payload.extend_from_slice(&[0, 0, 0, u8::from(rng.chance(20))]);
            }
        }
        let mut head = [0u8; HEADER_LEN];
        head[..4].copy_from_slice(&(payload.len() as u32).to_be_bytes());
        head[4] = kind;
        head[5] = flags;
        head[8..].copy_from_slice(&stream.to_be_bytes());
        // One defect now and then.
        if rng.chance(3) {
            match rng.below(6) {
                0 => head[4] = rng.range(7, 255) as u8,
                1 => head[5] = rng.next() as u8,
                2 => head[7] = 1,
                3 => head[..4].copy_from_slice(&(rng.next() as u32).to_be_bytes()),
                4 => head[8..].copy_from_slice(&(rng.next() as u32).to_be_bytes()),
                _ => payload.truncate(payload.len() / 2),
            }
        }
        out.extend_from_slice(&head);
        out.extend_from_slice(&payload);
    }
}

/// How a hostile input ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// All bytes accepted.
    Accepted,
    /// A protocol error closed the tunnel.
    Rejected,
    /// The tunnel closed otherwise (peer GOAWAY with an error, drain, timeout).
    Closed,
}

/// Feeds `input` to `conn` in random chunks while acting as a busy application; panics only if
/// the core does something it must not (a panic inside it, a protocol error without a close).
fn feed_hostile(conn: &mut Conn, input: &[u8], rng: &mut Rng, now: Instant) -> Outcome {
    let mut done = 0;
    let mut buf = [0u8; 4096];
    while done < input.len() {
        let mut n = rng.range(1, 3000).min(input.len() - done);
        let result = if rng.chance(50) {
            let buf = conn.input_buf();
            n = n.min(buf.len());
            buf[..n].copy_from_slice(&input[done..done + n]);
            conn.input_commit(n, now)
        } else {
            conn.handle_input(&input[done..done + n], now)
        };
        match result {
            Ok(()) => {}
            Err(MuxError::Protocol(err)) => {
                if std::env::var_os("MUX_SIM_DEBUG").is_some() {
                    eprintln!("rejected: {err}");
                }
                assert!(conn.is_closed());
                let events: Vec<Event> = std::iter::from_fn(|| conn.poll_event()).collect();
                assert_eq!(
                    events.last(),
                    Some(&Event::Closed {
                        reason: CloseReason::Protocol(err)
                    })
                );
                let mut out = Vec::new();
                conn.poll_transmit(&mut out);
                assert!(out.len() >= HEADER_LEN && out[4] == FrameType::GoAway as u8);
                return Outcome::Rejected;
            }
            Err(MuxError::Closed(_)) => return Outcome::Closed,
            Err(other) => panic!("handle_input returned a local error: {other}"),
        }
        done += n;
        while let Some(ev) = conn.poll_event() {
            match ev {
                Event::StreamOpened { id, .. } => {
                    let answer = if rng.chance(80) { Ok(()) } else { Err("no") };
                    // The stream may already be gone (reset later in the same input).
                    let _ = conn.open_result(id, answer);
                }
                Event::Readable { id } => {
                    let _ = conn.recv(id, &mut buf[..rng.range(0, 4096)]);
                }
                Event::OpenResult { id, result: Ok(()) } | Event::Writable { id } => {
                    let _ = conn.send(id, &buf[..rng.range(0, 4096)]);
                    if rng.chance(20) {
                        let _ = conn.finish(id);
                    }
                }
                Event::Closed { .. } => return Outcome::Closed,
                _ => {}
            }
        }
        if rng.chance(20) {
            let mut out = Vec::new();
            conn.poll_transmit(&mut out);
        }
        if rng.chance(5) {
            conn.handle_timeout(now + Duration::from_secs(rng.below(100)));
        }
    }
    Outcome::Accepted
}

fn tally(outcomes: &[Outcome]) -> [usize; 3] {
    let count = |o| outcomes.iter().filter(|&&x| x == o).count();
    [
        count(Outcome::Accepted),
        count(Outcome::Rejected),
        count(Outcome::Closed),
    ]
}

#[test]
fn random_garbage_never_panics() {
    let now = Instant::now();
    let mut outcomes = Vec::new();
    for seed in 0..seeds(60) * 50 {
        let mut rng = Rng::new(seed);
        let role = if seed % 2 == 0 {
            Role::Server
        } else {
            Role::Client
        };
        let mut conn = Conn::new(role, Config::default(), now);
        let local_opens = if role == Role::Server {
            rng.below(6) as u32
        } else {
            0
        };
        for _ in 0..local_opens {
            conn.open_stream(b"dial").unwrap();
        }
        let mut input = Vec::new();
        if rng.chance(10) {
            let len = rng.range(0, 400);
            input = rng.bytes(len);
        } else {
            let mut frames = FrameGen::new(role, local_opens);
            for _ in 0..rng.range(1, 30) {
                frames.frame(&mut rng, &mut input);
            }
        }
        outcomes.push(feed_hostile(&mut conn, &input, &mut rng, now));
    }
    // Both ends of the state machine were reached: plenty rejected, and some accepted whole.
    let [accepted, rejected, closed] = tally(&outcomes);
    eprintln!("garbage: accepted {accepted}, rejected {rejected}, closed {closed}");
    assert!(accepted > outcomes.len() / 20 && rejected > outcomes.len() / 4);
}

#[test]
fn truncated_and_mutated_traffic_never_panics() {
    let now = Instant::now();
    // Record real traffic in both directions from a few small scenarios.
    let mut transcripts = Vec::new();
    for seed in 0..6 {
        let (to_agent, to_engine) =
            run_random(2_000_000 + seed, true, true, &mut Coverage::default());
        transcripts.push((Role::Client, to_agent));
        transcripts.push((Role::Server, to_engine));
    }
    // Unmutated, each direction is accepted by a fresh endpoint of the receiving role.
    let prepare = |role: Role, transcript: &[u8]| {
        let mut conn = Conn::new(role, Config::default(), now);
        if role == Role::Server {
            // Reopen as many streams as the engine did, so OPEN_RESULTs find them.
            for _ in 0..max_stream_id(transcript).div_ceil(2) {
                conn.open_stream(b"").unwrap();
            }
        }
        conn
    };
    for (role, t) in &transcripts {
        let mut conn = prepare(*role, t);
        conn.handle_input(t, now).unwrap();
    }
    let mut outcomes = Vec::new();
    for seed in 0..seeds(60) * 30 {
        let mut rng = Rng::new(seed);
        let (role, original) = &transcripts[rng.below(transcripts.len() as u64) as usize];
        let mut t = original.clone();
        for _ in 0..rng.range(1, 4) {
            mutate(&mut t, &mut rng);
        }
        let mut conn = prepare(*role, original);
        outcomes.push(feed_hostile(&mut conn, &t, &mut rng, now));
    }
    let [accepted, rejected, closed] = tally(&outcomes);
    eprintln!("mutated: accepted {accepted}, rejected {rejected}, closed {closed}");
    assert!(accepted > outcomes.len() / 20 && rejected > outcomes.len() / 4);
}

/// Highest stream id named by any frame of a well-formed byte stream.
fn max_stream_id(mut bytes: &[u8]) -> u32 {
    let mut max = 0;
    while bytes.len() >= HEADER_LEN {
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        max = max.max(u32::from_be_bytes(bytes[8..12].try_into().unwrap()));
        bytes = &bytes[(HEADER_LEN + len).min(bytes.len())..];
    }
    max
}

fn mutate(t: &mut Vec<u8>, rng: &mut Rng) {
    if t.is_empty() {
        t.extend(rng.bytes(20));
        return;
    }
    let at = rng.range(0, t.len() - 1);
    match rng.below(7) {
        0 => t[at] ^= 1 << rng.below(8),
        1 => t[at] = rng.next() as u8,
        2 => t.truncate(at),
        3 => {
            let end = rng.range(at, t.len());
            t.drain(at..end);
        }
        4 => {
            let end = rng.range(at, t.len().min(at + 5000));
            let copy = t[at..end].to_vec();
            let to = rng.range(0, t.len());
            t.splice(to..to, copy);
        }
        5 => {
            let len = rng.range(1, 40);
            let junk = rng.bytes(len);
            t.splice(at..at, junk);
        }
        _ => {
            // A valid frame spliced into the middle of the stream.
            let mut frame = Vec::new();
            match rng.below(4) {
                0 => encode::window_update(
                    &mut frame,
                    rng.range(0, 9) as u32,
                    rng.range(1, 1 << 20) as u32,
                ),
                1 => encode::reset(&mut frame, rng.range(1, 9) as u32, ErrorCode::CANCEL),
                2 => encode::data(
                    &mut frame,
                    rng.range(1, 9) as u32,
                    rng.chance(50),
                    &rng.bytes(100),
                ),
                _ => encode::go_away(&mut frame, rng.range(0, 9) as u32, ErrorCode::NO_ERROR, ""),
            }
            t.splice(at..at, frame);
        }
    }
}
