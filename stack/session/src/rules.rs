//! Rules tables: allow, deny or redirect connects by prefix and port range.
//!
//! Each namespace has a *local* table (egress: connects made from it) and the node has one
//! *global* table (ingress: connects arriving at a listener). A lookup returns the most specific
//! matching rule:
//!
//! 1. the longest prefixes (remote prefix length, then local prefix length);
//! 2. then the narrowest port ranges (remote, then local);
//! 3. then, between equally specific rules, deny before redirect before allow, so an ambiguous
//!    table fails closed.
//!
//! Rules are named by a tag, unique per table: adding a rule under an existing tag replaces it.

use std::cmp::{Ordering, Reverse};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use ipnet::IpNet;

pub const MAX_TAG_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("port range {first}-{last} is empty")]
    EmptyPortRange { first: u16, last: u16 },
    #[error("local and remote prefixes mix IPv4 and IPv6")]
    MixedFamilies,
    #[error("tag must be 1 to {MAX_TAG_LEN} characters")]
    BadTag,
    #[error("redirect target {0} is of another address family than the rule")]
    RedirectFamily(SocketAddr),
    #[error("no rule tagged `{0}`")]
    NoSuchTag(String),
    #[error("cannot parse `{0}` as a prefix")]
    BadPrefix(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const ANY: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };

    pub fn new(first: u16, last: u16) -> Result<Self, RuleError> {
        if first > last {
            return Err(RuleError::EmptyPortRange { first, last });
        }
        Ok(Self { first, last })
    }

    pub fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    fn span(&self) -> u32 {
        u32::from(self.last - self.first)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Self::ANY {
            f.write_str("*")
        } else if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleAction {
    Allow,
    Deny,
    /// Send the connect to the listener at this endpoint instead.
    Redirect(SocketAddr),
}

impl RuleAction {
    pub fn as_str(&self) -> &'static str {
        match self {
            RuleAction::Allow => "allow",
            RuleAction::Deny => "deny",
            RuleAction::Redirect(_) => "redirect",
        }
    }

    /// Tie-break between equally specific rules: lower wins.
    fn precedence(&self) -> u8 {
        match self {
            RuleAction::Deny => 0,
            RuleAction::Redirect(_) => 1,
            RuleAction::Allow => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub local: IpNet,
    pub local_ports: PortRange,
    pub remote: IpNet,
    pub remote_ports: PortRange,
    pub action: RuleAction,
    pub tag: String,
}

/// Parses "10.0.0.0/8", "::/0" or a bare address (a host prefix).
pub fn parse_prefix(s: &str) -> Result<IpNet, RuleError> {
    IpNet::from_str(s)
        .or_else(|_| std::net::IpAddr::from_str(s).map(IpNet::from))
        .map_err(|_| RuleError::BadPrefix(s.to_owned()))
}

impl Rule {
    pub fn validate(&self) -> Result<(), RuleError> {
        if self.tag.is_empty() || self.tag.len() > MAX_TAG_LEN {
            return Err(RuleError::BadTag);
        }
        let v4 = matches!(self.remote, IpNet::V4(_));
        if v4 != matches!(self.local, IpNet::V4(_)) {
            return Err(RuleError::MixedFamilies);
        }
        if let RuleAction::Redirect(to) = self.action
            && to.is_ipv4() != v4
        {
            return Err(RuleError::RedirectFamily(to));
        }
        Ok(())
    }

    pub fn matches(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        self.remote.contains(&remote.ip())
            && self.local.contains(&local.ip())
            && self.remote_ports.contains(remote.port())
            && self.local_ports.contains(local.port())
    }

    /// Greater is more specific; see the module docs.
    fn specificity(&self) -> impl Ord {
        (
            self.remote.prefix_len(),
            self.local.prefix_len(),
            Reverse(self.remote_ports.span()),
            Reverse(self.local_ports.span()),
            Reverse(self.action.precedence()),
        )
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}:{} -> {}:{} {}",
            self.tag,
            self.local,
            self.local_ports,
            self.remote,
            self.remote_ports,
            self.action.as_str()
        )?;
        if let RuleAction::Redirect(to) = self.action {
            write!(f, " {to}")?;
        }
        Ok(())
    }
}

/// Kept sorted, most specific first, so a lookup returns the first match.
#[derive(Debug, Clone, Default)]
pub struct RulesTable {
    rules: Vec<Rule>,
}

impl RulesTable {
    /// Adds `rule`, replacing any rule with the same tag. Returns whether one was replaced.
    pub fn add(&mut self, rule: Rule) -> Result<bool, RuleError> {
        rule.validate()?;
        let replaced = self.remove(&rule.tag).is_ok();
        let at = self
            .rules
            .partition_point(|r| r.specificity().cmp(&rule.specificity()) != Ordering::Less);
        self.rules.insert(at, rule);
        Ok(replaced)
    }

    pub fn remove(&mut self, tag: &str) -> Result<Rule, RuleError> {
        let at = self
            .rules
            .iter()
            .position(|r| r.tag == tag)
            .ok_or_else(|| RuleError::NoSuchTag(tag.to_owned()))?;
        Ok(self.rules.remove(at))
    }

    pub fn lookup(&self, local: SocketAddr, remote: SocketAddr) -> Option<&Rule> {
        self.rules.iter().find(|r| r.matches(local, remote))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule(remote: &str, ports: PortRange, action: RuleAction, tag: &str) -> Rule {
        let remote = parse_prefix(remote).unwrap();
        let local = match remote {
            IpNet::V4(_) => parse_prefix("0.0.0.0/0").unwrap(),
            IpNet::V6(_) => parse_prefix("::/0").unwrap(),
        };
        Rule {
            local,
            local_ports: PortRange::ANY,
            remote,
            remote_ports: ports,
            action,
            tag: tag.into(),
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn more_specific_allow_masks_a_deny() {
        let mut t = RulesTable::default();
        t.add(rule(
            "10.0.0.0/8",
            PortRange::ANY,
            RuleAction::Deny,
            "deny-10",
        ))
        .unwrap();
        t.add(rule(
            "10.1.0.0/16",
            PortRange::single(80),
            RuleAction::Allow,
            "allow-web",
        ))
        .unwrap();
        let local = sa("0.0.0.0:0");
        assert_eq!(t.lookup(local, sa("10.1.2.3:80")).unwrap().tag, "allow-web");
        assert_eq!(t.lookup(local, sa("10.1.2.3:81")).unwrap().tag, "deny-10");
        assert_eq!(t.lookup(local, sa("10.2.0.1:80")).unwrap().tag, "deny-10");
        assert!(t.lookup(local, sa("11.0.0.1:80")).is_none());
        assert!(
            t.lookup(sa("[::]:0"), sa("[::1]:80")).is_none(),
            "v4 rules never match v6"
        );
    }

    #[test]
    fn narrower_port_range_wins_at_equal_prefix() {
        let mut t = RulesTable::default();
        t.add(rule(
            "10.0.0.0/8",
            PortRange::new(1, 1000).unwrap(),
            RuleAction::Deny,
            "wide",
        ))
        .unwrap();
        t.add(rule(
            "10.0.0.0/8",
            PortRange::new(80, 90).unwrap(),
            RuleAction::Allow,
            "narrow",
        ))
        .unwrap();
        assert_eq!(
            t.lookup(sa("0.0.0.0:0"), sa("10.0.0.1:85")).unwrap().tag,
            "narrow"
        );
        assert_eq!(
            t.lookup(sa("0.0.0.0:0"), sa("10.0.0.1:95")).unwrap().tag,
            "wide"
        );
    }

    #[test]
    fn equal_specificity_fails_closed() {
        let mut t = RulesTable::default();
        t.add(rule("10.0.0.0/8", PortRange::ANY, RuleAction::Allow, "a"))
            .unwrap();
        t.add(rule("10.0.0.0/8", PortRange::ANY, RuleAction::Deny, "d"))
            .unwrap();
        assert_eq!(
            t.lookup(sa("0.0.0.0:0"), sa("10.0.0.1:1")).unwrap().action,
            RuleAction::Deny
        );
    }

    #[test]
    fn tags_replace_and_delete() {
        let mut t = RulesTable::default();
        assert!(
            !t.add(rule("::/0", PortRange::ANY, RuleAction::Deny, "x"))
                .unwrap()
        );
        assert!(
            t.add(rule("::/0", PortRange::ANY, RuleAction::Allow, "x"))
                .unwrap()
        );
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.lookup(sa("[::]:0"), sa("[::1]:1")).unwrap().action,
            RuleAction::Allow
        );
        t.remove("x").unwrap();
        assert!(t.is_empty());
        assert_eq!(t.remove("x").unwrap_err(), RuleError::NoSuchTag("x".into()));
    }

    #[test]
    fn invalid_rules_are_refused() {
        let mut t = RulesTable::default();
        let mut r = rule("10.0.0.0/8", PortRange::ANY, RuleAction::Allow, "");
        assert_eq!(t.add(r.clone()).unwrap_err(), RuleError::BadTag);
        r.tag = "t".into();
        r.local = parse_prefix("::/0").unwrap();
        assert_eq!(t.add(r.clone()).unwrap_err(), RuleError::MixedFamilies);
        r.local = parse_prefix("0.0.0.0/0").unwrap();
        r.action = RuleAction::Redirect(sa("[::1]:80"));
        assert!(matches!(
            t.add(r).unwrap_err(),
            RuleError::RedirectFamily(_)
        ));
        assert!(PortRange::new(5, 4).is_err());
    }

    proptest! {
        /// The table's answer equals a brute-force search for the most specific match.
        #[test]
        fn lookup_matches_brute_force(
            specs in proptest::collection::vec((0u8..=32, any::<u32>(), any::<u16>(), 0u16..2000, 0u8..3), 1..20),
            probes in proptest::collection::vec((any::<u32>(), any::<u16>()), 1..50),
        ) {
            let mut t = RulesTable::default();
            let mut all = Vec::new();
            for (i, (len, addr, first, span, act)) in specs.into_iter().enumerate() {
                let net = ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(addr), len).unwrap().trunc();
                let action = match act { 0 => RuleAction::Allow, 1 => RuleAction::Deny, _ => RuleAction::Redirect(sa("127.0.0.1:1")) };
                let r = Rule {
                    local: parse_prefix("0.0.0.0/0").unwrap(),
                    local_ports: PortRange::ANY,
                    remote: IpNet::V4(net),
                    remote_ports: PortRange::new(first, first.saturating_add(span)).unwrap(),
                    action,
                    tag: format!("r{i}"),
                };
                t.add(r.clone()).unwrap();
                all.push(r);
            }
            for (addr, port) in probes {
                let remote = SocketAddr::new(std::net::Ipv4Addr::from(addr).into(), port);
                let local = sa("0.0.0.0:0");
                let best = all.iter().filter(|r| r.matches(local, remote)).max_by(|a, b| a.specificity().cmp(&b.specificity()));
                let got = t.lookup(local, remote);
                prop_assert_eq!(got.map(|r| r.specificity().cmp(&best.unwrap().specificity())), best.map(|_| Ordering::Equal));
            }
        }
    }
}
