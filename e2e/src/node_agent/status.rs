//! Pure pod status computation: container states → container statuses, phase, conditions.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// Restart policy of a pod (or of a container).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Restart on any exit.
    Always,
    /// Restart on non-zero exit.
    OnFailure,
    /// Never restart.
    Never,
}

impl RestartPolicy {
    /// Parses the API string; absent or unknown means `Always` (the API default).
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            Some("OnFailure") => Self::OnFailure,
            Some("Never") => Self::Never,
            _ => Self::Always,
        }
    }

    /// Whether a container that exited with `exit_code` is restarted.
    pub fn restarts(self, exit_code: i32) -> bool {
        match self {
            Self::Always => true,
            Self::OnFailure => exit_code != 0,
            Self::Never => false,
        }
    }
}

/// How a container process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Termination {
    /// Exit code (128 + signal when killed by a signal, like container runtimes report).
    pub exit_code: i32,
    /// The signal that killed it, if any.
    pub signal: Option<i32>,
    /// `Completed`, `Error`, `OOMKilled`...
    pub reason: String,
    /// Human-readable detail.
    pub message: Option<String>,
    /// When the process started.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub finished_at: Timestamp,
}

impl Termination {
    /// A termination from an exit code and/or signal, with the kubelet's reasons.
    pub fn new(
        exit_code: Option<i32>,
        signal: Option<i32>,
        started_at: Option<Timestamp>,
        finished_at: Timestamp,
    ) -> Self {
        let exit_code = exit_code.unwrap_or_else(|| 128 + signal.unwrap_or(0));
        Self {
            exit_code,
            signal,
            reason: if exit_code == 0 { "Completed" } else { "Error" }.to_owned(),
            message: None,
            started_at,
            finished_at,
        }
    }

    fn to_api(&self, container_id: Option<String>) -> ContainerStateTerminated {
        ContainerStateTerminated {
            container_id,
            exit_code: self.exit_code,
            finished_at: Some(Time(self.finished_at)),
            message: self.message.clone(),
            reason: Some(self.reason.clone()),
            signal: self.signal,
            started_at: self.started_at.map(Time),
        }
    }
}

/// The current state of one container, as the agent tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Not running: being prepared, backing off, or failed to start.
    Waiting {
        /// `ContainerCreating`, `CrashLoopBackOff`, `CreateContainerConfigError`...
        reason: String,
        /// Detail.
        message: Option<String>,
    },
    /// The process runs.
    Running {
        /// Since when.
        started_at: Timestamp,
        /// Its process id (also its process group id).
        pid: u32,
    },
    /// The process ended and will not be restarted (or not yet).
    Terminated(Termination),
}

/// Everything the status of one container is computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSnapshot {
    /// Container name.
    pub name: String,
    /// Image reference from the spec.
    pub image: String,
    /// Current state.
    pub state: State,
    /// The previous termination, if it was restarted.
    pub last_termination: Option<Termination>,
    /// Readiness (probe result, or running when no probe).
    pub ready: bool,
    /// How many times it was restarted.
    pub restart_count: i32,
}

impl ContainerSnapshot {
    /// A container that has not been started yet.
    pub fn waiting(name: &str, image: &str, reason: &str) -> Self {
        Self {
            name: name.to_owned(),
            image: image.to_owned(),
            state: State::Waiting {
                reason: reason.to_owned(),
                message: None,
            },
            last_termination: None,
            ready: false,
            restart_count: 0,
        }
    }

    /// The API container status.
    pub fn to_api(&self) -> ContainerStatus {
        let container_id = |pid: u32| Some(format!("riffle://{pid}"));
        let (state, id, started) = match &self.state {
            State::Waiting { reason, message } => (
                ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.clone()),
                        message: message.clone(),
                    }),
                    ..Default::default()
                },
                None,
                false,
            ),
            State::Running { started_at, pid } => (
                ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: Some(Time(*started_at)),
                    }),
                    ..Default::default()
                },
                container_id(*pid),
                true,
            ),
            State::Terminated(t) => (
                ContainerState {
                    terminated: Some(t.to_api(None)),
                    ..Default::default()
                },
                None,
                false,
            ),
        };
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: format!("riffle-local://{}", self.image),
            container_id: id,
            ready: self.ready,
            started: Some(started),
            restart_count: self.restart_count,
            state: Some(state),
            last_state: Some(
                self.last_termination
                    .as_ref()
                    .map(|t| ContainerState {
                        terminated: Some(t.to_api(None)),
                        ..Default::default()
                    })
                    .unwrap_or_default(),
            ),
            ..Default::default()
        }
    }
}

/// Pod phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepted but not all containers started.
    Pending,
    /// All containers started, at least one running or restarting.
    Running,
    /// All containers terminated successfully and will not restart.
    Succeeded,
    /// All containers terminated, at least one failed, and none will restart.
    Failed,
}

impl Phase {
    /// The API string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
        }
    }

    /// Succeeded or Failed.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// The pod phase from its containers, following the kubelet's rules.
///
/// `init_done` is false while init containers still have to complete; `init_failed` is true
/// when an init container failed and will not be retried (restart policy `Never`).
pub fn pod_phase(
    policy: RestartPolicy,
    init_done: bool,
    init_failed: bool,
    containers: &[ContainerSnapshot],
) -> Phase {
    if init_failed {
        return Phase::Failed;
    }
    if !init_done {
        return Phase::Pending;
    }
    let (mut waiting, mut running, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for c in containers {
        match &c.state {
            State::Running { .. } => running += 1,
            State::Terminated(t) => {
                stopped += 1;
                if t.exit_code == 0 {
                    succeeded += 1;
                }
            }
            // Waiting after a previous run = restarting (counts as stopped, like the kubelet).
            State::Waiting { .. } if c.last_termination.is_some() => stopped += 1,
            State::Waiting { .. } => waiting += 1,
        }
    }
    if containers.is_empty() || waiting > 0 {
        return Phase::Pending;
    }
    if running > 0 {
        return Phase::Running;
    }
    // Everything stopped.
    match policy {
        RestartPolicy::Always => Phase::Running,
        _ if stopped == succeeded => Phase::Succeeded,
        RestartPolicy::OnFailure => {
            // Failed containers that are waiting will be restarted.
            let restarting = containers
                .iter()
                .any(|c| matches!(c.state, State::Waiting { .. }));
            if restarting {
                Phase::Running
            } else {
                Phase::Failed
            }
        }
        RestartPolicy::Never => Phase::Failed,
    }
}

/// Inputs of the pod conditions.
#[derive(Debug, Clone, Copy)]
pub struct ConditionInputs {
    /// The sandbox (pod dir, IP, volumes) is ready.
    pub sandbox_ready: bool,
    /// Init containers completed.
    pub initialized: bool,
    /// Every container is ready.
    pub containers_ready: bool,
    /// Phase (a terminal pod is never Ready).
    pub phase: Phase,
}

fn condition_status(value: bool) -> String {
    if value { "True" } else { "False" }.to_owned()
}

/// Builds the conditions owned by the agent, keeping `lastTransitionTime` of conditions
/// whose status did not change (from `previous`), and keeping conditions the agent does not
/// own (e.g. `PodScheduled`, set by the scheduler) as they are.
pub fn build_conditions(
    previous: &[PodCondition],
    inputs: ConditionInputs,
    now: Timestamp,
) -> Vec<PodCondition> {
    let terminal = inputs.phase.is_terminal();
    let containers_ready = inputs.containers_ready && !terminal;
    let owned = [
        (
            "PodReadyToStartContainers",
            inputs.sandbox_ready && !terminal,
            None,
        ),
        ("Initialized", inputs.initialized, None),
        (
            "ContainersReady",
            containers_ready,
            (!containers_ready).then_some("ContainersNotReady"),
        ),
        (
            "Ready",
            containers_ready,
            (!containers_ready).then_some(if terminal {
                "PodCompleted"
            } else {
                "ContainersNotReady"
            }),
        ),
    ];
    let mut out: Vec<PodCondition> = previous
        .iter()
        .filter(|c| !owned.iter().any(|(t, _, _)| *t == c.type_))
        .cloned()
        .collect();
    for (type_, value, reason) in owned {
        let status = condition_status(value);
        let last_transition_time = previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        out.push(PodCondition {
            type_: type_.to_owned(),
            status,
            reason: reason.map(str::to_owned),
            last_transition_time: Some(last_transition_time),
            ..Default::default()
        });
    }
    out
}

/// The whole status written through the status subresource.
#[derive(Debug, Clone)]
pub struct PodStatusInputs<'a> {
    /// Phase.
    pub phase: Phase,
    /// Conditions (from [`build_conditions`]).
    pub conditions: Vec<PodCondition>,
    /// The pod's loopback IP, once allocated.
    pub pod_ip: Option<String>,
    /// The node's IP.
    pub host_ip: &'a str,
    /// When the agent accepted the pod.
    pub start_time: Timestamp,
    /// Init containers.
    pub init_containers: &'a [ContainerSnapshot],
    /// Containers.
    pub containers: &'a [ContainerSnapshot],
    /// A pod-level message (e.g. why it cannot start).
    pub message: Option<String>,
    /// A pod-level reason.
    pub reason: Option<String>,
}

/// Assembles a [`PodStatus`].
pub fn pod_status(inputs: PodStatusInputs<'_>) -> PodStatus {
    let ips = |ip: &Option<String>| ip.as_ref().map(|ip| vec![PodIP { ip: ip.clone() }]);
    PodStatus {
        phase: Some(inputs.phase.as_str().to_owned()),
        conditions: Some(inputs.conditions),
        pod_ips: ips(&inputs.pod_ip),
        pod_ip: inputs.pod_ip,
        host_ip: Some(inputs.host_ip.to_owned()),
        host_ips: Some(vec![k8s_openapi::api::core::v1::HostIP {
            ip: inputs.host_ip.to_owned(),
        }]),
        start_time: Some(Time(inputs.start_time)),
        init_container_statuses: (!inputs.init_containers.is_empty()).then(|| {
            inputs
                .init_containers
                .iter()
                .map(ContainerSnapshot::to_api)
                .collect()
        }),
        container_statuses: Some(
            inputs
                .containers
                .iter()
                .map(ContainerSnapshot::to_api)
                .collect(),
        ),
        message: inputs.message,
        reason: inputs.reason,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn running(name: &str) -> ContainerSnapshot {
        ContainerSnapshot {
            state: State::Running {
                started_at: ts(10),
                pid: 42,
            },
            ready: true,
            ..ContainerSnapshot::waiting(name, "img:1", "ContainerCreating")
        }
    }

    fn exited(name: &str, code: i32) -> ContainerSnapshot {
        ContainerSnapshot {
            state: State::Terminated(Termination::new(Some(code), None, Some(ts(10)), ts(20))),
            ..ContainerSnapshot::waiting(name, "img:1", "ContainerCreating")
        }
    }

    fn restarting(name: &str, code: i32) -> ContainerSnapshot {
        ContainerSnapshot {
            last_termination: Some(Termination::new(Some(code), None, Some(ts(10)), ts(20))),
            restart_count: 1,
            ..ContainerSnapshot::waiting(name, "img:1", "CrashLoopBackOff")
        }
    }

    #[test]
    fn restart_policy() {
        assert_eq!(RestartPolicy::parse(None), RestartPolicy::Always);
        assert_eq!(RestartPolicy::parse(Some("Never")), RestartPolicy::Never);
        assert!(RestartPolicy::Always.restarts(0));
        assert!(!RestartPolicy::OnFailure.restarts(0));
        assert!(RestartPolicy::OnFailure.restarts(3));
        assert!(!RestartPolicy::Never.restarts(3));
    }

    #[test]
    fn phases() {
        use RestartPolicy::*;
        let creating = ContainerSnapshot::waiting("a", "img", "ContainerCreating");
        assert_eq!(
            pod_phase(Always, true, false, std::slice::from_ref(&creating)),
            Phase::Pending
        );
        assert_eq!(
            pod_phase(Always, false, false, &[running("a")]),
            Phase::Pending
        );
        assert_eq!(
            pod_phase(Never, false, true, std::slice::from_ref(&creating)),
            Phase::Failed
        );
        assert_eq!(
            pod_phase(Always, true, false, &[running("a"), creating]),
            Phase::Pending
        );
        assert_eq!(
            pod_phase(Always, true, false, &[running("a"), exited("b", 1)]),
            Phase::Running
        );
        assert_eq!(
            pod_phase(Always, true, false, &[restarting("a", 1)]),
            Phase::Running
        );
        assert_eq!(
            pod_phase(Never, true, false, &[exited("a", 0), exited("b", 0)]),
            Phase::Succeeded
        );
        assert_eq!(
            pod_phase(Never, true, false, &[exited("a", 0), exited("b", 3)]),
            Phase::Failed
        );
        assert_eq!(
            pod_phase(OnFailure, true, false, &[exited("a", 0)]),
            Phase::Succeeded
        );
        assert_eq!(
            pod_phase(OnFailure, true, false, &[restarting("a", 2)]),
            Phase::Running
        );
        assert_eq!(
            pod_phase(OnFailure, true, false, &[exited("a", 2)]),
            Phase::Failed
        );
        assert_eq!(pod_phase(Always, true, false, &[]), Phase::Pending);
    }

    #[test]
    fn conditions_keep_transition_times() {
        let inputs = ConditionInputs {
            sandbox_ready: true,
            initialized: true,
            containers_ready: false,
            phase: Phase::Running,
        };
        let scheduled = PodCondition {
            type_: "PodScheduled".into(),
            status: "True".into(),
            last_transition_time: Some(Time(ts(1))),
            ..Default::default()
        };
        let first = build_conditions(&[scheduled], inputs, ts(100));
        let get = |cs: &[PodCondition], t: &str| cs.iter().find(|c| c.type_ == t).cloned().unwrap();
        assert_eq!(
            get(&first, "PodScheduled").last_transition_time,
            Some(Time(ts(1)))
        );
        assert_eq!(get(&first, "Ready").status, "False");
        assert_eq!(
            get(&first, "Ready").reason.as_deref(),
            Some("ContainersNotReady")
        );
        assert_eq!(first.len(), 5);

        let same = build_conditions(&first, inputs, ts(200));
        assert_eq!(
            get(&same, "Ready").last_transition_time,
            Some(Time(ts(100)))
        );

        let ready = build_conditions(
            &same,
            ConditionInputs {
                containers_ready: true,
                ..inputs
            },
            ts(300),
        );
        assert_eq!(get(&ready, "Ready").status, "True");
        assert_eq!(
            get(&ready, "ContainersReady").last_transition_time,
            Some(Time(ts(300)))
        );
        assert_eq!(
            get(&ready, "Initialized").last_transition_time,
            Some(Time(ts(100)))
        );

        let done = build_conditions(
            &ready,
            ConditionInputs {
                containers_ready: true,
                phase: Phase::Succeeded,
                ..inputs
            },
            ts(400),
        );
        assert_eq!(get(&done, "Ready").status, "False");
        assert_eq!(get(&done, "Ready").reason.as_deref(), Some("PodCompleted"));
    }

    #[test]
    fn container_status_shapes() {
        let s = exited("a", 3).to_api();
        let t = s.state.unwrap().terminated.unwrap();
        assert_eq!(t.exit_code, 3);
        assert_eq!(t.reason.as_deref(), Some("Error"));
        let r = restarting("a", 137).to_api();
        assert_eq!(r.restart_count, 1);
        assert_eq!(r.last_state.unwrap().terminated.unwrap().exit_code, 137);
        assert_eq!(
            r.state.unwrap().waiting.unwrap().reason.as_deref(),
            Some("CrashLoopBackOff")
        );
        let killed = Termination::new(None, Some(9), None, ts(5));
        assert_eq!((killed.exit_code, killed.reason.as_str()), (137, "Error"));
        let run = running("a").to_api();
        assert_eq!(run.container_id.as_deref(), Some("riffle://42"));
        assert!(run.ready);
    }
}
