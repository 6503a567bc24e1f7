//! Regression tests for the defects issue 15 lists, through the real `jaunt` binary on
//! 127.0.0.1 with kernel-chosen ports: a second daemon on a data dir or public port, and the
//! smaller command-line defects.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::*;

/// A second `jaunt start --dev` on the same data dir started, joined the public port with
/// `SO_REUSEPORT`, took most new connections and overwrote `control.addr`; on another data dir
/// it still joined the port (and logins then failed with a CA pin mismatch).
#[test]
fn a_second_daemon_is_refused_on_the_data_dir_and_on_the_public_port() {
    let c = Cluster::dev();
    let pid = c.child.id();
    let control_addr = std::fs::read_to_string(c.data_dir.join("control.addr")).unwrap();
    let dd = c.data_dir.display().to_string();

    let err = fails(run_jaunt(
        &c.home,
        &[
            "start",
            "--dev",
            "--data-dir",
            &dd,
            "--public-addr",
            "127.0.0.1:0",
        ],
        None,
    ));
    assert!(
        err.contains(&format!(
            "data directory {dd} is in use by another jaunt (pid {pid})"
        )),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(c.data_dir.join("control.addr")).unwrap(),
        control_addr,
        "the refused daemon left control.addr alone"
    );

    let other = c.dir.path().join("other");
    let err = fails(run_jaunt(
        &c.home,
        &[
            "start",
            "--dev",
            "--data-dir",
            other.to_str().unwrap(),
            "--public-addr",
            &c.public_addr,
        ],
        None,
    ));
    assert!(
        err.contains(&format!(
            "the public port {} is already in use by jaunt (pid {pid})",
            c.public_addr
        )),
        "{err}"
    );
    assert!(err.contains("--public-addr"), "{err}");

    // The first daemon still answers every login (no second one shares its port).
    let pw = std::fs::read_to_string(c.data_dir.join("admin-password")).unwrap();
    for _ in 0..4 {
        let out = ok(c.login("admin", pw.trim(), &[]));
        assert!(out.contains("Logged in to"), "{out}");
    }
}
