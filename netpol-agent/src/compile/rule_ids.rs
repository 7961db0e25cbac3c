//! Rule ids: the u32 every allow entry carries, mapping back to the rule that allowed it
//! (counters, deny/allow events, `explain`).
//!
//! An id is a stable hash of the rule's origin, so it survives recompiles and agent restarts
//! while the policy is unchanged. Collisions are resolved by probing in origin order, which is
//! deterministic for a given set of policies.

use std::collections::{BTreeMap, HashSet};

use netpol_common::policy::RULE_NONE;

use crate::model::{ClusterState, Direction, PolicyRef, Protocol, ServiceRef, Tier};

/// Reserved id of the implicit "node to local pods" ingress rule.
pub const HOST_RULE_ID: u32 = 1;

/// Where an allow entry comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleOrigin {
    /// Rule `index` of the `direction` rules of `policy` in `tier`.
    Policy {
        /// Tier: NetworkPolicy, or Admin/Baseline for cluster policies (whose reference carries
        /// the kind in its namespace part, [`crate::model::ClusterPolicy::key`]).
        tier: Tier,
        /// The policy.
        policy: PolicyRef,
        /// `ingress` or `egress` list.
        direction: Direction,
        /// Index in that list.
        index: u32,
    },
    /// Traffic from the node's own addresses to its pods ([`HOST_RULE_ID`]).
    NodeToPod,
    /// Egress to the addresses of `service` on its port `protocol`/`port` (and its node port),
    /// decided from the Service's backends (`compile::services`): allowed when the pod's
    /// egress allows every backend, denied otherwise.
    Service {
        /// The Service.
        service: ServiceRef,
        /// The Service port's protocol.
        protocol: Protocol,
        /// The Service port (`spec.ports[].port`).
        port: u16,
    },
}

fn hash(origin: &RuleOrigin, attempt: u64) -> u32 {
    let mut buf = Vec::new();
    let name = |buf: &mut Vec<u8>, r: &crate::model::ObjectRef| {
        for s in [&r.namespace, &r.name] {
            buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
            buf.extend_from_slice(s.as_bytes());
        }
    };
    match origin {
        RuleOrigin::Policy { tier, policy, direction, index } => {
            buf.push(*tier as u8);
            name(&mut buf, policy);
            buf.push(direction.as_u8());
            buf.extend_from_slice(&index.to_le_bytes());
        }
        RuleOrigin::Service { service, protocol, port } => {
            // A tag no tier uses, so a Service never hashes like a policy rule.
            buf.push(0xff);
            name(&mut buf, service);
            buf.push(protocol.number());
            buf.extend_from_slice(&port.to_le_bytes());
        }
        RuleOrigin::NodeToPod => {}
    }
    xxhash_rust::xxh3::xxh3_64_with_seed(&buf, attempt) as u32
}

/// Assigns ids to every rule of every policy in `state`, then to every Service port, plus
/// [`HOST_RULE_ID`]. Policies go first, so Services never move a policy rule's id.
pub fn assign(state: &ClusterState) -> (BTreeMap<RuleOrigin, u32>, BTreeMap<u32, RuleOrigin>) {
    let mut by_origin = BTreeMap::new();
    let mut by_id = BTreeMap::new();
    let mut taken: HashSet<u32> = HashSet::from([RULE_NONE, HOST_RULE_ID]);
    by_origin.insert(RuleOrigin::NodeToPod, HOST_RULE_ID);
    by_id.insert(HOST_RULE_ID, RuleOrigin::NodeToPod);
    // The origin's hash, rehashed with the next seed until it is free. An origin seen before
    // keeps its id (the API forbids duplicate Service ports; they are tolerated).
    let mut add = |origin: RuleOrigin| {
        if by_origin.contains_key(&origin) {
            return;
        }
        let mut attempt = 0;
        let mut id = hash(&origin, attempt);
        while !taken.insert(id) {
            attempt += 1;
            id = hash(&origin, attempt);
        }
        by_id.insert(id, origin.clone());
        by_origin.insert(origin, id);
    };
    let np = state.policies.iter().map(|(k, p)| {
        (
            Tier::NetworkPolicy,
            k,
            [p.rules(Direction::Ingress).len(), p.rules(Direction::Egress).len()],
        )
    });
    let cluster = state.cluster_policies.iter().map(|(k, p)| {
        (p.tier, k, [p.rules(Direction::Ingress).len(), p.rules(Direction::Egress).len()])
    });
    for (tier, key, counts) in np.chain(cluster) {
        for direction in Direction::ALL {
            for index in 0..counts[direction as usize] {
                let origin = RuleOrigin::Policy {
                    tier,
                    policy: key.clone(),
                    direction,
                    index: index as u32,
                };
                add(origin);
            }
        }
    }
    for (key, service) in &state.services {
        for p in &service.ports {
            let origin =
                RuleOrigin::Service { service: key.clone(), protocol: p.protocol, port: p.port };
            add(origin);
        }
    }
    (by_origin, by_id)
}
