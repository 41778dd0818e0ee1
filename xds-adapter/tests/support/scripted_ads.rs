//! A scripted stand-in for an xDS control plane, for protocol tests: each stream a client opens
//! is handed to the test, which reads the client's requests and writes the responses. No real
//! control plane lets a test send a malformed resource or cut a stream at a chosen point.

use std::net::SocketAddr;
use std::pin::Pin;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

pub struct Connection<Req, Resp> {
    /// The headers the client sent with the stream.
    pub metadata: tonic::metadata::MetadataMap,
    pub requests: Streaming<Req>,
    pub responses: mpsc::Sender<Result<Resp, Status>>,
}

impl<Req: Send + 'static, Resp> Connection<Req, Resp> {
    /// The client's next request; panics if the stream ends instead.
    pub async fn next(&mut self) -> Req {
        tokio::time::timeout(std::time::Duration::from_secs(10), self.requests.message())
            .await
            .expect("a request within 10 s")
            .expect("a healthy stream")
            .expect("the stream is still open")
    }

    pub async fn send(&self, response: Resp) {
        self.responses
            .send(Ok(response))
            .await
            .expect("client still connected");
    }
}

pub type SotwConnection = Connection<DiscoveryRequest, DiscoveryResponse>;
pub type DeltaConnection = Connection<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;

struct Service {
    sotw: mpsc::Sender<SotwConnection>,
    delta: mpsc::Sender<DeltaConnection>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        self.sotw
            .send(Connection {
                metadata: request.metadata().clone(),
                requests: request.into_inner(),
                responses: tx,
            })
            .await
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        self.delta
            .send(Connection {
                metadata: request.metadata().clone(),
                requests: request.into_inner(),
                responses: tx,
            })
            .await
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

pub struct ScriptedAds {
    pub address: SocketAddr,
    pub sotw: mpsc::Receiver<SotwConnection>,
    pub delta: mpsc::Receiver<DeltaConnection>,
}

impl ScriptedAds {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (sotw_tx, sotw) = mpsc::channel(8);
        let (delta_tx, delta) = mpsc::channel(8);
        let service = Service {
            sotw: sotw_tx,
            delta: delta_tx,
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(service))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        ScriptedAds {
            address,
            sotw,
            delta,
        }
    }

    pub async fn next_sotw(&mut self) -> SotwConnection {
        tokio::time::timeout(std::time::Duration::from_secs(30), self.sotw.recv())
            .await
            .expect("a connection within 30 s")
            .expect("server running")
    }

    pub async fn next_delta(&mut self) -> DeltaConnection {
        tokio::time::timeout(std::time::Duration::from_secs(30), self.delta.recv())
            .await
            .expect("a connection within 30 s")
            .expect("server running")
    }
}
