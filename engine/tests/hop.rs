//! Cross-shard hops: an engine with 2 shards, a stand-in agent with a tunnel to one of them, and
//! users whose connections land on the other. Their streams are served through the agent's
//! shard (`server/hop.rs`): bytes arrive intact both ways, a half-close travels, the hop is
//! counted, an agent's refusal reaches the user, and killing the tunnel mid-hop ends the user's
//! connection promptly.
//!
//! Which shard a connection lands on is the kernel's `SO_REUSEPORT` hash: a test opens user
//! connections until the per-shard hop counter shows that one went through a hop. No test orders
//! events with a sleep: every wait is for a condition, with a deadline. (The harness is a
//! trimmed copy of `server.rs`'s.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should stop the test"
)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jaunt_config::identity::{Identity, IdentityKind};
use jaunt_config::wire::agent_hello::{AgentHello, Resource, ResourceKind, ResourceProtocol};
use jaunt_config::wire::{DialKind, DialResponse};
use jaunt_engine::route::{ALPN_TCP, ALPN_TUNNEL};
use jaunt_engine::server::{EngineHandle, Snapshot};
use jaunt_testkit::engine::{engine_config, snapshot_trusting, start_engine, tls_configs};
use jaunt_testkit::net::{dial, request, sum_metric, tls_connect, Tls};
use jaunt_testkit::pki::{client_config, Ca};
use jaunt_testkit::tunnel::{AgentPlan, StandInAgent, Stop};
use jaunt_testkit::wait::wait_for;
use jaunt_testkit::{PUBLIC_HOST, WAIT};

const CLUSTER: &str = "test-cluster";
/// Bound on noticing that the tunnel under a hop died.
const PROMPTLY: Duration = Duration::from_secs(5);
/// Connections tried before concluding the kernel never spreads them (2^-64 odds).
const TRIES: usize = 64;

// ---------------------------------------------------------------------------------------------
// PKI

fn identity(kind: IdentityKind, name: &str) -> Identity {
    jaunt_testkit::pki::identity(kind, name, CLUSTER)
}

// ---------------------------------------------------------------------------------------------
// Harness

struct Harness {
    web: Ca,
    user: Ca,
    host: Ca,
    engine: Option<EngineHandle>,
    _snapshots: crossbeam_channel::Sender<Arc<Snapshot>>,
}

impl Harness {
    fn start() -> Harness {
        let (web, user, host) = (
            Ca::new("Hop Test Web CA"),
            Ca::new("Hop Test User CA"),
            Ca::new("Hop Test Host CA"),
        );
        // Control is never dialled here.
        let mut config = engine_config(CLUSTER, 2);
        config.diag_addr = Some("127.0.0.1:0".parse().unwrap());
        let tls = tls_configs(&web, &[PUBLIC_HOST, "127.0.0.1"], &user, &host);
        let snapshot = snapshot_trusting(CLUSTER, &user, &host);
        let (engine, tx) = start_engine(config, tls, snapshot, WAIT);
        Harness {
            web,
            user,
            host,
            engine: Some(engine),
            _snapshots: tx,
        }
    }

    fn engine(&self) -> &EngineHandle {
        self.engine.as_ref().unwrap()
    }

    fn addr(&self) -> SocketAddr {
        self.engine().local_addr()
    }

    /// Sum of a metric's samples whose labels include every `labels` pair.
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        sum_metric(&self.engine().metrics_text(), name, labels)
    }

    /// Starts a stand-in agent for `host_id` and waits until the engine has registered its
    /// tunnel: the agent learns its shard from the engine's tunnel hello, before the engine has
    /// read the AgentHello, so a dial right away could race the registration ("no such app").
    fn agent(&self, host_id: &str, node: &str) -> HopAgent {
        let agent = HopAgent::start(self.addr(), self.agent_config(host_id), node);
        let shard = agent.shard.to_string();
        wait_for("the agent's tunnel", || {
            self.metric("jaunt_tunnels", &[("shard", &shard)]) == 1
        });
        agent
    }

    fn agent_config(&self, host_id: &str) -> Arc<rustls::ClientConfig> {
        let cert = self.host.identity(&identity(IdentityKind::Host, host_id));
        client_config(&self.web, &[ALPN_TUNNEL], Some(cert))
    }

    /// Connects as alice and dials TCP app `target`.
    fn dial(&self, target: &str) -> (DialResponse, Tls) {
        let cert = self.user.identity(&identity(IdentityKind::User, "alice"));
        let config = client_config(&self.web, &[ALPN_TCP], Some(cert));
        let mut tls = tls_connect(self.addr(), config, PUBLIC_HOST);
        tls.sock.set_nodelay(true).unwrap();
        let response = dial(&mut tls, &request(DialKind::Tcp, target)).unwrap();
        (response, tls)
    }

    /// Dials `target` until a connection lands on `shard` (seen by its hop counter moving),
    /// and returns that one. Every dial must succeed, whichever shard it lands on.
    fn dial_through_hop(&self, shard: usize, target: &str) -> Tls {
        let shard = shard.to_string();
        let hops = || {
            self.metric(
                "jaunt_cross_shard_hops_total",
                &[("shard", &shard), ("result", "ok")],
            )
        };
        for _ in 0..TRIES {
            let before = hops();
            let (response, tls) = self.dial(target);
            assert!(response.ok, "{response:?}");
            // The hop is counted before the dial response is written.
            if hops() > before {
                return tls;
            }
        }
        panic!("{TRIES} connections and none landed on shard {shard}");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(engine) = self.engine.take() {
            let _ = engine.shutdown(Duration::ZERO);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A stand-in agent: one tunnel (to whichever shard it lands on), echoing every stream

/// The testkit's stand-in agent, announcing TCP apps `echo` and `refuse-me`.
struct HopAgent {
    /// The shard its tunnel is on.
    shard: usize,
    /// Dropping it kills the agent: its tasks and socket go without a goodbye.
    agent: StandInAgent,
}

impl HopAgent {
    fn start(addr: SocketAddr, config: Arc<rustls::ClientConfig>, node: &str) -> HopAgent {
        let hello = AgentHello::new(
            node,
            Default::default(),
            ["echo", "refuse-me"]
                .into_iter()
                .map(|name| Resource {
                    kind: ResourceKind::Tcp,
                    name: name.into(),
                    labels: Default::default(),
                    protocol: ResourceProtocol::Tcp,
                })
                .collect(),
        );
        let agent = StandInAgent::start(addr, config, AgentPlan::with_hello(hello));
        HopAgent {
            shard: agent.hello.recv_timeout(WAIT).unwrap().shard,
            agent,
        }
    }

    fn kill(&mut self) {
        let _ = self.agent.stop.send(Stop::Kill);
        self.agent.done.recv_timeout(WAIT).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Stream contents

/// Byte `offset` of the test pattern (period 251 × 4099, so no power-of-two size lines up).
fn byte_at(offset: usize) -> u8 {
    (offset % 251) as u8 ^ (offset / 4099) as u8
}

fn fill(buf: &mut [u8], offset: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = byte_at(offset + i);
    }
}

/// FNV-1a over `bytes`, continuing from `hash`.
fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

// ---------------------------------------------------------------------------------------------
// Tests

/// A user on the shard without the agent's tunnel is served through the other shard: a few MiB
/// echo intact (checksums and every byte), the user's half-close reaches the agent and its
/// reply and EOF come back, and the hop is counted as `ok` on the user's shard.
#[test]
fn a_user_on_the_other_shard_reaches_the_agent_through_a_hop() {
    const TOTAL: usize = 3 * 1024 * 1024 + 12_345;
    const STEP: usize = 48 * 1024;
    /// Sent without waiting for its echo, then the half-close.
    const TAIL: usize = 200_000;
    let h = Harness::start();
    let agent = h.agent("host-7", "node7");
    let other = 1 - agent.shard;
    let mut tls = h.dial_through_hop(other, "echo");

    let (mut sent_hash, mut echo_hash) = (FNV_START, FNV_START);
    let mut buf = vec![0u8; STEP];
    let mut offset = 0;
    // Lock-step: a chunk out, its echo back.
    while offset < TOTAL - TAIL {
        let n = STEP.min(TOTAL - TAIL - offset);
        fill(&mut buf[..n], offset);
        sent_hash = fnv(sent_hash, &buf[..n]);
        tls.write_all(&buf[..n]).unwrap();
        tls.flush().unwrap();
        let mut echo = vec![0u8; n];
        tls.read_exact(&mut echo).unwrap();
        for (i, &b) in echo.iter().enumerate() {
            assert_eq!(b, byte_at(offset + i), "echo byte {}", offset + i);
        }
        echo_hash = fnv(echo_hash, &echo);
        offset += n;
    }
    // The tail, then a half-close (close_notify and FIN), before reading its echo: the agent
    // sees the user's EOF only after the bytes, and its echo and EOF still come back.
    let mut tail = vec![0u8; TAIL];
    fill(&mut tail, offset);
    sent_hash = fnv(sent_hash, &tail);
    tls.write_all(&tail).unwrap();
    tls.conn.send_close_notify();
    tls.flush().unwrap();
    tls.sock.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len(), TAIL, "the echo of the tail, then EOF");
    echo_hash = fnv(echo_hash, &rest);
    assert_eq!(echo_hash, sent_hash, "checksum of {TOTAL} bytes");
    assert!(rest
        .iter()
        .enumerate()
        .all(|(i, &b)| b == byte_at(offset + i)));

    assert!(
        h.metric(
            "jaunt_cross_shard_hops_total",
            &[("shard", &other.to_string()), ("result", "ok")]
        ) >= 1
    );
    assert_eq!(
        h.metric("jaunt_cross_shard_hops_total", &[("result", "miss")]),
        0
    );
    assert_eq!(
        h.metric(
            "jaunt_cross_shard_hops_total",
            &[("shard", &agent.shard.to_string())]
        ),
        0,
        "the agent's own shard never hops"
    );
    // The session ended on both shards: nothing left open.
    wait_for("streams closed", || {
        h.metric("jaunt_streams_open", &[]) == 0
    });
}

/// Several users through hops at once, both directions busy: each gets its own bytes back.
#[test]
fn concurrent_hops_keep_streams_apart() {
    let h = Harness::start();
    let agent = h.agent("host-8", "node8");
    let other = 1 - agent.shard;
    let conns: Vec<Tls> = (0..4).map(|_| h.dial_through_hop(other, "echo")).collect();
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(k, mut tls)| {
            std::thread::spawn(move || {
                let start = k * 1_000_003;
                let mut buf = vec![0u8; 40_000];
                let mut echo = vec![0u8; 40_000];
                for round in 0..20 {
                    let offset = start + round * buf.len();
                    fill(&mut buf, offset);
                    tls.write_all(&buf).unwrap();
                    tls.flush().unwrap();
                    tls.read_exact(&mut echo).unwrap();
                    assert!(echo == buf, "stream {k} round {round}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Killing the agent's tunnel under a hopped stream ends the user's connection promptly (the
/// tunnel's shard resets the hop; the user's shard closes the connection).
#[test]
fn killing_the_tunnel_ends_a_hopped_stream_promptly() {
    let h = Harness::start();
    let mut agent = h.agent("host-9", "node9");
    let other = 1 - agent.shard;
    let mut tls = h.dial_through_hop(other, "echo");
    tls.write_all(b"ping").unwrap();
    tls.flush().unwrap();
    let mut echo = [0u8; 4];
    tls.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"ping");

    agent.kill();
    let killed = Instant::now();
    let mut buf = [0u8; 64];
    let ended = match tls.read(&mut buf) {
        Ok(0) => "eof",
        Ok(_) => panic!("bytes after the tunnel died"),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            panic!("the user's connection outlived its tunnel by {WAIT:?}")
        }
        Err(_) => "error",
    };
    let took = killed.elapsed();
    assert!(took < PROMPTLY, "ended ({ended}) after {took:?}");
    wait_for("streams closed", || {
        h.metric("jaunt_streams_open", &[]) == 0
    });
}

/// Moves `total` bytes in lock-step (a 48 KiB write, its echo read back) and returns the time.
fn echo_lockstep(tls: &mut Tls, total: usize) -> Duration {
    const STEP: usize = 48 * 1024;
    let mut buf = vec![0u8; STEP];
    let mut echo = vec![0u8; STEP];
    fill(&mut buf, 0);
    let started = Instant::now();
    let mut moved = 0;
    while moved < total {
        tls.write_all(&buf).unwrap();
        tls.flush().unwrap();
        tls.read_exact(&mut echo).unwrap();
        moved += STEP;
    }
    let took = started.elapsed();
    assert!(echo == buf);
    took
}

/// A hopped session against a local one on the same engine, same run: lock-step echo through
/// TLS, the engine, the tunnel and the stand-in agent, 16 MiB each way.
///
/// `cargo test -p jaunt-engine --test hop --profile bench -- --ignored --nocapture`
#[test]
#[ignore = "a measurement: run with --profile bench -- --ignored --nocapture"]
fn measure_hop_against_local() {
    const TOTAL: usize = 16 * 1024 * 1024;
    let h = Harness::start();
    let agent = h.agent("host-m", "nodem");
    let mut hopped = h.dial_through_hop(1 - agent.shard, "echo");
    let mut local = loop {
        let before = h.metric("jaunt_cross_shard_hops_total", &[("result", "ok")]);
        let (response, tls) = h.dial("echo");
        assert!(response.ok, "{response:?}");
        if h.metric("jaunt_cross_shard_hops_total", &[("result", "ok")]) == before {
            break tls;
        }
    };
    echo_lockstep(&mut hopped, 1 << 20);
    echo_lockstep(&mut local, 1 << 20);
    let mut ratios = Vec::new();
    for _ in 0..3 {
        let hop = echo_lockstep(&mut hopped, TOTAL);
        let loc = echo_lockstep(&mut local, TOTAL);
        println!(
            "16 MiB lock-step echo: hop {:.0} ms ({:.0} MiB/s each way), local {:.0} ms \
             ({:.0} MiB/s); hop / local time {:.2}",
            hop.as_secs_f64() * 1e3,
            16.0 / hop.as_secs_f64(),
            loc.as_secs_f64() * 1e3,
            16.0 / loc.as_secs_f64(),
            hop.as_secs_f64() / loc.as_secs_f64()
        );
        ratios.push(hop.as_secs_f64() / loc.as_secs_f64());
    }
    println!("hop / local time ratios: {ratios:.2?}");
}

/// The agent refusing a hopped stream reaches the user as a readable dial error, counted as a
/// hop `error` on the user's shard (not as a miss).
#[test]
fn a_refusal_through_a_hop_reaches_the_user() {
    let h = Harness::start();
    let agent = h.agent("host-r", "noder");
    let other = (1 - agent.shard).to_string();
    let errors = || {
        h.metric(
            "jaunt_cross_shard_hops_total",
            &[("shard", &other), ("result", "error")],
        )
    };
    let mut refused_via_hop = false;
    for _ in 0..TRIES {
        let before = errors();
        let (response, _) = h.dial("refuse-me");
        assert!(!response.ok);
        assert_eq!(
            response.error.as_deref(),
            Some(
                r#"agent "host-r" could not connect to app "refuse-me": connection refused by the test target"#
            )
        );
        if errors() > before {
            refused_via_hop = true;
            break;
        }
    }
    assert!(refused_via_hop, "no dial landed on shard {other}");
    assert_eq!(
        h.metric("jaunt_cross_shard_hops_total", &[("result", "miss")]),
        0
    );
}
