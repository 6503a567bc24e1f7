//! HTTP app access: one user stream of kind `app`, the agent's reverse proxy between the user's
//! HTTP/1.1 and the app.
//!
//! ```text
//! browser ─ HTTPS ─▶ engine (terminates TLS) ─ tunnel ─▶ agent ─ HTTP/1.1 (or HTTPS) ─▶ app
//! ```
//!
//! Per stream: read a request head ([`wire::parse_request`], bounded by
//! [`wire::MAX_HEAD_BYTES`], [`wire::MAX_HEADERS`] and [`HEAD_TIMEOUT`]), check its framing
//! ([`wire::plan_request`]: no Content-Length with Transfer-Encoding, valid lengths, one Host),
//! get the user's JWT for the app ([`AppState`]: the [`AppTokenProvider`] hook on a thread,
//! cached per user, roles and app until [`TOKEN_REFRESH_MARGIN`] before it expires), rewrite
//! the head ([`wire::rewrite_request`]: `Jaunt-*` fields dropped, `Jaunt-Jwt-Assertion` added,
//! Host set to the app's address, `X-Forwarded-*`, hop-by-hop fields dropped) and send it on the
//! stream's one upstream connection (kept alive across requests, re-dialed when the app closed
//! it). Bodies are streamed both ways, never buffered whole: Content-Length, chunked (framing
//! followed by [`wire::ChunkedScanner`], forwarded as chunked) and, for responses, until the app
//! closes. `Expect: 100-continue` and every interim response are relayed. After a `101`, the
//! two connections are spliced byte for byte (WebSocket).
//!
//! Each request goes to the [`AppRequestRecorder`] hook once its response ended. Whatever goes
//! wrong before a response started reaches the user as a plain-text HTTP error (400, 431, 502,
//! 504) and ends the stream; after, the stream just ends.
//!
//! `https://` apps are reached over TLS ([`upstream`]): the app's certificate is verified
//! against the host's trust roots (the OS store, loaded once per agent on a thread), for the host
//! of the app's URI (also the SNI), with ALPN `http/1.1`. A certificate the agent cannot verify
//! is a 502 that names the app and the TLS error.

pub(crate) mod upstream;
pub(crate) mod wire;

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::future::{FutureExt, LocalBoxFuture, Shared};
use futures_lite::{future, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_rustls::TlsConnector;
use jaunt_config::file::{AppProtocol, HostPort};
#[cfg(test)]
use jaunt_config::identity::unix_now;
use jaunt_config::wire::dial::StreamHeader;
use jaunt_engine::tunnel::{splice, Incoming, MuxStream, Side};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;

use crate::error::{describe_io, Blame};
use crate::hooks::{AgentHooks, AppRequest, AppRequestRecorder, AppSession, AppTokenProvider};
use crate::issue_cache::{IssueCache, Limits};
use crate::net;
use crate::serve::LocalTarget;
use crate::settings::Prepared;
use upstream::Upstream;
use wire::{BodyKind, ChunkedScanner, HeadError, RequestHead, RequestPlan, ResponseHead};

/// How long a user's connection may sit idle between requests.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a request head may take once its first byte arrived.
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the app has to start its response once the request was sent (then 504).
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(100);
/// Longest wait for any read or write while a body is moving (either side).
pub(crate) const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a token request to control may take.
pub(crate) const TOKEN_ISSUE_TIMEOUT: Duration = Duration::from_secs(45);
/// A cached token is replaced this long before it expires (seconds).
pub(crate) const TOKEN_REFRESH_MARGIN: u64 = 30;
/// Most token requests in flight at once (each is a thread).
pub(crate) const MAX_PENDING_TOKEN_REQUESTS: usize = 8;
/// Most (user, roles, app) tokens cached.
pub(crate) const MAX_CACHED_TOKENS: usize = 1024;
/// After the agent's last response, how long the user has to close before the stream is reset.
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes read and dropped while lingering.
const LINGER_BYTES: usize = 1 << 20;
/// First size of a connection's read buffer; it grows to [`wire::MAX_HEAD_BYTES`] for a
/// large head.
const INITIAL_BUF_BYTES: usize = 16 * 1024;

// ---------------------------------------------------------------------------------------------
// Tokens

/// Whose token: the user, their roles, the app.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TokenKey {
    user: String,
    roles: Vec<String>,
    app: String,
}

type Issued = crate::issue_cache::Issued<String>;

/// The TLS configuration for https apps, being loaded or loaded (shared by the connections that
/// wait for it).
type TlsLoad = Shared<LocalBoxFuture<'static, Result<Arc<ClientConfig>, String>>>;

/// The agent's app state on its executor: the hooks and the token cache.
pub(crate) struct AppState {
    provider: Option<Arc<dyn AppTokenProvider>>,
    recorder: Arc<dyn AppRequestRecorder>,
    tokens: IssueCache<TokenKey, String>,
    /// For https apps: the host's trust roots, read on first use (a failure is retried by the
    /// next connection).
    tls: RefCell<Option<TlsLoad>>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("provider", &self.provider.is_some())
            .field("cached", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

impl Default for AppState {
    fn default() -> Self {
        AppState::new(&AgentHooks::default())
    }
}

impl AppState {
    pub(crate) fn new(hooks: &AgentHooks) -> AppState {
        AppState {
            provider: hooks.app_tokens.clone(),
            recorder: hooks.app_requests.clone(),
            tokens: IssueCache::new(Limits {
                max_pending: MAX_PENDING_TOKEN_REQUESTS,
                max_cached: MAX_CACHED_TOKENS,
                timeout: TOKEN_ISSUE_TIMEOUT,
                what: "token",
                thread: "jaunt-agent-appjwt",
            }),
            tls: RefCell::new(None),
        }
    }

    /// The TLS client configuration for https apps ([`upstream::load_trust_roots`], on a thread,
    /// once; concurrent callers share the load). Must run on a glommio executor.
    async fn tls_config(&self) -> Result<Arc<ClientConfig>, String> {
        let load = self
            .tls
            .borrow_mut()
            .get_or_insert_with(|| {
                let (tx, rx) = oneshot::channel();
                let spawned = std::thread::Builder::new()
                    .name("jaunt-agent-roots".into())
                    .spawn(move || {
                        let _ = tx.send(upstream::load_trust_roots().map(Arc::new));
                    });
                async move {
                    if let Err(e) = spawned {
                        return Err(format!("cannot start a thread to read trust roots: {e}"));
                    }
                    rx.await
                        .unwrap_or_else(|_| Err("reading the trust roots stopped".into()))
                }
                .boxed_local()
                .shared()
            })
            .clone();
        let result = load.clone().await;
        if result.is_err() {
            let mut slot = self.tls.borrow_mut();
            if slot.as_ref().is_some_and(|current| current.ptr_eq(&load)) {
                *slot = None;
            }
        }
        result
    }

    pub(crate) fn has_provider(&self) -> bool {
        self.provider.is_some()
    }

    /// The JWT for `key`: cached, or issued now (shared with the other requests waiting for the
    /// same key). Must run on a glommio executor.
    async fn token(&self, key: &TokenKey, uri: &str) -> Issued {
        let Some(provider) = self.provider.clone() else {
            return Err("this agent has no app token provider".into());
        };
        let (k, uri) = (key.clone(), uri.to_owned());
        let logged = key.clone();
        self.tokens
            .get(
                key,
                move || provider.issue(&k.user, &k.roles, &k.app, &uri),
                move |issued| {
                    if let Err(e) = &issued {
                        tracing::warn!(blame = %Blame::Config, user = %logged.user,
                            app = %logged.app, error = %e, "no app token");
                    }
                    issued.and_then(checked).map(|token| {
                        let use_until = token.expires.saturating_sub(TOKEN_REFRESH_MARGIN);
                        (token.jwt, use_until)
                    })
                },
            )
            .await
    }
}

/// A token goes into a header line as is: it must be a compact JWS (visible ASCII, no spaces),
/// or a faulty control could inject header lines.
fn checked(token: crate::hooks::AppToken) -> Result<crate::hooks::AppToken, String> {
    if token.jwt.is_empty() || !token.jwt.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("control issued a token that is not a compact JWS".into());
    }
    Ok(token)
}

// ---------------------------------------------------------------------------------------------
// Buffered connections

/// A connection with a bounded read buffer: `buf[start..end]` read and not yet used.
struct Buffered<S> {
    io: S,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<S: AsyncRead + Unpin> Buffered<S> {
    fn new(io: S) -> Buffered<S> {
        Buffered {
            io,
            buf: vec![0u8; INITIAL_BUF_BYTES],
            start: 0,
            end: 0,
        }
    }

    fn data(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or_default()
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    fn take_all(&mut self) -> Vec<u8> {
        let data = self.data().to_vec();
        self.consume(data.len());
        data
    }

    /// Reads once more into the buffer; `Ok(0)` at EOF. Makes room by moving the unread bytes
    /// to the front, then by growing up to [`wire::MAX_HEAD_BYTES`]; fails when full (callers
    /// parse before that).
    async fn fill(&mut self) -> io::Result<usize> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < wire::MAX_HEAD_BYTES {
                let grown = (self.buf.len() * 2).min(wire::MAX_HEAD_BYTES);
                self.buf.resize(grown, 0);
            } else {
                return Err(io::Error::other("the read buffer is full"));
            }
        }
        let end = self.end;
        let n = match self.buf.get_mut(end..) {
            Some(spare) => self.io.read(spare).await?,
            None => 0,
        };
        self.end += n;
        Ok(n)
    }
}

/// Writes all of `bytes`, bounded by [`BODY_IDLE_TIMEOUT`].
async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    let sent = async {
        w.write_all(bytes).await?;
        w.flush().await
    };
    net::timeout(BODY_IDLE_TIMEOUT, sent)
        .await
        .unwrap_or_else(|| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no progress within {BODY_IDLE_TIMEOUT:?}"),
            ))
        })
}

async fn within<F: Future>(deadline: Instant, fut: F) -> Option<F::Output> {
    net::timeout(deadline.saturating_duration_since(Instant::now()), fut).await
}

/// Why a body stopped moving.
#[derive(Debug)]
enum RelayError {
    /// The sender closed before the body's end.
    Eof,
    Read(io::Error),
    Write(io::Error),
    Framing(wire::ChunkError),
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayError::Eof => f.write_str("the connection closed before the body's end"),
            RelayError::Read(e) => write!(f, "read: {}", describe_io(e)),
            RelayError::Write(e) => write!(f, "write: {}", describe_io(e)),
            RelayError::Framing(e) => write!(f, "malformed chunked body: {e}"),
        }
    }
}

/// Moves one body of `kind` from `src` to `dst`; returns its payload bytes.
async fn relay_body<R, W>(
    src: &mut Buffered<R>,
    dst: &mut W,
    kind: BodyKind,
) -> Result<u64, RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut remaining = match kind {
        BodyKind::Length(n) => n,
        _ => 0,
    };
    let mut scanner = ChunkedScanner::new();
    let mut moved = 0u64;
    loop {
        match kind {
            BodyKind::None => return Ok(0),
            BodyKind::Length(_) if remaining == 0 => return Ok(moved),
            BodyKind::Chunked if scanner.done() => return Ok(scanner.data_bytes()),
            _ => {}
        }
        if src.data().is_empty() {
            match net::timeout(BODY_IDLE_TIMEOUT, src.fill()).await {
                None => {
                    return Err(RelayError::Read(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("nothing arrived within {BODY_IDLE_TIMEOUT:?}"),
                    )))
                }
                // An https app that closes without TLS close_notify ends a body that lasts until
                // it closes as well (as browsers take it); a plain read never fails so.
                Some(Err(e))
                    if kind == BodyKind::Close && e.kind() == io::ErrorKind::UnexpectedEof =>
                {
                    return Ok(moved)
                }
                Some(Err(e)) => return Err(RelayError::Read(e)),
                Some(Ok(0)) if kind == BodyKind::Close => return Ok(moved),
                Some(Ok(0)) => return Err(RelayError::Eof),
                Some(Ok(_)) => {}
            }
        }
        let data = src.data();
        let n = match kind {
            BodyKind::Length(_) => {
                usize::try_from(remaining).map_or(data.len(), |r| r.min(data.len()))
            }
            BodyKind::Chunked => scanner.scan(data).map_err(RelayError::Framing)?,
            BodyKind::Close => data.len(),
            BodyKind::None => 0,
        };
        send(dst, data.get(..n).unwrap_or_default())
            .await
            .map_err(RelayError::Write)?;
        src.consume(n);
        moved += n as u64;
        remaining = remaining.saturating_sub(n as u64);
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions

/// Serves one app stream, start to end. `local` is the app's address, as routed.
pub(crate) async fn serve(
    incoming: Incoming,
    header: StreamHeader,
    local: LocalTarget,
    prepared: Rc<Prepared>,
) {
    let Some(app) = prepared
        .services
        .apps
        .iter()
        .find(|a| a.name == header.target)
        .cloned()
    else {
        // `route` found it; only a changed configuration could get here.
        incoming.refuse(&format!("no app named {}", header.target));
        return;
    };
    let stream = match incoming.accept() {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(blame = %Blame::Engine, error = %e, "stream gone before accept");
            return;
        }
    };
    // https: TLS to the app, checked for (and SNI naming) the host of its URI.
    let (tls, bad_name) = match app.protocol {
        AppProtocol::Https => match ServerName::try_from(app.addr.host.clone()) {
            Ok(name) => (Some(name), None),
            Err(e) => (
                None,
                Some(format!(
                    "app {}: {:?} (from {}) cannot be checked against a certificate: {e}",
                    app.name, app.addr.host, app.uri
                )),
            ),
        },
        _ => (None, None),
    };
    let unsupported = if bad_name.is_some() {
        bad_name
    } else if !prepared.app.has_provider() {
        Some(format!(
            "app {}: this agent cannot sign app tokens (it runs without an app token provider; \
             `jaunt agent` has one)",
            app.name
        ))
    } else {
        None
    };
    let client_ip = header
        .client_addr
        .parse::<SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| header.client_addr.parse::<IpAddr>())
        .ok()
        .map(|ip| ip.to_string());
    let mut session = Session {
        client: Buffered::new(stream),
        app: None,
        name: app.name.clone(),
        host: local.addr.to_string(),
        addr: local.addr,
        uri: app.uri.clone(),
        tls,
        client_ip,
        key: TokenKey {
            user: header.user.clone(),
            roles: header.roles.clone(),
            app: app.name.clone(),
        },
        record: AppSession {
            user: header.user.clone(),
            app: app.name.clone(),
            client_addr: header.client_addr.clone(),
        },
        unsupported,
        prepared,
        requests: 0,
        to_app: 0,
        to_user: 0,
        upgraded: None,
    };
    tracing::debug!(local = %session.addr, "app session open");
    let end = session.run().await;
    let (mut to_app, mut to_user) = (session.to_app, session.to_user);
    let upgraded = session.upgraded.is_some();
    let mut failed = None;
    match session.upgraded.take() {
        Some(app_io) => {
            // WebSocket (or another protocol after a 101): byte for byte until either side
            // closes.
            match splice(session.client.io, app_io).await {
                Ok(moved) => {
                    to_app += moved.a_to_b;
                    to_user += moved.b_to_a;
                }
                Err(e) => {
                    to_app += e.spliced.a_to_b;
                    to_user += e.spliced.b_to_a;
                    let blame = match e.side {
                        Side::A => Blame::Engine,
                        Side::B => Blame::LocalService,
                    };
                    failed = Some((blame, e.op, e.source));
                }
            }
        }
        None => finish(&session.client.io).await,
    }
    match failed {
        None => tracing::info!(
            session = "app session",
            local = %session.addr,
            requests = session.requests,
            bytes_to_local = to_app,
            bytes_to_user = to_user,
            upgraded,
            end = %end,
            "closed"
        ),
        Some((blame, op, error)) => tracing::info!(
            session = "app session",
            local = %session.addr,
            requests = session.requests,
            bytes_to_local = to_app,
            bytes_to_user = to_user,
            upgraded,
            %blame,
            op,
            %error,
            "ended with an error"
        ),
    }
}

/// Half-closes the user's stream, then waits (bounded) for the user to close theirs, so that
/// the last response is read before the stream is dropped (a drop resets).
async fn finish(client: &MuxStream) {
    let mut c = client;
    let _ = net::timeout(LINGER, c.close()).await;
    let _ = net::timeout(LINGER, async {
        let mut sink = [0u8; 4096];
        let mut total = 0;
        while let Ok(n) = c.read(&mut sink).await {
            total += n;
            if n == 0 || total > LINGER_BYTES {
                break;
            }
        }
    })
    .await;
}

struct Session {
    client: Buffered<MuxStream>,
    /// The upstream connection, kept between requests.
    app: Option<Buffered<Upstream>>,
    name: String,
    /// The app's `host:port` (Host of forwarded requests).
    host: String,
    addr: HostPort,
    uri: String,
    /// For an https app: the name its certificate must have (also the SNI).
    tls: Option<ServerName<'static>>,
    client_ip: Option<String>,
    key: TokenKey,
    record: AppSession,
    /// Why every request gets a 502 (no token provider, an https host no certificate can
    /// name).
    unsupported: Option<String>,
    prepared: Rc<Prepared>,
    requests: u64,
    to_app: u64,
    to_user: u64,
    /// After a 101: the app's connection, to splice with the user's stream.
    upgraded: Option<Upstream>,
}

/// What follows an exchange.
enum Next {
    KeepAlive,
    /// The stream ends; why, for the log.
    End(String),
}

/// A request head, or why there is none.
enum HeadRead {
    Head(RequestHead),
    /// The user closed or went idle: the stream ends quietly.
    Quiet(&'static str),
    /// Answer this and end.
    Reject(u16, String),
}

/// Why the app's response head did not arrive.
enum AppFail {
    /// EOF before any byte of a response (a kept-alive connection the app closed meanwhile).
    Eof,
    Io(io::Error),
    Timeout,
    Malformed(HeadError),
    /// The user closed while the agent waited for the app.
    ClientGone(String),
}

/// The app's next head, parsed from what is buffered.
enum Parsed {
    Need,
    /// A 1xx other than 101, already relayed to the user.
    Interim(u16),
    Final(ResponseHead),
}

impl Session {
    async fn run(&mut self) -> String {
        loop {
            let head = match self.read_request_head().await {
                HeadRead::Head(head) => head,
                HeadRead::Quiet(why) => return why.to_owned(),
                HeadRead::Reject(status, message) => {
                    tracing::info!(status, reason = %message, "app request refused");
                    let _ = send(
                        &mut self.client.io,
                        &wire::error_response(status, &message, false),
                    )
                    .await;
                    return format!("refused a request: {message}");
                }
            };
            self.requests += 1;
            match self.exchange(head).await {
                Next::KeepAlive => {}
                Next::End(why) => return why,
            }
        }
    }

    async fn read_request_head(&mut self) -> HeadRead {
        let idle = Instant::now() + IDLE_TIMEOUT;
        let mut started: Option<Instant> = None;
        loop {
            if !self.client.data().is_empty() {
                match wire::parse_request(self.client.data()) {
                    Ok(Some((head, used))) => {
                        self.client.consume(used);
                        return HeadRead::Head(head);
                    }
                    Ok(None) => {
                        started.get_or_insert_with(|| Instant::now() + HEAD_TIMEOUT);
                    }
                    Err(e @ (HeadError::TooLarge { .. } | HeadError::TooManyFields { .. })) => {
                        return HeadRead::Reject(431, format!("the request head is refused: {e}"))
                    }
                    Err(e) => return HeadRead::Reject(400, format!("malformed request: {e}")),
                }
            }
            match within(started.unwrap_or(idle), self.client.fill()).await {
                None if started.is_some() => {
                    return HeadRead::Reject(
                        408,
                        format!("the request head did not arrive within {HEAD_TIMEOUT:?}"),
                    )
                }
                None => return HeadRead::Quiet("idle"),
                Some(Ok(0)) => return HeadRead::Quiet("the user closed"),
                Some(Err(_)) => return HeadRead::Quiet("the user's stream failed"),
                Some(Ok(_)) => {}
            }
        }
    }

    fn record(&self, request: &AppRequest) {
        self.prepared.app.recorder.record(&self.record, request);
    }

    /// Answers `request` with the agent's own error and ends the stream. The app sent no
    /// response, so the record's status stays 0.
    async fn fail(
        &mut self,
        mut request: AppRequest,
        started: Instant,
        status: u16,
        message: &str,
        head_only: bool,
    ) -> Next {
        tracing::info!(status, method = %request.method, reason = %message, "app request failed");
        self.app = None;
        request.duration_ms = started.elapsed().as_millis().try_into().unwrap_or(u64::MAX);
        self.record(&request);
        let _ = send(
            &mut self.client.io,
            &wire::error_response(status, message, head_only),
        )
        .await;
        Next::End(format!("{status}: {message}"))
    }

    fn what(&self) -> String {
        format!("app {} at {}", self.name, self.addr)
    }

    /// One request and its response.
    async fn exchange(&mut self, head: RequestHead) -> Next {
        let started = Instant::now();
        let mut request = AppRequest {
            method: head.method.clone(),
            path: head.target.clone(),
            status: 0,
            request_bytes: 0,
            response_bytes: 0,
            duration_ms: 0,
            upgraded: false,
        };
        let plan = match wire::plan_request(&head) {
            Ok(plan) => plan,
            Err(reject) => {
                let head_only = head.method == "HEAD";
                return self
                    .fail(request, started, reject.status, &reject.message, head_only)
                    .await;
            }
        };
        if let Some(why) = self.unsupported.clone() {
            return self.fail(request, started, 502, &why, plan.head_only).await;
        }
        let jwt = match self.prepared.app.token(&self.key, &self.uri).await {
            Ok(jwt) => jwt,
            Err(e) => {
                let message = format!(
                    "app {}: cannot get an app token for {}: {e}",
                    self.name, self.key.user
                );
                return self
                    .fail(request, started, 502, &message, plan.head_only)
                    .await;
            }
        };
        let forwarded = wire::rewrite_request(
            &head,
            &plan,
            &wire::Forwarding {
                host: &self.host,
                jwt: &jwt,
                client_ip: self.client_ip.as_deref(),
            },
        );
        // A kept-alive connection the app closed meanwhile is noticed when the head is sent or
        // the response does not come: a request without a body is then sent once more, on a
        // new connection.
        let mut retried = false;
        let mut skipped_body = false;
        let response = loop {
            let reused = match self.connect().await {
                Ok(reused) => reused,
                Err(message) => {
                    return self
                        .fail(request, started, 502, &message, plan.head_only)
                        .await
                }
            };
            let retry = reused && !retried && plan.body == BodyKind::None;
            if let Err(e) = self.send_to_app(&forwarded).await {
                if retry {
                    retried = true;
                    self.app = None;
                    continue;
                }
                let message = format!("{} closed the connection: {}", self.what(), describe_io(&e));
                return self
                    .fail(request, started, 502, &message, plan.head_only)
                    .await;
            }
            let deadline = Instant::now() + RESPONSE_TIMEOUT;
            if plan.expect_continue {
                match self.await_continue(deadline).await {
                    Ok(None) => {}
                    Ok(Some(early)) => {
                        // A final answer without 100 Continue: the body is never sent.
                        skipped_body = true;
                        break early;
                    }
                    Err(fail) => return self.app_failed(request, started, &plan, fail).await,
                }
            }
            if !skipped_body && plan.body != BodyKind::None {
                let Some(app) = self.app.as_mut() else {
                    return Next::End("no app connection".into());
                };
                match relay_body(&mut self.client, &mut app.io, plan.body).await {
                    Ok(n) => {
                        request.request_bytes = n;
                        self.to_app += n;
                    }
                    Err(RelayError::Framing(e)) => {
                        let message = format!("malformed chunked request body: {e}");
                        return self
                            .fail(request, started, 400, &message, plan.head_only)
                            .await;
                    }
                    Err(RelayError::Write(e)) => {
                        let message = format!(
                            "{} closed the connection while receiving the request body: {}",
                            self.what(),
                            describe_io(&e)
                        );
                        return self
                            .fail(request, started, 502, &message, plan.head_only)
                            .await;
                    }
                    Err(e) => {
                        // The user's side failed: nobody to answer.
                        self.app = None;
                        request.duration_ms = millis(started);
                        self.record(&request);
                        return Next::End(format!("the user's request body: {e}"));
                    }
                }
            }
            match self.read_final_head(deadline).await {
                Ok(head) => break head,
                Err(AppFail::Eof) if retry => {
                    retried = true;
                    self.app = None;
                }
                Err(fail) => return self.app_failed(request, started, &plan, fail).await,
            }
        };
        self.respond(request, started, &plan, response, skipped_body)
            .await
    }

    async fn app_failed(
        &mut self,
        request: AppRequest,
        started: Instant,
        plan: &RequestPlan,
        fail: AppFail,
    ) -> Next {
        let (status, message) = match fail {
            AppFail::Eof => (
                502,
                format!(
                    "{} closed (or reset) the connection without answering",
                    self.what()
                ),
            ),
            AppFail::Io(e) => (
                502,
                format!(
                    "the connection to {} failed: {}",
                    self.what(),
                    describe_io(&e)
                ),
            ),
            AppFail::Timeout => (
                504,
                format!("{} did not answer within {RESPONSE_TIMEOUT:?}", self.what()),
            ),
            AppFail::Malformed(e) => (
                502,
                format!("{} sent a malformed response: {e}", self.what()),
            ),
            AppFail::ClientGone(why) => {
                self.app = None;
                let mut request = request;
                request.duration_ms = millis(started);
                self.record(&request);
                return Next::End(why);
            }
        };
        self.fail(request, started, status, &message, plan.head_only)
            .await
    }

    /// The upstream connection: the kept one if the app has not closed it, or a new one. `Ok`
    /// says whether it was reused; the error is the text the user reads.
    async fn connect(&mut self) -> Result<bool, String> {
        if let Some(app) = self.app.as_mut() {
            // Anything readable on an idle connection (EOF, an error, stray bytes) retires it.
            let idle = app.data().is_empty() && future::poll_once(app.fill()).await.is_none();
            if idle {
                return Ok(true);
            }
            self.app = None;
        }
        let timeout = self.prepared.timeouts.local_connect;
        let addr = self.addr.clone();
        let connected = async {
            let addrs = net::resolve(&addr.host, addr.port).await?;
            net::connect(&addrs, timeout).await
        };
        let tcp = match net::timeout(timeout, connected).await {
            Some(Ok(tcp)) => tcp,
            Some(Err(e)) => {
                return Err(format!("cannot reach {}: {}", self.what(), describe_io(&e)))
            }
            None => {
                return Err(format!(
                    "cannot reach {}: no answer within {timeout:?}",
                    self.what()
                ))
            }
        };
        let io = match self.tls.clone() {
            None => Upstream::Plain(tcp),
            Some(name) => {
                let config = match net::timeout(timeout, self.prepared.app.tls_config()).await {
                    Some(Ok(config)) => config,
                    Some(Err(e)) => {
                        return Err(format!("cannot verify {} (https): {e}", self.what()))
                    }
                    None => {
                        return Err(format!(
                            "cannot verify {} (https): the trust roots were not read within \
                             {timeout:?}",
                            self.what()
                        ))
                    }
                };
                let handshake = TlsConnector::from(config).connect(name, tcp);
                match net::timeout(timeout, handshake).await {
                    Some(Ok(tls)) => Upstream::Tls(Box::new(tls)),
                    Some(Err(e)) => {
                        return Err(format!(
                            "TLS with {} failed: {}",
                            self.what(),
                            upstream::describe_tls(&e)
                        ));
                    }
                    None => {
                        return Err(format!(
                            "TLS with {} failed: no handshake within {timeout:?}",
                            self.what()
                        ))
                    }
                }
            }
        };
        self.app = Some(Buffered::new(io));
        Ok(false)
    }

    async fn send_to_app(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self.app.as_mut() {
            Some(app) => send(&mut app.io, bytes).await,
            None => Err(io::Error::other("no app connection")),
        }
    }

    /// Parses the app's next head from what is buffered; relays interim responses.
    async fn parse_app_head(&mut self) -> Result<Parsed, AppFail> {
        let Some(app) = self.app.as_mut() else {
            return Err(AppFail::Eof);
        };
        if app.data().is_empty() {
            return Ok(Parsed::Need);
        }
        let (head, used) = match wire::parse_response(app.data()) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return Ok(Parsed::Need),
            Err(e) => return Err(AppFail::Malformed(e)),
        };
        app.consume(used);
        if head.status >= 200 || head.status == 101 {
            return Ok(Parsed::Final(head));
        }
        send(&mut self.client.io, &wire::rewrite_interim(&head))
            .await
            .map_err(|e| AppFail::ClientGone(format!("the user's stream: {}", describe_io(&e))))?;
        Ok(Parsed::Interim(head.status))
    }

    /// Reads the app's final response head (relaying 1xx ones) until `deadline`.
    async fn read_final_head(&mut self, deadline: Instant) -> Result<ResponseHead, AppFail> {
        let mut interim = false;
        loop {
            match self.parse_app_head().await? {
                Parsed::Final(head) => return Ok(head),
                Parsed::Interim(_) => {
                    interim = true;
                    continue;
                }
                Parsed::Need => {}
            }
            let Some(app) = self.app.as_mut() else {
                return Err(AppFail::Eof);
            };
            let nothing_yet = app.data().is_empty() && !interim;
            match within(deadline, app.fill()).await {
                None => return Err(AppFail::Timeout),
                Some(Ok(0)) if nothing_yet => return Err(AppFail::Eof),
                Some(Ok(0)) => {
                    return Err(AppFail::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the app closed the connection in the middle of a response head",
                    )))
                }
                // A reset before any answer: the app dropped a kept-alive connection with
                // the request unread, which is as retryable as an EOF.
                Some(Err(e))
                    if nothing_yet
                        && matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionReset
                                | io::ErrorKind::ConnectionAborted
                                // TLS: closed without close_notify.
                                | io::ErrorKind::UnexpectedEof
                        ) =>
                {
                    return Err(AppFail::Eof)
                }
                Some(Err(e)) => return Err(AppFail::Io(e)),
                Some(Ok(_)) => {}
            }
        }
    }

    /// `Expect: 100-continue`: waits until the app says 100 (relayed), the user sends the body
    /// anyway, or the app answers for good (`Some`: the body is not wanted).
    async fn await_continue(&mut self, deadline: Instant) -> Result<Option<ResponseHead>, AppFail> {
        enum Side {
            Client(io::Result<usize>),
            App(io::Result<usize>),
        }
        loop {
            if !self.client.data().is_empty() {
                return Ok(None);
            }
            match self.parse_app_head().await? {
                Parsed::Interim(100) => return Ok(None),
                Parsed::Interim(_) => continue,
                Parsed::Final(head) => return Ok(Some(head)),
                Parsed::Need => {}
            }
            let client = &mut self.client;
            let Some(app) = self.app.as_mut() else {
                return Err(AppFail::Eof);
            };
            let raced = future::or(async { Side::Client(client.fill().await) }, async {
                Side::App(app.fill().await)
            });
            match within(deadline, raced).await {
                None => return Err(AppFail::Timeout),
                Some(Side::Client(Ok(0))) => {
                    return Err(AppFail::ClientGone(
                        "the user closed before sending the body".into(),
                    ))
                }
                Some(Side::Client(Err(e))) => {
                    return Err(AppFail::ClientGone(format!(
                        "the user's stream: {}",
                        describe_io(&e)
                    )))
                }
                Some(Side::App(Ok(0))) => return Err(AppFail::Eof),
                Some(Side::App(Err(e))) => return Err(AppFail::Io(e)),
                Some(Side::Client(Ok(_)) | Side::App(Ok(_))) => {}
            }
        }
    }

    /// Relays the app's final response (or switches protocols on a 101).
    async fn respond(
        &mut self,
        mut request: AppRequest,
        started: Instant,
        plan: &RequestPlan,
        head: ResponseHead,
        skipped_body: bool,
    ) -> Next {
        if head.status == 101 {
            if plan.upgrade.is_none() {
                let message = format!(
                    "{} sent a malformed response: 101 Switching Protocols to a request that \
                     did not ask to upgrade",
                    self.what()
                );
                return self
                    .fail(request, started, 502, &message, plan.head_only)
                    .await;
            }
            return self.upgrade(request, started, head).await;
        }
        let response = match wire::plan_response(&head, plan) {
            Ok(response) => response,
            Err(why) => {
                let message = format!("{} sent a malformed response: {why}", self.what());
                return self
                    .fail(request, started, 502, &message, plan.head_only)
                    .await;
            }
        };
        let close = plan.close || skipped_body || response.body == BodyKind::Close;
        request.status = head.status;
        if let Err(e) = send(
            &mut self.client.io,
            &wire::rewrite_response(&head, &response, close),
        )
        .await
        {
            self.app = None;
            request.duration_ms = millis(started);
            self.record(&request);
            return Next::End(format!("the user's stream: {}", describe_io(&e)));
        }
        let Some(app) = self.app.as_mut() else {
            return Next::End("no app connection".into());
        };
        let relayed = relay_body(app, &mut self.client.io, response.body).await;
        request.duration_ms = millis(started);
        let next = match relayed {
            Ok(n) => {
                request.response_bytes = n;
                self.to_user += n;
                if response.app_closes || skipped_body {
                    self.app = None;
                }
                if close {
                    Next::End("the exchange closed the connection".into())
                } else {
                    Next::KeepAlive
                }
            }
            Err(e) => {
                self.app = None;
                tracing::info!(blame = %Blame::LocalService, error = %e,
                    "app response cut off");
                Next::End(format!("the response body: {e}"))
            }
        };
        self.record(&request);
        next
    }

    /// After a 101: relays it, then splices the user's stream and the app's connection.
    async fn upgrade(
        &mut self,
        mut request: AppRequest,
        started: Instant,
        head: ResponseHead,
    ) -> Next {
        let Some(mut app) = self.app.take() else {
            return Next::End("no app connection".into());
        };
        let plan = wire::ResponsePlan {
            body: BodyKind::None,
            codings: None,
            content_length: None,
            app_closes: false,
        };
        let mut out = wire::rewrite_response(&head, &plan, false);
        out.extend_from_slice(&app.take_all());
        if let Err(e) = send(&mut self.client.io, &out).await {
            return Next::End(format!("the user's stream: {}", describe_io(&e)));
        }
        let early = self.client.take_all();
        if let Err(e) = send(&mut app.io, &early).await {
            return Next::End(format!(
                "{} after the upgrade: {}",
                self.what(),
                describe_io(&e)
            ));
        }
        request.status = 101;
        request.upgraded = true;
        request.duration_ms = millis(started);
        self.record(&request);
        self.to_app += early.len() as u64;
        // `serve` splices, with both streams owned.
        self.upgraded = Some(app.io);
        Next::End("upgraded".into())
    }
}

fn millis(started: Instant) -> u64 {
    started.elapsed().as_millis().try_into().unwrap_or(u64::MAX)
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use glommio::{LocalExecutorBuilder, Placement};

    use super::*;
    use crate::hooks::AppToken;

    /// A mock provider: tokens valid for `ttl` seconds, counting calls.
    struct MockTokens {
        ttl: u64,
        jwt: &'static str,
        calls: AtomicUsize,
    }

    impl AppTokenProvider for MockTokens {
        fn issue(&self, user: &str, _: &[String], app: &str, _: &str) -> Result<AppToken, String> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(AppToken {
                jwt: format!("{}.{user}.{app}", self.jwt),
                expires: unix_now() + self.ttl,
            })
        }
    }

    fn key(user: &str, roles: &[&str]) -> TokenKey {
        TokenKey {
            user: user.into(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            app: "web".into(),
        }
    }

    fn calls_for(ttl: u64, jwt: &'static str, keys: &[TokenKey]) -> (usize, Vec<Issued>) {
        let provider = Arc::new(MockTokens {
            ttl,
            jwt,
            calls: AtomicUsize::new(0),
        });
        let hooks = AgentHooks {
            app_tokens: Some(provider.clone()),
            ..AgentHooks::default()
        };
        let results = LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(64 << 10)
            .make()
            .unwrap()
            .run(async move {
                let state = AppState::new(&hooks);
                let mut results = Vec::new();
                for k in keys {
                    results.push(state.token(k, "http://127.0.0.1:1").await);
                }
                results
            });
        (provider.calls.load(Ordering::SeqCst), results)
    }

    #[test]
    fn tokens_are_cached_per_user_roles_and_app_until_shortly_before_they_expire() {
        let alice = key("alice", &["access"]);
        let (calls, results) = calls_for(3600, "h", &[alice.clone(), alice.clone()]);
        assert_eq!(calls, 1);
        assert_eq!(results[1], Ok("h.alice.web".to_owned()));
        // Other roles are another token.
        let (calls, _) = calls_for(3600, "h", &[alice.clone(), key("alice", &["editor"])]);
        assert_eq!(calls, 2);
        // Less than the margin left: not reused.
        let (calls, results) = calls_for(TOKEN_REFRESH_MARGIN - 5, "h", &[alice.clone(), alice]);
        assert_eq!(calls, 2);
        assert!(results.iter().all(Result::is_ok));
    }

    #[test]
    fn a_token_that_would_break_the_header_is_refused() {
        let (_, results) = calls_for(3600, "a\r\nX-Evil: 1", &[key("alice", &[])]);
        assert!(results[0].as_ref().unwrap_err().contains("compact JWS"));
    }
}
