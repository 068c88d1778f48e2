//! What a new connection speaks, from its first bytes, without consuming
//! them: the HTTP/2 preface goes on to hyper; an HTTP/1.x request gets a
//! well-formed HTTP/1.1 answer instead of a closed socket.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The preface plus the header of the first frame, which must be SETTINGS.
const SNIFF_LEN: usize = PREFACE.len() + 9;
const SETTINGS: u8 = 0x4;
/// Pause between peeks while the preface arrives in pieces: peeking again
/// at once would spin on the bytes already there.
const PARTIAL_PAUSE: Duration = Duration::from_millis(5);
/// How much of an HTTP/1 request head sluice reads before answering, so that
/// closing does not turn into a reset that loses the answer.
const HTTP1_HEAD_MAX: usize = 16 * 1024;

/// What the first bytes say.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Protocol {
    /// The HTTP/2 preface (or bytes that are neither it nor HTTP/1, which
    /// h2 answers with a connection error).
    Http2,
    /// An HTTP/1.x request line.
    Http1,
    /// The preface, then a first frame that is not SETTINGS: a connection
    /// error PROTOCOL_ERROR (RFC 9113 §3.4), which h2 does not check.
    NotSettingsFirst,
    /// The peer closed before saying anything.
    Closed,
}

/// Peeks until the first bytes decide the protocol.
pub(super) async fn sniff(tcp: &TcpStream) -> std::io::Result<Protocol> {
    let mut buf = [0u8; SNIFF_LEN];
    loop {
        let n = tcp.peek(&mut buf).await?;
        if n == 0 {
            return Ok(Protocol::Closed);
        }
        let preface = n.min(PREFACE.len());
        if buf[..preface] != PREFACE[..preface] {
            return Ok(if looks_like_http1(&buf[..n]) {
                Protocol::Http1
            } else {
                Protocol::Http2
            });
        }
        if n == SNIFF_LEN {
            return Ok(if buf[PREFACE.len() + 3] == SETTINGS {
                Protocol::Http2
            } else {
                Protocol::NotSettingsFirst
            });
        }
        tokio::time::sleep(PARTIAL_PAUSE).await;
    }
}

/// Answers a connection whose first frame is not SETTINGS: the server
/// preface (an empty SETTINGS), then GOAWAY(PROTOCOL_ERROR, last stream 0).
pub(super) async fn refuse_bad_preface(mut tcp: TcpStream) {
    const GOAWAY: u8 = 0x7;
    const PROTOCOL_ERROR: u32 = 0x1;
    let mut out = Vec::with_capacity(9 + 17);
    out.extend_from_slice(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&[0, 0, 8, GOAWAY, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&PROTOCOL_ERROR.to_be_bytes());
    let _ = tcp.write_all(&out).await;
    let _ = tcp.shutdown().await;
    // Drain what the peer already sent, so closing is a FIN, not a reset
    // that could destroy the GOAWAY before it is read.
    let mut sink = [0u8; 4096];
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(100), tcp.read(&mut sink)).await
    {
        if n == 0 {
            break;
        }
    }
}

/// An HTTP/1 request line starts with an uppercase method token and a space.
fn looks_like_http1(bytes: &[u8]) -> bool {
    let method_len = bytes.iter().take_while(|b| b.is_ascii_uppercase()).count();
    method_len > 0
        && &bytes[..method_len] != b"PRI"
        && (bytes.len() == method_len || bytes[method_len] == b' ')
}

/// Answers an HTTP/1.x request with 505 and closes the connection.
pub(super) async fn refuse_http1(mut tcp: TcpStream) {
    // Read the request head first: closing a socket with unread bytes sends
    // a reset, which can destroy the answer before the client reads it.
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while head.len() < HTTP1_HEAD_MAX && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    let body = "sluice serves gRPC over HTTP/2 only (h2c with prior knowledge on this port)\n";
    let response = format!(
        "HTTP/1.1 505 HTTP Version Not Supported\r\n\
         content-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.write_all(response.as_bytes()).await;
    let _ = tcp.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_http1_request_lines_from_other_bytes() {
        assert!(looks_like_http1(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http1(b"POST"));
        assert!(looks_like_http1(b"PUT /x"));
        assert!(!looks_like_http1(b"\x16\x03\x01")); // a TLS ClientHello
        assert!(!looks_like_http1(b"get / HTTP/1.1"));
        // "PRI * HTTP/2.0" diverging late is broken HTTP/2, not HTTP/1.
        assert!(!looks_like_http1(b"PRI * HTTP/2.0\r\n\r\nXX"));
    }
}
