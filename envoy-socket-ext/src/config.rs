//! The transport socket's configuration: YAML (or JSON) in `transport_socket_config`, as a
//! `google.protobuf.StringValue`. A bad config fails Envoy's config load, with a message that
//! names the field.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use shunt_sapi::message::MIN_FIFO_SIZE;
use shunt_tls::{CertSource, IdentityPolicy, TlsContext, TlsError, TlsSettings};

use crate::tls_source::TlsSource;

/// Where `shuntd` listens for apps unless the config says otherwise.
pub const DEFAULT_SHUNTD_SOCKET: &str = "/run/shunt/shuntd.sock";
/// Longest `busy_poll_us`: past a millisecond, polling costs more than any wake-up it saves.
pub const MAX_BUSY_POLL_US: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("transport_socket_config is not valid UTF-8")]
    NotUtf8,
    #[error("transport_socket_config: {0}")]
    Syntax(#[from] serde_yaml_ng::Error),
    #[error("transport_socket_config field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("transport_socket_name `{0}` is unknown; use `shunt`")]
    UnknownSocketName(String),
}

/// Whether peers without Shunt are served (Istio's PERMISSIVE versus STRICT).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerPolicy {
    /// A peer that does not speak Shunt gets plain TCP passthrough.
    #[default]
    Permissive,
    /// A peer that does not speak Shunt is refused.
    Strict,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    #[serde(default = "default_namespace")]
    pub id: String,
    /// The namespace secret shuntd checks at attach; in plain mode it also keys the pairing.
    #[serde(default)]
    pub secret: String,
}

fn default_namespace() -> String {
    "default".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketConfig {
    #[serde(default = "default_socket")]
    pub shuntd_socket: PathBuf,
    #[serde(default = "default_namespace_config")]
    pub namespace: NamespaceConfig,
    #[serde(default)]
    pub peers: PeerPolicy,
    /// How long a connection may wait for shuntd to pair it before falling back.
    #[serde(default = "default_pairing_timeout")]
    pub pairing_timeout_ms: u64,
    /// Most payload bytes handed to Envoy per `do_read`, so one busy connection cannot starve
    /// the others on its worker.
    #[serde(default = "default_read_chunk")]
    pub max_read_per_event: usize,
    /// Bytes per FIFO of a cut-through connection (a power of two, at least 4096). shuntd
    /// grants the larger of the two sidecars' wishes, within a quarter of a segment.
    ///
    /// Sidecar streams are bulk more often than an app's, so the default is larger than
    /// shuntd's: a writer that finds its FIFO full sleeps until the reader's doorbell, and
    /// fewer such stalls carried a bulk stream about 1.15× faster through 4 MiB FIFOs than
    /// through 1 MiB ones (docs/performance.md). Memory is taken as bytes pass, so an idle or
    /// small connection does not touch its 4 MiB.
    #[serde(default = "default_fifo_size")]
    pub fifo_size: u32,
    /// Microseconds a cut-through connection keeps looking for the peer's bytes by itself
    /// after it last moved any, before it sleeps until a doorbell. While it looks, the peer
    /// writes without ringing, so a request and its answer skip the two wake-ups between
    /// sidecars; the worker spins for that long after each exchange. 0 always sleeps.
    #[serde(default)]
    pub busy_poll_us: u32,
    /// Mutual TLS. Without it, the module runs in plain mode (no TLS; pairing keyed by the
    /// namespace secret).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// The `tls` block: this workload's certificate, the mesh CA, and whom to accept.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM: the leaf certificate first, then intermediates. Re-read when it changes on disk.
    pub cert_chain: Option<PathBuf>,
    /// PEM: the leaf's private key.
    pub private_key: Option<PathBuf>,
    /// PEM: the CA certificates that peers' chains must lead to.
    pub trust_bundle: Option<PathBuf>,
    /// Instead of the three files: the name of a certificate in shuntd's store, in this
    /// socket's namespace (put there by `shunt certs put` or the xDS adapter from SDS).
    pub certificate: Option<String>,
    /// SPIFFE ids (or `spiffe://<trust-domain>/*`) a peer may present; empty accepts any
    /// identity the trust bundle vouches for.
    #[serde(default)]
    pub peer_identities: Vec<String>,
    /// Ordinary ALPN protocols, after Shunt's, for peers that are not Shunt (e.g. `h2`).
    #[serde(default)]
    pub alpn: Vec<String>,
}

/// A parsed configuration with what it needs built: the TLS material's source, shared by the
/// factory's connections.
pub struct Settings {
    pub config: SocketConfig,
    pub tls: Option<TlsSource>,
}

impl Settings {
    pub fn parse(socket_name: &[u8], bytes: &[u8]) -> Result<Self, ConfigError> {
        let config = SocketConfig::parse(socket_name, bytes)?;
        let tls = config.tls.as_ref().map(TlsConfig::source).transpose()?;
        Ok(Self { config, tls })
    }

    /// The TLS context for a new connection, or why there is none (plain mode, or a store
    /// with no usable certificate yet).
    pub fn tls_context(&self) -> Result<TlsContext, String> {
        match &self.tls {
            Some(source) => source.context(&self.config),
            None => Err("plain mode has no TLS".into()),
        }
    }

    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }
}

impl TlsConfig {
    fn source(&self) -> Result<TlsSource, ConfigError> {
        let invalid = |field, reason: String| ConfigError::Invalid { field, reason };
        let policy = IdentityPolicy::parse(self.peer_identities.iter().map(String::as_str))
            .map_err(|e| invalid("tls.peer_identities", e.to_string()))?;
        let alpn: Vec<Vec<u8>> = self.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let files = (&self.cert_chain, &self.private_key, &self.trust_bundle);
        match (files, &self.certificate) {
            ((None, None, None), Some(name)) => {
                if name.is_empty() {
                    return Err(invalid("tls.certificate", "must not be empty".into()));
                }
                Ok(TlsSource::store(name.clone(), policy, alpn))
            }
            ((Some(chain), Some(key), Some(bundle)), None) => {
                let mut settings = TlsSettings::new(CertSource::Files {
                    cert_chain: chain.clone(),
                    private_key: key.clone(),
                    trust_bundle: bundle.clone(),
                });
                settings.policy = policy;
                settings.alpn = alpn;
                let context = TlsContext::new(settings).map_err(|e| {
                    let field = match &e {
                        TlsError::InvalidAlpn(..) => "tls.alpn",
                        TlsError::Material { item, .. } if item.contains("chain") => {
                            "tls.cert_chain"
                        }
                        TlsError::Material { item, .. } if item.contains("key") => {
                            "tls.private_key"
                        }
                        TlsError::Material { item, .. } if item.contains("bundle") => {
                            "tls.trust_bundle"
                        }
                        _ => "tls",
                    };
                    invalid(field, e.to_string())
                })?;
                Ok(TlsSource::Files(context))
            }
            (_, Some(_)) => Err(invalid(
                "tls.certificate",
                "takes the place of cert_chain, private_key and trust_bundle; give one or the other"
                    .into(),
            )),
            ((None, _, _), None) => Err(invalid(
                "tls.cert_chain",
                "missing (or give tls.certificate)".into(),
            )),
            ((_, None, _), None) => Err(invalid("tls.private_key", "missing".into())),
            ((_, _, None), None) => Err(invalid("tls.trust_bundle", "missing".into())),
        }
    }
}

fn default_socket() -> PathBuf {
    DEFAULT_SHUNTD_SOCKET.into()
}
fn default_namespace_config() -> NamespaceConfig {
    NamespaceConfig {
        id: default_namespace(),
        secret: String::new(),
    }
}
fn default_pairing_timeout() -> u64 {
    200
}
fn default_read_chunk() -> usize {
    1 << 20
}
fn default_fifo_size() -> u32 {
    4 << 20
}

impl SocketConfig {
    /// Parses the config Envoy passes: an empty string means all defaults.
    pub fn parse(socket_name: &[u8], bytes: &[u8]) -> Result<Self, ConfigError> {
        let name = std::str::from_utf8(socket_name).map_err(|_| ConfigError::NotUtf8)?;
        if !name.is_empty() && name != "shunt" {
            return Err(ConfigError::UnknownSocketName(name.into()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| ConfigError::NotUtf8)?;
        let config: SocketConfig = if text.trim().is_empty() {
            serde_yaml_ng::from_str("{}")?
        } else {
            serde_yaml_ng::from_str(text)?
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.pairing_timeout_ms == 0 || self.pairing_timeout_ms > 10_000 {
            return Err(ConfigError::Invalid {
                field: "pairing_timeout_ms",
                reason: format!("{} is not within 1..=10000", self.pairing_timeout_ms),
            });
        }
        if self.max_read_per_event < 4096 {
            return Err(ConfigError::Invalid {
                field: "max_read_per_event",
                reason: format!("{} is below 4096", self.max_read_per_event),
            });
        }
        let size = self.fifo_size;
        if !size.is_power_of_two() || size < MIN_FIFO_SIZE {
            return Err(ConfigError::Invalid {
                field: "fifo_size",
                reason: format!("{size} is not a power of two of at least {MIN_FIFO_SIZE}"),
            });
        }
        if self.busy_poll_us > MAX_BUSY_POLL_US {
            return Err(ConfigError::Invalid {
                field: "busy_poll_us",
                reason: format!("{} is above {MAX_BUSY_POLL_US}", self.busy_poll_us),
            });
        }
        if self.namespace.id.is_empty() {
            return Err(ConfigError::Invalid {
                field: "namespace.id",
                reason: "must not be empty".into(),
            });
        }
        if !self.shuntd_socket.is_absolute() {
            return Err(ConfigError::Invalid {
                field: "shuntd_socket",
                reason: format!("{} is not an absolute path", self.shuntd_socket.display()),
            });
        }
        Ok(())
    }

    pub fn pairing_timeout(&self) -> Duration {
        Duration::from_millis(self.pairing_timeout_ms)
    }

    pub fn busy_poll(&self) -> Duration {
        Duration::from_micros(self.busy_poll_us.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_means_defaults() {
        let c = SocketConfig::parse(b"shunt", b"").unwrap();
        assert_eq!(c.shuntd_socket, PathBuf::from(DEFAULT_SHUNTD_SOCKET));
        assert_eq!(c.namespace.id, "default");
        assert_eq!(c.peers, PeerPolicy::Permissive);
        assert_eq!(c.pairing_timeout(), Duration::from_millis(200));
        assert_eq!(c.fifo_size, 4 << 20);
        assert_eq!(c.busy_poll(), Duration::ZERO);
    }

    #[test]
    fn reads_every_field() {
        let c = SocketConfig::parse(
            b"",
            b"shuntd_socket: /tmp/s.sock\nnamespace: {id: mesh, secret: s3}\npeers: strict\npairing_timeout_ms: 50\nmax_read_per_event: 65536\nfifo_size: 65536\nbusy_poll_us: 80\n",
        )
        .unwrap();
        assert_eq!(c.shuntd_socket, PathBuf::from("/tmp/s.sock"));
        assert_eq!(c.namespace.secret, "s3");
        assert_eq!(c.peers, PeerPolicy::Strict);
        assert_eq!(c.max_read_per_event, 65536);
        assert_eq!(c.fifo_size, 65536);
        assert_eq!(c.busy_poll(), Duration::from_micros(80));
    }

    #[test]
    fn errors_name_the_field() {
        for (yaml, field) in [
            ("peers: sometimes", "peers"),
            ("pairing_timeout_ms: 0", "pairing_timeout_ms"),
            ("shuntd_sockett: /x", "shuntd_sockett"),
            ("shuntd_socket: relative.sock", "shuntd_socket"),
            ("namespace: {id: ''}", "namespace.id"),
            ("fifo_size: 5000", "fifo_size"),
            ("fifo_size: 2048", "fifo_size"),
            ("busy_poll_us: 1001", "busy_poll_us"),
            ("busy_poll_us: -1", "busy_poll_us"),
        ] {
            let e = SocketConfig::parse(b"shunt", yaml.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "`{yaml}` gave `{e}`");
        }
        assert!(matches!(
            SocketConfig::parse(b"tls", b""),
            Err(ConfigError::UnknownSocketName(_))
        ));
    }

    #[test]
    fn tls_errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let ca = shunt_tls::dev_pki::DevCa::new("test CA").unwrap();
        let files = ca
            .write_workload("spiffe://cluster.local/ns/default/sa/web", dir.path())
            .unwrap();
        let tls = |chain: &str, bundle: &str, ids: &str| {
            format!(
                "tls: {{cert_chain: {chain}, private_key: {}, trust_bundle: {bundle}, peer_identities: [{ids}]}}",
                files.private_key.display()
            )
        };
        let (chain, bundle) = (
            files.cert_chain.display().to_string(),
            files.trust_bundle.display().to_string(),
        );
        let ok = Settings::parse(b"shunt", tls(&chain, &bundle, "").as_bytes()).unwrap();
        assert!(ok.tls_context().is_ok());
        let store = Settings::parse(b"shunt", b"tls: {certificate: mesh}").unwrap();
        assert!(store.uses_tls());
        for (yaml, field) in [
            (tls("/nonexistent/chain.pem", &bundle, ""), "tls.cert_chain"),
            (tls(&chain, "/nonexistent/ca.pem", ""), "tls.trust_bundle"),
            (
                tls(&chain, &bundle, "\"spiffe://x/*/y\""),
                "tls.peer_identities",
            ),
            ("tls: {cert_chain: /a}".to_owned(), "tls.private_key"),
            (
                "tls: {certificate: mesh, cert_chain: /a}".to_owned(),
                "tls.certificate",
            ),
            ("tls: {certificate: ''}".to_owned(), "tls.certificate"),
            ("tls: {peer_identities: []}".to_owned(), "tls.cert_chain"),
        ] {
            let e = Settings::parse(b"shunt", yaml.as_bytes())
                .err()
                .expect("refused")
                .to_string();
            assert!(e.contains(field), "`{yaml}` gave `{e}`");
        }
    }
}
