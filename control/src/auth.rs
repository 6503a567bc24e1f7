//! Local users' credentials: argon2id password hashes, TOTP second factor, and the failed-login
//! rate limiter. What a user may *do* is RBAC's business, not this file's.
//!
//! Argon2 parameters: argon2id, m = 19 MiB, t = 2, p = 1 — the OWASP password storage
//! recommendation and the `argon2` crate's default. About 20-30 ms per hash in a release build on
//! one core here, so a login costs one pool thread that long; the rate limiter keeps guessing
//! from turning that into a denial of service.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use ring::rand::{SecureRandom, SystemRandom};

/// Shortest password accepted: eight characters, NIST SP 800-63B's floor.
pub const MIN_PASSWORD_LEN: usize = 8;
/// Longest password accepted, so a huge body cannot make argon2 hash megabytes.
pub const MAX_PASSWORD_LEN: usize = 1024;
/// TOTP: RFC 6238 defaults every authenticator app understands.
pub const OTP_DIGITS: u8 = 6;
pub const OTP_STEP_SECS: u64 = 30;
/// Issuer shown in authenticator apps.
pub const OTP_ISSUER: &str = "Jaunt";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password must be at least {MIN_PASSWORD_LEN} characters")]
    PasswordTooShort,
    #[error("password must be at most {MAX_PASSWORD_LEN} characters")]
    PasswordTooLong,
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("TOTP: {0}")]
    Otp(String),
    #[error("no randomness available from the operating system")]
    Random,
}

/// argon2id hash of `password` as a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$...`).
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    check_password_policy(password)?;
    let hash = Argon2::default()
        .hash_password(password.as_bytes())
        .map_err(|e| AuthError::Hash(e.to_string()))?;
    Ok(hash.to_string())
}

/// Rejects passwords outside the length bounds.
pub fn check_password_policy(password: &str) -> Result<(), AuthError> {
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(AuthError::PasswordTooShort);
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(AuthError::PasswordTooLong);
    }
    Ok(())
}

/// True if `password` matches the stored PHC hash. Unparseable hashes never match.
pub fn verify_password(password: &str, phc: &str) -> bool {
    if password.len() > MAX_PASSWORD_LEN {
        return false;
    }
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// A real argon2id hash of a random password nobody knows: verifying against it spends the same
/// time on unknown users as on known ones, so timing does not reveal which names exist.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        let secret =
            random_password().unwrap_or_else(|_| "fallback-password-unknowable".to_string());
        Argon2::default()
            .hash_password(secret.as_bytes())
            .map(|h| h.to_string())
            .unwrap_or_default()
    })
}

/// A random password for generated accounts: 24 characters from a 62-letter alphabet (~143 bits).
pub fn random_password() -> Result<String, AuthError> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 24];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AuthError::Random)?;
    // 256 % 62 leaves a slight bias; rejection sampling keeps it uniform.
    let mut out = String::with_capacity(24);
    let mut pool = bytes.to_vec();
    while out.len() < 24 {
        for b in pool.drain(..) {
            if b < 248 && out.len() < 24 {
                out.push(char::from(ALPHABET[usize::from(b % 62)]));
            }
        }
        if out.len() < 24 {
            let mut more = [0u8; 8];
            SystemRandom::new()
                .fill(&mut more)
                .map_err(|_| AuthError::Random)?;
            pool.extend_from_slice(&more);
        }
    }
    Ok(out)
}

/// A fresh TOTP secret (160 bits, base32).
pub fn new_otp_secret() -> Result<String, AuthError> {
    let mut bytes = [0u8; 20];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AuthError::Random)?;
    Ok(totp_rs::Secret::from(bytes).to_base32())
}

fn totp(secret_b32: &str, account: &str) -> Result<totp_rs::Totp, AuthError> {
    let secret =
        totp_rs::Secret::try_from_base32(secret_b32).map_err(|e| AuthError::Otp(e.to_string()))?;
    totp_rs::Builder::new()
        .with_digits(OTP_DIGITS)
        .with_step_duration(OTP_STEP_SECS)
        .with_skew(1)
        .with_secret(secret)
        .with_account_name(account)
        .with_issuer(Some(OTP_ISSUER))
        .build()
        .map_err(|e| AuthError::Otp(e.to_string()))
}

/// The `otpauth://` URL an authenticator app scans.
pub fn otp_url(secret_b32: &str, account: &str) -> Result<String, AuthError> {
    totp(secret_b32, account)?
        .to_url()
        .map_err(|e| AuthError::Otp(e.to_string()))
}

/// The code for `secret` at unix time `now` (tests and `jaunt` helpers).
pub fn otp_code(secret_b32: &str, now: u64) -> Result<String, AuthError> {
    Ok(totp(secret_b32, "x")?.generate(now).to_string())
}

/// True if `code` is valid for `secret` at `now`, one step of clock skew either way.
pub fn verify_otp(secret_b32: &str, code: &str, now: u64) -> bool {
    match totp(secret_b32, "x") {
        Ok(t) => t.check(code.trim(), now).is_some(),
        Err(_) => false,
    }
}

/// Failed-login limiter: at most `max_failures` failures per key within `window_secs`, keys
/// being `user:NAME` and `addr:IP`. Bounded: at most [`RateLimiter::MAX_KEYS`] keys are tracked;
/// past that, stale keys are pruned and, if still full, the oldest is evicted.
pub struct RateLimiter {
    max_failures: usize,
    window_secs: u64,
    state: Mutex<HashMap<String, VecDeque<u64>>>,
}

impl RateLimiter {
    /// Bound on tracked keys (users plus source addresses).
    pub const MAX_KEYS: usize = 100_000;
    /// Default policy: 5 failures per 5 minutes per user and per source address.
    pub const DEFAULT_MAX_FAILURES: usize = 5;
    pub const DEFAULT_WINDOW_SECS: u64 = 300;

    pub fn new(max_failures: usize, window_secs: u64) -> RateLimiter {
        RateLimiter {
            max_failures: max_failures.max(1),
            window_secs,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(seconds to wait)` if `key` is blocked at `now`.
    pub fn blocked(&self, key: &str, now: u64) -> Option<u64> {
        let mut state = self.state.lock().ok()?;
        let q = state.get_mut(key)?;
        while q.front().is_some_and(|t| t + self.window_secs <= now) {
            q.pop_front();
        }
        if q.len() >= self.max_failures {
            q.front()
                .map(|first| (first + self.window_secs).saturating_sub(now).max(1))
        } else {
            None
        }
    }

    /// Records a failure for `key` at `now`.
    pub fn fail(&self, key: &str, now: u64) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if state.len() >= Self::MAX_KEYS && !state.contains_key(key) {
            let window = self.window_secs;
            state.retain(|_, q| q.back().is_some_and(|t| t + window > now));
            if state.len() >= Self::MAX_KEYS {
                let oldest = state
                    .iter()
                    .min_by_key(|(_, q)| q.back().copied().unwrap_or(0))
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    state.remove(&k);
                }
            }
        }
        let q = state.entry(key.to_string()).or_default();
        q.push_back(now);
        while q.len() > self.max_failures {
            q.pop_front();
        }
    }

    /// Forgets failures for `key` (after a successful login).
    pub fn clear(&self, key: &str) {
        if let Ok(mut state) = self.state.lock() {
            state.remove(key);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn password_round_trip() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong horse!", &h));
        assert!(!verify_password("correct horse", "not a hash"));
        assert!(!verify_password("anything at all", dummy_hash()));
        assert!(matches!(
            hash_password("short"),
            Err(AuthError::PasswordTooShort)
        ));
    }

    #[test]
    fn otp_accepts_current_and_adjacent_steps_only() {
        let secret = new_otp_secret().unwrap();
        let now = 1_700_000_000;
        let code = otp_code(&secret, now).unwrap();
        assert!(verify_otp(&secret, &code, now));
        assert!(verify_otp(&secret, &code, now + OTP_STEP_SECS));
        assert!(!verify_otp(&secret, &code, now + 10 * OTP_STEP_SECS));
        assert!(!verify_otp(&secret, "000000x", now));
        assert!(otp_url(&secret, "alice")
            .unwrap()
            .starts_with("otpauth://totp/"));
    }

    #[test]
    fn limiter_blocks_after_failures_and_recovers() {
        let l = RateLimiter::new(3, 60);
        for t in 0..3 {
            assert_eq!(l.blocked("user:a", 100 + t), None);
            l.fail("user:a", 100 + t);
        }
        assert_eq!(l.blocked("user:a", 103), Some(57));
        assert_eq!(l.blocked("user:b", 103), None);
        assert_eq!(l.blocked("user:a", 161), None);
        l.fail("user:a", 161);
        l.clear("user:a");
        assert_eq!(l.blocked("user:a", 162), None);
    }

    #[test]
    fn random_passwords_are_long_and_distinct() {
        let a = random_password().unwrap();
        assert_eq!(a.len(), 24);
        assert_ne!(a, random_password().unwrap());
    }
}
