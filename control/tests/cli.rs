//! End-to-end tests of the control plane through the real `jaunt` binary, OpenSSH's
//! `ssh-keygen` and OpenSSL's `openssl`, on 127.0.0.1 with kernel-chosen ports.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use jaunt_config::api::{Certs, JoinRequest};
use jaunt_control::ca::LocalKeys;
use jaunt_control::client::{Client, ClientError, Trust};
use support::*;

const PASSWORD: &str = "correct horse battery";

fn add_alice(c: &Cluster) {
    let out = ok(c.admin(
        &[
            "users",
            "add",
            "alice",
            "--roles",
            "access",
            "--logins",
            "alice,root",
            "--password-stdin",
        ],
        Some(&format!("{PASSWORD}\n")),
    ));
    assert!(out.contains("User alice created"), "{out}");
}

#[test]
fn dev_cluster_login_status_and_certificates() {
    let c = Cluster::dev();
    assert!(
        c.stdout_lines
            .iter()
            .any(|l| l.contains("jaunt login --proxy")),
        "banner tells how to log in"
    );
    let pw = std::fs::read_to_string(c.data_dir.join("admin-password")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(c.data_dir.join("admin-password"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // The dev admin can log in with the written password.
    let out = ok(c.login("admin", pw.trim(), &[]));
    assert!(out.contains("Logged in to"), "{out}");

    add_alice(&c);
    let out = ok(c.login("alice", PASSWORD, &[]));
    assert!(out.contains("user:      alice"), "{out}");

    let status = ok(c.run(&["status"], None));
    assert!(status.contains("user:      alice"), "{status}");
    assert!(status.contains("roles:     access"), "{status}");
    assert!(status.contains("logins:    alice, root"), "{status}");
    assert!(
        status.contains("valid for 11h") || status.contains("valid for 12h"),
        "{status}"
    );

    // Key files are private.
    for f in ["alice.key", "alice.crt", "alice-ssh", "alice-ssh-cert.pub"] {
        let mode = std::fs::metadata(c.keys_dir().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }

    // OpenSSH reads the SSH certificate: key id, principals, extensions.
    let cert = c.keys_dir().join("alice-ssh-cert.pub");
    let listing = tool("ssh-keygen", &["-L", "-f", cert.to_str().unwrap()]);
    assert!(listing.contains("user certificate"), "{listing}");
    assert!(listing.contains("Key ID: \"alice\""), "{listing}");
    let principals: Vec<&str> = listing
        .split("Principals:")
        .nth(1)
        .unwrap()
        .split("Critical Options:")
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(principals, ["alice", "root"], "{listing}");
    assert!(listing.contains("permit-pty"), "{listing}");
    assert!(listing.contains("roles@jaunt.dev"), "{listing}");

    // OpenSSL reads the X.509 certificate: subject, the identity extension, ~12 h validity.
    let crt = c.keys_dir().join("alice.crt");
    let text = tool(
        "openssl",
        &["x509", "-noout", "-text", "-in", crt.to_str().unwrap()],
    );
    assert!(
        text.contains("CN = alice") || text.contains("CN=alice"),
        "{text}"
    );
    assert!(text.contains("1.3.6.1.4.1.59999.1.1"), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    // The certificate chains to the user CA.
    let ca = c.dir.path().join("user-ca.pem");
    std::fs::write(
        &ca,
        ok(c.admin(&["ca", "export", "--type", "user-tls"], None)),
    )
    .unwrap();
    let verify = tool(
        "openssl",
        &[
            "verify",
            "-CAfile",
            ca.to_str().unwrap(),
            crt.to_str().unwrap(),
        ],
    );
    assert!(verify.contains(": OK"), "{verify}");

    // Logout removes the keys; status then says so and fails.
    assert!(ok(c.run(&["logout"], None)).contains("Logged out"));
    assert!(!c.keys_dir().join("alice.key").exists());
    assert!(fails(c.run(&["status"], None)).contains("Not logged in"));
}

#[test]
fn the_engine_serves_the_public_port() {
    let c = Cluster::dev();
    // Web endpoint through the engine, TLS from the host CA.
    let ca = c.dir.path().join("host-ca.pem");
    std::fs::write(
        &ca,
        ok(c.admin(&["ca", "export", "--type", "host-tls"], None)),
    )
    .unwrap();
    let port = c.public_addr.rsplit_once(':').unwrap().1;
    let ping = tool(
        "curl",
        &[
            "-sS",
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &format!("127.0.0.1:{port}:127.0.0.1"),
            &format!("https://127.0.0.1:{port}/webapi/ping"),
        ],
    );
    assert!(ping.contains("dev.jaunt.local"), "{ping}");
    // Diagnostics: ready, and the refusal of an unknown ALPN is counted.
    let diag = c.diag_addr().expect("banner prints the metrics address");
    let ready = tool(
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{diag}/readyz"),
        ],
    );
    assert_eq!(ready, "200");
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &c.public_addr, "-alpn", "not-jaunt"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ALPN protocol: not-jaunt"));
    let metrics = tool("curl", &["-sS", &format!("http://{diag}/metrics")]);
    // Summed over shards: the kernel picks the shard.
    let n: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("jaunt_connections_refused_total") && l.contains("unknown_alpn"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert!(n >= 1.0, "unknown_alpn refusals counted: {metrics}");

    // SIGHUP re-issues the public port's certificate without a restart.
    let before = served_serial(&c.public_addr);
    assert!(before.starts_with("serial="), "{before:?}");
    std::process::Command::new("kill")
        .args(["-HUP", &c.child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while served_serial(&c.public_addr) == before {
        assert!(
            Instant::now() < deadline,
            "certificate never changed after SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Still serving logins afterwards.
    add_alice(&c);
    ok(c.login("alice", PASSWORD, &[]));
}

/// The serial number of the certificate the engine presents on the web route.
fn served_serial(addr: &str) -> String {
    use std::io::Write as _;
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-connect", addr])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let mut x509 = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    x509.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let o = x509.wait_with_output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn wrong_password_is_refused_and_rate_limited() {
    let c = Cluster::dev();
    add_alice(&c);
    let err = fails(c.login("alice", "not the password", &[]));
    assert!(err.contains("invalid user name or password"), "{err}");
    let err = fails(c.login("nobody", "not the password", &[]));
    assert!(
        err.contains("invalid user name or password"),
        "unknown users look the same: {err}"
    );
    for _ in 0..4 {
        fails(c.login("alice", "not the password", &[]));
    }
    let err = fails(c.login("alice", PASSWORD, &[]));
    assert!(err.contains("too many failed logins"), "{err}");
    // The failures are audited.
    let audit = ok(c.admin(
        &[
            "audit",
            "search",
            "--type",
            "user.login.failed",
            "--format",
            "json",
        ],
        None,
    ));
    let events: Vec<serde_json::Value> = serde_json::from_str(&audit).unwrap();
    assert!(events.len() >= 6, "{audit}");
    assert!(events.iter().all(|e| e["code"] == "JA1000W"));
}

#[test]
fn pin_mismatch_and_unknown_ca_are_explained() {
    let c = Cluster::dev();
    add_alice(&c);
    let wrong = format!("sha256:{}", "00".repeat(32));
    let err = fails(c.run(
        &[
            "login",
            "--proxy",
            &c.public_addr,
            "--user",
            "alice",
            "--password-stdin",
            "--ca-pin",
            &wrong,
        ],
        Some(PASSWORD),
    ));
    assert!(err.contains("--ca-pin"), "{err}");
    let err = fails(c.run(
        &[
            "login",
            "--proxy",
            &c.public_addr,
            "--user",
            "alice",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    assert!(err.contains("--ca-pin"), "{err}");
    // --insecure works (for throwaway clusters), and afterwards the stored CA is trusted.
    ok(c.run(
        &[
            "login",
            "--proxy",
            &c.public_addr,
            "--user",
            "alice",
            "--password-stdin",
            "--insecure",
        ],
        Some(PASSWORD),
    ));
    ok(c.run(
        &[
            "login",
            "--proxy",
            &c.public_addr,
            "--user",
            "alice",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
}

fn join(c: &Cluster, token: &str, host: &str) -> Result<Certs, ClientError> {
    let client = Client::new(&c.public_addr, Trust::Pin(c.pin.clone()), None).unwrap();
    let keys = LocalKeys::generate().unwrap();
    client.post_json(
        "/v1/join",
        &JoinRequest {
            token: token.to_string(),
            host_name: host.to_string(),
            tls_public_key: keys.tls_public_pem.clone(),
            ssh_public_key: keys.ssh_public_line(),
        },
    )
}

#[test]
fn join_tokens_work_once_or_until_they_expire() {
    let c = Cluster::dev();
    let out = ok(c.admin(
        &["tokens", "add", "--type", "node,db", "--single-use"],
        None,
    ));
    let token = out.lines().next().unwrap().trim().to_string();
    assert_eq!(token.len(), 32, "first line is the token alone: {out}");
    assert!(
        out.contains(&format!(
            "jaunt agent --proxy {} --token {token} --ca-pin {}",
            c.public_addr, c.pin
        )),
        "{out}"
    );

    let certs = join(&c, &token, "node1").unwrap();
    assert_eq!(certs.identity.roles, ["node", "db"]);
    assert!(certs.identity.logins.contains(&"node1".to_string()));
    let err = join(&c, &token, "node2").unwrap_err();
    assert!(err.to_string().contains("not valid"), "single use: {err}");

    // The joined host shows in status, not connected (no agent runs); `get nodes` lists only
    // connected nodes.
    let status = ok(c.admin(&["status"], None));
    assert!(status.contains("node1"), "{status}");
    assert!(status.contains(&c.pin), "{status}");
    assert!(status.contains("1 joined, 0 connected"), "{status}");
    assert!(!ok(c.admin(&["get", "nodes"], None)).contains("node1"));

    // An expired token is refused with a clear message. The token lives one second; the loop
    // waits for the server's clock to pass it, bounded.
    let out = ok(c.admin(&["tokens", "add", "--type", "node", "--ttl", "1s"], None));
    let short = out.lines().next().unwrap().trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match join(&c, &short, "late") {
            Err(e) => break e,
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Ok(_) => panic!("token never expired"),
        }
    };
    assert!(err.to_string().contains("expired"), "{err}");

    // tokens ls shows ids, never the secret, and drops expired tokens; rm by id.
    let out = ok(c.admin(&["tokens", "add", "--type", "app"], None));
    let long = out.lines().next().unwrap().trim().to_string();
    let ls = ok(c.admin(&["tokens", "ls", "--format", "json"], None));
    assert!(!ls.contains(&long));
    let list: Vec<serde_json::Value> = serde_json::from_str(&ls).unwrap();
    assert_eq!(list.len(), 1, "expired and used tokens are gone: {ls}");
    let id = list[0]["id"].as_str().unwrap().to_string();
    ok(c.admin(&["tokens", "rm", &id], None));
    let err = join(&c, &long, "removed").unwrap_err();
    assert!(err.to_string().contains("not valid"), "{err}");
    let events = ok(c.admin(
        &["audit", "search", "--type", "host.join", "--format", "json"],
        None,
    ));
    assert!(events.contains("node1"), "{events}");
}

#[test]
fn ca_export_and_sign_host_feed_openssh() {
    let c = Cluster::dev();
    let user_ssh = ok(c.admin(&["ca", "export", "--type", "user-ssh"], None));
    assert!(user_ssh.starts_with("ssh-ed25519 "), "{user_ssh}");
    let host_ssh = ok(c.admin(&["ca", "export", "--type", "host-ssh"], None));
    assert!(
        host_ssh.starts_with("@cert-authority * ssh-ed25519 "),
        "{host_ssh}"
    );
    let host_tls = ok(c.admin(&["ca", "export", "--type", "host-tls"], None));
    assert!(
        host_tls.starts_with("-----BEGIN CERTIFICATE-----"),
        "{host_tls}"
    );
    let err = fails(c.admin(&["ca", "export", "--type", "nope"], None));
    assert!(err.contains("expected user-ssh"), "{err}");

    let out_dir = c.dir.path().join("hostkeys");
    ok(c.admin(
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
    for f in ["node1", "node1.pub", "node1-cert.pub"] {
        assert!(out_dir.join(f).exists(), "{f}");
    }
    let listing = tool(
        "ssh-keygen",
        &["-L", "-f", out_dir.join("node1-cert.pub").to_str().unwrap()],
    );
    assert!(listing.contains("host certificate"), "{listing}");
    assert!(listing.contains("node1"), "{listing}");
    // The certificate is signed by the exported host CA key.
    let ca_key = host_ssh.trim().trim_start_matches("@cert-authority * ");
    let ca_b64 = ca_key.split_whitespace().nth(1).unwrap();
    assert!(listing.contains("Signing CA: ED25519"), "{listing}");
    let fp_file = c.dir.path().join("hostca.pub");
    std::fs::write(&fp_file, format!("{ca_key}\n")).unwrap();
    let fp = tool("ssh-keygen", &["-l", "-f", fp_file.to_str().unwrap()]);
    let fp = fp.split_whitespace().nth(1).unwrap();
    assert!(
        listing.contains(fp),
        "signed by the host CA {fp} ({ca_b64}): {listing}"
    );
}

#[test]
fn roles_round_trip_through_yaml_and_editor_rules_are_enforced() {
    let c = Cluster::dev();
    let roles_yaml = ok(c.admin(&["get", "roles", "--format", "yaml"], None));
    assert!(roles_yaml.contains("kind: role"), "{roles_yaml}");
    assert!(roles_yaml.contains("name: access"), "{roles_yaml}");

    let file = c.dir.path().join("dba.yaml");
    std::fs::write(
        &file,
        "kind: role\nversion: v1\nmetadata:\n  name: dba\nspec:\n  options:\n    max_session_ttl: 1h\n  allow:\n    logins: [postgres]\n    db_users: ['{{internal.db_users}}']\n",
    )
    .unwrap();
    let out = ok(c.admin(&["create", "-f", file.to_str().unwrap()], None));
    assert!(out.contains("role dba created"), "{out}");
    let out = ok(c.admin(&["create", "-f", file.to_str().unwrap()], None));
    assert!(out.contains("role dba updated"), "{out}");

    ok(c.admin(
        &[
            "users",
            "add",
            "bob",
            "--roles",
            "dba",
            "--db-users",
            "bob_ro",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    let out = ok(c.login("bob", PASSWORD, &[]));
    assert!(out.contains("logins:    postgres"), "{out}");
    assert!(out.contains("db users:  bob_ro"), "{out}");
    assert!(
        out.contains("valid for 1h0m") || out.contains("valid for 59m"),
        "max_session_ttl caps the TTL: {out}"
    );

    // bob has no editor role: admin verbs through his login are refused with the reason.
    let err = fails(c.run(&["users", "ls"], None));
    assert!(err.contains("access denied"), "{err}");
    // A role in use cannot be removed; after removing the user it can.
    assert!(fails(c.admin(&["rm", "role/dba"], None)).contains("still assigned"));
    ok(c.admin(&["users", "rm", "bob"], None));
    ok(c.admin(&["rm", "role/dba"], None));

    // A bad resource file names the line and the key.
    std::fs::write(
        &file,
        "kind: role\nversion: v1\nmetadata:\n  name: x\nspec:\n  allow:\n    lgins: [a]\n",
    )
    .unwrap();
    let err = fails(c.admin(&["create", "-f", file.to_str().unwrap()], None));
    assert!(err.contains("dba.yaml:7:5"), "{err}");
    assert!(err.contains("lgins"), "{err}");
}

#[test]
fn second_factor_is_required_outside_dev_mode() {
    let c = Cluster::with_config(
        "cluster_name: otp.test\n\
         data_dir: DATA_DIR\n\
         control:\n  listen_addr: 127.0.0.1:0\n\
         engine:\n  public_addr: 127.0.0.1:0\n  listen_addr: 127.0.0.1:0\n  diag_addr: 127.0.0.1:0\n",
    );
    let out = ok(c.admin(
        &[
            "users",
            "add",
            "carol",
            "--roles",
            "access",
            "--password-stdin",
            "--format",
            "json",
        ],
        Some(PASSWORD),
    ));
    let creds: serde_json::Value = serde_json::from_str(&out).unwrap();
    let secret = creds["otp_secret"]
        .as_str()
        .expect("otp secret issued")
        .to_string();
    assert!(creds["otp_url"]
        .as_str()
        .unwrap()
        .starts_with("otpauth://totp/"));

    let err = fails(c.login("carol", PASSWORD, &[]));
    assert!(err.contains("--otp"), "{err}");
    let err = fails(c.login("carol", PASSWORD, &["--otp", "000000"]));
    // 000000 could be right once in a million: accept that flake-free by checking the code.
    let now = jaunt_config::identity::unix_now();
    let valid = [now - 30, now, now + 30]
        .iter()
        .any(|t| jaunt_control::auth::otp_code(&secret, *t).unwrap() == "000000");
    if !valid {
        assert!(err.contains("invalid one-time code"), "{err}");
    }
    let code = jaunt_control::auth::otp_code(&secret, jaunt_config::identity::unix_now()).unwrap();
    let out = ok(c.login("carol", PASSWORD, &["--otp", &code]));
    assert!(out.contains("Logged in to otp.test as carol"), "{out}");
}

#[test]
fn bad_config_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jaunt.yaml");
    std::fs::write(&path, "cluster_name: x\ncontrol:\n  listen_addr: 127.0.0.1:0\nengine:\n  public_addr: 127.0.0.1:0\n  shards: lots\n").unwrap();
    let out = run_jaunt(
        dir.path(),
        &["start", "--config", path.to_str().unwrap()],
        None,
    );
    let err = fails(out);
    assert!(err.contains("jaunt.yaml:6:"), "{err}");
    assert!(err.contains("engine.shards"), "{err}");
    assert!(err.contains("expected a number or \"auto\""), "{err}");

    let err = fails(run_jaunt(dir.path(), &["start"], None));
    assert!(err.contains("--dev") && err.contains("--config"), "{err}");
}

#[test]
fn sigterm_stops_cleanly_and_state_survives_restart() {
    let mut c = Cluster::dev();
    add_alice(&c);
    let status = c.terminate();
    assert!(status.success(), "SIGTERM exits 0: {status}");

    let store = jaunt_control::store::Store::open(&c.data_dir.join("jaunt.db")).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    assert!(store.get_user("alice").unwrap().is_some());
    drop(store);

    // Restart on the same data dir: same CA, alice still logs in.
    let c2 = Cluster::dev_on(&c.data_dir);
    assert_eq!(c2.pin, c.pin, "CAs persist across restarts");
    ok(c2.login("alice", PASSWORD, &[]));
}

/// `THP_enabled` of a process's `/proc/PID/status`: whether the kernel may give it transparent
/// huge pages.
fn thp_enabled(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no THP_enabled in /proc/{pid}/status: {status}"))
}

#[test]
fn the_daemon_runs_without_transparent_huge_pages_unless_asked() {
    // The daemon turns THP off for itself (a reconnect storm's new daemon spent about a fifth of
    // its CPU zeroing huge pages) ...
    let c = Cluster::dev();
    assert_eq!(thp_enabled(c.child.id()), "0", "jaunt start");
    // ... unless the operator set mimalloc's switch: then mimalloc decides (1: huge pages).
    let kept = Cluster::dev_env("127.0.0.1:0", &[("MIMALLOC_ALLOW_THP", "1")]);
    assert_eq!(
        thp_enabled(kept.child.id()),
        "1",
        "jaunt start with MIMALLOC_ALLOW_THP=1"
    );
}

#[test]
fn kill_9_leaves_a_store_that_opens_and_passes_integrity_check() {
    let c = Cluster::dev();
    // Writers in flight while the process dies: token creations through the API.
    let mut writers = Vec::new();
    for _ in 0..4 {
        let home = c.home.clone();
        let dd = c.data_dir.display().to_string();
        writers.push(std::thread::spawn(move || {
            for _ in 0..20 {
                let _ = run_jaunt(
                    &home,
                    &["tokens", "add", "--type", "node", "--data-dir", &dd],
                    None,
                );
            }
        }));
    }
    // Kill once some writes have landed (observed through the store, not a timer).
    let db = c.data_dir.join("jaunt.db");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let store = jaunt_control::store::Store::open(&db).unwrap();
        if store.list_tokens().unwrap().len() >= 5 || Instant::now() > deadline {
            break;
        }
        drop(store);
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut c = c;
    c.child.kill().unwrap(); // SIGKILL
    c.child.wait().unwrap();
    for w in writers {
        w.join().unwrap();
    }
    let store = jaunt_control::store::Store::open(&db).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    assert!(store.list_tokens().unwrap().len() >= 5);
}

#[test]
fn help_reads_like_a_real_tool() {
    let dir = tempfile::tempdir().unwrap();
    let help = ok(run_jaunt(dir.path(), &["--help"], None));
    for verb in [
        "start", "login", "logout", "status", "users", "tokens", "create", "get", "rm", "ca",
    ] {
        assert!(help.contains(verb), "{verb} missing from --help:\n{help}");
    }
    let help = ok(run_jaunt(dir.path(), &["tokens", "add", "--help"], None));
    assert!(
        help.contains("--single-use") && help.contains("--ttl") && help.contains("--type"),
        "{help}"
    );
    let err = fails(run_jaunt(dir.path(), &["users", "ls"], None));
    assert!(err.contains("not logged in"), "{err}");
}

#[test]
fn a_lock_refuses_new_logins_until_removed() {
    let c = Cluster::dev();
    add_alice(&c);
    let out = ok(c.admin(
        &[
            "lock",
            "--user",
            "alice",
            "--message",
            "incident 42",
            "--ttl",
            "1h",
        ],
        None,
    ));
    assert!(out.contains("Locked user alice"), "{out}");
    let err = fails(c.login("alice", PASSWORD, &[]));
    assert!(
        err.contains("locked") && err.contains("incident 42"),
        "{err}"
    );
    let locks: Vec<serde_json::Value> =
        serde_json::from_str(&ok(c.admin(&["get", "locks", "--format", "json"], None))).unwrap();
    assert_eq!(locks.len(), 1);
    let id = locks[0]["metadata"]["name"].as_str().unwrap().to_string();
    ok(c.admin(&["rm", &format!("lock/{id}")], None));
    ok(c.login("alice", PASSWORD, &[]));
    let events = ok(c.admin(
        &[
            "audit",
            "search",
            "--type",
            "lock.create",
            "--format",
            "json",
        ],
        None,
    ));
    assert!(events.contains("alice"), "{events}");
    let err = fails(c.admin(&["lock"], None));
    assert!(err.contains("--user"), "{err}");
}

/// Root hides locked-memory problems (CAP_IPC_LOCK): the daemon must start, engine shards and
/// all, as an ordinary user under this machine's `ulimit -l`. Run as `nobody` when the tests
/// run as root (setpriv drops every capability), as the current user otherwise.
#[test]
fn a_dev_cluster_starts_as_an_unprivileged_user() {
    use std::io::BufRead as _;
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    // A copy of the binary where `nobody` can surely execute it.
    let bin = dir.path().join("jaunt");
    std::fs::copy(jaunt_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.path().join("data");
    let args = [
        "start",
        "--dev",
        "--data-dir",
        data.to_str().unwrap(),
        "--public-addr",
        "127.0.0.1:0",
    ];
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let mut cmd = if root {
        let mut c = std::process::Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(&bin);
        c
    } else {
        std::process::Command::new(&bin)
    };
    let mut child = cmd
        .args(args)
        .env("JAUNT_HOME", dir.path().join("home"))
        .env_remove("JAUNT_DATA_DIR")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut started = false;
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if line.starts_with("Admin commands on this host") {
            started = true;
            break;
        }
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(
        started,
        "jaunt start --dev did not come up as an unprivileged user: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
