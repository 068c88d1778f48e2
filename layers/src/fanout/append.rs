//! Talos's wire-level enrichment: each reply entry gets the destination's
//! metadata appended (`AppendInfo`), and a failed destination becomes an
//! entry carrying its error (`BuildError`).
//!
//! The layout is Talos's: a reply `message R { repeated X messages = 1; }`,
//! each `X` with a `common.Metadata` field (number configurable, 1 by
//! default) `{ string hostname = 1; string error = 2; google.rpc.Status
//! status = 3; }`, and `google.rpc.Status { int32 code = 1; string
//! message = 2; }`. Appending a field to a serialized message is a protobuf
//! merge, so an entry that already has metadata keeps its other fields.

use crate::grpc::{status::Code, wire};

/// Writes destination metadata into reply messages at the wire level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendInfo {
    field: u32,
}

/// A reply that is not a sequence of field-1 length-delimited entries.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the reply of {destination} is not a list of field-1 entries")]
pub struct MalformedReply {
    /// The destination that sent it.
    pub destination: String,
}

impl Default for AppendInfo {
    fn default() -> Self {
        Self { field: 1 }
    }
}

impl AppendInfo {
    /// Appends metadata as field `field` of each entry.
    pub fn new(field: u32) -> Self {
        Self { field }
    }

    /// The metadata field's number.
    pub fn field(self) -> u32 {
        self.field
    }

    /// `common.Metadata { hostname, error, status }` serialized.
    fn metadata(hostname: &str, error: Option<(Code, &str)>) -> Vec<u8> {
        let mut m = Vec::with_capacity(hostname.len() + 8);
        wire::put_len_field(&mut m, 1, hostname.as_bytes());
        if let Some((code, message)) = error {
            wire::put_len_field(&mut m, 2, message.as_bytes());
            let mut status = Vec::with_capacity(message.len() + 8);
            // int32: a negative value would be 10 bytes; codes are 0..=16.
            wire::put_varint_field(&mut status, 1, code.as_i32() as u64);
            wire::put_len_field(&mut status, 2, message.as_bytes());
            wire::put_len_field(&mut m, 3, &status);
        }
        m
    }

    /// `message` (one bare `X`, as a stream sends) with the metadata of
    /// `hostname` appended: `X ++ field(metadata)`.
    pub fn append(self, message: &[u8], hostname: &str) -> Vec<u8> {
        let meta = Self::metadata(hostname, None);
        let mut out = Vec::with_capacity(message.len() + meta.len() + 6);
        out.extend_from_slice(message);
        wire::put_len_field(&mut out, self.field, &meta);
        out
    }

    /// An `X` whose only field is the metadata of a failed destination.
    pub fn error_message(self, hostname: &str, code: Code, message: &str) -> Vec<u8> {
        let mut out = Vec::new();
        wire::put_len_field(
            &mut out,
            self.field,
            &Self::metadata(hostname, Some((code, message))),
        );
        out
    }

    /// Appends to `out` the entries of `reply` (`R`), each with the
    /// metadata of `hostname` appended. An empty reply has no entries.
    ///
    /// # Errors
    ///
    /// [`MalformedReply`] when `reply` holds anything but field-1
    /// length-delimited entries.
    pub fn merge_entries(
        self,
        out: &mut Vec<u8>,
        reply: &[u8],
        hostname: &str,
    ) -> Result<(), MalformedReply> {
        let entries = wire::repeated_entries(reply, 1).ok_or_else(|| MalformedReply {
            destination: hostname.to_owned(),
        })?;
        let mut meta = Vec::new();
        wire::put_len_field(&mut meta, self.field, &Self::metadata(hostname, None));
        for entry in entries {
            wire::put_len_prefix(out, 1, entry.len() + meta.len());
            out.extend_from_slice(entry);
            out.extend_from_slice(&meta);
        }
        Ok(())
    }

    /// Appends to `out` one entry for a failed destination.
    pub fn error_entry(self, out: &mut Vec<u8>, hostname: &str, code: Code, message: &str) {
        wire::put_len_field(out, 1, &self.error_message(hostname, code, message));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::wire::{FieldPath, find, repeated_entries};

    fn path(s: &str) -> FieldPath {
        s.parse().expect("path")
    }

    #[test]
    fn merged_entries_keep_their_fields_and_gain_the_hostname() {
        // R { messages: [X { 2: "a" }, X { 1: { 1: "old" }, 2: "b" }] }
        let mut reply = Vec::new();
        wire::put_len_field(&mut reply, 1, b"\x12\x01a");
        wire::put_len_field(&mut reply, 1, b"\x0a\x05\x0a\x03old\x12\x01b");
        let mut out = Vec::new();
        AppendInfo::default()
            .merge_entries(&mut out, &reply, "node-1")
            .expect("well formed");
        let entries = repeated_entries(&out, 1).expect("a list");
        assert_eq!(entries.len(), 2);
        for (entry, want) in entries.iter().zip(["a", "b"]) {
            assert_eq!(find(entry, &path("2")).and_then(|v| v.as_str()), Some(want));
            // The appended metadata wins over an earlier one (merge).
            assert_eq!(
                find(entry, &path("1.1")).and_then(|v| v.as_str()),
                Some("node-1")
            );
        }
        // Empty reply: no entries, not an error.
        let mut out = Vec::new();
        AppendInfo::default()
            .merge_entries(&mut out, &[], "n")
            .expect("empty is fine");
        assert!(out.is_empty());
    }

    #[test]
    fn a_reply_with_other_fields_is_malformed() {
        let mut out = Vec::new();
        let err = AppendInfo::default()
            .merge_entries(&mut out, b"\x12\x01a", "n")
            .expect_err("field 2");
        assert_eq!(err.destination, "n");
        assert!(
            AppendInfo::default()
                .merge_entries(&mut out, b"\x0a\x09", "n")
                .is_err()
        );
    }

    #[test]
    fn an_error_entry_carries_hostname_error_and_status() {
        let mut out = Vec::new();
        AppendInfo::new(3).error_entry(&mut out, "node-2", Code::Unavailable, "down");
        let entries = repeated_entries(&out, 1).expect("a list");
        let x = entries[0];
        assert_eq!(
            find(x, &path("3.1")).and_then(|v| v.as_str()),
            Some("node-2")
        );
        assert_eq!(find(x, &path("3.2")).and_then(|v| v.as_str()), Some("down"));
        assert_eq!(find(x, &path("3.3.1")).and_then(|v| v.as_u64()), Some(14));
        assert_eq!(
            find(x, &path("3.3.2")).and_then(|v| v.as_str()),
            Some("down")
        );
    }

    #[test]
    fn a_streamed_message_gets_metadata_appended() {
        let m = AppendInfo::default().append(b"\x12\x01a", "h");
        assert_eq!(find(&m, &path("2")).and_then(|v| v.as_str()), Some("a"));
        assert_eq!(find(&m, &path("1.1")).and_then(|v| v.as_str()), Some("h"));
    }
}
