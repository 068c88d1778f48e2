//! Active health checking with `grpc.health.v1.Health/Check`, sent over the
//! endpoint's own pool: one unary call per interval, the request and the
//! answer encoded with the layers' wire helpers (no protobuf code in the
//! proxy).

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use http::Request;
use sluice_layers::grpc::{
    framing,
    status::{self, Code},
    wire::{self, FieldPath, Value},
};
use tracing::info;

use super::group::Group;
use crate::{config::HealthCheckConfig, upstream::Pool};

/// Asks every endpoint of the group `grpc.health.v1.Health/Check` each
/// interval and records the verdict.
pub(super) async fn check_health(group: Arc<Group>, hc: HealthCheckConfig) {
    let mut tick = tokio::time::interval(hc.interval);
    loop {
        tick.tick().await;
        for endpoint in group.endpoints().iter() {
            let serving = check(endpoint.pool(), &hc.service, hc.timeout).await;
            if endpoint.healthy.swap(serving, Ordering::Relaxed) != serving {
                info!(address = %endpoint.address(), serving, "upstream endpoint health changed");
            }
        }
    }
}

/// `HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: u64 = 1;
/// A health answer is a few bytes; more is not a health answer.
const MAX_ANSWER: usize = 1024;

/// Whether the endpoint says it is serving `service` ("" for the server as a
/// whole) within `timeout`. Any failure (unreachable, an error status, no
/// answer, a malformed one) counts as not serving.
async fn check(pool: &Pool, service: &str, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, ask(pool, service))
        .await
        .ok()
        .flatten()
        .is_some_and(|status| status == SERVING)
}

/// The gRPC message `HealthCheckRequest { string service = 1; }`, framed.
fn request(service: &str) -> Bytes {
    let mut payload = Vec::new();
    if !service.is_empty() {
        wire::put_len_field(&mut payload, 1, service.as_bytes());
    }
    framing::encode(&payload)
}

async fn ask(pool: &Pool, service: &str) -> Option<u64> {
    let checkout = pool.checkout().await.ok()?;
    let head = Request::post("http://health/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .ok()?;
    let (response, mut tx, _lease) = pool.send(checkout, head, false).ok()?;
    tx.send_data(request(service), true).ok()?;

    let response = response.await.ok()?;
    if status::code_of(response.headers()).is_some() {
        // Trailers-only: an error, or an OK without a message; neither says
        // SERVING.
        return None;
    }
    let mut body = response.into_body();
    let mut answer = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk: Bytes = chunk.ok()?;
        let _ = body.flow_control().release_capacity(chunk.len());
        answer.put_slice(&chunk);
        if answer.len() > MAX_ANSWER {
            return None;
        }
    }
    let trailers = body.trailers().await.ok()??;
    if status::code_of(&trailers) != Some(Code::Ok) || answer.len() < 5 {
        return None;
    }
    // HealthCheckResponse { ServingStatus status = 1; }
    let path: FieldPath = "1".parse().ok()?;
    match wire::find(&answer[5..], &path) {
        Some(Value::Varint(status)) => Some(status),
        // proto3 leaves a zero enum out: UNKNOWN.
        None => Some(0),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_of_any_length_encode_as_field_one() {
        for len in [0, 1, 127, 128, 300, 20_000] {
            let name = "s".repeat(len);
            let framed = request(&name);
            let size = u32::from_be_bytes(framed[1..5].try_into().expect("4 bytes")) as usize;
            assert_eq!(size, framed.len() - 5);
            let path: FieldPath = "1".parse().expect("path");
            let found = wire::find(&framed[5..], &path).and_then(|v| v.as_str().map(str::len));
            assert_eq!(
                found,
                (len > 0).then_some(len),
                "service name of {len} bytes"
            );
        }
    }
}
