//! The one authorization decision of a user stream: may this identity dial this target, given
//! the current snapshot? [`authorize`] is a pure function (no I/O, no clock beyond what the
//! caller passes in the identity checks it already did), called once per dial request after the
//! certificate has been verified by rustls, its validity window checked, and routing has
//! resolved the target (which agent serves it, with its labels) from the shard's tunnels, the
//! engine's directory or the snapshot's `targets`.
//!
//! Today it allows every dial to a resolved target. The authorization issue fills in role
//! matching (logins, db users/names, labels) and locks here, behind the same signature, so the
//! connection code does not change. A target nobody serves is refused before this, by routing,
//! with [`Denied::unknown_target`]'s message; a forbidden target must read the same once roles
//! hide resources, so that a refusal does not reveal what exists.

use jaunt_config::identity::Identity;

use crate::server::dial::DialRequest;
use crate::server::snapshot::{Snapshot, Target};

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

/// Decides whether `identity` may dial `request`, which routing resolved to `target`, under
/// `snapshot`.
pub fn authorize(
    snapshot: &Snapshot,
    identity: &Identity,
    request: &DialRequest,
    target: &Target,
) -> Result<(), Denied> {
    let _ = (snapshot, identity, request, target);
    Ok(())
}

#[cfg(test)]
mod tests {
    use jaunt_config::identity::IdentityKind;

    use super::*;
    use crate::server::dial::DialKind;

    fn alice() -> Identity {
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
            ..Snapshot::default()
        };
        let mut request = DialRequest {
            kind: DialKind::Ssh,
            target: "web1".into(),
            login: Some("root".into()),
            db_user: None,
            db_name: None,
        };
        assert_eq!(
            authorize(&snapshot, &alice(), &request, &Target::on_host("h1")),
            Ok(())
        );
        request.target = "web2".into();
        let denied = Denied::unknown_target(&snapshot, &request);
        assert_eq!(denied.kind, DeniedKind::UnknownTarget);
        assert_eq!(denied.message, r#"no such node "web2" in cluster "test""#);
    }
}
