//! gRPC channels to an xDS server: TCP (plaintext or TLS) or a Unix socket (pilot-agent's
//! `XDS` and SDS sockets inside a pod).

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `http://host:port` or `https://host:port`.
    Tcp(String),
    Unix(PathBuf),
}

impl std::str::FromStr for Target {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(Target::Unix(path.into()));
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            return Ok(Target::Tcp(s.to_owned()));
        }
        Err(TransportError::Target(s.to_owned()))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp(uri) => f.write_str(uri),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// TLS towards a TCP target: the CA to trust and, for mutual TLS, our certificate and key.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name to verify the server as, when it differs from the URI's host.
    pub server_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("target `{0}` is neither unix:PATH nor an http(s):// URI")]
    Target(String),
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("connecting to {target}: {source}")]
    Connect {
        target: String,
        source: tonic::transport::Error,
    },
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn connect(target: &Target, tls: Option<&TlsFiles>) -> Result<Channel, TransportError> {
    let fail = |source| TransportError::Connect {
        target: target.to_string(),
        source,
    };
    match target {
        Target::Unix(path) => shunt_proto::unix_channel(path).await.map_err(fail),
        Target::Tcp(uri) => {
            let mut endpoint = Endpoint::from_shared(uri.clone())
                .map_err(fail)?
                .connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
                .tcp_keepalive(Some(Duration::from_secs(300)));
            if let Some(tls) = tls {
                endpoint = endpoint.tls_config(client_tls(tls)?).map_err(fail)?;
            }
            endpoint.connect().await.map_err(fail)
        }
    }
}

fn client_tls(files: &TlsFiles) -> Result<ClientTlsConfig, TransportError> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| TransportError::Read(p.clone(), e));
    let mut config = ClientTlsConfig::new();
    if let Some(ca) = &files.ca {
        config = config.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    if let (Some(cert), Some(key)) = (&files.cert, &files.key) {
        config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    if let Some(name) = &files.server_name {
        config = config.domain_name(name.clone());
    }
    Ok(config)
}
