//! The checkpoint protocol. Pure types and decisions live here; object I/O goes through
//! [`crate::store::ObjectStore`] at the edge.
//!
//! Layout in a store:
//! - `shared/<run>-<file>.sst`: immutable RocksDB table files, uploaded once and shared by
//!   every checkpoint that references them (incremental checkpoints);
//! - `chk-<id>/`: the checkpoint's small RocksDB metadata files and `_manifest.json`, written
//!   last: a checkpoint exists iff its manifest does (the commit point);
//! - `savepoints/sp-<id>/`: self-contained copies (every file inside), never garbage-collected.
//!
//! [`protocol`] holds the order of a checkpoint's steps and the epoch bookkeeping.

pub mod protocol;

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::source::SourcePosition;
use crate::watermark::WatermarkTracker;

pub const MANIFEST: &str = "_manifest.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestFile {
    /// Name in the RocksDB directory.
    pub name: String,
    /// Key in the store, relative to the store root (or to the savepoint directory when the
    /// manifest is self-contained).
    pub key: String,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub id: u64,
    pub job_name: String,
    pub created_at_ms: i64,
    /// Keys are relative to the manifest's own directory (a savepoint).
    pub self_contained: bool,
    pub key_groups: u32,
    pub parallelism: usize,
    pub files: Vec<ManifestFile>,
    pub sources: Vec<SourcePosition>,
    pub watermark: WatermarkTracker,
    pub next_seq: u64,
    /// Output epochs up to this one are covered (sink position).
    pub sink_epoch: u64,
    pub events_in: u64,
    /// How the state's values are encoded ([`crate::state::records::STATE_FORMAT`]).
    #[serde(default = "crate::state::records::unrecorded_state_format")]
    pub state_format: u32,
}

pub fn checkpoint_dir(id: u64) -> String {
    format!("chk-{id:010}")
}

pub fn savepoint_dir(id: u64) -> String {
    format!("savepoints/sp-{id:010}")
}

pub fn manifest_key(id: u64) -> String {
    format!("{}/{MANIFEST}", checkpoint_dir(id))
}

/// Completed checkpoint ids among store keys (those whose manifest exists).
pub fn completed_ids(keys: &[String]) -> BTreeSet<u64> {
    keys.iter()
        .filter_map(|k| {
            k.strip_prefix("chk-")?
                .strip_suffix(&format!("/{MANIFEST}"))?
                .parse()
                .ok()
        })
        .collect()
}

/// Which local files to upload for checkpoint `id`, and the manifest's file list.
/// Table files (`*.sst`) are immutable: one already in the store is referenced, not copied.
pub fn plan_files(
    id: u64,
    run_id: &str,
    local: &[(String, u64)],
    known: &HashMap<String, String>,
) -> (Vec<ManifestFile>, Vec<ManifestFile>) {
    plan_upload(
        local,
        known,
        &format!("shared/{run_id}-"),
        &checkpoint_dir(id),
    )
}

/// Which local files to upload and the manifest's file list: table files (`*.sst`, immutable)
/// not in `known` go to `<shared_prefix><name>` and are shared by later checkpoints; the
/// small metadata files go to `<own_dir>/<name>`.
pub fn plan_upload(
    local: &[(String, u64)],
    known: &HashMap<String, String>,
    shared_prefix: &str,
    own_dir: &str,
) -> (Vec<ManifestFile>, Vec<ManifestFile>) {
    let mut uploads = Vec::new();
    let mut files = Vec::new();
    for (name, size) in local {
        let entry = if name.ends_with(".sst") {
            match known.get(name) {
                Some(key) => ManifestFile {
                    name: name.clone(),
                    key: key.clone(),
                    size: *size,
                },
                None => {
                    let f = ManifestFile {
                        name: name.clone(),
                        key: format!("{shared_prefix}{name}"),
                        size: *size,
                    };
                    uploads.push(f.clone());
                    f
                }
            }
        } else {
            let f = ManifestFile {
                name: name.clone(),
                key: format!("{own_dir}/{name}"),
                size: *size,
            };
            uploads.push(f.clone());
            f
        };
        files.push(entry);
    }
    (uploads, files)
}

/// Checkpoints to delete so that only the newest `retained` remain.
pub fn expired(ids: &BTreeSet<u64>, retained: usize) -> Vec<u64> {
    let n = ids.len().saturating_sub(retained);
    ids.iter().take(n).copied().collect()
}

/// Shared files no retained manifest references.
pub fn garbage<'a>(shared: &'a [String], retained: &[Manifest]) -> Vec<&'a String> {
    let live: HashSet<&str> = retained
        .iter()
        .flat_map(|m| m.files.iter().map(|f| f.key.as_str()))
        .collect();
    shared
        .iter()
        .filter(|k| k.starts_with("shared/") && !live.contains(k.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_plan_reuses_known_table_files() {
        let local = vec![
            ("000007.sst".to_string(), 100),
            ("000009.sst".to_string(), 50),
            ("MANIFEST-000005".to_string(), 10),
            ("CURRENT".to_string(), 16),
        ];
        let known = HashMap::from([(
            "000007.sst".to_string(),
            "shared/old-000007.sst".to_string(),
        )]);
        let (uploads, files) = plan_files(3, "run", &local, &known);
        let up: Vec<&str> = uploads.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(
            up,
            [
                "shared/run-000009.sst",
                "chk-0000000003/MANIFEST-000005",
                "chk-0000000003/CURRENT"
            ]
        );
        assert_eq!(files[0].key, "shared/old-000007.sst");
        assert_eq!(files.len(), 4);
    }

    #[test]
    fn retention_and_garbage() {
        let ids: BTreeSet<u64> = [1, 2, 3, 4, 5].into();
        assert_eq!(expired(&ids, 3), [1, 2]);
        assert!(expired(&ids, 10).is_empty());
        let keys = vec![
            "chk-0000000004/_manifest.json".to_string(),
            "chk-0000000004/CURRENT".to_string(),
            "chk-0000000005/_manifest.json".to_string(),
        ];
        assert_eq!(completed_ids(&keys), [4, 5].into());
        let m = |keys: &[&str]| Manifest {
            id: 1,
            job_name: String::new(),
            created_at_ms: 0,
            self_contained: false,
            key_groups: 1,
            parallelism: 1,
            files: keys
                .iter()
                .map(|k| ManifestFile {
                    name: String::new(),
                    key: k.to_string(),
                    size: 0,
                })
                .collect(),
            sources: vec![],
            watermark: WatermarkTracker::new(1, 0),
            next_seq: 0,
            sink_epoch: 0,
            events_in: 0,
            state_format: crate::state::records::STATE_FORMAT,
        };
        let shared = vec![
            "shared/a".to_string(),
            "shared/b".to_string(),
            "shared/c".to_string(),
        ];
        let g = garbage(&shared, &[m(&["shared/a"]), m(&["shared/c"])]);
        assert_eq!(g, [&"shared/b".to_string()]);

        // A manifest from before manifests recorded the state format holds format 1, which
        // this build refuses to restore, with the reason.
        let mut json = serde_json::to_value(m(&[])).unwrap();
        assert_eq!(json["stateFormat"], crate::state::records::STATE_FORMAT);
        let recorded: Manifest = serde_json::from_value(json.clone()).unwrap();
        assert!(crate::state::records::check_state_format(recorded.state_format, "x").is_ok());
        json.as_object_mut().unwrap().remove("stateFormat");
        let old: Manifest = serde_json::from_value(json).unwrap();
        assert_eq!(old.state_format, 1);
        let err = crate::state::records::check_state_format(old.state_format, "checkpoint 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("checkpoint 1 holds state format 1"), "{err}");
    }
}
