//! The `Echo` gRPC service (`proto/echo.proto`) on tonic, served over hyper's HTTP/2 server.
//!
//! Replies name the peer (`peer` field and `x-peer` response metadata) and echo the request
//! headers it saw (`headers` field), so a test can check what the proxy forwarded.
//! `Fail`, and `ServerStream` with `fail` set, end with a chosen status and trailing
//! metadata: trailers-only for `Fail`, real HTTP/2 trailers after data for the stream.

use std::{collections::HashMap, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use futures_util::{stream, Stream};
use hyper::server::conn::http2;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    service::TowerToHyperService,
};
use tonic::{
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    Code, Request, Response, Status, Streaming,
};

use super::{serve, PeerState, ServerTask};
use crate::echo_pb::{
    echo_server::{Echo, EchoServer},
    EchoReply, EchoRequest, FailRequest, StreamRequest,
};

/// A running gRPC echo server; stops when dropped.
#[derive(Debug)]
pub struct GrpcPeer {
    addr: SocketAddr,
    state: Arc<PeerState>,
    _task: ServerTask,
}

impl GrpcPeer {
    pub fn start(name: &str) -> Self {
        let state = Arc::new(PeerState::new(name));
        let service = EchoServer::new(EchoService {
            state: state.clone(),
        });
        let (addr, task) = serve(move |stream| {
            let service = TowerToHyperService::new(service.clone());
            async move {
                let _ = http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        });
        GrpcPeer {
            addr,
            state,
            _task: task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state(&self) -> &Arc<PeerState> {
        &self.state
    }

    pub fn name(&self) -> &str {
        self.state.name()
    }

    pub fn requests(&self) -> u64 {
        self.state.requests()
    }

    pub fn set_delay(&self, delay: Duration) {
        self.state.set_delay(delay);
    }
}

#[derive(Clone, Debug)]
struct EchoService {
    state: Arc<PeerState>,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

impl EchoService {
    /// Counts the call and waits while the peer is held or delayed.
    async fn arrive(&self, method: &str) {
        self.state
            .record("POST", &format!("/malla.test.echo.Echo/{method}"));
        self.state.wait_turn(Duration::ZERO).await;
    }

    fn reply(&self, message: String, index: u64, headers: HashMap<String, String>) -> EchoReply {
        EchoReply {
            message,
            peer: self.state.name().to_string(),
            index,
            headers,
        }
    }

    fn response<T>(&self, message: T) -> Response<T> {
        let mut response = Response::new(message);
        if let Ok(v) = MetadataValue::try_from(self.state.name()) {
            response.metadata_mut().insert("x-peer", v);
        }
        response
    }
}

/// Every request header, values of a repeated field joined by `", "`.
fn seen_headers(metadata: &MetadataMap) -> HashMap<String, String> {
    let headers = metadata.clone().into_headers();
    let mut out: HashMap<String, String> = HashMap::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        out.entry(name.as_str().to_string())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    out
}

/// The status a [`FailRequest`] asks for, with its trailing metadata.
pub fn failure(req: &FailRequest) -> Status {
    let mut metadata = MetadataMap::new();
    for (k, v) in &req.trailers {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(k.as_bytes()),
            MetadataValue::try_from(v.as_str()),
        ) {
            metadata.insert(k, v);
        }
    }
    Status::with_metadata(Code::from_i32(req.code), req.message.clone(), metadata)
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.arrive("Unary").await;
        // A peer told to answer a server error (`PeerState::set_status`) is UNAVAILABLE.
        if self.state.status().is_some_and(|s| s >= 500) {
            return Err(Status::unavailable(format!(
                "{} is failing",
                self.state.name()
            )));
        }
        let headers = seen_headers(req.metadata());
        let reply = self.reply(req.into_inner().message, 0, headers);
        Ok(self.response(reply))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        req: Request<StreamRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        self.arrive("ServerStream").await;
        let headers = seen_headers(req.metadata());
        let req = req.into_inner();
        let mut items: Vec<Result<EchoReply, Status>> = Vec::new();
        for i in 0..req.count {
            if req.fail.is_some() && i == req.fail_after {
                break;
            }
            let message = format!("{} {i}", req.message);
            items.push(Ok(self.reply(message, u64::from(i), headers.clone())));
        }
        if let Some(fail) = &req.fail {
            items.push(Err(failure(fail)));
        }
        let stream: ReplyStream = Box::pin(stream::iter(items));
        Ok(self.response(stream))
    }

    async fn client_stream(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        self.arrive("ClientStream").await;
        let headers = seen_headers(req.metadata());
        let mut incoming = req.into_inner();
        let mut messages = Vec::new();
        while let Some(m) = incoming.message().await? {
            messages.push(m.message);
        }
        let count = messages.len() as u64;
        Ok(self.response(self.reply(messages.join(","), count, headers)))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        self.arrive("Bidi").await;
        let headers = seen_headers(req.metadata());
        let service = self.clone();
        let replies = stream::unfold(
            (req.into_inner(), 0u64, false),
            move |(mut incoming, index, done)| {
                let service = service.clone();
                let headers = headers.clone();
                async move {
                    if done {
                        return None;
                    }
                    match incoming.message().await {
                        Ok(Some(m)) => {
                            let reply = service.reply(m.message, index, headers);
                            Some((Ok(reply), (incoming, index + 1, false)))
                        }
                        Ok(None) => None,
                        Err(status) => Some((Err(status), (incoming, index, true))),
                    }
                }
            },
        );
        let stream: ReplyStream = Box::pin(replies);
        Ok(self.response(stream))
    }

    async fn fail(&self, req: Request<FailRequest>) -> Result<Response<EchoReply>, Status> {
        self.arrive("Fail").await;
        Err(failure(req.get_ref()))
    }
}
