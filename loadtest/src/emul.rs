//! Emulated agents for the `agents` scenario: each joins once with the token (its own host id
//! and certificate, so the engine keeps one tunnel per emulated host), then holds one tunnel
//! with the real protocol (TLS with ALPN `jaunt-tunnel`, the engine's TunnelHello, an
//! AgentHello, then the sans-IO mux core of `jaunt_engine::mux` as `Role::Client`, answering
//! keepalives and refusing stream opens). On loss it redials on the real agent's schedule
//! (`jaunt_agent::backoff`: capped exponential with full jitter). One thread per emulated agent
//! with a small stack: lighter than a `jaunt agent` process (no glommio executors, one tunnel
//! instead of one per shard), the same wire behaviour for what the scenario measures.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use jaunt_agent::backoff::Backoff;
use jaunt_agent::BackoffConfig;
use jaunt_config::api::{Certs, JoinRequest};
use jaunt_config::wire::agent_hello::AgentHello;
use jaunt_config::wire::dial::TunnelHello;
use jaunt_control::ca::LocalKeys;
use jaunt_control::client::{Client, Trust};
use jaunt_control::profile::Profile;
use jaunt_engine::mux::{Config as MuxConfig, Conn as Mux, Event, Role};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

/// One joined emulated agent.
pub struct Identity {
    pub name: String,
    pub tls: Arc<ClientConfig>,
}

/// Joins agent `name` with `token`, keeping its files under `dir`.
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
    let profile = Profile {
        dir: dir.to_path_buf(),
    };
    let info = profile.save(proxy, &keys, &certs)?;
    let (chain, key) = profile.tls_identity(&info.user)?;
    let roots = profile.host_ca()?;
    let tls = jaunt_agent::client_config(chain, key, &roots).map_err(|e| anyhow!("{e}"))?;
    Ok(Identity {
        name: name.to_string(),
        tls,
    })
}

/// What the emulated agents share with the scenario.
#[derive(Default)]
pub struct Shared {
    pub stop: AtomicBool,
    /// Tunnels up right now.
    pub connected: AtomicUsize,
    /// (agent index, when its tunnel came up), every time one did.
    pub ups: Mutex<Vec<(usize, Instant)>>,
    /// When a tunnel that was up ended, every time one did.
    pub downs: Mutex<Vec<Instant>>,
}

/// Starts one thread per identity; they run until `shared.stop`.
pub fn start(
    ids: Vec<Identity>,
    addr: SocketAddr,
    server_name: ServerName<'static>,
    shared: Arc<Shared>,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut handles = Vec::new();
    for (i, id) in ids.into_iter().enumerate() {
        let shared = shared.clone();
        let name = server_name.clone();
        let hello = AgentHello::new(&id.name, Default::default(), Vec::new())
            .encode()
            .map_err(|e| anyhow!("agent hello: {e}"))?;
        let h = std::thread::Builder::new()
            .name(format!("emu-{i}"))
            .stack_size(256 * 1024)
            .spawn(move || run(i, id.tls, addr, name, hello, shared))?;
        handles.push(h);
    }
    Ok(handles)
}

fn seed(i: usize) -> u64 {
    jaunt_agent::backoff::seed() ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn run(
    i: usize,
    tls: Arc<ClientConfig>,
    addr: SocketAddr,
    name: ServerName<'static>,
    hello: Vec<u8>,
    shared: Arc<Shared>,
) {
    let mut backoff = Backoff::new(BackoffConfig::default(), seed(i));
    while !shared.stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let up = tunnel(i, &tls, addr, &name, &hello, &shared);
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        if up {
            backoff.tunnel_ended(started.elapsed());
        }
        let delay = backoff.next_delay();
        let until = Instant::now() + delay;
        while Instant::now() < until && !shared.stop.load(Ordering::Relaxed) {
            std::thread::sleep((until - Instant::now()).min(Duration::from_millis(100)));
        }
    }
}

/// One tunnel, from dial to end; returns whether it came up.
fn tunnel(
    i: usize,
    tls: &Arc<ClientConfig>,
    addr: SocketAddr,
    name: &ServerName<'static>,
    hello: &[u8],
    shared: &Shared,
) -> bool {
    let Ok(tcp) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return false;
    };
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(conn) = ClientConnection::new(tls.clone(), name.clone()) else {
        return false;
    };
    let mut s = StreamOwned::new(conn, tcp);
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    // The engine's TunnelHello.
    let leftover = loop {
        match TunnelHello::parse(&pending) {
            Ok(Some((_hello, used))) => break pending.split_off(used),
            Ok(None) => {}
            Err(_) => return false,
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    };
    if s.write_all(hello).and_then(|_| s.flush()).is_err() {
        return false;
    }
    let now = Instant::now();
    shared.connected.fetch_add(1, Ordering::SeqCst);
    if let Ok(mut ups) = shared.ups.lock() {
        ups.push((i, now));
    }
    let mut mux = Mux::new(Role::Client, MuxConfig::default(), now);
    let _ = s.sock.set_read_timeout(Some(Duration::from_millis(200)));
    let mut ok = leftover.is_empty() || mux.handle_input(&leftover, now).is_ok();
    let mut out = Vec::new();
    while ok && !shared.stop.load(Ordering::Relaxed) {
        while let Some(ev) = mux.poll_event() {
            match ev {
                Event::StreamOpened { id, .. } => {
                    let _ = mux.open_result(id, Err("emulated agent: no resources"));
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
    true
}
