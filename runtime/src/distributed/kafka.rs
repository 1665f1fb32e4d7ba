//! The Kafka edge: client configuration (credentials from the environment), the job's
//! internal topics, the transactional producer and its error classes, consumers, and admin
//! operations. Nothing here decides anything about exactly-once; `protocol.rs` does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::JobConfig;
use crate::{Error, Result};

/// How long a single Kafka call may block before it counts as failed (retriable calls are
/// retried by the caller).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The job's internal topics and consumer group.
#[derive(Clone, Debug)]
pub struct Topics {
    /// By-user → by-item exchange (`keyGroups` partitions, partition = key group).
    pub exchange: String,
    /// History appends of the user stage (`keyGroups` partitions).
    pub changelog: String,
    /// Every worker's emitted-window tops (one partition).
    pub trending: String,
    /// The consumer group whose committed offsets are the job's positions.
    pub group: String,
}

impl Topics {
    pub fn for_job(cfg: &JobConfig) -> Self {
        let prefix = cfg.internal_topic_prefix();
        Self {
            exchange: format!("{prefix}-exchange"),
            changelog: format!("{prefix}-changelog"),
            trending: format!("{prefix}-trending"),
            group: prefix,
        }
    }

    /// The transactional id of a worker index: a restarted (or zombie) worker of the same
    /// index shares it, so the broker fences the older one.
    pub fn transactional_id(&self, worker: u32) -> String {
        format!("{}-{worker}", self.group)
    }
}

/// Read a credential from `NAME` or from the file `NAME_FILE`.
fn secret(name: &str) -> Result<Option<String>> {
    if let Ok(v) = std::env::var(name) {
        return Ok(Some(v));
    }
    let file_var = format!("{name}_FILE");
    match std::env::var(&file_var) {
        Ok(path) => std::fs::read_to_string(&path)
            .map(|s| Some(s.trim_end_matches(['\n', '\r']).to_string()))
            .map_err(|e| Error::Config(format!("{file_var}={path}: {e}"))),
        Err(_) => Ok(None),
    }
}

/// Settings every client of the job shares: brokers, security and credentials, and the
/// job's extra properties.
pub fn client_config(cfg: &JobConfig) -> Result<ClientConfig> {
    let k = cfg
        .kafka
        .as_ref()
        .ok_or_else(|| Error::Config("a distributed job needs a kafka section".into()))?;
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.bootstrap_servers)
        .set("security.protocol", k.security_protocol.as_librdkafka())
        .set("client.id", format!("riffle-{}", cfg.name));
    if let Some(m) = k.sasl_mechanism {
        c.set("sasl.mechanism", m.as_librdkafka());
        let user = secret("RIFFLE_KAFKA_SASL_USERNAME")?;
        let pass = secret("RIFFLE_KAFKA_SASL_PASSWORD")?;
        match (user, pass) {
            (Some(u), Some(p)) => {
                c.set("sasl.username", u).set("sasl.password", p);
            }
            _ => {
                return Err(Error::Config(
                    "kafka.saslMechanism is set: provide RIFFLE_KAFKA_SASL_USERNAME and \
                     RIFFLE_KAFKA_SASL_PASSWORD (or their _FILE variants)"
                        .into(),
                ))
            }
        }
    }
    for (key, value) in &k.properties {
        c.set(key, value);
    }
    Ok(c)
}

/// What the consumer's statistics last said of a partition.
#[derive(Clone, Copy, Debug)]
pub struct PartitionStats {
    pub hi_offset: i64,
    pub ls_offset: i64,
    /// The position of the application (next offset to deliver; past transaction markers).
    pub app_offset: i64,
    /// Being fetched from a leader the client is connected to: silence means no data, not
    /// an outage.
    pub readable: bool,
    pub at: Instant,
}

/// Consumer context that keeps the latest statistics per (topic, partition).
#[derive(Clone, Default)]
pub struct StatsContext {
    pub partitions: Arc<Mutex<HashMap<(String, i32), PartitionStats>>>,
}

impl ClientContext for StatsContext {
    fn error(&self, error: KafkaError, reason: &str) {
        // The end of a partition is how a replay knows it is done, not an error.
        let eof = match &error {
            KafkaError::PartitionEOF(_) => true,
            KafkaError::Global(code) => *code == RDKafkaErrorCode::PartitionEOF,
            _ => false,
        };
        if !eof {
            tracing::error!(%error, reason, "librdkafka");
        }
    }

    fn stats(&self, s: Statistics) {
        let at = Instant::now();
        // A leader is reachable when a real connection to its node is up. Logical brokers
        // (the group coordinator) share the node id but connect only on demand, so they say
        // nothing about fetching.
        let mut up: HashMap<i32, bool> = HashMap::new();
        for b in s.brokers.values().filter(|b| b.source != "logical") {
            *up.entry(b.nodeid).or_default() |= b.state == "UP";
        }
        let mut map = self.partitions.lock().expect("stats lock");
        for (topic, t) in s.topics {
            for (p, ps) in t.partitions {
                if p < 0 {
                    continue;
                }
                map.insert(
                    (topic.clone(), p),
                    PartitionStats {
                        hi_offset: ps.hi_offset,
                        ls_offset: ps.ls_offset,
                        app_offset: ps.app_offset,
                        readable: ps.fetch_state == "active"
                            && up.get(&ps.leader).copied().unwrap_or(false),
                        at,
                    },
                );
            }
        }
    }
}

impl ConsumerContext for StatsContext {}

impl PartitionStats {
    /// Statistics arrive every second; older than this, they say nothing about now.
    const FRESH: std::time::Duration = std::time::Duration::from_secs(3);

    /// Readable according to statistics that are still fresh.
    pub fn readable_now(&self) -> bool {
        self.readable && self.at.elapsed() < Self::FRESH
    }
}

impl StatsContext {
    /// The latest statistics of every partition.
    pub fn snapshot(&self) -> HashMap<(String, i32), PartitionStats> {
        self.partitions.lock().expect("stats lock").clone()
    }
}

pub type JobConsumer = BaseConsumer<StatsContext>;

/// A read_committed consumer of the job's group with manual offsets (partitions are
/// assigned statically; offsets are committed only through transactions).
pub fn consumer(cfg: &JobConfig, topics: &Topics, eof: bool) -> Result<JobConsumer> {
    let mut c = client_config(cfg)?;
    c.set("group.id", &topics.group)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", if eof { "true" } else { "false" })
        .set("auto.offset.reset", "earliest")
        // Latency: a fetch returns as soon as committed data is there; do not wait long
        // when there is none.
        .set("fetch.wait.max.ms", "20")
        .set("statistics.interval.ms", "1000");
    c.create_with_context(StatsContext::default())
        .map_err(|e| kafka_error("creating a consumer", e))
}

/// A consumer of the job's group that reads committed offsets without waiting for pending
/// transactional offset commits (`read_uncommitted` makes librdkafka not ask for stable
/// offsets): for decisions that must not block on other workers' open transactions.
pub fn metadata_consumer(cfg: &JobConfig, topics: &Topics) -> Result<JobConsumer> {
    let mut c = client_config(cfg)?;
    c.set("group.id", &topics.group)
        .set("isolation.level", "read_uncommitted")
        .set("enable.auto.commit", "false");
    c.create_with_context(StatsContext::default())
        .map_err(|e| kafka_error("creating a metadata consumer", e))
}

/// Offsets of the changelog records a producer delivered, per partition (the snapshot's
/// changelog positions), and the first delivery error of the open transaction.
#[derive(Default)]
pub struct Deliveries {
    pub changelog_next: HashMap<i32, i64>,
    pub failed: Option<String>,
}

pub struct TxnContext {
    changelog: String,
    pub deliveries: Arc<Mutex<Deliveries>>,
}

impl ClientContext for TxnContext {}

impl ProducerContext for TxnContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let mut d = self.deliveries.lock().expect("deliveries lock");
        match result {
            Ok(m) if m.topic() == self.changelog => {
                let next = d.changelog_next.entry(m.partition()).or_insert(0);
                *next = (*next).max(m.offset() + 1);
            }
            Ok(_) => {}
            Err((e, m)) => {
                d.failed.get_or_insert_with(|| {
                    format!("delivery to {}/{} failed: {e}", m.topic(), m.partition())
                });
            }
        }
    }
}

pub type TxnProducer = ThreadedProducer<TxnContext>;

/// The class of a Kafka failure decides what the worker does.
#[derive(Debug)]
pub enum Failure {
    /// Try the same call again (after a pause).
    Retriable(String),
    /// The transaction cannot commit: abort it and rewind to the last committed state.
    Abortable(String),
    /// The producer is unusable (fenced by a newer instance, or a fatal error): exit so the
    /// orchestrator restarts the worker, which then restores from the committed state.
    Fatal(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Retriable(m) => write!(f, "retriable Kafka error: {m}"),
            Self::Abortable(m) => write!(f, "abortable Kafka error: {m}"),
            Self::Fatal(m) => write!(f, "fatal Kafka error: {m}"),
        }
    }
}

pub fn classify(e: &KafkaError) -> Failure {
    match e {
        KafkaError::Transaction(t) => {
            let m = format!("{} ({})", t.string(), t.name());
            if t.is_fatal() {
                Failure::Fatal(m)
            } else if t.txn_requires_abort() {
                Failure::Abortable(m)
            } else if t.is_retriable() {
                Failure::Retriable(m)
            } else {
                Failure::Fatal(m)
            }
        }
        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
            Failure::Retriable("producer queue full".into())
        }
        other => Failure::Abortable(other.to_string()),
    }
}

pub fn transactional_producer(
    cfg: &JobConfig,
    topics: &Topics,
    worker: u32,
) -> Result<(TxnProducer, Arc<Mutex<Deliveries>>)> {
    let k = cfg.kafka.as_ref().expect("validated");
    let timeout = k.transaction_timeout.0.to_string();
    let mut c = client_config(cfg)?;
    c.set("transactional.id", topics.transactional_id(worker))
        .set("enable.idempotence", "true")
        .set("transaction.timeout.ms", &timeout)
        .set("message.timeout.ms", &timeout)
        // Keyed records go where Kafka's own clients put them.
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    let deliveries = Arc::new(Mutex::new(Deliveries::default()));
    let ctx = TxnContext {
        changelog: topics.changelog.clone(),
        deliveries: deliveries.clone(),
    };
    let p: TxnProducer = c
        .create_with_context(ctx)
        .map_err(|e| kafka_error("creating the transactional producer", e))?;
    retry("init_transactions", || p.init_transactions(CALL_TIMEOUT))?;
    Ok((p, deliveries))
}

/// Fence a transactional id: initialising a producer with it aborts whatever transaction an
/// earlier holder left open.
pub fn fence(cfg: &JobConfig, topics: &Topics, worker: u32) -> Result<()> {
    let k = cfg.kafka.as_ref().expect("validated");
    let mut c = client_config(cfg)?;
    c.set("transactional.id", topics.transactional_id(worker))
        .set(
            "transaction.timeout.ms",
            k.transaction_timeout.0.to_string(),
        );
    let p: rdkafka::producer::BaseProducer = c
        .create()
        .map_err(|e| kafka_error("creating a fencing producer", e))?;
    retry("init_transactions (fencing)", || {
        p.init_transactions(CALL_TIMEOUT)
    })?;
    tracing::info!(transactional_id = %topics.transactional_id(worker), "fenced");
    Ok(())
}

/// Run a transactional call, retrying retriable failures for up to two minutes.
pub fn retry<T>(what: &str, mut f: impl FnMut() -> rdkafka::error::KafkaResult<T>) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut pause = Duration::from_millis(100);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) => match classify(&e) {
                Failure::Retriable(m) if Instant::now() < deadline => {
                    tracing::warn!(call = what, error = %m, "retrying");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                other => return Err(Error::Kafka(format!("{what}: {other}"))),
            },
        }
    }
}

pub fn kafka_error(what: &str, e: KafkaError) -> Error {
    Error::Kafka(format!("{what}: {e}"))
}

/// Partition count of a topic (`None` if it does not exist).
pub fn partition_count(consumer: &JobConsumer, topic: &str) -> Result<Option<i32>> {
    let md = consumer
        .fetch_metadata(Some(topic), CALL_TIMEOUT)
        .map_err(|e| kafka_error(&format!("metadata of {topic}"), e))?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match t.error() {
        Some(e) if RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition => {
            Ok(None)
        }
        Some(e) => Err(Error::Kafka(format!(
            "metadata of {topic}: {}",
            RDKafkaErrorCode::from(e)
        ))),
        None if t.partitions().is_empty() => Ok(None),
        None => Ok(Some(t.partitions().len() as i32)),
    }
}

/// Admin operations, on a small private runtime (the worker thread is synchronous).
pub struct Admin {
    client: AdminClient<DefaultClientContext>,
    rt: tokio::runtime::Runtime,
}

impl Admin {
    pub fn new(cfg: &JobConfig) -> Result<Self> {
        let client = client_config(cfg)?
            .create()
            .map_err(|e| kafka_error("creating an admin client", e))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Kafka(format!("admin runtime: {e}")))?;
        Ok(Self { client, rt })
    }

    fn options() -> AdminOptions {
        AdminOptions::new()
            .operation_timeout(Some(CALL_TIMEOUT))
            .request_timeout(Some(CALL_TIMEOUT))
    }

    /// Create a topic unless it exists; an existing topic must have `partitions`.
    pub fn ensure_topic(
        &self,
        consumer: &JobConsumer,
        name: &str,
        partitions: i32,
        replication: i32,
        configs: &[(&str, String)],
    ) -> Result<()> {
        if let Some(n) = partition_count(consumer, name)? {
            return check_partitions(name, n, partitions);
        }
        let mut t = NewTopic::new(name, partitions, TopicReplication::Fixed(replication));
        for (k, v) in configs {
            t = t.set(k, v);
        }
        let results = self
            .rt
            .block_on(self.client.create_topics(&[t], &Self::options()))
            .map_err(|e| kafka_error(&format!("creating topic {name}"), e))?;
        for r in results {
            match r {
                Ok(_) => tracing::info!(topic = name, partitions, "created internal topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, e)) => return Err(Error::Kafka(format!("creating topic {t}: {e}"))),
            }
        }
        // Created now or concurrently by another worker: check what is there.
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            if let Some(n) = partition_count(consumer, name)? {
                return check_partitions(name, n, partitions);
            }
            if Instant::now() > deadline {
                return Err(Error::Kafka(format!("topic {name} did not appear")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Delete records below the given offsets (log truncation of internal topics).
    pub fn delete_records(&self, offsets: &TopicPartitionList) -> Result<()> {
        let res = self
            .rt
            .block_on(self.client.delete_records(offsets, &Self::options()))
            .map_err(|e| kafka_error("delete records", e))?;
        for e in res.elements() {
            if let Err(err) = e.error() {
                tracing::warn!(topic = e.topic(), partition = e.partition(), error = %err, "delete records");
            }
        }
        Ok(())
    }
}

fn check_partitions(name: &str, have: i32, want: i32) -> Result<()> {
    if have != want {
        return Err(Error::Config(format!(
            "topic {name} has {have} partitions, this job needs {want} (its keyGroups): \
             delete it or pick another kafka.internalTopicPrefix"
        )));
    }
    Ok(())
}

/// Committed offsets and metadata of the group for these partitions: `None` where the
/// group has no offset.
pub fn committed(
    consumer: &JobConsumer,
    partitions: &[(String, i32)],
) -> Result<HashMap<(String, i32), (i64, String)>> {
    let mut tpl = TopicPartitionList::new();
    for (t, p) in partitions {
        tpl.add_partition(t, *p);
    }
    let got = retry_plain("committed offsets", || {
        consumer.committed_offsets(tpl.clone(), CALL_TIMEOUT)
    })?;
    let mut out = HashMap::new();
    for e in got.elements() {
        if let Offset::Offset(o) = e.offset() {
            out.insert(
                (e.topic().to_string(), e.partition()),
                (o, e.metadata().to_string()),
            );
        }
    }
    Ok(out)
}

/// Low and high (for read_committed: last stable) offsets of a partition.
pub fn watermarks(consumer: &JobConsumer, topic: &str, partition: i32) -> Result<(i64, i64)> {
    retry_plain(&format!("watermarks of {topic}/{partition}"), || {
        consumer.fetch_watermarks(topic, partition, CALL_TIMEOUT)
    })
}

/// Retry a non-transactional call on transient errors for up to two minutes.
pub fn retry_plain<T>(
    what: &str,
    mut f: impl FnMut() -> rdkafka::error::KafkaResult<T>,
) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() < deadline && transient(&e) => {
                tracing::warn!(call = what, error = %e, "retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(kafka_error(what, e)),
        }
    }
}

fn transient(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    let code = match e {
        KafkaError::MetadataFetch(c)
        | KafkaError::OffsetFetch(c)
        | KafkaError::Global(c)
        | KafkaError::AdminOp(c) => *c,
        _ => return false,
    };
    matches!(
        code,
        C::OperationTimedOut
            | C::RequestTimedOut
            | C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::CoordinatorNotAvailable
            | C::NotCoordinator
            | C::CoordinatorLoadInProgress
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::UnknownTopicOrPartition
    )
}

/// The partition a poll error reports the end of (with `enable.partition.eof`; the error
/// does not name the topic, so end-of-partition consumers read one topic each).
pub fn partition_eof(e: &KafkaError) -> Option<i32> {
    match e {
        KafkaError::PartitionEOF(p) => Some(*p),
        _ => None,
    }
}
