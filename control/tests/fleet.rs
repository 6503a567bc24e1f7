//! `jaunt ssh` as fleets, scripts and Ansible use it, end to end with real OpenSSH: many
//! sessions at once (the dial's answer and the node's first bytes often arrive in one read),
//! and many `jaunt proxy tcp` streams to a service that speaks first.
//!
//! Counts are small enough for CI; `JAUNT_STRESS=N` runs N of each (the stress run is
//! `JAUNT_STRESS=200`, five times).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
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
