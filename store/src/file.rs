//! A local directory as an object store (`file:///path`): local mode, tests, and any shared
//! filesystem a cluster mounts.

use std::fs;
use std::path::{Path, PathBuf};

use crate::{check_key, IoContext, ObjectStore, Result, StoreError};

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
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// Write through a temporary file, fsync, rename, fsync the directory.
    fn atomic_write(&self, key: &str, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let dest = self.path(key)?;
        let dir = dest.parent().expect("keys are below the root");
        fs::create_dir_all(dir).at(dir)?;
        let tmp = dir.join(format!(
            ".tmp-{}-{:?}-{}",
            std::process::id(),
            std::thread::current().id(),
            dest.file_name().and_then(|n| n.to_str()).unwrap_or("x")
        ));
        write(&tmp)?;
        fs::File::open(&tmp).and_then(|f| f.sync_all()).at(&tmp)?;
        fs::rename(&tmp, &dest).at(&dest)?;
        fs::File::open(dir).and_then(|f| f.sync_all()).at(dir)
    }

    fn not_found(&self, key: &str, e: std::io::Error, path: &Path) -> StoreError {
        if e.kind() == std::io::ErrorKind::NotFound {
            StoreError::NotFound {
                location: self.location(key),
            }
        } else {
            StoreError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    }
}

impl ObjectStore for FileStore {
    fn put_file(&self, key: &str, local: &Path) -> Result<()> {
        self.atomic_write(key, |tmp| fs::copy(local, tmp).map(|_| ()).at(local))
    }

    fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.atomic_write(key, |tmp| fs::write(tmp, bytes).at(tmp))
    }

    fn get_file(&self, key: &str, local: &Path) -> Result<()> {
        let src = self.path(key)?;
        fs::copy(&src, local)
            .map(|_| ())
            .map_err(|e| self.not_found(key, e, &src))
    }

    fn get_bytes(&self, key: &str) -> Result<Vec<u8>> {
        let src = self.path(key)?;
        fs::read(&src).map_err(|e| self.not_found(key, e, &src))
    }

    fn copy(&self, from: &str, to: &str) -> Result<()> {
        let src = self.path(from)?;
        if !src.exists() {
            return Err(StoreError::NotFound {
                location: self.location(from),
            });
        }
        self.put_file(to, &src)
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
                let entry = match entry {
                    Ok(e) => e,
                    // A concurrent delete removed it between readdir and stat.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e).at(&dir),
                };
                let path = entry.path();
                let rel = path
                    .strip_prefix(&self.root)
                    .expect("below root")
                    .to_string_lossy()
                    .replace('\\', "/");
                let Ok(ft) = entry.file_type() else { continue };
                if ft.is_dir() {
                    if prefix.starts_with(&format!("{rel}/")) || rel.starts_with(prefix) {
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
        // Drop directories a delete left empty (checkpoint directories), up to the root.
        let mut dir = p.parent();
        while let Some(d) = dir {
            if d == self.root || fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
        Ok(())
    }

    fn location(&self, key: &str) -> String {
        if key.is_empty() {
            format!("file://{}", self.root.display())
        } else {
            format!("file://{}", self.root.join(key).display())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_copy_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::new(dir.path()).unwrap();
        s.put_bytes("chk-1/_manifest.json", b"{}").unwrap();
        s.put_bytes("shared/a.sst", b"x").unwrap();
        assert_eq!(s.list("chk-").unwrap(), ["chk-1/_manifest.json"]);
        assert_eq!(s.list("").unwrap().len(), 2);
        assert_eq!(s.get_bytes("shared/a.sst").unwrap(), b"x");
        s.copy("shared/a.sst", "sp/a.sst").unwrap();
        assert_eq!(s.get_bytes("sp/a.sst").unwrap(), b"x");
        s.delete("chk-1/_manifest.json").unwrap();
        s.delete("chk-1/_manifest.json").unwrap();
        assert!(s.list("chk-").unwrap().is_empty());
        assert!(
            !dir.path().join("chk-1").exists(),
            "empty directory removed"
        );
        assert!(s.put_bytes("../escape", b"x").is_err());
        assert!(s.get_bytes("nope").unwrap_err().is_not_found());
        assert!(s.copy("nope", "x").unwrap_err().is_not_found());
    }
}
