//! The user-keyed stage: per-user history → co-visitation increments and a recommendation
//! request per event.

use std::collections::VecDeque;
use std::sync::Arc;

use super::exchange::{Exchange, RecRequest};
use super::heap;
use super::store::{StateStore, StateWriter};
use super::window::Windowing;
use super::{FastMap, Key, Stamped};
use crate::event::EventType;
use crate::Result;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistEntry {
    pub item: Key,
    pub item_kg: u32,
    pub ts: i64,
    pub kind: EventType,
}

#[derive(Clone, Debug, Default)]
struct History {
    entries: VecDeque<HistEntry>,
    kg: u32,
    /// Changed since it was last written to the store (snapshot or eviction).
    dirty: bool,
    /// The maintenance round it was last used in (recency for eviction).
    used: u32,
}

/// Bytes of one slot of the hot tier's tables: key and history header (item and user ids up
/// to 24 bytes are inline), plus the hash table's control byte.
const SLOT_BYTES: usize = std::mem::size_of::<(Key, History)>() + 1;

/// The histories are split into this many tables by key group: a table grows by doubling
/// (for a moment holding the old and the new one) and shrinks by copying, and with 10 M
/// users one table was 300 MB.
const SHARDS: usize = 64;

/// Heap bytes of the hot tier's tables holding `users` histories in one table (for sizing
/// budgets in tests of the tiers).
pub fn history_table_bytes(users: usize) -> usize {
    heap::table::<(Key, History)>(users)
}

fn shard(kg: u32) -> usize {
    kg as usize % SHARDS
}

/// Heap bytes of a history's entries: what is allocated, not what is used.
fn entry_bytes(entries: &VecDeque<HistEntry>) -> usize {
    heap::vec::<HistEntry>(entries.capacity())
}

#[derive(Clone, Copy, Debug)]
pub struct UserParams {
    pub history_length: usize,
    pub session_gap: i64,
    pub exclude_purchased: bool,
    pub windowing: Windowing,
}

/// Histories in two tiers: a hot in-memory map, bounded by a byte budget, in front of a
/// [`StateStore`] (RocksDB) that holds everything else. A history is read from the store on
/// first use and stays hot while it is used; when the hot tier outgrows the budget, the least
/// recently used histories leave it, the changed ones written back in one batch. Without a
/// store (or with a budget nothing outgrows) every history stays in memory.
pub struct UserStage {
    params: UserParams,
    /// By `shard(key group)`.
    histories: Vec<FastMap<Key, History>>,
    /// Users whose history was deleted since the last snapshot (their keys must go too).
    deleted: Vec<(u32, Key)>,
    /// Users (key group, id) whose history became dirty since the last snapshot, each
    /// listed once.
    dirty: Vec<(u32, Key)>,
    store: Option<Arc<dyn StateStore>>,
    budget: usize,
    /// Heap bytes of the hot tier's entries (see `entry_bytes`; the table is added by
    /// `hot_bytes()`).
    entry_bytes: usize,
    round: u32,
    /// Histories read from the store and written back to it, since the start.
    pub loads: u64,
    pub evictions: u64,
}

impl UserStage {
    pub fn new(params: UserParams) -> Self {
        Self {
            params,
            histories: (0..SHARDS).map(|_| FastMap::default()).collect(),
            deleted: Vec::new(),
            dirty: Vec::new(),
            store: None,
            budget: usize::MAX,
            entry_bytes: 0,
            round: 0,
            loads: 0,
            evictions: 0,
        }
    }

    /// Back the stage with `store` and keep at most about `budget` bytes of histories in
    /// memory. The store must hold every history not in memory (a restored checkpoint does).
    pub fn set_store(&mut self, store: Arc<dyn StateStore>, budget: usize) {
        self.store = Some(store);
        self.budget = budget;
    }

    /// Change the budget (see `share_budget`).
    pub fn set_budget(&mut self, budget: usize) {
        if self.store.is_some() {
            self.budget = budget;
        }
    }

    /// Let go of the store (before the database behind it is closed or replaced).
    pub fn detach_store(&mut self) {
        self.store = None;
        self.budget = usize::MAX;
    }

    /// Histories in memory.
    pub fn users(&self) -> usize {
        self.histories.iter().map(FastMap::len).sum()
    }

    /// Heap bytes of the hot tier: its tables and every history's entries as allocated, and
    /// the lists of users to write at the next snapshot.
    pub fn hot_bytes(&self) -> usize {
        let tables: usize = self
            .histories
            .iter()
            .map(|t| heap::table::<(Key, History)>(t.capacity()))
            .sum();
        tables
            + self.entry_bytes
            + heap::vec::<(u32, Key)>(self.dirty.capacity() + self.deleted.capacity())
    }

    /// The user's history, from memory or the store, or a new empty one.
    fn history(&mut self, user: &str, kg: u32) -> Result<&mut History> {
        let round = self.round;
        let table = &mut self.histories[shard(kg)];
        if !table.contains_key(user) {
            let loaded = match &self.store {
                Some(store) => store.history(kg, user)?,
                None => None,
            };
            let entries = match loaded {
                Some(entries) => {
                    self.loads += 1;
                    entries
                }
                None => VecDeque::new(),
            };
            self.entry_bytes += entry_bytes(&entries);
            table.insert(
                Key::from(user),
                History {
                    entries,
                    kg,
                    dirty: false,
                    used: round,
                },
            );
        }
        let h = table.get_mut(user).expect("inserted above");
        h.used = round;
        Ok(h)
    }

    /// Append to a history (dropping the oldest beyond N) and mark it dirty.
    fn append(&mut self, user: &str, kg: u32, entry: HistEntry) -> Result<()> {
        let n = self.params.history_length;
        let hist = self.history(user, kg)?;
        let (grown, newly_dirty) = push(hist, entry, n);
        self.account(kg, user, grown, newly_dirty);
        Ok(())
    }

    /// Book an append: its growth of the hot tier and, once per snapshot, the dirty user.
    fn account(&mut self, kg: u32, user: &str, grown: usize, newly_dirty: bool) {
        self.entry_bytes += grown;
        if newly_dirty {
            self.dirty.push((kg, Key::from(user)));
        }
    }

    /// Apply one event (in read order for this user) and send its increments and request.
    /// Returns whether the event was late (it then contributes nothing, see the semantics).
    pub fn process(&mut self, ev: &Stamped, user_kg: u32, x: &mut impl Exchange) -> Result<bool> {
        x.begin_event(ev.seq);
        let p = self.params;
        let win = p.windowing;
        let e = &ev.event;
        let t = e.ts;
        let late = win.is_late(t, ev.wm);
        let valid = |h: &HistEntry| {
            Windowing::history_entry_valid(h.ts, t, ev.wm, p.session_gap, win.lateness)
        };
        let routing = x.routing();
        let item_kg = routing.key_group(e.item_id.as_bytes());
        let hist = self.history(&e.user_id, user_kg)?;
        if !late {
            let pane = win.pane(t);
            let w = u64::from(ev.weight);
            for h in hist.entries.iter().filter(|h| valid(h)) {
                x.add(item_kg, pane, &e.item_id, &h.item, w);
                x.add(h.item_kg, pane, &h.item, &e.item_id, w);
            }
        }
        let (grown, newly_dirty) = push(
            hist,
            HistEntry {
                item: e.item_id.clone(),
                item_kg,
                ts: t,
                kind: e.kind,
            },
            p.history_length,
        );
        let mut excluded: Vec<Key> = Vec::new();
        if p.exclude_purchased {
            for h in hist
                .entries
                .iter()
                .filter(|h| h.kind == EventType::Purchase && valid(h))
            {
                if !excluded.contains(&h.item) {
                    excluded.push(h.item.clone());
                }
            }
        }
        self.account(user_kg, &e.user_id, grown, newly_dirty);
        x.request(
            item_kg,
            RecRequest {
                seq: ev.seq,
                wm: ev.wm,
                event: e.clone(),
                weight: ev.weight,
                late,
                excluded,
            },
        );
        Ok(late)
    }

    /// Append an entry to a user's history without producing anything: recovery replays the
    /// changelog of history appends through this.
    pub fn replay_append(&mut self, user_kg: u32, user: &str, entry: HistEntry) -> Result<()> {
        self.append(user, user_kg, entry)
    }

    /// Drop the histories in memory whose entries are all expired at watermark `wm`.
    /// Expired histories that were evicted to the store stay there (their entries never
    /// count again; they only take disk space) until the user's next event loads them.
    pub fn expire(&mut self, wm: i64) {
        let bound = wm
            .saturating_sub(self.params.session_gap)
            .saturating_sub(self.params.windowing.lateness);
        let deleted = &mut self.deleted;
        let mut freed = 0;
        for table in &mut self.histories {
            table.retain(|user, h| {
                let keep = h.entries.iter().any(|e| e.ts >= bound);
                if !keep {
                    deleted.push((h.kg, user.clone()));
                    freed += entry_bytes(&h.entries);
                }
                keep
            });
        }
        self.entry_bytes -= freed;
    }

    /// Between batches: when the hot tier is over budget, move its least recently used
    /// fifth (at least) to the store, writing the changed ones back in bounded batches.
    pub fn maintain(&mut self) -> Result<()> {
        self.round = self.round.wrapping_add(1);
        let Some(store) = &self.store else {
            return Ok(());
        };
        let total = self.hot_bytes();
        if total <= self.budget {
            return Ok(());
        }
        let target = self.budget / 5 * 4;
        // What leaving frees: the entries, and the history's share of a table shrunk to fit
        // (counted twice: a shrunk table still rounds up to a power of two).
        let leaving = |h: &History| entry_bytes(&h.entries) + 2 * SLOT_BYTES;
        let by_age: Vec<(u32, usize)> = self
            .histories
            .iter()
            .flat_map(FastMap::values)
            .map(|h| (self.round.wrapping_sub(h.used), leaving(h)))
            .collect();
        let Some(cutoff) = super::eviction_cutoff(by_age, total, target) else {
            return Ok(());
        };
        let round = self.round;
        let mut out = store.writer();
        let mut evicted = 0u64;
        let mut freed = 0;
        for table in &mut self.histories {
            let mut failed = Ok(());
            table.retain(|user, h| {
                if failed.is_err() || round.wrapping_sub(h.used) < cutoff {
                    return true;
                }
                if h.dirty {
                    failed = out.put_history(h.kg, user, &h.entries);
                    if failed.is_err() {
                        return true;
                    }
                }
                evicted += 1;
                freed += entry_bytes(&h.entries);
                false
            });
            // A hash table never gives memory back by itself.
            table.shrink_to_fit();
            failed?;
        }
        out.finish()?;
        self.entry_bytes -= freed;
        self.evictions += evicted;
        Ok(())
    }

    /// State changes since the last snapshot.
    pub fn snapshot(&mut self, out: &mut dyn StateWriter) -> Result<()> {
        for (kg, user) in self.deleted.drain(..) {
            out.delete_history(kg, &user)?;
        }
        for (kg, user) in self.dirty.drain(..) {
            // Gone (expired: deleted above; evicted: written back then) or already written.
            let Some(h) = self.histories[shard(kg)].get_mut(user.as_str()) else {
                continue;
            };
            if !h.dirty {
                continue;
            }
            h.dirty = false;
            out.put_history(h.kg, &user, &h.entries)?;
        }
        // Listed again from empty: a checkpoint interval's users are not kept allocated.
        self.deleted.shrink_to_fit();
        self.dirty.shrink_to_fit();
        Ok(())
    }
}

/// Append `entry`, dropping the oldest beyond `n`; returns (bytes the entries grew by,
/// whether the history just became dirty).
fn push(hist: &mut History, entry: HistEntry, n: usize) -> (usize, bool) {
    let entries = &mut hist.entries;
    let before = entries.capacity();
    while !entries.is_empty() && entries.len() >= n {
        entries.pop_front();
    }
    if n > 0 {
        if entries.len() == entries.capacity() {
            // Grow by doubling but never past N: most users have one or two entries, and a
            // full history holds exactly N.
            let cap = (entries.capacity() * 2).clamp(1, n);
            entries.reserve_exact(cap - entries.len());
        }
        entries.push_back(entry);
    }
    let newly_dirty = !hist.dirty;
    hist.dirty = true;
    (
        (entries.capacity() - before) * std::mem::size_of::<HistEntry>(),
        newly_dirty,
    )
}
