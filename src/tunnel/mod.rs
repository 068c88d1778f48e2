//! Reverse tunnels: agents in networks that accept no inbound connection
//! dial a hub; after an HTTP/1.1 Upgrade ([`handshake`]) the roles reverse
//! and the hub is the HTTP/2 client of the agent, which serves each call
//! through its normal stack to its local upstream. One HTTP/2 stream per
//! tunnelled call, so flow control, cancellation and deadlines are
//! HTTP/2's own, per call (konnectivity multiplexes every connection of an
//! agent on one gRPC stream, and one slow consumer stalls them all).
//!
//! The hub ([`hub`]) makes each accepted agent an endpoint of an upstream
//! group, keyed by its id and identifiers, so routes and strategies choose
//! among agents with no routing code of their own. The agent ([`agent`])
//! keeps one tunnel per desired hub with Teleport's tracker
//! ([`tracker`]).

pub(crate) mod agent;
pub(crate) mod handshake;
pub(crate) mod hub;
pub(crate) mod tracker;
