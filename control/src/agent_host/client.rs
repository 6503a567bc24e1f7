//! The agent host's one client of control ([`HostClient`]): the host identity
//! (`DATA_DIR/host`, see `profile.rs`) and the TLS configuration made from it are read and built
//! once, and every call the agent host makes to control reuses them: the policy poll, audit
//! posts, database certificates, app JWTs, SSH certificates, recording uploads and renewal.
//!
//! When the identity changes on disk, the one who changed it reloads the client: renewal
//! ([`HostClient::renew`], which saves the new certificate and reloads) and a CA rotation phase
//! that rewrites the trusted host CAs (`follow_rotation` in `mod.rs`). A reload that fails keeps
//! the previous client and says why; calls go on with it.
//!
//! Not here: joining (a token and a pinned CA, no host identity yet), the agent's own tunnel TLS
//! (`jaunt_agent::client_config`, replaced over the agent's command channel).

use std::path::Path;
use std::sync::{PoisonError, RwLock};

use anyhow::anyhow;
use jaunt_config::api::{Certs, RenewRequest};

use crate::ca::LocalKeys;
use crate::client::{Client, ClientError, Trust};
use crate::profile::{Profile, ProfileInfo};

/// The agent host's client of control, shared by every thread that calls control.
pub struct HostClient {
    proxy: String,
    profile: Profile,
    current: RwLock<Loaded>,
}

/// What was read and built at the last (re)load.
#[derive(Clone)]
struct Loaded {
    info: ProfileInfo,
    client: Client,
}

impl std::fmt::Debug for HostClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostClient")
            .field("proxy", &self.proxy)
            .field("profile", &self.profile.dir)
            .finish_non_exhaustive()
    }
}

impl HostClient {
    /// Reads the host identity in `data_dir` and builds the client of `proxy` with it.
    pub fn load(proxy: &str, data_dir: &Path) -> anyhow::Result<HostClient> {
        let profile = host_profile(data_dir);
        let loaded = build(proxy, &profile)?;
        Ok(HostClient {
            proxy: proxy.to_string(),
            profile,
            current: RwLock::new(loaded),
        })
    }

    /// Reads the identity again and rebuilds the client: after the files changed (renewal, a
    /// new host CA bundle). On error the previous client stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = build(&self.proxy, &self.profile)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }

    fn loaded(&self) -> Loaded {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The client of the configured proxy (a clone sharing the TLS configuration).
    pub fn client(&self) -> Client {
        self.loaded().client
    }

    /// A client of another engine of the cluster (`host:port`) with the same identity and trust.
    pub fn client_to(&self, addr: &str) -> Result<Client, ClientError> {
        self.loaded().client.to(addr)
    }

    /// The host identity as last loaded.
    pub fn info(&self) -> ProfileInfo {
        self.loaded().info
    }

    /// The host's user name (its host id), as in its certificate.
    pub fn user(&self) -> String {
        self.loaded().info.user
    }

    /// The configured proxy address.
    pub fn proxy(&self) -> &str {
        &self.proxy
    }

    /// The identity directory.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Asks control (through the engine) for fresh host certificates over new keys, saves them
    /// and reloads the client with them.
    pub fn renew(&self) -> anyhow::Result<ProfileInfo> {
        let keys = LocalKeys::generate()?;
        let certs: Certs = self.client().post_json(
            "/v1/hosts/renew",
            &RenewRequest {
                tls_public_key: keys.tls_public_pem.clone(),
                ssh_public_key: keys.ssh_public_line(),
            },
        )?;
        let info = self.profile.save(&self.proxy, &keys, &certs)?;
        self.reload()?;
        Ok(info)
    }
}

fn build(proxy: &str, profile: &Profile) -> anyhow::Result<Loaded> {
    let info = profile.load()?.ok_or_else(|| {
        anyhow!(
            "the agent's host identity is missing from {}",
            profile.dir.display()
        )
    })?;
    let client = Client::new(
        proxy,
        Trust::Roots(profile.host_ca()?),
        Some(profile.tls_identity(&info.user)?),
    )?;
    Ok(Loaded { info, client })
}

/// The host identity directory inside the agent's data dir.
pub fn host_profile(data_dir: &Path) -> Profile {
    Profile {
        dir: data_dir.join("host"),
    }
}
