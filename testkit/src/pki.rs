//! A throwaway test PKI: CAs, server certificates, leaf certificates with an extended key usage,
//! and client certificates carrying a Jaunt [`Identity`].

use std::sync::Arc;
use std::time::Duration;

use jaunt_config::identity::{unix_now, Identity, IdentityKind};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// A certificate chain and its private key.
pub type CertAndKey = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// The serial number [`Ca::identity`] gives identity certificates.
pub const SERIAL: u8 = 7;

/// A self-signed test CA.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `names` (the first is also its common name); the chain ends
    /// with this CA.
    pub fn server(&self, names: &[&str]) -> CertAndKey {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        set_validity(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (vec![cert.der().clone(), self.der()], private_key(&key))
    }

    /// A plain leaf certificate for `name` with one extended key usage (no identity).
    pub fn leaf(&self, name: &str, usage: ExtendedKeyUsagePurpose) -> CertAndKey {
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        set_validity(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (vec![cert.der().clone()], private_key(&key))
    }

    /// A client certificate carrying `identity`, serial [`SERIAL`].
    pub fn identity(&self, identity: &Identity) -> CertAndKey {
        self.identity_with_serial(identity, SERIAL)
    }

    /// A client certificate carrying `identity`, with serial number `[serial; 16]`.
    pub fn identity_with_serial(&self, identity: &Identity, serial: u8) -> CertAndKey {
        let key = KeyPair::generate().unwrap();
        let params = identity.x509_params([serial; 16], &[]);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (vec![cert.der().clone()], private_key(&key))
    }
}

/// Valid from an hour ago until a day from now.
pub fn set_validity(params: &mut CertificateParams) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(unix_now() - 3600);
    params.not_after = epoch + Duration::from_secs(unix_now() + 86400);
}

pub fn private_key(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// A copy of a certificate and key (`PrivateKeyDer` is not `Clone`).
pub fn dup(cert: &CertAndKey) -> CertAndKey {
    (cert.0.clone(), cert.1.clone_key())
}

/// An identity of `kind` named `name` in `cluster`: role `access`, login `root`, valid from a
/// minute ago for an hour, a PTY allowed and no forwarding.
pub fn identity(kind: IdentityKind, name: &str, cluster: &str) -> Identity {
    let now = unix_now();
    Identity {
        kind,
        name: name.into(),
        roles: vec!["access".into()],
        logins: vec!["root".into()],
        db_users: vec![],
        db_names: vec![],
        traits: Default::default(),
        cluster: cluster.into(),
        not_before: now - 60,
        expires: now + 3600,
        permit_pty: true,
        permit_port_forwarding: false,
        permit_agent_forwarding: false,
    }
}

/// A rustls client trusting `trust`, offering `alpn`, with an optional client certificate.
pub fn client_config(
    trust: &Ca,
    alpn: &[&[u8]],
    cert: Option<CertAndKey>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(trust.der()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(config)
}

/// The PKI of a stand-in engine for the agent: a host CA, and a rustls server (ALPN
/// `jaunt-tunnel`, certificate for [`crate::PUBLIC_HOST`]) requiring client certificates from
/// that CA.
pub struct StandInPki {
    pub host_ca: Ca,
    pub server: Arc<rustls::ServerConfig>,
}

impl StandInPki {
    pub fn new() -> StandInPki {
        let host_ca = Ca::new("test host CA");
        let (chain, key) = host_ca.leaf(crate::PUBLIC_HOST, ExtendedKeyUsagePurpose::ServerAuth);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(host_ca.der()).unwrap();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        server.alpn_protocols = vec![b"jaunt-tunnel".to_vec()];
        StandInPki {
            host_ca,
            server: Arc::new(server),
        }
    }

    /// The agent's client configuration with a host certificate (`node1`) from `issuer`,
    /// trusting the real host CA for the proxy.
    pub fn agent_tls(&self, issuer: &Ca) -> Arc<rustls::ClientConfig> {
        let (chain, key) = issuer.leaf("node1", ExtendedKeyUsagePurpose::ClientAuth);
        jaunt_agent::client_config(chain, key, &[self.host_ca.der()]).unwrap()
    }
}

impl Default for StandInPki {
    fn default() -> StandInPki {
        StandInPki::new()
    }
}
