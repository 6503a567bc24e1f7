//! Per-connection authorization: may this identity reach this node, app or database, as this
//! login or database user, at this moment? [`authorize`] is the one decision. The engine calls it
//! before it opens a tunnel stream and the agent calls it again before it serves one. It is
//! pure: no I/O, no clock (the caller passes `now`), and no allocation unless it refuses.
//!
//! The semantics are Teleport's:
//!
//! 1. **Validity**: refused if `now < not_before` or `now >= expires`.
//! 2. **Locks**: an [`ActiveLock`] in force that names the user, any of the identity's roles,
//!    the node (for nodes), or the requested login refuses with its message.
//! 3. **Roles**: the identity's roles are looked up in the [`Policy`]. Unknown names are ignored,
//!    but if none is known the answer is [`DeniedKind::NoRole`].
//! 4. **Deny wins, and is greedy**: a role's `deny` refuses if its label selector for the
//!    resource's kind matches the resource's labels, *or* if one of its principal lists matches
//!    what is requested (`logins` for nodes; `db_users` and `db_names` for databases). Either one
//!    is enough, so `deny: {logins: [root]}` refuses root everywhere and
//!    `deny: {node_labels: {env: prod}}` refuses every prod node.
//! 5. **Allow is per role**: one role must match both the labels *and* every requested principal.
//!    A role that matches the labels and another that allows the login do not add up to access.
//!
//! Label selectors (`node_labels` for nodes, `db_labels` for databases, `app_labels` for HTTP and
//! TCP apps): every key of the selector must be a label of the resource, and its value must match
//! one of the selector's values. A value is exact text, `*` (any value, but the key must be
//! there), or `^regex$` (matched against the whole value). The key `*` with the value `*` matches
//! every resource. An empty selector matches nothing, as in Teleport: no labels, no access.
//!
//! Principals (`logins`, `db_users`, `db_names`): exact text, `*` (any), or a trait,
//! `{{internal.NAME}}` or `{{external.NAME}}`, which stands for the values of the identity's
//! trait `NAME`. `{{internal.logins}}`, `{{internal.db_users}}` and `{{internal.db_names}}` fall
//! back to the certificate's own `logins`, `db_users` and `db_names` when the identity carries
//! no trait of that name. A trait the identity does not have stands for nothing.
//!
//! Options are combined over every known role of the identity, whether or not it matched:
//! the shortest `client_idle_timeout`; `disconnect_expired_cert` if any role sets it;
//! `permit_port_forwarding` and `permit_agent_forwarding` only if at least one role says true
//! and none says false;
//! `record_session` the strictest any role sets (`strict` > `best_effort` > `off`; `off` when no
//! role sets it); `record_input` if any role says true.
//!
//! [`Policy::compile`] does the work that does not depend on the connection once (regexes,
//! trait templates, wildcard selectors), so that [`authorize`] only compares.
//!
//! Not here: what a login puts in a certificate and whether role `rules` allow an admin verb
//! (control's `rbac.rs`), and how roles and locks reach the engine and the agent (their
//! snapshots).

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::time::Duration;

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

use crate::identity::Identity;
use crate::resource::{Labels, Lock, LockTarget, RecordSession, Role, RoleConditions, WILDCARD};

/// Upper bound on one compiled label regex (the `regex` crate's size limit). Selectors are
/// short patterns such as `^web-[0-9]+$`; a quarter MiB leaves room for large alternations while
/// keeping a careless (or hostile) role from making every shard hold megabytes of automaton.
pub const REGEX_SIZE_MAX_BYTES: usize = 256 * 1024;

/// How many of a resource's labels, and of an identity's roles, a refusal message lists. Agents
/// report labels and users may hold many roles; the message must stay one readable line.
pub const MESSAGE_ITEMS_MAX: usize = 16;

/// How many characters of one name, label or login a refusal message shows (the DNS name limit:
/// every real name fits).
pub const MESSAGE_TEXT_MAX: usize = 253;

/// What a lock without a message tells the locked-out user.
pub const DEFAULT_LOCK_MESSAGE: &str = "locked by an administrator";

/// What is being reached: the one kind of resource, shared by authorization, the agents'
/// announcements ([`crate::wire::AgentHello`], where it is serialized in lower case) and
/// routing. A dial reaches the kind [`crate::wire::DialKind::resource_kind`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    /// An SSH node (dial kind `ssh`; protocol `ssh`): matched by `node_labels`; needs a login.
    Node,
    /// An HTTP app (reached by HTTP at `<name>.<public host>`; protocol `http` or `https`):
    /// matched by `app_labels`.
    App,
    /// A database (dial kind `db`; protocol `postgres` or `mysql`): matched by `db_labels`;
    /// needs a database user, and the database name if one is given.
    Db,
    /// A TCP app (dial kind `tcp`; protocol `tcp`): an app to Teleport, so matched by
    /// `app_labels`.
    Tcp,
}

/// The resource a connection wants to reach, as routing resolved it.
#[derive(Debug, Clone, Copy)]
pub struct Resource<'a> {
    pub kind: ResourceKind,
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// What the connection asks for on the resource. Only the fields of the resource's kind are
/// read: `login` for nodes, `db_user` and `db_name` for databases. An empty string counts as
/// not given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Request<'a> {
    /// OS login (SSH).
    pub login: Option<&'a str>,
    /// Database user.
    pub db_user: Option<&'a str>,
    /// Database name.
    pub db_name: Option<&'a str>,
}

/// An allowed connection, with what the session must observe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Close the session after this long without traffic (the shortest of the roles').
    pub idle_timeout: Option<Duration>,
    /// End the session when the certificate expires (some role asks for it).
    pub disconnect_expired_cert: bool,
    /// The certificate's expiry (unix seconds): when the session must end if
    /// `disconnect_expired_cert`. See [`Decision::session_deadline`].
    pub expires: u64,
    /// SSH port forwarding (some role permits it and none forbids it).
    pub permit_port_forwarding: bool,
    /// SSH agent forwarding (some role permits it and none forbids it).
    pub permit_agent_forwarding: bool,
    /// Whether SSH sessions are recorded: the strictest `record_session` of the roles.
    pub record_session: RecordSession,
    /// Whether recordings carry the user's input (some role sets `record_input: true`).
    pub record_input: bool,
}

/// A refused connection. `message` names the resource and the rule that refused it; the user
/// reads it (see the engine's note on not revealing which resources exist).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Denied {
    pub kind: DeniedKind,
    pub message: String,
}

/// Why a connection was refused; [`DeniedKind::as_str`] gives stable metric labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DeniedKind {
    /// None of the identity's roles exists in the policy.
    NoRole,
    /// The `deny` of this role matched.
    DeniedByRole { role: String },
    /// No single role allows the resource and everything requested on it (or a login or
    /// database user the resource needs was not given).
    NotAllowed,
    /// This lock is in force and matches.
    Locked { lock: String },
    /// The certificate has expired.
    Expired,
    /// The certificate is not valid yet.
    NotYetValid,
}

/// A role set that cannot be used. Every variant names the role and, where there is one, the
/// key, as written in the role's YAML (`spec.allow.node_labels.env`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("role {role}: {key}: {value:?}: {reason}")]
    BadLabelValue {
        role: String,
        key: String,
        value: String,
        reason: String,
    },
    #[error("role {role}: {key}: the wildcard key '*' only takes the value '*'")]
    WildcardKey { role: String, key: String },
    #[error(
        "role {role}: {key}: {value:?} is not a trait \
         (expected {{{{internal.NAME}}}} or {{{{external.NAME}}}})"
    )]
    BadTrait {
        role: String,
        key: String,
        value: String,
    },
    #[error("role {role} is defined twice")]
    DuplicateRole { role: String },
    #[error("role {role}: {reason}")]
    BadDocument { role: String, reason: String },
}

/// Roles compiled for [`authorize`], by name. Build one per role set (per snapshot) and share
/// it; cloning is cheap (compiled regexes are shared) and gives the clone its own regex scratch
/// space, so each shard should hold its own clone.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    roles: HashMap<String, CompiledRole>,
}

/// A lock target, borrowed: what [`ActiveLock::target`] returns and what matching works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockRef<'a> {
    /// The user of this name.
    User(&'a str),
    /// Anyone holding this role.
    Role(&'a str),
    /// This node (SSH resources only).
    Node(&'a str),
    /// This requested login, on any node.
    Login(&'a str),
}

/// A lock as engine and agent hold it: what it targets, what the user is told, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveLock {
    /// The lock's name (its id in control), for [`DeniedKind::Locked`], logs and metrics.
    pub name: String,
    pub target: LockTarget,
    /// Shown to the refused user.
    pub message: String,
    /// Unix seconds at which the lock lifts; `None` = until deleted.
    pub expires: Option<u64>,
}

/// Decides whether `identity` may reach `resource` with `request` at `now` (unix seconds), given
/// the compiled roles and the locks in the current snapshot. See the module docs for the rules.
pub fn authorize(
    policy: &Policy,
    identity: &Identity,
    resource: &Resource,
    request: &Request,
    locks: &[ActiveLock],
    now: u64,
) -> Result<Decision, Denied> {
    let wanted = Wanted::of(resource.kind, request);
    let refuse = |kind: DeniedKind, reason: fmt::Arguments| Denied {
        kind,
        message: format!("{}: {reason}", Subject(resource, &wanted)),
    };

    if now < identity.not_before {
        return Err(refuse(
            DeniedKind::NotYetValid,
            format_args!(
                "certificate is not valid until {} (unix time); check this machine's clock",
                identity.not_before
            ),
        ));
    }
    if now >= identity.expires {
        return Err(refuse(
            DeniedKind::Expired,
            format_args!(
                "certificate expired at {} (unix time); run `jaunt login` again",
                identity.expires
            ),
        ));
    }
    if let Some(lock) = locks
        .iter()
        .find(|lock| lock_matches(lock, identity, resource, request, now))
    {
        return Err(refuse(
            DeniedKind::Locked {
                lock: lock.name.clone(),
            },
            format_args!(
                "locked by lock {} ({}): {}",
                Shown(&lock.name),
                lock.target,
                Shown(&lock.message)
            ),
        ));
    }
    match resource.kind {
        ResourceKind::Node if wanted.login.is_none() => {
            return Err(refuse(
                DeniedKind::NotAllowed,
                format_args!("an SSH login is required"),
            ));
        }
        ResourceKind::Db if wanted.db_user.is_none() => {
            return Err(refuse(
                DeniedKind::NotAllowed,
                format_args!("a database user is required"),
            ));
        }
        _ => {}
    }

    // One pass over the roles: options are combined over all known roles, a deny ends the
    // search at once, and the first role that allows is remembered.
    let mut known = 0usize;
    let mut options = Combined::default();
    let mut allowed = false;
    for name in &identity.roles {
        let Some(role) = policy.roles.get(name.as_str()) else {
            continue;
        };
        known += 1;
        options.add(&role.options);
        if let Some(rule) = role.deny.refusal(identity, resource, &wanted) {
            return Err(refuse(
                DeniedKind::DeniedByRole {
                    role: role.name.clone(),
                },
                format_args!(
                    "role {} denies {}",
                    Shown(&role.name),
                    rule.describe(resource.kind, &role.deny)
                ),
            ));
        }
        allowed = allowed || role.allow.permits(identity, resource, &wanted);
    }
    if known == 0 {
        return Err(refuse(
            DeniedKind::NoRole,
            format_args!("{}", NoRoleReason(identity)),
        ));
    }
    if !allowed {
        return Err(refuse(
            DeniedKind::NotAllowed,
            format_args!(
                "no role allows {} (labels {}); roles: {}",
                Wish(resource, &wanted),
                LabelList(resource.labels),
                RoleList(policy, identity)
            ),
        ));
    }
    let decision = options.decision(identity);
    debug_assert!(identity.not_before <= now && now < decision.expires);
    Ok(decision)
}

/// Decides whether `identity` may use `verb` on the cluster resource `resource` (a role
/// `rules` entry, as control's admin endpoints check them) at `now`, under the compiled roles and
/// the locks: the certificate must be valid, no lock in force may name the user or one of its
/// roles, no role's `deny.rules` may match, and one role's `allow.rules` must. The engine and the
/// agent check `session`/`join` this way for `jaunt join`.
pub fn authorize_rule(
    policy: &Policy,
    identity: &Identity,
    resource: &str,
    verb: &str,
    locks: &[ActiveLock],
    now: u64,
) -> Result<(), Denied> {
    let refuse = |kind: DeniedKind, message: String| Denied { kind, message };
    if now < identity.not_before {
        return Err(refuse(
            DeniedKind::NotYetValid,
            format!(
                "certificate is not valid until {} (unix time); check this machine's clock",
                identity.not_before
            ),
        ));
    }
    if now >= identity.expires {
        return Err(refuse(
            DeniedKind::Expired,
            format!(
                "certificate expired at {} (unix time); run `jaunt login` again",
                identity.expires
            ),
        ));
    }
    if let Some(lock) = locks.iter().find(|lock| {
        lock.in_force(now)
            && match lock.target() {
                LockRef::User(user) => identity.name == user,
                LockRef::Role(role) => identity.roles.iter().any(|held| held == role),
                LockRef::Node(_) | LockRef::Login(_) => false,
            }
    }) {
        return Err(refuse(
            DeniedKind::Locked {
                lock: lock.name.clone(),
            },
            format!(
                "locked by lock {} ({}): {}",
                Shown(&lock.name),
                lock.target,
                Shown(&lock.message)
            ),
        ));
    }
    let matches = |rules: &[crate::resource::Rule]| {
        rules.iter().any(|rule| {
            rule.resources
                .iter()
                .any(|r| r == WILDCARD || r == resource)
                && rule.verbs.iter().any(|v| v == WILDCARD || v == verb)
        })
    };
    let roles: Vec<&CompiledRole> = identity
        .roles
        .iter()
        .filter_map(|name| policy.roles.get(name.as_str()))
        .collect();
    if let Some(role) = roles.iter().find(|r| matches(&r.deny_rules)) {
        return Err(refuse(
            DeniedKind::DeniedByRole {
                role: role.name.clone(),
            },
            format!(
                "access denied: role {} denies {verb} on {resource}",
                role.name
            ),
        ));
    }
    if !roles.iter().any(|r| matches(&r.allow_rules)) {
        return Err(refuse(
            DeniedKind::NotAllowed,
            format!(
                "access denied: none of your roles ({}) allows {verb} on {resource}",
                identity.roles.join(", ")
            ),
        ));
    }
    Ok(())
}

/// Whether `lock` is in force at `now` and names this connection: its user, one of its roles,
/// its node (node resources only) or its requested login. The engine also calls this when a
/// lock arrives, for every live session, to close the matching ones.
pub fn lock_matches(
    lock: &ActiveLock,
    identity: &Identity,
    resource: &Resource,
    request: &Request,
    now: u64,
) -> bool {
    lock.in_force(now) && lock.target().matches(identity, resource, request)
}

impl ResourceKind {
    /// The word messages use: `node`, `app`, `db`, `tcp app`.
    pub fn noun(self) -> &'static str {
        match self {
            ResourceKind::Node => "node",
            ResourceKind::App => "app",
            ResourceKind::Db => "db",
            ResourceKind::Tcp => "tcp app",
        }
    }

    /// The role key whose selector applies to this kind.
    pub fn labels_key(self) -> &'static str {
        match self {
            ResourceKind::Node => "node_labels",
            ResourceKind::App | ResourceKind::Tcp => "app_labels",
            ResourceKind::Db => "db_labels",
        }
    }
}

impl<'a> Request<'a> {
    /// An SSH request as `login`.
    pub fn ssh(login: &'a str) -> Self {
        Request {
            login: Some(login),
            ..Request::default()
        }
    }

    /// A database request as `db_user`, to `db_name` if given.
    pub fn db(db_user: &'a str, db_name: Option<&'a str>) -> Self {
        Request {
            db_user: Some(db_user),
            db_name,
            ..Request::default()
        }
    }
}

impl Decision {
    /// When the session must end (unix seconds), if a role asks for it.
    pub fn session_deadline(&self) -> Option<u64> {
        self.disconnect_expired_cert.then_some(self.expires)
    }
}

impl DeniedKind {
    /// A stable label for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            DeniedKind::NoRole => "no_role",
            DeniedKind::DeniedByRole { .. } => "denied_by_role",
            DeniedKind::NotAllowed => "not_allowed",
            DeniedKind::Locked { .. } => "locked",
            DeniedKind::Expired => "expired",
            DeniedKind::NotYetValid => "not_yet_valid",
        }
    }
}

impl Policy {
    /// Compiles `roles`. Any role that cannot be compiled fails the whole set: dropping one
    /// would silently drop its `deny` rules and so grant more, never less.
    pub fn compile(roles: &[Role]) -> Result<Policy, PolicyError> {
        let mut compiled = HashMap::with_capacity(roles.len());
        for role in roles {
            let name = role.metadata.name.clone();
            if compiled
                .insert(name.clone(), CompiledRole::compile(role)?)
                .is_some()
            {
                return Err(PolicyError::DuplicateRole { role: name });
            }
        }
        Ok(Policy { roles: compiled })
    }

    /// Compiles roles kept as JSON documents by name (what control stores and what the engine's
    /// snapshot carries: `serde_json::to_value(&role)`). Each key must be its role's name.
    pub fn compile_json(
        roles: &BTreeMap<String, serde_json::Value>,
    ) -> Result<Policy, PolicyError> {
        let parsed = roles
            .iter()
            .map(|(name, value)| {
                let role = Role::deserialize(value).map_err(|e| PolicyError::BadDocument {
                    role: name.clone(),
                    reason: e.to_string(),
                })?;
                if role.metadata.name != *name {
                    return Err(PolicyError::BadDocument {
                        role: name.clone(),
                        reason: format!("stored under the name of role {}", role.metadata.name),
                    });
                }
                Ok(role)
            })
            .collect::<Result<Vec<Role>, PolicyError>>()?;
        Policy::compile(&parsed)
    }

    /// Whether a role of this name is in the policy.
    pub fn contains(&self, role: &str) -> bool {
        self.roles.contains_key(role)
    }

    pub fn len(&self) -> usize {
        self.roles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.roles.is_empty()
    }
}

impl<'a> LockRef<'a> {
    /// Whether the target names this connection (expiry aside).
    pub fn matches(self, identity: &Identity, resource: &Resource, request: &Request) -> bool {
        match self {
            LockRef::User(user) => identity.name == user,
            LockRef::Role(role) => identity.roles.iter().any(|held| held == role),
            LockRef::Node(node) => resource.kind == ResourceKind::Node && resource.name == node,
            // Whatever the resource kind: a login that reaches a lock check is refused.
            LockRef::Login(login) => request.login == Some(login),
        }
    }
}

impl<'a> From<&'a LockTarget> for LockRef<'a> {
    fn from(target: &'a LockTarget) -> Self {
        match target {
            LockTarget::User(user) => LockRef::User(user),
            LockTarget::Role(role) => LockRef::Role(role),
            LockTarget::Node(node) => LockRef::Node(node),
            LockTarget::Login(login) => LockRef::Login(login),
        }
    }
}

impl ActiveLock {
    /// The lock resource `lock` as held by engine and agent. `expires` is when control says it
    /// lifts (from its `ttl` and creation time); `metadata.expires`, if earlier, wins.
    pub fn from_lock(lock: &Lock, expires: Option<u64>) -> ActiveLock {
        let written = lock
            .metadata
            .expires_unix_secs()
            .map(|secs| u64::try_from(secs).unwrap_or(0));
        let expires = match (expires, written) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        ActiveLock {
            name: lock.metadata.name.clone(),
            target: lock.spec.target.clone(),
            message: lock
                .spec
                .message
                .clone()
                .unwrap_or_else(|| DEFAULT_LOCK_MESSAGE.to_string()),
            expires,
        }
    }

    /// In force at `now`: not yet lifted (a lock expiring at `now` no longer holds).
    pub fn in_force(&self, now: u64) -> bool {
        self.expires.is_none_or(|expires| now < expires)
    }

    pub fn target(&self) -> LockRef<'_> {
        LockRef::from(&self.target)
    }
}

// ---- compiled roles ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct CompiledRole {
    name: String,
    options: Options,
    allow: Conditions,
    deny: Conditions,
    /// The role's `rules` (admin verbs on cluster resources), for [`authorize_rule`].
    allow_rules: Vec<crate::resource::Rule>,
    deny_rules: Vec<crate::resource::Rule>,
}

/// The options [`authorize`] combines.
#[derive(Debug, Clone, Copy)]
struct Options {
    idle_timeout: Option<Duration>,
    disconnect_expired_cert: Option<bool>,
    permit_port_forwarding: Option<bool>,
    permit_agent_forwarding: Option<bool>,
    record_session: Option<RecordSession>,
    record_input: Option<bool>,
}

#[derive(Debug, Clone)]
struct Conditions {
    node_labels: Selector,
    app_labels: Selector,
    db_labels: Selector,
    logins: Principals,
    db_users: Principals,
    db_names: Principals,
}

/// A label selector. `keys: None` is the empty selector (matches nothing); `Some(empty)` is
/// `'*': '*'` alone (matches everything).
#[derive(Debug, Clone)]
struct Selector {
    keys: Option<Vec<KeyMatcher>>,
    /// As written, for messages: `env=[prod, staging], team=web`.
    written: String,
}

#[derive(Debug, Clone)]
struct KeyMatcher {
    key: String,
    values: Vec<ValueMatcher>,
}

#[derive(Debug, Clone)]
enum ValueMatcher {
    Any,
    Exact(String),
    Regex(Regex),
}

#[derive(Debug, Clone)]
struct Principals {
    matchers: Vec<Principal>,
    /// As written, for messages: `[root, {{internal.logins}}]`.
    written: String,
}

#[derive(Debug, Clone)]
enum Principal {
    Any,
    Literal(String),
    Trait {
        name: String,
        /// For `{{internal.logins}}` and its kin: the certificate field used when the identity
        /// has no trait of that name.
        fallback: Option<Fallback>,
    },
}

#[derive(Debug, Clone, Copy)]
enum Fallback {
    Logins,
    DbUsers,
    DbNames,
}

/// Which part of a role's `deny` matched.
#[derive(Debug, Clone, Copy)]
enum DenyRule {
    Labels,
    Logins,
    DbUsers,
    DbNames,
}

/// The principals of a request that matter for its resource kind, empty strings dropped.
#[derive(Debug, Clone, Copy)]
struct Wanted<'a> {
    login: Option<&'a str>,
    db_user: Option<&'a str>,
    db_name: Option<&'a str>,
}

/// Options combined across roles.
#[derive(Debug, Default)]
struct Combined {
    idle_timeout: Option<Duration>,
    disconnect_expired_cert: bool,
    port_forwarding_yes: bool,
    port_forwarding_no: bool,
    agent_forwarding_yes: bool,
    agent_forwarding_no: bool,
    record_session: RecordSession,
    record_input: bool,
}

impl CompiledRole {
    fn compile(role: &Role) -> Result<CompiledRole, PolicyError> {
        let name = role.metadata.name.as_str();
        let options = &role.spec.options;
        Ok(CompiledRole {
            name: name.to_string(),
            options: Options {
                idle_timeout: options.client_idle_timeout.map(|d| d.as_std()),
                disconnect_expired_cert: options.disconnect_expired_cert,
                permit_port_forwarding: options.permit_port_forwarding,
                permit_agent_forwarding: options.permit_agent_forwarding,
                record_session: options.record_session,
                record_input: options.record_input,
            },
            allow: Conditions::compile(name, "spec.allow", &role.spec.allow)?,
            deny: Conditions::compile(name, "spec.deny", &role.spec.deny)?,
            allow_rules: role.spec.allow.rules.clone(),
            deny_rules: role.spec.deny.rules.clone(),
        })
    }
}

impl Conditions {
    fn compile(role: &str, at: &str, written: &RoleConditions) -> Result<Conditions, PolicyError> {
        let selector =
            |key: &str, labels: &Labels| Selector::compile(role, &format!("{at}.{key}"), labels);
        let principals = |key: &str, values: &[String]| {
            Principals::compile(role, &format!("{at}.{key}"), values)
        };
        Ok(Conditions {
            node_labels: selector("node_labels", &written.node_labels)?,
            app_labels: selector("app_labels", &written.app_labels)?,
            db_labels: selector("db_labels", &written.db_labels)?,
            logins: principals("logins", &written.logins)?,
            db_users: principals("db_users", &written.db_users)?,
            db_names: principals("db_names", &written.db_names)?,
        })
    }

    fn selector(&self, kind: ResourceKind) -> &Selector {
        match kind {
            ResourceKind::Node => &self.node_labels,
            ResourceKind::App | ResourceKind::Tcp => &self.app_labels,
            ResourceKind::Db => &self.db_labels,
        }
    }

    /// As a `deny`: what refuses the request, if anything (labels alone or a principal alone).
    fn refusal(
        &self,
        identity: &Identity,
        resource: &Resource,
        wanted: &Wanted,
    ) -> Option<DenyRule> {
        if self.selector(resource.kind).matches(resource.labels) {
            return Some(DenyRule::Labels);
        }
        let hit = |principals: &Principals, value: Option<&str>| {
            value.is_some_and(|value| principals.matches(identity, value))
        };
        match resource.kind {
            ResourceKind::Node if hit(&self.logins, wanted.login) => Some(DenyRule::Logins),
            ResourceKind::Db if hit(&self.db_users, wanted.db_user) => Some(DenyRule::DbUsers),
            ResourceKind::Db if hit(&self.db_names, wanted.db_name) => Some(DenyRule::DbNames),
            _ => None,
        }
    }

    /// As an `allow`: whether this one role grants the labels and every requested principal.
    fn permits(&self, identity: &Identity, resource: &Resource, wanted: &Wanted) -> bool {
        if !self.selector(resource.kind).matches(resource.labels) {
            return false;
        }
        match resource.kind {
            ResourceKind::Node => wanted
                .login
                .is_some_and(|login| self.logins.matches(identity, login)),
            ResourceKind::Db => {
                wanted
                    .db_user
                    .is_some_and(|user| self.db_users.matches(identity, user))
                    && wanted
                        .db_name
                        .is_none_or(|name| self.db_names.matches(identity, name))
            }
            ResourceKind::App | ResourceKind::Tcp => true,
        }
    }
}

impl Selector {
    fn compile(role: &str, at: &str, labels: &Labels) -> Result<Selector, PolicyError> {
        let written = labels
            .0
            .iter()
            .map(|(key, values)| match values.as_slice() {
                [single] => format!("{key}={single}"),
                _ => format!("{key}=[{}]", values.join(", ")),
            })
            .collect::<Vec<_>>()
            .join(", ");
        if labels.0.is_empty() {
            return Ok(Selector {
                keys: None,
                written,
            });
        }
        let mut keys = Vec::with_capacity(labels.0.len());
        for (key, values) in &labels.0 {
            let path = format!("{at}.{key}");
            if key == WILDCARD {
                if values.is_empty() || values.iter().any(|value| value != WILDCARD) {
                    return Err(PolicyError::WildcardKey {
                        role: role.to_string(),
                        key: path,
                    });
                }
                continue;
            }
            let values = if values.iter().any(|value| value == WILDCARD) {
                vec![ValueMatcher::Any]
            } else {
                values
                    .iter()
                    .map(|value| ValueMatcher::compile(role, &path, value))
                    .collect::<Result<_, _>>()?
            };
            keys.push(KeyMatcher {
                key: key.clone(),
                values,
            });
        }
        Ok(Selector {
            keys: Some(keys),
            written,
        })
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let Some(keys) = &self.keys else {
            return false;
        };
        keys.iter().all(|matcher| {
            labels
                .get(&matcher.key)
                .is_some_and(|value| matcher.values.iter().any(|m| m.matches(value)))
        })
    }
}

impl ValueMatcher {
    fn compile(role: &str, key: &str, value: &str) -> Result<ValueMatcher, PolicyError> {
        let bad = |reason: String| PolicyError::BadLabelValue {
            role: role.to_string(),
            key: key.to_string(),
            value: value.to_string(),
            reason,
        };
        let regex = |pattern: &str| {
            RegexBuilder::new(pattern)
                .size_limit(REGEX_SIZE_MAX_BYTES)
                .build()
        };
        match (value.starts_with('^'), value.ends_with('$')) {
            (true, true) if value.len() >= 2 => {
                // Parsed alone first: only a pattern that parses by itself has balanced groups,
                // so wrapping it cannot change what the outer anchors apply to. A size limit of
                // zero stops right after parsing (a valid pattern is then "too big"), which
                // halves the cost of compiling a policy.
                if let Err(regex::Error::Syntax(e)) = RegexBuilder::new(value).size_limit(0).build()
                {
                    return Err(bad(format!("not a valid regular expression: {e}")));
                }
                // `^a|b$` is anchored only on one side of each branch; the group anchors both.
                let anchored = regex(&format!("^(?:{value})$"))
                    .map_err(|e| bad(format!("not a valid regular expression: {e}")))?;
                Ok(ValueMatcher::Regex(anchored))
            }
            (false, false) => Ok(ValueMatcher::Exact(value.to_string())),
            _ => Err(bad(
                "a regular expression is written ^...$ (both anchors)".to_string()
            )),
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatcher::Any => true,
            ValueMatcher::Exact(exact) => exact == value,
            ValueMatcher::Regex(regex) => regex.is_match(value),
        }
    }
}

impl Principals {
    fn compile(role: &str, key: &str, values: &[String]) -> Result<Principals, PolicyError> {
        let matchers = values
            .iter()
            .enumerate()
            .map(|(index, value)| {
                Principal::compile(value).ok_or_else(|| PolicyError::BadTrait {
                    role: role.to_string(),
                    key: format!("{key}[{index}]"),
                    value: value.clone(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Principals {
            matchers,
            written: format!("[{}]", values.join(", ")),
        })
    }

    fn matches(&self, identity: &Identity, requested: &str) -> bool {
        self.matchers
            .iter()
            .any(|principal| principal.matches(identity, requested))
    }
}

impl Principal {
    /// `None` for a malformed trait template.
    fn compile(value: &str) -> Option<Principal> {
        if value == WILDCARD {
            return Some(Principal::Any);
        }
        if !value.contains("{{") && !value.contains("}}") {
            return Some(Principal::Literal(value.to_string()));
        }
        let inner = value.strip_prefix("{{")?.strip_suffix("}}")?.trim();
        let (namespace, name) = inner.split_once('.')?;
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !valid_name {
            return None;
        }
        let fallback = match (namespace, name) {
            ("internal", "logins") => Some(Fallback::Logins),
            ("internal", "db_users") => Some(Fallback::DbUsers),
            ("internal", "db_names") => Some(Fallback::DbNames),
            ("internal" | "external", _) => None,
            _ => return None,
        };
        Some(Principal::Trait {
            name: name.to_string(),
            fallback,
        })
    }

    fn matches(&self, identity: &Identity, requested: &str) -> bool {
        match self {
            Principal::Any => true,
            Principal::Literal(literal) => literal == requested,
            Principal::Trait { name, fallback } => {
                let values = match (identity.traits.get(name), fallback) {
                    (Some(values), _) => values.as_slice(),
                    (None, Some(Fallback::Logins)) => identity.logins.as_slice(),
                    (None, Some(Fallback::DbUsers)) => identity.db_users.as_slice(),
                    (None, Some(Fallback::DbNames)) => identity.db_names.as_slice(),
                    (None, None) => &[],
                };
                // A trait value is data, never a pattern: `*` in a trait is the text `*`.
                values.iter().any(|value| value == requested)
            }
        }
    }
}

impl DenyRule {
    /// `logins [root]`, `node_labels env=prod`.
    fn describe(self, kind: ResourceKind, deny: &Conditions) -> String {
        match self {
            DenyRule::Labels => format!("{} {}", kind.labels_key(), deny.selector(kind).written),
            DenyRule::Logins => format!("logins {}", deny.logins.written),
            DenyRule::DbUsers => format!("db_users {}", deny.db_users.written),
            DenyRule::DbNames => format!("db_names {}", deny.db_names.written),
        }
    }
}

impl<'a> Wanted<'a> {
    fn of(kind: ResourceKind, request: &Request<'a>) -> Wanted<'a> {
        let given = |value: Option<&'a str>| value.filter(|value| !value.is_empty());
        match kind {
            ResourceKind::Node => Wanted {
                login: given(request.login),
                db_user: None,
                db_name: None,
            },
            ResourceKind::Db => Wanted {
                login: None,
                db_user: given(request.db_user),
                db_name: given(request.db_name),
            },
            ResourceKind::App | ResourceKind::Tcp => Wanted {
                login: None,
                db_user: None,
                db_name: None,
            },
        }
    }
}

impl Combined {
    fn add(&mut self, options: &Options) {
        if let Some(timeout) = options.idle_timeout {
            self.idle_timeout = Some(self.idle_timeout.map_or(timeout, |t| t.min(timeout)));
        }
        self.disconnect_expired_cert |= options.disconnect_expired_cert == Some(true);
        match options.permit_port_forwarding {
            Some(true) => self.port_forwarding_yes = true,
            Some(false) => self.port_forwarding_no = true,
            None => {}
        }
        match options.permit_agent_forwarding {
            Some(true) => self.agent_forwarding_yes = true,
            Some(false) => self.agent_forwarding_no = true,
            None => {}
        }
        if let Some(mode) = options.record_session {
            self.record_session = self.record_session.max(mode);
        }
        self.record_input |= options.record_input == Some(true);
    }

    fn decision(&self, identity: &Identity) -> Decision {
        Decision {
            idle_timeout: self.idle_timeout,
            disconnect_expired_cert: self.disconnect_expired_cert,
            expires: identity.expires,
            permit_port_forwarding: self.port_forwarding_yes && !self.port_forwarding_no,
            permit_agent_forwarding: self.agent_forwarding_yes && !self.agent_forwarding_no,
            record_session: self.record_session,
            record_input: self.record_input,
        }
    }
}

// ---- messages ---------------------------------------------------------------------------------

/// Text from a certificate, an agent or a client, made safe for one line of a message: control
/// characters escaped, at most [`MESSAGE_TEXT_MAX`] characters.
struct Shown<'a>(&'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, c) in self.0.chars().enumerate() {
            if index == MESSAGE_TEXT_MAX {
                return f.write_char('…');
            }
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// `access denied to node web1 as root`.
struct Subject<'r, 'w, 'a>(&'r Resource<'r>, &'w Wanted<'a>);

impl fmt::Display for Subject<'_, '_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Subject(resource, wanted) = self;
        write!(
            f,
            "access denied to {} {}",
            resource.kind.noun(),
            Shown(resource.name)
        )?;
        if let Some(login) = wanted.login {
            write!(f, " as {}", Shown(login))?;
        }
        if let Some(user) = wanted.db_user {
            write!(f, " as {}", Shown(user))?;
        }
        if let Some(name) = wanted.db_name {
            write!(f, " (database {})", Shown(name))?;
        }
        Ok(())
    }
}

/// `login root on node web1`, `db user bob and db name app on db pg1`, `access to app grafana`.
struct Wish<'r, 'w, 'a>(&'r Resource<'r>, &'w Wanted<'a>);

impl fmt::Display for Wish<'_, '_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Wish(resource, wanted) = self;
        match (wanted.login, wanted.db_user, wanted.db_name) {
            (Some(login), _, _) => write!(f, "login {} on ", Shown(login))?,
            (None, Some(user), Some(name)) => {
                write!(f, "db user {} and db name {} on ", Shown(user), Shown(name))?
            }
            (None, Some(user), None) => write!(f, "db user {} on ", Shown(user))?,
            _ => f.write_str("access to ")?,
        }
        write!(f, "{} {}", resource.kind.noun(), Shown(resource.name))
    }
}

/// `env=prod, team=web` or `none`, at most [`MESSAGE_ITEMS_MAX`] of them.
struct LabelList<'a>(&'a BTreeMap<String, String>);

impl fmt::Display for LabelList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (index, (key, value)) in self.0.iter().enumerate() {
            if index == MESSAGE_ITEMS_MAX {
                return write!(f, ", … {} more", self.0.len() - index);
            }
            let comma = if index == 0 { "" } else { ", " };
            write!(f, "{comma}{}={}", Shown(key), Shown(value))?;
        }
        Ok(())
    }
}

/// The identity's roles, unknown ones marked: `access, dev, ghost (unknown)`.
struct RoleList<'a>(&'a Policy, &'a Identity);

impl fmt::Display for RoleList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let RoleList(policy, identity) = self;
        for (index, role) in identity.roles.iter().enumerate() {
            if index == MESSAGE_ITEMS_MAX {
                return write!(f, ", … {} more", identity.roles.len() - index);
            }
            let comma = if index == 0 { "" } else { ", " };
            let unknown = if policy.contains(role) {
                ""
            } else {
                " (unknown)"
            };
            write!(f, "{comma}{}{unknown}", Shown(role))?;
        }
        Ok(())
    }
}

struct NoRoleReason<'a>(&'a Identity);

impl fmt::Display for NoRoleReason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let roles = &self.0.roles;
        if roles.is_empty() {
            return f.write_str("the certificate carries no roles");
        }
        f.write_str("none of the certificate's roles exists (")?;
        for (index, role) in roles.iter().take(MESSAGE_ITEMS_MAX).enumerate() {
            let comma = if index == 0 { "" } else { ", " };
            write!(f, "{comma}{}", Shown(role))?;
        }
        if roles.len() > MESSAGE_ITEMS_MAX {
            write!(f, ", … {} more", roles.len() - MESSAGE_ITEMS_MAX)?;
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::identity::IdentityKind;
    use crate::resource::{parse_resources, Metadata, Resource as Doc};

    fn roles(yaml: &str) -> Vec<Role> {
        parse_resources("roles.yaml", yaml)
            .unwrap()
            .into_iter()
            .map(|doc| match doc {
                Doc::Role(role) => role,
                other => panic!("not a role: {other:?}"),
            })
            .collect()
    }

    fn role(name: &str, allow: RoleConditions, deny: RoleConditions) -> Role {
        Role {
            metadata: Metadata::named(name),
            spec: crate::resource::RoleSpec {
                allow,
                deny,
                ..Default::default()
            },
        }
    }

    fn labels(pairs: &[(&str, &[&str])]) -> Labels {
        Labels(
            pairs
                .iter()
                .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.to_string()).collect()))
                .collect(),
        )
    }

    fn identity(roles: &[&str]) -> Identity {
        Identity {
            kind: IdentityKind::User,
            name: "alice".into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            logins: vec!["alice".into()],
            db_users: vec!["alice".into()],
            db_names: vec!["app".into()],
            traits: BTreeMap::new(),
            cluster: "test".into(),
            not_before: 100,
            expires: 200,
            permit_pty: false,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
        }
    }

    fn node_labels(policy_labels: Labels, value: &str) -> bool {
        let policy = Policy::compile(&[role(
            "r",
            RoleConditions {
                logins: vec!["*".into()],
                node_labels: policy_labels,
                ..Default::default()
            },
            RoleConditions::default(),
        )])
        .unwrap();
        let labels = BTreeMap::from([("env".to_string(), value.to_string())]);
        let resource = Resource {
            kind: ResourceKind::Node,
            name: "n",
            labels: &labels,
        };
        authorize(
            &policy,
            &identity(&["r"]),
            &resource,
            &Request::ssh("x"),
            &[],
            150,
        )
        .is_ok()
    }

    #[test]
    fn regexes_match_the_whole_value() {
        let re = |pattern: &str| labels(&[("env", &[pattern])]);
        assert!(node_labels(re("^prod-[0-9]+$"), "prod-12"));
        assert!(!node_labels(re("^prod-[0-9]+$"), "prod-12x"));
        assert!(!node_labels(re("^prod-[0-9]+$"), "xprod-12"));
        // Each branch of an alternation is anchored at both ends.
        assert!(node_labels(re("^a|b$"), "a"));
        assert!(!node_labels(re("^a|b$"), "ab"));
        assert!(!node_labels(re("^a|b$"), "xb"));
        // An escaped dollar is text, and the value still ends there.
        assert!(node_labels(re(r"^cost\$$"), "cost$"));
        assert!(!node_labels(re(r"^cost\$$"), "cost$$"));
        // Text that looks like a pattern but is not anchored is exact.
        assert!(node_labels(re("prod.*"), "prod.*"));
        assert!(!node_labels(re("prod.*"), "production"));
    }

    #[test]
    fn bad_selectors_name_role_and_key() {
        let bad = |selector: Labels| {
            Policy::compile(&[role(
                "ops",
                RoleConditions::default(),
                RoleConditions {
                    node_labels: selector,
                    ..Default::default()
                },
            )])
            .unwrap_err()
        };
        let err = bad(labels(&[("env", &["^prod-[$"])]));
        assert!(matches!(err, PolicyError::BadLabelValue { .. }));
        assert!(
            err.to_string()
                .starts_with("role ops: spec.deny.node_labels.env: \"^prod-[$\": not a valid"),
            "{err}"
        );
        // Unbalanced groups must not escape the anchoring group.
        assert!(matches!(
            bad(labels(&[("env", &["^a)|(b$"])])),
            PolicyError::BadLabelValue { .. }
        ));
        assert!(matches!(
            bad(labels(&[("env", &["^prod"])])),
            PolicyError::BadLabelValue { reason, .. } if reason.contains("both anchors")
        ));
        assert_eq!(
            bad(labels(&[("*", &["prod"])])),
            PolicyError::WildcardKey {
                role: "ops".into(),
                key: "spec.deny.node_labels.*".into()
            }
        );
    }

    #[test]
    fn rules_allow_admin_verbs_deny_wins_and_locks_and_validity_apply() {
        let policy = Policy::compile(&roles(
            "kind: role\nversion: v1\nmetadata: {name: watcher}\nspec:\n  allow:\n    rules:\n    \
             - resources: [session]\n      verbs: [list, join]\n---\nkind: role\nversion: v1\n\
             metadata: {name: nojoin}\nspec:\n  deny:\n    rules:\n    - resources: ['*']\n      \
             verbs: [join]\n---\nkind: role\nversion: v1\nmetadata: {name: plain}\nspec: {}\n",
        ))
        .unwrap();
        let check = |roles: &[&str], verb: &str, now: u64| {
            authorize_rule(&policy, &identity(roles), "session", verb, &[], now)
        };
        check(&["watcher"], "join", 150).unwrap();
        let none = check(&["plain"], "join", 150).unwrap_err();
        assert_eq!(none.kind, DeniedKind::NotAllowed);
        assert!(
            none.message
                .contains("none of your roles (plain) allows join on session"),
            "{}",
            none.message
        );
        assert!(check(&["watcher"], "delete", 150).is_err());
        assert!(matches!(
            check(&["watcher", "nojoin"], "join", 150).unwrap_err().kind,
            DeniedKind::DeniedByRole { .. }
        ));
        assert_eq!(
            check(&["watcher"], "join", 200).unwrap_err().kind,
            DeniedKind::Expired
        );
        let lock = ActiveLock::from_lock(
            &crate::resource::Lock {
                metadata: Metadata::named("l1"),
                spec: crate::resource::LockSpec {
                    target: LockTarget::User("alice".into()),
                    message: Some("incident".into()),
                    ttl: None,
                },
            },
            None,
        );
        let locked = authorize_rule(
            &policy,
            &identity(&["watcher"]),
            "session",
            "join",
            &[lock],
            150,
        )
        .unwrap_err();
        assert!(
            matches!(locked.kind, DeniedKind::Locked { .. }),
            "{locked:?}"
        );
    }

    #[test]
    fn oversized_regex_is_refused() {
        let huge = format!("^(?:{})$", vec!["[a-z]{50}"; 400].join("|"));
        assert!(matches!(
            Policy::compile(&[role(
                "big",
                RoleConditions {
                    app_labels: labels(&[("x", &[huge.as_str()])]),
                    ..Default::default()
                },
                RoleConditions::default()
            )]),
            Err(PolicyError::BadLabelValue { .. })
        ));
    }

    #[test]
    fn bad_traits_and_duplicates_are_refused() {
        let with_login = |login: &str| {
            Policy::compile(&[role(
                "t",
                RoleConditions {
                    logins: vec!["root".into(), login.into()],
                    ..Default::default()
                },
                RoleConditions::default(),
            )])
        };
        for bad in [
            "{{logins}}",
            "{{internal.}}",
            "{{magic.logins}}",
            "{{internal.logins",
            "x{{a.b}}",
        ] {
            assert_eq!(
                with_login(bad).unwrap_err(),
                PolicyError::BadTrait {
                    role: "t".into(),
                    key: "spec.allow.logins[1]".into(),
                    value: bad.into()
                },
                "{bad}"
            );
        }
        assert!(with_login("{{ external.unix_groups }}").is_ok());
        let twice = [Role::builtin_access(), Role::builtin_access()];
        assert_eq!(
            Policy::compile(&twice).unwrap_err(),
            PolicyError::DuplicateRole {
                role: "access".into()
            }
        );
    }

    #[test]
    fn internal_traits_fall_back_to_certificate_fields_external_do_not() {
        let id = |traits: &[(&str, &[&str])]| {
            let mut id = identity(&[]);
            id.traits = traits
                .iter()
                .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.to_string()).collect()))
                .collect();
            id
        };
        let internal = Principal::compile("{{internal.logins}}").unwrap();
        let external = Principal::compile("{{external.logins}}").unwrap();
        assert!(internal.matches(&id(&[]), "alice"));
        assert!(!external.matches(&id(&[]), "alice"));
        // A trait that is present replaces the certificate's list, even when empty.
        assert!(!internal.matches(&id(&[("logins", &["bob"])]), "alice"));
        assert!(internal.matches(&id(&[("logins", &["bob"])]), "bob"));
        assert!(!internal.matches(&id(&[("logins", &[])]), "alice"));
        // A `*` inside a trait is a value, not a wildcard.
        assert!(!external.matches(&id(&[("logins", &["*"])]), "root"));
        let db_names = Principal::compile("{{internal.db_names}}").unwrap();
        assert!(db_names.matches(&id(&[]), "app"));
    }

    #[test]
    fn empty_principals_count_as_missing() {
        let policy = Policy::compile(&[Role::builtin_access()]).unwrap();
        let labels = BTreeMap::new();
        let node = Resource {
            kind: ResourceKind::Node,
            name: "web1",
            labels: &labels,
        };
        let mut id = identity(&["access"]);
        id.logins.push(String::new());
        let denied = authorize(&policy, &id, &node, &Request::ssh(""), &[], 150).unwrap_err();
        assert_eq!(denied.kind, DeniedKind::NotAllowed);
        assert_eq!(
            denied.message,
            "access denied to node web1: an SSH login is required"
        );
        let db = Resource {
            kind: ResourceKind::Db,
            ..node
        };
        let denied = authorize(&policy, &id, &db, &Request::db("", None), &[], 150).unwrap_err();
        assert!(denied.message.ends_with("a database user is required"));
        // An empty db name is no db name: the user alone decides.
        assert!(authorize(&policy, &id, &db, &Request::db("alice", Some("")), &[], 150).is_ok());
    }

    #[test]
    fn messages_escape_and_bound_what_others_wrote() {
        let policy = Policy::compile(&[Role::builtin_editor()]).unwrap();
        let many: BTreeMap<String, String> = (0..40)
            .map(|i| (format!("k{i:02}"), "v".to_string()))
            .collect();
        let long = "x".repeat(1000);
        let node = Resource {
            kind: ResourceKind::Node,
            name: "web\n1",
            labels: &many,
        };
        let denied = authorize(
            &policy,
            &identity(&["editor"]),
            &node,
            &Request::ssh(&long),
            &[],
            150,
        )
        .unwrap_err();
        assert!(!denied.message.contains('\n'));
        assert!(denied
            .message
            .starts_with("access denied to node web\\n1 as xxx"));
        assert!(denied.message.contains("… 24 more"), "{}", denied.message);
        assert!(denied.message.len() < 2000, "{}", denied.message.len());
    }

    #[test]
    fn roles_compile_from_their_json_documents() {
        let access = Role::builtin_access();
        let mut stored =
            BTreeMap::from([("access".to_string(), serde_json::to_value(&access).unwrap())]);
        let policy = Policy::compile_json(&stored).unwrap();
        assert!(policy.contains("access") && policy.len() == 1);
        stored.insert("renamed".into(), serde_json::to_value(&access).unwrap());
        assert!(matches!(
            Policy::compile_json(&stored),
            Err(PolicyError::BadDocument { role, .. }) if role == "renamed"
        ));
        stored.remove("renamed");
        stored.insert("junk".into(), serde_json::json!({"kind": "role"}));
        assert!(matches!(
            Policy::compile_json(&stored),
            Err(PolicyError::BadDocument { role, .. }) if role == "junk"
        ));
    }

    #[test]
    fn wildcard_key_with_other_keys_still_checks_them() {
        let policy = Policy::compile(&roles(
            "kind: role\nversion: v1\nmetadata: {name: r}\nspec:\n  allow:\n    logins: [x]\n    node_labels: {'*': '*', env: prod}\n",
        ))
        .unwrap();
        let check = |pairs: &[(&str, &str)]| {
            let labels: BTreeMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let node = Resource {
                kind: ResourceKind::Node,
                name: "n",
                labels: &labels,
            };
            authorize(
                &policy,
                &identity(&["r"]),
                &node,
                &Request::ssh("x"),
                &[],
                150,
            )
            .is_ok()
        };
        assert!(check(&[("env", "prod")]));
        assert!(!check(&[("env", "dev")]));
        assert!(!check(&[]));
    }

    #[test]
    fn lock_expiry_and_targets() {
        let mut lock = ActiveLock {
            name: "l1".into(),
            target: LockTarget::Login("root".into()),
            message: "m".into(),
            expires: Some(150),
        };
        assert!(lock.in_force(149) && !lock.in_force(150));
        lock.expires = None;
        assert!(lock.in_force(u64::MAX));
        let labels = BTreeMap::new();
        let db = Resource {
            kind: ResourceKind::Db,
            name: "root",
            labels: &labels,
        };
        let id = identity(&["access"]);
        assert!(!lock_matches(
            &lock,
            &id,
            &db,
            &Request::db("root", None),
            100
        ));
        assert!(lock_matches(&lock, &id, &db, &Request::ssh("root"), 100));
        lock.target = LockTarget::Node("root".into());
        assert!(!lock_matches(
            &lock,
            &id,
            &db,
            &Request::db("root", None),
            100
        ));
    }

    #[test]
    fn lock_from_resource_takes_the_earlier_expiry() {
        let mut lock = Lock {
            metadata: Metadata::named("maint"),
            spec: crate::resource::LockSpec {
                target: LockTarget::User("bob".into()),
                message: None,
                ttl: None,
            },
        };
        let active = ActiveLock::from_lock(&lock, Some(5_000_000_000));
        assert_eq!(active.message, DEFAULT_LOCK_MESSAGE);
        assert_eq!(active.expires, Some(5_000_000_000));
        assert_eq!(active.target(), LockRef::User("bob"));
        lock.metadata.expires = Some("2030-01-01T00:00:00Z".into());
        assert_eq!(
            ActiveLock::from_lock(&lock, Some(5_000_000_000)).expires,
            Some(1_893_456_000)
        );
        assert_eq!(
            ActiveLock::from_lock(&lock, None).expires,
            Some(1_893_456_000)
        );
    }

    #[test]
    fn clones_decide_alike() {
        let policy = Policy::compile(&roles(
            "kind: role\nversion: v1\nmetadata: {name: r}\nspec:\n  allow:\n    app_labels: {tier: '^front(end)?$'}\n",
        ))
        .unwrap();
        let copy = policy.clone();
        let labels = BTreeMap::from([("tier".to_string(), "front".to_string())]);
        let app = Resource {
            kind: ResourceKind::App,
            name: "grafana",
            labels: &labels,
        };
        let id = identity(&["r"]);
        let a = authorize(&policy, &id, &app, &Request::default(), &[], 150);
        let b = authorize(&copy, &id, &app, &Request::default(), &[], 150);
        assert_eq!(a, b);
        assert!(a.is_ok());
    }

    #[test]
    fn recording_options_take_the_strictest_and_any_input() {
        let policy = Policy::compile(&roles(
            "kind: role\nversion: v1\nmetadata: {name: open}\nspec:\n  options: {record_session: off}\n  allow: {logins: ['*'], node_labels: {'*': '*'}}\n\
             ---\nkind: role\nversion: v1\nmetadata: {name: careful}\nspec:\n  options: {record_session: best_effort, record_input: true}\n\
             ---\nkind: role\nversion: v1\nmetadata: {name: audited}\nspec:\n  options: {record_session: strict, record_input: false}\n\
             ---\nkind: role\nversion: v1\nmetadata: {name: plain}\nspec:\n  allow: {logins: ['*'], node_labels: {'*': '*'}}\n",
        ))
        .unwrap();
        let labels = BTreeMap::new();
        let node = Resource {
            kind: ResourceKind::Node,
            name: "n1",
            labels: &labels,
        };
        let decide = |roles: &[&str]| {
            authorize(
                &policy,
                &identity(roles),
                &node,
                &Request::ssh("alice"),
                &[],
                150,
            )
            .map(|d| (d.record_session, d.record_input))
            .unwrap()
        };
        assert_eq!(decide(&["plain"]), (RecordSession::Off, false));
        assert_eq!(decide(&["open"]), (RecordSession::Off, false));
        assert_eq!(
            decide(&["open", "careful"]),
            (RecordSession::BestEffort, true)
        );
        assert_eq!(
            decide(&["careful", "audited", "open"]),
            (RecordSession::Strict, true)
        );
        assert_eq!(
            decide(&["plain", "audited"]),
            (RecordSession::Strict, false)
        );
        assert_eq!(
            Role::builtin_access().spec.options.record_session,
            Some(RecordSession::BestEffort)
        );
        let bad = parse_resources(
            "r.yaml",
            "kind: role\nversion: v1\nmetadata: {name: r}\nspec:\n  options:\n    record_session: always\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            bad.contains("r.yaml:6") && bad.contains("record_session"),
            "{bad}"
        );
    }
}
