//! The engine server: shards, listeners, ClientHello routing, control pass-through, the web
//! ping, refusals, metrics. This file holds the public API `jaunt start` uses ([`Engine::start`],
//! [`EngineConfig`], [`EngineHandle`], [`EngineError`]) and the boot sequence; the parts live in
//! their own files:
//!
//! - `shard.rs`: one glommio executor per shard, its `SO_REUSEPORT` listener, mailbox, tunnel
//!   table, dial routing and drain;
//! - `table.rs`: a shard's routing table (tunnels by host id, announced resources by name);
//! - `hop.rs`: cross-shard hops (a user stream served through another shard's tunnel, over
//!   one bounded channel per shard pair);
//! - `inventory.rs`: the engine-wide directory of connected agents, the [`InventoryEvent`]s
//!   control receives and the [`AgentInventory`] view;
//! - `conn/`: one connection from ClientHello to close (the routing table's actions):
//!   `mod.rs` (acceptance, routing, control pass-through, TLS termination, web), `agent.rs`
//!   (agent tunnels and heartbeats), `session.rs` (user sessions: the pure session decision,
//!   then open, answer, splice);
//! - `io.rs`: prefix replay, byte counting, splice with idle timeout, deadlines;
//! - `http.rs`: the web route's HTTP/1.1; `web.rs`: the [`WebBackend`] the web UI plugs in;
//!   `diag.rs`: `/metrics`, `/healthz`, `/readyz`;
//! - `audit.rs`: the [`AuditEvent`]s control's audit log receives (sessions, denials);
//! - `authorize.rs`: the one authorization decision; `snapshot.rs`: what it reads;
//! - `metrics.rs`: per-shard single-writer counters and the Prometheus text;
//! - `tls.rs`: the three TLS configurations and their per-shard copies.
//!
//! The wire formats (dial request/response, tunnel hello, stream header, agent hello) are the
//! config crate's `jaunt_config::wire`, shared with the client and the agent.
//!
//! Agents and routing: an agent's tunnel starts with the engine's `TunnelHello` and the agent's
//! [`AgentHello`](jaunt_config::wire::agent_hello::AgentHello) (who it is, what it serves); the shard
//! registers the tunnel under the host id of the agent's certificate, one tunnel per agent per
//! shard. While the tunnel lives the agent heartbeats its resources on a stream it opens
//! ([`Heartbeat`](jaunt_config::wire::agent_hello::Heartbeat)): a changed set re-indexes that
//! shard's table, updates the directory unless a newer heartbeat came through another shard,
//! and is reported to control. A user dial resolves `target name → host id → tunnel` on its own
//! shard first; see `shard.rs`.
//!
//! Limits ([`EngineLimits`]: connections per shard, handshake and idle timeouts, tunnel timers)
//! can change at run time ([`EngineHandle::reload_limits`], SIGHUP): each shard gets them
//! through its mailbox and new connections use them; live ones keep theirs.
//!
//! Boot: validate the config; start shard 0 and wait until it listens (if `listen_addr` has port
//! 0, its port becomes every other shard's); start the others the same way; start the snapshot
//! feeder thread (one `Receiver` in, one mailbox per shard out) and the diag thread. Any failure
//! stops what was started and returns an [`EngineError`] naming what to change.

mod admission;
pub mod audit;
mod authorize;
mod conn;
mod diag;
pub(crate) mod hop;
mod http;
mod inventory;
mod io;
pub mod listen;
pub mod metrics;
mod shard;
pub mod snapshot;
mod table;
pub mod tickets;
mod tls;
pub mod web;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use audit::{AuditEvent, AuditOverflow};
pub use authorize::{authorize, Denied, DeniedKind};
pub use conn::SSH_ANSWER_TIMEOUT;
pub use inventory::{AgentInventory, InventoryEvent};
pub use shard::LiveSessionInfo;
pub use snapshot::{Lock, Snapshot, Target, Targets};
pub use tickets::{TicketSecret, TicketSecretError};
pub use tls::{provider as tls_provider, TlsBuildError, TlsConfigs};
pub use web::{
    AppAccess, TerminalGrant, WebBackend, WebRequest, WebResponse, WebUi, APP_SESSION_COOKIE,
};

use diag::{Diag, DiagState};
use inventory::Directory;
use metrics::ShardMetrics;
use shard::{Command, MailboxSender, ShardBoot};

/// Default handshake timeout: a ClientHello, a TLS handshake and a dial request take a few round
/// trips; 10 s covers a slow mobile link and still frees a slowloris's slot quickly.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default idle timeout of spliced connections and tunnels: long enough for an idle shell over
/// lunch, short enough that abandoned half-open connections do not pile up. Clients with
/// keepalives (`ssh -o ServerAliveInterval`, the agent's pings) never reach it.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Default connection bound per shard, the same as the config file's
/// (`jaunt_config::file::DEFAULT_MAX_CONNECTIONS_PER_SHARD`; control's tests hold them equal).
/// An idle tunneled session costs about 18 KiB (BENCHMARKS.md), so a full shard of idle
/// sessions is about 360 MiB; buffers grow only while a connection moves bytes. On a 48-core
/// host, 48 full shards leave a few of the unit's 1M file descriptors for the rest.
pub const DEFAULT_MAX_CONNECTIONS_PER_SHARD: usize = 20_000;

/// Default bound of the TLS handshakes in flight per shard (`admission.rs`): beyond it a shard
/// stops accepting and new connections wait in the listen backlog. At about 0.3 ms of CPU per
/// full mTLS handshake, a full shard's handshakes finish within a few tens of milliseconds of
/// CPU, and it is far above what a shard completes per round trip of a distant agent.
pub const DEFAULT_MAX_HANDSHAKES_PER_SHARD: usize = 128;

/// Default memory glommio registers per shard for its io_uring buffers. TCP does not use them
/// (only file I/O does), and glommio locks three times this much per executor, so keep it at
/// glommio's minimum.
pub const DEFAULT_IO_MEMORY: usize = 64 << 10;

pub use jaunt_config::wire::MAX_SHARDS;

/// How long [`EngineHandle::stop_accepting`] waits for the shards that got a marker before it
/// sends more (the kernel may have hashed two markers to the same shard).
const MARKER_ROUND: Duration = Duration::from_millis(25);

/// How long [`EngineHandle::reload_tls`] waits for every shard to acknowledge.
pub const COMMAND_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The engine's runtime configuration (validated by [`Engine::start`]).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The public port (every shard binds it with `SO_REUSEPORT`; port 0 picks one).
    pub listen_addr: SocketAddr,
    /// The cluster's public host name (a port is allowed and ignored for routing); SNI equal to
    /// it is the web route, `<app>.<public_host>` an app.
    pub public_host: String,
    /// Cluster name for the web ping until a snapshot names it.
    pub cluster_name: String,
    /// Number of shards (glommio executors), 1..=[`MAX_SHARDS`].
    pub shards: usize,
    /// Pin shard `i` to the `i`-th online CPU when there are enough (else run unpinned).
    pub pin_shards: bool,
    /// io_uring buffer memory per shard (see [`DEFAULT_IO_MEMORY`]).
    pub io_memory: usize,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None` for nowhere.
    pub diag_addr: Option<SocketAddr>,
    /// Where `jaunt-control` connections are passed through to.
    pub control_addr: SocketAddr,
    /// Accept to established TLS session (and dial request) bound.
    pub handshake_timeout: Duration,
    /// Silence bound of spliced connections and tunnels.
    pub idle_timeout: Duration,
    /// Connections one shard holds at most; more are refused at accept.
    pub max_connections_per_shard: usize,
    /// Connections one shard holds between accept and an established TLS session; while at
    /// the bound it accepts no more (they wait in the listen backlog). See `admission.rs`.
    pub max_handshakes_per_shard: usize,
    /// Heartbeats of agent tunnels: a PING after `keepalive_interval` without a byte from the
    /// agent, and the tunnel closed (and reported down) after `dead_peer_timeout` of silence.
    pub tunnel_timers: crate::mux::Config,
    /// Where shards report agent tunnels coming and going (`None`: nowhere). Sent with
    /// `try_send`: a full or closed channel drops the event and counts it
    /// (`jaunt_inventory_events_dropped_total`); [`EngineHandle::inventory`] is always current.
    pub inventory: Option<crossbeam_channel::Sender<InventoryEvent>>,
    /// Where shards report session starts and ends and authorization refusals (`None`:
    /// nowhere). Sent with `try_send`; what a full queue does is `audit_overflow`.
    pub audit: Option<crossbeam_channel::Sender<AuditEvent>>,
    /// A full audit queue refuses new sessions (`Reject`, counted in
    /// `jaunt_audit_refused_total`) or drops events (`Drop`, `jaunt_audit_dropped_total`).
    pub audit_overflow: AuditOverflow,
    /// What answers requests on the public host beyond the ping and the JWK Set (`None`: 404).
    pub web: Option<WebUi>,
}

/// The part of [`EngineConfig`] a running engine can change ([`EngineHandle::reload_limits`],
/// on SIGHUP): new connections and tunnels use the new values, live ones keep the ones they
/// started with (a lowered connection bound refuses new connections until enough old ones end;
/// it closes none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineLimits {
    /// See [`EngineConfig::handshake_timeout`].
    pub handshake_timeout: Duration,
    /// See [`EngineConfig::idle_timeout`].
    pub idle_timeout: Duration,
    /// See [`EngineConfig::max_connections_per_shard`].
    pub max_connections_per_shard: usize,
    /// See [`EngineConfig::tunnel_timers`].
    pub tunnel_timers: crate::mux::Config,
}

impl EngineLimits {
    /// The checks [`Engine::start`] makes on these values.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |key: &'static str, message: String| Err(EngineError::Config { key, message });
        if self.handshake_timeout.is_zero() {
            return bad("engine.handshake_timeout", "must be above zero".into());
        }
        if self.idle_timeout.is_zero() {
            return bad("engine.idle_timeout", "must be above zero".into());
        }
        let timers = &self.tunnel_timers;
        if timers.keepalive_interval.is_zero()
            || timers.dead_peer_timeout <= timers.keepalive_interval
        {
            return bad(
                "engine.tunnel_timers",
                format!(
                    "the dead-peer timeout ({:?}) must exceed the keepalive interval ({:?}), \
                     which must be above zero",
                    timers.dead_peer_timeout, timers.keepalive_interval
                ),
            );
        }
        if self.max_connections_per_shard == 0 {
            return bad(
                "engine.max_connections_per_shard",
                "must be above zero".into(),
            );
        }
        Ok(())
    }
}

impl EngineConfig {
    /// The limits part of this configuration.
    pub fn limits(&self) -> EngineLimits {
        EngineLimits {
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_timeout,
            max_connections_per_shard: self.max_connections_per_shard,
            tunnel_timers: self.tunnel_timers,
        }
    }

    /// A configuration with the defaults above and one shard per available CPU.
    pub fn new(
        listen_addr: SocketAddr,
        public_host: &str,
        control_addr: SocketAddr,
    ) -> EngineConfig {
        EngineConfig {
            listen_addr,
            public_host: public_host.to_owned(),
            cluster_name: String::new(),
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pin_shards: true,
            io_memory: DEFAULT_IO_MEMORY,
            diag_addr: None,
            control_addr,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections_per_shard: DEFAULT_MAX_CONNECTIONS_PER_SHARD,
            max_handshakes_per_shard: DEFAULT_MAX_HANDSHAKES_PER_SHARD,
            tunnel_timers: crate::mux::Config::default(),
            inventory: None,
            audit: None,
            audit_overflow: AuditOverflow::Reject,
            web: None,
        }
    }

    fn validate(&self) -> Result<(), EngineError> {
        let bad = |key: &'static str, message: String| Err(EngineError::Config { key, message });
        if self.shards == 0 || self.shards > MAX_SHARDS {
            return bad(
                "engine.shards",
                format!("must be 1..={MAX_SHARDS}, not {}", self.shards),
            );
        }
        if self.max_handshakes_per_shard == 0 {
            return bad(
                "engine.max_handshakes_per_shard",
                "must be above zero".into(),
            );
        }
        if self.public_host.trim().is_empty() {
            return bad("public_addr", "must name the cluster's public host".into());
        }
        self.limits().validate()
    }
}

/// Why the engine could not start or a command failed. [`EngineError::culprit`] says whether
/// the operator (configuration, machine limits) or the engine itself is at fault.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A configuration value is out of range.
    #[error("{key}: {message}")]
    Config {
        /// The config key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// glommio could not set up a shard's io_uring executor.
    #[error(
        "shard {shard}: cannot start its io_uring executor ({cause}). Each shard needs io_uring \
         (kernel 5.8+, not disabled by `sysctl kernel.io_uring_disabled` or a seccomp profile) and \
         at least 512 KiB of locked memory plus 3 x engine.io_memory, unless the process has \
         CAP_IPC_LOCK: raise the limit (`ulimit -l`, systemd `LimitMEMLOCK=`, Docker \
         `--ulimit memlock=`), or lower `engine.shards` or `engine.io_memory`"
    )]
    Runtime {
        /// The shard.
        shard: usize,
        /// glommio's message.
        cause: String,
    },
    /// A shard could not bind the public port.
    #[error("shard {shard}: cannot listen on {addr}: {source}")]
    Bind {
        /// The shard.
        shard: usize,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The diag endpoint could not bind.
    #[error("diag endpoint: cannot listen on {addr}: {source}")]
    DiagBind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start thread {name}: {source}")]
    Thread {
        /// The thread name.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A shard thread ended on its own (a bug).
    #[error("shard {shard} stopped unexpectedly")]
    ShardDied {
        /// The shard.
        shard: usize,
    },
    /// A shard did not acknowledge a command in time.
    #[error("shard {shard} did not acknowledge within {timeout:?}")]
    ShardUnresponsive {
        /// The shard.
        shard: usize,
        /// How long we waited.
        timeout: Duration,
    },
}

impl EngineError {
    fn runtime(shard: usize, error: &glommio::GlommioError<()>) -> EngineError {
        EngineError::Runtime {
            shard,
            cause: error.to_string(),
        }
    }

    /// Who is to blame: the operator (configuration, limits, a busy port) or the engine (a
    /// bug).
    pub fn culprit(&self) -> Culprit {
        match self {
            EngineError::Config { .. }
            | EngineError::Runtime { .. }
            | EngineError::Bind { .. }
            | EngineError::DiagBind { .. }
            | EngineError::Thread { .. } => Culprit::Operator,
            EngineError::ShardDied { .. } | EngineError::ShardUnresponsive { .. } => {
                Culprit::Engine
            }
        }
    }

    /// Whether trying again unchanged may succeed (a port being released, a busy shard, a
    /// transient thread limit).
    pub fn retry_helps(&self) -> bool {
        matches!(
            self,
            EngineError::Bind { .. }
                | EngineError::DiagBind { .. }
                | EngineError::Thread { .. }
                | EngineError::ShardUnresponsive { .. }
        )
    }
}

/// Who an [`EngineError`] blames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Culprit {
    /// The configuration or the machine: change something, then start again.
    Operator,
    /// The engine itself: a bug.
    Engine,
}

/// What a shutdown did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections still open at the drain deadline, closed then.
    pub aborted_connections: u64,
}

/// Entry point.
pub struct Engine;

impl Engine {
    /// Starts the shards, the snapshot feeder and the diag endpoint. Returns once every shard
    /// listens; readiness (`/readyz`, [`EngineHandle::ready`]) also waits for the first snapshot
    /// from `snapshots` to be applied everywhere.
    pub fn start(
        config: EngineConfig,
        tls: TlsConfigs,
        snapshots: crossbeam_channel::Receiver<Arc<Snapshot>>,
    ) -> Result<EngineHandle, EngineError> {
        Engine::start_with(config, tls, snapshots, Listeners::Bind)
    }

    /// [`Engine::start`] with the public port's sockets as `listeners` says: bound here, or
    /// inherited from the process this one replaces (`jaunt start --takeover`), in which case
    /// the shards accept only after [`EngineHandle::start_accepting`].
    pub fn start_with(
        config: EngineConfig,
        tls: TlsConfigs,
        snapshots: crossbeam_channel::Receiver<Arc<Snapshot>>,
        listeners: Listeners,
    ) -> Result<EngineHandle, EngineError> {
        config.validate()?;
        let paused = matches!(listeners, Listeners::Inherited { .. });
        let mut inherited_diag = None;
        let sockets = match listeners {
            Listeners::Bind => bind_shards(&config)?,
            Listeners::Inherited {
                shards: sockets,
                diag,
            } => {
                inherited_diag = diag;
                if sockets.len() != config.shards {
                    return Err(EngineError::Config {
                        key: "engine.shards",
                        message: format!(
                            "the running engine has {} shards and this one {}: a takeover needs \
                             the same engine.shards",
                            sockets.len(),
                            config.shards
                        ),
                    });
                }
                sockets
            }
        };
        let exported = sockets
            .iter()
            .map(std::net::TcpListener::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| EngineError::Bind {
                shard: 0,
                addr: config.listen_addr,
                source,
            })?;
        let metrics: Vec<Arc<ShardMetrics>> = (0..config.shards)
            .map(|_| Arc::new(ShardMetrics::default()))
            .collect();
        let cpus = shard_cpus(&config);
        let directory = Arc::new(Directory::default());
        let recording_notes = Arc::new(shard::RecordingNotes::default());
        let mut handle = EngineHandle {
            local_addr: config.listen_addr,
            directory: Arc::clone(&directory),
            shards: Vec::with_capacity(config.shards),
            state: Arc::new(DiagState {
                shards: metrics.clone(),
                draining: std::sync::atomic::AtomicBool::new(false),
            }),
            diag: std::sync::Mutex::new(None),
            pending_diag: std::sync::Mutex::new(None),
            feeder: None,
            stopped: false,
            exported,
        };
        let mut sockets = sockets.into_iter();
        // One channel per ordered shard pair for cross-shard hops, made before any shard runs.
        let mut hop_boots = hop::mesh(config.shards).into_iter();
        for (index, shard_metrics) in metrics.iter().enumerate() {
            let (report_tx, report_rx) = std::sync::mpsc::channel();
            let (mailbox_tx, mailbox) = shard::mailbox();
            let thread = shard::spawn(ShardBoot {
                index,
                shard_count: config.shards,
                config: config.clone(),
                listener: sockets.next(),
                paused,
                placement: cpus.as_ref().and_then(|cpus| cpus.get(index).copied()),
                tls: tls.clone(),
                metrics: Arc::clone(shard_metrics),
                directory: Arc::clone(&directory),
                recording_notes: Arc::clone(&recording_notes),
                mailbox,
                hops: hop_boots.next(),
                report: report_tx,
            })?;
            handle.shards.push(ShardHandle {
                mailbox: mailbox_tx,
                thread: Some(thread),
            });
            match report_rx.recv() {
                Ok(Ok(addr)) => handle.local_addr = addr,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(EngineError::ShardDied { shard: index }),
            }
        }
        let mailboxes: Vec<MailboxSender> =
            handle.shards.iter().map(|s| s.mailbox.clone()).collect();
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let feeder = std::thread::Builder::new()
            .name("jaunt-snapshots".into())
            .spawn(move || feed_snapshots(&snapshots, &stop_rx, &mailboxes))
            .map_err(|source| EngineError::Thread {
                name: "jaunt-snapshots".into(),
                source,
            })?;
        handle.feeder = Some((stop_tx, feeder));
        match (config.diag_addr, inherited_diag) {
            (Some(addr), None) if !paused => {
                *lock(&handle.diag) = Some(Diag::start(addr, Arc::clone(&handle.state))?);
            }
            // Inherited shards but no diag socket (the replaced process had none): bound when
            // accepting starts.
            (Some(addr), None) => *lock(&handle.pending_diag) = Some((addr, None)),
            (Some(addr), Some(listener)) => {
                *lock(&handle.pending_diag) = Some((addr, Some(listener)));
            }
            (None, _) => {}
        }

        tracing::info!(
            addr = %handle.local_addr,
            shards = config.shards,
            diag = ?handle.diag_addr(),
            "engine listening"
        );
        Ok(handle)
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where the engine's listening sockets come from.
#[derive(Debug)]
pub enum Listeners {
    /// Bind `listen_addr` once per shard (`SO_REUSEPORT`; port 0: the first one's port).
    Bind,
    /// One listening socket per shard (and the diag endpoint's, if it has one), handed over by
    /// the process this one replaces; nothing is accepted before
    /// [`EngineHandle::start_accepting`].
    Inherited {
        shards: Vec<std::net::TcpListener>,
        diag: Option<std::net::TcpListener>,
    },
}

/// One `SO_REUSEPORT` socket per shard on `listen_addr`.
fn bind_shards(config: &EngineConfig) -> Result<Vec<std::net::TcpListener>, EngineError> {
    let mut addr = config.listen_addr;
    let mut sockets = Vec::with_capacity(config.shards);
    for shard in 0..config.shards {
        let socket = listen::bind_reuseport(addr).map_err(|source| EngineError::Bind {
            shard,
            addr,
            source,
        })?;
        addr = socket.local_addr().map_err(|source| EngineError::Bind {
            shard,
            addr,
            source,
        })?;
        sockets.push(socket);
    }
    Ok(sockets)
}

/// CPUs to pin shards to, or `None` to run them unpinned.
fn shard_cpus(config: &EngineConfig) -> Option<Vec<usize>> {
    if !config.pin_shards {
        return None;
    }
    let online = glommio::CpuSet::online().ok()?;
    let cpus: Vec<usize> = online.iter().map(|location| location.cpu).collect();
    (cpus.len() >= config.shards).then_some(cpus)
}

/// The feeder thread: every snapshot from control goes to every shard's mailbox (the one apply
/// path). Ends when control drops its sender or the engine stops.
fn feed_snapshots(
    snapshots: &crossbeam_channel::Receiver<Arc<Snapshot>>,
    stop: &crossbeam_channel::Receiver<()>,
    mailboxes: &[MailboxSender],
) {
    loop {
        crossbeam_channel::select! {
            recv(snapshots) -> snapshot => match snapshot {
                Ok(snapshot) => {
                    for mailbox in mailboxes {
                        mailbox.send(Command::Snapshot(Arc::clone(&snapshot)));
                    }
                }
                Err(_) => return,
            },
            recv(stop) -> _ => return,
        }
    }
}

/// The engine's live user sessions, asked of every shard (see [`EngineHandle::sessions`]).
#[derive(Clone)]
pub struct EngineSessions {
    mailboxes: Vec<MailboxSender>,
}

impl EngineSessions {
    /// Every shard's live sessions, oldest first; shards that do not answer within
    /// [`COMMAND_ACK_TIMEOUT`] are left out.
    pub fn list(&self) -> Vec<LiveSessionInfo> {
        let (tx, rx) = crossbeam_channel::bounded(self.mailboxes.len());
        let asked = self
            .mailboxes
            .iter()
            .filter(|m| m.send(Command::Sessions(tx.clone())))
            .count();
        drop(tx);
        let deadline = Instant::now() + COMMAND_ACK_TIMEOUT;
        let mut all = Vec::new();
        for _ in 0..asked {
            match rx.recv_deadline(deadline) {
                Ok(sessions) => all.extend(sessions),
                Err(_) => break,
            }
        }
        all.sort_by(|a, b| (a.started, &a.id).cmp(&(b.started, &b.id)));
        all
    }

    /// Ends the live session `id`, killed by user `by` (a web terminal's page shows who);
    /// `false` if no shard has it. The session's connection closes as soon as its shard runs
    /// (the same path a lock takes), and its `session.end` follows.
    pub fn end(&self, id: &str, by: &str) -> bool {
        let (tx, rx) = crossbeam_channel::bounded(self.mailboxes.len());
        let asked = self
            .mailboxes
            .iter()
            .filter(|m| {
                m.send(Command::EndSession(
                    id.to_owned(),
                    by.to_owned(),
                    tx.clone(),
                ))
            })
            .count();
        drop(tx);
        let deadline = Instant::now() + COMMAND_ACK_TIMEOUT;
        let mut found = false;
        for _ in 0..asked {
            match rx.recv_deadline(deadline) {
                Ok(ended) => found |= ended,
                Err(_) => break,
            }
        }
        found
    }
}

struct ShardHandle {
    mailbox: MailboxSender,
    thread: Option<JoinHandle<u64>>,
}

/// A running engine. Dropping it shuts the engine down without a drain period.
pub struct EngineHandle {
    local_addr: SocketAddr,
    shards: Vec<ShardHandle>,
    state: Arc<DiagState>,
    directory: Arc<Directory>,
    /// Stopped by a takeover ([`EngineHandle::stop_accepting`]) or the shutdown.
    diag: std::sync::Mutex<Option<Diag>>,
    /// A takeover's diag endpoint, started with the accept loops: its address, and the socket
    /// handed over if there was one.
    pending_diag: std::sync::Mutex<Option<(SocketAddr, Option<std::net::TcpListener>)>>,
    feeder: Option<(crossbeam_channel::Sender<()>, JoinHandle<()>)>,
    stopped: bool,
    /// Copies of the shards' listening sockets, for a takeover ([`EngineHandle::listeners`]);
    /// dropped when the engine stops, so that the port closes.
    exported: Vec<std::net::TcpListener>,
}

impl EngineHandle {
    /// The address every shard listens on (the chosen port when `listen_addr` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The diag endpoint's address, if one is configured.
    pub fn diag_addr(&self) -> Option<SocketAddr> {
        lock(&self.diag)
            .as_ref()
            .map(Diag::addr)
            .or_else(|| lock(&self.pending_diag).as_ref().map(|(addr, _)| *addr))
    }

    /// A copy of the diag endpoint's listening socket, for the process that replaces this one.
    pub fn diag_listener(&self) -> Option<std::os::fd::OwnedFd> {
        lock(&self.diag).as_ref().and_then(Diag::listener)
    }

    /// Every shard listens and has applied a snapshot, and no shutdown has begun (what
    /// `/readyz` answers).
    pub fn ready(&self) -> bool {
        self.state.ready()
    }

    /// The applied snapshot version of each shard (`None` before its first).
    pub fn snapshot_versions(&self) -> Vec<Option<u64>> {
        self.state
            .shards
            .iter()
            .map(|s| s.snapshot_version())
            .collect()
    }

    /// The agents connected now, by host id, merged across shards (which shards each has a
    /// tunnel to, what it announced on its latest one). Takes the directory's lock once; for
    /// `jaunt get nodes`, `jaunt status` and the like, not for a hot loop.
    pub fn inventory(&self) -> Vec<AgentInventory> {
        self.directory.inventory()
    }

    /// The `/metrics` text.
    pub fn metrics_text(&self) -> String {
        metrics::render(&self.state.shards)
    }

    /// What `jaunt sessions ls` and `kill` use: a handle on the shards' live sessions that
    /// control can keep (cheap to clone, usable from any thread).
    pub fn sessions(&self) -> EngineSessions {
        EngineSessions {
            mailboxes: self.shards.iter().map(|s| s.mailbox.clone()).collect(),
        }
    }

    /// SIGHUP: new handshakes use `tls`; live connections keep the certificates they started
    /// with. Returns once every shard has switched.
    pub fn reload_tls(&self, tls: TlsConfigs) -> Result<(), EngineError> {
        self.command_all(|ack| Command::ReloadTls(tls.clone(), ack))
    }

    /// SIGHUP: new connections and tunnels use `limits` (validated first, like at start);
    /// live ones are not dropped. Returns once every shard has switched.
    pub fn reload_limits(&self, limits: EngineLimits) -> Result<(), EngineError> {
        limits.validate()?;
        self.command_all(|ack| Command::ReloadLimits(limits, ack))
    }

    /// Sends every shard the command `make` builds around an acknowledgement sender, and waits
    /// (at most [`COMMAND_ACK_TIMEOUT`]) until every shard has acknowledged.
    fn command_all(
        &self,
        make: impl Fn(crossbeam_channel::Sender<usize>) -> Command,
    ) -> Result<(), EngineError> {
        let (ack_tx, ack_rx) = crossbeam_channel::bounded(self.shards.len());
        for (index, shard) in self.shards.iter().enumerate() {
            if !shard.mailbox.send(make(ack_tx.clone())) {
                return Err(EngineError::ShardDied { shard: index });
            }
        }
        let deadline = Instant::now() + COMMAND_ACK_TIMEOUT;
        let mut acked = vec![false; self.shards.len()];
        for _ in 0..self.shards.len() {
            match ack_rx.recv_deadline(deadline) {
                Ok(index) => {
                    if let Some(slot) = acked.get_mut(index) {
                        *slot = true;
                    }
                }
                Err(_) => {
                    let shard = acked.iter().position(|a| !a).unwrap_or(0);
                    return Err(EngineError::ShardUnresponsive {
                        shard,
                        timeout: COMMAND_ACK_TIMEOUT,
                    });
                }
            }
        }
        Ok(())
    }

    /// The socket inodes of the shards' listeners, in shard order (those `fstat` can read), for
    /// the next daemon on the data directory after a crash (control's `exclusive.rs`).
    pub fn listener_inodes(&self) -> Vec<u64> {
        self.exported
            .iter()
            .filter_map(|l| rustix::fs::fstat(l).ok())
            .map(|st| st.st_ino)
            .collect()
    }

    /// Copies of the shards' listening sockets, in shard order, for the process that replaces
    /// this one (`jaunt start --takeover`).
    pub fn listeners(&self) -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
        self.exported
            .iter()
            .map(|l| l.try_clone().map(std::os::fd::OwnedFd::from))
            .collect()
    }

    /// Starts the shards' accept loops (an engine started with inherited listeners). Until
    /// `agent_grace` has passed, a dial whose agent has no tunnel here yet waits for it (the
    /// agents are moving over from the replaced process).
    pub fn start_accepting(&self, agent_grace: Duration) -> Result<(), EngineError> {
        if let Some((addr, listener)) = lock(&self.pending_diag).take() {
            let diag = match listener {
                Some(listener) => Diag::serve_on(listener, addr, Arc::clone(&self.state))?,
                None => Diag::start(addr, Arc::clone(&self.state))?,
            };
            *lock(&self.diag) = Some(diag);
        }
        let until = Some(Instant::now() + agent_grace);
        self.command_all(|ack| Command::StartAccepting {
            agent_grace_until: until,
            ack,
        })
    }

    /// Stops accepting without leaving a connection behind in the sockets' queues: each shard
    /// stops at a marker connection (see `listen.rs`), having served what it accepted before;
    /// what arrives after waits for the process that takes the sockets over. Returns once
    /// every shard has stopped, or an error after `timeout` (those shards go on accepting).
    pub fn stop_accepting(&self, timeout: Duration) -> Result<(), EngineError> {
        let markers = Arc::new(listen::Markers::default());
        let (stopped_tx, stopped_rx) = crossbeam_channel::unbounded();
        self.command_all(|ack| Command::StopAccepting {
            markers: Arc::clone(&markers),
            stopped: stopped_tx.clone(),
            ack,
        })?;
        drop(stopped_tx);
        let target = listen::reach_addr(self.local_addr);
        let deadline = Instant::now() + timeout;
        let mut stopped = vec![false; self.shards.len()];
        // Open until every shard stopped: a marker closed earlier could reach a shard as EOF
        // before it is accepted, which is still a marker, but keep them simple.
        let mut held = Vec::new();
        while stopped.iter().any(|s| !s) {
            if Instant::now() >= deadline {
                let shard = stopped.iter().position(|s| !s).unwrap_or(0);
                return Err(EngineError::ShardUnresponsive { shard, timeout });
            }
            // The kernel picks the shard of each marker: send one per shard still accepting,
            // then collect who stopped.
            for _ in 0..stopped.iter().filter(|s| !**s).count() {
                match markers.connect(target) {
                    Ok(stream) => held.push(stream),
                    Err(e) => tracing::warn!(%target, error = %e, "stop marker: cannot connect"),
                }
            }
            let round = (Instant::now() + MARKER_ROUND).min(deadline);
            while let Ok(index) = stopped_rx.recv_deadline(round) {
                if let Some(slot) = stopped.get_mut(index) {
                    *slot = true;
                }
                if stopped.iter().all(|s| *s) {
                    break;
                }
            }
        }
        tracing::info!(markers = held.len(), "every shard stopped accepting");
        if let Some(diag) = lock(&self.diag).as_mut() {
            if let Err(e) = diag.stop_at_marker() {
                tracing::warn!(error = %e, "diag endpoint: cannot stop at a marker");
            }
        }
        Ok(())
    }

    /// SIGTERM: stop accepting at once (the port closes), close agent tunnels, let open
    /// connections finish until `drain_timeout`, then close the rest. Returns when every shard
    /// has stopped.
    pub fn shutdown(mut self, drain_timeout: Duration) -> Result<ShutdownReport, EngineError> {
        self.stop(drain_timeout)
    }

    fn stop(&mut self, drain_timeout: Duration) -> Result<ShutdownReport, EngineError> {
        if self.stopped {
            return Ok(ShutdownReport::default());
        }
        self.stopped = true;
        self.exported.clear();
        self.state.draining.store(true, Ordering::Release);
        let drain_deadline = Instant::now() + drain_timeout;
        for shard in &self.shards {
            shard.mailbox.send(Command::Shutdown { drain_deadline });
        }
        let mut report = ShutdownReport::default();
        let mut result = Ok(());
        for (index, shard) in self.shards.iter_mut().enumerate() {
            if let Some(thread) = shard.thread.take() {
                match thread.join() {
                    Ok(aborted) => report.aborted_connections += aborted,
                    Err(_) => result = Err(EngineError::ShardDied { shard: index }),
                }
            }
        }
        if let Some((stop, feeder)) = self.feeder.take() {
            drop(stop);
            let _ = feeder.join();
        }
        if let Some(mut diag) = lock(&self.diag).take() {
            diag.stop();
        }
        tracing::info!(aborted = report.aborted_connections, "engine stopped");
        result.map(|()| report)
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        let _ = self.stop(Duration::ZERO);
    }
}

/// Fuzz entry point (`fuzz/`, target `http_head`): the web route's reading of a request head
/// on top of the shared tokenizer. Not an API.
#[doc(hidden)]
pub fn fuzz_http_head(data: &[u8]) {
    if let Ok(Some((head, used))) = http::parse_head(data) {
        debug_assert!(used <= data.len() && used <= http::MAX_REQUEST_HEAD_BYTES);
        debug_assert!(!(head.chunked && head.keep_alive));
    }
}
