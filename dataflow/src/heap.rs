//! Heap bytes of the hot tiers' containers, from their capacities: what was asked of the
//! allocator (not its rounding or the pages it retains). The budget is held against these.

use std::mem::size_of;

/// A hash table (hashbrown, behind `std::collections::HashMap`) whose `capacity()` is
/// `capacity`: its buckets of `T`, one control byte per bucket and a trailing group of them.
pub fn table<T>(capacity: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    // hashbrown keeps 1 bucket in 8 free (fewer than 8 buckets: one).
    let buckets = if capacity < 8 {
        capacity + 1
    } else {
        capacity / 7 * 8
    };
    buckets * (size_of::<T>() + 1) + 16
}

/// A `Vec` or `VecDeque` of `T` with this capacity.
pub fn vec<T>(capacity: usize) -> usize {
    capacity * size_of::<T>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FastMap;

    #[test]
    fn table_bytes_follow_the_bucket_count() {
        let mut m: FastMap<u32, u64> = FastMap::default();
        assert_eq!(table::<(u32, u64)>(m.capacity()), 0);
        let mut last = 0;
        for i in 0..100_000u32 {
            m.insert(i, 1);
            let cap = m.capacity();
            // The bucket count is a power of two and leaves room for every item.
            let buckets = (table::<(u32, u64)>(cap) - 16) / (size_of::<(u32, u64)>() + 1);
            assert!(
                buckets.is_power_of_two() && buckets > m.len(),
                "{cap} → {buckets}"
            );
            assert!(table::<(u32, u64)>(cap) >= last);
            last = table::<(u32, u64)>(cap);
        }
        // 100 k items: 2^17 buckets of 17 bytes (16 for the pair, 1 control byte).
        assert_eq!(last, (1 << 17) * 17 + 16);
    }
}
