//! One worker of a distributed job: reads its input partitions, runs the user stage for the
//! users it owns (forwarding the rest), frames the exchange, runs the item stage for the
//! items it owns, and commits all of it in one Kafka transaction every `commitInterval`.
//! See `docs/distributed.md` for the design and `protocol.rs` for the commit and recovery
//! rules this follows.

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
use super::receiver::{Delivery, Inbox, PartitionTable, Receiver};
use super::sender::ExchangeSender;
use super::snapshot::{self, Located, UploadDone, UploadJob, Uploader, UploaderConfig};
use super::wire::{self, Barrier, Entry, Forwarded, Marker, Origin, Sender};
use crate::config::{JobConfig, SourceConfig, StartOffsets};
use crate::dataflow::exchange::Routing;
use crate::dataflow::item::{EmittedThrough, ItemOutput, ItemParams, ItemStage, PANES};
use crate::dataflow::output::LateEvent;
use crate::dataflow::user::{HistEntry, UserParams, UserStage, HISTORIES};
use crate::dataflow::window::{Windowing, WM_MIN};
use crate::dataflow::{FastMap, Key, Stamped};
use crate::event::{self, Event, EventType, Validation};
use crate::keygroup;
use crate::metrics::{Metrics, PartitionStatus, WorkerInfo};
use crate::state::codec::{self, put_i64, put_str, put_u32, Reader};
use crate::state::{StateManager, StateOp};
use crate::store as objstore;
use crate::watermark::WatermarkTracker;
use crate::{Error, Result};

/// State tag of a key group's exchange inbox (marker table, floor, queued entries).
const INBOXES: u8 = b'Q';
const CHANGELOG_MAGIC: u8 = 0xC1;
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
    last_record: Instant,
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
    exchange_next: BTreeMap<u32, i64>,
    changelog_buf: BTreeMap<u32, (u32, Vec<u8>)>,
    changelog_next: BTreeMap<u32, i64>,
    state_refs: BTreeMap<u32, StateRef>,
    user_wm: i64,
    /// The other workers' source watermark and whether any of them is active.
    remote: (i64, bool),
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
    last_commit: Instant,
    last_checkpoint: Instant,
    last_stats: Instant,
    rate_window: (Instant, u64, u64),
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
                        last_record: Instant::now(),
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
        admin.ensure_topic(
            &consumer,
            &topics.exchange,
            kgs as i32,
            k.replication_factor,
            &internal,
        )?;
        admin.ensure_topic(
            &consumer,
            &topics.changelog,
            kgs as i32,
            k.replication_factor,
            &internal,
        )?;
        admin.ensure_topic(
            &consumer,
            &topics.trending,
            1,
            k.replication_factor,
            &internal,
        )?;

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
                RestoreRequest::Savepoint { gen: sp.gen }
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
            exchange_next: BTreeMap::new(),
            changelog_buf: BTreeMap::new(),
            changelog_next: BTreeMap::new(),
            state_refs: BTreeMap::new(),
            user_wm: WM_MIN,
            remote: (WM_MIN, true),
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
            last_commit: Instant::now(),
            last_checkpoint: Instant::now(),
            last_stats: Instant::now(),
            rate_window: (Instant::now(), 0, 0),
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

    // ------------------------------------------------------------------ restore

    fn restore(
        &mut self,
        mode: StartMode,
        committed: &HashMap<(String, i32), (i64, String)>,
        metas: &BTreeMap<u32, ExchangeMeta>,
        savepoint: Option<(String, SavepointManifest)>,
    ) -> Result<HashMap<String, String>> {
        let gen = self.opts.generation;
        let workers = self.opts.workers;
        let kgs: Vec<u32> = self.range.clone().collect();
        let mut ends = BTreeMap::new();
        for kg in &kgs {
            let (lo, hi) = kafka::watermarks(&self.consumer, &self.topics.changelog, *kg as i32)?;
            let (xlo, _) = kafka::watermarks(&self.consumer, &self.topics.exchange, *kg as i32)?;
            ends.insert(*kg, (lo, hi, xlo));
        }
        let mut positions: HashMap<(String, i32), (i64, InputMeta)> = HashMap::new();
        for ((t, p), (o, m)) in committed {
            if *t != self.topics.exchange {
                positions.insert(
                    (t.clone(), *p),
                    (
                        *o,
                        if m.is_empty() {
                            InputMeta::default()
                        } else {
                            InputMeta::decode(m)?
                        },
                    ),
                );
            }
        }
        let mut inboxes: BTreeMap<u32, Inbox> = BTreeMap::new();
        let mut known = HashMap::new();
        let mut user_floor = WM_MIN;
        let mut item_wm = WM_MIN;
        let mut through = FastMap::default();
        match mode {
            StartMode::Fresh => {
                self.state = Some(StateManager::create(&self.state_dir)?);
                for kg in &kgs {
                    let (_, hi, xlo) = ends[kg];
                    inboxes.insert(*kg, Inbox::new(PartitionTable::new(gen, workers), WM_MIN));
                    self.exchange_next.insert(*kg, xlo);
                    self.changelog_next.insert(*kg, hi);
                    self.state_refs.insert(
                        *kg,
                        StateRef {
                            part: None,
                            changelog_offset: hi,
                            exchange_offset: xlo,
                            table_gen: gen,
                            table_senders: workers,
                        },
                    );
                }
            }
            StartMode::Committed => {
                // Parts named by the committed metadata, then the logs after them.
                let mut by_part: BTreeMap<Option<String>, Vec<u32>> = BTreeMap::new();
                for kg in &kgs {
                    by_part
                        .entry(metas[kg].state.part.clone())
                        .or_default()
                        .push(*kg);
                }
                let mut loaded = self.load_parts(&by_part, &mut known)?;
                for kg in &kgs {
                    let m = &metas[kg];
                    let mut inbox = loaded.remove(kg).unwrap_or_default();
                    if m.state.table_gen > inbox.table.gen {
                        inbox = Inbox::new(
                            PartitionTable::new(m.state.table_gen, m.state.table_senders),
                            inbox.floor,
                        );
                    }
                    inboxes.insert(*kg, inbox);
                    self.state_refs.insert(*kg, m.state.clone());
                    self.changelog_next.insert(*kg, ends[kg].1);
                }
                let resume_wm = inboxes.values().map(|i| i.floor).min().unwrap_or(WM_MIN);
                self.item.resume(resume_wm);
                self.receiver = Receiver::new(self.windowing, inboxes, resume_wm);
                inboxes = BTreeMap::new();
                self.replay_changelog(&kgs, |kg| metas[&kg].state.changelog_offset)?;
                let exchange_to: BTreeMap<u32, i64> = kgs
                    .iter()
                    .map(|kg| {
                        let c = committed
                            .get(&(self.topics.exchange.clone(), *kg as i32))
                            .map_or(metas[kg].state.exchange_offset, |(o, _)| *o);
                        (*kg, c)
                    })
                    .collect();
                self.replay_exchange(&kgs, |kg| metas[&kg].state.exchange_offset, &exchange_to)?;
                for kg in &kgs {
                    self.exchange_next.insert(*kg, exchange_to[kg]);
                }
                let refs: Vec<&ExchangeMeta> = metas.values().collect();
                (user_floor, item_wm) = protocol::restored_watermarks(&refs);
                for (kg, m) in metas {
                    through.insert(*kg, m.item_wm);
                }
            }
            StartMode::Savepoint => {
                let (dir, sp) = savepoint.expect("savepoint mode has a savepoint");
                let mut by_part: BTreeMap<Option<String>, Vec<u32>> = BTreeMap::new();
                let mut manifests = Vec::new();
                for p in &sp.parts {
                    let url = format!("{dir}/{p}");
                    let (_, m, _) = snapshot::read_part(&url, self.cfg.s3.as_ref())?;
                    let mine: Vec<u32> = (m.kg_start..m.kg_end)
                        .filter(|kg| self.range.contains(kg))
                        .collect();
                    if !mine.is_empty() {
                        by_part.insert(Some(url.clone()), mine);
                    }
                    for i in &m.inputs {
                        positions.insert((i.topic.clone(), i.partition), (i.offset, i.meta));
                    }
                    manifests.push((url, m));
                }
                let covered: BTreeSet<u32> = by_part.values().flatten().copied().collect();
                if covered.len() != kgs.len() {
                    return Err(Error::Config(format!(
                        "savepoint {} does not cover key groups {:?}",
                        sp.id, self.range
                    )));
                }
                let mut loaded = self.load_parts(&by_part, &mut known)?;
                for (url, m) in &manifests {
                    let mine: Vec<u32> = (m.kg_start..m.kg_end)
                        .filter(|kg| self.range.contains(kg))
                        .collect();
                    if mine.is_empty() {
                        continue;
                    }
                    user_floor = user_floor.max(m.user_wm);
                    for kg in mine {
                        let g = &m.groups[&kg];
                        let old = loaded.remove(&kg).unwrap_or_default();
                        // A new generation: the savepoint's senders are done, their queued
                        // entries still apply; frames of older generations are skipped.
                        let mut inbox = Inbox::new(PartitionTable::new(gen, workers), m.item_wm);
                        inbox.adopt_queues(old);
                        inboxes.insert(kg, inbox);
                        through.insert(kg, m.item_wm);
                        self.exchange_next.insert(kg, g.exchange_offset);
                        let hi = ends[&kg].1;
                        self.changelog_next.insert(kg, hi);
                        self.state_refs.insert(
                            kg,
                            StateRef {
                                part: Some(url.clone()),
                                changelog_offset: hi,
                                exchange_offset: g.exchange_offset,
                                table_gen: gen,
                                table_senders: workers,
                            },
                        );
                    }
                }
                item_wm = through.values().copied().min().unwrap_or(WM_MIN);
            }
        }
        if !inboxes.is_empty() {
            self.item.resume(item_wm);
            self.receiver = Receiver::new(self.windowing, inboxes, item_wm);
        } else {
            // Committed: floors move up to what was committed.
            self.receiver.raise_floors(&through);
        }
        // Item watermark: advance to what the restored tables allow (outputs of windows
        // emitted before the crash are discarded, the state effects are kept).
        let mut ds = Vec::new();
        self.receiver.advance(&mut ds);
        for d in ds {
            self.deliver(d, true)?;
        }
        self.out = ItemOutput::default();
        let wm = self.receiver.watermark();
        through.retain(|_, t| *t > wm);
        self.item.set_emitted_through(EmittedThrough {
            key_groups: self.cfg.key_groups,
            through,
        });
        self.last_through = self
            .windowing
            .epoch(wm)
            .saturating_mul(self.windowing.slide);

        // Inputs: committed (or savepoint) positions, else the start policy.
        let start = match &self.cfg.source {
            SourceConfig::Kafka(k) => k.start_offsets,
            _ => unreachable!("checked at start"),
        };
        for (i, inp) in self.inputs.iter_mut().enumerate() {
            match positions.get(&(inp.name.clone(), inp.partition)) {
                Some((o, m)) => {
                    inp.next = *o;
                    if let Some(ts) = m.max_ts {
                        self.tracker.observe(i as u32, ts);
                    }
                    if m.idle {
                        self.tracker.set_idle(i as u32, true);
                    }
                }
                None => {
                    let (lo, hi) = kafka::watermarks(&self.consumer, &inp.name, inp.partition)?;
                    inp.next = match start {
                        StartOffsets::Earliest => lo,
                        StartOffsets::Latest => hi,
                    };
                }
            }
        }
        self.user_wm = user_floor;
        self.refresh_remote();
        self.metrics.users.store(self.user.users() as u64, Relaxed);
        self.metrics
            .pane_entries
            .store(self.item.pane_entries() as u64, Relaxed);
        Ok(known)
    }

    fn state(&mut self) -> &mut StateManager {
        self.state.as_mut().expect("the restore opens the state")
    }

    fn uploader(&self) -> &Uploader {
        self.uploader.as_ref().expect("started after the restore")
    }

    /// Build local state from parts (URL → key groups to take from it; `None`: empty).
    fn load_parts(
        &mut self,
        by_part: &BTreeMap<Option<String>, Vec<u32>>,
        known: &mut HashMap<String, String>,
    ) -> Result<BTreeMap<u32, Inbox>> {
        let state_dir = self.state_dir.clone();
        self.state = None; // closes a database opened by an earlier attempt
        let parts: Vec<(&String, &Vec<u32>)> = by_part
            .iter()
            .filter_map(|(u, k)| u.as_ref().map(|u| (u, k)))
            .collect();
        // One part holding exactly this worker's key groups: take its files as they are.
        let fast = match parts.as_slice() {
            [(url, kgs)] => {
                let (loc, m, base) = snapshot::read_part(url, self.cfg.s3.as_ref())?;
                if m.kg_start == self.range.start
                    && m.kg_end == self.range.end
                    && kgs.len() == self.range.len()
                {
                    let reuse = !m.self_contained
                        && url.starts_with(&self.checkpoint_url_prefix)
                        && m.worker == self.opts.index;
                    let state = StateManager::restore_files(
                        &state_dir,
                        loc.store.as_ref(),
                        &base,
                        &m.files,
                        reuse,
                    )?;
                    if reuse {
                        *known = state.known_files().clone();
                    }
                    self.state = Some(state);
                    true
                } else {
                    false
                }
            }
            _ => false,
        };
        if !fast {
            self.state = Some(StateManager::create(&state_dir)?);
            for (url, kgs) in &parts {
                let (loc, m, base): (Located, PartManifest, String) =
                    snapshot::read_part(url, self.cfg.s3.as_ref())?;
                let tmp = self.scratch.join(format!("part-{}-{}", m.worker, m.seq));
                let _ = std::fs::remove_dir_all(&tmp);
                snapshot::download_part(&loc, &base, &m.files, &tmp)?;
                let want: BTreeSet<u32> = kgs.iter().copied().collect();
                let n = self.state().ingest_from(&tmp, |kg| want.contains(&kg))?;
                tracing::info!(part = %url, keys = n, "loaded key groups from a part");
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        // Route the state to the stages.
        let mut inboxes = BTreeMap::new();
        let user = &mut self.user;
        let item = &mut self.item;
        let state = self.state.as_ref().expect("opened above");
        state.for_each(|key, value| {
            let (kg, tag, rest) = codec::split_key(key)?;
            match tag {
                t if t == HISTORIES.tag => user.restore(kg, rest, value),
                t if t == PANES.tag => item.restore(kg, rest, value),
                INBOXES => {
                    inboxes.insert(kg, Inbox::decode(value)?);
                    Ok(())
                }
                other => Err(Error::CorruptState(format!("unknown state tag {other}"))),
            }
        })?;
        Ok(inboxes)
    }

    /// Replay history appends from the changelog (to its end) into the user stage.
    fn replay_changelog(&mut self, kgs: &[u32], from: impl Fn(u32) -> i64) -> Result<()> {
        let started = Instant::now();
        let mut n = 0u64;
        let topic = self.topics.changelog.clone();
        let ranges: Vec<(u32, i64, i64)> = kgs
            .iter()
            .map(|kg| (*kg, from(*kg), self.changelog_next[kg]))
            .collect();
        let user = &mut self.user;
        read_ranges(&self.cfg, &self.topics, &topic, &ranges, |kg, payload| {
            n += decode_changelog(payload, |user_id, entry| {
                user.replay_append(kg, user_id, entry);
            })?;
            Ok(())
        })?;
        tracing::info!(
            appends = n,
            ms = started.elapsed().as_millis() as u64,
            "changelog replayed"
        );
        Ok(())
    }

    /// Replay the exchange between the parts' offsets and the committed ones into the item
    /// stage (through the receiver, so alignment is the same as the first time).
    fn replay_exchange(
        &mut self,
        kgs: &[u32],
        from: impl Fn(u32) -> i64,
        to: &BTreeMap<u32, i64>,
    ) -> Result<()> {
        let started = Instant::now();
        let topic = self.topics.exchange.clone();
        let ranges: Vec<(u32, i64, i64)> = kgs.iter().map(|kg| (*kg, from(*kg), to[kg])).collect();
        let mut frames = Vec::new();
        read_ranges(&self.cfg, &self.topics, &topic, &ranges, |kg, payload| {
            frames.push((kg, wire::decode_frame(payload)?));
            Ok(())
        })?;
        let n = frames.len();
        let mut ds = Vec::new();
        for (kg, (from, entries)) in frames {
            self.receiver.push(kg, from, entries, &mut ds);
            for d in ds.drain(..) {
                self.deliver(d, true)?;
            }
        }
        self.out = ItemOutput::default();
        tracing::info!(
            frames = n,
            ms = started.elapsed().as_millis() as u64,
            "exchange replayed"
        );
        Ok(())
    }

    /// Read the trending topic's recent tail into the board.
    fn read_trending(&mut self) -> Result<()> {
        let (lo, hi) = kafka::watermarks(&self.consumer, &self.topics.trending, 0)?;
        let from = lo.max(hi - TRENDING_TAIL);
        let topic = self.topics.trending.clone();
        let board = &mut self.board;
        read_ranges(
            &self.cfg,
            &self.topics,
            &topic,
            &[(0, from, hi)],
            |_, payload| {
                if let Ok(c) = serde_json::from_slice::<Contribution>(payload) {
                    board.apply(c);
                }
                Ok(())
            },
        )?;
        self.trending_next = hi;
        Ok(())
    }

    fn assign(&mut self) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        for inp in &self.inputs {
            tpl.add_partition_offset(&inp.name, inp.partition, Offset::Offset(inp.next))
                .map_err(|e| kafka::kafka_error("assign", e))?;
        }
        for (kg, next) in &self.exchange_next {
            tpl.add_partition_offset(&self.topics.exchange, *kg as i32, Offset::Offset(*next))
                .map_err(|e| kafka::kafka_error("assign", e))?;
        }
        tpl.add_partition_offset(&self.topics.trending, 0, Offset::Offset(self.trending_next))
            .map_err(|e| kafka::kafka_error("assign", e))?;
        self.consumer
            .assign(&tpl)
            .map_err(|e| kafka::kafka_error("assign", e))
    }
}

/// Read `(key group = partition, from, to)` ranges of one topic with a read_committed
/// consumer of its own; `to` is exclusive. Records of aborted transactions and control
/// records are skipped by Kafka, so a range may deliver fewer records than `to − from`.
fn read_ranges(
    cfg: &JobConfig,
    topics: &Topics,
    topic: &str,
    ranges: &[(u32, i64, i64)],
    mut f: impl FnMut(u32, &[u8]) -> Result<()>,
) -> Result<()> {
    let mut open: BTreeMap<i32, (u32, i64)> = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for (kg, from, to) in ranges {
        if from < to {
            open.insert(*kg as i32, (*kg, *to));
            tpl.add_partition_offset(topic, *kg as i32, Offset::Offset(*from))
                .map_err(|e| kafka::kafka_error("replay assign", e))?;
        }
    }
    if open.is_empty() {
        return Ok(());
    }
    let consumer = kafka::consumer(cfg, topics, true)?;
    consumer
        .assign(&tpl)
        .map_err(|e| kafka::kafka_error("replay assign", e))?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while !open.is_empty() {
        if Instant::now() > deadline {
            return Err(Error::Kafka(format!(
                "replaying {topic}: partitions {:?} did not reach their end",
                open.keys().collect::<Vec<_>>()
            )));
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {
                // Control records at the end of a range are not delivered: a partition
                // whose position reached its end is done.
                let pos = consumer
                    .position()
                    .map_err(|e| kafka::kafka_error("replay position", e))?;
                for e in pos.elements_for_topic(topic) {
                    if let Offset::Offset(o) = e.offset() {
                        if open.get(&e.partition()).is_some_and(|(_, to)| o >= *to) {
                            open.remove(&e.partition());
                        }
                    }
                }
            }
            Some(Err(e)) => {
                if let Some(p) = kafka::partition_eof(&e) {
                    open.remove(&p);
                } else {
                    tracing::warn!(topic, error = %e, "replay poll");
                }
            }
            Some(Ok(m)) => {
                let p = m.partition();
                let Some((kg, to)) = open.get(&p).copied() else {
                    continue;
                };
                if m.offset() >= to {
                    open.remove(&p);
                    continue;
                }
                f(kg, m.payload().unwrap_or_default())?;
                if m.offset() + 1 >= to {
                    open.remove(&p);
                }
            }
        }
    }
    Ok(())
}

/// A changelog record: the history appends of one key group in one commit.
fn encode_changelog_entry(buf: &mut Vec<u8>, user: &str, e: &HistEntry) {
    put_str(buf, user);
    put_str(buf, &e.item);
    put_u32(buf, e.item_kg);
    put_i64(buf, e.ts);
    buf.push(e.kind.as_u8());
}

fn decode_changelog(payload: &[u8], mut f: impl FnMut(&str, HistEntry)) -> Result<u64> {
    let mut r = Reader::new(payload);
    if r.u8()? != CHANGELOG_MAGIC {
        return Err(Error::CorruptState("not a Riffle changelog record".into()));
    }
    let n = r.u32()?;
    for _ in 0..n {
        let user = r.str()?;
        let entry = HistEntry {
            item: Key::from(r.str()?),
            item_kg: r.u32()?,
            ts: r.i64()?,
            kind: EventType::from_u8(r.u8()?)
                .ok_or_else(|| Error::CorruptState("bad event type in changelog".into()))?,
        };
        f(user, entry);
    }
    Ok(u64::from(n))
}

impl Worker {
    // ------------------------------------------------------------------ the loop

    /// Run until the process is stopped (or a Kafka failure needs a restart).
    pub fn run(&mut self) -> Result<()> {
        let mut batch: Vec<Polled> = Vec::with_capacity(self.cfg.max_batch_size);
        loop {
            self.serve_control()?;
            // Poll: wait for data, but not past the next commit.
            let wait = self
                .cfg
                .commit_interval
                .as_std()
                .saturating_sub(self.last_commit.elapsed())
                .clamp(Duration::from_millis(1), Duration::from_millis(50));
            batch.clear();
            let mut timeout = wait;
            while batch.len() < self.cfg.max_batch_size {
                match self.consumer.poll(timeout) {
                    None => break,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "poll");
                        break;
                    }
                    Some(Ok(m)) => batch.push(Polled {
                        topic: m.topic().to_string(),
                        partition: m.partition(),
                        offset: m.offset(),
                        payload: m.payload().map(<[u8]>::to_vec),
                    }),
                }
                timeout = Duration::ZERO;
            }
            let busy_from = Instant::now();
            if !batch.is_empty() {
                self.validation = Validation::at_now(self.cfg.dataflow.max_future_skew.0);
                for m in batch.drain(..) {
                    self.handle(m)?;
                }
            }
            self.check_idle();
            self.advance()?;
            self.progress_savepoint()?;
            let commit_due = self.last_commit.elapsed() >= self.cfg.commit_interval.as_std();
            if commit_due && self.dirty {
                self.commit()?;
                self.maybe_checkpoint()?;
            }
            self.serve_uploads()?;
            self.metrics
                .busy_nanos
                .fetch_add(busy_from.elapsed().as_nanos() as u64, Relaxed);
            self.update_metrics();
        }
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
            self.on_input(i, m.offset, m.payload.as_deref())?;
        }
        Ok(())
    }

    fn on_input(&mut self, i: usize, offset: i64, payload: Option<&[u8]>) -> Result<()> {
        self.dirty = true;
        let inp = &mut self.inputs[i];
        inp.next = offset + 1;
        inp.last_record = Instant::now();
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
        let late = self.user.process(&stamped, kg, &mut self.sender);
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
        encode_changelog_entry(
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
                    for (other, w) in others {
                        self.item.apply(kg, p.pane, item, Some(other), *w);
                    }
                }
            }
            Delivery::Item(kg, Entry::Request(r)) => {
                self.item.request(*r, kg, &mut self.out);
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
                self.item.advance(wm, &mut self.out);
                if replay {
                    self.out = ItemOutput::default();
                } else {
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
        for p in &mut out.recs {
            self.board
                .fill(&mut p.rec.items, k, &p.excluded, p.wm, lateness);
            let value = serde_json::to_vec(&p.rec)?;
            let topic = self.sink.recommendations.clone();
            self.produce(
                BaseRecord::to(&topic)
                    .key(p.rec.user_id.as_bytes())
                    .payload(value.as_slice()),
            )?;
        }
        if let Some(topic) = self.sink.item_stats.clone() {
            for s in &out.stats {
                let value = serde_json::to_vec(s)?;
                self.produce(
                    BaseRecord::to(&topic)
                        .key(s.item_id.as_bytes())
                        .payload(value.as_slice()),
                )?;
            }
        }
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
        if !out.recs.is_empty() || !out.stats.is_empty() || self.contribution.is_some() {
            self.dirty = true; // outputs wait in the open transaction for the next commit
        }
        let m = &self.metrics;
        m.recommendations_out
            .fetch_add(out.recs.len() as u64, Relaxed);
        m.item_stats_out.fetch_add(out.stats.len() as u64, Relaxed);
        m.windows_emitted.fetch_add(out.windows_emitted, Relaxed);
        out.recs.clear();
        out.stats.clear();
        out.windows_emitted = 0;
        self.out = out;
        Ok(())
    }

    /// Produce a record into the open transaction, waiting while the queue is full.
    fn produce(&self, mut record: BaseRecord<'_, [u8], [u8]>) -> Result<()> {
        loop {
            match self.producer.send(record) {
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
        let (remote, remote_active) = self.remote;
        let local_active = self.local_active();
        let candidate = match (local_active, remote_active) {
            (true, true) => self.tracker.current().min(remote),
            (true, false) => self.tracker.current(),
            (false, true) => remote,
            // Every source of the job is idle: hold.
            (false, false) => return,
        };
        self.user_wm = self.user_wm.max(candidate);
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

    fn check_idle(&mut self) {
        let timeout = self.cfg.dataflow.idle_timeout.as_std();
        let mut changed = false;
        for (i, inp) in self.inputs.iter().enumerate() {
            if !self.tracker.partitions()[i].idle && inp.last_record.elapsed() >= timeout {
                self.tracker.set_idle(i as u32, true);
                changed = true;
            }
        }
        if changed {
            self.recompute_user_wm();
            self.dirty = true;
        }
    }

    // ------------------------------------------------------------------ commit

    fn commit(&mut self) -> Result<()> {
        let started = Instant::now();
        self.send_marker_if_changed();
        let sender = Sender {
            gen: self.opts.generation,
            index: self.opts.index,
            senders: self.opts.workers,
        };
        let exchange = self.topics.exchange.clone();
        for (kg, entries) in self.sender.take_frames() {
            for value in wire::encode_frames(sender, &entries, MAX_RECORD_BYTES) {
                self.produce(
                    BaseRecord::to(&exchange)
                        .partition(kg as i32)
                        .payload(value.as_slice()),
                )?;
            }
        }
        let kgs: Vec<u32> = self.changelog_buf.keys().copied().collect();
        for kg in kgs {
            self.flush_changelog(kg)?;
        }
        if let Some(c) = self.contribution.take() {
            let value = serde_json::to_vec(&c)?;
            let trending = self.topics.trending.clone();
            self.produce(
                BaseRecord::to(&trending)
                    .partition(0)
                    .payload(value.as_slice()),
            )?;
        }
        let offsets = self.offsets()?;
        let cgm = self
            .consumer
            .group_metadata()
            .ok_or_else(|| Error::Kafka("consumer has no group metadata".into()))?;
        self.finish_transaction(|p| p.send_offsets_to_transaction(&offsets, &cgm, CALL_TIMEOUT))?;
        self.finish_transaction(|p| p.commit_transaction(CALL_TIMEOUT))?;
        {
            let mut d = self.deliveries.lock().expect("deliveries lock");
            if let Some(f) = d.failed.take() {
                // Cannot happen after a successful commit; be loud if it does.
                tracing::error!(error = %f, "delivery failure reported after commit");
            }
            for (p, next) in d.changelog_next.drain() {
                self.changelog_next.insert(p as u32, next);
            }
        }
        kafka::retry("begin_transaction", || self.producer.begin_transaction())?;
        self.dirty = false;
        self.last_commit = Instant::now();
        let m = &self.metrics;
        m.commits_completed.fetch_add(1, Relaxed);
        m.commit_duration_ms
            .store(started.elapsed().as_millis() as u64, Relaxed);
        m.watermark.store(self.receiver.watermark(), Relaxed);
        if let Some(t) = self.tracker.max_event_time() {
            m.max_event_time.store(t, Relaxed);
        }
        if self.gc_after_commit {
            self.gc_after_commit = false;
            self.collect_garbage()?;
        }
        Ok(())
    }

    /// Produce a key group's pending history appends as one changelog record.
    fn flush_changelog(&mut self, kg: u32) -> Result<()> {
        let Some((n, buf)) = self.changelog_buf.remove(&kg) else {
            return Ok(());
        };
        let mut value = Vec::with_capacity(buf.len() + 5);
        value.push(CHANGELOG_MAGIC);
        put_u32(&mut value, n);
        value.extend_from_slice(&buf);
        let changelog = self.topics.changelog.clone();
        self.produce(
            BaseRecord::to(&changelog)
                .partition(kg as i32)
                .payload(value.as_slice()),
        )
    }

    /// Run a transactional call, retrying what is retriable; an abortable failure aborts the
    /// transaction and rewinds the worker to the last committed state.
    fn finish_transaction(
        &self,
        f: impl Fn(&TxnProducer) -> rdkafka::error::KafkaResult<()>,
    ) -> Result<()> {
        let deadline = Instant::now()
            + self
                .cfg
                .kafka
                .as_ref()
                .expect("validated")
                .transaction_timeout
                .as_std();
        let mut pause = Duration::from_millis(50);
        loop {
            match f(&self.producer) {
                Ok(()) => return Ok(()),
                Err(e) => match kafka::classify(&e) {
                    kafka::Failure::Retriable(m) if Instant::now() < deadline => {
                        tracing::warn!(error = %m, "transaction call failed; retrying");
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                    kafka::Failure::Retriable(m) | kafka::Failure::Abortable(m) => {
                        let _ = kafka::retry("abort_transaction", || {
                            self.producer.abort_transaction(CALL_TIMEOUT)
                        });
                        return Err(Error::Rewind(m));
                    }
                    kafka::Failure::Fatal(m) => return Err(Error::Kafka(m)),
                },
            }
        }
    }

    /// The offsets (and metadata) of every owned input and exchange partition.
    fn offsets(&self) -> Result<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for (i, inp) in self.inputs.iter().enumerate() {
            let p = &self.tracker.partitions()[i];
            let meta = InputMeta {
                max_ts: p.max_ts,
                idle: p.idle,
            };
            tpl.add_partition_offset(&inp.name, inp.partition, Offset::Offset(inp.next))
                .map_err(|e| kafka::kafka_error("offsets", e))?;
            tpl.find_partition(&inp.name, inp.partition)
                .expect("just added")
                .set_metadata(meta.encode());
        }
        let item_wm = self.receiver.watermark();
        for (kg, next) in &self.exchange_next {
            let inbox = &self.receiver.inboxes()[kg];
            let meta = ExchangeMeta {
                gen: self.opts.generation,
                workers: self.opts.workers,
                item_wm,
                user_floor: self.user_wm,
                table: inbox.table.clone(),
                state: self.state_refs[kg].clone(),
            };
            tpl.add_partition_offset(&self.topics.exchange, *kg as i32, Offset::Offset(*next))
                .map_err(|e| kafka::kafka_error("offsets", e))?;
            tpl.find_partition(&self.topics.exchange, *kg as i32)
                .expect("just added")
                .set_metadata(meta.encode()?);
        }
        Ok(tpl)
    }

    // ------------------------------------------------------------------ snapshots

    fn maybe_checkpoint(&mut self) -> Result<()> {
        if self.savepoint.is_none()
            && !self.uploader().busy()
            && self.last_checkpoint.elapsed() >= self.cfg.checkpoint_interval.as_std()
        {
            self.snapshot(None)?;
        }
        Ok(())
    }

    /// Cut a part at this commit boundary and hand it to the uploader.
    fn snapshot(&mut self, savepoint: Option<String>) -> Result<()> {
        let mut ops = Vec::new();
        self.user.expire(self.user_wm);
        self.user.snapshot(&mut ops);
        self.item.snapshot(self.range.clone(), &mut ops);
        for (kg, inbox) in self.receiver.inboxes() {
            ops.push(StateOp::Put(
                codec::state_key(*kg, INBOXES, &[]),
                inbox.encode(),
            ));
        }
        self.state().apply(ops)?;
        self.part_seq += 1;
        let name = format!("part-{}", self.part_seq);
        let local = self.state().cut(&name)?;
        let groups = self
            .range
            .clone()
            .map(|kg| {
                (
                    kg,
                    GroupPosition {
                        changelog_offset: self.changelog_next[&kg],
                        exchange_offset: self.exchange_next[&kg],
                    },
                )
            })
            .collect();
        let inputs = self
            .inputs
            .iter()
            .enumerate()
            .map(|(i, inp)| InputPosition {
                topic: inp.name.clone(),
                partition: inp.partition,
                offset: inp.next,
                meta: InputMeta {
                    max_ts: self.tracker.partitions()[i].max_ts,
                    idle: self.tracker.partitions()[i].idle,
                },
            })
            .collect();
        let manifest = PartManifest {
            job: self.cfg.name.clone(),
            gen: self.opts.generation,
            worker: self.opts.index,
            workers: self.opts.workers,
            seq: self.part_seq,
            key_groups: self.cfg.key_groups,
            kg_start: self.range.start,
            kg_end: self.range.end,
            created_at_ms: now_ms(),
            self_contained: false,
            savepoint: savepoint.clone(),
            files: Vec::new(),
            groups,
            inputs,
            item_wm: self.receiver.watermark(),
            user_wm: self.user_wm,
            events_in: self.metrics.events_in.load(Relaxed),
        };
        self.uploader().submit(UploadJob::Part {
            local,
            manifest: Box::new(manifest),
            savepoint,
        });
        self.metrics.upload_in_progress.store(true, Relaxed);
        self.last_checkpoint = Instant::now();
        self.metrics.users.store(self.user.users() as u64, Relaxed);
        self.metrics
            .pane_entries
            .store(self.item.pane_entries() as u64, Relaxed);
        Ok(())
    }

    fn serve_uploads(&mut self) -> Result<()> {
        while let Ok(done) = self.uploader().done.try_recv() {
            match done {
                UploadDone::Part {
                    url,
                    manifest,
                    stats,
                    savepoint_part,
                } => {
                    for (kg, g) in &manifest.groups {
                        self.state_refs.insert(
                            *kg,
                            StateRef {
                                part: Some(url.clone()),
                                changelog_offset: g.changelog_offset,
                                exchange_offset: g.exchange_offset,
                                table_gen: 0,
                                table_senders: 0,
                            },
                        );
                    }
                    self.dirty = true;
                    self.gc_after_commit = true;
                    let m = &self.metrics;
                    m.upload_in_progress.store(false, Relaxed);
                    m.checkpoints_completed.fetch_add(1, Relaxed);
                    m.checkpoint_last_id.store(manifest.seq, Relaxed);
                    m.checkpoint_duration_ms.store(stats.duration_ms, Relaxed);
                    m.checkpoint_uploaded_bytes
                        .store(stats.uploaded_bytes, Relaxed);
                    m.checkpoint_size_bytes.store(stats.total_bytes, Relaxed);
                    tracing::info!(part = %url, uploaded_bytes = stats.uploaded_bytes, size_bytes = stats.total_bytes, duration_ms = stats.duration_ms, "checkpoint part uploaded");
                    if let Some(sp) = savepoint_part {
                        self.finish_savepoint(sp)?;
                    }
                }
                UploadDone::Gc(r) => match r {
                    Ok(s) => tracing::debug!(parts = s.parts, files = s.files, "garbage collected"),
                    Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
                },
            }
        }
        Ok(())
    }

    /// After a commit that moved this worker's pointers to a new part: delete what no
    /// committed metadata needs, and truncate the internal topics below the pointers.
    fn collect_garbage(&mut self) -> Result<()> {
        let all: Vec<(String, i32)> = (0..self.cfg.key_groups)
            .map(|kg| (self.topics.exchange.clone(), kg as i32))
            .collect();
        // Without waiting for the other workers' open transactions: a part they are about to
        // name is their newest, which collection keeps anyway.
        let committed = kafka::committed(&self.metadata_consumer, &all)?;
        let mut referenced = BTreeSet::new();
        let mut max_workers = self.opts.workers;
        for (_, meta) in committed.values() {
            if let Ok(m) = ExchangeMeta::decode(meta) {
                max_workers = max_workers.max(m.workers);
                if let Some(dir) = m
                    .state
                    .part
                    .as_deref()
                    .and_then(|u| u.strip_prefix(&self.checkpoint_url_prefix))
                    .and_then(|k| {
                        k.trim_start_matches('/')
                            .strip_suffix(&format!("/{PART_MANIFEST}"))
                    })
                {
                    referenced.insert(dir.to_string());
                }
            }
        }
        let mut scope: BTreeSet<u32> = [self.opts.index].into();
        if self.opts.index == 0 {
            // Worker 0 also collects for indexes an earlier, larger generation used.
            scope.extend(self.opts.workers..max_workers.max(self.opts.workers).saturating_add(64));
        }
        self.uploader().submit(UploadJob::Gc {
            scope,
            current: (0..self.opts.workers).collect(),
            referenced,
        });
        let mut tpl = TopicPartitionList::new();
        for (kg, r) in &self.state_refs {
            if r.part.is_some() {
                tpl.add_partition_offset(
                    &self.topics.changelog,
                    *kg as i32,
                    Offset::Offset(r.changelog_offset),
                )
                .map_err(|e| kafka::kafka_error("truncate", e))?;
                tpl.add_partition_offset(
                    &self.topics.exchange,
                    *kg as i32,
                    Offset::Offset(r.exchange_offset),
                )
                .map_err(|e| kafka::kafka_error("truncate", e))?;
            }
        }
        if tpl.count() > 0 {
            self.admin.delete_records(&tpl)?;
        }
        Ok(())
    }

    // ------------------------------------------------------------------ savepoints

    fn serve_control(&mut self) -> Result<()> {
        let Some(rx) = &self.control else {
            return Ok(());
        };
        let requests: Vec<WorkerControl> = rx.try_iter().collect();
        for WorkerControl::Savepoint { id, stop, reply } in requests {
            if self.metrics.stopped.load(Relaxed) {
                let _ = reply.send(Err("the job is stopped".into()));
                continue;
            }
            let id = id.unwrap_or_else(|| format!("sp-{}", now_ms()));
            if let Err(e) = check_savepoint_id(&id) {
                let _ = reply.send(Err(e.to_string()));
                continue;
            }
            match &mut self.savepoint {
                Some(run) if run.id == id => {
                    run.initiator = true;
                    run.replies.push(reply);
                }
                Some(run) => {
                    let _ = reply.send(Err(format!(
                        "savepoint {} is in progress; try again when it is done",
                        run.id
                    )));
                }
                None => self.start_savepoint(id, stop, true, Some(reply))?,
            }
        }
        Ok(())
    }

    fn input_tpl(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for inp in &self.inputs {
            tpl.add_partition(&inp.name, inp.partition);
        }
        tpl
    }

    fn start_savepoint(
        &mut self,
        id: String,
        stop: bool,
        initiator: bool,
        reply: Option<crossbeam_channel::Sender<std::result::Result<SavepointInfo, String>>>,
    ) -> Result<()> {
        tracing::info!(savepoint = %id, stop, initiator, "savepoint: pausing inputs");
        if !self.inputs.is_empty() {
            self.consumer
                .pause(&self.input_tpl())
                .map_err(|e| kafka::kafka_error("pause", e))?;
        }
        self.paused = true;
        self.send_marker();
        self.sender.barrier(Barrier {
            id: id.clone(),
            phase: 1,
            stop,
        });
        self.savepoint = Some(SavepointRun {
            id,
            stop,
            initiator,
            phase: 1,
            started: Instant::now(),
            replies: reply.into_iter().collect(),
        });
        self.dirty = true;
        self.commit()
    }

    fn progress_savepoint(&mut self) -> Result<()> {
        if let Some((id, stop)) = self.join.take() {
            if self.savepoint.is_none() && !self.paused {
                self.start_savepoint(id, stop, false, None)?;
            }
        }
        let gen = self.opts.generation;
        let Some(run) = &self.savepoint else {
            return Ok(());
        };
        let (id, phase, stop) = (run.id.clone(), run.phase, run.stop);
        if phase < 3 && run.started.elapsed() > SAVEPOINT_TIMEOUT {
            let msg = format!(
                "savepoint {id}: not every worker's barrier arrived within {}s",
                SAVEPOINT_TIMEOUT.as_secs()
            );
            tracing::warn!(savepoint = %id, "{msg}");
            self.end_savepoint(Err(msg), false)?;
            return Ok(());
        }
        if phase == 1 && self.receiver.barrier_complete(&id, 1, gen) {
            // Every forwarded event is in: close the item hop.
            self.sender.barrier(Barrier {
                id: id.clone(),
                phase: 2,
                stop,
            });
            self.set_phase(2);
            self.dirty = true;
            self.commit()?;
        } else if phase == 2 && self.receiver.barrier_complete(&id, 2, gen) {
            // Everything sent before the barriers is applied: the state is the savepoint.
            self.advance()?;
            self.dirty = true;
            self.commit()?;
            self.set_phase(3);
            self.snapshot(Some(id))?;
        }
        Ok(())
    }

    fn set_phase(&mut self, phase: u8) {
        if let Some(run) = &mut self.savepoint {
            run.phase = phase;
        }
    }

    fn finish_savepoint(&mut self, part: std::result::Result<String, String>) -> Result<()> {
        let Some(run) = &self.savepoint else {
            return Ok(());
        };
        let part = match part {
            Ok(p) => p,
            Err(e) => return self.end_savepoint(Err(e), false),
        };
        let dir = format!(
            "{}/{}",
            self.savepoint_store_url.trim_end_matches('/'),
            run.id
        );
        let info = SavepointInfo {
            id: run.id.clone(),
            location: dir.clone(),
            part,
            stop: run.stop,
            duration_ms: run.started.elapsed().as_millis() as u64,
        };
        let stop = run.stop;
        if run.initiator {
            // Write the job-wide manifest once every worker's part is in, off this thread.
            let manifest = SavepointManifest {
                id: run.id.clone(),
                job: self.cfg.name.clone(),
                gen: self.opts.generation,
                workers: self.opts.workers,
                key_groups: self.cfg.key_groups,
                created_at_ms: now_ms(),
                parts: (0..self.opts.workers)
                    .map(|w| format!("w{w:04}/{PART_MANIFEST}"))
                    .collect(),
                stop,
            };
            let replies = self
                .savepoint
                .as_mut()
                .map(|r| std::mem::take(&mut r.replies))
                .unwrap_or_default();
            let store_url = self.savepoint_store_url.clone();
            let s3 = self.cfg.s3.clone();
            let answer = info.clone();
            std::thread::spawn(move || {
                let r = write_savepoint_manifest(&store_url, s3.as_ref(), manifest)
                    .map(|_| answer)
                    .map_err(|e| e.to_string());
                for reply in replies {
                    let _ = reply.send(r.clone());
                }
            });
        }
        self.end_savepoint(Ok(Some(info)), stop)
    }

    /// Resume (or stay stopped) and answer whoever is still waiting.
    fn end_savepoint(
        &mut self,
        result: std::result::Result<Option<SavepointInfo>, String>,
        stop: bool,
    ) -> Result<()> {
        let Some(run) = self.savepoint.take() else {
            return Ok(());
        };
        if let Ok(Some(info)) = &result {
            *self.metrics.last_savepoint.lock().expect("metrics lock") =
                Some(info.location.clone());
        }
        for reply in run.replies {
            let _ = reply.send(match &result {
                Ok(Some(info)) => Ok(info.clone()),
                Ok(None) => Err("savepoint finished without a result".into()),
                Err(e) => Err(e.clone()),
            });
        }
        if stop && result.is_ok() {
            tracing::info!(savepoint = %run.id, "stopped with a savepoint; inputs stay paused");
            self.metrics.stopped.store(true, Relaxed);
            return Ok(());
        }
        if !self.inputs.is_empty() {
            self.consumer
                .resume(&self.input_tpl())
                .map_err(|e| kafka::kafka_error("resume", e))?;
            let mut at = TopicPartitionList::new();
            for inp in &self.inputs {
                at.add_partition_offset(&inp.name, inp.partition, Offset::Offset(inp.next))
                    .map_err(|e| kafka::kafka_error("seek", e))?;
            }
            self.consumer
                .seek_partitions(at, CALL_TIMEOUT)
                .map_err(|e| kafka::kafka_error("seek", e))?;
        }
        self.paused = false;
        // Idle timers restart: a pause is not silence.
        for inp in &mut self.inputs {
            inp.last_record = Instant::now();
        }
        Ok(())
    }

    // ------------------------------------------------------------------ metrics

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
        let stats = self
            .consumer
            .context()
            .partitions
            .lock()
            .expect("stats lock")
            .clone();
        let mut parts = Vec::new();
        let mut status = |topic: &str, partition: i32, position: i64| {
            let end = stats.get(&(topic.to_string(), partition)).map_or(-1, |s| {
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
                lag: if end >= 0 {
                    (end - position).max(0)
                } else {
                    -1
                },
            });
        };
        for inp in &self.inputs {
            status(&inp.name, inp.partition, inp.next);
        }
        for (kg, next) in &self.exchange_next {
            status(&self.topics.exchange, *kg as i32, *next);
        }
        *m.partitions.lock().expect("metrics lock") = parts;
    }
}

fn write_savepoint_manifest(
    store_url: &str,
    s3: Option<&crate::config::S3Config>,
    manifest: SavepointManifest,
) -> Result<()> {
    let store = objstore::open(store_url, s3)?;
    let deadline = Instant::now() + SAVEPOINT_TIMEOUT;
    for p in &manifest.parts {
        let key = format!("{}/{p}", manifest.id);
        loop {
            match store.get_bytes(&key) {
                Ok(_) => break,
                Err(e) if e.is_not_found() && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    return Err(Error::Checkpoint(format!(
                        "savepoint {}: part {p} missing: {e}",
                        manifest.id
                    )))
                }
            }
        }
    }
    store.put_bytes(
        &format!("{}/{SAVEPOINT_MANIFEST}", manifest.id),
        &serde_json::to_vec_pretty(&manifest)?,
    )?;
    Ok(())
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
