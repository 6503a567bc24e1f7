//! Per-thread caches of what a client certificate was found to be, so that a user (or agent)
//! who connects again with the same certificate costs one chain verification per shard, not
//! one per connection: [`CachedClientVerifier`] (the chain verification, around a
//! `WebPkiClientVerifier`) and [`identity_of`] (the identity decoded from a certificate).
//!
//! Why the chain verification may be cached (see ARCHITECTURE.md, "Verified-certificate
//! cache"): what `WebPkiClientVerifier::verify_client_cert` decides for a chain with no
//! intermediates and no CRLs is a function of the certificate's bytes, the trust anchors and the
//! time, and the time enters only through the certificate's validity window (webpki does not
//! check a trust anchor's dates). So the cache is keyed by the exact certificate bytes, scoped
//! to the exact root set (a SHA-256 of the roots: a CA change is a new scope, and the old
//! scope's entries are never hit again), and a hit checks the window against the time again,
//! as webpki does (`not_before <= now <= not_after`). Only successes are kept, so only
//! certificates the CA issued can enter it, and it is bounded ([`MAX_ENTRIES`] per thread,
//! emptied when full). What is never cached: the handshake signature
//! (`verify_tls13_signature`), the proof that the client holds the certificate's key, which
//! every handshake checks.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use jaunt_config::identity::{Identity, IdentityError};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

/// Certificates each cache keeps per thread before it is emptied.
pub const MAX_ENTRIES: usize = 1024;

/// Where a verified certificate is valid: its scope (the roots it chained to) and its
/// validity window (unix seconds, inclusive, as webpki checks it).
#[derive(Clone, Copy)]
struct Verified {
    scope: [u8; 32],
    not_before: u64,
    not_after: u64,
}

thread_local! {
    static VERIFIED: RefCell<HashMap<Box<[u8]>, Verified>> = RefCell::new(HashMap::new());
    static IDENTITIES: RefCell<HashMap<Box<[u8]>, Identity>> = RefCell::new(HashMap::new());
}

/// A client certificate verifier that remembers, per thread, the certificates `inner` accepted
/// (see the module doc). `inner` must be a webpki verifier without CRLs over exactly `roots`.
#[derive(Debug)]
pub struct CachedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    scope: [u8; 32],
}

impl CachedClientVerifier {
    /// Wraps `inner`, which verifies against `roots` (and checks no revocation).
    pub fn new(
        inner: Arc<dyn ClientCertVerifier>,
        roots: &[CertificateDer<'_>],
    ) -> CachedClientVerifier {
        CachedClientVerifier {
            inner,
            scope: roots_scope(roots),
        }
    }
}

/// A SHA-256 over the roots' DER, each prefixed with its length.
fn roots_scope(roots: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for root in roots {
        ctx.update(&(root.len() as u64).to_be_bytes());
        ctx.update(root.as_ref());
    }
    let mut scope = [0u8; 32];
    scope.copy_from_slice(ctx.finish().as_ref());
    scope
}

/// The validity window of a certificate, in unix seconds.
fn validity(der: &[u8]) -> Option<(u64, u64)> {
    use x509_parser::prelude::FromDer as _;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let validity = cert.validity();
    Some((
        u64::try_from(validity.not_before.timestamp()).ok()?,
        u64::try_from(validity.not_after.timestamp()).ok()?,
    ))
}

impl ClientCertVerifier for CachedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if !intermediates.is_empty() {
            // Not a Jaunt chain (the CAs issue leaves directly): not cached.
            return self
                .inner
                .verify_client_cert(end_entity, intermediates, now);
        }
        let at = now.as_secs();
        let der = end_entity.as_ref();
        let hit = VERIFIED.with(|cache| {
            cache
                .borrow()
                .get(der)
                .is_some_and(|v| v.scope == self.scope && v.not_before <= at && at <= v.not_after)
        });
        if hit {
            return Ok(ClientCertVerified::assertion());
        }
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Some((not_before, not_after)) = validity(der) {
            VERIFIED.with(|cache| {
                let mut cache = cache.borrow_mut();
                if cache.len() >= MAX_ENTRIES {
                    cache.clear();
                }
                cache.insert(
                    der.into(),
                    Verified {
                        scope: self.scope,
                        not_before,
                        not_after,
                    },
                );
            });
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

/// [`Identity::from_x509_der`], remembered per thread by the certificate's bytes (a pure
/// function of them: nothing is trusted here that the caller did not verify). Failures are not
/// kept.
pub fn identity_of(der: &[u8]) -> Result<Identity, IdentityError> {
    if let Some(identity) = IDENTITIES.with(|cache| cache.borrow().get(der).cloned()) {
        return Ok(identity);
    }
    let identity = Identity::from_x509_der(der)?;
    IDENTITIES.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.len() >= MAX_ENTRIES {
            cache.clear();
        }
        cache.insert(der.into(), identity.clone());
    });
    Ok(identity)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rustls::server::WebPkiClientVerifier;
    use rustls::RootCertStore;

    struct Ca {
        issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    }

    impl Ca {
        fn new(name: &str) -> Ca {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            params.not_before = rcgen::date_time_ymd(1970, 1, 1);
            params.not_after = rcgen::date_time_ymd(2100, 1, 1);
            let key = rcgen::KeyPair::generate().unwrap();
            Ca {
                issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
            }
        }

        fn der(&self) -> CertificateDer<'static> {
            self.issuer.der().clone()
        }

        /// A client certificate valid from `from` to `to` (unix seconds).
        fn leaf(&self, from: u64, to: u64) -> CertificateDer<'static> {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "alice");
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            let epoch = std::time::UNIX_EPOCH;
            params.not_before = (epoch + std::time::Duration::from_secs(from)).into();
            params.not_after = (epoch + std::time::Duration::from_secs(to)).into();
            params.signed_by(&key, &self.issuer).unwrap().der().clone()
        }
    }

    fn verifier(ca: &Ca) -> CachedClientVerifier {
        let mut store = RootCertStore::empty();
        store.add(ca.der()).unwrap();
        let inner = WebPkiClientVerifier::builder_with_provider(
            Arc::new(store),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        CachedClientVerifier::new(inner, &[ca.der()])
    }

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs))
    }

    #[test]
    fn a_cached_certificate_is_still_checked_against_time_and_roots() {
        let ca = Ca::new("user CA");
        let other = Ca::new("other CA");
        let leaf = ca.leaf(1_000_000, 2_000_000);
        let ours = verifier(&ca);
        let theirs = verifier(&other);
        // Twice: the second answer comes from the cache.
        for _ in 0..2 {
            assert!(ours.verify_client_cert(&leaf, &[], at(1_500_000)).is_ok());
            assert!(ours.verify_client_cert(&leaf, &[], at(2_000_000)).is_ok());
            assert!(ours.verify_client_cert(&leaf, &[], at(2_000_001)).is_err());
            assert!(ours.verify_client_cert(&leaf, &[], at(999_999)).is_err());
            // Another root set never sees this one's entries.
            assert!(theirs
                .verify_client_cert(&leaf, &[], at(1_500_000))
                .is_err());
        }
        // A certificate of the other CA is not accepted by ours, cached or not.
        let foreign = other.leaf(1_000_000, 2_000_000);
        assert!(theirs
            .verify_client_cert(&foreign, &[], at(1_500_000))
            .is_ok());
        assert!(ours
            .verify_client_cert(&foreign, &[], at(1_500_000))
            .is_err());
        // A byte changed is another certificate (and a bad signature).
        let mut tampered = leaf.to_vec();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let tampered = CertificateDer::from(tampered);
        assert!(ours
            .verify_client_cert(&tampered, &[], at(1_500_000))
            .is_err());
    }

    #[test]
    fn the_cache_stays_bounded() {
        let ca = Ca::new("user CA");
        let ours = verifier(&ca);
        let leaf = ca.leaf(0, 4_000_000_000);
        VERIFIED.with(|cache| {
            let mut cache = cache.borrow_mut();
            cache.clear();
            for i in 0..MAX_ENTRIES {
                let filler = Verified {
                    scope: [0; 32],
                    not_before: 0,
                    not_after: 0,
                };
                cache.insert(i.to_be_bytes().to_vec().into(), filler);
            }
        });
        assert!(ours.verify_client_cert(&leaf, &[], at(1_000)).is_ok());
        VERIFIED.with(|cache| {
            let cache = cache.borrow();
            assert!(cache.len() <= MAX_ENTRIES);
            assert!(cache.contains_key(leaf.as_ref()));
        });
    }
}
