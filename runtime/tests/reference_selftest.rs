//! Hand-computed unit tests of the reference implementation (`tests/reference/mod.rs`).
//! Unless a test says otherwise: S = 1 min, W = 2 min (every event lies in the 2 windows with
//! ends (p+1)·S and (p+2)·S), weights view 1 / click 1 / cart 3 / purchase 5, N = 20,
//! G = 30 min, D = 0, L = 0, one partition.

mod reference;

use reference::{run, RefEvent, RefItemStats, RefOutput, RefParams, RefType};
use RefType::{Cart, Click, Purchase, View};

const MIN: i64 = 60_000;

fn params() -> RefParams {
    RefParams {
        weights: [1, 1, 3, 5],
        history_length: 20,
        session_gap_ms: 30 * MIN,
        window_size_ms: 2 * MIN,
        window_slide_ms: MIN,
        max_out_of_orderness_ms: 0,
        allowed_lateness_ms: 0,
        neighbor_limit: 20,
        top_k: 20,
        exclude_purchased: true,
    }
}

fn ev(partition: u32, id: &str, user: &str, item: &str, kind: RefType, ts: i64) -> RefEvent {
    RefEvent {
        partition,
        event_id: id.to_string(),
        user_id: user.to_string(),
        item_id: item.to_string(),
        kind,
        ts,
    }
}

fn stats(item: &str, end: i64, popularity: u64, neighbors: &[(&str, u64)]) -> RefItemStats {
    RefItemStats {
        item_id: item.to_string(),
        window_start: end - 2 * MIN,
        window_end: end,
        popularity,
        neighbors: neighbors.iter().map(|(j, w)| (j.to_string(), *w)).collect(),
    }
}

fn items(list: &[(&str, f64)]) -> Vec<(String, f64)> {
    list.iter().map(|(j, s)| (j.to_string(), *s)).collect()
}

fn recs(out: &RefOutput) -> Vec<Vec<(String, f64)>> {
    out.recommendations
        .iter()
        .map(|r| r.items.clone())
        .collect()
}

#[test]
fn covisitation_increments_including_repeats() {
    // D = 1 h: nothing is emitted before the end, nothing is late.
    let mut p = params();
    p.max_out_of_orderness_ms = 3_600_000;
    let events = [
        ev(0, "e1", "u1", "A", View, 0),
        ev(0, "e2", "u1", "A", View, 1_000),
        ev(0, "e3", "u1", "B", Cart, 2_000),
    ];
    let out = run(&p, 1, &events);
    // e1: H = {} -> pop(A) += 1.
    // e2: H = {A@0} -> pop(A) += 1; (A,A) += 1 and (A,A) += 1 -> covisit(A,A) = 2 (= 2w).
    // e3 (cart, w = 3): H = {A@0, A@1000} -> pop(B) += 3; (B,A) += 3 twice = 6; (A,B) += 3 twice = 6.
    // All at pane 0, so windows [-60000, 60000) and [0, 120000) both hold everything:
    //   A: pop 2, neighbors (B,6), (A,2);  B: pop 3, neighbors (A,6).
    let expected = vec![
        stats("A", MIN, 2, &[("B", 6), ("A", 2)]),
        stats("B", MIN, 3, &[("A", 6)]),
        stats("A", 2 * MIN, 2, &[("B", 6), ("A", 2)]),
        stats("B", 2 * MIN, 3, &[("A", 6)]),
    ];
    assert_eq!(out.item_stats, expected);
    // Recommendations (live panes -1, 0; no window emitted yet, so no trending fill):
    // e1: pop(A) = 1, no c -> [].
    // e2: pop(A) = 2, c(A) = 2 -> score 1.0.
    // e3: pop(B) = 3, c(A) = 6 -> score 2.0.
    assert_eq!(
        recs(&out),
        vec![items(&[]), items(&[("A", 1.0)]), items(&[("A", 2.0)])]
    );
    assert!(out.late_event_ids.is_empty());
}

#[test]
fn window_emission_order_and_contents() {
    let events = [
        ev(0, "e1", "u1", "A", View, 10_000), // pane 0: windows 60000, 120000
        ev(0, "e2", "u1", "B", View, 70_000), // pane 1: windows 120000, 180000
        ev(0, "e3", "u3", "C", View, 130_000), // pane 2: windows 180000, 240000
        ev(0, "e4", "u4", "A", Click, 185_000), // pane 3: windows 240000, 300000
    ];
    let out = run(&params(), 1, &events);
    // W_e: e1 -inf, e2 10000, e3 70000, e4 130000; nothing is late.
    // e2: H(u1) = {A@10000} -> (B,A) += 1, (A,B) += 1 at 70000.
    // Step 1 of e3 (W_e = 70000) emits window 60000; step 1 of e4 (W_e = 130000) emits 120000;
    // the end emits 180000, 240000, 300000.
    //   [-60000, 60000):  A 1
    //   [0, 120000):      A 1 (B,1); B 1 (A,1)
    //   [60000, 180000):  B 1 (A,1); C 1   (covisit(A,B) at 70000 is here but A has no
    //                                       popularity in this window -> no record for A)
    //   [120000, 240000): A 1; C 1
    //   [180000, 300000): A 1
    let expected = vec![
        stats("A", MIN, 1, &[]),
        stats("A", 2 * MIN, 1, &[("B", 1)]),
        stats("B", 2 * MIN, 1, &[("A", 1)]),
        stats("B", 3 * MIN, 1, &[("A", 1)]),
        stats("C", 3 * MIN, 1, &[]),
        stats("A", 4 * MIN, 1, &[]),
        stats("C", 4 * MIN, 1, &[]),
        stats("A", 5 * MIN, 1, &[]),
    ];
    assert_eq!(out.item_stats, expected);
    // e1: [] (pop 1, no c, nothing emitted).
    // e2: pop(B) = 1 (panes 0,1), c(A) = 1 -> (A, 1.0); nothing emitted yet.
    // e3: pop(C) = 1, no c; trending from window 60000 = [A] -> (A, 0).
    // e4: panes 2,3: pop(A) = 1, no c ((A,B) is at pane 1); trending from window 120000:
    //     A 1, B 1 -> ties by itemId -> A, B.
    assert_eq!(
        recs(&out),
        vec![
            items(&[]),
            items(&[("A", 1.0)]),
            items(&[("A", 0.0)]),
            items(&[("A", 0.0), ("B", 0.0)]),
        ]
    );
    assert!(out.late_event_ids.is_empty());
}

#[test]
fn late_event_recommended_and_in_history_but_not_counted() {
    let events = [
        ev(0, "e1", "u1", "A", View, 0),
        ev(0, "e2", "u2", "B", View, 200_000), // pane 3: windows 240000, 300000
        ev(0, "e3", "u1", "C", View, 30_000),  // pane 0: last window end 120000
        ev(0, "e4", "u1", "D", View, 260_000), // pane 4: windows 300000, 360000
    ];
    let out = run(&params(), 1, &events);
    // e3: W_e = 200000 >= (0 + 2)·60000 + 0 -> late. Step 1 emitted windows 60000 and 120000
    // (A 1 each). No contribution; C@30000 is appended to u1's history.
    assert_eq!(out.late_event_ids, vec!["e3".to_string()]);
    // e4: W_e = 200000; H(u1) = {A@0, C@30000} (|260000 - ts| <= 30 min, ts >= 200000 - 30 min)
    //   -> pop(D) += 1; (D,A), (A,D), (D,C), (C,D) += 1 at 260000.
    // End: [120000, 240000): B 1;  [180000, 300000): B 1, D 1 (A,1)(C,1);
    //      [240000, 360000): D 1 (A,1)(C,1). C never has popularity.
    let expected = vec![
        stats("A", MIN, 1, &[]),
        stats("A", 2 * MIN, 1, &[]),
        stats("B", 4 * MIN, 1, &[]),
        stats("B", 5 * MIN, 1, &[]),
        stats("D", 5 * MIN, 1, &[("A", 1), ("C", 1)]),
        stats("D", 6 * MIN, 1, &[("A", 1), ("C", 1)]),
    ];
    assert_eq!(out.item_stats, expected);
    // e1: []. e2: pop(B) = 1, no c, nothing emitted -> [].
    // e3 (late): panes -1, 0 not live (200000 >= 60000, 120000) -> no candidates;
    //     trending from window 120000 = [A] -> (A, 0).
    // e4: panes 3, 4 live; pop(D) = 1; c(A) = c(C) = 1 -> (A,1.0), (C,1.0); fill: A already
    //     listed -> nothing added.
    assert_eq!(
        recs(&out),
        vec![
            items(&[]),
            items(&[]),
            items(&[("A", 0.0)]),
            items(&[("A", 1.0), ("C", 1.0)]),
        ]
    );
    assert_eq!(out.recommendations.len(), 4);
    assert_eq!(out.recommendations[2].event_id, "e3");
}

#[test]
fn session_gap_cuts_history() {
    let events = [
        ev(0, "e1", "u1", "A", View, 0),
        ev(0, "e2", "u1", "B", View, 30 * MIN),
        ev(0, "e3", "u1", "C", View, 60 * MIN + 1),
    ];
    let out = run(&params(), 1, &events);
    // e2: |1800000 - 0| = G -> A in H -> (B,A), (A,B) += 1. pop(B) = 1, c(A) = 1 -> (A, 1.0).
    // e3: W_e = 1800000; step 1 emits windows 60000 and 120000 (A 1). H: A is 3600001 away,
    //     B is 1800001 away, both > G -> H = {} -> no co-visitation.
    //     pop(C) = 1, no c; trending from window 120000 -> (A, 0).
    assert_eq!(
        recs(&out),
        vec![items(&[]), items(&[("A", 1.0)]), items(&[("A", 0.0)])]
    );
    // B's windows: [1740000, 1860000), [1800000, 1920000): B 1 (A,1) (covisit(B,A) at 1800000).
    // C's windows: [3540000, 3660000), [3600000, 3720000): C 1, no neighbours.
    let expected = vec![
        stats("A", MIN, 1, &[]),
        stats("A", 2 * MIN, 1, &[]),
        stats("B", 31 * MIN, 1, &[("A", 1)]),
        stats("B", 32 * MIN, 1, &[("A", 1)]),
        stats("C", 61 * MIN, 1, &[]),
        stats("C", 62 * MIN, 1, &[]),
    ];
    assert_eq!(out.item_stats, expected);
}

#[test]
fn watermark_expires_history_and_closed_windows_are_final() {
    let events = [
        ev(0, "e1", "u1", "A", View, 0),
        ev(0, "e2", "u2", "Z", View, 1_850_000), // pane 30: windows 1860000, 1920000
        ev(0, "e3", "u1", "B", View, 1_790_000), // pane 29: windows 1800000, 1860000
    ];
    let out = run(&params(), 1, &events);
    // e3: W_e = 1850000 < (29 + 2)·60000 = 1860000 -> not late.
    //     A@0: |1790000 - 0| <= G but 0 < 1850000 - G - L = 50000 -> expired -> H = {}.
    //     Window 1800000 is already closed (1800000 <= W_e): B counts only in 1860000.
    //     Step 1 emitted windows 60000 and 120000 (A 1).
    assert!(out.late_event_ids.is_empty());
    let expected = vec![
        stats("A", MIN, 1, &[]),
        stats("A", 2 * MIN, 1, &[]),
        stats("B", 31 * MIN, 1, &[]),
        stats("Z", 31 * MIN, 1, &[]),
        stats("Z", 32 * MIN, 1, &[]),
    ];
    assert_eq!(out.item_stats, expected);
    // e3: scoring panes 28, 29; pane 28 not live (1850000 >= 1800000), pane 29 live:
    //     pop(B) = 1, no c; trending from window 120000 -> (A, 0).
    assert_eq!(out.recommendations[2].items, items(&[("A", 0.0)]));
}

#[test]
fn exclude_purchased() {
    let mut p = params();
    p.max_out_of_orderness_ms = 3_600_000; // nothing emitted before the end, nothing late
    let events = [
        ev(0, "e1", "u1", "A", Purchase, 0),
        ev(0, "e2", "u1", "B", View, 1_000),
        ev(0, "e3", "u2", "A", View, 2_000),
        ev(0, "e4", "u1", "A", View, 3_000),
        ev(0, "e5", "u3", "D", View, 6_000),
        ev(0, "e6", "u3", "D", Purchase, 7_000),
    ];
    // e1: pop(A) = 5; no c.
    // e2: H(u1) = {A purchase} -> pop(B) = 1; c(A) = 1 -> score 1.0; X(u1) = {A}.
    // e3: u2 has no history. pop(A) = 5 + 1 = 6; c(B) = covisit(A,B) = 1 -> 1/6; X(u2) = {}.
    // e4: H(u1) = {A P, B V} -> pop(A) = 7; (A,A) += 1 twice -> c(A) = 2; (A,B) += 1 -> c(B) = 2.
    //     Scores A 2/7, B 2/7. X(u1) = {A}.
    // e5: pop(D) = 1; no c.
    // e6: H(u3) = {D V} -> pop(D) = 1 + 5 = 6; (D,D) += 5 twice -> c(D) = 10 -> 10/6.
    //     X(u3) is evaluated after appending e6 (a purchase of D) -> {D}.
    let out = run(&p, 1, &events);
    assert_eq!(
        recs(&out),
        vec![
            items(&[]),
            items(&[]),
            items(&[("B", 1.0 / 6.0)]),
            items(&[("B", 2.0 / 7.0)]),
            items(&[]),
            items(&[]),
        ]
    );
    p.exclude_purchased = false;
    let out = run(&p, 1, &events);
    assert_eq!(
        recs(&out),
        vec![
            items(&[]),
            items(&[("A", 1.0)]),
            items(&[("B", 1.0 / 6.0)]),
            items(&[("A", 2.0 / 7.0), ("B", 2.0 / 7.0)]),
            items(&[]),
            items(&[("D", 10.0 / 6.0)]),
        ]
    );
}

#[test]
fn trending_fill() {
    let mut p = params();
    p.top_k = 3;
    let events = [
        ev(0, "e1", "u1", "A", View, 0),
        ev(0, "e2", "u2", "B", Cart, 1_000),
        ev(0, "e3", "u3", "C", View, 2_000),
        ev(0, "e4", "u3", "B", View, 3_000), // (B,C), (C,B) += 1 at pane 0
        ev(0, "e5", "u4", "X", View, 200_000), // pane 3
        ev(0, "e6", "u5", "C", View, 201_000),
        ev(0, "e7", "u5", "B", View, 202_000),
        ev(0, "e8", "u5", "A", Purchase, 203_000),
    ];
    let out = run(&p, 1, &events);
    // e1..e5: nothing emitted yet -> no fill. e1 [], e2 [], e3 [], e4: pop(B) = 3 + 1 = 4,
    //   c(C) = 1 -> 1/4; e5: [].
    // e6: W_e = 200000 -> step 1 emits windows 60000 and 120000, both: A 1, B 4 (C,1), C 1 (B,1).
    //   pop(C) = 1 in panes 2, 3; no c -> fill from window 120000 by popularity: B, A, C.
    // e7: H(u5) = {C} -> pop(B) = 1, c(C) = 1 -> (C, 1.0); fill: B, A (C listed; K = 3 reached).
    // e8: H(u5) = {C, B} -> pop(A) = 5, c(C) = c(B) = 5 -> (B,1.0), (C,1.0);
    //   X = {A} (e8 itself) -> fill: B listed, A excluded, C listed -> only 2 items.
    assert_eq!(
        recs(&out),
        vec![
            items(&[]),
            items(&[]),
            items(&[]),
            items(&[("C", 0.25)]),
            items(&[]),
            items(&[("B", 0.0), ("A", 0.0), ("C", 0.0)]),
            items(&[("C", 1.0), ("B", 0.0), ("A", 0.0)]),
            items(&[("B", 1.0), ("C", 1.0)]),
        ]
    );
    assert_eq!(
        out.item_stats[..6],
        [
            stats("A", MIN, 1, &[]),
            stats("B", MIN, 4, &[("C", 1)]),
            stats("C", MIN, 1, &[("B", 1)]),
            stats("A", 2 * MIN, 1, &[]),
            stats("B", 2 * MIN, 4, &[("C", 1)]),
            stats("C", 2 * MIN, 1, &[("B", 1)]),
        ]
    );
}

#[test]
fn min_watermark_over_two_partitions() {
    let events = [
        ev(0, "a", "u1", "A", View, 100_000), // W_e -inf (no partition has an event)
        ev(0, "b", "u2", "B", View, 300_000), // W_e -inf (p1 has no event yet)
        ev(1, "c", "u3", "C", View, 10_000),  // W_e -inf: not late although p0 is at 300000
        ev(1, "d", "u4", "D", View, 20_000),  // W_e = min(300000, 10000) = 10000
        ev(0, "e", "u5", "E", View, 310_000), // W_e = min(300000, 20000) = 20000 (p0's last)
        ev(1, "f", "u6", "F", View, 425_000), // p0 finished: W_e = 20000 (p1 only)
        ev(1, "g", "u7", "G", View, 250_000), // p0 finished: W_e = 425000 (p1 only)
    ];
    // g: pane 4, last window end 360000 <= 425000 -> late. (Were p0 still holding the
    // watermark back, W_e would be min(310000, 425000) = 310000 and g would not be late.)
    // Step 1 of g emits every window with end <= 425000.
    // Windows: [-60000,60000): C D; [0,120000): A C D; [60000,180000): A;
    //          [240000,360000): B E; [300000,420000): B E; [360000,480000): F; [420000,540000): F.
    let expected_stats = vec![
        stats("C", MIN, 1, &[]),
        stats("D", MIN, 1, &[]),
        stats("A", 2 * MIN, 1, &[]),
        stats("C", 2 * MIN, 1, &[]),
        stats("D", 2 * MIN, 1, &[]),
        stats("A", 3 * MIN, 1, &[]),
        stats("B", 6 * MIN, 1, &[]),
        stats("E", 6 * MIN, 1, &[]),
        stats("B", 7 * MIN, 1, &[]),
        stats("E", 7 * MIN, 1, &[]),
        stats("F", 8 * MIN, 1, &[]),
        stats("F", 9 * MIN, 1, &[]),
    ];
    // g's recommendation: no live pane; trending from window 420000: B 1, E 1.
    for partitions in [2, 3] {
        // With 3 partitions, partition 2 has no event and is finished from the start.
        let out = run(&params(), partitions, &events);
        assert_eq!(out.late_event_ids, vec!["g".to_string()]);
        assert_eq!(out.item_stats, expected_stats);
        assert_eq!(
            out.recommendations[6].items,
            items(&[("B", 0.0), ("E", 0.0)])
        );
        // a..f: no co-visitation and no window emitted before g -> empty.
        assert!(out.recommendations[..6].iter().all(|r| r.items.is_empty()));
    }
}

#[test]
fn history_length_keeps_last_n() {
    let mut p = params();
    p.history_length = 2;
    p.max_out_of_orderness_ms = 3_600_000;
    let events = [
        ev(0, "e1", "u1", "A", View, 0),
        ev(0, "e2", "u1", "B", View, 1_000),
        ev(0, "e3", "u1", "C", View, 2_000),
        ev(0, "e4", "u1", "D", View, 3_000),
    ];
    // e4: the list holds the last 2 appended entries {B, C}; A was dropped when C was appended.
    // pop(D) = 1, c(B) = c(C) = 1 -> (B,1.0), (C,1.0).
    let out = run(&p, 1, &events);
    assert_eq!(
        out.recommendations[3].items,
        items(&[("B", 1.0), ("C", 1.0)])
    );
}

#[test]
fn non_late_event_skips_already_emitted_windows() {
    let events = [
        ev(0, "e1", "u1", "A", View, 0), // pane 0: windows 60000, 120000
        ev(0, "e2", "u2", "B", View, 100_000), // pane 1: windows 120000, 180000
        ev(0, "e3", "u3", "C", View, 30_000), // pane 0: windows 60000, 120000
    ];
    // e3: W_e = 100000: step 1 emits window 60000 (A 1). e3 is not late (120000 > 100000), so it
    // counts in window 120000 only; window 60000 is final and is not emitted again.
    // End: [0, 120000): A 1, B 1, C 1;  [60000, 180000): B 1.
    let out = run(&params(), 1, &events);
    assert!(out.late_event_ids.is_empty());
    let expected = vec![
        stats("A", MIN, 1, &[]),
        stats("A", 2 * MIN, 1, &[]),
        stats("B", 2 * MIN, 1, &[]),
        stats("C", 2 * MIN, 1, &[]),
        stats("B", 3 * MIN, 1, &[]),
    ];
    assert_eq!(out.item_stats, expected);
    // e3: scoring panes -1 (not live: 100000 >= 60000) and 0 (live): pop(C) = 1, no c;
    // trending from window 60000 -> (A, 0).
    assert_eq!(out.recommendations[2].items, items(&[("A", 0.0)]));
}
