//! One read of the client's request body, copied by reference count to
//! every destination through a bounded queue each.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};
use tokio::sync::mpsc;

use super::report::Outcome;
use crate::{BoxError, direct::Overflow};

/// One frame of the client's body, as each destination gets it.
#[derive(Debug)]
pub(super) enum Item {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The client's body ended (END_STREAM).
    End,
    /// The client's body failed (a reset, a deadline above).
    Failed(Arc<str>),
}

/// The request body of one destination of a fan-out or mirror: the
/// client's frames, in order.
#[derive(Debug)]
pub(super) struct Tee {
    /// Frames read before the destinations were called.
    ready: std::collections::VecDeque<Item>,
    /// The rest, from the pump; `None` when `ready` holds the whole body.
    rx: Option<mpsc::Receiver<Item>>,
    ended: bool,
}

/// Why a destination's copy of the request body did not end cleanly.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body {0}")]
pub struct TeeError(String);

impl Tee {
    pub(super) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let item = match self.ready.pop_front() {
            Some(item) => Some(item),
            None => match &mut self.rx {
                Some(rx) => std::task::ready!(rx.poll_recv(cx)),
                None => None,
            },
        };
        Poll::Ready(match item {
            Some(Item::Data(d)) => Some(Ok(Frame::data(d))),
            Some(Item::Trailers(t)) => {
                self.ended = true;
                Some(Ok(Frame::trailers(t)))
            }
            Some(Item::End) => {
                self.ended = true;
                None
            }
            Some(Item::Failed(why)) => {
                self.ended = true;
                Some(Err(TeeError(format!("failed: {why}")).into()))
            }
            // The pump is gone without an end: never pass a cut-short
            // request on as complete.
            None => {
                self.ended = true;
                Some(Err(TeeError("was abandoned".to_owned()).into()))
            }
        })
    }

    pub(super) fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// One destination's end of the pump.
pub(super) struct Outlet {
    tx: Option<mpsc::Sender<Item>>,
    overflow: Overflow,
    /// Where a dropped destination is marked, and how it is cancelled.
    dropped: Option<(Arc<Mutex<Option<Outcome>>>, tokio::task::AbortHandle)>,
}

/// A queue of `capacity` frames for one destination.
pub(super) fn channel(capacity: usize) -> (mpsc::Sender<Item>, Tee) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        tx,
        Tee {
            ready: std::collections::VecDeque::new(),
            rx: Some(rx),
            ended: false,
        },
    )
}

/// The most frames [`prefetch`] reads.
const PREFETCH: usize = 8;

/// Reads what the client's body already has, without waiting: a unary
/// request usually is all there. Returns the frames and whether they are
/// the whole body (then no queue and no pump are needed).
pub(super) fn prefetch<B>(body: &mut B) -> (Vec<Item>, bool)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    let mut items = Vec::new();
    while items.len() < PREFETCH {
        if body.is_end_stream() {
            items.push(Item::End);
            return (items, true);
        }
        match Pin::new(&mut *body).poll_frame(&mut cx) {
            Poll::Pending => break,
            Poll::Ready(None) => {
                items.push(Item::End);
                return (items, true);
            }
            Poll::Ready(Some(Err(e))) => {
                items.push(Item::Failed(Arc::from(e.into().to_string())));
                return (items, true);
            }
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => items.push(Item::Data(data)),
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        items.push(Item::Trailers(trailers));
                        return (items, true);
                    }
                }
            },
        }
    }
    (items, false)
}

/// The body of one destination: `items` first, then (when they are not
/// the whole body) a queue the pump feeds. Returns the queue's sender.
pub(super) fn split(
    items: &[Item],
    complete: bool,
    capacity: usize,
) -> (Option<mpsc::Sender<Item>>, Tee) {
    let ready = items.iter().map(Item::copy).collect();
    if complete {
        return (
            None,
            Tee {
                ready,
                rx: None,
                ended: false,
            },
        );
    }
    let (tx, mut tee) = channel(capacity);
    tee.ready = ready;
    (Some(tx), tee)
}

impl Item {
    /// The same frame, sharing its bytes.
    fn copy(&self) -> Self {
        match self {
            Self::Data(d) => Self::Data(d.clone()),
            Self::Trailers(t) => Self::Trailers(t.clone()),
            Self::End => Self::End,
            Self::Failed(why) => Self::Failed(why.clone()),
        }
    }
}

impl Outlet {
    pub(super) fn new(tx: mpsc::Sender<Item>) -> Self {
        Self {
            tx: Some(tx),
            overflow: Overflow::Block,
            dropped: None,
        }
    }

    /// A secondary that is cancelled (through `task`) and marked dropped
    /// (in `slot`) when its queue is full.
    pub(super) fn dropping(
        tx: mpsc::Sender<Item>,
        slot: Arc<Mutex<Option<Outcome>>>,
        task: tokio::task::AbortHandle,
    ) -> Self {
        Self {
            tx: Some(tx),
            overflow: Overflow::Drop,
            dropped: Some((slot, task)),
        }
    }

    async fn send(&mut self, item: Item) {
        let Some(tx) = &self.tx else { return };
        let sent = match self.overflow {
            // Only data is dropped for: the end of the body waits for room,
            // as the primary (the first outlet) has it already.
            Overflow::Drop if matches!(item, Item::Data(_)) => match tx.try_send(item) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if let Some((slot, task)) = self.dropped.take() {
                        *slot.lock().expect("outcome lock") = Some(Outcome::Dropped);
                        task.abort();
                    }
                    false
                }
            },
            _ => tx.send(item).await.is_ok(),
        };
        if !sent {
            self.tx = None;
        }
    }
}

/// Reads the client's body once and hands every frame to every outlet:
/// `Bytes` are shared, never copied. Blocking outlets pace the reading;
/// a dropping outlet that is full is cut off. Ends when the body ends or
/// every outlet is gone.
pub(super) async fn pump<B>(mut body: B, mut outlets: Vec<Outlet>)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    loop {
        if outlets.iter().all(|o| o.tx.is_none()) {
            return;
        }
        // The error is turned into text at once: it need not be `Send`.
        let frame = std::future::poll_fn(|cx| {
            Pin::new(&mut body)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|e| Arc::<str>::from(e.into().to_string()))))
        })
        .await;
        let item = match frame {
            None => Item::End,
            Some(Err(why)) => Item::Failed(why),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => Item::Data(data),
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => Item::Trailers(trailers),
                    Err(_) => continue,
                },
            },
        };
        let last = !matches!(item, Item::Data(_));
        for outlet in &mut outlets {
            outlet.send(item.copy()).await;
        }
        if last {
            return;
        }
    }
}
