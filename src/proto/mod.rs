//! HTTP/2 glue both sides of sluice use: write coalescing for a
//! connection ([`batch`]), sending and receiving under flow control
//! ([`flow`]), and the transports served and dialled ([`transport`]: TCP,
//! Unix sockets, TLS). None of it knows of config, routes or calls.

pub(crate) mod batch;
pub(crate) mod flow;
pub(crate) mod transport;
