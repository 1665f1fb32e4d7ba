//! The `StreamJob` custom resource (`riffle.dev/v1alpha1`, short name `sj`).
//!
//! The dataflow, source, sink, Kafka and S3 sections are the runtime's own job-file structs
//! (`riffle-config`), so a spec section and the rendered job file have one shape. What only a
//! deployment has — image, resources, credentials by Secret reference, lifecycle controls —
//! lives beside them. Rules the API server can check are CEL validations on the schema, so
//! `kubectl apply` of a bad spec fails with a message that says what to fix.

use k8s_openapi::api::core::v1::{
    EnvVar, PodSecurityContext, ResourceRequirements, SecretKeySelector, Toleration,
};
use kube::{CustomResource, KubeSchema};
use riffle_config::{
    ByteSize, DataflowConfig, Duration, KafkaConfig, KafkaSinkConfig, KafkaSourceConfig, S3Config,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::upgrade::UpgradeMode;

/// A recommendation job: worker pods reading Kafka, exactly-once outputs to Kafka, state
/// checkpointed to S3.
// Every `printcolumn(...)` repeats the same keys, which clippy takes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "riffle.dev",
    version = "v1alpha1",
    kind = "StreamJob",
    doc = "A Riffle recommendation job: Kafka in, exactly-once recommendations out, state on S3",
    namespaced,
    shortname = "sj",
    category = "riffle",
    status = "StreamJobStatus",
    validation = Rule::new("self.metadata.name.size() <= 40 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("a StreamJob name is at most 40 characters of lowercase letters, digits and '-', starting with a letter (it names pods, a Service and label values)"),
    scale(
        spec_replicas_path = ".spec.parallelism",
        status_replicas_path = ".status.parallelism",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Parallelism",
        type_ = "integer",
        json_path = ".status.parallelism"
    ),
    printcolumn(name = "Lag", type_ = "integer", json_path = ".status.workers.lag"),
    printcolumn(name = "Restarts", type_ = "integer", json_path = ".status.restarts"),
    printcolumn(
        name = "Last Savepoint",
        type_ = "string",
        json_path = ".status.lastSavepoint.location",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self.parallelism <= self.keyGroups")
    .message("parallelism must not exceed keyGroups: each worker owns at least one key group"))]
#[x_kube(validation = Rule::new("!has(self.autoscaler) || !self.autoscaler.enabled || self.upgradeMode != 'stateless'")
    .message("the autoscaler rescales through savepoints or checkpoints: upgradeMode stateless would drop the state at every rescale"))]
#[x_kube(validation = Rule::new("!has(oldSelf.keyGroups) || self.keyGroups == oldSelf.keyGroups")
    .message("keyGroups is fixed for the life of a job (it is the partition count of its internal topics); create a new job to change it"))]
#[serde(rename_all = "camelCase")]
pub struct StreamJobSpec {
    /// Container image with the `riffle` binary.
    pub image: String,
    /// Worker pods. `kubectl scale sj/NAME --replicas N` sets it.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub parallelism: u32,
    /// Key groups: the unit of state distribution and the partition count of the job's
    /// internal topics. Fixed once set.
    #[serde(default = "riffle_config::default_key_groups")]
    #[schemars(range(min = 1, max = 32768))]
    pub key_groups: u32,
    /// Input topics (JSON events).
    pub source: KafkaSourceConfig,
    /// Output topics.
    pub sink: KafkaSinkConfig,
    /// Semantics of the dataflow (docs/semantics.md).
    #[serde(default)]
    #[x_kube(validation = Rule::new(
        "duration(self.windowSize).getMilliseconds() % duration(self.windowSlide).getMilliseconds() == 0"
    ).message("dataflow.windowSize must be a whole multiple of dataflow.windowSlide"))]
    #[x_kube(validation = Rule::new("duration(self.windowSlide).getMilliseconds() > 0")
        .message("dataflow.windowSlide must be positive"))]
    #[x_kube(validation = Rule::new("self.historyLength >= 1 && self.topK >= 1")
        .message("dataflow.historyLength and dataflow.topK must be at least 1"))]
    pub dataflow: DataflowConfig,
    /// The Kafka cluster. Credentials are not here: see `kafkaCredentials`.
    pub kafka: KafkaConfig,
    /// SASL username and password from Secrets (for SASL security protocols).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_credentials: Option<KafkaCredentials>,
    /// Where checkpoints and savepoints go.
    pub storage: Storage,
    /// Time between state snapshots uploaded to S3 (off the processing path).
    #[serde(default = "riffle_config::default_checkpoint_interval")]
    pub checkpoint_interval: Duration,
    /// Time between Kafka transaction commits: how soon outputs become visible.
    #[serde(default = "riffle_config::default_commit_interval")]
    pub commit_interval: Duration,
    /// Memory for keyed state per worker, shared by user histories and the item state (pane
    /// entries and window sums; each gets at least half), in front of RocksDB on the pod's
    /// state volume (default 1Gi). Leave room for it and the fixed overhead in the pod's
    /// memory limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_memory: Option<ByteSize>,
    /// How state crosses an upgrade.
    #[serde(default)]
    pub upgrade_mode: UpgradeMode,
    /// `suspended` takes a savepoint and removes the pods; `running` resumes from it.
    #[serde(default)]
    pub state: JobState,
    /// Change to restart the workers (through the upgrade mode).
    #[serde(default)]
    pub restart_nonce: i64,
    /// Change to take a savepoint without stopping.
    #[serde(default)]
    pub savepoint_trigger_nonce: i64,
    /// A savepoint (`s3://…`) the first generation restores from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^s3://[^/]+/.+"))]
    pub initial_savepoint_path: Option<String>,
    /// A new generation not Ready within this is rolled back to the last stable spec.
    #[serde(default = "default_readiness_timeout")]
    pub readiness_timeout: Duration,
    #[serde(default)]
    pub savepoint_retention: SavepointRetention,
    /// Take a savepoint (stopping the workers) when the StreamJob is deleted; its location
    /// is in the deletion Event and the operator's log, and `disposeOnDelete` keeps it.
    #[serde(default)]
    pub savepoint_on_deletion: bool,
    /// Resources of each worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodOverrides>,
    /// Lag-driven autoscaling between `minParallelism` and `maxParallelism`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaler: Option<Autoscaler>,
}

/// The operator's own memory: kept as written, not validated by the API server.
fn opaque_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

fn opaque_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": { "type": "object", "x-kubernetes-preserve-unknown-fields": true }
    })
}

fn one() -> u32 {
    1
}
fn default_readiness_timeout() -> Duration {
    Duration::mins(5)
}

#[derive(JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum JobState {
    #[default]
    Running,
    Suspended,
}

#[derive(JsonSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KafkaCredentials {
    pub username: SecretKeySelector,
    pub password: SecretKeySelector,
}

/// Checkpoint and savepoint locations, and how to reach them.
#[derive(JsonSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    /// `s3://bucket/prefix` for checkpoints.
    #[schemars(regex(pattern = r"^s3://[^/]+(/.*)?$"))]
    pub checkpoints: String,
    /// `s3://bucket/prefix` for savepoints; default `<checkpoints>/savepoints`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^s3://[^/]+(/.*)?$"))]
    pub savepoints: Option<String>,
    /// Endpoint, region and path-style addressing (MinIO needs the last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Config>,
    /// A Secret with `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`; without it the AWS
    /// default chain applies (IRSA, instance profile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// How many savepoints the operator keeps (older ones are deleted from S3).
#[derive(JsonSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavepointRetention {
    #[serde(default = "default_savepoints_kept")]
    #[schemars(range(min = 1))]
    pub max_count: u32,
    /// Delete the job's savepoints from S3 when the StreamJob is deleted.
    #[serde(default)]
    pub dispose_on_delete: bool,
}

impl Default for SavepointRetention {
    fn default() -> Self {
        Self {
            max_count: default_savepoints_kept(),
            dispose_on_delete: false,
        }
    }
}

fn default_savepoints_kept() -> u32 {
    5
}

/// What a StreamJob may change in its worker pods.
#[derive(JsonSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
    /// Extra environment of the worker container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Lag-driven autoscaling (see `operator/src/autoscaler.rs` for the decision). The
/// autoscaler's choice lives in `status.autoscaler.parallelism`, so `spec.parallelism` stays
/// what the user wrote (GitOps tools see no drift); a change of `spec.parallelism`
/// (`kubectl scale`) replaces the autoscaler's choice, which goes on from there.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("self.minParallelism <= self.maxParallelism")
    .message("autoscaler.minParallelism must not exceed autoscaler.maxParallelism"))]
#[x_kube(validation = Rule::new("duration(self.metricsWindow).getSeconds() >= 10")
    .message("autoscaler.metricsWindow must be at least 10s (worker figures refresh every few seconds)"))]
#[serde(rename_all = "camelCase")]
pub struct Autoscaler {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub min_parallelism: u32,
    #[schemars(range(min = 1))]
    pub max_parallelism: u32,
    /// Share of a worker's capacity the load may use after a rescale (headroom for bursts).
    #[serde(default = "default_target_utilization")]
    #[schemars(range(min = 0.1, max = 1.0))]
    pub target_utilization: f64,
    /// The lag should be worked off within this, on top of the input rate.
    #[serde(default = "default_catch_up")]
    pub catch_up_duration: Duration,
    /// Rates and busy shares are averaged over this.
    #[serde(default = "default_metrics_window")]
    pub metrics_window: Duration,
    /// After a (re)start, metrics are ignored for this long (restore, catch-up, warm caches).
    #[serde(default = "default_stabilization")]
    pub stabilization_interval: Duration,
    /// A scale-down happens only when every recommendation of this long was lower.
    #[serde(default = "default_scale_down_delay")]
    pub scale_down_delay: Duration,
    #[serde(default = "default_max_rescales")]
    #[schemars(range(min = 1))]
    pub max_rescales_per_hour: u32,
    /// Decide and record, but do not rescale.
    #[serde(default)]
    pub dry_run: bool,
}

fn default_target_utilization() -> f64 {
    0.7
}
fn default_catch_up() -> Duration {
    Duration::mins(5)
}
fn default_metrics_window() -> Duration {
    Duration::mins(1)
}
fn default_stabilization() -> Duration {
    Duration::mins(1)
}
fn default_scale_down_delay() -> Duration {
    Duration::mins(10)
}
fn default_max_rescales() -> u32 {
    6
}

/// What the autoscaler chose and why (`status.autoscaler`).
#[derive(JsonSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalerStatus {
    /// The parallelism the autoscaler runs the job at (instead of `spec.parallelism`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<u32>,
    /// The `spec.parallelism` that choice was made against: when the user changes it, the
    /// user's value wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_parallelism: Option<u32>,
    /// The last decision (inputs, each term, the result, applied or why not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "opaque_object")]
    pub last_decision: Option<crate::autoscaler::Decision>,
    /// The last decisions that recommended a change, newest first (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "opaque_list")]
    pub history: Vec<crate::autoscaler::Decision>,
    #[serde(default)]
    pub memory: crate::autoscaler::Memory,
    /// A rescale in flight: when it was applied, to measure its downtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rescale_started_ms: Option<i64>,
}

/// What the operator and the workers report.
#[derive(JsonSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamJobStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Workers running (the scale subresource's replicas).
    #[serde(default)]
    pub parallelism: u32,
    /// Label selector of the worker pods (the scale subresource's selector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<WorkerReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_savepoint: Option<SavepointInfo>,
    /// The most recent savepoints, newest first (bounded by the retention).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub savepoints: Vec<SavepointInfo>,
    /// The lifecycle record (deployed generation, last stable spec, the upgrade journal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "opaque_object")]
    pub lifecycle: Option<crate::upgrade::Record>,
    /// The last stable spec, for rollbacks (JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_stable_spec: Option<String>,
    /// The spec the deployed generation was started from (JSON): it becomes the last stable
    /// one when that generation is ready, whatever the spec says by then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed_spec: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Worker container restarts of the running generation.
    #[serde(default)]
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaler: Option<AutoscalerStatus>,
}

/// A status condition (Ready, Progressing, Degraded).
#[derive(JsonSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The workers' own view, summed or taken at the minimum as fits.
#[derive(JsonSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerReport {
    pub generation: u32,
    pub ready: u32,
    /// Records behind the end of the input and exchange topics, over all workers.
    pub lag: i64,
    /// The lowest worker watermark (epoch ms), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<i64>,
    pub events_per_second: f64,
    /// The oldest of the workers' last completed checkpoints (epoch ms id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<i64>,
}

#[derive(JsonSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavepointInfo {
    pub location: String,
    pub trigger: String,
    pub time: String,
}

/// The CRD as `crds/streamjob.yaml` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let body = serde_yaml::to_string(&StreamJob::crd())?;
    Ok(format!(
        "# Generated by `make crds` (the crdgen binary) from operator/src/crd.rs: do not edit.\n{body}"
    ))
}
