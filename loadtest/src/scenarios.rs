//! The scenarios. Each measures one thing and returns [`Row`]s with the CPU seconds of every
//! watched process group over the measurement.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::client::{Conn, JauntUser, Target};
use crate::cluster::Spawned;
use crate::procfs::{self, Watch};
use crate::progress::Progress;
use crate::report::{self, Row};

/// How big each scenario runs.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// Seconds per handshake/streams variant.
    pub seconds: f64,
    /// Client threads for the rate scenarios.
    pub threads: usize,
    /// Bytes per bulk direction.
    pub bulk_bytes: u64,
    /// The bulk directions run, in order: `upload`, `download`.
    pub bulk_variants: &'static [&'static str],
    /// Requests of the rr scenario.
    pub requests: usize,
    /// Bytes per rr message.
    pub message: usize,
    /// Idle sessions.
    pub idle: usize,
    /// Live sessions of the lock scenario.
    pub lock: usize,
    /// Emulated agents.
    pub agents: usize,
}

impl Sizes {
    pub fn smoke() -> Sizes {
        Sizes {
            seconds: 1.0,
            threads: 2,
            bulk_bytes: 8 << 20,
            bulk_variants: &["upload", "download"],
            requests: 1000,
            message: 64,
            idle: 40,
            lock: 40,
            agents: 10,
        }
    }

    pub fn full() -> Sizes {
        Sizes {
            seconds: 8.0,
            threads: 2,
            bulk_bytes: 1 << 30,
            bulk_variants: &["upload", "download"],
            requests: 20_000,
            message: 64,
            idle: 1000,
            lock: 1000,
            agents: 1000,
        }
    }
}

fn measure<T>(
    watch: &Watch,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, std::collections::BTreeMap<String, f64>)> {
    let before = watch.sample();
    let out = f()?;
    Ok((out, procfs::delta(&before, &watch.sample())))
}

/// CPU seconds per group, and how many processes of each multi-process group did the work.
type Spent = (
    std::collections::BTreeMap<String, f64>,
    std::collections::BTreeMap<String, usize>,
);

/// [`measure`], and which processes of each multi-process group did the work
/// ([`procfs::busy`]).
fn measure_busy<T>(
    watch: &Watch,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, Spent)> {
    // One reading of /proc per process before and after, for both answers.
    let before = watch.sample_pids();
    let out = f()?;
    let after = watch.sample_pids();
    let cpu = procfs::delta(&procfs::group_sums(&before), &procfs::group_sums(&after));
    Ok((out, (cpu, procfs::busy(&before, &after))))
}

/// Result of a timed loop of operations on several threads.
struct Ops {
    count: u64,
    resumed: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: f64,
}

/// Runs `op` on `threads` threads for `seconds`; `op` returns whether TLS resumed.
fn timed_ops(
    label: &str,
    threads: usize,
    seconds: f64,
    op: Arc<dyn Fn() -> anyhow::Result<bool> + Send + Sync>,
) -> Ops {
    let progress = Progress::new(label, None);
    let count = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(seconds);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            let (op, count, resumed, errors, first_error, done) = (
                op.clone(),
                count.clone(),
                resumed.clone(),
                errors.clone(),
                first_error.clone(),
                progress.done.clone(),
            );
            s.spawn(move || {
                while Instant::now() < until {
                    match op() {
                        Ok(r) => {
                            count.fetch_add(1, Ordering::Relaxed);
                            done.fetch_add(1, Ordering::Relaxed);
                            if r {
                                resumed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut f) = first_error.lock() {
                                f.get_or_insert_with(|| format!("{e:#}"));
                            }
                            // An error loop would spin: back off a little.
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            });
        }
    });
    let first_error = first_error.lock().ok().and_then(|f| f.clone());
    Ops {
        count: count.load(Ordering::Relaxed),
        resumed: resumed.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        first_error,
        elapsed: start.elapsed().as_secs_f64(),
    }
}

fn ops_row(
    scenario: &str,
    variant: &str,
    path: &str,
    ops: &Ops,
    cpu: std::collections::BTreeMap<String, f64>,
    unit: &str,
) -> anyhow::Result<Row> {
    if ops.count == 0 {
        bail!(
            "{scenario}/{variant} via {path}: no operation succeeded ({} errors; first: {})",
            ops.errors,
            ops.first_error.as_deref().unwrap_or("none")
        );
    }
    let mut row = Row::new(scenario, variant, path)
        .metric("per_second", ops.count as f64 / ops.elapsed)
        .metric("count", ops.count)
        .metric("resumed_pct", ops.resumed as f64 * 100.0 / ops.count as f64)
        .metric("errors", ops.errors)
        .work(cpu, unit, ops.count as f64 / 1000.0);
    if let Some(e) = &ops.first_error {
        row = row.note(format!("{scenario}/{variant} via {path}: first error: {e}"));
    }
    Ok(row)
}

/// One connection carrying one small echo: the unit of the handshake scenario on every path.
fn echo_once(target: &Target, resume: bool) -> anyhow::Result<bool> {
    let mut c = target.connect(resume)?;
    let msg = *b"Eloadtest-ping-16";
    c.write_all(&msg)?;
    c.flush()?;
    let mut back = [0u8; 16];
    c.read_exact(&mut back).context("reading the echo")?;
    if back != msg[1..] {
        bail!("echo mismatch");
    }
    let resumed = c.resumed();
    c.close();
    Ok(resumed)
}

/// `handshake` on a TLS path (full and resumed), each connection carrying one small echo.
pub fn handshake_echo(
    path: &str,
    target: &Target,
    watch: &Watch,
    sizes: &Sizes,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (variant, resume) in [("full", false), ("resumed", true)] {
        if resume {
            // Prime the session cache.
            echo_once(target, true)?;
        }
        let t = target.clone();
        let (ops, cpu) = measure(watch, || {
            Ok(timed_ops(
                &format!("handshake {variant} via {path}"),
                sizes.threads,
                sizes.seconds,
                Arc::new(move || echo_once(&t, resume)),
            ))
        })?;
        rows.push(ops_row(
            "handshake",
            &format!("{variant}+echo"),
            path,
            &ops,
            cpu,
            "1k handshakes",
        )?);
    }
    Ok(rows)
}

/// `handshake` on Jaunt's web route: `GET /webapi/ping` on a new connection, full and resumed.
pub fn handshake_web(user: &JauntUser, watch: &Watch, sizes: &Sizes) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (variant, resume) in [("full", false), ("resumed", true)] {
        if resume {
            user.ping(true)?;
        }
        let u = user.clone();
        let (ops, cpu) = measure(watch, || {
            Ok(timed_ops(
                &format!("handshake web {variant}"),
                sizes.threads,
                sizes.seconds,
                Arc::new(move || u.ping(resume)),
            ))
        })?;
        rows.push(ops_row(
            "handshake",
            &format!("{variant}+ping"),
            "jaunt-web",
            &ops,
            cpu,
            "1k handshakes",
        )?);
    }
    Ok(rows)
}

/// `bulk`: one connection uploads `bytes`, another downloads `bytes`.
pub fn bulk(path: &str, target: &Target, watch: &Watch, sizes: &Sizes) -> anyhow::Result<Vec<Row>> {
    let n = sizes.bulk_bytes;
    let mut rows = Vec::new();
    for &variant in sizes.bulk_variants {
        let progress = Progress::new(&format!("bulk {variant} via {path}"), Some(n >> 20));
        let (secs, (cpu, busy)) = measure_busy(watch, || {
            let mut c = target.connect(false)?;
            let start = Instant::now();
            let mut buf = vec![0x5au8; 64 * 1024];
            if variant == "upload" {
                let mut head = vec![b'S'];
                head.extend_from_slice(&n.to_be_bytes());
                c.write_all(&head)?;
                let mut left = n;
                while left > 0 {
                    let k = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    c.write_all(&buf[..k])?;
                    left -= k as u64;
                    progress.done.store((n - left) >> 20, Ordering::Relaxed);
                }
                c.flush()?;
                let mut k = [0u8; 1];
                c.read_exact(&mut k)
                    .context("waiting for the upload's ack")?;
            } else {
                let mut head = vec![b'G'];
                head.extend_from_slice(&n.to_be_bytes());
                c.write_all(&head)?;
                c.flush()?;
                let mut got = 0u64;
                while got < n {
                    let k = c.read(&mut buf)?;
                    if k == 0 {
                        bail!("download ended after {got} of {n} bytes");
                    }
                    got += k as u64;
                    progress.done.store(got >> 20, Ordering::Relaxed);
                }
            }
            let secs = start.elapsed().as_secs_f64();
            c.close();
            Ok(secs)
        })?;
        drop(progress);
        let gib = n as f64 / (1u64 << 30) as f64;
        rows.push(
            Row::new("bulk", variant, path)
                .busy(&busy)
                .metric("MiB_per_s", n as f64 / (1 << 20) as f64 / secs)
                .metric("MiB", (n >> 20) as f64)
                .work(cpu, "GiB", gib),
        );
    }
    Ok(rows)
}

/// Request/response latencies (ns) of `count` echoes of `size` bytes on one connection.
fn rr_latencies(
    target: &Target,
    count: usize,
    size: usize,
    label: &str,
) -> anyhow::Result<Vec<u64>> {
    let progress = Progress::new(label, Some(count as u64));
    let mut c = target.connect(false)?;
    c.write_all(b"E")?;
    let msg = vec![0x42u8; size];
    let mut back = vec![0u8; size];
    // Warm-up.
    for _ in 0..(count / 20).max(10) {
        c.write_all(&msg)?;
        c.flush()?;
        c.read_exact(&mut back)?;
    }
    let mut lat = Vec::with_capacity(count);
    for i in 0..count {
        let t = Instant::now();
        c.write_all(&msg)?;
        c.flush()?;
        c.read_exact(&mut back)?;
        lat.push(t.elapsed().as_nanos() as u64);
        if i % 256 == 0 {
            progress.done.store(i as u64, Ordering::Relaxed);
        }
    }
    c.close();
    Ok(lat)
}

pub fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q) as usize).min(sorted.len() - 1);
    sorted[i] as f64
}

/// `rr` on `path`; returns the row and the sorted latencies (ns) for plots and ratios.
pub fn rr(
    path: &str,
    target: &Target,
    watch: &Watch,
    sizes: &Sizes,
) -> anyhow::Result<(Row, Vec<u64>)> {
    let (mut lat, (cpu, busy)) = measure_busy(watch, || {
        rr_latencies(
            target,
            sizes.requests,
            sizes.message,
            &format!("rr via {path}"),
        )
    })?;
    lat.sort_unstable();
    let total: f64 = lat.iter().map(|v| *v as f64).sum::<f64>() / 1e9;
    let us = |q| percentile(&lat, q) / 1e3;
    let row = Row::new("rr", &format!("{}B echo", sizes.message), path)
        .metric("p50_us", us(0.5))
        .metric("p99_us", us(0.99))
        .metric("p99.9_us", us(0.999))
        .metric("mean_us", total * 1e6 / lat.len().max(1) as f64)
        .metric("per_second", lat.len() as f64 / total.max(1e-9))
        .busy(&busy)
        .work(cpu, "1k requests", lat.len() as f64 / 1000.0);
    Ok((row, lat))
}

/// Adds `added_*_us` (path minus baseline, per percentile) to `row`.
pub fn added_latency(mut row: Row, lat: &[u64], base: &[u64]) -> Row {
    for (name, q) in [
        ("added_p50_us", 0.5),
        ("added_p99_us", 0.99),
        ("added_p99.9_us", 0.999),
    ] {
        let v = (percentile(lat, q) - percentile(base, q)) / 1e3;
        row = row.metric(name, v);
    }
    row
}

/// A CDF of latencies (µs, percentile) for the plot, thinned to a few hundred points.
pub fn cdf(lat: &[u64]) -> Vec<(f64, f64)> {
    let n = lat.len().max(1);
    let step = (n / 400).max(1);
    let mut pts: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .filter_map(|i| {
            lat.get(i)
                .map(|v| (*v as f64 / 1e3, i as f64 * 100.0 / n as f64))
        })
        .collect();
    if let Some(last) = lat.last() {
        pts.push((*last as f64 / 1e3, 100.0));
    }
    pts
}

/// `streams`: new user streams per second (resumed TLS + dial answered, then closed).
pub fn streams(
    user: &JauntUser,
    app: &str,
    watch: &Watch,
    sizes: &Sizes,
) -> anyhow::Result<Vec<Row>> {
    let target = user.target(app);
    target.connect(true)?.close();
    let t = target.clone();
    let (ops, cpu) = measure(watch, || {
        Ok(timed_ops(
            "streams",
            sizes.threads,
            sizes.seconds,
            Arc::new(move || {
                let c = t.connect(true)?;
                let r = c.resumed();
                c.close();
                Ok(r)
            }),
        ))
    })?;
    Ok(vec![ops_row(
        "streams",
        "open+dial+close",
        "jaunt",
        &ops,
        cpu,
        "1k opens",
    )?])
}

/// Opens `n` idle sessions to `target` (backend command `I`).
fn open_idle(target: &Target, n: usize, label: &str) -> anyhow::Result<Vec<Conn>> {
    let progress = Progress::new(label, Some(n as u64));
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = target.connect(true)?;
        c.write_all(b"I")?;
        c.flush()?;
        out.push(c);
        progress.add(1);
    }
    Ok(out)
}

/// `idle`: resident memory per idle session of the engine (daemon) and the agent.
pub fn idle(
    user: &JauntUser,
    app: &str,
    daemon: u32,
    agent: Option<u32>,
    watch: &Watch,
    sizes: &Sizes,
) -> anyhow::Result<Vec<Row>> {
    let target = user.target(app);
    // Warm the paths (allocator pools, session cache) before the baseline.
    drop(open_idle(&target, 4, "idle warm-up")?);
    let rss = |pid: Option<u32>| pid.and_then(procfs::rss_bytes).unwrap_or(0) as f64;
    let before = (rss(Some(daemon)), rss(agent));
    let ((sessions, elapsed), cpu) = measure(watch, || {
        let start = Instant::now();
        let s = open_idle(&target, sizes.idle, "idle sessions")?;
        Ok((s, start.elapsed().as_secs_f64()))
    })?;
    // Let the engine and agent finish their work for the last sessions.
    std::thread::sleep(Duration::from_millis(300));
    let after = (rss(Some(daemon)), rss(agent));
    let n = sessions.len() as f64;
    drop(sessions);
    Ok(vec![Row::new("idle", &format!("{} sessions", sizes.idle), "jaunt")
        .metric("engine_KiB_per_session", (after.0 - before.0) / 1024.0 / n)
        .metric("agent_KiB_per_session", (after.1 - before.1) / 1024.0 / n)
        .metric("engine_rss_MiB", after.0 / (1 << 20) as f64)
        .metric("agent_rss_MiB", after.1 / (1 << 20) as f64)
        .metric("opens_per_second", n / elapsed)
        .work(cpu, "1k sessions", n / 1000.0)
        .note("idle: VmRSS delta of the whole process over the open sessions (allocator caching included); the daemon holds control and engine")])
}

/// `lock`: N live sessions of one user; `jaunt lock --user`; time until the last sees EOF.
pub fn lock(
    spawned: &Spawned,
    app: &str,
    watch: &Watch,
    sizes: &Sizes,
) -> anyhow::Result<Vec<Row>> {
    let user = JauntUser::from_home(&spawned.lock_home)?;
    let target = user.target(app);
    let sessions = open_idle(&target, sizes.lock, "lock: sessions")?;
    let n = sessions.len();
    let ends: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let mut handles = Vec::new();
    for mut c in sessions {
        let ends = ends.clone();
        handles.push(
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    let _ = c.tcp().set_read_timeout(Some(Duration::from_secs(20)));
                    let mut b = [0u8; 256];
                    let eof = loop {
                        match c.read(&mut b) {
                            Ok(0) => break true,
                            Ok(_) => {}
                            Err(e)
                                if e.kind() == std::io::ErrorKind::WouldBlock
                                    || e.kind() == std::io::ErrorKind::TimedOut =>
                            {
                                break false
                            }
                            Err(_) => break true,
                        }
                    };
                    if eof {
                        if let Ok(mut e) = ends.lock() {
                            e.push(Instant::now());
                        }
                    }
                })?,
        );
    }
    let ((t_start, t_return), cpu) = measure(watch, || {
        let t_start = Instant::now();
        spawned.admin(
            &[
                "lock",
                "--user",
                crate::cluster::LOCK_USER,
                "--message",
                "loadtest",
            ],
            None,
        )?;
        let t_return = Instant::now();
        let progress = Progress::new("lock: waiting for EOFs", Some(n as u64));
        for h in handles {
            let _ = h.join();
            progress.add(1);
        }
        Ok((t_start, t_return))
    })?;
    let ends = ends.lock().map(|e| e.clone()).unwrap_or_default();
    let closed = ends.len();
    let last = ends.iter().max().copied();
    let ms = |a: Instant, b: Option<Instant>| {
        b.map(|b| b.saturating_duration_since(a).as_secs_f64() * 1e3)
            .unwrap_or(-1.0)
    };
    let mut row = Row::new("lock", &format!("{n} sessions"), "jaunt")
        .metric("closed", closed as u64)
        .metric("sessions", n as u64)
        .metric("last_eof_after_return_ms", ms(t_return, last))
        .metric("last_eof_after_start_ms", ms(t_start, last))
        .metric("lock_command_ms", (t_return - t_start).as_secs_f64() * 1e3)
        .work(cpu, "1k sessions", n as f64 / 1000.0);
    if closed < n {
        row = row.note(format!(
            "lock: only {closed} of {n} sessions saw EOF within 20 s of the lock"
        ));
    }
    Ok(vec![row])
}

/// `agents`: K emulated agents hold tunnels; the engine restarts; time until all are back.
pub fn agents(
    crash: bool,
    spawned: &mut Spawned,
    watch: &mut Watch,
    sizes: &Sizes,
    out: &Path,
) -> anyhow::Result<Vec<Row>> {
    use crate::emul;
    use std::sync::atomic::Ordering::SeqCst;
    let k = sizes.agents;
    let ids = emul::join_all(spawned, k, "agents")?;
    let user = JauntUser::from_home(&spawned.home)?;
    let shared = Arc::new(emul::Shared::default());
    // One tunnel per engine shard per agent, as the real agent holds.
    let shards = match ids.first() {
        Some(id) => emul::probe_shards(id, user.addr, &user.name)?,
        None => 1,
    };
    if let Some(advice) = jaunt_engine::server::listen::backlog_advice(
        jaunt_engine::server::listen::somaxconn(),
        shards,
    ) {
        eprintln!("loadtest: {advice}");
    }
    let handles = emul::start(
        ids,
        user.addr,
        user.name.clone(),
        shared.clone(),
        false,
        shards,
    )?;
    let tunnels = k * shards;
    let result = (|| -> anyhow::Result<Vec<Row>> {
        let deadline = Instant::now() + Duration::from_secs(60 + tunnels as u64 / 20);
        {
            let progress = Progress::new("agents: connecting", Some(tunnels as u64));
            while shared.connected.load(SeqCst) < tunnels {
                if Instant::now() > deadline {
                    bail!(
                        "only {} of {tunnels} emulated agent tunnels ({k} agents x {shards} shards) connected",
                        shared.connected.load(SeqCst)
                    );
                }
                progress
                    .done
                    .store(shared.connected.load(SeqCst) as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let steady_before = steady_hops(spawned, &user, tunnels + shards)?;
        let before = watch.sample();
        let dials_before = shared.dials.load(SeqCst);
        let misplaced_before = shared.misplaced.load(SeqCst);
        let resumed_before = shared.resumed.load(SeqCst);
        let (old_cpu, t_kill, t_exited, t_ready) = spawned.restart_daemon(crash)?;
        watch.add("jaunt", vec![spawned.daemon.pid()]);
        // Each agent's first tunnel after the kill.
        let deadline = Instant::now() + Duration::from_secs(120);
        let firsts = {
            let progress = Progress::new("agents: reconnecting", Some(k as u64));
            loop {
                // An agent is back when each of its shards has a tunnel again: the latest of
                // its shards' first tunnels after the kill.
                let firsts: std::collections::BTreeMap<usize, Instant> = {
                    let ups = shared.ups.lock().map(|u| u.clone()).unwrap_or_default();
                    let mut per_shard = std::collections::BTreeMap::new();
                    for (i, shard, t) in ups {
                        if t > t_kill {
                            per_shard.entry((i, shard)).or_insert(t);
                        }
                    }
                    let mut m: std::collections::BTreeMap<usize, (usize, Instant)> =
                        std::collections::BTreeMap::new();
                    for ((i, _), t) in per_shard {
                        let e = m.entry(i).or_insert((0, t));
                        e.0 += 1;
                        e.1 = e.1.max(t);
                    }
                    m.into_iter()
                        .filter(|(_, (n, _))| *n >= shards)
                        .map(|(i, (_, t))| (i, t))
                        .collect()
                };
                progress.done.store(firsts.len() as u64, Ordering::Relaxed);
                if firsts.len() >= k {
                    break firsts;
                }
                if Instant::now() > deadline {
                    bail!(
                        "only {} of {k} emulated agents came back within 120 s",
                        firsts.len()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        let after = watch.sample();
        // The new daemon's hops while the agents came back (a user's dial may hop while the
        // target's agent lacks a tunnel on the user's shard), then the steady state's.
        let reconnect_hops = match spawned.diag_addr.as_deref() {
            Some(d) => crate::cluster::metric_sum(d, HOPS, "")?,
            None => f64::NAN,
        };
        // The new daemon's tunnel handshakes (full or resumed) and handshake admission.
        let engine_metric = |family: &str, label: &str| match spawned.diag_addr.as_deref() {
            Some(d) => crate::cluster::metric_sum(d, family, label),
            None => Ok(f64::NAN),
        };
        let tls = "jaunt_tls_handshakes_total";
        let engine_full = engine_metric(tls, "route=\"tunnel\",kind=\"full\"")?;
        let engine_resumed = engine_metric(tls, "route=\"tunnel\",kind=\"resumed\"")?;
        let admission_waits = engine_metric("jaunt_handshake_admission_waits_total", "")?;
        let admission_expired = engine_metric("jaunt_handshake_admission_expired_total", "")?;
        let abandoned = engine_metric("jaunt_handshakes_abandoned_total", "")?;
        let inventory_dropped = engine_metric("jaunt_inventory_events_dropped_total", "")?;
        let steady_after = steady_hops(spawned, &user, tunnels + shards)?;
        let mut cpu = procfs::delta(&before, &after);
        // The daemon was replaced: the old one's share up to the signal, plus the new one's.
        let old_before = before.get("jaunt").copied().unwrap_or(0.0);
        cpu.insert(
            "jaunt".into(),
            (old_cpu - old_before).max(0.0) + after.get("jaunt").copied().unwrap_or(0.0),
        );
        let last = firsts.values().max().copied().unwrap_or(t_kill);
        let downs: Vec<Instant> = shared
            .downs
            .lock()
            .map(|d| d.iter().copied().filter(|t| *t >= t_kill).collect())
            .unwrap_or_default();
        let first_down = downs.iter().min().copied().unwrap_or(t_kill);
        let last_down = downs.iter().max().copied().unwrap_or(t_kill);
        let secs = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
        // Reconnects per second in 100 ms buckets from the kill.
        let span = secs(t_kill, last);
        let buckets = ((span / 0.1).ceil() as usize).max(1) + 1;
        let mut hist = vec![0u64; buckets];
        for t in firsts.values() {
            let b = ((secs(t_kill, *t) / 0.1) as usize).min(buckets - 1);
            hist[b] += 1;
        }
        let peak = hist.iter().copied().max().unwrap_or(0) as f64 * 10.0;
        // When 99% of the agents were back: one straggler (a SYN the kernel dropped and retries
        // after seconds) moves `all_back_*` but not this.
        let mut back: Vec<Instant> = firsts.values().copied().collect();
        back.sort_unstable();
        let p99 = back
            .get((back.len() * 99).div_ceil(100).saturating_sub(1))
            .copied()
            .unwrap_or(t_kill);
        let points: Vec<(f64, f64)> = hist
            .iter()
            .enumerate()
            .flat_map(|(i, c)| {
                let (x0, x1) = (i as f64 * 0.1, (i + 1) as f64 * 0.1);
                [(x0, *c as f64 * 10.0), (x1, *c as f64 * 10.0)]
            })
            .collect();
        let svg = report::svg_chart(
            &format!("{k} emulated agents: reconnects after an engine restart"),
            "seconds since SIGTERM to the engine",
            "reconnects per second (100 ms buckets)",
            &[("reconnects/s".to_string(), points)],
            false,
        );
        std::fs::write(out.join("agents-reconnect.svg"), svg)?;
        std::fs::write(
            out.join("agents-reconnect.json"),
            serde_json::to_string(&serde_json::json!({"bucket_s": 0.1, "reconnects": hist}))?,
        )?;
        Ok(vec![Row::new(
                "agents",
                &format!("{k} emulated, {}", if crash { "SIGKILL" } else { "SIGTERM" }),
                "jaunt",
            )
            .metric("agents", k as u64)
            .metric("shards", shards as u64)
            .metric(
                "dials_per_agent",
                (shared.dials.load(SeqCst) - dials_before) as f64 / k as f64,
            )
            .metric(
                "misplaced_dials",
                (shared.misplaced.load(SeqCst) - misplaced_before) as u64,
            )
            .metric(
                "resumed_tunnels",
                (shared.resumed.load(SeqCst) - resumed_before) as u64,
            )
            .metric("engine_tunnel_handshakes_full", engine_full)
            .metric("engine_tunnel_handshakes_resumed", engine_resumed)
            .metric("engine_admission_waits", admission_waits)
            .metric("engine_admission_expired", admission_expired)
            .metric("engine_handshakes_abandoned", abandoned)
            .metric("engine_inventory_events_dropped", inventory_dropped)
            .metric(
                "somaxconn",
                jaunt_engine::server::listen::somaxconn().map_or(-1.0, f64::from),
            )
            .metric(
                "tcp_migrate_req",
                jaunt_engine::server::listen::tcp_migrate_req().map_or(-1.0, f64::from),
            )
            .metric("cross_shard_hops_steady", steady_before + steady_after)
            .metric("cross_shard_hops_reconnect", reconnect_hops)
            .metric("engine_restart_s", secs(t_kill, t_ready))
            .metric("engine_exit_s", secs(t_kill, t_exited))
            .metric("first_tunnel_lost_s", secs(t_kill, first_down))
            .metric("last_tunnel_lost_s", secs(t_kill, last_down))
            .metric("all_back_after_kill_s", secs(t_kill, last))
            .metric("all_back_after_ready_s", secs(t_ready, last))
            .metric("p99_back_after_kill_s", secs(t_kill, p99))
            .metric("peak_reconnects_per_s", peak)
            .work(cpu, "1k agents", k as f64 / 1000.0)
            .note(format!("agents: emulated in-process (one tunnel per agent and engine shard, driven by a few epoll threads, each dial asking for its shard with `jaunt-shard.<k>` as the real agent does; `dials_per_agent` counts the connections made (TCP connected, TLS handshake) from the restart until all were back, `misplaced_dials` those that landed on another shard; `resumed_tunnels` the tunnels that came back with a resumed TLS session (each tunnel keeps its own session cache, as the real agent), `engine_tunnel_handshakes_*` the new daemon's count of full and resumed tunnel handshakes, `engine_admission_*` its handshake admission's pauses at the bound and slots released by the hold, `engine_handshakes_abandoned` the connections whose client had left before their handshake started; `engine_inventory_events_dropped` the tunnel ups and downs the new daemon's engine could not queue for control's inventory (0: control lists every agent); `somaxconn` the kernel's cap on the engine's listen queues (`net.core.somaxconn`; below 65,535 a storm larger than the queues loses SYNs, which retry after 1-7 s: config/examples/jaunt-sysctl.conf); real TLS host certificates, real mux keepalives, the real agent's jittered backoff); times are from the signal to the engine (SIGTERM, or SIGKILL with --restart crash); `p99_back_after_kill_s` when 99% of the agents were back; `engine_restart_s` is signal to the new daemon's banner (the old one's drain, then control + engine start), `engine_exit_s` signal to the old daemon's exit (its drain, or the kernel's teardown of a killed one); `tcp_migrate_req` the kernel setting that lets a new daemon start beside a killed one's listeners while they close (0: it waits for them; config/examples/jaunt-sysctl.conf); `*_tunnel_lost_s` when the agents saw their tunnels end; `cross_shard_hops_steady`: the engine's `jaunt_cross_shard_hops_total` over {STEADY_DIALS} user dials with every tunnel up, before and after the restart (0: each dial found its tunnel on its own shard); `cross_shard_hops_reconnect`: the new daemon's hops while the agents came back; plot: agents-reconnect.svg"))])
    })();
    shared.stop.store(true, SeqCst);
    for h in handles {
        let _ = h.join();
    }
    result
}

/// The engine's cross-shard hop counter.
const HOPS: &str = "jaunt_cross_shard_hops_total";

/// User dials in each steady-state check of the `agents` scenario.
const STEADY_DIALS: usize = 200;

/// Steady state: once the engine holds `tunnels` tunnels (every emulated agent and the
/// cluster's own on every shard), [`STEADY_DIALS`] user dials of the cluster's app; how much the
/// engine's cross-shard hop counter moved over them (each dial should find the app's tunnel on
/// its own shard).
fn steady_hops(spawned: &Spawned, user: &JauntUser, tunnels: usize) -> anyhow::Result<f64> {
    let Some(diag) = spawned.diag_addr.as_deref() else {
        return Ok(f64::NAN);
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = crate::cluster::metric_sum(diag, "jaunt_tunnels", "")?;
        if up >= tunnels as f64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the engine holds {up} tunnels, {tunnels} expected, after 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = crate::cluster::metric_sum(diag, HOPS, "")?;
    let target = user.target(crate::cluster::APP);
    for _ in 0..STEADY_DIALS {
        target.connect(true)?.close();
    }
    Ok(crate::cluster::metric_sum(diag, HOPS, "")? - before)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_cdf() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.5), 501.0);
        assert_eq!(percentile(&v, 0.999), 1000.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        let c = cdf(&v);
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        assert_eq!(c.last().map(|p| p.1), Some(100.0));
    }
}
