//! The item-keyed stage: pane-aggregated popularity and co-visitation, sliding-window
//! emission, and recommendations.
//!
//! State is kept per pane (O(1) work per increment, not W/S). A running sum over the panes of
//! the next window to emit makes emission and most recommendations O(row) instead of
//! O(W/S · row): sliding adds one pane and subtracts one.

use std::collections::BTreeMap;

use super::exchange::{Increment, Message, Payload, RecRequest};
use super::output::{top_n, ItemStats, LateEvent, Neighbor, Recommendation, Scored};
use super::window::{Windowing, WM_MAX, WM_MIN};
use super::{BatchFrame, FastMap, Key};
use crate::state::{codec, StateDescriptor, StateOp};

/// The item stage's only state: per (pane, item) popularity and co-visitation row.
pub const PANES: StateDescriptor = StateDescriptor {
    name: "panes",
    tag: b'P',
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Agg {
    pub pop: u64,
    pub row: FastMap<Key, u64>,
}

impl Agg {
    fn add(&mut self, other: &Agg) {
        self.pop += other.pop;
        for (k, w) in &other.row {
            *self.row.entry(k.clone()).or_insert(0) += w;
        }
    }

    /// Subtract a pane that is part of this sum; returns whether the sum is now empty.
    fn sub(&mut self, other: &Agg) -> bool {
        self.pop -= other.pop;
        for (k, w) in &other.row {
            if let Some(v) = self.row.get_mut(k) {
                *v -= w;
                if *v == 0 {
                    self.row.remove(k);
                }
            }
        }
        self.pop == 0 && self.row.is_empty()
    }
}

#[derive(Clone, Debug, Default)]
struct PaneEntry {
    agg: Agg,
    kg: u32,
    dirty: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct ItemParams {
    pub windowing: Windowing,
    pub neighbor_limit: usize,
    pub top_k: usize,
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
    panes: BTreeMap<i64, FastMap<Key, PaneEntry>>,
    /// End of the next window to emit; `None` until the watermark is finite.
    next_end: Option<i64>,
    /// Sum of the panes of the window ending at `next_end`.
    win: FastMap<Key, Agg>,
    wm: i64,
    /// Panes below this index were deleted since the last snapshot.
    expired_below: Option<i64>,
    emitted_through: EmittedThrough,
}

impl ItemStage {
    pub fn new(params: ItemParams) -> Self {
        Self {
            params,
            panes: BTreeMap::new(),
            next_end: None,
            win: FastMap::default(),
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

    fn in_win(&self, pane: i64) -> bool {
        let w = self.params.windowing;
        self.next_end.is_some_and(|end| {
            let start_pane = w.pane(end) - w.panes_per_window();
            pane >= start_pane && pane < w.pane(end)
        })
    }

    /// Add a co-visitation increment (`other = Some`) or popularity (`None`) to a pane.
    pub fn apply(&mut self, kg: u32, pane: i64, item: &Key, other: Option<&Key>, weight: u64) {
        let in_win = self.in_win(pane);
        let entry = self
            .panes
            .entry(pane)
            .or_default()
            .entry(item.clone())
            .or_default();
        entry.kg = kg;
        entry.dirty = true;
        match other {
            Some(o) => *entry.agg.row.entry(o.clone()).or_insert(0) += weight,
            None => entry.agg.pop += weight,
        }
        if in_win {
            let agg = self.win.entry(item.clone()).or_default();
            match other {
                Some(o) => *agg.row.entry(o.clone()).or_insert(0) += weight,
                None => agg.pop += weight,
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
                    for Increment {
                        pane,
                        item,
                        other,
                        weight,
                    } in adds
                    {
                        let kg = kg_of(item.as_bytes());
                        self.apply(kg, pane, &item, Some(&other), weight);
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
            self.apply(kg, pane, &ev.item_id, None, u64::from(req.weight));
        }
        let items = self.score(&ev.item_id, pane, req.wm, &req.excluded);
        out.recs.push(PendingRec {
            seq: req.seq,
            wm: req.wm,
            rec: Recommendation {
                event_id: ev.event_id.clone(),
                user_id: ev.user_id.clone(),
                item_id: ev.item_id.clone(),
                ts: ev.ts,
                items,
            },
            excluded: req.excluded,
        });
    }

    /// Co-visitation candidates of `item` over the live panes of the window ending at the
    /// slide boundary after `pane`.
    fn score(&self, item: &Key, pane: i64, wm: i64, excluded: &[Key]) -> Vec<Scored> {
        let w = self.params.windowing;
        let end = (pane + 1).saturating_mul(w.slide);
        let summed;
        let agg: &Agg = if self.next_end == Some(end) && !w.emitted(end, wm) {
            // The running window: all of its panes are live (it is not emitted yet at the
            // request's watermark; distributed receivers may trail the sender's watermark).
            match self.win.get(item) {
                Some(a) => a,
                None => return Vec::new(),
            }
        } else {
            let mut sum = Agg::default();
            let first = pane + 1 - w.panes_per_window();
            for (p, entries) in self.panes.range(first..=pane) {
                if w.pane_live(*p, wm) {
                    if let Some(e) = entries.get(item) {
                        sum.add(&e.agg);
                    }
                }
            }
            summed = sum;
            &summed
        };
        if agg.pop == 0 {
            return Vec::new();
        }
        let pop = agg.pop as f64;
        // Rank first, exclude after: the top K + |X| always hold the top K non-excluded items,
        // and a row is often far longer than X.
        let k = self.params.top_k;
        top_n(agg.row.iter().map(|(k, w)| (k, *w)), k + excluded.len())
            .into_iter()
            .filter(|(key, _)| !excluded.contains(key))
            .take(k)
            .map(|(k, c)| Scored {
                item_id: k.clone(),
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
    }

    /// Start the running window at `end`, summing its panes from scratch.
    fn reposition(&mut self, end: i64) {
        let w = self.params.windowing;
        self.next_end = Some(end);
        self.win.clear();
        let first = w.pane(end) - w.panes_per_window();
        for entries in self.panes.range(first..w.pane(end)).map(|(_, e)| e) {
            for (item, e) in entries {
                self.win.entry(item.clone()).or_default().add(&e.agg);
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
                    if a.sub(&e.agg) {
                        self.win.remove(item);
                    }
                }
            }
        }
        if let Some(entries) = self.panes.get(&w.pane(end)) {
            for (item, e) in entries {
                self.win.entry(item.clone()).or_default().add(&e.agg);
            }
        }
        self.next_end = Some(end + w.slide);
    }

    fn emit(&self, end: i64, out: &mut ItemOutput) {
        let p = self.params;
        let start = end - p.windowing.size;
        let mut any = false;
        let skip = &self.emitted_through;
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
        let mut top_src: Vec<(&Key, u64)> = Vec::new();
        for (item, agg) in self.win.iter().filter(|(_, a)| a.pop > 0) {
            if already(item) {
                continue;
            }
            any = true;
            top_src.push((item, agg.pop));
            if p.emit_stats {
                let neighbors = top_n(agg.row.iter().map(|(k, w)| (k, *w)), p.neighbor_limit)
                    .into_iter()
                    .map(|(k, w)| Neighbor {
                        item_id: k.clone(),
                        weight: w,
                    })
                    .collect();
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
            let top = top_n(top_src.into_iter(), p.trending_capacity)
                .into_iter()
                .map(|(k, w)| (k.clone(), w))
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
        for (pane, entries) in &mut self.panes {
            for (item, e) in entries.iter_mut().filter(|(_, e)| e.dirty) {
                e.dirty = false;
                let mut key = codec::ordered_i64(*pane).to_vec();
                key.extend_from_slice(item.as_bytes());
                let mut v = Vec::with_capacity(12 + e.agg.row.len() * 20);
                codec::put_u64(&mut v, e.agg.pop);
                codec::put_u32(&mut v, e.agg.row.len() as u32);
                for (k, w) in &e.agg.row {
                    codec::put_str(&mut v, k);
                    codec::put_u64(&mut v, *w);
                }
                ops.push(StateOp::Put(codec::state_key(e.kg, PANES.tag, &key), v));
            }
        }
    }

    /// Load one pane entry written by [`snapshot`](Self::snapshot).
    pub fn restore(&mut self, kg: u32, key: &[u8], value: &[u8]) -> crate::Result<()> {
        let pane = codec::from_ordered_i64(key)?;
        let item = std::str::from_utf8(&key[8..])
            .map_err(|_| crate::Error::CorruptState("item key is not UTF-8".into()))?;
        let mut r = codec::Reader::new(value);
        let pop = r.u64()?;
        let n = r.u32()? as usize;
        let mut row = FastMap::with_capacity_and_hasher(n, Default::default());
        for _ in 0..n {
            let k = Key::from(r.str()?);
            row.insert(k, r.u64()?);
        }
        self.panes.entry(pane).or_default().insert(
            Key::from(item),
            PaneEntry {
                agg: Agg { pop, row },
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
