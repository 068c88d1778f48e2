//! Calls the echo service once per call type: `echo-client [ADDR]`
//! (default `127.0.0.1:15051`, where sluice's embedded default listens).
//!
//! It waits for the service (up to `ECHO_CLIENT_WAIT`, 60 s by default):
//! while sluice or the echo server behind it is still starting, the first
//! call fails UNAVAILABLE, and it tries again every 250 ms. Any other
//! failure, or the wait running out, exits 1.

use std::time::{Duration, Instant};

use sluice_testkit::Req;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:15051".to_owned())
        .parse()?;
    let wait = std::env::var("ECHO_CLIENT_WAIT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(60), Duration::from_secs);
    let until = Instant::now() + wait;
    let mut client = sluice_testkit::client(addr);
    let hello = || Req {
        payload: "hello through sluice".into(),
        ..Req::default()
    };
    let reply = loop {
        match client.unary(hello()).await {
            Ok(reply) => break reply,
            Err(status) if status.code() == tonic::Code::Unavailable && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(status) => return Err(status.into()),
        }
    };
    println!(
        "unary: {:?}",
        String::from_utf8_lossy(&reply.get_ref().payload)
    );
    let mut stream = client
        .server_stream(Req {
            replies: 3,
            reply_size: 16,
            ..Req::default()
        })
        .await?
        .into_inner();
    let mut n = 0;
    while stream.message().await?.is_some() {
        n += 1;
    }
    println!("server stream: {n} replies");
    Ok(())
}
