//! The local engine's checkpoint protocol, as pure decisions: the order of a checkpoint's
//! steps and which of them pause the batch loop, which failures undo a checkpoint, when an
//! output epoch may be published, and what a restore does with the epochs a sink holds
//! pending. The engine does the I/O: the batch loop runs the steps that pause it, an
//! uploader thread the rest, one checkpoint at a time.
//!
//! Epochs: the records written after checkpoint N−1 closed its epoch and up to the moment
//! checkpoint N closes its own form epoch N (so a checkpoint's id is the epoch it closes).
//! Epoch N is published only once manifest N (or a later one) exists.

/// One checkpoint's steps, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The stages hand their changed state to RocksDB.
    WriteState,
    /// The sink closes epoch N: records from now on belong to N+1.
    CloseEpoch,
    /// A RocksDB checkpoint (hard links) of the state as written.
    Cut,
    /// The closed epochs are made durable (before any manifest claims them).
    SyncEpochs,
    /// The table files the store lacks, and the small metadata files.
    Upload,
    /// The manifest: the commit point.
    PutManifest,
    /// Expired checkpoints and unreferenced files are deleted.
    CollectGarbage,
    /// Savepoints only: the self-contained copy.
    CopySavepoint,
    /// The cut stays on local disk for a restart on this machine.
    KeepLocal,
    /// Epochs up to N are published and the source is told.
    Publish,
}

/// What a failed step means for its checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Before the commit point: the checkpoint does not exist; its epoch stays pending.
    NotCommitted,
    /// The checkpoint exists, the savepoint asked for does not.
    SavepointLost,
    /// Housekeeping after the commit point: logged, the checkpoint stands.
    Harmless,
}

impl Step {
    pub const FIRST: Step = Step::WriteState;

    /// The step after this one (`None` after the last).
    pub fn next(self, savepoint: bool) -> Option<Step> {
        use Step::*;
        Some(match self {
            WriteState => CloseEpoch,
            CloseEpoch => Cut,
            Cut => SyncEpochs,
            SyncEpochs => Upload,
            Upload => PutManifest,
            PutManifest => CollectGarbage,
            CollectGarbage if savepoint => CopySavepoint,
            CollectGarbage | CopySavepoint => KeepLocal,
            KeepLocal => Publish,
            Publish => return None,
        })
    }

    /// Whether the batch loop waits for this step. The rest runs beside it, except
    /// [`Step::Publish`], which the loop does at the first batch boundary after it learns
    /// that the checkpoint committed (the sink belongs to the loop).
    pub fn pauses(self) -> bool {
        matches!(self, Step::WriteState | Step::CloseEpoch | Step::Cut)
    }

    /// Whether this step runs on the uploader thread.
    pub fn in_background(self) -> bool {
        !self.pauses() && self != Step::Publish
    }

    /// Whether the checkpoint exists once this step is done.
    pub fn commits(self) -> bool {
        self == Step::PutManifest
    }

    /// What a failure of this step means.
    pub fn on_failure(self) -> Failure {
        use Step::*;
        match self {
            WriteState | CloseEpoch | Cut | SyncEpochs | Upload | PutManifest => {
                Failure::NotCommitted
            }
            CopySavepoint => Failure::SavepointLost,
            CollectGarbage | KeepLocal | Publish => Failure::Harmless,
        }
    }
}

/// A violation of the protocol by its caller (a bug, not an outage).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("checkpoint {next} cannot start while checkpoint {in_flight} is in flight")]
    Busy { next: u64, in_flight: u64 },
    #[error("an outcome for checkpoint {got} while {in_flight:?} is in flight")]
    NotInFlight { got: u64, in_flight: Option<u64> },
}

/// The batch loop's view of checkpoint ids and output epochs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Epochs {
    committed: u64,
    next: u64,
    in_flight: Option<u64>,
}

impl Epochs {
    /// After a restore from checkpoint `covered` (0: a fresh start) into a store whose
    /// largest checkpoint id in use is `largest_used`: ids are never reused, so a manifest
    /// written later cannot be mistaken for an older one's.
    pub fn restored(covered: u64, largest_used: u64) -> Self {
        Self {
            committed: covered,
            next: covered.max(largest_used) + 1,
            in_flight: None,
        }
    }

    /// The newest committed checkpoint (0: none).
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// The epoch records are written to now, and the id of the next checkpoint.
    pub fn open_epoch(&self) -> u64 {
        self.next
    }

    pub fn in_flight(&self) -> Option<u64> {
        self.in_flight
    }

    /// At most one checkpoint is in flight: the next one waits for its outcome.
    pub fn may_start(&self) -> bool {
        self.in_flight.is_none()
    }

    /// Start a checkpoint: it gets the open epoch's id and closes it.
    pub fn begin(&mut self) -> Result<u64, ProtocolError> {
        if let Some(in_flight) = self.in_flight {
            return Err(ProtocolError::Busy {
                next: self.next,
                in_flight,
            });
        }
        let id = self.next;
        self.in_flight = Some(id);
        self.next = id + 1;
        Ok(id)
    }

    /// Checkpoint `id` committed: publish every epoch up to the returned one (epochs of
    /// earlier failed checkpoints included: this manifest covers them).
    pub fn on_committed(&mut self, id: u64) -> Result<u64, ProtocolError> {
        self.settle(id)?;
        self.committed = id;
        Ok(id)
    }

    /// Checkpoint `id` failed before its commit point: its epoch stays closed and pending
    /// (the next checkpoint that commits publishes it), and its id is used up.
    pub fn on_failed(&mut self, id: u64) -> Result<(), ProtocolError> {
        self.settle(id)
    }

    fn settle(&mut self, id: u64) -> Result<(), ProtocolError> {
        if self.in_flight != Some(id) {
            return Err(ProtocolError::NotInFlight {
                got: id,
                in_flight: self.in_flight,
            });
        }
        self.in_flight = None;
        Ok(())
    }
}

/// What a restore from the checkpoint covering epoch `covered` does with pending epochs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Closed before the restored manifest was written, so covered by it: published (a
    /// crash came between the manifest and the publication).
    pub publish: Vec<u64>,
    /// Written after the restored checkpoint: the restored run writes them again.
    pub discard: Vec<u64>,
}

pub fn recover(pending: &[u64], covered: u64) -> Recovery {
    let (publish, discard) = pending.iter().partition(|e| **e <= covered);
    Recovery { publish, discard }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(savepoint: bool) -> Vec<Step> {
        std::iter::successors(Some(Step::FIRST), |s| s.next(savepoint)).collect()
    }

    #[test]
    fn the_loop_pauses_only_until_the_cut_and_the_commit_point_precedes_publication() {
        use Step::*;
        assert_eq!(
            steps(false),
            [
                WriteState,
                CloseEpoch,
                Cut,
                SyncEpochs,
                Upload,
                PutManifest,
                CollectGarbage,
                KeepLocal,
                Publish
            ]
        );
        let sp = steps(true);
        assert_eq!(sp.iter().filter(|s| **s == CopySavepoint).count(), 1);
        for all in [steps(false), sp] {
            let pausing: Vec<Step> = all.iter().copied().filter(|s| s.pauses()).collect();
            assert_eq!(pausing, [WriteState, CloseEpoch, Cut]);
            // The pausing steps come first: the loop hands the rest over and goes on.
            assert!(all[..3].iter().all(|s| s.pauses()));
            let pos = |x: Step| all.iter().position(|s| *s == x).unwrap();
            // Durable before claimed, claimed before visible.
            assert!(pos(SyncEpochs) < pos(PutManifest));
            assert!(pos(Upload) < pos(PutManifest));
            assert!(pos(PutManifest) < pos(Publish));
            // The local snapshot is kept only once the checkpoint it is exists.
            assert!(pos(PutManifest) < pos(KeepLocal));
            assert_eq!(all.iter().filter(|s| s.commits()).count(), 1);
            for s in &all {
                let before_commit = pos(*s) <= pos(PutManifest);
                assert_eq!(
                    s.on_failure() == Failure::NotCommitted,
                    before_commit,
                    "{s:?}"
                );
                assert_eq!(s.in_background(), !s.pauses() && *s != Publish);
            }
        }
        assert_eq!(CopySavepoint.on_failure(), Failure::SavepointLost);
    }

    #[test]
    fn one_checkpoint_in_flight_and_ids_never_reused() {
        let mut e = Epochs::restored(0, 0);
        assert_eq!(e.open_epoch(), 1);
        assert_eq!(e.begin(), Ok(1));
        // Records written during the upload belong to the next epoch.
        assert_eq!(e.open_epoch(), 2);
        assert!(!e.may_start());
        assert_eq!(
            e.begin(),
            Err(ProtocolError::Busy {
                next: 2,
                in_flight: 1
            })
        );
        assert_eq!(e.committed(), 0, "nothing is committed before the manifest");
        assert_eq!(e.on_committed(1), Ok(1));
        assert_eq!(e.committed(), 1);
        assert!(e.may_start());
        assert!(matches!(
            e.on_committed(1),
            Err(ProtocolError::NotInFlight { got: 1, .. })
        ));
    }

    #[test]
    fn a_failed_checkpoint_is_published_by_the_next_commit() {
        let mut e = Epochs::restored(4, 6);
        // Ids continue after the largest in the store (7), not after the restored one.
        assert_eq!(e.begin(), Ok(7));
        assert_eq!(e.on_failed(7), Ok(()));
        assert_eq!(e.committed(), 4);
        assert_eq!(e.begin(), Ok(8), "a failed id is used up");
        assert_eq!(
            e.on_failed(9),
            Err(ProtocolError::NotInFlight {
                got: 9,
                in_flight: Some(8)
            })
        );
        // Manifest 8 covers epochs 7 and 8: publish through 8.
        assert_eq!(e.on_committed(8), Ok(8));
        // A crash now restores from 8, whose pending epochs are published, later ones dropped.
        assert_eq!(
            recover(&[7, 8, 9], 8),
            Recovery {
                publish: vec![7, 8],
                discard: vec![9]
            }
        );
    }

    #[test]
    fn a_crash_before_the_commit_point_discards_the_closed_epoch() {
        // Checkpoint 3 closed its epoch, then the process died before manifest 3: the
        // restore from 2 replays those records, so epoch 3 and the open 4 are discarded.
        assert_eq!(
            recover(&[2, 3, 4], 2),
            Recovery {
                publish: vec![2],
                discard: vec![3, 4]
            }
        );
        // A fresh start publishes nothing an earlier incarnation left.
        assert_eq!(recover(&[1, 2], 0).publish, Vec::<u64>::new());
    }
}
