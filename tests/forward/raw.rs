//! A raw HTTP/2 frame client: writes bytes to a `TcpStream` and parses what
//! comes back, so tests can send what the `h2` crate refuses to (malformed
//! headers, bad frames, floods).

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub(crate) const DATA: u8 = 0;
pub(crate) const HEADERS: u8 = 1;
pub(crate) const RST_STREAM: u8 = 3;
pub(crate) const SETTINGS: u8 = 4;
pub(crate) const PING: u8 = 6;
pub(crate) const GOAWAY: u8 = 7;
pub(crate) const WINDOW_UPDATE: u8 = 8;
pub(crate) const CONTINUATION: u8 = 9;

pub(crate) const END_STREAM: u8 = 0x1;
pub(crate) const ACK: u8 = 0x1;
pub(crate) const END_HEADERS: u8 = 0x4;

pub(crate) const NO_ERROR: u32 = 0x0;
pub(crate) const PROTOCOL_ERROR: u32 = 0x1;
pub(crate) const FLOW_CONTROL_ERROR: u32 = 0x3;
pub(crate) const STREAM_CLOSED: u32 = 0x5;
pub(crate) const FRAME_SIZE_ERROR: u32 = 0x6;
pub(crate) const REFUSED_STREAM: u32 = 0x7;
pub(crate) const CANCEL: u32 = 0x8;
pub(crate) const COMPRESSION_ERROR: u32 = 0x9;
pub(crate) const ENHANCE_YOUR_CALM: u32 = 0xb;

/// How long a read may see nothing at all before the test fails: sluice
/// always answers, or closes, well within it.
pub(crate) const QUIET_LIMIT: Duration = Duration::from_secs(10);

/// What a read saw.
#[derive(Debug)]
pub(crate) enum Read {
    Frame(Frame),
    /// sluice closed the connection (FIN or reset).
    Closed,
    /// Nothing came within the limit.
    Quiet,
}

/// One frame as read off the wire.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) kind: u8,
    pub(crate) flags: u8,
    pub(crate) stream: u32,
    pub(crate) payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY.
    pub(crate) fn error_code(&self) -> u32 {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().expect("4 bytes"))
    }

    /// The last-stream-id of a GOAWAY.
    pub(crate) fn last_stream_id(&self) -> u32 {
        u32::from_be_bytes(self.payload[..4].try_into().expect("4 bytes")) & 0x7fff_ffff
    }
}

/// Encodes one frame.
pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small frame");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn hpack_int(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | u8::try_from(value).expect("fits the prefix"));
        return;
    }
    out.push(first | u8::try_from(max).expect("prefix"));
    value -= max;
    while value >= 128 {
        out.push(u8::try_from(value % 128).expect("7 bits") | 0x80);
        value /= 128;
    }
    out.push(u8::try_from(value).expect("7 bits"));
}

/// An HPACK header block of literal fields (never indexed, no Huffman), in
/// the given order, bytes exactly as given: malformed fields included.
pub(crate) fn header_block(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        hpack_int(&mut out, 0x00, 4, 0);
        hpack_int(&mut out, 0x00, 7, name.len());
        out.extend_from_slice(name);
        hpack_int(&mut out, 0x00, 7, value.len());
        out.extend_from_slice(value);
    }
    out
}

/// The fields of a well-formed gRPC request to `/sluice.test.Echo/{method}`.
pub(crate) fn grpc_fields(method: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    vec![
        (b":method".to_vec(), b"POST".to_vec()),
        (b":scheme".to_vec(), b"http".to_vec()),
        (
            b":path".to_vec(),
            format!("/sluice.test.Echo/{method}").into_bytes(),
        ),
        (b":authority".to_vec(), b"sluice.test".to_vec()),
        (b"content-type".to_vec(), b"application/grpc".to_vec()),
        (b"te".to_vec(), b"trailers".to_vec()),
    ]
}

pub(crate) fn block_of(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let refs: Vec<(&[u8], &[u8])> = fields
        .iter()
        .map(|(n, v)| (n.as_slice(), v.as_slice()))
        .collect();
    header_block(&refs)
}

/// A raw connection.
pub(crate) struct Raw {
    pub(crate) tcp: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub(crate) async fn connect(addr: SocketAddr) -> Self {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        Self {
            tcp,
            buf: Vec::new(),
        }
    }

    /// Connects, sends the preface and empty SETTINGS, and ACKs the
    /// server's SETTINGS.
    pub(crate) async fn handshake(addr: SocketAddr) -> Self {
        let mut raw = Self::connect(addr).await;
        raw.send(PREFACE).await;
        raw.send(&frame(SETTINGS, 0, 0, &[])).await;
        let settings = raw
            .until(|f| f.kind == SETTINGS && f.flags & ACK == 0)
            .await;
        assert!(settings.is_some(), "server sent no SETTINGS");
        raw.send(&frame(SETTINGS, ACK, 0, &[])).await;
        raw
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.expect("write");
    }

    /// Writes, but reports a closed or stalled connection instead of failing.
    pub(crate) async fn try_send(&mut self, bytes: &[u8], limit: Duration) -> bool {
        matches!(
            tokio::time::timeout(limit, self.tcp.write_all(bytes)).await,
            Ok(Ok(()))
        )
    }

    /// Sends a well-formed gRPC request's HEADERS on `stream`.
    pub(crate) async fn request(&mut self, stream: u32, method: &str, end_stream: bool) {
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        let block = block_of(&grpc_fields(method));
        self.send(&frame(HEADERS, flags, stream, &block)).await;
    }

    /// The next frame, or `None` once sluice has closed the connection.
    ///
    /// # Panics
    ///
    /// When neither a frame nor the close comes within [`QUIET_LIMIT`]:
    /// sluice going quiet is never an answer a test may accept.
    pub(crate) async fn next(&mut self) -> Option<Frame> {
        match self.next_within(QUIET_LIMIT).await {
            Read::Frame(f) => Some(f),
            Read::Closed => None,
            Read::Quiet => {
                panic!("sluice went quiet: no frame and no close within {QUIET_LIMIT:?}")
            }
        }
    }

    /// Reads until the connection closes, answering PINGs only if
    /// `answer_pings`; returns every frame read. Panics if it is still open
    /// after `limit`.
    pub(crate) async fn until_closed(&mut self, limit: Duration) -> Vec<Frame> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await {
                Read::Frame(f) => frames.push(f),
                Read::Closed => return frames,
                Read::Quiet => {
                    panic!("the connection is still open after {limit:?}; read {frames:?}")
                }
            }
        }
    }

    /// The next frame, the close, or silence for `limit`.
    pub(crate) async fn next_within(&mut self, limit: Duration) -> Read {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let head: Vec<u8> = self.buf.drain(..9 + len).collect();
                    return Read::Frame(Frame {
                        kind: head[3],
                        flags: head[4],
                        stream: u32::from_be_bytes(head[5..9].try_into().expect("4 bytes"))
                            & 0x7fff_ffff,
                        payload: head[9..].to_vec(),
                    });
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk)).await {
                Ok(Ok(0) | Err(_)) => return Read::Closed,
                Err(_) => return Read::Quiet,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads frames until one matches (answering PINGs on the way), or the
    /// connection closes.
    pub(crate) async fn until(&mut self, mut pred: impl FnMut(&Frame) -> bool) -> Option<Frame> {
        while let Some(f) = self.next().await {
            if pred(&f) {
                return Some(f);
            }
            if f.kind == PING && f.flags & ACK == 0 {
                let _ = self
                    .try_send(&frame(PING, ACK, 0, &f.payload), Duration::from_secs(1))
                    .await;
            }
        }
        None
    }

    /// Reads until the server closes the connection; returns the GOAWAY it
    /// sent on the way, if any.
    pub(crate) async fn goaway(&mut self) -> Option<Frame> {
        self.until(|f| f.kind == GOAWAY).await
    }
}

/// The resident memory of this test process, in bytes.
pub(crate) fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}
