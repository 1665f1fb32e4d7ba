//! The operator end to end on the test bed: the real API server, scheduler and node agent run
//! the worker pods the operator creates, against the real Kafka and MinIO. The operator runs
//! as local processes (two replicas where leadership matters), watching only the test's
//! namespace. Exactly-once is checked by the `read_committed` verifier and ItemStats against
//! the independent reference, across every lifecycle step the scenario drives.

mod common;
mod reference;
#[path = "common/scenario.rs"]
mod scenario;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster::{unique, verify_exactly_once, Bed, Topics};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, CustomResourceExt, ResourceExt};
use riffle_e2e::testbed::install_crd;
use riffle_e2e::testenv::{binary, TestEnv};
use riffle_operator::crd::StreamJob;
use scenario::{assert_item_stats_match_reference, input, produce_in_background, Input};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(180);

/// One scenario at a time: they share two cores, and one stops the shared MinIO.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const KEY_GROUPS: i32 = 8;

/// A test's world: node agent and namespace, topics, the S3 Secret, operator replicas.
struct World {
    env: TestEnv,
    bed: Bed,
    topics: Topics,
    name: String,
    operators: BTreeMap<String, Child>,
    /// Each replica's `/metrics` address.
    metrics: BTreeMap<String, std::net::SocketAddr>,
    logs: PathBuf,
    _tmp: tempfile::TempDir,
}

impl World {
    async fn new(test: &str) -> Self {
        let bed = Bed::from_env();
        let env = TestEnv::start(test).await;
        install_crd(&env.client, &StreamJob::crd()).await;
        let name = unique("sj").replace('_', "-");
        let topics = tokio::task::block_in_place(|| Topics::create(&bed, &name, KEY_GROUPS));
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "riffle-s3"},
            "stringData": {
                "AWS_ACCESS_KEY_ID": std::env::var("AWS_ACCESS_KEY_ID").unwrap(),
                "AWS_SECRET_ACCESS_KEY": std::env::var("AWS_SECRET_ACCESS_KEY").unwrap(),
            }
        }))
        .unwrap();
        env.api::<Secret>()
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        Self {
            logs: tmp.path().to_path_buf(),
            env,
            bed,
            topics,
            name: "recs".into(),
            operators: BTreeMap::new(),
            metrics: BTreeMap::new(),
            _tmp: tmp,
        }
    }

    /// A world with these operator replicas, the pod-overlap watch, and the job created and
    /// Running on generation 1 with 2 workers.
    async fn running(test: &str, operators: &[&str]) -> (Self, OverlapWatch, StreamJob) {
        let mut world = Self::new(test).await;
        for id in operators {
            world.start_operator(id);
        }
        let overlap = OverlapWatch::start(&world);
        world.create().await;
        let sj = world.wait_running(1, 2).await;
        (world, overlap, sj)
    }

    /// Start an operator replica named `id` (leader election through a Lease in the test's
    /// namespace, short timings so a takeover is quick).
    fn start_operator(&mut self, id: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("operator-{id}.log")))
            .unwrap();
        // A free port for this replica's metrics (released just before the operator binds it).
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        self.metrics.insert(id.to_string(), metrics);
        let child = Command::new(binary("riffle-operator"))
            .args([
                "--namespace",
                &self.env.ns,
                "--metrics-listen",
                &metrics.to_string(),
                "--lease-namespace",
                &self.env.ns,
                "--identity",
                id,
                "--lease-duration",
                "6",
                "--renew-deadline",
                "4",
                "--retry-period",
                "1",
            ])
            .env_clear()
            .env("KUBECONFIG", &self.env.kubeconfig)
            .env("RUST_LOG", "info,riffle_operator=debug,kube=warn")
            .envs(
                [
                    "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY",
                    "AWS_REGION",
                    "PATH",
                    "HOME",
                ]
                .iter()
                .filter_map(|k| Some((k.to_string(), std::env::var(k).ok()?))),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start riffle-operator");
        self.operators.insert(id.to_string(), child);
    }

    fn kill_operator(&mut self, id: &str) {
        let mut child = self.operators.remove(id).expect("operator running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn operator_logs(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(&self.logs).unwrap().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            out += &format!(
                "--- {} (last 60 lines) ---\n{}\n",
                entry.file_name().to_string_lossy(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        out
    }

    fn spec(&self) -> Value {
        let t = &self.topics;
        json!({
            "image": "riffle-runtime:test",
            "parallelism": 2,
            "keyGroups": KEY_GROUPS,
            "source": {"topics": [t.input]},
            "sink": {"recommendations": t.recs, "itemStats": t.stats, "late": t.late, "deadLetter": t.dlq},
            "kafka": {"bootstrapServers": self.bed.bootstrap},
            "storage": {
                "checkpoints": format!("s3://{}/{}/{}", self.bed.bucket, self.env.ns, self.name),
                "s3": {"endpoint": self.bed.s3_endpoint, "region": "us-east-1", "forcePathStyle": true},
                "credentialsSecret": "riffle-s3",
            },
            "checkpointInterval": "2s",
            "commitInterval": "100ms",
            "readinessTimeout": "60s",
            "dataflow": {
                "windowSize": "60s", "windowSlide": "10s", "historyLength": 10,
                "idleTimeout": "60s", "maxOutOfOrderness": "5s",
            },
            "podTemplate": {"nodeSelector": {"kubernetes.io/hostname": self.env.node}},
            "savepointRetention": {"maxCount": 2, "disposeOnDelete": true},
            "savepointOnDeletion": true,
        })
    }

    fn jobs(&self) -> Api<StreamJob> {
        self.env.api()
    }

    async fn create(&self) {
        self.create_with(json!({})).await;
    }

    /// Create the job with these spec fields on top of [`World::spec`].
    async fn create_with(&self, extra: Value) {
        let mut spec = self.spec();
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        let sj = json!({
            "apiVersion": "riffle.dev/v1alpha1",
            "kind": "StreamJob",
            "metadata": {"name": self.name},
            "spec": spec,
        });
        self.jobs()
            .create(&PostParams::default(), &serde_json::from_value(sj).unwrap())
            .await
            .expect("create the StreamJob");
    }

    async fn patch_spec(&self, patch: Value) {
        self.jobs()
            .patch(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": patch })),
            )
            .await
            .expect("patch the StreamJob");
    }

    /// Wait until the StreamJob satisfies `cond`.
    async fn wait(
        &self,
        what: &str,
        cond: impl Fn(&StreamJob) -> bool + Send + 'static,
    ) -> StreamJob {
        self.wait_for(what, TIMEOUT, cond).await
    }

    /// [`World::wait`] with another bound.
    async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&StreamJob) -> bool + Send + 'static,
    ) -> StreamJob {
        let wait = await_condition(self.jobs(), &self.name, move |sj: Option<&StreamJob>| {
            sj.is_some_and(&cond)
        });
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(Some(sj))) => sj,
            Ok(r) => panic!("watching the StreamJob for {what}: {r:?}"),
            Err(_) => {
                let sj = self.jobs().get_opt(&self.name).await.ok().flatten();
                panic!(
                    "timed out waiting for {what}; status: {}\n{}\n--- agent ---\n{}",
                    serde_json::to_string_pretty(&sj.and_then(|s| s.status)).unwrap(),
                    self.operator_logs(),
                    tail(&self.env.agent_log(), 40),
                )
            }
        }
    }

    /// Running on `generation` with `workers` ready workers.
    async fn wait_running(&self, generation: u32, workers: u32) -> StreamJob {
        self.wait(
            &format!("Running on generation {generation} with {workers} workers"),
            move |sj| {
                let Some(s) = &sj.status else { return false };
                s.phase.as_deref() == Some("Running")
                    && condition(sj, "Ready") == Some("True")
                    && s.lifecycle
                        .as_ref()
                        .and_then(|l| l.deployed.as_ref())
                        .map(|d| d.generation)
                        == Some(generation)
                    && s.parallelism == workers
            },
        )
        .await
    }

    /// Set or remove the `riffle.dev/pause-reconciliation` annotation.
    async fn set_paused(&self, paused: bool) {
        let value = if paused { json!("true") } else { Value::Null };
        self.jobs()
            .patch(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"annotations": {"riffle.dev/pause-reconciliation": value}}}),
                ),
            )
            .await
            .unwrap();
    }

    /// The reasons of the Events in the test's namespace.
    async fn event_reasons(&self) -> Vec<String> {
        self.env
            .api::<k8s_openapi::api::events::v1::Event>()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|e| e.reason)
            .collect()
    }

    async fn worker_pods(&self) -> Vec<Pod> {
        self.env
            .api::<Pod>()
            .list(&ListParams::default().labels(&format!("riffle.dev/job={}", self.name)))
            .await
            .unwrap()
            .items
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for (_, mut child) in std::mem::take(&mut self.operators) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.operator_logs());
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The generation the status says is deployed.
fn deployed_of(sj: &StreamJob) -> riffle_operator::upgrade::Deployment {
    sj.status
        .as_ref()
        .and_then(|s| s.lifecycle.as_ref())
        .and_then(|l| l.deployed.clone())
        .expect("a deployed generation")
}

fn condition<'a>(sj: &'a StreamJob, type_: &str) -> Option<&'a str> {
    sj.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

fn condition_reason(sj: &StreamJob, type_: &str) -> Option<String> {
    sj.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| format!("{}: {}", c.reason, c.message))
}

/// Watches the job's pods for the whole test and remembers the most generations that ever
/// had pods whose containers may run at the same time. A terminating pod counts until it is
/// gone or reports a terminal phase: Succeeded/Failed means every container has exited (the
/// kubelet, and the test bed's agent, publish it only after the last process is reaped), and
/// the operator may start the next generation from then on.
struct OverlapWatch {
    max: Arc<AtomicUsize>,
    seen: Arc<Mutex<BTreeSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl OverlapWatch {
    fn start(world: &World) -> Self {
        let max = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let pods = world.env.api::<Pod>();
        let labels = format!("riffle.dev/job={}", world.name);
        let (m, s) = (max.clone(), seen.clone());
        let task = tokio::spawn(async move {
            let mut live: BTreeMap<String, String> = BTreeMap::new();
            let stream =
                watcher(pods, watcher::Config::default().labels(&labels)).default_backoff();
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                // The watcher retries with backoff; an error ends nothing.
                let Ok(event) = event else { continue };
                match event {
                    watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                        let g = p
                            .labels()
                            .get("riffle.dev/generation")
                            .cloned()
                            .unwrap_or_default();
                        s.lock().unwrap().insert(g.clone());
                        let ended = matches!(
                            p.status.as_ref().and_then(|s| s.phase.as_deref()),
                            Some("Succeeded" | "Failed")
                        );
                        if ended {
                            live.remove(&p.name_any());
                        } else {
                            live.insert(p.name_any(), g);
                        }
                    }
                    watcher::Event::Delete(p) => {
                        live.remove(&p.name_any());
                    }
                    watcher::Event::Init => live.clear(),
                    watcher::Event::InitDone => {}
                }
                let generations: BTreeSet<&String> = live.values().collect();
                m.fetch_max(generations.len(), Ordering::SeqCst);
            }
        });
        Self { max, seen, task }
    }

    fn assert_never_overlapped(&self) {
        assert_eq!(
            self.max.load(Ordering::SeqCst),
            1,
            "two generations had pods at the same time (generations seen: {:?})",
            self.seen.lock().unwrap()
        );
    }
}

impl Drop for OverlapWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Produce `input` paced in the background; returns when all is sent.
fn producer(world: &World, input: &Input, rate: u64) -> std::thread::JoinHandle<()> {
    produce_in_background(&world.bed, &world.topics.input, input.records.clone(), rate).0
}

async fn finish_and_verify(world: &World, input: &Input) {
    let final_wm = input.final_wm;
    world
        .wait(
            "every worker's watermark at the end of the input",
            move |sj| {
                sj.status
                    .as_ref()
                    .and_then(|s| s.workers.as_ref())
                    .and_then(|w| w.watermark)
                    .is_some_and(|wm| wm >= final_wm)
            },
        )
        .await;
    let topics = world.topics.clone();
    let (valid, poison) = (input.valid.clone(), input.poison.clone());
    let stats = tokio::task::block_in_place(|| verify_exactly_once(&topics, &valid, &poison));
    assert_item_stats_match_reference(&stats, input, KEY_GROUPS);
}

/// create → Running (the `kubectl get sj` columns) → a parameter change as a savepoint
/// upgrade → `kubectl scale` → suspend and resume → retention → pause → a lastState
/// upgrade → delete with a final savepoint, while input flows; exactly once
/// across all of it, and never two generations at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lifecycle_of_a_job_is_exactly_once_and_never_overlaps() {
    let _serial = SERIAL.lock().await;
    let (mut world, overlap, sj) = World::running("op-life", &["op-a"]).await;
    assert_eq!(
        sj.status.as_ref().unwrap().selector.as_deref(),
        Some("riffle.dev/job=recs")
    );
    assert!(
        world
            .env
            .api::<ConfigMap>()
            .get("recs-g1")
            .await
            .unwrap()
            .data
            .unwrap()["job.yaml"]
            .contains("topK"),
        "generation 1's ConfigMap holds the job file"
    );
    // What `kubectl get sj` shows.
    let table: Value = world
        .env
        .client
        .request(
            http::Request::get(format!(
                "/apis/riffle.dev/v1alpha1/namespaces/{}/streamjobs",
                world.env.ns
            ))
            .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
            .body(Vec::new())
            .unwrap(),
        )
        .await
        .unwrap();
    let cells = &table["rows"][0]["cells"];
    assert_eq!(cells[0], "recs");
    assert_eq!(cells[1], "Running", "{table}");
    assert_eq!(cells[2], 2);

    let input = tokio::task::block_in_place(|| input(KEY_GROUPS, 24_000, 100));
    let sender = producer(&world, &input, 600);

    // A job parameter changes: savepoint, stop, restore in generation 2.
    world.patch_spec(json!({"dataflow": {"topK": 15}})).await;
    let sj = world.wait_running(2, 2).await;
    let lifecycle = sj.status.as_ref().unwrap().lifecycle.clone().unwrap();
    let restored = lifecycle.deployed.unwrap().restored_from;
    assert!(
        matches!(&restored, riffle_operator::upgrade::Restore::Savepoint(l) if l.contains("sp-upgrade-g1")),
        "generation 2 restores the upgrade savepoint: {restored:?}"
    );
    assert!(sj.status.as_ref().unwrap().last_savepoint.is_some());

    // `kubectl scale sj/recs --replicas 3`.
    world
        .jobs()
        .patch_scale(
            "recs",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    world.wait_running(3, 3).await;

    // Suspend: a savepoint, then no pods; resume from it.
    world.patch_spec(json!({"state": "suspended"})).await;
    world
        .wait("Suspended", |sj| {
            sj.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Suspended")
        })
        .await;
    assert!(
        world.worker_pods().await.is_empty(),
        "a suspended job has no pods"
    );
    world.patch_spec(json!({"state": "running"})).await;
    world.wait_running(4, 3).await;

    // Three savepoints so far (upgrade, scale, suspend) and two kept: the oldest is gone
    // from the store, the kept ones are complete.
    let sj = world.jobs().get("recs").await.unwrap();
    let kept: Vec<String> = sj
        .status
        .as_ref()
        .unwrap()
        .savepoints
        .iter()
        .map(|s| s.location.clone())
        .collect();
    assert_eq!(kept.len(), 2, "savepointRetention.maxCount: {kept:?}");
    let sp_store = format!("s3://{}/{}/recs/savepoints", world.bed.bucket, world.env.ns);
    let uid8 = sj.uid().unwrap()[..8].to_string();
    let upgrade_sp = format!("{sp_store}/{uid8}-sp-upgrade-g1-a0");
    assert!(!kept.contains(&upgrade_sp));
    assert!(
        !savepoint_complete(&world.bed, &upgrade_sp),
        "{upgrade_sp} was disposed"
    );
    for location in &kept {
        assert!(
            savepoint_complete(&world.bed, location),
            "{location} is complete"
        );
    }

    // Paused: a spec change is seen and left alone, until the annotation goes.
    world.set_paused(true).await;
    world.patch_spec(json!({"dataflow": {"topK": 16}})).await;
    let paused_at = world.jobs().get("recs").await.unwrap().metadata.generation;
    let sj = world
        .wait("the Paused condition for the new spec", move |sj| {
            sj.status.as_ref().is_some_and(|s| {
                s.conditions.iter().any(|c| {
                    c.type_ == "Paused" && c.status == "True" && c.observed_generation == paused_at
                })
            })
        })
        .await;
    assert_eq!(deployed_of(&sj).generation, 4);
    assert!(world
        .worker_pods()
        .await
        .iter()
        .all(|p| p.labels()["riffle.dev/generation"] == "4"));
    world.set_paused(false).await;
    world.wait_running(5, 3).await;

    // A lastState upgrade: no savepoint, generation 6 resumes the committed state.
    world
        .patch_spec(json!({"upgradeMode": "lastState", "dataflow": {"topK": 14}}))
        .await;
    let upgraded = world.wait_running(6, 3).await;
    let deployed = deployed_of(&upgraded);
    assert_eq!(
        deployed.restored_from,
        riffle_operator::upgrade::Restore::Latest
    );

    tokio::task::block_in_place(|| sender.join().unwrap());
    finish_and_verify(&world, &input).await;
    overlap.assert_never_overlapped();

    // Events tell the story; the metrics count the work.
    let events = world.event_reasons().await;
    for reason in [
        "Starting",
        "Upgrading",
        "SavepointCompleted",
        "Suspended",
        "Ready",
    ] {
        assert!(
            events.iter().any(|r| r == reason),
            "no {reason} event in {events:?}"
        );
    }
    let metrics =
        common::cluster::try_http(&world.metrics["op-a"].to_string(), "GET", "/metrics", "")
            .expect("the operator serves /metrics");
    assert_eq!(metrics.0, 200);
    assert!(
        metrics.1.contains("riffle_operator_leader 1"),
        "{}",
        metrics.1
    );
    let reconciles: u64 = metrics
        .1
        .lines()
        .find_map(|l| l.strip_prefix("riffle_operator_reconciles_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(reconciles > 10, "{reconciles} reconciles counted");

    // Delete: a final savepoint, the kept savepoints disposed, children and the finalizer gone.
    world
        .jobs()
        .delete("recs", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::timeout(
        TIMEOUT,
        await_condition(
            world.jobs(),
            "recs",
            conditions::is_deleted(&sj.uid().unwrap()),
        ),
    )
    .await
    .expect("the StreamJob is gone (finalizer removed) in time")
    .unwrap();
    let pods = world.env.api::<Pod>();
    let gone = await_condition_list(&pods, "riffle.dev/job=recs").await;
    assert!(gone, "worker pods are deleted with the job");
    let last = format!("{sp_store}/{uid8}-sp-delete-g6");
    assert!(
        savepoint_complete(&world.bed, &last),
        "the final savepoint {last} is kept"
    );
    for location in &kept {
        assert!(
            !savepoint_complete(&world.bed, location),
            "{location} disposed on delete"
        );
    }
    let config_maps = world.env.api::<ConfigMap>();
    assert!(
        await_condition_list(&config_maps, "riffle.dev/job=recs").await,
        "ConfigMaps are garbage collected"
    );

    // A new job (another name, another runtime identity) starts from the final savepoint.
    world.name = "recs-copy".into();
    world
        .create_with(json!({"initialSavepointPath": last, "savepointOnDeletion": false}))
        .await;
    let copy = world.wait_running(1, 2).await;
    let restored = deployed_of(&copy).restored_from;
    assert_eq!(
        restored,
        riffle_operator::upgrade::Restore::Savepoint(last.clone())
    );
}

/// Whether a savepoint's job-wide manifest is in the store.
fn savepoint_complete(bed: &Bed, location: &str) -> bool {
    let s3 = riffle_runtime::config::S3Config {
        endpoint: Some(bed.s3_endpoint.clone()),
        region: None,
        force_path_style: true,
    };
    let store = riffle_store::open(location, Some(&s3)).unwrap();
    match store.get_bytes("_savepoint.json") {
        Ok(_) => true,
        Err(e) if e.is_not_found() => false,
        Err(e) => panic!("reading {location}: {e}"),
    }
}

/// Wait until no object matches the labels (owner-reference garbage collection included).
async fn await_condition_list<K>(api: &Api<K>, labels: &str) -> bool
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let stream = watcher(api.clone(), watcher::Config::default().labels(labels)).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut live = BTreeSet::new();
    let mut synced = false;
    loop {
        if synced && live.is_empty() {
            return true;
        }
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(event))) => match event {
                watcher::Event::Init => live.clear(),
                watcher::Event::InitApply(p) | watcher::Event::Apply(p) => {
                    live.insert(p.name_any());
                }
                watcher::Event::Delete(p) => {
                    live.remove(&p.name_any());
                }
                watcher::Event::InitDone => synced = true,
            },
            _ => return false,
        }
    }
}

/// MinIO down during an upgrade's savepoint: the old generation keeps running and Degraded
/// says why; once MinIO is back the retry upgrades. Then an image without a binary: the new
/// generation fails, and the job rolls back to the last stable spec from the same savepoint.
/// Then a stop-with-savepoint by hand (the operator restarts the stopped workers), a
/// triggered savepoint and a restart by nonce.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_savepoint_keeps_the_job_running_and_a_bad_image_rolls_back() {
    let _serial = SERIAL.lock().await;
    let (world, overlap, _) = World::running("op-fail", &["op-a"]).await;
    let input = tokio::task::block_in_place(|| input(KEY_GROUPS, 16_000, 100));
    let sender = producer(&world, &input, 400);

    let outage = S3Outage::start(&world.bed);
    world.patch_spec(json!({"dataflow": {"topK": 15}})).await;
    let sj = world
        .wait("Degraded: the savepoint failed", |sj| {
            condition(sj, "Degraded") == Some("True")
                && condition_reason(sj, "Degraded")
                    .is_some_and(|r| r.starts_with("SavepointFailed"))
        })
        .await;
    drop(outage);
    let status = sj.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Upgrading"));
    let message = condition_reason(&sj, "Degraded").unwrap();
    assert!(message.contains("keeps running"), "{message}");
    // Generation 1 still runs; nothing of generation 2 exists.
    let pods = world.worker_pods().await;
    assert_eq!(pods.len(), 2, "generation 1 keeps its pods");
    assert!(pods
        .iter()
        .all(|p| p.labels()["riffle.dev/generation"] == "1" && riffle_e2e::testenv::pod_ready(p)));
    world.wait_running(2, 2).await;

    // An image the node cannot run: generation 3 fails, generation 4 is the stable spec again.
    world.patch_spec(json!({"image": "riffle-missing:1"})).await;
    let sj = world
        .wait("rolled back", |sj| {
            condition_reason(sj, "Degraded").is_some_and(|r| r.starts_with("RolledBack"))
                && sj.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                && condition(sj, "Ready") == Some("True")
        })
        .await;
    let lifecycle = sj.status.as_ref().unwrap().lifecycle.clone().unwrap();
    let deployed = lifecycle.deployed.unwrap();
    assert_eq!(deployed.generation, 4);
    assert!(
        matches!(deployed.restored_from, riffle_operator::upgrade::Restore::Savepoint(ref l) if l.contains("sp-upgrade-g2"))
    );
    for pod in world.worker_pods().await {
        assert_eq!(
            pod.spec.unwrap().containers[0].image.as_deref(),
            Some("riffle-runtime:test")
        );
    }

    // Someone stops the job behind the operator's back (`riffle savepoint --stop` on a
    // worker): the operator restarts the stopped workers, which resume their commits.
    let pods = world.worker_pods().await;
    let ip = pods[0].status.as_ref().unwrap().pod_ip.clone().unwrap();
    let (code, body) = tokio::task::block_in_place(|| {
        common::cluster::try_http(
            &format!("{ip}:9250"),
            "POST",
            "/savepoint",
            r#"{"id":"by-hand","stop":true}"#,
        )
    })
    .expect("POST /savepoint");
    assert_eq!(code, 200, "{body}");
    let stopped: BTreeSet<String> = pods.iter().map(|p| p.uid().unwrap()).collect();
    world
        .env
        .wait_list(
            world.env.api::<Pod>(),
            "riffle.dev/job=recs",
            "both workers replaced and ready",
            move |pods: &[Pod]| {
                pods.len() == 2
                    && pods.iter().all(|p| {
                        !stopped.contains(&p.uid().unwrap()) && riffle_e2e::testenv::pod_ready(p)
                    })
            },
        )
        .await;
    let events = world.event_reasons().await;
    assert!(
        events.iter().any(|r| r == "RestartingStoppedWorkers"),
        "{events:?}"
    );

    // The image is put back: that is the spec that runs, so nothing restarts and the
    // rollback is over. (A restartNonce alone would try the bad image again.)
    world
        .patch_spec(json!({"image": "riffle-runtime:test"}))
        .await;
    let sj = world
        .wait("Degraded cleared", |sj| {
            condition(sj, "Degraded") == Some("False")
        })
        .await;
    let deployed = deployed_of(&sj);
    assert_eq!(
        deployed.generation, 4,
        "the stable spec needs no new generation"
    );

    // savepointTriggerNonce: a savepoint, and the same generation goes on.
    world.patch_spec(json!({"savepointTriggerNonce": 1})).await;
    let sj = world
        .wait("the triggered savepoint", |sj| {
            sj.status
                .as_ref()
                .and_then(|s| s.last_savepoint.as_ref())
                .is_some_and(|l| l.location.contains("sp-trigger-1-4"))
        })
        .await;
    let lifecycle = sj.status.unwrap().lifecycle.unwrap();
    assert_eq!(lifecycle.deployed.unwrap().generation, 4);
    assert!(lifecycle.pending_savepoint.is_none());
    // restartNonce: a restart through a savepoint, in generation 5.
    world.patch_spec(json!({"restartNonce": 1})).await;
    let sj = world.wait_running(5, 2).await;
    let restored = deployed_of(&sj).restored_from;
    assert!(
        matches!(&restored, riffle_operator::upgrade::Restore::Savepoint(l) if l.contains("sp-restart-g4")),
        "{restored:?}"
    );

    tokio::task::block_in_place(|| sender.join().unwrap());
    finish_and_verify(&world, &input).await;
    overlap.assert_never_overlapped();
}

/// MinIO stopped until dropped (also when the test fails, so later tests find it up).
struct S3Outage(Bed);

impl S3Outage {
    fn start(bed: &Bed) -> Self {
        tokio::task::block_in_place(|| bed.testbed("s3-stop"));
        Self(bed.clone())
    }
}

impl Drop for S3Outage {
    fn drop(&mut self) {
        tokio::task::block_in_place(|| self.0.testbed("s3-start"));
    }
}

/// Two operator replicas; the leader is SIGKILLed at every step of an upgrade (and started
/// again as a standby). The other replica takes the Lease over and the job converges, exactly
/// once, never with two generations at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_killed_at_every_upgrade_step_hands_over_and_the_job_converges() {
    let _serial = SERIAL.lock().await;
    let (mut world, overlap, _) = World::running("op-kill", &["op-1", "op-2"]).await;
    let input = tokio::task::block_in_place(|| input(KEY_GROUPS, 16_000, 100));
    let sender = producer(&world, &input, 400);

    let leases = world.env.api::<Lease>();
    fn holder(lease: &Lease) -> String {
        lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default()
    }
    let mut replicas = 2;
    let first = holder(&leases.get("riffle-operator").await.unwrap());
    world.patch_spec(json!({"dataflow": {"topK": 15}})).await;
    let mut killed = Vec::new();
    for step in ["savepointing", "stopping", "waitingReady"] {
        let seen = world
            .wait(&format!("journal step {step}"), move |sj| {
                let journal = sj
                    .status
                    .as_ref()
                    .and_then(|s| s.lifecycle.as_ref())
                    .and_then(|l| l.journal.as_ref());
                let at = journal.map(|j| serde_json::to_value(&j.step).unwrap());
                let deployed = sj
                    .status
                    .as_ref()
                    .and_then(|s| s.lifecycle.as_ref())
                    .and_then(|l| l.deployed.as_ref())
                    .map(|d| d.generation);
                // A step already passed counts too (it may be short): kill at the first
                // sighting of this step or any later one.
                at == Some(json!(step))
                    || (step != "waitingReady" && deployed == Some(2))
                    || (step == "stopping" && at == Some(json!("waitingReady")))
            })
            .await;
        // The current leader (a live replica: after a kill the Lease names the dead one until
        // a standby takes it over).
        let live: BTreeSet<String> = world.operators.keys().cloned().collect();
        let lease = tokio::time::timeout(
            TIMEOUT,
            await_condition(
                leases.clone(),
                "riffle-operator",
                move |l: Option<&Lease>| l.is_some_and(|l| live.contains(&holder(l))),
            ),
        )
        .await
        .expect("a live replica holds the lease")
        .unwrap()
        .unwrap();
        let leader = holder(&lease);
        world.kill_operator(&leader);
        killed.push((
            step,
            leader,
            seen.status
                .and_then(|s| s.lifecycle)
                .and_then(|l| l.journal)
                .map(|j| j.step),
        ));
        // A new identity: a replica restarted under the old one would simply resume holding.
        replicas += 1;
        world.start_operator(&format!("op-{replicas}"));
    }
    eprintln!("killed: {killed:?}");
    world.wait_running(2, 2).await;
    let lease = leases.get("riffle-operator").await.unwrap();
    assert!(
        lease.spec.as_ref().unwrap().lease_transitions.unwrap_or(0) >= 2,
        "the lease changed hands (first holder {first}): {:?}",
        lease.spec
    );

    tokio::task::block_in_place(|| sender.join().unwrap());
    finish_and_verify(&world, &input).await;
    overlap.assert_never_overlapped();
}

/// The autoscaler on the test bed. Each worker reads at most 150 records/s
/// (`source.maxRecordsPerSecond`), so capacity grows with pods as it would with cores: 60
/// records/s fit one worker; a 400 records/s spike does not. The spike raises the lag (read
/// from Kafka by the operator), the autoscaler scales up through a savepoint, the lag drains,
/// and once every recommendation of `scaleDownDelay` is lower it scales back down. Exactly
/// once across both rescales; the decision latency and the lag peak are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_load_spike_scales_up_drains_and_scales_back_down() {
    use riffle_operator::autoscaler::Verdict;
    let _serial = SERIAL.lock().await;
    let mut world = World::new("autoscale").await;
    world.start_operator("a");
    let overlap = OverlapWatch::start(&world);
    world
        .create_with(json!({
            "parallelism": 1,
            "source": {"topics": [world.topics.input], "maxRecordsPerSecond": 150},
            "autoscaler": {
                "enabled": true, "minParallelism": 1, "maxParallelism": 4,
                "targetUtilization": 0.7, "catchUpDuration": "60s", "metricsWindow": "15s",
                "stabilizationInterval": "10s", "scaleDownDelay": "45s",
                "maxRescalesPerHour": 10,
            },
        }))
        .await;
    world.wait_running(1, 1).await;

    // 30 s at 60/s, 60 s at 300/s, then 60/s until the end (about 150 s).
    let input = input(KEY_GROUPS, 28_800, 1000);
    let n = input.records.len();
    let phases = [(0, 1_800, 60.0), (1_800, 19_800, 300.0), (19_800, n, 60.0)];
    let spike_started = Arc::new(Mutex::new(None::<std::time::Instant>));
    let producer = {
        let (bed, topic, records) = (
            world.bed.clone(),
            world.topics.input.clone(),
            input.records.clone(),
        );
        let spike_started = spike_started.clone();
        std::thread::spawn(move || {
            for (i, (from, to, rate)) in phases.into_iter().enumerate() {
                let start = std::time::Instant::now();
                if i == 1 {
                    *spike_started.lock().unwrap() = Some(start);
                }
                bed.produce_paced(&topic, &records[from..to], 50, |done| {
                    let due = Duration::from_secs_f64(done as f64 / rate);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                });
            }
        })
    };

    let applied =
        |sj: &StreamJob, verdict: Verdict| -> Option<riffle_operator::autoscaler::Decision> {
            sj.status
                .as_ref()?
                .autoscaler
                .as_ref()?
                .history
                .iter()
                .find(|d| d.applied && d.verdict == verdict)
                .cloned()
        };
    let sj = world
        .wait("an applied scale-up", move |sj| {
            applied(sj, Verdict::ScaleUp).is_some()
        })
        .await;
    let up = applied(&sj, Verdict::ScaleUp).unwrap();
    let spike_at = spike_started.lock().unwrap().expect("the spike started");
    let spike_ms = spike_at.elapsed().as_millis() as i64;
    let decided_after_ms = up.at_ms - (now_ms() - spike_ms);
    assert!(up.target > 1 && up.target <= 4, "{up:?}");
    assert!(
        up.inputs.lag > 0.0 && up.inputs.input_rate > 150.0,
        "the spike shows as lag and input rate: {up:?}"
    );
    let ready_up = world.wait_running(2, up.target).await;
    let ready_after_ms = now_ms() - up.at_ms;
    assert_eq!(
        ready_up.spec.parallelism, 1,
        "spec.parallelism stays the user's"
    );

    // The lag drains: a decision at the scaled-up parallelism sees (almost) none.
    let target = up.target;
    let drained = world
        .wait("the lag drained at the new parallelism", move |sj| {
            sj.status
                .as_ref()
                .and_then(|s| s.autoscaler.as_ref())
                .and_then(|a| a.last_decision.as_ref())
                .is_some_and(|d| d.current == target && d.inputs.lag < 300.0)
        })
        .await;
    let drained_decision = drained
        .status
        .as_ref()
        .and_then(|s| s.autoscaler.as_ref())
        .and_then(|a| a.last_decision.clone())
        .unwrap();

    // The spike's end, the drain, then every recommendation of the 45 s delay lower.
    let sj = world
        .wait_for(
            "an applied scale-down",
            Duration::from_secs(300),
            move |sj| applied(sj, Verdict::ScaleDown).is_some(),
        )
        .await;
    let down = applied(&sj, Verdict::ScaleDown).unwrap();
    assert!(down.target < up.target, "{down:?}");
    assert!(
        down.at_ms - drained_decision.at_ms >= 0,
        "down only after the lag drained"
    );
    world.wait_running(3, down.target).await;
    let history = world
        .jobs()
        .get(&world.name)
        .await
        .unwrap()
        .status
        .unwrap()
        .autoscaler
        .unwrap()
        .history;
    let peak_lag = history.iter().map(|d| d.inputs.lag).fold(0.0, f64::max);
    eprintln!(
        "autoscale: spike → scale-up decision {:.1} s (1 → {}), decision → {} workers ready {:.1} s, lag peak {:.0} records at a decision; scale-down to {} {:.1} s after the drained decision",
        decided_after_ms as f64 / 1000.0,
        up.target,
        up.target,
        ready_after_ms as f64 / 1000.0,
        peak_lag,
        down.target,
        (down.at_ms - drained_decision.at_ms) as f64 / 1000.0,
    );
    for d in history.iter().rev() {
        eprintln!(
            "  {} {:?} {} → {} applied={} lag {:.0} input {:.0}/s rate/worker {:.0}/s: {}",
            d.at_ms,
            d.verdict,
            d.current,
            d.target,
            d.applied,
            d.inputs.lag,
            d.inputs.input_rate,
            d.terms.true_rate_per_worker,
            d.message
        );
    }
    let reasons = world.event_reasons().await;
    for r in ["AutoscalerScaleUp", "AutoscalerScaleDown"] {
        assert!(reasons.iter().any(|x| x == r), "Event {r}: {reasons:?}");
    }
    let (code, metrics) =
        common::cluster::try_http(&world.metrics["a"].to_string(), "GET", "/metrics", "")
            .expect("the operator serves /metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("riffle_autoscaler_rescales_total{")
            && metrics.contains("direction=\"up\"} 1")
            && metrics.contains("direction=\"down\"} 1"),
        "{metrics}"
    );

    tokio::task::block_in_place(|| producer.join().unwrap());
    finish_and_verify(&world, &input).await;
    overlap.assert_never_overlapped();
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
