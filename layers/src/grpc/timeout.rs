//! The `grpc-timeout` header: at most 8 ASCII digits and a unit
//! (`H`ours, `M`inutes, `S`econds, `m`illiseconds, `u`microseconds,
//! `n`anoseconds).
//!
//! ```
//! use std::time::Duration;
//! use http::HeaderValue;
//! use sluice_layers::grpc::timeout::{encode, parse};
//!
//! assert_eq!(parse(&HeaderValue::from_static("250m")), Some(Duration::from_millis(250)));
//! assert_eq!(parse(&HeaderValue::from_static("1.5S")), None);
//! assert_eq!(encode(Duration::from_millis(1500)), "1500000u");
//! ```

use std::time::Duration;

use http::{HeaderMap, HeaderValue};

/// The `grpc-timeout` header name.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The largest number the spec allows in `grpc-timeout` (8 digits).
const MAX_DIGITS: usize = 8;
const MAX_VALUE: u64 = 99_999_999;

/// Parses a `grpc-timeout` value. Anything malformed (empty, too many digits,
/// an unknown unit, a sign) is `None`: the spec says such a header is
/// ignored rather than failing the call.
pub fn parse(value: &HeaderValue) -> Option<Duration> {
    let bytes = value.as_bytes();
    let (&unit, digits) = bytes.split_last()?;
    if digits.is_empty() || digits.len() > MAX_DIGITS || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Reads the call's timeout from its request headers, if it has a valid one.
pub fn from_headers(headers: &HeaderMap) -> Option<Duration> {
    headers.get(GRPC_TIMEOUT).and_then(parse)
}

/// Encodes `timeout` in the finest unit whose value fits in 8 digits,
/// rounding up, so the receiver never sees a shorter budget than was meant
/// (beyond its precision).
pub fn encode(timeout: Duration) -> HeaderValue {
    let nanos = timeout.as_nanos();
    let units: [(u128, u8); 6] = [
        (1, b'n'),
        (1_000, b'u'),
        (1_000_000, b'm'),
        (1_000_000_000, b'S'),
        (60_000_000_000, b'M'),
        (3_600_000_000_000, b'H'),
    ];
    for (scale, unit) in units {
        let value = nanos.div_ceil(scale);
        if value <= u128::from(MAX_VALUE) {
            return HeaderValue::try_from(format!("{value}{}", unit as char))
                .expect("digits and a unit letter are a valid header value");
        }
    }
    HeaderValue::from_static("99999999H")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &'static str) -> Option<Duration> {
        parse(&HeaderValue::from_static(s))
    }

    #[test]
    fn parses_every_unit() {
        assert_eq!(p("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(p("3M"), Some(Duration::from_secs(180)));
        assert_eq!(p("4S"), Some(Duration::from_secs(4)));
        assert_eq!(p("5m"), Some(Duration::from_millis(5)));
        assert_eq!(p("6u"), Some(Duration::from_micros(6)));
        assert_eq!(p("99999999n"), Some(Duration::from_nanos(99_999_999)));
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in ["", "m", "123456789m", "-1S", "1x", "1 S", "+1S"] {
            assert_eq!(parse(&HeaderValue::from_static(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn encode_round_trips_without_shortening() {
        for d in [
            Duration::from_nanos(1),
            Duration::from_millis(1234),
            Duration::from_secs(86_400 * 400),
            Duration::new(3, 1),
        ] {
            let back = parse(&encode(d)).expect("encode produces a valid value");
            assert!(back >= d, "{d:?} came back as {back:?}");
        }
    }
}
