//! The agent's own authorization check, against a stand-in engine over real loopback TCP and
//! TLS (the harness of `agent.rs`, trimmed): the agent runs with `PolicyMode::Enforce`, the
//! test hands it a `ClusterPolicy` with `AgentCommand::ReplacePolicy`, and opens streams whose
//! headers carry user certificates from a throwaway user CA. Covers what only the agent
//! catches: streams before any policy, a certificate from another CA or for another user, a
//! role whose deny the engine did not apply, and a lock that arrives while a session is live
//! (the session ends). No sleeps: every wait is on the event itself, bounded by [`WAIT`].

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use futures_rustls::TlsAcceptor;
use glommio::net::TcpListener;
use glommio::task::JoinHandle;
use glommio::timer::Timer;
use glommio::{LocalExecutorBuilder, Placement};
use jaunt_agent::policy::NO_POLICY_YET;
use jaunt_agent::{
    AgentCommand, AgentHooks, AgentSettings, BackoffConfig, ClusterPolicy, PolicyMode, Timeouts,
};
use jaunt_config::file::{AgentServices, AppProtocol, AppService, HostPort};
use jaunt_config::identity::{unix_now, Identity, IdentityKind};
use jaunt_config::rbac::{ActiveLock, Policy};
use jaunt_config::resource::{parse_resources, LockTarget, Resource, Role};
use jaunt_engine::mux::{self, Role as MuxRole};
use jaunt_engine::server::dial::{DialKind, StreamHeader};
use jaunt_engine::server::TunnelHello;
use jaunt_engine::tunnel::agent_hello::AgentHello;
use jaunt_engine::tunnel::{CloseReason, MuxStream, OpenError, Tunnel};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Bound on every wait for an event; generous for a loaded 2-core debug build.
const WAIT: Duration = Duration::from_secs(20);

/// The name the stand-in's certificate carries and the agent checks.
const PROXY_HOST: &str = "localhost";

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
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    fn leaf(&self, name: &str, usage: ExtendedKeyUsagePurpose) -> CertAndKey {
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        set_validity(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

fn set_validity(params: &mut CertificateParams) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(now - 3600);
    params.not_after = epoch + Duration::from_secs(now + 86400);
}

struct Pki {
    host_ca: Ca,
    server: Arc<rustls::ServerConfig>,
}

impl Pki {
    fn new() -> Pki {
        let host_ca = Ca::new("test host CA");
        let (chain, key) = host_ca.leaf(PROXY_HOST, ExtendedKeyUsagePurpose::ServerAuth);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(host_ca.der()).unwrap();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        server.alpn_protocols = vec![b"jaunt-tunnel".to_vec()];
        Pki {
            host_ca,
            server: Arc::new(server),
        }
    }

    /// The agent's client configuration with a host certificate from `issuer`, trusting the
    /// real host CA for the proxy.
    fn agent_tls(&self, issuer: &Ca) -> Arc<rustls::ClientConfig> {
        let (chain, key) = issuer.leaf("node1", ExtendedKeyUsagePurpose::ClientAuth);
        jaunt_agent::client_config(chain, key, &[self.host_ca.der()]).unwrap()
    }
}

impl Ca {
    /// A user certificate for `identity` (DER), as control's user CA issues it.
    fn user(&self, identity: &Identity) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        identity
            .x509_params([9; 16], &[])
            .signed_by(&key, &self.issuer)
            .unwrap()
            .der()
            .to_vec()
    }
}

fn user(name: &str, roles: &[&str]) -> Identity {
    let now = unix_now();
    Identity {
        kind: IdentityKind::User,
        name: name.into(),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        logins: vec!["root".into()],
        db_users: Vec::new(),
        db_names: Vec::new(),
        traits: BTreeMap::new(),
        cluster: "test".into(),
        not_before: now - 60,
        expires: now + 3600,
        permit_pty: true,
        permit_port_forwarding: false,
        permit_agent_forwarding: false,
    }
}

// ---------------------------------------------------------------------------------------------
// Policy

fn role(yaml: &str) -> Role {
    match parse_resources("role.yaml", yaml).unwrap().remove(0) {
        Resource::Role(role) => role,
        other => panic!("{other:?}"),
    }
}

/// `access` reaches apps labelled `env: test`; `blocked` denies them (the engine's snapshot
/// would not have it in this test's story).
fn roles() -> Vec<Role> {
    vec![
        role(
            "kind: role\nversion: v1\nmetadata: { name: access }\nspec:\n  allow:\n    \
             app_labels: { env: test }\n",
        ),
        role(
            "kind: role\nversion: v1\nmetadata: { name: blocked }\nspec:\n  deny:\n    \
             app_labels: { env: test }\n",
        ),
    ]
}

fn cluster_policy(version: &str, user_ca: &Ca, locks: Vec<ActiveLock>) -> Arc<ClusterPolicy> {
    let policy = Policy::compile(&roles()).unwrap();
    Arc::new(ClusterPolicy::new(version, "test", policy, locks, &[user_ca.der()]).unwrap())
}

// ---------------------------------------------------------------------------------------------
// Local services and settings

/// A TCP echo server; each connection is echoed until EOF, then closed.
fn echo_server() -> SocketAddr {
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut reader = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut reader, &mut conn);
                let _ = conn.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

fn hp(addr: SocketAddr) -> HostPort {
    addr.to_string().parse().unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn tcp_app(name: &str, addr: SocketAddr) -> AppService {
    AppService {
        name: name.into(),
        uri: format!("tcp://{addr}"),
        protocol: AppProtocol::Tcp,
        addr: hp(addr),
        labels: BTreeMap::new(),
    }
}

/// A test double of the audit hook: keeps every refusal the agent reports.
#[derive(Default)]
struct RecordedDenials(std::sync::Mutex<Vec<jaunt_agent::AccessDenial>>);

impl jaunt_agent::DenialRecorder for RecordedDenials {
    fn record(&self, denial: &jaunt_agent::AccessDenial) {
        self.0.lock().unwrap().push(denial.clone());
    }
}

fn settings(
    proxy: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    services: AgentServices,
) -> AgentSettings {
    AgentSettings {
        proxy_addr: proxy.to_string(),
        server_name: PROXY_HOST.into(),
        tls,
        name: "node1".into(),
        labels: labels(&[("env", "test")]),
        services,
        backoff: BackoffConfig::default(),
        timeouts: Timeouts::default(),
        mux: mux::Config::default(),
    }
}

// ---------------------------------------------------------------------------------------------
// The stand-in engine (one shard, one tunnel)

struct EngineTunnel {
    tunnel: Tunnel,
    _driver: JoinHandle<CloseReason>,
}

/// Listens on 127.0.0.1:0 and hands the first tunnel over.
fn stand_in(pki: &Pki) -> (SocketAddr, glommio::Task<EngineTunnel>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(pki.server.clone());
    let task = glommio::spawn_local(async move {
        let tcp = listener.accept().await.unwrap();
        engine_side(acceptor, tcp, (1, 0)).await
    });
    (addr, task)
}

async fn engine_side(
    acceptor: TlsAcceptor,
    tcp: glommio::net::TcpStream,
    (shards, shard): (usize, usize),
) -> EngineTunnel {
    let mut tls = acceptor.accept(tcp).await.unwrap();
    let hello = TunnelHello::new(shards, shard);
    tls.write_all(&hello.encode()).await.unwrap();
    tls.flush().await.unwrap();
    let mut frame = vec![0u8; 2];
    tls.read_exact(&mut frame).await.unwrap();
    frame.resize(2 + usize::from(u16::from_be_bytes([frame[0], frame[1]])), 0);
    tls.read_exact(&mut frame[2..]).await.unwrap();
    let (agent, used) = AgentHello::parse(&frame).unwrap().unwrap();
    assert_eq!(used, frame.len());
    let (tunnel, driver) = Tunnel::spawn(tls, MuxRole::Server, mux::Config::default());
    assert_eq!(agent.name, "node1");
    EngineTunnel {
        tunnel,
        _driver: driver,
    }
}

// ---------------------------------------------------------------------------------------------
// Streams

/// A TCP-app stream header for `header_user` (with `roles`), carrying `cert` if given.
fn header(target: &str, header_user: &Identity, cert: Option<&[u8]>) -> Vec<u8> {
    let header = StreamHeader {
        kind: DialKind::Tcp,
        target: target.into(),
        login: None,
        db_user: None,
        db_name: None,
        user: header_user.name.clone(),
        roles: header_user.roles.clone(),
        client_addr: "192.0.2.1:5555".into(),
        allowed_db_users: Vec::new(),
        allowed_db_names: Vec::new(),
    };
    match cert {
        Some(cert) => header.encode_with_client_cert(cert).unwrap(),
        None => header.encode().unwrap(),
    }
}

async fn open(tunnel: &Tunnel, header: &[u8]) -> Result<MuxStream, OpenError> {
    within("the agent's answer to an open", tunnel.open(header)).await
}

async fn refused(tunnel: &Tunnel, header: &[u8]) -> String {
    match open(tunnel, header).await {
        Err(OpenError::Refused { message }) => message,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, the agent accepted"),
    }
}

/// Writes `text` and reads it back from the echo app.
async fn echo_once(stream: &MuxStream, text: &[u8]) {
    let mut s = stream;
    s.write_all(text).await.unwrap();
    s.flush().await.unwrap();
    let mut back = vec![0u8; text.len()];
    within("the echo", s.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, text);
}

/// Opens `header` until the agent stops answering [`NO_POLICY_YET`] (the policy command
/// travels through the agent's control thread), bounded by [`WAIT`].
async fn open_once_policy_arrived(tunnel: &Tunnel, header: &[u8]) -> Result<MuxStream, String> {
    within("the policy to reach the agent", async {
        loop {
            match tunnel.open(header).await {
                Err(OpenError::Refused { message }) if message == NO_POLICY_YET => {
                    Timer::new(Duration::from_millis(10)).await;
                }
                Err(OpenError::Refused { message }) => return Err(message),
                Err(e) => panic!("{e}"),
                Ok(stream) => return Ok(stream),
            }
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Helpers

async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    future::or(async { Some(fut.await) }, async {
        Timer::new(WAIT).await;
        None
    })
    .await
    .unwrap_or_else(|| panic!("timed out after {WAIT:?} waiting for {what}"))
}

fn on_executor<F, Fut>(test: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    LocalExecutorBuilder::new(Placement::Unbound)
        .name("stand-in-engine")
        .io_memory(64 << 10)
        .make()
        .unwrap()
        .run(test());
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn the_agent_rechecks_every_stream_and_a_late_lock_ends_a_live_session() {
    on_executor(|| async {
        let pki = Pki::new();
        let user_ca = Ca::new("test user CA");
        let (proxy, tunnel) = stand_in(&pki);
        let services = AgentServices {
            ssh: None,
            apps: vec![tcp_app("echo", echo_server())],
            dbs: Vec::new(),
        };
        let settings = settings(proxy, pki.agent_tls(&pki.host_ca), services);
        let (control, control_rx) = crossbeam_channel::unbounded();
        let denials = Arc::new(RecordedDenials::default());
        let hooks = AgentHooks {
            denials: denials.clone(),
            ..AgentHooks::default()
        };
        std::thread::spawn(move || {
            jaunt_agent::run_with_policy(settings, hooks, PolicyMode::Enforce, control_rx)
        });
        let t = within("the agent's tunnel", tunnel).await;

        let alice = user("alice", &["access"]);
        let bob = user("bob", &["access"]);
        let carol = user("carol", &["access", "blocked"]);
        let alice_cert = user_ca.user(&alice);
        let bob_cert = user_ca.user(&bob);

        // No policy yet: refused, readably.
        assert_eq!(
            refused(&t.tunnel, &header("echo", &alice, Some(&alice_cert))).await,
            NO_POLICY_YET
        );

        // With the policy: alice reaches the echo app.
        control
            .send(AgentCommand::ReplacePolicy(cluster_policy(
                "v1",
                &user_ca,
                Vec::new(),
            )))
            .unwrap();
        let live = open_once_policy_arrived(&t.tunnel, &header("echo", &alice, Some(&alice_cert)))
            .await
            .unwrap();
        echo_once(&live, b"hello").await;

        // What only the agent catches, each refused with a message that says why.
        let message = refused(
            &t.tunnel,
            &header("echo", &carol, Some(&user_ca.user(&carol))),
        )
        .await;
        assert!(
            message.contains("echo") && message.contains("role blocked denies"),
            "{message}"
        );
        let message = refused(&t.tunnel, &header("echo", &bob, Some(&alice_cert))).await;
        assert!(
            message.contains("\"bob\"") && message.contains("\"alice\""),
            "{message}"
        );
        let forged = Ca::new("not the user CA").user(&alice);
        let message = refused(&t.tunnel, &header("echo", &alice, Some(&forged))).await;
        assert!(message.contains("not valid for this cluster"), "{message}");
        let message = refused(&t.tunnel, &header("echo", &alice, None)).await;
        assert!(message.contains("no user certificate"), "{message}");
        // Each refusal went to the audit hook, with who, what and why.
        let recorded = denials.0.lock().unwrap().clone();
        let carols = recorded
            .iter()
            .find(|d| d.user == "carol")
            .expect("carol's refusal recorded");
        assert_eq!(
            (carols.kind.as_str(), carols.target.as_str()),
            ("tcp", "echo")
        );
        assert!(carols.reason.contains("role blocked denies"), "{carols:?}");
        assert!(
            recorded.iter().filter(|d| d.user == "alice").count() >= 3,
            "{recorded:?}"
        );

        // Bob's session is live too; then a lock on alice arrives with a newer policy.
        let bobs = open(&t.tunnel, &header("echo", &bob, Some(&bob_cert)))
            .await
            .unwrap();
        echo_once(&bobs, b"bob").await;
        let lock = ActiveLock {
            name: "lock-alice".into(),
            target: LockTarget::User("alice".into()),
            message: "incident 42".into(),
            expires: None,
        };
        control
            .send(AgentCommand::ReplacePolicy(cluster_policy(
                "v2",
                &user_ca,
                vec![lock],
            )))
            .unwrap();
        // Alice's live session ends: her stream is reset (or reaches EOF).
        let mut s = &live;
        let mut buf = [0u8; 16];
        let ended = within("alice's session to end", s.read(&mut buf)).await;
        assert!(matches!(ended, Ok(0) | Err(_)), "{ended:?}");
        // New streams for alice are refused with the lock's message; bob carries on.
        let message = refused(&t.tunnel, &header("echo", &alice, Some(&alice_cert))).await;
        assert!(
            message.contains("lock-alice") && message.contains("incident 42"),
            "{message}"
        );
        echo_once(&bobs, b"still here").await;

        control.send(AgentCommand::Shutdown).unwrap();
    });
}
