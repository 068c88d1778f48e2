//! Issue #18.5: the access log, from the real binary's stdout: one line
//! per call (JSON or text, as `log.format`), every field there, and the
//! calls that fail (the upstream down included) logged too.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use sluice_testkit::{EchoServer, Req};

const LIMIT: Duration = Duration::from_secs(20);

/// Kills the child when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// sluice with `log.access` on in `format`, in front of `upstream`: the
/// process, its address, and its stdout lines as they come.
fn start(
    format: &str,
    upstream: SocketAddr,
) -> (Proc, SocketAddr, std::sync::mpsc::Receiver<String>) {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("access-{}-{format}.toml", std::process::id()));
    std::fs::write(
        &path,
        format!("[log]\nformat = \"{format}\"\naccess = true\n[admin]\nlisten = \"off\"\n"),
    )
    .expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--config")
        .arg(&path)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().expect("sluice exited at start").expect("read");
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .expect("an address")
                .parse()
                .expect("a socket address");
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (Proc(child), addr, rx)
}

fn next_line(rx: &std::sync::mpsc::Receiver<String>) -> String {
    rx.recv_timeout(LIMIT)
        .expect("an access-log line for the call (not silence)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_one_json_line_with_every_field() {
    let upstream = EchoServer::start().await;
    let (_proc, addr, rx) = start("json", upstream.addr);
    let mut client = sluice_testkit::client(addr);
    let mut ok = tonic::Request::new(Req {
        payload: vec![7; 100].into(),
        ..Req::default()
    });
    ok.metadata_mut()
        .insert("x-request-id", "req-42".parse().expect("ascii"));
    ok.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .expect("ascii"),
    );
    client.unary(ok).await.expect("an OK call");
    let v: serde_json::Value = serde_json::from_str(&next_line(&rx)).expect("one JSON object");
    assert_eq!(v["method"], "/sluice.test.Echo/Unary");
    assert_eq!(v["grpc_status"], 0);
    assert_eq!(v["request_id"], "req-42");
    assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(v["upstream_group"], "default");
    assert_eq!(v["upstream"], upstream.addr.to_string());
    assert!(
        v["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{v}"
    );
    assert!(v["authority"].as_str().is_some(), "{v}");
    assert!(v["bytes_in"].as_u64().is_some_and(|n| n >= 100), "{v}");
    assert!(v["bytes_out"].as_u64().is_some_and(|n| n > 0), "{v}");
    assert!(v["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{v}");
    assert!(v["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");

    let failed = client
        .unary(Req {
            fail_code: 5,
            fail_message: "no such thing".to_owned(),
            ..Req::default()
        })
        .await
        .expect_err("NOT_FOUND");
    assert_eq!(failed.code(), tonic::Code::NotFound);
    let v: serde_json::Value = serde_json::from_str(&next_line(&rx)).expect("JSON");
    assert_eq!(v["grpc_status"], 5);
    assert!(
        v["grpc_message"].as_str().is_some_and(|m| !m.is_empty()),
        "{v}"
    );

    // The upstream goes away: the call sluice fails itself is logged.
    drop(upstream);
    let down = client.unary(Req::default()).await.expect_err("UNAVAILABLE");
    assert_eq!(down.code(), tonic::Code::Unavailable);
    let v: serde_json::Value = serde_json::from_str(&next_line(&rx)).expect("JSON");
    assert_eq!(v["grpc_status"], 14, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_text_format_each_call_is_one_line_of_fields() {
    let upstream = EchoServer::start().await;
    let (_proc, addr, rx) = start("text", upstream.addr);
    let mut client = sluice_testkit::client(addr);
    for _ in 0..3 {
        client.unary(Req::default()).await.expect("OK");
    }
    for _ in 0..3 {
        let line = next_line(&rx);
        for field in [
            "peer=127.0.0.1:",
            "method=/sluice.test.Echo/Unary",
            "grpc_status=0",
            "upstream_group=default",
            "duration_ms=",
        ] {
            assert!(line.contains(field), "{field} in {line}");
        }
    }
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "one line per call, no more"
    );
}
