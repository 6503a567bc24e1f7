//! Several control hosts on one PostgreSQL (issue 12): the store's PostgreSQL backend against a
//! real PostgreSQL 15 that the test starts (`initdb` into a temp dir, TLS with a test CA,
//! `hostssl ... scram-sha-256`, a `jaunt` role with a password), and two `jaunt start --config`
//! processes with `storage: {type: postgres}` sharing it.
//!
//! As in `postgres.rs`, server-side commands run as the `postgres` user (`runuser`) when the
//! test runs as root, and a drop guard stops the server (`pg_ctl stop -m immediate`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use jaunt_control::store::{AuditQuery, Store, StoredLock, StoredToken, StoredUser, TokenCheck};
use support::*;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The database password: spaces and URI-special characters on purpose.
const DB_PASSWORD: &str = "s3cret pass@word/with:chars";
const PASSWORD: &str = "correct horse battery";

fn pg_bin(name: &str) -> String {
    let path = Path::new(PG_BIN).join(name);
    assert!(
        path.exists(),
        "{} is missing: install PostgreSQL 15 (apt-get install postgresql; .ci/run does this)",
        path.display()
    );
    path.display().to_string()
}

fn is_root() -> bool {
    tool("id", &["-u"]).trim() == "0"
}

/// Percent-encodes everything but unreserved characters (for a URI's password).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A PostgreSQL server with TLS and password (SCRAM) logins, on a free port. Stopped on drop.
struct Pg {
    dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
}

impl Pg {
    fn command(&self, program: &str) -> Command {
        if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--", program]);
            cmd
        } else {
            Command::new(program)
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program).args(args).output().unwrap()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The CA that signed the server's certificate (for `sslrootcert`).
    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    fn start() -> Pg {
        let mut pg = Pg {
            dir: tempfile::tempdir().unwrap(),
            port: 0,
            as_postgres: is_root(),
        };
        let d = pg.dir.path().to_path_buf();
        let p = |name: &str| d.join(name).display().to_string();
        tool(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &p("ca.key"),
                "-out",
                &p("ca.crt"),
                "-days",
                "2",
                "-subj",
                "/CN=jaunt test db CA",
            ],
        );
        tool(
            "openssl",
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &p("server.key"),
                "-out",
                &p("server.csr"),
                "-subj",
                "/CN=localhost",
            ],
        );
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        tool(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &p("server.csr"),
                "-CA",
                &p("ca.crt"),
                "-CAkey",
                &p("ca.key"),
                "-CAcreateserial",
                "-out",
                &p("server.crt"),
                "-days",
                "2",
                "-extfile",
                &p("ext.cnf"),
            ],
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.join("server.key"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        pg.give_to_postgres();
        let o = pg.run(
            &pg_bin("initdb"),
            &[
                "-D",
                pg.data().to_str().unwrap(),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=reject",
                "--no-sync",
            ],
        );
        assert!(o.status.success(), "initdb: {}", stderr(&o));
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{dir}'\n\
             ssl = on\nssl_cert_file = '{dir}/server.crt'\nssl_key_file = '{dir}/server.key'\n\
             fsync = off\npassword_encryption = 'scram-sha-256'\nmax_connections = 60\n",
            dir = d.display(),
        );
        let conf_path = pg.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap();
        text.push_str(&conf);
        std::fs::write(&conf_path, text).unwrap();
        std::fs::write(
            pg.data().join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
        pg.give_to_postgres();
        for attempt in 0..2 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let log = d.join("postgres.log");
            let o = pg.run(
                &pg_bin("pg_ctl"),
                &[
                    "-D",
                    pg.data().to_str().unwrap(),
                    "-l",
                    log.to_str().unwrap(),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    &format!("-p {port}"),
                    "start",
                ],
            );
            if o.status.success() {
                pg.port = port;
                break;
            }
            assert!(
                attempt == 0,
                "pg_ctl start failed twice: {}\n{}",
                stderr(&o),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        pg.sql(&format!(
            "CREATE ROLE jaunt LOGIN PASSWORD '{}'",
            DB_PASSWORD.replace('\'', "''")
        ));
        pg.sql("CREATE DATABASE jaunt OWNER jaunt");
        pg
    }

    fn give_to_postgres(&self) {
        if self.as_postgres {
            tool(
                "chown",
                &["-R", "postgres:postgres", self.dir.path().to_str().unwrap()],
            );
        }
    }

    fn sql(&self, sql: &str) -> String {
        self.sql_in("postgres", sql)
    }

    fn sql_in(&self, db: &str, sql: &str) -> String {
        let o = self.run(
            &pg_bin("psql"),
            &[
                "-h",
                self.dir.path().to_str().unwrap(),
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-tAc",
                sql,
            ],
        );
        assert!(o.status.success(), "psql {sql:?}: {}", stderr(&o));
        stdout(&o)
    }

    /// The connection string: TLS verified against the test CA, host name checked.
    fn conn_string(&self, password: &str) -> String {
        format!(
            "postgres://jaunt:{}@localhost:{}/jaunt?sslmode=verify-full&sslrootcert={}",
            encode(password),
            self.port,
            self.ca().display()
        )
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if self.port != 0 {
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
}

fn open(conn: &str) -> Result<Store, String> {
    let info = jaunt_config::pgconn::parse(conn).unwrap();
    Store::from_config(
        &jaunt_config::file::StorageConfig::Postgres { conn_string: info },
        Path::new("/nonexistent"),
    )
    .map_err(|e| e.to_string())
}

fn user(name: &str) -> StoredUser {
    StoredUser {
        name: name.into(),
        spec: "{}".into(),
        password_hash: "hash".into(),
        otp_secret: None,
        created: 1,
    }
}

#[test]
fn postgres_backend_is_shared_consistent_and_refuses_clearly() {
    let pg = Pg::start();
    let conn = pg.conn_string(DB_PASSWORD);

    // Two controls opening an empty database at once: migrations run once, both succeed.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| open(&conn));
        let b = s.spawn(|| open(&conn));
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    // Every migration, the CA rotation table (issue 13) the last.
    assert_eq!(a.schema_version().unwrap(), 3);
    assert_eq!(b.backend().kind(), "postgres");
    assert_eq!(a.integrity_check().unwrap(), "ok");
    assert_eq!(
        pg.sql_in("jaunt", "SELECT count(*) FROM jaunt_schema")
            .trim(),
        "1"
    );

    // A CA rotation phase written by one is read by the other; a stale writer loses.
    let rotation = jaunt_control::store::StoredRotation {
        name: "user".into(),
        phase: "init".into(),
        seq: 1,
        next: Some(jaunt_control::store::StoredCa {
            name: "user".into(),
            x509_key_pem: "k".into(),
            x509_cert_pem: "c".into(),
            ssh_key: "s".into(),
        }),
        grace: Some(1800),
        deadline: None,
        updated: 5,
    };
    assert!(a.put_ca_rotation(&rotation, 0, None).unwrap());
    assert_eq!(b.get_ca_rotation("user").unwrap().as_ref(), Some(&rotation));
    assert!(!b.put_ca_rotation(&rotation, 0, None).unwrap());

    // A change through one is seen by the other, and its change feed moves.
    b.poll_changes().unwrap();
    assert!(!b.poll_changes().unwrap());
    assert!(a.insert_user(&user("alice")).unwrap());
    assert!(!b.insert_user(&user("alice")).unwrap(), "name taken");
    assert_eq!(b.get_user("alice").unwrap().unwrap().password_hash, "hash");
    assert!(
        b.poll_changes().unwrap(),
        "b sees a's change in the revision"
    );
    assert!(b.set_user_credentials("alice", "h2", Some("otp")).unwrap());
    assert_eq!(
        a.get_user("alice").unwrap().unwrap().otp_secret.as_deref(),
        Some("otp")
    );
    assert_eq!(a.list_users().unwrap().len(), 1);

    // CAs: the first stored wins for both.
    let ca = |key: &str| jaunt_control::store::StoredCa {
        name: "user".into(),
        x509_key_pem: key.into(),
        x509_cert_pem: "c".into(),
        ssh_key: "s".into(),
    };
    assert_eq!(
        a.insert_ca_if_absent(&ca("k1"), 1).unwrap().x509_key_pem,
        "k1"
    );
    assert_eq!(
        b.insert_ca_if_absent(&ca("k2"), 2).unwrap().x509_key_pem,
        "k1"
    );
    assert_eq!(b.key_or_insert("jwt", "p1", 1).unwrap(), "p1");
    assert_eq!(a.key_or_insert("jwt", "p2", 1).unwrap(), "p1");

    // Hosts: last_seen refreshed for a batch through one, read by the other; an unknown id is
    // not created. Ids past 1,000 go in a second statement of the same transaction.
    for id in ["h1", "h2"] {
        a.upsert_host(&jaunt_control::store::StoredHost {
            id: id.into(),
            name: id.into(),
            types: vec!["node".into()],
            joined: 10,
            last_seen: 10,
        })
        .unwrap();
    }
    let mut many: Vec<String> = (0..1500).map(|i| format!("nobody{i}")).collect();
    many.push("h2".into());
    let ids: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(b.touch_hosts(&ids, 77).unwrap(), 1);
    assert_eq!(a.get_host("h2").unwrap().unwrap().last_seen, 77);
    assert_eq!(a.get_host("h1").unwrap().unwrap().last_seen, 10);
    assert!(a.get_host("nobody3").unwrap().is_none());
    assert_eq!(b.touch_hosts(&[], 78).unwrap(), 0);

    // A single-use token redeemed by both controls at once joins exactly once.
    for round in 0..5 {
        let hash = format!("tok{round}");
        assert!(a
            .insert_token(&StoredToken {
                hash: hash.clone(),
                types: vec!["node".into()],
                expires: 100,
                single_use: true,
                created: 1,
            })
            .unwrap());
        let (ra, rb) = std::thread::scope(|s| {
            let ra = s.spawn(|| a.redeem_token(&hash, 50).unwrap());
            let rb = s.spawn(|| b.redeem_token(&hash, 50).unwrap());
            (ra.join().unwrap(), rb.join().unwrap())
        });
        let valid = [&ra, &rb]
            .iter()
            .filter(|c| matches!(c, TokenCheck::Valid(_)))
            .count();
        assert_eq!(valid, 1, "round {round}: {ra:?} {rb:?}");
    }
    assert!(a
        .insert_token(&StoredToken {
            hash: "multi".into(),
            types: vec!["node".into(), "app".into()],
            expires: 100,
            single_use: false,
            created: 1,
        })
        .unwrap());
    assert!(
        matches!(b.redeem_token("multi", 50).unwrap(), TokenCheck::Valid(t) if t.types.len() == 2)
    );
    assert_eq!(b.redeem_token("multi", 100).unwrap(), TokenCheck::Expired);
    assert_eq!(b.prune_tokens(100).unwrap(), 1);

    // Locks.
    a.insert_lock(&StoredLock {
        id: "l1".into(),
        spec: "{}".into(),
        expires: None,
        created: 5,
    })
    .unwrap();
    a.insert_lock(&StoredLock {
        id: "l2".into(),
        spec: "{}".into(),
        expires: Some(10),
        created: 6,
    })
    .unwrap();
    assert_eq!(b.list_locks(5).unwrap().len(), 2);
    assert_eq!(
        b.list_locks(10).unwrap().len(),
        1,
        "expired locks are not in force"
    );
    assert!(b.delete_lock("l1").unwrap());
    assert!(!a.delete_lock("l1").unwrap());

    // Audit: appended on one, searched on the other; retention prunes in batches.
    let events: Vec<(u64, &str, &str, Option<&str>, &str)> = (0..2500u64)
        .map(|i| {
            (
                1000 + i,
                "JA1000I",
                "user.login",
                Some("alice"),
                "{\"k\":1}",
            )
        })
        .collect();
    let last = a.audit_append(&events).unwrap();
    b.audit_append(&[(5000, "JA2000I", "session.start", None, "{}")])
        .unwrap();
    assert!(last > 0);
    let all = b.audit_search(&AuditQuery::default()).unwrap();
    assert_eq!(all.len(), 2501);
    assert_eq!(all[0].time, 1000);
    let logins = a
        .audit_search(&AuditQuery {
            r#type: Some("user".into()),
            user: Some("alice".into()),
            since: Some(3000),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(logins.len(), 500);
    let page = a
        .audit_page(
            &AuditQuery {
                limit: 10,
                ..Default::default()
            },
            None,
        )
        .unwrap();
    assert_eq!(page.len(), 10);
    assert_eq!(page[0].r#type, "session.start", "newest first");
    let mut pruned = 0;
    loop {
        let n = b.audit_prune(2000, 400).unwrap();
        pruned += n;
        if n < 400 {
            break;
        }
    }
    assert_eq!(pruned, 1000);
    assert_eq!(a.audit_search(&AuditQuery::default()).unwrap().len(), 1501);

    // Leases: one holder at a time, renewed by it, taken over once expired.
    assert!(a.try_lease("job", "A", 100, 10).unwrap());
    assert!(!b.try_lease("job", "B", 105, 10).unwrap());
    assert!(a.try_lease("job", "A", 105, 10).unwrap(), "renewed");
    assert!(!b.try_lease("job", "B", 114, 10).unwrap());
    assert!(
        b.try_lease("job", "B", 115, 10).unwrap(),
        "expired: taken over"
    );
    assert!(!a.try_lease("job", "A", 116, 10).unwrap());
    assert_eq!(a.schema_version().unwrap(), 3);

    // Start-up errors: a wrong password, an unreachable server, an unverifiable certificate.
    let err = open(&pg.conn_string("wrong password!")).err().unwrap();
    assert!(
        err.contains("refused the login of user \"jaunt\"")
            && err.contains("password authentication failed"),
        "{err}"
    );
    assert!(!err.contains("wrong password!"), "{err}");
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = open(&format!(
        "postgres://jaunt:{}@127.0.0.1:{closed}/jaunt?sslmode=require",
        encode(DB_PASSWORD)
    ))
    .err()
    .unwrap();
    assert!(
        err.contains(&format!("cannot reach PostgreSQL at 127.0.0.1:{closed}")),
        "{err}"
    );
    let other_ca = pg.dir.path().join("server.crt");
    let err = open(&format!(
        "postgres://jaunt:{}@localhost:{}/jaunt?sslmode=verify-full&sslrootcert={}",
        encode(DB_PASSWORD),
        pg.port,
        other_ca.display()
    ))
    .err()
    .unwrap();
    assert!(err.contains("TLS handshake"), "{err}");
}

fn host_config(conn: &str) -> String {
    format!(
        "cluster_name: ha.test\n\
         data_dir: DATA_DIR\n\
         control:\n  listen_addr: 127.0.0.1:0\n  second_factor: off\n\
         engine:\n  public_addr: 127.0.0.1:0\n  listen_addr: 127.0.0.1:0\n  diag_addr: 127.0.0.1:0\n  shards: 1\n\
         storage:\n  type: postgres\n  conn_string: \"{conn}\"\n"
    )
}

#[test]
fn two_controls_share_users_locks_and_audit_and_survive_kill_9() {
    let pg = Pg::start();
    let conn = pg.conn_string(DB_PASSWORD);
    let mut a = Cluster::with_config(&host_config(&conn));
    let b = Cluster::with_config(&host_config(&conn));
    // One cluster: the CA keys are in the backend, so both hosts present the same CA.
    assert_eq!(a.pin, b.pin);

    // Both hosts are listed, healthy, on either.
    let status = ok(b.admin(&["status"], None));
    assert!(
        status.contains("Controls and engines: 2 listed, 2 healthy")
            && status.contains(&a.public_addr)
            && status.contains(&b.public_addr),
        "{status}"
    );

    // A user added through A logs in through B.
    ok(a.admin(
        &[
            "users",
            "add",
            "alice",
            "--roles",
            "access",
            "--logins",
            "alice",
            "--password-stdin",
        ],
        Some(&format!("{PASSWORD}\n")),
    ));
    let out = ok(b.login("alice", PASSWORD, &[]));
    assert!(out.contains("user:      alice"), "{out}");

    // A lock made on A refuses logins through B; removed on B, it frees them.
    ok(a.admin(
        &["lock", "--user", "alice", "--message", "incident 12"],
        None,
    ));
    let err = fails(b.login("alice", PASSWORD, &[]));
    assert!(
        err.contains("locked") && err.contains("incident 12"),
        "{err}"
    );
    let locks: Vec<serde_json::Value> =
        serde_json::from_str(&ok(b.admin(&["get", "locks", "--format", "json"], None))).unwrap();
    assert_eq!(locks.len(), 1);
    let id = locks[0]["metadata"]["name"].as_str().unwrap().to_string();
    ok(b.admin(&["rm", &format!("lock/{id}")], None));
    ok(b.login("alice", PASSWORD, &[]));

    // Audit is cluster-wide: what A wrote, B finds, and the other way round.
    let on_b = b.audit_events(Some("lock.create"));
    assert!(
        on_b.iter().any(|e| e.to_string().contains("alice")),
        "{on_b:?}"
    );
    let on_a = a.audit_events(Some("lock.delete"));
    assert_eq!(on_a.len(), 1, "{on_a:?}");

    // kill -9 of A: logins and admin verbs go on through B, and nothing A acknowledged is
    // lost.
    ok(a.admin(
        &[
            "users",
            "add",
            "bob",
            "--roles",
            "access",
            "--password-stdin",
        ],
        Some(&format!("{PASSWORD}\n")),
    ));
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    ok(b.login("bob", PASSWORD, &[]));
    ok(b.login("alice", PASSWORD, &[]));
    let users = ok(b.admin(&["users", "ls"], None));
    assert!(users.contains("alice") && users.contains("bob"), "{users}");
    // A's heartbeats stop: B lists it as unreachable once they are stale.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = ok(b.admin(&["status"], None));
        let line = status
            .lines()
            .find(|l| l.contains(&format!("engine {}", a.public_addr)))
            .unwrap_or_default()
            .to_string();
        if line.contains("unreachable") {
            assert!(status.contains("2 listed, 1 healthy"), "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A still listed as reachable: {status}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_wrong_database_password_stops_jaunt_start_with_a_clear_error() {
    let pg = Pg::start();
    let dir = tempfile::tempdir().unwrap();
    let yaml = host_config(&pg.conn_string("not the password"))
        .replace("DATA_DIR", &dir.path().join("data").display().to_string());
    let path = dir.path().join("jaunt.yaml");
    std::fs::write(&path, yaml).unwrap();
    let child = Command::new(jaunt_bin())
        .args(["start", "--config", path.to_str().unwrap()])
        .env("JAUNT_HOME", dir.path().join("home"))
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        text.contains("storage (type: postgres)")
            && text.contains("refused the login of user \"jaunt\""),
        "{text}"
    );
    assert!(
        !text.contains("not the password") && !text.contains("not%20the"),
        "{text}"
    );

    // A bad storage section names its key and line.
    std::fs::write(
        &path,
        host_config("mysql://nope").replace("DATA_DIR", &dir.path().display().to_string()),
    )
    .unwrap();
    let err = fails(run_jaunt(
        dir.path(),
        &["start", "--config", path.to_str().unwrap()],
        None,
    ));
    assert!(
        err.contains("jaunt.yaml:13:") && err.contains("storage.conn_string"),
        "{err}"
    );
}

/// One round trip to TCP app `echo` with the identity logged in under `home`: Ok when the
/// bytes come back, Err with the refusal otherwise.
fn echo_through(home: &Path) -> Result<(), String> {
    echo_app(home, "echo")
}

/// One round trip to TCP app `target`, as [`echo_through`].
fn echo_app(home: &Path, target: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let profile = jaunt_control::profile::Profile {
        dir: home.to_path_buf(),
    };
    let (dialer, _) =
        jaunt_control::access::Dialer::from_profile(&profile).map_err(|e| e.to_string())?;
    let mut session = dialer
        .dial(&jaunt_config::wire::dial::DialRequest {
            join: None,
            kind: jaunt_config::wire::dial::DialKind::Tcp,
            target: target.into(),
            login: None,
            db_user: None,
            db_name: None,
        })
        .map_err(|e| format!("{e:#}"))?;
    session
        .sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    session.write_all(b"ping").map_err(|e| e.to_string())?;
    let mut back = [0u8; 4];
    session.read_exact(&mut back).map_err(|e| e.to_string())?;
    if &back != b"ping" {
        return Err(format!("echo answered {back:?}"));
    }
    Ok(())
}

/// Polls `check` every 50 ms until it holds; fails after `within`. Returns how long it took.
#[track_caller]
fn within(within: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if check() {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_agent_joined_through_a_is_reached_through_b_and_locks_follow_within_a_second() {
    let pg = Pg::start();
    let conn = pg.conn_string(DB_PASSWORD);
    let mut a = Cluster::with_config(&host_config(&conn));
    let b = Cluster::with_config(&host_config(&conn));
    let mut c = Cluster::with_config(&host_config(&conn));
    ok(a.admin(
        &[
            "users",
            "add",
            "alice",
            "--roles",
            "access",
            "--logins",
            "root",
            "--password-stdin",
        ],
        Some(&format!("{PASSWORD}\n")),
    ));

    // The agent is told only A's address; it learns B from control. It serves a TCP echo and
    // a real sshd (host certificate from the shared host CA).
    let sshd = support::sshd::Sshd::start_named(&a, "apphost");
    let echo = echo_server();
    let token = ok(a.admin(&["tokens", "add", "--type", "node,app"], None));
    let token = token.lines().next().unwrap().trim().to_string();
    let agent_dir = a.dir.path().join("agent");
    let log = std::fs::File::create(a.dir.path().join("agent.log")).unwrap();
    let _agent = Reaped(
        Command::new(jaunt_bin())
            .args([
                "agent",
                "--proxy",
                &a.public_addr,
                "--ca-pin",
                &a.pin,
                "--data-dir",
                agent_dir.to_str().unwrap(),
                "--name",
                "apphost",
                "--token",
                &token,
                "--app",
                &format!("echo=tcp://{echo}"),
                "--ssh",
                &sshd.addr,
            ])
            .env("JAUNT_HOME", a.dir.path().join("agent-home"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );

    // alice logs in through B and reaches the agent through B.
    ok(b.login("alice", PASSWORD, &[]));
    within(Duration::from_secs(30), "echo through B", || {
        echo_through(&b.home).is_ok()
    });

    // A lock made on A is in force on B's engine within a second, and removed on B it frees
    // access within a second.
    ok(a.admin(
        &["lock", "--user", "alice", "--message", "incident 12"],
        None,
    ));
    let took = within(Duration::from_secs(1), "the lock enforced by B", || {
        echo_through(&b.home).is_err()
    });
    eprintln!("lock in force on B after {took:?}");
    let err = echo_through(&b.home).unwrap_err();
    assert!(
        err.contains("locked") || err.contains("incident 12"),
        "{err}"
    );
    let locks: Vec<serde_json::Value> =
        serde_json::from_str(&ok(b.admin(&["get", "locks", "--format", "json"], None))).unwrap();
    let id = locks[0]["metadata"]["name"].as_str().unwrap().to_string();
    ok(b.admin(&["rm", &format!("lock/{id}")], None));
    let took = within(Duration::from_secs(1), "the unlock on B", || {
        echo_through(&b.home).is_ok()
    });
    eprintln!("access back through B after {took:?}");

    // jaunt ssh through B, to the node the agent joined through A.
    support::sshd::wait_for_ssh(&b, "root@apphost");

    // kill -9 of A: the agent stays reachable through B, and logins and jaunt ssh go on there.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    echo_through(&b.home).unwrap();
    ok(b.login("alice", PASSWORD, &[]));
    echo_through(&b.home).unwrap();
    let out = ok(b.run(&["ssh", "root@apphost", "--", "echo", "via-b"], None));
    assert_eq!(out.trim(), "via-b");

    // alice also logs in through C: her profile names C, and B as the other engine.
    ok(c.login("alice", PASSWORD, &[]));
    echo_through(&c.home).unwrap();

    // SIGTERM of C (its engine drains) during a live session through B: the session goes on
    // and new dials through B still reach the agent.
    use std::io::{Read, Write};
    let profile = jaunt_control::profile::Profile {
        dir: b.home.clone(),
    };
    let (dialer, _) = jaunt_control::access::Dialer::from_profile(&profile).unwrap();
    let mut live = dialer
        .dial(&jaunt_config::wire::dial::DialRequest {
            join: None,
            kind: jaunt_config::wire::dial::DialKind::Tcp,
            target: "echo".into(),
            login: None,
            db_user: None,
            db_name: None,
        })
        .unwrap();
    live.sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut back = [0u8; 3];
    live.write_all(b"one").unwrap();
    live.read_exact(&mut back).unwrap();
    let pid = c.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // C closes its public port at once, so a load balancer or the kernel sends nobody there.
    within(Duration::from_secs(10), "C's public port closed", || {
        std::net::TcpStream::connect(&c.public_addr).is_err()
    });
    live.write_all(b"two").unwrap();
    live.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"two");
    echo_through(&b.home).unwrap();
    // New dials of the user logged in through C go to B, the engine her login named: a TCP app
    // and `jaunt ssh` (its ProxyCommand dials), with no new login.
    echo_through(&c.home).unwrap();
    let out = ok(c.run(&["ssh", "root@apphost", "--", "echo", "via-c"], None));
    assert_eq!(out.trim(), "via-c");
    assert!(c.child.wait().unwrap().success());
    let status = ok(b.admin(&["status"], None));
    assert!(
        status
            .lines()
            .any(|l| l.contains(&c.public_addr) && l.contains("stopped")),
        "{status}"
    );
}

#[test]
fn audit_retention_prunes_postgres_under_one_lease() {
    let pg = Pg::start();
    let conn = pg.conn_string(DB_PASSWORD);
    let yaml = format!("{}audit:\n  retention: 2s\n", host_config(&conn));
    let a = Cluster::with_config(&yaml);
    let b = Cluster::with_config(&yaml);
    ok(a.admin(
        &[
            "users",
            "add",
            "carol",
            "--roles",
            "access",
            "--password-stdin",
        ],
        Some(&format!("{PASSWORD}\n")),
    ));
    assert_eq!(b.audit_events(Some("user.create")).len(), 1);
    // Older than two seconds, the event leaves the shared audit log: one of the two controls
    // holds the retention lease and prunes for both.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !b.audit_events(Some("user.create")).is_empty() {
        assert!(
            Instant::now() < deadline,
            "user.create still in the audit log"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(a.audit_events(Some("user.create")).is_empty());
    let holders = pg.sql_in(
        "jaunt",
        "SELECT count(*) FROM leases WHERE name = 'audit-retention'",
    );
    assert_eq!(holders.trim(), "1");
}

/// An agent joined through `on` serving TCP app `app` (an echo server).
fn app_agent(on: &Cluster, app: &str) -> Reaped {
    let echo = echo_server();
    let token = ok(on.admin(&["tokens", "add", "--type", "app"], None));
    let token = token.lines().next().unwrap().trim().to_string();
    Reaped(
        Command::new(jaunt_bin())
            .args([
                "agent",
                "--proxy",
                &on.public_addr,
                "--ca-pin",
                &on.pin,
                "--data-dir",
                on.dir.path().join(format!("agent-{app}")).to_str().unwrap(),
                "--name",
                app,
                "--token",
                &token,
                "--app",
                &format!("{app}=tcp://{echo}"),
            ])
            .env(
                "JAUNT_HOME",
                on.dir.path().join(format!("agent-home-{app}")),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// `n` calls of `f(i)` on `threads` threads: calls per second.
fn per_second(n: usize, threads: usize, f: impl Fn(usize) + Sync) -> f64 {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return;
                }
                f(i);
            });
        }
    });
    n as f64 / start.elapsed().as_secs_f64()
}

/// Logins and dials per second, PostgreSQL against SQLite and two controls against one, and
/// the time until every agent is reachable again for a user logged in through an engine that
/// drains. Same-run ratios; numbers in BENCHMARKS.md.
/// `cargo test -p jaunt-control --test ha -- --ignored --nocapture measure`
#[test]
#[ignore]
fn measure_logins_dials_and_drain() {
    const LOGINS: usize = 40;
    const DIALS: usize = 200;
    const THREADS: usize = 4;
    let pg = Pg::start();
    let conn = pg.conn_string(DB_PASSWORD);
    let sqlite_yaml = host_config(&conn)
        .split("storage:")
        .next()
        .unwrap()
        .to_string();
    let lite = Cluster::with_config(&sqlite_yaml);
    let mut a = Cluster::with_config(&host_config(&conn));
    for c in [&lite, &a] {
        ok(c.admin(
            &[
                "users",
                "add",
                "alice",
                "--roles",
                "access",
                "--password-stdin",
            ],
            Some(&format!("{PASSWORD}\n")),
        ));
    }
    let _lite_agent = app_agent(&lite, "lite");
    let _agents: Vec<Reaped> = ["app1", "app2", "app3"]
        .iter()
        .map(|app| app_agent(&a, app))
        .collect();
    let homes = tempfile::tempdir().unwrap();
    let login = |c: &Cluster, home: &Path| {
        ok(run_jaunt(
            home,
            &[
                "login",
                "--proxy",
                &c.public_addr,
                "--user",
                "alice",
                "--password-stdin",
                "--ca-pin",
                &c.pin,
            ],
            Some(&format!("{PASSWORD}\n")),
        ));
    };
    let home = |name: &str, i: usize| homes.path().join(format!("{name}-{}", i % THREADS));
    // One profile per thread and cluster, and every agent reachable before timing.
    for i in 0..THREADS {
        login(&lite, &home("lite", i));
        login(&a, &home("a", i));
    }
    within(Duration::from_secs(60), "the agents", || {
        echo_app(&home("lite", 0), "lite").is_ok()
            && ["app1", "app2", "app3"]
                .iter()
                .all(|app| echo_app(&home("a", 0), app).is_ok())
    });

    let login_lite = per_second(LOGINS, THREADS, |i| {
        login(&lite, &homes.path().join(format!("l-lite-{i}")))
    });
    let login_pg = per_second(LOGINS, THREADS, |i| {
        login(&a, &homes.path().join(format!("l-a-{i}")))
    });
    let dial_lite = per_second(DIALS, THREADS, |i| {
        echo_app(&home("lite", i), "lite").unwrap()
    });
    let dial_pg = per_second(DIALS, THREADS, |i| echo_app(&home("a", i), "app1").unwrap());

    // A second control+engine on the same PostgreSQL; half the work goes to each.
    let b = Cluster::with_config(&host_config(&conn));
    for i in 0..THREADS {
        login(&b, &home("b", i));
    }
    within(Duration::from_secs(60), "the agents through B", || {
        ["app1", "app2", "app3"]
            .iter()
            .all(|app| echo_app(&home("b", 0), app).is_ok())
    });
    let on = |i: usize| {
        if i.is_multiple_of(2) {
            ("a", &a)
        } else {
            ("b", &b)
        }
    };
    let login_two = per_second(LOGINS, THREADS, |i| {
        let (name, c) = on(i);
        login(c, &homes.path().join(format!("l-two-{name}-{i}")));
    });
    let dial_two = per_second(DIALS, THREADS, |i| {
        let (name, _) = on(i);
        echo_app(&home(name, i), "app1").unwrap()
    });
    // The drain part's user logs in through A now that B is up, so her login names B.
    login(&a, &home("a", 0));
    // A's engine drains: how long until a user logged in through A reaches every agent again,
    // and whether any dial through B failed meanwhile.
    let mut failed_through_b = 0;
    let pid = a.child.id().to_string();
    let start = Instant::now();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    within(Duration::from_secs(10), "A's port closed", || {
        std::net::TcpStream::connect(&a.public_addr).is_err()
    });
    let closed = start.elapsed();
    let mut pending: Vec<&str> = vec!["app1", "app2", "app3"];
    while !pending.is_empty() {
        pending.retain(|app| echo_app(&home("a", 0), app).is_err());
        for app in ["app1", "app2", "app3"] {
            if echo_app(&home("b", 0), app).is_err() {
                failed_through_b += 1;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{pending:?}");
    }
    let all_back = start.elapsed();
    a.child.wait().unwrap();

    println!(
        "logins/s: sqlite {login_lite:.1}, postgres {login_pg:.1} (postgres/sqlite {:.2}x), \
         two controls {login_two:.1} (two/one {:.2}x)",
        login_pg / login_lite,
        login_two / login_pg
    );
    println!(
        "dials/s: sqlite {dial_lite:.1}, postgres {dial_pg:.1} (postgres/sqlite {:.2}x), \
         two engines {dial_two:.1} (two/one {:.2}x)",
        dial_pg / dial_lite,
        dial_two / dial_pg
    );
    println!(
        "drain of A: port closed after {closed:?}; all 3 agents reachable for a user logged in \
         through A after {all_back:?}; {failed_through_b} dials through B failed meanwhile"
    );
}
