//! The exchange topic's record format: one record carries a *frame*, everything one sender
//! had for one target key group (= partition) in one commit, in the sender's order.
//!
//! ```text
//! frame   := MAGIC version:u8 gen:u32 sender:u32 senders:u32 count:u32 entry*
//! entry   := tag:u8 body
//! ```
//! Integers are little-endian, strings are length-prefixed UTF-8. Kafka compresses batches,
//! so the format favours simplicity over bit-packing.

use crate::dataflow::exchange::RecRequest;
use crate::dataflow::Key;
use crate::event::{Event, EventType};
use crate::state::codec::{put_i64, put_str, put_u32, put_u64, Reader};

const MAGIC: u8 = 0xF7;
const VERSION: u8 = 1;

const TAG_INCREMENTS: u8 = 1;
const TAG_REQUEST: u8 = 2;
const TAG_FORWARD: u8 = 3;
const TAG_MARKER: u8 = 4;
const TAG_BARRIER: u8 = 5;

/// Who sent a frame: the sender's generation, its worker index and its generation's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sender {
    pub gen: u32,
    pub index: u32,
    pub senders: u32,
}

/// Where an input record came from (dead-letter and late headers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// Index into the job's input topics.
    pub topic: u32,
    pub partition: i32,
    pub offset: i64,
}

/// A sender's watermark promise: every later item-stage entry it sends was stamped with
/// `W_e ≥ user_wm`, and every later event it forwards was read at a source watermark
/// `≥ source_wm` (unless `source_idle`: all of its input partitions are idle). Within a
/// partition the log order says which marker is the latest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Marker {
    pub user_wm: i64,
    pub source_wm: i64,
    pub source_idle: bool,
}

/// Savepoint barriers: phase 1 closes the forwarding hop, phase 2 the item hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Barrier {
    pub id: String,
    pub phase: u8,
    pub stop: bool,
}

/// An event read by a worker that does not own its user, on its way to the owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forwarded {
    pub event: Event,
    pub origin: Origin,
}

/// Pre-aggregated increments of one pane: `(item, [(other, weight)])` for items of the
/// frame's key group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaneIncrements {
    pub pane: i64,
    pub rows: Vec<(Key, Vec<(Key, u64)>)>,
}

#[derive(Clone, Debug)]
pub enum Entry {
    Increments(PaneIncrements),
    Request(Box<RecRequest>),
    Forward(Box<Forwarded>),
    Marker(Marker),
    Barrier(Barrier),
}

impl Entry {
    /// Entries the item stage applies (and the receiver aligns to its watermark epoch).
    pub fn is_item_input(&self) -> bool {
        matches!(self, Entry::Increments(_) | Entry::Request(_))
    }
}

fn put_event(v: &mut Vec<u8>, e: &Event) {
    put_str(v, &e.event_id);
    put_str(v, &e.user_id);
    put_str(v, &e.item_id);
    v.push(e.kind.as_u8());
    put_i64(v, e.ts);
}

fn read_event(r: &mut Reader<'_>) -> Result<Event, crate::Error> {
    Ok(Event {
        event_id: r.str()?.into(),
        user_id: r.str()?.into(),
        item_id: r.str()?.into(),
        kind: EventType::from_u8(r.u8()?)
            .ok_or_else(|| crate::Error::CorruptState("bad event type".into()))?,
        ts: r.i64()?,
    })
}

pub fn encode_entry(v: &mut Vec<u8>, e: &Entry) {
    match e {
        Entry::Increments(p) => {
            v.push(TAG_INCREMENTS);
            put_i64(v, p.pane);
            put_u32(v, p.rows.len() as u32);
            for (item, others) in &p.rows {
                put_str(v, item);
                put_u32(v, others.len() as u32);
                for (other, w) in others {
                    put_str(v, other);
                    put_u64(v, *w);
                }
            }
        }
        Entry::Request(r) => {
            v.push(TAG_REQUEST);
            put_u64(v, r.seq);
            put_i64(v, r.wm);
            put_event(v, &r.event);
            put_u32(v, r.weight);
            v.push(u8::from(r.late));
            put_u32(v, r.excluded.len() as u32);
            for x in &r.excluded {
                put_str(v, x);
            }
        }
        Entry::Forward(f) => {
            v.push(TAG_FORWARD);
            put_event(v, &f.event);
            put_u32(v, f.origin.topic);
            put_u32(v, f.origin.partition as u32);
            put_i64(v, f.origin.offset);
        }
        Entry::Marker(m) => {
            v.push(TAG_MARKER);
            put_i64(v, m.user_wm);
            put_i64(v, m.source_wm);
            v.push(u8::from(m.source_idle));
        }
        Entry::Barrier(b) => {
            v.push(TAG_BARRIER);
            put_str(v, &b.id);
            v.push(b.phase);
            v.push(u8::from(b.stop));
        }
    }
}

pub fn decode_entry(r: &mut Reader<'_>) -> Result<Entry, crate::Error> {
    Ok(match r.u8()? {
        TAG_INCREMENTS => {
            let pane = r.i64()?;
            let n = r.u32()? as usize;
            let mut rows = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                let item = Key::from(r.str()?);
                let m = r.u32()? as usize;
                let mut others = Vec::with_capacity(m.min(1 << 16));
                for _ in 0..m {
                    others.push((Key::from(r.str()?), r.u64()?));
                }
                rows.push((item, others));
            }
            Entry::Increments(PaneIncrements { pane, rows })
        }
        TAG_REQUEST => {
            let seq = r.u64()?;
            let wm = r.i64()?;
            let event = read_event(r)?;
            let weight = r.u32()?;
            let late = r.u8()? != 0;
            let n = r.u32()? as usize;
            let mut excluded = Vec::with_capacity(n.min(1 << 10));
            for _ in 0..n {
                excluded.push(Key::from(r.str()?));
            }
            Entry::Request(Box::new(RecRequest {
                seq,
                wm,
                event,
                weight,
                late,
                excluded,
            }))
        }
        TAG_FORWARD => Entry::Forward(Box::new(Forwarded {
            event: read_event(r)?,
            origin: Origin {
                topic: r.u32()?,
                partition: r.u32()? as i32,
                offset: r.i64()?,
            },
        })),
        TAG_MARKER => Entry::Marker(Marker {
            user_wm: r.i64()?,
            source_wm: r.i64()?,
            source_idle: r.u8()? != 0,
        }),
        TAG_BARRIER => Entry::Barrier(Barrier {
            id: r.str()?.to_string(),
            phase: r.u8()?,
            stop: r.u8()? != 0,
        }),
        other => {
            return Err(crate::Error::CorruptState(format!(
                "unknown exchange entry tag {other}"
            )))
        }
    })
}

pub fn encode_frame(sender: Sender, entries: &[Entry]) -> Vec<u8> {
    encode_frames(sender, entries, usize::MAX)
        .pop()
        .expect("one frame")
}

/// Frames of at most about `max_bytes` each (Kafka refuses records over its
/// `message.max.bytes`), in order: one entry never spans two frames.
pub fn encode_frames(sender: Sender, entries: &[Entry], max_bytes: usize) -> Vec<Vec<u8>> {
    let frame = |body: &[u8], count: u32| {
        let mut v = Vec::with_capacity(18 + body.len());
        v.push(MAGIC);
        v.push(VERSION);
        put_u32(&mut v, sender.gen);
        put_u32(&mut v, sender.index);
        put_u32(&mut v, sender.senders);
        put_u32(&mut v, count);
        v.extend_from_slice(body);
        v
    };
    let mut frames = Vec::new();
    let mut body = Vec::new();
    let mut count = 0u32;
    for e in entries {
        let before = body.len();
        encode_entry(&mut body, e);
        if body.len() > max_bytes && count > 0 {
            // This entry starts the next frame.
            let tail = body.split_off(before);
            frames.push(frame(&body, count));
            body = tail;
            count = 0;
        }
        count += 1;
    }
    if count > 0 || frames.is_empty() {
        frames.push(frame(&body, count));
    }
    frames
}

pub fn decode_frame(bytes: &[u8]) -> Result<(Sender, Vec<Entry>), crate::Error> {
    let bad = |m: &str| crate::Error::CorruptState(format!("exchange frame: {m}"));
    if bytes.len() < 2 || bytes[0] != MAGIC {
        return Err(bad("not a Riffle exchange frame"));
    }
    if bytes[1] != VERSION {
        return Err(bad(&format!("unsupported version {}", bytes[1])));
    }
    let mut r = Reader::new(&bytes[2..]);
    let sender = Sender {
        gen: r.u32()?,
        index: r.u32()?,
        senders: r.u32()?,
    };
    let n = r.u32()? as usize;
    let mut entries = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        entries.push(decode_entry(&mut r)?);
    }
    Ok((sender, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let ev = Event {
            event_id: "e1".into(),
            user_id: "u1".into(),
            item_id: "i1".into(),
            kind: EventType::Cart,
            ts: 42,
        };
        let entries = vec![
            Entry::Marker(Marker {
                user_wm: i64::MIN,
                source_wm: 7,
                source_idle: true,
            }),
            Entry::Increments(PaneIncrements {
                pane: -2,
                rows: vec![("i1".into(), vec![("i2".into(), 5), ("i3".into(), 1)])],
            }),
            Entry::Request(Box::new(RecRequest {
                seq: 9,
                wm: 100,
                event: ev.clone(),
                weight: 3,
                late: false,
                excluded: vec!["i9".into()],
            })),
            Entry::Forward(Box::new(Forwarded {
                event: ev,
                origin: Origin {
                    topic: 1,
                    partition: 4,
                    offset: 77,
                },
            })),
            Entry::Barrier(Barrier {
                id: "sp-1".into(),
                phase: 2,
                stop: true,
            }),
        ];
        let sender = Sender {
            gen: 2,
            index: 1,
            senders: 3,
        };
        let bytes = encode_frame(sender, &entries);
        let (s, back) = decode_frame(&bytes).unwrap();
        assert_eq!(s, sender);
        assert_eq!(format!("{back:?}"), format!("{entries:?}"));
        assert!(
            decode_frame(&bytes[..bytes.len() - 1]).is_err(),
            "truncated"
        );
        assert!(decode_frame(b"{\"json\":1}").is_err(), "foreign record");
    }

    #[test]
    fn frames_split_between_entries_and_keep_their_order() {
        let sender = Sender {
            gen: 1,
            index: 0,
            senders: 1,
        };
        let marker = |t: i64| {
            Entry::Marker(Marker {
                user_wm: t,
                source_wm: t,
                source_idle: false,
            })
        };
        // A marker is 18 bytes encoded; one row of 50 neighbours is well over 100.
        let big = Entry::Increments(PaneIncrements {
            pane: 0,
            rows: vec![(
                "i".into(),
                (0..50).map(|n| (Key::from(format!("n{n}")), 1)).collect(),
            )],
        });
        let entries = vec![
            big.clone(),
            marker(1),
            marker(2),
            marker(3),
            big,
            marker(4),
            marker(5),
        ];
        let frames = encode_frames(sender, &entries, 40);
        let mut back = Vec::new();
        let mut counts = Vec::new();
        for f in &frames {
            let (s, es) = decode_frame(f).unwrap();
            assert_eq!(s, sender);
            counts.push(es.len());
            back.extend(es);
        }
        assert_eq!(format!("{back:?}"), format!("{entries:?}"));
        // Two markers fit in 40 bytes, three do not; the big row stands alone (and the first
        // frame is not an empty one before it).
        assert_eq!(counts, [1, 2, 1, 1, 2]);

        let empty = encode_frames(sender, &[], 40);
        assert_eq!(empty.len(), 1, "no entries: one empty frame");
        assert!(decode_frame(&empty[0]).unwrap().1.is_empty());
    }
}
