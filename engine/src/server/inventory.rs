//! Which agents are connected to this engine, and what they serve: the events control receives
//! ([`InventoryEvent`]), the merged view [`crate::server::EngineHandle::inventory`] returns
//! ([`AgentInventory`]), and the engine-wide [`Directory`] behind both.
//!
//! # Why a `Mutex` here
//!
//! A shard routes a user dial from its own tunnel table (`table.rs`), shared nothing. The
//! directory answers the questions a shard cannot answer alone: "does this agent have a tunnel
//! to another shard?" (to tell "retry" from "offline" from "no such node") and "what is
//! connected?" (for `jaunt get nodes`, `jaunt status`). It is written once per tunnel up or down
//! and per heartbeat that changes an agent's resources (rare, and bounded per tunnel), and read
//! on a dial *miss* (no usable tunnel on the dialing shard) and by the handle, never on
//! a dial that finds its tunnel; so its `Mutex` is taken at the rate agents connect and dials
//! fail, not at the rate of connections. Broadcasting every tunnel change to every shard instead
//! would cost shards × changes messages in a reconnect storm to save a lock on a refusal path.
//!
//! Events to control are sent by the shard that saw the change, with `try_send`: a full or
//! closed channel drops the event (counted in `jaunt_inventory_events_dropped_total`) rather than
//! stall a shard. Control can rebuild its view from [`crate::server::EngineHandle::inventory`]
//! after a drop.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use jaunt_config::identity::unix_now;
use serde::{Deserialize, Serialize};

use crate::server::table::RouteIndex;
use jaunt_config::wire::agent_hello::{AgentHello, Resource, ResourceKind};

/// A change in which agents have tunnels to which shard. Keyed by `(shard, host_id)`: a
/// `TunnelUp` for a pair that is already up replaces what it announced (the agent reconnected
/// that tunnel, possibly with new resources); a `TunnelDown` comes only when the pair has no
/// tunnel left.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum InventoryEvent {
    /// Agent `host_id` has a tunnel to `shard`, announcing these resources.
    TunnelUp {
        /// The engine shard.
        shard: usize,
        /// From the agent's verified host certificate.
        host_id: String,
        /// The agent's node name.
        name: String,
        /// The agent's host labels.
        labels: BTreeMap<String, String>,
        /// What it serves.
        resources: Vec<Resource>,
    },
    /// Agent `host_id` has no tunnel to `shard` any more.
    TunnelDown {
        /// The engine shard.
        shard: usize,
        /// The agent's host id.
        host_id: String,
    },
}

/// One connected agent, merged across shards.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInventory {
    /// From the agent's verified host certificate.
    pub host_id: String,
    /// The agent's node name.
    pub name: String,
    /// The agent's host labels.
    pub labels: BTreeMap<String, String>,
    /// What it serves (as announced on its most recent tunnel).
    pub resources: Vec<Resource>,
    /// Shards it has a tunnel to, ascending.
    pub shards: Vec<usize>,
    /// Unix seconds since it has had at least one tunnel to this engine.
    pub connected_since: u64,
}

/// What the directory knows of one host.
#[derive(Clone, Debug)]
pub(crate) struct HostRecord {
    /// Its most recent hello.
    pub agent: Arc<AgentHello>,
    /// Shards it has a tunnel to.
    pub shards: BTreeSet<usize>,
}

/// The engine-wide view of connected agents (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct Directory {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    hosts: BTreeMap<String, Entry>,
    index: RouteIndex,
}

#[derive(Debug)]
struct Entry {
    record: HostRecord,
    connected_since: u64,
    /// The sequence of the newest heartbeat applied (`None` before the first).
    seq: Option<u64>,
}

/// What [`Directory::heartbeat`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeartbeatApplied {
    /// The host's record now holds this announcement.
    Applied,
    /// A heartbeat with a higher sequence was applied already (from another tunnel).
    Stale,
    /// The host is not connected (its last tunnel just ended).
    Unknown,
}

impl Directory {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent-enough data (every update is a few
        // map operations); keep serving rather than poison every later dial.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `host_id` has a tunnel to `shard` that announced `agent`.
    pub fn tunnel_up(&self, shard: usize, host_id: &str, agent: &Arc<AgentHello>) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        match inner.hosts.get_mut(host_id) {
            Some(entry) => {
                inner.index.remove_missing(
                    host_id,
                    &entry.record.agent.resources,
                    &agent.resources,
                );
                inner.index.add(host_id, &agent.resources);
                entry.record.agent = Arc::clone(agent);
                entry.record.shards.insert(shard);
            }
            None => {
                inner.index.add(host_id, &agent.resources);
                inner.hosts.insert(
                    host_id.to_owned(),
                    Entry {
                        record: HostRecord {
                            agent: Arc::clone(agent),
                            shards: BTreeSet::from([shard]),
                        },
                        connected_since: unix_now(),
                        seq: None,
                    },
                );
            }
        }
    }

    /// A heartbeat with sequence `seq` from `host_id` announced `agent` (changed): applied
    /// unless a heartbeat with a higher sequence came first. Heartbeats with the same sequence
    /// carry the same announcement (one per tunnel), so an equal one is applied (idempotent).
    pub fn heartbeat(&self, host_id: &str, seq: u64, agent: &Arc<AgentHello>) -> HeartbeatApplied {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(entry) = inner.hosts.get_mut(host_id) else {
            return HeartbeatApplied::Unknown;
        };
        if entry.seq.is_some_and(|applied| seq < applied) {
            return HeartbeatApplied::Stale;
        }
        entry.seq = Some(seq);
        if entry.record.agent != *agent {
            inner
                .index
                .remove_missing(host_id, &entry.record.agent.resources, &agent.resources);
            inner.index.add(host_id, &agent.resources);
            entry.record.agent = Arc::clone(agent);
        }
        HeartbeatApplied::Applied
    }

    /// `host_id` has no tunnel to `shard` any more.
    pub fn tunnel_down(&self, shard: usize, host_id: &str) {
        let mut inner = self.lock();
        let Some(entry) = inner.hosts.get_mut(host_id) else {
            return;
        };
        entry.record.shards.remove(&shard);
        if entry.record.shards.is_empty() {
            if let Some(gone) = inner.hosts.remove(host_id) {
                inner.index.remove(host_id, &gone.record.agent.resources);
            }
        }
    }

    /// The host announcing resource `(kind, name)` (the first announcer) and its record.
    pub fn find(&self, kind: ResourceKind, name: &str) -> Option<(String, HostRecord)> {
        let inner = self.lock();
        let host = inner.index.hosts(kind, name).first()?;
        let entry = inner.hosts.get(host)?;
        Some((host.clone(), entry.record.clone()))
    }

    /// What is known of `host_id`.
    pub fn host(&self, host_id: &str) -> Option<HostRecord> {
        self.lock().hosts.get(host_id).map(|e| e.record.clone())
    }

    /// Every connected agent, by host id.
    pub fn inventory(&self) -> Vec<AgentInventory> {
        self.lock()
            .hosts
            .iter()
            .map(|(host_id, entry)| AgentInventory {
                host_id: host_id.clone(),
                name: entry.record.agent.name.clone(),
                labels: entry.record.agent.labels.clone(),
                resources: entry.record.agent.resources.clone(),
                shards: entry.record.shards.iter().copied().collect(),
                connected_since: entry.connected_since,
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use jaunt_config::wire::agent_hello::ResourceProtocol;

    fn hello(name: &str, tcp: &[&str]) -> Arc<AgentHello> {
        let resources = tcp
            .iter()
            .map(|app| Resource {
                kind: ResourceKind::Tcp,
                name: (*app).into(),
                labels: BTreeMap::new(),
                protocol: ResourceProtocol::Tcp,
            })
            .collect();
        Arc::new(AgentHello::new(name, BTreeMap::new(), resources))
    }

    #[test]
    fn merges_shards_and_forgets_a_host_with_none_left() {
        let directory = Directory::default();
        directory.tunnel_up(1, "h1", &hello("node1", &["redis"]));
        directory.tunnel_up(0, "h1", &hello("node1", &["redis", "pg"]));
        directory.tunnel_up(0, "h2", &hello("node2", &[]));
        let inventory = directory.inventory();
        assert_eq!(inventory.len(), 2);
        assert_eq!(inventory[0].host_id, "h1");
        assert_eq!(inventory[0].shards, vec![0, 1]);
        assert_eq!(inventory[0].resources.len(), 2, "the latest hello wins");
        let (host, record) = directory.find(ResourceKind::Tcp, "pg").unwrap();
        assert_eq!((host.as_str(), record.shards.len()), ("h1", 2));

        directory.tunnel_down(1, "h1");
        assert_eq!(directory.host("h1").map(|r| r.shards.len()), Some(1));
        directory.tunnel_down(0, "h1");
        assert!(directory.host("h1").is_none());
        assert!(directory.find(ResourceKind::Tcp, "redis").is_none());
        directory.tunnel_down(0, "nobody");
        assert_eq!(directory.inventory().len(), 1);
    }

    #[test]
    fn a_new_hello_drops_names_it_no_longer_announces() {
        let directory = Directory::default();
        directory.tunnel_up(0, "h1", &hello("node1", &["old", "kept"]));
        directory.tunnel_up(1, "h1", &hello("node1", &["kept", "new"]));
        assert!(directory.find(ResourceKind::Tcp, "old").is_none());
        assert!(directory.find(ResourceKind::Tcp, "kept").is_some());
        assert!(directory.find(ResourceKind::Tcp, "new").is_some());
    }

    #[test]
    fn heartbeats_apply_in_sequence_order_only() {
        let directory = Directory::default();
        assert_eq!(
            directory.heartbeat("h1", 5, &hello("node1", &["x"])),
            HeartbeatApplied::Unknown
        );
        directory.tunnel_up(0, "h1", &hello("node1", &["old"]));
        directory.tunnel_up(1, "h1", &hello("node1", &["old"]));
        assert_eq!(
            directory.heartbeat("h1", 10, &hello("node1", &["new"])),
            HeartbeatApplied::Applied
        );
        assert!(directory.find(ResourceKind::Tcp, "old").is_none());
        assert!(directory.find(ResourceKind::Tcp, "new").is_some());
        // A late heartbeat from the other tunnel does not go back in time.
        assert_eq!(
            directory.heartbeat("h1", 9, &hello("node1", &["old"])),
            HeartbeatApplied::Stale
        );
        assert!(directory.find(ResourceKind::Tcp, "old").is_none());
        assert_eq!(
            directory.heartbeat("h1", 10, &hello("node1", &["new"])),
            HeartbeatApplied::Applied
        );
        assert_eq!(directory.inventory()[0].resources[0].name, "new");
    }

    #[test]
    fn events_serialize_with_a_tag() {
        let down = InventoryEvent::TunnelDown {
            shard: 1,
            host_id: "h1".into(),
        };
        assert_eq!(
            serde_json::to_string(&down).unwrap(),
            r#"{"event":"tunnel_down","shard":1,"host_id":"h1"}"#
        );
    }
}
