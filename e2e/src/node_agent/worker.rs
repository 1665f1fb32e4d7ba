//! One task per pod: prepares the sandbox, runs init containers then containers, probes
//! them, restarts them per `restartPolicy`, publishes the status and handles deletion.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodCondition};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::Api;
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::node_agent::agent::Shared;
use crate::node_agent::probe::{run_probe, ProbeSpec, ProbeTracker};
use crate::node_agent::process::{exit_details, signal_group, spawn};
use crate::node_agent::sandbox::{prepare, PreparedContainer, SandboxContext};
use crate::node_agent::status::{
    build_conditions, pod_phase, pod_status, ConditionInputs, ContainerSnapshot, Phase,
    PodStatusInputs, RestartPolicy, State, Termination,
};
use crate::node_agent::Error;

/// First restart delay; doubles up to [`BACKOFF_MAX`]. Shorter than the kubelet's 10s/5min
/// so that tests observing restarts stay fast.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(20);
/// A run longer than this resets the back-off.
const BACKOFF_RESET: Duration = Duration::from_secs(60);
/// Housekeeping period (probe scheduling, restarts, kill deadlines).
const TICK: Duration = Duration::from_millis(200);
/// Grace period used when the agent itself shuts down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the agent's pod watch tells a worker.
#[derive(Debug, Clone)]
pub enum PodUpdate {
    /// The latest version of the pod.
    Present(Arc<Pod>),
    /// The pod object is gone from the API.
    Gone,
}

#[derive(Debug)]
enum Event {
    Exited {
        idx: usize,
        generation: u64,
        status: std::io::Result<std::process::ExitStatus>,
    },
    Probed {
        idx: usize,
        generation: u64,
        liveness: bool,
        result: Result<(), String>,
    },
}

struct Run {
    prepared: PreparedContainer,
    snapshot: ContainerSnapshot,
    init: bool,
    generation: u64,
    pid: Option<u32>,
    started: Option<(Instant, Timestamp)>,
    readiness: Option<ProbeTracker>,
    liveness: Option<ProbeTracker>,
    restart_at: Option<Instant>,
    backoff: Duration,
    kill_deadline: Option<Instant>,
    /// Set once an init container succeeded or a container will not run again.
    finished: bool,
}

impl Run {
    fn new(prepared: PreparedContainer, init: bool) -> Self {
        let snapshot =
            ContainerSnapshot::waiting(&prepared.name, &prepared.image, "ContainerCreating");
        Self {
            prepared,
            snapshot,
            init,
            generation: 0,
            pid: None,
            started: None,
            readiness: None,
            liveness: None,
            restart_at: Some(Instant::now()),
            backoff: BACKOFF_BASE,
            kill_deadline: None,
            finished: false,
        }
    }
}

struct Worker {
    shared: Arc<Shared>,
    pod: Arc<Pod>,
    namespace: String,
    name: String,
    uid: String,
    /// The address held from the allocator.
    ip: Option<Ipv4Addr>,
    /// The address reported in the status (kept after a finished pod released it).
    reported_ip: Option<Ipv4Addr>,
    policy: RestartPolicy,
    runs: Vec<Run>,
    init_count: usize,
    prepared: bool,
    prepare_error: Option<(String, String)>,
    next_prepare: Instant,
    prepare_backoff: Duration,
    start_time: Timestamp,
    conditions: Vec<PodCondition>,
    last_sent: Option<serde_json::Value>,
    terminal: Option<Phase>,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
}

/// Runs the pod until it is deleted (or the agent shuts down).
pub async fn run_pod(
    shared: Arc<Shared>,
    pod: Arc<Pod>,
    mut updates: watch::Receiver<PodUpdate>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let spec = pod.spec.clone().unwrap_or_default();
    let existing_phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let terminal = match existing_phase {
        Some("Succeeded") => Some(Phase::Succeeded),
        Some("Failed") => Some(Phase::Failed),
        _ => None,
    };
    let mut worker = Worker {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        policy: RestartPolicy::parse(spec.restart_policy.as_deref()),
        init_count: spec.init_containers.as_ref().map_or(0, Vec::len),
        conditions: pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default(),
        pod,
        shared,
        ip: None,
        reported_ip: None,
        runs: Vec::new(),
        prepared: false,
        prepare_error: None,
        next_prepare: Instant::now(),
        prepare_backoff: Duration::from_secs(1),
        start_time: Timestamp::now(),
        last_sent: None,
        terminal,
        events_tx,
        events_rx,
    };
    tracing::info!(namespace = %worker.namespace, pod = %worker.name, uid = %worker.uid, "pod accepted");
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if worker.pod.metadata.deletion_timestamp.is_some() {
            worker.delete_pod().await;
            return;
        }
        worker.step().await;
        worker.publish().await;
        tokio::select! {
            Some(event) = worker.events_rx.recv() => worker.handle(event),
            changed = updates.changed() => {
                let update = if changed.is_ok() { updates.borrow_and_update().clone() } else { PodUpdate::Gone };
                match update {
                    PodUpdate::Present(pod) => worker.pod = pod,
                    PodUpdate::Gone => {
                        tracing::info!(namespace = %worker.namespace, pod = %worker.name, "pod object gone: stopping");
                        worker.stop_all(SHUTDOWN_GRACE).await;
                        worker.release_ip();
                        return;
                    }
                }
            }
            _ = shutdown.changed() => {
                worker.stop_all(SHUTDOWN_GRACE).await;
                worker.release_ip();
                return;
            }
            _ = tick.tick() => {}
        }
    }
}

impl Worker {
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn grace_period(&self) -> Duration {
        let secs = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30);
        Duration::from_secs(u64::try_from(secs).unwrap_or(0))
    }

    fn release_ip(&mut self) {
        if let Some(ip) = self.ip.take() {
            self.shared.ipam.release(ip);
        }
    }

    /// Makes progress: prepare, start due containers, run due probes, escalate kills.
    async fn step(&mut self) {
        if self.terminal.is_some() {
            return;
        }
        let now = Instant::now();
        if !self.prepared {
            if now < self.next_prepare {
                return;
            }
            self.try_prepare().await;
            if !self.prepared {
                return;
            }
        }
        // Escalate pending kills.
        for run in &mut self.runs {
            if let (Some(deadline), Some(pid)) = (run.kill_deadline, run.pid) {
                if now >= deadline {
                    signal_group(pid, Signal::SIGKILL);
                    run.kill_deadline = None;
                }
            }
        }
        // Init containers first, one at a time.
        let init_pending = self.runs[..self.init_count]
            .iter()
            .position(|r| !r.finished);
        let startable: Vec<usize> = match init_pending {
            Some(i) => vec![i],
            None => (self.init_count..self.runs.len()).collect(),
        };
        for idx in startable {
            let run = &self.runs[idx];
            if run.pid.is_none() && !run.finished && run.restart_at.is_some_and(|t| now >= t) {
                self.start(idx);
            }
        }
        // Probes.
        let ip = self.ip.map(IpAddr::V4);
        for (idx, run) in self.runs.iter_mut().enumerate() {
            if run.pid.is_none() || run.kill_deadline.is_some() {
                continue;
            }
            let Some(ip) = ip else { continue };
            for liveness in [false, true] {
                let tracker = if liveness {
                    run.liveness.as_mut()
                } else {
                    run.readiness.as_mut()
                };
                let Some(tracker) = tracker else { continue };
                if !tracker.start_if_due(now) {
                    continue;
                }
                let spec = tracker.spec().clone();
                let env = run.prepared.env.clone();
                let tx = self.events_tx.clone();
                let generation = run.generation;
                tokio::spawn(async move {
                    let result = run_probe(&spec, ip, &env).await;
                    let _ = tx.send(Event::Probed {
                        idx,
                        generation,
                        liveness,
                        result,
                    });
                });
            }
        }
    }

    async fn try_prepare(&mut self) {
        if self.ip.is_none() {
            match self.shared.ipam.allocate(&self.key()) {
                Ok(ip) => {
                    self.ip = Some(ip);
                    self.reported_ip = Some(ip);
                }
                Err(e) => {
                    self.prepare_failed("CreatePodSandboxError", e.to_string());
                    return;
                }
            }
        }
        let Some(ip) = self.ip else { return };
        let ctx = SandboxContext {
            client: &self.shared.client,
            cluster: &self.shared.cluster,
            images: &self.shared.images,
            node_name: &self.shared.node_name,
            host_ip: &self.shared.host_ip,
            state_dir: &self.shared.state_dir,
        };
        match prepare(&ctx, &self.pod, ip).await {
            Ok(sandbox) => {
                tracing::info!(pod = %self.key(), ip = %ip, dir = %sandbox.dir.root().display(), "sandbox ready");
                self.runs = sandbox
                    .init_containers
                    .into_iter()
                    .map(|c| Run::new(c, true))
                    .chain(sandbox.containers.into_iter().map(|c| Run::new(c, false)))
                    .collect();
                self.prepared = true;
                self.prepare_error = None;
            }
            Err(e) => {
                let reason = match e {
                    Error::UnmappedImage(_) => "ErrImagePull",
                    _ => "CreateContainerConfigError",
                };
                self.prepare_failed(reason, e.to_string());
            }
        }
    }

    fn prepare_failed(&mut self, reason: &str, message: String) {
        tracing::warn!(pod = %self.key(), reason, message = %message, "cannot prepare pod; will retry");
        self.prepare_error = Some((reason.to_owned(), message));
        self.next_prepare = Instant::now() + self.prepare_backoff;
        self.prepare_backoff = (self.prepare_backoff * 2).min(Duration::from_secs(10));
    }

    fn start(&mut self, idx: usize) {
        let run = &mut self.runs[idx];
        run.generation += 1;
        run.restart_at = None;
        match spawn(&run.prepared) {
            Ok(spawned) => {
                let now = Instant::now();
                let started_at = Timestamp::now();
                tracing::info!(pod = %format!("{}/{}", self.namespace, self.name), container = %run.prepared.name,
                    pid = spawned.pid, program = %run.prepared.program.display(), "container started");
                run.pid = Some(spawned.pid);
                run.started = Some((now, started_at));
                run.snapshot.state = State::Running {
                    started_at,
                    pid: spawned.pid,
                };
                let spec = &run.prepared.spec;
                run.readiness = spec
                    .readiness_probe
                    .as_ref()
                    .filter(|_| !run.init)
                    .map(|p| ProbeTracker::new(ProbeSpec::from_api(p, spec), now, false));
                run.liveness = spec
                    .liveness_probe
                    .as_ref()
                    .filter(|_| !run.init)
                    .map(|p| ProbeTracker::new(ProbeSpec::from_api(p, spec), now, true));
                run.snapshot.ready = !run.init && run.readiness.is_none();
                let tx = self.events_tx.clone();
                let generation = run.generation;
                let mut child = spawned.child;
                tokio::spawn(async move {
                    let status = child.wait().await;
                    let _ = tx.send(Event::Exited {
                        idx,
                        generation,
                        status,
                    });
                });
            }
            Err(e) => {
                tracing::warn!(pod = %format!("{}/{}", self.namespace, self.name), container = %run.prepared.name, error = %e, "container start failed");
                let mut termination = Termination::new(Some(128), None, None, Timestamp::now());
                termination.reason = "StartError".to_owned();
                termination.message = Some(e.to_string());
                self.container_ended(idx, termination);
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Exited {
                idx,
                generation,
                status,
            } => {
                let Some(run) = self.runs.get(idx) else {
                    return;
                };
                if run.generation != generation {
                    return;
                }
                let (code, signal) = match status {
                    Ok(status) => exit_details(status),
                    Err(e) => {
                        tracing::warn!(error = %e, "waiting for a container failed");
                        (Some(128), None)
                    }
                };
                let started_at = run.started.map(|(_, t)| t);
                let termination = Termination::new(code, signal, started_at, Timestamp::now());
                tracing::info!(pod = %self.key(), container = %run.prepared.name, exit_code = termination.exit_code,
                    signal = ?signal, "container exited");
                self.container_ended(idx, termination);
            }
            Event::Probed {
                idx,
                generation,
                liveness,
                result,
            } => {
                let key = self.key();
                let Some(run) = self.runs.get_mut(idx) else {
                    return;
                };
                if run.generation != generation || run.pid.is_none() {
                    return;
                }
                let tracker = if liveness {
                    run.liveness.as_mut()
                } else {
                    run.readiness.as_mut()
                };
                let Some(tracker) = tracker else { return };
                if let Err(message) = &result {
                    tracing::debug!(pod = %key, container = %run.prepared.name, liveness, message = %message, "probe failed");
                }
                let verdict = tracker.record(result.is_ok());
                match (liveness, verdict) {
                    (false, Some(ready)) => {
                        tracing::info!(pod = %key, container = %run.prepared.name, ready, "readiness changed");
                        run.snapshot.ready = ready;
                    }
                    (true, Some(false)) => {
                        let grace = self
                            .pod
                            .spec
                            .as_ref()
                            .and_then(|s| s.termination_grace_period_seconds)
                            .unwrap_or(30);
                        tracing::info!(pod = %key, container = %run.prepared.name, "liveness probe failed: killing container");
                        if let Some(pid) = run.pid {
                            signal_group(pid, Signal::SIGTERM);
                        }
                        run.snapshot.ready = false;
                        run.kill_deadline = Some(
                            Instant::now() + Duration::from_secs(u64::try_from(grace).unwrap_or(0)),
                        );
                    }
                    _ => {}
                }
            }
        }
    }

    /// Bookkeeping after a run ended (or failed to start): restart or finish.
    fn container_ended(&mut self, idx: usize, termination: Termination) {
        let policy = self.policy;
        let run = &mut self.runs[idx];
        run.pid = None;
        run.kill_deadline = None;
        run.snapshot.ready = false;
        run.readiness = None;
        run.liveness = None;
        let ran_for = run.started.take().map(|(t, _)| t.elapsed());
        // Init containers are retried on failure unless the policy is Never.
        let restart = if run.init {
            termination.exit_code != 0 && policy != RestartPolicy::Never
        } else {
            policy.restarts(termination.exit_code)
        };
        if run.init && termination.exit_code == 0 {
            run.finished = true;
        }
        if restart {
            if ran_for.is_some_and(|d| d >= BACKOFF_RESET) {
                run.backoff = BACKOFF_BASE;
            }
            run.restart_at = Some(Instant::now() + run.backoff);
            run.backoff = (run.backoff * 2).min(BACKOFF_MAX);
            run.snapshot.restart_count += 1;
            run.snapshot.last_termination = Some(termination.clone());
            run.snapshot.state = State::Waiting {
                reason: "CrashLoopBackOff".to_owned(),
                message: Some(format!(
                    "back-off restarting failed container {} (exit code {})",
                    run.prepared.name, termination.exit_code
                )),
            };
        } else {
            run.finished = true;
            run.snapshot.state = State::Terminated(termination);
        }
    }

    fn snapshots(&self) -> (Vec<ContainerSnapshot>, Vec<ContainerSnapshot>) {
        let spec = self.pod.spec.clone().unwrap_or_default();
        if !self.prepared {
            // Not prepared: everything waits with the preparation error (if any).
            let (reason, message) = self
                .prepare_error
                .clone()
                .map_or(("ContainerCreating".to_owned(), None), |(r, m)| {
                    (r, Some(m))
                });
            let waiting =
                |c: &k8s_openapi::api::core::v1::Container, reason: &str| ContainerSnapshot {
                    state: State::Waiting {
                        reason: reason.to_owned(),
                        message: message.clone(),
                    },
                    ..ContainerSnapshot::waiting(
                        &c.name,
                        c.image.as_deref().unwrap_or_default(),
                        reason,
                    )
                };
            let init = spec
                .init_containers
                .iter()
                .flatten()
                .map(|c| waiting(c, &reason))
                .collect();
            let init_blocked = spec.init_containers.as_ref().is_some_and(|v| !v.is_empty());
            let main_reason = if init_blocked {
                "PodInitializing"
            } else {
                reason.as_str()
            };
            let main = spec
                .containers
                .iter()
                .map(|c| waiting(c, main_reason))
                .collect();
            return (init, main);
        }
        let init = self.runs[..self.init_count]
            .iter()
            .map(|r| r.snapshot.clone())
            .collect();
        let init_done = self.runs[..self.init_count].iter().all(|r| {
            r.finished && matches!(&r.snapshot.state, State::Terminated(t) if t.exit_code == 0)
        });
        let main = self.runs[self.init_count..]
            .iter()
            .map(|r| {
                let mut s = r.snapshot.clone();
                if !init_done {
                    s.state = State::Waiting {
                        reason: "PodInitializing".to_owned(),
                        message: None,
                    };
                }
                s
            })
            .collect();
        (init, main)
    }

    /// Computes the status and patches it if it changed.
    async fn publish(&mut self) {
        if self.terminal.is_some() && !self.prepared {
            // Already finished when the agent found it: leave its status alone.
            return;
        }
        let (init, main) = self.snapshots();
        let init_done = init
            .iter()
            .all(|s| matches!(&s.state, State::Terminated(t) if t.exit_code == 0));
        let init_failed = init
            .iter()
            .any(|s| matches!(&s.state, State::Terminated(t) if t.exit_code != 0));
        let phase = match self.terminal {
            Some(p) => p,
            None => pod_phase(self.policy, init_done, init_failed, &main),
        };
        if phase.is_terminal() && self.terminal.is_none() {
            tracing::info!(pod = %self.key(), phase = phase.as_str(), "pod finished");
            self.terminal = Some(phase);
            self.release_ip();
        }
        let conditions = build_conditions(
            &self.conditions,
            ConditionInputs {
                sandbox_ready: self.prepared,
                initialized: init_done,
                containers_ready: !main.is_empty() && main.iter().all(|s| s.ready),
                phase,
            },
            Timestamp::now(),
        );
        self.conditions = conditions.clone();
        let status = pod_status(PodStatusInputs {
            phase,
            conditions,
            pod_ip: self.reported_ip.map(|ip| ip.to_string()),
            host_ip: &self.shared.host_ip,
            start_time: self.start_time,
            init_containers: &init,
            containers: &main,
            message: self.prepare_error.as_ref().map(|(_, m)| m.clone()),
            reason: None,
        });
        let body = serde_json::json!({ "status": status });
        if self.last_sent.as_ref() == Some(&body) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), &self.namespace);
        match api
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => self.last_sent = Some(body),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                tracing::warn!(pod = %self.key(), error = %e, "status update failed; will retry")
            }
        }
    }

    /// SIGTERM every running process group, SIGKILL after `grace`, and wait for exits.
    async fn stop_all(&mut self, grace: Duration) {
        let running: Vec<u32> = self.runs.iter().filter_map(|r| r.pid).collect();
        if running.is_empty() {
            return;
        }
        tracing::info!(pod = %self.key(), grace_seconds = grace.as_secs(), "stopping containers");
        for pid in &running {
            signal_group(*pid, Signal::SIGTERM);
        }
        // Stop restarting anything.
        self.policy = RestartPolicy::Never;
        for run in &mut self.runs {
            run.restart_at = None;
        }
        let deadline = Instant::now() + grace;
        let mut killed = false;
        while self.runs.iter().any(|r| r.pid.is_some()) {
            let wait_until = if killed {
                deadline + Duration::from_secs(10)
            } else {
                deadline
            };
            match tokio::time::timeout_at(wait_until, self.events_rx.recv()).await {
                Ok(Some(event @ Event::Exited { .. })) => self.handle(event),
                Ok(Some(Event::Probed { .. })) => {}
                Ok(None) => break,
                Err(_) if !killed => {
                    for run in &self.runs {
                        if let Some(pid) = run.pid {
                            signal_group(pid, Signal::SIGKILL);
                        }
                    }
                    killed = true;
                }
                Err(_) => {
                    tracing::error!(pod = %self.key(), "processes survived SIGKILL");
                    break;
                }
            }
        }
        // Kill leftovers of exited leaders (daemonised children in the same group).
        for pid in running {
            signal_group(pid, Signal::SIGKILL);
        }
    }

    /// Graceful termination after the pod got a deletionTimestamp, then the final delete.
    async fn delete_pod(&mut self) {
        let grace = self.grace_period();
        tracing::info!(pod = %self.key(), grace_seconds = grace.as_secs(), "pod deleted: terminating");
        self.stop_all(grace).await;
        if self.terminal.is_none() {
            // Report the final container states (like the kubelet does before deletion).
            self.publish().await;
        }
        self.release_ip();
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), &self.namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&self.name, &params).await {
            Ok(_) => tracing::info!(pod = %self.key(), "pod removed"),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => tracing::warn!(pod = %self.key(), error = %e, "final pod delete failed"),
        }
    }
}
