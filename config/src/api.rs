//! Request and response bodies of the control API (HTTP/1.1 + JSON over TLS, ALPN
//! `jaunt-control`). Keys travel as public keys only: clients send public keys and receive
//! certificates, so private keys never leave the machine that made them.
//!
//! Paths (all under `/v1`): `GET /ping`, `POST /login`, `POST /join` need no client certificate;
//! everything else needs one issued by the cluster (an `editor` user, the local admin identity,
//! or a host for the host endpoints).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::identity::Identity;

/// ALPN protocol id of the control API, on the control port and through the engine.
pub const ALPN_CONTROL: &str = "jaunt-control";

/// Host roles: the join token type a host joined with (`jaunt tokens add --type`), carried in
/// its certificate, names the agent endpoints it may call. `db`: `POST /v1/db/cert` and
/// `db.query` events.
pub const DB_HOST_ROLE: &str = "db";
/// `app`: `POST /v1/app/jwt` and `app.request` events.
pub const APP_HOST_ROLE: &str = "app";
/// `node`: the SSH termination endpoints (`POST /v1/agent/ssh/host-cert`, `/user-cert`).
pub const NODE_HOST_ROLE: &str = "node";

/// `GET /v1/ping`: who this cluster is, and how to pin its CA.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PingResponse {
    pub cluster_name: String,
    pub version: String,
    pub public_addr: String,
    /// `sha256:<hex>` of the host CA's SubjectPublicKeyInfo.
    pub host_ca_pin: String,
    /// `otp` or `off`.
    pub second_factor: String,
}

/// `POST /v1/login`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoginRequest {
    pub user: String,
    pub password: String,
    #[serde(default)]
    pub otp: Option<String>,
    /// PEM SubjectPublicKeyInfo of the key the X.509 certificate is for.
    pub tls_public_key: String,
    /// OpenSSH public key line the SSH certificate is for.
    pub ssh_public_key: String,
    /// Requested lifetime; capped by the cluster default and the roles' `max_session_ttl`.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// Certificates and trust anchors handed to a user or host.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Certs {
    pub identity: Identity,
    /// PEM X.509 certificate.
    pub tls_cert: String,
    /// OpenSSH certificate line.
    pub ssh_cert: String,
    /// PEM of the host CA (servers users talk to present certificates from it).
    pub host_ca_tls: String,
    /// PEM of the user CA (what agents trust for user certificates).
    pub user_ca_tls: String,
    /// OpenSSH public key line of the host CA (for known_hosts `@cert-authority`).
    pub host_ca_ssh: String,
    /// OpenSSH public key line of the user CA (for sshd `TrustedUserCAKeys`).
    pub user_ca_ssh: String,
    /// The public addresses (HOST:PORT) of the engines healthy at issue time: where a client
    /// dials when the engine it logged in through refuses connections (drained, down).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub engines: Vec<String>,
}

/// `POST /v1/join`: a host proves a join token and receives host certificates.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token: String,
    /// Requested host name; the host id is derived from it and returned.
    pub host_name: String,
    pub tls_public_key: String,
    pub ssh_public_key: String,
}

/// `POST /v1/hosts/renew` (host mTLS): fresh host certificates for new public keys.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenewRequest {
    pub tls_public_key: String,
    pub ssh_public_key: String,
}

/// `POST /v1/users`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserAddRequest {
    pub name: String,
    pub roles: Vec<String>,
    #[serde(default)]
    pub logins: Vec<String>,
    #[serde(default)]
    pub db_users: Vec<String>,
    #[serde(default)]
    pub db_names: Vec<String>,
    /// None: the server generates one and returns it.
    #[serde(default)]
    pub password: Option<String>,
}

/// Answer to adding or resetting a user: what the person needs to log in.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserCredentials {
    pub name: String,
    /// Present when the server generated it.
    #[serde(default)]
    pub password: Option<String>,
    /// Base32 TOTP secret and `otpauth://` URL, when the cluster requires a second factor.
    #[serde(default)]
    pub otp_secret: Option<String>,
    #[serde(default)]
    pub otp_url: Option<String>,
}

/// `POST /v1/users/NAME/reset`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UserResetRequest {
    #[serde(default)]
    pub password: Option<String>,
}

/// A user as listed (no secrets).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserInfo {
    pub name: String,
    pub roles: Vec<String>,
    pub traits: BTreeMap<String, Vec<String>>,
    pub created: u64,
    pub otp_enrolled: bool,
    /// The user resource's `metadata.description` and `metadata.labels`, so that `jaunt get
    /// users --format yaml` prints what `jaunt create -f` reads back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// `POST /v1/tokens`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenAddRequest {
    pub types: Vec<String>,
    pub ttl_secs: u64,
    #[serde(default)]
    pub single_use: bool,
    /// Chosen by the caller (`jaunt create -f token.yaml` with a name); generated if None.
    #[serde(default)]
    pub token: Option<String>,
}

/// A join token as listed: the secret itself is stored hashed and never shown again.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenInfo {
    /// First 16 hex digits of the token's SHA-256: enough to name it in `jaunt tokens rm`.
    pub id: String,
    pub types: Vec<String>,
    pub expires: u64,
    pub single_use: bool,
    pub created: u64,
}

/// Answer to `POST /v1/tokens`: the only time the token is shown.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenAddResponse {
    pub token: String,
    pub info: TokenInfo,
    /// Where agents should dial, and the pin they should check.
    pub proxy_addr: String,
    pub ca_pin: String,
}

/// A joined host as listed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostInfo {
    pub id: String,
    pub name: String,
    pub types: Vec<String>,
    pub joined: u64,
    pub last_seen: u64,
    pub connected: bool,
    /// For a connected agent: whether it has confirmed the CAs' current rotation phase (a
    /// phase change waits for it unless `--force`). Absent from older controls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_phase_confirmed: Option<bool>,
}

/// `GET /v1/ca/TYPE`: a CA's public half in a ready-to-paste format.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaExport {
    pub r#type: String,
    pub text: String,
}

/// `POST /v1/ca/sign-host`: an OpenSSH host certificate for a key made on the caller's side.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SignHostRequest {
    pub host: String,
    pub ssh_public_key: String,
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// Answer to `POST /v1/ca/sign-host`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SignHostResponse {
    pub ssh_cert: String,
}

/// One CA's fingerprints, for `jaunt status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaInfo {
    pub r#type: String,
    pub fingerprint: String,
    /// The rotation phase of this CA (`standby` when none runs). Absent from older controls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// During a rotation: the other CA's fingerprint (the new one before `update_clients`,
    /// the old one after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub additional: Option<String>,
}

/// `POST /v1/ca/rotate`: one phase change of one CA or all (`jaunt ca rotate`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RotateRequest {
    /// `user`, `host`, `db`, `jwt` or `all`.
    pub r#type: String,
    /// `init`, `update_clients`, `update_servers`, `standby` or `rollback`; absent with
    /// `grace_secs` = start a semi-automatic rotation (`init`, then each phase after the grace).
    #[serde(default)]
    pub phase: Option<String>,
    /// Seconds after which the phases advance on their own.
    #[serde(default)]
    pub grace_secs: Option<u64>,
    /// Change the phase even though some connected agents have not confirmed the current one.
    #[serde(default)]
    pub force: bool,
}

/// The answer to [`RotateRequest`]: the state of each CA it touched.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RotateResponse {
    pub cas: Vec<CaRotationInfo>,
}

/// One CA's rotation state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaRotationInfo {
    pub r#type: String,
    pub phase: String,
    /// The pin (X.509 CAs: `sha256:` of the SPKI; jwt: the key id) that signs now.
    pub signing: String,
    /// The other trusted one during a rotation.
    #[serde(default)]
    pub additional: Option<String>,
    /// When the next automatic phase change is due (unix seconds), with `--grace`.
    #[serde(default)]
    pub next_phase_at: Option<u64>,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusResponse {
    pub cluster_name: String,
    pub version: String,
    pub public_addr: String,
    /// `sha256:<hex>` of the host CA's SubjectPublicKeyInfo: what `--ca-pin` takes.
    pub ca_pin: String,
    pub cas: Vec<CaInfo>,
    pub hosts: Vec<HostInfo>,
    /// The control+engine hosts sharing the store, from their heartbeats (one with SQLite).
    #[serde(default)]
    pub members: Vec<MemberInfo>,
}

/// A control+engine host of the cluster, as `jaunt status` lists it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: String,
    pub control_addr: String,
    pub public_addr: String,
    pub version: String,
    pub started: u64,
    pub last_seen: u64,
    /// `serving`, `draining` or `stopped`, as the host last said.
    pub state: String,
    /// `healthy` (serving, heard from lately), `draining`, `stopped` or `unreachable`.
    pub health: String,
}

/// The body of every non-2xx answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /v1/inventory`: a resource served by a connected agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResourceInfo {
    /// `node`, `app`, `tcp` or `db`.
    pub kind: String,
    pub name: String,
    /// The resource's labels over the agent's host labels.
    pub labels: BTreeMap<String, String>,
    /// `ssh`, `http`, `https`, `tcp` or `postgres`.
    pub protocol: String,
    pub host_id: String,
    /// The serving agent's node name.
    pub agent: String,
    /// Engine shards the agent has a tunnel to.
    pub shards: Vec<usize>,
}

/// `POST /v1/app/jwt`: an agent asks for the JWT it adds to a user's requests to an HTTP app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppJwtRequest {
    /// The Jaunt user the engine authorized.
    pub user: String,
    /// That user's roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// The app's name.
    pub app: String,
    /// The app's URI as the agent reaches it (the token's audience).
    pub uri: String,
}

/// The answer to [`AppJwtRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppJwtResponse {
    /// The compact JWS (ES256).
    pub jwt: String,
    /// When it expires (unix seconds).
    pub expires: u64,
}

/// `GET /v1/agent/policy` (host identities only): what an agent needs to re-check each user
/// stream before it serves it — the roles, the locks in force and the user CA — exactly the
/// inputs of the engine's snapshot. Engines push it to agents over their tunnels (stream
/// `jaunt-policy/1`) and agents poll it as a fallback; `version` changes whenever the content does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentPolicyResponse {
    /// A digest of everything below (`sha256:<hex>`): equal versions, equal policies.
    pub version: String,
    /// Control's snapshot version this policy was built with: it only grows (it starts from
    /// control's boot time, so across restarts too), and an agent that gets the policy both
    /// pushed by the engines and polled from control keeps the highest it has seen. 0 = unknown
    /// (an older control): always applied.
    #[serde(default)]
    pub seq: u64,
    /// The cluster's name (user certificates carry it).
    pub cluster: String,
    /// Every role as its JSON document, by name (what `rbac::Policy::compile_json` takes).
    pub roles: BTreeMap<String, serde_json::Value>,
    /// The locks not yet expired, in creation order.
    pub locks: Vec<AgentPolicyLock>,
    /// The user CA's certificates (PEM): users' client certificates must chain to one.
    pub user_ca: Vec<String>,
    /// The user CA's SSH public keys (OpenSSH lines): an agent that terminates SSH checks the
    /// user's SSH certificate against them. Empty from an older control.
    #[serde(default)]
    pub user_ca_ssh: Vec<String>,
    /// The host CA's SSH public keys (OpenSSH lines): an agent that terminates SSH checks the
    /// node sshd's host certificate against them. Empty from an older control.
    #[serde(default)]
    pub host_ca_ssh: Vec<String>,
    /// The host CA's certificates (PEM) the agent trusts for the engine's certificate: two
    /// while the host CA rotates. Empty from an older control (keep the stored ones).
    #[serde(default)]
    pub host_ca: Vec<String>,
    /// The CAs' rotation generation; the agent sends it back (`?confirmed=`) once it has
    /// applied this policy, which is how control knows no agent would be stranded.
    #[serde(default)]
    pub ca_generation: String,
    /// True when the caller's host certificate is not from the host CA that signs now, in a
    /// phase whose servers must re-issue (`update_servers`, `rollback`): renew at once.
    #[serde(default)]
    pub renew_host_cert: bool,
    /// The public addresses of the cluster's healthy engines (from their heartbeats in the
    /// store): the agent keeps tunnels to every one.
    #[serde(default)]
    pub engines: Vec<String>,
}

/// `POST /v1/agent/ssh/host-cert` (host identities with role `node`): an OpenSSH host
/// certificate from the host CA over a key the agent made, for the agent's own node name (the
/// name it joined with, and `NAME.<cluster>`), which the agent presents when it terminates SSH.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSshHostCertRequest {
    /// OpenSSH public key line (ed25519).
    pub ssh_public_key: String,
}

/// `POST /v1/agent/ssh/user-cert` (host identities with role `node`): a short-lived OpenSSH
/// user certificate from the user CA for one login of one user's session, over a key the agent
/// made, with which a terminating agent logs in to its node's sshd (`TrustedUserCAKeys`).
/// Control checks the user's X.509 certificate (forwarded by the engine to the agent) and that
/// it carries the login.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSshUserCertRequest {
    /// The login (principal) the certificate is for.
    pub login: String,
    /// The user's X.509 certificate (base64 of the DER) as the engine forwarded it.
    pub user_cert: String,
    /// OpenSSH public key line (ed25519).
    pub ssh_public_key: String,
    /// The engine's session id, for the audit log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
}

/// Answer to `POST /v1/agent/ssh/host-cert` and `POST /v1/agent/ssh/user-cert`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentSshCertResponse {
    /// OpenSSH certificate line.
    pub ssh_cert: String,
    /// Unix seconds.
    pub expires: u64,
}

/// One lock of an [`AgentPolicyResponse`]: the lock resource and when control says it lifts
/// (what `rbac::ActiveLock::from_lock` takes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentPolicyLock {
    /// The `kind: lock` document.
    pub lock: serde_json::Value,
    /// Unix seconds at which it lifts; `None` = until deleted.
    #[serde(default)]
    pub expires: Option<u64>,
}

// ---- database certificates ----

/// `POST /v1/db/cert` (host mTLS, role `db`): a client certificate for `db_user` over a key the
/// agent made.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbCertRequest {
    pub db_user: String,
    /// PEM SubjectPublicKeyInfo.
    pub tls_public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// The Jaunt user whose session needs it (for the audit log; the engine authorized them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
}

/// Answer to `POST /v1/db/cert` and `POST /v1/ca/sign-db`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DbCertResponse {
    /// PEM certificate.
    pub tls_cert: String,
    /// The db CA (PEM).
    pub db_ca: String,
    /// Unix seconds.
    pub expires: u64,
}

/// `POST /v1/ca/sign-db` (admin, `ca` `create`): a server certificate for a database host.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignDbRequest {
    /// Host names or IP addresses; the first is the certificate's CN.
    pub hosts: Vec<String>,
    /// PEM SubjectPublicKeyInfo.
    pub tls_public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

// ---- agents' audit events ----

/// `POST /v1/audit/events` (host mTLS): a JSON list of [`AgentEvent`]s. Control's checks and
/// limits are in `control/src/agent_audit.rs`.
pub const EVENTS_PATH: &str = "/v1/audit/events";

/// One agent event as posted (the host comes from the certificate, not from here).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event")]
pub enum AgentEvent {
    #[serde(rename = "db.query")]
    DbQuery(DbQueryEvent),
    #[serde(rename = "app.request")]
    AppRequest(AppRequestEvent),
    #[serde(rename = "access.denied")]
    AccessDenied(AccessDeniedEvent),
    #[serde(rename = "session.exec")]
    SessionExec(SessionExecEvent),
    #[serde(rename = "file.transfer")]
    FileTransfer(FileTransferEvent),
    #[serde(rename = "session.recorded")]
    SessionRecorded(SessionRecordedEvent),
}

impl AgentEvent {
    /// The Jaunt user the event is about.
    pub fn user(&self) -> &str {
        match self {
            AgentEvent::DbQuery(e) => &e.user,
            AgentEvent::AppRequest(e) => &e.user,
            AgentEvent::AccessDenied(e) => &e.user,
            AgentEvent::SessionExec(e) => &e.user,
            AgentEvent::FileTransfer(e) => &e.user,
            AgentEvent::SessionRecorded(e) => &e.user,
        }
    }

    /// Unix seconds, as the agent saw it.
    pub fn time(&self) -> u64 {
        match self {
            AgentEvent::DbQuery(e) => e.time,
            AgentEvent::AppRequest(e) => e.time,
            AgentEvent::AccessDenied(e) => e.time,
            AgentEvent::SessionExec(e) => e.time,
            AgentEvent::FileTransfer(e) => e.time,
            AgentEvent::SessionRecorded(e) => e.time,
        }
    }
}

/// `session.exec`: a command channel of an SSH session the agent terminated ended (`ssh host
/// cmd`, legacy `scp -t`/`-f`, a subsystem other than sftp).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionExecEvent {
    pub uid: String,
    pub time: u64,
    pub user: String,
    /// The engine's session id, as in its `session.start`/`session.end`.
    pub session_id: String,
    pub login: String,
    /// The node.
    pub target: String,
    /// The command line, at most 16 KiB.
    pub command: String,
    #[serde(default)]
    pub truncated: bool,
    /// Absent: sshd sent none (the command was killed by a signal, or the connection ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_signal: Option<String>,
    /// Channel data bytes from the user, and to the user.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The channel's recording (absent if it could not be recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording_id: Option<String>,
}

/// `file.transfer`: one file operation of an SSH session's sftp channel (scp in its default
/// SFTP mode, `sftp`), as the agent that terminates the session decoded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTransferEvent {
    pub uid: String,
    pub time: u64,
    pub user: String,
    pub session_id: String,
    pub login: String,
    pub target: String,
    /// `read` or `write` (a file closed, with the bytes moved), `open` (closed with nothing
    /// moved), `remove`, `rename`, `mkdir`, `rmdir`, `setstat`.
    pub operation: String,
    /// The path as the client sent it (at most 4 KiB).
    pub path: String,
    /// `rename`'s new path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Bytes read or written (`read`, `write`, `open`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default)]
    pub truncated: bool,
}

/// `session.recorded`: an SSH session the agent terminated ended there; its recordings (one per
/// session channel) and its channels' bytes. The engine's `session.end` of the same
/// `session_id` has the connection's bytes; the engine cannot know the recordings (they are
/// made at the agent as channels open).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRecordedEvent {
    pub uid: String,
    pub time: u64,
    pub user: String,
    pub session_id: String,
    pub login: String,
    pub target: String,
    pub recording_ids: Vec<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Why some of it could not be recorded (best effort went on), as a stable label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording_failure: Option<String>,
}

/// `access.denied`: a stream the agent's own authorization check refused (the engine's
/// refusals are recorded by the engine; these are the ones it let through).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessDeniedEvent {
    pub uid: String,
    pub time: u64,
    pub user: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// The dial kind (`ssh`, `db`, `tcp`, `app`).
    pub kind: String,
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_user: Option<String>,
    pub client_addr: String,
    /// What the user was told (the resource and the rule).
    pub reason: String,
}

/// `db.query`: one query of a database session (PostgreSQL `Q` or `P`; MySQL COM_QUERY or
/// COM_STMT_PREPARE).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbQueryEvent {
    /// 32 hex characters, made by the agent (shared by resent copies).
    pub uid: String,
    /// Unix seconds, when the agent forwarded the query.
    pub time: u64,
    /// The Jaunt user.
    pub user: String,
    /// The database service (what the user dialed).
    pub service: String,
    pub db_user: String,
    pub database: String,
    /// The user's address as the engine saw it.
    pub client_addr: String,
    /// `query` (simple; MySQL `COM_QUERY`), `parse` (PostgreSQL extended protocol) or
    /// `prepare` (MySQL `COM_STMT_PREPARE`).
    pub kind: String,
    /// The prepared statement's name (`parse` only; empty = unnamed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub statement: String,
    /// The SQL text, at most 16 KiB.
    pub query: String,
    /// The text was longer than what was kept.
    pub truncated: bool,
    /// The engine's session id, as in its `session.start`/`session.end` events (absent from
    /// agents that predate it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub session_id: String,
}

/// `app.request`: one HTTP request of an app session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRequestEvent {
    pub uid: String,
    pub time: u64,
    pub user: String,
    pub app: String,
    pub client_addr: String,
    pub method: String,
    pub path: String,
    /// 0 when the app sent no response.
    pub status: u16,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub duration_ms: u64,
    pub upgraded: bool,
}

/// The answer to `POST /v1/audit/events`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEventsResponse {
    /// Events committed.
    pub accepted: usize,
}
