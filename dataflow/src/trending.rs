//! Trending items: the global top of the most recently emitted window, used to fill
//! recommendations that have fewer than K co-visited items.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::output::{rank_order, Scored};
use super::Key;

/// Per-window global top lists, merged from every worker's emitted windows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrendingBoard {
    /// window end → (item, popularity) in rank order, at most `capacity` long.
    windows: BTreeMap<i64, Vec<(Key, u64)>>,
    capacity: usize,
}

impl TrendingBoard {
    /// `capacity` must cover a fill: K items plus what a fill may skip (the K−1 already
    /// listed and the excluded purchases, at most `historyLength`).
    pub fn new(top_k: usize, history_length: usize) -> Self {
        Self {
            windows: BTreeMap::new(),
            capacity: 2 * top_k + history_length,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Merge one worker's local top of the window ending at `end` (workers own disjoint items).
    pub fn merge(&mut self, end: i64, local: Vec<(Key, u64)>) {
        let list = self.windows.entry(end).or_default();
        list.extend(local);
        list.sort_unstable_by(|a, b| rank_order(&(a.1, &a.0), &(b.1, &b.0)));
        list.truncate(self.capacity);
    }

    /// The most recently emitted window at watermark `wm`.
    pub fn latest(&self, wm: i64, lateness: i64) -> Option<&[(Key, u64)]> {
        self.windows
            .iter()
            .rev()
            .find(|(end, _)| end.saturating_add(lateness) <= wm)
            .map(|(_, v)| v.as_slice())
    }

    /// Forget windows no event at or after watermark `wm` can ask for.
    pub fn prune(&mut self, wm: i64, lateness: i64) {
        let keep_from = self
            .windows
            .keys()
            .rev()
            .find(|end| end.saturating_add(lateness) <= wm)
            .copied();
        if let Some(k) = keep_from {
            self.windows = self.windows.split_off(&k);
        }
    }

    /// Append trending items to `items` until it has `k`, skipping listed and excluded ones.
    pub fn fill(
        &self,
        items: &mut Vec<Scored>,
        k: usize,
        excluded: &[Key],
        wm: i64,
        lateness: i64,
    ) {
        if items.len() >= k {
            return;
        }
        if let Some(list) = self.latest(wm, lateness) {
            fill_from(list, items, k, excluded);
        }
    }
}

/// Append items of a trending list (in rank order) to `items` until it has `k`, with score 0,
/// skipping items already listed and excluded ones.
pub fn fill_from(list: &[(Key, u64)], items: &mut Vec<Scored>, k: usize, excluded: &[Key]) {
    if items.len() >= k {
        return;
    }
    let listed: super::FastSet<Key> = items.iter().map(|s| s.item_id.clone()).collect();
    for (item, _) in list {
        if items.len() >= k {
            break;
        }
        if listed.contains(item) || excluded.contains(item) {
            continue;
        }
        items.push(Scored {
            item_id: item.clone(),
            score: 0.0,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_uses_the_latest_emitted_window_and_skips_known_items() {
        let mut b = TrendingBoard::new(3, 1);
        b.merge(60, vec![("a".into(), 5), ("b".into(), 1)]);
        b.merge(60, vec![("c".into(), 5)]);
        b.merge(120, vec![("z".into(), 9)]);
        let mut items = vec![Scored {
            item_id: "a".into(),
            score: 0.5,
        }];
        b.fill(&mut items, 3, &["c".into()], 119, 0);
        let ids: Vec<&str> = items.iter().map(|s| s.item_id.as_str()).collect();
        assert_eq!(
            ids,
            ["a", "b"],
            "window 60 is the latest emitted; a listed, c excluded"
        );
        b.prune(120, 0);
        assert!(b.latest(119, 0).is_none());
        assert_eq!(b.latest(120, 0).unwrap()[0].0, "z");
    }
}
