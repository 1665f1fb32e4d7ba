//! The HTTP API of a running job, and a savepoint taken through it restored at a different
//! parallelism: item stats identical to a crash-free run, one recommendation per event.

mod common;

use std::path::Path;

use common::{distinct_recommendations, http, lines, sorted_outputs, spawn_run, write_yaml};
use riffle_runtime::sink::Stream;

fn config(dir: &Path, name: &str, parallelism: usize) -> std::path::PathBuf {
    let d = dir.join(name);
    write_yaml(
        &dir.join(format!("{name}-p{parallelism}.yaml")),
        &format!(
            r#"name: {name}
parallelism: {parallelism}
keyGroups: 32
source:
  generator: {{ users: 100000, items: 10000, events: 600000, partitions: 2, eventsPerSecond: 500 }}
sink: {{ dir: "{0}/out" }}
stateDir: "{0}/state"
checkpointStore: "file://{0}/ckpt"
checkpointInterval: 1h
http: {{ listen: "127.0.0.1:0" }}
"#,
            d.display()
        ),
    )
}

#[test]
fn savepoint_over_http_then_restore_at_another_parallelism() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    let (mut child, addr) = spawn_run(&config(dir, "sp", 2), None, true);
    let addr = addr.expect("HTTP address");
    let (code, body) = http(&addr, "GET", "/healthz");
    assert_eq!((code, body.trim()), (200, "ok"));
    // 503 while the engine opens its state, then 200.
    assert!(
        common::wait_until(std::time::Duration::from_secs(60), || http(
            &addr, "GET", "/readyz"
        )
        .0 == 200),
        "never became ready"
    );
    let (code, metrics) = http(&addr, "GET", "/metrics");
    assert_eq!(code, 200);
    for name in [
        "riffle_events_in_total",
        "riffle_dead_lettered_total",
        "riffle_late_events_total",
        "riffle_watermark_lag_ms",
        "riffle_checkpoint_duration_ms",
        "riffle_checkpoint_size_bytes",
        "riffle_checkpoint_last_id",
        "riffle_processing_rate_events_per_second",
        "riffle_busy_ratio",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {name} ")),
            "{name} missing from /metrics"
        );
    }
    let (code, status) = http(&addr, "GET", "/status");
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["job"], "sp");
    assert!(status["metrics"]["eventsIn"].is_u64());
    assert_eq!(http(&addr, "GET", "/nope").0, 404);

    let (code, body) = http(&addr, "POST", "/savepoint");
    assert_eq!(code, 200, "{body}");
    let sp: serde_json::Value = serde_json::from_str(&body).unwrap();
    let location = sp["location"]
        .as_str()
        .unwrap()
        .strip_prefix("file://")
        .unwrap()
        .to_string();
    assert!(location.contains("savepoints/sp-"), "{location}");
    child.kill().unwrap();
    child.wait().unwrap();
    // The savepoint is self-contained: move it away and drop the checkpoint store entirely.
    let restore_from = dir.join("sp-copy");
    std::fs::rename(&location, &restore_from).unwrap();
    std::fs::remove_dir_all(dir.join("sp/ckpt")).unwrap();

    let (mut child, _) = spawn_run(
        &config(dir, "sp", 3),
        Some(restore_from.to_str().unwrap()),
        true,
    );
    assert!(child.wait().unwrap().success());

    let (mut clean, _) = spawn_run(&config(dir, "clean", 1), None, true);
    assert!(clean.wait().unwrap().success());

    let got = sorted_outputs(&dir.join("sp/out"));
    let want = sorted_outputs(&dir.join("clean/out"));
    let stats = |o: &[(Stream, Vec<String>)]| lines(o, Stream::ItemStats).to_vec();
    assert!(!stats(&want).is_empty());
    assert!(
        stats(&got) == stats(&want),
        "item stats differ after restore at parallelism 3"
    );
    assert_eq!(
        distinct_recommendations(lines(&got, Stream::Recommendations)),
        600_000
    );
}
