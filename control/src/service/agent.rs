//! What agents (host certificates) ask control for: `GET /v1/agent/policy`, `POST
//! /v1/agent/ssh/host-cert`, `POST /v1/agent/ssh/user-cert`, `POST /v1/db/cert` and `POST
//! /v1/app/jwt`.
//!
//! Not here: the agent's side of these calls (`agent_host/`), the policy document's building (the snapshot, `mod.rs`), agents' audit
//! events (`audit_log.rs`).

use jaunt_config::api::{AgentPolicyResponse, AppJwtRequest, AppJwtResponse};
use jaunt_config::identity::{unix_now, Identity, IdentityKind};

use super::{internal, seal_agent_policy, Control, Reply, APP_HOST_ROLE};
use crate::audit;
use crate::ca::{self, CaKind};
use crate::http::{Request, Response};

impl Control {
    /// An agent's database client certificate for one database user, from the db CA: host
    /// identities with role `db` only (agents joined with a `db` token). The engine authorized
    /// the user's dial and the agent checked the database user against the user's certificate.
    pub(super) fn db_cert(&self, req: &Request, caller: &Identity) -> Reply {
        use crate::db_certs;
        use jaunt_config::api::{DbCertRequest, DbCertResponse, DB_HOST_ROLE};
        if caller.kind != IdentityKind::Host || !caller.roles.iter().any(|r| r == DB_HOST_ROLE) {
            return Err(Response::error(
                403,
                "only agents that joined with a db token (jaunt tokens add --type db) get \
                 database certificates",
            ));
        }
        let body: DbCertRequest = req.json()?;
        db_certs::valid_db_user(&body.db_user).map_err(|e| Response::error(400, e))?;
        let spki = ca::spki_pem_to_der(&body.tls_public_key)
            .map_err(|e| Response::error(400, e.to_string()))?;
        let now = unix_now();
        let ttl = body
            .ttl_secs
            .unwrap_or(db_certs::DB_CLIENT_CERT_TTL_SECS)
            .clamp(60, db_certs::MAX_DB_CLIENT_CERT_TTL_SECS);
        let identity =
            db_certs::db_client_identity(&self.settings.cluster, &body.db_user, now, ttl);
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
    pub(super) fn app_jwt(&self, req: &Request, caller: &Identity) -> Reply {
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
    pub(super) fn agent_policy(&self, req: &Request, caller: &Identity) -> Reply {
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

    /// A terminating agent's host certificate for its own node name (`agent_ssh.rs`).
    pub(super) fn agent_ssh_host_cert(&self, req: &Request, caller: &Identity) -> Reply {
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
    pub(super) fn agent_ssh_user_cert(&self, req: &Request, caller: &Identity) -> Reply {
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
}
