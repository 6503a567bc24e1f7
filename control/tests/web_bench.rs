//! Benchmark (ignored): `/web/` with 1,000 nodes against the same page with 10, in one run.
//!
//! A dev cluster on `localhost`; 1,000 emulated agents (as loadtest's `emul`, cut down: each
//! joins with a token through `POST /v1/join`, gets its own host certificate and holds a real
//! tunnel to the engine, announcing one SSH node with host labels in its AgentHello) so the
//! nodes reach control's inventory through the product's path. First 10 agents connect and the page is measured, then the other 990 and it is
//! measured again. For each size: the server's answer time for `GET /web/` (curl with the web
//! session cookie: first byte after the TLS handshake, and the whole body), and the page load in
//! headless Chromium and Firefox from the browser's Navigation Timing (first byte,
//! DOMContentLoaded, load), plus the filter box narrowing the list (time in the page's input
//! handler and the layout after it). Medians of `ROUNDS` loads each. See BENCHMARKS.md.
//!
//! ```sh
//! cargo test -p jaunt-control --test web_bench -- --ignored --nocapture
//! ```
//! `JAUNT_WEB_NODES` changes the large size (default 1000).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;
mod webdriver;

use std::collections::BTreeMap;
use std::net::ToSocketAddrs;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jaunt_config::rbac::ResourceKind;
use jaunt_config::wire::agent_hello::{Resource, ResourceProtocol};
use support::*;
use webdriver::{Browser, Kind};

const PASSWORD: &str = "correct horse battery";
const SMALL: usize = 10;
const ROUNDS: usize = 15;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn nodes(c: &Cluster) -> usize {
    let out = ok(c.admin(&["get", "nodes", "--format", "json"], None));
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    listed.as_array().map_or(0, Vec::len)
}

fn wait_nodes(c: &Cluster, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120 + n as u64 / 10);
    loop {
        let have = nodes(c);
        if have == n {
            return;
        }
        assert!(Instant::now() < deadline, "{have} of {n} nodes connected");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `GET /web/` with curl: (ms from TLS done to the first byte, ms to the last byte, bytes).
fn server_times(c: &Cluster, cookie: &str) -> (f64, f64, usize) {
    let mut first = Vec::new();
    let mut total = Vec::new();
    let mut size = 0;
    for _ in 0..ROUNDS {
        let o = Command::new("curl")
            .args(["-sS", "-k", "--max-time", "30", "-o", "/dev/null", "-b", cookie])
            .args([
                "-w",
                "%{http_code} %{time_appconnect} %{time_starttransfer} %{time_total} %{size_download}",
            ])
            .arg(format!("https://{}/web/", c.public_addr))
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let f: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(f.first(), Some(&"200"), "{out}");
        let num = |i: usize| f[i].parse::<f64>().unwrap();
        first.push((num(2) - num(1)) * 1000.0);
        total.push((num(3) - num(1)) * 1000.0);
        size = f[4].parse().unwrap();
    }
    (median(first), median(total), size)
}

/// What the browser measured, medians in ms.
struct Load {
    first_byte: f64,
    dom_ready: f64,
    load: f64,
    filter: f64,
    rows: usize,
}

fn browser_times(b: &Browser, c: &Cluster, expect_rows: usize) -> Load {
    let (mut first, mut dom, mut load, mut filter) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut rows = 0;
    for _ in 0..ROUNDS {
        b.goto(&format!("https://{}/web/", c.public_addr));
        let mut timing = serde_json::Value::Null;
        b.wait_until("the navigation timing is complete", |b| {
            timing = b.execute(
                "var n = performance.getEntriesByType('navigation')[0]; \
                 if (!n || n.loadEventEnd === 0) return null; \
                 return [n.responseStart - n.startTime, n.domContentLoadedEventEnd - n.startTime, \
                         n.loadEventEnd - n.startTime, \
                         document.querySelectorAll('tr.resource').length + \
                         (document.getElementById('more-resources') ? document.getElementById('more-resources')\
                          .content.querySelectorAll('tr.resource').length : 0)];",
            );
            !timing.is_null()
        });
        first.push(timing[0].as_f64().unwrap());
        dom.push(timing[1].as_f64().unwrap());
        load.push(timing[2].as_f64().unwrap());
        rows = timing[3].as_u64().unwrap() as usize;
        // The filter box: one input event as typing makes it, then the layout it causes.
        let took = b.execute(
            "var f = document.getElementById('filter'); var t = performance.now(); \
             f.value = 'env=dev'; f.dispatchEvent(new Event('input')); \
             document.body.getBoundingClientRect(); \
             return [performance.now() - t, \
                     Array.from(document.querySelectorAll('tr.resource')).filter(r => !r.hidden).length];",
        );
        filter.push(took[0].as_f64().unwrap());
        let shown = took[1].as_u64().unwrap() as usize;
        assert!(
            shown > 0 && shown < rows.max(2),
            "the filter showed {shown} of {rows}"
        );
    }
    assert_eq!(rows, expect_rows, "rows on /web/");
    // "Show all" lays out every row (with the filter cleared).
    let all = b.execute(
        "var f = document.getElementById('filter'); f.value = ''; \
         f.dispatchEvent(new Event('input')); \
         var s = document.getElementById('show-all'); if (s) s.click(); \
         return Array.from(document.querySelectorAll('tr.resource')).filter(r => !r.hidden).length;",
    );
    assert_eq!(all.as_u64(), Some(rows as u64), "rows after Show all");
    Load {
        first_byte: median(first),
        dom_ready: median(dom),
        load: median(load),
        filter: median(filter),
        rows,
    }
}

#[test]
#[ignore = "benchmark: cargo test -p jaunt-control --test web_bench -- --ignored --nocapture"]
fn web_page_load_with_many_nodes() {
    let large: usize = std::env::var("JAUNT_WEB_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    assert!(large > SMALL);
    let c = Cluster::dev_at("localhost:0");
    ok(c.admin(
        &[
            "users",
            "add",
            "alice",
            "--roles",
            "access",
            "--logins",
            "root,alice",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    let token = ok(c.admin(&["tokens", "add", "--type", "node"], None))
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_string();

    // Join the emulated agents (2 threads, as loadtest's `agents` scenario does).
    let started = Instant::now();
    let dir = c.dir.path().join("emulated");
    let next = std::sync::atomic::AtomicUsize::new(0);
    let ids = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= large {
                    break;
                }
                let name = format!("node-{i:04}");
                let mut id = emul::join(&c.public_addr, &c.pin, &token, &name, &dir.join(&name))
                    .unwrap_or_else(|e| panic!("joining {name}: {e:#}"));
                let env = ["prod", "staging", "dev"][i % 3];
                id.labels = BTreeMap::from([
                    ("env".to_string(), env.to_string()),
                    ("team".to_string(), format!("team-{}", i % 10)),
                    ("region".to_string(), format!("eu-{}", i % 4)),
                ]);
                id.resources = vec![Resource {
                    kind: ResourceKind::Node,
                    name: name.clone(),
                    labels: BTreeMap::new(),
                    protocol: ResourceProtocol::Ssh,
                }];
                ids.lock().unwrap().push((i, id));
            });
        }
    });
    let mut ids = ids.into_inner().unwrap();
    ids.sort_by_key(|(i, _)| *i);
    let mut ids: Vec<emul::Identity> = ids.into_iter().map(|(_, id)| id).collect();
    eprintln!("joined {large} emulated agents in {:?}", started.elapsed());
    let addr = c
        .public_addr
        .to_socket_addrs()
        .unwrap()
        .find(|a| a.is_ipv4())
        .unwrap();
    let server_name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let rest = ids.split_off(SMALL);
    let shared = Arc::new(emul::Shared::default());
    let mut handles = emul::start(ids, addr, server_name.clone(), shared.clone()).unwrap();
    wait_nodes(&c, SMALL);

    let browsers = [Kind::Chromium, Kind::Firefox].map(|kind| {
        let b = Browser::launch(kind);
        b.goto(&format!("https://{}/web/login", c.public_addr));
        let user = b.wait_for("#user");
        b.type_into(&user, "alice");
        let password = b.wait_for("#password");
        b.type_into(&password, &format!("{PASSWORD}\u{E007}"));
        b.wait_for("table#resources");
        (kind, b)
    });
    let token = browsers[0]
        .1
        .cookies()
        .iter()
        .find(|c| c["name"] == "__Host-jaunt_session")
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .to_string();
    let cookie = format!("__Host-jaunt_session={token}");

    let mut report = Vec::new();
    measure(&mut report, SMALL, &c, &cookie, &browsers);
    let started = Instant::now();
    handles.extend(emul::start(rest, addr, server_name, shared.clone()).unwrap());
    wait_nodes(&c, large);
    eprintln!("{large} nodes connected after {:?}", started.elapsed());
    measure(&mut report, large, &c, &cookie, &browsers);
    shared.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(browsers);
    for h in handles {
        let _ = h.join();
    }
    println!("\n| nodes | measure | median of {ROUNDS} |\n|---|---|---|");
    for line in report {
        println!("{line}");
    }
}

/// Measures `/web/` at `size` nodes into `report`.
fn measure(
    report: &mut Vec<String>,
    size: usize,
    c: &Cluster,
    cookie: &str,
    browsers: &[(Kind, Browser)],
) {
    let (first, total, bytes) = server_times(c, cookie);
    report.push(format!(
        "| {size} | server: `GET /web/` first byte / whole answer ({} KiB) | {first:.1} ms / {total:.1} ms |",
        bytes / 1024
    ));
    for (kind, b) in browsers {
        let l = browser_times(b, c, size);
        report.push(format!(
            "| {size} | {}: first byte / DOMContentLoaded / load ({} rows) | {:.1} / {:.1} / {:.1} ms |",
            kind.name(),
            l.rows,
            l.first_byte,
            l.dom_ready,
            l.load
        ));
        report.push(format!(
            "| {size} | {}: filter box, one input event and layout | {:.1} ms |",
            kind.name(),
            l.filter
        ));
    }
}

/// Emulated agents: join, then one tunnel each (TLS with the host certificate, the engine's
/// TunnelHello, our AgentHello, the mux as client answering keepalives and reading policy
/// pushes, refusing other streams). No redial: the benchmark fails if a tunnel drops.
mod emul {
    use std::collections::{BTreeMap, HashSet};
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::{anyhow, Context as _};
    use jaunt_config::api::{Certs, JoinRequest};
    use jaunt_config::wire::agent_hello::{AgentHello, Resource};
    use jaunt_config::wire::dial::TunnelHello;
    use jaunt_control::agent_host;
    use jaunt_control::ca::LocalKeys;
    use jaunt_control::client::{Client, Trust};
    use jaunt_engine::mux::{Config as MuxConfig, Conn as Mux, Event, Role, StreamId};
    use jaunt_engine::tunnel::policy_push::POLICY_OPEN;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, StreamOwned};

    pub struct Identity {
        pub name: String,
        pub tls: Arc<ClientConfig>,
        pub labels: BTreeMap<String, String>,
        pub resources: Vec<Resource>,
    }

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
        let (chain, key) = profile.tls_identity(&info.user)?;
        let roots = profile.host_ca()?;
        let tls = jaunt_agent::client_config(chain, key, &roots).map_err(|e| anyhow!("{e}"))?;
        Ok(Identity {
            name: name.to_string(),
            tls,
            labels: BTreeMap::new(),
            resources: Vec::new(),
        })
    }

    #[derive(Default)]
    pub struct Shared {
        pub stop: AtomicBool,
        pub connected: AtomicUsize,
    }

    pub fn start(
        ids: Vec<Identity>,
        addr: SocketAddr,
        server_name: ServerName<'static>,
        shared: Arc<Shared>,
    ) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
        let mut handles = Vec::new();
        for id in ids {
            let shared = shared.clone();
            let name = server_name.clone();
            let hello = AgentHello::new(&id.name, id.labels, id.resources)
                .encode()
                .map_err(|e| anyhow!("agent hello: {e}"))?;
            handles.push(
                std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn(move || tunnel(&id.tls, addr, &name, &hello, &shared))?,
            );
        }
        Ok(handles)
    }

    fn tunnel(
        tls: &Arc<ClientConfig>,
        addr: SocketAddr,
        name: &ServerName<'static>,
        hello: &[u8],
        shared: &Shared,
    ) {
        let Ok(tcp) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
            return;
        };
        let _ = tcp.set_nodelay(true);
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
        let Ok(conn) = ClientConnection::new(tls.clone(), name.clone()) else {
            return;
        };
        let mut s = StreamOwned::new(conn, tcp);
        let mut buf = vec![0u8; 16 * 1024];
        let mut pending: Vec<u8> = Vec::new();
        let leftover = loop {
            match TunnelHello::parse(&pending) {
                Ok(Some((_hello, used))) => break pending.split_off(used),
                Ok(None) => {}
                Err(_) => return,
            }
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        };
        if s.write_all(hello).and_then(|_| s.flush()).is_err() {
            return;
        }
        shared.connected.fetch_add(1, Ordering::SeqCst);
        let now = Instant::now();
        let mut mux = Mux::new(Role::Client, MuxConfig::default(), now);
        let _ = s.sock.set_read_timeout(Some(Duration::from_millis(200)));
        let mut ok = leftover.is_empty() || mux.handle_input(&leftover, now).is_ok();
        let mut out = Vec::new();
        let mut pushes: HashSet<StreamId> = HashSet::new();
        let mut scratch = vec![0u8; 16 * 1024];
        while ok && !shared.stop.load(Ordering::Relaxed) {
            while let Some(ev) = mux.poll_event() {
                match ev {
                    Event::StreamOpened { id, dial_header } if dial_header == POLICY_OPEN => {
                        // Answered once: a failed answer must not fall to the refusal arm below.
                        let accepted = mux.open_result(id, Ok(())).is_ok();
                        if accepted {
                            pushes.insert(id);
                        }
                    }
                    Event::StreamOpened { id, .. } => {
                        let _ = mux.open_result(id, Err("emulated agent: no service"));
                    }
                    Event::Readable { id } if pushes.contains(&id) => {
                        while mux.recv(id, &mut scratch).is_ok_and(|n| n > 0) {}
                    }
                    Event::StreamFinished { id } if pushes.remove(&id) => {
                        let _ = mux.finish(id);
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
    }
}
