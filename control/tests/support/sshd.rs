//! Real OpenSSH for the tests: an `sshd` per connection behind a listener on port 0 (inetd
//! mode, host certificate from the cluster's host CA), `jaunt agent` processes serving it, and a
//! dev cluster where alice may log in as `root`. Not here: what the tests then assert.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

pub const PASSWORD: &str = "correct horse battery";

/// A real sshd behind a listener on 127.0.0.1:0: every accepted connection gets `sshd -i`.
pub struct Sshd {
    pub addr: String,
    _dir: PathBuf,
}

pub fn sshd_binary() -> &'static str {
    "/usr/sbin/sshd"
}

impl Sshd {
    /// An sshd whose host certificate names `node1`.
    pub fn start(c: &Cluster) -> Sshd {
        Sshd::start_named(c, "node1")
    }

    /// An sshd whose host certificate names `host` (the node name ssh checks it against);
    /// its sessions see `JAUNT_TEST_NODE=<host>`, so output shows which node ran a command.
    pub fn start_named(c: &Cluster, host: &str) -> Sshd {
        Sshd::start_configured(c, host, "", None)
    }

    /// [`Sshd::start_named`] with `extra` sshd_config lines ahead of the usual ones (sshd
    /// takes a keyword's first value, so these win), logging to `log` when given (`-E`).
    pub fn start_configured(c: &Cluster, host: &str, extra: &str, log: Option<PathBuf>) -> Sshd {
        let dir = c.dir.path().join(format!("sshd-{host}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        ok(c.admin(
            &[
                "ca",
                "sign-host",
                "--host",
                host,
                "--out",
                dir.to_str().unwrap(),
            ],
            None,
        ));
        std::fs::write(
            dir.join("user_ca.pub"),
            ok(c.admin(&["ca", "export", "--type", "user-ssh"], None)),
        )
        .unwrap();
        let config = format!(
            "{extra}HostKey {d}/{host}\nHostCertificate {d}/{host}-cert.pub\nTrustedUserCAKeys {d}/user_ca.pub\n\
             AuthorizedKeysFile none\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nPidFile none\nLogLevel VERBOSE\n\
             Subsystem sftp internal-sftp\nSetEnv JAUNT_TEST_NODE={host}\n",
            d = dir.display()
        );
        std::fs::write(dir.join("sshd_config"), config).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cfg = dir.join("sshd_config");
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                let fd: std::os::fd::OwnedFd = conn.into();
                let fd2 = fd.try_clone().unwrap();
                let mut args = vec!["-i".to_string(), "-f".into(), cfg.display().to_string()];
                match &log {
                    Some(log) => args.extend(["-E".to_string(), log.display().to_string()]),
                    None => args.push("-e".into()),
                }
                let _ = Command::new(sshd_binary())
                    .args(&args)
                    .stdin(Stdio::from(fd))
                    .stdout(Stdio::from(fd2))
                    .stderr(Stdio::null())
                    .spawn();
            }
        });
        Sshd { addr, _dir: dir }
    }
}

/// `jaunt agent` as its own process, joined with a fresh token.
pub fn start_agent(c: &Cluster, name: &str, extra: &[&str]) -> (Reaped, PathBuf) {
    let out = ok(c.admin(&["tokens", "add", "--type", "node,app,db"], None));
    let token = out.lines().next().unwrap().trim().to_string();
    let data = c.dir.path().join(format!("agent-{name}"));
    let child = spawn_agent(c, &data, name, Some(&token), extra);
    (child, data)
}

pub fn spawn_agent(
    c: &Cluster,
    data: &Path,
    name: &str,
    token: Option<&str>,
    extra: &[&str],
) -> Reaped {
    let mut args = vec![
        "agent".to_string(),
        "--proxy".to_string(),
        c.public_addr.clone(),
        "--ca-pin".to_string(),
        c.pin.clone(),
        "--data-dir".to_string(),
        data.display().to_string(),
        "--name".to_string(),
        name.to_string(),
    ];
    if let Some(t) = token {
        args.push("--token".into());
        args.push(t.into());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Reaped(
        Command::new(jaunt_bin())
            .args(&args)
            .env("JAUNT_HOME", c.dir.path().join("agent-home"))
            .stdout(Stdio::null())
            .stderr(match std::env::var_os("JAUNT_TEST_AGENT_LOG") {
                // for debugging a test: the agent's log in this file
                Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
                None => Stdio::null(),
            })
            .spawn()
            .unwrap(),
    )
}

/// Waits until `jaunt ssh LOGIN@NODE -- true` works (the agent is connected), bounded.
pub fn wait_for_ssh(c: &Cluster, dest: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = c.run(&["ssh", dest, "--", "true"], None);
        if o.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ssh never worked: {}",
            stderr(&o)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A dev cluster, alice logged in with login `root`, a real sshd, and an agent serving it as
/// `node1`, reachable (`jaunt ssh root@node1` works).
pub fn ssh_setup() -> (Cluster, Sshd, (Reaped, PathBuf)) {
    if !Path::new(sshd_binary()).exists() {
        panic!(
            "OpenSSH server is not installed (apt-get install openssh-server; .ci/run does this)"
        );
    }
    let c = Cluster::dev();
    c.add_user("alice", "access", "root", PASSWORD);
    ok(c.login("alice", PASSWORD, &[]));
    let sshd = Sshd::start(&c);
    let agent = start_agent(&c, "node1", &["--ssh", &sshd.addr]);
    wait_for_ssh(&c, "root@node1");
    (c, sshd, agent)
}
