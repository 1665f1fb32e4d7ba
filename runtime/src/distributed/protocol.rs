//! The commit and recovery protocol of a distributed job: pure types and decisions, with
//! Kafka and the object store at the edges (`kafka.rs`, `snapshot.rs`).
//!
//! **Commit point.** Every `commitInterval` a worker commits one Kafka transaction holding its
//! outputs, its exchange frames, the history appends of its user stage (changelog topic) and,
//! through `send_offsets_to_transaction`, the consumed offsets of every owned input and
//! exchange partition. Each committed offset carries metadata ([`InputMeta`],
//! [`ExchangeMeta`]): the watermark state of the partition and a [`StateRef`] naming the state
//! snapshot (a *part*) the key group's state is rebuilt from.
//!
//! **State = snapshot + logs.** A key group's state after commit C is the part named in C's
//! metadata, plus the history appends in its changelog partition after the part's changelog
//! offset (all of them: the changelog ends with C's), plus the item entries of its exchange
//! partition between the part's exchange offset and C's committed offset (item state is a sum
//! of aligned increments, so replaying the same log positions rebuilds it exactly). Parts are
//! cut at commit boundaries and uploaded off the processing path; the metadata only starts
//! naming a part once its manifest is in the store, so a commit never waits for S3 and a
//! crash at any point leaves the committed metadata naming a complete part.
//!
//! **Garbage collection** deletes a part only when no committed metadata names it and it is
//! not among the newest `retainedCheckpoints` of its worker, manifest first; table files go
//! when no remaining part lists them.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::receiver::PartitionTable;
use crate::checkpoint::ManifestFile;
use crate::dataflow::window::WM_MIN;
use crate::state::codec::{put_i64, put_str, put_u32, Reader};
use crate::{Error, Result};

/// Name of a part's manifest, written last (the part exists iff it does).
pub const PART_MANIFEST: &str = "_part.json";
/// Name of a job-wide savepoint manifest, written once every worker's part is in.
pub const SAVEPOINT_MANIFEST: &str = "_savepoint.json";

const META_VERSION: u8 = 1;
/// Kafka's default `offset.metadata.max.bytes`.
pub const MAX_METADATA_BYTES: usize = 4096;

/// Where a key group's state is rebuilt from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateRef {
    /// URL of the part's manifest; `None`: empty state at the offsets below.
    pub part: Option<String>,
    /// Replay the changelog from here (to its end).
    pub changelog_offset: i64,
    /// Replay the exchange from here (to the committed offset).
    pub exchange_offset: i64,
    /// When above the generation of the part's marker table: replay with an empty table of
    /// this generation (a restore from a savepoint or a fresh start began one there).
    pub table_gen: u32,
    pub table_senders: u32,
}

/// Committed with an input partition's offset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InputMeta {
    pub max_ts: Option<i64>,
    pub idle: bool,
}

/// Committed with an exchange partition's offset (one per key group).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeMeta {
    /// Generation and worker count of the worker that committed.
    pub gen: u32,
    pub workers: u32,
    /// The committing worker's item watermark: this key group's windows up to it are out.
    pub item_wm: i64,
    /// The committing worker's user-stage watermark: every marker it sent is at or below it,
    /// so a successor stamping events at or above it never goes behind a receiver.
    pub user_floor: i64,
    pub table: PartitionTable,
    pub state: StateRef,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD_NO_PAD
}

fn meta_error(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::CorruptState(format!("committed {what} metadata: {detail}"))
}

impl InputMeta {
    pub fn encode(&self) -> String {
        let mut v = vec![META_VERSION];
        put_i64(&mut v, self.max_ts.unwrap_or(i64::MIN));
        v.push(u8::from(self.idle));
        b64().encode(v)
    }

    pub fn decode(s: &str) -> Result<Self> {
        let bytes = b64().decode(s).map_err(|e| meta_error("input", e))?;
        let mut r = Reader::new(&bytes);
        if r.u8()? != META_VERSION {
            return Err(meta_error("input", "unknown version"));
        }
        let ts = r.i64()?;
        Ok(Self {
            max_ts: (ts != i64::MIN).then_some(ts),
            idle: r.u8()? != 0,
        })
    }
}

impl ExchangeMeta {
    pub fn encode(&self) -> Result<String> {
        let mut v = vec![META_VERSION];
        put_u32(&mut v, self.gen);
        put_u32(&mut v, self.workers);
        put_i64(&mut v, self.item_wm);
        put_i64(&mut v, self.user_floor);
        self.table.encode(&mut v);
        put_str(&mut v, self.state.part.as_deref().unwrap_or(""));
        put_i64(&mut v, self.state.changelog_offset);
        put_i64(&mut v, self.state.exchange_offset);
        put_u32(&mut v, self.state.table_gen);
        put_u32(&mut v, self.state.table_senders);
        let s = b64().encode(v);
        if s.len() > MAX_METADATA_BYTES {
            return Err(Error::Config(format!(
                "exchange offset metadata is {} bytes, over Kafka's default \
                 offset.metadata.max.bytes ({MAX_METADATA_BYTES}): too many workers ({}) for \
                 one job",
                s.len(),
                self.table.senders
            )));
        }
        Ok(s)
    }

    pub fn decode(s: &str) -> Result<Self> {
        let bytes = b64().decode(s).map_err(|e| meta_error("exchange", e))?;
        let mut r = Reader::new(&bytes);
        if r.u8()? != META_VERSION {
            return Err(meta_error("exchange", "unknown version"));
        }
        let gen = r.u32()?;
        let workers = r.u32()?;
        let item_wm = r.i64()?;
        let user_floor = r.i64()?;
        let table = PartitionTable::decode(&mut r)?;
        let part = r.str()?;
        Ok(Self {
            gen,
            workers,
            item_wm,
            user_floor,
            table,
            state: StateRef {
                part: (!part.is_empty()).then(|| part.to_string()),
                changelog_offset: r.i64()?,
                exchange_offset: r.i64()?,
                table_gen: r.u32()?,
                table_senders: r.u32()?,
            },
        })
    }
}

/// A key group's position and watermark state inside a part.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupPosition {
    pub changelog_offset: i64,
    pub exchange_offset: i64,
}

/// An input partition's position inside a part (savepoints restore from these).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InputPosition {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub meta: InputMeta,
}

/// One worker's snapshot of its key groups, cut at a commit boundary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartManifest {
    pub job: String,
    pub gen: u32,
    pub worker: u32,
    pub workers: u32,
    pub seq: u64,
    pub key_groups: u32,
    pub kg_start: u32,
    pub kg_end: u32,
    pub created_at_ms: i64,
    /// Keys are relative to the part's own directory (savepoints) or to the store root.
    pub self_contained: bool,
    pub savepoint: Option<String>,
    pub files: Vec<ManifestFile>,
    pub groups: BTreeMap<u32, GroupPosition>,
    pub inputs: Vec<InputPosition>,
    pub item_wm: i64,
    pub user_wm: i64,
    pub events_in: u64,
    /// How the state's values are encoded ([`crate::state::records::STATE_FORMAT`]).
    #[serde(default = "crate::state::records::unrecorded_state_format")]
    pub state_format: u32,
}

/// A job-wide savepoint: every worker's part.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavepointManifest {
    pub id: String,
    pub job: String,
    pub gen: u32,
    pub workers: u32,
    pub key_groups: u32,
    pub created_at_ms: i64,
    /// Part manifest keys, relative to the savepoint's directory.
    pub parts: Vec<String>,
    pub stop: bool,
}

/// Store keys of a worker's checkpoint parts and table files.
pub fn parts_prefix(worker: u32) -> String {
    format!("parts/w{worker:04}/")
}

pub fn part_dir(worker: u32, gen: u32, seq: u64) -> String {
    format!("{}g{gen:08}-{seq:012}", parts_prefix(worker))
}

pub fn shared_prefix(worker: u32) -> String {
    format!("shared/w{worker:04}/")
}

/// A savepoint part's directory, relative to the savepoint store.
pub fn savepoint_part_dir(id: &str, worker: u32) -> String {
    format!("{id}/w{worker:04}")
}

/// `(gen, seq)` of a part directory key, for ordering.
pub fn part_order(dir: &str) -> Option<(u32, u64)> {
    let name = dir.trim_end_matches('/').rsplit('/').next()?;
    let (g, s) = name.strip_prefix('g')?.split_once('-')?;
    Some((g.parse().ok()?, s.parse().ok()?))
}

/// A savepoint id names a directory: keep it simple.
pub fn check_savepoint_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 100
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        || id.starts_with('.')
    {
        return Err(Error::Config(format!(
            "savepoint id {id:?}: use 1–100 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

/// How a worker starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartMode {
    /// Empty state; internal topics are read from their ends (nothing of an earlier run).
    Fresh,
    /// From the committed offsets and the parts their metadata names: crash recovery, and
    /// `lastState` upgrades and rescales.
    Committed,
    /// From a savepoint (the first start of a generation restored from it).
    Savepoint,
}

/// What the caller asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreRequest {
    /// Fresh state on the generation's first start, committed state on later starts
    /// (`--restore none`).
    None,
    /// Committed state if there is any, else fresh (`--restore latest`, the default).
    Latest,
    /// This savepoint on the generation's first start; committed state on later starts.
    Savepoint { gen: u32 },
}

/// Decide how worker of generation `gen` with `workers` workers starts, from the committed
/// metadata of its key groups (`None`: nothing committed for that key group).
pub fn plan_start(
    gen: u32,
    workers: u32,
    request: &RestoreRequest,
    committed: &[Option<ExchangeMeta>],
) -> Result<StartMode> {
    let metas: Vec<&ExchangeMeta> = committed.iter().flatten().collect();
    if let Some(m) = metas.iter().find(|m| m.gen > gen) {
        return Err(Error::Config(format!(
            "generation {} already committed (with {} workers): start this one with \
             --generation greater than {}",
            m.gen, m.workers, m.gen
        )));
    }
    if let Some(m) = metas.iter().find(|m| m.gen == gen && m.workers != workers) {
        return Err(Error::Config(format!(
            "generation {gen} already ran with {} workers: a different worker count needs a \
             new generation (--generation {})",
            m.workers,
            gen + 1
        )));
    }
    let this_gen = metas.iter().filter(|m| m.gen == gen).count();
    if this_gen > 0 && this_gen < committed.len() {
        // A worker commits all of its key groups in every transaction, and ownership is
        // fixed within a generation, so this means another worker count or a bug.
        return Err(Error::CorruptState(format!(
            "{this_gen} of this worker's {} key groups committed in generation {gen}, the \
             others did not",
            committed.len()
        )));
    }
    Ok(match request {
        // A fresh generation's later starts (a restarted worker) resume what it committed.
        RestoreRequest::None if this_gen > 0 => StartMode::Committed,
        RestoreRequest::None => StartMode::Fresh,
        RestoreRequest::Latest if metas.is_empty() => StartMode::Fresh,
        RestoreRequest::Latest => StartMode::Committed,
        RestoreRequest::Savepoint { gen: sp_gen } => {
            if *sp_gen >= gen {
                return Err(Error::Config(format!(
                    "the savepoint was taken in generation {sp_gen}: restore it with \
                     --generation greater than {sp_gen}"
                )));
            }
            if this_gen > 0 {
                StartMode::Committed // restarted after the restore already committed
            } else {
                StartMode::Savepoint
            }
        }
    })
}

/// The worker's user-stage watermark floor and item watermark after a restore from
/// committed metadata: the floor is the highest of its key groups' (so its first markers are
/// at or above every receiver's watermark), the item watermark the lowest.
pub fn restored_watermarks(metas: &[&ExchangeMeta]) -> (i64, i64) {
    let floor = metas.iter().map(|m| m.user_floor).max().unwrap_or(WM_MIN);
    let item = metas.iter().map(|m| m.item_wm).min().unwrap_or(WM_MIN);
    (floor, item)
}

/// Transactional ids of an earlier, larger generation that this worker fences at start (so
/// their open transactions are aborted before it reads the logs they may have written to).
pub fn ids_to_fence(worker: u32, workers: u32, earlier_workers: u32) -> Vec<u32> {
    (workers..earlier_workers)
        .filter(|i| i % workers == worker)
        .collect()
}

/// A part in the store, as garbage collection sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredPart {
    /// The part's directory key (relative to the checkpoint store).
    pub dir: String,
    pub worker: u32,
    /// `(gen, seq)`.
    pub order: (u32, u64),
    /// Store keys of every file it lists.
    pub files: Vec<String>,
}

/// What garbage collection deletes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcPlan {
    /// Part directories to delete (manifest first, then their own files).
    pub parts: Vec<String>,
    /// Table files no remaining part lists.
    pub shared: Vec<String>,
    /// Directories of parts that never completed (no manifest), older than a complete one.
    pub incomplete: Vec<String>,
}

/// Garbage collection of the parts of the workers in `scope`.
///
/// - `complete`: every part with a manifest, of every worker;
/// - `incomplete_dirs`: part directories in scope without a manifest;
/// - `shared`: table files under the scope's shared prefixes;
/// - `referenced`: part directories named by any committed metadata;
/// - `current`: workers of the current generation keep their newest `retained` parts.
pub fn plan_gc(
    scope: &BTreeSet<u32>,
    complete: &[StoredPart],
    incomplete_dirs: &[String],
    shared: &[String],
    referenced: &BTreeSet<String>,
    current: &BTreeSet<u32>,
    retained: usize,
) -> GcPlan {
    let mut keep: BTreeSet<&str> = BTreeSet::new();
    let mut plan = GcPlan::default();
    let mut by_worker: BTreeMap<u32, Vec<&StoredPart>> = BTreeMap::new();
    for p in complete {
        by_worker.entry(p.worker).or_default().push(p);
    }
    for (worker, mut parts) in by_worker {
        parts.sort_by_key(|p| p.order);
        let newest = if current.contains(&worker) {
            parts.len().saturating_sub(retained)
        } else {
            parts.len()
        };
        for (i, p) in parts.iter().enumerate() {
            let kept = !scope.contains(&worker) || i >= newest || referenced.contains(&p.dir);
            if kept {
                keep.insert(p.dir.as_str());
            } else {
                plan.parts.push(p.dir.clone());
            }
        }
    }
    let live: BTreeSet<&str> = complete
        .iter()
        .filter(|p| keep.contains(p.dir.as_str()))
        .flat_map(|p| p.files.iter().map(String::as_str))
        .collect();
    plan.shared = shared
        .iter()
        .filter(|k| !live.contains(k.as_str()))
        .cloned()
        .collect();
    // A directory without a manifest is a crashed upload once a later part of the same
    // worker completed (uploads of one worker are sequential).
    for dir in incomplete_dirs {
        let Some(order) = part_order(dir) else {
            continue;
        };
        let worker_done = complete
            .iter()
            .any(|p| dir.starts_with(&parts_prefix(p.worker)) && p.order > order);
        if worker_done {
            plan.incomplete.push(dir.clone());
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::wire::Marker;

    fn meta(gen: u32, workers: u32) -> ExchangeMeta {
        let mut table = PartitionTable::new(gen, workers);
        table.markers.insert(
            1,
            Marker {
                user_wm: 100,
                source_wm: 90,
                source_idle: true,
            },
        );
        ExchangeMeta {
            gen,
            workers,
            item_wm: 60,
            user_floor: 120,
            table,
            state: StateRef {
                part: Some("s3://b/p/parts/w0001/g00000001-000000000003/_part.json".into()),
                changelog_offset: 7,
                exchange_offset: 9,
                table_gen: 0,
                table_senders: 0,
            },
        }
    }

    #[test]
    fn metadata_round_trips_and_stays_under_kafkas_limit() {
        let m = meta(3, 2);
        assert_eq!(ExchangeMeta::decode(&m.encode().unwrap()).unwrap(), m);
        let i = InputMeta {
            max_ts: Some(5),
            idle: true,
        };
        assert_eq!(InputMeta::decode(&i.encode()).unwrap(), i);
        assert_eq!(
            InputMeta::decode(&InputMeta::default().encode()).unwrap(),
            InputMeta::default()
        );
        assert!(ExchangeMeta::decode("not base64!").is_err());
        let mut big = meta(1, 200);
        for s in 0..200 {
            big.table.markers.insert(
                s,
                Marker {
                    user_wm: 1,
                    source_wm: 1,
                    source_idle: false,
                },
            );
        }
        assert!(big
            .encode()
            .unwrap_err()
            .to_string()
            .contains("offset.metadata.max.bytes"));
    }

    #[test]
    fn start_modes() {
        use RestoreRequest as R;
        use StartMode as M;
        let none: Vec<Option<ExchangeMeta>> = vec![None, None];
        let g1 = vec![Some(meta(1, 2)), Some(meta(1, 2))];
        assert_eq!(plan_start(1, 2, &R::Latest, &none).unwrap(), M::Fresh);
        assert_eq!(plan_start(1, 2, &R::Latest, &g1).unwrap(), M::Committed);
        assert_eq!(plan_start(2, 2, &R::None, &g1).unwrap(), M::Fresh);
        // ... and a restarted worker of that fresh generation resumes its own commits.
        assert_eq!(plan_start(1, 2, &R::None, &g1).unwrap(), M::Committed);
        // lastState rescale: generation 2 with 3 workers restores generation 1's state.
        assert_eq!(plan_start(2, 3, &R::Latest, &g1).unwrap(), M::Committed);
        // A savepoint restore is the first start of its generation, later starts resume.
        assert_eq!(
            plan_start(2, 3, &R::Savepoint { gen: 1 }, &g1).unwrap(),
            M::Savepoint
        );
        let g2 = vec![Some(meta(2, 3)), Some(meta(2, 3))];
        assert_eq!(
            plan_start(2, 3, &R::Savepoint { gen: 1 }, &g2).unwrap(),
            M::Committed
        );
        for (gen, workers, req, committed, needle) in [
            (1, 2, R::Latest, g2.clone(), "already committed"),
            (2, 2, R::Latest, g2.clone(), "already ran with 3 workers"),
            (2, 3, R::Savepoint { gen: 2 }, g1.clone(), "greater than 2"),
            (
                2,
                3,
                R::Latest,
                vec![Some(meta(2, 3)), Some(meta(1, 2))],
                "the others did not",
            ),
        ] {
            let err = plan_start(gen, workers, &req, &committed)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn fencing_covers_every_index_of_a_larger_generation_once() {
        let mut all: Vec<u32> = (0..2).flat_map(|w| ids_to_fence(w, 2, 5)).collect();
        all.sort();
        assert_eq!(all, [2, 3, 4]);
        assert!(ids_to_fence(0, 3, 2).is_empty());
    }

    fn part(worker: u32, gen: u32, seq: u64, files: &[&str]) -> StoredPart {
        StoredPart {
            dir: part_dir(worker, gen, seq),
            worker,
            order: (gen, seq),
            files: files.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn gc_keeps_referenced_and_newest_parts_and_their_files() {
        let parts = vec![
            part(0, 1, 1, &["shared/w0000/a.sst"]),
            part(0, 1, 2, &["shared/w0000/a.sst", "shared/w0000/b.sst"]),
            part(0, 1, 3, &["shared/w0000/c.sst"]),
            part(1, 1, 5, &["shared/w0001/x.sst"]),
            // a worker of an earlier, larger generation
            part(2, 1, 9, &["shared/w0002/y.sst"]),
        ];
        let shared: Vec<String> = [
            "shared/w0000/a.sst",
            "shared/w0000/b.sst",
            "shared/w0000/c.sst",
            "shared/w0000/orphan.sst",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let referenced: BTreeSet<String> = [part_dir(0, 1, 1)].into();
        let current: BTreeSet<u32> = [0, 1].into();
        let plan = plan_gc(
            &[0].into(),
            &parts,
            &[part_dir(0, 1, 0), part_dir(0, 1, 4)],
            &shared,
            &referenced,
            &current,
            1,
        );
        assert_eq!(plan.parts, [part_dir(0, 1, 2)], "1 referenced, 3 newest");
        assert_eq!(
            plan.shared,
            ["shared/w0000/b.sst", "shared/w0000/orphan.sst"]
        );
        assert_eq!(
            plan.incomplete,
            [part_dir(0, 1, 0)],
            "seq 4 may still be uploading"
        );
        // Worker 0 also collects for the indexes of a larger earlier generation.
        let plan = plan_gc(
            &[0, 2].into(),
            &parts,
            &[],
            &["shared/w0002/y.sst".to_string()],
            &referenced,
            &current,
            1,
        );
        assert!(plan.parts.contains(&part_dir(2, 1, 9)));
        assert_eq!(plan.shared, ["shared/w0002/y.sst"]);
    }

    #[test]
    fn part_directories_order_and_savepoint_ids() {
        assert_eq!(part_order(&part_dir(3, 2, 17)), Some((2, 17)));
        assert_eq!(part_order("parts/w0001/junk"), None);
        assert!(check_savepoint_id("sp-2026-11-24.1").is_ok());
        assert!(check_savepoint_id("../x").is_err());
        assert!(check_savepoint_id("").is_err());
    }
}
