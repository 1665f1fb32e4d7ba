//! Process metrics, shared lock-free between the engine and the HTTP API.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
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
    /// How long the last checkpoint paused processing (local mode).
    pub checkpoint_pause_ms: AtomicU64,
    pub checkpoints_failed: AtomicU64,
    pub checkpoint_uploaded_bytes: AtomicU64,
    pub checkpoint_size_bytes: AtomicU64,
    /// The last restore opened the locally kept snapshot instead of downloading.
    pub restore_reused_local: AtomicBool,
    pub restore_downloaded_bytes: AtomicU64,
    pub busy_nanos: AtomicU64,
    /// Events per second over the last second or so, as f64 bits.
    pub rate_bits: AtomicU64,
    pub users: AtomicU64,
    pub pane_entries: AtomicU64,
    pub ready: AtomicBool,
    pub finished: AtomicBool,
    /// Busy share of the last rate window (recent, for autoscaling), as f64 bits.
    pub busy_recent_bits: AtomicU64,
    /// Distributed mode only.
    pub worker: Mutex<Option<WorkerInfo>>,
    pub commits_completed: AtomicU64,
    pub commit_duration_ms: AtomicU64,
    pub forwarded: AtomicU64,
    pub exchange_queued: AtomicU64,
    pub stale_frames: AtomicU64,
    pub upload_in_progress: AtomicBool,
    pub stopped: AtomicBool,
    pub partitions: Mutex<Vec<PartitionStatus>>,
    pub last_savepoint: Mutex<Option<String>>,
}

/// Who this process is in a distributed job.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerInfo {
    pub index: u32,
    pub workers: u32,
    pub generation: u32,
    pub key_groups: (u32, u32),
}

/// Where a worker stands on one of its input or exchange partitions.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    /// Next offset to read (committed with the next transaction).
    pub position: i64,
    /// The partition's last stable offset, from the consumer's statistics (-1 unknown).
    pub end: i64,
    pub lag: i64,
    /// Being fetched from a connected leader (consumer statistics).
    pub readable: bool,
    /// Input partitions: silent for `idleTimeout` while readable, so not holding the
    /// watermark back.
    pub idle: bool,
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
            checkpoint_pause_ms: AtomicU64::new(0),
            checkpoints_failed: AtomicU64::new(0),
            checkpoint_uploaded_bytes: AtomicU64::new(0),
            checkpoint_size_bytes: AtomicU64::new(0),
            restore_reused_local: AtomicBool::new(false),
            restore_downloaded_bytes: AtomicU64::new(0),
            busy_nanos: AtomicU64::new(0),
            rate_bits: AtomicU64::new(0),
            users: AtomicU64::new(0),
            pane_entries: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            busy_recent_bits: AtomicU64::new(0),
            worker: Mutex::new(None),
            commits_completed: AtomicU64::new(0),
            commit_duration_ms: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            exchange_queued: AtomicU64::new(0),
            stale_frames: AtomicU64::new(0),
            upload_in_progress: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            partitions: Mutex::new(Vec::new()),
            last_savepoint: Mutex::new(None),
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
    /// Time spent handling records since the start (not waiting for input): with
    /// `eventsIn`, what an autoscaler needs to measure a worker's true rate over any window.
    pub busy_seconds: f64,
    pub exchange_aggregation_ratio: f64,
    pub last_checkpoint_id: u64,
    pub checkpoints_completed: u64,
    pub checkpoint_duration_ms: u64,
    pub checkpoint_pause_ms: u64,
    pub checkpoints_failed: u64,
    pub checkpoint_uploaded_bytes: u64,
    pub checkpoint_size_bytes: u64,
    pub restore_reused_local: bool,
    pub restore_downloaded_bytes: u64,
    pub users: u64,
    pub pane_entries: u64,
    pub busy_ratio_recent: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerInfo>,
    pub commits_completed: u64,
    pub commit_duration_ms: u64,
    pub forwarded: u64,
    pub exchange_queued: u64,
    pub stale_frames: u64,
    pub upload_in_progress: bool,
    pub stopped: bool,
    /// Input and exchange partitions with their lag (distributed mode).
    pub partitions: Vec<PartitionStatus>,
    pub lag: i64,
    pub last_savepoint: Option<String>,
}

impl Metrics {
    pub fn set_rate(&self, r: f64) {
        self.rate_bits.store(r.to_bits(), Relaxed);
    }

    pub fn set_busy_recent(&self, r: f64) {
        self.busy_recent_bits.store(r.to_bits(), Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let wm = self.watermark.load(Relaxed);
        let max_ts = self.max_event_time.load(Relaxed);
        let finite = |v: i64| (v != WM_MIN && v != WM_MAX).then_some(v);
        let uptime = self.started.elapsed().as_secs_f64();
        let inc_in = self.increments_in.load(Relaxed);
        let partitions = self
            .partitions
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default();
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
            busy_seconds: self.busy_nanos.load(Relaxed) as f64 / 1e9,
            exchange_aggregation_ratio: if inc_in > 0 {
                self.increments_out.load(Relaxed) as f64 / inc_in as f64
            } else {
                1.0
            },
            last_checkpoint_id: self.checkpoint_last_id.load(Relaxed),
            checkpoints_completed: self.checkpoints_completed.load(Relaxed),
            checkpoint_duration_ms: self.checkpoint_duration_ms.load(Relaxed),
            checkpoint_pause_ms: self.checkpoint_pause_ms.load(Relaxed),
            checkpoints_failed: self.checkpoints_failed.load(Relaxed),
            checkpoint_uploaded_bytes: self.checkpoint_uploaded_bytes.load(Relaxed),
            checkpoint_size_bytes: self.checkpoint_size_bytes.load(Relaxed),
            restore_reused_local: self.restore_reused_local.load(Relaxed),
            restore_downloaded_bytes: self.restore_downloaded_bytes.load(Relaxed),
            users: self.users.load(Relaxed),
            pane_entries: self.pane_entries.load(Relaxed),
            busy_ratio_recent: f64::from_bits(self.busy_recent_bits.load(Relaxed)),
            worker: self.worker.lock().map(|w| w.clone()).unwrap_or_default(),
            commits_completed: self.commits_completed.load(Relaxed),
            commit_duration_ms: self.commit_duration_ms.load(Relaxed),
            forwarded: self.forwarded.load(Relaxed),
            exchange_queued: self.exchange_queued.load(Relaxed),
            stale_frames: self.stale_frames.load(Relaxed),
            upload_in_progress: self.upload_in_progress.load(Relaxed),
            stopped: self.stopped.load(Relaxed),
            lag: partitions.iter().map(|p| p.lag.max(0)).sum(),
            partitions,
            last_savepoint: self
                .last_savepoint
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default(),
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
            "busy_seconds_total",
            "counter",
            "Time spent handling records (not waiting for input); its rate is the busy share.",
            s.busy_seconds,
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
            "Duration of the last checkpoint, from its start to its commit point.",
            s.checkpoint_duration_ms as f64,
        );
        metric(
            "checkpoint_pause_ms",
            "gauge",
            "How long the last checkpoint paused processing (local mode: state write-back and cut).",
            s.checkpoint_pause_ms as f64,
        );
        metric(
            "checkpoints_failed_total",
            "counter",
            "Checkpoints that failed before their commit point.",
            s.checkpoints_failed as f64,
        );
        metric(
            "restore_reused_local",
            "gauge",
            "1 if the last restore opened the locally kept snapshot instead of downloading.",
            f64::from(u8::from(s.restore_reused_local)),
        );
        metric(
            "restore_downloaded_bytes",
            "gauge",
            "Bytes the last restore downloaded from the checkpoint store.",
            s.restore_downloaded_bytes as f64,
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
        metric(
            "busy_ratio_recent",
            "gauge",
            "Share of wall time spent processing over the last second or so.",
            s.busy_ratio_recent,
        );
        if let Some(w) = &s.worker {
            metric(
                "worker_index",
                "gauge",
                "This worker's index.",
                f64::from(w.index),
            );
            metric(
                "workers",
                "gauge",
                "Workers of this worker's generation.",
                f64::from(w.workers),
            );
            metric(
                "generation",
                "gauge",
                "This worker's generation.",
                f64::from(w.generation),
            );
            metric(
                "commits_total",
                "counter",
                "Kafka transactions committed.",
                s.commits_completed as f64,
            );
            metric(
                "commit_duration_ms",
                "gauge",
                "Duration of the last transaction commit.",
                s.commit_duration_ms as f64,
            );
            metric(
                "forwarded_total",
                "counter",
                "Events forwarded to the worker owning their user.",
                s.forwarded as f64,
            );
            metric(
                "exchange_queued",
                "gauge",
                "Exchange entries waiting for the item watermark (alignment).",
                s.exchange_queued as f64,
            );
            metric(
                "lag_records",
                "gauge",
                "Records behind the end of the owned input and exchange partitions.",
                s.lag as f64,
            );
            let _ = writeln!(
                out,
                "# HELP riffle_partition_lag_records Records behind the partition's last stable offset.\n# TYPE riffle_partition_lag_records gauge"
            );
            for p in &s.partitions {
                let _ = writeln!(
                    out,
                    "riffle_partition_lag_records{{topic=\"{}\",partition=\"{}\"}} {}",
                    p.topic, p.partition, p.lag
                );
            }
        }
        out
    }
}
