//! Whole-pipeline benchmark: a generated Zipf clickstream through the full engine with
//! RocksDB state and local checkpoints; prints throughput, latency, checkpoint cost, RSS.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::config::{ByteSize, GeneratorConfig, JobConfig, SourceConfig};
use crate::engine::{Engine, Restore};
use crate::metrics::Metrics;
use crate::sink::file::FileSink;
use crate::source::generator::Generator;
use crate::Result;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub events: u64,
    pub users: u64,
    pub items: u64,
    pub parallelism: usize,
    pub events_per_second: u64,
    pub max_batch_size: usize,
    pub state_memory: ByteSize,
    /// Skew of users and items (Zipf exponent; 0 is uniform).
    pub zipf_exponent: f64,
    /// Write ItemStats (with a million items, gigabytes per window).
    pub item_stats: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            events: 2_000_000,
            users: 1_000_000,
            items: 100_000,
            parallelism: 2,
            // Event-time rate per partition (2 partitions): 2,000 events per event-time second.
            events_per_second: 1_000,
            max_batch_size: 4096,
            state_memory: crate::config::default_state_memory(),
            zipf_exponent: GeneratorConfig::default().zipf_exponent,
            item_stats: true,
        }
    }
}

#[derive(Clone, Debug)]
pub struct BenchReport {
    pub events: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    pub events_per_second_per_core: f64,
    pub events_per_cpu_second: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub checkpoints: usize,
    /// How long checkpoints paused the batch loop (state write-back, epoch close, cut).
    pub checkpoint_pause_ms_p50: u64,
    pub checkpoint_pause_ms_max: u64,
    /// From a checkpoint's start to its commit point (the upload runs beside processing).
    pub checkpoint_ms_p50: u64,
    pub checkpoint_ms_max: u64,
    pub checkpoint_uploaded_mb_avg: f64,
    pub checkpoint_size_mb_last: f64,
    pub peak_rss_mb: f64,
    pub state_memory: ByteSize,
    /// Heap bytes of the stages' state (as allocated): the peak after a batch's maintenance,
    /// and before one (per worker, summed).
    pub state_peak_mb: f64,
    pub state_peak_between_mb: f64,
    pub history_loads: u64,
    pub history_evictions: u64,
    /// Pane entries read back from RocksDB and moved to it; item dictionary rebuilds.
    pub pane_loads: u64,
    pub pane_evictions: u64,
    pub dict_rebuilds: u64,
    pub recommendations: u64,
    pub item_stats: u64,
    /// Co-visitation increments the user stage produced, and what the exchange sent after
    /// pre-aggregating them.
    pub increments_in: u64,
    pub increments_out: u64,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "events                 {}", self.events)?;
        writeln!(f, "wall time              {:.1} s", self.seconds)?;
        writeln!(
            f,
            "throughput             {:.0} events/s",
            self.events_per_second
        )?;
        writeln!(
            f,
            "per core               {:.0} events/s (throughput / min(parallelism, cores))",
            self.events_per_second_per_core
        )?;
        writeln!(
            f,
            "per CPU-second         {:.0} events (user + system time of all threads)",
            self.events_per_cpu_second
        )?;
        writeln!(
            f,
            "latency p50 / p99      {:.1} / {:.1} ms (read → output written, per event)",
            self.latency_p50_ms, self.latency_p99_ms
        )?;
        writeln!(
            f,
            "checkpoints            {}: pause p50 {} ms, max {} ms; to commit p50 {} ms, max {} ms",
            self.checkpoints,
            self.checkpoint_pause_ms_p50,
            self.checkpoint_pause_ms_max,
            self.checkpoint_ms_p50,
            self.checkpoint_ms_max
        )?;
        writeln!(
            f,
            "checkpoint size        {:.1} MB state, {:.1} MB uploaded on average (incremental)",
            self.checkpoint_size_mb_last, self.checkpoint_uploaded_mb_avg
        )?;
        writeln!(f, "peak RSS               {:.0} MB", self.peak_rss_mb)?;
        writeln!(
            f,
            "state in memory        {:.1} MB at most after a batch's maintenance, {:.1} MB before (budget {} = {:.1} MB)",
            self.state_peak_mb,
            self.state_peak_between_mb,
            self.state_memory,
            self.state_memory.0 as f64 / 1e6,
        )?;
        writeln!(
            f,
            "histories              {} read back from RocksDB, {} evicted",
            self.history_loads, self.history_evictions
        )?;
        writeln!(
            f,
            "item state             {} pane entries read back from RocksDB, {} evicted; dictionary rebuilt {} times",
            self.pane_loads, self.pane_evictions, self.dict_rebuilds
        )?;
        writeln!(
            f,
            "exchange               {} increments pre-aggregated into {} ({:.2} per event)",
            self.increments_in,
            self.increments_out,
            self.increments_out as f64 / self.events.max(1) as f64
        )?;
        write!(
            f,
            "output                 {} recommendations, {} item stats",
            self.recommendations, self.item_stats
        )
    }
}

pub fn run(opts: &BenchOptions, workdir: &Path) -> Result<BenchReport> {
    let gen = GeneratorConfig {
        users: opts.users,
        items: opts.items,
        events: opts.events,
        partitions: 2,
        events_per_second: opts.events_per_second,
        zipf_exponent: opts.zipf_exponent,
        ..GeneratorConfig::default()
    };
    let mut job = JobConfig {
        parallelism: opts.parallelism,
        max_batch_size: opts.max_batch_size,
        state_memory: opts.state_memory,
        ..JobConfig::local("bench", workdir, SourceConfig::Generator(gen.clone()))
    };
    job.sink.item_stats = opts.item_stats;
    let metrics = Arc::new(Metrics::default());
    let sink = FileSink::open(job.sink_dir()?, 1)?;
    let mut engine = Engine::new(
        job,
        Box::new(Generator::new(gen)),
        Box::new(sink),
        Restore::None,
        metrics.clone(),
    )?;
    engine.enable_latency_histogram();
    let started = Instant::now();
    let cpu_before = super::cpu_seconds().unwrap_or(0.0);
    engine.run()?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = super::cpu_seconds().unwrap_or(0.0) - cpu_before;
    let (history_loads, history_evictions) = engine.history_tiers();
    let (pane_loads, pane_evictions, dict_rebuilds) = engine.item_tiers();
    let (state_peak, state_peak_between) = engine.state_memory_peaks();
    let h = engine.latency.as_ref().expect("enabled above");
    let mut durations: Vec<u64> = engine
        .checkpoint_log
        .iter()
        .map(|c| c.duration_ms)
        .collect();
    durations.sort_unstable();
    let mut pauses: Vec<u64> = engine.checkpoint_log.iter().map(|c| c.pause_ms).collect();
    pauses.sort_unstable();
    let uploaded: Vec<u64> = engine
        .checkpoint_log
        .iter()
        .map(|c| c.uploaded_bytes)
        .collect();
    let s = metrics.snapshot();
    let eps = s.events_in as f64 / seconds;
    Ok(BenchReport {
        events: s.events_in,
        seconds,
        events_per_second: eps,
        events_per_second_per_core: eps / opts.parallelism.min(available_cores()) as f64,
        events_per_cpu_second: s.events_in as f64 / cpu.max(1e-9),
        latency_p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
        latency_p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
        checkpoints: durations.len(),
        checkpoint_pause_ms_p50: pauses.get(pauses.len() / 2).copied().unwrap_or(0),
        checkpoint_pause_ms_max: pauses.last().copied().unwrap_or(0),
        checkpoint_ms_p50: durations.get(durations.len() / 2).copied().unwrap_or(0),
        checkpoint_ms_max: durations.last().copied().unwrap_or(0),
        checkpoint_uploaded_mb_avg: uploaded.iter().sum::<u64>() as f64
            / uploaded.len().max(1) as f64
            / 1e6,
        checkpoint_size_mb_last: engine
            .checkpoint_log
            .last()
            .map_or(0.0, |c| c.size_bytes as f64 / 1e6),
        peak_rss_mb: super::peak_rss_bytes().unwrap_or(0) as f64 / 1e6,
        state_memory: opts.state_memory,
        state_peak_mb: state_peak as f64 / 1e6,
        state_peak_between_mb: state_peak_between as f64 / 1e6,
        history_loads,
        history_evictions,
        pane_loads,
        pane_evictions,
        dict_rebuilds,
        recommendations: s.recommendations_out,
        item_stats: s.item_stats_out,
        increments_in: metrics
            .increments_in
            .load(std::sync::atomic::Ordering::Relaxed),
        increments_out: metrics
            .increments_out
            .load(std::sync::atomic::Ordering::Relaxed),
    })
}

fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
