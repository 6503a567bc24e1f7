//! Session recordings in control: what agents upload, where it is kept, and how users read it
//! (issue 10 points 3 and 5, issue 12 point 5).
//!
//! - [`Recordings`]: the upload endpoints' logic (staging in `data_dir/recordings/uploads/`,
//!   then the backend), listing and reading. Handlers in `api.rs`.
//! - [`Backend`]: the storage interface; `file.rs` (`data_dir/recordings/`, the default) and
//!   `s3.rs` (any S3-compatible store, SigV4 in `sigv4.rs`, HTTP in `http1.rs`, multipart and
//!   the upload completer). A recording is two objects: `<id>.cast` (asciicast v2) and
//!   `<id>.json` ([`RecordingInfo`]), written in that order, so a listed recording is whole.
//! - `upload.rs`: the agent's uploader thread (spool → control, chunked, resumable).
//! - `cmd.rs`: `jaunt recordings ls` and `jaunt play`.
//!
//! Upload wire (host certificates only; bodies under the API's 1 MiB bound):
//! `POST /v1/recordings/uploads` (the spool's metadata; answers the bytes control already
//! has, or `stored: true`), `PUT /v1/recordings/uploads/ID?offset=N` (raw bytes appended at N;
//! 409 with the right offset otherwise), `POST /v1/recordings/uploads/ID/complete` (`size`,
//! `sha256`; checked, then stored; answered only once the backend has it: the agent deletes its
//! copy after that answer).
//!
//! Not here: recording on the agent (`jaunt_agent::recording`).

pub mod api;
pub mod cmd;
pub mod file;
pub mod http1;
pub mod s3;
pub mod sigv4;
pub mod upload;

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use jaunt_agent::recording::{RecordingId, SpooledRecording};
use serde::{Deserialize, Serialize};

/// Largest recording control accepts (the agent's per-recording bound is 256 MiB by default).
pub const MAX_RECORDING_BYTES: u64 = 4 << 30;
/// Largest chunk of one `PUT /v1/recordings/uploads/ID` (below the API's 1 MiB body bound).
pub const MAX_CHUNK_BYTES: usize = 512 * 1024;
/// Largest range one `GET /v1/recordings/ID/cast` answers.
pub const MAX_READ_BYTES: u64 = 4 << 20;

/// What control keeps about one recording (`<id>.json` beside `<id>.cast`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingInfo {
    pub id: String,
    pub session_id: String,
    pub user: String,
    pub login: String,
    pub node: String,
    /// `shell`, `exec` or `sftp`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    pub width: u16,
    pub height: u16,
    /// Unix seconds.
    pub started: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    #[serde(default)]
    pub bytes_in: u64,
    #[serde(default)]
    pub bytes_out: u64,
    #[serde(default)]
    pub interrupted: bool,
    #[serde(default)]
    pub truncated: bool,
    /// Size of the `.cast`.
    pub size: u64,
    /// Hex SHA-256 of the `.cast`.
    pub sha256: String,
    /// The host id (certificate name) of the agent that uploaded it.
    pub host: String,
    /// Unix seconds when control stored it.
    pub stored: u64,
}

impl RecordingInfo {
    /// From the agent's spool metadata.
    pub fn from_spool(r: &SpooledRecording, host: &str, size: u64, sha256: &str) -> Self {
        let kind = serde_json::to_value(r.meta.kind)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        RecordingInfo {
            id: r.id.0.clone(),
            session_id: r.meta.session_id.clone(),
            user: r.meta.user.clone(),
            login: r.meta.login.clone(),
            node: r.meta.node.clone(),
            kind,
            command: r.meta.command.clone(),
            width: r.meta.width,
            height: r.meta.height,
            started: r.meta.started,
            ended: r.ended,
            exit_status: r.end.and_then(|e| e.exit_status),
            bytes_in: r.end.map_or(0, |e| e.bytes_in),
            bytes_out: r.end.map_or(0, |e| e.bytes_out),
            interrupted: r.interrupted,
            truncated: r.truncated,
            size,
            sha256: sha256.to_string(),
            host: host.to_string(),
            stored: jaunt_config::identity::unix_now(),
        }
    }
}

/// A storage failure, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("recordings storage: {0}")]
    Io(String),
    #[error("recordings storage (s3): {0}")]
    S3(String),
    #[error("recordings storage: no recording {0:?}")]
    NotFound(String),
}

/// The recordings storage interface.
pub trait Backend: Send + Sync {
    /// `file` or `s3`.
    fn name(&self) -> &'static str;
    /// Stores a whole recording: `cast` (a local file, streamed) first, then `info`.
    fn put(&self, info: &RecordingInfo, cast: &Path) -> Result<(), StorageError>;
    /// Every stored recording's info.
    fn list(&self) -> Result<Vec<RecordingInfo>, StorageError>;
    /// One recording's info, if stored.
    fn info(&self, id: &str) -> Result<Option<RecordingInfo>, StorageError>;
    /// `len` bytes of a recording's `.cast` from `offset` (fewer at its end).
    fn read(&self, id: &str, offset: u64, len: u64) -> Result<Vec<u8>, StorageError>;
    /// Finishes uploads a crash left half-done whose local copy is still `staged` here, and,
    /// when `abort_abandoned` (this control holds [`COMPLETER_LEASE`]), aborts the abandoned
    /// ones nobody can finish. Returns how many were finished and aborted.
    fn complete_uploads(
        &self,
        staged: &Staging,
        abort_abandoned: bool,
    ) -> Result<(usize, usize), StorageError> {
        let _ = (staged, abort_abandoned);
        Ok((0, 0))
    }
}

/// Opens the configured backend.
pub fn open_backend(
    config: &jaunt_config::file::RecordingsConfig,
    data_dir: &Path,
) -> anyhow::Result<Arc<dyn Backend>> {
    Ok(match config {
        jaunt_config::file::RecordingsConfig::File => {
            Arc::new(file::FileBackend::open(&data_dir.join("recordings"))?)
        }
        jaunt_config::file::RecordingsConfig::S3(s3) => {
            let backend = s3::S3Backend::open(s3)?;
            backend.check()?;
            Arc::new(backend)
        }
    })
}

/// How often the upload completer looks for half-done uploads after the first pass at start.
pub const COMPLETER_PERIOD: std::time::Duration = std::time::Duration::from_secs(600);

/// The store lease under which one control of several aborts abandoned uploads. Finishing an
/// upload needs the staged copy, which only the control that received it has, so every control
/// finishes its own; aborting touches everyone's, so one does it.
pub const COMPLETER_LEASE: &str = "recordings-completer";

/// Opens the configured storage (checking an S3 bucket answers), and starts the upload
/// completer thread (a pass at once, then every [`COMPLETER_PERIOD`]). `lease` is asked before
/// each pass whether this control holds [`COMPLETER_LEASE`].
pub fn open_started(
    config: &jaunt_config::file::RecordingsConfig,
    data_dir: &Path,
    lease: Box<dyn Fn() -> bool + Send>,
) -> anyhow::Result<Arc<Recordings>> {
    let backend = open_backend(config, data_dir)?;
    let recordings = Arc::new(
        Recordings::new(backend, data_dir)
            .map_err(|e| anyhow::anyhow!("recordings staging in {}: {e}", data_dir.display()))?,
    );
    let weak = Arc::downgrade(&recordings);
    std::thread::Builder::new()
        .name("recordings-completer".into())
        .spawn(move || loop {
            let Some(recordings) = weak.upgrade() else {
                return;
            };
            let (finished, aborted) = recordings.complete_leftovers(lease());
            if finished + aborted > 0 {
                tracing::info!(finished, aborted, "recordings: upload completer");
            }
            drop(recordings);
            std::thread::sleep(COMPLETER_PERIOD);
        })?;
    Ok(recordings)
}

/// Uploads being received: `<id>.part` (bytes so far), `<id>.meta` (the spool metadata and
/// the uploading host), `<id>.ready` (a checked [`RecordingInfo`]: complete was asked and the
/// backend may not have it yet; the completer finishes these).
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct StagedMeta {
    host: String,
    recording: SpooledRecording,
}

impl Staging {
    pub fn open(dir: &Path) -> std::io::Result<Staging> {
        fs::create_dir_all(dir)?;
        Ok(Staging {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, id: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{id}.{ext}"))
    }

    /// The ready (checked, not yet stored) uploads.
    pub fn ready(&self) -> Vec<(RecordingInfo, PathBuf)> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().to_str()?.to_string();
                let id = name.strip_suffix(".ready")?;
                let info: RecordingInfo = serde_json::from_slice(&fs::read(e.path()).ok()?).ok()?;
                (info.id == id).then(|| (info, self.path(id, "part")))
            })
            .collect()
    }

    /// The local copy of a ready upload, if there is one.
    pub fn ready_one(&self, id: &str) -> Option<(RecordingInfo, PathBuf)> {
        let info: RecordingInfo =
            serde_json::from_slice(&fs::read(self.path(id, "ready")).ok()?).ok()?;
        Some((info, self.path(id, "part")))
    }

    fn remove(&self, id: &str) {
        for ext in ["part", "meta", "ready"] {
            let _ = fs::remove_file(self.path(id, ext));
        }
    }
}

/// Control's recordings: staging and the backend.
pub struct Recordings {
    pub backend: Arc<dyn Backend>,
    pub staging: Staging,
    /// Serializes staging changes (appends are short; stores are per recording).
    lock: Mutex<()>,
}

/// Answer to the upload calls.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadState {
    /// Bytes control has of the `.cast`.
    pub offset: u64,
    /// Control has stored the recording: the agent may delete its copy.
    #[serde(default)]
    pub stored: bool,
}

/// `POST /v1/recordings/uploads/ID/complete`'s body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompleteUpload {
    pub size: u64,
    pub sha256: String,
}

/// Why an upload call was refused: HTTP status and message.
pub type Refusal = (u16, String);

impl Recordings {
    pub fn new(backend: Arc<dyn Backend>, data_dir: &Path) -> std::io::Result<Recordings> {
        Ok(Recordings {
            backend,
            staging: Staging::open(&data_dir.join("recordings").join("uploads"))?,
            lock: Mutex::new(()),
        })
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts (or resumes) an upload.
    pub fn begin(&self, host: &str, rec: SpooledRecording) -> Result<UploadState, Refusal> {
        let id = rec.id.as_str().to_string();
        if !RecordingId::is_valid(&id) {
            return Err((400, "invalid recording id".into()));
        }
        if rec.end.is_none() && !rec.interrupted {
            return Err((400, "the recording is not finished".into()));
        }
        if self.stored(&id)? {
            return Ok(UploadState {
                offset: 0,
                stored: true,
            });
        }
        let _g = self.guard();
        let meta_path = self.staging.path(&id, "meta");
        if let Some(old) = fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<StagedMeta>(&b).ok())
        {
            if old.host != host {
                return Err((
                    409,
                    format!("recording {id} is being uploaded by another host"),
                ));
            }
        }
        let text = serde_json::to_vec(&StagedMeta {
            host: host.to_string(),
            recording: rec,
        })
        .map_err(|e| (500, e.to_string()))?;
        fs::write(&meta_path, text).map_err(io500)?;
        let offset = fs::metadata(self.staging.path(&id, "part")).map_or(0, |m| m.len());
        Ok(UploadState {
            offset,
            stored: false,
        })
    }

    /// Appends `bytes` at `offset`.
    pub fn append(
        &self,
        host: &str,
        id: &str,
        offset: u64,
        bytes: &[u8],
    ) -> Result<UploadState, Refusal> {
        let _g = self.guard();
        self.staged_meta(host, id)?;
        let part = self.staging.path(id, "part");
        let have = fs::metadata(&part).map_or(0, |m| m.len());
        if have != offset {
            return Err((
                409,
                serde_json::json!({"error": format!("expected offset {have}"), "offset": have})
                    .to_string(),
            ));
        }
        if have + bytes.len() as u64 > MAX_RECORDING_BYTES {
            return Err((
                413,
                format!("recordings are limited to {MAX_RECORDING_BYTES} bytes"),
            ));
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .map_err(io500)?;
        file.write_all(bytes).map_err(io500)?;
        Ok(UploadState {
            offset: have + bytes.len() as u64,
            stored: false,
        })
    }

    /// Checks the staged bytes and stores the recording; `Ok` once the backend has it.
    pub fn complete(
        &self,
        host: &str,
        id: &str,
        done: &CompleteUpload,
    ) -> Result<RecordingInfo, Refusal> {
        if let Some(info) = self.backend.info(id).map_err(storage500)? {
            return Ok(info);
        }
        let info = self.check_ready(host, id, done)?;
        self.backend
            .put(&info, &self.staging.path(id, "part"))
            .map_err(storage500)?;
        self.staging.remove(id);
        Ok(info)
    }

    /// Stores what a crash left ready, and lets the backend finish its half-done uploads, and
    /// abort the abandoned ones when `abort_abandoned` (see [`COMPLETER_LEASE`]). Runs at start
    /// and then now and then.
    pub fn complete_leftovers(&self, abort_abandoned: bool) -> (usize, usize) {
        // First the backend's half-done uploads (resumed from their parts), then what is staged
        // and was never started there.
        let completed = self
            .backend
            .complete_uploads(&self.staging, abort_abandoned);
        let (mut finished, aborted) = match completed {
            Ok(counts) => counts,
            Err(e) => {
                tracing::warn!(error = %e, "recordings: the upload completer failed (will retry)");
                (0, 0)
            }
        };
        for (info, part) in self.staging.ready() {
            match self.backend.info(&info.id) {
                Ok(Some(_)) => self.staging.remove(&info.id),
                Ok(None) => match self.backend.put(&info, &part) {
                    Ok(()) => {
                        finished += 1;
                        self.staging.remove(&info.id);
                    }
                    Err(e) => {
                        tracing::warn!(id = %info.id, error = %e, "recordings: cannot store a staged recording (will retry)")
                    }
                },
                Err(e) => tracing::warn!(error = %e, "recordings: storage unreachable"),
            }
        }
        (finished, aborted)
    }

    /// Checks a finished upload and marks it ready (what `complete` does before storing);
    /// public for the completer's tests, which stop between the two steps.
    pub fn check_ready(
        &self,
        host: &str,
        id: &str,
        done: &CompleteUpload,
    ) -> Result<RecordingInfo, Refusal> {
        let _g = self.guard();
        if let Some((info, _)) = self.staging.ready_one(id) {
            return Ok(info);
        }
        let meta = self.staged_meta(host, id)?;
        let part = self.staging.path(id, "part");
        let (size, sha256) = hash_file(&part).map_err(io500)?;
        if size != done.size || sha256 != done.sha256 {
            // Start over: what control has is not what the agent has.
            self.staging.remove(id);
            return Err((
                409,
                serde_json::json!({
                    "error": format!("the upload does not match: control has {size} bytes with sha256 {sha256}"),
                    "offset": 0
                })
                .to_string(),
            ));
        }
        let info = RecordingInfo::from_spool(&meta.recording, host, size, &sha256);
        let text = serde_json::to_vec(&info).map_err(|e| (500, e.to_string()))?;
        fs::write(self.staging.path(id, "ready"), text).map_err(io500)?;
        Ok(info)
    }

    /// A recording's info, and whether it is stored.
    pub fn info(&self, id: &str) -> Result<Option<RecordingInfo>, StorageError> {
        if !RecordingId::is_valid(id) {
            return Ok(None);
        }
        self.backend.info(id)
    }

    /// The staged `.part` of an upload (tests).
    pub fn staged_part(&self, id: &str) -> PathBuf {
        self.staging.path(id, "part")
    }

    fn stored(&self, id: &str) -> Result<bool, Refusal> {
        Ok(self.backend.info(id).map_err(storage500)?.is_some())
    }

    fn staged_meta(&self, host: &str, id: &str) -> Result<StagedMeta, Refusal> {
        if !RecordingId::is_valid(id) {
            return Err((400, "invalid recording id".into()));
        }
        let meta: StagedMeta = fs::read(self.staging.path(id, "meta"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| (404, format!("no upload of recording {id} was started")))?;
        if meta.host != host {
            return Err((
                409,
                format!("recording {id} is being uploaded by another host"),
            ));
        }
        Ok(meta)
    }
}

fn io500(e: std::io::Error) -> Refusal {
    (500, format!("recordings staging: {e}"))
}

fn storage500(e: StorageError) -> Refusal {
    (503, e.to_string())
}

/// Size and hex SHA-256 of a file, read in 64 KiB pieces.
pub fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        ctx.update(&buf[..n]);
    }
    Ok((size, hex::encode(ctx.finish())))
}
