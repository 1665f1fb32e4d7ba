//! Compact binary encoding of state keys and values.
//!
//! Keys are `[key group: u16 BE][state tag: u8][rest]`, so a worker's state is one prefix
//! scan per key group and rescaling only re-routes whole key groups.

use crate::{Error, Result};

pub fn state_key(kg: u32, tag: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + rest.len());
    write_key_head(&mut k, kg, tag);
    k.extend_from_slice(rest);
    k
}

/// Append a state key's head, `[key group][tag]`, to `out`.
pub fn write_key_head(out: &mut Vec<u8>, kg: u32, tag: u8) {
    out.extend_from_slice(&(kg as u16).to_be_bytes());
    out.push(tag);
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

/// An unsigned LEB128 varint: seven bits a byte, low bits first.
pub fn put_var(v: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        v.push(x as u8 | 0x80);
        x >>= 7;
    }
    v.push(x as u8);
}

/// A signed varint (zigzag: small magnitudes of either sign take few bytes).
pub fn put_var_i64(v: &mut Vec<u8>, x: i64) {
    put_var(v, ((x << 1) ^ (x >> 63)) as u64);
}

/// A string as its varint length and its bytes.
pub fn put_var_str(v: &mut Vec<u8>, s: &str) {
    put_var(v, s.len() as u64);
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
    pub fn var(&mut self) -> Result<u64> {
        let mut x = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            x |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                if shift == 63 && b > 1 {
                    break;
                }
                return Ok(x);
            }
        }
        Err(Error::CorruptState("varint out of range".into()))
    }
    pub fn var_i64(&mut self) -> Result<i64> {
        let z = self.var()?;
        Ok((z >> 1) as i64 ^ -((z & 1) as i64))
    }
    pub fn var_u32(&mut self) -> Result<u32> {
        u32::try_from(self.var()?).map_err(|_| Error::CorruptState("u32 out of range".into()))
    }
    pub fn var_str(&mut self) -> Result<&'a str> {
        let n = usize::try_from(self.var()?)
            .map_err(|_| Error::CorruptState("string length out of range".into()))?;
        std::str::from_utf8(self.take(n)?)
            .map_err(|_| Error::CorruptState("string is not UTF-8".into()))
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
        // Varints: edges of the byte boundaries, both extremes, and zigzag signs.
        let mut v = Vec::new();
        let nums = [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ];
        for x in nums {
            put_var(&mut v, x);
        }
        let signed = [0, -1, 1, -64, 64, i64::MIN, i64::MAX];
        for x in signed {
            put_var_i64(&mut v, x);
        }
        put_var_str(&mut v, "héllo");
        let mut r = Reader::new(&v);
        for x in nums {
            assert_eq!(r.var().unwrap(), x);
        }
        for x in signed {
            assert_eq!(r.var_i64().unwrap(), x);
        }
        assert_eq!(r.var_str().unwrap(), "héllo");
        assert!(r.var().is_err(), "nothing left");
        // One byte and two bytes take one and two bytes; a varint past 64 bits is an error.
        let (mut one, mut two) = (Vec::new(), Vec::new());
        put_var(&mut one, 127);
        put_var(&mut two, 128);
        assert_eq!((one.len(), two.len()), (1, 2));
        assert!(Reader::new(&[0xff; 10]).var().is_err());
        assert!(Reader::new(&[0x80]).var().is_err(), "truncated");
        assert!(Reader::new(&[0x80, 0x80, 0x80, 0x80, 0x10])
            .var_u32()
            .is_err());
        assert_eq!(split_key(&k).unwrap(), (300, b'P', &b"x"[..]));
    }
}
