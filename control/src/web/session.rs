//! Web sessions: what the `__Host-jaunt_session` cookie stands for, kept in control's memory.
//!
//! A session is created by a password login on `/web/login` and holds the identity that login
//! granted (the same one `jaunt login` would put in a certificate), a CSRF token, and the
//! certificate's expiry: a session never outlives the certificate TTL. The cookie carries a
//! random 256-bit token; the table is keyed by its SHA-256, so the map never holds a usable
//! token. Logout removes the entry: the cookie is dead on the server, whatever the browser keeps.
//!
//! Bounds: [`MAX_SESSIONS`] in all and [`MAX_SESSIONS_PER_USER`] per user (a new login past it
//! ends that user's oldest session). Sessions are lost when control restarts (users log in
//! again), and are not shared between controls.
//!
//! Not here: cookies and CSRF checks on requests (`mod.rs`), the login itself (`service.rs`).

use std::collections::HashMap;
use std::sync::Mutex;

use jaunt_config::identity::Identity;
use ring::digest::{digest, SHA256};
use ring::rand::{SecureRandom, SystemRandom};

/// Most live web sessions: a login past it is refused (503) until some expire or log out.
pub const MAX_SESSIONS: usize = 10_000;

/// Most live web sessions of one user: a login past it ends the user's oldest session.
pub const MAX_SESSIONS_PER_USER: usize = 32;

/// A live web session.
#[derive(Clone, Debug)]
pub struct WebSession {
    /// What the login granted; its `expires` is the session's.
    pub identity: Identity,
    /// The token state-changing requests carry in `X-CSRF-Token`.
    pub csrf: String,
    /// Unix seconds of the login.
    pub created: u64,
}

/// Why a session could not be created.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("too many web sessions; try again later")]
    Full,
    #[error("no randomness available")]
    Random,
}

/// The live sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], WebSession>>,
}

impl Sessions {
    /// Creates a session for `identity`; returns the cookie token and the session.
    pub fn create(
        &self,
        identity: Identity,
        now: u64,
    ) -> Result<(String, WebSession), SessionError> {
        let token = random_hex()?;
        let session = WebSession {
            identity,
            csrf: random_hex()?,
            created: now,
        };
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, s| s.identity.expires > now);
        }
        if map.len() >= MAX_SESSIONS {
            return Err(SessionError::Full);
        }
        let user = session.identity.name.clone();
        let mut mine: Vec<([u8; 32], u64)> = map
            .iter()
            .filter(|(_, s)| s.identity.name == user)
            .map(|(k, s)| (*k, s.created))
            .collect();
        if mine.len() >= MAX_SESSIONS_PER_USER {
            mine.sort_by_key(|(_, created)| *created);
            for (key, _) in mine.iter().take(mine.len() + 1 - MAX_SESSIONS_PER_USER) {
                map.remove(key);
            }
        }
        map.insert(key(&token), session.clone());
        Ok((token, session))
    }

    /// The live session of `token`, if any (an expired one is removed).
    pub fn get(&self, token: &str, now: u64) -> Option<WebSession> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let k = key(token);
        match map.get(&k) {
            Some(s) if s.identity.expires > now => Some(s.clone()),
            Some(_) => {
                map.remove(&k);
                None
            }
            None => None,
        }
    }

    /// Ends the session of `token`; true if there was one.
    pub fn remove(&self, token: &str) -> bool {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&key(token)).is_some()
    }

    /// Number of live (not yet purged) sessions.
    pub fn len(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn key(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, token.as_bytes()).as_ref());
    out
}

/// 32 random bytes as lower-case hex.
pub fn random_hex() -> Result<String, SessionError> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| SessionError::Random)?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jaunt_config::identity::IdentityKind;

    fn identity(name: &str, expires: u64) -> Identity {
        Identity {
            kind: IdentityKind::User,
            name: name.into(),
            roles: vec![],
            logins: vec![],
            db_users: vec![],
            db_names: vec![],
            traits: Default::default(),
            cluster: "c".into(),
            not_before: 0,
            expires,
            permit_pty: false,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
        }
    }

    #[test]
    fn sessions_expire_with_the_identity_and_end_on_logout() {
        let sessions = Sessions::default();
        let (token, s) = sessions
            .create(identity("alice", 100), 10)
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(token.len(), 64);
        assert_ne!(token, s.csrf);
        assert!(sessions.get(&token, 99).is_some());
        assert!(sessions.get("nope", 99).is_none());
        assert!(sessions.get(&token, 100).is_none(), "expired with the cert");
        assert!(sessions.is_empty(), "an expired session is purged");
        let (token, _) = sessions
            .create(identity("alice", 100), 10)
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(sessions.remove(&token));
        assert!(sessions.get(&token, 11).is_none());
        assert!(!sessions.remove(&token));
    }

    #[test]
    fn a_user_holds_a_bounded_number_of_sessions() {
        let sessions = Sessions::default();
        let mut tokens = Vec::new();
        for i in 0..(MAX_SESSIONS_PER_USER as u64 + 2) {
            let (t, _) = sessions
                .create(identity("bob", 1000), i)
                .unwrap_or_else(|e| unreachable!("{e}"));
            tokens.push(t);
        }
        assert_eq!(sessions.len(), MAX_SESSIONS_PER_USER);
        assert!(sessions.get(&tokens[0], 50).is_none(), "oldest ended");
        assert!(sessions.get(&tokens[1], 50).is_none());
        assert!(sessions.get(&tokens[2], 50).is_some());
        let (other, _) = sessions
            .create(identity("carol", 1000), 0)
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(sessions.get(&other, 50).is_some());
    }
}
