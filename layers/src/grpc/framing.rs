//! Incremental reading of gRPC's length-prefixed message framing over DATA
//! chunks of any size: each message is a 1-byte compressed flag, a 4-byte
//! big-endian length, then the message.
//!
//! [`MessageCounter`] counts message boundaries without copying or keeping
//! any payload byte, however the messages are split across chunks.
//! [`MessageDecoder`] hands out whole messages, in time and memory linear in
//! their bytes (each byte is copied at most twice, never again per chunk),
//! and without a copy when a message lies in one chunk.
//!
//! ```
//! use sluice_layers::grpc::framing::MessageCounter;
//!
//! // Two messages of 3 and 0 bytes, split across three chunks.
//! let wire = [0, 0, 0, 0, 3, b'a', b'b', b'c', 1, 0, 0, 0, 0];
//! let mut counter = MessageCounter::default();
//! let mut started = 0;
//! for chunk in [&wire[..2], &wire[2..9], &wire[9..]] {
//!     started += counter.push(chunk);
//! }
//! assert_eq!(started, 2);
//! assert!(counter.at_boundary());
//! ```

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

/// Length of the prefix in front of each message.
pub const PREFIX_LEN: usize = 5;

/// Counts length-prefixed gRPC messages as their bytes go by.
#[derive(Clone, Copy, Debug, Default)]
pub struct MessageCounter {
    /// Bytes of the current prefix seen so far (0..5).
    prefix_seen: u8,
    /// The length bytes of the current prefix.
    len: [u8; 4],
    /// Payload bytes still to skip before the next prefix.
    remaining: u64,
}

impl MessageCounter {
    /// Feeds the next chunk; returns how many messages *began* in it (a
    /// message begins when its 5-byte prefix is complete).
    pub fn push(&mut self, mut chunk: &[u8]) -> usize {
        let mut started = 0;
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let skip = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(chunk.len());
                chunk = &chunk[skip..];
                self.remaining -= skip as u64;
                continue;
            }
            // Inside a prefix: byte 0 is the flag, bytes 1..5 the length.
            let byte = chunk[0];
            chunk = &chunk[1..];
            if self.prefix_seen > 0 {
                self.len[usize::from(self.prefix_seen - 1)] = byte;
            }
            self.prefix_seen += 1;
            if usize::from(self.prefix_seen) == PREFIX_LEN {
                self.prefix_seen = 0;
                self.remaining = u64::from(u32::from_be_bytes(self.len));
                started += 1;
            }
        }
        started
    }

    /// Whether the bytes so far end inside a message's payload (its prefix
    /// read, some of its bytes still to come).
    pub fn in_payload(&self) -> bool {
        self.remaining > 0
    }

    /// Whether the bytes so far end exactly at a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.prefix_seen == 0 && self.remaining == 0
    }
}

/// One gRPC message: its compressed flag and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Whether the payload is compressed (flag 1) with the call's
    /// `grpc-encoding`.
    pub compressed: bool,
    /// The payload, without the prefix.
    pub payload: Bytes,
}

/// A message longer than the decoder's limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a gRPC message of {len} bytes is over the limit of {max} bytes")]
pub struct TooLarge {
    /// The message's declared length.
    pub len: usize,
    /// The limit.
    pub max: usize,
}

/// Chunks shorter than this are gathered into one buffer rather than
/// queued alone, so a peer sending one-byte DATA frames costs a copy per
/// byte, not a queue entry (32 bytes) per byte.
const SMALL_CHUNK: usize = 512;

/// Reassembles length-prefixed messages from DATA chunks of any size.
///
/// Memory is bounded by `max_message + PREFIX_LEN` plus one chunk: a
/// message declared longer than `max_message` is an error as soon as its
/// prefix is read.
///
/// ```
/// use bytes::Bytes;
/// use sluice_layers::grpc::framing::MessageDecoder;
///
/// let mut decoder = MessageDecoder::new(1024);
/// decoder.push(Bytes::from_static(&[0, 0, 0, 0, 3, b'a']));
/// assert_eq!(decoder.next_message()?, None); // 2 bytes short
/// decoder.push(Bytes::from_static(b"bc"));
/// let m = decoder.next_message()?.expect("whole");
/// assert_eq!((m.compressed, &m.payload[..]), (false, &b"abc"[..]));
/// assert!(decoder.is_empty());
/// # Ok::<_, sluice_layers::grpc::framing::TooLarge>(())
/// ```
#[derive(Debug, Default)]
pub struct MessageDecoder {
    chunks: VecDeque<Bytes>,
    /// Small chunks being gathered, behind every queued chunk.
    tail: BytesMut,
    /// Bytes in `chunks` and `tail`.
    buffered: usize,
    /// The current message's prefix, once read: (compressed, length).
    head: Option<(bool, usize)>,
    max: usize,
}

impl MessageDecoder {
    /// A decoder refusing messages over `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Self {
            max: max_message,
            ..Self::default()
        }
    }

    /// Adds the next chunk of the body.
    pub fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.buffered += chunk.len();
        if chunk.len() < SMALL_CHUNK {
            self.tail.extend_from_slice(&chunk);
            return;
        }
        if !self.tail.is_empty() {
            self.chunks.push_back(self.tail.split().freeze());
        }
        self.chunks.push_back(chunk);
    }

    /// The next whole message, `None` until its bytes are all in.
    ///
    /// # Errors
    ///
    /// [`TooLarge`] when the next message is declared longer than the
    /// limit; the decoder is then of no further use.
    pub fn next_message(&mut self) -> Result<Option<Message>, TooLarge> {
        let (compressed, len) = match self.head {
            Some(head) => head,
            None => {
                if self.buffered < PREFIX_LEN {
                    return Ok(None);
                }
                let prefix = self.take(PREFIX_LEN);
                let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
                if len > self.max {
                    return Err(TooLarge { len, max: self.max });
                }
                let head = (prefix[0] == 1, len);
                self.head = Some(head);
                head
            }
        };
        if self.buffered < len {
            return Ok(None);
        }
        self.head = None;
        Ok(Some(Message {
            compressed,
            payload: self.take(len),
        }))
    }

    /// Whether nothing is buffered: the body so far ended on a message
    /// boundary.
    pub fn is_empty(&self) -> bool {
        self.buffered == 0 && self.head.is_none()
    }

    /// Takes `n <= buffered` bytes off the front, without a copy when they
    /// lie in one chunk.
    fn take(&mut self, n: usize) -> Bytes {
        debug_assert!(n <= self.buffered);
        self.buffered -= n;
        if self.chunks.is_empty() {
            return self.tail.split_to(n).freeze();
        }
        if let Some(front) = self.chunks.front_mut()
            && front.len() >= n
        {
            let out = front.split_to(n);
            if front.is_empty() {
                self.chunks.pop_front();
            }
            return out;
        }
        let mut out = BytesMut::with_capacity(n);
        while out.len() < n {
            let want = n - out.len();
            let Some(front) = self.chunks.front_mut() else {
                out.extend_from_slice(&self.tail.split_to(want));
                break;
            };
            let piece = front.split_to(want.min(front.len()));
            if front.is_empty() {
                self.chunks.pop_front();
            }
            out.extend_from_slice(&piece);
        }
        out.freeze()
    }
}

/// Frames `payload` as one uncompressed gRPC message.
pub fn encode(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(PREFIX_LEN + payload.len());
    out.extend_from_slice(&[0]);
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(payload);
    out.freeze()
}

/// The 5-byte prefix of a message of `len` bytes.
pub fn prefix(compressed: bool, len: usize) -> [u8; PREFIX_LEN] {
    let l = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    [u8::from(compressed), l[0], l[1], l[2], l[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&u32::try_from(len).expect("small").to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len));
        m
    }

    #[test]
    fn counts_messages_however_the_chunks_fall() {
        let wire: Vec<u8> = [0, 1, 300, 70_000, 5]
            .iter()
            .flat_map(|&n| message(n))
            .collect();
        for size in [1, 2, 3, 5, 7, 64, 1000, wire.len()] {
            let mut c = MessageCounter::default();
            let n: usize = wire.chunks(size).map(|ch| c.push(ch)).sum();
            assert_eq!(n, 5, "chunk size {size}");
            assert!(c.at_boundary());
        }
    }

    #[test]
    fn decodes_messages_however_the_chunks_fall() {
        let sizes = [0, 1, 300, 70_000, 5];
        let wire: Vec<u8> = sizes.iter().flat_map(|&n| message(n)).collect();
        for size in [1, 2, 3, 5, 7, 64, 600, 1000, wire.len()] {
            let mut d = MessageDecoder::new(1 << 20);
            let mut got = Vec::new();
            for ch in wire.chunks(size) {
                d.push(Bytes::copy_from_slice(ch));
                while let Some(m) = d.next_message().expect("under the limit") {
                    got.push(m.payload.len());
                }
            }
            assert_eq!(got, sizes, "chunk size {size}");
            assert!(d.is_empty());
        }
    }

    #[test]
    fn a_message_over_the_limit_fails_at_its_prefix() {
        let mut d = MessageDecoder::new(10);
        d.push(Bytes::copy_from_slice(&message(11)[..5]));
        assert_eq!(d.next_message(), Err(TooLarge { len: 11, max: 10 }));
        let mut d = MessageDecoder::new(10);
        d.push(Bytes::from(message(10)));
        assert_eq!(
            d.next_message()
                .expect("at the limit")
                .map(|m| m.payload.len()),
            Some(10)
        );
    }

    #[test]
    fn a_message_cut_short_is_not_at_a_boundary() {
        let mut c = MessageCounter::default();
        assert_eq!(c.push(&message(10)[..8]), 1);
        assert!(!c.at_boundary());
    }
}
