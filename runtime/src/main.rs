//! `riffle`: run, demo, backtest and benchmark the recommendation dataflow.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use riffle_runtime::commands::{self, bench, eval};
use riffle_runtime::config::{DataflowConfig, JobConfig};
use riffle_runtime::dataflow::output::Recommendation;
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
    /// Run a job from a configuration file.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// `latest` (newest checkpoint in the store; fresh if none) or a checkpoint/savepoint directory.
        #[arg(long)]
        restore: Option<Restore>,
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
        #[arg(long)]
        workdir: Option<PathBuf>,
    },
    /// Ask a running job for a savepoint (POST /savepoint).
    Savepoint {
        #[arg(long, default_value = "127.0.0.1:9250")]
        endpoint: String,
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
        Command::Run { config, restore } => run(&config, restore.unwrap_or(Restore::None)),
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
            workdir,
        } => {
            let opts = bench::BenchOptions {
                events,
                users,
                items,
                parallelism,
                max_batch_size,
                ..bench::BenchOptions::default()
            };
            let tmp = tempfile::tempdir()?;
            let dir = workdir.unwrap_or_else(|| tmp.path().to_path_buf());
            println!(
                "riffle bench: {events} events, {users} users, {items} items (Zipf), history 20, W 10m, S 1m, checkpoints every 10s, parallelism {parallelism}"
            );
            let report = bench::run(&opts, &dir)?;
            println!("{report}");
            Ok(())
        }
        Command::Savepoint { endpoint } => savepoint(&endpoint),
    }
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

fn run(config: &std::path::Path, restore: Restore) -> anyhow::Result<()> {
    let cfg = JobConfig::load(config)?;
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = crossbeam_channel::unbounded();
    if let Some(http) = &cfg.http {
        let addr = riffle_runtime::http::spawn(
            http.listen,
            riffle_runtime::http::router(cfg.name.clone(), metrics.clone(), tx),
        )
        .with_context(|| format!("binding the HTTP API on {}", http.listen))?;
        tracing::info!(%addr, "HTTP API listening");
        eprintln!("riffle: HTTP API on http://{addr}");
    }
    let mut engine = commands::open_engine(cfg, restore, metrics.clone())?;
    engine.set_control(rx);
    engine.run()?;
    let s = metrics.snapshot();
    eprintln!(
        "riffle: finished: {} events, {} recommendations, {} late, {} dead-lettered, last checkpoint {}",
        s.events_in, s.recommendations_out, s.late, s.dead_lettered, s.last_checkpoint_id
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
    let http = cfg
        .http
        .as_ref()
        .map(|h| h.listen)
        .expect("demo has an API");
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
    let out_dir = cfg.sink.dir.clone();
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

fn savepoint(endpoint: &str) -> anyhow::Result<()> {
    let addr = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut stream =
        std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(150)))?;
    write!(stream, "POST /savepoint HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
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
