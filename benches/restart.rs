//! Rolling restarts under load: sluice is restarted 20 times while tonic
//! clients keep mixed unary and server-streaming calls running, and the
//! bench prints the number of failed calls (target: 0) and each drain time.
//!
//! Each restart is what a supervisor does for a zero-gap hand-over: start
//! the new sluice on the same port (`server.reuse_port`), then SIGTERM the
//! old one. The old one closes its listener and sends GOAWAY; the clients
//! (tonic channels, which reconnect as gRPC clients do) finish their calls
//! on the old connection and open new ones to the new process.

mod support;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sluice_testkit::{EchoServer, Req};
use support::SluiceProcess;

const RESTARTS: usize = 20;
/// Transparent retries per call, as gRPC clients do for a call the
/// transport never sent (gRFC A6).
const TRANSPARENT_RETRIES: usize = 2;
const CLIENT_TASKS: usize = 16;
const CHANNELS: usize = 4;
/// Upper bound on the whole run.
const RUN_LIMIT: Duration = Duration::from_secs(90);

fn start_sluice(config: &std::path::Path) -> SluiceProcess {
    SluiceProcess::start(&["--config", &config.to_string_lossy()])
}

/// Whether the server never processed the call, so that a gRPC client
/// retries it transparently (gRFC A6): hyper cancelled it before it left
/// (the connection had just received GOAWAY), or the server's GOAWAY named
/// a last stream id below it (h2 fails exactly those streams with a
/// remote GOAWAY error, and only those).
fn was_never_sent(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if let Some(hyper) = err.downcast_ref::<hyper::Error>()
            && hyper.is_canceled()
        {
            return true;
        }
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote();
        }
        source = err.source();
    }
    false
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let upstream = EchoServer::start().await;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let listen: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let config = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("restart-{}.toml", std::process::id()));
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"{listen}\"\nreuse_port = true\n\n\
                 [upstream]\naddress = \"{}\"\n\n[admin]\nlisten = \"off\"\n\n\
                 [drain]\ndeadline = \"10s\"\n",
                upstream.addr
            ),
        )
        .expect("write config");

        let mut current = start_sluice(&config);
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let never_sent = Arc::new(AtomicU64::new(0));
        let channels: Vec<_> = (0..CHANNELS).map(|_| sluice_testkit::client(listen)).collect();
        let mut load = tokio::task::JoinSet::new();
        for i in 0..CLIENT_TASKS {
            let mut client = channels[i % CHANNELS].clone();
            let (stop, ok, failed, never_sent) =
                (stop.clone(), ok.clone(), failed.clone(), never_sent.clone());
            load.spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let mut attempt = 0;
                    let result = loop {
                    let result = if n.is_multiple_of(2) {
                        client.unary(Req { seq: n, ..Req::default() }).await.map(|_| ())
                    } else {
                        async {
                            let mut s = client
                                .server_stream(Req {
                                    replies: 5,
                                    delay_ms: 5,
                                    ..Req::default()
                                })
                                .await?
                                .into_inner();
                            let mut got = 0;
                            while s.message().await?.is_some() {
                                got += 1;
                            }
                            assert_eq!(got, 5);
                            Ok::<_, tonic::Status>(())
                        }
                        .await
                    };
                    match result {
                        Err(status) if attempt < TRANSPARENT_RETRIES && was_never_sent(&status) => {
                            never_sent.fetch_add(1, Ordering::Relaxed);
                            attempt += 1;
                        }
                        other => break other,
                    }
                    };
                    match result {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(status) => {
                            eprintln!("failed call: {:?}: {}", status.code(), status.message());
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            });
        }

        let started = Instant::now();
        let mut drains = Vec::with_capacity(RESTARTS);
        for _ in 0..RESTARTS {
            if started.elapsed() > RUN_LIMIT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            let next = tokio::task::spawn_blocking({
                let config = config.clone();
                move || start_sluice(&config)
            })
            .await
            .expect("start");
            let mut old = std::mem::replace(&mut current, next);
            let drain = tokio::task::spawn_blocking(move || old.terminate())
                .await
                .expect("terminate");
            drains.push(drain);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        stop.store(true, Ordering::Relaxed);
        while load.join_next().await.is_some() {}
        let _ = tokio::task::spawn_blocking(move || current.terminate()).await;
        let _ = std::fs::remove_file(&config);

        drains.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "restart: {} restarts in {:.1} s under {CLIENT_TASKS} client tasks on {CHANNELS} connections",
            drains.len(),
            started.elapsed().as_secs_f64()
        );
        println!(
            "calls: {} ok, {} failed ({} attempts the server never processed were retried \
             transparently, as grpc-go/grpc-java/grpcio do; tonic does not)",
            ok.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
            never_sent.load(Ordering::Relaxed),
        );
        println!(
            "drain time (SIGTERM to exit): min {:.0} ms, median {:.0} ms, max {:.0} ms",
            ms(drains[0]),
            ms(drains[drains.len() / 2]),
            ms(drains[drains.len() - 1])
        );
        println!(
            "each: {}",
            drains
                .iter()
                .map(|d| format!("{:.0}", ms(*d)))
                .collect::<Vec<_>>()
                .join(" ")
        );
    });
}
