//! One connection on the public port, from accept to close: acceptance, the ClientHello, the
//! route, and the routes that are short (control pass-through, TLS termination, the web UI and
//! web apps' refusals). The two long routes have their own files: `agent.rs` (agent tunnels and
//! their heartbeats) and `session.rs` (user sessions, with the session decision as a pure
//! function).
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
//!    - `Web` / `App`: terminate TLS (no client auth), serve HTTP/1.1 (`http.rs`); on the web
//!      route, the web terminal's WebSocket upgrade is handed to `terminal.rs`;
//!    - `Tunnel` whose ClientHello asks for another shard (`jaunt-shard.<k>`): hand the socket
//!      and the ClientHello to that shard ([`hand_over`]), which goes on from here
//!      ([`serve_adopted`]);
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
use std::future::Future;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod agent;
mod held;
mod session;
mod terminal;
pub use session::SSH_ANSWER_TIMEOUT;

use futures_lite::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_rustls::server::TlsStream;
use glommio::net::TcpStream;
use jaunt_config::identity::{unix_now, Identity, IdentityKind};
use jaunt_config::wire::dial::{DialKind, DialRequest};
use jaunt_config::wire::parse_shard_hint;

use crate::hello::{self, Parse, MAX_CLIENT_HELLO_BYTES};
use crate::mux::Blame;
use crate::route::{self, RejectReason, Route};
use crate::server::admission::Slot;
use crate::server::http::{self, PingBody, Response};
use crate::server::io::{idle_timeout, with_deadline, ByteSink, Counted, Prefixed};
use crate::server::metrics::{Direction, Refusal, RouteKind};
use crate::server::shard::{ConnGuard, Shard};
use crate::server::web::{AppAccess, WebRequest, WebUi, APP_SESSION_COOKIE};
use crate::tunnel::{self, CloseReason, Side};
use agent::agent_tunnel;
use held::Held;
use session::{connect, refuse, user, Answer};

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
    /// An agent's tunnel, with the shard its ClientHello asked for (a `jaunt-shard.<k>` ALPN
    /// entry), if any.
    Tunnel {
        shard: Option<usize>,
    },
    Control,
    User(DialKind),
    App(String),
    Web,
    Reject(RejectReason),
}

impl Routed {
    fn kind(&self) -> Option<RouteKind> {
        Some(match self {
            Routed::Tunnel { .. } => RouteKind::Tunnel,
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
            Route::Tunnel => Routed::Tunnel {
                shard: hello.alpn().find_map(parse_shard_hint),
            },
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

/// A TLS-terminated client connection: the bytes read while routing replayed first, the
/// session ticket held back to leave with the server's next write ([`held`]).
type Tls = TlsStream<Held<Prefixed<Client>>>;

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
    /// Held until the connection opened its session's stream or took another route.
    dialing: std::cell::RefCell<Option<crate::server::shard::Dialing>>,
    /// The connection's slot, until a user session's splice or an agent tunnel takes it to a
    /// task of its own ([`Ctx::detach`]).
    guard: Cell<Option<ConnGuard>>,
    /// Its handshake admission slot (`admission.rs`), released once TLS is established here or
    /// the connection took a route without a handshake here.
    handshake: Slot,
}

impl Ctx<'_> {
    /// The connection no longer holds up a drain's goodbye to the agents.
    fn settled(&self) {
        self.dialing.borrow_mut().take();
    }
}

/// Serves one accepted connection until it ends, then accounts for how it ended.
/// Serves a connection this shard accepted.
pub(crate) async fn serve(
    shard: Rc<Shard>,
    stream: TcpStream,
    guard: ConnGuard,
    slot: Slot,
    peer: Option<std::net::SocketAddr>,
) {
    serve_from(shard, stream, guard, slot, None, Instant::now(), peer).await;
}

/// Serves a connection another shard accepted at `accepted_at` and handed over after reading
/// its ClientHello, `hello` (`hop::Adopted`).
pub(crate) async fn serve_adopted(
    shard: Rc<Shard>,
    stream: TcpStream,
    guard: ConnGuard,
    slot: Slot,
    hello: Vec<u8>,
    accepted_at: Instant,
    peer: Option<std::net::SocketAddr>,
) {
    serve_from(shard, stream, guard, slot, Some(hello), accepted_at, peer).await;
}

async fn serve_from(
    shard: Rc<Shard>,
    stream: TcpStream,
    guard: ConnGuard,
    handshake: Slot,
    hello: Option<Vec<u8>>,
    accepted_at: Instant,
    peer: Option<std::net::SocketAddr>,
) {
    let ctx = Ctx {
        shard: &shard,
        conn_id: guard.id,
        peer: peer.map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
        accepted_at,
        deadline: accepted_at + shard.limits().handshake_timeout,
        last_activity: Rc::new(Cell::new(accepted_at)),
        dialing: std::cell::RefCell::new(Some(shard.dialing())),
        guard: Cell::new(Some(guard)),
        handshake,
    };
    let end = futures_lite::future::or(handle(&ctx, stream, hello), async {
        shard.abort.wait().await;
        End::Refused(Refusal::DrainDeadline)
    })
    .await;
    account(&shard, ctx.conn_id, &ctx.peer, end);
    // Unless a detached session took it.
    drop(ctx.guard.take());
}

/// Counts or logs how a connection ended.
fn account(shard: &Shard, conn_id: u64, peer: &str, end: End) {
    match end {
        End::Done => {}
        End::Refused(reason) => shard.metrics.refused(reason),
        End::Failed(error) => tracing::debug!(
            shard = shard.index,
            conn = conn_id,
            peer = %peer,
            blame = ?error.blame(),
            %error,
            "connection failed"
        ),
    }
}

impl Ctx<'_> {
    /// Runs `rest`, a connection's last phase (an idle-prone user session's splice), as a task
    /// of its own that takes the connection's guard and ends it as [`serve_from`] would (the
    /// drain's abort, the accounting). The connection's own task then ends and frees its
    /// future, which is sized for the largest route's handshake phases (about 50 KiB), so an
    /// idle session keeps only what it splices with. Runs `rest` in place if the guard was
    /// taken already.
    async fn detach(&self, rest: impl Future<Output = End> + 'static) -> End {
        let Some(guard) = self.guard.take() else {
            return rest.await;
        };
        let shard = Rc::clone(self.shard);
        let peer = self.peer.clone();
        glommio::spawn_local(async move {
            let end = futures_lite::future::or(rest, async {
                shard.abort.wait().await;
                End::Refused(Refusal::DrainDeadline)
            })
            .await;
            account(&shard, guard.id, &peer, end);
            drop(guard);
        })
        .detach();
        End::Done
    }
}

/// `adopted`: the ClientHello another shard read before handing the connection over.
async fn handle(ctx: &Ctx<'_>, mut stream: TcpStream, adopted: Option<Vec<u8>>) -> End {
    let shard = ctx.shard;
    let public_host = &shard.config.public_host;
    let (hello, routed) = match adopted {
        Some(hello) => {
            // Complete: the other shard routed it (so `None` cannot happen; it would end the
            // connection, not loop).
            let Some(routed) = classify(&hello, public_host) else {
                return End::Done;
            };
            (hello, routed)
        }
        None => {
            // TCP_NODELAY comes from the listening socket (`shard::glommio_listener`).
            let mut hello = Vec::new();
            match with_deadline(
                ctx.deadline,
                read_hello(&mut stream, &mut hello, public_host),
            )
            .await
            {
                Err(_) => return End::Refused(Refusal::HandshakeTimeout),
                Ok(Err(e)) => return End::Failed(ConnError::Client(e)),
                // EOF before a complete ClientHello: a port scanner or a health check.
                Ok(Ok(None)) => return End::Done,
                Ok(Ok(Some(routed))) => (hello, routed),
            }
        }
    };
    // An agent asking for another shard's tunnel slot: that shard serves it, so that an agent
    // covers N shards with N connections instead of redialing until the kernel's
    // `SO_REUSEPORT` hash lands it on each. A hint this shard cannot honour (out of range, its
    // own index, the other shard gone) is ignored: the agent then learns the shard from the
    // tunnel hello, as without hints.
    let hello = match routed {
        Routed::Tunnel { shard: Some(want) } if want != shard.index && want < shard.shard_count => {
            match hand_over(shard, want, &stream, hello, ctx.accepted_at) {
                // Our descriptor closes when `stream` drops here; the socket lives on there.
                Ok(()) => return End::Done,
                Err(hello) => hello,
            }
        }
        _ => hello,
    };
    serve_here(ctx, stream, hello, routed).await
}

/// Hands a duplicate of `stream`'s socket to shard `to` (`hop::Hops::hand_over`); the caller
/// then drops its own. Gives the hello back when it cannot.
fn hand_over(
    shard: &Rc<Shard>,
    to: usize,
    stream: &TcpStream,
    hello: Vec<u8>,
    accepted_at: Instant,
) -> Result<(), Vec<u8>> {
    use std::os::fd::{AsRawFd as _, BorrowedFd};
    #[allow(unsafe_code)]
    // SAFETY: the descriptor is `stream`'s, open for as long as `stream` lives, which outlives
    // this borrow (it is only duplicated here).
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let Ok(owned) = fd.try_clone_to_owned() else {
        return Err(hello);
    };
    let adopted = crate::server::hop::Adopted {
        stream: std::net::TcpStream::from(owned),
        hello,
        accepted_at,
    };
    match shard.hops.hand_over(to, adopted) {
        Ok(()) => {
            shard.metrics.handed_over();
            Ok(())
        }
        Err(adopted) => Err(adopted.hello),
    }
}

/// Serves a routed connection on this shard.
async fn serve_here(ctx: &Ctx<'_>, stream: TcpStream, hello: Vec<u8>, routed: Routed) -> End {
    let shard = ctx.shard;
    if matches!(routed, Routed::Control | Routed::Reject(_)) {
        ctx.handshake.release();
    }
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
    if !matches!(routed, Routed::User(_) | Routed::App(_)) {
        ctx.settled();
    }
    // Each route's future on the heap, sized for that route alone: inline, every connection's
    // task was sized for the largest route's phases (tens of KiB), and moving it (into the
    // task, into `serve_from`'s future) copied all of it, whatever the route (1.7% of a web
    // route handshake's CPU went to those copies).
    match routed {
        Routed::Control => Box::pin(pass_through(ctx, client, hello)).await,
        Routed::Web => Box::pin(web(ctx, client, hello)).await,
        Routed::App(name) => Box::pin(app(ctx, client, hello, name)).await,
        Routed::Tunnel { .. } => Box::pin(agent_tunnel(ctx, client, hello)).await,
        Routed::User(dial_kind) => Box::pin(user(ctx, client, hello, dial_kind)).await,
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

/// Runs `splice` (of the client, side A, and its upstream, side B) until both directions
/// finish, an error, or `idle` passes without `last_activity` moving (the connection's, which a
/// splice detached from its [`Ctx`] keeps: [`Ctx::detach`]).
async fn splice_idle<F>(last_activity: &Cell<Instant>, splice: F, idle: Duration) -> End
where
    F: Future<Output = Result<tunnel::Spliced, tunnel::SpliceError>>,
{
    last_activity.set(Instant::now());
    let spliced = async {
        match splice.await {
            Ok(_) => End::Done,
            Err(e) => match e.side {
                Side::A => End::Failed(ConnError::Client(e.source)),
                Side::B => End::Failed(ConnError::Upstream(e.source)),
            },
        }
    };
    futures_lite::future::or(spliced, async {
        idle_timeout(last_activity, idle).await;
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
    let idle = ctx.shard.limits().idle_timeout;
    splice_idle(&ctx.last_activity, tunnel::splice(client, upstream), idle).await
}

// ---------------------------------------------------------------------------------------------
// TLS termination

/// Terminates TLS with `acceptor` on a stream that first replays `hello`.
async fn terminate(
    ctx: &Ctx<'_>,
    acceptor: &futures_rustls::TlsAcceptor,
    client: Client,
    hello: Vec<u8>,
) -> Result<Tls, End> {
    let shard = ctx.shard;
    let kind = client.sink().kind;
    if peer_gone(client.get_ref()) {
        ctx.handshake.release();
        shard.metrics.handshake_abandoned();
        return Err(End::Done);
    }
    let socket = std::os::fd::AsRawFd::as_raw_fd(client.get_ref());
    let io = Held::new(Prefixed::new(hello, client)).on_socket(socket);
    let accepted = with_deadline(ctx.deadline, acceptor.accept(io)).await;
    ctx.handshake.release();
    match accepted {
        Err(_) => Err(End::Refused(Refusal::HandshakeTimeout)),
        Ok(Err(e)) => {
            tracing::debug!(shard = shard.index, peer = %ctx.peer, error = %e, "TLS handshake failed");
            Err(End::Refused(Refusal::TlsHandshake))
        }
        Ok(Ok(mut stream)) => {
            shard.metrics.handshake(ctx.accepted_at.elapsed());
            let resumed =
                stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            shard.metrics.tls_handshake(kind, resumed);
            stream.get_mut().0.release();
            Ok(stream)
        }
    }
}

/// Whether the client has closed its side already (a FIN, or a reset, after its ClientHello):
/// a connection that waited in the listen backlog past the client's own timeout, while the
/// shard was at its handshake bound (`admission.rs`), for instance after an engine restart.
/// Checked before the TLS handshake, so no handshake CPU is spent on a client that is gone
/// (FIFO backlogs otherwise make every handshake of an overloaded shard one for a client that
/// has left). One nonblocking `recv(MSG_PEEK)`: a live client has sent nothing after its
/// ClientHello and waits for the server's answer.
fn peer_gone(stream: &TcpStream) -> bool {
    use std::os::fd::{AsRawFd as _, BorrowedFd};
    #[allow(unsafe_code)]
    // SAFETY: the descriptor is `stream`'s, open for as long as `stream` lives, which outlives
    // this borrow (it is only read with MSG_PEEK here).
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let mut byte = [0u8; 1];
    let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
    match rustix::net::recv(fd, &mut byte[..], flags) {
        Ok((_, 0)) => true,
        Ok(_) => false,
        Err(e) => e == rustix::io::Errno::CONNRESET,
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
    let identity = crate::verified::identity_of(leaf.as_ref())
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
    // The address `serve_from` looked up already (saves a `getpeername` per connection).
    let peer = ctx.peer.parse().ok();
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
    let terminal_backend = backend.clone();
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
        http::ServeEnd::Upgrade(head, early) => {
            // Boxed: the web terminal's future is large and rare (see `serve_here`).
            Box::pin(terminal::serve(ctx, stream, head, early, terminal_backend)).await
        }
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
    let (identity, early, session_cert) = match peer_identity(&stream, IdentityKind::User) {
        Ok(identity) => (identity, Vec::new(), None),
        Err((refusal, why)) => {
            let message = format!(
                "app {name:?} needs a Jaunt user certificate ({why}): run `jaunt proxy app {name}` \
                 and use the local address it prints, or open it from the web UI"
            );
            let backend = shard.config.web.clone();
            let browser = match backend {
                Some(backend) => browser_app_session(ctx, &mut stream, backend, &name).await,
                None => BrowserApp::NoSession,
            };
            match browser {
                BrowserApp::Proxy {
                    identity,
                    cert_der,
                    early,
                } => (identity, early, Some(cert_der)),
                BrowserApp::NoSession => {
                    return refuse(&mut stream, Answer::Http, refusal, &message).await
                }
                BrowserApp::Ended(end) => return end,
            }
        }
    };
    let request = DialRequest {
        join: None,
        kind: DialKind::App,
        target: name,
        login: None,
        db_user: None,
        db_name: None,
    };
    connect(
        ctx,
        stream,
        identity,
        request,
        early,
        Answer::Http,
        session_cert,
    )
    .await
}

/// How a browser's request on an app host without a client certificate turned out.
enum BrowserApp {
    /// A live app session: connect as `identity`, forwarding `cert_der`; `early` is the request
    /// to send first (its head rewritten by [`forwarded_head`]).
    Proxy {
        identity: Identity,
        cert_der: Vec<u8>,
        early: Vec<u8>,
    },
    /// No session and nothing else to say: the certificate refusal applies.
    NoSession,
    /// Answered (the session exchange's redirect, a redirect to log in) or failed.
    Ended(End),
}

/// Reads the first request head on an app host and asks the web UI backend about it (the
/// app session cookie, or the one-time exchange that sets it; control's `web::apps`).
async fn browser_app_session(
    ctx: &Ctx<'_>,
    stream: &mut Tls,
    backend: WebUi,
    name: &str,
) -> BrowserApp {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 2048];
    let (head, used) = loop {
        match http::parse_head(&buf) {
            Ok(Some(parsed)) => break parsed,
            Ok(None) => {}
            Err(e) => {
                let mut response = Response::text(400, &e.to_string());
                response.close = true;
                write_and_close(stream, &response.encode(false)).await;
                return BrowserApp::Ended(End::Refused(Refusal::BadHttpRequest));
            }
        }
        let room = http::MAX_REQUEST_HEAD_BYTES
            .saturating_sub(buf.len())
            .clamp(1, chunk.len());
        match with_deadline(ctx.deadline, stream.read(&mut chunk[..room])).await {
            Err(_) => return BrowserApp::Ended(End::Refused(Refusal::HandshakeTimeout)),
            Ok(Err(e)) => return BrowserApp::Ended(End::Failed(ConnError::Client(e))),
            Ok(Ok(0)) => return BrowserApp::Ended(End::Done),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let request = WebRequest {
        method: head.method.clone(),
        path: head.path.clone(),
        headers: head.headers.clone(),
        body: Vec::new(),
        peer: ctx.peer.parse().ok(),
    };
    let app = name.to_owned();
    let answer = glommio::executor()
        .spawn_blocking(move || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                backend.0.app_access(&app, &request)
            }))
            .ok()
            .flatten()
        })
        .await;
    match answer {
        None => BrowserApp::NoSession,
        Some(AppAccess::Respond(r)) => {
            let redirect = (300..400).contains(&r.status);
            let response = Response {
                status: r.status,
                content_type: r.content_type,
                body: r.body,
                close: true,
                headers: r.headers,
            };
            write_and_close(stream, &response.encode(head.method == "HEAD")).await;
            BrowserApp::Ended(if redirect {
                End::Done
            } else {
                End::Refused(Refusal::BadIdentity)
            })
        }
        Some(AppAccess::Proxy { identity, cert_der }) => {
            let mut early = forwarded_head(&head);
            early.extend_from_slice(&buf[used..]);
            BrowserApp::Proxy {
                identity,
                cert_der,
                early,
            }
        }
    }
}

/// The head an app session's request is forwarded with: the app session cookie taken out of
/// `Cookie` (the app never sees it), and `Connection: close`, so that every request of a
/// browser's app session is checked against the session (a logout ends the next one) unless
/// it is an `Upgrade` (a WebSocket lives as long as it is open).
fn forwarded_head(head: &http::RequestHead) -> Vec<u8> {
    let upgrade = head.headers.iter().any(|(n, _)| n == "upgrade");
    let mut out = format!("{} {} HTTP/1.1\r\n", head.method, head.path);
    for (name, value) in &head.headers {
        match name.as_str() {
            "cookie" => {
                let kept: Vec<&str> = value
                    .split(';')
                    .map(str::trim)
                    .filter(|pair| {
                        !pair.is_empty()
                            && pair.split('=').next().map(str::trim) != Some(APP_SESSION_COOKIE)
                    })
                    .collect();
                if !kept.is_empty() {
                    out.push_str(&format!("cookie: {}\r\n", kept.join("; ")));
                }
            }
            "connection" | "keep-alive" if !upgrade => {}
            _ => out.push_str(&format!("{name}: {value}\r\n")),
        }
    }
    if !upgrade {
        out.push_str("connection: close\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hello::test_support::rustls_hello;
    use crate::route::{ALPN_CONTROL, ALPN_HTTP1, ALPN_SSH};

    #[test]
    fn an_app_session_request_is_forwarded_without_the_cookie_and_closes() {
        let raw = b"GET /a?b=1 HTTP/1.1\r\nHost: app.jaunt.test\r\nConnection: keep-alive\r\n\
            Cookie: x=1; __Host-jaunt_app=secret; y=2\r\nAccept: text/html\r\n\r\n";
        let (head, _) = http::parse_head(raw)
            .unwrap_or_default()
            .unwrap_or_else(|| {
                unreachable!("a complete head parses");
            });
        let out = String::from_utf8(forwarded_head(&head)).unwrap_or_default();
        assert_eq!(
            out,
            "GET /a?b=1 HTTP/1.1\r\nhost: app.jaunt.test\r\ncookie: x=1; y=2\r\n\
             accept: text/html\r\nconnection: close\r\n\r\n"
        );
        let only = b"GET / HTTP/1.1\r\nCookie: __Host-jaunt_app=s\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\n\r\n";
        let (head, _) = http::parse_head(only)
            .unwrap_or_default()
            .unwrap_or_else(|| unreachable!("a complete head parses"));
        let out = String::from_utf8(forwarded_head(&head)).unwrap_or_default();
        assert_eq!(
            out,
            "GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n"
        );
    }

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
