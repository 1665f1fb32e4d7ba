#![allow(dead_code)]
//! Independent, deliberately naive reference implementation of Riffle's dataflow semantics,
//! written from `docs/semantics.md` only (it does not look at `runtime/src`).
//!
//! Design: every contribution (popularity or co-visitation increment) is kept in one flat list
//! together with the watermark at the moment it was made; window and pane sums are recomputed
//! by filtering that list. Histories are kept as full lists and truncated to the last N entries.
//! Watermarks are `i64` with `i64::MIN` standing for −∞ and `i64::MAX` for +∞; every addition or
//! subtraction involving a watermark saturates.

use std::collections::{BTreeMap, BTreeSet};

pub mod fast;
pub mod from_config;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefType {
    View,
    Click,
    Cart,
    Purchase,
}

impl RefType {
    fn index(self) -> usize {
        match self {
            RefType::View => 0,
            RefType::Click => 1,
            RefType::Cart => 2,
            RefType::Purchase => 3,
        }
    }
}

#[derive(Clone, Debug)]
pub struct RefParams {
    pub weights: [u64; 4], // indexed View, Click, Cart, Purchase
    pub history_length: usize,
    pub session_gap_ms: i64,
    pub window_size_ms: i64,
    pub window_slide_ms: i64,
    pub max_out_of_orderness_ms: i64,
    pub allowed_lateness_ms: i64,
    pub neighbor_limit: usize,
    pub top_k: usize,
    pub exclude_purchased: bool,
}

#[derive(Clone, Debug)]
pub struct RefEvent {
    pub partition: u32,
    pub event_id: String,
    pub user_id: String,
    pub item_id: String,
    pub kind: RefType,
    pub ts: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RefItemStats {
    pub item_id: String,
    pub window_start: i64,
    pub window_end: i64,
    pub popularity: u64,
    pub neighbors: Vec<(String, u64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RefRecommendation {
    pub event_id: String,
    pub user_id: String,
    pub item_id: String,
    pub ts: i64,
    pub items: Vec<(String, f64)>,
}

#[derive(Clone, Debug, Default)]
pub struct RefOutput {
    pub item_stats: Vec<RefItemStats>,
    pub recommendations: Vec<RefRecommendation>,
    pub late_event_ids: Vec<String>,
}

/// −∞ watermark.
const NEG_INF: i64 = i64::MIN;
/// +∞ watermark.
const POS_INF: i64 = i64::MAX;

/// One entry of a user's history list.
#[derive(Clone, Debug)]
struct HistEntry {
    item: String,
    ts: i64,
    kind: RefType,
}

/// One counted contribution, made by a non-late event.
/// `other == None`: `popularity(item) += weight` at `ts`.
/// `other == Some(j)`: `covisit(item, j) += weight` at `ts`.
/// `wm` is the watermark W_e of the event that made it: the contribution counts only in windows
/// that were not yet emitted then, i.e. windows with `E + L > wm`.
#[derive(Clone, Debug)]
struct Contribution {
    ts: i64,
    item: String,
    other: Option<String>,
    weight: u64,
    wm: i64,
}

/// `floor(t / S)`.
fn pane_of(t: i64, slide: i64) -> i64 {
    t.div_euclid(slide)
}

/// Does window with end `end` (already emitted or not) count contribution `c`?
fn window_counts(c: &Contribution, end: i64, params: &RefParams) -> bool {
    let start = end - params.window_size_ms;
    let in_window = c.ts >= start && c.ts < end;
    // The window was still open for the contribution: NOT (E + L <= W_e).
    let was_open = end.saturating_add(params.allowed_lateness_ms) > c.wm;
    in_window && was_open
}

/// Does pane `r` contain the time of contribution `c`?
fn pane_counts(c: &Contribution, r: i64, params: &RefParams) -> bool {
    pane_of(c.ts, params.window_slide_ms) == r
}

/// Computes the ItemStats records of the window ending at `end` (items in itemId ascending
/// order); empty iff no item has nonzero popularity in it.
fn window_stats(contribs: &[Contribution], end: i64, params: &RefParams) -> Vec<RefItemStats> {
    let mut popularity: BTreeMap<String, u64> = BTreeMap::new();
    let mut covisit: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for c in contribs.iter().filter(|c| window_counts(c, end, params)) {
        match &c.other {
            None => *popularity.entry(c.item.clone()).or_insert(0) += c.weight,
            Some(j) => {
                *covisit
                    .entry(c.item.clone())
                    .or_default()
                    .entry(j.clone())
                    .or_insert(0) += c.weight
            }
        }
    }
    let mut out = Vec::new();
    for (item, pop) in popularity {
        if pop == 0 {
            continue;
        }
        let mut neighbors: Vec<(String, u64)> = covisit
            .get(&item)
            .map(|m| {
                m.iter()
                    .filter(|(_, w)| **w > 0)
                    .map(|(j, w)| (j.clone(), *w))
                    .collect()
            })
            .unwrap_or_default();
        // weight descending, ties by itemId ascending (byte order)
        neighbors.sort_by(|a, b| {
            b.1.cmp(&a.1)
                .then_with(|| a.0.as_bytes().cmp(b.0.as_bytes()))
        });
        neighbors.truncate(params.neighbor_limit);
        out.push(RefItemStats {
            item_id: item,
            window_start: end - params.window_size_ms,
            window_end: end,
            popularity: pop,
            neighbors,
        });
    }
    out
}

/// The raw (not yet max-ed) job watermark before reading event number `k`.
fn raw_watermark_before(
    k: usize,
    partitions: u32,
    events: &[RefEvent],
    last_index: &[Option<usize>],
    d: i64,
) -> i64 {
    let mut wm: Option<i64> = None; // None: no partition holds the watermark back
    for q in 0..partitions {
        let finished = match last_index[q as usize] {
            None => true,           // no event at all: finished from the start
            Some(last) => last < k, // its last event has already been read
        };
        if finished {
            continue;
        }
        // maxTs[q] over the events read so far (indices < k) from q
        let max_ts = events[..k]
            .iter()
            .filter(|e| e.partition == q)
            .map(|e| e.ts)
            .max();
        let value = match max_ts {
            None => NEG_INF,
            Some(m) => m.saturating_sub(d),
        };
        wm = Some(match wm {
            None => value,
            Some(w) => w.min(value),
        });
    }
    wm.unwrap_or(POS_INF)
}

/// Emits every not-yet-emitted window with `E + L <= wm`, in increasing E.
struct Windows {
    /// Ends of windows that were still open when some contribution was counted in them and
    /// that have not been closed yet.
    pending: BTreeSet<i64>,
    /// Records of the most recently emitted (nonempty) window.
    last_emitted: Vec<RefItemStats>,
}

impl Windows {
    fn close_up_to(
        &mut self,
        wm: i64,
        contribs: &[Contribution],
        params: &RefParams,
        out: &mut Vec<RefItemStats>,
    ) {
        let closing: Vec<i64> = self
            .pending
            .iter()
            .copied()
            .filter(|e| e.saturating_add(params.allowed_lateness_ms) <= wm)
            .collect(); // BTreeSet iteration: increasing E
        for end in closing {
            self.pending.remove(&end);
            let stats = window_stats(contribs, end, params);
            if !stats.is_empty() {
                self.last_emitted = stats.clone();
                out.extend(stats);
            }
        }
    }
}

/// `partitions`: number of source partitions (0..partitions). `events` in read order (already
/// valid events; no dead-letter handling needed).
/// The input is bounded: after the last event every partition is finished and WM = +inf, so
/// all remaining windows are emitted.
/// No partition is ever idle. A partition with no event at all counts as finished from the
/// start.
pub fn run(params: &RefParams, partitions: u32, events: &[RefEvent]) -> RefOutput {
    let s = params.window_slide_ms;
    let w_size = params.window_size_ms;
    assert!(s > 0, "windowSlide must be positive");
    assert!(
        w_size > 0 && w_size % s == 0,
        "windowSize must be a positive multiple of windowSlide"
    );
    let panes_per_window = w_size / s; // W/S
    let l = params.allowed_lateness_ms;
    let g = params.session_gap_ms;

    let mut last_index: Vec<Option<usize>> = vec![None; partitions as usize];
    for (k, e) in events.iter().enumerate() {
        assert!(e.partition < partitions, "event in unknown partition");
        last_index[e.partition as usize] = Some(k);
    }

    let mut out = RefOutput::default();
    let mut contribs: Vec<Contribution> = Vec::new();
    let mut histories: BTreeMap<String, Vec<HistEntry>> = BTreeMap::new();
    let mut windows = Windows {
        pending: BTreeSet::new(),
        last_emitted: Vec::new(),
    };
    let mut wm = NEG_INF; // running maximum

    for (k, e) in events.iter().enumerate() {
        // Watermark before e is read.
        let raw = raw_watermark_before(
            k,
            partitions,
            events,
            &last_index,
            params.max_out_of_orderness_ms,
        );
        wm = wm.max(raw);
        let w_e = wm;
        let t = e.ts;
        let p = pane_of(t, s);
        let weight = params.weights[e.kind.index()];

        // 1. Emit windows.
        windows.close_up_to(w_e, &contribs, params, &mut out.item_stats);

        // 2. Lateness: W_e >= (p + W/S)·S + L.
        let last_end = (p + panes_per_window) * s;
        let late = w_e >= last_end.saturating_add(l);
        if late {
            out.late_event_ids.push(e.event_id.clone());
        }

        // 3. History H(u), filtered from the last N appended entries.
        let history = histories.entry(e.user_id.clone()).or_default();
        let expiry = w_e.saturating_sub(g).saturating_sub(l);
        let in_h = |h: &HistEntry| -> bool {
            (h.ts as i128 - t as i128).abs() <= g as i128 && h.ts >= expiry
        };
        let h_items: Vec<String> = history
            .iter()
            .filter(|h| in_h(h))
            .map(|h| h.item.clone())
            .collect();

        // 4. Contributions (only if not late).
        if !late {
            let mut add = |item: &str, other: Option<&str>| {
                contribs.push(Contribution {
                    ts: t,
                    item: item.to_string(),
                    other: other.map(str::to_string),
                    weight,
                    wm: w_e,
                });
            };
            add(&e.item_id, None);
            for h_item in &h_items {
                add(&e.item_id, Some(h_item));
                add(h_item, Some(&e.item_id));
            }
            // The windows containing t that are not yet emitted will have to be closed later.
            for n in 1..=panes_per_window {
                let end = (p + n) * s;
                if end.saturating_add(l) > w_e {
                    windows.pending.insert(end);
                }
            }
        }

        // 5. Append e; keep only the last N entries.
        history.push(HistEntry {
            item: e.item_id.clone(),
            ts: t,
            kind: e.kind,
        });
        while history.len() > params.history_length {
            history.remove(0);
        }

        // 6. Recommend.
        // Excluded items X: purchase entries of H(u), re-evaluated on the list after step 5.
        let excluded: BTreeSet<String> = if params.exclude_purchased {
            history
                .iter()
                .filter(|h| in_h(h) && h.kind == RefType::Purchase)
                .map(|h| h.item.clone())
                .collect()
        } else {
            BTreeSet::new()
        };

        // Scoring panes: panes of the window ending at E* = (p+1)·S, i.e. p+1−W/S ..= p,
        // restricted to live panes: W_e < (r + W/S)·S + L.
        let live_panes: Vec<i64> = ((p + 1 - panes_per_window)..=p)
            .filter(|r| w_e < ((r + panes_per_window) * s).saturating_add(l))
            .collect();
        let mut pop: u64 = 0;
        let mut c: BTreeMap<String, u64> = BTreeMap::new();
        for contrib in &contribs {
            if contrib.item != e.item_id {
                continue;
            }
            if !live_panes.iter().any(|r| pane_counts(contrib, *r, params)) {
                continue;
            }
            match &contrib.other {
                None => pop += contrib.weight,
                Some(j) => *c.entry(j.clone()).or_insert(0) += contrib.weight,
            }
        }
        let mut candidates: Vec<(String, f64)> = c
            .iter()
            .filter(|(j, cj)| pop > 0 && **cj > 0 && !excluded.contains(*j))
            .map(|(j, cj)| (j.clone(), *cj as f64 / pop as f64))
            .collect();
        candidates.sort_by(|a, b| {
            b.1.total_cmp(&a.1)
                .then_with(|| a.0.as_bytes().cmp(b.0.as_bytes()))
        });
        candidates.truncate(params.top_k);

        // Trending fill from the most recently emitted window.
        let mut trending: Vec<(String, u64)> = windows
            .last_emitted
            .iter()
            .map(|st| (st.item_id.clone(), st.popularity))
            .collect();
        trending.sort_by(|a, b| {
            b.1.cmp(&a.1)
                .then_with(|| a.0.as_bytes().cmp(b.0.as_bytes()))
        });
        for (item, _) in trending {
            if candidates.len() >= params.top_k {
                break;
            }
            if excluded.contains(&item) || candidates.iter().any(|(j, _)| *j == item) {
                continue;
            }
            candidates.push((item, 0.0));
        }

        out.recommendations.push(RefRecommendation {
            event_id: e.event_id.clone(),
            user_id: e.user_id.clone(),
            item_id: e.item_id.clone(),
            ts: t,
            items: candidates,
        });
    }

    // End of the bounded input: WM = +∞, all remaining windows are emitted.
    windows.close_up_to(POS_INF, &contribs, params, &mut out.item_stats);
    out
}
