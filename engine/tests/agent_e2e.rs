//! End to end with the real agent: an [`Engine`] with two shards and [`jaunt_agent::run`] on
//! 127.0.0.1, throwaway rcgen certificates, a local TCP echo as the agent's `tcp` app and a local
//! banner server standing in for sshd. Checks that the agent covers every shard, that the engine
//! routes user dials to the resources the agent announced (no snapshot targets at all), and that
//! the agent's shutdown takes its resources away again, with the inventory following along.
//!
//! No test orders events with a sleep: each waits for a condition with a deadline.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should stop the test"
)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use jaunt_agent::{AgentCommand, AgentSettings, Timeouts};
use jaunt_config::file::{AgentServices, SshService};
use jaunt_config::identity::IdentityKind;
use jaunt_config::wire::{DialKind, DialRequest, DialResponse, ResourceKind};
use jaunt_engine::route::{ALPN_SSH, ALPN_TCP};
use jaunt_engine::server::{EngineHandle, InventoryEvent, Snapshot};
use jaunt_testkit::agent::{hp, settings, tcp_app};
use jaunt_testkit::engine::{access_snapshot, engine_config, tls_configs};
use jaunt_testkit::net::{dial_frame, read_frame_async, request, tls_connect};
use jaunt_testkit::pki::{client_config, identity, Ca, CertAndKey};
use jaunt_testkit::services::{echo_server, sshd, AfterBanner};
use jaunt_testkit::wait::on_thread_executor;
use jaunt_testkit::PUBLIC_HOST;
use rustls::pki_types::ServerName;

const CLUSTER: &str = "e2e-cluster";
/// Bound on every wait for a condition; generous for a loaded 2-core CI machine.
const WAIT: Duration = Duration::from_secs(30);
const SSH_BANNER: &str = "SSH-2.0-JauntTestSshd\r\n";

// ---------------------------------------------------------------------------------------------
// PKI

/// A client certificate for `name` in this cluster, serial 9.
fn identity_cert(ca: &Ca, kind: IdentityKind, name: &str) -> CertAndKey {
    ca.identity_with_serial(&identity(kind, name, CLUSTER), 9)
}

// ---------------------------------------------------------------------------------------------
// Local services the agent serves

// ---------------------------------------------------------------------------------------------
// Users

struct User {
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
}

impl User {
    fn new(addr: SocketAddr, web: &Ca, user: &Ca, alpn: &[u8]) -> User {
        let cert = identity_cert(user, IdentityKind::User, "alice");
        User {
            addr,
            config: client_config(web, &[alpn], Some(cert)),
        }
    }

    /// Dials `request`; the response and, on success, the connected stream.
    fn dial(
        &self,
        request: &DialRequest,
    ) -> (
        DialResponse,
        rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    ) {
        let mut tls = tls_connect(self.addr, Arc::clone(&self.config), PUBLIC_HOST);
        tls.sock.set_read_timeout(Some(WAIT)).unwrap();
        let frame = dial_frame(&mut tls, request).unwrap();
        let (response, _) = DialResponse::parse(&frame).unwrap().unwrap();
        (response, tls)
    }

    fn dial_error(&self, request: &DialRequest) -> String {
        self.dial(request).0.error.unwrap_or_default()
    }
}

/// On its own glommio executor: dials `request` and echoes `total` bytes of a counter pattern
/// through it, writing and reading concurrently; checks every byte.
fn echo_bulk(user: &User, request: DialRequest, total: u64) {
    let (addr, config) = (user.addr, Arc::clone(&user.config));
    on_thread_executor(move || async move {
        let tcp = glommio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = futures_rustls::TlsConnector::from(config)
            .connect(ServerName::try_from(PUBLIC_HOST).unwrap(), tcp)
            .await
            .unwrap();
        tls.write_all(&request.encode()).await.unwrap();
        tls.flush().await.unwrap();
        let frame = read_frame_async(&mut tls).await.unwrap();
        let (response, _) = DialResponse::parse(&frame).unwrap().unwrap();
        assert!(response.ok, "{response:?}");
        let byte = |i: u64| (i.wrapping_mul(2_654_435_761) >> 13) as u8;
        let (mut reader, mut writer) = futures_lite::io::split(tls);
        let write = async {
            let mut chunk = vec![0u8; 48 << 10];
            let mut offset = 0u64;
            while offset < total {
                let len = chunk.len().min((total - offset) as usize);
                for (i, b) in chunk[..len].iter_mut().enumerate() {
                    *b = byte(offset + i as u64);
                }
                writer.write_all(&chunk[..len]).await.unwrap();
                offset += len as u64;
            }
            writer.close().await.unwrap();
        };
        let read = async {
            let mut buf = vec![0u8; 64 << 10];
            let mut offset = 0u64;
            loop {
                let n = reader.read(&mut buf).await.unwrap();
                if n == 0 {
                    return offset;
                }
                for (i, b) in buf[..n].iter().enumerate() {
                    assert_eq!(*b, byte(offset + i as u64), "byte {}", offset + i as u64);
                }
                offset += n as u64;
            }
        };
        let ((), echoed) = futures_lite::future::zip(write, read).await;
        assert_eq!(echoed, total);
    });
}

fn start_engine(
    web: &Ca,
    user: &Ca,
    host: &Ca,
    inventory: crossbeam_channel::Sender<InventoryEvent>,
) -> (EngineHandle, crossbeam_channel::Sender<Arc<Snapshot>>) {
    start_engine_with(web, user, host, inventory, 2)
}

fn start_engine_with(
    web: &Ca,
    user: &Ca,
    host: &Ca,
    inventory: crossbeam_channel::Sender<InventoryEvent>,
    shards: usize,
) -> (EngineHandle, crossbeam_channel::Sender<Arc<Snapshot>>) {
    let mut config = engine_config(CLUSTER, shards);
    config.inventory = Some(inventory);
    let tls = tls_configs(web, &[PUBLIC_HOST], user, host);
    let (engine, snapshots) =
        jaunt_testkit::engine::start_engine(config, tls, access_snapshot(CLUSTER), WAIT);
    (engine, snapshots)
}

// ---------------------------------------------------------------------------------------------

/// The real agent covers both shards, the engine routes ssh and tcp dials to what it announced
/// from whichever shard a user lands on, and the agent's shutdown takes it all away again.
#[test]
fn real_agent_serves_announced_resources_on_every_shard() {
    let (web, user_ca, host_ca) = (
        Ca::new("E2E Web CA"),
        Ca::new("E2E User CA"),
        Ca::new("E2E Host CA"),
    );
    let (inventory_tx, inventory) = crossbeam_channel::unbounded();
    let (engine, _snapshots) = start_engine(&web, &user_ca, &host_ca, inventory_tx);
    let echo = echo_server();
    let sshd = sshd(SSH_BANNER, AfterBanner::Echo);

    let (chain, key) = identity_cert(&host_ca, IdentityKind::Host, "host-e2e");
    let tls = jaunt_agent::client_config(chain, key, &[web.der()]).unwrap();
    let settings = AgentSettings {
        name: "e2e-node".into(),
        labels: BTreeMap::from([("env".to_owned(), "e2e".to_owned())]),
        services: AgentServices {
            ssh: Some(SshService {
                addr: hp(sshd),
                labels: BTreeMap::new(),
            }),
            apps: vec![tcp_app("echo", echo)],
            dbs: vec![],
        },
        timeouts: Timeouts {
            shutdown_grace: Duration::from_secs(2),
            ..Timeouts::default()
        },
        ..settings(engine.local_addr(), tls, AgentServices::default())
    };
    let (control, control_rx) = crossbeam_channel::unbounded();
    let agent = std::thread::spawn(move || jaunt_agent::run(settings, control_rx));

    // One TunnelUp per shard.
    let mut up = Vec::new();
    while up.len() < 2 {
        match inventory.recv_timeout(WAIT).expect("TunnelUp events") {
            InventoryEvent::TunnelUp {
                shard,
                host_id,
                name,
                resources,
                ..
            } => {
                assert_eq!((host_id.as_str(), name.as_str()), ("host-e2e", "e2e-node"));
                let kinds: Vec<_> = resources.iter().map(|r| r.kind).collect();
                assert_eq!(kinds, vec![ResourceKind::Node, ResourceKind::Tcp]);
                up.push(shard);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    up.sort_unstable();
    assert_eq!(up, vec![0, 1], "one tunnel per shard");
    let listed = engine.inventory();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].shards, vec![0, 1]);
    assert_eq!(listed[0].labels.get("env").map(String::as_str), Some("e2e"));

    // Users land on either shard; every dial is served there.
    let tcp_user = User::new(engine.local_addr(), &web, &user_ca, ALPN_TCP);
    for _ in 0..8 {
        let (response, mut tls) = tcp_user.dial(&request(DialKind::Tcp, "echo"));
        assert!(response.ok, "{response:?}");
        tls.write_all(b"ping\n").unwrap();
        tls.flush().unwrap();
        let mut line = String::new();
        BufReader::new(&mut tls).read_line(&mut line).unwrap();
        assert_eq!(line, "ping\n");
    }
    echo_bulk(&tcp_user, request(DialKind::Tcp, "echo"), 16 << 20);
    let ssh_user = User::new(engine.local_addr(), &web, &user_ca, ALPN_SSH);
    let (response, tls) = ssh_user.dial(&request(DialKind::Ssh, "e2e-node"));
    assert!(response.ok, "{response:?}");
    let mut banner = String::new();
    BufReader::new(tls).read_line(&mut banner).unwrap();
    assert_eq!(banner, SSH_BANNER);
    assert_eq!(
        tcp_user.dial_error(&request(DialKind::Tcp, "nope")),
        r#"no such app "nope" in cluster "e2e-cluster""#
    );
    let metrics = engine.metrics_text();
    assert!(
        metrics.contains("jaunt_tunnels{shard=\"0\"} 1")
            && metrics.contains("jaunt_tunnels{shard=\"1\"} 1"),
        "{metrics}"
    );

    // The agent stops: both tunnels go down and its names with them.
    control.send(AgentCommand::Shutdown).unwrap();
    agent.join().unwrap().unwrap();
    let mut down = Vec::new();
    while down.len() < 2 {
        match inventory.recv_timeout(WAIT).expect("TunnelDown events") {
            InventoryEvent::TunnelDown { shard, host_id } => {
                assert_eq!(host_id, "host-e2e");
                down.push(shard);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(engine.inventory().is_empty());
    assert_eq!(
        ssh_user.dial_error(&request(DialKind::Ssh, "e2e-node")),
        r#"no such node "e2e-node" in cluster "e2e-cluster""#
    );
    engine.shutdown(Duration::from_secs(5)).unwrap();
}

/// The sum of a metric family's samples whose labels include `label` (`name="value"`).
fn metric_sum(text: &str, family: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The agent asks each shard for its tunnel (a `jaunt-shard.<k>` ALPN entry) and the engine
/// hands a connection that landed elsewhere to the shard it asked for: four shards, four tunnel
/// connections, no duplicate. (Without the hand-over, four dials cover four shards with
/// probability 4!/4^4, under 10%.) User dials work from every shard afterwards.
#[test]
fn the_real_agent_covers_four_shards_with_four_connections() {
    let (web, user_ca, host_ca) = (
        Ca::new("E2E Web CA"),
        Ca::new("E2E User CA"),
        Ca::new("E2E Host CA"),
    );
    let (inventory_tx, inventory) = crossbeam_channel::unbounded();
    let (engine, _snapshots) = start_engine_with(&web, &user_ca, &host_ca, inventory_tx, 4);
    let echo = echo_server();
    let (chain, key) = identity_cert(&host_ca, IdentityKind::Host, "host-e2e");
    let tls = jaunt_agent::client_config(chain, key, &[web.der()]).unwrap();
    let settings = AgentSettings {
        name: "e2e-node".into(),
        services: AgentServices {
            ssh: None,
            apps: vec![tcp_app("echo", echo)],
            dbs: vec![],
        },
        ..settings(engine.local_addr(), tls, AgentServices::default())
    };
    let (control, control_rx) = crossbeam_channel::unbounded();
    let agent = std::thread::spawn(move || jaunt_agent::run(settings, control_rx));

    let mut up = Vec::new();
    while up.len() < 4 {
        match inventory.recv_timeout(WAIT).expect("TunnelUp events") {
            InventoryEvent::TunnelUp { shard, .. } => up.push(shard),
            other => panic!("unexpected {other:?}"),
        }
    }
    up.sort_unstable();
    assert_eq!(up, vec![0, 1, 2, 3], "one tunnel per shard");
    let metrics = engine.metrics_text();
    assert_eq!(
        metric_sum(
            &metrics,
            "jaunt_connections_accepted_total",
            "route=\"tunnel\""
        ),
        4,
        "one connection per shard: {metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "jaunt_tunnels_duplicate_total", "shard="),
        0,
        "{metrics}"
    );
    let handed = metric_sum(&metrics, "jaunt_tunnels_handed_over_total", "shard=");
    assert!(handed <= 3, "at most the three hinted dials: {handed}");

    let tcp_user = User::new(engine.local_addr(), &web, &user_ca, ALPN_TCP);
    for _ in 0..8 {
        let (response, mut tls) = tcp_user.dial(&request(DialKind::Tcp, "echo"));
        assert!(response.ok, "{response:?}");
        tls.write_all(b"ping\n").unwrap();
        tls.flush().unwrap();
        let mut line = String::new();
        BufReader::new(&mut tls).read_line(&mut line).unwrap();
        assert_eq!(line, "ping\n");
    }
    assert_eq!(
        metric_sum(
            &engine.metrics_text(),
            "jaunt_cross_shard_hops_total",
            "result=\"ok\""
        ),
        0,
        "every user dial found its tunnel on its own shard"
    );
    control.send(AgentCommand::Shutdown).unwrap();
    agent.join().unwrap().unwrap();
    engine.shutdown(Duration::from_secs(5)).unwrap();
}
