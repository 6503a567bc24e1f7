//! Audit events the engine reports to control: sessions starting and ending, and authorization
//! refusals. Shards send them with `try_send` on [`EngineConfig::audit`](super::EngineConfig);
//! a full queue refuses new sessions ([`AuditOverflow::Reject`]) or drops the event and counts
//! it ([`AuditOverflow::Drop`]).

use serde::Serialize;

pub use jaunt_config::file::AuditOverflow;

use jaunt_config::wire::dial::DialKind;

/// One audit event from the engine. `time` is unix seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    /// A user session was authorized and connected to its target.
    SessionStart {
        session_id: String,
        kind: DialKind,
        user: String,
        roles: Vec<String>,
        target: String,
        login: Option<String>,
        db_user: Option<String>,
        db_name: Option<String>,
        client_addr: String,
        /// The roles ask for a recording (SSH with `record_session` not `off`): the agent
        /// records the session's channels; each reaches control as a `recording.upload` event
        /// with this `session_id`.
        #[serde(default)]
        recorded: bool,
        time: u64,
    },
    /// A session that started ended (closed, cut by a lock, idle, expired or drained).
    SessionEnd {
        session_id: String,
        kind: DialKind,
        user: String,
        roles: Vec<String>,
        target: String,
        login: Option<String>,
        db_user: Option<String>,
        db_name: Option<String>,
        client_addr: String,
        /// Bytes from the client to the target.
        bytes_in: u64,
        /// Bytes from the target to the client.
        bytes_out: u64,
        duration_ms: u64,
        /// As in its `session.start`.
        #[serde(default)]
        recorded: bool,
        /// The recordings of a recorded session (one per shell, exec or sftp channel, as its
        /// agent noted them when they started; `jaunt play ID` plays one). Left out when there
        /// are none: an unrecorded session, or one whose agent recorded nothing.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        recording_ids: Vec<String>,
        time: u64,
    },
    /// An observer joined a live SSH session (`jaunt join`), read-only: `user` is the observer,
    /// `session_id` the watched session.
    SessionJoin {
        session_id: String,
        /// The observer's own live session (`jaunt sessions ls` lists it; `kill` ends it).
        observer_session_id: String,
        user: String,
        roles: Vec<String>,
        target: String,
        client_addr: String,
        time: u64,
    },
    /// Authorization refused a dial.
    AccessDenied {
        user: String,
        roles: Vec<String>,
        kind: DialKind,
        target: String,
        login: Option<String>,
        db_user: Option<String>,
        client_addr: String,
        /// What the user was told.
        reason: String,
        time: u64,
    },
}

impl AuditEvent {
    /// The user the event is about.
    pub fn user(&self) -> &str {
        match self {
            AuditEvent::SessionStart { user, .. }
            | AuditEvent::SessionEnd { user, .. }
            | AuditEvent::SessionJoin { user, .. }
            | AuditEvent::AccessDenied { user, .. } => user,
        }
    }

    /// Unix seconds.
    pub fn time(&self) -> u64 {
        match self {
            AuditEvent::SessionStart { time, .. }
            | AuditEvent::SessionEnd { time, .. }
            | AuditEvent::SessionJoin { time, .. }
            | AuditEvent::AccessDenied { time, .. } => *time,
        }
    }
}
