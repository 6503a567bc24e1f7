//! `jaunt start`: open the store, load or create the CAs, serve the control API, start the
//! engine on the public port, and stop cleanly on SIGTERM or SIGINT.
//!
//! Listeners: the control API listens on `control.listen_addr` (mTLS, ALPN `jaunt-control`); the
//! engine owns the public port and passes ALPN `jaunt-control` through to it byte for byte, so
//! `jaunt login --proxy PUBLIC_ADDR` reaches control through the engine. Control feeds the engine
//! immutable snapshots (CA roots, roles, locks) over a crossbeam channel: once at boot and again
//! after every change.
//!
//! Files written to the data directory: `jaunt.lock` (held while the daemon runs, with the
//! public port's listener inodes; see `exclusive.rs`), `jaunt.db` (the store), `control.addr`
//! and `public.addr` (the bound addresses, so port 0 works), `admin/` (the local admin identity
//! the admin verbs use on this host), `takeover.sock` (where `jaunt start --takeover` asks for
//! the sockets, see `takeover.rs`) and, in dev mode, `admin-password` (0600).

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use jaunt_config::api::{Certs, ALPN_CONTROL};
use jaunt_config::identity::{unix_now, Identity, IdentityKind};

use crate::auth;
use crate::ca::{self, LocalKeys};
use crate::client::host_part;
use crate::http::{self, Limits};
use crate::profile::{self, Profile};
use crate::service::{Control, Settings, LOCAL_ADMIN};
use crate::store::{Store, StoredUser};

/// The local admin identity lives a year and is re-issued at every start.
pub const ADMIN_TTL_SECS: u64 = 365 * 24 * 3600;
/// The control API's own server certificate, re-issued at every start.
pub const SERVER_CERT_TTL_SECS: u64 = 365 * 24 * 3600;

/// What `jaunt start` runs with, whether it came from `--dev` or a config file.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub cluster: String,
    pub data_dir: PathBuf,
    /// What users and agents dial (HOST:PORT). Port 0 means "whatever the public listener got".
    pub public_addr: String,
    /// Where to bind the public port.
    pub public_listen: String,
    /// Where to bind the control API.
    pub control_listen: String,
    pub second_factor: bool,
    pub user_ttl_secs: u64,
    pub host_ttl_secs: u64,
    pub dev: bool,
    pub engine: EngineSettings,
    /// `audit.file`: also append every committed audit event to a JSON-lines file.
    pub audit_file: Option<jaunt_config::file::AuditFileConfig>,
    /// `audit.retention`: events older than this are removed from the store.
    pub audit_retention: Duration,
    /// `recordings:`: where session recordings are stored.
    pub recordings: jaunt_config::file::RecordingsConfig,
    /// `storage:`: SQLite in `data_dir` (the default) or a shared PostgreSQL.
    pub storage: jaunt_config::file::StorageConfig,
    /// `--takeover`: take the listening sockets over from the daemon running on `data_dir`.
    pub takeover: bool,
    /// How long a daemon taken over (or stopped by SIGTERM) lets live sessions go on.
    pub drain_timeout: Duration,
}

/// The engine's part of the daemon config.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    pub shards: usize,
    pub io_memory: usize,
    pub diag_addr: Option<String>,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections_per_shard: usize,
    /// `engine.max_handshakes_per_shard`: TLS handshakes one shard runs at once.
    pub max_handshakes_per_shard: usize,
    /// An operator-provided certificate and key for the public port (e.g. a public CA's);
    /// otherwise the host CA issues one.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// Engine audit events waiting for the store.
    pub audit_queue_capacity: usize,
    /// What a full audit queue does to new sessions.
    pub audit_overflow: jaunt_config::file::AuditOverflow,
}

impl EngineSettings {
    /// Defaults for a dev cluster: one shard per CPU (at most two: dev clusters share the
    /// machine with their users), no diagnostics endpoint unless asked for.
    pub fn dev(diag_addr: Option<String>) -> EngineSettings {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        EngineSettings {
            shards: cpus.clamp(1, 2),
            io_memory: jaunt_engine::server::DEFAULT_IO_MEMORY,
            diag_addr,
            handshake_timeout: jaunt_engine::server::DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: jaunt_engine::server::DEFAULT_IDLE_TIMEOUT,
            max_connections_per_shard: jaunt_engine::server::DEFAULT_MAX_CONNECTIONS_PER_SHARD,
            max_handshakes_per_shard: jaunt_engine::server::DEFAULT_MAX_HANDSHAKES_PER_SHARD,
            tls_files: None,
            audit_queue_capacity: jaunt_config::file::DEFAULT_AUDIT_QUEUE_CAPACITY,
            audit_overflow: jaunt_config::file::AuditOverflow::Reject,
        }
    }
}

/// Runs until SIGTERM or SIGINT; returns after a clean shutdown.
pub fn run(cfg: DaemonConfig) -> anyhow::Result<()> {
    let audit_file = cfg.audit_file.clone();
    profile::create_private_dir(&cfg.data_dir)?;
    // One daemon per data directory and per public port (see `exclusive.rs`), unless this one
    // takes the running one's place (`takeover.rs`): then it inherits the lock and the sockets.
    let (mut lock, mut inherited) = if cfg.takeover {
        match crate::exclusive::lock_data_dir(&cfg.data_dir, "jaunt start") {
            Ok(lock) => {
                println!(
                    "--takeover: no jaunt runs on {}: starting afresh",
                    cfg.data_dir.display()
                );
                (lock, None)
            }
            Err(_) => {
                let hello = crate::takeover::Hello {
                    version: crate::takeover::VERSION,
                    pid: std::process::id(),
                    public_listen: cfg.public_listen.clone(),
                    control_listen: cfg.control_listen.clone(),
                    shards: cfg.engine.shards,
                    diag_addr: cfg.engine.diag_addr.clone(),
                    drain_timeout_secs: cfg.drain_timeout.as_secs(),
                };
                let inherited = crate::takeover::request(&cfg.data_dir, &hello)?;
                let lock = crate::exclusive::DataDirLock::inherited(
                    inherited.lock.try_clone()?,
                    &cfg.data_dir,
                )?;
                (lock, Some(inherited))
            }
        }
    } else {
        (
            crate::exclusive::lock_data_dir(&cfg.data_dir, "jaunt start")?,
            None,
        )
    };
    let public_listen = resolve(&cfg.public_listen, "engine.listen_addr")?;
    if inherited.is_none() {
        let state = crate::exclusive::check_port_free(
            public_listen,
            if cfg.dev {
                "--public-addr"
            } else {
                "engine.listen_addr"
            },
            &lock.previous_listeners,
        )?;
        if let crate::exclusive::PortState::Orphans {
            count,
            joined,
            waited,
        } = state
        {
            if joined {
                tracing::info!(
                    listeners = count,
                    "the public port's listeners of a killed daemon are still closing: joining \
                     them (net.ipv4.tcp_migrate_req = 1 hands their queued connections to the \
                     new ones)"
                );
            } else {
                tracing::info!(
                    listeners = count,
                    waited_ms = waited.as_millis() as u64,
                    "waited for the public port's listeners of a killed daemon to close \
                     (net.ipv4.tcp_migrate_req = 1 would let the engine start beside them: \
                     config/examples/jaunt-sysctl.conf)"
                );
            }
        }
    }
    let store = Arc::new(match &cfg.storage {
        jaunt_config::file::StorageConfig::Sqlite => Store::open(&cfg.data_dir.join("jaunt.db"))
            .with_context(|| format!("opening the store in {}", cfg.data_dir.display()))?,
        postgres => Store::from_config(postgres, &cfg.data_dir)
            .context("storage (type: postgres): opening the store")?,
    });
    tracing::info!(backend = store.backend().kind(), "store open");
    let control_listener = match inherited.as_mut() {
        Some(inherited) => inherited.control.try_clone()?,
        None => bind(&cfg.control_listen, "control.listen_addr")?,
    };
    // Kept for a later takeover of this process.
    let control_socket = control_listener.try_clone()?;
    let control_bound = control_listener.local_addr()?;
    // With port 0 the engine picks the port; the advertised address is fixed up once it has.
    let public_addr_hint = cfg.public_addr.clone();

    let settings = Settings {
        cluster: cfg.cluster.clone(),
        public_addr: public_addr_hint.clone(),
        second_factor: cfg.second_factor,
        user_ttl_secs: cfg.user_ttl_secs,
        host_ttl_secs: cfg.host_ttl_secs,
    };
    // The audit log: the store, and the JSON-lines copy when `audit.file` is set. Control's own
    // events and the engine's writer share it, so the file sees every committed event in order.
    let audit_file = audit_file
        .as_ref()
        .map(|c| crate::audit_file::AuditFile::open(c).map(Arc::new))
        .transpose()?;
    let mut control = Control::bootstrap(store.clone(), settings)?;
    control.audit = crate::audit::Audit::with_file(store.clone(), audit_file);
    let control = Arc::new(control);
    // This process in the cluster's member list (and as a lease holder): random per start.
    let member_id = crate::audit::uid()[..16].to_string();
    // Recordings storage: a wrong key or an unreachable S3 store stops the start here.
    let completer_lease = {
        let (store, holder) = (store.clone(), member_id.clone());
        let ttl = crate::recordings::COMPLETER_PERIOD.as_secs() * 2 + 10;
        Box::new(move || {
            store
                .try_lease(crate::recordings::COMPLETER_LEASE, &holder, unix_now(), ttl)
                .unwrap_or(false)
        })
    };
    let recordings =
        crate::recordings::open_started(&cfg.recordings, &cfg.data_dir, completer_lease)?;
    control.set_recordings(recordings);
    let admin_password = if cfg.dev {
        Some(ensure_dev_admin(&control, &cfg)?)
    } else {
        None
    };

    // The control API's server certificate, from the host CA, for every name it is reached by.
    let host = host_part(&public_addr_hint);
    let mut names = vec![
        host.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    // Web apps are reached at `<app>.<host>`: a wildcard name covers them for browsers, for a
    // DNS host of two labels or more (verifiers refuse wildcards over a single label such as
    // `*.localhost`; `jaunt proxy app` verifies the engine as `<host>` anyway).
    if host.parse::<std::net::IpAddr>().is_err() && host.contains('.') {
        names.push(format!("*.{host}"));
    }
    names.dedup();
    let (chain, server_key) = issue_server_cert(&control, &cfg.cluster, &names)?;
    let tls = api_tls(&control, chain.clone(), server_key.clone_key())?;

    let mut control_server = {
        let control = control.clone();
        let handler: Arc<dyn Fn(&http::Request) -> http::Response + Send + Sync> =
            Arc::new(move |req: &http::Request| control.handle(req));
        http::serve_with(
            control_listener,
            tls,
            handler,
            Limits::default(),
            inherited.is_some(),
        )?
    };

    // The engine: the public port.
    let engine_tls = engine_tls_configs(&control, &cfg, &names, Some((chain, server_key)))?;
    let mut engine_config =
        jaunt_engine::server::EngineConfig::new(public_listen, host, control_bound);
    engine_config.cluster_name = cfg.cluster.clone();
    engine_config.shards = cfg.engine.shards;
    engine_config.io_memory = cfg.engine.io_memory;
    engine_config.diag_addr = cfg
        .engine
        .diag_addr
        .as_deref()
        .map(|a| resolve(a, "engine.diag_addr"))
        .transpose()?;
    engine_config.handshake_timeout = cfg.engine.handshake_timeout;
    engine_config.idle_timeout = cfg.engine.idle_timeout;
    engine_config.max_connections_per_shard = cfg.engine.max_connections_per_shard;
    engine_config.max_handshakes_per_shard = cfg.engine.max_handshakes_per_shard;
    if let Some(bound) = std::env::var("JAUNT_MAX_HANDSHAKES_PER_SHARD")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|v| *v > 0)
    {
        // Kept for the measurements that used it (BENCHMARKS.md); the configuration key is
        // `engine.max_handshakes_per_shard`, and the environment wins over it.
        engine_config.max_handshakes_per_shard = bound;
    }
    let (inventory_tx, inventory_rx) = crossbeam_channel::bounded(4096);
    engine_config.inventory = Some(inventory_tx);
    engine_config.web = Some(jaunt_engine::server::WebUi(Arc::new(
        crate::web::WebUi::new(control.clone()),
    )));
    {
        let control = control.clone();
        std::thread::Builder::new()
            .name("inventory".into())
            .spawn(move || {
                // What has queued up meanwhile goes in one batch (one store transaction).
                for first in &inventory_rx {
                    let mut batch = vec![first];
                    batch.extend(inventory_rx.try_iter().take(INVENTORY_BATCH - 1));
                    control.apply_inventory_batch(batch);
                }
            })?;
    }
    // The engine's audit events: a bounded queue, drained in batches (one transaction each).
    let (audit_tx, audit_rx) = crossbeam_channel::bounded(cfg.engine.audit_queue_capacity.max(1));
    engine_config.audit = Some(audit_tx);
    engine_config.audit_overflow = cfg.engine.audit_overflow;
    // Dropping `audit_stop` (after the engine stopped) ends the writer once it has appended what
    // is queued, whether or not every sender of the queue is gone by then.
    let (audit_stop, audit_stopped) = crossbeam_channel::bounded::<()>(0);
    let audit_writer = {
        let audit = control.audit.clone();
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || audit.run_engine_writer_until(&audit_rx, &audit_stopped))?
    };
    // Retention: old audit events leave the store in bounded batches, beside the writers.
    let (pruner_stop, pruner_stopped) = crossbeam_channel::bounded::<()>(0);
    let pruner = {
        let store = store.clone();
        let retention = cfg.audit_retention;
        let holder = member_id.clone();
        std::thread::Builder::new()
            .name("audit-retention".into())
            .spawn(move || crate::audit::run_pruner(&store, retention, &holder, &pruner_stopped))?
    };
    let (snapshot_tx, snapshot_rx) = crossbeam_channel::bounded(16);
    control.set_snapshot_sender(snapshot_tx);
    control.publish_snapshot();
    // A shared store: other controls' changes arrive through its revision, polled.
    let (feed_stop, feed_stopped) = crossbeam_channel::bounded::<()>(0);
    let feed = if store.is_shared() {
        let control = control.clone();
        Some(
            std::thread::Builder::new()
                .name("store-feed".into())
                .spawn(move || run_change_feed(&control, &feed_stopped))?,
        )
    } else {
        None
    };
    let listeners = match inherited.as_mut() {
        Some(inherited) => jaunt_engine::server::Listeners::Inherited {
            shards: std::mem::take(&mut inherited.shards),
            diag: inherited.diag.take(),
        },
        None => jaunt_engine::server::Listeners::Bind,
    };
    // The public port's listen queue: a production host with many agents wants all of it; a dev
    // cluster hears about it once, quietly.
    let shards = engine_config.shards;
    if let Some(advice) = jaunt_engine::server::listen::backlog_advice(
        jaunt_engine::server::listen::somaxconn(),
        shards,
    ) {
        if cfg.dev {
            tracing::info!("{advice}");
        } else {
            tracing::warn!("{advice}");
        }
    }
    let engine =
        jaunt_engine::server::Engine::start_with(engine_config, engine_tls, snapshot_rx, listeners)
            .map_err(|e| anyhow::anyhow!("engine: {e}"))?;
    control.set_engine_sessions(engine.sessions());
    // The public port's listeners, for the next start on this directory after a crash.
    lock.record_listeners(&engine.listener_inodes())?;
    let public_addr = advertised(&public_addr_hint, engine.local_addr().port());
    control.set_public_addr(&public_addr);

    // Heartbeats: `jaunt status` on any host lists every control+engine host and its health.
    let member = crate::store::StoredMember {
        id: member_id,
        control_addr: control_bound.to_string(),
        public_addr: public_addr.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started: unix_now(),
        last_seen: unix_now(),
        state: "serving".into(),
    };
    let (beat_stop, beat_stopped) = crossbeam_channel::bounded::<()>(0);
    let beats = {
        let store = store.clone();
        let member = member.clone();
        std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || run_heartbeats(&store, member, &beat_stopped))?
    };

    write_admin_identity(&control, &cfg, &control_bound.to_string())?;
    profile::write_private(
        &cfg.data_dir.join("control.addr"),
        format!("{control_bound}\n").as_bytes(),
    )?;
    profile::write_private(
        &cfg.data_dir.join("public.addr"),
        format!("{public_addr}\n").as_bytes(),
    )?;

    // The takeover socket: inherited, or made now. Requests are served on their own thread;
    // a confirmed one reaches the loop below.
    let takeover_listener = match inherited.as_ref() {
        Some(inherited) => inherited.takeover.try_clone()?,
        None => crate::takeover::bind(&cfg.data_dir)?,
    };
    if let Some(inherited) = inherited.as_mut() {
        // Booted: the old process stops accepting, then this one starts.
        inherited.ready()?;
        engine
            .start_accepting(crate::takeover::AGENT_GRACE)
            .map_err(|e| anyhow::anyhow!("engine: {e}"))?;
        control_server.start_accepting();
        println!(
            "Took over from jaunt pid {}: it drains its live sessions and exits.",
            inherited.old_pid
        );
    }
    drop(inherited);
    let offer_sockets = Arc::new(std::sync::Mutex::new(Some(OfferSockets {
        lock: lock.share()?,
        takeover: std::os::fd::OwnedFd::from(takeover_listener.try_clone()?),
        control: std::os::fd::OwnedFd::from(control_socket),
        shards: engine.listeners()?,
        diag: engine.diag_listener(),
    })));
    let (handover_tx, handover_rx) = crossbeam_channel::bounded::<crate::takeover::Handover>(1);
    // Held here so the channel never disconnects, whatever the takeover thread does.
    let _handover_tx = handover_tx.clone();
    {
        let offer_sockets = Arc::clone(&offer_sockets);
        let expected = (
            cfg.public_listen.clone(),
            cfg.control_listen.clone(),
            cfg.engine.shards,
            cfg.engine.diag_addr.clone(),
        );
        std::thread::Builder::new()
            .name("takeover".into())
            .spawn(move || {
                let offer = |hello: &crate::takeover::Hello| {
                    check_takeover(hello, &expected)?;
                    offer_sockets
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_ref()
                        .ok_or_else(|| anyhow::anyhow!("this jaunt is stopping"))?
                        .dup()
                };
                crate::takeover::serve(&takeover_listener, &offer, &handover_tx)
            })?;
    }
    notify_systemd();

    print_banner(
        &cfg,
        engine.diag_addr(),
        &public_addr,
        &control_bound.to_string(),
        control.cas().host.pin(),
        admin_password.as_deref(),
    );
    tracing::info!(public = %engine.local_addr(), control = %control_bound, alpn = ALPN_CONTROL, "jaunt started");

    // CA rotation: each phase change rebuilds the TLS of the control API and the engine and
    // re-issues the local admin identity here, on this thread, before the change is answered
    // (the hook waits for it); the grace thread advances `--grace` rotations.
    let (rotated_tx, rotated_rx) = crossbeam_channel::unbounded::<crossbeam_channel::Sender<()>>();
    control.add_ca_hook(Box::new(move |_| {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        if rotated_tx.send(done_tx).is_ok() {
            let _ = done_rx.recv_timeout(Duration::from_secs(30));
        }
    }));
    let (grace_stop, grace_stopped) = crossbeam_channel::bounded::<()>(0);
    let grace = crate::rotation::spawn_grace_thread(control.clone(), grace_stopped)?;
    let control_addr = control_bound.to_string();
    let on_rotation = |control: &Control| -> anyhow::Result<()> {
        reload_after_rotation(control, &cfg, &names, &control_server, &engine)?;
        write_admin_identity(control, &cfg, &control_addr)
    };
    let mut drain_timeout = cfg.drain_timeout;
    let mut handed_over = false;
    while let Some(handover) = serve_until_shutdown(
        &control,
        &cfg,
        &names,
        &engine,
        &rotated_rx,
        &handover_rx,
        &on_rotation,
    )? {
        // A new process is ready on our sockets: stop accepting, let it start, then drain.
        let stopped = engine
            .stop_accepting(STOP_ACCEPTING_TIMEOUT)
            .map_err(|e| anyhow::anyhow!("engine: {e}"))
            .and_then(|()| {
                control_server
                    .stop_accepting()
                    .context("control API: stopping the acceptor")
            });
        match stopped {
            Ok(()) => {
                drain_timeout = Duration::from_secs(handover.hello.drain_timeout_secs);
                let _ = handover.stopped.send(Ok(()));
                handed_over = true;
                tracing::info!(
                    pid = handover.hello.pid,
                    ?drain_timeout,
                    "taken over: draining"
                );
                println!(
                    "taken over by jaunt pid {}: draining live sessions (at most {:?})",
                    handover.hello.pid, drain_timeout
                );
                break;
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "takeover: cannot stop accepting");
                let _ = handover.stopped.send(Err(e));
            }
        }
    }
    offer_sockets
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if !handed_over {
        let _ = std::fs::remove_file(crate::takeover::socket_path(&cfg.data_dir));
    }
    drop(grace_stop);
    let _ = grace.join();
    tracing::info!("shutting down: draining the engine");
    drop(beat_stop);
    if beats.join().is_err() {
        tracing::warn!("the heartbeat thread panicked");
    }
    beat(&store, &member, "draining");
    match engine.shutdown(drain_timeout) {
        Ok(report) if report.aborted_connections > 0 => {
            tracing::warn!(
                aborted = report.aborted_connections,
                "drain timeout cut connections"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "engine shutdown"),
    }
    // The engine has stopped: the writer appends what is queued, then ends.
    drop(audit_stop);
    if audit_writer.join().is_err() {
        tracing::warn!("the audit writer panicked");
    }
    drop(pruner_stop);
    if pruner.join().is_err() {
        tracing::warn!("the audit retention thread panicked");
    }
    drop(feed_stop);
    if feed.is_some_and(|f| f.join().is_err()) {
        tracing::warn!("the store change feed thread panicked");
    }
    beat(&store, &member, "stopped");
    control_server.shutdown();
    drop(lock);
    println!("jaunt stopped");
    Ok(())
}

/// Inventory events applied together (in one store transaction) when that many have queued up
/// while the last batch was written.
const INVENTORY_BATCH: usize = 1024;

/// How long a daemon being taken over waits for its shards to stop accepting.
const STOP_ACCEPTING_TIMEOUT: Duration = Duration::from_secs(5);

/// The sockets a takeover hands over (see `takeover.rs`); copies are made per request.
struct OfferSockets {
    lock: std::os::fd::OwnedFd,
    takeover: std::os::fd::OwnedFd,
    control: std::os::fd::OwnedFd,
    shards: Vec<std::os::fd::OwnedFd>,
    diag: Option<std::os::fd::OwnedFd>,
}

impl OfferSockets {
    fn dup(&self) -> anyhow::Result<crate::takeover::Sockets> {
        Ok(crate::takeover::Sockets {
            lock: self.lock.try_clone()?,
            takeover: self.takeover.try_clone()?,
            control: self.control.try_clone()?,
            shards: self
                .shards
                .iter()
                .map(std::os::fd::OwnedFd::try_clone)
                .collect::<Result<_, _>>()?,
            diag: self
                .diag
                .as_ref()
                .map(std::os::fd::OwnedFd::try_clone)
                .transpose()?,
        })
    }
}

/// A takeover needs the same addresses and shard count (the sockets are this daemon's).
fn check_takeover(
    hello: &crate::takeover::Hello,
    (public_listen, control_listen, shards, diag): &(String, String, usize, Option<String>),
) -> anyhow::Result<()> {
    if &hello.diag_addr != diag {
        anyhow::bail!(
            "engine.diag_addr differs: {} here, {} in the new process",
            diag.as_deref().unwrap_or("none"),
            hello.diag_addr.as_deref().unwrap_or("none")
        );
    }
    if &hello.public_listen != public_listen {
        anyhow::bail!(
            "the public listen address differs: {} here, {} in the new process",
            public_listen,
            hello.public_listen
        );
    }
    if &hello.control_listen != control_listen {
        anyhow::bail!(
            "control.listen_addr differs: {} here, {} in the new process",
            control_listen,
            hello.control_listen
        );
    }
    if hello.shards != *shards {
        anyhow::bail!(
            "engine.shards differs: {} here, {} in the new process",
            shards,
            hello.shards
        );
    }
    Ok(())
}

/// Tells systemd (`Type=notify`, `NotifyAccess=all`) that this process serves and is the
/// service's main process now (after a takeover too); nothing without `NOTIFY_SOCKET`.
fn notify_systemd() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message = format!("READY=1\nMAINPID={}\n", std::process::id());
    let sent = (|| -> std::io::Result<()> {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(message.as_bytes(), &addr)?;
        } else {
            socket.send_to(message.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// How often a control polls a shared store's revision: a change made through another control
/// is in force here within this period plus one snapshot build.
pub const CHANGE_FEED_PERIOD: Duration = Duration::from_millis(200);

/// Polls the shared store's revision until `stop` closes; publishes a snapshot whenever it
/// moved. A failing poll (the database restarting) is logged once per outage and retried.
fn run_change_feed(control: &Control, stop: &crossbeam_channel::Receiver<()>) {
    let mut failing = false;
    loop {
        match stop.recv_timeout(CHANGE_FEED_PERIOD) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        match control.store.poll_changes() {
            Ok(true) => {
                failing = false;
                // Another control may have changed a CA rotation phase: follow it.
                if let Err(e) = control.refresh_if_rotated() {
                    tracing::warn!(error = %e, "CA rotation: cannot reload the CAs from the store");
                }
                control.publish_snapshot();
            }
            Ok(false) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "store change feed: cannot read the revision; retrying");
                }
                failing = true;
            }
        }
    }
}

/// How often a host writes its heartbeat into the store.
pub const HEARTBEAT_PERIOD: Duration = Duration::from_secs(2);

/// Heartbeat rows older than this are removed (hosts long gone).
const FORGET_MEMBER_SECS: u64 = 24 * 3600;

fn beat(store: &Store, member: &crate::store::StoredMember, state: &str) {
    let m = crate::store::StoredMember {
        last_seen: unix_now(),
        state: state.to_string(),
        ..member.clone()
    };
    if let Err(e) = store.heartbeat(&m, FORGET_MEMBER_SECS) {
        tracing::warn!(error = %e, "heartbeat: cannot write to the store");
    }
}

/// Writes this host's heartbeat every [`HEARTBEAT_PERIOD`] until `stop` closes.
fn run_heartbeats(
    store: &Store,
    member: crate::store::StoredMember,
    stop: &crossbeam_channel::Receiver<()>,
) {
    loop {
        beat(store, &member, "serving");
        match stop.recv_timeout(HEARTBEAT_PERIOD) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

/// How long SIGTERM lets live sessions finish before cutting them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

fn resolve(addr: &str, what: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("{what} {addr}: cannot resolve"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{what} {addr}: resolves to no address"))
}

fn load_tls_files(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<(
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
)> {
    use rustls_pki_types::pem::PemObject;
    let chain = rustls_pki_types::CertificateDer::pem_file_iter(cert)
        .map_err(|e| anyhow::anyhow!("engine.tls.cert_file {}: {e:?}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("engine.tls.cert_file {}: {e:?}", cert.display()))?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("engine.tls.key_file {}: {e:?}", key.display()))?;
    Ok((chain, key))
}

fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    let resolved: Vec<_> = addr
        .to_socket_addrs()
        .with_context(|| format!("{what} {addr}: cannot resolve"))?
        .collect();
    TcpListener::bind(resolved.as_slice()).with_context(|| format!("{what} {addr}: cannot listen"))
}

/// `HOST:PORT` with port 0 replaced by the port actually bound.
fn advertised(addr: &str, bound_port: u16) -> String {
    match addr.rsplit_once(':') {
        Some((host, "0")) => format!("{host}:{bound_port}"),
        _ => addr.to_string(),
    }
}

/// In dev mode, an `admin` user with the `editor` and `access` roles whose password is in
/// `DATA_DIR/admin-password`; created once, kept across restarts.
fn ensure_dev_admin(control: &Control, cfg: &DaemonConfig) -> anyhow::Result<String> {
    let path = cfg.data_dir.join("admin-password");
    if let (Ok(existing), Ok(Some(_))) = (
        std::fs::read_to_string(&path),
        control.store.get_user(LOCAL_ADMIN),
    ) {
        return Ok(existing.trim().to_string());
    }
    let password = auth::random_password()?;
    let user = jaunt_config::resource::User::new(
        LOCAL_ADMIN,
        vec!["editor".into(), "access".into()],
        [("logins".to_string(), vec!["root".to_string()])]
            .into_iter()
            .collect(),
    );
    let stored = StoredUser {
        name: LOCAL_ADMIN.into(),
        spec: serde_json::to_string(&user)?,
        password_hash: auth::hash_password(&password)?,
        otp_secret: None,
        created: unix_now(),
    };
    if !control.store.insert_user(&stored)? {
        control
            .store
            .set_user_credentials(LOCAL_ADMIN, &stored.password_hash, None)?;
    }
    profile::write_private(&path, format!("{password}\n").as_bytes())?;
    Ok(password)
}

/// Issues the local admin identity (role `editor`) into `DATA_DIR/admin`. A re-issue (each CA
/// rotation phase) keeps the saved keys and replaces only the certificates, so that an admin
/// command reading the files meanwhile never pairs a new key with the old certificate.
fn write_admin_identity(
    control: &Control,
    cfg: &DaemonConfig,
    control_addr: &str,
) -> anyhow::Result<()> {
    let profile = Profile::admin(&cfg.data_dir);
    let saved = |path: PathBuf| std::fs::read_to_string(path).ok();
    let keys = match (
        saved(profile.tls_key_path(LOCAL_ADMIN)),
        saved(profile.ssh_key_path(LOCAL_ADMIN)),
    ) {
        (Some(tls), Some(ssh)) => LocalKeys::from_saved(&tls, &ssh).or_else(|e| {
            tracing::warn!(error = %e, "the saved admin keys are unusable; making new ones");
            LocalKeys::generate()
        })?,
        _ => LocalKeys::generate()?,
    };
    let now = unix_now();
    let identity = Identity {
        roles: vec!["editor".into()],
        ..Identity::issued(
            IdentityKind::User,
            LOCAL_ADMIN,
            &cfg.cluster,
            now,
            ADMIN_TTL_SECS,
        )
    };
    let cas = control.cas();
    let tls = cas
        .user
        .sign_x509(&identity, &ca::spki_pem_to_der(&keys.tls_public_pem)?, &[])?;
    let ssh = cas.user.sign_ssh(&identity, keys.ssh_key.public_key())?;
    let certs = Certs {
        identity,
        tls_cert: ca::cert_pem(&tls),
        ssh_cert: ssh.to_openssh()?,
        host_ca_tls: cas.trusted_pem(ca::CaKind::Host),
        user_ca_tls: cas.trusted_pem(ca::CaKind::User),
        host_ca_ssh: cas.ssh_lines(ca::CaKind::Host).join("\n"),
        user_ca_ssh: cas.ssh_lines(ca::CaKind::User).join("\n"),
        engines: Vec::new(),
    };
    profile.save(control_addr, &keys, &certs)?;
    Ok(())
}

fn print_banner(
    cfg: &DaemonConfig,
    diag: Option<SocketAddr>,
    public_addr: &str,
    control_addr: &str,
    pin: &str,
    admin_password: Option<&str>,
) {
    println!("Jaunt {} is running.", env!("CARGO_PKG_VERSION"));
    println!("  cluster:      {}", cfg.cluster);
    println!("  public addr:  {public_addr}");
    println!("  control API:  {control_addr}");
    println!("  data dir:     {}", cfg.data_dir.display());
    println!("  CA pin:       {pin}");
    if let Some(diag) = diag {
        println!("  metrics:      http://{diag}/metrics");
    }
    if admin_password.is_some() {
        let pw = cfg.data_dir.join("admin-password");
        println!();
        println!("Log in as the dev admin (password in {}):", pw.display());
        println!(
            "  jaunt login --proxy {public_addr} --user admin --ca-pin {pin} --password-stdin < {}",
            pw.display()
        );
    }
    println!();
    println!(
        "Admin commands on this host: jaunt users add NAME --roles access --data-dir {}",
        cfg.data_dir.display()
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
}

/// The config file `jaunt start --config FILE` runs from, recorded by the command line
/// ([`set_config_file`]); SIGHUP re-reads it.
static CONFIG_FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Records the config file this process was started from, for SIGHUP to re-read (the daemon's
/// limits, the agent's labels and services). The first call wins.
pub fn set_config_file(path: &std::path::Path) {
    let _ = CONFIG_FILE.set(path.to_path_buf());
}

/// The config file this process was started from, as [`set_config_file`] recorded it (`None`
/// for `--dev` and for `jaunt agent` flags, which SIGHUP cannot re-read).
pub fn config_file() -> Option<PathBuf> {
    CONFIG_FILE.get().cloned()
}

/// What a SIGHUP takes from the re-read config file: the engine's limits, and the settings that
/// changed but need a restart.
#[derive(Debug)]
struct Reloaded {
    handshake_timeout: Duration,
    idle_timeout: Duration,
    max_connections_per_shard: usize,
    /// Config keys whose new values apply only after a restart.
    restart: Vec<&'static str>,
}

/// Re-reads and validates `path` against what runs now (`cfg`). Errors read like start-up's:
/// `FILE:LINE:COL: key: message`.
fn read_reload(cfg: &DaemonConfig, path: &std::path::Path) -> anyhow::Result<Reloaded> {
    let config = jaunt_config::file::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (Some(control), Some(engine)) = (config.control.as_ref(), config.engine.as_ref()) else {
        anyhow::bail!(
            "{}: the file no longer has both a control and an engine section",
            path.display()
        );
    };
    let shards = engine
        .shards
        .resolve(std::thread::available_parallelism().map_or(1, |n| n.get()))
        .get();
    let mut restart = Vec::new();
    let mut changed = |key: &'static str, differs: bool| {
        if differs {
            restart.push(key);
        }
    };
    changed("cluster_name", control.cluster_name != cfg.cluster);
    changed(
        "control.listen_addr",
        control.listen_addr.to_string() != cfg.control_listen,
    );
    changed(
        "control.second_factor",
        (control.second_factor == jaunt_config::file::SecondFactor::Otp) != cfg.second_factor,
    );
    changed(
        "control.user_cert_ttl",
        control.user_cert_ttl.as_secs() != cfg.user_ttl_secs,
    );
    changed(
        "control.host_cert_ttl",
        control.host_cert_ttl.as_secs() != cfg.host_ttl_secs,
    );
    changed(
        "engine.public_addr",
        engine.public_addr.to_string() != cfg.public_addr,
    );
    changed(
        "engine.listen_addr",
        engine.listen_addr.to_string() != cfg.public_listen,
    );
    changed("engine.shards", shards != cfg.engine.shards);
    changed(
        "engine.io_memory",
        usize::try_from(engine.io_memory_bytes).unwrap_or(usize::MAX) != cfg.engine.io_memory,
    );
    changed(
        "engine.diag_addr",
        Some(engine.diag_addr.to_string()) != cfg.engine.diag_addr,
    );
    changed(
        "engine.tls",
        engine
            .tls
            .as_ref()
            .map(|t| (t.cert_file.clone(), t.key_file.clone()))
            != cfg.engine.tls_files,
    );
    changed(
        "engine.max_handshakes_per_shard",
        usize::try_from(engine.max_handshakes_per_shard).unwrap_or(usize::MAX)
            != cfg.engine.max_handshakes_per_shard,
    );
    changed(
        "audit.queue_capacity",
        config.audit.queue_capacity != cfg.engine.audit_queue_capacity,
    );
    changed(
        "audit.on_overflow",
        config.audit.on_overflow != cfg.engine.audit_overflow,
    );
    Ok(Reloaded {
        handshake_timeout: engine.handshake_timeout.as_std(),
        idle_timeout: engine.idle_timeout.as_std(),
        max_connections_per_shard: usize::try_from(engine.max_connections_per_shard)
            .unwrap_or(usize::MAX),
        restart,
    })
}

/// SIGHUP's config part: re-read the config file (if the daemon runs from one) and hand the
/// engine its new limits; a file that does not load or validate keeps every current setting.
fn reload_config(
    cfg: &DaemonConfig,
    limits: &mut jaunt_engine::server::EngineLimits,
    engine: &jaunt_engine::server::EngineHandle,
) {
    let Some(path) = config_file() else {
        return;
    };
    let reloaded = match read_reload(cfg, &path) {
        Ok(reloaded) => reloaded,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "config reload failed");
            eprintln!(
                "error: reloading {} failed (the current settings stay): {e:#}",
                path.display()
            );
            return;
        }
    };
    for key in &reloaded.restart {
        tracing::warn!(key, file = %path.display(), "changed setting needs a restart");
        eprintln!(
            "warning: {key} changed in {}: it applies after a restart of jaunt, not on SIGHUP",
            path.display()
        );
    }
    let next = jaunt_engine::server::EngineLimits {
        handshake_timeout: reloaded.handshake_timeout,
        idle_timeout: reloaded.idle_timeout,
        max_connections_per_shard: reloaded.max_connections_per_shard,
        ..*limits
    };
    if next == *limits {
        println!("reloaded {}: limits unchanged", path.display());
        return;
    }
    match engine.reload_limits(next) {
        Ok(()) => {
            *limits = next;
            tracing::info!(?next, "engine limits reloaded");
            println!(
                "reloaded {}: engine limits: max_connections_per_shard {}, handshake_timeout {:?}, idle_timeout {:?} (new connections use them)",
                path.display(),
                next.max_connections_per_shard,
                next.handshake_timeout,
                next.idle_timeout
            );
        }
        Err(e) => {
            eprintln!("error: applying the reloaded limits failed (the current ones stay): {e}")
        }
    }
}

/// Waits for SIGTERM/SIGINT. Meanwhile SIGHUP re-reads the config file (when the daemon runs
/// from one: the engine's limits apply to new connections, settings that need a restart are
/// named, a bad file keeps everything as it is) and reloads the public port's certificate
/// (re-read from `engine.tls` files, or re-issued by the host CA), all without dropping
/// connections; and the host-CA-issued certificate is renewed by itself in the last third of
/// its lifetime.
fn serve_until_shutdown(
    control: &Control,
    cfg: &DaemonConfig,
    names: &[String],
    engine: &jaunt_engine::server::EngineHandle,
    rotated: &crossbeam_channel::Receiver<crossbeam_channel::Sender<()>>,
    handover: &crossbeam_channel::Receiver<crate::takeover::Handover>,
    on_rotation: &dyn Fn(&Control) -> anyhow::Result<()>,
) -> anyhow::Result<Option<crate::takeover::Handover>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("installing signal handlers")?;
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if tx.send(sig).is_err() {
                return;
            }
        }
    });
    let mut renew_at = unix_now() + SERVER_CERT_TTL_SECS * 2 / 3;
    let mut limits = jaunt_engine::server::EngineLimits {
        handshake_timeout: cfg.engine.handshake_timeout,
        idle_timeout: cfg.engine.idle_timeout,
        max_connections_per_shard: cfg.engine.max_connections_per_shard,
        tunnel_timers: jaunt_engine::mux::Config::default(),
    };
    loop {
        let received = crossbeam_channel::select! {
            recv(rx) -> sig => sig.map_err(|_| crossbeam_channel::RecvTimeoutError::Disconnected),
            recv(rotated) -> done => {
                if let Ok(done) = done {
                    match on_rotation(control) {
                        Ok(()) => tracing::info!("CA rotation: TLS of the control API and the engine reloaded"),
                        Err(e) => {
                            tracing::error!(error = %e, "CA rotation: reloading TLS failed");
                            eprintln!("error: applying the CA rotation phase to the control API and engine failed: {e:#}");
                        }
                    }
                    let _ = done.send(());
                }
                continue;
            }
            recv(handover) -> request => match request {
                Ok(request) => return Ok(Some(request)),
                Err(_) => continue,
            },
            default(Duration::from_secs(600)) => Err(crossbeam_channel::RecvTimeoutError::Timeout),
        };
        let reload = match received {
            Ok(SIGHUP) => {
                tracing::info!("SIGHUP: reloading the config file's limits and the certificate");
                reload_config(cfg, &mut limits, engine);
                true
            }
            Ok(sig) => {
                tracing::info!(signal = sig, "signal received");
                return Ok(None);
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                cfg.engine.tls_files.is_none() && unix_now() >= renew_at
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Ok(None),
        };
        if reload {
            match engine_tls_configs(control, cfg, names, None)
                .and_then(|tls| engine.reload_tls(tls).map_err(anyhow::Error::from))
            {
                Ok(()) => {
                    renew_at = unix_now() + SERVER_CERT_TTL_SECS * 2 / 3;
                    println!("reloaded the public port's certificate");
                }
                Err(e) => {
                    eprintln!("error: reloading the certificate failed (the old one stays): {e:#}")
                }
            }
        }
    }
}

/// A server certificate from the host CA for `names`, over a key made here.
fn issue_server_cert(
    control: &Control,
    cluster: &str,
    names: &[String],
) -> anyhow::Result<(
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
)> {
    let keys = LocalKeys::generate()?;
    let now = unix_now();
    let identity = Identity {
        roles: vec!["proxy".into()],
        ..Identity::issued(
            IdentityKind::Host,
            "jaunt-proxy",
            cluster,
            now,
            SERVER_CERT_TTL_SECS,
        )
    };
    let cas = control.cas();
    let leaf = cas.host.sign_x509(
        &identity,
        &ca::spki_pem_to_der(&keys.tls_public_pem)?,
        names,
    )?;
    Ok((
        vec![leaf, cas.host.cert_der().clone()],
        keys.tls_private_der()?,
    ))
}

/// The engine's three TLS configurations: the operator's certificate files if configured,
/// else `issued` (or a freshly issued host-CA certificate).
fn engine_tls_configs(
    control: &Control,
    cfg: &DaemonConfig,
    names: &[String],
    issued: Option<(
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    )>,
) -> anyhow::Result<jaunt_engine::server::TlsConfigs> {
    let (chain, key) = match (&cfg.engine.tls_files, issued) {
        (Some((cert, key)), _) => load_tls_files(cert, key)?,
        (None, Some(issued)) => issued,
        (None, None) => issue_server_cert(control, &cfg.cluster, names)?,
    };
    let cas = control.cas();
    Ok(jaunt_engine::server::TlsConfigs::build_with_ticket_secret(
        chain,
        key,
        &cas.trusted_der(ca::CaKind::User),
        &cas.trusted_der(ca::CaKind::Host),
        &ticket_secret(&cfg.data_dir)?,
    )?)
}

/// The file in the data dir that keeps the engine's session-ticket secret.
pub const TICKET_SECRET_FILE: &str = "tls-tickets.key";

/// The engine's session-ticket secret (`jaunt_engine::server::tickets`), made on the first
/// start and kept in the data dir (mode 0600), so agents' tunnels resume their TLS sessions
/// after a restart or a takeover. An unreadable one is replaced (the only loss: one round of
/// full handshakes).
fn ticket_secret(data_dir: &std::path::Path) -> anyhow::Result<jaunt_engine::server::TicketSecret> {
    use jaunt_engine::server::TicketSecret;
    let path = data_dir.join(TICKET_SECRET_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => match TicketSecret::from_bytes(&bytes) {
            Ok(secret) => return Ok(secret),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "replacing the session-ticket secret")
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
    let secret = TicketSecret::generate()?;
    crate::profile::write_private(&path, secret.as_bytes())?;
    Ok(secret)
}

/// The control API's TLS config: `chain` as its certificate, and client certificates from
/// every user and host CA trusted now (both of a kind during a rotation).
fn api_tls(
    control: &Control,
    chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let cas = control.cas();
    let mut client_roots = cas.trusted_der(ca::CaKind::User);
    client_roots.extend(cas.trusted_der(ca::CaKind::Host));
    Ok(http::server_config(chain, key, client_roots)?)
}

/// After a CA rotation phase change: the control API and the engine trust the CAs trusted now,
/// and present a certificate from the host CA that signs now (re-issued only when that CA
/// changed, or the config names its own files). Live connections keep their TLS.
fn reload_after_rotation(
    control: &Control,
    cfg: &DaemonConfig,
    names: &[String],
    api: &http::ServerHandle,
    engine: &jaunt_engine::server::EngineHandle,
) -> anyhow::Result<()> {
    let (chain, key) = issue_server_cert(control, &cfg.cluster, names)?;
    api.reload_tls(api_tls(control, chain.clone(), key.clone_key())?);
    let tls = engine_tls_configs(control, cfg, names, Some((chain, key)))?;
    engine.reload_tls(tls)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(advertised("127.0.0.1:0", 4321), "127.0.0.1:4321");
        assert_eq!(
            advertised("proxy.example.com:443", 4321),
            "proxy.example.com:443"
        );
        assert_eq!(host_part("[::1]:443"), "::1");
        assert_eq!(host_part("proxy.example.com:443"), "proxy.example.com");
    }

    #[test]
    fn the_config_files_connection_bound_is_the_engines_default() {
        // A daemon started without a config file (the dev cluster) takes the engine's default;
        // one with a file that leaves the key out takes the file's. They must be one number.
        assert_eq!(
            jaunt_config::file::DEFAULT_MAX_CONNECTIONS_PER_SHARD as usize,
            jaunt_engine::server::DEFAULT_MAX_CONNECTIONS_PER_SHARD
        );
        assert_eq!(
            EngineSettings::dev(None).max_connections_per_shard,
            jaunt_config::file::DEFAULT_MAX_CONNECTIONS_PER_SHARD as usize
        );
    }

    #[test]
    fn the_config_files_handshake_bound_is_the_engines_default() {
        assert_eq!(
            jaunt_config::file::DEFAULT_MAX_HANDSHAKES_PER_SHARD as usize,
            jaunt_engine::server::DEFAULT_MAX_HANDSHAKES_PER_SHARD
        );
    }
}
