//! One shard's routing table: its live agent tunnels by host id, and which host serves each
//! resource those agents announced ([`TunnelTable`]), so a user dial resolves `target name →
//! host id → tunnel` without leaving the shard. Also the name index both this table and the
//! engine-wide directory (`inventory.rs`) use ([`RouteIndex`]).
//!
//! Sans-IO and generic over the tunnel handle, so it is tested without an executor; the shard
//! (`shard.rs`) owns one `TunnelTable<Tunnel>` in a `RefCell`, and decides liveness
//! (`Tunnel::is_closed`) through the `usable` predicate of [`TunnelTable::find`].
//!
//! Policies:
//! - one entry per host id: a second tunnel of the same host replaces the first (the agent
//!   restarted); the caller drains the replaced one;
//! - a heartbeat replaces what an entry announces in place ([`TunnelTable::update`]), only for
//!   the connection that carries it;
//! - the same `(kind, name)` announced by two hosts is a configuration mistake: the first
//!   announcer keeps the name while its tunnel is usable (a newcomer cannot take over a name by
//!   connecting), and the shard logs the conflict ([`TunnelTable::conflicts`]).
//!
//! Bounds: one entry per tunnel (so at most the shard's connection limit), each with at most
//! [`jaunt_config::wire::agent_hello::MAX_RESOURCES`] index entries.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use jaunt_config::wire::agent_hello::{AgentHello, Resource, ResourceKind};

/// A registered tunnel and what its agent announced.
#[derive(Debug)]
pub(crate) struct TunnelEntry<T> {
    /// The connection that carries it.
    pub conn_id: u64,
    /// When it was registered.
    pub since: Instant,
    /// The agent's hello on this tunnel.
    pub agent: Arc<AgentHello>,
    /// The handle user streams open streams on.
    pub tunnel: T,
}

/// One shard's tunnels by host id, with a name index over their resources.
#[derive(Debug)]
pub(crate) struct TunnelTable<T> {
    entries: HashMap<String, TunnelEntry<T>>,
    index: RouteIndex,
}

impl<T> Default for TunnelTable<T> {
    fn default() -> Self {
        TunnelTable {
            entries: HashMap::new(),
            index: RouteIndex::default(),
        }
    }
}

impl<T> TunnelTable<T> {
    /// Registers `entry` for `host_id`; returns the entry it replaced, if the host had one.
    pub fn insert(&mut self, host_id: &str, entry: TunnelEntry<T>) -> Option<TunnelEntry<T>> {
        self.index.add(host_id, &entry.agent.resources);
        let previous = self.entries.insert(host_id.to_owned(), entry);
        if let Some(previous) = &previous {
            // Names the new hello still announces stay (add is idempotent and keeps the
            // host's place); the ones it dropped go.
            let current = self
                .entries
                .get(host_id)
                .map(|e| e.agent.resources.as_slice());
            self.index
                .remove_missing(host_id, &previous.agent.resources, current.unwrap_or(&[]));
        }
        self.check_invariants();
        previous
    }

    /// Removes the entry of `host_id` if it is still the one carried by `conn_id` (a replaced
    /// tunnel's connection ending must not remove its successor).
    pub fn remove(&mut self, host_id: &str, conn_id: u64) -> Option<TunnelEntry<T>> {
        if self
            .entries
            .get(host_id)
            .is_none_or(|e| e.conn_id != conn_id)
        {
            return None;
        }
        let removed = self.entries.remove(host_id);
        if let Some(removed) = &removed {
            self.index.remove(host_id, &removed.agent.resources);
        }
        self.check_invariants();
        removed
    }

    /// A heartbeat changed what the tunnel of `host_id` carried by `conn_id` announces:
    /// reindexes its names (kept names keep their place, dropped ones go, new ones queue behind
    /// earlier announcers). Returns the announcement it replaced; `None` (nothing changed) if
    /// the host's entry is not carried by `conn_id` any more.
    pub fn update(
        &mut self,
        host_id: &str,
        conn_id: u64,
        agent: &Arc<AgentHello>,
    ) -> Option<Arc<AgentHello>> {
        let entry = self
            .entries
            .get_mut(host_id)
            .filter(|e| e.conn_id == conn_id)?;
        let previous = std::mem::replace(&mut entry.agent, Arc::clone(agent));
        self.index.add(host_id, &agent.resources);
        self.index
            .remove_missing(host_id, &previous.resources, &agent.resources);
        self.check_invariants();
        Some(previous)
    }

    /// The entry of `host_id`.
    pub fn get(&self, host_id: &str) -> Option<&TunnelEntry<T>> {
        self.entries.get(host_id)
    }

    /// The host serving the resource `(kind, name)` and its entry: the first announcer whose
    /// tunnel is `usable`.
    pub fn find(
        &self,
        kind: ResourceKind,
        name: &str,
        usable: impl Fn(&T) -> bool,
    ) -> Option<(&str, &TunnelEntry<T>)> {
        self.index.hosts(kind, name).iter().find_map(|host| {
            let entry = self.entries.get(host.as_str())?;
            usable(&entry.tunnel).then_some((host.as_str(), entry))
        })
    }

    /// Resources of `host_id`'s entry that another host announced first: `(kind, name, that
    /// host)`, for a warning at registration.
    pub fn conflicts(&self, host_id: &str) -> Vec<(ResourceKind, String, String)> {
        let Some(entry) = self.entries.get(host_id) else {
            return Vec::new();
        };
        entry
            .agent
            .resources
            .iter()
            .filter_map(|r| {
                let first = self.index.hosts(r.kind, &r.name).first()?;
                (first != host_id).then(|| (r.kind, r.name.clone(), first.clone()))
            })
            .collect()
    }

    /// Registered tunnels.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Every entry.
    pub fn values(&self) -> impl Iterator<Item = &TunnelEntry<T>> {
        self.entries.values()
    }

    fn check_invariants(&self) {
        if cfg!(debug_assertions) {
            for (host, entry) in &self.entries {
                for r in &entry.agent.resources {
                    debug_assert!(
                        self.index.hosts(r.kind, &r.name).iter().any(|h| h == host),
                        "{host}'s {} {} is not indexed",
                        r.kind.as_str(),
                        r.name
                    );
                }
            }
            for hosts in self.index.by_kind.iter().flat_map(HashMap::values) {
                debug_assert!(!hosts.is_empty(), "empty index entries are removed");
                for host in hosts {
                    debug_assert!(
                        self.entries.contains_key(host),
                        "{host} indexed, not registered"
                    );
                }
            }
        }
    }
}

/// Which hosts announce each resource, by kind and name, in announcement order. A lookup
/// borrows the name (no allocation per dial).
#[derive(Debug, Default)]
pub(crate) struct RouteIndex {
    /// Indexed by [`kind_index`].
    by_kind: [HashMap<String, Vec<String>>; 4],
}

fn kind_index(kind: ResourceKind) -> usize {
    match kind {
        ResourceKind::Node => 0,
        ResourceKind::App => 1,
        ResourceKind::Db => 2,
        ResourceKind::Tcp => 3,
    }
}

impl RouteIndex {
    /// Indexes `host_id`'s `resources` (idempotent: a host is listed once per name).
    pub fn add(&mut self, host_id: &str, resources: &[Resource]) {
        for r in resources {
            let hosts = self.by_kind[kind_index(r.kind)]
                .entry(r.name.clone())
                .or_default();
            if !hosts.iter().any(|h| h == host_id) {
                hosts.push(host_id.to_owned());
            }
        }
    }

    /// Removes `host_id` from the names of `resources`.
    pub fn remove(&mut self, host_id: &str, resources: &[Resource]) {
        self.remove_missing(host_id, resources, &[]);
    }

    /// Removes `host_id` from the names of `old` that `keep` does not announce too.
    pub fn remove_missing(&mut self, host_id: &str, old: &[Resource], keep: &[Resource]) {
        for r in old {
            if keep.iter().any(|k| k.kind == r.kind && k.name == r.name) {
                continue;
            }
            let map = &mut self.by_kind[kind_index(r.kind)];
            if let Some(hosts) = map.get_mut(&r.name) {
                hosts.retain(|h| h != host_id);
                if hosts.is_empty() {
                    map.remove(&r.name);
                }
            }
        }
    }

    /// The hosts announcing `(kind, name)`, first announcer first.
    pub fn hosts(&self, kind: ResourceKind, name: &str) -> &[String] {
        self.by_kind[kind_index(kind)]
            .get(name)
            .map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use jaunt_config::wire::agent_hello::ResourceProtocol;

    fn hello(name: &str, tcp: &[&str]) -> Arc<AgentHello> {
        let mut resources = vec![Resource {
            kind: ResourceKind::Node,
            name: name.into(),
            labels: BTreeMap::new(),
            protocol: ResourceProtocol::Ssh,
        }];
        resources.extend(tcp.iter().map(|app| Resource {
            kind: ResourceKind::Tcp,
            name: (*app).into(),
            labels: BTreeMap::new(),
            protocol: ResourceProtocol::Tcp,
        }));
        Arc::new(AgentHello::new(name, BTreeMap::new(), resources))
    }

    /// The "tunnel" is whether it is usable.
    fn entry(conn_id: u64, agent: Arc<AgentHello>, usable: bool) -> TunnelEntry<bool> {
        TunnelEntry {
            conn_id,
            since: Instant::now(),
            agent,
            tunnel: usable,
        }
    }

    fn found(table: &TunnelTable<bool>, kind: ResourceKind, name: &str) -> Option<String> {
        table
            .find(kind, name, |usable| *usable)
            .map(|(h, _)| h.to_owned())
    }

    #[test]
    fn resolves_names_to_hosts_by_kind() {
        let mut table = TunnelTable::default();
        assert!(table
            .insert("h1", entry(1, hello("node1", &["redis"]), true))
            .is_none());
        assert!(table
            .insert("h2", entry(2, hello("node2", &[]), true))
            .is_none());
        assert_eq!(
            found(&table, ResourceKind::Node, "node1").as_deref(),
            Some("h1")
        );
        assert_eq!(
            found(&table, ResourceKind::Tcp, "redis").as_deref(),
            Some("h1")
        );
        assert_eq!(
            found(&table, ResourceKind::Node, "node2").as_deref(),
            Some("h2")
        );
        assert_eq!(found(&table, ResourceKind::Db, "redis"), None);
        assert_eq!(found(&table, ResourceKind::Node, "redis"), None);
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn a_replacement_keeps_the_newest_and_reindexes() {
        let mut table = TunnelTable::default();
        table.insert("h1", entry(1, hello("node1", &["redis", "old"]), true));
        let previous = table.insert("h1", entry(7, hello("node1", &["redis", "new"]), true));
        assert_eq!(previous.map(|e| e.conn_id), Some(1));
        assert_eq!(table.get("h1").map(|e| e.conn_id), Some(7));
        assert_eq!(
            found(&table, ResourceKind::Tcp, "redis").as_deref(),
            Some("h1")
        );
        assert_eq!(
            found(&table, ResourceKind::Tcp, "new").as_deref(),
            Some("h1")
        );
        assert_eq!(found(&table, ResourceKind::Tcp, "old"), None);
        // The replaced connection ending removes nothing.
        assert!(table.remove("h1", 1).is_none());
        assert_eq!(table.len(), 1);
        assert!(table.remove("h1", 7).is_some());
        assert_eq!(table.len(), 0);
        assert_eq!(found(&table, ResourceKind::Tcp, "redis"), None);
        assert!(table.index.by_kind.iter().all(HashMap::is_empty));
    }

    #[test]
    fn a_heartbeat_reindexes_only_its_own_connection() {
        let mut table = TunnelTable::default();
        table.insert("h1", entry(1, hello("node1", &["kept", "old"]), true));
        table.insert("h2", entry(2, hello("node2", &["shared"]), true));
        assert!(table.update("h1", 9, &hello("node1", &["stale"])).is_none());
        assert!(table.update("nobody", 1, &hello("x", &[])).is_none());
        let previous = table
            .update("h1", 1, &hello("node1", &["kept", "new", "shared"]))
            .unwrap();
        assert_eq!(previous.resources.len(), 3);
        assert_eq!(found(&table, ResourceKind::Tcp, "old"), None);
        assert_eq!(found(&table, ResourceKind::Tcp, "stale"), None);
        for name in ["kept", "new"] {
            assert_eq!(
                found(&table, ResourceKind::Tcp, name).as_deref(),
                Some("h1")
            );
        }
        // A name another host announced first stays with it.
        assert_eq!(
            found(&table, ResourceKind::Tcp, "shared").as_deref(),
            Some("h2")
        );
        assert_eq!(table.get("h1").map(|e| e.conn_id), Some(1));
        table.remove("h1", 1);
        assert_eq!(found(&table, ResourceKind::Tcp, "new"), None);
    }

    #[test]
    fn the_first_announcer_keeps_a_name_while_usable() {
        let mut table = TunnelTable::default();
        table.insert("h1", entry(1, hello("a", &["shared"]), true));
        table.insert("h2", entry(2, hello("b", &["shared"]), true));
        assert_eq!(
            found(&table, ResourceKind::Tcp, "shared").as_deref(),
            Some("h1")
        );
        assert_eq!(
            table.conflicts("h2"),
            vec![(ResourceKind::Tcp, "shared".to_owned(), "h1".to_owned())]
        );
        assert!(table.conflicts("h1").is_empty());
        // h1's tunnel closing hands the name to h2 at once, before h1 is removed.
        table.insert("h1", entry(3, hello("a", &["shared"]), false));
        assert_eq!(
            found(&table, ResourceKind::Tcp, "shared").as_deref(),
            Some("h2")
        );
        table.remove("h1", 3);
        assert_eq!(
            found(&table, ResourceKind::Tcp, "shared").as_deref(),
            Some("h2")
        );
    }
}
