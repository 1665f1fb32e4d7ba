//! State stays flat on a long replay with a fixed key set: expired panes and histories are
//! deleted from memory and from RocksDB.

use std::sync::Arc;

use riffle_runtime::config::{DataflowConfig, Duration, GeneratorConfig, JobConfig, SourceConfig};
use riffle_runtime::engine::{Engine, Restore};
use riffle_runtime::metrics::Metrics;
use riffle_runtime::sink::file::FileSink;
use riffle_runtime::source::generator::Generator;

#[test]
fn state_is_flat_on_a_long_replay_with_a_fixed_key_set() {
    let dir = tempfile::tempdir().unwrap();
    let gen = GeneratorConfig {
        users: 300,
        items: 200,
        events: 400_000,
        partitions: 2,
        events_per_second: 250, // 500 events per event-time second in total: 800 s of event time
        ..GeneratorConfig::default()
    };
    let mut cfg = JobConfig {
        parallelism: 2,
        key_groups: 16,
        checkpoint_interval: Duration::secs(3600),
        retained_checkpoints: 2,
        max_batch_size: 1000,
        dataflow: DataflowConfig {
            window_size: Duration::secs(20),
            window_slide: Duration::secs(5),
            session_gap: Duration::secs(10),
            ..DataflowConfig::default()
        },
        ..JobConfig::local("flat", dir.path(), SourceConfig::Generator(gen.clone()))
    };
    cfg.sink.item_stats = false;
    let sink = FileSink::open(cfg.sink_dir().unwrap(), 1).unwrap();
    let metrics = Arc::new(Metrics::default());
    let mut e = Engine::new(
        cfg,
        Box::new(Generator::new(gen)),
        Box::new(sink),
        Restore::None,
        metrics.clone(),
    )
    .unwrap();
    let mut samples = Vec::new();
    'outer: loop {
        for _ in 0..20 {
            if !e.step().unwrap() {
                break 'outer;
            }
        }
        e.checkpoint(false).unwrap();
        let s = metrics.snapshot();
        samples.push((
            e.state().count_keys().unwrap(),
            s.users,
            s.pane_entries,
            s.checkpoint_size_bytes,
        ));
    }
    assert!(samples.len() >= 15, "{} samples", samples.len());
    eprintln!("(rocksdb keys, users, pane entries, checkpoint bytes) per checkpoint: {samples:?}");
    let third = samples.len() / 3;
    let early_max = |f: fn(&(u64, u64, u64, u64)) -> u64| {
        samples[third..2 * third].iter().map(f).max().unwrap()
    };
    let late_max =
        |f: fn(&(u64, u64, u64, u64)) -> u64| samples[2 * third..].iter().map(f).max().unwrap();
    // After warm-up, the last third must not exceed the middle third by more than noise.
    for (name, f) in [
        (
            "rocksdb keys",
            (|s: &(u64, u64, u64, u64)| s.0) as fn(&(u64, u64, u64, u64)) -> u64,
        ),
        ("users", |s| s.1),
        ("pane entries", |s| s.2),
    ] {
        let (a, b) = (early_max(f), late_max(f));
        assert!(b as f64 <= a as f64 * 1.15, "{name} grew from {a} to {b}");
    }
    // And the key count is bounded by the live key set, not by the number of events.
    let keys = samples.last().unwrap().0;
    assert!(
        keys < 300 + 200 * 6 * 2,
        "{keys} keys for 300 users and 200 items"
    );
}

/// Checkpoints are incremental and the store holds exactly what retained checkpoints use.
#[test]
fn checkpoints_are_incremental_and_garbage_is_collected() {
    let dir = tempfile::tempdir().unwrap();
    let gen = GeneratorConfig {
        users: 20_000,
        items: 2_000,
        events: 200_000,
        partitions: 2,
        events_per_second: 100,
        ..GeneratorConfig::default()
    };
    let mut cfg = JobConfig {
        parallelism: 2,
        key_groups: 16,
        checkpoint_interval: Duration::secs(3600),
        max_batch_size: 1000,
        ..JobConfig::local("gc", dir.path(), SourceConfig::Generator(gen.clone()))
    };
    cfg.sink.item_stats = false;
    let sink = FileSink::open(cfg.sink_dir().unwrap(), 1).unwrap();
    let mut e = Engine::new(
        cfg,
        Box::new(Generator::new(gen)),
        Box::new(sink),
        Restore::None,
        Arc::new(Metrics::default()),
    )
    .unwrap();
    let mut infos = Vec::new();
    'outer: loop {
        for _ in 0..10 {
            if !e.step().unwrap() {
                break 'outer;
            }
        }
        infos.push(e.checkpoint(false).unwrap());
    }
    assert!(infos.len() >= 10);
    // Incremental: on average a checkpoint uploads much less than the state it references.
    let uploaded: u64 = infos[1..].iter().map(|i| i.uploaded_bytes).sum();
    let referenced: u64 = infos[1..].iter().map(|i| i.size_bytes).sum();
    eprintln!(
        "uploaded {uploaded} of {referenced} referenced bytes over {} checkpoints",
        infos.len() - 1
    );
    assert!(
        uploaded * 2 < referenced,
        "uploaded {uploaded} of {referenced}"
    );

    let store = dir.path().join("checkpoints");
    let mut chk_dirs: Vec<String> = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("chk-"))
        .collect();
    chk_dirs.sort();
    assert_eq!(chk_dirs.len(), 3, "{chk_dirs:?}");
    let mut referenced = std::collections::BTreeSet::new();
    for d in &chk_dirs {
        let m: riffle_runtime::checkpoint::Manifest =
            serde_json::from_slice(&std::fs::read(store.join(d).join("_manifest.json")).unwrap())
                .unwrap();
        referenced.extend(
            m.files
                .into_iter()
                .filter(|f| f.key.starts_with("shared/"))
                .map(|f| f.key),
        );
    }
    let present: std::collections::BTreeSet<String> = std::fs::read_dir(store.join("shared"))
        .unwrap()
        .map(|e| format!("shared/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    assert_eq!(
        present, referenced,
        "shared files = files referenced by retained checkpoints"
    );
}
