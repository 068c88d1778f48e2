//! Reading and writing protobuf fields without a descriptor.
//!
//! A [`FieldPath`] such as `1.2` names field 2 of the message held in
//! field 1. The [`find`] function walks the message's wire format, without
//! copying, and reads the field as a protobuf parser would (last value
//! wins); it treats malformed bytes as "not there": a router that matches
//! on message contents must never panic or fail a call because a client
//! sent garbage. The `put_*` functions write fields, for layers that
//! append to a message at the wire level.
//!
//! ```
//! use sluice_layers::grpc::wire::{FieldPath, Value, find};
//!
//! // message Inner { string name = 2; }  message Outer { Inner inner = 1; uint64 id = 3; }
//! // Outer { inner: Inner { name: "repo" }, id: 150 }
//! let bytes = [0x0a, 0x06, 0x12, 0x04, b'r', b'e', b'p', b'o', 0x18, 0x96, 0x01];
//! let path: FieldPath = "1.2".parse()?;
//! assert_eq!(find(&bytes, &path), Some(Value::Len(b"repo")));
//! assert_eq!(find(&bytes, &"3".parse()?), Some(Value::Varint(150)));
//! assert_eq!(find(&bytes[..5], &path), None); // cut short: no match, no panic
//! # Ok::<_, sluice_layers::grpc::wire::FieldPathError>(())
//! ```

use std::{fmt, str::FromStr};

/// A path of protobuf field numbers, outermost first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldPath(Vec<u32>);

/// A field path that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid protobuf field path {0:?}: expected field numbers (1 ..= 536870911) joined by '.'"
)]
pub struct FieldPathError(String);

/// One field's value, as the wire format has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Value<'a> {
    /// Wire type 0: int32/int64/uint32/uint64/bool/enum (sint types are
    /// zigzag-encoded and read as their raw varint).
    Varint(u64),
    /// Wire type 1: fixed64/sfixed64/double.
    Fixed64(u64),
    /// Wire type 2: string/bytes/embedded message/packed repeated.
    Len(&'a [u8]),
    /// Wire type 5: fixed32/sfixed32/float.
    Fixed32(u32),
}

const MAX_FIELD: u32 = (1 << 29) - 1;

// === impl FieldPath ===

impl FieldPath {
    /// The field numbers, outermost first.
    pub fn fields(&self) -> &[u32] {
        &self.0
    }
}

impl FromStr for FieldPath {
    type Err = FieldPathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fields: Option<Vec<u32>> = s
            .split('.')
            .map(|p| {
                p.parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_FIELD).contains(n))
            })
            .collect();
        match fields {
            Some(f) if !f.is_empty() => Ok(Self(f)),
            _ => Err(FieldPathError(s.to_owned())),
        }
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for n in &self.0 {
            if !first {
                f.write_str(".")?;
            }
            write!(f, "{n}")?;
            first = false;
        }
        Ok(())
    }
}

// === impl Value ===

impl<'a> Value<'a> {
    /// The value as UTF-8 text, if it is length-delimited valid UTF-8.
    pub fn as_str(&self) -> Option<&'a str> {
        match self {
            Self::Len(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// The value as an integer, if it is a varint or fixed-width number.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::Varint(n) | Self::Fixed64(n) => Some(n),
            Self::Fixed32(n) => Some(u64::from(n)),
            Self::Len(_) => None,
        }
    }
}

/// Finds the value of `path` in `message` as a protobuf parser reads it:
/// the *last* occurrence of a scalar wins, and the occurrences of an
/// embedded message merge (so `1.2` is the last field 2 in any occurrence
/// of field 1). Every field but the last must be length-delimited (an
/// embedded message). Returns `None` when the field is absent or the bytes
/// on its path are malformed (a parser would reject the message).
///
/// Reading the first occurrence instead would let a client make a router
/// act on one value while the upstream reads another.
pub fn find<'a>(message: &'a [u8], path: &FieldPath) -> Option<Value<'a>> {
    find_in(message, &path.0)
}

fn find_in<'a>(message: &'a [u8], path: &[u32]) -> Option<Value<'a>> {
    let (&wanted, rest) = path.split_first()?;
    let mut found = None;
    for field in fields(message) {
        let (number, value) = field?;
        if number != wanted {
            continue;
        }
        if rest.is_empty() {
            found = Some(value);
            continue;
        }
        match value {
            // A later occurrence that has the inner field overrides.
            Value::Len(inner) => {
                if let Some(v) = find_in(inner, rest) {
                    found = Some(v);
                }
            }
            // The same number with a scalar: not a message, no parse.
            _ => return None,
        }
    }
    found
}

/// Whether `bytes` is a well-formed sequence of protobuf fields (each tag,
/// length and value complete; no groups). Embedded messages are not
/// checked: their bytes may be strings.
pub fn is_message(bytes: &[u8]) -> bool {
    fields(bytes).all(|f| f.is_some())
}

/// The fields of `message` in order, as (number, value); an item is `None`
/// (and the last) where the bytes are malformed.
fn fields(mut bytes: &[u8]) -> impl Iterator<Item = Option<(u32, Value<'_>)>> {
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || bytes.is_empty() {
            return None;
        }
        let field = next_field(&mut bytes);
        failed = field.is_none();
        Some(field)
    })
}

/// The fields of `message` that are all field `number`, length-delimited:
/// the entries of a `repeated` embedded message in a reply like
/// `message R { repeated X messages = 1; }`. `None` when another field or
/// malformed bytes are present.
pub fn repeated_entries(message: &[u8], number: u32) -> Option<Vec<&[u8]>> {
    fields(message)
        .map(|f| match f? {
            (n, Value::Len(entry)) if n == number => Some(entry),
            _ => None,
        })
        .collect()
}

fn next_field<'a>(bytes: &mut &'a [u8]) -> Option<(u32, Value<'a>)> {
    let key = varint(bytes)?;
    let field = u32::try_from(key >> 3).ok().filter(|f| *f != 0)?;
    let value = match key & 7 {
        0 => Value::Varint(varint(bytes)?),
        1 => Value::Fixed64(u64::from_le_bytes(take(bytes, 8)?.try_into().ok()?)),
        2 => {
            let len = usize::try_from(varint(bytes)?).ok()?;
            Value::Len(take(bytes, len)?)
        }
        5 => Value::Fixed32(u32::from_le_bytes(take(bytes, 4)?.try_into().ok()?)),
        // Groups (3, 4) are deprecated and not skippable without walking
        // them; anything else is not protobuf.
        _ => return None,
    };
    Some((field, value))
}

/// Appends `value` as a protobuf varint.
pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends the tag and length of a length-delimited field `number` whose
/// content (`len` bytes) the caller appends next.
pub fn put_len_prefix(out: &mut Vec<u8>, number: u32, len: usize) {
    put_varint(out, (u64::from(number) << 3) | 2);
    put_varint(out, len as u64);
}

/// Appends a length-delimited field `number` holding `content`.
pub fn put_len_field(out: &mut Vec<u8>, number: u32, content: &[u8]) {
    put_len_prefix(out, number, content.len());
    out.extend_from_slice(content);
}

/// Appends a varint field `number` holding `value`.
pub fn put_varint_field(out: &mut Vec<u8>, number: u32, value: u64) {
    put_varint(out, u64::from(number) << 3);
    put_varint(out, value);
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if bytes.len() < n {
        return None;
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Some(head)
}

fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> FieldPath {
        s.parse().expect("valid path")
    }

    #[test]
    fn parses_and_prints_paths() {
        assert_eq!(path("1.2.3").fields(), [1, 2, 3]);
        assert_eq!(path("7").to_string(), "7");
        for bad in ["", "0", "1..2", "a", "1.", "536870912", "-1"] {
            assert!(bad.parse::<FieldPath>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reads_every_wire_type() {
        // 1: varint 300, 2: fixed64, 3: "hi", 4: fixed32
        let mut m = vec![0x08, 0xac, 0x02];
        m.push(0x11);
        m.extend_from_slice(&7u64.to_le_bytes());
        m.extend_from_slice(&[0x1a, 0x02, b'h', b'i']);
        m.push(0x25);
        m.extend_from_slice(&9u32.to_le_bytes());
        assert_eq!(find(&m, &path("1")), Some(Value::Varint(300)));
        assert_eq!(find(&m, &path("2")), Some(Value::Fixed64(7)));
        assert_eq!(find(&m, &path("3")).and_then(|v| v.as_str()), Some("hi"));
        assert_eq!(find(&m, &path("4")).and_then(|v| v.as_u64()), Some(9));
        assert_eq!(find(&m, &path("5")), None);
        // A scalar cannot be walked into.
        assert_eq!(find(&m, &path("1.1")), None);
    }

    #[test]
    fn a_repeated_field_reads_as_the_parser_reads_it() {
        // field 3 twice: the parser keeps the last value.
        let m = [0x18, 0x01, 0x18, 0x02];
        assert_eq!(find(&m, &path("3")), Some(Value::Varint(2)));
        // field 1 (a message) twice: the occurrences merge, so 1.2 is the
        // last field 2 in either, and a later occurrence without it keeps
        // the earlier value.
        let m = [
            0x0a, 0x03, 0x12, 0x01, b'a', // 1 { 2: "a" }
            0x0a, 0x03, 0x12, 0x01, b'b', // 1 { 2: "b" }
            0x0a, 0x02, 0x18, 0x07, // 1 { 3: 7 }
        ];
        assert_eq!(find(&m, &path("1.2")).and_then(|v| v.as_str()), Some("b"));
        assert_eq!(find(&m, &path("1.3")), Some(Value::Varint(7)));
        // Garbage after the match: a parser rejects the message.
        assert_eq!(find(&[0x18, 0x01, 0x0a, 0xff], &path("3")), None);
    }

    #[test]
    fn writes_fields_that_read_back() {
        let mut m = Vec::new();
        put_varint_field(&mut m, 3, 300);
        put_len_field(&mut m, 20, b"hello");
        assert!(is_message(&m));
        assert_eq!(find(&m, &path("3")), Some(Value::Varint(300)));
        assert_eq!(
            find(&m, &path("20")).and_then(|v| v.as_str()),
            Some("hello")
        );
        assert_eq!(repeated_entries(&m, 3), None);
        let mut r = Vec::new();
        put_len_field(&mut r, 1, b"x");
        put_len_field(&mut r, 1, b"");
        assert_eq!(repeated_entries(&r, 1), Some(vec![&b"x"[..], &b""[..]]));
        assert_eq!(repeated_entries(&[], 1), Some(vec![]));
        assert!(!is_message(&[0x0a, 0x05, 0x00]));
    }

    #[test]
    fn malformed_bytes_are_no_match_never_a_panic() {
        let cases: [&[u8]; 6] = [
            &[0x0a, 0xff], // length past the end
            &[0x08],       // varint missing
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ], // 11-byte varint
            &[0x0b, 0x00], // start group
            &[0x07],       // wire type 7
            &[0x00, 0x01], // field 0
        ];
        for bytes in cases {
            assert_eq!(find(bytes, &path("1")), None, "{bytes:?}");
            assert_eq!(find(bytes, &path("1.2")), None, "{bytes:?}");
        }
        // Every truncation of a valid message is handled.
        let m = [
            0x0a, 0x06, 0x12, 0x04, b'r', b'e', b'p', b'o', 0x18, 0x96, 0x01,
        ];
        for n in 0..m.len() {
            let _ = find(&m[..n], &path("1.2"));
            let _ = find(&m[..n], &path("3"));
        }
    }
}
