//! Criterion micro-benchmarks of the per-call code sluice adds on top of
//! hyper and h2: the deadline layer against a bare service, the status
//! builder, and `grpc-timeout` parsing.

use std::convert::Infallible;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderValue, Request, Response};
use http_body_util::Empty;
use sluice_layers::{
    deadline::DeadlineLayer,
    grpc::{status, timeout},
};
use tower::{Layer, Service, ServiceExt, service_fn};

fn grpc_headers(c: &mut Criterion) {
    let value = HeaderValue::from_static("250m");
    c.bench_function("grpc_timeout_parse", |b| {
        b.iter(|| timeout::parse(std::hint::black_box(&value)))
    });
    c.bench_function("status_trailers_only", |b| {
        b.iter(|| {
            status::trailers_only::<Empty<Bytes>>(
                status::Code::Unavailable,
                std::hint::black_box("upstream 127.0.0.1:50051 unreachable: connection refused"),
            )
        })
    });
}

fn deadline_layer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let bare = service_fn(|_req: Request<Empty<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
    });
    let layered = DeadlineLayer::new().layer(bare);
    let mut group = c.benchmark_group("deadline_layer_per_call");
    group.bench_function("bare_service_fn", |b| {
        b.to_async(&rt).iter(|| async {
            let mut svc = bare;
            svc.ready()
                .await
                .expect("ready")
                .call(Request::new(Empty::new()))
                .await
        })
    });
    group.bench_function("without_grpc_timeout", |b| {
        b.to_async(&rt).iter(|| async {
            let mut svc = layered.clone();
            svc.ready()
                .await
                .expect("ready")
                .call(Request::new(Empty::new()))
                .await
        })
    });
    group.bench_function("with_grpc_timeout", |b| {
        b.to_async(&rt).iter(|| async {
            let mut svc = layered.clone();
            let req = Request::builder()
                .header("grpc-timeout", "5S")
                .body(Empty::new())
                .expect("request");
            svc.ready().await.expect("ready").call(req).await
        })
    });
    group.finish();
}

criterion_group!(benches, grpc_headers, deadline_layer);
criterion_main!(benches);
