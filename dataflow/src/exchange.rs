//! The exchange between the user-keyed and the item-keyed stage.
//!
//! Co-visitation increments are pre-aggregated per item between flushes (sums commute, so
//! window contents are unchanged), which is what lets the distributed version send one batch
//! per target partition per flush instead of one record per increment, and lets the item
//! stage look an item's pane entry and window sum up once per batch of its increments.
//! Flushes happen exactly where ordering matters:
//! - before a recommendation request, of the requested item's increments (the request must
//!   see its own event's increments, and it reads nothing but its item's row: key
//!   `(seq, RANK_OWN)` then `(seq, RANK_REQUEST)`);
//! - at every watermark crossing (increments stamped before it must be counted in the windows
//!   emitted there: key `(crossing, RANK_CROSSING)`, which sorts before the emission);
//! - at the end of a batch, so no exchange state outlives a checkpoint barrier.
//!
//! Every message carries a sort key; each receiver merges its inputs by key, which replays
//! the global read order as far as the semantics need it.

use super::{BatchFrame, Key};
use crate::event::Event;
use crate::keygroup;

/// Aggregates flushed at a watermark crossing: applied before that crossing's emission.
pub const RANK_CROSSING: u8 = 0;
/// Aggregates flushed just before a request: applied after the emission at that sequence.
pub const RANK_OWN: u8 = 1;
pub const RANK_REQUEST: u8 = 2;

/// Order of messages at a receiver: (sequence number, rank).
pub type MsgKey = (u64, u8);

/// One item's co-visitation increments, summed since its last flush: per pane, the weight
/// to add to each other item. `kg` is the item's key group (the receiver does not hash it
/// again).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemIncrements {
    pub item: Key,
    pub kg: u32,
    pub panes: Vec<(i64, Vec<(Key, u64)>)>,
}

/// What the item stage needs to recommend for one event.
#[derive(Clone, Debug)]
pub struct RecRequest {
    pub seq: u64,
    pub wm: i64,
    pub event: Event,
    pub weight: u32,
    pub late: bool,
    /// Items the user purchased within the history (excluded from the recommendation).
    pub excluded: Vec<Key>,
}

#[derive(Clone, Debug)]
pub enum Payload {
    Increments(Vec<ItemIncrements>),
    /// A request for an item of key group `kg`.
    Request {
        kg: u32,
        req: Box<RecRequest>,
    },
}

#[derive(Clone, Debug)]
pub struct Message {
    pub key: MsgKey,
    pub payload: Payload,
}

/// Routing of key groups to workers.
#[derive(Clone, Copy, Debug)]
pub struct Routing {
    pub key_groups: u32,
    pub parallelism: usize,
}

impl Routing {
    pub fn key_group(&self, key: &[u8]) -> u32 {
        keygroup::key_group(key, self.key_groups)
    }
    pub fn owner(&self, kg: u32) -> usize {
        keygroup::owner(kg, self.key_groups, self.parallelism)
    }
}

/// What the user stage sends to the item stage. The local engine's [`ExchangeWriter`] orders
/// messages by read sequence within a batch; the distributed runtime's sender frames them into
/// Kafka records per target key group (`crate::distributed::sender`).
pub trait Exchange {
    fn routing(&self) -> Routing;
    /// Call before producing anything for the event with sequence `seq`.
    fn begin_event(&mut self, seq: u64);
    /// Add `weight` to `(item, other)` in `pane`, for the item's key group `kg`.
    fn add(&mut self, kg: u32, pane: i64, item: &Key, other: &Key, weight: u64);
    /// Send a recommendation request, after everything pending for its key group.
    fn request(&mut self, kg: u32, req: RecRequest);
}

/// An aggregation map: looked up by `&str`, and a new key is made from it only when inserted.
type AggMap<V> = hashbrown::HashMap<Key, V, rustc_hash::FxBuildHasher>;

/// Reused aggregation maps kept at most (see `Aggregator::spare`), and the largest kept.
const SPARE_MAPS: usize = 64;
const SPARE_CAPACITY: usize = 256;

/// One item's increments since its last flush.
struct PendingItem {
    kg: u32,
    /// Per pane (an item is rarely incremented in more than two at once): other → weight.
    panes: Vec<(i64, AggMap<u64>)>,
}

/// Co-visitation increments summed per (item, pane, other) until they are taken: the
/// pre-aggregation both exchanges (the local engine's and the distributed sender) share.
/// Adding costs one hash per item and one per neighbour, and makes no key for an entry that
/// exists (no per-increment string copies).
#[derive(Default)]
pub struct Aggregator {
    pending: AggMap<PendingItem>,
    /// Emptied aggregation maps, reused: one per item and flush would otherwise be allocated
    /// and grown again for nearly every event.
    spare: Vec<AggMap<u64>>,
}

impl Aggregator {
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Add `weight` to `(item, other)` in `pane`; `kg` is the item's key group.
    pub fn add(&mut self, kg: u32, pane: i64, item: &Key, other: &Key, weight: u64) {
        let p = self
            .pending
            .entry_ref(item.as_str())
            .or_insert_with(|| PendingItem {
                kg,
                panes: Vec::new(),
            });
        let others = match p.panes.iter().position(|(p, _)| *p == pane) {
            Some(i) => &mut p.panes[i].1,
            None => {
                p.panes.push((pane, self.spare.pop().unwrap_or_default()));
                &mut p.panes.last_mut().expect("pushed").1
            }
        };
        *others.entry_ref(other.as_str()).or_insert(0) += weight;
    }

    fn drain(spare: &mut Vec<AggMap<u64>>, item: Key, p: PendingItem) -> ItemIncrements {
        let panes = p
            .panes
            .into_iter()
            .map(|(pane, mut others)| {
                let row = others.drain().collect();
                if spare.len() < SPARE_MAPS && others.capacity() <= SPARE_CAPACITY {
                    spare.push(others);
                }
                (pane, row)
            })
            .collect();
        ItemIncrements {
            item,
            kg: p.kg,
            panes,
        }
    }

    /// One item's increments (panes and neighbours in no particular order), if any.
    pub fn take(&mut self, item: &str) -> Option<ItemIncrements> {
        let (item, p) = self.pending.remove_entry(item)?;
        Some(Self::drain(&mut self.spare, item, p))
    }

    /// Every item's increments (in no particular order); the aggregator is empty afterwards.
    pub fn take_all(&mut self) -> impl Iterator<Item = ItemIncrements> + '_ {
        let spare = &mut self.spare;
        self.pending
            .drain()
            .map(move |(item, p)| Self::drain(spare, item, p))
    }
}

impl ItemIncrements {
    /// The number of (pane, other) sums it carries (the exchange's `increments_out`).
    pub fn sums(&self) -> u64 {
        self.panes.iter().map(|(_, o)| o.len() as u64).sum()
    }
}

/// The sending side of one worker for one batch: outboxes per target worker, sorted by key.
pub struct ExchangeWriter<'f> {
    routing: Routing,
    frame: &'f BatchFrame,
    next_crossing: usize,
    pending: Aggregator,
    outboxes: Vec<Vec<Message>>,
    /// Increments sent and aggregated increments flushed, for the exchange's metrics.
    pub increments_in: u64,
    pub increments_out: u64,
}

impl<'f> ExchangeWriter<'f> {
    pub fn new(routing: Routing, frame: &'f BatchFrame) -> Self {
        Self {
            routing,
            frame,
            next_crossing: 0,
            pending: Aggregator::default(),
            outboxes: (0..routing.parallelism).map(|_| Vec::new()).collect(),
            increments_in: 0,
            increments_out: 0,
        }
    }

    /// Flush one item's increments.
    fn flush_item(&mut self, item: &str, key: MsgKey) {
        let Some(incs) = self.pending.take(item) else {
            return;
        };
        self.increments_out += incs.sums();
        let owner = self.routing.owner(incs.kg);
        self.outboxes[owner].push(Message {
            key,
            payload: Payload::Increments(vec![incs]),
        });
    }

    /// Flush everything: one message per target worker.
    fn flush_all(&mut self, key: MsgKey) {
        if self.pending.is_empty() {
            return;
        }
        let mut by_owner: Vec<Vec<ItemIncrements>> = vec![Vec::new(); self.outboxes.len()];
        for incs in self.pending.take_all() {
            self.increments_out += incs.sums();
            by_owner[self.routing.owner(incs.kg)].push(incs);
        }
        for (owner, incs) in by_owner.into_iter().enumerate() {
            if !incs.is_empty() {
                self.outboxes[owner].push(Message {
                    key,
                    payload: Payload::Increments(incs),
                });
            }
        }
    }

    /// End of the batch: flush everything and hand over the outboxes.
    pub fn finish(mut self) -> Outboxes {
        // What is pending predates the first crossing this sender has not passed, which may
        // come from other senders' events: flush right before it (or at the batch end).
        let at = self
            .frame
            .crossings
            .get(self.next_crossing)
            .map_or(self.frame.end_seq, |c| c.seq);
        self.flush_all((at, RANK_CROSSING));
        Outboxes {
            boxes: self.outboxes,
            increments_in: self.increments_in,
            increments_out: self.increments_out,
        }
    }
}

impl Exchange for ExchangeWriter<'_> {
    fn routing(&self) -> Routing {
        self.routing
    }

    fn begin_event(&mut self, seq: u64) {
        let crossings = &self.frame.crossings;
        let mut first_passed = None;
        while self.next_crossing < crossings.len() && crossings[self.next_crossing].seq <= seq {
            first_passed.get_or_insert(crossings[self.next_crossing].seq);
            self.next_crossing += 1;
        }
        // Everything pending predates the first crossing passed (it would have been flushed
        // at an earlier one otherwise), so it belongs right before that crossing.
        if let Some(c) = first_passed {
            self.flush_all((c, RANK_CROSSING));
        }
    }

    fn add(&mut self, kg: u32, pane: i64, item: &Key, other: &Key, weight: u64) {
        self.increments_in += 1;
        self.pending.add(kg, pane, item, other, weight);
    }

    fn request(&mut self, kg: u32, req: RecRequest) {
        let seq = req.seq;
        self.flush_item(&req.event.item_id, (seq, RANK_OWN));
        let owner = self.routing.owner(kg);
        self.outboxes[owner].push(Message {
            key: (seq, RANK_REQUEST),
            payload: Payload::Request {
                kg,
                req: Box::new(req),
            },
        });
    }
}

pub struct Outboxes {
    pub boxes: Vec<Vec<Message>>,
    pub increments_in: u64,
    pub increments_out: u64,
}

/// Merge the inboxes of one receiver (each sorted by key) into one key-ordered stream.
pub fn merge_inboxes(inboxes: Vec<Vec<Message>>) -> impl Iterator<Item = Message> {
    let mut iters: Vec<std::iter::Peekable<std::vec::IntoIter<Message>>> = inboxes
        .into_iter()
        .map(|v| v.into_iter().peekable())
        .collect();
    std::iter::from_fn(move || {
        let mut best: Option<(usize, MsgKey)> = None;
        for (i, it) in iters.iter_mut().enumerate() {
            if let Some(m) = it.peek() {
                if best.is_none_or(|(_, k)| m.key < k) {
                    best = Some((i, m.key));
                }
            }
        }
        best.and_then(|(i, _)| iters[i].next())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;

    fn req(seq: u64, item: &str) -> RecRequest {
        RecRequest {
            seq,
            wm: 0,
            event: Event {
                event_id: "e".into(),
                user_id: "u".into(),
                item_id: item.into(),
                kind: EventType::Click,
                ts: 1,
            },
            weight: 1,
            late: false,
            excluded: vec![],
        }
    }

    #[test]
    fn aggregates_until_a_request_or_crossing_and_keeps_keys_sorted() {
        let frame = BatchFrame {
            end_seq: 10,
            crossings: vec![Crossing { seq: 5, wm: 100 }],
            wm_end: 100,
        };
        let routing = Routing {
            key_groups: 4,
            parallelism: 1,
        };
        let (a, b, c): (Key, Key, Key) = ("a".into(), "b".into(), "c".into());
        let mut x = ExchangeWriter::new(routing, &frame);
        x.begin_event(1);
        x.add(0, 0, &a, &b, 1);
        x.add(1, 0, &b, &a, 1);
        x.add(0, 0, &c, &a, 1);
        x.begin_event(2);
        x.add(0, 0, &a, &b, 2);
        x.add(0, 1, &a, &c, 5);
        // The request flushes its own item only: `c`, of the same key group, stays pending.
        x.request(0, req(2, "a"));
        x.begin_event(6); // passes the crossing at 5: `b` and `c` are flushed there
        x.add(1, 0, &b, &a, 4);
        let out = x.finish();
        let keys: Vec<MsgKey> = out.boxes[0].iter().map(|m| m.key).collect();
        assert_eq!(
            keys,
            [
                (2, RANK_OWN),
                (2, RANK_REQUEST),
                (5, RANK_CROSSING),
                (10, RANK_CROSSING)
            ]
        );
        let incs = |i: usize| {
            let Payload::Increments(adds) = &out.boxes[0][i].payload else {
                panic!("message {i} is not increments")
            };
            let mut adds = adds.clone();
            adds.sort_by(|x, y| x.item.cmp(&y.item));
            adds
        };
        let own = incs(0);
        assert_eq!(own.len(), 1);
        assert_eq!(own[0].item, a);
        assert_eq!(
            own[0].panes,
            [(0, vec![(b.clone(), 3)]), (1, vec![(c.clone(), 5)])],
            "two increments summed"
        );
        let crossing = incs(2);
        assert_eq!(crossing.len(), 2);
        assert_eq!((crossing[0].item.as_str(), crossing[0].kg), ("b", 1));
        assert_eq!((crossing[1].item.as_str(), crossing[1].kg), ("c", 0));
        assert_eq!((out.increments_in, out.increments_out), (6, 5));

        // A sender whose last event precedes a crossing flushes right before that crossing,
        // even though the crossing is another sender's event.
        let mut y = ExchangeWriter::new(routing, &frame);
        y.begin_event(3);
        y.add(1, 0, &b, &a, 1);
        let out = y.finish();
        assert_eq!(out.boxes[0][0].key, (5, RANK_CROSSING));
    }

    use super::super::Crossing;

    #[test]
    fn merge_orders_by_key_across_senders() {
        let m = |k: MsgKey| Message {
            key: k,
            payload: Payload::Increments(vec![]),
        };
        let merged: Vec<MsgKey> = merge_inboxes(vec![
            vec![m((1, 2)), m((4, 0))],
            vec![m((2, 1)), m((4, 2))],
            vec![],
        ])
        .map(|m| m.key)
        .collect();
        assert_eq!(merged, [(1, 2), (2, 1), (4, 0), (4, 2)]);
    }
}
