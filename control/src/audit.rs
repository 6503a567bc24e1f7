//! The audit log: events with stable codes, appended to the store.
//!
//! Every event is a JSON object with at least `code`, `event` (its type), `time` (RFC 3339) and
//! `uid`; the rest depends on the type. Codes are stable: scripts and SIEM rules match on them.
//! Control's own events are appended synchronously (the slow path can afford one SQLite
//! transaction); the engine's events (sessions, denials) come through a bounded queue that
//! [`Audit::run_engine_writer`] drains in batches, one transaction per batch; the agents' events
//! (database queries, app requests) arrive in batches through `POST /v1/audit/events`
//! ([`crate::agent_audit`]), one transaction per batch, acknowledged once committed.
//!
//! With `audit.file` configured, every committed event is also appended to a JSON-lines file
//! ([`crate::audit_file`]), after its transaction committed and in commit order (one lock around
//! both): the store is the record, the file a copy for shipping and grepping.

use std::sync::Arc;

use jaunt_config::identity::unix_now;
use jaunt_engine::server::AuditEvent;
use ring::rand::{SecureRandom, SystemRandom};

use crate::audit_file::AuditFile;
use crate::store::{Store, StoreError};

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
/// A web session ended by its user (`/web/`'s log out).
pub const WEB_LOGOUT: EventKind = EventKind {
    code: "JA1010I",
    r#type: "user.logout",
};
/// A browser's app session made from a web session (`/web/apps/APP/open`).
pub const WEB_APP_SESSION: EventKind = EventKind {
    code: "JA1011I",
    r#type: "app.session.create",
};
pub const CERT_ISSUED: EventKind = EventKind {
    code: "JA1001I",
    r#type: "cert.issued",
};
pub const HOST_JOINED: EventKind = EventKind {
    code: "JA1100I",
    r#type: "host.join",
};
/// A joined host's record removed: `jaunt rm node/NAME`, or replaced when an agent of the same
/// name joins again.
pub const HOST_REMOVED: EventKind = EventKind {
    code: "JA1102I",
    r#type: "host.remove",
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
/// A CA rotation phase change (`jaunt ca rotate`, or its `--grace` thread).
pub const CA_ROTATED: EventKind = EventKind {
    code: "JA1600I",
    r#type: "ca.rotate",
};

pub const SESSION_START: EventKind = EventKind {
    code: "JA2000I",
    r#type: "session.start",
};
pub const SESSION_END: EventKind = EventKind {
    code: "JA2001I",
    r#type: "session.end",
};
/// An administrator ended a live session (`jaunt sessions kill`).
pub const SESSION_KILLED: EventKind = EventKind {
    code: "JA2002I",
    r#type: "session.kill",
};
/// An observer joined a live session read-only (`jaunt join`): `user` watches `session_id`.
pub const SESSION_JOINED: EventKind = EventKind {
    code: "JA2003I",
    r#type: "session.join",
};
/// A command channel of an SSH session the agent terminated ended: `command`, `exit_status`
/// (or `exit_signal`), its bytes and `recording_id` (from the agent, `POST /v1/audit/events`).
pub const SESSION_EXEC: EventKind = EventKind {
    code: "JA2004I",
    r#type: "session.exec",
};
/// One file operation of an SSH session's sftp channel (scp, sftp): `operation`, `path`,
/// `bytes` (from the agent that terminates the session).
pub const FILE_TRANSFER: EventKind = EventKind {
    code: "JA2005I",
    r#type: "file.transfer",
};
/// An SSH session the agent terminated ended there: `recording_ids` and its channels' bytes
/// (from the agent; the engine's `session.end` of the same `session_id` cannot know them).
pub const SESSION_RECORDED: EventKind = EventKind {
    code: "JA2006I",
    r#type: "session.recorded",
};
/// A session recording reached control's storage (`recording_id`, `session_id`, size).
pub const RECORDING_UPLOAD: EventKind = EventKind {
    code: "JA2400I",
    r#type: "recording.upload",
};
pub const ACCESS_DENIED: EventKind = EventKind {
    code: "JA2100W",
    r#type: "access.denied",
};
/// A query of a database session, as the agent forwarded it (`POST /v1/audit/events`).
pub const DB_QUERY: EventKind = EventKind {
    code: "JA2200I",
    r#type: "db.query",
};
/// An HTTP request of an app session, as the agent's reverse proxy saw it.
pub const APP_REQUEST: EventKind = EventKind {
    code: "JA2300I",
    r#type: "app.request",
};

/// Most engine events written in one store transaction.
pub const ENGINE_BATCH_MAX: usize = 1024;

/// How long the engine writer waits after an event for more to arrive before it writes them in
/// one transaction. Without it, sessions arriving a millisecond apart cost a transaction (and a
/// wake-up of the writer by the shard that queued them) each: at 900 user connections per
/// second that was 12% of the daemon's and agent's CPU (BENCHMARKS.md, issue 14). The events
/// are queued in memory either way (the engine never waits for the store), so this widens what
/// a crash of the daemon loses from what is queued to at most this much more.
pub const ENGINE_BATCH_LINGER: std::time::Duration = std::time::Duration::from_millis(5);

/// One event ready for the store: unix time, kind, the user it is about, its JSON text.
pub type Row<'a> = (u64, &'a str, &'a str, Option<&'a str>, &'a str);

/// Appends events to the store (and, when configured, to the JSON-lines file).
#[derive(Clone)]
pub struct Audit {
    store: Arc<Store>,
    file: Option<Arc<AuditFile>>,
}

impl Audit {
    pub fn new(store: Arc<Store>) -> Audit {
        Audit { store, file: None }
    }

    /// An audit log that also appends every committed event to `file`.
    pub fn with_file(store: Arc<Store>, file: Option<Arc<AuditFile>>) -> Audit {
        Audit { store, file }
    }

    /// Appends `rows` in one transaction; once this returns `Ok` they survive a `kill -9`.
    /// The file copy (if any) is written after the commit, under the same lock, so the file's
    /// order is the store's.
    pub fn append(&self, rows: &[Row<'_>]) -> Result<i64, StoreError> {
        match &self.file {
            None => self.store.audit_append(rows),
            Some(file) => {
                let mut writer = file.lock();
                let seq = self.store.audit_append(rows)?;
                writer.append_lines(rows.iter().map(|r| r.4));
                Ok(seq)
            }
        }
    }

    /// Drains the engine's audit queue until every sender is gone: waits for one event, then
    /// [`ENGINE_BATCH_LINGER`] for more, takes what is queued (up to [`ENGINE_BATCH_MAX`]) and
    /// appends the batch in one transaction.
    pub fn run_engine_writer(&self, events: &crossbeam_channel::Receiver<AuditEvent>) {
        self.run_engine_writer_until(events, &crossbeam_channel::never());
    }

    /// [`Self::run_engine_writer`], also ending when `stop` is disconnected (its sender
    /// dropped): then it appends what is queued at that moment and returns, even if a sender of
    /// `events` is still alive somewhere (a stopping daemon must not wait on a leaked one).
    pub fn run_engine_writer_until(
        &self,
        events: &crossbeam_channel::Receiver<AuditEvent>,
        stop: &crossbeam_channel::Receiver<()>,
    ) {
        let mut batch = Vec::with_capacity(ENGINE_BATCH_MAX);
        loop {
            let first = crossbeam_channel::select! {
                recv(events) -> event => match event {
                    Ok(event) => event,
                    Err(_) => return,
                },
                recv(stop) -> _ => {
                    // Stopping: what is queued now, in batches, then done.
                    while let Ok(event) = events.try_recv() {
                        batch.push(event);
                        if batch.len() == ENGINE_BATCH_MAX {
                            self.append_engine_events(&batch);
                            batch.clear();
                        }
                    }
                    if !batch.is_empty() {
                        self.append_engine_events(&batch);
                    }
                    return;
                },
            };
            batch.push(first);
            // Let more arrive, unless a batch is waiting already; a stop ends the wait (the
            // next turn of the loop sees it, after this batch is written).
            if events.len() < ENGINE_BATCH_MAX {
                let _ = stop.recv_timeout(ENGINE_BATCH_LINGER);
            }
            while batch.len() < ENGINE_BATCH_MAX {
                match events.try_recv() {
                    Ok(event) => batch.push(event),
                    Err(_) => break,
                }
            }
            self.append_engine_events(&batch);
            batch.clear();
        }
    }

    /// Appends engine events in one transaction. A failure is logged loudly.
    pub fn append_engine_events(&self, events: &[AuditEvent]) {
        let rows: Vec<(u64, EventKind, String, String)> = events
            .iter()
            .map(|event| {
                let (kind, json) = engine_event_json(event);
                (event.time(), kind, event.user().to_owned(), json)
            })
            .collect();
        let refs: Vec<(u64, &str, &str, Option<&str>, &str)> = rows
            .iter()
            .map(|(time, kind, user, json)| {
                (
                    *time,
                    kind.code,
                    kind.r#type,
                    Some(user.as_str()),
                    json.as_str(),
                )
            })
            .collect();
        if let Err(e) = self.append(&refs) {
            tracing::error!(error = %e, events = rows.len(), "audit: could not record engine events");
        }
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
        if let Err(e) = self.append(&[(now, kind.code, kind.r#type, user, &text)]) {
            tracing::error!(error = %e, event = kind.r#type, "audit: could not record event");
        }
    }
}

/// Events removed per store transaction by the retention thread: a few milliseconds of work,
/// so engine batches and control's events wait at most that long for the store.
pub const PRUNE_BATCH: usize = 1000;

/// How often the retention thread looks for old events: a tenth of the retention, at least
/// every second and at most every minute.
pub fn prune_period(retention: std::time::Duration) -> std::time::Duration {
    (retention / 10).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(60),
    )
}

/// Removes every event older than `retention` now, in batches of [`PRUNE_BATCH`] (each its own
/// transaction, the store's lock released in between); returns how many went.
pub fn prune_once(store: &Store, retention: std::time::Duration) -> Result<usize, StoreError> {
    let before = unix_now().saturating_sub(retention.as_secs());
    let mut total = 0;
    loop {
        let n = store.audit_prune(before, PRUNE_BATCH)?;
        total += n;
        if n < PRUNE_BATCH {
            return Ok(total);
        }
        // Let a waiting writer take the store between batches.
        std::thread::yield_now();
    }
}

/// The store lease the retention thread holds while it prunes: with several controls on one
/// store, one of them does the work.
pub const PRUNE_LEASE: &str = "audit-retention";

/// The retention thread: every [`prune_period`] removes events older than `retention`, until
/// `stop` is disconnected, while it holds [`PRUNE_LEASE`] as `holder`. A failure is logged and
/// retried at the next period.
pub fn run_pruner(
    store: &Store,
    retention: std::time::Duration,
    holder: &str,
    stop: &crossbeam_channel::Receiver<()>,
) {
    let period = prune_period(retention);
    // Held a little longer than two periods: a holder that stops renewing loses it soon after.
    let lease_secs = (period * 2).as_secs() + 10;
    loop {
        let held = store.try_lease(PRUNE_LEASE, holder, unix_now(), lease_secs);
        let outcome = match held {
            Ok(true) => prune_once(store, retention),
            Ok(false) => Ok(0),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "audit: removed events past retention"),
            Err(e) => tracing::warn!(error = %e, "audit: removing events past retention failed"),
        }
        match stop.recv_timeout(period) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

/// A fresh event id: 128 random bits as 32 hex characters.
pub fn uid() -> String {
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

/// An engine event's kind and its JSON text: `code`, `event`, `time` (RFC 3339) and `uid`
/// first, then the event's own fields (`time` as RFC 3339).
pub fn engine_event_json(event: &AuditEvent) -> (EventKind, String) {
    let kind = match event {
        AuditEvent::SessionStart { .. } => SESSION_START,
        AuditEvent::SessionEnd { .. } => SESSION_END,
        AuditEvent::SessionJoin { .. } => SESSION_JOINED,
        AuditEvent::AccessDenied { .. } => ACCESS_DENIED,
    };
    let mut out = serde_json::Map::new();
    out.insert("code".into(), kind.code.into());
    out.insert("event".into(), kind.r#type.into());
    out.insert("time".into(), rfc3339(event.time()).into());
    out.insert("uid".into(), uid().into());
    if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(event) {
        for (k, v) in fields {
            if !matches!(k.as_str(), "event" | "time") {
                out.insert(k, v);
            }
        }
    }
    (kind, serde_json::Value::Object(out).to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use jaunt_config::wire::DialKind;

    #[test]
    fn the_engine_writer_stops_when_told_even_with_a_sender_alive() {
        let store = Arc::new(Store::memory().unwrap());
        let audit = Audit::new(store.clone());
        let (tx, rx) = crossbeam_channel::bounded(16);
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let writer = std::thread::spawn(move || audit.run_engine_writer_until(&rx, &stopped));
        for i in 0..3 {
            tx.send(AuditEvent::AccessDenied {
                user: format!("u{i}"),
                roles: vec![],
                kind: DialKind::Ssh,
                target: "node1".into(),
                login: None,
                db_user: None,
                client_addr: "127.0.0.1:5".into(),
                reason: "no".into(),
                time: 0,
            })
            .unwrap();
        }
        drop(stop);
        writer.join().unwrap();
        // `tx` is still alive; every event sent before the stop is in the store.
        assert_eq!(store.audit_search(&Default::default()).unwrap().len(), 3);
        drop(tx);
    }

    #[test]
    fn retention_removes_only_old_events_in_batches() {
        let store = Store::memory().unwrap();
        let now = unix_now();
        let old: Vec<(u64, &str, &str, Option<&str>, &str)> = (0..(PRUNE_BATCH * 2 + 5))
            .map(|i| (i as u64, "JA2000I", "session.start", Some("u"), "{}"))
            .collect();
        store.audit_append(&old).unwrap();
        store
            .audit_append(&[(now, "JA1000I", "user.login", Some("u"), "{}")])
            .unwrap();
        let removed = prune_once(&store, std::time::Duration::from_secs(3600)).unwrap();
        assert_eq!(removed, PRUNE_BATCH * 2 + 5);
        let left = store.audit_search(&Default::default()).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].r#type, "user.login");
        assert_eq!(
            prune_period(std::time::Duration::from_secs(8)),
            std::time::Duration::from_secs(1)
        );
        assert_eq!(
            prune_period(std::time::Duration::from_secs(365 * 86400)),
            std::time::Duration::from_secs(60)
        );
    }

    #[test]
    fn engine_events_carry_their_codes_and_fields() {
        let event = AuditEvent::AccessDenied {
            user: "nobody".into(),
            roles: vec!["dev".into()],
            kind: DialKind::Ssh,
            target: "node1".into(),
            login: Some("root".into()),
            db_user: None,
            client_addr: "127.0.0.1:5".into(),
            reason: "no".into(),
            time: 0,
        };
        let (kind, json) = engine_event_json(&event);
        assert_eq!(kind, ACCESS_DENIED);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["code"], "JA2100W");
        assert_eq!(v["event"], "access.denied");
        assert_eq!(v["time"], "1970-01-01T00:00:00Z");
        assert_eq!(v["uid"].as_str().map(str::len), Some(32));
        assert_eq!(v["kind"], "ssh");
        assert_eq!(v["target"], "node1");
        assert_eq!(v["user"], "nobody");
        assert_eq!(v["reason"], "no");
    }
}
