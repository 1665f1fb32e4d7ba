//! The sending side of the exchange: what the user stage produces for the item stage (and
//! events forwarded to their user's owner), framed per target key group.
//!
//! Increments are pre-aggregated per (pane, item, other) for each target key group between
//! flushes, and a flush turns one key group's aggregate into one [`Entry::Increments`] per
//! pane — never one entry per increment. A key group is flushed right before a request to it
//! (the request must see its own event's increments) and everything is flushed before a
//! marker or barrier (the receiver aligns entries to the marker that precedes them) and at
//! commit. Each commit then sends one Kafka record per key group that has entries.

use std::collections::BTreeMap;

use super::wire::{Barrier, Entry, Forwarded, Marker, PaneIncrements};
use crate::dataflow::exchange::{Aggregator, Exchange, RecRequest, Routing};
use crate::dataflow::{FastMap, Key};

/// An item and its increments to other items.
type Row = (Key, Vec<(Key, u64)>);

#[derive(Default)]
struct Target {
    /// This key group's increments since its last flush.
    pending: Aggregator,
    entries: Vec<Entry>,
}

pub struct ExchangeSender {
    routing: Routing,
    targets: FastMap<u32, Target>,
    /// Increments added and aggregated increments sent, for the exchange's metrics.
    pub increments_in: u64,
    pub increments_out: u64,
}

impl ExchangeSender {
    /// `routing.parallelism` is the number of workers of this generation.
    pub fn new(routing: Routing) -> Self {
        Self {
            routing,
            targets: FastMap::default(),
            increments_in: 0,
            increments_out: 0,
        }
    }

    fn flush(&mut self, kg: u32) {
        let Some(t) = self.targets.get_mut(&kg) else {
            return;
        };
        if t.pending.is_empty() {
            return;
        }
        // Deterministic order: panes ascending, items and neighbours by id.
        let mut by_pane: BTreeMap<i64, Vec<Row>> = BTreeMap::new();
        for incs in t.pending.take_all() {
            self.increments_out += incs.sums();
            for (pane, mut others) in incs.panes {
                others.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                by_pane
                    .entry(pane)
                    .or_default()
                    .push((incs.item.clone(), others));
            }
        }
        for (pane, mut rows) in by_pane {
            rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            t.entries
                .push(Entry::Increments(PaneIncrements { pane, rows }));
        }
    }

    fn flush_all(&mut self) {
        let kgs: Vec<u32> = self.targets.keys().copied().collect();
        for kg in kgs {
            self.flush(kg);
        }
    }

    /// Send an event to the worker that owns its user (key group `user_kg`).
    pub fn forward(&mut self, user_kg: u32, fwd: Forwarded) {
        self.targets
            .entry(user_kg)
            .or_default()
            .entries
            .push(Entry::Forward(Box::new(fwd)));
    }

    /// Broadcast an entry to every key group, after flushing everything pending.
    fn broadcast(&mut self, e: Entry) {
        self.flush_all();
        for kg in 0..self.routing.key_groups {
            self.targets.entry(kg).or_default().entries.push(e.clone());
        }
    }

    /// A watermark promise to every key group.
    pub fn marker(&mut self, m: Marker) {
        self.broadcast(Entry::Marker(m));
    }

    /// A savepoint barrier to every key group.
    pub fn barrier(&mut self, b: Barrier) {
        self.broadcast(Entry::Barrier(b));
    }

    /// Everything framed so far, per key group in ascending order; pending aggregates are
    /// flushed first. The sender is empty afterwards.
    pub fn take_frames(&mut self) -> Vec<(u32, Vec<Entry>)> {
        self.flush_all();
        let mut out: Vec<(u32, Vec<Entry>)> = self
            .targets
            .drain()
            .filter(|(_, t)| !t.entries.is_empty())
            .map(|(kg, t)| (kg, t.entries))
            .collect();
        out.sort_unstable_by_key(|(kg, _)| *kg);
        out
    }

    pub fn is_empty(&self) -> bool {
        self.targets
            .values()
            .all(|t| t.entries.is_empty() && t.pending.is_empty())
    }
}

impl Exchange for ExchangeSender {
    fn routing(&self) -> Routing {
        self.routing
    }

    fn begin_event(&mut self, _seq: u64) {}

    fn add(&mut self, kg: u32, pane: i64, item: &Key, other: &Key, weight: u64) {
        self.increments_in += 1;
        self.targets
            .entry(kg)
            .or_default()
            .pending
            .add(kg, pane, item, other, weight);
    }

    fn request(&mut self, kg: u32, req: RecRequest) {
        self.flush(kg);
        self.targets
            .entry(kg)
            .or_default()
            .entries
            .push(Entry::Request(Box::new(req)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventType};

    fn req(seq: u64) -> RecRequest {
        RecRequest {
            seq,
            wm: 0,
            event: Event {
                event_id: "e".into(),
                user_id: "u".into(),
                item_id: "a".into(),
                kind: EventType::Click,
                ts: 1,
            },
            weight: 1,
            late: false,
            excluded: vec![],
        }
    }

    #[test]
    fn aggregates_per_pane_until_a_request_and_frames_per_key_group() {
        let mut s = ExchangeSender::new(Routing {
            key_groups: 3,
            parallelism: 2,
        });
        let (a, b, c): (Key, Key, Key) = ("a".into(), "b".into(), "c".into());
        s.add(0, 5, &a, &b, 1);
        s.add(0, 5, &a, &b, 2);
        s.add(0, 5, &a, &c, 1);
        s.add(0, 6, &a, &b, 1);
        s.add(1, 5, &b, &a, 4);
        s.request(0, req(1));
        s.add(0, 5, &a, &b, 7);
        s.marker(Marker {
            user_wm: 10,
            source_wm: 10,
            source_idle: false,
        });
        let frames = s.take_frames();
        assert!(s.is_empty());
        let kinds: Vec<(u32, Vec<String>)> = frames
            .iter()
            .map(|(kg, es)| {
                let names = es
                    .iter()
                    .map(|e| match e {
                        Entry::Increments(p) => format!(
                            "inc{}:{}",
                            p.pane,
                            p.rows
                                .iter()
                                .map(|(i, o)| format!("{i}{o:?}"))
                                .collect::<Vec<_>>()
                                .join(",")
                        ),
                        Entry::Request(r) => format!("req{}", r.seq),
                        Entry::Marker(m) => format!("marker{}", m.user_wm),
                        other => format!("{other:?}"),
                    })
                    .collect();
                (*kg, names)
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                (
                    0,
                    vec![
                        "inc5:a[(\"b\", 3), (\"c\", 1)]".to_string(),
                        "inc6:a[(\"b\", 1)]".into(),
                        "req1".into(),
                        "inc5:a[(\"b\", 7)]".into(),
                        "marker10".into()
                    ]
                ),
                (1, vec!["inc5:b[(\"a\", 4)]".into(), "marker10".into()]),
                (2, vec!["marker10".into()]),
            ]
        );
        assert_eq!((s.increments_in, s.increments_out), (6, 5));
    }
}
