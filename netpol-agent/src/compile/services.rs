//! Pod egress to Service addresses.
//!
//! `from_pod` checks a pod's egress at the host side of its interface, before kube-proxy's DNAT
//! in the host namespace, so a packet to a ClusterIP (or an external IP, a load-balancer IP, or
//! this node's address at a node port) still carries that address, while every policy is
//! written for the backend pods. The rule: such a destination `(address, protocol, port)` is
//! allowed for a pod iff the pod's complete egress verdict — every tier, exactly as the kernel
//! decides it — allows every backend kube-proxy may pick (backend pod address and resolved
//! target port, from the EndpointSlices: [`crate::model::Service::backends`]). No label
//! selector is consulted.
//!
//! The verdicts are written into the pod's egress **Admin-tier** set: one `/128` entry per
//! Service address whose port set holds one full-length entry per Service port, action allow or
//! deny, rule id of [`RuleOrigin::Service`]. The Admin tier is evaluated first and an allow or
//! deny there is final, so the Service decision stands whatever the lower tiers say about the
//! Service address itself; the backend verdicts already include every tier. A Service address
//! that some Admin-tier prefix already covers keeps that prefix's entries for every other
//! protocol and port (an LPM trie returns only the longest match, so the `/128` entry must carry
//! them). Endpoints whose egress no tier polices get nothing: they are allowed everywhere.
//!
//! Cost: one evaluation per (distinct egress set combination, destination, backend); pods with
//! the same egress sets share the result.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use netpol_common::policy::{
    decide, Decision, TierLookup, ACTION_ALLOW, ACTION_DENY, PORT_ANY_PROTO_BITS, PORT_FULL_BITS,
};

use super::peers::{PeerSet, Prefix};
use super::ports::{PortKey, PortRule, PortSet};
use super::rule_ids::RuleOrigin;
use crate::model::{key_of, mask, ClusterState, EndpointSlice, ServiceRef};

/// One Service destination: the address and port a pod connects to, and the backends
/// kube-proxy translates it to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// The Service address (128-bit map key).
    pub addr: u128,
    /// IP protocol number.
    pub proto: u8,
    /// Destination port (the Service port, or the node port on a node address).
    pub port: u16,
    /// Rule id of the Service port ([`RuleOrigin::Service`]).
    pub rule_id: u32,
    /// Backend (address key, port) pairs.
    pub backends: Vec<(u128, u16)>,
}

/// Every Service destination of `state` for a node with addresses `node_addrs`, sorted by
/// (address, protocol, port). Two Services claiming the same destination (the API does not
/// prevent duplicate external IPs) are merged: both sets of backends must be allowed.
pub fn destinations(
    state: &ClusterState,
    node_addrs: &[IpAddr],
    ids: &BTreeMap<RuleOrigin, u32>,
) -> Vec<Destination> {
    let mut slices: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in state.endpoint_slices.values() {
        if let Some(svc) = &s.service {
            slices.entry((s.namespace.as_str(), svc.as_str())).or_default().push(s);
        }
    }
    // (address, protocol, port) → (rule id, backends)
    type Backends = (u32, BTreeSet<(u128, u16)>);
    let mut out: BTreeMap<(u128, u8, u16), Backends> = BTreeMap::new();
    for (key, svc) in &state.services {
        let svc_slices = slices.get(&(key.namespace.as_str(), key.name.as_str()));
        let svc_slices = svc_slices.map(Vec::as_slice).unwrap_or_default();
        for p in &svc.ports {
            let origin = origin(key, p.protocol, p.port);
            let Some(&rule_id) = ids.get(&origin) else { continue };
            let mut targets: Vec<(IpAddr, u16)> =
                svc.virtual_ips().map(|ip| (ip, p.port)).collect();
            if let Some(np) = p.node_port {
                targets.extend(node_addrs.iter().map(|ip| (*ip, np)));
            }
            for (ip, port) in targets {
                let v6 = ip.to_canonical().is_ipv6();
                let backends = svc.backends(svc_slices.iter().copied(), p, v6);
                let entry = out
                    .entry((key_of(ip), p.protocol.number(), port))
                    .or_insert_with(|| (rule_id, BTreeSet::new()));
                entry.1.extend(backends.into_iter().map(|(a, port)| (key_of(a), port)));
            }
        }
    }
    out.into_iter()
        .map(|((addr, proto, port), (rule_id, backends))| Destination {
            addr,
            proto,
            port,
            rule_id,
            backends: backends.into_iter().collect(),
        })
        .collect()
}

fn origin(service: &ServiceRef, protocol: crate::model::Protocol, port: u16) -> RuleOrigin {
    RuleOrigin::Service { service: service.clone(), protocol, port }
}

/// One tier's set, prepared for repeated lookups.
struct Prepared<'a> {
    set: &'a PeerSet,
    /// The prefix lengths present, longest first: a lookup probes only these.
    lengths: Vec<u32>,
}

impl<'a> Prepared<'a> {
    fn new(set: &'a PeerSet) -> Self {
        let lengths: BTreeSet<u32> = set.entries.keys().map(|(_, bits)| *bits).collect();
        Prepared { set, lengths: lengths.into_iter().rev().collect() }
    }

    /// The longest prefix of the set containing `addr`, with its port-set hash.
    fn longest(&self, addr: u128) -> Option<(Prefix, u64)> {
        self.lengths.iter().find_map(|&bits| {
            let k = (mask(addr, bits), bits);
            self.set.entries.get(&k).map(|ps| (k, *ps))
        })
    }
}

/// A pod's egress sets (Admin, NetworkPolicy, Baseline) as the policy tiers compiled them, and
/// the port sets they reference; evaluates a connection the way the kernel does.
pub struct EgressSets<'a> {
    tiers: [Option<Prepared<'a>>; 3],
    port_sets: &'a dyn Fn(u64) -> Option<&'a PortSet>,
}

impl<'a> EgressSets<'a> {
    /// `tiers` in evaluation order; `port_sets` resolves a port-set hash.
    pub fn new(
        tiers: [Option<&'a PeerSet>; 3],
        port_sets: &'a dyn Fn(u64) -> Option<&'a PortSet>,
    ) -> Self {
        EgressSets { tiers: tiers.map(|t| t.map(Prepared::new)), port_sets }
    }

    fn lookup(&self, tier: usize, addr: u128, proto: u8, port: u16) -> TierLookup {
        let Some(set) = &self.tiers[tier] else { return TierLookup::NoSet };
        let Some((_, ps)) = set.longest(addr) else { return TierLookup::Miss };
        let Some(ports) = (self.port_sets)(ps) else { return TierLookup::Miss };
        let hit = (PORT_ANY_PROTO_BITS..=PORT_FULL_BITS)
            .rev()
            .find_map(|bits| ports.entries.get(&PortKey::new(bits, proto, port)));
        match hit {
            Some(r) => TierLookup::Hit(netpol_common::policy::PortValue {
                rule_id: r.rule_id,
                action: r.action,
                _pad: [0; 3],
            }),
            None => TierLookup::Miss,
        }
    }

    /// The kernel's decision for a new egress connection to `addr` (map key), `proto`, `port`.
    pub fn decide(&self, addr: u128, proto: u8, port: u16) -> Decision {
        decide(
            self.lookup(0, addr, proto, port),
            self.lookup(1, addr, proto, port),
            self.lookup(2, addr, proto, port),
        )
    }
}

/// The egress Admin-tier set of a pod with egress sets `sets` (`sets.tiers[0]` being its
/// Admin-tier set from policy, if any): that set plus one entry per Service address, with the
/// port sets it needs added to `port_sets`. `None` when there is nothing to add and no base
/// set.
pub fn admin_set(
    sets: &EgressSets,
    dests: &[Destination],
    port_sets: &mut BTreeMap<u64, PortSet>,
) -> Option<PeerSet> {
    let base = sets.tiers[0].as_ref();
    if dests.is_empty() {
        return base.map(|b| b.set.clone());
    }
    let mut set = base.map(|b| b.set.clone()).unwrap_or_default();
    let mut by_addr: BTreeMap<u128, PortSet> = BTreeMap::new();
    for d in dests {
        let ports = by_addr.entry(d.addr).or_insert_with(|| {
            // What the Admin tier already says about this address, for other ports.
            base.and_then(|b| b.longest(d.addr))
                .and_then(|(_, ps)| (sets.port_sets)(ps))
                .cloned()
                .unwrap_or_default()
        });
        let allowed = d.backends.iter().all(|&(a, p)| sets.decide(a, d.proto, p).allow);
        let action = if allowed { ACTION_ALLOW } else { ACTION_DENY };
        ports.entries.insert(
            PortKey::new(PORT_FULL_BITS, d.proto, d.port),
            PortRule { rule_id: d.rule_id, action },
        );
    }
    for (addr, ports) in by_addr {
        let hash = ports.content_hash();
        port_sets.entry(hash).or_insert(ports);
        set.entries.insert((addr, 128), hash);
    }
    Some(set)
}
