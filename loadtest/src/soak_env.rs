//! The soak scenario's cluster: `jaunt start --config` (so `audit.retention` and the
//! diagnostics port can be set) on a fixed loopback port named `localhost` (web apps need a DNS
//! name), three users, a real `sshd` (inetd mode, one `sshd -i` per connection), a real
//! PostgreSQL 15 server with TLS and client certificates from the cluster's db CA, a small HTTP
//! app, the main `jaunt agent` serving all of them plus the TCP backend, and a second agent that
//! the soak restarts. Everything is torn down on drop (and by the harness's signal teardown).
//!
//! Not here: the traffic, sampling and report (`soak.rs`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

use crate::cluster::{self, free_port, register_temp, run_jaunt, Proc, PASSWORD};

/// The soak's user for streams, ssh, apps and databases.
pub const USER: &str = "soak";
/// The user that logs in over and over.
pub const LOGIN_USER: &str = "soaklogin";
/// The user that is locked and unlocked.
pub const LOCK_USER: &str = "soaklock";
/// The TCP app (the loadtest backend) on the main agent.
pub const TCP_APP: &str = "lt";
/// The same backend on the agent that is restarted.
pub const RESTART_APP: &str = "lt2";
/// The HTTP app.
pub const WEB_APP: &str = "ltweb";
/// The node (sshd) name.
pub const NODE: &str = "soaknode";
/// The PostgreSQL database resource.
pub const DB: &str = "pgsoak";
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const SSHD: &str = "/usr/sbin/sshd";

/// The running soak cluster.
pub struct SoakCluster {
    pub jaunt: PathBuf,
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub public_addr: String,
    pub pin: String,
    pub diag_addr: String,
    pub daemon: Proc,
    pub agent: Option<Proc>,
    pub agent2: Option<Proc>,
    /// `$JAUNT_HOME` of [`USER`], [`LOGIN_USER`], [`LOCK_USER`].
    pub home: PathBuf,
    pub login_home: PathBuf,
    pub lock_home: PathBuf,
    /// Why ssh / PostgreSQL are not part of the mix (a missing binary), if so.
    pub ssh_missing: Option<String>,
    pub pg_missing: Option<String>,
    pub pg: Option<Postgres>,
}

impl SoakCluster {
    /// Starts everything; `backend` is the loadtest backend's address, `retention` the value of
    /// `audit.retention`.
    pub fn start(jaunt: &Path, backend: &str, retention: &str) -> anyhow::Result<SoakCluster> {
        let dir = tempfile::Builder::new().prefix("jaunt-soak").tempdir()?;
        register_temp(dir.path());
        let data_dir = dir.path().join("data");
        let port = free_port()?;
        let config = dir.path().join("jaunt.yaml");
        std::fs::write(
            &config,
            format!(
                "version: v1\ncluster_name: soak.test\ndata_dir: {data}\nlog:\n  level: warn\n\
                 control:\n  listen_addr: 127.0.0.1:0\n  second_factor: off\n\
                 engine:\n  public_addr: localhost:{port}\n  listen_addr: 127.0.0.1:{port}\n  \
                 shards: 2\n  diag_addr: 127.0.0.1:0\n\
                 audit:\n  retention: {retention}\n",
                data = data_dir.display()
            ),
        )?;
        let home = dir.path().join("home");
        let (daemon, banner) = start(jaunt, &config, &home)?;
        let mut c = SoakCluster {
            jaunt: jaunt.to_path_buf(),
            data_dir,
            config,
            public_addr: banner.public_addr,
            pin: banner.pin,
            diag_addr: banner
                .diag_addr
                .ok_or_else(|| anyhow!("the daemon printed no metrics address"))?,
            daemon,
            agent: None,
            agent2: None,
            login_home: dir.path().join("home-login"),
            lock_home: dir.path().join("home-lock"),
            home,
            ssh_missing: None,
            pg_missing: None,
            pg: None,
            dir,
        };
        c.admin(
            &[
                "users",
                "add",
                USER,
                "--roles",
                "access",
                "--logins",
                "root",
                "--db-users",
                USER,
                "--db-names",
                "postgres",
                "--password-stdin",
            ],
            Some(PASSWORD),
        )?;
        for user in [LOGIN_USER, LOCK_USER] {
            c.admin(
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
        }
        for (user, home) in [
            (USER, c.home.clone()),
            (LOGIN_USER, c.login_home.clone()),
            (LOCK_USER, c.lock_home.clone()),
        ] {
            c.login(user, &home)?;
        }

        let mut agent_args: Vec<String> = vec![
            "--app".into(),
            format!("{TCP_APP}=tcp://{backend}"),
            "--app".into(),
            format!("{WEB_APP}=http://{}", start_web_app()?),
        ];
        if Path::new(SSHD).exists() {
            let sshd = start_sshd(&c)?;
            agent_args.extend(["--ssh".into(), sshd]);
        } else {
            c.ssh_missing = Some(format!(
                "{SSHD} is missing (apt-get install openssh-server)"
            ));
        }
        if Path::new(PG_BIN).join("initdb").exists() && Path::new("/usr/bin/psql").exists() {
            let pg = Postgres::start(&c)?;
            pg.superuser_sql(&format!("CREATE ROLE {USER} LOGIN"))?;
            agent_args.extend([
                "--db".into(),
                format!("{DB}=postgres://127.0.0.1:{}", pg.port),
            ]);
            c.pg = Some(pg);
        } else {
            c.pg_missing = Some(format!(
                "{PG_BIN}/initdb or psql is missing (apt-get install postgresql)"
            ));
        }
        let token = c.token("node,app,db")?;
        c.agent = Some(c.spawn_agent("soak-agent", NODE, Some(&token), &agent_args)?);
        let token2 = c.token("app")?;
        c.agent2 = Some(c.spawn_agent(
            "soak-agent2",
            "soak-agent2",
            Some(&token2),
            &["--app".into(), format!("{RESTART_APP}=tcp://{backend}")],
        )?);
        Ok(c)
    }

    /// `jaunt login` as `user` into `home`.
    pub fn login(&self, user: &str, home: &Path) -> anyhow::Result<()> {
        run_jaunt(
            &self.jaunt,
            home,
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
        )
        .map(|_| ())
    }

    /// An admin command (`--data-dir`).
    pub fn admin(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let mut all: Vec<&str> = args.to_vec();
        let dd = self.data_dir.display().to_string();
        all.push("--data-dir");
        all.push(&dd);
        run_jaunt(&self.jaunt, &self.home, &all, stdin)
    }

    pub fn token(&self, types: &str) -> anyhow::Result<String> {
        let out = self.admin(&["tokens", "add", "--type", types, "--ttl", "24h"], None)?;
        Ok(out
            .lines()
            .next()
            .ok_or_else(|| anyhow!("no token printed"))?
            .trim()
            .to_string())
    }

    /// Starts `jaunt agent` with data dir `DIR/<data>`; `token` only the first time.
    pub fn spawn_agent(
        &self,
        data: &str,
        name: &str,
        token: Option<&str>,
        extra: &[String],
    ) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(&self.jaunt);
        cmd.args(["agent", "--proxy", &self.public_addr, "--ca-pin", &self.pin])
            .args(["--name", name, "--data-dir"])
            .arg(self.dir.path().join(data))
            .args(extra);
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        let child = cmd
            .env("JAUNT_HOME", self.dir.path().join("agent-home"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Proc::new(child, "jaunt agent"))
    }

    /// `kill -9` of the daemon, then the same config again; returns when the new one printed its
    /// banner.
    pub fn crash_and_restart(&mut self) -> anyhow::Result<()> {
        let _ = self.daemon.child.kill();
        let _ = self.daemon.child.wait();
        cluster::unregister_child(self.daemon.pid());
        let (daemon, banner) = start(&self.jaunt, &self.config, &self.home)?;
        self.daemon = daemon;
        self.diag_addr = banner
            .diag_addr
            .ok_or_else(|| anyhow!("the restarted daemon printed no metrics address"))?;
        Ok(())
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|a| a.pid())
    }

    pub fn stop(&mut self) {
        for a in [self.agent.take(), self.agent2.take()]
            .into_iter()
            .flatten()
        {
            let mut a = a;
            a.terminate(Duration::from_secs(3));
        }
        self.daemon.terminate(Duration::from_secs(3));
    }
}

fn start(jaunt: &Path, config: &Path, home: &Path) -> anyhow::Result<(Proc, cluster::Banner)> {
    cluster::start_daemon_with(
        jaunt,
        &[
            "start".to_string(),
            "--config".to_string(),
            config.display().to_string(),
        ],
        home,
    )
}

/// A tiny HTTP/1.1 app: every request gets `200 ok` and the connection closes.
fn start_web_app() -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    std::thread::Builder::new()
        .name("soak-web-app".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let _ = std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        let _ = serve_http(conn);
                    });
            }
        })?;
    Ok(addr)
}

fn serve_http(conn: TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut conn = conn;
    conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")?;
    conn.flush()?;
    // Wait for the client's close so the proxy sees an orderly end.
    let mut b = [0u8; 512];
    while reader.get_mut().read(&mut b)? > 0 {}
    Ok(())
}

/// A real sshd behind a listener on 127.0.0.1:0 (`sshd -i` per connection), trusting the
/// cluster's user CA, with a host certificate from its host CA. Returns its address.
fn start_sshd(c: &SoakCluster) -> anyhow::Result<String> {
    let dir = c.dir.path().join("sshd");
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all("/run/sshd").context("creating /run/sshd (sshd's privsep dir)")?;
    let d = dir.display().to_string();
    c.admin(&["ca", "sign-host", "--host", NODE, "--out", &d], None)?;
    std::fs::write(
        dir.join("user_ca.pub"),
        c.admin(&["ca", "export", "--type", "user-ssh"], None)?,
    )?;
    std::fs::write(
        dir.join("sshd_config"),
        format!(
            "HostKey {d}/{NODE}\nHostCertificate {d}/{NODE}-cert.pub\nTrustedUserCAKeys {d}/user_ca.pub\n\
             AuthorizedKeysFile none\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nPidFile none\nLogLevel ERROR\n"
        ),
    )?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let cfg = dir.join("sshd_config");
    std::thread::Builder::new()
        .name("soak-sshd".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                let fd: std::os::fd::OwnedFd = conn.into();
                let Ok(fd2) = fd.try_clone() else { continue };
                if let Ok(mut child) = Command::new(SSHD)
                    .arg("-i")
                    .arg("-f")
                    .arg(&cfg)
                    .stdin(Stdio::from(fd))
                    .stdout(Stdio::from(fd2))
                    .stderr(Stdio::null())
                    .spawn()
                {
                    // Reap it in the background.
                    std::thread::spawn(move || {
                        let _ = child.wait();
                    });
                }
            }
        })?;
    Ok(addr)
}

/// A PostgreSQL 15 server in its own temp dir (owned by `postgres` when we are root), TLS with
/// a db-CA certificate for localhost, client certificates required on TCP. Stopped on drop.
pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
    as_postgres: bool,
}

impl Postgres {
    fn command(&self, program: &str) -> Command {
        if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--", program]);
            cmd
        } else {
            Command::new(program)
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        Ok(self.command(program).args(args).output()?)
    }

    fn chown(&self) -> anyhow::Result<()> {
        if self.as_postgres {
            let o = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(self.dir.path())
                .output()?;
            if !o.status.success() {
                bail!("chown: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
        Ok(())
    }

    fn start(c: &SoakCluster) -> anyhow::Result<Postgres> {
        let uid = Command::new("id").arg("-u").output()?;
        let mut pg = Postgres {
            dir: tempfile::Builder::new().prefix("jaunt-soak-pg").tempdir()?,
            port: 0,
            as_postgres: String::from_utf8_lossy(&uid.stdout).trim() == "0",
        };
        register_temp(pg.dir.path());
        let certs = pg.dir.path().join("certs");
        let certs_s = certs.display().to_string();
        c.admin(
            &["ca", "sign-db", "--host", "localhost", "--out", &certs_s],
            None,
        )?;
        std::fs::write(
            certs.join("db-ca.crt"),
            c.admin(&["ca", "export", "--type", "db"], None)?,
        )?;
        pg.chown()?;
        let data = pg.dir.path().join("data");
        let data_s = data.display().to_string();
        let o = pg.run(
            &format!("{PG_BIN}/initdb"),
            &[
                "-D",
                &data_s,
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=reject",
                "--no-sync",
            ],
        )?;
        if !o.status.success() {
            bail!("initdb: {}", String::from_utf8_lossy(&o.stderr));
        }
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf"))?;
        conf.push_str(&format!(
            "\n# jaunt soak\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{dir}'\n\
             ssl = on\nssl_cert_file = '{certs_s}/localhost.crt'\nssl_key_file = '{certs_s}/localhost.key'\n\
             ssl_ca_file = '{certs_s}/db-ca.crt'\nfsync = off\nmax_connections = 50\n",
            dir = pg.dir.path().display(),
        ));
        std::fs::write(data.join("postgresql.conf"), conf)?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 cert\n",
        )?;
        pg.chown()?;
        let log = pg.dir.path().join("postgres.log").display().to_string();
        for attempt in 0..2 {
            let port = free_port()?;
            let o = pg.run(
                &format!("{PG_BIN}/pg_ctl"),
                &[
                    "-D",
                    &data_s,
                    "-l",
                    &log,
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    &format!("-p {port}"),
                    "start",
                ],
            )?;
            if o.status.success() {
                pg.port = port;
                return Ok(pg);
            }
            if attempt == 1 {
                bail!(
                    "pg_ctl start failed: {}\n{}",
                    String::from_utf8_lossy(&o.stderr),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
        bail!("pg_ctl start failed")
    }

    pub fn superuser_sql(&self, sql: &str) -> anyhow::Result<String> {
        let port = self.port.to_string();
        let sock = self.dir.path().display().to_string();
        let o = self.run(
            &format!("{PG_BIN}/psql"),
            &[
                "-h",
                &sock,
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-tAc",
                sql,
            ],
        )?;
        if !o.status.success() {
            bail!("psql {sql:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout).to_string())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.port == 0 {
            return;
        }
        let data = self.dir.path().join("data").display().to_string();
        let _ = self.run(
            &format!("{PG_BIN}/pg_ctl"),
            &["-D", &data, "stop", "-m", "immediate"],
        );
    }
}

/// Polls `f` until it succeeds or `within` passes; the last error otherwise.
pub fn wait_until<T>(
    within: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{what} within {within:?}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
