//! What the layers share about gRPC on HTTP/2: status codes and the
//! trailers-only responses built from them, and the `grpc-timeout` header.

pub mod framing;
pub mod status;
pub mod timeout;
pub mod wire;

/// The `content-type` of every gRPC call this crate produces.
pub const CONTENT_TYPE: &str = "application/grpc";

/// Whether a `content-type` header value names gRPC (`application/grpc`,
/// optionally followed by `+proto`, `+json`, ... or `;` parameters).
///
/// ```
/// use http::HeaderValue;
/// use sluice_layers::grpc::is_grpc_content_type;
///
/// assert!(is_grpc_content_type(&HeaderValue::from_static("application/grpc+proto")));
/// assert!(!is_grpc_content_type(&HeaderValue::from_static("application/grpc-web")));
/// ```
pub fn is_grpc_content_type(value: &http::HeaderValue) -> bool {
    let Some(rest) = value.as_bytes().strip_prefix(CONTENT_TYPE.as_bytes()) else {
        return false;
    };
    matches!(rest.first(), None | Some(b'+' | b';'))
}
