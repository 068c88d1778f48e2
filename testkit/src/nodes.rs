//! A node of a Talos-style cluster: a tonic server of `proto/nodes.proto`
//! that knows its name, for fan-out and mirror tests.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, watch},
};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream, wrappers::TcpListenerStream};
use tonic::{Request, Response, Status, Streaming, metadata::MetadataMap, transport::Server};

use crate::npb::{
    Chunk, Log, LogsRequest, Version, VersionRequest, VersionResponse, WriteResponse, WriteResult,
    nodes_server,
};

/// What a node has seen so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeCounts {
    /// Calls whose handler started.
    pub started: u64,
    /// Log lines handed to the transport.
    pub lines_sent: u64,
    /// Calls the node saw cancelled (a send that failed, a request stream
    /// that broke off).
    pub cancelled: u64,
    /// Write chunks received.
    pub chunks: u64,
    /// Write calls whose request stream ended cleanly.
    pub writes_done: u64,
}

/// A handle on what a node saw; cheap to clone.
#[derive(Clone, Debug)]
pub struct NodeProbe {
    counts: Arc<watch::Sender<NodeCounts>>,
    last_metadata: Arc<Mutex<Option<MetadataMap>>>,
}

impl NodeProbe {
    /// The counts now.
    pub fn counts(&self) -> NodeCounts {
        *self.counts.borrow()
    }

    /// Waits until `pred` holds, or `limit` passes (then panics with the
    /// counts: a test must tell a hang from an outcome).
    pub async fn wait_for(
        &self,
        limit: Duration,
        pred: impl FnMut(&NodeCounts) -> bool,
    ) -> NodeCounts {
        let mut rx = self.counts.subscribe();
        match tokio::time::timeout(limit, rx.wait_for(pred)).await {
            Ok(Ok(c)) => *c,
            _ => panic!("node counts never got there: {:?}", self.counts()),
        }
    }

    /// The metadata of the last call.
    pub fn last_metadata(&self) -> Option<MetadataMap> {
        self.last_metadata.lock().expect("metadata lock").clone()
    }

    fn bump(&self, f: impl FnOnce(&mut NodeCounts)) {
        self.counts.send_modify(f);
    }
}

#[derive(Clone, Debug)]
struct Node {
    name: String,
    probe: NodeProbe,
    /// Time taken per Write chunk received: a slow secondary.
    chunk_delay: Duration,
}

type LogStream = Pin<Box<dyn Stream<Item = Result<Log, Status>> + Send>>;

#[tonic::async_trait]
impl nodes_server::Nodes for Node {
    async fn version(
        &self,
        req: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        self.start(req.metadata());
        let mut guard = Unfinished(Some(self.probe.clone()));
        let req = req.into_inner();
        tokio::time::sleep(Duration::from_millis(req.delay_ms)).await;
        guard.0 = None;
        if req.fail_code != 0 {
            return Err(Status::new(
                tonic::Code::from_i32(req.fail_code),
                format!("{} failed as asked", self.name),
            ));
        }
        Ok(Response::new(VersionResponse {
            messages: vec![Version {
                metadata: None,
                node: self.name.clone(),
            }],
        }))
    }

    type LogsStream = LogStream;

    async fn logs(&self, req: Request<LogsRequest>) -> Result<Response<LogStream>, Status> {
        self.start(req.metadata());
        let req = req.into_inner();
        let failure = (req.fail_code != 0).then(|| {
            Status::new(
                tonic::Code::from_i32(req.fail_code),
                format!("{} failed as asked", self.name),
            )
        });
        if req.lines == 0
            && let Some(status) = failure.clone()
        {
            return Err(status);
        }
        let (tx, rx) = mpsc::channel(1);
        let node = self.clone();
        tokio::spawn(async move {
            for seq in 0..req.lines {
                if req.delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(req.delay_ms)).await;
                }
                let line = Log {
                    metadata: None,
                    node: node.name.clone(),
                    seq,
                    text: vec![b'x'; req.line_size as usize].into(),
                };
                if tx.send(Ok(line)).await.is_err() {
                    node.probe.bump(|c| c.cancelled += 1);
                    return;
                }
                node.probe.bump(|c| c.lines_sent += 1);
            }
            if let Some(status) = failure {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn write(
        &self,
        req: Request<Streaming<Chunk>>,
    ) -> Result<Response<WriteResponse>, Status> {
        self.start(req.metadata());
        // hyper drops the handler when the client resets the stream: the
        // guard counts that as a cancel.
        let mut guard = Unfinished(Some(self.probe.clone()));
        let mut stream = req.into_inner();
        let mut chunks = 0;
        loop {
            match stream.next().await {
                Some(Ok(_)) => {
                    chunks += 1;
                    self.probe.bump(|c| c.chunks += 1);
                    if !self.chunk_delay.is_zero() {
                        tokio::time::sleep(self.chunk_delay).await;
                    }
                }
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        guard.0 = None;
        self.probe.bump(|c| c.writes_done += 1);
        Ok(Response::new(WriteResponse {
            messages: vec![WriteResult {
                metadata: None,
                node: self.name.clone(),
                chunks,
            }],
        }))
    }
}

/// Counts a cancel when dropped before the call finished.
struct Unfinished(Option<NodeProbe>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(probe) = self.0.take() {
            probe.bump(|c| c.cancelled += 1);
        }
    }
}

impl Node {
    fn start(&self, metadata: &MetadataMap) {
        *self.probe.last_metadata.lock().expect("metadata lock") = Some(metadata.clone());
        self.probe.bump(|c| c.started += 1);
    }
}

/// A running node, on a runtime (and thread) of its own.
#[derive(Debug)]
pub struct NodeServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub probe: NodeProbe,
    stop: Option<oneshot::Sender<()>>,
}

impl NodeServer {
    /// Starts node `name` on `127.0.0.1:0`.
    pub fn start(name: &str) -> Self {
        Self::start_with(name, Duration::ZERO)
    }

    /// Starts node `name` that takes `chunk_delay` per Write chunk.
    ///
    /// # Panics
    ///
    /// Panics if no loopback port can be bound.
    pub fn start_with(name: &str, chunk_delay: Duration) -> Self {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind node");
        std_listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = std_listener.local_addr().expect("bound address");
        let probe = NodeProbe {
            counts: Arc::new(watch::channel(NodeCounts::default()).0),
            last_metadata: Arc::default(),
        };
        let node = Node {
            name: name.to_owned(),
            probe: probe.clone(),
            chunk_delay,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let svc = nodes_server::NodesServer::new(node)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .send_compressed(tonic::codec::CompressionEncoding::Gzip);
        std::thread::Builder::new()
            .name(format!("node-{name}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("node runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("tokio listener");
                    let incoming = TcpListenerStream::new(listener).map(|tcp| {
                        tcp.inspect(|tcp| {
                            let _ = tcp.set_nodelay(true);
                        })
                    });
                    let serve = Server::builder()
                        .add_service(svc)
                        .serve_with_incoming(incoming);
                    tokio::select! {
                        _ = serve => {}
                        _ = stopped => {}
                    }
                });
                rt.shutdown_background();
            })
            .expect("spawn node thread");
        Self {
            addr,
            probe,
            stop: Some(stop),
        }
    }
}

impl Drop for NodeServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
