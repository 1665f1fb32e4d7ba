//! The input of the distributed scenarios (generated clicks, poison records, sentinels) and
//! the check of their ItemStats against the independent reference. Included by the test
//! binaries that need it (`#[path]`), next to `mod reference` and `mod common`.
#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::cluster::{Bed, Record};
use crate::reference::from_config::{ref_event, ref_params};
use crate::reference::{self, RefEvent, RefItemStats};
use riffle_runtime::config::{DataflowConfig, Duration as Dur, GeneratorConfig};
use riffle_runtime::event::{Event, EventType};
use riffle_runtime::keygroup::key_group;
use riffle_runtime::source::generator::Generator;

/// The dataflow of these tests: short windows so a few minutes of event time emit many.
/// The idle timeout is longer than any stall the scenarios inject (a broker restart, a
/// producer reconnecting): an idle partition lets the watermark pass data it delivers later,
/// which the semantics allow and the reference (which has no idleness) does not model.
pub const DATAFLOW: &str =
    "{windowSize: 60s, windowSlide: 10s, historyLength: 10, idleTimeout: 60s, maxOutOfOrderness: 5s}";
/// The idle-partition scenario's: partition 1 must go idle quickly.
pub const DATAFLOW_IDLE: &str =
    "{windowSize: 60s, windowSlide: 10s, historyLength: 10, idleTimeout: 2s, maxOutOfOrderness: 5s}";

pub fn dataflow() -> DataflowConfig {
    DataflowConfig {
        window_size: Dur::secs(60),
        window_slide: Dur::secs(10),
        history_length: 10,
        idle_timeout: Dur::secs(60),
        max_out_of_orderness: Dur::secs(5),
        ..DataflowConfig::default()
    }
}

/// The input of a scenario, in send order.
pub struct Input {
    /// (partition, key, value) per record.
    pub records: Vec<(i32, Vec<u8>, Vec<u8>)>,
    /// Valid events, in send order (the reference's read order).
    pub events: Vec<RefEvent>,
    pub valid: HashSet<String>,
    /// Every malformed record (each distinct).
    pub poison: HashSet<String>,
    /// The watermark every worker reaches once the input is read: the sentinels' time − D.
    pub final_wm: i64,
}

/// The `n`th malformed record: several kinds of bad input, each payload distinct.
pub fn poison(n: u64) -> String {
    match n % 4 {
        0 => format!("not json at all #{n}"),
        1 => format!(r#"{{"eventId":"p{n}","userId":"u"}}"#),
        2 => format!(r#"{{"eventId":"p{n}","userId":"u","itemId":"i","type":"like","ts":5}}"#),
        _ => format!(r#"{{"eventId":"p{n}","userId":"u","itemId":"i","type":"view","ts":-3}}"#),
    }
}

/// `events` generated clicks keyed by user over `partitions` (Kafka's default partitioner),
/// a poison record after every `poison_every` records, then one sentinel event per partition
/// an hour after the last event, so every window of the real events is emitted.
pub fn input(partitions: i32, events: u64, poison_every: u64) -> Input {
    let gen_parts = 4u32;
    let gen = Generator::new(GeneratorConfig {
        users: 30_000,
        items: 3_000,
        events,
        partitions: gen_parts,
        events_per_second: 200,
        max_disorder: Dur::secs(2),
        ..GeneratorConfig::default()
    });
    let mut out = Input {
        records: Vec::new(),
        events: Vec::new(),
        valid: HashSet::new(),
        poison: HashSet::new(),
        final_wm: 0,
    };
    let push_event = |out: &mut Input, e: &Event| {
        let p = key_group(e.user_id.as_bytes(), partitions as u32) as i32;
        out.records.push((
            p,
            e.user_id.as_bytes().to_vec(),
            serde_json::to_vec(e).unwrap(),
        ));
        out.valid.insert(e.event_id.to_string());
        out.events.push(ref_event(e, p as u32));
    };
    let mut max_ts = 0;
    let mut n = 0u64;
    for k in 0..events / u64::from(gen_parts) {
        for gp in 0..gen_parts {
            let e = gen.event(gp, k);
            max_ts = max_ts.max(e.ts);
            push_event(&mut out, &e);
            n += 1;
            if n.is_multiple_of(poison_every) {
                let p = (n / poison_every) as i32 % partitions;
                let bad = poison(n / poison_every);
                out.records
                    .push((p, b"poison".to_vec(), bad.clone().into_bytes()));
                out.poison.insert(bad);
            }
        }
    }
    let sentinel_ts = max_ts + 3_600_000;
    for p in 0..partitions {
        let user = (0..)
            .map(|j| format!("sentinel-{j}"))
            .find(|u| key_group(u.as_bytes(), partitions as u32) as i32 == p)
            .unwrap();
        let e = Event {
            event_id: format!("sentinel-{p}").into(),
            user_id: user.into(),
            item_id: "sentinel-item".into(),
            kind: EventType::View,
            ts: sentinel_ts,
        };
        push_event(&mut out, &e);
    }
    out.final_wm = sentinel_ts - dataflow().max_out_of_orderness.0;
    out
}

/// The job's ItemStats equal the reference's for every window emitted by the final watermark.
pub fn assert_item_stats_match_reference(stats: &[Record], input: &Input, partitions: i32) {
    assert_item_stats_match(
        stats,
        &input.events,
        partitions,
        &dataflow(),
        input.final_wm,
        false,
    );
}

/// The job's ItemStats equal the reference's over `events` for every window emitted by
/// `final_wm`. With `cut`, windows the job emitted beyond `final_wm` are left out too (a job
/// stopped mid-stream, whose workers' watermarks differ).
pub fn assert_item_stats_match(
    stats: &[Record],
    events: &[reference::RefEvent],
    partitions: i32,
    df: &DataflowConfig,
    final_wm: i64,
    cut: bool,
) {
    let closed = |end: i64| end + df.allowed_lateness.0 <= final_wm;
    let expected: Vec<RefItemStats> =
        reference::fast::item_stats(&ref_params(df), partitions as u32, events)
            .into_iter()
            .filter(|s| closed(s.window_end))
            .collect();
    let mut got: Vec<RefItemStats> = stats
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
            RefItemStats {
                item_id: v["itemId"].as_str().unwrap().into(),
                window_start: v["windowStart"].as_i64().unwrap(),
                window_end: v["windowEnd"].as_i64().unwrap(),
                popularity: v["popularity"].as_u64().unwrap(),
                neighbors: v["neighbors"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|n| {
                        (
                            n["itemId"].as_str().unwrap().to_string(),
                            n["weight"].as_u64().unwrap(),
                        )
                    })
                    .collect(),
            }
        })
        .filter(|s: &RefItemStats| !cut || closed(s.window_end))
        .collect();
    let key = |s: &RefItemStats| (s.window_end, s.item_id.clone());
    let mut expected = expected;
    expected.sort_by_key(key);
    got.sort_by_key(key);
    assert!(!expected.is_empty());
    if got != expected {
        // Which (window, item) records differ, and how much popularity each is off by.
        let index = |v: &[RefItemStats]| -> std::collections::BTreeMap<(i64, String), u64> {
            v.iter()
                .map(|s| ((s.window_end, s.item_id.clone()), s.popularity))
                .collect()
        };
        let (g, e) = (index(&got), index(&expected));
        let mut diffs: Vec<String> = e
            .iter()
            .filter(|(k, p)| g.get(*k) != Some(*p))
            .map(|((end, item), p)| {
                format!("{end}/{item}: {:?} vs {p}", g.get(&(*end, item.clone())))
            })
            .collect();
        diffs.extend(
            g.keys()
                .filter(|k| !e.contains_key(*k))
                .map(|(end, item)| format!("{end}/{item}: unexpected")),
        );
        let neighbours = got.iter().zip(&expected).filter(|(a, b)| a != b).count();
        panic!(
            "ItemStats differ from the reference: {} records vs {} expected, {neighbours} \
             differing at the same position; popularity differences ({}): {}",
            got.len(),
            expected.len(),
            diffs.len(),
            diffs
                .iter()
                .take(40)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    eprintln!("ItemStats: {} records equal the reference", got.len());
}

/// Produce the input in the background at about `rate` records/s.
pub fn produce_in_background(
    bed: &Bed,
    topic: &str,
    records: Vec<(i32, Vec<u8>, Vec<u8>)>,
    rate: u64,
) -> (std::thread::JoinHandle<()>, Arc<AtomicU64>) {
    let sent = Arc::new(AtomicU64::new(0));
    let (bed, topic, s) = (bed.clone(), topic.to_string(), sent.clone());
    let h = std::thread::spawn(move || {
        let start = Instant::now();
        bed.produce_paced(&topic, &records, 1000, |done| {
            s.store(done as u64, Relaxed);
            // Pace the stream: a live input, not one backlog.
            let due = Duration::from_secs_f64(done as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        });
    });
    (h, sent)
}
