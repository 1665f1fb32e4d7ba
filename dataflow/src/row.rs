//! A co-visitation row: weights to other items by dense id, exact as `u64`, stored as `u32`.
//!
//! Rows are most of the item stage's state, and updating them is its hottest loop, bound by
//! cache misses: a `u32` weight makes a slot 8 bytes instead of 16. A weight that outgrows
//! `u32` (billions of increments to one pair within a window) moves to a side table and
//! leaves [`WIDE`] in its slot, so sums stay exact.

use super::{heap, FastMap};

/// The slot value of a weight held in the side table.
const WIDE: u32 = u32::MAX;

#[derive(Clone, Debug, Default)]
pub(crate) struct Row {
    narrow: FastMap<u32, u32>,
    /// Weights of at least `WIDE`; boxed, since nearly every row has none.
    wide: Option<Box<FastMap<u32, u64>>>,
}

impl Row {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            narrow: FastMap::with_capacity_and_hasher(n, Default::default()),
            wide: None,
        }
    }

    pub fn len(&self) -> usize {
        self.narrow.len()
    }

    pub fn is_empty(&self) -> bool {
        self.narrow.is_empty()
    }

    /// Heap bytes, as allocated.
    pub fn heap_bytes(&self) -> usize {
        heap::table::<(u32, u32)>(self.narrow.capacity())
            + self.wide.as_ref().map_or(0, |w| {
                std::mem::size_of::<FastMap<u32, u64>>() + heap::table::<(u32, u64)>(w.capacity())
            })
    }

    /// Add `w` to `k`'s weight; returns the weight before.
    #[inline]
    pub fn add(&mut self, k: u32, w: u64) -> u64 {
        let slot = self.narrow.entry(k).or_insert(0);
        let old = *slot;
        if old != WIDE {
            if let Some(new) = u64::from(old)
                .checked_add(w)
                .filter(|n| *n < u64::from(WIDE))
            {
                *slot = new as u32;
                return u64::from(old);
            }
            *slot = WIDE;
        }
        let wide = self.wide.get_or_insert_with(Box::default);
        let v = wide.entry(k).or_insert(u64::from(old));
        let before = *v;
        *v += w;
        before
    }

    /// Subtract `w` (part of what `k` holds) from `k`'s weight, removing it at 0.
    pub fn sub(&mut self, k: u32, w: u64) {
        let Some(slot) = self.narrow.get_mut(&k) else {
            return;
        };
        if *slot != WIDE {
            *slot = (u64::from(*slot) - w) as u32;
            if *slot == 0 {
                self.narrow.remove(&k);
            }
            return;
        }
        let wide = self
            .wide
            .as_mut()
            .expect("a WIDE slot has its weight in the side table");
        let v = wide
            .get_mut(&k)
            .expect("a WIDE slot has its weight in the side table");
        *v -= w;
        if *v == 0 {
            wide.remove(&k);
            self.narrow.remove(&k);
        }
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (u32, u64)> + '_ {
        self.narrow.iter().map(|(k, v)| {
            let w = if *v == WIDE {
                self.wide.as_ref().expect("a WIDE slot has its weight")[k]
            } else {
                u64::from(*v)
            };
            (*k, w)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(r: &Row) -> Vec<(u32, u64)> {
        let mut v: Vec<_> = r.iter().collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn weights_beyond_u32_stay_exact_and_go_back() {
        let mut r = Row::default();
        assert_eq!(r.add(1, 5), 0);
        assert_eq!(r.add(1, u64::from(u32::MAX) - 6), 5);
        // u32::MAX - 1: still narrow.
        assert!(r.wide.is_none());
        assert_eq!(r.add(1, 1), u64::from(u32::MAX) - 1);
        assert_eq!(sorted(&r), [(1, u64::from(u32::MAX))]);
        assert!(r.wide.is_some());
        assert_eq!(r.add(1, 10), u64::from(u32::MAX));
        r.add(2, 7);
        r.add(3, 1 << 40);
        assert_eq!(
            sorted(&r),
            [(1, u64::from(u32::MAX) + 10), (2, 7), (3, 1 << 40)]
        );
        assert_eq!(r.len(), 3);
        r.sub(3, 1 << 40);
        r.sub(1, u64::from(u32::MAX) + 9);
        assert_eq!(sorted(&r), [(1, 1), (2, 7)]);
        r.sub(1, 1);
        r.sub(2, 7);
        assert!(r.is_empty());
        assert!(r.heap_bytes() > 0);
    }
}
