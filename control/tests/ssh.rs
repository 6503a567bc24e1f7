//! End to end with real OpenSSH: a dev cluster, a separate `jaunt agent` process joined with a
//! token, a real `sshd` (inetd mode, spawned per connection by a listener on port 0, so no fixed
//! port), and the real `ssh`/`scp` clients driven by `jaunt ssh` / `jaunt scp`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn sha256_file(path: &Path) -> String {
    tool("sha256sum", &[path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn ssh_and_scp_through_the_cluster_with_real_openssh() {
    let (c, sshd, (mut agent, _data)) = ssh_setup();
    let out = ok(c.run(&["ssh", "root@node1", "--", "echo", "hello"], None));
    assert_eq!(out.trim(), "hello");

    // A login the certificate does not carry is refused twice over: by the engine's RBAC
    // before any stream opens (naming node and login) ...
    let o = c.run(&["ssh", "nobody@node1", "--", "true"], None);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("access denied") && err.contains("node1") && err.contains("nobody"),
        "{err}"
    );
    // ... and by sshd itself, which checks the certificate's principals: straight to sshd with
    // alice's certificate, not through Jaunt.
    let keys = c.keys_dir();
    let (host, port) = sshd.addr.rsplit_once(':').unwrap();
    let o = Command::new("ssh")
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-i",
            keys.join("alice-ssh").to_str().unwrap(),
            "-o",
            &format!(
                "CertificateFile={}",
                keys.join("alice-ssh-cert.pub").display()
            ),
            "-p",
            port,
            &format!("nobody@{host}"),
            "true",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The node shows as connected: to the admin, to the user, in the cluster status.
    let nodes = ok(c.admin(&["get", "nodes"], None));
    assert!(
        nodes
            .lines()
            .any(|l| l.starts_with("node1") && l.contains("ssh") && l.ends_with("connected")),
        "{nodes}"
    );
    let ls = ok(c.run(&["ls", "nodes", "--format", "json"], None));
    let listed: Vec<serde_json::Value> = serde_json::from_str(&ls).unwrap();
    assert_eq!(listed.len(), 1, "{ls}");
    assert_eq!(listed[0]["name"], "node1");
    let status = ok(c.admin(&["status"], None));
    assert!(status.contains("1 joined, 1 connected"), "{status}");

    // scp 64 MiB both ways, checksums match.
    let src = c.dir.path().join("big.bin");
    {
        let mut f = std::fs::File::create(&src).unwrap();
        let mut block = vec![0u8; 1 << 20];
        for i in 0..64u32 {
            for (j, b) in block.iter_mut().enumerate() {
                *b = (j as u32).wrapping_mul(2654435761).wrapping_add(i) as u8;
            }
            f.write_all(&block).unwrap();
        }
    }
    let remote = c.dir.path().join("remote.bin");
    ok(c.run(
        &[
            "scp",
            src.to_str().unwrap(),
            &format!("root@node1:{}", remote.display()),
        ],
        None,
    ));
    assert_eq!(sha256_file(&src), sha256_file(&remote));
    let back = c.dir.path().join("back.bin");
    ok(c.run(
        &[
            "scp",
            &format!("root@node1:{}", remote.display()),
            back.to_str().unwrap(),
        ],
        None,
    ));
    assert_eq!(sha256_file(&src), sha256_file(&back));

    // An unknown node is a readable error.
    let o = c.run(&["ssh", "root@nosuch", "--", "true"], None);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nosuch"), "{}", stderr(&o));

    // RBAC at the engine: a login no role allows is refused before any stream opens, naming
    // the node and the login.
    let o = c.run(&["ssh", "postgres@node1", "--", "true"], None);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("node1") && err.contains("postgres"), "{err}");

    // A node lock refuses new sessions with its message.
    ok(c.admin(
        &["lock", "--node", "node1", "--message", "maintenance window"],
        None,
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = c.run(&["ssh", "root@node1", "--", "true"], None);
        if !o.status.success() && stderr(&o).contains("maintenance window") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lock never took effect: {}",
            stderr(&o)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The engine's events reach the audit log (asynchronously: poll). The refused dial is an
    // access denial naming the node and the login.
    let search = |ty: &str| -> Vec<serde_json::Value> {
        let out = ok(c.admin(&["audit", "search", "--type", ty, "--format", "json"], None));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let denied = search("access.denied");
        let found = denied.iter().any(|e| {
            e["code"] == "JA2100W"
                && e["target"] == "node1"
                && e["login"] == "nobody"
                && e["user"] == "alice"
                && e["reason"].as_str().is_some_and(|r| r.contains("nobody"))
        });
        if found {
            break;
        }
        assert!(Instant::now() < deadline, "no access denial: {denied:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every session alice started has ended: as many ends as starts.
    let alice = |events: &[serde_json::Value]| {
        events
            .iter()
            .filter(|e| e["user"] == "alice" && e["target"] == "node1")
            .count()
    };
    loop {
        let starts = search("session.start");
        let ends = search("session.end");
        let (s, e) = (alice(&starts), alice(&ends));
        if s >= 1 && s == e {
            assert!(starts.iter().all(|e| e["code"] == "JA2000I"), "{starts:?}");
            assert!(ends.iter().all(|e| e["code"] == "JA2001I"), "{ends:?}");
            // The scp of 64 MiB went up through one of them.
            assert!(
                ends.iter()
                    .any(|e| e["bytes_in"].as_u64().is_some_and(|b| b > 64 << 20)),
                "{ends:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{s} session starts but {e} ends for alice: {starts:?} {ends:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let _ = agent.kill();
    let _ = agent.wait();
    c.assert_sessions_paired();
}

#[test]
fn agent_restarts_without_the_token() {
    let (c, sshd, (mut agent, data)) = ssh_setup();
    agent.kill().unwrap();
    agent.wait().unwrap();
    // Restart with no token: the identity in the data dir is enough.
    let mut agent = spawn_agent(&c, &data, "node1", None, &["--ssh", &sshd.addr]);
    wait_for_ssh(&c, "root@node1");
    let _ = agent.kill();
    let _ = agent.wait();
    c.assert_sessions_paired();
}

#[test]
fn tcp_app_through_jaunt_proxy_tcp_and_agent_death_ends_the_stream() {
    use std::io::{BufRead, BufReader, Read};
    let c = Cluster::dev();
    ok(c.admin(
        &[
            "users",
            "add",
            "alice",
            "--roles",
            "access",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    ok(c.login("alice", PASSWORD, &[]));
    let echo = echo_server().to_string();
    let app = format!("echo=tcp://{echo}");
    let (mut agent, _data) = start_agent(&c, "apphost", &["--app", &app]);

    // Wait until the app is listed (the agent connected), bounded.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ls = ok(c.run(&["ls", "apps"], None));
        if ls.lines().any(|l| l.starts_with("echo")) {
            break;
        }
        assert!(Instant::now() < deadline, "app never listed: {ls}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut proxy = Command::new(jaunt_bin())
        .args(["proxy", "tcp", "echo", "--port", "0"])
        .env("JAUNT_HOME", &c.home)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(proxy.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let local = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(local.starts_with("127.0.0.1:"), "{line}");

    let mut conn = std::net::TcpStream::connect(&local).unwrap();
    conn.write_all(b"ping through jaunt").unwrap();
    let mut buf = [0u8; 18];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping through jaunt");

    // Kill the agent mid-stream: the client sees its stream end promptly.
    agent.kill().unwrap();
    agent.wait().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let r = conn.read_to_end(&mut rest);
    assert!(
        r.is_ok()
            || r.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    // The issue asks for "within a second"; the bound here leaves room for a loaded CI machine
    // while still failing if the end waited for a keepalive timeout.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "stream ended after {:?}",
        started.elapsed()
    );

    let _ = proxy.kill();
    let _ = proxy.wait();
    // The session the agent's death cut still has its end.
    c.assert_sessions_paired();
}

#[test]
fn a_lock_closes_a_live_ssh_session() {
    let (c, _sshd, (_agent, _data)) = ssh_setup();

    // A live session that would run for a minute, printing a line once it is up.
    let mut session = Reaped(
        Command::new(jaunt_bin())
            .args(["ssh", "root@node1", "--", "echo up; sleep 60"])
            .env("JAUNT_HOME", &c.home)
            .env("HOME", &c.home)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(session.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "up");

    ok(c.admin(
        &["lock", "--user", "alice", "--message", "incident 7"],
        None,
    ));
    // The session ends long before its minute is up (bounded wait on the process itself).
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = session.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the locked session is still running"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "a cut session does not exit 0");
    // And alice cannot start a new one, nor log in again.
    let o = c.run(&["ssh", "root@node1", "--", "true"], None);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("incident 7"), "{}", stderr(&o));
    let err = fails(c.login("alice", PASSWORD, &[]));
    assert!(err.contains("locked"), "{err}");
    c.assert_sessions_paired();
}

#[test]
fn sessions_ls_shows_a_live_ssh_session_and_kill_ends_it() {
    let (c, _sshd, (_agent, _data)) = ssh_setup();
    let mut session = Reaped(
        Command::new(jaunt_bin())
            .args(["ssh", "root@node1", "--", "echo up; sleep 60"])
            .env("JAUNT_HOME", &c.home)
            .env("HOME", &c.home)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(session.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "up");

    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&ok(c.admin(&["sessions", "ls", "--format", "json"], None))).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let live = &listed[0];
    assert_eq!(live["user"], "alice");
    assert_eq!(live["login"], "root");
    assert_eq!(live["target"], "node1");
    assert_eq!(live["kind"], "ssh");
    // The built-in access role records (best_effort): the agent terminates and records it.
    assert_eq!(live["recorded"], true);
    let id = live["id"].as_str().unwrap().to_string();
    let table = ok(c.admin(&["sessions", "ls"], None));
    assert!(table.contains(&id) && table.contains("RECORDED"), "{table}");

    // alice (the access role only) may not list or kill sessions.
    let refused = fails(c.run(&["sessions", "kill", &id], None));
    assert!(refused.contains("session"), "{refused}");

    let killed_at = Instant::now();
    ok(c.admin(&["sessions", "kill", &id], None));
    let deadline = killed_at + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = session.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the killed session is still running"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "a killed session does not exit 0");
    assert!(
        killed_at.elapsed() < Duration::from_secs(1),
        "the session took {:?} to end",
        killed_at.elapsed()
    );
    let kills = c.audit_events(Some("session.kill"));
    assert_eq!(kills.len(), 1, "{kills:?}");
    assert_eq!(kills[0]["session_id"], id.as_str());
    assert_eq!(kills[0]["by"], "admin");
    let after: Vec<serde_json::Value> =
        serde_json::from_str(&ok(c.admin(&["sessions", "ls", "--format", "json"], None))).unwrap();
    assert!(after.is_empty(), "{after:?}");
    let missing = fails(c.admin(&["sessions", "kill", &id], None));
    assert!(missing.contains("no live session"), "{missing}");
    c.assert_sessions_paired();
}

/// The login rows of ARCHITECTURE.md's role semantics table with real ssh and sshd: a login
/// from an `{{external.x}}` trait, `*` in `logins` (no SSH principal, so no login), deny
/// winning over an allowed login, and `^regex$` node label selectors (matching and not).
#[test]
fn role_semantics_rows_for_logins_with_real_ssh() {
    let c = Cluster::dev();
    let file = c.dir.path().join("roles.yaml");
    std::fs::write(
        &file,
        "kind: role\nversion: v1\nmetadata: { name: ext-login }\nspec:\n  allow:\n    logins: ['{{external.unix_user}}']\n    node_labels: { env: '^prod-[0-9]+$' }\n\
         ---\nkind: role\nversion: v1\nmetadata: { name: any-login }\nspec:\n  allow:\n    logins: ['*']\n    node_labels: { '*': '*' }\n\
         ---\nkind: role\nversion: v1\nmetadata: { name: no-root }\nspec:\n  deny:\n    logins: [root]\n\
         ---\nkind: role\nversion: v1\nmetadata: { name: staging }\nspec:\n  allow:\n    logins: [root]\n    node_labels: { env: '^staging-[0-9]+$' }\n\
         ---\nkind: user\nversion: v1\nmetadata: { name: carol }\nspec:\n  roles: [ext-login]\n  traits:\n    unix_user: [root]\n\
         ---\nkind: user\nversion: v1\nmetadata: { name: dave }\nspec:\n  roles: [any-login]\n\
         ---\nkind: user\nversion: v1\nmetadata: { name: erin }\nspec:\n  roles: [ext-login, no-root]\n  traits:\n    unix_user: [root]\n\
         ---\nkind: user\nversion: v1\nmetadata: { name: frank }\nspec:\n  roles: [staging]\n",
    )
    .unwrap();
    ok(c.admin(&["create", "-f", file.to_str().unwrap()], None));
    for user in ["carol", "dave", "erin", "frank"] {
        ok(c.admin(
            &["users", "reset", user, "--password-stdin"],
            Some(PASSWORD),
        ));
    }
    let sshd = Sshd::start(&c);
    let (_agent, _data) = start_agent(
        &c,
        "node1",
        &["--ssh", &sshd.addr, "--labels", "env=prod-7"],
    );
    // carol: root from her unix_user trait, on a node whose env matches ^prod-[0-9]+$.
    let out = ok(c.login("carol", PASSWORD, &[]));
    assert!(out.contains("logins:    root"), "{out}");
    wait_for_ssh(&c, "root@node1");
    assert_eq!(
        ok(c.run(&["ssh", "root@node1", "--", "whoami"], None)).trim(),
        "root"
    );

    let home = |user: &str| {
        let home = c.dir.path().join(format!("home-{user}"));
        std::fs::create_dir_all(&home).unwrap();
        let out = ok(run_jaunt(
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
        (home, out)
    };
    // dave: `*` in logins puts no principal in the SSH certificate: the engine lets the dial
    // through (`*` matches any login), sshd refuses the certificate.
    let (dave, out) = home("dave");
    assert!(out.contains("logins:    -"), "{out}");
    let err = fails(run_jaunt(&dave, &["ssh", "root@node1", "--", "true"], None));
    assert!(
        !err.contains("kex_exchange_identification") && err.contains("Permission denied"),
        "{err}"
    );
    // erin: allowed root by one role, denied by another: deny wins, at issuance and at the
    // engine.
    let (erin, out) = home("erin");
    assert!(out.contains("logins:    -"), "{out}");
    let err = fails(run_jaunt(&erin, &["ssh", "root@node1", "--", "true"], None));
    assert!(err.contains("access denied"), "{err}");
    // frank: root, but only on ^staging-[0-9]+$ nodes; node1 is env=prod-7.
    let (frank, out) = home("frank");
    assert!(out.contains("logins:    root"), "{out}");
    let err = fails(run_jaunt(
        &frank,
        &["ssh", "root@node1", "--", "true"],
        None,
    ));
    assert!(
        err.contains("access denied") && err.contains("node1"),
        "{err}"
    );
}
