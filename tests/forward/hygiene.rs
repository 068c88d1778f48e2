//! Point 7: header hygiene. Custom metadata (every byte value of `-bin`),
//! content-type, te, user-agent, grpc-encoding and grpc-timeout pass
//! unchanged; compressed messages pass untouched.

use std::time::Duration;

use sluice_testkit::Req;
use tonic::{
    codec::CompressionEncoding,
    metadata::{BinaryMetadataValue, MetadataValue},
};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_passes_byte_for_byte() {
    let mut p = proxied().await;
    let every_byte: Vec<u8> = (0..=255).collect();
    let mut req = tonic::Request::new(Req::default());
    req.metadata_mut().insert(
        "x-custom",
        MetadataValue::from_static("a value, with; punctuation"),
    );
    req.metadata_mut().insert_bin(
        "x-every-byte-bin",
        BinaryMetadataValue::from_bytes(&every_byte),
    );
    req.metadata_mut()
        .append("x-repeated", MetadataValue::from_static("one"));
    req.metadata_mut()
        .append("x-repeated", MetadataValue::from_static("two"));
    req.set_timeout(Duration::from_secs(30));
    // W3C trace context passes through for the application to continue.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    req.metadata_mut()
        .insert("traceparent", MetadataValue::from_static(traceparent));
    req.metadata_mut().insert(
        "tracestate",
        MetadataValue::from_static("congo=t61rcWkgMzE"),
    );
    within("unary", p.client.unary(req)).await.expect("ok");

    let seen = p.upstream.probe.last_metadata().expect("metadata");
    assert_eq!(
        seen.get("x-custom").expect("x-custom"),
        "a value, with; punctuation"
    );
    let bin = seen.get_bin("x-every-byte-bin").expect("binary metadata");
    assert_eq!(bin.to_bytes().expect("base64"), every_byte);
    let repeated: Vec<_> = seen.get_all("x-repeated").iter().collect();
    assert_eq!(repeated, ["one", "two"]);
    assert_eq!(seen.get("te").expect("te"), "trailers");
    assert_eq!(
        seen.get("content-type").expect("content-type"),
        "application/grpc"
    );
    assert!(
        seen.get("user-agent")
            .expect("user-agent")
            .to_str()
            .expect("ascii")
            .starts_with("tonic/"),
        "{seen:?}"
    );
    assert!(seen.get("grpc-timeout").is_some(), "{seen:?}");
    assert_eq!(seen.get("traceparent").expect("traceparent"), traceparent);
    assert_eq!(
        seen.get("tracestate").expect("tracestate"),
        "congo=t61rcWkgMzE"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_messages_pass_untouched() {
    let p = proxied().await;
    let mut client = p
        .client
        .clone()
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    let payload = bytes::Bytes::from(vec![b'z'; 64 << 10]);
    let res = within(
        "unary",
        client.unary(Req {
            payload: payload.clone(),
            ..Req::default()
        }),
    )
    .await
    .expect("ok");
    assert_eq!(res.get_ref().payload, payload);
    let seen = p.upstream.probe.last_metadata().expect("metadata");
    assert_eq!(seen.get("grpc-encoding").expect("grpc-encoding"), "gzip");
    assert!(seen.get("grpc-accept-encoding").is_some());

    // On the wire: the reply is a compressed message (flag 1), far smaller
    // than the payload, so sluice passed the upstream's bytes as they were.
    let mut h2 = raw_client(p.sluice.listen_addr()).await;
    let mut head = grpc_head("Unary");
    head.headers_mut().insert(
        "grpc-accept-encoding",
        http::HeaderValue::from_static("gzip"),
    );
    let (response, _body) = send_call(
        &mut h2,
        head,
        &Req {
            payload,
            ..Req::default()
        },
    );
    let res = within("response", response).await.expect("headers");
    assert_eq!(res.headers()["grpc-encoding"], "gzip");
    let mut recv = res.into_body();
    let mut wire = Vec::new();
    while let Some(chunk) = within("data", recv.data()).await {
        wire.extend_from_slice(&chunk.expect("data"));
    }
    assert_eq!(wire[0], 1, "compressed-flag set");
    assert!(
        wire.len() < 4096,
        "{} bytes: not the upstream's compressed reply",
        wire.len()
    );
}
