//! Process metrics, shared lock-free between the engine and the HTTP API.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use serde::Serialize;

use crate::dataflow::window::{WM_MAX, WM_MIN};

pub struct Metrics {
    pub started: Instant,
    pub events_in: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub late: AtomicU64,
    pub recommendations_out: AtomicU64,
    pub item_stats_out: AtomicU64,
    pub windows_emitted: AtomicU64,
    pub increments_in: AtomicU64,
    pub increments_out: AtomicU64,
    pub watermark: AtomicI64,
    pub max_event_time: AtomicI64,
    pub checkpoints_completed: AtomicU64,
    pub checkpoint_last_id: AtomicU64,
    pub checkpoint_duration_ms: AtomicU64,
    pub checkpoint_uploaded_bytes: AtomicU64,
    pub checkpoint_size_bytes: AtomicU64,
    pub busy_nanos: AtomicU64,
    /// Events per second over the last second or so, as f64 bits.
    pub rate_bits: AtomicU64,
    pub users: AtomicU64,
    pub pane_entries: AtomicU64,
    pub ready: AtomicBool,
    pub finished: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            events_in: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            late: AtomicU64::new(0),
            recommendations_out: AtomicU64::new(0),
            item_stats_out: AtomicU64::new(0),
            windows_emitted: AtomicU64::new(0),
            increments_in: AtomicU64::new(0),
            increments_out: AtomicU64::new(0),
            watermark: AtomicI64::new(WM_MIN),
            max_event_time: AtomicI64::new(WM_MIN),
            checkpoints_completed: AtomicU64::new(0),
            checkpoint_last_id: AtomicU64::new(0),
            checkpoint_duration_ms: AtomicU64::new(0),
            checkpoint_uploaded_bytes: AtomicU64::new(0),
            checkpoint_size_bytes: AtomicU64::new(0),
            busy_nanos: AtomicU64::new(0),
            rate_bits: AtomicU64::new(0),
            users: AtomicU64::new(0),
            pane_entries: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            finished: AtomicBool::new(false),
        }
    }
}

/// A point-in-time copy, for `/status` and summaries.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub uptime_seconds: f64,
    pub ready: bool,
    pub finished: bool,
    pub events_in: u64,
    pub dead_lettered: u64,
    pub late: u64,
    pub recommendations_out: u64,
    pub item_stats_out: u64,
    pub windows_emitted: u64,
    pub watermark: Option<i64>,
    pub watermark_lag_ms: Option<i64>,
    pub events_per_second: f64,
    pub busy_ratio: f64,
    pub exchange_aggregation_ratio: f64,
    pub last_checkpoint_id: u64,
    pub checkpoints_completed: u64,
    pub checkpoint_duration_ms: u64,
    pub checkpoint_uploaded_bytes: u64,
    pub checkpoint_size_bytes: u64,
    pub users: u64,
    pub pane_entries: u64,
}

impl Metrics {
    pub fn set_rate(&self, r: f64) {
        self.rate_bits.store(r.to_bits(), Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let wm = self.watermark.load(Relaxed);
        let max_ts = self.max_event_time.load(Relaxed);
        let finite = |v: i64| (v != WM_MIN && v != WM_MAX).then_some(v);
        let uptime = self.started.elapsed().as_secs_f64();
        let inc_in = self.increments_in.load(Relaxed);
        Snapshot {
            uptime_seconds: uptime,
            ready: self.ready.load(Relaxed),
            finished: self.finished.load(Relaxed),
            events_in: self.events_in.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            late: self.late.load(Relaxed),
            recommendations_out: self.recommendations_out.load(Relaxed),
            item_stats_out: self.item_stats_out.load(Relaxed),
            windows_emitted: self.windows_emitted.load(Relaxed),
            watermark: finite(wm),
            watermark_lag_ms: finite(wm).zip(finite(max_ts)).map(|(w, m)| m - w),
            events_per_second: f64::from_bits(self.rate_bits.load(Relaxed)),
            busy_ratio: if uptime > 0.0 {
                (self.busy_nanos.load(Relaxed) as f64 / 1e9 / uptime).min(1.0)
            } else {
                0.0
            },
            exchange_aggregation_ratio: if inc_in > 0 {
                self.increments_out.load(Relaxed) as f64 / inc_in as f64
            } else {
                1.0
            },
            last_checkpoint_id: self.checkpoint_last_id.load(Relaxed),
            checkpoints_completed: self.checkpoints_completed.load(Relaxed),
            checkpoint_duration_ms: self.checkpoint_duration_ms.load(Relaxed),
            checkpoint_uploaded_bytes: self.checkpoint_uploaded_bytes.load(Relaxed),
            checkpoint_size_bytes: self.checkpoint_size_bytes.load(Relaxed),
            users: self.users.load(Relaxed),
            pane_entries: self.pane_entries.load(Relaxed),
        }
    }

    /// Prometheus text exposition format.
    pub fn render_prometheus(&self) -> String {
        let s = self.snapshot();
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = writeln!(
                out,
                "# HELP riffle_{name} {help}\n# TYPE riffle_{name} {kind}\nriffle_{name} {value}"
            );
        };
        metric(
            "events_in_total",
            "counter",
            "Valid events read from the sources.",
            s.events_in as f64,
        );
        metric(
            "dead_lettered_total",
            "counter",
            "Records sent to the dead-letter output.",
            s.dead_lettered as f64,
        );
        metric(
            "late_events_total",
            "counter",
            "Events that arrived after all their windows were emitted.",
            s.late as f64,
        );
        metric(
            "recommendations_out_total",
            "counter",
            "Recommendation records produced.",
            s.recommendations_out as f64,
        );
        metric(
            "item_stats_out_total",
            "counter",
            "ItemStats records produced.",
            s.item_stats_out as f64,
        );
        metric(
            "windows_emitted_total",
            "counter",
            "Sliding windows emitted (per worker).",
            s.windows_emitted as f64,
        );
        metric(
            "watermark_ms",
            "gauge",
            "Current job watermark (epoch ms).",
            s.watermark.unwrap_or(0) as f64,
        );
        metric(
            "watermark_lag_ms",
            "gauge",
            "Largest event time seen minus the watermark.",
            s.watermark_lag_ms.unwrap_or(0) as f64,
        );
        metric(
            "processing_rate_events_per_second",
            "gauge",
            "Events processed per second, recent.",
            s.events_per_second,
        );
        metric(
            "busy_ratio",
            "gauge",
            "Share of wall time spent processing.",
            s.busy_ratio,
        );
        metric(
            "exchange_aggregation_ratio",
            "gauge",
            "Exchange records sent per increment produced.",
            s.exchange_aggregation_ratio,
        );
        metric(
            "checkpoint_last_id",
            "gauge",
            "Id of the last completed checkpoint.",
            s.last_checkpoint_id as f64,
        );
        metric(
            "checkpoints_completed_total",
            "counter",
            "Checkpoints completed by this process.",
            s.checkpoints_completed as f64,
        );
        metric(
            "checkpoint_duration_ms",
            "gauge",
            "Duration of the last checkpoint.",
            s.checkpoint_duration_ms as f64,
        );
        metric(
            "checkpoint_uploaded_bytes",
            "gauge",
            "Bytes uploaded by the last (incremental) checkpoint.",
            s.checkpoint_uploaded_bytes as f64,
        );
        metric(
            "checkpoint_size_bytes",
            "gauge",
            "Total state size referenced by the last checkpoint.",
            s.checkpoint_size_bytes as f64,
        );
        metric(
            "state_users",
            "gauge",
            "User histories held.",
            s.users as f64,
        );
        metric(
            "state_pane_entries",
            "gauge",
            "Live (pane, item) entries held.",
            s.pane_entries as f64,
        );
        out
    }
}
