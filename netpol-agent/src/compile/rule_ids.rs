//! Rule ids: the u32 every allow entry carries, mapping back to the rule that allowed it
//! (counters, deny/allow events, `explain`).
//!
//! An id is a stable hash of the rule's origin, so it survives recompiles and agent restarts
//! while the policy is unchanged. Collisions are resolved by probing in origin order, which is
//! deterministic for a given set of policies.

use std::collections::{BTreeMap, HashSet};

use netpol_common::policy::RULE_NONE;

use crate::model::{ClusterState, Direction, PolicyRef, Tier};

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
}

fn hash(origin: &RuleOrigin, attempt: u64) -> u32 {
    let mut buf = Vec::new();
    if let RuleOrigin::Policy { tier, policy, direction, index } = origin {
        buf.push(*tier as u8);
        for s in [&policy.namespace, &policy.name] {
            buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
            buf.extend_from_slice(s.as_bytes());
        }
        buf.push(direction.as_u8());
        buf.extend_from_slice(&index.to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_64_with_seed(&buf, attempt) as u32
}

/// Assigns ids to every rule of every policy in `state`, plus [`HOST_RULE_ID`].
pub fn assign(state: &ClusterState) -> (BTreeMap<RuleOrigin, u32>, BTreeMap<u32, RuleOrigin>) {
    let mut by_origin = BTreeMap::new();
    let mut by_id = BTreeMap::new();
    let mut taken: HashSet<u32> = HashSet::from([RULE_NONE, HOST_RULE_ID]);
    by_origin.insert(RuleOrigin::NodeToPod, HOST_RULE_ID);
    by_id.insert(HOST_RULE_ID, RuleOrigin::NodeToPod);
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
                let mut attempt = 0;
                let mut id = hash(&origin, attempt);
                while !taken.insert(id) {
                    attempt += 1;
                    id = hash(&origin, attempt);
                }
                by_id.insert(id, origin.clone());
                by_origin.insert(origin, id);
            }
        }
    }
    (by_origin, by_id)
}
