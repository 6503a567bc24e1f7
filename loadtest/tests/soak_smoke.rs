//! CI smoke run of the soak: `loadtest --spawn --smoke --scenario soak` (a few thousand user
//! streams with every other operation of the mix, a `kill -9` of the daemon halfway, an 8 s
//! audit retention) against the real `jaunt` binary, real sshd and real PostgreSQL. Checks that
//! every operation ran without errors outside the restart, that nothing acknowledged was lost,
//! that the store held nothing older than the retention at the end, and that the plot and the
//! slopes were written.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

#[test]
fn soak_smoke_with_a_crash_and_retention() {
    let loadtest = PathBuf::from(env!("CARGO_BIN_EXE_loadtest"));
    let jaunt = loadtest.parent().unwrap().join("jaunt");
    assert!(
        jaunt.is_file(),
        "{} is missing: run `cargo build -p jaunt-control --bin jaunt` (`cargo test --workspace` builds it)",
        jaunt.display()
    );
    let out = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let o = Command::new(&loadtest)
        .args(["--spawn", "--smoke", "--scenario", "soak", "--out"])
        .arg(out.path())
        .arg("--jaunt")
        .arg(&jaunt)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "soak failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        o.status
    );
    eprintln!("soak smoke took {:?}", started.elapsed());

    let text = std::fs::read_to_string(out.path().join("soak.json")).unwrap();
    let soak: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(soak["problems"].as_array().unwrap().len(), 0, "{stdout}");
    for (name, op) in soak["ops"].as_object().unwrap() {
        assert!(op["done"].as_u64().unwrap() > 0, "{name} never ran: {op}");
        assert_eq!(op["errors"].as_u64(), Some(0), "{name}: {op}");
    }
    assert!(
        soak["ops"]["stream"]["done"].as_u64().unwrap() >= soak["size"]["opens"].as_u64().unwrap()
    );
    // The kill happened halfway and the check saw what was acknowledged before it.
    let kill = &soak["kill"];
    assert!(kill["at_opens"].as_u64().unwrap() > 0, "{kill}");
    assert!(
        kill["logins_found"].as_u64().unwrap() >= kill["logins_acked"].as_u64().unwrap(),
        "{kill}"
    );
    // Samples carry the daemon's and agent's memory and descriptors, the store, the gauges.
    let samples = soak["samples"].as_array().unwrap();
    assert!(samples.len() >= 5, "{} samples", samples.len());
    let last = samples.last().unwrap();
    for k in [
        "daemon_rss",
        "daemon_fds",
        "agent_rss",
        "agent_fds",
        "store_bytes",
    ] {
        assert!(last[k].as_f64().unwrap() > 0.0, "{k}: {last}");
    }
    assert!(
        last["gauges"]
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("jaunt_connections_active{shard=")),
        "{last}"
    );
    let trends = soak["trends"].as_array().unwrap();
    for curve in ["daemon RSS (MiB)", "agent fds", "store (MiB)", "stream /s"] {
        assert!(
            trends.iter().any(|t| t["curve"] == curve),
            "no slope for {curve}: {trends:?}"
        );
    }
    // Retention: the run outlived the 8 s retention, and the store kept within it. Sessions are
    // counted when the traffic stopped: by the final read (after the shutdown) the retention
    // may rightly have removed them all.
    let audit = &soak["audit"];
    assert!(audit["sessions_at_stop"].as_u64().unwrap() > 0, "{audit}");
    assert!(audit["bytes_per_session"].as_f64().unwrap() > 0.0);
    let svg = std::fs::read_to_string(out.path().join("soak.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("kill -9"));
    let summary = std::fs::read_to_string(out.path().join("summary.md")).unwrap();
    assert!(summary.contains("## soak") && summary.contains("slope per hour"));
}
