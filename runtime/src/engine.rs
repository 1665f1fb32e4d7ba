//! The local engine: a micro-batch loop over the dataflow with `parallelism` worker threads,
//! each owning a contiguous range of key groups for both stages.
//!
//! A batch is one read round of the source. It is stamped (sequence numbers, watermarks,
//! emission crossings), then run in three phases: user stage → exchange → item stage →
//! trending fill. Between batches every worker is quiescent, so a checkpoint barrier is
//! simply "between two batches": no alignment, and the snapshot is consistent by
//! construction.
//!
//! A checkpoint pauses the loop only to write the stages' changed state, close the sink's
//! epoch and cut a RocksDB checkpoint; an uploader thread uploads it, writes the manifest and
//! collects garbage, and the loop publishes the epoch at the first batch boundary after it
//! learns of the commit (`checkpoint::protocol` holds the order; at most one is in flight).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;

use crate::checkpoint::protocol::{Epochs, Failure, Step};
use crate::checkpoint::{self, Manifest, MANIFEST};
use crate::config::JobConfig;
use crate::dataflow::exchange::{merge_inboxes, ExchangeWriter, Outboxes, Routing};
use crate::dataflow::item::{ItemOutput, ItemParams, ItemStage};
use crate::dataflow::output::{ItemStats, StatsOut};
use crate::dataflow::trending::TrendingBoard;
use crate::dataflow::user::{UserParams, UserStage};
use crate::dataflow::window::Windowing;
use crate::dataflow::{share_budget, BatchFrame, Crossing, Stamped};
use crate::event::DeadLetter;
use crate::keygroup;
use crate::metrics::Metrics;
use crate::sink::{Sink, Stream, SyncJob};
use crate::source::{Polled, Source};
use crate::state::{self, LocalSnapshot, StateManager, StateOp, UploadStats};
use crate::store::{self as objstore, FileStore, ObjectStore};
use crate::{Error, Result};

/// The name of the trending board in the job-wide state.
const TRENDING: &str = "trending";

/// Where to start from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Restore {
    /// Fresh state.
    None,
    /// The newest checkpoint in the job's store; fresh if there is none.
    Latest,
    /// A checkpoint or savepoint directory (containing `_manifest.json`).
    Path(PathBuf),
}

impl std::str::FromStr for Restore {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "latest" => Self::Latest,
            "none" => Self::None,
            path => Self::Path(PathBuf::from(path)),
        })
    }
}

/// Requests from outside the engine loop (the HTTP API).
pub enum Control {
    /// A savepoint at the next batch boundary; with `stop`, the engine then stops.
    Savepoint {
        stop: bool,
        reply: Sender<std::result::Result<CheckpointInfo, String>>,
    },
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointInfo {
    pub id: u64,
    pub location: String,
    /// How long the batch loop paused for it (state write-back, epoch close, cut).
    pub pause_ms: u64,
    /// From its start to its commit point (the manifest written).
    pub duration_ms: u64,
    pub uploaded_bytes: u64,
    pub size_bytes: u64,
}

struct Worker {
    range: std::ops::Range<u32>,
    user: UserStage,
    item: ItemStage,
    /// The most heap bytes its two stages held before a maintenance (within a batch).
    hot_peak: usize,
    /// A batch's recommendations as JSON lines, kept between batches: about a kilobyte per
    /// event, so a fresh buffer per batch grew to megabytes through reallocations and
    /// newly faulted pages every time.
    recs_buf: Vec<u8>,
}

pub struct Engine {
    cfg: JobConfig,
    source: Box<dyn Source>,
    sink: Box<dyn Sink>,
    state: StateManager,
    workers: Vec<Worker>,
    routing: Routing,
    windowing: Windowing,
    tracker: crate::watermark::WatermarkTracker,
    board: TrendingBoard,
    next_seq: u64,
    last_stamp: i64,
    /// Checkpoint ids and output epochs.
    epochs: Epochs,
    uploader: Uploader,
    /// The checkpoint between its cut and its outcome.
    in_flight: Option<InFlight>,
    metrics: Arc<Metrics>,
    control: Option<Receiver<Control>>,
    last_checkpoint_at: Instant,
    last_read: Vec<Instant>,
    polled: Vec<Polled>,
    rate_window: (Instant, u64),
    /// Per-batch (events, seconds from read to output) for latency percentiles.
    pub latency: Option<hdrhistogram::Histogram<u64>>,
    pub checkpoint_log: Vec<CheckpointInfo>,
    /// The item stages' largest hot tier after a batch (approximate bytes).
    /// The most heap bytes all stages held after a batch's maintenance.
    settled_peak: usize,
}

impl Engine {
    pub fn new(
        cfg: JobConfig,
        source: Box<dyn Source>,
        sink: Box<dyn Sink>,
        restore: Restore,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let store = objstore::open(&cfg.checkpoint_store, cfg.s3.as_ref())?;
        Self::with_store(cfg, source, sink, store, restore, metrics)
    }

    /// As [`new`](Self::new), with the checkpoint store given (tests inject faults).
    pub fn with_store(
        cfg: JobConfig,
        source: Box<dyn Source>,
        sink: Box<dyn Sink>,
        store: Box<dyn ObjectStore>,
        restore: Restore,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        cfg.validate()?;
        let df = &cfg.dataflow;
        let windowing = Windowing::new(df);
        let routing = Routing {
            key_groups: cfg.key_groups,
            parallelism: cfg.parallelism,
        };
        let board = TrendingBoard::new(df.top_k, df.history_length);
        let workers = (0..cfg.parallelism)
            .map(|w| Worker {
                range: keygroup::range_of(w, cfg.key_groups, cfg.parallelism),
                user: UserStage::new(UserParams {
                    history_length: df.history_length,
                    session_gap: df.session_gap.0,
                    exclude_purchased: df.exclude_purchased,
                    windowing,
                }),
                item: ItemStage::new(ItemParams {
                    windowing,
                    neighbor_limit: df.neighbor_limit,
                    top_k: df.top_k,
                    max_excluded: df.history_length,
                    trending_capacity: board.capacity(),
                    emit_stats: cfg.sink.item_stats,
                    emit_late: true,
                }),
                hot_peak: 0,
                recs_buf: Vec::new(),
            })
            .collect();
        let store: Arc<dyn ObjectStore> = Arc::from(store);
        let existing = checkpoint::completed_ids(&store.list("chk-")?);
        let partitions = source.partitions();
        let located = locate(store.as_ref(), &restore)?;
        let state_dir = cfg.state_dir.clone();
        let (state, manifest) = match located {
            None => {
                tracing::info!(store = %cfg.checkpoint_store, "starting with fresh state");
                (StateManager::create(&state_dir)?, None)
            }
            Some((restore_store, base, manifest)) => {
                if manifest.key_groups != cfg.key_groups {
                    return Err(Error::Config(format!(
                        "checkpoint {} has {} key groups, the job {}: key groups are fixed for the life of a job",
                        manifest.id, manifest.key_groups, cfg.key_groups
                    )));
                }
                state::records::check_state_format(
                    manifest.state_format,
                    &format!("checkpoint {}", manifest.id),
                )?;
                let from = restore_store
                    .as_ref()
                    .map_or(store.as_ref(), |s| s.as_ref());
                let same_store = restore_store.is_none();
                let state = StateManager::restore(&state_dir, from, &base, &manifest, same_store)?;
                let r = state.restore_stats();
                tracing::info!(
                    checkpoint = manifest.id,
                    parallelism_then = manifest.parallelism,
                    parallelism_now = cfg.parallelism,
                    reused_local = r.reused_local,
                    downloaded_bytes = r.downloaded_bytes,
                    "restoring"
                );
                metrics.restore_reused_local.store(r.reused_local, Relaxed);
                metrics
                    .restore_downloaded_bytes
                    .store(r.downloaded_bytes, Relaxed);
                (state, Some(manifest))
            }
        };
        let tracker = crate::watermark::WatermarkTracker::new(
            partitions,
            cfg.dataflow.max_out_of_orderness.0,
        );
        let uploader = Uploader::spawn(UploadContext {
            store,
            known: state.known_files().clone(),
            run_id: state.run_id().to_string(),
            retained: cfg.retained_checkpoints,
        })?;
        let mut engine = Self {
            cfg,
            source,
            sink,
            state,
            workers,
            routing,
            windowing,
            last_stamp: tracker.current(),
            tracker,
            board,
            next_seq: 0,
            epochs: Epochs::restored(0, 0),
            uploader,
            in_flight: None,
            metrics,
            control: None,
            last_checkpoint_at: Instant::now(),
            last_read: vec![Instant::now(); partitions as usize],
            polled: Vec::new(),
            rate_window: (Instant::now(), 0),
            latency: None,
            checkpoint_log: Vec::new(),
            settled_peak: 0,
        };
        // Each worker gets an equal share of the budget for its two stages, in front of the
        // database.
        let share = engine.worker_budget();
        for w in &mut engine.workers {
            w.user.set_store(engine.state.spill_store(), share);
            w.item
                .set_store(engine.state.spill_store(), share, w.range.clone());
        }
        let covered = match manifest {
            Some(m) => {
                let id = m.id;
                engine.restore_from(m)?;
                id
            }
            None => 0,
        };
        engine.epochs = Epochs::restored(covered, existing.last().copied().unwrap_or(0));
        // A fresh start (covered 0) publishes nothing an earlier incarnation left pending.
        engine
            .sink
            .recover(engine.epochs.committed(), engine.epochs.open_epoch())?;
        for p in 0..partitions {
            if engine.source.is_finished(p) {
                engine.tracker.finish(p);
            }
        }
        engine.metrics.ready.store(true, Relaxed);
        Ok(engine)
    }

    fn restore_from(&mut self, m: Manifest) -> Result<()> {
        let routing = self.routing;
        let workers = &mut self.workers;
        // Panes into memory up to the budget (the rest are read on use); histories stay in
        // the database, read on their user's first event.
        for kg in 0..self.cfg.key_groups {
            let w = &mut workers[routing.owner(kg)];
            self.state.scan_panes(kg, &mut w.item.restorer(kg))?;
        }
        let wm = m.watermark.current();
        for w in &mut self.workers {
            w.item.resume(wm);
        }
        if m.sources.len() != self.source.partitions() as usize {
            return Err(Error::Config(format!(
                "checkpoint {} has {} source partitions, the job has {}",
                m.id,
                m.sources.len(),
                self.source.partitions()
            )));
        }
        self.source.seek(&m.sources)?;
        self.tracker = m.watermark;
        self.last_stamp = wm;
        self.next_seq = m.next_seq;
        if let Some(board) = self.state.job_state(TRENDING)? {
            self.board = serde_json::from_slice(&board)?;
        }
        self.metrics.events_in.store(m.events_in, Relaxed);
        self.metrics.checkpoint_last_id.store(m.id, Relaxed);
        Ok(())
    }

    pub fn set_control(&mut self, rx: Receiver<Control>) {
        self.control = Some(rx);
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn state(&self) -> &StateManager {
        &self.state
    }

    /// The newest committed checkpoint (0: none).
    pub fn last_checkpoint_id(&self) -> u64 {
        self.epochs.committed()
    }

    /// The history tiers summed over workers: (histories read back from RocksDB, histories
    /// evicted to it).
    pub fn history_tiers(&self) -> (u64, u64) {
        self.workers
            .iter()
            .fold((0, 0), |(l, e), w| (l + w.user.loads, e + w.user.evictions))
    }

    /// Heap bytes of the stages' state (see `dataflow::heap`): the peak after a batch's
    /// maintenance, and the sum over workers of each one's peak before a maintenance.
    pub fn state_memory_peaks(&self) -> (usize, usize) {
        let between = self.workers.iter().map(|w| w.hot_peak).sum();
        (self.settled_peak, between)
    }

    /// One worker's state budget: an equal share of `stateMemory`.
    fn worker_budget(&self) -> usize {
        usize::try_from(self.cfg.state_memory.0).unwrap_or(usize::MAX) / self.workers.len().max(1)
    }

    /// The item stages' hot tiers: pane entries read back from the store, pane entries
    /// moved to it, dictionary rebuilds.
    pub fn item_tiers(&self) -> (u64, u64, u64) {
        self.workers.iter().fold((0, 0, 0), |(l, e, r), w| {
            (
                l + w.item.loads,
                e + w.item.evictions,
                r + w.item.dict_rebuilds,
            )
        })
    }

    pub fn enable_latency_histogram(&mut self) {
        self.latency = Some(hdrhistogram::Histogram::new(3).expect("valid sigfig"));
    }

    /// Run until the (bounded) source is exhausted, then take a final checkpoint and wait for
    /// it to commit; or until a stop-with-savepoint, whose savepoint is the last checkpoint.
    pub fn run(&mut self) -> Result<()> {
        while self.step()? {
            self.maybe_checkpoint()?;
            if self.metrics.stopped.load(Relaxed) {
                return Ok(());
            }
        }
        self.checkpoint(false)?;
        self.metrics.finished.store(true, Relaxed);
        Ok(())
    }

    /// At a batch boundary: settle a checkpoint whose upload ended, serve savepoint requests,
    /// and start a checkpoint if the interval elapsed and none is in flight.
    pub fn maybe_checkpoint(&mut self) -> Result<()> {
        while let Ok(done) = self.uploader.done.try_recv() {
            // A failed checkpoint is logged and counted there; the job goes on.
            let _outcome = self.settle(done)?;
        }
        let requests: Vec<Control> = match &self.control {
            Some(rx) => rx.try_iter().collect(),
            None => Vec::new(),
        };
        for Control::Savepoint { stop, reply } in requests {
            if self.metrics.stopped.load(Relaxed) {
                let _ = reply.send(Err("the job stopped with a savepoint".into()));
                continue;
            }
            if stop {
                // Nothing runs after a stopping savepoint: wait for it here.
                let r = self.checkpoint(true).map_err(|e| e.to_string());
                if r.is_ok() {
                    self.metrics.stopped.store(true, Relaxed);
                }
                let _ = reply.send(r);
                continue;
            }
            self.await_in_flight()?;
            match self.begin_checkpoint(true) {
                // Answered once it is complete (`settle`).
                Ok(()) => {
                    if let Some(f) = &mut self.in_flight {
                        f.replies.push(reply);
                    }
                }
                Err(e) => {
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
        if self.epochs.may_start()
            && !self.metrics.stopped.load(Relaxed)
            && self.last_checkpoint_at.elapsed() >= self.cfg.checkpoint_interval.as_std()
        {
            self.begin_checkpoint(false)?;
        }
        Ok(())
    }

    /// Process one batch. Returns false once every partition is finished and drained.
    pub fn step(&mut self) -> Result<bool> {
        let parts = self.source.partitions().max(1) as usize;
        let per_partition = (self.cfg.max_batch_size / parts).max(1);
        let mut polled = std::mem::take(&mut self.polled);
        polled.clear();
        let read_at = Instant::now();
        self.source.poll_round(per_partition, &mut polled)?;
        let all_finished = (0..self.source.partitions()).all(|p| self.source.is_finished(p));
        if polled.is_empty() {
            self.polled = polled;
            if all_finished {
                return Ok(false);
            }
            self.mark_idle();
            // Nothing to read right now (live sources): let the caller wait.
            std::thread::sleep(Duration::from_millis(1));
            return Ok(true);
        }

        // Stamp: sequence numbers, W_e, emission crossings.
        let mut stamped = Vec::with_capacity(polled.len());
        let mut dead: Vec<DeadLetter> = Vec::new();
        let mut crossings = Vec::new();
        let weights = self.cfg.dataflow.weights.clone();
        for rec in polled.drain(..) {
            let p = rec.partition;
            self.last_read[p as usize] = read_at;
            match rec.record {
                Ok(event) => {
                    let wm = self.tracker.current();
                    if self.windowing.epoch(wm) > self.windowing.epoch(self.last_stamp) {
                        crossings.push(Crossing {
                            seq: self.next_seq,
                            wm,
                        });
                    }
                    self.last_stamp = wm;
                    self.tracker.observe(p, event.ts);
                    stamped.push(Stamped {
                        seq: self.next_seq,
                        wm,
                        weight: event.kind.weight(&weights),
                        event,
                    });
                    self.next_seq += 1;
                }
                Err(dl) => dead.push(dl),
            }
            if rec.last {
                self.tracker.finish(p);
            }
        }
        self.polled = polled;
        // A partition silent for idleTimeout stops holding the watermark back even while the
        // others deliver (replayed inputs deliver on every partition each round: never idle).
        self.mark_idle();
        let frame = BatchFrame {
            end_seq: self.next_seq,
            crossings,
            wm_end: self.tracker.current(),
        };
        self.process(&stamped, &frame, &dead)?;
        self.last_stamp = frame.wm_end;

        let n = stamped.len() as u64;
        let m = &self.metrics;
        m.events_in.fetch_add(n, Relaxed);
        m.dead_lettered.fetch_add(dead.len() as u64, Relaxed);
        m.watermark.store(frame.wm_end, Relaxed);
        if let Some(t) = self.tracker.max_event_time() {
            m.max_event_time.store(t, Relaxed);
        }
        let busy = read_at.elapsed();
        m.busy_nanos.fetch_add(busy.as_nanos() as u64, Relaxed);
        if let Some(h) = &mut self.latency {
            let _ = h.record_n(busy.as_micros().max(1) as u64, n.max(1));
        }
        let (since, count) = self.rate_window;
        let elapsed = since.elapsed();
        if elapsed >= Duration::from_secs(1) {
            let total = m.events_in.load(Relaxed);
            m.set_rate((total - count) as f64 / elapsed.as_secs_f64());
            self.rate_window = (Instant::now(), total);
        }
        Ok(true)
    }

    fn mark_idle(&mut self) {
        let timeout = self.cfg.dataflow.idle_timeout.as_std();
        for p in 0..self.source.partitions() {
            if !self.source.is_finished(p) && self.last_read[p as usize].elapsed() >= timeout {
                self.tracker.set_idle(p, true);
            }
        }
    }

    fn process(
        &mut self,
        stamped: &[Stamped],
        frame: &BatchFrame,
        dead: &[DeadLetter],
    ) -> Result<()> {
        let routing = self.routing;
        let par = self.workers.len();
        let budget = self.worker_budget();
        // Phase 1: user stage, by owner of the user's key group.
        let mut by_worker: Vec<Vec<(usize, u32)>> = vec![Vec::new(); par];
        for (i, s) in stamped.iter().enumerate() {
            let kg = routing.key_group(s.event.user_id.as_bytes());
            by_worker[routing.owner(kg)].push((i, kg));
        }
        let outboxes: Vec<Outboxes> = run_parallel(&mut self.workers, by_worker, |w, mine| {
            let mut x = ExchangeWriter::new(routing, frame);
            for (i, kg) in mine {
                w.user.process(&stamped[i], kg, &mut x)?;
            }
            w.hot_peak = w.hot_peak.max(w.user.hot_bytes() + w.item.hot_bytes());
            w.user.set_budget(share_budget(budget, w.item.hot_bytes()));
            w.user.maintain()?;
            Ok(x.finish())
        })
        .into_iter()
        .collect::<Result<_>>()?;
        // Exchange: transpose sender outboxes into receiver inboxes.
        let mut inboxes: Vec<Vec<Vec<crate::dataflow::exchange::Message>>> =
            (0..par).map(|_| Vec::with_capacity(par)).collect();
        for o in outboxes {
            self.metrics
                .increments_in
                .fetch_add(o.increments_in, Relaxed);
            self.metrics
                .increments_out
                .fetch_add(o.increments_out, Relaxed);
            for (dst, b) in o.boxes.into_iter().enumerate() {
                inboxes[dst].push(b);
            }
        }
        // Phase 2: item stage. ItemStats go into the sink in chunks as windows are emitted.
        let sink = Mutex::new(&mut self.sink);
        let outputs: Vec<(Result<ItemOutput>, Result<u64>)> =
            run_parallel(&mut self.workers, inboxes, |w, inbox| {
                let mut stats = ChunkedStats::new(&sink);
                let out = w
                    .item
                    .process_batch(merge_inboxes(inbox), frame, &mut stats)
                    .and_then(|out| {
                        w.hot_peak = w.hot_peak.max(w.user.hot_bytes() + w.item.hot_bytes());
                        w.item.set_budget(share_budget(budget, w.user.hot_bytes()));
                        w.item.maintain().map(|()| out)
                    })
                    .map_err(Error::from);
                (out, stats.finish())
            });
        let mut stats_out = 0;
        let outputs: Vec<ItemOutput> = outputs
            .into_iter()
            .map(|(o, n)| {
                stats_out += n?;
                o
            })
            .collect::<Result<_>>()?;
        self.metrics.item_stats_out.fetch_add(stats_out, Relaxed);
        let settled: usize = self
            .workers
            .iter()
            .map(|w| w.user.hot_bytes() + w.item.hot_bytes())
            .sum();
        self.settled_peak = self.settled_peak.max(settled);
        for o in &outputs {
            for (end, list) in &o.trending {
                self.board.merge(*end, list.clone());
            }
        }
        // Phase 3: trending fill and serialisation.
        let board = &self.board;
        let k = self.cfg.dataflow.top_k;
        let lateness = self.windowing.lateness;
        let serialised: Vec<[Vec<u8>; 2]> = run_parallel(&mut self.workers, outputs, |w, mut o| {
            let mut recs = std::mem::take(&mut w.recs_buf);
            recs.clear();
            for p in &mut o.recs {
                board.fill(&mut p.rec.items, k, &p.excluded, p.wm, lateness);
                p.rec.write_json(&mut recs);
                recs.push(b'\n');
            }
            let mut late = Vec::new();
            for l in &o.late {
                write_json_line(&mut late, l);
            }
            let m = &self.metrics;
            m.recommendations_out
                .fetch_add(o.recs.len() as u64, Relaxed);
            m.late.fetch_add(o.late.len() as u64, Relaxed);
            m.windows_emitted.fetch_add(o.windows_emitted, Relaxed);
            [recs, late]
        });
        for (w, [recs, late]) in self.workers.iter_mut().zip(serialised) {
            self.sink.write(Stream::Recommendations, &recs)?;
            self.sink.write(Stream::Late, &late)?;
            w.recs_buf = recs;
        }
        let mut dl = Vec::new();
        for d in dead {
            write_json_line(&mut dl, d);
        }
        self.sink.write(Stream::DeadLetter, &dl)?;
        self.board.prune(frame.wm_end, lateness);
        Ok(())
    }

    /// Take a checkpoint (or a self-contained savepoint) at this batch boundary and wait
    /// until it is complete (a checkpoint already in flight completes first).
    pub fn checkpoint(&mut self, savepoint: bool) -> Result<CheckpointInfo> {
        // The previous one's failure is its own (logged, and its epoch pending for this one).
        self.await_in_flight()?;
        self.begin_checkpoint(savepoint)?;
        self.await_in_flight()?
            .ok_or_else(|| Error::Checkpoint("the checkpoint begun is not in flight".into()))?
    }

    /// The part of a checkpoint the batch loop waits for: write the state back, close the
    /// sink's epoch, cut; the rest goes to the uploader thread.
    fn begin_checkpoint(&mut self, savepoint: bool) -> Result<()> {
        let started = Instant::now();
        let id = self.epochs.open_epoch();
        // Step::WriteState
        let wm = self.tracker.current();
        let mut out = self.state.checkpoint_writer();
        let (mut users, mut panes) = (0u64, 0u64);
        for w in &mut self.workers {
            w.user.expire(wm);
            w.user.snapshot(&mut out)?;
            w.item.snapshot(w.range.clone(), &mut out)?;
            users += w.user.users() as u64;
            panes += w.item.pane_entries() as u64;
        }
        // The trending board is operator state of the whole job: in the snapshot with the rest.
        out.push(StateOp::Put(
            state::records::job_state_key(TRENDING),
            serde_json::to_vec(&self.board)?,
        ))?;
        out.finish()?;
        let written_ms = started.elapsed().as_millis() as u64;
        // Step::CloseEpoch. From here on the sink has closed epoch `id`: if this checkpoint
        // fails, its id is used up (the next one publishes the closed epoch with its own),
        // never reused for records written after it.
        let sync = self.sink.pre_commit(id)?;
        self.epochs
            .begin()
            .map_err(|e| Error::Checkpoint(e.to_string()))?;
        // Step::Cut
        let snap = match self.state.cut(&format!("snap-{id}")) {
            Ok(snap) => snap,
            Err(e) => {
                self.epochs
                    .on_failed(id)
                    .map_err(|e| Error::Checkpoint(e.to_string()))?;
                return Err(e);
            }
        };
        let manifest = Manifest {
            id,
            job_name: self.cfg.name.clone(),
            created_at_ms: now_ms(),
            self_contained: false,
            key_groups: self.cfg.key_groups,
            parallelism: self.cfg.parallelism,
            files: Vec::new(),
            sources: self.source.positions(),
            watermark: self.tracker.clone(),
            next_seq: self.next_seq,
            sink_epoch: id,
            events_in: self.metrics.events_in.load(Relaxed),
            state_format: state::records::STATE_FORMAT,
        };
        self.uploader.submit(UploadJob {
            id,
            started,
            snap,
            manifest,
            sync,
            savepoint,
        })?;
        let pause_ms = started.elapsed().as_millis() as u64;
        self.in_flight = Some(InFlight {
            id,
            savepoint,
            pause_ms,
            users,
            panes,
            replies: Vec::new(),
        });
        self.last_checkpoint_at = Instant::now();
        let m = &self.metrics;
        m.checkpoint_pause_ms.store(pause_ms, Relaxed);
        m.upload_in_progress.store(true, Relaxed);
        m.users.store(users, Relaxed);
        m.pane_entries.store(panes, Relaxed);
        tracing::debug!(
            checkpoint = id,
            savepoint,
            pause_ms,
            written_ms,
            "checkpoint cut; uploading"
        );
        Ok(())
    }

    /// Wait for the checkpoint in flight, if any, and settle it: its outcome.
    fn await_in_flight(&mut self) -> Result<Option<Result<CheckpointInfo>>> {
        if self.in_flight.is_none() {
            return Ok(None);
        }
        let done = self
            .uploader
            .done
            .recv()
            .map_err(|_| Error::Checkpoint("the uploader thread ended".into()))?;
        self.settle(done).map(Some)
    }

    /// A checkpoint's outcome reached the loop: publish what it covers (Step::Publish) and
    /// answer who waits for it. The outer error is the engine's (publishing failed).
    fn settle(&mut self, done: UploadDone) -> Result<Result<CheckpointInfo>> {
        let Some(f) = self.in_flight.take().filter(|f| f.id == done.id) else {
            return Err(Error::Checkpoint(format!(
                "an outcome for checkpoint {} that is not in flight",
                done.id
            )));
        };
        let m = &self.metrics;
        m.upload_in_progress.store(false, Relaxed);
        let outcome = match done.outcome {
            Err(e) => {
                self.epochs
                    .on_failed(f.id)
                    .map_err(|e| Error::Checkpoint(e.to_string()))?;
                m.checkpoints_failed.fetch_add(1, Relaxed);
                tracing::error!(checkpoint = f.id, savepoint = f.savepoint, error = %e, "checkpoint failed; its output waits for the next checkpoint");
                Err(e)
            }
            Ok(c) => {
                let through = self
                    .epochs
                    .on_committed(f.id)
                    .map_err(|e| Error::Checkpoint(e.to_string()))?;
                self.sink.commit(through)?;
                self.source.on_checkpoint_complete(f.id)?;
                let info = CheckpointInfo {
                    id: f.id,
                    location: c.location,
                    pause_ms: f.pause_ms,
                    duration_ms: c.duration_ms,
                    uploaded_bytes: c.upload.uploaded_bytes,
                    size_bytes: c.upload.total_bytes,
                };
                m.checkpoint_last_id.store(f.id, Relaxed);
                m.checkpoints_completed.fetch_add(1, Relaxed);
                m.checkpoint_duration_ms.store(info.duration_ms, Relaxed);
                m.checkpoint_uploaded_bytes
                    .store(info.uploaded_bytes, Relaxed);
                m.checkpoint_size_bytes.store(info.size_bytes, Relaxed);
                tracing::info!(
                    checkpoint = f.id,
                    savepoint = f.savepoint,
                    pause_ms = info.pause_ms,
                    duration_ms = info.duration_ms,
                    uploaded_bytes = info.uploaded_bytes,
                    size_bytes = info.size_bytes,
                    users = f.users,
                    pane_entries = f.panes,
                    "checkpoint completed"
                );
                self.checkpoint_log.push(info.clone());
                match c.savepoint {
                    None => Ok(info),
                    Some(Ok(location)) => Ok(CheckpointInfo { location, ..info }),
                    Some(Err(e)) => {
                        tracing::error!(checkpoint = f.id, error = %e, "savepoint copy failed");
                        Err(e)
                    }
                }
            }
        };
        for reply in f.replies {
            let _ = reply.send(match &outcome {
                Ok(info) => Ok(info.clone()),
                Err(e) => Err(e.to_string()),
            });
        }
        Ok(outcome)
    }
}

/// A checkpoint between its cut and its outcome.
struct InFlight {
    id: u64,
    savepoint: bool,
    pause_ms: u64,
    users: u64,
    panes: u64,
    /// Savepoint requests answered with its outcome.
    replies: Vec<Sender<std::result::Result<CheckpointInfo, String>>>,
}

/// The background half of a checkpoint.
struct UploadJob {
    id: u64,
    started: Instant,
    snap: LocalSnapshot,
    /// Everything but the files, which the upload decides.
    manifest: Manifest,
    sync: SyncJob,
    savepoint: bool,
}

struct UploadDone {
    id: u64,
    /// An error before the commit point: the checkpoint does not exist.
    outcome: Result<Committed>,
}

struct Committed {
    location: String,
    duration_ms: u64,
    upload: UploadStats,
    /// The savepoint's location, when one was asked for.
    savepoint: Option<Result<String>>,
}

/// The uploader thread: runs the background steps of one checkpoint at a time, in the
/// order of `checkpoint::protocol`.
struct Uploader {
    jobs: Option<Sender<UploadJob>>,
    done: Receiver<UploadDone>,
    cancel: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Uploader {
    fn spawn(mut ctx: UploadContext) -> Result<Self> {
        let (jobs, rx) = crossbeam_channel::unbounded::<UploadJob>();
        let (done_tx, done) = crossbeam_channel::unbounded();
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("riffle-checkpoint".into())
            .spawn(move || {
                for job in rx {
                    let id = job.id;
                    let outcome = ctx.run(job, &stop);
                    if done_tx.send(UploadDone { id, outcome }).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| Error::Io {
                path: PathBuf::from("riffle-checkpoint"),
                source: e,
            })?;
        Ok(Self {
            jobs: Some(jobs),
            done,
            cancel,
            thread: Some(thread),
        })
    }

    fn submit(&self, job: UploadJob) -> Result<()> {
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(|| Error::Checkpoint("the uploader thread ended".into()))
    }
}

impl Drop for Uploader {
    /// An engine dropped mid-checkpoint (an error, a test's crash) abandons the upload at
    /// the next step and waits for the thread, so that nothing touches the state directory
    /// or the store after the engine is gone.
    fn drop(&mut self) {
        self.cancel.store(true, Relaxed);
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct UploadContext {
    store: Arc<dyn ObjectStore>,
    /// Table files in the store: local name → key.
    known: HashMap<String, String>,
    run_id: String,
    retained: usize,
}

impl UploadContext {
    fn run(&mut self, job: UploadJob, cancel: &AtomicBool) -> Result<Committed> {
        let UploadJob {
            id,
            started,
            snap,
            mut manifest,
            sync,
            savepoint,
        } = job;
        let snap_dir = snap.dir.clone();
        let mut sync = Some(sync);
        let mut snap = Some(snap);
        let mut upload = UploadStats::default();
        let mut committed: Option<Committed> = None;
        let mut savepoint_at: Option<Result<String>> = None;
        let mut step = Step::Cut.next(savepoint);
        while let Some(s) = step.filter(|s| s.in_background()) {
            step = s.next(savepoint);
            if cancel.load(Relaxed) && committed.is_none() {
                remove_dir(&snap_dir);
                return Err(Error::Stopped(
                    "the engine was dropped mid-checkpoint".into(),
                ));
            }
            let r = match s {
                Step::SyncEpochs => sync.take().map_or(Ok(()), |f| f()),
                Step::Upload => snap.as_ref().map_or(Ok(()), |snap| {
                    state::upload(self.store.as_ref(), snap, id, &self.run_id, &mut self.known)
                        .map(|u| upload = u)
                }),
                Step::PutManifest => {
                    manifest.files = upload.files.clone();
                    self.put_manifest(&manifest).map(|()| {
                        committed = Some(Committed {
                            location: self.store.location(&checkpoint::checkpoint_dir(id)),
                            duration_ms: started.elapsed().as_millis() as u64,
                            upload: std::mem::take(&mut upload),
                            savepoint: None,
                        });
                    })
                }
                Step::CollectGarbage => self.collect_garbage(),
                Step::CopySavepoint => self
                    .write_savepoint(&manifest)
                    .map(|at| savepoint_at = Some(Ok(at))),
                Step::KeepLocal => match (snap.take(), &committed) {
                    (Some(snap), Some(c)) => state::keep_local(
                        snap,
                        &state::local::identity(&c.location, manifest.created_at_ms),
                        &manifest.files,
                    ),
                    _ => Ok(()),
                },
                Step::WriteState | Step::CloseEpoch | Step::Cut | Step::Publish => {
                    unreachable!("runs on the batch loop")
                }
            };
            if let Err(e) = r {
                match s.on_failure() {
                    Failure::NotCommitted => {
                        remove_dir(&snap_dir);
                        return Err(e);
                    }
                    Failure::SavepointLost => savepoint_at = Some(Err(e)),
                    Failure::Harmless => {
                        tracing::warn!(checkpoint = id, step = ?s, error = %e, "after the commit point; the checkpoint stands");
                    }
                }
            }
        }
        // A cut not kept (keeping failed) only takes disk.
        remove_dir(&snap_dir);
        let mut c = committed.ok_or_else(|| {
            Error::Checkpoint(format!("checkpoint {id} ended without its commit point"))
        })?;
        c.savepoint = savepoint_at;
        Ok(c)
    }

    /// The commit point: the checkpoint exists once its manifest does.
    fn put_manifest(&self, manifest: &Manifest) -> Result<()> {
        self.store.put_bytes(
            &checkpoint::manifest_key(manifest.id),
            &serde_json::to_vec_pretty(manifest)?,
        )?;
        Ok(())
    }

    fn collect_garbage(&mut self) -> Result<()> {
        let keys = self.store.list("chk-")?;
        let ids = checkpoint::completed_ids(&keys);
        for old in checkpoint::expired(&ids, self.retained) {
            // Manifest first: a half-deleted checkpoint must not look complete.
            self.store.delete(&checkpoint::manifest_key(old))?;
        }
        // Files of checkpoints that are expired or never completed (a crash mid-way), older
        // than the newest retained one.
        let live = checkpoint::completed_ids(&self.store.list("chk-")?);
        let oldest_live = live.first().copied().unwrap_or(u64::MAX);
        for k in &keys {
            let id = k
                .strip_prefix("chk-")
                .and_then(|r| r.split('/').next())
                .and_then(|n| n.parse::<u64>().ok());
            if id.is_some_and(|id| id < oldest_live && !live.contains(&id)) {
                self.store.delete(k)?;
            }
        }
        let mut retained = Vec::new();
        for id in checkpoint::completed_ids(&self.store.list("chk-")?) {
            let bytes = self.store.get_bytes(&checkpoint::manifest_key(id))?;
            retained.push(serde_json::from_slice::<Manifest>(&bytes)?);
        }
        let shared = self.store.list("shared/")?;
        let garbage: Vec<String> = checkpoint::garbage(&shared, &retained)
            .into_iter()
            .cloned()
            .collect();
        for k in &garbage {
            self.store.delete(k)?;
        }
        self.known.retain(|_, key| !garbage.contains(key));
        Ok(())
    }

    /// Copy a completed checkpoint into a self-contained savepoint directory.
    fn write_savepoint(&self, m: &Manifest) -> Result<String> {
        let dir = checkpoint::savepoint_dir(m.id);
        let tmp = tempfile::tempdir().map_err(|e| Error::Io {
            path: std::env::temp_dir(),
            source: e,
        })?;
        let mut sp = m.clone();
        sp.self_contained = true;
        for f in &mut sp.files {
            let local = tmp.path().join(&f.name);
            self.store.get_file(&f.key, &local)?;
            f.key = f.name.clone();
            self.store.put_file(&format!("{dir}/{}", f.name), &local)?;
        }
        self.store.put_bytes(
            &format!("{dir}/{MANIFEST}"),
            &serde_json::to_vec_pretty(&sp)?,
        )?;
        Ok(self.store.location(&dir))
    }
}

fn remove_dir(dir: &Path) {
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove a local cut");
        }
    }
}

/// ItemStats serialised as they are emitted and written to the sink whenever a chunk is
/// full, so a window of a million items costs one chunk of memory, not all of its records.
/// Workers share the sink, so chunks of different workers interleave; each item's records
/// still come in increasing window end (an item has one owner).
struct ChunkedStats<'a, 'b> {
    sink: &'a Mutex<&'b mut Box<dyn Sink>>,
    buf: Vec<u8>,
    records: u64,
    error: Option<Error>,
}

impl<'a, 'b> ChunkedStats<'a, 'b> {
    const CHUNK_BYTES: usize = 1 << 20;

    fn new(sink: &'a Mutex<&'b mut Box<dyn Sink>>) -> Self {
        Self {
            sink,
            buf: Vec::new(),
            records: 0,
            error: None,
        }
    }

    fn flush(&mut self) {
        if self.buf.is_empty() || self.error.is_some() {
            return;
        }
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = sink.write(Stream::ItemStats, &self.buf) {
            self.error = Some(e);
        }
        self.buf.clear();
    }

    /// Write what is left; the number of records, or the first write error.
    fn finish(mut self) -> Result<u64> {
        self.flush();
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(self.records),
        }
    }
}

impl StatsOut for ChunkedStats<'_, '_> {
    fn item_stats(&mut self, stats: ItemStats) {
        if self.error.is_some() {
            return;
        }
        stats.write_json(&mut self.buf);
        self.buf.push(b'\n');
        self.records += 1;
        if self.buf.len() >= Self::CHUNK_BYTES {
            self.flush();
        }
    }
}

fn write_json_line<T: Serialize>(buf: &mut Vec<u8>, v: &T) {
    serde_json::to_writer(&mut *buf, v).expect("output records serialise");
    buf.push(b'\n');
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Run `f` for every worker with its input, on scoped threads (inline for one worker).
fn run_parallel<I: Send, O: Send>(
    workers: &mut [Worker],
    inputs: Vec<I>,
    f: impl Fn(&mut Worker, I) -> O + Sync,
) -> Vec<O> {
    if workers.len() == 1 {
        return workers
            .iter_mut()
            .zip(inputs)
            .map(|(w, i)| f(w, i))
            .collect();
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = workers
            .iter_mut()
            .zip(inputs)
            .map(|(w, i)| {
                let f = &f;
                s.spawn(move || f(w, i))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker panicked"))
            .collect()
    })
}

type Located = (Option<Box<dyn ObjectStore>>, String, Manifest);

/// Find the manifest to restore from: `None` for a fresh start. The store is `None` when it
/// is the job's own store.
fn locate(store: &dyn ObjectStore, restore: &Restore) -> Result<Option<Located>> {
    match restore {
        Restore::None => Ok(None),
        Restore::Latest => {
            let ids = checkpoint::completed_ids(&store.list("chk-")?);
            let Some(id) = ids.last() else {
                tracing::warn!("--restore latest: no completed checkpoint yet, starting fresh");
                return Ok(None);
            };
            let m: Manifest =
                serde_json::from_slice(&store.get_bytes(&checkpoint::manifest_key(*id))?)?;
            Ok(Some((None, String::new(), m)))
        }
        Restore::Path(path) => {
            let dir = if path.ends_with(MANIFEST) {
                path.parent().unwrap_or(Path::new("/")).to_path_buf()
            } else {
                path.clone()
            };
            let manifest_path = dir.join(MANIFEST);
            let bytes = std::fs::read(&manifest_path).map_err(|e| Error::Io {
                path: manifest_path.clone(),
                source: e,
            })?;
            let m: Manifest = serde_json::from_slice(&bytes)?;
            // Keys are relative to the savepoint itself, or to the store root above `chk-N/`.
            let root = if m.self_contained {
                dir
            } else {
                dir.parent().unwrap_or(Path::new("/")).to_path_buf()
            };
            Ok(Some((
                Some(Box::new(FileStore::new(root)?)),
                String::new(),
                m,
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::config::{Duration as Dur, GeneratorConfig, SourceConfig};
    use crate::event::{Event, EventType};
    use crate::sink::file::{read_committed, FileSink};
    use crate::sink::memory::MemorySink;
    use crate::source::memory::MemorySource;
    use crate::source::{Polled, SourcePosition};
    use crate::store::{FaultyStore, Op};

    fn event(k: u64) -> Event {
        Event {
            event_id: format!("e{k}").into(),
            user_id: format!("u{}", k % 7).into(),
            item_id: format!("i{}", k % 5).into(),
            kind: EventType::View,
            ts: 1_000_000 + k as i64 * 1000,
        }
    }

    /// A live input: partition 0 delivers events a second of event time apart, forever;
    /// partition 1 never delivers and never ends.
    struct LiveSource {
        next: u64,
    }

    impl Source for LiveSource {
        fn partitions(&self) -> u32 {
            2
        }
        fn poll_round(&mut self, per_partition: usize, out: &mut Vec<Polled>) -> Result<()> {
            for _ in 0..per_partition.min(10) {
                out.push(Polled {
                    partition: 0,
                    record: Ok(event(self.next)),
                    last: false,
                });
                self.next += 1;
            }
            Ok(())
        }
        fn is_finished(&self, _: u32) -> bool {
            false
        }
        fn positions(&self) -> Vec<SourcePosition> {
            vec![SourcePosition::default(); 2]
        }
        fn seek(&mut self, _: &[SourcePosition]) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_silent_partition_stops_holding_the_watermark_while_another_is_busy() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = JobConfig::local(
            "idle",
            dir.path(),
            SourceConfig::Generator(GeneratorConfig::default()),
        );
        cfg.key_groups = 4;
        cfg.dataflow.idle_timeout = Dur::millis(50);
        cfg.dataflow.window_size = Dur::secs(60);
        cfg.dataflow.window_slide = Dur::secs(10);
        let metrics = Arc::new(Metrics::default());
        let mut e = Engine::new(
            cfg,
            Box::new(LiveSource { next: 0 }),
            Box::new(MemorySink::default()),
            Restore::None,
            metrics.clone(),
        )
        .unwrap();
        // Bounded by wall time: the idle timeout is wall time. Partition 0 never pauses, so
        // only the silence of partition 1 can let the watermark move.
        let deadline = Instant::now() + Duration::from_secs(30);
        while metrics.windows_emitted.load(Relaxed) == 0 {
            assert!(
                Instant::now() < deadline,
                "no window emitted: the silent partition still holds the watermark back"
            );
            assert!(e.step().unwrap());
        }
        assert!(e.tracker.partitions()[1].idle);
    }

    #[test]
    fn a_failed_savepoint_loses_and_duplicates_no_output() {
        let dir = tempfile::tempdir().unwrap();
        let events: Vec<Event> = (0..3000).map(event).collect();
        let n = events.len();
        let mut cfg = JobConfig::local(
            "flaky",
            dir.path(),
            SourceConfig::Generator(GeneratorConfig::default()),
        );
        cfg.key_groups = 4;
        cfg.max_batch_size = 100;
        cfg.checkpoint_interval = Dur::secs(3600);
        // Checkpoint manifests cannot be written while `fail` is set.
        let fail = Arc::new(AtomicBool::new(false));
        let failing = fail.clone();
        let store = FaultyStore::new(
            FileStore::new(dir.path().join("checkpoints")).unwrap(),
            move |op, key| op == Op::Put && key.ends_with(MANIFEST) && failing.load(Relaxed),
        );
        let out = dir.path().join("output");
        let mut e = Engine::with_store(
            cfg,
            Box::new(MemorySource::from_events(events)),
            Box::new(FileSink::open(&out, 1).unwrap()),
            Box::new(store),
            Restore::None,
            Arc::new(Metrics::default()),
        )
        .unwrap();
        for _ in 0..5 {
            e.step().unwrap();
        }
        e.checkpoint(false).unwrap();
        for _ in 0..5 {
            e.step().unwrap();
        }
        // The savepoint fails after the sink closed its epoch (at the manifest).
        fail.store(true, Relaxed);
        assert!(e.checkpoint(true).is_err());
        fail.store(false, Relaxed);
        for _ in 0..5 {
            e.step().unwrap();
        }
        e.checkpoint(false).unwrap();
        e.run().unwrap();
        assert_exactly_once(&out, n);
    }

    /// Exactly one recommendation per event in the committed output.
    fn assert_exactly_once(out: &Path, n: usize) {
        let recs = read_committed(out, Stream::Recommendations).unwrap();
        let ids: std::collections::HashSet<String> = recs
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["eventId"].to_string())
            .collect();
        assert_eq!(recs.len(), n, "every event's recommendation, once");
        assert_eq!(ids.len(), n);
    }

    #[test]
    fn failed_background_uploads_lose_and_duplicate_no_output() {
        let dir = tempfile::tempdir().unwrap();
        let events: Vec<Event> = (0..6000).map(event).collect();
        let n = events.len();
        let mut cfg = JobConfig::local(
            "flaky-uploads",
            dir.path(),
            SourceConfig::Generator(GeneratorConfig::default()),
        );
        cfg.key_groups = 4;
        cfg.max_batch_size = 100;
        // A checkpoint at (nearly) every batch boundary where none is in flight.
        cfg.checkpoint_interval = Dur::millis(1);
        // Every store write fails while `fail` is set: uploads fail before the manifest.
        let fail = Arc::new(AtomicBool::new(false));
        let store = |fail: &Arc<AtomicBool>| {
            let failing = fail.clone();
            Box::new(FaultyStore::new(
                FileStore::new(dir.path().join("checkpoints")).unwrap(),
                move |op, _| op == Op::Put && failing.load(Relaxed),
            ))
        };
        let out = dir.path().join("output");
        let metrics = Arc::new(Metrics::default());
        let mut e = Engine::with_store(
            cfg.clone(),
            Box::new(MemorySource::from_events(events.clone())),
            Box::new(FileSink::open(&out, 1).unwrap()),
            store(&fail),
            Restore::None,
            metrics.clone(),
        )
        .unwrap();
        let batches = |e: &mut Engine, k: usize| {
            for _ in 0..k {
                assert!(e.step().unwrap());
                e.maybe_checkpoint().unwrap();
            }
        };
        batches(&mut e, 5);
        e.checkpoint(false).unwrap();
        let published = read_committed(&out, Stream::Recommendations).unwrap().len();
        assert_eq!(published, 500);
        // Uploads fail in the background while the loop goes on writing later epochs.
        fail.store(true, Relaxed);
        batches(&mut e, 10);
        assert!(e.checkpoint(false).is_err());
        assert!(metrics.checkpoints_failed.load(Relaxed) >= 1);
        assert_eq!(
            read_committed(&out, Stream::Recommendations).unwrap().len(),
            published,
            "nothing of a failed checkpoint is published"
        );
        // The next checkpoint that commits publishes the failed ones' epochs with its own.
        fail.store(false, Relaxed);
        batches(&mut e, 5);
        e.checkpoint(false).unwrap();
        assert_eq!(
            read_committed(&out, Stream::Recommendations).unwrap().len(),
            2000
        );
        // Failing again, then a crash with failed epochs pending: the restore discards them
        // and the restored run writes those records again.
        fail.store(true, Relaxed);
        batches(&mut e, 10);
        assert!(e.checkpoint(false).is_err());
        drop(e);
        fail.store(false, Relaxed);
        let mut e = Engine::with_store(
            cfg,
            Box::new(MemorySource::from_events(events)),
            Box::new(FileSink::open(&out, 1).unwrap()),
            store(&fail),
            Restore::Latest,
            Arc::new(Metrics::default()),
        )
        .unwrap();
        e.run().unwrap();
        assert_exactly_once(&out, n);
    }
}
