//! Checkpoint stores: a small object-store interface (keys are `/`-separated paths), so the
//! S3 implementation of the distributed runtime slots in beside the file one.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::IoContext;
use crate::{Error, Result};

pub trait CheckpointStore: Send + Sync {
    /// Upload a local file (atomically: readers see all of it or nothing).
    fn put_file(&self, key: &str, local: &Path) -> Result<()>;
    /// Write bytes atomically.
    fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<()>;
    fn get_file(&self, key: &str, local: &Path) -> Result<()>;
    fn get_bytes(&self, key: &str) -> Result<Vec<u8>>;
    /// Keys under a prefix, sorted.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Delete a key; deleting a missing key is not an error.
    fn delete(&self, key: &str) -> Result<()>;
    /// Where this store lives, for messages (e.g. `file:///var/ckpt`).
    fn location(&self, key: &str) -> String;
}

/// Open a store from its URL. Only `file://` exists in local mode.
pub fn open(url: &str) -> Result<Box<dyn CheckpointStore>> {
    match url.strip_prefix("file://") {
        Some(path) if path.starts_with('/') => Ok(Box::new(FileStore::new(path)?)),
        Some(_) => Err(Error::Config(format!("checkpoint store {url:?}: file:// needs an absolute path"))),
        None => Err(Error::Config(format!(
            "checkpoint store {url:?}: only file:// is supported in local mode (s3:// comes with the distributed runtime)"
        ))),
    }
}

/// A directory as an object store.
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root).at(&root)?;
        Ok(Self { root })
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        if key.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(Error::Checkpoint(format!("invalid key {key:?}")));
        }
        Ok(self.root.join(key))
    }

    fn atomic_write(&self, key: &str, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let dest = self.path(key)?;
        let dir = dest.parent().expect("keys are below the root");
        fs::create_dir_all(dir).at(dir)?;
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            dest.file_name().and_then(|n| n.to_str()).unwrap_or("x")
        ));
        write(&tmp)?;
        fs::File::open(&tmp).and_then(|f| f.sync_all()).at(&tmp)?;
        fs::rename(&tmp, &dest).at(&dest)?;
        fs::File::open(dir).and_then(|f| f.sync_all()).at(dir)
    }
}

impl CheckpointStore for FileStore {
    fn put_file(&self, key: &str, local: &Path) -> Result<()> {
        self.atomic_write(key, |tmp| fs::copy(local, tmp).map(|_| ()).at(local))
    }

    fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.atomic_write(key, |tmp| fs::write(tmp, bytes).at(tmp))
    }

    fn get_file(&self, key: &str, local: &Path) -> Result<()> {
        let src = self.path(key)?;
        fs::copy(&src, local).map(|_| ()).at(&src)
    }

    fn get_bytes(&self, key: &str) -> Result<Vec<u8>> {
        let src = self.path(key)?;
        fs::read(&src).at(&src)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).at(&dir),
            };
            for entry in rd {
                let entry = entry.at(&dir)?;
                let path = entry.path();
                let rel = path
                    .strip_prefix(&self.root)
                    .expect("below root")
                    .to_string_lossy()
                    .replace('\\', "/");
                if entry.file_type().at(&path)?.is_dir() {
                    if prefix.starts_with(&rel) || rel.starts_with(prefix) {
                        stack.push(path);
                    }
                } else if rel.starts_with(prefix)
                    && !rel.rsplit('/').next().unwrap_or("").starts_with(".tmp-")
                {
                    out.push(rel);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let p = self.path(key)?;
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).at(&p),
        }
        // Drop directories a delete left empty (checkpoint directories).
        if let Some(dir) = p.parent() {
            if dir != self.root {
                let _ = fs::remove_dir(dir);
            }
        }
        Ok(())
    }

    fn location(&self, key: &str) -> String {
        format!("file://{}", self.root.join(key).display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::new(dir.path()).unwrap();
        s.put_bytes("chk-1/_manifest.json", b"{}").unwrap();
        s.put_bytes("shared/a.sst", b"x").unwrap();
        assert_eq!(s.list("chk-").unwrap(), ["chk-1/_manifest.json"]);
        assert_eq!(s.list("").unwrap().len(), 2);
        assert_eq!(s.get_bytes("shared/a.sst").unwrap(), b"x");
        s.delete("chk-1/_manifest.json").unwrap();
        s.delete("chk-1/_manifest.json").unwrap();
        assert!(s.list("chk-").unwrap().is_empty());
        assert!(s.put_bytes("../escape", b"x").is_err());
        assert!(open("s3://bucket/x").is_err());
    }
}
