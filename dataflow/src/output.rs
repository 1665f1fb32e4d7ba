//! Output records (see docs/semantics.md for their JSON shape).

use serde::{Deserialize, Serialize};

use super::{json, Key};
use crate::event::EventType;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Neighbor {
    pub item_id: Key,
    pub weight: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemStats {
    pub item_id: Key,
    pub window_start: i64,
    pub window_end: i64,
    pub popularity: u64,
    pub neighbors: Vec<Neighbor>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Scored {
    pub item_id: Key,
    pub score: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Recommendation {
    pub event_id: Key,
    pub user_id: Key,
    pub item_id: Key,
    pub ts: i64,
    pub items: Vec<Scored>,
}

impl ItemStats {
    /// Append the record as JSON (the same bytes `serde_json` writes).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        json::key_first(out, "itemId");
        json::str(out, &self.item_id);
        json::key_next(out, "windowStart");
        json::int(out, self.window_start);
        json::key_next(out, "windowEnd");
        json::int(out, self.window_end);
        json::key_next(out, "popularity");
        json::int(out, self.popularity);
        json::key_next(out, "neighbors");
        out.push(b'[');
        for (i, n) in self.neighbors.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json::key_first(out, "itemId");
            json::str(out, &n.item_id);
            json::key_next(out, "weight");
            json::int(out, n.weight);
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
    }
}

impl Recommendation {
    /// Append the record as JSON (the same bytes `serde_json` writes).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        json::key_first(out, "eventId");
        json::str(out, &self.event_id);
        json::key_next(out, "userId");
        json::str(out, &self.user_id);
        json::key_next(out, "itemId");
        json::str(out, &self.item_id);
        json::key_next(out, "ts");
        json::int(out, self.ts);
        json::key_next(out, "items");
        out.push(b'[');
        for (i, s) in self.items.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json::key_first(out, "itemId");
            json::str(out, &s.item_id);
            json::key_next(out, "score");
            json::float(out, s.score);
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
    }
}

/// An event that arrived after all of its windows were emitted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LateEvent {
    pub event_id: Key,
    pub user_id: Key,
    pub item_id: Key,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub ts: i64,
    /// The watermark the event was judged against.
    pub watermark: i64,
}

/// Where an item stage puts ItemStats as it builds them, one record at a time: the engines
/// serialise them into their sinks in bounded chunks, so emitting a window never holds all
/// of its records.
pub trait StatsOut {
    fn item_stats(&mut self, stats: ItemStats);
}

/// Collect them (tests, benchmarks and small tools).
impl StatsOut for Vec<ItemStats> {
    fn item_stats(&mut self, stats: ItemStats) {
        self.push(stats);
    }
}

/// Sort key of ranked lists: weight descending, then id ascending (byte order).
pub fn rank_order(a: &(u64, &Key), b: &(u64, &Key)) -> std::cmp::Ordering {
    b.0.cmp(&a.0)
        .then_with(|| a.1.as_bytes().cmp(b.1.as_bytes()))
}

/// The top `n` of `(id, weight)` pairs with weight > 0, in rank order.
pub fn top_n<'a>(entries: impl Iterator<Item = (&'a Key, u64)>, n: usize) -> Vec<(&'a Key, u64)> {
    top_n_by(entries, n, |a: &&Key, b: &&Key| a.as_bytes() < b.as_bytes())
}

/// The top `n` of `(id, weight)` pairs with weight > 0: weight descending, then ids in the
/// order `id_before` defines (a strict order; ids are distinct).
///
/// One pass over a heap of the best `n` so far, the worst at its root: most entries of a long
/// row are rejected by a single integer comparison with the root, and an entry that gets in
/// costs O(log n) comparisons (a linear search for the new worst cost O(n), and in a row
/// scanned in no particular order, entries get in about n · ln(len / n) times).
pub fn top_n_by<T: Copy>(
    entries: impl Iterator<Item = (T, u64)>,
    n: usize,
    id_before: impl Fn(&T, &T) -> bool,
) -> Vec<(T, u64)> {
    if n == 0 {
        return Vec::new();
    }
    let better = |a: &(u64, T), b: &(u64, T)| a.0 > b.0 || (a.0 == b.0 && id_before(&a.1, &b.1));
    // Restore the heap below `i`: every entry ranks at or above its parent.
    let sift_down = |heap: &mut [(u64, T)], mut i: usize| loop {
        let mut worst = i;
        for c in [2 * i + 1, 2 * i + 2] {
            if c < heap.len() && better(&heap[worst], &heap[c]) {
                worst = c;
            }
        }
        if worst == i {
            return;
        }
        heap.swap(i, worst);
        i = worst;
    };
    // Rows are mostly far shorter than n, and some results are kept (cached candidates).
    let fits = entries.size_hint().1.unwrap_or(n);
    let mut best: Vec<(u64, T)> = Vec::with_capacity(n.min(fits));
    for (k, w) in entries {
        if w == 0 {
            continue;
        }
        if best.len() < n {
            best.push((w, k));
            if best.len() == n {
                for i in (0..n / 2).rev() {
                    sift_down(&mut best, i);
                }
            }
            continue;
        }
        if better(&(w, k), &best[0]) {
            best[0] = (w, k);
            sift_down(&mut best, 0);
        }
    }
    best.sort_unstable_by(|a, b| {
        if better(a, b) {
            std::cmp::Ordering::Less
        } else if better(b, a) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    });
    best.into_iter().map(|(w, k)| (k, w)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The heap selection equals sorting everything and taking the first `n`, with many
    /// equal weights so the id order decides.
    #[test]
    fn top_n_equals_a_full_sort() {
        let mut rng = crate::testing::Xorshift(0x2545_f491_4f6c_dd1d);
        for len in [0usize, 1, 7, 40, 41, 300, 5_000] {
            let entries: Vec<(u32, u64)> = (0..len as u32)
                .map(|id| (id.wrapping_mul(2_654_435_761), rng.next() % 9))
                .collect();
            let mut sorted: Vec<(u32, u64)> =
                entries.iter().copied().filter(|(_, w)| *w > 0).collect();
            sorted.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            for n in [0usize, 1, 5, 40, 10_000] {
                let top = top_n_by(entries.iter().copied(), n, |a, b| a < b);
                assert_eq!(top, sorted[..n.min(sorted.len())], "len {len}, n {n}");
            }
        }
    }

    #[test]
    fn records_are_written_as_serde_json_writes_them() {
        let rec = Recommendation {
            event_id: "e\"1".into(),
            user_id: "u\n".into(),
            item_id: "ié".into(),
            ts: -5,
            items: vec![
                Scored {
                    item_id: "a".into(),
                    score: 0.1 + 0.2,
                },
                Scored {
                    item_id: "b\\".into(),
                    score: 0.0,
                },
            ],
        };
        let mut got = Vec::new();
        rec.write_json(&mut got);
        assert_eq!(got, serde_json::to_vec(&rec).unwrap());
        let empty = Recommendation {
            items: Vec::new(),
            ..rec
        };
        got.clear();
        empty.write_json(&mut got);
        assert_eq!(got, serde_json::to_vec(&empty).unwrap());

        let stats = ItemStats {
            item_id: "x".into(),
            window_start: 0,
            window_end: 600_000,
            popularity: u64::MAX,
            neighbors: vec![
                Neighbor {
                    item_id: "y".into(),
                    weight: 3,
                },
                Neighbor {
                    item_id: "z\u{1}".into(),
                    weight: 1,
                },
            ],
        };
        got.clear();
        stats.write_json(&mut got);
        assert_eq!(got, serde_json::to_vec(&stats).unwrap());
    }

    #[test]
    fn top_n_orders_by_weight_then_id() {
        let keys: Vec<Key> = ["b", "a", "c", "d", "z"]
            .iter()
            .map(|s| Key::from(*s))
            .collect();
        let weights = [3u64, 3, 5, 0, 1];
        let top = top_n(keys.iter().zip(weights), 3);
        let ids: Vec<&str> = top.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(ids, ["c", "a", "b"]);
        assert_eq!(
            top_n(keys.iter().zip(weights), 10).len(),
            4,
            "zero weights dropped"
        );
    }
}
