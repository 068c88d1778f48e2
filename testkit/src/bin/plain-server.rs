//! A plain HTTP/2 (h2c) server, as a web server answers: every request
//! gets 200, `text/plain` and a 1 KiB body, and its own body is read to
//! its end (the stream is never reset under the client). The upstream of
//! `.ci/h2spec`'s forward mode, where h2spec's requests, which are not
//! gRPC, pass through sluice. `plain-server [ADDR]` (default
//! `127.0.0.1:0`); logs `plain server listening on ADDR`.

use bytes::Bytes;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("plain server listening on {}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(tcp).await else {
                return;
            };
            while let Some(Ok((req, respond))) = conn.accept().await {
                tokio::spawn(answer(req, respond));
            }
        });
    }
}

async fn answer(req: http::Request<h2::RecvStream>, mut respond: h2::server::SendResponse<Bytes>) {
    let mut body = req.into_body();
    let head = http::Response::builder()
        .header("content-type", "text/plain")
        .body(())
        .expect("a static response");
    let Ok(mut tx) = respond.send_response(head, false) else {
        return;
    };
    let text = Bytes::from(vec![b'p'; 1024]);
    tx.reserve_capacity(text.len());
    let _ = tx.send_data(text, true);
    // Read the request to its end, giving its window back.
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
    }
}
