//! The control API's handlers: one [`Control`] value holds the store, the CAs and the login
//! limiter, and [`Control::handle`] maps a request to a response. Transport (TLS, HTTP parsing,
//! the thread pool) is `http.rs`'s; storage is `store.rs`'s; signing is `ca.rs`'s.
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
use jaunt_config::resource::{Lock, LockTarget, Resource, Role, User};
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;

use crate::audit::{self, Audit};
use crate::auth::{self, RateLimiter};
use crate::ca::{self, Authorities, CaKind, CertAuthority};
use crate::http::{Request, Response};
use crate::rbac;
use crate::store::{
    AuditQuery, Store, StoredHost, StoredLock, StoredToken, StoredUser, TokenCheck,
};

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
/// The host role of agents that serve apps (joined with an `app` token).
pub const APP_HOST_ROLE: &str = "app";
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

    /// Records the public address once the engine has bound its port.
    pub fn set_public_addr(&self, addr: &str) {
        if let Ok(mut a) = self.public_addr.write() {
            *a = addr.to_string();
        }
    }

    /// Applies one inventory event from the engine.
    pub fn apply_inventory(&self, event: jaunt_engine::server::InventoryEvent) {
        use jaunt_engine::server::InventoryEvent;
        let Ok(mut inv) = self.inventory.write() else {
            return;
        };
        match event {
            InventoryEvent::TunnelUp {
                shard,
                host_id,
                name,
                labels,
                resources,
            } => {
                let now = unix_now();
                let entry = inv.entry(host_id.clone()).or_insert_with(|| {
                    jaunt_engine::server::AgentInventory {
                        host_id: host_id.clone(),
                        name: name.clone(),
                        labels: labels.clone(),
                        resources: resources.clone(),
                        shards: Vec::new(),
                        connected_since: now,
                    }
                });
                entry.name = name;
                entry.labels = labels;
                entry.resources = resources;
                if !entry.shards.contains(&shard) {
                    entry.shards.push(shard);
                    entry.shards.sort_unstable();
                }
                if let Ok(Some(mut host)) = self.store.get_host(&host_id) {
                    host.last_seen = now;
                    let _ = self.store.upsert_host(&host);
                }
            }
            InventoryEvent::TunnelDown { shard, host_id } => {
                if let Some(entry) = inv.get_mut(&host_id) {
                    entry.shards.retain(|s| *s != shard);
                    if entry.shards.is_empty() {
                        inv.remove(&host_id);
                    }
                }
            }
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

    fn is_connected(&self, host_id: &str) -> bool {
        self.inventory
            .read()
            .map(|i| i.contains_key(host_id))
            .unwrap_or(false)
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
            ("GET", ["v1", "inventory"]) => self.list_inventory(caller),
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
                &format!("no such endpoint: {} {}", req.method, req.path),
            )),
        }
    }

    // ---- open endpoints ----

    fn ping(&self) -> Reply {
        Ok(Response::json(
            200,
            &PingResponse {
                cluster_name: self.settings.cluster.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                public_addr: self.public_addr(),
                host_ca_pin: self.cas().host.pin().to_string(),
                second_factor: if self.settings.second_factor {
                    "otp"
                } else {
                    "off"
                }
                .to_string(),
            },
        ))
    }

    fn login(&self, req: &Request) -> Reply {
        let body: LoginRequest = req.json()?;
        let addr = req.peer.ip().to_string();
        let identity = self.password_login(
            &PasswordLogin {
                user: &body.user,
                password: &body.password,
                otp: body.otp.as_deref(),
                ttl_secs: body.ttl_secs,
                addr: &addr,
                via: LoginVia::Cli,
            },
            unix_now(),
        )?;
        let certs = self.issue(&identity, &body.tls_public_key, &body.ssh_public_key, &[])?;
        Ok(Response::json(200, &certs))
    }

    /// Checks a user's password (and one-time code when the cluster requires one) under the
    /// failed-login limits, refuses locked users, and returns the identity a login grants. Both
    /// `POST /v1/login` and the web UI's login call it, so they share limits and audit events
    /// (`user.login` / `user.login.failed`; the web's carry `"via": "web"`).
    pub fn password_login(
        &self,
        login: &PasswordLogin<'_>,
        now: u64,
    ) -> Result<Identity, Response> {
        let name = login.user;
        let addr = login.addr;
        let via = |mut fields: serde_json::Value| {
            if login.via == LoginVia::Web {
                fields["via"] = "web".into();
            }
            fields
        };
        let user_key = format!("user:{name}");
        let addr_key = format!("addr:{addr}");
        for key in [&user_key, &addr_key] {
            if let Some(wait) = self.limiter.blocked(key, now) {
                self.audit.emit(
                    audit::LOGIN_FAILED,
                    Some(name),
                    &via(serde_json::json!({
                        "user": name, "addr": addr, "reason": "rate limited",
                    })),
                );
                return Err(Response::error(
                    429,
                    &format!("too many failed logins; try again in {wait} s"),
                ));
            }
        }
        let stored = self.store.get_user(name).map_err(internal)?;
        let hash = stored
            .as_ref()
            .map_or(auth::dummy_hash(), |u| u.password_hash.as_str());
        let password_ok = auth::verify_password(login.password, hash) && stored.is_some();
        let fail = |reason: &str, message: &str| {
            self.limiter.fail(&user_key, now);
            self.limiter.fail(&addr_key, now);
            self.audit.emit(
                audit::LOGIN_FAILED,
                Some(name),
                &via(serde_json::json!({
                    "user": name, "addr": addr, "reason": reason,
                })),
            );
            Response::error(401, message)
        };
        let Some(stored) = stored.filter(|_| password_ok) else {
            return Err(fail("bad password", "invalid user name or password"));
        };
        if self.settings.second_factor {
            let Some(secret) = stored.otp_secret.as_deref() else {
                return Err(fail("no second factor enrolled", "this user has no second factor enrolled; ask an admin to run `jaunt users reset`"));
            };
            match login.otp {
                None | Some("") => {
                    return Err(Response::error(
                        401,
                        match login.via {
                            LoginVia::Cli => {
                                "this cluster requires a one-time code: pass --otp CODE"
                            }
                            LoginVia::Web => "this cluster requires a one-time code",
                        },
                    ));
                }
                Some(code) if !auth::verify_otp(secret, code, now) => {
                    return Err(fail("bad one-time code", "invalid one-time code"));
                }
                Some(_) => {}
            }
        }
        let user = user_from_stored(&stored).map_err(internal)?;
        let roles = self.roles_of(&user.spec.roles)?;
        if let Some(lock) = self.matching_lock(&user.metadata.name, &user.spec.roles, now)? {
            self.audit.emit(
                audit::LOGIN_FAILED,
                Some(name),
                &via(serde_json::json!({
                    "user": name, "addr": addr, "reason": "locked", "lock": lock.0,
                })),
            );
            return Err(Response::error(
                403,
                &format!("user {name} is locked: {}", lock.1),
            ));
        }
        self.limiter.clear(&user_key);
        self.limiter.clear(&addr_key);
        let ttl = rbac::cap_ttl(
            &roles,
            login
                .ttl_secs
                .unwrap_or(self.settings.user_ttl_secs)
                .min(self.settings.user_ttl_secs),
        );
        let identity = rbac::user_identity(&user, &roles, &self.settings.cluster, now, ttl);
        self.audit.emit(
            audit::LOGIN_OK,
            Some(name),
            &via(serde_json::json!({
                "user": name, "addr": addr, "roles": identity.roles, "expires": identity.expires,
            })),
        );
        Ok(identity)
    }

    fn join(&self, req: &Request) -> Reply {
        let body: JoinRequest = req.json()?;
        let now = unix_now();
        let addr = req.peer.ip().to_string();
        let addr_key = format!("addr:{addr}");
        if let Some(wait) = self.limiter.blocked(&addr_key, now) {
            return Err(Response::error(
                429,
                &format!("too many failed joins; try again in {wait} s"),
            ));
        }
        valid_name("host name", &body.host_name)?;
        let token = match self
            .store
            .redeem_token(&token_hash(&body.token), now)
            .map_err(internal)?
        {
            TokenCheck::Valid(t) => t,
            TokenCheck::Expired => {
                self.limiter.fail(&addr_key, now);
                return Err(Response::error(
                    401,
                    "join token expired; create a new one with `jaunt tokens add`",
                ));
            }
            TokenCheck::Unknown => {
                self.limiter.fail(&addr_key, now);
                return Err(Response::error(
                    401,
                    "join token is not valid (unknown, removed or already used)",
                ));
            }
        };
        let id = random_hex(16).map_err(internal)?;
        let identity = Identity {
            kind: IdentityKind::Host,
            name: id.clone(),
            roles: token.types.clone(),
            logins: vec![body.host_name.clone(), id.clone()],
            db_users: vec![],
            db_names: vec![],
            traits: BTreeMap::new(),
            cluster: self.settings.cluster.clone(),
            not_before: now.saturating_sub(60),
            expires: now + self.settings.host_ttl_secs,
            permit_pty: false,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
        };
        let certs = self.issue(
            &identity,
            &body.tls_public_key,
            &body.ssh_public_key,
            &[id.clone(), body.host_name.clone()],
        )?;
        self.store
            .upsert_host(&StoredHost {
                id: id.clone(),
                name: body.host_name.clone(),
                types: token.types.clone(),
                joined: now,
                last_seen: now,
            })
            .map_err(internal)?;
        // The new host replaces earlier records of its name that are not connected (the same
        // agent joining again, e.g. with a new token), so they are not listed forever.
        self.remove_stale_hosts(None, &body.host_name, Some(&id))?;
        self.audit.emit(
            audit::HOST_JOINED,
            None,
            &serde_json::json!({
                "host_id": id, "host_name": body.host_name, "types": token.types, "addr": addr,
            }),
        );
        Ok(Response::json(200, &certs))
    }

    // ---- authenticated endpoints ----

    fn renew(&self, req: &Request, caller: &Identity) -> Reply {
        if caller.kind != IdentityKind::Host {
            return Err(Response::error(403, "only hosts renew host certificates"));
        }
        let body: RenewRequest = req.json()?;
        let now = unix_now();
        let identity = Identity {
            not_before: now.saturating_sub(60),
            expires: now + self.settings.host_ttl_secs,
            ..caller.clone()
        };
        let certs = self.issue(
            &identity,
            &body.tls_public_key,
            &body.ssh_public_key,
            &identity.logins,
        )?;
        if let Some(mut host) = self.store.get_host(&caller.name).map_err(internal)? {
            host.last_seen = now;
            self.store.upsert_host(&host).map_err(internal)?;
        }
        Ok(Response::json(200, &certs))
    }

    fn status(&self, caller: &Identity) -> Reply {
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
    fn members(&self) -> Result<Vec<jaunt_config::api::MemberInfo>, Response> {
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
    fn hosts(&self) -> Result<Vec<HostInfo>, Response> {
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
    fn list_inventory(&self, caller: &Identity) -> Reply {
        if caller.kind != IdentityKind::User {
            return Err(Response::error(403, "only users list resources"));
        }
        Ok(Response::json(200, &self.inventory()))
    }

    /// `jaunt rm node/NAME` (`DELETE /v1/hosts/NAME_OR_ID`): removes the records of the hosts
    /// of that name (or id) that are not connected. A connected one is refused: removing its
    /// record would not stop it (its certificate stays valid until it expires; `jaunt lock
    /// --node` refuses it at once).
    fn delete_host(&self, caller: &Identity, target: &str) -> Reply {
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
                    &format!("no such node: {target} (see `jaunt status --data-dir DIR`)"),
                ));
            }
            return Err(Response::error(
                409,
                &format!(
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
    fn remove_stale_hosts(
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

    fn list_hosts(&self, caller: &Identity) -> Reply {
        self.require(caller, "node", "list")?;
        Ok(Response::json(200, &self.hosts()?))
    }

    fn list_users(&self, caller: &Identity) -> Reply {
        self.require(caller, "user", "list")?;
        let users: Vec<UserInfo> = self
            .store
            .list_users()
            .map_err(internal)?
            .iter()
            .filter_map(|s| {
                let u = user_from_stored(s).ok()?;
                Some(UserInfo {
                    name: s.name.clone(),
                    roles: u.spec.roles.clone(),
                    traits: u.spec.traits.clone(),
                    created: s.created,
                    otp_enrolled: s.otp_secret.is_some(),
                    description: u.metadata.description.clone(),
                    labels: u.metadata.labels.clone(),
                })
            })
            .collect();
        Ok(Response::json(200, &users))
    }

    fn add_user(&self, req: &Request, caller: &Identity) -> Reply {
        self.require(caller, "user", "create")?;
        let body: UserAddRequest = req.json()?;
        let mut traits = BTreeMap::new();
        for (k, v) in [
            ("logins", &body.logins),
            ("db_users", &body.db_users),
            ("db_names", &body.db_names),
        ] {
            if !v.is_empty() {
                traits.insert(k.to_string(), v.clone());
            }
        }
        let user = User::new(&body.name, body.roles.clone(), traits);
        let creds = self.insert_user(caller, &user, body.password)?;
        Ok(Response::json(200, &creds))
    }

    /// Creates `user` with `password` (or a generated one); answers with what the person needs.
    fn insert_user(
        &self,
        caller: &Identity,
        user: &User,
        password: Option<String>,
    ) -> Result<UserCredentials, Response> {
        valid_name("user name", &user.metadata.name)?;
        if user.spec.roles.is_empty() {
            return Err(Response::error(
                400,
                "a user needs at least one role (--roles)",
            ));
        }
        self.roles_of(&user.spec.roles)?;
        let generated = password.is_none();
        let password = match password {
            Some(p) => p,
            None => auth::random_password().map_err(internal)?,
        };
        let hash =
            auth::hash_password(&password).map_err(|e| Response::error(400, &e.to_string()))?;
        let otp_secret = if self.settings.second_factor {
            Some(auth::new_otp_secret().map_err(internal)?)
        } else {
            None
        };
        let stored = StoredUser {
            name: user.metadata.name.clone(),
            spec: serde_json::to_string(user).map_err(internal)?,
            password_hash: hash,
            otp_secret: otp_secret.clone(),
            created: unix_now(),
        };
        if !self.store.insert_user(&stored).map_err(internal)? {
            return Err(Response::error(
                409,
                &format!("user {} already exists", user.metadata.name),
            ));
        }
        self.audit.emit(
            audit::USER_CREATED,
            Some(&caller.name),
            &serde_json::json!({
                "user": caller.name, "name": user.metadata.name, "roles": user.spec.roles,
            }),
        );
        self.credentials(
            &user.metadata.name,
            generated.then_some(password),
            otp_secret,
        )
    }

    fn credentials(
        &self,
        name: &str,
        password: Option<String>,
        otp_secret: Option<String>,
    ) -> Result<UserCredentials, Response> {
        let otp_url = match &otp_secret {
            Some(s) => Some(
                auth::otp_url(s, &format!("{name}@{}", self.settings.cluster)).map_err(internal)?,
            ),
            None => None,
        };
        Ok(UserCredentials {
            name: name.to_string(),
            password,
            otp_secret,
            otp_url,
        })
    }

    fn delete_user(&self, caller: &Identity, name: &str) -> Reply {
        self.require(caller, "user", "delete")?;
        if !self.store.delete_user(name).map_err(internal)? {
            return Err(Response::error(404, &format!("no such user: {name}")));
        }
        self.audit.emit(
            audit::USER_DELETED,
            Some(&caller.name),
            &serde_json::json!({"user": caller.name, "name": name}),
        );
        Ok(Response::json(200, &serde_json::json!({"deleted": name})))
    }

    fn reset_user(&self, req: &Request, caller: &Identity, name: &str) -> Reply {
        self.require(caller, "user", "update")?;
        let body: UserResetRequest = if req.body.is_empty() {
            UserResetRequest::default()
        } else {
            req.json()?
        };
        let generated = body.password.is_none();
        let password = match body.password {
            Some(p) => p,
            None => auth::random_password().map_err(internal)?,
        };
        let hash =
            auth::hash_password(&password).map_err(|e| Response::error(400, &e.to_string()))?;
        let otp_secret = if self.settings.second_factor {
            Some(auth::new_otp_secret().map_err(internal)?)
        } else {
            None
        };
        if !self
            .store
            .set_user_credentials(name, &hash, otp_secret.as_deref())
            .map_err(internal)?
        {
            return Err(Response::error(404, &format!("no such user: {name}")));
        }
        self.audit.emit(
            audit::USER_UPDATED,
            Some(&caller.name),
            &serde_json::json!({
                "user": caller.name, "name": name, "change": "credentials reset",
            }),
        );
        Ok(Response::json(
            200,
            &self.credentials(name, generated.then_some(password), otp_secret)?,
        ))
    }

    fn list_tokens(&self, caller: &Identity) -> Reply {
        self.require(caller, "token", "list")?;
        let now = unix_now();
        self.store.prune_tokens(now).map_err(internal)?;
        let tokens: Vec<TokenInfo> = self
            .store
            .list_tokens()
            .map_err(internal)?
            .iter()
            .map(token_info)
            .collect();
        Ok(Response::json(200, &tokens))
    }

    fn add_token(&self, req: &Request, caller: &Identity) -> Reply {
        self.require(caller, "token", "create")?;
        let body: TokenAddRequest = req.json()?;
        Ok(Response::json(200, &self.insert_token(caller, body)?))
    }

    fn insert_token(
        &self,
        caller: &Identity,
        body: TokenAddRequest,
    ) -> Result<TokenAddResponse, Response> {
        if body.types.is_empty() {
            return Err(Response::error(
                400,
                "a token needs at least one type (--type node,app,db)",
            ));
        }
        for t in &body.types {
            if !TOKEN_TYPES.contains(&t.as_str()) {
                return Err(Response::error(
                    400,
                    &format!(
                        "unknown token type {t:?}: expected one of {}",
                        TOKEN_TYPES.join(", ")
                    ),
                ));
            }
        }
        if body.ttl_secs == 0 || body.ttl_secs > MAX_TOKEN_TTL_SECS {
            return Err(Response::error(
                400,
                &format!(
                    "token ttl must be between 1s and {}h",
                    MAX_TOKEN_TTL_SECS / 3600
                ),
            ));
        }
        let token = match body.token {
            Some(t) if t.len() >= 16 => t,
            Some(_) => {
                return Err(Response::error(
                    400,
                    "a chosen token must be at least 16 characters",
                ))
            }
            None => random_hex(16).map_err(internal)?,
        };
        let now = unix_now();
        let stored = StoredToken {
            hash: token_hash(&token),
            types: body.types.clone(),
            expires: now + body.ttl_secs,
            single_use: body.single_use,
            created: now,
        };
        if !self.store.insert_token(&stored).map_err(internal)? {
            return Err(Response::error(409, "that token already exists"));
        }
        self.audit.emit(audit::TOKEN_CREATED, Some(&caller.name), &serde_json::json!({
            "user": caller.name, "id": token_info(&stored).id, "types": body.types, "expires": stored.expires,
        }));
        Ok(TokenAddResponse {
            token,
            info: token_info(&stored),
            proxy_addr: self.public_addr(),
            ca_pin: self.cas().host.pin().to_string(),
        })
    }

    fn delete_token(&self, caller: &Identity, id: &str) -> Reply {
        self.require(caller, "token", "delete")?;
        // Accept the listed id (a hash prefix) or the token itself.
        let matching: Vec<StoredToken> = self.store.list_tokens().map_err(internal)?;
        let by_secret = token_hash(id);
        let targets: Vec<&StoredToken> = matching
            .iter()
            .filter(|t| t.hash == by_secret || (id.len() >= 8 && t.hash.starts_with(id)))
            .collect();
        match targets.as_slice() {
            [] => Err(Response::error(404, &format!("no such token: {id}"))),
            [one] => {
                self.store
                    .delete_tokens_by_prefix(&one.hash)
                    .map_err(internal)?;
                self.audit.emit(
                    audit::TOKEN_DELETED,
                    Some(&caller.name),
                    &serde_json::json!({"user": caller.name, "id": token_info(one).id}),
                );
                Ok(Response::json(
                    200,
                    &serde_json::json!({"deleted": token_info(one).id}),
                ))
            }
            _ => Err(Response::error(
                409,
                &format!("{id} matches several tokens; give more of the id"),
            )),
        }
    }

    fn list_roles(&self, caller: &Identity) -> Reply {
        self.require(caller, "role", "list")?;
        let roles: Vec<Role> = self
            .store
            .list_roles()
            .map_err(internal)?
            .iter()
            .filter_map(|(_, spec)| serde_json::from_str(spec).ok())
            .collect();
        Ok(Response::json(200, &roles))
    }

    fn delete_role(&self, caller: &Identity, name: &str) -> Reply {
        self.require(caller, "role", "delete")?;
        let in_use: Vec<String> = self
            .store
            .list_users()
            .map_err(internal)?
            .iter()
            .filter_map(|s| user_from_stored(s).ok())
            .filter(|u| u.spec.roles.iter().any(|r| r == name))
            .map(|u| u.metadata.name)
            .collect();
        if !in_use.is_empty() {
            return Err(Response::error(
                409,
                &format!("role {name} is still assigned to: {}", in_use.join(", ")),
            ));
        }
        if !self.store.delete_role(name).map_err(internal)? {
            return Err(Response::error(404, &format!("no such role: {name}")));
        }
        self.audit.emit(
            audit::ROLE_DELETED,
            Some(&caller.name),
            &serde_json::json!({"user": caller.name, "name": name}),
        );
        Ok(Response::json(200, &serde_json::json!({"deleted": name})))
    }

    fn list_locks(&self, caller: &Identity) -> Reply {
        self.require(caller, "lock", "list")?;
        let locks: Vec<Lock> = self
            .store
            .list_locks(unix_now())
            .map_err(internal)?
            .iter()
            .filter_map(|l| serde_json::from_str(&l.spec).ok())
            .collect();
        Ok(Response::json(200, &locks))
    }

    fn delete_lock(&self, caller: &Identity, id: &str) -> Reply {
        self.require(caller, "lock", "delete")?;
        if !self.store.delete_lock(id).map_err(internal)? {
            return Err(Response::error(404, &format!("no such lock: {id}")));
        }
        self.audit.emit(
            audit::LOCK_DELETED,
            Some(&caller.name),
            &serde_json::json!({"user": caller.name, "id": id}),
        );
        Ok(Response::json(200, &serde_json::json!({"deleted": id})))
    }

    /// `jaunt create -f`: one resource (the CLI parsed the YAML and reported its errors with
    /// lines; this re-validates, since the API is public).
    fn create_resource(&self, req: &Request, caller: &Identity) -> Reply {
        let resource: Resource = req.json()?;
        let now = unix_now();
        match resource {
            Resource::Role(role) => {
                self.require(caller, "role", "create")?;
                valid_name("role name", &role.metadata.name)?;
                let existed = self
                    .store
                    .get_role(&role.metadata.name)
                    .map_err(internal)?
                    .is_some();
                self.store
                    .put_role(
                        &role.metadata.name,
                        &serde_json::to_string(&role).map_err(internal)?,
                        now,
                    )
                    .map_err(internal)?;
                self.audit.emit(
                    if existed {
                        audit::ROLE_UPDATED
                    } else {
                        audit::ROLE_CREATED
                    },
                    Some(&caller.name),
                    &serde_json::json!({
                        "user": caller.name, "name": role.metadata.name,
                    }),
                );
                Ok(Response::json(
                    200,
                    &serde_json::json!({"kind": "role", "name": role.metadata.name, "updated": existed}),
                ))
            }
            Resource::User(user) => {
                self.require(caller, "user", "create")?;
                if self
                    .store
                    .get_user(&user.metadata.name)
                    .map_err(internal)?
                    .is_some()
                {
                    self.roles_of(&user.spec.roles)?;
                    self.store
                        .update_user_spec(
                            &user.metadata.name,
                            &serde_json::to_string(&user).map_err(internal)?,
                        )
                        .map_err(internal)?;
                    self.audit.emit(audit::USER_UPDATED, Some(&caller.name), &serde_json::json!({
                        "user": caller.name, "name": user.metadata.name, "roles": user.spec.roles,
                    }));
                    return Ok(Response::json(
                        200,
                        &serde_json::json!({"kind": "user", "name": user.metadata.name, "updated": true}),
                    ));
                }
                let creds = self.insert_user(caller, &user, None)?;
                Ok(Response::json(
                    200,
                    &serde_json::json!({"kind": "user", "name": user.metadata.name, "updated": false, "credentials": creds}),
                ))
            }
            Resource::Token(token) => {
                self.require(caller, "token", "create")?;
                let resp = self.insert_token(
                    caller,
                    TokenAddRequest {
                        types: token
                            .spec
                            .types
                            .iter()
                            .map(|t| format!("{t:?}").to_lowercase())
                            .collect(),
                        ttl_secs: token.spec.ttl.as_secs(),
                        single_use: token.spec.single_use,
                        token: Some(token.metadata.name.clone()).filter(|n| !n.is_empty()),
                    },
                )?;
                Ok(Response::json(
                    200,
                    &serde_json::json!({"kind": "token", "token": resp.token, "info": resp.info}),
                ))
            }
            Resource::Lock(lock) => {
                self.require(caller, "lock", "create")?;
                let id = if lock.metadata.name.is_empty() {
                    random_hex(8).map_err(internal)?
                } else {
                    lock.metadata.name.clone()
                };
                let expires = lock.spec.ttl.as_ref().map(|t| now + t.as_secs());
                let mut lock = lock;
                lock.metadata.name = id.clone();
                self.store
                    .insert_lock(&StoredLock {
                        id: id.clone(),
                        spec: serde_json::to_string(&lock).map_err(internal)?,
                        expires,
                        created: now,
                    })
                    .map_err(internal)?;
                self.audit.emit(
                    audit::LOCK_CREATED,
                    Some(&caller.name),
                    &serde_json::json!({
                        "user": caller.name, "id": id, "target": lock.spec.target,
                    }),
                );
                Ok(Response::json(
                    200,
                    &serde_json::json!({"kind": "lock", "name": id}),
                ))
            }
        }
    }

    fn export_ca(&self, caller: &Identity, ty: &str) -> Reply {
        self.require(caller, "ca", "read")?;
        let cas = self.cas();
        let lines = |keys: &[String], prefix: &str| -> String {
            keys.iter().map(|k| format!("{prefix}{k}\n")).collect()
        };
        let text = match ty {
            // During a rotation both CAs: sshd's TrustedUserCAKeys, known_hosts'
            // @cert-authority lines and ssl_ca_file trust every CA the cluster trusts.
            "user-ssh" => lines(&cas.ssh_lines(CaKind::User), ""),
            "host-ssh" => lines(&cas.ssh_lines(CaKind::Host), "@cert-authority * "),
            "user-tls" => cas.trusted_pem(CaKind::User),
            "host-tls" => cas.trusted_pem(CaKind::Host),
            "db" | "db-tls" => cas.trusted_pem(CaKind::Db),
            other => {
                return Err(Response::error(400, &format!("unknown CA type {other:?}: expected user-ssh, host-ssh, user-tls, host-tls or db")));
            }
        };
        Ok(Response::json(
            200,
            &CaExport {
                r#type: ty.to_string(),
                text,
            },
        ))
    }

    fn sign_host(&self, req: &Request, caller: &Identity) -> Reply {
        self.require(caller, "ca", "create")?;
        let body: SignHostRequest = req.json()?;
        valid_name("host", &body.host)?;
        let public = ssh_key::PublicKey::from_openssh(&body.ssh_public_key)
            .map_err(|e| Response::error(400, &format!("ssh_public_key: {e}")))?;
        let now = unix_now();
        let identity = Identity {
            kind: IdentityKind::Host,
            name: body.host.clone(),
            roles: vec!["node".into()],
            // `NODE.<cluster>` too: how `jaunt config` names nodes to plain ssh, which checks
            // the host certificate against the name it was given.
            logins: vec![
                body.host.clone(),
                format!("{}.{}", body.host, self.settings.cluster),
            ],
            db_users: vec![],
            db_names: vec![],
            traits: BTreeMap::new(),
            cluster: self.settings.cluster.clone(),
            not_before: now.saturating_sub(60),
            expires: now
                + body
                    .ttl_secs
                    .unwrap_or(self.settings.host_ttl_secs)
                    .min(10 * 365 * 24 * 3600),
            permit_pty: false,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
        };
        let cert = self
            .cas()
            .host
            .sign_ssh(&identity, &public)
            .map_err(internal)?;
        self.audit.emit(audit::CERT_ISSUED, Some(&caller.name), &serde_json::json!({
            "user": caller.name, "kind": "host-ssh", "host": body.host, "expires": identity.expires,
        }));
        Ok(Response::json(
            200,
            &SignHostResponse {
                ssh_cert: cert.to_openssh().map_err(internal)?,
            },
        ))
    }

    /// `jaunt ca sign-db`: a database server certificate from the db CA over the caller's key.
    fn sign_db(&self, req: &Request, caller: &Identity) -> Reply {
        use crate::db_cmd::{self, DbCertResponse, SignDbRequest};
        self.require(caller, "ca", "create")?;
        let body: SignDbRequest = req.json()?;
        let names = db_cmd::db_server_names(&body.hosts).map_err(|e| Response::error(400, e))?;
        let spki = ca::spki_pem_to_der(&body.tls_public_key)
            .map_err(|e| Response::error(400, e.to_string()))?;
        let now = unix_now();
        let ttl = body
            .ttl_secs
            .unwrap_or(self.settings.host_ttl_secs)
            .clamp(60, db_cmd::MAX_DB_SERVER_CERT_TTL_SECS);
        let identity = db_cmd::db_server_identity(&self.settings.cluster, &names, now, ttl);
        let der = self
            .cas()
            .db
            .sign_x509(&identity, &spki, &names)
            .map_err(|e| Response::error(400, e.to_string()))?;
        self.audit.emit(audit::CERT_ISSUED, Some(&caller.name), &serde_json::json!({
            "user": caller.name, "kind": "db-server", "hosts": names, "expires": identity.expires,
        }));
        Ok(Response::json(
            200,
            &DbCertResponse {
                tls_cert: ca::cert_pem(&der),
                db_ca: self.cas().trusted_pem(CaKind::Db),
                expires: identity.expires,
            },
        ))
    }

    /// An agent's database client certificate for one database user, from the db CA: host
    /// identities with role `db` only (agents joined with a `db` token). The engine authorized
    /// the user's dial and the agent checked the database user against the user's certificate.
    fn db_cert(&self, req: &Request, caller: &Identity) -> Reply {
        use crate::db_cmd::{self, DbCertRequest, DbCertResponse};
        if caller.kind != IdentityKind::Host
            || !caller.roles.iter().any(|r| r == db_cmd::DB_HOST_ROLE)
        {
            return Err(Response::error(
                403,
                "only agents that joined with a db token (jaunt tokens add --type db) get \
                 database certificates",
            ));
        }
        let body: DbCertRequest = req.json()?;
        db_cmd::valid_db_user(&body.db_user).map_err(|e| Response::error(400, e))?;
        let spki = ca::spki_pem_to_der(&body.tls_public_key)
            .map_err(|e| Response::error(400, e.to_string()))?;
        let now = unix_now();
        let ttl = body
            .ttl_secs
            .unwrap_or(db_cmd::DB_CLIENT_CERT_TTL_SECS)
            .clamp(60, db_cmd::MAX_DB_CLIENT_CERT_TTL_SECS);
        let identity = db_cmd::db_client_identity(&self.settings.cluster, &body.db_user, now, ttl);
        let der = self
            .cas()
            .db
            .sign_x509(&identity, &spki, &[])
            .map_err(|e| Response::error(400, e.to_string()))?;
        self.audit.emit(
            audit::CERT_ISSUED,
            body.requested_by.as_deref(),
            &serde_json::json!({
                "user": body.requested_by, "kind": "db-client", "db_user": body.db_user,
                "host": caller.name, "expires": identity.expires,
            }),
        );
        Ok(Response::json(
            200,
            &DbCertResponse {
                tls_cert: ca::cert_pem(&der),
                db_ca: self.cas().trusted_pem(CaKind::Db),
                expires: identity.expires,
            },
        ))
    }

    /// An app-access JWT for a user of an HTTP app: host identities with role `app` only
    /// (agents joined with an `app` token). The engine authorized the user's dial; the agent
    /// passes on who the engine said the user is.
    fn app_jwt(&self, req: &Request, caller: &Identity) -> Reply {
        if caller.kind != IdentityKind::Host || !caller.roles.iter().any(|r| r == APP_HOST_ROLE) {
            return Err(Response::error(
                403,
                "only agents that joined with an app token (jaunt tokens add --type app) get \
                 app tokens",
            ));
        }
        let body: AppJwtRequest = req.json()?;
        if body.user.is_empty() || body.user.len() > 256 || body.roles.len() > 256 {
            return Err(Response::error(
                400,
                "user must be 1-256 bytes, at most 256 roles",
            ));
        }
        let now = unix_now();
        let claims = crate::jwt::JwtSigner::app_claims(
            &self.settings.cluster,
            &body.user,
            &body.roles,
            &body.uri,
            now,
            crate::jwt::APP_TOKEN_TTL_SECS,
        );
        let jwt = self.cas().jwt.sign(&claims).map_err(internal)?;
        Ok(Response::json(
            200,
            &AppJwtResponse {
                jwt,
                expires: claims.exp,
            },
        ))
    }

    /// `GET /v1/agent/policy`: the roles, the locks in force and the user CA, for agents (host
    /// identities) to re-check each user stream before serving it — the document built with
    /// the engine's last snapshot, which the engine also pushes to agents over their tunnels
    /// (this poll is the agents' fallback, and what carries the per-agent parts: the rotation
    /// confirmation, a host certificate renewal and the engines heard from now). A role set
    /// that does not compile builds no snapshot, so the last good policy stays in force (500 if
    /// there never was one): never one without some deny rules.
    fn agent_policy(&self, req: &Request, caller: &Identity) -> Reply {
        if caller.kind != IdentityKind::Host {
            return Err(Response::error(
                403,
                "only agents (host certificates) get the cluster's policy",
            ));
        }
        crate::rotation::note_confirmation(&self.confirmations, &caller.name, &req.query);
        let cas = self.cas();
        // A phase whose servers re-issue: an agent whose certificate is not from the host CA
        // that signs now renews at once.
        let renew_host_cert = matches!(cas.phase("host"), "update_servers" | "rollback")
            && req
                .peer_certs
                .first()
                .is_some_and(|leaf| !cas.host.issued(leaf));
        let cached = || self.agent_policy.read().ok().and_then(|p| p.clone());
        let shared = match cached() {
            Some(policy) => policy,
            None => {
                // No snapshot built yet (control without an engine): build one now.
                self.publish_snapshot();
                cached().ok_or_else(|| {
                    internal("the stored roles do not compile; see the control log")
                })?
            }
        };
        let mut policy = AgentPolicyResponse {
            renew_host_cert,
            engines: self.healthy_engines()?,
            ..(*shared).clone()
        };
        seal_agent_policy(&mut policy);
        Ok(Response::json(200, &policy))
    }

    /// The public addresses of the engines whose heartbeats say healthy.
    fn healthy_engines(&self) -> Result<Vec<String>, Response> {
        Ok(self
            .members()?
            .into_iter()
            .filter(|m| m.health == "healthy")
            .map(|m| m.public_addr)
            .collect())
    }

    /// Hands control its recordings storage (the daemon opens it).
    pub fn set_recordings(&self, recordings: Arc<crate::recordings::Recordings>) {
        let _ = self.recordings.set(recordings);
    }

    /// The recordings storage, once set.
    pub fn recordings(&self) -> Option<&crate::recordings::Recordings> {
        self.recordings.get().map(|r| r.as_ref())
    }

    /// A terminating agent's host certificate for its own node name (`agent_ssh.rs`).
    fn agent_ssh_host_cert(&self, req: &Request, caller: &Identity) -> Reply {
        use crate::agent_ssh;
        use jaunt_config::api::{AgentSshCertResponse, AgentSshHostCertRequest};
        agent_ssh::may_terminate(caller).map_err(|e| Response::error(403, e))?;
        let body: AgentSshHostCertRequest = req.json()?;
        let public = ssh_key::PublicKey::from_openssh(&body.ssh_public_key)
            .map_err(|e| Response::error(400, format!("ssh_public_key: {e}")))?;
        let identity = agent_ssh::host_cert_identity(
            caller,
            &self.settings.cluster,
            unix_now(),
            self.settings.host_ttl_secs,
        )
        .map_err(|e| Response::error(400, e))?;
        let cert = self
            .cas()
            .host
            .sign_ssh(&identity, &public)
            .map_err(internal)?;
        self.audit.emit(
            audit::CERT_ISSUED,
            None,
            &serde_json::json!({
                "kind": "agent-ssh-host", "host": caller.name, "node": identity.name,
                "expires": identity.expires,
            }),
        );
        Ok(Response::json(
            200,
            &AgentSshCertResponse {
                ssh_cert: cert.to_openssh().map_err(internal)?,
                expires: identity.expires,
            },
        ))
    }

    /// A terminating agent's short-lived login certificate for one user's session on its node
    /// (`agent_ssh.rs`): only with that user's valid certificate, for a login it carries.
    fn agent_ssh_user_cert(&self, req: &Request, caller: &Identity) -> Reply {
        use crate::agent_ssh;
        use jaunt_config::api::{AgentSshCertResponse, AgentSshUserCertRequest};
        agent_ssh::may_terminate(caller).map_err(|e| Response::error(403, e))?;
        let body: AgentSshUserCertRequest = req.json()?;
        let public = ssh_key::PublicKey::from_openssh(&body.ssh_public_key)
            .map_err(|e| Response::error(400, format!("ssh_public_key: {e}")))?;
        let der =
            agent_ssh::decode_user_cert(&body.user_cert).map_err(|e| Response::error(400, e))?;
        let now = unix_now();
        // Any user CA trusted now (two during a rotation); the signing one's refusal is told.
        let cas = self.cas();
        let mut verified = Err(String::new());
        for ca in cas.trusted(CaKind::User) {
            verified =
                agent_ssh::verify_forwarded_user(ca.cert_der(), &self.settings.cluster, &der, now);
            if verified.is_ok() {
                break;
            }
        }
        let user = verified.map_err(|e| Response::error(403, e))?;
        let identity = agent_ssh::node_login_identity(&user, &body.login, now)
            .map_err(|e| Response::error(403, e))?;
        let cert = cas.user.sign_ssh(&identity, &public).map_err(internal)?;
        self.audit.emit(
            audit::CERT_ISSUED,
            Some(&user.name),
            &serde_json::json!({
                "user": user.name, "kind": "agent-ssh-login", "login": body.login,
                "host": caller.name, "session_id": body.session_id, "expires": identity.expires,
            }),
        );
        Ok(Response::json(
            200,
            &AgentSshCertResponse {
                ssh_cert: cert.to_openssh().map_err(internal)?,
                expires: identity.expires,
            },
        ))
    }

    /// `POST /v1/ca/rotate` (`jaunt ca rotate`): rule `ca`, verb `update`.
    fn rotate_ca(&self, req: &Request, caller: &Identity) -> Reply {
        self.require(caller, "ca", "update")?;
        let body: jaunt_config::api::RotateRequest = req.json()?;
        self.rotate(&body, &caller.name)
            .map(|r| Response::json(200, &r))
            .map_err(|e| Response::error(e.status, &e.message))
    }

    /// Where `jaunt sessions ls|kill` find the engine's live sessions (set once it runs).
    pub fn set_engine_sessions(&self, sessions: jaunt_engine::server::EngineSessions) {
        *self.sessions.write().unwrap_or_else(|p| p.into_inner()) = Some(sessions);
    }

    fn engine_sessions(&self) -> Result<jaunt_engine::server::EngineSessions, Response> {
        self.sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| Response::error(503, "the engine is not running on this host"))
    }

    /// `GET /v1/sessions`: the live sessions (role rule `session`/`list`).
    pub(crate) fn list_sessions(&self, caller: &Identity) -> Reply {
        self.require(caller, "session", "list")?;
        Ok(Response::json(200, &self.engine_sessions()?.list()))
    }

    /// `GET /v1/sessions/ID`: one live session, for `jaunt join` to find its node (role rule
    /// `session`/`join`). Only a recorded SSH session (terminated at its agent) can be watched:
    /// others are refused here with the reason. The join itself is authorized again, and
    /// audited (`session.join`), by the engine and the agent when the observer dials.
    pub(crate) fn join_session_info(&self, caller: &Identity, id: &str) -> Reply {
        self.require(caller, "session", "join")?;
        let Some(session) = self
            .engine_sessions()?
            .list()
            .into_iter()
            .find(|s| s.id == id)
        else {
            return Err(Response::error(
                404,
                &format!("no live session {id:?}: see `jaunt sessions ls`"),
            ));
        };
        if session.kind != jaunt_config::wire::DialKind::Ssh || !session.recorded {
            return Err(Response::error(
                409,
                &format!(
                    "session {id:?} cannot be watched: only recorded SSH sessions (the agent \
                     terminates them) can be joined, and this is an unrecorded {} session",
                    session.kind.as_str()
                ),
            ));
        }
        Ok(Response::json(200, &session))
    }

    /// `DELETE /v1/sessions/ID`: ends a live session (role rule `session`/`delete`); the audit
    /// log's `session.kill` names who ended it.
    pub(crate) fn kill_session(&self, caller: &Identity, id: &str) -> Reply {
        self.require(caller, "session", "delete")?;
        let sessions = self.engine_sessions()?;
        let Some(session) = sessions.list().into_iter().find(|s| s.id == id) else {
            return Err(Response::error(
                404,
                &format!("no live session {id:?}: see `jaunt sessions ls`"),
            ));
        };
        if !sessions.end(id) {
            return Err(Response::error(
                404,
                &format!("session {id:?} ended already"),
            ));
        }
        self.audit.emit(
            audit::SESSION_KILLED,
            Some(&session.user),
            &serde_json::json!({
                "session_id": session.id,
                "user": session.user,
                "kind": session.kind,
                "target": session.target,
                "login": session.login,
                "by": caller.name,
            }),
        );
        Ok(Response::json(200, &session))
    }

    /// `POST /v1/audit/events`: an agent's batch of events (database queries, app requests),
    /// answered 200 once committed; the rules are in [`crate::agent_audit::receive`].
    fn agent_audit_events(&self, req: &Request, caller: &Identity) -> Reply {
        crate::agent_audit::receive(&self.audit, &self.store, caller, &req.body, unix_now())
    }

    fn audit_search(&self, req: &Request, caller: &Identity) -> Reply {
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
                    .map_err(|_| Response::error(400, &format!("{k} must be unix seconds")))
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

    // ---- helpers ----

    /// Signs X.509 and SSH certificates for `identity` over the caller's public keys.
    fn issue(
        &self,
        identity: &Identity,
        tls_public_pem: &str,
        ssh_public: &str,
        dns_names: &[String],
    ) -> Result<Certs, Response> {
        let spki = ca::spki_pem_to_der(tls_public_pem)
            .map_err(|e| Response::error(400, &e.to_string()))?;
        let ssh_public = ssh_key::PublicKey::from_openssh(ssh_public)
            .map_err(|e| Response::error(400, &format!("ssh_public_key: {e}")))?;
        let cas = self.cas();
        let ca = match identity.kind {
            IdentityKind::User => &cas.user,
            IdentityKind::Host => &cas.host,
        };
        let tls = ca
            .sign_x509(identity, &spki, dns_names)
            .map_err(|e| Response::error(400, &e.to_string()))?;
        let ssh = ca.sign_ssh(identity, &ssh_public).map_err(internal)?;
        self.audit.emit(audit::CERT_ISSUED, Some(&identity.name), &serde_json::json!({
            "user": identity.name, "kind": identity.kind, "roles": identity.roles, "expires": identity.expires,
        }));
        Ok(Certs {
            identity: identity.clone(),
            tls_cert: ca::cert_pem(&tls),
            ssh_cert: ssh.to_openssh().map_err(internal)?,
            host_ca_tls: cas.trusted_pem(CaKind::Host),
            user_ca_tls: cas.trusted_pem(CaKind::User),
            host_ca_ssh: cas.ssh_lines(CaKind::Host).join("\n"),
            user_ca_ssh: cas.ssh_lines(CaKind::User).join("\n"),
        })
    }

    /// The caller's identity from its client certificate.
    fn caller(&self, req: &Request) -> Result<Identity, Response> {
        let Some(leaf) = req.peer_certs.first() else {
            return Err(Response::error(401, "this endpoint needs a client certificate: run `jaunt login`, or pass --data-dir on the control host"));
        };
        let id = Identity::from_x509_der(leaf).map_err(|e| Response::error(401, &e.to_string()))?;
        if id.cluster != self.settings.cluster {
            return Err(Response::error(
                401,
                &format!(
                    "certificate is for cluster {}, not {}",
                    id.cluster, self.settings.cluster
                ),
            ));
        }
        id.check_valid_at(unix_now())
            .map_err(|e| Response::error(401, &e.to_string()))?;
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
                &format!(
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
                    .ok_or_else(|| Response::error(400, &format!("no such role: {n}")))?;
                serde_json::from_str(&spec).map_err(internal)
            })
            .collect()
    }

    /// The first lock in force that targets this user or one of these roles, as (id, message).
    fn matching_lock(
        &self,
        user: &str,
        roles: &[String],
        now: u64,
    ) -> Result<Option<(String, String)>, Response> {
        for l in self.store.list_locks(now).map_err(internal)? {
            let Ok(lock) = serde_json::from_str::<Lock>(&l.spec) else {
                continue;
            };
            let hit = match &lock.spec.target {
                LockTarget::User(u) => u == user,
                LockTarget::Role(r) => roles.contains(r),
                LockTarget::Node(_) | LockTarget::Login(_) => false,
            };
            if hit {
                let message = lock
                    .spec
                    .message
                    .clone()
                    .unwrap_or_else(|| "locked by an administrator".into());
                return Ok(Some((l.id, message)));
            }
        }
        Ok(None)
    }
}

fn user_from_stored(s: &StoredUser) -> Result<User, serde_json::Error> {
    serde_json::from_str(&s.spec)
}

fn token_info(t: &StoredToken) -> TokenInfo {
    TokenInfo {
        id: t.hash.chars().take(16).collect(),
        types: t.types.clone(),
        expires: t.expires,
        single_use: t.single_use,
        created: t.created,
    }
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
            &format!(
                "invalid {what} {name:?}: use letters, digits, '.', '_', '-' or '@' (at most 253)"
            ),
        ))
    }
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "control: internal error");
    Response::error(500, &format!("internal error: {e}"))
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
