//! What the agent asks control for while it serves users, each a blocking control-API call
//! with the host client ([`HostClient`]), through the proxy (ALPN `jaunt-control`):
//!
//! - database client certificates ([`ControlDbCerts`], `POST /v1/db/cert`, role `db`);
//! - the `Jaunt-Jwt-Assertion` JWTs its web app proxy adds ([`ControlAppTokens`],
//!   `POST /v1/app/jwt`, role `app`; the agent caches tokens, so calls are rare);
//! - the SSH certificates of SSH termination ([`ControlSshCerts`],
//!   `POST /v1/agent/ssh/host-cert` and `/user-cert`, role `node`).
//!
//! What control signs and checks for these is on its side: `service/agent.rs`, `db_cmd.rs`,
//! `agent_ssh.rs`, `jwt.rs`.

use std::sync::Arc;

use base64::Engine as _;
use jaunt_agent::{
    AppToken, AppTokenProvider, DbCertProvider, DbClientCert, SshCert, SshCertProvider,
    SshUserCertRequest,
};
use jaunt_config::api::{
    AgentSshCertResponse, AgentSshHostCertRequest, AgentSshUserCertRequest, AppJwtRequest,
    AppJwtResponse, DbCertRequest, DbCertResponse,
};

use super::client::HostClient;

/// Gets database client certificates from control.
pub struct ControlDbCerts {
    pub host: Arc<HostClient>,
}

impl ControlDbCerts {
    fn try_issue(&self, db_user: &str, requested_by: &str) -> anyhow::Result<DbClientCert> {
        let key = rcgen::KeyPair::generate()?;
        let resp: DbCertResponse = self.host.client().post_json(
            "/v1/db/cert",
            &DbCertRequest {
                db_user: db_user.to_string(),
                tls_public_key: key.public_key_pem(),
                ttl_secs: None,
                requested_by: Some(requested_by.to_string()).filter(|u| !u.is_empty()),
            },
        )?;
        Ok(DbClientCert {
            cert_pem: resp.tls_cert,
            key_pem: key.serialize_pem(),
            ca_pem: resp.db_ca,
            expires: resp.expires,
        })
    }
}

impl DbCertProvider for ControlDbCerts {
    fn issue(&self, db_user: &str, requested_by: &str) -> Result<DbClientCert, String> {
        self.try_issue(db_user, requested_by)
            .map_err(|e| format!("{e:#}"))
    }
}

/// Gets app tokens from control.
pub struct ControlAppTokens {
    pub host: Arc<HostClient>,
}

impl AppTokenProvider for ControlAppTokens {
    fn issue(
        &self,
        user: &str,
        roles: &[String],
        app: &str,
        uri: &str,
    ) -> Result<AppToken, String> {
        let resp: AppJwtResponse = self
            .host
            .client()
            .post_json(
                "/v1/app/jwt",
                &AppJwtRequest {
                    user: user.to_string(),
                    roles: roles.to_vec(),
                    app: app.to_string(),
                    uri: uri.to_string(),
                },
            )
            .map_err(|e| format!("cannot get an app token from control: {e:#}"))?;
        Ok(AppToken {
            jwt: resp.jwt,
            expires: resp.expires,
        })
    }
}

/// Gets SSH certificates from control.
pub struct ControlSshCerts {
    pub host: Arc<HostClient>,
}

impl SshCertProvider for ControlSshCerts {
    fn host_cert(&self, public_key: &str) -> Result<SshCert, String> {
        let resp: AgentSshCertResponse = self
            .host
            .client()
            .post_json(
                "/v1/agent/ssh/host-cert",
                &AgentSshHostCertRequest {
                    ssh_public_key: public_key.to_string(),
                },
            )
            .map_err(|e| format!("cannot get a host certificate from control: {e:#}"))?;
        Ok(SshCert {
            cert: resp.ssh_cert,
            expires: resp.expires,
        })
    }

    fn user_cert(&self, request: &SshUserCertRequest) -> Result<SshCert, String> {
        let resp: AgentSshCertResponse = self
            .host
            .client()
            .post_json(
                "/v1/agent/ssh/user-cert",
                &AgentSshUserCertRequest {
                    login: request.login.clone(),
                    user_cert: base64::engine::general_purpose::STANDARD
                        .encode(&request.user_cert_der),
                    ssh_public_key: request.public_key.clone(),
                    session_id: request.session_id.clone(),
                },
            )
            .map_err(|e| format!("cannot get a login certificate from control: {e:#}"))?;
        Ok(SshCert {
            cert: resp.ssh_cert,
            expires: resp.expires,
        })
    }
}
