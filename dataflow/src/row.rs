//! A co-visitation row: weights to other items by dense id, exact as `u64`, stored as `u32`.
//!
//! Rows are most of the item stage's state, and updating them is its hottest loop, bound by
//! cache misses. So a row is its own open-addressing table (linear probing, Fibonacci
//! hashing) of 8-byte slots that hold an id and its weight side by side: an update reads one
//! cache line, rarely two, where a `HashMap` reads a control byte and then the bucket, which
//! are two lines apart in a large table. A weight that outgrows `u32` (billions of increments
//! to one pair within a window) moves to a side table and leaves [`WIDE`] in its slot, so
//! sums stay exact.

use super::{heap, FastMap};

/// The slot value of a weight held in the side table.
const WIDE: u32 = u32::MAX;

/// The id of a vacant slot. Item ids are dense and never reach it.
const VACANT: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Slot {
    id: u32,
    weight: u32,
}

const EMPTY: Slot = Slot {
    id: VACANT,
    weight: 0,
};

#[derive(Clone, Debug, Default)]
pub(crate) struct Row {
    /// Empty, or a power of two long and at most 3/4 occupied (linear probing stays within a
    /// cache line or two at that load).
    slots: Box<[Slot]>,
    len: usize,
    /// Weights of at least `WIDE`; boxed, since nearly every row has none.
    wide: Option<Box<FastMap<u32, u64>>>,
}

/// The table length that holds `n` ids.
fn slots_for(n: usize) -> usize {
    (n * 4).div_ceil(3).next_power_of_two().max(8)
}

impl Row {
    pub fn with_capacity(n: usize) -> Self {
        let mut row = Self::default();
        if n > 0 {
            row.slots = vec![EMPTY; slots_for(n)].into_boxed_slice();
        }
        row
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Heap bytes, as allocated.
    pub fn heap_bytes(&self) -> usize {
        heap::vec::<Slot>(self.slots.len())
            + self.wide.as_ref().map_or(0, |w| {
                std::mem::size_of::<FastMap<u32, u64>>() + heap::table::<(u32, u64)>(w.capacity())
            })
    }

    /// Where `id`'s probe starts: the top bits of `id` times 2^64/φ, which spreads dense ids.
    #[inline]
    fn home(&self, id: u32) -> usize {
        let bits = self.slots.len().trailing_zeros();
        (u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits)) as usize
    }

    /// The slot holding `id` (`true`), or the vacant slot where it would go. The table must
    /// not be empty.
    #[inline]
    fn probe(&self, id: u32) -> (usize, bool) {
        let mask = self.slots.len() - 1;
        let mut i = self.home(id);
        loop {
            let s = self.slots[i];
            if s.id == id {
                return (i, true);
            }
            if s.id == VACANT {
                return (i, false);
            }
            i = (i + 1) & mask;
        }
    }

    /// Read the home slots of `ids` ahead of updating them. The reads are independent, so
    /// their cache misses overlap, where updating one id after the other waits for each in
    /// turn (a row update is bound by that miss).
    #[inline]
    pub fn touch(&self, ids: &[(u32, u64)]) {
        if self.slots.is_empty() || ids.len() < 2 {
            return;
        }
        let mut seen = 0u32;
        for &(id, _) in ids {
            seen ^= self.slots[self.home(id)].id;
        }
        std::hint::black_box(seen);
    }

    /// Double the table (or allocate the first one), placing every id again.
    fn grow(&mut self) {
        let len = (self.slots.len() * 2).max(8);
        let old = std::mem::replace(&mut self.slots, vec![EMPTY; len].into_boxed_slice());
        for s in old.iter().filter(|s| s.id != VACANT) {
            let (i, _) = self.probe(s.id);
            self.slots[i] = *s;
        }
    }

    /// Put `id` with weight 0 in vacant slot `i`.
    fn occupy(&mut self, i: usize, id: u32) -> usize {
        self.slots[i] = Slot { id, weight: 0 };
        self.len += 1;
        i
    }

    /// Add `w` to `id`'s weight (an absent id starts at 0 and is kept even if `w` is 0);
    /// returns the weight before.
    #[inline]
    pub fn add(&mut self, id: u32, w: u64) -> u64 {
        debug_assert_ne!(id, VACANT, "item ids stay below u32::MAX");
        let found = (!self.slots.is_empty()).then(|| self.probe(id));
        let i = match found {
            Some((i, true)) => i,
            Some((i, false)) if (self.len + 1) * 4 <= self.slots.len() * 3 => self.occupy(i, id),
            _ => {
                self.grow();
                let (i, _) = self.probe(id);
                self.occupy(i, id)
            }
        };
        let slot = &mut self.slots[i].weight;
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
        let v = wide.entry(id).or_insert(u64::from(old));
        let before = *v;
        *v += w;
        before
    }

    /// Subtract `w` (part of what `id` holds) from `id`'s weight, removing it at 0.
    pub fn sub(&mut self, id: u32, w: u64) {
        if self.len == 0 {
            return;
        }
        let (i, true) = self.probe(id) else {
            return;
        };
        let weight = self.slots[i].weight;
        if weight != WIDE {
            let new = (u64::from(weight) - w) as u32;
            self.slots[i].weight = new;
            if new == 0 {
                self.remove_at(i);
            }
            return;
        }
        let wide = self
            .wide
            .as_mut()
            .expect("a WIDE slot has its weight in the side table");
        let v = wide
            .get_mut(&id)
            .expect("a WIDE slot has its weight in the side table");
        *v -= w;
        if *v == 0 {
            wide.remove(&id);
            self.remove_at(i);
        }
    }

    /// Empty slot `hole`, moving later slots of its probe run back so every id stays
    /// reachable from its home without tombstones.
    fn remove_at(&mut self, mut hole: usize) {
        let mask = self.slots.len() - 1;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let s = self.slots[j];
            if s.id == VACANT {
                break;
            }
            // `s` may move back to the hole unless its home lies after the hole (cyclically,
            // within the run up to `j`).
            let home = self.home(s.id);
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = s;
                hole = j;
            }
        }
        self.slots[hole] = EMPTY;
        self.len -= 1;
    }

    pub fn iter(&self) -> Iter<'_> {
        Iter {
            slots: self.slots.iter(),
            left: self.len,
            wide: self.wide.as_deref(),
        }
    }
}

/// A row's (id, weight) entries, in table order.
pub(crate) struct Iter<'a> {
    slots: std::slice::Iter<'a, Slot>,
    left: usize,
    wide: Option<&'a FastMap<u32, u64>>,
}

impl Iterator for Iter<'_> {
    type Item = (u32, u64);

    #[inline]
    fn next(&mut self) -> Option<(u32, u64)> {
        if self.left == 0 {
            return None;
        }
        let s = self.slots.find(|s| s.id != VACANT)?;
        self.left -= 1;
        let w = if s.weight == WIDE {
            self.wide.expect("a WIDE slot has its weight")[&s.id]
        } else {
            u64::from(s.weight)
        };
        Some((s.id, w))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Iter<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

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
        assert_eq!(r.iter().count(), 0);
        assert!(r.heap_bytes() > 0);
    }

    /// Random adds and subtractions (many removals inside long probe runs) against a
    /// `BTreeMap`, through several doublings.
    #[test]
    fn matches_a_map_under_random_adds_and_removals() {
        let mut rng = crate::testing::Xorshift(0x2545_f491_4f6c_dd1d);
        let mut next = move || rng.next();
        for ids in [4u64, 60, 3_000] {
            let mut row = Row::with_capacity((ids / 8) as usize);
            let mut model: BTreeMap<u32, u64> = BTreeMap::new();
            for step in 0..40_000 {
                let id = (next() % ids) as u32;
                let held = model.get(&id).copied().unwrap_or(0);
                if held > 0 && next() % 3 == 0 {
                    // Subtract part or all of it: all of it half the time.
                    let w = if next() % 2 == 0 {
                        held
                    } else {
                        1 + next() % held
                    };
                    row.sub(id, w);
                    if held == w {
                        model.remove(&id);
                    } else {
                        *model.get_mut(&id).expect("held") -= w;
                    }
                } else {
                    let w = 1 + next() % 9;
                    assert_eq!(row.add(id, w), held, "step {step}");
                    *model.entry(id).or_default() += w;
                }
                assert_eq!(row.len(), model.len(), "step {step}");
                if step % 997 == 0 {
                    assert_eq!(sorted(&row), model.clone().into_iter().collect::<Vec<_>>());
                    assert_eq!(row.iter().len(), model.len());
                }
            }
            assert_eq!(sorted(&row), model.into_iter().collect::<Vec<_>>());
            assert!(row.len() * 4 <= row.slots.len() * 3);
        }
    }

    #[test]
    fn a_zero_weight_add_keeps_the_id_and_absent_subtractions_do_nothing() {
        let mut r = Row::default();
        r.sub(5, 1);
        assert_eq!(r.add(5, 0), 0);
        assert_eq!(sorted(&r), [(5, 0)]);
        r.sub(6, 1);
        assert_eq!(sorted(&r), [(5, 0)]);
        let sized = Row::with_capacity(6);
        assert_eq!(sized.slots.len(), 8);
        assert_eq!(Row::with_capacity(7).slots.len(), 16);
    }
}
