//! Key groups: the unit of state ownership and rescaling. A key's group is computed exactly
//! like Kafka's default partitioner (murmur2 of the key bytes, made positive, modulo the
//! count), so in distributed mode key group = partition of the keyed Kafka topic.

use std::ops::Range;

/// Kafka's 32-bit murmur2 variant (seed 0x9747b28c), as used by its default partitioner.
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = 0x9747_b28c ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        if tail.len() >= 3 {
            h ^= u32::from(tail[2]) << 16;
        }
        if tail.len() >= 2 {
            h ^= u32::from(tail[1]) << 8;
        }
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The key group (Kafka partition) of a key.
pub fn key_group(key: &[u8], key_groups: u32) -> u32 {
    ((murmur2(key) & 0x7fff_ffff) as u32) % key_groups
}

/// Which of `parallelism` workers owns a key group: contiguous ranges, so rescaling moves
/// whole ranges and a worker's state is one prefix scan per range.
pub fn owner(kg: u32, key_groups: u32, parallelism: usize) -> usize {
    (u64::from(kg) * parallelism as u64 / u64::from(key_groups)) as usize
}

/// The key groups a worker owns (the inverse of [`owner`]).
pub fn range_of(worker: usize, key_groups: u32, parallelism: usize) -> Range<u32> {
    let g = u64::from(key_groups);
    let p = parallelism as u64;
    let start = (worker as u64 * g).div_ceil(p);
    let end = ((worker as u64 + 1) * g).div_ceil(p);
    start as u32..end as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_partition_the_key_groups_consistently_with_owner() {
        for g in [1u32, 7, 10, 128, 1000] {
            for p in 1..=g.min(13) as usize {
                let mut next = 0;
                for w in 0..p {
                    let r = range_of(w, g, p);
                    assert_eq!(r.start, next, "g={g} p={p} w={w}");
                    for kg in r.clone() {
                        assert_eq!(owner(kg, g, p), w);
                    }
                    next = r.end;
                }
                assert_eq!(next, g);
            }
        }
    }

    /// Printed by Kafka 4.3.1's own `Utils.murmur2` and `Utils.toPositive(..) % 128`
    /// (org.apache.kafka:kafka-clients from Maven Central).
    const KAFKA_VECTORS: [(&str, i32, u32); 11] = [
        ("", 275646681, 89),
        ("a", -1563381124, 124),
        ("ab", 316155434, 42),
        ("abc", 479470107, 27),
        ("21", -973932308, 108),
        ("foobar", -790332482, 62),
        ("u42", -293379993, 103),
        ("i123456", -2092944961, 63),
        ("a-little-bit-long-string", -985981536, 32),
        ("a-little-bit-longer-string", -1486304829, 67),
        (
            "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58897971,
            77,
        ),
    ];

    #[test]
    fn murmur2_and_key_groups_match_kafka() {
        for (key, hash, partition) in KAFKA_VECTORS {
            assert_eq!(murmur2(key.as_bytes()), hash, "murmur2({key:?})");
            assert_eq!(
                key_group(key.as_bytes(), 128),
                partition,
                "partition of {key:?}"
            );
        }
    }
}
