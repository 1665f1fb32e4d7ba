//! The autoscaler's decision function driving a simulated job, second by second, under four
//! input-rate curves (step, ramp, sine, spike). Deterministic: no clocks, no randomness.
//!
//! The model: each worker handles at most `CAPACITY` records/s; a rescale stops processing
//! for `DOWNTIME` seconds (the savepoint and restart) and then the controller ignores
//! `STABILIZATION` seconds before it measures again; every `WINDOW` seconds of measurement
//! give one decision, as in the operator. Each curve checks convergence within a bounded
//! number of decisions, that the lag drains, and that the parallelism does not oscillate.

use riffle_operator::autoscaler::{decide, record_downtime, Measurement, Memory, Policy};

const CAPACITY: f64 = 1000.0;
const DOWNTIME: u32 = 30;
const STABILIZATION: u32 = 60;
const WINDOW: u32 = 60;

fn policy() -> Policy {
    Policy {
        min_parallelism: 1,
        max_parallelism: 16,
        key_groups: 64,
        target_utilization: 0.7,
        catch_up_s: 300.0,
        scale_down_delay_ms: 600_000,
        max_rescales_per_hour: 6,
        dry_run: false,
    }
}

#[derive(Debug)]
struct Run {
    /// (second, from, to) of every applied rescale.
    rescales: Vec<(u32, u32, u32)>,
    decisions: u32,
    /// Parallelism and lag at every second.
    parallelism: Vec<u32>,
    lag: Vec<f64>,
}

impl Run {
    fn peak_lag(&self) -> f64 {
        self.lag.iter().copied().fold(0.0, f64::max)
    }
    /// Rescales that reverse the previous one (up then down, or down then up).
    fn reversals(&self) -> Vec<(u32, u32)> {
        self.rescales
            .windows(2)
            .filter(|w| (w[0].2 > w[0].1) != (w[1].2 > w[1].1))
            .map(|w| (w[0].0, w[1].0))
            .collect()
    }
}

fn simulate(seconds: u32, start: u32, rate: impl Fn(u32) -> f64) -> Run {
    let policy = policy();
    let mut memory = Memory::default();
    let mut p = start;
    let mut lag = 0.0f64;
    let mut down_until = 0u32; // no processing before this second
    let mut measure_from = STABILIZATION; // no measurement before this second
    let (mut inputs, mut processed, mut busy) = (0.0, 0.0, 0.0);
    let mut run = Run {
        rescales: Vec::new(),
        decisions: 0,
        parallelism: Vec::new(),
        lag: Vec::new(),
    };
    for t in 0..seconds {
        let input = rate(t);
        lag += input;
        let capacity = if t < down_until {
            0.0
        } else {
            CAPACITY * f64::from(p)
        };
        let done = lag.min(capacity);
        lag -= done;
        if t >= measure_from {
            inputs += input;
            processed += done;
            busy += if capacity > 0.0 { done / capacity } else { 0.0 };
            if t + 1 - measure_from == WINDOW {
                let w = f64::from(WINDOW);
                let m = Measurement {
                    parallelism: p,
                    lag,
                    input_rate: inputs / w,
                    processing_rate: processed / w,
                    busy_ratio: busy / w,
                    window_s: w,
                };
                let (d, next) = decide(&policy, &m, &memory, i64::from(t) * 1000);
                memory = next;
                run.decisions += 1;
                if d.applied {
                    run.rescales.push((t, p, d.target));
                    p = d.target;
                    down_until = t + 1 + DOWNTIME;
                    measure_from = down_until + STABILIZATION;
                    record_downtime(&mut memory, f64::from(DOWNTIME));
                } else {
                    measure_from = t + 1;
                }
                (inputs, processed, busy) = (0.0, 0.0, 0.0);
            }
        }
        run.parallelism.push(p);
        run.lag.push(lag);
    }
    run
}

fn report(name: &str, run: &Run) {
    eprintln!(
        "{name}: {} decisions, rescales {:?}, peak lag {:.0}, final parallelism {}, final lag {:.0}",
        run.decisions,
        run.rescales,
        run.peak_lag(),
        run.parallelism.last().unwrap(),
        run.lag.last().unwrap()
    );
}

#[test]
fn a_step_converges_in_one_rescale_and_stays() {
    // 1000 → 5000 records/s at 10 min: 5000 / (1000 × 0.7) = 7.1 → 8 workers.
    let run = simulate(3600, 2, |t| if t < 600 { 1000.0 } else { 5000.0 });
    report("step", &run);
    let ups: Vec<_> = run.rescales.iter().filter(|r| r.0 >= 600).collect();
    assert_eq!(ups.len(), 1, "one rescale reaches the new level: {run:?}");
    assert_eq!(ups[0].2, 8);
    assert!(
        ups[0].0 < 600 + 2 * WINDOW,
        "decided within two windows of the step"
    );
    assert!(*run.lag.last().unwrap() < 1.0, "the backlog drains");
    assert!(
        run.reversals().is_empty(),
        "no oscillation: {:?}",
        run.rescales
    );
}

#[test]
fn a_ramp_only_scales_up_while_it_rises() {
    // 500 → 9500 records/s over 40 minutes, then flat.
    let run = simulate(5400, 1, |t| {
        500.0 + 9000.0 * (f64::from(t.min(2400)) / 2400.0)
    });
    report("ramp", &run);
    assert!(
        run.rescales.iter().all(|r| r.2 > r.1),
        "never down on a rising load: {:?}",
        run.rescales
    );
    assert!(run.rescales.len() <= 4, "bounded: {:?}", run.rescales);
    let last = *run.parallelism.last().unwrap();
    assert!(
        f64::from(last) * CAPACITY > 9500.0,
        "keeps up at the top: {last}"
    );
    assert!(*run.lag.last().unwrap() < 1.0);
}

#[test]
fn a_sine_is_followed_without_flapping() {
    // 3000 ± 2500 records/s with a 1-hour period, for 4 hours.
    let period = 3600.0;
    let run = simulate(4 * 3600, 4, |t| {
        3000.0 + 2500.0 * (2.0 * std::f64::consts::PI * f64::from(t) / period).sin()
    });
    report("sine", &run);
    for (a, b) in run.reversals() {
        assert!(
            b - a >= 600,
            "a reversal within the scale-down delay ({a} s → {b} s): {:?}",
            run.rescales
        );
    }
    for hour in 0..4 {
        let n = run.rescales.iter().filter(|r| r.0 / 3600 == hour).count();
        assert!(n <= 4, "hour {hour}: {n} rescales: {:?}", run.rescales);
    }
    // Lag never runs away: bounded by what the peak load piles up over two decision cycles.
    assert!(
        run.peak_lag() < 5500.0 * 300.0,
        "peak lag {}",
        run.peak_lag()
    );
}

#[test]
fn a_spike_scales_up_drains_and_scales_back_down_after_the_delay() {
    // 1000 records/s with 10 minutes at 8000 from minute 20.
    let spike = 1200..1800;
    let run = simulate(4 * 3600, 2, |t| {
        if spike.contains(&t) {
            8000.0
        } else {
            1000.0
        }
    });
    report("spike", &run);
    let up = run.rescales.iter().find(|r| r.2 > r.1).expect("a scale-up");
    assert!(spike.contains(&up.0), "up during the spike: {up:?}");
    assert!(up.0 < spike.start + 2 * WINDOW + 1);
    let drained = (up.0..run.lag.len() as u32)
        .find(|t| run.lag[*t as usize] < 1.0)
        .expect("the lag drains");
    let down = run
        .rescales
        .iter()
        .find(|r| r.2 < r.1)
        .expect("a scale-down after the spike");
    assert!(
        down.0 >= drained && down.0 >= spike.end + 600,
        "down only after the delay: {down:?}, drained at {drained}"
    );
    assert!(
        run.rescales.len() <= 4,
        "up, maybe once more, then down: {:?}",
        run.rescales
    );
    let last = *run.parallelism.last().unwrap();
    assert!(last <= 2, "back to a small job: {last}");
    assert!(run.reversals().len() <= 1, "{:?}", run.rescales);
}
