//! A service that a config reload replaces while calls run.
//!
//! [`Switch`] holds the stack in force and a generation number; each
//! connection holds a [`Live`] clone of it. Per call, `Live` reads the
//! generation (one atomic load): when it moved, the connection takes a
//! clone of the new stack, else it calls the one it has. Calls already
//! running keep the stack (and the routes, groups and settings in it)
//! they started with.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use arc_swap::ArcSwap;
use tower::Service;

/// The service in force, replaced whole by [`Switch::store`].
#[derive(Debug)]
pub(crate) struct Switch<S> {
    current: ArcSwap<S>,
    /// Bumped after each store.
    generation: AtomicU64,
}

impl<S: Clone> Switch<S> {
    pub(crate) fn new(service: S) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(service),
            generation: AtomicU64::new(0),
        })
    }

    /// Puts `service` in force for calls that start from now on.
    pub(crate) fn store(&self, service: S) {
        self.current.store(Arc::new(service));
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// A service that follows this switch.
    pub(crate) fn live(self: &Arc<Self>) -> Live<S> {
        let seen = self.generation.load(Ordering::Acquire);
        Live {
            local: S::clone(&self.current.load()),
            seen,
            switch: self.clone(),
        }
    }
}

/// A connection's copy of the service in force, refreshed when a reload
/// stored a new one.
#[derive(Debug)]
pub(crate) struct Live<S> {
    switch: Arc<Switch<S>>,
    local: S,
    seen: u64,
}

impl<S: Clone> Clone for Live<S> {
    fn clone(&self) -> Self {
        // A fresh clone takes what is in force now.
        self.switch.live()
    }
}

impl<S, R> Service<R> for Live<S>
where
    S: Service<R> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Checked here, not in `call`: the service that said ready is the
        // one called.
        let now = self.switch.generation.load(Ordering::Acquire);
        if now != self.seen {
            self.local = S::clone(&self.switch.current.load());
            self.seen = now;
        }
        self.local.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        self.local.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::ServiceExt;

    /// A service that answers with its own number.
    #[derive(Clone, Debug)]
    struct Answer(u32);

    impl Service<()> for Answer {
        type Response = u32;
        type Error = Infallible;
        type Future = std::future::Ready<Result<u32, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, (): ()) -> Self::Future {
            std::future::ready(Ok(self.0))
        }
    }

    #[tokio::test]
    async fn a_connection_takes_the_new_service_at_its_next_call() {
        let switch = Switch::new(Answer(1));
        let mut conn = switch.live();
        assert_eq!(conn.ready().await.expect("ready").call(()).await, Ok(1));
        // A call that said ready before the store keeps what it saw.
        let ready = conn.ready().await.expect("ready");
        switch.store(Answer(2));
        assert_eq!(ready.call(()).await, Ok(1));
        assert_eq!(conn.ready().await.expect("ready").call(()).await, Ok(2));
        assert_eq!(switch.live().oneshot(()).await, Ok(2));
    }
}
