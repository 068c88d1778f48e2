//! The forwarding core, driven through a real sluice with real tonic peers.
//! One module per behaviour of issue #3; see each module's doc.

mod support;

mod cancel;
mod deadline;
mod drain;
mod errors;
mod flow;
mod half_close;
mod headers_first;
mod hygiene;
mod leaks;
mod metrics;
mod trailers;
