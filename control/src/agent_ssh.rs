//! SSH termination at the agent (issue 10), control's side of it:
//!
//! - what control signs for a terminating agent: the host certificate the agent presents to
//!   users ([`host_cert_identity`]: the host CA, principals = the node name the agent joined
//!   with and `NAME.<cluster>`) and the short-lived user certificate it logs in to its node's
//!   sshd with ([`node_login_identity`]: the user CA, which sshd already trusts through
//!   `TrustedUserCAKeys`; one login, [`NODE_LOGIN_CERT_TTL_SECS`]), after
//!   [`verify_forwarded_user`] checked the user's X.509 certificate the engine forwarded to the
//!   agent and that it carries the login. The HTTP handlers (`POST /v1/agent/ssh/host-cert`,
//!   `POST /v1/agent/ssh/user-cert`) are in `service/agent.rs`.
//!
//! Not here: the agent's side of these calls (`agent_host/certs.rs`), the SSH protocol (the
//! agent's `ssh_term.rs`), recordings' upload and storage.
//!
//! Trust note: a host with role `node` can get a user certificate for a login only with a user
//! certificate (X.509, valid now, from the user CA) that carries that login, so a compromised
//! agent can mint logins only for users who connected through it, for the rest of their
//! certificates' lifetime. The certificates it gets live [`NODE_LOGIN_CERT_TTL_SECS`].

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use jaunt_config::identity::{Identity, IdentityKind};
use rustls_pki_types::{CertificateDer, UnixTime};

/// Lifetime of the user certificate an agent logs in to its sshd with: sshd checks it at
/// authentication only, so it need not outlive the login.
pub const NODE_LOGIN_CERT_TTL_SECS: u64 = 120;
/// The role a host needs for the SSH termination endpoints (agents joined with a `node` token):
/// the API's.
pub use jaunt_config::api::NODE_HOST_ROLE;
/// Longest login accepted.
pub const MAX_LOGIN_BYTES: usize = 256;

/// Whether `caller` may use the SSH termination endpoints.
pub fn may_terminate(caller: &Identity) -> Result<(), String> {
    if caller.kind != IdentityKind::Host || !caller.roles.iter().any(|r| r == NODE_HOST_ROLE) {
        return Err("only agents that joined with a node token get SSH certificates".into());
    }
    Ok(())
}

/// The host certificate identity for the agent `caller` (its node name is the first login of
/// its host certificate, the `host_name` it joined with).
pub fn host_cert_identity(
    caller: &Identity,
    cluster: &str,
    now: u64,
    ttl_secs: u64,
) -> Result<Identity, String> {
    let Some(node) = caller.logins.first() else {
        return Err("the host certificate names no node".into());
    };
    Ok(Identity {
        roles: vec![NODE_HOST_ROLE.into()],
        logins: vec![node.clone(), format!("{node}.{cluster}")],
        ..Identity::issued(IdentityKind::Host, node, cluster, now, ttl_secs)
    })
}

/// Checks the user's X.509 certificate an agent forwards: issued by the user CA (`user_ca`),
/// valid at `now`, a user of `cluster`. Returns its identity.
pub fn verify_forwarded_user(
    user_ca: &CertificateDer<'static>,
    cluster: &str,
    cert_der: &[u8],
    now: u64,
) -> Result<Identity, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(user_ca.clone())
        .map_err(|e| format!("the user CA is not usable: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("the user CA is not usable: {e}"))?;
    verifier
        .verify_client_cert(
            &CertificateDer::from(cert_der),
            &[],
            UnixTime::since_unix_epoch(Duration::from_secs(now)),
        )
        .map_err(|e| format!("the user's certificate is not valid: {e}"))?;
    let identity =
        Identity::from_x509_der(cert_der).map_err(|e| format!("the user's certificate: {e}"))?;
    if identity.kind != IdentityKind::User || identity.cluster != cluster {
        return Err("the forwarded certificate is not a user certificate of this cluster".into());
    }
    Ok(identity)
}

/// The user certificate identity for `user` logging in to a node as `login`, for
/// [`NODE_LOGIN_CERT_TTL_SECS`]: only that login, the user's forwarding permissions.
pub fn node_login_identity(user: &Identity, login: &str, now: u64) -> Result<Identity, String> {
    if login.is_empty() || login.len() > MAX_LOGIN_BYTES || login.chars().any(char::is_control) {
        return Err("the login is empty, too long or has control characters".into());
    }
    if !user.logins.iter().any(|l| l == login) {
        return Err(format!(
            "user {} may not log in as {login:?} (not among the certificate's logins)",
            user.name
        ));
    }
    Ok(Identity {
        logins: vec![login.to_string()],
        not_before: now.saturating_sub(60),
        expires: (now + NODE_LOGIN_CERT_TTL_SECS).min(user.expires.max(now + 1)),
        ..user.clone()
    })
}

/// Decodes the base64 DER of a forwarded user certificate.
pub fn decode_user_cert(b64: &str) -> Result<Vec<u8>, String> {
    if b64.len() > 64 << 10 {
        return Err("user_cert is too long".into());
    }
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| format!("user_cert is not base64: {e}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn user() -> Identity {
        Identity {
            kind: IdentityKind::User,
            name: "alice".into(),
            roles: vec!["access".into()],
            logins: vec!["root".into()],
            db_users: vec![],
            db_names: vec![],
            traits: Default::default(),
            cluster: "c".into(),
            not_before: 0,
            expires: 10_000,
            permit_pty: true,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
        }
    }

    #[test]
    fn node_login_is_one_login_the_user_has_and_short() {
        let id = node_login_identity(&user(), "root", 1000).unwrap();
        assert_eq!(id.logins, vec!["root".to_string()]);
        assert_eq!(id.expires, 1000 + NODE_LOGIN_CERT_TTL_SECS);
        assert!(id.permit_pty && !id.permit_port_forwarding);
        let err = node_login_identity(&user(), "postgres", 1000).unwrap_err();
        assert!(err.contains("postgres"), "{err}");
        assert!(node_login_identity(&user(), "", 1000).is_err());
        // never past the user's own certificate
        assert_eq!(
            node_login_identity(&user(), "root", 9990).unwrap().expires,
            10_000
        );
    }

    #[test]
    fn host_cert_names_the_node_and_its_cluster_name() {
        let mut host = user();
        host.kind = IdentityKind::Host;
        host.roles = vec!["node".into()];
        host.logins = vec!["node1".into(), "abcd".into()];
        assert!(may_terminate(&host).is_ok() && may_terminate(&user()).is_err());
        let id = host_cert_identity(&host, "dev", 100, 3600).unwrap();
        assert_eq!(
            id.logins,
            vec!["node1".to_string(), "node1.dev".to_string()]
        );
        assert_eq!(id.kind, IdentityKind::Host);
    }
}
