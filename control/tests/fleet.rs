//! `jaunt ssh` as fleets, scripts and Ansible use it, end to end with real OpenSSH: many
//! sessions at once (the dial's answer and the node's first bytes often arrive in one read),
//! and many `jaunt proxy tcp` streams to a service that speaks first.
//!
//! Counts are small enough for CI; `JAUNT_STRESS=N` runs N of each (the issue's stress run is
//! `JAUNT_STRESS=200`, five times).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn stress(default: usize) -> usize {
    std::env::var("JAUNT_STRESS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn parallel_ssh_sessions_never_fail() {
    let (c, _sshd, _agent) = ssh_setup();
    let n = stress(32);
    for round in 0..2 {
        let failures: Vec<String> = std::thread::scope(|s| {
            let runs: Vec<_> = (0..n)
                .map(|i| {
                    let c = &c;
                    s.spawn(move || {
                        let o = c.run(&["ssh", "root@node1", "--", "echo", &format!("s{i}")], None);
                        let out = stdout(&o);
                        if o.status.success() && out.trim() == format!("s{i}") {
                            None
                        } else {
                            Some(format!("#{i}: {:?} {out:?} {}", o.status, stderr(&o)))
                        }
                    })
                })
                .collect();
            runs.into_iter().filter_map(|r| r.join().unwrap()).collect()
        });
        assert!(
            failures.is_empty(),
            "round {round}: {} of {n} parallel `jaunt ssh` failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

/// A TCP service on 127.0.0.1:0 that greets first (as SSH, SMTP or MySQL servers do), then
/// echoes.
fn greeting_echo_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            std::thread::spawn(move || {
                let _ = conn.write_all(b"HELLO\n");
                let mut r = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut conn);
            });
        }
    });
    addr
}

#[test]
fn parallel_proxy_tcp_streams_keep_the_first_bytes() {
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
    let app = format!("greet=tcp://{}", greeting_echo_server());
    let (_agent, _data) = start_agent(&c, "apphost", &["--app", &app]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok(c.run(&["ls", "apps"], None))
        .lines()
        .any(|l| l.starts_with("greet"))
    {
        assert!(Instant::now() < deadline, "the app was never listed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut proxy = Reaped(
        Command::new(jaunt_bin())
            .args(["proxy", "tcp", "greet", "--port", "0"])
            .env("JAUNT_HOME", &c.home)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(proxy.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let local = line.trim().rsplit(' ').next().unwrap().to_string();

    let n = stress(200);
    let failures: Vec<String> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..n)
            .map(|i| {
                let local = &local;
                s.spawn(move || -> Result<(), String> {
                    let mut conn = TcpStream::connect(local).map_err(|e| e.to_string())?;
                    conn.set_read_timeout(Some(Duration::from_secs(30)))
                        .map_err(|e| e.to_string())?;
                    let mut greeting = [0u8; 6];
                    conn.read_exact(&mut greeting)
                        .map_err(|e| format!("#{i} greeting: {e}"))?;
                    if &greeting != b"HELLO\n" {
                        return Err(format!("#{i} greeting {greeting:?}"));
                    }
                    let ping = format!("ping {i}\n");
                    conn.write_all(ping.as_bytes()).map_err(|e| e.to_string())?;
                    let mut back = vec![0u8; ping.len()];
                    conn.read_exact(&mut back)
                        .map_err(|e| format!("#{i} echo: {e}"))?;
                    if back != ping.as_bytes() {
                        return Err(format!("#{i} echo {back:?}"));
                    }
                    Ok(())
                })
            })
            .collect();
        runs.into_iter()
            .filter_map(|r| r.join().unwrap().err())
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {n} parallel streams failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Logs `user` in with a `$JAUNT_HOME` of their own; returns it.
fn login_home(c: &Cluster, user: &str) -> PathBuf {
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

/// Waits until `path` exists (a listener came up), bounded.
fn wait_for_path(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{what} never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether bytes written to the Unix socket at `path` come back (through an ssh -L forward).
fn echoes_through(path: &Path) -> bool {
    let Ok(mut conn) = UnixStream::connect(path) else {
        return false;
    };
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    if conn.write_all(b"ping through -L\n").is_err() {
        return false;
    }
    let mut back = [0u8; 16];
    conn.read_exact(&mut back).is_ok() && &back == b"ping through -L\n"
}

#[test]
fn ssh_flags_default_login_and_unknown_nodes() {
    let (c, _sshd, _agent) = ssh_setup();

    // A node that does not exist: the reason and where to look, no OpenSSH noise.
    let o = c.run(&["ssh", "root@node2", "--", "true"], None);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(r#"no such node "node2""#) && err.contains("see `jaunt ls`"),
        "{err}"
    );
    assert!(
        !err.contains("kex_exchange_identification") && !err.contains("65535"),
        "{err}"
    );

    // alice has one login, so it is the default; -l names it too.
    assert_eq!(
        ok(c.run(&["ssh", "node1", "--", "whoami"], None)).trim(),
        "root"
    );
    assert_eq!(
        ok(c.run(&["ssh", "-l", "root", "node1", "--", "whoami"], None)).trim(),
        "root"
    );
    // With two logins, jaunt ssh asks which and names them.
    ok(c.admin(
        &[
            "users",
            "add",
            "carol",
            "--roles",
            "access",
            "--logins",
            "root,daemon",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    let carol = login_home(&c, "carol");
    let err = fails(run_jaunt(&carol, &["ssh", "node1", "--", "true"], None));
    assert!(
        err.contains("root") && err.contains("daemon") && err.contains("LOGIN@node1"),
        "{err}"
    );

    // Terminals: -tt forces one, -t asks for one from a terminal (script(1) gives it one),
    // -T refuses one.
    let out = ok(c.run(&["ssh", "-tt", "root@node1", "--", "tty"], None));
    assert!(out.trim().starts_with("/dev/pts/"), "{out:?}");
    let o = Command::new("script")
        .args([
            "-qec",
            &format!("{} ssh -t root@node1 -- tty", jaunt_bin()),
            "/dev/null",
        ])
        .env("JAUNT_HOME", &c.home)
        .env("HOME", &c.home)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("/dev/pts/"), "{:?}", stdout(&o));
    let o = c.run(&["ssh", "-T", "root@node1", "--", "tty"], None);
    assert_eq!(stdout(&o).trim(), "not a tty");
    // -v and -o reach ssh.
    let o = c.run(
        &[
            "ssh",
            "-v",
            "-o",
            "ServerAliveInterval=30",
            "root@node1",
            "--",
            "true",
        ],
        None,
    );
    assert!(
        o.status.success() && stderr(&o).contains("debug1:"),
        "{}",
        stderr(&o)
    );
    let err = fails(c.run(&["ssh", "-o", "nonsense", "root@node1", "--", "true"], None));
    assert!(err.contains("KEY=VALUE"), "{err}");

    // -L: a TCP echo behind the node, through a local Unix socket (no local port to pick).
    let echo = echo_server().to_string();
    let sock = c.dir.path().join("fwd.sock");
    let _forward = Reaped(
        Command::new(jaunt_bin())
            .args([
                "ssh",
                "-N",
                "-L",
                &format!("{}:{echo}", sock.display()),
                "root@node1",
            ])
            .env("JAUNT_HOME", &c.home)
            .env("HOME", &c.home)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_path(&sock, "the -L socket");
    assert!(echoes_through(&sock), "-L did not reach the echo server");

    // A role without port or agent forwarding: jaunt ssh refuses -L and -A up front ...
    let role = c.dir.path().join("noforward.yaml");
    std::fs::write(
        &role,
        "kind: role\nversion: v1\nmetadata:\n  name: noforward\nspec:\n  options:\n    \
         permit_port_forwarding: false\n    permit_agent_forwarding: false\n  allow:\n    \
         logins: [root]\n    node_labels: {'*': '*'}\n",
    )
    .unwrap();
    ok(c.admin(&["create", "-f", role.to_str().unwrap()], None));
    ok(c.admin(
        &[
            "users",
            "add",
            "bob",
            "--roles",
            "noforward",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    let bob = login_home(&c, "bob");
    // The agent learns of a new role by its policy poll (issue 15 makes that a push): wait
    // until bob gets in, bounded.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = run_jaunt(&bob, &["ssh", "root@node1", "--", "whoami"], None);
        if o.status.success() {
            assert_eq!(stdout(&o).trim(), "root");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bob never got in: {}",
            stderr(&o)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let err = fails(run_jaunt(
        &bob,
        &[
            "ssh",
            "-L",
            &format!("1234:{echo}"),
            "root@node1",
            "--",
            "true",
        ],
        None,
    ));
    assert!(err.contains("permit_port_forwarding"), "{err}");
    let err = fails(run_jaunt(
        &bob,
        &[
            "ssh",
            "-o",
            "LocalForward=1234 127.0.0.1:1",
            "root@node1",
            "--",
            "true",
        ],
        None,
    ));
    assert!(err.contains("permit_port_forwarding"), "{err}");
    let err = fails(run_jaunt(
        &bob,
        &["ssh", "-A", "root@node1", "--", "true"],
        None,
    ));
    assert!(err.contains("permit_agent_forwarding"), "{err}");
    // ... and sshd refuses it too (the certificate lacks the extension), when plain ssh
    // asks through the `jaunt config` block.
    let config = c.dir.path().join("bob.ssh_config");
    std::fs::write(&config, ok(run_jaunt(&bob, &["config"], None))).unwrap();
    let bob_sock = c.dir.path().join("bob-fwd.sock");
    let _plain = Reaped(
        Command::new("ssh")
            .args([
                "-F",
                config.to_str().unwrap(),
                "-N",
                "-L",
                &format!("{}:{echo}", bob_sock.display()),
                "root@node1.dev.jaunt.local",
            ])
            .env("HOME", &bob)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_path(&bob_sock, "bob's -L socket");
    assert!(
        !echoes_through(&bob_sock),
        "sshd let a certificate without permit-port-forwarding forward"
    );
}

/// A node's sshd and its agent (process, data dir).
type Node = (Sshd, (Reaped, PathBuf));

/// A dev cluster, alice (login root) logged in, and two agents with their own sshd:
/// node1 (env=prod, team=a) and node2 (env=prod, team=b).
fn two_nodes() -> (Cluster, Vec<Node>) {
    let c = Cluster::dev();
    ok(c.admin(
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
        Some(PASSWORD),
    ));
    ok(c.login("alice", PASSWORD, &[]));
    let mut nodes = Vec::new();
    for (name, labels) in [("node1", "env=prod,team=a"), ("node2", "env=prod,team=b")] {
        let sshd = Sshd::start_named(&c, name);
        let agent = start_agent(&c, name, &["--ssh", &sshd.addr, "--labels", labels]);
        nodes.push((sshd, agent));
    }
    wait_for_ssh(&c, "root@node1");
    wait_for_ssh(&c, "root@node2");
    (c, nodes)
}

fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

#[test]
fn label_fan_out_and_label_filters() {
    let (c, _nodes) = two_nodes();

    // jaunt ls filters by labels and by text.
    let names = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["ls"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--format", "json"]);
        let out = ok(c.run(&all, None));
        let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        listed
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&["env=prod"]), ["node1", "node2"]);
    assert_eq!(names(&["nodes", "team=b"]), ["node2"]);
    assert_eq!(names(&["env=prod,team=a"]), ["node1"]);
    assert_eq!(names(&["env=prod", "team=a"]), ["node1"]);
    assert_eq!(names(&["--search", "NODE2"]), ["node2"]);
    assert!(names(&["env=dev"]).is_empty());
    let table = ok(c.run(&["ls", "team=a"], None));
    assert!(
        table.contains("node1") && !table.contains("node2"),
        "{table}"
    );

    // Every prod node runs the command; each line says where it came from.
    let o = c.run(
        &["ssh", "root@env=prod", "--", "printenv", "JAUNT_TEST_NODE"],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(sorted_lines(&stdout(&o)), ["node1: node1", "node2: node2"]);
    assert!(
        stderr(&o).contains("2 nodes: 2 succeeded"),
        "{}",
        stderr(&o)
    );

    // One node failing fails the whole run, and the summary names it.
    let o = c.run(
        &[
            "ssh",
            "--parallel",
            "1",
            "root@env=prod",
            "--",
            "echo ran; test \"$JAUNT_TEST_NODE\" = node1",
        ],
        None,
    );
    assert!(!o.status.success());
    assert_eq!(sorted_lines(&stdout(&o)), ["node1: ran", "node2: ran"]);
    assert!(
        stderr(&o).contains("1 succeeded, 1 failed: node2 (exit 1)"),
        "{}",
        stderr(&o)
    );

    // A narrower selector, the default login, and no match at all.
    let o = c.run(
        &["ssh", "team=b", "--", "printenv", "JAUNT_TEST_NODE"],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "node2: node2");
    let err = fails(c.run(&["ssh", "root@env=dev", "--", "true"], None));
    assert!(err.contains("no node has the labels env=dev"), "{err}");
    let err = fails(c.run(&["ssh", "root@env=prod"], None));
    assert!(err.contains("COMMAND"), "{err}");

    // A user whose roles reach only team=a fans out to node1 only, and succeeds: nodes the
    // roles do not allow are not "every node the user may reach".
    let role = c.dir.path().join("team-a.yaml");
    std::fs::write(
        &role,
        "kind: role\nversion: v1\nmetadata:\n  name: team-a\nspec:\n  allow:\n    \
         logins: [root]\n    node_labels: {team: a}\n",
    )
    .unwrap();
    ok(c.admin(&["create", "-f", role.to_str().unwrap()], None));
    ok(c.admin(
        &[
            "users",
            "add",
            "carol",
            "--roles",
            "team-a",
            "--password-stdin",
        ],
        Some(PASSWORD),
    ));
    let carol = login_home(&c, "carol");
    let o = run_jaunt(
        &carol,
        &["ssh", "root@env=prod", "--", "printenv", "JAUNT_TEST_NODE"],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(sorted_lines(&stdout(&o)), ["node1: node1"]);
    assert!(
        stderr(&o).contains("1 nodes: 1 succeeded"),
        "{}",
        stderr(&o)
    );
}

/// `ansible` from ansible-core (PyPI; `.ci/run` installs it).
fn ansible_binary() -> &'static str {
    let found = Command::new("ansible")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "ansible is not installed (python3 -m pip install ansible-core; .ci/run does this)"
    );
    "ansible"
}

fn sha256_tree(dir: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg("find . -type f | LC_ALL=C sort | xargs sha256sum")
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    stdout(&out)
}

#[test]
fn jaunt_config_serves_plain_ssh_rsync_and_ansible() {
    let ansible = ansible_binary();
    let (c, _nodes) = two_nodes();
    let config = c.dir.path().join("ssh_config");
    let block = ok(c.run(&["config"], None));
    assert!(block.contains("Host *.dev.jaunt.local"), "{block}");
    assert!(block.contains("proxy ssh %r@%h:%p"), "{block}");
    std::fs::write(&config, &block).unwrap();
    let ssh = |args: &[&str]| {
        Command::new("ssh")
            .arg("-F")
            .arg(&config)
            .args(args)
            .env("HOME", &c.home)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };

    // Plain ssh, as NODE.<cluster>.
    let o = ssh(&["root@node2.dev.jaunt.local", "printenv", "JAUNT_TEST_NODE"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "node2");

    // rsync -e ssh of a directory, there and back, checksums equal.
    let src = c.dir.path().join("tree");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    for i in 0..20u32 {
        let body: Vec<u8> = (0..(i * 5000)).map(|j| (j * 31 + i) as u8).collect();
        let dir = if i % 2 == 0 {
            src.clone()
        } else {
            src.join("sub")
        };
        std::fs::write(dir.join(format!("f{i}.bin")), body).unwrap();
    }
    let remote = c.dir.path().join("remote-tree");
    let back = c.dir.path().join("back-tree");
    let e = format!("ssh -F {}", config.display());
    for (from, to) in [
        (
            format!("{}/", src.display()),
            format!("root@node1.dev.jaunt.local:{}/", remote.display()),
        ),
        (
            format!("root@node1.dev.jaunt.local:{}/", remote.display()),
            format!("{}/", back.display()),
        ),
    ] {
        let o = Command::new("rsync")
            .args(["-a", "--checksum", "-e", &e, &from, &to])
            .env("HOME", &c.home)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(o.status.success(), "rsync {from} {to}: {}", stderr(&o));
    }
    let sums = sha256_tree(&src);
    assert_eq!(sums.lines().count(), 20);
    assert_eq!(sha256_tree(&remote), sums);
    assert_eq!(sha256_tree(&back), sums);

    // Ansible: ping and a command on both nodes through the same block.
    let inventory = c.dir.path().join("inventory.ini");
    std::fs::write(
        &inventory,
        format!(
            "[nodes]\nnode1.dev.jaunt.local\nnode2.dev.jaunt.local\n\n[nodes:vars]\n\
             ansible_user=root\nansible_ssh_common_args='-F {}'\n\
             ansible_python_interpreter=/usr/bin/python3\n",
            config.display()
        ),
    )
    .unwrap();
    let run_ansible = |args: &[&str]| {
        let o = Command::new(ansible)
            .args(["all", "-i", inventory.to_str().unwrap()])
            .args(args)
            .env("HOME", &c.home)
            .env("ANSIBLE_HOST_KEY_CHECKING", "True")
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_LOCAL_TEMP", c.dir.path().join("ansible-tmp"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "ansible {args:?}: {}\n{}",
            stdout(&o),
            stderr(&o)
        );
        stdout(&o)
    };
    let out = run_ansible(&["-m", "ping"]);
    for node in ["node1", "node2"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("{node}.dev.jaunt.local | SUCCESS"))),
            "{out}"
        );
    }
    assert_eq!(out.matches("\"pong\"").count(), 2, "{out}");
    let out = run_ansible(&["-m", "command", "-a", "hostname"]);
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    for node in ["node1", "node2"] {
        assert!(
            out.contains(&format!("{node}.dev.jaunt.local | CHANGED | rc=0")),
            "{out}"
        );
    }
    assert_eq!(out.matches(hostname.trim()).count(), 2, "{out}");
    let out = run_ansible(&["-m", "command", "-a", "printenv JAUNT_TEST_NODE"]);
    assert!(
        out.contains("node1.dev.jaunt.local | CHANGED | rc=0 >>\nnode1")
            && out.contains("node2.dev.jaunt.local | CHANGED | rc=0 >>\nnode2"),
        "{out}"
    );
}

/// Speed (BENCHMARKS.md, "jaunt ssh setup"): the time of `jaunt ssh root@node1 true` against
/// `ssh` straight to the same sshd with the same certificate, interleaved; then 100 parallel
/// sessions against one. Prints same-run ratios; asserts only that every session worked.
#[test]
#[ignore = "measurement: cargo test -p jaunt-control --test fleet -- --ignored --nocapture measure"]
fn measure_ssh_setup_against_plain_ssh() {
    let (c, sshd, _agent) = ssh_setup();
    let keys = c.keys_dir();
    let (_, port) = sshd.addr.rsplit_once(':').unwrap();
    let direct = || {
        let o = Command::new("ssh")
            .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o"])
            .arg("IdentityAgent=none")
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                keys.join("known_hosts").display()
            ))
            .args([
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "HostKeyAlias=node1",
            ])
            .arg("-i")
            .arg(keys.join("alice-ssh"))
            .arg("-o")
            .arg(format!(
                "CertificateFile={}",
                keys.join("alice-ssh-cert.pub").display()
            ))
            .args(["-p", port, "root@127.0.0.1", "true"])
            .env("HOME", &c.home)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let through = || {
        ok(c.run(&["ssh", "root@node1", "--", "true"], None));
    };
    let time = |f: &dyn Fn()| {
        let t = Instant::now();
        f();
        t.elapsed()
    };
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (mut plain, mut jaunt) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        plain.push(time(&direct));
        jaunt.push(time(&through));
    }
    let (plain, jaunt) = (median(plain), median(jaunt));
    println!(
        "setup: ssh direct {plain:?}, jaunt ssh {jaunt:?}, ratio {:.2}x",
        jaunt.as_secs_f64() / plain.as_secs_f64()
    );
    let n = stress(100);
    let t = Instant::now();
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..n).map(|_| s.spawn(through)).collect();
        for r in runs {
            r.join().unwrap();
        }
    });
    let total = t.elapsed();
    println!(
        "{n} parallel jaunt ssh: {total:?} in all, {:?} per session = {:.2}x one session alone",
        total / u32::try_from(n).unwrap(),
        total.as_secs_f64() / n as f64 / jaunt.as_secs_f64()
    );
}
