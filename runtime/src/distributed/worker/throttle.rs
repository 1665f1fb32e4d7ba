//! The per-worker input limit (`source.maxRecordsPerSecond`): every input record occupies
//! the worker for at least `1 / maxRecordsPerSecond`. Nothing is banked while input is
//! scarce, so this behaves like a per-record cost: a worker at 60 % of the limit is 60 %
//! busy, which is what the autoscaler's capacity estimate (rate / busy share) relies on.

use std::time::{Duration, Instant};

pub struct Throttle {
    per_record: Duration,
    /// When the last record's share of time is used up.
    free_at: Instant,
}

impl Throttle {
    pub fn new(per_second: u32, now: Instant) -> Self {
        Self {
            per_record: Duration::from_secs_f64(1.0 / f64::from(per_second.max(1))),
            free_at: now,
        }
    }

    /// How long the worker is still occupied by the records it read (`None`: free now).
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        (now < self.free_at).then(|| self.free_at - now)
    }

    /// One input record was read at `now`.
    pub fn take(&mut self, now: Instant) {
        self.free_at = self.free_at.max(now) + self.per_record;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_record_occupies_its_share_and_idle_time_banks_nothing() {
        let t0 = Instant::now();
        let mut t = Throttle::new(100, t0);
        let mut read = 0;
        let mut now = t0;
        // 10 s of a backlog: read whenever free.
        while now < t0 + Duration::from_secs(10) {
            match t.wait(now) {
                None => {
                    t.take(now);
                    read += 1;
                }
                Some(w) => now += w,
            }
        }
        assert!(
            (1000..=1001).contains(&read),
            "{read} records in 10 s at 100/s"
        );
        // After a minute of silence the next record is free, the one after is not.
        let later = now + Duration::from_secs(60);
        assert_eq!(t.wait(later), None);
        t.take(later);
        assert_eq!(t.wait(later), Some(Duration::from_millis(10)));
    }
}
