//! The backtest on the shared YOOCHOOSE sample: train on train_tr, score on train_valid.

mod common;

use std::path::Path;

use riffle_runtime::commands::eval;
use riffle_runtime::config::{DataflowConfig, Duration};

fn data() -> (std::path::PathBuf, std::path::PathBuf) {
    let d = common::shared_dir().join("datasets/yoochoose-clicks-100k");
    (d.join("train_tr.tsv"), d.join("train_valid.tsv"))
}

/// The shipped example config beats the association-rules baseline of the dataset README
/// (HR@20 0.5812, MRR@20 0.3078).
#[test]
fn example_config_beats_the_association_rules_baseline() {
    let (train, test) = data();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/yoochoose-eval.yaml"),
    )
    .unwrap();
    #[derive(serde::Deserialize)]
    struct Job {
        dataflow: DataflowConfig,
    }
    let job: Job = serde_yaml::from_str(&text).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let r = eval::run(
        &train,
        &test,
        eval::eval_job(job.dataflow, 2, scratch.path()),
        20,
    )
    .unwrap();
    eprintln!("examples/yoochoose-eval.yaml: {r}");
    assert_eq!(r.train_events, 53_254);
    assert_eq!(r.test_events, 16_539);
    assert!(r.n > 10_000);
    assert!(
        r.hit_rate >= 0.5812 && r.mrr >= 0.3078,
        "{r} does not beat the baseline"
    );
}

/// Cross-check of the semantics with the dataset README's figure for windowSize 7d,
/// windowSlide 1h, other parameters at their defaults (about HR@20 0.649, MRR@20 0.342).
#[test]
fn cross_check_with_the_published_figure() {
    let (train, test) = data();
    let df = DataflowConfig {
        window_size: Duration::mins(7 * 24 * 60),
        window_slide: Duration::mins(60),
        ..DataflowConfig::default()
    };
    let scratch = tempfile::tempdir().unwrap();
    let r = eval::run(&train, &test, eval::eval_job(df, 1, scratch.path()), 20).unwrap();
    eprintln!("7d/1h defaults: {r}");
    assert!((r.hit_rate - 0.649).abs() < 0.005, "{r}");
    assert!((r.mrr - 0.342).abs() < 0.005, "{r}");
}
