//! `--spawn`: a local dev cluster run with the real `jaunt` binary (as `control/tests/support`
//! does): `jaunt start --dev` on a fixed free loopback port (so a restart keeps the address), a
//! user logged in with its own `$JAUNT_HOME`, a join token, and a `jaunt agent` serving the
//! loadtest's backend as the TCP app `lt`. Every child is registered so Ctrl-C and errors tear
//! everything down.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

/// How long `jaunt start` may take to print its banner (a debug build hashes a password).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// The password of the loadtest's users.
pub const PASSWORD: &str = "loadtest password 1234";
/// The TCP app every tunneled scenario dials.
pub const APP: &str = "lt";
/// The user of the lock scenario (locked at the end; the others use `USER`).
pub const LOCK_USER: &str = "ltlock";
pub const USER: &str = "lt";

static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static TEMP_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

pub fn register_child(pid: u32) {
    if let Ok(mut c) = CHILDREN.lock() {
        c.push(pid);
    }
}

pub fn unregister_child(pid: u32) {
    if let Ok(mut c) = CHILDREN.lock() {
        c.retain(|p| *p != pid);
    }
}

pub fn register_temp(dir: &Path) {
    if let Ok(mut t) = TEMP_DIRS.lock() {
        t.push(dir.to_path_buf());
    }
}

/// Kills every registered child and removes the temporary directories (signal path).
pub fn emergency_teardown() {
    let pids: Vec<u32> = CHILDREN.lock().map(|c| c.clone()).unwrap_or_default();
    // TERM first (nginx's master stops its workers), then KILL what is left.
    for signal in ["-TERM", "-KILL"] {
        for pid in &pids {
            let _ = Command::new("kill")
                .args([signal, &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let dirs: Vec<PathBuf> = TEMP_DIRS.lock().map(|t| t.clone()).unwrap_or_default();
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Installs SIGINT/SIGTERM handling: tear down, exit 130.
pub fn install_signal_teardown() -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            eprintln!("\nloadtest: interrupted, tearing down");
            emergency_teardown();
            std::process::exit(130);
        }
    });
    Ok(())
}

/// A child process killed (and reaped) on drop.
pub struct Proc {
    pub child: Child,
    pub what: String,
}

impl Proc {
    pub fn new(child: Child, what: &str) -> Proc {
        register_child(child.id());
        Proc {
            child,
            what: what.to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait, bounded: SIGKILL after `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    eprintln!(
                        "loadtest: {} did not stop within {grace:?} of SIGTERM; killing it",
                        self.what
                    );
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        unregister_child(self.child.id());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        unregister_child(self.child.id());
    }
}

/// The `jaunt` binary: `--jaunt`, else next to this executable (the same target directory).
pub fn find_jaunt(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("--jaunt {}: no such file", p.display());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or_else(|| anyhow!("no parent dir"))?;
    // Integration tests run from target/<profile>/deps; the binaries sit one level up.
    for cand in [dir.join("jaunt"), dir.join("../jaunt")] {
        if cand.is_file() {
            return Ok(cand);
        }
    }
    bail!(
        "the `jaunt` binary is not next to {}: build it with `cargo build -p jaunt-control --bin jaunt` \
         (add --release for a release loadtest) or pass --jaunt PATH",
        exe.display()
    )
}

/// A free loopback port (bound and released; the small race is acceptable here).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A running dev cluster with its user, agent and backend.
pub struct Spawned {
    pub jaunt: PathBuf,
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub port: u16,
    pub public_addr: String,
    pub pin: String,
    /// The daemon's diagnostics endpoint (`/metrics`), `HOST:PORT`.
    pub diag_addr: Option<String>,
    pub daemon: Proc,
    pub agent: Option<Proc>,
    /// `$JAUNT_HOME` of `USER`.
    pub home: PathBuf,
    /// `$JAUNT_HOME` of `LOCK_USER`.
    pub lock_home: PathBuf,
}

/// Starts `jaunt start --dev` on `data_dir`, port `port`, with a diagnostics endpoint on a free
/// loopback port; returns the process and its banner.
pub fn start_daemon(
    jaunt: &Path,
    data_dir: &Path,
    port: u16,
    home: &Path,
) -> anyhow::Result<(Proc, Banner)> {
    start_daemon_with(jaunt, &dev_args(data_dir, port), home)
}

/// The dev daemon's command line (a takeover adds `--takeover` to the same).
pub fn dev_args(data_dir: &Path, port: u16) -> Vec<String> {
    vec![
        "start".to_string(),
        "--dev".to_string(),
        "--data-dir".to_string(),
        data_dir.display().to_string(),
        "--public-addr".to_string(),
        format!("127.0.0.1:{port}"),
        "--diag-addr".to_string(),
        "127.0.0.1:0".to_string(),
    ]
}

/// The sum of every series of metric `family` (`jaunt_cross_shard_hops_total`) whose labels
/// contain `label` (or all of them for ""), from `GET /metrics` on the diagnostics endpoint
/// `diag`.
pub fn metric_sum(diag: &str, family: &str, label: &str) -> anyhow::Result<f64> {
    use std::io::Read;
    let addr: std::net::SocketAddr = diag.parse().with_context(|| format!("diag addr {diag}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: loadtest\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let prefix = format!("{family}{{");
    Ok(text
        .lines()
        .filter(|l| {
            (l.starts_with(&prefix) || l.starts_with(&format!("{family} "))) && l.contains(label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// What `jaunt start` printed before it was ready.
pub struct Banner {
    pub public_addr: String,
    pub pin: String,
    /// `HOST:PORT` of the diagnostics endpoint (`metrics: http://HOST:PORT/metrics`), if shown.
    pub diag_addr: Option<String>,
}

/// Runs `jaunt ARGS` (a `start` command line) and waits for its banner.
pub fn start_daemon_with(
    jaunt: &Path,
    args: &[String],
    home: &Path,
) -> anyhow::Result<(Proc, Banner)> {
    let mut child = Command::new(jaunt)
        .args(args)
        .env("JAUNT_HOME", home)
        .env_remove("JAUNT_DATA_DIR")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", jaunt.display()))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let proc_ = Proc::new(child, "jaunt start");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                // Keep draining so the daemon never blocks on a full pipe.
                continue;
            }
        }
    });
    // Keep the daemon's stderr (warnings) out of our output but drained; the last lines are kept
    // for error messages.
    let err_tail = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let err_tail = err_tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut t) = err_tail.lock() {
                    t.push(line);
                    if t.len() > 20 {
                        t.remove(0);
                    }
                }
            }
        });
    }
    let deadline = Instant::now() + START_TIMEOUT;
    let (mut public_addr, mut pin, mut diag_addr) = (None, None, None);
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).map_err(|_| {
            anyhow!(
                "jaunt start did not print its banner; stdout: {lines:?}; stderr: {:?}",
                err_tail.lock().map(|t| t.clone()).unwrap_or_default()
            )
        })?;
        if let Some(v) = line.trim().strip_prefix("public addr:") {
            public_addr = Some(v.trim().to_string());
        }
        if let Some(v) = line.trim().strip_prefix("CA pin:") {
            pin = Some(v.trim().to_string());
        }
        if let Some(v) = line.trim().strip_prefix("metrics:") {
            diag_addr = Some(
                v.trim()
                    .trim_start_matches("http://")
                    .trim_end_matches("/metrics")
                    .to_string(),
            );
        }
        let done = line.starts_with("Admin commands on this host");
        lines.push(line);
        if done {
            break;
        }
    }
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Ok((
        proc_,
        Banner {
            public_addr: public_addr.ok_or_else(|| anyhow!("no public addr in the banner"))?,
            pin: pin.ok_or_else(|| anyhow!("no CA pin in the banner"))?,
            diag_addr,
        },
    ))
}

/// Runs `jaunt ARGS` with `$JAUNT_HOME` = `home`; stdout on success, an error with stderr else.
pub fn run_jaunt(
    jaunt: &Path,
    home: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<String> {
    let mut child = Command::new(jaunt)
        .args(args)
        .env("JAUNT_HOME", home)
        .env("HOME", home)
        .env_remove("JAUNT_DATA_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(input) = stdin {
        if let Some(mut i) = child.stdin.take() {
            i.write_all(input.as_bytes())?;
        }
    } else {
        drop(child.stdin.take());
    }
    let o = child.wait_with_output()?;
    if !o.status.success() {
        bail!(
            "jaunt {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).to_string())
}

impl Spawned {
    /// Starts everything; `backend` is the address of the loadtest's backend.
    pub fn start(jaunt: &Path, backend: &str) -> anyhow::Result<Spawned> {
        let dir = tempfile::Builder::new()
            .prefix("jaunt-loadtest")
            .tempdir()?;
        register_temp(dir.path());
        let data_dir = dir.path().join("data");
        let home = dir.path().join("home");
        let lock_home = dir.path().join("home-lock");
        let port = free_port()?;
        let (daemon, banner) = start_daemon(jaunt, &data_dir, port, &home)?;
        let mut s = Spawned {
            jaunt: jaunt.to_path_buf(),
            dir,
            data_dir,
            port,
            public_addr: banner.public_addr,
            pin: banner.pin,
            diag_addr: banner.diag_addr,
            daemon,
            agent: None,
            home,
            lock_home,
        };
        for (user, home) in [(USER, s.home.clone()), (LOCK_USER, s.lock_home.clone())] {
            s.admin(
                &[
                    "users",
                    "add",
                    user,
                    "--roles",
                    "access",
                    "--password-stdin",
                ],
                Some(PASSWORD),
            )?;
            run_jaunt(
                jaunt,
                &home,
                &[
                    "login",
                    "--proxy",
                    &s.public_addr,
                    "--user",
                    user,
                    "--password-stdin",
                    "--ca-pin",
                    &s.pin,
                ],
                Some(&format!("{PASSWORD}\n")),
            )?;
        }
        let token = s.token("node,app,db")?;
        let agent_data = s.dir.path().join("agent");
        let child = Command::new(jaunt)
            .args(["agent", "--proxy", &s.public_addr, "--ca-pin", &s.pin])
            .args(["--token", &token, "--name", "lt-agent", "--data-dir"])
            .arg(&agent_data)
            .args(["--app", &format!("{APP}=tcp://{backend}")])
            .env("JAUNT_HOME", s.dir.path().join("agent-home"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        s.agent = Some(Proc::new(child, "jaunt agent"));
        Ok(s)
    }

    /// An admin command (`--data-dir`).
    pub fn admin(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let mut all: Vec<&str> = args.to_vec();
        let dd = self.data_dir.display().to_string();
        all.push("--data-dir");
        all.push(&dd);
        run_jaunt(&self.jaunt, &self.home, &all, stdin)
    }

    /// A fresh join token of `types`.
    pub fn token(&self, types: &str) -> anyhow::Result<String> {
        let out = self.admin(&["tokens", "add", "--type", types, "--ttl", "2h"], None)?;
        Ok(out
            .lines()
            .next()
            .ok_or_else(|| anyhow!("no token printed"))?
            .trim()
            .to_string())
    }

    /// After a host or user CA rotation: the host CA's pin as `jaunt status` gives it now, and
    /// both users logged in again with it (their certificates and trust came from the old CAs).
    pub fn relogin(&mut self) -> anyhow::Result<()> {
        let text = self.admin(&["status", "--format", "json"], None)?;
        let st: serde_json::Value = serde_json::from_str(&text)?;
        self.pin = st["cas"]
            .as_array()
            .and_then(|cas| cas.iter().find(|c| c["type"] == "host-tls"))
            .and_then(|c| c["fingerprint"].as_str())
            .ok_or_else(|| anyhow!("no host-tls CA in jaunt status: {text}"))?
            .to_string();
        for (user, home) in [
            (USER, self.home.clone()),
            (LOCK_USER, self.lock_home.clone()),
        ] {
            run_jaunt(
                &self.jaunt,
                &home,
                &[
                    "login",
                    "--proxy",
                    &self.public_addr,
                    "--user",
                    user,
                    "--password-stdin",
                    "--ca-pin",
                    &self.pin,
                ],
                Some(&format!("{PASSWORD}\n")),
            )?;
        }
        Ok(())
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|a| a.pid())
    }

    /// SIGTERM the daemon, start it again on the same data dir and port. Returns the CPU seconds
    /// the old daemon had spent (sampled just before the signal), the instant of the signal, the
    /// instant the old one was reaped, and the instant the new one printed its banner.
    pub fn restart_daemon(
        &mut self,
        crash: bool,
    ) -> anyhow::Result<(f64, Instant, Instant, Instant)> {
        let cpu = crate::procfs::cpu_seconds(self.daemon.pid()).unwrap_or(0.0);
        let t_kill = Instant::now();
        if crash {
            // A crash: SIGKILL, then start.
            let _ = self.daemon.child.kill();
            let _ = self.daemon.child.wait();
        } else {
            // A restart as an operator does it: SIGTERM, the daemon's drain (10 s at most by its
            // own timeout; SIGKILL after 15 s), start.
            self.daemon.terminate(Duration::from_secs(15));
        }
        let t_exited = Instant::now();
        let (daemon, banner) = start_daemon(&self.jaunt, &self.data_dir, self.port, &self.home)?;
        let t_ready = Instant::now();
        self.daemon = daemon;
        self.public_addr = banner.public_addr;
        self.diag_addr = banner.diag_addr;
        Ok((cpu, t_kill, t_exited, t_ready))
    }

    /// Stops the agent and the daemon cleanly.
    pub fn stop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.terminate(Duration::from_secs(3));
        }
        // The daemon drains live connections for up to 10 s on SIGTERM; at the end of a run
        // nothing is left worth waiting for.
        self.daemon.terminate(Duration::from_secs(3));
    }
}
