//! Snapshot parts in the object store: upload (incremental: table files already in the store
//! are referenced, not copied), self-contained savepoint copies (server-side), reading parts
//! back, and garbage collection. The decisions are in `protocol.rs`; this is the I/O.
//!
//! The worker cuts a local RocksDB checkpoint at a commit boundary and hands it to the
//! [`Uploader`] thread, so uploads never block processing or commits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::protocol::{
    part_dir, part_order, parts_prefix, plan_gc, savepoint_part_dir, shared_prefix, PartManifest,
    SavepointManifest, StoredPart, PART_MANIFEST, SAVEPOINT_MANIFEST,
};
use crate::checkpoint::{plan_upload, ManifestFile};
use crate::config::S3Config;
use crate::error::IoContext;
use crate::state::LocalSnapshot;
use crate::store::{self as objstore, join_key, ObjectStore};
use crate::{Error, Result};

/// An object store and a key below its root: how parts are addressed across stores.
pub struct Located {
    pub store: Box<dyn ObjectStore>,
    pub key: String,
}

/// Split a `file://` or `s3://` URL into a store (at the bucket or directory root) and a key.
pub fn locate(url: &str, s3: Option<&S3Config>) -> Result<Located> {
    let (root, key) = if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        (format!("s3://{bucket}"), key.to_string())
    } else if let Some(path) = url.strip_prefix("file://") {
        (
            "file:///".to_string(),
            path.trim_start_matches('/').to_string(),
        )
    } else {
        return Err(Error::Config(format!(
            "{url:?}: expected file:///path or s3://bucket/key"
        )));
    };
    Ok(Located {
        store: objstore::open(&root, s3)?,
        key,
    })
}

/// Read a part manifest from its URL; returns the manifest and the key its files are
/// relative to, in the located store.
pub fn read_part(url: &str, s3: Option<&S3Config>) -> Result<(Located, PartManifest, String)> {
    let loc = locate(url, s3)?;
    let bytes = loc.store.get_bytes(&loc.key)?;
    let m: PartManifest = serde_json::from_slice(&bytes)?;
    crate::state::records::check_state_format(m.state_format, &format!("part {url}"))?;
    let part_dir = loc.key.rsplit_once('/').map_or("", |(d, _)| d).to_string();
    let base = if m.self_contained {
        part_dir
    } else {
        // Checkpoint parts list keys relative to the checkpoint store root, two directory
        // levels above `parts/wNNNN/<part>/`.
        let mut base = part_dir.as_str();
        for _ in 0..3 {
            base = base.rsplit_once('/').map_or("", |(d, _)| d);
        }
        base.to_string()
    };
    Ok((loc, m, base))
}

/// Read a savepoint's job-wide manifest from its directory URL (or the manifest's URL).
pub fn read_savepoint(url: &str, s3: Option<&S3Config>) -> Result<(String, SavepointManifest)> {
    let url = url.trim_end_matches('/');
    let dir = url
        .strip_suffix(&format!("/{SAVEPOINT_MANIFEST}"))
        .unwrap_or(url);
    let loc = locate(&format!("{dir}/{SAVEPOINT_MANIFEST}"), s3)?;
    let bytes = loc.store.get_bytes(&loc.key).map_err(|e| {
        if e.is_not_found() {
            Error::Config(format!(
                "{dir} is not a complete savepoint (no {SAVEPOINT_MANIFEST})"
            ))
        } else {
            e.into()
        }
    })?;
    Ok((dir.to_string(), serde_json::from_slice(&bytes)?))
}

/// What one part upload cost.
#[derive(Clone, Debug, Default)]
pub struct UploadStats {
    pub uploaded_files: usize,
    pub uploaded_bytes: u64,
    pub total_bytes: u64,
    pub duration_ms: u64,
}

/// Upload a local snapshot as a checkpoint part: new table files under the worker's shared
/// prefix (`known` maps local table names already in the store to their keys), the small
/// files into the part's directory, the manifest last. Returns the manifest's key.
pub fn upload_part(
    store: &dyn ObjectStore,
    local: &LocalSnapshot,
    known: &mut HashMap<String, String>,
    run_id: &str,
    mut manifest: PartManifest,
) -> Result<(String, PartManifest, UploadStats)> {
    let started = Instant::now();
    let dir = part_dir(manifest.worker, manifest.gen, manifest.seq);
    let (uploads, files) = plan_upload(
        &local.files,
        known,
        &format!("{}{run_id}-", shared_prefix(manifest.worker)),
        &dir,
    );
    let batch: Vec<(String, PathBuf)> = uploads
        .iter()
        .map(|f| (f.key.clone(), local.dir.join(&f.name)))
        .collect();
    store.put_files(&batch)?;
    for f in uploads.iter().filter(|f| f.name.ends_with(".sst")) {
        known.insert(f.name.clone(), f.key.clone());
    }
    let stats = UploadStats {
        uploaded_files: uploads.len(),
        uploaded_bytes: uploads.iter().map(|f| f.size).sum(),
        total_bytes: files.iter().map(|f| f.size).sum(),
        duration_ms: 0,
    };
    manifest.files = files;
    manifest.self_contained = false;
    let key = format!("{dir}/{PART_MANIFEST}");
    store.put_bytes(&key, &serde_json::to_vec_pretty(&manifest)?)?;
    Ok((
        key,
        manifest,
        UploadStats {
            duration_ms: started.elapsed().as_millis() as u64,
            ..stats
        },
    ))
}

/// Copy an uploaded checkpoint part into a savepoint as a self-contained part (server-side
/// copies when both live in the same store, else through a local file). Returns the part
/// manifest's key in the savepoint store.
pub fn copy_to_savepoint(
    from: &dyn ObjectStore,
    to: &dyn ObjectStore,
    same_store_prefix: Option<&str>,
    part: &PartManifest,
    id: &str,
    scratch: &Path,
) -> Result<String> {
    let dir = savepoint_part_dir(id, part.worker);
    let mut sp = part.clone();
    sp.self_contained = true;
    sp.savepoint = Some(id.to_string());
    for f in &mut sp.files {
        let dest = format!("{dir}/{}", f.name);
        match same_store_prefix {
            // The savepoint store is `<checkpoint store>/<prefix>`: copy within the store.
            Some(prefix) => from.copy(&f.key, &join_key(prefix, &dest))?,
            None => {
                let tmp = scratch.join(&f.name);
                from.get_file(&f.key, &tmp)?;
                to.put_file(&dest, &tmp)?;
                std::fs::remove_file(&tmp).at(&tmp)?;
            }
        }
        f.key = f.name.clone();
    }
    let key = format!("{dir}/{PART_MANIFEST}");
    to.put_bytes(&key, &serde_json::to_vec_pretty(&sp)?)?;
    Ok(key)
}

/// Every complete part of the store's workers, and the part directories without manifests.
pub fn list_parts(store: &dyn ObjectStore) -> Result<(Vec<StoredPart>, Vec<String>)> {
    let keys = store.list("parts/")?;
    let mut dirs: BTreeMap<String, bool> = BTreeMap::new();
    for k in &keys {
        if let Some((dir, name)) = k.rsplit_once('/') {
            let complete = dirs.entry(dir.to_string()).or_insert(false);
            *complete |= name == PART_MANIFEST;
        }
    }
    let mut complete = Vec::new();
    let mut incomplete = Vec::new();
    for (dir, done) in dirs {
        let worker = dir
            .strip_prefix("parts/w")
            .and_then(|r| r.split('/').next())
            .and_then(|w| w.parse::<u32>().ok());
        let (Some(worker), Some(order)) = (worker, part_order(&dir)) else {
            continue;
        };
        if !done {
            incomplete.push(dir);
            continue;
        }
        let m: PartManifest = match store.get_bytes(&format!("{dir}/{PART_MANIFEST}")) {
            Ok(b) => serde_json::from_slice(&b)?,
            // Deleted by a concurrent collection since the listing.
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        complete.push(StoredPart {
            files: m.files.iter().map(|f| f.key.clone()).collect(),
            dir,
            worker,
            order,
        });
    }
    Ok((complete, incomplete))
}

/// What a collection deleted.
#[derive(Clone, Debug, Default)]
pub struct GcStats {
    pub parts: usize,
    pub files: usize,
}

/// Garbage-collect the parts and table files of the workers in `scope`; `referenced` are
/// part directories named by committed metadata.
pub fn collect_garbage(
    store: &dyn ObjectStore,
    scope: &BTreeSet<u32>,
    current: &BTreeSet<u32>,
    referenced: &BTreeSet<String>,
    retained: usize,
) -> Result<GcStats> {
    let (complete, incomplete) = list_parts(store)?;
    let mut shared = Vec::new();
    for w in scope {
        shared.extend(store.list(&shared_prefix(*w))?);
    }
    let incomplete: Vec<String> = incomplete
        .into_iter()
        .filter(|d| scope.iter().any(|w| d.starts_with(&parts_prefix(*w))))
        .collect();
    let plan = plan_gc(
        scope,
        &complete,
        &incomplete,
        &shared,
        referenced,
        current,
        retained,
    );
    let mut stats = GcStats::default();
    for dir in plan.parts.iter().chain(&plan.incomplete) {
        // The manifest first: a half-deleted part must not look complete.
        store.delete(&format!("{dir}/{PART_MANIFEST}"))?;
        for k in store.list(&format!("{dir}/"))? {
            store.delete(&k)?;
            stats.files += 1;
        }
        stats.parts += 1;
    }
    for k in &plan.shared {
        store.delete(k)?;
        stats.files += 1;
    }
    Ok(stats)
}

/// Work for the uploader thread.
pub enum UploadJob {
    Part {
        local: LocalSnapshot,
        manifest: Box<PartManifest>,
        /// Also copy it into this savepoint.
        savepoint: Option<String>,
    },
    Gc {
        scope: BTreeSet<u32>,
        current: BTreeSet<u32>,
        referenced: BTreeSet<String>,
    },
}

/// What the uploader reports back.
pub enum UploadDone {
    Part {
        /// URL of the checkpoint part's manifest.
        url: String,
        manifest: Box<PartManifest>,
        stats: UploadStats,
        /// URL of the savepoint part's manifest, when one was asked for.
        /// The savepoint (id) this part was also copied for, and the copy's location.
        savepoint_part: Option<(String, std::result::Result<String, String>)>,
    },
    Gc(std::result::Result<GcStats, String>),
}

/// The uploader thread: uploads parts one at a time, retrying with backoff while the store is
/// unavailable (the worker keeps processing and committing meanwhile; its committed metadata
/// keeps naming the previous part). An uploaded part stays on local disk as the kept
/// snapshot (`state::local`) until the next one replaces it.
pub struct Uploader {
    tx: Option<Sender<UploadJob>>,
    pub done: Receiver<UploadDone>,
    busy: Arc<std::sync::atomic::AtomicBool>,
    cancel: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub struct UploaderConfig {
    pub checkpoints: Box<dyn ObjectStore>,
    pub savepoints: Box<dyn ObjectStore>,
    /// When the savepoint store lies inside the checkpoint store: its key prefix there.
    pub savepoint_prefix_in_checkpoints: Option<String>,
    pub known: HashMap<String, String>,
    pub run_id: String,
    pub retained: usize,
    pub scratch: PathBuf,
}

impl Uploader {
    pub fn spawn(cfg: UploaderConfig) -> Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded::<UploadJob>();
        let (done_tx, done) = crossbeam_channel::unbounded();
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (b, c) = (busy.clone(), cancel.clone());
        let thread = std::thread::Builder::new()
            .name("riffle-uploader".into())
            .spawn(move || run_uploader(cfg, rx, done_tx, b, &c))
            .map_err(|e| Error::Io {
                path: PathBuf::from("riffle-uploader"),
                source: e,
            })?;
        Ok(Self {
            tx: Some(tx),
            done,
            busy,
            cancel,
            thread: Some(thread),
        })
    }

    pub fn submit(&self, job: UploadJob) {
        if matches!(job, UploadJob::Part { .. }) {
            self.busy.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send(job);
        }
    }

    /// A part upload is in progress (or queued).
    pub fn busy(&self) -> bool {
        self.busy.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Uploader {
    /// A worker that rewinds starts anew in the same state directory: its old uploader
    /// stops (at its next retry or step) before the new one restores there.
    fn drop(&mut self) {
        self.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `None` once the uploader is cancelled.
fn retrying<T>(
    what: &str,
    cancel: &std::sync::atomic::AtomicBool,
    mut f: impl FnMut() -> Result<T>,
) -> Option<T> {
    let mut pause = Duration::from_millis(200);
    loop {
        if cancel.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        match f() {
            Ok(v) => return Some(v),
            Err(e) => {
                tracing::warn!(step = what, error = %e, retry_in_ms = pause.as_millis() as u64, "snapshot upload failed; retrying");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn run_uploader(
    mut cfg: UploaderConfig,
    rx: Receiver<UploadJob>,
    done: Sender<UploadDone>,
    busy: Arc<std::sync::atomic::AtomicBool>,
    cancel: &std::sync::atomic::AtomicBool,
) {
    for job in rx {
        match job {
            UploadJob::Part {
                local,
                manifest,
                savepoint,
            } => {
                let uploaded = retrying("upload part", cancel, || {
                    upload_part(
                        cfg.checkpoints.as_ref(),
                        &local,
                        &mut cfg.known,
                        &cfg.run_id,
                        (*manifest).clone(),
                    )
                });
                let Some((key, manifest, stats)) = uploaded else {
                    let _ = std::fs::remove_dir_all(&local.dir);
                    return;
                };
                let url = cfg.checkpoints.location(&key);
                let savepoint_part = savepoint.map(|id| {
                    let started = Instant::now();
                    let id_for_answer = id.clone();
                    let attempt = || {
                        copy_to_savepoint(
                            cfg.checkpoints.as_ref(),
                            cfg.savepoints.as_ref(),
                            cfg.savepoint_prefix_in_checkpoints.as_deref(),
                            &manifest,
                            &id,
                            &cfg.scratch,
                        )
                        .map(|k| cfg.savepoints.location(&k))
                    };
                    // A savepoint is awaited by its caller: retry for a bounded time.
                    let copied = loop {
                        match attempt() {
                            Ok(url) => break Ok(url),
                            Err(e)
                                if started.elapsed() < Duration::from_secs(90)
                                    && !cancel.load(std::sync::atomic::Ordering::SeqCst) =>
                            {
                                tracing::warn!(savepoint = %id, error = %e, "savepoint copy failed; retrying");
                                std::thread::sleep(Duration::from_secs(1));
                            }
                            Err(e) => break Err(e.to_string()),
                        }
                    };
                    (id_for_answer, copied)
                });
                // The part exists in the store (its manifest is written): keep the cut for a
                // restart of this worker, which restores it if its commit names this URL.
                let dir = local.dir.clone();
                let identity = crate::state::local::identity(&url, manifest.created_at_ms);
                if let Err(e) = crate::state::keep_local(local, &identity, &manifest.files) {
                    tracing::warn!(part = %url, error = %e, "could not keep the part locally");
                    let _ = std::fs::remove_dir_all(&dir);
                }
                busy.store(false, std::sync::atomic::Ordering::SeqCst);
                if done
                    .send(UploadDone::Part {
                        url,
                        manifest: Box::new(manifest),
                        stats,
                        savepoint_part,
                    })
                    .is_err()
                {
                    return;
                }
            }
            UploadJob::Gc {
                scope,
                current,
                referenced,
            } => {
                let r = collect_garbage(
                    cfg.checkpoints.as_ref(),
                    &scope,
                    &current,
                    &referenced,
                    cfg.retained,
                );
                if let Ok(s) = &r {
                    // Deleted table files are no longer in the store.
                    if s.files > 0 {
                        let live: BTreeSet<String> = list_parts(cfg.checkpoints.as_ref())
                            .map(|(c, _)| c.into_iter().flat_map(|p| p.files).collect())
                            .unwrap_or_default();
                        cfg.known.retain(|_, k| live.contains(k));
                    }
                }
                if done
                    .send(UploadDone::Gc(r.map_err(|e| e.to_string())))
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// The files of a part, downloaded into `dest`.
pub fn download_part(loc: &Located, base: &str, files: &[ManifestFile], dest: &Path) -> Result<()> {
    crate::state::download(loc.store.as_ref(), base, files, dest)
}

#[cfg(test)]
mod tests {
    //! Crash points: the checkpoint cycle (upload files, write the manifest, commit the
    //! pointer, collect garbage) is cut at every single store operation; the pointer that is
    //! committed at that moment must always name a part whose files are all in the store and
    //! hold exactly the state it was cut from.
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::state::{StateManager, StateOp};
    use crate::store::{FaultyStore, FileStore};

    /// A file store whose writes fail after the first `budget` ones (a crash mid-way).
    struct Crashing {
        store: FaultyStore<FileStore>,
        budget: Arc<AtomicUsize>,
        used: Arc<AtomicUsize>,
    }

    impl Crashing {
        fn new(root: &Path, budget: usize) -> Self {
            let budget = Arc::new(AtomicUsize::new(budget));
            let used = Arc::new(AtomicUsize::new(0));
            let (b, u) = (budget.clone(), used.clone());
            let store = FaultyStore::new(FileStore::new(root).unwrap(), move |op, _| {
                op.writes() && u.fetch_add(1, Ordering::SeqCst) >= b.load(Ordering::SeqCst)
            });
            Self {
                store,
                budget,
                used,
            }
        }
    }

    fn manifest(seq: u64) -> PartManifest {
        PartManifest {
            job: "t".into(),
            gen: 1,
            worker: 0,
            workers: 1,
            seq,
            key_groups: 4,
            kg_start: 0,
            kg_end: 4,
            created_at_ms: 0,
            self_contained: false,
            savepoint: None,
            files: vec![],
            groups: BTreeMap::new(),
            inputs: vec![],
            item_wm: 0,
            user_wm: 0,
            events_in: seq,
            state_format: crate::state::records::STATE_FORMAT,
        }
    }

    /// The state after cycle `c`: keys k0..k(c*50), values the cycle number.
    fn write_cycle(state: &mut StateManager, c: u64) {
        let ops = (0..c * 50)
            .map(|i| {
                StateOp::Put(
                    crate::state::codec::state_key((i % 4) as u32, b'P', &i.to_be_bytes()),
                    c.to_le_bytes().to_vec(),
                )
            })
            .collect();
        state.apply(ops).unwrap();
    }

    fn restore_and_check(store_root: &Path, pointer: &str, scratch: &Path) {
        let loc = Located {
            store: Box::new(FileStore::new(store_root).unwrap()),
            key: pointer.to_string(),
        };
        let m: PartManifest =
            serde_json::from_slice(&loc.store.get_bytes(&loc.key).expect("pointer's manifest"))
                .unwrap();
        let dir = scratch.join(format!("restore-{}", m.seq));
        let state =
            StateManager::restore_files(&dir, loc.store.as_ref(), "", &m.files, false, None)
                .expect("every file of the committed part is in the store");
        let mut n = 0;
        state
            .for_each(|_, v| {
                assert_eq!(v, m.seq.to_le_bytes(), "state of cycle {}", m.seq);
                n += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(n, m.seq * 50);
    }

    /// One checkpoint cycle against `store`: cut, upload, (commit the pointer), collect.
    /// Returns the number of store operations it performed, or where it crashed.
    fn cycle(
        store: &dyn ObjectStore,
        state: &mut StateManager,
        known: &mut HashMap<String, String>,
        c: u64,
        pointer: &mut Option<String>,
    ) -> std::result::Result<(), ()> {
        write_cycle(state, c);
        let local = state.cut(&format!("snap-{c}")).unwrap();
        let (key, _, _) = upload_part(store, &local, known, "run", manifest(c)).map_err(|_| ())?;
        *pointer = Some(key); // the Kafka commit of the new pointer
        let referenced: BTreeSet<String> = pointer
            .iter()
            .map(|k| k.trim_end_matches(&format!("/{PART_MANIFEST}")).to_string())
            .collect();
        collect_garbage(store, &[0].into(), &[0].into(), &referenced, 1).map_err(|_| ())?;
        Ok(())
    }

    #[test]
    fn every_crash_point_leaves_the_committed_part_restorable() {
        let scratch = tempfile::tempdir().unwrap();
        // Count the operations of an uninterrupted run of three cycles.
        let total = {
            let root = scratch.path().join("count");
            let c = Crashing::new(&root, usize::MAX);
            let store = &c.store;
            let mut state = StateManager::create(&scratch.path().join("count-state")).unwrap();
            let mut known = HashMap::new();
            let mut pointer = None;
            for c in 1..=3 {
                cycle(store, &mut state, &mut known, c, &mut pointer).unwrap();
            }
            c.used.load(Ordering::SeqCst)
        };
        assert!(total > 10, "{total} operations");
        for crash_at in 0..=total {
            let root = scratch.path().join(format!("store-{crash_at}"));
            let crashing = Crashing::new(&root, crash_at);
            let store = &crashing.store;
            let mut state =
                StateManager::create(&scratch.path().join(format!("state-{crash_at}"))).unwrap();
            let mut known = HashMap::new();
            let mut pointer: Option<String> = None;
            for c in 1..=3 {
                if cycle(store, &mut state, &mut known, c, &mut pointer).is_err() {
                    break;
                }
            }
            // After the crash: the committed pointer (if any) must restore exactly.
            if let Some(p) = &pointer {
                restore_and_check(&root, p, scratch.path());
            }
            // A restarted worker goes on from there: its next cycles and collections must
            // keep the pointer's part intact until a newer pointer is committed.
            crashing.budget.store(usize::MAX, Ordering::SeqCst);
            let mut known = HashMap::new(); // a new run uploads what it needs
            for c in 4..=5 {
                cycle(store, &mut state, &mut known, c, &mut pointer).unwrap();
                restore_and_check(&root, pointer.as_ref().unwrap(), scratch.path());
            }
            let (complete, incomplete) = list_parts(store).unwrap();
            assert!(
                incomplete.is_empty(),
                "crash at {crash_at}: leftovers {incomplete:?}"
            );
            assert_eq!(
                complete.len(),
                1,
                "crash at {crash_at}: only the newest is kept"
            );
        }
    }
}
