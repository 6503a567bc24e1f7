//! The optional JSON-lines copy of the audit log (`audit.file` in `jaunt.yaml`), rotated by size.
//!
//! Every event the store committed is appended as one line: the same JSON object that
//! `jaunt audit search --format json` prints. Lines are written after the commit, in commit order
//! ([`crate::audit::Audit::append`] holds this file's lock around the transaction and the write),
//! so the file never shows an event the store does not have. It is a copy for shipping and
//! grepping, not the record: a crash between the commit and the write, or a full disk, can leave
//! the file short of events the store kept. Write failures are logged (at most once per
//! [`WARN_INTERVAL`]), counted, and retried on a fresh open with the next event; they never fail
//! the commit.
//!
//! Rotation: before a line would take the file past `max_size`, the file is renamed to `PATH.1`
//! (`PATH.1` to `PATH.2`, and so on; `PATH.MAX_FILES` is removed), and a new `PATH` is started.
//! A single line longer than `max_size` still goes whole into a file of its own. Files are
//! created 0600: they hold queries and request paths.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use jaunt_config::file::AuditFileConfig;

/// Least time between two warnings about failed writes.
pub const WARN_INTERVAL: Duration = Duration::from_secs(60);

/// The JSON-lines audit file.
pub struct AuditFile {
    path: PathBuf,
    max_size: u64,
    max_files: u32,
    state: Mutex<State>,
}

struct State {
    /// `None` after a failure: reopened at the next write.
    file: Option<File>,
    /// Bytes in the current file.
    size: u64,
    /// Lines that could not be written.
    lost: u64,
    last_warn: Option<Instant>,
}

/// The locked file: [`AuditFile::lock`] hands it out.
pub struct Writer<'a> {
    file: &'a AuditFile,
    state: MutexGuard<'a, State>,
}

impl AuditFile {
    /// Opens (creating if needed, 0600) the file for appending. Fails with the path in the
    /// message, so `jaunt start` refuses to run with an audit file it cannot write.
    pub fn open(config: &AuditFileConfig) -> io::Result<AuditFile> {
        let (file, size) = open_append(&config.path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("audit.file.path {}: {e}", config.path.display()),
            )
        })?;
        Ok(AuditFile {
            path: config.path.clone(),
            max_size: config.max_size_bytes.max(1),
            max_files: config.max_files.max(1),
            state: Mutex::new(State {
                file: Some(file),
                size,
                lost: 0,
                last_warn: None,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lines that could not be written since start.
    pub fn lost(&self) -> u64 {
        self.lock().state.lost
    }

    /// Takes the file's lock (a panic elsewhere while holding it does not stop the audit log).
    pub fn lock(&self) -> Writer<'_> {
        let state = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        Writer { file: self, state }
    }

    /// `PATH.n`.
    pub fn rotated_path(&self, n: u32) -> PathBuf {
        let mut name = self.path.as_os_str().to_os_string();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }
}

impl Writer<'_> {
    /// Appends each line (a newline is added), rotating as needed. Never fails: a line that
    /// cannot be written is counted and logged.
    pub fn append_lines<'l>(&mut self, lines: impl Iterator<Item = &'l str>) {
        let mut buf: Vec<u8> = Vec::new();
        for line in lines {
            let len = line.len() as u64 + 1;
            let pending = buf.len() as u64;
            if self.state.size + pending > 0 && self.state.size + pending + len > self.file.max_size
            {
                let count = count_lines(&buf);
                self.flush(&mut buf, count);
                if let Err(e) = self.rotate() {
                    self.failed(0, &format!("rotating: {e}"));
                }
            }
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
        }
        let count = count_lines(&buf);
        self.flush(&mut buf, count);
    }

    fn flush(&mut self, buf: &mut Vec<u8>, lines: u64) {
        if buf.is_empty() {
            return;
        }
        if self.state.file.is_none() {
            match open_append(&self.file.path) {
                Ok((f, size)) => {
                    self.state.file = Some(f);
                    self.state.size = size;
                }
                Err(e) => {
                    self.failed(lines, &format!("opening: {e}"));
                    buf.clear();
                    return;
                }
            }
        }
        let result = match self.state.file.as_mut() {
            Some(f) => f.write_all(buf),
            None => Ok(()),
        };
        match result {
            Ok(()) => self.state.size += buf.len() as u64,
            Err(e) => {
                // A partial line may be on disk; start the next write on a fresh open.
                self.state.file = None;
                self.failed(lines, &format!("writing: {e}"));
            }
        }
        buf.clear();
    }

    /// `PATH` → `PATH.1` → ... → `PATH.max_files` (dropped), then a new `PATH`.
    fn rotate(&mut self) -> io::Result<()> {
        self.state.file = None;
        let max = self.file.max_files;
        match std::fs::remove_file(self.file.rotated_path(max)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        for n in (1..max).rev() {
            match std::fs::rename(self.file.rotated_path(n), self.file.rotated_path(n + 1)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        std::fs::rename(&self.file.path, self.file.rotated_path(1))?;
        let (f, size) = open_append(&self.file.path)?;
        self.state.file = Some(f);
        self.state.size = size;
        Ok(())
    }

    fn failed(&mut self, lines: u64, what: &str) {
        self.state.lost += lines;
        let now = Instant::now();
        if self
            .state
            .last_warn
            .is_none_or(|t| now.duration_since(t) >= WARN_INTERVAL)
        {
            self.state.last_warn = Some(now);
            tracing::error!(
                path = %self.file.path.display(),
                lost_lines = self.state.lost,
                "audit file: {what} (the events are in the store; the file is missing them)"
            );
        }
    }
}

fn count_lines(buf: &[u8]) -> u64 {
    buf.iter().filter(|&&b| b == b'\n').count() as u64
}

fn open_append(path: &Path) -> io::Result<(File, u64)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let size = file.metadata()?.len();
    Ok((file, size))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sink(dir: &Path, max_size: u64, max_files: u32) -> AuditFile {
        AuditFile::open(&AuditFileConfig {
            path: dir.join("audit.jsonl"),
            max_size_bytes: max_size,
            max_files,
        })
        .unwrap()
    }

    fn read(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn rotates_by_size_and_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let f = sink(dir.path(), 30, 2);
        // Each line is 10 bytes with its newline: three fit in a file.
        let lines: Vec<String> = (0..10).map(|i| format!("event-{i:03}")).collect();
        for chunk in lines.chunks(4) {
            f.lock().append_lines(chunk.iter().map(String::as_str));
        }
        assert_eq!(read(f.path()), ["event-009"]);
        assert_eq!(
            read(&f.rotated_path(1)),
            ["event-006", "event-007", "event-008"]
        );
        assert_eq!(
            read(&f.rotated_path(2)),
            ["event-003", "event-004", "event-005"]
        );
        assert!(!f.rotated_path(3).exists(), "only max_files rotated files");
        assert_eq!(f.lost(), 0);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(f.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_long_line_gets_a_file_of_its_own_and_reopen_appends() {
        let dir = tempfile::tempdir().unwrap();
        let f = sink(dir.path(), 8, 3);
        f.lock()
            .append_lines(["a", "0123456789abcdef", "b"].into_iter());
        assert_eq!(read(&f.rotated_path(2)), ["a"]);
        assert_eq!(read(&f.rotated_path(1)), ["0123456789abcdef"]);
        assert_eq!(read(f.path()), ["b"]);
        drop(f);
        let f = sink(dir.path(), 8, 3);
        f.lock().append_lines(["c"].into_iter());
        assert_eq!(read(f.path()), ["b", "c"]);
    }

    #[test]
    fn an_unwritable_path_is_a_clear_error() {
        let err = AuditFile::open(&AuditFileConfig {
            path: PathBuf::from("/nonexistent-dir/audit.jsonl"),
            max_size_bytes: 10,
            max_files: 1,
        })
        .err()
        .unwrap();
        assert!(
            err.to_string()
                .contains("audit.file.path /nonexistent-dir/audit.jsonl"),
            "{err}"
        );
    }
}
