//! TLS session tickets that survive an engine restart: the ticket keys are derived from a
//! [`TicketSecret`] the caller keeps (control keeps it in its data dir, `tls-tickets.key`), so
//! after a restart (or a takeover) an agent's reconnect resumes its tunnel's session (PSK with
//! a fresh ECDHE, no certificate signature or chain verification) instead of a full mTLS
//! handshake. See ARCHITECTURE.md, "TLS policy", for the security argument.
//!
//! Keys: HKDF-SHA256 (ring) with the secret as input key material, a digest of every trusted
//! user and host CA root as salt (the *binding*: a CA rotation phase changes the roots in force,
//! so every older ticket stops decrypting and the next connection makes a full handshake,
//! verified against the new roots), and the configuration's name (`web`, `app`, `user`,
//! `tunnel`: a ticket only resumes on the configuration whose verifier checked its certificate)
//! plus the day (`unix time / 86,400`) as info. Encryption is ring's AES-256-GCM with a random
//! 96-bit nonce. A ticket is `version (1) ‖ day (8, big-endian) ‖ nonce (12) ‖ ciphertext ‖ tag`,
//! the first nine bytes authenticated as associated data. A ticket decrypts for
//! [`TICKET_KEY_DAYS`] days (its day and the six after), and clients are told it lives
//! [`TICKET_LIFETIME_SECS`], so a key is used to encrypt for one day and to decrypt for a week,
//! then never again. Each thread (each shard is one) keeps the day keys it derived, per
//! instance (at most eight each), since a derivation and AES key setup per ticket was about 1%
//! of a handshake's CPU; per thread, because every shard shares one instance and a shared lock
//! on every handshake would bounce between cores.

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::digest::{Context, SHA256};
use ring::hkdf::{Prk, Salt, HKDF_SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateDer;

/// Bytes of a [`TicketSecret`].
pub const TICKET_SECRET_LEN: usize = 32;

/// How long one day's key decrypts tickets, in days (its day included).
pub const TICKET_KEY_DAYS: u64 = 7;

/// The ticket lifetime announced to clients (they do not offer a ticket older than this): six
/// days, so a ticket is always offered while its key still decrypts.
pub const TICKET_LIFETIME_SECS: u32 = 6 * 86_400;

const DAY_SECS: u64 = 86_400;
const VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 8;
const TAG_LEN: usize = 16;

/// The secret the ticket keys are derived from. Whoever holds it can forge a session ticket
/// for any identity the bound CAs could have issued, so it is kept like a CA key (mode 0600 in
/// the data dir).
#[derive(Clone)]
pub struct TicketSecret([u8; TICKET_SECRET_LEN]);

impl fmt::Debug for TicketSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TicketSecret(..)")
    }
}

/// A ticket secret could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum TicketSecretError {
    #[error("the system's random source failed")]
    Random,
    #[error("a ticket secret is {TICKET_SECRET_LEN} bytes, not {0}")]
    Length(usize),
}

impl TicketSecret {
    /// A new random secret.
    pub fn generate() -> Result<TicketSecret, TicketSecretError> {
        let mut bytes = [0u8; TICKET_SECRET_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| TicketSecretError::Random)?;
        Ok(TicketSecret(bytes))
    }

    /// A secret saved earlier with [`TicketSecret::as_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<TicketSecret, TicketSecretError> {
        let bytes: [u8; TICKET_SECRET_LEN] = bytes
            .try_into()
            .map_err(|_| TicketSecretError::Length(bytes.len()))?;
        Ok(TicketSecret(bytes))
    }

    /// The bytes to save.
    pub fn as_bytes(&self) -> &[u8; TICKET_SECRET_LEN] {
        &self.0
    }
}

/// One configuration's ticket keys: rustls' [`ProducesTickets`](rustls::server::ProducesTickets).
pub(crate) struct Tickets {
    prk: Prk,
    /// The configuration's name, part of every key's derivation.
    label: &'static str,
    /// This instance's key in each thread's [`DAY_KEYS`].
    id: u64,
}

/// Distinct ids for [`Tickets`] instances (a reload builds new ones).
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Most day keys a thread keeps over all instances (four configurations, each at most
/// [`TICKET_KEY_DAYS`] + 1 days); beyond it the oldest entry goes (an instance a reload
/// replaced, in practice).
const THREAD_KEYS: usize = 4 * (TICKET_KEY_DAYS as usize + 1);

thread_local! {
    /// Day keys derived on this thread, as (instance id, day, key), oldest first. A key is a
    /// function of the secret, binding, label and day, so keeping it adds nothing `prk` does
    /// not hold already, and saves its derivation and AES-GCM key setup on every ticket (about
    /// 1.5 µs each, one or two per handshake).
    static DAY_KEYS: RefCell<Vec<(u64, u64, Rc<LessSafeKey>)>> = const { RefCell::new(Vec::new()) };
}

impl fmt::Debug for Tickets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tickets")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

/// The salt that binds ticket keys to the CA roots in force (see the module doc).
pub(crate) fn binding(
    user_roots: &[CertificateDer<'_>],
    host_roots: &[CertificateDer<'_>],
) -> [u8; 32] {
    let mut digest = Context::new(&SHA256);
    digest.update(b"jaunt tls tickets v1");
    for (kind, roots) in [(b'u', user_roots), (b'h', host_roots)] {
        for root in roots {
            digest.update(&[kind]);
            digest.update(&(root.len() as u64).to_be_bytes());
            digest.update(root.as_ref());
        }
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.finish().as_ref());
    out
}

impl Tickets {
    pub(crate) fn new(secret: &TicketSecret, binding: &[u8; 32], label: &'static str) -> Tickets {
        Tickets {
            prk: Salt::new(HKDF_SHA256, binding).extract(secret.as_bytes()),
            label,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn key(&self, day: u64) -> Option<Rc<LessSafeKey>> {
        let id = self.id;
        let cached = DAY_KEYS.with_borrow(|keys| {
            keys.iter()
                .find(|(i, d, _)| (*i, *d) == (id, day))
                .map(|(_, _, key)| Rc::clone(key))
        });
        if cached.is_some() {
            return cached;
        }
        let day_bytes = day.to_be_bytes();
        let info = [self.label.as_bytes(), &day_bytes[..]];
        let okm = self.prk.expand(&info, &AES_256_GCM).ok()?;
        let key = Rc::new(LessSafeKey::new(UnboundKey::from(okm)));
        DAY_KEYS.with_borrow_mut(|keys| {
            // Oldest days out first: only the last TICKET_KEY_DAYS ever decrypt.
            if self.kept_days(keys) > TICKET_KEY_DAYS as usize {
                let oldest = keys
                    .iter()
                    .enumerate()
                    .filter(|(_, (i, _, _))| *i == id)
                    .min_by_key(|(_, (_, d, _))| *d)
                    .map(|(at, _)| at);
                if let Some(at) = oldest {
                    keys.remove(at);
                }
            }
            if keys.len() >= THREAD_KEYS {
                keys.remove(0);
            }
            keys.push((id, day, Rc::clone(&key)));
        });
        Some(key)
    }

    /// How many day keys of this instance `keys` holds.
    fn kept_days(&self, keys: &[(u64, u64, Rc<LessSafeKey>)]) -> usize {
        keys.iter().filter(|(i, _, _)| *i == self.id).count()
    }

    fn encrypt_at(&self, plain: &[u8], now: u64) -> Option<Vec<u8>> {
        let day = now / DAY_SECS;
        let key = self.key(day)?;
        let mut nonce = [0u8; NONCE_LEN];
        crate::server::tls::public_random::fill(&mut nonce).ok()?;
        let mut ticket = Vec::with_capacity(HEADER_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        ticket.push(VERSION);
        ticket.extend_from_slice(&day.to_be_bytes());
        ticket.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&ticket[..HEADER_LEN]),
            &mut sealed,
        )
        .ok()?;
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    fn decrypt_at(&self, ticket: &[u8], now: u64) -> Option<Vec<u8>> {
        if ticket.len() < HEADER_LEN + NONCE_LEN + TAG_LEN || ticket[0] != VERSION {
            return None;
        }
        let (header, rest) = ticket.split_at(HEADER_LEN);
        let day = u64::from_be_bytes(header[1..].try_into().ok()?);
        let today = now / DAY_SECS;
        if day > today || today - day >= TICKET_KEY_DAYS {
            return None;
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = self
            .key(day)?
            .open_in_place(nonce, Aad::from(header), &mut buf)
            .ok()?;
        let len = plain.len();
        buf.truncate(len);
        Some(buf)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl rustls::server::ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        TICKET_LIFETIME_SECS
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.encrypt_at(plain, unix_now())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.decrypt_at(cipher, unix_now())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const NOW: u64 = 1_765_000_000;

    fn tickets(secret: &TicketSecret, roots: &[u8], label: &'static str) -> Tickets {
        let roots = [CertificateDer::from(roots.to_vec())];
        Tickets::new(secret, &binding(&roots, &roots), label)
    }

    #[test]
    fn kept_day_keys_stay_few_and_give_the_same_tickets() {
        let secret = TicketSecret::generate().unwrap();
        let a = tickets(&secret, b"ca-1", "web");
        let fresh = |ticket: &[u8], now| tickets(&secret, b"ca-1", "web").decrypt_at(ticket, now);
        for day in 0..30 {
            let now = NOW + day * DAY_SECS;
            let ticket = a.encrypt_at(b"state", now).unwrap();
            // An instance that keeps no key yet reads what the keeping one wrote, and back.
            assert_eq!(fresh(&ticket, now).unwrap(), b"state");
            let other = tickets(&secret, b"ca-1", "web")
                .encrypt_at(b"s2", now)
                .unwrap();
            assert_eq!(a.decrypt_at(&other, now).unwrap(), b"s2");
            assert!(DAY_KEYS.with_borrow(|keys| a.kept_days(keys)) <= TICKET_KEY_DAYS as usize + 1);
        }
        // A week-old day whose key was dropped is derived again.
        let old = a.encrypt_at(b"old", NOW).unwrap();
        assert_eq!(a.decrypt_at(&old, NOW + 6 * DAY_SECS).unwrap(), b"old");
    }

    #[test]
    fn tickets_decrypt_for_a_week_with_the_same_secret_roots_and_label_only() {
        let secret = TicketSecret::generate().unwrap();
        let a = tickets(&secret, b"ca-1", "tunnel");
        let ticket = a.encrypt_at(b"session state", NOW).unwrap();
        // A restart: a new instance from the same secret and roots.
        let again = tickets(
            &TicketSecret::from_bytes(secret.as_bytes()).unwrap(),
            b"ca-1",
            "tunnel",
        );
        assert_eq!(again.decrypt_at(&ticket, NOW).unwrap(), b"session state");
        let last_day = NOW + (TICKET_KEY_DAYS - 1) * DAY_SECS;
        assert!(again
            .decrypt_at(&ticket, last_day - last_day % DAY_SECS)
            .is_some());
        assert!(again
            .decrypt_at(&ticket, NOW + TICKET_KEY_DAYS * DAY_SECS)
            .is_none());
        // Issued "tomorrow" (a clock that went back): refused.
        let future = a.encrypt_at(b"x", NOW + DAY_SECS).unwrap();
        assert!(a.decrypt_at(&future, NOW).is_none());
        // Other roots (a CA rotation phase), another configuration, another secret: refused.
        assert!(tickets(&secret, b"ca-2", "tunnel")
            .decrypt_at(&ticket, NOW)
            .is_none());
        assert!(tickets(&secret, b"ca-1", "user")
            .decrypt_at(&ticket, NOW)
            .is_none());
        let other = TicketSecret::generate().unwrap();
        assert!(tickets(&other, b"ca-1", "tunnel")
            .decrypt_at(&ticket, NOW)
            .is_none());
        // Any flipped bit (header, nonce, body, tag), truncation or garbage: refused, no panic.
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 0x01;
            assert!(again.decrypt_at(&bad, NOW).is_none(), "byte {i}");
        }
        for len in 0..ticket.len() {
            assert!(again.decrypt_at(&ticket[..len], NOW).is_none());
        }
        assert!(TicketSecret::from_bytes(&[0; 31]).is_err());
        assert_ne!(
            a.encrypt_at(b"session state", NOW).unwrap(),
            ticket,
            "a fresh nonce per ticket"
        );
    }
}
