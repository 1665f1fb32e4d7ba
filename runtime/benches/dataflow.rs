//! Micro-benchmarks of the hot paths: event decoding, key-group hashing, and one batch of
//! the whole dataflow (user stage → exchange → item stage) without I/O.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use riffle_runtime::config::{DataflowConfig, GeneratorConfig};
use riffle_runtime::dataflow::exchange::{merge_inboxes, ExchangeWriter, Routing};
use riffle_runtime::dataflow::item::{ItemParams, ItemStage};
use riffle_runtime::dataflow::output::top_n_by;
use riffle_runtime::dataflow::user::{UserParams, UserStage};
use riffle_runtime::dataflow::window::Windowing;
use riffle_runtime::dataflow::{BatchFrame, Crossing, Stamped};
use riffle_runtime::event::{parse_json, Validation};
use riffle_runtime::keygroup::key_group;
use riffle_runtime::source::generator::Generator;

fn decode(c: &mut Criterion) {
    let line = br#"{"eventId":"p0-123456","userId":"u98765","itemId":"i4321","type":"click","ts":1767225600000}"#;
    let v = Validation { max_ts: i64::MAX };
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_json", |b| {
        b.iter(|| parse_json(black_box(line), &v).unwrap())
    });
    g.bench_function("key_group", |b| {
        b.iter(|| key_group(black_box(b"u98765"), 128))
    });
    g.finish();
}

fn dataflow_batch(c: &mut Criterion) {
    let df = DataflowConfig::default();
    let windowing = Windowing::new(&df);
    let gen = Generator::new(GeneratorConfig {
        users: 100_000,
        items: 10_000,
        events: 1_000_000,
        partitions: 1,
        events_per_second: 2000,
        ..GeneratorConfig::default()
    });
    let routing = Routing {
        key_groups: 128,
        parallelism: 1,
    };
    const BATCH: u64 = 4096;
    let mut g = c.benchmark_group("dataflow");
    g.throughput(Throughput::Elements(BATCH));
    g.sample_size(20);
    g.bench_function(
        "user+exchange+item per 4096-event batch (steady state)",
        |b| {
            let mut user = UserStage::new(UserParams {
                history_length: df.history_length,
                session_gap: df.session_gap.0,
                exclude_purchased: true,
                windowing,
            });
            let mut item = ItemStage::new(ItemParams {
                windowing,
                neighbor_limit: 20,
                top_k: 20,
                max_excluded: df.history_length,
                trending_capacity: 60,
                emit_stats: true,
                emit_late: true,
            });
            let mut k = 0u64;
            let mut wm = i64::MIN;
            b.iter(|| {
                let events: Vec<Stamped> = (k..k + BATCH)
                    .map(|i| {
                        let event = gen.event(0, i);
                        let s = Stamped {
                            seq: i,
                            wm,
                            weight: 1,
                            event,
                        };
                        wm = wm.max(s.event.ts - 5000);
                        s
                    })
                    .collect();
                k += BATCH;
                let frame = BatchFrame {
                    end_seq: k,
                    crossings: vec![Crossing { seq: k - 1, wm }],
                    wm_end: wm,
                };
                let mut x = ExchangeWriter::new(routing, &frame);
                for s in &events {
                    user.process(s, routing.key_group(s.event.user_id.as_bytes()), &mut x)
                        .expect("no store, no I/O");
                }
                let out = x.finish();
                let mut stats = Vec::new();
                let res = item
                    .process_batch(
                        merge_inboxes(
                            out.boxes
                                .into_iter()
                                .take(1)
                                .map(|b| vec![b])
                                .next()
                                .unwrap(),
                        ),
                        &frame,
                        &mut stats,
                    )
                    .expect("no store, no I/O");
                black_box(res.recs.len())
            })
        },
    );
    g.finish();
}

/// Top-K selection over one long co-visitation row, its entries in no particular order (as
/// a hash table yields them): the ranking behind cached candidates and ItemStats neighbours.
fn ranking(c: &mut Criterion) {
    const LEN: u32 = 5_000;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let row: Vec<(u32, u64)> = (0..LEN)
        .map(|id| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Small counts, as in real rows: many ties, decided by the id order.
            (id.wrapping_mul(2_654_435_761), 1 + x % 4)
        })
        .collect();
    let mut g = c.benchmark_group("ranking");
    g.throughput(Throughput::Elements(u64::from(LEN)));
    g.bench_function("top 40 of a 5,000-entry row", |b| {
        b.iter(|| top_n_by(black_box(&row).iter().copied(), 40, |a, b| a < b))
    });
    g.finish();
}

criterion_group!(benches, decode, dataflow_batch, ranking);
criterion_main!(benches);
