//! The recommendation dataflow (docs/semantics.md): a user-keyed stage (sessions →
//! co-visitation increments), an exchange that re-keys increments by item, and an item-keyed
//! stage (sliding windows, ItemStats, recommendations).
//!
//! Pure logic: no I/O, no threads (the runtime's engines run it), no storage engine. The
//! stages keep their hot state in memory within a budget; what is beyond it they reach
//! through [`store::StateStore`], which the runtime's state layer serves from RocksDB.

pub mod event;
pub mod exchange;
pub mod heap;
pub mod item;
pub mod json;
pub mod keygroup;
pub mod output;
mod row;
pub mod store;
#[cfg(test)]
mod testing;
pub mod trending;
pub mod user;
pub mod window;

use compact_str::CompactString;

use crate::event::Event;
/// The job configuration's dataflow parameters (crate `riffle-config`).
pub(crate) use riffle_config as config;

/// Errors of the dataflow: only its state store can fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store behind the hot tiers failed (the storage engine, or a value it could not
    /// decode); the stage's state is then undefined and the job restarts from a checkpoint.
    #[error("state store: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// User and item identifiers (inline up to 24 bytes: no allocation for typical ids).
pub type Key = CompactString;

/// Least recently used eviction by whole maintenance rounds. Given every hot entry's (age in
/// rounds, bytes), returns the age from which on entries leave so that `total` falls to
/// `target`, oldest first; `None` when nothing leaves. Entries used in the current round
/// (age 0) never leave.
pub fn eviction_cutoff(mut by_age: Vec<(u32, usize)>, total: usize, target: usize) -> Option<u32> {
    by_age.sort_unstable_by_key(|(age, _)| std::cmp::Reverse(*age));
    let (mut freed, mut cutoff) = (0, None);
    for (age, bytes) in by_age {
        if total.saturating_sub(freed) <= target || age == 0 {
            break;
        }
        freed += bytes;
        cutoff = Some(age);
    }
    cutoff
}

/// One worker's state budget, shared by its two stages: a stage may use what the other
/// leaves, and always at least half.
pub fn share_budget(budget: usize, other_hot: usize) -> usize {
    budget - other_hot.min(budget / 2)
}

/// Hash maps on the hot path: Fx hashing (ids are not attacker-chosen hash-flooding input
/// here, and SipHash was the largest cost per increment). Deterministic across processes.
pub type FastMap<K, V> = rustc_hash::FxHashMap<K, V>;
pub type FastSet<K> = rustc_hash::FxHashSet<K>;

/// An event as the dataflow sees it, stamped by the source with its position in the read
/// order and the job watermark before it was read (`W_e` in docs/semantics.md).
#[derive(Clone, Debug)]
pub struct Stamped {
    pub seq: u64,
    pub wm: i64,
    pub weight: u32,
    pub event: Event,
}

/// A point in the read order where the watermark enters a new emission epoch: windows are
/// emitted there, before the event with that sequence number is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crossing {
    pub seq: u64,
    pub wm: i64,
}

/// Everything one batch shares with every worker: its sequence range and watermark crossings.
#[derive(Clone, Debug, Default)]
pub struct BatchFrame {
    /// First sequence number after the batch.
    pub end_seq: u64,
    pub crossings: Vec<Crossing>,
    /// The watermark after the batch (the next batch's first `W_e`).
    pub wm_end: i64,
}
