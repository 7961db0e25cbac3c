//! The policy compiler: a pure, deterministic function from cluster state to the desired
//! contents of the policy maps of one node (no I/O).
//!
//! Output is content-addressed: a [`PeerSet`] (stage 1) and the [`PortSet`]s (stage 2) it points
//! at are identified by a 64-bit hash of their content, so pods with identical rules share one
//! set. [`crate::layout`] interns these hashes to the kernel's u32 ids.
//!
//! [`compile`] compiles from scratch; [`Compiler`] keeps indexes and per-policy results and
//! recompiles only what a [`Change`] affects. Both produce the same [`Compiled`].

mod compiler;
mod endpoint;
mod index;
mod peers;
mod ports;
mod rule_ids;
mod services;
#[cfg(test)]
mod services_tests;
mod tiers;

use std::collections::BTreeMap;
use std::net::IpAddr;

pub use compiler::{Change, Compiler};
pub use peers::{PeerSet, Prefix};
pub use ports::{PortKey, PortRule, PortSet};
pub use rule_ids::{RuleOrigin, HOST_RULE_ID};

use crate::model::{ClusterState, Direction, PodRef, Tier};

/// Per-node inputs of the compiler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileOptions {
    /// Only pods with this `spec.nodeName` get endpoints; all others are peers by address.
    pub node_name: String,
    /// The node's own addresses.
    pub node_addrs: Vec<IpAddr>,
    /// Allow traffic from `node_addrs` to isolated local pods (default `true`).
    pub allow_host_to_pods: bool,
}

impl CompileOptions {
    /// Options for `node_name` with no node addresses and the default host-to-pod allow.
    pub fn new(node_name: impl Into<String>) -> Self {
        CompileOptions {
            node_name: node_name.into(),
            node_addrs: Vec::new(),
            allow_host_to_pods: true,
        }
    }
}

/// A local pod's compiled endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledEndpoint {
    /// The pod's addresses (the dataplane maps them to its interface).
    pub ips: Vec<IpAddr>,
    /// Peer-set hash per direction and tier; a missing entry means `SET_NONE`
    /// (for the NetworkPolicy tier: not isolated, everything allowed).
    pub sets: BTreeMap<(Direction, Tier), u64>,
    /// Audit mode (`EP_FLAG_AUDIT`): the pod's namespace has [`crate::model::Namespace::audit`]
    /// or a policy with [`crate::model::NetworkPolicy::audit`] selects it. The flag is per
    /// endpoint: every would-be policy drop of the pod passes and is reported as `audit`,
    /// whichever policy would have caused it.
    pub audit: bool,
}

/// The compiler's output: everything one node's policy maps must contain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Local pods (in scope: not host-network, with an address) by `namespace/name`.
    pub endpoints: BTreeMap<PodRef, CompiledEndpoint>,
    /// Every peer set some endpoint references, by content hash.
    pub peer_sets: BTreeMap<u64, PeerSet>,
    /// Every port set some peer set references, by content hash.
    pub port_sets: BTreeMap<u64, PortSet>,
    /// Rule id → origin, for every rule of every policy (and the node-to-pod rule).
    pub rules: BTreeMap<u32, RuleOrigin>,
}

/// Compiles `state` for the node in `options` from scratch.
pub fn compile(state: &ClusterState, options: &CompileOptions) -> Compiled {
    Compiler::new(state.clone(), options.clone()).into_compiled()
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tier_tests;
