//! The control API: one [`Control`] value holds the store, the CAs and the login limiter, and
//! [`Control::handle`] maps a request to a response. This file keeps the state, its
//! construction, the snapshot for the engine (and the agents' policy built with it), the router
//! and the checks every handler shares (`caller`, `require`); the handlers live in one file per
//! API area: `login.rs` (open endpoints, renewal), `hosts.rs`, `users.rs`, `tokens.rs`,
//! `resources.rs` (roles, locks, `jaunt create -f`), `certs.rs` (CA endpoints), `agent.rs`
//! (what agents ask for), `sessions.rs`, `audit_log.rs`; recordings' endpoints are
//! `recordings/api.rs`'s.
//!
//! Not here: transport (TLS, HTTP parsing, the thread pool) is `http.rs`'s; storage is
//! `store.rs`'s; signing is `ca.rs`'s.
//!
//! Authentication: `GET /v1/ping`, `POST /v1/login` and `POST /v1/join` are open; every other path
//! needs a client certificate from the cluster's user or host CA (the TLS layer verified the
//! chain; here the identity is decoded and checked against the role rules).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use jaunt_engine::server::Snapshot;

use jaunt_config::api::*;
use jaunt_config::identity::{unix_now, Identity, IdentityKind};
use jaunt_config::resource::{Lock, LockTarget, Role, User};
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;

use crate::audit::Audit;
use crate::auth::RateLimiter;
use crate::ca::{Authorities, CaKind, CertAuthority};
use crate::http::{Request, Response};
use crate::rbac;
use crate::store::{Store, StoredUser};

mod agent;
mod audit_log;
mod certs;
mod hosts;
mod login;
mod resources;
mod sessions;
mod tokens;
mod users;

/// Default lifetime of a user's certificates.
pub const DEFAULT_USER_TTL_SECS: u64 = 12 * 3600;
/// Default lifetime of a host's certificates: long, and renewed by the host well before expiry.
pub const DEFAULT_HOST_TTL_SECS: u64 = 30 * 24 * 3600;
/// Default lifetime of a join token.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 30 * 60;
/// Longest join token lifetime accepted.
pub const MAX_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;
/// Name of the local administrator identity written to the data directory.
pub const LOCAL_ADMIN: &str = "admin";
/// The host role of agents that serve apps (joined with an `app` token): the API's.
pub use jaunt_config::api::APP_HOST_ROLE;
/// A host whose heartbeat is older than this is listed as unreachable (heartbeats come every
/// `daemon::HEARTBEAT_PERIOD`).
pub const MEMBER_STALE_SECS: u64 = 6;

/// Store name of the app-access JWT signing key.
pub const JWT_KEY_NAME: &str = "jwt";
/// Longest a change waits for room in the engine's snapshot feed (the engine's feeder thread
/// drains it at once; only a stuck engine fills it).
pub const SNAPSHOT_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Token types a join token may carry.
pub const TOKEN_TYPES: &[&str] = &["node", "app", "db", "engine"];

/// Settings the control service runs with.
#[derive(Clone, Debug)]
pub struct Settings {
    pub cluster: String,
    pub public_addr: String,
    pub second_factor: bool,
    pub user_ttl_secs: u64,
    pub host_ttl_secs: u64,
}

/// The control plane's state and request handlers.
pub struct Control {
    pub settings: Settings,
    pub store: Arc<Store>,
    /// The CAs and the app-JWT key as they are now ([`Control::cas`]); a CA rotation phase
    /// change swaps the whole value (`rotation.rs`).
    cas: RwLock<Arc<Authorities>>,
    /// Called with the new authorities after each swap (the daemon rebuilds TLS configs).
    ca_hooks: Mutex<Vec<CaHook>>,
    /// Per agent host id: the CA generation it last confirmed and when it polled.
    confirmations: Mutex<std::collections::HashMap<String, (String, u64)>>,
    pub audit: Audit,
    limiter: RateLimiter,
    /// The advertised public address (known for sure once the engine has bound its port).
    public_addr: RwLock<String>,
    /// Where snapshots for the engine go, once it runs.
    snapshots: Mutex<Option<crossbeam_channel::Sender<Arc<Snapshot>>>>,
    /// The last snapshot's version. It starts at control's boot time (unix seconds) shifted
    /// left by 20 bits, so versions keep growing across restarts (unless a boot follows the
    /// previous one within a second per 2^20 changes): agents compare the policies they are
    /// pushed and poll by it.
    snapshot_version: AtomicU64,
    /// The agents' copy of the policy, built with the last snapshot: what the engines push to
    /// agents over their tunnels and what `GET /v1/agent/policy` answers.
    agent_policy: RwLock<Option<Arc<AgentPolicyResponse>>>,
    /// Agents connected to the engine, by host id (fed by the engine's inventory events).
    inventory: RwLock<BTreeMap<String, jaunt_engine::server::AgentInventory>>,
    /// The engine's live sessions (`jaunt sessions ls|kill`), once the engine runs.
    sessions: RwLock<Option<jaunt_engine::server::EngineSessions>>,
    /// Recordings storage (`recordings/`), once the daemon has opened it.
    recordings: std::sync::OnceLock<Arc<crate::recordings::Recordings>>,
}

/// What [`Control::add_ca_hook`] registers.
pub type CaHook = Box<dyn Fn(&Arc<Authorities>) + Send + Sync>;

/// One password login attempt ([`Control::password_login`]).
#[derive(Clone, Copy, Debug)]
pub struct PasswordLogin<'a> {
    pub user: &'a str,
    pub password: &'a str,
    pub otp: Option<&'a str>,
    /// Requested certificate lifetime (capped by the cluster and the roles).
    pub ttl_secs: Option<u64>,
    /// The client's address (the limiter's second key).
    pub addr: &'a str,
    pub via: LoginVia,
}

/// Where a login came from: the wording of some refusals and a field of its audit events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginVia {
    /// `jaunt login` (`POST /v1/login`).
    Cli,
    /// The web UI's `/web/login`.
    Web,
}

/// A handler outcome: a response to send, built from `?`-propagated errors.
type Reply = Result<Response, Response>;

impl Control {
    /// Loads or creates the CAs and the built-in roles, and returns a ready service.
    pub fn bootstrap(store: Arc<Store>, settings: Settings) -> anyhow::Result<Control> {
        let now = unix_now();
        let load = |kind: CaKind| -> anyhow::Result<Arc<CertAuthority>> {
            let stored = match store.get_ca(kind.name())? {
                Some(s) => s,
                None => {
                    let fresh = CertAuthority::generate(kind, &settings.cluster, now)?;
                    store.insert_ca_if_absent(&fresh.to_stored()?, now)?
                }
            };
            Ok(Arc::new(CertAuthority::from_stored(kind, &stored)?))
        };
        for kind in CaKind::ALL {
            load(kind)?;
        }
        // The JWT signing key for app access (ES256), created with the CAs and kept with them;
        // which key of a rotation signs is `rotation::load`'s business.
        let cas = crate::rotation::load(&store, &rcgen::KeyPair::generate()?.serialize_pem())?;
        for role in [Role::builtin_access(), Role::builtin_editor()] {
            store.insert_role_if_absent(
                &role.metadata.name,
                &serde_json::to_string(&role)?,
                now,
            )?;
        }
        let audit = Audit::new(store.clone());
        Ok(Control {
            public_addr: RwLock::new(settings.public_addr.clone()),
            settings,
            store,
            cas: RwLock::new(Arc::new(cas)),
            ca_hooks: Mutex::new(Vec::new()),
            confirmations: Mutex::new(std::collections::HashMap::new()),
            audit,
            snapshots: Mutex::new(None),
            snapshot_version: AtomicU64::new(unix_now() << 20),
            agent_policy: RwLock::new(None),
            inventory: RwLock::new(BTreeMap::new()),
            sessions: RwLock::new(None),
            recordings: std::sync::OnceLock::new(),
            limiter: RateLimiter::new(
                RateLimiter::DEFAULT_MAX_FAILURES,
                RateLimiter::DEFAULT_WINDOW_SECS,
            ),
        })
    }

    /// The advertised public address (HOST:PORT).
    pub fn public_addr(&self) -> String {
        self.public_addr
            .read()
            .map(|a| a.clone())
            .unwrap_or_default()
    }

    /// The CAs and the JWT key as they are now.
    pub fn cas(&self) -> Arc<Authorities> {
        self.cas.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set_cas(&self, cas: Arc<Authorities>) {
        *self.cas.write().unwrap_or_else(|p| p.into_inner()) = cas;
    }

    /// Registers `hook`, called with the new authorities after every rotation phase change.
    pub fn add_ca_hook(&self, hook: CaHook) {
        self.ca_hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(hook);
    }

    pub(crate) fn run_ca_hooks(&self, cas: &Arc<Authorities>) {
        for hook in self
            .ca_hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            hook(cas);
        }
    }

    /// Records the public address once the engine has bound its port.
    pub fn set_public_addr(&self, addr: &str) {
        if let Ok(mut a) = self.public_addr.write() {
            *a = addr.to_string();
        }
    }

    /// Connects the engine's snapshot feed.
    pub fn set_snapshot_sender(&self, tx: crossbeam_channel::Sender<Arc<Snapshot>>) {
        if let Ok(mut s) = self.snapshots.lock() {
            *s = Some(tx);
        }
    }

    /// Builds a whole snapshot (CA roots, roles, locks) from the store and hands it to the
    /// engine. Snapshots are complete values, so a dropped one is repaired by the next.
    ///
    /// Builds are serialized (under the feed's mutex) so versions follow the order in which
    /// the store was read: a snapshot never carries an older state under a newer version. The
    /// send waits (at most [`SNAPSHOT_SEND_TIMEOUT`]) rather than dropping, since the dropped
    /// snapshot could be the last change for a long time (an unlock that never arrives).
    pub fn publish_snapshot(&self) {
        let Ok(guard) = self.snapshots.lock() else {
            return;
        };
        let snapshot = match self.build_snapshot() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "snapshot: cannot build from the store");
                return;
            }
        };
        if let Some(tx) = guard.as_ref() {
            if let Err(e) = tx.send_timeout(Arc::new(snapshot), SNAPSHOT_SEND_TIMEOUT) {
                tracing::error!(error = %e, "snapshot: the engine's feed is stuck or gone; the engine keeps its previous snapshot until the next change");
            }
        }
    }

    fn build_snapshot(&self) -> anyhow::Result<Snapshot> {
        let now = unix_now();
        // Every stored role must parse and compile: dropping a bad one would drop its deny
        // rules and widen access, so a bad role keeps the previous snapshot in force.
        let mut role_docs = BTreeMap::new();
        let mut role_values = Vec::new();
        for (name, spec) in self.store.list_roles()? {
            let role: Role = serde_json::from_str(&spec)
                .map_err(|e| anyhow::anyhow!("stored role {name} does not parse: {e}"))?;
            role_docs.insert(name, serde_json::from_str::<serde_json::Value>(&spec)?);
            role_values.push(role);
        }
        let policy = jaunt_config::rbac::Policy::compile(&role_values)?;
        let stored_locks = self.store.list_locks(now)?;
        let active_locks = stored_locks
            .iter()
            .filter_map(|l| {
                let lock: Lock = serde_json::from_str(&l.spec).ok()?;
                Some(jaunt_config::rbac::ActiveLock::from_lock(&lock, l.expires))
            })
            .collect();
        let version = self.snapshot_version.fetch_add(1, Ordering::Relaxed) + 1;
        let agent_locks = stored_locks
            .iter()
            .filter_map(|l| {
                Some(AgentPolicyLock {
                    lock: serde_json::from_str(&l.spec).ok()?,
                    expires: l.expires,
                })
            })
            .collect();
        let cas = self.cas();
        let mut agent_policy = AgentPolicyResponse {
            version: String::new(),
            seq: version,
            cluster: self.settings.cluster.clone(),
            roles: role_docs.clone(),
            locks: agent_locks,
            user_ca: cas
                .trusted(CaKind::User)
                .iter()
                .map(|c| c.cert_pem().to_string())
                .collect(),
            host_ca: cas
                .trusted(CaKind::Host)
                .iter()
                .map(|c| c.cert_pem().to_string())
                .collect(),
            user_ca_ssh: cas.ssh_lines(CaKind::User),
            host_ca_ssh: cas.ssh_lines(CaKind::Host),
            ca_generation: cas.generation(),
            // Per caller (the poll sets it); a pushed policy never asks for a renewal.
            renew_host_cert: false,
            // The engines as of this snapshot; the poll answers with the current heartbeats.
            engines: self.healthy_engines().unwrap_or_default(),
        };
        seal_agent_policy(&mut agent_policy);
        let agent_policy = Arc::new(agent_policy);
        if let Ok(mut cached) = self.agent_policy.write() {
            *cached = Some(Arc::clone(&agent_policy));
        }
        let roles = role_docs;
        let locks = stored_locks
            .into_iter()
            .filter_map(|l| {
                let lock: Lock = serde_json::from_str(&l.spec).ok()?;
                let mut out = jaunt_engine::server::Lock {
                    name: l.id.clone(),
                    message: lock
                        .spec
                        .message
                        .clone()
                        .unwrap_or_else(|| "locked by an administrator".into()),
                    expires: l.expires,
                    ..Default::default()
                };
                match &lock.spec.target {
                    LockTarget::User(u) => out.user = Some(u.clone()),
                    LockTarget::Role(r) => out.role = Some(r.clone()),
                    LockTarget::Node(n) => out.target = Some(n.clone()),
                    // Login locks are enforced by the authorization issue's matcher.
                    LockTarget::Login(_) => return None,
                }
                Some(out)
            })
            .collect();
        Ok(Snapshot {
            version,
            agent_policy: to_json(&*agent_policy).into(),
            cluster: self.settings.cluster.clone(),
            user_ca_roots: cas.trusted_der(CaKind::User),
            host_ca_roots: cas.trusted_der(CaKind::Host),
            roles,
            locks,
            policy,
            active_locks,
            targets: Default::default(),
            jwks: cas.jwks().into(),
        })
    }

    /// Routes one request.
    ///
    /// A request that changed users, roles, tokens or locks (the store's change count moved)
    /// publishes a snapshot before it is answered, whatever its path: every change, deletes
    /// included, reaches the engine (and through it the agents) without each handler having to
    /// remember.
    pub fn handle(&self, req: &Request) -> Response {
        let changes = self.store.changes();
        let response = self.route(req);
        if self.store.changes() != changes {
            self.publish_snapshot();
        }
        response
    }

    fn route(&self, req: &Request) -> Response {
        let segments: Vec<&str> = req.path.trim_matches('/').split('/').collect();
        let result = match (req.method.as_str(), segments.as_slice()) {
            ("GET", ["v1", "ping"]) => self.ping(),
            ("POST", ["v1", "login"]) => self.login(req),
            ("POST", ["v1", "join"]) => self.join(req),
            _ => match self.caller(req) {
                Ok(caller) => self.authenticated(req, &caller, &segments),
                Err(r) => Err(r),
            },
        };
        result.unwrap_or_else(|r| r)
    }

    fn authenticated(&self, req: &Request, caller: &Identity, seg: &[&str]) -> Reply {
        match (req.method.as_str(), seg) {
            ("GET", ["v1", "status"]) => self.status(caller),
            ("GET", ["v1", "whoami"]) => Ok(Response::json(200, caller)),
            ("GET", ["v1", "inventory"]) => self.list_inventory(req, caller),
            ("POST", ["v1", "hosts", "renew"]) => self.renew(req, caller),
            ("GET", ["v1", "hosts"]) => self.list_hosts(caller),
            ("DELETE", ["v1", "hosts", name]) => self.delete_host(caller, name),
            ("GET", ["v1", "users"]) => self.list_users(caller),
            ("POST", ["v1", "users"]) => self.add_user(req, caller),
            ("DELETE", ["v1", "users", name]) => self.delete_user(caller, name),
            ("POST", ["v1", "users", name, "reset"]) => self.reset_user(req, caller, name),
            ("GET", ["v1", "tokens"]) => self.list_tokens(caller),
            ("POST", ["v1", "tokens"]) => self.add_token(req, caller),
            ("DELETE", ["v1", "tokens", id]) => self.delete_token(caller, id),
            ("GET", ["v1", "roles"]) => self.list_roles(caller),
            ("DELETE", ["v1", "roles", name]) => self.delete_role(caller, name),
            ("GET", ["v1", "locks"]) => self.list_locks(caller),
            ("DELETE", ["v1", "locks", id]) => self.delete_lock(caller, id),
            ("POST", ["v1", "resources"]) => self.create_resource(req, caller),
            ("GET", ["v1", "ca", ty]) => self.export_ca(caller, ty),
            ("POST", ["v1", "ca", "sign-host"]) => self.sign_host(req, caller),
            ("POST", ["v1", "ca", "sign-db"]) => self.sign_db(req, caller),
            ("POST", ["v1", "db", "cert"]) => self.db_cert(req, caller),
            ("POST", ["v1", "app", "jwt"]) => self.app_jwt(req, caller),
            ("GET", ["v1", "agent", "policy"]) => self.agent_policy(req, caller),
            ("POST", ["v1", "agent", "ssh", "host-cert"]) => self.agent_ssh_host_cert(req, caller),
            ("POST", ["v1", "agent", "ssh", "user-cert"]) => self.agent_ssh_user_cert(req, caller),
            ("POST", ["v1", "ca", "rotate"]) => self.rotate_ca(req, caller),
            ("GET", ["v1", "audit"]) => self.audit_search(req, caller),
            ("GET", ["v1", "sessions"]) => self.list_sessions(caller),
            ("GET", ["v1", "sessions", id]) => self.join_session_info(caller, id),
            ("DELETE", ["v1", "sessions", id]) => self.kill_session(caller, id),
            ("POST", ["v1", "audit", "events"]) => self.agent_audit_events(req, caller),
            ("POST", ["v1", "recordings", "uploads"]) => {
                crate::recordings::api::begin(self, req, caller)
            }
            ("PUT", ["v1", "recordings", "uploads", id]) => {
                crate::recordings::api::append(self, req, caller, id)
            }
            ("POST", ["v1", "recordings", "uploads", id, "complete"]) => {
                crate::recordings::api::complete(self, req, caller, id)
            }
            ("GET", ["v1", "recordings"]) => crate::recordings::api::list(self, req, caller),
            ("GET", ["v1", "recordings", id]) => crate::recordings::api::info(self, caller, id),
            ("GET", ["v1", "recordings", id, "cast"]) => {
                crate::recordings::api::read(self, req, caller, id)
            }
            _ => Err(Response::error(
                404,
                format!("no such endpoint: {} {}", req.method, req.path),
            )),
        }
    }

    /// Hands control its recordings storage (the daemon opens it).
    pub fn set_recordings(&self, recordings: Arc<crate::recordings::Recordings>) {
        let _ = self.recordings.set(recordings);
    }

    /// The recordings storage, once set.
    pub fn recordings(&self) -> Option<&crate::recordings::Recordings> {
        self.recordings.get().map(|r| r.as_ref())
    }

    /// The caller's identity from its client certificate.
    fn caller(&self, req: &Request) -> Result<Identity, Response> {
        let Some(leaf) = req.peer_certs.first() else {
            return Err(Response::error(401, "this endpoint needs a client certificate: run `jaunt login`, or pass --data-dir on the control host"));
        };
        let id = Identity::from_x509_der(leaf).map_err(|e| Response::error(401, e.to_string()))?;
        if id.cluster != self.settings.cluster {
            return Err(Response::error(
                401,
                format!(
                    "certificate is for cluster {}, not {}",
                    id.cluster, self.settings.cluster
                ),
            ));
        }
        id.check_valid_at(unix_now())
            .map_err(|e| Response::error(401, e.to_string()))?;
        Ok(id)
    }

    /// Refuses unless one of the caller's roles allows `verb` on `resource` (and none denies it).
    pub(crate) fn require(
        &self,
        caller: &Identity,
        resource: &str,
        verb: &str,
    ) -> Result<(), Response> {
        if caller.kind == IdentityKind::Host {
            return Err(Response::error(403, "hosts may not use admin endpoints"));
        }
        let roles = self.roles_of(&caller.roles)?;
        if rbac::allows_rule(&roles, resource, verb) {
            Ok(())
        } else {
            Err(Response::error(
                403,
                format!(
                    "access denied: none of your roles ({}) allows {verb} on {resource}",
                    caller.roles.join(", ")
                ),
            ))
        }
    }

    fn roles_of(&self, names: &[String]) -> Result<Vec<Role>, Response> {
        names
            .iter()
            .map(|n| {
                let spec = self
                    .store
                    .get_role(n)
                    .map_err(internal)?
                    .ok_or_else(|| Response::error(400, format!("no such role: {n}")))?;
                serde_json::from_str(&spec).map_err(internal)
            })
            .collect()
    }
}

fn user_from_stored(s: &StoredUser) -> Result<User, serde_json::Error> {
    serde_json::from_str(&s.spec)
}

/// Hex SHA-256 of a join token: what the store keeps.
pub fn token_hash(token: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

fn random_hex(bytes: usize) -> Result<String, ring::error::Unspecified> {
    let mut buf = vec![0u8; bytes];
    SystemRandom::new().fill(&mut buf)?;
    Ok(hex::encode(buf))
}

fn valid_name(what: &str, name: &str) -> Result<(), Response> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(())
    } else {
        Err(Response::error(
            400,
            format!(
                "invalid {what} {name:?}: use letters, digits, '.', '_', '-' or '@' (at most 253)"
            ),
        ))
    }
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "control: internal error");
    Response::error(500, format!("internal error: {e}"))
}

/// Serializes `value` for a JSON response body.
pub fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// Sets `policy.version` to the digest of its content without the sequence number: equal
/// digests, equal policies, whichever snapshot (or control) built them.
fn seal_agent_policy(policy: &mut AgentPolicyResponse) {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        &to_json(&AgentPolicyResponse {
            version: String::new(),
            seq: 0,
            ..policy.clone()
        }),
    );
    policy.version = format!("sha256:{}", hex::encode(digest.as_ref()));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::ca;
    use crate::store::StoredHost;

    /// A control on an in-memory store with its snapshot feed, and a request builder that
    /// calls as the local admin (role `editor`).
    struct Harness {
        control: Control,
        feed: crossbeam_channel::Receiver<Arc<Snapshot>>,
        admin_cert: rustls_pki_types::CertificateDer<'static>,
    }

    impl Harness {
        fn new() -> Harness {
            let store = Arc::new(Store::memory().unwrap());
            let control = Control::bootstrap(
                store,
                Settings {
                    cluster: "test".into(),
                    public_addr: "127.0.0.1:1".into(),
                    second_factor: false,
                    user_ttl_secs: 3600,
                    host_ttl_secs: 3600,
                },
            )
            .unwrap();
            let (tx, feed) = crossbeam_channel::bounded(1024);
            control.set_snapshot_sender(tx);
            let keys = ca::LocalKeys::generate().unwrap();
            let now = unix_now();
            let admin = Identity {
                kind: IdentityKind::User,
                name: LOCAL_ADMIN.into(),
                roles: vec!["editor".into()],
                logins: vec![],
                db_users: vec![],
                db_names: vec![],
                traits: BTreeMap::new(),
                cluster: "test".into(),
                not_before: now - 60,
                expires: now + 3600,
                permit_pty: false,
                permit_port_forwarding: false,
                permit_agent_forwarding: false,
            };
            let admin_cert = control
                .cas()
                .user
                .sign_x509(
                    &admin,
                    &ca::spki_pem_to_der(&keys.tls_public_pem).unwrap(),
                    &[],
                )
                .unwrap();
            Harness {
                control,
                feed,
                admin_cert,
            }
        }

        fn call(&self, method: &str, path: &str, body: serde_json::Value) -> Response {
            let req = Request {
                method: method.into(),
                path: path.into(),
                query: vec![],
                headers: vec![],
                body: if body.is_null() {
                    Vec::new()
                } else {
                    serde_json::to_vec(&body).unwrap()
                },
                peer: "127.0.0.1:9".parse().unwrap(),
                peer_certs: vec![self.admin_cert.clone()],
            };
            self.control.handle(&req)
        }

        /// The snapshot the last call published (none queued before it: `drain` first).
        fn published(&self) -> Option<Arc<Snapshot>> {
            self.feed.try_iter().last()
        }

        fn drain(&self) {
            while self.feed.try_recv().is_ok() {}
        }
    }

    fn lock_doc(name: &str) -> serde_json::Value {
        serde_json::json!({"kind": "lock", "version": "v1", "metadata": {"name": name},
            "spec": {"target": {"user": "alice"}, "message": "incident"}})
    }

    fn role_doc(name: &str) -> serde_json::Value {
        serde_json::json!({"kind": "role", "version": "v1", "metadata": {"name": name},
            "spec": {"allow": {"logins": ["root"], "node_labels": {"*": "*"}}}})
    }

    /// The engine's tunnel-up and -down events, applied as one batch: the inventory follows
    /// them in order, `last_seen` is written for every host that came up (once, however many of
    /// its tunnels did), and an agent without a host record is listed but not given one.
    #[test]
    fn a_batch_of_tunnel_events_updates_the_inventory_and_last_seen() {
        use jaunt_engine::server::InventoryEvent;
        let h = Harness::new();
        let old = unix_now() - 3000;
        for id in ["h1", "h2", "h3"] {
            h.control
                .store
                .upsert_host(&StoredHost {
                    id: id.into(),
                    name: format!("node-{id}"),
                    types: vec!["node".into()],
                    joined: old,
                    last_seen: old,
                })
                .unwrap();
        }
        let up = |id: &str, shard| InventoryEvent::TunnelUp {
            shard,
            host_id: id.into(),
            name: format!("node-{id}"),
            labels: Default::default(),
            resources: Vec::new(),
        };
        let before = unix_now();
        h.control.apply_inventory_batch(vec![
            up("h1", 0),
            up("h1", 1),
            up("h2", 0),
            up("ghost", 0),
            InventoryEvent::TunnelDown {
                shard: 0,
                host_id: "h2".into(),
            },
        ]);
        assert!(h.control.is_connected("h1"));
        assert!(
            !h.control.is_connected("h2"),
            "its only tunnel went down after it came up"
        );
        assert!(h.control.is_connected("ghost"));
        assert!(!h.control.is_connected("h3"));
        let seen = |id: &str| {
            h.control
                .store
                .get_host(id)
                .unwrap()
                .map(|host| host.last_seen)
        };
        assert!(seen("h1").unwrap() >= before);
        assert!(seen("h2").unwrap() >= before, "it came up in this batch");
        assert_eq!(seen("h3"), Some(old), "no event, no write");
        assert_eq!(seen("ghost"), None, "no host record is created");
        let inventory = h.control.inventory.read().unwrap();
        assert_eq!(inventory["h1"].shards, vec![0, 1]);
    }

    /// Issue 15: a stale agent stayed listed as "not connected" forever and `jaunt rm node/NAME`
    /// was refused. A host whose certificate must have expired (not seen for a host TTL) is no
    /// longer listed; `DELETE /v1/hosts/NAME` removes a disconnected one at once.
    #[test]
    fn stale_hosts_leave_the_listing_and_can_be_removed() {
        let h = Harness::new();
        let now = unix_now();
        for (id, name, last_seen) in [
            ("a1", "old", now - 3601),
            ("b1", "idle", now - 60),
            ("b2", "idle", now - 30),
        ] {
            h.control
                .store
                .upsert_host(&StoredHost {
                    id: id.into(),
                    name: name.into(),
                    types: vec!["node".into()],
                    joined: last_seen,
                    last_seen,
                })
                .unwrap();
        }
        let names = |h: &Harness| {
            let r = h.call("GET", "/v1/hosts", serde_json::Value::Null);
            let hosts: Vec<HostInfo> = serde_json::from_slice(&r.body).unwrap();
            hosts.into_iter().map(|h| h.id).collect::<Vec<_>>()
        };
        assert_eq!(
            names(&h),
            vec!["b1", "b2"],
            "the expired host is not listed"
        );
        let r = h.call("DELETE", "/v1/hosts/idle", serde_json::Value::Null);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert!(names(&h).is_empty());
        let r = h.call("DELETE", "/v1/hosts/idle", serde_json::Value::Null);
        assert_eq!(r.status, 404);
        let r = h.call("DELETE", "/v1/hosts/a1", serde_json::Value::Null);
        assert_eq!(r.status, 200, "by id, listed or not");
        assert!(h.control.store.list_hosts().unwrap().is_empty());
    }

    /// Every change to roles, users, locks and tokens, deletes included, publishes a snapshot
    /// to the engine before the request is answered; reads do not.
    #[test]
    fn every_change_publishes_a_snapshot_and_reads_do_not() {
        let h = Harness::new();
        let ok = |r: Response| assert!(r.status < 300, "{}", String::from_utf8_lossy(&r.body));

        // Locks: create, then delete. The delete is the defect of issue 15: the lock stayed
        // in force on the engine until something else published.
        h.drain();
        ok(h.call("POST", "/v1/resources", lock_doc("l1")));
        let snap = h.published().expect("creating a lock publishes");
        assert!(snap.active_locks.iter().any(|l| l.name == "l1"));
        ok(h.call("DELETE", "/v1/locks/l1", serde_json::Value::Null));
        let snap = h.published().expect("deleting a lock publishes");
        assert!(snap.active_locks.is_empty(), "{:?}", snap.active_locks);

        // Roles: create, then delete.
        ok(h.call("POST", "/v1/resources", role_doc("ops")));
        let snap = h.published().expect("creating a role publishes");
        assert!(snap.roles.contains_key("ops") && snap.policy.contains("ops"));
        ok(h.call("DELETE", "/v1/roles/ops", serde_json::Value::Null));
        let snap = h.published().expect("deleting a role publishes");
        assert!(!snap.roles.contains_key("ops") && !snap.policy.contains("ops"));

        // Users: add, update (create -f of an existing user), reset, delete.
        ok(h.call(
            "POST",
            "/v1/users",
            serde_json::json!({"name": "bob", "roles": ["access"], "password": "a long password 1"}),
        ));
        assert!(h.published().is_some(), "adding a user publishes");
        ok(h.call(
            "POST",
            "/v1/resources",
            serde_json::json!({"kind": "user", "version": "v1", "metadata": {"name": "bob"},
                "spec": {"roles": ["editor"]}}),
        ));
        assert!(h.published().is_some(), "updating a user publishes");
        ok(h.call(
            "POST",
            "/v1/users/bob/reset",
            serde_json::json!({"password": "another long one 2"}),
        ));
        assert!(h.published().is_some(), "resetting a user publishes");
        ok(h.call("DELETE", "/v1/users/bob", serde_json::Value::Null));
        assert!(h.published().is_some(), "deleting a user publishes");

        // Tokens: add, delete.
        let r = h.call(
            "POST",
            "/v1/tokens",
            serde_json::json!({"types": ["node"], "ttl_secs": 60, "single_use": false,
                "token": "0123456789abcdef0123"}),
        );
        ok(r);
        assert!(h.published().is_some(), "adding a token publishes");
        ok(h.call(
            "DELETE",
            "/v1/tokens/0123456789abcdef0123",
            serde_json::Value::Null,
        ));
        assert!(h.published().is_some(), "deleting a token publishes");

        // Reads and refused changes publish nothing.
        for (method, path) in [
            ("GET", "/v1/roles"),
            ("GET", "/v1/locks"),
            ("GET", "/v1/users"),
            ("GET", "/v1/tokens"),
            ("DELETE", "/v1/locks/nosuch"),
            ("DELETE", "/v1/roles/nosuch"),
        ] {
            let _ = h.call(method, path, serde_json::Value::Null);
            assert!(h.published().is_none(), "{method} {path} published");
        }
    }

    /// Versions follow the order the store was read in, even from concurrent requests.
    #[test]
    fn concurrent_changes_publish_increasing_versions_ending_with_the_last_state() {
        let h = Arc::new(Harness::new());
        std::thread::scope(|s| {
            for t in 0..4 {
                let h = Arc::clone(&h);
                s.spawn(move || {
                    for i in 0..5 {
                        let name = format!("l{t}-{i}");
                        let r = h.call("POST", "/v1/resources", lock_doc(&name));
                        assert_eq!(r.status, 200);
                        let r = h.call(
                            "DELETE",
                            &format!("/v1/locks/{name}"),
                            serde_json::Value::Null,
                        );
                        assert_eq!(r.status, 200);
                    }
                });
            }
        });
        let all: Vec<Arc<Snapshot>> = h.feed.try_iter().collect();
        assert!(all.windows(2).all(|w| w[0].version < w[1].version));
        assert!(all.last().unwrap().active_locks.is_empty());
    }
}
