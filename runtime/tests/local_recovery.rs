//! Local recovery: a local job restarted on the same state directory opens the snapshot it
//! kept after its last checkpoint instead of downloading it from the store, and its output
//! is that of an uninterrupted run.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{distinct_recommendations, lines, sorted_outputs};
use riffle_runtime::checkpoint::MANIFEST;
use riffle_runtime::config::{Duration, GeneratorConfig, JobConfig, SourceConfig};
use riffle_runtime::engine::{Engine, Restore};
use riffle_runtime::metrics::Metrics;
use riffle_runtime::sink::file::FileSink;
use riffle_runtime::sink::Stream;
use riffle_runtime::source::generator::Generator;
use riffle_store::{FaultyStore, FileStore, ObjectStore, Op};

const EVENTS: u64 = 120_000;

fn generator() -> GeneratorConfig {
    GeneratorConfig {
        users: 5_000,
        items: 1_000,
        events: EVENTS,
        partitions: 2,
        events_per_second: 200,
        ..GeneratorConfig::default()
    }
}

fn config(dir: &Path) -> JobConfig {
    JobConfig {
        parallelism: 1,
        key_groups: 16,
        // Checkpoints only where the test takes them, and the final one.
        checkpoint_interval: Duration::secs(3600),
        max_batch_size: 1000,
        ..JobConfig::local("local-recovery", dir, SourceConfig::Generator(generator()))
    }
}

fn engine(
    cfg: JobConfig,
    store: Box<dyn ObjectStore>,
    restore: Restore,
) -> riffle_runtime::Result<Engine> {
    let sink = FileSink::open(cfg.sink_dir().unwrap(), 1).unwrap();
    Engine::with_store(
        cfg,
        Box::new(Generator::new(generator())),
        Box::new(sink),
        store,
        restore,
        Arc::new(Metrics::default()),
    )
}

/// The job's store with every file download failing (manifests still read: the restore
/// needs to know what to restore, garbage collection what to keep).
fn no_downloads(dir: &Path) -> Box<dyn ObjectStore> {
    Box::new(FaultyStore::new(
        FileStore::new(dir.join("checkpoints")).unwrap(),
        |op, key| op == Op::Get && !key.ends_with(MANIFEST),
    ))
}

#[test]
fn a_restart_reuses_the_kept_snapshot_and_downloads_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    let dir = tmp.path().join("recovered");

    engine(
        config(&clean),
        Box::new(FileStore::new(clean.join("checkpoints")).unwrap()),
        Restore::None,
    )
    .unwrap()
    .run()
    .unwrap();

    // A run that checkpoints twice, goes on, and dies.
    let mut e = engine(
        config(&dir),
        Box::new(FileStore::new(dir.join("checkpoints")).unwrap()),
        Restore::None,
    )
    .unwrap();
    for round in 0..2 {
        for _ in 0..20 {
            assert!(e.step().unwrap());
        }
        let info = e.checkpoint(false).unwrap();
        assert_eq!(info.id, round + 1);
    }
    for _ in 0..15 {
        assert!(e.step().unwrap());
    }
    drop(e);

    // Without the kept snapshot the restart needs a download, which this store refuses:
    // so the restart below succeeding proves it downloaded nothing.
    let mut elsewhere = config(&dir);
    elsewhere.state_dir = tmp.path().join("other-state");
    assert!(
        engine(elsewhere, no_downloads(&dir), Restore::Latest).is_err(),
        "a restore without a local snapshot must download"
    );

    let mut e = engine(config(&dir), no_downloads(&dir), Restore::Latest).unwrap();
    assert_eq!(e.last_checkpoint_id(), 2);
    let s = e.metrics().snapshot();
    assert!(s.restore_reused_local);
    assert_eq!(s.restore_downloaded_bytes, 0);
    e.run().unwrap();
    // The restored table files count as uploaded: the next checkpoint is incremental.
    let first = &e.checkpoint_log[0];
    assert!(
        first.uploaded_bytes < first.size_bytes,
        "uploaded {} of {} bytes",
        first.uploaded_bytes,
        first.size_bytes
    );
    drop(e);

    let want = sorted_outputs(&clean.join("output"));
    let got = sorted_outputs(&dir.join("output"));
    assert!(!lines(&want, Stream::ItemStats).is_empty());
    for ((s, a), (_, b)) in want.iter().zip(&got) {
        assert_eq!(a.len(), b.len(), "{s:?}: record counts differ");
        assert!(a == b, "{s:?}: records differ");
    }
    assert_eq!(
        distinct_recommendations(lines(&got, Stream::Recommendations)) as u64,
        EVENTS
    );

    // The final checkpoint was kept too: a restart after the end still downloads nothing.
    let e = engine(config(&dir), no_downloads(&dir), Restore::Latest).unwrap();
    assert!(e.metrics().snapshot().restore_reused_local);
}
