//! Agent tunnels resume their TLS sessions across an engine restart (issue 14): the engine's
//! session-ticket keys come from a secret in the data dir (`tls-tickets.key`), bound to the CA
//! roots in force. With a real `jaunt agent` serving a real sshd: after `jaunt start` is killed
//! and started again on the same data dir and port, every tunnel comes back with a resumed
//! handshake and `jaunt ssh` works again; after a CA rotation phase the agent's old tickets are
//! refused, its tunnels come back with full handshakes (verified against the roots in force),
//! and `jaunt ssh` still works. Everything waits with a deadline, never sleeps for ordering.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use support::*;

fn metrics(c: &Cluster) -> String {
    let diag = c.diag_addr().expect("banner prints the metrics address");
    tool("curl", &["-sS", &format!("http://{diag}/metrics")])
}

/// The sum over the lines of metric `name` whose labels contain every one of `labels`.
fn sum(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// Waits until the engine has one tunnel per shard (the agent covers every shard); returns
/// the metrics then and the shard count.
fn wait_for_tunnels(c: &Cluster) -> (String, usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = metrics(c);
        let shards = m
            .lines()
            .filter(|l| l.starts_with("jaunt_tunnels{"))
            .count();
        if shards > 0 && sum(&m, "jaunt_tunnels", &[]) as usize == shards {
            return (m, shards);
        }
        assert!(
            Instant::now() < deadline,
            "the agent never covered every shard: {m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGKILL, then `jaunt start` again on the same data dir and public address.
fn kill_and_start(c: &mut Cluster) -> Cluster {
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    Cluster::dev_on_at(&c.data_dir, &c.public_addr)
}

fn tunnel_handshakes(m: &str) -> (f64, f64) {
    let full = sum(
        m,
        "jaunt_tls_handshakes_total",
        &["route=\"tunnel\"", "kind=\"full\""],
    );
    let resumed = sum(
        m,
        "jaunt_tls_handshakes_total",
        &["route=\"tunnel\"", "kind=\"resumed\""],
    );
    (full, resumed)
}

/// `jaunt ca rotate --type user --phase init`, retried while the agent has not confirmed the
/// current phase (it polls every 5 s), bounded.
fn rotate_user_ca_init(c: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = c.admin(&["ca", "rotate", "--type", "user", "--phase", "init"], None);
        if o.status.success() {
            return;
        }
        let err = stderr(&o);
        assert!(
            err.contains("have not confirmed") && Instant::now() < deadline,
            "ca rotate: {err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn agent_tunnels_resume_after_a_restart_and_not_after_a_ca_rotation() {
    let (mut first, _sshd, _agent) = ssh_setup();
    let (m, shards) = wait_for_tunnels(&first);
    assert_eq!(tunnel_handshakes(&m).1, 0.0, "{m}");
    assert!(first.data_dir.join("tls-tickets.key").exists());

    // Killed and started again: the agent's tickets from the first process resume.
    let mut second = kill_and_start(&mut first);
    let (m, _) = wait_for_tunnels(&second);
    assert_eq!(
        tunnel_handshakes(&m),
        (0.0, shards as f64),
        "every tunnel resumed: {m}"
    );
    // The user notices nothing but the gap: ssh through the agent works again.
    wait_for_ssh(&first, "root@node1");

    // A CA rotation phase changes the roots in force: the agent's tickets (issued by the
    // second process, before the phase) no longer resume; full handshakes, verified against
    // the new roots, bring the tunnels back.
    rotate_user_ca_init(&second);
    let third = kill_and_start(&mut second);
    let (m, _) = wait_for_tunnels(&third);
    let (full, resumed) = tunnel_handshakes(&m);
    assert_eq!(resumed, 0.0, "an old ticket was refused: {m}");
    assert!(full >= shards as f64, "{m}");
    wait_for_ssh(&first, "root@node1");
}
