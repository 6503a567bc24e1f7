//! The agent against a stand-in engine, over real loopback TCP and TLS.
//!
//! The stand-in is written with `jaunt_engine::tunnel` directly (the real engine does not route
//! user streams to agents yet): a glommio TLS listener on 127.0.0.1:0 with a throwaway rcgen
//! host CA and server certificate, requiring client certificates from that CA. For each
//! connection it sends the next scripted `TunnelHello`, reads the `AgentHello` (or notes that
//! the agent closed instead), starts the mux as `Role::Server` and hands the tunnel to the
//! test, which opens streams with `StreamHeader`s. The agent runs with `jaunt_agent::run` on a
//! std thread; local services are std TCP servers on their own threads.
//!
//! Since the stand-in picks the shard index each hello reports, the two-shard test scripts the
//! kernel's choice (shard 0, shard 0 again, shard 1) instead of hoping for it. No test orders
//! events with sleeps: every wait is on the event itself, bounded by [`jaunt_testkit::WAIT`].

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use futures_lite::{future, AsyncReadExt, AsyncWriteExt, StreamExt};
use futures_rustls::TlsAcceptor;
use glommio::net::TcpListener;
use jaunt_agent::{AgentCommand, AgentError, AgentSettings, BackoffConfig};
use jaunt_config::file::{
    AgentServices, AppProtocol, AppService, DbProtocol, DbService, SshService,
};
use jaunt_config::wire::dial::{DialKind, StreamHeader};
use jaunt_config::wire::TunnelHello;
use jaunt_engine::mux;
use jaunt_engine::tunnel::{CloseReason, MuxStream, OpenError, Tunnel};
use jaunt_testkit::agent::{hp, labels, settings, tcp_app};
use jaunt_testkit::pki::{Ca, StandInPki as Pki};
use jaunt_testkit::services::{closed_port, echo_server, sshd, AfterBanner};
use jaunt_testkit::tunnel::{engine_side, Accepted, EngineTunnel};
use jaunt_testkit::wait::{on_executor, within};

/// How soon `run` must return after `Shutdown` when nothing is left to drain.
const PROMPTLY: Duration = Duration::from_secs(5);

const MIB: usize = 1024 * 1024;

/// What the stand-in sshd greets with.
const SSH_BANNER: &str = "SSH-2.0-test\r\n";

// ---------------------------------------------------------------------------------------------
// PKI

// ---------------------------------------------------------------------------------------------
// Local services (std threads)

// ---------------------------------------------------------------------------------------------
// The agent on its own thread

struct Agent {
    control: crossbeam_channel::Sender<AgentCommand>,
    done: crossbeam_channel::Receiver<Result<(), AgentError>>,
}

impl Agent {
    fn start(settings: AgentSettings) -> Agent {
        let (control, control_rx) = crossbeam_channel::unbounded();
        let (done_tx, done) = crossbeam_channel::bounded(1);
        std::thread::Builder::new()
            .name("agent-under-test".into())
            .spawn(move || {
                let _ = done_tx.send(jaunt_agent::run(settings, control_rx));
            })
            .unwrap();
        Agent { control, done }
    }

    fn send(&self, command: AgentCommand) {
        self.control.send(command).unwrap();
    }

    /// Waits (off the executor) for `run` to return; panics if it takes longer than `bound`.
    async fn stopped_within(&self, bound: Duration) -> Result<(), AgentError> {
        let done = self.done.clone();
        let started = Instant::now();
        let result = glommio::executor()
            .spawn_blocking(move || done.recv_timeout(bound))
            .await;
        match result {
            Ok(result) => result,
            Err(_) => panic!(
                "run did not return within {bound:?} (waited {:?})",
                started.elapsed()
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The stand-in engine

struct StandIn {
    addr: SocketAddr,
    accepted: mpsc::UnboundedReceiver<Accepted>,
    /// Hellos to send, one per connection, `(shards, shard)`; `(1, 0)` once empty.
    script: Rc<RefCell<VecDeque<(usize, usize)>>>,
    count: Rc<RefCell<usize>>,
}

impl StandIn {
    fn start(pki: &Pki, script: &[(usize, usize)]) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, accepted) = mpsc::unbounded();
        let script = Rc::new(RefCell::new(
            script.iter().copied().collect::<VecDeque<_>>(),
        ));
        let count = Rc::new(RefCell::new(0));
        let acceptor = TlsAcceptor::from(pki.server.clone());
        let (script2, count2) = (script.clone(), count.clone());
        glommio::spawn_local(async move {
            loop {
                let Ok(tcp) = listener.accept().await else {
                    return;
                };
                *count2.borrow_mut() += 1;
                let next = script2.borrow_mut().pop_front().unwrap_or((1, 0));
                let tx = tx.clone();
                let acceptor = acceptor.clone();
                glommio::spawn_local(async move {
                    let accepted = engine_side(acceptor, tcp, next).await;
                    let _ = tx.unbounded_send(accepted);
                })
                .detach();
            }
        })
        .detach();
        StandIn {
            addr,
            accepted,
            script,
            count,
        }
    }

    async fn next(&mut self) -> Accepted {
        within(
            "the stand-in engine's next connection",
            self.accepted.next(),
        )
        .await
        .unwrap()
    }

    async fn next_tunnel(&mut self) -> EngineTunnel {
        self.next().await.into_tunnel()
    }

    fn push_script(&self, hello: (usize, usize)) {
        self.script.borrow_mut().push_back(hello);
    }

    fn connections(&self) -> usize {
        *self.count.borrow()
    }
}

// ---------------------------------------------------------------------------------------------
// Streams

fn header(kind: DialKind, target: &str) -> Vec<u8> {
    StreamHeader {
        join: None,
        terminal: false,
        kind,
        target: target.into(),
        login: (kind == DialKind::Ssh).then(|| "root".into()),
        db_user: (kind == DialKind::Db).then(|| "alice".into()),
        db_name: None,
        user: "alice".into(),
        roles: vec!["access".into()],
        client_addr: "192.0.2.1:5555".into(),
        allowed_db_users: Vec::new(),
        allowed_db_names: Vec::new(),
        session_id: None,
    }
    .encode()
    .unwrap()
}

async fn open(tunnel: &Tunnel, kind: DialKind, target: &str) -> Result<MuxStream, OpenError> {
    within(
        "the agent's answer to an open",
        tunnel.open(&header(kind, target)),
    )
    .await
}

async fn refused(tunnel: &Tunnel, kind: DialKind, target: &str) -> String {
    match open(tunnel, kind, target).await {
        Err(OpenError::Refused { message }) => message,
        Err(e) => panic!("{target}: expected a refusal, got {e}"),
        Ok(_) => panic!("{target}: expected a refusal, the agent accepted"),
    }
}

/// Byte `i` of the test pattern.
fn pattern(i: usize) -> u8 {
    ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 ^ (i / 4099) as u8
}

/// Sends `len` pattern bytes through an echo stream while reading them back, then half-closes
/// and checks every byte and the echo's EOF.
async fn echo_check(stream: &MuxStream, len: usize) {
    let writer = async {
        let mut s = stream;
        let mut sent = 0;
        let mut chunk = vec![0u8; 64 * 1024];
        while sent < len {
            let n = chunk.len().min(len - sent);
            for (j, b) in chunk[..n].iter_mut().enumerate() {
                *b = pattern(sent + j);
            }
            s.write_all(&chunk[..n]).await.unwrap();
            sent += n;
        }
        s.close().await.unwrap();
    };
    let reader = async {
        let mut s = stream;
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            for (j, &b) in buf[..n].iter().enumerate() {
                assert_eq!(b, pattern(got + j), "byte {} differs", got + j);
            }
            got += n;
            assert!(got <= len, "more bytes came back than were sent");
        }
        got
    };
    let ((), got) = within("the echo", future::zip(writer, reader)).await;
    assert_eq!(got, len);
}

async fn read_line(stream: &MuxStream) -> String {
    let mut s = stream;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        let n = within("a line", s.read(&mut byte)).await.unwrap();
        assert_eq!(n, 1, "EOF before the end of the line");
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Helpers

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn announces_resources_serves_tcp_and_ssh_and_refuses_the_rest() {
    on_executor(|| async {
        let pki = Pki::new();
        let mut engine = StandIn::start(&pki, &[(1, 0)]);
        let echo = echo_server();
        let dead = closed_port();
        let services = AgentServices {
            ssh: Some(SshService {
                addr: hp(sshd(SSH_BANNER, AfterBanner::Discard)),
                labels: labels(&[("os", "test")]),
            }),
            apps: vec![
                tcp_app("echo", echo),
                tcp_app("dead", dead),
                AppService {
                    name: "grafana".into(),
                    uri: "http://127.0.0.1:1".into(),
                    protocol: AppProtocol::Http,
                    addr: "127.0.0.1:1".parse().unwrap(),
                    labels: labels(&[("team", "obs")]),
                },
            ],
            dbs: vec![DbService {
                name: "pg".into(),
                uri: "postgres://127.0.0.1:5432".into(),
                protocol: DbProtocol::Postgres,
                addr: "127.0.0.1:5432".parse().unwrap(),
                labels: BTreeMap::new(),
            }],
        };
        let agent = Agent::start(settings(engine.addr, pki.agent_tls(&pki.host_ca), services));
        let t = engine.next_tunnel().await;

        // The AgentHello lists what is configured.
        assert_eq!(t.hello, TunnelHello::new(1, 0));
        assert_eq!(t.agent.name, "node1");
        assert_eq!(t.agent.labels, labels(&[("env", "test")]));
        let listed: Vec<(&str, &str, &str)> = t
            .agent
            .resources
            .iter()
            .map(|r| (r.kind.as_str(), r.name.as_str(), r.protocol.as_str()))
            .collect();
        assert_eq!(
            listed,
            [
                ("node", "node1", "ssh"),
                ("tcp", "echo", "tcp"),
                ("tcp", "dead", "tcp"),
                ("app", "grafana", "http"),
                ("db", "pg", "postgres"),
            ]
        );
        assert_eq!(t.agent.resources[0].labels, labels(&[("os", "test")]));

        // A TCP app: 8 MiB echoed intact.
        let stream = open(&t.tunnel, DialKind::Tcp, "echo").await.unwrap();
        echo_check(&stream, 8 * MIB).await;
        drop(stream);

        // SSH reaches the local sshd: its banner arrives.
        let stream = open(&t.tunnel, DialKind::Ssh, "node1").await.unwrap();
        assert_eq!(read_line(&stream).await, "SSH-2.0-test\r\n");
        drop(stream);

        // Everything else is refused with a reason a person can read.
        assert_eq!(
            refused(&t.tunnel, DialKind::Tcp, "nope").await,
            "node node1 serves no TCP app named nope"
        );
        assert_eq!(
            refused(&t.tunnel, DialKind::Ssh, "web2").await,
            "this agent is node node1, not web2"
        );
        assert_eq!(
            refused(&t.tunnel, DialKind::Db, "pg").await,
            "database pg: this agent cannot get database client certificates (it runs \
             without a certificate provider; `jaunt agent` has one)"
        );
        assert_eq!(
            refused(&t.tunnel, DialKind::Tcp, "grafana").await,
            "app grafana is an http app, and HTTP apps are not supported by this agent yet"
        );
        assert_eq!(
            refused(&t.tunnel, DialKind::Tcp, "dead").await,
            format!("cannot reach app dead at {dead}: connection refused")
        );
        let garbage = within("a refusal", t.tunnel.open(b"not a header")).await;
        match garbage {
            Err(OpenError::Refused { message }) => assert!(
                message.starts_with("the agent could not read the stream header"),
                "{message}"
            ),
            Err(e) => panic!("garbage header: {e}"),
            Ok(_) => panic!("garbage header accepted"),
        }

        // The tunnel survived all of it.
        let stream = open(&t.tunnel, DialKind::Tcp, "echo").await.unwrap();
        echo_check(&stream, 1000).await;
        drop(stream);

        agent.send(AgentCommand::Shutdown);
        agent.stopped_within(PROMPTLY).await.unwrap();
        assert_eq!(
            within("the tunnel's end", t.driver).await,
            Some(CloseReason::Mux(mux::CloseReason::Drained))
        );
        assert_eq!(
            engine.connections(),
            1,
            "one shard, one tunnel, no extra dials"
        );
    });
}

#[test]
fn reconnects_after_the_engine_drops_the_tunnel_and_drains_on_shutdown() {
    on_executor(|| async {
        let pki = Pki::new();
        let mut engine = StandIn::start(&pki, &[]);
        let services = AgentServices {
            ssh: None,
            apps: vec![tcp_app("echo", echo_server())],
            dbs: Vec::new(),
        };
        let agent = Agent::start(settings(engine.addr, pki.agent_tls(&pki.host_ca), services));

        // The engine drops the first tunnel; the agent comes back by itself.
        let first = engine.next_tunnel().await;
        first.tunnel.close();
        drop(first);
        let second = engine.next_tunnel().await;
        assert_eq!(second.agent.name, "node1");
        let stream = open(&second.tunnel, DialKind::Tcp, "echo").await.unwrap();

        // Shutdown: the agent stops taking streams (GOAWAY) but the open one carries on.
        agent.send(AgentCommand::Shutdown);
        assert!(
            within("the agent's GOAWAY", second.tunnel.accept())
                .await
                .is_none(),
            "the agent opened a stream?"
        );
        assert!(matches!(
            open(&second.tunnel, DialKind::Tcp, "echo").await,
            Err(OpenError::GoingAway)
        ));
        echo_check(&stream, MIB).await;
        drop(stream);

        // With the stream done, the tunnel drains and `run` returns.
        agent.stopped_within(PROMPTLY).await.unwrap();
        assert_eq!(
            within("the tunnel's end", second.driver).await,
            Some(CloseReason::Mux(mux::CloseReason::Drained))
        );
        assert_eq!(engine.connections(), 2);
    });
}

#[test]
fn covers_every_shard_closes_duplicates_and_resets_on_a_new_shard_count() {
    on_executor(|| async {
        let pki = Pki::new();
        // The "kernel" sends the first two connections to shard 0, the third to shard 1.
        let mut engine = StandIn::start(&pki, &[(2, 0), (2, 0), (2, 1)]);
        let services = AgentServices {
            ssh: Some(SshService {
                addr: hp(sshd(SSH_BANNER, AfterBanner::Discard)),
                labels: BTreeMap::new(),
            }),
            apps: Vec::new(),
            dbs: Vec::new(),
        };
        let agent = Agent::start(settings(engine.addr, pki.agent_tls(&pki.host_ca), services));

        let shard0 = engine.next_tunnel().await;
        assert_eq!(shard0.hello, TunnelHello::new(2, 0));
        match engine.next().await {
            Accepted::ClosedBeforeHello { hello } => assert_eq!(hello, TunnelHello::new(2, 0)),
            Accepted::Tunnel(t) => panic!("kept a duplicate of shard {}", t.hello.shard),
            Accepted::TlsFailed(e) => panic!("TLS failed: {e}"),
        }
        let shard1 = engine.next_tunnel().await;
        assert_eq!(shard1.hello, TunnelHello::new(2, 1));
        for t in [&shard0, &shard1] {
            let stream = open(&t.tunnel, DialKind::Ssh, "node1").await.unwrap();
            assert_eq!(read_line(&stream).await, "SSH-2.0-test\r\n");
        }

        // The engine comes back with one shard: the agent keeps the new tunnel and drains the
        // one left from the two-shard layout.
        engine.push_script((1, 0));
        shard1.tunnel.close();
        let single = engine.next_tunnel().await;
        assert_eq!(single.hello, TunnelHello::new(1, 0));
        assert!(within("the stale tunnel's GOAWAY", shard0.tunnel.accept())
            .await
            .is_none());
        assert_eq!(
            within("the stale tunnel's end", shard0.driver).await,
            Some(CloseReason::Mux(mux::CloseReason::Drained))
        );
        let stream = open(&single.tunnel, DialKind::Ssh, "node1").await.unwrap();
        assert_eq!(read_line(&stream).await, "SSH-2.0-test\r\n");
        drop(stream);

        agent.send(AgentCommand::Shutdown);
        agent.stopped_within(PROMPTLY).await.unwrap();
        // Exactly the four connections above: no dial once every shard was covered.
        assert_eq!(engine.connections(), 4);
    });
}

#[test]
fn shutdown_aborts_streams_still_open_after_the_grace_period() {
    on_executor(|| async {
        let pki = Pki::new();
        let mut engine = StandIn::start(&pki, &[]);
        let services = AgentServices {
            ssh: Some(SshService {
                addr: hp(sshd(SSH_BANNER, AfterBanner::Discard)),
                labels: BTreeMap::new(),
            }),
            apps: Vec::new(),
            dbs: Vec::new(),
        };
        let mut s = settings(engine.addr, pki.agent_tls(&pki.host_ca), services);
        s.timeouts.shutdown_grace = Duration::from_millis(300);
        let agent = Agent::start(s);
        let t = engine.next_tunnel().await;
        let stream = open(&t.tunnel, DialKind::Ssh, "node1").await.unwrap();
        assert_eq!(read_line(&stream).await, "SSH-2.0-test\r\n");

        // An idle SSH session that never ends: the agent waits out the grace, then aborts.
        agent.send(AgentCommand::Shutdown);
        agent.stopped_within(PROMPTLY).await.unwrap();
        let mut s = &stream;
        let mut buf = [0u8; 16];
        let read = within("the aborted stream", s.read(&mut buf)).await;
        assert!(
            read.is_err(),
            "the stream should have been aborted: {read:?}"
        );
        let reason = within("the tunnel's end", t.driver).await.unwrap();
        assert!(!reason.is_graceful(), "{reason}");
    });
}

#[test]
fn renewed_certificates_are_used_at_once() {
    on_executor(|| async {
        let pki = Pki::new();
        let mut engine = StandIn::start(&pki, &[]);
        let other_cluster = Ca::new("another cluster's host CA");
        let mut s = settings(
            engine.addr,
            pki.agent_tls(&other_cluster),
            AgentServices::default(),
        );
        // A backoff far longer than the test: only the renewal can make the agent retry now.
        s.backoff = BackoffConfig {
            base: Duration::from_secs(600),
            cap: Duration::from_secs(600),
            healthy_after: Duration::from_secs(10),
        };
        let agent = Agent::start(s);
        match engine.next().await {
            Accepted::TlsFailed(e) => assert!(e.contains("certificate"), "{e}"),
            _ => panic!("a certificate from another CA was accepted"),
        }
        agent.send(AgentCommand::ReplaceTls(pki.agent_tls(&pki.host_ca)));
        // A redial that drew a near-zero delay may still carry the old certificate.
        let t = loop {
            match engine.next().await {
                Accepted::Tunnel(t) => break t,
                Accepted::TlsFailed(_) => continue,
                Accepted::ClosedBeforeHello { hello } => panic!("closed after {hello:?}"),
            }
        };
        assert_eq!(t.agent.name, "node1");
        assert!(t.agent.resources.is_empty());
        agent.send(AgentCommand::Shutdown);
        agent.stopped_within(PROMPTLY).await.unwrap();
    });
}

#[test]
fn shutdown_is_prompt_while_the_engine_is_unreachable() {
    let pki = Pki::new();
    let mut s = settings(
        closed_port(),
        pki.agent_tls(&pki.host_ca),
        AgentServices::default(),
    );
    s.backoff = BackoffConfig {
        base: Duration::from_secs(600),
        cap: Duration::from_secs(600),
        healthy_after: Duration::from_secs(10),
    };
    let (control, control_rx) = crossbeam_channel::unbounded();
    let (done_tx, done) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = done_tx.send(jaunt_agent::run(s, control_rx));
    });
    control.send(AgentCommand::Shutdown).unwrap();
    // The sender stays alive: Shutdown alone must stop it, backoff or not.
    done.recv_timeout(PROMPTLY).unwrap().unwrap();
    drop(control);
}

#[test]
fn dropping_the_control_sender_stops_the_agent() {
    let pki = Pki::new();
    let s = settings(
        closed_port(),
        pki.agent_tls(&pki.host_ca),
        AgentServices::default(),
    );
    let (control, control_rx) = crossbeam_channel::unbounded::<AgentCommand>();
    let (done_tx, done) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = done_tx.send(jaunt_agent::run(s, control_rx));
    });
    drop(control);
    done.recv_timeout(PROMPTLY).unwrap().unwrap();
}

#[test]
fn unusable_settings_are_refused_before_anything_starts() {
    let pki = Pki::new();
    let mut s = settings(
        closed_port(),
        pki.agent_tls(&pki.host_ca),
        AgentServices::default(),
    );
    s.proxy_addr = "no port here".into();
    let (_control, control_rx) = crossbeam_channel::unbounded();
    match jaunt_agent::run(s, control_rx) {
        Err(AgentError::Config { what, .. }) => assert_eq!(what, "proxy_addr"),
        other => panic!("expected a config error, got {other:?}"),
    }
}
