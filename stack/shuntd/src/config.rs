//! shuntd's configuration: a YAML file, or the built-in default so a bare `shuntd` runs.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shunt_session::access::AccessList;
use shunt_session::cut_through::CutThroughConfig;
use shunt_session::identity_match::IdentityMatch;
use shunt_session::limits::{Caps, Limits};
use shunt_session::rules::{self, PortRange, Rule, RuleAction, RuleError};

/// The configuration used when no file is given.
pub const DEFAULT_CONFIG: &str = include_str!("default.yaml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Parse(#[from] serde_yaml_ng::Error),
    #[error("`{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.to_string(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub app_socket: PathBuf,
    pub control_socket: PathBuf,
    /// Who may call the control API, by the credentials the kernel reports for the caller.
    #[serde(default)]
    pub control_clients: ControlClientsSection,
    #[serde(default)]
    pub metrics_address: String,
    pub workers: usize,
    pub event_queue_len: u32,
    /// How long one end of a pairing waits for the other, in milliseconds.
    pub pair_timeout_ms: u64,
    pub cut_through: CutThroughSection,
    /// What one user, one namespace, and connections that have not attached may hold.
    pub limits: LimitsSection,
    pub namespaces: Vec<NamespaceSection>,
    #[serde(default)]
    pub rules: Vec<RuleSection>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub per_uid: CapsSection,
    pub per_namespace: CapsSection,
    pub unattached: UnattachedSection,
}

/// Caps of one holder; see `shunt_session::limits`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapsSection {
    pub apps: u64,
    pub workers: u64,
    pub listeners: u64,
    pub sessions: u64,
    pub segment_bytes: u64,
}

impl From<CapsSection> for Caps {
    fn from(c: CapsSection) -> Caps {
        Caps {
            apps: c.apps,
            workers: c.workers,
            listeners: c.listeners,
            sessions: c.sessions,
            segment_bytes: c.segment_bytes,
        }
    }
}

/// App-socket connections that have not attached yet.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnattachedSection {
    pub total: usize,
    pub per_uid: usize,
    pub timeout_ms: u64,
}

/// Users and groups allowed on the control socket. With both lists empty, root and the user
/// shuntd runs as are; otherwise exactly the listed users, and the callers whose primary group
/// is listed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlClientsSection {
    #[serde(default)]
    pub uids: Vec<u32>,
    #[serde(default)]
    pub gids: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutThroughSection {
    pub fifo_size: u32,
    pub segment_size: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSection {
    pub id: String,
    #[serde(default)]
    pub secret: String,
    pub address: IpAddr,
    /// Who may attach, beside knowing the secret: both empty means root and the user shuntd
    /// runs as; otherwise exactly these users, and callers whose primary group is listed.
    #[serde(default)]
    pub uids: Vec<u32>,
    #[serde(default)]
    pub gids: Vec<u32>,
}

impl NamespaceSection {
    pub fn access(&self) -> AccessList {
        AccessList {
            uids: self.uids.clone(),
            gids: self.gids.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleScopeSection {
    Local,
    Global,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleActionSection {
    Allow,
    Deny,
    Redirect,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    pub scope: RuleScopeSection,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub local: Option<String>,
    #[serde(default)]
    pub local_ports: Option<String>,
    #[serde(default)]
    pub remote: Option<String>,
    #[serde(default)]
    pub remote_ports: Option<String>,
    pub action: RuleActionSection,
    #[serde(default)]
    pub redirect_to: Option<SocketAddr>,
    pub tag: String,
    /// The peer identity the rule applies to: `exact:ID`, `prefix:P`, `suffix:S`,
    /// `contains:C`, or a bare identity for exact.
    #[serde(default)]
    pub principal: Option<String>,
    #[serde(default)]
    pub priority: u32,
}

/// Parses "*", "80" or "8000-8080".
pub fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let s = s.trim();
    if s == "*" || s.is_empty() {
        return Ok(PortRange::ANY);
    }
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("`{p}` is not a port"))
    };
    match s.split_once('-') {
        Some((a, b)) => PortRange::new(port(a)?, port(b)?).map_err(|e| e.to_string()),
        None => Ok(PortRange::single(port(s)?)),
    }
}

/// Builds a rule from its user-facing parts, defaulting unset prefixes to "any" of the family
/// the other prefix (or the redirect target) implies.
pub fn build_rule(
    local: Option<&str>,
    local_ports: Option<&str>,
    remote: Option<&str>,
    remote_ports: Option<&str>,
    action: RuleActionSection,
    redirect_to: Option<SocketAddr>,
    tag: &str,
) -> Result<Rule, (&'static str, String)> {
    let v6_hint = [local, remote]
        .into_iter()
        .flatten()
        .any(|p| p.contains(':'))
        || redirect_to.is_some_and(|r| r.is_ipv6());
    let any = if v6_hint { "::/0" } else { "0.0.0.0/0" };
    let prefix = |field, p: Option<&str>| {
        rules::parse_prefix(p.unwrap_or(any)).map_err(|e: RuleError| (field, e.to_string()))
    };
    let ports = |field, p: Option<&str>| parse_port_range(p.unwrap_or("*")).map_err(|e| (field, e));
    let action = match (action, redirect_to) {
        (RuleActionSection::Allow, _) => RuleAction::Allow,
        (RuleActionSection::Deny, _) => RuleAction::Deny,
        (RuleActionSection::Redirect, Some(to)) => RuleAction::Redirect(to),
        (RuleActionSection::Redirect, None) => {
            return Err(("redirect_to", "a redirect needs a target".into()));
        }
    };
    let rule = Rule::new(
        prefix("local", local)?,
        ports("local_ports", local_ports)?,
        prefix("remote", remote)?,
        ports("remote_ports", remote_ports)?,
        action,
        tag,
    );
    rule.validate().map_err(|e| ("rule", e.to_string()))?;
    Ok(rule)
}

/// Gives a rule from [`build_rule`] what only some rules have, checking each part and naming
/// the field at fault.
pub fn finish_rule(
    mut rule: Rule,
    principal: Option<IdentityMatch>,
    priority: u32,
    source: &str,
) -> Result<Rule, (&'static str, String)> {
    if let Some(p) = &principal {
        p.validate().map_err(|e| ("principal", e.to_string()))?;
    }
    rules::validate_source(source).map_err(|e| ("source", e.to_string()))?;
    rule.principal = principal;
    rule.priority = priority;
    rule.source = source.to_owned();
    Ok(rule)
}

impl RuleSection {
    /// A rule of the configuration file: written by hand, so of the empty source.
    pub fn to_rule(&self) -> Result<Rule, (&'static str, String)> {
        let rule = build_rule(
            self.local.as_deref(),
            self.local_ports.as_deref(),
            self.remote.as_deref(),
            self.remote_ports.as_deref(),
            self.action,
            self.redirect_to,
            &self.tag,
        )?;
        let principal = self
            .principal
            .as_deref()
            .map(str::parse::<IdentityMatch>)
            .transpose()
            .map_err(|e| ("principal", e.to_string()))?;
        finish_rule(rule, principal, self.priority, "")
    }
}

/// Merges `over` into `base`: mappings key by key at every depth (so `cut_through: {fifo_size:
/// 65536}` keeps the default segment size); anything else, lists included, is replaced whole.
fn overlay_into(base: &mut serde_yaml_ng::Value, over: serde_yaml_ng::Value) {
    use serde_yaml_ng::Value;
    match (base, over) {
        (Value::Mapping(base), Value::Mapping(over)) => {
            for (k, v) in over {
                match base.get_mut(&k) {
                    Some(existing) => overlay_into(existing, v),
                    None => {
                        base.insert(k, v);
                    }
                }
            }
        }
        // An empty file parses as null: nothing to change.
        (_, Value::Null) => {}
        (base, over) => *base = over,
    }
}

impl Config {
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_owned(),
                source,
            })?,
            None => DEFAULT_CONFIG.to_owned(),
        };
        Self::parse(&text)
    }

    /// The built-in configuration for a private shuntd: both sockets in `dir`
    /// (`shuntd.sock`, `control.sock`) and metrics on a free loopback port. Tests and benchmarks
    /// run one in-process this way, touching nothing shared.
    pub fn private(dir: &Path) -> Config {
        let mut config = Self::load(None).expect("the built-in configuration is valid");
        config.app_socket = dir.join("shuntd.sock");
        config.control_socket = dir.join("control.sock");
        config.metrics_address = "127.0.0.1:0".into();
        config
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        // Start from the default and overlay the file, so a file may set only what it changes.
        let mut merged: serde_yaml_ng::Value = serde_yaml_ng::from_str(DEFAULT_CONFIG)?;
        let overlay: serde_yaml_ng::Value = serde_yaml_ng::from_str(text)?;
        overlay_into(&mut merged, overlay);
        let config: Config = serde_yaml_ng::from_value(merged)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let fifo = self.cut_through.fifo_size;
        if !fifo.is_power_of_two() || !(4096..=(1 << 30)).contains(&fifo) {
            return Err(invalid(
                "cut_through.fifo_size",
                "must be a power of two from 4096 to 1 GiB",
            ));
        }
        if self.cut_through.segment_size < 4 * fifo as usize {
            return Err(invalid(
                "cut_through.segment_size",
                "must hold at least two FIFO pairs",
            ));
        }
        if self.cut_through.segment_size > u32::MAX as usize {
            return Err(invalid("cut_through.segment_size", "must be below 4 GiB"));
        }
        if !self.event_queue_len.is_power_of_two() || self.event_queue_len < 16 {
            return Err(invalid(
                "event_queue_len",
                "must be a power of two, at least 16",
            ));
        }
        let u = &self.limits.unattached;
        if u.total == 0 || u.per_uid == 0 || u.timeout_ms == 0 {
            return Err(invalid(
                "limits.unattached",
                "total, per_uid and timeout_ms must be above 0",
            ));
        }
        if !self.metrics_address.is_empty() && self.metrics_address.parse::<SocketAddr>().is_err() {
            return Err(invalid("metrics_address", "must be ip:port or empty"));
        }
        for (i, r) in self.rules.iter().enumerate() {
            r.to_rule()
                .map_err(|(field, e)| invalid(format!("rules[{i}].{field}"), e))?;
            if r.scope == RuleScopeSection::Local && r.namespace.is_none() {
                return Err(invalid(
                    format!("rules[{i}].namespace"),
                    "local rules name a namespace",
                ));
            }
        }
        Ok(())
    }

    pub fn worker_count(&self) -> usize {
        if self.workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.workers
        }
    }

    pub fn cut_through(&self) -> CutThroughConfig {
        CutThroughConfig {
            fifo_size: self.cut_through.fifo_size,
            segment_size: self.cut_through.segment_size,
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            per_uid: self.limits.per_uid.into(),
            per_namespace: self.limits.per_namespace.into(),
        }
    }

    pub fn unattached(&self) -> crate::app_server::UnattachedLimits {
        let u = &self.limits.unattached;
        crate::app_server::UnattachedLimits {
            total: u.total,
            per_uid: u.per_uid,
            timeout: std::time::Duration::from_millis(u.timeout_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.namespaces[0].id, "default");
        assert!(c.namespaces[0].access().is_default());
        assert!(c.rules.is_empty());
    }

    #[test]
    fn the_documented_limits_are_the_session_layers_defaults() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.limits(), Limits::default());
        let u = c.unattached();
        let d = crate::app_server::UnattachedLimits::default();
        assert_eq!(
            (u.total, u.per_uid, u.timeout),
            (d.total, d.per_uid, d.timeout)
        );
        let c = Config::parse("limits: {per_uid: {sessions: 10}}").unwrap();
        assert_eq!(c.limits().per_uid.sessions, 10);
        assert_eq!(
            c.limits().per_uid.apps,
            Caps::DEFAULT.apps,
            "the rest stays"
        );
        let e = Config::parse("limits: {unattached: {per_uid: 0}}").unwrap_err();
        assert!(e.to_string().contains("limits.unattached"), "{e}");
    }

    #[test]
    fn namespaces_may_list_who_attaches() {
        let c = Config::parse(
            "namespaces: [{id: mesh, address: 127.0.0.1, uids: [1337], gids: [2000]}]",
        )
        .unwrap();
        let a = c.namespaces[0].access();
        assert!(a.admits(1337, 1337, 0) && a.admits(5, 2000, 0) && !a.admits(0, 0, 0));
    }

    #[test]
    fn overlay_changes_only_given_keys() {
        let c = Config::parse("workers: 3\nmetrics_address: ''\n").unwrap();
        assert_eq!(c.workers, 3);
        assert_eq!(c.metrics_address, "");
        assert_eq!(c.cut_through.fifo_size, 1 << 20);
    }

    #[test]
    fn shipped_example_is_valid() {
        let c = Config::parse(include_str!("../../../examples/shuntd/shuntd.yaml")).unwrap();
        assert_eq!(c.namespaces.len(), 2);
        assert_eq!(c.rules.len(), 3);
    }

    #[test]
    fn overlay_merges_nested_sections_and_replaces_lists() {
        let c = Config::parse("cut_through: {fifo_size: 65536}\nnamespaces: []\n").unwrap();
        assert_eq!(c.cut_through.fifo_size, 65536);
        assert_eq!(c.cut_through.segment_size, 64 << 20, "default kept");
        assert!(c.namespaces.is_empty(), "lists are replaced, not appended");
        assert_eq!(
            Config::parse("").unwrap().workers,
            2,
            "an empty file changes nothing"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let e =
            Config::parse("cut_through: {fifo_size: 1000, segment_size: 67108864}").unwrap_err();
        assert!(e.to_string().contains("cut_through.fifo_size"), "{e}");
        let e = Config::parse(
            "rules: [{scope: global, remote: 10.0.0.0/8, remote_ports: '9-1', action: deny, tag: x}]",
        )
        .unwrap_err();
        assert!(e.to_string().contains("rules[0].remote_ports"), "{e}");
        let e = Config::parse("rules: [{scope: local, action: deny, tag: x}]").unwrap_err();
        assert!(e.to_string().contains("rules[0].namespace"), "{e}");
        let e = Config::parse("bogus: 1").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn rules_may_name_a_principal_and_a_priority() {
        let c = Config::parse(
            "rules:\n\
             - {scope: global, action: deny, tag: a, principal: 'prefix:spiffe://cluster.local/ns/x/', priority: 3}\n\
             - {scope: global, action: deny, tag: b, principal: 'spiffe://cluster.local/ns/x/sa/y'}\n",
        )
        .unwrap();
        let a = c.rules[0].to_rule().unwrap();
        assert_eq!(
            a.principal,
            Some(IdentityMatch::Prefix("spiffe://cluster.local/ns/x/".into()))
        );
        assert_eq!((a.priority, a.source.as_str()), (3, ""));
        let b = c.rules[1].to_rule().unwrap();
        assert_eq!(
            b.principal,
            Some(IdentityMatch::Exact(
                "spiffe://cluster.local/ns/x/sa/y".into()
            ))
        );
        assert_eq!(b.priority, 0);
        let e =
            Config::parse("rules: [{scope: global, action: deny, tag: x, principal: 'suffix:'}]")
                .unwrap_err();
        assert!(e.to_string().contains("rules[0].principal"), "{e}");
    }

    #[test]
    fn port_ranges_parse() {
        assert_eq!(parse_port_range("*"), Ok(PortRange::ANY));
        assert_eq!(parse_port_range("80"), Ok(PortRange::single(80)));
        assert_eq!(
            parse_port_range("80-90"),
            Ok(PortRange::new(80, 90).unwrap())
        );
        assert!(parse_port_range("x").is_err());
        assert!(parse_port_range("90-80").is_err());
    }
}
