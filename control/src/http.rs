//! The control API's transport: HTTP/1.1 + JSON over TLS on plain threads.
//!
//! [`serve`] runs one acceptor thread that hands accepted sockets to a fixed pool of
//! [`Limits::workers`] threads through a bounded queue of [`Limits::queue`] slots. When the queue
//! is full the socket is closed at once and counted in [`Stats::rejected_busy`]: load never turns
//! into an unbounded number of threads. A worker owns one connection at a time: TLS handshake
//! (bounded by [`Limits::handshake_timeout`]), then HTTP/1.1 keep-alive requests until the peer
//! closes, idles past [`Limits::idle_timeout`], asks for `Connection: close`, or breaks a rule.
//!
//! Requests carry `Content-Length` bodies only; a chunked request is answered 411. Every bound
//! that trips (header block, header count, body size, time) answers with a status and closes that
//! connection only. A hostile peer costs one worker for at most the timeout it is under.
//!
//! Clients offer ALPN `jaunt-control` ([`ALPN_CONTROL`]); [`server_config`] also accepts
//! `http/1.1` so that curl works against the control port directly. The engine passes
//! `jaunt-control` connections through byte for byte, after a PROXY protocol v2 header that names
//! the client's real address.
//!
//! PROXY protocol: a connection may start with a PROXY v2 header (`read_proxy_header`) only when
//! its TCP peer is a loopback address, i.e. the engine on the same host; the header's source
//! address then becomes [`Request::peer`] (the failed-login limiter keys on it). A non-loopback
//! peer that starts with the PROXY signature is refused: anyone could claim any address. An engine
//! on another host would need an explicit trust list of engine addresses (not implemented).
//! Connections without the signature (direct clients, the admin CLI) are served as before.
//!
//! What does not live here: routing and authorization (the handler decides per path, using
//! [`Request::peer_certs`]), the client ([`crate::client`]).
//!
//! The TLS I/O helpers (`TlsIo`) are shared with the client: deadline-bounded reads and writes
//! over a blocking socket, so that a peer trickling bytes cannot stretch a timeout.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::DerefMut;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use jaunt_config::api::ALPN_CONTROL;

/// Default size of the worker pool. The control API is the slow path (logins, joins, admin
/// verbs); handlers may block on SQLite or password hashing, so a few more threads than cores.
pub const DEFAULT_WORKERS: usize = 16;
/// Default number of accepted connections waiting for a worker. Past it, connections are closed
/// at once: a client retries later rather than queueing behind a backlog it cannot see.
pub const DEFAULT_QUEUE: usize = 64;
/// Default time a peer has to finish the TLS handshake (a slow laptop link, not a slowloris).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a keep-alive connection may sit between requests before it is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time to receive one whole request once its first byte arrived. The largest
/// legitimate body (1 MiB) takes well under this on any link a person would use.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound on the request line plus headers; larger is answered 431. API requests carry a
/// handful of short headers; 16 KiB matches common servers' defaults.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Default bound on a request body; larger is answered 413. Bodies are JSON: certificate
/// requests, resources. 1 MiB is far above any of them.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Headers per request; more is answered 431.
pub const MAX_HEADERS: usize = 64;

/// How long a closing connection keeps draining what the peer still sends after an error
/// answer, so that the kernel does not reset the connection before the peer read the answer.
const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on the bytes drained while lingering.
const LINGER_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Bound on the time spent flushing a goodbye (close_notify, error answer) to a peer.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `shutdown` waits for its wake-up connection to the acceptor.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);
/// Back-off after an accept error (e.g. out of file descriptors) so the acceptor does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// Read size for TLS plaintext and lingering drains.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Bounds of the server. Every field has a named default above.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Worker threads; each serves one connection at a time. Must be at least 1.
    pub workers: usize,
    /// Accepted connections waiting for a worker; past it they are closed (0: none wait).
    pub queue: usize,
    /// Time to complete the TLS handshake after the worker picked the connection up.
    pub handshake_timeout: Duration,
    /// Time a connection may wait for the first byte of its next request.
    pub idle_timeout: Duration,
    /// Time to receive a whole request once its first byte arrived (and to write an answer).
    pub request_timeout: Duration,
    /// Bound on the request line plus headers (431 past it).
    pub max_header_bytes: usize,
    /// Bound on a request body (413 past it).
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            workers: DEFAULT_WORKERS,
            queue: DEFAULT_QUEUE,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// One HTTP request, fully read.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Percent-decoded path, without the query string. Always starts with `/`.
    pub path: String,
    /// Query parameters in order, percent- and `+`-decoded.
    pub query: Vec<(String, String)>,
    /// Headers in order, names as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub peer: SocketAddr,
    /// The client certificate chain (leaf first) when the client presented one, verified against
    /// the client roots given to [`server_config`]; empty otherwise.
    pub peer_certs: Vec<CertificateDer<'static>>,
}

impl Request {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The first query parameter named `name`.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON, or a 400 answer saying why not.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Response> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Response::error(400, format!("invalid JSON body: {e}")))
    }
}

/// One HTTP response. `Content-Length`, `Content-Type` and `Connection` are written by the
/// server; `headers` holds any others.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Response {
    /// `value` serialized as JSON.
    pub fn json(status: u16, value: &impl Serialize) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response {
                status,
                content_type: "application/json",
                body,
                headers: Vec::new(),
            },
            Err(e) => Response::error(500, format!("cannot encode the response: {e}")),
        }
    }

    /// `{"error": message}`, the body of every non-2xx answer
    /// ([`jaunt_config::api::ErrorBody`]).
    pub fn error(status: u16, message: impl Into<String>) -> Response {
        let body = jaunt_config::api::ErrorBody {
            error: message.into(),
        };
        let body = serde_json::to_vec(&body).unwrap_or_else(|_| b"{\"error\":\"\"}".to_vec());
        Response {
            status,
            content_type: "application/json",
            body,
            headers: Vec::new(),
        }
    }

    /// A response with no body (e.g. 204).
    pub fn empty(status: u16) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: Vec::new(),
            headers: Vec::new(),
        }
    }

    /// Adds a header. Names or values with CR, LF or NUL are dropped when the response is written.
    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

/// What handlers are: called on a worker thread, once per request.
pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// Counters of the server, for metrics and tests.
#[derive(Debug, Default)]
pub struct Stats {
    accepted: AtomicU64,
    rejected_busy: AtomicU64,
    tls_failures: AtomicU64,
    bad_requests: AtomicU64,
    requests: AtomicU64,
}

impl Stats {
    /// Sockets accepted, including those then rejected as busy.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
    /// Sockets closed unserved because the queue was full.
    pub fn rejected_busy(&self) -> u64 {
        self.rejected_busy.load(Ordering::Relaxed)
    }
    /// Connections that failed or timed out in the TLS handshake (including plain HTTP).
    pub fn tls_failures(&self) -> u64 {
        self.tls_failures.load(Ordering::Relaxed)
    }
    /// Requests answered 400/411/413/417/431 by the server itself (the connection then closes).
    pub fn bad_requests(&self) -> u64 {
        self.bad_requests.load(Ordering::Relaxed)
    }
    /// Requests handed to the handler.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A running server. Dropping it shuts it down as [`ServerHandle::shutdown`] does.
pub struct ServerHandle {
    pub local_addr: SocketAddr,
    shared: Arc<Shared>,
    /// Taken by whoever stops it ([`ServerHandle::stop_accepting`] or shutdown).
    acceptor: Mutex<Option<JoinHandle<()>>>,
    workers: Vec<JoinHandle<()>>,
    /// Never sent on: dropping it tells idle workers to exit, even if the acceptor is stuck.
    stop_workers: Option<Sender<()>>,
    /// Never sent on: while held, a paused acceptor waits ([`serve_with`]).
    gate: Option<Sender<()>>,
}

impl ServerHandle {
    /// The server's counters.
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.shared.stats)
    }

    /// Stops accepting, closes idle and queued connections, lets requests in flight finish
    /// (their answers carry `Connection: close`) and joins every thread.
    ///
    /// Returns as soon as the last in-flight handler returns; a handler that never returns
    /// blocks this call.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(gate) = self.gate.take() {
            // Paused: the acceptor wakes, sees `stopping` and returns without accepting.
            drop(gate);
            if let Some(acceptor) = lock(&self.acceptor).take() {
                let _ = acceptor.join();
            }
        }
        let acceptor = lock(&self.acceptor).take();
        if let Some(acceptor) = acceptor {
            match TcpStream::connect_timeout(&wake_addr(self.local_addr), WAKE_TIMEOUT) {
                Ok(_) => {
                    if acceptor.join().is_err() {
                        tracing::error!("the control API acceptor thread panicked");
                    }
                }
                // Without the wake-up the acceptor stays blocked in accept(); leave it detached
                // rather than hang: it exits on the next connection it sees.
                Err(e) => {
                    tracing::warn!(addr = %self.local_addr, "cannot wake the control API acceptor: {e}")
                }
            }
        }
        // Wake workers waiting for a connection, close idle connections so their workers notice,
        // and let busy ones finish their request.
        self.stop_workers = None;
        for slot in &self.shared.slots {
            let slot = lock(slot);
            if slot.idle {
                if let Some(sock) = &slot.sock {
                    let _ = sock.shutdown(Shutdown::Read);
                }
            }
        }
        for worker in self.workers.drain(..) {
            if worker.join().is_err() {
                tracing::error!("a control API worker thread panicked");
            }
        }
    }
}

impl ServerHandle {
    /// Starts the acceptor of a server made paused ([`serve_with`]).
    pub fn start_accepting(&mut self) {
        self.gate = None;
    }

    /// Stops accepting without leaving a connection unserved in the listener's queue (another
    /// process takes the listener over, `jaunt start --takeover`): the acceptor stops at a
    /// marker connection made here, after handing what it accepted before to the workers.
    /// Live connections go on until [`ServerHandle::shutdown`].
    pub fn stop_accepting(&self) -> io::Result<()> {
        let Some(acceptor) = lock(&self.acceptor).take() else {
            return Ok(());
        };
        let markers = Arc::clone(self.shared.stop_at.get_or_init(Default::default));
        let marker = markers.connect(wake_addr(self.local_addr));
        if marker.is_err() {
            *lock(&self.acceptor) = Some(acceptor);
            return marker.map(drop);
        }
        if acceptor.join().is_err() {
            tracing::error!("the control API acceptor thread panicked");
        }
        drop(marker);
        Ok(())
    }

    /// New connections use `tls` from now on (the server certificate and the client roots
    /// after a CA rotation phase change); live ones keep theirs.
    pub fn reload_tls(&self, tls: Arc<ServerConfig>) {
        *self.shared.tls.write().unwrap_or_else(|p| p.into_inner()) = tls;
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves `handler` on `listener` with TLS from `tls`, until the handle is shut down.
pub fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    handler: Handler,
    limits: Limits,
) -> io::Result<ServerHandle> {
    serve_with(listener, tls, handler, limits, false)
}

/// [`serve`], accepting only after [`ServerHandle::start_accepting`] when `paused`: a process
/// that takes the listener over from another one (`jaunt start --takeover`) waits until that
/// one has stopped accepting.
pub fn serve_with(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    handler: Handler,
    limits: Limits,
    paused: bool,
) -> io::Result<ServerHandle> {
    let (gate_tx, gate) = crossbeam_channel::bounded::<()>(0);
    let gate_tx = paused.then_some(gate_tx);
    if limits.workers == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "limits.workers must be at least 1",
        ));
    }
    listener.set_nonblocking(false)?;
    let local_addr = listener.local_addr()?;
    let (tx, rx) = crossbeam_channel::bounded::<(TcpStream, SocketAddr)>(limits.queue);
    let (stop_workers, stopped) = crossbeam_channel::bounded::<()>(0);
    let shared = Arc::new(Shared {
        tls: std::sync::RwLock::new(tls),
        handler,
        stats: Arc::new(Stats::default()),
        stopping: AtomicBool::new(false),
        slots: (0..limits.workers)
            .map(|_| Mutex::new(Slot::default()))
            .collect(),
        limits,
        stop_at: std::sync::OnceLock::new(),
    });

    let mut handle = ServerHandle {
        local_addr,
        shared: Arc::clone(&shared),
        acceptor: Mutex::new(None),
        workers: Vec::new(),
        stop_workers: Some(stop_workers),
        gate: gate_tx,
    };
    for index in 0..shared.limits.workers {
        let (shared, rx, stopped) = (Arc::clone(&shared), rx.clone(), stopped.clone());
        let worker = thread::Builder::new()
            .name(format!("jaunt-api-{index}"))
            .spawn(move || worker_loop(&shared, index, &rx, &stopped));
        // On error, dropping `handle` stops and joins the workers already started.
        handle.workers.push(worker?);
    }
    drop((rx, stopped));
    let acceptor_shared = Arc::clone(&shared);
    *lock(&handle.acceptor) = Some(
        thread::Builder::new()
            .name("jaunt-api-accept".to_owned())
            .spawn(move || {
                // Returns at once unless paused; then when the handle drops the sender.
                let _ = gate.recv();
                accept_loop(&listener, &acceptor_shared, &tx)
            })?,
    );
    Ok(handle)
}

/// Errors of [`server_config`].
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("a client CA certificate is not usable: {0}")]
    ClientRoot(rustls::Error),
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the server certificate or key is not usable: {0}")]
    Config(#[from] rustls::Error),
}

/// The control API's TLS configuration: ring only, TLS 1.3 and 1.2, ALPN `jaunt-control` and
/// `http/1.1`, session tickets on. Client certificates chaining to `client_roots` are verified
/// when offered but not required: the handler decides per path. With no `client_roots`, client
/// certificates are not asked for.
pub fn server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: Vec<CertificateDer<'static>>,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = if client_roots.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for root in client_roots {
            roots.add(root).map_err(TlsConfigError::ClientRoot)?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .allow_unauthenticated()
            .build()?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut config = builder.with_single_cert(cert_chain, key)?;
    config.alpn_protocols = vec![ALPN_CONTROL.as_bytes().to_vec(), b"http/1.1".to_vec()];
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------------------------------------
// Threads

struct Shared {
    /// Replaced whole by [`ServerHandle::reload_tls`] (CA rotation); new connections use it.
    tls: std::sync::RwLock<Arc<ServerConfig>>,
    handler: Handler,
    limits: Limits,
    stats: Arc<Stats>,
    stopping: AtomicBool,
    /// One per worker: the connection it serves, so that shutdown can close idle ones.
    slots: Vec<Mutex<Slot>>,
    /// Set by [`ServerHandle::stop_accepting`]: the acceptor stops at a connection from one of
    /// these addresses, serving what it accepted before.
    stop_at: std::sync::OnceLock<Arc<jaunt_engine::server::listen::Markers>>,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

#[derive(Default)]
struct Slot {
    sock: Option<TcpStream>,
    /// True while the connection handshakes or waits for a request: safe to cut at shutdown.
    idle: bool,
}

fn lock<T>(slot: &Mutex<T>) -> MutexGuard<'_, T> {
    // A slot holds no invariant a panic could break halfway.
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn accept_loop(listener: &TcpListener, shared: &Shared, tx: &Sender<(TcpStream, SocketAddr)>) {
    loop {
        if shared.stopping() {
            return;
        }
        let accepted = listener.accept();
        if let (Ok((_, peer)), Some(markers)) = (&accepted, shared.stop_at.get()) {
            if markers.contains(peer) {
                return;
            }
        }
        if shared.stopping() {
            return;
        }
        match accepted {
            Ok((sock, peer)) => {
                Stats::bump(&shared.stats.accepted);
                match tx.try_send((sock, peer)) {
                    Ok(()) => {}
                    Err(TrySendError::Full((sock, peer))) => {
                        Stats::bump(&shared.stats.rejected_busy);
                        tracing::debug!(%peer, "control API busy: connection closed unserved");
                        drop(sock);
                    }
                    Err(TrySendError::Disconnected(_)) => return,
                }
            }
            Err(e) => {
                tracing::warn!("control API accept failed: {e}");
                thread::sleep(ACCEPT_ERROR_BACKOFF);
            }
        }
    }
}

fn worker_loop(
    shared: &Shared,
    index: usize,
    rx: &Receiver<(TcpStream, SocketAddr)>,
    stopped: &Receiver<()>,
) {
    let Some(slot) = shared.slots.get(index) else {
        return;
    };
    loop {
        let (sock, peer) = crossbeam_channel::select! {
            recv(rx) -> next => match next {
                Ok(next) => next,
                Err(_) => return,
            },
            recv(stopped) -> _ => return,
        };
        if shared.stopping() {
            continue; // queued but never started: close it
        }
        {
            let mut slot = lock(slot);
            slot.sock = sock.try_clone().ok();
            slot.idle = true;
        }
        // Checked after registering, so either this sees the flag or shutdown sees the slot.
        if !shared.stopping() {
            serve_connection(shared, slot, sock, peer);
        }
        *lock(slot) = Slot::default();
    }
}

/// How a connection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// Send close_notify and close.
    Close,
    /// The same, then drain what the peer still sends so that it reads our error answer
    /// before the kernel resets the connection.
    CloseAfterError,
}

fn set_idle(slot: &Mutex<Slot>, idle: bool) {
    lock(slot).idle = idle;
}

fn serve_connection(shared: &Shared, slot: &Mutex<Slot>, sock: TcpStream, peer: SocketAddr) {
    let limits = &shared.limits;
    let _ = sock.set_nodelay(true);
    let handshake_deadline = Instant::now() + limits.handshake_timeout;

    let peer = match read_proxy_header(&sock, peer, handshake_deadline) {
        Ok(peer) => peer,
        Err(e) => {
            Stats::bump(&shared.stats.tls_failures);
            tracing::debug!(%peer, "PROXY header refused: {e}");
            return;
        }
    };

    match sniff_plain_http(&sock, handshake_deadline) {
        Ok(false) => {}
        Ok(true) => {
            Stats::bump(&shared.stats.tls_failures);
            tracing::debug!(%peer, "plain HTTP on the TLS control port");
            answer_plain_http(sock);
            return;
        }
        Err(e) => {
            Stats::bump(&shared.stats.tls_failures);
            tracing::debug!(%peer, "no TLS handshake: {e}");
            return;
        }
    }

    let tls = Arc::clone(&shared.tls.read().unwrap_or_else(|p| p.into_inner()));
    let conn = match ServerConnection::new(tls) {
        Ok(conn) => conn,
        Err(e) => {
            tracing::error!("cannot start a TLS session: {e}");
            return;
        }
    };
    let mut io = TlsIo { sock, conn };
    if let Err(e) = io.handshake(handshake_deadline) {
        Stats::bump(&shared.stats.tls_failures);
        tracing::debug!(%peer, "TLS handshake failed: {e}");
        return;
    }
    let peer_certs: Vec<CertificateDer<'static>> = io
        .conn
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();

    let mut buf = Vec::new();
    let next = loop {
        set_idle(slot, true);
        if shared.stopping() {
            break Next::Close;
        }
        let head = match read_head(&mut io, &mut buf, limits, || set_idle(slot, false)) {
            Ok(Some(head)) => head,
            Ok(None) => break Next::Close,
            Err(ReadError::Io(e)) => {
                tracing::debug!(%peer, "control API connection dropped: {e}");
                return; // nothing useful can be written to a dead or silent peer
            }
            Err(ReadError::Http(status, message)) => {
                Stats::bump(&shared.stats.bad_requests);
                tracing::debug!(%peer, status, "bad request: {message}");
                let deadline = Instant::now() + CLOSE_TIMEOUT;
                let _ = write_response(
                    &mut io,
                    &Response::error(status, message.as_str()),
                    false,
                    false,
                    deadline,
                );
                break Next::CloseAfterError;
            }
        };
        set_idle(slot, false);
        let deadline = head.started + limits.request_timeout;
        if head.expect_continue {
            let interim = jaunt_config::http::HeadWriter::response(100).finish(b"");
            if let Err(e) = io.write_all_plain(&interim, deadline) {
                tracing::debug!(%peer, "control API connection dropped: {e}");
                return;
            }
        }
        let body = match read_body(
            &mut io,
            &mut buf,
            head.consumed,
            head.content_length,
            deadline,
        ) {
            Ok(body) => body,
            Err(e) => {
                tracing::debug!(%peer, "control API connection dropped reading a body: {e}");
                return;
            }
        };
        let request = Request {
            method: head.method,
            path: head.path,
            query: head.query,
            headers: head.headers,
            body,
            peer,
            peer_certs: peer_certs.clone(),
        };
        Stats::bump(&shared.stats.requests);
        let response = match catch_unwind(AssertUnwindSafe(|| (shared.handler)(&request))) {
            Ok(response) => response,
            Err(_) => {
                tracing::error!(%peer, method = %request.method, path = %request.path, "control API handler panicked");
                Response::error(500, "internal error")
            }
        };
        let keep_alive = head.keep_alive && !shared.stopping();
        let is_head = request.method == "HEAD";
        let deadline = Instant::now() + limits.request_timeout;
        if let Err(e) = write_response(&mut io, &response, keep_alive, is_head, deadline) {
            tracing::debug!(%peer, "control API connection dropped writing an answer: {e}");
            return;
        }
        if !keep_alive {
            break Next::Close;
        }
    };
    io.close(Instant::now() + CLOSE_TIMEOUT);
    if next == Next::CloseAfterError {
        linger(&mut io.sock);
    }
}

/// Most bytes of addresses and TLVs accepted after the 16-byte PROXY v2 header start (IPv6
/// addresses take 36; the engine sends no TLVs, but a few small ones are tolerated).
const PROXY_MAX_PAYLOAD_BYTES: usize = 512;

/// Reads an optional PROXY protocol v2 header at the start of `sock` and returns the address to
/// serve the connection as: the header's source address, or `peer` (the TCP peer) when there is
/// no header, the header says LOCAL, or its addresses are not TCP over IPv4/IPv6.
///
/// A header is recognised by its first byte (`\r`, which neither a TLS record nor an HTTP request
/// starts with). It is trusted only from a loopback `peer`; from any other peer, and when it does
/// not parse, the connection is refused with an error. Reads are bounded in size
/// ([`PROXY_MAX_PAYLOAD_BYTES`]) and by `deadline`.
fn read_proxy_header(
    sock: &TcpStream,
    peer: SocketAddr,
    deadline: Instant,
) -> io::Result<SocketAddr> {
    let refused = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    sock.set_read_timeout(Some(remaining(deadline)?))?;
    let mut first = [0u8; 1];
    match sock.peek(&mut first) {
        Ok(0) => return Ok(peer), // EOF: sniff_plain_http reports it
        Ok(_) => {}
        Err(e) => return Err(socket_error(e)),
    }
    if first[0] != ppp::v2::PROTOCOL_PREFIX[0] {
        return Ok(peer);
    }
    if !peer.ip().to_canonical().is_loopback() {
        return Err(refused(format!("PROXY header from untrusted peer {peer}")));
    }
    let mut header = vec![0u8; 16];
    read_exact_by(sock, &mut header, deadline)?;
    if &header[..ppp::v2::PROTOCOL_PREFIX.len()] != ppp::v2::PROTOCOL_PREFIX {
        return Err(refused("not a PROXY v2 signature".into()));
    }
    let length = usize::from(u16::from_be_bytes([header[14], header[15]]));
    if length > PROXY_MAX_PAYLOAD_BYTES {
        return Err(refused(format!("PROXY header too long ({length} bytes)")));
    }
    header.resize(16 + length, 0);
    read_exact_by(sock, &mut header[16..], deadline)?;
    let parsed = ppp::v2::Header::try_from(&header[..])
        .map_err(|e| refused(format!("bad PROXY header: {e}")))?;
    Ok(proxied_source(&parsed).unwrap_or(peer))
}

/// The source address a parsed PROXY v2 header names, if it is a PROXY command for TCP over IP.
fn proxied_source(header: &ppp::v2::Header<'_>) -> Option<SocketAddr> {
    use ppp::v2::{Addresses, Command, Protocol};
    if header.command != Command::Proxy || header.protocol != Protocol::Stream {
        return None;
    }
    match header.addresses {
        Addresses::IPv4(a) => Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
        Addresses::IPv6(a) => Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
        Addresses::Unspecified | Addresses::Unix(_) => None,
    }
}

/// `read_exact` whose every read is bounded by what is left of `deadline`.
fn read_exact_by(mut sock: &TcpStream, mut buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        sock.set_read_timeout(Some(remaining(deadline)?))?;
        match sock.read(buf) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed inside the PROXY header",
                ))
            }
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(socket_error(e)),
        }
    }
    Ok(())
}

/// Waits for the first byte and tells whether the peer speaks plain HTTP instead of TLS (a TLS
/// record starts with 0x16; an HTTP request with an upper-case method letter).
fn sniff_plain_http(sock: &TcpStream, deadline: Instant) -> io::Result<bool> {
    sock.set_read_timeout(Some(remaining(deadline)?))?;
    let mut first = [0u8; 1];
    match sock.peek(&mut first) {
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before the handshake",
        )),
        Ok(_) => Ok(first[0].is_ascii_uppercase()),
        Err(e) => Err(socket_error(e)),
    }
}

fn answer_plain_http(mut sock: TcpStream) {
    let body = b"{\"error\":\"this port speaks TLS: use https:// (the jaunt CLI does)\"}";
    let mut head = jaunt_config::http::HeadWriter::response(400);
    head.field("Content-Type", "application/json")
        .field("Content-Length", body.len().to_string())
        .field("Connection", "close");
    let answer = head.finish(body);
    let _ = sock.set_write_timeout(Some(CLOSE_TIMEOUT));
    let _ = sock.write_all(&answer);
    let _ = sock.shutdown(Shutdown::Write);
    linger(&mut sock);
}

/// Drains what the peer still sends, for a bounded time and size, then lets the socket close.
fn linger(sock: &mut TcpStream) {
    let _ = sock.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER_TIMEOUT;
    let mut drained = 0usize;
    let mut chunk = [0u8; READ_CHUNK_BYTES];
    while drained < LINGER_MAX_BYTES {
        let Ok(timeout) = remaining(deadline) else {
            return;
        };
        if sock.set_read_timeout(Some(timeout)).is_err() {
            return;
        }
        match sock.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 framing (sans-IO: pure functions of bytes)

/// A parsed request head.
#[derive(Debug)]
struct Head {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    /// Bytes of the head in the buffer.
    consumed: usize,
    content_length: usize,
    keep_alive: bool,
    expect_continue: bool,
    /// When the request's first byte was seen.
    started: Instant,
}

#[derive(Debug)]
enum ReadError {
    /// Answer with this status and message, then close.
    Http(u16, String),
    /// The connection is gone or too slow: close without an answer.
    Io(io::Error),
}

/// Parses a request head from `buf`. `Ok(None)`: incomplete, read more. The tokenizer is the
/// one the three HTTP servers share ([`jaunt_config::http::parse_request`]); what the API
/// makes of the head (UTF-8 values, a percent-decoded path, no Transfer-Encoding, the statuses
/// and words of its refusals) is here.
fn parse_head(buf: &[u8], limits: &Limits, started: Instant) -> Result<Option<Head>, ReadError> {
    use jaunt_config::http::{self, HeadError};
    let bounds = http::Bounds {
        head_bytes: limits.max_header_bytes,
        fields: MAX_HEADERS,
    };
    let req = match http::parse_request(buf, bounds) {
        Ok(Some(req)) => req,
        Ok(None) => return Ok(None),
        Err(HeadError::TooLarge { .. }) => return Err(too_large_head(limits)),
        Err(HeadError::TooManyFields { .. }) => {
            return Err(ReadError::Http(
                431,
                format!("more than {MAX_HEADERS} request headers"),
            ));
        }
        Err(HeadError::Malformed(m)) => {
            return Err(ReadError::Http(
                400,
                format!("malformed request: {}", m.as_str()),
            ))
        }
    };
    let bad = |message: &str| ReadError::Http(400, message.to_owned());
    let consumed = req.len;
    let method = req.method.to_owned();
    let target = req.target;
    let version = req.minor;

    let mut owned = Vec::with_capacity(req.fields.len());
    for header in &req.fields {
        let value =
            std::str::from_utf8(header.value).map_err(|_| bad("a header value is not UTF-8"))?;
        owned.push((header.name.to_owned(), value.trim().to_owned()));
    }

    let (raw_path, raw_query) = target.split_once('?').unwrap_or((target, ""));
    if !raw_path.starts_with('/') {
        return Err(bad("the request target must be a path starting with /"));
    }
    let path = percent_decode(raw_path, false)
        .ok_or_else(|| bad("the path is not valid percent-encoded UTF-8"))?;
    let query = parse_query(raw_query)
        .ok_or_else(|| bad("the query is not valid percent-encoded UTF-8"))?;

    if owned
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("transfer-encoding"))
    {
        return Err(ReadError::Http(
            411,
            "chunked request bodies are not supported: send Content-Length".to_owned(),
        ));
    }
    let content_length = jaunt_config::http::content_length(
        owned
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("content-length"))
            .map(|(_, value)| value.as_bytes()),
    )
    .map_err(|e| bad(e.as_str()))?
    .map_or(Ok(0), usize::try_from)
    .map_err(|_| bad("an invalid Content-Length"))?;
    if content_length > limits.max_body_bytes {
        return Err(ReadError::Http(
            413,
            format!(
                "the request body is larger than {} bytes",
                limits.max_body_bytes
            ),
        ));
    }

    let connection = find_header(&owned, "connection").unwrap_or("");
    let has_token = |token: &str| {
        connection
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let keep_alive = if version >= 1 {
        !has_token("close")
    } else {
        has_token("keep-alive")
    };
    let expect_continue = match find_header(&owned, "expect") {
        None => false,
        Some(value) if value.eq_ignore_ascii_case("100-continue") => version >= 1,
        Some(_) => return Err(ReadError::Http(417, "unsupported Expect header".to_owned())),
    };

    Ok(Some(Head {
        method,
        path,
        query,
        headers: owned,
        consumed,
        content_length,
        keep_alive,
        expect_continue,
        started,
    }))
}

fn too_large_head(limits: &Limits) -> ReadError {
    ReadError::Http(
        431,
        format!(
            "the request headers are larger than {} bytes",
            limits.max_header_bytes
        ),
    )
}

/// Digits only (no sign, no spaces inside), and no overflow.
fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// `a=1&b=x%20y&c` → `[(a, 1), (b, x y), (c, "")]`. `None` on a bad escape or non-UTF-8.
pub(crate) fn parse_query(raw: &str) -> Option<Vec<(String, String)>> {
    raw.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(key, true)?, percent_decode(value, true)?))
        })
        .collect()
}

/// Decodes `%XX` escapes (and `+` as space when `plus_is_space`). `None` on a bad escape or when
/// the result is not UTF-8.
pub(crate) fn percent_decode(raw: &str, plus_is_space: bool) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hi = hex_value(*bytes.get(i + 1)?)?;
                let lo = hex_value(*bytes.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The status line, headers and body of `response`.
fn encode_response(response: &Response, keep_alive: bool, omit_body: bool) -> Vec<u8> {
    let mut head = jaunt_config::http::HeadWriter::response(response.status);
    head.field("Content-Type", response.content_type)
        .field("Content-Length", response.body.len().to_string())
        .field(
            "Connection",
            if keep_alive { "keep-alive" } else { "close" },
        );
    for (name, value) in &response.headers {
        let reserved = [
            "content-length",
            "content-type",
            "connection",
            "transfer-encoding",
        ]
        .iter()
        .any(|r| name.eq_ignore_ascii_case(r));
        let name_ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        let value_ok = !jaunt_config::http::could_split(value.as_bytes());
        if reserved || !name_ok || !value_ok {
            tracing::warn!(header = %name, "dropping an invalid or reserved response header");
            continue;
        }
        head.field(name, value);
    }
    head.finish(if omit_body { b"" } else { &response.body })
}

// ---------------------------------------------------------------------------------------------
// Connection I/O

/// Reads until a whole request head is buffered. `Ok(None)`: the peer closed between requests.
/// `on_first_byte` runs once the request has started (the connection is then no longer idle).
fn read_head<C, D>(
    io: &mut TlsIo<C>,
    buf: &mut Vec<u8>,
    limits: &Limits,
    mut on_first_byte: impl FnMut(),
) -> Result<Option<Head>, ReadError>
where
    C: DerefMut<Target = rustls::ConnectionCommon<D>>,
{
    let mut started = if buf.is_empty() {
        None
    } else {
        Some(Instant::now())
    };
    if started.is_some() {
        on_first_byte();
    }
    let idle_deadline = Instant::now() + limits.idle_timeout;
    loop {
        if let Some(started) = started {
            if let Some(head) = parse_head(buf, limits, started)? {
                return Ok(Some(head));
            }
        }
        let deadline = match started {
            Some(started) => started + limits.request_timeout,
            None => idle_deadline,
        };
        // parse_head rejected any buffer at or past the bound, so this reads at least one byte.
        let room = limits
            .max_header_bytes
            .saturating_sub(buf.len())
            .clamp(1, READ_CHUNK_BYTES);
        match io.read_plain(buf, room, deadline) {
            Ok(0) if started.is_none() => return Ok(None),
            Ok(0) => return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {
                if started.is_none() {
                    started = Some(Instant::now());
                    on_first_byte();
                }
            }
            // A peer that closes without close_notify between requests is common and harmless.
            Err(e) if started.is_none() && e.kind() == io::ErrorKind::UnexpectedEof => {
                return Ok(None)
            }
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// Reads the body that follows a head of `consumed` bytes; leaves any pipelined bytes in `buf`.
fn read_body<C, D>(
    io: &mut TlsIo<C>,
    buf: &mut Vec<u8>,
    consumed: usize,
    content_length: usize,
    deadline: Instant,
) -> io::Result<Vec<u8>>
where
    C: DerefMut<Target = rustls::ConnectionCommon<D>>,
{
    let end = consumed + content_length;
    while buf.len() < end {
        let room = (end - buf.len()).min(READ_CHUNK_BYTES);
        if io.read_plain(buf, room, deadline)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    let body = buf
        .get(consumed..end)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    buf.drain(..end);
    Ok(body)
}

fn write_response<C, D>(
    io: &mut TlsIo<C>,
    response: &Response,
    keep_alive: bool,
    omit_body: bool,
    deadline: Instant,
) -> io::Result<()>
where
    C: DerefMut<Target = rustls::ConnectionCommon<D>>,
{
    io.write_all_plain(&encode_response(response, keep_alive, omit_body), deadline)
}

/// A TLS connection over a blocking socket, where every operation is bounded by a deadline
/// rather than a per-read timeout (a peer trickling one byte at a time cannot stretch it).
/// Used by the server and by [`crate::client`].
pub(crate) struct TlsIo<C> {
    pub(crate) sock: TcpStream,
    pub(crate) conn: C,
}

impl<C, D> TlsIo<C>
where
    C: DerefMut<Target = rustls::ConnectionCommon<D>>,
{
    /// Completes the handshake and flushes what it produced.
    pub(crate) fn handshake(&mut self, deadline: Instant) -> io::Result<()> {
        while self.conn.is_handshaking() {
            self.flush_tls(deadline)?;
            if !self.conn.is_handshaking() {
                break;
            }
            if self.read_tls_once(deadline)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                ));
            }
        }
        self.flush_tls(deadline)
    }

    /// Appends up to `max` plaintext bytes to `out`. `Ok(0)`: the peer closed cleanly
    /// (close_notify); `UnexpectedEof`: it closed the socket without one.
    pub(crate) fn read_plain(
        &mut self,
        out: &mut Vec<u8>,
        max: usize,
        deadline: Instant,
    ) -> io::Result<usize> {
        debug_assert!(max > 0);
        let mut chunk = [0u8; READ_CHUNK_BYTES];
        let want = max.min(chunk.len());
        loop {
            match self.conn.reader().read(&mut chunk[..want]) {
                Ok(n) => {
                    out.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            self.read_tls_once(deadline)?;
        }
    }

    /// Writes all of `data`, within the deadline.
    pub(crate) fn write_all_plain(&mut self, mut data: &[u8], deadline: Instant) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.conn.writer().write(data)?;
            data = data.get(n..).unwrap_or_default();
            if n == 0 && !self.conn.wants_write() {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the TLS session accepts no more data",
                ));
            }
            self.flush_tls(deadline)?;
        }
        Ok(())
    }

    /// Sends close_notify, best effort.
    pub(crate) fn close(&mut self, deadline: Instant) {
        self.conn.send_close_notify();
        let _ = self.flush_tls(deadline);
    }

    /// Writes every queued TLS record.
    fn flush_tls(&mut self, deadline: Instant) -> io::Result<()> {
        while self.conn.wants_write() {
            self.sock.set_write_timeout(Some(remaining(deadline)?))?;
            match self.conn.write_tls(&mut self.sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(socket_error(e)),
            }
        }
        Ok(())
    }

    /// One socket read, then processing of what arrived (and writing any reply it calls for,
    /// e.g. an alert or a key update). Returns the TLS bytes read; 0 at EOF.
    fn read_tls_once(&mut self, deadline: Instant) -> io::Result<usize> {
        self.sock.set_read_timeout(Some(remaining(deadline)?))?;
        let n = loop {
            match self.conn.read_tls(&mut self.sock) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(socket_error(e)),
            }
        };
        if let Err(e) = self.conn.process_new_packets() {
            // Tell the peer why (best effort), then report our own error.
            let _ = self.flush_tls(deadline.min(Instant::now() + CLOSE_TIMEOUT));
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        self.flush_tls(deadline)?;
        Ok(n)
    }
}

/// Time left until `deadline`, as a socket timeout (never zero, which std rejects).
pub(crate) fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
    }
    Ok(left.max(Duration::from_millis(1)))
}

/// Socket timeouts show up as `WouldBlock` on Unix: call them what they are.
fn socket_error(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "timed out")
    } else {
        e
    }
}

/// Where shutdown connects to wake the acceptor: the bound address, with a wildcard replaced by
/// loopback.
fn wake_addr(local: SocketAddr) -> SocketAddr {
    let ip = match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, local.port())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<Option<Head>, ReadError> {
        parse_head(raw.as_bytes(), &Limits::default(), Instant::now())
    }

    fn status_of(raw: &str) -> u16 {
        match head(raw) {
            Err(ReadError::Http(status, _)) => status,
            other => panic!("expected an HTTP error, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_request_with_query_and_body_length() {
        let raw = "POST /v1/users/al%40ce?x=1&name=a+b%21&flag HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\n\r\n{\"a\":1}";
        let head = head(raw).expect("parses").expect("complete");
        assert_eq!(head.method, "POST");
        assert_eq!(head.path, "/v1/users/al@ce");
        assert_eq!(
            head.query,
            vec![
                ("x".into(), "1".into()),
                ("name".into(), "a b!".into()),
                ("flag".into(), String::new())
            ]
        );
        assert_eq!(head.content_length, 12);
        assert!(head.keep_alive);
        assert_eq!(&raw.as_bytes()[head.consumed..], b"{\"a\":1}");
    }

    #[test]
    fn incomplete_head_asks_for_more() {
        assert!(head("GET /v1/ping HTTP/1.1\r\nHost:")
            .expect("no error")
            .is_none());
    }

    #[test]
    fn connection_semantics() {
        let close = head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert!(!close.keep_alive);
        let old = head("GET / HTTP/1.0\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert!(!old.keep_alive);
        let old_ka = head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert!(old_ka.keep_alive);
        let cont = head("POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert!(cont.expect_continue);
    }

    #[test]
    fn rejects_what_it_must() {
        assert_eq!(
            status_of("GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(
            status_of("POST / HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n"),
            413
        );
        assert_eq!(
            status_of("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            400
        );
        assert_eq!(
            status_of("POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n"),
            400
        );
        assert_eq!(
            status_of("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(status_of("GET http://x/ HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status_of("GET /%zz HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status_of("GET /%ff HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status_of("\x00\x01\x02 garbage\r\n\r\n"), 400);
        assert_eq!(
            status_of("GET / HTTP/1.1\r\nExpect: something\r\n\r\n"),
            417
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(status_of(&format!("GET / HTTP/1.1\r\n{many}\r\n")), 431);
        let long = "a".repeat(DEFAULT_MAX_HEADER_BYTES);
        assert_eq!(status_of(&format!("GET /{long} HTTP/1.1\r\n")), 431);
        assert_eq!(status_of(&format!("GET /{long} HTTP/1.1\r\n\r\n")), 431);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb+c", false).as_deref(), Some("a/b+c"));
        assert_eq!(percent_decode("a+c", true).as_deref(), Some("a c"));
        assert_eq!(percent_decode("%e2%9c%93", false).as_deref(), Some("✓"));
        assert_eq!(percent_decode("%2", false), None);
        assert_eq!(percent_decode("%", false), None);
    }

    #[test]
    fn encodes_responses_and_drops_bad_headers() {
        let response = Response::error(404, "no such user")
            .with_header("X-Request-Id", "7")
            .with_header("X-Split", "a\r\nInjected: yes")
            .with_header("Content-Length", "0");
        let bytes = encode_response(&response, true, false);
        let text = String::from_utf8(bytes).expect("utf-8");
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("Content-Length: 24\r\n"), "{text}");
        assert!(
            !text.contains("Injected") && !text.contains("Content-Length: 0"),
            "{text}"
        );
        assert!(text.contains("Connection: keep-alive\r\n"), "{text}");
        assert!(text.contains("X-Request-Id: 7\r\n"), "{text}");
        assert!(
            text.ends_with("\r\n\r\n{\"error\":\"no such user\"}"),
            "{text}"
        );
        let head_only = encode_response(&response, false, true);
        assert!(head_only.ends_with(b"Connection: close\r\nX-Request-Id: 7\r\n\r\n"));
    }

    #[test]
    fn wake_addr_replaces_wildcards() {
        let any: SocketAddr = "0.0.0.0:3025".parse().expect("addr");
        assert_eq!(wake_addr(any), "127.0.0.1:3025".parse().expect("addr"));
        let any6: SocketAddr = "[::]:3025".parse().expect("addr");
        assert_eq!(wake_addr(any6), "[::1]:3025".parse().expect("addr"));
    }

    /// A connected loopback pair: (client side, server side).
    fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        (client, server)
    }

    fn proxy_v2(source: &str, destination: &str) -> Vec<u8> {
        let source: SocketAddr = source.parse().expect("addr");
        let destination: SocketAddr = destination.parse().expect("addr");
        ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (source, destination),
        )
        .build()
        .expect("header")
    }

    /// Writes `bytes` then "rest", and runs `read_proxy_header` as if from `peer`; returns its
    /// answer and what is left to read on the socket.
    fn proxy_read(bytes: &[u8], peer: &str) -> (io::Result<SocketAddr>, Vec<u8>) {
        let (mut client, server) = socket_pair();
        client.write_all(bytes).expect("write");
        client.write_all(b"rest").expect("write");
        client.shutdown(Shutdown::Write).expect("shutdown");
        let peer: SocketAddr = peer.parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(5);
        let answer = read_proxy_header(&server, peer, deadline);
        let mut rest = Vec::new();
        let _ = (&server).read_to_end(&mut rest);
        (answer, rest)
    }

    #[test]
    fn proxy_header_from_loopback_names_the_peer() {
        let header = proxy_v2("203.0.113.7:5555", "127.0.0.1:443");
        let (answer, rest) = proxy_read(&header, "127.0.0.1:40000");
        assert_eq!(
            answer.expect("accepted"),
            "203.0.113.7:5555".parse().expect("addr")
        );
        assert_eq!(rest, b"rest", "the header is consumed, nothing more");

        let header = proxy_v2("[2001:db8::7]:5555", "[::1]:443");
        let (answer, _) = proxy_read(&header, "[::1]:40000");
        assert_eq!(
            answer.expect("accepted"),
            "[2001:db8::7]:5555".parse().expect("addr")
        );
    }

    #[test]
    fn proxy_header_local_command_keeps_the_tcp_peer() {
        let header = ppp::v2::Builder::new(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::AddressFamily::Unspecified | ppp::v2::Protocol::Unspecified,
        )
        .build()
        .expect("header");
        let (answer, rest) = proxy_read(&header, "127.0.0.1:40000");
        assert_eq!(
            answer.expect("accepted"),
            "127.0.0.1:40000".parse().expect("addr")
        );
        assert_eq!(rest, b"rest");
    }

    #[test]
    fn garbage_after_the_proxy_signature_is_refused() {
        let mut bad = ppp::v2::PROTOCOL_PREFIX.to_vec();
        bad.extend_from_slice(&[0x99, 0x11, 0, 12]); // version 9
        bad.extend_from_slice(&[0; 12]);
        let (answer, _) = proxy_read(&bad, "127.0.0.1:40000");
        assert!(answer.is_err());

        // Starts like the signature, then is not.
        let (answer, _) = proxy_read(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n", "127.0.0.1:40000");
        assert!(answer.is_err());

        // An advertised length past the bound.
        let mut long = ppp::v2::PROTOCOL_PREFIX.to_vec();
        long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        let (answer, _) = proxy_read(&long, "127.0.0.1:40000");
        assert!(answer.is_err());

        // Truncated: the connection ends inside the header.
        let header = proxy_v2("203.0.113.7:5555", "127.0.0.1:443");
        let (mut client, server) = socket_pair();
        client.write_all(&header[..20]).expect("write");
        client.shutdown(Shutdown::Write).expect("shutdown");
        let deadline = Instant::now() + Duration::from_secs(5);
        let peer: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        assert!(read_proxy_header(&server, peer, deadline).is_err());
    }

    #[test]
    fn proxy_header_from_a_non_loopback_peer_is_refused() {
        let header = proxy_v2("203.0.113.7:5555", "127.0.0.1:443");
        let (answer, _) = proxy_read(&header, "198.51.100.1:40000");
        assert!(answer.is_err(), "never trusted from a remote peer");
    }

    #[test]
    fn no_proxy_header_leaves_the_connection_unchanged() {
        let tls_start = [0x16, 0x03, 0x01, 0x00, 0x05];
        for peer in ["127.0.0.1:40000", "198.51.100.1:40000"] {
            let (answer, rest) = proxy_read(&tls_start, peer);
            assert_eq!(answer.expect("served"), peer.parse().expect("addr"));
            let mut expected = tls_start.to_vec();
            expected.extend_from_slice(b"rest");
            assert_eq!(rest, expected, "nothing consumed");
        }
    }

    #[test]
    fn proxy_header_read_is_bounded_by_the_deadline() {
        let header = proxy_v2("203.0.113.7:5555", "127.0.0.1:443");
        let (mut client, server) = socket_pair();
        client.write_all(&header[..20]).expect("write"); // and then nothing
        let deadline = Instant::now() + Duration::from_millis(200);
        let peer: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        let started = Instant::now();
        let err = read_proxy_header(&server, peer, deadline).expect_err("times out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
