//! Header hygiene (RFC 9113 §8.2.2): what a hop must not pass on.
//!
//! h2 refuses to send connection-specific fields at all, so they are
//! removed here rather than failing the call. Everything else (content-type,
//! grpc-encoding, grpc-accept-encoding, grpc-timeout, user-agent, custom
//! text and `-bin` metadata) passes byte for byte.

use http::{HeaderMap, header};

/// Whether `name` is a connection-specific field (or `host`, which HTTP/2
/// carries as `:authority`).
fn is_hop_by_hop(name: &header::HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::HOST
        || name == "keep-alive"
        || name == "proxy-connection"
}

/// Removes the fields that must not cross a hop. `te` stays only as
/// `trailers`, the one value HTTP/2 allows and gRPC requires.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // A normal gRPC call has none of these: one scan, no hashing, and the
    // map is touched only when there is something to remove.
    if headers.keys().any(is_hop_by_hop) {
        let names: Vec<_> = headers
            .keys()
            .filter(|n| is_hop_by_hop(n))
            .cloned()
            .collect();
        for name in names {
            headers.remove(name);
        }
    }
    if let Some(te) = headers.get(header::TE)
        && te != "trailers"
    {
        headers.remove(header::TE);
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn strips_connection_specific_fields_and_keeps_the_rest() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive"),
            ("keep-alive", "5"),
            ("proxy-connection", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
            ("x-custom", "v"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        h.insert("x-bin-bin", HeaderValue::from_static("AP8="));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "te", "x-bin-bin", "x-custom"]);
    }

    #[test]
    fn te_other_than_trailers_is_dropped() {
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("te").is_none());
    }
}
