//! The dataflow's hot tiers against the state layer's real RocksDB: state far beyond the
//! budget spills and comes back, and the stages' output does not change.

use std::mem::size_of;

use riffle_dataflow::event::{Event, EventType};
use riffle_dataflow::exchange::{ExchangeWriter, Payload, RecRequest, Routing};
use riffle_dataflow::item::{self, ItemOutput, ItemParams, ItemStage};
use riffle_dataflow::output::ItemStats;
use riffle_dataflow::user::{self, UserParams, UserStage};
use riffle_dataflow::window::{Windowing, WM_MAX, WM_MIN};
use riffle_dataflow::{heap, keygroup, BatchFrame, Key, Stamped};

use super::StateManager;
use crate::config::{DataflowConfig, GeneratorConfig};
use crate::source::generator::Generator;
use riffle_dataflow::store::StateWriter;

fn user_params() -> UserParams {
    let df = DataflowConfig::default();
    UserParams {
        history_length: df.history_length,
        session_gap: df.session_gap.0,
        exclude_purchased: true,
        windowing: Windowing::new(&df),
    }
}

/// Runs 20 batches of generated events; returns everything the stage sent, in order.
fn run_users(stage: &mut UserStage, mut after_batch: impl FnMut(&mut UserStage)) -> Vec<String> {
    let gen = Generator::new(GeneratorConfig {
        users: 300,
        items: 50,
        ..GeneratorConfig::default()
    });
    let routing = Routing {
        key_groups: 8,
        parallelism: 1,
    };
    let mut sent = Vec::new();
    for batch in 0..20u64 {
        let frame = BatchFrame {
            end_seq: (batch + 1) * 100,
            ..BatchFrame::default()
        };
        let mut x = ExchangeWriter::new(routing, &frame);
        for seq in batch * 100..(batch + 1) * 100 {
            let event = gen.event(0, seq);
            let kg = routing.key_group(event.user_id.as_bytes());
            let ev = Stamped {
                seq,
                wm: event.ts - 60_000,
                weight: 1,
                event,
            };
            stage.process(&ev, kg, &mut x).unwrap();
        }
        for m in x.finish().boxes.into_iter().flatten() {
            let mut line = format!("{:?}", m.key);
            match m.payload {
                Payload::Increments(mut items) => {
                    items.sort_by(|a, b| a.item.cmp(&b.item));
                    for i in &mut items {
                        i.panes.sort_by_key(|(pane, _)| *pane);
                        for (_, others) in &mut i.panes {
                            others.sort();
                        }
                    }
                    line += &format!("{items:?}");
                }
                Payload::Request { req, .. } => line += &format!("{:?}", (req.late, req.excluded)),
            }
            sent.push(line);
        }
        after_batch(stage);
    }
    sent
}

/// With a budget far below the state, histories go to RocksDB and come back on their
/// user's next event, the hot tier stays within the budget after every batch, and the
/// stage sends exactly what an all-in-memory stage sends.
#[test]
fn histories_beyond_the_budget_spill_to_the_store_and_come_back() {
    let mut memory = UserStage::new(user_params());
    let want = run_users(&mut memory, |_| {});

    let dir = tempfile::tempdir().unwrap();
    let state = StateManager::create(dir.path()).unwrap();
    // Eight tables (one per key group) of a few users, about four full histories, and
    // the list of users dirtied in three batches (a checkpoint empties it).
    let budget = 8 * user::history_table_bytes(3)
        + 4 * 20 * size_of::<user::HistEntry>()
        + heap::vec::<(u32, Key)>(512);
    let mut tiered = UserStage::new(user_params());
    tiered.set_store(state.spill_store(), budget);
    let (mut peak, mut batches) = (0, 0);
    let got = run_users(&mut tiered, |s| {
        s.maintain().unwrap();
        peak = peak.max(s.hot_bytes());
        batches += 1;
        if batches % 3 == 0 {
            let mut out = state.writer();
            s.snapshot(&mut out).unwrap();
            out.finish().unwrap();
        }
    });
    assert_eq!(got, want);
    assert!(
        peak <= budget,
        "hot tier {peak} B after maintenance, budget {budget} B"
    );
    assert!(tiered.evictions > 100, "evictions: {}", tiered.evictions);
    assert!(tiered.loads > 100, "loads: {}", tiered.loads);
    // A snapshot now writes only what changed since the evictions wrote it back.
    let mut ops = Counted::default();
    tiered.snapshot(&mut ops).unwrap();
    assert!(
        ops.0 <= tiered.users(),
        "{} ops for {} hot users",
        ops.0,
        tiered.users()
    );
}

fn item_params() -> ItemParams {
    ItemParams {
        windowing: Windowing {
            slide: 1_000,
            size: 4_000,
            lateness: 0,
        },
        neighbor_limit: 5,
        top_k: 4,
        max_excluded: 3,
        trending_capacity: 6,
        emit_stats: true,
        emit_late: false,
    }
}

/// Drive a stage with a random stream of increments, requests and watermark steps; after
/// each step `after_step` runs (maintenance). Returns every output, ItemStats sorted.
fn run_items(stage: &mut ItemStage, mut after_step: impl FnMut(&mut ItemStage)) -> Vec<String> {
    let kgs = 8;
    let kg = |item: &str| keygroup::key_group(item.as_bytes(), kgs);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut lines = Vec::new();
    let mut stats: Vec<ItemStats> = Vec::new();
    let mut wm = WM_MIN;
    let mut t = 0i64;
    for step in 0..3_000u64 {
        t += (next() % 40) as i64;
        let ts = t - (next() % 3_000) as i64;
        let pane = ts.div_euclid(1_000);
        let item = format!("i{}", next() % 60);
        let mut out = ItemOutput::default();
        if next() % 3 == 0 {
            let req = RecRequest {
                seq: step,
                wm,
                event: Event {
                    event_id: format!("e{step}").into(),
                    user_id: "u".into(),
                    item_id: item.as_str().into(),
                    kind: EventType::Click,
                    ts,
                },
                weight: 1 + (next() % 3) as u32,
                late: item_params().windowing.is_late(ts, wm),
                excluded: vec![format!("i{}", next() % 60).into()],
            };
            stage.request(req, kg(&item), &mut out).unwrap();
        } else if !item_params().windowing.is_late(ts, wm) {
            let other = format!("i{}", next() % 60);
            let w = 1 + next() % 4;
            stage
                .apply(kg(&item), pane, &item, Some(&other), w)
                .unwrap();
        }
        if step % 50 == 49 {
            wm = wm.max(t - 2_500);
            stage.advance(wm, &mut out, &mut stats).unwrap();
        }
        for r in &out.recs {
            lines.push(format!("{:?}", r.rec));
        }
        for (end, top) in &out.trending {
            lines.push(format!("trending {end} {top:?}"));
        }
        after_step(stage);
    }
    let mut out = ItemOutput::default();
    stage.advance(WM_MAX, &mut out, &mut stats).unwrap();
    for (end, top) in &out.trending {
        lines.push(format!("trending {end} {top:?}"));
    }
    let mut stats: Vec<String> = stats.iter().map(|s| format!("{s:?}")).collect();
    stats.sort();
    lines.extend(stats);
    lines
}

/// With a budget far below the state, pane entries go to RocksDB and come back, windows
/// with cold panes are emitted from the store, and the stage produces exactly what an
/// all-in-memory stage produces: recommendations, trending lists and ItemStats.
#[test]
fn pane_entries_beyond_the_budget_spill_to_the_store_and_the_output_is_unchanged() {
    let mut memory = ItemStage::new(item_params());
    let want = run_items(&mut memory, |_| {});
    assert!(want.iter().any(|l| l.starts_with("ItemStats")));

    let dir = tempfile::tempdir().unwrap();
    let state = StateManager::create(dir.path()).unwrap();
    // The dictionary (never evicted), about 40 entries, and the dirty list between two
    // checkpoints.
    let entries = 40 * 2 * (item::pane_entry_slot_bytes());
    let budget = memory.dict_bytes() + entries + heap::vec::<(i64, u32)>(256);
    let mut tiered = ItemStage::new(item_params());
    tiered.set_store(state.spill_store(), budget, 0..8);
    let (mut peak, mut steps) = (0, 0);
    let got = run_items(&mut tiered, |s| {
        steps += 1;
        if steps % 100 == 0 {
            let mut out = state.writer();
            s.snapshot(0..8, &mut out).unwrap();
            out.finish().unwrap();
        }
        s.maintain().unwrap();
        peak = peak.max(s.hot_bytes());
    });
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w);
    }
    assert!(
        peak <= budget,
        "hot tier {peak} B after maintenance, budget {budget} B"
    );
    assert!(tiered.evictions > 100, "evictions: {}", tiered.evictions);
    assert!(tiered.loads > 100, "loads: {}", tiered.loads);
    // Ids are renumbered under the running window's sums and the dirty list, too.
    assert!(tiered.dict_rebuilds > 0, "the dictionary was never rebuilt");
}

/// A stage restored from a snapshot with a budget far below its state keeps the panes
/// beyond half the budget in the store (marked cold) and goes on producing exactly what
/// an uninterrupted all-in-memory stage produces.
#[test]
fn a_restore_beyond_the_budget_leaves_panes_cold_and_the_output_is_unchanged() {
    let mut memory = ItemStage::new(item_params());
    let want = run_items(&mut memory, |_| {});

    let dir = tempfile::tempdir().unwrap();
    let state = StateManager::create(dir.path()).unwrap();
    let budget = memory.dict_bytes() + 2 * 40 * (item::pane_entry_slot_bytes());
    let (mut steps, mut cold_after_restore) = (0, 0);
    let got = run_items(&mut ItemStage::new(item_params()), |s| {
        steps += 1;
        if steps != 1_500 {
            s.maintain().unwrap();
            return;
        }
        let mut out = state.writer();
        s.snapshot(0..8, &mut out).unwrap();
        out.finish().unwrap();
        let mut restored = ItemStage::new(item_params());
        restored.set_store(state.spill_store(), budget, 0..8);
        for kg in 0..8 {
            state.scan_panes(kg, &mut restored.restorer(kg)).unwrap();
        }
        restored.resume(s.watermark());
        cold_after_restore = restored.cold_panes();
        *s = restored;
    });
    assert!(cold_after_restore > 0, "every pane was loaded");
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w);
    }
}

/// Counts the changes a snapshot hands over.
#[derive(Default)]
struct Counted(usize);

impl StateWriter for Counted {
    fn put_history(
        &mut self,
        _: u32,
        _: &str,
        _: &std::collections::VecDeque<user::HistEntry>,
    ) -> riffle_dataflow::Result<()> {
        self.0 += 1;
        Ok(())
    }
    fn delete_history(&mut self, _: u32, _: &str) -> riffle_dataflow::Result<()> {
        self.0 += 1;
        Ok(())
    }
    fn put_pane_entry(
        &mut self,
        _: u32,
        _: i64,
        _: &str,
        _: u64,
        _: &mut dyn ExactSizeIterator<Item = (&str, u64)>,
    ) -> riffle_dataflow::Result<()> {
        self.0 += 1;
        Ok(())
    }
    fn delete_panes_below(&mut self, _: u32, _: i64) -> riffle_dataflow::Result<()> {
        self.0 += 1;
        Ok(())
    }
    fn finish(self: Box<Self>) -> riffle_dataflow::Result<()> {
        Ok(())
    }
}
