//! [`AgentCommand::Reload`] end to end: the real agent ([`jaunt_agent::run`]) with tunnels to
//! both shards of a real [`Engine`] reloads its services; its heartbeats carry the change, so a
//! user dial to the added app reaches that app on either shard, a removed app is refused as
//! unknown, and no tunnel is redialed.
//!
//! No test orders events with a sleep: each waits for a condition with a deadline.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should stop the test"
)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jaunt_agent::{AgentCommand, AgentSettings, BackoffConfig, Timeouts};
use jaunt_config::file::{AgentServices, AppProtocol, AppService, HostPort};
use jaunt_config::identity::{unix_now, Identity, IdentityKind};
use jaunt_engine::mux;
use jaunt_engine::route::ALPN_TCP;
use jaunt_engine::server::{
    DialKind, DialRequest, DialResponse, Engine, EngineConfig, EngineHandle, Snapshot, TlsConfigs,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

const PUBLIC_HOST: &str = "localhost";
const CLUSTER: &str = "reload-cluster";
/// Bound on every wait; generous for a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(30);

type CertAndKey = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

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

    fn server(&self) -> CertAndKey {
        let mut params = CertificateParams::new(vec![PUBLIC_HOST.to_owned()]).unwrap();
        validity(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.0).unwrap();
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
            .x509_params([3; 16], &[])
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

/// A TCP server that answers every read with `tag` and the bytes read.
fn start_tagged_echo(tag: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut reply = tag.as_bytes().to_vec();
                    reply.extend_from_slice(&buf[..n]);
                    if conn.write_all(&reply).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn app(name: &str, addr: SocketAddr) -> AppService {
    AppService {
        name: name.into(),
        uri: format!("tcp://{addr}"),
        protocol: AppProtocol::Tcp,
        addr: HostPort {
            host: addr.ip().to_string(),
            port: addr.port(),
        },
        labels: BTreeMap::new(),
    }
}

fn services(apps: Vec<AppService>) -> AgentServices {
    AgentServices {
        ssh: None,
        apps,
        dbs: vec![],
    }
}

/// Dials the TCP app `name` as alice: what the app answered to `x`, or the engine's refusal.
fn dial(
    engine: &EngineHandle,
    config: &Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<String, String> {
    let tcp = TcpStream::connect(engine.local_addr()).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let conn = rustls::ClientConnection::new(
        Arc::clone(config),
        ServerName::try_from(PUBLIC_HOST).unwrap(),
    )
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
        return Err(response.error.unwrap_or_default());
    }
    tls.write_all(b"x").unwrap();
    tls.flush().unwrap();
    let mut answer = [0u8; 5];
    tls.read_exact(&mut answer).unwrap();
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn metric(engine: &EngineHandle, name: &str, label: &str) -> u64 {
    engine
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

#[test]
fn a_reload_is_heartbeated_on_every_tunnel_without_redialing() {
    let (web, user_ca) = (Ca::new("web"), Ca::new("user"));
    let mut config = EngineConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        PUBLIC_HOST,
        "127.0.0.1:9".parse().unwrap(),
    );
    config.cluster_name = CLUSTER.into();
    config.shards = 2;
    config.pin_shards = false;
    let (chain, key) = web.server();
    // The agent's certificate comes from the web CA too: one CA is enough for a test.
    let tls = TlsConfigs::build(chain, key, &[user_ca.der()], &[web.der()]).unwrap();
    let (snapshots, rx) = crossbeam_channel::unbounded();
    let engine = Engine::start(config, tls, rx).unwrap();
    snapshots
        .send(Arc::new(Snapshot {
            version: 1,
            cluster: CLUSTER.into(),
            user_ca_roots: vec![user_ca.der()],
            host_ca_roots: vec![web.der()],
            policy: jaunt_config::rbac::Policy::compile(&[
                jaunt_config::resource::Role::builtin_access(),
            ])
            .unwrap(),
            ..Snapshot::default()
        }))
        .unwrap();
    wait_for("readiness", || engine.ready());

    let (one, two) = (start_tagged_echo("one:"), start_tagged_echo("two:"));
    let (chain, key) = web.identity(IdentityKind::Host, "host-reload");
    let settings = AgentSettings {
        proxy_addr: engine.local_addr().to_string(),
        server_name: PUBLIC_HOST.into(),
        tls: jaunt_agent::client_config(chain, key, &[web.der()]).unwrap(),
        name: "reload-node".into(),
        labels: BTreeMap::new(),
        services: services(vec![app("one", one)]),
        backoff: BackoffConfig::default(),
        timeouts: Timeouts {
            shutdown_grace: Duration::from_secs(2),
            ..Timeouts::default()
        },
        mux: mux::Config::default(),
    };
    let (control, control_rx) = crossbeam_channel::unbounded();
    let agent = std::thread::spawn(move || jaunt_agent::run(settings, control_rx));

    let user = {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(web.der()).unwrap();
        let (chain, key) = user_ca.identity(IdentityKind::User, "alice");
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
        config.alpn_protocols = vec![ALPN_TCP.to_vec()];
        Arc::new(config)
    };
    wait_for("a tunnel on both shards", || {
        engine
            .inventory()
            .first()
            .is_some_and(|a| a.shards == [0, 1])
    });
    let tunnels_dialed = metric(
        &engine,
        "jaunt_connections_accepted_total",
        "route=\"tunnel\"",
    );
    assert_eq!(dial(&engine, &user, "one").as_deref(), Ok("one:x"));
    let unknown = dial(&engine, &user, "two").unwrap_err();
    assert!(unknown.starts_with(r#"no such app "two""#), "{unknown}");

    // Add `two`: every tunnel heartbeats it, so dials on either shard reach it.
    control
        .send(AgentCommand::Reload {
            labels: BTreeMap::from([("env".to_owned(), "reloaded".to_owned())]),
            services: services(vec![app("one", one), app("two", two)]),
        })
        .unwrap();
    wait_for("two in the inventory", || {
        engine.inventory().first().is_some_and(|a| {
            a.resources.iter().any(|r| r.name == "two")
                && a.labels.get("env").map(String::as_str) == Some("reloaded")
        })
    });
    // Connections land on either shard: enough dials reach both.
    let mut answers = 0;
    wait_for("two answering on every dial", || {
        match dial(&engine, &user, "two") {
            Ok(answer) => {
                assert_eq!(answer, "two:x");
                answers += 1;
            }
            Err(e) => {
                assert!(e.starts_with(r#"no such app "two""#), "{e}");
                answers = 0;
            }
        }
        answers >= 8
    });
    assert_eq!(dial(&engine, &user, "one").as_deref(), Ok("one:x"));

    // Remove `one`: refused as unknown on every shard once the heartbeats are in.
    control
        .send(AgentCommand::Reload {
            labels: BTreeMap::new(),
            services: services(vec![app("two", two)]),
        })
        .unwrap();
    let mut refusals = 0;
    wait_for("one refused on every dial", || {
        match dial(&engine, &user, "one") {
            Ok(_) => refusals = 0,
            Err(e) => {
                assert!(e.starts_with(r#"no such app "one""#), "{e}");
                refusals += 1;
            }
        }
        refusals >= 8
    });
    assert_eq!(dial(&engine, &user, "two").as_deref(), Ok("two:x"));
    assert_eq!(
        metric(
            &engine,
            "jaunt_connections_accepted_total",
            "route=\"tunnel\""
        ),
        tunnels_dialed,
        "a tunnel was redialed"
    );

    control.send(AgentCommand::Shutdown).unwrap();
    agent.join().unwrap().unwrap();
    drop(snapshots);
    engine.shutdown(Duration::from_secs(1)).unwrap();
}
