//! The reconciler: observe the cluster, let [`upgrade::decide`] choose, persist its record in
//! the status, then act. The status is written before any action (with the resourceVersion
//! read at the start, so a stale or second writer gets 409 and starts over), which makes every
//! step resumable: an operator killed between the write and the actions repeats idempotent
//! actions, one killed before the write decides again from the same record.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::{predicates, reflector, watcher, Controller, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};

use crate::autoscaler::Verdict;
use crate::autoscaling::{self, Look, Windows};
use crate::crd::{
    Condition, JobState, SavepointInfo, StreamJob, StreamJobSpec, StreamJobStatus, WorkerReport,
};
use crate::lag::LagSource;
use crate::metrics::Metrics;
use crate::render::{self, ANNOTATION_PAUSE, ANNOTATION_WORKERS, LABEL_GENERATION, LABEL_JOB};
use crate::savepoints::{SavepointStore, Tracker};
use crate::upgrade::{
    self, Action as Step, Decision, Deployment, Desired, Observed, Phase, Pods, Record,
    SavepointOutcome,
};
use crate::workers::{WorkerApi, WorkerMetrics};
use crate::Error;

/// The one field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "riffle-operator";
/// Bound of one reconcile (API calls, worker status reads, S3 checks).
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(60);
/// Held while the operator owns cleanup of a job.
pub const FINALIZER: &str = "riffle.dev/cleanup";

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub workers: Arc<dyn WorkerApi>,
    pub store: Arc<dyn SavepointStore>,
    pub tracker: Tracker,
    pub metrics: Arc<Metrics>,
    /// Where the autoscaler reads the job's offsets.
    pub lag: Arc<dyn LagSource>,
    /// The autoscaler's open metrics windows.
    pub windows: Windows,
}

impl Context {
    pub fn new(
        client: Client,
        reporter: Reporter,
        workers: Arc<dyn WorkerApi>,
        store: Arc<dyn SavepointStore>,
        metrics: Arc<Metrics>,
        lag: Arc<dyn LagSource>,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            workers,
            store,
            tracker: Tracker::default(),
            metrics,
            lag,
            windows: Windows::default(),
        }
    }
}

/// Run the controller until shutdown: StreamJobs (in each of `namespaces`, or all when it is
/// empty) and the pods they own. Only changes of spec, annotations, deletion and finalizers
/// trigger a reconcile, not the operator's own status writes; timers (from the decision) and
/// pod events do the rest. Several namespaces get one controller each (one watch per
/// namespace, so RBAC can be Roles in those namespaces only), sharing the context.
pub async fn run(
    ctx: Arc<Context>,
    namespaces: Vec<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    use futures::FutureExt;
    let shutdown = shutdown.shared();
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    futures::future::join_all(
        scopes
            .into_iter()
            .map(|ns| run_scope(ctx.clone(), ns, shutdown.clone())),
    )
    .await;
}

async fn run_scope(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (jobs, pods): (Api<StreamJob>, Api<Pod>) = match &namespace {
        Some(ns) => (
            Api::namespaced(ctx.client.clone(), ns),
            Api::namespaced(ctx.client.clone(), ns),
        ),
        None => (Api::all(ctx.client.clone()), Api::all(ctx.client.clone())),
    };
    let (reader, writer) = reflector::store();
    let trigger = watcher(jobs, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(trigger_key, Default::default());
    Controller::for_stream(trigger, reader)
        .owns(pods, watcher::Config::default().labels(LABEL_JOB))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile");
            }
        })
        .await;
}

/// What, in a StreamJob, asks for a reconcile.
fn trigger_key(sj: &StreamJob) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    predicates::generation(sj).hash(&mut h);
    sj.annotations().get(ANNOTATION_PAUSE).hash(&mut h);
    sj.metadata.deletion_timestamp.is_some().hash(&mut h);
    sj.finalizers().hash(&mut h);
    Some(h.finish())
}

pub async fn reconcile(sj: Arc<StreamJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let ns = sj.namespace().unwrap_or_default();
    let api: Api<StreamJob> = Api::namespaced(ctx.client.clone(), &ns);
    let run = finalizer(&api, FINALIZER, sj, |event| async {
        match event {
            Finalizer::Apply(sj) => apply(&sj, &ctx).await,
            Finalizer::Cleanup(sj) => cleanup(&sj, &ctx).await,
        }
    });
    // The client has no read timeout (its watches may be silent for minutes): an API server
    // that accepts a request and never answers must not hold this job's reconcile forever.
    let result = match tokio::time::timeout(RECONCILE_TIMEOUT, run).await {
        Ok(r) => r.map_err(|e| Error::Finalizer(Box::new(e))),
        Err(_) => Err(Error::Timeout(RECONCILE_TIMEOUT)),
    };
    let ok = match &result {
        Ok(_) => true,
        Err(e) => e.waiting().is_some(),
    };
    ctx.metrics.reconciled(started.elapsed(), ok);
    result
}

pub fn error_policy(sj: Arc<StreamJob>, error: &Error, _ctx: Arc<Context>) -> Action {
    if let Some(what) = error.waiting() {
        tracing::debug!(job = %sj.name_any(), what, "waiting");
        return Action::requeue(Duration::from_secs(1));
    }
    let wait = match error.api_code() {
        // Someone wrote the object since we read it: read again at once.
        Some(409) => Duration::from_millis(500),
        Some(429) => Duration::from_secs(5),
        _ => Duration::from_secs(3),
    };
    tracing::warn!(job = %sj.name_any(), error = %error, retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}

/// The pods of a job, by generation.
struct Observation {
    generations: BTreeMap<u32, Pods>,
    pods: BTreeMap<u32, Vec<Pod>>,
    /// `GET /status` of the ready workers of the deployed generation, by pod name.
    metrics: BTreeMap<String, WorkerMetrics>,
}

fn observe(pods: Vec<Pod>) -> Observation {
    let mut o = Observation {
        generations: BTreeMap::new(),
        pods: BTreeMap::new(),
        metrics: BTreeMap::new(),
    };
    for pod in pods {
        let Some(generation) = pod
            .labels()
            .get(LABEL_GENERATION)
            .and_then(|g| g.parse::<u32>().ok())
        else {
            continue;
        };
        let desired = pod
            .annotations()
            .get(ANNOTATION_WORKERS)
            .and_then(|w| w.parse().ok())
            .unwrap_or(1);
        let entry = o.generations.entry(generation).or_default();
        // An ended pod (evicted, or its process exited for good) runs nothing: it does not
        // count as existing, and is replaced (deleted, then applied again).
        if !has_ended(&pod) {
            entry.existing += 1;
        }
        entry.desired = desired;
        if is_ready(&pod) && pod.metadata.deletion_timestamp.is_none() {
            entry.ready += 1;
        }
        entry.failing |= is_failing(&pod);
        o.pods.entry(generation).or_default().push(pod);
    }
    o
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A pod that will not become ready by waiting: an image that cannot be had, a command
/// that cannot start, a crash loop, or a pod that has ended.
fn is_failing(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return false;
    };
    if status.phase.as_deref() == Some("Failed") {
        return true;
    }
    status.container_statuses.iter().flatten().any(|c| {
        c.state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.as_deref())
            .is_some_and(|r| {
                matches!(
                    r,
                    "ErrImagePull"
                        | "ImagePullBackOff"
                        | "InvalidImageName"
                        | "CrashLoopBackOff"
                        | "CreateContainerConfigError"
                        | "CreateContainerError"
                        | "RunContainerError"
                )
            })
    })
}

fn has_ended(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Failed" | "Succeeded")
    )
}

fn pod_addr(pod: &Pod) -> Option<SocketAddr> {
    let ip = pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
    Some(SocketAddr::new(ip, render::HTTP_PORT))
}

fn restarts(pods: &[Pod]) -> u32 {
    pods.iter()
        .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
        .flatten()
        .map(|c| c.restart_count.max(0) as u32)
        .sum()
}

fn desired(spec: &StreamJobSpec) -> Desired {
    Desired {
        spec_hash: render::spec_hash(spec),
        running: spec.state == JobState::Running,
        upgrade_mode: spec.upgrade_mode,
        restart_nonce: spec.restart_nonce,
        savepoint_trigger_nonce: spec.savepoint_trigger_nonce,
        initial_savepoint: spec.initial_savepoint_path.clone(),
        readiness_timeout_ms: spec.readiness_timeout.0,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The savepoint the record waits for, if any (a transition's, else an on-demand one).
fn awaited_savepoint(record: &Record) -> Option<String> {
    match &record.journal {
        Some(j) if j.step == upgrade::Step::Savepointing && j.retry_at_ms.is_none() => {
            j.savepoint_id.clone()
        }
        Some(_) => None,
        None => record.pending_savepoint.clone(),
    }
}

async fn apply(cached: &StreamJob, ctx: &Context) -> Result<Action, Error> {
    let ns = cached.namespace().unwrap_or_default();
    let name = cached.name_any();
    let api: Api<StreamJob> = Api::namespaced(ctx.client.clone(), &ns);
    // Decide on the newest record, not a possibly lagging cache: the record is the memory of
    // the state machine.
    let Some(sj) = api.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    let status = sj.status.clone().unwrap_or_default();
    if sj.annotations().get(ANNOTATION_PAUSE).map(String::as_str) == Some("true") {
        // Nothing is started, stopped or savepointed; the condition says this generation of
        // the spec was seen and left alone on purpose.
        let mut next = status.clone();
        set_condition(
            &mut next,
            "Paused",
            true,
            "ReconciliationPaused",
            &format!("{ANNOTATION_PAUSE} is \"true\": the operator leaves this job alone"),
            sj.metadata.generation,
        );
        if next != status {
            tracing::info!(job = %name, "reconciliation paused by annotation");
            write_status(&api, &sj, next).await?;
        }
        return Ok(Action::await_change());
    }
    let uid = sj.uid().unwrap_or_default();
    // The autoscaler's choice replaces spec.parallelism in everything below (hash, pods,
    // job file); the user's spec is kept for the autoscaler itself.
    let user_spec = sj.spec.clone();
    let mut sj = sj;
    sj.spec.parallelism =
        autoscaling::effective_parallelism(&user_spec, status.autoscaler.as_ref());

    // A spec the runtime would refuse never reaches a pod: the job goes on with the spec it
    // runs (transitions in flight continue, lost pods are replaced), and the status says why.
    let invalid = render::job_config(&sj, &sj.spec).err();
    if let Some(e) = &invalid {
        if status.last_error.as_deref() != Some(&e.to_string()) {
            publish(ctx, &sj, true, "InvalidSpec", e.to_string()).await;
        }
    }
    let record = status.lifecycle.clone().unwrap_or_default();
    if let Some(e) = &invalid {
        match &record.deployed {
            Some(_) => {}
            None => {
                // Nothing runs and nothing can start.
                let mut next = status.clone();
                let e = e.to_string();
                next.observed_generation = sj.metadata.generation;
                next.last_error = Some(e.clone());
                set_condition(
                    &mut next,
                    "Degraded",
                    true,
                    "InvalidSpec",
                    &e,
                    sj.metadata.generation,
                );
                if next != status {
                    write_status(&api, &sj, next).await?;
                }
                return Ok(Action::await_change());
            }
        }
    }

    let service = render::service(&sj);
    Api::<Service>::namespaced(ctx.client.clone(), &ns)
        .patch(
            &render::service_name(&name),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&service),
        )
        .await?;

    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pods = pods_api
        .list(&ListParams::default().labels(&render::selector(&sj)))
        .await?
        .items;
    let mut observation = observe(pods);
    read_workers(ctx, &record, &mut observation).await;

    let now = now_ms();
    let (autoscaled, decided) = match render::job_config(&sj, &sj.spec) {
        Ok(cfg) if invalid.is_none() => {
            let group = cfg.internal_topic_prefix();
            let look = Look {
                uid: &uid,
                spec: &user_spec,
                status: &status,
                record: &record,
                pods: record
                    .deployed
                    .as_ref()
                    .and_then(|d| observation.generations.get(&d.generation).copied()),
                metrics: &observation.metrics,
                group: &group,
                now_ms: now,
            };
            autoscaling::step(&ctx.windows, ctx.lag.as_ref(), look).await
        }
        _ => (status.autoscaler.clone(), None),
    };
    sj.spec.parallelism = autoscaling::effective_parallelism(&user_spec, autoscaled.as_ref());
    let mut desired = desired(&sj.spec);
    if invalid.is_some() {
        if let Some(dep) = &record.deployed {
            desired.spec_hash = dep.spec_hash.clone();
            desired.restart_nonce = dep.restart_nonce;
        }
    }
    let store_url = render::savepoint_store(&sj.spec);
    let s3 = sj.spec.storage.s3.clone();
    let savepoint = match awaited_savepoint(&record) {
        Some(id) => {
            let wire = render::wire_savepoint_id(&sj, &id);
            let location = format!("{}/{wire}", store_url.trim_end_matches('/'));
            ctx.tracker
                .outcome(&ctx.store, &uid, &wire, location, s3.clone())
                .await
        }
        None => SavepointOutcome::NotRequested,
    };
    let obs = Observed {
        now_ms: now,
        generations: observation.generations.clone(),
        savepoint,
    };
    let decision = upgrade::decide(&desired, &record, &obs);

    let report = worker_report(&decision.record, &observation);
    let mut next = next_status(&sj, &status, &decision, &observation, report);
    if let Some(e) = &invalid {
        next.last_error = Some(e.to_string());
        set_condition(
            &mut next,
            "Degraded",
            true,
            "InvalidSpec",
            &e.to_string(),
            sj.metadata.generation,
        );
    }
    next.autoscaler = autoscaled;
    let expired = expired_savepoints(&sj, &mut next);
    // Written whenever something will be done, even if unchanged: the write carries the
    // resourceVersion this decision was made on, so a deposed leader (or any stale reader)
    // gets 409 here instead of acting.
    if next != status || !decision.actions.is_empty() || !expired.is_empty() {
        write_status(&api, &sj, next.clone()).await?;
    }
    if let Some(d) = &decided {
        ctx.metrics.autoscaler_decided(&ns, &name, d);
        if d.verdict != Verdict::Keep {
            let reason = match (d.applied, d.verdict) {
                (true, Verdict::ScaleUp) => "AutoscalerScaleUp",
                (true, _) => "AutoscalerScaleDown",
                (false, _) => "AutoscalerRecommendation",
            };
            let note = if d.applied {
                d.message.clone()
            } else {
                format!("{} ({}): {}", d.recommended, d.reason, d.message)
            };
            publish(ctx, &sj, false, reason, note).await;
        }
    }
    // The record is persisted: act.
    for action in &decision.actions {
        if let Err(e) = act(ctx, &sj, &next, &observation, action).await {
            publish(ctx, &sj, true, "ActionFailed", format!("{action:?}: {e}")).await;
            return Err(e);
        }
    }
    dispose_savepoints(ctx, &sj, expired).await;
    // Answers the record no longer waits for are not needed again.
    let keep: Vec<String> = awaited_savepoint(&decision.record)
        .map(|id| render::wire_savepoint_id(&sj, &id))
        .into_iter()
        .collect();
    ctx.tracker
        .forget(&uid, &keep.iter().map(String::as_str).collect::<Vec<_>>());
    // Worker figures refresh every 10 s in steady state.
    let requeue = decision.requeue_ms.clamp(200, 10_000);
    Ok(Action::requeue(Duration::from_millis(requeue as u64)))
}

async fn write_status(
    api: &Api<StreamJob>,
    sj: &StreamJob,
    status: StreamJobStatus,
) -> Result<(), Error> {
    let mut obj = sj.clone();
    obj.status = Some(status);
    // `replace_status` carries the resourceVersion read at the start: a concurrent writer
    // (or a deposed leader) gets 409 Conflict instead of overwriting a newer record.
    api.replace_status(
        &sj.name_any(),
        &PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        },
        &obj,
    )
    .await?;
    Ok(())
}

/// Ask the ready workers of the deployed generation for their figures; count the stopped.
async fn read_workers(ctx: &Context, record: &Record, o: &mut Observation) {
    let Some(dep) = record.deployed.as_ref() else {
        return;
    };
    let Some(pods) = o.pods.get(&dep.generation) else {
        return;
    };
    let calls: Vec<_> = pods
        .iter()
        .filter(|p| is_ready(p))
        .filter_map(|p| Some((p.name_any(), ctx.workers.metrics(pod_addr(p)?))))
        .collect();
    let (names, calls): (Vec<String>, Vec<_>) = calls.into_iter().unzip();
    for (name, m) in names
        .into_iter()
        .zip(futures::future::join_all(calls).await)
    {
        if let Ok(m) = m {
            o.metrics.insert(name, m);
        }
    }
    if let Some(p) = o.generations.get_mut(&dep.generation) {
        p.stopped = o.metrics.values().filter(|m| m.stopped).count() as u32;
    }
}

/// The workers' own figures, summed or at their minimum, for the status.
fn worker_report(record: &Record, o: &Observation) -> Option<WorkerReport> {
    let dep = record.deployed.as_ref()?;
    let mut report = WorkerReport {
        generation: dep.generation,
        ..Default::default()
    };
    let names: Vec<String> = o
        .pods
        .get(&dep.generation)?
        .iter()
        .map(|p| p.name_any())
        .collect();
    for m in names.iter().filter_map(|n| o.metrics.get(n)) {
        report.ready += u32::from(m.ready);
        report.lag += m.lag.max(0);
        report.events_per_second += m.events_per_second;
        report.watermark = match (report.watermark, m.watermark) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if m.last_checkpoint_id > 0 {
            let c = m.last_checkpoint_id as i64;
            report.last_checkpoint = Some(report.last_checkpoint.map_or(c, |l| l.min(c)));
        }
    }
    Some(report)
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Pending => "Pending",
        Phase::Running => "Running",
        Phase::Upgrading => "Upgrading",
        Phase::RollingBack => "RollingBack",
        Phase::Suspending => "Suspending",
        Phase::Suspended => "Suspended",
        Phase::Failed => "Failed",
    }
}

fn next_status(
    sj: &StreamJob,
    prev: &StreamJobStatus,
    d: &Decision,
    o: &Observation,
    workers: Option<WorkerReport>,
) -> StreamJobStatus {
    let mut s = prev.clone();
    let generation = sj.metadata.generation;
    s.phase = Some(phase_name(d.phase).into());
    s.observed_generation = generation;
    s.selector = Some(render::selector(sj));
    let deployed = d.record.deployed.as_ref().map(|dep| dep.generation);
    s.parallelism = deployed
        .and_then(|g| o.generations.get(&g))
        .map_or(0, |p| p.existing);
    s.restarts = deployed
        .and_then(|g| o.pods.get(&g))
        .map_or(0, |p| restarts(p));
    s.workers = workers;
    // The spec each deployment was made from, and the one a rollback returns to.
    let current = render::spec_hash(&sj.spec);
    let prev_record = prev.lifecycle.as_ref();
    if let Some(dep) = &d.record.deployed {
        if dep.spec_hash == current && prev_record.and_then(|r| r.deployed.as_ref()) != Some(dep) {
            s.deployed_spec = serde_json::to_string(&sj.spec).ok();
        }
    }
    if let Some(stable) = &d.record.last_stable {
        if prev_record.and_then(|r| r.last_stable.as_ref()) != Some(stable) {
            let made_from = [
                Some(&sj.spec).cloned(),
                parse_spec(s.deployed_spec.as_deref()),
            ];
            if let Some(spec) = made_from
                .into_iter()
                .flatten()
                .find(|spec| render::spec_hash(spec) == stable.spec_hash)
            {
                s.last_stable_spec = serde_json::to_string(&spec).ok();
            }
        }
    }
    if d.record.last_savepoint
        != prev
            .lifecycle
            .as_ref()
            .and_then(|r| r.last_savepoint.clone())
    {
        if let Some(location) = &d.record.last_savepoint {
            let trigger = match d.record.journal.as_ref().map(|j| j.purpose) {
                Some(p) => format!("{p:?}"),
                None => "Manual".into(),
            };
            let info = SavepointInfo {
                location: location.clone(),
                trigger,
                time: now_rfc3339(),
            };
            s.last_savepoint = Some(info.clone());
            s.savepoints.retain(|i| i.location != info.location);
            s.savepoints.insert(0, info);
        }
    }
    s.lifecycle = Some(d.record.clone());
    s.last_error = d.degraded.clone();
    s.conditions.retain(|c| c.type_ != "Paused");
    let ready_pods = deployed
        .and_then(|g| o.generations.get(&g))
        .is_some_and(|p| p.desired > 0 && p.ready >= p.desired);
    let ready = d.phase == Phase::Running && ready_pods;
    let health = match &s.workers {
        Some(w) => format!(
            "{} of {} workers ready, lag {} records, {} container restarts, last checkpoint {}",
            w.ready,
            s.parallelism,
            w.lag,
            s.restarts,
            w.last_checkpoint
                .map_or("none yet".into(), |c| format!("#{c}"))
        ),
        None => "no worker figures yet".into(),
    };
    let (ready_reason, ready_msg) = match (d.phase, ready_pods) {
        (Phase::Running, true) => ("Running", health),
        (Phase::Suspended, _) => ("Suspended", "the job is suspended".to_string()),
        (p, _) => (phase_name(p), format!("phase {}", phase_name(p))),
    };
    set_condition(&mut s, "Ready", ready, ready_reason, &ready_msg, generation);
    let progressing = matches!(
        d.phase,
        Phase::Pending | Phase::Upgrading | Phase::RollingBack | Phase::Suspending
    );
    let step = d
        .record
        .journal
        .as_ref()
        .map(|j| format!("{:?} at step {:?}", j.purpose, j.step))
        .unwrap_or_else(|| phase_name(d.phase).to_string());
    set_condition(
        &mut s,
        "Progressing",
        progressing,
        if progressing {
            phase_name(d.phase)
        } else {
            "Stable"
        },
        &step,
        generation,
    );
    match &d.degraded {
        Some(msg) => set_condition(&mut s, "Degraded", true, d.degraded_reason, msg, generation),
        None => set_condition(
            &mut s,
            "Degraded",
            false,
            "Healthy",
            "no failures",
            generation,
        ),
    }
    s
}

/// Set a condition; its transition time moves only when its status does.
fn set_condition(
    s: &mut StreamJobStatus,
    type_: &str,
    on: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let status = if on { "True" } else { "False" };
    let reason = if reason.is_empty() { "Unknown" } else { reason };
    let time = match s.conditions.iter().find(|c| c.type_ == type_) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now_rfc3339(),
    };
    s.conditions.retain(|c| c.type_ != type_);
    s.conditions.push(Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: time,
        observed_generation: generation,
    });
    s.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
}

/// Keep `savepointRetention.maxCount` savepoints in the status (never dropping one a
/// deployment restores from); returns the dropped ones, to be deleted from the store once
/// the status is written.
fn expired_savepoints(sj: &StreamJob, s: &mut StreamJobStatus) -> Vec<String> {
    let max = sj.spec.savepoint_retention.max_count.max(1) as usize;
    if s.savepoints.len() <= max {
        return Vec::new();
    }
    let pinned = pinned_savepoints(s.lifecycle.as_ref());
    let mut expired = Vec::new();
    let mut kept = Vec::new();
    for (i, info) in s.savepoints.drain(..).enumerate() {
        if i < max || pinned.contains(&info.location) {
            kept.push(info);
        } else {
            expired.push(info.location);
        }
    }
    s.savepoints = kept;
    expired
}

/// Delete savepoints from the store; a failure leaves the objects (and says so).
async fn dispose_savepoints(ctx: &Context, sj: &StreamJob, locations: Vec<String>) {
    for location in locations {
        match ctx
            .store
            .dispose(location.clone(), sj.spec.storage.s3.clone())
            .await
        {
            Ok(n) => tracing::info!(%location, objects = n, "disposed savepoint"),
            Err(e) => {
                tracing::warn!(%location, error = %e, "disposing savepoint failed");
                publish(
                    ctx,
                    sj,
                    true,
                    "DisposeFailed",
                    format!("savepoint {location} was not deleted: {e}"),
                )
                .await;
            }
        }
    }
}

fn pinned_savepoints(record: Option<&Record>) -> Vec<String> {
    use upgrade::Restore;
    let Some(r) = record else { return Vec::new() };
    let mut restores: Vec<&Restore> = Vec::new();
    restores.extend(r.deployed.as_ref().map(|d| &d.restored_from));
    restores.extend(r.last_stable.as_ref().map(|d| &d.restored_from));
    restores.extend(r.suspended_at.as_ref());
    restores.extend(r.journal.as_ref().and_then(|j| j.restore.as_ref()));
    restores
        .into_iter()
        .filter_map(|r| match r {
            Restore::Savepoint(l) => Some(l.clone()),
            _ => None,
        })
        .collect()
}

/// The spec a deployment was made from: the current one, or the remembered stable one on a
/// rollback.
fn spec_for(
    sj: &StreamJob,
    status: &StreamJobStatus,
    dep: &Deployment,
) -> Result<StreamJobSpec, Error> {
    [
        Some(sj.spec.clone()),
        parse_spec(status.last_stable_spec.as_deref()),
        parse_spec(status.deployed_spec.as_deref()),
    ]
    .into_iter()
    .flatten()
    .find(|spec| render::spec_hash(spec) == dep.spec_hash)
    .ok_or_else(|| {
        Error::InvalidSpec(format!(
            "generation {} needs spec {}, which is neither the current, the deployed nor the \
             last stable one",
            dep.generation, dep.spec_hash
        ))
    })
}

fn parse_spec(json: Option<&str>) -> Option<StreamJobSpec> {
    serde_json::from_str(json?).ok()
}

async fn act(
    ctx: &Context,
    sj: &StreamJob,
    status: &StreamJobStatus,
    o: &Observation,
    action: &Step,
) -> Result<(), Error> {
    let ns = sj.namespace().unwrap_or_default();
    let name = sj.name_any();
    match action {
        Step::Event {
            warning,
            reason,
            message,
        } => {
            publish(ctx, sj, *warning, reason, message.clone()).await;
        }
        Step::RequestSavepoint {
            generation,
            id,
            stop,
        } => {
            let wire = render::wire_savepoint_id(sj, id);
            let uid = sj.uid().unwrap_or_default();
            // Any worker will do (the others join through the exchange); the first ready one.
            let mut pods: Vec<&Pod> = o
                .pods
                .get(generation)
                .into_iter()
                .flatten()
                .filter(|p| is_ready(p) && p.metadata.deletion_timestamp.is_none())
                .collect();
            pods.sort_by_key(|p| p.name_any());
            match pods.first().and_then(|p| pod_addr(p)) {
                Some(addr) => {
                    tracing::info!(job = %name, savepoint = %wire, %addr, stop, "requesting savepoint");
                    ctx.tracker.request(&ctx.workers, &uid, addr, &wire, *stop);
                }
                None => ctx.tracker.fail(
                    &uid,
                    &wire,
                    format!("no ready worker of generation {generation} to take it"),
                ),
            }
        }
        Step::DeleteGeneration(generation) => {
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            let mut deleted = 0;
            for pod in o.pods.get(generation).into_iter().flatten() {
                if pod.metadata.deletion_timestamp.is_none() {
                    deleted += u32::from(delete(&pods, &pod.name_any()).await?);
                }
            }
            let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
            delete(&cms, &render::config_map_name(&name, *generation)).await?;
            if deleted > 0 {
                tracing::info!(job = %name, generation, pods = deleted, "deleting generation");
            }
        }
        Step::RestartStoppedWorkers(generation) => {
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            for pod in o.pods.get(generation).into_iter().flatten() {
                let stopped = o.metrics.get(&pod.name_any()).is_some_and(|m| m.stopped);
                if stopped && pod.metadata.deletion_timestamp.is_none() {
                    tracing::warn!(job = %name, pod = %pod.name_any(), "restarting a worker left stopped by a failed savepoint");
                    delete(&pods, &pod.name_any()).await?;
                }
            }
        }
        Step::StartGeneration(dep) => {
            let spec = spec_for(sj, status, dep)?;
            let cfg = render::job_config(sj, &spec)?;
            let params = PatchParams::apply(FIELD_MANAGER).force();
            // Created once: the ConfigMap is immutable, and a generation's job file never
            // changes (an operator rendering it differently later must not touch it).
            let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
            let cm_name = render::config_map_name(&name, dep.generation);
            if cms.get_opt(&cm_name).await?.is_none() {
                let cm = render::config_map(sj, &cfg, dep.generation)?;
                cms.patch(&cm_name, &params, &Patch::Apply(&cm)).await?;
            }
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            let mut started = 0;
            for index in 0..spec.parallelism {
                let pod_name = render::pod_name(&name, dep.generation, index);
                let existing = o
                    .pods
                    .get(&dep.generation)
                    .into_iter()
                    .flatten()
                    .find(|p| p.name_any() == pod_name);
                match existing {
                    // Pods are immutable: one that runs stays as it is.
                    Some(p) if !has_ended(p) => {}
                    // An ended pod makes room first; the next reconcile applies it again.
                    Some(p) => {
                        if p.metadata.deletion_timestamp.is_none() {
                            delete(&pods, &pod_name).await?;
                        }
                    }
                    None => {
                        let pod = render::worker_pod(sj, &spec, dep, index);
                        pods.patch(&pod_name, &params, &Patch::Apply(&pod)).await?;
                        started += 1;
                    }
                }
            }
            if started > 0 {
                tracing::info!(job = %name, generation = dep.generation, pods = started, workers = spec.parallelism, restore = ?dep.restored_from, "applied generation");
            }
        }
    }
    Ok(())
}

/// Delete an object (gracefully); one that is already gone is not an error. Returns whether
/// this call deleted it.
async fn delete<K>(api: &Api<K>, name: &str) -> Result<bool, Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

async fn publish(ctx: &Context, sj: &StreamJob, warning: bool, reason: &str, note: String) {
    let event = KubeEvent {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &sj.object_ref(&())).await {
        tracing::warn!(job = %sj.name_any(), error = %e, "publishing an event failed");
    }
}

enum FinalSavepoint {
    /// Requested or in progress: look again shortly.
    Wait,
    /// Taken (or impossible, or failed: deletion goes on); a note for the deletion Event.
    Done(String),
}

/// `savepointOnDeletion`: a stop-with-savepoint of the running generation before its pods
/// go. A deletion never hangs on it: without a ready worker, or when it fails, the job is
/// deleted anyway and the Event says so.
async fn final_savepoint_step(sj: &StreamJob, ctx: &Context, pods: Vec<Pod>) -> FinalSavepoint {
    let record = sj
        .status
        .as_ref()
        .and_then(|s| s.lifecycle.clone())
        .unwrap_or_default();
    let Some(dep) = record.deployed else {
        return FinalSavepoint::Done(" (no generation ran: no final savepoint)".into());
    };
    let observation = observe(pods);
    let id = format!("sp-delete-g{}", dep.generation);
    let wire = render::wire_savepoint_id(sj, &id);
    let uid = sj.uid().unwrap_or_default();
    let location = format!(
        "{}/{wire}",
        render::savepoint_store(&sj.spec).trim_end_matches('/')
    );
    let outcome = ctx
        .tracker
        .outcome(
            &ctx.store,
            &uid,
            &wire,
            location,
            sj.spec.storage.s3.clone(),
        )
        .await;
    match outcome {
        SavepointOutcome::Pending => FinalSavepoint::Wait,
        SavepointOutcome::Completed(location) => {
            tracing::info!(job = %sj.name_any(), %location, "final savepoint taken");
            FinalSavepoint::Done(format!(" after a final savepoint at {location}"))
        }
        SavepointOutcome::Failed(reason) => {
            publish(
                ctx,
                sj,
                true,
                "FinalSavepointFailed",
                format!("the final savepoint failed ({reason}); deleting anyway"),
            )
            .await;
            FinalSavepoint::Done(" without a final savepoint (it failed)".into())
        }
        SavepointOutcome::NotRequested => {
            let ready = observation
                .generations
                .get(&dep.generation)
                .is_some_and(|p| p.ready > 0);
            if !ready {
                return FinalSavepoint::Done(" (no ready worker: no final savepoint)".into());
            }
            act(
                ctx,
                sj,
                &StreamJobStatus::default(),
                &observation,
                &Step::RequestSavepoint {
                    generation: dep.generation,
                    id,
                    stop: true,
                },
            )
            .await
            .map_or(
                FinalSavepoint::Done(" (the final savepoint could not be requested)".into()),
                |()| FinalSavepoint::Wait,
            )
        }
    }
}

/// Deletion: stop the workers, dispose of the savepoints if asked, then let the finalizer go.
/// Idempotent: every step tolerates what an earlier attempt already did.
async fn cleanup(sj: &StreamJob, ctx: &Context) -> Result<Action, Error> {
    let ns = sj.namespace().unwrap_or_default();
    let name = sj.name_any();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let lp = ListParams::default().labels(&render::selector(sj));
    let listed = pods.list(&lp).await?.items;
    let mut final_savepoint = None;
    if sj.spec.savepoint_on_deletion {
        match final_savepoint_step(sj, ctx, listed.clone()).await {
            // An error, not a requeue: the finalizer goes as soon as cleanup returns Ok.
            FinalSavepoint::Wait => {
                return Err(Error::Waiting("the final savepoint is in progress".into()))
            }
            FinalSavepoint::Done(note) => final_savepoint = Some(note),
        }
    }
    for pod in listed {
        if pod.metadata.deletion_timestamp.is_none() {
            delete(&pods, &pod.name_any()).await?;
        }
    }
    let status = sj.status.clone().unwrap_or_default();
    if sj.spec.savepoint_retention.dispose_on_delete {
        let mut locations: Vec<String> = status
            .savepoints
            .iter()
            .map(|s| s.location.clone())
            .collect();
        locations.extend(status.last_savepoint.iter().map(|s| s.location.clone()));
        locations.sort();
        locations.dedup();
        // A deletion never hangs on the store: what cannot be deleted is named in an Event.
        dispose_savepoints(ctx, sj, locations).await;
    }
    ctx.tracker.forget_job(&sj.uid().unwrap_or_default());
    ctx.windows.forget(&sj.uid().unwrap_or_default());
    ctx.metrics
        .forget_job(&sj.namespace().unwrap_or_default(), &sj.name_any());
    publish(
        ctx,
        sj,
        false,
        "Deleted",
        format!(
            "workers of {name} stopped{}; savepoints {}",
            final_savepoint.unwrap_or_default(),
            if sj.spec.savepoint_retention.dispose_on_delete {
                "disposed"
            } else {
                "kept"
            }
        ),
    )
    .await;
    Ok(Action::await_change())
}

/// Now, as RFC 3339 UTC (condition and savepoint times).
fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map_or_else(
            |_| k8s_openapi::jiff::Timestamp::now().to_string(),
            |t| t.to_string(),
        )
}
