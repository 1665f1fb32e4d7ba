//! A JSON writer for the two records written once per event and once per item and window
//! (recommendations and ItemStats): straight into the output buffer, byte for byte what
//! `serde_json` writes for the same records (a unit test holds it to that), without going
//! through serde's visitor machinery.

/// Append `s` as a JSON string, escaped as `serde_json` escapes it.
pub fn str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => {
                out.extend_from_slice(&bytes[start..i]);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escape);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Open an object with its first field name: `{"name":` (names are ASCII identifiers:
/// nothing to escape).
pub fn key_first(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(b"{\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

/// A further field name: `,"name":`.
pub fn key_next(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

pub fn int(out: &mut Vec<u8>, v: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// A finite float in its shortest round-trip form; `null` otherwise (as `serde_json`).
pub fn float(out: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        out.extend_from_slice(zmij::Buffer::new().format_finite(v).as_bytes());
    } else {
        out.extend_from_slice(b"null");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_like_serde_json() {
        let mut all: String = (0u8..0x80).map(char::from).collect();
        all.push_str("é€😀\u{2028}");
        for s in ["", "plain", "a\"b", "back\\slash", "\n\r\t\u{8}\u{c}", &all] {
            let mut got = Vec::new();
            str(&mut got, s);
            assert_eq!(got, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn numbers_are_written_like_serde_json() {
        for v in [
            0.0,
            1.0,
            0.1,
            1.0 / 3.0,
            2.5e-8,
            1e21,
            123_456.789,
            f64::MIN_POSITIVE,
        ] {
            let mut got = Vec::new();
            float(&mut got, v);
            assert_eq!(got, serde_json::to_vec(&v).unwrap(), "{v}");
        }
        // Scores are weight / popularity.
        for pop in 1..300u64 {
            for w in (0..=pop).step_by(7) {
                let v = w as f64 / pop as f64;
                let mut got = Vec::new();
                float(&mut got, v);
                assert_eq!(got, serde_json::to_vec(&v).unwrap(), "{w}/{pop}");
            }
        }
        for v in [i64::MIN, -1, 0, 7, i64::MAX] {
            let mut got = Vec::new();
            int(&mut got, v);
            assert_eq!(got, serde_json::to_vec(&v).unwrap());
        }
    }
}
