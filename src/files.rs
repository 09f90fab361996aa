//! Uploaded and generated files (OpenAI's Files API) under the data dir, shared by fine-tuning
//! (training data) and batches (requests in, results out):
//!
//! ```text
//! files/<file-id>.json   metadata        files/<file-id>.data   content
//! ```
//! A file exists once its metadata is written, after its content: a crash between the two
//! leaves an orphan `.data`, never a listed file without content. Every whole-file write goes
//! through a synced temporary file and a rename ([`write_atomic`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Purposes a client may upload with: training data and batch input.
pub const UPLOAD_PURPOSES: [&str; 2] = ["fine-tune", "batch"];

/// The purpose of the files a batch writes (its results and errors).
pub const BATCH_OUTPUT: &str = "batch_output";

/// A stored file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    /// `file-…`.
    pub id: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// Name given by the client (or the batch that wrote it).
    pub filename: String,
    /// `fine-tune`, `batch` or `batch_output`.
    pub purpose: String,
}

/// Errors answered to API callers, of the file store and of fine-tuning jobs
/// (`train::TrainError`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FileError {
    /// No such file (or job).
    #[error("{0}")]
    NotFound(String),
    /// A field is invalid.
    #[error("{message}")]
    Invalid {
        /// The request field.
        param: String,
        /// Why.
        message: String,
    },
    /// The data dir could not be written or read.
    #[error("storage error: {0}")]
    Io(String),
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes)).map(|_| ())
}

/// Writes what `write` writes to `path` through a buffered, synced temporary file and a
/// rename (nothing of it need be in memory at once); the length written.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    let tmp = path.with_extension("tmp");
    let len = {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        write(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        f.metadata()?.len()
    };
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(len)
}

/// The records of every `*.json` file in `dir`, by file name (an unreadable one is skipped
/// with a warning; a missing dir has none).
pub fn list_json<T: DeserializeOwned>(dir: &Path) -> Vec<T> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    let read = |path: &PathBuf| -> Result<T, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        serde_json::from_str(&text).map_err(|e| e.to_string())
    };
    paths
        .iter()
        .filter_map(|path| match read(path) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable record skipped");
                None
            }
        })
        .collect()
}

/// Unix seconds now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A new id that sorts by creation time: `prefix` (with its separator: `file-`, `batch_`),
/// milliseconds, then randomness. Within
/// a process the millisecond part only grows (two ids in one millisecond take the next), so
/// ids made one after the other sort in that order.
pub fn new_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let prev = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(now_ms.max(last + 1))
        })
        .unwrap_or(0);
    let ms = now_ms.max(prev + 1);
    format!("{prefix}{ms:012x}{:08x}", rand::random::<u32>())
}

struct Inner {
    dir: PathBuf,
    records: Mutex<BTreeMap<String, FileRecord>>,
}

/// Handle to the stored files (cheap to clone).
#[derive(Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

impl FileStore {
    /// Opens (creating) `data_dir/files` and lists the files already there.
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let dir = data_dir.join("files");
        std::fs::create_dir_all(&dir)?;
        let records = list_json::<FileRecord>(&dir)
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        Ok(FileStore {
            inner: Arc::new(Inner {
                dir,
                records: Mutex::new(records),
            }),
        })
    }

    fn records(&self) -> MutexGuard<'_, BTreeMap<String, FileRecord>> {
        self.inner
            .records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Stores a client's upload: one of [`UPLOAD_PURPOSES`], UTF-8 text (JSONL).
    pub fn upload(
        &self,
        filename: &str,
        purpose: &str,
        data: &[u8],
    ) -> Result<FileRecord, FileError> {
        if !UPLOAD_PURPOSES.contains(&purpose) {
            return Err(FileError::Invalid {
                param: "purpose".into(),
                message: format!(
                    "purpose '{purpose}' is not supported; use one of: {}",
                    UPLOAD_PURPOSES.join(", ")
                ),
            });
        }
        if std::str::from_utf8(data).is_err() {
            return Err(FileError::Invalid {
                param: "file".into(),
                message: "the file is not UTF-8 text (JSONL expected)".into(),
            });
        }
        self.create(filename, purpose, data)
            .map_err(|e| FileError::Io(e.to_string()))
    }

    /// Stores a file the server made (any purpose): content first, then its metadata.
    pub fn create(
        &self,
        filename: &str,
        purpose: &str,
        data: &[u8],
    ) -> std::io::Result<FileRecord> {
        self.create_with(filename, purpose, |w| w.write_all(data))
    }

    /// [`FileStore::create`] with the content written by `write` as it goes (a batch's
    /// result files: never whole in memory).
    pub fn create_with(
        &self,
        filename: &str,
        purpose: &str,
        write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> std::io::Result<FileRecord> {
        let id = new_id("file-");
        let bytes = write_atomic_with(&self.inner.dir.join(format!("{id}.data")), write)?;
        let rec = FileRecord {
            id,
            bytes,
            created_at: now(),
            filename: filename.to_string(),
            purpose: purpose.to_string(),
        };
        let meta = serde_json::to_vec_pretty(&rec).map_err(std::io::Error::other)?;
        write_atomic(&self.inner.dir.join(format!("{}.json", rec.id)), &meta)?;
        self.records().insert(rec.id.clone(), rec.clone());
        Ok(rec)
    }

    /// Every file, oldest first.
    pub fn list(&self) -> Vec<FileRecord> {
        self.records().values().cloned().collect()
    }

    /// One file.
    pub fn get(&self, id: &str) -> Result<FileRecord, FileError> {
        self.records()
            .get(id)
            .cloned()
            .ok_or_else(|| FileError::NotFound(format!("no file with id '{id}'")))
    }

    /// A file's content.
    pub fn content(&self, id: &str) -> Result<Vec<u8>, FileError> {
        self.get(id)?;
        std::fs::read(self.inner.dir.join(format!("{id}.data")))
            .map_err(|e| FileError::Io(format!("file {id}: {e}")))
    }

    /// Deletes a file (metadata first, so a crash leaves no half-listed file).
    pub fn delete(&self, id: &str) -> Result<(), FileError> {
        self.get(id)?;
        std::fs::remove_file(self.inner.dir.join(format!("{id}.json")))
            .map_err(|e| FileError::Io(e.to_string()))?;
        let _ = std::fs::remove_file(self.inner.dir.join(format!("{id}.data")));
        self.records().remove(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_survive_a_reopen_and_purposes_are_checked() {
        let dir = tempfile::tempdir().expect("tmp");
        let files = FileStore::open(dir.path()).expect("open");
        let a = files.upload("a.jsonl", "batch", b"{}\n").expect("upload");
        let b = files.create("b.jsonl", BATCH_OUTPUT, b"x").expect("create");
        assert!(matches!(
            files.upload("c.jsonl", "assistants", b"{}"),
            Err(FileError::Invalid { param, .. }) if param == "purpose"
        ));
        assert!(matches!(
            files.upload("c.jsonl", "batch", &[0xff, 0xfe]),
            Err(FileError::Invalid { param, .. }) if param == "file"
        ));
        let again = FileStore::open(dir.path()).expect("reopen");
        assert_eq!(again.list(), vec![a.clone(), b.clone()]);
        assert_eq!(again.content(&a.id).expect("content"), b"{}\n");
        again.delete(&b.id).expect("delete");
        assert!(matches!(again.get(&b.id), Err(FileError::NotFound(_))));
        assert_eq!(FileStore::open(dir.path()).expect("reopen").list(), vec![a]);
    }
}
