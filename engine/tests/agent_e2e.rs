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
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use jaunt_agent::{AgentCommand, AgentSettings, BackoffConfig, Timeouts};
use jaunt_config::file::{AgentServices, AppProtocol, AppService, HostPort, SshService};
use jaunt_config::identity::{unix_now, Identity, IdentityKind};
use jaunt_engine::mux;
use jaunt_engine::route::{ALPN_SSH, ALPN_TCP};
use jaunt_engine::server::{
    DialKind, DialRequest, DialResponse, Engine, EngineConfig, EngineHandle, InventoryEvent,
    Snapshot, TlsConfigs,
};
use jaunt_engine::tunnel::agent_hello::ResourceKind;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

const PUBLIC_HOST: &str = "localhost";
const CLUSTER: &str = "e2e-cluster";
/// Bound on every wait for a condition; generous for a loaded 2-core CI machine.
const WAIT: Duration = Duration::from_secs(30);
const SSH_BANNER: &str = "SSH-2.0-JauntTestSshd\r\n";

// ---------------------------------------------------------------------------------------------
// PKI

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

type CertAndKey = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    fn server(&self, names: &[&str]) -> CertAndKey {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        set_validity(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (vec![cert.der().clone(), self.der()], private_key(&key))
    }

    fn identity(&self, kind: IdentityKind, name: &str) -> CertAndKey {
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
            .x509_params([9; 16], &[])
            .signed_by(&key, &self.issuer)
            .unwrap();
        (vec![cert.der().clone()], private_key(&key))
    }
}

fn set_validity(params: &mut CertificateParams) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(unix_now() - 3600);
    params.not_after = epoch + Duration::from_secs(unix_now() + 86400);
}

fn private_key(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

// ---------------------------------------------------------------------------------------------
// Local services the agent serves

/// A TCP echo on 127.0.0.1 (the agent's `tcp` app).
fn start_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut read = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut read, &mut conn);
                let _ = conn.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// Stands in for sshd: sends a banner, then echoes.
fn start_sshd() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let _ = conn.write_all(SSH_BANNER.as_bytes());
                let mut read = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut read, &mut conn);
            });
        }
    });
    addr
}

fn host_port(addr: SocketAddr) -> HostPort {
    HostPort {
        host: addr.ip().to_string(),
        port: addr.port(),
    }
}

// ---------------------------------------------------------------------------------------------
// Users

struct User {
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
}

impl User {
    fn new(addr: SocketAddr, web: &Ca, user: &Ca, alpn: &[u8]) -> User {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(web.der()).unwrap();
        let (chain, key) = user.identity(IdentityKind::User, "alice");
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
        config.alpn_protocols = vec![alpn.to_vec()];
        User {
            addr,
            config: Arc::new(config),
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
        let tcp = TcpStream::connect(self.addr).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        let conn = rustls::ClientConnection::new(
            Arc::clone(&self.config),
            ServerName::try_from(PUBLIC_HOST).unwrap(),
        )
        .unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(&request.encode()).unwrap();
        tls.flush().unwrap();
        let mut frame = vec![0u8; 2];
        tls.read_exact(&mut frame).unwrap();
        frame.resize(2 + usize::from(u16::from_be_bytes([frame[0], frame[1]])), 0);
        tls.read_exact(&mut frame[2..]).unwrap();
        let (response, _) = DialResponse::parse(&frame).unwrap().unwrap();
        (response, tls)
    }

    fn dial_error(&self, request: &DialRequest) -> String {
        self.dial(request).0.error.unwrap_or_default()
    }
}

fn request(kind: DialKind, target: &str) -> DialRequest {
    DialRequest {
        kind,
        target: target.into(),
        login: (kind == DialKind::Ssh).then(|| "root".into()),
        db_user: None,
        db_name: None,
    }
}

/// On its own glommio executor: dials `request` and echoes `total` bytes of a counter pattern
/// through it, writing and reading concurrently; checks every byte.
fn echo_bulk(user: &User, request: DialRequest, total: u64) {
    let (addr, config) = (user.addr, Arc::clone(&user.config));
    std::thread::spawn(move || {
        let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(64 << 10)
            .make()
            .unwrap();
        executor.run(async move {
            let tcp = glommio::net::TcpStream::connect(addr).await.unwrap();
            let mut tls = futures_rustls::TlsConnector::from(config)
                .connect(ServerName::try_from(PUBLIC_HOST).unwrap(), tcp)
                .await
                .unwrap();
            tls.write_all(&request.encode()).await.unwrap();
            tls.flush().await.unwrap();
            let mut frame = vec![0u8; 2];
            tls.read_exact(&mut frame).await.unwrap();
            frame.resize(2 + usize::from(u16::from_be_bytes([frame[0], frame[1]])), 0);
            tls.read_exact(&mut frame[2..]).await.unwrap();
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
    })
    .join()
    .unwrap();
}

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start_engine(
    web: &Ca,
    user: &Ca,
    host: &Ca,
    inventory: crossbeam_channel::Sender<InventoryEvent>,
) -> (EngineHandle, crossbeam_channel::Sender<Arc<Snapshot>>) {
    let mut config = EngineConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        PUBLIC_HOST,
        // No control behind this engine: nothing here uses jaunt-control.
        "127.0.0.1:9".parse().unwrap(),
    );
    config.cluster_name = CLUSTER.into();
    config.shards = 2;
    config.pin_shards = false;
    config.inventory = Some(inventory);
    let (chain, key) = web.server(&[PUBLIC_HOST]);
    let tls = TlsConfigs::build(chain, key, &[user.der()], &[host.der()]).unwrap();
    let (snapshots, rx) = crossbeam_channel::unbounded();
    let engine = Engine::start(config, tls, rx).unwrap();
    snapshots
        .send(Arc::new(Snapshot {
            version: 1,
            cluster: CLUSTER.into(),
            policy: jaunt_config::rbac::Policy::compile(&[
                jaunt_config::resource::Role::builtin_access(),
            ])
            .unwrap(),
            ..Snapshot::default()
        }))
        .unwrap();
    wait_for("engine ready", || engine.ready());
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
    let echo = start_echo();
    let sshd = start_sshd();

    let (chain, key) = host_ca.identity(IdentityKind::Host, "host-e2e");
    let tls = jaunt_agent::client_config(chain, key, &[web.der()]).unwrap();
    let settings = AgentSettings {
        proxy_addr: engine.local_addr().to_string(),
        server_name: PUBLIC_HOST.into(),
        tls,
        name: "e2e-node".into(),
        labels: BTreeMap::from([("env".to_owned(), "e2e".to_owned())]),
        services: AgentServices {
            ssh: Some(SshService {
                addr: host_port(sshd),
                labels: BTreeMap::new(),
            }),
            apps: vec![AppService {
                name: "echo".into(),
                uri: format!("tcp://{echo}"),
                protocol: AppProtocol::Tcp,
                addr: host_port(echo),
                labels: BTreeMap::new(),
            }],
            dbs: vec![],
        },
        backoff: BackoffConfig::default(),
        timeouts: Timeouts {
            shutdown_grace: Duration::from_secs(2),
            ..Timeouts::default()
        },
        mux: mux::Config::default(),
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
