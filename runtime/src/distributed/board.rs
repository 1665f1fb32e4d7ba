//! The trending board across workers. Recommendations with fewer than K co-visited items are
//! filled from the global top of the most recently emitted window; each worker only sees the
//! windows of its own key groups, so every worker publishes, inside its transaction, a
//! [`Contribution`] to the job's one-partition trending topic whenever its item stage emits
//! windows, and every worker reads the whole topic (read_committed) into a [`SharedBoard`].
//!
//! A window is *complete* once every key group's owner has declared it emitted
//! (`through` ≥ its end); fills use the latest complete window that is emitted at the
//! request's watermark. Contributions are idempotent (keyed by the contributor's key-group
//! range), so re-reading the topic after a restart rebuilds the same board.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::dataflow::output::{rank_order, Scored};
use crate::dataflow::trending::fill_from;
use crate::dataflow::window::WM_MIN;
use crate::dataflow::Key;

/// One worker's emitted windows: for key groups `kg_start..kg_end`, windows ending at or
/// before `through` are final, and these are the local tops of the non-empty ones.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Contribution {
    pub kg_start: u32,
    pub kg_end: u32,
    pub through: i64,
    pub windows: Vec<(i64, Vec<(Key, u64)>)>,
}

#[derive(Debug, Default)]
struct WindowBoard {
    ranges: BTreeSet<(u32, u32)>,
    list: Vec<(Key, u64)>,
}

pub struct SharedBoard {
    capacity: usize,
    through: Vec<i64>,
    windows: BTreeMap<i64, WindowBoard>,
}

impl SharedBoard {
    /// `capacity` as for the local board: K plus what a fill may skip.
    pub fn new(key_groups: u32, top_k: usize, history_length: usize) -> Self {
        Self {
            capacity: 2 * top_k + history_length,
            through: vec![WM_MIN; key_groups as usize],
            windows: BTreeMap::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn apply(&mut self, c: Contribution) {
        let end = (c.kg_end as usize).min(self.through.len());
        for t in &mut self.through[(c.kg_start as usize).min(end)..end] {
            *t = (*t).max(c.through);
        }
        for (window_end, local) in c.windows {
            let w = self.windows.entry(window_end).or_default();
            if !w.ranges.insert((c.kg_start, c.kg_end)) {
                continue; // seen before (the topic is re-read after a restart)
            }
            w.list.extend(local);
            w.list
                .sort_unstable_by(|a, b| rank_order(&(a.1, &a.0), &(b.1, &b.0)));
            w.list.truncate(self.capacity);
        }
        self.prune();
    }

    /// Windows ending at or before this are emitted for every key group.
    pub fn complete_through(&self) -> i64 {
        self.through.iter().copied().min().unwrap_or(WM_MIN)
    }

    /// The latest complete window emitted at watermark `wm`.
    pub fn latest(&self, wm: i64, lateness: i64) -> Option<&[(Key, u64)]> {
        let complete = self.complete_through();
        self.windows
            .range(..=complete)
            .rev()
            .find(|(end, _)| end.saturating_add(lateness) <= wm)
            .map(|(_, w)| w.list.as_slice())
    }

    pub fn fill(
        &self,
        items: &mut Vec<Scored>,
        k: usize,
        excluded: &[Key],
        wm: i64,
        lateness: i64,
    ) {
        if items.len() < k {
            if let Some(list) = self.latest(wm, lateness) {
                fill_from(list, items, k, excluded);
            }
        }
    }

    /// Keep the latest complete window and everything after it (a request's watermark may
    /// trail the board, so one complete window before the newest is kept as well).
    fn prune(&mut self) {
        let complete = self.complete_through();
        let keep_from = self
            .windows
            .range(..=complete)
            .rev()
            .nth(1)
            .map(|(end, _)| *end);
        if let Some(k) = keep_from {
            self.windows = self.windows.split_off(&k);
        }
    }

    pub fn windows(&self) -> usize {
        self.windows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[(&str, u64)]) -> Vec<(Key, u64)> {
        items.iter().map(|(k, w)| (Key::from(*k), *w)).collect()
    }

    #[test]
    fn a_window_fills_only_once_every_key_group_emitted_it() {
        let mut b = SharedBoard::new(4, 2, 0);
        b.apply(Contribution {
            kg_start: 0,
            kg_end: 2,
            through: 120,
            windows: vec![(60, list(&[("a", 5)])), (120, list(&[("b", 9)]))],
        });
        let fill = |b: &SharedBoard, wm| {
            let mut items = Vec::new();
            b.fill(&mut items, 2, &[], wm, 0);
            items.into_iter().map(|s| s.item_id).collect::<Vec<_>>()
        };
        assert!(
            fill(&b, 1000).is_empty(),
            "key groups 2 and 3 have not emitted"
        );
        let c = Contribution {
            kg_start: 2,
            kg_end: 4,
            through: 60,
            windows: vec![(60, list(&[("c", 7)]))],
        };
        b.apply(c.clone());
        b.apply(c); // re-read after a restart: no duplicates
        assert_eq!(
            fill(&b, 1000),
            ["c", "a"],
            "window 60 is the latest complete one"
        );
        assert!(
            fill(&b, 59).is_empty(),
            "not emitted at the request's watermark"
        );
        b.apply(Contribution {
            kg_start: 2,
            kg_end: 4,
            through: 180,
            windows: vec![],
        });
        assert_eq!(fill(&b, 1000), ["b"]);
        assert_eq!(
            fill(&b, 119),
            ["c", "a"],
            "the previous window is still there"
        );
    }
}
