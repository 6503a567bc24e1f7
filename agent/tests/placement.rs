//! `agent.cpu_placement` end to end: the real agent ([`jaunt_agent::run`] with
//! `follow-engine`) with tunnels to both pinned shards of a real [`Engine`] on 127.0.0.1. While
//! a user's small requests go through one shard, the agent's executor thread comes to run only
//! on that shard's CPU (the kernel's own view: `/proc/self/task/*/status`); with `off`, it
//! never does.
//!
//! No test orders events with a sleep: each waits for a condition with a deadline.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should stop the test"
)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use jaunt_agent::{AgentCommand, AgentSettings, CpuPlacement};
use jaunt_config::file::AgentServices;
use jaunt_config::identity::IdentityKind;
use jaunt_config::wire::DialKind;
use jaunt_config::wire::ALPN_TCP;
use jaunt_testkit::agent::{settings, tcp_app};
use jaunt_testkit::engine::{engine_config, snapshot_trusting, start_engine, tls_configs};
use jaunt_testkit::net::{exchange, request, tls_connect};
use jaunt_testkit::pki::{client_config, identity, Ca};
use jaunt_testkit::services::serve_each;
use jaunt_testkit::wait::wait_for_within;
use jaunt_testkit::PUBLIC_HOST;

const CLUSTER: &str = "placement-cluster";
/// Bound on every wait; generous for a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(30);

/// A TCP server that echoes what it reads.
fn start_echo() -> SocketAddr {
    serve_each(|mut conn| {
        let _ = conn.set_nodelay(true);
        let mut buf = [0u8; 4096];
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 || conn.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    })
}

/// This process's first thread named `name` (a thread's helpers, such as glommio's blocking
/// pool, inherit its name and come later): (thread id, status text, CPU ticks so far).
fn thread(name: &str) -> (String, String, u64) {
    let mut all = threads(name);
    all.sort_by_key(|t| t.0.parse::<u64>().unwrap());
    all.into_iter().next().unwrap()
}

/// This process's threads named `name`: (thread id, status text, CPU ticks so far).
fn threads(name: &str) -> Vec<(String, String, u64)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let dir = task.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if comm.trim_end() != name {
            continue;
        }
        let (Ok(status), Ok(stat)) = (
            std::fs::read_to_string(dir.join("status")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            continue;
        };
        // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split(' ').collect();
        let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        found.push((
            task.file_name().to_string_lossy().into_owned(),
            status,
            ticks,
        ));
    }
    found
}

/// The CPUs a thread may run on, from its status text (`Cpus_allowed_list: 0-1`).
fn allowed(status: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_owned()
}

/// Runs an agent (thread `agent_thread`) with `placement` beside a 2-shard pinned engine, sends
/// small echoes through one user session until `done(agent's allowed CPUs)` or `deadline`, and
/// returns (the agent's allowed CPUs at the end, the allowed CPU of the shard that did the
/// most work meanwhile).
fn small_requests(
    placement: CpuPlacement,
    agent_thread: &str,
    deadline: Duration,
    mut done: impl FnMut(&str) -> bool,
) -> (String, String) {
    let (web, user_ca) = (Ca::new("web"), Ca::new("user"));
    let tls = tls_configs(&web, &[PUBLIC_HOST], &user_ca, &web);
    let snapshot = snapshot_trusting(CLUSTER, &user_ca, &web);
    let mut config = engine_config(CLUSTER, 2);
    // The point is the shards' CPUs: pinned, as `jaunt start` has them by default.
    config.pin_shards = true;
    let (engine, snapshots) = start_engine(config, tls, snapshot, WAIT);

    let echo = start_echo();
    let (chain, key) =
        web.identity_with_serial(&identity(IdentityKind::Host, "host-placement", CLUSTER), 3);
    let agent_tls = jaunt_agent::client_config(chain, key, &[web.der()]).unwrap();
    let settings = AgentSettings {
        name: "placement-node".into(),
        cpu_placement: placement,
        ..settings(
            engine.local_addr(),
            agent_tls,
            AgentServices {
                ssh: None,
                apps: vec![tcp_app("echo", echo)],
                dbs: vec![],
            },
        )
    };
    let (control, control_rx) = crossbeam_channel::unbounded();
    let agent = std::thread::Builder::new()
        .name(agent_thread.into())
        .spawn(move || jaunt_agent::run(settings, control_rx))
        .unwrap();
    wait_for_within(WAIT, "a tunnel on both shards", || {
        engine
            .inventory()
            .first()
            .is_some_and(|a| a.shards == [0, 1])
    });
    let shards = || vec![thread("jaunt-shard-0"), thread("jaunt-shard-1")];
    // Both shards are pinned, each to its own CPU.
    let before = shards();
    assert_eq!(before.len(), 2, "two shard threads");
    assert!(
        before
            .iter()
            .all(|(_, status, _)| !allowed(status).contains([',', '-'])),
        "shards pinned: {:?}",
        before.iter().map(|t| allowed(&t.1)).collect::<Vec<_>>()
    );

    let user = client_config(
        &web,
        &[ALPN_TCP],
        Some(user_ca.identity_with_serial(&identity(IdentityKind::User, "alice", CLUSTER), 3)),
    );
    let mut session = tls_connect(engine.local_addr(), user, PUBLIC_HOST);
    assert_eq!(
        exchange(&mut session, &request(DialKind::Tcp, "echo"), b"x", 1).unwrap(),
        b"x"
    );
    let msg = [0x42u8; 64];
    let mut back = [0u8; 64];
    let start = Instant::now();
    let agent_cpus = loop {
        for _ in 0..100 {
            session.write_all(&msg).unwrap();
            session.flush().unwrap();
            session.read_exact(&mut back).unwrap();
            assert_eq!(back, msg);
        }
        let now = allowed(&thread(agent_thread).1);
        if done(&now) || start.elapsed() > deadline {
            break now;
        }
    };
    let after = shards();
    let busiest = after
        .iter()
        .max_by_key(|(tid, _, ticks)| {
            let was = before.iter().find(|b| &b.0 == tid).map_or(0, |b| b.2);
            ticks - was
        })
        .map(|(_, status, _)| allowed(status))
        .unwrap();

    drop(session);
    control.send(AgentCommand::Shutdown).unwrap();
    agent.join().unwrap().unwrap();
    drop(snapshots);
    engine.shutdown(Duration::from_secs(1)).unwrap();
    (agent_cpus, busiest)
}

fn cpus_available() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One test (not two in parallel): each run has an engine with two pinned shards, and the
/// agent's metrics are process-wide.
#[test]
fn the_agent_runs_on_the_cpu_of_the_local_shard_serving_small_requests_unless_off() {
    if cpus_available() < 2 {
        eprintln!("skipped: one CPU, nothing to place");
        return;
    }
    // Off: long enough for `follow-engine` to have pinned several times over (it needs two
    // ticks of 200 ms); the answer is read from the kernel, not from the agent.
    let (agent, _) = small_requests(
        CpuPlacement::Off,
        "unplaced-agent",
        Duration::from_secs(2),
        |_| false,
    );
    assert!(
        agent.contains([',', '-']),
        "agent pinned with placement off: {agent}"
    );
    assert_eq!(jaunt_agent::metrics::cpu_pinned(), None);

    let (agent, shard) = small_requests(CpuPlacement::FollowEngine, "placed-agent", WAIT, |cpus| {
        !cpus.contains([',', '-'])
    });
    assert!(!agent.contains([',', '-']), "agent never pinned: {agent}");
    assert_eq!(agent, shard, "pinned beside the shard doing the work");
    let text = jaunt_agent::metrics::render();
    assert!(
        text.contains(&format!("jaunt_agent_cpu_pinned {shard}\n")),
        "{text}"
    );
}
