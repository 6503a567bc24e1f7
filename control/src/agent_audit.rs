//! Agents' audit events (database queries, HTTP app requests, the streams the agent's own
//! authorization check refused, and the exec commands, file transfers and ends of the SSH
//! sessions it terminates) through the control API.
//!
//! Wire: `POST /v1/audit/events` with a JSON list of [`AgentEvent`]s, each tagged by `event`
//! (`db.query`, `app.request`, `access.denied`, `session.exec`, `file.transfer` or
//! `session.recorded`), with the agent-made `uid` and `time` and the event's fields.
//! The host is not in the body: control takes it from the caller's host certificate, so an
//! agent cannot speak for another host (a `host` field is an unknown field, refused).
//!
//! Control side ([`receive`]): host certificates of joined hosts only; `db.query` from hosts
//! joined with a `db` token, `app.request` with an `app` token, the SSH session events with a
//! `node` token, `access.denied` from any; at most [`MAX_BATCH_EVENTS`]
//! events and [`MAX_BATCH_BYTES`] bytes (413 past either); every field checked (400 naming the
//! event's index and the field; nothing of a refused batch is kept); the batch is one store
//! transaction, and 200 is answered only once it committed: acknowledged = durable.
//!
//! The agent side (the recorder that queues, batches and posts) is
//! `agent_host/audit.rs`; the bodies are the API's ([`jaunt_config::api::AgentEvent`]).

use jaunt_agent::postgres::wire::MAX_RECORDED_QUERY_BYTES;
use jaunt_config::api::{AgentEvent, AgentEventsResponse};
use jaunt_config::identity::{Identity, IdentityKind};

use crate::audit::{self, Audit, EventKind};
use crate::http::Response;
use crate::store::Store;

/// The endpoint (the API's).
pub use jaunt_config::api::EVENTS_PATH;
/// Most events in one `POST /v1/audit/events`.
pub const MAX_BATCH_EVENTS: usize = 1000;
/// Most body bytes of one `POST /v1/audit/events` (below the API's 1 MiB body bound, so the
/// answer names this limit).
pub const MAX_BATCH_BYTES: usize = 512 * 1024;
/// Event times more than this in the future are refused (clock skew between hosts is minutes
/// at worst).
pub const MAX_FUTURE_SECS: u64 = 300;
/// Event times older than this are refused: an agent holds its queue in memory only.
pub const MAX_AGE_SECS: u64 = 30 * 24 * 3600;
/// Host roles (join token types) that may send each event type.
pub use jaunt_config::api::{
    APP_HOST_ROLE as APP_ROLE, DB_HOST_ROLE as DB_ROLE, NODE_HOST_ROLE as NODE_ROLE,
};

// ---- control's checks of the wire types ([`jaunt_config::api::AgentEvent`]) ----

/// Operations a `file.transfer` names.
pub const FILE_OPERATIONS: [&str; 8] = [
    "read", "write", "open", "remove", "rename", "mkdir", "rmdir", "setstat",
];

/// What control checks and stores of an [`AgentEvent`] (the type is the API's, in the config
/// crate; these are control's rules about it).
pub trait EventRules {
    /// The audit event type it is stored as.
    fn kind(&self) -> EventKind;
    /// The host role (join token type) an agent needs to send this event; `None`: any joined
    /// host.
    fn required_role(&self) -> Option<&'static str>;
    /// Checks every field; the error names the field.
    fn validate(&self, now: u64) -> Result<(), String>;
    /// The stored JSON: `code`, `event`, `time` (RFC 3339), `uid`, then `host` (id, from the
    /// certificate), `host_name` and the event's own fields.
    fn to_json(&self, host_id: &str, host_name: &str) -> String;
}

impl EventRules for AgentEvent {
    fn kind(&self) -> EventKind {
        match self {
            AgentEvent::DbQuery(_) => audit::DB_QUERY,
            AgentEvent::AppRequest(_) => audit::APP_REQUEST,
            AgentEvent::AccessDenied(_) => audit::ACCESS_DENIED,
            AgentEvent::SessionExec(_) => audit::SESSION_EXEC,
            AgentEvent::FileTransfer(_) => audit::FILE_TRANSFER,
            AgentEvent::SessionRecorded(_) => audit::SESSION_RECORDED,
        }
    }

    /// The host role (join token type) an agent needs to send this event; `None`: any joined
    /// host.
    fn required_role(&self) -> Option<&'static str> {
        match self {
            AgentEvent::DbQuery(_) => Some(DB_ROLE),
            AgentEvent::AppRequest(_) => Some(APP_ROLE),
            AgentEvent::AccessDenied(_) => None,
            AgentEvent::SessionExec(_)
            | AgentEvent::FileTransfer(_)
            | AgentEvent::SessionRecorded(_) => Some(NODE_ROLE),
        }
    }

    fn validate(&self, now: u64) -> Result<(), String> {
        let empty = String::new();
        let (uid, time, user, addr) = match self {
            AgentEvent::DbQuery(e) => (&e.uid, e.time, &e.user, &e.client_addr),
            AgentEvent::AppRequest(e) => (&e.uid, e.time, &e.user, &e.client_addr),
            AgentEvent::AccessDenied(e) => (&e.uid, e.time, &e.user, &e.client_addr),
            AgentEvent::SessionExec(e) => (&e.uid, e.time, &e.user, &empty),
            AgentEvent::FileTransfer(e) => (&e.uid, e.time, &e.user, &empty),
            AgentEvent::SessionRecorded(e) => (&e.uid, e.time, &e.user, &empty),
        };
        if uid.len() != 32 || !uid.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("uid: expected 32 hex characters".into());
        }
        if time > now + MAX_FUTURE_SECS {
            return Err(format!(
                "time: {time} is more than {MAX_FUTURE_SECS} s in the future (control's clock: {now})"
            ));
        }
        if time + MAX_AGE_SECS < now {
            return Err(format!(
                "time: {time} is more than {} days old",
                MAX_AGE_SECS / 86400
            ));
        }
        text("user", user, 1, 256)?;
        text("client_addr", addr, 0, 128)?;
        match self {
            AgentEvent::DbQuery(e) => {
                text("service", &e.service, 1, 253)?;
                crate::db_certs::valid_db_user(&e.db_user)?;
                // Empty: a MySQL session that opened no database. 256 bytes: MySQL's 64
                // characters of UTF-8 (PostgreSQL's names are shorter).
                text("database", &e.database, 0, 256)?;
                if !matches!(e.kind.as_str(), "query" | "parse" | "prepare") {
                    return Err(format!(
                        "kind: {:?}: expected query, parse or prepare",
                        e.kind
                    ));
                }
                text("statement", &e.statement, 0, 256)?;
                text("session_id", &e.session_id, 0, 128)?;
                if e.query.len() > MAX_RECORDED_QUERY_BYTES {
                    return Err(format!(
                        "query: {} bytes, more than the {MAX_RECORDED_QUERY_BYTES} an agent keeps",
                        e.query.len()
                    ));
                }
            }
            AgentEvent::AppRequest(e) => {
                text("app", &e.app, 1, 253)?;
                let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
                if e.method.is_empty() || e.method.len() > 32 || !e.method.bytes().all(token) {
                    return Err(format!("method: {:?} is not an HTTP method", e.method));
                }
                text("path", &e.path, 0, 16 * 1024)?;
                if e.status > 999 {
                    return Err(format!("status: {} is not an HTTP status", e.status));
                }
            }
            AgentEvent::AccessDenied(e) => {
                if !matches!(e.kind.as_str(), "ssh" | "db" | "tcp" | "app") {
                    return Err(format!("kind: {:?}: expected ssh, db, tcp or app", e.kind));
                }
                text("target", &e.target, 1, 253)?;
                if e.roles.len() > 256 {
                    return Err("roles: more than 256".into());
                }
                for role in &e.roles {
                    text("roles", role, 1, 256)?;
                }
                text("login", e.login.as_deref().unwrap_or(""), 0, 256)?;
                text("db_user", e.db_user.as_deref().unwrap_or(""), 0, 256)?;
                text("reason", &e.reason, 1, 4096)?;
            }
            AgentEvent::SessionExec(e) => {
                ssh_session(&e.session_id, &e.login, &e.target)?;
                // A command line may hold any byte but NUL; a control character is kept.
                if e.command.len() > jaunt_agent::MAX_AUDITED_COMMAND_BYTES {
                    return Err(format!(
                        "command: {} bytes, more than the {} an agent keeps",
                        e.command.len(),
                        jaunt_agent::MAX_AUDITED_COMMAND_BYTES
                    ));
                }
                text("exit_signal", e.exit_signal.as_deref().unwrap_or(""), 0, 64)?;
                recording_id("recording_id", e.recording_id.as_deref())?;
            }
            AgentEvent::FileTransfer(e) => {
                ssh_session(&e.session_id, &e.login, &e.target)?;
                if !FILE_OPERATIONS.contains(&e.operation.as_str()) {
                    return Err(format!(
                        "operation: {:?}: expected one of {}",
                        e.operation,
                        FILE_OPERATIONS.join(", ")
                    ));
                }
                let max = jaunt_agent::MAX_AUDITED_PATH_BYTES;
                if e.path.len() > max || e.to.as_ref().is_some_and(|t| t.len() > max) {
                    return Err(format!("path: more than {max} bytes"));
                }
            }
            AgentEvent::SessionRecorded(e) => {
                ssh_session(&e.session_id, &e.login, &e.target)?;
                if e.recording_ids.len() > 4096 {
                    return Err("recording_ids: more than 4096".into());
                }
                for id in &e.recording_ids {
                    recording_id("recording_ids", Some(id))?;
                }
                text(
                    "recording_failure",
                    e.recording_failure.as_deref().unwrap_or(""),
                    0,
                    64,
                )?;
            }
        }
        Ok(())
    }

    fn to_json(&self, host_id: &str, host_name: &str) -> String {
        let kind = self.kind();
        let mut out = serde_json::Map::new();
        out.insert("code".into(), kind.code.into());
        out.insert("event".into(), kind.r#type.into());
        out.insert("time".into(), audit::rfc3339(self.time()).into());
        let fields = match self {
            AgentEvent::DbQuery(e) => serde_json::to_value(e),
            AgentEvent::AppRequest(e) => serde_json::to_value(e),
            AgentEvent::AccessDenied(e) => serde_json::to_value(e),
            AgentEvent::SessionExec(e) => serde_json::to_value(e),
            AgentEvent::FileTransfer(e) => serde_json::to_value(e),
            AgentEvent::SessionRecorded(e) => serde_json::to_value(e),
        };
        let fields = match fields {
            Ok(serde_json::Value::Object(f)) => f,
            _ => serde_json::Map::new(),
        };
        if let Some(uid) = fields.get("uid") {
            out.insert("uid".into(), uid.clone());
        }
        out.insert("host".into(), host_id.into());
        out.insert("host_name".into(), host_name.into());
        for (k, v) in fields {
            if !matches!(k.as_str(), "uid" | "time") {
                out.insert(k, v);
            }
        }
        serde_json::Value::Object(out).to_string()
    }
}

/// The fields naming a terminated SSH session.
fn ssh_session(session_id: &str, login: &str, target: &str) -> Result<(), String> {
    text("session_id", session_id, 0, 128)?;
    text("login", login, 1, 256)?;
    text("target", target, 1, 253)
}

fn recording_id(field: &str, id: Option<&str>) -> Result<(), String> {
    match id {
        Some(id) if !jaunt_agent::recording::RecordingId::is_valid(id) => {
            Err(format!("{field}: {id:?} is not a recording id"))
        }
        _ => Ok(()),
    }
}

/// `value` is at most `max` bytes, at least `min`, with no control characters.
fn text(field: &str, value: &str, min: usize, max: usize) -> Result<(), String> {
    if value.len() < min || value.len() > max {
        return Err(format!(
            "{field}: {} bytes, expected {min} to {max}",
            value.len()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{field}: contains control characters"));
    }
    Ok(())
}

// ---- control side ----

/// `POST /v1/audit/events`: checks the caller and the batch, commits it, answers 200 with the
/// count once committed.
pub fn receive(
    audit: &Audit,
    store: &Store,
    caller: &Identity,
    body: &[u8],
    now: u64,
) -> Result<Response, Response> {
    if caller.kind != IdentityKind::Host {
        return Err(Response::error(
            403,
            "only agents (host certificates) send audit events",
        ));
    }
    if body.len() > MAX_BATCH_BYTES {
        return Err(Response::error(
            413,
            format!(
                "batch of {} bytes: at most {MAX_BATCH_BYTES} bytes per request",
                body.len()
            ),
        ));
    }
    let values: Vec<serde_json::Value> = serde_json::from_slice(body).map_err(|e| {
        Response::error(
            400,
            format!("invalid JSON body: expected a list of events: {e}"),
        )
    })?;
    if values.len() > MAX_BATCH_EVENTS {
        return Err(Response::error(
            413,
            format!(
                "batch of {} events: at most {MAX_BATCH_EVENTS} per request",
                values.len()
            ),
        ));
    }
    let host = store
        .get_host(&caller.name)
        .map_err(|e| internal(&e))?
        .ok_or_else(|| {
            Response::error(403, format!("host {} is not a joined agent", caller.name))
        })?;
    let mut events = Vec::with_capacity(values.len());
    for (i, value) in values.into_iter().enumerate() {
        let event: AgentEvent = serde_json::from_value(value)
            .map_err(|e| Response::error(400, format!("event {i}: {e}")))?;
        event
            .validate(now)
            .map_err(|e| Response::error(400, format!("event {i}: {e}")))?;
        if let Some(role) = event
            .required_role()
            .filter(|role| !caller.roles.iter().any(|r| r == role))
        {
            return Err(Response::error(
                403,
                format!(
                    "event {i}: {} events come from agents joined with a {role} token; this host \
                     joined as {}",
                    event.kind().r#type,
                    caller.roles.join(",")
                ),
            ));
        }
        events.push(event);
    }
    let texts: Vec<String> = events
        .iter()
        .map(|e| e.to_json(&caller.name, &host.name))
        .collect();
    let rows: Vec<audit::Row<'_>> = events
        .iter()
        .zip(&texts)
        .map(|(e, t)| {
            let kind = e.kind();
            (e.time(), kind.code, kind.r#type, Some(e.user()), t.as_str())
        })
        .collect();
    if !rows.is_empty() {
        audit.append(&rows).map_err(|e| internal(&e))?;
    }
    Ok(Response::json(
        200,
        &AgentEventsResponse {
            accepted: rows.len(),
        },
    ))
}

fn internal(e: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %e, "audit: cannot record agent events");
    Response::error(500, format!("internal error: {e}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::{AuditQuery, StoredHost};
    use jaunt_config::api::{AppRequestEvent, DbQueryEvent};
    use jaunt_config::identity::unix_now;
    use std::sync::Arc;

    fn db_event(user: &str) -> AgentEvent {
        AgentEvent::DbQuery(DbQueryEvent {
            uid: audit::uid(),
            time: unix_now(),
            user: user.into(),
            service: "pg1".into(),
            db_user: "alice".into(),
            database: "postgres".into(),
            client_addr: "127.0.0.1:5".into(),
            kind: "query".into(),
            statement: String::new(),
            query: "select 1".into(),
            truncated: false,
            session_id: "18f2-0-7".into(),
        })
    }

    fn host(roles: &[&str]) -> Identity {
        Identity {
            kind: IdentityKind::Host,
            name: "h1".into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            logins: vec![],
            db_users: vec![],
            db_names: vec![],
            traits: Default::default(),
            cluster: "c".into(),
            not_before: 0,
            expires: u64::MAX,
            permit_pty: false,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
        }
    }

    fn setup() -> (Arc<Store>, Audit) {
        let store = Arc::new(Store::memory().unwrap());
        store
            .upsert_host(&StoredHost {
                id: "h1".into(),
                name: "dbhost".into(),
                types: vec!["db".into()],
                joined: 1,
                last_seen: 1,
            })
            .unwrap();
        let audit = Audit::new(store.clone());
        (store, audit)
    }

    fn error_of(r: Result<Response, Response>) -> (u16, String) {
        let r = r.unwrap_err();
        let body: jaunt_config::api::ErrorBody = serde_json::from_slice(&r.body).unwrap();
        (r.status, body.error)
    }

    #[test]
    fn a_batch_is_committed_with_the_certificates_host() {
        let (store, audit) = setup();
        let body = serde_json::to_vec(&vec![db_event("alice"), db_event("bob")]).unwrap();
        let r = receive(&audit, &store, &host(&["db"]), &body, unix_now()).unwrap();
        assert_eq!(r.status, 200);
        let found = store
            .audit_search(&AuditQuery {
                r#type: Some("db.query".into()),
                user: Some("alice".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].code, "JA2200I");
        let v: serde_json::Value = serde_json::from_str(&found[0].event).unwrap();
        assert_eq!(v["event"], "db.query");
        assert_eq!(v["host"], "h1");
        assert_eq!(v["host_name"], "dbhost");
        assert_eq!(v["user"], "alice");
        assert_eq!(v["query"], "select 1");
        assert_eq!(v["truncated"], false);
        assert_eq!(v["uid"].as_str().map(str::len), Some(32));
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn bad_batches_are_refused_whole_with_reasons() {
        let (store, audit) = setup();
        let now = unix_now();
        let post = |id: &Identity, body: &[u8]| receive(&audit, &store, id, body, now);
        let db = host(&["db"]);

        // Another host named in the body: an unknown field.
        let mut v = serde_json::to_value(vec![db_event("alice")]).unwrap();
        v[0]["host"] = "other".into();
        let (status, msg) = error_of(post(&db, &serde_json::to_vec(&v).unwrap()));
        assert_eq!(status, 400);
        assert!(
            msg.contains("event 0") && msg.contains("unknown field `host`"),
            "{msg}"
        );

        // Not an agent event type.
        let mut v = serde_json::to_value(vec![db_event("alice")]).unwrap();
        v[0]["event"] = "user.login".into();
        let (status, msg) = error_of(post(&db, &serde_json::to_vec(&v).unwrap()));
        assert_eq!(status, 400);
        assert!(msg.contains("unknown variant `user.login`"), "{msg}");

        // A bad field in the second event: nothing of the batch is kept.
        let mut bad = db_event("alice");
        if let AgentEvent::DbQuery(e) = &mut bad {
            e.db_user = "a\nb".into();
        }
        let body = serde_json::to_vec(&vec![db_event("carol"), bad]).unwrap();
        let (status, msg) = error_of(post(&db, &body));
        assert_eq!(status, 400);
        assert!(msg.starts_with("event 1: db_user"), "{msg}");
        let mut future = db_event("alice");
        if let AgentEvent::DbQuery(e) = &mut future {
            e.time = now + 3600;
        }
        let (status, msg) = error_of(post(&db, &serde_json::to_vec(&vec![future]).unwrap()));
        assert_eq!(status, 400);
        assert!(msg.contains("time"), "{msg}");

        // Not a list.
        let (status, msg) = error_of(post(&db, b"{}"));
        assert_eq!(status, 400);
        assert!(msg.contains("expected a list of events"), "{msg}");

        // Too many, too big.
        let many: Vec<AgentEvent> = (0..=MAX_BATCH_EVENTS).map(|_| db_event("x")).collect();
        let body = serde_json::to_vec(&many).unwrap();
        assert!(body.len() < MAX_BATCH_BYTES);
        let (status, msg) = error_of(post(&db, &body));
        assert_eq!(status, 413);
        assert!(msg.contains("at most 1000"), "{msg}");
        let (status, _) = error_of(post(&db, &vec![b' '; MAX_BATCH_BYTES + 1]));
        assert_eq!(status, 413);

        // A user certificate, an app-only host, an unknown host.
        let mut user = host(&["db"]);
        user.kind = IdentityKind::User;
        let body = serde_json::to_vec(&vec![db_event("alice")]).unwrap();
        assert_eq!(error_of(post(&user, &body)).0, 403);
        let (status, msg) = error_of(post(&host(&["app"]), &body));
        assert_eq!(status, 403);
        assert!(msg.contains("db token"), "{msg}");
        let mut stranger = host(&["db"]);
        stranger.name = "h2".into();
        assert_eq!(error_of(post(&stranger, &body)).0, 403);

        assert!(store
            .audit_search(&AuditQuery::default())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn app_events_validate() {
        let e = AgentEvent::AppRequest(AppRequestEvent {
            uid: audit::uid(),
            time: unix_now(),
            user: "alice".into(),
            app: "web".into(),
            client_addr: String::new(),
            method: "GET /".into(),
            path: "/".into(),
            status: 200,
            request_bytes: 0,
            response_bytes: 0,
            duration_ms: 0,
            upgraded: false,
        });
        assert!(e.validate(unix_now()).unwrap_err().starts_with("method"));
        let json: serde_json::Value = serde_json::from_str(&e.to_json("h", "n")).unwrap();
        assert_eq!(json["code"], "JA2300I");
        assert_eq!(json["event"], "app.request");
    }
}
