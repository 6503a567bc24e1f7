//! TLS configurations of the public port: [`TlsConfigs`] (what the caller, who owns the CAs,
//! hands the engine) and the per-shard acceptors built from it.
//!
//! Four server configurations, one per trust relationship:
//! - `web`: no client authentication (web UI/API at the public host);
//! - `app`: a client certificate from the user CA is asked for but optional (web apps at
//!   `<app>.<public host>`: `jaunt proxy app` presents the user's certificate; a request
//!   without one is answered with an HTTP error saying how to get in);
//! - `user`: client certificate required, chaining to the user CA (`jaunt-ssh`,
//!   `jaunt-postgres`, `jaunt-tcp`);
//! - `tunnel`: client certificate required, chaining to the host CA (`jaunt-tunnel`).
//!
//! Each shard gets its own shallow copy of every `ServerConfig` with its own session cache:
//! rustls' default `ServerSessionMemoryCache` is one `Mutex` shared by every clone of a config,
//! which would put a contended lock on every handshake of every shard. A TLS 1.2 or stateful
//! TLS 1.3 resumption therefore only succeeds on the shard that issued it; stateless tickets
//! (which [`TlsConfigs::build`] installs, `tickets.rs`) work on every shard, and with the
//! caller's [`TicketSecret`] ([`TlsConfigs::build_with_ticket_secret`]) after a restart too.
//! The engine also sets each copy's ALPN list to the protocols of its routes, since the routing
//! table, not the caller, decides which protocol a config serves.
//!
//! The copies are wrapped in `Rc` per shard; a reload (SIGHUP) replaces them between
//! connections, so new handshakes use the new certificates and live connections keep theirs.

use std::sync::Arc;

use futures_rustls::TlsAcceptor;
use rustls::server::{ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::route::{ALPN_APP, ALPN_HTTP1, ALPN_POSTGRES, ALPN_SSH, ALPN_TCP, ALPN_TUNNEL};
use crate::server::tickets::{binding, TicketSecret, TicketSecretError, Tickets};

/// Sessions each shard's cache remembers, per configuration (rustls' own default size).
pub const SESSION_CACHE_ENTRIES: usize = 256;

/// TLS 1.3 session tickets sent after each handshake (rustls' default is 2). Every handshake,
/// resumed ones included, sends a fresh one, so a client that connects one connection after
/// another always has a ticket; see ARCHITECTURE.md, "TLS policy".
pub const TLS13_TICKETS: usize = 1;

/// ring's cipher suites with the AES-128-GCM ones first: the server's order decides (see
/// ARCHITECTURE.md, "TLS policy"). Nothing is added or removed. On x86-64 CPUs with the
/// instructions it needs, the X25519 key exchange is graviola's (formally verified s2n-bignum
/// code, about half of ring's CPU here) instead of ring's: same group, same wire bytes
/// ([`x25519`]; ARCHITECTURE.md, "TLS policy").
pub fn provider() -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.secure_random = &public_random::PublicRandom;
    if let Some(fast) = x25519::group() {
        for group in &mut provider.kx_groups {
            if group.name() == rustls::NamedGroup::X25519 {
                *group = fast;
            }
        }
    }
    // A stable sort: AES-128-GCM before everything else, the rest in ring's order.
    provider.cipher_suites.sort_by_key(|suite| {
        !matches!(
            suite.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    provider
}

/// The random bytes rustls draws for values that go on the wire or only need to be unique
/// and unpredictable (the server random, a TLS 1.3 ticket's nonce and age mask, a TLS 1.2
/// session id) and the ticket AEAD nonces of `tickets.rs`: from the same kernel CSPRNG as
/// ring's `SystemRandom`, fetched [`BATCH`] bytes at a time per thread instead of one
/// `getrandom` per draw (four per full handshake). Every byte is handed out once and wiped from
/// the pool as it is; the pool is the thread's own. Keys are not drawn here: the key exchange
/// (ring, graviola) and the signatures draw from the OS directly. See ARCHITECTURE.md, "TLS
/// policy".
pub(crate) mod public_random {
    use std::cell::RefCell;

    use ring::rand::{SecureRandom as _, SystemRandom};

    /// Bytes fetched per `getrandom`.
    pub(crate) const BATCH: usize = 256;

    /// Larger draws go to the OS directly.
    const MAX_DRAW: usize = 64;

    struct Pool {
        bytes: [u8; BATCH],
        /// Bytes handed out (and wiped) from the front; `BATCH`: empty.
        used: usize,
    }

    thread_local! {
        static POOL: RefCell<Pool> = const {
            RefCell::new(Pool {
                bytes: [0; BATCH],
                used: BATCH,
            })
        };
    }

    /// Fills `dest` with random bytes (see the module doc).
    pub(crate) fn fill(dest: &mut [u8]) -> Result<(), ring::error::Unspecified> {
        if dest.len() > MAX_DRAW {
            return SystemRandom::new().fill(dest);
        }
        POOL.with(|pool| {
            let Ok(mut pool) = pool.try_borrow_mut() else {
                return SystemRandom::new().fill(dest);
            };
            if BATCH - pool.used < dest.len() {
                pool.used = BATCH;
                SystemRandom::new().fill(&mut pool.bytes)?;
                pool.used = 0;
            }
            let (start, end) = (pool.used, pool.used + dest.len());
            dest.copy_from_slice(&pool.bytes[start..end]);
            pool.bytes[start..end].fill(0);
            pool.used = end;
            Ok(())
        })
    }

    /// [`fill`] as rustls' random source.
    #[derive(Debug)]
    pub(crate) struct PublicRandom;

    impl rustls::crypto::SecureRandom for PublicRandom {
        fn fill(&self, buf: &mut [u8]) -> Result<(), rustls::crypto::GetRandomFailed> {
            fill(buf).map_err(|_| rustls::crypto::GetRandomFailed)
        }
    }

    #[cfg(test)]
    #[allow(clippy::unwrap_used)]
    mod tests {
        use super::*;

        #[test]
        fn draws_are_fresh_and_handed_out_once() {
            let mut seen = std::collections::HashSet::new();
            for len in [32, 4, 12, 32, 64, 65, 200, 1] {
                for _ in 0..40 {
                    let mut a = vec![0u8; len];
                    fill(&mut a).unwrap();
                    if len >= 12 {
                        assert!(seen.insert(a.clone()), "a repeated draw of {len}");
                        assert!(a.iter().any(|&b| b != 0));
                    }
                }
            }
            POOL.with(|pool| {
                let pool = pool.borrow();
                assert!(pool.bytes[..pool.used].iter().all(|&b| b == 0), "wiped");
            });
        }
    }
}

/// X25519 (RFC 7748) for rustls from graviola, whose x86-64 routines are s2n-bignum's,
/// machine-checked for functional correctness (`curve25519_x25519base`, `curve25519_x25519`).
/// Only the arithmetic is graviola's; the key exchange's contract is rustls' and is kept as
/// ring's group keeps it: a fresh private key from the OS's random source per handshake
/// (zeroed when dropped), a 32-byte public key, a peer key of exactly 32 bytes, and an all-zero
/// shared secret (a small-order peer point) refused as an invalid key share, as RFC 8446
/// §7.4.2 requires.
mod x25519 {
    use rustls::crypto::{ActiveKeyExchange, SharedSecret, SupportedKxGroup};
    use rustls::{Error, NamedGroup, PeerMisbehaved};

    /// The group, where graviola can run: x86-64 with the instructions its routines use
    /// (graviola panics without them); `None` elsewhere, and ring's group stays.
    pub(super) fn group() -> Option<&'static dyn SupportedKxGroup> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("aes")
                && has!("pclmulqdq")
                && has!("ssse3")
                && has!("avx")
                && has!("avx2")
                && has!("bmi1")
                && has!("bmi2")
                && has!("adx")
            {
                return Some(&Graviola);
            }
        }
        None
    }

    #[derive(Debug)]
    struct Graviola;

    #[cfg(target_arch = "x86_64")]
    impl SupportedKxGroup for Graviola {
        fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
            use graviola::key_agreement::x25519::PrivateKey;
            let private = PrivateKey::new_random().map_err(|_| rustls::crypto::GetRandomFailed)?;
            let public = private.public_key().as_bytes();
            Ok(Box::new(Exchange { private, public }))
        }

        fn name(&self) -> NamedGroup {
            NamedGroup::X25519
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    impl SupportedKxGroup for Graviola {
        fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
            // `group()` never hands this out off x86-64.
            Err(Error::General("X25519 from graviola needs x86-64".into()))
        }

        fn name(&self) -> NamedGroup {
            NamedGroup::X25519
        }
    }

    #[cfg(target_arch = "x86_64")]
    struct Exchange {
        private: graviola::key_agreement::x25519::PrivateKey,
        public: [u8; 32],
    }

    #[cfg(target_arch = "x86_64")]
    impl ActiveKeyExchange for Exchange {
        fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, Error> {
            use graviola::key_agreement::x25519::PublicKey;
            let peer: &[u8; 32] = peer
                .try_into()
                .map_err(|_| Error::from(PeerMisbehaved::InvalidKeyShare))?;
            let shared = self
                .private
                .diffie_hellman(&PublicKey::from_array(peer))
                .map_err(|_| Error::from(PeerMisbehaved::InvalidKeyShare))?;
            Ok(SharedSecret::from(&shared.0[..]))
        }

        fn pub_key(&self) -> &[u8] {
            &self.public
        }

        fn group(&self) -> NamedGroup {
            NamedGroup::X25519
        }
    }

    #[cfg(all(test, target_arch = "x86_64"))]
    #[allow(clippy::unwrap_used)]
    mod tests {
        use super::*;

        fn ours() -> &'static dyn SupportedKxGroup {
            group().unwrap_or_else(|| unreachable!("this CPU runs graviola's X25519"))
        }

        #[test]
        fn agrees_with_rings_x25519_both_ways() {
            let ring = rustls::crypto::ring::kx_group::X25519;
            for _ in 0..20 {
                let (a, b) = (ours().start().unwrap(), ring.start().unwrap());
                let (a_pub, b_pub) = (a.pub_key().to_vec(), b.pub_key().to_vec());
                assert_eq!(a_pub.len(), 32);
                let from_ours = a.complete(&b_pub).unwrap();
                let from_ring = b.complete(&a_pub).unwrap();
                assert_eq!(from_ours.secret_bytes(), from_ring.secret_bytes());
            }
            // The peer key's top bit is ignored (RFC 7748 §5), as ring does.
            let (a, b) = (ours().start().unwrap(), ring.start().unwrap());
            let (a_pub, mut b_pub) = (a.pub_key().to_vec(), b.pub_key().to_vec());
            let from_ring = b.complete(&a_pub).unwrap();
            b_pub[31] |= 0x80;
            let from_ours = a.complete(&b_pub).unwrap();
            assert_eq!(from_ours.secret_bytes(), from_ring.secret_bytes());
            // Fresh keys every time.
            assert_ne!(
                ours().start().unwrap().pub_key(),
                ours().start().unwrap().pub_key()
            );
        }

        #[test]
        fn refuses_bad_key_shares() {
            let invalid = Error::from(PeerMisbehaved::InvalidKeyShare);
            for peer in [&[9u8; 31][..], &[9u8; 33][..], &[][..]] {
                let e = ours().start().unwrap().complete(peer).err();
                assert_eq!(e.as_ref(), Some(&invalid), "length {}", peer.len());
            }
            // Small-order points (RFC 7748 §6.1: the all-zero output): 0, 1 and a point of
            // order 8.
            let mut order8 = [0u8; 32];
            order8.copy_from_slice(
                &[
                    0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1,
                    0x9f, 0xc4, 0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62,
                    0x05, 0x16, 0x5f, 0x49, 0xb8, 0x00,
                ][..],
            );
            let mut one = [0u8; 32];
            one[0] = 1;
            for peer in [[0u8; 32], one, order8] {
                let e = ours().start().unwrap().complete(&peer).err();
                assert_eq!(e.as_ref(), Some(&invalid));
            }
        }

        #[test]
        fn the_provider_uses_it_for_x25519_only() {
            let provider = super::super::provider();
            let names: Vec<_> = provider.kx_groups.iter().map(|g| g.name()).collect();
            let ring: Vec<_> = rustls::crypto::ring::default_provider()
                .kx_groups
                .iter()
                .map(|g| g.name())
                .collect();
            assert_eq!(names, ring);
            let x = provider
                .kx_groups
                .iter()
                .find(|g| g.name() == NamedGroup::X25519);
            assert_eq!(format!("{:?}", x.unwrap()), "Graviola");
        }
    }
}

/// The policy every server configuration of the public port shares: the server's cipher
/// suite order and one TLS 1.3 ticket per handshake, from its own ticket keys.
fn apply_policy(config: &mut ServerConfig, ticketer: Tickets) {
    config.ticketer = Arc::new(ticketer);
    config.ignore_client_order = true;
    config.send_tls13_tickets = TLS13_TICKETS;
}

/// The three TLS server configurations of the public port (see the module doc). Built by the
/// caller, who owns the CAs; cheap to clone.
#[derive(Clone, Debug)]
pub struct TlsConfigs {
    /// No client authentication.
    pub web: Arc<ServerConfig>,
    /// Optional client certificate, user CA roots.
    pub app: Arc<ServerConfig>,
    /// mTLS, user CA roots.
    pub user: Arc<ServerConfig>,
    /// mTLS, host CA roots.
    pub tunnel: Arc<ServerConfig>,
}

/// Why [`TlsConfigs::build`] failed; the caller's certificates or roots are at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsBuildError {
    /// A CA root could not be added.
    #[error("a {which} CA root certificate is not usable: {source}")]
    Root {
        /// `user` or `host`.
        which: &'static str,
        /// What rustls said.
        source: rustls::Error,
    },
    /// No roots for a configuration that requires client certificates.
    #[error("no {which} CA roots: {which} certificates could never be verified")]
    NoRoots {
        /// `user` or `host`.
        which: &'static str,
    },
    /// The client verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The server certificate or key was refused.
    #[error("the server certificate or key is not usable: {0}")]
    Config(#[from] rustls::Error),
    /// No session-ticket secret could be made.
    #[error("session tickets: {0}")]
    Tickets(#[from] TicketSecretError),
}

impl TlsConfigs {
    /// Builds the three configurations from one server certificate chain and key (the public
    /// address's certificate) and the user and host CA roots: ring only, TLS 1.3 and 1.2,
    /// AES-128-GCM preferred, one stateless session ticket per handshake (keys from a random
    /// secret: tickets do not survive the process).
    pub fn build(
        server_chain: Vec<CertificateDer<'static>>,
        server_key: PrivateKeyDer<'static>,
        user_roots: &[CertificateDer<'static>],
        host_roots: &[CertificateDer<'static>],
    ) -> Result<TlsConfigs, TlsBuildError> {
        let secret = TicketSecret::generate()?;
        Self::build_with_ticket_secret(server_chain, server_key, user_roots, host_roots, &secret)
    }

    /// [`TlsConfigs::build`] with ticket keys derived from `secret` and bound to the roots
    /// (`tickets.rs`): a ticket issued before a restart resumes after it, as long as the same
    /// CA roots are trusted.
    pub fn build_with_ticket_secret(
        server_chain: Vec<CertificateDer<'static>>,
        server_key: PrivateKeyDer<'static>,
        user_roots: &[CertificateDer<'static>],
        host_roots: &[CertificateDer<'static>],
        secret: &TicketSecret,
    ) -> Result<TlsConfigs, TlsBuildError> {
        let provider = Arc::new(provider());
        let versions: &[&rustls::SupportedProtocolVersion] =
            &[&rustls::version::TLS13, &rustls::version::TLS12];
        let binding = binding(user_roots, host_roots);
        let ticketer = |label| Tickets::new(secret, &binding, label);

        let mut web = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)?
            .with_no_client_auth()
            .with_single_cert(server_chain.clone(), server_key.clone_key())?;
        apply_policy(&mut web, ticketer("web"));

        let mtls = |label: &'static str,
                    which: &'static str,
                    roots: &[CertificateDer<'static>],
                    optional: bool| {
            if roots.is_empty() {
                return Err(TlsBuildError::NoRoots { which });
            }
            let mut store = RootCertStore::empty();
            for root in roots {
                store
                    .add(root.clone())
                    .map_err(|source| TlsBuildError::Root { which, source })?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(store), Arc::clone(&provider));
            let verifier = if optional {
                verifier.allow_unauthenticated().build()?
            } else {
                verifier.build()?
            };
            // Remembers verified chains per shard (crate::verified; ARCHITECTURE.md).
            let verifier = Arc::new(crate::verified::CachedClientVerifier::new(verifier, roots));
            let mut config = ServerConfig::builder_with_provider(Arc::clone(&provider))
                .with_protocol_versions(versions)?
                .with_client_cert_verifier(verifier)
                .with_single_cert(server_chain.clone(), server_key.clone_key())?;
            apply_policy(&mut config, ticketer(label));
            Ok(config)
        };
        let user = mtls("user", "user", user_roots, false)?;
        let app = mtls("app", "user", user_roots, true)?;
        let tunnel = mtls("tunnel", "host", host_roots, false)?;
        Ok(TlsConfigs {
            web: Arc::new(web),
            app: Arc::new(app),
            user: Arc::new(user),
            tunnel: Arc::new(tunnel),
        })
    }
}

/// One shard's acceptors (see the module doc).
pub(crate) struct ShardTls {
    pub web: TlsAcceptor,
    pub app: TlsAcceptor,
    pub user: TlsAcceptor,
    pub tunnel: TlsAcceptor,
}

impl ShardTls {
    /// This shard's copies of `configs`.
    pub fn new(configs: &TlsConfigs) -> ShardTls {
        ShardTls {
            web: acceptor(&configs.web, &[ALPN_HTTP1]),
            app: acceptor(&configs.app, &[ALPN_HTTP1]),
            user: acceptor(
                &configs.user,
                &[ALPN_SSH, ALPN_POSTGRES, ALPN_TCP, ALPN_APP],
            ),
            tunnel: acceptor(&configs.tunnel, &[ALPN_TUNNEL]),
        }
    }
}

fn acceptor(config: &Arc<ServerConfig>, alpn: &[&[u8]]) -> TlsAcceptor {
    let mut copy = ServerConfig::clone(config);
    copy.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
    copy.alpn_protocols = alpn.iter().map(|id| id.to_vec()).collect();
    TlsAcceptor::from(Arc::new(copy))
}
