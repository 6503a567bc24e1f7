//! The CA endpoints for administrators: `GET /v1/ca/TYPE` (export), `POST
//! /v1/ca/sign-host`, `POST /v1/ca/sign-db` and `POST /v1/ca/rotate`.
//!
//! Not here: the CAs and signing (`ca.rs`), the rotation's phases (`rotation.rs`),
//! certificates for logins and joins (`login.rs`) or for agents (`agent.rs`).

use std::collections::BTreeMap;

use jaunt_config::api::{CaExport, SignHostRequest, SignHostResponse};
use jaunt_config::identity::{unix_now, Identity, IdentityKind};

use super::{internal, valid_name, Control, Reply};
use crate::audit;
use crate::ca::{self, CaKind};
use crate::http::{Request, Response};

impl Control {
    pub(super) fn export_ca(&self, caller: &Identity, ty: &str) -> Reply {
        self.require(caller, "ca", "read")?;
        let cas = self.cas();
        let lines = |keys: &[String], prefix: &str| -> String {
            keys.iter().map(|k| format!("{prefix}{k}\n")).collect()
        };
        let text = match ty {
            // During a rotation both CAs: sshd's TrustedUserCAKeys, known_hosts'
            // @cert-authority lines and ssl_ca_file trust every CA the cluster trusts.
            "user-ssh" => lines(&cas.ssh_lines(CaKind::User), ""),
            "host-ssh" => lines(&cas.ssh_lines(CaKind::Host), "@cert-authority * "),
            "user-tls" => cas.trusted_pem(CaKind::User),
            "host-tls" => cas.trusted_pem(CaKind::Host),
            "db" | "db-tls" => cas.trusted_pem(CaKind::Db),
            other => {
                return Err(Response::error(400, format!("unknown CA type {other:?}: expected user-ssh, host-ssh, user-tls, host-tls or db")));
            }
        };
        Ok(Response::json(
            200,
            &CaExport {
                r#type: ty.to_string(),
                text,
            },
        ))
    }

    pub(super) fn sign_host(&self, req: &Request, caller: &Identity) -> Reply {
        self.require(caller, "ca", "create")?;
        let body: SignHostRequest = req.json()?;
        valid_name("host", &body.host)?;
        let public = ssh_key::PublicKey::from_openssh(&body.ssh_public_key)
            .map_err(|e| Response::error(400, format!("ssh_public_key: {e}")))?;
        let now = unix_now();
        let identity = Identity {
            kind: IdentityKind::Host,
            name: body.host.clone(),
            roles: vec!["node".into()],
            // `NODE.<cluster>` too: how `jaunt config` names nodes to plain ssh, which checks
            // the host certificate against the name it was given.
            logins: vec![
                body.host.clone(),
                format!("{}.{}", body.host, self.settings.cluster),
            ],
            db_users: vec![],
            db_names: vec![],
            traits: BTreeMap::new(),
            cluster: self.settings.cluster.clone(),
            not_before: now.saturating_sub(60),
            expires: now
                + body
                    .ttl_secs
                    .unwrap_or(self.settings.host_ttl_secs)
                    .min(10 * 365 * 24 * 3600),
            permit_pty: false,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
        };
        let cert = self
            .cas()
            .host
            .sign_ssh(&identity, &public)
            .map_err(internal)?;
        self.audit.emit(audit::CERT_ISSUED, Some(&caller.name), &serde_json::json!({
            "user": caller.name, "kind": "host-ssh", "host": body.host, "expires": identity.expires,
        }));
        Ok(Response::json(
            200,
            &SignHostResponse {
                ssh_cert: cert.to_openssh().map_err(internal)?,
            },
        ))
    }

    /// `jaunt ca sign-db`: a database server certificate from the db CA over the caller's key.
    pub(super) fn sign_db(&self, req: &Request, caller: &Identity) -> Reply {
        use crate::db_certs;
        use jaunt_config::api::{DbCertResponse, SignDbRequest};
        self.require(caller, "ca", "create")?;
        let body: SignDbRequest = req.json()?;
        let names = db_certs::db_server_names(&body.hosts).map_err(|e| Response::error(400, e))?;
        let spki = ca::spki_pem_to_der(&body.tls_public_key)
            .map_err(|e| Response::error(400, e.to_string()))?;
        let now = unix_now();
        let ttl = body
            .ttl_secs
            .unwrap_or(self.settings.host_ttl_secs)
            .clamp(60, db_certs::MAX_DB_SERVER_CERT_TTL_SECS);
        let identity = db_certs::db_server_identity(&self.settings.cluster, &names, now, ttl);
        let der = self
            .cas()
            .db
            .sign_x509(&identity, &spki, &names)
            .map_err(|e| Response::error(400, e.to_string()))?;
        self.audit.emit(audit::CERT_ISSUED, Some(&caller.name), &serde_json::json!({
            "user": caller.name, "kind": "db-server", "hosts": names, "expires": identity.expires,
        }));
        Ok(Response::json(
            200,
            &DbCertResponse {
                tls_cert: ca::cert_pem(&der),
                db_ca: self.cas().trusted_pem(CaKind::Db),
                expires: identity.expires,
            },
        ))
    }

    /// `POST /v1/ca/rotate` (`jaunt ca rotate`): rule `ca`, verb `update`.
    pub(super) fn rotate_ca(&self, req: &Request, caller: &Identity) -> Reply {
        self.require(caller, "ca", "update")?;
        let body: jaunt_config::api::RotateRequest = req.json()?;
        self.rotate(&body, &caller.name)
            .map(|r| Response::json(200, &r))
            .map_err(|e| Response::error(e.status, &e.message))
    }
}
