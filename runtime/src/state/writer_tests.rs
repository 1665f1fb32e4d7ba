//! A checkpoint's write-back through ingested table files leaves the database exactly as
//! applying the same ops in order through the memtable does.

use super::{BatchWriter, StateManager, StateOp};
use crate::source::generator::splitmix;

/// Deterministic draws: the generator's counter-based hash.
struct Draws(u64);

impl Draws {
    fn below(&mut self, n: u64) -> u64 {
        self.0 += 1;
        splitmix(self.0) % n
    }
}

/// Keys in `i`'s order; `prefix` longer than the eight bytes the writer sorts by inline
/// makes every comparison go to the whole keys.
fn key(prefix: &str, i: u64) -> Vec<u8> {
    format!("{prefix}{i:04}").into_bytes()
}

fn contents(state: &StateManager) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut all = Vec::new();
    state
        .for_each(|k, v| {
            all.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
    all
}

#[test]
fn ingested_write_back_equals_applying_the_ops_in_order() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut through_memtable = StateManager::create(a_dir.path()).unwrap();
    let mut ingested = StateManager::create(b_dir.path()).unwrap();
    let mut rng = Draws(0);
    for round in 0..6u64 {
        let prefix = if round % 2 == 0 {
            "k"
        } else {
            "a-shared-head/"
        };
        let key = |i| key(prefix, i);
        // Puts, deletes and range deletes over a small key space, so that keys repeat
        // within a round (the last op wins) and across rounds (newer files win).
        let ops: Vec<StateOp> = (0..3_000)
            .map(|i| match rng.below(20) {
                0 => {
                    let from = rng.below(1_000);
                    StateOp::DeleteRange(key(from), key(from + rng.below(50)))
                }
                1..=4 => StateOp::Delete(key(rng.below(1_000))),
                _ => StateOp::Put(
                    key(rng.below(1_000)),
                    format!("{round}-{i}-{}", "v".repeat(rng.below(200) as usize)).into_bytes(),
                ),
            })
            .collect();
        let mut a = through_memtable.writer();
        let mut b: BatchWriter = ingested.checkpoint_writer();
        // Several table files per round, with range deletes among their ops.
        b.ingest_bytes = 16 << 10;
        for op in ops {
            a.push(op.clone()).unwrap();
            b.push(op).unwrap();
        }
        a.finish().unwrap();
        b.finish().unwrap();
        let expected = contents(&through_memtable);
        assert!(!expected.is_empty(), "round {round} left keys to compare");
        assert_eq!(contents(&ingested), expected, "round {round}");
        // A cut of the ingested state holds it, and nothing is left behind to ingest.
        through_memtable.cut(&format!("snap-{round}")).unwrap();
        let snap = ingested.cut(&format!("snap-{round}")).unwrap();
        assert!(snap.files.iter().any(|(name, _)| name.ends_with(".sst")));
        let leftover = std::fs::read_dir(b_dir.path().join("ingest"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(leftover, 0, "round {round}: files left to ingest");
    }
}
