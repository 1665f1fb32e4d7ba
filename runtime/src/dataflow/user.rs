//! The user-keyed stage: per-user history → co-visitation increments and a recommendation
//! request per event.

use std::collections::VecDeque;

use super::exchange::{Exchange, RecRequest};
use super::window::Windowing;
use super::{FastMap, Key, Stamped};
use crate::event::EventType;
use crate::state::{codec, StateDescriptor, StateOp};

/// The user stage's only state: histories.
pub const HISTORIES: StateDescriptor = StateDescriptor {
    name: "histories",
    tag: b'U',
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistEntry {
    pub item: Key,
    pub item_kg: u32,
    pub ts: i64,
    pub kind: EventType,
}

#[derive(Clone, Debug, Default)]
struct History {
    entries: VecDeque<HistEntry>,
    kg: u32,
    dirty: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct UserParams {
    pub history_length: usize,
    pub session_gap: i64,
    pub exclude_purchased: bool,
    pub windowing: Windowing,
}

pub struct UserStage {
    params: UserParams,
    histories: FastMap<Key, History>,
    /// Users whose history was deleted since the last snapshot (their keys must go too).
    deleted: Vec<(u32, Key)>,
}

impl UserStage {
    pub fn new(params: UserParams) -> Self {
        Self {
            params,
            histories: FastMap::default(),
            deleted: Vec::new(),
        }
    }

    pub fn users(&self) -> usize {
        self.histories.len()
    }

    /// Apply one event (in read order for this user) and send its increments and request.
    /// Returns whether the event was late (it then contributes nothing, see the semantics).
    pub fn process(&mut self, ev: &Stamped, user_kg: u32, x: &mut impl Exchange) -> bool {
        x.begin_event(ev.seq);
        let p = self.params;
        let win = p.windowing;
        let e = &ev.event;
        let t = e.ts;
        let late = win.is_late(t, ev.wm);
        let valid = |h: &HistEntry| {
            Windowing::history_entry_valid(h.ts, t, ev.wm, p.session_gap, win.lateness)
        };
        let routing = x.routing();
        let item_kg = routing.key_group(e.item_id.as_bytes());
        let hist = self
            .histories
            .entry(e.user_id.clone())
            .or_insert_with(|| History {
                kg: user_kg,
                ..History::default()
            });
        if !late {
            let pane = win.pane(t);
            let w = u64::from(ev.weight);
            for h in hist.entries.iter().filter(|h| valid(h)) {
                x.add(item_kg, pane, &e.item_id, &h.item, w);
                x.add(h.item_kg, pane, &h.item, &e.item_id, w);
            }
        }
        hist.entries.push_back(HistEntry {
            item: e.item_id.clone(),
            item_kg,
            ts: t,
            kind: e.kind,
        });
        while hist.entries.len() > p.history_length {
            hist.entries.pop_front();
        }
        hist.dirty = true;
        let mut excluded: Vec<Key> = Vec::new();
        if p.exclude_purchased {
            for h in hist
                .entries
                .iter()
                .filter(|h| h.kind == EventType::Purchase && valid(h))
            {
                if !excluded.contains(&h.item) {
                    excluded.push(h.item.clone());
                }
            }
        }
        x.request(
            item_kg,
            RecRequest {
                seq: ev.seq,
                wm: ev.wm,
                event: e.clone(),
                weight: ev.weight,
                late,
                excluded,
            },
        );
        late
    }

    /// Append an entry to a user's history without producing anything: recovery replays the
    /// changelog of history appends through this.
    pub fn replay_append(&mut self, user_kg: u32, user: &str, entry: HistEntry) {
        let n = self.params.history_length;
        let hist = self
            .histories
            .entry(Key::from(user))
            .or_insert_with(|| History {
                kg: user_kg,
                ..History::default()
            });
        hist.entries.push_back(entry);
        while hist.entries.len() > n {
            hist.entries.pop_front();
        }
        hist.dirty = true;
    }

    /// Drop histories whose entries are all expired at watermark `wm`.
    pub fn expire(&mut self, wm: i64) {
        let bound = wm
            .saturating_sub(self.params.session_gap)
            .saturating_sub(self.params.windowing.lateness);
        let deleted = &mut self.deleted;
        self.histories.retain(|user, h| {
            let keep = h.entries.iter().any(|e| e.ts >= bound);
            if !keep {
                deleted.push((h.kg, user.clone()));
            }
            keep
        });
    }

    /// State changes since the last snapshot.
    pub fn snapshot(&mut self, ops: &mut Vec<StateOp>) {
        for (kg, user) in self.deleted.drain(..) {
            ops.push(StateOp::Delete(codec::state_key(
                kg,
                HISTORIES.tag,
                user.as_bytes(),
            )));
        }
        for (user, h) in self.histories.iter_mut().filter(|(_, h)| h.dirty) {
            h.dirty = false;
            let mut v = Vec::with_capacity(h.entries.len() * 24);
            codec::put_u32(&mut v, h.entries.len() as u32);
            for e in &h.entries {
                codec::put_str(&mut v, &e.item);
                codec::put_u32(&mut v, e.item_kg);
                codec::put_i64(&mut v, e.ts);
                v.push(e.kind.as_u8());
            }
            ops.push(StateOp::Put(
                codec::state_key(h.kg, HISTORIES.tag, user.as_bytes()),
                v,
            ));
        }
    }

    /// Load one history written by [`snapshot`](Self::snapshot).
    pub fn restore(&mut self, kg: u32, user: &[u8], value: &[u8]) -> crate::Result<()> {
        let mut r = codec::Reader::new(value);
        let n = r.u32()? as usize;
        let mut entries = VecDeque::with_capacity(n);
        for _ in 0..n {
            let item = Key::from(r.str()?);
            let item_kg = r.u32()?;
            let ts = r.i64()?;
            let kind = EventType::from_u8(r.u8()?)
                .ok_or_else(|| crate::Error::CorruptState("bad event type in history".into()))?;
            entries.push_back(HistEntry {
                item,
                item_kg,
                ts,
                kind,
            });
        }
        let user = std::str::from_utf8(user)
            .map_err(|_| crate::Error::CorruptState("user key is not UTF-8".into()))?;
        self.histories.insert(
            Key::from(user),
            History {
                entries,
                kg,
                dirty: false,
            },
        );
        Ok(())
    }
}
