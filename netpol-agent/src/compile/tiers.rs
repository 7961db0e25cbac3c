//! The Admin and Baseline tiers: the cluster policies (ClusterNetworkPolicy, AdminNetworkPolicy,
//! BaselineAdminNetworkPolicy) whose subject selects a local pod, compiled into one peer set per
//! direction and tier.
//!
//! Priorities are resolved here, not in the kernel: all rules of a tier are ranked (lower
//! `priority` first, then policy reference, then rule order), and every stage-2 entry carries the
//! action of the best-ranked rule that matches *everything that entry's lookup can hit*. An LPM
//! lookup returns only the longest prefix, so:
//! - stage 1: the port set at an address prefix holds the entries of every rule whose peers
//!   contain that prefix ([`peers::build_with`] unions them);
//! - stage 2: the entry at a port prefix gets the best rank among all entries whose (shorter or
//!   equal) prefix contains it — "Deny every port" at priority 1 must shadow "Accept TCP/80" at
//!   priority 5 although TCP/80 is the longer match.
//!
//! A set exists for a tier and direction iff some policy of that tier selects the pod and has
//! rules in that direction ("CNPs with no ingress rules do not affect ingress traffic"); a lookup
//! that matches no rule is a miss and the next tier decides.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use netpol_common::policy::PORT_FULL_BITS;

use super::endpoint::{block_prefixes, Built, SetResult};
use super::index::{ns_labels, Index};
use super::peers::{self, Item};
use super::ports::{numeric_entries, PortKey, PortRule, PortSet};
use super::rule_ids::RuleOrigin;
use crate::model::{
    ClusterPeer, ClusterPolicy, ClusterPort, ClusterState, ContainerPort, Direction,
    NamespacedPods, Pod, PolicyPort, PolicyRef, Tier,
};

/// The two cluster tiers.
pub const TIERS: [Tier; 2] = [Tier::Admin, Tier::Baseline];

/// Tier sets depend on the selecting policies and, for ingress named ports, the pod's own
/// container ports.
pub type TierMemo = HashMap<(Direction, Tier, Vec<PolicyRef>, Option<Vec<ContainerPort>>), u64>;

/// Addresses of the pods of a [`NamespacedPods`], shared within one compile step.
pub type PodsMemo = HashMap<NamespacedPods, Arc<Vec<u128>>>;

/// A stage-2 entry before resolution: its rank (lower wins) and value.
#[derive(Clone, Copy, Debug)]
struct Ranked {
    rank: u32,
    rule: PortRule,
}

/// Whether `policy`'s subject selects `pod`. "Note that host-networked pods are not included in
/// subject selection."
pub fn subject_selects(state: &ClusterState, policy: &ClusterPolicy, pod: &Pod) -> bool {
    pod.in_scope() && policy.subject.matches(&ns_labels(state, &pod.namespace), &pod.labels)
}

/// Whether a pods peer of `policy` (any direction) contains `pod`.
pub fn peers_match_pod(state: &ClusterState, policy: &ClusterPolicy, pod: &Pod) -> bool {
    pod.in_scope()
        && Direction::ALL.iter().flat_map(|d| policy.rules(*d)).flat_map(|r| &r.peers).any(|p| {
            matches!(p, ClusterPeer::Pods(np)
                if np.matches(&ns_labels(state, &pod.namespace), &pod.labels))
        })
}

/// Whether a namespace selector of `policy` (subject or peers) matches `labels`.
pub fn ns_selectors_match(policy: &ClusterPolicy, labels: &crate::model::Labels) -> bool {
    policy.subject.namespace_selector.matches(labels)
        || Direction::ALL
            .iter()
            .flat_map(|d| policy.rules(*d))
            .flat_map(|r| &r.peers)
            .any(|p| matches!(p, ClusterPeer::Pods(np) if np.namespace_selector.matches(labels)))
}

fn pods_ips(
    state: &ClusterState,
    index: &Index,
    np: &NamespacedPods,
    memo: &mut PodsMemo,
) -> Arc<Vec<u128>> {
    Arc::clone(memo.entry(np.clone()).or_insert_with(|| {
        Arc::new(index.peer_ips(state, "", Some(&np.namespace_selector), Some(&np.pod_selector)))
    }))
}

/// Stage-2 entries of the numeric `ports` of a rule (every protocol and port if `ports` is
/// empty).
fn numeric(ports: &[ClusterPort], rule: PortRule, rank: u32, out: &mut Vec<(PortKey, Ranked)>) {
    let nums: Vec<PolicyPort> = ports
        .iter()
        .filter_map(|p| match p {
            ClusterPort::Numeric(n) => Some(n.clone()),
            ClusterPort::Named(_) => None,
        })
        .collect();
    if nums.is_empty() && !ports.is_empty() {
        return; // named ports only
    }
    let mut e = Vec::new();
    numeric_entries(&nums, rule.rule_id, &mut e);
    out.extend(e.into_iter().map(|(k, _)| (k, Ranked { rank, rule })));
}

/// Stage-2 entries of the named `ports` of a rule, resolved against one pod's container ports
/// (a name selects the container port of that name, with its protocol).
fn named(
    ports: &[ClusterPort],
    container_ports: &[ContainerPort],
    rule: PortRule,
    rank: u32,
    out: &mut Vec<(PortKey, Ranked)>,
) {
    for p in ports {
        let ClusterPort::Named(name) = p else { continue };
        for cp in container_ports.iter().filter(|cp| cp.name.as_deref() == Some(name.as_str())) {
            let k = PortKey::new(PORT_FULL_BITS, cp.protocol.number(), cp.port);
            out.push((k, Ranked { rank, rule }));
        }
    }
}

/// Priority resolution of one port set: each entry's key gets the best-ranked entry among all
/// entries whose prefix contains that key.
fn resolve(found: &[(PortKey, Ranked)]) -> PortSet {
    let keys: BTreeSet<PortKey> = found.iter().map(|(k, _)| *k).collect();
    let mut set = PortSet::default();
    for key in keys {
        let best = found
            .iter()
            .filter(|(k, _)| k.bits <= key.bits && k.matches(key.proto, key.port))
            .min_by_key(|(_, r)| (r.rank, r.rule.rule_id));
        if let Some((_, r)) = best {
            set.entries.insert(key, r.rule);
        }
    }
    set
}

/// Inputs of the tier compile.
pub struct TierCtx<'a> {
    /// Cluster state.
    pub state: &'a ClusterState,
    /// Its indexes.
    pub index: &'a Index,
    /// Rule ids.
    pub ids: &'a BTreeMap<RuleOrigin, u32>,
}

/// Compiles the Admin and Baseline sets of a local pod.
pub fn compile_pod(
    ctx: &TierCtx,
    pod: &Pod,
    memo: &mut TierMemo,
    pods_memo: &mut PodsMemo,
) -> BTreeMap<(Direction, Tier), SetResult> {
    let mut out = BTreeMap::new();
    let mut selecting: Vec<&ClusterPolicy> = ctx
        .state
        .cluster_policies
        .values()
        .filter(|p| subject_selects(ctx.state, p, pod))
        .collect();
    selecting.sort_by_key(|p| (p.priority, p.key()));
    for tier in TIERS {
        for dir in Direction::ALL {
            let pols: Vec<&ClusterPolicy> = selecting
                .iter()
                .copied()
                .filter(|p| p.tier == tier && !p.rules(dir).is_empty())
                .collect();
            if pols.is_empty() {
                continue;
            }
            let own_named = dir == Direction::Ingress
                && pols
                    .iter()
                    .flat_map(|p| p.rules(dir))
                    .flat_map(|r| &r.ports)
                    .any(|p| matches!(p, ClusterPort::Named(_)));
            let memo_key = (
                dir,
                tier,
                pols.iter().map(|p| p.key()).collect::<Vec<_>>(),
                own_named.then(|| pod.container_ports.clone()),
            );
            if let Some(&hash) = memo.get(&memo_key) {
                out.insert((dir, tier), SetResult::Known(hash));
                continue;
            }
            let built = build_set(ctx, dir, &pols, &pod.container_ports, pods_memo);
            let hash = built.set.content_hash();
            memo.insert(memo_key, hash);
            out.insert((dir, tier), SetResult::New(hash, Box::new(built)));
        }
    }
    out
}

fn build_set(
    ctx: &TierCtx,
    dir: Direction,
    pols: &[&ClusterPolicy],
    own_ports: &[ContainerPort],
    pods_memo: &mut PodsMemo,
) -> Built {
    let mut items = Vec::new();
    let mut entries: Vec<Vec<(PortKey, Ranked)>> = Vec::new();
    let mut rank = 0u32;
    for policy in pols {
        let key = policy.key();
        for (index, rule) in policy.rules(dir).iter().enumerate() {
            let origin = RuleOrigin::Policy {
                tier: policy.tier,
                policy: key.clone(),
                direction: dir,
                index: index as u32,
            };
            let id = ctx.ids.get(&origin).copied().unwrap_or(netpol_common::policy::RULE_NONE);
            let value = PortRule { rule_id: id, action: rule.action.kernel() };
            rank += 1;
            let mut e = Vec::new();
            numeric(&rule.ports, value, rank, &mut e);
            // Ingress named ports name ports of the pod being protected.
            if dir == Direction::Ingress {
                named(&rule.ports, own_ports, value, rank, &mut e);
            }
            let idx = entries.len();
            entries.push(e);
            for peer in &rule.peers {
                match peer {
                    ClusterPeer::Networks(cidrs) => {
                        for c in cidrs {
                            let (range, holes) = block_prefixes(c, &[]);
                            items.push(Item { range, holes, entries: idx });
                        }
                    }
                    ClusterPeer::Pods(np) => {
                        let ips = pods_ips(ctx.state, ctx.index, np, pods_memo);
                        for &ip in ips.iter() {
                            items.push(Item { range: (ip, 128), holes: Vec::new(), entries: idx });
                            // Egress named ports name ports of each destination pod.
                            if dir == Direction::Egress {
                                let mut e = Vec::new();
                                let pod_ports = ctx.index.ports_at(ctx.state, ip);
                                named(&rule.ports, &pod_ports, value, rank, &mut e);
                                if !e.is_empty() {
                                    items.push(Item {
                                        range: (ip, 128),
                                        holes: Vec::new(),
                                        entries: entries.len(),
                                    });
                                    entries.push(e);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    let mut port_sets = BTreeMap::new();
    let set = peers::build_with(&items, &entries, &mut port_sets, resolve);
    Built { set, port_sets }
}
