//! A real engine on 127.0.0.1 port 0, started with a first snapshot.

use std::sync::Arc;
use std::time::Duration;

use jaunt_engine::server::{Engine, EngineConfig, EngineHandle, Snapshot, TlsConfigs};

use crate::pki::Ca;
use crate::wait::wait_for_within;
use crate::PUBLIC_HOST;

/// Listening on 127.0.0.1:0 for [`PUBLIC_HOST`] in `cluster`, with `shards` unpinned shards.
/// Nothing passes through to control: its address is a discard port.
pub fn engine_config(cluster: &str, shards: usize) -> EngineConfig {
    let mut config = EngineConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        PUBLIC_HOST,
        "127.0.0.1:9".parse().unwrap(),
    );
    config.cluster_name = cluster.into();
    config.shards = shards;
    config.pin_shards = false;
    config
}

/// The engine's TLS: a server certificate from `web` for `names`, user certificates from `user`,
/// agent certificates from `host`.
pub fn tls_configs(web: &Ca, names: &[&str], user: &Ca, host: &Ca) -> TlsConfigs {
    let (chain, key) = web.server(names);
    TlsConfigs::build(chain, key, &[user.der()], &[host.der()]).unwrap()
}

/// [`access_snapshot`], trusting `user` for users and `host` for agents.
pub fn snapshot_trusting(cluster: &str, user: &Ca, host: &Ca) -> Snapshot {
    Snapshot {
        user_ca_roots: vec![user.der()],
        host_ca_roots: vec![host.der()],
        ..access_snapshot(cluster)
    }
}

/// Snapshot version 1 of `cluster` with the built-in `access` role and nothing else.
pub fn access_snapshot(cluster: &str) -> Snapshot {
    Snapshot {
        version: 1,
        cluster: cluster.into(),
        policy: jaunt_config::rbac::Policy::compile(&[
            jaunt_config::resource::Role::builtin_access(),
        ])
        .unwrap(),
        ..Snapshot::default()
    }
}

/// Starts the engine, sends it `snapshot` and waits (up to `ready_within`) for it to be ready;
/// the handle and the snapshot channel (dropping it stops the engine's snapshot feed).
pub fn start_engine(
    config: EngineConfig,
    tls: TlsConfigs,
    snapshot: Snapshot,
    ready_within: Duration,
) -> (EngineHandle, crossbeam_channel::Sender<Arc<Snapshot>>) {
    let (snapshots, rx) = crossbeam_channel::unbounded();
    let engine = Engine::start(config, tls, rx).unwrap();
    snapshots.send(Arc::new(snapshot)).unwrap();
    wait_for_within(ready_within, "the engine to become ready", || {
        engine.ready()
    });
    (engine, snapshots)
}
