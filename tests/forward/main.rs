//! The forwarding core, driven through a real sluice with real tonic peers.
//! One module per behaviour of issue #3; see each module's doc.

mod support;

mod cancel;
mod conformance;
mod deadline;
mod drain;
mod enrich;
mod errors;
mod exposition;
mod fanout;
mod flow;
mod half_close;
mod headers_first;
mod hostile;
mod hygiene;
mod isolation;
mod leaks;
mod metrics;
mod routing;
// Shared with tests/memory.rs, which uses the parts this binary does not.
#[allow(dead_code)]
mod raw;
mod reload;
mod resilience;
mod tls;
mod trailers;
mod tunnel;
mod unix;
mod xds;
