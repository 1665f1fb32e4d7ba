//! `riffle bench-kafka`: the distributed runtime with Kafka in the loop, on the test bed's real
//! Kafka and MinIO. Worker processes are this binary's `riffle run`; the benchmark produces a
//! generated Zipf clickstream into the input topic and reads the recommendations topic the way
//! a user would (`read_committed`). It measures, each on a fresh job (own topics, consumer
//! group and checkpoint prefix):
//!
//! 1. **throughput**: N events are produced first, then the workers start; events/s from the
//!    first to the last recommendation, and events per CPU second of the worker processes;
//! 2. **latency**: events produced at a fixed rate below saturation, send → recommendation
//!    visible, warm-up excluded;
//! 3. **checkpoints and commits**: each worker's `GET /status`, sampled twice a second (also
//!    written to `status.csv` next to the worker logs);
//! 4. **recovery**: in the latency job, one worker is SIGKILLed and restarted with the same
//!    arguments; time until `/readyz` answers 200 and until end-to-end latency is back under
//!    one second.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Deserialize;

use riffle_runtime::config::{
    self, GeneratorConfig, JobConfig, KafkaConfig, KafkaSinkConfig, KafkaSourceConfig, S3Config,
    SinkConfig, SourceConfig, StartOffsets,
};
use riffle_runtime::event::Event;
use riffle_runtime::keygroup::key_group;
use riffle_runtime::source::generator::Generator;

type Result<T> = anyhow::Result<T>;

/// What to run. The defaults are the documented benchmark (see `riffle bench-kafka --help`).
#[derive(Clone, Debug, clap::Args)]
pub struct KafkaBenchOptions {
    /// Worker processes.
    #[arg(long, default_value_t = 3)]
    pub workers: u32,
    /// Key groups; also the partition count of the input topic (keyed by userId).
    #[arg(long, default_value_t = 32)]
    pub key_groups: u32,
    /// Throughput: events produced before the workers start.
    #[arg(long, default_value_t = 500_000)]
    pub events: u64,
    /// Distinct users of the generated clickstream (Zipf).
    #[arg(long, default_value_t = 100_000)]
    pub users: u64,
    /// Distinct items of the generated clickstream (Zipf within categories).
    #[arg(long, default_value_t = 20_000)]
    pub items: u64,
    /// Generator partitions, interleaved round-robin into one stream.
    #[arg(long, default_value_t = 2)]
    pub generator_partitions: u32,
    /// Event-time rate per generator partition (events per event-time second).
    #[arg(long, default_value_t = 1_000)]
    pub event_time_rate: u64,
    /// Latency: offered rate (events per wall-clock second), below saturation.
    #[arg(long, default_value_t = 2_000)]
    pub rate: u64,
    /// Latency: how long to produce at `rate` before the recovery test.
    #[arg(long, default_value = "60s")]
    pub duration: config::Duration,
    /// Latency: events sent during this first part of `duration` are not measured.
    #[arg(long, default_value = "5s")]
    pub warmup: config::Duration,
    /// Recovery: the worker to SIGKILL and restart.
    #[arg(long, default_value_t = 1)]
    pub kill_worker: u32,
    /// Recovery: how long to keep producing at `rate` after the kill.
    #[arg(long, default_value = "60s")]
    pub recovery_window: config::Duration,
    #[arg(long, default_value = "10s")]
    pub checkpoint_interval: config::Duration,
    #[arg(long, default_value = "100ms")]
    pub commit_interval: config::Duration,
    /// Extra librdkafka property for the workers' clients (`kafka.properties` of the job),
    /// e.g. `retry.backoff.ms=10`; repeatable.
    #[arg(long = "kafka-property", value_name = "KEY=VALUE", value_parser = parse_property)]
    pub kafka_properties: Vec<(String, String)>,
    /// Skip the throughput phase.
    #[arg(long)]
    pub skip_throughput: bool,
    /// Skip the latency phase (and with it the recovery test).
    #[arg(long)]
    pub skip_latency: bool,
    /// Do not kill a worker in the latency phase.
    #[arg(long)]
    pub skip_recovery: bool,
    /// Keep the topics, consumer groups, S3 prefixes and state directories.
    #[arg(long)]
    pub keep: bool,
    /// Directory for job files, worker logs and state (default: a new directory under the
    /// system temp directory). Worker logs are always kept.
    #[arg(long)]
    pub workdir: Option<PathBuf>,
}

/// How to reach the test bed, from `eval "$(e2e/testbed/testbed env)"`.
#[derive(Clone, Debug)]
pub struct Testbed {
    pub bootstrap: String,
    pub s3_endpoint: String,
    pub bucket: String,
    pub region: String,
}

const TESTBED_HINT: &str =
    "start the test bed and load its settings: `make testbed-up && eval \"$(e2e/testbed/testbed env)\"`";

impl Testbed {
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .with_context(|| format!("{name} is not set: {TESTBED_HINT}"))
        };
        let testbed = Self {
            bootstrap: var("KAFKA_BOOTSTRAP")?,
            s3_endpoint: var("S3_ENDPOINT")?,
            bucket: var("S3_BUCKET")?,
            region: std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
        };
        // The workers take their S3 credentials from the environment they inherit.
        for name in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            var(name)?;
        }
        Ok(testbed)
    }

    fn s3(&self) -> S3Config {
        S3Config {
            endpoint: Some(self.s3_endpoint.clone()),
            region: Some(self.region.clone()),
            force_path_style: true,
        }
    }
}

/// Everything the benchmark measured.
#[derive(Clone, Debug)]
pub struct KafkaBenchReport {
    pub workers: u32,
    pub key_groups: u32,
    pub checkpoint_interval: config::Duration,
    pub commit_interval: config::Duration,
    /// The input, in words.
    pub input: String,
    pub workdir: PathBuf,
    pub throughput: Option<ThroughputResult>,
    pub latency: Option<LatencyResult>,
    pub recovery: Option<RecoveryResult>,
    /// Anything that looks wrong in the runtime's behaviour (duplicates, losses, dead letters,
    /// forwarded events).
    pub anomalies: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct ThroughputResult {
    pub events: u64,
    pub produce_seconds: f64,
    /// Worker spawn → first recommendation visible.
    pub startup_seconds: f64,
    /// First → last recommendation visible.
    pub seconds: f64,
    pub recommendations: u64,
    pub events_per_second: f64,
    /// utime + stime of the worker processes over [first, last recommendation].
    pub cpu_seconds: f64,
    pub events_per_cpu_second: f64,
    pub clk_tck: u64,
    pub clk_tck_assumed: bool,
    /// Busy CPUs of the whole machine over the same window (Kafka and MinIO included).
    pub machine_busy_cores: f64,
    pub cores: usize,
    pub workers: Vec<WorkerSummary>,
}

#[derive(Clone, Debug)]
pub struct LatencyResult {
    pub rate: u64,
    pub achieved_rate: f64,
    pub measured_seconds: f64,
    pub warmup_seconds: f64,
    /// Events sent after the warm-up and before the kill, and how many of them got a
    /// recommendation.
    pub measured: u64,
    pub received: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub workers: Vec<WorkerSummary>,
    /// Every event's send time and latency (CSV).
    pub samples: PathBuf,
}

#[derive(Clone, Debug)]
pub struct RecoveryResult {
    pub worker: u32,
    /// SIGKILL → the restarted worker's `GET /readyz` answers 200.
    pub ready_seconds: f64,
    /// SIGKILL → the send time from which every event's recommendation took under 1 s
    /// (`None`: not within the observed window).
    pub latency_recovered_seconds: Option<f64>,
    /// SIGKILL → the last recommendation of the events in flight at the kill or sent while
    /// the worker was down (until `/readyz`) became visible (`None`: some never arrived).
    pub outage_drained_seconds: Option<f64>,
    /// Over the affected events: in flight at the kill, or sent after it.
    pub max_latency_ms: f64,
    pub affected_events: u64,
    /// Affected events that never got a recommendation.
    pub affected_missing: u64,
    pub observed_seconds: f64,
}

/// One worker's checkpoint and commit figures, from its `GET /status`.
#[derive(Clone, Debug, Default)]
pub struct WorkerSummary {
    pub index: u32,
    /// Counters restart with the process: true for the worker restarted after the kill.
    pub restarted: bool,
    pub last: WorkerStatus,
    /// Every checkpoint seen while sampling `/status`.
    pub checkpoints: Vec<CheckpointSample>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct CheckpointSample {
    pub duration_ms: u64,
    pub uploaded_bytes: u64,
}

/// The fields of `/status` → `metrics` the benchmark reports.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkerStatus {
    pub events_in: u64,
    pub recommendations_out: u64,
    pub item_stats_out: u64,
    pub late: u64,
    pub dead_lettered: u64,
    pub forwarded: u64,
    pub checkpoints_completed: u64,
    pub checkpoint_duration_ms: u64,
    pub checkpoint_size_bytes: u64,
    pub checkpoint_uploaded_bytes: u64,
    pub commits_completed: u64,
    pub commit_duration_ms: u64,
    /// Records behind on the worker's input and exchange partitions.
    pub lag: i64,
    pub busy_ratio_recent: f64,
}

/// Run the benchmark phases the options select.
pub fn run(opts: &KafkaBenchOptions, testbed: &Testbed) -> Result<KafkaBenchReport> {
    validate(opts)?;
    watch_signals()?;
    let tag = format!("{}-{}", unix_ms() / 1000, std::process::id());
    let workdir = match &opts.workdir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("riffle-bench-kafka-{tag}")),
    };
    std::fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    eprintln!(
        "riffle bench-kafka: worker logs, job files and state in {}",
        workdir.display()
    );
    let mut report = KafkaBenchReport {
        workers: opts.workers,
        key_groups: opts.key_groups,
        checkpoint_interval: opts.checkpoint_interval,
        commit_interval: opts.commit_interval,
        input: format!(
            "generated Zipf clickstream, {} users, {} items, {} × {} events per event-time second, \
             JSON into {} partitions keyed by userId",
            opts.users,
            opts.items,
            opts.generator_partitions,
            opts.event_time_rate,
            opts.key_groups
        ),
        workdir: workdir.clone(),
        throughput: None,
        latency: None,
        recovery: None,
        anomalies: Vec::new(),
    };
    let ctx = Ctx {
        opts,
        testbed,
        exe: std::env::current_exe().context("locating the riffle binary")?,
    };
    if !opts.skip_throughput {
        let dir = workdir.join("throughput");
        let job = BenchJob::create(&ctx, &format!("bench-{tag}-tput"), &dir)?;
        report.throughput = Some(throughput_phase(&ctx, job, &mut report.anomalies)?);
    }
    if !opts.skip_latency {
        let dir = workdir.join("latency");
        let job = BenchJob::create(&ctx, &format!("bench-{tag}-lat"), &dir)?;
        let (latency, recovery) = latency_phase(&ctx, job, &mut report.anomalies)?;
        report.latency = Some(latency);
        report.recovery = recovery;
    }
    Ok(report)
}

fn parse_property(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("{s:?}: expected KEY=VALUE")),
    }
}

fn validate(o: &KafkaBenchOptions) -> Result<()> {
    if o.workers == 0 || o.workers > o.key_groups {
        bail!("--workers must be between 1 and --key-groups");
    }
    if !o.skip_recovery && o.kill_worker >= o.workers {
        bail!("--kill-worker {} is not a worker index", o.kill_worker);
    }
    if o.rate == 0 || o.event_time_rate == 0 || o.generator_partitions == 0 {
        bail!("--rate, --event-time-rate and --generator-partitions must be positive");
    }
    if o.warmup.0 >= o.duration.0 {
        bail!("--warmup must be shorter than --duration");
    }
    Ok(())
}

/// Set by SIGINT or SIGTERM: the wait loops stop with an error, and dropping the job kills
/// the workers and deletes what it created (a plain kill would orphan the workers).
static INTERRUPTED: std::sync::OnceLock<std::sync::Arc<AtomicBool>> = std::sync::OnceLock::new();

fn watch_signals() -> Result<()> {
    let flag = riffle_runtime::shutdown::on_termination()?;
    let _ = INTERRUPTED.set(flag);
    Ok(())
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.get().is_some_and(|f| f.load(Relaxed)) {
        bail!("interrupted");
    }
    Ok(())
}

/// What every phase needs.
struct Ctx<'a> {
    opts: &'a KafkaBenchOptions,
    testbed: &'a Testbed,
    exe: PathBuf,
}

// ---------------------------------------------------------------------------------------------
// Phases

/// Pre-produce, start the workers, measure until every recommendation is visible.
fn throughput_phase(
    ctx: &Ctx,
    mut job: BenchJob,
    anomalies: &mut Vec<String>,
) -> Result<ThroughputResult> {
    let opts = ctx.opts;
    eprintln!(
        "riffle bench-kafka: throughput: producing {} events into {}",
        opts.events, job.names.input
    );
    let producer = EventProducer::new(&ctx.testbed.bootstrap, &job.names.input, opts.key_groups)?;
    let mut stream = ClickStream::new(opts, unix_ms());
    let started = Instant::now();
    for n in 0..opts.events {
        if n % 10_000 == 0 {
            check_interrupted()?;
        }
        producer.send(&stream.next_event())?;
    }
    producer.flush()?;
    let produce_seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        events = opts.events,
        seconds = produce_seconds,
        "input produced"
    );

    job.start_collector(ctx)?;
    eprintln!(
        "riffle bench-kafka: throughput: starting {} workers",
        opts.workers
    );
    let spawned = Instant::now();
    job.spawn_workers()?;
    let (clk_tck, clk_tck_assumed) = clk_tck();

    // CPU is sampled when the first recommendation is seen (this loop polls every few ms, so
    // the window starts at most that much late) and when the last one is.
    let mut cpu_start = None;
    let mut progress = (0usize, Instant::now());
    const STALL: Duration = Duration::from_secs(120);
    loop {
        job.check()?;
        let seen = job.collector().count();
        if seen > 0 && cpu_start.is_none() {
            cpu_start = Some((job.cpu_ticks()?, machine_ticks()));
        }
        if seen as u64 >= opts.events {
            break;
        }
        if seen > progress.0 {
            progress = (seen, Instant::now());
        } else if progress.1.elapsed() > STALL {
            anomalies.push(format!(
                "throughput: only {seen} of {} recommendations after no progress for {} s",
                opts.events,
                STALL.as_secs()
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let cpu_end = (job.cpu_ticks()?, machine_ticks());
    job.sample_status_now();
    let workers = job.summaries();
    job.stop_workers();
    let arrivals = job.stop_collector()?;
    job.cleanup();

    let (first, last) = arrivals
        .first
        .zip(arrivals.last)
        .context("no recommendation arrived")?;
    let seconds = (last - first).as_secs_f64().max(1e-9);
    let (start_ticks, start_machine) = cpu_start.context("no CPU sample")?;
    let cpu_seconds = cpu_end.0.saturating_sub(start_ticks) as f64 / clk_tck as f64;
    let machine_busy_cores = match (start_machine, cpu_end.1) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / clk_tck as f64 / seconds,
        _ => f64::NAN,
    };
    let recommendations = arrivals.at.len() as u64;
    note_arrival_anomalies("throughput", &arrivals, opts.events, anomalies);
    note_worker_anomalies("throughput", &workers, anomalies);
    Ok(ThroughputResult {
        events: opts.events,
        produce_seconds,
        startup_seconds: (first - spawned).as_secs_f64(),
        seconds,
        recommendations,
        events_per_second: recommendations as f64 / seconds,
        cpu_seconds,
        events_per_cpu_second: recommendations as f64 / cpu_seconds.max(1e-9),
        clk_tck,
        clk_tck_assumed,
        machine_busy_cores,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        workers,
    })
}

/// Start the job, produce at a fixed rate, measure latency; then kill and restart a worker
/// while still producing and measure how it recovers.
fn latency_phase(
    ctx: &Ctx,
    mut job: BenchJob,
    anomalies: &mut Vec<String>,
) -> Result<(LatencyResult, Option<RecoveryResult>)> {
    let opts = ctx.opts;
    job.start_collector(ctx)?;
    eprintln!(
        "riffle bench-kafka: latency: starting {} workers",
        opts.workers
    );
    job.spawn_workers()?;
    job.wait_ready(Duration::from_secs(180))?;

    let kill_one = !opts.skip_recovery;
    eprintln!(
        "riffle bench-kafka: latency: producing {} events/s for {}{}",
        opts.rate,
        opts.duration,
        if kill_one {
            format!(
                ", then SIGKILL worker {} and keep producing for {}",
                opts.kill_worker, opts.recovery_window
            )
        } else {
            String::new()
        }
    );
    let producer = EventProducer::new(&ctx.testbed.bootstrap, &job.names.input, opts.key_groups)?;
    let mut pacer = Pacer::start(producer, ClickStream::new(opts, unix_ms()), opts.rate)?;
    let start = pacer.started;
    let measure_to = start + opts.duration.as_std();
    job.watch_until(measure_to, &mut pacer)?;

    let mut kill = None;
    if kill_one {
        // Kill only once the measured events are all visible, so the kill cannot show up
        // in the steady-state latency (events keep flowing meanwhile).
        let measured = pacer.sent_before(measure_to);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut missing = job.collector().missing(&measured);
        while missing > 0 && Instant::now() < deadline {
            job.check()?;
            pacer.check()?;
            std::thread::sleep(Duration::from_millis(20));
            missing = job.collector().missing(&measured);
        }
        if missing > 0 {
            anomalies.push(format!(
                "latency: {missing} measured events still without a recommendation 60 s after \
                 the measurement ended (the kill went ahead)"
            ));
        }
        let w = opts.kill_worker as usize;
        let killed_at = Instant::now();
        job.workers[w].restart()?;
        tracing::info!(worker = w, "killed and restarted");
        let ready_at = job.wait_worker_ready(w, Duration::from_secs(300))?;
        eprintln!(
            "riffle bench-kafka: recovery: worker {w} ready {:.2} s after SIGKILL",
            (ready_at - killed_at).as_secs_f64()
        );
        job.watch_until(killed_at + opts.recovery_window.as_std(), &mut pacer)?;
        kill = Some((killed_at, ready_at));
    }
    let stopped = Instant::now();
    let sent = pacer.stop()?;

    // Wait for the recommendations of everything sent (bounded: losses are reported).
    let expected = sent.len();
    let drain = Duration::from_secs(120);
    while job.collector().count() < expected && stopped.elapsed() < drain {
        job.check()?;
        std::thread::sleep(Duration::from_millis(10));
    }
    job.sample_status_now();
    let mut workers = job.summaries();
    if kill_one {
        workers[opts.kill_worker as usize].restarted = true;
    }
    job.stop_workers();
    let arrivals = job.stop_collector()?;
    job.cleanup();

    let csv = job.dir.join("latency.csv");
    write_latency_csv(&csv, start, &sent, &arrivals)
        .with_context(|| format!("writing {}", csv.display()))?;
    note_arrival_anomalies("latency", &arrivals, expected as u64, anomalies);
    note_worker_anomalies("latency", &workers, anomalies);
    let measure_from = start + opts.warmup.as_std();
    let latency = latency_result(
        opts,
        &sent,
        &arrivals,
        (measure_from, measure_to),
        (start, kill.map_or(stopped, |(k, _)| k)),
        workers,
        csv,
    )?;
    let recovery = kill.map(|(killed, ready)| {
        recovery_result(opts.kill_worker, &sent, &arrivals, killed, ready, stopped)
    });
    Ok((latency, recovery))
}

fn latency_result(
    opts: &KafkaBenchOptions,
    sent: &[(String, Instant)],
    arrivals: &Arrivals,
    measured: (Instant, Instant),
    producing: (Instant, Instant),
    workers: Vec<WorkerSummary>,
    samples: PathBuf,
) -> Result<LatencyResult> {
    // Microseconds, 3 significant digits, up to an hour.
    let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let (mut n, mut received, mut produced) = (0u64, 0u64, 0u64);
    for (id, at) in sent {
        if *at < producing.1 {
            produced += 1;
        }
        if *at < measured.0 || *at >= measured.1 {
            continue;
        }
        n += 1;
        if let Some(got) = arrivals.at.get(id) {
            received += 1;
            h.saturating_record(got.saturating_duration_since(*at).as_micros() as u64);
        }
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let produced_for = (producing.1 - producing.0).as_secs_f64();
    Ok(LatencyResult {
        rate: opts.rate,
        achieved_rate: produced as f64 / produced_for.max(1e-9),
        measured_seconds: (measured.1 - measured.0).as_secs_f64(),
        warmup_seconds: opts.warmup.as_std().as_secs_f64(),
        measured: n,
        received,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: h.max() as f64 / 1000.0,
        workers,
        samples,
    })
}

/// How the job came back after the kill, from the events it affected: those sent after it and
/// those in flight (sent before, not visible yet) when it happened.
fn recovery_result(
    worker: u32,
    sent: &[(String, Instant)],
    arrivals: &Arrivals,
    killed: Instant,
    ready: Instant,
    stopped: Instant,
) -> RecoveryResult {
    const GOOD: Duration = Duration::from_secs(1);
    let after: Vec<(Instant, Option<Duration>)> = sent
        .iter()
        .map(|(id, at)| (*at, arrivals.at.get(id).copied()))
        .filter(|(at, got)| *at >= killed || got.is_none_or(|g| g > killed))
        .map(|(at, got)| (at, got.map(|g| g.saturating_duration_since(at))))
        .collect();
    // Latency is back under 1 s from the event after the last slow (or lost) one.
    let last_bad = after
        .iter()
        .rposition(|(_, lat)| lat.is_none_or(|l| l >= GOOD));
    let latency_recovered_seconds = match last_bad {
        None => Some(0.0),
        Some(i) => after
            .get(i + 1)
            .map(|(at, _)| at.saturating_duration_since(killed).as_secs_f64()),
    };
    let outage_drained_seconds = after
        .iter()
        .filter(|(at, _)| *at <= ready)
        .map(|(at, lat)| lat.map(|l| (*at + l).saturating_duration_since(killed).as_secs_f64()))
        .try_fold(0.0f64, |acc, t| t.map(|t| acc.max(t)));
    RecoveryResult {
        worker,
        ready_seconds: (ready - killed).as_secs_f64(),
        latency_recovered_seconds,
        outage_drained_seconds,
        max_latency_ms: after
            .iter()
            .filter_map(|(_, l)| *l)
            .max()
            .map_or(0.0, |l| l.as_secs_f64() * 1000.0),
        affected_events: after.len() as u64,
        affected_missing: after.iter().filter(|(_, l)| l.is_none()).count() as u64,
        observed_seconds: (stopped - killed).as_secs_f64(),
    }
}

/// Every event of the latency phase: when it was sent (seconds since the producer started)
/// and its latency in ms (empty: never arrived), for plots and for looking into outliers.
fn write_latency_csv(
    path: &Path,
    start: Instant,
    sent: &[(String, Instant)],
    arrivals: &Arrivals,
) -> Result<()> {
    let mut out = std::io::BufWriter::new(File::create(path)?);
    writeln!(out, "event_id,sent_s,latency_ms")?;
    for (id, at) in sent {
        let latency = arrivals.at.get(id).map_or(String::new(), |got| {
            format!(
                "{:.3}",
                got.saturating_duration_since(*at).as_secs_f64() * 1000.0
            )
        });
        writeln!(
            out,
            "{id},{:.4},{latency}",
            at.saturating_duration_since(start).as_secs_f64()
        )?;
    }
    out.flush()?;
    Ok(())
}

fn note_arrival_anomalies(phase: &str, a: &Arrivals, expected: u64, out: &mut Vec<String>) {
    let got = a.at.len() as u64;
    if got < expected {
        out.push(format!(
            "{phase}: {} of {expected} events never got a recommendation",
            expected - got
        ));
    }
    if got > expected {
        out.push(format!(
            "{phase}: recommendations for {} events that were not sent",
            got - expected
        ));
    }
    if a.duplicates > 0 {
        out.push(format!(
            "{phase}: {} duplicate recommendations visible to a read_committed consumer",
            a.duplicates
        ));
    }
    if a.unreadable > 0 {
        out.push(format!(
            "{phase}: {} recommendation records without an eventId",
            a.unreadable
        ));
    }
}

fn note_worker_anomalies(phase: &str, workers: &[WorkerSummary], out: &mut Vec<String>) {
    for w in workers {
        if w.last.dead_lettered > 0 {
            out.push(format!(
                "{phase}: worker {} dead-lettered {} generated events",
                w.index, w.last.dead_lettered
            ));
        }
        // Events are produced to their user's key group, which the reading worker owns.
        if w.last.forwarded > 0 {
            out.push(format!(
                "{phase}: worker {} forwarded {} events (input partition ≠ the user's key group?)",
                w.index, w.last.forwarded
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One job: its topics, checkpoint prefix, workers and recommendation reader

/// Names of one job's topics and stores.
struct JobNames {
    job: String,
    input: String,
    recommendations: String,
    item_stats: String,
    late: String,
    dead_letter: String,
    checkpoint_store: String,
    /// Prefix of the internal topics, also the consumer group.
    internal: String,
}

impl JobNames {
    fn new(job: &str, bucket: &str) -> Self {
        Self {
            job: job.to_string(),
            input: format!("{job}-events"),
            recommendations: format!("{job}-recommendations"),
            item_stats: format!("{job}-item-stats"),
            late: format!("{job}-late"),
            dead_letter: format!("{job}-dead-letter"),
            checkpoint_store: format!("s3://{bucket}/{job}"),
            internal: format!("riffle-{job}"),
        }
    }

    fn topics(&self) -> Vec<String> {
        let mut t = vec![
            self.input.clone(),
            self.recommendations.clone(),
            self.item_stats.clone(),
            self.late.clone(),
            self.dead_letter.clone(),
        ];
        t.extend(["exchange", "changelog", "trending"].map(|s| format!("{}-{s}", self.internal)));
        t
    }
}

const STATUS_PERIOD: Duration = Duration::from_millis(500);
const STATUS_CSV_HEADER: &str = "t_s,worker,events_in,recommendations_out,commits,commit_ms,\
     checkpoints,checkpoint_ms,checkpoint_size_bytes,checkpoint_uploaded_bytes,late,lag,busy_recent";

/// A benchmark job on the test bed. [`BenchJob::cleanup`] (also run on drop, so error paths
/// leave nothing running) kills the workers, stops the reader and, unless `keep`, deletes the
/// topics, the job's consumer group, its checkpoint prefix and the workers' state.
struct BenchJob {
    workers: Vec<WorkerProcess>,
    collector: Option<Collector>,
    history: Vec<WorkerSummary>,
    last_status_poll: Instant,
    /// Every `/status` sample, for looking at a run over time.
    status_log: std::io::BufWriter<File>,
    created: Instant,
    names: JobNames,
    admin: KafkaAdmin,
    testbed: Testbed,
    dir: PathBuf,
    keep: bool,
    cleaned: bool,
}

impl BenchJob {
    /// Create the job's input and output topics and write its job file.
    fn create(ctx: &Ctx, name: &str, dir: &Path) -> Result<Self> {
        let opts = ctx.opts;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let names = JobNames::new(name, &ctx.testbed.bucket);
        let admin = KafkaAdmin::new(&ctx.testbed.bootstrap)?;
        admin.create_topics(&[
            (&names.input, opts.key_groups as i32),
            (&names.recommendations, 8),
            (&names.item_stats, 8),
            (&names.late, 1),
            (&names.dead_letter, 1),
        ])?;
        let config = dir.join("job.yaml");
        let yaml = serde_yaml::to_string(&job_config(ctx, &names, dir))?;
        // Refuse early what a worker would refuse.
        JobConfig::from_yaml(&yaml).context("the generated job file")?;
        std::fs::write(&config, yaml).with_context(|| format!("writing {}", config.display()))?;
        let workers = (0..opts.workers)
            .map(|index| {
                Ok(WorkerProcess::new(WorkerSpec {
                    exe: ctx.exe.clone(),
                    config: config.clone(),
                    index,
                    workers: opts.workers,
                    state_dir: dir.join(format!("state-{index}")),
                    http: free_port()?,
                    log: dir.join(format!("worker-{index}.log")),
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        let status_csv = dir.join("status.csv");
        let mut status_log = std::io::BufWriter::new(
            File::create(&status_csv)
                .with_context(|| format!("creating {}", status_csv.display()))?,
        );
        writeln!(status_log, "{STATUS_CSV_HEADER}")?;
        tracing::info!(job = name, dir = %dir.display(), "job created");
        Ok(Self {
            history: (0..opts.workers)
                .map(|index| WorkerSummary {
                    index,
                    ..WorkerSummary::default()
                })
                .collect(),
            workers,
            collector: None,
            last_status_poll: Instant::now(),
            status_log,
            created: Instant::now(),
            names,
            admin,
            testbed: ctx.testbed.clone(),
            dir: dir.to_path_buf(),
            keep: opts.keep,
            cleaned: false,
        })
    }

    fn start_collector(&mut self, ctx: &Ctx) -> Result<()> {
        self.collector = Some(Collector::start(
            &ctx.testbed.bootstrap,
            &self.names.recommendations,
            8,
        )?);
        Ok(())
    }

    fn collector(&self) -> &Collector {
        self.collector.as_ref().expect("collector started")
    }

    fn stop_collector(&mut self) -> Result<Arrivals> {
        self.collector.take().expect("collector started").stop()
    }

    fn spawn_workers(&mut self) -> Result<()> {
        for w in &mut self.workers {
            w.spawn()?;
        }
        Ok(())
    }

    fn stop_workers(&mut self) {
        for w in &mut self.workers {
            w.kill();
        }
    }

    /// Fail if a worker exited; sample `/status` every `STATUS_PERIOD`.
    fn check(&mut self) -> Result<()> {
        check_interrupted()?;
        for w in &mut self.workers {
            w.check_alive()?;
        }
        if self.last_status_poll.elapsed() >= STATUS_PERIOD {
            self.sample_status_now();
        }
        Ok(())
    }

    /// Record each worker's latest status, and the last checkpoint's figures whenever its
    /// checkpoint count moved.
    fn sample_status_now(&mut self) {
        self.last_status_poll = Instant::now();
        for (w, h) in self.workers.iter().zip(&mut self.history) {
            let Ok(s) = w.status() else { continue };
            // A restarted process counts from zero again.
            let previous = if s.checkpoints_completed < h.last.checkpoints_completed {
                0
            } else {
                h.last.checkpoints_completed
            };
            if s.checkpoints_completed > previous {
                h.checkpoints.push(CheckpointSample {
                    duration_ms: s.checkpoint_duration_ms,
                    uploaded_bytes: s.checkpoint_uploaded_bytes,
                });
            }
            let _ = writeln!(
                self.status_log,
                "{:.3},{},{},{},{},{},{},{},{},{},{},{},{:.3}",
                self.created.elapsed().as_secs_f64(),
                h.index,
                s.events_in,
                s.recommendations_out,
                s.commits_completed,
                s.commit_duration_ms,
                s.checkpoints_completed,
                s.checkpoint_duration_ms,
                s.checkpoint_size_bytes,
                s.checkpoint_uploaded_bytes,
                s.late,
                s.lag,
                s.busy_ratio_recent
            );
            h.last = s;
        }
        let _ = self.status_log.flush();
    }

    fn summaries(&self) -> Vec<WorkerSummary> {
        self.history.clone()
    }

    /// Total utime + stime of the running workers, in clock ticks.
    fn cpu_ticks(&self) -> Result<u64> {
        self.workers.iter().map(|w| w.cpu_ticks()).sum()
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        for i in 0..self.workers.len() {
            self.wait_worker_ready(i, timeout)?;
        }
        Ok(())
    }

    /// Poll `GET /readyz` of one worker until it answers 200; returns when it did.
    fn wait_worker_ready(&mut self, i: usize, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            self.workers[i].check_alive()?;
            if matches!(http_get(self.workers[i].spec.http, "/readyz"), Ok((200, _))) {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!(
                    "worker {i} not ready after {} s; see {}",
                    timeout.as_secs(),
                    self.workers[i].spec.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Keep watching the workers and the producer until `until`.
    fn watch_until(&mut self, until: Instant, pacer: &mut Pacer) -> Result<()> {
        while Instant::now() < until {
            self.check()?;
            pacer.check()?;
            let left = until.saturating_duration_since(Instant::now());
            std::thread::sleep(Duration::from_millis(50).min(left));
        }
        Ok(())
    }

    /// Delete what the job created on the test bed, and its local state.
    fn cleanup(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        self.stop_workers();
        self.collector = None;
        if self.keep {
            eprintln!(
                "riffle bench-kafka: kept topics {}-*, {}-* and {}",
                self.names.job, self.names.internal, self.names.checkpoint_store
            );
            return;
        }
        let topics = self.names.topics();
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        if let Err(e) = self.admin.delete_topics(&topics) {
            tracing::warn!(error = %e, job = %self.names.job, "deleting the bench topics");
        }
        if let Err(e) = self.admin.delete_group(&self.names.internal) {
            tracing::warn!(error = %e, group = %self.names.internal, "deleting the job's group");
        }
        if let Err(e) = delete_store(&self.names.checkpoint_store, &self.testbed.s3()) {
            tracing::warn!(error = %e, store = %self.names.checkpoint_store, "deleting checkpoints");
        }
        for w in &self.workers {
            let _ = std::fs::remove_dir_all(&w.spec.state_dir);
        }
        tracing::info!(job = %self.names.job, dir = %self.dir.display(), "cleaned up");
    }
}

impl Drop for BenchJob {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn job_config(ctx: &Ctx, names: &JobNames, dir: &Path) -> JobConfig {
    let opts = ctx.opts;
    JobConfig {
        name: names.job.clone(),
        parallelism: opts.workers as usize,
        key_groups: opts.key_groups,
        source: SourceConfig::Kafka(KafkaSourceConfig {
            topics: vec![names.input.clone()],
            start_offsets: StartOffsets::Earliest,
            max_records_per_second: None,
        }),
        sink: SinkConfig {
            dir: None,
            kafka: Some(KafkaSinkConfig {
                recommendations: names.recommendations.clone(),
                item_stats: Some(names.item_stats.clone()),
                late: names.late.clone(),
                dead_letter: names.dead_letter.clone(),
            }),
            item_stats: true,
        },
        // Overridden per worker with --state-dir.
        state_dir: dir.join("state"),
        checkpoint_store: names.checkpoint_store.clone(),
        checkpoint_interval: opts.checkpoint_interval,
        commit_interval: opts.commit_interval,
        kafka: Some(KafkaConfig {
            properties: opts.kafka_properties.iter().cloned().collect(),
            ..KafkaConfig::new(ctx.testbed.bootstrap.clone())
        }),
        s3: Some(ctx.testbed.s3()),
        // Defaults for the rest: dataflow (W 10m, S 1m, history 20, top 20), batch size,
        // retained checkpoints, no HTTP (each worker gets --http-listen).
        ..JobConfig::local(&names.job, dir, SourceConfig::Generator(Default::default()))
    }
}

fn delete_store(url: &str, s3: &S3Config) -> Result<()> {
    let store = riffle_runtime::store::open(url, Some(s3))?;
    for key in store.list("")? {
        store.delete(&key)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Worker processes

#[derive(Clone, Debug)]
struct WorkerSpec {
    exe: PathBuf,
    config: PathBuf,
    index: u32,
    workers: u32,
    state_dir: PathBuf,
    http: SocketAddr,
    log: PathBuf,
}

/// One `riffle run` worker; killed when dropped.
struct WorkerProcess {
    spec: WorkerSpec,
    child: Option<Child>,
}

impl WorkerProcess {
    fn new(spec: WorkerSpec) -> Self {
        Self { spec, child: None }
    }

    fn spawn(&mut self) -> Result<()> {
        let s = &self.spec;
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&s.log)
            .with_context(|| format!("opening {}", s.log.display()))?;
        writeln!(
            log,
            "--- riffle bench-kafka: starting worker {} ---",
            s.index
        )?;
        let mut cmd = Command::new(&s.exe);
        cmd.arg("run")
            .arg("--config")
            .arg(&s.config)
            .args(["--worker-index", &s.index.to_string()])
            .args(["--workers", &s.workers.to_string()])
            .args(["--generation", "1"])
            .arg("--state-dir")
            .arg(&s.state_dir)
            .args(["--http-listen", &s.http.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Starts, restores and checkpoints are logged at info; the environment may ask for more.
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        // The log is a file: no colour codes.
        cmd.env("NO_COLOR", "1");
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", s.exe.display()))?;
        tracing::info!(worker = s.index, pid = child.id(), http = %s.http, "worker started");
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL (what `Child::kill` sends on Unix), reap, and start again with the same arguments.
    fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn check_alive(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        if let Some(status) = child.try_wait()? {
            self.child = None;
            bail!(
                "worker {} exited ({status}); its log {}:\n{}",
                self.spec.index,
                self.spec.log.display(),
                log_tail(&self.spec.log, 20)
            );
        }
        Ok(())
    }

    fn status(&self) -> Result<WorkerStatus> {
        #[derive(Deserialize)]
        struct Body {
            metrics: WorkerStatus,
        }
        let (code, body) = http_get(self.spec.http, "/status")?;
        if code != 200 {
            bail!("GET /status: HTTP {code}");
        }
        Ok(serde_json::from_str::<Body>(&body)?.metrics)
    }

    /// utime + stime of the process (all threads), in clock ticks, from /proc/<pid>/stat.
    fn cpu_ticks(&self) -> Result<u64> {
        let pid = self.child.as_ref().context("worker not running")?.id();
        let path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // Fields after the parenthesised command name (which may contain spaces): state is
        // field 3, utime 14 and stime 15.
        let rest = stat.rsplit_once(')').context("malformed stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field =
            |n: usize| -> Result<u64> { Ok(fields.get(n - 3).context("short stat")?.parse()?) };
        Ok(field(14)? + field(15)?)
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A loopback port nobody listens on right now (the worker binds it a moment later).
fn free_port() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// `getconf CLK_TCK`, or 100 (Linux's USER_HZ nearly everywhere) if that fails.
fn clk_tck() -> (u64, bool) {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .map_or((100, true), |t| (t, false))
}

/// Busy ticks of the whole machine (first line of /proc/stat: all but idle and iowait).
fn machine_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .take(8)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    (v.len() == 8).then(|| v[0] + v[1] + v[2] + v[5] + v[6] + v[7])
}

/// A minimal HTTP/1.1 GET to a worker's loopback API.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Ok((code, body))
}

// ---------------------------------------------------------------------------------------------
// Kafka: admin, the event producer, the paced producer, the recommendation reader

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

const KAFKA_TIMEOUT: Duration = Duration::from_secs(60);

struct KafkaAdmin {
    client: AdminClient<DefaultClientContext>,
    rt: tokio::runtime::Runtime,
}

impl KafkaAdmin {
    fn new(bootstrap: &str) -> Result<Self> {
        let client = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .create()
            .context("creating a Kafka admin client")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self { client, rt })
    }

    fn options() -> AdminOptions {
        AdminOptions::new()
            .operation_timeout(Some(KAFKA_TIMEOUT))
            .request_timeout(Some(KAFKA_TIMEOUT))
    }

    /// Create topics (name, partitions) and wait until their metadata shows every partition,
    /// so the workers find them.
    fn create_topics(&self, topics: &[(&str, i32)]) -> Result<()> {
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|(name, n)| NewTopic::new(name, *n, TopicReplication::Fixed(1)))
            .collect();
        let results = self
            .rt
            .block_on(self.client.create_topics(&new, &Self::options()))
            .with_context(|| format!("creating topics (is the test bed up? {TESTBED_HINT})"))?;
        for r in results {
            r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
        }
        let deadline = Instant::now() + KAFKA_TIMEOUT;
        for (name, n) in topics {
            loop {
                let md = self
                    .client
                    .inner()
                    .fetch_metadata(Some(name), KAFKA_TIMEOUT)?;
                let seen = md
                    .topics()
                    .iter()
                    .find(|t| t.name() == *name && t.error().is_none())
                    .map_or(0, |t| t.partitions().len() as i32);
                if seen == *n {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("topic {name} did not show {n} partitions");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Delete topics; missing ones (e.g. internal topics a failed worker never created) are fine.
    fn delete_topics(&self, topics: &[&str]) -> Result<()> {
        let results = self
            .rt
            .block_on(self.client.delete_topics(topics, &Self::options()))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((t, e)) => bail!("deleting topic {t}: {e}"),
            }
        }
        Ok(())
    }

    fn delete_group(&self, group: &str) -> Result<()> {
        let results = self
            .rt
            .block_on(self.client.delete_groups(&[group], &Self::options()))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {}
                Err((g, e)) => bail!("deleting group {g}: {e}"),
            }
        }
        Ok(())
    }
}

/// The benchmark's input: the generator's partitions interleaved round-robin, so event time
/// advances evenly and every Kafka partition sees nearly ordered timestamps.
struct ClickStream {
    generator: Generator,
    partitions: u64,
    next: u64,
}

impl ClickStream {
    fn new(opts: &KafkaBenchOptions, start_ts: i64) -> Self {
        let cfg = GeneratorConfig {
            users: opts.users,
            items: opts.items,
            events: u64::MAX,
            partitions: opts.generator_partitions,
            events_per_second: opts.event_time_rate,
            // Event time starts now, so nothing is beyond `maxFutureSkew`.
            start_ts,
            ..GeneratorConfig::default()
        };
        Self {
            generator: Generator::new(cfg),
            partitions: u64::from(opts.generator_partitions),
            next: 0,
        }
    }

    fn next_event(&mut self) -> Event {
        let (p, k) = (self.next % self.partitions, self.next / self.partitions);
        self.next += 1;
        self.generator.event(p as u32, k)
    }
}

/// Counts failed deliveries (librdkafka retries transient ones itself).
#[derive(Clone, Default)]
struct DeliveryFailures {
    count: Arc<AtomicU64>,
    first: Arc<Mutex<Option<String>>>,
}

impl ClientContext for DeliveryFailures {}

impl ProducerContext for DeliveryFailures {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.count.fetch_add(1, Relaxed);
            let mut first = self.first.lock().expect("delivery lock");
            first.get_or_insert_with(|| e.to_string());
        }
    }
}

/// Produces JSON events, keyed by userId, to the partition Kafka's default partitioner
/// would pick (= the user's key group), so every user is read by the worker that owns it.
struct EventProducer {
    producer: ThreadedProducer<DeliveryFailures>,
    failures: DeliveryFailures,
    topic: String,
    partitions: u32,
}

impl EventProducer {
    fn new(bootstrap: &str, topic: &str, partitions: u32) -> Result<Self> {
        let failures = DeliveryFailures::default();
        let producer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            // Latency starts before the send: do not hold records back for batching.
            .set("linger.ms", "1")
            .set("compression.type", "lz4")
            .create_with_context(failures.clone())
            .context("creating the event producer")?;
        Ok(Self {
            producer,
            failures,
            topic: topic.to_string(),
            partitions,
        })
    }

    /// Send one event; returns the instant taken right before the send.
    fn send(&self, event: &Event) -> Result<Instant> {
        let payload = serde_json::to_vec(event)?;
        let partition = key_group(event.user_id.as_bytes(), self.partitions) as i32;
        let sent_at = Instant::now();
        let mut record = BaseRecord::to(&self.topic)
            .partition(partition)
            .key(event.user_id.as_str())
            .payload(&payload);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(sent_at),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    // Back-pressure: the local queue drains as the broker acknowledges.
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => bail!("producing to {}: {e}", self.topic),
            }
        }
    }

    fn flush(&self) -> Result<()> {
        self.producer
            .flush(Duration::from_secs(120))
            .context("flushing the event producer")?;
        self.check()
    }

    fn check(&self) -> Result<()> {
        let n = self.failures.count.load(Relaxed);
        if n > 0 {
            let first = self.failures.first.lock().expect("delivery lock").clone();
            bail!(
                "{n} events could not be delivered to {}: {}",
                self.topic,
                first.unwrap_or_default()
            );
        }
        Ok(())
    }
}

/// Every event sent, in send order: its eventId and the instant right before its send.
type SendLog = Vec<(String, Instant)>;

/// Produces at a fixed rate on its own thread, noting each event's send instant.
struct Pacer {
    started: Instant,
    sent: Arc<Mutex<SendLog>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Pacer {
    fn start(producer: EventProducer, mut stream: ClickStream, rate: u64) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(SendLog::new()));
        let started = Instant::now();
        let thread = std::thread::Builder::new()
            .name("bench-producer".into())
            .spawn({
                let (stop, sent) = (stop.clone(), sent.clone());
                move || {
                    let mut n = 0;
                    while !stop.load(Relaxed) {
                        // Send everything due by now, then wait for the next tick.
                        let due = (started.elapsed().as_secs_f64() * rate as f64) as usize;
                        while n < due {
                            let event = stream.next_event();
                            let at = producer.send(&event)?;
                            let mut log = sent.lock().expect("send log lock");
                            log.push((event.event_id.to_string(), at));
                            n += 1;
                        }
                        producer.check()?;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    producer.flush()
                }
            })?;
        Ok(Self {
            started,
            sent,
            stop,
            thread: Some(thread),
        })
    }

    /// Fail with the producer's error if it stopped on its own.
    fn check(&mut self) -> Result<()> {
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            let thread = self.thread.take().expect("checked above");
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("the producer thread panicked"))??;
            bail!("the event producer stopped early");
        }
        Ok(())
    }

    /// The ids of the events sent before `t`.
    fn sent_before(&self, t: Instant) -> Vec<String> {
        let log = self.sent.lock().expect("send log lock");
        log.iter()
            .take_while(|(_, at)| *at < t)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Stop producing; every event sent, in send order.
    fn stop(mut self) -> Result<SendLog> {
        self.stop.store(true, Relaxed);
        let thread = self.thread.take().expect("running");
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("the producer thread panicked"))??;
        Ok(std::mem::take(
            &mut *self.sent.lock().expect("send log lock"),
        ))
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// When each event's recommendation became visible.
#[derive(Default)]
struct Arrivals {
    /// eventId → first time seen.
    at: HashMap<String, Instant>,
    duplicates: u64,
    unreadable: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

/// Reads the recommendations topic from the beginning as a `read_committed` consumer, so a
/// recommendation counts once its transaction committed.
struct Collector {
    arrivals: Arc<Mutex<Arrivals>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Collector {
    fn start(bootstrap: &str, topic: &str, partitions: i32) -> Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", format!("{topic}-bench-reader"))
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            // Hand out data as soon as a transaction commits.
            .set("fetch.wait.max.ms", "10")
            .create()
            .context("creating the recommendations consumer")?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let arrivals = Arc::new(Mutex::new(Arrivals::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("bench-reader".into())
            .spawn({
                let (arrivals, stop) = (arrivals.clone(), stop.clone());
                move || read_recommendations(&consumer, &arrivals, &stop)
            })?;
        Ok(Self {
            arrivals,
            stop,
            thread: Some(thread),
        })
    }

    /// Distinct events with a recommendation so far.
    fn count(&self) -> usize {
        self.arrivals.lock().expect("arrivals lock").at.len()
    }

    /// How many of these events have no recommendation yet.
    fn missing(&self, ids: &[String]) -> usize {
        let a = self.arrivals.lock().expect("arrivals lock");
        ids.iter().filter(|id| !a.at.contains_key(*id)).count()
    }

    fn stop(mut self) -> Result<Arrivals> {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
        }
        Ok(std::mem::take(
            &mut *self.arrivals.lock().expect("arrivals lock"),
        ))
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_recommendations(
    consumer: &BaseConsumer,
    arrivals: &Mutex<Arrivals>,
    stop: &AtomicBool,
) -> Result<()> {
    #[derive(Deserialize)]
    struct EventIdOnly {
        #[serde(rename = "eventId")]
        event_id: String,
    }
    while !stop.load(Relaxed) {
        let Some(polled) = consumer.poll(Duration::from_millis(50)) else {
            continue;
        };
        let received = Instant::now();
        let message = polled.context("reading recommendations")?;
        let id = message
            .payload()
            .and_then(|p| serde_json::from_slice::<EventIdOnly>(p).ok());
        let mut a = arrivals.lock().expect("arrivals lock");
        let Some(EventIdOnly { event_id }) = id else {
            a.unreadable += 1;
            continue;
        };
        if a.at.insert(event_id, received).is_some() {
            a.duplicates += 1;
        }
        a.first.get_or_insert(received);
        a.last = Some(received);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The report

impl fmt::Display for KafkaBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "riffle bench-kafka: {} worker processes, {} key groups, commit every {}, \
             checkpoints every {} to S3 (MinIO)",
            self.workers, self.key_groups, self.commit_interval, self.checkpoint_interval
        )?;
        writeln!(f, "input: {}", self.input)?;
        if let Some(t) = &self.throughput {
            writeln!(f, "\n{t}")?;
        }
        if let Some(l) = &self.latency {
            writeln!(f, "\n{l}")?;
        }
        if let Some(r) = &self.recovery {
            writeln!(f, "\n{r}")?;
        }
        if !self.anomalies.is_empty() {
            writeln!(f, "\nanomalies")?;
            for a in &self.anomalies {
                writeln!(f, "  - {a}")?;
            }
        }
        write!(f, "\nworker logs: {}", self.workdir.display())
    }
}

impl fmt::Display for ThroughputResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "throughput ({} events produced first in {:.1} s, then the workers started)",
            self.events, self.produce_seconds
        )?;
        writeln!(
            f,
            "  wall clock          {:.0} events/s ({} recommendations in {:.2} s, first to last)",
            self.events_per_second, self.recommendations, self.seconds
        )?;
        writeln!(
            f,
            "  per core            {:.0} events per CPU second ({:.2} CPU s in the workers; CLK_TCK {}{})",
            self.events_per_cpu_second,
            self.cpu_seconds,
            self.clk_tck,
            if self.clk_tck_assumed { ", assumed" } else { "" }
        )?;
        writeln!(
            f,
            "  CPU                 workers {:.2} cores, machine {:.2} of {} cores busy (Kafka, MinIO, bench included)",
            self.cpu_seconds / self.seconds,
            self.machine_busy_cores,
            self.cores
        )?;
        writeln!(
            f,
            "  startup             {:.2} s from spawning the workers to the first recommendation \
             ({:.0} events/s from spawn to last)",
            self.startup_seconds,
            self.recommendations as f64 / (self.startup_seconds + self.seconds)
        )?;
        write_workers(f, &self.workers)
    }
}

impl fmt::Display for LatencyResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "latency at {} events/s offered ({:.0} achieved), send → visible to read_committed, \
             {:.0} s measured after {:.0} s warm-up",
            self.rate, self.achieved_rate, self.measured_seconds, self.warmup_seconds
        )?;
        writeln!(
            f,
            "  p50 / p90 / p99     {:.1} / {:.1} / {:.1} ms",
            self.p50_ms, self.p90_ms, self.p99_ms
        )?;
        writeln!(
            f,
            "  p99.9 / max         {:.1} / {:.1} ms",
            self.p999_ms, self.max_ms
        )?;
        writeln!(
            f,
            "  events              {} measured, {} received; every event in {}",
            self.measured,
            self.received,
            self.samples.display()
        )?;
        write_workers(f, &self.workers)
    }
}

impl fmt::Display for RecoveryResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs =
            |v: Option<f64>| v.map_or("not within the window".into(), |s| format!("{s:.2} s"));
        writeln!(
            f,
            "recovery: worker {} SIGKILLed and restarted, producing on for {:.0} s",
            self.worker, self.observed_seconds
        )?;
        writeln!(
            f,
            "  ready               {:.2} s (GET /readyz → 200)",
            self.ready_seconds
        )?;
        writeln!(
            f,
            "  latency < 1 s       {} (every event sent from then on)",
            secs(self.latency_recovered_seconds)
        )?;
        writeln!(
            f,
            "  outage drained      {} (events in flight at the kill or sent until ready: all visible)",
            secs(self.outage_drained_seconds)
        )?;
        write!(
            f,
            "  affected events     max latency {:.0} ms; {} events (in flight at the kill or sent after), {} without a recommendation",
            self.max_latency_ms, self.affected_events, self.affected_missing
        )
    }
}

fn write_workers(f: &mut fmt::Formatter<'_>, workers: &[WorkerSummary]) -> fmt::Result {
    writeln!(
        f,
        "  worker  checkpoints  duration last/max  size      uploaded avg  commits  commit  events in  recs out"
    )?;
    for w in workers {
        let s = &w.last;
        let max = w
            .checkpoints
            .iter()
            .map(|c| c.duration_ms)
            .max()
            .unwrap_or(0);
        let uploaded = w.checkpoints.iter().map(|c| c.uploaded_bytes).sum::<u64>() as f64
            / w.checkpoints.len().max(1) as f64;
        writeln!(
            f,
            "  {:<6}  {:>11}  {:>7} / {:<7}  {:>6.1} MB  {:>9.2} MB  {:>7}  {:>3} ms  {:>9}  {:>8}{}",
            w.index,
            s.checkpoints_completed,
            format!("{} ms", s.checkpoint_duration_ms),
            format!("{max} ms"),
            s.checkpoint_size_bytes as f64 / 1e6,
            uploaded / 1e6,
            s.commits_completed,
            s.commit_duration_ms,
            s.events_in,
            s.recommendations_out,
            if w.restarted { "  (since restart)" } else { "" }
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrivals(at: &[(&str, Instant)]) -> Arrivals {
        Arrivals {
            at: at.iter().map(|(id, t)| (id.to_string(), *t)).collect(),
            ..Arrivals::default()
        }
    }

    #[test]
    fn recovery_is_measured_from_the_kill() {
        let kill = Instant::now();
        let s = |ms: u64| kill + Duration::from_millis(ms);
        let sent: SendLog = [
            ("done", 0),
            ("in-flight", 0),
            ("before", 0),
            ("a", 100),
            ("b", 600),
            ("c", 2_000),
            ("d", 3_000),
        ]
        .iter()
        .map(|(id, ms)| (id.to_string(), s(*ms)))
        .collect();
        // Sent 300 ms before the kill.
        let sent: SendLog = sent
            .into_iter()
            .map(|(id, at)| match id.as_str() {
                "done" | "in-flight" => (id, at - Duration::from_millis(300)),
                _ => (id, at),
            })
            .collect();
        // "done" was visible before the kill, "in-flight" not; "before" was sent at the kill
        // itself; "a" and "b" waited for the restart (ready at 1.5 s), "c" and "d" are fast.
        let got = arrivals(&[
            ("done", s(0) - Duration::from_millis(100)),
            ("in-flight", s(2_600)),
            ("before", s(2_500)),
            ("a", s(2_500)),
            ("b", s(2_400)),
            ("c", s(2_300)),
            ("d", s(3_200)),
        ]);
        let r = recovery_result(1, &sent, &got, kill, s(1_500), s(4_000));
        assert_eq!(r.ready_seconds, 1.5);
        assert_eq!(r.latency_recovered_seconds, Some(2.0));
        assert_eq!(r.outage_drained_seconds, Some(2.6));
        assert_eq!(r.max_latency_ms, 2_900.0);
        assert_eq!((r.affected_events, r.affected_missing), (6, 0));

        // A lost event keeps latency "not recovered" and the outage "not drained".
        let lost = arrivals(&[
            ("done", s(0) - Duration::from_millis(100)),
            ("before", s(2_500)),
            ("c", s(2_300)),
            ("d", s(3_200)),
        ]);
        let r = recovery_result(1, &sent, &lost, kill, s(1_500), s(4_000));
        assert_eq!(r.latency_recovered_seconds, Some(2.0));
        assert_eq!(r.outage_drained_seconds, None);
        assert_eq!(r.affected_missing, 3);
        let slow_tail = arrivals(&[("before", s(100)), ("d", s(5_000))]);
        let r = recovery_result(1, &sent, &slow_tail, kill, s(1_500), s(6_000));
        assert_eq!(r.latency_recovered_seconds, None);
    }

    #[test]
    fn properties_parse_as_key_value() {
        assert_eq!(
            parse_property("retry.backoff.ms=10"),
            Ok(("retry.backoff.ms".into(), "10".into()))
        );
        assert!(parse_property("linger.ms").is_err());
        assert!(parse_property("=1").is_err());
    }

    #[test]
    fn the_stream_interleaves_generator_partitions() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            opts: KafkaBenchOptions,
        }
        let cli = <Cli as clap::Parser>::parse_from(["bench-kafka", "--generator-partitions", "2"]);
        let mut s = ClickStream::new(&cli.opts, 1_000_000);
        let ids: Vec<String> = (0..4)
            .map(|_| s.next_event().event_id.to_string())
            .collect();
        assert_eq!(ids, ["p0-0", "p1-0", "p0-1", "p1-1"]);
    }
}
