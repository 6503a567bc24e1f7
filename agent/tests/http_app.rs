//! The agent's HTTP app reverse proxy against a stand-in engine (as in `tests/agent.rs`: a
//! glommio TLS listener on 127.0.0.1:0 that runs the mux as `Role::Server` and opens streams
//! with `StreamHeader`s of kind `app`) and a real HTTP/1.1 server on a std thread, which
//! records every request head it receives and the connection it came on.
//!
//! The agent runs with `jaunt_agent::run_with_hooks` and a mock token provider (a fixed JWT)
//! and a recording request recorder. No test orders events with sleeps: every wait is on the
//! event itself, bounded by [`WAIT`].

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc;
use futures_lite::{future, AsyncReadExt, AsyncWriteExt, StreamExt};
use futures_rustls::TlsAcceptor;
use glommio::net::TcpListener;
use glommio::timer::Timer;
use jaunt_agent::{
    AgentCommand, AgentError, AgentHooks, AgentSettings, AppRequest, AppRequestRecorder,
    AppSession, AppToken, AppTokenProvider, BackoffConfig, Timeouts,
};
use jaunt_config::file::{AgentServices, AppProtocol, AppService, CpuPlacement, HostPort};
use jaunt_config::wire::dial::{DialKind, StreamHeader};
use jaunt_engine::mux::{self};
use jaunt_engine::tunnel::{MuxStream, Tunnel};
use jaunt_testkit::pki::{Ca, CertAndKey, StandInPki as Pki};
use jaunt_testkit::services::closed_port;
use jaunt_testkit::tunnel::{engine_side, Accepted};
use jaunt_testkit::wait::on_executor;
use rcgen::ExtendedKeyUsagePurpose;

/// Bound on every wait for an event; generous for a loaded 2-core debug build.
const WAIT: Duration = Duration::from_secs(30);
const MIB: usize = 1024 * 1024;
const PROXY_HOST: &str = "localhost";
/// What the mock token provider signs for everyone.
const MOCK_JWT: &str = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.mock-signature";
/// The host name the user's browser used.
const USER_HOST: &str = "web.jaunt.example";

// ---------------------------------------------------------------------------------------------
// PKI and the stand-in engine (as in tests/agent.rs)

/// Accepts agent connections and hands each one's tunnel to the test.
struct StandIn {
    addr: SocketAddr,
    tunnels: mpsc::UnboundedReceiver<Tunnel>,
}

impl StandIn {
    fn start(pki: &Pki) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, tunnels) = mpsc::unbounded();
        let acceptor = TlsAcceptor::from(pki.server.clone());
        glommio::spawn_local(async move {
            loop {
                let Ok(tcp) = listener.accept().await else {
                    return;
                };
                let (tx, acceptor) = (tx.clone(), acceptor.clone());
                glommio::spawn_local(async move {
                    let Accepted::Tunnel(t) = engine_side(acceptor, tcp, (1, 0)).await else {
                        return;
                    };
                    drop(t.driver); // detaches: the driver runs on
                    let _ = tx.unbounded_send(t.tunnel);
                })
                .detach();
            }
        })
        .detach();
        StandIn { addr, tunnels }
    }

    async fn next_tunnel(&mut self) -> Tunnel {
        within("the agent's tunnel", self.tunnels.next())
            .await
            .unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// Hooks

/// A mock [`AppTokenProvider`]: the same fixed JWT for everyone, counting calls.
#[derive(Default)]
struct MockTokenProvider {
    calls: AtomicUsize,
}

impl AppTokenProvider for MockTokenProvider {
    fn issue(
        &self,
        user: &str,
        roles: &[String],
        app: &str,
        uri: &str,
    ) -> Result<AppToken, String> {
        assert_eq!((user, roles), ("alice", &["access".to_owned()][..]));
        assert!(
            uri.starts_with("http://127.0.0.1:") || uri.starts_with("https://localhost:"),
            "{uri} for {app}"
        );
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(AppToken {
            jwt: MOCK_JWT.into(),
            expires: jaunt_config::identity::unix_now() + 3600,
        })
    }
}

/// Keeps every recorded request.
#[derive(Default)]
struct Recorded {
    requests: Mutex<Vec<(AppSession, AppRequest)>>,
}

impl AppRequestRecorder for Recorded {
    fn record(&self, session: &AppSession, request: &AppRequest) {
        self.requests
            .lock()
            .unwrap()
            .push((session.clone(), request.clone()));
    }
}

impl Recorded {
    fn statuses(&self) -> Vec<(String, String, u16)> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|(_, r)| (r.method.clone(), r.path.clone(), r.status))
            .collect()
    }

    fn all(&self) -> Vec<AppRequest> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|(_, r)| r.clone())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The app: a hand-written HTTP/1.1 server on std threads

/// A request head as the app received it, and which of its connections it came on.
#[derive(Clone, Debug)]
struct Seen {
    connection: usize,
    head: String,
}

impl Seen {
    /// Every value of the field `name` (case-insensitive).
    fn header(&self, name: &str) -> Vec<String> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }

    fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }
}

#[derive(Clone, Default)]
struct AppLog {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl AppLog {
    fn all(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Starts the app: routes `/hello` (a short body), `/sum` (answers the length and checksum of
/// the request body, read by Content-Length or chunked), `/chunked?N` (N pattern bytes in
/// chunks), `/ws` (WebSocket upgrade, then echo), `/drop` (answers, then closes the
/// connection), `/garbage` (not HTTP), `/no-continue` (401 without reading the body);
/// `Expect: 100-continue` is honoured.
fn http_app() -> (SocketAddr, AppLog) {
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let log = AppLog::default();
    let log2 = log.clone();
    std::thread::spawn(move || {
        for (connection, conn) in listener.incoming().enumerate() {
            let Ok(conn) = conn else { return };
            let log = log2.clone();
            std::thread::spawn(move || {
                let _ = serve_app_connection(conn, connection, &log);
            });
        }
    });
    (addr, log)
}

fn serve_app_connection(conn: StdStream, connection: usize, log: &AppLog) -> std::io::Result<()> {
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let seen = Seen { connection, head };
        log.seen.lock().unwrap().push(seen.clone());
        let target = seen
            .request_line()
            .split(' ')
            .nth(1)
            .unwrap_or("")
            .to_owned();
        if target == "/no-continue" {
            // A final answer to an `Expect: 100-continue` request, without reading its body.
            writer.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\n\r\nlog in")?;
            return Ok(());
        }
        if seen
            .header("expect")
            .iter()
            .any(|v| v.eq_ignore_ascii_case("100-continue"))
        {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let body = read_body(&mut reader, &seen)?;
        if target == "/ws" {
            let key = seen.header("sec-websocket-key").pop().unwrap_or_default();
            write!(
                writer,
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: \
                 Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                websocket_accept(&key)
            )?;
            // Echo until the proxy closes.
            let mut buf = [0u8; 4096];
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    return writer.shutdown(std::net::Shutdown::Write);
                }
                writer.write_all(&buf[..n])?;
            }
        } else if target == "/hello" {
            let text = "hello from the app";
            write!(
                writer,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            )?;
        } else if target == "/drop" {
            // A keep-alive response, then the app closes the connection anyway (as when its
            // keep-alive timeout passes).
            writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndrop")?;
            return Ok(());
        } else if target == "/garbage" {
            writer.write_all(b"SSH-2.0-not-http\r\n\r\n")?;
            return Ok(());
        } else if target == "/sum" {
            let text = format!("len={} sum={}", body.len(), checksum(&body));
            write!(
                writer,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            )?;
        } else if let Some(n) = target.strip_prefix("/chunked?") {
            let n: usize = n.parse().unwrap();
            writer.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")?;
            let mut sent = 0;
            let mut size = 1;
            while sent < n {
                let len = size.min(n - sent);
                let data: Vec<u8> = (sent..sent + len).map(pattern).collect();
                write!(writer, "{len:x}\r\n")?;
                writer.write_all(&data)?;
                writer.write_all(b"\r\n")?;
                sent += len;
                size = (size * 3 + 7) % 100_000 + 1;
            }
            writer.write_all(b"0\r\nX-Trailer: done\r\n\r\n")?;
        } else {
            writer.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
        }
        writer.flush()?;
    }
}

fn read_body(reader: &mut BufReader<StdStream>, seen: &Seen) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if let Some(len) = seen.header("content-length").first() {
        body.resize(len.parse().unwrap(), 0);
        reader.read_exact(&mut body)?;
    } else if seen
        .header("transfer-encoding")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim_end().split(';').next().unwrap(), 16)
                .expect("a chunk size");
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    line.clear();
                    reader.read_line(&mut line)?;
                    if line == "\r\n" {
                        return Ok(body);
                    }
                }
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf)?;
            assert_eq!(&crlf, b"\r\n");
        }
    }
    Ok(body)
}

/// Byte `i` of the test pattern.
fn pattern(i: usize) -> u8 {
    ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 ^ (i / 4099) as u8
}

/// FNV-1a, for comparing bodies.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------------------------
// WebSocket accept key (RFC 6455 §4.2.2): base64 of the SHA-1 of the key and the GUID.

fn websocket_accept(key: &str) -> String {
    use base64::Engine as _;
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

// ---------------------------------------------------------------------------------------------
// An https app: rustls on std threads

/// What an https app saw of one connection that finished its handshake.
#[derive(Clone, Debug, Default)]
struct TlsSeen {
    sni: Option<String>,
    alpn: Option<Vec<u8>>,
    heads: Vec<String>,
}

type TlsLog = Arc<Mutex<Vec<TlsSeen>>>;

/// Starts an https app on 127.0.0.1 with `chain` and `key` (ALPN http/1.1): `/hello` answers a
/// short body (keep-alive), `/drop` one and then drops the connection, `/close` a body that ends when the app closes (without TLS
/// close_notify), `/ws` upgrades and then echoes.
fn https_app((chain, key): CertAndKey) -> (SocketAddr, TlsLog) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let config = Arc::new(config);
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let log = TlsLog::default();
    let log2 = log.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let (config, log) = (config.clone(), log2.clone());
            std::thread::spawn(move || {
                let _ = serve_tls_connection(conn, config, &log);
            });
        }
    });
    (addr, log)
}

fn serve_tls_connection(
    mut tcp: StdStream,
    config: Arc<rustls::ServerConfig>,
    log: &TlsLog,
) -> std::io::Result<()> {
    let mut tls = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
    while tls.is_handshaking() {
        tls.complete_io(&mut tcp)?;
    }
    let index = {
        let mut log = log.lock().unwrap();
        log.push(TlsSeen {
            sni: tls.server_name().map(str::to_owned),
            alpn: tls.alpn_protocol().map(<[u8]>::to_vec),
            heads: Vec::new(),
        });
        log.len() - 1
    };
    let mut reader = BufReader::new(rustls::StreamOwned::new(tls, tcp));
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        log.lock().unwrap()[index].heads.push(head.clone());
        let target = head.split(' ').nth(1).unwrap_or("").to_owned();
        match target.as_str() {
            "/hello" => {
                reader
                    .get_mut()
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\nhello over tls")?;
            }
            "/drop" => {
                // A keep-alive answer, then the app drops the connection (no close_notify).
                reader
                    .get_mut()
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndrop")?;
                reader.get_mut().flush()?;
                return Ok(());
            }
            "/close" => {
                reader
                    .get_mut()
                    .write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the app closes")?;
                reader.get_mut().flush()?;
                // Dropped without close_notify.
                return Ok(());
            }
            "/ws" => {
                let seen = Seen {
                    connection: index,
                    head,
                };
                let key = seen.header("sec-websocket-key").pop().unwrap_or_default();
                write!(
                    reader.get_mut(),
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: \
                     Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    websocket_accept(&key)
                )?;
                reader.get_mut().flush()?;
                let mut buf = [0u8; 4096];
                loop {
                    let n = reader.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    reader.get_mut().write_all(&buf[..n])?;
                    reader.get_mut().flush()?;
                }
            }
            _ => {
                reader
                    .get_mut()
                    .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
            }
        }
        reader.get_mut().flush()?;
    }
}

/// A certificate as PEM.
fn pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

// ---------------------------------------------------------------------------------------------
// The user's side

fn header(target: &str) -> Vec<u8> {
    StreamHeader {
        join: None,
        terminal: false,
        kind: DialKind::App,
        target: target.into(),
        login: None,
        db_user: None,
        db_name: None,
        user: "alice".into(),
        roles: vec!["access".into()],
        client_addr: "192.0.2.1:5555".into(),
        allowed_db_users: Vec::new(),
        allowed_db_names: Vec::new(),
        session_id: None,
    }
    .encode()
    .unwrap()
}

/// A response as the user received it.
#[derive(Debug)]
struct Response {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<String> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// The user's end of one app stream, with what it read ahead.
struct User {
    stream: MuxStream,
    buf: Vec<u8>,
}

impl User {
    async fn open(tunnel: &Tunnel, app: &str) -> User {
        let stream = within("the agent's answer to an open", tunnel.open(&header(app)))
            .await
            .unwrap();
        User {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        within("a write", self.stream.write_all(bytes))
            .await
            .unwrap();
    }

    /// Reads more; false at EOF.
    async fn fill(&mut self) -> bool {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = within("the agent's bytes", self.stream.read(&mut chunk))
            .await
            .unwrap();
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn head(&mut self) -> (u16, String) {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(self.buf.drain(..end + 4).collect()).unwrap();
                let status = head[9..12].parse().unwrap();
                return (status, head);
            }
            assert!(
                self.fill().await,
                "EOF inside a response head: {:?}",
                self.buf
            );
        }
    }

    /// The next final response (1xx are skipped), its body read by Content-Length, chunked
    /// (decoded) or until EOF.
    async fn response(&mut self, head_request: bool) -> Response {
        let (status, head) = loop {
            let (status, head) = self.head().await;
            if status >= 200 || status == 101 {
                break (status, head);
            }
        };
        let mut response = Response {
            status,
            head,
            body: Vec::new(),
        };
        if head_request || status == 101 || status == 204 || status == 304 {
            return response;
        }
        if let Some(len) = response.header("content-length") {
            let len: usize = len.parse().unwrap();
            while self.buf.len() < len {
                assert!(self.fill().await, "EOF inside a body");
            }
            response.body = self.buf.drain(..len).collect();
        } else if response.header("transfer-encoding").as_deref() == Some("chunked") {
            loop {
                let line = self.line().await;
                let size = usize::from_str_radix(line.split(';').next().unwrap(), 16).unwrap();
                if size == 0 {
                    while !self.line().await.is_empty() {}
                    break;
                }
                while self.buf.len() < size + 2 {
                    assert!(self.fill().await, "EOF inside a chunk");
                }
                response.body.extend(self.buf.drain(..size));
                assert_eq!(self.buf.drain(..2).collect::<Vec<_>>(), b"\r\n");
            }
        } else {
            while self.fill().await {}
            response.body = std::mem::take(&mut self.buf);
        }
        response
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..end + 2).collect();
                return String::from_utf8(line[..end].to_vec()).unwrap();
            }
            assert!(self.fill().await, "EOF inside a line");
        }
    }

    /// Whether the agent ended the stream (EOF, or a reset after its close).
    async fn ended(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        match within("the stream's end", self.stream.read(&mut chunk)).await {
            Ok(0) | Err(_) => true,
            Ok(_) => false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The agent

fn http_service(name: &str, addr: SocketAddr) -> AppService {
    AppService {
        name: name.into(),
        uri: format!("http://{addr}"),
        protocol: AppProtocol::Http,
        addr: addr.to_string().parse::<HostPort>().unwrap(),
        labels: BTreeMap::new(),
    }
}

/// An https app at `localhost:<port of addr>` (the name its certificate must have).
fn https_service(name: &str, addr: SocketAddr) -> AppService {
    AppService {
        name: name.into(),
        uri: format!("https://localhost:{}", addr.port()),
        protocol: AppProtocol::Https,
        addr: HostPort {
            host: "localhost".into(),
            port: addr.port(),
        },
        labels: BTreeMap::new(),
    }
}

struct Agent {
    control: crossbeam_channel::Sender<AgentCommand>,
    done: crossbeam_channel::Receiver<Result<(), AgentError>>,
}

impl Agent {
    fn start(proxy: SocketAddr, pki: &Pki, apps: Vec<AppService>, hooks: AgentHooks) -> Agent {
        let settings = AgentSettings {
            proxy_addr: proxy.to_string(),
            server_name: PROXY_HOST.into(),
            tls: pki.agent_tls(&pki.host_ca),
            name: "node1".into(),
            labels: BTreeMap::new(),
            services: AgentServices {
                ssh: None,
                apps,
                dbs: Vec::new(),
            },
            backoff: BackoffConfig::default(),
            timeouts: Timeouts::default(),
            mux: mux::Config::default(),
            cpu_placement: CpuPlacement::default(),
        };
        let (control, control_rx) = crossbeam_channel::unbounded();
        let (done_tx, done) = crossbeam_channel::bounded(1);
        std::thread::Builder::new()
            .name("agent-under-test".into())
            .spawn(move || {
                let _ = done_tx.send(jaunt_agent::run_with_hooks(settings, hooks, control_rx));
            })
            .unwrap();
        Agent { control, done }
    }

    async fn stop(self) {
        self.control.send(AgentCommand::Shutdown).unwrap();
        let done = self.done.clone();
        glommio::executor()
            .spawn_blocking(move || done.recv_timeout(WAIT))
            .await
            .expect("the agent did not stop")
            .unwrap();
    }
}

fn hooks(tokens: &Arc<MockTokenProvider>, recorded: &Arc<Recorded>) -> AgentHooks {
    AgentHooks {
        app_tokens: Some(tokens.clone()),
        app_requests: recorded.clone(),
        ..AgentHooks::default()
    }
}

/// Polls `check` until it holds (recording happens on the agent's thread).
async fn eventually(what: &str, check: impl Fn() -> bool) {
    within(what, async {
        while !check() {
            Timer::new(Duration::from_millis(5)).await;
        }
    })
    .await;
}

async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    jaunt_testkit::wait::within_for(WAIT, what, fut).await
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {USER_HOST}\r\n{extra}\r\n")
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn websocket_accept_matches_rfc_6455() {
    assert_eq!(
        websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
}

#[test]
fn requests_reach_the_app_with_the_jwt_and_bodies_stream_both_ways_on_one_stream() {
    on_executor(|| async {
        let pki = Pki::new();
        let mut engine = StandIn::start(&pki);
        let (app_addr, app_log) = http_app();
        let tokens = Arc::new(MockTokenProvider::default());
        let recorded = Arc::new(Recorded::default());
        let agent = Agent::start(
            engine.addr,
            &pki,
            vec![http_service("web", app_addr)],
            hooks(&tokens, &recorded),
        );
        let tunnel = engine.next_tunnel().await;
        let mut user = User::open(&tunnel, "web").await;

        // GET: the body arrives; the app saw the JWT, its own Host, X-Forwarded-*, and none of
        // the user's Jaunt-* fields.
        user.send(
            get(
                "/hello",
                "Jaunt-Foo: forged\r\njaunt-jwt-assertion: forged\r\nX-Forwarded-For: 10.9.9.9\r\n",
            )
            .as_bytes(),
        )
        .await;
        let response = user.response(false).await;
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.text(), "hello from the app");
        let seen = app_log.all();
        assert_eq!(seen.len(), 1);
        let first = &seen[0];
        assert_eq!(first.request_line(), "GET /hello HTTP/1.1");
        assert_eq!(first.header("jaunt-jwt-assertion"), [MOCK_JWT]);
        assert_eq!(first.header("host"), [app_addr.to_string()]);
        assert_eq!(first.header("x-forwarded-host"), [USER_HOST]);
        assert_eq!(first.header("x-forwarded-for"), ["192.0.2.1"]);
        assert_eq!(first.header("x-forwarded-proto"), ["https"]);
        assert!(first.header("jaunt-foo").is_empty(), "{}", first.head);

        // POST with a Content-Length body of a few MiB, on the same stream.
        let body: Vec<u8> = (0..3 * MIB + 17).map(pattern).collect();
        let mut request = format!(
            "POST /sum HTTP/1.1\r\nHost: {USER_HOST}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        user.send(&request).await;
        let response = user.response(false).await;
        assert_eq!(
            response.text(),
            format!("len={} sum={}", body.len(), checksum(&body))
        );

        // A chunked POST of a few MiB, in uneven chunks.
        let body: Vec<u8> = (0..2 * MIB + 5).map(|i| pattern(i * 7)).collect();
        let mut request = format!(
            "POST /sum HTTP/1.1\r\nHost: {USER_HOST}\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .into_bytes();
        for (i, piece) in body.chunks(65_521).enumerate() {
            request.extend_from_slice(format!("{:x};n={i}\r\n", piece.len()).as_bytes());
            request.extend_from_slice(piece);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"0\r\n\r\n");
        user.send(&request).await;
        let response = user.response(false).await;
        assert_eq!(
            response.text(),
            format!("len={} sum={}", body.len(), checksum(&body))
        );

        // A chunked response of a few MiB.
        let n = 3 * MIB + 1;
        user.send(get(&format!("/chunked?{n}"), "").as_bytes())
            .await;
        let response = user.response(false).await;
        assert_eq!(response.status, 200);
        assert_eq!(
            response.header("transfer-encoding").as_deref(),
            Some("chunked")
        );
        assert_eq!(response.body.len(), n);
        assert!(response
            .body
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern(i)));

        // Expect: 100-continue: the interim response is relayed, then the body goes.
        user.send(
            format!(
                "PUT /sum HTTP/1.1\r\nHost: {USER_HOST}\r\nExpect: 100-continue\r\n\
                 Content-Length: 5\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        let (status, _) = user.head().await;
        assert_eq!(status, 100);
        user.send(b"12345").await;
        let response = user.response(false).await;
        assert_eq!(response.text(), format!("len=5 sum={}", checksum(b"12345")));

        // A HEAD has no body, whatever the Content-Length says.
        user.send(format!("HEAD /hello HTTP/1.1\r\nHost: {USER_HOST}\r\n\r\n").as_bytes())
            .await;
        let response = user.response(true).await;
        assert_eq!(response.header("content-length").as_deref(), Some("18"));

        // Keep-alive both ways: every request came on one stream and one app connection.
        let seen = app_log.all();
        assert_eq!(seen.len(), 6);
        assert!(
            seen.iter().all(|s| s.connection == seen[0].connection),
            "{seen:?}"
        );
        assert!(seen
            .iter()
            .all(|s| s.header("jaunt-jwt-assertion") == [MOCK_JWT]));
        assert_eq!(
            tokens.calls.load(Ordering::SeqCst),
            1,
            "the token is cached"
        );

        // The user closes; the recorder saw each request once, with its status and bytes.
        user.stream.close().await.unwrap();
        assert!(user.ended().await);
        eventually("six records", || recorded.all().len() == 6).await;
        let records = recorded.all();
        let statuses: Vec<(&str, &str, u16)> = records
            .iter()
            .map(|r| (r.method.as_str(), r.path.as_str(), r.status))
            .collect();
        assert_eq!(
            statuses,
            [
                ("GET", "/hello", 200),
                ("POST", "/sum", 200),
                ("POST", "/sum", 200),
                ("GET", &*format!("/chunked?{n}"), 200),
                ("PUT", "/sum", 200),
                ("HEAD", "/hello", 200),
            ]
        );
        assert_eq!(records[1].request_bytes, 3 * MIB as u64 + 17);
        assert_eq!(records[2].request_bytes, 2 * MIB as u64 + 5);
        assert_eq!(records[3].response_bytes, n as u64);
        assert_eq!(records[0].response_bytes, 18);
        assert!(records.iter().all(|r| !r.upgraded));
        let session = recorded.requests.lock().unwrap()[0].0.clone();
        assert_eq!(
            (
                session.user.as_str(),
                session.app.as_str(),
                session.client_addr.as_str()
            ),
            ("alice", "web", "192.0.2.1:5555")
        );
        agent.stop().await;
    });
}

#[test]
fn a_websocket_upgrade_is_spliced_both_ways() {
    on_executor(|| async {
        let pki = Pki::new();
        let mut engine = StandIn::start(&pki);
        let (app_addr, app_log) = http_app();
        let tokens = Arc::new(MockTokenProvider::default());
        let recorded = Arc::new(Recorded::default());
        let agent = Agent::start(
            engine.addr,
            &pki,
            vec![http_service("web", app_addr)],
            hooks(&tokens, &recorded),
        );
        let tunnel = engine.next_tunnel().await;
        let mut user = User::open(&tunnel, "web").await;
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        user.send(
            get(
                "/ws",
                &format!(
                    "Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\
                     Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
                ),
            )
            .as_bytes(),
        )
        .await;
        let response = user.response(false).await;
        assert_eq!(response.status, 101, "{response:?}");
        assert_eq!(
            response.header("sec-websocket-accept"),
            Some(websocket_accept(key))
        );
        assert_eq!(response.header("upgrade").as_deref(), Some("websocket"));
        assert_eq!(response.header("connection").as_deref(), Some("Upgrade"));
        let seen = app_log.all();
        assert_eq!(seen[0].header("upgrade"), ["websocket"]);
        assert_eq!(seen[0].header("connection"), ["Upgrade"]);
        assert_eq!(seen[0].header("jaunt-jwt-assertion"), [MOCK_JWT]);

        // Frames' bytes (a masked text frame "hello", then a larger binary one) come back.
        let mut frames = vec![0x81, 0x85, 1, 2, 3, 4];
        frames.extend(
            b"hello"
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]),
        );
        let big: Vec<u8> = (0..MIB).map(pattern).collect();
        frames.extend_from_slice(&[0x82, 0xff]);
        frames.extend_from_slice(&(big.len() as u64).to_be_bytes());
        frames.extend_from_slice(&[0, 0, 0, 0]);
        frames.extend_from_slice(&big);
        let echoed = {
            let mut s = &user.stream;
            let frames = &frames;
            let writer = async move {
                s.write_all(frames).await.unwrap();
            };
            let mut r = &user.stream;
            let mut got = std::mem::take(&mut user.buf);
            let reader = async move {
                let mut chunk = vec![0u8; 64 * 1024];
                while got.len() < frames.len() {
                    let n = r.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "EOF after {} bytes", got.len());
                    got.extend_from_slice(&chunk[..n]);
                }
                got
            };
            within("the echo", future::zip(writer, reader)).await.1
        };
        assert!(echoed == frames, "the echoed bytes differ");

        // The user closes: the app sees EOF and closes too.
        user.stream.close().await.unwrap();
        assert!(user.ended().await);
        eventually("the upgrade's record", || recorded.all().len() == 1).await;
        let record = &recorded.all()[0];
        assert_eq!((record.status, record.upgraded), (101, true));
        agent.stop().await;
    });
}

#[test]
fn errors_are_http_responses_and_cost_only_their_own_stream() {
    on_executor(|| async {
        let pki = Pki::new();
        let mut engine = StandIn::start(&pki);
        let (app_addr, _app_log) = http_app();
        let dead = closed_port();
        let tokens = Arc::new(MockTokenProvider::default());
        let recorded = Arc::new(Recorded::default());
        let agent = Agent::start(
            engine.addr,
            &pki,
            vec![http_service("web", app_addr), http_service("down", dead)],
            hooks(&tokens, &recorded),
        );
        let tunnel = engine.next_tunnel().await;

        // A malformed request: 400, then the stream ends.
        let mut user = User::open(&tunnel, "web").await;
        user.send(b"GET /hello HTTP/1.1\r\nHost : bad\r\n\r\n")
            .await;
        let response = user.response(false).await;
        assert_eq!(response.status, 400, "{response:?}");
        assert!(
            response.text().contains("malformed request"),
            "{}",
            response.text()
        );
        assert!(user.ended().await);

        // Smuggling: Content-Length and Transfer-Encoding together.
        let mut user = User::open(&tunnel, "web").await;
        user.send(
            format!(
                "POST /sum HTTP/1.1\r\nHost: {USER_HOST}\r\nContent-Length: 5\r\n\
                 Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        let response = user.response(false).await;
        assert_eq!(response.status, 400);
        assert!(response.text().contains("smuggling"), "{}", response.text());
        assert!(user.ended().await);

        // A head too large: 431.
        let mut user = User::open(&tunnel, "web").await;
        let huge = format!("X-Big: {}\r\n", "b".repeat(70 * 1024));
        let request = get("/hello", &huge);
        let sent = {
            let mut s = &user.stream;
            async move {
                // The agent may answer and close before taking every byte.
                let _ = s.write_all(request.as_bytes()).await;
            }
        };
        within("the oversized head", sent).await;
        let response = user.response(false).await;
        assert_eq!(response.status, 431);

        // A final answer instead of 100 Continue: relayed, the body is never sent, the stream
        // ends.
        let mut user = User::open(&tunnel, "web").await;
        user.send(
            format!(
                "PUT /no-continue HTTP/1.1\r\nHost: {USER_HOST}\r\nExpect: 100-continue\r\n\
                 Content-Length: 1000000\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        let response = user.response(false).await;
        assert_eq!((response.status, response.text().as_str()), (401, "log in"));
        assert_eq!(response.header("connection").as_deref(), Some("close"));
        assert!(user.ended().await);

        // The next stream on the same tunnel works.
        let mut user = User::open(&tunnel, "web").await;
        user.send(get("/hello", "").as_bytes()).await;
        let response = user.response(false).await;
        assert_eq!(
            (response.status, response.text().as_str()),
            (200, "hello from the app")
        );
        user.stream.close().await.unwrap();
        assert!(user.ended().await);

        // An app that is down: 502 naming it and its address.
        let mut user = User::open(&tunnel, "down").await;
        user.send(get("/", "").as_bytes()).await;
        let response = user.response(false).await;
        assert_eq!(response.status, 502);
        assert_eq!(
            response.text(),
            format!("cannot reach app down at {dead}: connection refused\n")
        );
        assert_eq!(
            response.header("content-type").as_deref(),
            Some("text/plain; charset=utf-8")
        );
        assert!(user.ended().await);

        // One record per request that parsed; status 0 where the app sent no response.
        eventually("four records", || recorded.all().len() == 4).await;
        let want = [
            ("POST", "/sum", 0),
            ("PUT", "/no-continue", 401),
            ("GET", "/hello", 200),
            ("GET", "/", 0),
        ];
        assert_eq!(
            recorded.statuses(),
            want.map(|(m, p, s)| (m.to_owned(), p.to_owned(), s))
        );
        agent.stop().await;
    });
}

#[test]
fn without_a_token_provider_each_request_gets_a_502_that_says_why() {
    on_executor(|| async {
        let pki = Pki::new();
        let mut engine = StandIn::start(&pki);
        let (app_addr, app_log) = http_app();
        let agent = Agent::start(
            engine.addr,
            &pki,
            vec![http_service("web", app_addr)],
            AgentHooks::default(),
        );
        let tunnel = engine.next_tunnel().await;
        for _ in 0..2 {
            let mut user = User::open(&tunnel, "web").await;
            user.send(get("/hello", "").as_bytes()).await;
            let response = user.response(false).await;
            assert_eq!(response.status, 502);
            assert!(
                response.text().contains("cannot sign app tokens"),
                "{}",
                response.text()
            );
            assert!(user.ended().await);
        }
        assert!(app_log.all().is_empty(), "nothing reached the app");
        agent.stop().await;
    });
}

#[test]
fn a_kept_connection_the_app_closed_is_replaced() {
    on_executor(|| async {
        let pki = Pki::new();
        let mut engine = StandIn::start(&pki);
        let (app_addr, app_log) = http_app();
        let tokens = Arc::new(MockTokenProvider::default());
        let recorded = Arc::new(Recorded::default());
        let agent = Agent::start(
            engine.addr,
            &pki,
            vec![http_service("web", app_addr)],
            hooks(&tokens, &recorded),
        );
        let tunnel = engine.next_tunnel().await;
        let mut user = User::open(&tunnel, "web").await;
        for _ in 0..3 {
            user.send(get("/drop", "").as_bytes()).await;
            let response = user.response(false).await;
            assert_eq!((response.status, response.text().as_str()), (200, "drop"));
        }
        user.send(get("/hello", "").as_bytes()).await;
        let response = user.response(false).await;
        assert_eq!(response.text(), "hello from the app");
        let connections: Vec<usize> = app_log.all().iter().map(|s| s.connection).collect();
        assert_eq!(connections.len(), 4);
        let mut distinct = connections.clone();
        distinct.dedup();
        assert_eq!(
            distinct, connections,
            "each request after a drop on a new connection"
        );

        // An app that answers with something that is not HTTP: 502 saying so.
        user.send(get("/garbage", "").as_bytes()).await;
        let response = user.response(false).await;
        assert_eq!(response.status, 502);
        assert!(
            response
                .text()
                .starts_with(&format!("app web at {app_addr} sent a malformed response")),
            "{}",
            response.text()
        );
        assert!(user.ended().await);
        eventually("five records", || recorded.all().len() == 5).await;
        let statuses: Vec<u16> = recorded.all().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [200, 200, 200, 200, 0]);
        agent.stop().await;
    });
}

#[test]
fn https_apps_are_reached_over_tls_verified_against_the_trust_roots() {
    let app_ca = Ca::new("test app CA");
    let unknown_ca = Ca::new("a CA the agent does not trust");
    // The agent reads the host's trust roots with rustls-native-certs, which reads the PEM file
    // named by SSL_CERT_FILE instead of the OS store: the test's way of installing its CA on
    // the host. Only this test has https apps, so the variable changes nothing for the others.
    let dir = tempfile::tempdir().unwrap();
    let roots = dir.path().join("roots.pem");
    std::fs::write(&roots, pem(&app_ca.der())).unwrap();
    std::env::set_var("SSL_CERT_FILE", &roots);
    let (secure_addr, secure_log) =
        https_app(app_ca.leaf("localhost", ExtendedKeyUsagePurpose::ServerAuth));
    let (untrusted_addr, untrusted_log) =
        https_app(unknown_ca.leaf("localhost", ExtendedKeyUsagePurpose::ServerAuth));
    let (misnamed_addr, misnamed_log) =
        https_app(app_ca.leaf("elsewhere.example", ExtendedKeyUsagePurpose::ServerAuth));
    on_executor(|| async move {
        let pki = Pki::new();
        let mut engine = StandIn::start(&pki);
        let tokens = Arc::new(MockTokenProvider::default());
        let recorded = Arc::new(Recorded::default());
        let agent = Agent::start(
            engine.addr,
            &pki,
            vec![
                https_service("secure", secure_addr),
                https_service("untrusted", untrusted_addr),
                https_service("misnamed", misnamed_addr),
            ],
            hooks(&tokens, &recorded),
        );
        let tunnel = engine.next_tunnel().await;

        // Trusted: the body arrives, twice on one TLS connection, which sent SNI and ALPN.
        let mut user = User::open(&tunnel, "secure").await;
        for _ in 0..2 {
            user.send(get("/hello", "").as_bytes()).await;
            let response = user.response(false).await;
            assert_eq!(
                (response.status, response.text().as_str()),
                (200, "hello over tls"),
                "{response:?}"
            );
        }
        // A body delimited by the app's close, which sends no close_notify.
        user.send(get("/close", "").as_bytes()).await;
        let response = user.response(false).await;
        assert_eq!(
            (response.status, response.text().as_str()),
            (200, "until the app closes")
        );
        assert!(user.ended().await);
        let seen = secure_log.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].sni.as_deref(), Some("localhost"));
        assert_eq!(seen[0].alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert_eq!(seen[0].heads.len(), 3);
        let first = Seen {
            connection: 0,
            head: seen[0].heads[0].clone(),
        };
        assert_eq!(
            first.header("host"),
            [format!("localhost:{}", secure_addr.port())]
        );
        assert_eq!(first.header("jaunt-jwt-assertion"), [MOCK_JWT]);

        // A kept TLS connection the app dropped (without close_notify) is replaced.
        let mut user = User::open(&tunnel, "secure").await;
        for path in ["/drop", "/hello"] {
            user.send(get(path, "").as_bytes()).await;
            let response = user.response(false).await;
            assert_eq!(response.status, 200, "{response:?}");
        }
        user.stream.close().await.unwrap();
        assert!(user.ended().await);
        assert_eq!(secure_log.lock().unwrap().len(), 3);

        // A WebSocket upgrade is spliced over the TLS connection.
        let mut user = User::open(&tunnel, "secure").await;
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        user.send(
            get(
                "/ws",
                &format!(
                    "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                     Sec-WebSocket-Key: {key}\r\n"
                ),
            )
            .as_bytes(),
        )
        .await;
        let response = user.response(false).await;
        assert_eq!(response.status, 101, "{response:?}");
        assert_eq!(
            response.header("sec-websocket-accept"),
            Some(websocket_accept(key))
        );
        let frame = [
            0x81,
            0x84,
            1,
            2,
            3,
            4,
            b'p' ^ 1,
            b'i' ^ 2,
            b'n' ^ 3,
            b'g' ^ 4,
        ];
        user.send(&frame).await;
        while user.buf.len() < frame.len() {
            assert!(user.fill().await, "EOF before the echo");
        }
        assert_eq!(user.buf, frame);
        user.stream.close().await.unwrap();
        assert!(user.ended().await);

        // A certificate from a CA the host does not trust: 502 naming the app and the TLS
        // error; no request reached the app.
        let mut user = User::open(&tunnel, "untrusted").await;
        user.send(get("/hello", "").as_bytes()).await;
        let response = user.response(false).await;
        assert_eq!(response.status, 502, "{response:?}");
        assert_eq!(
            response.text(),
            format!(
                "TLS with app untrusted at localhost:{} failed: invalid peer certificate: \
                 UnknownIssuer\n",
                untrusted_addr.port()
            )
        );
        assert!(user.ended().await);
        assert!(untrusted_log.lock().unwrap().is_empty());

        // A trusted certificate for another name: 502 too.
        let mut user = User::open(&tunnel, "misnamed").await;
        user.send(get("/hello", "").as_bytes()).await;
        let response = user.response(false).await;
        assert_eq!(response.status, 502, "{response:?}");
        let text = response.text();
        assert!(
            text.starts_with(&format!(
                "TLS with app misnamed at localhost:{} failed: invalid peer certificate: ",
                misnamed_addr.port()
            )) && text.contains("not valid for name"),
            "{text}"
        );
        assert!(user.ended().await);
        assert!(misnamed_log.lock().unwrap().is_empty());

        eventually("eight records", || recorded.all().len() == 8).await;
        let statuses: Vec<u16> = recorded.all().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [200, 200, 200, 200, 200, 101, 0, 0]);
        // The close-delimited body counts whole: the missing close_notify ended it normally.
        assert_eq!(recorded.all()[2].response_bytes, 20);
        agent.stop().await;
    });
}
