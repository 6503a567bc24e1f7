//! Measurement (ignored): resident memory per idle tunneled session in an engine-only process.
//!
//! The test re-runs its own binary as a child that holds nothing but an [`Engine`] (two shards,
//! the default `io_memory`, throwaway certificates it writes for the parent). The parent runs
//! the real agent ([`jaunt_agent::run`], a TCP app whose backend holds connections open) and
//! opens N user sessions through the child: TLS with a user certificate, ALPN `jaunt-tcp`, a
//! dial of the app answered through the tunnel, and one byte each way so every session has
//! carried data. Then it reads the child's memory (`/proc/PID/status` VmRSS and
//! `/proc/PID/smaps_rollup`) before and after, so control, the agent and the clients are not in
//! the number (the daemon's `idle` row of loadtest has control's share too). Both processes
//! allocate with mimalloc, the `jaunt` binary's allocator, and the child runs with transparent
//! huge pages off, as `jaunt start` does (`MIMALLOC_ALLOW_THP=0`: mimalloc then makes the same
//! `prctl(PR_SET_THP_DISABLE)` as `control/src/thp.rs`). Until 2026-12-08 this test measured
//! glibc's malloc (18.18 KiB per session).
//!
//! ```sh
//! cargo test --profile bench -p jaunt-engine --test idle_memory -- --ignored --nocapture
//! JAUNT_IDLE_SESSIONS=4000 cargo test ...   # N (default 2000)
//! JAUNT_IDLE_WRAP=heaptrack cargo test ...   # the child runs under this program (a profiler)
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should stop the test"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use jaunt_agent::AgentSettings;
use jaunt_config::file::AgentServices;
use jaunt_config::identity::IdentityKind;
use jaunt_config::wire::{DialKind, DialResponse};
use jaunt_engine::route::ALPN_TCP;
use jaunt_engine::server::InventoryEvent;
use jaunt_testkit::agent::{settings, tcp_app};
use jaunt_testkit::engine::{access_snapshot, engine_config, tls_configs};
use jaunt_testkit::net::{dial_frame, request, tls_connect};
use jaunt_testkit::pki::{identity, Ca, CertAndKey};
use jaunt_testkit::PUBLIC_HOST;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

// The `jaunt` binary's allocator (see the module docs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CLUSTER: &str = "idle-cluster";
const SHARDS: usize = 2;
const WAIT: Duration = Duration::from_secs(60);
/// Set in the child: the directory to write the certificates to.
const CHILD_ENV: &str = "JAUNT_IDLE_ENGINE_DIR";

fn write_identity(dir: &Path, name: &str, (chain, key): &CertAndKey) {
    for (i, c) in chain.iter().enumerate() {
        std::fs::write(dir.join(format!("{name}-{i}.der")), c.as_ref()).unwrap();
    }
    std::fs::write(dir.join(format!("{name}-key.der")), key.secret_der()).unwrap();
}

fn read_identity(dir: &Path, name: &str) -> CertAndKey {
    let mut chain = Vec::new();
    while let Ok(der) = std::fs::read(dir.join(format!("{name}-{}.der", chain.len()))) {
        chain.push(CertificateDer::from(der));
    }
    let key = std::fs::read(dir.join(format!("{name}-key.der"))).unwrap();
    (chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)))
}

/// The child: an engine and nothing else, until its stdin closes.
fn engine_child(dir: &Path) {
    let (web, user_ca, host_ca) = (
        Ca::new("Idle Web CA"),
        Ca::new("Idle User CA"),
        Ca::new("Idle Host CA"),
    );
    std::fs::write(dir.join("web-ca.der"), web.der().as_ref()).unwrap();
    let user = user_ca.identity_with_serial(&identity(IdentityKind::User, "alice", CLUSTER), 9);
    let host = host_ca.identity_with_serial(&identity(IdentityKind::Host, "host-idle", CLUSTER), 9);
    write_identity(dir, "user", &user);
    write_identity(dir, "host", &host);
    let (inventory_tx, inventory) = crossbeam_channel::unbounded();
    let mut config = engine_config(CLUSTER, SHARDS);
    config.inventory = Some(inventory_tx);
    let tls = tls_configs(&web, &[PUBLIC_HOST], &user_ca, &host_ca);
    let (engine, _snapshots) =
        jaunt_testkit::engine::start_engine(config, tls, access_snapshot(CLUSTER), WAIT);
    println!("ENGINE {} {}", engine.local_addr(), std::process::id());
    std::io::stdout().flush().unwrap();
    // Covered: one tunnel per shard.
    let mut up = 0;
    while up < SHARDS {
        if let InventoryEvent::TunnelUp { .. } =
            inventory.recv_timeout(WAIT).expect("the agent's tunnels")
        {
            up += 1;
        }
    }
    println!("COVERED");
    std::io::stdout().flush().unwrap();
    // Keep the inventory drained; end when the parent closes our stdin.
    std::thread::spawn(move || while inventory.recv().is_ok() {});
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    engine.shutdown(Duration::from_secs(5)).unwrap();
}

/// (VmRSS, Private_Clean + Private_Dirty) of `pid` in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let kib = |text: &str, key: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    (
        kib(&status, "VmRSS:"),
        kib(&rollup, "Private_Clean:") + kib(&rollup, "Private_Dirty:"),
    )
}

/// A backend that echoes whatever arrives on each connection and holds it open until EOF (one
/// thread each, in the parent).
fn holding_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::Builder::new()
                .stack_size(64 << 10)
                .spawn(move || {
                    let mut b = [0u8; 64];
                    while let Ok(n) = conn.read(&mut b) {
                        if n == 0 || conn.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                })
                .unwrap();
        }
    });
    addr
}

#[test]
#[ignore = "measurement: run with --ignored --nocapture (see the module docs)"]
fn measure_idle_sessions_engine_only() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        engine_child(Path::new(&dir));
        return;
    }
    let n: usize = std::env::var("JAUNT_IDLE_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let dir = tempfile::tempdir().unwrap();
    let mut child = match std::env::var("JAUNT_IDLE_WRAP") {
        Ok(w) => {
            let mut c = Command::new(w);
            c.arg(std::env::current_exe().unwrap());
            c
        }
        Err(_) => Command::new(std::env::current_exe().unwrap()),
    };
    let mut child = child
        .args([
            "--exact",
            "measure_idle_sessions_engine_only",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        // THP off, as in `jaunt start` (see the module docs).
        .env("MIMALLOC_ALLOW_THP", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next_line = |prefix: &str| -> String {
        loop {
            let line = lines.next().expect("the engine child ended").unwrap();
            // The test harness's "test NAME ... " may precede it on the same line.
            if let Some(at) = line.find(prefix) {
                return line[at + prefix.len()..].trim().to_string();
            }
        }
    };
    let started = next_line("ENGINE ");
    let (addr, pid) = started.split_once(' ').unwrap();
    let (addr, pid): (SocketAddr, u32) = (addr.parse().unwrap(), pid.parse().unwrap());
    let web = CertificateDer::from(std::fs::read(dir.path().join("web-ca.der")).unwrap());

    let backend = holding_echo();
    let (chain, key) = read_identity(dir.path(), "host");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(web.clone()).unwrap();
    let tls = jaunt_agent::client_config(chain, key, std::slice::from_ref(&web)).unwrap();
    let agent_settings = AgentSettings {
        name: "idle-node".into(),
        services: AgentServices {
            ssh: None,
            apps: vec![tcp_app("idle", backend)],
            dbs: vec![],
        },
        ..settings(addr, tls, AgentServices::default())
    };
    let (control, control_rx) = crossbeam_channel::unbounded();
    let agent = std::thread::spawn(move || jaunt_agent::run(agent_settings, control_rx));
    next_line("COVERED");

    let user_tls = {
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let (chain, key) = read_identity(dir.path(), "user");
        let mut config = builder.with_client_auth_cert(chain, key).unwrap();
        config.alpn_protocols = vec![ALPN_TCP.to_vec()];
        Arc::new(config)
    };
    let open = |count: usize| {
        let mut sessions = Vec::with_capacity(count);
        for _ in 0..count {
            let mut s = tls_connect(addr, user_tls.clone(), PUBLIC_HOST);
            s.sock.set_read_timeout(Some(WAIT)).unwrap();
            let frame = dial_frame(&mut s, &request(DialKind::Tcp, "idle")).unwrap();
            let (response, _) = DialResponse::parse(&frame).unwrap().unwrap();
            assert!(response.ok, "{response:?}");
            s.write_all(b"x").unwrap();
            s.flush().unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
            sessions.push(s);
        }
        sessions
    };
    // Warm the allocator's pools and the engine's per-shard state, then give them back.
    drop(open(64));
    let before = memory(pid);
    let sessions = open(n);
    let after = memory(pid);
    let per = |a: u64, b: u64| (b as f64 - a as f64) / 1024.0 / n as f64;
    println!(
        "idle sessions in an engine-only process ({SHARDS} shards): {n} sessions; \
         VmRSS {:.1} -> {:.1} MiB, {:.2} KiB per session; private {:.1} -> {:.1} MiB, {:.2} KiB per session",
        before.0 as f64 / 1048576.0,
        after.0 as f64 / 1048576.0,
        per(before.0, after.0),
        before.1 as f64 / 1048576.0,
        after.1 as f64 / 1048576.0,
        per(before.1, after.1),
    );
    drop(sessions);
    control.send(jaunt_agent::AgentCommand::Shutdown).unwrap();
    agent.join().unwrap().unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}
