//! The agent's own authorization check: before it serves a user stream the agent verifies the
//! user's certificate (which the engine forwards in the [`StreamHeader`]) against the cluster's
//! user CA and calls the one RBAC function, [`jaunt_config::rbac::authorize`], with the
//! cluster's roles and locks — the same decision the engine made, made again where the resource
//! is. It does not trust the header's `user` and `roles`: they must match the certificate.
//!
//! - [`ClusterPolicy`]: one immutable policy as control published it (compiled roles, locks in
//!   force, a verifier for the user CA), built off the executor (by the `jaunt agent` command's
//!   polling thread) and handed in with [`crate::AgentCommand::ReplacePolicy`].
//! - [`PolicyMode`]: whether the agent enforces at all. `jaunt agent` enforces; a runtime
//!   started without a policy source (library tests) says so explicitly with
//!   [`PolicyMode::EngineOnly`] and logs it at start-up.
//! - `Guard` (crate-private): the executor's current policy and its registry of live sessions.
//!   A new policy whose locks match a live session ends that session, as the engine's shards
//!   do with a newer snapshot (defense in depth if the engine missed it).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use jaunt_config::api::AgentPolicyResponse;
use jaunt_config::file::AgentServices;
use jaunt_config::identity::{Identity, IdentityKind};
use jaunt_config::rbac::{self, ActiveLock, Policy};
use jaunt_config::resource::Lock;
use jaunt_config::wire::dial::{DialKind, StreamHeader};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};

/// What a user reads while the agent has no policy yet (just started, control unreachable).
pub const NO_POLICY_YET: &str =
    "the agent has not received the cluster's policy yet; retry in a few seconds";

/// Most live sessions one executor's registry holds; a stream beyond it is refused (the mux's
/// own stream bounds keep real agents far below).
pub const MAX_LIVE_SESSIONS: usize = 64 * 1024;

/// Whether the agent re-checks authorization itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyMode {
    /// Re-check every user stream against the policy from
    /// [`crate::AgentCommand::ReplacePolicy`]; refuse user streams until one has arrived.
    /// What `jaunt agent` runs with.
    Enforce,
    /// Trust the engine's decision: no policy source is connected (the runtime used as a
    /// library, in tests). Logged at start-up.
    EngineOnly,
}

/// One published policy: the roles compiled, the locks, and the user CA as a certificate
/// verifier. Immutable; a newer one replaces it whole.
pub struct ClusterPolicy {
    version: String,
    /// Control's snapshot version (`AgentPolicyResponse::seq`): only a higher one replaces
    /// this policy; 0 = unknown, always replaced.
    seq: u64,
    cluster: String,
    policy: Policy,
    locks: Vec<ActiveLock>,
    verifier: Arc<dyn ClientCertVerifier>,
    /// SHA-256 fingerprints of the user CA's SSH keys (a terminating agent checks users' SSH
    /// certificates against them) and of the host CA's (the node sshd's host certificate).
    ssh_user_cas: Vec<ssh_key::Fingerprint>,
    ssh_host_cas: Vec<ssh_key::Fingerprint>,
}

impl fmt::Debug for ClusterPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterPolicy")
            .field("version", &self.version)
            .field("cluster", &self.cluster)
            .field("roles", &self.policy.len())
            .field("locks", &self.locks.len())
            .finish_non_exhaustive()
    }
}

impl ClusterPolicy {
    /// A policy from its parts; fails if no usable user CA root is given.
    pub fn new(
        version: &str,
        cluster: &str,
        policy: Policy,
        locks: Vec<ActiveLock>,
        user_ca_roots: &[CertificateDer<'static>],
    ) -> Result<ClusterPolicy, String> {
        let mut roots = RootCertStore::empty();
        for root in user_ca_roots {
            roots
                .add(root.clone())
                .map_err(|e| format!("a user CA root is not usable: {e}"))?;
        }
        if roots.is_empty() {
            return Err("no user CA root: no user certificate could ever be verified".into());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("cannot build the user CA verifier: {e}"))?;
        // A user's next stream with the same certificate skips the chain verification (this
        // thread remembers it: jaunt_engine::verified, ARCHITECTURE.md).
        let verifier: Arc<dyn ClientCertVerifier> = Arc::new(
            jaunt_engine::verified::CachedClientVerifier::new(verifier, user_ca_roots),
        );
        Ok(ClusterPolicy {
            version: version.to_owned(),
            seq: 0,
            cluster: cluster.to_owned(),
            policy,
            locks,
            verifier,
            ssh_user_cas: Vec::new(),
            ssh_host_cas: Vec::new(),
        })
    }

    /// The same policy with the cluster's SSH CA keys (OpenSSH public key lines), which an
    /// agent that terminates SSH needs; fails on a line that does not parse.
    pub fn with_ssh_cas(mut self, user_ca: &[String], host_ca: &[String]) -> Result<Self, String> {
        let fingerprints = |lines: &[String], what: &str| {
            lines
                .iter()
                .map(|line| {
                    ssh_key::PublicKey::from_openssh(line.trim())
                        .map(|k| k.fingerprint(ssh_key::HashAlg::Sha256))
                        .map_err(|e| format!("the {what} CA's SSH key does not parse: {e}"))
                })
                .collect::<Result<Vec<_>, String>>()
        };
        self.ssh_user_cas = fingerprints(user_ca, "user")?;
        self.ssh_host_cas = fingerprints(host_ca, "host")?;
        Ok(self)
    }

    /// Fingerprints of the user CA's SSH keys (empty from an older control).
    pub(crate) fn ssh_user_cas(&self) -> &[ssh_key::Fingerprint] {
        &self.ssh_user_cas
    }

    /// Fingerprints of the host CA's SSH keys (empty from an older control).
    pub(crate) fn ssh_host_cas(&self) -> &[ssh_key::Fingerprint] {
        &self.ssh_host_cas
    }

    /// Compiles control's `GET /v1/agent/policy` answer: every role must compile (dropping one
    /// would drop its deny rules), every lock must parse, and the user CA must be usable.
    pub fn from_response(response: &AgentPolicyResponse) -> Result<ClusterPolicy, String> {
        let policy = Policy::compile_json(&response.roles).map_err(|e| e.to_string())?;
        let mut locks = Vec::with_capacity(response.locks.len());
        for entry in &response.locks {
            let lock: Lock = serde_json::from_value(entry.lock.clone())
                .map_err(|e| format!("a lock does not parse: {e}"))?;
            locks.push(ActiveLock::from_lock(&lock, entry.expires));
        }
        let mut roots = Vec::new();
        for pem in &response.user_ca {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.push(cert.map_err(|e| format!("the user CA is not PEM: {e:?}"))?);
            }
        }
        ClusterPolicy::new(&response.version, &response.cluster, policy, locks, &roots)?
            .with_ssh_cas(&response.user_ca_ssh, &response.host_ca_ssh)
            .map(|p| p.with_seq(response.seq))
    }

    /// This policy with control's sequence number `seq` (see [`ClusterPolicy::seq`]).
    pub fn with_seq(mut self, seq: u64) -> ClusterPolicy {
        self.seq = seq;
        self
    }

    /// Control's snapshot version of this policy: policies pushed by the engines and polled
    /// from control are ordered by it, and only a higher one replaces the one in force (0 =
    /// unknown: always replaces).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Control's version of this policy.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The locks it carries.
    pub fn locks(&self) -> &[ActiveLock] {
        &self.locks
    }

    /// The identity in `cert_der` (the certificate the engine forwarded with `header`), once
    /// the certificate is verified as a client certificate of the cluster's user CA valid at
    /// `now` (unix seconds) and found to be the user (and roles) the header names.
    pub fn verify_user(
        &self,
        header: &StreamHeader,
        cert_der: Option<&[u8]>,
        now: u64,
    ) -> Result<Identity, String> {
        let Some(der) = cert_der else {
            return Err(
                "the engine forwarded no user certificate with this stream, so the \
                        agent cannot check who the user is (is the engine older than the agent?)"
                    .into(),
            );
        };
        let end_entity = CertificateDer::from(der);
        let at = UnixTime::since_unix_epoch(Duration::from_secs(now));
        self.verifier
            .verify_client_cert(&end_entity, &[], at)
            .map_err(|e| format!("the user's certificate is not valid for this cluster: {e}"))?;
        let identity = jaunt_engine::verified::identity_of(der)
            .map_err(|e| format!("the user's certificate: {e}"))?;
        if identity.kind != IdentityKind::User {
            return Err(format!(
                "the certificate forwarded for user {:?} is a host certificate",
                header.user
            ));
        }
        if identity.name != header.user || identity.roles != header.roles {
            return Err(format!(
                "the stream names user {:?} with roles {:?}, but the certificate is {:?}'s with \
                 roles {:?}",
                header.user, header.roles, identity.name, identity.roles
            ));
        }
        Ok(identity)
    }

    /// [`rbac::authorize`] for `identity` on the stream `header` describes, to a target with
    /// `labels`, at `now`.
    pub fn authorize(
        &self,
        identity: &Identity,
        header: &StreamHeader,
        labels: &BTreeMap<String, String>,
        now: u64,
    ) -> Result<rbac::Decision, rbac::Denied> {
        let resource = rbac::Resource {
            kind: header.kind.resource_kind(),
            name: &header.target,
            labels,
        };
        rbac::authorize(
            &self.policy,
            identity,
            &resource,
            &request_of(header),
            &self.locks,
            now,
        )
    }
}

/// How long the agent waits for a pushed policy's bytes once the stream is accepted: the
/// engine writes it at once, so only a stuck stream takes this long.
pub const POLICY_PUSH_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Receives one policy the engine pushed over the tunnel (stream `jaunt-policy/1`, see
/// `jaunt_engine::tunnel::policy_push`): reads the document (bounded), and puts it in force if
/// it is newer than the one in force, ending the live sessions it refuses. An agent that does
/// not enforce (`PolicyMode::EngineOnly`) refuses the stream. A document that does not parse
/// or compile is logged and dropped: the policy in force stays (the same rule as for a poll).
pub(crate) async fn receive_push(
    incoming: jaunt_engine::tunnel::Incoming,
    guard: Rc<Guard>,
    shard: usize,
) {
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    use jaunt_engine::tunnel::policy_push::MAX_POLICY_BYTES;
    if guard.mode() == PolicyMode::EngineOnly {
        incoming.refuse("this agent does not enforce the cluster's policy (engine-only mode)");
        return;
    }
    let Ok(mut stream) = incoming.accept() else {
        return;
    };
    let mut document = Vec::new();
    let read = futures_lite::future::or(
        async {
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(true);
                }
                if document.len() + n > MAX_POLICY_BYTES {
                    return Ok(false);
                }
                document.extend_from_slice(&chunk[..n]);
            }
        },
        async {
            glommio::timer::Timer::new(POLICY_PUSH_READ_TIMEOUT).await;
            Err(std::io::Error::from(std::io::ErrorKind::TimedOut))
        },
    )
    .await;
    match read {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(
                shard,
                max = MAX_POLICY_BYTES,
                "pushed policy too large: dropped"
            );
            return;
        }
        Err(e) => {
            tracing::debug!(shard, error = %e, "pushed policy cut short");
            return;
        }
    }
    // Our FIN tells the engine the whole document was read.
    let _ = stream.close().await;
    drop(stream);
    let response: AgentPolicyResponse = match serde_json::from_slice(&document) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(shard, error = %e, "pushed policy does not parse: kept the current one");
            return;
        }
    };
    // Every shard pushes the same change: compile only what would replace the policy in force.
    if !guard.would_replace(response.seq) {
        return;
    }
    let policy = match ClusterPolicy::from_response(&response) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(shard, error = %e, "pushed policy is not usable: kept the current one");
            return;
        }
    };
    let locks = policy.locks().len();
    if let Some(ended) = guard.replace(Arc::new(policy), jaunt_config::identity::unix_now()) {
        tracing::info!(
            shard,
            version = %response.version,
            seq = response.seq,
            roles = response.roles.len(),
            locks,
            ended,
            "cluster policy pushed by the engine"
        );
    }
}

fn request_of(header: &StreamHeader) -> rbac::Request<'_> {
    rbac::Request {
        login: header.login.as_deref(),
        db_user: header.db_user.as_deref(),
        db_name: header.db_name.as_deref(),
    }
}

/// The labels of the resource `header` dials as this agent announces it: the host's labels
/// overlaid by the service's own (what the engine authorizes with).
pub(crate) fn announced_labels(
    host_labels: &BTreeMap<String, String>,
    services: &AgentServices,
    header: &StreamHeader,
) -> BTreeMap<String, String> {
    let own = match header.kind {
        DialKind::Ssh => services.ssh.as_ref().map(|ssh| &ssh.labels),
        DialKind::Tcp | DialKind::App => services
            .apps
            .iter()
            .find(|app| app.name == header.target)
            .map(|app| &app.labels),
        DialKind::Db => services
            .dbs
            .iter()
            .find(|db| db.name == header.target)
            .map(|db| &db.labels),
    };
    let mut labels = host_labels.clone();
    if let Some(own) = own {
        labels.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    labels
}

// ---- the executor's state ----------------------------------------------------------------------

/// What one live session is, for lock matching.
struct LiveSession {
    identity: Identity,
    header: StreamHeader,
    labels: BTreeMap<String, String>,
    end: Rc<EndSignal>,
}

/// The executor's policy and live sessions (one per executor; `Rc`, no locks).
pub(crate) struct Guard {
    mode: PolicyMode,
    current: RefCell<Option<Arc<ClusterPolicy>>>,
    sessions: RefCell<BTreeMap<u64, LiveSession>>,
    next_id: Cell<u64>,
}

/// Why a stream is refused by the agent's check: the message the user reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) message: String,
    /// `denied` (RBAC said no), `identity` (the certificate), `no_policy`, `busy`.
    pub(crate) reason: &'static str,
}

impl Guard {
    pub(crate) fn new(mode: PolicyMode) -> Guard {
        Guard {
            mode,
            current: RefCell::new(None),
            sessions: RefCell::new(BTreeMap::new()),
            next_id: Cell::new(1),
        }
    }

    pub(crate) fn mode(&self) -> PolicyMode {
        self.mode
    }

    /// The sequence number of the policy in force, if there is one.
    pub(crate) fn current_seq(&self) -> Option<u64> {
        self.current.borrow().as_ref().map(|p| p.seq)
    }

    /// Whether `seq` would replace the policy in force (see [`ClusterPolicy::seq`]).
    pub(crate) fn would_replace(&self, seq: u64) -> bool {
        match self.current_seq() {
            None => true,
            Some(current) => seq == 0 || current == 0 || seq > current,
        }
    }

    /// Puts `policy` in force, unless the one in force is as new (`None`), and ends the live
    /// sessions it refuses now: a lock matches them, or their roles no longer allow them (a
    /// role deleted or narrowed, a deny added). Returns how many it ended.
    pub(crate) fn replace(&self, policy: Arc<ClusterPolicy>, now: u64) -> Option<usize> {
        if !self.would_replace(policy.seq) {
            return None;
        }
        let mut ended = 0;
        for session in self.sessions.borrow().values() {
            let kind = session.header.kind.resource_kind();
            let resource = rbac::Resource {
                kind,
                name: &session.header.target,
                labels: &session.labels,
            };
            let request = request_of(&session.header);
            if let Some(lock) = policy
                .locks
                .iter()
                .find(|lock| rbac::lock_matches(lock, &session.identity, &resource, &request, now))
            {
                tracing::info!(
                    user = %session.identity.name,
                    kind = session.header.kind.as_str(),
                    target = %session.header.target,
                    lock = %lock.name,
                    "ending a live session: a lock matches it"
                );
                session.end.fire(Ended::Locked);
                ended += 1;
                continue;
            }
            // The certificate's expiry is `disconnect_expired_cert`'s business, not a role
            // change's: check at a moment within its validity.
            let at = now.clamp(
                session.identity.not_before,
                session
                    .identity
                    .expires
                    .saturating_sub(1)
                    .max(session.identity.not_before),
            );
            if let Err(denied) = rbac::authorize(
                &policy.policy,
                &session.identity,
                &resource,
                &request,
                &[],
                at,
            ) {
                tracing::info!(
                    user = %session.identity.name,
                    kind = session.header.kind.as_str(),
                    target = %session.header.target,
                    reason = %denied.message,
                    "ending a live session: its roles no longer allow it"
                );
                session.end.fire(Ended::Revoked);
                ended += 1;
            }
        }
        *self.current.borrow_mut() = Some(policy);
        Some(ended)
    }

    /// Checks a stream that asks for a role `rules` verb rather than a login (`jaunt join`:
    /// `session`/`join`): the forwarded certificate verified, then
    /// [`rbac::authorize_rule`] under the current roles and locks. Always `Ok` in
    /// [`PolicyMode::EngineOnly`].
    pub(crate) fn admit_rule(
        &self,
        header: &StreamHeader,
        cert_der: Option<&[u8]>,
        resource: &str,
        verb: &str,
        now: u64,
    ) -> Result<(), Refused> {
        if self.mode == PolicyMode::EngineOnly {
            return Ok(());
        }
        let Some(policy) = self.current.borrow().clone() else {
            return Err(Refused {
                message: NO_POLICY_YET.into(),
                reason: "no_policy",
            });
        };
        let identity = policy
            .verify_user(header, cert_der, now)
            .map_err(|message| Refused {
                message,
                reason: "identity",
            })?;
        rbac::authorize_rule(
            &policy.policy,
            &identity,
            resource,
            verb,
            &policy.locks,
            now,
        )
        .map_err(|denied| Refused {
            message: denied.message,
            reason: "denied",
        })
    }

    /// Checks a stream before it is served. `Ok(None)` in [`PolicyMode::EngineOnly`]; else the
    /// session's registration (dropping it unregisters), or why the stream is refused.
    pub(crate) fn admit(
        self: &Rc<Self>,
        header: &StreamHeader,
        cert_der: Option<&[u8]>,
        labels: BTreeMap<String, String>,
        now: u64,
    ) -> Result<Option<Session>, Refused> {
        if self.mode == PolicyMode::EngineOnly {
            return Ok(None);
        }
        let Some(policy) = self.current.borrow().clone() else {
            return Err(Refused {
                message: NO_POLICY_YET.into(),
                reason: "no_policy",
            });
        };
        let identity = policy
            .verify_user(header, cert_der, now)
            .map_err(|message| Refused {
                message,
                reason: "identity",
            })?;
        let decision = policy
            .authorize(&identity, header, &labels, now)
            .map_err(|denied| Refused {
                message: denied.message,
                reason: "denied",
            })?;
        if self.sessions.borrow().len() >= MAX_LIVE_SESSIONS {
            return Err(Refused {
                message: "the agent serves too many sessions; retry later".into(),
                reason: "busy",
            });
        }
        let id = self.next_id.get();
        self.next_id.set(id.wrapping_add(1));
        let end = Rc::new(EndSignal::default());
        self.sessions.borrow_mut().insert(
            id,
            LiveSession {
                identity,
                header: header.clone(),
                labels,
                end: end.clone(),
            },
        );
        Ok(Some(Session {
            guard: self.clone(),
            id,
            end,
            deadline: decision.session_deadline(),
            recording: crate::recording::recording_policy(&decision),
            permit_port_forwarding: decision.permit_port_forwarding,
            permit_agent_forwarding: decision.permit_agent_forwarding,
            policy,
        }))
    }

    #[cfg(test)]
    fn live(&self) -> usize {
        self.sessions.borrow().len()
    }
}

/// A registered live session; unregistered when dropped.
pub(crate) struct Session {
    guard: Rc<Guard>,
    id: u64,
    end: Rc<EndSignal>,
    /// When the session must end (unix seconds): the certificate's expiry, when a role sets
    /// `disconnect_expired_cert`.
    deadline: Option<u64>,
    /// Whether and how the session is recorded (the decision's `record_session`/`record_input`).
    pub(crate) recording: crate::recording::RecordingPolicy,
    /// The roles permit SSH port forwarding (a terminated session refuses `ssh -L`/`-R`
    /// otherwise).
    pub(crate) permit_port_forwarding: bool,
    /// The roles permit SSH agent forwarding (a terminated session refuses `ssh -A`
    /// otherwise).
    pub(crate) permit_agent_forwarding: bool,
    /// The policy that admitted it (its SSH CA keys check a terminated SSH session's
    /// certificates).
    pub(crate) policy: Arc<ClusterPolicy>,
}

/// Why an admitted session was ended by the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// A lock in a newer policy matches it.
    Locked,
    /// The roles of a newer policy no longer allow it.
    Revoked,
    /// The user's certificate expired and a role sets `disconnect_expired_cert`.
    CertificateExpired,
}

impl Session {
    /// Resolves when the session must end: a lock matched it, or its deadline passed.
    pub(crate) async fn ended(&self) -> Ended {
        let locked = self.end.wait();
        let Some(deadline) = self.deadline else {
            return locked.await;
        };
        let left = Duration::from_secs(deadline.saturating_sub(jaunt_config::identity::unix_now()));
        futures_lite::future::or(locked, async {
            glommio::timer::Timer::new(left).await;
            Ended::CertificateExpired
        })
        .await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.guard.sessions.borrow_mut().remove(&self.id);
    }
}

/// A one-shot signal with one waiter, carrying why the session ends.
#[derive(Default)]
struct EndSignal {
    fired: Cell<Option<Ended>>,
    waker: RefCell<Option<Waker>>,
}

impl EndSignal {
    fn fire(&self, why: Ended) {
        if self.fired.get().is_none() {
            self.fired.set(Some(why));
        }
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    async fn wait(&self) -> Ended {
        futures_lite::future::poll_fn(|cx| {
            if let Some(why) = self.fired.get() {
                return Poll::Ready(why);
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
mod tests {
    use jaunt_config::resource::LockTarget;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

    use super::*;

    const NOW: u64 = 1_800_000_000;

    struct Ca {
        issuer: rcgen::CertifiedIssuer<'static, KeyPair>,
    }

    impl Ca {
        fn new(name: &str) -> Ca {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2040, 1, 1);
            let issuer =
                rcgen::CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
            Ca { issuer }
        }

        fn der(&self) -> CertificateDer<'static> {
            self.issuer.der().clone()
        }

        fn user(&self, identity: &Identity) -> Vec<u8> {
            let key = KeyPair::generate().unwrap();
            identity
                .x509_params([7; 16], &[])
                .signed_by(&key, &self.issuer)
                .unwrap()
                .der()
                .to_vec()
        }
    }

    fn identity(name: &str, roles: &[&str]) -> Identity {
        Identity {
            kind: IdentityKind::User,
            name: name.into(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            logins: vec!["root".into()],
            db_users: Vec::new(),
            db_names: Vec::new(),
            traits: BTreeMap::new(),
            cluster: "test".into(),
            not_before: NOW - 60,
            expires: NOW + 3600,
            permit_pty: true,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
        }
    }

    fn header(user: &str, roles: &[&str], login: &str) -> StreamHeader {
        StreamHeader {
            join: None,
            terminal: false,
            kind: DialKind::Ssh,
            target: "node1".into(),
            login: Some(login.into()),
            db_user: None,
            db_name: None,
            user: user.into(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            client_addr: "192.0.2.1:5555".into(),
            allowed_db_users: Vec::new(),
            allowed_db_names: Vec::new(),
            session_id: None,
        }
    }

    /// A resource document as control stores it: parsed from YAML, serialized to JSON.
    fn document(yaml: &str) -> serde_json::Value {
        use jaunt_config::resource::{parse_resources, Resource};
        match parse_resources("test.yaml", yaml).unwrap().remove(0) {
            Resource::Role(role) => serde_json::to_value(&role).unwrap(),
            Resource::Lock(lock) => serde_json::to_value(&lock).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    fn role(name: &str, logins: &[&str], deny_logins: &[&str]) -> serde_json::Value {
        document(&format!(
            "kind: role\nversion: v1\nmetadata: {{ name: {name} }}\nspec:\n  allow:\n    \
             logins: {logins:?}\n    node_labels: {{ env: prod }}\n  deny:\n    \
             logins: {deny_logins:?}\n"
        ))
    }

    fn lock(name: &str, target: &str) -> jaunt_config::api::AgentPolicyLock {
        jaunt_config::api::AgentPolicyLock {
            lock: document(&format!(
                "kind: lock\nversion: v1\nmetadata: {{ name: {name} }}\nspec:\n  \
                 target: {{ {target} }}\n  message: incident 42\n"
            )),
            expires: None,
        }
    }

    fn policy(ca: &Ca, locks: Vec<jaunt_config::api::AgentPolicyLock>) -> ClusterPolicy {
        let response = AgentPolicyResponse {
            version: "v1".into(),
            seq: 0,
            cluster: "test".into(),
            roles: [
                (
                    "access".to_owned(),
                    role("access", &["root", "ubuntu"], &[]),
                ),
                ("no-root".to_owned(), role("no-root", &[], &["root"])),
            ]
            .into(),
            locks,
            user_ca: vec![ca_pem(&ca.der())],
            user_ca_ssh: Vec::new(),
            host_ca_ssh: Vec::new(),
            host_ca: Vec::new(),
            ca_generation: String::new(),
            renew_host_cert: false,
            engines: Vec::new(),
        };
        ClusterPolicy::from_response(&response).unwrap()
    }

    fn ca_pem(der: &[u8]) -> String {
        use base64::Engine as _;
        let text = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = text
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        )
    }

    fn prod() -> BTreeMap<String, String> {
        [("env".to_owned(), "prod".to_owned())].into()
    }

    #[test]
    fn the_certificate_must_chain_to_the_user_ca_and_name_the_header_user() {
        let ca = Ca::new("user ca");
        let other = Ca::new("someone else");
        let p = policy(&ca, Vec::new());
        let alice = identity("alice", &["access"]);
        let cert = ca.user(&alice);
        let h = header("alice", &["access"], "root");
        assert_eq!(p.verify_user(&h, Some(&cert), NOW).unwrap().name, "alice");

        let forged = other.user(&alice);
        let e = p.verify_user(&h, Some(&forged), NOW).unwrap_err();
        assert!(e.contains("not valid for this cluster"), "{e}");
        let e = p.verify_user(&h, Some(&cert), NOW + 7200).unwrap_err();
        assert!(e.contains("not valid for this cluster"), "{e}");
        let e = p.verify_user(&h, None, NOW).unwrap_err();
        assert!(e.contains("no user certificate"), "{e}");
        let e = p
            .verify_user(&header("mallory", &["access"], "root"), Some(&cert), NOW)
            .unwrap_err();
        assert!(e.contains("\"mallory\"") && e.contains("\"alice\""), "{e}");
        let e = p
            .verify_user(&header("alice", &["editor"], "root"), Some(&cert), NOW)
            .unwrap_err();
        assert!(e.contains("editor"), "{e}");
        let e = p.verify_user(&h, Some(b"garbage"), NOW).unwrap_err();
        assert!(e.contains("not valid"), "{e}");
        let mut host = identity("alice", &["access"]);
        host.kind = IdentityKind::Host;
        let e = p.verify_user(&h, Some(&ca.user(&host)), NOW).unwrap_err();
        assert!(e.contains("host certificate"), "{e}");
        assert!(ClusterPolicy::new("v", "c", Policy::default(), Vec::new(), &[]).is_err());
    }

    #[test]
    fn decisions_map_the_header_onto_rbac() {
        let ca = Ca::new("user ca");
        let p = policy(&ca, Vec::new());
        let alice = identity("alice", &["access"]);
        let h = header("alice", &["access"], "root");
        assert!(p.authorize(&alice, &h, &prod(), NOW).is_ok());
        let e = p.authorize(&alice, &h, &BTreeMap::new(), NOW).unwrap_err();
        assert!(
            e.message.contains("node1") && e.message.contains("no role allows"),
            "{e}"
        );
        let bob = identity("bob", &["access", "no-root"]);
        let e = p
            .authorize(
                &bob,
                &header("bob", &["access", "no-root"], "root"),
                &prod(),
                NOW,
            )
            .unwrap_err();
        assert!(e.message.contains("role no-root denies"), "{e}");
        let locked = policy(&ca, vec![lock("l1", "user: alice")]);
        let e = locked.authorize(&alice, &h, &prod(), NOW).unwrap_err();
        assert!(e.message.contains("incident 42"), "{e}");
        assert_eq!(locked.locks()[0].target, LockTarget::User("alice".into()));
    }

    #[test]
    fn the_guard_refuses_until_a_policy_arrives_and_locks_end_live_sessions() {
        let ca = Ca::new("user ca");
        let alice = identity("alice", &["access"]);
        let bob = identity("bob", &["access"]);
        let (a_cert, b_cert) = (ca.user(&alice), ca.user(&bob));
        let (a, b) = (
            header("alice", &["access"], "root"),
            header("bob", &["access"], "root"),
        );

        let engine_only = Rc::new(Guard::new(PolicyMode::EngineOnly));
        assert!(engine_only.admit(&a, None, prod(), NOW).unwrap().is_none());

        let guard = Rc::new(Guard::new(PolicyMode::Enforce));
        let e = guard.admit(&a, Some(&a_cert), prod(), NOW).err().unwrap();
        assert_eq!((e.message.as_str(), e.reason), (NO_POLICY_YET, "no_policy"));
        assert_eq!(
            guard.replace(Arc::new(policy(&ca, Vec::new())), NOW),
            Some(0)
        );
        let e = guard
            .admit(&a, Some(&a_cert), BTreeMap::new(), NOW)
            .err()
            .unwrap();
        assert_eq!(e.reason, "denied");
        let alice_session = guard
            .admit(&a, Some(&a_cert), prod(), NOW)
            .unwrap()
            .unwrap();
        let bob_session = guard
            .admit(&b, Some(&b_cert), prod(), NOW)
            .unwrap()
            .unwrap();
        assert_eq!(guard.live(), 2);
        let locked = policy(&ca, vec![lock("l1", "user: alice")]);
        assert_eq!(guard.replace(Arc::new(locked), NOW), Some(1));
        assert_eq!(alice_session.end.fired.get(), Some(Ended::Locked));
        assert!(bob_session.end.fired.get().is_none());
        drop(alice_session);
        assert_eq!(guard.live(), 1);
        let e = guard.admit(&a, Some(&a_cert), prod(), NOW).err().unwrap();
        assert!(e.message.contains("incident 42"), "{}", e.message);
    }

    #[test]
    fn a_session_ends_at_the_certificates_expiry_when_a_role_says_so() {
        let ca = Ca::new("user ca");
        let now = jaunt_config::identity::unix_now();
        let mut alice = identity("alice", &["strict"]);
        alice.not_before = now - 60;
        alice.expires = now + 1;
        let strict = document(
            "kind: role\nversion: v1\nmetadata: { name: strict }\nspec:\n  options:\n    \
             disconnect_expired_cert: true\n  allow:\n    logins: [root]\n    \
             node_labels: { env: prod }\n",
        );
        let response = AgentPolicyResponse {
            version: "v1".into(),
            seq: 0,
            cluster: "test".into(),
            roles: [("strict".to_owned(), strict)].into(),
            locks: Vec::new(),
            user_ca: vec![ca_pem(&ca.der())],
            user_ca_ssh: Vec::new(),
            host_ca_ssh: Vec::new(),
            host_ca: Vec::new(),
            ca_generation: String::new(),
            renew_host_cert: false,
            engines: Vec::new(),
        };
        let guard = Rc::new(Guard::new(PolicyMode::Enforce));
        guard.replace(
            Arc::new(ClusterPolicy::from_response(&response).unwrap()),
            now,
        );
        let session = guard
            .admit(
                &header("alice", &["strict"], "root"),
                Some(&ca.user(&alice)),
                prod(),
                now,
            )
            .unwrap()
            .unwrap();
        assert_eq!(session.deadline, Some(now + 1));
        let ended = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(64 << 10)
            .make()
            .unwrap()
            .run(async move { session.ended().await });
        assert_eq!(ended, Ended::CertificateExpired);
    }

    #[test]
    fn labels_are_the_host_labels_under_the_service_labels() {
        let services = AgentServices {
            ssh: Some(jaunt_config::file::SshService {
                addr: "127.0.0.1:22".parse().unwrap(),
                labels: [("env".to_owned(), "staging".to_owned())].into(),
            }),
            apps: Vec::new(),
            dbs: Vec::new(),
        };
        let host: BTreeMap<String, String> = [
            ("env".to_owned(), "prod".to_owned()),
            ("team".to_owned(), "web".to_owned()),
        ]
        .into();
        let labels = announced_labels(&host, &services, &header("a", &[], "root"));
        assert_eq!(labels.get("env").map(String::as_str), Some("staging"));
        assert_eq!(labels.get("team").map(String::as_str), Some("web"));
    }
}
