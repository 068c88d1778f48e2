//! A destination's own first request message
//! ([`Destination::with_first_message`](crate::direct::Destination::with_first_message)):
//! the client's first message is skipped as it streams by, never buffered,
//! and the replacement is sent in its place; every later byte passes
//! through untouched.

use bytes::{Bytes, BytesMut};

use crate::grpc::framing::{PREFIX_LEN, prefix};

/// Where the rewrite is in the client's byte stream.
#[derive(Debug)]
enum State {
    /// Reading the first message's prefix (`have` bytes of it so far).
    Prefix { buf: [u8; PREFIX_LEN], have: usize },
    /// Dropping the rest of the first message's payload.
    Skip { left: u64 },
    /// Past the first message.
    Done,
}

/// Replaces the first gRPC message of a request body.
#[derive(Debug)]
pub(super) struct FirstMessage {
    replacement: Bytes,
    state: State,
}

impl FirstMessage {
    pub(super) fn new(replacement: Bytes) -> Self {
        Self {
            replacement,
            state: State::Prefix {
                buf: [0; PREFIX_LEN],
                have: 0,
            },
        }
    }

    /// The bytes to send for the client's `chunk` (empty while the first
    /// message is being skipped).
    pub(super) fn rewrite(&mut self, mut chunk: Bytes) -> Bytes {
        let mut out = BytesMut::new();
        loop {
            match &mut self.state {
                State::Done => {
                    if out.is_empty() {
                        return chunk;
                    }
                    out.extend_from_slice(&chunk);
                    return out.freeze();
                }
                State::Prefix { buf, have } => {
                    let take = (PREFIX_LEN - *have).min(chunk.len());
                    buf[*have..*have + take].copy_from_slice(&chunk[..take]);
                    *have += take;
                    chunk = chunk.slice(take..);
                    if *have < PREFIX_LEN {
                        return out.freeze();
                    }
                    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
                    // Sent uncompressed: the replacement is plain protobuf.
                    out.extend_from_slice(&prefix(false, self.replacement.len()));
                    out.extend_from_slice(&self.replacement);
                    self.state = State::Skip {
                        left: u64::from(len),
                    };
                }
                State::Skip { left } => {
                    let skip = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(chunk.len());
                    chunk = chunk.slice(skip..);
                    *left -= skip as u64;
                    if *left > 0 {
                        return out.freeze();
                    }
                    self.state = State::Done;
                }
            }
        }
    }

    /// Whether bytes of a cut prefix are held.
    pub(super) fn is_pending(&self) -> bool {
        matches!(self.state, State::Prefix { have, .. } if have > 0)
    }

    /// What is left to send when the client's body ends: the bytes of a
    /// prefix cut short, as the client sent them (there was no message to
    /// replace).
    pub(super) fn finish(&mut self) -> Option<Bytes> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Prefix { buf, have } if have > 0 => Some(Bytes::copy_from_slice(&buf[..have])),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::framing::encode;

    fn run(chunks: &[&[u8]], replacement: &[u8]) -> Vec<u8> {
        let mut first = FirstMessage::new(Bytes::copy_from_slice(replacement));
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&first.rewrite(Bytes::copy_from_slice(c)));
        }
        if let Some(rest) = first.finish() {
            out.extend_from_slice(&rest);
        }
        out
    }

    #[test]
    fn the_first_message_is_replaced_however_it_is_cut() {
        let mut body = encode(b"original first");
        let second = encode(b"second");
        let mut all = body.to_vec();
        all.extend_from_slice(&second);
        let mut want = encode(b"new").to_vec();
        want.extend_from_slice(&second);
        // Every way of cutting the stream in two, and byte by byte.
        for cut in 0..=all.len() {
            assert_eq!(
                run(&[&all[..cut], &all[cut..]], b"new"),
                want,
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = all.chunks(1).collect();
        assert_eq!(run(&bytes, b"new"), want);
        // A compressed first message becomes an uncompressed replacement.
        body = Bytes::from([&[1u8, 0, 0, 0, 2][..], b"zz"].concat());
        assert_eq!(run(&[&body], b"p"), encode(b"p").to_vec());
        // No message at all: nothing to replace; a cut prefix passes on.
        assert_eq!(run(&[], b"p"), b"");
        assert_eq!(run(&[&[0, 0]], b"p"), [0, 0]);
    }
}
