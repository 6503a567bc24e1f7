//! The agent's audit events to control (`POST /v1/audit/events`, bodies
//! [`jaunt_config::api::AgentEvent`]; control's receiving side and its limits are
//! `agent_audit.rs`).
//!
//! [`AgentAuditRecorder`] is the agent's [`QueryRecorder`], [`AppRequestRecorder`],
//! [`SshEventRecorder`] and [`DenialRecorder`]. `record` runs on the agent's executor and never
//! blocks: it logs the event as the default recorders do, then `try_send`s it into a bounded
//! queue ([`DEFAULT_QUEUE_CAPACITY`]); a full queue drops the event, counts it and warns at most
//! once per [`DROP_WARN_INTERVAL`]. One thread drains the queue into batches and posts them,
//! retrying with capped exponential backoff (full jitter) while control is unreachable or
//! failing (5xx); a batch control refuses as invalid (4xx) is dropped with an error (retrying
//! cannot fix it), and a 413 is split in half. Delivery is at least once: an answer lost after
//! the commit makes the agent send the batch again, and the copies share their `uid`. Dropping
//! the recorder (the agent stopping) hands what is queued to control, giving up after
//! [`FLUSH_TIMEOUT`]; a `kill -9` of the agent loses what was queued and not yet acknowledged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use jaunt_agent::postgres::wire::{ClientQuery, QueryKind};
use jaunt_agent::{
    AccessDenial, AppRequest, AppRequestRecorder, AppSession, DbSession, DenialRecorder,
    LogAppRequests, LogQueries, LogSshEvents, QueryRecorder, SshEvent, SshEventRecorder,
    SshSession,
};
use jaunt_config::api::{
    AccessDeniedEvent, AgentEvent, AppRequestEvent, DbQueryEvent, FileTransferEvent,
    SessionExecEvent, SessionRecordedEvent, EVENTS_PATH,
};
use jaunt_config::identity::unix_now;

use super::client::HostClient;
use crate::audit;

/// The agent's batches stay well under control's bounds (`agent_audit::MAX_BATCH_EVENTS` and
/// `MAX_BATCH_BYTES`): a batch is one transaction and one request.
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

/// Posts with the agent's host client ([`HostClient`]: one TLS configuration, replaced when
/// the host certificate is renewed), through the proxy.
pub struct ControlPoster {
    pub host: Arc<HostClient>,
}

impl Poster for ControlPoster {
    fn post(&mut self, body: &[u8]) -> Result<(), PostError> {
        let (status, answer) = self
            .host
            .client()
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
    use std::sync::Mutex;

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
}
