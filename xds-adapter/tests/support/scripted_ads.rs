//! A scripted stand-in for an xDS control plane (ADS and SDS), for protocol tests: each stream a
//! client opens is handed to the test, which reads the client's requests and writes the
//! responses. No real control plane lets a test send a malformed resource or cut a stream at a
//! chosen point. It listens on TCP, TLS over TCP, or a Unix socket.

use std::net::SocketAddr;
use std::pin::Pin;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
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

#[derive(Clone)]
struct Service {
    sotw: mpsc::Sender<SotwConnection>,
    delta: mpsc::Sender<DeltaConnection>,
    sds: mpsc::Sender<SotwConnection>,
}

#[tonic::async_trait]
impl SecretDiscoveryService for Service {
    type StreamSecretsStream = BoxStream<DiscoveryResponse>;
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        hand_over(&self.sds, request).await
    }

    // As pilot-agent in many releases.
    async fn delta_secrets(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented("DeltaSecrets not implemented"))
    }

    async fn fetch_secrets(
        &self,
        _: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("FetchSecrets not implemented"))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Gives a new stream to the test, and answers with what the test will send on it.
async fn hand_over<Req, Resp: Send + 'static>(
    to: &mpsc::Sender<Connection<Req, Resp>>,
    request: Request<Streaming<Req>>,
) -> Result<Response<BoxStream<Resp>>, Status> {
    let (tx, rx) = mpsc::channel(64);
    to.send(Connection {
        metadata: request.metadata().clone(),
        requests: request.into_inner(),
        responses: tx,
    })
    .await
    .map_err(|_| Status::unavailable("test over"))?;
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        hand_over(&self.sotw, request).await
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        hand_over(&self.delta, request).await
    }
}

pub struct ScriptedAds {
    pub address: SocketAddr,
    pub sotw: mpsc::Receiver<SotwConnection>,
    pub delta: mpsc::Receiver<DeltaConnection>,
    pub sds: mpsc::Receiver<SotwConnection>,
}

/// Where the server listens.
pub enum Listen {
    Tcp,
    /// TLS with this PEM certificate chain and key.
    Tls {
        cert: String,
        key: String,
    },
    Unix(std::path::PathBuf),
}

impl ScriptedAds {
    pub async fn start() -> Self {
        Self::start_on(Listen::Tcp).await
    }

    pub async fn start_on(listen: Listen) -> Self {
        let (sotw_tx, sotw) = mpsc::channel(8);
        let (delta_tx, delta) = mpsc::channel(8);
        let (sds_tx, sds) = mpsc::channel(8);
        let service = Service {
            sotw: sotw_tx,
            delta: delta_tx,
            sds: sds_tx,
        };
        let mut builder = tonic::transport::Server::builder();
        if let Listen::Tls { cert, key } = &listen {
            builder = builder
                .tls_config(
                    tonic::transport::ServerTlsConfig::new()
                        .identity(tonic::transport::Identity::from_pem(cert, key)),
                )
                .expect("valid TLS config");
        }
        let router = builder
            .add_service(AggregatedDiscoveryServiceServer::new(service.clone()))
            .add_service(SecretDiscoveryServiceServer::new(service));
        let address = match listen {
            Listen::Unix(path) => {
                let listener = tokio::net::UnixListener::bind(path).unwrap();
                tokio::spawn(router.serve_with_incoming(UnixListenerStream::new(listener)));
                SocketAddr::from(([0, 0, 0, 0], 0))
            }
            Listen::Tcp | Listen::Tls { .. } => {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let address = listener.local_addr().unwrap();
                tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
                address
            }
        };
        ScriptedAds {
            address,
            sotw,
            delta,
            sds,
        }
    }

    pub async fn next_sotw(&mut self) -> SotwConnection {
        next(&mut self.sotw).await
    }

    pub async fn next_delta(&mut self) -> DeltaConnection {
        next(&mut self.delta).await
    }

    pub async fn next_sds(&mut self) -> SotwConnection {
        next(&mut self.sds).await
    }
}

async fn next<T>(rx: &mut mpsc::Receiver<T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(30), rx.recv())
        .await
        .expect("a connection within 30 s")
        .expect("server running")
}
