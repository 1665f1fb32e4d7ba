//! The state layer: the only code that touches RocksDB. It serves the dataflow's stages
//! through their interface ([`riffle_dataflow::store`]): point reads of histories and pane
//! entries beyond the hot tiers, scans of a key group's panes, and the changes they hand over
//! at checkpoint barriers and evictions (write-through, no read-modify-write per increment),
//! encoded here ([`records`]). The manager cuts RocksDB checkpoints and uploads only the table
//! files the store does not have yet.
//!
//! After an upload has committed, its cut is kept on local disk ([`keep_local`]) so that a
//! restart on the same machine restores from it instead of downloading ([`local`]).

pub mod codec;
pub mod local;
pub mod records;
#[cfg(test)]
mod tiers_tests;
#[cfg(test)]
mod writer_tests;

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use riffle_dataflow::store::{PaneVisitor, StateStore};
use riffle_dataflow::user::HistEntry;
use rocksdb::{checkpoint::Checkpoint, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use crate::checkpoint::{self, Manifest, ManifestFile};
use crate::error::IoContext;
use crate::store::ObjectStore;
use crate::{Error, Result};

pub use records::{HISTORIES, PANES};

/// RocksDB's own memory, on top of the hot tier's budget: the block cache and at most two
/// memtables.
pub const BLOCK_CACHE_BYTES: usize = 32 << 20;
pub const WRITE_BUFFER_BYTES: usize = 32 << 20;

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

/// Encoded changes beyond this go to the database before more are encoded.
const BATCH_BYTES: usize = 8 << 20;

/// A checkpoint's changes are ingested as table files of about this size: as large as a
/// flushed memtable, so a checkpoint adds no more level-0 files than flushing them would.
const INGEST_BYTES: usize = WRITE_BUFFER_BYTES;

/// Changes into the live database in bounded batches as they come, so that writing a
/// checkpoint's or an eviction's changes never holds all of them encoded at once. The
/// stages write through it as a [`riffle_dataflow::store::StateWriter`]; the runtime adds
/// raw ops of its own ([`push`](Self::push)).
///
/// An eviction's batches go through the memtable. A checkpoint's ([`StateManager::
/// checkpoint_writer`]) are sorted and written as table files that RocksDB ingests, one per
/// checkpoint unless its changes are larger: the batch loop waits for a checkpoint's
/// write-back, and inserting it into the memtable and then flushing it again (to cut) made
/// that pause 1.2-2.3 times as long.
pub struct BatchWriter {
    db: Arc<DB>,
    pending: OpBuffer,
    /// Where table files to ingest are written; `None`: through the memtable.
    ingest: Option<PathBuf>,
    /// Encoded changes beyond this are ingested before more are encoded.
    ingest_bytes: usize,
    /// The sort order of the pending ops, kept for the next batch.
    order: Vec<(u64, u32)>,
}

/// Ops encoded back to back in one buffer that the writer reuses from batch to batch: a
/// checkpoint writes back a million records and more, and one key and one value allocated
/// per record (then freed) cost a fifth of its pause in allocation and page faults.
#[derive(Default)]
struct OpBuffer {
    bytes: Vec<u8>,
    ops: Vec<Encoded>,
}

/// One op in an [`OpBuffer`]: `bytes[key..mid]` is its key, `bytes[mid..end]` its value (a
/// range delete's end key; nothing for a delete).
#[derive(Clone, Copy)]
struct Encoded {
    kind: OpKind,
    key: usize,
    mid: usize,
    end: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Put,
    Delete,
    DeleteRange,
}

impl OpBuffer {
    fn push(
        &mut self,
        kind: OpKind,
        key: impl FnOnce(&mut Vec<u8>),
        value: impl FnOnce(&mut Vec<u8>),
    ) {
        let at = self.bytes.len();
        key(&mut self.bytes);
        let mid = self.bytes.len();
        value(&mut self.bytes);
        self.ops.push(Encoded {
            kind,
            key: at,
            mid,
            end: self.bytes.len(),
        });
    }

    fn push_op(&mut self, op: &StateOp) {
        fn put(b: &[u8]) -> impl FnOnce(&mut Vec<u8>) + '_ {
            move |out| out.extend_from_slice(b)
        }
        match op {
            StateOp::Put(k, v) => self.push(OpKind::Put, put(k), put(v)),
            StateOp::Delete(k) => self.push(OpKind::Delete, put(k), |_| ()),
            StateOp::DeleteRange(from, to) => self.push(OpKind::DeleteRange, put(from), put(to)),
        }
    }

    fn key(&self, op: &Encoded) -> &[u8] {
        &self.bytes[op.key..op.mid]
    }

    fn value(&self, op: &Encoded) -> &[u8] {
        &self.bytes[op.mid..op.end]
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.ops.clear();
    }
}

impl BatchWriter {
    fn new(db: Arc<DB>, ingest: Option<PathBuf>) -> Self {
        Self {
            db,
            pending: OpBuffer::default(),
            ingest,
            ingest_bytes: INGEST_BYTES,
            order: Vec::new(),
        }
    }

    pub fn push(&mut self, op: StateOp) -> Result<()> {
        self.pending.push_op(&op);
        self.flush_if_full()
    }

    fn flush_if_full(&mut self) -> Result<()> {
        let limit = match self.ingest {
            Some(_) => self.ingest_bytes,
            None => BATCH_BYTES,
        };
        if self.pending.bytes.len() >= limit {
            self.flush()?;
        }
        Ok(())
    }

    /// Write what is pending. Dropping a writer without finishing loses its last batch.
    pub fn finish(mut self) -> Result<()> {
        self.flush()
    }

    fn flush(&mut self) -> Result<()> {
        let done = match &self.ingest {
            Some(dir) => ingest_ops(&self.db, dir, &self.pending, &mut self.order),
            None => write_ops(&self.db, &self.pending),
        };
        self.pending.clear();
        done
    }
}

/// Sort `buf`'s point ops by key into `order` (positions in `buf.ops`), the ops on one key
/// in the order they came. Most comparisons are of the keys' first eight bytes, held inline,
/// so that the sort does not chase every key through the buffer; only ops whose first eight
/// bytes tie are compared whole.
fn sort_points(buf: &OpBuffer, order: &mut Vec<(u64, u32)>) {
    let head = |key: &[u8]| {
        let mut b = [0u8; 8];
        let n = key.len().min(8);
        b[..n].copy_from_slice(&key[..n]);
        u64::from_be_bytes(b)
    };
    order.clear();
    order.extend(
        buf.ops
            .iter()
            .enumerate()
            .filter(|(_, op)| op.kind != OpKind::DeleteRange)
            .map(|(i, op)| (head(buf.key(op)), i as u32)),
    );
    order.sort_unstable();
    let mut from = 0;
    while from < order.len() {
        let to = from + order[from..].partition_point(|p| p.0 == order[from].0);
        if to - from > 1 {
            // Ties on the head (or keys shorter than it, padded): whole keys, then position.
            let key = |p: &(u64, u32)| buf.key(&buf.ops[p.1 as usize]);
            order[from..to].sort_unstable_by(|a, b| key(a).cmp(key(b)).then(a.1.cmp(&b.1)));
        }
        from = to;
    }
}

/// Write a batch of ops as one sorted table file in `dir` and have RocksDB ingest it (moved,
/// not copied), with the same result as applying them in order: the file is newer than
/// everything in the database, a later op on a key replaces an earlier one, and a range
/// delete drops the point ops before it in its range. (Its tombstone in the file covers only
/// older data: every entry of an ingested file has the same sequence number.) A batch with
/// no point op to write goes through the memtable: a table file needs one.
fn ingest_ops(db: &DB, dir: &Path, buf: &OpBuffer, order: &mut Vec<(u64, u32)>) -> Result<()> {
    if buf.ops.is_empty() {
        return Ok(());
    }
    sort_points(buf, order);
    let key = |p: &(u64, u32)| buf.key(&buf.ops[p.1 as usize]);
    let ranges: Vec<(usize, &[u8], &[u8])> = buf
        .ops
        .iter()
        .enumerate()
        .filter(|(_, op)| op.kind == OpKind::DeleteRange)
        .map(|(i, op)| (i, buf.key(op), buf.value(op)))
        .collect();
    let mut keep = vec![true; order.len()];
    for &(at, from, to) in &ranges {
        let first = order.partition_point(|p| key(p) < from);
        for (p, keep) in order[first..].iter().zip(&mut keep[first..]) {
            if key(p) >= to {
                break;
            }
            if (p.1 as usize) < at {
                *keep = false;
            }
        }
    }
    for (n, p) in order.iter().enumerate() {
        // Only the last op on a key counts.
        // Keys with different heads differ: only ties touch the keys themselves.
        if order
            .get(n + 1)
            .is_some_and(|next| next.0 == p.0 && key(next) == key(p))
        {
            keep[n] = false;
        }
    }
    if !keep.contains(&true) {
        return write_ops(db, buf);
    }
    fs::create_dir_all(dir).at(dir)?;
    let path = dir.join("checkpoint.sst");
    let opts = db_options();
    let mut file = rocksdb::SstFileWriter::create(&opts);
    file.open(&path)?;
    for (p, _) in order.iter().zip(&keep).filter(|(_, keep)| **keep) {
        let op = &buf.ops[p.1 as usize];
        match op.kind {
            OpKind::Put => file.put(buf.key(op), buf.value(op))?,
            _ => file.delete(buf.key(op))?,
        }
    }
    for &(_, from, to) in &ranges {
        if from < to {
            file.delete_range(from, to)?;
        }
    }
    file.finish()?;
    let mut io = rocksdb::IngestExternalFileOptions::default();
    io.set_move_files(true);
    db.ingest_external_file_opts(&io, vec![&path])?;
    // Moved into the database: only a leftover link may remain.
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).at(&path),
        _ => Ok(()),
    }
}

impl riffle_dataflow::store::StateWriter for BatchWriter {
    fn put_history(
        &mut self,
        kg: u32,
        user: &str,
        entries: &VecDeque<HistEntry>,
    ) -> riffle_dataflow::Result<()> {
        self.pending.push(
            OpKind::Put,
            |out| records::write_history_key(out, kg, user),
            |out| records::write_history(out, entries),
        );
        Ok(self.flush_if_full()?)
    }

    fn delete_history(&mut self, kg: u32, user: &str) -> riffle_dataflow::Result<()> {
        self.pending.push(
            OpKind::Delete,
            |out| records::write_history_key(out, kg, user),
            |_| (),
        );
        Ok(self.flush_if_full()?)
    }

    fn put_pane_entry(
        &mut self,
        kg: u32,
        pane: i64,
        item: &str,
        popularity: u64,
        neighbors: &mut dyn ExactSizeIterator<Item = (&str, u64)>,
    ) -> riffle_dataflow::Result<()> {
        self.pending.push(
            OpKind::Put,
            |out| records::write_pane_key(out, kg, pane, item),
            |out| records::write_pane_entry(out, popularity, neighbors),
        );
        Ok(self.flush_if_full()?)
    }

    fn delete_panes_below(&mut self, kg: u32, pane: i64) -> riffle_dataflow::Result<()> {
        Ok(self.push(records::delete_panes_below(kg, pane))?)
    }

    fn finish(self: Box<Self>) -> riffle_dataflow::Result<()> {
        Ok(BatchWriter::finish(*self)?)
    }
}

/// A RocksDB checkpoint on local disk, ready to upload.
#[derive(Clone, Debug)]
pub struct LocalSnapshot {
    pub dir: PathBuf,
    /// (file name, size), sorted.
    pub files: Vec<(String, u64)>,
}

/// Where a restored state came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Opened from the snapshot kept locally after its upload (nothing downloaded).
    pub reused_local: bool,
    pub downloaded_bytes: u64,
    pub downloaded_files: usize,
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
    db: Arc<DB>,
    dir: PathBuf,
    run_id: String,
    /// Table files already in the store: local name → store key.
    known: HashMap<String, String>,
    restored: RestoreStats,
}

fn db_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    // Point reads of evicted state: a bloom filter answers most reads of absent keys (new
    // users) without touching a table file; the block cache is part of the fixed overhead.
    // Filters and indexes live in that cache, partitioned into small blocks kept at high
    // priority: a whole-file filter (megabytes once the state is large) was evicted by data
    // blocks and read back and checksummed on nearly every read (80 % of a spilled run).
    let mut t = rocksdb::BlockBasedOptions::default();
    t.set_bloom_filter(10.0, false);
    t.set_block_cache(&rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES));
    t.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
    t.set_partition_filters(true);
    t.set_metadata_block_size(4096);
    t.set_cache_index_and_filter_blocks(true);
    t.set_cache_index_and_filter_blocks_with_high_priority(true);
    t.set_pin_top_level_index_and_filter(true);
    t.set_pin_l0_filter_and_index_blocks_in_cache(true);
    o.set_block_based_table_factory(&t);
    o.set_write_buffer_size(WRITE_BUFFER_BYTES);
    o.set_max_write_buffer_number(2);
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
        let db = Arc::new(DB::open(&db_options(), &db_dir)?);
        Ok(Self {
            db,
            dir: dir.to_path_buf(),
            run_id: new_run_id(),
            known: HashMap::new(),
            restored: RestoreStats::default(),
        })
    }

    /// Open a checkpoint of the job's own store in `dir/db`: from the snapshot kept locally
    /// when it is this checkpoint's, else downloaded.
    pub fn restore(
        dir: &Path,
        store: &dyn ObjectStore,
        base: &str,
        manifest: &Manifest,
        same_store: bool,
    ) -> Result<Self> {
        // Files of a savepoint or of another store are not in this store's shared area:
        // upload them afresh next time (and no local snapshot is theirs).
        let reuse = !manifest.self_contained && same_store;
        let identity = reuse.then(|| {
            local::identity(
                &store.location(&checkpoint::checkpoint_dir(manifest.id)),
                manifest.created_at_ms,
            )
        });
        Self::restore_files(
            dir,
            store,
            base,
            &manifest.files,
            reuse,
            identity.as_deref(),
        )
    }

    /// Open snapshot files (keys relative to `base`) in `dir/db`: hard-linked from the local
    /// snapshot kept in `dir` if its marker names `identity` and lists exactly `files`, else
    /// downloaded. With `reuse`, the table files count as already uploaded to `store` for
    /// later checkpoints.
    pub fn restore_files(
        dir: &Path,
        store: &dyn ObjectStore,
        base: &str,
        files: &[ManifestFile],
        reuse: bool,
        identity: Option<&str>,
    ) -> Result<Self> {
        let db_dir = dir.join("db");
        let kept = identity.and_then(|id| local::find(dir, id, files));
        wipe_except_kept(dir)?;
        let mut opened = None;
        if let Some(kept) = kept {
            let bytes = local::link_into(&kept, &db_dir)?;
            match DB::open(&db_options(), &db_dir) {
                Ok(db) => {
                    tracing::info!(dir = %dir.display(), files = files.len(), bytes, "state reused from the local snapshot; nothing downloaded");
                    opened = Some((
                        db,
                        RestoreStats {
                            reused_local: true,
                            ..RestoreStats::default()
                        },
                    ));
                }
                Err(e) => {
                    // Damaged on disk in a way names and sizes do not show: download instead.
                    tracing::warn!(dir = %dir.display(), error = %e, "the local snapshot does not open; downloading");
                    fs::remove_dir_all(&db_dir).at(&db_dir)?;
                }
            }
        }
        let (db, restored) = match opened {
            Some(o) => o,
            None => {
                // Whatever was kept is not this checkpoint's: it can never match again.
                local::discard(dir)?;
                download(store, base, files, &db_dir)?;
                let stats = RestoreStats {
                    reused_local: false,
                    downloaded_bytes: files.iter().map(|f| f.size).sum(),
                    downloaded_files: files.len(),
                };
                tracing::info!(
                    dir = %dir.display(),
                    files = stats.downloaded_files,
                    downloaded_bytes = stats.downloaded_bytes,
                    "state downloaded"
                );
                (DB::open(&db_options(), &db_dir)?, stats)
            }
        };
        let db = Arc::new(db);
        let known = if reuse {
            files
                .iter()
                .filter(|f| f.name.ends_with(".sst"))
                .map(|f| (f.name.clone(), f.key.clone()))
                .collect()
        } else {
            HashMap::new()
        };
        Ok(Self {
            db,
            dir: dir.to_path_buf(),
            run_id: new_run_id(),
            known,
            restored,
        })
    }

    /// How the state was opened (a fresh state reports nothing downloaded, nothing reused).
    pub fn restore_stats(&self) -> RestoreStats {
        self.restored
    }

    /// The local working directory (snapshots are cut below it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Write `ops` in order, through the memtable (see [`BatchWriter`]).
    pub fn apply(&self, ops: Vec<StateOp>) -> Result<()> {
        let mut out = self.writer();
        for op in ops {
            out.push(op)?;
        }
        out.finish()
    }

    /// A writer into the live database in bounded batches, through the memtable (see
    /// [`BatchWriter`]).
    pub fn writer(&self) -> BatchWriter {
        BatchWriter::new(self.db.clone(), None)
    }

    /// A writer for a checkpoint's changes: its batches are ingested as table files (see
    /// [`BatchWriter`]).
    pub fn checkpoint_writer(&self) -> BatchWriter {
        BatchWriter::new(self.db.clone(), Some(self.dir.join("ingest")))
    }

    /// The stages' store for what is beyond their hot tiers (the live database: every
    /// checkpoint is cut after the stages have written back what changed).
    pub fn spill_store(&self) -> Arc<dyn StateStore> {
        Arc::new(Spill(self.db.clone()))
    }

    /// Visit the keys of one key group and state tag, in key order.
    pub fn for_each_in(
        &self,
        kg: u32,
        tag: u8,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<()>,
    ) -> Result<()> {
        let prefix = codec::state_key(kg, tag, &[]);
        let mode = IteratorMode::From(&prefix, rocksdb::Direction::Forward);
        for item in self.db.iterator(mode) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            f(&k, &v)?;
        }
        Ok(())
    }

    /// Job-wide operator state stored under `name` (see [`records::JOB`]).
    pub fn job_state(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(records::job_state_key(name))?)
    }

    /// Visit key group `kg`'s pane entries (a restore: the item stage's
    /// [`restorer`](riffle_dataflow::item::ItemStage::restorer)).
    pub fn scan_panes(&self, kg: u32, visit: &mut dyn PaneVisitor) -> Result<()> {
        scan_panes(&self.db, kg, i64::MIN..i64::MAX, visit)
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

    /// Cut a RocksDB checkpoint of the current contents into `dir/<name>` (hard links: cheap,
    /// and it stays valid while the database moves on).
    pub fn cut(&mut self, name: &str) -> Result<LocalSnapshot> {
        self.db.flush()?;
        let snap_dir = self.dir.join(name);
        if snap_dir.exists() {
            fs::remove_dir_all(&snap_dir).at(&snap_dir)?;
        }
        Checkpoint::new(&self.db)?.create_checkpoint(&snap_dir)?;
        let mut files = Vec::new();
        for entry in fs::read_dir(&snap_dir).at(&snap_dir)? {
            let entry = entry.at(&snap_dir)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let size = entry.metadata().at(entry.path())?.len();
            files.push((name, size));
        }
        files.sort();
        Ok(LocalSnapshot {
            dir: snap_dir,
            files,
        })
    }

    /// Copy the keys of the key groups `keep` accepts from another database directory (a
    /// downloaded snapshot part) into this one. Returns the number of keys copied.
    pub fn ingest_from(&self, other: &Path, keep: impl Fn(u32) -> bool) -> Result<u64> {
        let db = DB::open_for_read_only(&Options::default(), other, false)?;
        let mut batch = WriteBatch::default();
        let mut n = 0u64;
        for item in db.iterator(IteratorMode::Start) {
            let (k, v) = item?;
            let (kg, _, _) = codec::split_key(&k)?;
            if keep(kg) {
                batch.put(&k, &v);
                n += 1;
                if batch.len() >= 10_000 {
                    self.write(std::mem::take(&mut batch))?;
                }
            }
        }
        self.write(batch)?;
        Ok(n)
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        write_batch(&self.db, batch)
    }

    /// The store keys of table files already uploaded (local name → key).
    pub fn known_files(&self) -> &HashMap<String, String> {
        &self.known
    }
}

/// The stages' view of the live database.
struct Spill(Arc<DB>);

impl StateStore for Spill {
    fn history(&self, kg: u32, user: &str) -> riffle_dataflow::Result<Option<VecDeque<HistEntry>>> {
        let Some(v) = self
            .0
            .get_pinned(records::history_key(kg, user))
            .map_err(Error::from)?
        else {
            return Ok(None);
        };
        Ok(Some(records::decode_history(&v)?))
    }

    fn pane_entry(
        &self,
        kg: u32,
        pane: i64,
        item: &str,
        neighbor: &mut dyn FnMut(&str, u64),
    ) -> riffle_dataflow::Result<Option<u64>> {
        let key = records::pane_key(kg, pane, item);
        let Some(v) = self.0.get_pinned(key).map_err(Error::from)? else {
            return Ok(None);
        };
        Ok(Some(records::decode_pane_entry(&v, neighbor)?))
    }

    fn scan_panes(
        &self,
        kg: u32,
        panes: Range<i64>,
        visit: &mut dyn PaneVisitor,
    ) -> riffle_dataflow::Result<()> {
        Ok(scan_panes(&self.0, kg, panes, visit)?)
    }

    fn writer(&self) -> Box<dyn riffle_dataflow::store::StateWriter + '_> {
        Box::new(BatchWriter::new(self.0.clone(), None))
    }
}

/// Visit key group `kg`'s pane entries of `panes` in key order, decoded.
fn scan_panes(db: &DB, kg: u32, panes: Range<i64>, visit: &mut dyn PaneVisitor) -> Result<()> {
    let (from, to) = records::pane_range(kg, panes);
    let mode = IteratorMode::From(&from, rocksdb::Direction::Forward);
    for item in db.iterator(mode) {
        let (k, v) = item?;
        if *k >= *to {
            break;
        }
        records::visit_pane_entry(&k, &v, visit)?;
    }
    Ok(())
}

fn write_ops(db: &DB, buf: &OpBuffer) -> Result<()> {
    if buf.ops.is_empty() {
        return Ok(());
    }
    // Written in bounded batches: nothing reads the database between them (a checkpoint is
    // cut after all of them), and a single batch would copy every op once more in memory.
    let mut batch = WriteBatch::default();
    for op in &buf.ops {
        let (k, v) = (buf.key(op), buf.value(op));
        match op.kind {
            OpKind::Put => batch.put(k, v),
            OpKind::Delete => batch.delete(k),
            OpKind::DeleteRange => batch.delete_range(k, v),
        }
        if batch.size_in_bytes() >= BATCH_BYTES {
            write_batch(db, std::mem::take(&mut batch))?;
        }
    }
    write_batch(db, batch)
}

fn write_batch(db: &DB, batch: WriteBatch) -> Result<()> {
    // No WAL: state is only ever recovered from a snapshot, never from a crashed db.
    let mut wo = WriteOptions::default();
    wo.disable_wal(true);
    db.write_opt(batch, &wo)?;
    Ok(())
}

/// Upload what the store lacks of a cut for checkpoint `id` (table files not in `known` go to
/// `shared/<run_id>-<name>` and are added to `known`); returns the manifest's file list.
pub fn upload(
    store: &dyn ObjectStore,
    snap: &LocalSnapshot,
    id: u64,
    run_id: &str,
    known: &mut HashMap<String, String>,
) -> Result<UploadStats> {
    let (uploads, files) = checkpoint::plan_files(id, run_id, &snap.files, known);
    let mut stats = UploadStats {
        total_bytes: files.iter().map(|f| f.size).sum(),
        ..UploadStats::default()
    };
    for f in &uploads {
        store.put_file(&f.key, &snap.dir.join(&f.name))?;
        stats.uploaded_files += 1;
        stats.uploaded_bytes += f.size;
        if f.name.ends_with(".sst") {
            known.insert(f.name.clone(), f.key.clone());
        }
    }
    stats.files = files;
    Ok(stats)
}

pub use local::keep as keep_local;

/// Download snapshot files (keys relative to `base`) into `dest`.
pub fn download(
    store: &dyn ObjectStore,
    base: &str,
    files: &[ManifestFile],
    dest: &Path,
) -> Result<()> {
    fs::create_dir_all(dest).at(dest)?;
    for f in files {
        store.get_file(&join_key(base, &f.key), &dest.join(&f.name))?;
    }
    Ok(())
}

/// The local state directory is a cache of the last checkpoint: whatever a crashed process
/// left there (a db, half-made snapshots) is discarded.
fn wipe(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).at(dir)?;
    }
    fs::create_dir_all(dir).at(dir)
}

/// As [`wipe`], but the kept snapshot and its marker stay (the restore decides about them).
fn wipe_except_kept(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return fs::create_dir_all(dir).at(dir);
    }
    for entry in fs::read_dir(dir).at(dir)? {
        let path = entry.at(dir)?.path();
        if local::is_kept(&path) {
            continue;
        }
        if path.is_dir() {
            fs::remove_dir_all(&path).at(&path)?;
        } else {
            fs::remove_file(&path).at(&path)?;
        }
    }
    Ok(())
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
