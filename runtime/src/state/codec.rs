//! Compact binary encoding of state keys and values.
//!
//! Keys are `[key group: u16 BE][state tag: u8][rest]`, so a worker's state is one prefix
//! scan per key group and rescaling only re-routes whole key groups.

use crate::{Error, Result};

pub fn state_key(kg: u32, tag: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + rest.len());
    k.extend_from_slice(&(kg as u16).to_be_bytes());
    k.push(tag);
    k.extend_from_slice(rest);
    k
}

/// Split a state key into (key group, tag, rest).
pub fn split_key(key: &[u8]) -> Result<(u32, u8, &[u8])> {
    if key.len() < 3 {
        return Err(Error::CorruptState(format!("state key too short: {key:?}")));
    }
    Ok((
        u32::from(u16::from_be_bytes([key[0], key[1]])),
        key[2],
        &key[3..],
    ))
}

/// Big-endian with the sign bit flipped: byte order equals numeric order.
pub fn ordered_i64(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

pub fn from_ordered_i64(b: &[u8]) -> Result<i64> {
    let arr: [u8; 8] = b
        .get(..8)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| Error::CorruptState("truncated i64".into()))?;
    Ok((u64::from_be_bytes(arr) ^ (1 << 63)) as i64)
}

pub fn put_u32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}
pub fn put_u64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}
pub fn put_i64(v: &mut Vec<u8>, x: i64) {
    v.extend_from_slice(&x.to_le_bytes());
}
pub fn put_str(v: &mut Vec<u8>, s: &str) {
    put_u32(v, s.len() as u32);
    v.extend_from_slice(s.as_bytes());
}

pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::CorruptState("truncated state value".into()));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    pub fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    pub fn str(&mut self) -> Result<&'a str> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?)
            .map_err(|_| Error::CorruptState("string is not UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_i64_sorts_like_numbers() {
        let vals = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        for w in vals.windows(2) {
            assert!(ordered_i64(w[0]) < ordered_i64(w[1]));
            assert_eq!(from_ordered_i64(&ordered_i64(w[0])).unwrap(), w[0]);
        }
    }

    #[test]
    fn values_round_trip_and_truncation_is_an_error() {
        let mut v = Vec::new();
        put_str(&mut v, "héllo");
        put_u64(&mut v, 42);
        let mut r = Reader::new(&v);
        assert_eq!(r.str().unwrap(), "héllo");
        assert_eq!(r.u64().unwrap(), 42);
        assert!(r.u8().is_err());
        let k = state_key(300, b'P', b"x");
        assert_eq!(split_key(&k).unwrap(), (300, b'P', &b"x"[..]));
    }
}
