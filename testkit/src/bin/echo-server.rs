//! A tonic echo server for trying sluice: `echo-server [ADDR]`
//! (default `127.0.0.1:50051`, where sluice's embedded default forwards).

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50051".to_owned())
        .parse()?;
    let server = sluice_testkit::EchoServer::start_on(addr).await;
    eprintln!("echo server listening on {}", server.addr);
    tokio::signal::ctrl_c().await?;
    server.stop().await;
    Ok(())
}
