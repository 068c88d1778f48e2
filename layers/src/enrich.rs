//! Middleware that edits a call's request metadata on the way through:
//! strips keys a client must not be able to set, removes, sets and appends
//! static values, and adds the peer's address as `forwarded` (RFC 7239)
//! and `x-forwarded-for`, and the verified client identity (a
//! [`PeerIdentity`] extension) under a key of its own.
//!
//! The peer address comes from the request's extensions: by default a
//! [`PeerAddr`], which a server puts there (sluice's does when an enrich
//! rule needs it); [`EnrichLayer::peer_from`] reads it from any other
//! extension, such as tonic's `TcpConnectInfo` or axum's `ConnectInfo`.
//! A call with no peer address gets no forwarding headers, and the layer
//! logs one warning (`tracing`), the first time, saying so. The
//! order is fixed: strip (inbound copies of keys this hop owns go first),
//! remove, set, append, the client identity, then the forwarding headers. The body passes
//! untouched; a request id (`x-request-id` when absent) is tower-http's
//! `SetRequestIdLayer`, which composes with this layer.
//!
//! On the response side, the wire-level metadata of Talos's `AppendInfo`
//! is a [`fanout`](crate::fanout) route's job; a fan-out to a single
//! destination gives one upstream's replies that enrichment.
//!
//! # Example
//!
//! ```
//! use std::net::SocketAddr;
//! use bytes::Bytes;
//! use http::{HeaderMap, Request, Response};
//! use http_body_util::Empty;
//! use sluice_layers::enrich::{EnrichLayer, PeerAddr};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), sluice_layers::BoxError> {
//! let layer = EnrichLayer::new()
//!     .strip_prefix("x-sluice-")
//!     .set(http::HeaderName::from_static("x-env"), "prod".parse()?)
//!     .forwarded()
//!     .x_forwarded_for();
//! let svc = ServiceBuilder::new().layer(layer).service_fn(|req: Request<Empty<Bytes>>| async move {
//!     // The upstream sees what the layer made of the head.
//!     let mut res = Response::new(Empty::<Bytes>::new());
//!     *res.headers_mut() = req.headers().clone();
//!     Ok::<_, std::convert::Infallible>(res)
//! });
//!
//! let mut req = Request::new(Empty::new());
//! req.headers_mut().insert("x-sluice-client-id", "spoofed".parse()?);
//! req.headers_mut().insert("x-forwarded-for", "10.0.0.1".parse()?);
//! req.extensions_mut().insert(PeerAddr("192.0.2.7:4711".parse::<SocketAddr>()?));
//! let seen: HeaderMap = svc.oneshot(req).await?.headers().clone();
//! assert!(seen.get("x-sluice-client-id").is_none());
//! assert_eq!(seen["x-env"], "prod");
//! assert_eq!(seen["forwarded"], "for=\"192.0.2.7:4711\"");
//! assert_eq!(seen["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
//! # Ok(())
//! # }
//! ```
//!
//! Under tonic, the peer address is in tonic's `TcpConnectInfo`; one line
//! reads it from there:
//!
//! ```
//! use sluice_layers::enrich::EnrichLayer;
//! use tonic::transport::server::TcpConnectInfo;
//!
//! let layer = EnrichLayer::new()
//!     .x_forwarded_for()
//!     .peer_from(|ext| ext.get::<TcpConnectInfo>()?.remote_addr());
//! # let _ = tonic::transport::Server::builder().layer(layer);
//! ```
//!
//! (axum: `ext.get::<axum::extract::ConnectInfo<SocketAddr>>().map(|c| c.0)`,
//! with `into_make_service_with_connect_info::<SocketAddr>()`.) The
//! crate's `tonic_server` and `axum_router` examples run these.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use http::{Extensions, HeaderMap, HeaderName, HeaderValue, Request};
use tower_layer::Layer;
use tower_service::Service;

use crate::identity::PeerIdentity;

/// The address of the peer that sent a request, as a request extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Reads the peer's address out of a request's extensions (see
/// [`EnrichLayer::peer_from`]).
pub type PeerFrom = fn(&Extensions) -> Option<SocketAddr>;

#[derive(Clone, Debug)]
struct Rules {
    strip: Vec<HeaderName>,
    strip_prefixes: Vec<String>,
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
    append: Vec<(HeaderName, HeaderValue)>,
    forwarded: bool,
    x_forwarded_for: bool,
    /// The key [`PeerIdentity::id`] goes under (inbound copies stripped).
    client_id: Option<HeaderName>,
    peer_from: PeerFrom,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            strip: Vec::new(),
            strip_prefixes: Vec::new(),
            remove: Vec::new(),
            set: Vec::new(),
            append: Vec::new(),
            forwarded: false,
            x_forwarded_for: false,
            client_id: None,
            peer_from: peer_addr_extension,
        }
    }
}

/// [`Layer`] that applies [`Enrich`] middleware.
///
/// See the [module docs](crate::enrich) for an example.
#[derive(Clone, Debug, Default)]
pub struct EnrichLayer {
    rules: Arc<Rules>,
    /// Whether the missing-peer warning was logged, shared by every
    /// service the layer makes (and their clones): one warning per layer.
    warned: Arc<AtomicBool>,
}

/// Middleware that edits request metadata.
///
/// See the [module docs](crate::enrich) for an example.
#[derive(Clone, Debug)]
pub struct Enrich<S> {
    inner: S,
    rules: Arc<Rules>,
    warned: Arc<AtomicBool>,
}

const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The default of [`EnrichLayer::peer_from`].
fn peer_addr_extension(ext: &Extensions) -> Option<SocketAddr> {
    ext.get::<PeerAddr>().map(|p| p.0)
}

// === impl EnrichLayer ===

impl EnrichLayer {
    /// A layer that changes nothing until told to.
    pub fn new() -> Self {
        Self::default()
    }

    fn with(mut self, f: impl FnOnce(&mut Rules)) -> Self {
        f(Arc::make_mut(&mut self.rules));
        self
    }

    /// Removes every inbound value of `key` before anything is added.
    #[must_use]
    pub fn strip(self, key: HeaderName) -> Self {
        self.with(|r| r.strip.push(key))
    }

    /// Removes every inbound key starting with `prefix` (lowercase, e.g.
    /// `x-sluice-`) before anything is added.
    #[must_use]
    pub fn strip_prefix(self, prefix: impl Into<String>) -> Self {
        self.with(|r| r.strip_prefixes.push(prefix.into().to_ascii_lowercase()))
    }

    /// Removes `key`.
    #[must_use]
    pub fn remove(self, key: HeaderName) -> Self {
        self.with(|r| r.remove.push(key))
    }

    /// Sets `key` to `value`, replacing what the client sent.
    #[must_use]
    pub fn set(self, key: impl Into<HeaderName>, value: HeaderValue) -> Self {
        let key = key.into();
        self.with(|r| r.set.push((key, value)))
    }

    /// Adds `value` to `key`, after what the client sent.
    #[must_use]
    pub fn append(self, key: impl Into<HeaderName>, value: HeaderValue) -> Self {
        let key = key.into();
        self.with(|r| r.append.push((key, value)))
    }

    /// Adds an RFC 7239 `forwarded: for=<peer>` element (needs the peer's
    /// address: see [`peer_from`](Self::peer_from)).
    #[must_use]
    pub fn forwarded(self) -> Self {
        self.with(|r| r.forwarded = true)
    }

    /// Adds the peer's IP to `x-forwarded-for`, one comma-separated value
    /// (needs the peer's address: see [`peer_from`](Self::peer_from)).
    #[must_use]
    pub fn x_forwarded_for(self) -> Self {
        self.with(|r| r.x_forwarded_for = true)
    }

    /// Strips every inbound value of `key`, then sets it to the call's
    /// [`PeerIdentity::id`] when the request carries a [`PeerIdentity`]
    /// (sluice's default key is `x-sluice-client-id`). A call without a
    /// verified identity reaches the upstream without the key, so the
    /// upstream can trust whatever value it sees.
    #[must_use]
    pub fn client_id(self, key: HeaderName) -> Self {
        self.with(|r| r.client_id = Some(key))
    }

    /// Sets where [`forwarded`](Self::forwarded) and
    /// [`x_forwarded_for`](Self::x_forwarded_for) read the peer's address
    /// in a request's extensions (default: a [`PeerAddr`] extension). A
    /// call with none gets no forwarding headers, and the first such call
    /// logs a warning.
    ///
    /// See the [module docs](crate::enrich) for tonic's and axum's.
    #[must_use]
    pub fn peer_from(self, f: PeerFrom) -> Self {
        self.with(|r| r.peer_from = f)
    }

    /// Whether any rule needs the peer's address.
    pub fn needs_peer(&self) -> bool {
        self.rules.forwarded || self.rules.x_forwarded_for
    }

    /// Whether the layer changes nothing.
    pub fn is_empty(&self) -> bool {
        let r = &self.rules;
        r.strip.is_empty()
            && r.strip_prefixes.is_empty()
            && r.remove.is_empty()
            && r.set.is_empty()
            && r.append.is_empty()
            && !self.needs_peer()
            && r.client_id.is_none()
    }
}

impl<S> Layer<S> for EnrichLayer {
    type Service = Enrich<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Enrich {
            inner,
            rules: self.rules.clone(),
            warned: self.warned.clone(),
        }
    }
}

// === impl Enrich ===

impl<S> Enrich<S> {
    /// Wraps `inner` with the rules of `layer`.
    pub fn new(inner: S, layer: &EnrichLayer) -> Self {
        layer.layer(inner)
    }

    /// Returns an empty [`EnrichLayer`].
    pub fn layer() -> EnrichLayer {
        EnrichLayer::new()
    }

    inner_accessors!();
}

impl<S, B> Service<Request<B>> for Enrich<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let peer = if self.rules.forwarded || self.rules.x_forwarded_for {
            let peer = (self.rules.peer_from)(req.extensions()).map(PeerAddr);
            if peer.is_none() && !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "enrich: a call has no peer address, so it gets no forwarded or \
                     x-forwarded-for header (the server must put the address in the \
                     request extensions; see EnrichLayer::peer_from); said once"
                );
            }
            peer
        } else {
            None
        };
        let id = match &self.rules.client_id {
            Some(_) => req
                .extensions()
                .get::<PeerIdentity>()
                .and_then(|id| HeaderValue::from_str(id.id()).ok()),
            None => None,
        };
        self.rules.apply(req.headers_mut(), peer, id);
        self.inner.call(req)
    }
}

impl Rules {
    /// `client_id`: the verified identity, if the call has one.
    fn apply(
        &self,
        headers: &mut HeaderMap,
        peer: Option<PeerAddr>,
        client_id: Option<HeaderValue>,
    ) {
        for key in self.strip.iter().chain(&self.remove).chain(&self.client_id) {
            headers.remove(key);
        }
        if !self.strip_prefixes.is_empty() {
            let doomed: Vec<HeaderName> = headers
                .keys()
                .filter(|k| {
                    self.strip_prefixes
                        .iter()
                        .any(|p| k.as_str().starts_with(p.as_str()))
                })
                .cloned()
                .collect();
            for key in doomed {
                headers.remove(key);
            }
        }
        for (key, value) in &self.set {
            headers.insert(key.clone(), value.clone());
        }
        for (key, value) in &self.append {
            headers.append(key.clone(), value.clone());
        }
        // Last: no other rule can change or remove it.
        if let (Some(key), Some(id)) = (&self.client_id, client_id) {
            headers.insert(key.clone(), id);
        }
        let Some(PeerAddr(peer)) = peer else {
            return;
        };
        if self.forwarded {
            // RFC 7239 §4 and §6: a node with a port (or an IPv6 address)
            // holds ':', which a token may not: the value is quoted.
            let node = format!("for=\"{peer}\"");
            if let Ok(v) = HeaderValue::try_from(node) {
                headers.append(FORWARDED, v);
            }
        }
        if self.x_forwarded_for {
            let ip = peer.ip().to_string();
            let list = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
                Some(before) if !before.trim().is_empty() => format!("{before}, {ip}"),
                _ => ip,
            };
            if let Ok(v) = HeaderValue::try_from(list) {
                headers.insert(X_FORWARDED_FOR, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(layer: &EnrichLayer, headers: &[(&str, &str)], peer: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::try_from(*k).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        layer
            .rules
            .apply(&mut h, Some(PeerAddr(peer.parse().expect("addr"))), None);
        h
    }

    #[test]
    fn strips_before_it_adds_and_quotes_ipv6() {
        let layer = EnrichLayer::new()
            .strip(HeaderName::from_static("x-role"))
            .strip_prefix("X-Sluice-")
            .set(
                HeaderName::from_static("x-role"),
                HeaderValue::from_static("sidecar"),
            )
            .append(
                HeaderName::from_static("x-hop"),
                HeaderValue::from_static("b"),
            )
            .remove(HeaderName::from_static("x-debug"))
            .forwarded()
            .x_forwarded_for();
        let h = applied(
            &layer,
            &[
                ("x-role", "admin"),
                ("x-sluice-client-id", "spoofed"),
                ("x-sluice-other", "spoofed"),
                ("x-hop", "a"),
                ("x-debug", "1"),
                ("forwarded", "for=10.0.0.1"),
            ],
            "[2001:db8::1]:4711",
        );
        let all = |k: &str| -> Vec<&str> {
            h.get_all(k)
                .iter()
                .map(|v| v.to_str().expect("ascii"))
                .collect()
        };
        assert_eq!(all("x-role"), ["sidecar"]);
        assert!(all("x-sluice-client-id").is_empty() && all("x-sluice-other").is_empty());
        assert_eq!(all("x-hop"), ["a", "b"]);
        assert!(all("x-debug").is_empty());
        assert_eq!(
            all("forwarded"),
            ["for=10.0.0.1", "for=\"[2001:db8::1]:4711\""]
        );
        assert_eq!(all("x-forwarded-for"), ["2001:db8::1"]);
        assert!(layer.needs_peer() && !layer.is_empty());
        assert!(EnrichLayer::new().is_empty());
    }

    #[tokio::test]
    async fn the_client_id_is_the_verified_identity_and_never_the_clients() {
        use crate::identity::IdentityParts;
        use tower::{ServiceExt, service_fn};
        let key = HeaderName::from_static("x-sluice-client-id");
        // A prefix strip of the same family must not take the identity.
        let layer = EnrichLayer::new()
            .strip_prefix("x-sluice-")
            .client_id(key.clone());
        assert!(!layer.is_empty());
        let seen = |identity: Option<PeerIdentity>| {
            let layer = layer.clone();
            async move {
                let svc = layer.layer(service_fn(|req: Request<()>| async move {
                    Ok::<_, std::convert::Infallible>(req.headers().clone())
                }));
                let mut req = Request::new(());
                req.headers_mut()
                    .append("x-sluice-client-id", HeaderValue::from_static("spoofed"));
                if let Some(id) = identity {
                    req.extensions_mut().insert(id);
                }
                let h = svc.oneshot(req).await.expect("infallible");
                h.get_all("x-sluice-client-id")
                    .iter()
                    .map(|v| v.to_str().expect("ascii").to_owned())
                    .collect::<Vec<_>>()
            }
        };
        let web = PeerIdentity::new(IdentityParts {
            uris: vec!["spiffe://td/web".into()],
            ..IdentityParts::default()
        });
        assert_eq!(seen(Some(web)).await, ["spiffe://td/web"]);
        assert!(seen(None).await.is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_peer_comes_from_any_extension_and_its_absence_is_said_once() {
        use tower::{ServiceExt, service_fn};
        #[derive(Clone)]
        struct ConnInfo(SocketAddr);
        let warnings = crate::test_util::CountWarnings::default();
        let _default = tracing::subscriber::set_default(warnings.clone());
        let layer = EnrichLayer::new()
            .x_forwarded_for()
            .forwarded()
            .peer_from(|ext| ext.get::<ConnInfo>().map(|c| c.0));
        let svc = layer.layer(service_fn(|req: Request<()>| async move {
            Ok::<_, std::convert::Infallible>(req.headers().clone())
        }));
        let seen = |ext: Option<ConnInfo>, peer_addr: Option<PeerAddr>| {
            let svc = svc.clone();
            async move {
                let mut req = Request::new(());
                if let Some(c) = ext {
                    req.extensions_mut().insert(c);
                }
                if let Some(p) = peer_addr {
                    req.extensions_mut().insert(p);
                }
                svc.oneshot(req).await.expect("infallible")
            }
        };
        let addr: SocketAddr = "192.0.2.7:4711".parse().expect("addr");
        let h = seen(Some(ConnInfo(addr)), None).await;
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["forwarded"], "for=\"192.0.2.7:4711\"");
        assert_eq!(warnings.count(), 0);
        // `peer_from` replaces the default: a PeerAddr alone is not read.
        let h = seen(None, Some(PeerAddr(addr))).await;
        assert!(!h.contains_key("x-forwarded-for") && !h.contains_key("forwarded"));
        assert_eq!(warnings.count(), 1, "a call without a peer is said");
        let h = seen(None, None).await;
        assert!(!h.contains_key("x-forwarded-for"));
        assert_eq!(warnings.count(), 1, "once per layer, across clones");
        // A layer that needs no peer says nothing.
        let quiet = EnrichLayer::new().strip_prefix("x-internal-");
        let svc = quiet.layer(service_fn(|_: Request<()>| async {
            Ok::<_, std::convert::Infallible>(())
        }));
        svc.oneshot(Request::new(())).await.expect("infallible");
        assert_eq!(warnings.count(), 1);
    }
}
