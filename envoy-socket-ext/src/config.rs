//! The transport socket's configuration: YAML (or JSON) in `transport_socket_config`, as a
//! `google.protobuf.StringValue`. A bad config fails Envoy's config load, with a message that
//! names the field.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Where `shuntd` listens for apps unless the config says otherwise.
pub const DEFAULT_SHUNTD_SOCKET: &str = "/run/shunt/shuntd.sock";

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
    }

    #[test]
    fn reads_every_field() {
        let c = SocketConfig::parse(
            b"",
            b"shuntd_socket: /tmp/s.sock\nnamespace: {id: mesh, secret: s3}\npeers: strict\npairing_timeout_ms: 50\nmax_read_per_event: 65536\n",
        )
        .unwrap();
        assert_eq!(c.shuntd_socket, PathBuf::from("/tmp/s.sock"));
        assert_eq!(c.namespace.secret, "s3");
        assert_eq!(c.peers, PeerPolicy::Strict);
        assert_eq!(c.max_read_per_event, 65536);
    }

    #[test]
    fn errors_name_the_field() {
        for (yaml, field) in [
            ("peers: sometimes", "peers"),
            ("pairing_timeout_ms: 0", "pairing_timeout_ms"),
            ("shuntd_sockett: /x", "shuntd_sockett"),
            ("shuntd_socket: relative.sock", "shuntd_socket"),
            ("namespace: {id: ''}", "namespace.id"),
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
}
