//! What the stages need of keyed state beyond memory: histories and pane entries by key,
//! one key group's panes in order, and batched writes. The runtime's state layer serves it
//! from RocksDB; keys, encodings and files are its business, so the stages see histories and
//! rows, never bytes.

use std::collections::VecDeque;
use std::ops::Range;

use crate::user::HistEntry;
use crate::Result;

/// Receives stored pane entries one at a time: `entry`, then each of its neighbours.
pub trait PaneVisitor {
    fn entry(&mut self, pane: i64, item: &str, popularity: u64);
    fn neighbor(&mut self, item: &str, weight: u64);
}

/// Keyed state beyond memory, as the stages see it. A store holds what the stages wrote
/// back (evictions, snapshots) or what a restored checkpoint held.
pub trait StateStore: Send + Sync {
    /// `user`'s stored history, oldest entry first.
    fn history(&self, kg: u32, user: &str) -> Result<Option<VecDeque<HistEntry>>>;

    /// `item`'s stored entry in `pane`: its popularity (`None`: no entry), its neighbours
    /// handed to `neighbor`.
    fn pane_entry(
        &self,
        kg: u32,
        pane: i64,
        item: &str,
        neighbor: &mut dyn FnMut(&str, u64),
    ) -> Result<Option<u64>>;

    /// Every stored entry of key group `kg` whose pane is in `panes`, in (pane, item) order.
    fn scan_panes(&self, kg: u32, panes: Range<i64>, visit: &mut dyn PaneVisitor) -> Result<()>;

    /// A writer into the store (in bounded batches; `finish` writes the last one).
    fn writer(&self) -> Box<dyn StateWriter + '_>;
}

/// Changed state, handed over at snapshots, evictions and cold emissions.
pub trait StateWriter {
    fn put_history(&mut self, kg: u32, user: &str, entries: &VecDeque<HistEntry>) -> Result<()>;
    fn delete_history(&mut self, kg: u32, user: &str) -> Result<()>;
    fn put_pane_entry(
        &mut self,
        kg: u32,
        pane: i64,
        item: &str,
        popularity: u64,
        neighbors: &mut dyn ExactSizeIterator<Item = (&str, u64)>,
    ) -> Result<()>;
    /// Delete key group `kg`'s entries of every pane below `pane`.
    fn delete_panes_below(&mut self, kg: u32, pane: i64) -> Result<()>;
    /// Write what is still buffered.
    fn finish(self: Box<Self>) -> Result<()>;
}
