//! Rules tables: allow, deny or redirect connects by prefix, port range and peer identity.
//!
//! Each namespace has a *local* table (egress: connects made from it) and the node has one
//! *global* table (ingress: connects arriving at a listener). A lookup returns the first
//! matching rule in this order:
//!
//! 1. the highest `priority` (hand-written rules default to 0);
//! 2. within a priority, the longest prefixes (remote prefix length, then local prefix length);
//! 3. then the narrowest principal: a rule naming an exact identity, then one naming a prefix or
//!    suffix, then one naming a substring, then a rule naming none;
//! 4. then the narrowest port ranges (remote, then local);
//! 5. then, between equally specific rules, deny before redirect before allow, so an ambiguous
//!    table fails closed.
//!
//! A rule with a principal matches only a connection whose peer identity is known and matches
//! it. Only pairings carry identities (the one the other sidecar verified in its handshake);
//! ordinary connects never match such a rule, neither to allow nor to deny.
//!
//! Rules are named by a tag, unique per table: adding a rule under an existing tag replaces it,
//! but only if it has the same source. Every rule has a source: empty for rules written by hand
//! (configuration, CLI), otherwise the config source that owns it and replaces its whole set at
//! once ([`RulesTable::replace_source`]). One source can never take over another's tag.

use std::cmp::{Ordering, Reverse};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use ipnet::IpNet;

use crate::identity_match::{IdentityMatch, IdentityMatchError};

/// Long enough for generated tags that describe their origin (listener, policy, rule index).
pub const MAX_TAG_LEN: usize = 256;
/// Longest source name.
pub const MAX_SOURCE_LEN: usize = 256;

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
    #[error("principal: {0}")]
    Principal(#[from] IdentityMatchError),
    #[error("source must be at most {MAX_SOURCE_LEN} characters of printable ASCII")]
    BadSource,
    #[error("a source that replaces its rules must be named")]
    NoSource,
    #[error("tag `{tag}` belongs to {}; delete that rule first or pick another tag", describe_source(.owner))]
    TagTaken { tag: String, owner: String },
    #[error("tag `{0}` appears more than once in the same table")]
    DuplicateTag(String),
    #[error("rule `{tag}` has source `{found}`, expected `{expected}`")]
    WrongSource {
        tag: String,
        expected: String,
        found: String,
    },
}

fn describe_source(source: &str) -> String {
    if source.is_empty() {
        "a rule written by hand".to_owned()
    } else {
        format!("source `{source}`")
    }
}

/// Printable ASCII up to [`MAX_SOURCE_LEN`] bytes; empty is the hand-written source.
pub fn validate_source(source: &str) -> Result<(), RuleError> {
    if source.len() > MAX_SOURCE_LEN || !source.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(RuleError::BadSource);
    }
    Ok(())
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
    /// The peer's verified identity must match this; `None` matches any peer, with or without
    /// an identity.
    pub principal: Option<IdentityMatch>,
    /// Higher priorities are looked at first; see the module docs.
    pub priority: u32,
    /// Who owns the rule: empty when written by hand.
    pub source: String,
}

/// Parses "10.0.0.0/8", "::/0" or a bare address (a host prefix).
pub fn parse_prefix(s: &str) -> Result<IpNet, RuleError> {
    IpNet::from_str(s)
        .or_else(|_| std::net::IpAddr::from_str(s).map(IpNet::from))
        .map_err(|_| RuleError::BadPrefix(s.to_owned()))
}

impl Rule {
    /// A hand-written rule of priority 0 for any peer.
    pub fn new(
        local: IpNet,
        local_ports: PortRange,
        remote: IpNet,
        remote_ports: PortRange,
        action: RuleAction,
        tag: &str,
    ) -> Self {
        Self {
            local,
            local_ports,
            remote,
            remote_ports,
            action,
            tag: tag.to_owned(),
            principal: None,
            priority: 0,
            source: String::new(),
        }
    }

    pub fn validate(&self) -> Result<(), RuleError> {
        if self.tag.is_empty() || self.tag.len() > MAX_TAG_LEN {
            return Err(RuleError::BadTag);
        }
        validate_source(&self.source)?;
        if let Some(p) = &self.principal {
            p.validate()?;
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

    /// Whether the rule applies to a connection between `local` and `remote` whose other end
    /// proved `peer` (`None`: no identity is known).
    pub fn matches(&self, local: SocketAddr, remote: SocketAddr, peer: Option<&str>) -> bool {
        self.remote.contains(&remote.ip())
            && self.local.contains(&local.ip())
            && self.remote_ports.contains(remote.port())
            && self.local_ports.contains(local.port())
            && self
                .principal
                .as_ref()
                .is_none_or(|p| peer.is_some_and(|id| p.matches(id)))
    }

    /// Greater is looked at first; see the module docs.
    fn specificity(&self) -> impl Ord {
        (
            self.priority,
            self.remote.prefix_len(),
            self.local.prefix_len(),
            self.principal
                .as_ref()
                .map_or(0, IdentityMatch::specificity),
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
        if let Some(p) = &self.principal {
            write!(f, " principal {p}")?;
        }
        if self.priority != 0 {
            write!(f, " priority {}", self.priority)?;
        }
        if !self.source.is_empty() {
            write!(f, " source {}", self.source)?;
        }
        Ok(())
    }
}

/// Kept sorted, first looked at first, so a lookup returns the first match.
#[derive(Debug, Clone, Default)]
pub struct RulesTable {
    rules: Vec<Rule>,
}

impl RulesTable {
    /// Adds `rule`, replacing any rule with the same tag and source. Returns whether one was
    /// replaced. A tag held by a rule of another source is refused rather than taken over: the
    /// owner would otherwise lose its rule without knowing.
    pub fn add(&mut self, rule: Rule) -> Result<bool, RuleError> {
        rule.validate()?;
        if let Some(existing) = self.get(&rule.tag)
            && existing.source != rule.source
        {
            return Err(RuleError::TagTaken {
                tag: rule.tag,
                owner: existing.source.clone(),
            });
        }
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

    pub fn get(&self, tag: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.tag == tag)
    }

    /// The rule deciding a connection between `local` and `remote` whose other end proved
    /// `peer`, if any rule matches.
    pub fn lookup(
        &self,
        local: SocketAddr,
        remote: SocketAddr,
        peer: Option<&str>,
    ) -> Option<&Rule> {
        self.rules.iter().find(|r| r.matches(local, remote, peer))
    }

    /// Checks that `rules` may become `source`'s whole set in this table: each is valid and
    /// carries `source`, their tags are unique, and none is held by another source.
    pub fn check_replace(&self, source: &str, rules: &[Rule]) -> Result<(), RuleError> {
        if source.is_empty() {
            return Err(RuleError::NoSource);
        }
        validate_source(source)?;
        let mut tags = std::collections::HashSet::with_capacity(rules.len());
        for r in rules {
            r.validate()?;
            if r.source != source {
                return Err(RuleError::WrongSource {
                    tag: r.tag.clone(),
                    expected: source.to_owned(),
                    found: r.source.clone(),
                });
            }
            if !tags.insert(r.tag.as_str()) {
                return Err(RuleError::DuplicateTag(r.tag.clone()));
            }
        }
        if let Some(taken) = self
            .rules
            .iter()
            .find(|r| r.source != source && tags.contains(r.tag.as_str()))
        {
            return Err(RuleError::TagTaken {
                tag: taken.tag.clone(),
                owner: taken.source.clone(),
            });
        }
        Ok(())
    }

    /// Replaces every rule of `source` with `rules`; returns how many were removed. On error
    /// the table is unchanged.
    pub fn replace_source(&mut self, source: &str, rules: Vec<Rule>) -> Result<usize, RuleError> {
        self.check_replace(source, &rules)?;
        Ok(self.apply_replace(source, rules))
    }

    /// [`RulesTable::replace_source`] after a successful [`RulesTable::check_replace`]: cannot
    /// fail, so several tables can be changed together.
    pub(crate) fn apply_replace(&mut self, source: &str, rules: Vec<Rule>) -> usize {
        let before = self.rules.len();
        self.rules.retain(|r| r.source != source);
        let removed = before - self.rules.len();
        self.rules.extend(rules);
        // Stable, so equally specific rules keep the order they had (and the new ones follow):
        // the same order `add` would have given them.
        self.rules
            .sort_by(|a, b| b.specificity().cmp(&a.specificity()));
        removed
    }

    /// How many rules `source` has here.
    pub fn count_source(&self, source: &str) -> usize {
        self.rules.iter().filter(|r| r.source == source).count()
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

    const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";

    fn rule(remote: &str, ports: PortRange, action: RuleAction, tag: &str) -> Rule {
        let remote = parse_prefix(remote).unwrap();
        let local = match remote {
            IpNet::V4(_) => parse_prefix("0.0.0.0/0").unwrap(),
            IpNet::V6(_) => parse_prefix("::/0").unwrap(),
        };
        Rule::new(local, PortRange::ANY, remote, ports, action, tag)
    }

    fn any_v4(action: RuleAction, tag: &str) -> Rule {
        rule("0.0.0.0/0", PortRange::ANY, action, tag)
    }

    fn with_principal(mut r: Rule, principal: &str) -> Rule {
        r.principal = Some(principal.parse().unwrap());
        r
    }

    fn sourced(mut r: Rule, source: &str) -> Rule {
        r.source = source.into();
        r
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn tag_of(t: &RulesTable, remote: &str, peer: Option<&str>) -> Option<String> {
        t.lookup(sa("0.0.0.0:0"), sa(remote), peer)
            .map(|r| r.tag.clone())
    }

    fn tags(t: &RulesTable) -> Vec<String> {
        t.iter().map(|r| r.tag.clone()).collect()
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
        assert_eq!(
            t.lookup(local, sa("10.1.2.3:80"), None).unwrap().tag,
            "allow-web"
        );
        assert_eq!(
            t.lookup(local, sa("10.1.2.3:81"), None).unwrap().tag,
            "deny-10"
        );
        assert_eq!(
            t.lookup(local, sa("10.2.0.1:80"), None).unwrap().tag,
            "deny-10"
        );
        assert!(t.lookup(local, sa("11.0.0.1:80"), None).is_none());
        assert!(
            t.lookup(sa("[::]:0"), sa("[::1]:80"), None).is_none(),
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
        assert_eq!(tag_of(&t, "10.0.0.1:85", None).unwrap(), "narrow");
        assert_eq!(tag_of(&t, "10.0.0.1:95", None).unwrap(), "wide");
    }

    #[test]
    fn equal_specificity_fails_closed() {
        let mut t = RulesTable::default();
        t.add(rule("10.0.0.0/8", PortRange::ANY, RuleAction::Allow, "a"))
            .unwrap();
        t.add(rule("10.0.0.0/8", PortRange::ANY, RuleAction::Deny, "d"))
            .unwrap();
        assert_eq!(
            t.lookup(sa("0.0.0.0:0"), sa("10.0.0.1:1"), None)
                .unwrap()
                .action,
            RuleAction::Deny
        );
    }

    #[test]
    fn a_higher_priority_wins_over_any_specificity() {
        let mut t = RulesTable::default();
        t.add(rule(
            "10.1.2.3/32",
            PortRange::single(80),
            RuleAction::Allow,
            "narrow",
        ))
        .unwrap();
        let mut broad = any_v4(RuleAction::Deny, "broad");
        broad.priority = 1;
        t.add(broad).unwrap();
        assert_eq!(tag_of(&t, "10.1.2.3:80", None).unwrap(), "broad");
        // Within the higher priority the usual order holds again.
        let mut narrower = rule("10.0.0.0/8", PortRange::ANY, RuleAction::Allow, "p1-10");
        narrower.priority = 1;
        t.add(narrower).unwrap();
        assert_eq!(tag_of(&t, "10.1.2.3:80", None).unwrap(), "p1-10");
        assert_eq!(tag_of(&t, "11.0.0.1:80", None).unwrap(), "broad");
        assert_eq!(tags(&t), ["p1-10", "broad", "narrow"]);
    }

    #[test]
    fn a_principal_is_narrower_than_none_but_not_than_a_longer_prefix() {
        let mut t = RulesTable::default();
        t.add(rule(
            "10.0.0.0/8",
            PortRange::single(80),
            RuleAction::Allow,
            "narrow-ports",
        ))
        .unwrap();
        // Same prefixes, wider ports, but a principal: looked at first.
        t.add(with_principal(
            rule("10.0.0.0/8", PortRange::ANY, RuleAction::Deny, "client"),
            CLIENT,
        ))
        .unwrap();
        // A longer prefix still beats a principal.
        t.add(rule(
            "10.9.0.0/16",
            PortRange::ANY,
            RuleAction::Allow,
            "longer",
        ))
        .unwrap();
        assert_eq!(tag_of(&t, "10.0.0.1:80", Some(CLIENT)).unwrap(), "client");
        assert_eq!(
            tag_of(&t, "10.0.0.1:80", Some("spiffe://x/y")).unwrap(),
            "narrow-ports"
        );
        assert_eq!(tag_of(&t, "10.9.0.1:80", Some(CLIENT)).unwrap(), "longer");
    }

    #[test]
    fn exact_beats_prefix_and_suffix_beat_contains() {
        let mut t = RulesTable::default();
        for (tag, p) in [
            ("contains", "contains:/ns/default/"),
            ("suffix", "suffix:/sa/client"),
            ("exact", "exact:spiffe://cluster.local/ns/default/sa/client"),
            ("prefix", "prefix:spiffe://cluster.local/"),
        ] {
            t.add(with_principal(any_v4(RuleAction::Allow, tag), p))
                .unwrap();
        }
        t.add(any_v4(RuleAction::Deny, "anyone")).unwrap();
        let probe = |id: &str| tag_of(&t, "10.0.0.1:1", Some(id)).unwrap();
        assert_eq!(probe(CLIENT), "exact");
        // Prefix and suffix are equally narrow: the one added first wins.
        assert_eq!(
            probe("spiffe://cluster.local/ns/default/sa/client2"),
            "prefix"
        );
        assert_eq!(probe("spiffe://other/ns/x/sa/client"), "suffix");
        assert_eq!(probe("spiffe://other/ns/default/sa/x"), "contains");
        assert_eq!(probe("spiffe://other/ns/x/sa/x"), "anyone");
        assert_eq!(
            tags(&t),
            ["exact", "suffix", "prefix", "contains", "anyone"]
        );
    }

    #[test]
    fn a_principal_never_matches_without_an_identity() {
        let mut t = RulesTable::default();
        t.add(with_principal(
            any_v4(RuleAction::Deny, "deny-client"),
            &format!("prefix:{CLIENT}"),
        ))
        .unwrap();
        assert_eq!(
            tag_of(&t, "10.0.0.1:1", None),
            None,
            "no identity: no match"
        );
        assert_eq!(tag_of(&t, "10.0.0.1:1", Some("spiffe://other/sa/x")), None);
        assert_eq!(
            tag_of(&t, "10.0.0.1:1", Some(CLIENT)).as_deref(),
            Some("deny-client")
        );
        // Rules without a principal match with and without an identity.
        t.add(any_v4(RuleAction::Allow, "all")).unwrap();
        assert_eq!(tag_of(&t, "10.0.0.1:1", None).as_deref(), Some("all"));
        assert_eq!(
            tag_of(&t, "10.0.0.1:1", Some("spiffe://other/sa/x")).as_deref(),
            Some("all")
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
            t.lookup(sa("[::]:0"), sa("[::1]:1"), None).unwrap().action,
            RuleAction::Allow
        );
        t.remove("x").unwrap();
        assert!(t.is_empty());
        assert_eq!(t.remove("x").unwrap_err(), RuleError::NoSuchTag("x".into()));
    }

    #[test]
    fn a_tag_of_another_source_is_refused_not_taken_over() {
        let mut t = RulesTable::default();
        t.add(sourced(any_v4(RuleAction::Deny, "x"), "xds/a"))
            .unwrap();
        let by_hand = t.add(any_v4(RuleAction::Allow, "x")).unwrap_err();
        assert_eq!(
            by_hand,
            RuleError::TagTaken {
                tag: "x".into(),
                owner: "xds/a".into()
            }
        );
        assert!(by_hand.to_string().contains("source `xds/a`"), "{by_hand}");
        let other = t
            .add(sourced(any_v4(RuleAction::Allow, "x"), "xds/b"))
            .unwrap_err();
        assert!(matches!(other, RuleError::TagTaken { .. }));
        assert_eq!(t.get("x").unwrap().action, RuleAction::Deny, "untouched");
        // The owner itself replaces it as ever.
        assert!(
            t.add(sourced(any_v4(RuleAction::Allow, "x"), "xds/a"))
                .unwrap()
        );
        // And a source cannot take a hand-written tag either.
        t.add(any_v4(RuleAction::Allow, "manual")).unwrap();
        let err = t
            .add(sourced(any_v4(RuleAction::Deny, "manual"), "xds/a"))
            .unwrap_err();
        assert!(err.to_string().contains("written by hand"), "{err}");
    }

    #[test]
    fn replacing_a_source_swaps_only_its_rules() {
        let mut t = RulesTable::default();
        t.add(any_v4(RuleAction::Allow, "manual")).unwrap();
        t.add(sourced(any_v4(RuleAction::Allow, "other"), "xds/b"))
            .unwrap();
        let old: Vec<Rule> = (0..3)
            .map(|i| sourced(any_v4(RuleAction::Deny, &format!("old-{i}")), "xds/a"))
            .collect();
        assert_eq!(t.replace_source("xds/a", old).unwrap(), 0);
        assert_eq!(t.count_source("xds/a"), 3);
        let mut new = sourced(
            rule("10.0.0.0/8", PortRange::ANY, RuleAction::Deny, "new"),
            "xds/a",
        );
        new.priority = 2;
        assert_eq!(t.replace_source("xds/a", vec![new]).unwrap(), 3);
        assert_eq!(tags(&t), ["new", "manual", "other"]);
        assert_eq!(tag_of(&t, "10.0.0.1:1", None).as_deref(), Some("new"));
        // An empty set removes the source's rules.
        assert_eq!(t.replace_source("xds/a", Vec::new()).unwrap(), 1);
        assert_eq!(tags(&t), ["manual", "other"]);
    }

    #[test]
    fn a_refused_replacement_changes_nothing() {
        let mut t = RulesTable::default();
        t.add(any_v4(RuleAction::Allow, "manual")).unwrap();
        t.replace_source(
            "xds/a",
            vec![sourced(any_v4(RuleAction::Deny, "kept"), "xds/a")],
        )
        .unwrap();
        let before = tags(&t);
        let ok = |tag: &str| sourced(any_v4(RuleAction::Deny, tag), "xds/a");
        let mut invalid = ok("bad");
        invalid.local = parse_prefix("::/0").unwrap();
        let cases: Vec<(Vec<Rule>, RuleError)> = vec![
            (vec![ok("a"), ok("a")], RuleError::DuplicateTag("a".into())),
            (
                vec![ok("a"), ok("manual")],
                RuleError::TagTaken {
                    tag: "manual".into(),
                    owner: String::new(),
                },
            ),
            (
                vec![ok("a"), sourced(any_v4(RuleAction::Deny, "b"), "xds/b")],
                RuleError::WrongSource {
                    tag: "b".into(),
                    expected: "xds/a".into(),
                    found: "xds/b".into(),
                },
            ),
            (vec![ok("a"), invalid], RuleError::MixedFamilies),
        ];
        for (rules, expected) in cases {
            assert_eq!(t.replace_source("xds/a", rules).unwrap_err(), expected);
            assert_eq!(tags(&t), before);
        }
        assert_eq!(
            t.replace_source("", Vec::new()).unwrap_err(),
            RuleError::NoSource
        );
        assert_eq!(
            t.replace_source(&"s".repeat(MAX_SOURCE_LEN + 1), Vec::new())
                .unwrap_err(),
            RuleError::BadSource
        );
        assert_eq!(tags(&t), before);
    }

    #[test]
    fn invalid_rules_are_refused() {
        let mut t = RulesTable::default();
        let mut r = rule("10.0.0.0/8", PortRange::ANY, RuleAction::Allow, "");
        assert_eq!(t.add(r.clone()).unwrap_err(), RuleError::BadTag);
        r.tag = "t".repeat(MAX_TAG_LEN + 1);
        assert_eq!(t.add(r.clone()).unwrap_err(), RuleError::BadTag);
        r.tag = "t".repeat(MAX_TAG_LEN);
        t.add(r.clone()).unwrap();
        r.tag = "t".into();
        r.local = parse_prefix("::/0").unwrap();
        assert_eq!(t.add(r.clone()).unwrap_err(), RuleError::MixedFamilies);
        r.local = parse_prefix("0.0.0.0/0").unwrap();
        r.action = RuleAction::Redirect(sa("[::1]:80"));
        assert!(matches!(
            t.add(r.clone()).unwrap_err(),
            RuleError::RedirectFamily(_)
        ));
        r.action = RuleAction::Allow;
        r.principal = Some(IdentityMatch::Prefix(String::new()));
        assert_eq!(
            t.add(r.clone()).unwrap_err(),
            RuleError::Principal(IdentityMatchError::Empty)
        );
        r.principal = None;
        r.source = "xds\n".into();
        assert_eq!(t.add(r).unwrap_err(), RuleError::BadSource);
        assert!(PortRange::new(5, 4).is_err());
    }

    #[test]
    fn display_shows_what_differs_from_the_defaults() {
        let plain = any_v4(RuleAction::Deny, "d");
        assert_eq!(plain.to_string(), "d 0.0.0.0/0:* -> 0.0.0.0/0:* deny");
        let mut full = sourced(with_principal(plain, &format!("exact:{CLIENT}")), "xds/a");
        full.priority = 7;
        assert_eq!(
            full.to_string(),
            format!(
                "d 0.0.0.0/0:* -> 0.0.0.0/0:* deny principal exact:{CLIENT} priority 7 source xds/a"
            )
        );
    }

    proptest! {
        /// The table's answer equals a brute-force search for the first rule in lookup order,
        /// with priorities, principals and identities in the mix, whether the rules were added
        /// one by one or replaced as a source's set.
        #[test]
        fn lookup_matches_brute_force(
            specs in proptest::collection::vec(
                (0u8..=32, any::<u32>(), any::<u16>(), 0u16..2000, 0u8..3, 0u32..3, 0u8..5),
                1..20,
            ),
            probes in proptest::collection::vec((any::<u32>(), any::<u16>(), 0u8..4), 1..50),
            replace in any::<bool>(),
        ) {
            let ids = [
                "spiffe://a/ns/x/sa/y",
                "spiffe://a/ns/x/sa/z",
                "spiffe://b/ns/q/sa/y",
            ];
            let principals = [
                None,
                Some("exact:spiffe://a/ns/x/sa/y"),
                Some("prefix:spiffe://a/"),
                Some("suffix:/sa/y"),
                Some("contains:/ns/q/"),
            ];
            let mut all = Vec::new();
            for (i, (len, addr, first, span, act, priority, principal)) in specs.into_iter().enumerate() {
                let net = ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(addr), len).unwrap().trunc();
                let action = match act { 0 => RuleAction::Allow, 1 => RuleAction::Deny, _ => RuleAction::Redirect(sa("127.0.0.1:1")) };
                let mut r = Rule::new(
                    parse_prefix("0.0.0.0/0").unwrap(),
                    PortRange::ANY,
                    IpNet::V4(net),
                    PortRange::new(first, first.saturating_add(span)).unwrap(),
                    action,
                    &format!("r{i}"),
                );
                r.priority = priority;
                r.principal = principals[usize::from(principal)].map(|p| p.parse().unwrap());
                if replace {
                    r.source = "xds/p".into();
                }
                all.push(r);
            }
            let mut t = RulesTable::default();
            if replace {
                t.replace_source("xds/p", all.clone()).unwrap();
            } else {
                for r in &all {
                    t.add(r.clone()).unwrap();
                }
            }
            for (addr, port, id) in probes {
                let remote = SocketAddr::new(std::net::Ipv4Addr::from(addr).into(), port);
                let local = sa("0.0.0.0:0");
                let peer = ids.get(usize::from(id)).copied();
                let best = all.iter().filter(|r| r.matches(local, remote, peer)).max_by(|a, b| a.specificity().cmp(&b.specificity()));
                let got = t.lookup(local, remote, peer);
                prop_assert_eq!(got.map(|r| r.specificity().cmp(&best.unwrap().specificity())), best.map(|_| Ordering::Equal));
            }
        }
    }
}
