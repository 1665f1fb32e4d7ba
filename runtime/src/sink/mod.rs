//! Sinks: where output goes. Output is transactional: records written between two
//! checkpoints form an epoch that becomes visible only when the checkpoint covering it
//! commits (two-phase: `pre_commit` closes the epoch and hands back what makes it durable,
//! `commit` publishes it). Several closed epochs may wait for their checkpoint at once.

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

/// Makes closed epochs durable; see [`Sink::pre_commit`].
pub type SyncJob = Box<dyn FnOnce() -> Result<()> + Send>;

pub trait Sink: Send {
    /// Append newline-terminated JSON records to the open epoch of `stream`.
    fn write(&mut self, stream: Stream, records: &[u8]) -> Result<()>;

    /// Close epoch `epoch` (phase one): records written from now on belong to `epoch + 1`.
    /// Returns what makes every closed epoch up to `epoch` durable, to run (on any thread)
    /// before the manifest that covers them is written.
    fn pre_commit(&mut self, epoch: u64) -> Result<SyncJob>;

    /// Publish every durable epoch up to `epoch` (phase two; after the manifest is written).
    fn commit(&mut self, epoch: u64) -> Result<()>;

    /// After a restore from the checkpoint that covered `covered`: publish durable epochs up
    /// to it that were not published yet, discard everything after it, and write new records
    /// to epoch `next`.
    fn recover(&mut self, covered: u64, next: u64) -> Result<()>;
}
