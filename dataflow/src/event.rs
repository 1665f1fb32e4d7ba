//! Input events, their validation, and the dead-letter records bad input turns into.

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::config::Weights;

/// Records larger than this go to the dead-letter output unparsed.
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// How much of a rejected record's raw bytes the dead-letter output keeps.
pub const DEAD_LETTER_RAW_BYTES: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    View,
    Click,
    Cart,
    Purchase,
}

impl EventType {
    pub fn weight(self, w: &Weights) -> u32 {
        match self {
            Self::View => w.view,
            Self::Click => w.click,
            Self::Cart => w.cart,
            Self::Purchase => w.purchase,
        }
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::View,
            1 => Self::Click,
            2 => Self::Cart,
            3 => Self::Purchase,
            _ => return None,
        })
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "view" => Self::View,
            "click" => Self::Click,
            "cart" => Self::Cart,
            "purchase" => Self::Purchase,
            _ => return None,
        })
    }
}

/// A valid click-stream event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub event_id: CompactString,
    pub user_id: CompactString,
    pub item_id: CompactString,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub ts: i64,
}

/// Why a record was rejected, plus what is kept of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub reason: String,
    /// The raw record, lossily decoded and truncated to `DEAD_LETTER_RAW_BYTES`.
    pub raw: String,
    pub raw_len: usize,
    pub partition: u32,
    pub offset: u64,
}

impl DeadLetter {
    pub fn new(reason: impl Into<String>, raw: &[u8], partition: u32, offset: u64) -> Self {
        let keep = &raw[..raw.len().min(DEAD_LETTER_RAW_BYTES)];
        Self {
            reason: reason.into(),
            raw: String::from_utf8_lossy(keep).into_owned(),
            raw_len: raw.len(),
            partition,
            offset,
        }
    }
}

/// Validation limits that depend on the job and the wall clock.
#[derive(Clone, Copy, Debug)]
pub struct Validation {
    /// Largest accepted ts (wall-clock now + maxFutureSkew), epoch ms.
    pub max_ts: i64,
}

impl Validation {
    pub fn at_now(max_future_skew_ms: i64) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Self {
            max_ts: now.saturating_add(max_future_skew_ms),
        }
    }

    fn check(&self, ev: Event) -> Result<Event, String> {
        if ev.ts <= 0 {
            return Err(format!("ts must be positive epoch millis, got {}", ev.ts));
        }
        if ev.ts > self.max_ts {
            return Err(format!(
                "ts {} is beyond now + maxFutureSkew ({})",
                ev.ts, self.max_ts
            ));
        }
        for (name, v) in [
            ("eventId", &ev.event_id),
            ("userId", &ev.user_id),
            ("itemId", &ev.item_id),
        ] {
            if v.is_empty() {
                return Err(format!("{name} must not be empty"));
            }
        }
        Ok(ev)
    }
}

/// The wire shape, permissive so that every problem gets a precise reason. Field values
/// borrow from the input where they can (strings without escapes): a valid event is parsed
/// without allocating.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEvent<'a> {
    #[serde(borrow)]
    event_id: Option<Field<'a>>,
    #[serde(borrow)]
    user_id: Option<Field<'a>>,
    #[serde(borrow)]
    item_id: Option<Field<'a>>,
    #[serde(borrow, rename = "type")]
    kind: Option<Field<'a>>,
    #[serde(borrow)]
    ts: Option<Field<'a>>,
}

/// One field's value: a string (borrowed unless it had escapes), a number, or anything else
/// (kept as a JSON value only to name it in the dead-letter reason).
enum Field<'a> {
    Str(std::borrow::Cow<'a, str>),
    Number(serde_json::Number),
    Other(serde_json::Value),
}

impl std::fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Field::Str(s) => write!(f, "{}", serde_json::Value::from(s.as_ref())),
            Field::Number(n) => write!(f, "{n}"),
            Field::Other(v) => write!(f, "{v}"),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Field<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Field<'de>, E> {
                Ok(Field::Str(v.into()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Field<'de>, E> {
                Ok(Field::Str(v.to_owned().into()))
            }
            fn visit_string<E>(self, v: String) -> Result<Field<'de>, E> {
                Ok(Field::Str(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Field<'de>, E> {
                Ok(Field::Number(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Field<'de>, E> {
                Ok(Field::Number(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Field<'de>, E> {
                Ok(serde_json::Number::from_f64(v)
                    .map_or(Field::Other(serde_json::Value::Null), Field::Number))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Field<'de>, E> {
                Ok(Field::Other(v.into()))
            }
            fn visit_unit<E>(self) -> Result<Field<'de>, E> {
                Ok(Field::Other(serde_json::Value::Null))
            }
            fn visit_none<E>(self) -> Result<Field<'de>, E> {
                Ok(Field::Other(serde_json::Value::Null))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, a: A) -> Result<Field<'de>, A::Error> {
                let v = serde_json::Value::deserialize(
                    serde::de::value::SeqAccessDeserializer::new(a),
                )?;
                Ok(Field::Other(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, a: A) -> Result<Field<'de>, A::Error> {
                let v = serde_json::Value::deserialize(
                    serde::de::value::MapAccessDeserializer::new(a),
                )?;
                Ok(Field::Other(v))
            }
        }
        d.deserialize_any(V)
    }
}

fn string_field(v: Option<Field<'_>>, name: &str) -> Result<CompactString, String> {
    match v {
        Some(Field::Str(s)) => Ok(CompactString::from(s.as_ref())),
        Some(Field::Number(n)) => Ok(CompactString::from(n.to_string())),
        Some(other) => Err(format!("field {name} must be a string, got {other}")),
        None => Err(format!("missing field {name}")),
    }
}

/// Parse one JSON event; `Err` carries the dead-letter reason.
pub fn parse_json(bytes: &[u8], validation: &Validation) -> Result<Event, String> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(format!(
            "record of {} bytes exceeds the {} byte limit",
            bytes.len(),
            MAX_RECORD_BYTES
        ));
    }
    let raw: RawEvent<'_> =
        serde_json::from_slice(bytes).map_err(|e| format!("malformed JSON event: {e}"))?;
    let kind_text = match raw.kind {
        Some(Field::Str(s)) => s,
        Some(other) => return Err(format!("field type must be a string, got {other}")),
        None => return Err("missing field type".into()),
    };
    let kind = EventType::parse(&kind_text).ok_or_else(|| {
        format!("unknown event type {kind_text:?} (expected view, click, cart or purchase)")
    })?;
    let ts = match raw.ts {
        Some(Field::Number(n)) => n
            .as_i64()
            .ok_or_else(|| format!("field ts must be an integer epoch millis, got {n}"))?,
        Some(other) => return Err(format!("field ts must be a number, got {other}")),
        None => return Err("missing field ts".into()),
    };
    let ev = Event {
        event_id: string_field(raw.event_id, "eventId")?,
        user_id: string_field(raw.user_id, "userId")?,
        item_id: string_field(raw.item_id, "itemId")?,
        kind,
        ts,
    };
    validation.check(ev)
}

/// Parse one data line of the session TSV (`SessionId\tItemId\tTime` with Time in seconds).
/// `line_no` is the 1-based line number in the file (the header is line 1).
pub fn parse_session_tsv(
    line: &[u8],
    line_no: u64,
    validation: &Validation,
) -> Result<Event, String> {
    if line.len() > MAX_RECORD_BYTES {
        return Err(format!("record of {} bytes exceeds the limit", line.len()));
    }
    let text = std::str::from_utf8(line).map_err(|_| "TSV line is not UTF-8".to_string())?;
    let mut cols = text.trim_end_matches(['\r', '\n']).split('\t');
    let (Some(session), Some(item), Some(time), None) =
        (cols.next(), cols.next(), cols.next(), cols.next())
    else {
        return Err("TSV line must have exactly 3 columns: SessionId, ItemId, Time".into());
    };
    let ts = seconds_to_millis(time).ok_or_else(|| format!("invalid Time {time:?}"))?;
    let ev = Event {
        event_id: compact_str::format_compact!("{session}:{line_no}"),
        user_id: session.into(),
        item_id: item.into(),
        kind: EventType::Click,
        ts,
    };
    validation.check(ev)
}

/// `"1396437466.94"` → 1396437466940, exactly (no float rounding).
fn seconds_to_millis(s: &str) -> Option<i64> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = whole.parse().ok()?;
    let mut ms = 0i64;
    for (i, b) in frac.bytes().take(3).enumerate() {
        ms += i64::from(b - b'0') * 10i64.pow(2 - i as u32);
    }
    secs.checked_mul(1000)?.checked_add(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v() -> Validation {
        Validation {
            max_ts: 2_000_000_000_000,
        }
    }

    #[test]
    fn parses_a_valid_event() {
        let ev = parse_json(
            br#"{"eventId":"e1","userId":"u1","itemId":"i1","type":"cart","ts":1000}"#,
            &v(),
        )
        .unwrap();
        assert_eq!(ev.kind, EventType::Cart);
        assert_eq!(ev.ts, 1000);
    }

    #[test]
    fn reasons_are_specific() {
        let cases: [(&[u8], &str); 7] = [
            (b"{not json", "malformed JSON"),
            (
                br#"{"userId":"u","itemId":"i","type":"view","ts":5}"#,
                "missing field eventId",
            ),
            (
                br#"{"eventId":"e","userId":"u","itemId":"i","type":"like","ts":5}"#,
                "unknown event type",
            ),
            (
                br#"{"eventId":"e","userId":"u","itemId":"i","type":"view","ts":0}"#,
                "must be positive",
            ),
            (
                br#"{"eventId":"e","userId":"u","itemId":"i","type":"view","ts":9000000000000}"#,
                "maxFutureSkew",
            ),
            (
                br#"{"eventId":"e","userId":"u","itemId":"i","type":"view","ts":"5"}"#,
                "must be a number",
            ),
            (
                br#"{"eventId":"e","userId":"","itemId":"i","type":"view","ts":5}"#,
                "userId must not be empty",
            ),
        ];
        for (raw, want) in cases {
            let err = parse_json(raw, &v()).unwrap_err();
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
    }

    #[test]
    fn ids_may_be_escaped_strings_or_numbers_and_other_values_are_named() {
        let ev = parse_json(
            br#"{"eventId":"e\"1","userId":42,"itemId":"i\u00e9","type":"view","ts":7,"x":[1]}"#,
            &v(),
        )
        .unwrap();
        assert_eq!(
            (
                ev.event_id.as_str(),
                ev.user_id.as_str(),
                ev.item_id.as_str()
            ),
            ("e\"1", "42", "i\u{e9}")
        );
        let reason = |raw: &[u8]| parse_json(raw, &v()).unwrap_err();
        assert_eq!(
            reason(br#"{"eventId":{"a":[true]},"userId":"u","itemId":"i","type":"view","ts":5}"#),
            r#"field eventId must be a string, got {"a":[true]}"#
        );
        assert_eq!(
            reason(br#"{"eventId":"e","userId":null,"itemId":"i","type":"view","ts":5}"#),
            "missing field userId"
        );
        assert_eq!(
            reason(br#"{"eventId":"e","userId":"u","itemId":"i","type":"view","ts":1.5}"#),
            "field ts must be an integer epoch millis, got 1.5"
        );
        assert_eq!(
            reason(br#"{"eventId":"e","userId":"u","itemId":"i","type":false,"ts":1}"#),
            "field type must be a string, got false"
        );
    }

    #[test]
    fn oversized_records_are_rejected_before_parsing() {
        let big = vec![b' '; MAX_RECORD_BYTES + 1];
        assert!(parse_json(&big, &v()).unwrap_err().contains("exceeds"));
        let dl = DeadLetter::new("too big", &big, 0, 7);
        assert_eq!(dl.raw.len(), DEAD_LETTER_RAW_BYTES);
        assert_eq!(dl.raw_len, MAX_RECORD_BYTES + 1);
    }

    #[test]
    fn session_tsv_lines() {
        let ev = parse_session_tsv(b"3\t214716935\t1396437466.94\n", 2, &v()).unwrap();
        assert_eq!(ev.event_id, "3:2");
        assert_eq!(ev.user_id, "3");
        assert_eq!(ev.ts, 1_396_437_466_940);
        assert_eq!(seconds_to_millis("12.3456"), Some(12_345));
        assert_eq!(seconds_to_millis("12"), Some(12_000));
        assert!(parse_session_tsv(b"3\t1", 2, &v()).is_err());
        assert!(parse_session_tsv(b"3\t1\t-5", 2, &v()).is_err());
    }
}
