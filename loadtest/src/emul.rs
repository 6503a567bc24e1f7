//! Emulated agents for the `agents` and `rotation` scenarios: each joins once with the token
//! (its own host id and certificate, so the engine keeps one tunnel per emulated host), then
//! holds one tunnel with the real protocol (TLS with ALPN `jaunt-tunnel`, the engine's
//! TunnelHello, an AgentHello, then the sans-IO mux core of `jaunt_engine::mux` as
//! `Role::Client`, answering keepalives, reading the policies the engine pushes
//! (`jaunt-policy/1`) and refusing every other stream). On loss it redials on the real agent's
//! schedule (`jaunt_agent::backoff`: capped exponential with full jitter). The tunnels run on a
//! few threads, each driving its share with nonblocking sockets on one epoll set (a thread per
//! tunnel ran out of memory mappings near 16,000 threads): lighter than a `jaunt agent` process
//! (no glommio executors, no services), the same wire behaviour for what the scenarios measure.
//!
//! With `follow` (the `rotation` scenario) each agent also runs the real agent's policy poll
//! (`jaunt agent`'s `PolicyPoller` in `control/src/agent_host/mod.rs`, the same requests): `GET
//! /v1/agent/policy[?confirmed=GENERATION]` with its host certificate every
//! `agent_host::policy_delay` (5 s, backing off on failures); a new version is compiled
//! (`ClusterPolicy::from_response`); a new CA generation is followed with the real agent's
//! `agent_host::apply_rotation` (the host CAs written to the profile's trust file, the host
//! certificate renewed when control says so, the tunnel's TLS rebuilt for the next dial) and
//! confirmed at once with a second fetch. The polls run on a few threads, each serving its share of the agents in turn.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use jaunt_agent::backoff::Backoff;
use jaunt_agent::BackoffConfig;
use jaunt_config::api::{AgentPolicyResponse, Certs, JoinRequest};
use jaunt_config::wire::agent_hello::AgentHello;
use jaunt_config::wire::dial::TunnelHello;
use jaunt_config::wire::shard_hint_alpn;
use jaunt_control::agent_host::{self, HostClient};
use jaunt_control::ca::LocalKeys;
use jaunt_control::client::{Client, Trust};
use jaunt_control::profile::{Profile, ProfileInfo};
use jaunt_engine::mux::{Config as MuxConfig, Conn as Mux, Event, Role, StreamId};
use jaunt_engine::tunnel::policy_push::POLICY_OPEN;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use crate::cluster::Spawned;
use crate::progress::Progress;

/// One joined emulated agent.
pub struct Identity {
    pub name: String,
    pub tls: Arc<ClientConfig>,
    /// Its data directory (the host profile is `agent_host::host_profile(dir)`, as for `jaunt
    /// agent --data-dir`).
    pub dir: PathBuf,
    /// The proxy it joined through.
    pub proxy: String,
}

/// Joins agent `name` with `token`, keeping its files under `dir` as `jaunt agent --data-dir
/// DIR` does.
pub fn join(
    proxy: &str,
    pin: &str,
    token: &str,
    name: &str,
    dir: &Path,
) -> anyhow::Result<Identity> {
    let client = Client::new(proxy, Trust::Pin(pin.to_string()), None)?;
    let keys = LocalKeys::generate()?;
    let certs: Certs = client
        .post_json(
            "/v1/join",
            &JoinRequest {
                token: token.to_string(),
                host_name: name.to_string(),
                tls_public_key: keys.tls_public_pem.clone(),
                ssh_public_key: keys.ssh_public_line(),
            },
        )
        .with_context(|| format!("joining {name}"))?;
    let profile = agent_host::host_profile(dir);
    let info = profile.save(proxy, &keys, &certs)?;
    Ok(Identity {
        name: name.to_string(),
        tls: tls_config(&profile, &info)?,
        dir: dir.to_path_buf(),
        proxy: proxy.to_string(),
    })
}

/// Joins `k` emulated agents `lt-emu-I` to `spawned` with a fresh `node` token (two threads;
/// `label` names the progress line), each with its data directory under the cluster's.
pub fn join_all(spawned: &Spawned, k: usize, label: &str) -> anyhow::Result<Vec<Identity>> {
    let token = spawned.token("node")?;
    let dir = spawned.dir.path().join("emulated");
    let progress = Progress::new(&format!("{label}: joining"), Some(k as u64));
    let next = AtomicUsize::new(0);
    let ids: Mutex<Vec<Identity>> = Mutex::new(Vec::new());
    let err: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= k {
                    break;
                }
                let name = format!("lt-emu-{i}");
                match join(
                    &spawned.public_addr,
                    &spawned.pin,
                    &token,
                    &name,
                    &dir.join(&name),
                ) {
                    Ok(id) => {
                        if let Ok(mut v) = ids.lock() {
                            v.push(id);
                        }
                        progress.add(1);
                    }
                    Err(e) => {
                        if let Ok(mut er) = err.lock() {
                            er.get_or_insert(e);
                        }
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = err.into_inner().ok().flatten() {
        return Err(e.context("joining the emulated agents"));
    }
    Ok(ids.into_inner().unwrap_or_default())
}

/// The tunnel's TLS from the profile as it is on disk (the real agent's `tls_config`).
fn tls_config(profile: &Profile, info: &ProfileInfo) -> anyhow::Result<Arc<ClientConfig>> {
    let (chain, key) = profile.tls_identity(&info.user)?;
    let roots = profile.host_ca()?;
    jaunt_agent::client_config(chain, key, &roots).map_err(|e| anyhow!("{e}"))
}

/// What the emulated agents share with the scenario.
#[derive(Default)]
pub struct Shared {
    pub stop: AtomicBool,
    /// Tunnels up right now.
    pub connected: AtomicUsize,
    /// (agent index, shard, when that tunnel came up), every time one did.
    pub ups: Mutex<Vec<(usize, usize, Instant)>>,
    /// Connections made (TCP connected, then a TLS handshake), including those that landed
    /// on another shard than asked and were closed.
    pub dials: AtomicUsize,
    /// Tunnels that came up with a resumed TLS session (a session ticket).
    pub resumed: AtomicUsize,
    /// Dials that landed on another shard than the one asked for (an engine that does not
    /// honour the hint) and were closed, as the real agent closes a duplicate.
    pub misplaced: AtomicUsize,
    /// When a tunnel that was up ended, every time one did.
    pub downs: Mutex<Vec<Instant>>,
    /// Policies the engine pushed over the tunnels and the agents read to the end.
    pub pushes: AtomicUsize,
    /// With `follow`: (agent index, CA generation, when control acknowledged the agent's
    /// `?confirmed=` of it), once per generation and agent.
    pub confirms: Mutex<Vec<(usize, String, Instant)>>,
    /// With `follow`: policy fetches that succeeded.
    pub fetches: AtomicUsize,
    /// With `follow`: policy fetches that failed.
    pub poll_errors: AtomicUsize,
    /// With `follow`: rotation phases an agent failed to follow (retried at its next poll).
    pub follow_errors: AtomicUsize,
    /// With `follow`: host certificates renewed because control asked (`renew_host_cert`).
    pub renewals: AtomicUsize,
    /// With `follow`: the first errors seen, for the report.
    pub first_errors: Mutex<Vec<String>>,
}

impl Shared {
    fn error(&self, what: String) {
        if let Ok(mut e) = self.first_errors.lock() {
            if e.len() < 5 {
                e.push(what);
            }
        }
    }
}

/// How many agents one policy-poll thread serves. Few: a thread serves its agents one after
/// the other, and a follow takes up to three requests (fetch, renewal, confirmation), so with
/// many per thread the harness, not the cluster, would stretch the agents' 5 s cadence.
const AGENTS_PER_POLL_THREAD: usize = 4;

/// Threads that drive the tunnels, each its share of them on one epoll set. A thread per
/// tunnel stopped near 16,000 (`vm.max_map_count`: two mappings per thread stack); a few
/// threads hold any number, and on this 2-core machine more would only take turns.
const TUNNEL_THREADS: usize = 4;

/// Starts the tunnels (on [`TUNNEL_THREADS`] threads) and with `follow` the policy-poll
/// threads; they run until `shared.stop`. With `shards` > 1 each agent holds one tunnel per
/// shard, as the real agent does: the tunnel for shard `s` asks for it (`jaunt-shard.<s>` after
/// `jaunt-tunnel`) and closes a connection that lands elsewhere. `shards` = 1: one tunnel per
/// agent, wherever it lands.
pub fn start(
    ids: Vec<Identity>,
    addr: SocketAddr,
    server_name: ServerName<'static>,
    shared: Arc<Shared>,
    follow: bool,
    shards: usize,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut handles = Vec::new();
    let k = ids.len();
    let threads = k.div_ceil(AGENTS_PER_POLL_THREAD).max(1);
    let mut followers: Vec<Vec<Follower>> = (0..threads).map(|_| Vec::new()).collect();
    let mut slots: Vec<Vec<Slot>> = (0..TUNNEL_THREADS).map(|_| Vec::new()).collect();
    let started = Instant::now();
    let mut n = 0usize;
    for (i, id) in ids.into_iter().enumerate() {
        let hello: Arc<[u8]> = AgentHello::new(&id.name, Default::default(), Vec::new())
            .encode()
            .map_err(|e| anyhow!("agent hello: {e}"))?
            .into();
        let tls = Arc::new(Mutex::new(id.tls.clone()));
        if follow {
            // Spread over one poll interval, as agents started at different times are.
            let offset = agent_host::policy_delay(0).mul_f64(i as f64 / k.max(1) as f64);
            followers[i % threads].push(Follower {
                i,
                name: id.name.clone(),
                host: HostClient::load(&id.proxy, &id.dir)
                    .with_context(|| format!("{}'s host identity", id.name))?,
                tls: tls.clone(),
                current: None,
                confirmed: String::new(),
                acknowledged: String::new(),
                failures: 0,
                due: started + offset,
            });
        }
        for shard in 0..shards.max(1) {
            slots[n % TUNNEL_THREADS].push(Slot {
                i,
                want: (shards > 1).then_some(shard),
                tls: tls.clone(),
                hello: hello.clone(),
                backoff: Backoff::new(BackoffConfig::default(), seed(n)),
                misplaced_in_row: 0,
                hinted: None,
                started,
                state: State::Waiting,
                due: None,
            });
            n += 1;
        }
    }
    for (t, mine) in slots.into_iter().enumerate() {
        if mine.is_empty() {
            continue;
        }
        let epoll = sys::Epoll::new().context("epoll_create1 for the emulated agents")?;
        let mut worker = Worker {
            epoll,
            addr,
            name: server_name.clone(),
            shared: shared.clone(),
            timers: BinaryHeap::new(),
            buf: vec![0u8; 16 * 1024],
            plain: Vec::new(),
            out: Vec::new(),
        };
        let h = std::thread::Builder::new()
            .name(format!("emu-tunnels-{t}"))
            .spawn(move || worker.run(mine))?;
        handles.push(h);
    }
    for (t, mut mine) in followers.into_iter().enumerate() {
        if mine.is_empty() {
            continue;
        }
        let shared = shared.clone();
        let h = std::thread::Builder::new()
            .name(format!("emu-poll-{t}"))
            .stack_size(512 * 1024)
            .spawn(move || poll_loop(&mut mine, &shared))?;
        handles.push(h);
    }
    Ok(handles)
}

/// Dials in a row that may land on another shard than asked before an emulated agent backs off
/// (an engine that ignores the hint: about what the real agent's round allows for 8 shards).
const MISPLACED_DIALS_BEFORE_BACKOFF: usize = 16;

/// How long a dial may take to connect, and then to bring the engine's tunnel hello (the
/// blocking emulation's connect and read timeouts).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest a tunnel thread waits before it looks at `shared.stop` again.
const MAX_WAIT: Duration = Duration::from_millis(100);

fn seed(i: usize) -> u64 {
    jaunt_agent::backoff::seed() ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The shard count of the engine at `addr`, from the tunnel hello of one dial as `id` (closed
/// before the agent hello, so the engine counts it as a duplicate and registers nothing).
pub fn probe_shards(
    id: &Identity,
    addr: SocketAddr,
    server_name: &ServerName<'static>,
) -> anyhow::Result<usize> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let conn = ClientConnection::new(id.tls.clone(), server_name.clone())?;
    let mut s = StreamOwned::new(conn, tcp);
    let mut buf = vec![0u8; 4096];
    let mut pending = Vec::new();
    loop {
        if let Some((hello, _)) = TunnelHello::parse(&pending).map_err(|e| anyhow!("{e}"))? {
            s.conn.send_close_notify();
            let _ = s.flush();
            return Ok(hello.shards);
        }
        match s.read(&mut buf)? {
            0 => bail!("the engine closed before its tunnel hello"),
            n => pending.extend_from_slice(&buf[..n]),
        }
    }
}

/// One tunnel of one emulated agent (one per engine shard): what the real agent's tunnel loop
/// keeps across dials.
struct Slot {
    /// The agent's index.
    i: usize,
    /// The shard it asks for (`None`: wherever it lands).
    want: Option<usize>,
    /// The agent's TLS in force now: a followed rotation replaces it for the next dial (as the
    /// real agent's `ReplaceTls`), never the tunnel that is up.
    tls: Arc<Mutex<Arc<ClientConfig>>>,
    /// The agent's encoded AgentHello.
    hello: Arc<[u8]>,
    backoff: Backoff,
    misplaced_in_row: usize,
    /// The TLS configuration in force and this tunnel's hinted copy of it, with its own
    /// session cache.
    hinted: Option<(Arc<ClientConfig>, Arc<ClientConfig>)>,
    /// When the current (or last) dial started.
    started: Instant,
    state: State,
    /// This tunnel's one timer: the backoff is over, the connect or the hello is late, or the
    /// mux's next timer (keepalives).
    due: Option<Instant>,
}

enum State {
    /// Backing off until `due` (or dialing at once when `due` is now).
    Waiting,
    /// A nonblocking connect in progress, with the TLS configuration to dial with.
    Connecting(TcpStream, Arc<ClientConfig>),
    /// TLS handshake and the engine's tunnel hello (`pending` holds what arrived of it).
    Hello(TcpStream, Box<ClientConnection>, Vec<u8>),
    /// The tunnel is up.
    Up(Box<Up>),
}

struct Up {
    tcp: TcpStream,
    tls: ClientConnection,
    mux: Mux,
    /// Policy pushes being read (`jaunt-policy/1`): read to the end, then our FIN, as the real
    /// agent's `receive_push` (which also compiles it; the poll does that here).
    pushes: HashSet<StreamId>,
}

/// One tunnel thread: nonblocking sockets on an edge-triggered epoll set, and a timer heap.
struct Worker {
    epoll: sys::Epoll,
    addr: SocketAddr,
    name: ServerName<'static>,
    shared: Arc<Shared>,
    /// (when, slot); stale entries (the slot's `due` moved) are skipped.
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    buf: Vec<u8>,
    plain: Vec<u8>,
    out: Vec<u8>,
}

impl Worker {
    fn run(&mut self, mut slots: Vec<Slot>) {
        // Every tunnel dials at once, as the agents start.
        let now = Instant::now();
        for (k, slot) in slots.iter_mut().enumerate() {
            self.set_due(k, slot, Some(now));
        }
        let mut ready = Vec::new();
        while !self.shared.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            while let Some(&Reverse((t, k))) = self.timers.peek() {
                if t > now {
                    break;
                }
                self.timers.pop();
                let Some(slot) = slots.get_mut(k) else {
                    continue;
                };
                if slot.due != Some(t) {
                    continue;
                }
                slot.due = None;
                self.on_timer(k, slot, now);
            }
            let wait = self.timers.peek().map_or(MAX_WAIT, |r| {
                r.0 .0
                    .saturating_duration_since(Instant::now())
                    .min(MAX_WAIT)
            });
            if let Err(e) = self.epoll.wait(&mut ready, wait) {
                self.shared
                    .error(format!("emulated agents: epoll_wait: {e}"));
                break;
            }
            for &k in &ready {
                if let Some(slot) = slots.get_mut(k) {
                    self.on_io(k, slot);
                }
            }
        }
        for slot in &mut slots {
            if matches!(slot.state, State::Up(_)) {
                self.shared.connected.fetch_sub(1, Ordering::SeqCst);
                if let Ok(mut downs) = self.shared.downs.lock() {
                    downs.push(Instant::now());
                }
            }
            slot.state = State::Waiting;
        }
    }

    fn set_due(&mut self, k: usize, slot: &mut Slot, due: Option<Instant>) {
        if slot.due == due {
            return;
        }
        slot.due = due;
        if let Some(t) = due {
            self.timers.push(Reverse((t, k)));
        }
    }

    fn on_timer(&mut self, k: usize, slot: &mut Slot, now: Instant) {
        match &mut slot.state {
            State::Waiting => self.dial(k, slot),
            // The connect or the tunnel hello took too long.
            State::Connecting(..) | State::Hello(..) => self.failed(k, slot),
            State::Up(up) => {
                up.mux.handle_timeout(now);
                self.pump(k, slot);
            }
        }
    }

    fn on_io(&mut self, k: usize, slot: &mut Slot) {
        match std::mem::replace(&mut slot.state, State::Waiting) {
            State::Waiting => {}
            State::Connecting(tcp, config) => {
                if !matches!(tcp.take_error(), Ok(None)) {
                    return self.failed(k, slot);
                }
                if tcp.peer_addr().is_err() {
                    // Not connected yet (an early wake-up).
                    slot.state = State::Connecting(tcp, config);
                    return;
                }
                self.shared.dials.fetch_add(1, Ordering::Relaxed);
                let _ = tcp.set_nodelay(true);
                let Ok(tls) = ClientConnection::new(config, self.name.clone()) else {
                    return self.failed(k, slot);
                };
                slot.state = State::Hello(tcp, Box::new(tls), Vec::new());
                self.set_due(k, slot, Some(Instant::now() + HELLO_TIMEOUT));
                self.hello(k, slot);
            }
            state @ State::Hello(..) => {
                slot.state = state;
                self.hello(k, slot);
            }
            state @ State::Up(_) => {
                slot.state = state;
                self.pump(k, slot);
            }
        }
    }

    /// A new dial: a nonblocking connect, its completion reported by epoll.
    fn dial(&mut self, k: usize, slot: &mut Slot) {
        slot.started = Instant::now();
        let mut config = match slot.tls.lock() {
            Ok(t) => t.clone(),
            Err(p) => p.into_inner().clone(),
        };
        if let Some(shard) = slot.want {
            // As the real agent (`jaunt_agent`'s `dial::asking_for_shard`): the hint, and a
            // session cache of this tunnel's own, made once per TLS configuration, so each
            // tunnel's redial after an engine restart resumes with its own last ticket.
            let made = slot
                .hinted
                .as_ref()
                .filter(|(base, _)| Arc::ptr_eq(base, &config))
                .map(|(_, hinted)| hinted.clone());
            config = match made {
                Some(hinted) => hinted,
                None => {
                    let mut c = ClientConfig::clone(&config);
                    c.alpn_protocols.push(shard_hint_alpn(shard));
                    c.resumption = rustls::client::Resumption::in_memory_sessions(4);
                    let hinted = Arc::new(c);
                    slot.hinted = Some((config, hinted.clone()));
                    hinted
                }
            };
        }
        let tcp = match sys::connect_nonblocking(self.addr, sys::agent_source(self.addr, slot.i)) {
            Ok(tcp) => tcp,
            Err(_) => return self.failed(k, slot),
        };
        if let Err(e) = self.epoll.add(&tcp, k) {
            self.shared
                .error(format!("emulated agents: epoll_ctl: {e}"));
            return self.failed(k, slot);
        }
        slot.state = State::Connecting(tcp, config);
        self.set_due(k, slot, Some(slot.started + CONNECT_TIMEOUT));
    }

    /// The dial did not bring a tunnel up: back off (the socket, if any, is closed).
    fn failed(&mut self, k: usize, slot: &mut Slot) {
        slot.state = State::Waiting;
        slot.misplaced_in_row = 0;
        let delay = slot.backoff.next_delay(Instant::now());
        self.set_due(k, slot, Some(Instant::now() + delay));
    }

    /// TLS handshake, then the engine's TunnelHello; the AgentHello when it is the shard asked
    /// for, a close (and a new dial) when it is not.
    fn hello(&mut self, k: usize, slot: &mut Slot) {
        let State::Hello(mut tcp, mut tls, mut pending) =
            std::mem::replace(&mut slot.state, State::Waiting)
        else {
            return;
        };
        let Ok(eof) = transfer(&mut tcp, &mut tls, &mut self.buf, &mut pending) else {
            return self.failed(k, slot);
        };
        let (leftover, shard) = match TunnelHello::parse(&pending) {
            Ok(Some((hello, used))) => (pending.split_off(used), hello.shard),
            Ok(None) if !eof => {
                slot.state = State::Hello(tcp, tls, pending);
                return;
            }
            Ok(None) | Err(_) => return self.failed(k, slot),
        };
        if slot.want.is_some_and(|w| w != shard) {
            // Closed before the agent hello: the engine counts a duplicate, as for the real
            // agent. The real agent dials again at once within its round before it backs off;
            // an engine that honours the hint never gets here.
            self.shared.misplaced.fetch_add(1, Ordering::Relaxed);
            tls.send_close_notify();
            let _ = flush(&mut tcp, &mut tls);
            drop(tcp);
            if slot.misplaced_in_row < MISPLACED_DIALS_BEFORE_BACKOFF {
                slot.misplaced_in_row += 1;
                slot.state = State::Waiting;
                return self.dial(k, slot);
            }
            return self.failed(k, slot);
        }
        if tls.writer().write_all(&slot.hello).is_err() || flush(&mut tcp, &mut tls).is_err() {
            return self.failed(k, slot);
        }
        let now = Instant::now();
        if tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            self.shared.resumed.fetch_add(1, Ordering::Relaxed);
        }
        self.shared.connected.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut ups) = self.shared.ups.lock() {
            ups.push((slot.i, shard, now));
        }
        let mut mux = Mux::new(Role::Client, MuxConfig::default(), now);
        let ok = leftover.is_empty() || mux.handle_input(&leftover, now).is_ok();
        slot.state = State::Up(Box::new(Up {
            tcp,
            tls: *tls,
            mux,
            pushes: HashSet::new(),
        }));
        if ok {
            self.pump(k, slot);
        } else {
            self.end(k, slot);
        }
    }

    /// An up tunnel: what arrived into the mux, the mux's events answered, its output sent.
    fn pump(&mut self, k: usize, slot: &mut Slot) {
        let State::Up(up) = &mut slot.state else {
            return;
        };
        let now = Instant::now();
        self.plain.clear();
        let mut open = matches!(
            transfer(&mut up.tcp, &mut up.tls, &mut self.buf, &mut self.plain),
            Ok(false)
        );
        if !self.plain.is_empty() && up.mux.handle_input(&self.plain, now).is_err() {
            open = false;
        }
        while let Some(ev) = up.mux.poll_event() {
            match ev {
                Event::StreamOpened { id, dial_header } if dial_header == POLICY_OPEN => {
                    // Answered once: a failed answer must not fall to the refusal arm below.
                    let accepted = up.mux.open_result(id, Ok(())).is_ok();
                    if accepted {
                        up.pushes.insert(id);
                    }
                }
                Event::StreamOpened { id, .. } => {
                    let _ = up.mux.open_result(id, Err("emulated agent: no resources"));
                }
                Event::Readable { id } if up.pushes.contains(&id) => {
                    while up.mux.recv(id, &mut self.buf).is_ok_and(|n| n > 0) {}
                }
                Event::StreamFinished { id } if up.pushes.remove(&id) => {
                    let _ = up.mux.finish(id);
                    self.shared.pushes.fetch_add(1, Ordering::Relaxed);
                }
                Event::StreamReset { id, .. } => {
                    up.pushes.remove(&id);
                }
                Event::Closed { .. } => open = false,
                _ => {}
            }
        }
        self.out.clear();
        up.mux.poll_transmit(&mut self.out);
        if !self.out.is_empty() && up.tls.writer().write_all(&self.out).is_err() {
            open = false;
        }
        if flush(&mut up.tcp, &mut up.tls).is_err() {
            open = false;
        }
        let next = up.mux.poll_timeout();
        if open {
            self.set_due(k, slot, next);
        } else {
            self.end(k, slot);
        }
    }

    /// An up tunnel ended: the real agent's backoff after a tunnel (reset if it was healthy).
    fn end(&mut self, k: usize, slot: &mut Slot) {
        slot.state = State::Waiting;
        self.shared.connected.fetch_sub(1, Ordering::SeqCst);
        if let Ok(mut downs) = self.shared.downs.lock() {
            downs.push(Instant::now());
        }
        slot.backoff.tunnel_ended(slot.started.elapsed());
        slot.misplaced_in_row = 0;
        let delay = slot.backoff.next_delay(Instant::now());
        self.set_due(k, slot, Some(Instant::now() + delay));
    }
}

/// Moves what the socket has into `tls` and its plaintext onto `plain` (until the socket would
/// block), then what `tls` has to send onto the socket. `Ok(true)` when the engine closed.
fn transfer(
    tcp: &mut TcpStream,
    tls: &mut ClientConnection,
    buf: &mut [u8],
    plain: &mut Vec<u8>,
) -> std::io::Result<bool> {
    let mut eof = false;
    loop {
        // Edge-triggered: read until the socket would block.
        let got = match tls.read_tls(tcp) {
            Ok(0) => {
                eof = true;
                false
            }
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Err(e) = tls.process_new_packets() {
            let _ = flush(tcp, tls);
            return Err(std::io::Error::other(e));
        }
        loop {
            match tls.reader().read(buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => plain.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        if !got || eof {
            break;
        }
    }
    flush(tcp, tls)?;
    Ok(eof)
}

/// Writes what `tls` has to send until the socket would block (epoll says when it can take
/// more: the set is edge-triggered for writes too).
fn flush(tcp: &mut TcpStream, tls: &mut ClientConnection) -> std::io::Result<()> {
    while tls.wants_write() {
        match tls.write_tls(tcp) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One emulated agent's policy poller: the state of `jaunt agent`'s `PolicyPoller`.
struct Follower {
    i: usize,
    name: String,
    /// The host's client of control (as the real agent's, reloaded by a renewal).
    host: HostClient,
    /// The TLS the agent's next tunnel dials with.
    tls: Arc<Mutex<Arc<ClientConfig>>>,
    /// The policy version in force.
    current: Option<String>,
    /// The CA generation applied (sent back as `?confirmed=`).
    confirmed: String,
    /// The generation control has acknowledged (a fetch carrying it succeeded).
    acknowledged: String,
    failures: u32,
    /// When the next fetch is due.
    due: Instant,
}

/// Serves `followers` in turn until `shared.stop`: each fetch when due, the next due after
/// `agent_host::policy_delay` (the real agent's interval and back-off).
fn poll_loop(followers: &mut [Follower], shared: &Shared) {
    while !shared.stop.load(Ordering::Relaxed) {
        for f in followers.iter_mut() {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            if f.due <= Instant::now() {
                poll(f, shared);
                f.due = Instant::now() + agent_host::policy_delay(f.failures);
            }
        }
        let next = followers.iter().map(|f| f.due).min();
        let wait = next.map_or(Duration::from_millis(100), |t| {
            t.saturating_duration_since(Instant::now())
        });
        std::thread::sleep(wait.min(Duration::from_millis(100)));
    }
}

/// One `GET /v1/agent/policy` with the host client (the real agent's `fetch_policy`, without
/// the other engines to fall back to: the scenario has one).
fn fetch(f: &mut Follower, shared: &Shared) -> anyhow::Result<AgentPolicyResponse> {
    let path = if f.confirmed.is_empty() {
        "/v1/agent/policy".to_string()
    } else {
        format!("/v1/agent/policy?confirmed={}", f.confirmed)
    };
    let response: AgentPolicyResponse = f.host.client().get_json(&path)?;
    shared.fetches.fetch_add(1, Ordering::Relaxed);
    if !f.confirmed.is_empty() && f.acknowledged != f.confirmed {
        f.acknowledged = f.confirmed.clone();
        if let Ok(mut c) = shared.confirms.lock() {
            c.push((f.i, f.confirmed.clone(), Instant::now()));
        }
    }
    Ok(response)
}

/// One poll of the real agent (`PolicyPoller::poll`): fetch; a new version is compiled; a new
/// CA generation is followed (`agent_host::apply_rotation`, the real agent's code) and
/// confirmed at once.
fn poll(f: &mut Follower, shared: &Shared) {
    let fetched = fetch(f, shared).and_then(|response| {
        if f.current.as_deref() == Some(response.version.as_str()) {
            return Ok(None);
        }
        jaunt_agent::ClusterPolicy::from_response(&response)
            .map_err(|e| anyhow!("the cluster's policy is not usable: {e}"))?;
        Ok(Some(response))
    });
    match fetched {
        Ok(None) => f.failures = 0,
        Ok(Some(response)) => {
            f.failures = 0;
            if response.ca_generation != f.confirmed {
                match agent_host::apply_rotation(&f.host, &response) {
                    Ok(followed) => {
                        if followed.renewed.is_some() {
                            shared.renewals.fetch_add(1, Ordering::Relaxed);
                        }
                        if let Some(tls) = followed.tls {
                            match f.tls.lock() {
                                Ok(mut t) => *t = tls,
                                Err(p) => *p.into_inner() = tls,
                            }
                        }
                    }
                    Err(e) => {
                        shared.follow_errors.fetch_add(1, Ordering::Relaxed);
                        shared.error(format!("{}: following the rotation: {e:#}", f.name));
                        f.failures = f.failures.saturating_add(1);
                        return;
                    }
                }
                f.confirmed = response.ca_generation.clone();
                // Confirm at once rather than at the next poll (its failure waits for that).
                if let Err(e) = fetch(f, shared) {
                    shared.poll_errors.fetch_add(1, Ordering::Relaxed);
                    shared.error(format!("{}: confirming: {e:#}", f.name));
                }
            }
            f.current = Some(response.version);
        }
        Err(e) => {
            shared.poll_errors.fetch_add(1, Ordering::Relaxed);
            shared.error(format!("{}: policy fetch: {e:#}", f.name));
            f.failures = f.failures.saturating_add(1);
        }
    }
}

/// The few system calls the tunnel threads need that std does not offer: a nonblocking
/// connect (rustix), epoll, and the open-files limit.
pub mod sys {
    use std::net::{SocketAddr, TcpStream};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::Duration;

    use rustix::net::{AddressFamily, SocketFlags, SocketType};

    /// The source address emulated agent `i` dials from: when the engine is on IPv4 loopback,
    /// an address of its own in 127.0.0.0/8 (127.1.0.1 upwards), as agents on their own hosts
    /// would have, so the engine's per-peer handshake share (`admission.rs`) sees 10,000
    /// peers, not one; otherwise whatever the kernel picks.
    pub fn agent_source(engine: SocketAddr, i: usize) -> Option<SocketAddr> {
        match engine {
            SocketAddr::V4(v4) if v4.ip().is_loopback() => {
                // 250 x 254 addresses: 127.1.0.1 ..= 127.1.249.254, then round again.
                let n = i % (250 * 254);
                let ip = std::net::Ipv4Addr::new(127, 1, (n / 254) as u8, (n % 254 + 1) as u8);
                Some(SocketAddr::from((ip, 0)))
            }
            _ => None,
        }
    }

    /// Starts a connect to `addr` on a new nonblocking socket, from `source` when given.
    pub fn connect_nonblocking(
        addr: SocketAddr,
        source: Option<SocketAddr>,
    ) -> std::io::Result<TcpStream> {
        let family = if addr.is_ipv4() {
            AddressFamily::INET
        } else {
            AddressFamily::INET6
        };
        let fd = rustix::net::socket_with(
            family,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )?;
        if let Some(source) = source {
            rustix::net::bind(&fd, &source)?;
        }
        match rustix::net::connect(&fd, &addr) {
            Ok(()) | Err(rustix::io::Errno::INPROGRESS) => Ok(TcpStream::from(fd)),
            Err(e) => Err(e.into()),
        }
    }

    /// An epoll set whose entries report readable, writable and hang-up, edge-triggered, with
    /// the caller's token.
    pub struct Epoll(OwnedFd);

    impl Epoll {
        #[allow(unsafe_code)]
        pub fn new() -> std::io::Result<Epoll> {
            // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new fd that
            // nothing else owns.
            let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: as above, `fd` is open and owned by no one else.
            Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
        }

        #[allow(unsafe_code)]
        pub fn add(&self, fd: &impl AsRawFd, token: usize) -> std::io::Result<()> {
            let mut event = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
                u64: token as u64,
            };
            // SAFETY: both fds are open (borrowed for the call); `event` is a valid
            // epoll_event the kernel copies.
            let r = unsafe {
                libc::epoll_ctl(
                    self.0.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    fd.as_raw_fd(),
                    &mut event,
                )
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        }

        /// Waits up to `timeout` (rounded up to a millisecond) and puts the tokens of the
        /// entries that became ready in `ready`.
        #[allow(unsafe_code)]
        pub fn wait(&self, ready: &mut Vec<usize>, timeout: Duration) -> std::io::Result<()> {
            const MAX: usize = 512;
            let mut events = [libc::epoll_event { events: 0, u64: 0 }; MAX];
            let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            ready.clear();
            // SAFETY: `events` has room for MAX entries, as the call is told.
            let n = unsafe {
                libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), MAX as i32, ms)
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return if e.kind() == std::io::ErrorKind::Interrupted {
                    Ok(())
                } else {
                    Err(e)
                };
            }
            ready.extend(events[..n as usize].iter().map(|e| {
                let token = e.u64;
                token as usize
            }));
            Ok(())
        }
    }

    /// Makes sure this process (and the processes it starts from now on) may open `want` files:
    /// raises the soft limit, and the hard one if it is lower (which needs root or
    /// CAP_SYS_RESOURCE). The limit in force afterwards.
    #[allow(unsafe_code)]
    pub fn raise_open_files(want: u64) -> std::io::Result<u64> {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid rlimit to write into.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur >= want {
            return Ok(lim.rlim_cur);
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max.max(want),
        };
        // SAFETY: `raised` is a valid rlimit to read from.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(want);
        }
        let err = std::io::Error::last_os_error();
        // At least up to the hard limit.
        let soft = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } == 0 {
            return Ok(lim.rlim_max);
        }
        Err(err)
    }
}
