//! Test harness: runs the real `jaunt` binary. A [`Cluster`] is a `jaunt start` process on
//! ports picked by the kernel (port 0), ready once it has printed its banner; commands run with
//! their own `$JAUNT_HOME` so tests never share a login.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub mod sshd;
#[allow(unused_imports)]
pub use sshd::*;
pub mod tmux;
#[allow(unused_imports)]
pub use tmux::*;

/// How long a cluster may take to print its banner (a debug build hashes the admin password).
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub fn jaunt_bin() -> &'static str {
    env!("CARGO_BIN_EXE_jaunt")
}

/// A running `jaunt start`.
pub struct Cluster {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub home: PathBuf,
    pub public_addr: String,
    pub pin: String,
    pub stdout_lines: Vec<String>,
}

impl Cluster {
    /// `jaunt start --dev` on 127.0.0.1:0.
    pub fn dev() -> Cluster {
        Cluster::dev_at("127.0.0.1:0")
    }

    /// `jaunt start --dev --public-addr PUBLIC_ADDR` (e.g. `localhost:0`: web apps need a DNS
    /// name).
    pub fn dev_at(public_addr: &str) -> Cluster {
        Cluster::dev_env(public_addr, &[])
    }

    /// [`Cluster::dev_at`] with `envs` added to the daemon's environment.
    pub fn dev_env(public_addr: &str, envs: &[(&str, &str)]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let args = vec![
            "start".to_string(),
            "--dev".to_string(),
            "--data-dir".to_string(),
            data_dir.display().to_string(),
            "--public-addr".to_string(),
            public_addr.to_string(),
            "--diag-addr".to_string(),
            "127.0.0.1:0".to_string(),
        ];
        Cluster::spawn_with(dir, data_dir, args, envs)
    }

    /// The engine's diagnostics address from the banner, if it printed one.
    pub fn diag_addr(&self) -> Option<String> {
        self.stdout_lines.iter().find_map(|l| {
            l.trim().strip_prefix("metrics:").map(|v| {
                v.trim()
                    .trim_start_matches("http://")
                    .trim_end_matches("/metrics")
                    .to_string()
            })
        })
    }

    /// `jaunt start --config FILE` with `yaml` as the config (`DATA_DIR` in it is replaced).
    /// Tests never depend on a fixed port: an engine section must set `diag_addr` (whose
    /// default is a fixed port) as well as its listen addresses.
    pub fn with_config(yaml: &str) -> Cluster {
        if yaml.contains("engine:") {
            assert!(
                yaml.contains("diag_addr:"),
                "the test config needs `diag_addr: 127.0.0.1:0` (the default is a fixed port)"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let path = dir.path().join("jaunt.yaml");
        std::fs::write(
            &path,
            yaml.replace("DATA_DIR", &data_dir.display().to_string()),
        )
        .unwrap();
        let args = vec![
            "start".to_string(),
            "--config".to_string(),
            path.display().to_string(),
        ];
        Cluster::spawn(dir, data_dir, args)
    }

    fn spawn(dir: tempfile::TempDir, data_dir: PathBuf, args: Vec<String>) -> Cluster {
        Cluster::spawn_with(dir, data_dir, args, &[])
    }

    /// The daemon's environment is the test's, without the variables that change what it does
    /// (`JAUNT_DATA_DIR`, mimalloc's `MIMALLOC_ALLOW_THP`), plus `envs`.
    fn spawn_with(
        dir: tempfile::TempDir,
        data_dir: PathBuf,
        args: Vec<String>,
        envs: &[(&str, &str)],
    ) -> Cluster {
        let home = dir.path().join("home");
        let mut child = Command::new(jaunt_bin())
            .args(&args)
            .env("JAUNT_HOME", &home)
            .env_remove("JAUNT_DATA_DIR")
            .env_remove("MIMALLOC_ALLOW_THP")
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        let mut public_addr = None;
        let mut pin = None;
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        let mut banner_done = false;
        while !banner_done {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    panic!("jaunt start did not become ready; output so far: {lines:#?}");
                }
            };
            if let Some(v) = line.trim().strip_prefix("public addr:") {
                public_addr = Some(v.trim().to_string());
            }
            banner_done = line.starts_with("Admin commands on this host");
            if let Some(v) = line.trim().strip_prefix("CA pin:") {
                pin = Some(v.trim().to_string());
            }
            lines.push(line);
        }
        // Keep draining stdout so the daemon never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        Cluster {
            child,
            dir,
            data_dir,
            home,
            public_addr: public_addr.unwrap(),
            pin: pin.unwrap(),
            stdout_lines: lines,
        }
    }

    /// Runs `jaunt ARGS` as a user of this cluster (own `$JAUNT_HOME`), with `stdin` piped in.
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        run_jaunt(&self.home, args, stdin)
    }

    /// Runs an admin command with `--data-dir`.
    pub fn admin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        let dd = self.data_dir.display().to_string();
        all.push("--data-dir");
        all.push(&dd);
        run_jaunt(&self.home, &all, stdin)
    }

    /// `jaunt login` as `user` with `password`, pinning the CA.
    pub fn login(&self, user: &str, password: &str, extra: &[&str]) -> Output {
        let mut args = vec![
            "login",
            "--proxy",
            &self.public_addr,
            "--user",
            user,
            "--password-stdin",
            "--ca-pin",
            &self.pin,
        ];
        args.extend_from_slice(extra);
        self.run(&args, Some(&format!("{password}\n")))
    }

    /// `jaunt users add USER --roles ROLES --logins LOGINS` with `password` on stdin, checked
    /// to succeed.
    pub fn add_user(&self, user: &str, roles: &str, logins: &str, password: &str) {
        ok(self.admin(
            &[
                "users",
                "add",
                user,
                "--roles",
                roles,
                "--logins",
                logins,
                "--password-stdin",
            ],
            Some(password),
        ));
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.home.join("keys")
    }

    /// Sends SIGTERM, waits, and returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        // kill(1) keeps the tests free of unsafe code.
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }

    /// `jaunt start --dev ... --takeover` with the arguments of [`Cluster::dev`] on this
    /// cluster's data directory: a new process that takes this one's sockets over. Ready (its
    /// banner printed) once the old process has stopped accepting and it accepts. Its own
    /// `$JAUNT_HOME`; `self.child` stays the old process.
    pub fn takeover(&self, extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec![
            "start".to_string(),
            "--dev".to_string(),
            "--data-dir".to_string(),
            self.data_dir.display().to_string(),
            "--public-addr".to_string(),
            "127.0.0.1:0".to_string(),
            "--diag-addr".to_string(),
            "127.0.0.1:0".to_string(),
            "--takeover".to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        Cluster::spawn(dir, self.data_dir.clone(), args)
    }

    /// A new `jaunt start --dev` on an existing data directory and public address (after a
    /// stop or a kill: agents redial the same port), with a diagnostics endpoint.
    pub fn dev_on_at(data_dir: &Path, public_addr: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let args = vec![
            "start".to_string(),
            "--dev".to_string(),
            "--data-dir".to_string(),
            data_dir.display().to_string(),
            "--public-addr".to_string(),
            public_addr.to_string(),
            "--diag-addr".to_string(),
            "127.0.0.1:0".to_string(),
        ];
        Cluster::spawn(dir, data_dir.to_path_buf(), args)
    }

    /// A new `jaunt start --dev` on an existing data directory (after a stop).
    pub fn dev_on(data_dir: &Path) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let args = vec![
            "start".to_string(),
            "--dev".to_string(),
            "--data-dir".to_string(),
            data_dir.display().to_string(),
            "--public-addr".to_string(),
            "127.0.0.1:0".to_string(),
        ];
        Cluster::spawn(dir, data_dir.to_path_buf(), args)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run_jaunt(home: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(jaunt_bin())
        .args(args)
        .env("JAUNT_HOME", home)
        .env("HOME", home)
        .env_remove("JAUNT_DATA_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        // A command may exit before it reads its input (a refused --ca-pin, say): the pipe is
        // then closed, which is its answer, not the test's failure.
        let written = child.stdin.take().unwrap().write_all(input.as_bytes());
        if let Err(e) = written {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Asserts success and returns stdout.
#[track_caller]
pub fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "command failed: {}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Asserts failure and returns stderr.
#[track_caller]
pub fn fails(o: Output) -> String {
    assert!(
        !o.status.success(),
        "command unexpectedly succeeded\nstdout: {}",
        stdout(&o)
    );
    stderr(&o)
}

/// Runs an external tool and returns its stdout, asserting success.
#[track_caller]
pub fn tool(program: &str, args: &[&str]) -> String {
    let o = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        o.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

impl Cluster {
    /// `jaunt audit search [--type TY] --format json` as the local admin, parsed.
    pub fn audit_events(&self, ty: Option<&str>) -> Vec<serde_json::Value> {
        let mut args = vec!["audit", "search", "--format", "json"];
        if let Some(ty) = ty {
            args.extend(["--type", ty]);
        }
        let out = ok(self.admin(&args, None));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("audit search output: {e}: {out}"))
    }

    /// Polls the audit log (bounded) until every `session.start` has exactly one `session.end`
    /// with the same `session_id` and vice versa; fails with the unpaired sessions and their
    /// events after the deadline.
    #[track_caller]
    pub fn assert_sessions_paired(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let events = self.audit_events(Some("session"));
            let problems = unpaired_sessions(&events);
            if problems.is_empty() {
                return;
            }
            if std::time::Instant::now() >= deadline {
                let mut report = String::new();
                for (id, starts, ends) in &problems {
                    report.push_str(&format!(
                        "  session {id}: {starts} session.start, {ends} session.end\n"
                    ));
                    for e in events.iter().filter(|e| e["session_id"] == id.as_str()) {
                        report.push_str(&format!("    {e}\n"));
                    }
                }
                panic!(
                    "sessions not paired one start to one end after 30 s ({} of {} events):\n{report}",
                    problems.len(),
                    events.len()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Sessions whose `session.start` and `session.end` counts are not exactly one each, as
/// (session id, starts, ends). Events without a session id count under `<none>`.
pub fn unpaired_sessions(events: &[serde_json::Value]) -> Vec<(String, usize, usize)> {
    let mut by_id: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for e in events {
        let id = e["session_id"].as_str().unwrap_or("<none>").to_string();
        match e["event"].as_str() {
            Some("session.start") => by_id.entry(id).or_default().0 += 1,
            Some("session.end") => by_id.entry(id).or_default().1 += 1,
            _ => {}
        }
    }
    by_id
        .into_iter()
        .filter(|(_, (s, e))| (*s, *e) != (1, 1))
        .map(|(id, (s, e))| (id, s, e))
        .collect()
}

/// A child process killed and reaped when dropped (agents, `jaunt proxy`, sshd listeners).
pub struct Reaped(pub Child);

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP echo server on 127.0.0.1:0, a thread per connection, for the life of the test.
pub fn echo_server() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let Ok(mut reader) = conn.try_clone() else {
                    return;
                };
                let _ = std::io::copy(&mut reader, &mut conn);
            });
        }
    });
    addr
}
