//! Certificate authorities: each has an X.509 key (ECDSA P-256, via rcgen + ring) and an SSH key
//! (Ed25519, via ssh-key). The cluster has a `user` CA (people), a `host` CA (agents, engines and
//! the control API's own server certificate) and a `db` CA (client certificates the agent
//! presents to PostgreSQL), created at first start and kept in the store.
//!
//! Every certificate gets NotBefore = now - 1 min, an explicit NotAfter and a random 128-bit
//! serial. What goes *into* a certificate is [`jaunt_config::identity::Identity`]'s business;
//! this file signs.

use std::sync::Arc;

use jaunt_config::identity::{spki_pin, Identity};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::store::StoredCa;

/// CA certificates live ten years: rotating a CA is an explicit operator action, not an expiry.
pub const CA_VALIDITY_SECS: u64 = 10 * 365 * 24 * 3600;

/// The cluster's certificate authorities, by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaKind {
    User,
    Host,
    Db,
}

impl CaKind {
    pub const ALL: [CaKind; 3] = [CaKind::User, CaKind::Host, CaKind::Db];

    pub fn name(self) -> &'static str {
        match self {
            CaKind::User => "user",
            CaKind::Host => "host",
            CaKind::Db => "db",
        }
    }
}

/// What went wrong while creating, loading or using a CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("X.509: {0}")]
    X509(#[from] rcgen::Error),
    #[error("SSH: {0}")]
    Ssh(#[from] ssh_key::Error),
    #[error("identity: {0}")]
    Identity(#[from] jaunt_config::identity::IdentityError),
    #[error("stored CA {name} is unreadable: {message}")]
    Stored { name: String, message: String },
    #[error("public key: {0}")]
    PublicKey(String),
    #[error("no randomness available from the operating system")]
    Random,
}

/// One certificate authority, ready to sign.
pub struct CertAuthority {
    pub kind: CaKind,
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    ssh: ssh_key::PrivateKey,
    pin: String,
}

impl CertAuthority {
    /// A fresh CA for `cluster`, valid from `now`.
    pub fn generate(kind: CaKind, cluster: &str, now: u64) -> Result<CertAuthority, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{cluster} {} CA", kind.name()));
        dn.push(DnType::OrganizationName, cluster);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = time_at(now.saturating_sub(60));
        params.not_after = time_at(now + CA_VALIDITY_SECS);
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&random_serial()?));
        let cert = params.self_signed(&key)?;
        let ssh = ssh_key::PrivateKey::random(&mut rand_core::OsRng, ssh_key::Algorithm::Ed25519)?;
        let stored = StoredCa {
            name: kind.name().to_string(),
            x509_key_pem: key.serialize_pem(),
            x509_cert_pem: cert.pem(),
            ssh_key: ssh.to_openssh(ssh_key::LineEnding::LF)?.to_string(),
        };
        CertAuthority::from_stored(kind, &stored)
    }

    /// Loads a CA from its stored form.
    pub fn from_stored(kind: CaKind, s: &StoredCa) -> Result<CertAuthority, CaError> {
        let bad = |message: String| CaError::Stored {
            name: s.name.clone(),
            message,
        };
        let key = KeyPair::from_pem(&s.x509_key_pem).map_err(|e| bad(e.to_string()))?;
        let cert_der = CertificateDer::from_pem_slice(s.x509_cert_pem.as_bytes())
            .map_err(|e| bad(format!("{e:?}")))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| bad(e.to_string()))?;
        let ssh = ssh_key::PrivateKey::from_openssh(&s.ssh_key).map_err(|e| bad(e.to_string()))?;
        let pin = spki_pin(&cert_der)?;
        Ok(CertAuthority {
            kind,
            issuer,
            cert_der,
            cert_pem: s.x509_cert_pem.clone(),
            ssh,
            pin,
        })
    }

    /// The stored form.
    pub fn to_stored(&self) -> Result<StoredCa, CaError> {
        Ok(StoredCa {
            name: self.kind.name().to_string(),
            x509_key_pem: self.issuer.key().serialize_pem(),
            x509_cert_pem: self.cert_pem.clone(),
            ssh_key: self.ssh.to_openssh(ssh_key::LineEnding::LF)?.to_string(),
        })
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// `sha256:<hex>` of the CA's SubjectPublicKeyInfo.
    pub fn pin(&self) -> &str {
        &self.pin
    }

    /// The SSH public key as an OpenSSH line (`ssh-ed25519 AAAA... comment`).
    pub fn ssh_public_line(&self) -> String {
        self.ssh.public_key().to_openssh().unwrap_or_default()
    }

    /// SHA-256 fingerprint of the SSH public key, as `ssh-keygen -l` prints it.
    pub fn ssh_fingerprint(&self) -> String {
        self.ssh
            .public_key()
            .fingerprint(ssh_key::HashAlg::Sha256)
            .to_string()
    }

    /// Whether `leaf` chains to this CA (signature and validity now), with rustls' WebPKI
    /// verifier and this CA as the only root.
    pub fn issued(&self, leaf: &CertificateDer<'_>) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        if roots.add(self.cert_der.clone()).is_err() {
            return false;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let Ok(verifier) =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
        else {
            return false;
        };
        verifier
            .verify_client_cert(leaf, &[], rustls_pki_types::UnixTime::now())
            .is_ok()
    }

    /// Signs an X.509 certificate for `identity` over a public key given as SubjectPublicKeyInfo
    /// (DER). Returns the certificate DER.
    pub fn sign_x509(
        &self,
        identity: &Identity,
        spki_der: &[u8],
        dns_names: &[String],
    ) -> Result<CertificateDer<'static>, CaError> {
        let public = rcgen::SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| CaError::PublicKey(e.to_string()))?;
        let cert = identity
            .x509_params(random_serial()?, dns_names)
            .signed_by(&public, &self.issuer)?;
        Ok(cert.der().clone())
    }

    /// Signs an OpenSSH certificate for `identity` over `public_key`.
    pub fn sign_ssh(
        &self,
        identity: &Identity,
        public_key: &ssh_key::PublicKey,
    ) -> Result<ssh_key::Certificate, CaError> {
        let serial = random_serial()?;
        let mut nonce = [0u8; 16];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| CaError::Random)?;
        let serial64 = u64::from_be_bytes([
            serial[0], serial[1], serial[2], serial[3], serial[4], serial[5], serial[6], serial[7],
        ]);
        let builder = identity.ssh_cert_builder(public_key, serial64, nonce)?;
        Ok(builder.sign(&self.ssh)?)
    }
}

/// The cluster's CAs as they are now: the key each one signs with, and during a rotation (see
/// `rotation.rs`) the additional one that is trusted too. Control swaps the whole value at each
/// phase change; holders of an `Arc<Authorities>` keep a consistent view.
#[derive(Clone)]
pub struct Authorities {
    /// The signing CAs.
    pub user: Arc<CertAuthority>,
    pub host: Arc<CertAuthority>,
    pub db: Arc<CertAuthority>,
    /// The app-access JWT signing key.
    pub jwt: Arc<crate::jwt::JwtSigner>,
    /// During a rotation: the other CA of each kind (the new one before `update_clients`, the
    /// old one after), trusted by every verifier but not signing.
    pub extra_user: Option<Arc<CertAuthority>>,
    pub extra_host: Option<Arc<CertAuthority>>,
    pub extra_db: Option<Arc<CertAuthority>>,
    pub extra_jwt: Option<Arc<crate::jwt::JwtSigner>>,
    /// Phase and sequence per CA name (`user`, `host`, `db`, `jwt`), as `rotation.rs` keeps
    /// them; a CA that never rotated is `standby` at 0.
    pub phases: std::collections::BTreeMap<String, (String, u64)>,
}

impl Authorities {
    /// The signing CA of `kind`.
    pub fn get(&self, kind: CaKind) -> &CertAuthority {
        match kind {
            CaKind::User => &self.user,
            CaKind::Host => &self.host,
            CaKind::Db => &self.db,
        }
    }

    /// The additional (trusted, not signing) CA of `kind` while it rotates.
    pub fn extra(&self, kind: CaKind) -> Option<&CertAuthority> {
        match kind {
            CaKind::User => self.extra_user.as_deref(),
            CaKind::Host => self.extra_host.as_deref(),
            CaKind::Db => self.extra_db.as_deref(),
        }
    }

    /// Every CA of `kind` a verifier trusts now: the signing one first.
    pub fn trusted(&self, kind: CaKind) -> Vec<&CertAuthority> {
        std::iter::once(self.get(kind))
            .chain(self.extra(kind))
            .collect()
    }

    /// The trusted CA certificates of `kind` (DER), the signing one first.
    pub fn trusted_der(&self, kind: CaKind) -> Vec<CertificateDer<'static>> {
        self.trusted(kind)
            .into_iter()
            .map(|c| c.cert_der().clone())
            .collect()
    }

    /// The trusted CA certificates of `kind` as one PEM bundle (what `ssl_ca_file` and the
    /// profiles' `*-ca.pem` files hold).
    pub fn trusted_pem(&self, kind: CaKind) -> String {
        self.trusted(kind)
            .into_iter()
            .map(|c| c.cert_pem().trim_end().to_string() + "\n")
            .collect()
    }

    /// The trusted SSH CA public keys of `kind`, one OpenSSH line each.
    pub fn ssh_lines(&self, kind: CaKind) -> Vec<String> {
        self.trusted(kind)
            .into_iter()
            .map(|c| c.ssh_public_line())
            .collect()
    }

    /// The JWK Set verifiers of app JWTs use: the signing key and, during a rotation, the other.
    pub fn jwks(&self) -> String {
        let mut keys = Vec::new();
        for signer in std::iter::once(&self.jwt).chain(self.extra_jwt.as_ref()) {
            if let Ok(serde_json::Value::Object(mut set)) =
                serde_json::from_str::<serde_json::Value>(&signer.jwks_json())
            {
                if let Some(serde_json::Value::Array(k)) = set.remove("keys") {
                    keys.extend(k);
                }
            }
        }
        serde_json::json!({ "keys": keys }).to_string()
    }

    /// The phase of CA `name` (`standby` when it never rotated).
    pub fn phase(&self, name: &str) -> &str {
        self.phases.get(name).map_or("standby", |(p, _)| p.as_str())
    }

    /// A digest of every CA's phase and sequence: what an agent echoes back to confirm it has
    /// applied the current phases.
    pub fn generation(&self) -> String {
        let text = self
            .phases
            .iter()
            .map(|(name, (phase, seq))| format!("{name}={phase}/{seq}"))
            .collect::<Vec<_>>()
            .join(",");
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        format!("g{}", hex::encode(&digest.as_ref()[..8]))
    }
}

/// A key pair made on this machine for a certificate: the private key stays here.
pub struct LocalKeys {
    pub tls_key_pem: String,
    pub tls_public_pem: String,
    pub ssh_key: ssh_key::PrivateKey,
}

impl LocalKeys {
    pub fn generate() -> Result<LocalKeys, CaError> {
        let key = KeyPair::generate()?;
        let ssh_key =
            ssh_key::PrivateKey::random(&mut rand_core::OsRng, ssh_key::Algorithm::Ed25519)?;
        Ok(LocalKeys {
            tls_key_pem: key.serialize_pem(),
            tls_public_pem: key.public_key_pem(),
            ssh_key,
        })
    }

    /// Keys made earlier and saved as PEM (TLS) and OpenSSH (SSH) text, to issue a fresh
    /// certificate for the same keys: a reader of the files never sees a key that does not
    /// match the certificate next to it while they are replaced.
    pub fn from_saved(tls_key_pem: &str, ssh_private_openssh: &str) -> Result<LocalKeys, CaError> {
        let key = KeyPair::from_pem(tls_key_pem)?;
        let ssh_key = ssh_key::PrivateKey::from_openssh(ssh_private_openssh)?;
        Ok(LocalKeys {
            tls_key_pem: key.serialize_pem(),
            tls_public_pem: key.public_key_pem(),
            ssh_key,
        })
    }

    pub fn ssh_public_line(&self) -> String {
        self.ssh_key.public_key().to_openssh().unwrap_or_default()
    }

    pub fn tls_private_der(&self) -> Result<PrivateKeyDer<'static>, CaError> {
        PrivateKeyDer::from_pem_slice(self.tls_key_pem.as_bytes())
            .map_err(|e| CaError::PublicKey(format!("{e:?}")))
    }
}

/// A PEM SubjectPublicKeyInfo to DER, with a clear error.
pub fn spki_pem_to_der(pem: &str) -> Result<Vec<u8>, CaError> {
    rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes())
        .map(|d| d.as_ref().to_vec())
        .map_err(|e| CaError::PublicKey(format!("tls_public_key is not a PEM public key: {e:?}")))
}

/// A DER certificate as PEM.
pub fn cert_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// 16 random bytes for a certificate serial.
pub fn random_serial() -> Result<[u8; 16], CaError> {
    let mut serial = [0u8; 16];
    SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| CaError::Random)?;
    serial[0] &= 0x7f;
    Ok(serial)
}

fn time_at(secs: u64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
        .unwrap_or_else(|_| rcgen::date_time_ymd(9999, 12, 31))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use jaunt_config::identity::{unix_now, IdentityKind};

    #[test]
    fn saved_local_keys_load_back_as_the_same_keys_and_bad_text_is_refused() {
        let keys = LocalKeys::generate().unwrap();
        let ssh_text = keys.ssh_key.to_openssh(ssh_key::LineEnding::LF).unwrap();
        let back = LocalKeys::from_saved(&keys.tls_key_pem, &ssh_text).unwrap();
        assert_eq!(back.tls_public_pem, keys.tls_public_pem);
        assert_eq!(back.ssh_public_line(), keys.ssh_public_line());
        assert!(LocalKeys::from_saved("not a key", &ssh_text).is_err());
        assert!(LocalKeys::from_saved(&keys.tls_key_pem, "not a key").is_err());
    }

    fn identity(kind: IdentityKind) -> Identity {
        let now = unix_now();
        Identity {
            kind,
            name: "alice".into(),
            roles: vec!["access".into()],
            logins: vec!["alice".into()],
            db_users: vec![],
            db_names: vec![],
            traits: Default::default(),
            cluster: "c".into(),
            not_before: now - 60,
            expires: now + 600,
            permit_pty: true,
            permit_port_forwarding: true,
            permit_agent_forwarding: false,
        }
    }

    #[test]
    fn stored_round_trip_signs_verifiable_certs() {
        let now = unix_now();
        let ca = CertAuthority::generate(CaKind::User, "c", now).unwrap();
        let ca2 = CertAuthority::from_stored(CaKind::User, &ca.to_stored().unwrap()).unwrap();
        assert_eq!(ca.pin(), ca2.pin());
        let keys = LocalKeys::generate().unwrap();
        let spki = spki_pem_to_der(&keys.tls_public_pem).unwrap();
        let der = ca2
            .sign_x509(&identity(IdentityKind::User), &spki, &[])
            .unwrap();
        let back = Identity::from_x509_der(&der).unwrap();
        assert_eq!(back.name, "alice");
        // The chain verifies with webpki against the CA as the only root.
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let (_, ca_parsed) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        assert!(parsed
            .verify_signature(Some(ca_parsed.public_key()))
            .is_ok());
        assert_eq!(parsed.issuer(), ca_parsed.subject());

        let ssh = ca2
            .sign_ssh(&identity(IdentityKind::User), keys.ssh_key.public_key())
            .unwrap();
        let fp = ca.ssh.public_key().fingerprint(ssh_key::HashAlg::Sha256);
        assert!(ssh.validate([&fp]).is_ok());
    }

    #[test]
    fn serials_differ() {
        assert_ne!(random_serial().unwrap(), random_serial().unwrap());
    }
}
