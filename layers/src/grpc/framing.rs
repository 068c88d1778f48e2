//! Incremental reading of gRPC's length-prefixed message framing over DATA
//! chunks of any size: each message is a 1-byte compressed flag, a 4-byte
//! big-endian length, then the message.
//!
//! [`MessageCounter`] counts message boundaries without copying or keeping
//! any payload byte, however the messages are split across chunks.
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

    /// Whether the bytes so far end exactly at a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.prefix_seen == 0 && self.remaining == 0
    }
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
    fn a_message_cut_short_is_not_at_a_boundary() {
        let mut c = MessageCounter::default();
        assert_eq!(c.push(&message(10)[..8]), 1);
        assert!(!c.at_boundary());
    }
}
