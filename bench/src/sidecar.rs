//! Envoy sidecars for the `envoy` command: getting the parts (the pinned Envoy, the Shunt
//! module), writing their bootstraps, running them, and reading what they cost.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use shunt_envoy_harness::Envoy;

use crate::pki::Identity;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the bench crate sits in the workspace")
        .to_path_buf()
}

/// The pinned Envoy, fetched and cached by the repository's script.
pub(crate) fn envoy_binary() -> anyhow::Result<PathBuf> {
    Ok(shunt_envoy_harness::envoy_binary()?)
}

/// Builds `libshunt_envoy.so` with the release profile and returns the directory holding it.
///
/// Cargo reports where it put the library, so this finds it whatever the target directory.
pub(crate) fn build_module() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args(["build", "--release", "--locked", "-p", "shunt-envoy"])
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(workspace().join("Cargo.toml"))
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {}", Path::new(&cargo).display()))?;
    anyhow::ensure!(
        out.status.success(),
        "building shunt-envoy failed ({})",
        out.status
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["target"]["name"] != "shunt_envoy" {
            continue;
        }
        let files = msg["filenames"].as_array().into_iter().flatten();
        for file in files.filter_map(Value::as_str).map(Path::new) {
            if file.file_name().is_some_and(|n| n == "libshunt_envoy.so") {
                return Ok(file.parent().context("library path")?.to_path_buf());
            }
        }
    }
    anyhow::bail!("cargo built shunt-envoy but reported no libshunt_envoy.so")
}

/// A running Envoy, killed when dropped.
pub(crate) struct Sidecar {
    name: String,
    envoy: Envoy,
}

impl Sidecar {
    /// Starts Envoy on `static_resources` and returns once its admin reports LIVE.
    pub(crate) fn start(
        name: &str,
        module_dir: &Path,
        static_resources: Value,
    ) -> anyhow::Result<Sidecar> {
        // JSON is YAML, and needs no care with indentation or quoting.
        let bootstrap =
            serde_json::to_string_pretty(&json!({"static_resources": static_resources}))?;
        let envoy = Envoy::start(&format!("bench-{name}"), &bootstrap, module_dir, &[])?;
        Ok(Sidecar {
            name: name.to_owned(),
            envoy,
        })
    }

    /// Where the listener called `name` is bound; listeners ask for port 0, so no other
    /// program can take their port between choosing and binding it.
    pub(crate) fn listener(&self, name: &str) -> anyhow::Result<SocketAddr> {
        let text = self.envoy.admin_get("/listeners")?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix("::")?.parse().ok())
            .with_context(|| format!("envoy {} has no listener `{name}`: {text}", self.name))
    }

    /// CPU time, user and system, of the whole process so far.
    pub(crate) fn cpu(&self) -> anyhow::Result<Duration> {
        crate::cpu::cpu_time(self.envoy.pid())
    }

    pub(crate) fn log_tail(&self) -> String {
        self.envoy.log_tail(40)
    }
}

fn socket_address(addr: SocketAddr) -> Value {
    json!({"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}})
}

/// A sidecar's static resources: listener `in` on a free port → `tcp_proxy` → cluster `out`
/// at `upstream`, with optional transport sockets on the listener and the cluster.
pub(crate) fn tcp_proxy(
    listener_socket: Option<Value>,
    upstream: SocketAddr,
    cluster_socket: Option<Value>,
) -> Value {
    let mut chain = json!({
        "filters": [{
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": "in",
                "cluster": "out",
            },
        }],
    });
    if let Some(ts) = listener_socket {
        chain["transport_socket"] = ts;
    }
    let mut cluster = json!({
        "name": "out",
        "connect_timeout": "2s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": "out",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(upstream)}}]}],
        },
    });
    if let Some(ts) = cluster_socket {
        cluster["transport_socket"] = ts;
    }
    json!({
        "listeners": [{
            "name": "in",
            "address": socket_address(([127, 0, 0, 1], 0).into()),
            "filter_chains": [chain],
        }],
        "clusters": [cluster],
    })
}

/// Which end of the sidecar-to-sidecar connection a transport socket is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The client's cluster, which connects.
    Upstream,
    /// The server's listener, which accepts.
    Downstream,
}

/// Envoy's own TLS as Istio configures it for ISTIO_MUTUAL, with files in place of SDS.
pub(crate) fn istio_tls(side: Side, id: &Identity) -> Value {
    let tls_params = json!({
        "tls_minimum_protocol_version": "TLSv1_3",
        "tls_maximum_protocol_version": "TLSv1_3",
    });
    let certificate = json!({
        "certificate_chain": {"filename": id.cert_chain},
        "private_key": {"filename": id.private_key},
    });
    let validation = json!({
        "trusted_ca": {"filename": id.trust_bundle},
        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": id.peer_id}}],
    });
    let typed_config = match side {
        Side::Upstream => json!({
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "outbound_.80_._.server.default.svc.cluster.local",
            "common_tls_context": {
                "tls_params": tls_params,
                "alpn_protocols": ["istio-peer-exchange", "istio"],
                "tls_certificates": [certificate],
                "validation_context": validation,
            },
        }),
        Side::Downstream => json!({
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": true,
            "common_tls_context": {
                "tls_params": tls_params,
                "alpn_protocols": ["istio-peer-exchange", "h2", "http/1.1"],
                "tls_certificates": [certificate],
                "validation_context": validation,
            },
        }),
    };
    json!({"name": "envoy.transport_sockets.tls", "typed_config": typed_config})
}

/// The Shunt module as a transport socket, with `config` from [`shunt_module_config`].
pub(crate) fn shunt_socket(config: String) -> Value {
    json!({
        "name": "envoy.transport_sockets.dynamic_modules",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.dynamic_modules.v3.DynamicModuleTransportSocket",
            "dynamic_module_config": {"name": "shunt_envoy"},
            "transport_socket_name": "shunt",
            "transport_socket_config": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": config,
            },
        },
    })
}

/// The module's own YAML: attach to `shuntd_socket` in namespace `default` with the empty
/// secret and, with `mtls`, authenticate the peer with `id`'s material before pairing.
pub(crate) fn shunt_module_config(shuntd_socket: &Path, id: &Identity, mtls: bool) -> String {
    // JSON strings are YAML double-quoted scalars, so any path survives.
    let q = |p: &Path| Value::from(p.to_string_lossy()).to_string();
    let mut yaml = format!(
        "shuntd_socket: {}\nnamespace: {{id: default, secret: \"\"}}\n",
        q(shuntd_socket)
    );
    if mtls {
        yaml += &format!(
            "tls:\n  cert_chain: {}\n  private_key: {}\n  trust_bundle: {}\n  peer_identities: [{}]\n",
            q(&id.cert_chain),
            q(&id.private_key),
            q(&id.trust_bundle),
            Value::from(id.peer_id)
        );
    }
    yaml
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            cert_chain: "/pki/client-cert.pem".into(),
            private_key: "/pki/client-key.pem".into(),
            trust_bundle: "/pki/ca.pem".into(),
            peer_id: crate::pki::SERVER_ID,
        }
    }

    #[test]
    fn module_config_names_the_socket_and_adds_tls_only_for_mtls() {
        let plain = shunt_module_config(Path::new("/s/shuntd.sock"), &identity(), false);
        assert_eq!(
            plain,
            "shuntd_socket: \"/s/shuntd.sock\"\nnamespace: {id: default, secret: \"\"}\n"
        );
        let mtls = shunt_module_config(Path::new("/s/shuntd.sock"), &identity(), true);
        assert!(mtls.starts_with(&plain));
        assert!(mtls.ends_with(
            "tls:\n  cert_chain: \"/pki/client-cert.pem\"\n  private_key: \"/pki/client-key.pem\"\n  \
             trust_bundle: \"/pki/ca.pem\"\n  \
             peer_identities: [\"spiffe://cluster.local/ns/default/sa/server\"]\n"
        ));
    }
}
