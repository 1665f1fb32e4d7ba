//! The item-keyed stage: pane-aggregated popularity and co-visitation, sliding-window
//! emission, and recommendations.
//!
//! State is kept per pane (O(1) work per increment, not W/S). A running sum over the panes of
//! the next window to emit makes emission and most recommendations O(row) instead of
//! O(W/S · row): sliding adds one pane and subtracts one.

use std::collections::hash_map::Entry;
use std::collections::BTreeMap;

use super::exchange::{Increment, Message, Payload, RecRequest};
use super::output::{top_n_by, ItemStats, LateEvent, Neighbor, Recommendation, Scored};
use super::window::{Windowing, WM_MAX, WM_MIN};
use super::{BatchFrame, FastMap, Key};
use crate::state::{codec, StateDescriptor, StateOp};

/// The item stage's only state: per (pane, item) popularity and co-visitation row.
pub const PANES: StateDescriptor = StateDescriptor {
    name: "panes",
    tag: b'P',
};

/// Windows ahead of the running one whose sums are kept (see `ItemStage::ahead`).
const MAX_AHEAD_WINDOWS: usize = 4;

/// A dense item number, local to one stage (see [`Dict`]).
type Id = u32;

/// Rows keyed by dense ids: a row update hashes a `u32`, never a string.
type Row = FastMap<Id, u64>;

/// The stage's item dictionary: ids are handed out in first-seen order and never reused, so
/// they are only meaningful inside this stage. Snapshots store the item strings, so the
/// dictionary itself needs no persisting: a restore rebuilds it.
#[derive(Default)]
struct Dict {
    ids: FastMap<Key, Id>,
    keys: Vec<Key>,
}

impl Dict {
    fn intern(&mut self, key: &str) -> Id {
        if let Some(id) = self.ids.get(key) {
            return *id;
        }
        let id = self.keys.len() as Id;
        let key = Key::from(key);
        self.keys.push(key.clone());
        self.ids.insert(key, id);
        id
    }

    fn get(&self, key: &str) -> Option<Id> {
        self.ids.get(key).copied()
    }

    fn key(&self, id: Id) -> &Key {
        &self.keys[id as usize]
    }

    /// The rank order's tie-break: item ids ascending in byte order.
    fn before(&self, a: Id, b: Id) -> bool {
        self.key(a).as_bytes() < self.key(b).as_bytes()
    }

    /// `a` ranks before `b`: weight descending, then item id ascending.
    fn better(&self, a: (u64, Id), b: (u64, Id)) -> bool {
        a.0 > b.0 || (a.0 == b.0 && self.before(a.1, b.1))
    }

    fn top(&self, row: &Row, n: usize) -> Vec<(Id, u64)> {
        top_n_by(row.iter().map(|(k, w)| (*k, *w)), n, |a, b| {
            self.before(*a, *b)
        })
    }
}

#[derive(Clone, Debug, Default)]
struct PaneEntry {
    pop: u64,
    row: Row,
    kg: u32,
    dirty: bool,
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
}

impl WinAgg {
    fn add_pane(&mut self, e: &PaneEntry) {
        self.pop += e.pop;
        for (k, w) in &e.row {
            *self.row.entry(*k).or_insert(0) += w;
        }
        self.top_valid = false;
    }

    /// Subtract a pane that is part of this sum; returns whether the sum is now empty.
    fn sub_pane(&mut self, e: &PaneEntry) -> bool {
        self.pop -= e.pop;
        for (k, w) in &e.row {
            if let Some(v) = self.row.get_mut(k) {
                *v -= w;
                if *v == 0 {
                    self.row.remove(k);
                }
            }
        }
        self.top_valid = false;
        self.pop == 0 && self.row.is_empty()
    }

    /// Add `w` to `row[j]`, keeping `top` exact.
    fn add(&mut self, j: Id, w: u64, cap: usize, dict: &Dict) {
        let v = self.row.entry(j).or_insert(0);
        let old = *v;
        *v += w;
        let new = *v;
        if !self.top_valid || w == 0 || cap == 0 {
            return;
        }
        let top = &mut self.top;
        let full = top.len() >= cap;
        // `top` is the exact top `cap` under a strict order, so `j` is in it iff its old
        // value ranks at or above the last entry (or, not full, iff it was nonzero).
        let present = old > 0 && (!full || !dict.better(top[top.len() - 1], (old, j)));
        let mut pos = if present {
            let Some(i) = top.iter().position(|(_, id)| *id == j) else {
                self.top_valid = false;
                return;
            };
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
            return;
        };
        while pos > 0 && dict.better(top[pos], top[pos - 1]) {
            top.swap(pos, pos - 1);
            pos -= 1;
        }
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

/// What one worker's item stage produced in one batch.
#[derive(Default)]
pub struct ItemOutput {
    pub recs: Vec<PendingRec>,
    pub stats: Vec<ItemStats>,
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
        }
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
    pub fn apply(&mut self, kg: u32, pane: i64, item: &str, other: Option<&str>, weight: u64) {
        let item = self.dict.intern(item);
        let other = other.map(|o| self.dict.intern(o));
        self.apply_ids(kg, pane, item, other, weight);
    }

    fn apply_ids(&mut self, kg: u32, pane: i64, item: Id, other: Option<Id>, weight: u64) {
        let in_win = self.in_window(self.next_end, pane);
        let entry = self.panes.entry(pane).or_default().entry(item).or_default();
        entry.kg = kg;
        if !entry.dirty {
            entry.dirty = true;
            self.dirty.push((pane, item));
        }
        match other {
            Some(o) => *entry.row.entry(o).or_insert(0) += weight,
            None => entry.pop += weight,
        }
        let cap = self.top_cap();
        if in_win {
            let agg = self.win.entry(item).or_default();
            match other {
                Some(o) => agg.add(o, weight, cap, &self.dict),
                None => agg.pop += weight,
            }
        }
        if !self.ahead.is_empty() {
            // The windows containing `pane` end at (pane + 1)·S … (pane + W/S)·S.
            let w = self.params.windowing;
            let first = (pane + 1).saturating_mul(w.slide);
            let last = w.last_window_end(pane);
            for sums in self.ahead.range_mut(first..=last).map(|(_, m)| m) {
                if let Some(agg) = sums.get_mut(&item) {
                    match other {
                        Some(o) => agg.add(o, weight, cap, &self.dict),
                        None => agg.pop += weight,
                    }
                }
            }
        }
    }

    /// Process one batch of messages (merged in key order) and advance to the batch's end.
    pub fn process_batch(
        &mut self,
        messages: impl Iterator<Item = Message>,
        frame: &BatchFrame,
        kg_of: impl Fn(&[u8]) -> u32,
    ) -> ItemOutput {
        let mut out = ItemOutput::default();
        let mut crossings = frame.crossings.iter().peekable();
        for msg in messages {
            // Emit at every crossing before the first message that comes after it.
            while let Some(c) = crossings.peek() {
                if (c.seq, super::exchange::RANK_CROSSING) < msg.key {
                    self.advance(c.wm, &mut out);
                    crossings.next();
                } else {
                    break;
                }
            }
            match msg.payload {
                Payload::Increments(adds) => {
                    // Increments arrive grouped by item: look its id and key group up once.
                    let mut last: Option<(Key, Id, u32)> = None;
                    for Increment {
                        pane,
                        item,
                        other,
                        weight,
                    } in adds
                    {
                        let (id, kg) = match &last {
                            Some((k, id, kg)) if *k == item => (*id, *kg),
                            _ => {
                                let id = self.dict.intern(&item);
                                let kg = kg_of(item.as_bytes());
                                last = Some((item, id, kg));
                                (id, kg)
                            }
                        };
                        let other = self.dict.intern(&other);
                        self.apply_ids(kg, pane, id, Some(other), weight);
                    }
                }
                Payload::Request(req) => {
                    let kg = kg_of(req.event.item_id.as_bytes());
                    self.request(*req, kg, &mut out);
                }
            }
        }
        for c in crossings {
            self.advance(c.wm, &mut out);
        }
        self.advance(frame.wm_end, &mut out);
        out
    }

    /// Apply a request's popularity and recommend for its event.
    pub fn request(&mut self, req: RecRequest, kg: u32, out: &mut ItemOutput) {
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
            self.apply_ids(kg, pane, item, None, u64::from(req.weight));
        }
        let items = self.score(item, pane, req.wm, &req.excluded);
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
    }

    /// Co-visitation candidates of `item` over the live panes of the window ending at the
    /// slide boundary after `pane`.
    fn score(&mut self, item: Id, pane: i64, wm: i64, excluded: &[Key]) -> Vec<Scored> {
        let w = self.params.windowing;
        let k = self.params.top_k;
        let end = (pane + 1).saturating_mul(w.slide);
        let excluded: Vec<Id> = excluded.iter().filter_map(|x| self.dict.get(x)).collect();
        let (pop, ranked) = if self.next_end == Some(end) && !w.emitted(end, wm) {
            // The running window: all of its panes are live (it is not emitted yet at the
            // request's watermark; distributed receivers may trail the sender's watermark).
            let cap = self.top_cap();
            let Some(agg) = self.win.get_mut(&item) else {
                return Vec::new();
            };
            agg.ensure_top(cap, &self.dict);
            (agg.pop, agg.top.iter().map(|(w, id)| (*id, *w)).collect())
        } else if self.next_end.is_none_or(|n| end > n) && !w.emitted(end, wm) {
            // A window after the running one: every pane of it is live (its first pane's last
            // window is this one, which is not emitted).
            let cap = self.top_cap();
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
            let sums = self.ahead.get_mut(&end).expect("inserted above");
            let agg = match sums.entry(item) {
                Entry::Occupied(o) => o.into_mut(),
                Entry::Vacant(v) => {
                    let mut agg = WinAgg::default();
                    let first = pane + 1 - w.panes_per_window();
                    for entries in self.panes.range(first..=pane).map(|(_, e)| e) {
                        if let Some(e) = entries.get(&item) {
                            agg.add_pane(e);
                        }
                    }
                    v.insert(agg)
                }
            };
            agg.ensure_top(cap, &self.dict);
            (agg.pop, agg.top.iter().map(|(w, id)| (*id, *w)).collect())
        } else {
            let mut pop = 0;
            let mut row = Row::default();
            let first = pane + 1 - w.panes_per_window();
            for (p, entries) in self.panes.range(first..=pane) {
                if w.pane_live(*p, wm) {
                    if let Some(e) = entries.get(&item) {
                        pop += e.pop;
                        for (j, c) in &e.row {
                            *row.entry(*j).or_insert(0) += c;
                        }
                    }
                }
            }
            // Rank first, exclude after: the top K + |X| always hold the top K non-excluded
            // items, and a row is often far longer than X.
            (pop, self.dict.top(&row, k + excluded.len()))
        };
        if pop == 0 {
            return Vec::new();
        }
        let pop = pop as f64;
        ranked
            .into_iter()
            .filter(|(id, _)| !excluded.contains(id))
            .take(k)
            .map(|(id, c)| Scored {
                item_id: self.dict.key(id).clone(),
                score: c as f64 / pop,
            })
            .collect()
    }

    /// Move the watermark to `wm`: emit every window it completes, delete dead panes.
    pub fn advance(&mut self, wm: i64, out: &mut ItemOutput) {
        if wm <= self.wm {
            return;
        }
        self.wm = wm;
        let w = self.params.windowing;
        // Never skip a window that is still open: data for it may still arrive.
        let open = w.first_open_end(wm).unwrap_or(i64::MAX);
        if self.next_end.is_none() {
            let Some(first) = self.panes.keys().next().copied() else {
                self.next_end = w.first_open_end(wm).filter(|e| *e != WM_MIN);
                return;
            };
            self.reposition(((first + 1) * w.slide).min(open));
        }
        while let Some(end) = self.next_end {
            if !w.emitted(end, wm) {
                break;
            }
            if self.win.is_empty() {
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
            self.emit(end, out);
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
            self.panes.remove(&p);
        }
        if wm == WM_MAX {
            self.next_end = None;
        }
        self.prune_ahead();
    }

    /// Start the running window at `end`, summing its panes from scratch.
    fn reposition(&mut self, end: i64) {
        let w = self.params.windowing;
        self.next_end = Some(end);
        self.win.clear();
        self.prune_ahead();
        let first = w.pane(end) - w.panes_per_window();
        for entries in self.panes.range(first..w.pane(end)).map(|(_, e)| e) {
            for (item, e) in entries {
                self.win.entry(*item).or_default().add_pane(e);
            }
        }
    }

    fn slide(&mut self) {
        let w = self.params.windowing;
        let Some(end) = self.next_end else { return };
        let leaving = w.pane(end) - w.panes_per_window();
        if let Some(entries) = self.panes.get(&leaving) {
            for (item, e) in entries {
                if let Some(a) = self.win.get_mut(item) {
                    if a.sub_pane(e) {
                        self.win.remove(item);
                    }
                }
            }
        }
        if let Some(entries) = self.panes.get(&w.pane(end)) {
            for (item, e) in entries {
                self.win.entry(*item).or_default().add_pane(e);
            }
        }
        self.next_end = Some(end + w.slide);
    }

    fn emit(&mut self, end: i64, out: &mut ItemOutput) {
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
                out.stats.push(ItemStats {
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

    /// State changes since the last snapshot; `owned` are this worker's key groups.
    pub fn snapshot(&mut self, owned: std::ops::Range<u32>, ops: &mut Vec<StateOp>) {
        if let Some(below) = self.expired_below.take() {
            for kg in owned {
                ops.push(StateOp::DeleteRange(
                    codec::state_key(kg, PANES.tag, &codec::ordered_i64(i64::MIN)),
                    codec::state_key(kg, PANES.tag, &codec::ordered_i64(below)),
                ));
            }
        }
        for (pane, id) in self.dirty.drain(..) {
            // Entries of panes deleted since they changed are covered by the range delete.
            let Some(e) = self.panes.get_mut(&pane).and_then(|p| p.get_mut(&id)) else {
                continue;
            };
            e.dirty = false;
            let item = self.dict.key(id);
            let mut key = codec::ordered_i64(pane).to_vec();
            key.extend_from_slice(item.as_bytes());
            let mut v = Vec::with_capacity(12 + e.row.len() * 20);
            codec::put_u64(&mut v, e.pop);
            codec::put_u32(&mut v, e.row.len() as u32);
            for (k, w) in &e.row {
                codec::put_str(&mut v, self.dict.key(*k));
                codec::put_u64(&mut v, *w);
            }
            ops.push(StateOp::Put(codec::state_key(e.kg, PANES.tag, &key), v));
        }
    }

    /// Load one pane entry written by [`snapshot`](Self::snapshot).
    pub fn restore(&mut self, kg: u32, key: &[u8], value: &[u8]) -> crate::Result<()> {
        let pane = codec::from_ordered_i64(key)?;
        let item = std::str::from_utf8(&key[8..])
            .map_err(|_| crate::Error::CorruptState("item key is not UTF-8".into()))?;
        let item = self.dict.intern(item);
        let mut r = codec::Reader::new(value);
        let pop = r.u64()?;
        let n = r.u32()? as usize;
        let mut row = Row::with_capacity_and_hasher(n, Default::default());
        for _ in 0..n {
            let k = self.dict.intern(r.str()?);
            row.insert(k, r.u64()?);
        }
        self.panes.entry(pane).or_default().insert(
            item,
            PaneEntry {
                pop,
                row,
                kg,
                dirty: false,
            },
        );
        Ok(())
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
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            for step in 0..5_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
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
