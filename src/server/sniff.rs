//! What a new connection speaks, from its first bytes: the HTTP/2 preface
//! goes on to the HTTP/2 server (with the bytes read so far replayed); an
//! HTTP/1.x request gets a well-formed HTTP/1.1 answer; anything else gets
//! the connection error RFC 9113 §3.4 asks for.
//!
//! Sniffing reads (rather than peeks), so waiting for more bytes is waiting
//! for an event, and it works on any transport. Every wait here is bounded
//! by the caller's handshake deadline: a peer that sends `GET` and nothing
//! more, or trickles a preface a byte at a time, is cut off with it.

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::{Instant, timeout_at},
};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The preface plus the header of the first frame, which must be SETTINGS.
const SNIFF_LEN: usize = PREFACE.len() + 9;
const SETTINGS: u8 = 0x4;
/// The content type of a TLS handshake record, then its major version.
const TLS_HANDSHAKE: u8 = 0x16;
/// How much of an HTTP/1 request head sluice reads before answering, so that
/// closing does not turn into a reset that loses the answer.
const HTTP1_HEAD_MAX: usize = 16 * 1024;
/// Longest HTTP/1 method token looked for: longer runs of capitals are not
/// a request line.
const METHOD_MAX: usize = 16;
/// Longest HTTP/1 request line waited for before deciding it is not one.
const REQUEST_LINE_MAX: usize = 8 * 1024;

/// What the first bytes say.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Protocol {
    /// The HTTP/2 preface, then a SETTINGS frame header.
    Http2,
    /// An HTTP/1.x request line.
    Http1,
    /// Bytes that are neither the preface nor HTTP/1, or the preface
    /// followed by a first frame that is not SETTINGS: a connection error
    /// PROTOCOL_ERROR (RFC 9113 §3.4).
    BadPreface,
    /// A TLS record (a ClientHello): a TLS client on the h2c port.
    Tls,
    /// The peer closed before deciding anything.
    Closed,
}

/// Reads until the first bytes decide the protocol; returns it with the
/// bytes read, which belong to whoever serves the connection next.
///
/// # Errors
///
/// The transport's read error, or `TimedOut` at `deadline`.
pub(super) async fn sniff<T>(io: &mut T, deadline: Instant) -> std::io::Result<(Protocol, Bytes)>
where
    T: AsyncRead + Unpin,
{
    // Holds at most the preface or an HTTP/1 request line.
    let mut buf = BytesMut::with_capacity(SNIFF_LEN);
    loop {
        if let Some(protocol) = decide(&buf) {
            return Ok((protocol, buf.freeze()));
        }
        let n = timeout_at(deadline, io.read_buf(&mut buf))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        if n == 0 {
            return Ok((Protocol::Closed, buf.freeze()));
        }
    }
}

/// The protocol `bytes` show, or `None` while they could still be either.
fn decide(bytes: &[u8]) -> Option<Protocol> {
    match bytes {
        [] | [TLS_HANDSHAKE] => return None,
        [TLS_HANDSHAKE, 3, ..] => return Some(Protocol::Tls),
        _ => {}
    }
    let preface = bytes.len().min(PREFACE.len());
    if bytes[..preface] == PREFACE[..preface] {
        if bytes.len() < SNIFF_LEN {
            return None;
        }
        return Some(if bytes[PREFACE.len() + 3] == SETTINGS {
            Protocol::Http2
        } else {
            Protocol::BadPreface
        });
    }
    // An HTTP/1 request line: METHOD SP target SP HTTP/1.x CRLF. Anything
    // else that is not the preface (h2spec sends "INVALID CONNECTION
    // PREFACE") is a bad preface.
    let method = bytes.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match bytes.get(method) {
        // "PRI " diverging from the preface later is broken HTTP/2.
        Some(b' ') if method > 0 && &bytes[..method] != b"PRI" => {}
        None if method < METHOD_MAX => return None,
        _ => return Some(Protocol::BadPreface),
    }
    let Some(end) = bytes.windows(2).position(|w| w == b"\r\n") else {
        return if bytes.len() < REQUEST_LINE_MAX {
            None
        } else {
            Some(Protocol::BadPreface)
        };
    };
    let line = &bytes[..end];
    let version = line.rsplit(|b| *b == b' ').next().unwrap_or_default();
    let parts = line.split(|b| *b == b' ').count();
    Some(
        if parts == 3 && version.len() == 8 && version.starts_with(b"HTTP/1.") {
            Protocol::Http1
        } else {
            Protocol::BadPreface
        },
    )
}

/// Answers a connection with a bad preface: the server preface (an empty
/// SETTINGS), then GOAWAY(PROTOCOL_ERROR, last stream 0), then closes
/// once the peer has stopped sending or `deadline` passes.
pub(super) async fn refuse_bad_preface<T>(mut io: T, deadline: Instant)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    const GOAWAY: u8 = 0x7;
    const PROTOCOL_ERROR: u32 = 0x1;
    let mut out = Vec::with_capacity(9 + 17);
    out.extend_from_slice(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&[0, 0, 8, GOAWAY, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&PROTOCOL_ERROR.to_be_bytes());
    let _ = timeout_at(deadline, async {
        io.write_all(&out).await?;
        io.shutdown().await?;
        // Drain what the peer sends until it closes, so that closing is a
        // FIN, not a reset that could destroy the GOAWAY before it is read.
        let mut sink = [0u8; 4096];
        while io.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Answers a TLS ClientHello on the h2c port with a fatal
/// `handshake_failure` alert (a plaintext record, as every TLS stack can
/// read before encryption starts), so that the client fails at once with a
/// TLS error instead of waiting for a ServerHello; then closes.
pub(super) async fn refuse_tls<T>(mut io: T, deadline: Instant)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    const ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28];
    let _ = timeout_at(deadline, async {
        io.write_all(&ALERT).await?;
        io.shutdown().await?;
        let mut sink = [0u8; 4096];
        while io.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Answers an HTTP/1.x request with 505 and closes the connection; `head`
/// is what the sniffer read of the request already.
pub(super) async fn refuse_http1<T>(mut io: T, head: Bytes, deadline: Instant)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let _ = timeout_at(deadline, async {
        // Read the request head first: closing a socket with unread bytes
        // sends a reset, which can destroy the answer before the client
        // reads it.
        let mut head = BytesMut::from(&head[..]);
        while head.len() < HTTP1_HEAD_MAX && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            if io.read_buf(&mut head).await? == 0 {
                break;
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
        io.write_all(response.as_bytes()).await?;
        io.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bytes_decide_once_they_can() {
        assert_eq!(decide(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(decide(b"POST /x HTTP/1.0\r\nhost"), Some(Protocol::Http1));
        // A request line still arriving could be anything yet.
        assert_eq!(decide(b"POST "), None);
        assert_eq!(decide(b"GE"), None);
        // h2spec 3.5: capitals and spaces, but not a request line.
        assert_eq!(
            decide(b"INVALID CONNECTION PREFACE\r\n\r\n"),
            Some(Protocol::BadPreface)
        );
        assert_eq!(decide(b"P"), None);
        assert_eq!(decide(b"PRI * HTTP/2.0\r\n"), None);
        // A TLS ClientHello is told so; a lone 0x16 waits for one more.
        assert_eq!(decide(b"\x16\x03\x01"), Some(Protocol::Tls));
        assert_eq!(decide(b"\x16"), None);
        assert_eq!(decide(b"\x16\x04"), Some(Protocol::BadPreface));
        // Lowercase, or a preface that diverges.
        assert_eq!(decide(b"get / HTTP/1.1"), Some(Protocol::BadPreface));
        assert_eq!(
            decide(b"PRI * HTTP/2.0\r\n\r\nXX"),
            Some(Protocol::BadPreface)
        );
        assert_eq!(decide(b"ABCDEFGHIJKLMNOPQRST"), Some(Protocol::BadPreface));
        let mut good = PREFACE.to_vec();
        good.extend_from_slice(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]);
        assert_eq!(decide(&good), Some(Protocol::Http2));
        good[PREFACE.len() + 3] = 0x8;
        assert_eq!(decide(&good), Some(Protocol::BadPreface));
    }

    #[tokio::test]
    async fn a_trickled_preface_is_read_as_it_comes_and_replayed() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let sniffing = tokio::spawn(async move {
            let deadline = Instant::now() + std::time::Duration::from_secs(5);
            sniff(&mut server, deadline).await.expect("sniff")
        });
        let mut bytes = PREFACE.to_vec();
        bytes.extend_from_slice(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0, 0xAA]);
        for b in &bytes {
            client.write_all(&[*b]).await.expect("write");
        }
        let (protocol, read) = sniffing.await.expect("task");
        assert_eq!(protocol, Protocol::Http2);
        assert_eq!(
            &read[..],
            &bytes[..read.len()],
            "the bytes read come back in order"
        );
        assert!(read.len() >= SNIFF_LEN);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_mid_preface_is_cut_off_at_the_deadline() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"PRI * HT").await.expect("write");
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let err = sniff(&mut server, deadline).await.expect_err("times out");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        drop(client);
    }
}
