//! The operator's Prometheus metrics (text exposition format, no client library needed for
//! a handful of counters).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

#[derive(Default)]
pub struct Metrics {
    reconciles: AtomicU64,
    failures: AtomicU64,
    reconcile_micros: AtomicU64,
    leader: AtomicBool,
    leader_transitions: AtomicU64,
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
