//! The client of shuntd's control socket, with an error that says what to check.

use std::path::Path;

use anyhow::Context;
use shunt_proto::control::control_client::ControlClient;
use tonic::transport::Channel;

pub(crate) type Client = ControlClient<Channel>;

pub(crate) async fn control_client(socket: &Path) -> anyhow::Result<Client> {
    shunt_proto::control_client(socket).await.with_context(|| {
        format!(
            "cannot reach shuntd's control socket {} (is shuntd running?)",
            socket.display()
        )
    })
}
