//! A deterministic synthetic clickstream. Event k of partition p is a pure function of
//! (seed, p, k), so a replay restored at any position produces exactly the same events.
//! Users and items are Zipf-distributed; each user leans towards one category of items, so
//! co-visitation carries signal.

use compact_str::format_compact;

use super::{Polled, Source, SourcePosition};
use crate::config::GeneratorConfig;
use crate::event::{Event, EventType};
use crate::Result;

/// Inverse-CDF sampling of a Zipf(n, s) rank in 0..n.
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: u64, exponent: f64) -> Self {
        let mut cdf = Vec::with_capacity(n as usize);
        let mut acc = 0.0;
        for rank in 1..=n {
            acc += 1.0 / (rank as f64).powf(exponent);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Self { cdf }
    }

    /// `u` uniform in [0, 1).
    pub fn sample(&self, u: f64) -> u64 {
        self.cdf
            .partition_point(|c| *c <= u)
            .min(self.cdf.len() - 1) as u64
    }
}

/// SplitMix64: a tiny, good-enough counter-based generator.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

const CATEGORIES: u64 = 100;

pub struct Generator {
    cfg: GeneratorConfig,
    users: Zipf,
    items_in_category: Zipf,
    categories: Zipf,
    per_partition: Vec<u64>,
    next: Vec<u64>,
}

impl Generator {
    pub fn new(cfg: GeneratorConfig) -> Self {
        let parts = u64::from(cfg.partitions);
        let per_partition = (0..parts)
            .map(|p| cfg.events / parts + u64::from(p < cfg.events % parts))
            .collect();
        let per_cat = cfg.items.div_ceil(CATEGORIES).max(1);
        Self {
            users: Zipf::new(cfg.users, cfg.zipf_exponent),
            items_in_category: Zipf::new(per_cat, cfg.zipf_exponent),
            categories: Zipf::new(CATEGORIES.min(cfg.items), 0.8),
            next: vec![0; cfg.partitions as usize],
            per_partition,
            cfg,
        }
    }

    /// Event `k` of partition `p`.
    pub fn event(&self, p: u32, k: u64) -> Event {
        let c = &self.cfg;
        let base = splitmix(c.seed ^ (u64::from(p) << 48) ^ k.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let r = |i: u64| unit(splitmix(base.wrapping_add(i)));
        let user = self.users.sample(r(1));
        // Most events stay in the user's favourite category; some wander.
        let category = if r(2) < 0.8 {
            splitmix(user ^ c.seed) % CATEGORIES.min(c.items)
        } else {
            self.categories.sample(r(3))
        };
        let per_cat = c.items.div_ceil(CATEGORIES).max(1);
        let item = (category * per_cat + self.items_in_category.sample(r(4))) % c.items;
        let kind = match r(5) {
            x if x < 0.70 => EventType::View,
            x if x < 0.90 => EventType::Click,
            x if x < 0.97 => EventType::Cart,
            _ => EventType::Purchase,
        };
        let spacing = 1000.0 / c.events_per_second as f64;
        let jitter = (r(6) * c.max_disorder.0 as f64) as i64;
        let ts = c.start_ts + (k as f64 * spacing) as i64 - jitter;
        Event {
            event_id: format_compact!("p{p}-{k}"),
            user_id: format_compact!("u{user}"),
            item_id: format_compact!("i{item}"),
            kind,
            ts: ts.max(1),
        }
    }
}

impl Source for Generator {
    fn partitions(&self) -> u32 {
        self.cfg.partitions
    }

    fn poll_round(&mut self, per_partition: usize, out: &mut Vec<Polled>) -> Result<()> {
        for p in 0..self.cfg.partitions {
            let total = self.per_partition[p as usize];
            let start = self.next[p as usize];
            let end = (start + per_partition as u64).min(total);
            for k in start..end {
                out.push(Polled {
                    partition: p,
                    record: Ok(self.event(p, k)),
                    last: k + 1 == total,
                });
            }
            self.next[p as usize] = end;
        }
        Ok(())
    }

    fn is_finished(&self, partition: u32) -> bool {
        self.next[partition as usize] >= self.per_partition[partition as usize]
    }

    fn positions(&self) -> Vec<SourcePosition> {
        self.next
            .iter()
            .map(|n| SourcePosition {
                offset: *n,
                records: *n,
            })
            .collect()
    }

    fn seek(&mut self, positions: &[SourcePosition]) -> Result<()> {
        for (n, p) in self.next.iter_mut().zip(positions) {
            *n = p.offset;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_prefers_low_ranks_and_stays_in_range() {
        let z = Zipf::new(1000, 1.1);
        let mut counts = [0u32; 2];
        for i in 0..10_000u64 {
            let r = z.sample(unit(splitmix(i)));
            assert!(r < 1000);
            counts[usize::from(r >= 10)] += 1;
        }
        assert!(
            counts[0] > counts[1] / 2,
            "top 10 ranks get a large share: {counts:?}"
        );
    }

    #[test]
    fn events_are_a_pure_function_of_position() {
        let cfg = GeneratorConfig {
            events: 100,
            ..GeneratorConfig::default()
        };
        let g = Generator::new(cfg.clone());
        let h = Generator::new(cfg);
        assert_eq!(g.event(1, 17), h.event(1, 17));
        assert_ne!(g.event(1, 17), g.event(1, 18));
    }
}
