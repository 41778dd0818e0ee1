//! gRPC over Unix sockets: shuntd's control socket, and an Istio agent's sockets.

use std::path::Path;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::control::control_client::ControlClient;

/// Largest control message either side accepts. A mesh's services arrive in one
/// ReplaceServices request per source, tens of MiB for the largest meshes, well beyond gRPC's
/// 4 MiB default; the socket is local and privileged.
pub const CONTROL_MESSAGE_LIMIT: usize = 64 << 20;

/// A channel to the gRPC server on the Unix socket `path` (the URI is only a placeholder).
pub async fn unix_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    Endpoint::from_static("http://unix.socket")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

/// A control-API client for the shuntd whose control socket is `path`.
pub async fn control_client(
    path: &Path,
) -> Result<ControlClient<Channel>, tonic::transport::Error> {
    Ok(ControlClient::new(unix_channel(path).await?)
        .max_decoding_message_size(CONTROL_MESSAGE_LIMIT)
        .max_encoding_message_size(CONTROL_MESSAGE_LIMIT))
}
