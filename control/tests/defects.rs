//! Regression tests for the defects issue 15 lists, through the real `jaunt` binary on
//! 127.0.0.1 with kernel-chosen ports: a second daemon on a data dir or public port, and the
//! smaller command-line defects.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::*;

/// A second `jaunt start --dev` on the same data dir started, joined the public port with
/// `SO_REUSEPORT`, took most new connections and overwrote `control.addr`; on another data dir
/// it still joined the port (and logins then failed with a CA pin mismatch).
#[test]
fn a_second_daemon_is_refused_on_the_data_dir_and_on_the_public_port() {
    let c = Cluster::dev();
    let pid = c.child.id();
    let control_addr = std::fs::read_to_string(c.data_dir.join("control.addr")).unwrap();
    let dd = c.data_dir.display().to_string();

    let err = fails(run_jaunt(
        &c.home,
        &[
            "start",
            "--dev",
            "--data-dir",
            &dd,
            "--public-addr",
            "127.0.0.1:0",
        ],
        None,
    ));
    assert!(
        err.contains(&format!(
            "data directory {dd} is in use by another jaunt (pid {pid})"
        )),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(c.data_dir.join("control.addr")).unwrap(),
        control_addr,
        "the refused daemon left control.addr alone"
    );

    let other = c.dir.path().join("other");
    let err = fails(run_jaunt(
        &c.home,
        &[
            "start",
            "--dev",
            "--data-dir",
            other.to_str().unwrap(),
            "--public-addr",
            &c.public_addr,
        ],
        None,
    ));
    assert!(
        err.contains(&format!(
            "the public port {} is already in use by jaunt (pid {pid})",
            c.public_addr
        )),
        "{err}"
    );
    assert!(err.contains("--public-addr"), "{err}");

    // The first daemon still answers every login (no second one shares its port).
    let pw = std::fs::read_to_string(c.data_dir.join("admin-password")).unwrap();
    for _ in 0..4 {
        let out = ok(c.login("admin", pw.trim(), &[]));
        assert!(out.contains("Logged in to"), "{out}");
    }
}

/// `jaunt completion bash|zsh|fish` prints a script each shell loads, covering the subcommands.
#[test]
fn shell_completions_for_bash_zsh_and_fish() {
    let home = tempfile::tempdir().unwrap();
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef jaunt"),
        ("fish", "complete -c jaunt"),
    ] {
        let script = ok(run_jaunt(home.path(), &["completion", shell], None));
        assert!(script.contains(marker), "{shell}: {script}");
        for sub in ["login", "ssh", "proxy", "audit", "completion"] {
            assert!(script.contains(sub), "{shell} lacks {sub}");
        }
    }
    let bash = ok(run_jaunt(home.path(), &["completion", "bash"], None));
    let check = std::process::Command::new("bash")
        .args(["-n", "-c", &bash])
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", stderr(&check));
    fails(run_jaunt(home.path(), &["completion", "tcsh"], None));
}

/// The dev cluster's default public host is `localhost`, so web apps have names
/// (`<app>.localhost`) and the README's `jaunt proxy app` flow works as written.
#[test]
fn the_dev_public_host_is_localhost() {
    let home = tempfile::tempdir().unwrap();
    let help = ok(run_jaunt(home.path(), &["start", "--help"], None));
    assert!(help.contains("[default: localhost:3080]"), "{help}");
}

/// `jaunt lock --user nobody` accepted a user that does not exist without a word: it warns
/// now, and keeps the lock.
#[test]
fn locking_an_unknown_user_warns_and_keeps_the_lock() {
    let c = Cluster::dev();
    let o = c.admin(&["lock", "--user", "nobody"], None);
    let err = stderr(&o);
    let out = ok(o);
    assert!(out.contains("Locked user nobody"), "{out}");
    assert!(
        err.contains("warning: there is no user \"nobody\""),
        "{err}"
    );
    let locks = ok(c.admin(&["get", "locks"], None));
    assert!(locks.contains("nobody"), "{locks}");
    // A known user: no warning.
    let o = c.admin(&["lock", "--user", "admin"], None);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    ok(o);
}

/// The README printed other sshd paths than `jaunt ca sign-host` does, and used `sudo`, which a
/// root shell does not have.
#[test]
fn the_readme_shows_the_sshd_lines_sign_host_prints() {
    let readme = include_str!("../../README.md");
    assert!(!readme.contains("sudo "), "the README uses sudo");
    let c = Cluster::dev();
    let out_dir = c.dir.path().join("ssh");
    let out = ok(c.admin(
        &[
            "ca",
            "sign-host",
            "--host",
            "node1",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        None,
    ));
    let d = out_dir.display().to_string();
    for (printed, documented) in [
        (format!("HostKey {d}/node1"), "HostKey /etc/ssh/jaunt/node1"),
        (
            format!("HostCertificate {d}/node1-cert.pub"),
            "HostCertificate /etc/ssh/jaunt/node1-cert.pub",
        ),
        (
            format!("TrustedUserCAKeys {d}/user_ca.pub"),
            "TrustedUserCAKeys /etc/ssh/jaunt/user_ca.pub",
        ),
    ] {
        assert!(out.contains(&printed), "{out}");
        assert!(readme.contains(documented), "README lacks {documented}");
    }
    for item in [
        "PostgreSQL server and client",
        "--diag-addr",
        "/metrics",
        "jaunt completion bash",
        "--type node,db",
        "jaunt proxy app grafana --port 8080",
    ] {
        assert!(readme.contains(item), "README lacks {item}");
    }
}

/// Every subcommand's `--help` repeated the control host's `--data-dir` text, `jaunt ssh` and
/// `jaunt agent` included. Commands that do not read it no longer show it (it still parses,
/// as before); those that do say what it means for them.
#[test]
fn data_dir_help_is_per_command() {
    let home = tempfile::tempdir().unwrap();
    let help = |args: &[&str]| {
        let mut all = args.to_vec();
        all.push("--help");
        ok(run_jaunt(home.path(), &all, None))
    };
    for cmd in [
        &["ssh"][..],
        &["login"],
        &["ls"],
        &["proxy", "tcp"],
        &["db", "connect"],
        &["scp"],
    ] {
        let text = help(cmd);
        assert!(
            !text.contains("--data-dir") && !text.contains("control host"),
            "{cmd:?}: {text}"
        );
    }
    let agent = help(&["agent"]);
    assert!(agent.contains("The agent's data directory"), "{agent}");
    assert!(!agent.contains("control host"), "{agent}");
    let start = help(&["start"]);
    assert!(start.contains("The daemon's data directory"), "{start}");
    for cmd in [&["users", "add"][..], &["get"], &["audit", "search"]] {
        let text = help(cmd);
        assert!(
            text.contains("local admin of the control host"),
            "{cmd:?}: {text}"
        );
    }
    // The flag still parses where it did (a usage error would exit 2).
    let o = run_jaunt(home.path(), &["ls", "--data-dir", "/nonexistent"], None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("not logged in"), "{}", stderr(&o));
}

/// The agent printed "Connection refused (os error 111): Connection refused (os error 111)":
/// the client's error carried its I/O error both in its text and as its source.
#[test]
fn an_unreachable_proxy_is_reported_once() {
    let home = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let proxy = format!("127.0.0.1:{port}");
    for args in [
        vec!["login", "--proxy", &proxy, "--user", "x", "--insecure"],
        vec![
            "agent",
            "--proxy",
            &proxy,
            "--token",
            "t",
            "--insecure",
            "--data-dir",
        ],
    ] {
        let mut args = args.clone();
        let data = home.path().join("agent");
        let data = data.to_str().unwrap().to_string();
        if args.last() == Some(&"--data-dir") {
            args.push(&data);
        }
        let err = fails(run_jaunt(home.path(), &args, Some("pw\n")));
        assert!(
            err.contains(&format!("cannot reach the proxy at {proxy}")),
            "{err}"
        );
        assert_eq!(err.matches("os error").count(), 1, "{err}");
    }
}

/// `jaunt audit search` showed raw unix times (`"expires":1796632498`) in its text table; the
/// times are RFC 3339 UTC there now, and `--format json` keeps the numbers.
#[test]
fn audit_search_text_shows_rfc3339_times() {
    let c = Cluster::dev();
    ok(c.admin(&["tokens", "add", "--type", "node"], None));
    let text = ok(c.admin(&["audit", "search", "--type", "token.create"], None));
    let line = text
        .lines()
        .find(|l| l.contains("token.create"))
        .unwrap_or_else(|| panic!("{text}"));
    let expires = line
        .split("\"expires\":")
        .nth(1)
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        expires.starts_with('"') && expires[1..].starts_with("20") && expires.contains("Z\""),
        "{line}"
    );
    let json = ok(c.admin(
        &[
            "audit",
            "search",
            "--type",
            "token.create",
            "--format",
            "json",
        ],
        None,
    ));
    let events: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(events[0]["expires"].is_u64(), "{json}");
    assert!(events[0]["time"].is_string(), "{json}");
}

/// There was no `jaunt users update`: roles and traits could only change by deleting the user
/// (and its password) or by hand-written YAML.
#[test]
fn users_update_changes_roles_and_traits() {
    let c = Cluster::dev();
    ok(c.admin(
        &[
            "users",
            "add",
            "bob",
            "--roles",
            "access",
            "--logins",
            "root",
            "--password-stdin",
        ],
        Some("pw-bob-1234567"),
    ));
    let out = ok(c.admin(
        &[
            "users",
            "update",
            "bob",
            "--roles",
            "access,editor",
            "--db-users",
            "bob_ro,bob_rw",
            "--trait",
            "team=ops,dev",
        ],
        None,
    ));
    assert!(out.contains("User bob updated"), "{out}");
    // The password is kept, and the next login carries the change.
    let out = ok(c.login("bob", "pw-bob-1234567", &[]));
    assert!(out.contains("roles:     access, editor"), "{out}");
    assert!(out.contains("logins:    root"), "{out}");
    assert!(out.contains("db users:  bob_ro, bob_rw"), "{out}");
    let users = ok(c.admin(&["users", "ls", "--format", "json"], None));
    let users: serde_json::Value = serde_json::from_str(&users).unwrap();
    let bob = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "bob")
        .unwrap();
    assert_eq!(bob["traits"]["team"], serde_json::json!(["ops", "dev"]));

    // An empty list clears a trait; what is not given stays.
    ok(c.admin(&["users", "update", "bob", "--logins", ""], None));
    let out = ok(c.login("bob", "pw-bob-1234567", &[]));
    assert!(out.contains("logins:    -"), "{out}");
    assert!(out.contains("roles:     access, editor"), "{out}");

    let err = fails(c.admin(&["users", "update", "nobody", "--logins", "x"], None));
    assert!(err.contains("there is no user \"nobody\""), "{err}");
    let err = fails(c.admin(&["users", "update", "bob"], None));
    assert!(err.contains("say what to change"), "{err}");
    let err = fails(c.admin(&["users", "update", "bob", "--roles", "nosuch"], None));
    assert!(err.contains("nosuch"), "{err}");
}

/// `jaunt get users --format yaml` printed a list `jaunt create -f` could not read. Every kind
/// an admin creates now round-trips: users, roles and locks come back as they were; tokens
/// (stored hashed, so their secrets cannot be printed) come back as new tokens with the same
/// settings.
#[test]
fn get_yaml_round_trips_through_create_for_every_kind() {
    let c = Cluster::dev();
    let role = c.dir.path().join("role.yaml");
    std::fs::write(
        &role,
        "kind: role\nversion: v1\nmetadata: { name: dba, description: databases }\nspec:\n  allow:\n    db_labels: { env: '^prod-[0-9]+$' }\n    db_users: ['*']\n  deny:\n    db_names: [secrets]\n",
    )
    .unwrap();
    ok(c.admin(&["create", "-f", role.to_str().unwrap()], None));
    ok(c.admin(
        &[
            "users",
            "add",
            "bob",
            "--roles",
            "dba",
            "--db-users",
            "bob_ro",
        ],
        None,
    ));
    ok(c.admin(&["users", "update", "bob", "--trait", "team=ops"], None));
    ok(c.admin(&["lock", "--role", "dba", "--message", "maintenance"], None));
    ok(c.admin(
        &["tokens", "add", "--type", "node,db", "--single-use"],
        None,
    ));

    let file = c.dir.path().join("get.yaml");
    for kind in ["users", "roles", "locks"] {
        let before = ok(c.admin(&["get", kind, "--format", "yaml"], None));
        assert!(
            before.contains(&format!("kind: {}", kind.trim_end_matches('s'))),
            "{before}"
        );
        std::fs::write(&file, &before).unwrap();
        // Remove what can be removed, then create it again from the file.
        match kind {
            "users" => ok(c.admin(&["users", "rm", "bob"], None)),
            "locks" => {
                let id = before
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("name: "))
                    .unwrap()
                    .to_string();
                ok(c.admin(&["rm", &format!("lock/{id}")], None))
            }
            _ => String::new(),
        };
        let out = ok(c.admin(&["create", "-f", file.to_str().unwrap()], None));
        assert!(
            out.contains("created") || out.contains("updated"),
            "{kind}: {out}"
        );
        let after = ok(c.admin(&["get", kind, "--format", "yaml"], None));
        assert_eq!(before, after, "{kind} did not round-trip");
    }

    let tokens = ok(c.admin(&["get", "tokens", "--format", "yaml"], None));
    assert!(
        tokens.contains("kind: token") && tokens.contains("stored hashed"),
        "{tokens}"
    );
    std::fs::write(&file, &tokens).unwrap();
    let out = ok(c.admin(&["create", "-f", file.to_str().unwrap()], None));
    assert!(out.contains("token ") && out.contains(" created"), "{out}");
    let list = ok(c.admin(&["get", "tokens", "--format", "json"], None));
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    for token in list {
        assert_eq!(token["types"], serde_json::json!(["node", "db"]));
        assert_eq!(token["single_use"], true);
    }
}

/// A fresh join token of `types` (the first line `jaunt tokens add` prints).
fn token(c: &Cluster, types: &str) -> String {
    let out = ok(c.admin(&["tokens", "add", "--type", types], None));
    out.lines().next().unwrap().trim().to_string()
}

/// `jaunt agent` on `data` (its log in `log`); the caller waits or kills.
fn spawn_agent(
    c: &Cluster,
    data: &std::path::Path,
    log: &std::path::Path,
    extra: &[&str],
) -> Reaped {
    let mut args = vec![
        "agent",
        "--proxy",
        &c.public_addr,
        "--ca-pin",
        &c.pin,
        "--data-dir",
        data.to_str().unwrap(),
        "--name",
        "n1",
    ];
    args.extend_from_slice(extra);
    Reaped(
        std::process::Command::new(jaunt_bin())
            .args(&args)
            .env("JAUNT_HOME", c.dir.path().join("agent-home"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// Waits up to 20 s for `agent` to exit; its exit code and log.
fn exits(agent: &mut Reaped, log: &std::path::Path) -> (Option<i32>, String) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(status) = agent.try_wait().unwrap() {
            return (status.code(), std::fs::read_to_string(log).unwrap());
        }
        let log = std::fs::read_to_string(log).unwrap();
        assert!(
            std::time::Instant::now() < deadline,
            "the agent kept running: {log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Polls `jaunt get KIND` until it lists `name` (20 s).
fn wait_listed(c: &Cluster, kind: &str, name: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let list = ok(c.admin(&["get", kind], None));
        if list
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} never listed: {list}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// An agent joined with a node-only token accepted `--db` and `--app`, listed them, and failed
/// only when a user connected; restarted with a new `--token`, it ignored the token. Now it
/// refuses such services at start and says which token it needs, and a new `--token` joins
/// again (a bad one stops the agent with the reason; the same one is a plain restart).
#[test]
fn agent_token_types_are_checked_at_start_and_a_new_token_is_used() {
    let c = Cluster::dev();
    let data = c.dir.path().join("agent-data");
    let log = c.dir.path().join("agent.log");
    let node_token = token(&c, "node");

    let mut agent = spawn_agent(
        &c,
        &data,
        &log,
        &["--token", &node_token, "--db", "pg1=postgres://127.0.0.1:1"],
    );
    let (code, text) = exits(&mut agent, &log);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("joined with a token of type node and cannot serve database pg1")
            && text.contains("jaunt tokens add --type node,db"),
        "{text}"
    );
    let mut agent = spawn_agent(&c, &data, &log, &["--app", "grafana=http://127.0.0.1:1"]);
    let (code, text) = exits(&mut agent, &log);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("cannot serve web app grafana"), "{text}");
    assert!(text.contains("jaunt tokens add --type node,app"), "{text}");

    // The node itself is served with the stored identity, no token needed.
    let agent = spawn_agent(&c, &data, &log, &["--ssh", "127.0.0.1:1"]);
    wait_listed(&c, "nodes", "n1");
    drop(agent);

    // A new token with the db type: the agent joins again and serves the database.
    let db_token = token(&c, "node,db");
    let agent = spawn_agent(
        &c,
        &data,
        &log,
        &["--token", &db_token, "--db", "pg1=postgres://127.0.0.1:1"],
    );
    wait_listed(&c, "dbs", "pg1");
    // The new host replaced the old record of its name (not listed as "not connected").
    let status = ok(c.admin(&["status"], None));
    assert_eq!(host_lines(&status, "n1").len(), 1, "{status}");
    drop(agent);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("joining again"), "{text}");
    let host_id = |text: &str| {
        text.split("as host ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string)
    };
    let joined = host_id(&text).unwrap_or_else(|| panic!("{text}"));

    // The same token again is a plain restart (no second join).
    let agent = spawn_agent(
        &c,
        &data,
        &log,
        &["--token", &db_token, "--db", "pg1=postgres://127.0.0.1:1"],
    );
    wait_listed(&c, "dbs", "pg1");
    drop(agent);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("joining again"), "{text}");

    // A token that does not work stops the agent with the reason; the identity is kept.
    let mut agent = spawn_agent(&c, &data, &log, &["--token", "not-a-token"]);
    let (code, text) = exits(&mut agent, &log);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("join token is not valid")
            && text.contains(&format!("stored identity (host {joined}) is unchanged")),
        "{text}"
    );
}

/// The lines of `jaunt status --data-dir` about agent `name`.
fn host_lines(status: &str, name: &str) -> Vec<String> {
    status
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(name))
        .map(str::to_string)
        .collect()
}

/// `jaunt rm node/NAME` was refused ("cannot remove node"), and a stopped agent stayed listed as
/// "not connected" forever. It removes a node that is not connected now, and refuses a
/// connected one with what to do instead.
#[test]
fn rm_node_removes_a_stopped_agent() {
    let c = Cluster::dev();
    let data = c.dir.path().join("agent-data");
    let log = c.dir.path().join("agent.log");
    let t = token(&c, "node");
    let agent = spawn_agent(&c, &data, &log, &["--token", &t, "--ssh", "127.0.0.1:1"]);
    wait_listed(&c, "nodes", "n1");
    let err = fails(c.admin(&["rm", "node/n1"], None));
    assert!(
        err.contains("node n1 is connected") && err.contains("jaunt lock --node n1"),
        "{err}"
    );
    drop(agent);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let status = ok(c.admin(&["status"], None));
        let lines = host_lines(&status, "n1");
        if lines.len() == 1 && lines[0].ends_with("not connected") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = ok(c.admin(&["rm", "node/n1"], None));
    assert!(out.contains("node n1 removed"), "{out}");
    let status = ok(c.admin(&["status"], None));
    assert!(host_lines(&status, "n1").is_empty(), "{status}");
    let err = fails(c.admin(&["rm", "node/n1"], None));
    assert!(err.contains("no such node: n1"), "{err}");
    let events = ok(c.admin(
        &[
            "audit",
            "search",
            "--type",
            "host.remove",
            "--format",
            "json",
        ],
        None,
    ));
    assert!(events.contains("\"host_name\": \"n1\""), "{events}");
}
