//! The CLI's commands as library functions (so tests run exactly what users run).

pub mod bench;
pub mod consume;
pub mod eval;
pub mod produce;

use std::path::Path;
use std::sync::Arc;

use crate::config::{GeneratorConfig, HttpConfig, JobConfig, SourceConfig};
use crate::engine::{Engine, Restore};
use crate::metrics::Metrics;
use crate::sink::file::FileSink;
use crate::source::{file::FileSource, generator::Generator, Source};
use crate::Result;

/// Build the job's source from its configuration.
pub fn open_source(cfg: &JobConfig) -> Result<Box<dyn Source>> {
    Ok(match &cfg.source {
        SourceConfig::File(f) => Box::new(FileSource::open(f, cfg.dataflow.max_future_skew.0)?),
        SourceConfig::Generator(g) => Box::new(Generator::new(g.clone())),
        SourceConfig::Kafka(_) => {
            return Err(crate::Error::Config(
                "a Kafka source runs as a distributed worker (`riffle run` starts one)".into(),
            ))
        }
    })
}

/// Build an engine for a configured job with a file sink.
pub fn open_engine(cfg: JobConfig, restore: Restore, metrics: Arc<Metrics>) -> Result<Engine> {
    let source = open_source(&cfg)?;
    let sink = FileSink::open(cfg.sink_dir()?, 1)?;
    Engine::new(cfg, source, Box::new(sink), restore, metrics)
}

/// The embedded demo job: a generated clickstream through the whole dataflow.
pub fn demo_config(workdir: &Path, events: u64, parallelism: usize) -> JobConfig {
    let source = SourceConfig::Generator(GeneratorConfig {
        users: 50_000,
        items: 5_000,
        events,
        partitions: 2,
        events_per_second: 100,
        ..GeneratorConfig::default()
    });
    JobConfig {
        parallelism,
        checkpoint_interval: crate::config::Duration::secs(2),
        http: Some(HttpConfig::listen(
            "127.0.0.1:0".parse().expect("valid address"),
        )),
        ..JobConfig::local("demo", workdir, source)
    }
}

/// Peak resident set size of this process (VmHWM), in bytes.
/// CPU time (user + system, all threads) this process has used so far.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start at state (field 3);
    // utime and stime are fields 14 and 15, in USER_HZ ticks (100 per second on Linux).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
