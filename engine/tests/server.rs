//! Integration tests of the engine server: a real [`Engine`] on 127.0.0.1 port 0 with throwaway
//! rcgen certificates, driven by `openssl`, `curl`, rustls clients, a stand-in control (a rustls
//! server on a std thread) and a stand-in agent (a glommio executor speaking the tunnel).
//!
//! No test orders events with a sleep: each waits for a condition (a metric, `/readyz`, an EOF)
//! with a deadline.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should stop the test"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use jaunt_config::identity::{unix_now, Identity, IdentityKind};
use jaunt_config::wire::{
    DialKind, DialRequest, DialResponse, ALPN_CONTROL, ALPN_POSTGRES, ALPN_SSH, ALPN_TCP,
    ALPN_TUNNEL,
};
use jaunt_engine::mux;
use jaunt_engine::server::{
    AuditEvent, AuditOverflow, Engine, EngineConfig, EngineHandle, InventoryEvent, Snapshot,
    Target, Targets, TlsConfigs,
};
use jaunt_testkit::net::{dial, request, sum_metric, tls_connect};
use jaunt_testkit::pattern::{pattern_block, PATTERN_CHUNK, PATTERN_PERIOD};
use jaunt_testkit::pki::{client_config, dup, Ca, CertAndKey};
use jaunt_testkit::tunnel::{tunnel_connect, AgentEvent, AgentPlan, StandInAgent, Stop};
use jaunt_testkit::wait::{on_thread_executor, wait_for};
use jaunt_testkit::{PUBLIC_HOST, WAIT};
use rustls::pki_types::{CertificateDer, ServerName};

const CLUSTER: &str = "test-cluster";

fn identity(kind: IdentityKind, name: &str) -> Identity {
    jaunt_testkit::pki::identity(kind, name, CLUSTER)
}

// ---------------------------------------------------------------------------------------------
// PKI

struct Pki {
    web: Ca,
    user: Ca,
    host: Ca,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            web: Ca::new("Jaunt Test Web CA"),
            user: Ca::new("Jaunt Test User CA"),
            host: Ca::new("Jaunt Test Host CA"),
        }
    }

    fn tls_configs(&self, web: &Ca) -> TlsConfigs {
        let names = [PUBLIC_HOST, "grafana.localhost", "127.0.0.1"];
        jaunt_testkit::engine::tls_configs(web, &names, &self.user, &self.host)
    }

    /// A rustls client trusting the engine's web CA, offering `alpn`, with an optional client
    /// certificate.
    fn client(&self, alpn: &[&[u8]], cert: Option<CertAndKey>) -> Arc<rustls::ClientConfig> {
        client_config(&self.web, alpn, cert)
    }
}

// ---------------------------------------------------------------------------------------------
// Harness

struct Harness {
    pki: Pki,
    engine: Option<EngineHandle>,
    snapshots: crossbeam_channel::Sender<Arc<Snapshot>>,
    dir: tempfile::TempDir,
    control: Option<StandInControl>,
}

struct Options {
    shards: usize,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    max_connections_per_shard: usize,
    max_handshakes_per_shard: usize,
    send_snapshot: bool,
    targets: Targets,
    inventory: Option<crossbeam_channel::Sender<InventoryEvent>>,
    audit: Option<crossbeam_channel::Sender<AuditEvent>>,
    audit_overflow: AuditOverflow,
    tunnel_timers: mux::Config,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            shards: 2,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections_per_shard: 1000,
            max_handshakes_per_shard: jaunt_engine::server::DEFAULT_MAX_HANDSHAKES_PER_SHARD,
            send_snapshot: true,
            targets: Targets::default()
                .with(DialKind::Ssh, "web1", Target::on_host("host-1"))
                .with(DialKind::Ssh, "refuse-me", Target::on_host("host-1")),
            inventory: None,
            audit: None,
            audit_overflow: AuditOverflow::Reject,
            tunnel_timers: mux::Config::default(),
        }
    }
}

impl Options {
    fn start(self) -> Harness {
        let pki = Pki::new();
        let control = StandInControl::start();
        let mut config =
            EngineConfig::new("127.0.0.1:0".parse().unwrap(), PUBLIC_HOST, control.addr);
        config.cluster_name = CLUSTER.into();
        config.shards = self.shards;
        config.pin_shards = false;
        config.diag_addr = Some("127.0.0.1:0".parse().unwrap());
        config.handshake_timeout = self.handshake_timeout;
        config.idle_timeout = self.idle_timeout;
        config.max_connections_per_shard = self.max_connections_per_shard;
        config.max_handshakes_per_shard = self.max_handshakes_per_shard;
        config.inventory = self.inventory;
        config.audit = self.audit;
        config.audit_overflow = self.audit_overflow;
        config.tunnel_timers = self.tunnel_timers;
        let (tx, rx) = crossbeam_channel::unbounded();
        let engine = Engine::start(config, pki.tls_configs(&pki.web), rx).unwrap();
        let harness = Harness {
            pki,
            engine: Some(engine),
            snapshots: tx,
            dir: tempfile::tempdir().unwrap(),
            control: Some(control),
        };
        if self.send_snapshot {
            harness.send_snapshot(1, self.targets);
            harness.wait_ready();
        }
        harness
    }
}

impl Harness {
    fn engine(&self) -> &EngineHandle {
        self.engine.as_ref().unwrap()
    }

    fn addr(&self) -> SocketAddr {
        self.engine().local_addr()
    }

    fn send_snapshot(&self, version: u64, targets: Targets) {
        self.send_snapshot_with_locks(version, targets, Vec::new());
    }

    fn send_snapshot_with_locks(
        &self,
        version: u64,
        targets: Targets,
        active_locks: Vec<jaunt_config::rbac::ActiveLock>,
    ) {
        self.send_snapshot_with(version, targets, |s| s.active_locks = active_locks);
    }

    fn send_snapshot_with(&self, version: u64, targets: Targets, edit: impl FnOnce(&mut Snapshot)) {
        let mut snapshot = Snapshot {
            version,
            cluster: CLUSTER.into(),
            user_ca_roots: vec![self.pki.user.der()],
            host_ca_roots: vec![self.pki.host.der()],
            targets,
            policy: jaunt_config::rbac::Policy::compile(&[
                jaunt_config::resource::Role::builtin_access(),
            ])
            .unwrap(),
            ..Snapshot::default()
        };
        edit(&mut snapshot);
        self.snapshots.send(Arc::new(snapshot)).unwrap();
    }

    fn diag(&self, path: &str) -> (u16, String) {
        http_get(self.engine().diag_addr().unwrap(), path)
    }

    fn wait_ready(&self) {
        wait_for("readyz 200", || self.diag("/readyz").0 == 200);
    }

    /// Sum of a metric's samples whose labels include every `labels` pair.
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let (status, text) = self.diag("/metrics");
        assert_eq!(status, 200);
        sum_metric(&text, name, labels)
    }

    fn wait_metric(&self, name: &str, labels: &[(&str, &str)], at_least: u64) {
        wait_for(&format!("{name}{labels:?} >= {at_least}"), || {
            self.metric(name, labels) >= at_least
        });
    }

    /// The HTTP status curl gets for `path` on the web route (SNI = the public host, from
    /// 127.0.0.1), or its error output.
    fn curl_status(&self, path: &str) -> String {
        let ca = self.write_file("ca.pem", &self.pki.web.pem());
        let port = self.addr().port();
        let resolve = format!("{PUBLIC_HOST}:{port}:127.0.0.1");
        let output = Command::new("curl")
            .args(["-sS", "--max-time", "20", "-o", "/dev/null"])
            .args(["-w", "%{http_code}", "--cacert"])
            .arg(&ca)
            .args(["--resolve", &resolve])
            .arg(format!("https://{PUBLIC_HOST}:{port}{path}"))
            .output()
            .unwrap();
        match String::from_utf8_lossy(&output.stdout).into_owned() {
            code if output.status.success() => code,
            _ => String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn tls_connect(
        &self,
        config: Arc<rustls::ClientConfig>,
        sni: &str,
    ) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
        tls_connect(self.addr(), config, sni)
    }

    /// A client config for an agent with host id `host_id`.
    fn agent_config(&self, host_id: &str) -> Arc<rustls::ClientConfig> {
        let host = self
            .pki
            .host
            .identity(&identity(IdentityKind::Host, host_id));
        self.pki.client(&[ALPN_TUNNEL], Some(host))
    }

    /// A client config for user alice offering `alpn`.
    fn alice(&self, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
        let alice = self
            .pki
            .user
            .identity(&identity(IdentityKind::User, "alice"));
        self.pki.client(&[alpn], Some(alice))
    }

    /// A client config for user `name` offering `alpn`.
    fn user(&self, name: &str, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
        let user = self.pki.user.identity(&identity(IdentityKind::User, name));
        self.pki.client(&[alpn], Some(user))
    }

    /// Dials `request` as alice on a new connection; the response and the connection.
    fn dial_as_alice(
        &self,
        request: &DialRequest,
    ) -> (
        DialResponse,
        rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    ) {
        let alpn = match request.kind {
            DialKind::Ssh => ALPN_SSH,
            DialKind::Db => ALPN_POSTGRES,
            DialKind::Tcp | DialKind::App => ALPN_TCP,
        };
        let mut tls = self.tls_connect(self.alice(alpn), PUBLIC_HOST);
        let response = dial(&mut tls, request).unwrap();
        (response, tls)
    }

    /// The error of dialing `request` as alice (empty if it succeeded).
    fn dial_error(&self, request: &DialRequest) -> String {
        let (response, _) = self.dial_as_alice(request);
        response.error.unwrap_or_default()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(engine) = self.engine.take() {
            let _ = engine.shutdown(Duration::ZERO);
        }
        drop(self.control.take());
    }
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: diag\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Reads until EOF or an error; true if the peer closed (EOF or reset) before `WAIT`.
fn closed_by_peer(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// A connection that sent the first byte of a TLS record and stalls there: in its handshake
/// phase, holding a handshake slot.
fn started_hello(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.write_all(&[22]).unwrap();
    tcp
}

/// The first flight of a rustls client with `alpn`: a real ClientHello.
fn client_hello_bytes(pki: &Pki, alpn: &[&[u8]]) -> Vec<u8> {
    let mut conn = rustls::ClientConnection::new(
        pki.client(alpn, None),
        ServerName::try_from(PUBLIC_HOST).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

// ---------------------------------------------------------------------------------------------
// Stand-in control: a rustls server with its own certificate, ALPN jaunt-control, that answers
// one line with `control:<line>`. Like control, it first reads the engine's PROXY v2 header and
// records what it saw (the source address it names, and the first byte after it).

struct StandInControl {
    addr: SocketAddr,
    ca: Ca,
    leaf: CertificateDer<'static>,
    proxied: Arc<std::sync::Mutex<Vec<Proxied>>>,
}

/// What the stand-in control read before TLS on one connection.
#[derive(Debug)]
struct Proxied {
    /// The PROXY header's source address, `None` if the header was missing or not PROXY/TCP.
    source: Option<SocketAddr>,
    /// The first byte after the header (0x16: a TLS handshake record).
    next_byte: Option<u8>,
}

/// Reads a PROXY v2 header off `tcp`: the source address it names, if any.
fn read_proxy_v2(tcp: &mut TcpStream) -> Option<SocketAddr> {
    let mut header = vec![0u8; 16];
    tcp.read_exact(&mut header).ok()?;
    let length = usize::from(u16::from_be_bytes([header[14], header[15]]));
    header.resize(16 + length, 0);
    tcp.read_exact(&mut header[16..]).ok()?;
    let parsed = ppp::v2::Header::try_from(&header[..]).ok()?;
    if parsed.command != ppp::v2::Command::Proxy || parsed.protocol != ppp::v2::Protocol::Stream {
        return None;
    }
    match parsed.addresses {
        ppp::v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        _ => None,
    }
}

impl StandInControl {
    fn start() -> StandInControl {
        let ca = Ca::new("Stand-in Control CA");
        let (chain, key) = ca.server(&["control.test"]);
        let leaf = chain[0].clone();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        config.alpn_protocols = vec![ALPN_CONTROL.to_vec()];
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let proxied = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&proxied);
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(mut tcp) = tcp else { return };
                let config = Arc::clone(&config);
                let seen = Arc::clone(&seen);
                std::thread::spawn(move || {
                    let source = read_proxy_v2(&mut tcp);
                    let mut next = [0u8; 1];
                    let next_byte = match tcp.peek(&mut next) {
                        Ok(1) => Some(next[0]),
                        _ => None,
                    };
                    seen.lock().unwrap().push(Proxied { source, next_byte });
                    let conn = rustls::ServerConnection::new(config).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let mut line = String::new();
                    if BufReader::new(&mut tls).read_line(&mut line).is_ok() && !line.is_empty() {
                        let _ = tls.write_all(format!("control:{line}").as_bytes());
                        let _ = tls.flush();
                    }
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        StandInControl {
            addr,
            ca,
            leaf,
            proxied,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stand-in agent: dials the engine with a host certificate and ALPN jaunt-tunnel, reads the
// tunnel hello, sends its AgentHello (or, for a shard it already covers, closes cleanly: a
// duplicate), then accepts streams: `refuse-me` is refused; an `ssh` stream gets a greeting line
// naming the user, the login and the agent's tag, then an echo; any other stream is a pure echo.
// `stop` drops every tunnel at once, like a killed agent, or freezes them: the sockets stay open
// but nothing is read or written any more, like a hung process or a dead NAT mapping.

// ---------------------------------------------------------------------------------------------
// Tests

/// (1) An unknown ALPN gets a no_application_protocol alert, from openssl and from rustls, and is
/// counted as `unknown_alpn`.
#[test]
fn unknown_alpn_is_refused_with_an_alert_and_counted() {
    let h = Options::default().start();
    let port = h.addr().port();
    let output = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-alpn", "foo", "-servername", PUBLIC_HOST])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("no application protocol"), "{text}");

    let mut tls = h.tls_connect(h.pki.client(&[b"foo"], None), PUBLIC_HOST);
    let err = tls
        .write_all(b"x")
        .and_then(|()| tls.flush())
        .and_then(|()| {
            let mut buf = [0u8; 1];
            tls.read(&mut buf).map(|_| ())
        });
    let err = err.expect_err("the engine must refuse an unknown ALPN");
    assert!(
        err.to_string().contains("NoApplicationProtocol"),
        "rustls should report the alert: {err}"
    );
    h.wait_metric(
        "jaunt_connections_refused_total",
        &[("reason", "unknown_alpn")],
        2,
    );
}

/// (2) Non-TLS first bytes are refused without an alert and counted as `not_tls`.
#[test]
fn non_tls_bytes_are_closed_and_counted() {
    let h = Options::default().start();
    let mut tcp = TcpStream::connect(h.addr()).unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut received = Vec::new();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let _ = tcp.read_to_end(&mut received);
    assert!(
        received.is_empty(),
        "no alert or HTTP answer for non-TLS bytes: {received:?}"
    );
    h.wait_metric(
        "jaunt_connections_refused_total",
        &[("reason", "not_tls")],
        1,
    );
}

/// (3) curl gets the web ping JSON with SNI = the public host; other paths are 404.
#[test]
fn web_ping_over_curl() {
    let h = Options::default().start();
    let ca = h.write_file("ca.pem", &h.pki.web.pem());
    let port = h.addr().port();
    let url = |path: &str| format!("https://{PUBLIC_HOST}:{port}{path}");
    let resolve = format!("{PUBLIC_HOST}:{port}:127.0.0.1");
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(&ca)
        .args(["--resolve", &resolve, &url("/webapi/ping")])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let body: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(body["cluster"], CLUSTER);
    assert_eq!(body["public_addr"], PUBLIC_HOST);
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));

    assert_eq!(h.curl_status("/nope"), "404");
    h.wait_metric("jaunt_connections_accepted_total", &[("route", "web")], 2);
    h.wait_metric("jaunt_handshake_seconds_count", &[], 2);
    assert!(
        h.metric(
            "jaunt_bytes_total",
            &[("route", "web"), ("direction", "to_client")]
        ) > 0
    );
}

/// (4) jaunt-control is passed through byte for byte, after a PROXY v2 header naming the client:
/// the client completes a handshake with the stand-in control's certificate (which the engine
/// does not have) and exchanges data.
#[test]
fn control_is_passed_through_untouched() {
    let h = Options::default().start();
    let control = h.control.as_ref().unwrap();
    let config = client_config(&control.ca, &[ALPN_CONTROL], None);
    let mut tls = h.tls_connect(config, "control.test");
    let client_addr = tls.sock.local_addr().unwrap();
    tls.write_all(b"hello control\n").unwrap();
    tls.flush().unwrap();
    let mut answer = String::new();
    BufReader::new(&mut tls).read_line(&mut answer).unwrap();
    assert_eq!(answer, "control:hello control\n");
    {
        let proxied = control.proxied.lock().unwrap();
        assert_eq!(
            proxied.len(),
            1,
            "one connection reached control: {proxied:?}"
        );
        assert_eq!(
            proxied[0].source,
            Some(client_addr),
            "the PROXY header names the client's address"
        );
        assert_eq!(
            proxied[0].next_byte,
            Some(0x16),
            "the TLS bytes follow the header"
        );
    }
    let leaf = tls.conn.peer_certificates().unwrap()[0].clone();
    assert_eq!(
        leaf, control.leaf,
        "the client must see control's own certificate"
    );
    assert_eq!(tls.conn.alpn_protocol(), Some(ALPN_CONTROL));
    h.wait_metric(
        "jaunt_connections_accepted_total",
        &[("route", "control")],
        1,
    );
    assert!(
        h.metric(
            "jaunt_bytes_total",
            &[("route", "control"), ("direction", "from_client")]
        ) > 0
    );
}

/// (5) A user with a valid certificate but no agent gets a readable refusal; an unknown target
/// says so; without a client certificate the handshake fails.
#[test]
fn user_route_without_agent_answers_agent_offline() {
    let h = Options::default().start();
    let alice = h.pki.user.identity(&identity(IdentityKind::User, "alice"));
    let mut tls = h.tls_connect(h.pki.client(&[ALPN_SSH], Some(dup(&alice))), PUBLIC_HOST);
    let response = dial(&mut tls, &request(DialKind::Ssh, "web1")).unwrap();
    assert!(!response.ok);
    let error = response.error.unwrap();
    assert!(
        error.starts_with(r#"agent for node "web1" is offline: agent "host-1""#),
        "{error}"
    );

    let mut tls = h.tls_connect(h.pki.client(&[ALPN_SSH], Some(dup(&alice))), PUBLIC_HOST);
    let response = dial(&mut tls, &request(DialKind::Ssh, "web9")).unwrap();
    assert_eq!(
        response.error.as_deref(),
        Some(r#"no such node "web9" in cluster "test-cluster""#)
    );

    // The dial kind must match the ALPN.
    let mut tls = h.tls_connect(h.pki.client(&[ALPN_SSH], Some(dup(&alice))), PUBLIC_HOST);
    let db = DialRequest {
        join: None,
        kind: DialKind::Db,
        target: "pg".into(),
        login: None,
        db_user: Some("alice".into()),
        db_name: None,
    };
    let error = dial(&mut tls, &db).unwrap().error.unwrap_or_default();
    assert!(error.contains("negotiated ssh"), "{error}");

    // A host certificate is not a user certificate (and is not even issued by the user CA).
    let host = h.pki.host.identity(&identity(IdentityKind::Host, "host-1"));
    let mut tls = h.tls_connect(h.pki.client(&[ALPN_SSH], Some(host)), PUBLIC_HOST);
    assert!(dial(&mut tls, &request(DialKind::Ssh, "web1")).is_err());

    let mut tls = h.tls_connect(h.pki.client(&[ALPN_SSH], None), PUBLIC_HOST);
    let result = dial(&mut tls, &request(DialKind::Ssh, "web1"));
    assert!(
        result.is_err(),
        "no client certificate must fail: {result:?}"
    );

    h.wait_metric(
        "jaunt_connections_refused_total",
        &[("reason", "agent_offline")],
        1,
    );
    h.wait_metric(
        "jaunt_connections_refused_total",
        &[("reason", "unknown_target")],
        1,
    );
    h.wait_metric(
        "jaunt_connections_refused_total",
        &[("reason", "tls_handshake")],
        2,
    );
}

/// A user stream reaches a stand-in agent through its tunnel: dial, greeting, echo; an agent
/// that refuses the stream produces a readable error; metrics count the tunnel and the stream.
#[test]
fn user_stream_is_spliced_through_the_agent_tunnel() {
    let mut h = Options {
        shards: 1,
        ..Options::default()
    }
    .start();
    // The agent announces node1 only: web1 and refuse-me reach it through the snapshot's
    // targets (control's registrations).
    let agent = StandInAgent::start(
        h.addr(),
        h.agent_config("host-1"),
        AgentPlan::new("node1", &[]),
    );
    let hello = agent.hello.recv_timeout(WAIT).unwrap();
    assert_eq!((hello.shards, hello.shard), (1, 0));
    h.wait_metric("jaunt_tunnels", &[("shard", "0")], 1);

    let alice = h.pki.user.identity(&identity(IdentityKind::User, "alice"));
    let mut tls = h.tls_connect(h.pki.client(&[ALPN_SSH], Some(dup(&alice))), PUBLIC_HOST);
    let response = dial(&mut tls, &request(DialKind::Ssh, "web1")).unwrap();
    assert!(response.ok, "{response:?}");
    let mut reader = BufReader::new(tls);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "hello alice as root via agent\n");
    reader.get_mut().write_all(b"ping\n").unwrap();
    reader.get_mut().flush().unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "ping\n");
    h.wait_metric("jaunt_streams_open", &[("shard", "0")], 1);
    drop(reader);
    wait_for("stream closed", || h.metric("jaunt_streams_open", &[]) == 0);

    // Bytes sent right behind the dial request (before its answer) reach the target.
    let mut tls = h.tls_connect(h.pki.client(&[ALPN_SSH], Some(dup(&alice))), PUBLIC_HOST);
    tls.write_all(&[request(DialKind::Ssh, "web1").encode(), b"early\n".to_vec()].concat())
        .unwrap();
    tls.flush().unwrap();
    let mut frame = [0u8; 2 + 11];
    tls.read_exact(&mut frame).unwrap();
    assert_eq!(&frame[2..], br#"{"ok":true}"#);
    let mut reader = BufReader::new(tls);
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "hello alice as root via agent\n");
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "early\n");
    drop(reader);

    let mut tls = h.tls_connect(h.pki.client(&[ALPN_SSH], Some(alice)), PUBLIC_HOST);
    let response = dial(&mut tls, &request(DialKind::Ssh, "refuse-me")).unwrap();
    let error = response.error.unwrap_or_default();
    assert!(
        error.contains("connection refused by the test target"),
        "{error}"
    );
    h.wait_metric(
        "jaunt_connections_refused_total",
        &[("reason", "dial_failed")],
        1,
    );

    // Shutdown drains the tunnel: the agent sees it end.
    let engine = h.engine.take().unwrap();
    engine.shutdown(Duration::from_secs(5)).unwrap();
    agent.done.recv_timeout(WAIT).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Routing to agents' announced resources

fn pattern(offset: u64, len: usize) -> &'static [u8] {
    let start = (offset % PATTERN_PERIOD as u64) as usize;
    &pattern_block()[start..start + len]
}

/// On its own executor thread: connects as a user with `config`, dials `request`, then writes
/// `total` pattern bytes (in chunks of varying size, then a half-close) while reading the echo
/// back and checking every byte. Returns the time the echo took.
fn echo_through_engine(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    request: DialRequest,
    total: u64,
) -> Duration {
    on_thread_executor(move || async move {
        let tcp = glommio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let connector = futures_rustls::TlsConnector::from(config);
        let mut tls = connector
            .connect(ServerName::try_from(PUBLIC_HOST).unwrap(), tcp)
            .await
            .unwrap();
        tls.write_all(&request.encode()).await.unwrap();
        tls.flush().await.unwrap();
        let mut frame = vec![0u8; 2];
        tls.read_exact(&mut frame).await.unwrap();
        frame.resize(2 + usize::from(u16::from_be_bytes([frame[0], frame[1]])), 0);
        tls.read_exact(&mut frame[2..]).await.unwrap();
        let (response, _) = DialResponse::parse(&frame).unwrap().unwrap();
        assert!(response.ok, "{response:?}");
        let (mut reader, mut writer) = futures_lite::io::split(tls);
        let started = Instant::now();
        let write = async {
            const SIZES: [usize; 5] = [PATTERN_CHUNK, 1000, 16 << 10, 7, 40_000];
            let mut offset = 0u64;
            for i in 0.. {
                if offset == total {
                    break;
                }
                let len = SIZES[i % SIZES.len()].min((total - offset) as usize);
                writer.write_all(pattern(offset, len)).await.unwrap();
                offset += len as u64;
            }
            writer.close().await.unwrap();
        };
        let read = async {
            let mut buf = vec![0u8; PATTERN_CHUNK];
            let mut offset = 0u64;
            loop {
                let n = reader.read(&mut buf).await.unwrap();
                if n == 0 {
                    return offset;
                }
                assert!(
                    buf[..n] == *pattern(offset, n),
                    "corrupt echo: {n} bytes at offset {offset}"
                );
                offset += n as u64;
            }
        };
        let ((), echoed) = futures_lite::future::zip(write, read).await;
        assert_eq!(echoed, total, "echoed byte count");
        started.elapsed()
    })
}

fn recv_inventory(rx: &crossbeam_channel::Receiver<InventoryEvent>) -> InventoryEvent {
    rx.recv_timeout(WAIT).expect("an inventory event")
}

/// A stream to a TCP app the agent announced (no snapshot target anywhere) reaches the agent's
/// echo, and 100 MiB come back intact.
#[test]
fn announced_tcp_app_echoes_100_mib() {
    let (inventory_tx, inventory) = crossbeam_channel::unbounded();
    let h = Options {
        shards: 1,
        targets: Targets::default(),
        inventory: Some(inventory_tx),
        ..Options::default()
    }
    .start();
    let _agent = StandInAgent::start(
        h.addr(),
        h.agent_config("host-7"),
        AgentPlan::new("node7", &["echo"]),
    );
    assert!(matches!(
        recv_inventory(&inventory),
        InventoryEvent::TunnelUp { .. }
    ));
    let total = 100 << 20;
    let took = echo_through_engine(
        h.addr(),
        h.alice(ALPN_TCP),
        request(DialKind::Tcp, "echo"),
        total,
    );
    eprintln!(
        "tcp app echo through engine + tunnel: 100 MiB each way in {:.2} s = {:.0} MiB/s",
        took.as_secs_f64(),
        100.0 / took.as_secs_f64()
    );
    h.wait_metric(
        "jaunt_bytes_total",
        &[("route", "tcp"), ("direction", "from_client")],
        total,
    );
    wait_for("stream closed", || h.metric("jaunt_streams_open", &[]) == 0);
}

/// Writes `message` and reads its echo back.
fn echo_once(tls: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>, message: &[u8]) {
    tls.write_all(message).unwrap();
    tls.flush().unwrap();
    let mut echoed = vec![0u8; message.len()];
    tls.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, message);
}

/// A lock in a new snapshot closes the live sessions it matches (and only those), counted.
#[test]
fn a_lock_closes_matching_live_sessions() {
    let (inventory_tx, inventory) = crossbeam_channel::unbounded();
    let h = Options {
        shards: 1,
        targets: Targets::default(),
        inventory: Some(inventory_tx),
        ..Options::default()
    }
    .start();
    let _agent = StandInAgent::start(
        h.addr(),
        h.agent_config("host-7"),
        AgentPlan::new("node7", &["echo"]),
    );
    assert!(matches!(
        recv_inventory(&inventory),
        InventoryEvent::TunnelUp { .. }
    ));
    let connect = |name: &str| {
        let mut tls = h.tls_connect(h.user(name, ALPN_TCP), PUBLIC_HOST);
        let response = dial(&mut tls, &request(DialKind::Tcp, "echo")).unwrap();
        assert!(response.ok, "{response:?}");
        tls.sock.set_read_timeout(Some(WAIT)).unwrap();
        tls
    };
    let mut alice = connect("alice");
    let mut bob = connect("bob");
    echo_once(&mut alice, b"alice before");
    echo_once(&mut bob, b"bob before");
    wait_for("two streams open", || {
        h.metric("jaunt_streams_open", &[]) == 2
    });

    h.send_snapshot_with_locks(
        2,
        Targets::default(),
        vec![jaunt_config::rbac::ActiveLock {
            name: "lock-alice".into(),
            target: jaunt_config::resource::LockTarget::User("alice".into()),
            message: "alice is locked".into(),
            expires: None,
        }],
    );
    // Alice's connection ends: EOF or an error, not the read timeout.
    let mut buf = [0u8; 64];
    match alice.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("alice read {n} bytes after the lock"),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "alice's session was not closed: {e}"
        ),
    }
    h.wait_metric(
        "jaunt_sessions_closed_total",
        &[("shard", "0"), ("reason", "lock")],
        1,
    );
    // Bob's session is untouched.
    echo_once(&mut bob, b"bob after the lock");
    assert_eq!(
        h.metric("jaunt_sessions_closed_total", &[("reason", "lock")]),
        1
    );
    wait_for("alice's stream closed", || {
        h.metric("jaunt_streams_open", &[]) == 1
    });
    // A new session of alice is refused.
    let mut tls = h.tls_connect(h.user("alice", ALPN_TCP), PUBLIC_HOST);
    let response = dial(&mut tls, &request(DialKind::Tcp, "echo")).unwrap();
    assert!(!response.ok, "{response:?}");
    echo_once(&mut bob, b"bob still");
}

fn recv_audit(rx: &crossbeam_channel::Receiver<AuditEvent>) -> AuditEvent {
    rx.recv_timeout(WAIT).expect("an audit event")
}

/// A session through the agent is audited as a start, then an end with its plaintext byte
/// counts; a refused dial as an access denial.
#[test]
fn sessions_and_denials_reach_the_audit_queue() {
    let (inventory_tx, inventory) = crossbeam_channel::unbounded();
    let (audit_tx, audit) = crossbeam_channel::unbounded();
    let h = Options {
        shards: 1,
        targets: Targets::default(),
        inventory: Some(inventory_tx),
        audit: Some(audit_tx),
        ..Options::default()
    }
    .start();
    let _agent = StandInAgent::start(
        h.addr(),
        h.agent_config("host-7"),
        AgentPlan::new("node7", &["echo"]),
    );
    assert!(matches!(
        recv_inventory(&inventory),
        InventoryEvent::TunnelUp { .. }
    ));
    let mut tls = h.tls_connect(h.user("alice", ALPN_TCP), PUBLIC_HOST);
    let response = dial(&mut tls, &request(DialKind::Tcp, "echo")).unwrap();
    assert!(response.ok, "{response:?}");
    let start = recv_audit(&audit);
    let AuditEvent::SessionStart {
        session_id,
        kind,
        user,
        target,
        ..
    } = &start
    else {
        panic!("expected a session start, got {start:?}");
    };
    assert_eq!(
        (*kind, user.as_str(), target.as_str()),
        (DialKind::Tcp, "alice", "echo")
    );
    tls.sock.set_read_timeout(Some(WAIT)).unwrap();
    echo_once(&mut tls, b"hello audit");
    echo_once(&mut tls, b"twice");
    tls.conn.send_close_notify();
    tls.flush().unwrap();
    drop(tls);
    match recv_audit(&audit) {
        AuditEvent::SessionEnd {
            session_id: ended,
            user,
            bytes_in,
            bytes_out,
            ..
        } => {
            assert_eq!(&ended, session_id);
            assert_eq!(user, "alice");
            assert_eq!((bytes_in, bytes_out), (16, 16));
        }
        other => panic!("expected a session end, got {other:?}"),
    }

    let mut tls = h.tls_connect(h.user("bob", ALPN_TCP), PUBLIC_HOST);
    let response = dial(&mut tls, &request(DialKind::Tcp, "nope")).unwrap();
    let message = response.error.unwrap_or_default();
    match recv_audit(&audit) {
        AuditEvent::AccessDenied {
            user,
            kind,
            target,
            reason,
            ..
        } => {
            assert_eq!(
                (user.as_str(), kind, target.as_str()),
                ("bob", DialKind::Tcp, "nope")
            );
            assert_eq!(reason, message);
        }
        other => panic!("expected an access denial, got {other:?}"),
    }
    assert!(audit.try_recv().is_err(), "no more events");
}

/// Under `Reject`, a full audit queue refuses new sessions (counted).
#[test]
fn a_full_audit_queue_refuses_sessions() {
    let (inventory_tx, inventory) = crossbeam_channel::unbounded();
    let (audit_tx, audit) = crossbeam_channel::bounded(1);
    let h = Options {
        shards: 1,
        targets: Targets::default(),
        inventory: Some(inventory_tx),
        audit: Some(audit_tx),
        ..Options::default()
    }
    .start();
    let _agent = StandInAgent::start(
        h.addr(),
        h.agent_config("host-7"),
        AgentPlan::new("node7", &["echo"]),
    );
    assert!(matches!(
        recv_inventory(&inventory),
        InventoryEvent::TunnelUp { .. }
    ));
    let mut first = h.tls_connect(h.user("alice", ALPN_TCP), PUBLIC_HOST);
    let response = dial(&mut first, &request(DialKind::Tcp, "echo")).unwrap();
    assert!(response.ok, "{response:?}");
    let mut second = h.tls_connect(h.user("alice", ALPN_TCP), PUBLIC_HOST);
    let response = dial(&mut second, &request(DialKind::Tcp, "echo")).unwrap();
    assert_eq!(
        response.error.as_deref(),
        Some("audit queue full, try again")
    );
    h.wait_metric("jaunt_audit_refused_total", &[("shard", "0")], 1);
    // The first session still works; the queue holds its start only.
    first.sock.set_read_timeout(Some(WAIT)).unwrap();
    echo_once(&mut first, b"still here");
    assert!(matches!(
        audit.try_recv(),
        Ok(AuditEvent::SessionStart { .. })
    ));
    assert!(audit.try_recv().is_err());
}

/// A session whose role sets `disconnect_expired_cert` ends when the certificate expires.
#[test]
fn an_expiring_certificate_ends_its_session_when_the_role_says_so() {
    let (inventory_tx, inventory) = crossbeam_channel::unbounded();
    let h = Options {
        shards: 1,
        targets: Targets::default(),
        inventory: Some(inventory_tx),
        ..Options::default()
    }
    .start();
    let mut role = jaunt_config::resource::Role::builtin_access();
    role.spec.options.disconnect_expired_cert = Some(true);
    h.send_snapshot_with(2, Targets::default(), |s| {
        s.policy = jaunt_config::rbac::Policy::compile(&[role]).unwrap();
    });
    wait_for("snapshot 2", || {
        h.metric("jaunt_snapshot_version", &[]) == 2
    });
    let _agent = StandInAgent::start(
        h.addr(),
        h.agent_config("host-7"),
        AgentPlan::new("node7", &["echo"]),
    );
    assert!(matches!(
        recv_inventory(&inventory),
        InventoryEvent::TunnelUp { .. }
    ));
    let mut carol = identity(IdentityKind::User, "carol");
    carol.expires = unix_now() + 3;
    let config = h.pki.client(&[ALPN_TCP], Some(h.pki.user.identity(&carol)));
    let mut tls = h.tls_connect(config, PUBLIC_HOST);
    let response = dial(&mut tls, &request(DialKind::Tcp, "echo")).unwrap();
    assert!(response.ok, "{response:?}");
    echo_once(&mut tls, b"carol before expiry");
    tls.sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 64];
    match tls.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("carol read {n} bytes"),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "carol's session outlived her certificate: {e}"
        ),
    }
    assert!(unix_now() >= carol.expires);
}

/// A session whose role sets `client_idle_timeout` ends after that long without traffic, and
/// the refusal is counted as an idle timeout; the engine's own idle timeout is much longer.
#[test]
fn a_roles_client_idle_timeout_closes_a_quiet_session() {
    let (inventory_tx, inventory) = crossbeam_channel::unbounded();
    let h = Options {
        shards: 1,
        targets: Targets::default(),
        inventory: Some(inventory_tx),
        ..Options::default()
    }
    .start();
    let mut role = jaunt_config::resource::Role::builtin_access();
    role.spec.options.client_idle_timeout =
        Some(jaunt_config::duration::Duration(Duration::from_millis(400)));
    h.send_snapshot_with(2, Targets::default(), |s| {
        s.policy = jaunt_config::rbac::Policy::compile(&[role]).unwrap();
    });
    wait_for("snapshot 2", || {
        h.metric("jaunt_snapshot_version", &[]) == 2
    });
    let _agent = StandInAgent::start(
        h.addr(),
        h.agent_config("host-8"),
        AgentPlan::new("node8", &["echo"]),
    );
    assert!(matches!(
        recv_inventory(&inventory),
        InventoryEvent::TunnelUp { .. }
    ));
    let carol = identity(IdentityKind::User, "carol");
    let config = h.pki.client(&[ALPN_TCP], Some(h.pki.user.identity(&carol)));
    let mut tls = h.tls_connect(config, PUBLIC_HOST);
    let response = dial(&mut tls, &request(DialKind::Tcp, "echo")).unwrap();
    assert!(response.ok, "{response:?}");
    echo_once(&mut tls, b"carol is active");
    let quiet_since = std::time::Instant::now();
    tls.sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 64];
    match tls.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("carol read {n} bytes"),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "carol's quiet session outlived the role's idle timeout: {e}"
        ),
    }
    assert!(quiet_since.elapsed() >= Duration::from_millis(400));
    h.wait_metric(
        "jaunt_connections_refused_total",
        &[("reason", "idle_timeout")],
        1,
    );
}

/// The life of an agent as routing sees it: its tunnel comes up (inventory event, inventory
/// view), its node and app are dialable by name and kind, unknown names are refused readably,
/// and once it dies the same dial says `no such node` promptly (or, when control still lists
/// the node, that its agent is offline); the inventory says it is down.
#[test]
fn agent_resources_route_until_the_agent_goes() {
    let (inventory_tx, inventory) = crossbeam_channel::unbounded();
    let h = Options {
        shards: 1,
        targets: Targets::default(),
        inventory: Some(inventory_tx),
        ..Options::default()
    }
    .start();
    let agent = StandInAgent::start(
        h.addr(),
        h.agent_config("host-7"),
        AgentPlan::new("node7", &["echo"]),
    );
    match recv_inventory(&inventory) {
        InventoryEvent::TunnelUp {
            shard,
            host_id,
            name,
            labels,
            resources,
        } => {
            assert_eq!(
                (shard, host_id.as_str(), name.as_str()),
                (0, "host-7", "node7")
            );
            assert_eq!(labels.get("env").map(String::as_str), Some("test"));
            assert_eq!(
                resources,
                jaunt_testkit::tunnel::agent_hello("node7", &["echo"]).resources
            );
        }
        other => panic!("expected TunnelUp, got {other:?}"),
    }
    let listed = h.engine().inventory();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].host_id, "host-7");
    assert_eq!(listed[0].name, "node7");
    assert_eq!(listed[0].shards, vec![0]);
    assert_eq!(listed[0].resources.len(), 2);
    h.wait_metric("jaunt_tunnels", &[("shard", "0")], 1);

    // The node by name, over ssh.
    let (response, tls) = h.dial_as_alice(&request(DialKind::Ssh, "node7"));
    assert!(response.ok, "{response:?}");
    let mut greeting = String::new();
    BufReader::new(tls).read_line(&mut greeting).unwrap();
    assert_eq!(greeting, "hello alice as root via agent\n");

    // Names are per kind: node7 is not an app, echo is not a node.
    assert_eq!(
        h.dial_error(&request(DialKind::Tcp, "node7")),
        r#"no such app "node7" in cluster "test-cluster""#
    );
    assert_eq!(
        h.dial_error(&request(DialKind::Ssh, "echo")),
        r#"no such node "echo" in cluster "test-cluster""#
    );
    assert_eq!(
        h.dial_error(&request(DialKind::Ssh, "x")),
        r#"no such node "x" in cluster "test-cluster""#
    );

    // The agent dies without a goodbye.
    agent.stop.send(Stop::Kill).unwrap();
    agent.done.recv_timeout(WAIT).unwrap();
    let died = Instant::now();
    assert_eq!(
        recv_inventory(&inventory),
        InventoryEvent::TunnelDown {
            shard: 0,
            host_id: "host-7".into()
        }
    );
    let mut error = String::new();
    wait_for("the dead agent's node to be gone", || {
        error = h.dial_error(&request(DialKind::Ssh, "node7"));
        !error.is_empty()
    });
    assert_eq!(error, r#"no such node "node7" in cluster "test-cluster""#);
    assert!(
        died.elapsed() < Duration::from_secs(5),
        "took {:?}",
        died.elapsed()
    );
    assert!(h.engine().inventory().is_empty());
    assert_eq!(h.metric("jaunt_tunnels", &[]), 0);

    // Control still registers the node: its agent is offline, which the user is told.
    h.send_snapshot(
        2,
        Targets::default().with(DialKind::Ssh, "node7", Target::on_host("host-7")),
    );
    wait_for("snapshot 2", || {
        h.engine().snapshot_versions() == vec![Some(2)]
    });
    let error = h.dial_error(&request(DialKind::Ssh, "node7"));
    assert!(
        error.starts_with(r#"agent for node "node7" is offline: agent "host-7" has no tunnel"#),
        "{error}"
    );
    h.wait_metric(
        "jaunt_dial_misses_total",
        &[("reason", "unknown_target")],
        4,
    );
    h.wait_metric("jaunt_dial_misses_total", &[("reason", "agent_offline")], 1);
    assert!(inventory.try_recv().is_err(), "no more events");
}

/// An agent that dials until it has a tunnel to every shard (closing the duplicates cleanly)
/// is reachable from every shard; the duplicates are counted.
#[test]
fn an_agent_covering_every_shard_is_reachable_from_each() {
    let h = Options {
        shards: 2,
        targets: Targets::default(),
        ..Options::default()
    }
    .start();
    let agent = StandInAgent::start(
        h.addr(),
        h.agent_config("host-7"),
        AgentPlan {
            cover_all: true,
            ..AgentPlan::new("node7", &["echo"])
        },
    );
    let mut shards = Vec::new();
    while shards.len() < 2 {
        shards.push(agent.hello.recv_timeout(WAIT).unwrap().shard);
    }
    shards.sort_unstable();
    assert_eq!(shards, vec![0, 1]);
    wait_for("a tunnel on each shard", || {
        h.metric("jaunt_tunnels", &[("shard", "0")]) == 1
            && h.metric("jaunt_tunnels", &[("shard", "1")]) == 1
    });
    let mut duplicates = 0;
    for event in agent.drain_events() {
        match event {
            AgentEvent::Tunnel(hello) => assert!(shards.contains(&hello.shard)),
            AgentEvent::Duplicate(hello) => {
                assert!(shards.contains(&hello.shard));
                duplicates += 1;
            }
        }
    }
    h.wait_metric("jaunt_tunnels_duplicate_total", &[], duplicates);
    assert_eq!(h.metric("jaunt_tunnels_duplicate_total", &[]), duplicates);
    assert_eq!(h.engine().inventory()[0].shards, vec![0, 1]);
    // Whichever shard a user lands on, the dial is served there.
    for _ in 0..12 {
        let (response, _) = h.dial_as_alice(&request(DialKind::Tcp, "echo"));
        assert!(response.ok, "{response:?}");
    }
    assert_eq!(
        h.metric("jaunt_cross_shard_hops_total", &[("result", "miss")]),
        0
    );
}

/// With the agent's only tunnel on another shard, dials on either shard are served (a
/// cross-shard hop on the other one); nothing is counted as a miss.
#[test]
fn a_dial_on_a_shard_without_the_agent_hops() {
    let h = Options {
        shards: 2,
        targets: Targets::default(),
        ..Options::default()
    }
    .start();
    let agent = StandInAgent::start(
        h.addr(),
        h.agent_config("host-7"),
        AgentPlan::new("node7", &["echo"]),
    );
    let shard = agent.hello.recv_timeout(WAIT).unwrap().shard;
    h.wait_metric("jaunt_tunnels", &[("shard", &shard.to_string())], 1);
    for _ in 0..64 {
        assert_eq!(h.dial_error(&request(DialKind::Tcp, "echo")), "");
        if h.metric("jaunt_cross_shard_hops_total", &[("result", "ok")]) > 0 {
            break;
        }
    }
    h.wait_metric("jaunt_cross_shard_hops_total", &[("result", "ok")], 1);
    // Every dial's stream open was timed, local or hop.
    assert!(h.metric("jaunt_stream_open_seconds_count", &[]) >= 1);
    assert_eq!(
        h.metric("jaunt_cross_shard_hops_total", &[("result", "miss")]),
        0
    );
    assert_eq!(
        h.metric("jaunt_dial_misses_total", &[("reason", "other_shard")]),
        0
    );
}

/// The same host registering a second tunnel on a shard (a restarted agent) replaces the first:
/// the older drains and ends, dials go to the newer, control hears no TunnelDown.
#[test]
fn a_restarted_agent_replaces_its_tunnel() {
    let (inventory_tx, inventory) = crossbeam_channel::unbounded();
    let h = Options {
        shards: 1,
        targets: Targets::default(),
        inventory: Some(inventory_tx),
        ..Options::default()
    }
    .start();
    let old = StandInAgent::start(
        h.addr(),
        h.agent_config("host-7"),
        AgentPlan {
            tag: "old",
            ..AgentPlan::new("node7", &[])
        },
    );
    assert!(matches!(
        recv_inventory(&inventory),
        InventoryEvent::TunnelUp { .. }
    ));
    let new = StandInAgent::start(
        h.addr(),
        h.agent_config("host-7"),
        AgentPlan {
            tag: "new",
            ..AgentPlan::new("node7", &["echo"])
        },
    );
    match recv_inventory(&inventory) {
        InventoryEvent::TunnelUp { resources, .. } => assert_eq!(resources.len(), 2),
        other => panic!("expected TunnelUp, got {other:?}"),
    }
    h.wait_metric("jaunt_tunnels_replaced_total", &[("shard", "0")], 1);
    old.done.recv_timeout(WAIT).unwrap();
    wait_for("only the new tunnel's connection", || {
        h.metric("jaunt_connections_active", &[]) == 1
    });
    assert_eq!(h.metric("jaunt_tunnels", &[]), 1);
    let (response, tls) = h.dial_as_alice(&request(DialKind::Ssh, "node7"));
    assert!(response.ok, "{response:?}");
    let mut greeting = String::new();
    BufReader::new(tls).read_line(&mut greeting).unwrap();
    assert_eq!(greeting, "hello alice as root via new\n");
    assert!(h.dial_error(&request(DialKind::Tcp, "echo")).is_empty());
    assert!(
        inventory.try_recv().is_err(),
        "no TunnelDown for a replacement"
    );
    assert_eq!(h.engine().inventory()[0].resources.len(), 2);
    drop(new);
}

/// Heartbeats: an agent that answers the engine's keepalive PINGs stays registered through
/// idle time longer than the dead-peer timeout; once it goes silent without closing its
/// connection (hung, or its NAT forgot the flow), the engine drops it after the dead-peer
/// timeout and reports it down.
#[test]
fn a_silent_agent_is_dropped_after_the_dead_peer_timeout() {
    let dead_peer_timeout = Duration::from_millis(1500);
    let (inventory_tx, inventory) = crossbeam_channel::unbounded();
    let h = Options {
        shards: 1,
        targets: Targets::default(),
        inventory: Some(inventory_tx),
        tunnel_timers: mux::Config {
            keepalive_interval: Duration::from_millis(250),
            dead_peer_timeout,
        },
        ..Options::default()
    }
    .start();
    let agent = StandInAgent::start(
        h.addr(),
        h.agent_config("host-7"),
        AgentPlan::new("node7", &[]),
    );
    assert!(matches!(
        recv_inventory(&inventory),
        InventoryEvent::TunnelUp { .. }
    ));
    // Idle but answering pings: nothing happens for well over the dead-peer timeout.
    let quiet = inventory.recv_timeout(dead_peer_timeout + Duration::from_secs(1));
    assert!(quiet.is_err(), "{quiet:?}");
    assert!(h.dial_as_alice(&request(DialKind::Ssh, "node7")).0.ok);

    agent.stop.send(Stop::Freeze).unwrap();
    let frozen = Instant::now();
    assert_eq!(
        recv_inventory(&inventory),
        InventoryEvent::TunnelDown {
            shard: 0,
            host_id: "host-7".into()
        }
    );
    let took = frozen.elapsed();
    // Detected by the dead-peer timer (not earlier), then at most CLOSE_TIMEOUT to say goodbye.
    assert!(
        took >= dead_peer_timeout - Duration::from_millis(300)
            && took
                < dead_peer_timeout + jaunt_engine::tunnel::CLOSE_TIMEOUT + Duration::from_secs(2),
        "took {took:?}"
    );
    assert_eq!(
        h.dial_error(&request(DialKind::Ssh, "node7")),
        r#"no such node "node7" in cluster "test-cluster""#
    );
    agent.stop.send(Stop::Kill).unwrap();
    agent.done.recv_timeout(WAIT).unwrap();
}

/// A tunnel the agent closes cleanly right after the tunnel hello (it already covers that
/// shard) is counted as a duplicate: not a refusal, not registered, not logged as a failure.
/// An agent hello that does not parse is refused and counted.
#[test]
fn a_duplicate_tunnel_is_counted_not_an_error() {
    log_capture::install();
    let h = Options {
        shards: 1,
        ..Options::default()
    }
    .start();
    let config = h.agent_config("host-7");
    let addr = h.addr();
    let (shard, peer) = on_thread_executor(move || async move {
        let (mut tls, hello) = tunnel_connect(addr, &config).await;
        let peer = tls.get_ref().0.local_addr().unwrap();
        tls.close().await.unwrap();
        // The engine closes its side too, cleanly.
        let mut rest = Vec::new();
        tls.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        (hello.shard, peer)
    });
    h.wait_metric(
        "jaunt_tunnels_duplicate_total",
        &[("shard", &shard.to_string())],
        1,
    );
    wait_for("the duplicate's connection closed", || {
        h.metric("jaunt_connections_active", &[]) == 0
    });
    assert_eq!(h.metric("jaunt_tunnels", &[]), 0);
    assert_eq!(h.metric("jaunt_connections_refused_total", &[]), 0);
    assert!(h.engine().inventory().is_empty());
    let peer = peer.to_string();
    let about_it: Vec<_> = log_capture::events()
        .into_iter()
        .filter(|e| e.fields.get("peer") == Some(&peer))
        .collect();
    assert!(
        about_it
            .iter()
            .any(|e| e.message == "duplicate agent tunnel closed by the agent"),
        "{about_it:?}"
    );
    assert!(
        about_it
            .iter()
            .all(|e| e.level > tracing::Level::INFO && !e.message.contains("failed")),
        "a duplicate is logged at debug only: {about_it:?}"
    );

    // A hello that is not JSON.
    let config = h.agent_config("host-7");
    on_thread_executor(move || async move {
        let (mut tls, _) = tunnel_connect(addr, &config).await;
        tls.write_all(b"\x00\x05hello").await.unwrap();
        tls.flush().await.unwrap();
        let mut rest = Vec::new();
        let _ = tls.read_to_end(&mut rest).await;
    });
    h.wait_metric(
        "jaunt_connections_refused_total",
        &[("reason", "bad_agent_hello")],
        1,
    );
    assert_eq!(h.metric("jaunt_tunnels", &[]), 0);
}

/// A process-wide `tracing` subscriber that records every event, so a test can check what the
/// engine logged about one connection (identified by its `peer` field).
mod log_capture {
    use std::collections::BTreeMap;
    use std::fmt::Debug;
    use std::sync::{Mutex, OnceLock};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Level, Metadata, Subscriber};

    #[derive(Clone, Debug)]
    pub struct Captured {
        pub level: Level,
        pub message: String,
        pub fields: BTreeMap<String, String>,
    }

    fn store() -> &'static Mutex<Vec<Captured>> {
        static EVENTS: OnceLock<Mutex<Vec<Captured>>> = OnceLock::new();
        EVENTS.get_or_init(|| Mutex::new(Vec::new()))
    }

    /// Installs the subscriber (once per process; later calls do nothing).
    pub fn install() {
        static INSTALLED: OnceLock<()> = OnceLock::new();
        INSTALLED.get_or_init(|| {
            let _ = tracing::subscriber::set_global_default(Capture);
        });
    }

    /// Everything recorded so far.
    pub fn events() -> Vec<Captured> {
        store().lock().unwrap().clone()
    }

    struct Capture;

    #[derive(Default)]
    struct Fields {
        message: String,
        fields: BTreeMap<String, String>,
    }

    impl Visit for Fields {
        fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
            self.record_str(field, &format!("{value:?}"));
        }

        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "message" {
                self.message = value.to_owned();
            } else {
                self.fields
                    .insert(field.name().to_owned(), value.to_owned());
            }
        }
    }

    impl Subscriber for Capture {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }

        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }

        fn record(&self, _: &Id, _: &Record<'_>) {}

        fn record_follows_from(&self, _: &Id, _: &Id) {}

        fn event(&self, event: &Event<'_>) {
            let mut fields = Fields::default();
            event.record(&mut fields);
            store().lock().unwrap().push(Captured {
                level: *event.metadata().level(),
                message: fields.message,
                fields: fields.fields,
            });
        }

        fn enter(&self, _: &Id) {}

        fn exit(&self, _: &Id) {}
    }
}

/// (6) /readyz is 503 until a snapshot is applied on every shard, then 200; /healthz is 200.
#[test]
fn readyz_flips_once_a_snapshot_is_applied() {
    let h = Options {
        send_snapshot: false,
        ..Options::default()
    }
    .start();
    assert_eq!(h.diag("/healthz").0, 200);
    assert_eq!(h.diag("/readyz").0, 503);
    assert!(!h.engine().ready());
    h.send_snapshot(42, Targets::default());
    h.wait_ready();
    assert_eq!(h.engine().snapshot_versions(), vec![Some(42), Some(42)]);
    h.wait_metric("jaunt_snapshot_version", &[("shard", "1")], 42);
    // An older snapshot arriving late is ignored.
    h.send_snapshot(41, Targets::default());
    h.send_snapshot(43, Targets::default());
    wait_for("version 43", || {
        h.engine().snapshot_versions() == vec![Some(43), Some(43)]
    });
    assert_eq!(h.diag("/nope").0, 404);
}

/// (7) Shutdown returns promptly, closes the port, and aborts what is still open at the drain
/// deadline.
#[test]
fn shutdown_is_prompt_and_closes_the_port() {
    let mut h = Options::default().start();
    let addr = h.addr();
    // One connection that stays open: a pass-through to control that sends nothing after its
    // ClientHello (the stand-in control waits for the rest of the handshake).
    let mut held = TcpStream::connect(addr).unwrap();
    held.write_all(&client_hello_bytes(&h.pki, &[ALPN_CONTROL]))
        .unwrap();
    h.wait_metric(
        "jaunt_connections_accepted_total",
        &[("route", "control")],
        1,
    );

    let engine = h.engine.take().unwrap();
    let started = Instant::now();
    let report = engine.shutdown(Duration::from_millis(300)).unwrap();
    let took = started.elapsed();
    assert_eq!(report.aborted_connections, 1);
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    assert!(closed_by_peer(&mut held));
    let refused = TcpStream::connect(addr);
    assert!(refused.is_err(), "the port must be closed after shutdown");

    // And with nothing open it is immediate.
    let mut h2 = Options::default().start();
    let engine = h2.engine.take().unwrap();
    let started = Instant::now();
    let report = engine.shutdown(Duration::from_secs(30)).unwrap();
    assert_eq!(report.aborted_connections, 0);
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// (8) A slowloris that sends half a ClientHello is closed after the handshake timeout.
#[test]
fn slowloris_is_closed_after_the_handshake_timeout() {
    let h = Options {
        handshake_timeout: Duration::from_millis(300),
        ..Options::default()
    }
    .start();
    let hello = client_hello_bytes(&h.pki, &[ALPN_SSH]);
    let mut tcp = TcpStream::connect(h.addr()).unwrap();
    tcp.write_all(&hello[..hello.len() / 2]).unwrap();
    assert!(
        closed_by_peer(&mut tcp),
        "the engine must close a stalled handshake"
    );
    h.wait_metric(
        "jaunt_connections_refused_total",
        &[("reason", "handshake_timeout")],
        1,
    );
}

/// At its handshake bound a shard accepts no more: the next connection waits in the listen
/// backlog. A client that gave up while waiting there costs no TLS handshake once accepted: it is
/// counted as abandoned.
#[test]
fn at_the_handshake_bound_clients_wait_and_those_gone_cost_no_handshake() {
    let h = Options {
        shards: 1,
        max_handshakes_per_shard: 1,
        ..Options::default()
    }
    .start();
    let hello = client_hello_bytes(&h.pki, &[ALPN_SSH]);
    // Takes the only slot (for up to the 1 s admission hold): connected, a first byte sent.
    let staller = started_hello(h.addr());
    h.wait_metric("jaunt_handshake_admission_waits_total", &[], 1);
    // Waits in the backlog, sends its ClientHello and leaves.
    let mut quitter = TcpStream::connect(h.addr()).unwrap();
    quitter.write_all(&hello).unwrap();
    drop(quitter);
    // The slot frees: the quitter is accepted, found gone, and no handshake is tried.
    drop(staller);
    h.wait_metric("jaunt_handshakes_abandoned_total", &[], 1);
    wait_for("no handshake in flight", || {
        h.metric("jaunt_handshakes_in_flight", &[]) == 0
    });
    assert_eq!(
        h.metric(
            "jaunt_connections_refused_total",
            &[("reason", "tls_handshake")]
        ),
        0
    );
}

/// A TCP connection to `addr` from `source` (an address of this host's loopback /8).
fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    use rustix::net::{AddressFamily, SocketType};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    let source: SocketAddr = format!("{source}:0").parse().unwrap();
    rustix::net::bind(&fd, &source).unwrap();
    rustix::net::connect(&fd, &addr).unwrap();
    TcpStream::from(fd)
}

/// One address that opens connections and stalls their handshakes holds at most its share of a
/// shard's handshake slots (an eighth of the bound): the accept loop never waits on its account,
/// and a client from another address gets through.
#[test]
fn a_peer_stalling_handshakes_holds_only_its_share_of_the_slots() {
    let h = Options {
        shards: 1,
        max_handshakes_per_shard: 8,
        ..Options::default()
    }
    .start();
    // Eight connections from 127.0.0.2, stalled after a first byte: as many as the bound.
    let stalled: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut tcp = connect_from("127.0.0.2", h.addr());
            tcp.write_all(&[22]).unwrap();
            tcp
        })
        .collect();
    h.wait_metric("jaunt_handshake_admission_over_share_total", &[], 7);
    // One counted (none once the 1 s admission hold has expired it).
    assert!(h.metric("jaunt_handshakes_in_flight", &[]) <= 1);
    assert_eq!(h.metric("jaunt_handshake_admission_waits_total", &[]), 0);
    // Someone else (curl, from 127.0.0.1) is served while they stall.
    assert_eq!(h.curl_status("/webapi/ping"), "200");
    assert_eq!(h.metric("jaunt_handshake_admission_waits_total", &[]), 0);
    drop(stalled);
    wait_for("no handshake in flight", || {
        h.metric("jaunt_handshakes_in_flight", &[]) == 0
    });
}

/// A spliced connection that stays silent for the idle timeout is closed and counted.
#[test]
fn idle_spliced_connection_is_closed() {
    let h = Options {
        idle_timeout: Duration::from_millis(300),
        ..Options::default()
    }
    .start();
    // A ClientHello for control and then nothing: control answers with its first flight and
    // waits for the client's, and the splice goes quiet.
    let mut tcp = TcpStream::connect(h.addr()).unwrap();
    tcp.write_all(&client_hello_bytes(&h.pki, &[ALPN_CONTROL]))
        .unwrap();
    assert!(
        closed_by_peer(&mut tcp),
        "the engine must close an idle splice"
    );
    h.wait_metric(
        "jaunt_connections_refused_total",
        &[("reason", "idle_timeout")],
        1,
    );
}

/// A malformed ClientHello gets a decode_error alert and is counted as `malformed`.
#[test]
fn malformed_hello_gets_decode_error() {
    let h = Options::default().start();
    // One byte past the ClientHello inside its record.
    let mut hello = client_hello_bytes(&h.pki, &[ALPN_SSH]);
    let record_len = u16::from_be_bytes([hello[3], hello[4]]) + 1;
    hello[3..5].copy_from_slice(&record_len.to_be_bytes());
    hello.push(0);
    let mut tcp = TcpStream::connect(h.addr()).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.write_all(&hello).unwrap();
    let mut alert = Vec::new();
    let _ = tcp.read_to_end(&mut alert);
    assert_eq!(alert, [21, 3, 3, 0, 2, 2, 50], "a fatal decode_error alert");
    h.wait_metric(
        "jaunt_connections_refused_total",
        &[("reason", "malformed")],
        1,
    );
}

/// Connections beyond max_connections_per_shard are refused at once and counted.
#[test]
fn connection_limit_is_enforced_per_shard() {
    let h = Options {
        shards: 1,
        max_connections_per_shard: 1,
        ..Options::default()
    }
    .start();
    let _first = started_hello(h.addr());
    wait_for("one active connection", || {
        h.metric("jaunt_connections_active", &[]) == 1
    });
    let mut second = started_hello(h.addr());
    assert!(closed_by_peer(&mut second));
    h.wait_metric(
        "jaunt_connections_refused_total",
        &[("reason", "too_many_connections")],
        1,
    );
}

/// SIGHUP semantics: after reload_tls, new handshakes present the new certificate, and a
/// connection established before keeps working.
#[test]
fn reload_tls_switches_new_handshakes_only() {
    let h = Options::default().start();
    let ping = b"GET /webapi/ping HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let read_response = |tls: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>| {
        let mut head = String::new();
        let mut reader = BufReader::new(tls);
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            if let Some(v) = line.strip_prefix("content-length: ") {
                length = v.trim().parse().unwrap();
            }
            head.push_str(&line);
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        Ok::<String, std::io::Error>(head)
    };
    let mut live = h.tls_connect(h.pki.client(&[], None), PUBLIC_HOST);
    live.write_all(ping).unwrap();
    assert!(read_response(&mut live)
        .unwrap()
        .starts_with("HTTP/1.1 200 OK"));

    let new_web = Ca::new("Jaunt Test Web CA 2");
    let mut early = h.tls_connect(client_config(&new_web, &[], None), PUBLIC_HOST);
    let early = early
        .write_all(ping)
        .and_then(|()| read_response(&mut early));
    assert!(
        early.is_err(),
        "the new CA must not verify the old certificate"
    );

    h.engine().reload_tls(h.pki.tls_configs(&new_web)).unwrap();
    let mut fresh = h.tls_connect(client_config(&new_web, &[], None), PUBLIC_HOST);
    fresh.write_all(ping).unwrap();
    assert!(read_response(&mut fresh)
        .unwrap()
        .starts_with("HTTP/1.1 200 OK"));

    live.write_all(ping).unwrap();
    assert!(read_response(&mut live)
        .unwrap()
        .starts_with("HTTP/1.1 200 OK"));
}

/// Web apps answer 502 for now; unknown hosts are refused.
#[test]
fn app_route_needs_a_user_certificate_and_a_known_app() {
    let h = Options::default().start();
    let get = |config: Arc<rustls::ClientConfig>| {
        let mut tls = h.tls_connect(config, "grafana.localhost");
        tls.write_all(b"GET / HTTP/1.1\r\nHost: grafana.localhost\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        let _ = tls.read_to_string(&mut response);
        response
    };
    // No certificate (a browser): told how to get in, and the connection closes.
    let response = get(h.pki.client(&[b"http/1.1"], None));
    assert!(
        response.starts_with("HTTP/1.1 401 Unauthorized"),
        "{response}"
    );
    assert!(response.contains("jaunt proxy app grafana"), "{response}");
    h.wait_metric(
        "jaunt_connections_refused_total",
        &[("reason", "bad_identity")],
        1,
    );
    // A user certificate: routed like any dial, so an app nobody serves is a 404 naming it.
    let response = get(h.alice(b"http/1.1"));
    assert!(response.starts_with("HTTP/1.1 404 Not Found"), "{response}");
    assert!(response.contains(r#"no such app "grafana""#), "{response}");
    h.wait_metric("jaunt_connections_accepted_total", &[("route", "app")], 2);
}

/// The public host serves the cluster's JWK Set once a snapshot carries it.
#[test]
fn web_route_serves_the_jwks_from_the_snapshot() {
    let h = Options {
        shards: 1,
        ..Options::default()
    }
    .start();
    h.send_snapshot_with(2, Targets::default(), |s| {
        s.jwks = r#"{"keys":[{"kty":"EC","kid":"k1"}]}"#.into();
    });
    wait_for("snapshot 2", || {
        h.metric("jaunt_snapshot_version", &[]) == 2
    });
    let mut tls = h.tls_connect(h.pki.client(&[b"http/1.1"], None), PUBLIC_HOST);
    tls.write_all(
        b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut response = String::new();
    let _ = tls.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(
        response.contains("content-type: application/json"),
        "{response}"
    );
    assert!(
        response.ends_with(r#"{"keys":[{"kty":"EC","kid":"k1"}]}"#),
        "{response}"
    );
}

/// A stopped engine lets go of everything it was given: once `shutdown` returns, the audit
/// and inventory queues have no sender left (a leaked shard would keep control's writer
/// threads waiting forever), also with cross-shard hop tasks running between two shards.
#[test]
fn a_stopped_engine_drops_its_audit_and_inventory_senders() {
    let (audit_tx, audit_rx) = crossbeam_channel::unbounded();
    let (inventory_tx, inventory_rx) = crossbeam_channel::unbounded();
    let mut h = Options {
        shards: 2,
        audit: Some(audit_tx),
        inventory: Some(inventory_tx),
        ..Options::default()
    }
    .start();
    let agent = StandInAgent::start(
        h.addr(),
        h.agent_config("host-9"),
        AgentPlan::new("node9", &["echo"]),
    );
    assert!(matches!(
        recv_inventory(&inventory_rx),
        InventoryEvent::TunnelUp { .. }
    ));
    drop(agent);
    h.engine.take().unwrap().shutdown(Duration::ZERO).unwrap();
    let drained = |rx: &dyn Fn() -> Result<(), crossbeam_channel::RecvTimeoutError>| loop {
        match rx() {
            Ok(()) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(
        drained(&|| audit_rx.recv_timeout(WAIT).map(drop)),
        crossbeam_channel::RecvTimeoutError::Disconnected,
        "an audit sender outlived the engine"
    );
    assert_eq!(
        drained(&|| inventory_rx.recv_timeout(WAIT).map(drop)),
        crossbeam_channel::RecvTimeoutError::Disconnected,
        "an inventory sender outlived the engine"
    );
}

/// Metrics list every refusal reason from the start, so dashboards see zeros, not gaps.
#[test]
fn metrics_list_every_family_and_reason() {
    let h = Options::default().start();
    let (_, text) = h.diag("/metrics");
    for family in [
        "jaunt_connections_accepted_total",
        "jaunt_connections_active",
        "jaunt_connections_refused_total",
        "jaunt_handshake_seconds",
        "jaunt_stream_open_seconds",
        "jaunt_bytes_total",
        "jaunt_tunnels",
        "jaunt_tunnels_duplicate_total",
        "jaunt_tunnels_replaced_total",
        "jaunt_streams_open",
        "jaunt_dial_misses_total",
        "jaunt_cross_shard_hops_total",
        "jaunt_inventory_events_dropped_total",
        "jaunt_snapshot_version",
    ] {
        assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
    }
    for reason in jaunt_engine::route::RejectReason::ALL {
        assert!(
            text.contains(&format!("shard=\"1\",reason=\"{}\"", reason.as_str())),
            "{reason}"
        );
    }
}

/// Not enough locked memory is an error that says what to change, not a panic. Runs the engine
/// in a child process (this test binary) under `prlimit`, since the limit is per process.
#[test]
fn low_memlock_is_a_helpful_error() {
    if std::env::var_os("JAUNT_TEST_MEMLOCK_CHILD").is_some() {
        let pki = Pki::new();
        let config = EngineConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            PUBLIC_HOST,
            "127.0.0.1:1".parse().unwrap(),
        );
        let (_tx, rx) = crossbeam_channel::unbounded();
        match Engine::start(config, pki.tls_configs(&pki.web), rx) {
            Ok(_) => println!("ENGINE-STARTED"),
            Err(e) => println!("ENGINE-ERROR: {e}"),
        }
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let output = Command::new("prlimit")
        .arg("--memlock=65536:65536")
        .arg(exe)
        .args([
            "--exact",
            "low_memlock_is_a_helpful_error",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("JAUNT_TEST_MEMLOCK_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("ENGINE-ERROR: shard 0: cannot start its io_uring executor"),
        "{stdout}"
    );
    assert!(stdout.contains("ulimit -l"), "{stdout}");
    assert!(stdout.contains("LimitMEMLOCK="), "{stdout}");
}

#[test]
fn half_closed_control_connection_still_gets_its_answer() {
    // The client half-closes after its line; the pass-through forwards the FIN and still
    // delivers control's answer.
    let h = Options::default().start();
    let control = h.control.as_ref().unwrap();
    let config = client_config(&control.ca, &[ALPN_CONTROL], None);
    let mut tls = h.tls_connect(config, "control.test");
    tls.write_all(b"bye\n").unwrap();
    tls.conn.send_close_notify();
    tls.flush().unwrap();
    tls.sock.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    let _ = tls.read_to_string(&mut answer);
    assert_eq!(answer, "control:bye\n");
}

// ---------------------------------------------------------------------------------------------
// Measurements (ignored by default): `cargo test -p jaunt-engine --test server --release --
// --ignored --nocapture measure`. They print numbers; they assert only that the work was done.

/// Full TLS handshakes per second through the web route (one `GET /webapi/ping` per
/// connection, `Connection: close`), from two client threads.
#[test]
#[ignore = "measurement"]
fn measure_web_handshakes() {
    for shards in [1, 2] {
        let h = Options {
            shards,
            ..Options::default()
        }
        .start();
        let config = h.pki.client(&[], None);
        let addr = h.addr();
        let per_thread = 400;
        let started = Instant::now();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let config = Arc::clone(&config);
                std::thread::spawn(move || {
                    for _ in 0..per_thread {
                        let mut tls = tls_connect(addr, Arc::clone(&config), PUBLIC_HOST);
                        tls.write_all(
                            b"GET /webapi/ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                        )
                        .unwrap();
                        let mut response = Vec::new();
                        let _ = tls.read_to_end(&mut response);
                        assert!(response.starts_with(b"HTTP/1.1 200"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let took = started.elapsed();
        let total = 2 * per_thread;
        println!(
            "web handshakes, {shards} shard(s): {total} in {took:?} = {:.0}/s",
            total as f64 / took.as_secs_f64()
        );
        let (_, text) = h.diag("/metrics");
        let count = sum_metric(&text, "jaunt_handshake_seconds_count", &[]);
        let sum: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("jaunt_handshake_seconds_sum "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        println!(
            "  server-side accept-to-established: mean {:.0} us over {count}",
            sum / count as f64 * 1e6
        );
    }
}

/// Bytes per second through the control pass-through and through a user stream in an agent
/// tunnel (one connection each, one direction measured end to end).
#[test]
#[ignore = "measurement"]
fn measure_splice_throughput() {
    const TOTAL: usize = 256 << 20;
    // Pass-through: a plain TCP sink stands in for control (the engine forwards bytes, it does
    // not care that they are not TLS after the ClientHello).
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let (count_tx, count_rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let (mut conn, _) = sink.accept().unwrap();
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0usize;
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
        count_tx.send(total).unwrap();
    });
    let pki = Pki::new();
    let mut config = EngineConfig::new("127.0.0.1:0".parse().unwrap(), PUBLIC_HOST, sink_addr);
    config.shards = 1;
    config.pin_shards = false;
    let (_tx, rx) = crossbeam_channel::unbounded();
    let engine = Engine::start(config, pki.tls_configs(&pki.web), rx).unwrap();
    let hello = client_hello_bytes(&pki, &[ALPN_CONTROL]);
    let mut tcp = TcpStream::connect(engine.local_addr()).unwrap();
    let chunk = vec![0x5au8; 256 << 10];
    let started = Instant::now();
    tcp.write_all(&hello).unwrap();
    let mut sent = 0;
    while sent < TOTAL {
        tcp.write_all(&chunk).unwrap();
        sent += chunk.len();
    }
    tcp.shutdown(Shutdown::Write).unwrap();
    let received = count_rx.recv_timeout(Duration::from_secs(120)).unwrap();
    let took = started.elapsed();
    // The engine's PROXY v2 header for IPv4 comes first: 16 + 12 bytes.
    assert_eq!(received, 28 + TOTAL + hello.len());
    println!(
        "control pass-through: {} MiB in {took:?} = {:.0} MiB/s",
        TOTAL >> 20,
        (TOTAL >> 20) as f64 / took.as_secs_f64()
    );
    engine.shutdown(Duration::ZERO).unwrap();

    // User stream: TLS (user cert) → engine → tunnel (TLS, mux) → stand-in agent, which echoes;
    // a reader thread drains the echo.
    let h = Options {
        shards: 1,
        ..Options::default()
    }
    .start();
    let agent = StandInAgent::start(
        h.addr(),
        h.agent_config("host-1"),
        AgentPlan::new("node1", &[]),
    );
    agent.hello.recv_timeout(WAIT).unwrap();
    h.wait_metric("jaunt_tunnels", &[("shard", "0")], 1);
    let alice = h.pki.user.identity(&identity(IdentityKind::User, "alice"));
    let mut tls = h.tls_connect(h.pki.client(&[ALPN_SSH], Some(alice)), PUBLIC_HOST);
    assert!(dial(&mut tls, &request(DialKind::Ssh, "web1")).unwrap().ok);
    let mut greeting = String::new();
    let mut reader = BufReader::new(tls);
    reader.read_line(&mut greeting).unwrap();
    let mut tls = reader.into_inner();
    let total = TOTAL / 4;
    let started = Instant::now();
    let mut sent = 0;
    let mut received = 0;
    let mut buf = vec![0u8; 256 << 10];
    // Interleave writes and reads on one thread: the echo can only run one window ahead.
    tls.sock.set_nonblocking(false).unwrap();
    while received < total {
        if sent < total && sent - received < (1 << 20) {
            tls.write_all(&chunk[..64 << 10]).unwrap();
            tls.flush().unwrap();
            sent += 64 << 10;
            continue;
        }
        let n = tls.read(&mut buf).unwrap();
        assert!(n > 0);
        received += n;
    }
    let took = started.elapsed();
    println!(
        "user stream via tunnel (echo): {} MiB each way in {took:?} = {:.0} MiB/s each way",
        total >> 20,
        (total >> 20) as f64 / took.as_secs_f64()
    );
}

/// Counts the TLS 1.3 tickets a client is given (and keeps them, so it can resume).
#[derive(Debug)]
struct CountingTickets {
    inner: rustls::client::ClientSessionMemoryCache,
    tickets: std::sync::atomic::AtomicUsize,
}

impl rustls::client::ClientSessionStore for CountingTickets {
    fn set_kx_hint(&self, name: ServerName<'static>, group: rustls::NamedGroup) {
        self.inner.set_kx_hint(name, group)
    }
    fn kx_hint(&self, name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(name)
    }
    fn set_tls12_session(
        &self,
        name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.inner.set_tls12_session(name, value)
    }
    fn tls12_session(
        &self,
        name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(name)
    }
    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        self.inner.remove_tls12_session(name)
    }
    fn insert_tls13_ticket(
        &self,
        name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.tickets
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.insert_tls13_ticket(name, value)
    }
    fn take_tls13_ticket(
        &self,
        name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(name)
    }
}

/// One in-memory TLS 1.3 handshake of `client` with `server`, then a byte each way so the
/// client reads the server's post-handshake tickets.
fn handshake_in_memory(
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
) -> (rustls::ClientConnection, rustls::ServerConnection) {
    let name = ServerName::try_from(PUBLIC_HOST).unwrap();
    let mut c = rustls::ClientConnection::new(client, name).unwrap();
    let mut s = rustls::ServerConnection::new(server).unwrap();
    c.writer().write_all(b"?").unwrap();
    let mut got = Vec::new();
    for _ in 0..10 {
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        s.read_tls(&mut &wire[..]).unwrap();
        s.process_new_packets().unwrap();
        let mut byte = [0u8; 1];
        if let Ok(1) = s.reader().read(&mut byte) {
            s.writer().write_all(&byte).unwrap();
        }
        let mut wire = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut wire).unwrap();
        }
        c.read_tls(&mut &wire[..]).unwrap();
        c.process_new_packets().unwrap();
        let mut buf = [0u8; 8];
        if let Ok(n) = c.reader().read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        if !got.is_empty() {
            return (c, s);
        }
    }
    panic!("the in-memory handshake did not complete");
}

/// The TLS policy of the public port (ARCHITECTURE.md, "TLS policy"): a client that prefers
/// AES-256-GCM (rustls' default order, as most clients) gets TLS_AES_128_GCM_SHA256, and one
/// session ticket per handshake, with which it resumes; a client that offers only AES-256-GCM
/// still gets it.
#[test]
fn public_port_prefers_aes_128_and_sends_one_ticket() {
    let pki = Pki::new();
    let configs = pki.tls_configs(&pki.web);
    let tickets = Arc::new(CountingTickets {
        inner: rustls::client::ClientSessionMemoryCache::new(8),
        tickets: Default::default(),
    });
    let mut client = rustls::ClientConfig::clone(&pki.client(&[], None));
    client.resumption = rustls::client::Resumption::store(tickets.clone());
    let client = Arc::new(client);
    let offered = client.crypto_provider().cipher_suites[0].suite();
    assert_eq!(offered, rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);

    let (c, _) = handshake_in_memory(client.clone(), configs.web.clone());
    assert_eq!(
        c.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    assert_eq!(c.handshake_kind(), Some(rustls::HandshakeKind::Full));
    assert_eq!(
        tickets.tickets.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // The one ticket resumes, and the resumed handshake hands out the next one.
    let (c, _) = handshake_in_memory(client.clone(), configs.web.clone());
    assert_eq!(c.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
    assert_eq!(
        tickets.tickets.load(std::sync::atomic::Ordering::Relaxed),
        2
    );

    // A client that offers only AES-256-GCM is served with it.
    let mut only_256 = rustls::crypto::ring::default_provider();
    only_256
        .cipher_suites
        .retain(|s| s.suite() == rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.web.der()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(only_256))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (c, _) = handshake_in_memory(Arc::new(client), configs.web.clone());
    assert_eq!(
        c.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384)
    );
}
