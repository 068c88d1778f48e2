//! One call's record and the bodies that fill it: the request body counts
//! what the client sends, the response body what the upstream answers and
//! the status in its trailers, and the call is written once, when the
//! response body ends or is dropped.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use sluice_layers::grpc::{
    framing::MessageCounter,
    status::{self, Code},
};

use super::{CallFamilies, CallLabels, Handles, code_label};
use crate::telemetry::{
    access::{AccessLog, Entry},
    refusals::Refusals,
};

/// One call's record, written once when the call ends.
#[derive(Debug)]
pub(super) struct Call {
    pub(super) families: Arc<CallFamilies>,
    pub(super) refusals: Refusals,
    pub(super) handles: Arc<Handles>,
    pub(super) start: Instant,
    pub(super) code: Option<Code>,
    /// The route and upstream group the call went to, if it went to one
    /// (`""` for a call no named route sent).
    pub(super) group: Option<(Arc<str>, Arc<str>)>,
    /// What the access log writes of the call, when it is on.
    pub(super) access: Option<Box<AccessCall>>,
    pub(super) recorded: bool,
}

/// The access log's view of one call, filled as it goes.
#[derive(Debug)]
pub(super) struct AccessCall {
    pub(super) log: AccessLog,
    pub(super) entry: Entry,
    /// Request bytes, counted by the request body.
    pub(super) bytes_in: Arc<std::sync::atomic::AtomicU64>,
}

impl Call {
    pub(super) fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let h = &self.handles;
        let slot = usize::try_from(code.as_i32()).map_or(2, |i| i.min(16));
        h.codes[slot]
            .get_or_init(|| {
                self.families
                    .calls
                    .get_or_create(&CallLabels {
                        service: h.labels.service.clone(),
                        method: h.labels.method.clone(),
                        grpc_code: code_label(code),
                    })
                    .clone()
            })
            .inc();
        let elapsed = self.start.elapsed();
        h.duration.observe(elapsed.as_secs_f64());
        if let Some(mut access) = self.access.take() {
            access.entry.status = code.as_i32();
            access.entry.duration = elapsed;
            access.entry.bytes_in = access.bytes_in.load(std::sync::atomic::Ordering::Relaxed);
            access.log.log(access.entry);
        }
        if let Some((route, group)) = &self.group {
            self.families.count_upstream(route, group, slot, code);
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // A body dropped before its end: the client went away.
        let code = self.code.unwrap_or(Code::Cancelled);
        self.finish(code);
    }
}

pin_project! {
    /// A request body that counts messages and bytes as they pass.
    #[derive(Debug)]
    pub(crate) struct MeteredRequest<B> {
        #[pin]
        pub(super) body: B,
        pub(super) counter: MessageCounter,
        pub(super) handles: Arc<Handles>,
        // The call's own count, for the access log.
        pub(super) bytes_in: Option<Arc<std::sync::atomic::AtomicU64>>,
    }
}

impl<B: Body<Data = Bytes>> Body for MeteredRequest<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.body.poll_frame(cx));
        if let Some(Ok(f)) = &frame
            && let Some(data) = f.data_ref()
        {
            this.handles.request_bytes.inc_by(data.len() as u64);
            if let Some(n) = this.bytes_in {
                n.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            let n = this.counter.push(data);
            if n > 0 {
                this.handles.request_messages.inc_by(n as u64);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

pin_project! {
    /// A response body that counts messages and bytes, reads the status
    /// from the trailers, and records the call when it ends or is dropped.
    #[derive(Debug)]
    pub(crate) struct MeteredResponse<B> {
        #[pin]
        pub(super) body: B,
        pub(super) counter: MessageCounter,
        pub(super) call: Call,
    }
}

impl<B: Body<Data = Bytes>> Body for MeteredResponse<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.body.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    this.call.handles.response_bytes.inc_by(data.len() as u64);
                    if let Some(access) = this.call.access.as_mut() {
                        access.entry.bytes_out += data.len() as u64;
                    }
                    let n = this.counter.push(data);
                    if n > 0 {
                        this.call.handles.response_messages.inc_by(n as u64);
                    }
                } else if let Some(trailers) = f.trailers_ref() {
                    this.call.code = Some(status::code_of(trailers).unwrap_or(Code::Unknown));
                    if let Some(access) = this.call.access.as_mut() {
                        access.entry.message = trailers.get(status::GRPC_MESSAGE).cloned();
                    }
                }
            }
            Some(Err(_)) => this.call.code = Some(Code::Cancelled),
            None => {
                let code = this.call.code.unwrap_or(Code::Unknown);
                this.call.finish(code);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
