//! The agent's runtime: [`run`] and the commands it takes ([`AgentCommand`]).
//!
//! # One executor
//!
//! The agent runs one glommio executor on the calling thread. An agent's load is the sum of its
//! users' sessions to services on the same host (a few shells, an app, a database), far below
//! what one core moves through TLS (about 4 GB/s of AES-GCM here); and one executor keeps every
//! tunnel, stream and timer on one thread, with `Rc`/`RefCell` and no locks. Running one tunnel
//! per engine shard is about spreading the *engine's* work over its cores, not the agent's: each
//! agent tunnel costs one socket and a few buffers. An agent that fronts a heavy TCP app could
//! later run a few executors, each owning a subset of the shards' tunnels; nothing below
//! assumes there is only one, since all state lives in the task that owns it.
//!
//! Where that thread runs is the scheduler's call, or with `agent.cpu_placement: follow-engine`
//! `placement.rs`'s: beside a local engine's busy shard while the traffic is small requests
//! through one shard.
//!
//! # Tasks
//!
//! - The **supervisor** (the future `run` blocks on) owns the dial loop, the [`Coverage`] of the
//!   engine's shards, the [`Backoff`] and the current TLS configuration. It dials one
//!   connection at a time ([`dial::handshake`]), decides keep / duplicate / reset, sends the
//!   AgentHello and spawns the tunnel. While it waits (on a dial or on a backoff sleep) it keeps
//!   handling [`Event`]s, so a shutdown never waits for a dial to finish.
//! - One **tunnel task** per tunnel accepts the engine's streams and spawns one **stream task**
//!   each ([`serve::serve`]); when the tunnel stops taking streams it tells the supervisor
//!   ([`Event::TunnelLost`]), waits for the tunnel's driver to end, and logs why it ended.
//! - One **heartbeat task** per tunnel (spawned and cancelled by its tunnel task) opens the
//!   heartbeat stream (the one stream the agent opens; wire format in
//!   `jaunt_config::wire::agent_hello`) at the first heartbeat, one interval after the
//!   AgentHello or at once when a reload changes the announcement ([`Announcer`]), and writes
//!   the current announcement on it every interval and at once on every change.
//!
//! # Reload
//!
//! [`AgentCommand::Reload`] (SIGHUP) replaces the agent's labels and services: checked like at
//! start-up (a bad set is logged and the old one stays), then new streams are served with the
//! new services, new tunnels announce them in their AgentHello, and every live tunnel heartbeats
//! them at once, with the next sequence number. No tunnel is dropped.
//! - With several engines ([`AgentCommand::SetEngines`]), one more **supervisor** per other
//!   engine runs beside the first, each with its own coverage and backoff; the **dispatcher**
//!   (`Fleet`) hands them the caller's commands (policy once: the guard is shared).
//! - A plain **control thread** forwards the caller's crossbeam [`AgentCommand`]s into the
//!   executor (a futures channel: its sender wakes a glommio task from another thread), since a
//!   blocking `recv` cannot run on the executor.
//!
//! # Policy
//!
//! In [`PolicyMode::Enforce`] (`jaunt agent`) every user stream is re-checked before it is
//! served (`policy.rs`): the certificate the engine forwarded is verified against the user CA
//! and [`jaunt_config::rbac::authorize`] runs with the cluster's roles and locks.
//! [`AgentCommand::ReplacePolicy`] swaps in a newer policy (compiled by the caller, off the
//! executor) and ends the live sessions its locks match; until the first one arrives user
//! streams are refused. Commands queued before the runtime starts are handled before the first
//! dial, so a caller that fetched the policy first never has a tunnel serve without it.
//! [`PolicyMode::EngineOnly`] (the runtime used without a policy source) is logged at start-up.
//!
//! # Shutdown
//!
//! [`AgentCommand::Shutdown`] (or the caller dropping its sender): stop dialing, send GOAWAY on
//! every tunnel (the engine opens no new streams; open ones carry on), wait for the tunnels to
//! drain, at most [`crate::Timeouts::shutdown_grace`], then abort what is left and return.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use futures::channel::mpsc::{self, UnboundedReceiver, UnboundedSender};
use futures_lite::{future, StreamExt};
use glommio::{LocalExecutorBuilder, Placement};
use jaunt_engine::mux::{self, Role};
use jaunt_engine::tunnel::policy_push::POLICY_OPEN;
use jaunt_engine::tunnel::{CloseReason, Tunnel, CLOSE_TIMEOUT};
use rustls::ClientConfig;

use crate::backoff::{self, Backoff, BackoffConfig};
use crate::coverage::{Coverage, TunnelId, Verdict, MAX_DIALS_PER_ROUND};
use crate::dial::{self, Handshaked};
use crate::error::{AgentError, Blame, TunnelError};
use crate::hooks::AgentHooks;
use crate::net;
use crate::placement::CpuPlacement;
use crate::policy::{ClusterPolicy, Guard, PolicyMode};
use crate::serve;
use crate::settings::{AgentSettings, Announce, Prepared};

/// Memory glommio registers for io_uring buffers: TCP does not use them (only file I/O does),
/// and glommio locks three times this much per executor, so keep it at glommio's minimum.
pub const AGENT_IO_MEMORY: usize = 64 << 10;

/// What the caller (the `jaunt agent` command) can tell a running agent.
#[derive(Clone, Debug)]
pub enum AgentCommand {
    /// Renewed host certificates: used for every dial from now on. Live tunnels keep the
    /// certificate they authenticated with (the engine checks it at the handshake only). A dial
    /// waiting out a backoff retries at once, since the old certificate may have been why it
    /// failed.
    ReplaceTls(Arc<ClientConfig>),
    /// A re-read configuration (SIGHUP): serve and announce these host labels and services from
    /// now on, without dropping a tunnel (see the module doc). The proxy address and the node
    /// name cannot change at run time.
    Reload {
        /// The host's labels.
        labels: BTreeMap<String, String>,
        /// What the agent serves.
        services: jaunt_config::file::AgentServices,
    },
    /// A newer cluster policy (roles, locks, user CA) from control: every new user stream is
    /// checked against it (in [`PolicyMode::Enforce`]), and live sessions a lock of it matches
    /// end at once. Built off the executor; swapped in whole.
    ReplacePolicy(Arc<ClusterPolicy>),
    /// The cluster's other engines (public `host:port`s, from control's member list): the
    /// agent keeps tunnels to each as well as to its configured proxy, so users reach it
    /// through any engine and an engine that stops or drains leaves it reachable through the
    /// others. Engines no longer listed are drained like at a shutdown.
    SetEngines(Vec<String>),
    /// A CA rotation phase changed: drop the cached database client certificates (the db CA
    /// may sign with another key now, or the old one may be gone from the servers' trust);
    /// the next session of each database user gets a new one.
    ForgetDbCerts,
    /// Stop (SIGTERM): no new tunnels, no new streams; open streams get
    /// [`crate::Timeouts::shutdown_grace`] to finish, then the tunnels close and [`run`] returns.
    Shutdown,
}

/// Runs the agent on the calling thread until [`AgentCommand::Shutdown`] arrives or `control`'s
/// sender is dropped (treated the same: nobody could stop the agent any more). Errors only at
/// start-up (unusable settings, no executor); once running, every failure is logged with who
/// is to blame and retried. Runs in [`PolicyMode::EngineOnly`] (no policy source): see
/// [`run_with_policy`].
pub fn run(settings: AgentSettings, control: Receiver<AgentCommand>) -> Result<(), AgentError> {
    run_with_policy(
        settings,
        AgentHooks::default(),
        PolicyMode::EngineOnly,
        control,
    )
}

/// [`run`] with [`AgentHooks`]: what the agent needs from its caller beyond settings (database
/// client certificates, where database queries are recorded). [`PolicyMode::EngineOnly`].
pub fn run_with_hooks(
    settings: AgentSettings,
    hooks: AgentHooks,
    control: Receiver<AgentCommand>,
) -> Result<(), AgentError> {
    run_with_policy(settings, hooks, PolicyMode::EngineOnly, control)
}

/// [`run_with_hooks`], saying whether the agent re-checks authorization itself: with
/// [`PolicyMode::Enforce`] (what `jaunt agent` uses) the caller must send
/// [`AgentCommand::ReplacePolicy`], and user streams are refused until it has.
pub fn run_with_policy(
    settings: AgentSettings,
    hooks: AgentHooks,
    mode: PolicyMode,
    control: Receiver<AgentCommand>,
) -> Result<(), AgentError> {
    let prepared = Rc::new(prepare(&settings, &hooks)?);
    let executor = LocalExecutorBuilder::new(Placement::Unbound)
        .name("jaunt-agent")
        .io_memory(AGENT_IO_MEMORY)
        .make()
        .map_err(|e| AgentError::Runtime(format!("glommio executor: {e}")))?;
    let (events_tx, events_rx) = mpsc::unbounded();
    // What the caller queued before starting (the first policy, say) is handled before the
    // first dial, so no stream is served before it.
    let mut queued = 0usize;
    let mut stopped = false;
    let (dispatch_tx, dispatch_rx) = mpsc::unbounded();
    for command in control.try_iter() {
        if matches!(command, AgentCommand::SetEngines(_)) {
            let _ = dispatch_tx.unbounded_send(Event::Command(command));
            continue;
        }
        queued += 1;
        stopped = matches!(command, AgentCommand::Shutdown);
        let _ = events_tx.unbounded_send(Event::Command(command));
        if stopped {
            break;
        }
    }
    // Later commands go through the dispatcher, which also runs the other engines' supervisors.
    if !stopped {
        std::thread::Builder::new()
            .name("jaunt-agent-ctl".into())
            .spawn(move || forward_commands(&control, &dispatch_tx))
            .map_err(|e| AgentError::Runtime(format!("control thread: {e}")))?;
    }
    let guard = Rc::new(Guard::new(mode));
    let fleet = Rc::new(Fleet {
        primary_tx: events_tx.clone(),
        primary_addr: settings.proxy_addr.clone(),
        settings: RefCell::new(settings.clone()),
        hooks: hooks.clone(),
        guard: Rc::clone(&guard),
        others: RefCell::new(BTreeMap::new()),
        done: RefCell::new(Vec::new()),
    });
    let placement = settings.cpu_placement;
    let supervisor =
        Supervisor::new(prepared, settings, hooks, events_tx, events_rx).with_policy(guard, queued);
    executor.run(async move {
        let placer = (placement == CpuPlacement::FollowEngine)
            .then(|| glommio::spawn_local(crate::placement::follow_engine()).detach());
        let dispatcher = glommio::spawn_local(Rc::clone(&fleet).dispatch(dispatch_rx)).detach();
        supervisor.run().await;
        // The primary stopped (shutdown): the others got the same command; wait for them.
        let others: Vec<_> = std::mem::take(&mut *fleet.others.borrow_mut())
            .into_values()
            .map(|(_, handle)| handle)
            .chain(std::mem::take(&mut *fleet.done.borrow_mut()))
            .collect();
        for handle in others {
            let _ = handle.await;
        }
        dispatcher.cancel();
        if let Some(placer) = placer {
            placer.cancel();
        }
    });
    Ok(())
}

/// Another engine's supervisor: where its commands go, and its task.
type OtherEngine = (UnboundedSender<Event>, glommio::task::JoinHandle<()>);

/// The supervisors of the other engines ([`AgentCommand::SetEngines`]) beside the primary one
/// (the configured proxy). Each is a whole [`Supervisor`] with its own coverage and backoff;
/// they share the policy guard, so one [`AgentCommand::ReplacePolicy`] serves all.
struct Fleet {
    primary_tx: UnboundedSender<Event>,
    primary_addr: String,
    /// The settings new supervisors start from: the latest TLS and announcement.
    settings: RefCell<AgentSettings>,
    hooks: AgentHooks,
    guard: Rc<Guard>,
    others: RefCell<BTreeMap<String, OtherEngine>>,
    /// Supervisors told to stop (their engine left the list), still draining.
    done: RefCell<Vec<glommio::task::JoinHandle<()>>>,
}

impl Fleet {
    /// Routes the caller's commands: engines to this fleet, policy to the primary (the guard is
    /// shared), everything else to every supervisor.
    async fn dispatch(self: Rc<Self>, mut rx: UnboundedReceiver<Event>) {
        while let Some(event) = rx.next().await {
            match event {
                Event::Command(AgentCommand::SetEngines(engines)) => self.set_engines(&engines),
                Event::Command(AgentCommand::ReplacePolicy(p)) => {
                    let _ = self
                        .primary_tx
                        .unbounded_send(Event::Command(AgentCommand::ReplacePolicy(p)));
                }
                Event::Command(command) => {
                    match &command {
                        AgentCommand::ReplaceTls(tls) => {
                            self.settings.borrow_mut().tls = tls.clone()
                        }
                        AgentCommand::Reload { labels, services } => {
                            let next = self.settings.borrow().with_announce(Announce {
                                labels: labels.clone(),
                                services: services.clone(),
                            });
                            *self.settings.borrow_mut() = next;
                        }
                        _ => {}
                    }
                    let _ = self
                        .primary_tx
                        .unbounded_send(Event::Command(command.clone()));
                    for (tx, _) in self.others.borrow().values() {
                        let _ = tx.unbounded_send(Event::Command(command.clone()));
                    }
                }
                other => {
                    for (tx, _) in self.others.borrow().values() {
                        let _ = tx.unbounded_send(Event::ControlClosed);
                    }
                    let _ = self.primary_tx.unbounded_send(other);
                }
            }
        }
    }

    fn set_engines(&self, engines: &[String]) {
        let wanted: std::collections::BTreeSet<&str> = engines
            .iter()
            .map(String::as_str)
            .filter(|a| *a != self.primary_addr)
            .collect();
        let gone: Vec<String> = self
            .others
            .borrow()
            .keys()
            .filter(|a| !wanted.contains(a.as_str()))
            .cloned()
            .collect();
        for addr in gone {
            if let Some((tx, handle)) = self.others.borrow_mut().remove(&addr) {
                tracing::info!(engine = %addr, "engine left the cluster's list: draining its tunnels");
                let _ = tx.unbounded_send(Event::Command(AgentCommand::Shutdown));
                self.done.borrow_mut().push(handle);
            }
        }
        for addr in wanted {
            if self.others.borrow().contains_key(addr) {
                continue;
            }
            let mut settings = self.settings.borrow().clone();
            settings.proxy_addr = addr.to_string();
            settings.server_name = addr
                .rsplit_once(':')
                .map_or(addr, |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let prepared = match prepare(&settings, &self.hooks) {
                Ok(p) => Rc::new(p),
                Err(e) => {
                    tracing::warn!(engine = %addr, error = %e, "cannot use this engine's address");
                    continue;
                }
            };
            tracing::info!(engine = %addr, "keeping tunnels to another engine of the cluster");
            let (tx, rx) = mpsc::unbounded();
            let supervisor =
                Supervisor::new(prepared, settings, self.hooks.clone(), tx.clone(), rx)
                    .with_policy(Rc::clone(&self.guard), 0);
            let handle = glommio::spawn_local(supervisor.run()).detach();
            self.others
                .borrow_mut()
                .insert(addr.to_string(), (tx, handle));
        }
    }
}

/// The settings checked and pre-computed, with the caller's hooks plugged in: at start-up and
/// on every reload (so a hook-made state set here is set on both).
fn prepare(settings: &AgentSettings, hooks: &AgentHooks) -> Result<Prepared, AgentError> {
    let mut prepared = Prepared::new(settings)?;
    prepared.db = crate::postgres::DbState::new(hooks);
    prepared.app = crate::http_app::AppState::new(hooks);
    prepared.denials = crate::settings::Denials(std::sync::Arc::clone(&hooks.denials));
    prepared.ssh = crate::ssh_term::SshState::new(hooks);
    Ok(prepared)
}

/// Start of the heartbeat sequence: the Unix time in milliseconds, so it keeps growing across
/// restarts of the agent (the engine ignores a sequence lower than the last it applied).
fn first_heartbeat_seq() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2))
}

/// The announcement in force and its sequence number, shared by the supervisor (which replaces
/// it on a reload), the tunnel tasks (which serve new streams with it) and the heartbeat tasks
/// (which wait for it to change).
struct Announcer {
    prepared: RefCell<Rc<Prepared>>,
    seq: Cell<u64>,
    /// Heartbeat tasks waiting for a change; at most one entry per task that waits (an entry is
    /// not added again when the same task polls again), cleared on every change.
    waiters: RefCell<Vec<Waker>>,
}

/// Waiting heartbeat tasks kept at most before they are all woken (they re-check and wait
/// again): entries of tasks that stopped waiting are dropped then.
const MAX_ANNOUNCE_WAITERS: usize = 1024;

impl Announcer {
    fn new(prepared: Rc<Prepared>) -> Announcer {
        Announcer {
            prepared: RefCell::new(prepared),
            seq: Cell::new(first_heartbeat_seq()),
            waiters: RefCell::new(Vec::new()),
        }
    }

    fn prepared(&self) -> Rc<Prepared> {
        Rc::clone(&self.prepared.borrow())
    }

    fn current(&self) -> (u64, Rc<Prepared>) {
        (self.seq.get(), self.prepared())
    }

    /// Puts `prepared` in force with the next sequence number and wakes the heartbeat tasks.
    fn replace(&self, prepared: Rc<Prepared>) {
        *self.prepared.borrow_mut() = prepared;
        self.seq.set(self.seq.get().saturating_add(1));
        self.wake_all();
    }

    fn wake_all(&self) {
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for waker in waiters {
            waker.wake();
        }
    }

    /// Resolves once the sequence is no longer `seen`.
    async fn changed(&self, seen: u64) {
        future::poll_fn(|cx| {
            if self.seq.get() != seen {
                return Poll::Ready(());
            }
            if self.waiters.borrow().len() >= MAX_ANNOUNCE_WAITERS {
                self.wake_all();
            }
            let mut waiters = self.waiters.borrow_mut();
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await;
    }
}

/// Moves commands from the caller's channel into the executor. Ends after forwarding
/// `Shutdown`, or when either side is gone.
fn forward_commands(control: &Receiver<AgentCommand>, tx: &UnboundedSender<Event>) {
    loop {
        match control.recv() {
            Ok(command) => {
                let last = matches!(command, AgentCommand::Shutdown);
                if tx.unbounded_send(Event::Command(command)).is_err() || last {
                    return;
                }
            }
            Err(_) => {
                let _ = tx.unbounded_send(Event::ControlClosed);
                return;
            }
        }
    }
}

/// What the supervisor reacts to. The channel is unbounded, but what can be in it is bounded:
/// one `TunnelLost` per tunnel ever spawned and not yet handled, plus the caller's commands.
enum Event {
    Command(AgentCommand),
    ControlClosed,
    /// The tunnel takes no more streams (GOAWAY either way, or it ended).
    TunnelLost {
        id: TunnelId,
    },
}

/// A kept tunnel, as the supervisor sees it.
struct Live {
    opened: Instant,
}

struct Supervisor {
    prepared: Rc<Prepared>,
    /// The settings `prepared` was made from (a reload replaces labels and services).
    settings: AgentSettings,
    hooks: AgentHooks,
    announcer: Rc<Announcer>,
    tls: Arc<ClientConfig>,
    /// `tls` per shard, each with its own session cache (`dial::asking_for_shard`).
    shard_tls: dial::ShardConfigs,
    coverage: Coverage,
    backoff: Backoff,
    /// A failure or a lost tunnel happened: sleep before the next dial.
    backoff_pending: bool,
    /// A new TLS configuration arrived since the current dial started: do not back off before
    /// trying it (the old certificate may be why the dial failed).
    retry_now: bool,
    stopping: bool,
    next_id: TunnelId,
    live: BTreeMap<TunnelId, Live>,
    tracker: Rc<Tracker>,
    /// The policy in force and the live sessions it may end.
    guard: Rc<Guard>,
    /// Commands the caller queued before [`run_with_policy`]: handled before the first dial.
    queued: usize,
    events_tx: UnboundedSender<Event>,
    events: UnboundedReceiver<Event>,
}

impl Supervisor {
    fn new(
        prepared: Rc<Prepared>,
        settings: AgentSettings,
        hooks: AgentHooks,
        events_tx: UnboundedSender<Event>,
        events: UnboundedReceiver<Event>,
    ) -> Supervisor {
        let backoff: BackoffConfig = settings.backoff;
        Supervisor {
            announcer: Rc::new(Announcer::new(prepared.clone())),
            prepared,
            tls: settings.tls.clone(),
            shard_tls: dial::ShardConfigs::default(),
            settings,
            hooks,
            coverage: Coverage::new(),
            backoff: Backoff::new(backoff, backoff::seed()),
            backoff_pending: false,
            retry_now: false,
            stopping: false,
            next_id: 1,
            live: BTreeMap::new(),
            tracker: Rc::new(Tracker::default()),
            guard: Rc::new(Guard::new(PolicyMode::EngineOnly)),
            queued: 0,
            events_tx,
            events,
        }
    }

    /// The policy guard to serve with, and how many commands were queued before the start.
    fn with_policy(self, guard: Rc<Guard>, queued: usize) -> Supervisor {
        Supervisor {
            guard,
            queued,
            ..self
        }
    }

    async fn run(mut self) {
        tracing::info!(
            proxy = %self.prepared.proxy_addr,
            name = %self.prepared.name,
            resources = self.prepared.resources,
            "agent starting"
        );
        match self.guard.mode() {
            PolicyMode::Enforce => tracing::info!(
                "authorization: every user stream is re-checked against the cluster's policy \
                 (user streams are refused until it arrives)"
            ),
            PolicyMode::EngineOnly => tracing::warn!(
                "authorization: engine only (no policy source): this agent does not re-check \
                 user streams itself"
            ),
        }
        for _ in 0..self.queued {
            match self.events.try_recv() {
                Ok(event) => self.handle(event),
                Err(_) => break,
            }
        }
        while !self.stopping {
            if self.coverage.needs_dial() {
                if self.backoff_pending && self.retry_now {
                    self.backoff_pending = false;
                    tracing::info!("retrying at once with the new TLS configuration");
                } else if self.backoff_pending {
                    self.backoff_pending = false;
                    let delay = self.backoff.next_delay(Instant::now());
                    tracing::info!(
                        ?delay,
                        failures = self.backoff.failures(),
                        "redialing the engine after a backoff"
                    );
                    self.wait(delay).await;
                    if self.stopping {
                        break;
                    }
                }
                self.dial_round().await;
            } else {
                match self.events.next().await {
                    Some(event) => self.handle(event),
                    None => self.stopping = true,
                }
            }
        }
        self.shutdown().await;
    }

    /// Dials until every shard is covered, a dial fails, or this round's budget is spent.
    async fn dial_round(&mut self) {
        let mut budget = self.coverage.round_budget();
        let mut layout = self.coverage.shards();
        let mut dials = 0;
        while dials < budget && self.coverage.needs_dial() && !self.stopping {
            if self.coverage.shards() != layout {
                // The first hello (or a new layout) told the shard count: size the rest of the
                // round for it rather than backing off after a budget made for not knowing.
                // Capped: two engines of different sizes behind one address would otherwise
                // reset the layout on every dial and never end the round.
                layout = self.coverage.shards();
                budget = (dials + self.coverage.round_budget()).min(MAX_DIALS_PER_ROUND);
            }
            dials += 1;
            // This dial uses the newest TLS configuration.
            self.retry_now = false;
            let tls = match self.coverage.wanted() {
                Some(shard) => self.shard_tls.get(&self.tls, shard),
                None => self.tls.clone(),
            };
            let attempt = dial::handshake(self.prepared.clone(), Arc::clone(&tls));
            let Some(result) = self.racing_events(attempt).await else {
                return;
            };
            let placed = match result {
                Ok(handshaked) => {
                    self.shard_tls
                        .landed(&self.tls, handshaked.hello.shard, &tls);
                    self.place(handshaked).await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = placed {
                tracing::warn!(
                    blame = %e.blame(),
                    proxy = %self.prepared.proxy_addr,
                    error = %e,
                    "cannot open a tunnel"
                );
                self.backoff_pending = true;
                return;
            }
        }
        if self.coverage.needs_dial() && !self.stopping {
            tracing::info!(
                dials,
                covered = self.coverage.covered(),
                shards = ?self.coverage.shards(),
                "shards still uncovered after this round's dials"
            );
            self.backoff_pending = true;
        }
    }

    /// Keeps, closes or resets for a connection that delivered its tunnel hello.
    async fn place(&mut self, handshaked: Handshaked) -> Result<(), TunnelError> {
        let Handshaked {
            mut tls,
            hello,
            peer,
        } = handshaked;
        let id = self.next_id;
        self.next_id += 1;
        let previous_shards = self.coverage.shards();
        match self.coverage.offer(id, &hello) {
            Verdict::Duplicate => {
                tracing::debug!(
                    shard = hello.shard,
                    shards = hello.shards,
                    "connection landed on a shard that already has a tunnel: closing it"
                );
                glommio::spawn_local(dial::close_politely(tls)).detach();
                return Ok(());
            }
            Verdict::Reset { stale } => {
                tracing::info!(
                    shards = hello.shards,
                    previous = ?previous_shards,
                    stale = stale.len(),
                    "the engine's shard count changed: draining the older tunnels"
                );
                for stale_id in stale {
                    self.live.remove(&stale_id);
                    self.tracker.go_away(stale_id);
                }
            }
            Verdict::Keep => {}
        }
        if let Err(e) = dial::send_agent_hello(&self.prepared, &mut tls).await {
            self.coverage.remove(id);
            return Err(e);
        }
        tls.get_mut()
            .1
            .set_buffer_limit(Some(jaunt_engine::tunnel::TUNNEL_TLS_BUFFER_LIMIT));
        let (tunnel, driver) = Tunnel::spawn(tls, Role::Client, self.prepared.mux);
        self.tracker.insert(id, tunnel.clone());
        self.live.insert(
            id,
            Live {
                opened: Instant::now(),
            },
        );
        glommio::spawn_local(run_tunnel(
            TunnelTask {
                id,
                shard: hello.shard,
                announcer: self.announcer.clone(),
                tracker: self.tracker.clone(),
                guard: self.guard.clone(),
                events: self.events_tx.clone(),
            },
            tunnel,
            driver,
        ))
        .detach();
        tracing::info!(
            tunnel = id,
            shard = hello.shard,
            shards = hello.shards,
            covered = self.coverage.covered(),
            %peer,
            "tunnel open"
        );
        Ok(())
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Command(AgentCommand::ReplaceTls(tls)) => {
                tracing::info!("TLS configuration replaced: new tunnels use it");
                self.tls = tls;
                self.backoff.reset();
                // Only while dialing: a covered agent has nothing to retry, and a later loss
                // must still wait out its jittered delay.
                self.retry_now = self.coverage.needs_dial();
            }
            Event::Command(AgentCommand::Reload { labels, services }) => {
                self.reload(Announce { labels, services });
            }
            Event::Command(AgentCommand::ReplacePolicy(policy)) => {
                let version = policy.version().to_owned();
                let (seq, locks) = (policy.seq(), policy.locks().len());
                match self
                    .guard
                    .replace(policy, jaunt_config::identity::unix_now())
                {
                    Some(ended) => {
                        tracing::info!(%version, seq, locks, ended, "cluster policy replaced")
                    }
                    None => tracing::debug!(%version, seq, "polled policy is not newer: kept"),
                }
            }
            // The fleet's business (`Fleet::dispatch`); a supervisor has one engine.
            Event::Command(AgentCommand::SetEngines(_)) => {}
            Event::Command(AgentCommand::ForgetDbCerts) => {
                let dropped = self.prepared.db.forget_certificates();
                tracing::info!(
                    dropped,
                    "CA rotation: cached database client certificates dropped"
                );
            }
            Event::Command(AgentCommand::Shutdown) => {
                tracing::info!("shutdown requested");
                self.stopping = true;
            }
            Event::ControlClosed => {
                tracing::info!("the control channel closed: shutting down");
                self.stopping = true;
            }
            Event::TunnelLost { id } => {
                let lived = self.live.remove(&id).map(|live| live.opened.elapsed());
                if let Some(shard) = self.coverage.remove(id) {
                    if let Some(lived) = lived {
                        self.backoff.tunnel_ended(lived);
                    }
                    self.backoff_pending = true;
                    tracing::info!(
                        tunnel = id,
                        shard,
                        missing = self.coverage.missing(),
                        "shard lost its tunnel: redialing"
                    );
                }
            }
        }
    }

    /// Puts `announce` in force if it differs and passes the start-up checks (else logs why and
    /// keeps the current one): new streams, new tunnels and the heartbeats use it.
    fn reload(&mut self, announce: Announce) {
        if announce == self.settings.announce() {
            tracing::info!("reload: labels and services unchanged");
            return;
        }
        let next = self.settings.with_announce(announce);
        match prepare(&next, &self.hooks) {
            Ok(prepared) => {
                let prepared = Rc::new(prepared);
                tracing::info!(
                    resources = prepared.resources,
                    tunnels = self.tracker.tunnel_count(),
                    "reload: announcing the new labels and services on every tunnel"
                );
                self.settings = next;
                self.prepared = prepared.clone();
                self.announcer.replace(prepared);
            }
            Err(e) => tracing::warn!(
                blame = %Blame::Agent,
                error = %e,
                "reload refused: keeping the current labels and services"
            ),
        }
    }

    /// Sleeps `delay`, handling events meanwhile; ends early on shutdown or new TLS settings
    /// (also when they arrived during the dial that failed).
    async fn wait(&mut self, delay: Duration) {
        let deadline = Instant::now() + delay;
        while !self.stopping && !self.retry_now {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match net::timeout(left, self.events.next()).await {
                None => break,
                Some(Some(event)) => self.handle(event),
                Some(None) => self.stopping = true,
            }
        }
    }

    /// Runs `fut` while handling events; `None` (and `fut` dropped) once the agent is stopping.
    async fn racing_events<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        loop {
            let events = &mut self.events;
            let step = future::or(async { Ok(fut.as_mut().await) }, async {
                Err(events.next().await)
            })
            .await;
            match step {
                Ok(output) => return Some(output),
                Err(Some(event)) => {
                    self.handle(event);
                    if self.stopping {
                        return None;
                    }
                }
                Err(None) => {
                    self.stopping = true;
                    return None;
                }
            }
        }
    }

    async fn shutdown(&mut self) {
        let grace = self.prepared.timeouts.shutdown_grace;
        tracing::info!(
            tunnels = self.tracker.tunnel_count(),
            streams = self.tracker.streams.get(),
            ?grace,
            "shutting down: draining the tunnels"
        );
        self.tracker.go_away_all();
        if net::timeout(grace, self.tracker.until_empty())
            .await
            .is_none()
        {
            tracing::warn!(
                blame = %Blame::Agent,
                streams = self.tracker.streams.get(),
                "streams still open after the shutdown grace period: aborting them"
            );
            self.tracker.close_all();
            let bound = CLOSE_TIMEOUT + Duration::from_secs(1);
            let _ = net::timeout(bound, self.tracker.until_empty()).await;
        }
        tracing::info!("agent stopped");
    }
}

/// What a tunnel task needs besides its tunnel.
struct TunnelTask {
    id: TunnelId,
    shard: usize,
    /// Each new stream is served with the announcement in force when it arrives.
    announcer: Rc<Announcer>,
    tracker: Rc<Tracker>,
    guard: Rc<Guard>,
    events: UnboundedSender<Event>,
}

async fn run_tunnel(
    task: TunnelTask,
    tunnel: Tunnel,
    driver: glommio::task::JoinHandle<CloseReason>,
) {
    // Cancelled (its stream reset) as soon as the tunnel stops taking streams, so it never
    // holds up a drain.
    let heartbeats = glommio::spawn_local(heartbeat(
        tunnel.clone(),
        task.announcer.clone(),
        task.id,
        task.shard,
    ));
    while let Some(incoming) = tunnel.accept().await {
        if incoming.header == POLICY_OPEN {
            glommio::spawn_local(crate::policy::receive_push(
                incoming,
                task.guard.clone(),
                task.shard,
            ))
            .detach();
            continue;
        }
        let guard = StreamGuard::new(task.tracker.clone());
        let prepared = task.announcer.prepared();
        let shard = task.shard;
        let policy = task.guard.clone();
        glommio::spawn_local(async move {
            let _guard = guard;
            serve::serve(incoming, prepared, policy, shard).await;
        })
        .detach();
    }
    drop(heartbeats);
    let _ = task
        .events
        .unbounded_send(Event::TunnelLost { id: task.id });
    drop(tunnel);
    let reason = driver.await.unwrap_or(CloseReason::DriverStopped);
    match close_blame(&reason) {
        None => tracing::info!(tunnel = task.id, shard = task.shard, %reason, "tunnel closed"),
        Some(blame) => tracing::warn!(
            tunnel = task.id,
            shard = task.shard,
            %blame,
            %reason,
            "tunnel closed"
        ),
    }
    task.tracker.remove(task.id);
}

/// The heartbeat task of one tunnel (see the module doc). The tunnel's AgentHello announced the
/// current state, so the heartbeat stream is opened at the first heartbeat: one interval later,
/// or at once when a reload changes the announcement. Then it writes the current announcement
/// every interval and at once on every change, until the stream or the tunnel ends (its tunnel
/// task cancels it when the tunnel stops taking streams). Holds the tunnel handle only until
/// the stream is open.
async fn heartbeat(tunnel: Tunnel, announcer: Rc<Announcer>, id: TunnelId, shard: usize) {
    use futures_lite::AsyncWriteExt as _;
    use jaunt_config::wire::agent_hello::{Heartbeat, HEARTBEAT_OPEN};
    let (announced, prepared) = announcer.current();
    let interval = prepared.heartbeat_interval;
    drop(prepared);
    let _ = net::timeout(interval, announcer.changed(announced)).await;
    let mut stream = match tunnel.open(HEARTBEAT_OPEN).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(tunnel = id, shard, error = %e, "no heartbeat stream");
            return;
        }
    };
    drop(tunnel);
    loop {
        let (seq, prepared) = announcer.current();
        let bytes = Heartbeat::encode_framed(seq, &prepared.hello);
        let interval = prepared.heartbeat_interval;
        drop(prepared);
        if stream.write_all(&bytes).await.is_err() || stream.flush().await.is_err() {
            tracing::debug!(tunnel = id, shard, "heartbeat stream ended");
            return;
        }
        tracing::trace!(tunnel = id, shard, seq, "heartbeat sent");
        let _ = net::timeout(interval, announcer.changed(seq)).await;
    }
}

/// Who ended a tunnel; `None` for a graceful drain.
fn close_blame(reason: &CloseReason) -> Option<Blame> {
    match reason {
        CloseReason::Mux(mux::CloseReason::Drained) => None,
        CloseReason::Mux(mux::CloseReason::Timeout) | CloseReason::Io { .. } => {
            Some(Blame::Network)
        }
        CloseReason::Mux(mux::CloseReason::Protocol(_) | mux::CloseReason::PeerError { .. })
        | CloseReason::PeerEof => Some(Blame::Engine),
        CloseReason::Mux(mux::CloseReason::Local { .. }) | CloseReason::DriverStopped => {
            Some(Blame::Agent)
        }
    }
}

/// Every tunnel whose driver still runs, and the streams being served; lets shutdown go away,
/// abort and wait for the end.
#[derive(Default)]
struct Tracker {
    tunnels: RefCell<BTreeMap<TunnelId, Tunnel>>,
    streams: Cell<usize>,
    waiter: RefCell<Option<Waker>>,
}

impl Tracker {
    fn insert(&self, id: TunnelId, tunnel: Tunnel) {
        self.tunnels.borrow_mut().insert(id, tunnel);
    }

    fn remove(&self, id: TunnelId) {
        self.tunnels.borrow_mut().remove(&id);
        if let Some(waker) = self.waiter.borrow_mut().take() {
            waker.wake();
        }
    }

    fn tunnel_count(&self) -> usize {
        self.tunnels.borrow().len()
    }

    fn go_away(&self, id: TunnelId) {
        let tunnel = self.tunnels.borrow().get(&id).cloned();
        if let Some(tunnel) = tunnel {
            tunnel.go_away();
        }
    }

    fn all(&self) -> Vec<Tunnel> {
        self.tunnels.borrow().values().cloned().collect()
    }

    fn go_away_all(&self) {
        for tunnel in self.all() {
            tunnel.go_away();
        }
    }

    fn close_all(&self) {
        for tunnel in self.all() {
            tunnel.close();
        }
    }

    async fn until_empty(&self) {
        future::poll_fn(|cx| {
            if self.tunnels.borrow().is_empty() {
                return Poll::Ready(());
            }
            *self.waiter.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
    }
}

/// Counts one stream being served.
struct StreamGuard(Rc<Tracker>);

impl StreamGuard {
    fn new(tracker: Rc<Tracker>) -> StreamGuard {
        tracker.streams.set(tracker.streams.get() + 1);
        StreamGuard(tracker)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.set(self.0.streams.get().saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graceful_drains_blame_nobody() {
        assert_eq!(
            close_blame(&CloseReason::Mux(mux::CloseReason::Drained)),
            None
        );
        assert_eq!(close_blame(&CloseReason::PeerEof), Some(Blame::Engine));
        assert_eq!(
            close_blame(&CloseReason::Mux(mux::CloseReason::Timeout)),
            Some(Blame::Network)
        );
    }
}
