//! Reads an Envoy admin `/config_dump` (JSON or YAML) into the resources the adapter translates.
//!
//! The JSON is mapped onto Envoy's own schema (the descriptor set envoy-types was generated
//! from), so a dump decodes into exactly the types the ADS client receives. Extension configs
//! whose schema this build does not know (Istio's stats or Wasm filters, say) are kept as a
//! `google.protobuf.StringValue` holding their type URL (see [`extension_type_url`]), and listed
//! as unknown.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use envoy_types::pb::envoy::admin::v3::{
    BootstrapConfigDump, ClustersConfigDump, ConfigDump, EndpointsConfigDump, ListenersConfigDump,
    SecretsConfigDump,
};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage};

use crate::resource::{DecodeError, Resource, ResourceType};

const STAND_IN: &str = "google.protobuf.StringValue";

#[derive(Debug, thiserror::Error)]
pub enum ConfigDumpError {
    #[error("not JSON or YAML: {0}")]
    Syntax(String),
    #[error("does not match Envoy's ConfigDump schema: {0}")]
    Schema(String),
    #[error("{what}: {reason}")]
    Section { what: String, reason: String },
    #[error(transparent)]
    Resource(#[from] DecodeError),
}

/// What a config dump holds that the adapter can translate.
#[derive(Debug, Default)]
pub struct DumpedConfig {
    pub node: Option<Node>,
    /// Active resources only: warming and draining ones are not what Envoy serves.
    pub resources: Vec<Resource>,
    /// Type URLs of extension configs this build has no schema for.
    pub unknown_types: BTreeSet<String>,
    /// Config dump sections that were not read (for example `ScopedRoutesConfigDump`).
    pub skipped_sections: BTreeSet<String>,
}

fn envoy_schema() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(
            &include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"))[..],
        )
        .expect("envoy-types' descriptor set decodes")
    })
}

/// Parses a config dump as JSON, or as YAML when it is not JSON.
pub fn parse(text: &str) -> Result<DumpedConfig, ConfigDumpError> {
    let mut value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(json) => serde_yaml_ng::from_str(text)
            .map_err(|yaml| ConfigDumpError::Syntax(format!("JSON: {json}; YAML: {yaml}")))?,
    };
    let pool = envoy_schema();
    let mut unknown_types = BTreeSet::new();
    wrap_unknown_anys(pool, &mut value, &mut unknown_types);

    let descriptor = pool
        .get_message_by_name(ConfigDump::full_name().as_str())
        .ok_or_else(|| ConfigDumpError::Schema("no ConfigDump in the schema".into()))?;
    // Newer Envoys add fields; ignoring them is what Envoy's own parsers do with unknown fields.
    let options = DeserializeOptions::new().deny_unknown_fields(false);
    let dynamic = DynamicMessage::deserialize_with_options(descriptor, value, &options)
        .map_err(|e| ConfigDumpError::Schema(e.to_string()))?;
    let dump = ConfigDump::decode(dynamic.encode_to_vec().as_slice())
        .map_err(|e| ConfigDumpError::Schema(e.to_string()))?;

    let mut out = DumpedConfig {
        unknown_types,
        ..Default::default()
    };
    for section in &dump.configs {
        read_section(section, &mut out)?;
    }
    Ok(out)
}

fn unpack<T: Message + Name + Default>(any: &Any) -> Result<T, ConfigDumpError> {
    T::decode(any.value.as_slice()).map_err(|e| ConfigDumpError::Section {
        what: T::NAME.to_owned(),
        reason: e.to_string(),
    })
}

fn resource(kind: ResourceType, any: Option<&Any>) -> Result<Option<Resource>, ConfigDumpError> {
    any.map(|any| Resource::from_any(kind, any))
        .transpose()
        .map_err(Into::into)
}

fn read_section(section: &Any, out: &mut DumpedConfig) -> Result<(), ConfigDumpError> {
    let name = section.type_url.rsplit('/').next().unwrap_or_default();
    let mut found = Vec::new();
    if name == BootstrapConfigDump::full_name() {
        let dump: BootstrapConfigDump = unpack(section)?;
        out.node = dump.bootstrap.and_then(|b| b.node);
    } else if name == ClustersConfigDump::full_name() {
        let dump: ClustersConfigDump = unpack(section)?;
        for c in &dump.static_clusters {
            found.push(resource(ResourceType::Cluster, c.cluster.as_ref())?);
        }
        for c in &dump.dynamic_active_clusters {
            found.push(resource(ResourceType::Cluster, c.cluster.as_ref())?);
        }
    } else if name == EndpointsConfigDump::full_name() {
        let dump: EndpointsConfigDump = unpack(section)?;
        for e in &dump.static_endpoint_configs {
            found.push(resource(
                ResourceType::Endpoints,
                e.endpoint_config.as_ref(),
            )?);
        }
        for e in &dump.dynamic_endpoint_configs {
            found.push(resource(
                ResourceType::Endpoints,
                e.endpoint_config.as_ref(),
            )?);
        }
    } else if name == ListenersConfigDump::full_name() {
        let dump: ListenersConfigDump = unpack(section)?;
        for l in &dump.static_listeners {
            found.push(resource(ResourceType::Listener, l.listener.as_ref())?);
        }
        for l in &dump.dynamic_listeners {
            let active = l.active_state.as_ref().and_then(|s| s.listener.as_ref());
            found.push(resource(ResourceType::Listener, active)?);
        }
    } else if name == SecretsConfigDump::full_name() {
        let dump: SecretsConfigDump = unpack(section)?;
        for s in &dump.static_secrets {
            found.push(resource(ResourceType::Secret, s.secret.as_ref())?);
        }
        for s in &dump.dynamic_active_secrets {
            found.push(resource(ResourceType::Secret, s.secret.as_ref())?);
        }
    } else {
        out.skipped_sections.insert(name.to_owned());
    }
    out.resources.extend(found.into_iter().flatten());
    Ok(())
}

/// The type URL of an extension config, seeing through the stand-in for unknown types.
pub fn extension_type_url(any: &Any) -> String {
    if any.type_url.rsplit('/').next() == Some(STAND_IN)
        && let Ok(original) = String::decode(any.value.as_slice())
    {
        return original;
    }
    any.type_url.clone()
}

/// Replaces every `{"@type": T, ...}` whose T the schema lacks by a stand-in naming T, so the
/// rest of the dump still decodes.
fn wrap_unknown_anys(
    pool: &DescriptorPool,
    value: &mut serde_json::Value,
    unknown: &mut BTreeSet<String>,
) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(type_url)) = map.get("@type") {
                let message = type_url.rsplit('/').next().unwrap_or_default();
                if pool.get_message_by_name(message).is_none() {
                    unknown.insert(type_url.clone());
                    let type_url = type_url.clone();
                    map.clear();
                    map.insert(
                        "@type".into(),
                        format!("type.googleapis.com/{STAND_IN}").into(),
                    );
                    map.insert("value".into(), type_url.into());
                    return;
                }
            }
            for v in map.values_mut() {
                wrap_unknown_anys(pool, v, unknown);
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                wrap_unknown_anys(pool, v, unknown);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_extension_types_are_kept_and_listed() {
        let dump = r#"{"configs": [{
            "@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
            "static_listeners": [{"listener": {
                "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
                "name": "l",
                "filter_chains": [{"filters": [{"name": "istio.stats", "typed_config": {
                    "@type": "type.googleapis.com/stats.PluginConfig", "disable_host_header_fallback": true
                }}]}]
            }}]
        }, {"@type": "type.googleapis.com/envoy.admin.v3.ScopedRoutesConfigDump"}]}"#;
        let parsed = parse(dump).unwrap();
        assert_eq!(parsed.resources.len(), 1);
        assert_eq!(parsed.resources[0].name(), "l");
        let Resource::Listener(l) = &parsed.resources[0] else {
            panic!("not a listener")
        };
        let config = l.filter_chains[0].filters[0].config_type.clone();
        let Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(
            any,
        )) = config
        else {
            panic!("no typed config")
        };
        assert_eq!(
            extension_type_url(&any),
            "type.googleapis.com/stats.PluginConfig"
        );
        assert!(
            parsed
                .unknown_types
                .contains("type.googleapis.com/stats.PluginConfig")
        );
        assert!(
            parsed
                .skipped_sections
                .contains("envoy.admin.v3.ScopedRoutesConfigDump")
        );
    }

    #[test]
    fn yaml_and_errors() {
        let yaml = "configs:\n- '@type': type.googleapis.com/envoy.admin.v3.SecretsConfigDump\n  dynamic_active_secrets:\n  - name: ROOTCA\n    secret:\n      '@type': type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\n      name: ROOTCA\n";
        let parsed = parse(yaml).unwrap();
        assert_eq!(parsed.resources[0].name(), "ROOTCA");
        assert!(matches!(parse("{"), Err(ConfigDumpError::Syntax(_))));
        assert!(matches!(
            parse(r#"{"configs": 5}"#),
            Err(ConfigDumpError::Schema(_))
        ));
    }
}
