//! Endpoint choice as a layer of its own: [`Balance`] takes the call's
//! resolved destination (the group a route named, or one endpoint of it),
//! picks the endpoint, checks out a stream slot on one of its connections
//! inside its own future, tries one other endpoint when that dial fails
//! before anything was sent, hands the call and the slot to the endpoint
//! client below ([`Forward`](crate::forward::Forward)), and feeds the
//! endpoint's latency back to the strategy. What it chose travels with the
//! response as a [`Chosen`] extension, for telemetry to read.
//!
//! This room owns the groups ([`Groups`], one snapshot that each stack
//! holds and a config reload replaces with the stack), their endpoints and strategies
//! ([`group`]), DNS re-resolution ([`resolve`]), health checks
//! ([`health`]) and the endpoints of tunnel agents
//! ([`Endpoint::agent`]). The connection pool, the dialer and the
//! connection driver are [`upstream`](crate::upstream)'s.

mod cluster;
mod endpoint;
mod error;
mod group;
mod groups;
mod health;
mod resolve;

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use sluice_layers::{BoxError, direct::Route};
use tower::{Service, ServiceExt};

pub(crate) use self::{
    cluster::{ClusterGroups, Member, Pick},
    endpoint::{AgentEndpoint, Endpoint},
    error::BalanceError,
    group::{Group, Head, random_below},
    groups::{Groups, Snapshot},
};
use crate::{forward::Call, upstream::Slot};

/// What a call was sent to, in the response's extensions: the group, the
/// endpoint (its address, or an agent's id).
#[derive(Clone, Debug)]
pub(crate) struct Chosen {
    pub(crate) group: Arc<str>,
    pub(crate) endpoint: Arc<str>,
    /// The name of the route that sent the call, if it has one.
    pub(crate) route: Option<Arc<str>>,
}

/// A destination resolved above the balancer, outside the route table
/// (an xDS cluster): the group itself, and the count of calls in flight
/// that it may not pass (a circuit breaker's `max_requests`).
#[derive(Clone, Debug)]
pub(crate) struct Resolved {
    pub(crate) group: Arc<Group>,
    /// Where a call whose dial fails goes next (an xDS cluster's next
    /// priority).
    pub(crate) next: Option<Arc<Group>>,
    pub(crate) limit: Option<(Arc<std::sync::atomic::AtomicUsize>, usize)>,
}

/// The balancer: one endpoint per call, chosen from the group its route
/// names (the default target without a route).
///
/// Always ready: a call waits for an endpoint and a connection inside its
/// future, and fails with UNAVAILABLE if none can be had.
#[derive(Clone, Debug)]
pub(crate) struct Balance<S> {
    inner: S,
    // One pointer: a server holds one copy of its stack per connection,
    // and a call clones one `Arc`, not two.
    targets: Arc<Targets>,
}

#[derive(Debug)]
struct Targets {
    /// The groups as they were when this stack was built: a config reload
    /// builds a new stack, so a call keeps the groups its route was
    /// chosen against (DNS and agents change a group's endpoints inside
    /// it).
    groups: Arc<Snapshot>,
    /// The group of a call without a route.
    default: Arc<str>,
}

impl<S> Balance<S> {
    pub(crate) fn new(inner: S, groups: &Groups, default_target: impl Into<Arc<str>>) -> Self {
        Self {
            inner,
            targets: Arc::new(Targets {
                groups: groups.load_full(),
                default: default_target.into(),
            }),
        }
    }
}

impl<S, B, RB> Service<Request<B>> for Balance<S>
where
    S: Service<Call<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = BoxError;
    // Boxed: the checkout is an `async fn`, whose future cannot be named.
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let mut inner = self.inner.clone();
        let targets = self.targets.clone();
        Box::pin(async move {
            let route = req.extensions_mut().remove::<Route>();
            let (target, endpoint_id): (&str, Option<&str>) = match &route {
                None => (&targets.default, None),
                Some(Route::One(destination)) => {
                    if let Some(edits) = destination.edits() {
                        edits.apply(req.headers_mut());
                    }
                    (destination.target(), destination.endpoint())
                }
                Some(_) => return Err(BalanceError::Unroutable(
                    "a fan-out or mirror route reached the balancer; a FanoutLayer above carries those out"
                        .to_owned(),
                ).into()),
            };
            let mut resolved = req.extensions_mut().remove::<Resolved>();
            let next = resolved.as_mut().and_then(|r| r.next.take());
            let group = match &resolved {
                Some(r) => r.group.clone(),
                None => targets.groups.get(target).cloned().ok_or_else(|| {
                    BalanceError::Unroutable(format!("no upstream group named {target:?}"))
                })?,
            };
            // Over its limit, a call fails at once: no queue (gRFC A32).
            // An xDS cluster's comes with it; a file group's is its own.
            let slot = match resolved.and_then(|r| r.limit).or_else(|| group.limit()) {
                Some((count, max)) => Some(Slot::take(&count, max).ok_or_else(|| {
                    BalanceError::CircuitOpen(format!(
                        "{target}: {max} calls in flight already (max_requests)"
                    ))
                })?),
                None => None,
            };
            let mut endpoint = match endpoint_id {
                Some(id) => group.find(id).ok_or_else(|| {
                    BalanceError::NoEndpoint(format!("{target}: no endpoint {id:?}"))
                })?,
                None => group.pick_or_wait(Head::of(&req)).await.ok_or_else(|| {
                    let waited = group.wait();
                    BalanceError::NoEndpoint(if waited.is_zero() {
                        target.to_string()
                    } else {
                        format!("{target} (waited {waited:?} for one to connect)")
                    })
                })?,
            };
            let mut checkout = match endpoint.pool().checkout().await {
                Ok(checkout) => checkout,
                // Nothing was sent: another endpoint of the group gets one
                // try (not when the route named this one).
                Err(e) => match group
                    .pick(Head::of(&req), Some(&endpoint))
                    .filter(|_| group.len() > 1 && endpoint_id.is_none())
                    .or_else(|| next.as_ref().and_then(|g| g.pick(Head::of(&req), None)))
                {
                    Some(other) => {
                        tracing::debug!(error = %e, "endpoint unreachable; trying another in its group");
                        endpoint = other;
                        endpoint
                            .pool()
                            .checkout()
                            .await
                            .map_err(BalanceError::Upstream)?
                    }
                    None => return Err(BalanceError::Upstream(e).into()),
                },
            };
            if let Some(slot) = slot {
                checkout.hold(slot);
            }
            crate::telemetry::trace::record_upstream(endpoint.address());
            let sent = tokio::time::Instant::now();
            let call = Call {
                request: req,
                checkout,
            };
            // `ready` then `call`, not `oneshot`: the call goes straight to
            // the inner service instead of through a state that holds it
            // (one move of the whole request less per call).
            let mut res = inner
                .ready()
                .await
                .map_err(Into::into)?
                .call(call)
                .await
                .map_err(Into::into)?;
            endpoint.observe(sent.elapsed());
            let route = match &route {
                Some(Route::One(d)) => d.route_name().cloned(),
                _ => None,
            };
            res.extensions_mut().insert(Chosen {
                group: group.name().clone(),
                endpoint: endpoint.label().clone(),
                route,
            });
            Ok(res)
        })
    }
}
