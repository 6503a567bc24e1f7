//! `--scenario takeover` (issue 13's benchmark): a connect loop through the spawned cluster
//! (a new TLS connection to the engine, a dial to the TCP app through the agent, one echo, close;
//! on several threads), first on its own for a baseline, then while `jaunt start --takeover`
//! replaces the daemon, until the old process has drained and exited and a while after. The
//! latency distribution of the connections that overlapped the switch against the baseline of
//! the same run, and every failed connection.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};

use crate::client::JauntUser;
use crate::cluster::{self, Spawned};
use crate::procfs::{self, Watch};
use crate::report::{self, Row};
use crate::scenarios::{percentile, Sizes};

/// Connect loops at once: connections are in flight at every moment of the switch.
const LOOPS: usize = 4;
/// How long the old process may take to drain and exit after the new one is ready.
const OLD_EXIT_DEADLINE: Duration = Duration::from_secs(60);

/// One loop iteration: (started, took, error).
type Sample = (Instant, Duration, Option<String>);

fn one(target: &crate::client::Target, msg: &[u8]) -> anyhow::Result<()> {
    let mut c = target.connect(false)?;
    c.write_all(b"E")?;
    c.write_all(msg)?;
    c.flush()?;
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back)?;
    if back != msg {
        bail!("echo differs");
    }
    c.close();
    Ok(())
}

/// Latencies (µs, sorted) and failures of the samples `keep` selects.
fn window(samples: &[Sample], keep: impl Fn(&Sample) -> bool) -> (Vec<u64>, Vec<String>) {
    let mut lat = Vec::new();
    let mut failed = Vec::new();
    for s in samples.iter().filter(|s| keep(s)) {
        match &s.2 {
            None => lat.push(s.1.as_micros() as u64),
            Some(e) => failed.push(e.clone()),
        }
    }
    lat.sort_unstable();
    (lat, failed)
}

pub fn takeover(
    spawned: &mut Spawned,
    app: &str,
    watch: &mut Watch,
    sizes: &Sizes,
    out: &std::path::Path,
) -> anyhow::Result<Vec<Row>> {
    let user = JauntUser::from_home(&spawned.home)?;
    let target = user.target(app);
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let msg = vec![0x42u8; sizes.message];
    let loops: Vec<_> = (0..LOOPS)
        .map(|_| {
            let (samples, stop, target, msg) =
                (samples.clone(), stop.clone(), target.clone(), msg.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let r = one(&target, &msg);
                    let took = started.elapsed();
                    if let Ok(mut s) = samples.lock() {
                        s.push((started, took, r.err().map(|e| format!("{e:#}"))));
                    }
                }
            })
        })
        .collect();
    let baseline = Duration::from_secs_f64(sizes.seconds);
    type Times = (Instant, Instant, Instant, Instant, BTreeMap<String, f64>);
    let result = (|| -> anyhow::Result<Times> {
        let t_begin = Instant::now();
        std::thread::sleep(baseline);
        let before = watch.sample();
        let old_cpu_before = procfs::cpu_seconds(spawned.daemon.pid()).unwrap_or(0.0);
        // The takeover: the same command line as the running daemon, plus --takeover.
        let t_start = Instant::now();
        let mut args = cluster::dev_args(&spawned.data_dir, spawned.port);
        args.push("--takeover".to_string());
        // Its own $JAUNT_HOME, as a second operator shell would have.
        let home = spawned.dir.path().join("takeover-home");
        let (new, banner) = cluster::start_daemon_with(&spawned.jaunt, &args, &home)?;
        let t_ready = Instant::now();
        if banner.public_addr != spawned.public_addr {
            bail!(
                "the new daemon serves {}, not {}",
                banner.public_addr,
                spawned.public_addr
            );
        }
        spawned.diag_addr = banner.diag_addr;
        let mut old = std::mem::replace(&mut spawned.daemon, new);
        watch.add("jaunt", vec![spawned.daemon.pid()]);
        // The old process drains (its live connections end at once here) and exits.
        let mut old_cpu = old_cpu_before;
        let t_old_exit = loop {
            if let Some(c) = procfs::cpu_seconds(old.pid()) {
                old_cpu = c;
            }
            match old.child.try_wait() {
                Ok(Some(status)) if status.success() => break Instant::now(),
                Ok(Some(status)) => bail!("the old daemon exited with {status}"),
                Ok(None) if t_ready.elapsed() > OLD_EXIT_DEADLINE => {
                    bail!(
                        "the old daemon did not exit within {OLD_EXIT_DEADLINE:?} of the takeover"
                    )
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(anyhow!("waiting for the old daemon: {e}")),
            }
        };
        drop(old);
        std::thread::sleep(baseline);
        let after = watch.sample();
        let mut cpu = procfs::delta(&before, &after);
        // The old daemon's share (it is gone from the watch) plus the new one's.
        let new_cpu = after.get("jaunt").copied().unwrap_or(0.0);
        cpu.insert(
            "jaunt".into(),
            (old_cpu - old_cpu_before).max(0.0) + new_cpu,
        );
        Ok((t_begin, t_start, t_ready, t_old_exit, cpu))
    })();
    stop.store(true, Ordering::SeqCst);
    for l in loops {
        let _ = l.join();
    }
    let (t_begin, t_start, t_ready, t_old_exit, cpu) = result?;
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let (base, base_failed) = window(&samples, |s| s.0 + s.1 < t_start);
    let (during, during_failed) = window(&samples, |s| s.0 <= t_old_exit && s.0 + s.1 >= t_start);
    let (after, after_failed) = window(&samples, |s| s.0 > t_old_exit);
    let ms = |v: f64| v / 1e3;
    let max = |v: &[u64]| v.last().copied().unwrap_or(0) as f64;
    let secs = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
    // Latency over time: the worst connection started in each 100 ms bucket.
    let span = samples
        .iter()
        .map(|s| secs(t_begin, s.0))
        .fold(0.0f64, f64::max);
    let buckets = (span / 0.1) as usize + 1;
    let mut worst = vec![0.0f64; buckets];
    for s in &samples {
        let b = ((secs(t_begin, s.0) / 0.1) as usize).min(buckets - 1);
        worst[b] = worst[b].max(s.1.as_secs_f64() * 1e3);
    }
    let points: Vec<(f64, f64)> = worst
        .iter()
        .enumerate()
        .map(|(i, v)| (i as f64 * 0.1 - secs(t_begin, t_start), *v))
        .collect();
    let svg = report::svg_chart(
        &format!("connect loop ({LOOPS} threads) across `jaunt start --takeover`"),
        "seconds since the takeover started (ready and old exit in the row)",
        "worst connect+dial+echo per 100 ms (ms)",
        &[("worst latency".to_string(), points)],
        false,
    );
    std::fs::write(out.join("takeover-latency.svg"), svg)?;
    let failed: Vec<&String> = base_failed
        .iter()
        .chain(&during_failed)
        .chain(&after_failed)
        .collect();
    let mut rows = Vec::new();
    for (variant, lat, nfail) in [
        ("baseline (before)", &base, base_failed.len()),
        ("during takeover", &during, during_failed.len()),
        ("after (new process)", &after, after_failed.len()),
    ] {
        let mut row = Row::new("takeover", variant, "jaunt")
            .metric("connections", lat.len() as u64)
            .metric("failed", nfail as u64)
            .metric("p50_ms", ms(percentile(lat, 0.5)))
            .metric("p99_ms", ms(percentile(lat, 0.99)))
            .metric("max_ms", ms(max(lat)));
        if variant == "during takeover" {
            row = row
                .metric(
                    "added_p99_ms",
                    ms(percentile(lat, 0.99) - percentile(&base, 0.99)),
                )
                .metric("added_max_ms", ms(max(lat) - max(&base)))
                .metric("takeover_ready_s", secs(t_start, t_ready))
                .metric("old_exit_s", secs(t_start, t_old_exit))
                .work(cpu.clone(), "takeover", 1.0);
        }
        rows.push(row);
    }
    if let Some(last) = rows.last_mut() {
        last.notes.push(format!(
            "takeover: {LOOPS} threads in a loop of a new connection each (full TLS handshake to the engine, a dial of the TCP app through the cluster's agent, a {} B echo, close); baseline = connections ended before `jaunt start --takeover` started, during = those overlapping [start, old process exit], after = those started after it; added_* = during minus baseline, same run; times from the start of the takeover command; CPU over the takeover and the `--seconds` after the old process exited; plot: takeover-latency.svg{}",
            sizes.message,
            if failed.is_empty() {
                String::new()
            } else {
                format!("; first failure: {}", failed[0])
            }
        ));
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} connections failed across the takeover; first: {}",
            failed.len(),
            samples.len(),
            failed[0]
        );
    }
    Ok(rows)
}
