//! Resource heartbeats, end to end through a real [`Engine`] on 127.0.0.1 port 0: a hand-driven
//! agent tunnel announces one app in its AgentHello, then heartbeats changes on the stream it
//! opens (`HEARTBEAT_OPEN`); user dials follow the heartbeats, stale ones are ignored, control
//! hears each change (an inventory event), and a bad heartbeat costs the agent its tunnel.
//!
//! No test orders events with a sleep: each waits for a condition (an inventory event, a dial
//! result) with a deadline.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should stop the test"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use jaunt_config::identity::IdentityKind;
use jaunt_config::wire::agent_hello::{AgentHello, Heartbeat, RecordingNote, HEARTBEAT_OPEN};
use jaunt_config::wire::DialKind;
use jaunt_engine::mux::{self, Role};
use jaunt_engine::route::{ALPN_TCP, ALPN_TUNNEL};
use jaunt_engine::server::{EngineHandle, InventoryEvent, Snapshot};
use jaunt_engine::tunnel::{OpenError, Tunnel};
use jaunt_testkit::engine::{engine_config, snapshot_trusting, start_engine, tls_configs};
use jaunt_testkit::net::{exchange, request, tls_connect};
use jaunt_testkit::pki::{client_config, identity, Ca, CertAndKey};
use jaunt_testkit::tunnel::{agent_hello_labelled, tunnel_connect};
use jaunt_testkit::wait::spawn_executor;
use jaunt_testkit::{PUBLIC_HOST, WAIT};

const CLUSTER: &str = "test-cluster";

// ---------------------------------------------------------------------------------------------
// PKI and engine

struct Cluster {
    web: Ca,
    user: Ca,
    host: Ca,
    engine: Option<EngineHandle>,
    inventory: crossbeam_channel::Receiver<InventoryEvent>,
    _snapshots: crossbeam_channel::Sender<Arc<Snapshot>>,
}

impl Cluster {
    fn start() -> Cluster {
        let (web, user, host) = (Ca::new("web"), Ca::new("user"), Ca::new("host"));
        // Nothing here passes through to control: any address will do.
        let mut config = engine_config(CLUSTER, 1);
        let (inventory_tx, inventory) = crossbeam_channel::unbounded();
        config.inventory = Some(inventory_tx);
        let tls = tls_configs(&web, &[PUBLIC_HOST], &user, &host);
        let snapshot = snapshot_trusting(CLUSTER, &user, &host);
        let (engine, snapshots) = start_engine(config, tls, snapshot, WAIT);
        Cluster {
            web,
            user,
            host,
            engine: Some(engine),
            inventory,
            _snapshots: snapshots,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.engine.as_ref().unwrap().local_addr()
    }

    fn next_event(&self) -> InventoryEvent {
        self.inventory
            .recv_timeout(WAIT)
            .expect("an inventory event")
    }

    /// Dials the TCP app `name` as alice; the error, or `None` once `ping` echoed back.
    fn dial_tcp(&self, name: &str) -> Option<String> {
        let config = client_config(
            &self.web,
            &[ALPN_TCP],
            Some(self.client(IdentityKind::User, "alice")),
        );
        let mut tls = tls_connect(self.addr(), config, PUBLIC_HOST);
        match exchange(&mut tls, &request(DialKind::Tcp, name), b"ping", 4) {
            Err(error) => Some(error),
            Ok(echo) => {
                assert_eq!(&echo, b"ping");
                None
            }
        }
    }

    /// A client certificate for `name` from the user or host CA (by `kind`).
    fn client(&self, kind: IdentityKind, name: &str) -> CertAndKey {
        let ca = match kind {
            IdentityKind::User => &self.user,
            _ => &self.host,
        };
        ca.identity(&identity(kind, name, CLUSTER))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(engine) = self.engine.take() {
            let _ = engine.shutdown(Duration::ZERO);
        }
    }
}

fn hello(apps: &[&str]) -> AgentHello {
    agent_hello_labelled("n1", Default::default(), Default::default(), apps)
}

fn names(event: &InventoryEvent) -> Vec<String> {
    match event {
        InventoryEvent::TunnelUp { resources, .. } => {
            resources.iter().map(|r| r.name.clone()).collect()
        }
        other => panic!("expected TunnelUp, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The hand-driven agent

/// What the test tells the agent.
enum Beat {
    /// Send these raw bytes on the heartbeat stream.
    Raw(Vec<u8>),
}

/// What the agent reports.
#[derive(Debug, PartialEq)]
enum AgentEvent {
    /// The heartbeat stream is open.
    HeartbeatOpen,
    /// A second, non-heartbeat stream was refused with this message.
    OtherRefused(String),
    /// The tunnel ended.
    Closed,
}

/// One tunnel: announce `first`, open the heartbeat stream, try a stream the engine must
/// refuse, echo every stream the engine opens, write what the test sends.
fn start_agent(
    cluster: &Cluster,
    first: AgentHello,
) -> (
    crossbeam_channel::Sender<Beat>,
    crossbeam_channel::Receiver<AgentEvent>,
) {
    let addr = cluster.addr();
    let config = client_config(
        &cluster.web,
        &[ALPN_TUNNEL],
        Some(cluster.client(IdentityKind::Host, "host-1")),
    );
    let (beats_tx, beats) = crossbeam_channel::unbounded::<Beat>();
    let (events_tx, events) = crossbeam_channel::unbounded();
    spawn_executor(move || async move {
        let (mut tls, _) = tunnel_connect(addr, &config).await;
        tls.write_all(&first.encode().unwrap()).await.unwrap();
        tls.flush().await.unwrap();
        let (tunnel, driver) = Tunnel::spawn(tls, Role::Client, mux::Config::default());
        glommio::spawn_local(echo_streams(tunnel.clone())).detach();
        let mut heartbeats = tunnel.open(HEARTBEAT_OPEN).await.unwrap();
        events_tx.send(AgentEvent::HeartbeatOpen).unwrap();
        match tunnel.open(b"something else").await {
            Err(OpenError::Refused { message }) => {
                events_tx.send(AgentEvent::OtherRefused(message)).unwrap();
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // Recording notes: a malformed one, and one for a session this engine does not have.
        let unknown = RecordingNote {
            session_id: "18f3a-0-7".into(),
            recording_id: "0123456789abcdef".into(),
        };
        for note in [b"jaunt-recording/1 NOT-AN-ID x".to_vec(), unknown.encode()] {
            match tunnel.open(&note).await {
                Err(OpenError::Refused { message }) => {
                    events_tx.send(AgentEvent::OtherRefused(message)).unwrap();
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        let writer = async {
            // The test thread is no executor: look at its channel between short timers.
            loop {
                match beats.try_recv() {
                    Ok(Beat::Raw(bytes)) => {
                        if heartbeats.write_all(&bytes).await.is_err() {
                            break;
                        }
                        let _ = heartbeats.flush().await;
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => {
                        glommio::timer::Timer::new(Duration::from_millis(5)).await;
                    }
                    Err(crossbeam_channel::TryRecvError::Disconnected) => break,
                }
            }
            std::future::pending::<()>().await;
        };
        futures_lite::future::or(async { drop(driver.await) }, writer).await;
        let _ = events_tx.send(AgentEvent::Closed);
    });
    (beats_tx, events)
}

async fn echo_streams(tunnel: Tunnel) {
    while let Some(incoming) = tunnel.accept().await {
        let Ok(mut stream) = incoming.accept() else {
            continue;
        };
        glommio::spawn_local(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = stream.close().await;
        })
        .detach();
    }
}

fn beat(seq: u64, apps: &[&str]) -> Beat {
    Beat::Raw(
        Heartbeat {
            seq,
            hello: hello(apps),
        }
        .encode()
        .unwrap(),
    )
}

// ---------------------------------------------------------------------------------------------
// Tests

/// The AgentHello announces `one`; a heartbeat adds `two` (which then routes), a stale one is
/// ignored, a later one removes `one` (which is then refused as unknown), and control hears of
/// every change but not of unchanged or stale heartbeats.
#[test]
fn heartbeats_change_what_routes_and_what_control_sees() {
    let cluster = Cluster::start();
    let (beats, events) = start_agent(&cluster, hello(&["one"]));
    assert_eq!(names(&cluster.next_event()), ["n1", "one"]);
    assert_eq!(
        events.recv_timeout(WAIT).unwrap(),
        AgentEvent::HeartbeatOpen
    );
    match events.recv_timeout(WAIT).unwrap() {
        AgentEvent::OtherRefused(message) => {
            assert!(message.contains("only heartbeat streams"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // Recording notes the engine cannot note are refused with the reason, and counted.
    for want in [
        "bad recording note: invalid field `session_id`",
        "no live recorded session 18f3a-0-7 of this agent",
    ] {
        match events.recv_timeout(WAIT).unwrap() {
            AgentEvent::OtherRefused(message) => assert!(message.contains(want), "{message}"),
            other => panic!("{other:?}"),
        }
    }
    let metrics = cluster.engine.as_ref().unwrap().metrics_text();
    for line in [
        "jaunt_recording_notes_total{shard=\"0\",result=\"malformed\"} 1",
        "jaunt_recording_notes_total{shard=\"0\",result=\"unknown_session\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
    assert_eq!(cluster.dial_tcp("one"), None);
    let unknown = cluster.dial_tcp("two").unwrap();
    assert!(unknown.starts_with(r#"no such app "two""#), "{unknown}");

    // The first heartbeat repeats the hello: nothing to report.
    beats.send(beat(100, &["one"])).unwrap();
    // A changed one: routes at once on this shard, reported to control.
    beats.send(beat(101, &["one", "two"])).unwrap();
    assert_eq!(names(&cluster.next_event()), ["n1", "one", "two"]);
    assert_eq!(cluster.dial_tcp("two"), None);
    assert_eq!(cluster.dial_tcp("one"), None);

    // A stale heartbeat (a lower sequence) changes nothing; the next change is the next event.
    beats.send(beat(50, &["gone"])).unwrap();
    beats.send(beat(101, &["one"])).unwrap();
    beats.send(beat(102, &["two"])).unwrap();
    assert_eq!(names(&cluster.next_event()), ["n1", "two"]);
    let unknown = cluster.dial_tcp("one").unwrap();
    assert!(unknown.starts_with(r#"no such app "one""#), "{unknown}");
    assert!(cluster.dial_tcp("gone").is_some());
    assert_eq!(cluster.dial_tcp("two"), None);
    let inventory = cluster.engine.as_ref().unwrap().inventory();
    assert_eq!(inventory.len(), 1);
    let listed: Vec<&str> = inventory[0]
        .resources
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(listed, ["n1", "two"]);
    assert!(cluster.inventory.try_recv().is_err(), "no other event");

    // A heartbeat that fails the AgentHello's validation costs the agent its tunnel.
    let mut bad = 103u64.to_be_bytes().to_vec();
    let body =
        br#"{"version":1,"name":"n1","resources":[{"kind":"tcp","name":"","protocol":"tcp"}]}"#;
    bad.extend_from_slice(&(body.len() as u16).to_be_bytes());
    bad.extend_from_slice(body);
    beats.send(Beat::Raw(bad)).unwrap();
    assert_eq!(
        cluster.next_event(),
        InventoryEvent::TunnelDown {
            shard: 0,
            host_id: "host-1".into()
        }
    );
    assert_eq!(events.recv_timeout(WAIT).unwrap(), AgentEvent::Closed);
    assert!(cluster.dial_tcp("two").is_some());
}

/// A heartbeat longer than the AgentHello's bound is refused from its length prefix: the
/// tunnel closes without the engine buffering it.
#[test]
fn an_oversized_heartbeat_closes_the_tunnel() {
    let cluster = Cluster::start();
    let (beats, events) = start_agent(&cluster, hello(&[]));
    assert_eq!(names(&cluster.next_event()), ["n1"]);
    assert_eq!(
        events.recv_timeout(WAIT).unwrap(),
        AgentEvent::HeartbeatOpen
    );
    let mut bad = 1u64.to_be_bytes().to_vec();
    bad.extend_from_slice(&u16::MAX.to_be_bytes());
    beats.send(Beat::Raw(bad)).unwrap();
    assert!(matches!(
        cluster.next_event(),
        InventoryEvent::TunnelDown { .. }
    ));
    let mut closed = false;
    while let Ok(event) = events.recv_timeout(WAIT) {
        if event == AgentEvent::Closed {
            closed = true;
            break;
        }
    }
    assert!(closed);
}

/// An agent that changes its announcement far more often than an operator edits a config file
/// is cut off: the changes cost the engine a parse, a reindex and the directory's lock each.
#[test]
fn a_flood_of_changes_closes_the_tunnel() {
    let cluster = Cluster::start();
    let (beats, events) = start_agent(&cluster, hello(&[]));
    assert_eq!(names(&cluster.next_event()), ["n1"]);
    assert_eq!(
        events.recv_timeout(WAIT).unwrap(),
        AgentEvent::HeartbeatOpen
    );
    let mut flood = Vec::new();
    for seq in 1..=64u64 {
        let app = format!("app{seq}");
        let Beat::Raw(bytes) = beat(seq, &[app.as_str()]);
        flood.extend_from_slice(&bytes);
    }
    beats.send(Beat::Raw(flood)).unwrap();
    let mut changes = 0;
    while let InventoryEvent::TunnelUp { .. } = cluster.next_event() {
        changes += 1;
    }
    assert!((16..64).contains(&changes), "{changes} changes applied");
}
