//! The test xDS management server as a process, for the grpcio interop
//! script: `xds-server LISTENER CLUSTER ENDPOINT[,ENDPOINT…] [ADDR]` serves
//! Listener LISTENER routing every call to CLUSTER, whose endpoints are
//! the addresses given (priority 0, equal weights), and logs `xds server
//! listening on ADDR`. Each line read on stdin (`ENDPOINT[,ENDPOINT…]`)
//! replaces the endpoints as a new version; it logs `version N` once
//! served.

use std::net::SocketAddr;

use std::{io::BufRead, sync::Arc};

use sluice_testkit::xds::{ControlPlane, Snapshot};

fn endpoints(list: &str) -> Result<Vec<SocketAddr>, Box<dyn std::error::Error>> {
    list.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| Ok(s.trim().parse()?))
        .collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listener, cluster, list, rest @ ..] = &args[..] else {
        return Err("usage: xds-server LISTENER CLUSTER ENDPOINT[,ENDPOINT…] [ADDR]".into());
    };
    let addr: SocketAddr = rest.first().map_or("127.0.0.1:0", String::as_str).parse()?;
    let plane = Arc::new(
        ControlPlane::start_on(addr, Snapshot::single(listener, cluster, &endpoints(list)?)).await,
    );
    eprintln!("xds server listening on {}", plane.addr);
    let (listener, cluster) = (listener.clone(), cluster.clone());
    let updates = plane.clone();
    // stdin is read on a thread of its own; the server runs on.
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            match endpoints(&line) {
                Ok(list) => {
                    let version = updates.set(Snapshot::single(&listener, &cluster, &list));
                    eprintln!("version {version}");
                }
                Err(e) => eprintln!("bad endpoints {line:?}: {e}"),
            }
        }
    });
    std::future::pending::<()>().await;
    Ok(())
}
