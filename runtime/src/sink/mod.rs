//! Sinks: where output goes. Output is transactional: records written between two
//! checkpoints form an epoch that becomes visible only when the checkpoint covering it
//! commits (two-phase: `pre_commit` makes the epoch durable, `commit` publishes it).

pub mod file;
pub mod memory;

use crate::Result;

/// The four outputs of the dataflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    Recommendations,
    ItemStats,
    Late,
    DeadLetter,
}

impl Stream {
    pub const ALL: [Stream; 4] = [
        Stream::Recommendations,
        Stream::ItemStats,
        Stream::Late,
        Stream::DeadLetter,
    ];

    pub fn dir_name(self) -> &'static str {
        match self {
            Self::Recommendations => "recommendations",
            Self::ItemStats => "item-stats",
            Self::Late => "late",
            Self::DeadLetter => "dead-letter",
        }
    }
}

pub trait Sink: Send {
    /// Append newline-terminated JSON records to the open epoch of `stream`.
    fn write(&mut self, stream: Stream, records: &[u8]) -> Result<()>;

    /// Make epoch `epoch` durable but not visible (phase one; before the manifest is written).
    fn pre_commit(&mut self, epoch: u64) -> Result<()>;

    /// Publish every durable epoch up to `epoch` (phase two; after the manifest is written).
    fn commit(&mut self, epoch: u64) -> Result<()>;

    /// After a restore from the checkpoint that covered `covered`: publish durable epochs up
    /// to it that were not published yet, discard everything after it, and write new records
    /// to epoch `next`.
    fn recover(&mut self, covered: u64, next: u64) -> Result<()>;
}
