//! Calls the echo service once per call type: `echo-client [ADDR]`
//! (default `127.0.0.1:15051`, where sluice's embedded default listens).

use sluice_testkit::Req;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:15051".to_owned())
        .parse()?;
    let mut client = sluice_testkit::client(addr);
    let reply = client
        .unary(Req {
            payload: "hello through sluice".into(),
            ..Req::default()
        })
        .await?;
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
