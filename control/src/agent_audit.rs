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
//! Agent side ([`AgentAuditRecorder`]): both [`QueryRecorder`] and [`AppRequestRecorder`].
//! `record` runs on the agent's executor and never blocks: it logs the event as the default
//! recorders do, then `try_send`s it into a bounded queue ([`DEFAULT_QUEUE_CAPACITY`]); a full
//! queue drops the event, counts it and warns at most once per [`DROP_WARN_INTERVAL`]. One
//! thread drains the queue into batches and posts them, retrying with capped exponential
//! backoff (full jitter) while control is unreachable or failing (5xx); a batch control refuses
//! as invalid (4xx) is dropped with an error (retrying cannot fix it), and a 413 is split in
//! half. Delivery is at least once: an answer lost after the commit makes the agent send the
//! batch again, and the copies share their `uid`. Dropping the recorder (the agent stopping)
//! hands what is queued to control, giving up after [`FLUSH_TIMEOUT`]; a `kill -9` of the agent
//! loses what was queued and not yet acknowledged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use jaunt_agent::postgres::wire::{ClientQuery, QueryKind, MAX_RECORDED_QUERY_BYTES};
use jaunt_agent::{
    AccessDenial, AppRequest, AppRequestRecorder, AppSession, DbSession, DenialRecorder,
    LogAppRequests, LogQueries, LogSshEvents, QueryRecorder, SshEvent, SshEventRecorder,
    SshSession,
};
use jaunt_config::api::{
    AccessDeniedEvent, AgentEvent, AgentEventsResponse, AppRequestEvent, DbQueryEvent,
    FileTransferEvent, SessionExecEvent, SessionRecordedEvent,
};
use jaunt_config::identity::{unix_now, Identity, IdentityKind};

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
/// The agent's batches stay well under the bounds: a batch is one transaction and one request.
pub const AGENT_BATCH_EVENTS: usize = 500;
pub const AGENT_BATCH_BYTES: usize = 256 * 1024;
/// Events the agent holds for control: minutes of a busy database at a few hundred bytes each
/// (a query is at most 16 KiB: the worst case is 160 MiB, the usual a few MiB).
pub const DEFAULT_QUEUE_CAPACITY: usize = 10_000;
/// Least time between two warnings about dropped events.
pub const DROP_WARN_INTERVAL: Duration = Duration::from_secs(10);
/// First retry delay while control is unreachable; doubled per failure up to the cap.
pub const RETRY_BASE: Duration = Duration::from_millis(200);
pub const RETRY_CAP: Duration = Duration::from_secs(30);
/// How long a stopping agent keeps trying to hand over what is queued.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Event times more than this in the future are refused (clock skew between hosts is minutes
/// at worst).
pub const MAX_FUTURE_SECS: u64 = 300;
/// Event times older than this are refused: an agent holds its queue in memory only.
pub const MAX_AGE_SECS: u64 = 30 * 24 * 3600;
/// Host roles (join token types) that may send each event type.
pub const DB_ROLE: &str = crate::db_cmd::DB_HOST_ROLE;
pub const APP_ROLE: &str = crate::service::APP_HOST_ROLE;
pub const NODE_ROLE: &str = crate::agent_ssh::NODE_HOST_ROLE;

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
                crate::db_cmd::valid_db_user(&e.db_user)?;
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

// ---- agent side ----

/// Why a post failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostError {
    /// Control is unreachable or failing: try again later.
    Retry(String),
    /// The batch is too large (413): split it.
    TooLarge(String),
    /// Control refused the batch as invalid (other 4xx): retrying cannot help.
    Refused(String),
}

/// Sends one batch (a JSON list of events) to control.
pub trait Poster: Send + 'static {
    fn post(&mut self, body: &[u8]) -> Result<(), PostError>;
}

/// Posts with the agent's host identity (read from `DATA_DIR/host` at each post, so a renewed
/// certificate is used as soon as it is saved), through the proxy.
pub struct ControlPoster {
    pub proxy: String,
    pub data_dir: std::path::PathBuf,
}

impl Poster for ControlPoster {
    fn post(&mut self, body: &[u8]) -> Result<(), PostError> {
        use crate::client::{Client, Trust};
        let profile = crate::agent_cmd::host_profile(&self.data_dir);
        let client = (|| -> anyhow::Result<Client> {
            let info = profile
                .load()?
                .ok_or_else(|| anyhow::anyhow!("no host identity in {}", profile.dir.display()))?;
            Ok(Client::new(
                &self.proxy,
                Trust::Roots(profile.host_ca()?),
                Some(profile.tls_identity(&info.user)?),
            )?)
        })()
        .map_err(|e| PostError::Retry(format!("{e:#}")))?;
        let (status, answer) = client
            .request("POST", EVENTS_PATH, Some(body))
            .map_err(|e| PostError::Retry(e.to_string()))?;
        classify(status, &answer)
    }
}

/// What an answer of control means for the batch: 2xx delivered; 413 split it; 401 (the
/// certificate expired or is being renewed), 408, 429 and 5xx try again later; any other 4xx
/// is a batch control will never take.
pub fn classify(status: u16, answer: &[u8]) -> Result<(), PostError> {
    let message = || {
        let text = serde_json::from_slice::<jaunt_config::api::ErrorBody>(answer)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(answer).into_owned());
        format!("{text} (HTTP {status})")
    };
    match status {
        200..=299 => Ok(()),
        413 => Err(PostError::TooLarge(message())),
        401 | 408 | 429 => Err(PostError::Retry(message())),
        400..=499 => Err(PostError::Refused(message())),
        _ => Err(PostError::Retry(message())),
    }
}

/// Counters of the recorder.
#[derive(Debug, Default)]
pub struct RecorderStats {
    /// Events dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Events control acknowledged.
    pub delivered: AtomicU64,
    /// Events control refused as invalid.
    pub refused: AtomicU64,
    /// Unix seconds of the last drop warning and refusal error.
    last_warn: AtomicU64,
    last_refused_error: AtomicU64,
}

/// Whether `interval` has passed since `last` (unix seconds); if so, `last` becomes now. One
/// caller wins a race.
fn due(last: &AtomicU64, interval: Duration) -> bool {
    let now = unix_now();
    let seen = last.load(Ordering::Relaxed);
    (seen == 0 || now >= seen + interval.as_secs())
        && last
            .compare_exchange(seen, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// The agent's recorder of queries and app requests: logs each, queues it for control.
/// Dropping the last reference stops it: it waits (at most [`FLUSH_TIMEOUT`] and a little) for
/// the queue to be handed to control.
pub struct AgentAuditRecorder {
    /// `None` only while dropping.
    tx: Option<Sender<AgentEvent>>,
    /// Dropped on close: wakes the drain thread from a retry sleep.
    close: Option<Sender<()>>,
    stats: Arc<RecorderStats>,
    done: Option<Receiver<()>>,
}

impl AgentAuditRecorder {
    /// Starts the drain thread posting through `poster`, with a queue of `capacity` events.
    pub fn start(poster: impl Poster, capacity: usize) -> std::io::Result<Arc<AgentAuditRecorder>> {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let (close_tx, close_rx) = crossbeam_channel::bounded(0);
        let stats = Arc::new(RecorderStats::default());
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("audit-events".into())
            .spawn(move || {
                let closing = Closing {
                    rx: close_rx,
                    since: None,
                };
                drain(poster, &rx, &thread_stats, closing);
                let _ = done_tx.send(());
            })?;
        Ok(Arc::new(AgentAuditRecorder {
            tx: Some(tx),
            close: Some(close_tx),
            stats,
            done: Some(done_rx),
        }))
    }

    /// The recorder's counters (they outlive it).
    pub fn stats(&self) -> Arc<RecorderStats> {
        self.stats.clone()
    }

    /// Queues `event` without blocking; a full queue drops it (counted, warned about).
    fn enqueue(&self, event: AgentEvent) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(event).is_ok() {
            return;
        }
        let dropped = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if due(&self.stats.last_warn, DROP_WARN_INTERVAL) {
            tracing::warn!(
                dropped_total = dropped,
                "audit: the queue of events for control is full (control unreachable or slow); \
                 events are being dropped"
            );
        }
    }
}

impl Drop for AgentAuditRecorder {
    fn drop(&mut self) {
        self.tx = None;
        self.close = None;
        if let Some(done) = self.done.take() {
            let _ = done.recv_timeout(FLUSH_TIMEOUT + Duration::from_secs(1));
        }
    }
}

impl QueryRecorder for AgentAuditRecorder {
    fn record(&self, session: &DbSession, query: &ClientQuery) {
        LogQueries.record(session, query);
        let statement = match &query.kind {
            QueryKind::Parse { statement } => statement.clone(),
            QueryKind::Simple | QueryKind::Prepare => String::new(),
        };
        self.enqueue(AgentEvent::DbQuery(DbQueryEvent {
            uid: audit::uid(),
            time: unix_now(),
            user: session.user.clone(),
            service: session.service.clone(),
            db_user: session.db_user.clone(),
            database: session.database.clone(),
            client_addr: session.client_addr.clone(),
            kind: query.kind.as_str().to_string(),
            statement,
            query: query.text.clone(),
            truncated: query.truncated,
            session_id: session.session_id.clone(),
        }));
    }
}

impl AppRequestRecorder for AgentAuditRecorder {
    fn record(&self, session: &AppSession, request: &AppRequest) {
        LogAppRequests.record(session, request);
        self.enqueue(AgentEvent::AppRequest(AppRequestEvent {
            uid: audit::uid(),
            time: unix_now(),
            user: session.user.clone(),
            app: session.app.clone(),
            client_addr: session.client_addr.clone(),
            method: request.method.clone(),
            path: request.path.clone(),
            status: request.status,
            request_bytes: request.request_bytes,
            response_bytes: request.response_bytes,
            duration_ms: request.duration_ms,
            upgraded: request.upgraded,
        }));
    }
}

impl DenialRecorder for AgentAuditRecorder {
    fn record(&self, denial: &AccessDenial) {
        self.enqueue(AgentEvent::AccessDenied(AccessDeniedEvent {
            uid: audit::uid(),
            time: unix_now(),
            user: denial.user.clone(),
            roles: denial.roles.clone(),
            kind: denial.kind.clone(),
            target: denial.target.clone(),
            login: denial.login.clone(),
            db_user: denial.db_user.clone(),
            client_addr: denial.client_addr.clone(),
            reason: denial.reason.clone(),
        }));
    }
}

impl SshEventRecorder for AgentAuditRecorder {
    fn record(&self, session: &SshSession, event: &SshEvent) {
        LogSshEvents.record(session, event);
        let (uid, time) = (audit::uid(), unix_now());
        let (user, session_id, login, target) = (
            session.user.clone(),
            session.session_id.clone(),
            session.login.clone(),
            session.node.clone(),
        );
        self.enqueue(match event.clone() {
            SshEvent::Exec {
                command,
                truncated,
                exit_status,
                exit_signal,
                bytes_in,
                bytes_out,
                recording_id,
            } => AgentEvent::SessionExec(SessionExecEvent {
                uid,
                time,
                user,
                session_id,
                login,
                target,
                command,
                truncated,
                exit_status,
                exit_signal,
                bytes_in,
                bytes_out,
                recording_id,
            }),
            SshEvent::FileTransfer {
                operation,
                path,
                to,
                bytes,
                truncated,
            } => AgentEvent::FileTransfer(FileTransferEvent {
                uid,
                time,
                user,
                session_id,
                login,
                target,
                operation,
                path,
                to,
                bytes,
                truncated,
            }),
            SshEvent::Closed {
                recording_ids,
                bytes_in,
                bytes_out,
                recording_failure,
            } => AgentEvent::SessionRecorded(SessionRecordedEvent {
                uid,
                time,
                user,
                session_id,
                login,
                target,
                recording_ids,
                bytes_in,
                bytes_out,
                recording_failure,
            }),
        });
    }
}

/// Whether the recorder is closing, and since when; also the retry sleep, cut short by a close.
struct Closing {
    /// Never sent on: disconnected when the recorder closes.
    rx: Receiver<()>,
    since: Option<Instant>,
}

impl Closing {
    fn check(&mut self) -> bool {
        if self.since.is_none()
            && matches!(
                self.rx.try_recv(),
                Err(crossbeam_channel::TryRecvError::Disconnected)
            )
        {
            self.since = Some(Instant::now());
        }
        self.since.is_some()
    }

    /// Closing for longer than [`FLUSH_TIMEOUT`].
    fn expired(&mut self) -> bool {
        self.check();
        self.since.is_some_and(|t| t.elapsed() > FLUSH_TIMEOUT)
    }

    fn sleep(&mut self, delay: Duration) {
        if self.check() {
            std::thread::sleep(delay.min(Duration::from_millis(100)));
        } else if let Err(RecvTimeoutError::Disconnected) = self.rx.recv_timeout(delay) {
            self.since = Some(Instant::now());
        }
    }
}

/// The drain thread: batches of what is queued, posted until acknowledged. Returns once every
/// sender is gone and the queue is handed over (or [`FLUSH_TIMEOUT`] after the close, if
/// control is unreachable).
fn drain(
    mut poster: impl Poster,
    rx: &Receiver<AgentEvent>,
    stats: &RecorderStats,
    mut closing: Closing,
) {
    let mut carry: Option<Vec<u8>> = None;
    loop {
        // Wait for the first event of a batch.
        let first = match carry.take() {
            Some(encoded) => encoded,
            None => match rx.recv() {
                Ok(event) => match serde_json::to_vec(&event) {
                    Ok(v) => v,
                    Err(_) => continue,
                },
                Err(_) => return,
            },
        };
        let mut batch = vec![first];
        let mut bytes = batch[0].len() + 2;
        while batch.len() < AGENT_BATCH_EVENTS {
            let Ok(event) = rx.try_recv() else { break };
            let Ok(encoded) = serde_json::to_vec(&event) else {
                continue;
            };
            if bytes + encoded.len() + 1 > AGENT_BATCH_BYTES {
                carry = Some(encoded);
                break;
            }
            bytes += encoded.len() + 1;
            batch.push(encoded);
        }
        send(&mut poster, &batch, stats, &mut closing);
        if closing.expired() {
            let left = rx.len() + usize::from(carry.is_some());
            if left > 0 {
                tracing::warn!(
                    events = left,
                    "audit: stopping with events control has not acknowledged"
                );
            }
            return;
        }
    }
}

/// Posts `batch` until acknowledged, refused, or (closing) out of time; splits it on 413.
fn send(poster: &mut impl Poster, batch: &[Vec<u8>], stats: &RecorderStats, closing: &mut Closing) {
    let mut body = Vec::with_capacity(batch.iter().map(|e| e.len() + 1).sum::<usize>() + 2);
    body.push(b'[');
    for (i, event) in batch.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(event);
    }
    body.push(b']');
    let mut failures: u32 = 0;
    loop {
        match poster.post(&body) {
            Ok(()) => {
                stats
                    .delivered
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                return;
            }
            Err(PostError::TooLarge(message)) if batch.len() > 1 => {
                tracing::debug!(
                    events = batch.len(),
                    "audit: {message}; splitting the batch"
                );
                let (a, b) = batch.split_at(batch.len() / 2);
                send(poster, a, stats, closing);
                send(poster, b, stats, closing);
                return;
            }
            Err(PostError::TooLarge(message)) | Err(PostError::Refused(message)) => {
                let refused = stats
                    .refused
                    .fetch_add(batch.len() as u64, Ordering::Relaxed)
                    + batch.len() as u64;
                if due(&stats.last_refused_error, DROP_WARN_INTERVAL) {
                    tracing::error!(
                        events = batch.len(),
                        refused_total = refused,
                        "audit: control refused a batch of events (dropped): {message}"
                    );
                }
                return;
            }
            Err(PostError::Retry(message)) => {
                if closing.expired() {
                    tracing::warn!(
                        events = batch.len(),
                        "audit: stopping before control acknowledged these events: {message}"
                    );
                    return;
                }
                failures = failures.saturating_add(1);
                let delay = backoff(failures);
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(
                        events = batch.len(),
                        failures,
                        retry_in_ms = delay.as_millis() as u64,
                        "audit: cannot send events to control (will retry): {message}"
                    );
                }
                closing.sleep(delay);
            }
        }
    }
}

/// Capped exponential backoff with full jitter: uniform in [delay/2, delay].
fn backoff(failures: u32) -> Duration {
    let exp = RETRY_BASE
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(RETRY_CAP);
    let mut b = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let frac = f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX);
    exp.mul_f64(0.5 + frac / 2.0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::{AuditQuery, StoredHost};
    use std::sync::Mutex;

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

    /// A poster that fails `fail_first` times, then records what it got.
    struct FakePoster {
        fail_first: usize,
        calls: Arc<Mutex<Vec<Vec<serde_json::Value>>>>,
        max_events: usize,
    }

    impl Poster for FakePoster {
        fn post(&mut self, body: &[u8]) -> Result<(), PostError> {
            if self.fail_first > 0 {
                self.fail_first -= 1;
                return Err(PostError::Retry("down".into()));
            }
            let events: Vec<serde_json::Value> = serde_json::from_slice(body).unwrap();
            if events.len() > self.max_events {
                return Err(PostError::TooLarge("too many".into()));
            }
            self.calls.lock().unwrap().push(events);
            Ok(())
        }
    }

    fn session() -> DbSession {
        DbSession {
            user: "alice".into(),
            service: "pg1".into(),
            db_user: "alice".into(),
            database: "postgres".into(),
            client_addr: "127.0.0.1:9".into(),
            session_id: "18f2-0-7".into(),
        }
    }

    #[test]
    fn the_recorder_retries_splits_and_flushes_on_close() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let recorder = AgentAuditRecorder::start(
            FakePoster {
                fail_first: 2,
                calls: calls.clone(),
                max_events: 3,
            },
            100,
        )
        .unwrap();
        for i in 0..10 {
            QueryRecorder::record(
                recorder.as_ref(),
                &session(),
                &ClientQuery {
                    kind: QueryKind::Simple,
                    text: format!("select {i}"),
                    truncated: false,
                },
            );
        }
        let stats = recorder.stats();
        drop(recorder);
        let got: Vec<String> = calls
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .map(|e| e["query"].as_str().unwrap().to_string())
            .collect();
        let want: Vec<String> = (0..10).map(|i| format!("select {i}")).collect();
        assert_eq!(got, want);
        assert!(calls.lock().unwrap().iter().all(|b| b.len() <= 3));
        assert_eq!(stats.delivered.load(Ordering::Relaxed), 10);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_blocking() {
        /// Says it is posting, then blocks until told to go on.
        struct Stuck(Sender<()>, Receiver<()>);
        impl Poster for Stuck {
            fn post(&mut self, _: &[u8]) -> Result<(), PostError> {
                let _ = self.0.send(());
                let _ = self.1.recv();
                Ok(())
            }
        }
        let (go, wait) = crossbeam_channel::unbounded();
        let (posting, entered) = crossbeam_channel::unbounded();
        let recorder = AgentAuditRecorder::start(Stuck(posting, wait), 4).unwrap();
        let record = || {
            AppRequestRecorder::record(
                recorder.as_ref(),
                &AppSession {
                    user: "alice".into(),
                    app: "web".into(),
                    client_addr: "127.0.0.1:1".into(),
                },
                &AppRequest {
                    method: "GET".into(),
                    path: "/".into(),
                    status: 200,
                    request_bytes: 0,
                    response_bytes: 5,
                    duration_ms: 1,
                    upgraded: false,
                },
            )
        };
        // One event in flight (the poster is stuck on it), then 100 more into a queue of 4.
        record();
        entered.recv_timeout(Duration::from_secs(10)).unwrap();
        let started = Instant::now();
        for _ in 0..100 {
            record();
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(recorder.stats().dropped.load(Ordering::Relaxed), 96);
        for _ in 0..200 {
            let _ = go.send(());
        }
        let stats = recorder.stats();
        drop(recorder);
        assert_eq!(stats.delivered.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn answers_are_classified() {
        assert_eq!(classify(200, br#"{"accepted":1}"#), Ok(()));
        assert_eq!(
            classify(400, br#"{"error":"event 0: uid"}"#),
            Err(PostError::Refused("event 0: uid (HTTP 400)".into()))
        );
        assert!(matches!(classify(403, b""), Err(PostError::Refused(_))));
        assert!(matches!(classify(413, b""), Err(PostError::TooLarge(_))));
        for status in [401, 429, 500, 503] {
            assert!(
                matches!(classify(status, b"x"), Err(PostError::Retry(_))),
                "{status}"
            );
        }
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
