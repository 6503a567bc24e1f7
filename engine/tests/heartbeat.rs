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

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use jaunt_config::identity::{unix_now, Identity, IdentityKind};
use jaunt_engine::mux::{self, Role};
use jaunt_engine::route::{ALPN_TCP, ALPN_TUNNEL};
use jaunt_engine::server::{
    DialKind, DialRequest, DialResponse, Engine, EngineConfig, EngineHandle, InventoryEvent,
    Snapshot, TlsConfigs, TunnelHello,
};
use jaunt_engine::tunnel::agent_hello::{
    AgentHello, Heartbeat, Resource, ResourceKind, ResourceProtocol, HEARTBEAT_OPEN,
};
use jaunt_engine::tunnel::{OpenError, Tunnel};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

const PUBLIC_HOST: &str = "localhost";
const CLUSTER: &str = "test-cluster";
/// Bound on every wait; generous for a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// PKI and engine

struct Ca(CertifiedIssuer<'static, KeyPair>);

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params);
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    fn der(&self) -> CertificateDer<'static> {
        self.0.der().clone()
    }

    fn server(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let mut params = CertificateParams::new(vec![PUBLIC_HOST.to_owned()]).unwrap();
        validity(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.0).unwrap();
        (vec![cert.der().clone(), self.der()], private_key(&key))
    }

    fn client(
        &self,
        kind: IdentityKind,
        name: &str,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let now = unix_now();
        let identity = Identity {
            kind,
            name: name.into(),
            roles: vec!["access".into()],
            logins: vec!["root".into()],
            db_users: vec![],
            db_names: vec![],
            traits: Default::default(),
            cluster: CLUSTER.into(),
            not_before: now - 60,
            expires: now + 3600,
            permit_pty: true,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
        };
        let key = KeyPair::generate().unwrap();
        let cert = identity
            .x509_params([7; 16], &[])
            .signed_by(&key, &self.0)
            .unwrap();
        (vec![cert.der().clone()], private_key(&key))
    }
}

fn validity(params: &mut CertificateParams) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(unix_now() - 3600);
    params.not_after = epoch + Duration::from_secs(unix_now() + 86400);
}

fn private_key(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

fn client_config(
    trust: &Ca,
    alpn: &[u8],
    cert: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.der()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(cert.0, cert.1)
    .unwrap();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

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
        let mut config = EngineConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            PUBLIC_HOST,
            "127.0.0.1:9".parse().unwrap(),
        );
        config.cluster_name = CLUSTER.into();
        config.shards = 1;
        config.pin_shards = false;
        let (inventory_tx, inventory) = crossbeam_channel::unbounded();
        config.inventory = Some(inventory_tx);
        let (chain, key) = web.server();
        let tls = TlsConfigs::build(chain, key, &[user.der()], &[host.der()]).unwrap();
        let (snapshots, rx) = crossbeam_channel::unbounded();
        let engine = Engine::start(config, tls, rx).unwrap();
        snapshots
            .send(Arc::new(Snapshot {
                version: 1,
                cluster: CLUSTER.into(),
                user_ca_roots: vec![user.der()],
                host_ca_roots: vec![host.der()],
                policy: jaunt_config::rbac::Policy::compile(&[
                    jaunt_config::resource::Role::builtin_access(),
                ])
                .unwrap(),
                ..Snapshot::default()
            }))
            .unwrap();
        let deadline = Instant::now() + WAIT;
        while !engine.ready() {
            assert!(Instant::now() < deadline, "the engine never became ready");
            std::thread::sleep(Duration::from_millis(10));
        }
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
            ALPN_TCP,
            self.user.client(IdentityKind::User, "alice"),
        );
        let tcp = TcpStream::connect(self.addr()).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        let conn =
            rustls::ClientConnection::new(config, ServerName::try_from(PUBLIC_HOST).unwrap())
                .unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let request = DialRequest {
            kind: DialKind::Tcp,
            target: name.into(),
            login: None,
            db_user: None,
            db_name: None,
        };
        tls.write_all(&request.encode()).unwrap();
        tls.flush().unwrap();
        let mut frame = vec![0u8; 2];
        tls.read_exact(&mut frame).unwrap();
        frame.resize(2 + usize::from(u16::from_be_bytes([frame[0], frame[1]])), 0);
        tls.read_exact(&mut frame[2..]).unwrap();
        let (response, _) = DialResponse::parse(&frame).unwrap().unwrap();
        if !response.ok {
            return Some(response.error.unwrap_or_default());
        }
        tls.write_all(b"ping").unwrap();
        tls.flush().unwrap();
        let mut echo = [0u8; 4];
        tls.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"ping");
        None
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
    let mut resources = vec![Resource {
        kind: ResourceKind::Node,
        name: "n1".into(),
        labels: Default::default(),
        protocol: ResourceProtocol::Ssh,
    }];
    resources.extend(apps.iter().map(|app| Resource {
        kind: ResourceKind::Tcp,
        name: (*app).into(),
        labels: Default::default(),
        protocol: ResourceProtocol::Tcp,
    }));
    AgentHello::new("n1", Default::default(), resources)
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
        ALPN_TUNNEL,
        cluster.host.client(IdentityKind::Host, "host-1"),
    );
    let (beats_tx, beats) = crossbeam_channel::unbounded::<Beat>();
    let (events_tx, events) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(64 << 10)
            .make()
            .unwrap()
            .run(async move {
                let tcp = glommio::net::TcpStream::connect(addr).await.unwrap();
                let mut tls = futures_rustls::TlsConnector::from(config)
                    .connect(ServerName::try_from(PUBLIC_HOST).unwrap(), tcp)
                    .await
                    .unwrap();
                let mut frame = vec![0u8; 2];
                tls.read_exact(&mut frame).await.unwrap();
                frame.resize(2 + usize::from(u16::from_be_bytes([frame[0], frame[1]])), 0);
                tls.read_exact(&mut frame[2..]).await.unwrap();
                TunnelHello::parse(&frame).unwrap().unwrap();
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
    loop {
        match cluster.next_event() {
            InventoryEvent::TunnelUp { .. } => changes += 1,
            InventoryEvent::TunnelDown { .. } => break,
        }
    }
    assert!((16..64).contains(&changes), "{changes} changes applied");
}
