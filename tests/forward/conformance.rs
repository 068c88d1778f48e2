//! Issue #9 §3: HTTP/2 conformance where h2spec found sluice wanting, one
//! test per h2spec case, each run in both modes: `server.non_grpc =
//! "refuse"` (sluice answers 415 itself, at once) and `"forward"` (the
//! request goes to an upstream). h2spec cannot be installed here (it is a Go
//! program; no registry we reach has it), so these raw-frame tests stand in
//! for the cases it reported.
//!
//! What made the refuse mode fail was sluice answering before the frames
//! behind a request were read, and ending the exchange under the client;
//! the 415 had no body either. Each test reads until the answer it expects
//! and fails if sluice goes quiet instead (`Raw::next` panics on silence).

use std::net::SocketAddr;

use crate::{raw::*, support::*};

#[derive(Clone, Copy, Debug)]
enum Mode {
    /// sluice answers every non-gRPC request 415, with a text body.
    Refuse,
    /// sluice forwards it to an upstream that behaves so.
    Forward(Behaviour),
}

/// A sluice in `mode`, with the config tuned; the upstream is kept alive
/// by the caller.
async fn start(
    mode: Mode,
    tune: impl FnOnce(&mut sluice::Config),
) -> (sluice::Running, Option<RawUpstream>) {
    trace_init();
    let (addr, upstream) = match mode {
        Mode::Refuse => (closed_addr(), None),
        Mode::Forward(behaviour) => {
            let up = RawUpstream::start(behaviour).await;
            (up.addr, Some(up))
        }
    };
    let mut config = config(addr);
    config.admin.listen = sluice::config::AdminListen::Off;
    if let Mode::Forward(_) = mode {
        config.server.non_grpc = sluice::config::NonGrpc::Forward;
    }
    tune(&mut config);
    (sluice::run(&config).await.expect("sluice"), upstream)
}

/// A request that is not gRPC, as h2spec sends them.
fn plain(method: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut fields: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b":method".to_vec(), method.as_bytes().to_vec()),
        (b":scheme".to_vec(), b"http".to_vec()),
        (b":path".to_vec(), b"/".to_vec()),
        (b":authority".to_vec(), b"sluice.test".to_vec()),
    ];
    for (k, v) in extra {
        fields.push((k.as_bytes().to_vec(), v.as_bytes().to_vec()));
    }
    block_of(&fields)
}

const BOTH: [Mode; 2] = [Mode::Refuse, Mode::Forward(Behaviour::Respond)];

/// Reads the answer on `stream` to its END_STREAM: HEADERS and DATA, and no
/// reset or GOAWAY on the way. Returns the DATA bytes.
async fn whole_answer(raw: &mut Raw, stream: u32, what: &str) -> Vec<u8> {
    let mut data = Vec::new();
    let mut headers = false;
    loop {
        let f = raw
            .until(|f| f.stream == stream || f.kind == GOAWAY)
            .await
            .unwrap_or_else(|| panic!("{what}: closed before the answer"));
        match f.kind {
            HEADERS => headers = true,
            DATA => data.extend_from_slice(&f.payload),
            WINDOW_UPDATE => continue,
            _ => panic!("{what}: {f:?} instead of the answer"),
        }
        if f.flags & END_STREAM != 0 {
            assert!(headers, "{what}: DATA before HEADERS");
            return data;
        }
    }
}

/// Reads until the RST_STREAM on `stream` or a GOAWAY; returns its code.
async fn error_on(raw: &mut Raw, stream: u32, what: &str) -> (u8, u32) {
    let f = raw
        .until(|f| (f.kind == RST_STREAM && f.stream == stream) || f.kind == GOAWAY)
        .await
        .unwrap_or_else(|| panic!("{what}: closed with no error frame"));
    (f.kind, f.error_code())
}

fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

fn initial_window(size: u32) -> Vec<u8> {
    let mut payload = vec![0, 4];
    payload.extend_from_slice(&size.to_be_bytes());
    frame(SETTINGS, 0, 0, &payload)
}

async fn handshake(addr: SocketAddr) -> Raw {
    Raw::handshake(addr).await
}

/// A raw h2 connection (prefaces and SETTINGS exchanged) to a sluice in
/// `mode`, which it keeps running (and its upstream) while it lives.
struct Connected {
    raw: Raw,
    mode: Mode,
    _sluice: sluice::Running,
    _up: Option<RawUpstream>,
}

async fn connected(mode: Mode) -> Connected {
    let (sluice, up) = start(mode, |_| {}).await;
    Connected {
        raw: handshake(sluice.listen_addr()).await,
        mode,
        _sluice: sluice,
        _up: up,
    }
}

impl Connected {
    /// [`whole_answer`] on `stream`, failures named by the mode.
    async fn answer(&mut self, stream: u32) -> Vec<u8> {
        let what = format!("{:?}", self.mode);
        whole_answer(&mut self.raw, stream, &what).await
    }

    /// [`error_on`] `stream`, failures named by the mode.
    async fn error(&mut self, stream: u32) -> (u8, u32) {
        let what = format!("{:?}", self.mode);
        error_on(&mut self.raw, stream, &what).await
    }

    /// Sends `frames` in one write, as h2spec does.
    async fn send_frames(&mut self, frames: &[Vec<u8>]) {
        self.raw.send(&frames.concat()).await;
    }

    /// Sets SETTINGS_INITIAL_WINDOW_SIZE and waits for the ACK.
    async fn settle_initial_window(&mut self, size: u32) {
        self.raw.send(&initial_window(size)).await;
        self.raw
            .until(|f| f.kind == SETTINGS && f.flags & ACK != 0)
            .await
            .expect("SETTINGS ACK");
    }
}

impl std::ops::Deref for Connected {
    type Target = Raw;
    fn deref(&self) -> &Raw {
        &self.raw
    }
}

impl std::ops::DerefMut for Connected {
    fn deref_mut(&mut self) -> &mut Raw {
        &mut self.raw
    }
}

/// The HEADERS of a POST on stream 1, its request left open.
fn post() -> Vec<u8> {
    frame(HEADERS, END_HEADERS, 1, &plain("POST", &[]))
}

/// Two WINDOW_UPDATEs on stream 1 that together push its window past
/// 2^31-1.
fn overflow() -> [Vec<u8>; 2] {
    [window_update(1, 0x7fff_ffff), window_update(1, 0x7fff_ffff)]
}

/// A whole GET on stream 1: HEADERS with END_STREAM.
fn get() -> Vec<u8> {
    frame(HEADERS, END_HEADERS | END_STREAM, 1, &plain("GET", &[]))
}

// h2spec generic/2.2: WINDOW_UPDATE on a half-closed (remote) stream is
// accepted: the answer comes whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_update_on_a_half_closed_stream_is_accepted() {
    for mode in BOTH {
        let mut raw = connected(mode).await;
        raw.send_frames(&[get(), window_update(1, 1)]).await;
        let body = raw.answer(1).await;
        assert!(!body.is_empty(), "{mode:?}: the answer has a body");
    }
}

// h2spec generic/2.3: PRIORITY on a half-closed (remote) stream likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_on_a_half_closed_stream_is_accepted() {
    for mode in BOTH {
        let mut raw = connected(mode).await;
        let priority = frame(0x2, 0, 1, &[0, 0, 0, 0, 15]);
        raw.send_frames(&[get(), priority]).await;
        raw.answer(1).await;
    }
}

// h2spec http2/5.1 (half-closed remote): DATA on it is STREAM_CLOSED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_on_a_half_closed_stream_is_stream_closed() {
    for mode in BOTH {
        let mut raw = connected(mode).await;
        raw.send_frames(&[get(), frame(DATA, 0, 1, b"x")]).await;
        let (_, code) = raw.error(1).await;
        // h2 names it PROTOCOL_ERROR where RFC 9113 says STREAM_CLOSED
        // (noted in #4); h2spec accepts either.
        assert!(
            matches!(code, STREAM_CLOSED | PROTOCOL_ERROR),
            "{mode:?}: {code}"
        );
    }
}

// h2spec http2/5.1 (closed): HEADERS after the client's RST_STREAM is
// STREAM_CLOSED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_after_rst_stream_are_stream_closed() {
    for mode in BOTH {
        let mut raw = connected(mode).await;
        let head = plain("POST", &[]);
        raw.send_frames(&[
            frame(HEADERS, END_HEADERS, 1, &head),
            frame(RST_STREAM, 0, 1, &CANCEL.to_be_bytes()),
            frame(HEADERS, END_HEADERS, 1, &head),
        ])
        .await;
        let (_, code) = raw.error(1).await;
        assert!(
            matches!(code, STREAM_CLOSED | PROTOCOL_ERROR),
            "{mode:?}: {code}"
        );
    }
}

// h2spec http2/5.1.2: a stream over SETTINGS_MAX_CONCURRENT_STREAMS is
// refused, whatever became of the ones before it: streams that sluice has
// answered but whose client has not finished still count, so an answered
// stream must not be cut off under the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_limit_holds_while_refusals_are_in_flight() {
    for mode in [Mode::Refuse, Mode::Forward(Behaviour::Hang)] {
        let (sluice, mut up) = start(mode, |c| c.server.max_concurrent_streams = 3).await;
        let mut raw = handshake(sluice.listen_addr()).await;
        let head = plain("POST", &[]);
        for stream in [1, 3, 5] {
            raw.send(&frame(HEADERS, END_HEADERS, stream, &head)).await;
            match up.as_mut() {
                // Answered in full (415 and its body) before the next one.
                None => {
                    whole_answer(&mut raw, stream, "415").await;
                }
                Some(up) => {
                    within("the upstream", up.heads.recv())
                        .await
                        .expect("forwarded");
                }
            }
        }
        raw.send(&frame(HEADERS, END_HEADERS, 7, &head)).await;
        let (kind, code) = error_on(&mut raw, 7, &format!("{mode:?}")).await;
        assert_eq!(kind, RST_STREAM, "{mode:?}: the stream, not the connection");
        assert!(
            matches!(code, REFUSED_STREAM | PROTOCOL_ERROR),
            "{mode:?}: {code}"
        );
    }
}

// h2spec http2/6.9: a WINDOW_UPDATE of 0 on a stream is a stream error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_window_update_on_a_stream_is_a_protocol_error() {
    for mode in BOTH {
        let mut raw = connected(mode).await;
        raw.send_frames(&[post(), window_update(1, 0)]).await;
        // RFC 9113 §6.9 names a stream error; h2 rejects the frame while
        // parsing it, before it looks at the stream, so it answers with the
        // connection error (h2spec accepts either).
        let (_, code) = raw.error(1).await;
        assert_eq!(code, PROTOCOL_ERROR, "{mode:?}");
    }
}

// h2spec http2/6.9.1: a stream window pushed past 2^31-1 is a stream
// FLOW_CONTROL_ERROR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_window_overflow_is_a_flow_control_error() {
    for mode in BOTH {
        let mut raw = connected(mode).await;
        let [first, second] = overflow();
        raw.send_frames(&[post(), first, second]).await;
        assert_eq!(
            raw.error(1).await,
            (RST_STREAM, FLOW_CONTROL_ERROR),
            "{mode:?}"
        );
    }
}

// The same, once the answer is complete (h2spec's frames came in
// separate reads, the 415 went out in between, and the overflow was not
// seen: 3 runs in 20): the request side is still open, so the overflow is
// still the stream's FLOW_CONTROL_ERROR (issue #17.15).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_window_overflow_after_the_answer_is_a_flow_control_error() {
    for mode in BOTH {
        let mut raw = connected(mode).await;
        raw.send(&post()).await;
        raw.answer(1).await;
        raw.send_frames(&overflow()).await;
        assert_eq!(
            raw.error(1).await,
            (RST_STREAM, FLOW_CONTROL_ERROR),
            "{mode:?}"
        );
    }
}

// h2spec http2/6.9.2 (1): SETTINGS_INITIAL_WINDOW_SIZE raised from 0 after
// the request lets exactly that much DATA through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_raised_after_the_request_lets_that_much_data_through() {
    for mode in BOTH {
        let mut raw = connected(mode).await;
        raw.settle_initial_window(0).await;
        raw.send(&get()).await;
        let head = raw
            .until(|f| f.stream == 1)
            .await
            .expect("the answer's HEADERS");
        assert_eq!(head.kind, HEADERS, "{mode:?}: {head:?}");
        raw.send(&initial_window(1)).await;
        let data = raw
            .until(|f| f.stream == 1 && f.kind == DATA)
            .await
            .unwrap_or_else(|| panic!("{mode:?}: no DATA"));
        assert_eq!(
            data.payload.len(),
            1,
            "{mode:?}: one byte of window, one byte"
        );
    }
}

// h2spec http2/6.9.2 (2): a SETTINGS change that makes a stream's window
// negative holds DATA back until WINDOW_UPDATEs bring it above zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negative_stream_window_holds_data_back_until_it_recovers() {
    for mode in BOTH {
        let mut raw = connected(mode).await;
        raw.settle_initial_window(3).await;
        raw.send(&get()).await;
        let mut got = 0;
        while got < 3 {
            let f = raw.until(|f| f.stream == 1).await.expect("the answer");
            if f.kind == DATA {
                got += f.payload.len();
            }
        }
        assert_eq!(got, 3, "{mode:?}: the initial window's worth");
        // Window 3 - 3 = 0; SETTINGS to 1 makes it -2; +3 brings it to 1.
        raw.send(&initial_window(1)).await;
        raw.send(&window_update(1, 3)).await;
        let f = raw
            .until(|f| f.stream == 1 && f.kind == DATA)
            .await
            .unwrap_or_else(|| panic!("{mode:?}: no DATA after the window recovered"));
        assert_eq!(f.payload.len(), 1, "{mode:?}: one byte of window left");
    }
}

// h2spec http2/8.1: a second HEADERS without END_STREAM is malformed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_headers_without_end_stream_is_a_protocol_error() {
    for mode in BOTH {
        let mut raw = connected(mode).await;
        let trailers = header_block(&[(b"x-trailer", b"1")]);
        raw.send_frames(&[post(), frame(HEADERS, END_HEADERS, 1, &trailers)])
            .await;
        let (_, code) = raw.error(1).await;
        assert_eq!(code, PROTOCOL_ERROR, "{mode:?}");
    }
}

// h2spec http2/8.1.2.6 (1 and 2): content-length must match the DATA, in
// one frame or several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_that_does_not_match_the_data_is_a_protocol_error() {
    for mode in BOTH {
        for (what, data) in [
            ("one frame", vec![frame(DATA, END_STREAM, 1, b"ab")]),
            (
                "two frames",
                vec![frame(DATA, 0, 1, b"a"), frame(DATA, END_STREAM, 1, b"b")],
            ),
        ] {
            let mut raw = connected(mode).await;
            let head = plain("POST", &[("content-length", "1")]);
            raw.send_frames(&[vec![frame(HEADERS, END_HEADERS, 1, &head)], data].concat())
                .await;
            let (_, code) = error_on(&mut raw, 1, &format!("{mode:?} {what}")).await;
            assert_eq!(code, PROTOCOL_ERROR, "{mode:?} {what}");
        }
    }
}

// h2spec http2/3.5: an invalid preface gets GOAWAY(PROTOCOL_ERROR).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_preface_gets_goaway_protocol_error() {
    for mode in BOTH {
        let (sluice, _up) = start(mode, |_| {}).await;
        let mut raw = Raw::connect(sluice.listen_addr()).await;
        raw.send(b"INVALID CONNECTION PREFACE\r\n\r\n").await;
        let goaway = raw
            .goaway()
            .await
            .unwrap_or_else(|| panic!("{mode:?}: closed without GOAWAY"));
        assert_eq!(goaway.error_code(), PROTOCOL_ERROR, "{mode:?}");
    }
}

// The refusal itself: a well-formed answer, 415 with a text body, and the
// stream closes only when the client is done (or after the linger).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_415_is_a_complete_exchange_that_waits_for_the_request_to_end() {
    let mut raw = connected(Mode::Refuse).await;
    raw.send(&frame(
        HEADERS,
        END_HEADERS,
        1,
        &plain("POST", &[("content-type", "text/plain")]),
    ))
    .await;
    let body = whole_answer(&mut raw, 1, "415").await;
    assert!(String::from_utf8_lossy(&body).contains("gRPC"), "{body:?}");
    // The client may finish its request: no reset came before, and the
    // body is read (its window given back) rather than cut off.
    raw.send(&frame(DATA, 0, 1, &[b'p'; 1000])).await;
    raw.send(&frame(DATA, END_STREAM, 1, b"end")).await;
    raw.send(&frame(PING, 0, 0, b"pingpong")).await;
    let f = raw
        .until(|f| f.kind == PING || f.stream == 1)
        .await
        .expect("an answer to the PING");
    assert_eq!(
        (f.kind, f.flags & ACK),
        (PING, ACK),
        "nothing more on the stream: {f:?}"
    );
}
