//! The agent's own authorization check, against a stand-in engine over real loopback TCP and
//! TLS (the harness of `agent.rs`, trimmed): the agent runs with `PolicyMode::Enforce`, the
//! test hands it a `ClusterPolicy` with `AgentCommand::ReplacePolicy`, and opens streams whose
//! headers carry user certificates from a throwaway user CA. Covers what only the agent
//! catches: streams before any policy, a certificate from another CA or for another user, a
//! role whose deny the engine did not apply, and a lock that arrives while a session is live
//! (the session ends). No sleeps: every wait is on the event itself, bounded by [`jaunt_testkit::WAIT`].

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use futures_rustls::TlsAcceptor;
use glommio::net::TcpListener;
use glommio::timer::Timer;
use jaunt_agent::policy::NO_POLICY_YET;
use jaunt_agent::{AgentCommand, AgentHooks, ClusterPolicy, PolicyMode};
use jaunt_config::file::AgentServices;
use jaunt_config::identity::{Identity, IdentityKind};
use jaunt_config::rbac::{ActiveLock, Policy};
use jaunt_config::resource::{parse_resources, LockTarget, Resource, Role};
use jaunt_config::wire::dial::{DialKind, StreamHeader};
use jaunt_engine::tunnel::{MuxStream, OpenError, Tunnel};
use jaunt_testkit::agent::{settings, tcp_app};
use jaunt_testkit::pki::{identity, Ca, StandInPki as Pki};
use jaunt_testkit::services::echo_server;
use jaunt_testkit::tunnel::{engine_side, EngineTunnel};
use jaunt_testkit::wait::{on_executor, within};

// ---------------------------------------------------------------------------------------------
// PKI

/// A user certificate for `identity` (DER), as control's user CA issues it.
fn user_cert(ca: &Ca, identity: &Identity) -> Vec<u8> {
    ca.identity_with_serial(identity, 9).0[0].to_vec()
}

fn user(name: &str, roles: &[&str]) -> Identity {
    Identity {
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        ..identity(IdentityKind::User, name, "test")
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

/// A test double of the audit hook: keeps every refusal the agent reports.
#[derive(Default)]
struct RecordedDenials(std::sync::Mutex<Vec<jaunt_agent::AccessDenial>>);

impl jaunt_agent::DenialRecorder for RecordedDenials {
    fn record(&self, denial: &jaunt_agent::AccessDenial) {
        self.0.lock().unwrap().push(denial.clone());
    }
}

// ---------------------------------------------------------------------------------------------
// The stand-in engine (one shard, one tunnel)

/// Listens on 127.0.0.1:0 and hands the first tunnel over.
fn stand_in(pki: &Pki) -> (SocketAddr, glommio::Task<EngineTunnel>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(pki.server.clone());
    let task = glommio::spawn_local(async move {
        let tcp = listener.accept().await.unwrap();
        let t = engine_side(acceptor, tcp, (1, 0)).await.into_tunnel();
        assert_eq!(t.agent.name, "node1");
        t
    });
    (addr, task)
}

// ---------------------------------------------------------------------------------------------
// Streams

/// A TCP-app stream header for `header_user` (with `roles`), carrying `cert` if given.
fn header(target: &str, header_user: &Identity, cert: Option<&[u8]>) -> Vec<u8> {
    let header = StreamHeader {
        join: None,
        terminal: false,
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
        session_id: None,
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
/// travels through the agent's control thread), bounded by [`jaunt_testkit::WAIT`].
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
        let alice_cert = user_cert(&user_ca, &alice);
        let bob_cert = user_cert(&user_ca, &bob);

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
            &header("echo", &carol, Some(&user_cert(&user_ca, &carol))),
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
        let forged = user_cert(&Ca::new("not the user CA"), &alice);
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
