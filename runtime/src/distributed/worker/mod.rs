//! One worker of a distributed job: reads its input partitions, runs the user stage for the
//! users it owns (forwarding the rest), frames the exchange, runs the item stage for the
//! items it owns, and commits all of it in one Kafka transaction every `commitInterval`.
//! See `docs/distributed.md` for the design and `protocol.rs` for the commit and recovery
//! rules this follows.
//!
//! - `mod.rs`: start-up, the processing loop, watermarks;
//! - `restore.rs`: rebuilding state from parts and logs;
//! - `commit.rs`: transactions, snapshots, garbage collection;
//! - `savepoint.rs`: the barrier protocol.

mod cadence;
mod changelog;
mod commit;
mod restore;
mod savepoint;
mod throttle;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;

use super::board::{Contribution, SharedBoard};
use super::kafka::{self, Admin, Deliveries, JobConsumer, Topics, TxnProducer, CALL_TIMEOUT};
use super::protocol::{
    self, check_savepoint_id, ExchangeMeta, GroupPosition, InputMeta, InputPosition, PartManifest,
    RestoreRequest, SavepointManifest, StartMode, StateRef, PART_MANIFEST, SAVEPOINT_MANIFEST,
};
use super::receiver::{user_watermark, Delivery, Inbox, PartitionTable, Receiver, RemoteSources};
use super::sender::ExchangeSender;
use super::snapshot::{self, Located, UploadDone, UploadJob, Uploader, UploaderConfig};
use super::wire::{self, Barrier, Entry, Forwarded, Marker, Origin, Sender};
use crate::config::{JobConfig, SourceConfig, StartOffsets};
use crate::dataflow::exchange::Routing;
use crate::dataflow::item::{EmittedThrough, ItemOutput, ItemParams, ItemStage};
use crate::dataflow::output::{ItemStats, LateEvent, StatsOut};
use crate::dataflow::user::{HistEntry, UserParams, UserStage};
use crate::dataflow::window::{Windowing, WM_MIN};
use crate::dataflow::{share_budget, FastMap, Key, Stamped};
use crate::event::{self, Event, EventType, Validation};
use crate::keygroup;
use crate::metrics::{Metrics, PartitionStatus, WorkerInfo};
use crate::state::codec::{self, put_i64, put_str, put_u32, Reader};
use crate::state::{local, StateManager, StateOp};
use crate::store as objstore;
use crate::watermark::WatermarkTracker;
use crate::{Error, Result};

/// State tag of a key group's exchange inbox (marker table, floor, queued entries).
const INBOXES: u8 = b'Q';
/// Exchange frames and changelog records stay well under Kafka's default 1 MB record limit.
const MAX_RECORD_BYTES: usize = 512 * 1024;
/// Trending contributions read back on start: enough for the windows a fill can use.
const TRENDING_TAIL: i64 = 10_000;
/// How long a savepoint may wait for the other workers' barriers.
const SAVEPOINT_TIMEOUT: Duration = Duration::from_secs(120);

/// Who this worker is and how it starts.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    pub index: u32,
    pub workers: u32,
    pub generation: u32,
    pub restore: RestoreArg,
    /// Overrides the job's `stateDir` (each pod's own emptyDir).
    pub state_dir: Option<PathBuf>,
    /// Set on SIGTERM: commit what was processed and return.
    pub stop: Arc<std::sync::atomic::AtomicBool>,
}

/// `--restore`: `none`, `latest` (the default) or a savepoint URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreArg {
    None,
    Latest,
    Savepoint(String),
}

/// Requests from the HTTP API.
pub enum WorkerControl {
    Savepoint {
        id: Option<String>,
        stop: bool,
        reply: crossbeam_channel::Sender<std::result::Result<SavepointInfo, String>>,
    },
}

/// The answer to a savepoint request.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SavepointInfo {
    pub id: String,
    /// The job-wide savepoint (its directory), once every worker's part is in.
    pub location: String,
    /// This worker's part.
    pub part: String,
    pub stop: bool,
    pub duration_ms: u64,
}

struct Input {
    topic: u32,
    name: String,
    partition: i32,
    next: i64,
    /// Silent since: the last record, or the last time the partition could not be read
    /// (an outage is not idleness).
    silent_since: Instant,
}

struct SavepointRun {
    id: String,
    stop: bool,
    initiator: bool,
    phase: u8,
    started: Instant,
    replies: Vec<crossbeam_channel::Sender<std::result::Result<SavepointInfo, String>>>,
}

/// A message read from Kafka, detached from the consumer.
struct Polled {
    topic: String,
    partition: i32,
    offset: i64,
    payload: Option<Vec<u8>>,
}

pub struct Worker {
    cfg: JobConfig,
    opts: WorkerOptions,
    topics: Topics,
    input_topics: Vec<String>,
    sink: crate::config::KafkaSinkConfig,
    windowing: Windowing,
    routing: Routing,
    range: Range<u32>,
    consumer: JobConsumer,
    /// Reads committed offsets without waiting for pending transactional ones.
    metadata_consumer: JobConsumer,
    producer: TxnProducer,
    deliveries: Arc<Mutex<Deliveries>>,
    admin: Admin,
    inputs: Vec<Input>,
    input_index: HashMap<(u32, i32), usize>,
    tracker: WatermarkTracker,
    user: UserStage,
    item: ItemStage,
    sender: ExchangeSender,
    receiver: Receiver,
    board: SharedBoard,
    out: ItemOutput,
    /// One recommendation's JSON, reused (the producer copies the payload).
    rec_buf: Vec<u8>,
    exchange_next: BTreeMap<u32, i64>,
    changelog_buf: BTreeMap<u32, (u32, Vec<u8>)>,
    changelog_next: BTreeMap<u32, i64>,
    state_refs: BTreeMap<u32, StateRef>,
    user_wm: i64,
    /// The other workers' sources, as their markers last described them.
    remote: RemoteSources,
    last_marker: Option<Marker>,
    seq: u64,
    state_dir: PathBuf,
    /// Opened by the restore (fresh, from one part's files, or assembled from several).
    state: Option<StateManager>,
    /// Started once the state is open (its table-file names depend on the database).
    uploader: Option<Uploader>,
    checkpoint_url_prefix: String,
    savepoint_store_url: String,
    part_seq: u64,
    /// A part completed: its pointer goes out with the next commit, then garbage collection.
    gc_after_commit: bool,
    contribution: Option<Contribution>,
    last_through: i64,
    trending_next: i64,
    metrics: Arc<Metrics>,
    control: Option<crossbeam_channel::Receiver<WorkerControl>>,
    savepoint: Option<SavepointRun>,
    /// A savepoint another worker started, to join after this batch.
    join: Option<(String, bool)>,
    paused: bool,
    dirty: bool,
    /// When the next commit is due (see `cadence`).
    next_commit: Instant,
    /// A poll found nothing to read since the last commit.
    caught_up: bool,
    last_checkpoint: Instant,
    last_stats: Instant,
    last_idle_check: Instant,
    rate_window: (Instant, u64, u64),
    /// `source.maxRecordsPerSecond`, if set.
    throttle: Option<throttle::Throttle>,
    validation: Validation,
    scratch: PathBuf,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn headers(topic: &str, origin: &Origin, reason: &str) -> OwnedHeaders {
    OwnedHeaders::new()
        .insert(Header {
            key: "source.topic",
            value: Some(topic),
        })
        .insert(Header {
            key: "source.partition",
            value: Some(&origin.partition.to_string()),
        })
        .insert(Header {
            key: "source.offset",
            value: Some(&origin.offset.to_string()),
        })
        .insert(Header {
            key: "reason",
            value: Some(reason),
        })
}

impl Worker {
    /// Connect, decide how to start, restore, and get ready to run.
    pub fn start(
        cfg: JobConfig,
        opts: WorkerOptions,
        metrics: Arc<Metrics>,
        control: Option<crossbeam_channel::Receiver<WorkerControl>>,
    ) -> Result<Self> {
        cfg.validate()?;
        let SourceConfig::Kafka(src) = &cfg.source else {
            return Err(Error::Config("a worker needs a Kafka source".into()));
        };
        let throttle = src
            .max_records_per_second
            .map(|r| throttle::Throttle::new(r, Instant::now()));
        let sink = cfg
            .sink
            .kafka
            .clone()
            .ok_or_else(|| Error::Config("a worker needs a Kafka sink".into()))?;
        let (index, workers, gen) = (opts.index, opts.workers, opts.generation);
        if workers == 0 || index >= workers || workers > cfg.key_groups {
            return Err(Error::Config(format!(
                "worker index {index} of {workers} workers: need 0 ≤ index < workers ≤ keyGroups ({})",
                cfg.key_groups
            )));
        }
        if gen == 0 {
            return Err(Error::Config("generations start at 1".into()));
        }
        let topics = Topics::for_job(&cfg);
        let kgs = cfg.key_groups;
        let routing = Routing {
            key_groups: kgs,
            parallelism: workers as usize,
        };
        let range = keygroup::range_of(index as usize, kgs, workers as usize);
        let windowing = Windowing::new(&cfg.dataflow);
        let df = cfg.dataflow.clone();
        tracing::info!(worker = index, workers, generation = gen, key_groups = ?range, "starting");

        let consumer = kafka::consumer(&cfg, &topics, false)?;
        let admin = Admin::new(&cfg)?;
        // Inputs and outputs must exist; internal topics are created here.
        let mut inputs = Vec::new();
        for (t, name) in src.topics.iter().enumerate() {
            let n = kafka::partition_count(&consumer, name)?
                .ok_or_else(|| Error::Config(format!("input topic {name} does not exist")))?;
            for p in 0..n {
                if keygroup::owner(p as u32, n as u32, workers as usize) == index as usize {
                    inputs.push(Input {
                        topic: t as u32,
                        name: name.clone(),
                        partition: p,
                        next: -1,
                        silent_since: Instant::now(),
                    });
                }
            }
        }
        for out in [
            Some(&sink.recommendations),
            sink.item_stats.as_ref(),
            Some(&sink.late),
            Some(&sink.dead_letter),
        ]
        .into_iter()
        .flatten()
        {
            if kafka::partition_count(&consumer, out)?.is_none() {
                return Err(Error::Config(format!(
                    "output topic {out} does not exist: create it first"
                )));
            }
        }
        let k = cfg.kafka.as_ref().expect("validated");
        let retention = k.internal_retention.0.to_string();
        let internal = [
            ("cleanup.policy", "delete".to_string()),
            ("retention.ms", retention),
        ];
        // Exchange and changelog are keyed by key group; the trending board is one log.
        for (topic, partitions) in [
            (&topics.exchange, kgs as i32),
            (&topics.changelog, kgs as i32),
            (&topics.trending, 1),
        ] {
            admin.ensure_topic(
                &consumer,
                topic,
                partitions,
                k.replication_factor,
                &internal,
            )?;
        }

        // What was committed for this worker's key groups and inputs.
        let mut wanted: Vec<(String, i32)> = range
            .clone()
            .map(|kg| (topics.exchange.clone(), kg as i32))
            .collect();
        wanted.extend(inputs.iter().map(|i| (i.name.clone(), i.partition)));
        // First fence every transactional id that may hold a transaction open on these
        // partitions: our own index (a zombie) and the indexes of a larger earlier generation
        // that fold into ours. Their worker count is read without waiting for pending
        // transactional offsets (those are what the fencing aborts).
        let peek = kafka::committed(&kafka::metadata_consumer(&cfg, &topics)?, &wanted)?;
        let earlier = range
            .clone()
            .filter_map(|kg| peek.get(&(topics.exchange.clone(), kg as i32)))
            .filter_map(|(_, m)| ExchangeMeta::decode(m).ok())
            .map(|m| m.workers)
            .max()
            .unwrap_or(0);
        for id in protocol::ids_to_fence(index, workers, earlier) {
            kafka::fence(&cfg, &topics, id)?;
        }
        let (producer, deliveries) = kafka::transactional_producer(&cfg, &topics, index)?;
        // Now nothing is pending: the committed offsets are final.
        let committed = kafka::committed(&consumer, &wanted)?;
        let mut metas: BTreeMap<u32, ExchangeMeta> = BTreeMap::new();
        for kg in range.clone() {
            if let Some((_, m)) = committed.get(&(topics.exchange.clone(), kg as i32)) {
                if !m.is_empty() {
                    metas.insert(kg, ExchangeMeta::decode(m)?);
                }
            }
        }
        let savepoint = match &opts.restore {
            RestoreArg::Savepoint(url) => Some(snapshot::read_savepoint(url, cfg.s3.as_ref())?),
            _ => None,
        };
        let request = match (&opts.restore, &savepoint) {
            (RestoreArg::None, _) => RestoreRequest::None,
            (RestoreArg::Latest, _) => RestoreRequest::Latest,
            (RestoreArg::Savepoint(_), Some((_, sp))) => {
                if sp.key_groups != kgs {
                    return Err(Error::Config(format!(
                        "the savepoint has {} key groups, the job {kgs}: key groups are fixed for the life of a job",
                        sp.key_groups
                    )));
                }
                // Generations order one job's runs; another job's savepoint (a new job
                // started from it) precedes every generation of this one.
                RestoreRequest::Savepoint {
                    gen: if sp.job == cfg.name { sp.gen } else { 0 },
                }
            }
            (RestoreArg::Savepoint(_), None) => unreachable!("read above"),
        };
        let per_kg: Vec<Option<ExchangeMeta>> =
            range.clone().map(|kg| metas.get(&kg).cloned()).collect();
        let mode = protocol::plan_start(gen, workers, &request, &per_kg)?;
        if mode == StartMode::Fresh {
            if let Some(m) = metas.values().find(|m| m.gen >= gen) {
                return Err(Error::Config(format!(
                    "a fresh start over committed state needs a generation above {} (--generation {})",
                    m.gen,
                    m.gen + 1
                )));
            }
        }
        tracing::info!(mode = ?mode, "start plan");

        let state_dir = opts
            .state_dir
            .clone()
            .unwrap_or_else(|| cfg.state_dir.clone());
        let scratch = state_dir.join("scratch");
        let checkpoints = objstore::open(&cfg.checkpoint_store, cfg.s3.as_ref())?;
        let checkpoint_url_prefix = checkpoints.location("");
        let savepoint_store_url = cfg.savepoint_store();
        let savepoints = objstore::open(&savepoint_store_url, cfg.s3.as_ref())?;
        let savepoint_prefix_in_checkpoints = savepoint_store_url
            .strip_prefix(&format!("{}/", cfg.checkpoint_store.trim_end_matches('/')))
            .map(str::to_string);

        let user = UserStage::new(UserParams {
            history_length: df.history_length,
            session_gap: df.session_gap.0,
            exclude_purchased: df.exclude_purchased,
            windowing,
        });
        let board = SharedBoard::new(kgs, df.top_k, df.history_length);
        let item = ItemStage::new(ItemParams {
            windowing,
            neighbor_limit: df.neighbor_limit,
            top_k: df.top_k,
            max_excluded: df.history_length,
            trending_capacity: board.capacity(),
            emit_stats: sink.item_stats.is_some() && cfg.sink.item_stats,
            emit_late: false,
        });
        let n_inputs = inputs.len() as u32;
        let input_index = inputs
            .iter()
            .enumerate()
            .map(|(i, inp)| ((inp.topic, inp.partition), i))
            .collect();
        let uploader_config = UploaderConfig {
            checkpoints,
            savepoints,
            savepoint_prefix_in_checkpoints,
            known: HashMap::new(),
            run_id: String::new(),
            retained: cfg.retained_checkpoints,
            scratch: scratch.clone(),
        };
        let mut w = Self {
            input_topics: src.topics.clone(),
            sink,
            windowing,
            routing,
            range: range.clone(),
            consumer,
            metadata_consumer: kafka::metadata_consumer(&cfg, &topics)?,
            producer,
            deliveries,
            admin,
            inputs,
            input_index,
            tracker: WatermarkTracker::new(n_inputs, df.max_out_of_orderness.0),
            user,
            item,
            sender: ExchangeSender::new(routing),
            receiver: Receiver::new(windowing, BTreeMap::new(), WM_MIN),
            board,
            out: ItemOutput::default(),
            rec_buf: Vec::with_capacity(1024),
            exchange_next: BTreeMap::new(),
            changelog_buf: BTreeMap::new(),
            changelog_next: BTreeMap::new(),
            state_refs: BTreeMap::new(),
            user_wm: WM_MIN,
            remote: RemoteSources::UNKNOWN,
            last_marker: None,
            seq: 0,
            state_dir,
            state: None,
            uploader: None,
            checkpoint_url_prefix,
            savepoint_store_url,
            part_seq: 0,
            gc_after_commit: false,
            contribution: None,
            last_through: WM_MIN,
            trending_next: 0,
            metrics,
            control,
            savepoint: None,
            join: None,
            paused: false,
            dirty: true,
            next_commit: Instant::now(),
            caught_up: false,
            last_checkpoint: Instant::now(),
            last_stats: Instant::now(),
            last_idle_check: Instant::now(),
            rate_window: (Instant::now(), 0, 0),
            throttle,
            validation: Validation::at_now(df.max_future_skew.0),
            scratch,
            topics,
            opts,
            cfg,
        };
        std::fs::create_dir_all(&w.scratch).map_err(|e| Error::Io {
            path: w.scratch.clone(),
            source: e,
        })?;
        w.part_seq = now_ms() as u64; // unique and increasing across restarts of a worker
        let known = w.restore(mode, &committed, &metas, savepoint)?;
        let run_id = w.state().run_id().to_string();
        w.uploader = Some(Uploader::spawn(UploaderConfig {
            known,
            run_id,
            ..uploader_config
        })?);
        w.read_trending()?;
        w.assign()?;
        kafka::retry("begin_transaction", || w.producer.begin_transaction())?;
        *w.metrics.worker.lock().expect("metrics lock") = Some(WorkerInfo {
            index,
            workers,
            generation: gen,
            key_groups: (w.range.start, w.range.end),
        });
        // What was restored is committed: its watermark is the committed one.
        w.metrics.watermark.store(w.receiver.watermark(), Relaxed);
        w.metrics.ready.store(true, Relaxed);
        tracing::info!(
            user_wm = w.user_wm,
            item_wm = w.receiver.watermark(),
            users = w.user.users(),
            pane_entries = w.item.pane_entries(),
            "ready"
        );
        Ok(w)
    }

    fn state(&mut self) -> &mut StateManager {
        self.state.as_mut().expect("the restore opens the state")
    }

    /// Back both stages with the (newly opened) state database; they share the budget.
    fn attach_stores(&mut self) {
        let store = self.state().spill_store();
        let budget = self.state_budget();
        self.user.set_store(store.clone(), budget);
        self.item.set_store(store, budget, self.range.clone());
    }

    fn state_budget(&self) -> usize {
        usize::try_from(self.cfg.state_memory.0).unwrap_or(usize::MAX)
    }

    /// Let go of the database (before it is closed or replaced).
    fn detach_stores(&mut self) {
        self.user.detach_store();
        self.item.detach_store();
    }

    fn uploader(&self) -> &Uploader {
        self.uploader.as_ref().expect("started after the restore")
    }
}

impl Worker {
    // ------------------------------------------------------------------ the loop

    /// Run until the process is stopped (or a Kafka failure needs a restart).
    pub fn run(&mut self) -> Result<()> {
        loop {
            if self.opts.stop.load(Relaxed) {
                // A graceful stop leaves no transaction open.
                if self.dirty {
                    self.commit()?;
                }
                tracing::info!("stopped");
                return Ok(());
            }
            self.serve_control()?;
            self.validation = Validation::at_now(self.cfg.dataflow.max_future_skew.0);
            // Handle records as they come, until the next commit is due (never a backlog's
            // worth at once: a commit must not wait for a huge batch).
            let mut busy = Duration::ZERO;
            let mut handled = 0;
            while handled < self.cfg.max_batch_size {
                let wait = if handled == 0 {
                    self.next_commit
                        .saturating_duration_since(Instant::now())
                        .clamp(Duration::from_millis(1), Duration::from_millis(50))
                } else {
                    Duration::ZERO
                };
                if let Some(t) = self.throttle.as_mut() {
                    if let Some(hold) = t.wait(Instant::now()) {
                        // Waiting on the limit is what this worker's capacity costs: busy.
                        let hold = hold.min(Duration::from_millis(20));
                        std::thread::sleep(hold);
                        busy += hold;
                        if self.commit_due() {
                            break;
                        }
                        continue;
                    }
                }
                let polled = match self.consumer.poll(wait) {
                    None => {
                        self.caught_up = true;
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "poll");
                        break;
                    }
                    Some(Ok(m)) => Polled {
                        topic: m.topic().to_string(),
                        partition: m.partition(),
                        offset: m.offset(),
                        payload: m.payload().map(<[u8]>::to_vec),
                    },
                };
                let started = Instant::now();
                self.handle(polled)?;
                busy += started.elapsed();
                handled += 1;
                if self.commit_due() {
                    break;
                }
            }
            let started = Instant::now();
            self.check_idle();
            self.advance()?;
            self.progress_savepoint()?;
            if self.dirty && self.commit_due() {
                let commit_started = Instant::now();
                self.commit()?;
                self.maybe_checkpoint()?;
                self.schedule_next_commit(commit_started);
            }
            self.serve_uploads()?;
            busy += started.elapsed();
            self.metrics
                .busy_nanos
                .fetch_add(busy.as_nanos() as u64, Relaxed);
            self.update_metrics();
        }
    }

    fn commit_due(&self) -> bool {
        Instant::now() >= self.next_commit
    }

    fn schedule_next_commit(&mut self, commit_started: Instant) {
        self.next_commit = cadence::next_commit(
            commit_started,
            Instant::now(),
            self.cfg.commit_interval.as_std(),
            std::mem::take(&mut self.caught_up),
        );
    }

    fn handle(&mut self, m: Polled) -> Result<()> {
        if m.topic == self.topics.exchange {
            let kg = m.partition as u32;
            self.exchange_next.insert(kg, m.offset + 1);
            self.dirty = true;
            let Some(payload) = m.payload else {
                return Ok(());
            };
            let (from, entries) = match wire::decode_frame(&payload) {
                Ok(f) => f,
                Err(e) => {
                    // Only this job's workers write here; a foreign record is skipped, loudly.
                    tracing::error!(partition = m.partition, offset = m.offset, error = %e, "skipping a record that is not an exchange frame");
                    return Ok(());
                }
            };
            let has_marker = entries.iter().any(|e| matches!(e, Entry::Marker(_)));
            let mut ds = Vec::new();
            self.receiver.push(kg, from, entries, &mut ds);
            for d in ds {
                self.deliver(d, false)?;
            }
            if has_marker {
                // Other senders' source watermarks may have moved.
                self.refresh_remote();
            }
        } else if m.topic == self.topics.trending {
            self.trending_next = m.offset + 1;
            if let Some(c) = m
                .payload
                .as_deref()
                .and_then(|p| serde_json::from_slice::<Contribution>(p).ok())
            {
                self.board.apply(c);
            }
        } else if !self.paused {
            // (While paused for a savepoint, input records fetched before the pause are left
            // unread: the inputs are sought back to their positions on resume.)
            let Some(t) = self.input_topics.iter().position(|t| *t == m.topic) else {
                return Ok(());
            };
            let Some(&i) = self.input_index.get(&(t as u32, m.partition)) else {
                return Ok(());
            };
            if let Some(t) = self.throttle.as_mut() {
                t.take(Instant::now());
            }
            self.on_input(i, m.offset, m.payload.as_deref())?;
        }
        Ok(())
    }

    fn on_input(&mut self, i: usize, offset: i64, payload: Option<&[u8]>) -> Result<()> {
        self.dirty = true;
        let inp = &mut self.inputs[i];
        inp.next = offset + 1;
        inp.silent_since = Instant::now();
        let origin = Origin {
            topic: inp.topic,
            partition: inp.partition,
            offset,
        };
        if self.tracker.partitions()[i].idle {
            self.tracker.set_idle(i as u32, false);
        }
        let raw = payload.unwrap_or_default();
        let event = match event::parse_json(raw, &self.validation) {
            Ok(e) => e,
            Err(reason) => {
                let topic = self.input_topics[origin.topic as usize].clone();
                let dl = self.sink.dead_letter.clone();
                self.produce(
                    BaseRecord::to(&dl)
                        .payload(raw)
                        .headers(headers(&topic, &origin, &reason)),
                )?;
                self.metrics.dead_lettered.fetch_add(1, Relaxed);
                return Ok(());
            }
        };
        let ts = event.ts;
        let kg = self.routing.key_group(event.user_id.as_bytes());
        if self.routing.owner(kg) == self.opts.index as usize {
            self.process_event(event, origin)?;
        } else {
            self.sender.forward(kg, Forwarded { event, origin });
            self.metrics.forwarded.fetch_add(1, Relaxed);
        }
        // The event was read: its partition's watermark moves (W_e was taken before).
        self.tracker.observe(i as u32, ts);
        self.recompute_user_wm();
        Ok(())
    }

    /// The user stage for one event of a user this worker owns.
    fn process_event(&mut self, event: Event, origin: Origin) -> Result<()> {
        self.ensure_marker();
        let wm = self.user_wm;
        let kg = self.routing.key_group(event.user_id.as_bytes());
        let weight = event.kind.weight(&self.cfg.dataflow.weights);
        let stamped = Stamped {
            seq: self.seq,
            wm,
            weight,
            event,
        };
        self.seq += 1;
        let late = self.user.process(&stamped, kg, &mut self.sender)?;
        let e = &stamped.event;
        if self
            .changelog_buf
            .get(&kg)
            .is_some_and(|(_, b)| b.len() > MAX_RECORD_BYTES)
        {
            self.flush_changelog(kg)?;
        }
        let (n, buf) = self
            .changelog_buf
            .entry(kg)
            .or_insert_with(|| (0, Vec::with_capacity(1024)));
        *n += 1;
        changelog::encode_entry(
            buf,
            &e.user_id,
            &HistEntry {
                item: e.item_id.clone(),
                item_kg: self.routing.key_group(e.item_id.as_bytes()),
                ts: e.ts,
                kind: e.kind,
            },
        );
        if late {
            let rec = LateEvent {
                event_id: e.event_id.clone(),
                user_id: e.user_id.clone(),
                item_id: e.item_id.clone(),
                kind: e.kind,
                ts: e.ts,
                watermark: wm,
            };
            let value = serde_json::to_vec(&rec)?;
            let topic = self.input_topics[origin.topic as usize].clone();
            let late_topic = self.sink.late.clone();
            let key = e.user_id.clone();
            self.produce(
                BaseRecord::to(&late_topic)
                    .key(key.as_bytes())
                    .payload(value.as_slice())
                    .headers(headers(&topic, &origin, "late")),
            )?;
            self.metrics.late.fetch_add(1, Relaxed);
        }
        self.metrics.events_in.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Hand a receiver delivery to the stages. In `replay`, outputs are discarded and
    /// forwarded events skipped (the changelog restores what they did).
    fn deliver(&mut self, d: Delivery, replay: bool) -> Result<()> {
        match d {
            Delivery::Forward(_, f) => {
                if !replay {
                    let f = *f;
                    self.process_event(f.event, f.origin)?;
                }
            }
            Delivery::Item(kg, Entry::Increments(p)) => {
                for (item, others) in &p.rows {
                    self.item.apply_row_of(kg, p.pane, item, others)?;
                }
            }
            Delivery::Item(kg, Entry::Request(r)) => {
                self.item.request(*r, kg, &mut self.out)?;
                if !replay {
                    self.emit_outputs()?;
                } else {
                    self.out.recs.clear();
                }
            }
            Delivery::Item(_, other) => {
                return Err(Error::CorruptState(format!("not an item entry: {other:?}")))
            }
            Delivery::Advance(wm) => {
                // Replays discard outputs: what they emitted is in the committed topics.
                let topic = self.sink.item_stats.as_deref().filter(|_| !replay);
                let mut stats = ProducedStats::new(&self.producer, topic);
                let advanced = self.item.advance(wm, &mut self.out, &mut stats);
                let produced = stats.finish()?;
                advanced?;
                if replay {
                    self.out = ItemOutput::default();
                } else {
                    if produced > 0 {
                        self.dirty = true; // they wait in the open transaction
                        self.metrics.item_stats_out.fetch_add(produced, Relaxed);
                    }
                    self.note_through(wm);
                    self.emit_outputs()?;
                }
            }
            Delivery::Barrier(_, _, b) => {
                if !replay && b.phase == 1 && self.savepoint.is_none() && !self.paused {
                    // Another worker started a savepoint: join it between batches (a commit
                    // must never fall inside a frame).
                    self.join.get_or_insert((b.id, b.stop));
                }
            }
        }
        Ok(())
    }

    /// Advance the item stage to what the receiver allows.
    fn advance(&mut self) -> Result<()> {
        let mut ds = Vec::new();
        self.receiver.advance(&mut ds);
        for d in ds {
            self.deliver(d, false)?;
        }
        Ok(())
    }

    fn note_through(&mut self, wm: i64) {
        let through = self
            .windowing
            .epoch(wm)
            .saturating_mul(self.windowing.slide);
        if through > self.last_through {
            self.last_through = through;
            let c = self.contribution.get_or_insert_with(|| Contribution {
                kg_start: self.range.start,
                kg_end: self.range.end,
                through,
                windows: Vec::new(),
            });
            c.through = through;
        }
    }

    fn emit_outputs(&mut self) -> Result<()> {
        let mut out = std::mem::take(&mut self.out);
        let k = self.cfg.dataflow.top_k;
        let lateness = self.windowing.lateness;
        let mut value = std::mem::take(&mut self.rec_buf);
        for p in &mut out.recs {
            self.board
                .fill(&mut p.rec.items, k, &p.excluded, p.wm, lateness);
            value.clear();
            p.rec.write_json(&mut value);
            self.produce(
                BaseRecord::to(&self.sink.recommendations)
                    .key(p.rec.user_id.as_bytes())
                    .payload(value.as_slice()),
            )?;
        }
        self.rec_buf = value;
        if !out.trending.is_empty() {
            let through = self.last_through;
            let c = self.contribution.get_or_insert_with(|| Contribution {
                kg_start: self.range.start,
                kg_end: self.range.end,
                through,
                windows: Vec::new(),
            });
            c.windows.append(&mut out.trending);
        }
        if !out.recs.is_empty() || self.contribution.is_some() {
            self.dirty = true; // outputs wait in the open transaction for the next commit
        }
        let m = &self.metrics;
        m.recommendations_out
            .fetch_add(out.recs.len() as u64, Relaxed);
        m.windows_emitted.fetch_add(out.windows_emitted, Relaxed);
        out.recs.clear();
        out.windows_emitted = 0;
        self.out = out;
        Ok(())
    }

    /// Produce a record into the open transaction, waiting while the queue is full.
    fn produce(&self, record: BaseRecord<'_, [u8], [u8]>) -> Result<()> {
        produce(&self.producer, record)
    }

    // ------------------------------------------------------------------ watermarks

    fn local_active(&self) -> bool {
        self.tracker.partitions().iter().any(|p| !p.idle)
    }

    /// Markers arrived: refresh the other workers' source watermarks (a scan of every owned
    /// partition's table, so not per event).
    fn refresh_remote(&mut self) {
        self.remote = self.receiver.remote_source_watermark(self.opts.index);
        self.recompute_user_wm();
    }

    fn recompute_user_wm(&mut self) {
        let local = self.tracker.current();
        if let Some(candidate) = user_watermark(local, self.local_active(), self.remote) {
            self.user_wm = self.user_wm.max(candidate);
        }
    }

    fn current_marker(&self) -> Marker {
        Marker {
            user_wm: self.user_wm,
            source_wm: self.tracker.current(),
            source_idle: !self.local_active(),
        }
    }

    /// Before an event: a marker if the watermark's emission epoch moved since the last one
    /// (receivers tag the entries that follow with it), or if none was sent yet.
    fn ensure_marker(&mut self) {
        let epoch = self.windowing.epoch(self.user_wm);
        if self
            .last_marker
            .is_none_or(|m| self.windowing.epoch(m.user_wm) != epoch)
        {
            self.send_marker();
        }
    }

    /// A marker with the current values if they changed since the last one.
    fn send_marker_if_changed(&mut self) {
        let m = self.current_marker();
        if self.last_marker.is_none_or(|l| {
            (l.user_wm, l.source_wm, l.source_idle) != (m.user_wm, m.source_wm, m.source_idle)
        }) {
            self.send_marker();
        }
    }

    fn send_marker(&mut self) {
        let m = self.current_marker();
        self.sender.marker(m);
        self.last_marker = Some(m);
        self.dirty = true;
    }

    /// A partition is idle after `idleTimeout` of silence while it could be read and is not
    /// paused: during a broker outage every partition is silent, and calling them idle would let the first one
    /// back push the watermark past the others' data.
    fn check_idle(&mut self) {
        if self.last_idle_check.elapsed() < Duration::from_millis(100) {
            return;
        }
        self.last_idle_check = Instant::now();
        let timeout = self.cfg.dataflow.idle_timeout.as_std();
        let stats = self.consumer.context().snapshot();
        let mut changed = false;
        for (i, inp) in self.inputs.iter_mut().enumerate() {
            let s = stats.get(&(inp.name.clone(), inp.partition));
            let readable = s.is_some_and(|s| s.readable_now());
            // Records wait that this worker has not read yet (it is behind, e.g. throttled or
            // catching up): the partition is slow, not silent.
            let backlog = s.is_some_and(|s| s.app_offset >= 0 && s.ls_offset > s.app_offset);
            let idle = self.tracker.partitions()[i].idle;
            // A paused input (a savepoint in progress) is silent because it is not read: not
            // idle, whatever the timeout.
            if !readable || self.paused || backlog {
                inp.silent_since = Instant::now();
                if idle {
                    tracing::info!(topic = %inp.name, partition = inp.partition, backlog, "partition not readable, paused or behind: holds the watermark again");
                    self.tracker.set_idle(i as u32, false);
                    changed = true;
                }
            } else if !idle && inp.silent_since.elapsed() >= timeout {
                tracing::info!(topic = %inp.name, partition = inp.partition, "partition idle");
                self.tracker.set_idle(i as u32, true);
                changed = true;
            }
        }
        if changed {
            self.recompute_user_wm();
            self.dirty = true;
        }
    }

    fn update_metrics(&mut self) {
        if self.last_stats.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_stats = Instant::now();
        let m = &self.metrics;
        let (since, events, busy) = self.rate_window;
        let elapsed = since.elapsed().as_secs_f64();
        let total = m.events_in.load(Relaxed);
        let busy_now = m.busy_nanos.load(Relaxed);
        if elapsed > 0.0 {
            m.set_rate((total - events) as f64 / elapsed);
            m.set_busy_recent(((busy_now - busy) as f64 / 1e9 / elapsed).min(1.0));
        }
        self.rate_window = (Instant::now(), total, busy_now);
        m.exchange_queued
            .store(self.receiver.queued() as u64, Relaxed);
        m.stale_frames.store(self.receiver.stale_frames, Relaxed);
        let stats = self.consumer.context().snapshot();
        let mut parts = Vec::new();
        let mut status = |topic: &str, partition: i32, position: i64, idle: bool| {
            let st = stats.get(&(topic.to_string(), partition));
            let end = st.map_or(-1, |s| {
                if s.ls_offset >= 0 {
                    s.ls_offset
                } else {
                    s.hi_offset
                }
            });
            parts.push(PartitionStatus {
                topic: topic.to_string(),
                partition,
                position,
                end,
                // The consumer's own position steps over transaction markers, which are
                // never delivered: without it, every transactional partition at rest would
                // show a lag of one.
                lag: if end >= 0 {
                    (end - position.max(st.map_or(-1, |s| s.app_offset))).max(0)
                } else {
                    -1
                },
                readable: st.is_some_and(|s| s.readable_now()),
                idle,
            });
        };
        for (i, inp) in self.inputs.iter().enumerate() {
            status(
                &inp.name,
                inp.partition,
                inp.next,
                self.tracker.partitions()[i].idle,
            );
        }
        for (kg, next) in &self.exchange_next {
            status(&self.topics.exchange, *kg as i32, *next, false);
        }
        *m.partitions.lock().expect("metrics lock") = parts;
    }
}

/// Run a worker until it stops or fails: an abortable Kafka failure rewinds it in place
/// (restore from the committed state), anything else ends the process.
pub fn run(
    cfg: JobConfig,
    opts: WorkerOptions,
    metrics: Arc<Metrics>,
    control: Option<crossbeam_channel::Receiver<WorkerControl>>,
) -> Result<()> {
    loop {
        let mut w = Worker::start(cfg.clone(), opts.clone(), metrics.clone(), control.clone())?;
        match w.run() {
            Err(Error::Rewind(reason)) => {
                // The start plan resumes from the committed state (a savepoint restore only
                // repeats if nothing was committed in this generation yet).
                tracing::warn!(%reason, "transaction aborted; rewinding to the last committed state");
                metrics.ready.store(false, Relaxed);
            }
            other => return other,
        }
    }
}

/// Produce a record into the open transaction, waiting while the queue is full.
fn produce(producer: &TxnProducer, mut record: BaseRecord<'_, [u8], [u8]>) -> Result<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((e, r)) => match kafka::classify(&e) {
                kafka::Failure::Retriable(_) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                kafka::Failure::Abortable(m) => return Err(Error::Rewind(m)),
                kafka::Failure::Fatal(m) => return Err(Error::Kafka(m)),
            },
        }
    }
}

/// ItemStats produced into the open transaction as the item stage emits them, so a window
/// is never held whole (without a topic they are dropped: replays, and jobs without the
/// stream).
struct ProducedStats<'a> {
    producer: &'a TxnProducer,
    topic: Option<&'a str>,
    records: u64,
    error: Option<Error>,
}

impl<'a> ProducedStats<'a> {
    fn new(producer: &'a TxnProducer, topic: Option<&'a str>) -> Self {
        Self {
            producer,
            topic,
            records: 0,
            error: None,
        }
    }

    /// The number of records produced, or the first error.
    fn finish(self) -> Result<u64> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.records),
        }
    }
}

impl StatsOut for ProducedStats<'_> {
    fn item_stats(&mut self, stats: ItemStats) {
        let Some(topic) = self.topic else { return };
        if self.error.is_some() {
            return;
        }
        let mut value = Vec::with_capacity(512);
        stats.write_json(&mut value);
        let produced = produce(
            self.producer,
            BaseRecord::to(topic)
                .key(stats.item_id.as_bytes())
                .payload(value.as_slice()),
        );
        match produced {
            Ok(()) => self.records += 1,
            Err(e) => self.error = Some(e),
        }
    }
}
