//! End to end with the real binary: the agent's own authorization check. A dev cluster, a
//! separate `jaunt agent` (which runs with `PolicyMode::Enforce`: every user stream is refused
//! unless the agent verified the forwarded certificate and `rbac::authorize` allowed it), and
//! `jaunt proxy tcp` through it. Also `GET /v1/agent/policy`: host identities only, and its
//! version and locks follow `jaunt lock`. What only the agent catches (a deny or lock the
//! engine's view lacks, a forged certificate) is driven at the agent directly in
//! `agent/tests/recheck.rs`, since here engine and agent learn from the same control.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jaunt_config::api::AgentPolicyResponse;
use jaunt_control::client::{Client, ClientError, Trust};
use jaunt_control::profile::Profile;
use support::*;

const PASSWORD: &str = "correct horse battery";

/// `jaunt agent` serving `echo`, its stderr in `data/agent.log`.
fn start_agent(c: &Cluster, echo: std::net::SocketAddr) -> (Reaped, PathBuf) {
    start_agent_with(c, echo, &[])
}

/// [`start_agent`] with extra environment variables.
fn start_agent_with(
    c: &Cluster,
    echo: std::net::SocketAddr,
    env: &[(&str, &str)],
) -> (Reaped, PathBuf) {
    let out = ok(c.admin(&["tokens", "add", "--type", "node,app,db"], None));
    let token = out.lines().next().unwrap().trim().to_string();
    let data = c.dir.path().join("agent-apphost");
    std::fs::create_dir_all(&data).unwrap();
    let log = std::fs::File::create(c.dir.path().join("agent.log")).unwrap();
    let child = Command::new(jaunt_bin())
        .args([
            "agent",
            "--proxy",
            &c.public_addr,
            "--ca-pin",
            &c.pin,
            "--data-dir",
            data.to_str().unwrap(),
            "--name",
            "apphost",
            "--token",
            &token,
            "--app",
            &format!("echo=tcp://{echo}"),
        ])
        .env("JAUNT_HOME", c.dir.path().join("agent-home"))
        .env("JAUNT_LOG", "jaunt_agent=info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    (Reaped(child), data)
}

/// A control-API client with the identity stored in `dir` (a `$JAUNT_HOME` or an agent's
/// `DATA_DIR/host`).
fn client_for(c: &Cluster, dir: &Path) -> Client {
    let profile = Profile {
        dir: dir.to_path_buf(),
    };
    let info = profile.load().unwrap().expect("an identity");
    Client::new(
        &c.public_addr,
        Trust::Roots(profile.host_ca().unwrap()),
        Some(profile.tls_identity(&info.user).unwrap()),
    )
    .unwrap()
}

/// Polls `check` every 100 ms until it holds, at most 30 s.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_agent_enforces_the_cluster_policy_it_polls() {
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
    let (_agent, data) = start_agent(&c, echo_server());
    let log = c.dir.path().join("agent.log");
    eventually("the agent's first policy", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("jaunt agent: cluster policy received (")
    });
    eventually("the app to be listed", || {
        ok(c.run(&["ls", "apps"], None))
            .lines()
            .any(|l| l.starts_with("echo"))
    });

    // The normal path with the re-check on: the engine forwards alice's certificate, the agent
    // verifies it and authorizes, the bytes flow.
    let mut proxy = Reaped(
        Command::new(jaunt_bin())
            .args(["proxy", "tcp", "echo", "--port", "0"])
            .env("JAUNT_HOME", &c.home)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(proxy.0.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let local = line.trim().rsplit(' ').next().unwrap().to_string();
    let mut conn = std::net::TcpStream::connect(&local).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    conn.write_all(b"checked twice").unwrap();
    let mut buf = [0u8; 13];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"checked twice");
    drop(conn);

    // The certificate the engine forwards fits the stream header with room to spare.
    let alice = Profile {
        dir: c.home.clone(),
    };
    let (chain, _) = alice.tls_identity("alice").unwrap();
    let base64_len = chain[0].len().div_ceil(3) * 4;
    eprintln!(
        "alice's certificate: {} bytes DER, {base64_len} in base64",
        chain[0].len()
    );
    assert!(
        base64_len < jaunt_engine::mux::MAX_DIAL_HEADER_LEN / 2,
        "{base64_len}"
    );

    // The policy endpoint: what the agent gets, and only agents get it.
    let host = client_for(&c, &data.join("host"));
    let first: AgentPolicyResponse = host.get_json("/v1/agent/policy").unwrap();
    assert!(first.version.starts_with("sha256:"), "{}", first.version);
    assert!(
        first.roles.contains_key("access"),
        "{:?}",
        first.roles.keys()
    );
    assert!(first.locks.is_empty());
    assert_eq!(first.user_ca.len(), 1);
    assert!(first.user_ca[0].starts_with("-----BEGIN CERTIFICATE-----"));
    match client_for(&c, &c.home).get_json::<AgentPolicyResponse>("/v1/agent/policy") {
        Err(ClientError::Api { status: 403, .. }) => {}
        other => panic!("a user got the agent policy: {other:?}"),
    }

    // A lock changes the version and reaches the agent's poll.
    ok(c.admin(
        &["lock", "--user", "alice", "--message", "incident 9"],
        None,
    ));
    let second: AgentPolicyResponse = host.get_json("/v1/agent/policy").unwrap();
    assert_ne!(second.version, first.version);
    assert_eq!(second.locks.len(), 1);
    // The agent takes the new version in within a poll or two (it logs each one).
    eventually("the agent to apply the lock's policy", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(&second.version)
    });
}

/// `jaunt proxy tcp echo` for the identity in `c.home`; returns it and its local address.
fn proxy_echo(c: &Cluster) -> (Reaped, String) {
    let mut proxy = Reaped(
        Command::new(jaunt_bin())
            .args(["proxy", "tcp", "echo", "--port", "0"])
            .env("JAUNT_HOME", &c.home)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(proxy.0.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let local = line.trim().rsplit(' ').next().unwrap().to_string();
    (proxy, local)
}

/// One echo round trip on `conn`.
fn echo_once(conn: &mut std::net::TcpStream, what: &[u8]) {
    conn.write_all(what).unwrap();
    let mut buf = vec![0u8; what.len()];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(buf, what);
}

/// Issue 15.2: the agent learns a role from the engine's push (its own poll is turned off
/// here, so nothing else could deliver it), a user of the new role is served at once, and a
/// role change that takes the access away ends the user's live stream.
#[test]
fn a_new_role_is_pushed_to_the_agent_and_taking_access_away_ends_live_sessions() {
    let c = Cluster::dev();
    let (_agent, data) = start_agent_with(
        &c,
        echo_server(),
        &[("JAUNT_AGENT_POLICY_POLL_SECS", "3600")],
    );
    let log = c.dir.path().join("agent.log");
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("the agent's first policy", || {
        agent_log().contains("jaunt agent: cluster policy received (")
    });

    // A role created now: the agent hears of it only through the engine's push.
    let role = c.dir.path().join("echoers.yaml");
    let write_role = |labels: &str| {
        std::fs::write(
            &role,
            format!(
                "kind: role\nversion: v1\nmetadata:\n  name: echoers\nspec:\n  allow:\n    app_labels: {labels}\n"
            ),
        )
        .unwrap();
        ok(c.admin(&["create", "-f", role.to_str().unwrap()], None))
    };
    assert!(write_role("{'*': '*'}").contains("role echoers created"));
    let host = client_for(&c, &data.join("host"));
    let with_role: AgentPolicyResponse = host.get_json("/v1/agent/policy").unwrap();
    assert!(with_role.roles.contains_key("echoers"));
    eventually("the engine to push the new role to the agent", || {
        agent_log().lines().any(|l| {
            l.contains("cluster policy pushed by the engine") && l.contains(&with_role.version)
        })
    });

    ok(c.admin(
        &[
            "users",
            "add",
            "bob",
            "--roles",
            "echoers",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    ok(c.login("bob", PASSWORD, &[]));
    eventually("the app to be listed for bob", || {
        ok(c.run(&["ls", "apps"], None))
            .lines()
            .any(|l| l.starts_with("echo"))
    });
    let (_proxy, local) = proxy_echo(&c);
    let mut conn = std::net::TcpStream::connect(&local).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Served on the first try: the agent knows the role.
    echo_once(&mut conn, b"new role");

    // The role now matches no app: bob's live stream ends (on the engine, and on the agent
    // once the push arrives), without a lock.
    assert!(write_role("{team: nobody}").contains("role echoers updated"));
    let mut buf = [0u8; 64];
    let ended = match conn.read(&mut buf) {
        Ok(0) => true,
        Ok(n) => panic!("unexpected bytes after the role change: {:?}", &buf[..n]),
        Err(e) => {
            e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut
        }
    };
    assert!(
        ended,
        "the live stream outlived the role change that refuses it"
    );
    // And a new stream is refused.
    let mut again = std::net::TcpStream::connect(&local).unwrap();
    again
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let _ = again.write_all(b"refused?");
    let mut buf = [0u8; 8];
    match again.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("a refused role still echoed {:?}", &buf[..n]),
    }
}
