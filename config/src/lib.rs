//! Riffle's job configuration: the shape (camelCase, unknown fields rejected) shared by the
//! runtime's job file and the `StreamJob` spec the operator reconciles, so a spec can be handed
//! to `riffle run` unchanged. Pure data and validation: no I/O beyond reading a file.
//!
//! Secrets never live here: Kafka SASL credentials and S3 keys come from the environment or
//! files (see the runtime's README), and property maps refuse secret-looking keys.

use std::collections::BTreeMap;
use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A configuration that cannot be used, with what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("YAML configuration: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(ConfigError::Invalid(msg.into()))
}

/// A duration in milliseconds, written as `500ms`, `10s`, `10m`, `1h`, `7d` or a plain number
/// of milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub i64);

impl Duration {
    pub const fn millis(ms: i64) -> Self {
        Self(ms)
    }
    pub const fn secs(s: i64) -> Self {
        Self(s * 1000)
    }
    pub const fn mins(m: i64) -> Self {
        Self(m * 60_000)
    }
    pub fn as_std(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0.max(0) as u64)
    }
}

impl FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (num, unit) = split_number(s);
        let n: i64 = num
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 10s, 5m, 1h, 7d"))?;
        let factor = match unit.trim() {
            "" | "ms" => 1,
            "s" => 1000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            other => return Err(format!("invalid duration unit {other:?} in {s:?}")),
        };
        n.checked_mul(factor)
            .map(Duration)
            .ok_or_else(|| format!("duration {s:?} overflows"))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        // No days: the StreamJob schema (and CEL's duration()) know h, m, s and ms only.
        for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
            if ms != 0 && ms % size == 0 {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

/// In a StreamJob spec a duration is a string CEL's `duration()` can read as well.
#[cfg(feature = "schema")]
impl schemars::JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^[0-9]+(ms|s|m|h)$",
            "maxLength": 24,
            "description": "A duration: a whole number of ms, s, m or h (e.g. 500ms, 10s, 5m, 168h)."
        })
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        number_or_text(d, Duration)
    }
}

/// A quantity written as a plain number (in its base unit) or as text its `FromStr` reads.
fn number_or_text<'de, D, N, T>(d: D, from_number: fn(N) -> T) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    N: Deserialize<'de>,
    T: FromStr<Err = String>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw<N> {
        Number(N),
        Text(String),
    }
    match Raw::<N>::deserialize(d)? {
        Raw::Number(n) => Ok(from_number(n)),
        Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

/// `"512Mi"` → `("512", "Mi")`: the leading digits and the rest.
fn split_number(s: &str) -> (&str, &str) {
    s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()))
}

/// A size in bytes, written as a Kubernetes quantity (`512Mi`, `2Gi`, `500M`) or a plain
/// number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn mib(n: u64) -> Self {
        Self(n << 20)
    }
}

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (num, unit) = split_number(s);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?}: expected e.g. 512Mi, 2Gi, 500M"))?;
        let factor: u64 = match unit {
            "" => 1,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "T" => 1_000_000_000_000,
            other => return Err(format!("invalid size unit {other:?} in {s:?}")),
        };
        n.checked_mul(factor)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} overflows"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, shift) in [("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)] {
            if b != 0 && b.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        write!(f, "{b}")
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^[0-9]+(Ki|Mi|Gi|Ti|k|M|G|T)?$",
            "maxLength": 24,
            "description": "A size: bytes, or a whole number with Ki, Mi, Gi, Ti, k, M, G or T (e.g. 512Mi)."
        })
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        number_or_text(d, ByteSize)
    }
}

/// Integer weight of an event by its type.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Weights {
    pub view: u32,
    pub click: u32,
    pub cart: u32,
    pub purchase: u32,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            view: 1,
            click: 1,
            cart: 3,
            purchase: 5,
        }
    }
}

/// The semantic parameters of the recommendation dataflow (see docs/semantics.md).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DataflowConfig {
    pub weights: Weights,
    pub history_length: usize,
    pub session_gap: Duration,
    pub window_size: Duration,
    pub window_slide: Duration,
    pub max_out_of_orderness: Duration,
    pub idle_timeout: Duration,
    pub allowed_lateness: Duration,
    pub neighbor_limit: usize,
    pub top_k: usize,
    pub exclude_purchased: bool,
    /// Events with ts beyond wall-clock now + this are rejected to the dead-letter output.
    pub max_future_skew: Duration,
}

impl Default for DataflowConfig {
    fn default() -> Self {
        Self {
            weights: Weights::default(),
            history_length: 20,
            session_gap: Duration::mins(30),
            window_size: Duration::mins(10),
            window_slide: Duration::mins(1),
            max_out_of_orderness: Duration::secs(5),
            idle_timeout: Duration::secs(30),
            allowed_lateness: Duration(0),
            neighbor_limit: 20,
            top_k: 20,
            exclude_purchased: true,
            max_future_skew: Duration::mins(60),
        }
    }
}

impl DataflowConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| invalid(m);
        if self.window_slide.0 <= 0 {
            return bad(format!(
                "windowSlide must be positive, got {}",
                self.window_slide
            ));
        }
        if self.window_size.0 <= 0 || self.window_size.0 % self.window_slide.0 != 0 {
            return bad(format!(
                "windowSize ({}) must be a positive multiple of windowSlide ({})",
                self.window_size, self.window_slide
            ));
        }
        if self.window_size.0 / self.window_slide.0 > 10_000 {
            return bad("windowSize / windowSlide must be at most 10000 panes".into());
        }
        for (name, d) in [
            ("sessionGap", self.session_gap),
            ("maxOutOfOrderness", self.max_out_of_orderness),
            ("allowedLateness", self.allowed_lateness),
            ("idleTimeout", self.idle_timeout),
            ("maxFutureSkew", self.max_future_skew),
        ] {
            if d.0 < 0 {
                return bad(format!("{name} must not be negative, got {d}"));
            }
        }
        if self.history_length == 0 || self.top_k == 0 {
            return bad("historyLength and topK must be at least 1".into());
        }
        Ok(())
    }

    /// Panes per window (W/S).
    pub fn panes_per_window(&self) -> i64 {
        self.window_size.0 / self.window_slide.0
    }
}

/// Format of a file source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FileFormat {
    /// One JSON event per line.
    #[default]
    Json,
    /// The session TSV of the YOOCHOOSE sample (`SessionId\tItemId\tTime`).
    SessionTsv,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSourceConfig {
    /// One path per source partition, read in parallel partitions.
    pub paths: Vec<PathBuf>,
    #[serde(default)]
    pub format: FileFormat,
}

/// A deterministic synthetic clickstream: Zipf-distributed users and items.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GeneratorConfig {
    pub users: u64,
    pub items: u64,
    /// Total number of events (over all partitions).
    pub events: u64,
    pub partitions: u32,
    /// Event-time rate of the generated stream, per partition.
    pub events_per_second: u64,
    pub zipf_exponent: f64,
    /// Maximum disorder: each ts is jittered back by up to this much.
    pub max_disorder: Duration,
    /// Event time of the first event (epoch ms).
    pub start_ts: i64,
    pub seed: u64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            users: 10_000,
            items: 2_000,
            events: 200_000,
            partitions: 2,
            events_per_second: 200,
            zipf_exponent: 1.1,
            max_disorder: Duration::secs(2),
            // 2026-01-01T00:00:00Z: fixed so replays are reproducible.
            start_ts: 1_767_225_600_000,
            seed: 42,
        }
    }
}

/// Where a Kafka source starts when its consumer group has no committed offset yet.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StartOffsets {
    #[default]
    Earliest,
    Latest,
}

/// Events from Kafka topics (distributed mode). JSON events, one per record value.
///
/// Partitions are assigned statically (no consumer-group rebalancing): partition `p` of a
/// topic with `P` partitions belongs to worker `p·N/P`. A topic with `keyGroups` partitions
/// keyed by userId with Kafka's default partitioner puts every user on the worker that owns
/// its key group; any other record is routed to its user's owner through the exchange topic.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaSourceConfig {
    pub topics: Vec<String>,
    #[serde(default)]
    pub start_offsets: StartOffsets,
    /// At most this many input records per second **per worker**: each input record
    /// occupies its worker for at least `1 / maxRecordsPerSecond`, and that time counts as
    /// busy (a per-record cost: a worker at 60 % of the limit is 60 % busy). For load tests
    /// and for sparing a fragile downstream; the autoscaler sees the limit as capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub max_records_per_second: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum SourceConfig {
    File(FileSourceConfig),
    Generator(GeneratorConfig),
    Kafka(KafkaSourceConfig),
}

/// Output topics of a Kafka sink; records are written inside the worker's transactions.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// One record per event, keyed by userId.
    pub recommendations: String,
    /// One record per item and emitted window, keyed by itemId (omit to not write them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_stats: Option<String>,
    /// Late events, keyed by userId, with source headers.
    pub late: String,
    /// Records that are not valid events, with source and reason headers.
    pub dead_letter: String,
}

/// Where output goes: `{dir: PATH}` (transactional files, local mode) or `{kafka: {...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SinkConfig {
    /// Directory with one sub-directory per output: recommendations, item-stats, late,
    /// dead-letter. Files appear there only when the checkpoint covering them commits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSinkConfig>,
    /// Write item stats (large with long windows). Default true.
    #[serde(default = "yes")]
    pub item_stats: bool,
}

impl SinkConfig {
    pub fn dir(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: Some(dir.into()),
            kafka: None,
            item_stats: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// `listen` is an explicit address; `port` binds `$POD_IP` (the downward API) or 127.0.0.1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl HttpConfig {
    pub fn listen(addr: SocketAddr) -> Self {
        Self {
            listen: Some(addr),
            port: None,
        }
    }
}

/// How workers authenticate to Kafka. Credentials come from `RIFFLE_KAFKA_SASL_USERNAME` /
/// `RIFFLE_KAFKA_SASL_PASSWORD` (or `..._FILE` variants), never from this file.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }
    pub fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// The Kafka cluster a distributed job reads, writes and keeps its internal topics in.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    #[serde(default)]
    pub security_protocol: SecurityProtocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// Transaction timeout: the broker aborts a worker's open transaction after this long
    /// without a commit (must exceed `commitInterval` many times over).
    #[serde(default = "default_transaction_timeout")]
    pub transaction_timeout: Duration,
    /// Internal topics are `<prefix>-exchange`, `-changelog` and `-trending`; default
    /// `riffle-<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_topic_prefix: Option<String>,
    /// Replication factor of internal topics (-1: the broker's default).
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// Retention of the exchange and changelog topics. Only the tail since the oldest retained
    /// checkpoint is needed; keep this far above `checkpointInterval`.
    #[serde(default = "default_internal_retention")]
    pub internal_retention: Duration,
    /// Extra librdkafka properties for every client (no secrets: keys naming passwords,
    /// keys or JAAS configs are refused).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_transaction_timeout() -> Duration {
    Duration::secs(60)
}
fn default_replication() -> i32 {
    -1
}
fn default_internal_retention() -> Duration {
    Duration(7 * 86_400_000)
}

impl KafkaConfig {
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            security_protocol: SecurityProtocol::default(),
            sasl_mechanism: None,
            transaction_timeout: default_transaction_timeout(),
            internal_topic_prefix: None,
            replication_factor: default_replication(),
            internal_retention: default_internal_retention(),
            properties: BTreeMap::new(),
        }
    }

    fn validate(&self, commit_interval: Duration) -> Result<()> {
        if self.bootstrap_servers.trim().is_empty() {
            return invalid("kafka.bootstrapServers must not be empty");
        }
        if self.security_protocol.uses_sasl() != self.sasl_mechanism.is_some() {
            return invalid(
                "kafka.saslMechanism is required with securityProtocol SASL_PLAINTEXT or \
                 SASL_SSL, and only then",
            );
        }
        for key in self.properties.keys() {
            let k = key.to_ascii_lowercase();
            if [
                "password",
                "secret",
                "jaas",
                "key.pem",
                "keystore",
                "sasl.username",
            ]
            .iter()
            .any(|s| k.contains(s))
            {
                return invalid(format!(
                    "kafka.properties.{key}: secrets must not be in the job configuration; \
                     pass them through RIFFLE_KAFKA_SASL_USERNAME / RIFFLE_KAFKA_SASL_PASSWORD \
                     (or their _FILE variants)"
                ));
            }
            if [
                "transactional.id",
                "isolation.level",
                "enable.auto.commit",
                "group.id",
            ]
            .contains(&k.as_str())
            {
                return invalid(format!(
                    "kafka.properties.{key} is set by the runtime (exactly-once depends on it)"
                ));
            }
        }
        // A transaction spans one commit interval plus a commit; the broker must not abort it
        // under normal operation, and a broker hiccup of a few commit intervals must not either.
        if self.transaction_timeout.0 < 10 * commit_interval.0.max(1) {
            return invalid(format!(
                "kafka.transactionTimeout ({}) must be at least 10 × commitInterval ({})",
                self.transaction_timeout, commit_interval
            ));
        }
        if self.transaction_timeout.0 > 900_000 {
            return invalid(format!(
                "kafka.transactionTimeout ({}) exceeds the broker default \
                 transaction.max.timeout.ms (15m)",
                self.transaction_timeout
            ));
        }
        if self.internal_retention.0 <= 0 {
            return invalid("kafka.internalRetention must be positive");
        }
        Ok(())
    }
}

/// S3 access for `s3://` stores. Credentials come from the AWS default chain (environment,
/// profile files, web identity / IRSA), never from this file.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint override (MinIO and other S3-compatible stores), e.g. `http://127.0.0.1:9000`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), which MinIO needs.
    #[serde(default)]
    pub force_path_style: bool,
}

/// A whole job: what `riffle run --config job.yaml` reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobConfig {
    #[serde(default = "default_name")]
    pub name: String,
    /// Local mode: worker threads. Distributed mode: the worker count (overridable per run
    /// with `--workers` / `RIFFLE_WORKERS`). Each owns a contiguous range of key groups.
    #[serde(default = "default_parallelism")]
    pub parallelism: usize,
    /// Number of key groups (= partitions of the keyed topics in distributed mode).
    #[serde(default = "default_key_groups")]
    pub key_groups: u32,
    /// `{file: {...}}`, `{generator: {...}}` or `{kafka: {...}}` (a one-key map, as in a CRD).
    #[serde(with = "serde_yaml::with::singleton_map")]
    pub source: SourceConfig,
    pub sink: SinkConfig,
    /// Local working directory for RocksDB (a cache of the last checkpoint).
    pub state_dir: PathBuf,
    /// Where checkpoints go: `file:///abs/path` or `s3://bucket/prefix`.
    pub checkpoint_store: String,
    /// Where savepoints go; default `<checkpointStore>/savepoints`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub savepoint_store: Option<String>,
    /// Local mode: time between checkpoints (the commit point of the file sink).
    /// Distributed mode: time between state snapshots uploaded to the store; commits happen
    /// every `commitInterval` and do not wait for snapshots.
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: Duration,
    /// Distributed mode: time between Kafka transaction commits (output visibility latency).
    #[serde(default = "default_commit_interval")]
    pub commit_interval: Duration,
    #[serde(default = "default_retained")]
    pub retained_checkpoints: usize,
    /// Upper bound of records per micro-batch (latency vs. per-batch overhead).
    #[serde(default = "default_max_batch")]
    pub max_batch_size: usize,
    /// Memory for keyed state per worker (local mode: per job): the hot tiers in front of
    /// RocksDB in `stateDir`, shared by user histories and the item state (each gets at least
    /// half). Histories
    /// beyond it are evicted least recently used first, pane entries oldest pane first; both
    /// are read back on use.
    #[serde(default = "default_state_memory")]
    pub state_memory: ByteSize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpConfig>,
    /// The Kafka cluster (required by Kafka sources and sinks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaConfig>,
    /// S3 endpoint settings for `s3://` stores.
    #[serde(default)]
    pub s3: Option<S3Config>,
    #[serde(default)]
    pub dataflow: DataflowConfig,
}

fn default_name() -> String {
    "riffle".into()
}
fn default_parallelism() -> usize {
    1
}
/// Defaults a StreamJob spec shares with the job file.
pub fn default_key_groups() -> u32 {
    128
}
pub fn default_checkpoint_interval() -> Duration {
    Duration::secs(10)
}
pub fn default_commit_interval() -> Duration {
    Duration::millis(100)
}
fn default_retained() -> usize {
    3
}
fn default_max_batch() -> usize {
    4096
}
/// Sized for a pod with 2 GiB of memory: half for keyed state, the rest for RocksDB's own
/// memory, buffers and the item dictionary (README, "State beyond memory").
pub fn default_state_memory() -> ByteSize {
    ByteSize::mib(1024)
}

impl JobConfig {
    /// A local job with its output, state and checkpoints under `workdir` and defaults
    /// elsewhere (demo, backtest, benchmark, tests).
    pub fn local(name: &str, workdir: &std::path::Path, source: SourceConfig) -> Self {
        Self {
            name: name.into(),
            parallelism: default_parallelism(),
            key_groups: default_key_groups(),
            source,
            sink: SinkConfig::dir(workdir.join("output")),
            state_dir: workdir.join("state"),
            checkpoint_store: format!("file://{}", workdir.join("checkpoints").display()),
            savepoint_store: None,
            checkpoint_interval: default_checkpoint_interval(),
            commit_interval: default_commit_interval(),
            retained_checkpoints: default_retained(),
            max_batch_size: default_max_batch(),
            state_memory: default_state_memory(),
            http: None,
            kafka: None,
            s3: None,
            dataflow: DataflowConfig::default(),
        }
    }

    pub fn from_yaml(text: &str) -> Result<Self> {
        let cfg: Self = serde_yaml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Distributed mode: the job reads Kafka (and then must write Kafka).
    pub fn is_distributed(&self) -> bool {
        matches!(self.source, SourceConfig::Kafka(_))
    }

    /// The output directory of a file sink.
    pub fn sink_dir(&self) -> Result<&std::path::Path> {
        self.sink.dir.as_deref().ok_or_else(|| {
            ConfigError::Invalid("this job writes to Kafka (sink.kafka), not a directory".into())
        })
    }

    /// Where savepoints go.
    pub fn savepoint_store(&self) -> String {
        self.savepoint_store.clone().unwrap_or_else(|| {
            format!("{}/savepoints", self.checkpoint_store.trim_end_matches('/'))
        })
    }

    /// Prefix of the job's internal topics.
    pub fn internal_topic_prefix(&self) -> String {
        self.kafka
            .as_ref()
            .and_then(|k| k.internal_topic_prefix.clone())
            .unwrap_or_else(|| format!("riffle-{}", self.name))
    }

    pub fn validate(&self) -> Result<()> {
        self.dataflow.validate()?;
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return invalid(format!(
                "name {:?} must be non-empty and use only letters, digits, '-', '_' and '.' \
                 (it names Kafka topics, transactional ids and store paths)",
                self.name
            ));
        }
        if self.key_groups == 0 || self.key_groups > 32_768 {
            return invalid("keyGroups must be between 1 and 32768");
        }
        if self.parallelism == 0 || self.parallelism > self.key_groups as usize {
            return invalid(format!(
                "parallelism must be between 1 and keyGroups ({}), got {}",
                self.key_groups, self.parallelism
            ));
        }
        if self.retained_checkpoints == 0 {
            return invalid("retainedCheckpoints must be at least 1");
        }
        if self.max_batch_size == 0 {
            return invalid("maxBatchSize must be at least 1");
        }
        if self.checkpoint_interval.0 <= 0 {
            return invalid("checkpointInterval must be positive");
        }
        if self.commit_interval.0 <= 0 {
            return invalid("commitInterval must be positive");
        }
        match &self.source {
            SourceConfig::File(f) if f.paths.is_empty() => {
                return invalid("source.file.paths must not be empty");
            }
            SourceConfig::Generator(g)
                if g.users == 0
                    || g.items == 0
                    || g.partitions == 0
                    || g.events_per_second == 0 =>
            {
                return invalid(
                    "generator users, items, partitions and eventsPerSecond must be positive",
                );
            }
            SourceConfig::Kafka(k) if k.topics.is_empty() => {
                return invalid("source.kafka.topics must not be empty");
            }
            _ => {}
        }
        match (&self.sink.dir, &self.sink.kafka) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => return invalid("sink needs exactly one of dir or kafka"),
        }
        if let Some(h) = &self.http {
            if h.listen.is_some() == h.port.is_some() {
                return invalid("http needs exactly one of listen or port");
            }
        }
        let kafka_source = self.is_distributed();
        let kafka_sink = self.sink.kafka.is_some();
        if kafka_source != kafka_sink {
            return invalid(
                "a Kafka source needs a Kafka sink and vice versa: exactly-once output rides on \
                 the transactions that also commit the consumed offsets",
            );
        }
        match (&self.kafka, kafka_source) {
            (None, true) => return invalid("a Kafka source and sink need a kafka section"),
            (Some(k), true) => k.validate(self.commit_interval)?,
            _ => {}
        }
        for (field, url) in [
            ("checkpointStore", Some(self.checkpoint_store.as_str())),
            ("savepointStore", self.savepoint_store.as_deref()),
        ] {
            let Some(url) = url else { continue };
            let ok = url
                .strip_prefix("file://")
                .is_some_and(|p| p.starts_with('/'))
                || url
                    .strip_prefix("s3://")
                    .is_some_and(|b| !b.is_empty() && !b.starts_with('/'));
            if !ok {
                return invalid(format!(
                    "{field} {url:?} must be file:///absolute/path or s3://bucket/prefix"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_print_and_read_from_yaml() {
        assert_eq!("512Mi".parse::<ByteSize>().unwrap(), ByteSize::mib(512));
        assert_eq!("2G".parse::<ByteSize>().unwrap().0, 2_000_000_000);
        assert!("2GB".parse::<ByteSize>().is_err());
        assert!("99999999999Ti".parse::<ByteSize>().is_err(), "overflow");
        assert_eq!(ByteSize::mib(1024).to_string(), "1Gi");
        assert_eq!(ByteSize(1500).to_string(), "1500");
        let read: Vec<ByteSize> = serde_yaml::from_str("[1024, 256Mi]").unwrap();
        assert_eq!(read, [ByteSize(1024), ByteSize::mib(256)]);
        let read: Vec<Duration> = serde_yaml::from_str("[250, 10s]").unwrap();
        assert_eq!(read, [Duration(250), Duration::secs(10)]);
    }

    #[test]
    fn durations_parse_and_print() {
        assert_eq!("10s".parse::<Duration>().unwrap(), Duration::secs(10));
        assert_eq!("7d".parse::<Duration>().unwrap().0, 7 * 86_400_000);
        assert_eq!("250".parse::<Duration>().unwrap().0, 250);
        assert!("10 parsecs".parse::<Duration>().is_err());
        assert!("".parse::<Duration>().is_err());
        assert_eq!(Duration::mins(90).to_string(), "90m");
        assert_eq!(Duration::millis(1500).to_string(), "1500ms");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let yaml = "source: {generator: {}}\nsink: {dir: /tmp/x}\nstateDir: /tmp/s\ncheckpointStore: file:///tmp/c\nparalelism: 2\n";
        let err = JobConfig::from_yaml(yaml).unwrap_err().to_string();
        assert!(err.contains("paralelism"), "{err}");
    }

    #[test]
    fn window_must_be_a_multiple_of_slide() {
        let df = DataflowConfig {
            window_size: Duration::secs(90),
            window_slide: Duration::mins(1),
            ..DataflowConfig::default()
        };
        assert!(df.validate().unwrap_err().to_string().contains("multiple"));
    }

    const KAFKA_JOB: &str = r#"
name: recs
source: {kafka: {topics: [events]}}
sink: {kafka: {recommendations: recs, late: late, deadLetter: dlq}}
stateDir: /tmp/s
checkpointStore: s3://riffle/jobs/recs
kafka: {bootstrapServers: "127.0.0.1:9092"}
"#;

    #[test]
    fn a_kafka_job_parses_with_defaults() {
        let cfg = JobConfig::from_yaml(KAFKA_JOB).unwrap();
        assert!(cfg.is_distributed());
        assert_eq!(cfg.commit_interval, Duration::millis(100));
        assert_eq!(cfg.savepoint_store(), "s3://riffle/jobs/recs/savepoints");
        assert_eq!(cfg.internal_topic_prefix(), "riffle-recs");
    }

    #[test]
    fn secrets_and_runtime_owned_properties_are_refused() {
        for (key, needle) in [
            ("sasl.password", "secrets must not be"),
            ("sasl.jaas.config", "secrets must not be"),
            ("isolation.level", "set by the runtime"),
        ] {
            let yaml = KAFKA_JOB.replace(
                "bootstrapServers: \"127.0.0.1:9092\"",
                &format!("bootstrapServers: \"127.0.0.1:9092\", properties: {{{key}: x}}"),
            );
            let err = JobConfig::from_yaml(&yaml).unwrap_err().to_string();
            assert!(err.contains(needle), "{key}: {err}");
        }
    }

    #[test]
    fn transaction_timeout_is_checked_against_the_commit_interval() {
        let yaml = KAFKA_JOB.replace(
            "bootstrapServers: \"127.0.0.1:9092\"",
            "bootstrapServers: \"127.0.0.1:9092\", transactionTimeout: 5s",
        ) + "commitInterval: 1s\n";
        let err = JobConfig::from_yaml(&yaml).unwrap_err().to_string();
        assert!(err.contains("10 × commitInterval"), "{err}");
    }

    #[test]
    fn mixed_modes_and_bad_stores_are_refused() {
        let yaml = KAFKA_JOB.replace(
            "sink: {kafka: {recommendations: recs, late: late, deadLetter: dlq}}",
            "sink: {dir: /tmp/out}",
        );
        assert!(JobConfig::from_yaml(&yaml)
            .unwrap_err()
            .to_string()
            .contains("Kafka sink"));
        let yaml = KAFKA_JOB.replace("s3://riffle/jobs/recs", "s3:///nobucket");
        assert!(JobConfig::from_yaml(&yaml)
            .unwrap_err()
            .to_string()
            .contains("s3://bucket/prefix"));
    }
}
