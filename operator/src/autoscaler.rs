//! Lag-driven autoscaling: pure types and one decision function, no I/O (DS2 / the Flink
//! Kubernetes operator's autoscaler, reduced to one stage: Riffle's workers each run the whole
//! dataflow for their key groups, so the job has one parallelism).
//!
//! Over a metrics window the controller measures the input rate (growth of the input topics'
//! end offsets), the lag (end offsets minus the job's committed offsets, read from Kafka
//! itself) and each worker's processing rate and busy share. Then:
//!
//! ```text
//! required    = inputRate + lag / catchUpDuration
//! trueRate    = Σ processed / Σ busy seconds            (per worker, as if never idle)
//! desired     = ceil(required / (trueRate × targetUtilization))
//! recommended = desired clamped to [min, max], aligned up to a divisor of keyGroups
//! ```
//!
//! A higher recommendation applies at once; a lower one only after every recommendation of
//! the last `scaleDownDelay` was lower, and then to the highest of them. A rescale costs a
//! savepoint and a restart (its measured downtime), so one whose gain does not pay for that
//! is skipped: a scale-up when the running workers would clear the backlog sooner anyway, a
//! scale-down when the smaller job could not catch up on what the downtime piles up within
//! `catchUpDuration`. At most `maxRescalesPerHour` are applied.

use serde::{Deserialize, Serialize};

/// The user's settings, in plain units.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub min_parallelism: u32,
    pub max_parallelism: u32,
    pub key_groups: u32,
    pub target_utilization: f64,
    pub catch_up_s: f64,
    pub scale_down_delay_ms: i64,
    pub max_rescales_per_hour: u32,
    pub dry_run: bool,
}

/// Downtime assumed for a rescale until one has been measured.
pub const DEFAULT_DOWNTIME_S: f64 = 30.0;

/// Busy shares below this are treated as this: a nearly idle worker's capacity estimate
/// (rate / busy) would otherwise be unbounded noise.
const MIN_BUSY: f64 = 0.01;

/// What the controller measured over one metrics window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Measurement {
    /// Workers that ran the whole window.
    pub parallelism: u32,
    /// Records behind the end of the input topics at the end of the window (from Kafka).
    pub lag: f64,
    /// Records per second appended to the input topics.
    pub input_rate: f64,
    /// Records per second the workers handled, together.
    pub processing_rate: f64,
    /// Busy seconds per second of the workers, on average (0..1).
    pub busy_ratio: f64,
    pub window_s: f64,
}

/// The autoscaler's memory between decisions (persisted in the status).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    /// Recommendations within the scale-down delay, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent: Vec<Recommendation>,
    /// Since when recommendations have been collected for the current parallelism (a
    /// scale-down needs a whole delay of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observing_since_ms: Option<i64>,
    /// When rescales were applied, within the last hour.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rescales_ms: Vec<i64>,
    /// Downtime of past rescales (seconds, a moving average of the measured ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_s: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Recommendation {
    pub at_ms: i64,
    pub parallelism: u32,
}

/// The terms of the formula, for the record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Terms {
    pub required_rate: f64,
    /// Per worker, when busy all the time.
    pub true_rate_per_worker: f64,
    /// `required / (trueRate × targetUtilization)` before rounding.
    pub raw: f64,
    pub clamped: u32,
    pub aligned: u32,
    /// The downtime the cost check assumed (seconds).
    pub downtime_s: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Rescale to `target`.
    ScaleUp,
    ScaleDown,
    /// Stay: the recommendation is the current parallelism, or a change is not due yet.
    Keep,
}

/// One decision: inputs, terms, result, and whether it is applied (and why not).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub at_ms: i64,
    pub inputs: Measurement,
    pub terms: Terms,
    pub current: u32,
    pub recommended: u32,
    pub verdict: Verdict,
    /// The parallelism to run now (the current one unless applied).
    pub target: u32,
    pub applied: bool,
    /// A short reason code and a sentence.
    pub reason: String,
    pub message: String,
}

/// The parallelism `desired` is raised to so key groups spread evenly: the smallest divisor
/// of `key_groups` in `desired..=max`, else `desired` (a remainder is unavoidable).
pub fn align(desired: u32, max: u32, key_groups: u32) -> u32 {
    (desired..=max.max(desired))
        .find(|p| key_groups.is_multiple_of(*p))
        .unwrap_or(desired)
}

/// Decide from one window's measurement. Returns the decision and the memory to keep.
pub fn decide(
    policy: &Policy,
    m: &Measurement,
    memory: &Memory,
    now_ms: i64,
) -> (Decision, Memory) {
    let current = m.parallelism.max(1);
    let upper = policy.max_parallelism.min(policy.key_groups).max(1);
    let lower = policy.min_parallelism.clamp(1, upper);
    let downtime_s = memory.downtime_s.unwrap_or(DEFAULT_DOWNTIME_S);
    let mut memory = memory.clone();
    memory
        .rescales_ms
        .retain(|t| now_ms.saturating_sub(*t) < 3_600_000);

    let required = m.input_rate.max(0.0) + m.lag.max(0.0) / policy.catch_up_s.max(1.0);
    let busy = m.busy_ratio.clamp(MIN_BUSY, 1.0);
    let true_rate = if m.processing_rate > 0.0 {
        m.processing_rate / busy / f64::from(current)
    } else {
        0.0
    };
    let mut terms = Terms {
        required_rate: required,
        true_rate_per_worker: true_rate,
        downtime_s,
        ..Terms::default()
    };
    let keep = |terms: Terms, recommended: u32, reason: &str, message: String| Decision {
        at_ms: now_ms,
        inputs: *m,
        terms,
        current,
        recommended,
        verdict: Verdict::Keep,
        target: current,
        applied: false,
        reason: reason.into(),
        message,
    };

    let desired = if required <= 0.0 {
        // Nothing arrives and nothing waits: the smallest job will do.
        terms.raw = 0.0;
        lower
    } else if true_rate <= 0.0 {
        let d = keep(
            terms,
            current,
            "InsufficientMetrics",
            "records wait but the workers processed none in the window: no capacity estimate"
                .into(),
        );
        return (d, memory);
    } else {
        terms.raw = required / (true_rate * policy.target_utilization.clamp(0.05, 1.0));
        // A hair below an integer is that integer (float noise must not add a worker).
        ((terms.raw - 1e-9).ceil().max(1.0)) as u32
    };
    terms.clamped = desired.clamp(lower, upper);
    terms.aligned = align(terms.clamped, upper, policy.key_groups);
    let recommended = terms.aligned;

    // Recommendations for this parallelism, within the scale-down delay.
    let since = *memory.observing_since_ms.get_or_insert(now_ms);
    memory.recent.push(Recommendation {
        at_ms: now_ms,
        parallelism: recommended,
    });
    memory
        .recent
        .retain(|r| now_ms - r.at_ms <= policy.scale_down_delay_ms);

    let (verdict, target) = if recommended > current {
        (Verdict::ScaleUp, recommended)
    } else if recommended < current {
        let highest = memory
            .recent
            .iter()
            .map(|r| r.parallelism)
            .max()
            .unwrap_or(recommended);
        if now_ms - since < policy.scale_down_delay_ms || highest >= current {
            let waited = (now_ms - since).max(0) / 1000;
            let d = keep(
                terms,
                recommended,
                "ScaleDownDelayed",
                format!(
                    "{recommended} would do, but a scale-down needs every recommendation of the last {} s below {current} (observed {waited} s, highest {highest})",
                    policy.scale_down_delay_ms / 1000
                ),
            );
            return (d, memory);
        }
        (Verdict::ScaleDown, highest)
    } else {
        let d = keep(
            terms,
            recommended,
            "Steady",
            format!("{current} workers fit the load"),
        );
        return (d, memory);
    };

    let mut d = Decision {
        at_ms: now_ms,
        inputs: *m,
        terms,
        current,
        recommended,
        verdict,
        target,
        applied: false,
        reason: String::new(),
        message: String::new(),
    };
    let in_rate = m.input_rate.max(0.0);
    let lag = m.lag.max(0.0);
    let cap_now = true_rate * f64::from(current);
    let cap_new = true_rate * f64::from(target);
    let not_applied = |mut d: Decision, reason: &str, message: String| {
        d.reason = reason.into();
        d.message = message;
        d.target = current;
        d
    };
    if verdict == Verdict::ScaleUp && in_rate < cap_now {
        // The running workers keep up; rescaling only pays if it clears the backlog sooner,
        // its own downtime (and what piles up meanwhile) included.
        let drain_now = lag / (cap_now - in_rate);
        let drain_new = if cap_new > in_rate {
            downtime_s + (lag + in_rate * downtime_s) / (cap_new - in_rate)
        } else {
            f64::INFINITY
        };
        if drain_now <= drain_new {
            let d = not_applied(
                d,
                "NotWorthIt",
                format!(
                    "{current} workers clear the backlog in {drain_now:.0} s; rescaling to {target} would take {drain_new:.0} s with {downtime_s:.0} s of downtime"
                ),
            );
            return (d, memory);
        }
    }
    if verdict == Verdict::ScaleDown {
        let backlog = lag + in_rate * downtime_s;
        let catch_up = if backlog <= 0.0 {
            0.0 // nothing arrives and nothing waits: nothing to catch up on
        } else if cap_new > in_rate {
            backlog / (cap_new - in_rate)
        } else {
            f64::INFINITY
        };
        if catch_up > policy.catch_up_s {
            let d = not_applied(
                d,
                "NotWorthIt",
                format!(
                    "{target} workers would need {catch_up:.0} s to catch up on the {backlog:.0} records a rescale leaves (catchUpDuration {:.0} s)",
                    policy.catch_up_s
                ),
            );
            return (d, memory);
        }
    }
    if memory.rescales_ms.len() as u32 >= policy.max_rescales_per_hour {
        let d = not_applied(
            d,
            "RateLimited",
            format!(
                "{} rescales in the last hour (maxRescalesPerHour {})",
                memory.rescales_ms.len(),
                policy.max_rescales_per_hour
            ),
        );
        return (d, memory);
    }
    let why = match verdict {
        Verdict::ScaleUp => format!(
            "required {required:.0} rec/s (input {in_rate:.0} + lag {lag:.0} / {:.0} s) over {true_rate:.0} rec/s per busy worker at {:.0}% target",
            policy.catch_up_s,
            policy.target_utilization * 100.0
        ),
        _ => format!(
            "every recommendation of the last {} s was below {current}; the highest was {target}",
            policy.scale_down_delay_ms / 1000
        ),
    };
    if policy.dry_run {
        let d = not_applied(
            d,
            "DryRun",
            format!("would rescale {current} → {target}: {why}"),
        );
        return (d, memory);
    }
    d.applied = true;
    d.reason = match verdict {
        Verdict::ScaleUp => "ScaleUp".into(),
        _ => "ScaleDown".into(),
    };
    d.message = format!("rescaling {current} → {target}: {why}");
    memory.rescales_ms.push(now_ms);
    memory.recent.clear();
    memory.observing_since_ms = None;
    (d, memory)
}

/// One reading of a running job, taken at every reconcile.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    pub at_ms: i64,
    /// Σ end offsets of the input partitions.
    pub end: i64,
    /// Σ the job's committed offsets on them.
    pub committed: i64,
    /// Per worker pod: (events handled since it started, busy seconds since it started).
    pub workers: std::collections::BTreeMap<String, (u64, f64)>,
}

/// The measurement over `samples` (oldest first) once they span `window_ms`: rates are
/// differences between the first and the last sample. `None` until the window is full, or
/// when a worker of the last sample was not in the first (it restarted: counters reset).
pub fn measure(samples: &[Sample], window_ms: i64) -> Option<Measurement> {
    let (first, last) = (samples.first()?, samples.last()?);
    let span_ms = last.at_ms - first.at_ms;
    if span_ms < window_ms || span_ms <= 0 || last.workers.is_empty() {
        return None;
    }
    let secs = span_ms as f64 / 1000.0;
    let (mut events, mut busy) = (0.0, 0.0);
    for (pod, (e1, b1)) in &last.workers {
        let (e0, b0) = first.workers.get(pod)?;
        if e1 < e0 || b1 < b0 {
            return None;
        }
        events += (e1 - e0) as f64;
        busy += b1 - b0;
    }
    let n = last.workers.len() as f64;
    Some(Measurement {
        parallelism: last.workers.len() as u32,
        lag: (last.end - last.committed).max(0) as f64,
        input_rate: (last.end - first.end).max(0) as f64 / secs,
        processing_rate: events / secs,
        busy_ratio: (busy / secs / n).clamp(0.0, 1.0),
        window_s: secs,
    })
}

/// Fold a measured rescale downtime into the memory (moving average, so one slow restart
/// does not dominate).
pub fn record_downtime(memory: &mut Memory, seconds: f64) {
    memory.downtime_s = Some(match memory.downtime_s {
        Some(prev) => 0.5 * prev + 0.5 * seconds,
        None => seconds,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            min_parallelism: 1,
            max_parallelism: 8,
            key_groups: 64,
            target_utilization: 0.7,
            catch_up_s: 300.0,
            scale_down_delay_ms: 600_000,
            max_rescales_per_hour: 6,
            dry_run: false,
        }
    }

    fn window(parallelism: u32, input: f64, lag: f64, processed: f64, busy: f64) -> Measurement {
        Measurement {
            parallelism,
            lag,
            input_rate: input,
            processing_rate: processed,
            busy_ratio: busy,
            window_s: 60.0,
        }
    }

    #[test]
    fn the_formula_terms_are_recorded() {
        // 2 workers handle 1000 rec/s at 50% busy: 1000 rec/s each when busy all the time.
        // Required: 1500 + 60000 / 300 = 1700 rec/s; at 70%: 1700 / 700 = 2.43 → 3 → 4
        // (the smallest divisor of 64 from 3 up).
        let (d, _) = decide(
            &policy(),
            &window(2, 1500.0, 60_000.0, 1000.0, 0.5),
            &Memory::default(),
            0,
        );
        assert_eq!(d.terms.required_rate, 1700.0);
        assert_eq!(d.terms.true_rate_per_worker, 1000.0);
        assert!((d.terms.raw - 1700.0 / 700.0).abs() < 1e-9);
        assert_eq!((d.terms.clamped, d.terms.aligned), (3, 4));
        assert_eq!(
            (d.verdict, d.target, d.applied),
            (Verdict::ScaleUp, 4, true)
        );
        assert_eq!(d.reason, "ScaleUp");
    }

    #[test]
    fn alignment_prefers_divisors_of_the_key_groups() {
        assert_eq!(align(3, 8, 64), 4);
        assert_eq!(align(5, 8, 64), 8);
        assert_eq!(align(5, 6, 64), 5, "no divisor in range: keep the desired");
        assert_eq!(align(7, 12, 24), 8);
        assert_eq!(align(1, 1, 7), 1);
    }

    #[test]
    fn recommendations_are_clamped_to_the_bounds_and_the_key_groups() {
        let mut p = policy();
        p.max_parallelism = 100;
        p.key_groups = 16;
        let (d, _) = decide(&p, &window(2, 1e6, 0.0, 100.0, 1.0), &Memory::default(), 0);
        assert_eq!(d.target, 16, "never more workers than key groups");
        let mut p = policy();
        p.min_parallelism = 2;
        let (d, _) = decide(&p, &window(4, 0.0, 0.0, 0.0, 0.0), &Memory::default(), 0);
        assert_eq!(d.recommended, 2, "an idle job goes to minParallelism");
    }

    #[test]
    fn scale_down_waits_for_the_delay_and_takes_the_highest_recommendation() {
        let p = policy();
        let mut mem = Memory::default();
        // 8 workers, each worth 1000 rec/s; the load asks for 2, then 3, then 2.
        let loads = [(0, 1000.0), (200_000, 1800.0), (400_000, 1000.0)];
        for (t, input) in loads {
            let (d, m) = decide(&p, &window(8, input, 0.0, input, input / 8000.0), &mem, t);
            assert_eq!(d.verdict, Verdict::Keep, "at {t}: {d:?}");
            assert_eq!(d.reason, "ScaleDownDelayed");
            mem = m;
        }
        let (d, _) = decide(&p, &window(8, 1000.0, 0.0, 1000.0, 0.125), &mem, 600_000);
        assert_eq!((d.verdict, d.applied), (Verdict::ScaleDown, true), "{d:?}");
        assert_eq!(
            d.target, 4,
            "the highest within the delay: 1800 / 700 = 2.6 → 3 → 4"
        );
    }

    #[test]
    fn a_recommendation_at_or_above_current_cancels_a_pending_scale_down() {
        let p = policy();
        let (_, mem) = decide(
            &p,
            &window(4, 500.0, 0.0, 500.0, 0.125),
            &Memory::default(),
            0,
        );
        let (_, mem) = decide(&p, &window(4, 2500.0, 0.0, 2500.0, 0.625), &mem, 300_000);
        let (d, _) = decide(&p, &window(4, 500.0, 0.0, 500.0, 0.125), &mem, 600_000);
        assert_eq!(
            d.verdict,
            Verdict::Keep,
            "4 was recommended within the delay: {d:?}"
        );
    }

    #[test]
    fn a_scale_up_that_does_not_pay_for_its_downtime_is_skipped() {
        // 2 workers at 1000 rec/s each keep up with 1300 rec/s and clear 3000 records in
        // 4 s; a restart alone takes 30 s.
        let mut p = policy();
        p.target_utilization = 0.5;
        let (d, _) = decide(
            &p,
            &window(2, 1300.0, 3000.0, 1300.0, 0.65),
            &Memory::default(),
            0,
        );
        assert_eq!(d.recommended, 4);
        assert_eq!(
            (d.applied, d.reason.as_str(), d.target),
            (false, "NotWorthIt", 2)
        );
        // The same recommendation while the workers fall behind is applied.
        let (d, _) = decide(
            &p,
            &window(2, 2500.0, 3000.0, 2000.0, 1.0),
            &Memory::default(),
            0,
        );
        assert!(d.applied, "{d:?}");
    }

    #[test]
    fn a_scale_down_that_could_not_catch_up_on_its_downtime_is_skipped() {
        let mut p = policy();
        p.scale_down_delay_ms = 0;
        p.catch_up_s = 10.0;
        p.target_utilization = 1.0;
        // 4 workers at 1000 rec/s each; 1900 rec/s needs 2, which would gain only 100 rec/s
        // on the 57000 records a 30 s restart piles up.
        let (d, _) = decide(
            &p,
            &window(4, 1900.0, 0.0, 1900.0, 0.475),
            &Memory::default(),
            0,
        );
        assert_eq!(d.recommended, 2);
        assert_eq!(
            (d.applied, d.reason.as_str()),
            (false, "NotWorthIt"),
            "{d:?}"
        );
    }

    #[test]
    fn an_idle_job_goes_down_to_the_minimum_after_the_delay() {
        let p = policy();
        let idle = window(4, 0.0, 0.0, 0.0, 0.0);
        let (d, mem) = decide(&p, &idle, &Memory::default(), 0);
        assert_eq!((d.recommended, d.reason.as_str()), (1, "ScaleDownDelayed"));
        let (d, _) = decide(&p, &idle, &mem, 600_000);
        assert_eq!(
            (d.verdict, d.target, d.applied),
            (Verdict::ScaleDown, 1, true),
            "{d:?}"
        );
    }

    #[test]
    fn rescales_per_hour_are_limited() {
        let mut p = policy();
        p.max_rescales_per_hour = 2;
        let mem = Memory {
            rescales_ms: vec![0, 1_000_000, 2_000_000],
            ..Memory::default()
        };
        let (d, mem) = decide(&p, &window(2, 5000.0, 1e6, 2000.0, 1.0), &mem, 3_700_000);
        assert_eq!((d.applied, d.reason.as_str()), (false, "RateLimited"));
        assert_eq!(
            mem.rescales_ms,
            vec![1_000_000, 2_000_000],
            "older than an hour dropped"
        );
        let (d, _) = decide(&p, &window(2, 5000.0, 1e6, 2000.0, 1.0), &mem, 4_700_000);
        assert!(d.applied, "one slot is free again: {d:?}");
    }

    #[test]
    fn dry_run_records_without_applying() {
        let mut p = policy();
        p.dry_run = true;
        let (d, mem) = decide(
            &p,
            &window(2, 5000.0, 1e6, 2000.0, 1.0),
            &Memory::default(),
            0,
        );
        assert_eq!(
            (d.verdict, d.applied, d.target),
            (Verdict::ScaleUp, false, 2)
        );
        assert_eq!(d.reason, "DryRun");
        assert!(d.message.contains("2 → 8"), "{}", d.message);
        assert!(mem.rescales_ms.is_empty());
    }

    #[test]
    fn no_capacity_estimate_means_no_change() {
        let (d, _) = decide(
            &policy(),
            &window(2, 100.0, 5000.0, 0.0, 0.0),
            &Memory::default(),
            0,
        );
        assert_eq!(
            (d.verdict, d.reason.as_str()),
            (Verdict::Keep, "InsufficientMetrics")
        );
    }

    #[test]
    fn a_window_measures_rates_from_the_first_and_last_sample() {
        let at = |t: i64, end: i64, committed: i64, w: &[(&str, u64, f64)]| Sample {
            at_ms: t,
            end,
            committed,
            workers: w
                .iter()
                .map(|(p, e, b)| (p.to_string(), (*e, *b)))
                .collect(),
        };
        let samples = [
            at(0, 1000, 900, &[("w0", 100, 1.0), ("w1", 50, 2.0)]),
            at(10_000, 6000, 2000, &[("w0", 400, 4.0), ("w1", 450, 7.0)]),
            at(
                20_000,
                11_000,
                3000,
                &[("w0", 1100, 9.0), ("w1", 1050, 12.0)],
            ),
        ];
        assert_eq!(measure(&samples[..2], 20_000), None, "window not full yet");
        let m = measure(&samples, 20_000).unwrap();
        assert_eq!(m.parallelism, 2);
        assert_eq!(m.lag, 8000.0);
        assert_eq!(m.input_rate, 500.0);
        assert_eq!(m.processing_rate, 100.0, "(1000 + 1000) / 20 s");
        assert_eq!(
            m.busy_ratio, 0.45,
            "(8 + 10) busy seconds / 20 s / 2 workers"
        );
        let restarted = [
            samples[0].clone(),
            at(20_000, 0, 0, &[("w0", 5, 0.1), ("w1", 900, 9.0)]),
        ];
        assert_eq!(
            measure(&restarted, 20_000),
            None,
            "a worker's counters went back"
        );
        let replaced = [samples[0].clone(), at(20_000, 0, 0, &[("w2", 5, 0.1)])];
        assert_eq!(measure(&replaced, 20_000), None, "a worker of another pod");
    }

    #[test]
    fn measured_downtime_is_a_moving_average() {
        let mut m = Memory::default();
        record_downtime(&mut m, 40.0);
        record_downtime(&mut m, 20.0);
        assert_eq!(m.downtime_s, Some(30.0));
    }
}
