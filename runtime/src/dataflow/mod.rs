//! The recommendation dataflow: a user-keyed stage (sessions → co-visitation increments), an
//! exchange that re-keys increments by item, and an item-keyed stage (sliding windows,
//! ItemStats, recommendations). Pure logic: no I/O, no threads (the engine runs it).

pub mod exchange;
pub mod item;
pub mod output;
pub mod trending;
pub mod user;
pub mod window;

use compact_str::CompactString;

use crate::event::Event;

/// User and item identifiers (inline up to 24 bytes: no allocation for typical ids).
pub type Key = CompactString;

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
