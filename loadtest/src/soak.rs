//! `soak`: a long mixed run at a steady rate, sampled every few seconds, with a `kill -9` of the
//! daemon halfway and a check that nothing it had acknowledged was lost.
//!
//! The size is the number of user streams (`--soak-opens`); the other operations are paced to
//! the streams' progress, so the mix stays the same over the whole run: per 1,000,000 opens,
//! 10,000 logins, 500 `jaunt ssh` sessions, 20,000 app requests, 20,000 PostgreSQL queries,
//! 10 agent restarts and 100 lock/unlock cycles (each at least 1-2). Every `--soak-interval`
//! seconds a sample records RSS and open descriptors of the daemon and the main agent, the
//! engine's per-shard gauges (`jaunt_connections_active`, `jaunt_streams_open`,
//! `jaunt_tunnels`), the store's size on disk, and the count of each operation. The report
//! (`soak.svg`, `soak.json`, the summary) gives the least-squares slope of each curve after
//! warm-up, separately before the kill and after the restart for the processes' own curves.
//!
//! What "acknowledged" means for the kill check: a login that returned certificates (its
//! `user.login` event was committed before the answer), a lock that `jaunt lock` reported
//! created and a lock that `jaunt rm` reported removed. Engine session events are queued, not
//! acknowledged, and are not checked.
//!
//! Not here: the cluster and its servers (`soak_env.rs`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use jaunt_config::wire::dial::{DialKind, DialRequest};
use serde_json::json;

use crate::client::JauntUser;
use crate::procfs;
use crate::report::{self, Row};
use crate::soak_env::{self, wait_until, SoakCluster};

/// How big the soak runs and how often it samples.
#[derive(Clone, Debug)]
pub struct SoakSize {
    /// User streams: the run's size.
    pub opens: u64,
    /// Seconds between samples.
    pub interval: f64,
    /// `audit.retention` of the cluster.
    pub retention: String,
    /// Stream client threads.
    pub threads: usize,
}

impl SoakSize {
    pub fn full() -> SoakSize {
        SoakSize {
            opens: 1_000_000,
            interval: 5.0,
            retention: "10m".into(),
            threads: 2,
        }
    }

    pub fn smoke() -> SoakSize {
        SoakSize {
            opens: 3000,
            interval: 0.5,
            retention: "8s".into(),
            threads: 2,
        }
    }
}

/// The operations of the mix, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Stream,
    Login,
    Ssh,
    App,
    Pg,
    AgentRestart,
    LockCycle,
}

impl Op {
    const ALL: [Op; 7] = [
        Op::Stream,
        Op::Login,
        Op::Ssh,
        Op::App,
        Op::Pg,
        Op::AgentRestart,
        Op::LockCycle,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Stream => "stream",
            Op::Login => "login",
            Op::Ssh => "ssh",
            Op::App => "app_request",
            Op::Pg => "pg_query",
            Op::AgentRestart => "agent_restart",
            Op::LockCycle => "lock_cycle",
        }
    }

    /// How many per 1,000,000 stream opens, and the least in any run.
    fn quota(self, opens: u64) -> u64 {
        let (per_million, least) = match self {
            Op::Stream => return opens,
            Op::Login => (10_000, 3),
            Op::Ssh => (500, 2),
            Op::App => (20_000, 5),
            Op::Pg => (20_000, 5),
            Op::AgentRestart => (10, 2),
            Op::LockCycle => (100, 2),
        };
        (opens.saturating_mul(per_million) / 1_000_000).max(least)
    }
}

/// Counts of one operation.
#[derive(Default)]
struct Counter {
    ok: AtomicU64,
    /// Failures outside the kill's outage.
    errors: AtomicU64,
    /// Failures while the daemon was down or coming back.
    outage_errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// What every worker shares.
struct Shared {
    counters: BTreeMap<Op, Counter>,
    stop: AtomicBool,
    /// True from just before the kill until the restarted daemon serves streams again.
    outage: AtomicBool,
    /// Logins that returned certificates: (unix seconds when the request was sent, when the
    /// answer came).
    logins: Mutex<Vec<(f64, f64)>>,
    /// The lock cycle's acknowledged state: the lock id while locked, None while unlocked; and
    /// the unix times of acknowledged lock creations and removals.
    lock: Mutex<LockState>,
    /// Restart → reachable again, seconds, per agent restart.
    agent_back: Mutex<Vec<f64>>,
    /// Lock → the user's stream refused (seconds); removal → allowed again (seconds); removals
    /// still refused after 10 s.
    lock_delays: Mutex<(Vec<f64>, Vec<f64>, u64)>,
}

#[derive(Default, Clone)]
struct LockState {
    current: Option<String>,
    created: Vec<(f64, f64)>,
    removed: Vec<(f64, f64)>,
}

fn unix_f() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Shared {
    fn opens(&self) -> u64 {
        self.counters[&Op::Stream].ok.load(Ordering::Relaxed)
    }

    /// Runs one operation and counts it; an error during the outage is counted apart.
    fn run(&self, op: Op, f: impl FnOnce() -> anyhow::Result<()>) -> bool {
        let before = self.outage.load(Ordering::SeqCst);
        let r = f();
        let after = self.outage.load(Ordering::SeqCst);
        let c = &self.counters[&op];
        match r {
            Ok(()) => {
                c.ok.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                if before || after {
                    c.outage_errors.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.errors.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut f) = c.first_error.lock() {
                        f.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
                false
            }
        }
    }

    /// Blocks until the `i`-th of `quota` operations is due (paced to the streams' progress);
    /// false when the run is over.
    fn due(&self, i: u64, quota: u64, target: u64) -> bool {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            // The i-th op is due once opens reach i/quota of the target.
            if self.opens().saturating_mul(quota) >= i.saturating_mul(target) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// One sample of the run.
#[derive(Clone, Debug, Default)]
struct Sample {
    t: f64,
    daemon_rss: f64,
    daemon_fds: f64,
    agent_rss: f64,
    agent_fds: f64,
    store_bytes: f64,
    /// Gauges from `/metrics`, by name (`jaunt_connections_active{shard="0"}`).
    gauges: BTreeMap<String, f64>,
    counts: BTreeMap<&'static str, f64>,
}

fn fds(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as f64)
        .unwrap_or(0.0)
}

fn file_size(p: &Path) -> f64 {
    std::fs::metadata(p).map(|m| m.len() as f64).unwrap_or(0.0)
}

/// The store's bytes on disk: the database, its WAL and shared-memory index.
fn store_bytes(data_dir: &Path) -> f64 {
    ["jaunt.db", "jaunt.db-wal", "jaunt.db-shm"]
        .iter()
        .map(|f| file_size(&data_dir.join(f)))
        .sum()
}

/// `GET /metrics` from the diagnostics endpoint; the gauges the soak plots.
fn gauges(diag: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(addr) = diag.parse::<std::net::SocketAddr>() else {
        return out;
    };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return out;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /metrics HTTP/1.0\r\nHost: soak\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return out;
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let wanted = [
            "jaunt_connections_active{",
            "jaunt_streams_open{",
            "jaunt_tunnels{",
        ];
        if !wanted.iter().any(|w| line.starts_with(w)) {
            continue;
        }
        if let Some((k, v)) = line.rsplit_once(' ') {
            if let Ok(v) = v.parse::<f64>() {
                out.insert(k.to_string(), v);
            }
        }
    }
    out
}

/// Least-squares slope of `(x, y)`; 0 for fewer than two points.
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

/// A curve's trend over a window: slope per hour, and the change the slope makes over the
/// window as a percentage of the mean (the "within 5%" figure), plus min and max.
#[derive(Clone, Debug)]
pub struct Trend {
    pub name: String,
    pub window: String,
    pub points: usize,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    pub slope_per_hour: f64,
    pub drift_pct: f64,
}

pub fn trend(name: &str, window: &str, points: &[(f64, f64)]) -> Option<Trend> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mean = points.iter().map(|p| p.1).sum::<f64>() / n;
    let s = slope(points);
    let span = points.last()?.0 - points.first()?.0;
    let drift_pct = if mean.abs() > 0.0 {
        s * span / mean * 100.0
    } else {
        0.0
    };
    Some(Trend {
        name: name.to_string(),
        window: window.to_string(),
        points: points.len(),
        mean,
        min: points.iter().map(|p| p.1).fold(f64::MAX, f64::min),
        max: points.iter().map(|p| p.1).fold(f64::MIN, f64::max),
        slope_per_hour: s * 3600.0,
        drift_pct,
    })
}

/// What the kill check found.
#[derive(Debug, Default)]
struct KillCheck {
    at_opens: u64,
    restart_s: f64,
    streams_back_s: f64,
    logins_acked: usize,
    logins_found: usize,
    lock_expected: Option<String>,
    locks_found: Vec<String>,
    lock_events_acked: usize,
    lock_events_found: usize,
    problems: Vec<String>,
}

/// Runs the soak against a cluster it starts itself; writes `soak.svg`, `soak.json`; returns
/// the report rows and whether every check passed.
pub fn run(
    jaunt: &Path,
    backend: &str,
    size: &SoakSize,
    out: &Path,
) -> anyhow::Result<(Vec<Row>, String, bool)> {
    let mut cluster = SoakCluster::start(jaunt, backend, &size.retention)?;
    let result = run_on(&mut cluster, backend, size, out);
    cluster.stop();
    result
}

fn run_on(
    c: &mut SoakCluster,
    backend: &str,
    size: &SoakSize,
    out: &Path,
) -> anyhow::Result<(Vec<Row>, String, bool)> {
    let user = JauntUser::from_home(&c.home)?;
    let lock_user = JauntUser::from_home(&c.lock_home)?;
    let stream_target = user.target(soak_env::TCP_APP);
    let restart_target = user.target(soak_env::RESTART_APP);
    let lock_target = lock_user.target(soak_env::TCP_APP);
    // Everything reachable before the clock starts.
    wait_until(Duration::from_secs(60), "the TCP app answers", || {
        stream_target.connect(true).map(|c| c.close())
    })?;
    wait_until(Duration::from_secs(60), "the restarted agent's app", || {
        restart_target.connect(false).map(|c| c.close())
    })?;
    let dialer = Arc::new(dialer(&c.home)?);
    wait_until(Duration::from_secs(60), "the web app answers", || {
        app_request(&dialer)
    })?;
    if c.ssh_missing.is_none() {
        wait_until(Duration::from_secs(60), "jaunt ssh works", || ssh_once(c))?;
    }
    if c.pg_missing.is_none() {
        wait_until(Duration::from_secs(60), "psql through jaunt works", || {
            PgSession::open(c)?.query(1)
        })?;
    }

    let target = size.opens;
    let shared = Arc::new(Shared {
        counters: Op::ALL.iter().map(|o| (*o, Counter::default())).collect(),
        stop: AtomicBool::new(false),
        outage: AtomicBool::new(false),
        logins: Mutex::new(Vec::new()),
        lock: Mutex::new(LockState::default()),
        agent_back: Mutex::new(Vec::new()),
        lock_delays: Mutex::new((Vec::new(), Vec::new(), 0)),
    });
    let quotas: BTreeMap<Op, u64> = Op::ALL.iter().map(|o| (*o, o.quota(target))).collect();
    let daemon_pid = Arc::new(AtomicU64::new(u64::from(c.daemon.pid())));
    let diag = Arc::new(Mutex::new(c.diag_addr.clone()));
    let agent_pid = c.agent_pid().unwrap_or(0);
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(Vec::new()));
    let cluster_mx = Arc::new(Mutex::new(()));
    let start = Instant::now();
    let started_unix = unix_f();
    let jaunt = c.jaunt.clone();
    let data_dir = c.data_dir.clone();

    let mut kill = KillCheck::default();
    let mut t_kill = None;
    let mut t_back = None;
    std::thread::scope(|s| -> anyhow::Result<()> {
        // The sampler.
        {
            let (shared, samples, daemon_pid, diag, data_dir) = (
                shared.clone(),
                samples.clone(),
                daemon_pid.clone(),
                diag.clone(),
                data_dir.clone(),
            );
            let interval = Duration::from_secs_f64(size.interval.max(0.1));
            s.spawn(move || {
                let mut next = Instant::now();
                loop {
                    let pid = u32::try_from(daemon_pid.load(Ordering::SeqCst)).unwrap_or(0);
                    let d = diag.lock().map(|d| d.clone()).unwrap_or_default();
                    let sample = Sample {
                        t: start.elapsed().as_secs_f64(),
                        daemon_rss: procfs::rss_bytes(pid).unwrap_or(0) as f64,
                        daemon_fds: fds(pid),
                        agent_rss: procfs::rss_bytes(agent_pid).unwrap_or(0) as f64,
                        agent_fds: fds(agent_pid),
                        store_bytes: store_bytes(&data_dir),
                        gauges: gauges(&d),
                        counts: Op::ALL
                            .iter()
                            .map(|o| {
                                (
                                    o.name(),
                                    shared.counters[o].ok.load(Ordering::Relaxed) as f64,
                                )
                            })
                            .collect(),
                    };
                    if let Ok(mut v) = samples.lock() {
                        v.push(sample);
                    }
                    if shared.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    next += interval;
                    let now = Instant::now();
                    if next > now {
                        // Sleep in small steps so the end of the run is not delayed.
                        while Instant::now() < next && !shared.stop.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    } else {
                        next = now;
                    }
                }
            });
        }
        // Streams.
        for _ in 0..size.threads.max(1) {
            let (shared, t) = (shared.clone(), stream_target.clone());
            s.spawn(move || {
                while !shared.stop.load(Ordering::Relaxed) && shared.opens() < target {
                    shared.run(Op::Stream, || {
                        let conn = t.connect(true)?;
                        conn.close();
                        Ok(())
                    });
                }
            });
        }
        // Logins.
        {
            let shared = shared.clone();
            let quota = quotas[&Op::Login];
            let (jaunt, home, addr, pin) = (
                jaunt.clone(),
                c.login_home.clone(),
                c.public_addr.clone(),
                c.pin.clone(),
            );
            s.spawn(move || {
                for i in 0..quota {
                    if !shared.due(i, quota, target) {
                        break;
                    }
                    shared.run(Op::Login, || {
                        let sent = unix_f();
                        crate::cluster::run_jaunt(
                            &jaunt,
                            &home,
                            &[
                                "login",
                                "--proxy",
                                &addr,
                                "--user",
                                soak_env::LOGIN_USER,
                                "--password-stdin",
                                "--ca-pin",
                                &pin,
                            ],
                            Some(&format!("{}\n", crate::cluster::PASSWORD)),
                        )?;
                        if let Ok(mut l) = shared.logins.lock() {
                            l.push((sent, unix_f()));
                        }
                        Ok(())
                    });
                }
            });
        }
        // jaunt ssh through the real sshd.
        if c.ssh_missing.is_none() {
            let shared = shared.clone();
            let quota = quotas[&Op::Ssh];
            let (jaunt, home) = (jaunt.clone(), c.home.clone());
            s.spawn(move || {
                for i in 0..quota {
                    if !shared.due(i, quota, target) {
                        break;
                    }
                    shared.run(Op::Ssh, || ssh_with(&jaunt, &home));
                }
            });
        }
        // App requests.
        {
            let (shared, dialer) = (shared.clone(), dialer.clone());
            let quota = quotas[&Op::App];
            s.spawn(move || {
                for i in 0..quota {
                    if !shared.due(i, quota, target) {
                        break;
                    }
                    shared.run(Op::App, || app_request(&dialer));
                }
            });
        }
        // PostgreSQL queries: one psql session for up to 50 queries, then a new one.
        if c.pg_missing.is_none() {
            let shared = shared.clone();
            let quota = quotas[&Op::Pg];
            let (jaunt, home) = (jaunt.clone(), c.home.clone());
            s.spawn(move || {
                let mut session: Option<PgSession> = None;
                let mut used = 0;
                for i in 0..quota {
                    if !shared.due(i, quota, target) {
                        break;
                    }
                    let ok = shared.run(Op::Pg, || {
                        if session.is_none() || used >= 50 {
                            session = None;
                            session = Some(PgSession::open_with(&jaunt, &home)?);
                            used = 0;
                        }
                        used += 1;
                        match session.as_mut() {
                            Some(p) => p.query(i),
                            None => Err(anyhow!("no psql session")),
                        }
                    });
                    if !ok {
                        session = None;
                    }
                }
            });
        }
        // Agent restarts: SIGTERM the second agent, start it again, time until its app answers.
        {
            let shared = shared.clone();
            let quota = quotas[&Op::AgentRestart];
            let restart_target = restart_target.clone();
            let cluster_mx = cluster_mx.clone();
            let agent2 = std::sync::Mutex::new(c.agent2.take());
            let spawn = AgentSpawner::new(c, backend);
            s.spawn(move || {
                for i in 1..=quota {
                    if !shared.due(i, quota + 1, target) {
                        break;
                    }
                    shared.run(Op::AgentRestart, || {
                        let mut slot = agent2.lock().map_err(|_| anyhow!("poisoned"))?;
                        // Not across the daemon's kill: the restart is an agent's, alone.
                        let held = cluster_mx.lock();
                        if let Some(mut a) = slot.take() {
                            a.terminate(Duration::from_secs(10));
                        }
                        let t = Instant::now();
                        *slot = Some(spawn.spawn()?);
                        drop(held);
                        wait_until(Duration::from_secs(60), "the restarted agent's app", || {
                            restart_target.connect(false).map(|c| c.close())
                        })?;
                        if let Ok(mut b) = shared.agent_back.lock() {
                            b.push(t.elapsed().as_secs_f64());
                        }
                        Ok(())
                    });
                }
                // Keep the agent alive until the end; dropped (killed) with the scope.
                while !shared.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                drop(agent2);
            });
        }
        // Lock/unlock cycles of the lock user: locked, its stream is refused; unlocked, it
        // works again.
        {
            let shared = shared.clone();
            let quota = quotas[&Op::LockCycle];
            let admin = Admin::new(c);
            let lock_target = lock_target.clone();
            let cluster_mx = cluster_mx.clone();
            s.spawn(move || {
                for i in 0..quota {
                    if !shared.due(i, quota, target) {
                        break;
                    }
                    shared.run(Op::LockCycle, || {
                        // Each command under the cluster lock: the kill comes between commands,
                        // so the lock state at the kill is acknowledged, not in flight (the
                        // kill can fall while the user is locked).
                        let held = cluster_mx.lock();
                        let sent = unix_f();
                        let printed = admin.run(&[
                            "lock",
                            "--user",
                            soak_env::LOCK_USER,
                            "--message",
                            "soak",
                        ])?;
                        let id = printed
                            .rsplit_once("(lock/")
                            .and_then(|(_, r)| r.split_once(')'))
                            .map(|(id, _)| id.to_string())
                            .ok_or_else(|| anyhow!("jaunt lock printed {printed:?}"))?;
                        if let Ok(mut l) = shared.lock.lock() {
                            l.current = Some(id.clone());
                            l.created.push((sent, unix_f()));
                        }
                        drop(held);
                        let t = Instant::now();
                        wait_until(
                            Duration::from_secs(30),
                            "the lock refuses",
                            || match lock_target.connect(true) {
                                Ok(c) => {
                                    c.close();
                                    Err(anyhow!("a locked user's stream was let through"))
                                }
                                Err(_) => Ok(()),
                            },
                        )?;
                        if let Ok(mut v) = shared.lock_delays.lock() {
                            v.0.push(t.elapsed().as_secs_f64());
                        }
                        let held = cluster_mx.lock();
                        let sent = unix_f();
                        admin.run(&["rm", &format!("lock/{id}")])?;
                        if let Ok(mut l) = shared.lock.lock() {
                            l.current = None;
                            l.removed.push((sent, unix_f()));
                        }
                        drop(held);
                        // A removal that never reaches the engine leaves the user locked: a
                        // finding of its own (reported), not a failed cycle.
                        let t = Instant::now();
                        let back = wait_until(
                            Duration::from_secs(10),
                            "the unlocked user's stream",
                            || lock_target.connect(true).map(|c| c.close()),
                        );
                        if let Ok(mut v) = shared.lock_delays.lock() {
                            match back {
                                Ok(()) => v.1.push(t.elapsed().as_secs_f64()),
                                Err(_) => v.2 += 1,
                            }
                        }
                        Ok(())
                    });
                }
            });
        }

        // The controller: kill -9 halfway, then wait for the end.
        let result = (|| -> anyhow::Result<()> {
            loop {
                let opens = shared.opens();
                if t_kill.is_none() && opens >= target / 2 {
                    let _held = cluster_mx.lock();
                    kill.at_opens = opens;
                    shared.outage.store(true, Ordering::SeqCst);
                    let t = Instant::now();
                    let killed_unix = unix_f();
                    t_kill = Some(start.elapsed().as_secs_f64());
                    c.crash_and_restart()?;
                    kill.restart_s = t.elapsed().as_secs_f64();
                    daemon_pid.store(u64::from(c.daemon.pid()), Ordering::SeqCst);
                    if let Ok(mut d) = diag.lock() {
                        *d = c.diag_addr.clone();
                    }
                    check_acknowledged(c, &shared, killed_unix, &size.retention, &mut kill)?;
                    wait_until(
                        Duration::from_secs(120),
                        "streams after the restart",
                        || stream_target.connect(true).map(|c| c.close()),
                    )?;
                    kill.streams_back_s = t.elapsed().as_secs_f64();
                    t_back = Some(start.elapsed().as_secs_f64());
                    // The other agents' tunnels come back on their own backoff: a grace period.
                    std::thread::sleep(Duration::from_secs(2));
                    shared.outage.store(false, Ordering::SeqCst);
                }
                if opens >= target {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })();
        shared.stop.store(true, Ordering::SeqCst);
        result
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();

    // The audit store at the end: nothing older than the retention (plus the pruner's period
    // and slack), and the bytes per audited session.
    let retention_s = size
        .retention
        .parse::<jaunt_config::duration::Duration>()
        .map_err(|e| anyhow!("--soak-retention {}: {e}", size.retention))?
        .as_secs();
    // The retention check needs the run to outlive the retention and two pruning periods (a
    // smoke run may be shorter): wait for that, bounded.
    // Bytes per session from the store as the traffic left it (the wait below lets retention
    // empty it).
    let at_stop = audit_at_end(c, start)?;
    let slack = retention_slack(retention_s as f64);
    let need = retention_s as f64 + slack + 1.0;
    if elapsed < need && need < 120.0 {
        std::thread::sleep(Duration::from_secs_f64(need - elapsed));
    }
    let mut audit = audit_at_end(c, start)?;
    audit.at_stop = Some((at_stop.sessions, at_stop.used_bytes));

    let (rows, md, ok) = report(
        size,
        &samples,
        &shared,
        &quotas,
        elapsed,
        started_unix,
        t_kill,
        t_back,
        &kill,
        &audit,
        c,
        out,
    )?;
    Ok((rows, md, ok))
}

/// Starts the restarted agent again (it has joined: no token).
struct AgentSpawner {
    jaunt: PathBuf,
    dir: PathBuf,
    public_addr: String,
    pin: String,
    backend: String,
}

impl AgentSpawner {
    fn new(c: &SoakCluster, backend: &str) -> AgentSpawner {
        AgentSpawner {
            jaunt: c.jaunt.clone(),
            dir: c.dir.path().to_path_buf(),
            public_addr: c.public_addr.clone(),
            pin: c.pin.clone(),
            backend: backend.to_string(),
        }
    }

    fn spawn(&self) -> anyhow::Result<crate::cluster::Proc> {
        let child = Command::new(&self.jaunt)
            .args(["agent", "--proxy", &self.public_addr, "--ca-pin", &self.pin])
            .args(["--name", "soak-agent2", "--data-dir"])
            .arg(self.dir.join("soak-agent2"))
            .args([
                "--app",
                &format!("{}=tcp://{}", soak_env::RESTART_APP, self.backend),
            ])
            .env("JAUNT_HOME", self.dir.join("agent-home"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(crate::cluster::Proc::new(child, "jaunt agent (restarted)"))
    }
}

/// Admin commands on the cluster's host (`--data-dir`), usable from a worker thread.
struct Admin {
    jaunt: PathBuf,
    home: PathBuf,
    data_dir: String,
}

impl Admin {
    fn new(c: &SoakCluster) -> Admin {
        Admin {
            jaunt: c.jaunt.clone(),
            home: c.home.clone(),
            data_dir: c.data_dir.display().to_string(),
        }
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = args.to_vec();
        all.extend(["--data-dir", &self.data_dir]);
        crate::cluster::run_jaunt(&self.jaunt, &self.home, &all, None)
    }
}

fn dialer(home: &Path) -> anyhow::Result<jaunt_control::access::Dialer> {
    let profile = jaunt_control::profile::Profile {
        dir: home.to_path_buf(),
    };
    Ok(jaunt_control::access::Dialer::from_profile(&profile)?.0)
}

/// `GET /` on the web app through the engine (TLS with the user's certificate, SNI
/// `ltweb.localhost`); the app answers `200 ok`.
fn app_request(dialer: &jaunt_control::access::Dialer) -> anyhow::Result<()> {
    let mut s = dialer.dial(&DialRequest {
        join: None,
        kind: DialKind::App,
        target: soak_env::WEB_APP.into(),
        login: None,
        db_user: None,
        db_name: None,
    })?;
    s.sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: ltweb.localhost\r\nConnection: close\r\n\r\n")?;
    s.flush()?;
    let mut body = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        if body.ends_with(b"\r\n\r\nok") {
            break;
        }
    }
    s.conn.send_close_notify();
    let _ = s.flush();
    if !body.starts_with(b"HTTP/1.1 200") {
        bail!(
            "the web app answered {:?}",
            String::from_utf8_lossy(&body[..body.len().min(120)])
        );
    }
    Ok(())
}

fn ssh_once(c: &SoakCluster) -> anyhow::Result<()> {
    ssh_with(&c.jaunt, &c.home)
}

/// `jaunt ssh root@soaknode -- echo soak`: the system ssh through the cluster to the real sshd.
fn ssh_with(jaunt: &Path, home: &Path) -> anyhow::Result<()> {
    let dest = format!("root@{}", soak_env::NODE);
    let out = crate::cluster::run_jaunt(jaunt, home, &["ssh", &dest, "--", "echo", "soak"], None)?;
    if out.trim() != "soak" {
        bail!("ssh printed {out:?}");
    }
    Ok(())
}

/// A psql session through `jaunt db connect`, fed queries on stdin.
struct PgSession {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl PgSession {
    fn open(c: &SoakCluster) -> anyhow::Result<PgSession> {
        PgSession::open_with(&c.jaunt, &c.home)
    }

    fn open_with(jaunt: &Path, home: &Path) -> anyhow::Result<PgSession> {
        let mut child = Command::new(jaunt)
            .args(["db", "connect", soak_env::DB, "--db-user", soak_env::USER])
            .args([
                "--db-name",
                "postgres",
                "--",
                "-tAq",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .env("JAUNT_HOME", home)
            .env("HOME", home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(PgSession {
            child,
            stdin,
            lines,
        })
    }

    /// `select K;` and its answer.
    fn query(&mut self, k: u64) -> anyhow::Result<()> {
        writeln!(self.stdin, "select {k};")?;
        self.stdin.flush()?;
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| anyhow!("psql did not answer select {k}"))?;
        if line.trim() != k.to_string() {
            bail!("psql answered {line:?} to select {k}");
        }
        Ok(())
    }
}

impl Drop for PgSession {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "\\q");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Audit events of `ty` about `user` since `since` (unix seconds), through the admin CLI.
fn audit_events(
    c: &SoakCluster,
    ty: &str,
    user: Option<&str>,
    since: u64,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let since = jaunt_control::audit::rfc3339(since);
    let mut args = vec![
        "audit", "search", "--type", ty, "--since", &since, "--format", "json",
    ];
    if let Some(u) = user {
        args.extend(["--user", u]);
    }
    let text = c.admin(&args, None)?;
    serde_json::from_str(&text).with_context(|| format!("jaunt audit search printed {text:?}"))
}

/// After the restart: every login and lock change acknowledged before the kill is there.
/// Only the last part of the run before the kill is checked (half the retention, at most a
/// minute), since older events may have been removed by retention meanwhile.
fn check_acknowledged(
    c: &SoakCluster,
    shared: &Shared,
    killed_unix: f64,
    retention: &str,
    k: &mut KillCheck,
) -> anyhow::Result<()> {
    let retention_s = retention
        .parse::<jaunt_config::duration::Duration>()
        .map_err(|e| anyhow!("retention {retention}: {e}"))?
        .as_secs() as f64;
    let window = (retention_s / 2.0).clamp(1.0, 60.0);
    // Events younger than the retention (with two seconds to spare) cannot have been pruned
    // by the new daemon's first pass.
    let since = (killed_unix - window)
        .max(unix_f() - retention_s + 2.0)
        .ceil()
        .max(0.0);
    let acked = |v: &[(f64, f64)]| {
        v.iter()
            .filter(|(sent, done)| *sent >= since && *done < killed_unix)
            .count()
    };
    k.logins_acked = shared.logins.lock().map(|l| acked(&l)).unwrap_or(0);
    let events = audit_events(c, "user.login", Some(soak_env::LOGIN_USER), since as u64)?;
    k.logins_found = events.iter().filter(|e| e["event"] == "user.login").count();
    if k.logins_found < k.logins_acked {
        k.problems.push(format!(
            "{} logins were acknowledged in the {window:.0} s before the kill, but only {} user.login events are in the store",
            k.logins_acked, k.logins_found
        ));
    }
    let lock = shared.lock.lock().map(|l| l.clone()).unwrap_or_default();
    k.lock_events_acked = acked(&lock.created) + acked(&lock.removed);
    let created = audit_events(c, "lock.create", None, since as u64)?.len();
    let removed = audit_events(c, "lock.delete", None, since as u64)?.len();
    k.lock_events_found = created + removed;
    if k.lock_events_found < k.lock_events_acked {
        k.problems.push(format!(
            "{} lock changes were acknowledged in the {window:.0} s before the kill, but only {} lock events are in the store",
            k.lock_events_acked, k.lock_events_found
        ));
    }
    k.lock_expected = lock.current.clone();
    let locks: Vec<serde_json::Value> =
        serde_json::from_str(&c.admin(&["get", "locks", "--format", "json"], None)?)?;
    k.locks_found = locks
        .iter()
        .filter_map(|l| l["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    match &lock.current {
        Some(id) if !k.locks_found.contains(id) => k.problems.push(format!(
            "lock {id} was acknowledged before the kill and is gone after the restart"
        )),
        None if !k.locks_found.is_empty() => k.problems.push(format!(
            "locks {:?} are in the store, but every lock was acknowledged as removed",
            k.locks_found
        )),
        _ => {}
    }
    Ok(())
}

/// How much older than the retention an event may be when looked at: the pruner runs every
/// tenth of the retention (at least every second, at most every minute) and deletes in
/// batches; two periods and a few seconds.
fn retention_slack(retention_s: f64) -> f64 {
    2.0 * (retention_s / 10.0).clamp(1.0, 60.0) + 5.0
}

/// The audit store at the end of the run.
#[derive(Debug, Default)]
struct AuditEnd {
    /// Seconds from the start of the run to this look.
    waited_s: f64,
    events: u64,
    sessions: u64,
    oldest_age_s: Option<f64>,
    /// The files on disk (database, WAL, shared memory).
    db_bytes: f64,
    /// Pages in use (not on the free list) times the page size.
    used_bytes: f64,
    /// Sessions and pages in use when the traffic stopped.
    at_stop: Option<(u64, f64)>,
}

fn audit_at_end(c: &SoakCluster, start: Instant) -> anyhow::Result<AuditEnd> {
    let db = c.data_dir.join("jaunt.db");
    let conn = rusqlite::Connection::open_with_flags(
        &db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {} read-only", db.display()))?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let events: i64 = conn.query_row("SELECT count(*) FROM audit", [], |r| r.get(0))?;
    let sessions: i64 = conn.query_row(
        "SELECT count(*) FROM audit WHERE type = 'session.start'",
        [],
        |r| r.get(0),
    )?;
    let oldest: Option<i64> = conn.query_row("SELECT min(time) FROM audit", [], |r| r.get(0))?;
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok(AuditEnd {
        waited_s: start.elapsed().as_secs_f64(),
        events: events.max(0) as u64,
        sessions: sessions.max(0) as u64,
        oldest_age_s: oldest.map(|t| unix_f() - t as f64),
        db_bytes: store_bytes(&c.data_dir),
        used_bytes: ((pages - free).max(0) * page_size.max(0)) as f64,
        at_stop: None,
    })
}

/// Splits samples at the kill: (before the kill, after the streams came back).
fn segments(
    samples: &[Sample],
    elapsed: f64,
    t_kill: Option<f64>,
    t_back: Option<f64>,
) -> Vec<(&'static str, Vec<Sample>)> {
    // Warm-up: the first 10% of the run (at least one sample interval's worth is dropped by
    // requiring three points per trend).
    let warm = elapsed * 0.1;
    match (t_kill, t_back) {
        (Some(k), Some(b)) => vec![
            (
                "before kill",
                samples
                    .iter()
                    .filter(|s| s.t >= warm && s.t < k)
                    .cloned()
                    .collect(),
            ),
            (
                "after restart",
                samples
                    .iter()
                    .filter(|s| s.t >= b + warm)
                    .cloned()
                    .collect(),
            ),
        ],
        _ => vec![(
            "whole run",
            samples.iter().filter(|s| s.t >= warm).cloned().collect(),
        )],
    }
}

/// Operation rates between consecutive samples (per second), outside the outage.
fn rates(
    samples: &[Sample],
    name: &str,
    t_kill: Option<f64>,
    t_back: Option<f64>,
) -> Vec<(f64, f64)> {
    samples
        .windows(2)
        .filter_map(|w| {
            let dt = w[1].t - w[0].t;
            if dt <= 0.0 {
                return None;
            }
            if let (Some(k), Some(b)) = (t_kill, t_back) {
                if w[1].t >= k && w[0].t <= b + 2.0 {
                    return None;
                }
            }
            let d = w[1].counts.get(name)? - w[0].counts.get(name)?;
            Some((w[1].t, d / dt))
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn report(
    size: &SoakSize,
    samples: &[Sample],
    shared: &Shared,
    quotas: &BTreeMap<Op, u64>,
    elapsed: f64,
    started_unix: f64,
    t_kill: Option<f64>,
    t_back: Option<f64>,
    kill: &KillCheck,
    audit: &AuditEnd,
    c: &SoakCluster,
    out: &Path,
) -> anyhow::Result<(Vec<Row>, String, bool)> {
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let mut trends: Vec<Trend> = Vec::new();
    for (window, seg) in segments(samples, elapsed, t_kill, t_back) {
        let series: Vec<(&str, Vec<(f64, f64)>)> = vec![
            (
                "daemon RSS (MiB)",
                seg.iter().map(|s| (s.t, mib(s.daemon_rss))).collect(),
            ),
            (
                "daemon fds",
                seg.iter().map(|s| (s.t, s.daemon_fds)).collect(),
            ),
            (
                "agent RSS (MiB)",
                seg.iter().map(|s| (s.t, mib(s.agent_rss))).collect(),
            ),
            (
                "agent fds",
                seg.iter().map(|s| (s.t, s.agent_fds)).collect(),
            ),
        ];
        for (name, pts) in series {
            trends.extend(trend(name, window, &pts));
        }
    }
    let warm = elapsed * 0.1;
    let after_warm: Vec<&Sample> = samples.iter().filter(|s| s.t >= warm).collect();
    trends.extend(trend(
        "store (MiB)",
        "whole run",
        &after_warm
            .iter()
            .map(|s| (s.t, mib(s.store_bytes)))
            .collect::<Vec<_>>(),
    ));
    let gauge_names: Vec<String> = samples
        .iter()
        .flat_map(|s| s.gauges.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    for g in &gauge_names {
        trends.extend(trend(
            g,
            "whole run",
            &after_warm
                .iter()
                .filter_map(|s| s.gauges.get(g).map(|v| (s.t, *v)))
                .collect::<Vec<_>>(),
        ));
    }
    // Rates: each operation's rate over the run, and its last fifth against its first fifth
    // after warm-up (the "within 10% of the first minute" figure, scaled to short runs).
    let mut rate_rows = Vec::new();
    for op in Op::ALL {
        let r: Vec<(f64, f64)> = rates(samples, op.name(), t_kill, t_back)
            .into_iter()
            .filter(|(t, _)| *t >= warm)
            .collect();
        if let Some(t) = trend(&format!("{} /s", op.name()), "whole run", &r) {
            trends.push(t);
        }
        let span = elapsed - warm;
        let first_window = (60.0f64).min(span / 5.0);
        let mean_in = |a: f64, b: f64| {
            let v: Vec<f64> = r
                .iter()
                .filter(|(t, _)| *t >= a && *t < b)
                .map(|p| p.1)
                .collect();
            if v.is_empty() {
                None
            } else {
                Some(v.iter().sum::<f64>() / v.len() as f64)
            }
        };
        let first = mean_in(warm, warm + first_window);
        let last = mean_in(elapsed - first_window, elapsed + 1.0);
        rate_rows.push((op, first, last));
    }

    // The SVG: one panel per group of curves.
    let daemon_split = |f: &dyn Fn(&Sample) -> f64| -> Vec<(f64, f64)> {
        samples.iter().map(|s| (s.t, f(s))).collect()
    };
    let mut panels: Vec<report::Panel> = vec![
        (
            "resident memory".into(),
            "MiB".into(),
            vec![
                ("daemon".into(), daemon_split(&|s| mib(s.daemon_rss))),
                ("agent".into(), daemon_split(&|s| mib(s.agent_rss))),
            ],
        ),
        (
            "open file descriptors".into(),
            "fds".into(),
            vec![
                ("daemon".into(), daemon_split(&|s| s.daemon_fds)),
                ("agent".into(), daemon_split(&|s| s.agent_fds)),
            ],
        ),
        (
            "engine gauges (per shard)".into(),
            "count".into(),
            gauge_names
                .iter()
                .map(|g| {
                    (
                        g.replace("jaunt_", ""),
                        samples
                            .iter()
                            .filter_map(|s| s.gauges.get(g).map(|v| (s.t, *v)))
                            .collect(),
                    )
                })
                .collect(),
        ),
        (
            "store on disk (jaunt.db + WAL)".into(),
            "MiB".into(),
            vec![("store".into(), daemon_split(&|s| mib(s.store_bytes)))],
        ),
        (
            "user streams per second".into(),
            "per second".into(),
            vec![(
                "stream".into(),
                rates(samples, Op::Stream.name(), None, None),
            )],
        ),
        (
            "other operations per second".into(),
            "per second".into(),
            Op::ALL[1..]
                .iter()
                .map(|o| (o.name().to_string(), rates(samples, o.name(), None, None)))
                .collect(),
        ),
    ];
    panels.retain(|p| !p.2.is_empty());
    let marks: Vec<(f64, String)> = t_kill
        .map(|t| vec![(t, "kill -9".to_string())])
        .unwrap_or_default();
    std::fs::write(out.join("soak.svg"), report::svg_panels(&panels, &marks))?;

    // Checks.
    let mut problems: Vec<String> = kill.problems.clone();
    for op in Op::ALL {
        let c = &shared.counters[&op];
        let errors = c.errors.load(Ordering::Relaxed);
        if errors > 0 {
            problems.push(format!(
                "{}: {errors} errors outside the restart window; first: {}",
                op.name(),
                c.first_error
                    .lock()
                    .ok()
                    .and_then(|f| f.clone())
                    .unwrap_or_default()
            ));
        }
    }
    let retention_s = size
        .retention
        .parse::<jaunt_config::duration::Duration>()
        .map(|d| d.as_secs() as f64)
        .unwrap_or(0.0);
    let slack = retention_slack(retention_s);
    if audit.waited_s > retention_s + slack {
        if let Some(age) = audit.oldest_age_s {
            if age > retention_s + slack {
                problems.push(format!(
                    "the oldest audit event is {age:.0} s old at the end, past audit.retention ({retention_s:.0} s) + {slack:.0} s"
                ));
            }
        }
    }

    // Markdown.
    let mut md = String::new();
    md.push_str("## soak\n\n");
    md.push_str(&format!(
        "{} s; {} user streams (size), audit.retention {}; kill -9 of the daemon at {} opens ({:.1} s into the run), new daemon ready {:.2} s after the kill, streams back after {:.2} s.\n\n",
        elapsed.round(),
        shared.opens(),
        size.retention,
        kill.at_opens,
        t_kill.unwrap_or(0.0),
        kill.restart_s,
        kill.streams_back_s,
    ));
    md.push_str("| operation | done | planned | errors | errors during the restart | rate first / last window (per s) | last / first |\n|---|---|---|---|---|---|---|\n");
    for (op, first, last) in &rate_rows {
        let cn = &shared.counters[op];
        let skipped = match op {
            Op::Ssh => c.ssh_missing.clone(),
            Op::Pg => c.pg_missing.clone(),
            _ => None,
        };
        let ratio = match (first, last) {
            (Some(f), Some(l)) if *f > 0.0 => format!("{:.2}", l / f),
            _ => "—".into(),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} / {} | {} |\n",
            op.name(),
            cn.ok.load(Ordering::Relaxed),
            quotas[op],
            cn.errors.load(Ordering::Relaxed),
            cn.outage_errors.load(Ordering::Relaxed),
            first.map(|v| format!("{v:.1}")).unwrap_or("—".into()),
            last.map(|v| format!("{v:.1}")).unwrap_or("—".into()),
            skipped.map(|s| format!("skipped: {s}")).unwrap_or(ratio),
        ));
    }
    md.push_str("\nSlopes after warm-up (the first 10% of the run; the daemon's curves separately before the kill and after the restart). `drift` = slope × window / mean: how far the fitted line moves over its window.\n\n");
    md.push_str(
        "| curve | window | points | mean | min | max | slope per hour | drift |\n|---|---|---|---|---|---|---|---|\n",
    );
    for t in &trends {
        md.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.3} | {:+.1}% |\n",
            t.name, t.window, t.points, t.mean, t.min, t.max, t.slope_per_hour, t.drift_pct
        ));
    }
    let (stop_sessions, stop_used) = audit.at_stop.unwrap_or((audit.sessions, audit.used_bytes));
    let per_session = if stop_sessions > 0 {
        stop_used / stop_sessions as f64
    } else {
        0.0
    };
    md.push_str(&format!(
        "\nAudit store at the end: {} events ({} sessions) within the retention, oldest {} s old; {:.1} MiB on disk (files), {:.1} MiB in pages in use; when the traffic stopped, {} sessions in the store and {:.0} bytes of pages in use per audited session (every table and event type, divided by the sessions in the store).\n",
        audit.events,
        audit.sessions,
        audit.oldest_age_s.map(|a| format!("{a:.0}")).unwrap_or("—".into()),
        mib(audit.db_bytes),
        mib(audit.used_bytes),
        stop_sessions,
        per_session,
    ));
    md.push_str(&format!(
        "\nKill check: {} logins and {} lock changes acknowledged in the checked window before the kill; found {} user.login and {} lock events after the restart; lock expected {:?}, found {:?}.\n",
        kill.logins_acked,
        kill.lock_events_acked,
        kill.logins_found,
        kill.lock_events_found,
        kill.lock_expected,
        kill.locks_found,
    ));
    let back = shared
        .agent_back
        .lock()
        .map(|b| b.clone())
        .unwrap_or_default();
    if !back.is_empty() {
        md.push_str(&format!(
            "\nAgent restarts: back (app answering) {:.2}-{:.2} s after the new agent started.\n",
            back.iter().copied().fold(f64::MAX, f64::min),
            back.iter().copied().fold(0.0, f64::max)
        ));
    }
    let (locked, unlocked, stuck) = shared
        .lock_delays
        .lock()
        .map(|d| d.clone())
        .unwrap_or_default();
    let range = |v: &[f64]| {
        if v.is_empty() {
            "—".to_string()
        } else {
            format!(
                "{:.2}-{:.2} s",
                v.iter().copied().fold(f64::MAX, f64::min),
                v.iter().copied().fold(0.0, f64::max)
            )
        }
    };
    md.push_str(&format!(
        "\nLock cycles: the locked user's streams refused {} after `jaunt lock` returned; allowed again {} after `jaunt rm lock/ID` returned; {} removals still refused after 10 s.\n",
        range(&locked),
        range(&unlocked),
        stuck
    ));
    let mut findings = Vec::new();
    if stuck > 0 {
        findings.push(format!(
            "{stuck} of {} lock removals had not reached the engine 10 s after `jaunt rm lock/ID` returned (the user's streams were still refused as locked)",
            locked.len()
        ));
    }
    if !findings.is_empty() {
        md.push_str("\nFindings (not soak failures):\n\n");
        for f in &findings {
            md.push_str(&format!("- {f}\n"));
        }
    }
    if problems.is_empty() {
        md.push_str("\nAll checks passed.\n\n");
    } else {
        md.push_str("\n**Problems:**\n\n");
        for p in &problems {
            md.push_str(&format!("- {p}\n"));
        }
        md.push('\n');
    }

    let json = json!({
        "size": {"opens": size.opens, "interval_s": size.interval, "retention": size.retention, "threads": size.threads},
        "started_unix": started_unix,
        "elapsed_s": elapsed,
        "kill": {
            "at_opens": kill.at_opens, "t_s": t_kill, "streams_back_t_s": t_back,
            "restart_s": kill.restart_s, "streams_back_s": kill.streams_back_s,
            "logins_acked": kill.logins_acked, "logins_found": kill.logins_found,
            "lock_events_acked": kill.lock_events_acked, "lock_events_found": kill.lock_events_found,
            "lock_expected": kill.lock_expected, "locks_found": kill.locks_found,
        },
        "ops": Op::ALL.iter().map(|o| {
            let cn = &shared.counters[o];
            (o.name().to_string(), json!({
                "done": cn.ok.load(Ordering::Relaxed),
                "planned": quotas[o],
                "errors": cn.errors.load(Ordering::Relaxed),
                "outage_errors": cn.outage_errors.load(Ordering::Relaxed),
            }))
        }).collect::<serde_json::Map<_, _>>(),
        "agent_back_s": back,
        "audit": {
            "events": audit.events, "sessions": audit.sessions,
            "oldest_age_s": audit.oldest_age_s, "store_bytes": audit.db_bytes,
            "used_bytes": audit.used_bytes,
            "sessions_at_stop": stop_sessions,
            "bytes_per_session": per_session,
        },
        "trends": trends.iter().map(|t| json!({
            "curve": t.name, "window": t.window, "points": t.points, "mean": t.mean,
            "min": t.min, "max": t.max, "slope_per_hour": t.slope_per_hour, "drift_pct": t.drift_pct,
        })).collect::<Vec<_>>(),
        "samples": samples.iter().map(|s| json!({
            "t": s.t, "daemon_rss": s.daemon_rss, "daemon_fds": s.daemon_fds,
            "agent_rss": s.agent_rss, "agent_fds": s.agent_fds, "store_bytes": s.store_bytes,
            "gauges": s.gauges, "counts": s.counts,
        })).collect::<Vec<_>>(),
        "problems": problems,
        "findings": findings,
        "lock": {"refused_after_s": locked, "allowed_after_s": unlocked, "still_refused_after_10s": stuck},
    });
    std::fs::write(out.join("soak.json"), serde_json::to_string_pretty(&json)?)?;

    let mut row = Row::new("soak", &format!("{} opens", size.opens), "jaunt")
        .metric("seconds", elapsed)
        .metric("opens", shared.opens())
        .metric("bytes_per_audited_session", per_session)
        .metric("problems", problems.len() as u64)
        .note("soak: curves in soak.svg, every sample and slope in soak.json");
    for op in Op::ALL {
        row = row.metric(
            &format!("{}_done", op.name()),
            shared.counters[&op].ok.load(Ordering::Relaxed),
        );
    }
    Ok((vec![row], md, problems.is_empty()))
}
