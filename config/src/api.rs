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
