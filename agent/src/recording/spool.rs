//! The agent's recording spool: a directory on the agent's disk where recordings are written
//! while their sessions run and wait until control has them.
//!
//! Layout: per recording `<id>.json` (a [`SpooledRecording`]: who, where, how it ended) and
//! `<id>.cast` (asciicast v2). The `.json` is written first, without `end`, and rewritten with
//! it when the recording finishes (write to `<id>.json.tmp`, then rename). A `.json` without
//! `end` found by [`Spool::open`] belongs to a recording an agent stop or crash interrupted: it
//! is closed then, marked `interrupted`, and uploaded like the others.
//!
//! Bounds: [`SpoolLimits::max_bytes`] over every file of the spool (what is written while
//! control is unreachable must not fill the agent's disk) and
//! [`SpoolLimits::max_recording_bytes`] per recording. A write that would pass either fails;
//! the recording is then marked `truncated`.
//!
//! Writes are plain blocking `write(2)` calls of one event line each, from the session's
//! executor: they land in the page cache (no `fsync` per event), which is what terminal output
//! rates need; no buffer is held per recording, so an idle recorded session costs its
//! encoder and metadata only.
//!
//! Not here: the asciicast encoding (`cast.rs`), uploading (the `jaunt agent` command's thread
//! uses [`Spool::pending`], [`Spool::cast_path`] and [`Spool::remove`]).

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::cast::{CastEncoder, CastHeader};
use super::{RecordingEnd, RecordingError, RecordingId, RecordingMeta};

/// Default bound of the whole spool: hours of busy terminals while control is unreachable,
/// small next to any disk an agent runs on.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 1 << 30;

/// Default bound of one recording: a day of a chatty terminal; a runaway `cat /dev/urandom`
/// stops being recorded there rather than eating the spool.
pub const DEFAULT_SPOOL_MAX_RECORDING_BYTES: u64 = 256 << 20;

/// Longest `.json` file [`Spool::open`] reads (ours are well under a KiB).
const META_LEN_MAX: u64 = 64 << 10;

/// The spool's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpoolLimits {
    /// Every file of the spool together.
    pub max_bytes: u64,
    /// One recording's `.cast`.
    pub max_recording_bytes: u64,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        SpoolLimits {
            max_bytes: DEFAULT_SPOOL_MAX_BYTES,
            max_recording_bytes: DEFAULT_SPOOL_MAX_RECORDING_BYTES,
        }
    }
}

/// A recording in the spool (its `<id>.json`), and what is uploaded with its `.cast`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpooledRecording {
    pub id: RecordingId,
    pub meta: RecordingMeta,
    /// How the channel ended; `None` while it is being recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<RecordingEnd>,
    /// Unix seconds when it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<u64>,
    /// The agent stopped (or crashed) before the channel ended: the recording stops there.
    #[serde(default)]
    pub interrupted: bool,
    /// Some events were not written (a limit or a write error).
    #[serde(default)]
    pub truncated: bool,
    /// Size of the `.cast` file.
    #[serde(default)]
    pub cast_bytes: u64,
}

/// The spool; cheap to clone and shared by every executor and the uploader thread.
#[derive(Clone, Debug)]
pub struct Spool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    limits: SpoolLimits,
    /// Bytes of every file in the spool (reserved before each write).
    used: AtomicU64,
}

/// Writes one channel's recording into the spool. Dropping it unfinished closes the recording
/// as `interrupted`.
#[derive(Debug)]
pub struct CastRecorder {
    spool: Spool,
    entry: SpooledRecording,
    file: Option<File>,
    encoder: CastEncoder,
    started: Instant,
    /// Since when, and why, writes fail (cleared by the next good write).
    failing: Option<(Instant, String)>,
    /// Bytes of `.json` counted in the spool's `used`.
    meta_bytes: u64,
}

impl Spool {
    /// Opens (creating) the spool in `dir`; closes what an earlier agent left unfinished and
    /// counts what is there against the limits.
    pub fn open(dir: &Path, limits: SpoolLimits) -> Result<Spool, RecordingError> {
        fs::create_dir_all(dir).map_err(|e| RecordingError::io(dir, e))?;
        let spool = Spool {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                limits,
                used: AtomicU64::new(0),
            }),
        };
        let mut used = 0u64;
        for entry in fs::read_dir(dir).map_err(|e| RecordingError::io(dir, e))? {
            let entry = entry.map_err(|e| RecordingError::io(dir, e))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".json.tmp") {
                let _ = fs::remove_file(&path);
                continue;
            }
            if let Some(id) = name.strip_suffix(".json") {
                if RecordingId::is_valid(id) {
                    spool.recover(&path);
                }
            }
        }
        for entry in fs::read_dir(dir).map_err(|e| RecordingError::io(dir, e))? {
            let entry = entry.map_err(|e| RecordingError::io(dir, e))?;
            used += entry.metadata().map(|m| m.len()).unwrap_or(0);
        }
        spool.inner.used.store(used, Ordering::Relaxed);
        Ok(spool)
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Bytes the spool's files take now.
    pub fn used_bytes(&self) -> u64 {
        self.inner.used.load(Ordering::Relaxed)
    }

    pub fn limits(&self) -> SpoolLimits {
        self.inner.limits
    }

    /// Starts recording a channel: writes its `.json` and the cast header. Fails (and a
    /// strict session is refused) when the spool cannot be written or is full.
    pub fn start(&self, meta: RecordingMeta) -> Result<CastRecorder, RecordingError> {
        let id = RecordingId::random()?;
        let header = CastEncoder::header(&CastHeader {
            version: 2,
            width: u32::from(meta.width),
            height: u32::from(meta.height),
            timestamp: Some(meta.started),
            duration: None,
            command: meta.command.clone(),
            title: Some(format!("{}@{} as {}", meta.user, meta.node, meta.login)),
            env: None,
        });
        let mut recorder = CastRecorder {
            spool: self.clone(),
            entry: SpooledRecording {
                id,
                meta,
                end: None,
                ended: None,
                interrupted: false,
                truncated: false,
                cast_bytes: 0,
            },
            file: None,
            encoder: CastEncoder::new(),
            started: Instant::now(),
            failing: None,
            meta_bytes: 0,
        };
        recorder.write_meta()?;
        let path = self.cast_path(&recorder.entry.id);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| RecordingError::io(&path, e))?;
        recorder.file = Some(file);
        recorder.append(header.as_bytes())?;
        Ok(recorder)
    }

    /// Finished recordings waiting for upload, oldest first.
    pub fn pending(&self) -> Vec<SpooledRecording> {
        let Ok(entries) = fs::read_dir(&self.inner.dir) else {
            return Vec::new();
        };
        let mut found: Vec<SpooledRecording> = entries
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let name = entry.file_name();
                let id = name.to_str()?.strip_suffix(".json")?;
                if !RecordingId::is_valid(id) {
                    return None;
                }
                read_meta(&entry.path()).filter(|r| r.end.is_some() || r.interrupted)
            })
            .collect();
        found.sort_by_key(|r| (r.ended.unwrap_or(u64::MAX), r.id.clone()));
        found
    }

    /// Where a recording's asciicast file is.
    pub fn cast_path(&self, id: &RecordingId) -> PathBuf {
        self.inner.dir.join(format!("{}.cast", id.as_str()))
    }

    fn meta_path(&self, id: &RecordingId) -> PathBuf {
        self.inner.dir.join(format!("{}.json", id.as_str()))
    }

    /// Deletes an uploaded recording's files.
    pub fn remove(&self, id: &RecordingId) -> Result<(), RecordingError> {
        for path in [self.cast_path(id), self.meta_path(id)] {
            let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            match fs::remove_file(&path) {
                Ok(()) => self.release(len),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(RecordingError::io(&path, e)),
            }
        }
        Ok(())
    }

    /// Closes a recording found unfinished at `open`.
    fn recover(&self, meta_path: &Path) {
        let Some(mut entry) = read_meta(meta_path) else {
            tracing::warn!(path = %meta_path.display(), "recording spool: unreadable metadata left alone");
            return;
        };
        if entry.end.is_some() || entry.interrupted {
            return;
        }
        entry.interrupted = true;
        entry.cast_bytes = fs::metadata(self.cast_path(&entry.id))
            .map(|m| m.len())
            .unwrap_or(0);
        entry.ended = fs::metadata(self.cast_path(&entry.id))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .or(Some(entry.meta.started));
        tracing::info!(id = %entry.id, "recording spool: closing a recording an agent stop interrupted");
        if let Err(e) = write_atomic(meta_path, &entry) {
            tracing::warn!(id = %entry.id, error = %e, "recording spool: cannot close an interrupted recording");
        }
    }

    /// Reserves `n` bytes against the spool's bound.
    fn reserve(&self, n: u64) -> Result<(), RecordingError> {
        let limit = self.inner.limits.max_bytes;
        let mut used = self.inner.used.load(Ordering::Relaxed);
        loop {
            let next = used.saturating_add(n);
            if next > limit {
                return Err(RecordingError::SpoolFull { limit_bytes: limit });
            }
            match self.inner.used.compare_exchange_weak(
                used,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => used = now,
            }
        }
    }

    fn release(&self, n: u64) {
        let _ = self
            .inner
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            });
    }
}

impl CastRecorder {
    /// The recording's id (what `session.end` carries).
    pub fn id(&self) -> &RecordingId {
        &self.entry.id
    }

    /// Whether input is recorded (the role option `record_input`).
    pub fn records_input(&self) -> bool {
        self.entry.meta.record_input
    }

    /// Terminal output (bytes to the user).
    pub fn output(&mut self, bytes: &[u8]) -> Result<(), RecordingError> {
        let line = self.encoder.output(self.started.elapsed(), bytes);
        self.event(&line)
    }

    /// What the user typed; recorded only if the metadata's `record_input` is set.
    pub fn input(&mut self, bytes: &[u8]) -> Result<(), RecordingError> {
        if !self.entry.meta.record_input {
            return Ok(());
        }
        let line = self.encoder.input(self.started.elapsed(), bytes);
        self.event(&line)
    }

    /// The terminal was resized to `width` x `height`.
    pub fn resize(&mut self, width: u32, height: u32) -> Result<(), RecordingError> {
        let line = self.encoder.resize(self.started.elapsed(), width, height);
        self.event(&line)
    }

    /// A note: `exec` (command line), `exit` (status), `sftp` or `scp` (operation, path,
    /// bytes), as an asciicast marker whose label is `{"note": kind, ..fields}`.
    pub fn note(&mut self, kind: &str, fields: &serde_json::Value) -> Result<(), RecordingError> {
        let line = self.encoder.note(self.started.elapsed(), kind, fields);
        self.event(&line)
    }

    /// Ends the recording; its metadata gets `end` and it becomes pending for upload.
    pub fn finish(mut self, end: RecordingEnd) -> Result<RecordingId, RecordingError> {
        self.close(Some(end), false)?;
        Ok(self.entry.id.clone())
    }

    fn close(
        &mut self,
        end: Option<RecordingEnd>,
        interrupted: bool,
    ) -> Result<(), RecordingError> {
        if self.file.is_none() {
            return Err(RecordingError::Finished);
        }
        let tail = self.encoder.flush(self.started.elapsed());
        let _ = self.event(&tail);
        self.file = None;
        self.entry.end = end;
        self.entry.interrupted = interrupted;
        self.entry.ended = Some(jaunt_config::identity::unix_now());
        self.write_meta()
    }

    fn event(&mut self, line: &str) -> Result<(), RecordingError> {
        if line.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            return Err(RecordingError::Finished);
        }
        match self.append(line.as_bytes()) {
            Ok(()) => {
                self.failing = None;
                Ok(())
            }
            Err(e) => {
                self.entry.truncated = true;
                let (since, _) = self
                    .failing
                    .get_or_insert_with(|| (Instant::now(), e.to_string()));
                Err(RecordingError::Failing {
                    since: *since,
                    cause: e.to_string(),
                })
            }
        }
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), RecordingError> {
        let n = bytes.len() as u64;
        let limit = self.spool.inner.limits.max_recording_bytes;
        if self.entry.cast_bytes.saturating_add(n) > limit {
            return Err(RecordingError::TooLarge { limit_bytes: limit });
        }
        self.spool.reserve(n)?;
        let path = self.spool.cast_path(&self.entry.id);
        let Some(file) = self.file.as_mut() else {
            self.spool.release(n);
            return Err(RecordingError::Finished);
        };
        if let Err(e) = file.write_all(bytes) {
            self.spool.release(n);
            return Err(RecordingError::io(&path, e));
        }
        self.entry.cast_bytes += n;
        Ok(())
    }

    fn write_meta(&mut self) -> Result<(), RecordingError> {
        let path = self.spool.meta_path(&self.entry.id);
        let len = write_atomic(&path, &self.entry)?;
        let old = std::mem::replace(&mut self.meta_bytes, len);
        if len > old {
            // Metadata is small and must be written: counted, never refused here.
            self.spool
                .inner
                .used
                .fetch_add(len - old, Ordering::Relaxed);
        } else {
            self.spool.release(old - len);
        }
        Ok(())
    }

    /// How long writes have been failing, if they are.
    pub fn failing_for(&self) -> Option<Duration> {
        self.failing.as_ref().map(|(since, _)| since.elapsed())
    }
}

impl Drop for CastRecorder {
    fn drop(&mut self) {
        if self.file.is_some() {
            if let Err(e) = self.close(None, true) {
                tracing::warn!(id = %self.entry.id, error = %e, "recording: cannot close an abandoned recording");
            }
        }
    }
}

fn read_meta(path: &Path) -> Option<SpooledRecording> {
    let len = fs::metadata(path).ok()?.len();
    if len > META_LEN_MAX {
        return None;
    }
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// Writes `value` as JSON to `path` through a temporary file and a rename; returns the size.
fn write_atomic(path: &Path, value: &SpooledRecording) -> Result<u64, RecordingError> {
    let text = serde_json::to_vec(value).map_err(|e| RecordingError::Encode(e.to_string()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, &text).map_err(|e| RecordingError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| RecordingError::io(path, e))?;
    Ok(text.len() as u64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::recording::{cast, RecordingKind};

    fn meta(input: bool) -> RecordingMeta {
        RecordingMeta {
            session_id: "s-1".into(),
            user: "alice".into(),
            login: "root".into(),
            node: "node1".into(),
            kind: RecordingKind::Shell,
            width: 80,
            height: 24,
            command: None,
            started: 1_700_000_000,
            record_input: input,
        }
    }

    #[test]
    fn a_recording_is_written_finished_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SpoolLimits::default()).unwrap();
        let mut rec = spool.start(meta(false)).unwrap();
        assert!(
            spool.pending().is_empty(),
            "an unfinished recording is not pending"
        );
        rec.output(b"$ ls\r\n").unwrap();
        rec.input(b"secret\r").unwrap();
        rec.resize(100, 30).unwrap();
        rec.note("exit", &serde_json::json!({"status": 0})).unwrap();
        let id = rec
            .finish(RecordingEnd {
                exit_status: Some(0),
                bytes_in: 7,
                bytes_out: 6,
            })
            .unwrap();
        let pending = spool.pending();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].id, id);
        assert_eq!(pending[0].end.unwrap().exit_status, Some(0));
        let text = fs::read_to_string(spool.cast_path(&id)).unwrap();
        assert_eq!(pending[0].cast_bytes, text.len() as u64);
        let parsed = cast::parse(&text).unwrap();
        let codes: Vec<&str> = parsed.events.iter().map(|e| e.code.as_str()).collect();
        assert_eq!(
            codes,
            ["o", "r", "m"],
            "input is not recorded without record_input"
        );
        assert!(!text.contains("secret"));
        assert!(spool.used_bytes() > text.len() as u64);
        spool.remove(&id).unwrap();
        assert!(spool.pending().is_empty());
        assert_eq!(spool.used_bytes(), 0);
    }

    #[test]
    fn input_is_recorded_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SpoolLimits::default()).unwrap();
        let mut rec = spool.start(meta(true)).unwrap();
        rec.input(b"ls\r").unwrap();
        let id = rec.finish(RecordingEnd::default()).unwrap();
        let parsed = cast::parse(&fs::read_to_string(spool.cast_path(&id)).unwrap()).unwrap();
        assert_eq!(parsed.events[0].code, "i");
        assert_eq!(parsed.events[0].data, "ls\r");
    }

    #[test]
    fn a_restart_closes_what_was_being_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SpoolLimits::default()).unwrap();
        let mut rec = spool.start(meta(false)).unwrap();
        rec.output(b"half a session").unwrap();
        let id = rec.id().clone();
        // A crash: the recorder never runs its drop.
        std::mem::forget(rec);
        assert!(spool.pending().is_empty());
        let reopened = Spool::open(dir.path(), SpoolLimits::default()).unwrap();
        let pending = reopened.pending();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].id, id);
        assert!(pending[0].interrupted && pending[0].end.is_none());
        let text = fs::read_to_string(reopened.cast_path(&id)).unwrap();
        assert!(text.contains("half a session"));
        assert_eq!(pending[0].cast_bytes, text.len() as u64);
        let on_disk: u64 = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(reopened.used_bytes(), on_disk);
    }

    #[test]
    fn dropping_an_unfinished_recorder_marks_it_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SpoolLimits::default()).unwrap();
        let rec = spool.start(meta(false)).unwrap();
        drop(rec);
        let pending = spool.pending();
        assert_eq!(pending.len(), 1);
        assert!(pending[0].interrupted);
    }

    #[test]
    fn limits_fail_writes_and_strict_starts() {
        let dir = tempfile::tempdir().unwrap();
        let limits = SpoolLimits {
            max_bytes: 4096,
            max_recording_bytes: 400,
        };
        let spool = Spool::open(dir.path(), limits).unwrap();
        let mut rec = spool.start(meta(false)).unwrap();
        let err = rec.output(&[b'x'; 500]).unwrap_err();
        assert!(matches!(err, RecordingError::Failing { .. }), "{err}");
        assert!(err.to_string().contains("size limit"), "{err}");
        rec.output(b"small").unwrap();
        assert!(
            rec.failing_for().is_none(),
            "a good write clears the failure"
        );
        let id = rec.finish(RecordingEnd::default()).unwrap();
        assert!(spool.pending().iter().any(|r| r.id == id && r.truncated));

        let tiny = Spool::open(
            dir.path(),
            SpoolLimits {
                max_bytes: 10,
                ..limits
            },
        )
        .unwrap();
        let err = tiny.start(meta(false)).unwrap_err();
        assert!(matches!(err, RecordingError::SpoolFull { .. }), "{err}");
    }

    #[test]
    fn an_unwritable_spool_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool"), SpoolLimits::default()).unwrap();
        // Replace the directory by a file: even root cannot create files in it.
        fs::remove_dir_all(dir.path().join("spool")).unwrap();
        fs::write(dir.path().join("spool"), b"not a directory").unwrap();
        let err = spool.start(meta(false)).unwrap_err();
        assert!(matches!(err, RecordingError::Io { .. }), "{err}");
    }
}
