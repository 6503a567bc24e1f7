//! SIGHUP with the real binary: `jaunt start --config` re-reads its file and hands the engine
//! its new limits without dropping connections (a bad file keeps the old ones and says where it
//! is wrong); an agent run from `jaunt start --config agent.yaml` re-reads its apps and announces
//! them on its live tunnels (heartbeats), which `jaunt get apps` then lists.
//!
//! Every wait polls a condition (a metric, an output line, a listing) with a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::*;

/// Bound on every wait; generous for a loaded 2-core machine and a debug build.
const WAIT: Duration = Duration::from_secs(60);

/// A `jaunt` process whose stdout and stderr lines arrive on one channel.
struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line so far.
    seen: Vec<String>,
    /// Lines no wait took yet.
    pending: Vec<String>,
}

impl Daemon {
    fn spawn(args: &[&str], home: &Path) -> Daemon {
        let mut child = Command::new(jaunt_bin())
            .args(args)
            .env("JAUNT_HOME", home)
            .env_remove("JAUNT_DATA_DIR")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for reader in [
            Box::new(out) as Box<dyn Read + Send>,
            Box::new(err) as Box<dyn Read + Send>,
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Daemon {
            child,
            lines,
            seen: Vec::new(),
            pending: Vec::new(),
        }
    }

    /// Waits for a line `matches` accepts that no earlier wait took (stdout and stderr lines
    /// may arrive in either order); returns it.
    fn wait_line(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        if let Some(at) = self.pending.iter().position(|l| matches(l)) {
            return self.pending.remove(at);
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                    self.pending.push(line);
                }
                Err(_) => panic!("timed out waiting for {what}; output: {:#?}", self.seen),
            }
        }
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        // kill(1) keeps the tests free of unsafe code.
        assert!(Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get(addr: &str, path: &str) -> String {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).unwrap();
    text
}

/// Sum of a metric's samples whose labels include every `labels` pair.
fn metric(diag: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    http_get(diag, "/metrics")
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            let wanted = metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            wanted.then(|| value.parse::<u64>().ok()).flatten()
        })
        .sum()
}

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the engine closed `tcp` (EOF or reset) rather than keeping it open, waiting at most
/// `patience` for either.
fn closed_within(tcp: &mut TcpStream, patience: Duration) -> bool {
    tcp.set_read_timeout(Some(patience)).unwrap();
    let mut byte = [0u8; 1];
    match tcp.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

fn limits_yaml(data_dir: &Path, shards: usize, max_connections: &str, idle: &str) -> String {
    format!(
        "cluster_name: reload.test\n\
         data_dir: {}\n\
         control:\n  listen_addr: 127.0.0.1:0\n\
         engine:\n  public_addr: 127.0.0.1:0\n  listen_addr: 127.0.0.1:0\n  shards: {shards}\n\
         \x20 diag_addr: 127.0.0.1:0\n  handshake_timeout: 5m\n  idle_timeout: {idle}\n\
         \x20 max_connections_per_shard: {max_connections}\n",
        data_dir.display()
    )
}

/// SIGHUP lowers `engine.max_connections_per_shard`: new connections are refused and counted
/// while the one already open stays; a bad edit names its line and key and keeps the limit;
/// a changed shard count is named as needing a restart.
#[test]
fn sighup_reloads_engine_limits_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jaunt.yaml");
    let data_dir = dir.path().join("data");
    std::fs::write(&path, limits_yaml(&data_dir, 1, "100", "1h")).unwrap();
    let mut daemon = Daemon::spawn(
        &["start", "--config", path.to_str().unwrap()],
        &dir.path().join("home"),
    );
    let public = daemon.wait_line("the public address", |l| {
        l.trim().starts_with("public addr:")
    });
    let public = public
        .trim()
        .trim_start_matches("public addr:")
        .trim()
        .to_string();
    let diag = daemon.wait_line("the metrics address", |l| l.trim().starts_with("metrics:"));
    let diag = diag
        .trim()
        .trim_start_matches("metrics:")
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string();
    daemon.wait_line("the banner", |l| {
        l.starts_with("Admin commands on this host")
    });

    // A connection in its handshake phase (the first byte of a ClientHello, no more): held
    // open for 5 minutes.
    let started_hello = |public: &str| {
        let mut tcp = TcpStream::connect(public).unwrap();
        tcp.write_all(&[22]).unwrap();
        tcp
    };
    let mut held = started_hello(&public);
    wait_for("the held connection to count", || {
        metric(&diag, "jaunt_connections_active", &[]) == 1
    });

    // Lower the bound to 1.
    std::fs::write(&path, limits_yaml(&data_dir, 1, "1", "1h")).unwrap();
    daemon.signal("-HUP");
    daemon.wait_line("the reload", |l| {
        l.contains("reloaded") && l.contains("max_connections_per_shard 1,")
    });
    let refused = |diag: &str| {
        metric(
            diag,
            "jaunt_connections_refused_total",
            &[("reason", "too_many_connections")],
        )
    };
    assert!(
        !daemon.seen.iter().any(|l| l.contains("after a restart")),
        "an unchanged setting was reported as changed: {:#?}",
        daemon.seen
    );
    let mut extra = started_hello(&public);
    assert!(
        closed_within(&mut extra, WAIT),
        "a new connection was let in"
    );
    wait_for("the refusal to count", || refused(&diag) == 1);
    assert!(
        !closed_within(&mut held, Duration::from_millis(300)),
        "the live connection was dropped"
    );
    assert_eq!(metric(&diag, "jaunt_connections_active", &[]), 1);

    // A bad edit (that would also raise the bound) is refused with its line and key.
    std::fs::write(&path, limits_yaml(&data_dir, 1, "100", "forever")).unwrap();
    daemon.signal("-HUP");
    let error = daemon.wait_line("the reload error", |l| {
        l.contains("reloading") && l.contains("failed")
    });
    assert!(error.contains("failed"), "{error}");
    assert!(error.contains("jaunt.yaml:11:"), "{error}");
    assert!(error.contains("engine.idle_timeout"), "{error}");
    let mut extra = started_hello(&public);
    assert!(
        closed_within(&mut extra, WAIT),
        "the bad file raised the bound"
    );
    wait_for("the second refusal to count", || refused(&diag) == 2);

    // Raise it to 2 and change the shard count: the bound applies, the shards need a restart.
    std::fs::write(&path, limits_yaml(&data_dir, 2, "2", "1h")).unwrap();
    daemon.signal("-HUP");
    let warning = daemon.wait_line("the restart warning", |l| l.contains("after a restart"));
    assert!(warning.contains("engine.shards"), "{warning}");
    daemon.wait_line("the second reload", |l| {
        l.contains("reloaded") && l.contains("max_connections_per_shard 2,")
    });
    let mut second = started_hello(&public);
    assert!(!closed_within(&mut second, Duration::from_millis(300)));
    wait_for("two live connections", || {
        metric(&diag, "jaunt_connections_active", &[]) == 2
    });
    assert_eq!(refused(&diag), 2);
    assert!(!closed_within(&mut held, Duration::from_millis(10)));
}

fn agent_yaml(data_dir: &Path, public: &str, token: &str, pin: &str, apps: &[&str]) -> String {
    let mut yaml = format!(
        "data_dir: {}\nagent:\n  proxy_addr: {public}\n  token: {token}\n  ca_pin: {pin}\n  \
         name: reload-node\n  labels:\n    env: test\n  services:\n    apps:\n",
        data_dir.display()
    );
    for app in apps {
        yaml.push_str(&format!(
            "      - {{ name: {app}, uri: tcp://127.0.0.1:9 }}\n"
        ));
    }
    yaml
}

/// An agent run from agent.yaml: edit the file, SIGHUP, and `jaunt get apps` lists the new app
/// (and drops a removed one) while the agent's tunnels stay up (no tunnel connection is made).
#[test]
fn sighup_makes_an_agent_announce_its_new_apps() {
    let c = Cluster::dev();
    let diag = c.diag_addr().unwrap();
    let out = ok(c.admin(&["tokens", "add", "--type", "node,app"], None));
    let token = out.lines().next().unwrap().trim().to_string();
    let path = c.dir.path().join("agent.yaml");
    let data_dir = c.dir.path().join("agent-data");
    let write = |apps: &[&str]| {
        std::fs::write(
            &path,
            agent_yaml(&data_dir, &c.public_addr, &token, &c.pin, apps),
        )
        .unwrap();
    };
    write(&["first"]);
    let mut agent = Daemon::spawn(
        &["start", "--config", path.to_str().unwrap()],
        &c.dir.path().join("agent-home"),
    );
    let apps = || ok(c.admin(&["get", "apps"], None));
    wait_for("the first app", || apps().contains("first"));
    let shards = 2.min(std::thread::available_parallelism().map_or(1, |n| n.get())) as u64;
    wait_for("a tunnel on every shard", || {
        metric(&diag, "jaunt_tunnels", &[]) == shards
    });
    let tunnel_connections = || {
        metric(
            &diag,
            "jaunt_connections_accepted_total",
            &[("route", "tunnel")],
        )
    };
    let before = tunnel_connections();

    write(&["first", "second"]);
    agent.signal("-HUP");
    agent.wait_line("the agent's reload", |l| {
        l.contains("jaunt agent: reloaded")
    });
    wait_for("the second app", || {
        let listed = apps();
        listed.contains("second") && listed.contains("first")
    });

    write(&["second"]);
    agent.signal("-HUP");
    wait_for("the first app to go", || {
        let listed = apps();
        listed.contains("second") && !listed.contains("first")
    });
    assert_eq!(tunnel_connections(), before, "a tunnel was redialed");
    assert_eq!(metric(&diag, "jaunt_tunnels", &[]), shards);

    // A file that does not load keeps what is announced.
    std::fs::write(&path, "agent: [").unwrap();
    agent.signal("-HUP");
    agent.wait_line("the failed reload", |l| {
        l.contains("reloading") && l.contains("failed")
    });
    let listed = apps();
    assert!(listed.contains("second"), "{listed}");
}
