//! CA rotation end to end (issue 13) with real OpenSSH: a dev cluster, a `jaunt agent` process
//! serving a real sshd, `jaunt ssh` sessions, and `jaunt ca rotate` through every phase. sshd's
//! `TrustedUserCAKeys` is rewritten from `jaunt ca export` as an operator would; its host
//! certificate is re-signed with `jaunt ca sign-host`. Phase changes that wait for the agent
//! to confirm are retried with a deadline (the agent polls every 5 s), never slept for.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::*;

/// `jaunt ca rotate --type TY --phase PHASE`, retried while the agent has not confirmed the
/// previous phase (the refusal names it), bounded.
fn rotate(c: &Cluster, ty: &str, phase: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = c.admin(&["ca", "rotate", "--type", ty, "--phase", phase], None);
        if o.status.success() {
            return stdout(&o);
        }
        let err = stderr(&o);
        assert!(
            err.contains("have not confirmed") && Instant::now() < deadline,
            "ca rotate --type {ty} --phase {phase}: {err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn sshd_dir(c: &Cluster) -> PathBuf {
    c.dir.path().join("sshd-node1")
}

/// What an operator does after each phase change: TrustedUserCAKeys from `jaunt ca export`.
/// Returns how many CA keys it holds.
fn rewrite_trusted_user_cas(c: &Cluster) -> usize {
    let text = ok(c.admin(&["ca", "export", "--type", "user-ssh"], None));
    std::fs::write(sshd_dir(c).join("user_ca.pub"), &text).unwrap();
    text.lines()
        .filter(|l| l.starts_with("ssh-ed25519 "))
        .count()
}

/// `jaunt ssh root@node1 -- echo PHASE` as the user whose `$JAUNT_HOME` is `home`.
fn ssh_echo(home: &Path, word: &str) -> std::process::Output {
    run_jaunt(home, &["ssh", "root@node1", "--", "echo", word], None)
}

#[track_caller]
fn assert_ssh_works(home: &Path, word: &str) {
    let o = ssh_echo(home, word);
    assert!(
        o.status.success() && stdout(&o).trim() == word,
        "ssh in {word}: {} {}",
        stdout(&o),
        stderr(&o)
    );
}

/// A live `jaunt ssh root@node1 -- cat` session: each line written comes back.
struct LiveSession {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl LiveSession {
    fn open(home: &Path) -> LiveSession {
        let mut child = Command::new(jaunt_bin())
            .args(["ssh", "root@node1", "--", "cat"])
            .env("JAUNT_HOME", home)
            .env("HOME", home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut s = LiveSession { child, lines };
        s.echo("open");
        s
    }

    #[track_caller]
    fn echo(&mut self, word: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{word}").unwrap();
        stdin.flush().unwrap();
        let got = self
            .lines
            .recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("live session did not echo {word:?}: {e}"));
        assert_eq!(got, word);
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The SHA-256 fingerprint of the CA that signed the SSH certificate of `home`'s user.
fn ssh_cert_signer(cert: &Path) -> String {
    let text = tool("ssh-keygen", &["-L", "-f", cert.to_str().unwrap()]);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Signing CA: "))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .to_string()
}

fn status(c: &Cluster) -> serde_json::Value {
    serde_json::from_str(&ok(c.admin(&["status", "--format", "json"], None))).unwrap()
}

/// (phase, fingerprint, additional) of CA `ty` (e.g. `user-ssh`) in `jaunt status`.
fn ca_state(c: &Cluster, ty: &str) -> (String, String, Option<String>) {
    let st = status(c);
    let ca = st["cas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|ca| ca["type"] == ty)
        .unwrap()
        .clone();
    (
        ca["phase"].as_str().unwrap().to_string(),
        ca["fingerprint"].as_str().unwrap().to_string(),
        ca["additional"].as_str().map(str::to_string),
    )
}

/// Copies a `$JAUNT_HOME` (a user's keys as they are now) to `to`.
fn snapshot_home(from: &Path, to: &Path) {
    let o = Command::new("cp")
        .args(["-a", from.to_str().unwrap(), to.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn user_ca_rotation_through_every_phase_keeps_ssh_and_live_sessions() {
    let (c, _sshd, agent) = ssh_setup();
    let (phase, old_fp, extra) = ca_state(&c, "user-ssh");
    assert_eq!((phase.as_str(), extra), ("standby", None));
    // Alice's keys from before the rotation: an old-CA certificate, kept for later.
    let old_home = c.dir.path().join("old-home");
    snapshot_home(&c.home, &old_home);
    let mut live = LiveSession::open(&c.home);

    // init: a new CA, trusted beside the old one everywhere; the old one still signs.
    let out = rotate(&c, "user", "init");
    assert!(out.contains("user CA: phase init"), "{out}");
    let (phase, fp, new_fp) = ca_state(&c, "user-ssh");
    assert_eq!((phase.as_str(), fp.as_str()), ("init", old_fp.as_str()));
    let new_fp = new_fp.expect("both pins during the rotation");
    // The text status shows the phase and both X.509 pins.
    let (_, old_pin, new_pin) = ca_state(&c, "user-tls");
    let text = ok(c.admin(&["status"], None));
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("user ") && l.contains(" init "))
        .unwrap_or_else(|| panic!("no user init line: {text}"));
    assert!(
        line.contains(&old_pin) && line.contains(&new_pin.unwrap()),
        "{line}"
    );
    assert_eq!(rewrite_trusted_user_cas(&c), 2);
    assert_ssh_works(&c.home, "init");
    live.echo("after-init");

    // update_clients: new certificates come from the new CA, and the old ones still work.
    rotate(&c, "user", "update_clients");
    ok(c.login("alice", PASSWORD, &[]));
    let cert = c.keys_dir().join("alice-ssh-cert.pub");
    assert_eq!(
        ssh_cert_signer(&cert),
        new_fp,
        "a login after update_clients"
    );
    assert_ssh_works(&c.home, "update_clients");
    assert_ssh_works(&old_home, "old-cert");
    live.echo("after-update-clients");

    rotate(&c, "user", "update_servers");
    assert_ssh_works(&c.home, "update_servers");
    live.echo("after-update-servers");

    // standby: the old CA is gone from every verifier.
    rotate(&c, "user", "standby");
    assert_eq!(rewrite_trusted_user_cas(&c), 1);
    let (phase, fp, extra) = ca_state(&c, "user-ssh");
    assert_eq!(
        (phase.as_str(), fp.as_str(), extra),
        ("standby", new_fp.as_str(), None)
    );
    assert_ssh_works(&c.home, "standby");
    live.echo("after-standby");
    // The engine refuses the old certificate ...
    let o = ssh_echo(&old_home, "refused");
    assert!(
        !o.status.success(),
        "old cert after standby: {}",
        stdout(&o)
    );
    // ... and so does sshd, straight, with TrustedUserCAKeys from the export.
    let (host, port) = _sshd.addr.rsplit_once(':').unwrap();
    let old_keys = old_home.join("keys");
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
            old_keys.join("alice-ssh").to_str().unwrap(),
            "-o",
            &format!(
                "CertificateFile={}",
                old_keys.join("alice-ssh-cert.pub").display()
            ),
            "-p",
            port,
            &format!("root@{host}"),
            "true",
        ])
        .output()
        .unwrap();
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // No phase change without a rotation, and every change is audited.
    let o = c.admin(
        &["ca", "rotate", "--type", "user", "--phase", "rollback"],
        None,
    );
    assert!(
        stderr(&o).contains("no rotation is in progress"),
        "{}",
        stderr(&o)
    );
    let events = c.audit_events(Some("ca.rotate"));
    let phases: Vec<_> = events
        .iter()
        .filter(|e| e["ca"] == "user")
        .map(|e| e["phase"].as_str().unwrap().to_string())
        .collect();
    for p in ["init", "update_clients", "update_servers", "standby"] {
        assert!(phases.iter().any(|x| x == p), "{p} not audited: {phases:?}");
    }
    live.echo("still-alive");

    // An agent that cannot confirm (stopped) blocks the next phase change, by name, until
    // --force; once it runs again it catches up by itself.
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&c)["hosts"][0]["ca_phase_confirmed"] != true {
        assert!(
            Instant::now() < deadline,
            "the agent never confirmed standby"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = agent.0.id().to_string();
    tool("kill", &["-STOP", &pid]);
    rotate(&c, "user", "init");
    let o = c.admin(
        &[
            "ca",
            "rotate",
            "--type",
            "user",
            "--phase",
            "update_clients",
        ],
        None,
    );
    tool("kill", &["-CONT", &pid]);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("have not confirmed") && err.contains("--force"),
        "{err}"
    );
    let host_id = status(&c)["hosts"][0]["id"].as_str().unwrap().to_string();
    assert!(err.contains(&host_id), "names the agent: {err}");
    ok(c.admin(
        &[
            "ca",
            "rotate",
            "--type",
            "user",
            "--phase",
            "update_clients",
            "--force",
        ],
        None,
    ));
    rotate(&c, "user", "rollback");
    rotate(&c, "user", "standby");
    assert_eq!(ca_state(&c, "user-ssh").1, new_fp);
    assert_ssh_works(&c.home, "after-forced-rollback");
}

#[test]
fn user_ca_rollback_from_update_servers_returns_to_the_old_ca() {
    let (c, _sshd, _agent) = ssh_setup();
    let (_, old_fp, _) = ca_state(&c, "user-ssh");
    let mut live = LiveSession::open(&c.home);
    rotate(&c, "user", "init");
    assert_eq!(rewrite_trusted_user_cas(&c), 2);
    rotate(&c, "user", "update_clients");
    // A certificate of the new CA, which the rollback will make worthless.
    ok(c.login("alice", PASSWORD, &[]));
    let new_home = c.dir.path().join("new-home");
    snapshot_home(&c.home, &new_home);
    rotate(&c, "user", "update_servers");
    assert_ssh_works(&c.home, "update_servers");

    let out = rotate(&c, "user", "rollback");
    assert!(out.contains("phase rollback"), "{out}");
    assert_eq!(
        ca_state(&c, "user-ssh").1,
        old_fp,
        "rollback signs with the old CA"
    );
    ok(c.login("alice", PASSWORD, &[]));
    assert_eq!(
        ssh_cert_signer(&c.keys_dir().join("alice-ssh-cert.pub")),
        old_fp
    );
    assert_ssh_works(&c.home, "rollback");
    assert_ssh_works(&new_home, "new-cert-during-rollback");
    live.echo("after-rollback");

    rotate(&c, "user", "standby");
    assert_eq!(rewrite_trusted_user_cas(&c), 1);
    let (phase, fp, extra) = ca_state(&c, "user-ssh");
    assert_eq!(
        (phase.as_str(), fp.as_str(), extra),
        ("standby", old_fp.as_str(), None)
    );
    assert_ssh_works(&c.home, "standby");
    assert!(!ssh_echo(&new_home, "refused").status.success());
    live.echo("after-standby");
}

/// The SSH certificate file of the agent's host identity (`DATA/host/keys/<id>-ssh-cert.pub`).
fn agent_ssh_cert(data: &Path) -> PathBuf {
    std::fs::read_dir(data.join("host").join("keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("-ssh-cert.pub"))
        .unwrap()
}

fn cert_authority_lines(home: &Path) -> usize {
    std::fs::read_to_string(home.join("keys").join("known_hosts"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("@cert-authority * ssh-ed25519 "))
        .count()
}

#[test]
fn host_ca_rotation_with_sshd_re_signed_and_known_hosts_working() {
    let (c, sshd, (agent, agent_data)) = ssh_setup();
    let (_, old_fp, _) = ca_state(&c, "host-ssh");
    assert_eq!(cert_authority_lines(&c.home), 1);
    let old_home = c.dir.path().join("old-home");
    snapshot_home(&c.home, &old_home);
    let mut live = LiveSession::open(&c.home);

    rotate(&c, "host", "init");
    let new_fp = ca_state(&c, "host-ssh").2.unwrap();
    // The agent trusts both host CAs for the engine's certificate (from its policy poll).
    let host_ca = agent_data.join("host").join("keys").join("host-ca.pem");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&host_ca)
        .unwrap_or_default()
        .matches("BEGIN CERTIFICATE")
        .count()
        != 2
    {
        assert!(
            Instant::now() < deadline,
            "the agent never got both host CAs"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A login now brings both host CAs: two @cert-authority lines in known_hosts.
    ok(c.login("alice", PASSWORD, &[]));
    assert_eq!(cert_authority_lines(&c.home), 2);
    let export = ok(c.admin(&["ca", "export", "--type", "host-ssh"], None));
    assert_eq!(export.matches("@cert-authority * ").count(), 2, "{export}");
    assert_ssh_works(&c.home, "init");

    rotate(&c, "host", "update_clients");
    assert_ssh_works(&c.home, "update_clients");

    // update_servers: the agent re-issues its host certificate by itself; the operator
    // re-signs sshd; the engine and control present certificates of the new CA.
    rotate(&c, "host", "update_servers");
    let deadline = Instant::now() + Duration::from_secs(30);
    while ssh_cert_signer(&agent_ssh_cert(&agent_data)) != new_fp {
        assert!(
            Instant::now() < deadline,
            "the agent never re-issued its host certificate"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ok(c.admin(
        &[
            "ca",
            "sign-host",
            "--host",
            "node1",
            "--out",
            sshd_dir(&c).to_str().unwrap(),
        ],
        None,
    ));
    assert_eq!(
        ssh_cert_signer(&sshd_dir(&c).join("node1-cert.pub")),
        new_fp
    );
    assert_ssh_works(&c.home, "update_servers");
    live.echo("after-update-servers");

    rotate(&c, "host", "standby");
    let (phase, fp, extra) = ca_state(&c, "host-ssh");
    assert_eq!(
        (phase.as_str(), fp.as_str(), extra),
        ("standby", new_fp.as_str(), None)
    );
    assert_ne!(fp, old_fp);
    assert_ssh_works(&c.home, "standby");
    live.echo("after-standby");
    // A profile that only knows the old host CA no longer trusts the cluster's certificates.
    assert!(!ssh_echo(&old_home, "refused").status.success());

    // The agent, restarted with the identity it renewed by itself, reconnects.
    drop(agent);
    let _agent = spawn_agent(&c, &agent_data, "node1", None, &["--ssh", &sshd.addr]);
    wait_for_ssh(&c, "root@node1");
}

/// The JWK Set the engine serves at the public address (`jaunt start --public-addr localhost:0`).
fn jwks_kids(c: &Cluster) -> Vec<String> {
    let port = c.public_addr.rsplit_once(':').unwrap().1;
    let ca = c.dir.path().join("host-ca.pem");
    std::fs::write(
        &ca,
        ok(c.admin(&["ca", "export", "--type", "host-tls"], None)),
    )
    .unwrap();
    let out = tool(
        "curl",
        &[
            "-sSf",
            "--max-time",
            "20",
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &format!("localhost:{port}:127.0.0.1"),
            &format!("https://localhost:{port}/.well-known/jwks.json"),
        ],
    );
    let set: serde_json::Value = serde_json::from_str(&out).unwrap();
    set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| format!("kid:{}", k["kid"].as_str().unwrap()))
        .collect()
}

#[test]
fn jwt_key_rotation_publishes_both_keys_and_grace_advances_the_phases() {
    let c = Cluster::dev_at("localhost:0");
    let (_, old_kid, _) = ca_state(&c, "jwt");
    assert_eq!(jwks_kids(&c), vec![old_kid.clone()]);
    rotate(&c, "jwt", "init");
    let (_, signing, new_kid) = ca_state(&c, "jwt");
    let new_kid = new_kid.unwrap();
    assert_eq!(signing, old_kid, "init still signs with the old key");
    let mut kids = jwks_kids(&c);
    kids.sort();
    let mut both = vec![old_kid.clone(), new_kid.clone()];
    both.sort();
    assert_eq!(kids, both, "verifiers get both keys at init");

    // From here the phases advance by themselves, one second apart.
    let out = ok(c.admin(
        &[
            "ca",
            "rotate",
            "--type",
            "jwt",
            "--phase",
            "update_clients",
            "--grace",
            "1s",
        ],
        None,
    ));
    assert!(out.contains("next phase at"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while ca_state(&c, "jwt").0 != "standby" {
        assert!(Instant::now() < deadline, "the grace thread never finished");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(ca_state(&c, "jwt").1, new_kid);
    assert_eq!(jwks_kids(&c), vec![new_kid]);
    let events = c.audit_events(Some("ca.rotate"));
    let auto: Vec<_> = events
        .iter()
        .filter(|e| e["ca"] == "jwt" && e["user"] == "rotation")
        .map(|e| e["phase"].as_str().unwrap().to_string())
        .collect();
    assert!(
        auto.contains(&"update_servers".to_string()) && auto.contains(&"standby".to_string()),
        "automatic phase changes are audited as `rotation`: {auto:?}"
    );
    // A grace of 0 is refused.
    let o = c.admin(&["ca", "rotate", "--type", "jwt", "--grace", "0s"], None);
    assert!(!o.status.success(), "{}", stdout(&o));
}
