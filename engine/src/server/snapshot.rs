//! The read-mostly state a shard consults per connection: [`Snapshot`].
//!
//! Control builds a whole, immutable `Snapshot` (CA roots, roles, locks, and the dial targets it
//! registers itself) and sends it as an `Arc<Snapshot>` on the crossbeam channel given to
//! [`crate::server::Engine::start`]. A feeder thread hands the same `Arc` to every shard's mailbox;
//! each shard keeps it behind an `Rc` (see `shard.rs`), so a connection clones a non-atomic `Rc`,
//! never the shared `Arc`. Boot and live updates take the same path: there is no "initial
//! snapshot" argument.
//!
//! What lives here: the types, and the lookup of a dial target. What does not: the decision
//! whether an identity may reach a target (`authorize.rs`), routing by what connected agents
//! announce (`table.rs`, `shard.rs`: consulted before `targets`), and how control fills the
//! fields (control's snapshot builder). The role and lock types are deliberately thin for now; the
//! authorization issue replaces them with compiled forms without changing the apply path.

use std::collections::{BTreeMap, HashMap};

use rustls_pki_types::CertificateDer;

use jaunt_config::wire::dial::DialKind;

/// One immutable, versioned view of the cluster's authorization state.
///
/// Shards apply snapshots with increasing `version` only: an older one arriving late is ignored,
/// so a shard never goes back in time.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Monotonic version assigned by control; `jaunt_snapshot_version{shard}` reports it.
    pub version: u64,
    /// The cluster name (for logs and the web ping).
    pub cluster: String,
    /// User CA certificates (DER). The TLS configurations hold the roots actually used in the
    /// handshake; this copy is for checks that happen after it (e.g. CA rotation windows).
    pub user_ca_roots: Vec<CertificateDer<'static>>,
    /// Host CA certificates (DER), as above for agents.
    pub host_ca_roots: Vec<CertificateDer<'static>>,
    /// Roles by name, as control stores them. Opaque until the authorization issue compiles
    /// them into a matcher.
    pub roles: BTreeMap<String, serde_json::Value>,
    /// Active locks in the engine's older shape (user/role/target fields); kept for callers
    /// that read it. Enforcement uses [`Snapshot::active_locks`].
    pub locks: Vec<Lock>,
    /// The roles compiled once by control (regexes and all); `authorize` evaluates against it.
    /// An empty policy allows nothing: a snapshot must carry the roles to allow any dial.
    pub policy: jaunt_config::rbac::Policy,
    /// Locks in force, enforced by `authorize` (user, role, node and login locks).
    pub active_locks: Vec<jaunt_config::rbac::ActiveLock>,
    /// Dial targets control registers, with the agent that serves each. Routing consults them
    /// after the resources announced by the agents connected to the dialing shard: they are the
    /// fallback for targets no connected agent announces (and make an unannounced target of a
    /// disconnected agent read "offline" rather than "no such").
    pub targets: Targets,
    /// The cluster's app-access JWT verification keys, a JWK Set (RFC 7517 §5) as JSON, served
    /// at `https://<public host>/.well-known/jwks.json`. Empty until control sets it.
    pub jwks: std::sync::Arc<str>,
    /// The agents' copy of the policy (roles, locks, user CA), as control serialized it (the
    /// JSON of `jaunt_config::api::AgentPolicyResponse`). Each shard pushes it to every agent
    /// tunnel it holds when a newer snapshot arrives (stream `jaunt-policy/1`, see
    /// `tunnel::policy_push`); empty = nothing to push. Opaque here: the engine only forwards it.
    pub agent_policy: std::sync::Arc<[u8]>,
}

/// A lock: refuse new sessions (and end live ones) that match every given field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lock {
    /// Lock name, for logs.
    pub name: String,
    /// Matches the identity's user name.
    pub user: Option<String>,
    /// Matches any of the identity's roles.
    pub role: Option<String>,
    /// Matches the dial target's name.
    pub target: Option<String>,
    /// Shown to the refused user.
    pub message: String,
    /// Unix seconds; `None` = until removed.
    pub expires: Option<u64>,
}

/// The dial targets the cluster knows, by kind and name, with the agent that serves each.
#[derive(Clone, Debug, Default)]
pub struct Targets {
    /// SSH nodes by name.
    pub nodes: HashMap<String, Target>,
    /// Databases by name.
    pub databases: HashMap<String, Target>,
    /// TCP apps by name.
    pub tcp_apps: HashMap<String, Target>,
    /// Web (HTTP) apps by name.
    pub web_apps: HashMap<String, Target>,
}

impl Targets {
    /// The target of `kind` named `name`, if registered.
    pub fn get(&self, kind: DialKind, name: &str) -> Option<&Target> {
        let map = match kind {
            DialKind::Ssh => &self.nodes,
            DialKind::Db => &self.databases,
            DialKind::Tcp => &self.tcp_apps,
            DialKind::App => &self.web_apps,
        };
        map.get(name)
    }

    /// Registers (or replaces) a target; returns `self` for building snapshots in tests and in
    /// control.
    pub fn with(mut self, kind: DialKind, name: &str, target: Target) -> Targets {
        let map = match kind {
            DialKind::Ssh => &mut self.nodes,
            DialKind::Db => &mut self.databases,
            DialKind::Tcp => &mut self.tcp_apps,
            DialKind::App => &mut self.web_apps,
        };
        map.insert(name.to_owned(), target);
        self
    }
}

/// Where one dial target lives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    /// Host id of the agent that serves it (the CN of the agent's host certificate, the key of
    /// the shard's tunnel table).
    pub host_id: String,
    /// Labels, for role matching.
    pub labels: BTreeMap<String, String>,
}

impl Target {
    /// A target served by agent `host_id`, without labels.
    pub fn on_host(host_id: &str) -> Target {
        Target {
            host_id: host_id.to_owned(),
            labels: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_looked_up_by_kind() {
        let targets = Targets::default()
            .with(DialKind::Ssh, "web1", Target::on_host("host-a"))
            .with(DialKind::Db, "pg", Target::on_host("host-b"));
        assert_eq!(
            targets
                .get(DialKind::Ssh, "web1")
                .map(|t| t.host_id.as_str()),
            Some("host-a")
        );
        assert!(targets.get(DialKind::Tcp, "web1").is_none());
        assert!(targets.get(DialKind::Db, "web1").is_none());
        assert_eq!(
            targets.get(DialKind::Db, "pg").map(|t| t.host_id.as_str()),
            Some("host-b")
        );
    }
}
