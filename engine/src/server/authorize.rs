//! The one authorization decision of a user stream: may this identity dial this target, given
//! the current snapshot? [`authorize`] is a pure function (no I/O, no clock beyond what the
//! caller passes in the identity checks it already did), called once per dial request after the
//! certificate has been verified by rustls, its validity window checked, and routing has
//! resolved the target (which agent serves it, with its labels) from the shard's tunnels, the
//! engine's directory or the snapshot's `targets`.
//!
//! It maps the dial onto [`jaunt_config::rbac::authorize`] — the one RBAC function engine and
//! agent share (deny wins, per-role allow of labels and principals, traits, locks, certificate
//! validity) — with the snapshot's compiled policy and locks. A target nobody serves is refused
//! before this, by routing, with [`Denied::unknown_target`]'s message. A refusal names the
//! resource and the rule, as the authorization issue asks.

use jaunt_config::identity::Identity;

use crate::server::snapshot::{Snapshot, Target};
use jaunt_config::wire::dial::DialRequest;

/// Why a dial was refused. The message is shown to the user as is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Denied {
    /// Machine-readable kind, for metrics.
    pub kind: DeniedKind,
    /// What the user reads.
    pub message: String,
}

/// Kinds of refusal, with stable metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeniedKind {
    /// The target is not registered (no such node, database or app).
    UnknownTarget,
    /// Roles do not allow it, or a lock matches.
    Forbidden,
}

impl Denied {
    /// Nobody serves `request`'s target: `no such node "web9" in cluster "prod"`.
    pub fn unknown_target(snapshot: &Snapshot, request: &DialRequest) -> Denied {
        Denied {
            kind: DeniedKind::UnknownTarget,
            message: format!(
                "no such {} {:?} in cluster {:?}",
                request.kind.noun(),
                request.target,
                snapshot.cluster
            ),
        }
    }
}

/// What an allowed dial's session must respect, from the identity's roles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allowed {
    /// When the session must end (unix seconds; the certificate's expiry when a role sets
    /// `disconnect_expired_cert`), if ever.
    pub session_deadline: Option<u64>,
    /// Close the session after this long without traffic (the roles' shortest
    /// `client_idle_timeout`), if set; the engine's own idle timeout applies as well.
    pub idle_timeout: Option<std::time::Duration>,
    /// The roles ask for the session to be recorded (`record_session` not `off`, an SSH
    /// dial): the agent terminates and records it.
    pub recorded: bool,
}

/// Decides whether `identity` may dial `request`, which routing resolved to `target`, under
/// `snapshot`, and if so under which session limits.
pub fn authorize(
    snapshot: &Snapshot,
    identity: &Identity,
    request: &DialRequest,
    target: &Target,
) -> Result<Allowed, Denied> {
    use jaunt_config::rbac;
    if request.join.is_some() {
        return authorize_join(snapshot, identity);
    }
    let (resource, rbac_request) = subject(request, &target.labels);
    let now = jaunt_config::identity::unix_now();
    rbac::authorize(
        &snapshot.policy,
        identity,
        &resource,
        &rbac_request,
        &snapshot.active_locks,
        now,
    )
    .map(|decision| Allowed {
        session_deadline: decision.session_deadline(),
        idle_timeout: decision.idle_timeout,
        recorded: request.kind == jaunt_config::wire::DialKind::Ssh
            && decision.record_session != jaunt_config::resource::RecordSession::Off,
    })
    .map_err(|denied| Denied {
        kind: DeniedKind::Forbidden,
        message: denied.message,
    })
}

/// `jaunt join`: watching a live session read-only needs the role rule `session`/`join` (not a
/// login on the node); the certificate's validity and locks on the user or its roles apply.
fn authorize_join(snapshot: &Snapshot, identity: &Identity) -> Result<Allowed, Denied> {
    let now = jaunt_config::identity::unix_now();
    jaunt_config::rbac::authorize_rule(
        &snapshot.policy,
        identity,
        "session",
        "join",
        &snapshot.active_locks,
        now,
    )
    .map(|()| Allowed {
        session_deadline: Some(identity.expires),
        idle_timeout: None,
        recorded: false,
    })
    .map_err(|denied| Denied {
        kind: DeniedKind::Forbidden,
        message: denied.message,
    })
}

/// Why the roles of `snapshot` no longer allow a live session of `identity` on `request` to a
/// target with `labels`, or `None` if they still do. Locks are not consulted (see
/// [`matching_lock`]), nor the certificate's expiry: the check runs at `now` clamped into the
/// certificate's validity, since a session outliving its certificate is the business of the
/// roles' `disconnect_expired_cert`, not of a role change.
pub fn revoked(
    snapshot: &Snapshot,
    identity: &Identity,
    request: &DialRequest,
    labels: &std::collections::BTreeMap<String, String>,
    now: u64,
) -> Option<jaunt_config::rbac::Denied> {
    use jaunt_config::rbac;
    let (resource, rbac_request) = subject(request, labels);
    let at = now.clamp(
        identity.not_before,
        identity.expires.saturating_sub(1).max(identity.not_before),
    );
    if request.join.is_some() {
        // An observer needs the `session`/`join` rule still, not a login on the node.
        return rbac::authorize_rule(&snapshot.policy, identity, "session", "join", &[], at).err();
    }
    rbac::authorize(
        &snapshot.policy,
        identity,
        &resource,
        &rbac_request,
        &[],
        at,
    )
    .err()
}

/// The first of `locks` that matches `identity` on `request` to a target with `labels` at `now`
/// (unix seconds): a live session it matches must end.
pub fn matching_lock<'a>(
    locks: &'a [jaunt_config::rbac::ActiveLock],
    identity: &Identity,
    request: &DialRequest,
    labels: &std::collections::BTreeMap<String, String>,
    now: u64,
) -> Option<&'a jaunt_config::rbac::ActiveLock> {
    let (resource, rbac_request) = subject(request, labels);
    locks.iter().find(|lock| {
        jaunt_config::rbac::lock_matches(lock, identity, &resource, &rbac_request, now)
    })
}

/// What authorization sees of `request` to a target with `labels`: the resource (its kind from
/// the one mapping, [`jaunt_config::wire::DialKind::resource_kind`]) and what is asked of it.
fn subject<'a>(
    request: &'a DialRequest,
    labels: &'a std::collections::BTreeMap<String, String>,
) -> (
    jaunt_config::rbac::Resource<'a>,
    jaunt_config::rbac::Request<'a>,
) {
    let resource = jaunt_config::rbac::Resource {
        kind: request.kind.resource_kind(),
        name: &request.target,
        labels,
    };
    let asked = jaunt_config::rbac::Request {
        login: request.login.as_deref(),
        db_user: request.db_user.as_deref(),
        db_name: request.db_name.as_deref(),
    };
    (resource, asked)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
pub(crate) mod tests {
    use jaunt_config::identity::IdentityKind;

    use super::*;
    use jaunt_config::wire::dial::DialKind;

    /// A user with the built-in `access` role and the login `root` (the session decision's
    /// tests use her too).
    pub(crate) fn alice() -> Identity {
        Identity {
            kind: IdentityKind::User,
            name: "alice".into(),
            roles: vec!["access".into()],
            logins: vec!["root".into()],
            db_users: vec![],
            db_names: vec![],
            traits: Default::default(),
            cluster: "test".into(),
            not_before: 0,
            expires: u64::MAX,
            permit_pty: true,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
        }
    }

    #[test]
    fn resolved_targets_are_allowed_unknown_ones_named() {
        let snapshot = Snapshot {
            version: 1,
            cluster: "test".into(),
            policy: jaunt_config::rbac::Policy::compile(&[
                jaunt_config::resource::Role::builtin_access(),
            ])
            .unwrap(),
            ..Snapshot::default()
        };
        let mut request = DialRequest {
            join: None,
            kind: DialKind::Ssh,
            target: "web1".into(),
            login: Some("root".into()),
            db_user: None,
            db_name: None,
        };
        assert_eq!(
            authorize(&snapshot, &alice(), &request, &Target::on_host("h1")),
            // The built-in access role records SSH (best_effort).
            Ok(Allowed {
                recorded: true,
                ..Allowed::default()
            })
        );
        // A login the identity does not carry is refused, naming the node and the login.
        request.login = Some("postgres".into());
        let denied = authorize(&snapshot, &alice(), &request, &Target::on_host("h1")).unwrap_err();
        assert_eq!(denied.kind, DeniedKind::Forbidden);
        assert!(
            denied.message.contains("web1") && denied.message.contains("postgres"),
            "{}",
            denied.message
        );
        // No roles at all: nothing is allowed.
        let empty = Snapshot {
            version: 1,
            cluster: "test".into(),
            ..Snapshot::default()
        };
        request.login = Some("root".into());
        assert!(authorize(&empty, &alice(), &request, &Target::on_host("h1")).is_err());
        request.target = "web2".into();
        let denied = Denied::unknown_target(&snapshot, &request);
        assert_eq!(denied.kind, DeniedKind::UnknownTarget);
        assert_eq!(denied.message, r#"no such node "web2" in cluster "test""#);
    }
}
