//! `riffle`: run, demo, backtest and benchmark the recommendation dataflow.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod kafka_bench;

/// mimalloc instead of glibc malloc: per-event objects (events, requests, recommendations,
/// wire buffers) are small and short-lived, where glibc's allocator was a fifth of the time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use riffle_runtime::commands::{self, bench, eval};
use riffle_runtime::config::{DataflowConfig, HttpConfig, JobConfig};
use riffle_runtime::dataflow::output::Recommendation;
use riffle_runtime::distributed::{RestoreArg, WorkerControl, WorkerOptions};
use riffle_runtime::engine::{Engine, Restore};
use riffle_runtime::metrics::Metrics;
use riffle_runtime::sink::{file::read_committed, Stream};

#[derive(Parser)]
#[command(
    name = "riffle",
    version,
    about = "Riffle: real-time recommendations, windowed and exactly-once"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay a generated clickstream through the full dataflow (RocksDB state, checkpoints).
    Demo {
        #[arg(long, default_value_t = 300_000)]
        events: u64,
        #[arg(long, default_value_t = 2)]
        parallelism: usize,
        /// Working directory (wiped first). Default: a temporary directory.
        #[arg(long)]
        workdir: Option<PathBuf>,
    },
    /// Run a job from a configuration file. A job with a Kafka source runs as one worker of a
    /// distributed job (see "Run on Kafka" in the README).
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Local mode: `latest` (newest checkpoint; fresh if none), `none`, or a checkpoint or
        /// savepoint directory. Distributed mode: `latest` (the default: the committed state,
        /// fresh if none), `none`, or a savepoint URL (`s3://…` or `file://…`).
        #[arg(long)]
        restore: Option<String>,
        /// Distributed: this worker's index (default: $RIFFLE_WORKER_INDEX, else the ordinal
        /// at the end of the hostname, as in a StatefulSet, else 0).
        #[arg(long)]
        worker_index: Option<u32>,
        /// Distributed: the number of workers (default: $RIFFLE_WORKERS, else `parallelism`).
        #[arg(long)]
        workers: Option<u32>,
        /// Distributed: the generation (default: $RIFFLE_GENERATION, else 1). A new worker
        /// count or a restore from a savepoint needs a new, larger generation.
        #[arg(long)]
        generation: Option<u32>,
        /// Overrides `stateDir` (default: $RIFFLE_STATE_DIR).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Overrides the HTTP API address (default: $RIFFLE_HTTP_LISTEN, else `http`).
        #[arg(long)]
        http_listen: Option<std::net::SocketAddr>,
    },
    /// Backtest: replay train then test, score next-item recommendations.
    Eval {
        #[arg(long)]
        train: PathBuf,
        #[arg(long)]
        test: PathBuf,
        /// A job YAML (only its `dataflow` and `parallelism` are used).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value_t = 20)]
        k: usize,
    },
    /// Whole-pipeline benchmark on a generated Zipf clickstream.
    Bench {
        #[arg(long, default_value_t = 2_000_000)]
        events: u64,
        #[arg(long, default_value_t = 1_000_000)]
        users: u64,
        #[arg(long, default_value_t = 100_000)]
        items: u64,
        #[arg(long, default_value_t = 2)]
        parallelism: usize,
        #[arg(long, default_value_t = 4096)]
        max_batch_size: usize,
        /// Memory for user histories (the job's `stateMemory`), e.g. 1Gi.
        #[arg(long, default_value_t = riffle_runtime::config::default_state_memory())]
        state_memory: riffle_runtime::config::ByteSize,
        /// Skew of users and items (Zipf exponent; 0 is uniform).
        #[arg(long, default_value_t = 1.1)]
        zipf_exponent: f64,
        /// Events per second of event time in each of the 2 input partitions (more: more
        /// events per window and per session).
        #[arg(long, default_value_t = bench::BenchOptions::default().events_per_second)]
        event_time_rate: u64,
        /// Do not build or write ItemStats (windows are still emitted: trending lists).
        #[arg(long)]
        no_item_stats: bool,
        #[arg(long)]
        workdir: Option<PathBuf>,
    },
    /// Benchmark the distributed runtime with Kafka in the loop: throughput at saturation,
    /// end-to-end latency at a fixed rate, checkpoint and commit cost, recovery after a
    /// SIGKILL. Needs the test bed: `eval "$(e2e/testbed/testbed env)"`.
    BenchKafka(kafka_bench::KafkaBenchOptions),
    /// Write a generated clickstream (Zipf users and items) to a Kafka topic, keyed by userId
    /// with Kafka's default partitioner; event times start now.
    Produce {
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        #[arg(long, default_value_t = 50_000)]
        users: u64,
        #[arg(long, default_value_t = 5_000)]
        items: u64,
        /// Events per second (0: as fast as possible; event time advances at this rate).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Brokers (default: $KAFKA_BOOTSTRAP).
        #[arg(long)]
        bootstrap: Option<String>,
    },
    /// Print the records of a topic as a `read_committed` consumer sees them (key, TAB,
    /// value), from the start: what a job's downstream readers get.
    Consume {
        #[arg(long)]
        topic: String,
        /// Stop after this many records.
        #[arg(long, default_value_t = 10)]
        max: u64,
        /// Stop after this many seconds without a record.
        #[arg(long, default_value_t = 10)]
        idle_seconds: u64,
        /// Brokers (default: $KAFKA_BOOTSTRAP).
        #[arg(long)]
        bootstrap: Option<String>,
    },
    /// Ask a running job for a savepoint (POST /savepoint). For a distributed job, any one
    /// worker's endpoint will do: the others join through the exchange, and the answer comes
    /// once the job-wide savepoint is complete.
    Savepoint {
        #[arg(long, default_value = "127.0.0.1:9250")]
        endpoint: String,
        /// Savepoint id (distributed; default: generated).
        #[arg(long)]
        id: Option<String>,
        /// Stop the job once the savepoint is taken.
        #[arg(long)]
        stop: bool,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo {
            events,
            parallelism,
            workdir,
        } => demo(events, parallelism, workdir),
        Command::Run {
            config,
            restore,
            worker_index,
            workers,
            generation,
            state_dir,
            http_listen,
        } => run(
            &config,
            restore,
            RunOverrides {
                worker_index,
                workers,
                generation,
                state_dir,
                http_listen,
            },
        ),
        Command::Eval {
            train,
            test,
            config,
            k,
        } => {
            let (dataflow, parallelism) = match config {
                Some(p) => {
                    let text = std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    let job: EvalJob = serde_yaml::from_str(&text)
                        .with_context(|| format!("parsing {}", p.display()))?;
                    (job.dataflow, job.parallelism)
                }
                None => (DataflowConfig::default(), 1),
            };
            dataflow.validate()?;
            let scratch = tempfile::tempdir()?;
            let job = eval::eval_job(dataflow, parallelism, scratch.path());
            let r = eval::run(&train, &test, job, k)?;
            println!("{r}");
            Ok(())
        }
        Command::Bench {
            events,
            users,
            items,
            parallelism,
            max_batch_size,
            state_memory,
            zipf_exponent,
            event_time_rate,
            no_item_stats,
            workdir,
        } => {
            let opts = bench::BenchOptions {
                events,
                users,
                items,
                parallelism,
                max_batch_size,
                state_memory,
                zipf_exponent,
                events_per_second: event_time_rate,
                item_stats: !no_item_stats,
            };
            let tmp = tempfile::tempdir()?;
            let dir = workdir.unwrap_or_else(|| tmp.path().to_path_buf());
            println!(
                "riffle bench: {events} events, {users} users, {items} items (Zipf {zipf_exponent}), {} events per event-time second, history 20, W 10m, S 1m, checkpoints every 10s, parallelism {parallelism}",
                2 * event_time_rate
            );
            let report = bench::run(&opts, &dir)?;
            println!("{report}");
            Ok(())
        }
        Command::BenchKafka(opts) => {
            let testbed = kafka_bench::Testbed::from_env()?;
            let report = kafka_bench::run(&opts, &testbed)?;
            println!("{report}");
            Ok(())
        }
        Command::Savepoint { endpoint, id, stop } => savepoint(&endpoint, id, stop),
        Command::Consume {
            topic,
            max,
            idle_seconds,
            bootstrap,
        } => {
            let bootstrap = brokers(bootstrap)?;
            let n = commands::consume::run(
                &commands::consume::ConsumeOptions {
                    bootstrap,
                    topic: topic.clone(),
                    max,
                    idle: std::time::Duration::from_secs(idle_seconds),
                },
                &mut std::io::stdout().lock(),
            )?;
            eprintln!("{n} records from {topic}");
            Ok(())
        }
        Command::Produce {
            topic,
            events,
            users,
            items,
            rate,
            seed,
            bootstrap,
        } => {
            let bootstrap = brokers(bootstrap)?;
            let (sent, took) = commands::produce::run(&commands::produce::ProduceOptions {
                bootstrap,
                topic: topic.clone(),
                events,
                users,
                items,
                rate,
                seed,
            })?;
            println!(
                "produced {sent} events to {topic} in {:.1} s",
                took.as_secs_f64()
            );
            Ok(())
        }
    }
}

/// `--bootstrap`, else `$KAFKA_BOOTSTRAP`.
fn brokers(flag: Option<String>) -> anyhow::Result<String> {
    flag.or_else(|| std::env::var("KAFKA_BOOTSTRAP").ok())
        .context("--bootstrap or $KAFKA_BOOTSTRAP")
}

/// The parts of a job file a backtest uses; other fields are allowed and ignored.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct EvalJob {
    #[serde(default)]
    dataflow: DataflowConfig,
    #[serde(default = "one")]
    parallelism: usize,
}

fn one() -> usize {
    1
}

/// Per-process settings of a run (flags win over environment variables).
struct RunOverrides {
    worker_index: Option<u32>,
    workers: Option<u32>,
    generation: Option<u32>,
    state_dir: Option<PathBuf>,
    http_listen: Option<std::net::SocketAddr>,
}

fn env_parse<T: std::str::FromStr>(name: &str) -> anyhow::Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{name}={v:?}: {e}")),
        _ => Ok(None),
    }
}

/// The ordinal at the end of a StatefulSet pod's hostname (`name-3` → 3).
fn hostname_ordinal() -> Option<u32> {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())?;
    host.trim().rsplit_once('-')?.1.parse().ok()
}

fn run(config: &std::path::Path, restore: Option<String>, o: RunOverrides) -> anyhow::Result<()> {
    let mut cfg = JobConfig::load(config)?;
    if let Some(dir) = o.state_dir.or(env_parse::<PathBuf>("RIFFLE_STATE_DIR")?) {
        cfg.state_dir = dir;
    }
    if let Some(listen) = o.http_listen.or(env_parse("RIFFLE_HTTP_LISTEN")?) {
        cfg.http = Some(HttpConfig::listen(listen));
    }
    let metrics = Arc::new(Metrics::default());
    let serve = |router: axum::Router| -> anyhow::Result<()> {
        if let Some(http) = &cfg.http {
            let listen = riffle_runtime::http::listen_addr(http)?;
            let addr = riffle_runtime::http::spawn(listen, router)
                .with_context(|| format!("binding the HTTP API on {listen}"))?;
            tracing::info!(%addr, "HTTP API listening");
            eprintln!("riffle: HTTP API on http://{addr}");
        }
        Ok(())
    };
    if cfg.is_distributed() {
        let workers = match o.workers {
            Some(w) => w,
            None => env_parse("RIFFLE_WORKERS")?.unwrap_or(cfg.parallelism as u32),
        };
        let index = match o.worker_index {
            Some(i) => i,
            None => env_parse("RIFFLE_WORKER_INDEX")?
                .or_else(hostname_ordinal)
                .unwrap_or(0),
        };
        let generation = match o.generation {
            Some(g) => g,
            None => env_parse("RIFFLE_GENERATION")?.unwrap_or(1),
        };
        let restore = match restore.as_deref() {
            None | Some("latest") => RestoreArg::Latest,
            Some("none") => RestoreArg::None,
            Some(url) if url.starts_with("s3://") || url.starts_with("file://") => {
                RestoreArg::Savepoint(url.to_string())
            }
            Some(other) => bail!(
                "--restore {other:?}: a distributed job restores `latest`, `none` or a savepoint URL (s3://… or file://…)"
            ),
        };
        let (tx, rx) = crossbeam_channel::unbounded::<WorkerControl>();
        serve(riffle_runtime::http::router(
            cfg.name.clone(),
            metrics.clone(),
            tx,
        ))?;
        let opts = WorkerOptions {
            index,
            workers,
            generation,
            restore,
            state_dir: None,
            stop: riffle_runtime::shutdown::on_termination()?,
        };
        eprintln!(
            "riffle: worker {index} of {workers}, generation {generation}, job {}",
            cfg.name
        );
        riffle_runtime::distributed::worker::run(cfg, opts, metrics, Some(rx))?;
        return Ok(());
    }
    let restore: Restore = restore
        .as_deref()
        .unwrap_or("none")
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    let (tx, rx) = crossbeam_channel::unbounded();
    serve(riffle_runtime::http::router(
        cfg.name.clone(),
        metrics.clone(),
        tx,
    ))?;
    let mut engine = commands::open_engine(cfg, restore, metrics.clone())?;
    engine.set_control(rx);
    engine.run()?;
    let s = metrics.snapshot();
    eprintln!(
        "riffle: {}: {} events, {} recommendations, {} late, {} dead-lettered, last checkpoint {}",
        if s.stopped {
            "stopped with a savepoint"
        } else {
            "finished"
        },
        s.events_in,
        s.recommendations_out,
        s.late,
        s.dead_lettered,
        s.last_checkpoint_id
    );
    Ok(())
}

fn demo(events: u64, parallelism: usize, workdir: Option<PathBuf>) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = workdir.unwrap_or_else(|| tmp.path().to_path_buf());
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let cfg = commands::demo_config(&dir, events, parallelism);
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = crossbeam_channel::unbounded();
    let http = riffle_runtime::http::listen_addr(cfg.http.as_ref().expect("demo has an API"))?;
    let addr = riffle_runtime::http::spawn(
        http,
        riffle_runtime::http::router(cfg.name.clone(), metrics.clone(), tx),
    )?;
    println!("Riffle demo: {events} generated click/view/cart/purchase events → sessions → 10-minute sliding windows (1-minute slide) → top-20 recommendations");
    println!(
        "  parallelism {parallelism}, RocksDB state and checkpoints in {}",
        dir.display()
    );
    println!("  live API: http://{addr}/metrics  http://{addr}/status  (POST /savepoint)\n");
    let out_dir = cfg.sink_dir()?.to_path_buf();
    let started = Instant::now();
    let progress = {
        let m = metrics.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            let s = m.snapshot();
            print!(
                "\r  {:>8} events  {:>8.0} ev/s  watermark {:>19}  windows {:>6}  checkpoints {:>3}  late {:>4}  recs {:>8}   ",
                s.events_in,
                s.events_per_second,
                s.watermark.map_or("-".into(), format_ts),
                s.windows_emitted,
                s.checkpoints_completed,
                s.late,
                s.recommendations_out
            );
            let _ = std::io::stdout().flush();
            if m.finished.load(Relaxed) {
                break;
            }
        })
    };
    let mut engine: Engine = commands::open_engine(cfg, Restore::None, metrics.clone())?;
    engine.set_control(rx);
    engine.run()?;
    let _ = progress.join();
    let s = metrics.snapshot();
    let secs = started.elapsed().as_secs_f64();
    println!("\n\nDone in {secs:.1} s: {} events ({:.0}/s), {} recommendations, {} item-stats records, {} checkpoints (last {} ms, {:.1} MB state), {} late, {} dead-lettered.",
        s.events_in, s.events_in as f64 / secs, s.recommendations_out, s.item_stats_out, s.checkpoints_completed,
        s.checkpoint_duration_ms, s.checkpoint_size_bytes as f64 / 1e6, s.late, s.dead_lettered);
    let recs: Vec<Recommendation> = read_committed(&out_dir, Stream::Recommendations)?
        .iter()
        .rev()
        .filter_map(|l| serde_json::from_str::<Recommendation>(l).ok())
        .filter(|r| r.items.iter().filter(|i| i.score > 0.0).count() >= 3)
        .take(3)
        .collect();
    println!("\nSample recommendations (last events of the replay):");
    for r in &recs {
        let items: Vec<String> = r
            .items
            .iter()
            .take(5)
            .map(|i| format!("{} ({:.2})", i.item_id, i.score))
            .collect();
        println!("  {} at {} → {}", r.user_id, r.item_id, items.join(", "));
    }
    println!("\nCommitted output: {}", out_dir.display());
    Ok(())
}

fn format_ts(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (d, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let days_since_2026 = d - 20_454; // 2026-01-01
    format!(
        "day {days_since_2026:>2} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn savepoint(endpoint: &str, id: Option<String>, stop: bool) -> anyhow::Result<()> {
    let addr = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut stream =
        std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(330)))?;
    let body = serde_json::json!({ "id": id, "stop": stop }).to_string();
    write!(
        stream,
        "POST /savepoint HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("savepoint failed: {status}: {}", body.trim());
    }
    println!("{}", body.trim());
    Ok(())
}
