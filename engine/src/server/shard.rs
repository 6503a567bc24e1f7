//! One shard: a glommio executor on its own thread with its own `SO_REUSEPORT` listener, the
//! connections it accepted, its tunnel table, its copy of the snapshot and TLS acceptors, and
//! its mailbox from the engine handle.
//!
//! Shared nothing: everything in [`Shard`] is `Rc`/`Cell`/`RefCell`, touched only by the shard's
//! thread. The only cross-thread paths are
//! - the [`Mailbox`] (snapshots, TLS and limit reloads, shutdown), a crossbeam channel plus a
//!   waker slot: the sender pushes and wakes the mailbox task with a foreign wake (glommio
//!   forwards it to the executor through its eventfd), so applying a snapshot costs no polling
//!   and never blocks I/O;
//!   the slot's `Mutex` is taken once per command, never per connection;
//! - [`ShardMetrics`], single-writer atomics read by the diag thread (see `metrics.rs`).
//!
//! Snapshot and TLS are swapped between connections: a connection clones the shard's current
//! `Rc` once, when it needs it, and keeps that view for its lifetime; a swap replaces the shard's
//! `Rc` and the old view is freed when its last connection ends.
//!
//! Routing a user dial ([`Shard::resolve`]) looks, in order, at this shard's tunnels (the
//! resources their agents announced, `table.rs`), the snapshot's `targets` (control's
//! registrations, for targets no connected agent announces), and the engine-wide directory
//! (`inventory.rs`, only on a miss: is the agent connected to another shard?). Registering or
//! removing a tunnel, and a heartbeat that changes what a tunnel announces
//! ([`Shard::heartbeat`]), update the directory and report an [`InventoryEvent`] to control.
//!
//! Lives here: boot ([`spawn`]), the accept loop with the per-shard connection limit, the apply
//! path for commands (a newer snapshot's locks end the live user sessions they match: see
//! [`Shard::session_started`]), the tunnel table and routing, and drain. Per-connection logic is in
//! `conn/`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};

use jaunt_config::identity::Identity;

use crate::server::admission::{Admission, Slot};
use crate::server::authorize::{matching_lock, revoked};
use crate::server::hop::{self, HopBoot, Hops};
use crate::server::inventory::{Directory, HeartbeatApplied, InventoryEvent};
use crate::server::listen::Markers;
use crate::server::metrics::{Refusal, ShardMetrics};
use crate::server::snapshot::{Snapshot, Target};
use crate::server::table::{TunnelEntry, TunnelTable};
use crate::server::tls::{ShardTls, TlsConfigs};
use crate::server::{conn, EngineConfig, EngineError, EngineLimits};
use crate::tunnel::Tunnel;
use jaunt_config::wire::agent_hello::{AgentHello, ResourceKind};
use jaunt_config::wire::dial::{DialKind, DialRequest};

/// How long a shard waits, after aborting the connections left at the drain deadline, for their
/// tasks to finish before it stops its executor anyway (dropping whatever is left).
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// Back-off after a failed `accept` (e.g. `EMFILE`), so a shard out of descriptors does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(20);

/// How often a drain looks whether the connections still dialing are done.
const SETTLE_POLL: Duration = Duration::from_millis(5);

// ---------------------------------------------------------------------------------------------
// Mailbox

/// What the engine handle tells a shard.
pub(crate) enum Command {
    /// Apply this snapshot (boot and live updates alike).
    Snapshot(Arc<Snapshot>),
    /// New handshakes use these configurations; acknowledge with the shard index.
    ReloadTls(TlsConfigs, crossbeam_channel::Sender<usize>),
    /// New connections use these limits (SIGHUP); acknowledge with the shard index.
    ReloadLimits(EngineLimits, crossbeam_channel::Sender<usize>),
    /// Stop accepting, drain until the deadline, stop.
    Shutdown { drain_deadline: Instant },
    /// Report this shard's live user sessions.
    Sessions(crossbeam_channel::Sender<Vec<LiveSessionInfo>>),
    /// End the live session with this id, killed by the named user; answer whether this shard
    /// had it.
    EndSession(String, String, crossbeam_channel::Sender<bool>),
    /// Start accepting (a shard booted paused, `jaunt start --takeover`); until
    /// `agent_grace_until`, a dial whose agent has no tunnel yet waits for it. Acknowledge with
    /// the shard index.
    StartAccepting {
        agent_grace_until: Option<Instant>,
        ack: crossbeam_channel::Sender<usize>,
    },
    /// Stop accepting at the first marker connection (`listen.rs`); report the shard index on
    /// `stopped` then. Acknowledge with the shard index once the markers are watched for.
    StopAccepting {
        markers: Arc<Markers>,
        stopped: crossbeam_channel::Sender<usize>,
        ack: crossbeam_channel::Sender<usize>,
    },
}

/// A live user session as `jaunt sessions ls` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LiveSessionInfo {
    /// The session id of its audit events.
    pub id: String,
    pub user: String,
    pub kind: DialKind,
    /// The node, database or app name.
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_user: Option<String>,
    /// Unix seconds.
    pub started: u64,
    /// Whether the roles ask for the session to be recorded (an SSH session the agent records).
    pub recorded: bool,
    /// An observer's session (`jaunt join`): the id of the session it watches. `sessions kill`
    /// and locks on the observer end it like any other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observing: Option<String>,
}

#[derive(Default)]
struct WakerSlot(Mutex<Option<Waker>>);

impl WakerSlot {
    fn take(&self) -> Option<Waker> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn set(&self, waker: &Waker) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            Some(w) if w.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
    }
}

/// The engine side of a shard's mailbox.
#[derive(Clone)]
pub(crate) struct MailboxSender {
    /// `None` only inside `drop`.
    tx: Option<crossbeam_channel::Sender<Command>>,
    waker: Arc<WakerSlot>,
}

impl MailboxSender {
    /// Queues `command` and wakes the shard. `false` if the shard is gone.
    pub fn send(&self, command: Command) -> bool {
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(command).is_ok());
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
        sent
    }
}

impl Drop for MailboxSender {
    fn drop(&mut self) {
        // Disconnect first, then wake: the shard must see the disconnection when it runs.
        drop(self.tx.take());
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// The shard side of a mailbox.
pub(crate) struct Mailbox {
    rx: crossbeam_channel::Receiver<Command>,
    waker: Arc<WakerSlot>,
}

/// A connected mailbox pair.
pub(crate) fn mailbox() -> (MailboxSender, Mailbox) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let waker = Arc::new(WakerSlot::default());
    (
        MailboxSender {
            tx: Some(tx),
            waker: Arc::clone(&waker),
        },
        Mailbox { rx, waker },
    )
}

impl Mailbox {
    /// The next command; `None` once every sender is gone.
    fn recv(&self) -> impl Future<Output = Option<Command>> + '_ {
        std::future::poll_fn(move |cx| {
            match self.rx.try_recv() {
                Ok(command) => return Poll::Ready(Some(command)),
                Err(crossbeam_channel::TryRecvError::Disconnected) => return Poll::Ready(None),
                Err(crossbeam_channel::TryRecvError::Empty) => {}
            }
            self.waker.set(cx.waker());
            // A command sent between the first check and registering the waker found no waker.
            match self.rx.try_recv() {
                Ok(command) => Poll::Ready(Some(command)),
                Err(crossbeam_channel::TryRecvError::Disconnected) => Poll::Ready(None),
                Err(crossbeam_channel::TryRecvError::Empty) => Poll::Pending,
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Signal

/// A one-shot, shard-local broadcast: once fired, every [`Signal::wait`] completes. Waiters hold
/// one slot each (replaced, not appended, when re-polled), so a long-lived waiter polled many
/// times costs one entry.
#[derive(Default)]
pub(crate) struct Signal {
    fired: Cell<bool>,
    next_key: Cell<u64>,
    waiters: RefCell<HashMap<u64, Waker>>,
    /// Why it fired, when the firer said ([`Signal::fire_because`]).
    reason: RefCell<Option<String>>,
}

impl Signal {
    /// Fires, noting why (the first reason given stays): a live session's end tells its user
    /// who or what ended it where the stream can say so (the web terminal's close frame).
    pub fn fire_because(&self, why: String) {
        if !self.fired.get() {
            *self.reason.borrow_mut() = Some(why);
        }
        self.fire();
    }

    /// Why it fired, if it was said.
    pub fn reason(&self) -> Option<String> {
        self.reason.borrow().clone()
    }

    pub fn fire(&self) {
        if self.fired.replace(true) {
            return;
        }
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for (_, waker) in waiters {
            waker.wake();
        }
    }

    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }

    pub fn wait(&self) -> SignalWait<'_> {
        SignalWait {
            signal: self,
            key: None,
        }
    }
}

pub(crate) struct SignalWait<'a> {
    signal: &'a Signal,
    key: Option<u64>,
}

impl Future for SignalWait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.signal.fired.get() {
            return Poll::Ready(());
        }
        let key = *this.key.get_or_insert_with(|| {
            let key = this.signal.next_key.get();
            this.signal.next_key.set(key.wrapping_add(1));
            key
        });
        let mut waiters = this.signal.waiters.borrow_mut();
        match waiters.get_mut(&key) {
            Some(w) if w.will_wake(cx.waker()) => {}
            Some(w) => *w = cx.waker().clone(),
            None => {
                waiters.insert(key, cx.waker().clone());
            }
        }
        Poll::Pending
    }
}

impl Drop for SignalWait<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            if let Ok(mut waiters) = self.signal.waiters.try_borrow_mut() {
                waiters.remove(&key);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shard state

/// What [`Shard::register_tunnel`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Registered {
    /// The host had no tunnel on this shard.
    New,
    /// The host's previous tunnel on this shard was replaced and is draining.
    Replaced,
    /// The shard is draining: the tunnel was told to go away, not registered.
    Draining,
}

/// Where a dial target lives, as routing found it.
#[derive(Debug)]
pub(crate) struct Resolved<T = Tunnel> {
    /// The agent serving it, with its labels for authorization.
    pub target: Target,
    /// This shard's usable tunnel to that agent, if it has one.
    pub tunnel: Option<T>,
    /// When this shard has none: the other shards the agent has a tunnel to.
    pub other_shards: Vec<usize>,
}

/// A spliced user session, as the shard knows it to end it when a lock comes to match it.
struct LiveSession {
    /// The session id of its audit events.
    session_id: String,
    /// Unix seconds.
    started: u64,
    identity: Identity,
    request: DialRequest,
    /// The resolved target's labels.
    labels: BTreeMap<String, String>,
    /// Fired to end the session: its splice is raced against it.
    end: Rc<Signal>,
    /// The roles ask for it to be recorded (the agent records it): the recording ids its agent
    /// notes, for its `session.end` (also in [`RecordingNotes`] while the session lives).
    recordings: Option<Arc<NotedRecordings>>,
}

/// Most recording ids noted for one session (one per session channel; the agent bounds its
/// channels far below this).
pub(crate) const MAX_NOTED_RECORDINGS: usize = 1024;

/// The recordings the agent named for one recorded session (`jaunt-recording/1` notes, see
/// `jaunt_config::wire::agent_hello`), shared by the engine's [`RecordingNotes`], which notes
/// them, and the session's audit, which names them in `session.end`.
#[derive(Debug)]
pub(crate) struct NotedRecordings {
    /// The agent serving the session: notes from another agent's tunnel are refused.
    host_id: String,
    ids: Mutex<Vec<String>>,
}

impl NotedRecordings {
    pub(crate) fn new(host_id: &str) -> NotedRecordings {
        NotedRecordings {
            host_id: host_id.to_owned(),
            ids: Mutex::new(Vec::new()),
        }
    }

    /// The ids noted so far, in the order they came.
    pub(crate) fn ids(&self) -> Vec<String> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Engine-wide: the live recorded sessions' [`NotedRecordings`] by session id, so that a note
/// reaches its session whichever shard's tunnel carried it (a session served through a
/// cross-shard hop lives on the user's shard, its stream on the tunnel's). Locked once when a
/// recorded session starts, once when it ends and once per note: never on the data path nor
/// for unrecorded sessions.
#[derive(Debug, Default)]
pub(crate) struct RecordingNotes {
    by_session: Mutex<HashMap<String, Arc<NotedRecordings>>>,
}

impl RecordingNotes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<NotedRecordings>>> {
        self.by_session.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why a recording note was not noted (its metric label is [`RecordingNoteResult`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NoteRefusal {
    /// No live recorded session of that id served by this agent on this engine (ended
    /// already, unrecorded, or another agent's).
    UnknownSession,
    /// [`MAX_NOTED_RECORDINGS`] already.
    TooMany,
}

/// One shard's state, owned by its thread.
pub(crate) struct Shard {
    pub index: usize,
    pub shard_count: usize,
    /// The configuration the shard started with. Its limits are the boot values: what the
    /// shard enforces now is [`Shard::limits`].
    pub config: EngineConfig,
    /// The limits in force (replaced by [`Command::ReloadLimits`]); each connection reads them
    /// when it needs them, so a reload applies to new connections and leaves live ones be.
    limits: Cell<EngineLimits>,
    pub metrics: Arc<ShardMetrics>,
    #[allow(
        clippy::redundant_allocation,
        reason = "the Rc is the point: connections clone a shard-local, non-atomic count instead \
                  of the Arc's count, which every shard shares"
    )]
    snapshot: RefCell<Rc<Arc<Snapshot>>>,
    /// Fired (and replaced) when a newer snapshot is applied: the tunnels' policy pushers wait
    /// on it.
    snapshot_changed: RefCell<Rc<Signal>>,
    tls: RefCell<Rc<ShardTls>>,
    /// Live tunnels by host id (the connection tasks that carry them run their drivers).
    tunnels: RefCell<TunnelTable<Tunnel>>,
    /// Engine-wide: which agent is connected to which shard.
    directory: Arc<Directory>,
    /// Engine-wide: the recorded sessions' noted recordings.
    recording_notes: Arc<RecordingNotes>,
    /// Cross-shard hops: streams to agents whose tunnel is on another shard (`hop.rs`).
    pub hops: Rc<Hops>,
    /// A dropped inventory event was logged (once per shard; the metric counts every drop).
    inventory_drop_logged: Cell<bool>,
    next_conn_id: Cell<u64>,
    /// Live user sessions by connection id (one per connection, so bounded by the connection
    /// limit).
    sessions: RefCell<HashMap<u64, LiveSession>>,
    /// Fired when a shutdown begins: tunnels close, keep-alive connections finish their request.
    pub draining: Signal,
    /// Fired at the drain deadline: every connection still open ends now.
    pub abort: Signal,
    /// Fired when the last connection closes while draining.
    all_closed: Signal,
    /// After a takeover, until then a dial whose agent has no tunnel yet waits for one.
    agent_grace_until: Cell<Option<Instant>>,
    /// Connections accepted that have not yet opened their session's stream (or been routed
    /// elsewhere): a drain lets them dial before it sends agents away.
    dialing: Cell<usize>,
    /// Set by [`Command::StopAccepting`]: the markers to stop at, and where to say so.
    stop_at: RefCell<Option<(Arc<Markers>, crossbeam_channel::Sender<usize>)>>,
    /// The bound of handshakes in flight (`admission.rs`).
    admission: Rc<Admission>,
}

impl Shard {
    fn new(boot: &ShardBoot) -> Shard {
        Shard {
            index: boot.index,
            shard_count: boot.shard_count,
            config: boot.config.clone(),
            limits: Cell::new(boot.config.limits()),
            metrics: Arc::clone(&boot.metrics),
            snapshot: RefCell::new(Rc::new(Arc::new(Snapshot::default()))),
            snapshot_changed: RefCell::new(Rc::new(Signal::default())),
            tls: RefCell::new(Rc::new(ShardTls::new(&boot.tls))),
            tunnels: RefCell::new(TunnelTable::default()),
            directory: Arc::clone(&boot.directory),
            recording_notes: Arc::clone(&boot.recording_notes),
            hops: Rc::new(Hops::new(boot.shard_count)),
            inventory_drop_logged: Cell::new(false),
            next_conn_id: Cell::new(0),
            sessions: RefCell::new(HashMap::new()),
            draining: Signal::default(),
            abort: Signal::default(),
            all_closed: Signal::default(),
            agent_grace_until: Cell::new(None),
            dialing: Cell::new(0),
            stop_at: RefCell::new(None),
            admission: Admission::new(
                boot.config.max_handshakes_per_shard,
                crate::server::admission::ADMISSION_HOLD,
                Arc::clone(&boot.metrics),
            ),
        }
    }

    /// A handshake slot for a connection accepted or adopted now (`admission.rs`).
    pub(crate) fn handshake_slot(&self, peer: Option<std::net::IpAddr>) -> Slot {
        self.admission.take(peer)
    }

    /// Whether dials should still wait for agents to (re)connect (see
    /// [`Command::StartAccepting`]).
    pub fn awaiting_agents(&self) -> Option<Instant> {
        self.agent_grace_until
            .get()
            .filter(|until| Instant::now() < *until)
    }

    /// Counts a connection as dialing until the returned token is dropped.
    pub(crate) fn dialing(self: &Rc<Shard>) -> Dialing {
        self.dialing.set(self.dialing.get() + 1);
        Dialing {
            shard: Rc::clone(self),
        }
    }

    /// The current snapshot view (a non-atomic `Rc` clone).
    #[allow(clippy::redundant_allocation, reason = "see the `snapshot` field")]
    pub fn snapshot(&self) -> Rc<Arc<Snapshot>> {
        Rc::clone(&self.snapshot.borrow())
    }

    /// Fires once a snapshot newer than the current one is applied. Take it before reading
    /// [`Shard::snapshot`], so no change slips in between.
    pub(crate) fn snapshot_changed(&self) -> Rc<Signal> {
        Rc::clone(&self.snapshot_changed.borrow())
    }

    /// The current TLS acceptors.
    pub fn tls(&self) -> Rc<ShardTls> {
        Rc::clone(&self.tls.borrow())
    }

    /// The apply path, for boot and live updates alike: newer versions replace the current
    /// view, older ones are ignored.
    /// A newer version also ends the live sessions one of its locks matches.
    pub fn apply_snapshot(&self, snapshot: Arc<Snapshot>) {
        let current = self.metrics.snapshot_version();
        if let Some(current) = current {
            if snapshot.version < current {
                tracing::warn!(
                    shard = self.index,
                    current,
                    offered = snapshot.version,
                    "ignoring an older snapshot"
                );
                return;
            }
        }
        let version = snapshot.version;
        let newer = current.is_none_or(|current| version > current);
        if newer {
            self.close_refused_sessions(&snapshot);
        }
        *self.snapshot.borrow_mut() = Rc::new(snapshot);
        self.metrics.snapshot_applied(version);
        if newer {
            let changed = self.snapshot_changed.replace(Rc::new(Signal::default()));
            changed.fire();
        }
        tracing::debug!(shard = self.index, version, "snapshot applied");
    }

    /// Ends every live session that `snapshot` would refuse now: a lock matches it, or its
    /// roles no longer allow it (a role deleted or narrowed, a deny added). A loop over this
    /// shard's sessions: firing a session's signal only wakes its task, which closes both
    /// sides.
    fn close_refused_sessions(&self, snapshot: &Snapshot) {
        let now = jaunt_config::identity::unix_now();
        for (conn_id, session) in self.sessions.borrow().iter() {
            if session.end.is_fired() {
                continue;
            }
            if let Some(lock) = matching_lock(
                &snapshot.active_locks,
                &session.identity,
                &session.request,
                &session.labels,
                now,
            ) {
                tracing::info!(
                    shard = self.index,
                    conn = conn_id,
                    user = %session.identity.name,
                    target = %session.request.target,
                    lock = %lock.name,
                    "closing a live session: a lock matches it"
                );
                session
                    .end
                    .fire_because(format!("a lock matches it ({:?})", lock.name));
                self.metrics.session_closed_by_lock();
            } else if let Some(denied) = revoked(
                snapshot,
                &session.identity,
                &session.request,
                &session.labels,
                now,
            ) {
                tracing::info!(
                    shard = self.index,
                    conn = conn_id,
                    user = %session.identity.name,
                    target = %session.request.target,
                    reason = %denied.message,
                    "closing a live session: its roles no longer allow it"
                );
                session
                    .end
                    .fire_because("the user's roles no longer allow it".to_owned());
                self.metrics.session_closed_by_role();
            }
        }
    }

    /// Registers the spliced user session of connection `conn_id`; the returned signal fires
    /// when a lock comes to match it. Unregister with [`Shard::session_ended`].
    pub fn session_started(
        &self,
        conn_id: u64,
        session_id: &str,
        identity: &Identity,
        request: &DialRequest,
        labels: BTreeMap<String, String>,
        recordings: Option<Arc<NotedRecordings>>,
    ) -> Rc<Signal> {
        let end = Rc::new(Signal::default());
        if let Some(recordings) = &recordings {
            self.recording_notes
                .lock()
                .insert(session_id.to_owned(), Arc::clone(recordings));
        }
        self.sessions.borrow_mut().insert(
            conn_id,
            LiveSession {
                session_id: session_id.to_owned(),
                started: jaunt_config::identity::unix_now(),
                identity: identity.clone(),
                request: request.clone(),
                labels,
                end: Rc::clone(&end),
                recordings,
            },
        );
        end
    }

    /// Notes `note`'s recording for its live recorded session (on any shard of this engine), if
    /// the agent `host_id` (whose tunnel on this shard it came on) serves that session.
    pub(crate) fn note_recording(
        &self,
        host_id: &str,
        note: &jaunt_config::wire::RecordingNote,
    ) -> Result<(), NoteRefusal> {
        let recordings = self
            .recording_notes
            .lock()
            .get(&note.session_id)
            .filter(|r| r.host_id == host_id)
            .cloned()
            .ok_or(NoteRefusal::UnknownSession)?;
        let mut ids = recordings.ids.lock().unwrap_or_else(|p| p.into_inner());
        if ids.contains(&note.recording_id) {
            return Ok(());
        }
        if ids.len() >= MAX_NOTED_RECORDINGS {
            return Err(NoteRefusal::TooMany);
        }
        ids.push(note.recording_id.clone());
        Ok(())
    }

    /// The session of connection `conn_id` ended.
    pub fn session_ended(&self, conn_id: u64) {
        let ended = self.sessions.borrow_mut().remove(&conn_id);
        if let Some(ended) = ended.filter(|s| s.recordings.is_some()) {
            self.recording_notes.lock().remove(&ended.session_id);
        }
    }

    /// This shard's live user sessions.
    fn live_sessions(&self) -> Vec<LiveSessionInfo> {
        self.sessions
            .borrow()
            .values()
            .filter(|s| !s.end.is_fired())
            .map(|s| LiveSessionInfo {
                id: s.session_id.clone(),
                user: s.identity.name.clone(),
                kind: s.request.kind,
                target: s.request.target.clone(),
                login: s.request.login.clone(),
                db_user: s.request.db_user.clone(),
                started: s.started,
                recorded: s.recordings.is_some(),
                observing: s.request.join.clone(),
            })
            .collect()
    }

    /// Ends the live session `session_id` if this shard has it (`jaunt sessions kill`).
    fn end_session(&self, session_id: &str, by: &str) -> bool {
        let sessions = self.sessions.borrow();
        let Some(session) = sessions.values().find(|s| s.session_id == session_id) else {
            return false;
        };
        tracing::info!(
            shard = self.index,
            session = session_id,
            user = %session.identity.name,
            target = %session.request.target,
            by,
            "ending a live session: an administrator killed it"
        );
        session.end.fire_because(format!("killed by {by}"));
        true
    }

    /// The limits in force now (a copy: a reload does not change a connection's view).
    pub fn limits(&self) -> EngineLimits {
        self.limits.get()
    }

    fn reload_limits(&self, limits: EngineLimits) {
        let old = self.limits.replace(limits);
        if old != limits {
            tracing::info!(
                shard = self.index,
                ?limits,
                "limits reloaded: new connections use them"
            );
        }
    }

    fn reload_tls(&self, configs: &TlsConfigs) {
        *self.tls.borrow_mut() = Rc::new(ShardTls::new(configs));
        tracing::info!(shard = self.index, "TLS configuration reloaded");
    }

    /// Registers `tunnel` from `host_id` (its verified certificate's name), carried by
    /// connection `conn_id`, announcing `agent`'s resources. A previous tunnel of the same host
    /// on this shard (the agent restarted or reconnected) is replaced and drained: its open
    /// streams finish, new ones go to the new tunnel. A shard that is draining takes no new
    /// tunnel.
    pub fn register_tunnel(
        &self,
        host_id: &str,
        conn_id: u64,
        agent: &Arc<AgentHello>,
        tunnel: Tunnel,
    ) -> Registered {
        if self.draining.is_fired() {
            tunnel.go_away();
            return Registered::Draining;
        }
        let (previous, conflicts, count) = {
            let mut tunnels = self.tunnels.borrow_mut();
            let previous = tunnels.insert(
                host_id,
                TunnelEntry {
                    conn_id,
                    since: Instant::now(),
                    agent: Arc::clone(agent),
                    tunnel,
                },
            );
            (previous, tunnels.conflicts(host_id), tunnels.len())
        };
        self.metrics.set_tunnels(count as u64);
        for (kind, name, owner) in conflicts {
            tracing::warn!(
                shard = self.index,
                host_id,
                kind = kind.as_str(),
                name,
                served_by = owner,
                "two agents announce the same resource: dials go to the first one"
            );
        }
        self.directory.tunnel_up(self.index, host_id, agent);
        self.report(InventoryEvent::TunnelUp {
            shard: self.index,
            host_id: host_id.to_owned(),
            name: agent.name.clone(),
            labels: agent.labels.clone(),
            resources: agent.resources.clone(),
        });
        let Some(previous) = previous else {
            return Registered::New;
        };
        tracing::info!(
            shard = self.index,
            host_id,
            age = ?previous.since.elapsed(),
            "agent reconnected: draining its previous tunnel"
        );
        self.metrics.tunnel_replaced();
        previous.tunnel.go_away();
        Registered::Replaced
    }

    /// A heartbeat on the tunnel of `host_id` carried by `conn_id`, with sequence `seq`,
    /// changed its announcement to `agent`: this shard's table routes by it at once, the
    /// directory takes it unless a newer heartbeat came through another shard, and control
    /// hears of it (a `TunnelUp` for a pair that is up replaces what it announced). `false`
    /// when the connection no longer carries the host's tunnel here (nothing changed).
    pub fn heartbeat(
        &self,
        host_id: &str,
        conn_id: u64,
        seq: u64,
        agent: &Arc<AgentHello>,
    ) -> bool {
        let (previous, conflicts) = {
            let mut tunnels = self.tunnels.borrow_mut();
            let previous = tunnels.update(host_id, conn_id, agent);
            let conflicts = match previous {
                Some(_) => tunnels.conflicts(host_id),
                None => Vec::new(),
            };
            (previous, conflicts)
        };
        let Some(previous) = previous else {
            return false;
        };
        for (kind, name, owner) in conflicts {
            tracing::warn!(
                shard = self.index,
                host_id,
                kind = kind.as_str(),
                name,
                served_by = owner,
                "two agents announce the same resource: dials go to the first one"
            );
        }
        let applied = self.directory.heartbeat(host_id, seq, agent);
        tracing::info!(
            shard = self.index,
            host_id,
            seq,
            before = previous.resources.len(),
            resources = agent.resources.len(),
            directory = ?applied,
            "agent resources changed"
        );
        if applied == HeartbeatApplied::Applied {
            self.report(InventoryEvent::TunnelUp {
                shard: self.index,
                host_id: host_id.to_owned(),
                name: agent.name.clone(),
                labels: agent.labels.clone(),
                resources: agent.resources.clone(),
            });
        }
        true
    }

    /// Removes the tunnel of `host_id` if it is still the one carried by `conn_id`.
    pub fn unregister_tunnel(&self, host_id: &str, conn_id: u64) {
        let removed = {
            let mut tunnels = self.tunnels.borrow_mut();
            let removed = tunnels.remove(host_id, conn_id);
            self.metrics.set_tunnels(tunnels.len() as u64);
            removed
        };
        if removed.is_some() {
            self.directory.tunnel_down(self.index, host_id);
            self.report(InventoryEvent::TunnelDown {
                shard: self.index,
                host_id: host_id.to_owned(),
            });
        }
        // Dropped outside the borrow: dropping the last handle of a tunnel drains it.
        drop(removed);
    }

    /// This shard's tunnel from `host_id`, if it has one that is still open.
    pub fn tunnel(&self, host_id: &str) -> Option<Tunnel> {
        self.tunnels
            .borrow()
            .get(host_id)
            .filter(|t| !t.tunnel.is_closed())
            .map(|t| t.tunnel.clone())
    }

    /// Where the dial target `(kind, name)` lives: announced by an agent with a usable tunnel
    /// on this shard; else registered in `snapshot`; else announced by an agent connected to
    /// other shards only (the directory). `None`: nobody serves it.
    pub fn resolve(&self, snapshot: &Snapshot, kind: DialKind, name: &str) -> Option<Resolved> {
        let resource_kind = kind.resource_kind();
        if let Some(resolved) = self
            .tunnels
            .borrow()
            .find(resource_kind, name, |t| !t.is_closed())
            .map(|(host_id, entry)| Resolved {
                target: announced_target(host_id, &entry.agent, resource_kind, name),
                tunnel: Some(entry.tunnel.clone()),
                other_shards: Vec::new(),
            })
        {
            return Some(resolved);
        }
        // A miss on this shard's announcements: the slow path from here on.
        if let Some(target) = snapshot.targets.get(kind, name) {
            let tunnel = self.tunnel(&target.host_id);
            let other_shards = match (&tunnel, self.directory.host(&target.host_id)) {
                (None, Some(record)) => self.other_shards(&record.shards),
                _ => Vec::new(),
            };
            return Some(Resolved {
                target: target.clone(),
                tunnel,
                other_shards,
            });
        }
        let (host_id, record) = self.directory.find(resource_kind, name)?;
        let tunnel = self.tunnel(&host_id);
        let other_shards = match tunnel {
            Some(_) => Vec::new(),
            None => self.other_shards(&record.shards),
        };
        Some(Resolved {
            target: announced_target(&host_id, &record.agent, resource_kind, name),
            tunnel,
            other_shards,
        })
    }

    fn other_shards(&self, shards: &BTreeSet<usize>) -> Vec<usize> {
        shards
            .iter()
            .copied()
            .filter(|s| *s != self.index)
            .collect()
    }

    /// Sends an audit event to control without waiting. `Err(())` only for a session start
    /// under [`AuditOverflow::Reject`](crate::server::AuditOverflow) with the queue full or
    /// closed: the session must be refused (counted). Otherwise a failed send is counted as
    /// dropped.
    pub fn audit(&self, event: crate::server::AuditEvent) -> Result<(), ()> {
        let Some(tx) = &self.config.audit else {
            return Ok(());
        };
        let start = matches!(event, crate::server::AuditEvent::SessionStart { .. });
        if tx.try_send(event).is_ok() {
            return Ok(());
        }
        if start && self.config.audit_overflow == crate::server::AuditOverflow::Reject {
            self.metrics.audit_refused();
            return Err(());
        }
        self.metrics.audit_dropped();
        Ok(())
    }

    /// Sends `event` to control without waiting; a full or closed channel drops it (counted).
    fn report(&self, event: InventoryEvent) {
        let Some(tx) = &self.config.inventory else {
            return;
        };
        if let Err(e) = tx.try_send(event) {
            self.metrics.inventory_dropped();
            if !self.inventory_drop_logged.replace(true) {
                let why = match e {
                    crossbeam_channel::TrySendError::Full(_) => "full",
                    crossbeam_channel::TrySendError::Disconnected(_) => "closed",
                };
                tracing::warn!(
                    shard = self.index,
                    channel = why,
                    "inventory event dropped (counted in jaunt_inventory_events_dropped_total; \
                     logged once per shard)"
                );
            }
        }
    }

    fn next_conn_id(&self) -> u64 {
        let id = self.next_conn_id.get();
        self.next_conn_id.set(id.wrapping_add(1));
        id
    }

    fn connection_closed(&self) {
        self.metrics.connection_closed();
        if self.metrics.active() == 0 && self.draining.is_fired() {
            self.all_closed.fire();
        }
    }

    /// Stops everything: tunnels close, open connections get until `deadline` to finish, then
    /// are aborted. Returns how many were aborted.
    async fn drain(&self, deadline: Instant) -> u64 {
        // Connections accepted just before the stop get to open their stream first (bounded by
        // the handshake timeout): agents are told to go away only after.
        let settle = deadline.min(Instant::now() + self.limits().handshake_timeout);
        while self.dialing.get() > 0 && Instant::now() < settle {
            glommio::timer::Timer::new(SETTLE_POLL).await;
        }
        self.draining.fire();
        let tunnels: Vec<Tunnel> = self
            .tunnels
            .borrow()
            .values()
            .map(|t| t.tunnel.clone())
            .collect();
        // Their connections unregister them (and report them down) as they end.
        for tunnel in tunnels {
            tunnel.go_away();
        }
        if self.metrics.active() == 0 {
            return 0;
        }
        let _ = crate::server::io::with_deadline(deadline, self.all_closed.wait()).await;
        let left = self.metrics.active();
        if left > 0 {
            tracing::warn!(
                shard = self.index,
                connections = left,
                "drain deadline passed: closing the connections still open"
            );
            self.abort.fire();
            let grace = Instant::now() + ABORT_GRACE;
            let _ = crate::server::io::with_deadline(grace, self.all_closed.wait()).await;
        }
        left
    }
}

/// The target of an announced resource: its agent's host labels, overlaid by the resource's own.
fn announced_target(host_id: &str, agent: &AgentHello, kind: ResourceKind, name: &str) -> Target {
    let mut labels = agent.labels.clone();
    if let Some(resource) = agent.resource(kind, name) {
        labels.extend(resource.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    Target {
        host_id: host_id.to_owned(),
        labels,
    }
}

/// A connection that has not opened its session's stream yet (see [`Shard::dialing`]).
pub(crate) struct Dialing {
    shard: Rc<Shard>,
}

impl Drop for Dialing {
    fn drop(&mut self) {
        self.shard
            .dialing
            .set(self.shard.dialing.get().saturating_sub(1));
    }
}

/// Counts one connection as active for as long as it lives.
pub(crate) struct ConnGuard {
    shard: Rc<Shard>,
    /// Shard-local connection id.
    pub id: u64,
}

impl ConnGuard {
    /// A new connection's guard, unless the shard is at its connection limit (then counted as
    /// refused). The limit is read per connection: a reload lowers or raises it for the next
    /// one; the connections above a lowered limit stay until they end.
    fn admit(shard: &Rc<Shard>) -> Option<ConnGuard> {
        if shard.metrics.active() >= shard.limits().max_connections_per_shard as u64 {
            shard.metrics.refused(Refusal::TooManyConnections);
            return None;
        }
        Some(ConnGuard::new(shard))
    }

    fn new(shard: &Rc<Shard>) -> ConnGuard {
        shard.metrics.connection_opened();
        ConnGuard {
            shard: Rc::clone(shard),
            id: shard.next_conn_id(),
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shard.connection_closed();
    }
}

// ---------------------------------------------------------------------------------------------
// Boot

/// Everything a shard thread needs.
pub(crate) struct ShardBoot {
    pub index: usize,
    pub shard_count: usize,
    pub config: EngineConfig,
    /// This shard's listening socket (bound by the engine handle, or inherited).
    pub listener: Option<std::net::TcpListener>,
    /// Accept only once told to ([`Command::StartAccepting`]).
    pub paused: bool,
    pub placement: Option<usize>,
    pub tls: TlsConfigs,
    pub metrics: Arc<ShardMetrics>,
    pub directory: Arc<Directory>,
    pub recording_notes: Arc<RecordingNotes>,
    pub mailbox: Mailbox,
    /// This shard's halves of the cross-shard hop channels (taken when the shard starts).
    pub hops: Option<HopBoot>,
    /// The bound address, or why the shard could not start.
    pub report: std::sync::mpsc::Sender<Result<SocketAddr, EngineError>>,
}

/// Starts shard `boot.index` on a new thread. The thread reports on `boot.report` once it
/// listens (or why it cannot), then serves until a `Shutdown` command or until every mailbox
/// sender is gone; it returns how many connections the drain aborted.
pub(crate) fn spawn(boot: ShardBoot) -> Result<std::thread::JoinHandle<u64>, EngineError> {
    let index = boot.index;
    std::thread::Builder::new()
        .name(format!("jaunt-shard-{index}"))
        .spawn(move || run(boot))
        .map_err(|source| EngineError::Thread {
            name: format!("jaunt-shard-{index}"),
            source,
        })
}

fn run(boot: ShardBoot) -> u64 {
    let executor = match make_executor(&boot) {
        Ok(executor) => executor,
        Err(e) => {
            let _ = boot.report.send(Err(e));
            return 0;
        }
    };
    executor.run(serve(boot))
}

fn make_executor(boot: &ShardBoot) -> Result<glommio::LocalExecutor, EngineError> {
    let builder = |placement| {
        LocalExecutorBuilder::new(placement)
            .name(&format!("jaunt-shard-{}", boot.index))
            .io_memory(boot.config.io_memory)
    };
    if let Some(cpu) = boot.placement {
        match builder(Placement::Fixed(cpu)).make() {
            Ok(executor) => return Ok(executor),
            Err(e) => tracing::warn!(
                shard = boot.index,
                cpu,
                error = %e,
                "cannot pin the shard to its CPU; running it unpinned"
            ),
        }
    }
    builder(Placement::Unbound)
        .make()
        .map_err(|e| EngineError::runtime(boot.index, &e))
}

async fn serve(mut boot: ShardBoot) -> u64 {
    let Some(std_listener) = boot.listener.take() else {
        let _ = boot
            .report
            .send(Err(EngineError::ShardDied { shard: boot.index }));
        return 0;
    };
    let local_addr = match std_listener.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            let _ = boot.report.send(Err(EngineError::Bind {
                shard: boot.index,
                addr: boot.config.listen_addr,
                source: e,
            }));
            return 0;
        }
    };
    let listener = glommio_listener(std_listener);
    let shard = Rc::new(Shard::new(&boot));
    let hop_tasks = match boot.hops.take() {
        Some(hops) => hop::start(&shard, hops),
        None => Vec::new(),
    };
    shard.metrics.set_listening(true);
    let _ = boot.report.send(Ok(local_addr));
    tracing::info!(shard = shard.index, %local_addr, "shard listening");

    let mut listener = Some(listener);
    let mut acceptor = None;
    if !boot.paused {
        acceptor = listener
            .take()
            .map(|l| glommio::spawn_local(accept_loop(Rc::clone(&shard), l)));
    }
    let deadline = loop {
        match boot.mailbox.recv().await {
            Some(Command::Snapshot(snapshot)) => shard.apply_snapshot(snapshot),
            Some(Command::ReloadTls(configs, ack)) => {
                shard.reload_tls(&configs);
                let _ = ack.send(shard.index);
            }
            Some(Command::ReloadLimits(limits, ack)) => {
                shard.reload_limits(limits);
                let _ = ack.send(shard.index);
            }
            Some(Command::Shutdown { drain_deadline }) => break drain_deadline,
            Some(Command::Sessions(reply)) => {
                let _ = reply.send(shard.live_sessions());
            }
            Some(Command::EndSession(id, by, reply)) => {
                let _ = reply.send(shard.end_session(&id, &by));
            }
            Some(Command::StartAccepting {
                agent_grace_until,
                ack,
            }) => {
                shard.agent_grace_until.set(agent_grace_until);
                if let Some(l) = listener.take() {
                    tracing::info!(shard = shard.index, "accepting");
                    acceptor = Some(glommio::spawn_local(accept_loop(Rc::clone(&shard), l)));
                }
                let _ = ack.send(shard.index);
            }
            Some(Command::StopAccepting {
                markers,
                stopped,
                ack,
            }) => {
                if acceptor.is_none() {
                    // Never accepted: nothing to stop at.
                    listener = None;
                    let _ = stopped.send(shard.index);
                } else {
                    *shard.stop_at.borrow_mut() = Some((markers, stopped));
                }
                let _ = ack.send(shard.index);
            }
            None => break Instant::now(),
        }
    };
    // Dropping the accept task cancels it and closes this shard's listening socket (one that
    // stopped at its marker has ended already).
    drop(acceptor);
    drop(listener);
    shard.metrics.set_listening(false);
    let aborted = shard.drain(deadline).await;
    for task in hop_tasks {
        task.cancel().await;
    }
    tracing::info!(shard = shard.index, aborted, "shard stopped");
    aborted
}

impl hop::HopShard for Shard {
    fn hops(&self) -> &Rc<Hops> {
        &self.hops
    }

    fn index(&self) -> usize {
        self.index
    }

    fn serving_tunnel(&self, host_id: &str) -> Option<Tunnel> {
        self.tunnel(host_id).filter(|_| !self.draining.is_fired())
    }

    fn adopt(self: &Rc<Self>, adopted: hop::Adopted) {
        // A draining shard takes no new tunnels (the agent redials; it would be sent away at
        // once anyway), and the connection limit holds as for an accept.
        if self.draining.is_fired() {
            return;
        }
        let Some(guard) = ConnGuard::admit(self) else {
            return;
        };
        let peer = adopted.stream.peer_addr().ok();
        let stream = adopted_stream(adopted.stream);
        let slot = self.handshake_slot(peer.map(|a| a.ip()));
        glommio::spawn_local(conn::serve_adopted(
            Rc::clone(self),
            stream,
            guard,
            slot,
            adopted.hello,
            adopted.accepted_at,
            peer,
        ))
        .detach();
    }
}

/// Takes ownership of a connected socket handed over by another shard for this executor.
#[allow(unsafe_code)]
fn adopted_stream(stream: std::net::TcpStream) -> glommio::net::TcpStream {
    use std::os::fd::{FromRawFd as _, IntoRawFd as _};
    // SAFETY: `into_raw_fd` gives up ownership of an open, connected TCP socket (a duplicate of
    // the descriptor glommio's accept gave the other shard, so it shares that one's file status
    // flags); glommio's stream takes it over and is its only owner from here on (it closes it
    // when dropped).
    unsafe { glommio::net::TcpStream::from_raw_fd(stream.into_raw_fd()) }
}

/// Takes ownership of a listening socket for this executor, with `TCP_NODELAY` set: Linux
/// copies it to every socket accepted from it, which saves a `setsockopt` per connection (a
/// socket received in a takeover gets it here too; connections its kernel had already queued
/// keep what the previous process set). Not with `TCP_DEFER_ACCEPT`: ARCHITECTURE.md says why
/// (a reconnect storm overflows the SYN queue of deferred connections).
#[allow(unsafe_code)]
fn glommio_listener(listener: std::net::TcpListener) -> TcpListener {
    use std::os::fd::{FromRawFd as _, IntoRawFd as _};
    if let Err(e) = rustix::net::sockopt::set_tcp_nodelay(&listener, true) {
        tracing::warn!(error = %e, "TCP_NODELAY on the listening socket");
    }
    // SAFETY: `into_raw_fd` gives up ownership of an open, listening TCP socket; glommio's
    // listener takes it over and is its only owner from here on (it closes it when dropped).
    unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) }
}

async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        // At the handshake bound, connections wait in the listen backlog (`admission.rs`).
        shard.admission.room().await;
        match listener.accept_with_peer().await {
            Ok((stream, peer)) => {
                let stop = shard
                    .stop_at
                    .borrow()
                    .as_ref()
                    .and_then(|(markers, stopped)| {
                        markers.contains(&peer?).then(|| stopped.clone())
                    });
                if let Some(stopped) = stop {
                    // A takeover: the next process accepts what comes after the marker.
                    drop(stream);
                    shard.metrics.set_listening(false);
                    tracing::info!(shard = shard.index, "stopped accepting");
                    let _ = stopped.send(shard.index);
                    return;
                }
                let Some(guard) = ConnGuard::admit(&shard) else {
                    drop(stream);
                    continue;
                };
                let slot = shard.handshake_slot(peer.map(|a| a.ip()));
                glommio::spawn_local(conn::serve(Rc::clone(&shard), stream, guard, slot, peer))
                    .detach();
            }
            Err(e) => {
                tracing::warn!(shard = shard.index, error = %e, "accept failed");
                glommio::timer::Timer::new(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn executor() -> glommio::LocalExecutor {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(64 << 10)
            .make()
            .unwrap_or_else(|e| unreachable!("glommio executor: {e}"))
    }

    #[test]
    fn accepted_sockets_get_tcp_nodelay_from_the_listener() {
        executor().run(async {
            let any = "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!());
            let std_listener = crate::server::listen::bind_reuseport(any)
                .unwrap_or_else(|e| unreachable!("bind: {e}"));
            let addr = std_listener
                .local_addr()
                .unwrap_or_else(|e| unreachable!("{e}"));
            let listener = glommio_listener(std_listener);
            let _client =
                std::net::TcpStream::connect(addr).unwrap_or_else(|e| unreachable!("{e}"));
            let accepted = listener
                .accept()
                .await
                .unwrap_or_else(|e| unreachable!("accept: {e}"));
            assert!(accepted.nodelay().unwrap_or(false));
        });
    }

    #[test]
    fn signal_wakes_every_waiter_once_and_stays_fired() {
        executor().run(async {
            let signal = Rc::new(Signal::default());
            let waiters: Vec<_> = (0..3)
                .map(|_| {
                    let signal = Rc::clone(&signal);
                    glommio::spawn_local(async move { signal.wait().await })
                })
                .collect();
            glommio::executor().yield_now().await;
            assert_eq!(signal.waiters.borrow().len(), 3);
            signal.fire();
            for waiter in waiters {
                waiter.await;
            }
            signal.wait().await;
            assert!(signal.waiters.borrow().is_empty());
        });
    }

    #[test]
    fn dropped_waiters_leave_no_slot() {
        executor().run(async {
            let signal = Signal::default();
            let polled = crate::server::io::with_deadline(
                Instant::now() + Duration::from_millis(5),
                signal.wait(),
            )
            .await;
            assert!(polled.is_err());
            assert!(signal.waiters.borrow().is_empty());
        });
    }

    #[test]
    fn mailbox_wakes_from_another_thread() {
        let (tx, rx) = mailbox();
        let sender = std::thread::spawn(move || {
            for version in 1..=3 {
                tx.send(Command::Snapshot(Arc::new(Snapshot {
                    version,
                    ..Snapshot::default()
                })));
            }
        });
        let versions = executor().run(async move {
            let mut versions = Vec::new();
            while let Some(command) = rx.recv().await {
                if let Command::Snapshot(s) = command {
                    versions.push(s.version);
                }
            }
            versions
        });
        let _ = sender.join();
        assert_eq!(versions, [1, 2, 3]);
    }
}
