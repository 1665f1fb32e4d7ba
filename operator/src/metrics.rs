//! The operator's Prometheus metrics (text exposition format, no client library needed for
//! a handful of counters).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use crate::autoscaler::{Decision, Verdict};

#[derive(Default)]
pub struct Metrics {
    reconciles: AtomicU64,
    failures: AtomicU64,
    reconcile_micros: AtomicU64,
    leader: AtomicBool,
    leader_transitions: AtomicU64,
    /// Per job (`namespace/name`): the autoscaler's last decision and its counts.
    autoscaler: Mutex<BTreeMap<(String, String), Autoscaled>>,
}

/// A per-job gauge: name, help, and how to read it from the last decision.
type Gauge = (&'static str, &'static str, fn(&Decision) -> f64);

#[derive(Default)]
struct Autoscaled {
    last: Option<Decision>,
    decisions: BTreeMap<String, u64>,
    rescales_up: u64,
    rescales_down: u64,
}

impl Metrics {
    pub fn reconciled(&self, took: Duration, ok: bool) {
        self.reconciles.fetch_add(1, Relaxed);
        if !ok {
            self.failures.fetch_add(1, Relaxed);
        }
        self.reconcile_micros
            .fetch_add(took.as_micros() as u64, Relaxed);
    }

    pub fn set_leader(&self, leader: bool) {
        if self.leader.swap(leader, Relaxed) != leader {
            self.leader_transitions.fetch_add(1, Relaxed);
        }
    }

    /// Record an autoscaler decision of a job.
    pub fn autoscaler_decided(&self, namespace: &str, job: &str, d: &Decision) {
        let Ok(mut all) = self.autoscaler.lock() else {
            return;
        };
        let a = all
            .entry((namespace.to_string(), job.to_string()))
            .or_default();
        *a.decisions.entry(d.reason.clone()).or_default() += 1;
        if d.applied {
            match d.verdict {
                Verdict::ScaleUp => a.rescales_up += 1,
                Verdict::ScaleDown => a.rescales_down += 1,
                Verdict::Keep => {}
            }
        }
        a.last = Some(d.clone());
    }

    /// Forget a deleted job's series.
    pub fn forget_job(&self, namespace: &str, job: &str) {
        if let Ok(mut all) = self.autoscaler.lock() {
            all.remove(&(namespace.to_string(), job.to_string()));
        }
    }

    fn render_autoscaler(&self, out: &mut String) {
        let Ok(all) = self.autoscaler.lock() else {
            return;
        };
        if all.is_empty() {
            return;
        }
        let gauges: [Gauge; 7] = [
            (
                "current_parallelism",
                "Workers running when the autoscaler last decided.",
                |d| f64::from(d.current),
            ),
            (
                "recommended_parallelism",
                "The autoscaler's last recommendation.",
                |d| f64::from(d.recommended),
            ),
            (
                "target_parallelism",
                "The parallelism the last decision runs the job at.",
                |d| f64::from(d.target),
            ),
            (
                "lag_records",
                "Records behind the end of the input topics (from Kafka), last window.",
                |d| d.inputs.lag,
            ),
            (
                "input_rate",
                "Records per second appended to the input topics, last window.",
                |d| d.inputs.input_rate,
            ),
            (
                "required_rate",
                "Input rate plus lag over catchUpDuration, last window.",
                |d| d.terms.required_rate,
            ),
            (
                "true_rate_per_worker",
                "Records per second a worker handles when busy all the time.",
                |d| d.terms.true_rate_per_worker,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP riffle_autoscaler_{name} {help}\n# TYPE riffle_autoscaler_{name} gauge"
            );
            for ((ns, job), a) in all.iter() {
                if let Some(d) = &a.last {
                    let _ = writeln!(
                        out,
                        "riffle_autoscaler_{name}{{namespace=\"{ns}\",job=\"{job}\"}} {}",
                        value(d)
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP riffle_autoscaler_decisions_total Autoscaler decisions by reason.\n# TYPE riffle_autoscaler_decisions_total counter"
        );
        for ((ns, job), a) in all.iter() {
            for (reason, n) in &a.decisions {
                let _ = writeln!(
                    out,
                    "riffle_autoscaler_decisions_total{{namespace=\"{ns}\",job=\"{job}\",reason=\"{reason}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP riffle_autoscaler_rescales_total Rescales the autoscaler applied.\n# TYPE riffle_autoscaler_rescales_total counter"
        );
        for ((ns, job), a) in all.iter() {
            for (direction, n) in [("up", a.rescales_up), ("down", a.rescales_down)] {
                let _ = writeln!(
                    out,
                    "riffle_autoscaler_rescales_total{{namespace=\"{ns}\",job=\"{job}\",direction=\"{direction}\"}} {n}"
                );
            }
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "riffle_operator_reconciles_total",
            "counter",
            "Reconciles of StreamJobs.",
            self.reconciles.load(Relaxed).to_string(),
        );
        metric(
            "riffle_operator_reconcile_failures_total",
            "counter",
            "Reconciles that ended in an error (retried).",
            self.failures.load(Relaxed).to_string(),
        );
        metric(
            "riffle_operator_reconcile_seconds_total",
            "counter",
            "Time spent reconciling.",
            format!("{:.6}", self.reconcile_micros.load(Relaxed) as f64 / 1e6),
        );
        metric(
            "riffle_operator_leader",
            "gauge",
            "1 while this replica holds the leader lease.",
            u8::from(self.leader.load(Relaxed)).to_string(),
        );
        metric(
            "riffle_operator_leader_transitions_total",
            "counter",
            "Times this replica gained or lost the lease.",
            self.leader_transitions.load(Relaxed).to_string(),
        );
        self.render_autoscaler(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_counted() {
        let m = Metrics::default();
        m.reconciled(Duration::from_millis(1500), true);
        m.reconciled(Duration::from_millis(500), false);
        m.set_leader(true);
        let text = m.render();
        assert!(
            text.contains("riffle_operator_reconciles_total 2\n"),
            "{text}"
        );
        assert!(text.contains("riffle_operator_reconcile_failures_total 1\n"));
        assert!(text.contains("riffle_operator_reconcile_seconds_total 2.000000\n"));
        assert!(text.contains("riffle_operator_leader 1\n"));
        assert!(text.contains("riffle_operator_leader_transitions_total 1\n"));
    }
}
