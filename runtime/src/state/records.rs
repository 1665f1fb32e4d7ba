//! How the dataflow's state is laid out in RocksDB: keys `[key group: u16 BE][tag][rest]`
//! (one prefix scan per key group and tag; rescaling re-routes whole key groups) and compact
//! binary values with item ids as strings, so stored state needs no dictionary.
//!
//! - histories: `(kg, 'U', user)` → `n (item:str item_kg ts_delta:zigzag type:u8)*`;
//! - pane entries: `(kg, 'P', pane as ordered i64, item)` → `pop n (item:str w)*`;
//!
//! Integers are LEB128 varints, strings a varint length and their bytes, and a history's
//! timestamps differences from the entry before (the first from 0).
//! - job-wide operator state (the local engine's trending board) under a key group no job
//!   has (`JOB_KG`): `(JOB_KG, 'J', name)` → the operator's own encoding.

use std::collections::VecDeque;
use std::ops::Range;

use riffle_dataflow::event::EventType;
use riffle_dataflow::store::PaneVisitor;
use riffle_dataflow::user::HistEntry;
use riffle_dataflow::Key;

use super::codec::{self, Reader};
use super::{StateDescriptor, StateOp};
use crate::{Error, Result};

/// How values are encoded; checkpoint and part manifests record it, and a restore refuses a
/// format it does not read. 1: fixed-width integers and string lengths (up to 6c83449);
/// 2: varints, history timestamps as differences.
pub const STATE_FORMAT: u32 = 2;

/// The format of a manifest that does not say (written before manifests recorded it).
pub fn unrecorded_state_format() -> u32 {
    1
}

/// Refuse state of another format than [`STATE_FORMAT`], naming what holds it.
pub fn check_state_format(format: u32, what: &str) -> Result<()> {
    if format == STATE_FORMAT {
        return Ok(());
    }
    Err(Error::Checkpoint(format!(
        "{what} holds state format {format}, this build reads format {STATE_FORMAT}: restore it with the Riffle release that wrote it, or start the job without it"
    )))
}

/// The user stage's state: histories.
pub const HISTORIES: StateDescriptor = StateDescriptor {
    name: "histories",
    tag: b'U',
};

/// The item stage's state: per (pane, item) popularity and co-visitation row.
pub const PANES: StateDescriptor = StateDescriptor {
    name: "panes",
    tag: b'P',
};

/// Job-wide operator state, not keyed by anything a key group owns.
pub const JOB: StateDescriptor = StateDescriptor {
    name: "job",
    tag: b'J',
};

/// The key group of job-wide state: above every job's key groups (at most 32,768).
pub const JOB_KG: u32 = u16::MAX as u32;

pub fn job_state_key(name: &str) -> Vec<u8> {
    codec::state_key(JOB_KG, JOB.tag, name.as_bytes())
}

pub fn history_key(kg: u32, user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + user.len());
    write_history_key(&mut k, kg, user);
    k
}

/// Append a history's key to `out`.
pub fn write_history_key(out: &mut Vec<u8>, kg: u32, user: &str) {
    codec::write_key_head(out, kg, HISTORIES.tag);
    out.extend_from_slice(user.as_bytes());
}

/// Append a history's value to `out`.
pub fn write_history(out: &mut Vec<u8>, entries: &VecDeque<HistEntry>) {
    out.reserve(1 + entries.len() * 16);
    codec::put_var(out, entries.len() as u64);
    let mut ts = 0;
    for e in entries {
        codec::put_var_str(out, &e.item);
        codec::put_var(out, u64::from(e.item_kg));
        codec::put_var_i64(out, e.ts.wrapping_sub(ts));
        ts = e.ts;
        out.push(e.kind.as_u8());
    }
}

pub fn decode_history(value: &[u8]) -> Result<VecDeque<HistEntry>> {
    let mut r = Reader::new(value);
    let n = r.var_u32()? as usize;
    let mut entries = VecDeque::with_capacity(n.min(value.len()));
    let mut ts = 0i64;
    for _ in 0..n {
        let item = Key::from(r.var_str()?);
        let item_kg = r.var_u32()?;
        ts = ts.wrapping_add(r.var_i64()?);
        let kind = EventType::from_u8(r.u8()?)
            .ok_or_else(|| Error::CorruptState("bad event type in history".into()))?;
        entries.push_back(HistEntry {
            item,
            item_kg,
            ts,
            kind,
        });
    }
    Ok(entries)
}

/// The key of a pane entry: `(key group, 'P', pane, item)`.
pub fn pane_key(kg: u32, pane: i64, item: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + 8 + item.len());
    write_pane_key(&mut k, kg, pane, item);
    k
}

/// Append a pane entry's key to `out`.
pub fn write_pane_key(out: &mut Vec<u8>, kg: u32, pane: i64, item: &str) {
    codec::write_key_head(out, kg, PANES.tag);
    out.extend_from_slice(&codec::ordered_i64(pane));
    out.extend_from_slice(item.as_bytes());
}

/// The key range `[from, to)` of key group `kg`'s entries in `panes`.
pub fn pane_range(kg: u32, panes: Range<i64>) -> (Vec<u8>, Vec<u8>) {
    (
        codec::state_key(kg, PANES.tag, &codec::ordered_i64(panes.start)),
        codec::state_key(kg, PANES.tag, &codec::ordered_i64(panes.end)),
    )
}

/// (pane, item) of a pane entry's key.
pub fn split_pane_key(key: &[u8]) -> Result<(i64, &str)> {
    let (_, _, rest) = codec::split_key(key)?;
    let pane = codec::from_ordered_i64(rest)?;
    let item = std::str::from_utf8(&rest[8..])
        .map_err(|_| Error::CorruptState("item key is not UTF-8".into()))?;
    Ok((pane, item))
}

/// Append a pane entry's value to `out`.
pub fn write_pane_entry(
    out: &mut Vec<u8>,
    popularity: u64,
    neighbors: &mut dyn ExactSizeIterator<Item = (&str, u64)>,
) {
    out.reserve(4 + neighbors.len() * 10);
    codec::put_var(out, popularity);
    codec::put_var(out, neighbors.len() as u64);
    for (k, w) in neighbors {
        codec::put_var_str(out, k);
        codec::put_var(out, w);
    }
}

/// Delete key group `kg`'s entries of every pane below `pane`.
pub fn delete_panes_below(kg: u32, pane: i64) -> StateOp {
    let (from, to) = pane_range(kg, i64::MIN..pane);
    StateOp::DeleteRange(from, to)
}

/// A pane entry's popularity; its neighbours go to `neighbor`.
pub fn decode_pane_entry(value: &[u8], neighbor: &mut dyn FnMut(&str, u64)) -> Result<u64> {
    let mut r = Reader::new(value);
    let pop = r.var()?;
    let n = r.var()?;
    for _ in 0..n {
        let k = r.var_str()?;
        neighbor(k, r.var()?);
    }
    Ok(pop)
}

/// Hand a stored pane entry to `visit`.
pub fn visit_pane_entry(key: &[u8], value: &[u8], visit: &mut dyn PaneVisitor) -> Result<()> {
    let (pane, item) = split_pane_key(key)?;
    let mut r = Reader::new(value);
    visit.entry(pane, item, r.var()?);
    let n = r.var()?;
    for _ in 0..n {
        let k = r.var_str()?;
        visit.neighbor(k, r.var()?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let entries: VecDeque<HistEntry> = [
            ("a", 3, 10, EventType::View),
            ("bé", 7, -4, EventType::Purchase),
        ]
        .into_iter()
        .map(|(item, item_kg, ts, kind)| HistEntry {
            item: item.into(),
            item_kg,
            ts,
            kind,
        })
        .collect();
        let mut value = Vec::new();
        write_history(&mut value, &entries);
        let mut key = Vec::new();
        write_history_key(&mut key, 5, "u1");
        assert_eq!(key, history_key(5, "u1"));
        assert_eq!(decode_history(&value).unwrap(), entries);
        assert!(decode_history(&value[..value.len() - 1]).is_err());

        let row = [("x", 2u64), ("y", 9)];
        let mut value = Vec::new();
        write_pane_entry(&mut value, 11, &mut row.iter().copied());
        let key = pane_key(5, -3, "i");
        assert_eq!(split_pane_key(&key).unwrap(), (-3, "i"));
        let mut got = Vec::new();
        let pop = decode_pane_entry(&value, &mut |k, w| got.push((k.to_string(), w))).unwrap();
        assert_eq!(pop, 11);
        assert_eq!(got, [("x".to_string(), 2), ("y".to_string(), 9)]);
        // Panes sort numerically within a key group, negative ones first.
        let (from, to) = pane_range(5, -3..0);
        assert!(from <= key && key < to);
        assert!(pane_key(5, -4, "zzz") < from && pane_key(5, 0, "") >= to);
    }
}
