//! The scalable ItemStats reference (`tests/reference/fast.rs`) against the naive reference
//! (`tests/reference/mod.rs`), and its running time at acceptance-test scale.

mod reference;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::Instant;

use proptest::prelude::*;
use reference::{fast, run, RefEvent, RefItemStats, RefParams, RefType};

const KINDS: [RefType; 4] = [
    RefType::View,
    RefType::Click,
    RefType::Cart,
    RefType::Purchase,
];

#[derive(Clone, Debug)]
struct Case {
    params: RefParams,
    partitions: u32,
    events: Vec<RefEvent>,
}

/// Small random inputs: several partitions (one of them may stop early, some may have no
/// event), per-partition clocks with disorder up to well beyond `maxOutOfOrderness` (late
/// events), negative timestamps, small windows, allowed lateness on and off, short histories,
/// few users and items (repeats), item names whose byte order differs from numeric order, all
/// event types and random weights including 0.
fn case() -> impl Strategy<Value = Case> {
    let params = (
        prop::array::uniform4(0u64..=5),
        0usize..=4,
        prop::sample::select(vec![500i64, 1500, 5000, 100_000]),
        prop::sample::select(vec![1000i64, 2000]),
        1i64..=3,
        prop::sample::select(vec![0i64, 500, 1500]),
        prop::sample::select(vec![0i64, 0, 1000, 2500]),
        0usize..=3,
    );
    let shape = (
        1u32..=4,
        0u32..=1,
        prop::sample::select(vec![0i64, 2000, 8000]),
        -3000i64..3000,
        0usize..300,
    );
    (params, shape)
        .prop_flat_map(|(params, (used, spare, max_disorder, start, cutoff))| {
            let events = prop::collection::vec(
                (
                    0..used,
                    0u8..5,
                    0u8..12,
                    0usize..4,
                    0i64..700,
                    0i64..=max_disorder,
                ),
                1..300,
            );
            (Just((params, used, spare, start, cutoff)), events)
        })
        .prop_map(|((params, used, spare, start, cutoff), raw)| {
            let (weights, history_length, gap, slide, ppw, ooo, lateness, neighbor_limit) = params;
            let params = RefParams {
                weights,
                history_length,
                session_gap_ms: gap,
                window_size_ms: slide * ppw,
                window_slide_ms: slide,
                max_out_of_orderness_ms: ooo,
                allowed_lateness_ms: lateness,
                neighbor_limit,
                top_k: 3,
                exclude_purchased: true,
            };
            let mut clocks = vec![start; used as usize];
            let mut events = Vec::new();
            for (n, (q, u, i, kind, step, disorder)) in raw.into_iter().enumerate() {
                // Partition 0 stops after `cutoff` events (its watermark hold ends early).
                let q = if n >= cutoff && q == 0 && used > 1 {
                    1
                } else {
                    q
                };
                clocks[q as usize] += step;
                events.push(RefEvent {
                    partition: q,
                    event_id: format!("e{n}"),
                    user_id: format!("u{u}"),
                    item_id: format!("i{i}"),
                    kind: KINDS[kind],
                    ts: clocks[q as usize] - disorder,
                });
            }
            Case {
                params,
                partitions: used + spare,
                events,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn fast_item_stats_equal_naive(c in case()) {
        let naive = run(&c.params, c.partitions, &c.events).item_stats;
        let fast = fast::item_stats(&c.params, c.partitions, &c.events);
        prop_assert_eq!(fast, naive);
    }
}

/// splitmix64: a tiny deterministic RNG.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const MIN: i64 = 60_000;

/// `n` events over 8 partitions read round-robin in batches, ~100k users active in rotating
/// sessions, ~20k items with a skewed popularity, bounded disorder of up to 6 s (so a few
/// events are later than `maxOutOfOrderness` = 5 s allows).
fn generate(n: usize) -> Vec<RefEvent> {
    const PARTITIONS: u64 = 8;
    const USERS_ACTIVE: u64 = 5_000;
    const EVENTS_PER_USER_BLOCK: usize = 50_000;
    const ITEMS: u64 = 20_000;
    let mut rng = Rng(0x5eed);
    let mut events = Vec::with_capacity(n);
    for k in 0..n {
        let base = 1_700_000_000_000 + (k as i64) * 7; // ~140 events per second of event time
        let q = (k / 64) as u64 % PARTITIONS;
        let block = (k / EVENTS_PER_USER_BLOCK) as u64;
        let user = block * USERS_ACTIVE + rng.below(USERS_ACTIVE);
        let item = rng.below(ITEMS).min(rng.below(ITEMS));
        let kind = match rng.below(100) {
            0..=69 => RefType::View,
            70..=89 => RefType::Click,
            90..=96 => RefType::Cart,
            _ => RefType::Purchase,
        };
        events.push(RefEvent {
            partition: q as u32,
            event_id: format!("e{k}"),
            user_id: format!("u{user}"),
            item_id: format!("i{item}"),
            kind,
            ts: base - rng.below(6_000) as i64,
        });
    }
    events
}

fn digest(stats: &[RefItemStats]) -> u64 {
    let mut h = DefaultHasher::new();
    for s in stats {
        s.item_id.hash(&mut h);
        s.window_start.hash(&mut h);
        s.window_end.hash(&mut h);
        s.popularity.hash(&mut h);
        s.neighbors.hash(&mut h);
    }
    h.finish()
}

/// A larger input than the property test's (the distributed chaos test feeds it 1 M events
/// through `make chaos`): the output is non-empty and deterministic.
#[test]
fn fast_item_stats_is_deterministic_on_a_large_input() {
    let params = RefParams {
        weights: [1, 1, 3, 5],
        history_length: 20,
        session_gap_ms: 30 * MIN,
        window_size_ms: 10 * MIN,
        window_slide_ms: MIN,
        max_out_of_orderness_ms: 5_000,
        allowed_lateness_ms: 0,
        neighbor_limit: 20,
        top_k: 20,
        exclude_purchased: true,
    };
    let started = Instant::now();
    let events = generate(100_000);
    let generated = started.elapsed();
    let mut digests = Vec::new();
    for run in 0..2 {
        let started = Instant::now();
        let stats = fast::item_stats(&params, 8, &events);
        let took = started.elapsed();
        let neighbors: usize = stats.iter().map(|s| s.neighbors.len()).sum();
        println!(
            "run {run}: {} events -> {} ItemStats records ({neighbors} neighbours) in {took:.2?} \
             (generating the events took {generated:.2?})",
            events.len(),
            stats.len()
        );
        assert!(!stats.is_empty());
        digests.push(digest(&stats));
    }
    assert_eq!(digests[0], digests[1], "the output is deterministic");
}
