//! A gRPC channel to shuntd's control socket (a Unix socket, so the URI is only a placeholder).

use std::path::{Path, PathBuf};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use shunt_proto::control::control_client::ControlClient;
use tonic::transport::{Channel, Endpoint, Uri};

pub(crate) type Client = ControlClient<Channel>;

/// Largest reply accepted: a big mesh's service listing outgrows gRPC's 4 MiB default. The
/// same limit shuntd puts on requests.
const MESSAGE_LIMIT: usize = 64 << 20;

pub(crate) async fn control_client(socket: &Path) -> anyhow::Result<Client> {
    let path: PathBuf = socket.to_owned();
    let channel = Endpoint::from_static("http://shuntd.control")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| {
            format!(
                "cannot reach shuntd's control socket {} (is shuntd running?)",
                socket.display()
            )
        })?;
    Ok(ControlClient::new(channel).max_decoding_message_size(MESSAGE_LIMIT))
}
