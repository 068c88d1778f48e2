//! Tower layers for gRPC proxies that never decode protobuf.
//!
//! `sluice-layers` holds the pieces of the [sluice] proxy that are useful on
//! their own, in anyone's tower, hyper or tonic stack. Every layer works on
//! `http::Request<B>` / `http::Response<B>` with `B: http_body::Body<Data =
//! bytes::Bytes>`; none of them knows about sockets, and none of them decodes
//! protobuf.
//!
//! | module | what it gives you |
//! | --- | --- |
//! | [`grpc::status`] | a gRPC [`Code`](grpc::status::Code) enum and the one builder of trailers-only status responses |
//! | [`grpc::timeout`] | parsing and encoding of the `grpc-timeout` header |
//! | [`deadline`] | [`DeadlineLayer`](deadline::DeadlineLayer): enforces `grpc-timeout` on the whole call, body included |
//! | [`grpc::framing`] | counting length-prefixed messages over DATA chunks of any size |
//! | [`grpc::wire`] | reading one protobuf field by path (`1.2`) without a descriptor |
//! | [`peek`] | [`PeekLayer`](peek::PeekLayer): the first request messages, readable and replayed |
//! | [`direct`] | [`DirectLayer`](direct::DirectLayer): a [`Director`](direct::Director) picks each call's route, or refuses it |
//! | [`identity`] | [`PeerIdentity`](identity::PeerIdentity), the verified client of a call, and [`IdentityRule`](identity::IdentityRule) to require one |
//! | [`drain`] | [`DrainLayer`](drain::DrainLayer): refuses new calls with `UNAVAILABLE` once draining, holds the drain open until in-flight bodies end |
//!
//! Every refusal a layer makes is a gRPC response (HTTP 200, `grpc-status`,
//! percent-encoded `grpc-message`, no body), never an `Err`: a layer keeps
//! its inner service's error type.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Empty;
//! use sluice_layers::deadline::DeadlineLayer;
//! use sluice_layers::grpc::status::{self, Code};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! // An upstream that never answers.
//! let svc = ServiceBuilder::new()
//!     .layer(DeadlineLayer::new())
//!     .service_fn(|_req: Request<Empty<Bytes>>| async {
//!         std::future::pending::<Result<Response<Empty<Bytes>>, std::convert::Infallible>>().await
//!     });
//! let req = Request::builder()
//!     .header("grpc-timeout", "50m")
//!     .body(Empty::new())?;
//! let res = svc.oneshot(req).await?;
//! assert_eq!(status::code_of(res.headers()), Some(Code::DeadlineExceeded));
//! # Ok(())
//! # }
//! ```
//!
//! # Ordering
//!
//! Put [`drain`] outermost, so that a refusal while draining costs nothing
//! below it and every call let in is counted until its body ends. Put
//! [`peek`] above [`direct`], so the director sees the peeked messages.
//!
//! Put [`deadline`] outside every layer whose work the deadline should bound:
//! when it fires it drops the inner future or body, which cancels whatever
//! the layers below were doing (for sluice's forwarder: an RST_STREAM(CANCEL)
//! to the upstream).
//!
//! [sluice]: https://example.invalid/sluice
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![warn(clippy::print_stdout)]

#[macro_use]
mod macros;

pub mod deadline;
pub mod direct;
pub mod drain;
pub mod enrich;
pub mod fanout;
pub mod grpc;
pub mod identity;
pub mod peek;
#[cfg(test)]
mod test_util;

/// A type-erased error, the currency between layers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
