//! `[enrich]`: what sluice adds to, and strips from, every call's request
//! metadata.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `[enrich]`. Off unless given: with nothing set, a call's head passes
/// untouched and costs nothing.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnrichConfig {
    /// Keys whose inbound values are dropped first (keys this hop owns, so
    /// that a client cannot spoof them).
    pub strip: Vec<String>,
    /// Key prefixes dropped the same way, e.g. `x-sluice-`.
    pub strip_prefixes: Vec<String>,
    /// Keys removed.
    pub remove: Vec<String>,
    /// Keys set to a value, replacing the client's.
    pub set: BTreeMap<String, String>,
    /// Values added after the client's.
    pub append: BTreeMap<String, String>,
    /// Add an RFC 7239 `forwarded: for=<client address>` element.
    pub forwarded: bool,
    /// Add the client's IP to `x-forwarded-for`.
    pub x_forwarded_for: bool,
    /// Give a call without an `x-request-id` a generated one.
    pub request_id: bool,
    /// The key the verified client identity goes under (inbound copies
    /// stripped): `x-sluice-client-id` when client certificates are
    /// verified and this is unset; `""` turns it off.
    pub client_id: Option<String>,
}
