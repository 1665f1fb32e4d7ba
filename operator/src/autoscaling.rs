//! The controller's side of autoscaling: when to measure, the samples of the current window,
//! the Kafka read, and what a decision changes in the status. The decision itself is
//! [`crate::autoscaler::decide`].
//!
//! Samples are taken at reconciles (every 10 s or sooner) while the deployed generation runs
//! at the autoscaled parallelism with every worker ready, and only after the job has been
//! Ready for `stabilizationInterval`. They live in the operator's memory: a new leader
//! starts a fresh window. Windows tumble: each full one gives one decision.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::autoscaler::{self, Decision, Policy, Sample, Verdict};
use crate::crd::{Autoscaler, AutoscalerStatus, JobState, StreamJobSpec, StreamJobStatus};
use crate::lag::LagSource;
use crate::upgrade::{Pods, Record};
use crate::workers::WorkerMetrics;

/// Decisions that recommended a change, kept in the status.
const HISTORY: usize = 10;

/// The open window of every job, by uid.
#[derive(Default)]
pub struct Windows(Mutex<HashMap<String, Vec<Sample>>>);

impl Windows {
    fn reset(&self, uid: &str) {
        if let Ok(mut w) = self.0.lock() {
            w.remove(uid);
        }
    }

    /// Add a sample; the measurement when the window is full (the window then starts over
    /// from this sample).
    fn push(&self, uid: &str, sample: Sample, window_ms: i64) -> Option<autoscaler::Measurement> {
        let mut all = self.0.lock().ok()?;
        let samples = all.entry(uid.to_string()).or_default();
        samples.push(sample);
        let m = autoscaler::measure(samples, window_ms);
        if m.is_some() {
            let last = samples.pop();
            samples.clear();
            samples.extend(last);
        }
        m
    }

    pub fn forget(&self, uid: &str) {
        self.reset(uid);
    }
}

/// The parallelism to run: the autoscaler's choice while it is on and the user has not
/// changed `spec.parallelism` since, else `spec.parallelism`.
pub fn effective_parallelism(spec: &StreamJobSpec, status: Option<&AutoscalerStatus>) -> u32 {
    match (spec.autoscaler.as_ref(), status) {
        (Some(a), Some(s)) if a.enabled && s.user_parallelism == Some(spec.parallelism) => s
            .parallelism
            .unwrap_or(spec.parallelism)
            .min(spec.key_groups),
        _ => spec.parallelism,
    }
}

pub fn policy(a: &Autoscaler, key_groups: u32) -> Policy {
    Policy {
        min_parallelism: a.min_parallelism,
        max_parallelism: a.max_parallelism,
        key_groups,
        target_utilization: a.target_utilization,
        catch_up_s: a.catch_up_duration.0 as f64 / 1000.0,
        scale_down_delay_ms: a.scale_down_delay.0,
        max_rescales_per_hour: a.max_rescales_per_hour,
        dry_run: a.dry_run,
    }
}

/// What one reconcile's look at the job gives the autoscaler.
pub struct Look<'a> {
    pub uid: &'a str,
    pub spec: &'a StreamJobSpec,
    pub status: &'a StreamJobStatus,
    pub record: &'a Record,
    /// The deployed generation's pods, and its ready workers' figures by pod name.
    pub pods: Option<Pods>,
    pub metrics: &'a BTreeMap<String, WorkerMetrics>,
    /// The job's consumer group (its committed offsets are the job's positions).
    pub group: &'a str,
    pub now_ms: i64,
}

/// The next `status.autoscaler`, and the decision taken now, if any.
pub async fn step(
    windows: &Windows,
    lag: &dyn LagSource,
    look: Look<'_>,
) -> (Option<AutoscalerStatus>, Option<Decision>) {
    let Look {
        uid,
        spec,
        status,
        record,
        pods,
        metrics,
        group,
        now_ms,
    } = look;
    let Some(cfg) = spec.autoscaler.as_ref().filter(|a| a.enabled) else {
        // Off: the user's parallelism runs; the record of past decisions stays.
        windows.reset(uid);
        let off = status.autoscaler.clone().map(|mut a| {
            a.parallelism = None;
            a.user_parallelism = None;
            a.rescale_started_ms = None;
            a
        });
        return (off, None);
    };
    let mut a = status.autoscaler.clone().unwrap_or_default();
    if a.user_parallelism != Some(spec.parallelism) {
        // A new spec.parallelism (kubectl scale, an edit): the user's value wins and the
        // autoscaler goes on from it.
        a.parallelism = None;
        a.user_parallelism = Some(spec.parallelism);
        a.memory.recent.clear();
        a.memory.observing_since_ms = None;
        windows.reset(uid);
    }
    let current = a.parallelism.unwrap_or(spec.parallelism);
    let steady = spec.state == JobState::Running
        && record.journal.is_none()
        && pods.is_some_and(|p| p.desired == current && p.ready == current);
    if !steady {
        // A transition (a rescale, an upgrade, a restart): what was measured before says
        // nothing about the next generation, and the scale-down delay starts over.
        windows.reset(uid);
        a.memory.recent.clear();
        a.memory.observing_since_ms = None;
        return (Some(a), None);
    }
    if let Some(started) = a.rescale_started_ms.take() {
        // The rescale is done: from the request to every new worker ready.
        autoscaler::record_downtime(&mut a.memory, (now_ms - started).max(0) as f64 / 1000.0);
    }
    let ready_since = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")
        .and_then(|c| {
            c.last_transition_time
                .parse::<k8s_openapi::jiff::Timestamp>()
                .ok()
        })
        .map(|t| t.as_millisecond());
    let stable_for = ready_since.map_or(-1, |t| now_ms - t);
    if stable_for < cfg.stabilization_interval.0 {
        windows.reset(uid);
        return (Some(a), None);
    }
    let offsets = match lag.offsets(&spec.kafka, group, &spec.source.topics).await {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(group, error = %e, "autoscaler: reading offsets from Kafka");
            windows.reset(uid);
            return (Some(a), None);
        }
    };
    let sample = Sample {
        at_ms: now_ms,
        end: offsets.end,
        committed: offsets.committed,
        workers: metrics
            .iter()
            .map(|(pod, m)| (pod.clone(), (m.events_in, m.busy_seconds)))
            .collect(),
    };
    if sample.workers.len() as u32 != current {
        windows.reset(uid);
        return (Some(a), None);
    }
    let Some(measurement) = windows.push(uid, sample, cfg.metrics_window.0) else {
        return (Some(a), None);
    };
    let (decision, memory) = autoscaler::decide(
        &policy(cfg, spec.key_groups),
        &measurement,
        &a.memory,
        now_ms,
    );
    a.memory = memory;
    if decision.applied {
        a.parallelism = Some(decision.target);
        a.rescale_started_ms = Some(now_ms);
        windows.reset(uid);
    }
    if decision.verdict != Verdict::Keep {
        a.history.insert(0, decision.clone());
        a.history.truncate(HISTORY);
    }
    a.last_decision = Some(decision.clone());
    (Some(a), Some(decision))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(parallelism: u32, enabled: bool) -> StreamJobSpec {
        let mut sj: crate::crd::StreamJob =
            serde_yaml::from_str(include_str!("../../examples/streamjob.yaml")).unwrap();
        sj.spec.parallelism = parallelism;
        sj.spec.autoscaler.as_mut().unwrap().enabled = enabled;
        sj.spec
    }

    #[test]
    fn the_autoscaler_choice_runs_until_the_user_changes_parallelism_or_turns_it_off() {
        let chosen = AutoscalerStatus {
            parallelism: Some(4),
            user_parallelism: Some(2),
            ..AutoscalerStatus::default()
        };
        assert_eq!(effective_parallelism(&spec(2, true), Some(&chosen)), 4);
        assert_eq!(
            effective_parallelism(&spec(3, true), Some(&chosen)),
            3,
            "kubectl scale 3 wins over the choice made against 2"
        );
        assert_eq!(effective_parallelism(&spec(2, false), Some(&chosen)), 2);
        assert_eq!(effective_parallelism(&spec(2, true), None), 2);
    }
}
