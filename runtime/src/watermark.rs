//! Source watermarks: per-partition max event time minus the allowed disorder; the job
//! watermark is the minimum over the partitions that hold it back, and never goes back.

use serde::{Deserialize, Serialize};

use crate::dataflow::window::{WM_MAX, WM_MIN};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionWatermark {
    pub max_ts: Option<i64>,
    /// End of a bounded input: no longer holds the watermark back.
    pub finished: bool,
    /// No record for `idleTimeout`: no longer holds the watermark back until it has data.
    #[serde(skip)]
    pub idle: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatermarkTracker {
    partitions: Vec<PartitionWatermark>,
    max_out_of_orderness: i64,
    /// Running maximum of the computed watermark.
    current: i64,
}

impl WatermarkTracker {
    pub fn new(partitions: u32, max_out_of_orderness: i64) -> Self {
        Self {
            partitions: vec![PartitionWatermark::default(); partitions as usize],
            max_out_of_orderness,
            current: WM_MIN,
        }
    }

    /// The job watermark now (`W_e` of the next event).
    pub fn current(&self) -> i64 {
        self.current
    }

    /// Largest event time seen on any partition.
    pub fn max_event_time(&self) -> Option<i64> {
        self.partitions.iter().filter_map(|p| p.max_ts).max()
    }

    pub fn partitions(&self) -> &[PartitionWatermark] {
        &self.partitions
    }

    pub fn observe(&mut self, partition: u32, ts: i64) {
        let p = &mut self.partitions[partition as usize];
        p.max_ts = Some(p.max_ts.map_or(ts, |m| m.max(ts)));
        p.idle = false;
        self.recompute();
    }

    pub fn finish(&mut self, partition: u32) {
        self.partitions[partition as usize].finished = true;
        self.recompute();
    }

    pub fn set_idle(&mut self, partition: u32, idle: bool) {
        self.partitions[partition as usize].idle = idle;
        self.recompute();
    }

    fn recompute(&mut self) {
        let mut holding = self
            .partitions
            .iter()
            .filter(|p| !p.finished && !p.idle)
            .peekable();
        let computed = if holding.peek().is_none() {
            if self.partitions.iter().all(|p| p.finished) {
                WM_MAX
            } else {
                // Every live partition is idle: what those that delivered data would impose if
                // they were active (an idle partition that never had data cannot hold it at
                // −∞ once nothing else does); with no data at all, hold.
                self.partitions
                    .iter()
                    .filter(|p| !p.finished)
                    .filter_map(|p| p.max_ts)
                    .map(|m| m.saturating_sub(self.max_out_of_orderness))
                    .min()
                    .unwrap_or(self.current)
            }
        } else {
            holding
                .map(|p| {
                    p.max_ts
                        .map_or(WM_MIN, |m| m.saturating_sub(self.max_out_of_orderness))
                })
                .min()
                .unwrap_or(WM_MIN)
        };
        self.current = self.current.max(computed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_over_partitions_running_max_and_finish() {
        let mut t = WatermarkTracker::new(2, 5);
        t.observe(0, 100);
        assert_eq!(t.current(), WM_MIN, "partition 1 has no data yet");
        t.observe(1, 50);
        assert_eq!(t.current(), 45);
        t.observe(1, 40);
        assert_eq!(t.current(), 45, "disorder does not move it back");
        t.finish(1);
        assert_eq!(t.current(), 95);
        t.finish(0);
        assert_eq!(t.current(), WM_MAX);
    }

    #[test]
    fn when_every_partition_goes_idle_at_once_the_watermark_follows_the_data() {
        // Partition 1 never had data: it held the watermark at −∞ while partition 0 was
        // active; both go idle at the same moment.
        let mut t = WatermarkTracker::new(2, 5);
        t.observe(0, 100);
        assert_eq!(t.current(), WM_MIN);
        t.set_idle(1, true);
        t.set_idle(0, true);
        assert_eq!(t.current(), 95);
        t.set_idle(0, false);
        t.observe(0, 90);
        assert_eq!(t.current(), 95, "never moves back");
        let mut empty = WatermarkTracker::new(2, 5);
        empty.set_idle(0, true);
        empty.set_idle(1, true);
        assert_eq!(empty.current(), WM_MIN, "no data anywhere: hold");
    }

    #[test]
    fn idle_partitions_stop_holding_back() {
        let mut t = WatermarkTracker::new(2, 0);
        t.observe(0, 100);
        t.set_idle(1, true);
        assert_eq!(t.current(), 100);
        t.set_idle(0, true);
        assert_eq!(t.current(), 100, "all idle: hold");
        t.observe(1, 10);
        assert_eq!(t.current(), 100, "never moves back");
    }
}
