//! Local recovery: the last snapshot whose upload committed stays on local disk, so that a
//! restart on the same machine (same state directory) opens it instead of downloading it.
//!
//! In the state directory: `kept/`, a RocksDB checkpoint (hard links to the database's
//! files, so it costs little disk until the database compacts them away), and `kept.json`,
//! its marker: which checkpoint it is and its files. The marker is written last, only after
//! the checkpoint committed, and removed first when the snapshot is replaced, so a crash at
//! any point leaves either no marker or one that describes `kept/` completely. A restore uses
//! the snapshot only if the marker names the checkpoint being restored, lists exactly the
//! manifest's files, and `kept/` holds exactly those names and sizes.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::LocalSnapshot;
use crate::checkpoint::ManifestFile;
use crate::error::IoContext;
use crate::Result;

const KEPT: &str = "kept";
const MARKER: &str = "kept.json";
const MARKER_TMP: &str = "kept.json.tmp";

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Marker {
    identity: String,
    files: Vec<ManifestFile>,
}

/// What identifies a committed checkpoint (or part): its location and creation time, so a
/// store that was emptied and refilled with the same ids still never matches an old snapshot.
pub fn identity(location: &str, created_at_ms: i64) -> String {
    format!("{location}@{created_at_ms}")
}

/// The kept snapshot or its marker (left in place by a restore's wipe).
pub(crate) fn is_kept(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == KEPT || n == MARKER)
}

/// Keep `snap`, cut in its state directory and committed as `identity` with `files`, as the
/// local snapshot, replacing the previous one.
pub fn keep(snap: LocalSnapshot, identity: &str, files: &[ManifestFile]) -> Result<()> {
    let dir = snap
        .dir
        .parent()
        .ok_or_else(|| crate::Error::Config(format!("{}: no parent", snap.dir.display())))?
        .to_path_buf();
    // The old marker goes first: until the new one is written nothing matches.
    discard(&dir)?;
    let kept = dir.join(KEPT);
    fs::rename(&snap.dir, &kept).at(&kept)?;
    let marker = Marker {
        identity: identity.to_string(),
        files: sorted(files),
    };
    let tmp = dir.join(MARKER_TMP);
    let mut f = fs::File::create(&tmp).at(&tmp)?;
    f.write_all(&serde_json::to_vec(&marker)?).at(&tmp)?;
    f.sync_all().at(&tmp)?;
    let path = dir.join(MARKER);
    fs::rename(&tmp, &path).at(&path)?;
    fs::File::open(&dir).and_then(|d| d.sync_all()).at(&dir)?;
    tracing::debug!(identity, files = files.len(), "local snapshot kept");
    Ok(())
}

/// The kept snapshot's directory, if it is `identity`'s and holds exactly `files`.
pub fn find(dir: &Path, identity: &str, files: &[ManifestFile]) -> Option<PathBuf> {
    match check(dir, identity, files) {
        Ok(()) => Some(dir.join(KEPT)),
        Err(reason) => {
            tracing::info!(dir = %dir.display(), reason, "no usable local snapshot");
            None
        }
    }
}

fn check(dir: &Path, identity: &str, files: &[ManifestFile]) -> std::result::Result<(), String> {
    let bytes = match fs::read(dir.join(MARKER)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("no marker".into()),
        Err(e) => return Err(format!("marker unreadable: {e}")),
    };
    let marker: Marker =
        serde_json::from_slice(&bytes).map_err(|e| format!("marker unreadable: {e}"))?;
    if marker.identity != identity {
        return Err(format!("kept {}, restoring {identity}", marker.identity));
    }
    let want = sorted(files);
    if marker.files != want {
        return Err("the marker lists other files than the manifest".into());
    }
    let kept = dir.join(KEPT);
    let mut on_disk = Vec::new();
    let entries = fs::read_dir(&kept).map_err(|e| format!("{}: {e}", kept.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| e.to_string())?;
        let size = entry.metadata().map_err(|e| e.to_string())?.len();
        on_disk.push((entry.file_name().to_string_lossy().into_owned(), size));
    }
    on_disk.sort();
    let listed: Vec<(String, u64)> = want.iter().map(|f| (f.name.clone(), f.size)).collect();
    if on_disk != listed {
        return Err("the kept files differ from the manifest's (names or sizes)".into());
    }
    Ok(())
}

/// Make `db` a working copy of the kept snapshot: table files (immutable) hard-linked, the
/// small metadata files copied, so the database opened there never changes the snapshot.
pub fn link_into(kept: &Path, db: &Path) -> Result<u64> {
    fs::create_dir_all(db).at(db)?;
    let mut bytes = 0;
    for entry in fs::read_dir(kept).at(kept)? {
        let from = entry.at(kept)?.path();
        let Some(name) = from.file_name() else {
            continue;
        };
        let to = db.join(name);
        let linked = name.to_string_lossy().ends_with(".sst") && fs::hard_link(&from, &to).is_ok();
        if !linked {
            fs::copy(&from, &to).at(&to)?;
        }
        bytes += fs::metadata(&to).at(&to)?.len();
    }
    Ok(bytes)
}

/// Remove the kept snapshot (marker first).
pub fn discard(dir: &Path) -> Result<()> {
    for name in [MARKER, MARKER_TMP] {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).at(&path),
            _ => {}
        }
    }
    let kept = dir.join(KEPT);
    if kept.exists() {
        fs::remove_dir_all(&kept).at(&kept)?;
    }
    Ok(())
}

fn sorted(files: &[ManifestFile]) -> Vec<ManifestFile> {
    let mut v = files.to_vec();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::state::{codec, upload, StateManager, StateOp};
    use crate::store::{FaultyStore, FileStore, ObjectStore, Op};

    struct Setup {
        _tmp: tempfile::TempDir,
        state_dir: PathBuf,
        store_root: PathBuf,
        store: FileStore,
        /// The files of the committed checkpoint 1 and its identity.
        files: Vec<ManifestFile>,
        identity: String,
    }

    fn put(state: &StateManager, n: u64, value: u8) {
        let ops = (0..n)
            .map(|i| {
                StateOp::Put(
                    codec::state_key(0, b'P', &i.to_be_bytes()),
                    vec![value; 100],
                )
            })
            .collect();
        state.apply(ops).unwrap();
    }

    /// A state of 1000 keys checkpointed as 1 (uploaded, kept), then changed further.
    fn setup() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let state_dir = tmp.path().join("state");
        let store_root = tmp.path().join("store");
        let store = FileStore::new(&store_root).unwrap();
        let mut state = StateManager::create(&state_dir).unwrap();
        put(&state, 1000, 1);
        let snap = state.cut("snap-1").unwrap();
        let mut known = HashMap::new();
        let up = upload(&store, &snap, 1, "run", &mut known).unwrap();
        let identity = identity(&store.location("chk-0000000001"), 42);
        keep(snap, &identity, &up.files).unwrap();
        // The database moves on after the checkpoint (and is lost with the process).
        put(&state, 2000, 2);
        drop(state);
        Setup {
            _tmp: tmp,
            state_dir,
            store_root,
            store,
            files: up.files,
            identity,
        }
    }

    /// The store with every download failing: a restore that needs one fails.
    fn no_downloads(s: &Setup) -> FaultyStore<FileStore> {
        FaultyStore::new(FileStore::new(&s.store_root).unwrap(), |op, _| {
            op == Op::Get
        })
    }

    fn values(state: &StateManager) -> (u64, Vec<u8>) {
        let mut n = 0;
        let mut seen = Vec::new();
        state
            .for_each(|_, v| {
                n += 1;
                if !seen.contains(&v[0]) {
                    seen.push(v[0]);
                }
                Ok(())
            })
            .unwrap();
        (n, seen)
    }

    #[test]
    fn a_matching_kept_snapshot_is_opened_without_downloading() {
        let s = setup();
        let store = no_downloads(&s);
        let state = StateManager::restore_files(
            &s.state_dir,
            &store,
            "",
            &s.files,
            true,
            Some(&s.identity),
        )
        .unwrap();
        let r = state.restore_stats();
        assert!(r.reused_local);
        assert_eq!(r.downloaded_bytes, 0);
        // Exactly checkpoint 1's state, not what the database held after it.
        assert_eq!(values(&state), (1000, vec![1]));
        // Its table files are in the store: the next checkpoint does not upload them again.
        let ssts: Vec<&ManifestFile> = s
            .files
            .iter()
            .filter(|f| f.name.ends_with(".sst"))
            .collect();
        assert!(!ssts.is_empty());
        for f in ssts {
            assert_eq!(state.known_files().get(&f.name), Some(&f.key));
        }
        // The snapshot stays usable: a second crash before the next checkpoint reuses it too,
        // even after the first restore wrote to its working copy.
        put(&state, 10, 9);
        drop(state);
        assert!(s.state_dir.join(KEPT).exists());
        let again = StateManager::restore_files(
            &s.state_dir,
            &store,
            "",
            &s.files,
            true,
            Some(&s.identity),
        )
        .unwrap();
        assert!(again.restore_stats().reused_local);
        assert_eq!(values(&again), (1000, vec![1]));
    }

    #[test]
    fn another_checkpoints_identity_downloads() {
        let s = setup();
        let other = identity(&s.store.location("chk-0000000001"), 43);
        assert!(StateManager::restore_files(
            &s.state_dir,
            &no_downloads(&s),
            "",
            &s.files,
            true,
            Some(&other)
        )
        .is_err());
        let state =
            StateManager::restore_files(&s.state_dir, &s.store, "", &s.files, true, Some(&other))
                .unwrap();
        let r = state.restore_stats();
        assert!(!r.reused_local);
        assert_eq!(
            r.downloaded_bytes,
            s.files.iter().map(|f| f.size).sum::<u64>()
        );
        assert_eq!(values(&state), (1000, vec![1]));
        // A snapshot that did not match is gone.
        assert!(!s.state_dir.join(KEPT).exists());
        assert!(!s.state_dir.join(MARKER).exists());
    }

    #[test]
    fn other_files_do_not_match() {
        let s = setup();
        let mut files = s.files.clone();
        files.pop();
        assert!(find(&s.state_dir, &s.identity, &files).is_none());
        let mut files = s.files.clone();
        files[0].size += 1;
        assert!(find(&s.state_dir, &s.identity, &files).is_none());
        let mut files = s.files.clone();
        files[0].key.push('x');
        assert!(find(&s.state_dir, &s.identity, &files).is_none());
        assert!(find(&s.state_dir, &s.identity, &s.files).is_some());
    }

    #[test]
    fn no_marker_no_reuse() {
        let s = setup();
        // A crash between moving the cut into place and writing its marker.
        fs::remove_file(s.state_dir.join(MARKER)).unwrap();
        assert!(s.state_dir.join(KEPT).exists());
        assert!(find(&s.state_dir, &s.identity, &s.files).is_none());
        let state = StateManager::restore_files(
            &s.state_dir,
            &s.store,
            "",
            &s.files,
            true,
            Some(&s.identity),
        )
        .unwrap();
        assert!(!state.restore_stats().reused_local);
        assert_eq!(values(&state), (1000, vec![1]));
    }

    #[test]
    fn crash_leftovers_never_match() {
        let s = setup();
        let kept = s.state_dir.join(KEPT);
        // A half-written marker (a crash mid-write leaves only the temporary file, but a torn
        // one must not match either).
        let marker = fs::read(s.state_dir.join(MARKER)).unwrap();
        fs::write(s.state_dir.join(MARKER), &marker[..marker.len() / 2]).unwrap();
        assert!(find(&s.state_dir, &s.identity, &s.files).is_none());
        fs::write(s.state_dir.join(MARKER), &marker).unwrap();
        // A file of the snapshot truncated or missing.
        let sst = s.files.iter().find(|f| f.name.ends_with(".sst")).unwrap();
        let data = fs::read(kept.join(&sst.name)).unwrap();
        fs::remove_file(kept.join(&sst.name)).unwrap();
        assert!(find(&s.state_dir, &s.identity, &s.files).is_none());
        fs::write(kept.join(&sst.name), &data[..data.len() - 1]).unwrap();
        assert!(find(&s.state_dir, &s.identity, &s.files).is_none());
        fs::write(kept.join(&sst.name), &data).unwrap();
        // An extra file (a cut that was still being made into the directory).
        fs::write(kept.join("000999.sst"), b"x").unwrap();
        assert!(find(&s.state_dir, &s.identity, &s.files).is_none());
        fs::remove_file(kept.join("000999.sst")).unwrap();
        assert!(find(&s.state_dir, &s.identity, &s.files).is_some());

        // A cut a crash interrupted (never moved into place, no marker) is wiped by the
        // restore and the kept snapshot still serves.
        let mut state = StateManager::create(&s._tmp.path().join("other")).unwrap();
        put(&state, 10, 3);
        let half = state.cut("snap-2").unwrap();
        let leftover = s.state_dir.join("snap-2");
        fs::rename(&half.dir, &leftover).unwrap();
        let restored = StateManager::restore_files(
            &s.state_dir,
            &no_downloads(&s),
            "",
            &s.files,
            true,
            Some(&s.identity),
        )
        .unwrap();
        assert!(restored.restore_stats().reused_local);
        assert!(!leftover.exists());
        assert_eq!(values(&restored), (1000, vec![1]));
    }

    #[test]
    fn keeping_a_newer_snapshot_replaces_the_old_one() {
        let s = setup();
        let mut state = StateManager::restore_files(
            &s.state_dir,
            &s.store,
            "",
            &s.files,
            true,
            Some(&s.identity),
        )
        .unwrap();
        put(&state, 1500, 5);
        let snap = state.cut("snap-2").unwrap();
        let mut known = state.known_files().clone();
        let up = upload(&s.store, &snap, 2, state.run_id(), &mut known).unwrap();
        // Incremental: checkpoint 1's table files were not uploaded again.
        assert!(up.uploaded_bytes < up.total_bytes);
        let id2 = identity(&s.store.location("chk-0000000002"), 44);
        keep(snap, &id2, &up.files).unwrap();
        assert!(find(&s.state_dir, &s.identity, &s.files).is_none());
        assert!(find(&s.state_dir, &id2, &up.files).is_some());
        assert!(!s.state_dir.join("snap-2").exists());
        drop(state);
        let state = StateManager::restore_files(
            &s.state_dir,
            &no_downloads(&s),
            "",
            &up.files,
            true,
            Some(&id2),
        )
        .unwrap();
        assert_eq!(values(&state), (1500, vec![5]));
    }
}
