//! CI smoke run: `loadtest --spawn --smoke` with every scenario at a reduced size, against the
//! real `jaunt` binary; checks that the report is produced and its numbers are sane (not fast).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `jaunt` binary next to `loadtest` (same target directory), built if it is missing.
fn jaunt_bin(loadtest: &Path) -> PathBuf {
    let dir = loadtest.parent().unwrap();
    let jaunt = dir.join("jaunt");
    if jaunt.is_file() {
        return jaunt;
    }
    // `cargo test --workspace` builds it (the control crate's tests need it); a lone
    // `cargo test -p jaunt-loadtest` does not: build it, bounded.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "jaunt-control", "--bin", "jaunt"]);
    if dir.file_name().and_then(|n| n.to_str()) == Some("release") {
        cmd.arg("--release");
    }
    let mut child = cmd
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .spawn()
        .expect("cannot run cargo to build the jaunt binary");
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "building jaunt failed: {status}");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "building jaunt took too long; run `cargo build -p jaunt-control --bin jaunt` first \
                 (`cargo test --workspace` builds it)"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        jaunt.is_file(),
        "{} is still missing after the build: run `cargo build -p jaunt-control --bin jaunt`",
        jaunt.display()
    );
    jaunt
}

fn rows<'a>(results: &'a Value, scenario: &str) -> Vec<&'a Value> {
    results["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["scenario"] == scenario)
        .collect()
}

fn num(row: &Value, key: &str) -> f64 {
    row["metrics"][key]
        .as_f64()
        .unwrap_or_else(|| panic!("no metric {key} in {row}"))
}

fn cpu(row: &Value, group: &str) -> f64 {
    row["cpu_seconds"][group].as_f64().unwrap_or(0.0)
}

#[test]
fn smoke_run_with_every_scenario() {
    let loadtest = PathBuf::from(env!("CARGO_BIN_EXE_loadtest"));
    let jaunt = jaunt_bin(&loadtest);
    let out = tempfile::tempdir().unwrap();
    let started = Instant::now();
    // `--restart crash`: the agents scenario restarts the engine with SIGKILL, so the smoke run
    // does not depend on how long the daemon's SIGTERM drain takes (BENCHMARKS.md, Load tests).
    let o = Command::new(&loadtest)
        .args(["--spawn", "--smoke", "--restart", "crash", "--out"])
        .arg(out.path())
        .arg("--jaunt")
        .arg(&jaunt)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "loadtest failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        o.status
    );
    eprintln!("smoke run took {:?}", started.elapsed());

    let text = std::fs::read_to_string(out.path().join("results.json")).unwrap();
    let results: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(results["errors"].as_array().unwrap().len(), 0, "{text}");
    let summary = std::fs::read_to_string(out.path().join("summary.md")).unwrap();
    for s in [
        "handshake",
        "bulk",
        "rr",
        "streams",
        "idle",
        "lock",
        "agents",
    ] {
        assert!(!rows(&results, s).is_empty(), "no {s} result: {text}");
        assert!(summary.contains(&format!("## {s}")), "{summary}");
    }

    // Rates are positive, CPU was counted, and resumption resumed.
    for r in rows(&results, "handshake")
        .into_iter()
        .chain(rows(&results, "streams"))
    {
        assert!(num(r, "per_second") > 0.0, "{r}");
        assert!(num(r, "count") > 0.0, "{r}");
        assert!(r["cpu_seconds_per_unit"].is_object(), "{r}");
    }
    let hs = rows(&results, "handshake");
    let jaunt_cpu: f64 = hs.iter().map(|r| cpu(r, "jaunt")).sum();
    assert!(jaunt_cpu > 0.0, "no daemon CPU counted: {hs:?}");
    assert!(hs.iter().map(|r| cpu(r, "loadtest")).sum::<f64>() > 0.0);
    let resumed = hs
        .iter()
        .find(|r| r["variant"] == "resumed+ping")
        .expect("a resumed web handshake row");
    assert!(num(resumed, "resumed_pct") > 50.0, "{resumed}");
    let full = hs.iter().find(|r| r["variant"] == "full+ping").unwrap();
    assert_eq!(num(full, "resumed_pct"), 0.0, "{full}");

    for r in rows(&results, "bulk") {
        assert!(num(r, "MiB_per_s") > 0.0, "{r}");
    }
    let bulk_jaunt: Vec<_> = rows(&results, "bulk")
        .into_iter()
        .filter(|r| r["path"] == "jaunt")
        .collect();
    assert_eq!(bulk_jaunt.len(), 2);
    assert!(
        bulk_jaunt
            .iter()
            .map(|r| cpu(r, "jaunt") + cpu(r, "agent"))
            .sum::<f64>()
            > 0.0
    );

    let rr = rows(&results, "rr");
    assert!(rr.iter().any(|r| r["path"] == "direct"));
    for r in &rr {
        let (p50, p99, p999) = (num(r, "p50_us"), num(r, "p99_us"), num(r, "p99.9_us"));
        assert!(p50 > 0.0 && p50 <= p99 && p99 <= p999, "{r}");
    }
    let rr_jaunt = rr.iter().find(|r| r["path"] == "jaunt").unwrap();
    num(rr_jaunt, "added_p50_us");

    let idle = rows(&results, "idle")[0];
    for k in ["engine_KiB_per_session", "agent_KiB_per_session"] {
        assert!(num(idle, k).is_finite(), "{idle}");
    }
    assert!(num(idle, "engine_rss_MiB") > 0.0, "{idle}");

    let lock = rows(&results, "lock")[0];
    assert_eq!(num(lock, "closed"), num(lock, "sessions"), "{lock}");
    assert!(num(lock, "last_eof_after_start_ms") >= 0.0, "{lock}");

    let agents = rows(&results, "agents")[0];
    assert!(num(agents, "agents") > 0.0);
    assert!(num(agents, "all_back_after_kill_s") > 0.0, "{agents}");
    assert!(num(agents, "peak_reconnects_per_s") > 0.0, "{agents}");
    // One tunnel per shard and agent: the steady state's user dials never hop between shards.
    assert_eq!(num(agents, "misplaced_dials"), 0.0, "{agents}");
    assert_eq!(num(agents, "cross_shard_hops_steady"), 0.0, "{agents}");

    for svg in ["rr-latency.svg", "agents-reconnect.svg"] {
        let s = std::fs::read_to_string(out.path().join(svg)).unwrap();
        assert!(
            s.starts_with("<svg") && s.trim_end().ends_with("</svg>"),
            "{svg}"
        );
    }
}

/// The issue-13 scenarios at smoke size (10 emulated agents, 1 s windows): every emulated agent
/// confirms each rotation phase and the guard sees them all; the connect loop loses no
/// connection across the takeover (the scenario fails the run otherwise).
#[test]
fn smoke_run_of_rotation_and_takeover() {
    let loadtest = PathBuf::from(env!("CARGO_BIN_EXE_loadtest"));
    let jaunt = jaunt_bin(&loadtest);
    let out = tempfile::tempdir().unwrap();
    let o = Command::new(&loadtest)
        .args([
            "--spawn",
            "--smoke",
            "--scenario",
            "rotation",
            "--scenario",
            "takeover",
            "--out",
        ])
        .arg(out.path())
        .arg("--jaunt")
        .arg(&jaunt)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "loadtest failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        o.status
    );
    let text = std::fs::read_to_string(out.path().join("results.json")).unwrap();
    let results: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(results["errors"].as_array().unwrap().len(), 0, "{text}");

    let rotation = rows(&results, "rotation");
    assert_eq!(rotation.len(), 4, "{text}");
    for r in &rotation {
        assert_eq!(num(r, "agents"), 10.0, "{r}");
        let all = num(r, "all_confirmed_s");
        assert!(all > 0.0 && num(r, "confirmed_p50_s") <= all, "{r}");
        assert!(num(r, "guard_all_confirmed_s") > 0.0, "{r}");
    }
    // update_servers re-issues the host certificates: every emulated agent renewed its own.
    let servers = rotation
        .iter()
        .find(|r| r["variant"].as_str().unwrap().ends_with("update_servers"))
        .unwrap();
    assert_eq!(num(servers, "host_certs_renewed"), 10.0, "{servers}");

    let takeover = rows(&results, "takeover");
    assert_eq!(takeover.len(), 3, "{text}");
    for r in &takeover {
        assert_eq!(num(r, "failed"), 0.0, "{r}");
        assert!(num(r, "connections") > 0.0, "{r}");
    }
    let during = takeover
        .iter()
        .find(|r| r["variant"] == "during takeover")
        .unwrap();
    assert!(num(during, "max_ms") > 0.0, "{during}");
    num(during, "added_p99_ms");
    for svg in ["rotation-confirmed.svg", "takeover-latency.svg"] {
        let s = std::fs::read_to_string(out.path().join(svg)).unwrap();
        assert!(
            s.starts_with("<svg") && s.trim_end().ends_with("</svg>"),
            "{svg}"
        );
    }
}
