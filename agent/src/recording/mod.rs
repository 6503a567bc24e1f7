//! Session recording on the agent: what a recorded SSH session channel leaves behind, and where
//! it waits until control has it.
//!
//! - [`RecordingMode`] and [`RecordingPolicy`]: whether a session is recorded, from the role
//!   options `record_session` (`off | best_effort | strict`) and `record_input`, as
//!   [`jaunt_config::rbac::authorize`] combined them ([`recording_policy`]).
//! - `cast`: the asciicast v2 format, sans-IO: [`cast::CastEncoder`] turns terminal bytes into
//!   event lines (a header with width, height and timestamp; `o` output, `i` input, `r` resizes;
//!   `m` markers whose label is a JSON object for exec commands, exit statuses and file
//!   transfers), and [`cast::parse`] reads a file back (for `jaunt play` and upload checks).
//! - `spool`: the bounded on-disk spool ([`Spool`]): one `<id>.cast` and one `<id>.json` per
//!   recording, [`CastRecorder`] writing one channel's recording, recovery of recordings an agent
//!   restart interrupted, and what the uploader needs ([`Spool::pending`], [`Spool::remove`]).
//!
//! How a session uses it (the SSH terminating code calls this; it owns the channels):
//!
//! ```text
//! policy = recording_policy(&decision)            off → splice, no recorder
//! recorder = spool.start(RecordingMeta{..})?       strict: an Err refuses the session
//! recorder.output(bytes)? / input(bytes)? / resize(w, h)? / note(kind, json)?
//! recorder.finish(RecordingEnd{..})? → RecordingId (what session.end's audit carries)
//! ```
//!
//! Each call returns a [`RecordingError`]; [`RecordingPolicy::must_end`] says whether the
//! session must end because of it (strict mode, and the spool has failed for
//! [`STRICT_WRITE_GRACE`]); best-effort sessions count the failure and go on.
//!
//! Not here: the SSH protocol and its channels (the SSH termination code), uploading the spool
//! to control (the `jaunt agent` command's uploader thread, in the control crate, drives
//! [`Spool::pending`] and [`Spool::remove`]), and storing recordings in control
//! (`jaunt_control::recordings`).

pub mod cast;
mod spool;

use std::time::{Duration, Instant};

use jaunt_config::rbac::Decision;
use serde::{Deserialize, Serialize};

pub use jaunt_config::resource::RecordSession as RecordingMode;
pub use spool::{
    CastRecorder, Spool, SpoolLimits, SpooledRecording, DEFAULT_SPOOL_MAX_BYTES,
    DEFAULT_SPOOL_MAX_RECORDING_BYTES,
};

/// How long a strict session may go on while its recording cannot be written (then it ends).
pub const STRICT_WRITE_GRACE: Duration = Duration::from_secs(5);

/// Longest recording id accepted from a peer (ours are 32 hex digits).
pub const RECORDING_ID_LEN_MAX: usize = 64;

/// Whether and how one session is recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingPolicy {
    pub mode: RecordingMode,
    /// Record what the user types (`i` events) as well.
    pub record_input: bool,
}

/// The recording mode an authorization decision carries (the strictest `record_session` of the
/// identity's roles).
pub fn recording_mode(decision: &Decision) -> RecordingMode {
    decision.record_session
}

/// The recording mode and input option an authorization decision carries.
pub fn recording_policy(decision: &Decision) -> RecordingPolicy {
    RecordingPolicy {
        mode: decision.record_session,
        record_input: decision.record_input,
    }
}

impl RecordingPolicy {
    /// Whether sessions under this policy are recorded at all.
    pub fn records(&self) -> bool {
        self.mode != RecordingMode::Off
    }

    /// Whether a session must end because of `error`, at `now`: only in strict mode, and only
    /// once writing has failed for [`STRICT_WRITE_GRACE`] (a failed start fails at once).
    pub fn must_end(&self, error: &RecordingError, now: Instant) -> bool {
        if self.mode != RecordingMode::Strict {
            return false;
        }
        match error {
            RecordingError::Failing { since, .. } => {
                now.saturating_duration_since(*since) >= STRICT_WRITE_GRACE
            }
            _ => true,
        }
    }
}

/// A recording's id: 32 lowercase hex digits, random.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RecordingId(pub String);

impl RecordingId {
    /// A fresh random id.
    pub fn random() -> Result<RecordingId, RecordingError> {
        let mut bytes = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| RecordingError::Random)?;
        let mut id = String::with_capacity(32);
        for b in bytes {
            id.push_str(&format!("{b:02x}"));
        }
        Ok(RecordingId(id))
    }

    /// Whether `text` can be a recording id (and so a file name): 1 to
    /// [`RECORDING_ID_LEN_MAX`] characters of `[0-9a-z-]`.
    pub fn is_valid(text: &str) -> bool {
        !text.is_empty()
            && text.len() <= RECORDING_ID_LEN_MAX
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RecordingId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a recorded channel is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordingKind {
    /// An interactive shell.
    Shell,
    /// A command (`ssh host cmd`; scp's `scp -t`/`-f` too).
    Exec,
    /// The sftp subsystem (scp's default mode): file operations are recorded as notes.
    Sftp,
}

/// Who, where and what a recording is; written into the spool when it starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingMeta {
    /// The engine's session id (from the stream header).
    pub session_id: String,
    pub user: String,
    pub login: String,
    pub node: String,
    pub kind: RecordingKind,
    /// Terminal size at the start (80x24 when the channel has no PTY).
    pub width: u16,
    pub height: u16,
    /// The command line of an exec channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Unix seconds.
    pub started: u64,
    /// Record input (`i` events) too; without it [`CastRecorder::input`] records nothing.
    #[serde(default)]
    pub record_input: bool,
}

/// How a recorded channel ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingEnd {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// Bytes from the user.
    pub bytes_in: u64,
    /// Bytes to the user.
    pub bytes_out: u64,
}

/// Why a recording could not be started or written. [`RecordingError::as_str`] gives stable
/// metric labels.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("recording spool {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The spool holds its limit of bytes (control unreachable for long, or too small a spool).
    #[error(
        "the recording spool is full ({limit_bytes} bytes); recordings wait for upload to control"
    )]
    SpoolFull { limit_bytes: u64 },
    /// One recording reached the per-recording limit; what follows is not recorded.
    #[error("the recording reached its size limit ({limit_bytes} bytes)")]
    TooLarge { limit_bytes: u64 },
    /// Writing has failed since `since` (the first failure's cause is `cause`).
    #[error("the recording cannot be written ({cause})")]
    Failing { since: Instant, cause: String },
    /// `finish` was called already.
    #[error("the recording is finished")]
    Finished,
    #[error("no randomness for a recording id")]
    Random,
    #[error("recording metadata: {0}")]
    Encode(String),
}

impl RecordingError {
    /// A stable label for metrics and audit.
    pub fn as_str(&self) -> &'static str {
        match self {
            RecordingError::Io { .. } => "io",
            RecordingError::SpoolFull { .. } => "spool_full",
            RecordingError::TooLarge { .. } => "too_large",
            RecordingError::Failing { .. } => "failing",
            RecordingError::Finished => "finished",
            RecordingError::Random => "random",
            RecordingError::Encode(_) => "encode",
        }
    }

    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> RecordingError {
        RecordingError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn strict_ends_only_after_the_grace() {
        let strict = RecordingPolicy {
            mode: RecordingMode::Strict,
            record_input: false,
        };
        let best = RecordingPolicy {
            mode: RecordingMode::BestEffort,
            ..strict
        };
        let since = Instant::now();
        let failing = RecordingError::Failing {
            since,
            cause: "disk full".into(),
        };
        assert!(!strict.must_end(&failing, since + Duration::from_secs(4)));
        assert!(strict.must_end(&failing, since + STRICT_WRITE_GRACE));
        assert!(!best.must_end(&failing, since + Duration::from_secs(60)));
        let full = RecordingError::SpoolFull { limit_bytes: 1 };
        assert!(strict.must_end(&full, since) && !best.must_end(&full, since));
        assert!(!RecordingPolicy::default().records() && best.records());
    }

    #[test]
    fn ids_are_random_hex_and_checked() {
        let a = RecordingId::random().unwrap();
        let b = RecordingId::random().unwrap();
        assert_ne!(a, b);
        assert!(RecordingId::is_valid(a.as_str()) && a.as_str().len() == 32);
        for bad in ["", "../x", "A", "a/b", &"a".repeat(65)] {
            assert!(!RecordingId::is_valid(bad), "{bad:?}");
        }
    }
}
