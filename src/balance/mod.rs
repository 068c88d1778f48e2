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
mod outlier;
mod policy;
mod resolve;
mod retry;

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
use tower::Service;

use self::policy::RoutePolicy;
pub(crate) use self::{
    cluster::{ClusterGroups, Member, Pick},
    endpoint::{AgentEndpoint, Endpoint},
    error::BalanceError,
    group::{Group, Head, random_below},
    groups::{Groups, Snapshot},
    policy::RoutePolicy as Policy,
};
use crate::{
    forward::{Forward, Limits, ResponseBody},
    upstream::{Checkout, Slot},
};

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
    /// What a call may keep of its request for another attempt.
    limits: Limits,
}

impl<S> Balance<S> {
    pub(crate) fn new(
        inner: S,
        groups: &Groups,
        default_target: impl Into<Arc<str>>,
        limits: Limits,
    ) -> Self {
        Self {
            inner,
            targets: Arc::new(Targets {
                groups: groups.load_full(),
                default: default_target.into(),
                limits,
            }),
        }
    }
}

impl<B> Service<Request<B>> for Balance<Forward>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    // Boxed: the checkout is an `async fn`, whose future cannot be named.
    // The forwarder's future lives inside it.
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The call's own future, boxed once: no wrapper around it, as
        // each level of async nesting copies the whole state when built.
        Box::pin(Targets::call(self.targets.clone(), self.inner.clone(), req))
    }
}

/// One call's way through the balancer, from its route to the attempt
/// that answers.
struct Way<'a> {
    group: Arc<Group>,
    /// What messages name the group by.
    target: &'a str,
    /// The endpoint the route named, if it named one.
    endpoint_id: Option<&'a str>,
    /// Where a call whose dial fails goes next (an xDS priority).
    next: Option<Arc<Group>>,
    /// The places the call holds in wider limits, for every attempt.
    held: Option<Arc<dyn std::any::Any + Send + Sync>>,
    max_age: Option<std::time::Duration>,
}

impl Targets {
    async fn call<B>(
        self: Arc<Self>,
        forward: Forward,
        mut req: Request<B>,
    ) -> Result<Response<ResponseBody>, BoxError>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let route = req.extensions_mut().remove::<Route>();
        let (target, endpoint_id, policy): (&str, Option<&str>, Option<&RoutePolicy>) =
            match &route {
                None => (&self.default, None, None),
                Some(Route::One(destination)) => {
                    if let Some(edits) = destination.edits() {
                        edits.apply(req.headers_mut());
                    }
                    (
                        destination.target(),
                        destination.endpoint(),
                        destination.policy::<RoutePolicy>(),
                    )
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
            None => self.groups.get(target).cloned().ok_or_else(|| {
                BalanceError::Unroutable(format!("no upstream group named {target:?}"))
            })?,
        };
        // The route's own limits and faults first.
        let route_slot = match policy {
            Some(p) => {
                p.admit(
                    req.headers(),
                    req.extensions()
                        .get::<sluice_layers::identity::PeerIdentity>(),
                )
                .await?
            }
            None => None,
        };
        // Over its limit, a call fails at once: no queue (gRFC A32).
        // An xDS cluster's comes with it; a file group's is its own.
        let group_slot = match resolved.and_then(|r| r.limit).or_else(|| group.limit()) {
            Some((count, max)) => Some(Slot::take(&count, max).ok_or_else(|| {
                BalanceError::CircuitOpen(format!(
                    "{target}: {max} calls in flight already (max_requests)"
                ))
            })?),
            None => None,
        };
        let held: Option<Arc<dyn std::any::Any + Send + Sync>> = match (route_slot, group_slot) {
            (None, None) => None,
            (a, b) => Some(Arc::new((a, b))),
        };
        let way = Way {
            group,
            target,
            endpoint_id,
            next,
            held,
            max_age: policy.and_then(|p| p.max_stream_age),
        };
        let route_name = match &route {
            Some(Route::One(d)) => d.route_name().cloned(),
            _ => None,
        };
        let (res, endpoint) = match policy.and_then(|p| p.hedge.as_ref()) {
            // Boxed: hedging's state (its attempts, its timer) is large, and
            // every call's future would carry its size.
            Some(hedge) => {
                Box::pin(retry::hedged(&forward, &way, req, &self.limits, hedge)).await?
            }
            None => {
                retry::sequential(
                    &forward,
                    &way,
                    req,
                    &self.limits,
                    policy.and_then(|p| p.retry.as_ref()),
                )
                .await?
            }
        };
        let mut res = res;
        res.extensions_mut().insert(Chosen {
            group: way.group.name().clone(),
            endpoint: endpoint.label().clone(),
            route: route_name,
        });
        Ok(res)
    }
}

impl Way<'_> {
    /// The first attempt's endpoint: the one the route named, else the
    /// group's choice (waiting for one to join, in a hub's group).
    async fn first(&self, head: Head<'_>) -> Result<Arc<Endpoint>, BalanceError> {
        match self.endpoint_id {
            Some(id) => self.group.find(id).ok_or_else(|| {
                BalanceError::NoEndpoint(format!("{}: no endpoint {id:?}", self.target))
            }),
            None => self.group.pick_or_wait(head).await.ok_or_else(|| {
                let waited = self.group.wait();
                BalanceError::NoEndpoint(if waited.is_zero() {
                    self.target.to_string()
                } else {
                    format!("{} (waited {waited:?} for one to connect)", self.target)
                })
            }),
        }
    }

    /// A later attempt's endpoint: one not tried yet when the group has
    /// one (the route's own when it named one).
    fn again(&self, head: Head<'_>, tried: &[Arc<Endpoint>]) -> Option<Arc<Endpoint>> {
        match self.endpoint_id {
            Some(id) => self.group.find(id),
            None => self.group.pick_untried(head, tried),
        }
    }

    /// A stream slot on `endpoint`; when its dial fails, nothing was sent,
    /// and another endpoint of the group gets one try (not when the route
    /// named this one).
    async fn checkout(
        &self,
        head: Head<'_>,
        endpoint: &mut Arc<Endpoint>,
    ) -> Result<Checkout, BalanceError> {
        let mut checkout = match endpoint.pool().checkout().await {
            Ok(checkout) => checkout,
            Err(e) => match self
                .group
                .pick(head, Some(endpoint))
                .filter(|_| self.group.len() > 1 && self.endpoint_id.is_none())
                .or_else(|| self.next.as_ref().and_then(|g| g.pick(head, None)))
            {
                Some(other) => {
                    tracing::debug!(error = %e, "endpoint unreachable; trying another in its group");
                    if self.group.judges() {
                        self.group.ended(endpoint, None);
                    }
                    *endpoint = other;
                    endpoint
                        .pool()
                        .checkout()
                        .await
                        .map_err(BalanceError::Upstream)?
                }
                None => {
                    if self.group.judges() {
                        self.group.ended(endpoint, None);
                    }
                    return Err(BalanceError::Upstream(e));
                }
            },
        };
        if let Some(held) = &self.held {
            checkout.hold(held.clone());
        }
        crate::telemetry::trace::record_upstream(endpoint.address());
        Ok(checkout)
    }

    /// What is told how a committed call to `endpoint` ends, if anything
    /// learns from it.
    fn judge(&self, endpoint: &Arc<Endpoint>) -> Option<Arc<dyn crate::forward::Outcome>> {
        self.group.judges().then(|| {
            Arc::new(outlier::Judge {
                group: self.group.clone(),
                endpoint: endpoint.clone(),
            }) as Arc<dyn crate::forward::Outcome>
        })
    }
}
