//! The lifecycle of a StreamJob as a journaled state machine: pure types and one decision
//! function, no I/O. The controller observes the cluster (pods per generation, the outcome of
//! a savepoint request), calls [`decide`], carries out the returned actions and persists the
//! returned [`Record`] in the resource's status. Every step is idempotent and the record is
//! written before the next step starts, so an operator restarted at any point resumes from the
//! record and reaches the same end.
//!
//! A *generation* is one set of worker pods started with `--generation N` from one restore
//! point. Generations never overlap: a new one starts only once no pod of the previous one is
//! left (Kafka's transactional fencing is the last line of defence, not the plan).

use serde::{Deserialize, Serialize};

/// How state crosses an upgrade.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum UpgradeMode {
    /// Fresh start: no state, inputs from the configured start offsets.
    Stateless,
    /// Stop with a savepoint, start the new generation from it.
    #[default]
    Savepoint,
    /// Stop (workers commit on SIGTERM), start from the latest completed checkpoint.
    LastState,
}

/// Where a generation's workers restore from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind", content = "location")]
pub enum Restore {
    Fresh,
    /// The latest completed checkpoint in the job's checkpoint store.
    Latest,
    Savepoint(String),
}

/// What the user asks for, reduced to what the decision needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// Hash of everything that needs new pods when it changes (job config, image,
    /// parallelism, resources, pod template).
    pub spec_hash: String,
    pub running: bool,
    pub upgrade_mode: UpgradeMode,
    pub restart_nonce: i64,
    pub savepoint_trigger_nonce: i64,
    pub initial_savepoint: Option<String>,
    pub readiness_timeout_ms: i64,
}

/// A generation the operator started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    pub generation: u32,
    pub spec_hash: String,
    pub restart_nonce: i64,
    pub restored_from: Restore,
}

/// The step an in-flight transition is at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Step {
    /// A stop-with-savepoint was requested from the running generation under `savepoint_id`.
    Savepointing,
    /// The old generation's pods are being deleted.
    Stopping,
    /// The new generation is started and must be Ready by `deadline_ms`.
    WaitingReady,
}

/// Why a transition started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Purpose {
    Upgrade,
    Restart,
    Suspend,
    /// Back to the last stable spec after the new generation was not Ready in time.
    Rollback,
}

/// The persisted transition: enough to resume after an operator restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Journal {
    pub purpose: Purpose,
    pub step: Step,
    pub from_hash: Option<String>,
    pub to_hash: String,
    pub to_restart_nonce: i64,
    /// Id of the savepoint requested in this transition (deterministic, so a restarted
    /// operator asks for the same one and finds it if it completed).
    pub savepoint_id: Option<String>,
    /// What the next generation restores from, once known.
    pub restore: Option<Restore>,
    /// Failed savepoint attempts so far, and when the next may start.
    pub attempts: u32,
    pub retry_at_ms: Option<i64>,
    /// `WaitingReady`: when the new generation counts as failed.
    pub deadline_ms: Option<i64>,
}

/// Everything the decision reads from the status (the operator's memory).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The generation that runs (or last ran), if any.
    pub deployed: Option<Deployment>,
    /// The last deployment that became Ready: what a rollback returns to.
    pub last_stable: Option<Deployment>,
    pub journal: Option<Journal>,
    /// Where a suspended job resumes from.
    pub suspended_at: Option<Restore>,
    pub last_savepoint: Option<String>,
    /// The trigger nonce the last on-demand savepoint answered.
    pub savepoint_trigger_nonce: i64,
    /// An on-demand savepoint in flight (id), not part of a transition.
    pub pending_savepoint: Option<String>,
    /// The highest generation number ever used: a new generation is always above it.
    pub max_generation: u32,
    /// The spec (hash and restart nonce) a rollback left: not tried again until it changes.
    pub rolled_back: Option<(String, i64)>,
}

/// The pods of one generation, as the API server shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pods {
    /// Pods that exist (not yet deleted), whatever their phase.
    pub existing: u32,
    pub ready: u32,
    pub desired: u32,
    /// A container that cannot start or keeps failing (CrashLoopBackOff, image or command
    /// errors, phase Failed): the generation will not become Ready by waiting.
    pub failing: bool,
    /// Workers that say they are stopped by a stop-with-savepoint (their inputs stay paused).
    pub stopped: u32,
}

/// The answer to the savepoint request named in the journal or the pending trigger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SavepointOutcome {
    /// Requested and not answered yet.
    Pending,
    /// The controller knows of no request with that id (it restarted since, and no
    /// savepoint with that id is stored): ask again under the same id.
    NotRequested,
    Completed(String),
    Failed(String),
}

/// What the controller saw in this reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub now_ms: i64,
    /// Pods per generation number; generations without pods may be absent.
    pub generations: std::collections::BTreeMap<u32, Pods>,
    pub savepoint: SavepointOutcome,
}

impl Observed {
    fn pods(&self, generation: u32) -> Pods {
        self.generations
            .get(&generation)
            .copied()
            .unwrap_or_default()
    }

    /// Generations that still have pods, other than `keep`.
    fn strays(&self, keep: Option<u32>) -> Vec<u32> {
        self.generations
            .iter()
            .filter(|(g, p)| Some(**g) != keep && p.existing > 0)
            .map(|(g, _)| *g)
            .collect()
    }
}

/// What the controller must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// POST /savepoint to a worker of `generation` with this id.
    RequestSavepoint {
        generation: u32,
        id: String,
        stop: bool,
    },
    DeleteGeneration(u32),
    /// Restart (delete, to be applied again) the workers of a generation that report being
    /// stopped when the record expects them to run: a stop-with-savepoint that failed after
    /// some workers had stopped. They resume from the generation's committed state.
    RestartStoppedWorkers(u32),
    /// Create the pods of a generation rendered from the spec with `spec_hash` (the desired
    /// one, or the last stable one on rollback).
    StartGeneration(Deployment),
    Event {
        warning: bool,
        reason: &'static str,
        message: String,
    },
}

/// The job's phase, for the status and `kubectl get sj`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Pending,
    Running,
    Upgrading,
    RollingBack,
    Suspending,
    Suspended,
    Failed,
}

/// The outcome of one decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub record: Record,
    pub actions: Vec<Action>,
    pub phase: Phase,
    /// Degraded and why (a failed savepoint, a rollback, a failing generation).
    pub degraded: Option<String>,
    /// A CamelCase reason for `degraded` (the Degraded condition's reason).
    pub degraded_reason: &'static str,
    /// Look again after this long even if nothing changes (deadlines, retries).
    pub requeue_ms: i64,
}

/// Backoff after the n-th failed savepoint: 10 s doubling up to 5 min.
pub fn savepoint_backoff_ms(attempts: u32) -> i64 {
    (10_000i64 << attempts.saturating_sub(1).min(5)).min(300_000)
}

const POLL_MS: i64 = 2_000;
const STEADY_MS: i64 = 30_000;

/// Decide the next steps from the desired spec, the persisted record and what is observed.
pub fn decide(desired: &Desired, record: &Record, obs: &Observed) -> Decision {
    let mut d = Decision {
        record: record.clone(),
        actions: Vec::new(),
        phase: Phase::Running,
        degraded: None,
        degraded_reason: "",
        requeue_ms: STEADY_MS,
    };
    match record.journal.clone() {
        Some(j) => continue_journal(desired, j, obs, &mut d),
        None => steady(desired, obs, &mut d),
    }
    d
}

/// No transition in flight: start one if the spec, the nonce or the state asks for it.
fn steady(desired: &Desired, obs: &Observed, d: &mut Decision) {
    let deployed = d.record.deployed.clone();
    let live = deployed
        .as_ref()
        .filter(|dep| obs.pods(dep.generation).existing > 0);
    if let Some(g) = obs.strays(live.map(|dep| dep.generation)).first() {
        // A generation the record does not own (left by a crash between steps): remove it
        // before anything else may start, and never reuse its number.
        d.actions.push(Action::DeleteGeneration(*g));
        d.record.max_generation = d.record.max_generation.max(*g);
        d.phase = Phase::Pending;
        d.requeue_ms = POLL_MS;
        return;
    }
    if !desired.running {
        match live {
            Some(dep) => begin(desired, Purpose::Suspend, dep.clone(), obs, d),
            None => d.phase = Phase::Suspended,
        }
        return;
    }
    let Some(dep) = live.cloned() else {
        d.phase = Phase::Pending;
        d.requeue_ms = POLL_MS;
        match (deployed, d.record.suspended_at.take()) {
            // Resume after a suspension: a new generation from where it stopped.
            (_, Some(restore)) => start(desired, restore, None, obs, d),
            // The generation's pods are gone (deleted by hand, node lost): apply them again;
            // its workers resume from their own committed state.
            (Some(dep), None) => d.actions.push(Action::StartGeneration(dep)),
            // First start.
            (None, None) => {
                let restore = desired
                    .initial_savepoint
                    .clone()
                    .map_or(Restore::Fresh, Restore::Savepoint);
                start(desired, restore, None, obs, d);
            }
        }
        return;
    };
    let wanted = (desired.spec_hash.clone(), desired.restart_nonce);
    if d.record.rolled_back.as_ref() == Some(&wanted) {
        // The desired spec failed: keep what runs until the spec changes.
        let still_deployed = dep.spec_hash == desired.spec_hash;
        running(desired, dep, obs, d);
        if still_deployed {
            // Nothing stable to return to: the failed spec's pods stay.
            d.phase = Phase::Failed;
            d.degraded_reason = "ReadinessTimeout";
            d.degraded = Some(format!(
                "spec {} did not become ready within the readiness timeout and no earlier \
                 spec ran; fix the spec (or change restartNonce) to try again",
                desired.spec_hash
            ));
        } else {
            d.degraded_reason = "RolledBack";
            d.degraded = Some(format!(
                "spec {} was rolled back (not ready in time); change the spec or restartNonce \
                 to try again",
                desired.spec_hash
            ));
        }
        return;
    }
    d.record.rolled_back = None;
    if dep.spec_hash != desired.spec_hash {
        begin(desired, Purpose::Upgrade, dep, obs, d);
    } else if dep.restart_nonce != desired.restart_nonce {
        begin(desired, Purpose::Restart, dep, obs, d);
    } else {
        running(desired, dep, obs, d);
    }
}

/// The deployed generation runs the desired spec: mark it stable once Ready, and serve an
/// on-demand savepoint.
fn running(desired: &Desired, dep: Deployment, obs: &Observed, d: &mut Decision) {
    let pods = obs.pods(dep.generation);
    if pods.existing < pods.desired {
        // Pods of the generation are missing (an apply that failed half-way, a lost pod):
        // apply them again; the pods that exist stay as they are.
        d.actions.push(Action::StartGeneration(dep.clone()));
    }
    restart_stopped(dep.generation, pods, d);
    if pods.ready >= pods.desired && pods.desired > 0 {
        if d.record.last_stable.as_ref() != Some(&dep) {
            d.record.last_stable = Some(dep.clone());
        }
    } else {
        d.phase = Phase::Pending;
        d.requeue_ms = POLL_MS;
        if pods.failing {
            d.degraded_reason = "PodsFailing";
            d.degraded = Some(format!(
                "generation {} has failing pods ({} of {} ready)",
                dep.generation, pods.ready, pods.desired
            ));
        }
    }
    if let Some(id) = d.record.pending_savepoint.clone() {
        match &obs.savepoint {
            SavepointOutcome::Pending => d.requeue_ms = POLL_MS,
            SavepointOutcome::NotRequested => {
                d.actions.push(Action::RequestSavepoint {
                    generation: dep.generation,
                    id,
                    stop: false,
                });
                d.requeue_ms = POLL_MS;
            }
            SavepointOutcome::Completed(location) => {
                d.record.last_savepoint = Some(location.clone());
                d.record.pending_savepoint = None;
                d.record.savepoint_trigger_nonce = desired.savepoint_trigger_nonce;
                d.actions.push(event(
                    false,
                    "SavepointCompleted",
                    format!("savepoint {id} at {location}"),
                ));
            }
            SavepointOutcome::Failed(reason) => {
                // On-demand savepoints are not retried: the user triggers again.
                d.record.pending_savepoint = None;
                d.record.savepoint_trigger_nonce = desired.savepoint_trigger_nonce;
                d.degraded_reason = "SavepointFailed";
                d.degraded = Some(format!("savepoint {id} failed: {reason}"));
                d.actions.push(event(
                    true,
                    "SavepointFailed",
                    format!("savepoint {id}: {reason}"),
                ));
            }
        }
    } else if desired.savepoint_trigger_nonce != d.record.savepoint_trigger_nonce {
        let id = format!(
            "sp-trigger-{}-{}",
            desired.savepoint_trigger_nonce, dep.generation
        );
        d.actions.push(Action::RequestSavepoint {
            generation: dep.generation,
            id: id.clone(),
            stop: false,
        });
        d.record.pending_savepoint = Some(id);
        d.requeue_ms = POLL_MS;
    }
}

/// Open a journal for a transition away from the running generation `from`.
fn begin(desired: &Desired, purpose: Purpose, from: Deployment, obs: &Observed, d: &mut Decision) {
    let mut mode = desired.upgrade_mode;
    if mode == UpgradeMode::Savepoint && obs.pods(from.generation).ready == 0 {
        // No worker runs to take a savepoint (say the generation crash-loops): its committed
        // state is the restore point, as in lastState.
        mode = UpgradeMode::LastState;
        d.actions.push(event(
            true,
            "SavepointSkipped",
            format!(
                "generation {} has no ready worker to take a savepoint; restoring its last \
                 committed state instead",
                from.generation
            ),
        ));
    }
    let mut j = Journal {
        purpose,
        step: Step::Stopping,
        from_hash: Some(from.spec_hash.clone()),
        to_hash: desired.spec_hash.clone(),
        to_restart_nonce: desired.restart_nonce,
        savepoint_id: None,
        restore: None,
        attempts: 0,
        retry_at_ms: None,
        deadline_ms: None,
    };
    match mode {
        UpgradeMode::Savepoint => {
            j.step = Step::Savepointing;
            j.savepoint_id = Some(savepoint_id(&j, from.generation));
            d.actions.push(Action::RequestSavepoint {
                generation: from.generation,
                id: j.savepoint_id.clone().expect("just set"),
                stop: true,
            });
        }
        UpgradeMode::LastState => {
            j.restore = Some(Restore::Latest);
            d.actions.push(Action::DeleteGeneration(from.generation));
        }
        UpgradeMode::Stateless => {
            j.restore = Some(Restore::Fresh);
            d.actions.push(Action::DeleteGeneration(from.generation));
        }
    }
    d.actions.push(event(
        false,
        reason_of(purpose),
        format!(
            "{purpose:?} from generation {} ({mode:?} mode)",
            from.generation
        ),
    ));
    d.phase = transition_phase(purpose);
    d.requeue_ms = POLL_MS;
    d.record.journal = Some(j);
}

fn savepoint_id(j: &Journal, generation: u32) -> String {
    let purpose = match j.purpose {
        Purpose::Upgrade => "upgrade",
        Purpose::Restart => "restart",
        Purpose::Suspend => "suspend",
        Purpose::Rollback => "rollback",
    };
    format!("sp-{purpose}-g{generation}-a{}", j.attempts)
}

fn continue_journal(desired: &Desired, mut j: Journal, obs: &Observed, d: &mut Decision) {
    d.phase = transition_phase(j.purpose);
    d.requeue_ms = POLL_MS;
    let from_gen = d.record.deployed.as_ref().map(|dep| dep.generation);
    match j.step {
        Step::Savepointing => {
            let generation = from_gen.expect("a savepoint is taken from a deployed generation");
            if let Some(at) = j.retry_at_ms {
                let same_target = desired.upgrade_mode == UpgradeMode::Savepoint
                    && desired.running == (j.purpose != Purpose::Suspend)
                    && (j.purpose == Purpose::Suspend
                        || (desired.spec_hash == j.to_hash
                            && desired.restart_nonce == j.to_restart_nonce));
                if !same_target {
                    // Between attempts the old generation runs as before: drop the transition
                    // and plan again for what is wanted now (another spec, mode or state).
                    d.record.journal = None;
                    d.actions.push(event(
                        false,
                        "Replanning",
                        format!("the spec changed while the {:?} waited to retry", j.purpose),
                    ));
                    steady(desired, obs, d);
                    return;
                }
                if obs.now_ms < at {
                    d.requeue_ms = (at - obs.now_ms).min(POLL_MS);
                    d.degraded_reason = "SavepointFailed";
                    d.degraded = Some(format!(
                        "savepoint attempt {} failed; the running generation keeps running, \
                         next attempt {} s after the failure",
                        j.attempts,
                        savepoint_backoff_ms(j.attempts) / 1000
                    ));
                    restart_stopped(generation, obs.pods(generation), d);
                    d.record.journal = Some(j);
                    return;
                }
                j.retry_at_ms = None;
                j.savepoint_id = Some(savepoint_id(&j, generation));
                d.actions.push(Action::RequestSavepoint {
                    generation,
                    id: j.savepoint_id.clone().expect("just set"),
                    stop: true,
                });
                d.record.journal = Some(j);
                return;
            }
            match &obs.savepoint {
                SavepointOutcome::Pending => {}
                SavepointOutcome::NotRequested => d.actions.push(Action::RequestSavepoint {
                    generation,
                    id: j.savepoint_id.clone().expect("set with the step"),
                    stop: true,
                }),
                SavepointOutcome::Completed(location) => {
                    d.record.last_savepoint = Some(location.clone());
                    j.restore = Some(Restore::Savepoint(location.clone()));
                    j.step = Step::Stopping;
                    d.actions.push(event(
                        false,
                        "SavepointCompleted",
                        format!("savepoint for {:?} at {location}", j.purpose),
                    ));
                    d.actions.push(Action::DeleteGeneration(generation));
                }
                SavepointOutcome::Failed(reason) => {
                    // The old generation keeps running; never fall back to stateless.
                    j.attempts += 1;
                    let wait = savepoint_backoff_ms(j.attempts);
                    j.retry_at_ms = Some(obs.now_ms + wait);
                    d.degraded_reason = "SavepointFailed";
                    d.degraded = Some(format!(
                        "savepoint for {:?} failed (attempt {}): {reason}; the running \
                         generation keeps running, retry in {} s",
                        j.purpose,
                        j.attempts,
                        wait / 1000
                    ));
                    d.actions
                        .push(event(true, "SavepointFailed", d.degraded.clone().unwrap()));
                    d.requeue_ms = wait;
                }
            }
            d.record.journal = Some(j);
        }
        Step::Stopping => {
            let strays = obs.strays(None);
            if !strays.is_empty() {
                for g in strays {
                    d.actions.push(Action::DeleteGeneration(g));
                }
                d.record.journal = Some(j);
                return;
            }
            let restore = j.restore.clone().unwrap_or(Restore::Latest);
            if j.purpose == Purpose::Suspend {
                d.record.suspended_at = Some(restore);
                d.record.journal = None;
                d.phase = Phase::Suspended;
                d.requeue_ms = STEADY_MS;
                d.actions
                    .push(event(false, "Suspended", "job suspended".into()));
                return;
            }
            let target = if j.purpose == Purpose::Rollback {
                d.record.last_stable.clone()
            } else {
                None
            };
            start(desired, restore, target, obs, d);
            j.step = Step::WaitingReady;
            j.deadline_ms = Some(obs.now_ms + desired.readiness_timeout_ms);
            d.record.journal = Some(j);
        }
        Step::WaitingReady => {
            let dep = d
                .record
                .deployed
                .clone()
                .expect("waiting for a started generation");
            let pods = obs.pods(dep.generation);
            let past_deadline = obs.now_ms >= j.deadline_ms.unwrap_or(i64::MAX);
            if pods.existing == 0 && !past_deadline {
                // Recorded as started but no pod exists (the operator stopped before
                // creating them, or the API refused them so far): create them now; applying
                // them is idempotent. Past the deadline this counts as not ready.
                d.actions.push(Action::StartGeneration(dep));
                d.record.journal = Some(j);
                return;
            }
            if pods.existing < pods.desired {
                d.actions.push(Action::StartGeneration(dep.clone()));
            }
            if pods.desired > 0 && pods.ready >= pods.desired {
                d.record.last_stable = Some(dep.clone());
                if j.purpose == Purpose::Rollback {
                    d.degraded_reason = "RolledBack";
                    d.degraded = Some(format!(
                        "spec {} was rolled back to {}",
                        j.from_hash.as_deref().unwrap_or("?"),
                        j.to_hash
                    ));
                }
                d.record.journal = None;
                d.phase = Phase::Running;
                d.requeue_ms = STEADY_MS;
                d.actions.push(event(
                    false,
                    if j.purpose == Purpose::Rollback {
                        "RolledBack"
                    } else {
                        "Ready"
                    },
                    format!("generation {} is ready", dep.generation),
                ));
                return;
            }
            let deadline = j.deadline_ms.unwrap_or(i64::MAX);
            let timed_out = obs.now_ms >= deadline;
            if !(timed_out || pods.failing) {
                d.requeue_ms = (deadline - obs.now_ms).clamp(1, POLL_MS);
                d.record.journal = Some(j);
                return;
            }
            let why = if timed_out {
                format!(
                    "generation {} not ready within the readiness timeout ({} of {} pods ready)",
                    dep.generation, pods.ready, pods.desired
                )
            } else {
                format!("generation {} has failing pods", dep.generation)
            };
            let stable = d.record.last_stable.clone();
            let can_roll_back = j.purpose != Purpose::Rollback
                && stable
                    .as_ref()
                    .is_some_and(|s| s.spec_hash != dep.spec_hash);
            if !can_roll_back {
                // Nothing better to return to (or the rollback itself failed): keep what
                // runs, say why, and wait for a new spec.
                if !timed_out {
                    d.degraded_reason = "PodsFailing";
                    d.degraded = Some(why);
                    d.record.journal = Some(j);
                    return;
                }
                d.degraded_reason = "ReadinessTimeout";
                d.degraded = Some(why.clone());
                d.phase = Phase::Failed;
                d.record.journal = None;
                // Given up on this spec: it stays Degraded until the spec or nonce changes.
                d.record.rolled_back = Some((dep.spec_hash.clone(), dep.restart_nonce));
                d.actions.push(event(true, "ReadinessTimeout", why));
                return;
            }
            // Roll back: the same restore point, the last stable spec.
            d.degraded_reason = "RollingBack";
            d.degraded = Some(format!("{why}; rolling back to the last stable spec"));
            d.actions
                .push(event(true, "RollingBack", d.degraded.clone().unwrap()));
            d.actions.push(Action::DeleteGeneration(dep.generation));
            d.phase = Phase::RollingBack;
            let stable = stable.expect("checked");
            d.record.rolled_back = Some((dep.spec_hash.clone(), dep.restart_nonce));
            d.record.journal = Some(Journal {
                purpose: Purpose::Rollback,
                step: Step::Stopping,
                from_hash: Some(dep.spec_hash.clone()),
                to_hash: stable.spec_hash,
                to_restart_nonce: stable.restart_nonce,
                savepoint_id: j.savepoint_id,
                restore: j.restore,
                attempts: 0,
                retry_at_ms: None,
                deadline_ms: None,
            });
        }
    }
}

/// Start the next generation from `restore`: the desired spec, or `target` (rollback).
fn start(
    desired: &Desired,
    restore: Restore,
    target: Option<Deployment>,
    obs: &Observed,
    d: &mut Decision,
) {
    let above = obs.generations.keys().max().copied().unwrap_or(0);
    let generation = d.record.max_generation.max(above) + 1;
    let dep = Deployment {
        generation,
        spec_hash: target
            .as_ref()
            .map_or(desired.spec_hash.clone(), |t| t.spec_hash.clone()),
        restart_nonce: target
            .as_ref()
            .map_or(desired.restart_nonce, |t| t.restart_nonce),
        restored_from: restore.clone(),
    };
    d.record.max_generation = generation;
    d.record.deployed = Some(dep.clone());
    d.actions.push(event(
        false,
        "Starting",
        format!("generation {generation} restoring from {restore:?}"),
    ));
    d.actions.push(Action::StartGeneration(dep));
    d.requeue_ms = POLL_MS;
}

/// Workers stopped although the record expects them to run (a savepoint attempt failed
/// after they had stopped): restart them.
fn restart_stopped(generation: u32, pods: Pods, d: &mut Decision) {
    if pods.stopped == 0 {
        return;
    }
    d.actions.push(Action::RestartStoppedWorkers(generation));
    d.actions.push(event(
        true,
        "RestartingStoppedWorkers",
        format!(
            "{} worker(s) of generation {generation} stayed stopped after a failed savepoint; \
             restarting them from their committed state",
            pods.stopped
        ),
    ));
}

fn transition_phase(purpose: Purpose) -> Phase {
    match purpose {
        Purpose::Upgrade | Purpose::Restart => Phase::Upgrading,
        Purpose::Suspend => Phase::Suspending,
        Purpose::Rollback => Phase::RollingBack,
    }
}

fn reason_of(purpose: Purpose) -> &'static str {
    match purpose {
        Purpose::Upgrade => "Upgrading",
        Purpose::Restart => "Restarting",
        Purpose::Suspend => "Suspending",
        Purpose::Rollback => "RollingBack",
    }
}

fn event(warning: bool, reason: &'static str, message: String) -> Action {
    Action::Event {
        warning,
        reason,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const TIMEOUT: i64 = 60_000;

    fn desired(hash: &str) -> Desired {
        Desired {
            spec_hash: hash.into(),
            running: true,
            upgrade_mode: UpgradeMode::Savepoint,
            restart_nonce: 0,
            savepoint_trigger_nonce: 0,
            initial_savepoint: None,
            readiness_timeout_ms: TIMEOUT,
        }
    }

    /// A cluster that carries out actions: pods appear when a generation starts (ready at
    /// once unless its spec is `bad`), vanish when deleted; savepoints complete (or fail
    /// while `savepoints_fail`).
    #[derive(Default)]
    struct Cluster {
        now_ms: i64,
        generations: BTreeMap<u32, Pods>,
        /// Pods of this spec never become ready (and fail, if `bad_pods_fail`).
        bad: Option<String>,
        bad_pods_fail: bool,
        savepoints_fail: bool,
        /// id → answer, for requests made and not yet observed.
        answers: BTreeMap<String, SavepointOutcome>,
        started: Vec<Deployment>,
        requested: Vec<String>,
        max_live_generations: usize,
    }

    impl Cluster {
        fn observe(&self, record: &Record) -> Observed {
            let id = record
                .journal
                .as_ref()
                .and_then(|j| j.savepoint_id.clone())
                .or_else(|| record.pending_savepoint.clone());
            let savepoint = id
                .and_then(|id| self.answers.get(&id).cloned())
                .unwrap_or(SavepointOutcome::NotRequested);
            Observed {
                now_ms: self.now_ms,
                generations: self.generations.clone(),
                savepoint,
            }
        }

        fn apply(&mut self, action: &Action) {
            match action {
                Action::RequestSavepoint { id, .. } => {
                    self.requested.push(id.clone());
                    let answer = if self.savepoints_fail {
                        SavepointOutcome::Failed("S3 unreachable".into())
                    } else {
                        SavepointOutcome::Completed(format!("s3://b/savepoints/{id}"))
                    };
                    self.answers.insert(id.clone(), answer);
                }
                Action::DeleteGeneration(g) => {
                    self.generations.remove(g);
                }
                Action::RestartStoppedWorkers(g) => {
                    if let Some(p) = self.generations.get_mut(g) {
                        p.stopped = 0;
                    }
                }
                Action::StartGeneration(dep) => {
                    let bad = self.bad.as_deref() == Some(dep.spec_hash.as_str());
                    self.generations.insert(
                        dep.generation,
                        Pods {
                            existing: 2,
                            ready: if bad { 0 } else { 2 },
                            desired: 2,
                            failing: bad && self.bad_pods_fail,
                            stopped: 0,
                        },
                    );
                    self.started.push(dep.clone());
                }
                Action::Event { .. } => {}
            }
            let live = self.generations.values().filter(|p| p.existing > 0).count();
            self.max_live_generations = self.max_live_generations.max(live);
        }
    }

    /// Reconcile until nothing is left to do. `crash_after` drops the actions of decision
    /// number k after its first `n` (the record was persisted, the operator died mid-way).
    fn converge(
        want: &Desired,
        record: &mut Record,
        cluster: &mut Cluster,
        crash: Option<(usize, usize)>,
    ) -> Decision {
        for round in 0..100 {
            let obs = cluster.observe(record);
            let d = decide(want, record, &obs);
            *record = d.record.clone();
            let n = match crash {
                Some((k, n)) if k == round => n.min(d.actions.len()),
                _ => d.actions.len(),
            };
            for a in &d.actions[..n] {
                cluster.apply(a);
            }
            let busy = d.actions.iter().any(|a| !matches!(a, Action::Event { .. }));
            if !busy && record.journal.is_none() && crash.is_none_or(|(k, _)| round > k) {
                return d;
            }
            cluster.now_ms += d.requeue_ms.min(5_000);
        }
        panic!("no convergence: {record:?}");
    }

    fn running_job(hash: &str) -> (Record, Cluster) {
        let mut record = Record::default();
        let mut cluster = Cluster::default();
        let d = converge(&desired(hash), &mut record, &mut cluster, None);
        assert_eq!(d.phase, Phase::Running);
        (record, cluster)
    }

    #[test]
    fn first_start_is_fresh_or_from_the_initial_savepoint() {
        let (record, cluster) = running_job("a");
        assert_eq!(cluster.started.len(), 1);
        assert_eq!(cluster.started[0].restored_from, Restore::Fresh);
        assert_eq!(record.last_stable, record.deployed);

        let mut want = desired("a");
        want.initial_savepoint = Some("s3://b/sp-old".into());
        let (mut record, mut cluster) = (Record::default(), Cluster::default());
        converge(&want, &mut record, &mut cluster, None);
        assert_eq!(
            cluster.started[0].restored_from,
            Restore::Savepoint("s3://b/sp-old".into())
        );
    }

    #[test]
    fn savepoint_upgrade_stops_the_old_generation_before_starting_the_new() {
        let (mut record, mut cluster) = running_job("a");
        let d = converge(&desired("b"), &mut record, &mut cluster, None);
        assert_eq!(d.phase, Phase::Running);
        assert_eq!(
            cluster.max_live_generations, 1,
            "never two generations at once"
        );
        let new = record.deployed.clone().unwrap();
        assert_eq!(new.generation, 2);
        assert_eq!(new.spec_hash, "b");
        let sp = cluster.requested.last().unwrap();
        assert_eq!(
            new.restored_from,
            Restore::Savepoint(format!("s3://b/savepoints/{sp}"))
        );
        assert_eq!(
            record.last_savepoint,
            Some(format!("s3://b/savepoints/{sp}"))
        );
        assert_eq!(record.last_stable, Some(new));
    }

    #[test]
    fn last_state_and_stateless_upgrades_restore_latest_or_nothing() {
        for (mode, restore) in [
            (UpgradeMode::LastState, Restore::Latest),
            (UpgradeMode::Stateless, Restore::Fresh),
        ] {
            let (mut record, mut cluster) = running_job("a");
            let mut want = desired("b");
            want.upgrade_mode = mode;
            converge(&want, &mut record, &mut cluster, None);
            assert!(cluster.requested.is_empty(), "{mode:?}: no savepoint");
            assert_eq!(cluster.max_live_generations, 1);
            assert_eq!(record.deployed.unwrap().restored_from, restore);
        }
    }

    #[test]
    fn a_failed_savepoint_keeps_the_old_generation_and_retries_with_backoff() {
        let (mut record, mut cluster) = running_job("a");
        cluster.savepoints_fail = true;
        let want = desired("b");
        let obs = cluster.observe(&record);
        let d = decide(&want, &record, &obs);
        record = d.record;
        for a in &d.actions {
            cluster.apply(a);
        }
        let d = decide(&want, &record, &cluster.observe(&record));
        assert!(d.degraded.as_deref().unwrap().contains("S3 unreachable"));
        assert!(
            !d.actions
                .iter()
                .any(|a| matches!(a, Action::DeleteGeneration(_) | Action::StartGeneration(_))),
            "no fallback: {:?}",
            d.actions
        );
        assert_eq!(d.requeue_ms, savepoint_backoff_ms(1));
        record = d.record;
        assert_eq!(
            cluster.generations[&1].existing, 2,
            "old generation runs on"
        );
        // Before the backoff: nothing; after it: a new attempt under a new id.
        cluster.now_ms += 1_000;
        let d = decide(&want, &record, &cluster.observe(&record));
        assert!(d.actions.is_empty());
        cluster.now_ms += savepoint_backoff_ms(1);
        let d = decide(&want, &record, &cluster.observe(&record));
        let ids: Vec<_> = d
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::RequestSavepoint { id, stop: true, .. } => Some(id.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(ids.len(), 1);
        assert_ne!(&ids[0], cluster.requested.last().unwrap());
        record = d.record;
        cluster.savepoints_fail = false;
        for a in &d.actions {
            cluster.apply(a);
        }
        converge(&want, &mut record, &mut cluster, None);
        assert_eq!(record.deployed.unwrap().spec_hash, "b");
        assert_eq!(cluster.max_live_generations, 1);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(savepoint_backoff_ms(1), 10_000);
        assert_eq!(savepoint_backoff_ms(2), 20_000);
        assert_eq!(savepoint_backoff_ms(6), 300_000);
        assert_eq!(savepoint_backoff_ms(60), 300_000);
    }

    #[test]
    fn an_operator_stopped_after_any_action_of_any_step_converges_without_overlap() {
        for mode in [
            UpgradeMode::Savepoint,
            UpgradeMode::LastState,
            UpgradeMode::Stateless,
        ] {
            for round in 0..6 {
                for n in 0..4 {
                    let (mut record, mut cluster) = running_job("a");
                    let mut want = desired("b");
                    want.upgrade_mode = mode;
                    // The operator dies after `n` actions of decision `round`; a new one
                    // knows nothing of requests in flight.
                    converge(&want, &mut record, &mut cluster, Some((round, n)));
                    cluster
                        .answers
                        .retain(|_, a| !matches!(a, SavepointOutcome::Pending));
                    let d = converge(&want, &mut record, &mut cluster, None);
                    let ctx = format!("{mode:?} crash at decision {round} after {n} actions");
                    assert_eq!(d.phase, Phase::Running, "{ctx}");
                    assert_eq!(record.deployed.as_ref().unwrap().spec_hash, "b", "{ctx}");
                    assert_eq!(cluster.max_live_generations, 1, "{ctx}");
                    assert_eq!(
                        cluster.generations.len(),
                        1,
                        "{ctx}: {:?}",
                        cluster.generations
                    );
                }
            }
        }
    }

    #[test]
    fn a_generation_not_ready_in_time_rolls_back_from_the_same_savepoint_once() {
        // Failing pods (a bad image) roll back at once; pods that are merely never ready
        // roll back at the readiness deadline.
        for failing in [true, false] {
            let (mut record, mut cluster) = running_job("a");
            cluster.bad = Some("b".into());
            cluster.bad_pods_fail = failing;
            let start = cluster.now_ms;
            let d = converge(&desired("b"), &mut record, &mut cluster, None);
            assert_eq!(d.phase, Phase::Running);
            assert!(
                failing == (cluster.now_ms - start < TIMEOUT),
                "failing={failing}: rolled back after {} ms",
                cluster.now_ms - start
            );
            let back = record.deployed.clone().unwrap();
            assert_eq!(back.spec_hash, "a", "the last stable spec runs again");
            let sp = cluster.requested.last().unwrap();
            let from_sp = Restore::Savepoint(format!("s3://b/savepoints/{sp}"));
            assert_eq!(back.restored_from, from_sp, "from the upgrade's savepoint");
            assert_eq!(cluster.started.len(), 3, "a, b, a again");
            assert_eq!(cluster.started[1].restored_from, from_sp);
            assert_eq!(cluster.max_live_generations, 1);
            assert!(d.degraded.unwrap().contains("rolled back"));
            // The bad spec is not retried by itself; a new spec is.
            converge(&desired("b"), &mut record, &mut cluster, None);
            assert_eq!(cluster.started.len(), 3);
            cluster.bad = None;
            converge(&desired("c"), &mut record, &mut cluster, None);
            assert_eq!(record.deployed.unwrap().spec_hash, "c");
        }
    }

    #[test]
    fn a_failing_first_generation_has_nothing_to_roll_back_to() {
        let mut cluster = Cluster {
            bad: Some("a".into()),
            bad_pods_fail: true,
            ..Cluster::default()
        };
        let mut record = Record::default();
        let want = desired("a");
        for _ in 0..5 {
            let d = decide(&want, &record, &cluster.observe(&record));
            record = d.record.clone();
            for a in &d.actions {
                cluster.apply(a);
            }
            cluster.now_ms += 10_000;
        }
        let d = decide(&want, &record, &cluster.observe(&record));
        assert!(d.degraded.unwrap().contains("failing pods"));
        assert_eq!(cluster.started.len(), 1, "no restart loop");
    }

    #[test]
    fn a_restart_not_ready_in_time_with_nothing_else_to_run_stays_failed_until_the_spec_changes() {
        let (mut record, mut cluster) = running_job("a");
        // The restarted generation of the same spec never becomes ready: no other spec to
        // roll back to.
        cluster.bad = Some("a".into());
        let mut want = desired("a");
        want.restart_nonce = 1;
        for _ in 0..20 {
            let d = decide(&want, &record, &cluster.observe(&record));
            record = d.record.clone();
            for a in &d.actions {
                cluster.apply(a);
            }
            cluster.now_ms += 10_000;
        }
        let started = cluster.started.len();
        for _ in 0..3 {
            let d = decide(&want, &record, &cluster.observe(&record));
            assert_eq!(d.phase, Phase::Failed);
            assert_eq!(d.degraded_reason, "ReadinessTimeout");
            assert!(d
                .actions
                .iter()
                .all(|a| !matches!(a, Action::StartGeneration(_))));
        }
        assert_eq!(cluster.started.len(), started, "no restart loop");
        // A new spec is tried, from the committed state: no worker can take a savepoint.
        cluster.bad = None;
        let d = converge(&desired("b"), &mut record, &mut cluster, None);
        assert_eq!(d.phase, Phase::Running);
        assert!(d.degraded.is_none());
        assert_eq!(
            cluster.started.last().unwrap().restored_from,
            Restore::Latest
        );
    }

    #[test]
    fn a_change_of_mind_between_savepoint_attempts_is_planned_again() {
        let (mut record, mut cluster) = running_job("a");
        cluster.savepoints_fail = true;
        let d = decide(&desired("b"), &record, &cluster.observe(&record));
        record = d.record.clone();
        d.actions.iter().for_each(|a| cluster.apply(a));
        let d = decide(&desired("b"), &record, &cluster.observe(&record));
        record = d.record.clone();
        assert!(
            record.journal.as_ref().unwrap().retry_at_ms.is_some(),
            "{d:?}"
        );
        // The user gives up on savepoints: stateless now, no waiting for the retry.
        cluster.savepoints_fail = false;
        let mut want = desired("c");
        want.upgrade_mode = UpgradeMode::Stateless;
        let d = decide(&want, &record, &cluster.observe(&record));
        assert!(d.actions.iter().any(|a| matches!(
            a,
            Action::Event {
                reason: "Replanning",
                ..
            }
        )));
        record = d.record.clone();
        d.actions.iter().for_each(|a| cluster.apply(a));
        let d = converge(&want, &mut record, &mut cluster, None);
        assert_eq!(d.phase, Phase::Running);
        assert_eq!(
            cluster.started.last().unwrap().restored_from,
            Restore::Fresh
        );
        assert_eq!(cluster.started.last().unwrap().spec_hash, "c");
    }

    #[test]
    fn a_generation_whose_pods_never_appear_counts_as_not_ready_at_the_deadline() {
        let (mut record, mut cluster) = running_job("a");
        let d = converge(&desired("b"), &mut record, &mut cluster, Some((2, 0)));
        let _ = d;
        // Drive to WaitingReady for "c", then make its pods impossible (the API refuses them).
        let want = desired("c");
        let mut refused = None;
        for _ in 0..20 {
            let d = decide(&want, &record, &cluster.observe(&record));
            record = d.record.clone();
            for a in &d.actions {
                match a {
                    Action::StartGeneration(dep) if dep.spec_hash == "c" => {
                        refused = Some(dep.generation)
                    }
                    a => cluster.apply(a),
                }
            }
            if record.journal.is_none() {
                break;
            }
            cluster.now_ms += 10_000;
        }
        assert!(refused.is_some());
        let dep = record.deployed.clone().unwrap();
        assert_eq!(dep.spec_hash, "b", "rolled back to the stable spec");
        assert!(record.rolled_back.is_some());
    }

    #[test]
    fn suspend_takes_a_savepoint_and_resume_restores_it() {
        let (mut record, mut cluster) = running_job("a");
        let mut want = desired("a");
        want.running = false;
        let d = converge(&want, &mut record, &mut cluster, None);
        assert_eq!(d.phase, Phase::Suspended);
        assert!(cluster.generations.is_empty(), "no pods while suspended");
        let sp = cluster.requested.last().unwrap().clone();
        let at = Restore::Savepoint(format!("s3://b/savepoints/{sp}"));
        assert_eq!(record.suspended_at, Some(at.clone()));
        want.running = true;
        let d = converge(&want, &mut record, &mut cluster, None);
        assert_eq!(d.phase, Phase::Running);
        assert_eq!(record.deployed.as_ref().unwrap().restored_from, at);
        assert_eq!(record.suspended_at, None);
    }

    #[test]
    fn restart_nonce_restarts_and_trigger_nonce_takes_a_savepoint_without_stopping() {
        let (mut record, mut cluster) = running_job("a");
        let mut want = desired("a");
        want.restart_nonce = 1;
        converge(&want, &mut record, &mut cluster, None);
        assert_eq!(cluster.started.len(), 2);
        assert_eq!(record.deployed.as_ref().unwrap().restart_nonce, 1);

        want.savepoint_trigger_nonce = 7;
        let gen = record.deployed.as_ref().unwrap().generation;
        let d = converge(&want, &mut record, &mut cluster, None);
        assert_eq!(d.phase, Phase::Running);
        assert_eq!(cluster.started.len(), 2, "no restart");
        assert_eq!(
            cluster.generations.keys().copied().collect::<Vec<_>>(),
            [gen]
        );
        let sp = cluster.requested.last().unwrap();
        assert!(sp.contains("trigger-7"));
        assert_eq!(
            record.last_savepoint,
            Some(format!("s3://b/savepoints/{sp}"))
        );
        assert_eq!(record.savepoint_trigger_nonce, 7);
        let d = decide(&want, &record, &cluster.observe(&record));
        assert!(d.actions.is_empty(), "answered once: {:?}", d.actions);
    }

    #[test]
    fn pods_of_a_generation_the_record_does_not_own_go_before_anything_starts() {
        let mut cluster = Cluster::default();
        cluster.generations.insert(
            4,
            Pods {
                existing: 1,
                ready: 1,
                desired: 1,
                failing: false,
                stopped: 0,
            },
        );
        let mut record = Record::default();
        converge(&desired("a"), &mut record, &mut cluster, None);
        assert_eq!(cluster.max_live_generations, 1);
        assert_eq!(
            record.deployed.unwrap().generation,
            5,
            "above every generation seen"
        );
    }

    #[test]
    fn the_record_round_trips_through_json() {
        let (mut record, mut cluster) = running_job("a");
        let obs = cluster.observe(&record);
        record = decide(&desired("b"), &record, &obs).record;
        cluster.now_ms += 1;
        let json = serde_json::to_string(&record).unwrap();
        let back: Record = serde_json::from_str(&json).unwrap();
        assert_eq!(back, record);
        assert!(json.contains("\"step\":\"savepointing\""), "{json}");
    }

    #[test]
    fn a_generation_missing_some_of_its_pods_is_applied_again() {
        let (record, _) = running_job("a");
        let dep = record.deployed.clone().unwrap();
        let half = Pods {
            existing: 1,
            ready: 1,
            desired: 2,
            failing: false,
            stopped: 0,
        };
        let obs = Observed {
            now_ms: 0,
            generations: BTreeMap::from([(dep.generation, half)]),
            savepoint: SavepointOutcome::NotRequested,
        };
        let d = decide(&desired("a"), &record, &obs);
        assert!(d.actions.contains(&Action::StartGeneration(dep.clone())));
        assert_eq!(
            d.record.deployed,
            Some(dep),
            "the same generation, completed"
        );
    }

    #[test]
    fn workers_left_stopped_by_a_failed_savepoint_are_restarted_but_not_during_one() {
        let (record, _) = running_job("a");
        let g = record.deployed.as_ref().unwrap().generation;
        let stopped = Pods {
            existing: 2,
            ready: 2,
            desired: 2,
            failing: false,
            stopped: 1,
        };
        let obs = |savepoint| Observed {
            now_ms: 0,
            generations: BTreeMap::from([(g, stopped)]),
            savepoint,
        };
        // Steady state: nothing should be stopped.
        let d = decide(&desired("a"), &record, &obs(SavepointOutcome::NotRequested));
        assert!(d.actions.contains(&Action::RestartStoppedWorkers(g)));
        // An upgrade's savepoint in flight: stopping is what it does.
        let d = decide(&desired("b"), &record, &obs(SavepointOutcome::NotRequested));
        let j = d.record.journal.clone().unwrap();
        assert_eq!(j.step, Step::Savepointing);
        let d2 = decide(&desired("b"), &d.record, &obs(SavepointOutcome::Pending));
        assert!(!d2.actions.contains(&Action::RestartStoppedWorkers(g)));
        // It failed: until the retry, stopped workers are restarted.
        let failed = decide(
            &desired("b"),
            &d.record,
            &obs(SavepointOutcome::Failed("part upload".into())),
        );
        assert!(failed
            .record
            .journal
            .as_ref()
            .unwrap()
            .retry_at_ms
            .is_some());
        let waiting = decide(
            &desired("b"),
            &failed.record,
            &obs(SavepointOutcome::NotRequested),
        );
        assert!(waiting.actions.contains(&Action::RestartStoppedWorkers(g)));
        assert!(waiting.degraded.unwrap().contains("keeps running"));
    }

    #[test]
    fn pods_deleted_by_hand_are_applied_again_in_the_same_generation() {
        let (mut record, mut cluster) = running_job("a");
        cluster.generations.clear();
        let d = decide(&desired("a"), &record, &cluster.observe(&record));
        assert_eq!(
            d.actions,
            [Action::StartGeneration(record.deployed.clone().unwrap())]
        );
        record = d.record;
        assert_eq!(record.max_generation, 1);
    }
}
