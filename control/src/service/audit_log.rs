//! The audit log's API: `GET /v1/audit` (search) and `POST /v1/audit/events` (an agent's
//! batch of events).
//!
//! Not here: emitting events (`audit.rs`), the batch's rules (`agent_audit.rs`), the store's
//! query (`store.rs`).

use jaunt_config::identity::{unix_now, Identity};

use super::{internal, Control, Reply};
use crate::http::{Request, Response};
use crate::store::AuditQuery;

impl Control {
    /// `POST /v1/audit/events`: an agent's batch of events (database queries, app requests),
    /// answered 200 once committed; the rules are in [`crate::agent_audit::receive`].
    pub(super) fn agent_audit_events(&self, req: &Request, caller: &Identity) -> Reply {
        crate::agent_audit::receive(&self.audit, &self.store, caller, &req.body, unix_now())
    }

    pub(super) fn audit_search(&self, req: &Request, caller: &Identity) -> Reply {
        self.require(caller, "audit", "list")?;
        let q = |k: &str| {
            req.query
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let num = |k: &str| -> Result<Option<u64>, Response> {
            q(k).map(|v| {
                v.parse::<u64>()
                    .map_err(|_| Response::error(400, format!("{k} must be unix seconds")))
            })
            .transpose()
        };
        let query = AuditQuery {
            since: num("since")?,
            until: num("until")?,
            r#type: q("type"),
            user: q("user"),
            limit: num("limit")?.unwrap_or(10_000).min(100_000) as usize,
        };
        let events: Vec<serde_json::Value> = self
            .store
            .audit_search(&query)
            .map_err(internal)?
            .into_iter()
            .filter_map(|e| serde_json::from_str(&e.event).ok())
            .collect();
        Ok(Response::json(200, &events))
    }
}
