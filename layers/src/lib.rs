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
//! | [`peek`] | [`PeekLayer`](peek::PeekLayer): the first request messages, readable and replayed, within a per-call and a per-connection ([`ConnectionBudget`](peek::ConnectionBudget)) budget |
//! | [`direct`] | [`DirectLayer`](direct::DirectLayer): a [`Director`](direct::Director) picks each call's route, or refuses it |
//! | [`fanout`] | [`FanoutLayer`](fanout::FanoutLayer): carries out fan-out (merge, interleave) and mirror routes, one inner call per destination |
//! | [`enrich`] | [`EnrichLayer`](enrich::EnrichLayer): strips, sets and appends request metadata; `forwarded`, `x-forwarded-for` and the client identity |
//! | [`identity`] | [`PeerIdentity`](identity::PeerIdentity), the verified client of a call, and [`IdentityRule`](identity::IdentityRule) to require one |
//! | [`drain`] | [`DrainLayer`](drain::DrainLayer): refuses new calls with `UNAVAILABLE` once draining, holds the drain open until in-flight bodies end |
//! | [`http`] | the `http` crate these layers are written against, re-exported so that your types match |
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
//! # In tonic, axum and hyper
//!
//! Every layer is a plain tower [`Layer`](tower_layer::Layer), so it goes
//! into `tonic::transport::Server::builder().layer(…)`, an axum
//! `Router::layer(…)` or a `tower::ServiceBuilder` in front of a hyper
//! connection. Three things depend on the server, because the layers never
//! see a socket:
//!
//! - [`peek`]'s per-connection budget: a server clones its services per
//!   connection or per request as it likes, so the budget is a
//!   [`ConnectionBudget`](peek::ConnectionBudget) handle the server hands
//!   in (see there, for tonic too) or one made per connection by
//!   [`PeekLayer::per_connection`](peek::PeekLayer::per_connection);
//! - [`enrich`]'s peer address: read from whatever extension the server
//!   fills, with [`EnrichLayer::peer_from`](enrich::EnrichLayer::peer_from)
//!   (tonic's `TcpConnectInfo`, axum's `ConnectInfo`);
//! - [`drain`]: the server's own graceful shutdown stops accepting and
//!   sends GOAWAY; [`DrainLayer`](drain::DrainLayer) refuses the calls that
//!   still arrive and bounds the wait for the calls in flight.
//!
//! The crate's examples run each under a real server and make real calls:
//! `tonic_server` (deadline, enrich and a per-connection peek budget under
//! tonic), `axum_router` (layers on an axum `Router` serving gRPC) and
//! `tonic_drain` (`DrainLayer` with tonic's `serve_with_shutdown`). `cargo
//! test` runs them; `cargo run -p sluice-layers --example tonic_drain`
//! runs one.
//!
//! The refusal texts are the library's, naming no product; a proxy sets its
//! own with [`DeadlineLayer::message`](deadline::DeadlineLayer::message),
//! [`DrainLayer::message`](drain::DrainLayer::message),
//! [`DrainLayer::expiry_message`](drain::DrainLayer::expiry_message) and
//! [`FanoutLayer::status_trailer`](fanout::FanoutLayer::status_trailer).
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

pub use http;

/// A type-erased error, the currency between layers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
