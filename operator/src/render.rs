//! What a StreamJob becomes in the cluster, as pure functions: the runtime's job file, the
//! worker pods of one generation, the ConfigMap they read and a headless Service. No I/O: the
//! controller applies what these return.
//!
//! Workers are bare pods, one set per generation, rather than a StatefulSet: a generation is
//! started with its own `--generation` and `--restore` arguments and must be gone entirely
//! before the next one starts, which a StatefulSet's rolling update would fight. A crashed
//! worker container is restarted in place by the kubelet (`restartPolicy: Always`) and resumes
//! from its committed state; a lost pod is recreated by the operator in the same generation.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, Pod, PodSpec, Probe, SeccompProfile,
    SecretKeySelector, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use riffle_config::{HttpConfig, JobConfig, SinkConfig, SourceConfig};
use serde::Serialize;

use crate::crd::{StreamJob, StreamJobSpec};
use crate::upgrade::{Deployment, Restore};
use crate::Error;

pub const LABEL_JOB: &str = "riffle.dev/job";
pub const LABEL_GENERATION: &str = "riffle.dev/generation";
pub const LABEL_WORKER: &str = "riffle.dev/worker";
/// The worker count of a pod's generation (what "all ready" means for it).
pub const ANNOTATION_WORKERS: &str = "riffle.dev/workers";
/// `"true"`: the operator leaves the job alone (no pods started, stopped or savepointed).
pub const ANNOTATION_PAUSE: &str = "riffle.dev/pause-reconciliation";
/// The worker's HTTP API (probes, `/status`, `POST /savepoint`), bound on `$POD_IP`.
pub const HTTP_PORT: u16 = 9250;
const CONFIG_DIR: &str = "/etc/riffle";
const CONFIG_FILE: &str = "job.yaml";
const STATE_DIR: &str = "/var/lib/riffle/state";

/// The job's name in the runtime (Kafka topics, consumer group, transactional ids, store
/// paths): namespace, name and the first 8 characters of the UID, so a StreamJob deleted and
/// created again under the same name starts as a new job instead of meeting the old one's
/// committed state.
pub fn runtime_name(sj: &StreamJob) -> String {
    let uid = sj.metadata.uid.as_deref().unwrap_or("nouid");
    format!(
        "{}.{}.{}",
        sj.namespace().unwrap_or_default(),
        sj.name_any(),
        &uid[..uid.len().min(8)]
    )
}

/// The savepoint id sent to the workers for a lifecycle savepoint id: prefixed with the UID
/// so jobs sharing a savepoint store (or a job created again) never read each other's.
pub fn wire_savepoint_id(sj: &StreamJob, id: &str) -> String {
    let uid = sj.metadata.uid.as_deref().unwrap_or("nouid");
    format!("{}-{id}", &uid[..uid.len().min(8)])
}

/// The runtime's job file for a spec.
pub fn job_config(sj: &StreamJob, spec: &StreamJobSpec) -> Result<JobConfig, Error> {
    let cfg = JobConfig {
        name: runtime_name(sj),
        parallelism: spec.parallelism as usize,
        key_groups: spec.key_groups,
        source: SourceConfig::Kafka(spec.source.clone()),
        sink: SinkConfig {
            dir: None,
            kafka: Some(spec.sink.clone()),
            item_stats: spec.sink.item_stats.is_some(),
        },
        // Replaced by `--state-dir` (the emptyDir); kept valid for the file's own sake.
        state_dir: STATE_DIR.into(),
        checkpoint_store: spec.storage.checkpoints.clone(),
        savepoint_store: spec.storage.savepoints.clone(),
        checkpoint_interval: spec.checkpoint_interval,
        commit_interval: spec.commit_interval,
        retained_checkpoints: 3,
        max_batch_size: 4096,
        state_memory: spec
            .state_memory
            .unwrap_or_else(riffle_config::default_state_memory),
        http: Some(HttpConfig {
            listen: None,
            port: Some(HTTP_PORT),
        }),
        kafka: Some(spec.kafka.clone()),
        s3: spec.storage.s3.clone(),
        dataflow: spec.dataflow.clone(),
    };
    cfg.validate()
        .map_err(|e| Error::InvalidSpec(format!("the job configuration is invalid: {e}")))?;
    Ok(cfg)
}

/// Where savepoints go (the runtime's rule: `<checkpoints>/savepoints` by default).
pub fn savepoint_store(spec: &StreamJobSpec) -> String {
    spec.storage.savepoints.clone().unwrap_or_else(|| {
        format!(
            "{}/savepoints",
            spec.storage.checkpoints.trim_end_matches('/')
        )
    })
}

/// The parts of a spec that need new pods when they change.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PodRelevant<'a> {
    image: &'a str,
    parallelism: u32,
    key_groups: u32,
    source: &'a riffle_config::KafkaSourceConfig,
    sink: &'a riffle_config::KafkaSinkConfig,
    dataflow: &'a riffle_config::DataflowConfig,
    kafka: &'a riffle_config::KafkaConfig,
    kafka_credentials: &'a Option<crate::crd::KafkaCredentials>,
    storage: &'a crate::crd::Storage,
    checkpoint_interval: riffle_config::Duration,
    commit_interval: riffle_config::Duration,
    resources: &'a Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    pod_template: &'a Option<crate::crd::PodOverrides>,
}

/// A stable hash of what the pods are made from (FNV-1a over canonical JSON; struct fields
/// serialize in declaration order and maps are ordered, so equal specs hash equally).
pub fn spec_hash(spec: &StreamJobSpec) -> String {
    let relevant = PodRelevant {
        image: &spec.image,
        parallelism: spec.parallelism,
        key_groups: spec.key_groups,
        source: &spec.source,
        sink: &spec.sink,
        dataflow: &spec.dataflow,
        kafka: &spec.kafka,
        kafka_credentials: &spec.kafka_credentials,
        storage: &spec.storage,
        checkpoint_interval: spec.checkpoint_interval,
        commit_interval: spec.commit_interval,
        resources: &spec.resources,
        pod_template: &spec.pod_template,
    };
    let json = serde_json::to_vec(&relevant).expect("spec serializes");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in json {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

pub fn config_map_name(job: &str, generation: u32) -> String {
    format!("{job}-g{generation}")
}

pub fn pod_name(job: &str, generation: u32, index: u32) -> String {
    format!("{job}-g{generation}-w{index}")
}

pub fn service_name(job: &str) -> String {
    format!("{job}-workers")
}

/// `riffle.dev/job=<name>`: every worker pod of the job (the scale subresource's selector).
pub fn selector(sj: &StreamJob) -> String {
    format!("{LABEL_JOB}={}", sj.name_any())
}

fn owner(sj: &StreamJob) -> OwnerReference {
    sj.controller_owner_ref(&())
        .expect("a stored StreamJob has a UID")
}

fn labels(sj: &StreamJob, generation: Option<u32>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (LABEL_JOB.to_string(), sj.name_any()),
        ("app.kubernetes.io/name".into(), "riffle".into()),
        ("app.kubernetes.io/instance".into(), sj.name_any()),
        ("app.kubernetes.io/component".into(), "worker".into()),
        (
            "app.kubernetes.io/managed-by".into(),
            "riffle-operator".into(),
        ),
    ]);
    if let Some(g) = generation {
        l.insert(LABEL_GENERATION.into(), g.to_string());
    }
    l
}

/// The ConfigMap with the job file of one generation.
pub fn config_map(sj: &StreamJob, cfg: &JobConfig, generation: u32) -> Result<ConfigMap, Error> {
    let yaml = serde_yaml::to_string(cfg)
        .map_err(|e| Error::InvalidSpec(format!("rendering the job file: {e}")))?;
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(config_map_name(&sj.name_any(), generation)),
            namespace: sj.namespace(),
            labels: Some(labels(sj, Some(generation))),
            owner_references: Some(vec![owner(sj)]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(CONFIG_FILE.to_string(), yaml)])),
        // A generation's job file never changes: a new spec is a new generation.
        immutable: Some(true),
        ..Default::default()
    })
}

/// The headless Service naming the workers (DNS on real clusters; the operator itself goes
/// to pod IPs).
pub fn service(sj: &StreamJob) -> Service {
    let mut selector = BTreeMap::new();
    selector.insert(LABEL_JOB.to_string(), sj.name_any());
    Service {
        metadata: ObjectMeta {
            name: Some(service_name(&sj.name_any())),
            namespace: sj.namespace(),
            labels: Some(labels(sj, None)),
            owner_references: Some(vec![owner(sj)]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector),
            publish_not_ready_addresses: Some(true),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: i32::from(HTTP_PORT),
                target_port: Some(IntOrString::String("http".into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The `--restore` argument for a restore point.
pub fn restore_arg(restore: &Restore) -> String {
    match restore {
        Restore::Fresh => "none".into(),
        Restore::Latest => "latest".into(),
        Restore::Savepoint(location) => location.clone(),
    }
}

fn env_value(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env_secret(name: &str, selector: SecretKeySelector) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(selector),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Worker `index` of a generation.
pub fn worker_pod(sj: &StreamJob, spec: &StreamJobSpec, dep: &Deployment, index: u32) -> Pod {
    let job = sj.name_any();
    let workers = spec.parallelism;
    let overrides = spec.pod_template.clone().unwrap_or_default();
    let mut pod_labels = overrides.labels.clone();
    pod_labels.extend(labels(sj, Some(dep.generation)));
    pod_labels.insert(LABEL_WORKER.into(), index.to_string());
    let mut annotations = overrides.annotations.clone();
    annotations.insert(ANNOTATION_WORKERS.into(), workers.to_string());
    annotations.insert("riffle.dev/spec-hash".into(), dep.spec_hash.clone());

    let mut env = vec![
        env_field("POD_IP", "status.podIP"),
        env_field("POD_NAME", "metadata.name"),
        env_value("RUST_LOG", "info"),
    ];
    if let Some(secret) = &spec.storage.credentials_secret {
        for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            env.push(env_secret(
                key,
                SecretKeySelector {
                    name: secret.clone(),
                    key: key.into(),
                    optional: Some(false),
                },
            ));
        }
    }
    if let Some(region) = spec.storage.s3.as_ref().and_then(|s| s.region.clone()) {
        env.push(env_value("AWS_REGION", &region));
    }
    if let Some(creds) = &spec.kafka_credentials {
        env.push(env_secret(
            "RIFFLE_KAFKA_SASL_USERNAME",
            creds.username.clone(),
        ));
        env.push(env_secret(
            "RIFFLE_KAFKA_SASL_PASSWORD",
            creds.password.clone(),
        ));
    }
    env.extend(overrides.env.iter().cloned());

    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    let container = Container {
        name: "worker".into(),
        image: Some(spec.image.clone()),
        args: Some(vec![
            "run".into(),
            format!("--config={CONFIG_DIR}/{CONFIG_FILE}"),
            format!("--worker-index={index}"),
            format!("--workers={workers}"),
            format!("--generation={}", dep.generation),
            format!("--restore={}", restore_arg(&dep.restored_from)),
            format!("--state-dir={STATE_DIR}"),
        ]),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: i32::from(HTTP_PORT),
            ..Default::default()
        }]),
        readiness_probe: Some(probe("/readyz", 2, 3)),
        // The API answers from start, while state is restored; only a hung process fails it.
        liveness_probe: Some(probe("/healthz", 10, 6)),
        resources: spec.resources.clone(),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "config".into(),
                mount_path: CONFIG_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: "state".into(),
                mount_path: STATE_DIR.into(),
                ..Default::default()
            },
        ]),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    // The user's settings over restricted defaults (an fsGroup alone keeps the rest).
    let mut security = overrides.security_context.clone().unwrap_or_default();
    security.run_as_non_root = security.run_as_non_root.or(Some(true));
    security.run_as_user = security.run_as_user.or(Some(65_532));
    security.seccomp_profile = security.seccomp_profile.or(Some(SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..Default::default()
    }));
    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&job, dep.generation, index)),
            namespace: sj.namespace(),
            labels: Some(pod_labels),
            annotations: Some(annotations),
            owner_references: Some(vec![owner(sj)]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: Some(vec![
                Volume {
                    name: "config".into(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: config_map_name(&job, dep.generation),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "state".into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Default::default()
                },
            ]),
            restart_policy: Some("Always".into()),
            // SIGTERM: the worker commits its open transaction and exits.
            termination_grace_period_seconds: Some(30),
            automount_service_account_token: Some(false),
            node_selector: (!overrides.node_selector.is_empty())
                .then(|| overrides.node_selector.clone()),
            tolerations: (!overrides.tolerations.is_empty()).then(|| overrides.tolerations.clone()),
            security_context: Some(security),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> StreamJob {
        let mut sj: StreamJob = serde_yaml::from_str(include_str!("../../examples/streamjob.yaml"))
            .expect("the example parses");
        sj.metadata.namespace = Some("shop".into());
        sj.metadata.uid = Some("0123456789abcdef".into());
        sj
    }

    #[test]
    fn the_example_renders_a_valid_job_file_named_after_the_instance() {
        let sj = sample();
        let cfg = job_config(&sj, &sj.spec).unwrap();
        assert_eq!(cfg.name, format!("shop.{}.01234567", sj.name_any()));
        assert_eq!(cfg.parallelism, sj.spec.parallelism as usize);
        let yaml = serde_yaml::to_string(&cfg).unwrap();
        // What the worker will read back.
        assert_eq!(JobConfig::from_yaml(&yaml).unwrap(), cfg);
    }

    #[test]
    fn a_spec_the_runtime_refuses_is_an_invalid_spec_error() {
        let mut sj = sample();
        sj.spec.commit_interval = riffle_config::Duration::secs(30);
        let err = job_config(&sj, &sj.spec).unwrap_err().to_string();
        assert!(err.contains("transactionTimeout"), "{err}");
    }

    #[test]
    fn the_hash_follows_what_pods_are_made_of_and_nothing_else() {
        let sj = sample();
        let base = spec_hash(&sj.spec);
        assert_eq!(base, spec_hash(&sj.spec.clone()));
        let mut s = sj.spec.clone();
        s.dataflow.top_k += 1;
        assert_ne!(spec_hash(&s), base);
        let mut s = sj.spec.clone();
        s.parallelism += 1;
        assert_ne!(spec_hash(&s), base);
        let mut s = sj.spec.clone();
        s.restart_nonce += 1;
        s.savepoint_trigger_nonce += 1;
        s.state = crate::crd::JobState::Suspended;
        assert_eq!(
            spec_hash(&s),
            base,
            "lifecycle controls are not pod content"
        );
    }

    #[test]
    fn worker_pods_carry_their_generation_restore_point_and_overrides() {
        let mut sj = sample();
        sj.spec.pod_template = Some(crate::crd::PodOverrides {
            node_selector: BTreeMap::from([("kubernetes.io/hostname".into(), "n1".into())]),
            ..Default::default()
        });
        sj.spec.storage.credentials_secret = Some("s3-creds".into());
        let dep = Deployment {
            generation: 7,
            spec_hash: "h".into(),
            restart_nonce: 0,
            restored_from: Restore::Savepoint("s3://b/sp/x".into()),
        };
        let pod = worker_pod(&sj, &sj.spec, &dep, 1);
        let name = sj.name_any();
        assert_eq!(
            pod.metadata.name.as_deref(),
            Some(&*format!("{name}-g7-w1"))
        );
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_GENERATION], "7");
        assert_eq!(labels[LABEL_JOB], name);
        let spec = pod.spec.as_ref().unwrap();
        let args = spec.containers[0].args.as_ref().unwrap();
        for want in [
            "--worker-index=1",
            "--generation=7",
            "--restore=s3://b/sp/x",
            &format!("--workers={}", sj.spec.parallelism),
        ] {
            assert!(args.iter().any(|a| a == want), "{want} in {args:?}");
        }
        assert_eq!(
            spec.node_selector.as_ref().unwrap()["kubernetes.io/hostname"],
            "n1"
        );
        let env = spec.containers[0].env.as_ref().unwrap();
        let secret_keys: Vec<&str> = env
            .iter()
            .filter_map(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
            .map(|s| s.key.as_str())
            .collect();
        assert_eq!(secret_keys, ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]);
        assert!(env.iter().all(|e| e.value.as_deref() != Some("s3-creds")));
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "StreamJob");
        assert_eq!(owner.controller, Some(true));
    }
}
