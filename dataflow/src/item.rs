//! The item-keyed stage: pane-aggregated popularity and co-visitation, sliding-window
//! emission, and recommendations.
//!
//! State is kept per pane (O(1) work per increment, not W/S). A running sum over the panes of
//! the next window to emit makes emission and most recommendations O(row) instead of
//! O(W/S · row): sliding adds one pane and subtracts one.
//!
//! With a store and a budget (`set_store`), the state is in two tiers: when it outgrows the
//! budget, the window sums (derived state) are dropped and the oldest panes' entries move to
//! the store. Cold entries are read back on use; the running window's sums become a cache
//! of the items requested, summed from their panes on a miss; and a window with cold panes
//! is emitted by scanning its panes in the store, one key group at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Range, RangeInclusive};
use std::sync::Arc;

use super::exchange::{ItemIncrements, Message, Payload, RecRequest};
use super::output::{top_n_by, ItemStats, LateEvent, Neighbor, Recommendation, Scored, StatsOut};
use super::window::{Windowing, WM_MAX, WM_MIN};
use super::{heap, BatchFrame, FastMap, Key};
// Rows keyed by dense ids: a row update hashes a `u32`, never a string.
use super::row::Row;
use crate::store::{PaneVisitor, StateStore, StateWriter};
use crate::Result;

/// Windows ahead of the running one whose sums are kept (see `ItemStage::ahead`).
const MAX_AHEAD_WINDOWS: usize = 4;

/// A dense item number, local to one stage (see [`Dict`]).
type Id = u32;

/// The stage's item dictionary: ids are handed out in first-seen order and never reused, so
/// they are only meaningful inside this stage. Snapshots store the item strings, so the
/// dictionary itself needs no persisting: a restore rebuilds it.
#[derive(Default)]
struct Dict {
    ids: FastMap<Key, Id>,
    keys: Vec<Key>,
    /// Each key's first 8 bytes, big-endian and zero-padded: ranking breaks ties between
    /// equal weights by item id, and this decides most of them with one integer comparison.
    prefixes: Vec<u64>,
    /// Heap bytes of keys too long to be inline (each is held twice).
    spilled: usize,
}

/// The first 8 bytes of `key` as a big-endian integer, zero-padded: `a < b` as integers
/// implies `a < b` in byte order, and equal prefixes leave the rest to compare.
fn prefix(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = key.len().min(8);
    b[..n].copy_from_slice(&key[..n]);
    u64::from_be_bytes(b)
}

impl Dict {
    fn intern(&mut self, key: &str) -> Id {
        if let Some(id) = self.ids.get(key) {
            return *id;
        }
        let id = self.keys.len() as Id;
        let key = Key::from(key);
        if key.is_heap_allocated() {
            self.spilled += 2 * key.capacity();
        }
        self.prefixes.push(prefix(key.as_bytes()));
        self.keys.push(key.clone());
        self.ids.insert(key, id);
        id
    }

    fn heap_bytes(&self) -> usize {
        heap::table::<(Key, Id)>(self.ids.capacity())
            + heap::vec::<Key>(self.keys.capacity())
            + heap::vec::<u64>(self.prefixes.capacity())
            + self.spilled
    }

    fn get(&self, key: &str) -> Option<Id> {
        self.ids.get(key).copied()
    }

    fn key(&self, id: Id) -> &Key {
        &self.keys[id as usize]
    }

    /// The rank order's tie-break: item ids ascending in byte order.
    fn before(&self, a: Id, b: Id) -> bool {
        let (pa, pb) = (self.prefixes[a as usize], self.prefixes[b as usize]);
        if pa != pb {
            return pa < pb;
        }
        self.key(a).as_bytes() < self.key(b).as_bytes()
    }

    /// `a` ranks before `b`: weight descending, then item id ascending.
    fn better(&self, a: (u64, Id), b: (u64, Id)) -> bool {
        a.0 > b.0 || (a.0 == b.0 && self.before(a.1, b.1))
    }

    fn top(&self, row: &Row, n: usize) -> Vec<(Id, u64)> {
        top_n_by(row.iter(), n, |a, b| self.before(*a, *b))
    }
}

/// Old ids to those of a rebuilt dictionary (see `ItemStage::compact_dict`).
struct Renumber {
    old: Dict,
    /// Old id → new id; `Id::MAX`: not (yet) in the new dictionary.
    new_ids: Vec<Id>,
    dict: Dict,
}

impl Renumber {
    fn id(&mut self, id: Id) -> Id {
        let slot = &mut self.new_ids[id as usize];
        if *slot == Id::MAX {
            *slot = self.dict.intern(self.old.key(id));
        }
        *slot
    }

    fn row(&mut self, row: &mut Row) {
        let mut new = Row::with_capacity(row.len());
        for (k, w) in row.iter() {
            new.add(self.id(k), w);
        }
        *row = new;
    }

    fn sums(&mut self, sums: &mut FastMap<Id, WinAgg>) {
        *sums = std::mem::take(sums)
            .into_iter()
            .map(|(id, mut a)| {
                self.row(&mut a.row);
                for (_, k) in &mut a.top {
                    *k = self.id(*k);
                }
                (self.id(id), a)
            })
            .collect();
    }
}

/// What one update adds to an item's pane entry.
#[derive(Clone, Copy)]
enum Add<'a> {
    Pop(u64),
    /// Co-visitation weights to other items.
    Row(&'a [(Id, u64)]),
}

#[derive(Clone, Debug, Default)]
struct PaneEntry {
    pop: u64,
    row: Row,
    kg: u32,
    dirty: bool,
}

/// Heap bytes of one slot of a pane's table of entries (for sizing budgets in tests of the
/// tiers).
pub fn pane_entry_slot_bytes() -> usize {
    std::mem::size_of::<(Id, PaneEntry)>() + 1
}

/// One item's sum over the panes of the running window, with its top candidates.
///
/// Between two slides the sum only grows, so the exact top `cap` of the row can be kept up to
/// date per increment (usually one comparison with the last entry) instead of ranking the
/// whole row for every request. A slide subtracts a pane and invalidates it; the next request
/// ranks the row once.
#[derive(Clone, Debug, Default)]
struct WinAgg {
    pop: u64,
    row: Row,
    /// (weight, id) in rank order: exactly the top `cap` of `row` while `top_valid`.
    top: Vec<(u64, Id)>,
    top_valid: bool,
    /// The maintenance round it was last requested in (recency for eviction).
    used: u32,
}

impl WinAgg {
    /// Heap bytes of the row and the cached candidates.
    fn heap_bytes(&self) -> usize {
        self.row.heap_bytes() + heap::vec::<(u64, Id)>(self.top.capacity())
    }

    fn add_pane(&mut self, e: &PaneEntry) {
        self.pop += e.pop;
        for (k, w) in e.row.iter() {
            self.row.add(k, w);
        }
        self.top_valid = false;
    }

    /// Subtract a pane that is part of this sum; returns whether the sum is now empty.
    fn sub_pane(&mut self, e: &PaneEntry) -> bool {
        self.pop -= e.pop;
        for (k, w) in e.row.iter() {
            self.row.sub(k, w);
        }
        self.top_valid = false;
        self.pop == 0 && self.row.is_empty()
    }

    /// Add `w` to `row[j]`, keeping `top` exact; returns whether `j` is new in the row.
    fn add(&mut self, j: Id, w: u64, cap: usize, dict: &Dict) -> bool {
        let old = self.row.add(j, w);
        let new = old + w;
        if !self.top_valid || w == 0 || cap == 0 {
            return old == 0;
        }
        let top = &mut self.top;
        let full = top.len() >= cap;
        // `top` is the exact top `cap` under a strict order, so `j` is in it iff its old
        // value ranks at or above the last entry (or, not full, iff it was nonzero).
        let present = old > 0 && (!full || !dict.better(top[top.len() - 1], (old, j)));
        let mut pos = if present {
            // `top` is sorted by rank: find `(old, j)` by binary search.
            let i = top.partition_point(|e| dict.better(*e, (old, j)));
            if top.get(i) != Some(&(old, j)) {
                self.top_valid = false;
                return false;
            }
            top[i].0 = new;
            i
        } else if !full {
            top.push((new, j));
            top.len() - 1
        } else if dict.better((new, j), top[top.len() - 1]) {
            let last = top.len() - 1;
            top[last] = (new, j);
            last
        } else {
            return old == 0;
        };
        while pos > 0 && dict.better(top[pos], top[pos - 1]) {
            top.swap(pos, pos - 1);
            pos -= 1;
        }
        old == 0
    }

    fn ensure_top(&mut self, cap: usize, dict: &Dict) {
        if !self.top_valid {
            self.top = dict
                .top(&self.row, cap)
                .into_iter()
                .map(|(k, w)| (w, k))
                .collect();
            self.top_valid = true;
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct ItemParams {
    pub windowing: Windowing,
    pub neighbor_limit: usize,
    pub top_k: usize,
    /// The most items one request can exclude (the history length): the top `top_k` plus
    /// this many candidates always hold a request's answer.
    pub max_excluded: usize,
    /// Length of the local trending list per emitted window.
    pub trending_capacity: usize,
    /// Build ItemStats records (off for backtests that only need recommendations).
    pub emit_stats: bool,
    /// Produce late-event records here. The distributed runtime writes them where lateness
    /// is decided (the user stage, which knows the record's source position).
    pub emit_late: bool,
}

/// Windows already emitted for some key groups by an earlier owner (after a rescale, a worker
/// can own key groups whose previous owner had emitted further than the others).
#[derive(Clone, Debug, Default)]
pub struct EmittedThrough {
    pub key_groups: u32,
    /// key group → watermark up to which its windows were emitted.
    pub through: FastMap<u32, i64>,
}

/// A recommendation whose trending fill waits for the global top of its window.
#[derive(Clone, Debug)]
pub struct PendingRec {
    pub seq: u64,
    pub wm: i64,
    pub rec: Recommendation,
    pub excluded: Vec<Key>,
}

/// What one worker's item stage produced in one batch (ItemStats go to a [`StatsOut`] as
/// they are built).
#[derive(Default)]
pub struct ItemOutput {
    pub recs: Vec<PendingRec>,
    pub late: Vec<LateEvent>,
    /// Local top items of each emitted window: (window end, list).
    pub trending: Vec<(i64, Vec<(Key, u64)>)>,
    pub windows_emitted: u64,
}

pub struct ItemStage {
    params: ItemParams,
    dict: Dict,
    panes: BTreeMap<i64, FastMap<Id, PaneEntry>>,
    /// Entries changed since the last snapshot (each listed once: when it became dirty), so
    /// a snapshot never scans the state to find them.
    dirty: Vec<(i64, Id)>,
    /// End of the next window to emit; `None` until the watermark is finite.
    next_end: Option<i64>,
    /// Sum of the panes of the window ending at `next_end`.
    win: FastMap<Id, WinAgg>,
    /// Sums for windows after the running one (by end), only for the items requested there:
    /// events ahead of the stage's watermark (just past a slide boundary, or before the
    /// watermark is finite at all) are scored on them. Summed once per item and window, then
    /// kept up to date by `apply_ids`; dropped once the running window reaches them.
    ahead: BTreeMap<i64, FastMap<Id, WinAgg>>,
    wm: i64,
    /// Panes below this index were deleted since the last snapshot.
    expired_below: Option<i64>,
    emitted_through: EmittedThrough,
    /// The store behind the hot tier; `None`: everything stays in memory.
    tier: Option<Tier>,
    /// Panes some of whose entries are only in the store.
    cold_panes: BTreeSet<i64>,
    /// `win` holds every item of the running window; otherwise it is a cache of some of
    /// them, and a missing item is summed from its panes.
    win_complete: bool,
    /// Heap bytes of the pane entries' rows and of the running window's sums (rows and
    /// candidates); the tables themselves are measured when needed (`hot_bytes`).
    row_heap: usize,
    win_heap: usize,
    /// Pane entries read back from the store, and entries moved to it, since the start.
    pub loads: u64,
    pub evictions: u64,
    /// Times the dictionary was rebuilt from the ids in memory (see `compact_dict`).
    pub dict_rebuilds: u64,
    /// Items in the dictionary after its last rebuild.
    dict_live: usize,
    /// Maintenance rounds so far (the clock of `WinAgg::used`).
    round: u32,
    /// Reused by `apply_row` for the interned ids of one row's increments.
    scratch: Vec<(Id, u64)>,
}

struct Tier {
    store: Arc<dyn StateStore>,
    budget: usize,
    /// The key groups whose windows this stage emits (a cold window is scanned per group).
    owned: Range<u32>,
}

/// Write an entry's popularity and row (ids as item strings: stored state needs no
/// dictionary).
fn put_entry(
    out: &mut dyn StateWriter,
    pane: i64,
    id: Id,
    e: &PaneEntry,
    dict: &Dict,
) -> Result<()> {
    out.put_pane_entry(
        e.kg,
        pane,
        dict.key(id),
        e.pop,
        &mut e.row.iter().map(|(k, w)| (dict.key(k).as_str(), w)),
    )
}

/// Read `item`'s stored entry in `pane`, interning its neighbours.
fn load_entry(
    store: &dyn StateStore,
    kg: u32,
    pane: i64,
    item: &str,
    dict: &mut Dict,
) -> Result<Option<PaneEntry>> {
    let mut row = Row::default();
    let pop = store.pane_entry(kg, pane, item, &mut |k, w| {
        row.add(dict.intern(k), w);
    })?;
    Ok(pop.map(|pop| PaneEntry {
        pop,
        row,
        kg,
        dirty: false,
    }))
}

/// Loads stored pane entries into a stage: see [`ItemStage::restorer`].
pub struct Restorer<'a> {
    stage: &'a mut ItemStage,
    kg: u32,
    /// The entry being read: (pane, item, entry).
    current: Option<(i64, Id, PaneEntry)>,
}

impl Restorer<'_> {
    fn flush(&mut self) {
        let Some((pane, id, e)) = self.current.take() else {
            return;
        };
        let s = &mut *self.stage;
        s.row_heap += e.row.heap_bytes();
        if let Some(old) = s.panes.entry(pane).or_default().insert(id, e) {
            s.row_heap -= old.row.heap_bytes();
        }
    }
}

impl PaneVisitor for Restorer<'_> {
    fn entry(&mut self, pane: i64, item: &str, popularity: u64) {
        self.flush();
        let s = &mut *self.stage;
        if s.tier
            .as_ref()
            .is_some_and(|t| s.hot_bytes() >= t.budget / 2)
        {
            s.panes.entry(pane).or_default();
            s.cold_panes.insert(pane);
            return;
        }
        let id = s.dict.intern(item);
        self.current = Some((
            pane,
            id,
            PaneEntry {
                pop: popularity,
                row: Row::default(),
                kg: self.kg,
                dirty: false,
            },
        ));
    }

    fn neighbor(&mut self, item: &str, weight: u64) {
        if let Some((_, _, e)) = &mut self.current {
            e.row.add(self.stage.dict.intern(item), weight);
        }
    }
}

impl Drop for Restorer<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// A window's stored entries summed per item: (popularity, row) by item id (a cold
/// emission reads one key group's window at a time).
#[derive(Default)]
struct WindowSums {
    sums: FastMap<Key, (u64, FastMap<Key, u64>)>,
    /// The entry being read and its neighbours so far.
    current: Option<Key>,
    neighbors: Vec<(Key, u64)>,
}

impl WindowSums {
    fn flush(&mut self) {
        if let Some(item) = self.current.take() {
            let (_, row) = self.sums.entry(item).or_default();
            for (k, w) in self.neighbors.drain(..) {
                *row.entry(k).or_insert(0) += w;
            }
        }
    }

    fn finish(mut self) -> FastMap<Key, (u64, FastMap<Key, u64>)> {
        self.flush();
        self.sums
    }
}

impl PaneVisitor for WindowSums {
    fn entry(&mut self, _pane: i64, item: &str, popularity: u64) {
        self.flush();
        self.sums.entry(Key::from(item)).or_default().0 += popularity;
        self.current = Some(Key::from(item));
    }

    fn neighbor(&mut self, item: &str, weight: u64) {
        self.neighbors.push((Key::from(item), weight));
    }
}

impl ItemStage {
    pub fn new(params: ItemParams) -> Self {
        Self {
            params,
            dict: Dict::default(),
            panes: BTreeMap::new(),
            dirty: Vec::new(),
            next_end: None,
            win: FastMap::default(),
            ahead: BTreeMap::new(),
            wm: WM_MIN,
            expired_below: None,
            emitted_through: EmittedThrough::default(),
            tier: None,
            cold_panes: BTreeSet::new(),
            win_complete: true,
            row_heap: 0,
            win_heap: 0,
            loads: 0,
            evictions: 0,
            dict_rebuilds: 0,
            dict_live: 0,
            round: 0,
            scratch: Vec::new(),
        }
    }

    /// Back the stage with `store` and keep about `budget` bytes of pane entries and window
    /// sums in memory. `owned` are the key groups whose windows this stage emits. The store
    /// must hold every pane entry not in memory (a restored checkpoint does).
    pub fn set_store(&mut self, store: Arc<dyn StateStore>, budget: usize, owned: Range<u32>) {
        self.tier = Some(Tier {
            store,
            budget,
            owned,
        });
    }

    /// Change the budget (see `share_budget`).
    pub fn set_budget(&mut self, budget: usize) {
        if let Some(t) = &mut self.tier {
            t.budget = budget;
        }
    }

    /// Let go of the store (before the database behind it is closed or replaced). Only
    /// valid while every entry is in memory (before a restore loads the new database).
    pub fn detach_store(&mut self) {
        self.tier = None;
    }

    /// Heap bytes of the hot tier as allocated (see [`heap`]): pane entries, window sums
    /// (running and ahead), the item dictionary and the list of dirty entries.
    pub fn hot_bytes(&self) -> usize {
        let panes: usize = self
            .panes
            .values()
            .map(|m| heap::table::<(Id, PaneEntry)>(m.capacity()))
            .sum();
        let ahead: usize = self
            .ahead
            .values()
            .map(|m| {
                heap::table::<(Id, WinAgg)>(m.capacity())
                    + m.values().map(WinAgg::heap_bytes).sum::<usize>()
            })
            .sum();
        panes
            + self.row_heap
            + heap::table::<(Id, WinAgg)>(self.win.capacity())
            + self.win_heap
            + ahead
            + self.dict.heap_bytes()
            + heap::vec::<(i64, Id)>(self.dirty.capacity())
    }

    /// The watermark the stage has advanced to.
    pub fn watermark(&self) -> i64 {
        self.wm
    }

    /// After a restore: key groups whose windows were emitted further than `resume`'s
    /// watermark; their items are left out of windows emitted up to there.
    pub fn set_emitted_through(&mut self, e: EmittedThrough) {
        self.emitted_through = e;
    }

    pub fn pane_entries(&self) -> usize {
        self.panes.values().map(FastMap::len).sum()
    }

    pub fn live_panes(&self) -> usize {
        self.panes.len()
    }

    /// Candidates kept per item of the running window.
    fn top_cap(&self) -> usize {
        self.params.top_k + self.params.max_excluded
    }

    fn in_window(&self, end: Option<i64>, pane: i64) -> bool {
        let w = self.params.windowing;
        end.is_some_and(|end| {
            let start_pane = w.pane(end) - w.panes_per_window();
            pane >= start_pane && pane < w.pane(end)
        })
    }

    /// Drop the sums of windows the running window has reached (or all, when none runs).
    fn prune_ahead(&mut self) {
        match self.next_end {
            Some(end) => self.ahead = self.ahead.split_off(&end.saturating_add(1)),
            None => self.ahead.clear(),
        }
    }

    /// Add a co-visitation increment (`other = Some`) or popularity (`None`) to a pane.
    pub fn apply(
        &mut self,
        kg: u32,
        pane: i64,
        item: &str,
        other: Option<&str>,
        weight: u64,
    ) -> Result<()> {
        let item = self.dict.intern(item);
        match other {
            Some(o) => {
                let o = self.dict.intern(o);
                self.apply_ids(kg, pane, item, Add::Row(&[(o, weight)]))
            }
            None => self.apply_ids(kg, pane, item, Add::Pop(weight)),
        }
    }

    /// Add co-visitation weights to one item's row in `pane` (the distributed runtime's
    /// exchange entries).
    pub fn apply_row_of(
        &mut self,
        kg: u32,
        pane: i64,
        item: &str,
        others: &[(Key, u64)],
    ) -> Result<()> {
        let item = self.dict.intern(item);
        self.apply_row(kg, pane, item, others)
    }

    /// Bring `item`'s entry in `pane` into memory if it is only in the store.
    fn warm(&mut self, kg: u32, pane: i64, item: Id) -> Result<()> {
        if !self.cold_panes.contains(&pane)
            || self.panes.get(&pane).is_some_and(|m| m.contains_key(&item))
        {
            return Ok(());
        }
        let Some(tier) = &self.tier else {
            return Ok(());
        };
        let key = self.dict.key(item).clone();
        if let Some(e) = load_entry(tier.store.as_ref(), kg, pane, &key, &mut self.dict)? {
            self.row_heap += e.row.heap_bytes();
            self.loads += 1;
            self.panes.entry(pane).or_default().insert(item, e);
        }
        Ok(())
    }

    /// Add to `item`'s entry in `pane`: popularity, or co-visitation weights to other items
    /// (looked up once for all of them).
    fn apply_ids(&mut self, kg: u32, pane: i64, item: Id, add: Add<'_>) -> Result<()> {
        self.warm(kg, pane, item)?;
        let in_win = self.in_window(self.next_end, pane);
        // A new entry's row starts at the size the item's row had in the pane before: rows
        // of one item are alike from pane to pane, and growing a large one by doubling
        // rehashes it several times.
        let size_hint = match add {
            Add::Row(_) if !self.panes.get(&pane).is_some_and(|m| m.contains_key(&item)) => self
                .panes
                .get(&(pane - 1))
                .and_then(|m| m.get(&item))
                .map_or(0, |e| e.row.len()),
            _ => 0,
        };
        let entries = self.panes.entry(pane).or_default();
        let entry = entries.entry(item).or_insert_with(|| PaneEntry {
            row: Row::with_capacity(size_hint),
            ..PaneEntry::default()
        });
        if size_hint > 0 && entry.row.is_empty() {
            // Just created: its reserved table counts from now on.
            self.row_heap += entry.row.heap_bytes();
        }
        entry.kg = kg;
        if !entry.dirty {
            entry.dirty = true;
            self.dirty.push((pane, item));
        }
        match add {
            Add::Row(others) => {
                let before = entry.row.heap_bytes();
                entry.row.touch(others);
                for &(o, w) in others {
                    entry.row.add(o, w);
                }
                self.row_heap += entry.row.heap_bytes() - before;
            }
            Add::Pop(w) => entry.pop += w,
        }
        let cap = self.top_cap();
        let dict = &self.dict;
        let add_to = |agg: &mut WinAgg| match add {
            Add::Row(others) => {
                agg.row.touch(others);
                for &(o, w) in others {
                    agg.add(o, w, cap, dict);
                }
            }
            Add::Pop(w) => agg.pop += w,
        };
        if in_win {
            // A partial cache holds exact sums for the items it has; others are summed from
            // their panes when requested.
            let agg = if self.win_complete {
                Some(self.win.entry(item).or_default())
            } else {
                self.win.get_mut(&item)
            };
            if let Some(agg) = agg {
                let before = agg.heap_bytes();
                add_to(agg);
                self.win_heap += agg.heap_bytes() - before;
            }
        }
        if !self.ahead.is_empty() {
            // The windows containing `pane` end at (pane + 1)·S … (pane + W/S)·S.
            let w = self.params.windowing;
            let first = (pane + 1).saturating_mul(w.slide);
            let last = w.last_window_end(pane);
            for sums in self.ahead.range_mut(first..=last).map(|(_, m)| m) {
                if let Some(agg) = sums.get_mut(&item) {
                    add_to(agg);
                }
            }
        }
        Ok(())
    }

    /// Apply one item's pre-aggregated increments (see [`ItemIncrements`]).
    pub fn apply_increments(&mut self, incs: &ItemIncrements) -> Result<()> {
        let item = self.dict.intern(&incs.item);
        for (pane, others) in &incs.panes {
            self.apply_row(incs.kg, *pane, item, others)?;
        }
        Ok(())
    }

    /// Add co-visitation weights `others` to `item`'s row in `pane`.
    fn apply_row(&mut self, kg: u32, pane: i64, item: Id, others: &[(Key, u64)]) -> Result<()> {
        let mut ids = std::mem::take(&mut self.scratch);
        ids.clear();
        ids.extend(others.iter().map(|(o, w)| (self.dict.intern(o), *w)));
        let applied = self.apply_ids(kg, pane, item, Add::Row(&ids));
        self.scratch = ids;
        applied
    }

    /// `item`'s sum over its entries in `panes` that `live` accepts, reading cold ones back.
    fn sum_panes(
        &mut self,
        kg: u32,
        item: Id,
        panes: RangeInclusive<i64>,
        live: impl Fn(i64) -> bool,
    ) -> Result<WinAgg> {
        let mut agg = WinAgg::default();
        let keys: Vec<i64> = self
            .panes
            .range(panes)
            .map(|(p, _)| *p)
            .filter(|p| live(*p))
            .collect();
        for p in keys {
            if let Some(e) = self.panes.get(&p).and_then(|m| m.get(&item)) {
                agg.add_pane(e);
            } else if let Some(tier) = self.tier.as_ref().filter(|_| self.cold_panes.contains(&p)) {
                // Read, not brought back: reads must not refill the hot tier.
                let key = self.dict.key(item).clone();
                if let Some(e) = load_entry(tier.store.as_ref(), kg, p, &key, &mut self.dict)? {
                    agg.add_pane(&e);
                    self.loads += 1;
                }
            }
        }
        Ok(agg)
    }

    /// Process one batch of messages (merged in key order) and advance to the batch's end.
    pub fn process_batch(
        &mut self,
        messages: impl Iterator<Item = Message>,
        frame: &BatchFrame,
        stats: &mut dyn StatsOut,
    ) -> Result<ItemOutput> {
        let mut out = ItemOutput::default();
        let mut crossings = frame.crossings.iter().peekable();
        for msg in messages {
            // Emit at every crossing before the first message that comes after it.
            while let Some(c) = crossings.peek() {
                if (c.seq, super::exchange::RANK_CROSSING) < msg.key {
                    self.advance(c.wm, &mut out, stats)?;
                    crossings.next();
                } else {
                    break;
                }
            }
            match msg.payload {
                Payload::Increments(items) => {
                    for incs in &items {
                        self.apply_increments(incs)?;
                    }
                }
                Payload::Request { kg, req } => {
                    self.request(*req, kg, &mut out)?;
                }
            }
        }
        for c in crossings {
            self.advance(c.wm, &mut out, stats)?;
        }
        self.advance(frame.wm_end, &mut out, stats)?;
        Ok(out)
    }

    /// Apply a request's popularity and recommend for its event.
    pub fn request(&mut self, req: RecRequest, kg: u32, out: &mut ItemOutput) -> Result<()> {
        let w = self.params.windowing;
        let ev = &req.event;
        let pane = w.pane(ev.ts);
        let item = self.dict.intern(&ev.item_id);
        if req.late && !self.params.emit_late {
            // Recorded upstream; nothing to count.
        } else if req.late {
            out.late.push(LateEvent {
                event_id: ev.event_id.clone(),
                user_id: ev.user_id.clone(),
                item_id: ev.item_id.clone(),
                kind: ev.kind,
                ts: ev.ts,
                watermark: req.wm,
            });
        } else {
            self.apply_ids(kg, pane, item, Add::Pop(u64::from(req.weight)))?;
        }
        let items = self.score(item, kg, pane, req.wm, &req.excluded)?;
        out.recs.push(PendingRec {
            seq: req.seq,
            wm: req.wm,
            rec: Recommendation {
                event_id: req.event.event_id,
                user_id: req.event.user_id,
                item_id: req.event.item_id,
                ts: req.event.ts,
                items,
            },
            excluded: req.excluded,
        });
        Ok(())
    }

    /// Co-visitation candidates of `item` over the live panes of the window ending at the
    /// slide boundary after `pane`.
    fn score(
        &mut self,
        item: Id,
        kg: u32,
        pane: i64,
        wm: i64,
        excluded: &[Key],
    ) -> Result<Vec<Scored>> {
        let w = self.params.windowing;
        let k = self.params.top_k;
        let cap = self.top_cap();
        let end = (pane + 1).saturating_mul(w.slide);
        let first = pane + 1 - w.panes_per_window();
        let excluded: Vec<Id> = excluded.iter().filter_map(|x| self.dict.get(x)).collect();
        let (pop, ranked) = if self.next_end == Some(end) && !w.emitted(end, wm) {
            // The running window: all of its panes are live (it is not emitted yet at the
            // request's watermark; distributed receivers may trail the sender's watermark).
            if !self.win.contains_key(&item) {
                if self.win_complete {
                    return Ok(Vec::new());
                }
                let agg = self.sum_panes(kg, item, first..=pane, |_| true)?;
                if agg.pop == 0 && agg.row.is_empty() {
                    return Ok(Vec::new());
                }
                self.win_heap += agg.heap_bytes();
                self.win.insert(item, agg);
            }
            let agg = self.win.get_mut(&item).expect("present or inserted above");
            agg.used = self.round;
            let before = agg.heap_bytes();
            agg.ensure_top(cap, &self.dict);
            self.win_heap = self.win_heap + agg.heap_bytes() - before;
            (agg.pop, agg.top.iter().map(|(w, id)| (*id, *w)).collect())
        } else if self.next_end.is_none_or(|n| end > n) && !w.emitted(end, wm) {
            // A window after the running one: every pane of it is live (its first pane's last
            // window is this one, which is not emitted).
            if let std::collections::btree_map::Entry::Vacant(v) = self.ahead.entry(end) {
                v.insert(FastMap::default());
                // Bounded: a window dropped here is summed again if it is requested again.
                while self.ahead.len() > MAX_AHEAD_WINDOWS {
                    let (&lowest, _) = self.ahead.first_key_value().expect("not empty");
                    let victim = if lowest == end {
                        *self.ahead.last_key_value().expect("not empty").0
                    } else {
                        lowest
                    };
                    self.ahead.remove(&victim);
                }
            }
            if !self.ahead[&end].contains_key(&item) {
                let agg = self.sum_panes(kg, item, first..=pane, |_| true)?;
                self.ahead
                    .get_mut(&end)
                    .expect("inserted above")
                    .insert(item, agg);
            }
            let agg = self
                .ahead
                .get_mut(&end)
                .and_then(|m| m.get_mut(&item))
                .expect("inserted above");
            agg.ensure_top(cap, &self.dict);
            (agg.pop, agg.top.iter().map(|(w, id)| (*id, *w)).collect())
        } else {
            let agg = self.sum_panes(kg, item, first..=pane, |p| w.pane_live(p, wm))?;
            // Rank first, exclude after: the top K + |X| always hold the top K non-excluded
            // items, and a row is often far longer than X.
            (agg.pop, self.dict.top(&agg.row, k + excluded.len()))
        };
        if pop == 0 {
            return Ok(Vec::new());
        }
        let pop = pop as f64;
        Ok(ranked
            .into_iter()
            .filter(|(id, _)| !excluded.contains(id))
            .take(k)
            .map(|(id, c)| Scored {
                item_id: self.dict.key(id).clone(),
                score: c as f64 / pop,
            })
            .collect())
    }

    /// Move the watermark to `wm`: emit every window it completes, delete dead panes.
    pub fn advance(
        &mut self,
        wm: i64,
        out: &mut ItemOutput,
        stats: &mut dyn StatsOut,
    ) -> Result<()> {
        if wm <= self.wm {
            return Ok(());
        }
        self.wm = wm;
        let w = self.params.windowing;
        // Never skip a window that is still open: data for it may still arrive.
        let open = w.first_open_end(wm).unwrap_or(i64::MAX);
        if self.next_end.is_none() {
            let Some(first) = self.panes.keys().next().copied() else {
                self.next_end = w.first_open_end(wm).filter(|e| *e != WM_MIN);
                return Ok(());
            };
            self.reposition(((first + 1) * w.slide).min(open));
        }
        while let Some(end) = self.next_end {
            if !w.emitted(end, wm) {
                break;
            }
            let empty = if self.win_complete {
                self.win.is_empty()
            } else {
                let start = w.pane(end) - w.panes_per_window();
                self.panes.range(start..w.pane(end)).next().is_none()
            };
            if empty {
                // Skip empty windows: jump to the first window of the next non-empty pane.
                match self.panes.range(w.pane(end)..).next().map(|(p, _)| *p) {
                    Some(p) => {
                        let target = ((p + 1) * w.slide).min(open);
                        if target > end {
                            self.reposition(target);
                            continue;
                        }
                    }
                    None => {
                        self.next_end = w.first_open_end(wm).map(|e| e.max(end));
                        break;
                    }
                }
            }
            if self.win_complete {
                self.emit(end, out, stats);
            } else {
                self.emit_cold(end, out, stats)?;
            }
            self.slide();
        }
        // Panes whose last window is emitted can never be read or written again.
        let dead: Vec<i64> = self
            .panes
            .keys()
            .take_while(|p| !w.pane_live(**p, wm))
            .copied()
            .collect();
        if let Some(last) = dead.last() {
            self.expired_below = Some(self.expired_below.unwrap_or(i64::MIN).max(last + 1));
        }
        for p in dead {
            if let Some(entries) = self.panes.remove(&p) {
                self.row_heap -= entries.values().map(|e| e.row.heap_bytes()).sum::<usize>();
            }
            self.cold_panes.remove(&p);
        }
        if wm == WM_MAX {
            self.next_end = None;
        }
        self.prune_ahead();
        Ok(())
    }

    /// Start the running window at `end`, summing its panes from scratch.
    fn reposition(&mut self, end: i64) {
        let w = self.params.windowing;
        self.next_end = Some(end);
        self.win.clear();
        self.win_heap = 0;
        self.prune_ahead();
        let first = w.pane(end) - w.panes_per_window();
        // With cold panes in the window its sums are only a cache, filled per request; also
        // when summing every item of it could outgrow the budget (the sums take at most
        // what the panes' entries take).
        self.win_complete = self.cold_panes.range(first..w.pane(end)).next().is_none()
            && self.tier.as_ref().is_none_or(|t| {
                let parts: usize = self
                    .panes
                    .range(first..w.pane(end))
                    .map(|(_, m)| {
                        heap::table::<(Id, WinAgg)>(m.capacity())
                            + m.values().map(|e| e.row.heap_bytes()).sum::<usize>()
                    })
                    .sum();
                self.hot_bytes() + parts <= t.budget
            });
        if !self.win_complete {
            return;
        }
        for entries in self.panes.range(first..w.pane(end)).map(|(_, e)| e) {
            for (item, e) in entries {
                let agg = self.win.entry(*item).or_default();
                let before = agg.heap_bytes();
                agg.add_pane(e);
                self.win_heap += agg.heap_bytes() - before;
            }
        }
    }

    fn slide(&mut self) {
        let w = self.params.windowing;
        let Some(end) = self.next_end else { return };
        let next = end + w.slide;
        if !self.win_complete || self.cold_panes.contains(&w.pane(end)) {
            // A cache of some items cannot slide (their entries may be cold): start afresh.
            self.reposition(next);
            return;
        }
        let leaving = w.pane(end) - w.panes_per_window();
        if let Some(entries) = self.panes.get(&leaving) {
            for (item, e) in entries {
                if let Some(a) = self.win.get_mut(item) {
                    if a.sub_pane(e) {
                        self.win_heap -= a.heap_bytes();
                        self.win.remove(item);
                    }
                }
            }
        }
        if let Some(entries) = self.panes.get(&w.pane(end)) {
            for (item, e) in entries {
                let agg = self.win.entry(*item).or_default();
                let before = agg.heap_bytes();
                agg.add_pane(e);
                self.win_heap += agg.heap_bytes() - before;
            }
        }
        self.next_end = Some(next);
    }

    /// Emit the running window: its ItemStats one by one into `stats` (a window can hold a
    /// million items; they are never all built at once) and its local trending list.
    fn emit(&mut self, end: i64, out: &mut ItemOutput, stats: &mut dyn StatsOut) {
        let p = self.params;
        let start = end - p.windowing.size;
        let cap = self.top_cap();
        let mut any = false;
        let skip = &self.emitted_through;
        let dict = &self.dict;
        let already = |item: &Key| {
            !skip.through.is_empty()
                && skip
                    .through
                    .get(&crate::keygroup::key_group(
                        item.as_bytes(),
                        skip.key_groups,
                    ))
                    .is_some_and(|t| p.windowing.emitted(end, *t))
        };
        let mut top_src: Vec<(Id, u64)> = Vec::new();
        for (id, agg) in self.win.iter_mut().filter(|(_, a)| a.pop > 0) {
            let item = dict.key(*id);
            if already(item) {
                continue;
            }
            any = true;
            top_src.push((*id, agg.pop));
            if p.emit_stats {
                // The cached candidates are the row's exact top `cap`: reuse them when they
                // cover the neighbour limit.
                let neighbors: Vec<Neighbor> = if agg.top_valid && p.neighbor_limit <= cap {
                    agg.top
                        .iter()
                        .take(p.neighbor_limit)
                        .map(|(w, k)| Neighbor {
                            item_id: dict.key(*k).clone(),
                            weight: *w,
                        })
                        .collect()
                } else {
                    dict.top(&agg.row, p.neighbor_limit)
                        .into_iter()
                        .map(|(k, w)| Neighbor {
                            item_id: dict.key(k).clone(),
                            weight: w,
                        })
                        .collect()
                };
                stats.item_stats(ItemStats {
                    item_id: item.clone(),
                    window_start: start,
                    window_end: end,
                    popularity: agg.pop,
                    neighbors,
                });
            }
        }
        if any {
            out.windows_emitted += 1;
            let top = top_n_by(top_src.into_iter(), p.trending_capacity, |a, b| {
                dict.before(*a, *b)
            })
            .into_iter()
            .map(|(k, w)| (dict.key(k).clone(), w))
            .collect();
            out.trending.push((end, top));
        }
    }

    /// Emit a window that has cold panes: write its changed hot entries back, then sum its
    /// panes from the store, one key group at a time (memory: one key group's window).
    fn emit_cold(
        &mut self,
        end: i64,
        out: &mut ItemOutput,
        stats: &mut dyn StatsOut,
    ) -> Result<()> {
        let p = self.params;
        let w = p.windowing;
        let tier = self
            .tier
            .as_ref()
            .expect("only a stage with a store has cold panes");
        let (first, last) = (w.pane(end) - w.panes_per_window(), w.pane(end) - 1);
        let mut writer = tier.store.writer();
        for (pane, entries) in self.panes.range_mut(first..=last) {
            for (id, e) in entries.iter_mut().filter(|(_, e)| e.dirty) {
                put_entry(writer.as_mut(), *pane, *id, e, &self.dict)?;
                // Still listed in `dirty`: the next snapshot writes it once more, harmlessly.
                e.dirty = false;
            }
        }
        writer.finish()?;
        let skip = &self.emitted_through;
        let mut any = false;
        let mut trending: Vec<(Key, u64)> = Vec::new();
        for kg in tier.owned.clone() {
            if !skip.through.is_empty() && skip.through.get(&kg).is_some_and(|t| w.emitted(end, *t))
            {
                continue;
            }
            let mut sums = WindowSums::default();
            tier.store.scan_panes(kg, first..last + 1, &mut sums)?;
            let sums = sums.finish();
            let listed = sums.iter().filter(|(_, (pop, _))| *pop > 0);
            let top = top_n_by(
                listed.clone().map(|(k, (pop, _))| (k, *pop)),
                p.trending_capacity,
                |a, b| a.as_bytes() < b.as_bytes(),
            );
            trending.extend(top.into_iter().map(|(k, c)| (k.clone(), c)));
            for (item, (pop, row)) in listed {
                any = true;
                if p.emit_stats {
                    let neighbors = top_n_by(
                        row.iter().map(|(k, c)| (k, *c)),
                        p.neighbor_limit,
                        |a, b| a.as_bytes() < b.as_bytes(),
                    )
                    .into_iter()
                    .map(|(k, c)| Neighbor {
                        item_id: k.clone(),
                        weight: c,
                    })
                    .collect();
                    stats.item_stats(ItemStats {
                        item_id: item.clone(),
                        window_start: end - w.size,
                        window_end: end,
                        popularity: *pop,
                        neighbors,
                    });
                }
            }
        }
        if any {
            out.windows_emitted += 1;
            let top = top_n_by(
                trending.iter().map(|(k, c)| (k, *c)),
                p.trending_capacity,
                |a, b| a.as_bytes() < b.as_bytes(),
            )
            .into_iter()
            .map(|(k, c)| (k.clone(), c))
            .collect();
            out.trending.push((end, top));
        }
        Ok(())
    }

    /// Between batches: when the hot tier is over budget, drop the least recently requested
    /// window sums (derived state, summed again on a miss); if that is not enough, drop them
    /// all and move whole panes' entries to the store, oldest first (the newest takes most
    /// increments), the changed ones written back in one batch; down to 80 % of the budget.
    pub fn maintain(&mut self) -> Result<()> {
        self.round = self.round.wrapping_add(1);
        let Some(tier) = &self.tier else {
            return Ok(());
        };
        if self.hot_bytes() <= tier.budget {
            return Ok(());
        }
        // Items whose entries all left memory (evicted, expired) still have ids: rebuild the
        // dictionary once it is a large share of the budget and has doubled since the last
        // rebuild (so the work is amortised).
        if self.dict.heap_bytes() > tier.budget / 4 && self.dict.keys.len() > 2 * self.dict_live {
            self.compact_dict();
        }
        let Some(tier) = &self.tier else {
            return Ok(());
        };
        let total = self.hot_bytes();
        if total <= tier.budget {
            return Ok(());
        }
        let target = tier.budget / 5 * 4;
        let slot = heap::table::<(Id, WinAgg)>(7) / 8;
        let sum_bytes = |a: &WinAgg| slot + a.heap_bytes();
        let sums = heap::table::<(Id, WinAgg)>(self.win.capacity()) + self.win_heap;
        if total - sums <= target {
            // Window sums alone: oldest requests first, until under the target.
            let by_age: Vec<(u32, usize)> = self
                .win
                .values()
                .map(|a| (self.round.wrapping_sub(a.used), sum_bytes(a)))
                .collect();
            let Some(cutoff) = super::eviction_cutoff(by_age, total, target) else {
                return Ok(());
            };
            let round = self.round;
            let win_heap = &mut self.win_heap;
            self.win.retain(|_, a| {
                let keep = round.wrapping_sub(a.used) < cutoff;
                if !keep {
                    *win_heap -= a.heap_bytes();
                }
                keep
            });
            // A hash table never gives memory back by itself.
            self.win.shrink_to_fit();
            self.ahead.clear();
            self.win_complete = false;
            return Ok(());
        }
        self.win = FastMap::default();
        self.win_heap = 0;
        self.ahead.clear();
        self.win_complete = false;
        let mut out = tier.store.writer();
        let panes: Vec<i64> = self.panes.keys().copied().collect();
        for pane in panes {
            if self.hot_bytes() <= target {
                break;
            }
            let entries = std::mem::take(self.panes.get_mut(&pane).expect("listed above"));
            if entries.is_empty() {
                continue;
            }
            self.cold_panes.insert(pane);
            self.evictions += entries.len() as u64;
            for (id, e) in entries {
                self.row_heap -= e.row.heap_bytes();
                if e.dirty {
                    put_entry(out.as_mut(), pane, id, &e, &self.dict)?;
                }
            }
        }
        out.finish()
    }

    /// Rebuild the dictionary with only the items the hot tier refers to, renumbering them
    /// everywhere (entries in the store hold item strings, not ids).
    fn compact_dict(&mut self) {
        let old = std::mem::take(&mut self.dict);
        let mut r = Renumber {
            new_ids: vec![Id::MAX; old.keys.len()],
            old,
            dict: Dict::default(),
        };
        for entries in self.panes.values_mut() {
            *entries = std::mem::take(entries)
                .into_iter()
                .map(|(id, mut e)| {
                    r.row(&mut e.row);
                    (r.id(id), e)
                })
                .collect();
        }
        r.sums(&mut self.win);
        for sums in self.ahead.values_mut() {
            r.sums(sums);
        }
        // Every hot entry has its new id by now; a dirty entry that is no longer in memory
        // has nothing left to write (a snapshot would skip it).
        self.dirty = self
            .dirty
            .iter()
            .filter_map(|(pane, id)| {
                let new = r.new_ids[*id as usize];
                (new != Id::MAX).then_some((*pane, new))
            })
            .collect();
        self.dict = r.dict;
        self.dict_live = self.dict.keys.len();
        self.dict_rebuilds += 1;
        self.row_heap = self
            .panes
            .values()
            .flat_map(FastMap::values)
            .map(|e| e.row.heap_bytes())
            .sum();
        self.win_heap = self.win.values().map(WinAgg::heap_bytes).sum();
    }

    /// State changes since the last snapshot; `owned` are this worker's key groups.
    pub fn snapshot(
        &mut self,
        owned: std::ops::Range<u32>,
        out: &mut dyn StateWriter,
    ) -> Result<()> {
        if let Some(below) = self.expired_below.take() {
            for kg in owned {
                out.delete_panes_below(kg, below)?;
            }
        }
        for (pane, id) in self.dirty.drain(..) {
            // Entries of panes deleted since they changed are covered by the range delete.
            let Some(e) = self.panes.get_mut(&pane).and_then(|p| p.get_mut(&id)) else {
                continue;
            };
            e.dirty = false;
            put_entry(out, pane, id, e, &self.dict)?;
        }
        // Listed again from empty: one checkpoint interval's entries are not kept allocated.
        self.dirty.shrink_to_fit();
        Ok(())
    }

    /// A visitor that loads key group `kg`'s stored pane entries (a restore; see
    /// [`StateStore::scan_panes`]). With a store attached (which holds the entries), those
    /// beyond half the budget (the stage's least share) stay there: their pane is marked
    /// cold and they are read on use.
    pub fn restorer(&mut self, kg: u32) -> Restorer<'_> {
        Restorer {
            stage: self,
            kg,
            current: None,
        }
    }

    /// Pane entries whose panes are partly in the store only.
    pub fn cold_panes(&self) -> usize {
        self.cold_panes.len()
    }

    /// Heap bytes of the item dictionary (part of [`hot_bytes`](Self::hot_bytes)).
    pub fn dict_bytes(&self) -> usize {
        self.dict.heap_bytes()
    }

    /// After restoring all entries: resume at watermark `wm`.
    pub fn resume(&mut self, wm: i64) {
        self.wm = wm;
        let w = self.params.windowing;
        match w.first_open_end(wm) {
            Some(WM_MIN) | None => self.next_end = None,
            Some(end) => self.reposition(end),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The incrementally kept candidates always equal a fresh ranking of the row, including
    /// ties broken by item id and entries climbing into and out of the top.
    #[test]
    fn cached_top_candidates_equal_a_fresh_ranking() {
        let mut dict = Dict::default();
        // Ids interned in an order unrelated to their byte order, so ties exercise it.
        let ids: Vec<Id> = (0..60u32)
            .map(|i| dict.intern(&format!("i{}", (i * 37) % 60)))
            .collect();
        for cap in [1usize, 5, 40, 100] {
            let mut agg = WinAgg::default();
            agg.ensure_top(cap, &dict);
            let mut rng = crate::testing::Xorshift(0x9e37_79b9_7f4a_7c15);
            for step in 0..5_000 {
                let x = rng.next();
                let j = ids[(x % ids.len() as u64) as usize];
                agg.add(j, 1 + (x >> 32) % 3, cap, &dict);
                let fresh: Vec<(u64, Id)> = dict
                    .top(&agg.row, cap)
                    .into_iter()
                    .map(|(k, w)| (w, k))
                    .collect();
                assert!(agg.top_valid);
                assert_eq!(agg.top, fresh, "cap {cap}, step {step}");
            }
        }
    }
}
