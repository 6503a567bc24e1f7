//! Cross-shard hops: an engine with 2 shards, a stand-in agent with a tunnel to one of them, and
//! users whose connections land on the other. Their streams are served through the agent's
//! shard (`server/hop.rs`): bytes arrive intact both ways, a half-close travels, the hop is
//! counted, an agent's refusal reaches the user, and killing the tunnel mid-hop ends the user's
//! connection promptly.
//!
//! Which shard a connection lands on is the kernel's `SO_REUSEPORT` hash: a test opens user
//! connections until the per-shard hop counter shows that one went through a hop. No test orders
//! events with a sleep: every wait is for a condition, with a deadline. (The harness is a
//! trimmed copy of `server.rs`'s.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should stop the test"
)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use jaunt_config::identity::{unix_now, Identity, IdentityKind};
use jaunt_engine::mux::{self, Role};
use jaunt_engine::route::{ALPN_TCP, ALPN_TUNNEL};
use jaunt_engine::server::dial::StreamHeader;
use jaunt_engine::server::{
    DialKind, DialRequest, DialResponse, Engine, EngineConfig, EngineHandle, Snapshot, TlsConfigs,
    TunnelHello,
};
use jaunt_engine::tunnel::agent_hello::{AgentHello, Resource, ResourceKind, ResourceProtocol};
use jaunt_engine::tunnel::Tunnel;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

const PUBLIC_HOST: &str = "localhost";
const CLUSTER: &str = "test-cluster";
/// Bound on every wait for a condition; generous for a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(20);
/// Bound on noticing that the tunnel under a hop died.
const PROMPTLY: Duration = Duration::from_secs(5);
/// Connections tried before concluding the kernel never spreads them (2^-64 odds).
const TRIES: usize = 64;

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

// ---------------------------------------------------------------------------------------------
// PKI

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

fn set_validity(params: &mut CertificateParams) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(unix_now() - 3600);
    params.not_after = epoch + Duration::from_secs(unix_now() + 86400);
}

fn private_key(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    fn server(&self, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        set_validity(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (vec![cert.der().clone(), self.der()], private_key(&key))
    }

    fn identity(
        &self,
        identity: &Identity,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let params = identity.x509_params([7; 16], &[]);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (vec![cert.der().clone()], private_key(&key))
    }
}

fn identity(kind: IdentityKind, name: &str) -> Identity {
    let now = unix_now();
    Identity {
        kind,
        name: name.into(),
        roles: vec!["access".into()],
        logins: vec!["root".into()],
        db_users: vec![],
        db_names: vec![],
        traits: Default::default(),
        cluster: CLUSTER.into(),
        not_before: now - 60,
        expires: now + 3600,
        permit_pty: true,
        permit_port_forwarding: false,
        permit_agent_forwarding: false,
    }
}

fn client_config(
    trust: &Ca,
    alpn: &[u8],
    cert: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.der()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(cert.0, cert.1)
    .unwrap();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

// ---------------------------------------------------------------------------------------------
// Harness

struct Harness {
    web: Ca,
    user: Ca,
    host: Ca,
    engine: Option<EngineHandle>,
    _snapshots: crossbeam_channel::Sender<Arc<Snapshot>>,
}

impl Harness {
    fn start() -> Harness {
        let (web, user, host) = (
            Ca::new("Hop Test Web CA"),
            Ca::new("Hop Test User CA"),
            Ca::new("Hop Test Host CA"),
        );
        // Control is never dialled here.
        let mut config = EngineConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            PUBLIC_HOST,
            "127.0.0.1:9".parse().unwrap(),
        );
        config.cluster_name = CLUSTER.into();
        config.shards = 2;
        config.pin_shards = false;
        config.diag_addr = Some("127.0.0.1:0".parse().unwrap());
        let (chain, key) = web.server(&[PUBLIC_HOST, "127.0.0.1"]);
        let tls = TlsConfigs::build(chain, key, &[user.der()], &[host.der()]).unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let engine = Engine::start(config, tls, rx).unwrap();
        tx.send(Arc::new(Snapshot {
            version: 1,
            cluster: CLUSTER.into(),
            user_ca_roots: vec![user.der()],
            host_ca_roots: vec![host.der()],
            policy: jaunt_config::rbac::Policy::compile(&[
                jaunt_config::resource::Role::builtin_access(),
            ])
            .unwrap(),
            ..Snapshot::default()
        }))
        .unwrap();
        let h = Harness {
            web,
            user,
            host,
            engine: Some(engine),
            _snapshots: tx,
        };
        wait_for("readyz", || h.engine().ready());
        h
    }

    fn engine(&self) -> &EngineHandle {
        self.engine.as_ref().unwrap()
    }

    fn addr(&self) -> SocketAddr {
        self.engine().local_addr()
    }

    /// Sum of a metric's samples whose labels include every `labels` pair.
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        sum_metric(&self.engine().metrics_text(), name, labels)
    }

    fn agent_config(&self, host_id: &str) -> Arc<rustls::ClientConfig> {
        let cert = self.host.identity(&identity(IdentityKind::Host, host_id));
        client_config(&self.web, ALPN_TUNNEL, cert)
    }

    /// Connects as alice and dials TCP app `target`.
    fn dial(&self, target: &str) -> (DialResponse, Tls) {
        let cert = self.user.identity(&identity(IdentityKind::User, "alice"));
        let config = client_config(&self.web, ALPN_TCP, cert);
        let tcp = TcpStream::connect(self.addr()).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        tcp.set_nodelay(true).unwrap();
        let conn =
            rustls::ClientConnection::new(config, ServerName::try_from(PUBLIC_HOST).unwrap())
                .unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let request = DialRequest {
            kind: DialKind::Tcp,
            target: target.into(),
            login: None,
            db_user: None,
            db_name: None,
        };
        tls.write_all(&request.encode()).unwrap();
        tls.flush().unwrap();
        let mut frame = vec![0u8; 2];
        tls.read_exact(&mut frame).unwrap();
        frame.resize(2 + usize::from(u16::from_be_bytes([frame[0], frame[1]])), 0);
        tls.read_exact(&mut frame[2..]).unwrap();
        let (response, used) = DialResponse::parse(&frame).unwrap().unwrap();
        assert_eq!(used, frame.len());
        (response, tls)
    }

    /// Dials `target` until a connection lands on `shard` (seen by its hop counter moving),
    /// and returns that one. Every dial must succeed, whichever shard it lands on.
    fn dial_through_hop(&self, shard: usize, target: &str) -> Tls {
        let shard = shard.to_string();
        let hops = || {
            self.metric(
                "jaunt_cross_shard_hops_total",
                &[("shard", &shard), ("result", "ok")],
            )
        };
        for _ in 0..TRIES {
            let before = hops();
            let (response, tls) = self.dial(target);
            assert!(response.ok, "{response:?}");
            // The hop is counted before the dial response is written.
            if hops() > before {
                return tls;
            }
        }
        panic!("{TRIES} connections and none landed on shard {shard}");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(engine) = self.engine.take() {
            let _ = engine.shutdown(Duration::ZERO);
        }
    }
}

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            let all = labels.iter().all(|(k, v)| {
                series_labels
                    .split(',')
                    .any(|l| l == format!("{k}=\"{v}\""))
            });
            all.then(|| value.parse::<f64>().ok().map(|v| v as u64))
                .flatten()
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// A stand-in agent: one tunnel (to whichever shard it lands on), echoing every stream

struct StandInAgent {
    /// The shard its tunnel is on.
    shard: usize,
    /// Dropping it kills the agent: its tasks and socket go without a goodbye.
    kill: Option<crossbeam_channel::Sender<()>>,
    done: crossbeam_channel::Receiver<()>,
}

impl StandInAgent {
    fn start(addr: SocketAddr, config: Arc<rustls::ClientConfig>, node: &str) -> StandInAgent {
        let hello = AgentHello::new(
            node,
            Default::default(),
            ["echo", "refuse-me"]
                .into_iter()
                .map(|name| Resource {
                    kind: ResourceKind::Tcp,
                    name: name.into(),
                    labels: Default::default(),
                    protocol: ResourceProtocol::Tcp,
                })
                .collect(),
        );
        let (shard_tx, shard_rx) = crossbeam_channel::bounded(1);
        let (kill, kill_rx) = crossbeam_channel::bounded::<()>(1);
        let (done_tx, done) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                .io_memory(64 << 10)
                .make()
                .unwrap();
            executor.run(async move {
                let (mut tls, tunnel_hello) = tunnel_connect(addr, &config).await;
                tls.write_all(&hello.encode().unwrap()).await.unwrap();
                tls.flush().await.unwrap();
                shard_tx.send(tunnel_hello.shard).unwrap();
                let (tunnel, driver) = Tunnel::new(tls, Role::Client, mux::Config::default());
                let driver = glommio::spawn_local(driver);
                let serving = glommio::spawn_local(serve_tunnel(tunnel));
                let killed = async {
                    loop {
                        match kill_rx.try_recv() {
                            Err(crossbeam_channel::TryRecvError::Empty) => {
                                glommio::timer::Timer::new(Duration::from_millis(5)).await;
                            }
                            _ => return,
                        }
                    }
                };
                futures_lite::future::or(
                    async {
                        serving.await;
                        let _ = driver.await;
                    },
                    killed,
                )
                .await;
            });
            let _ = done_tx.send(());
        });
        StandInAgent {
            shard: shard_rx.recv_timeout(WAIT).unwrap(),
            kill: Some(kill),
            done,
        }
    }

    fn kill(&mut self) {
        drop(self.kill.take());
        self.done.recv_timeout(WAIT).unwrap();
    }
}

async fn tunnel_connect(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> (
    futures_rustls::client::TlsStream<glommio::net::TcpStream>,
    TunnelHello,
) {
    let tcp = glommio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let connector = futures_rustls::TlsConnector::from(Arc::clone(config));
    let mut tls = connector
        .connect(ServerName::try_from(PUBLIC_HOST).unwrap(), tcp)
        .await
        .unwrap();
    let mut len = [0u8; 2];
    tls.read_exact(&mut len).await.unwrap();
    let mut frame = len.to_vec();
    frame.resize(2 + usize::from(u16::from_be_bytes(len)), 0);
    tls.read_exact(&mut frame[2..]).await.unwrap();
    let (hello, _) = TunnelHello::parse(&frame).unwrap().unwrap();
    (tls, hello)
}

/// Refuses streams to `refuse-me`; echoes every other stream until the user's FIN, then closes
/// its side.
async fn serve_tunnel(tunnel: Tunnel) {
    while let Some(incoming) = tunnel.accept().await {
        let header = StreamHeader::parse(&incoming.header).unwrap();
        if header.target == "refuse-me" {
            incoming.refuse("connection refused by the test target");
            continue;
        }
        let mut stream = incoming.accept().unwrap();
        glommio::spawn_local(async move {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = stream.close().await;
        })
        .detach();
    }
}

// ---------------------------------------------------------------------------------------------
// Stream contents

/// Byte `offset` of the test pattern (period 251 × 4099, so no power-of-two size lines up).
fn byte_at(offset: usize) -> u8 {
    (offset % 251) as u8 ^ (offset / 4099) as u8
}

fn fill(buf: &mut [u8], offset: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = byte_at(offset + i);
    }
}

/// FNV-1a over `bytes`, continuing from `hash`.
fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

// ---------------------------------------------------------------------------------------------
// Tests

/// A user on the shard without the agent's tunnel is served through the other shard: a few MiB
/// echo intact (checksums and every byte), the user's half-close reaches the agent and its
/// reply and EOF come back, and the hop is counted as `ok` on the user's shard.
#[test]
fn a_user_on_the_other_shard_reaches_the_agent_through_a_hop() {
    const TOTAL: usize = 3 * 1024 * 1024 + 12_345;
    const STEP: usize = 48 * 1024;
    /// Sent without waiting for its echo, then the half-close.
    const TAIL: usize = 200_000;
    let h = Harness::start();
    let agent = StandInAgent::start(h.addr(), h.agent_config("host-7"), "node7");
    let other = 1 - agent.shard;
    wait_for("the agent's tunnel", || {
        h.metric("jaunt_tunnels", &[("shard", &agent.shard.to_string())]) == 1
    });
    let mut tls = h.dial_through_hop(other, "echo");

    let (mut sent_hash, mut echo_hash) = (FNV_START, FNV_START);
    let mut buf = vec![0u8; STEP];
    let mut offset = 0;
    // Lock-step: a chunk out, its echo back.
    while offset < TOTAL - TAIL {
        let n = STEP.min(TOTAL - TAIL - offset);
        fill(&mut buf[..n], offset);
        sent_hash = fnv(sent_hash, &buf[..n]);
        tls.write_all(&buf[..n]).unwrap();
        tls.flush().unwrap();
        let mut echo = vec![0u8; n];
        tls.read_exact(&mut echo).unwrap();
        for (i, &b) in echo.iter().enumerate() {
            assert_eq!(b, byte_at(offset + i), "echo byte {}", offset + i);
        }
        echo_hash = fnv(echo_hash, &echo);
        offset += n;
    }
    // The tail, then a half-close (close_notify and FIN), before reading its echo: the agent
    // sees the user's EOF only after the bytes, and its echo and EOF still come back.
    let mut tail = vec![0u8; TAIL];
    fill(&mut tail, offset);
    sent_hash = fnv(sent_hash, &tail);
    tls.write_all(&tail).unwrap();
    tls.conn.send_close_notify();
    tls.flush().unwrap();
    tls.sock.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len(), TAIL, "the echo of the tail, then EOF");
    echo_hash = fnv(echo_hash, &rest);
    assert_eq!(echo_hash, sent_hash, "checksum of {TOTAL} bytes");
    assert!(rest
        .iter()
        .enumerate()
        .all(|(i, &b)| b == byte_at(offset + i)));

    assert!(
        h.metric(
            "jaunt_cross_shard_hops_total",
            &[("shard", &other.to_string()), ("result", "ok")]
        ) >= 1
    );
    assert_eq!(
        h.metric("jaunt_cross_shard_hops_total", &[("result", "miss")]),
        0
    );
    assert_eq!(
        h.metric(
            "jaunt_cross_shard_hops_total",
            &[("shard", &agent.shard.to_string())]
        ),
        0,
        "the agent's own shard never hops"
    );
    // The session ended on both shards: nothing left open.
    wait_for("streams closed", || {
        h.metric("jaunt_streams_open", &[]) == 0
    });
}

/// Several users through hops at once, both directions busy: each gets its own bytes back.
#[test]
fn concurrent_hops_keep_streams_apart() {
    let h = Harness::start();
    let agent = StandInAgent::start(h.addr(), h.agent_config("host-8"), "node8");
    let other = 1 - agent.shard;
    let conns: Vec<Tls> = (0..4).map(|_| h.dial_through_hop(other, "echo")).collect();
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(k, mut tls)| {
            std::thread::spawn(move || {
                let start = k * 1_000_003;
                let mut buf = vec![0u8; 40_000];
                let mut echo = vec![0u8; 40_000];
                for round in 0..20 {
                    let offset = start + round * buf.len();
                    fill(&mut buf, offset);
                    tls.write_all(&buf).unwrap();
                    tls.flush().unwrap();
                    tls.read_exact(&mut echo).unwrap();
                    assert!(echo == buf, "stream {k} round {round}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Killing the agent's tunnel under a hopped stream ends the user's connection promptly (the
/// tunnel's shard resets the hop; the user's shard closes the connection).
#[test]
fn killing_the_tunnel_ends_a_hopped_stream_promptly() {
    let h = Harness::start();
    let mut agent = StandInAgent::start(h.addr(), h.agent_config("host-9"), "node9");
    let other = 1 - agent.shard;
    let mut tls = h.dial_through_hop(other, "echo");
    tls.write_all(b"ping").unwrap();
    tls.flush().unwrap();
    let mut echo = [0u8; 4];
    tls.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"ping");

    agent.kill();
    let killed = Instant::now();
    let mut buf = [0u8; 64];
    let ended = match tls.read(&mut buf) {
        Ok(0) => "eof",
        Ok(_) => panic!("bytes after the tunnel died"),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            panic!("the user's connection outlived its tunnel by {WAIT:?}")
        }
        Err(_) => "error",
    };
    let took = killed.elapsed();
    assert!(took < PROMPTLY, "ended ({ended}) after {took:?}");
    wait_for("streams closed", || {
        h.metric("jaunt_streams_open", &[]) == 0
    });
}

/// Moves `total` bytes in lock-step (a 48 KiB write, its echo read back) and returns the time.
fn echo_lockstep(tls: &mut Tls, total: usize) -> Duration {
    const STEP: usize = 48 * 1024;
    let mut buf = vec![0u8; STEP];
    let mut echo = vec![0u8; STEP];
    fill(&mut buf, 0);
    let started = Instant::now();
    let mut moved = 0;
    while moved < total {
        tls.write_all(&buf).unwrap();
        tls.flush().unwrap();
        tls.read_exact(&mut echo).unwrap();
        moved += STEP;
    }
    let took = started.elapsed();
    assert!(echo == buf);
    took
}

/// A hopped session against a local one on the same engine, same run: lock-step echo through
/// TLS, the engine, the tunnel and the stand-in agent, 16 MiB each way.
///
/// `cargo test -p jaunt-engine --test hop --profile bench -- --ignored --nocapture`
#[test]
#[ignore = "a measurement: run with --profile bench -- --ignored --nocapture"]
fn measure_hop_against_local() {
    const TOTAL: usize = 16 * 1024 * 1024;
    let h = Harness::start();
    let agent = StandInAgent::start(h.addr(), h.agent_config("host-m"), "nodem");
    let mut hopped = h.dial_through_hop(1 - agent.shard, "echo");
    let mut local = loop {
        let before = h.metric("jaunt_cross_shard_hops_total", &[("result", "ok")]);
        let (response, tls) = h.dial("echo");
        assert!(response.ok, "{response:?}");
        if h.metric("jaunt_cross_shard_hops_total", &[("result", "ok")]) == before {
            break tls;
        }
    };
    echo_lockstep(&mut hopped, 1 << 20);
    echo_lockstep(&mut local, 1 << 20);
    let mut ratios = Vec::new();
    for _ in 0..3 {
        let hop = echo_lockstep(&mut hopped, TOTAL);
        let loc = echo_lockstep(&mut local, TOTAL);
        println!(
            "16 MiB lock-step echo: hop {:.0} ms ({:.0} MiB/s each way), local {:.0} ms \
             ({:.0} MiB/s); hop / local time {:.2}",
            hop.as_secs_f64() * 1e3,
            16.0 / hop.as_secs_f64(),
            loc.as_secs_f64() * 1e3,
            16.0 / loc.as_secs_f64(),
            hop.as_secs_f64() / loc.as_secs_f64()
        );
        ratios.push(hop.as_secs_f64() / loc.as_secs_f64());
    }
    println!("hop / local time ratios: {ratios:.2?}");
}

/// The agent refusing a hopped stream reaches the user as a readable dial error, counted as a
/// hop `error` on the user's shard (not as a miss).
#[test]
fn a_refusal_through_a_hop_reaches_the_user() {
    let h = Harness::start();
    let agent = StandInAgent::start(h.addr(), h.agent_config("host-r"), "noder");
    let other = (1 - agent.shard).to_string();
    let errors = || {
        h.metric(
            "jaunt_cross_shard_hops_total",
            &[("shard", &other), ("result", "error")],
        )
    };
    let mut refused_via_hop = false;
    for _ in 0..TRIES {
        let before = errors();
        let (response, _) = h.dial("refuse-me");
        assert!(!response.ok);
        assert_eq!(
            response.error.as_deref(),
            Some(
                r#"agent "host-r" could not connect to app "refuse-me": connection refused by the test target"#
            )
        );
        if errors() > before {
            refused_via_hop = true;
            break;
        }
    }
    assert!(refused_via_hop, "no dial landed on shard {other}");
    assert_eq!(
        h.metric("jaunt_cross_shard_hops_total", &[("result", "miss")]),
        0
    );
}
