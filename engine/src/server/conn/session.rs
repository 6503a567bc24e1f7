//! The user session route (`jaunt-ssh`, `jaunt-postgres`, `jaunt-tcp`, `jaunt-app` and web apps
//! by SNI): read the dial request, decide, open the stream to the agent, answer, splice.
//!
//! The decision — resolve the target, authorize, this shard's tunnel or a cross-shard hop — is
//! [`decide`], a pure function of the snapshot, the identity, the request and what the shard's
//! tables resolved, tested by table below. Everything that awaits (the dial request, opening
//! the stream or the hop, the splice) and everything counted (metrics, audit, the live session
//! registry) is around it in [`connect`].
//!
//! Not here: ClientHello routing and TLS termination (`mod.rs`), agent tunnels (`agent.rs`),
//! the hops themselves (`server/hop.rs`), authorization rules (`server/authorize.rs`).

/// Counts one user stream in `jaunt_streams_open` while it lives.
use std::cell::Cell;
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use jaunt_config::identity::{unix_now, Identity, IdentityKind};
use jaunt_config::wire::dial::{DialError, DialKind, DialRequest, DialResponse, StreamHeader};

use super::{
    peer_identity, splice_idle, terminate, write_and_close, Client, ConnError, Ctx, End, Tls,
    DIAL_READ_CHUNK,
};
use crate::server::audit::AuditEvent;
use crate::server::authorize::{authorize, Allowed, Denied, DeniedKind};
use crate::server::hop::{HopRefusal, HopStream};
use crate::server::http::Response;
use crate::server::io::{with_deadline, ByteSink, Counted};
use crate::server::metrics::{DialMiss, HopResult, Refusal};
use crate::server::shard::{NotedRecordings, Resolved, Shard, Signal};
use crate::server::snapshot::Snapshot;
use crate::tunnel::{self, MuxStream, OpenError, Tunnel};

/// How often a dial waiting for its agent after a takeover looks again.
const AGENT_WAIT_POLL: Duration = Duration::from_millis(20);

struct OpenStream(Rc<Shard>);

impl OpenStream {
    fn new(shard: &Rc<Shard>) -> OpenStream {
        shard.metrics.stream_opened();
        OpenStream(Rc::clone(shard))
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.metrics.stream_closed();
    }
}

pub(super) async fn user(
    ctx: &Ctx<'_>,
    client: Client,
    hello: Vec<u8>,
    alpn_kind: DialKind,
) -> End {
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
    connect(ctx, stream, identity, request, early, Answer::Dial, None).await
}

/// How a user route answers: with a [`DialResponse`] (the `jaunt-*` ALPNs, whose clients sent
/// a dial request), or, for web apps, with nothing on success and an HTTP error response on a
/// refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Answer {
    Dial,
    Http,
    /// The web terminal's WebSocket (`terminal.rs`): refusals and the go-ahead are
    /// [`TermNotice`](jaunt_config::wire::term::TermNotice) text messages, and the stream to
    /// the agent carries terminal frames instead of SSH.
    Terminal,
}

/// A user's connection as [`connect`] drives it: a TLS stream (whose client certificate, if
/// any, is forwarded), or the web terminal's WebSocket.
pub(super) trait UserStream: AsyncRead + AsyncWrite + Unpin + 'static {
    /// The client certificate the TLS handshake verified (DER), if any.
    fn client_cert(&self) -> Option<Vec<u8>>;

    /// Tells the user the dial was refused, in the route's terms, and ends the connection.
    async fn refuse_user(&mut self, answer: Answer, refusal: Refusal, message: &str) -> End;

    /// Tells the user the session is connected (a dial response; nothing for web apps).
    async fn connected(&mut self, answer: Answer, session_id: &str) -> io::Result<()>;

    /// Where to say why a live session was ended (a kill, a lock, a role change), for a stream
    /// that can tell its user (the web terminal's WebSocket: a close frame with the reason).
    fn end_notice(&self) -> Option<EndNotice> {
        None
    }
}

/// Why a live session was ended, for its stream to tell the user ([`UserStream::end_notice`]).
pub(super) type EndNotice = Rc<std::cell::RefCell<Option<String>>>;

/// How long a stream that tells why its session was ended has to say it (while the splice
/// winds down) before it is dropped.
const END_NOTICE_GRACE: Duration = Duration::from_secs(2);

/// A live session was ended by `end` (a kill, a lock, a role change): if its stream can say
/// why, hand it the reason and give the splice [`END_NOTICE_GRACE`] to pass it on and wind
/// down; the stream ends its read side once it has sent it.
async fn tell_why_ended(notice: Option<&EndNotice>, end: &Signal) {
    let Some(notice) = notice else { return };
    *notice.borrow_mut() = Some(
        end.reason()
            .unwrap_or_else(|| "the session was ended".to_owned()),
    );
    futures_lite::future::yield_now().await;
    glommio::timer::Timer::new(END_NOTICE_GRACE).await;
}

impl UserStream for Tls {
    fn client_cert(&self) -> Option<Vec<u8>> {
        self.get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec())
    }

    async fn refuse_user(&mut self, answer: Answer, refusal: Refusal, message: &str) -> End {
        refuse(self, answer, refusal, message).await
    }

    async fn connected(&mut self, answer: Answer, _session_id: &str) -> io::Result<()> {
        self.get_mut()
            .1
            .set_buffer_limit(Some(crate::tunnel::TLS_BUFFER_LIMIT));
        if answer == Answer::Dial {
            self.write_all(&DialResponse::ok().encode()).await?;
            self.flush().await?;
        }
        Ok(())
    }
}

/// Refuses a user's connection in the route's own terms (see [`Answer`]).
pub(super) async fn refuse<S: AsyncWrite + Unpin>(
    stream: &mut S,
    answer: Answer,
    refusal: Refusal,
    message: &str,
) -> End {
    match answer {
        Answer::Dial => refuse_dial(stream, refusal, message).await,
        Answer::Http | Answer::Terminal => {
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
/// `session_cert` is the user certificate to forward when the client presented none (a
/// browser's app session: control made it for the web session's identity).
pub(super) async fn connect<S: UserStream + 'static>(
    ctx: &Ctx<'_>,
    mut stream: S,
    identity: Identity,
    request: DialRequest,
    early: Vec<u8>,
    answer: Answer,
    session_cert: Option<Vec<u8>>,
) -> End {
    let shard = ctx.shard;
    let routed = loop {
        let routed = {
            let snapshot = shard.snapshot();
            route_dial(shard, &snapshot, &identity, &request)
        };
        // Just after a takeover the agents are moving over from the replaced process: a dial
        // whose agent has no tunnel here yet waits for it (bounded by the grace and the
        // handshake deadline).
        let missed = matches!(
            routed,
            Err((Refusal::UnknownTarget | Refusal::AgentOffline, _))
        );
        match shard.awaiting_agents() {
            Some(until) if missed && Instant::now() + AGENT_WAIT_POLL < until.min(ctx.deadline) => {
                glommio::timer::Timer::new(AGENT_WAIT_POLL).await;
            }
            _ => break routed,
        }
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
            return stream.refuse_user(answer, refusal, &message).await;
        }
    };
    let recordings = allowed
        .recorded
        .then(|| std::sync::Arc::new(NotedRecordings::new(&host_id)));
    let audit = SessionAudit::new(ctx, &identity, &request, recordings);
    let header = StreamHeader::new(&request, &identity.name, &identity.roles, &ctx.peer)
        .with_db_grants(&identity.db_users, &identity.db_names)
        .with_session_id(&audit.session_id)
        .with_terminal(answer == Answer::Terminal);
    // The verified certificate travels too: the agent re-checks authorization against it.
    let encoded = match stream.client_cert().or(session_cert) {
        Some(cert) => header.encode_with_client_cert(&cert),
        None => header.encode(),
    };
    let Some(header) = encoded else {
        let message = "bad dial request: the certificate's identity is too large to forward";
        return stream
            .refuse_user(answer, Refusal::BadDialRequest, message)
            .await;
    };
    let opening = Instant::now();
    let opened = open_upstream(ctx, &host_id, via, &header, &request).await;
    ctx.settled();
    shard.metrics.stream_open(opening.elapsed());
    let mut upstream = match opened {
        Ok(upstream) => upstream,
        Err((refusal, message)) => return stream.refuse_user(answer, refusal, &message).await,
    };
    if let Some(joined) = &request.join {
        let observed = Observed {
            joined,
            allowed,
            labels,
        };
        return watch(ctx, stream, upstream, &identity, &request, observed, answer).await;
    }
    if shard.audit(audit.start_event()).is_err() {
        drop(upstream);
        tracing::warn!(
            shard = shard.index,
            user = %identity.name,
            target = %request.target,
            "session refused: the audit queue is full"
        );
        let _ = stream
            .refuse_user(answer, Refusal::DialFailed, "audit queue full, try again")
            .await;
        return End::Done;
    }
    let session_id = audit.session_id.clone();
    let notice = stream.end_notice();
    // From here on the session has started: the guard reports its end however it ends.
    let session = LiveSession::start(ctx, &identity, &request, labels, audit);
    let _open = OpenStream::new(shard);
    if let Err(e) = stream.connected(answer, &session_id).await {
        return End::Failed(ConnError::Client(e));
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
    // Boxed: every layer of the splice's future below holds the client stream by value, some
    // twice (an async fn keeps its argument and the moved copy), and a TLS stream is 1.4 KiB.
    let stream = Box::new(Counted::new(
        stream,
        SessionBytes {
            from_client: Rc::clone(&session.audit.bytes_in),
            to_client: Rc::clone(&session.audit.bytes_out),
        },
    ));
    // Dropping the splice closes both sides.
    // The roles' client_idle_timeout tightens the engine's own.
    let idle = allowed
        .idle_timeout
        .map_or(shard.limits().idle_timeout, |t| {
            t.min(shard.limits().idle_timeout)
        });
    let deadline = allowed
        .session_deadline
        .map(|at| Instant::now() + Duration::from_secs(at.saturating_sub(unix_now())));
    let shard_index = shard.index;
    let last_activity = Rc::clone(&ctx.last_activity);
    // What an idle session keeps: the splice's own state, not this connection's (see
    // `Ctx::detach`).
    let rest = async move {
        let _open = _open;
        let spliced = futures_lite::future::or(
            splice_upstream(&last_activity, stream, upstream, idle),
            async {
                session.end.wait().await;
                tell_why_ended(notice.as_ref(), &session.end).await;
                End::Done
            },
        );
        let Some(deadline) = deadline else {
            return spliced.await;
        };
        match with_deadline(deadline, spliced).await {
            Ok(end) => end,
            Err(_) => {
                tracing::info!(
                    shard = shard_index,
                    user = %identity.name,
                    target = %request.target,
                    "closing a live session: the user's certificate expired"
                );
                End::Done
            }
        }
    };
    ctx.detach(rest).await
}

/// What `jaunt join` watches: the session id, the observer's limits, the node's labels.
struct Observed<'r> {
    joined: &'r str,
    allowed: Allowed,
    labels: Labels,
}

/// The observer's own live session, registered with its shard while it lives.
struct ObserverSession<'a> {
    shard: &'a Shard,
    conn_id: u64,
}

impl Drop for ObserverSession<'_> {
    fn drop(&mut self) {
        self.shard.session_ended(self.conn_id);
    }
}

/// `jaunt join`: the agent accepted the observer's stream to the live session `joined` (it
/// checked the session is there and terminated): audit the join, answer, and splice until
/// either side ends or the observer's certificate expires. The observer's stream is a live
/// session of its own (its `observing` names the watched one): listed by `sessions ls`, ended
/// by `sessions kill`, a lock on the observer or a role change taking `session`/`join` away.
async fn watch<S: UserStream>(
    ctx: &Ctx<'_>,
    mut stream: S,
    upstream: Upstream,
    identity: &Identity,
    request: &DialRequest,
    observed: Observed<'_>,
    answer: Answer,
) -> End {
    let Observed {
        joined,
        allowed,
        labels,
    } = observed;
    let shard = ctx.shard;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let observer_session_id = format!("{nanos:x}-{}-{}", shard.index, ctx.conn_id);
    let end = shard.session_started(
        ctx.conn_id,
        &observer_session_id,
        identity,
        request,
        labels,
        None,
    );
    let _registered = ObserverSession {
        shard,
        conn_id: ctx.conn_id,
    };
    let _ = shard.audit(AuditEvent::SessionJoin {
        observer_session_id: observer_session_id.clone(),
        session_id: joined.to_owned(),
        user: identity.name.clone(),
        roles: identity.roles.clone(),
        target: request.target.clone(),
        client_addr: ctx.peer.clone(),
        time: unix_now(),
    });
    tracing::info!(shard = shard.index, user = %identity.name, target = %request.target,
        session = %joined, "observer joined a live session");
    let _open = OpenStream::new(shard);
    // A dial response for `jaunt join`, the ready notice for a web observer.
    let notice = stream.end_notice();
    if let Err(e) = stream.connected(answer, &observer_session_id).await {
        return End::Failed(ConnError::Client(e));
    }
    let spliced = futures_lite::future::or(
        splice_upstream(
            &ctx.last_activity,
            stream,
            upstream,
            shard.limits().idle_timeout,
        ),
        async {
            end.wait().await;
            tell_why_ended(notice.as_ref(), &end).await;
            End::Done
        },
    );
    let left = Duration::from_secs(
        allowed
            .session_deadline
            .unwrap_or(identity.expires)
            .saturating_sub(unix_now()),
    );
    with_deadline(Instant::now() + left, spliced)
        .await
        .unwrap_or(End::Done)
}

/// A dial that routing resolved and authorization allowed. `T` is the tunnel type (a
/// [`Tunnel`] outside the decision's tests).
#[derive(Debug, PartialEq)]
struct Dialable<T = Tunnel> {
    host_id: String,
    via: Via<T>,
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
struct LiveSession {
    shard: Rc<Shard>,
    conn_id: u64,
    end: Rc<Signal>,
    audit: SessionAudit,
}

impl LiveSession {
    fn start(
        ctx: &Ctx<'_>,
        identity: &Identity,
        request: &DialRequest,
        labels: Labels,
        audit: SessionAudit,
    ) -> LiveSession {
        let end = ctx.shard.session_started(
            ctx.conn_id,
            &audit.session_id,
            identity,
            request,
            labels,
            audit.recordings.clone(),
        );
        LiveSession {
            shard: Rc::clone(ctx.shard),
            conn_id: ctx.conn_id,
            end,
            audit,
        }
    }
}

impl Drop for LiveSession {
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
    /// `Some` when the roles ask for a recording: the ids the agent notes.
    recordings: Option<std::sync::Arc<NotedRecordings>>,
    started: Instant,
    /// Bytes from the client to the target.
    bytes_in: Rc<Cell<u64>>,
    /// Bytes from the target to the client.
    bytes_out: Rc<Cell<u64>>,
}

impl SessionAudit {
    fn new(
        ctx: &Ctx<'_>,
        identity: &Identity,
        request: &DialRequest,
        recordings: Option<std::sync::Arc<NotedRecordings>>,
    ) -> SessionAudit {
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
            recordings,
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
            recorded: self.recordings.is_some(),
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
            recorded: self.recordings.is_some(),
            recording_ids: self
                .recordings
                .as_ref()
                .map(|r| r.ids())
                .unwrap_or_default(),
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
    let resolved = shard.resolve(snapshot, request.kind, &request.target);
    decide(
        snapshot,
        identity,
        request,
        resolved,
        &shard.config.public_host,
    )
    .map_err(|refused| {
        if let Some(miss) = refused.miss {
            shard.metrics.dial_miss(miss);
        }
        (refused.refusal, refused.message)
    })
}

/// A dial the session decision refused: the refusal, what the user reads, and where routing
/// missed (for `jaunt_dial_misses_total`), if it did.
#[derive(Debug, PartialEq)]
struct Refused {
    refusal: Refusal,
    message: String,
    miss: Option<DialMiss>,
}

/// The session decision, a pure function: given what routing found for `request` on this shard
/// (`resolved`: the agent and its labels, this shard's tunnel to it if any, else the shards that
/// have one), authorize `identity` under `snapshot`, then pick this shard's tunnel or a
/// cross-shard hop. Authorization comes before anything is said about the agent's tunnels, so
/// a user who may not reach a target does not learn whether its agent is connected.
fn decide<T>(
    snapshot: &Snapshot,
    identity: &Identity,
    request: &DialRequest,
    resolved: Option<Resolved<T>>,
    public_host: &str,
) -> Result<Dialable<T>, Refused> {
    let noun = request.kind.noun();
    let Some(Resolved {
        target,
        tunnel,
        other_shards,
    }) = resolved
    else {
        let denied = Denied::unknown_target(snapshot, request);
        return Err(Refused {
            refusal: Refusal::UnknownTarget,
            message: denied.message,
            miss: Some(DialMiss::UnknownTarget),
        });
    };
    // Authorize before saying anything about the agent's tunnels.
    let allowed = match authorize(snapshot, identity, request, &target) {
        Ok(allowed) => allowed,
        Err(denied) => {
            let refusal = match denied.kind {
                DeniedKind::UnknownTarget => Refusal::UnknownTarget,
                DeniedKind::Forbidden => Refusal::Forbidden,
            };
            return Err(Refused {
                refusal,
                message: denied.message,
                miss: None,
            });
        }
    };
    let host_id = target.host_id;
    let via = match tunnel {
        Some(tunnel) => Via::Local(tunnel),
        // The agent has tunnels to other shards only (it is reconnecting, or has not covered
        // this shard yet): hop through one of them.
        None if !other_shards.is_empty() => Via::Hop(other_shards),
        None => {
            let message = format!(
                "agent for {noun} {:?} is offline: agent {host_id:?} has no tunnel to this \
                 engine (is it running and able to reach {public_host}?)",
                request.target
            );
            return Err(Refused {
                refusal: Refusal::AgentOffline,
                message,
                miss: Some(DialMiss::AgentOffline),
            });
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
#[derive(Debug, PartialEq)]
enum Via<T = Tunnel> {
    /// This shard's tunnel.
    Local(T),
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

/// [`splice_idle`] with the upstream's own type, so that a tunnel stream gets the splice's
/// copy-free path.
async fn splice_upstream<A>(
    last_activity: &Cell<Instant>,
    client: A,
    upstream: Upstream,
    idle: Duration,
) -> End
where
    A: AsyncRead + AsyncWrite + Unpin + 'static,
{
    match upstream {
        Upstream::Mux(stream) => {
            splice_idle(last_activity, tunnel::splice(client, stream), idle).await
        }
        // A hop end lends its chunks like a tunnel stream lends its buffers.
        Upstream::Hop(stream) => {
            splice_idle(last_activity, tunnel::splice_lending(client, stream), idle).await
        }
    }
}

/// How long an agent has to answer an SSH dial at least: an agent that terminates SSH answers
/// once it has a login certificate from control and is logged in to sshd (its own bounds are
/// 15 s and 30 s), which under a burst of parallel sessions (a fleet's fan-out) takes longer
/// than a TLS handshake should. The agent always answers within its own bounds.
pub const SSH_ANSWER_TIMEOUT: Duration = Duration::from_secs(45);

/// How long the engine waits for the agent's answer to a dial of `kind`.
fn answer_timeout(kind: DialKind, handshake_timeout: Duration) -> Duration {
    match kind {
        DialKind::Ssh => handshake_timeout.max(SSH_ANSWER_TIMEOUT),
        _ => handshake_timeout,
    }
}

/// Opens the session's stream to agent `host_id`, with `header`, by [`answer_timeout`]; or
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
    let answer_within = answer_timeout(request.kind, shard.limits().handshake_timeout);
    let open_deadline = Instant::now() + answer_within;
    let timed_out = || {
        let message = format!(
            "agent {host_id:?} did not answer within {answer_within:?} while connecting to \
             {noun} {:?}",
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
#[allow(clippy::panic, reason = "tests")]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::server::authorize::tests::alice;
    use crate::server::snapshot::Target;

    fn snapshot() -> Snapshot {
        Snapshot {
            version: 1,
            cluster: "test".into(),
            policy: jaunt_config::rbac::Policy::compile(&[
                jaunt_config::resource::Role::builtin_access(),
            ])
            .unwrap_or_else(|e| panic!("built-in role: {e}")),
            ..Snapshot::default()
        }
    }

    fn ssh(login: &str) -> DialRequest {
        DialRequest {
            join: None,
            kind: DialKind::Ssh,
            target: "web1".into(),
            login: Some(login.into()),
            db_user: None,
            db_name: None,
        }
    }

    fn found(tunnel: Option<u32>, other_shards: &[usize]) -> Option<Resolved<u32>> {
        let mut target = Target::on_host("h1");
        target.labels = BTreeMap::from([("env".to_owned(), "dev".to_owned())]);
        Some(Resolved {
            target,
            tunnel,
            other_shards: other_shards.to_vec(),
        })
    }

    /// What a decision comes to, for the table: the way to the agent, or the refusal and
    /// where routing missed.
    #[derive(Debug, PartialEq)]
    enum Outcome {
        Local(u32),
        Hop(Vec<usize>),
        Refused(Refusal, Option<DialMiss>),
    }

    #[test]
    fn the_session_decision_by_table() {
        let cases: [(&str, Option<Resolved<u32>>, &str, Outcome); 7] = [
            (
                "a tunnel on this shard",
                found(Some(7), &[]),
                "root",
                Outcome::Local(7),
            ),
            (
                "this shard's tunnel wins over other shards'",
                found(Some(7), &[1, 2]),
                "root",
                Outcome::Local(7),
            ),
            (
                "tunnels on other shards only: a hop, in the directory's order",
                found(None, &[2, 1]),
                "root",
                Outcome::Hop(vec![2, 1]),
            ),
            (
                "no tunnel anywhere",
                found(None, &[]),
                "root",
                Outcome::Refused(Refusal::AgentOffline, Some(DialMiss::AgentOffline)),
            ),
            (
                "nobody serves the target",
                None,
                "root",
                Outcome::Refused(Refusal::UnknownTarget, Some(DialMiss::UnknownTarget)),
            ),
            (
                "a login the roles do not allow",
                found(Some(7), &[]),
                "postgres",
                Outcome::Refused(Refusal::Forbidden, None),
            ),
            (
                "forbidden says nothing about the agent's tunnels",
                found(None, &[]),
                "postgres",
                Outcome::Refused(Refusal::Forbidden, None),
            ),
        ];
        let snapshot = snapshot();
        for (name, resolved, login, want) in cases {
            let decided = decide(&snapshot, &alice(), &ssh(login), resolved, "jaunt.test");
            let got = match &decided {
                Ok(Dialable {
                    via: Via::Local(tunnel),
                    ..
                }) => Outcome::Local(*tunnel),
                Ok(Dialable {
                    via: Via::Hop(shards),
                    ..
                }) => Outcome::Hop(shards.clone()),
                Err(refused) => Outcome::Refused(refused.refusal, refused.miss),
            };
            assert_eq!(got, want, "{name}");
            if let Ok(dialable) = decided {
                assert_eq!(dialable.host_id, "h1", "{name}");
                assert_eq!(dialable.labels.get("env").map(String::as_str), Some("dev"));
                // An SSH dial under a role that records (the built-in access role).
                let recorded = Allowed {
                    recorded: true,
                    ..Allowed::default()
                };
                assert_eq!(dialable.allowed, recorded, "{name}");
            }
        }
    }

    #[test]
    fn refusals_say_what_to_do() {
        let snapshot = snapshot();
        let unknown = decide(
            &snapshot,
            &alice(),
            &ssh("root"),
            None::<Resolved<u32>>,
            "p",
        );
        assert_eq!(
            unknown.map(|_| ()).map_err(|r| r.message),
            Err(r#"no such node "web1" in cluster "test""#.to_owned())
        );
        let offline = decide(
            &snapshot,
            &alice(),
            &ssh("root"),
            found(None, &[]),
            "jaunt.test",
        );
        let message = offline.map(|_| ()).map_err(|r| r.message).err();
        assert!(
            message
                .as_deref()
                .is_some_and(|m| m.contains(r#"agent "h1""#) && m.contains("jaunt.test")),
            "{message:?}"
        );
        let forbidden = decide(
            &snapshot,
            &alice(),
            &ssh("postgres"),
            found(Some(1), &[]),
            "p",
        );
        let message = forbidden.map(|_| ()).map_err(|r| r.message).err();
        assert!(
            message
                .as_deref()
                .is_some_and(|m| m.contains("web1") && m.contains("postgres")),
            "{message:?}"
        );
    }
}
