//! Stage-2 content: port sets, and turning a rule's `ports` into port-prefix entries.

use std::collections::BTreeMap;

use netpol_common::policy::{
    for_each_port_prefix, PORT_ANY_PORT_BITS, PORT_ANY_PROTO_BITS, PORT_FULL_BITS,
};

use crate::model::{ContainerPort, PolicyPort, PortRef};

/// One stage-2 prefix: `bits` (32 = any protocol, 40 = any port of `proto`, 40+k = the first
/// k bits of `port`) with the bits beyond the prefix cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    /// Prefix length as in the kernel's `PORTS` key (32..=56).
    pub bits: u32,
    /// IP protocol number (0 when `bits` is 32).
    pub proto: u8,
    /// Port (host order), masked to `bits - 40` bits.
    pub port: u16,
}

impl PortKey {
    /// Every protocol and port, ICMP included: a rule without `ports`.
    pub const ANY: PortKey = PortKey { bits: PORT_ANY_PROTO_BITS, proto: 0, port: 0 };

    /// Builds a canonical key (bits beyond the prefix cleared).
    pub fn new(bits: u32, proto: u8, port: u16) -> Self {
        let bits = bits.clamp(PORT_ANY_PROTO_BITS, PORT_FULL_BITS);
        let proto_bits = (bits - PORT_ANY_PROTO_BITS).min(8);
        let proto = if proto_bits == 0 { 0 } else { proto & (u8::MAX << (8 - proto_bits)) };
        let port_bits = bits.saturating_sub(PORT_ANY_PORT_BITS);
        let port = if port_bits == 0 { 0 } else { port & (u16::MAX << (16 - port_bits)) };
        PortKey { bits, proto, port }
    }

    /// Whether a full-length lookup for `(proto, port)` matches this prefix.
    pub fn matches(&self, proto: u8, port: u16) -> bool {
        *self == PortKey::new(self.bits, proto, port)
    }
}

/// The value of a stage-2 entry: the deciding rule and its action (`ACTION_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRule {
    /// Rule id ([`super::RuleOrigin`]).
    pub rule_id: u32,
    /// `ACTION_ALLOW`, `ACTION_DENY` or `ACTION_PASS`; always allow in the NetworkPolicy tier.
    pub action: u8,
}

impl PortRule {
    /// An allow entry of `rule_id`.
    pub const fn allow(rule_id: u32) -> Self {
        PortRule { rule_id, action: netpol_common::policy::ACTION_ALLOW }
    }
}

/// A port set: the stage-2 entries behind one peer entry, each naming the rule that decides it.
/// Content-addressed: identical sets are stored once. An empty set is meaningful (an address
/// that some rule lists but whose ports are all excepted away or unresolved: no rule matches).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortSet {
    /// Prefix → deciding rule.
    pub entries: BTreeMap<PortKey, PortRule>,
}

impl PortSet {
    /// Adds an allow entry `key` for `rule_id`, keeping the lowest rule id when several rules
    /// list the same prefix (deterministic attribution; NetworkPolicy rules only allow).
    pub fn insert(&mut self, key: PortKey, rule_id: u32) {
        self.entries
            .entry(key)
            .and_modify(|r| r.rule_id = r.rule_id.min(rule_id))
            .or_insert(PortRule::allow(rule_id));
    }

    /// Content hash (stable across runs and machines).
    pub fn content_hash(&self) -> u64 {
        let mut buf = Vec::with_capacity(self.entries.len() * 12);
        for (k, r) in &self.entries {
            buf.extend_from_slice(&k.bits.to_le_bytes());
            buf.push(k.proto);
            buf.extend_from_slice(&k.port.to_le_bytes());
            buf.extend_from_slice(&r.rule_id.to_le_bytes());
            buf.push(r.action);
        }
        xxhash_rust::xxh3::xxh3_64(&buf)
    }
}

/// Appends the entries of the numeric (and protocol-only) `ports` of a rule. "If this field is
/// empty or missing, this rule matches all ports" — and all protocols, ICMP included.
pub fn numeric_entries(ports: &[PolicyPort], rule_id: u32, out: &mut Vec<(PortKey, u32)>) {
    if ports.is_empty() {
        out.push((PortKey::ANY, rule_id));
        return;
    }
    for p in ports {
        let proto = p.protocol.number();
        match (&p.port, p.end_port) {
            (None, _) => out.push((PortKey::new(PORT_ANY_PORT_BITS, proto, 0), rule_id)),
            (Some(PortRef::Number(n)), None) => {
                out.push((PortKey::new(PORT_FULL_BITS, proto, *n), rule_id))
            }
            // "endPort indicates that the range of ports from port to endPort if set, inclusive".
            (Some(PortRef::Number(n)), Some(end)) => {
                for_each_port_prefix(*n, end, |start, bits| {
                    out.push((PortKey::new(PORT_ANY_PORT_BITS + bits, proto, start), rule_id))
                })
            }
            (Some(PortRef::Name(_)), _) => {}
        }
    }
}

/// Whether any of `ports` is a named port.
pub fn has_named(ports: &[PolicyPort]) -> bool {
    ports.iter().any(|p| matches!(p.port, Some(PortRef::Name(_))))
}

/// Appends the entries of the named `ports` of a rule, resolved against one pod's container
/// ports: a name matches a container port with that name and the same protocol. A name that
/// resolves to nothing adds nothing (it matches no traffic).
pub fn named_entries(
    ports: &[PolicyPort],
    container_ports: &[ContainerPort],
    rule_id: u32,
    out: &mut Vec<(PortKey, u32)>,
) {
    for p in ports {
        let Some(PortRef::Name(name)) = &p.port else {
            continue;
        };
        for cp in container_ports {
            if cp.name.as_deref() == Some(name.as_str()) && cp.protocol == p.protocol {
                out.push((PortKey::new(PORT_FULL_BITS, p.protocol.number(), cp.port), rule_id));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn port(protocol: Protocol, port: Option<PortRef>, end_port: Option<u16>) -> PolicyPort {
        PolicyPort { protocol, port, end_port }
    }

    fn covered(entries: &[(PortKey, u32)], proto: u8, p: u16) -> bool {
        entries.iter().any(|(k, _)| k.matches(proto, p))
    }

    #[test]
    fn numeric_forms() {
        let mut e = Vec::new();
        numeric_entries(&[], 7, &mut e);
        assert_eq!(e, [(PortKey::ANY, 7)]);
        assert!(covered(&e, 1, 0) && covered(&e, 6, 80) && covered(&e, 132, 9));

        let cases: [(PolicyPort, u8, u16, bool); 9] = [
            (port(Protocol::Tcp, Some(PortRef::Number(80)), None), 6, 80, true),
            (port(Protocol::Tcp, Some(PortRef::Number(80)), None), 17, 80, false),
            (port(Protocol::Tcp, Some(PortRef::Number(80)), None), 6, 81, false),
            (port(Protocol::Udp, None, None), 17, 53, true),
            (port(Protocol::Udp, None, None), 6, 53, false),
            (port(Protocol::Sctp, Some(PortRef::Number(1000)), Some(2000)), 132, 1500, true),
            (port(Protocol::Sctp, Some(PortRef::Number(1000)), Some(2000)), 132, 2001, false),
            (port(Protocol::Sctp, Some(PortRef::Number(1000)), Some(2000)), 132, 999, false),
            (port(Protocol::Tcp, Some(PortRef::Name("http".into())), None), 6, 80, false),
        ];
        for (p, proto, n, want) in cases {
            let mut e = Vec::new();
            numeric_entries(std::slice::from_ref(&p), 1, &mut e);
            assert_eq!(covered(&e, proto, n), want, "{p:?} {proto}/{n}");
            assert!(!covered(&e, 1, 0), "ICMP only with empty ports");
        }
    }

    #[test]
    fn named_resolution_needs_same_protocol() {
        let cps = [
            ContainerPort { name: Some("http".into()), port: 8080, protocol: Protocol::Tcp },
            ContainerPort { name: Some("dns".into()), port: 5353, protocol: Protocol::Udp },
        ];
        let mut e = Vec::new();
        named_entries(
            &[port(Protocol::Tcp, Some(PortRef::Name("http".into())), None)],
            &cps,
            3,
            &mut e,
        );
        assert!(covered(&e, 6, 8080) && !covered(&e, 6, 80));
        let mut e = Vec::new();
        named_entries(
            &[port(Protocol::Tcp, Some(PortRef::Name("dns".into())), None)],
            &cps,
            3,
            &mut e,
        );
        assert!(e.is_empty());
    }

    #[test]
    fn lowest_rule_wins_on_same_prefix() {
        let mut s = PortSet::default();
        s.insert(PortKey::ANY, 9);
        s.insert(PortKey::ANY, 4);
        s.insert(PortKey::ANY, 6);
        assert_eq!(s.entries[&PortKey::ANY], PortRule::allow(4));
    }
}
