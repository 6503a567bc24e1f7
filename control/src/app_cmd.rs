//! Web (HTTP) app access, control's side of it: the agent's [`AppTokenProvider`], which asks
//! control for the `Jaunt-Jwt-Assertion` JWTs its reverse proxy adds (`POST /v1/app/jwt`, with
//! the agent's host identity, through the proxy like every agent call). The user's side is
//! `jaunt proxy app` (see `access.rs`); the signing is `jwt.rs`'s.

use std::path::PathBuf;

use anyhow::anyhow;
use jaunt_agent::{AppToken, AppTokenProvider};
use jaunt_config::api::{AppJwtRequest, AppJwtResponse};

use crate::client::{Client, Trust};

/// Gets app tokens from control with the agent's host identity. The identity is read from
/// `DATA_DIR/host` at each call, so a renewed host certificate is used as soon as it is saved
/// (the agent caches tokens, so calls are rare).
pub struct ControlAppTokens {
    pub proxy: String,
    pub data_dir: PathBuf,
}

impl ControlAppTokens {
    fn try_issue(
        &self,
        user: &str,
        roles: &[String],
        app: &str,
        uri: &str,
    ) -> anyhow::Result<AppToken> {
        let profile = crate::agent_cmd::host_profile(&self.data_dir);
        let info = profile.load()?.ok_or_else(|| {
            anyhow!(
                "the agent's host identity is missing from {}",
                profile.dir.display()
            )
        })?;
        let client = Client::new(
            &self.proxy,
            Trust::Roots(profile.host_ca()?),
            Some(profile.tls_identity(&info.user)?),
        )?;
        let resp: AppJwtResponse = client.post_json(
            "/v1/app/jwt",
            &AppJwtRequest {
                user: user.to_string(),
                roles: roles.to_vec(),
                app: app.to_string(),
                uri: uri.to_string(),
            },
        )?;
        Ok(AppToken {
            jwt: resp.jwt,
            expires: resp.expires,
        })
    }
}

impl AppTokenProvider for ControlAppTokens {
    fn issue(
        &self,
        user: &str,
        roles: &[String],
        app: &str,
        uri: &str,
    ) -> Result<AppToken, String> {
        self.try_issue(user, roles, app, uri)
            .map_err(|e| format!("cannot get an app token from control: {e:#}"))
    }
}
