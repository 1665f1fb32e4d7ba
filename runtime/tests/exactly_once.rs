//! Exactly-once under SIGKILL: a 1M-event replay killed at ≥ 20 random points, restarted
//! each time with `--restore latest`, must produce exactly the output of a crash-free run:
//! one recommendation per eventId, identical item stats, late and dead-letter records.

mod common;

use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    distinct_recommendations, latest_manifest, lines, sorted_outputs, spawn_run, wait_until,
    write_yaml,
};
use riffle_runtime::config::GeneratorConfig;
use riffle_runtime::sink::Stream;
use riffle_runtime::source::generator::{splitmix, Generator};

const EVENTS: u64 = 1_000_000;
const KILLS: u64 = 24;

/// Two JSON-lines partitions from the generator, with a malformed line every 997 lines.
fn write_inputs(dir: &Path) -> (u64, u64) {
    let gen = Generator::new(GeneratorConfig {
        users: 200_000,
        items: 20_000,
        events: EVENTS,
        partitions: 2,
        events_per_second: 500,
        max_disorder: riffle_runtime::config::Duration::secs(3),
        ..GeneratorConfig::default()
    });
    let bad = [
        "{\"eventId\":\"x\"",
        "not json at all",
        "{\"eventId\":\"b\",\"userId\":\"u\",\"itemId\":\"i\",\"type\":\"like\",\"ts\":5}",
        "{\"eventId\":\"b\",\"userId\":\"u\",\"itemId\":\"i\",\"type\":\"view\",\"ts\":-3}",
    ];
    let (mut valid, mut invalid) = (0, 0);
    for p in 0..2u32 {
        let f = std::fs::File::create(dir.join(format!("events-{p}.jsonl"))).unwrap();
        let mut w = BufWriter::new(f);
        for k in 0..EVENTS / 2 {
            if k.is_multiple_of(997) {
                writeln!(w, "{}", bad[(k / 997) as usize % bad.len()]).unwrap();
                invalid += 1;
            }
            serde_json::to_writer(&mut w, &gen.event(p, k)).unwrap();
            w.write_all(b"\n").unwrap();
            valid += 1;
        }
    }
    (valid, invalid)
}

fn config(dir: &Path, name: &str, interval: &str) -> std::path::PathBuf {
    let d = dir.join(name);
    write_yaml(
        &dir.join(format!("{name}.yaml")),
        &format!(
            r#"name: {name}
parallelism: 2
keyGroups: 64
source:
  file:
    paths: ["{0}/events-0.jsonl", "{0}/events-1.jsonl"]
    format: json
sink: {{ dir: "{1}/out" }}
stateDir: "{1}/state"
checkpointStore: "file://{1}/ckpt"
checkpointInterval: {interval}
retainedCheckpoints: 3
maxBatchSize: 2048
"#,
            dir.display(),
            d.display()
        ),
    )
}

#[test]
fn sigkill_at_random_points_loses_and_duplicates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (valid, invalid) = write_inputs(dir);

    // Crash-free run.
    let clean = config(dir, "clean", "5s");
    let (mut child, _) = spawn_run(&clean, None, false);
    assert!(child.wait().unwrap().success(), "crash-free run failed");

    // Chaos run: kill -9 at spread-out random points.
    let chaos = config(dir, "chaos", "200ms");
    let store = dir.join("chaos/ckpt");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("chaos seed {seed}");
    let mut kills = 0u64;
    let mut restarts = 0u64;
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "chaos run did not finish"
        );
        let (mut child, _) = spawn_run(&chaos, Some("latest"), false);
        restarts += 1;
        if kills >= KILLS {
            assert!(child.wait().unwrap().success(), "final run failed");
            break;
        }
        let r = splitmix(seed ^ restarts);
        if r.is_multiple_of(5) {
            // Kill during start-up/restore, before any new checkpoint.
            std::thread::sleep(Duration::from_millis(r % 50));
        } else {
            // Kill somewhere after progress reached this kill's share of the replay.
            let target = valid * (kills + 1) / (KILLS + 2);
            let progressed = wait_until(Duration::from_secs(120), || {
                latest_manifest(&store).is_some_and(|m| m.events_in >= target)
                    || child.try_wait().unwrap().is_some()
            });
            assert!(progressed, "no progress towards {target} events");
            std::thread::sleep(Duration::from_millis((r >> 8) % 150));
        }
        if child.try_wait().unwrap().is_some() {
            break; // finished before the kill landed
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    eprintln!("killed {kills} times over {restarts} starts");
    assert!(kills >= 20, "only {kills} kills landed");

    let clean_out = sorted_outputs(&dir.join("clean/out"));
    let chaos_out = sorted_outputs(&dir.join("chaos/out"));
    for ((s, a), (_, b)) in clean_out.iter().zip(&chaos_out) {
        assert_eq!(a.len(), b.len(), "{s:?}: record counts differ");
        assert!(a == b, "{s:?}: records differ");
    }
    assert_eq!(
        distinct_recommendations(lines(&chaos_out, Stream::Recommendations)) as u64,
        valid,
        "one recommendation per valid event"
    );
    assert_eq!(lines(&chaos_out, Stream::DeadLetter).len() as u64, invalid);
    assert!(!lines(&chaos_out, Stream::ItemStats).is_empty());
}
