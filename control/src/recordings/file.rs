//! The `file` recordings backend: `<id>.cast` and `<id>.json` in `data_dir/recordings/`.
//! A recording is copied in beside its final name and renamed (the `.json` last), so a listed
//! recording is always whole. Not here: staging of uploads (`uploads/`, `mod.rs`).

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::{Backend, RecordingInfo, StorageError};

/// Longest `.json` read (ours are well under a KiB).
const INFO_LEN_MAX: u64 = 64 << 10;

#[derive(Debug)]
pub struct FileBackend {
    dir: PathBuf,
}

impl FileBackend {
    pub fn open(dir: &Path) -> std::io::Result<FileBackend> {
        fs::create_dir_all(dir)?;
        Ok(FileBackend {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, id: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{id}.{ext}"))
    }
}

fn io(e: std::io::Error) -> StorageError {
    StorageError::Io(e.to_string())
}

fn read_info(path: &Path) -> Option<RecordingInfo> {
    if fs::metadata(path).ok()?.len() > INFO_LEN_MAX {
        return None;
    }
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

impl Backend for FileBackend {
    fn name(&self) -> &'static str {
        "file"
    }

    fn put(&self, info: &RecordingInfo, cast: &Path) -> Result<(), StorageError> {
        let tmp = self.path(&info.id, "cast.tmp");
        fs::copy(cast, &tmp).map_err(io)?;
        fs::rename(&tmp, self.path(&info.id, "cast")).map_err(io)?;
        let tmp = self.path(&info.id, "json.tmp");
        fs::write(
            &tmp,
            serde_json::to_vec(info).map_err(|e| StorageError::Io(e.to_string()))?,
        )
        .map_err(io)?;
        fs::rename(&tmp, self.path(&info.id, "json")).map_err(io)
    }

    fn list(&self) -> Result<Vec<RecordingInfo>, StorageError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io)? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if let Some(info) = read_info(&entry.path()).filter(|i| i.id == id) {
                out.push(info);
            }
        }
        Ok(out)
    }

    fn info(&self, id: &str) -> Result<Option<RecordingInfo>, StorageError> {
        Ok(read_info(&self.path(id, "json")).filter(|i| i.id == id))
    }

    fn read(&self, id: &str, offset: u64, len: u64) -> Result<Vec<u8>, StorageError> {
        let mut file = fs::File::open(self.path(id, "cast")).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                StorageError::NotFound(id.to_string())
            } else {
                io(e)
            }
        })?;
        file.seek(SeekFrom::Start(offset)).map_err(io)?;
        let mut out = Vec::new();
        file.take(len).read_to_end(&mut out).map_err(io)?;
        Ok(out)
    }
}
