//! Sources: where events come from. A source has numbered partitions, reads them in rounds
//! (a deterministic interleaving, so a restored replay reads in the same order), and can
//! seek to checkpointed positions. Kafka comes with the distributed runtime.

pub mod file;
pub mod generator;
pub mod memory;

use serde::{Deserialize, Serialize};

use crate::event::{DeadLetter, Event};
use crate::Result;

/// One record read from a partition.
#[derive(Clone, Debug)]
pub struct Polled {
    pub partition: u32,
    pub record: std::result::Result<Event, DeadLetter>,
    /// This was the partition's last record (end of a bounded input).
    pub last: bool,
}

/// Where a partition's reader stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourcePosition {
    /// Byte offset (files) or record index (generators).
    pub offset: u64,
    /// Records consumed so far (line numbers of files derive from it).
    pub records: u64,
}

pub trait Source: Send {
    fn partitions(&self) -> u32;

    /// Read up to `per_partition` records from each unfinished partition, in partition order.
    fn poll_round(&mut self, per_partition: usize, out: &mut Vec<Polled>) -> Result<()>;

    /// Whether a partition has nothing more to read (bounded inputs only).
    fn is_finished(&self, partition: u32) -> bool;

    fn positions(&self) -> Vec<SourcePosition>;

    fn seek(&mut self, positions: &[SourcePosition]) -> Result<()>;

    /// The checkpoint covering everything read so far committed (e.g. commit Kafka offsets).
    fn on_checkpoint_complete(&mut self, _checkpoint_id: u64) -> Result<()> {
        Ok(())
    }
}
