//! The distributed runtime on the test bed's real Kafka and MinIO (no mocks): worker processes
//! SIGKILLed at random points, right after commits and in the middle of snapshot uploads; a
//! MinIO outage and a broker restart; a rescale 3 → 5 → 2 through savepoints; poison records;
//! an idle partition. A `read_committed` verifier checks exactly one recommendation per event,
//! every poison record exactly once in the dead-letter topic, no transaction left open, and
//! ItemStats equal to the independent reference (`tests/reference`).
//!
//! `make test` runs the chaos scenario at a smaller size; `make chaos` runs the full one
//! (1 M events, 24 kills: `RIFFLE_CHAOS_FULL=1`).

mod common;
mod reference;
#[path = "common/scenario.rs"]
mod scenario;

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::cluster::{serial, unique, verify_exactly_once, Bed, Job, JobSpec};
use riffle_runtime::event::{Event, EventType};
use riffle_runtime::keygroup::key_group;
use riffle_runtime::source::generator::splitmix;
use scenario::{
    assert_item_stats_match_reference, input, produce_in_background, Input, DATAFLOW, DATAFLOW_IDLE,
};

/// Wait until the recommendations of every valid event are committed, restarting workers that
/// exit, then wait for the final watermark.
fn finish(job: &mut Job, input: &Input, timeout: Duration) {
    job.wait_watermark(input.final_wm, timeout);
}

fn spec(key_groups: u32, input_partitions: i32) -> JobSpec {
    JobSpec {
        key_groups,
        input_partitions,
        checkpoint_interval: "1s",
        commit_interval: "100ms",
        dataflow: DATAFLOW,
    }
}

#[test]
fn chaos_sigkill_loses_and_duplicates_nothing() {
    let _one_at_a_time = serial();
    let bed = Bed::from_env();
    let full = std::env::var_os("RIFFLE_CHAOS_FULL").is_some();
    let (events, kills, rate) = if full {
        (1_000_000, 24, 8_000)
    } else {
        (120_000, 8, 4_000)
    };
    let tmp = common::cluster::workdir();
    // 8 input partitions, 16 key groups: users are forwarded between workers too.
    let mut job = Job::new(&bed, tmp.path(), "chaos", &spec(16, 8));
    let input = input(8, events, 100);
    job.start(1, 3, None);
    let (producer, sent) = produce_in_background(&bed, &job.input, input.records.clone(), rate);
    let total = input.records.len() as u64;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("chaos: {events} events, {kills} kills, seed {seed}");
    let (mut after_commit, mut mid_upload, mut random) = (0, 0, 0);
    for k in 0..kills {
        // Spread the kills over the stream.
        let target = total * (k + 1) / (kills + 2);
        while sent.load(Relaxed) < target {
            std::thread::sleep(Duration::from_millis(20));
        }
        let r = splitmix(seed ^ k);
        let i = (r % 3) as usize;
        let ready = common::wait_until(Duration::from_secs(120), || {
            job.restart_exited();
            job.metric(i, "commitsCompleted").is_some()
        });
        assert!(ready, "worker {i} not up\n{}", job.logs());
        // Every kind of kill point in turn; the worker and the exact moment are random.
        match k % 3 {
            0 => {
                // Right after a commit: as soon as the commit count moves.
                let c0 = job.metric(i, "commitsCompleted").unwrap();
                let moved = common::wait_until(Duration::from_secs(30), || {
                    job.metric(i, "commitsCompleted").is_some_and(|c| c > c0)
                });
                assert!(moved, "no commit\n{}", job.logs());
                after_commit += 1;
            }
            1 => {
                // In the middle of a snapshot upload.
                let uploading = common::wait_until(Duration::from_secs(30), || {
                    job.status(i)
                        .is_some_and(|s| s["uploadInProgress"].as_bool() == Some(true))
                });
                if uploading {
                    mid_upload += 1;
                } else {
                    random += 1;
                }
            }
            _ => {
                // Anywhere: a random point in the next half second.
                std::thread::sleep(Duration::from_millis((r >> 16) % 500));
                random += 1;
            }
        }
        job.kill_and_restart(i);
    }
    producer.join().unwrap();
    eprintln!(
        "chaos: killed {kills} times ({after_commit} right after a commit, {mid_upload} mid-upload, {random} at random points)"
    );
    assert!(
        after_commit >= 1 && mid_upload >= 1,
        "kill points not covered"
    );
    finish(&mut job, &input, Duration::from_secs(600));
    // Local recovery: a worker restarted on its state directory whose committed state names
    // the part it kept opens that copy instead of downloading it. Each worker is killed
    // seconds after its previous start, with a part uploaded and committed every second,
    // so most restarts reuse.
    let restores: Vec<String> = job
        .workers
        .iter()
        .flat_map(|w| {
            let text = strip_ansi(&std::fs::read_to_string(&w.log).unwrap_or_default());
            text.lines()
                .filter(|l| l.contains("state restored from one part"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    let reused = restores
        .iter()
        .filter(|l| l.contains("reused_local=true") && l.contains("downloaded_bytes=0"))
        .count();
    eprintln!(
        "chaos: {} restores from one part, {reused} from the kept local copy",
        restores.len()
    );
    assert!(
        reused >= 1,
        "no restart reused its kept part:\n{}",
        restores.join("\n")
    );
    let forwarded: i64 = (0..3).filter_map(|i| job.metric(i, "forwarded")).sum();
    assert!(
        forwarded > 0,
        "8 input partitions over 16 key groups: events reach their user's owner through the exchange"
    );
    let stats = verify_exactly_once(&job.topics(), &input.valid, &input.poison);
    assert_item_stats_match_reference(&stats, &input, 8);
}

#[test]
fn minio_outage_and_broker_restart_stall_then_finish_exactly_once() {
    let _one_at_a_time = serial();
    let bed = Bed::from_env();
    let tmp = common::cluster::workdir();
    let mut job = Job::new(&bed, tmp.path(), "outage", &spec(16, 8));
    let input = input(8, 80_000, 100);
    job.start(1, 3, None);
    let total = input.records.len() as u64;
    let (producer, sent) = produce_in_background(&bed, &job.input, input.records.clone(), 1_000);
    while sent.load(Relaxed) < total / 4 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let checkpoints = |job: &Job| -> i64 {
        (0..3)
            .filter_map(|i| job.metric(i, "checkpointsCompleted"))
            .sum()
    };
    bed.testbed("s3-stop");
    let c0 = checkpoints(&job);
    let commits0: i64 = (0..3)
        .filter_map(|i| job.metric(i, "commitsCompleted"))
        .sum();
    // The outage lasts 30 s of wall time: that is the scenario, not a synchronisation.
    std::thread::sleep(Duration::from_secs(30));
    let commits1: i64 = (0..3)
        .filter_map(|i| job.metric(i, "commitsCompleted"))
        .sum();
    let c1 = checkpoints(&job);
    assert!(
        commits1 > commits0,
        "commits go on while S3 is down (snapshots are off the commit path)"
    );
    // An upload may have finished just as S3 went down, at most one per worker.
    assert!(
        c1 <= c0 + 3,
        "no snapshot completes while S3 is down: {c0} → {c1}"
    );
    bed.testbed("s3-start");
    let resumed = common::wait_until(Duration::from_secs(120), || checkpoints(&job) > c1);
    assert!(resumed, "snapshots resume after the outage\n{}", job.logs());
    while sent.load(Relaxed) < total * 2 / 3 {
        std::thread::sleep(Duration::from_millis(20));
    }
    bed.testbed("kafka-stop");
    bed.testbed("kafka-start");
    producer.join().unwrap();
    finish(&mut job, &input, Duration::from_secs(600));
    eprintln!(
        "outage: {} worker exits during the broker restart (restarted like a pod)",
        job.restarts
    );
    let stats = verify_exactly_once(&job.topics(), &input.valid, &input.poison);
    assert_item_stats_match_reference(&stats, &input, 8);
}

#[test]
fn rescale_3_to_5_to_2_through_savepoints() {
    let _one_at_a_time = serial();
    let bed = Bed::from_env();
    let tmp = common::cluster::workdir();
    // Input keyed like the key groups: the user stage runs where each record is read.
    let mut job = Job::new(&bed, tmp.path(), "rescale", &spec(16, 16));
    let input = input(16, 90_000, 100);
    let total = input.records.len() as u64;
    job.start(1, 3, None);
    let (producer, sent) = produce_in_background(&bed, &job.input, input.records.clone(), 3_000);
    let mut locations = Vec::new();
    for (gen, next_workers, at) in [(2u32, 5u32, total / 3), (3, 2, total * 2 / 3)] {
        while sent.load(Relaxed) < at {
            std::thread::sleep(Duration::from_millis(20));
        }
        let id = unique("sp");
        // Any one worker takes the job-wide savepoint; stop: the job stays stopped after it.
        let sp = job.savepoint((gen as usize) % job.workers.len(), &id, true);
        let location = sp["location"].as_str().unwrap().to_string();
        eprintln!("savepoint {id} at {location}: {sp}");
        assert!(sp["stop"].as_bool().unwrap());
        job.kill_all();
        job.start(gen, next_workers, Some(&location));
        locations.push(location);
    }
    producer.join().unwrap();
    finish(&mut job, &input, Duration::from_secs(600));
    for i in 0..job.workers.len() {
        assert_eq!(
            job.metric(i, "forwarded"),
            Some(0),
            "input keyed like the key groups: no forwarding hop"
        );
    }
    let stats = verify_exactly_once(&job.topics(), &input.valid, &input.poison);
    assert_item_stats_match_reference(&stats, &input, 16);
}

#[test]
fn an_idle_partition_does_not_hold_windows_back() {
    let _one_at_a_time = serial();
    let bed = Bed::from_env();
    let tmp = common::cluster::workdir();
    let mut job = Job::new(
        &bed,
        tmp.path(),
        "idle",
        &JobSpec {
            dataflow: DATAFLOW_IDLE,
            ..spec(4, 2)
        },
    );
    // A live stream on partition 0 only (20 events every 0.1 s, 100 ms of event time
    // apart): partition 1 stays silent while partition 0 is busy.
    let t0 = 1_767_225_600_000i64;
    let records: Vec<(i32, Vec<u8>, Vec<u8>)> = (0..3_000)
        .map(|k| {
            let user = (0..)
                .map(|j| format!("u{k}-{j}"))
                .find(|u| key_group(u.as_bytes(), 2) == 0)
                .unwrap();
            let e = Event {
                event_id: format!("e{k}").into(),
                user_id: user.clone().into(),
                item_id: format!("i{}", k % 17).into(),
                kind: EventType::View,
                ts: t0 + k * 100,
            };
            (0, user.into_bytes(), serde_json::to_vec(&e).unwrap())
        })
        .collect();
    job.start(1, 1, None);
    let producer = {
        let (bed, topic) = (bed.clone(), job.input.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            bed.produce_paced(&topic, &records, 20, |done| {
                let due = Duration::from_secs_f64(done as f64 / 200.0);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            });
        })
    };
    // 300 s of event time in 60 s / 10 s windows: the first window closes while partition 0
    // is still active and partition 1 has been idle for a while.
    let first_end = t0 + 60_000;
    let idle = |status: &serde_json::Value, p: i64| -> Option<bool> {
        status["partitions"]
            .as_array()?
            .iter()
            .find(|x| x["topic"] == job.input.as_str() && x["partition"] == p)?["idle"]
            .as_bool()
    };
    let mut last = None;
    let seen = common::wait_until(Duration::from_secs(120), || {
        let Some(st) = job.status(0) else {
            return false;
        };
        let ok = idle(&st, 0) == Some(false)
            && idle(&st, 1) == Some(true)
            && st["watermark"].as_i64().is_some_and(|w| w >= first_end);
        last = Some(st);
        ok
    });
    assert!(
        seen,
        "no window closed while partition 0 was active and partition 1 idle; last status: \
         {last:?}\n{}",
        job.logs()
    );
    producer.join().unwrap();
    let stats = bed.read_committed(&job.stats);
    assert!(
        !stats.is_empty(),
        "windows are emitted although partition 1 never had data"
    );

    // SIGTERM (what Kubernetes sends before deleting a pod): the worker commits what it has
    // and exits cleanly, leaving no transaction open.
    let pid = job.workers[0].child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let mut status = None;
    let exited = common::wait_until(Duration::from_secs(60), || {
        status = job.workers[0].child.try_wait().unwrap();
        status.is_some()
    });
    assert!(exited, "no exit after SIGTERM\n{}", job.logs());
    assert!(status.unwrap().success(), "exit after SIGTERM: {status:?}");
    for t in [&job.recs, &job.stats, &job.dlq] {
        assert!(
            bed.open_transactions(t).is_empty(),
            "open transaction on {t}"
        );
    }
}

/// A log line without its terminal colour codes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
