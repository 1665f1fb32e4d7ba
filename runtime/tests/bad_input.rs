//! Bad input goes to the dead-letter output with a reason, is counted, and loses nothing else.

mod common;

use std::io::Write;
use std::sync::Arc;

use proptest::prelude::*;
use riffle_runtime::config::{Duration, FileFormat, FileSourceConfig, JobConfig, SourceConfig};
use riffle_runtime::engine::{Engine, Restore};
use riffle_runtime::event::{parse_json, DeadLetter, Validation, MAX_RECORD_BYTES};
use riffle_runtime::metrics::Metrics;
use riffle_runtime::sink::file::{read_committed, FileSink};
use riffle_runtime::sink::Stream;
use riffle_runtime::source::file::FileSource;

/// (record, expected reason fragment)
fn corpus() -> Vec<(Vec<u8>, &'static str)> {
    let far_future = 4_102_444_800_000i64; // 2100-01-01
    vec![
        (b"{\"eventId\":\"a\",".to_vec(), "malformed JSON"),
        (b"[1,2,3]".to_vec(), "malformed JSON"),
        (b"\xff\xfe garbage \x00".to_vec(), "malformed JSON"),
        (
            br#"{"userId":"u","itemId":"i","type":"view","ts":5}"#.to_vec(),
            "missing field eventId",
        ),
        (
            br#"{"eventId":"e","itemId":"i","type":"view","ts":5}"#.to_vec(),
            "missing field userId",
        ),
        (
            br#"{"eventId":"e","userId":"u","type":"view","ts":5}"#.to_vec(),
            "missing field itemId",
        ),
        (
            br#"{"eventId":"e","userId":"u","itemId":"i","ts":5}"#.to_vec(),
            "missing field type",
        ),
        (
            br#"{"eventId":"e","userId":"u","itemId":"i","type":"view"}"#.to_vec(),
            "missing field ts",
        ),
        (
            br#"{"eventId":"e","userId":"u","itemId":"i","type":"wishlist","ts":5}"#.to_vec(),
            "unknown event type",
        ),
        (
            br#"{"eventId":"e","userId":"u","itemId":"i","type":"view","ts":0}"#.to_vec(),
            "must be positive",
        ),
        (
            br#"{"eventId":"e","userId":"u","itemId":"i","type":"view","ts":-7}"#.to_vec(),
            "must be positive",
        ),
        (
            format!(
                r#"{{"eventId":"e","userId":"u","itemId":"i","type":"view","ts":{far_future}}}"#
            )
            .into_bytes(),
            "maxFutureSkew",
        ),
        (
            br#"{"eventId":"e","userId":"u","itemId":"i","type":"view","ts":1.5}"#.to_vec(),
            "integer",
        ),
        (
            br#"{"eventId":"e","userId":{"x":1},"itemId":"i","type":"view","ts":5}"#.to_vec(),
            "must be a string",
        ),
        (
            br#"{"eventId":"","userId":"u","itemId":"i","type":"view","ts":5}"#.to_vec(),
            "eventId must not be empty",
        ),
        (
            {
                let mut big =
                    br#"{"eventId":"e","userId":"u","itemId":"i","type":"view","ts":5,"pad":""#
                        .to_vec();
                big.extend(std::iter::repeat_n(b'x', MAX_RECORD_BYTES));
                big.extend_from_slice(b"\"}");
                big
            },
            "exceeds",
        ),
    ]
}

#[test]
fn every_kind_of_bad_record_is_dead_lettered_with_its_reason_and_nothing_else_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let mut f = std::fs::File::create(&input).unwrap();
    let bad = corpus();
    let mut valid = 0;
    for (i, (raw, _)) in bad.iter().enumerate() {
        writeln!(
            f,
            r#"{{"eventId":"ok{i}","userId":"u{i}","itemId":"i{}","type":"click","ts":{}}}"#,
            i % 3,
            1_000_000 + i * 1000
        )
        .unwrap();
        valid += 1;
        f.write_all(raw).unwrap();
        f.write_all(b"\n").unwrap();
    }
    drop(f);
    let source = SourceConfig::File(FileSourceConfig {
        paths: vec![input.clone()],
        format: FileFormat::Json,
    });
    let cfg = JobConfig {
        key_groups: 4,
        checkpoint_interval: Duration::secs(60),
        max_batch_size: 3,
        ..JobConfig::local("bad", dir.path(), source)
    };
    let src = FileSource::open(
        match &cfg.source {
            SourceConfig::File(f) => f,
            _ => unreachable!(),
        },
        cfg.dataflow.max_future_skew.0,
    )
    .unwrap();
    let metrics = Arc::new(Metrics::default());
    let sink = FileSink::open(cfg.sink_dir().unwrap(), 1).unwrap();
    Engine::new(
        cfg.clone(),
        Box::new(src),
        Box::new(sink),
        Restore::None,
        metrics.clone(),
    )
    .unwrap()
    .run()
    .unwrap();

    let dead: Vec<DeadLetter> = read_committed(cfg.sink_dir().unwrap(), Stream::DeadLetter)
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(dead.len(), bad.len());
    for (dl, (raw, reason)) in dead.iter().zip(&bad) {
        assert!(
            dl.reason.contains(reason),
            "{:?} should contain {reason:?}",
            dl.reason
        );
        assert_eq!(dl.raw_len, raw.len());
        assert!(dl.raw.len() <= 4096 + 3 * 4096, "raw is truncated");
        assert_eq!(dl.partition, 0);
    }
    assert_eq!(metrics.snapshot().dead_lettered, bad.len() as u64);
    assert_eq!(
        read_committed(cfg.sink_dir().unwrap(), Stream::Recommendations)
            .unwrap()
            .len(),
        valid
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Fuzz: arbitrary bytes never panic the decoder; every rejection has a reason.
    #[test]
    fn decoder_never_panics_on_arbitrary_bytes(raw in prop::collection::vec(any::<u8>(), 0..300)) {
        let v = Validation { max_ts: i64::MAX };
        if let Err(reason) = parse_json(&raw, &v) {
            prop_assert!(!reason.is_empty());
        }
    }

    /// Fuzz: mutations of a valid event either decode to a valid event or are rejected.
    #[test]
    fn mutated_events_decode_or_are_rejected(flips in prop::collection::vec((0usize..90, any::<u8>()), 1..4)) {
        let mut raw = br#"{"eventId":"e1","userId":"u1","itemId":"i1","type":"purchase","ts":1767225600000}"#.to_vec();
        for (pos, byte) in flips {
            let p = pos % raw.len();
            raw[p] = byte;
        }
        let v = Validation { max_ts: 2_000_000_000_000 };
        match parse_json(&raw, &v) {
            Ok(ev) => {
                prop_assert!(ev.ts > 0 && ev.ts <= v.max_ts);
                prop_assert!(!ev.event_id.is_empty() && !ev.user_id.is_empty() && !ev.item_id.is_empty());
            }
            Err(reason) => prop_assert!(!reason.is_empty()),
        }
    }
}
