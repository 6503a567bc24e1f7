//! Emulated agents for the `agents` and `rotation` scenarios: each joins once with the token
//! (its own host id and certificate, so the engine keeps one tunnel per emulated host), then
//! holds one tunnel with the real protocol (TLS with ALPN `jaunt-tunnel`, the engine's
//! TunnelHello, an AgentHello, then the sans-IO mux core of `jaunt_engine::mux` as
//! `Role::Client`, answering keepalives, reading the policies the engine pushes
//! (`jaunt-policy/1`) and refusing every other stream). On loss it redials on the real agent's
//! schedule (`jaunt_agent::backoff`: capped exponential with full jitter). One thread per
//! emulated agent with a small stack: lighter than a `jaunt agent` process (no glommio
//! executors, one tunnel instead of one per shard), the same wire behaviour for what the
//! scenarios measure.
//!
//! With `follow` (the `rotation` scenario) each agent also runs the real agent's policy poll
//! (`jaunt agent`'s `PolicyPoller` in `control/src/agent_host/mod.rs`, the same requests): `GET
//! /v1/agent/policy[?confirmed=GENERATION]` with its host certificate every
//! `agent_host::policy_delay` (5 s, backing off on failures); a new version is compiled
//! (`ClusterPolicy::from_response`); a new CA generation is followed (the host CAs written to
//! the profile's trust file, the host certificate renewed through `HostClient::renew` when
//! control says so, the tunnel's TLS rebuilt for the next dial) and confirmed at once with a
//! second fetch. The polls run on a few threads, each serving its share of the agents in turn.

use std::collections::HashSet;
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
use jaunt_control::agent_host::{self, AgentOptions, HostClient};
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
    /// The identity's user name in the profile (the host id).
    pub user: String,
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
        user: info.user,
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

/// Starts one thread per identity and shard (and with `follow`, the policy-poll threads); they
/// run until `shared.stop`. With `shards` > 1 each agent holds one tunnel per shard, as the real
/// agent does: the thread for shard `s` asks for it (`jaunt-shard.<s>` after `jaunt-tunnel`)
/// and closes a connection that lands elsewhere. `shards` = 1: one tunnel per agent, wherever
/// it lands.
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
    let started = Instant::now();
    for (i, id) in ids.into_iter().enumerate() {
        let shared = shared.clone();
        let name = server_name.clone();
        let hello = AgentHello::new(&id.name, Default::default(), Vec::new())
            .encode()
            .map_err(|e| anyhow!("agent hello: {e}"))?;
        let tls = Arc::new(Mutex::new(id.tls.clone()));
        if follow {
            // Spread over one poll interval, as agents started at different times are.
            let offset = agent_host::policy_delay(0).mul_f64(i as f64 / k.max(1) as f64);
            followers[i % threads].push(Follower {
                i,
                opts: AgentOptions {
                    proxy: id.proxy.clone(),
                    token: None,
                    ca_pin: None,
                    insecure: false,
                    data_dir: id.dir.clone(),
                    name: id.name.clone(),
                    config_file: None,
                },
                user: id.user.clone(),
                tls: tls.clone(),
                current: None,
                confirmed: String::new(),
                acknowledged: String::new(),
                failures: 0,
                due: started + offset,
            });
        }
        for shard in 0..shards.max(1) {
            let (tls, name, hello, shared) =
                (tls.clone(), name.clone(), hello.clone(), shared.clone());
            let want = (shards > 1).then_some(shard);
            let h = std::thread::Builder::new()
                .name(format!("emu-{i}-{shard}"))
                .stack_size(256 * 1024)
                .spawn(move || run(i, want, tls, addr, name, hello, shared))?;
            handles.push(h);
        }
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

fn run(
    i: usize,
    want: Option<usize>,
    tls: Arc<Mutex<Arc<ClientConfig>>>,
    addr: SocketAddr,
    name: ServerName<'static>,
    hello: Vec<u8>,
    shared: Arc<Shared>,
) {
    let mut backoff = Backoff::new(BackoffConfig::default(), seed(i));
    let mut misplaced_in_row = 0usize;
    while !shared.stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        // The TLS in force now: a followed rotation replaces it for the next tunnel (as the real
        // agent's `ReplaceTls`), never the tunnel that is up.
        let mut config = match tls.lock() {
            Ok(t) => t.clone(),
            Err(p) => p.into_inner().clone(),
        };
        if let Some(shard) = want {
            let mut c = ClientConfig::clone(&config);
            c.alpn_protocols.push(shard_hint_alpn(shard));
            config = Arc::new(c);
        }
        let up = tunnel(i, want, &config, addr, &name, &hello, &shared);
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        match up {
            Tunnel::Up => {
                backoff.tunnel_ended(started.elapsed());
            }
            // The real agent dials again at once within its round before it backs off; an
            // engine that honours the hint never gets here.
            Tunnel::Misplaced if misplaced_in_row < MISPLACED_DIALS_BEFORE_BACKOFF => {
                misplaced_in_row += 1;
                continue;
            }
            Tunnel::Misplaced | Tunnel::Failed => {}
        }
        misplaced_in_row = 0;
        let delay = backoff.next_delay();
        let until = Instant::now() + delay;
        while Instant::now() < until && !shared.stop.load(Ordering::Relaxed) {
            std::thread::sleep((until - Instant::now()).min(Duration::from_millis(100)));
        }
    }
}

/// How one dial ended.
enum Tunnel {
    /// It came up (and has ended since).
    Up,
    /// It landed on another shard than asked for and was closed.
    Misplaced,
    /// It did not come up.
    Failed,
}

/// One tunnel, from dial to end.
fn tunnel(
    i: usize,
    want: Option<usize>,
    tls: &Arc<ClientConfig>,
    addr: SocketAddr,
    name: &ServerName<'static>,
    hello: &[u8],
    shared: &Shared,
) -> Tunnel {
    let Ok(tcp) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return Tunnel::Failed;
    };
    shared.dials.fetch_add(1, Ordering::Relaxed);
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(conn) = ClientConnection::new(tls.clone(), name.clone()) else {
        return Tunnel::Failed;
    };
    let mut s = StreamOwned::new(conn, tcp);
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    // The engine's TunnelHello.
    let (leftover, shard) = loop {
        match TunnelHello::parse(&pending) {
            Ok(Some((hello, used))) => break (pending.split_off(used), hello.shard),
            Ok(None) => {}
            Err(_) => return Tunnel::Failed,
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return Tunnel::Failed,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    };
    if want.is_some_and(|w| w != shard) {
        // Closed before the agent hello: the engine counts a duplicate, as for the real agent.
        shared.misplaced.fetch_add(1, Ordering::Relaxed);
        s.conn.send_close_notify();
        let _ = s.flush();
        return Tunnel::Misplaced;
    }
    if s.write_all(hello).and_then(|_| s.flush()).is_err() {
        return Tunnel::Failed;
    }
    let now = Instant::now();
    shared.connected.fetch_add(1, Ordering::SeqCst);
    if let Ok(mut ups) = shared.ups.lock() {
        ups.push((i, shard, now));
    }
    let mut mux = Mux::new(Role::Client, MuxConfig::default(), now);
    let _ = s.sock.set_read_timeout(Some(Duration::from_millis(200)));
    let mut ok = leftover.is_empty() || mux.handle_input(&leftover, now).is_ok();
    let mut out = Vec::new();
    // Policy pushes being read (`jaunt-policy/1`): read to the end, then our FIN, as the real
    // agent's `receive_push` (which also compiles it; the poll does that here).
    let mut pushes: HashSet<StreamId> = HashSet::new();
    let mut scratch = vec![0u8; 16 * 1024];
    while ok && !shared.stop.load(Ordering::Relaxed) {
        while let Some(ev) = mux.poll_event() {
            match ev {
                Event::StreamOpened { id, dial_header } if dial_header == POLICY_OPEN => {
                    if mux.open_result(id, Ok(())).is_ok() {
                        pushes.insert(id);
                    }
                }
                Event::StreamOpened { id, .. } => {
                    let _ = mux.open_result(id, Err("emulated agent: no resources"));
                }
                Event::Readable { id } if pushes.contains(&id) => {
                    while mux.recv(id, &mut scratch).is_ok_and(|n| n > 0) {}
                }
                Event::StreamFinished { id } if pushes.remove(&id) => {
                    let _ = mux.finish(id);
                    shared.pushes.fetch_add(1, Ordering::Relaxed);
                }
                Event::StreamReset { id, .. } => {
                    pushes.remove(&id);
                }
                Event::Closed { .. } => ok = false,
                _ => {}
            }
        }
        out.clear();
        mux.poll_transmit(&mut out);
        if !out.is_empty() && s.write_all(&out).and_then(|_| s.flush()).is_err() {
            break;
        }
        if !ok {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if mux.handle_input(&buf[..n], Instant::now()).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
        let now = Instant::now();
        if mux.poll_timeout().is_some_and(|t| t <= now) {
            mux.handle_timeout(now);
        }
    }
    shared.connected.fetch_sub(1, Ordering::SeqCst);
    if let Ok(mut downs) = shared.downs.lock() {
        downs.push(Instant::now());
    }
    Tunnel::Up
}

/// One emulated agent's policy poller: the state of `jaunt agent`'s `PolicyPoller`.
struct Follower {
    i: usize,
    opts: AgentOptions,
    user: String,
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

/// One `GET /v1/agent/policy` with the host identity on disk now (the real agent's
/// `fetch_policy`, without the other engines to fall back to: the scenario has one).
fn fetch(f: &mut Follower, shared: &Shared) -> anyhow::Result<AgentPolicyResponse> {
    let profile = agent_host::host_profile(&f.opts.data_dir);
    let path = if f.confirmed.is_empty() {
        "/v1/agent/policy".to_string()
    } else {
        format!("/v1/agent/policy?confirmed={}", f.confirmed)
    };
    let client = Client::new(
        &f.opts.proxy,
        Trust::Roots(profile.host_ca()?),
        Some(profile.tls_identity(&f.user)?),
    )?;
    let response: AgentPolicyResponse = client.get_json(&path)?;
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
/// CA generation is followed and confirmed at once.
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
                if let Err(e) = follow_rotation(f, &response, shared) {
                    shared.follow_errors.fetch_add(1, Ordering::Relaxed);
                    shared.error(format!("{}: following the rotation: {e:#}", f.opts.name));
                    f.failures = f.failures.saturating_add(1);
                    return;
                }
                f.confirmed = response.ca_generation.clone();
                // Confirm at once rather than at the next poll (its failure waits for that).
                if let Err(e) = fetch(f, shared) {
                    shared.poll_errors.fetch_add(1, Ordering::Relaxed);
                    shared.error(format!("{}: confirming: {e:#}", f.opts.name));
                }
            }
            f.current = Some(response.version);
        }
        Err(e) => {
            shared.poll_errors.fetch_add(1, Ordering::Relaxed);
            shared.error(format!("{}: policy fetch: {e:#}", f.opts.name));
            f.failures = f.failures.saturating_add(1);
        }
    }
}

/// The real agent's `follow_rotation`: the host CAs the policy names become the trust for the
/// engine's certificate (written to the profile), the host certificate is renewed when control
/// says it is not from the signing host CA, and the next tunnel dials with the result.
fn follow_rotation(
    f: &Follower,
    response: &AgentPolicyResponse,
    shared: &Shared,
) -> anyhow::Result<()> {
    let profile = agent_host::host_profile(&f.opts.data_dir);
    let Some(mut info) = profile.load()? else {
        bail!("the host identity is gone from {}", profile.dir.display());
    };
    let mut changed = false;
    if !response.host_ca.is_empty() {
        let bundle: String = response
            .host_ca
            .iter()
            .map(|pem| format!("{}\n", pem.trim_end()))
            .collect();
        let path = profile.host_ca_path();
        if std::fs::read_to_string(&path).ok().as_deref() != Some(bundle.as_str()) {
            jaunt_control::profile::write_private(&path, bundle.as_bytes())?;
            changed = true;
        }
    }
    if response.renew_host_cert {
        info = HostClient::load(&f.opts.proxy, &f.opts.data_dir)?.renew()?;
        shared.renewals.fetch_add(1, Ordering::Relaxed);
        changed = true;
    }
    if changed {
        let tls = tls_config(&profile, &info)?;
        match f.tls.lock() {
            Ok(mut t) => *t = tls,
            Err(p) => {
                let mut t = p.into_inner();
                *t = tls;
            }
        }
    }
    Ok(())
}
