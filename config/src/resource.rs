//! Dynamic resources in Teleport-like YAML: roles, users, join tokens and locks.
//!
//! Every document has `kind`, `version` (`v1`), `metadata` (`name`, optional `description`,
//! `labels`, `expires`) and `spec`. [`parse_resources`] reads a `---`-separated file into
//! [`Resource`]s with errors that name file, line and key; `Serialize` prints them back in the
//! same shape (what `jaunt get roles --format yaml` shows), and that output parses again.
//!
//! Layers: the document wrapper and `metadata` have serde-facing forms (`FileDoc`,
//! [`FileMetadata`]: a token's name may be absent) validated into [`Metadata`]; a spec whose YAML
//! shape is already its runtime shape ([`RoleSpec`], [`UserSpec`]) is used directly, with
//! `deny_unknown_fields`, and checked after deserialization.
//!
//! Reading is three passes over the text (syntax, then `kind` of each document, then each
//! document as its kind), because an internally tagged serde enum would buffer the document and
//! lose line numbers.
//!
//! Not here: evaluating roles (label matching, trait expansion, combining roles) is the RBAC
//! code's job in control; this module keeps [`Labels`] and trait templates as data.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::duration::Duration;
use crate::yaml::{self, ConfigError, Invalid};

/// The only resource version so far.
pub const RESOURCE_VERSION: &str = "v1";

/// Names end up in DNS-like places and certificate fields; 253 is the DNS name limit.
pub const NAME_LEN_MAX: usize = 253;

/// Long enough to copy a token to a new host and run the join, short enough that a leaked
/// token in a shell history is soon useless.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_mins(30);

/// Name of [`Role::builtin_access`].
pub const BUILTIN_ACCESS_ROLE: &str = "access";
/// Name of [`Role::builtin_editor`].
pub const BUILTIN_EDITOR_ROLE: &str = "editor";

/// Matches any value in labels, rules and db names.
pub const WILDCARD: &str = "*";

/// Resources that role `rules` can name (besides [`WILDCARD`]).
///
/// `session` is the live sessions (`jaunt sessions ls` needs `list`, `jaunt join` needs `join`,
/// `jaunt sessions kill` needs `delete`); `recording` is the stored session recordings
/// (`jaunt recordings ls` needs `list`, `jaunt play` needs `read`).
pub const RULE_RESOURCES: &[&str] = &[
    "user",
    "role",
    "token",
    "lock",
    "node",
    "app",
    "db",
    "audit",
    "ca",
    "session",
    "recording",
];
/// Verbs that role `rules` can name (besides [`WILDCARD`]). `join` is for live sessions
/// (watching one as an observer).
pub const RULE_VERBS: &[&str] = &["list", "read", "create", "update", "delete", "join"];

/// User traits with a meaning of their own; any other trait name is allowed too.
pub const TRAIT_LOGINS: &str = "logins";
pub const TRAIT_DB_USERS: &str = "db_users";
pub const TRAIT_DB_NAMES: &str = "db_names";

/// Reads every resource of a `---`-separated YAML text, in order. Empty documents are skipped.
pub fn parse_resources(file_name: &str, text: &str) -> Result<Vec<Resource>, ConfigError> {
    let probes = yaml::documents::<KindProbe>(file_name, text)?;
    let mut kinds: Vec<Option<Kind>> = Vec::new();
    for probe in &probes {
        let kind = probe
            .value
            .kind()
            .map_err(|invalid| probe.source.invalid(invalid))?;
        let index = probe.source.document;
        if kinds.len() <= index {
            kinds.resize(index + 1, None);
        }
        kinds[index] = Some(kind);
    }
    // The same text passed the syntax check in the first pass.
    let documents = yaml::documents_seeded_checked(file_name, text, |index| {
        DocSeed(kinds.get(index).copied().flatten())
    })?;
    documents
        .into_iter()
        .map(|document| {
            document
                .value
                .validate()
                .map_err(|invalid| document.source.invalid(invalid))
        })
        .collect()
}

/// Prints resources as `---`-separated YAML documents that [`parse_resources`] reads back.
pub fn to_yaml(resources: &[Resource]) -> Result<String, EncodeError> {
    let mut out = String::new();
    for resource in resources {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(resource)?);
    }
    Ok(out)
}

/// Serializing resources to YAML failed (only possible for a bug in a `Serialize` impl).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode resources as YAML: {0}")]
pub struct EncodeError(#[from] serde_yaml_ng::Error);

/// Checks a resource name: 1 to 253 characters of `[A-Za-z0-9._@-]`, not `.` or `..`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a name must not be empty".to_string());
    }
    if name.len() > NAME_LEN_MAX {
        return Err(format!("a name is at most {NAME_LEN_MAX} characters"));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a usable name"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-')))
    {
        return Err(format!(
            "{bad:?} is not allowed in a name (use letters, digits, '.', '_', '@' and '-')"
        ));
    }
    Ok(())
}

// ---- resources -------------------------------------------------------------------------------

/// A dynamic resource of any kind.
// Roles are a few hundred bytes larger than the rest; resources live in control's slow path and
// in snapshots built once, so boxing would cost every match for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    Role(Role),
    User(User),
    Token(Token),
    Lock(Lock),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Role,
    User,
    Token,
    Lock,
}

/// Validated metadata: `name` is always set (a token or lock without one gets a generated name).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Metadata {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// RFC 3339, e.g. `2030-01-01T00:00:00Z`; see [`Metadata::expires_unix_secs`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

/// `metadata` as written (`name` may be absent for tokens and locks).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMetadata {
    pub name: Option<String>,
    pub description: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub expires: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Role {
    pub metadata: Metadata,
    pub spec: RoleSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    #[serde(default, skip_serializing_if = "RoleOptions::is_empty")]
    pub options: RoleOptions,
    #[serde(default, skip_serializing_if = "RoleConditions::is_empty")]
    pub allow: RoleConditions,
    #[serde(default, skip_serializing_if = "RoleConditions::is_empty")]
    pub deny: RoleConditions,
}

/// Role options. `None` is "not set", so that combining roles can tell it from `false`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_session_ttl: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_idle_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnect_expired_cert: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permit_port_forwarding: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permit_agent_forwarding: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permit_pty: Option<bool>,
    /// Whether SSH sessions are recorded (see [`RecordSession`]). Combined over a user's roles,
    /// the strictest set value wins; no role setting it means `off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_session: Option<RecordSession>,
    /// Whether recordings also carry what the user typed (asciicast `i` events). Any role
    /// saying `true` turns it on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_input: Option<bool>,
}

/// The role option `record_session`: whether, and how firmly, SSH sessions are recorded.
/// Ordered from the most lenient to the strictest (`Off < BestEffort < Strict`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum RecordSession {
    /// Not recorded: the SSH bytes are spliced end to end between the user and the node.
    #[default]
    Off,
    /// Recorded; a session whose recording fails goes on, and the failure is counted and
    /// audited.
    BestEffort,
    /// Recorded; a session that cannot be recorded is refused, and a live one whose recording
    /// cannot be written for a while is ended.
    Strict,
}

impl RecordSession {
    /// The word the role option uses: `off`, `best_effort`, `strict`.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordSession::Off => "off",
            RecordSession::BestEffort => "best_effort",
            RecordSession::Strict => "strict",
        }
    }
}

impl fmt::Display for RecordSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a role allows (or denies). Logins, db users and db names may be trait templates such
/// as `{{internal.logins}}` or `{{external.groups}}`, expanded against the user's traits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConditions {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logins: Vec<String>,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub node_labels: Labels,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub app_labels: Labels,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub db_labels: Labels,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub db_users: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub db_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

/// Access to resources of the control API: `verbs` on `resources` ([`RULE_RESOURCES`],
/// [`RULE_VERBS`], or [`WILDCARD`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
}

/// A label selector: label key (or `*`) → accepted values, each exact, `*`, or `^regex$`.
/// Written as `env: prod` or `env: [prod, staging]`. Matching is the RBAC code's job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(pub BTreeMap<String, Vec<String>>);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    pub metadata: Metadata,
    pub spec: UserSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    #[serde(default)]
    pub roles: Vec<String>,
    /// `logins`, `db_users`, `db_names` and any other name → values (a value or a list).
    #[serde(
        default,
        deserialize_with = "deserialize_multi_map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub traits: BTreeMap<String, Vec<String>>,
}

/// A join token; `metadata.name` is the secret itself (generated when not written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub metadata: Metadata,
    pub spec: TokenSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenSpec {
    pub types: Vec<TokenType>,
    pub ttl: Duration,
    pub single_use: bool,
}

/// What a token lets its bearer join as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenType {
    Node,
    App,
    Db,
    Engine,
}

/// Refuses new sessions and closes live ones of its target. `metadata.name` is generated when
/// not written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    pub metadata: Metadata,
    pub spec: LockSpec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockSpec {
    pub target: LockTarget,
    /// Shown to the locked-out user.
    pub message: Option<String>,
    /// The lock lifts itself after this long; `None` means until deleted (or `expires`).
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LockTarget {
    User(String),
    Role(String),
    Node(String),
    Login(String),
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Role(_) => Kind::Role,
            Resource::User(_) => Kind::User,
            Resource::Token(_) => Kind::Token,
            Resource::Lock(_) => Kind::Lock,
        }
    }

    pub fn metadata(&self) -> &Metadata {
        match self {
            Resource::Role(role) => &role.metadata,
            Resource::User(user) => &user.metadata,
            Resource::Token(token) => &token.metadata,
            Resource::Lock(lock) => &lock.metadata,
        }
    }

    pub fn name(&self) -> &str {
        &self.metadata().name
    }
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Role, Kind::User, Kind::Token, Kind::Lock];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Role => "role",
            Kind::User => "user",
            Kind::Token => "token",
            Kind::Lock => "lock",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Metadata {
    pub fn named(name: impl Into<String>) -> Self {
        Metadata {
            name: name.into(),
            ..Metadata::default()
        }
    }

    /// `expires` as seconds since the Unix epoch (validated at parse time, so `None` means
    /// "never").
    pub fn expires_unix_secs(&self) -> Option<i64> {
        self.expires.as_deref().and_then(parse_rfc3339)
    }
}

impl Role {
    /// What ordinary users get: their own logins and db users/names (from traits) on every
    /// node, app and db, for at most 12 hours, with a PTY and port and agent forwarding, their
    /// SSH sessions recorded best-effort.
    pub fn builtin_access() -> Role {
        Role {
            metadata: Metadata {
                description: Some(
                    "Built-in: access to every node, app and db with the user's own logins".into(),
                ),
                ..Metadata::named(BUILTIN_ACCESS_ROLE)
            },
            spec: RoleSpec {
                options: RoleOptions {
                    max_session_ttl: Some(Duration::from_hours(12)),
                    permit_pty: Some(true),
                    permit_port_forwarding: Some(true),
                    permit_agent_forwarding: Some(true),
                    record_session: Some(RecordSession::BestEffort),
                    ..RoleOptions::default()
                },
                allow: RoleConditions {
                    logins: vec!["{{internal.logins}}".into()],
                    node_labels: Labels::wildcard(),
                    app_labels: Labels::wildcard(),
                    db_labels: Labels::wildcard(),
                    db_users: vec!["{{internal.db_users}}".into()],
                    db_names: vec!["{{internal.db_names}}".into()],
                    rules: Vec::new(),
                },
                deny: RoleConditions::default(),
            },
        }
    }

    /// What administrators get: every verb on every resource of the control API, and no
    /// logins (access is a separate role).
    pub fn builtin_editor() -> Role {
        Role {
            metadata: Metadata {
                description: Some(
                    "Built-in: manage users, roles, tokens, locks, resources, audit and CAs".into(),
                ),
                ..Metadata::named(BUILTIN_EDITOR_ROLE)
            },
            spec: RoleSpec {
                allow: RoleConditions {
                    rules: vec![Rule {
                        resources: RULE_RESOURCES.iter().map(|r| r.to_string()).collect(),
                        verbs: vec![WILDCARD.to_string()],
                    }],
                    ..RoleConditions::default()
                },
                ..RoleSpec::default()
            },
        }
    }
}

impl User {
    pub fn new(
        name: impl Into<String>,
        roles: Vec<String>,
        traits: BTreeMap<String, Vec<String>>,
    ) -> User {
        User {
            metadata: Metadata::named(name),
            spec: UserSpec { roles, traits },
        }
    }
}

impl Lock {
    /// `user=bob`, `node=db-1`: the target as one word, for tables and logs.
    pub fn target_text(&self) -> String {
        self.spec.target.to_string()
    }

    /// Whether this lock stops `user` holding `roles` (a user or role target). Login and node
    /// targets are checked where the login or node is known.
    pub fn targets_user(&self, user: &str, roles: &[String]) -> bool {
        match &self.spec.target {
            LockTarget::User(locked) => locked == user,
            LockTarget::Role(locked) => roles.iter().any(|role| role == locked),
            LockTarget::Node(_) | LockTarget::Login(_) => false,
        }
    }
}

impl TokenType {
    pub const ALL: [TokenType; 4] = [
        TokenType::Node,
        TokenType::App,
        TokenType::Db,
        TokenType::Engine,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TokenType::Node => "node",
            TokenType::App => "app",
            TokenType::Db => "db",
            TokenType::Engine => "engine",
        }
    }

    pub fn parse(text: &str) -> Option<TokenType> {
        TokenType::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

impl fmt::Display for TokenType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TokenType {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        TokenType::parse(text).ok_or_else(|| {
            format!("unknown token type {text:?} (expected one of: node, app, db, engine)")
        })
    }
}

impl RoleOptions {
    pub fn is_empty(&self) -> bool {
        self == &RoleOptions::default()
    }
}

impl RoleConditions {
    pub fn is_empty(&self) -> bool {
        self == &RoleConditions::default()
    }
}

impl Labels {
    /// `'*': '*'`: everything.
    pub fn wildcard() -> Self {
        Labels(BTreeMap::from([(
            WILDCARD.to_string(),
            vec![WILDCARD.to_string()],
        )]))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl LockTarget {
    /// The target's kind as written in YAML (`user`, `role`, `node`, `login`).
    pub fn kind(&self) -> &'static str {
        match self {
            LockTarget::User(_) => "user",
            LockTarget::Role(_) => "role",
            LockTarget::Node(_) => "node",
            LockTarget::Login(_) => "login",
        }
    }

    pub fn value(&self) -> &str {
        match self {
            LockTarget::User(value)
            | LockTarget::Role(value)
            | LockTarget::Node(value)
            | LockTarget::Login(value) => value,
        }
    }
}

// ---- serialization: the document shape ------------------------------------------------------

#[derive(Serialize)]
struct DocOut<'a, S: Serialize> {
    kind: &'static str,
    version: &'static str,
    metadata: &'a Metadata,
    spec: &'a S,
}

fn serialize_doc<S: Serializer, T: Serialize>(
    serializer: S,
    kind: Kind,
    metadata: &Metadata,
    spec: &T,
) -> Result<S::Ok, S::Error> {
    DocOut {
        kind: kind.as_str(),
        version: RESOURCE_VERSION,
        metadata,
        spec,
    }
    .serialize(serializer)
}

impl Serialize for Resource {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Resource::Role(role) => role.serialize(serializer),
            Resource::User(user) => user.serialize(serializer),
            Resource::Token(token) => token.serialize(serializer),
            Resource::Lock(lock) => lock.serialize(serializer),
        }
    }
}

impl Serialize for Role {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_doc(serializer, Kind::Role, &self.metadata, &self.spec)
    }
}

impl Serialize for User {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_doc(serializer, Kind::User, &self.metadata, &self.spec)
    }
}

impl Serialize for Token {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_doc(serializer, Kind::Token, &self.metadata, &self.spec)
    }
}

impl Serialize for Lock {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_doc(serializer, Kind::Lock, &self.metadata, &self.spec)
    }
}

impl fmt::Display for LockTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.kind(), self.value())
    }
}

/// As in YAML: a mapping with one key, `{user: bob}`.
impl Serialize for LockTarget {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        FileLockTarget::from(self).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for LockTarget {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        lock_target(FileLockTarget::deserialize(deserializer)?).map_err(de::Error::custom)
    }
}

impl Serialize for LockSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        FileLockSpec {
            target: FileLockTarget::from(&self.target),
            message: self.message.clone(),
            ttl: self.ttl,
        }
        .serialize(serializer)
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, values) in &self.0 {
            match values.as_slice() {
                [single] => map.serialize_entry(key, single)?,
                _ => map.serialize_entry(key, values)?,
            }
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_multi_map(deserializer).map(Labels)
    }
}

// ---- deserialization without positions (JSON API bodies) ------------------------------------

/// Any format (e.g. JSON in control API bodies); errors are `path: message` without a line.
impl<'de> Deserialize<'de> for Resource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        let kind = match value.get("kind") {
            Some(serde_json::Value::String(kind)) => Kind::parse(kind).ok_or_else(|| {
                de::Error::custom(format!(
                    "kind: unknown kind {kind:?} ({})",
                    expected_kinds()
                ))
            })?,
            _ => {
                return Err(de::Error::custom(format!(
                    "kind: missing required key ({})",
                    expected_kinds()
                )))
            }
        };
        let file = match kind {
            Kind::Role => serde_json::from_value(value).map(FileResource::Role),
            Kind::User => serde_json::from_value(value).map(FileResource::User),
            Kind::Token => serde_json::from_value(value).map(FileResource::Token),
            Kind::Lock => serde_json::from_value(value).map(FileResource::Lock),
        }
        .map_err(de::Error::custom)?;
        file.validate().map_err(de::Error::custom)
    }
}

macro_rules! deserialize_via_resource {
    ($type:ident) => {
        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                match Resource::deserialize(deserializer)? {
                    Resource::$type(inner) => Ok(inner),
                    other => Err(de::Error::custom(format!(
                        "kind: expected {}, found {}",
                        Kind::$type,
                        other.kind()
                    ))),
                }
            }
        }
    };
}

deserialize_via_resource!(Role);
deserialize_via_resource!(User);
deserialize_via_resource!(Token);
deserialize_via_resource!(Lock);

// ---- File* forms and validation --------------------------------------------------------------

/// One document as written, for a kind known from the first pass.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc<S> {
    #[allow(dead_code)] // checked in the first pass
    kind: String,
    version: String,
    metadata: FileMetadata,
    spec: S,
}

#[allow(clippy::large_enum_variant)] // short-lived, one per document
#[derive(Debug)]
enum FileResource {
    Role(FileDoc<RoleSpec>),
    User(FileDoc<UserSpec>),
    Token(FileDoc<FileTokenSpec>),
    Lock(FileDoc<FileLockSpec>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTokenSpec {
    types: Vec<TokenType>,
    ttl: Option<Duration>,
    #[serde(default)]
    single_use: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLockSpec {
    target: FileLockTarget,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ttl: Option<Duration>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLockTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    login: Option<String>,
}

impl From<&LockTarget> for FileLockTarget {
    fn from(target: &LockTarget) -> Self {
        let value = Some(target.value().to_string());
        match target {
            LockTarget::User(_) => FileLockTarget {
                user: value,
                ..Default::default()
            },
            LockTarget::Role(_) => FileLockTarget {
                role: value,
                ..Default::default()
            },
            LockTarget::Node(_) => FileLockTarget {
                node: value,
                ..Default::default()
            },
            LockTarget::Login(_) => FileLockTarget {
                login: value,
                ..Default::default()
            },
        }
    }
}

impl FileResource {
    fn validate(self) -> Result<Resource, Invalid> {
        match self {
            FileResource::Role(doc) => {
                let metadata = validate_header(&doc.version, doc.metadata, Kind::Role)?;
                validate_role_spec(&doc.spec)?;
                Ok(Resource::Role(Role {
                    metadata,
                    spec: doc.spec,
                }))
            }
            FileResource::User(doc) => {
                let metadata = validate_header(&doc.version, doc.metadata, Kind::User)?;
                validate_user_spec(&doc.spec)?;
                Ok(Resource::User(User {
                    metadata,
                    spec: doc.spec,
                }))
            }
            FileResource::Token(doc) => {
                let metadata = validate_header(&doc.version, doc.metadata, Kind::Token)?;
                let spec = validate_token_spec(doc.spec)?;
                Ok(Resource::Token(Token { metadata, spec }))
            }
            FileResource::Lock(doc) => {
                let metadata = validate_header(&doc.version, doc.metadata, Kind::Lock)?;
                let spec = validate_lock_spec(doc.spec)?;
                Ok(Resource::Lock(Lock { metadata, spec }))
            }
        }
    }
}

fn validate_header(version: &str, file: FileMetadata, kind: Kind) -> Result<Metadata, Invalid> {
    if version != RESOURCE_VERSION {
        return Err(Invalid::new(
            "version",
            format!("unsupported version {version:?} (expected {RESOURCE_VERSION})"),
        ));
    }
    let name = match (file.name, kind) {
        (Some(name), _) => name,
        (None, Kind::Token | Kind::Lock) => generate_name()?,
        (None, _) => return Err(Invalid::new("metadata.name", "missing required key")),
    };
    validate_name(&name).map_err(|why| Invalid::new("metadata.name", why))?;
    for key in file.labels.keys() {
        if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Invalid::new(
                yaml::join_path("metadata.labels", key),
                "label keys are non-empty, without spaces",
            ));
        }
    }
    if let Some(expires) = &file.expires {
        if parse_rfc3339(expires).is_none() {
            return Err(Invalid::new(
                "metadata.expires",
                "expected an RFC 3339 time such as 2030-01-31T12:00:00Z",
            ));
        }
    }
    Ok(Metadata {
        name,
        description: file.description,
        labels: file.labels,
        expires: file.expires,
    })
}

fn validate_role_spec(spec: &RoleSpec) -> Result<(), Invalid> {
    for (ttl, key) in [
        (spec.options.max_session_ttl, "spec.options.max_session_ttl"),
        (
            spec.options.client_idle_timeout,
            "spec.options.client_idle_timeout",
        ),
    ] {
        if ttl.is_some_and(Duration::is_zero) {
            return Err(Invalid::new(key, "must be longer than 0s"));
        }
    }
    validate_conditions(&spec.allow, "spec.allow")?;
    validate_conditions(&spec.deny, "spec.deny")
}

fn validate_conditions(conditions: &RoleConditions, at: &str) -> Result<(), Invalid> {
    for (values, key) in [
        (&conditions.logins, "logins"),
        (&conditions.db_users, "db_users"),
        (&conditions.db_names, "db_names"),
    ] {
        for (index, value) in values.iter().enumerate() {
            validate_principal(value)
                .map_err(|why| Invalid::new(format!("{at}.{key}[{index}]"), why))?;
        }
    }
    for (labels, key) in [
        (&conditions.node_labels, "node_labels"),
        (&conditions.app_labels, "app_labels"),
        (&conditions.db_labels, "db_labels"),
    ] {
        for (label, values) in &labels.0 {
            let path = format!("{at}.{key}.{label}");
            if label.is_empty() {
                return Err(Invalid::new(path, "label keys must not be empty"));
            }
            if values.iter().any(String::is_empty) {
                return Err(Invalid::new(
                    path,
                    "label values must not be empty (use '*' for any)",
                ));
            }
            if let Some(bad) = values
                .iter()
                .find(|v| v.starts_with('^') != v.ends_with('$'))
            {
                return Err(Invalid::new(
                    path,
                    format!("{bad:?}: a regular expression is written ^...$ (both anchors)"),
                ));
            }
        }
    }
    for (index, rule) in conditions.rules.iter().enumerate() {
        let path = format!("{at}.rules[{index}]");
        check_words(
            &rule.resources,
            RULE_RESOURCES,
            &format!("{path}.resources"),
            "resource",
        )?;
        check_words(&rule.verbs, RULE_VERBS, &format!("{path}.verbs"), "verb")?;
    }
    Ok(())
}

fn check_words(values: &[String], known: &[&str], path: &str, what: &str) -> Result<(), Invalid> {
    if values.is_empty() {
        return Err(Invalid::new(
            path,
            format!("list at least one {what} (or '*')"),
        ));
    }
    for (index, value) in values.iter().enumerate() {
        if value != WILDCARD && !known.contains(&value.as_str()) {
            return Err(Invalid::new(
                format!("{path}[{index}]"),
                format!(
                    "unknown {what} {value:?} (expected one of: {}, *)",
                    known.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// A login, db user or db name: a literal, `*`, or a trait template `{{internal.NAME}}` /
/// `{{external.NAME}}`.
fn validate_principal(value: &str) -> Result<(), String> {
    const EXPECTED: &str =
        "expected a name or a trait such as {{internal.logins}} or {{external.NAME}}";
    if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{EXPECTED} (found {value:?})"));
    }
    if value.contains("{{") || value.contains("}}") {
        let inner = value
            .strip_prefix("{{")
            .and_then(|rest| rest.strip_suffix("}}"));
        let valid =
            inner
                .and_then(|inner| inner.split_once('.'))
                .is_some_and(|(namespace, name)| {
                    matches!(namespace, "internal" | "external")
                        && !name.is_empty()
                        && name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                });
        if !valid {
            return Err(format!("{EXPECTED} (found {value:?})"));
        }
    }
    Ok(())
}

fn validate_user_spec(spec: &UserSpec) -> Result<(), Invalid> {
    for (index, role) in spec.roles.iter().enumerate() {
        validate_name(role).map_err(|why| Invalid::new(format!("spec.roles[{index}]"), why))?;
    }
    for (name, values) in &spec.traits {
        if name.is_empty() || values.iter().any(String::is_empty) {
            return Err(Invalid::new(
                yaml::join_path("spec.traits", name),
                "trait names and values must not be empty",
            ));
        }
    }
    Ok(())
}

fn validate_token_spec(file: FileTokenSpec) -> Result<TokenSpec, Invalid> {
    if file.types.is_empty() {
        return Err(Invalid::new(
            "spec.types",
            "list at least one of: node, app, db, engine",
        ));
    }
    let ttl = file.ttl.unwrap_or(DEFAULT_TOKEN_TTL);
    if ttl.is_zero() {
        return Err(Invalid::new("spec.ttl", "must be longer than 0s"));
    }
    let mut types = file.types;
    types.sort();
    types.dedup();
    Ok(TokenSpec {
        types,
        ttl,
        single_use: file.single_use,
    })
}

fn validate_lock_spec(file: FileLockSpec) -> Result<LockSpec, Invalid> {
    let target = lock_target(file.target)?;
    if file.ttl.is_some_and(Duration::is_zero) {
        return Err(Invalid::new("spec.ttl", "must be longer than 0s"));
    }
    Ok(LockSpec {
        target,
        message: file.message,
        ttl: file.ttl,
    })
}

fn lock_target(file: FileLockTarget) -> Result<LockTarget, Invalid> {
    const EXPECTED: &str = "expected exactly one of: user, role, node, login";
    let FileLockTarget {
        user,
        role,
        node,
        login,
    } = file;
    let targets: Vec<LockTarget> = [
        user.map(LockTarget::User),
        role.map(LockTarget::Role),
        node.map(LockTarget::Node),
        login.map(LockTarget::Login),
    ]
    .into_iter()
    .flatten()
    .collect();
    let target = match <[LockTarget; 1]>::try_from(targets) {
        Ok([target]) => target,
        Err(targets) if targets.is_empty() => return Err(Invalid::new("spec.target", EXPECTED)),
        Err(targets) => {
            let kinds: Vec<&str> = targets.iter().map(LockTarget::kind).collect();
            return Err(Invalid::new(
                "spec.target",
                format!("{EXPECTED} (found {})", kinds.join(", ")),
            ));
        }
    };
    if target.value().trim().is_empty() {
        return Err(Invalid::new(
            format!("spec.target.{}", target.kind()),
            "must not be empty",
        ));
    }
    Ok(target)
}

/// 128 random bits, hex: unguessable (a token's name is its secret), and safe in a shell and a
/// file name.
fn generate_name() -> Result<String, Invalid> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| {
            Invalid::new(
                "metadata.name",
                "not set, and no system randomness to generate one",
            )
        })?;
    Ok(hex::encode(bytes))
}

fn expected_kinds() -> String {
    let kinds: Vec<&str> = Kind::ALL.iter().map(|kind| kind.as_str()).collect();
    format!("expected one of: {}", kinds.join(", "))
}

// ---- pass 1: each document's kind ------------------------------------------------------------

/// The `kind` of one document, read without looking at the rest.
struct KindProbe {
    kind: Option<String>,
}

impl KindProbe {
    fn kind(&self) -> Result<Kind, Invalid> {
        match &self.kind {
            None => Err(Invalid::new(
                "kind",
                format!("missing required key ({})", expected_kinds()),
            )),
            Some(kind) => Kind::parse(kind).ok_or_else(|| {
                Invalid::new(
                    "kind",
                    format!("unknown kind {kind:?} ({})", expected_kinds()),
                )
            }),
        }
    }
}

impl<'de> Deserialize<'de> for KindProbe {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(KindProbeVisitor)
    }
}

struct KindProbeVisitor;

impl<'de> Visitor<'de> for KindProbeVisitor {
    type Value = KindProbe;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a resource (a mapping with kind, version, metadata and spec)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KindProbe, A::Error> {
        let mut kind = None;
        while let Some(key) = map.next_key::<KeyName>()? {
            if key.0.as_deref() == Some("kind") {
                kind = Some(map.next_value::<String>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(KindProbe { kind })
    }
}

/// A mapping key if it is a scalar; complex keys are skipped (pass 2 rejects them).
struct KeyName(Option<String>);

impl<'de> Deserialize<'de> for KeyName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = KeyName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<KeyName, E> {
                Ok(KeyName(Some(key.to_string())))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeyName, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(KeyName(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KeyName, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(KeyName(None))
            }
        }
        deserializer.deserialize_any(KeyVisitor)
    }
}

// ---- pass 2: each document as its kind -------------------------------------------------------

struct DocSeed(Option<Kind>);

impl<'de> DeserializeSeed<'de> for DocSeed {
    type Value = FileResource;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<FileResource, D::Error> {
        match self.0 {
            Some(Kind::Role) => Deserialize::deserialize(deserializer).map(FileResource::Role),
            Some(Kind::User) => Deserialize::deserialize(deserializer).map(FileResource::User),
            Some(Kind::Token) => Deserialize::deserialize(deserializer).map(FileResource::Token),
            Some(Kind::Lock) => Deserialize::deserialize(deserializer).map(FileResource::Lock),
            None => Err(de::Error::custom(format!(
                "kind: missing required key ({})",
                expected_kinds()
            ))),
        }
    }
}

// ---- shared helpers --------------------------------------------------------------------------

/// A map whose values are a single value or a list of values (`env: prod`,
/// `env: [prod, staging]`); scalars of any type are kept as their text.
fn deserialize_multi_map<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, Vec<String>>, D::Error> {
    let map = BTreeMap::<String, OneOrMany>::deserialize(deserializer)?;
    Ok(map
        .into_iter()
        .map(|(key, values)| (key, values.0))
        .collect())
}

struct OneOrMany(Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OneOrManyVisitor;
        impl<'de> Visitor<'de> for OneOrManyVisitor {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![value.to_string()]))
            }
            fn visit_bool<E: de::Error>(self, value: bool) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![value.to_string()]))
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![value.to_string()]))
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![value.to_string()]))
            }
            fn visit_f64<E: de::Error>(self, value: f64) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![value.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut values = Vec::new();
                while let Some(value) = seq.next_element::<String>()? {
                    values.push(value);
                }
                Ok(OneOrMany(values))
            }
        }
        deserializer.deserialize_any(OneOrManyVisitor)
    }
}

/// Seconds since the Unix epoch of an RFC 3339 date-time
/// (`2030-01-31T12:00:00Z`, `2030-01-31T12:00:00.5+02:00`); `None` if malformed. Parsed by the
/// `time` crate; the date and the time are separated by `T` (either case) or a space, as
/// RFC 3339 allows (`time` itself would take any character there). A leap second (`:60`) counts
/// as the second before it, where `time` places it.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    if !matches!(text.as_bytes().get(10), Some(b'T' | b't' | b' ')) {
        return None;
    }
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(time::OffsetDateTime::unix_timestamp)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn parse(text: &str) -> Vec<Resource> {
        parse_resources("r.yaml", text).unwrap()
    }

    fn error(text: &str) -> String {
        parse_resources("r.yaml", text).unwrap_err().to_string()
    }

    const ROLES: &str = "\
kind: role
version: v1
metadata:
  name: dev
  description: Developers
  labels: { team: eng }
spec:
  options:
    max_session_ttl: 8h
    permit_pty: false
  allow:
    logins: ['{{internal.logins}}', ubuntu]
    node_labels:
      env: [dev, staging]
      region: '^eu-.*$'
    db_labels: { '*': '*' }
    db_users: ['{{external.db_user}}']
    db_names: ['*']
    rules:
      - { resources: [node, app], verbs: [list, read] }
  deny:
    logins: [root]
---
kind: user
version: v1
metadata: { name: alice@example.com }
spec:
  roles: [dev, access]
  traits:
    logins: [alice, ubuntu]
    db_users: alice
    groups: [a, b]
---
kind: token
version: v1
metadata: { name: abcdef0123456789 }
spec: { types: [node, db], ttl: 1h, single_use: true }
---
kind: lock
version: v1
metadata: { name: lock-bob, expires: '2030-01-31T12:00:00Z' }
spec:
  target: { user: bob }
  message: Suspended pending review
  ttl: 7d
";

    #[test]
    fn parses_every_kind() {
        let resources = parse(ROLES);
        assert_eq!(resources.len(), 4);
        let Resource::Role(role) = &resources[0] else {
            panic!("not a role")
        };
        assert_eq!(role.metadata.name, "dev");
        assert_eq!(
            role.metadata.labels.get("team").map(String::as_str),
            Some("eng")
        );
        assert_eq!(
            role.spec.options.max_session_ttl,
            Some(Duration::from_hours(8))
        );
        assert_eq!(role.spec.options.permit_pty, Some(false));
        assert_eq!(role.spec.options.permit_port_forwarding, None);
        assert_eq!(
            role.spec.allow.node_labels.0.get("env").unwrap(),
            &vec!["dev".to_string(), "staging".to_string()]
        );
        assert_eq!(
            role.spec.allow.node_labels.0.get("region").unwrap(),
            &vec!["^eu-.*$".to_string()]
        );
        assert_eq!(role.spec.allow.db_labels, Labels::wildcard());
        assert_eq!(role.spec.allow.rules[0].verbs, vec!["list", "read"]);
        assert_eq!(role.spec.deny.logins, vec!["root"]);

        let Resource::User(user) = &resources[1] else {
            panic!("not a user")
        };
        assert_eq!(user.spec.roles, vec!["dev", "access"]);
        assert_eq!(
            user.spec.traits.get(TRAIT_DB_USERS).unwrap(),
            &vec!["alice".to_string()]
        );

        let Resource::Token(token) = &resources[2] else {
            panic!("not a token")
        };
        assert_eq!(token.spec.types, vec![TokenType::Node, TokenType::Db]);
        assert_eq!(token.spec.ttl, Duration::from_hours(1));
        assert!(token.spec.single_use);

        let Resource::Lock(lock) = &resources[3] else {
            panic!("not a lock")
        };
        assert_eq!(lock.spec.target, LockTarget::User("bob".into()));
        assert_eq!(lock.spec.ttl, Some(Duration::from_days(7)));
        assert_eq!(lock.metadata.expires_unix_secs(), Some(1_896_091_200));
    }

    #[test]
    fn round_trips_through_yaml_and_json() {
        let resources = parse(ROLES);
        let printed = to_yaml(&resources).unwrap();
        assert_eq!(parse(&printed), resources, "{printed}");
        for resource in &resources {
            let json = serde_json::to_string(resource).unwrap();
            let back: Resource = serde_json::from_str(&json).unwrap();
            assert_eq!(&back, resource);
        }
        let builtins = vec![
            Resource::Role(Role::builtin_access()),
            Resource::Role(Role::builtin_editor()),
        ];
        let printed = to_yaml(&builtins).unwrap();
        assert_eq!(parse(&printed), builtins, "{printed}");
    }

    #[test]
    fn printed_shape_is_the_written_shape() {
        let lock = Resource::Lock(Lock {
            metadata: Metadata::named("l1"),
            spec: LockSpec {
                target: LockTarget::Node("n1".into()),
                message: None,
                ttl: None,
            },
        });
        assert_eq!(
            serde_yaml_ng::to_string(&lock).unwrap(),
            "kind: lock\nversion: v1\nmetadata:\n  name: l1\nspec:\n  target:\n    node: n1\n"
        );
        let printed = serde_yaml_ng::to_string(&Role::builtin_access()).unwrap();
        assert!(
            printed.contains("node_labels:\n      '*': '*'\n"),
            "{printed}"
        );
        assert!(printed.contains("max_session_ttl: 12h\n"), "{printed}");
    }

    #[test]
    fn builtin_roles() {
        let access = Role::builtin_access();
        assert_eq!(access.metadata.name, BUILTIN_ACCESS_ROLE);
        assert_eq!(access.spec.allow.logins, vec!["{{internal.logins}}"]);
        assert_eq!(access.spec.allow.db_users, vec!["{{internal.db_users}}"]);
        assert_eq!(access.spec.allow.db_names, vec!["{{internal.db_names}}"]);
        assert_eq!(access.spec.allow.app_labels, Labels::wildcard());
        assert_eq!(access.spec.options.permit_agent_forwarding, Some(true));
        assert!(access.spec.allow.rules.is_empty());
        let editor = Role::builtin_editor();
        assert!(editor.spec.allow.logins.is_empty());
        assert_eq!(
            editor.spec.allow.rules[0].resources.len(),
            RULE_RESOURCES.len()
        );
        assert_eq!(editor.spec.allow.rules[0].verbs, vec![WILDCARD]);
        assert!(validate_role_spec(&access.spec).is_ok());
        assert!(validate_role_spec(&editor.spec).is_ok());
    }

    #[test]
    fn lock_targets() {
        let text = "kind: lock\nversion: v1\nmetadata: {}\nspec: { target: { login: root } }\n";
        let Resource::Lock(lock) = &parse(text)[0] else {
            panic!("not a lock")
        };
        assert_eq!(lock.metadata.name.len(), 32);
        assert_eq!(lock.target_text(), "login=root");
        assert_eq!(
            serde_json::to_string(&lock.spec.target).unwrap(),
            r#"{"login":"root"}"#
        );
        let back: LockTarget = serde_json::from_str(r#"{"node":"n1"}"#).unwrap();
        assert_eq!(back, LockTarget::Node("n1".into()));
        assert!(serde_json::from_str::<LockTarget>("{}").is_err());
        let user = User::new("bob", vec!["access".into()], BTreeMap::new());
        assert_eq!(user.metadata.name, "bob");
        assert!(!lock.targets_user("root", &[]));
        let role_lock = Lock {
            metadata: Metadata::named("l"),
            spec: LockSpec {
                target: LockTarget::Role("dev".into()),
                message: None,
                ttl: None,
            },
        };
        assert!(role_lock.targets_user("bob", &["access".into(), "dev".into()]));
        assert!(!role_lock.targets_user("dev", &["access".into()]));
    }

    #[test]
    fn token_types_as_text() {
        for kind in TokenType::ALL {
            assert_eq!(kind.to_string().parse::<TokenType>(), Ok(kind));
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{kind}\""));
        }
        assert!("admin".parse::<TokenType>().is_err());
    }

    #[test]
    fn token_names_are_generated_when_absent() {
        let text = "kind: token\nversion: v1\nmetadata: {}\nspec: { types: [node] }\n";
        let Resource::Token(token) = &parse(text)[0] else {
            panic!("not a token")
        };
        assert_eq!(token.metadata.name.len(), 32);
        assert_eq!(token.spec.ttl, DEFAULT_TOKEN_TTL);
        assert!(!token.spec.single_use);
    }

    #[test]
    fn errors_name_key_and_line() {
        assert_eq!(
            error(
                "kind: role\nversion: v1\nmetadata: { name: r }\nspec:\n  allow:\n    login: [x]\n"
            ),
            "r.yaml:6:5: spec.allow.login: unknown key (expected one of: logins, node_labels, \
             app_labels, db_labels, db_users, db_names, rules)"
        );
        assert_eq!(
            error("kind: role\nversion: v1\nmetadata: { name: r }\nspec: {}\n---\nkind: rol\n"),
            "r.yaml:6:1: kind: unknown kind \"rol\" (expected one of: role, user, token, lock)"
        );
        assert_eq!(
            error("version: v1\nmetadata: { name: r }\nspec: {}\n"),
            "r.yaml:1:1: kind: missing required key (expected one of: role, user, token, lock)"
        );
        assert_eq!(
            error("kind: user\nversion: v2\nmetadata: { name: u }\nspec: {}\n"),
            "r.yaml:2:1: version: unsupported version \"v2\" (expected v1)"
        );
        assert_eq!(
            error("kind: user\nversion: v1\nmetadata: { name: 'bad name' }\nspec: {}\n"),
            "r.yaml:3:13: metadata.name: ' ' is not allowed in a name (use letters, digits, '.', '_', '@' and '-')"
        );
        assert_eq!(
            error("kind: user\nversion: v1\nmetadata: {}\nspec: {}\n"),
            "r.yaml:3:1: metadata.name: missing required key"
        );
        assert_eq!(
            error("kind: role\nversion: v1\nmetadata: { name: r }\nspec:\n  options: { max_session_ttl: forever }\n"),
            "r.yaml:5:31: spec.options.max_session_ttl: expected a duration such as 30m or 12h"
        );
        assert_eq!(
            error("kind: role\nversion: v1\nmetadata: { name: r }\nspec:\n  allow:\n    logins: ['{{internal.logins']\n"),
            "r.yaml:6:14: spec.allow.logins[0]: expected a name or a trait such as \
             {{internal.logins}} or {{external.NAME}} (found \"{{internal.logins\")"
        );
        assert_eq!(
            error("kind: role\nversion: v1\nmetadata: { name: r }\nspec:\n  allow:\n    rules:\n      - resources: [nodes]\n        verbs: [list]\n"),
            "r.yaml:7:21: spec.allow.rules[0].resources[0]: unknown resource \"nodes\" \
             (expected one of: user, role, token, lock, node, app, db, audit, ca, session, recording, *)"
        );
        assert_eq!(
            error("kind: lock\nversion: v1\nmetadata: { name: l }\nspec:\n  target: { user: a, role: b }\n"),
            "r.yaml:5:3: spec.target: expected exactly one of: user, role, node, login (found user, role)"
        );
        assert_eq!(
            error("kind: token\nversion: v1\nmetadata: { name: t }\nspec: { types: [node, admin] }\n"),
            "r.yaml:4:23: spec.types[1]: unknown value \"admin\" (expected one of: node, app, db, engine)"
        );
        assert_eq!(
            error("kind: lock\nversion: v1\nmetadata: { name: l, expires: tomorrow }\nspec: { target: { node: n } }\n"),
            "r.yaml:3:22: metadata.expires: expected an RFC 3339 time such as 2030-01-31T12:00:00Z"
        );
        assert_eq!(error("- a\n"), "r.yaml:1:1: expected a resource (a mapping with kind, version, metadata and spec), found a list");
    }

    #[test]
    fn json_bodies_get_errors_without_positions() {
        let error = serde_json::from_str::<Resource>(
            r#"{"kind":"user","version":"v1","metadata":{},"spec":{}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("metadata.name: missing required key"),
            "{error}"
        );
        let error = serde_json::from_str::<Role>(
            r#"{"kind":"user","version":"v1","metadata":{"name":"u"},"spec":{}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("kind: expected role, found user"),
            "{error}"
        );
    }

    #[test]
    fn names() {
        assert!(validate_name("alice@example.com").is_ok());
        assert!(validate_name("node-1.eu_west").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("..").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name(&"a".repeat(253)).is_ok());
        assert!(validate_name(&"a".repeat(254)).is_err());
    }

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00Z"), Some(951_782_400));
        assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00.123-00:30"), Some(1800));
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z"), Some(-1));
        assert_eq!(parse_rfc3339("2001-02-29T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("2030-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("2030-01-01T00:00:00"), None);
        assert_eq!(parse_rfc3339("2030-01-01T00:00:00+0100"), None);
        assert_eq!(parse_rfc3339("2030-01-01T00:00:00.Z"), None);
        assert_eq!(parse_rfc3339("2030-01-01T24:00:00Z"), None);
        assert_eq!(parse_rfc3339("２030-01-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("2030-01-01 00:00:00Z"), Some(1_893_456_000));
        assert_eq!(parse_rfc3339("2030-01-01t00:00:00z"), Some(1_893_456_000));
        assert_eq!(parse_rfc3339("2030-01-01X00:00:00Z"), None);
    }
}
