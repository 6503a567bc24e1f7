//! The agent tunnel route (`jaunt-tunnel`): terminate TLS with the agent's host certificate,
//! send the [`TunnelHello`], read the [`AgentHello`], register the tunnel in the shard's table
//! and drive it until it ends, serving the agent's heartbeat stream alongside.
//!
//! Not here: the wire formats (`jaunt_config::wire`), the mux and its driver (`crate::tunnel`),
//! the shard's tables (`server/table.rs`, `server/inventory.rs`), user sessions (`session.rs`).

use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use jaunt_config::identity::IdentityKind;
use jaunt_config::wire::agent_hello::{AgentHello, MAX_AGENT_HELLO_BYTES};
use jaunt_config::wire::dial::{DialError, TunnelHello, LENGTH_PREFIX_BYTES};

use super::{peer_identity, terminate, write_and_close, Client, ConnError, Ctx, End};
use crate::mux::Role;
use crate::server::io::with_deadline;
use crate::server::metrics::Refusal;
use crate::server::shard::{Registered, Shard};
use crate::tunnel::{self, CloseReason, OpenError, Tunnel};

/// Removes a tunnel from its shard's table when the connection carrying it ends, however it
/// ends (including a drain abort that drops the task).
struct Registration {
    shard: Rc<Shard>,
    host_id: String,
    conn_id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shard.unregister_tunnel(&self.host_id, self.conn_id);
    }
}

pub(super) async fn agent_tunnel(ctx: &Ctx<'_>, client: Client, hello: Vec<u8>) -> End {
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
    stream
        .get_mut()
        .1
        .set_buffer_limit(Some(crate::tunnel::TUNNEL_TLS_BUFFER_LIMIT));
    let (tunnel, driver) = Tunnel::new(stream, Role::Server, shard.limits().tunnel_timers);
    // Besides the table's handle, the heartbeat task below holds one until the tunnel stops
    // taking streams: so a replacement or a drain drains the tunnel with an explicit
    // `go_away` (the shard does that), not by dropping the table's handle.
    let heartbeats = tunnel.clone();
    let pushes = tunnel.clone();
    let registered = shard.register_tunnel(&host_id, ctx.conn_id, &agent, tunnel);
    let registration = (registered != Registered::Draining).then(|| Registration {
        shard: Rc::clone(ctx.shard),
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
    // What a live tunnel keeps: its driver and its two helpers, in a task of their own (see
    // `Ctx::detach`), not this connection task sized for the largest route's handshake phases.
    let shard = Rc::clone(ctx.shard);
    let conn_id = ctx.conn_id;
    let rest = async move {
        let _registration = registration;
        let shard = &*shard;
        // The policy pusher never returns; it stops with the heartbeat task (when the tunnel
        // stops taking streams), so it never holds the tunnel open either.
        let reason = futures_lite::future::or(driver, async {
            futures_lite::future::or(
                serve_heartbeats(shard, &host_id, conn_id, heartbeats, hello_hash),
                push_policy(shard, &host_id, pushes),
            )
            .await;
            std::future::pending().await
        })
        .await;
        tracing::info!(shard = shard.index, %host_id, %reason, "agent tunnel closed");
        if reason.is_graceful() || reason == CloseReason::PeerEof {
            End::Done
        } else {
            End::Failed(ConnError::Tunnel(reason))
        }
    };
    ctx.detach(rest).await
}

/// Pushes the newest snapshot's agent policy to the agent on `tunnel` (see
/// `tunnel::policy_push`): at once, then after every newer snapshot. A push still in flight
/// when a newer snapshot arrives is dropped (its stream reset) for the newer one, so a slow or
/// stuck agent costs one stream, never a queue. Never returns.
async fn push_policy(shard: &Shard, host_id: &str, tunnel: Tunnel) {
    let mut pushed: Option<u64> = None;
    loop {
        let changed = shard.snapshot_changed();
        let snapshot = shard.snapshot();
        let due = !snapshot.agent_policy.is_empty()
            && pushed.is_none_or(|version| snapshot.version > version);
        if !due {
            drop(snapshot);
            changed.wait().await;
            continue;
        }
        let version = snapshot.version;
        let document = Arc::clone(&snapshot.agent_policy);
        drop(snapshot);
        let sent = futures_lite::future::or(
            async { Some(send_policy(&tunnel, &document).await) },
            async {
                changed.wait().await;
                None
            },
        )
        .await;
        match sent {
            // A newer snapshot arrived first: push that one instead.
            None => continue,
            Some(Ok(())) => {
                pushed = Some(version);
                tracing::debug!(shard = shard.index, host_id, version, "policy pushed");
            }
            Some(Err(PushError::Closed)) => std::future::pending::<()>().await,
            Some(Err(PushError::Failed(e))) => {
                // An agent that refuses the stream (an older one) or resets it keeps polling
                // control; retrying the same version would only repeat the refusal.
                pushed = Some(version);
                tracing::debug!(shard = shard.index, host_id, version, error = %e, "policy push failed");
            }
        }
    }
}

/// Why one policy push did not complete.
enum PushError {
    /// The tunnel is going away or gone: no push will work on it again.
    Closed,
    /// This push failed (refused, reset, I/O).
    Failed(String),
}

/// One push: open, write the document, half-close, and wait for the agent's FIN (dropping the
/// stream earlier would reset it and could discard what the agent has not read yet).
async fn send_policy(tunnel: &Tunnel, document: &[u8]) -> Result<(), PushError> {
    use crate::tunnel::policy_push::POLICY_OPEN;
    let mut stream = match tunnel.open(POLICY_OPEN).await {
        Ok(stream) => stream,
        Err(OpenError::Closed(_) | OpenError::GoingAway) => return Err(PushError::Closed),
        Err(e) => return Err(PushError::Failed(e.to_string())),
    };
    let failed = |e: io::Error| PushError::Failed(e.to_string());
    stream.write_all(document).await.map_err(failed)?;
    stream.close().await.map_err(failed)?;
    let mut rest = [0u8; 64];
    loop {
        if stream.read(&mut rest).await.map_err(failed)? == 0 {
            return Ok(());
        }
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
    use jaunt_config::wire::agent_hello::{Heartbeat, RecordingNote, HEARTBEAT_OPEN};
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
                if let Some(note) = RecordingNote::parse(&incoming.header) {
                    note_recording(shard, host_id, incoming, note);
                } else if incoming.header != HEARTBEAT_OPEN {
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

/// An agent's `jaunt-recording/1` note: noted for the session's `session.end` (the stream is
/// accepted and dropped at once), or refused with the reason; counted either way.
fn note_recording(
    shard: &Shard,
    host_id: &str,
    incoming: tunnel::Incoming,
    note: Result<jaunt_config::wire::RecordingNote, DialError>,
) {
    use crate::server::metrics::RecordingNoteResult;
    use crate::server::shard::NoteRefusal;
    let (result, refusal) = match note {
        Err(e) => (
            RecordingNoteResult::Malformed,
            format!("bad recording note: {e}"),
        ),
        Ok(note) => match shard.note_recording(host_id, &note) {
            Ok(()) => (RecordingNoteResult::Noted, String::new()),
            Err(NoteRefusal::UnknownSession) => (
                RecordingNoteResult::UnknownSession,
                format!(
                    "no live recorded session {} of this agent on this engine",
                    note.session_id
                ),
            ),
            Err(NoteRefusal::TooMany) => (
                RecordingNoteResult::TooMany,
                format!("session {} has too many recordings noted", note.session_id),
            ),
        },
    };
    shard.metrics.recording_note(result);
    if result == RecordingNoteResult::Noted {
        // Nothing more travels on it: accepted means noted, and dropping it ends it.
        drop(incoming.accept());
    } else {
        tracing::debug!(shard = shard.index, host_id, reason = result.as_str(),
            error = %refusal, "recording note refused");
        incoming.refuse(&refusal);
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
