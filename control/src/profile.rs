//! The user's side of a login: keys and certificates under `$JAUNT_HOME` (default `~/.jaunt`).
//!
//! Layout (directories 0700, files 0600):
//! ```text
//! $JAUNT_HOME/profile.json            proxy address, user, cluster, identity summary
//! $JAUNT_HOME/keys/USER.key           X.509 private key (PKCS#8 PEM), made here, never sent
//! $JAUNT_HOME/keys/USER.crt           X.509 client certificate (PEM)
//! $JAUNT_HOME/keys/USER-ssh           OpenSSH private key
//! $JAUNT_HOME/keys/USER-ssh.pub       its public key
//! $JAUNT_HOME/keys/USER-ssh-cert.pub  OpenSSH certificate, beside its key as ssh expects
//! $JAUNT_HOME/keys/host-ca.pem        the cluster's host CA (what the proxy's certificate chains to)
//! $JAUNT_HOME/keys/known_hosts        `@cert-authority * <host CA>` for ssh
//! ```
//! The same layout, rooted at `DATA_DIR/admin`, is the control host's local admin identity.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use jaunt_config::api::Certs;
use jaunt_config::identity::Identity;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::ca::LocalKeys;

/// What `jaunt login` remembers besides the key files.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProfileInfo {
    /// The public address logged in through (HOST:PORT).
    pub proxy: String,
    pub user: String,
    pub cluster: String,
    pub identity: Identity,
    /// The other engines' public addresses as of the login: new dials go there, in order, when
    /// `proxy` refuses connections (it drains or is down).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub engines: Vec<String>,
}

/// A directory holding one identity's keys and certificates.
#[derive(Clone, Debug)]
pub struct Profile {
    pub dir: PathBuf,
}

impl Profile {
    /// `$JAUNT_HOME`, or `~/.jaunt`.
    pub fn user_default() -> Profile {
        let dir = std::env::var_os("JAUNT_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".jaunt")))
            .unwrap_or_else(|| PathBuf::from(".jaunt"));
        Profile { dir }
    }

    /// The control host's local admin identity in `data_dir`.
    pub fn admin(data_dir: &Path) -> Profile {
        Profile {
            dir: data_dir.join("admin"),
        }
    }

    fn keys(&self) -> PathBuf {
        self.dir.join("keys")
    }

    pub fn info_path(&self) -> PathBuf {
        self.dir.join("profile.json")
    }

    pub fn tls_key_path(&self, user: &str) -> PathBuf {
        self.keys().join(format!("{user}.key"))
    }

    pub fn tls_cert_path(&self, user: &str) -> PathBuf {
        self.keys().join(format!("{user}.crt"))
    }

    pub fn ssh_key_path(&self, user: &str) -> PathBuf {
        self.keys().join(format!("{user}-ssh"))
    }

    pub fn ssh_cert_path(&self, user: &str) -> PathBuf {
        self.keys().join(format!("{user}-ssh-cert.pub"))
    }

    pub fn host_ca_path(&self) -> PathBuf {
        self.keys().join("host-ca.pem")
    }

    pub fn known_hosts_path(&self) -> PathBuf {
        self.keys().join("known_hosts")
    }

    /// Writes keys and certificates from a login (or the admin bootstrap) and the profile.
    pub fn save(
        &self,
        proxy: &str,
        keys: &LocalKeys,
        certs: &Certs,
    ) -> anyhow::Result<ProfileInfo> {
        let user = certs.identity.name.clone();
        create_private_dir(&self.dir)?;
        create_private_dir(&self.keys())?;
        write_private(&self.tls_key_path(&user), keys.tls_key_pem.as_bytes())?;
        write_private(&self.tls_cert_path(&user), certs.tls_cert.as_bytes())?;
        let ssh_private = keys.ssh_key.to_openssh(ssh_key::LineEnding::LF)?;
        write_private(&self.ssh_key_path(&user), ssh_private.as_bytes())?;
        write_private(
            &self.keys().join(format!("{user}-ssh.pub")),
            format!("{}\n", keys.ssh_public_line()).as_bytes(),
        )?;
        write_private(
            &self.ssh_cert_path(&user),
            format!("{}\n", certs.ssh_cert.trim()).as_bytes(),
        )?;
        write_private(&self.host_ca_path(), certs.host_ca_tls.as_bytes())?;
        // One `@cert-authority` line per host CA key (two while the host CA rotates).
        let known_hosts: String = certs
            .host_ca_ssh
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| format!("@cert-authority * {l}\n"))
            .collect();
        write_private(&self.known_hosts_path(), known_hosts.as_bytes())?;
        let info = ProfileInfo {
            proxy: proxy.to_string(),
            user,
            cluster: certs.identity.cluster.clone(),
            identity: certs.identity.clone(),
            engines: certs
                .engines
                .iter()
                .filter(|e| *e != proxy)
                .cloned()
                .collect(),
        };
        write_private(
            &self.info_path(),
            serde_json::to_string_pretty(&info)?.as_bytes(),
        )?;
        Ok(info)
    }

    /// The saved profile, or None if nobody is logged in here.
    pub fn load(&self) -> anyhow::Result<Option<ProfileInfo>> {
        match fs::read(self.info_path()) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{} is damaged ({e}); run `jaunt logout` and log in again",
                    self.info_path().display()
                )
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!(
                "cannot read {}: {e}",
                self.info_path().display()
            )),
        }
    }

    /// The client certificate chain and key for mTLS to the control API.
    pub fn tls_identity(
        &self,
        user: &str,
    ) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let cert_path = self.tls_cert_path(user);
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e:?}", cert_path.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| {
                anyhow::anyhow!("{} is not a PEM certificate: {e:?}", cert_path.display())
            })?;
        let key_path = self.tls_key_path(user);
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e:?}", key_path.display()))?;
        Ok((chain, key))
    }

    /// The host CA certificate this profile trusts.
    pub fn host_ca(&self) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let path = self.host_ca_path();
        CertificateDer::pem_file_iter(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e:?}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("{} is not a PEM certificate: {e:?}", path.display()))
    }

    /// Removes everything `save` wrote. Returns false if there was nothing.
    pub fn remove(&self) -> anyhow::Result<bool> {
        let Some(info) = self.load()? else {
            return Ok(false);
        };
        let user = info.user;
        for p in [
            self.tls_key_path(&user),
            self.tls_cert_path(&user),
            self.ssh_key_path(&user),
            self.keys().join(format!("{user}-ssh.pub")),
            self.ssh_cert_path(&user),
            self.host_ca_path(),
            self.known_hosts_path(),
            self.info_path(),
        ] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(anyhow::anyhow!("cannot remove {}: {e}", p.display())),
            }
        }
        Ok(true)
    }
}

/// Creates `dir` (and parents) with mode 0700.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| anyhow::anyhow!("cannot chmod {}: {e}", dir.display()))?;
    Ok(())
}

/// Writes `bytes` to `path` with mode 0600, atomically (temp file + rename), so a crash never
/// leaves half a key.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp-write");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}
