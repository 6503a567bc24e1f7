//! End to end with a real PostgreSQL 15 server and the real `psql`: a dev cluster, a separate
//! `jaunt agent` process serving `--db pg1=postgres://127.0.0.1:PORT`, a throwaway server
//! (`initdb` into a temp dir, TLS with a certificate from `jaunt ca sign-db`, `ssl_ca_file` = the
//! db CA, `hostssl all all 127.0.0.1/32 cert`), and `jaunt db connect` / `jaunt proxy db` on the
//! user's side.
//!
//! PostgreSQL refuses to run as root: when the test runs as root (CI), every server-side command
//! runs as the `postgres` user through `runuser`, and the temp dir is handed to that user;
//! otherwise they run as the current user. The server is stopped (`pg_ctl stop -m immediate`)
//! by a drop guard, so a failing assertion does not leave it running.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::*;

const PASSWORD: &str = "correct horse battery";
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn pg_bin(name: &str) -> String {
    let path = Path::new(PG_BIN).join(name);
    if !path.exists() {
        panic!(
            "{} is missing: install PostgreSQL 15 (apt-get install postgresql; .ci/run does this)",
            path.display()
        );
    }
    path.display().to_string()
}

fn is_root() -> bool {
    tool("id", &["-u"]).trim() == "0"
}

/// A PostgreSQL server in a temp dir, on a port picked at start. Stopped on drop.
struct Postgres {
    dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
}

impl Postgres {
    /// A command run as the server's owner (`runuser -u postgres` when root).
    fn command(&self, program: &str) -> Command {
        if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--", program]);
            cmd
        } else {
            Command::new(program)
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn give_to_postgres(&self) {
        if self.as_postgres {
            tool(
                "chown",
                &["-R", "postgres:postgres", self.dir.path().to_str().unwrap()],
            );
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program).args(args).output().unwrap()
    }

    /// initdb, TLS with a db-CA certificate for localhost, client certificates required on TCP.
    fn init(c: &Cluster) -> Postgres {
        let pg = Postgres {
            dir: tempfile::tempdir().unwrap(),
            port: 0,
            as_postgres: is_root(),
        };
        let certs = pg.certs();
        ok(c.admin(
            &[
                "ca",
                "sign-db",
                "--host",
                "localhost",
                "--out",
                certs.to_str().unwrap(),
            ],
            None,
        ));
        std::fs::write(
            certs.join("db-ca.crt"),
            ok(c.admin(&["ca", "export", "--type", "db"], None)),
        )
        .unwrap();
        pg.give_to_postgres();
        let data = pg.data();
        let o = pg.run(
            &pg_bin("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=reject",
                "--no-sync",
            ],
        );
        assert!(o.status.success(), "initdb: {}", stderr(&o));
        let conf = format!(
            "\n# jaunt test\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{dir}'\n\
             ssl = on\nssl_cert_file = '{certs}/localhost.crt'\nssl_key_file = '{certs}/localhost.key'\n\
             ssl_ca_file = '{certs}/db-ca.crt'\nfsync = off\n",
            dir = pg.dir.path().display(),
            certs = certs.display(),
        );
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        text.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), text).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 cert\n",
        )
        .unwrap();
        pg.give_to_postgres();
        pg
    }

    /// Starts the server on a free port. The port is found by binding 127.0.0.1:0 and closing
    /// the listener right before postgres binds it: another process could take it in between,
    /// so a failed start is retried once on a new port.
    fn start(&mut self) {
        for attempt in 0..2 {
            let port = {
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            };
            let options = format!("-p {port}");
            let o = self.run(
                &pg_bin("pg_ctl"),
                &[
                    "-D",
                    self.data().to_str().unwrap(),
                    "-l",
                    self.log().to_str().unwrap(),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    &options,
                    "start",
                ],
            );
            if o.status.success() {
                self.port = port;
                return;
            }
            let log = std::fs::read_to_string(self.log()).unwrap_or_default();
            assert!(
                attempt == 0,
                "pg_ctl start failed twice: {}\n{log}",
                stderr(&o)
            );
            eprintln!("pg_ctl start on port {port} failed, retrying on another: {log}");
        }
    }

    /// Runs SQL as the superuser over the unix socket.
    fn superuser_sql(&self, sql: &str) -> String {
        let port = self.port.to_string();
        let o = self.run(
            &pg_bin("psql"),
            &[
                "-h",
                self.dir.path().to_str().unwrap(),
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
        );
        assert!(o.status.success(), "psql {sql:?}: {}", stderr(&o));
        stdout(&o)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.port == 0 {
            return;
        }
        let _ = self.run(
            &pg_bin("pg_ctl"),
            &[
                "-D",
                self.data().to_str().unwrap(),
                "stop",
                "-m",
                "immediate",
            ],
        );
    }
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `jaunt agent` joined with a fresh `db` token, serving `dbs`; its log (info for the agent
/// library, where queries are recorded) goes to `log`.
fn start_agent(c: &Cluster, name: &str, dbs: &[String], log: &Path) -> Killed {
    start_agent_labelled(c, name, "", dbs, log)
}

fn wait_for_db(c: &Cluster, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ls = ok(c.run(&["ls", "dbs"], None));
        if ls
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name))
        {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never listed: {ls}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn psql_through_the_cluster_to_a_real_postgres() {
    let psql = Path::new("/usr/bin/psql");
    if !psql.exists() {
        panic!("psql is missing: apt-get install postgresql-client (.ci/run does this)");
    }
    let c = Cluster::dev();
    ok(c.admin(
        &[
            "users",
            "add",
            "alice",
            "--roles",
            "access",
            "--db-users",
            "alice",
            "--db-names",
            "postgres",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    ok(c.login("alice", PASSWORD, &[]));

    let mut pg = Postgres::init(&c);
    pg.start();
    pg.superuser_sql("CREATE ROLE alice LOGIN");
    pg.superuser_sql("CREATE ROLE bob LOGIN");

    let agent_log = c.dir.path().join("agent.log");
    let _agent = start_agent(
        &c,
        "dbhost",
        &[format!("pg1=postgres://127.0.0.1:{}", pg.port)],
        &agent_log,
    );
    wait_for_db(&c, "pg1");

    // psql through jaunt db connect: the agent logs in as alice with a db-CA certificate.
    let out = ok(c.run(
        &[
            "db",
            "connect",
            "pg1",
            "--db-user",
            "alice",
            "--db-name",
            "postgres",
            "--",
            "-tAc",
            "select 1",
        ],
        None,
    ));
    assert_eq!(out.trim(), "1");
    let out = ok(c.run(
        &[
            "db",
            "connect",
            "pg1",
            "--db-user",
            "alice",
            "--db-name",
            "postgres",
            "--",
            "-tAc",
            "select current_user || '@' || current_database() || ' ssl=' || ssl from pg_stat_ssl where pid = pg_backend_pid()",
        ],
        None,
    ));
    assert_eq!(out.trim(), "alice@postgres ssl=true");

    // A database user the certificate does not carry: refused (by the engine's authorization,
    // and behind it by the agent, which checks the same grants), and psql prints why.
    let err = fails(c.run(
        &[
            "db",
            "connect",
            "pg1",
            "--db-user",
            "bob",
            "--db-name",
            "postgres",
            "--",
            "-tAc",
            "select 1",
        ],
        None,
    ));
    assert!(
        err.contains("FATAL") && err.contains("access denied") && err.contains("bob"),
        "{err}"
    );
    // A database name it does not carry.
    let err = fails(c.run(
        &[
            "db",
            "connect",
            "pg1",
            "--db-user",
            "alice",
            "--db-name",
            "template1",
            "--",
            "-tAc",
            "select 1",
        ],
        None,
    ));
    assert!(
        err.contains("access denied") && err.contains("template1"),
        "{err}"
    );
    // A database nobody serves: the engine's refusal, spoken in PostgreSQL by the listener.
    let err = fails(c.run(
        &[
            "db",
            "connect",
            "pg9",
            "--db-user",
            "alice",
            "--",
            "-tAc",
            "select 1",
        ],
        None,
    ));
    assert!(err.contains("FATAL") && err.contains("pg9"), "{err}");

    // jaunt proxy db: any client on the local port; the client's user must be the dialed one.
    let mut proxy = Killed(
        Command::new(jaunt_bin())
            .args([
                "proxy",
                "db",
                "pg1",
                "--port",
                "0",
                "--db-user",
                "alice",
                "--db-name",
                "postgres",
            ])
            .env("JAUNT_HOME", &c.home)
            .env("HOME", &c.home)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(proxy.0.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("Proxying pg1 on 127.0.0.1:"), "{line}");
    let port = line.trim().rsplit(':').next().unwrap().to_string();
    let conninfo = |user: &str| format!("host=127.0.0.1 port={port} user={user} dbname=postgres");
    // Default sslmode (prefer): psql asks for TLS, the listener's agent answers N.
    let out = tool(
        "psql",
        &[&conninfo("alice"), "-tAc", "select 40 + 2; select 'two'"],
    );
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["42", "two"]);
    let o = Command::new("psql")
        .args([&conninfo("bob"), "-tAc", "select 1"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(r#"db user "bob" is not the one you dialed (alice)"#),
        "{}",
        stderr(&o)
    );

    // Ctrl-C in psql: its CancelRequest arrives on a new connection to the listener, and the
    // agent forwards it to the server, which cancels the running query.
    let mut sleeper = Killed(
        Command::new("psql")
            .args([&conninfo("alice"), "-tAc", "select pg_sleep(60)"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while pg
        .superuser_sql(
            "select count(*) from pg_stat_activity \
             where usename = 'alice' and query = 'select pg_sleep(60)'",
        )
        .trim()
        != "1"
    {
        assert!(Instant::now() < deadline, "the query never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    let started = Instant::now();
    tool("kill", &["-INT", &sleeper.0.id().to_string()]);
    let status = loop {
        if let Some(status) = sleeper.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the query was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(sleeper.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("canceling statement due to user request"),
        "{err}"
    );
    drop(proxy);

    // The agent recorded the queries, and control the certificates it issued.
    let log = strip_ansi(&std::fs::read_to_string(&agent_log).unwrap());
    let recorded: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("jaunt db query"))
        .collect();
    assert!(
        recorded
            .iter()
            .any(|l| l.contains("user=alice") && l.contains(r#"query="select 1""#)),
        "{log}"
    );
    assert!(
        recorded
            .iter()
            .any(|l| l.contains(r#"query="select 40 + 2; select 'two'""#)),
        "{log}"
    );
    assert!(!recorded.iter().any(|l| l.contains("db_user=bob")), "{log}");
    let audit = ok(c.admin(
        &[
            "audit",
            "search",
            "--type",
            "cert.issued",
            "--format",
            "json",
        ],
        None,
    ));
    assert!(
        audit.contains("\"db-client\"") && audit.contains("\"db-server\""),
        "{audit}"
    );

    // The agent's recorder sent the queries to control's audit log (asynchronously: poll).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let queries = c.audit_events(Some("db.query"));
        let found = queries.iter().any(|e| {
            e["code"] == "JA2200I"
                && e["user"] == "alice"
                && e["query"] == "select 1"
                && e["service"] == "pg1"
                && e["db_user"] == "alice"
                && e["database"] == "postgres"
                && e["host_name"] == "dbhost"
                && e["kind"] == "query"
        });
        if found {
            assert!(
                !queries.iter().any(|e| e["db_user"] == "bob"),
                "{queries:?}"
            );
            // Each query names the engine's session it ran in.
            let starts = c.audit_events(Some("session.start"));
            for q in &queries {
                assert!(
                    starts
                        .iter()
                        .any(|s| s["session_id"] == q["session_id"] && s["target"] == "pg1"),
                    "no session.start for {q}"
                );
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no db.query event for alice's select 1: {queries:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    c.assert_sessions_paired();
}

#[test]
fn db_certificates_are_for_db_agents_only() {
    let c = Cluster::dev();
    // A user (even the admin) gets no database client certificate; the endpoint is for hosts.
    ok(c.admin(
        &[
            "users",
            "add",
            "carol",
            "--roles",
            "access,editor",
            "--db-users",
            "carol",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    ok(c.login("carol", PASSWORD, &[]));
    let profile = jaunt_control::profile::Profile {
        dir: c.home.clone(),
    };
    let info = profile.load().unwrap().unwrap();
    let client = jaunt_control::client::Client::new(
        &c.public_addr,
        jaunt_control::client::Trust::Roots(profile.host_ca().unwrap()),
        Some(profile.tls_identity(&info.user).unwrap()),
    )
    .unwrap();
    let key = rcgen_key_pem();
    let refused = client
        .post_json::<_, serde_json::Value>(
            "/v1/db/cert",
            &jaunt_config::api::DbCertRequest {
                db_user: "postgres".into(),
                tls_public_key: key,
                ttl_secs: None,
                requested_by: None,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(refused.contains("db token"), "{refused}");
    // sign-db wants an admin verb, and names it cannot certify are refused.
    let err = fails(c.admin(
        &[
            "ca",
            "sign-db",
            "--host",
            "bad name",
            "--out",
            "/tmp/unused",
        ],
        None,
    ));
    assert!(err.contains("not a host name"), "{err}");
}

/// `text` without ANSI color sequences (`ESC [ ... m`): the log is colored even into a file.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A fresh P-256 public key (PEM), made the way the CLI makes one.
fn rcgen_key_pem() -> String {
    jaunt_control::ca::LocalKeys::generate()
        .unwrap()
        .tls_public_pem
}

/// Logs `user` in from its own `$JAUNT_HOME` (under the cluster's temp dir) and returns that
/// home, so several users can hold certificates at once.
fn login_as(c: &Cluster, user: &str) -> PathBuf {
    let home = c.dir.path().join(format!("home-{user}"));
    std::fs::create_dir_all(&home).unwrap();
    ok(run_jaunt(
        &home,
        &[
            "login",
            "--proxy",
            &c.public_addr,
            "--user",
            user,
            "--password-stdin",
            "--ca-pin",
            &c.pin,
        ],
        Some(&format!("{PASSWORD}\n")),
    ));
    home
}

/// `jaunt db connect pg1 --db-user USER --db-name NAME -- -tAc 'select current_user'` as the
/// user whose profile is in `home`.
fn psql_as(home: &Path, db_user: &str, db_name: &str) -> Output {
    run_jaunt(
        home,
        &[
            "db",
            "connect",
            "pg1",
            "--db-user",
            db_user,
            "--db-name",
            db_name,
            "--",
            "-tAc",
            "select current_user || '@' || current_database()",
        ],
        None,
    )
}

/// The database rows of ARCHITECTURE.md's role semantics table, each with real psql against a
/// real PostgreSQL: `*` in `db_users`/`db_names` (issue 15 pt 3: it granted nothing at
/// issuance), `{{external.x}}` and `{{internal.db_names}}` traits, a `^regex$` label selector
/// (matching and not), and deny winning over an allowed `*`.
#[test]
fn role_semantics_rows_for_databases_with_real_psql() {
    let c = Cluster::dev();
    let roles = c.dir.path().join("roles.yaml");
    std::fs::write(
        &roles,
        "kind: role\nversion: v1\nmetadata: { name: db-any }\nspec:\n  allow:\n    db_labels: { env: '^prod-[0-9]+$' }\n    db_users: ['*']\n    db_names: ['*']\n  deny:\n    db_users: [postgres]\n\
         ---\nkind: role\nversion: v1\nmetadata: { name: db-trait }\nspec:\n  allow:\n    db_labels: { '*': '*' }\n    db_users: ['{{external.pg_user}}']\n    db_names: ['{{internal.db_names}}']\n\
         ---\nkind: role\nversion: v1\nmetadata: { name: db-staging }\nspec:\n  allow:\n    db_labels: { env: '^staging-[0-9]+$' }\n    db_users: ['*']\n    db_names: ['*']\n\
         ---\nkind: user\nversion: v1\nmetadata: { name: carol }\nspec:\n  roles: [db-any]\n\
         ---\nkind: user\nversion: v1\nmetadata: { name: dave }\nspec:\n  roles: [db-trait]\n  traits:\n    pg_user: [bob]\n    db_names: [postgres]\n\
         ---\nkind: user\nversion: v1\nmetadata: { name: erin }\nspec:\n  roles: [db-staging]\n",
    )
    .unwrap();
    ok(c.admin(&["create", "-f", roles.to_str().unwrap()], None));
    for user in ["carol", "dave", "erin"] {
        ok(c.admin(
            &["users", "reset", user, "--password-stdin"],
            Some(PASSWORD),
        ));
    }

    let mut pg = Postgres::init(&c);
    pg.start();
    for role in ["alice", "bob"] {
        pg.superuser_sql(&format!("CREATE ROLE {role} LOGIN"));
    }
    let agent_log = c.dir.path().join("agent.log");
    let _agent = start_agent_labelled(
        &c,
        "dbhost",
        "env=prod-7",
        &[format!("pg1=postgres://127.0.0.1:{}", pg.port)],
        &agent_log,
    );
    ok(c.login("carol", PASSWORD, &[]));
    wait_for_db(&c, "pg1");

    // `*` in db_users and db_names: the certificate carries `*`, and any user and database
    // the server has is reachable (the env label matches the role's regex).
    let carol = login_as(&c, "carol");
    let status = ok(run_jaunt(&carol, &["status"], None));
    assert!(
        status.contains("db users:  *") && status.contains("db names:  *"),
        "{status}"
    );
    assert_eq!(
        ok(psql_as(&carol, "bob", "template1")).trim(),
        "bob@template1"
    );
    assert_eq!(
        ok(psql_as(&carol, "alice", "postgres")).trim(),
        "alice@postgres"
    );
    // Deny wins over the allowed `*`.
    let err = fails(psql_as(&carol, "postgres", "postgres"));
    assert!(
        err.contains("access denied") && err.contains("denies db_users [postgres]"),
        "{err}"
    );

    // Traits: `{{external.pg_user}}` is the user's pg_user trait, `{{internal.db_names}}` the
    // db_names trait; nothing else.
    let dave = login_as(&c, "dave");
    assert_eq!(ok(psql_as(&dave, "bob", "postgres")).trim(), "bob@postgres");
    let err = fails(psql_as(&dave, "alice", "postgres"));
    assert!(
        err.contains("access denied") && err.contains("alice"),
        "{err}"
    );
    let err = fails(psql_as(&dave, "bob", "template1"));
    assert!(
        err.contains("access denied") && err.contains("template1"),
        "{err}"
    );

    // A regex label selector that does not match the database's labels: no access, even with
    // `*` principals.
    let erin = login_as(&c, "erin");
    let err = fails(psql_as(&erin, "bob", "postgres"));
    assert!(err.contains("access denied"), "{err}");
}

/// `jaunt agent` with `--labels`, otherwise as [`start_agent`].
fn start_agent_labelled(
    c: &Cluster,
    name: &str,
    labels: &str,
    dbs: &[String],
    log: &Path,
) -> Killed {
    let out = ok(c.admin(&["tokens", "add", "--type", "db"], None));
    let token = out.lines().next().unwrap().trim().to_string();
    let data = c.dir.path().join(format!("agent-{name}"));
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
        "--token".to_string(),
        token,
        "--labels".to_string(),
        labels.to_string(),
    ];
    for db in dbs {
        args.push("--db".into());
        args.push(db.clone());
    }
    Killed(
        Command::new(jaunt_bin())
            .args(&args)
            .env("JAUNT_HOME", c.dir.path().join("agent-home"))
            .env("JAUNT_LOG", "warn,jaunt_agent=info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// `jaunt ca rotate --type db --phase PHASE`, retried while the agent has not confirmed the
/// previous phase (the refusal names it; it polls every 5 s), bounded.
fn rotate_db(c: &Cluster, phase: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = c.admin(&["ca", "rotate", "--type", "db", "--phase", phase], None);
        if o.status.success() {
            return;
        }
        let err = stderr(&o);
        assert!(
            err.contains("have not confirmed") && Instant::now() < deadline,
            "ca rotate --type db --phase {phase}: {err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// psql straight to the server (not through the cluster) with the client certificate in
/// `dir` (`alice.crt`, `alice.key`), TLS required, the server's certificate not checked.
fn psql_direct_with_cert(pg: &Postgres, dir: &Path) -> Output {
    let conninfo = format!(
        "host=127.0.0.1 port={} user=alice dbname=postgres sslmode=require sslcert={} sslkey={}",
        pg.port,
        dir.join("alice.crt").display(),
        dir.join("alice.key").display(),
    );
    Command::new("psql")
        .args([&conninfo, "-tAc", "select 'direct ' || current_user"])
        // No ~/.postgresql/root.crt that would make libpq verify the server.
        .env("HOME", dir)
        .output()
        .unwrap()
}

/// Issue 13: the db CA rotates through every phase while PostgreSQL's `ssl_ca_file` is
/// rewritten from `jaunt ca export --type db` and its server certificate re-signed with `jaunt
/// ca sign-db` in `update_servers`: `jaunt db connect` works in each phase, a client
/// certificate of the old CA works until `standby` and is refused by the server after it.
#[test]
fn db_ca_rotation_keeps_psql_working_and_refuses_the_old_ca_after_standby() {
    let c = Cluster::dev();
    ok(c.admin(
        &[
            "users",
            "add",
            "alice",
            "--roles",
            "access",
            "--db-users",
            "alice",
            "--db-names",
            "postgres",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    ok(c.login("alice", PASSWORD, &[]));
    let mut pg = Postgres::init(&c);
    pg.start();
    pg.superuser_sql("CREATE ROLE alice LOGIN");
    let agent_log = c.dir.path().join("agent.log");
    let _agent = start_agent(
        &c,
        "dbhost",
        &[format!("pg1=postgres://127.0.0.1:{}", pg.port)],
        &agent_log,
    );
    wait_for_db(&c, "pg1");
    let connect = |phase: &str| {
        let o = c.run(
            &[
                "db",
                "connect",
                "pg1",
                "--db-user",
                "alice",
                "--db-name",
                "postgres",
                "--",
                "-tAc",
                "select 'ok ' || current_user",
            ],
            None,
        );
        assert!(
            o.status.success(),
            "jaunt db connect in phase {phase}: {}\nagent log:\n{}",
            stderr(&o),
            strip_ansi(&std::fs::read_to_string(&agent_log).unwrap_or_default())
        );
        assert_eq!(stdout(&o).trim(), "ok alice", "phase {phase}");
    };
    connect("standby (before the rotation)");

    // A client certificate of the old db CA, issued to the agent's host identity as the agent
    // gets its own, kept for after the rotation.
    let old = c.dir.path().join("old-db-cert");
    std::fs::create_dir_all(&old).unwrap();
    {
        let profile = jaunt_control::agent_host::host_profile(&c.dir.path().join("agent-dbhost"));
        let info = profile.load().unwrap().unwrap();
        let client = jaunt_control::client::Client::new(
            &c.public_addr,
            jaunt_control::client::Trust::Roots(profile.host_ca().unwrap()),
            Some(profile.tls_identity(&info.user).unwrap()),
        )
        .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let resp: jaunt_config::api::DbCertResponse = client
            .post_json(
                "/v1/db/cert",
                &jaunt_config::api::DbCertRequest {
                    db_user: "alice".into(),
                    tls_public_key: key.public_key_pem(),
                    ttl_secs: None,
                    requested_by: None,
                },
            )
            .unwrap();
        std::fs::write(old.join("alice.crt"), resp.tls_cert).unwrap();
        let key_path = old.join("alice.key");
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let direct = ok(psql_direct_with_cert(&pg, &old));
    assert_eq!(direct.trim(), "direct alice");

    // What an operator does at each phase: ssl_ca_file from `jaunt ca export`, then a reload.
    let certs = pg.certs();
    let export_ca_file = || {
        let text = ok(c.admin(&["ca", "export", "--type", "db"], None));
        std::fs::write(certs.join("db-ca.crt"), &text).unwrap();
        pg.give_to_postgres();
        pg.superuser_sql("select pg_reload_conf()");
        text.matches("BEGIN CERTIFICATE").count()
    };

    rotate_db(&c, "init");
    assert_eq!(export_ca_file(), 2, "init: the server trusts both db CAs");
    connect("init");

    // New client certificates come from the new CA; the server trusts both.
    rotate_db(&c, "update_clients");
    connect("update_clients");

    // The server's certificate re-signed by the new CA (it signs now).
    rotate_db(&c, "update_servers");
    ok(c.admin(
        &[
            "ca",
            "sign-db",
            "--host",
            "localhost",
            "--out",
            certs.to_str().unwrap(),
        ],
        None,
    ));
    pg.give_to_postgres();
    pg.superuser_sql("select pg_reload_conf()");
    connect("update_servers");
    // The old CA is still trusted before standby.
    assert_eq!(ok(psql_direct_with_cert(&pg, &old)).trim(), "direct alice");

    rotate_db(&c, "standby");
    assert_eq!(export_ca_file(), 1, "standby: only the new db CA");
    connect("standby");
    // The reload takes effect for connections after it is processed: wait for the refusal,
    // then check why.
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let o = psql_direct_with_cert(&pg, &old);
        if !o.status.success() {
            break stderr(&o);
        }
        assert!(
            Instant::now() < deadline,
            "a client certificate of the old db CA is still accepted after standby"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        refused.contains("unknown ca") || refused.contains("certificate verify failed"),
        "{refused}"
    );
    // And through the cluster it still works.
    connect("standby (after the refusal)");
}
