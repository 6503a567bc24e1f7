//! The agent's uploader: one thread that hands finished spool recordings to control and
//! deletes each from the spool only once control answered that it stored it.
//!
//! Per recording: `POST /v1/recordings/uploads` (control answers how many bytes it already
//! has, so an upload cut by a restart on either side resumes there), then the `.cast` in
//! chunks of [`CHUNK_BYTES`] read from the file one at a time (memory stays at one chunk
//! whatever the recording's size), then `complete` with the size and SHA-256. Failures back
//! off exponentially ([`RETRY_BASE`] to [`RETRY_CAP`]) and retry; the spool keeps the
//! recording meanwhile (its own bound applies). Recordings control refuses as invalid (4xx
//! other than a conflict) are logged and retried at the cap, never deleted.
//!
//! Not here: the spool (`jaunt_agent::recording`), control's side (`mod.rs`, `api.rs`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use jaunt_agent::recording::{Spool, SpooledRecording};

use super::{hash_file, CompleteUpload, UploadState};
use crate::client::{Client, ClientError};

/// Bytes per `PUT` (below the API's 1 MiB body bound).
pub const CHUNK_BYTES: usize = 256 * 1024;
/// How often the spool is looked at while there is nothing to upload.
pub const IDLE_POLL: Duration = Duration::from_secs(2);
/// First retry after a failure; doubled per failure up to [`RETRY_CAP`].
pub const RETRY_BASE: Duration = Duration::from_secs(1);
pub const RETRY_CAP: Duration = Duration::from_secs(60);

/// The agent's spool directory in its data directory.
pub fn spool_dir(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("recordings")
}

/// Why one upload failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("spool file: {0}")]
    Io(#[from] std::io::Error),
    #[error("control refused the upload: HTTP {status}: {message}")]
    Refused { status: u16, message: String },
}

/// Uploads one recording and removes it from the spool once control has it.
pub fn upload_one(
    client: &Client,
    spool: &Spool,
    rec: &SpooledRecording,
) -> Result<(), UploadError> {
    let id = rec.id.as_str();
    let state: UploadState = client.post_json("/v1/recordings/uploads", rec)?;
    if !state.stored {
        let path = spool.cast_path(&rec.id);
        let (size, sha256) = if path.exists() {
            hash_file(&path)?
        } else {
            // A recording interrupted before its first event has no `.cast`.
            (0, super::sigv4::EMPTY_SHA256.to_string())
        };
        let mut offset = state.offset;
        let mut file = if path.exists() {
            Some(File::open(&path)?)
        } else {
            None
        };
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut restarts = 0;
        while offset < size {
            let Some(f) = file.as_mut() else { break };
            f.seek(SeekFrom::Start(offset))?;
            let n = f.take(CHUNK_BYTES as u64).read(&mut buf)?;
            if n == 0 {
                break;
            }
            let (status, body) = client.request(
                "PUT",
                &format!("/v1/recordings/uploads/{id}?offset={offset}"),
                Some(&buf[..n]),
            )?;
            match status {
                200 => offset = parse_state(&body)?.offset,
                409 if restarts < 3 => {
                    // Control has a different length (another attempt, another control):
                    // continue from what it says.
                    restarts += 1;
                    offset = parse_state(&body)?.offset;
                }
                _ => return Err(refusal(status, &body)),
            }
        }
        let done = CompleteUpload { size, sha256 };
        let (status, body) = client.request(
            "POST",
            &format!("/v1/recordings/uploads/{id}/complete"),
            Some(&serde_json::to_vec(&done).map_err(ClientError::Encode)?),
        )?;
        if status != 200 {
            return Err(refusal(status, &body));
        }
    }
    spool
        .remove(&rec.id)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(())
}

fn parse_state(body: &[u8]) -> Result<UploadState, UploadError> {
    serde_json::from_slice(body).map_err(|e| UploadError::Refused {
        status: 200,
        message: format!("unreadable answer: {e}"),
    })
}

fn refusal(status: u16, body: &[u8]) -> UploadError {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(String::from))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    UploadError::Refused { status, message }
}

/// How long to wait after `failures` failures in a row.
pub fn retry_delay(failures: u32) -> Duration {
    if failures == 0 {
        return IDLE_POLL;
    }
    RETRY_BASE
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(RETRY_CAP)
}

/// The uploader loop: uploads what is pending, oldest first, until `stop` fires or is dropped.
/// `connect` makes a client with the host identity as it is on disk now.
pub fn run(
    spool: &Spool,
    connect: &dyn Fn() -> anyhow::Result<Client>,
    stop: &crossbeam_channel::Receiver<()>,
    idle_poll: Duration,
) {
    let mut failures: u32 = 0;
    loop {
        let pending = spool.pending();
        let mut failed = false;
        for rec in &pending {
            if !matches!(stop.try_recv(), Err(crossbeam_channel::TryRecvError::Empty)) {
                return;
            }
            let result = connect()
                .map_err(|e| UploadError::Refused {
                    status: 0,
                    message: format!("{e:#}"),
                })
                .and_then(|client| upload_one(&client, spool, rec));
            match result {
                Ok(()) => {
                    failures = 0;
                    tracing::info!(id = %rec.id, "recording uploaded to control");
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 || failures.is_multiple_of(10) {
                        eprintln!(
                            "jaunt agent: uploading recording {} failed (kept in the spool; will retry): {e}",
                            rec.id
                        );
                    }
                    failed = true;
                    break;
                }
            }
        }
        let wait = if failed {
            retry_delay(failures)
        } else {
            idle_poll
        };
        match stop.recv_timeout(wait) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_the_cap() {
        assert_eq!(retry_delay(0), IDLE_POLL);
        assert_eq!(retry_delay(1), RETRY_BASE);
        assert_eq!(retry_delay(3), RETRY_BASE * 4);
        assert_eq!(retry_delay(40), RETRY_CAP);
    }
}
