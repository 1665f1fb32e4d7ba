//! Scalable reference for the ItemStats output of `docs/semantics.md`, written from that text
//! alone (it does not look at `runtime/src`). It computes exactly what `reference::run(..)`
//! puts into `item_stats`, for inputs far too large for the naive implementation.
//!
//! Design:
//! - Item and user ids are interned up front. Item ids are numbered in byte order of their
//!   names, so every "itemId ascending" ordering is an order on the numbers.
//! - The job watermark is maintained incrementally: per partition `maxTs`, a multiset of
//!   `maxTs − D` over the partitions that hold it back, a count of holding partitions that have
//!   no event yet, and the running maximum.
//! - Histories are per-user ring buffers of the last N `(ts, item)` entries.
//! - Contributions are aggregated per pane (`pane → item → popularity`, `pane → (i, j) →
//!   covisit`). A contribution with stamp `W_e` counts in window `E` iff `E + L > W_e`; window
//!   `E` is emitted by the first event whose stamp reaches `E + L` (or at the end), and stamps
//!   only grow, so a contribution counts in `E` iff it was made before `E` was emitted: a
//!   window's contents are the sum of its panes at the moment it is emitted.
//! - That sum is kept incrementally for the next window to emit (`Agg`): a contribution to one
//!   of its panes is added to it directly; when the window is emitted the sum slides by one pane
//!   (the pane that leaves is subtracted and dropped for good, the pane that enters is added).
//!   Every aggregated pane entry is thus added once and subtracted once. Each item's
//!   co-visitation row is also kept sorted (weight descending, then itemId) in a `BTreeSet`, so
//!   a window emits an item's top neighbours in `O(neighborLimit)`. Stretches of windows without
//!   data are skipped, not slid through.
//!
//! Time: O(n · historyLength · log) plus the size of the output. Memory: the histories, the
//! panes that still have a window to emit, and the sum for one window.
//!
//! Weights of zero change no sum and are skipped. Time arithmetic saturates like the naive
//! reference (`i64::MIN` = −∞, `i64::MAX` = +∞).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use super::{RefEvent, RefItemStats, RefParams};

/// −∞ watermark.
const NEG_INF: i64 = i64::MIN;
/// +∞ watermark.
const POS_INF: i64 = i64::MAX;

/// Same inputs and meaning as `reference::run` (events in read order, bounded input, every
/// partition finished at the end, WM = +∞ then), but only the ItemStats output, in the same
/// order/format as `run(..).item_stats`, and in O(n · historyLength · log) time.
pub fn item_stats(params: &RefParams, partitions: u32, events: &[RefEvent]) -> Vec<RefItemStats> {
    let s = params.window_slide_ms;
    let w_size = params.window_size_ms;
    assert!(s > 0, "windowSlide must be positive");
    assert!(
        w_size > 0 && w_size % s == 0,
        "windowSize must be a positive multiple of windowSlide"
    );
    let g = params.session_gap_ms;
    let l = params.allowed_lateness_ms;
    let panes_per_window = w_size / s;

    // Items numbered in byte order of their ids; users in order of appearance.
    let mut names: Vec<&str> = events.iter().map(|e| e.item_id.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let item_ids: HashMap<&str, u32> = names
        .iter()
        .enumerate()
        .map(|(n, name)| (*name, u32::try_from(n).expect("too many items")))
        .collect();
    let mut user_ids: HashMap<&str, usize> = HashMap::new();

    let mut watermark = Watermark::new(partitions, events, params.max_out_of_orderness_ms);
    let mut windows = Windows {
        slide: s,
        panes_per_window,
        lateness: l,
        neighbor_limit: params.neighbor_limit,
        names: &names,
        panes: BTreeMap::new(),
        closed: NEG_INF,
        held: None,
        agg: Agg {
            popularity: BTreeMap::new(),
            rows: (0..names.len()).map(|_| Row::default()).collect(),
            pairs: 0,
        },
    };
    // Per user: the last N appended (ts, item) entries, oldest first.
    let mut histories: Vec<VecDeque<(i64, u32)>> = Vec::new();
    let mut h_items: Vec<u32> = Vec::new();
    let mut out = Vec::new();

    for (k, e) in events.iter().enumerate() {
        let w_e = watermark.current();
        let t = e.ts;
        let p = t.div_euclid(s);
        let item = item_ids[e.item_id.as_str()];
        let next_user = histories.len();
        let user = *user_ids.entry(e.user_id.as_str()).or_insert(next_user);
        if user == next_user {
            histories.push(VecDeque::new());
        }
        let weight = params.weights[e.kind.index()];

        // 1. Emit every window with E + L <= W_e.
        windows.advance(w_e, &mut out);

        // 2. Late iff every window containing t has been emitted.
        let late = w_e >= ((p + panes_per_window) * s).saturating_add(l);

        // 3./4. H(u) and the contributions of a non-late event.
        let history = &mut histories[user];
        if !late && weight > 0 {
            let expiry = w_e.saturating_sub(g).saturating_sub(l);
            h_items.clear();
            h_items.extend(
                history
                    .iter()
                    .filter(|(ts, _)| {
                        (i128::from(*ts) - i128::from(t)).abs() <= i128::from(g) && *ts >= expiry
                    })
                    .map(|(_, h_item)| *h_item),
            );
            windows.contribute(p, item, weight, &h_items);
        }

        // 5. Append; keep the last N.
        history.push_back((t, item));
        if history.len() > params.history_length {
            history.pop_front();
        }

        watermark.observe(k, e.partition, t);
    }

    // End of the bounded input: WM = +∞.
    windows.advance(POS_INF, &mut out);
    out
}

/// The job watermark, maintained incrementally over the read order.
struct Watermark {
    d: i64,
    /// Index of each partition's last event (`None`: no event, finished from the start).
    last_index: Vec<Option<usize>>,
    max_ts: Vec<Option<i64>>,
    /// Partitions that hold the watermark back (not finished).
    holding: usize,
    /// Holding partitions without an event yet (each makes the watermark −∞).
    holding_without_event: usize,
    /// Multiset `maxTs[q] − D → count` over the holding partitions with an event.
    values: BTreeMap<i64, usize>,
    /// Running maximum.
    wm: i64,
}

impl Watermark {
    fn new(partitions: u32, events: &[RefEvent], d: i64) -> Self {
        let mut last_index = vec![None; partitions as usize];
        for (k, e) in events.iter().enumerate() {
            assert!(e.partition < partitions, "event in unknown partition");
            last_index[e.partition as usize] = Some(k);
        }
        let holding = last_index.iter().filter(|x| x.is_some()).count();
        let mut wm = Watermark {
            d,
            last_index,
            max_ts: vec![None; partitions as usize],
            holding,
            holding_without_event: holding,
            values: BTreeMap::new(),
            wm: NEG_INF,
        };
        wm.update();
        wm
    }

    /// The watermark before the next event (running maximum).
    fn current(&self) -> i64 {
        self.wm
    }

    fn raw(&self) -> i64 {
        if self.holding == 0 {
            POS_INF
        } else if self.holding_without_event > 0 {
            NEG_INF
        } else {
            *self
                .values
                .keys()
                .next()
                .expect("holding partitions have values")
        }
    }

    fn update(&mut self) {
        self.wm = self.wm.max(self.raw());
    }

    fn remove_value(&mut self, v: i64) {
        let count = self.values.get_mut(&v).expect("value present");
        *count -= 1;
        if *count == 0 {
            self.values.remove(&v);
        }
    }

    /// Event number `k` (in partition `q`, at `ts`) has been read.
    fn observe(&mut self, k: usize, q: u32, ts: i64) {
        let q = q as usize;
        let old = self.max_ts[q];
        let new = old.map_or(ts, |m| m.max(ts));
        match old {
            None => {
                self.holding_without_event -= 1;
                *self.values.entry(new.saturating_sub(self.d)).or_insert(0) += 1;
            }
            Some(m) if new > m => {
                self.remove_value(m.saturating_sub(self.d));
                *self.values.entry(new.saturating_sub(self.d)).or_insert(0) += 1;
            }
            Some(_) => {}
        }
        self.max_ts[q] = Some(new);
        if self.last_index[q] == Some(k) {
            // The partition is finished: it no longer holds the watermark back.
            self.remove_value(new.saturating_sub(self.d));
            self.holding -= 1;
        }
        self.update();
    }
}

/// A hasher for the integer keys of the hash maps below (the std default, SipHash, is several
/// times slower for them): xor-shift-multiply mixing of the written integers.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }

    fn write_u64(&mut self, x: u64) {
        let mut z = (self.0 ^ x).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.0 = z ^ (z >> 31);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// Key of a co-visitation pair `(i, j)`.
fn pair(i: u32, j: u32) -> u64 {
    (u64::from(i) << 32) | u64::from(j)
}

/// Sort key of neighbour `j` with weight `w` in a co-visitation row: weight descending, then
/// `j` (itemId) ascending.
fn row_key(j: u32, w: u64) -> u128 {
    (u128::from(u64::MAX - w) << 32) | u128::from(j)
}

/// Contributions counted at the times of one pane.
#[derive(Default)]
struct Pane {
    popularity: IdMap<u32, u64>,
    /// `pair(i, j)` → co-visitation increments.
    covisit: IdMap<u64, u64>,
}

/// The co-visitation row of one item i in the held window: `covisit(i, j)` for every `j` with
/// a nonzero value, by `j` and sorted by `row_key`.
#[derive(Default)]
struct Row {
    weights: IdMap<u32, u64>,
    sorted: BTreeSet<u128>,
}

/// The sum of the panes of one window. Only nonzero values are kept.
struct Agg {
    /// Item ascending.
    popularity: BTreeMap<u32, u64>,
    /// Indexed by item.
    rows: Vec<Row>,
    /// Number of nonzero co-visitation values.
    pairs: usize,
}

impl Agg {
    fn add_popularity(&mut self, item: u32, w: u64) {
        *self.popularity.entry(item).or_insert(0) += w;
    }

    fn add_covisit(&mut self, key: u64, w: u64) {
        let (i, j) = ((key >> 32) as u32, key as u32);
        let row = &mut self.rows[i as usize];
        let entry = row.weights.entry(j).or_insert(0);
        let old = *entry;
        *entry += w;
        if old > 0 {
            row.sorted.remove(&row_key(j, old));
        } else {
            self.pairs += 1;
        }
        row.sorted.insert(row_key(j, old + w));
    }

    fn add(&mut self, pane: &Pane) {
        for (&item, &w) in &pane.popularity {
            self.add_popularity(item, w);
        }
        for (&key, &w) in &pane.covisit {
            self.add_covisit(key, w);
        }
    }

    fn subtract(&mut self, pane: &Pane) {
        for (&item, &w) in &pane.popularity {
            let v = self
                .popularity
                .get_mut(&item)
                .expect("pane is in the window");
            *v -= w;
            if *v == 0 {
                self.popularity.remove(&item);
            }
        }
        for (&key, &w) in &pane.covisit {
            let (i, j) = ((key >> 32) as u32, key as u32);
            let row = &mut self.rows[i as usize];
            let v = row.weights.get_mut(&j).expect("pane is in the window");
            let old = *v;
            *v -= w;
            row.sorted.remove(&row_key(j, old));
            if *v == 0 {
                row.weights.remove(&j);
                self.pairs -= 1;
            } else {
                row.sorted.insert(row_key(j, old - w));
            }
        }
    }
}

struct Windows<'a> {
    slide: i64,
    panes_per_window: i64,
    lateness: i64,
    neighbor_limit: usize,
    names: &'a [&'a str],
    /// Panes with contributions that still have a window not yet emitted.
    panes: BTreeMap<i64, Pane>,
    /// Every window with `E + L <= closed` has been emitted.
    closed: i64,
    /// When `Some(E)`: `agg` is the sum of the panes of the window ending at E, which is the
    /// smallest window end not yet emitted (the smallest `E` with `E + L > closed`) and has
    /// data. When `None`: `agg` is empty.
    held: Option<i64>,
    agg: Agg,
}

impl Windows<'_> {
    /// Panes of the window ending at `end`: first and last.
    fn pane_range(&self, end: i64) -> (i64, i64) {
        let last = end / self.slide - 1;
        (last + 1 - self.panes_per_window, last)
    }

    /// Counts a non-late event's contributions at pane `p`.
    fn contribute(&mut self, p: i64, item: u32, w: u64, h_items: &[u32]) {
        let pane = self.panes.entry(p).or_default();
        *pane.popularity.entry(item).or_insert(0) += w;
        for &h in h_items {
            *pane.covisit.entry(pair(item, h)).or_insert(0) += w;
            *pane.covisit.entry(pair(h, item)).or_insert(0) += w;
        }
        let Some(end) = self.held else {
            return;
        };
        let (first, last) = self.pane_range(end);
        assert!(
            p >= first,
            "a non-late event is never behind the next window"
        );
        if p >= first && p <= last {
            self.agg.add_popularity(item, w);
            for &h in h_items {
                self.agg.add_covisit(pair(item, h), w);
                self.agg.add_covisit(pair(h, item), w);
            }
        }
    }

    /// Emits, in increasing E, every window with `E + L <= wm` not yet emitted.
    fn advance(&mut self, wm: i64, out: &mut Vec<RefItemStats>) {
        if wm <= self.closed {
            return;
        }
        loop {
            let end = match self.held {
                Some(end) => end,
                None => {
                    // The first window not yet emitted that has data.
                    let Some(&first_pane) = self.panes.keys().next() else {
                        break;
                    };
                    let mut end = (first_pane + 1) * self.slide;
                    if self.closed != NEG_INF {
                        // Smallest multiple of S with E + L > closed.
                        let open = (i128::from(self.closed) - i128::from(self.lateness))
                            .div_euclid(i128::from(self.slide))
                            + 1;
                        let open = open * i128::from(self.slide);
                        end = end.max(i64::try_from(open).unwrap_or(i64::MAX));
                    }
                    if end.saturating_add(self.lateness) > wm {
                        break;
                    }
                    let (first, last) = self.pane_range(end);
                    for pane in self.panes.range(first..=last).map(|(_, pane)| pane) {
                        self.agg.add(pane);
                    }
                    self.held = Some(end);
                    end
                }
            };
            if end.saturating_add(self.lateness) > wm {
                break;
            }
            self.emit(end, out);
            // Slide to the next window: the first pane leaves for good, the next one enters.
            let (first, _) = self.pane_range(end);
            if let Some(pane) = self.panes.remove(&first) {
                self.agg.subtract(&pane);
            }
            if let Some(pane) = self.panes.get(&(end / self.slide)) {
                self.agg.add(pane);
            }
            self.held = Some(end + self.slide);
            if self.agg.popularity.is_empty() {
                // No data in the window (all data of a pane comes with popularity): the next
                // window with data is found from the panes.
                assert_eq!(self.agg.pairs, 0);
                self.held = None;
            }
        }
        self.closed = wm;
    }

    /// Appends the records of the window ending at `end` (held in `agg`): one per item with
    /// nonzero popularity, item ascending; neighbours by weight descending, then itemId
    /// ascending.
    fn emit(&self, end: i64, out: &mut Vec<RefItemStats>) {
        for (&item, &popularity) in &self.agg.popularity {
            let neighbors = self.agg.rows[item as usize]
                .sorted
                .iter()
                .take(self.neighbor_limit)
                .map(|key| {
                    let weight = u64::MAX - (*key >> 32) as u64;
                    (self.names[*key as u32 as usize].to_string(), weight)
                })
                .collect();
            out.push(RefItemStats {
                item_id: self.names[item as usize].to_string(),
                window_start: end - self.slide * self.panes_per_window,
                window_end: end,
                popularity,
                neighbors,
            });
        }
    }
}
