//! gRPC status codes and the trailers-only responses that carry them.
//!
//! Every refusal of a sluice layer (and of the sluice proxy) is built here, so
//! that each one is the same well-formed gRPC answer: HTTP 200,
//! `content-type: application/grpc`, `grpc-status`, a percent-encoded
//! `grpc-message`, and an empty body whose end is the end of the stream
//! ("trailers-only", as the [gRPC over HTTP/2] spec calls it).
//!
//! ```
//! use http_body_util::Empty;
//! use bytes::Bytes;
//! use sluice_layers::grpc::status::{self, Code};
//!
//! let res = status::trailers_only::<Empty<Bytes>>(Code::Unavailable, "upstream refused: 127.0.0.1:50051");
//! assert_eq!(res.status(), http::StatusCode::OK);
//! assert_eq!(res.headers()["grpc-status"], "14");
//! assert_eq!(status::code_of(res.headers()), Some(Code::Unavailable));
//! assert_eq!(res.headers()["grpc-message"], "upstream refused: 127.0.0.1:50051");
//! ```
//!
//! [gRPC over HTTP/2]: https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md

use http::{HeaderMap, HeaderValue, Response, header};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

/// The `grpc-status` header name.
pub const GRPC_STATUS: &str = "grpc-status";
/// The `grpc-message` header name.
pub const GRPC_MESSAGE: &str = "grpc-message";

/// The bytes the gRPC spec requires to be percent-encoded in `grpc-message`
/// besides everything outside ASCII (which `utf8_percent_encode` always
/// encodes): controls, DEL and `%` itself.
const MESSAGE_ENCODE_SET: &AsciiSet = &CONTROLS.add(b'%');

/// A gRPC status code, as carried by `grpc-status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u8)]
pub enum Code {
    /// Not an error.
    Ok = 0,
    /// The call was cancelled, typically by the caller.
    Cancelled = 1,
    /// Unknown error.
    Unknown = 2,
    /// The client gave an invalid argument.
    InvalidArgument = 3,
    /// The deadline expired before the call could complete.
    DeadlineExceeded = 4,
    /// Some requested entity was not found.
    NotFound = 5,
    /// The entity a client tried to create already exists.
    AlreadyExists = 6,
    /// The caller may not run the call.
    PermissionDenied = 7,
    /// Some resource (a quota, memory, a limit) is exhausted.
    ResourceExhausted = 8,
    /// The system is not in the state the call requires.
    FailedPrecondition = 9,
    /// The call was aborted, typically because of a concurrency conflict.
    Aborted = 10,
    /// The call went past a valid range.
    OutOfRange = 11,
    /// The call is not implemented or not supported.
    Unimplemented = 12,
    /// An internal invariant is broken.
    Internal = 13,
    /// The service is unavailable; retrying may succeed.
    Unavailable = 14,
    /// Unrecoverable data loss or corruption.
    DataLoss = 15,
    /// The call lacks valid credentials.
    Unauthenticated = 16,
}

// Static header values, so that building a status costs no formatting.
const CODE_VALUES: [HeaderValue; 17] = [
    HeaderValue::from_static("0"),
    HeaderValue::from_static("1"),
    HeaderValue::from_static("2"),
    HeaderValue::from_static("3"),
    HeaderValue::from_static("4"),
    HeaderValue::from_static("5"),
    HeaderValue::from_static("6"),
    HeaderValue::from_static("7"),
    HeaderValue::from_static("8"),
    HeaderValue::from_static("9"),
    HeaderValue::from_static("10"),
    HeaderValue::from_static("11"),
    HeaderValue::from_static("12"),
    HeaderValue::from_static("13"),
    HeaderValue::from_static("14"),
    HeaderValue::from_static("15"),
    HeaderValue::from_static("16"),
];

const ALL_CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

const NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

// === impl Code ===

impl Code {
    /// The code's canonical name, as the gRPC spec writes it.
    ///
    /// ```
    /// use sluice_layers::grpc::status::Code;
    /// assert_eq!(Code::PermissionDenied.name(), "PERMISSION_DENIED");
    /// assert_eq!(Code::from_name("permission_denied"), Some(Code::PermissionDenied));
    /// ```
    pub const fn name(self) -> &'static str {
        NAMES[self as usize]
    }

    /// The code with this canonical name, in any case.
    pub fn from_name(name: &str) -> Option<Self> {
        NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(name))
            .map(|i| ALL_CODES[i])
    }

    /// The numeric value of the code.
    pub const fn as_i32(self) -> i32 {
        self as i32
    }

    /// The code with numeric value `value`, if there is one.
    ///
    /// ```
    /// use sluice_layers::grpc::status::Code;
    /// assert_eq!(Code::from_i32(14), Some(Code::Unavailable));
    /// assert_eq!(Code::from_i32(17), None);
    /// ```
    pub fn from_i32(value: i32) -> Option<Self> {
        usize::try_from(value)
            .ok()
            .and_then(|i| ALL_CODES.get(i).copied())
    }

    /// The `grpc-status` header value for this code.
    pub fn header_value(self) -> HeaderValue {
        CODE_VALUES[self as usize].clone()
    }
}

/// Reads `grpc-status` from a header map (response headers of a
/// trailers-only answer, or trailers).
///
/// Returns `None` when the header is absent or is not a known code.
pub fn code_of(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get(GRPC_STATUS)?.to_str().ok()?;
    Code::from_i32(value.parse().ok()?)
}

/// Percent-encodes `message` for `grpc-message`, as the gRPC spec asks:
/// every byte outside printable ASCII, and `%`, becomes `%XX`.
///
/// ```
/// use sluice_layers::grpc::status::encode_message;
/// assert_eq!(encode_message("100% down ✗"), "100%25 down %E2%9C%97");
/// ```
pub fn encode_message(message: &str) -> HeaderValue {
    let encoded = utf8_percent_encode(message, MESSAGE_ENCODE_SET).to_string();
    HeaderValue::try_from(encoded).expect("percent-encoded text is visible ASCII")
}

/// Writes `grpc-status` and `grpc-message` for `code` and `message` into
/// `headers`, replacing any there. An empty `message` writes no
/// `grpc-message`.
pub fn insert(headers: &mut HeaderMap, code: Code, message: &str) {
    headers.insert(GRPC_STATUS, code.header_value());
    if message.is_empty() {
        headers.remove(GRPC_MESSAGE);
    } else {
        headers.insert(GRPC_MESSAGE, encode_message(message));
    }
}

/// A trailers block carrying `code` and `message`, to end a response whose
/// headers were already sent.
pub fn trailers(code: Code, message: &str) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(2);
    insert(&mut map, code, message);
    map
}

/// Which layer answered a call itself instead of passing it on. Every
/// trailers-only answer the layers of this crate build carries one in its
/// response extensions ([`answer`]), so that a metrics layer above can count
/// the answers by cause without knowing the layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Answered {
    /// A director refused the call ([`crate::direct`]).
    Refused,
    /// The first messages of the request exceeded the peek budget
    /// ([`crate::peek`]).
    PeekBudget,
    /// The call's deadline passed before the response began
    /// ([`crate::deadline`]).
    Deadline,
    /// The process is draining, or the drain deadline passed before the
    /// response began ([`crate::drain`]).
    Draining,
}

/// A trailers-only answer ([`trailers_only`]) that `by` gives, marked so in
/// its extensions.
///
/// ```
/// use http_body_util::Empty;
/// use bytes::Bytes;
/// use sluice_layers::grpc::status::{self, Answered, Code};
///
/// let res = status::answer::<Empty<Bytes>>(Answered::Refused, Code::PermissionDenied, "no");
/// assert_eq!(res.extensions().get::<Answered>(), Some(&Answered::Refused));
/// assert_eq!(status::code_of(res.headers()), Some(Code::PermissionDenied));
/// ```
pub fn answer<B: Default>(by: Answered, code: Code, message: &str) -> Response<B> {
    let mut res = trailers_only(code, message);
    res.extensions_mut().insert(by);
    res
}

/// Builds a trailers-only gRPC response: HTTP 200,
/// `content-type: application/grpc`, `grpc-status`, `grpc-message`, and an
/// empty body (`B::default()`, which must report its end at once, as
/// `http_body_util::Empty` does).
///
/// This is the one way sluice answers a call it will not or cannot forward.
pub fn trailers_only<B: Default>(code: Code, message: &str) -> Response<B> {
    let mut res = Response::new(B::default());
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(super::CONTENT_TYPE),
    );
    insert(headers, code, message);
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_header_value() {
        for code in ALL_CODES {
            let mut map = HeaderMap::new();
            map.insert(GRPC_STATUS, code.header_value());
            assert_eq!(code_of(&map), Some(code));
        }
    }

    #[test]
    fn message_encoding_keeps_printable_ascii_and_encodes_the_rest() {
        assert_eq!(encode_message("plain text: ok!"), "plain text: ok!");
        assert_eq!(encode_message("a\r\nb\0"), "a%0D%0Ab%00");
        assert_eq!(encode_message("50%"), "50%25");
        assert_eq!(encode_message("ünï"), "%C3%BCn%C3%AF");
    }

    #[test]
    fn empty_message_sends_no_grpc_message() {
        let map = trailers(Code::Internal, "");
        assert_eq!(map.get(GRPC_MESSAGE), None);
        assert_eq!(code_of(&map), Some(Code::Internal));
    }
}
