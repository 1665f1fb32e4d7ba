//! The changelog topic's records: the history appends of one key group in one commit
//! (`MAGIC count (user item item_kg ts kind)*`). Recovery replays them into the user stage.

use super::*;

pub(super) const MAGIC: u8 = 0xC1;

/// A changelog record: the history appends of one key group in one commit.
pub(super) fn encode_entry(buf: &mut Vec<u8>, user: &str, e: &HistEntry) {
    put_str(buf, user);
    put_str(buf, &e.item);
    put_u32(buf, e.item_kg);
    put_i64(buf, e.ts);
    buf.push(e.kind.as_u8());
}

pub(super) fn decode(payload: &[u8], mut f: impl FnMut(&str, HistEntry)) -> Result<u64> {
    let mut r = Reader::new(payload);
    if r.u8()? != MAGIC {
        return Err(Error::CorruptState("not a Riffle changelog record".into()));
    }
    let n = r.u32()?;
    for _ in 0..n {
        let user = r.str()?;
        let entry = HistEntry {
            item: Key::from(r.str()?),
            item_kg: r.u32()?,
            ts: r.i64()?,
            kind: EventType::from_u8(r.u8()?)
                .ok_or_else(|| Error::CorruptState("bad event type in changelog".into()))?,
        };
        f(user, entry);
    }
    Ok(u64::from(n))
}
