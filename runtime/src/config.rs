//! Job configuration. Same shape (camelCase, unknown fields rejected) as the `StreamJob` CRD
//! spec the operator will reconcile, so a spec can be handed to `riffle run` unchanged.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Error, Result};

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
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
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
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms != 0 && ms % size == 0 {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Millis(i64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Millis(ms) => Ok(Duration(ms)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Integer weight of an event by its type.
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
        let bad = |m: String| Err(Error::Config(m));
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum SourceConfig {
    File(FileSourceConfig),
    Generator(GeneratorConfig),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SinkConfig {
    /// Directory with one sub-directory per output: recommendations, item-stats, late,
    /// dead-letter. Files appear there only when the checkpoint covering them commits.
    pub dir: PathBuf,
    /// Write item stats (large with long windows). Default true.
    #[serde(default = "yes")]
    pub item_stats: bool,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
}

/// A whole job: what `riffle run --config job.yaml` reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobConfig {
    #[serde(default = "default_name")]
    pub name: String,
    /// Worker threads; each owns a contiguous range of key groups.
    #[serde(default = "default_parallelism")]
    pub parallelism: usize,
    /// Number of key groups (= Kafka partitions of the keyed topics in distributed mode).
    #[serde(default = "default_key_groups")]
    pub key_groups: u32,
    /// `{file: {...}}` or `{generator: {...}}` (a one-key map, as in a CRD spec).
    #[serde(with = "serde_yaml::with::singleton_map")]
    pub source: SourceConfig,
    pub sink: SinkConfig,
    /// Local working directory for RocksDB.
    pub state_dir: PathBuf,
    /// Where checkpoints go: `file:///abs/path` (S3 comes with the distributed runtime).
    pub checkpoint_store: String,
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: Duration,
    #[serde(default = "default_retained")]
    pub retained_checkpoints: usize,
    /// Upper bound of records per micro-batch (latency vs. per-batch overhead).
    #[serde(default = "default_max_batch")]
    pub max_batch_size: usize,
    #[serde(default)]
    pub http: Option<HttpConfig>,
    #[serde(default)]
    pub dataflow: DataflowConfig,
}

fn default_name() -> String {
    "riffle".into()
}
fn default_parallelism() -> usize {
    1
}
fn default_key_groups() -> u32 {
    128
}
fn default_checkpoint_interval() -> Duration {
    Duration::secs(10)
}
fn default_retained() -> usize {
    3
}
fn default_max_batch() -> usize {
    4096
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
            sink: SinkConfig {
                dir: workdir.join("output"),
                item_stats: true,
            },
            state_dir: workdir.join("state"),
            checkpoint_store: format!("file://{}", workdir.join("checkpoints").display()),
            checkpoint_interval: default_checkpoint_interval(),
            retained_checkpoints: default_retained(),
            max_batch_size: default_max_batch(),
            http: None,
            dataflow: DataflowConfig::default(),
        }
    }

    pub fn from_yaml(text: &str) -> Result<Self> {
        let cfg: Self = serde_yaml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &std::path::Path) -> Result<Self> {
        use crate::error::IoContext;
        let text = std::fs::read_to_string(path).at(path)?;
        Self::from_yaml(&text)
    }

    pub fn validate(&self) -> Result<()> {
        self.dataflow.validate()?;
        if self.parallelism == 0 || self.parallelism > self.key_groups as usize {
            return Err(Error::Config(format!(
                "parallelism must be between 1 and keyGroups ({}), got {}",
                self.key_groups, self.parallelism
            )));
        }
        if self.key_groups == 0 || self.key_groups > 32_768 {
            return Err(Error::Config(
                "keyGroups must be between 1 and 32768".into(),
            ));
        }
        if self.retained_checkpoints == 0 {
            return Err(Error::Config(
                "retainedCheckpoints must be at least 1".into(),
            ));
        }
        if self.max_batch_size == 0 {
            return Err(Error::Config("maxBatchSize must be at least 1".into()));
        }
        if self.checkpoint_interval.0 <= 0 {
            return Err(Error::Config("checkpointInterval must be positive".into()));
        }
        if let SourceConfig::File(f) = &self.source {
            if f.paths.is_empty() {
                return Err(Error::Config("source.file.paths must not be empty".into()));
            }
        }
        if let SourceConfig::Generator(g) = &self.source {
            if g.users == 0 || g.items == 0 || g.partitions == 0 || g.events_per_second == 0 {
                return Err(Error::Config(
                    "generator users, items, partitions and eventsPerSecond must be positive"
                        .into(),
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
}
