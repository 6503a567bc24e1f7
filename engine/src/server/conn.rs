//! One connection on the public port, from accept to close.
//!
//! Phases, in order; each either hands the connection to the next or ends it with an [`End`]
//! (counted once, in [`serve`]):
//!
//! 1. **Hello**: read the first bytes into a per-connection buffer bounded by
//!    [`MAX_CLIENT_HELLO_BYTES`], calling [`hello::parse`] after every read, until the ClientHello
//!    is complete or refused; [`route::decide`] then picks the route. The bytes are kept: they
//!    are replayed to control or to the TLS acceptor.
//! 2. **Route**:
//!    - `Reject` / invalid hello: a fatal TLS alert ([`RejectReason::alert`]), or nothing for
//!      non-TLS bytes, then close;
//!    - `Control`: connect to control, write the bytes read so far, splice both ways untouched;
//!    - `Web` / `App`: terminate TLS (no client auth), serve HTTP/1.1 (`http.rs`);
//!    - `Tunnel`: terminate TLS (host certificate), send the tunnel hello, read the agent's
//!      [`AgentHello`] (a clean EOF instead is a duplicate tunnel: counted, closed, not an
//!      error), wrap the stream in a [`Tunnel`] (server role), register it with its resources
//!      in the shard's table under the certificate's host id, and run its driver in this
//!      connection's task until the tunnel ends;
//!    - `Ssh` / `Postgres` / `Tcp`: terminate TLS (user certificate), read one dial request,
//!      resolve the target to an agent and its tunnel on this shard ([`Shard::resolve`]; when
//!      the agent has no tunnel here yet, a cross-shard hop through a shard that has one,
//!      `hop.rs`), [`authorize`], open a stream with a [`StreamHeader`], answer with a dial
//!      response, splice the TLS stream and the tunnel stream ([`tunnel::splice`]);
//!    - `App`: the same with an optional user certificate and no dial request: the SNI names
//!      the app, refusals are HTTP responses (`connect` with [`Answer::Http`]);
//!    - `AppDial` (ALPN `jaunt-app`): like `Tcp`, a dial request names the web app (for
//!      clients that reached the proxy by IP address, with no name to put the app under);
//!      after the dial response the stream carries HTTP to the app as `App` does.
//!
//! The handshake timeout covers phases 1 and 2 up to an established TLS session and a dial
//! request (or an agent hello); after that the idle timeout applies to user streams, and the
//! mux's keepalive and dead-peer timeout to tunnels. Every connection also ends when its shard's
//! drain deadline passes. Nothing here panics on peer input: every malformed byte becomes an
//! [`End`] with a reason.

use std::cell::Cell;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_rustls::server::TlsStream;
use glommio::net::TcpStream;
use jaunt_config::identity::{unix_now, Identity, IdentityKind};

use crate::hello::{self, Parse, MAX_CLIENT_HELLO_BYTES};
use crate::mux::{Blame, Role};
use crate::route::{self, RejectReason, Route};
use crate::server::audit::AuditEvent;
use crate::server::authorize::{authorize, Allowed, Denied, DeniedKind};
use crate::server::hop::{HopRefusal, HopStream};
use crate::server::http::{self, PingBody, Response};
use crate::server::io::{idle_timeout, with_deadline, ByteSink, Counted, Prefixed};
use crate::server::metrics::{DialMiss, Direction, HopResult, Refusal, RouteKind};
use crate::server::shard::{ConnGuard, Registered, Resolved, Shard, Signal};
use crate::server::snapshot::Snapshot;
use crate::server::web::{WebRequest, WebUi};
use crate::tunnel::{self, CloseReason, MuxStream, OpenError, Side, Tunnel};
use jaunt_config::wire::agent_hello::{AgentHello, MAX_AGENT_HELLO_BYTES};
use jaunt_config::wire::dial::{
    DialError, DialKind, DialRequest, DialResponse, StreamHeader, TunnelHello, LENGTH_PREFIX_BYTES,
};

/// Bytes read per `read` while waiting for the ClientHello: a typical hello fits in one read.
const HELLO_READ_CHUNK: usize = 4 * 1024;

/// Bytes read per `read` while waiting for a dial request.
const DIAL_READ_CHUNK: usize = 1024;

/// Idle time allowed between two requests on a kept-alive web connection (capped by the
/// configured idle timeout): browsers reuse connections within seconds, and an idle one holds
/// TLS buffers for nothing.
const HTTP_KEEP_ALIVE_IDLE: Duration = Duration::from_secs(30);

/// Time allowed for a refusal (alert, dial response, HTTP error) to be written before the
/// connection is dropped anyway.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// TLS alert `internal_error` (RFC 8446 §6.2): sent when control cannot be reached.
const ALERT_INTERNAL_ERROR: u8 = 80;

/// How a connection ended.
#[derive(Debug)]
enum End {
    /// Served and closed normally.
    Done,
    /// Refused or cut off by the engine; counted by reason.
    Refused(Refusal),
    /// An I/O error ended it; logged with who is to blame, not counted as a refusal.
    Failed(ConnError),
}

/// Errors that end a connection without being a refusal.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    /// The client's socket failed, or the client broke the protocol after routing.
    #[error("client connection: {0}")]
    Client(io::Error),
    /// The other end (control, an agent's stream) failed.
    #[error("upstream connection: {0}")]
    Upstream(io::Error),
    /// An agent tunnel ended with an error.
    #[error("agent tunnel: {0}")]
    Tunnel(CloseReason),
}

impl ConnError {
    fn blame(&self) -> Blame {
        match self {
            ConnError::Client(_) | ConnError::Upstream(_) => Blame::Peer,
            ConnError::Tunnel(reason) => reason.blame(),
        }
    }
}

/// The route with owned data: a [`Route`] borrows the ClientHello, which must not live across
/// an await (it is ~1 KiB).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Routed {
    Tunnel,
    Control,
    User(DialKind),
    App(String),
    Web,
    Reject(RejectReason),
}

impl Routed {
    fn kind(&self) -> Option<RouteKind> {
        Some(match self {
            Routed::Tunnel => RouteKind::Tunnel,
            Routed::Control => RouteKind::Control,
            Routed::User(DialKind::Ssh) => RouteKind::Ssh,
            Routed::User(DialKind::Db) => RouteKind::Postgres,
            Routed::User(DialKind::Tcp) => RouteKind::Tcp,
            Routed::App(_) | Routed::User(DialKind::App) => RouteKind::App,
            Routed::Web => RouteKind::Web,
            Routed::Reject(_) => return None,
        })
    }
}

/// Routes `buf` if it holds a complete (or refused) ClientHello; `None` while more is needed.
fn classify(buf: &[u8], public_host: &str) -> Option<Routed> {
    match hello::parse(buf) {
        Parse::NeedMore if buf.len() >= MAX_CLIENT_HELLO_BYTES => {
            // hello.rs promises a final answer at the bound; refuse rather than loop if not.
            Some(Routed::Reject(RejectReason::HelloTooLarge))
        }
        Parse::NeedMore => None,
        Parse::Invalid(reason) => Some(Routed::Reject(reason)),
        Parse::Done(hello) => Some(match route::decide(&hello, public_host) {
            Route::Tunnel => Routed::Tunnel,
            Route::Control => Routed::Control,
            Route::Ssh => Routed::User(DialKind::Ssh),
            Route::Postgres => Routed::User(DialKind::Db),
            Route::Tcp => Routed::User(DialKind::Tcp),
            Route::App { name } => Routed::App(name.to_owned()),
            Route::AppDial => Routed::User(DialKind::App),
            Route::Web => Routed::Web,
            Route::Reject(reason) => Routed::Reject(reason),
        }),
    }
}

/// A fatal TLS alert record: content type 21, TLS 1.2 record version, level 2 (fatal).
fn alert_record(description: u8) -> [u8; 7] {
    [21, 3, 3, 0, 2, 2, description]
}

/// Counts the client socket's bytes into the shard's metrics for one route, and notes the time
/// of the last byte for the idle timeout.
struct RouteBytes {
    shard: Rc<Shard>,
    kind: RouteKind,
    last_activity: Rc<Cell<Instant>>,
}

impl ByteSink for RouteBytes {
    fn bytes(&self, from_peer: bool, n: usize) {
        let direction = if from_peer {
            Direction::FromClient
        } else {
            Direction::ToClient
        };
        self.shard.metrics.bytes(self.kind, direction, n as u64);
        if n > 0 {
            self.last_activity.set(Instant::now());
        }
    }
}

type Client = Counted<TcpStream, RouteBytes>;

/// What every phase of one connection needs.
struct Ctx<'a> {
    shard: &'a Rc<Shard>,
    conn_id: u64,
    /// The client's address, for logs and the agent's audit.
    peer: String,
    accepted_at: Instant,
    /// End of the handshake phase (ClientHello, TLS, dial request).
    deadline: Instant,
    /// Time of the last byte to or from the client.
    last_activity: Rc<Cell<Instant>>,
}

/// Serves one accepted connection until it ends, then accounts for how it ended.
pub(crate) async fn serve(shard: Rc<Shard>, stream: TcpStream, guard: ConnGuard) {
    let accepted_at = Instant::now();
    let ctx = Ctx {
        shard: &shard,
        conn_id: guard.id,
        peer: stream
            .peer_addr()
            .map_or_else(|_| "unknown".to_owned(), |a| a.to_string()),
        accepted_at,
        deadline: accepted_at + shard.limits().handshake_timeout,
        last_activity: Rc::new(Cell::new(accepted_at)),
    };
    let end = futures_lite::future::or(handle(&ctx, stream), async {
        shard.abort.wait().await;
        End::Refused(Refusal::DrainDeadline)
    })
    .await;
    match end {
        End::Done => {}
        End::Refused(reason) => shard.metrics.refused(reason),
        End::Failed(error) => tracing::debug!(
            shard = shard.index,
            conn = ctx.conn_id,
            peer = %ctx.peer,
            blame = ?error.blame(),
            %error,
            "connection failed"
        ),
    }
    drop(guard);
}

async fn handle(ctx: &Ctx<'_>, mut stream: TcpStream) -> End {
    let shard = ctx.shard;
    let _ = stream.set_nodelay(true);
    let mut hello = Vec::new();
    let public_host = &shard.config.public_host;
    let routed = match with_deadline(
        ctx.deadline,
        read_hello(&mut stream, &mut hello, public_host),
    )
    .await
    {
        Err(_) => return End::Refused(Refusal::HandshakeTimeout),
        Ok(Err(e)) => return End::Failed(ConnError::Client(e)),
        // EOF before a complete ClientHello: a port scanner or a health check.
        Ok(Ok(None)) => return End::Done,
        Ok(Ok(Some(routed))) => routed,
    };
    let Some(kind) = routed.kind() else {
        let Routed::Reject(reason) = routed else {
            return End::Done;
        };
        return reject(stream, reason).await;
    };
    shard.metrics.accepted(kind);
    shard
        .metrics
        .bytes(kind, Direction::FromClient, hello.len() as u64);
    let client = Counted::new(
        stream,
        RouteBytes {
            shard: Rc::clone(shard),
            kind,
            last_activity: Rc::clone(&ctx.last_activity),
        },
    );
    match routed {
        Routed::Control => pass_through(ctx, client, hello).await,
        Routed::Web => web(ctx, client, hello).await,
        Routed::App(name) => app(ctx, client, hello, name).await,
        Routed::Tunnel => agent_tunnel(ctx, client, hello).await,
        Routed::User(dial_kind) => user(ctx, client, hello, dial_kind).await,
        Routed::Reject(_) => End::Done,
    }
}

/// Reads until the ClientHello is complete or refused, keeping every byte in `buf`. `Ok(None)`
/// on EOF before that.
async fn read_hello(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    public_host: &str,
) -> io::Result<Option<Routed>> {
    loop {
        let filled = buf.len();
        let room = MAX_CLIENT_HELLO_BYTES
            .saturating_sub(filled)
            .min(HELLO_READ_CHUNK);
        if room == 0 {
            return Ok(Some(Routed::Reject(RejectReason::HelloTooLarge)));
        }
        buf.resize(filled + room, 0);
        let n = match stream.read(&mut buf[filled..]).await {
            Ok(n) => n,
            Err(e) => {
                buf.truncate(filled);
                return Err(e);
            }
        };
        buf.truncate(filled + n);
        if n == 0 {
            return Ok(None);
        }
        if let Some(routed) = classify(buf, public_host) {
            return Ok(Some(routed));
        }
    }
}

async fn reject(mut stream: TcpStream, reason: RejectReason) -> End {
    if let Some(description) = reason.alert() {
        let deadline = Instant::now() + REFUSAL_WRITE_TIMEOUT;
        let _ = with_deadline(deadline, stream.write_all(&alert_record(description))).await;
    }
    let _ = stream.close().await;
    End::Refused(Refusal::Hello(reason))
}

/// Splices `client` and `upstream` until both directions finish, an error, or `idle` passes
/// without traffic.
async fn splice_with_idle<A, B>(ctx: &Ctx<'_>, client: A, upstream: B, idle: Duration) -> End
where
    A: AsyncRead + AsyncWrite + Unpin + 'static,
    B: AsyncRead + AsyncWrite + Unpin + 'static,
{
    ctx.last_activity.set(Instant::now());
    let spliced = async {
        match tunnel::splice(client, upstream).await {
            Ok(_) => End::Done,
            Err(e) => match e.side {
                Side::A => End::Failed(ConnError::Client(e.source)),
                Side::B => End::Failed(ConnError::Upstream(e.source)),
            },
        }
    };
    futures_lite::future::or(spliced, async {
        idle_timeout(&ctx.last_activity, idle).await;
        End::Refused(Refusal::IdleTimeout)
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Control: TLS pass-through

async fn pass_through(ctx: &Ctx<'_>, mut client: Client, hello: Vec<u8>) -> End {
    let shard = ctx.shard;
    let addr = shard.config.control_addr;
    let mut upstream = match with_deadline(ctx.deadline, TcpStream::connect(addr)).await {
        Ok(Ok(upstream)) => upstream,
        failed => {
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".to_owned(),
            };
            tracing::warn!(shard = shard.index, %addr, error = %why, "control is unreachable");
            let alert = alert_record(ALERT_INTERNAL_ERROR);
            let deadline = Instant::now() + REFUSAL_WRITE_TIMEOUT;
            let _ = with_deadline(deadline, client.write_all(&alert)).await;
            return End::Refused(Refusal::ControlUnreachable);
        }
    };
    let _ = upstream.set_nodelay(true);
    // A PROXY v2 header first, so that control sees the client's address (see control's http.rs).
    let socket = client.get_ref();
    let addresses = socket.peer_addr().ok().zip(socket.local_addr().ok());
    let mut hello = hello;
    hello.splice(0..0, crate::server::io::proxy_v2_header(addresses));
    match with_deadline(ctx.deadline, upstream.write_all(&hello)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return End::Failed(ConnError::Upstream(e)),
        Err(_) => return End::Refused(Refusal::HandshakeTimeout),
    }
    drop(hello);
    splice_with_idle(ctx, client, upstream, ctx.shard.limits().idle_timeout).await
}

// ---------------------------------------------------------------------------------------------
// TLS termination

/// Terminates TLS with `acceptor` on a stream that first replays `hello`.
async fn terminate(
    ctx: &Ctx<'_>,
    acceptor: &futures_rustls::TlsAcceptor,
    client: Client,
    hello: Vec<u8>,
) -> Result<TlsStream<Prefixed<Client>>, End> {
    let shard = ctx.shard;
    match with_deadline(ctx.deadline, acceptor.accept(Prefixed::new(hello, client))).await {
        Err(_) => Err(End::Refused(Refusal::HandshakeTimeout)),
        Ok(Err(e)) => {
            tracing::debug!(shard = shard.index, peer = %ctx.peer, error = %e, "TLS handshake failed");
            Err(End::Refused(Refusal::TlsHandshake))
        }
        Ok(Ok(stream)) => {
            shard.metrics.handshake(ctx.accepted_at.elapsed());
            Ok(stream)
        }
    }
}

/// The verified client certificate's identity, if it is of `kind` and valid now.
fn peer_identity<S>(
    stream: &TlsStream<S>,
    kind: IdentityKind,
) -> Result<Identity, (Refusal, String)> {
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or_else(|| {
            (
                Refusal::BadIdentity,
                "a client certificate is required".to_owned(),
            )
        })?;
    let identity = Identity::from_x509_der(leaf.as_ref())
        .map_err(|e| (Refusal::BadIdentity, e.to_string()))?;
    if identity.kind != kind {
        let (want, got) = match kind {
            IdentityKind::User => ("user", "host"),
            IdentityKind::Host => ("host", "user"),
        };
        return Err((
            Refusal::BadIdentity,
            format!(
                "this route needs a {want} certificate, but {:?} presented a {got} certificate",
                identity.name
            ),
        ));
    }
    identity
        .check_valid_at(unix_now())
        .map_err(|e| (Refusal::IdentityExpired, e.to_string()))?;
    Ok(identity)
}

/// Writes `bytes`, flushes and closes (TLS close_notify), bounded by [`REFUSAL_WRITE_TIMEOUT`].
async fn write_and_close<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) {
    let deadline = Instant::now() + REFUSAL_WRITE_TIMEOUT;
    let _ = with_deadline(deadline, async {
        stream.write_all(bytes).await?;
        stream.flush().await?;
        stream.close().await
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Web and apps

async fn web(ctx: &Ctx<'_>, client: Client, hello: Vec<u8>) -> End {
    let shard = ctx.shard;
    let peer = client.get_ref().peer_addr().ok();
    let tls = shard.tls();
    let mut stream = match terminate(ctx, &tls.web, client, hello).await {
        Ok(stream) => stream,
        Err(end) => return end,
    };
    drop(tls);
    let ping = {
        let snapshot = shard.snapshot();
        PingBody {
            cluster: if snapshot.cluster.is_empty() {
                shard.config.cluster_name.clone()
            } else {
                snapshot.cluster.clone()
            },
            version: env!("CARGO_PKG_VERSION"),
            public_addr: shard.config.public_host.clone(),
        }
    };
    let jwks = Arc::clone(&shard.snapshot().jwks);
    let backend = shard.config.web.clone();
    let respond = |head: http::RequestHead, body: Vec<u8>| {
        let own = http::web_response(&head, &ping, &jwks);
        let backend = backend.clone();
        async move {
            if let Some(response) = own {
                return response;
            }
            let Some(backend) = backend else {
                return Response::text(404, "not found");
            };
            let request = WebRequest {
                method: head.method,
                path: head.path,
                headers: head.headers,
                body,
                peer,
            };
            web_backend(backend, request).await
        }
    };
    let idle = HTTP_KEEP_ALIVE_IDLE.min(shard.limits().idle_timeout);
    match http::serve(&mut stream, ctx.deadline, idle, &shard.draining, respond).await {
        http::ServeEnd::Closed | http::ServeEnd::Idle => End::Done,
        http::ServeEnd::BadRequest(e) => {
            tracing::debug!(shard = shard.index, peer = %ctx.peer, error = %e, "bad HTTP request");
            End::Refused(Refusal::BadHttpRequest)
        }
        http::ServeEnd::Io(e) => End::Failed(ConnError::Client(e)),
    }
}

/// Runs the web UI's backend for one request on the shard's blocking thread; a panic in it
/// answers 500 (and is logged) instead of taking the shard down.
async fn web_backend(backend: WebUi, request: WebRequest) -> Response {
    let answer = glommio::executor()
        .spawn_blocking(move || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| backend.0.handle(&request)))
                .ok()
        })
        .await;
    match answer {
        Some(r) => Response {
            status: r.status,
            content_type: r.content_type,
            body: r.body,
            close: false,
            headers: r.headers,
        },
        None => {
            tracing::error!("the web UI backend panicked");
            Response::text(500, "internal error")
        }
    }
}

/// A web app at `<name>.<public host>`: TLS with an optional user certificate. With one (as
/// `jaunt proxy app` presents), the connection is a session to the app like any other user
/// route, except that there is no dial request: the SNI names the target, the HTTP bytes go
/// to the agent as they come, and refusals are HTTP responses. Without one, the client is
/// told how to get in.
async fn app(ctx: &Ctx<'_>, client: Client, hello: Vec<u8>, name: String) -> End {
    let shard = ctx.shard;
    let tls = shard.tls();
    let mut stream = match terminate(ctx, &tls.app, client, hello).await {
        Ok(stream) => stream,
        Err(end) => return end,
    };
    drop(tls);
    let identity = match peer_identity(&stream, IdentityKind::User) {
        Ok(identity) => identity,
        Err((refusal, why)) => {
            let message = format!(
                "app {name:?} needs a Jaunt user certificate ({why}): run `jaunt proxy app {name}` \
                 and use the local address it prints"
            );
            return refuse(&mut stream, Answer::Http, refusal, &message).await;
        }
    };
    let request = DialRequest {
        kind: DialKind::App,
        target: name,
        login: None,
        db_user: None,
        db_name: None,
    };
    connect(ctx, stream, identity, request, Vec::new(), Answer::Http).await
}

// ---------------------------------------------------------------------------------------------
// Agent tunnels

/// Removes a tunnel from its shard's table when the connection carrying it ends, however it
/// ends (including a drain abort that drops the task).
struct Registration<'a> {
    shard: &'a Shard,
    host_id: String,
    conn_id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.shard.unregister_tunnel(&self.host_id, self.conn_id);
    }
}

async fn agent_tunnel(ctx: &Ctx<'_>, client: Client, hello: Vec<u8>) -> End {
    let shard = ctx.shard;
    let tls = shard.tls();
    let mut stream = match terminate(ctx, &tls.tunnel, client, hello).await {
        Ok(stream) => stream,
        Err(end) => return end,
    };
    drop(tls);
    let identity = match peer_identity(&stream, IdentityKind::Host) {
        Ok(identity) => identity,
        Err((refusal, why)) => {
            tracing::info!(shard = shard.index, peer = %ctx.peer, error = %why, "agent tunnel refused");
            write_and_close(&mut stream, &[]).await;
            return End::Refused(refusal);
        }
    };
    let host_id = identity.name;
    let tunnel_hello = TunnelHello::new(shard.shard_count, shard.index).encode();
    let agent = match with_deadline(ctx.deadline, async {
        stream.write_all(&tunnel_hello).await?;
        stream.flush().await?;
        read_agent_hello(&mut stream).await
    })
    .await
    {
        Err(_) => return End::Refused(Refusal::HandshakeTimeout),
        Ok(Ok(AgentHelloRead::Hello(agent, hash))) => (Arc::new(agent), hash),
        Ok(Ok(AgentHelloRead::Duplicate)) => {
            // The agent already has a tunnel to this shard: the expected outcome of its
            // connecting until every shard is covered, not a failure.
            shard.metrics.tunnel_duplicate();
            tracing::debug!(
                shard = shard.index,
                %host_id,
                peer = %ctx.peer,
                "duplicate agent tunnel closed by the agent"
            );
            write_and_close(&mut stream, &[]).await;
            return End::Done;
        }
        Ok(Ok(AgentHelloRead::Invalid(e))) => {
            tracing::info!(
                shard = shard.index,
                %host_id,
                peer = %ctx.peer,
                error = %e,
                "agent tunnel refused: bad agent hello"
            );
            write_and_close(&mut stream, &[]).await;
            return End::Refused(Refusal::BadAgentHello);
        }
        Ok(Err(e)) => return End::Failed(ConnError::Client(e)),
    };
    let (agent, hello_hash) = agent;
    let (tunnel, driver) = Tunnel::new(stream, Role::Server, shard.limits().tunnel_timers);
    // Besides the table's handle, the heartbeat task below holds one until the tunnel stops
    // taking streams: so a replacement or a drain drains the tunnel with an explicit
    // `go_away` (the shard does that), not by dropping the table's handle.
    let heartbeats = tunnel.clone();
    let registered = shard.register_tunnel(&host_id, ctx.conn_id, &agent, tunnel);
    let _registration = (registered != Registered::Draining).then(|| Registration {
        shard,
        host_id: host_id.clone(),
        conn_id: ctx.conn_id,
    });
    tracing::info!(
        shard = shard.index,
        %host_id,
        name = %agent.name,
        resources = agent.resources.len(),
        peer = %ctx.peer,
        replaced = registered == Registered::Replaced,
        "agent tunnel open"
    );
    drop(agent);
    let reason = futures_lite::future::or(driver, async {
        serve_heartbeats(shard, &host_id, ctx.conn_id, heartbeats, hello_hash).await;
        std::future::pending().await
    })
    .await;
    tracing::info!(shard = shard.index, %host_id, %reason, "agent tunnel closed");
    if reason.is_graceful() || reason == CloseReason::PeerEof {
        End::Done
    } else {
        End::Failed(ConnError::Tunnel(reason))
    }
}

/// What the agent sent after the tunnel hello.
enum AgentHelloRead {
    /// The hello, and the [`frame_hash`] of its frame (an unchanged heartbeat hashes alike).
    Hello(AgentHello, u64),
    /// A clean EOF (TLS close_notify) before the first byte: the agent already has a tunnel to
    /// this shard.
    Duplicate,
    /// Malformed, too large, invalid, or cut short by an EOF.
    Invalid(DialError),
}

/// Reads exactly one [`AgentHello`] frame: never a byte past it, so the mux frames that follow
/// stay in the stream for the tunnel. Buffers at most the frame's bound.
async fn read_agent_hello<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<AgentHelloRead> {
    let mut buf = Vec::new();
    loop {
        match AgentHello::parse(&buf) {
            Ok(Some((hello, used))) => {
                debug_assert_eq!(used, buf.len());
                return Ok(AgentHelloRead::Hello(hello, frame_hash(&buf)));
            }
            Ok(None) => {}
            Err(e) => return Ok(AgentHelloRead::Invalid(e)),
        }
        // `parse` refused a length of 0 or above the bound, so `want` is bounded.
        let want = match buf.get(..LENGTH_PREFIX_BYTES) {
            Some(prefix) => {
                LENGTH_PREFIX_BYTES + usize::from(u16::from_be_bytes([prefix[0], prefix[1]]))
            }
            None => LENGTH_PREFIX_BYTES,
        };
        debug_assert!(want <= LENGTH_PREFIX_BYTES + MAX_AGENT_HELLO_BYTES);
        let filled = buf.len();
        buf.resize(want, 0);
        // An unclean EOF (no close_notify) is an I/O error, not a duplicate.
        let n = stream.read(&mut buf[filled..]).await?;
        buf.truncate(filled + n);
        if n == 0 {
            return Ok(if filled == 0 {
                AgentHelloRead::Duplicate
            } else {
                AgentHelloRead::Invalid(DialError::Json(format!(
                    "the connection closed after {filled} of {want} bytes of the agent hello"
                )))
            });
        }
    }
}

/// The hash an announcement is compared by: of its AgentHello frame, as sent. SipHash with
/// fixed keys; a collision an agent could craft would only keep its own stale announcement.
fn frame_hash(frame: &[u8]) -> u64 {
    use std::hash::Hasher as _;
    let mut hasher = std::hash::DefaultHasher::new();
    hasher.write(frame);
    hasher.finish()
}

/// Most bytes one read of a heartbeat stream takes.
const HEARTBEAT_READ_CHUNK: usize = 4096;

/// Changed announcements one tunnel may apply in a burst. Each costs a parse, a reindex, the
/// engine-wide directory's lock and an event to control; an agent changes its resources when an
/// operator edits its config, so more than this in a row is a broken or hostile agent.
const HEARTBEAT_CHANGE_BURST: u32 = 16;

/// How fast the burst refills: one change per this interval.
const HEARTBEAT_CHANGE_REFILL: Duration = Duration::from_secs(1);

/// A token bucket over a tunnel's changed heartbeats (see [`HEARTBEAT_CHANGE_BURST`]).
struct ChangeBudget {
    tokens: u32,
    refilled: Instant,
}

impl ChangeBudget {
    fn new(now: Instant) -> ChangeBudget {
        ChangeBudget {
            tokens: HEARTBEAT_CHANGE_BURST,
            refilled: now,
        }
    }

    /// Takes one change; `false` when the burst is spent.
    fn take(&mut self, now: Instant) -> bool {
        let earned = now.saturating_duration_since(self.refilled).as_secs_f64()
            / HEARTBEAT_CHANGE_REFILL.as_secs_f64();
        if earned >= 1.0 {
            // Whole tokens only; the fraction keeps accruing from the last refill.
            let whole = earned.floor().min(f64::from(HEARTBEAT_CHANGE_BURST));
            self.tokens = (self.tokens + whole as u32).min(HEARTBEAT_CHANGE_BURST);
            self.refilled = now;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// What the heartbeat task waited for.
enum HeartbeatStep {
    /// The agent opened a stream (`None`: the tunnel takes no more streams).
    Opened(Option<tunnel::Incoming>),
    /// A whole heartbeat is at the front of the buffer (`Ok(true)`), or the stream ended.
    Read(io::Result<bool>),
}

/// Serves the agent's heartbeat stream(s) on `tunnel` (see the wire format in
/// `jaunt_config::wire::agent_hello`) until the tunnel stops taking streams: one heartbeat stream at a time,
/// every other agent-opened stream refused. A heartbeat with the sequence in force costs
/// nothing; a new sequence whose frame hashes like the announcement in force costs a hash; a
/// changed one is parsed, validated like the AgentHello and applied through
/// [`Shard::heartbeat`]. An invalid heartbeat, or more changes than [`ChangeBudget`] allows,
/// closes the tunnel. Buffers at most one heartbeat's bound.
async fn serve_heartbeats(
    shard: &Shard,
    host_id: &str,
    conn_id: u64,
    tunnel: Tunnel,
    mut applied_hash: u64,
) {
    use jaunt_config::wire::agent_hello::{Heartbeat, HEARTBEAT_OPEN};
    let mut current: Option<tunnel::MuxStream> = None;
    let mut buf: Vec<u8> = Vec::new();
    let mut last_seq: Option<u64> = None;
    let mut budget = ChangeBudget::new(Instant::now());
    loop {
        let step = match current.as_mut() {
            Some(stream) => {
                futures_lite::future::or(
                    async { HeartbeatStep::Opened(tunnel.accept().await) },
                    async { HeartbeatStep::Read(read_heartbeat(stream, &mut buf).await) },
                )
                .await
            }
            None => HeartbeatStep::Opened(tunnel.accept().await),
        };
        match step {
            HeartbeatStep::Opened(None) => return,
            HeartbeatStep::Opened(Some(incoming)) => {
                if incoming.header != HEARTBEAT_OPEN {
                    incoming.refuse(
                        "this engine accepts only heartbeat streams (jaunt-heartbeat/1) from \
                         agents",
                    );
                } else if current.is_some() {
                    incoming.refuse("a heartbeat stream is already open on this tunnel");
                } else if let Ok(stream) = incoming.accept() {
                    buf.clear();
                    current = Some(stream);
                }
            }
            HeartbeatStep::Read(Ok(false) | Err(_)) => {
                // The agent closed or reset its heartbeat stream: the announcement stays.
                current = None;
                buf.clear();
            }
            HeartbeatStep::Read(Ok(true)) => {
                let (seq, frame, used) = match Heartbeat::split(&buf) {
                    Ok(Some(split)) => split,
                    Ok(None) => continue,
                    Err(e) => return bad_heartbeat(shard, host_id, &tunnel, &e),
                };
                if last_seq.is_none_or(|last| seq > last) {
                    last_seq = Some(seq);
                    let hash = frame_hash(frame);
                    if hash != applied_hash {
                        if !budget.take(Instant::now()) {
                            let error = DialError::Invalid {
                                field: "resources",
                                why: "changed too often (more than 16 in a burst, then 1 a second)",
                            };
                            return bad_heartbeat(shard, host_id, &tunnel, &error);
                        }
                        match AgentHello::parse(frame) {
                            Ok(Some((agent, _))) => {
                                applied_hash = hash;
                                shard.heartbeat(host_id, conn_id, seq, &Arc::new(agent));
                            }
                            Ok(None) => {}
                            Err(e) => return bad_heartbeat(shard, host_id, &tunnel, &e),
                        }
                    }
                } else if last_seq.is_some_and(|last| seq < last) {
                    tracing::debug!(shard = shard.index, host_id, seq, "stale heartbeat ignored");
                }
                buf.drain(..used);
            }
        }
    }
}

fn bad_heartbeat(shard: &Shard, host_id: &str, tunnel: &Tunnel, error: &DialError) {
    tracing::info!(
        shard = shard.index,
        host_id,
        %error,
        "agent tunnel closed: bad heartbeat"
    );
    tunnel.close();
}

/// Reads until a whole heartbeat is at the front of `buf` (`Ok(true)`; also for one whose
/// prefix is already refused, for the caller to see the error), or the stream ends
/// (`Ok(false)`). Never reads past the heartbeat. Cancel-safe: bytes are appended to `buf`
/// only once read.
async fn read_heartbeat<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> io::Result<bool> {
    use jaunt_config::wire::agent_hello::{Heartbeat, MAX_HEARTBEAT_BYTES};
    let mut chunk = [0u8; HEARTBEAT_READ_CHUNK];
    loop {
        if Heartbeat::split(buf) != Ok(None) {
            return Ok(true);
        }
        // `split` refused a length above the bound, so `want` is bounded.
        let want = Heartbeat::wanted(buf);
        debug_assert!(want <= MAX_HEARTBEAT_BYTES);
        let room = want.saturating_sub(buf.len()).min(HEARTBEAT_READ_CHUNK);
        let n = stream.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Ok(false);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

// ---------------------------------------------------------------------------------------------
// User streams

/// Counts one user stream in `jaunt_streams_open` while it lives.
struct OpenStream<'a>(&'a Shard);

impl<'a> OpenStream<'a> {
    fn new(shard: &'a Shard) -> OpenStream<'a> {
        shard.metrics.stream_opened();
        OpenStream(shard)
    }
}

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.0.metrics.stream_closed();
    }
}

async fn user(ctx: &Ctx<'_>, client: Client, hello: Vec<u8>, alpn_kind: DialKind) -> End {
    let shard = ctx.shard;
    let tls = shard.tls();
    let mut stream = match terminate(ctx, &tls.user, client, hello).await {
        Ok(stream) => stream,
        Err(end) => return end,
    };
    drop(tls);
    let identity = peer_identity(&stream, IdentityKind::User);
    // Bytes after the dial request are the user's protocol: they go to the target.
    let mut early = Vec::new();
    let request =
        match with_deadline(ctx.deadline, read_dial_request(&mut stream, &mut early)).await {
            Err(_) => return End::Refused(Refusal::HandshakeTimeout),
            Ok(Err(ReadDialError::Io(e))) => return End::Failed(ConnError::Client(e)),
            Ok(Err(ReadDialError::Eof)) => return End::Done,
            Ok(Err(ReadDialError::Dial(e))) => {
                let message = format!("bad dial request: {e}");
                return refuse_dial(&mut stream, Refusal::BadDialRequest, &message).await;
            }
            Ok(Ok(request)) => request,
        };
    let identity = match identity {
        Ok(identity) => identity,
        Err((refusal, why)) => return refuse_dial(&mut stream, refusal, &why).await,
    };
    if request.kind != alpn_kind {
        let message = format!(
            "this connection negotiated {} but asked to dial a {} ({})",
            alpn_kind.as_str(),
            request.kind.noun(),
            request.kind.as_str()
        );
        return refuse_dial(&mut stream, Refusal::BadDialRequest, &message).await;
    }
    connect(ctx, stream, identity, request, early, Answer::Dial).await
}

/// How a user route answers: with a [`DialResponse`] (the `jaunt-*` ALPNs, whose clients sent
/// a dial request), or, for web apps, with nothing on success and an HTTP error response on a
/// refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Dial,
    Http,
}

/// Refuses a user's connection in the route's own terms (see [`Answer`]).
async fn refuse<S: AsyncWrite + Unpin>(
    stream: &mut S,
    answer: Answer,
    refusal: Refusal,
    message: &str,
) -> End {
    match answer {
        Answer::Dial => refuse_dial(stream, refusal, message).await,
        Answer::Http => {
            let status = match refusal {
                Refusal::BadIdentity | Refusal::IdentityExpired => 401,
                Refusal::Forbidden => 403,
                Refusal::UnknownTarget => 404,
                Refusal::BadDialRequest => 400,
                Refusal::HandshakeTimeout => 504,
                Refusal::AgentOffline => 503,
                _ => 502,
            };
            let mut response = Response::text(status, message);
            response.close = true;
            write_and_close(stream, &response.encode(false)).await;
            End::Refused(refusal)
        }
    }
}

/// Routes, authorizes and connects an identified user's `request` to its target through the
/// agent's tunnel, then splices; `early` holds bytes the client sent after its dial request.
async fn connect(
    ctx: &Ctx<'_>,
    mut stream: TlsStream<Prefixed<Client>>,
    identity: Identity,
    request: DialRequest,
    early: Vec<u8>,
    answer: Answer,
) -> End {
    let shard = ctx.shard;
    let routed = {
        let snapshot = shard.snapshot();
        route_dial(shard, &snapshot, &identity, &request)
    };
    let Dialable {
        host_id,
        via,
        labels,
        allowed,
    } = match routed {
        Ok(found) => found,
        Err((refusal, message)) => {
            tracing::info!(
                shard = shard.index,
                user = %identity.name,
                target = %request.target,
                reason = refusal.as_str(),
                "dial refused"
            );
            if matches!(refusal, Refusal::Forbidden | Refusal::UnknownTarget) {
                let _ = shard.audit(AuditEvent::AccessDenied {
                    user: identity.name.clone(),
                    roles: identity.roles.clone(),
                    kind: request.kind,
                    target: request.target.clone(),
                    login: request.login.clone(),
                    db_user: request.db_user.clone(),
                    client_addr: ctx.peer.clone(),
                    reason: message.clone(),
                    time: unix_now(),
                });
            }
            return refuse(&mut stream, answer, refusal, &message).await;
        }
    };
    let audit = SessionAudit::new(ctx, &identity, &request);
    let header = StreamHeader::new(&request, &identity.name, &identity.roles, &ctx.peer)
        .with_db_grants(&identity.db_users, &identity.db_names)
        .with_session_id(&audit.session_id);
    // The verified certificate travels too: the agent re-checks authorization against it.
    let encoded = match stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
    {
        Some(cert) => header.encode_with_client_cert(cert.as_ref()),
        None => header.encode(),
    };
    let Some(header) = encoded else {
        let message = "bad dial request: the certificate's identity is too large to forward";
        return refuse(&mut stream, answer, Refusal::BadDialRequest, message).await;
    };
    let opening = Instant::now();
    let opened = open_upstream(ctx, &host_id, via, &header, &request).await;
    shard.metrics.stream_open(opening.elapsed());
    let mut upstream = match opened {
        Ok(upstream) => upstream,
        Err((refusal, message)) => return refuse(&mut stream, answer, refusal, &message).await,
    };
    if shard.audit(audit.start_event()).is_err() {
        drop(upstream);
        tracing::warn!(
            shard = shard.index,
            user = %identity.name,
            target = %request.target,
            "session refused: the audit queue is full"
        );
        let _ = refuse(
            &mut stream,
            answer,
            Refusal::DialFailed,
            "audit queue full, try again",
        )
        .await;
        return End::Done;
    }
    // From here on the session has started: the guard reports its end however it ends.
    let session = LiveSession::start(ctx, &identity, &request, labels, audit);
    let _open = OpenStream::new(shard);
    if answer == Answer::Dial {
        let answered = async {
            stream.write_all(&DialResponse::ok().encode()).await?;
            stream.flush().await
        };
        if let Err(e) = answered.await {
            return End::Failed(ConnError::Client(e));
        }
    }
    if !early.is_empty() {
        let bytes_in = &session.audit.bytes_in;
        bytes_in.set(bytes_in.get() + early.len() as u64);
        if let Err(e) = upstream.write_all(&early).await {
            return End::Failed(ConnError::Upstream(e));
        }
    }
    drop(early);
    tracing::debug!(
        shard = shard.index,
        user = %identity.name,
        target = %request.target,
        %host_id,
        "user stream connected"
    );
    let stream = Counted::new(
        stream,
        SessionBytes {
            from_client: Rc::clone(&session.audit.bytes_in),
            to_client: Rc::clone(&session.audit.bytes_out),
        },
    );
    // Dropping the splice closes both sides.
    // The roles' client_idle_timeout tightens the engine's own.
    let idle = allowed
        .idle_timeout
        .map_or(shard.limits().idle_timeout, |t| {
            t.min(shard.limits().idle_timeout)
        });
    let spliced = futures_lite::future::or(splice_upstream(ctx, stream, upstream, idle), async {
        session.end.wait().await;
        End::Done
    });
    let Some(deadline) = allowed.session_deadline else {
        return spliced.await;
    };
    let left = Duration::from_secs(deadline.saturating_sub(unix_now()));
    match with_deadline(Instant::now() + left, spliced).await {
        Ok(end) => end,
        Err(_) => {
            tracing::info!(
                shard = shard.index,
                user = %identity.name,
                target = %request.target,
                "closing a live session: the user's certificate expired"
            );
            End::Done
        }
    }
}

/// A dial that routing resolved and authorization allowed.
struct Dialable {
    host_id: String,
    via: Via,
    /// The target's labels, for locks that come later.
    labels: Labels,
    /// The session's limits from the roles (deadline, idle timeout).
    allowed: Allowed,
}

/// The target labels a session was authorized against.
type Labels = std::collections::BTreeMap<String, String>;

/// A user session registered with its shard (to be ended when a lock comes to match it) for as
/// long as it lives.
/// Its drop reports the session's end to the audit log, whatever ended it (the client, the
/// target, a lock, the idle timeout, expiry, the drain deadline).
struct LiveSession<'a> {
    shard: &'a Shard,
    conn_id: u64,
    end: Rc<Signal>,
    audit: SessionAudit,
}

impl<'a> LiveSession<'a> {
    fn start(
        ctx: &Ctx<'a>,
        identity: &Identity,
        request: &DialRequest,
        labels: Labels,
        audit: SessionAudit,
    ) -> LiveSession<'a> {
        let end =
            ctx.shard
                .session_started(ctx.conn_id, &audit.session_id, identity, request, labels);
        LiveSession {
            shard: ctx.shard,
            conn_id: ctx.conn_id,
            end,
            audit,
        }
    }
}

impl Drop for LiveSession<'_> {
    fn drop(&mut self) {
        self.shard.session_ended(self.conn_id);
        let _ = self.shard.audit(self.audit.end_event());
    }
}

/// What the audit log says about one session, and its plaintext byte counts.
struct SessionAudit {
    session_id: String,
    kind: DialKind,
    user: String,
    roles: Vec<String>,
    target: String,
    login: Option<String>,
    db_user: Option<String>,
    db_name: Option<String>,
    client_addr: String,
    started: Instant,
    /// Bytes from the client to the target.
    bytes_in: Rc<Cell<u64>>,
    /// Bytes from the target to the client.
    bytes_out: Rc<Cell<u64>>,
}

impl SessionAudit {
    fn new(ctx: &Ctx<'_>, identity: &Identity, request: &DialRequest) -> SessionAudit {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        SessionAudit {
            session_id: format!("{nanos:x}-{}-{}", ctx.shard.index, ctx.conn_id),
            kind: request.kind,
            user: identity.name.clone(),
            roles: identity.roles.clone(),
            target: request.target.clone(),
            login: request.login.clone(),
            db_user: request.db_user.clone(),
            db_name: request.db_name.clone(),
            client_addr: ctx.peer.clone(),
            started: Instant::now(),
            bytes_in: Rc::new(Cell::new(0)),
            bytes_out: Rc::new(Cell::new(0)),
        }
    }

    fn start_event(&self) -> AuditEvent {
        AuditEvent::SessionStart {
            session_id: self.session_id.clone(),
            kind: self.kind,
            user: self.user.clone(),
            roles: self.roles.clone(),
            target: self.target.clone(),
            login: self.login.clone(),
            db_user: self.db_user.clone(),
            db_name: self.db_name.clone(),
            client_addr: self.client_addr.clone(),
            time: unix_now(),
        }
    }

    fn end_event(&self) -> AuditEvent {
        AuditEvent::SessionEnd {
            session_id: self.session_id.clone(),
            kind: self.kind,
            user: self.user.clone(),
            roles: self.roles.clone(),
            target: self.target.clone(),
            login: self.login.clone(),
            db_user: self.db_user.clone(),
            db_name: self.db_name.clone(),
            client_addr: self.client_addr.clone(),
            bytes_in: self.bytes_in.get(),
            bytes_out: self.bytes_out.get(),
            duration_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            time: unix_now(),
        }
    }
}

/// Counts a session's plaintext bytes (the TLS stream's, not the socket's).
struct SessionBytes {
    from_client: Rc<Cell<u64>>,
    to_client: Rc<Cell<u64>>,
}

impl ByteSink for SessionBytes {
    fn bytes(&self, from_peer: bool, n: usize) {
        let cell = if from_peer {
            &self.from_client
        } else {
            &self.to_client
        };
        cell.set(cell.get() + n as u64);
    }
}

/// Resolves `request` to its agent's host id and this shard's tunnel to it, and authorizes it;
/// or the refusal and what the user reads. Counts the misses.
fn route_dial(
    shard: &Shard,
    snapshot: &Snapshot,
    identity: &Identity,
    request: &DialRequest,
) -> Result<Dialable, (Refusal, String)> {
    let noun = request.kind.noun();
    let Some(Resolved {
        target,
        tunnel,
        other_shards,
    }) = shard.resolve(snapshot, request.kind, &request.target)
    else {
        shard.metrics.dial_miss(DialMiss::UnknownTarget);
        let denied = Denied::unknown_target(snapshot, request);
        return Err((Refusal::UnknownTarget, denied.message));
    };
    // Authorize before saying anything about the agent's tunnels.
    let allowed = match authorize(snapshot, identity, request, &target) {
        Ok(allowed) => allowed,
        Err(denied) => {
            let refusal = match denied.kind {
                DeniedKind::UnknownTarget => Refusal::UnknownTarget,
                DeniedKind::Forbidden => Refusal::Forbidden,
            };
            return Err((refusal, denied.message));
        }
    };
    let host_id = target.host_id;
    let via = match tunnel {
        Some(tunnel) => Via::Local(tunnel),
        // The agent has tunnels to other shards only (it is reconnecting, or has not covered
        // this shard yet): hop through one of them.
        None if !other_shards.is_empty() => Via::Hop(other_shards),
        None => {
            shard.metrics.dial_miss(DialMiss::AgentOffline);
            let message = format!(
                "agent for {noun} {:?} is offline: agent {host_id:?} has no tunnel to this \
                 engine (is it running and able to reach {}?)",
                request.target, shard.config.public_host
            );
            return Err((Refusal::AgentOffline, message));
        }
    };
    Ok(Dialable {
        host_id,
        via,
        labels: target.labels,
        allowed,
    })
}

/// How a session reaches its agent.
enum Via {
    /// This shard's tunnel.
    Local(Tunnel),
    /// A cross-shard hop through one of these shards' tunnels (tried in order).
    Hop(Vec<usize>),
}

/// The stream to the agent: on this shard's tunnel, or a cross-shard hop.
enum Upstream {
    Mux(MuxStream),
    Hop(HopStream),
}

impl Upstream {
    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Upstream::Mux(stream) => stream.write_all(bytes).await,
            Upstream::Hop(stream) => stream.write_all(bytes).await,
        }
    }
}

/// [`splice_with_idle`] with the upstream's own type, so that a tunnel stream gets the splice's
/// copy-free path.
async fn splice_upstream<A>(ctx: &Ctx<'_>, client: A, upstream: Upstream, idle: Duration) -> End
where
    A: AsyncRead + AsyncWrite + Unpin + 'static,
{
    match upstream {
        Upstream::Mux(stream) => splice_with_idle(ctx, client, stream, idle).await,
        Upstream::Hop(stream) => splice_with_idle(ctx, client, stream, idle).await,
    }
}

/// Opens the session's stream to agent `host_id`, with `header`, by the handshake timeout; or
/// the refusal and what the user reads. A hop tries the shards in turn while they answer that
/// their tunnel is gone (the directory's list is a hint; each shard checks its own table), and
/// is counted in `jaunt_cross_shard_hops_total` by how it ended.
async fn open_upstream(
    ctx: &Ctx<'_>,
    host_id: &str,
    via: Via,
    header: &[u8],
    request: &DialRequest,
) -> Result<Upstream, (Refusal, String)> {
    let shard = ctx.shard;
    let noun = request.kind.noun();
    let open_deadline = Instant::now() + shard.limits().handshake_timeout;
    let timed_out = || {
        let message = format!(
            "agent {host_id:?} did not answer within {:?} while connecting to {noun} {:?}",
            shard.limits().handshake_timeout,
            request.target
        );
        (Refusal::DialFailed, message)
    };
    let refused = |message: &str| {
        let message = format!(
            "agent {host_id:?} could not connect to {noun} {:?}: {message}",
            request.target
        );
        (Refusal::DialFailed, message)
    };
    let shards = match via {
        Via::Local(tunnel) => {
            return match with_deadline(open_deadline, tunnel.open(header)).await {
                Ok(Ok(upstream)) => Ok(Upstream::Mux(upstream)),
                Ok(Err(OpenError::Refused { message })) => Err(refused(&message)),
                Ok(Err(e)) => {
                    shard.metrics.dial_miss(DialMiss::TunnelUnavailable);
                    let message = format!(
                        "agent for {noun} {:?} is offline on this shard: its tunnel cannot take \
                         a new stream ({e}); retrying may help",
                        request.target
                    );
                    Err((Refusal::AgentOffline, message))
                }
                Err(_) => Err(timed_out()),
            };
        }
        Via::Hop(shards) => shards,
    };
    // Why the last candidate failed, when it was more than "no tunnel here any more".
    let mut failure = None;
    for peer in shards {
        let hop = shard.hops.open(peer, host_id, header, open_deadline);
        let answer = match with_deadline(open_deadline, hop.opened()).await {
            Ok(answer) => answer,
            Err(_) => Err(HopRefusal::TimedOut),
        };
        let refusal = match answer {
            Ok(()) => {
                shard.metrics.cross_shard_hop(HopResult::Ok);
                tracing::debug!(shard = shard.index, via = peer, %host_id, "cross-shard hop");
                return Ok(Upstream::Hop(hop));
            }
            Err(refusal) => refusal,
        };
        tracing::debug!(shard = shard.index, via = peer, %host_id, %refusal, "cross-shard hop failed");
        match refusal {
            HopRefusal::NoTunnel => {}
            HopRefusal::Refused(message) => {
                failure = Some(refused(&message));
                break;
            }
            HopRefusal::TimedOut => {
                failure = Some(timed_out());
                break;
            }
            HopRefusal::Unavailable(why) => {
                let message = format!(
                    "agent for {noun} {:?} is reconnecting: its tunnel on shard {peer} cannot \
                     take a new stream ({why}); retrying may help",
                    request.target
                );
                failure = Some((Refusal::AgentOffline, message));
            }
            HopRefusal::Gone => {
                let message = format!(
                    "agent for {noun} {:?} is unreachable from this shard ({refusal}); retrying \
                     may help",
                    request.target
                );
                failure = Some((Refusal::AgentOffline, message));
            }
        }
    }
    if let Some(failure) = failure {
        shard.metrics.cross_shard_hop(HopResult::Error);
        return Err(failure);
    }
    shard.metrics.dial_miss(DialMiss::OtherShard);
    shard.metrics.cross_shard_hop(HopResult::Miss);
    let message = format!(
        "agent for {noun} {:?} is offline on this shard: agent {host_id:?} has tunnels to other \
         shards of this engine only, and none could take the stream; retrying may help",
        request.target
    );
    Err((Refusal::AgentOffline, message))
}

enum ReadDialError {
    Io(io::Error),
    Eof,
    Dial(DialError),
}

/// Reads one dial request; bytes after it stay in `buf` (they belong to the user's protocol).
async fn read_dial_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<DialRequest, ReadDialError> {
    let mut chunk = [0u8; DIAL_READ_CHUNK];
    loop {
        match DialRequest::parse(buf) {
            Ok(Some((request, used))) => {
                buf.drain(..used);
                return Ok(request);
            }
            Ok(None) => {}
            Err(e) => return Err(ReadDialError::Dial(e)),
        }
        let n = stream.read(&mut chunk).await.map_err(ReadDialError::Io)?;
        if n == 0 {
            return Err(ReadDialError::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn refuse_dial<S: AsyncWrite + Unpin>(
    stream: &mut S,
    refusal: Refusal,
    message: &str,
) -> End {
    write_and_close(stream, &DialResponse::error(message).encode()).await;
    End::Refused(refusal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hello::test_support::rustls_hello;
    use crate::route::{ALPN_CONTROL, ALPN_HTTP1, ALPN_SSH};

    #[test]
    fn classify_routes_complete_hellos_only() {
        let hello = rustls_hello(Some("jaunt.test"), &[ALPN_SSH]);
        for cut in 1..hello.len() {
            assert_eq!(classify(&hello[..cut], "jaunt.test"), None, "cut {cut}");
        }
        assert_eq!(
            classify(&hello, "jaunt.test"),
            Some(Routed::User(DialKind::Ssh))
        );
        let control = rustls_hello(None, &[ALPN_CONTROL]);
        assert_eq!(classify(&control, "jaunt.test"), Some(Routed::Control));
        let app = rustls_hello(Some("grafana.jaunt.test"), &[ALPN_HTTP1]);
        assert_eq!(
            classify(&app, "jaunt.test"),
            Some(Routed::App("grafana".into()))
        );
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\n", "jaunt.test"),
            Some(Routed::Reject(RejectReason::NotTls))
        );
        let unknown = rustls_hello(Some("jaunt.test"), &[b"foo"]);
        assert_eq!(
            classify(&unknown, "jaunt.test"),
            Some(Routed::Reject(RejectReason::UnknownAlpn))
        );
    }

    #[test]
    fn alert_records_are_fatal_alerts() {
        assert_eq!(alert_record(120), [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 120]);
    }
}
