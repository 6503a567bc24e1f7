//! SSH terminated and recorded at the agent (issue 10), end to end with real OpenSSH: a dev
//! cluster, `jaunt agent` joined with a token, a real `sshd` (inetd mode) and the real
//! `ssh`/`scp`. The built-in `access` role records sessions (`record_session: best_effort`),
//! so the agent is the SSH server the user's `ssh` talks to and logs in to sshd itself.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

fn spool(agent_data: &Path) -> PathBuf {
    agent_data.join("recordings")
}

/// The finished recordings, in the agent's spool or already uploaded to control (the agent's
/// uploader moves them): (metadata in the spool's shape, cast text).
fn recordings(c: &Cluster, agent_data: &Path) -> Vec<(serde_json::Value, String)> {
    let mut out = Vec::new();
    for dir in [spool(agent_data), c.data_dir.join("recordings")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let Ok(mut meta) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            if meta.get("meta").is_none() {
                // control's stored form is flat
                meta = serde_json::json!({
                    "meta": meta.clone(),
                    "end": {
                        "exit_status": meta["exit_status"],
                        "bytes_in": meta["bytes_in"],
                        "bytes_out": meta["bytes_out"],
                    },
                });
            }
            if meta.get("end").is_none() {
                continue;
            }
            let Ok(cast) = std::fs::read_to_string(path.with_extension("cast")) else {
                continue;
            };
            out.push((meta, cast));
        }
    }
    out
}

/// Polls the spool until a finished recording satisfies `check` (the agent finishes a channel's
/// recording when the channel closes, just after the user's ssh exits).
fn wait_for_recording(
    c: &Cluster,
    agent_data: &Path,
    what: &str,
    check: impl Fn(&serde_json::Value, &str) -> bool,
) -> (serde_json::Value, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(found) = recordings(c, agent_data)
            .into_iter()
            .find(|(m, c)| check(m, c))
        {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no recording {what} in {}: {:?}",
            spool(agent_data).display(),
            recordings(c, agent_data)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A recording's id, in either shape [`recordings`] gives.
fn recording_id(meta: &serde_json::Value) -> String {
    meta["id"]
        .as_str()
        .or(meta["meta"]["id"].as_str())
        .unwrap_or_else(|| panic!("no id: {meta}"))
        .to_string()
}

/// Polls the audit log until an event of type `ty` satisfies `check` (the agent posts its
/// events from a queue, shortly after they happen).
fn wait_for_event(
    c: &Cluster,
    ty: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let events = c.audit_events(Some(ty));
        if let Some(found) = events.iter().find(|e| e["event"] == ty && check(e)) {
            return found.clone();
        }
        assert!(Instant::now() < deadline, "no such {ty} event: {events:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sha256_file(path: &Path) -> String {
    tool("sha256sum", &[path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn ssh_exec_pty_and_scp_are_terminated_and_recorded_at_the_agent() {
    let (c, _sshd, (mut agent, data)) = ssh_setup();

    // exec: output and exit status reach the user; the recording has the command, its output
    // and the exit status.
    let o = c.run(
        &[
            "ssh",
            "root@node1",
            "--",
            "echo recorded-$((6*7)); echo to-stderr >&2; exit 7",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "recorded-42");
    assert!(stderr(&o).contains("to-stderr"), "{}", stderr(&o));
    let (meta, cast) = wait_for_recording(&c, &data, "of the exec", |m, c| {
        c.contains("recorded-42") && m["end"]["exit_status"] == 7
    });
    assert_eq!(meta["meta"]["kind"], "exec", "{meta}");
    assert_eq!(meta["meta"]["user"], "alice", "{meta}");
    assert_eq!(meta["meta"]["login"], "root", "{meta}");
    assert_eq!(meta["meta"]["node"], "node1", "{meta}");
    assert!(
        meta["meta"]["command"]
            .as_str()
            .is_some_and(|c| c.contains("echo recorded")),
        "{meta}"
    );
    assert!(
        cast.contains("to-stderr") && cast.contains(r#"\"status\":7"#),
        "{cast}"
    );
    let header: serde_json::Value = serde_json::from_str(cast.lines().next().unwrap()).unwrap();
    assert_eq!(header["version"], 2, "{cast}");
    // The audit log has the command with its exit status and recording, and the session's end
    // at the agent lists that recording.
    let exec_id = recording_id(&meta);
    let exec = wait_for_event(&c, "session.exec", |e| {
        e["command"]
            .as_str()
            .is_some_and(|c| c.contains("echo recorded"))
    });
    assert_eq!(exec["code"], "JA2004I", "{exec}");
    assert_eq!(exec["exit_status"], 7, "{exec}");
    assert_eq!(exec["user"], "alice", "{exec}");
    assert_eq!(exec["login"], "root", "{exec}");
    assert_eq!(exec["target"], "node1", "{exec}");
    assert_eq!(exec["recording_id"], exec_id.as_str(), "{exec}");
    assert!(exec["bytes_out"].as_u64().unwrap() >= 12, "{exec}");
    let session_id = exec["session_id"].as_str().unwrap().to_string();
    let closed = wait_for_event(&c, "session.recorded", |e| {
        e["session_id"] == session_id.as_str()
    });
    assert_eq!(closed["code"], "JA2006I", "{closed}");
    assert_eq!(
        closed["recording_ids"],
        serde_json::json!([exec_id]),
        "{closed}"
    );
    let start = c
        .audit_events(Some("session.start"))
        .into_iter()
        .find(|e| e["session_id"] == session_id.as_str())
        .unwrap_or_else(|| panic!("session.exec's session_id is the engine's: {session_id}"));
    assert_eq!(start["recorded"], true, "{start}");

    // A PTY (ssh -tt): the terminal's size is the recording's, the output is there.
    let o = c.run(
        &[
            "ssh",
            "-t",
            "-t",
            "root@node1",
            "--",
            "stty size; echo pty-$(tty | cut -c1-8)",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("pty-/dev/pts"), "{}", stdout(&o));
    wait_for_recording(&c, &data, "of the PTY session", |m, c| {
        c.contains("pty-/dev/pts") && m["meta"]["kind"] == "exec"
    });

    // Key re-exchanges in the middle of a session (OpenSSH rekeys after about a GiB; here
    // after every MiB, both ways through the agent's user side): the session goes on.
    let o = c.run(
        &[
            "ssh",
            "-o",
            "RekeyLimit=1M",
            "root@node1",
            "--",
            "head -c 8000000 /dev/zero",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(o.stdout.len(), 8_000_000);

    // Plain ssh with the ProxyCommand and the user's own known_hosts (its `@cert-authority`
    // line accepts the agent's host certificate for node1), strict host key checking.
    let keys = c.keys_dir();
    let o = Command::new("ssh")
        .env("JAUNT_HOME", &c.home)
        .args([
            "-o",
            &format!("ProxyCommand={} proxy ssh %r@%h:%p", jaunt_bin()),
            "-o",
            &format!("UserKnownHostsFile={}", keys.join("known_hosts").display()),
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
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
            "-v",
            "root@node1",
            "echo via-proxycommand",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "via-proxycommand"
    );
    assert!(
        err.contains("Server host certificate: ssh-ed25519-cert-v01@openssh.com"),
        "{err}"
    );
    assert!(
        err.contains("Host 'node1' is known and matches the ED25519-CERT host certificate"),
        "{err}"
    );

    // scp (SFTP, OpenSSH 9.2's default) both ways through the terminating agent.
    let src = c.dir.path().join("up.bin");
    let block: Vec<u8> = (0..(4u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
        .collect();
    std::fs::write(&src, &block).unwrap();
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
    let (sftp, cast) = wait_for_recording(&c, &data, "of the sftp upload", |m, _| {
        m["meta"]["kind"] == "sftp" && m["end"]["bytes_in"].as_u64().is_some_and(|b| b >= 4 << 20)
    });
    assert_eq!(sftp["meta"]["command"], "subsystem sftp", "{sftp}");
    // scp's file operation, with its path and size.
    assert!(
        notes(&cast, "sftp").iter().any(|n| n["op"] == "write"
            && n["path"] == remote.to_str().unwrap()
            && n["bytes"] == 4u64 << 20),
        "{cast}"
    );
    wait_for_recording(&c, &data, "of the sftp download", |m, _| {
        m["meta"]["kind"] == "sftp" && m["end"]["bytes_out"].as_u64().is_some_and(|b| b >= 4 << 20)
    });
    // Both transfers are audit events of their own, with path, operation and bytes.
    for op in ["write", "read"] {
        let moved = wait_for_event(&c, "file.transfer", |e| {
            e["operation"] == op && e["path"] == remote.to_str().unwrap()
        });
        assert_eq!(moved["code"], "JA2005I", "{moved}");
        assert_eq!(moved["bytes"], 4u64 << 20, "{moved}");
        assert_eq!(moved["user"], "alice", "{moved}");
        assert_eq!(moved["target"], "node1", "{moved}");
    }

    // A certificate from another CA is refused by the agent, whatever it names.
    let o = ssh_with_foreign_cert(&c);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(!String::from_utf8_lossy(&o.stdout).contains("should-not-run"));

    // Every terminated session has ended at the engine too (none lingers once ssh exits).
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let live: Vec<serde_json::Value> =
            serde_json::from_str(&ok(c.admin(&["sessions", "ls", "--format", "json"], None)))
                .unwrap();
        if live.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "sessions still live: {live:?}");
        std::thread::sleep(Duration::from_millis(20));
    }

    let _ = agent.kill();
    let _ = agent.wait();
}

/// The engine's `session.end` names the session's recordings (the agent notes each to the
/// engine as it starts) and `jaunt play` plays the one named; an unrecorded session's
/// `session.end` names none.
#[test]
fn session_end_names_the_recordings_that_play_plays() {
    let (c, _sshd, (mut agent, _data)) = ssh_setup();
    let o = c.run(&["ssh", "root@node1", "--", "echo named-$((6*7))"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let exec = wait_for_event(&c, "session.exec", |e| {
        e["command"]
            .as_str()
            .is_some_and(|c| c.contains("echo named"))
    });
    let exec_id = exec["recording_id"].as_str().unwrap().to_string();
    let session_id = exec["session_id"].as_str().unwrap().to_string();
    let end = wait_for_event(&c, "session.end", |e| {
        e["session_id"] == session_id.as_str()
    });
    assert_eq!(end["code"], "JA2001I", "{end}");
    assert_eq!(end["recorded"], true, "{end}");
    assert_eq!(end["recording_ids"], serde_json::json!([exec_id]), "{end}");
    // The id is the one `jaunt play` takes (once the agent has uploaded it).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = c.admin(&["play", &exec_id, "--speed", "0"], None);
        if o.status.success() && stdout(&o).contains("named-42") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "jaunt play {exec_id}: {} {}",
            stdout(&o),
            stderr(&o)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // bob's role does not record: his sessions' session.end name no recording.
    let bob = unrecorded_user(&c);
    ok(run_jaunt(
        &bob,
        &["ssh", "root@node1", "--", "echo unrecorded"],
        None,
    ));
    let end = wait_for_event(&c, "session.end", |e| {
        e["user"] == "bob" && e["bytes_out"].as_u64().is_some_and(|b| b > 0)
    });
    assert_eq!(end["recorded"], false, "{end}");
    for end in c.audit_events(Some("session.end")) {
        if end["user"] == "bob" {
            assert!(end.get("recording_ids").is_none(), "{end}");
        }
    }
    let _ = agent.kill();
    let _ = agent.wait();
}

/// A user who stops reading a big download (`ssh node 'head -c 128M /dev/zero'` into a pipe
/// nobody reads) stalls sshd through the SSH windows, which the agent relays end to end: the
/// agent does not buffer the download (its RSS grows by 4-15 MiB here, asserted below 48 MiB,
/// far from the download's 128 MiB), and every byte arrives once the reader reads again.
#[test]
fn a_stalled_reader_of_a_big_download_stalls_sshd_not_the_agents_memory() {
    use std::io::Read as _;
    const SIZE: usize = 128 << 20;
    let (c, _sshd, (agent, _data)) = ssh_setup();
    let pid = agent.id();
    // Warm up (the first session's one-time allocations are not the download's).
    ok(c.run(
        &["ssh", "root@node1", "--", "head -c 1000000 /dev/zero"],
        None,
    ));
    let (before, _) = proc_usage(pid);
    let mut child = Reaped(
        Command::new(jaunt_bin())
            .env("JAUNT_HOME", &c.home)
            .args([
                "ssh",
                "root@node1",
                "--",
                &format!("head -c {SIZE} /dev/zero"),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut out = child.0.stdout.take().unwrap();
    // The reader stalls for 3 s; the agent's RSS is sampled meanwhile.
    let mut peak = before;
    let stalled = Instant::now();
    while stalled.elapsed() < Duration::from_secs(3) {
        peak = peak.max(proc_usage(pid).0);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "the download finished while nobody read it"
    );
    let grown_kib = peak.saturating_sub(before);
    eprintln!("agent RSS {before} KiB, peak {peak} KiB while the reader stalled");
    assert!(
        grown_kib < 48 << 10,
        "the agent grew by {grown_kib} KiB while the reader stalled"
    );
    // Then it reads everything, slowly at first.
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0usize;
    for _ in 0..50 {
        let n = out.read(&mut buf).unwrap();
        assert!(buf[..n].iter().all(|b| *b == 0));
        got += n;
        std::thread::sleep(Duration::from_millis(10));
    }
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got += n;
        peak = peak.max(proc_usage(pid).0);
    }
    assert_eq!(got, SIZE);
    assert!(child.0.wait().unwrap().success());
    let grown_kib = peak.saturating_sub(before);
    eprintln!("agent RSS peak {peak} KiB over the whole download");
    assert!(
        grown_kib < 48 << 10,
        "the agent grew by {grown_kib} KiB during the download"
    );
}

/// Plain ssh through `jaunt proxy ssh` as root@node1 with a key and certificate of a CA the
/// cluster does not know (naming alice and root, valid for an hour).
fn ssh_with_foreign_cert(c: &Cluster) -> std::process::Output {
    let keys = c.keys_dir();
    let fake = c.dir.path().join("fake");
    std::fs::create_dir_all(&fake).unwrap();
    let keygen = |args: &[&str]| {
        let o = Command::new("ssh-keygen").args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let fake_ca = fake.join("ca");
    let fake_key = fake.join("key");
    if !fake_key.exists() {
        for path in [&fake_ca, &fake_key] {
            keygen(&[
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-f",
                path.to_str().unwrap(),
            ]);
        }
        keygen(&[
            "-q",
            "-s",
            fake_ca.to_str().unwrap(),
            "-I",
            "alice",
            "-n",
            "root",
            "-V",
            "+1h",
            &format!("{}.pub", fake_key.display()),
        ]);
    }
    Command::new("ssh")
        .env("JAUNT_HOME", &c.home)
        .args([
            "-o",
            &format!("ProxyCommand={} proxy ssh %r@%h:%p", jaunt_bin()),
            "-o",
            &format!("UserKnownHostsFile={}", keys.join("known_hosts").display()),
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-i",
            fake_key.to_str().unwrap(),
            "-o",
            &format!("CertificateFile={}-cert.pub", fake_key.display()),
            "root@node1",
            "echo should-not-run",
        ])
        .output()
        .unwrap()
}

/// Polls the pane until its text contains `want`.
fn wait_for_pane(sock: &str, want: &str) {
    wait_for_pane_of(sock, "rec", want);
}

#[test]
fn an_interactive_shell_in_a_real_pty_is_recorded_with_what_was_typed_and_a_resize() {
    let (c, _sshd, (mut agent, data)) = ssh_setup();
    let (sock, cleanup) = shell_in_tmux(&c, "jaunt-rec");
    ok(tmux(
        &sock,
        &["send-keys", "-t", "rec", "echo typed-$((40+2))", "Enter"],
    ));
    wait_for_pane(&sock, "typed-42");
    ok(tmux(
        &sock,
        &["resize-window", "-t", "rec", "-x", "120", "-y", "40"],
    ));
    ok(tmux(
        &sock,
        &["send-keys", "-t", "rec", "stty size", "Enter"],
    ));
    wait_for_pane(&sock, "40 120");
    ok(tmux(&sock, &["send-keys", "-t", "rec", "exit", "Enter"]));
    let (meta, cast) = wait_for_recording(&c, &data, "of the shell", |m, cast| {
        m["meta"]["kind"] == "shell" && cast.contains("typed-42")
    });
    assert_eq!(
        (
            meta["meta"]["width"].as_u64(),
            meta["meta"]["height"].as_u64()
        ),
        (Some(100), Some(30)),
        "{meta}"
    );
    assert!(cast.contains(r#""r", "120x40""#), "{cast}");
    drop(cleanup);
    let _ = agent.kill();
    let _ = agent.wait();
}

/// `jaunt ssh root@node1` as `c`'s user in a 100x30 tmux session `rec` on a socket of its own
/// (named from `prefix`), once its shell answers: the socket and the guard that kills it.
fn shell_in_tmux(c: &Cluster, prefix: &str) -> (String, TmuxServer) {
    let sock = format!("{prefix}-{}", std::process::id());
    let guard = ssh_in_tmux(c, &sock, "rec");
    ok(tmux(
        &sock,
        &["send-keys", "-t", "rec", "stty size", "Enter"],
    ));
    wait_for_pane(&sock, "30 100");
    (sock, guard)
}

#[test]
fn strict_recording_ends_a_session_whose_recording_cannot_be_written() {
    // The role exists before the agent starts (the agent fetches the policy before it serves).
    let c = Cluster::dev();
    let role = c.dir.path().join("audited.yaml");
    std::fs::write(
        &role,
        "kind: role\nversion: v1\nmetadata:\n  name: audited\nspec:\n  options:\n    \
         record_session: strict\n  allow:\n    logins: [root]\n    node_labels: {'*': '*'}\n",
    )
    .unwrap();
    ok(c.admin(&["create", "-f", role.to_str().unwrap()], None));
    ok(c.admin(
        &[
            "users",
            "add",
            "alice",
            "--roles",
            "audited",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    ok(c.login("alice", PASSWORD, &[]));
    let sshd = Sshd::start(&c);
    let (mut agent, data) = start_agent(&c, "node1", &["--ssh", &sshd.addr]);
    wait_for_ssh(&c, "root@node1");

    // Strict and recordable: served and recorded.
    let out = ok(c.run(&["ssh", "root@node1", "--", "echo strict-ok"], None));
    assert_eq!(out.trim(), "strict-ok");
    wait_for_recording(&c, &data, "of the strict session", |m, cast| {
        cast.contains("strict-ok") && m["meta"]["kind"] == "exec"
    });

    // The spool cannot be written any more: a strict session ends before its command runs.
    let spool_dir = spool(&data);
    std::fs::remove_dir_all(&spool_dir).unwrap();
    std::fs::write(&spool_dir, "not a directory").unwrap();
    let marker = c.dir.path().join("ran");
    let o = c.run(
        &[
            "ssh",
            "root@node1",
            "--",
            &format!("touch {}; echo should-not-run", marker.display()),
        ],
        None,
    );
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(!stdout(&o).contains("should-not-run"), "{}", stdout(&o));
    assert!(!marker.exists(), "the command ran unrecorded");

    let _ = agent.kill();
    let _ = agent.wait();
}

/// `jaunt join`: an observer with the `session`/`join` rule watches alice's live shell in a real
/// PTY, read-only; alice's terminal says so; what the observer types goes nowhere; the join is
/// in the audit log and the recording. A user without the rule is refused with the reason.
#[test]
fn an_observer_joins_a_live_shell_read_only_and_the_user_is_told() {
    let (c, _sshd, (mut agent, data)) = ssh_setup();
    let role = c.dir.path().join("watcher.yaml");
    std::fs::write(
        &role,
        "kind: role\nversion: v1\nmetadata:\n  name: watcher\nspec:\n  allow:\n    rules:\n    \
         - resources: [session]\n      verbs: [list, join]\n",
    )
    .unwrap();
    ok(c.admin(&["create", "-f", role.to_str().unwrap()], None));
    ok(c.admin(
        &[
            "users",
            "add",
            "bob",
            "--roles",
            "watcher",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    let bob = c.dir.path().join("home-bob");
    std::fs::create_dir_all(&bob).unwrap();
    ok(run_jaunt(
        &bob,
        &[
            "login",
            "--proxy",
            &c.public_addr,
            "--user",
            "bob",
            "--password-stdin",
            "--ca-pin",
            &c.pin,
        ],
        Some(&format!("{PASSWORD}\n")),
    ));

    // alice's shell, in a real PTY.
    let (sock, _cleanup) = shell_in_tmux(&c, "jaunt-join");
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&ok(c.admin(&["sessions", "ls", "--format", "json"], None))).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let id = listed[0]["id"].as_str().unwrap().to_string();

    // alice (the access role) has no `session`/`join` rule: a clear refusal.
    let refused = fails(c.run(&["join", &id], None));
    assert!(
        refused.contains("allows join on session"),
        "a clear refusal: {refused}"
    );
    let missing = fails(run_jaunt(&bob, &["join", "0123-no-such"], None));
    assert!(missing.contains("no live session"), "{missing}");

    // bob joins in a terminal of his own (retrying until the agent has the new role).
    let marker = c.dir.path().join("typed-by-observer");
    let obs_cmd = format!(
        "until env JAUNT_HOME={} {} join {id}; do sleep 0.2; done; sleep 600",
        bob.display(),
        jaunt_bin()
    );
    ok(tmux(
        &sock,
        &[
            "new-session",
            "-d",
            "-s",
            "obs",
            "-x",
            "100",
            "-y",
            "30",
            &obs_cmd,
        ],
    ));
    wait_for_pane_of(&sock, "obs", &format!("Watching session {id} of alice"));
    wait_for_pane(
        &sock,
        "[jaunt] bob joined this session as an observer (read-only)",
    );

    // bob sees what alice types and gets.
    ok(tmux(
        &sock,
        &["send-keys", "-t", "rec", "echo seen-by-$((6*7))", "Enter"],
    ));
    wait_for_pane(&sock, "seen-by-42");
    wait_for_pane_of(&sock, "obs", "seen-by-42");

    // What bob types reaches nothing: not alice's shell, not the node.
    ok(tmux(
        &sock,
        &[
            "send-keys",
            "-t",
            "obs",
            &format!("touch {}; echo observer-typed", marker.display()),
            "Enter",
        ],
    ));
    ok(tmux(
        &sock,
        &["send-keys", "-t", "rec", "echo after-$((40+2))", "Enter"],
    ));
    wait_for_pane_of(&sock, "obs", "after-42");
    wait_for_pane(&sock, "after-42");
    assert!(
        !marker.exists(),
        "the observer's keystrokes reached the node"
    );
    let user_pane = pane(&sock, "rec");
    assert!(!user_pane.contains("observer-typed"), "{user_pane}");

    // The join is audited, who and which session.
    let joins = c.audit_events(Some("session.join"));
    assert!(
        joins
            .iter()
            .any(|e| e["user"] == "bob" && e["session_id"] == id.as_str()),
        "{joins:?}"
    );

    // An observer is a live session of its own, listed with the session it watches.
    let live = |c: &Cluster| -> Vec<serde_json::Value> {
        serde_json::from_str(&ok(c.admin(&["sessions", "ls", "--format", "json"], None))).unwrap()
    };
    let observer_of = |c: &Cluster, user: &str| {
        live(c)
            .into_iter()
            .find(|s| s["user"] == user && s["observing"] == id.as_str())
    };
    let bob_observer = observer_of(&c, "bob").expect("bob's observer session is listed");
    let text = ok(c.admin(&["sessions", "ls"], None));
    assert!(text.contains(&format!("observer of {id}")), "{text}");
    let joined = joins
        .iter()
        .find(|e| e["user"] == "bob" && e["session_id"] == id.as_str())
        .unwrap();
    assert_eq!(
        joined["observer_session_id"], bob_observer["id"],
        "{joined}"
    );
    let nested = fails(run_jaunt(
        &bob,
        &["join", bob_observer["id"].as_str().unwrap()],
        None,
    ));
    assert!(nested.contains("is an observer of session"), "{nested}");

    // carol, another observer: `sessions kill` ends her observer session, not alice's session
    // nor bob's; a lock on carol ends her next one.
    ok(c.admin(
        &[
            "users",
            "add",
            "carol",
            "--roles",
            "watcher",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    let carol = c.dir.path().join("home-carol");
    std::fs::create_dir_all(&carol).unwrap();
    ok(run_jaunt(
        &carol,
        &[
            "login",
            "--proxy",
            &c.public_addr,
            "--user",
            "carol",
            "--password-stdin",
            "--ca-pin",
            &c.pin,
        ],
        Some(&format!("{PASSWORD}\n")),
    ));
    let carol_joins = |window: &str| {
        let cmd = format!(
            "env JAUNT_HOME={} {} join {id}; echo join-exited; sleep 600",
            carol.display(),
            jaunt_bin()
        );
        ok(tmux(
            &sock,
            &[
                "new-session",
                "-d",
                "-s",
                window,
                "-x",
                "100",
                "-y",
                "30",
                &cmd,
            ],
        ));
        wait_for_pane_of(&sock, window, &format!("Watching session {id} of alice"));
        observer_of(&c, "carol").expect("carol's observer session is listed")
    };
    let first = carol_joins("carol1");
    let killed = ok(c.admin(&["sessions", "kill", first["id"].as_str().unwrap()], None));
    assert!(killed.contains("ended"), "{killed}");
    wait_for_pane_of(&sock, "carol1", "join-exited");
    // carol's join says her view was ended, not the session.
    let said = pane(&sock, "carol1");
    assert!(
        said.contains("your observer session was ended") && !said.contains("The session ended."),
        "{said}"
    );
    assert!(observer_of(&c, "carol").is_none(), "{:?}", live(&c));
    assert!(observer_of(&c, "bob").is_some(), "{:?}", live(&c));
    assert!(
        live(&c).iter().any(|s| s["id"] == id.as_str()),
        "alice's session goes on"
    );
    let kill = wait_for_event(&c, "session.kill", |e| e["session_id"] == first["id"]);
    assert_eq!(kill["user"], "carol", "{kill}");

    carol_joins("carol2");
    let locked = Instant::now();
    ok(c.admin(
        &["lock", "--user", "carol", "--message", "no more watching"],
        None,
    ));
    let deadline = locked + Duration::from_secs(3);
    while observer_of(&c, "carol").is_some() {
        assert!(
            Instant::now() < deadline,
            "the lock did not end carol's observer"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "lock to observer session gone (as `sessions ls` saw it): {:?}",
        locked.elapsed()
    );
    wait_for_pane_of(&sock, "carol2", "join-exited");
    let said = pane(&sock, "carol2");
    assert!(
        said.contains("no longer watching") && !said.contains("The session ended."),
        "{said}"
    );
    assert!(observer_of(&c, "bob").is_some(), "{:?}", live(&c));

    // alice leaves: bob is told the session ended; the recording notes the observer.
    ok(tmux(&sock, &["send-keys", "-t", "rec", "exit", "Enter"]));
    wait_for_pane_of(&sock, "obs", "The session ended.");
    let (_, cast) = wait_for_recording(&c, &data, "of the watched shell", |m, cast| {
        m["meta"]["kind"] == "shell" && cast.contains("seen-by-42")
    });
    assert!(cast.contains(r#"\"joined\":\"bob\""#), "{cast}");
    let _ = agent.kill();
    let _ = agent.wait();
}

/// The `m` notes of a cast file whose `note` is `kind`, as JSON objects.
fn notes(cast: &str, kind: &str) -> Vec<serde_json::Value> {
    cast.lines()
        .skip(1)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e[1] == "m")
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e[2].as_str()?).ok())
        .filter(|n| n["note"] == kind)
        .collect()
}

/// Real `sftp` (through the `jaunt config` block) both ways through the terminating agent, with
/// checksums; the sftp channel's recording names the files with the bytes moved, and the
/// rename and remove.
#[test]
fn sftp_both_ways_is_recorded_with_paths_and_byte_counts() {
    let (c, _sshd, (mut agent, data)) = ssh_setup();
    let config = c.dir.path().join("ssh_config");
    std::fs::write(&config, ok(run_jaunt(&c.home, &["config"], None))).unwrap();
    let src = c.dir.path().join("sftp-src.bin");
    let block: Vec<u8> = (0..(3u32 << 20))
        .map(|i| (i.wrapping_mul(2246822519) >> 9) as u8)
        .collect();
    std::fs::write(&src, &block).unwrap();
    let remote_dir = c.dir.path().join("remote");
    std::fs::create_dir_all(&remote_dir).unwrap();
    let kept = remote_dir.join("kept.bin");
    let moved = remote_dir.join("moved.bin");
    let renamed = remote_dir.join("renamed.bin");
    let back = c.dir.path().join("sftp-back.bin");
    let batch = c.dir.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "put {src} {kept}\nput {src} {moved}\nget {kept} {back}\nrename {moved} {renamed}\n\
             rm {renamed}\n",
            src = src.display(),
            kept = kept.display(),
            moved = moved.display(),
            back = back.display(),
            renamed = renamed.display(),
        ),
    )
    .unwrap();
    let o = Command::new("sftp")
        .env("HOME", &c.home)
        .env("JAUNT_HOME", &c.home)
        .args([
            "-F",
            config.to_str().unwrap(),
            "-b",
            batch.to_str().unwrap(),
            "root@node1.dev.jaunt.local",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sha256_file(&src), sha256_file(&kept), "upload");
    assert_eq!(sha256_file(&src), sha256_file(&back), "download");
    assert!(!renamed.exists() && !moved.exists());

    let size = 3u64 << 20;
    let (meta, cast) = wait_for_recording(&c, &data, "of the sftp session", |m, cast| {
        m["meta"]["kind"] == "sftp" && cast.contains("remove")
    });
    assert!(
        meta["end"]["bytes_in"].as_u64().unwrap() >= 2 * size,
        "{meta}"
    );
    let ops = notes(&cast, "sftp");
    let has = |op: &str, path: &Path, bytes: Option<u64>| {
        ops.iter().any(|n| {
            n["op"] == op
                && n["path"] == path.to_str().unwrap()
                && bytes.is_none_or(|b| n["bytes"] == b)
        })
    };
    assert!(has("write", &kept, Some(size)), "{ops:?}");
    assert!(has("write", &moved, Some(size)), "{ops:?}");
    assert!(has("read", &kept, Some(size)), "{ops:?}");
    assert!(has("rename", &moved, None), "{ops:?}");
    assert!(
        ops.iter()
            .any(|n| n["op"] == "rename" && n["to"] == renamed.to_str().unwrap()),
        "{ops:?}"
    );
    assert!(has("remove", &renamed, None), "{ops:?}");
    // The audit log has them too.
    let rename = wait_for_event(&c, "file.transfer", |e| {
        e["operation"] == "rename" && e["path"] == moved.to_str().unwrap()
    });
    assert_eq!(rename["to"], renamed.to_str().unwrap(), "{rename}");
    wait_for_event(&c, "file.transfer", |e| {
        e["operation"] == "remove" && e["path"] == renamed.to_str().unwrap()
    });
    let _ = agent.kill();
    let _ = agent.wait();
}

/// An agent killed while a recorded session runs leaves the recording in its spool; restarted,
/// it closes it as interrupted and uploads it, and `jaunt play` shows what the session printed.
#[test]
fn recordings_spooled_when_the_agent_dies_are_uploaded_after_its_restart() {
    let (c, sshd, (mut agent, data)) = ssh_setup();
    let mut session = Command::new(jaunt_bin())
        .args(["ssh", "root@node1", "--", "echo before-the-crash; sleep 60"])
        .env("JAUNT_HOME", &c.home)
        .env("HOME", &c.home)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(session.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "before-the-crash");
    let live: Vec<serde_json::Value> =
        serde_json::from_str(&ok(c.admin(&["sessions", "ls", "--format", "json"], None))).unwrap();
    let session_id = live[0]["id"].as_str().unwrap().to_string();

    // The agent dies mid-session: the recording stays in its spool, unfinished.
    agent.kill().unwrap();
    agent.wait().unwrap();
    let _ = session.kill();
    let _ = session.wait();
    let spooled: Vec<PathBuf> = std::fs::read_dir(spool(&data))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("cast"))
        .collect();
    assert!(
        spooled.iter().any(|p| std::fs::read_to_string(p)
            .unwrap()
            .contains("before-the-crash")),
        "{spooled:?}"
    );

    // Restarted on the same data directory: the recording reaches control, marked interrupted,
    // and leaves the spool.
    let _agent = spawn_agent(&c, &data, "node1", None, &["--ssh", &sshd.addr]);
    let stored = c.data_dir.join("recordings");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (id, info) = loop {
        let found = std::fs::read_dir(&stored).ok().and_then(|entries| {
            entries.flatten().find_map(|e| {
                let p = e.path();
                let info: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&p).ok()?).ok()?;
                (info["session_id"] == session_id.as_str()).then(|| {
                    let id = p.file_stem().unwrap().to_string_lossy().to_string();
                    (id, info)
                })
            })
        });
        if let Some(found) = found {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "the spooled recording never reached control"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(info["interrupted"], true, "{info}");
    assert_eq!(info["user"], "alice", "{info}");
    let played = ok(c.admin(&["play", &id], None));
    assert!(played.contains("before-the-crash"), "{played}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(spool(&data)).unwrap().flatten().any(|e| {
        let p = e.path();
        matches!(
            p.extension().and_then(|x| x.to_str()),
            Some("cast") | Some("json")
        )
    }) {
        assert!(Instant::now() < deadline, "the spool never emptied");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a line sent through the Unix socket `path` comes back.
fn echoes_through(path: &Path) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(path) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    if s.write_all(b"ping-through-L\n").is_err() {
        return false;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while got.len() < 15 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got == b"ping-through-L\n"
}

/// Plain `ssh -N -L SOCK:ECHO` with the `jaunt config` block of `home`; returns the child, whose
/// stderr goes to `log`.
fn forward(home: &Path, sock: &Path, echo: &str, log: &Path) -> std::process::Child {
    let config = home.join("ssh_config");
    std::fs::write(&config, ok(run_jaunt(home, &["config"], None))).unwrap();
    Command::new("ssh")
        .args([
            "-F",
            config.to_str().unwrap(),
            "-N",
            "-L",
            &format!("{}:{echo}", sock.display()),
            "root@node1.dev.jaunt.local",
        ])
        .env("HOME", home)
        .env("JAUNT_HOME", home)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Plain `ssh -A` (the `jaunt config` block) as `home`'s user, with an empty ssh-agent of its
/// own: (stdout, stderr). The command prints what the node sees: `sock=` the forwarded agent's
/// socket (`none`) and `agent-rc=` of `ssh-add -l` (1: an agent answered, with no keys; 2: no
/// agent).
fn ssh_forwarding_agent(home: &Path) -> (String, String) {
    let config = home.join("ssh_config");
    std::fs::write(&config, ok(run_jaunt(home, &["config"], None))).unwrap();
    let sock = home.join("agent.sock");
    let _ = std::fs::remove_file(&sock);
    let mut agent = Reaped(
        Command::new("ssh-agent")
            .args(["-D", "-a", sock.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_file(&sock);
    let o = Command::new("ssh")
        .args([
            "-A",
            "-F",
            config.to_str().unwrap(),
            "root@node1.dev.jaunt.local",
            "echo sock=${SSH_AUTH_SOCK:-none}; ssh-add -l >/dev/null 2>&1; echo agent-rc=$?",
        ])
        .env("HOME", home)
        .env("JAUNT_HOME", home)
        .env("SSH_AUTH_SOCK", &sock)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let _ = agent.0.kill();
    let _ = agent.0.wait();
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ssh -L` to a TCP echo through the terminating agent: served for a role that permits port
/// forwarding (the built-in access role), refused by the agent itself, with the reason, for one
/// whose role sets `permit_port_forwarding: false`.
#[test]
fn port_forwarding_through_the_agent_follows_the_roles() {
    let (c, _sshd, (mut agent, _data)) = ssh_setup();
    let echo = echo_server().to_string();

    let sock = c.dir.path().join("alice-L.sock");
    let log = c.dir.path().join("alice-L.log");
    let mut alice = forward(&c.home, &sock, &echo, &log);
    wait_for_file(&sock);
    let served = echoes_through(&sock);
    let _ = alice.kill();
    let _ = alice.wait();
    assert!(served, "{}", std::fs::read_to_string(&log).unwrap());
    // alice's `access` role permits agent forwarding: `ssh -A` reaches her agent.
    let (out, err) = ssh_forwarding_agent(&c.home);
    assert!(
        out.contains("agent-rc=1") && !out.contains("sock=none"),
        "{out}\n{err}"
    );

    let role = c.dir.path().join("noforward.yaml");
    std::fs::write(
        &role,
        "kind: role\nversion: v1\nmetadata:\n  name: noforward\nspec:\n  options:\n    \
         permit_port_forwarding: false\n    permit_agent_forwarding: false\n    \
         record_session: best_effort\n  allow:\n    \
         logins: [root]\n    node_labels: {'*': '*'}\n",
    )
    .unwrap();
    ok(c.admin(&["create", "-f", role.to_str().unwrap()], None));
    ok(c.admin(
        &[
            "users",
            "add",
            "carol",
            "--roles",
            "noforward",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    let carol = c.dir.path().join("home-carol");
    std::fs::create_dir_all(&carol).unwrap();
    ok(run_jaunt(
        &carol,
        &[
            "login",
            "--proxy",
            &c.public_addr,
            "--user",
            "carol",
            "--password-stdin",
            "--ca-pin",
            &c.pin,
        ],
        Some(&format!("{PASSWORD}\n")),
    ));
    // The agent has the new role once carol's ssh gets in.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !run_jaunt(&carol, &["ssh", "root@node1", "--", "true"], None)
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "carol never got in");
        std::thread::sleep(Duration::from_millis(100));
    }
    let sock = c.dir.path().join("carol-L.sock");
    let log = c.dir.path().join("carol-L.log");
    let mut child = forward(&carol, &sock, &echo, &log);
    wait_for_file(&sock);
    let served = echoes_through(&sock);
    // ssh logs the refusal when the channel open fails; poll its log for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("open failed") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(!served, "forwarded without permit_port_forwarding");
    assert!(
        text.contains("administratively prohibited")
            && text.contains("not permitted by your roles (permit_port_forwarding)"),
        "{text}"
    );
    // Nor agent forwarding: the agent refuses `ssh -A` and says why; the node sees no agent.
    let (out, err) = ssh_forwarding_agent(&carol);
    assert!(
        out.contains("sock=none") && out.contains("agent-rc=2"),
        "{out}\n{err}"
    );
    assert!(
        err.contains("agent forwarding is not permitted by your roles (permit_agent_forwarding)"),
        "{err}"
    );
    let _ = agent.kill();
    let _ = agent.wait();
}

/// The agent's metrics endpoint (`--metrics-addr`) counts the SSH connections it refused for bad
/// input by reason: a certificate of a foreign CA is `cert_untrusted`.
#[test]
fn a_refused_certificate_is_counted_on_the_agents_metrics() {
    let (c, sshd, (mut agent, data)) = ssh_setup();
    // The same agent again (its identity is in `data`), with its metrics endpoint on any port.
    let _ = agent.kill();
    let _ = agent.wait();
    let log = c.dir.path().join("agent-metrics.log");
    let mut agent = Reaped(
        Command::new(jaunt_bin())
            .args([
                "agent",
                "--proxy",
                &c.public_addr,
                "--ca-pin",
                &c.pin,
                "--data-dir",
                data.to_str().unwrap(),
                "--name",
                "node1",
                "--ssh",
                &sshd.addr,
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .env("JAUNT_HOME", c.dir.path().join("agent-home"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(rest) = text.split("metrics on http://").nth(1) {
            break rest.split("/metrics").next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no metrics address: {text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let count = |reason: &str| -> u64 {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        let key = format!("jaunt_agent_ssh_refused_total{{reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .unwrap_or_else(|| panic!("no {key}: {text}"))
            .trim()
            .parse()
            .unwrap()
    };
    wait_for_ssh(&c, "root@node1");
    assert_eq!(count("cert_untrusted"), 0);
    let o = ssh_with_foreign_cert(&c);
    assert!(!o.status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while count("cert_untrusted") != 1 {
        assert!(Instant::now() < deadline, "not counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(count("wrong_login"), 0);
    assert_eq!(count("malformed_packet"), 0);
    let _ = agent.kill();
    let _ = agent.wait();
}

// ---- measurements (issue 10's speed items; BENCHMARKS.md) ----

/// The agent's resident memory (KiB) and CPU time (seconds) from /proc.
fn proc_usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `after` starts at field 3.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    (rss, ticks as f64 / 100.0)
}

/// A second user, `bob`, whose role does not record (`record_session: off`): the unrecorded
/// Jaunt path (the splice) for the same-run ratios. Returns bob's JAUNT_HOME once his ssh works.
fn unrecorded_user(c: &Cluster) -> PathBuf {
    let role = c.dir.path().join("unrecorded.yaml");
    std::fs::write(
        &role,
        "kind: role\nversion: v1\nmetadata:\n  name: unrecorded\nspec:\n  options:\n    \
         record_session: \"off\"\n    permit_pty: true\n  allow:\n    logins: [root]\n    \
         node_labels:\n      '*': '*'\n",
    )
    .unwrap();
    ok(c.admin(&["create", "-f", role.to_str().unwrap()], None));
    ok(c.admin(
        &[
            "users",
            "add",
            "bob",
            "--roles",
            "unrecorded",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    let bob = c.dir.path().join("home-bob");
    std::fs::create_dir_all(&bob).unwrap();
    ok(run_jaunt(
        &bob,
        &[
            "login",
            "--proxy",
            &c.public_addr,
            "--user",
            "bob",
            "--password-stdin",
            "--ca-pin",
            &c.pin,
        ],
        Some(&format!("{PASSWORD}\n")),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !run_jaunt(&bob, &["ssh", "root@node1", "--", "true"], None)
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "bob never got in");
        std::thread::sleep(Duration::from_millis(200));
    }
    bob
}

/// Median of `v` (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Issue 10's speed items, in one run (a loaded machine: ratios within the run are what
/// counts). Prints what it measured; asserts nothing about speed.
/// `JAUNT_MEASURE_IDLE` sets the number of idle sessions (default 200).
#[test]
#[ignore = "measurement: cargo test -p jaunt-control --test ssh_recording -- --ignored --nocapture measure"]
fn measure_recorded_ssh() {
    let (c, _sshd, (agent, data)) = ssh_setup();
    let pid = agent.id();
    let bob = unrecorded_user(&c);
    let homes = [("recorded", c.home.clone()), ("unrecorded", bob.clone())];

    // 1. A 1 GiB scp (SFTP) upload, recorded and not, alternating, 2 runs each.
    let src = c.dir.path().join("gib.bin");
    {
        use std::io::Write as _;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).unwrap());
        let block: Vec<u8> = (0..(1u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        for _ in 0..1024 {
            f.write_all(&block).unwrap();
        }
    }
    let mut secs: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut rss_growth_kib = 0u64;
    for _ in 0..2 {
        for (what, home) in &homes {
            let (before, _) = proc_usage(pid);
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let sampler = {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut peak = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        peak = peak.max(proc_usage(pid).0);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    peak
                })
            };
            let started = Instant::now();
            ok(run_jaunt(
                home,
                &["scp", src.to_str().unwrap(), "root@node1:/dev/null"],
                None,
            ));
            let took = started.elapsed().as_secs_f64();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let peak = sampler.join().unwrap();
            secs.entry(what).or_default().push(took);
            if *what == "recorded" {
                rss_growth_kib = rss_growth_kib.max(peak.saturating_sub(before));
            }
            eprintln!(
                "scp 1 GiB {what}: {took:.2} s ({:.0} MiB/s), agent RSS {before} -> peak {peak} KiB",
                1024.0 / took
            );
        }
    }
    let rec = median(secs.get_mut("recorded").unwrap());
    let unrec = median(secs.get_mut("unrecorded").unwrap());
    eprintln!(
        "MEASURE scp: recorded {:.0} MiB/s, unrecorded {:.0} MiB/s, ratio {:.2}x; agent RSS growth while recording: {} KiB",
        1024.0 / rec,
        1024.0 / unrec,
        unrec / rec,
        rss_growth_kib
    );
    std::fs::remove_file(&src).unwrap();

    // 2. Agent CPU per MiB of terminal output (32 MiB of base64 text), recorded and not; the
    //    recorded figure also after the upload to control.
    let spool_empty = || {
        std::fs::read_dir(spool(&data))
            .map(|d| {
                !d.flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "cast"))
            })
            .unwrap_or(true)
    };
    for (what, home) in &homes {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !spool_empty() {
            assert!(Instant::now() < deadline, "spool never emptied");
            std::thread::sleep(Duration::from_millis(100));
        }
        let (_, cpu0) = proc_usage(pid);
        let o = Command::new(jaunt_bin())
            .env("JAUNT_HOME", home)
            .args([
                "ssh",
                "root@node1",
                "--",
                "head -c 25165824 /dev/urandom | base64 -w 100",
            ])
            .stdout(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let (_, cpu1) = proc_usage(pid);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !spool_empty() {
            assert!(Instant::now() < deadline, "spool never emptied");
            std::thread::sleep(Duration::from_millis(100));
        }
        let (_, cpu2) = proc_usage(pid);
        let mib = 32.0 * 1.0135; // base64 -w 100 adds a newline per 100 characters
        eprintln!(
            "MEASURE output {what}: agent CPU {:.1} ms/MiB during the session, {:.1} ms/MiB with the upload",
            (cpu1 - cpu0) * 1000.0 / mib,
            (cpu2 - cpu0) * 1000.0 / mib
        );
    }

    // 3. Keystroke echo: one byte into `ssh -tt ... cat`, until the node's pty echoes it.
    for (what, home) in &homes {
        use std::io::{Read as _, Write as _};
        let mut child = Reaped(
            Command::new(jaunt_bin())
                .env("JAUNT_HOME", home)
                .args(["ssh", "-t", "-t", "root@node1", "--", "cat"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let mut stdin = child.0.stdin.take().unwrap();
        let mut out = child.0.stdout.take().unwrap();
        let mut echo = |byte: u8| {
            stdin.write_all(&[byte]).unwrap();
            stdin.flush().unwrap();
            let mut buf = [0u8; 256];
            loop {
                let n = out.read(&mut buf).unwrap();
                assert!(n > 0, "ssh ended");
                if buf[..n].contains(&byte) {
                    return;
                }
            }
        };
        echo(b'w'); // the session is up
        let mut times = Vec::new();
        for i in 0..300 {
            if i % 100 == 99 {
                echo(b'\n');
            }
            let t = Instant::now();
            echo(b'x');
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let p50 = median(&mut times);
        eprintln!(
            "MEASURE echo {what}: median {p50:.0} us, p90 {:.0} us (300 keystrokes)",
            times[times.len() * 9 / 10]
        );
    }

    // 4. Idle recorded sessions.
    measure_idle(&c, pid);
    drop(agent);
}

/// Issue 10's memory item alone: idle recorded sessions on one agent (see [`measure_idle`]).
#[test]
#[ignore = "measurement: JAUNT_MEASURE_IDLE=1000 cargo test -p jaunt-control --test ssh_recording -- --ignored --nocapture measure_idle"]
fn measure_idle_recorded_sessions() {
    let (c, _sshd, (agent, _data)) = ssh_setup();
    measure_idle(&c, agent.id());
    drop(agent);
}

/// Idle recorded sessions: a shell-less `cat` each through OpenSSH and `jaunt proxy`, held
/// open; the agent's RSS growth per session. `JAUNT_MEASURE_IDLE` sets the number of sessions
/// (default 200); each costs an ssh, a `jaunt proxy` and an sshd process on this machine.
fn measure_idle(c: &Cluster, pid: u32) {
    let n: usize = std::env::var("JAUNT_MEASURE_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let config = c.home.join("ssh_config");
    std::fs::write(&config, ok(run_jaunt(&c.home, &["config"], None))).unwrap();
    let live = || -> usize {
        serde_json::from_str::<Vec<serde_json::Value>>(&ok(
            c.admin(&["sessions", "ls", "--format", "json"], None)
        ))
        .unwrap()
        .len()
    };
    std::thread::sleep(Duration::from_secs(3));
    let (rss0, _) = proc_usage(pid);
    let mut held = Vec::new();
    for i in 0..n {
        held.push(Reaped(
            Command::new("ssh")
                .args([
                    "-F",
                    config.to_str().unwrap(),
                    "-T",
                    "root@node1.dev.jaunt.local",
                    // Idle until its stdin closes: it ends with the session (a `sleep` would
                    // outlive it on the node, as commands without a pty do).
                    "cat >/dev/null",
                ])
                .env("HOME", &c.home)
                .env("JAUNT_HOME", &c.home)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        ));
        if i % 20 == 19 {
            let deadline = Instant::now() + Duration::from_secs(60);
            while live() < i + 1 {
                assert!(Instant::now() < deadline, "sessions did not open");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while live() < n {
        assert!(Instant::now() < deadline, "only {} of {n} sessions", live());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let (rss1, _) = proc_usage(pid);
    let anon = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .filter(|l| {
                l.starts_with("RssAnon") || l.starts_with("RssFile") || l.starts_with("Threads")
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    eprintln!("agent with {n} idle sessions: {}", anon());
    eprintln!(
        "MEASURE idle: {n} recorded sessions open, agent RSS {rss0} -> {rss1} KiB: {:.1} KiB per session",
        (rss1.saturating_sub(rss0)) as f64 / n as f64
    );
    drop(held);
}
