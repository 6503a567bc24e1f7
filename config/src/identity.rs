//! The [`Identity`] carried in every Jaunt certificate, and its two encodings.
//!
//! An engine or agent authorizes a connection from the certificate alone, without asking control,
//! so everything RBAC needs travels in the certificate:
//!
//! - **X.509** (users' client certificates, hosts' client/server certificates): the subject keeps
//!   one value per field (rcgen replaces repeated fields), so `CN` holds the user or host name and
//!   `O` the cluster, and the whole identity travels as JSON in a UTF8String inside a
//!   non-critical extension under the private OID [`IDENTITY_OID`]. [`Identity::from_x509_der`]
//!   is the one decoding function, used by engine and agent alike.
//! - **OpenSSH** (users' and hosts' SSH certificates): key id = name, principals = logins (users)
//!   or host names (hosts), the standard `permit-*` extensions as the roles allow, and the roles
//!   in the [`SSH_ROLES_EXTENSION`] extension.
//!
//! Signing lives in control (`control/src/ca.rs`); this file only builds parameters and decodes.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Private-enterprise-style OID of the identity extension (arc 1.3.6.1.4.1.59999 is used as an
/// unregistered private arc; it only has to be stable between Jaunt's own components).
pub const IDENTITY_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 59999, 1, 1];
/// Same OID in dotted form, as x509-parser reports it.
pub const IDENTITY_OID_DOTTED: &str = "1.3.6.1.4.1.59999.1.1";
/// OpenSSH certificate extension carrying the comma-separated roles.
pub const SSH_ROLES_EXTENSION: &str = "roles@jaunt.dev";
/// The principal of an SSH certificate whose identity has no logins (never a valid user name).
pub const NO_LOGINS_PRINCIPAL: &str = "-jaunt-no-logins-";
/// Certificates start one minute in the past so that a client whose clock is slightly behind
/// still accepts a certificate it was just issued.
pub const BACKDATE: Duration = Duration::from_secs(60);
/// Bound on the identity extension: a certificate carrying more is refused, not parsed.
pub const MAX_IDENTITY_EXTENSION_BYTES: usize = 16 * 1024;

/// Whether a certificate names a person or a machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityKind {
    /// A person, issued at `jaunt login`.
    User,
    /// An agent or engine host, issued at join.
    Host,
}

/// Who a certificate speaks for and what it may do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub kind: IdentityKind,
    /// User name, or host id for hosts.
    pub name: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// OS logins (SSH principals) for users; host names for hosts.
    #[serde(default)]
    pub logins: Vec<String>,
    #[serde(default)]
    pub db_users: Vec<String>,
    #[serde(default)]
    pub db_names: Vec<String>,
    #[serde(default)]
    pub traits: BTreeMap<String, Vec<String>>,
    /// The cluster whose CA issued the certificate.
    pub cluster: String,
    /// Unix seconds.
    pub not_before: u64,
    /// Unix seconds.
    pub expires: u64,
    #[serde(default)]
    pub permit_pty: bool,
    #[serde(default)]
    pub permit_port_forwarding: bool,
    #[serde(default)]
    pub permit_agent_forwarding: bool,
}

/// Why a certificate does not yield a usable identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("certificate is not valid X.509: {0}")]
    BadCertificate(String),
    #[error("certificate carries no Jaunt identity (it was not issued by a Jaunt cluster)")]
    MissingExtension,
    #[error("certificate's Jaunt identity is malformed: {0}")]
    BadExtension(String),
    #[error("certificate's subject ({subject}) does not match its identity ({identity})")]
    SubjectMismatch { subject: String, identity: String },
    #[error("certificate expired at {expired_at} (unix time); run `jaunt login` again")]
    Expired { expired_at: u64 },
    #[error("certificate is not valid until {not_before} (unix time); check this machine's clock")]
    NotYetValid { not_before: u64 },
    #[error("SSH certificate error: {0}")]
    Ssh(String),
}

/// Seconds since the Unix epoch, saturating at 0 for clocks before 1970.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Identity {
    /// An identity to issue now for `ttl_secs`: valid from a minute ago (clock skew) and
    /// carrying nothing else; callers add roles, logins and permits with struct update syntax.
    pub fn issued(
        kind: IdentityKind,
        name: &str,
        cluster: &str,
        now: u64,
        ttl_secs: u64,
    ) -> Identity {
        Identity {
            kind,
            name: name.to_string(),
            roles: vec![],
            logins: vec![],
            db_users: vec![],
            db_names: vec![],
            traits: Default::default(),
            cluster: cluster.to_string(),
            not_before: now.saturating_sub(60),
            expires: now + ttl_secs,
            permit_pty: false,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
        }
    }

    /// Refuses an identity outside its validity window at `now` (unix seconds).
    pub fn check_valid_at(&self, now: u64) -> Result<(), IdentityError> {
        if now < self.not_before {
            return Err(IdentityError::NotYetValid {
                not_before: self.not_before,
            });
        }
        if now >= self.expires {
            return Err(IdentityError::Expired {
                expired_at: self.expires,
            });
        }
        Ok(())
    }

    /// The identity's JSON, as carried in the X.509 extension.
    fn extension_json(&self) -> Vec<u8> {
        // Serializing a plain struct of strings, lists and maps cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// X.509 certificate parameters for this identity: subject, validity, serial, key usages and
    /// the identity extension. `dns_names` become subject alternative names (hosts only).
    pub fn x509_params(&self, serial: [u8; 16], dns_names: &[String]) -> rcgen::CertificateParams {
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, self.name.as_str());
        dn.push(rcgen::DnType::OrganizationName, self.cluster.as_str());
        params.distinguished_name = dn;
        params.not_before = time_from_unix(self.not_before);
        params.not_after = time_from_unix(self.expires);
        // A positive 128-bit serial: clear the top bit so DER does not need a sign byte.
        let mut serial = serial;
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        if self.kind == IdentityKind::Host {
            params
                .extended_key_usages
                .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.use_authority_key_identifier_extension = true;
        for name in dns_names {
            if let Ok(ip) = name.parse::<std::net::IpAddr>() {
                params.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
            } else if let Ok(dns) = name.as_str().try_into() {
                params.subject_alt_names.push(rcgen::SanType::DnsName(dns));
            }
        }
        let mut ext = rcgen::CustomExtension::from_oid_content(
            IDENTITY_OID,
            der_utf8_string(&self.extension_json()),
        );
        ext.set_criticality(false);
        params.custom_extensions.push(ext);
        params
    }

    /// Decodes the identity from a DER X.509 certificate issued by a Jaunt CA. The caller has
    /// already verified the chain (rustls does, in the handshake); this reads what it says. The
    /// validity window is taken from the certificate itself, not from the extension.
    pub fn from_x509_der(der: &[u8]) -> Result<Identity, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == IDENTITY_OID_DOTTED)
            .ok_or(IdentityError::MissingExtension)?;
        if ext.value.len() > MAX_IDENTITY_EXTENSION_BYTES {
            return Err(IdentityError::BadExtension("too large".into()));
        }
        let json = parse_der_utf8_string(ext.value)
            .ok_or_else(|| IdentityError::BadExtension("not a UTF8String".into()))?;
        let mut identity: Identity =
            serde_json::from_slice(json).map_err(|e| IdentityError::BadExtension(e.to_string()))?;
        let subject = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_string();
        if subject != identity.name {
            return Err(IdentityError::SubjectMismatch {
                subject,
                identity: identity.name,
            });
        }
        identity.not_before = u64::try_from(cert.validity().not_before.timestamp()).unwrap_or(0);
        identity.expires = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
        Ok(identity)
    }

    /// An OpenSSH certificate builder for this identity: user certificates list the logins as
    /// principals, host certificates the host names. The caller signs it with the CA's SSH key.
    pub fn ssh_cert_builder(
        &self,
        public_key: &ssh_key::PublicKey,
        serial: u64,
        nonce: [u8; 16],
    ) -> Result<ssh_key::certificate::Builder, IdentityError> {
        let ssh = |e: ssh_key::Error| IdentityError::Ssh(e.to_string());
        let mut b = ssh_key::certificate::Builder::new(
            nonce.to_vec(),
            public_key.key_data().clone(),
            self.not_before,
            self.expires,
        )
        .map_err(ssh)?;
        b.serial(serial).map_err(ssh)?;
        b.key_id(self.name.as_str()).map_err(ssh)?;
        match self.kind {
            IdentityKind::User => {
                b.cert_type(ssh_key::certificate::CertType::User)
                    .map_err(ssh)?;
                if self.permit_pty {
                    b.extension("permit-pty", "").map_err(ssh)?;
                }
                if self.permit_port_forwarding {
                    b.extension("permit-port-forwarding", "").map_err(ssh)?;
                }
                if self.permit_agent_forwarding {
                    b.extension("permit-agent-forwarding", "").map_err(ssh)?;
                }
                b.extension(SSH_ROLES_EXTENSION, self.roles.join(","))
                    .map_err(ssh)?;
            }
            IdentityKind::Host => {
                b.cert_type(ssh_key::certificate::CertType::Host)
                    .map_err(ssh)?;
            }
        }
        // OpenSSH reads "no principals" as "every principal": a certificate without logins gets
        // one that names no account instead.
        if self.logins.is_empty() {
            b.valid_principal(NO_LOGINS_PRINCIPAL).map_err(ssh)?;
        }
        for principal in &self.logins {
            b.valid_principal(principal.as_str()).map_err(ssh)?;
        }
        Ok(b)
    }

    /// Reads what an OpenSSH certificate says (signature and CA trust are the caller's: sshd or
    /// `Certificate::validate`). Database fields and traits are not carried in SSH certificates.
    pub fn from_ssh_cert(cert: &ssh_key::Certificate, cluster: &str) -> Identity {
        let kind = match cert.cert_type() {
            ssh_key::certificate::CertType::Host => IdentityKind::Host,
            ssh_key::certificate::CertType::User => IdentityKind::User,
        };
        let ext = cert.extensions();
        let roles = ext
            .get(SSH_ROLES_EXTENSION)
            .map(|r| {
                r.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        Identity {
            kind,
            name: cert.key_id().to_string(),
            roles,
            logins: cert
                .valid_principals()
                .iter()
                .filter(|p| *p != NO_LOGINS_PRINCIPAL)
                .cloned()
                .collect(),
            db_users: Vec::new(),
            db_names: Vec::new(),
            traits: BTreeMap::new(),
            cluster: cluster.to_string(),
            not_before: cert.valid_after(),
            expires: cert.valid_before(),
            permit_pty: ext.contains_key("permit-pty"),
            permit_port_forwarding: ext.contains_key("permit-port-forwarding"),
            permit_agent_forwarding: ext.contains_key("permit-agent-forwarding"),
        }
    }
}

/// `sha256:<hex>` of a certificate's SubjectPublicKeyInfo: the CA pin that `jaunt login
/// --ca-pin` and `jaunt agent --ca-pin` check, stable across CA certificate re-issues.
pub fn spki_pin(cert_der: &[u8]) -> Result<String, IdentityError> {
    let (_, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
    Ok(format!("sha256:{}", hex::encode(digest.as_ref())))
}

fn time_from_unix(secs: u64) -> time::OffsetDateTime {
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .unwrap_or_else(|_| rcgen::date_time_ymd(9999, 12, 31))
}

/// DER UTF8String (tag 12) around `bytes`.
fn der_utf8_string(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 6);
    out.push(0x0c);
    let len = bytes.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let be = (len as u64).to_be_bytes();
        let skip = be.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (8 - skip) as u8);
        out.extend_from_slice(&be[skip..]);
    }
    out.extend_from_slice(bytes);
    out
}

/// The content of a DER UTF8String, or None if `der` is anything else (trailing bytes included).
fn parse_der_utf8_string(der: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x0c {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(n);
        (
            len_bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b)),
            rest,
        )
    };
    (rest.len() == len).then_some(rest)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn alice() -> Identity {
        let now = unix_now();
        Identity {
            kind: IdentityKind::User,
            name: "alice".into(),
            roles: vec!["access".into(), "dba".into()],
            logins: vec!["alice".into(), "root".into()],
            db_users: vec!["alice".into()],
            db_names: vec!["app".into()],
            traits: BTreeMap::from([("team".to_string(), vec!["infra".to_string()])]),
            cluster: "test.local".into(),
            not_before: now - 60,
            expires: now + 3600,
            permit_pty: true,
            permit_port_forwarding: false,
            permit_agent_forwarding: true,
        }
    }

    #[test]
    fn x509_round_trip() {
        let id = alice();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = rcgen::Issuer::new(ca_params, &ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = id
            .x509_params([0xff; 16], &[])
            .signed_by(&key, &issuer)
            .unwrap();
        let back = Identity::from_x509_der(cert.der()).unwrap();
        assert_eq!(back, id);
        assert!(back.check_valid_at(unix_now()).is_ok());
        assert_eq!(
            back.check_valid_at(id.expires),
            Err(IdentityError::Expired {
                expired_at: id.expires
            })
        );
        assert!(matches!(
            back.check_valid_at(id.not_before - 1),
            Err(IdentityError::NotYetValid { .. })
        ));
    }

    #[test]
    fn foreign_certificate_is_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(
            Identity::from_x509_der(cert.der()),
            Err(IdentityError::MissingExtension)
        );
        assert!(matches!(
            Identity::from_x509_der(b"garbage"),
            Err(IdentityError::BadCertificate(_))
        ));
    }

    #[test]
    fn ssh_round_trip() {
        let id = alice();
        let ca = ssh_key::PrivateKey::random(&mut rand_core::OsRng, ssh_key::Algorithm::Ed25519)
            .unwrap();
        let user = ssh_key::PrivateKey::random(&mut rand_core::OsRng, ssh_key::Algorithm::Ed25519)
            .unwrap();
        let cert = id
            .ssh_cert_builder(user.public_key(), 7, [1; 16])
            .unwrap()
            .sign(&ca)
            .unwrap();
        let back = Identity::from_ssh_cert(&cert, "test.local");
        assert_eq!(back.name, "alice");
        assert_eq!(back.logins, id.logins);
        assert_eq!(back.roles, id.roles);
        assert!(back.permit_pty && back.permit_agent_forwarding && !back.permit_port_forwarding);
        assert_eq!(back.expires, id.expires);
    }

    #[test]
    fn der_string_lengths() {
        for len in [0usize, 1, 127, 128, 255, 256, 5000] {
            let v = vec![b'a'; len];
            assert_eq!(parse_der_utf8_string(&der_utf8_string(&v)), Some(&v[..]));
        }
        assert_eq!(parse_der_utf8_string(&[0x0c, 0x05, b'a']), None);
        assert_eq!(parse_der_utf8_string(&[0x04, 0x01, b'a']), None);
        assert_eq!(parse_der_utf8_string(&[0x0c, 0x85, 0, 0, 0, 0, 1]), None);
    }
}
