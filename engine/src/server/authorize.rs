//! The one authorization decision of a user stream: may this identity dial this target, given
//! the current snapshot? [`authorize`] is a pure function (no I/O, no clock beyond what the
//! caller passes in the identity checks it already did), called once per dial request after the
//! certificate has been verified by rustls and its validity window checked.
//!
//! Today it allows every dial whose target is registered in the snapshot and tells the user when
//! it is not. The authorization issue fills in role matching (logins, db users/names, labels)
//! and locks here, behind the same signature, so the connection code does not change.

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

/// Decides whether `identity` may dial `request` under `snapshot`; on success, returns the
/// target (and so the agent that serves it).
pub fn authorize<'s>(
    snapshot: &'s Snapshot,
    identity: &Identity,
    request: &DialRequest,
) -> Result<&'s Target, Denied> {
    let _ = identity;
    snapshot
        .targets
        .get(request.kind, &request.target)
        .ok_or_else(|| Denied {
            kind: DeniedKind::UnknownTarget,
            message: format!(
                "no such {} {:?} in cluster {:?}",
                request.kind.noun(),
                request.target,
                snapshot.cluster
            ),
        })
}

#[cfg(test)]
mod tests {
    use jaunt_config::identity::IdentityKind;

    use super::*;
    use crate::server::dial::DialKind;
    use crate::server::snapshot::Targets;

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
    fn known_targets_are_allowed_unknown_ones_named() {
        let snapshot = Snapshot {
            version: 1,
            cluster: "test".into(),
            targets: Targets::default().with(DialKind::Ssh, "web1", Target::on_host("h1")),
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
            authorize(&snapshot, &alice(), &request).map(|t| t.host_id.as_str()),
            Ok("h1")
        );
        request.target = "web2".into();
        let denied = authorize(&snapshot, &alice(), &request).err();
        assert_eq!(
            denied.as_ref().map(|d| d.kind),
            Some(DeniedKind::UnknownTarget)
        );
        assert_eq!(
            denied.map(|d| d.message),
            Some(r#"no such node "web2" in cluster "test""#.to_owned())
        );
    }
}
