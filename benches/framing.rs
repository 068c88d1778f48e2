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

/// Matching a call against 100 routes: the call matches the last one.
fn route_matching(c: &mut Criterion) {
    use sluice_layers::direct::Director;
    let mut text = String::new();
    for i in 0..100 {
        text.push_str(&format!(
            "[[routes]]\nmethod = \"/svc{i}.v1.*/Get*\"\nmetadata = {{ \"x-tenant\" = {{ prefix = \"t{i}\" }} }}\nupstream = \"default\"\n"
        ));
    }
    let config = sluice::Config::from_toml_str(&text).expect("100 routes");
    let mut routes = sluice::route::RouteTable::from_config(&config);
    let (parts, ()) = Request::post("http://x/svc99.v1.Things/GetThing")
        .header("x-tenant", "t99-acme")
        .body(())
        .expect("request")
        .into_parts();
    c.bench_function("route_match_100_routes", |b| {
        b.iter(|| routes.direct(std::hint::black_box(&parts), &[]))
    });
}

/// Matching a call against 10,000 routes, half by an exact metadata value
/// and half by an exact method: a call that matches the last metadata
/// route, and one that matches none (the fallback).
fn route_matching_at_scale(c: &mut Criterion) {
    use sluice_layers::direct::Director;
    let mut text = String::new();
    for i in 0..10_000 {
        if i % 2 == 0 {
            text.push_str(&format!(
                "[[routes]]\nmetadata = {{ \"x-tenant\" = {{ equals = \"tenant-{i}\" }} }}\nupstream = \"default\"\n"
            ));
        } else {
            text.push_str(&format!(
                "[[routes]]\nmethod = \"/svc{i}.v1.Things/Get\"\nupstream = \"default\"\n"
            ));
        }
    }
    let config = sluice::Config::from_toml_str(&text).expect("10,000 routes");
    let mut routes = sluice::route::RouteTable::from_config(&config);
    let head = |tenant: &str| {
        let (parts, ()) = Request::post("http://x/sluice.test.Echo/Unary")
            .header("x-tenant", tenant)
            .body(())
            .expect("request")
            .into_parts();
        parts
    };
    let last = head("tenant-9998");
    let none = head("nobody");
    c.bench_function("route_match_10000_routes_last", |b| {
        b.iter(|| routes.direct(std::hint::black_box(&last), &[]))
    });
    c.bench_function("route_match_10000_routes_none", |b| {
        b.iter(|| routes.direct(std::hint::black_box(&none), &[]))
    });
}

/// Decoding a field path in a 1 KiB message, the field at the very end.
fn field_path(c: &mut Criterion) {
    use sluice_layers::grpc::wire;
    let mut msg = Vec::new();
    for _ in 0..70 {
        // field 1 (repeated): a 12-byte string
        msg.push(0x0a);
        msg.push(12);
        msg.extend_from_slice(b"abcdefghijkl");
    }
    // field 61: an embedded message holding field 2 = "target"
    msg.extend_from_slice(&[0xea, 0x03, 8, 0x12, 6]);
    msg.extend_from_slice(b"target");
    let msg = &msg[..];
    let path: wire::FieldPath = "61.2".parse().expect("path");
    assert_eq!(
        wire::find(msg, &path).and_then(|v| v.as_str()),
        Some("target")
    );
    c.bench_function("field_path_in_1kib_message", |b| {
        b.iter(|| wire::find(std::hint::black_box(msg), &path))
    });
}

/// What the peek layer adds to a call with one 256-byte message.
fn peek_layer(c: &mut Criterion) {
    use http_body_util::Full;
    use sluice_layers::peek::{PeekLayer, ReplayBody};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut message = vec![0, 0, 0, 1, 0];
    message.extend_from_slice(&[7; 256]);
    let message = Bytes::from(message);
    let bare = service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
    });
    let peeked =
        PeekLayer::new().layer(service_fn(|_req: Request<ReplayBody<Full<Bytes>>>| async {
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        }));
    let mut group = c.benchmark_group("peek_layer_per_call");
    group.bench_function("bare_service_fn", |b| {
        b.to_async(&rt).iter(|| async {
            let mut svc = bare;
            svc.ready()
                .await
                .expect("ready")
                .call(Request::new(Full::new(message.clone())))
                .await
        })
    });
    group.bench_function("peek_first_message", |b| {
        b.to_async(&rt).iter(|| async {
            let mut svc = peeked.clone();
            svc.ready()
                .await
                .expect("ready")
                .call(Request::new(Full::new(message.clone())))
                .await
        })
    });
    group.finish();
}

/// What the drain layer adds to a call, guard and body included.
fn drain_layer(c: &mut Criterion) {
    use sluice_layers::drain::{self, DrainLayer};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (_signal, watch) = drain::channel();
    let bare = service_fn(|_req: Request<Empty<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
    });
    let drained = DrainLayer::new(watch).layer(bare);
    let mut group = c.benchmark_group("drain_layer_per_call");
    group.bench_function("bare_service_fn", |b| {
        b.to_async(&rt).iter(|| async {
            let mut svc = bare;
            drop(
                svc.ready()
                    .await
                    .expect("ready")
                    .call(Request::new(Empty::new()))
                    .await,
            )
        })
    });
    group.bench_function("with_drain_guard", |b| {
        b.to_async(&rt).iter(|| async {
            let mut svc = drained.clone();
            drop(
                svc.ready()
                    .await
                    .expect("ready")
                    .call(Request::new(Empty::new()))
                    .await,
            )
        })
    });
    group.finish();
}

/// Issue #10 §5's worst case for peek: a 64 KiB first message sent as
/// 65 536 one-byte DATA chunks (each chunk used to re-concatenate all the
/// bytes so far: gigabytes of memcpy), beside the same message in one
/// chunk.
fn peek_worst_case(c: &mut Criterion) {
    use http_body_util::StreamBody;
    use sluice_layers::peek::{PeekLayer, ReplayBody};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let len = 64 * 1024 - 5;
    let mut message = vec![0u8];
    message.extend_from_slice(&u32::try_from(len).expect("fits").to_be_bytes());
    message.extend(std::iter::repeat_n(7u8, len));
    let message = Bytes::from(message);
    type Chunks = StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>,
    >;
    let inner = service_fn(|_req: Request<ReplayBody<Chunks>>| async {
        Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
    });
    let svc = PeekLayer::new().max_bytes(64 * 1024).layer(inner);
    let mut group = c.benchmark_group("peek_64KiB_first_message");
    group.sample_size(20);
    for (name, chunk) in [("one_chunk", message.len()), ("one_byte_chunks", 1)] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = (0..message.len())
                    .step_by(chunk)
                    .map(|at| {
                        Ok(http_body::Frame::data(
                            message.slice(at..(at + chunk).min(message.len())),
                        ))
                    })
                    .collect();
                let body: Chunks = StreamBody::new(futures_util::stream::iter(frames));
                let svc = svc.clone();
                async move { svc.oneshot(Request::new(body)).await }
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    peek_worst_case,
    grpc_headers,
    deadline_layer,
    route_matching,
    route_matching_at_scale,
    field_path,
    peek_layer,
    drain_layer
);
criterion_main!(benches);
