//! Per-shard counters and their Prometheus text rendering.
//!
//! # Why single-writer atomics
//!
//! Each shard owns one [`ShardMetrics`]; only that shard's thread ever writes it, and the diag
//! thread reads it when `/metrics` is scraped. A plain `Cell` would be cheapest but cannot be
//! read from another thread without `unsafe` (forbidden in this workspace) or a hand-off on every
//! scrape. So every field is an `AtomicU64` used as a *single-writer* cell: increments are a
//! `Relaxed` load plus a `Relaxed` store (two plain `mov`s on x86-64 and aarch64, no `lock`
//! prefix, no read-modify-write), which is correct only because there is one writer. The reader
//! may see a slightly stale or mixed view across fields, which Prometheus tolerates. The struct is
//! aligned to 128 bytes (two cache lines, the adjacent-line prefetch unit) so two shards'
//! counters never share a line; within a shard, lines are touched by the owner and, rarely, by a
//! scrape.
//!
//! Lives here: [`ShardMetrics`], the [`Refusal`] reasons with their stable labels, the route
//! kinds, the handshake histogram buckets, and [`render`]. Not here: serving HTTP (`diag.rs`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::route::{RejectReason, Route};

/// A counter or gauge written by one thread only (see the module doc).
#[derive(Debug, Default)]
pub struct Cell64(AtomicU64);

impl Cell64 {
    /// Adds `n` (wrapping). Only the owning shard may call this.
    #[inline]
    pub fn add(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(n), Ordering::Relaxed);
    }

    /// Subtracts `n`, saturating at 0. Only the owning shard may call this.
    #[inline]
    pub fn sub(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.saturating_sub(n), Ordering::Relaxed);
    }

    /// Overwrites the value. Only the owning shard may call this.
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// Reads the value (any thread).
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Route kinds with their own counters: [`Route::as_str`] labels except `reject` (refusals are
/// counted by reason instead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    /// `jaunt-tunnel`.
    Tunnel,
    /// `jaunt-control` pass-through.
    Control,
    /// `jaunt-ssh`.
    Ssh,
    /// `jaunt-postgres`.
    Postgres,
    /// `jaunt-tcp`.
    Tcp,
    /// Web app.
    App,
    /// Web UI/API.
    Web,
}

impl RouteKind {
    /// Every kind, in index order.
    pub const ALL: [RouteKind; 7] = [
        RouteKind::Tunnel,
        RouteKind::Control,
        RouteKind::Ssh,
        RouteKind::Postgres,
        RouteKind::Tcp,
        RouteKind::App,
        RouteKind::Web,
    ];

    /// The kind of a route; `None` for `Reject`.
    pub fn of(route: &Route<'_>) -> Option<RouteKind> {
        Some(match route {
            Route::Tunnel => RouteKind::Tunnel,
            Route::Control => RouteKind::Control,
            Route::Ssh => RouteKind::Ssh,
            Route::Postgres => RouteKind::Postgres,
            Route::Tcp => RouteKind::Tcp,
            Route::App { .. } | Route::AppDial => RouteKind::App,
            Route::Web => RouteKind::Web,
            Route::Reject(_) => return None,
        })
    }

    /// Stable metric label (same as [`Route::as_str`]).
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Tunnel => "tunnel",
            RouteKind::Control => "control",
            RouteKind::Ssh => "ssh",
            RouteKind::Postgres => "postgres",
            RouteKind::Tcp => "tcp",
            RouteKind::App => "app",
            RouteKind::Web => "web",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Byte direction, seen from the client of the public port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Bytes the client sent (ClientHello and TLS records included).
    FromClient,
    /// Bytes sent to the client.
    ToClient,
}

impl Direction {
    const ALL: [Direction; 2] = [Direction::FromClient, Direction::ToClient];

    /// Stable metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::FromClient => "from_client",
            Direction::ToClient => "to_client",
        }
    }
}

/// Why a connection was refused or cut off, with a stable metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The ClientHello was refused by the parser or the router.
    Hello(RejectReason),
    /// The shard already holds `max_connections_per_shard` connections.
    TooManyConnections,
    /// No complete ClientHello, TLS handshake or dial request within the handshake timeout.
    HandshakeTimeout,
    /// The TLS handshake failed (bad or missing client certificate, protocol error).
    TlsHandshake,
    /// The client certificate carries no usable Jaunt identity, or the wrong kind.
    BadIdentity,
    /// The identity is outside its validity window.
    IdentityExpired,
    /// The dial request was malformed, too large, or did not match the ALPN.
    BadDialRequest,
    /// The dial target is not registered.
    UnknownTarget,
    /// Roles or locks forbid the dial.
    Forbidden,
    /// No usable tunnel to the agent serving the target on this shard.
    AgentOffline,
    /// The agent refused the stream or did not answer in time (it could not reach the target).
    DialFailed,
    /// Control could not be reached for a pass-through.
    ControlUnreachable,
    /// An HTTP request head exceeded its bound or did not parse.
    BadHttpRequest,
    /// A spliced or keep-alive connection stayed silent for the idle timeout.
    IdleTimeout,
    /// Still open when the drain deadline of a shutdown passed.
    DrainDeadline,
    /// An agent's hello after the tunnel hello was malformed, too large or invalid.
    BadAgentHello,
}

/// Limit and error refusals, after the [`RejectReason`]s, in index order.
const OTHER_REFUSALS: [Refusal; 15] = [
    Refusal::TooManyConnections,
    Refusal::HandshakeTimeout,
    Refusal::TlsHandshake,
    Refusal::BadIdentity,
    Refusal::IdentityExpired,
    Refusal::BadDialRequest,
    Refusal::UnknownTarget,
    Refusal::Forbidden,
    Refusal::AgentOffline,
    Refusal::DialFailed,
    Refusal::ControlUnreachable,
    Refusal::BadHttpRequest,
    Refusal::IdleTimeout,
    Refusal::DrainDeadline,
    Refusal::BadAgentHello,
];

/// Number of refusal reasons.
pub const REFUSAL_COUNT: usize = RejectReason::ALL.len() + OTHER_REFUSALS.len();

impl Refusal {
    /// Every reason, in index order.
    pub fn all() -> impl Iterator<Item = Refusal> {
        RejectReason::ALL
            .into_iter()
            .map(Refusal::Hello)
            .chain(OTHER_REFUSALS)
    }

    /// Stable metric label; the ClientHello ones are [`RejectReason::as_str`].
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Hello(reason) => reason.as_str(),
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::TlsHandshake => "tls_handshake",
            Refusal::BadIdentity => "bad_identity",
            Refusal::IdentityExpired => "identity_expired",
            Refusal::BadDialRequest => "bad_dial_request",
            Refusal::UnknownTarget => "unknown_target",
            Refusal::Forbidden => "forbidden",
            Refusal::AgentOffline => "agent_offline",
            Refusal::DialFailed => "dial_failed",
            Refusal::ControlUnreachable => "control_unreachable",
            Refusal::BadHttpRequest => "bad_http_request",
            Refusal::IdleTimeout => "idle_timeout",
            Refusal::DrainDeadline => "drain_deadline",
            Refusal::BadAgentHello => "bad_agent_hello",
        }
    }

    /// Position in [`Refusal::all`].
    pub fn index(self) -> usize {
        match self {
            Refusal::Hello(reason) => reason.index(),
            other => {
                RejectReason::ALL.len()
                    + OTHER_REFUSALS.iter().position(|r| *r == other).unwrap_or(0)
            }
        }
    }
}

/// Why a user dial found no tunnel to splice into, with a stable metric label. Each is also a
/// refusal (`unknown_target`, `agent_offline` or `dial_failed`); this says where routing missed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DialMiss {
    /// No connected agent announces the target and the snapshot does not list it.
    UnknownTarget,
    /// The target is known, but its agent has no tunnel to this engine.
    AgentOffline,
    /// Its agent has tunnels to other shards of this engine only, and a cross-shard hop found
    /// none of them usable any more (counted as a missed hop too).
    OtherShard,
    /// This shard's tunnel was found but could not open a stream (closing, going away, full).
    TunnelUnavailable,
}

impl DialMiss {
    /// Every reason, in index order.
    pub const ALL: [DialMiss; 4] = [
        DialMiss::UnknownTarget,
        DialMiss::AgentOffline,
        DialMiss::OtherShard,
        DialMiss::TunnelUnavailable,
    ];

    /// Stable metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DialMiss::UnknownTarget => "unknown_target",
            DialMiss::AgentOffline => "agent_offline",
            DialMiss::OtherShard => "other_shard",
            DialMiss::TunnelUnavailable => "tunnel_unavailable",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How a cross-shard hop ended, with a stable metric label (`jaunt_cross_shard_hops_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HopResult {
    /// The stream was opened through another shard's tunnel.
    Ok,
    /// No other shard had a usable tunnel to the agent any more: refused with a retry hint.
    Miss,
    /// A shard with a tunnel was found, but the stream could not be opened there (the agent
    /// refused or did not answer, or that shard stopped).
    Error,
}

impl HopResult {
    /// Every result, in index order.
    pub const ALL: [HopResult; 3] = [HopResult::Ok, HopResult::Miss, HopResult::Error];

    /// Stable metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            HopResult::Ok => "ok",
            HopResult::Miss => "miss",
            HopResult::Error => "error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What became of an agent's recording note (`jaunt_recording_notes_total`): noted for the
/// session's `session.end`, or refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordingNoteResult {
    Noted,
    /// Not two well-formed ids.
    Malformed,
    /// No live recorded session of that id served by that agent on this shard.
    UnknownSession,
    /// The session has noted as many recordings as it may.
    TooMany,
}

impl RecordingNoteResult {
    /// Every result, in index order.
    pub const ALL: [RecordingNoteResult; 4] = [
        RecordingNoteResult::Noted,
        RecordingNoteResult::Malformed,
        RecordingNoteResult::UnknownSession,
        RecordingNoteResult::TooMany,
    ];

    /// Stable metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordingNoteResult::Noted => "noted",
            RecordingNoteResult::Malformed => "malformed",
            RecordingNoteResult::UnknownSession => "unknown_session",
            RecordingNoteResult::TooMany => "too_many",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Upper bounds (seconds) of the handshake histogram: from a local resumption (~0.1 ms) to the
/// default handshake timeout (10 s).
pub const HANDSHAKE_BUCKETS_SECONDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram over [`HANDSHAKE_BUCKETS_SECONDS`]: per-bucket (not cumulative) counts,
/// the last slot `+Inf`, and the sum in microseconds. Single writer, like every counter here.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [Cell64; HANDSHAKE_BUCKETS_SECONDS.len() + 1],
    sum_micros: Cell64,
}

impl Histogram {
    fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = HANDSHAKE_BUCKETS_SECONDS
            .iter()
            .position(|le| seconds <= *le)
            .unwrap_or(HANDSHAKE_BUCKETS_SECONDS.len());
        self.buckets[bucket].add(1);
        self.sum_micros
            .add(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    }

    /// Renders the shards' histograms `name` (picked by `of`) summed, in Prometheus text.
    fn render(
        out: &mut String,
        shards: &[std::sync::Arc<ShardMetrics>],
        name: &str,
        help: &str,
        of: impl Fn(&ShardMetrics) -> &Histogram,
    ) {
        family(out, name, "histogram", help);
        let mut cumulative = 0u64;
        for (b, le) in HANDSHAKE_BUCKETS_SECONDS.iter().enumerate() {
            cumulative += shards.iter().map(|s| of(s).buckets[b].get()).sum::<u64>();
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        cumulative += shards
            .iter()
            .map(|s| of(s).buckets[HANDSHAKE_BUCKETS_SECONDS.len()].get())
            .sum::<u64>();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum_micros: u64 = shards.iter().map(|s| of(s).sum_micros.get()).sum();
        let _ = writeln!(out, "{name}_sum {}", sum_micros as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// One shard's counters (see the module doc for the single-writer rule).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ShardMetrics {
    accepted: [Cell64; RouteKind::ALL.len()],
    active: Cell64,
    refused: [Cell64; REFUSAL_COUNT],
    handshake: Histogram,
    stream_open: Histogram,
    bytes: [[Cell64; 2]; RouteKind::ALL.len()],
    tunnels: Cell64,
    tunnels_duplicate: Cell64,
    tunnels_handed_over: Cell64,
    tunnels_replaced: Cell64,
    streams_open: Cell64,
    sessions_closed_lock: Cell64,
    sessions_closed_role: Cell64,
    dial_misses: [Cell64; DialMiss::ALL.len()],
    cross_shard_hops: [Cell64; HopResult::ALL.len()],
    recording_notes: [Cell64; RecordingNoteResult::ALL.len()],
    inventory_dropped: Cell64,
    audit_refused: Cell64,
    audit_dropped: Cell64,
    snapshot_version: Cell64,
    snapshot_applied: AtomicBool,
    listening: AtomicBool,
    handshake_admission_over_share: Cell64,
    handshakes_in_flight: Cell64,
    handshake_admission_waits: Cell64,
    handshake_admission_expired: Cell64,
    handshakes_abandoned: Cell64,
    /// TLS sessions established, by route: [full, resumed].
    tls_handshakes: [[Cell64; 2]; RouteKind::ALL.len()],
}

impl ShardMetrics {
    /// A connection was routed to `kind`.
    pub fn accepted(&self, kind: RouteKind) {
        self.accepted[kind.index()].add(1);
    }

    /// Active connections: +1.
    pub fn connection_opened(&self) {
        self.active.add(1);
    }

    /// Active connections: −1.
    pub fn connection_closed(&self) {
        self.active.sub(1);
    }

    /// Connections currently open on this shard.
    pub fn active(&self) -> u64 {
        self.active.get()
    }

    /// A connection was refused or cut off.
    pub fn refused(&self, reason: Refusal) {
        if let Some(cell) = self.refused.get(reason.index()) {
            cell.add(1);
        }
    }

    /// How many connections were refused for `reason`.
    pub fn refused_count(&self, reason: Refusal) -> u64 {
        self.refused.get(reason.index()).map_or(0, Cell64::get)
    }

    /// A handshake (accept to TLS established) took `elapsed`.
    pub fn handshake(&self, elapsed: Duration) {
        self.handshake.observe(elapsed);
    }

    /// Opening a user's stream to the agent (tunnel open or cross-shard hop, until the agent
    /// accepted or refused) took `elapsed`.
    pub fn stream_open(&self, elapsed: Duration) {
        self.stream_open.observe(elapsed);
    }

    /// `n` bytes moved on a connection of `kind`.
    pub fn bytes(&self, kind: RouteKind, direction: Direction, n: u64) {
        self.bytes[kind.index()][direction as usize].add(n);
    }

    /// Tunnels registered on this shard.
    pub fn set_tunnels(&self, n: u64) {
        self.tunnels.set(n);
    }

    /// Streams open through this shard's tunnels: +1.
    pub fn stream_opened(&self) {
        self.streams_open.add(1);
    }

    /// Streams open through this shard's tunnels: −1.
    pub fn stream_closed(&self) {
        self.streams_open.sub(1);
    }

    /// A live user session was closed because a lock in a new snapshot matches it.
    pub fn session_closed_by_lock(&self) {
        self.sessions_closed_lock.add(1);
    }

    /// A live user session was closed because the roles of a new snapshot no longer allow it.
    pub fn session_closed_by_role(&self) {
        self.sessions_closed_role.add(1);
    }

    /// Live user sessions closed because a role change took their access away.
    pub fn sessions_closed_by_role(&self) -> u64 {
        self.sessions_closed_role.get()
    }

    /// Live user sessions closed because a lock matched them.
    pub fn sessions_closed_by_lock(&self) -> u64 {
        self.sessions_closed_lock.get()
    }

    /// An agent closed a new tunnel cleanly instead of sending its hello: it already has one
    /// to this shard.
    pub fn tunnel_duplicate(&self) {
        self.tunnels_duplicate.add(1);
    }

    /// A tunnel connection accepted here was handed to the shard its ClientHello asked for.
    pub fn handed_over(&self) {
        self.tunnels_handed_over.add(1);
    }

    /// Tunnel connections handed to another shard.
    pub fn handed_over_count(&self) -> u64 {
        self.tunnels_handed_over.get()
    }

    /// A host registered a tunnel while it had one on this shard already; the older drains.
    pub fn tunnel_replaced(&self) {
        self.tunnels_replaced.add(1);
    }

    /// A user dial found no tunnel to splice into.
    pub fn dial_miss(&self, reason: DialMiss) {
        self.dial_misses[reason.index()].add(1);
    }

    /// How many dials missed for `reason`.
    pub fn dial_miss_count(&self, reason: DialMiss) -> u64 {
        self.dial_misses[reason.index()].get()
    }

    /// A user connection needed a tunnel owned by another shard: how the hop went.
    pub fn cross_shard_hop(&self, result: HopResult) {
        self.cross_shard_hops[result.index()].add(1);
    }

    /// How many hops ended with `result`.
    pub fn cross_shard_hop_count(&self, result: HopResult) -> u64 {
        self.cross_shard_hops[result.index()].get()
    }

    /// An agent noted a recording of a session (or tried to).
    pub fn recording_note(&self, result: RecordingNoteResult) {
        self.recording_notes[result.index()].add(1);
    }

    /// How many recording notes ended with `result`.
    pub fn recording_note_count(&self, result: RecordingNoteResult) -> u64 {
        self.recording_notes[result.index()].get()
    }

    /// An inventory event for control was dropped (its channel full or closed).
    pub fn inventory_dropped(&self) {
        self.inventory_dropped.add(1);
    }

    /// A session was refused because the audit queue was full.
    pub fn audit_refused(&self) {
        self.audit_refused.add(1);
    }

    /// An audit event was dropped (its queue full or closed, not refusing).
    pub fn audit_dropped(&self) {
        self.audit_dropped.add(1);
    }

    /// A snapshot was applied.
    pub fn snapshot_applied(&self, version: u64) {
        self.snapshot_version.set(version);
        self.snapshot_applied.store(true, Ordering::Release);
    }

    /// The version of the applied snapshot, if any.
    pub fn snapshot_version(&self) -> Option<u64> {
        self.snapshot_applied
            .load(Ordering::Acquire)
            .then(|| self.snapshot_version.get())
    }

    /// The listener is bound (`true`) or closed (`false`).
    pub fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::Release);
    }

    /// Whether the listener is bound.
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// Connections between accept and an established TLS session (`admission.rs`).
    pub fn set_handshakes_in_flight(&self, n: u64) {
        self.handshakes_in_flight.set(n);
    }

    /// See [`ShardMetrics::set_handshakes_in_flight`].
    pub fn handshakes_in_flight(&self) -> u64 {
        self.handshakes_in_flight.get()
    }

    /// A connection was not counted against the handshake bound: its peer address held its
    /// share of the slots already (`admission.rs`).
    pub fn handshake_admission_over_share(&self) {
        self.handshake_admission_over_share.add(1);
    }

    /// See [`ShardMetrics::handshake_admission_over_share`].
    pub fn handshake_admission_over_share_count(&self) -> u64 {
        self.handshake_admission_over_share.get()
    }

    /// The accept loop paused at the handshake bound.
    pub fn handshake_admission_wait(&self) {
        self.handshake_admission_waits.add(1);
    }

    /// How often the accept loop paused at the handshake bound.
    pub fn handshake_admission_waits(&self) -> u64 {
        self.handshake_admission_waits.get()
    }

    /// A handshake slot was released by the admission hold, its handshake not done.
    pub fn handshake_admission_expired(&self) {
        self.handshake_admission_expired.add(1);
    }

    /// A client had closed its connection before its TLS handshake started (it waited in the
    /// listen backlog past its own timeout); no handshake work was spent on it.
    pub fn handshake_abandoned(&self) {
        self.handshakes_abandoned.add(1);
    }

    /// How many handshake slots the admission hold released.
    pub fn handshake_admission_expired_count(&self) -> u64 {
        self.handshake_admission_expired.get()
    }

    /// A TLS session was established on a connection of `kind`: `resumed` (a session ticket)
    /// or full.
    pub fn tls_handshake(&self, kind: RouteKind, resumed: bool) {
        self.tls_handshakes[kind.index()][usize::from(resumed)].add(1);
    }

    /// TLS sessions established on `kind`, resumed or full.
    pub fn tls_handshake_count(&self, kind: RouteKind, resumed: bool) -> u64 {
        self.tls_handshakes[kind.index()][usize::from(resumed)].get()
    }
}

/// Renders every shard's counters in the Prometheus text exposition format (version 0.0.4).
pub fn render(shards: &[std::sync::Arc<ShardMetrics>]) -> String {
    let mut out = String::with_capacity(8 * 1024);
    // `write!` into a String cannot fail; the results are ignored on purpose.
    family(
        &mut out,
        "jaunt_connections_accepted_total",
        "counter",
        "Connections routed, by shard and route.",
    );
    for (i, shard) in shards.iter().enumerate() {
        for kind in RouteKind::ALL {
            let v = shard.accepted[kind.index()].get();
            let _ = writeln!(
                out,
                "jaunt_connections_accepted_total{{shard=\"{i}\",route=\"{}\"}} {v}",
                kind.as_str()
            );
        }
    }
    family(
        &mut out,
        "jaunt_connections_active",
        "gauge",
        "Connections open, by shard.",
    );
    for (i, shard) in shards.iter().enumerate() {
        let _ = writeln!(
            out,
            "jaunt_connections_active{{shard=\"{i}\"}} {}",
            shard.active.get()
        );
    }
    family(
        &mut out,
        "jaunt_connections_refused_total",
        "counter",
        "Connections refused or cut off, by shard and reason.",
    );
    for (i, shard) in shards.iter().enumerate() {
        for reason in Refusal::all() {
            let _ = writeln!(
                out,
                "jaunt_connections_refused_total{{shard=\"{i}\",reason=\"{}\"}} {}",
                reason.as_str(),
                shard.refused_count(reason)
            );
        }
    }
    Histogram::render(
        &mut out,
        shards,
        "jaunt_handshake_seconds",
        "Time from accept to an established TLS session, for routes that terminate TLS.",
        |s| &s.handshake,
    );
    family(
        &mut out,
        "jaunt_tls_handshakes_total",
        "counter",
        "TLS sessions established on the public port, by shard, route and kind (full, or \
         resumed with a session ticket).",
    );
    for (i, shard) in shards.iter().enumerate() {
        for kind in RouteKind::ALL {
            if kind == RouteKind::Control {
                continue;
            }
            for (resumed, label) in [(false, "full"), (true, "resumed")] {
                let _ = writeln!(
                    out,
                    "jaunt_tls_handshakes_total{{shard=\"{i}\",route=\"{}\",kind=\"{label}\"}} {}",
                    kind.as_str(),
                    shard.tls_handshake_count(kind, resumed)
                );
            }
        }
    }
    per_shard(
        &mut out,
        shards,
        "jaunt_handshake_admission_over_share_total",
        "counter",
        "Connections not counted against the handshake bound because their peer address (an \
         IPv4 address or an IPv6 /64) already held its share, an eighth of the bound.",
        |s| s.handshake_admission_over_share.get(),
    );
    per_shard(
        &mut out,
        shards,
        "jaunt_handshakes_in_flight",
        "gauge",
        "Connections between accept and an established TLS session (bounded per shard by \
         engine.max_handshakes_per_shard; more wait in the listen backlog).",
        |s| s.handshakes_in_flight.get(),
    );
    per_shard(
        &mut out,
        shards,
        "jaunt_handshake_admission_waits_total",
        "counter",
        "Times the shard stopped accepting because its handshakes in flight were at the bound.",
        |s| s.handshake_admission_waits.get(),
    );
    per_shard(
        &mut out,
        shards,
        "jaunt_handshake_admission_expired_total",
        "counter",
        "Handshakes that stopped counting against the bound because they took longer than the \
         admission hold (a stalled or very slow peer).",
        |s| s.handshake_admission_expired.get(),
    );
    per_shard(
        &mut out,
        shards,
        "jaunt_handshakes_abandoned_total",
        "counter",
        "Connections whose client had closed them before their TLS handshake started (they \
         waited in the listen backlog past the client's timeout); no handshake work spent.",
        |s| s.handshakes_abandoned.get(),
    );
    Histogram::render(
        &mut out,
        shards,
        "jaunt_stream_open_seconds",
        "Time to open a user's stream to the agent (tunnel or cross-shard hop) until the agent \
         accepted or refused it.",
        |s| &s.stream_open,
    );
    family(
        &mut out,
        "jaunt_bytes_total",
        "counter",
        "Bytes moved, by route and direction (seen from the client).",
    );
    for kind in RouteKind::ALL {
        for direction in Direction::ALL {
            let v: u64 = shards
                .iter()
                .map(|s| s.bytes[kind.index()][direction as usize].get())
                .sum();
            let _ = writeln!(
                out,
                "jaunt_bytes_total{{route=\"{}\",direction=\"{}\"}} {v}",
                kind.as_str(),
                direction.as_str()
            );
        }
    }
    per_shard(
        &mut out,
        shards,
        "jaunt_tunnels",
        "gauge",
        "Agent tunnels registered, by shard.",
        |s| s.tunnels.get(),
    );
    per_shard(
        &mut out,
        shards,
        "jaunt_tunnels_duplicate_total",
        "counter",
        "New agent tunnels the agent closed at once because it already had one to that shard.",
        |s| s.tunnels_duplicate.get(),
    );
    per_shard(
        &mut out,
        shards,
        "jaunt_tunnels_handed_over_total",
        "counter",
        "Agent tunnel connections this shard accepted and handed to the shard their ClientHello \
         asked for (the agent covers N shards with N connections).",
        |s| s.tunnels_handed_over.get(),
    );
    per_shard(
        &mut out,
        shards,
        "jaunt_tunnels_replaced_total",
        "counter",
        "Agent tunnels drained because the same host registered a newer one on the shard.",
        |s| s.tunnels_replaced.get(),
    );
    per_shard(
        &mut out,
        shards,
        "jaunt_streams_open",
        "gauge",
        "User streams open through tunnels, by shard.",
        |s| s.streams_open.get(),
    );
    family(
        &mut out,
        "jaunt_sessions_closed_total",
        "counter",
        "Live user sessions the engine closed, by shard and reason (lock: a lock in a new \
         snapshot matches the session; role: the roles of a new snapshot no longer allow it).",
    );
    for (i, shard) in shards.iter().enumerate() {
        let _ = writeln!(
            out,
            "jaunt_sessions_closed_total{{shard=\"{i}\",reason=\"lock\"}} {}",
            shard.sessions_closed_lock.get()
        );
        let _ = writeln!(
            out,
            "jaunt_sessions_closed_total{{shard=\"{i}\",reason=\"role\"}} {}",
            shard.sessions_closed_role.get()
        );
    }
    family(
        &mut out,
        "jaunt_dial_misses_total",
        "counter",
        "User dials that found no tunnel to splice into, by shard and reason.",
    );
    for (i, shard) in shards.iter().enumerate() {
        for reason in DialMiss::ALL {
            let _ = writeln!(
                out,
                "jaunt_dial_misses_total{{shard=\"{i}\",reason=\"{}\"}} {}",
                reason.as_str(),
                shard.dial_miss_count(reason)
            );
        }
    }
    family(
        &mut out,
        "jaunt_cross_shard_hops_total",
        "counter",
        "User connections whose agent tunnel is on another shard, by the shard that terminated \
         them: served through the other shard (ok), no usable tunnel there any more (miss, \
         refused with a retry hint), or the stream failed to open there (error).",
    );
    for (i, shard) in shards.iter().enumerate() {
        for result in HopResult::ALL {
            let _ = writeln!(
                out,
                "jaunt_cross_shard_hops_total{{shard=\"{i}\",result=\"{}\"}} {}",
                result.as_str(),
                shard.cross_shard_hop_count(result)
            );
        }
    }
    family(
        &mut out,
        "jaunt_recording_notes_total",
        "counter",
        "Recording ids agents named for the recorded sessions they terminate (for session.end), \
         by shard and result: noted, or refused as malformed, for an unknown session (ended, \
         another agent's, or served through another shard) or as too many.",
    );
    for (i, shard) in shards.iter().enumerate() {
        for result in RecordingNoteResult::ALL {
            let _ = writeln!(
                out,
                "jaunt_recording_notes_total{{shard=\"{i}\",result=\"{}\"}} {}",
                result.as_str(),
                shard.recording_note_count(result)
            );
        }
    }
    per_shard(
        &mut out,
        shards,
        "jaunt_inventory_events_dropped_total",
        "counter",
        "Inventory events for control dropped because their channel was full or closed.",
        |s| s.inventory_dropped.get(),
    );
    per_shard(
        &mut out,
        shards,
        "jaunt_audit_refused_total",
        "counter",
        "Sessions refused because the audit queue was full.",
        |s| s.audit_refused.get(),
    );
    per_shard(
        &mut out,
        shards,
        "jaunt_audit_dropped_total",
        "counter",
        "Audit events dropped because their queue was full or closed.",
        |s| s.audit_dropped.get(),
    );
    family(
        &mut out,
        "jaunt_snapshot_version",
        "gauge",
        "Version of the applied snapshot, by shard (0 before the first).",
    );
    for (i, shard) in shards.iter().enumerate() {
        let _ = writeln!(
            out,
            "jaunt_snapshot_version{{shard=\"{i}\"}} {}",
            shard.snapshot_version().unwrap_or(0)
        );
    }
    out
}

/// A family with one sample per shard.
fn per_shard(
    out: &mut String,
    shards: &[std::sync::Arc<ShardMetrics>],
    name: &str,
    kind: &str,
    help: &str,
    value: impl Fn(&ShardMetrics) -> u64,
) {
    family(out, name, kind, help);
    for (i, shard) in shards.iter().enumerate() {
        let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", value(shard));
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn refusal_indexes_are_dense_and_labels_unique() {
        let all: Vec<Refusal> = Refusal::all().collect();
        assert_eq!(all.len(), REFUSAL_COUNT);
        for (i, reason) in all.iter().enumerate() {
            assert_eq!(reason.index(), i, "{reason:?}");
        }
        let mut labels: Vec<&str> = all.iter().map(|r| r.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), REFUSAL_COUNT);
    }

    #[test]
    fn route_kind_labels_match_route() {
        for (kind, route) in RouteKind::ALL.iter().zip([
            Route::Tunnel,
            Route::Control,
            Route::Ssh,
            Route::Postgres,
            Route::Tcp,
            Route::App { name: "x" },
            Route::Web,
        ]) {
            assert_eq!(RouteKind::of(&route), Some(*kind));
            assert_eq!(kind.as_str(), route.as_str());
        }
        assert_eq!(RouteKind::of(&Route::Reject(RejectReason::NotTls)), None);
    }

    #[test]
    fn render_shows_every_family_and_cumulative_buckets() {
        let a = Arc::new(ShardMetrics::default());
        let b = Arc::new(ShardMetrics::default());
        a.accepted(RouteKind::Web);
        a.refused(Refusal::Hello(RejectReason::UnknownAlpn));
        b.refused(Refusal::Hello(RejectReason::UnknownAlpn));
        b.refused(Refusal::HandshakeTimeout);
        a.handshake(Duration::from_micros(300));
        b.handshake(Duration::from_millis(3));
        b.handshake(Duration::from_secs(60));
        a.bytes(RouteKind::Control, Direction::FromClient, 517);
        b.bytes(RouteKind::Control, Direction::FromClient, 3);
        a.connection_opened();
        a.connection_opened();
        a.connection_closed();
        b.snapshot_applied(7);
        a.dial_miss(DialMiss::OtherShard);
        b.cross_shard_hop(HopResult::Miss);
        a.cross_shard_hop(HopResult::Ok);
        a.cross_shard_hop(HopResult::Ok);
        b.tunnel_replaced();
        b.recording_note(RecordingNoteResult::Malformed);
        let text = render(&[a, b]);
        for line in [
            "jaunt_connections_accepted_total{shard=\"0\",route=\"web\"} 1",
            "jaunt_connections_active{shard=\"0\"} 1",
            "jaunt_connections_refused_total{shard=\"0\",reason=\"unknown_alpn\"} 1",
            "jaunt_connections_refused_total{shard=\"1\",reason=\"unknown_alpn\"} 1",
            "jaunt_connections_refused_total{shard=\"1\",reason=\"handshake_timeout\"} 1",
            "jaunt_handshake_seconds_bucket{le=\"0.0005\"} 1",
            "jaunt_handshake_seconds_bucket{le=\"0.005\"} 2",
            "jaunt_handshake_seconds_bucket{le=\"10\"} 2",
            "jaunt_handshake_seconds_bucket{le=\"+Inf\"} 3",
            "jaunt_handshake_seconds_count 3",
            "jaunt_bytes_total{route=\"control\",direction=\"from_client\"} 520",
            "jaunt_tunnels{shard=\"1\"} 0",
            "jaunt_streams_open{shard=\"0\"} 0",
            "jaunt_cross_shard_hops_total{shard=\"1\",result=\"miss\"} 1",
            "jaunt_cross_shard_hops_total{shard=\"0\",result=\"ok\"} 2",
            "jaunt_cross_shard_hops_total{shard=\"0\",result=\"error\"} 0",
            "jaunt_recording_notes_total{shard=\"1\",result=\"malformed\"} 1",
            "jaunt_dial_misses_total{shard=\"0\",reason=\"other_shard\"} 1",
            "jaunt_tunnels_duplicate_total{shard=\"0\"} 0",
            "jaunt_tunnels_replaced_total{shard=\"1\"} 1",
            "jaunt_inventory_events_dropped_total{shard=\"0\"} 0",
            "jaunt_snapshot_version{shard=\"0\"} 0",
            "jaunt_snapshot_version{shard=\"1\"} 7",
            "# TYPE jaunt_handshake_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn shard_metrics_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<ShardMetrics>(), 128);
        assert_eq!(std::mem::size_of::<ShardMetrics>() % 128, 0);
    }
}
