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
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use jaunt_agent::{AgentCommand, AgentSettings, Timeouts};
use jaunt_config::file::{AgentServices, AppService};
use jaunt_config::identity::IdentityKind;
use jaunt_config::wire::DialKind;
use jaunt_config::wire::ALPN_TCP;
use jaunt_engine::server::EngineHandle;
use jaunt_testkit::agent::{settings, tcp_app as app};
use jaunt_testkit::engine::{engine_config, snapshot_trusting, start_engine, tls_configs};
use jaunt_testkit::net::{exchange, request, tls_connect};
use jaunt_testkit::pki::{client_config, identity, Ca, CertAndKey};
use jaunt_testkit::services::serve_each;
use jaunt_testkit::wait::wait_for_within;
use jaunt_testkit::PUBLIC_HOST;

const CLUSTER: &str = "reload-cluster";
/// Bound on every wait; generous for a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(30);

/// A client certificate for `name` in this cluster, serial 3.
fn identity_cert(ca: &Ca, kind: IdentityKind, name: &str) -> CertAndKey {
    ca.identity_with_serial(&identity(kind, name, CLUSTER), 3)
}

fn wait_for(what: &str, condition: impl FnMut() -> bool) {
    wait_for_within(WAIT, what, condition);
}

/// A TCP server that answers every read with `tag` and the bytes read.
fn start_tagged_echo(tag: &'static str) -> SocketAddr {
    serve_each(move |mut conn| {
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
    })
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
    let mut tls = tls_connect(engine.local_addr(), Arc::clone(config), PUBLIC_HOST);
    tls.sock.set_read_timeout(Some(WAIT)).unwrap();
    let answer = exchange(&mut tls, &request(DialKind::Tcp, name), b"x", 5)?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
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
    // The agent's certificate comes from the web CA too: one CA is enough for a test.
    let tls = tls_configs(&web, &[PUBLIC_HOST], &user_ca, &web);
    let snapshot = snapshot_trusting(CLUSTER, &user_ca, &web);
    let (engine, snapshots) = start_engine(engine_config(CLUSTER, 2), tls, snapshot, WAIT);

    let (one, two) = (start_tagged_echo("one:"), start_tagged_echo("two:"));
    let (chain, key) = identity_cert(&web, IdentityKind::Host, "host-reload");
    let tls = jaunt_agent::client_config(chain, key, &[web.der()]).unwrap();
    let settings = AgentSettings {
        name: "reload-node".into(),
        labels: BTreeMap::new(),
        timeouts: Timeouts {
            shutdown_grace: Duration::from_secs(2),
            ..Timeouts::default()
        },
        ..settings(engine.local_addr(), tls, services(vec![app("one", one)]))
    };
    let (control, control_rx) = crossbeam_channel::unbounded();
    let agent = std::thread::spawn(move || jaunt_agent::run(settings, control_rx));

    let user = client_config(
        &web,
        &[ALPN_TCP],
        Some(identity_cert(&user_ca, IdentityKind::User, "alice")),
    );
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
