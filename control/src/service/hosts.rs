//! The cluster's hosts: `GET /v1/status`, `GET /v1/inventory`, `GET /v1/hosts` and `DELETE
//! /v1/hosts/NAME_OR_ID`, the connected agents' inventory fed by the engine's events, the
//! control+engine members from their heartbeats, and which agents have not confirmed the CA
//! generation.
//!
//! Not here: joining and renewing (`login.rs`), what the agents poll (`agent.rs`), the
//! heartbeats' writing (`daemon.rs`).

use std::collections::BTreeMap;

use jaunt_config::api::{CaInfo, HostInfo, ResourceInfo, StatusResponse};
use jaunt_config::identity::{unix_now, Identity, IdentityKind};
use jaunt_engine::server::{AgentInventory, InventoryEvent};

use super::{internal, Control, Reply, MEMBER_STALE_SECS};
use crate::audit;
use crate::ca::CaKind;
use crate::http::{Request, Response};

impl Control {
    /// Connected agents that polled within [`crate::rotation::AGENT_CONFIRM_WINDOW_SECS`] and
    /// have not confirmed the current CA generation, by host id. A connected agent that never
    /// polled counts as unconfirmed too.
    pub fn unconfirmed_agents(&self) -> Vec<String> {
        let generation = self.cas().generation();
        let now = unix_now();
        let confirmations = self.confirmations.lock().unwrap_or_else(|p| p.into_inner());
        let inventory = self.inventory.read().unwrap_or_else(|p| p.into_inner());
        inventory
            .keys()
            .filter(|id| match confirmations.get(*id) {
                Some((confirmed, seen)) => {
                    *confirmed != generation
                        && now.saturating_sub(*seen) <= crate::rotation::AGENT_CONFIRM_WINDOW_SECS
                }
                None => true,
            })
            .cloned()
            .collect()
    }

    /// Applies inventory events from the engine, in order: the in-memory inventory under one
    /// hold of its lock, then one store transaction that sets `last_seen` for the hosts whose
    /// tunnels came up. After an engine restart every agent's tunnels come up within seconds
    /// (19,800 for 9,900 agents on two shards), and a read and a write transaction per event
    /// made control's inventory thread compete with the handshakes for the CPU, holding the lock
    /// (which `GET /v1/inventory`, `/v1/hosts` and `/v1/status` read) across each. A store error
    /// leaves the inventory applied and is logged; the host's next tunnel-up writes `last_seen`
    /// again.
    pub fn apply_inventory_batch(&self, events: Vec<jaunt_engine::server::InventoryEvent>) {
        let now = unix_now();
        let mut seen: Vec<String> = Vec::new();
        {
            let Ok(mut inv) = self.inventory.write() else {
                return;
            };
            for event in events {
                seen.extend(apply_inventory_event(&mut inv, event, now));
            }
        }
        seen.sort_unstable();
        seen.dedup();
        let ids: Vec<&str> = seen.iter().map(String::as_str).collect();
        if let Err(e) = self.store.touch_hosts(&ids, now) {
            tracing::warn!(hosts = ids.len(), error = %e, "inventory: could not record last_seen");
        }
    }

    /// Every resource of every connected agent.
    pub fn inventory(&self) -> Vec<ResourceInfo> {
        let Ok(inv) = self.inventory.read() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for agent in inv.values() {
            for r in &agent.resources {
                let mut labels = agent.labels.clone();
                labels.extend(r.labels.clone());
                out.push(ResourceInfo {
                    kind: r.kind.as_str().to_string(),
                    name: r.name.clone(),
                    labels,
                    protocol: r.protocol.as_str().to_string(),
                    host_id: agent.host_id.clone(),
                    agent: agent.name.clone(),
                    shards: agent.shards.clone(),
                });
            }
        }
        out.sort_by(|a, b| (&a.kind, &a.name).cmp(&(&b.kind, &b.name)));
        out
    }

    pub(super) fn is_connected(&self, host_id: &str) -> bool {
        self.inventory
            .read()
            .map(|i| i.contains_key(host_id))
            .unwrap_or(false)
    }

    pub(super) fn status(&self, caller: &Identity) -> Reply {
        self.require(caller, "node", "list")?;
        let authorities = self.cas();
        let cas = &authorities;
        let cas = CaKind::ALL
            .iter()
            .flat_map(|&k| {
                let ca = cas.get(k);
                let extra = cas.extra(k);
                let phase = Some(cas.phase(k.name()).to_string());
                [
                    CaInfo {
                        r#type: format!("{}-tls", k.name()),
                        fingerprint: ca.pin().to_string(),
                        phase: phase.clone(),
                        additional: extra.map(|e| e.pin().to_string()),
                    },
                    CaInfo {
                        r#type: format!("{}-ssh", k.name()),
                        fingerprint: ca.ssh_fingerprint(),
                        phase,
                        additional: extra.map(|e| e.ssh_fingerprint()),
                    },
                ]
            })
            .chain(std::iter::once(CaInfo {
                r#type: "jwt".to_string(),
                fingerprint: format!("kid:{}", authorities.jwt.kid()),
                phase: Some(authorities.phase("jwt").to_string()),
                additional: authorities
                    .extra_jwt
                    .as_ref()
                    .map(|j| format!("kid:{}", j.kid())),
            }))
            .collect();
        Ok(Response::json(
            200,
            &StatusResponse {
                cluster_name: self.settings.cluster.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                public_addr: self.public_addr(),
                ca_pin: self.cas().host.pin().to_string(),
                cas,
                hosts: self.hosts()?,
                members: self.members()?,
            },
        ))
    }

    /// The control+engine hosts from their heartbeats, with a health verdict: a serving host
    /// not heard from for [`MEMBER_STALE_SECS`] is `unreachable`.
    pub(super) fn members(&self) -> Result<Vec<jaunt_config::api::MemberInfo>, Response> {
        let now = unix_now();
        Ok(self
            .store
            .list_members()
            .map_err(internal)?
            .into_iter()
            .map(|m| {
                let stale = now.saturating_sub(m.last_seen) > MEMBER_STALE_SECS;
                let health = match m.state.as_str() {
                    "stopped" => "stopped",
                    _ if stale => "unreachable",
                    "draining" => "draining",
                    _ => "healthy",
                };
                jaunt_config::api::MemberInfo {
                    health: health.to_string(),
                    id: m.id,
                    control_addr: m.control_addr,
                    public_addr: m.public_addr,
                    version: m.version,
                    started: m.started,
                    last_seen: m.last_seen,
                    state: m.state,
                }
            })
            .collect())
    }

    /// Joined hosts, without those that can no longer connect: not connected, and not seen
    /// (joined or renewed) for longer than a host certificate lives, so their certificate has
    /// expired and the agent must join again, as a new host. `jaunt rm node/NAME` removes one
    /// sooner.
    pub(super) fn hosts(&self) -> Result<Vec<HostInfo>, Response> {
        let unconfirmed = self.unconfirmed_agents();
        let now = unix_now();
        Ok(self
            .store
            .list_hosts()
            .map_err(internal)?
            .into_iter()
            .filter(|h| {
                self.is_connected(&h.id)
                    || h.last_seen.saturating_add(self.settings.host_ttl_secs) > now
            })
            .map(|h| HostInfo {
                connected: self.is_connected(&h.id),
                ca_phase_confirmed: self
                    .is_connected(&h.id)
                    .then(|| !unconfirmed.contains(&h.id)),
                id: h.id,
                name: h.name,
                types: h.types,
                joined: h.joined,
                last_seen: h.last_seen,
            })
            .collect())
    }

    /// What the caller may see: every connected resource for now; the authorization issue
    /// filters it by the caller's roles.
    /// `GET /v1/inventory`: every connected resource; with `?reachable=1`, only those the
    /// caller's roles let them reach now (a node with at least one allowed login, a database
    /// with one allowed database user), decided by the engine's authorization function as the
    /// web UI's list is: what `jaunt ssh LOGIN@KEY=VALUE` fans out to.
    pub(super) fn list_inventory(&self, req: &Request, caller: &Identity) -> Reply {
        if caller.kind != IdentityKind::User {
            return Err(Response::error(403, "only users list resources"));
        }
        if req.query_param("reachable").is_some() {
            let visible = crate::web::visible_resources(self, caller, unix_now())?;
            let infos: Vec<_> = visible.into_iter().map(|v| v.info).collect();
            return Ok(Response::json(200, &infos));
        }
        Ok(Response::json(200, &self.inventory()))
    }

    /// `jaunt rm node/NAME` (`DELETE /v1/hosts/NAME_OR_ID`): removes the records of the hosts
    /// of that name (or id) that are not connected. A connected one is refused: removing its
    /// record would not stop it (its certificate stays valid until it expires; `jaunt lock
    /// --node` refuses it at once).
    pub(super) fn delete_host(&self, caller: &Identity, target: &str) -> Reply {
        self.require(caller, "node", "delete")?;
        let removed = self.remove_stale_hosts(Some(&caller.name), target, None)?;
        if removed.is_empty() {
            let connected: Vec<String> = self
                .store
                .list_hosts()
                .map_err(internal)?
                .into_iter()
                .filter(|h| h.id == target || h.name == target)
                .map(|h| h.id)
                .collect();
            if connected.is_empty() {
                return Err(Response::error(
                    404,
                    format!("no such node: {target} (see `jaunt status --data-dir DIR`)"),
                ));
            }
            return Err(Response::error(
                409,
                format!(
                    "node {target} is connected (host {}): stop its agent first; to refuse it \
                     now, `jaunt lock --node {target}`",
                    connected.join(", ")
                ),
            ));
        }
        Ok(Response::json(
            200,
            &serde_json::json!({"deleted": removed}),
        ))
    }

    /// Removes the records of hosts named `target` (or with that id) that are not connected,
    /// except `keep`; each with a `host.remove` event (`by` the admin, or none for a join that
    /// replaced them). Returns the removed ids.
    pub(super) fn remove_stale_hosts(
        &self,
        by: Option<&str>,
        target: &str,
        keep: Option<&str>,
    ) -> Result<Vec<String>, Response> {
        let mut removed = Vec::new();
        for host in self.store.list_hosts().map_err(internal)? {
            if (host.id != target && host.name != target)
                || Some(host.id.as_str()) == keep
                || self.is_connected(&host.id)
            {
                continue;
            }
            if self.store.delete_host(&host.id).map_err(internal)? {
                self.audit.emit(
                    audit::HOST_REMOVED,
                    by,
                    &serde_json::json!({
                        "user": by, "host_id": host.id, "host_name": host.name,
                        "replaced_by": keep,
                    }),
                );
                removed.push(host.id);
            }
        }
        Ok(removed)
    }

    pub(super) fn list_hosts(&self, caller: &Identity) -> Reply {
        self.require(caller, "node", "list")?;
        Ok(Response::json(200, &self.hosts()?))
    }

    /// The public addresses of the engines whose heartbeats say healthy.
    pub(super) fn healthy_engines(&self) -> Result<Vec<String>, Response> {
        Ok(self
            .members()?
            .into_iter()
            .filter(|m| m.health == "healthy")
            .map(|m| m.public_addr)
            .collect())
    }
}

/// Applies one inventory event to the connected agents; returns the host whose tunnel came up.
fn apply_inventory_event(
    inv: &mut BTreeMap<String, AgentInventory>,
    event: InventoryEvent,
    now: u64,
) -> Option<String> {
    match event {
        InventoryEvent::TunnelUp {
            shard,
            host_id,
            name,
            labels,
            resources,
        } => {
            let entry = inv
                .entry(host_id.clone())
                .or_insert_with(|| AgentInventory {
                    host_id: host_id.clone(),
                    name: name.clone(),
                    labels: labels.clone(),
                    resources: resources.clone(),
                    shards: Vec::new(),
                    connected_since: now,
                });
            entry.name = name;
            entry.labels = labels;
            entry.resources = resources;
            if !entry.shards.contains(&shard) {
                entry.shards.push(shard);
                entry.shards.sort_unstable();
            }
            Some(host_id)
        }
        InventoryEvent::TunnelDown { shard, host_id } => {
            if let Some(entry) = inv.get_mut(&host_id) {
                entry.shards.retain(|s| *s != shard);
                if entry.shards.is_empty() {
                    inv.remove(&host_id);
                }
            }
            None
        }
    }
}
