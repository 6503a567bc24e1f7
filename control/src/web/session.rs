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
//! Not here: cookies and CSRF checks on requests (`mod.rs`), the login itself (`service/login.rs`).

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

/// How long the one-time link from `/web/apps/APP/open` to the app host stays good.
pub const APP_EXCHANGE_TTL_SECS: u64 = 60;

/// A one-time exchange made on the public host, redeemed on the app host.
#[derive(Debug)]
struct Exchange {
    app: String,
    web: [u8; 32],
    next: String,
    expires: u64,
}

/// A browser's session on one app host (`__Host-jaunt_app`): a child of a web session, alive
/// while its parent is.
#[derive(Clone, Debug)]
pub struct AppSession {
    pub app: String,
    web: [u8; 32],
    /// The web session's identity.
    pub identity: Identity,
    /// A user certificate for `identity` (control's user CA; its key was thrown away): the
    /// engine forwards it so that the agent checks the user as for any other session.
    pub cert_der: Vec<u8>,
}

/// The live sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], WebSession>>,
    exchanges: Mutex<HashMap<[u8; 32], Exchange>>,
    apps: Mutex<HashMap<[u8; 32], AppSession>>,
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

    /// Ends the session of `token` and its app sessions; true if there was one.
    pub fn remove(&self, token: &str) -> bool {
        let k = key(token);
        let removed = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.remove(&k).is_some()
        };
        let mut apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        apps.retain(|_, a| a.web != k);
        let mut exchanges = self.exchanges.lock().unwrap_or_else(|p| p.into_inner());
        exchanges.retain(|_, e| e.web != k);
        removed
    }

    fn live(&self, web: &[u8; 32], now: u64) -> Option<WebSession> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(web).filter(|s| s.identity.expires > now).cloned()
    }

    /// A one-time token that opens app `app` (then `next`, a path) for the web session of
    /// `web_token`, good for [`APP_EXCHANGE_TTL_SECS`].
    pub fn create_exchange(
        &self,
        web_token: &str,
        app: &str,
        next: &str,
        now: u64,
    ) -> Result<String, SessionError> {
        let token = random_hex()?;
        let mut exchanges = self.exchanges.lock().unwrap_or_else(|p| p.into_inner());
        if exchanges.len() >= MAX_SESSIONS {
            exchanges.retain(|_, e| e.expires > now);
        }
        if exchanges.len() >= MAX_SESSIONS {
            return Err(SessionError::Full);
        }
        exchanges.insert(
            key(&token),
            Exchange {
                app: app.to_owned(),
                web: key(web_token),
                next: next.to_owned(),
                expires: now + APP_EXCHANGE_TTL_SECS,
            },
        );
        Ok(token)
    }

    /// Redeems an exchange token on app `app`'s host (once): its web session, while live, and
    /// where to go.
    pub fn redeem_exchange(
        &self,
        token: &str,
        app: &str,
        now: u64,
    ) -> Option<([u8; 32], WebSession, String)> {
        let exchange = {
            let mut exchanges = self.exchanges.lock().unwrap_or_else(|p| p.into_inner());
            exchanges.remove(&key(token))?
        };
        if exchange.app != app || exchange.expires <= now {
            return None;
        }
        let session = self.live(&exchange.web, now)?;
        Some((exchange.web, session, exchange.next))
    }

    /// A new app session for app `app`, a child of web session `web`; returns its cookie token.
    pub fn create_app_session(
        &self,
        web: [u8; 32],
        app: &str,
        identity: Identity,
        cert_der: Vec<u8>,
        now: u64,
    ) -> Result<String, SessionError> {
        let token = random_hex()?;
        let mut apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        if apps.len() >= MAX_SESSIONS {
            apps.retain(|_, a| a.identity.expires > now);
        }
        if apps.len() >= MAX_SESSIONS {
            return Err(SessionError::Full);
        }
        apps.insert(
            key(&token),
            AppSession {
                app: app.to_owned(),
                web,
                identity,
                cert_der,
            },
        );
        Ok(token)
    }

    /// The app session of cookie `token` on app `app`'s host, while it and its web session
    /// live (a dead one is removed).
    pub fn app_session(&self, token: &str, app: &str, now: u64) -> Option<AppSession> {
        let k = key(token);
        let found = {
            let apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
            apps.get(&k).cloned()
        }?;
        if found.app == app && found.identity.expires > now && self.live(&found.web, now).is_some()
        {
            return Some(found);
        }
        if found.app == app {
            let mut apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
            apps.remove(&k);
        }
        None
    }

    /// A one-time ticket for an observer's WebSocket to the live session `session_id`
    /// (`/web/sessions/ID/join`), bound to the web session of `web_token`; as
    /// [`Sessions::create_terminal_ticket`], under the key `join/ID`.
    pub fn create_join_ticket(
        &self,
        web_token: &str,
        session_id: &str,
        now: u64,
    ) -> Result<String, SessionError> {
        self.create_exchange(web_token, &join_key(session_id), "", now)
    }

    /// Redeems a join ticket, once: the web session, if the ticket is for `session_id`,
    /// unexpired, and of the web session `web_token`.
    pub fn redeem_join_ticket(
        &self,
        ticket: &str,
        web_token: &str,
        session_id: &str,
        now: u64,
    ) -> Option<WebSession> {
        let (web, session, _) = self.redeem_exchange(ticket, &join_key(session_id), now)?;
        (web == key(web_token)).then_some(session)
    }

    /// A one-time ticket (valid [`APP_EXCHANGE_TTL_SECS`]) for the web terminal's WebSocket to
    /// `node` as `login`, bound to the web session of `web_token`. It rides on the exchange
    /// table under the key `terminal/NODE/LOGIN` (app names have no `/`, so it never redeems as
    /// an app exchange), and ends with its web session as app exchanges do.
    pub fn create_terminal_ticket(
        &self,
        web_token: &str,
        node: &str,
        login: &str,
        now: u64,
    ) -> Result<String, SessionError> {
        self.create_exchange(web_token, &terminal_key(node, login), "", now)
    }

    /// Redeems a terminal ticket, once: the web session, if the ticket is for `node` and
    /// `login`, unexpired, and of the web session `web_token` (the WebSocket's cookie).
    pub fn redeem_terminal_ticket(
        &self,
        ticket: &str,
        web_token: &str,
        node: &str,
        login: &str,
        now: u64,
    ) -> Option<WebSession> {
        let (web, session, _) = self.redeem_exchange(ticket, &terminal_key(node, login), now)?;
        (web == key(web_token)).then_some(session)
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

fn terminal_key(node: &str, login: &str) -> String {
    format!("terminal/{node}/{login}")
}

fn join_key(session_id: &str) -> String {
    format!("join/{session_id}")
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
    fn join_tickets_are_one_time_and_bound_to_session_and_the_watched_id() {
        let sessions = Sessions::default();
        let (web, _) = sessions
            .create(identity("bob", 1000), 10)
            .unwrap_or_else(|e| unreachable!("{e}"));
        let (other, _) = sessions
            .create(identity("carol", 1000), 10)
            .unwrap_or_else(|e| unreachable!("{e}"));
        let ticket = || {
            sessions
                .create_join_ticket(&web, "s1", 10)
                .unwrap_or_else(|e| unreachable!("{e}"))
        };
        let t = ticket();
        assert!(sessions.redeem_join_ticket(&t, &other, "s1", 11).is_none());
        assert!(sessions.redeem_join_ticket(&t, &web, "s1", 11).is_none());
        let t = ticket();
        assert!(sessions.redeem_join_ticket(&t, &web, "s2", 11).is_none());
        let t = ticket();
        assert!(sessions
            .redeem_terminal_ticket(&t, &web, "join", "s1", 11)
            .is_none());
        let t = ticket();
        let s = sessions.redeem_join_ticket(&t, &web, "s1", 11);
        assert_eq!(s.map(|s| s.identity.name), Some("bob".to_owned()));
    }

    #[test]
    fn terminal_tickets_are_one_time_and_bound_to_session_node_and_login() {
        let sessions = Sessions::default();
        let (web, _) = sessions
            .create(identity("alice", 1000), 10)
            .unwrap_or_else(|e| unreachable!("{e}"));
        let (other, _) = sessions
            .create(identity("bob", 1000), 10)
            .unwrap_or_else(|e| unreachable!("{e}"));
        let ticket = |node: &str| {
            sessions
                .create_terminal_ticket(&web, node, "root", 10)
                .unwrap_or_else(|e| unreachable!("{e}"))
        };
        let t = ticket("node1");
        assert!(sessions
            .redeem_terminal_ticket(&t, &other, "node1", "root", 11)
            .is_none());
        assert!(
            sessions
                .redeem_terminal_ticket(&t, &web, "node1", "root", 11)
                .is_none(),
            "one time only, even after a wrong try"
        );
        let t = ticket("node1");
        assert!(sessions
            .redeem_terminal_ticket(&t, &web, "node1", "admin", 11)
            .is_none());
        let t = ticket("node1");
        assert!(sessions.redeem_exchange(&t, "node1", 11).is_none());
        let t = ticket("node1");
        assert!(sessions
            .redeem_terminal_ticket(&t, &web, "node1", "root", 10 + APP_EXCHANGE_TTL_SECS)
            .is_none());
        let t = ticket("node1");
        let s = sessions.redeem_terminal_ticket(&t, &web, "node1", "root", 11);
        assert_eq!(s.map(|s| s.identity.name), Some("alice".to_owned()));
    }

    #[test]
    fn app_sessions_are_one_time_exchanges_that_end_with_their_web_session() {
        let sessions = Sessions::default();
        let (web, _) = sessions
            .create(identity("alice", 1000), 10)
            .unwrap_or_else(|e| unreachable!("{e}"));
        let t = sessions
            .create_exchange(&web, "grafana", "/x", 10)
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(
            sessions.redeem_exchange(&t, "other", 11).is_none(),
            "bound to its app"
        );
        assert!(
            sessions.redeem_exchange(&t, "grafana", 11).is_none(),
            "one time only"
        );
        let t = sessions
            .create_exchange(&web, "grafana", "/x", 10)
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(sessions
            .redeem_exchange(&t, "grafana", 10 + APP_EXCHANGE_TTL_SECS)
            .is_none());
        let t = sessions
            .create_exchange(&web, "grafana", "/x", 10)
            .unwrap_or_else(|e| unreachable!("{e}"));
        let (parent, s, next) = sessions
            .redeem_exchange(&t, "grafana", 12)
            .unwrap_or_else(|| unreachable!("a fresh exchange redeems"));
        assert_eq!(next, "/x");
        let app = sessions
            .create_app_session(parent, "grafana", s.identity, vec![1], 12)
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(sessions.app_session(&app, "grafana", 13).is_some());
        assert!(sessions.app_session(&app, "other", 13).is_none());
        assert!(
            sessions.app_session(&app, "grafana", 1000).is_none(),
            "expired"
        );
        let app = sessions
            .create_app_session(parent, "grafana", identity("alice", 1000), vec![1], 12)
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(sessions.remove(&web));
        assert!(
            sessions.app_session(&app, "grafana", 13).is_none(),
            "logout ends it"
        );
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
