//! The receiving side of the exchange: per owned key group (= exchange partition) a table of
//! the latest watermark marker of every sender, and the alignment that keeps the item stage
//! exactly on the semantics of docs/semantics.md.
//!
//! **Watermark.** A key group's watermark is the minimum over the senders of its current
//! generation of their latest marker (a missing sender holds it at −∞); the worker's item
//! watermark is the minimum over its key groups, and never goes back.
//!
//! **Alignment.** An event counts in the windows that are not emitted at its `W_e`. Its
//! increments reach a receiver whose watermark may still be below `W_e`, so each item entry
//! is tagged with the emission epoch of the marker that precedes it (senders send a marker at
//! every epoch change, so that is the epoch of its `W_e`) and is applied only once the
//! receiver has emitted exactly the windows of that epoch: earlier entries wait in a
//! per-sender queue. Everything here is deterministic in the order of the partitions' logs,
//! which is what lets recovery rebuild the item state by replaying them.
//!
//! **Generations.** A new generation (a rescale or a restore from a savepoint) appends to the
//! exchange after the previous generation has stopped, so in each partition a frame of a
//! newer generation means the older senders are done there: the table switches to the new
//! generation's senders. Frames of an older generation than the table's are stale (written by
//! a run that continued after the savepoint this one restored) and are skipped.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::wire::{decode_entry, encode_entry, Barrier, Entry, Forwarded, Marker, Sender};
use crate::dataflow::window::{Windowing, WM_MIN};
use crate::state::codec::{put_i64, put_u32, Reader};
use crate::Result;

/// The latest marker of every sender of a generation, as seen in one partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionTable {
    pub gen: u32,
    pub senders: u32,
    pub markers: BTreeMap<u32, Marker>,
}

impl PartitionTable {
    pub fn new(gen: u32, senders: u32) -> Self {
        Self {
            gen,
            senders,
            markers: BTreeMap::new(),
        }
    }

    /// Minimum of the senders' `user_wm` (−∞ while one is missing).
    pub fn watermark(&self) -> i64 {
        (0..self.senders)
            .map(|i| self.markers.get(&i).map_or(WM_MIN, |m| m.user_wm))
            .min()
            .unwrap_or(WM_MIN)
    }

    pub fn encode(&self, v: &mut Vec<u8>) {
        put_u32(v, self.gen);
        put_u32(v, self.senders);
        put_u32(v, self.markers.len() as u32);
        for (i, m) in &self.markers {
            put_u32(v, *i);
            put_i64(v, m.user_wm);
            put_i64(v, m.source_wm);
            v.push(u8::from(m.source_idle));
        }
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let gen = r.u32()?;
        let senders = r.u32()?;
        let n = r.u32()?;
        let mut markers = BTreeMap::new();
        for _ in 0..n {
            let i = r.u32()?;
            markers.insert(
                i,
                Marker {
                    user_wm: r.i64()?,
                    source_wm: r.i64()?,
                    source_idle: r.u8()? != 0,
                },
            );
        }
        Ok(Self {
            gen,
            senders,
            markers,
        })
    }
}

/// One owned exchange partition.
#[derive(Clone, Debug)]
pub struct Inbox {
    pub table: PartitionTable,
    /// The item watermark this key group was restored at (its windows up to here are out).
    pub floor: i64,
    /// Item entries waiting for the receiver's epoch to reach their tag, per (gen, sender).
    queues: BTreeMap<(u32, u32), VecDeque<(i64, Entry)>>,
    /// Barriers of the table's generation seen here: (id, phase, sender).
    barriers: BTreeSet<(String, u8, u32)>,
}

impl Default for Inbox {
    fn default() -> Self {
        Self::new(PartitionTable::default(), WM_MIN)
    }
}

impl Inbox {
    pub fn new(table: PartitionTable, floor: i64) -> Self {
        Self {
            table,
            floor,
            queues: BTreeMap::new(),
            barriers: BTreeSet::new(),
        }
    }

    fn watermark(&self) -> i64 {
        self.table.watermark().max(self.floor)
    }

    pub fn queued(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }

    /// This inbox under a new generation's table and floor (a restore from a savepoint, and
    /// later restores from the savepoint's part): the old senders are done, their queued
    /// entries still apply, their barriers do not.
    pub fn renew(self, table: PartitionTable, floor: i64) -> Self {
        Self {
            queues: self.queues,
            ..Self::new(table, floor)
        }
    }

    /// Snapshot encoding: table, floor and queued entries.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.table.encode(&mut v);
        put_i64(&mut v, self.floor);
        put_u32(&mut v, self.queues.len() as u32);
        for ((gen, sender), q) in &self.queues {
            put_u32(&mut v, *gen);
            put_u32(&mut v, *sender);
            put_u32(&mut v, q.len() as u32);
            for (tag, e) in q {
                put_i64(&mut v, *tag);
                encode_entry(&mut v, e);
            }
        }
        v
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        let table = PartitionTable::decode(&mut r)?;
        let floor = r.i64()?;
        let mut queues = BTreeMap::new();
        for _ in 0..r.u32()? {
            let key = (r.u32()?, r.u32()?);
            let n = r.u32()?;
            let mut q = VecDeque::with_capacity(n as usize);
            for _ in 0..n {
                let tag = r.i64()?;
                q.push_back((tag, decode_entry(&mut r)?));
            }
            queues.insert(key, q);
        }
        Ok(Self {
            table,
            floor,
            queues,
            barriers: BTreeSet::new(),
        })
    }
}

/// What the receiver hands to the worker, in order.
#[derive(Debug)]
pub enum Delivery {
    /// An event for the user stage (not aligned: the user stage stamps it itself).
    Forward(u32, Box<Forwarded>),
    /// An increments or request entry for the item stage, of key group `.0`.
    Item(u32, Entry),
    /// Advance the item stage to this watermark (emitting the windows it completes).
    Advance(i64),
    /// A savepoint barrier arrived from `sender` in key group `.0`.
    Barrier(u32, u32, Barrier),
}

pub struct Receiver {
    windowing: Windowing,
    inboxes: BTreeMap<u32, Inbox>,
    /// The item watermark delivered so far (entries tagged up to its epoch are applied).
    wm: i64,
    /// Frames skipped because an older generation wrote them.
    pub stale_frames: u64,
}

impl Receiver {
    /// `wm` is the item watermark to resume from (the minimum of the restored floors).
    pub fn new(windowing: Windowing, inboxes: BTreeMap<u32, Inbox>, wm: i64) -> Self {
        Self {
            windowing,
            inboxes,
            wm,
            stale_frames: 0,
        }
    }

    pub fn watermark(&self) -> i64 {
        self.wm
    }

    pub fn inboxes(&self) -> &BTreeMap<u32, Inbox> {
        &self.inboxes
    }

    pub fn queued(&self) -> usize {
        self.inboxes.values().map(Inbox::queued).sum()
    }

    /// Take in one frame read from key group `kg`'s partition.
    pub fn push(&mut self, kg: u32, from: Sender, entries: Vec<Entry>, out: &mut Vec<Delivery>) {
        let epoch = self.windowing.epoch(self.wm);
        let windowing = self.windowing;
        let inbox = self.inboxes.entry(kg).or_default();
        if from.gen < inbox.table.gen {
            self.stale_frames += 1;
            return;
        }
        if from.gen > inbox.table.gen {
            inbox.table = PartitionTable::new(from.gen, from.senders);
            inbox.barriers.clear();
        }
        for entry in entries {
            match entry {
                Entry::Marker(m) => {
                    inbox.table.markers.insert(from.index, m);
                }
                Entry::Forward(f) => out.push(Delivery::Forward(kg, f)),
                Entry::Barrier(b) => {
                    inbox.barriers.insert((b.id.clone(), b.phase, from.index));
                    out.push(Delivery::Barrier(kg, from.index, b));
                }
                item => {
                    let tag = inbox
                        .table
                        .markers
                        .get(&from.index)
                        .map_or(i64::MIN, |m| windowing.epoch(m.user_wm));
                    let q = inbox.queues.entry((from.gen, from.index)).or_default();
                    if q.is_empty() && tag <= epoch {
                        out.push(Delivery::Item(kg, item));
                    } else {
                        q.push_back((tag, item));
                    }
                }
            }
        }
    }

    /// Raise key groups' floors (to their committed item watermarks after a replay).
    pub fn raise_floors(&mut self, floors: &crate::dataflow::FastMap<u32, i64>) {
        for (kg, f) in floors {
            if let Some(i) = self.inboxes.get_mut(kg) {
                i.floor = i.floor.max(*f);
            }
        }
    }

    /// The watermark the partitions allow now.
    pub fn target(&self) -> i64 {
        let min = self
            .inboxes
            .values()
            .map(Inbox::watermark)
            .min()
            .unwrap_or(WM_MIN);
        self.wm.max(min)
    }

    /// Advance to the partitions' watermark, releasing queued entries epoch by epoch: the
    /// item stage first emits the windows of an entry's epoch, then applies it.
    pub fn advance(&mut self, out: &mut Vec<Delivery>) {
        let target = self.target();
        let w = self.windowing;
        let last_epoch = w.epoch(target);
        loop {
            let next = self
                .inboxes
                .values()
                .flat_map(|i| i.queues.values())
                .filter_map(|q| q.front().map(|(tag, _)| *tag))
                .min();
            let Some(tag) = next.filter(|t| *t <= last_epoch) else {
                break;
            };
            // The smallest watermark whose epoch is `tag`.
            let step = tag
                .saturating_mul(w.slide)
                .saturating_add(w.lateness)
                .max(self.wm);
            if step > self.wm {
                out.push(Delivery::Advance(step));
                self.wm = step;
            }
            for (kg, inbox) in &mut self.inboxes {
                for q in inbox.queues.values_mut() {
                    while q.front().is_some_and(|(t, _)| *t <= tag) {
                        let (_, e) = q.pop_front().expect("front exists");
                        out.push(Delivery::Item(*kg, e));
                    }
                }
                inbox.queues.retain(|_, q| !q.is_empty());
            }
        }
        if target > self.wm {
            out.push(Delivery::Advance(target));
            self.wm = target;
        }
    }

    /// Whether every owned partition has barrier `(id, phase)` from every sender of
    /// generation `gen`.
    pub fn barrier_complete(&self, id: &str, phase: u8, gen: u32) -> bool {
        self.inboxes.values().all(|i| {
            i.table.gen == gen
                && (0..i.table.senders).all(|s| i.barriers.contains(&(id.to_string(), phase, s)))
        })
    }

    /// The other senders' source watermarks, as the user stage must see them: for each
    /// sender, the lowest among its latest markers in the owned partitions (a forwarded event
    /// still in a lagging partition was read before that partition's marker). A sender counts
    /// as idle only if every partition's latest marker says so. `me` is left out.
    pub fn remote_source_watermark(&self, me: u32) -> RemoteSources {
        // (gen, sender) → lowest source watermark among active markers, and among idle ones.
        let mut senders: BTreeMap<(u32, u32), (Option<i64>, Option<i64>)> = BTreeMap::new();
        let lower = |a: Option<i64>, b: i64| Some(a.map_or(b, |a| a.min(b)));
        for inbox in self.inboxes.values() {
            let t = &inbox.table;
            for s in (0..t.senders).filter(|s| *s != me) {
                let slot = senders.entry((t.gen, s)).or_default();
                match t.markers.get(&s) {
                    None => slot.0 = lower(slot.0, WM_MIN), // not heard of here yet: holds back
                    Some(m) if m.source_idle => slot.1 = lower(slot.1, m.source_wm),
                    Some(m) => slot.0 = lower(slot.0, m.source_wm),
                }
            }
        }
        let mut remote = RemoteSources::default();
        for (active, idle) in senders.into_values() {
            match (active, idle) {
                (Some(wm), _) => remote.active = lower(remote.active, wm),
                // An idle sender that never had data says nothing about event time.
                (None, Some(wm)) if wm > WM_MIN => remote.idle = lower(remote.idle, wm),
                _ => {}
            }
        }
        remote
    }
}

/// The other workers' sources, as markers last described them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteSources {
    /// Lowest source watermark among the senders that are not idle, if any.
    pub active: Option<i64>,
    /// Lowest source watermark among idle senders that have had data.
    pub idle: Option<i64>,
}

impl RemoteSources {
    /// Before any marker arrived, the others are unknown: they hold the watermark back.
    pub const UNKNOWN: Self = Self {
        active: Some(WM_MIN),
        idle: None,
    };
}

/// The by-user stage's watermark candidate from the local source (`local`, and whether any
/// local partition is active) and the other workers' sources: the minimum over the active
/// ones; when every source of the job is idle, the minimum over those that had data (as an
/// idle partition stops holding back only while another one makes progress, and then the
/// data already read is the only evidence of event time); `None` to hold.
pub fn user_watermark(local: i64, local_active: bool, remote: RemoteSources) -> Option<i64> {
    match (local_active, remote.active) {
        (true, Some(r)) => Some(local.min(r)),
        (true, None) => Some(local),
        (false, Some(r)) => Some(r),
        (false, None) => [Some(local).filter(|l| *l > WM_MIN), remote.idle]
            .into_iter()
            .flatten()
            .min(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataflow::exchange::RecRequest;
    use crate::dataflow::window::WM_MAX;
    use crate::event::{Event, EventType};

    const S: i64 = 60_000;

    fn windowing() -> Windowing {
        Windowing {
            slide: S,
            size: 10 * S,
            lateness: 0,
        }
    }

    fn marker(wm: i64) -> Entry {
        Entry::Marker(Marker {
            user_wm: wm,
            source_wm: wm,
            source_idle: false,
        })
    }

    fn req(seq: u64) -> Entry {
        Entry::Request(Box::new(RecRequest {
            seq,
            wm: 0,
            event: Event {
                event_id: format!("e{seq}").into(),
                user_id: "u".into(),
                item_id: "i".into(),
                kind: EventType::View,
                ts: 1,
            },
            weight: 1,
            late: false,
            excluded: vec![],
        }))
    }

    fn sender(index: u32) -> Sender {
        Sender {
            gen: 1,
            index,
            senders: 2,
        }
    }

    fn receiver() -> Receiver {
        let inboxes = [(0, Inbox::new(PartitionTable::new(1, 2), WM_MIN))].into();
        Receiver::new(windowing(), inboxes, WM_MIN)
    }

    fn names(out: &[Delivery]) -> Vec<String> {
        out.iter()
            .map(|d| match d {
                Delivery::Item(_, Entry::Request(r)) => format!("req{}", r.seq),
                Delivery::Advance(wm) => format!("adv{}", wm / S),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn an_entry_ahead_of_the_receiver_waits_for_its_epoch() {
        let mut r = receiver();
        let mut out = Vec::new();
        // Sender 0 is at epoch 3, sender 1 at epoch 1: the receiver is at epoch 1.
        r.push(0, sender(0), vec![marker(3 * S), req(1)], &mut out);
        r.push(0, sender(1), vec![marker(S), req(2)], &mut out);
        r.advance(&mut out);
        assert_eq!(names(&out), ["adv1", "req2"], "req1 (epoch 3) waits");
        out.clear();
        // Sender 1 moves to epoch 5: windows of epoch 3 are emitted before req1 applies;
        // req3 (epoch 5) waits for sender 0.
        r.push(0, sender(1), vec![marker(5 * S), req(3)], &mut out);
        r.advance(&mut out);
        assert_eq!(names(&out), ["adv3", "req1"]);
        assert_eq!(r.watermark(), 3 * S, "min(3, 5)");
        assert_eq!(r.queued(), 1);
        out.clear();
        // Entries behind a queued one keep their sender's order; the receiver moves to 4.
        r.push(0, sender(1), vec![marker(9 * S), req(4)], &mut out);
        r.push(0, sender(0), vec![marker(4 * S), req(5)], &mut out);
        r.advance(&mut out);
        assert_eq!(names(&out), ["adv4", "req5"]);
        assert_eq!(
            r.queued(),
            2,
            "req3 (epoch 5) and req4 (epoch 9) wait for sender 0"
        );
        out.clear();
        r.push(0, sender(0), vec![marker(20 * S)], &mut out);
        r.advance(&mut out);
        assert_eq!(names(&out), ["adv5", "req3", "adv9", "req4"]);
    }

    #[test]
    fn queues_survive_a_snapshot_and_a_new_generation_takes_over() {
        let mut r = receiver();
        let mut out = Vec::new();
        r.push(0, sender(0), vec![marker(3 * S), req(1)], &mut out);
        r.push(0, sender(1), vec![marker(S)], &mut out);
        r.advance(&mut out);
        let inbox = Inbox::decode(&r.inboxes()[&0].encode()).unwrap();
        assert_eq!(inbox.queued(), 1);
        assert_eq!(inbox.table, r.inboxes()[&0].table);
        // Renewed for generation 2 (a restore from a savepoint): the queued entry stays.
        let renewed = inbox.clone().renew(PartitionTable::new(2, 1), S);
        assert_eq!((renewed.queued(), renewed.floor), (1, S));
        assert_eq!(renewed.table, PartitionTable::new(2, 1));
        let mut r = Receiver::new(windowing(), [(0, inbox)].into(), r.watermark());
        out.clear();
        // Generation 2 (one worker) starts: generation 1 is done in this partition; its
        // queued entry is released once the new sender's marker passes its epoch.
        let g2 = Sender {
            gen: 2,
            index: 0,
            senders: 1,
        };
        r.push(0, g2, vec![marker(4 * S), req(7)], &mut out);
        r.advance(&mut out);
        assert_eq!(names(&out), ["adv3", "req1", "adv4", "req7"]);
        // A stale frame of generation 1 is skipped.
        out.clear();
        r.push(0, sender(1), vec![marker(WM_MAX), req(8)], &mut out);
        assert!(out.is_empty());
        assert_eq!(r.stale_frames, 1);
    }

    #[test]
    fn barriers_complete_when_every_sender_sent_them() {
        let mut r = receiver();
        let mut out = Vec::new();
        let b = Entry::Barrier(Barrier {
            id: "sp".into(),
            phase: 1,
            stop: false,
        });
        r.push(0, sender(0), vec![b.clone()], &mut out);
        assert!(!r.barrier_complete("sp", 1, 1));
        r.push(0, sender(1), vec![b], &mut out);
        assert!(r.barrier_complete("sp", 1, 1));
        assert!(!r.barrier_complete("sp", 2, 1));
    }

    #[test]
    fn remote_source_watermark_takes_each_senders_lowest_marker() {
        let inboxes = [
            (0, Inbox::new(PartitionTable::new(1, 3), WM_MIN)),
            (1, Inbox::new(PartitionTable::new(1, 3), WM_MIN)),
        ]
        .into();
        let mut r = Receiver::new(windowing(), inboxes, WM_MIN);
        let mut out = Vec::new();
        let s = |i| Sender {
            gen: 1,
            index: i,
            senders: 3,
        };
        assert_eq!(
            r.remote_source_watermark(0),
            RemoteSources::UNKNOWN,
            "unknown senders"
        );
        for kg in 0..2 {
            r.push(kg, s(1), vec![marker(100)], &mut out);
            r.push(
                kg,
                s(2),
                vec![Entry::Marker(Marker {
                    user_wm: 0,
                    source_wm: 5,
                    source_idle: true,
                })],
                &mut out,
            );
        }
        r.push(0, s(1), vec![marker(300)], &mut out);
        assert_eq!(
            r.remote_source_watermark(0),
            RemoteSources {
                active: Some(100),
                idle: Some(5)
            },
            "partition 1 still has sender 1's older marker; sender 2 is idle"
        );
        // A sender restarted from its committed state may send a lower source watermark
        // (idle partitions became active again): the lower one counts.
        r.push(0, s(1), vec![marker(90)], &mut out);
        assert_eq!(r.remote_source_watermark(0).active, Some(90));
        r.push(0, s(1), vec![marker(300)], &mut out);
        r.push(1, s(1), vec![marker(300)], &mut out);
        assert_eq!(r.remote_source_watermark(0).active, Some(300));
    }

    #[test]
    fn user_watermark_is_the_min_over_active_sources_and_follows_the_data_when_all_idle() {
        let r = |active, idle| RemoteSources { active, idle };
        assert_eq!(user_watermark(50, true, r(Some(80), None)), Some(50));
        assert_eq!(user_watermark(50, true, r(None, Some(10))), Some(50));
        assert_eq!(user_watermark(50, false, r(Some(80), Some(10))), Some(80));
        // Everything idle: the sources that had data decide; none had data: hold.
        assert_eq!(user_watermark(50, false, r(None, Some(70))), Some(50));
        assert_eq!(user_watermark(WM_MIN, false, r(None, Some(70))), Some(70));
        assert_eq!(user_watermark(WM_MIN, false, r(None, None)), None);
        assert_eq!(
            user_watermark(WM_MIN, true, RemoteSources::UNKNOWN),
            Some(WM_MIN),
            "unknown senders hold back"
        );
    }
}
