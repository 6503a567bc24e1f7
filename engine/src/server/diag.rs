//! The diagnostics endpoint: plain HTTP/1.1 on `diag_addr`, served by one ordinary thread with
//! blocking sockets, one request per connection. This is not the fast path: a scrape reads the
//! shards' single-writer counters (see `metrics.rs`) and renders the text itself.
//!
//! - `GET /metrics`: Prometheus text format;
//! - `GET /healthz`: 200 while the engine runs;
//! - `GET /readyz`: 200 once every shard listens and has applied a snapshot, 503 before that
//!   and while draining.
//!
//! Bounds: a request head of at most [`MAX_DIAG_REQUEST_BYTES`], read within
//! [`DIAG_IO_TIMEOUT`]; a slow client delays other scrapes by at most that much. Bind it to a
//! private address: it is unauthenticated.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::server::listen::Markers;
use crate::server::metrics::{render, ShardMetrics};
use crate::server::EngineError;

/// Largest diag request head.
pub const MAX_DIAG_REQUEST_BYTES: usize = 4 * 1024;

/// Read and write timeout of a diag connection.
pub const DIAG_IO_TIMEOUT: Duration = Duration::from_secs(2);

/// What the diag thread reads.
pub(crate) struct DiagState {
    pub shards: Vec<Arc<ShardMetrics>>,
    /// Set when a shutdown begins.
    pub draining: AtomicBool,
}

impl DiagState {
    /// Every shard listens and has applied a snapshot, and no shutdown has begun.
    pub fn ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire)
            && self
                .shards
                .iter()
                .all(|s| s.listening() && s.snapshot_version().is_some())
    }
}

/// The running diag thread.
pub(crate) struct Diag {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Set by [`Diag::stop_at_marker`]: the thread stops at a connection from one of these.
    markers: Arc<std::sync::OnceLock<Arc<Markers>>>,
    thread: Option<JoinHandle<()>>,
    /// A copy of the listening socket, for a takeover.
    exported: Option<TcpListener>,
}

impl Diag {
    /// Binds `addr` and starts serving.
    pub fn start(addr: SocketAddr, state: Arc<DiagState>) -> Result<Diag, EngineError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| EngineError::DiagBind { addr, source })?;
        Diag::serve_on(listener, addr, state)
    }

    /// Serves on a listener already bound (inherited in a takeover); `addr` names it in errors.
    pub fn serve_on(
        listener: TcpListener,
        addr: SocketAddr,
        state: Arc<DiagState>,
    ) -> Result<Diag, EngineError> {
        let addr = listener
            .local_addr()
            .map_err(|source| EngineError::DiagBind { addr, source })?;
        let exported = listener.try_clone().ok();
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let markers = Arc::new(std::sync::OnceLock::new());
        let thread_markers = Arc::clone(&markers);
        let thread = std::thread::Builder::new()
            .name("jaunt-diag".into())
            .spawn(move || serve(listener, state, thread_stop, thread_markers))
            .map_err(|source| EngineError::Thread {
                name: "jaunt-diag".into(),
                source,
            })?;
        Ok(Diag {
            addr,
            stop,
            markers,
            thread: Some(thread),
            exported,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A copy of the listening socket (for the process that takes this one over).
    pub fn listener(&self) -> Option<std::os::fd::OwnedFd> {
        self.exported
            .as_ref()
            .and_then(|l| l.try_clone().ok())
            .map(Into::into)
    }

    /// Stops accepting, leaving what comes later in the socket's queue for the process that
    /// takes it over (see `listen.rs`).
    pub fn stop_at_marker(&mut self) -> std::io::Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let markers = Arc::clone(self.markers.get_or_init(Default::default));
        let marker = markers.connect(crate::server::listen::reach_addr(self.addr));
        if marker.is_err() {
            self.thread = Some(thread);
            return marker.map(drop);
        }
        let _ = thread.join();
        self.exported = None;
        Ok(())
    }

    /// Stops the thread and closes the socket.
    pub fn stop(&mut self) {
        self.exported = None;
        if self.thread.is_none() {
            return;
        }
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept; failure means it is already gone.
        let _ = TcpStream::connect_timeout(&self.addr, DIAG_IO_TIMEOUT);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Diag {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(
    listener: TcpListener,
    state: Arc<DiagState>,
    stop: Arc<AtomicBool>,
    markers: Arc<std::sync::OnceLock<Arc<Markers>>>,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        if let (Ok(conn), Some(markers)) = (&conn, markers.get()) {
            if conn.peer_addr().is_ok_and(|peer| markers.contains(&peer)) {
                return;
            }
        }
        match conn {
            Ok(conn) => {
                if let Err(e) = answer(conn, &state) {
                    tracing::debug!(error = %e, "diag request failed");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "diag accept failed");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn answer(stream: TcpStream, state: &DiagState) -> std::io::Result<()> {
    stream.set_read_timeout(Some(DIAG_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(DIAG_IO_TIMEOUT))?;
    let mut conn = Conn {
        stream,
        head_only: false,
    };
    let mut buf = vec![0u8; MAX_DIAG_REQUEST_BYTES];
    let mut filled = 0;
    let (method, path) = loop {
        let n = conn.stream.read(&mut buf[filled..])?;
        if n == 0 {
            return Ok(());
        }
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf[..filled]) {
            Ok(httparse::Status::Complete(_)) => {
                break (
                    request.method.unwrap_or("").to_owned(),
                    request.path.unwrap_or("").to_owned(),
                )
            }
            Ok(httparse::Status::Partial) if filled < buf.len() => {}
            _ => return conn.respond(400, "text/plain", "bad request\n"),
        }
    };
    if method != "GET" && method != "HEAD" {
        return conn.respond(405, "text/plain", "method not allowed\n");
    }
    conn.head_only = method == "HEAD";
    match path.split('?').next().unwrap_or("") {
        "/metrics" => conn.respond(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            &render(&state.shards),
        ),
        "/healthz" => conn.respond(200, "text/plain", "ok\n"),
        "/readyz" if state.ready() => conn.respond(200, "text/plain", "ready\n"),
        "/readyz" => conn.respond(503, "text/plain", "not ready\n"),
        _ => conn.respond(404, "text/plain", "not found\n"),
    }
}

/// A diag connection and whether its request was `HEAD`.
struct Conn {
    stream: TcpStream,
    head_only: bool,
}

impl Conn {
    fn respond(&mut self, status: u16, content_type: &str, body: &str) -> std::io::Result<()> {
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Service Unavailable",
        };
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        self.stream.write_all(head.as_bytes())?;
        if !self.head_only {
            self.stream.write_all(body.as_bytes())?;
        }
        self.stream.flush()
    }
}
