//! Backtest: prequential replay of train then test through the engine, scoring each test
//! event's recommendation against the next item of the same session.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::config::{DataflowConfig, JobConfig, SourceConfig};
use crate::engine::{Engine, Restore};
use crate::error::IoContext;
use crate::event::{parse_session_tsv, Event, Validation};
use crate::metrics::Metrics;
use crate::sink::memory::MemorySink;
use crate::sink::{Sink, Stream, SyncJob};
use crate::source::memory::MemorySource;
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct EvalResult {
    pub hit_rate: f64,
    pub mrr: f64,
    /// Scored (event, next event) pairs.
    pub n: u64,
    pub k: usize,
    pub train_events: usize,
    pub test_events: usize,
}

impl std::fmt::Display for EvalResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HR@{k}={:.4} MRR@{k}={:.4} n={}",
            self.hit_rate,
            self.mrr,
            self.n,
            k = self.k
        )
    }
}

/// Read a session TSV (`SessionId\tItemId\tTime`); rows that do not parse are an error here:
/// a backtest on silently filtered data would report the wrong numbers.
pub fn read_sessions(path: &Path, id_prefix: &str) -> Result<Vec<Event>> {
    let text = std::fs::read_to_string(path).at(path)?;
    let validation = Validation { max_ts: i64::MAX };
    let mut events = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let mut ev = parse_session_tsv(line.as_bytes(), i as u64 + 1, &validation)
            .map_err(|e| Error::Config(format!("{}:{}: {e}", path.display(), i + 1)))?;
        ev.event_id = compact_str::format_compact!("{id_prefix}{}", ev.event_id);
        events.push(ev);
    }
    Ok(events)
}

/// The job a backtest runs: `dataflow` from the given config, local scratch directories.
pub fn eval_job(dataflow: DataflowConfig, parallelism: usize, scratch: &Path) -> JobConfig {
    // The source is replaced by the in-memory replay; only final checkpoint matters.
    let mut job = JobConfig::local("eval", scratch, SourceConfig::Generator(Default::default()));
    job.parallelism = parallelism;
    job.sink.item_stats = false;
    job.checkpoint_interval = crate::config::Duration::secs(3600);
    job.retained_checkpoints = 1;
    job.dataflow = dataflow;
    job
}

pub fn run(train: &Path, test: &Path, mut job: JobConfig, k: usize) -> Result<EvalResult> {
    let train_events = read_sessions(train, "train:")?;
    let test_events = read_sessions(test, "test:")?;
    job.dataflow.top_k = job.dataflow.top_k.max(k);
    job.sink.item_stats = false;
    let (n_train, n_test) = (train_events.len(), test_events.len());

    // Sessions of the test file in file order (rows are time-ordered within a session).
    let mut sessions: Vec<Vec<(String, String)>> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for ev in &test_events {
        let s = *index.entry(ev.user_id.to_string()).or_insert_with(|| {
            sessions.push(Vec::new());
            sessions.len() - 1
        });
        sessions[s].push((ev.event_id.to_string(), ev.item_id.to_string()));
    }

    // Replay in event-time order (stable: train before test at equal times).
    let mut all = train_events;
    all.extend(test_events);
    all.sort_by_key(|e| e.ts);
    let source = MemorySource::from_events(all);
    let sink = SharedSink::default();
    let recs = sink.0.clone();
    let mut engine = Engine::new(
        job,
        Box::new(source),
        Box::new(sink),
        Restore::None,
        Arc::new(Metrics::default()),
    )?;
    engine.run()?;

    let guard = recs.lock().expect("sink lock");
    let mut ranked: HashMap<&str, Vec<&str>> = HashMap::new();
    let parsed: Vec<crate::dataflow::output::Recommendation> = guard
        .lines(Stream::Recommendations)
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    for r in &parsed {
        if r.event_id.starts_with("test:") {
            ranked.insert(
                r.event_id.as_str(),
                r.items.iter().map(|s| s.item_id.as_str()).collect(),
            );
        }
    }
    let (mut hits, mut rr, mut n) = (0u64, 0f64, 0u64);
    for session in &sessions {
        for pair in session.windows(2) {
            let (event_id, _) = &pair[0];
            let (_, next_item) = &pair[1];
            let list = ranked
                .get(event_id.as_str())
                .ok_or_else(|| Error::Stopped(format!("no recommendation for {event_id}")))?;
            n += 1;
            if let Some(pos) = list.iter().take(k).position(|i| i == next_item) {
                hits += 1;
                rr += 1.0 / (pos + 1) as f64;
            }
        }
    }
    Ok(EvalResult {
        hit_rate: if n > 0 { hits as f64 / n as f64 } else { 0.0 },
        mrr: if n > 0 { rr / n as f64 } else { 0.0 },
        n,
        k,
        train_events: n_train,
        test_events: n_test,
    })
}

/// A memory sink the caller can read after the engine took ownership of it.
#[derive(Default, Clone)]
struct SharedSink(Arc<std::sync::Mutex<MemorySink>>);

impl Sink for SharedSink {
    fn write(&mut self, stream: Stream, records: &[u8]) -> Result<()> {
        self.0.lock().expect("sink lock").write(stream, records)
    }
    fn pre_commit(&mut self, epoch: u64) -> Result<SyncJob> {
        self.0.lock().expect("sink lock").pre_commit(epoch)
    }
    fn commit(&mut self, epoch: u64) -> Result<()> {
        self.0.lock().expect("sink lock").commit(epoch)
    }
    fn recover(&mut self, covered: u64, next: u64) -> Result<()> {
        self.0.lock().expect("sink lock").recover(covered, next)
    }
}
