//! The audit log: events with stable codes, appended to the store.
//!
//! Every event is a JSON object with at least `code`, `event` (its type), `time` (RFC 3339) and
//! `uid`; the rest depends on the type. Codes are stable: scripts and SIEM rules match on them.
//! Control's own events are appended synchronously (the slow path can afford one SQLite
//! transaction); the engine's batched, bounded queue arrives with the engine.

use std::sync::Arc;

use jaunt_config::identity::unix_now;
use ring::rand::{SecureRandom, SystemRandom};

use crate::store::Store;

/// An event type with its stable code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventKind {
    pub code: &'static str,
    pub r#type: &'static str,
}

pub const LOGIN_OK: EventKind = EventKind {
    code: "JA1000I",
    r#type: "user.login",
};
pub const LOGIN_FAILED: EventKind = EventKind {
    code: "JA1000W",
    r#type: "user.login.failed",
};
pub const CERT_ISSUED: EventKind = EventKind {
    code: "JA1001I",
    r#type: "cert.issued",
};
pub const HOST_JOINED: EventKind = EventKind {
    code: "JA1100I",
    r#type: "host.join",
};
pub const USER_CREATED: EventKind = EventKind {
    code: "JA1200I",
    r#type: "user.create",
};
pub const USER_UPDATED: EventKind = EventKind {
    code: "JA1201I",
    r#type: "user.update",
};
pub const USER_DELETED: EventKind = EventKind {
    code: "JA1202I",
    r#type: "user.delete",
};
pub const ROLE_CREATED: EventKind = EventKind {
    code: "JA1300I",
    r#type: "role.create",
};
pub const ROLE_UPDATED: EventKind = EventKind {
    code: "JA1301I",
    r#type: "role.update",
};
pub const ROLE_DELETED: EventKind = EventKind {
    code: "JA1302I",
    r#type: "role.delete",
};
pub const TOKEN_CREATED: EventKind = EventKind {
    code: "JA1400I",
    r#type: "token.create",
};
pub const TOKEN_DELETED: EventKind = EventKind {
    code: "JA1401I",
    r#type: "token.delete",
};
pub const LOCK_CREATED: EventKind = EventKind {
    code: "JA1500I",
    r#type: "lock.create",
};
pub const LOCK_DELETED: EventKind = EventKind {
    code: "JA1501I",
    r#type: "lock.delete",
};

/// Appends events to the store.
#[derive(Clone)]
pub struct Audit {
    store: Arc<Store>,
}

impl Audit {
    pub fn new(store: Arc<Store>) -> Audit {
        Audit { store }
    }

    /// Records one event; `fields` must be a JSON object. A failure to record is logged loudly:
    /// the caller's action has already happened and is not undone.
    pub fn emit(&self, kind: EventKind, user: Option<&str>, fields: &serde_json::Value) {
        let now = unix_now();
        let mut event = serde_json::Map::new();
        event.insert("code".into(), kind.code.into());
        event.insert("event".into(), kind.r#type.into());
        event.insert("time".into(), rfc3339(now).into());
        event.insert("uid".into(), uid().into());
        if let Some(obj) = fields.as_object() {
            for (k, v) in obj {
                event.insert(k.clone(), v.clone());
            }
        }
        let text = serde_json::Value::Object(event).to_string();
        if let Err(e) = self
            .store
            .audit_append(&[(now, kind.code, kind.r#type, user, &text)])
        {
            tracing::error!(error = %e, event = kind.r#type, "audit: could not record event");
        }
    }
}

fn uid() -> String {
    let mut b = [0u8; 16];
    let _ = SystemRandom::new().fill(&mut b);
    hex::encode(b)
}

/// Unix seconds as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}
