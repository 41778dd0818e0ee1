//! `shunt rules`: the local (per-namespace egress) and global (ingress) rules tables.

use clap::{Args, Subcommand, ValueEnum};
use shunt_proto::control as pb;

use crate::connect::Client;
use crate::rpc_error;
use crate::table::Table;

#[derive(Subcommand, Debug)]
pub(crate) enum RulesCommand {
    /// List rules: the global table and every namespace's local table, or only the one named.
    /// Each table is listed in lookup order: highest priority first, then most specific.
    List {
        /// Only this table (with --namespace for a local one).
        #[arg(long, value_enum)]
        scope: Option<Scope>,
        #[arg(long, required_if_eq("scope", "local"))]
        namespace: Option<String>,
    },
    /// Add a rule; a rule with the same tag in the same table is replaced, unless another
    /// source (the xDS adapter) owns that tag.
    Add(AddArgs),
    /// Delete the rule with this tag.
    #[command(alias = "del")]
    Delete {
        #[command(flatten)]
        table: TableArgs,
        /// The rule's tag.
        tag: String,
    },
}

/// Which table: `--scope global`, or `--scope local --namespace ID`.
#[derive(Args, Debug, Clone)]
pub(crate) struct TableArgs {
    #[arg(long, value_enum)]
    scope: Scope,
    /// The namespace whose local table is meant (local scope only).
    #[arg(long, required_if_eq("scope", "local"))]
    namespace: Option<String>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// A namespace's egress table: filters and redirects connects made from the namespace.
    Local,
    /// The node's ingress table: filters connections arriving at listeners.
    Global,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum Action {
    Allow,
    Deny,
    Redirect,
}

#[derive(Args, Debug)]
pub(crate) struct AddArgs {
    #[command(flatten)]
    table: TableArgs,
    /// Unique name of the rule within its table.
    #[arg(long)]
    tag: String,
    #[arg(long, value_enum)]
    action: Action,
    /// For `redirect`: the listener (ip:port) matching connects go to.
    #[arg(long, required_if_eq("action", "redirect"))]
    redirect_to: Option<String>,
    /// Local prefix, e.g. 10.0.0.0/8 (default: any address of the remote's family).
    #[arg(long)]
    local: Option<String>,
    /// Local ports: `*`, `80` or `8000-8999`.
    #[arg(long, default_value = "*", value_parser = parse_ports)]
    local_ports: pb::PortRange,
    /// Remote prefix, e.g. 192.168.1.0/24 or ::/0.
    #[arg(long)]
    remote: Option<String>,
    /// Remote ports: `*`, `443` or `1-1023`.
    #[arg(long, default_value = "*", value_parser = parse_ports)]
    remote_ports: pb::PortRange,
    /// Only pairings whose other end proved a matching identity (a SPIFFE id): `exact:ID`,
    /// `prefix:P`, `suffix:S` or `contains:C`; a bare ID means exact. The global table matches
    /// the initiator's identity, a local table the responder's. Ordinary connects carry no
    /// identity and never match such a rule.
    #[arg(long, value_parser = parse_principal, value_name = "MATCH")]
    principal: Option<pb::IdentityMatch>,
    /// Rules of a higher priority are looked at first, however specific the others are.
    #[arg(long, default_value_t = 0, value_name = "N")]
    priority: u32,
}

/// Parses `exact:ID`, `prefix:P`, `suffix:S`, `contains:C` or a bare ID (exact). Only the four
/// kinds count as a prefix, so a bare `spiffe://...` id is itself.
fn parse_principal(s: &str) -> Result<pb::IdentityMatch, String> {
    use pb::identity_match::Kind;
    let kind = match s.split_once(':') {
        Some(("exact", p)) => Kind::Exact(p.into()),
        Some(("prefix", p)) => Kind::Prefix(p.into()),
        Some(("suffix", p)) => Kind::Suffix(p.into()),
        Some(("contains", p)) => Kind::Contains(p.into()),
        _ => Kind::Exact(s.into()),
    };
    let (Kind::Exact(p) | Kind::Prefix(p) | Kind::Suffix(p) | Kind::Contains(p)) = &kind;
    if p.is_empty() {
        return Err("the identity to match is empty".into());
    }
    Ok(pb::IdentityMatch { kind: Some(kind) })
}

/// `*` for any peer, else what [`parse_principal`] reads.
pub(crate) fn format_principal(m: Option<&pb::IdentityMatch>) -> String {
    use pb::identity_match::Kind;
    match m.and_then(|m| m.kind.as_ref()) {
        None => "*".into(),
        Some(Kind::Exact(p)) => format!("exact:{p}"),
        Some(Kind::Prefix(p)) => format!("prefix:{p}"),
        Some(Kind::Suffix(p)) => format!("suffix:{p}"),
        Some(Kind::Contains(p)) => format!("contains:{p}"),
    }
}

/// Parses `*`, `PORT` or `FIRST-LAST`.
fn parse_ports(s: &str) -> Result<pb::PortRange, String> {
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map(u32::from)
            .map_err(|_| format!("`{p}` is not a port (0-65535)"))
    };
    let (first, last) = match s.split_once('-') {
        _ if s.trim() == "*" => (0, u32::from(u16::MAX)),
        Some((a, b)) => (port(a)?, port(b)?),
        None => {
            let p = port(s)?;
            (p, p)
        }
    };
    if first > last {
        return Err(format!("range {first}-{last} is empty"));
    }
    Ok(pb::PortRange { first, last })
}

fn format_ports(p: Option<&pb::PortRange>) -> String {
    match p {
        Some(p) if p.first == 0 && p.last == u32::from(u16::MAX) => "*".into(),
        Some(p) if p.first == p.last => p.first.to_string(),
        Some(p) => format!("{}-{}", p.first, p.last),
        None => "*".into(),
    }
}

fn table_of(args: &TableArgs) -> (pb::RuleScope, String) {
    match args.scope {
        Scope::Global => (pb::RuleScope::Global, String::new()),
        Scope::Local => (
            pb::RuleScope::Local,
            args.namespace.clone().unwrap_or_default(),
        ),
    }
}

async fn list_table(
    client: &mut Client,
    scope: pb::RuleScope,
    namespace: String,
) -> anyhow::Result<Vec<pb::Rule>> {
    Ok(client
        .list_rules(pb::ListRulesRequest {
            scope: scope as i32,
            namespace,
        })
        .await
        .map_err(rpc_error)?
        .into_inner()
        .rules)
}

pub(crate) async fn run(client: &mut Client, cmd: RulesCommand) -> anyhow::Result<String> {
    match cmd {
        RulesCommand::List { scope, namespace } => {
            let mut rules = Vec::new();
            match scope {
                Some(scope) => {
                    let (scope, ns) = table_of(&TableArgs { scope, namespace });
                    rules.extend(list_table(client, scope, ns).await?);
                }
                None => {
                    rules.extend(list_table(client, pb::RuleScope::Global, String::new()).await?);
                    let namespaces = client
                        .list_namespaces(pb::ListNamespacesRequest {})
                        .await
                        .map_err(rpc_error)?
                        .into_inner()
                        .namespaces;
                    for ns in namespaces {
                        rules.extend(list_table(client, pb::RuleScope::Local, ns.id).await?);
                    }
                }
            }
            let mut t = Table::new(&[
                "TABLE",
                "TAG",
                "ACTION",
                "LOCAL",
                "LPORTS",
                "REMOTE",
                "RPORTS",
                "PRIO",
                "PRINCIPAL",
                "SOURCE",
            ]);
            for r in rules {
                let table = if r.namespace.is_empty() {
                    "global".to_owned()
                } else {
                    format!("local:{}", r.namespace)
                };
                let action = match pb::RuleAction::try_from(r.action) {
                    Ok(pb::RuleAction::Allow) => "allow".to_owned(),
                    Ok(pb::RuleAction::Deny) => "deny".to_owned(),
                    Ok(pb::RuleAction::Redirect) => format!("redirect:{}", r.redirect_to),
                    _ => format!("unknown({})", r.action),
                };
                t.row(vec![
                    table,
                    r.tag,
                    action,
                    r.local_prefix,
                    format_ports(r.local_ports.as_ref()),
                    r.remote_prefix,
                    format_ports(r.remote_ports.as_ref()),
                    r.priority.to_string(),
                    format_principal(r.principal.as_ref()),
                    // Rules written by hand have no source.
                    if r.source.is_empty() {
                        "-".into()
                    } else {
                        r.source
                    },
                ]);
            }
            Ok(t.render())
        }
        RulesCommand::Add(a) => {
            let (scope, namespace) = table_of(&a.table);
            let action = match a.action {
                Action::Allow => pb::RuleAction::Allow,
                Action::Deny => pb::RuleAction::Deny,
                Action::Redirect => pb::RuleAction::Redirect,
            };
            let reply = client
                .add_rule(pb::AddRuleRequest {
                    rule: Some(pb::Rule {
                        scope: scope as i32,
                        namespace,
                        local_prefix: a.local.unwrap_or_default(),
                        local_ports: Some(a.local_ports),
                        remote_prefix: a.remote.unwrap_or_default(),
                        remote_ports: Some(a.remote_ports),
                        action: action as i32,
                        redirect_to: a.redirect_to.unwrap_or_default(),
                        tag: a.tag.clone(),
                        principal: a.principal,
                        priority: a.priority,
                        source: String::new(),
                    }),
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let verb = if reply.replaced { "replaced" } else { "added" };
            Ok(format!("rule {} {verb}\n", a.tag))
        }
        RulesCommand::Delete { table, tag } => {
            let (scope, namespace) = table_of(&table);
            client
                .delete_rule(pb::DeleteRuleRequest {
                    scope: scope as i32,
                    namespace,
                    tag: tag.clone(),
                })
                .await
                .map_err(rpc_error)?;
            Ok(format!("rule {tag} deleted\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_print_back() {
        for (text, first, last) in [("*", 0, 65535), ("80", 80, 80), ("1-1023", 1, 1023)] {
            let p = parse_ports(text).unwrap();
            assert_eq!((p.first, p.last), (first, last), "{text}");
            assert_eq!(format_ports(Some(&p)), text);
        }
    }

    #[test]
    fn principals_parse_and_print_back() {
        use pb::identity_match::Kind;
        let id = "spiffe://cluster.local/ns/default/sa/client";
        for (text, kind, shown) in [
            (id.to_owned(), Kind::Exact(id.into()), format!("exact:{id}")),
            (
                format!("exact:{id}"),
                Kind::Exact(id.into()),
                format!("exact:{id}"),
            ),
            (
                "prefix:spiffe://cluster.local/".into(),
                Kind::Prefix("spiffe://cluster.local/".into()),
                "prefix:spiffe://cluster.local/".into(),
            ),
            (
                "suffix:/sa/client".into(),
                Kind::Suffix("/sa/client".into()),
                "suffix:/sa/client".into(),
            ),
            (
                "contains:/ns/default/".into(),
                Kind::Contains("/ns/default/".into()),
                "contains:/ns/default/".into(),
            ),
        ] {
            let m = parse_principal(&text).unwrap();
            assert_eq!(m.kind, Some(kind), "{text}");
            assert_eq!(format_principal(Some(&m)), shown);
        }
        assert_eq!(format_principal(None), "*");
        assert!(parse_principal("prefix:").unwrap_err().contains("empty"));
        assert!(parse_principal("").unwrap_err().contains("empty"));
    }

    #[test]
    fn bad_port_ranges_say_why() {
        assert!(parse_ports("70000").unwrap_err().contains("not a port"));
        assert!(parse_ports("10-5").unwrap_err().contains("empty"));
        assert!(parse_ports("http").unwrap_err().contains("`http`"));
    }
}
