//! Object stores for checkpoints and savepoints: a small blocking interface (keys are
//! `/`-separated paths relative to the store's root URL) over a local directory (`file://`)
//! and S3 (`s3://bucket/prefix`, MinIO included). The runtime calls it from its snapshot
//! uploader thread, never from the processing thread; the operator uses it to dispose of
//! savepoints with no live job.

mod faulty;
mod file;
mod s3;

use std::path::{Path, PathBuf};

pub use faulty::{FaultyStore, Op};
pub use file::FileStore;
pub use riffle_config::S3Config;
pub use s3::S3Store;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{location}: no such object")]
    NotFound { location: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("S3 {op} {location}: {message}")]
    S3 {
        op: &'static str,
        location: String,
        message: String,
    },
    #[error("invalid store key {0:?}")]
    InvalidKey(String),
    #[error("invalid store URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
}

impl StoreError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| StoreError::Io {
            path: path.into(),
            source,
        })
    }
}

/// A blocking object store. Writes are atomic (readers see a whole object or none), keys are
/// relative to the store root, and a missing key reads as [`StoreError::NotFound`].
pub trait ObjectStore: Send + Sync {
    /// Upload a local file.
    fn put_file(&self, key: &str, local: &Path) -> Result<()>;
    /// Upload many local files; S3 runs them concurrently.
    fn put_files(&self, files: &[(String, PathBuf)]) -> Result<()> {
        files.iter().try_for_each(|(k, p)| self.put_file(k, p))
    }
    fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<()>;
    fn get_file(&self, key: &str, local: &Path) -> Result<()>;
    fn get_bytes(&self, key: &str) -> Result<Vec<u8>>;
    /// Copy an object inside the store (server-side on S3).
    fn copy(&self, from: &str, to: &str) -> Result<()>;
    /// Keys under a prefix, sorted.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Delete a key; deleting a missing key is not an error.
    fn delete(&self, key: &str) -> Result<()>;
    /// The URL of a key, for messages and manifests (e.g. `s3://bucket/prefix/key`).
    fn location(&self, key: &str) -> String;
}

/// Open a store from its URL: `file:///absolute/path` or `s3://bucket[/prefix]`.
pub fn open(url: &str, s3: Option<&S3Config>) -> Result<Box<dyn ObjectStore>> {
    let bad = |reason: &str| StoreError::InvalidUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(bad("file:// needs an absolute path"));
        }
        return Ok(Box::new(FileStore::new(path)?));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("s3:// needs a bucket"));
        }
        return Ok(Box::new(S3Store::new(
            bucket,
            prefix.trim_matches('/'),
            s3.cloned().unwrap_or_default(),
        )?));
    }
    Err(bad("expected file:///absolute/path or s3://bucket/prefix"))
}

/// Join a base key and a relative key ("" base is the root).
pub fn join_key(base: &str, key: &str) -> String {
    match (base.trim_end_matches('/'), key.trim_start_matches('/')) {
        ("", k) => k.to_string(),
        (b, "") => b.to_string(),
        (b, k) => format!("{b}/{k}"),
    }
}

/// Check a relative key: no empty, `.` or `..` components.
pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty()
        || key
            .split('/')
            .any(|c| c.is_empty() || c == ".." || c == ".")
    {
        return Err(StoreError::InvalidKey(key.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_keys() {
        assert!(open("file://relative", None).is_err());
        assert!(open("s3://", None).is_err());
        assert!(open("gs://bucket", None).is_err());
        assert_eq!(join_key("", "a/b"), "a/b");
        assert_eq!(join_key("sp/", "x"), "sp/x");
        assert!(check_key("a/../b").is_err());
        assert!(check_key("a//b").is_err());
        assert!(check_key("a/b.sst").is_ok());
    }
}
