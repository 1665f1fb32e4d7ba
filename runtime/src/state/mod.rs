//! The state manager: the only code that touches RocksDB. Operators keep their working state
//! in memory and hand it over as [`StateOp`]s at checkpoint barriers (write-through, no
//! read-modify-write per increment); the manager writes them, cuts a RocksDB checkpoint, and
//! uploads only the table files the store does not have yet.

pub mod codec;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use rocksdb::{checkpoint::Checkpoint, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use crate::checkpoint::{self, store::CheckpointStore, Manifest, ManifestFile};
use crate::error::IoContext;
use crate::Result;

/// A named piece of operator state and the tag byte of its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateDescriptor {
    pub name: &'static str,
    pub tag: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateOp {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    DeleteRange(Vec<u8>, Vec<u8>),
}

/// What one checkpoint of the state cost.
#[derive(Clone, Debug, Default)]
pub struct UploadStats {
    pub files: Vec<ManifestFile>,
    pub uploaded_files: usize,
    pub uploaded_bytes: u64,
    pub total_bytes: u64,
}

pub struct StateManager {
    db: DB,
    dir: PathBuf,
    run_id: String,
    /// Table files already in the store: local name → store key.
    known: HashMap<String, String>,
}

fn db_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    o.set_level_compaction_dynamic_level_bytes(true);
    o.set_max_background_jobs(2);
    o
}

impl StateManager {
    /// A new, empty state in `dir/db` (anything there is discarded).
    pub fn create(dir: &Path) -> Result<Self> {
        let db_dir = dir.join("db");
        wipe(dir)?;
        let db = DB::open(&db_options(), &db_dir)?;
        Ok(Self {
            db,
            dir: dir.to_path_buf(),
            run_id: new_run_id(),
            known: HashMap::new(),
        })
    }

    /// Download a checkpoint's files into `dir/db` and open it.
    pub fn restore(
        dir: &Path,
        store: &dyn CheckpointStore,
        base: &str,
        manifest: &Manifest,
        same_store: bool,
    ) -> Result<Self> {
        let db_dir = dir.join("db");
        wipe(dir)?;
        fs::create_dir_all(&db_dir).at(&db_dir)?;
        for f in &manifest.files {
            store.get_file(&join_key(base, &f.key), &db_dir.join(&f.name))?;
        }
        let db = DB::open(&db_options(), &db_dir)?;
        // Files of a savepoint or of another store are not in this store's shared area:
        // upload them afresh next time.
        let known = if manifest.self_contained || !same_store {
            HashMap::new()
        } else {
            manifest
                .files
                .iter()
                .filter(|f| f.name.ends_with(".sst"))
                .map(|f| (f.name.clone(), f.key.clone()))
                .collect()
        };
        Ok(Self {
            db,
            dir: dir.to_path_buf(),
            run_id: new_run_id(),
            known,
        })
    }

    pub fn apply(&self, ops: Vec<StateOp>) -> Result<()> {
        let mut batch = WriteBatch::default();
        for op in ops {
            match op {
                StateOp::Put(k, v) => batch.put(k, v),
                StateOp::Delete(k) => batch.delete(k),
                StateOp::DeleteRange(from, to) => batch.delete_range(from, to),
            }
        }
        // No WAL: state is only ever recovered from a checkpoint, never from a crashed db.
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Visit every key/value (restore: route them to their owners).
    pub fn for_each(&self, mut f: impl FnMut(&[u8], &[u8]) -> Result<()>) -> Result<()> {
        for item in self.db.iterator(IteratorMode::Start) {
            let (k, v) = item?;
            f(&k, &v)?;
        }
        Ok(())
    }

    /// Number of live keys (exact: a full scan; used by tests and status).
    pub fn count_keys(&self) -> Result<u64> {
        let mut n = 0;
        self.for_each(|_, _| {
            n += 1;
            Ok(())
        })?;
        Ok(n)
    }

    /// Cut a checkpoint of the current contents and upload what the store lacks.
    pub fn checkpoint(&mut self, store: &dyn CheckpointStore, id: u64) -> Result<UploadStats> {
        self.db.flush()?;
        let snap_dir = self.dir.join(format!("snap-{id}"));
        if snap_dir.exists() {
            fs::remove_dir_all(&snap_dir).at(&snap_dir)?;
        }
        Checkpoint::new(&self.db)?.create_checkpoint(&snap_dir)?;
        let mut local = Vec::new();
        for entry in fs::read_dir(&snap_dir).at(&snap_dir)? {
            let entry = entry.at(&snap_dir)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let size = entry.metadata().at(entry.path())?.len();
            local.push((name, size));
        }
        local.sort();
        let (uploads, files) = checkpoint::plan_files(id, &self.run_id, &local, &self.known);
        let mut stats = UploadStats {
            total_bytes: files.iter().map(|f| f.size).sum(),
            ..UploadStats::default()
        };
        for f in &uploads {
            store.put_file(&f.key, &snap_dir.join(&f.name))?;
            stats.uploaded_files += 1;
            stats.uploaded_bytes += f.size;
            if f.name.ends_with(".sst") {
                self.known.insert(f.name.clone(), f.key.clone());
            }
        }
        fs::remove_dir_all(&snap_dir).at(&snap_dir)?;
        stats.files = files;
        Ok(stats)
    }

    /// Forget store keys that garbage collection deleted.
    pub fn forget(&mut self, deleted: &[String]) {
        self.known.retain(|_, key| !deleted.contains(key));
    }
}

/// The local state directory is a cache of the last checkpoint: whatever a crashed process
/// left there (a db, half-made snapshots) is discarded.
fn wipe(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).at(dir)?;
    }
    fs::create_dir_all(dir).at(dir)
}

/// `base` is the directory a manifest's keys are relative to ("" for the store root).
pub fn join_key(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_string()
    } else {
        format!("{base}/{key}")
    }
}

fn new_run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:08x}",
        crate::source::generator::splitmix(nanos as u64 ^ u64::from(std::process::id())) as u32
    )
}
