//! Compiling one local pod: which policies isolate it per direction, and the peer set (stage 1)
//! and port sets (stage 2) that the union of their rules yields.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use super::index::{di, Index, PolicyInfo, ResolvedRule};
use super::peers::{self, Item, PeerSet};
use super::ports::{named_entries, numeric_entries, PortKey, PortSet};
use super::rule_ids::HOST_RULE_ID;
use super::CompileOptions;
use crate::model::{key_of, Cidr, ClusterState, ContainerPort, Direction, Pod, PolicyRef, Tier};

/// Inputs shared by every endpoint of one compile step.
pub struct Ctx<'a> {
    /// Cluster state.
    pub state: &'a ClusterState,
    /// Its indexes.
    pub index: &'a Index,
    /// Resolved policies.
    pub infos: &'a BTreeMap<PolicyRef, PolicyInfo>,
    /// Options.
    pub options: &'a CompileOptions,
}

/// Rule sets depend only on the selecting policies and, for ingress named ports, the pod's own
/// container ports: replicas of one deployment hit this cache and are compiled once.
pub type Memo = HashMap<(Direction, Vec<PolicyRef>, Option<Vec<ContainerPort>>), u64>;

/// A freshly built peer set with the port sets it references.
#[derive(Clone, Debug)]
pub struct Built {
    /// The set.
    pub set: PeerSet,
    /// Port sets by hash (at least those `set` references).
    pub port_sets: BTreeMap<u64, PortSet>,
}

/// Result of compiling one pod: per (direction, tier) either a memoized hash or a new set.
pub enum SetResult {
    /// Content identical to a set built earlier in this step.
    Known(u64),
    /// A newly built set.
    New(u64, Box<Built>),
}

/// Compiles the sets of a local pod. "A pod is isolated for ingress if there is any NetworkPolicy
/// that both selects the pod and has "Ingress" in its policyTypes" (likewise egress); a pod that
/// is not isolated in a direction gets no set (SET_NONE: allowed).
pub fn compile_pod(
    ctx: &Ctx,
    pod: &Pod,
    memo: &mut Memo,
) -> BTreeMap<(Direction, Tier), SetResult> {
    let mut out = BTreeMap::new();
    let selecting: Vec<&PolicyRef> = ctx
        .index
        .policies_by_ns
        .get(&pod.namespace)
        .into_iter()
        .flatten()
        .filter(|k| ctx.state.policies.get(*k).is_some_and(|p| p.pod_selector.matches(&pod.labels)))
        .collect();
    for dir in Direction::ALL {
        let pols: Vec<(&PolicyRef, &PolicyInfo)> = selecting
            .iter()
            .filter_map(|k| ctx.infos.get(*k).map(|i| (*k, i)))
            .filter(|(_, i)| i.affects[di(dir)])
            .collect();
        if pols.is_empty() {
            continue;
        }
        let uses_own_ports = dir == Direction::Ingress
            && pols.iter().any(|(_, i)| i.rules[di(Direction::Ingress)].iter().any(|r| r.named));
        let memo_key = (
            dir,
            pols.iter().map(|(k, _)| (*k).clone()).collect::<Vec<_>>(),
            uses_own_ports.then(|| pod.container_ports.clone()),
        );
        if let Some(&hash) = memo.get(&memo_key) {
            out.insert((dir, Tier::NetworkPolicy), SetResult::Known(hash));
            continue;
        }
        let rules: Vec<&ResolvedRule> = pols.iter().flat_map(|(_, i)| &i.rules[di(dir)]).collect();
        let built = build_set(ctx, dir, &rules, &pod.container_ports);
        let hash = built.set.content_hash();
        memo.insert(memo_key, hash);
        out.insert((dir, Tier::NetworkPolicy), SetResult::New(hash, Box::new(built)));
    }
    out
}

/// The key-space prefixes of an ipBlock: its range and holes. An IPv6 block that spans the
/// IPv4-mapped range gets that range as an extra hole: Kubernetes never matches IPv4 addresses
/// against IPv6 blocks (`::/0` does not allow IPv4).
pub(super) fn block_prefixes(cidr: &Cidr, except: &[Cidr]) -> (peers::Prefix, Vec<peers::Prefix>) {
    let mut holes: Vec<_> = except.iter().map(Cidr::key).collect();
    if cidr.covers_v4_mapped() {
        holes.push(Cidr::v4_mapped_range());
    }
    (cidr.key(), holes)
}

fn build_set(
    ctx: &Ctx,
    dir: Direction,
    rules: &[&ResolvedRule],
    own_ports: &[ContainerPort],
) -> Built {
    let mut items = Vec::new();
    let mut entries: Vec<Vec<(PortKey, u32)>> = Vec::new();
    for rule in rules {
        let mut e = Vec::new();
        numeric_entries(&rule.ports, rule.id, &mut e);
        // Ingress named ports name ports of the pod being protected: "port ... on the pods
        // selected for this policy"; they resolve against this pod's containers.
        if dir == Direction::Ingress && rule.named {
            named_entries(&rule.ports, own_ports, rule.id, &mut e);
        }
        if !e.is_empty() {
            let idx = entries.len();
            entries.push(e);
            if rule.all {
                items.push(Item { range: (0, 0), holes: Vec::new(), entries: idx });
            }
            for b in &rule.blocks {
                let (range, holes) = block_prefixes(&b.cidr, &b.except);
                items.push(Item { range, holes, entries: idx });
            }
            items.extend(rule.pod_ips.iter().flat_map(|ips| ips.iter()).map(|&ip| Item {
                range: (ip, 128),
                holes: Vec::new(),
                entries: idx,
            }));
        }
        // Egress named ports name ports of the destination pod, so every destination pod
        // address the rule's peers cover gets its own entry resolved against that pod.
        if dir == Direction::Egress && rule.named {
            for (ip, pod_ports) in egress_named_targets(ctx, rule) {
                let mut e = Vec::new();
                named_entries(&rule.ports, &pod_ports, rule.id, &mut e);
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
    // Traffic from the node itself (kubelet probes, hostNetwork pods, SNATed NodePort traffic)
    // to local pods is allowed by default, as other enforcers do; isolated pods only.
    if dir == Direction::Ingress
        && ctx.options.allow_host_to_pods
        && !ctx.options.node_addrs.is_empty()
    {
        let idx = entries.len();
        entries.push(vec![(PortKey::ANY, HOST_RULE_ID)]);
        for ip in &ctx.options.node_addrs {
            items.push(Item { range: (key_of(*ip), 128), holes: Vec::new(), entries: idx });
        }
    }
    let mut port_sets = BTreeMap::new();
    let set = peers::build(&items, &entries, &mut port_sets);
    Built { set, port_sets }
}

/// Addresses of in-scope pods that `rule`'s peers cover, each with its pod's container ports.
fn egress_named_targets(ctx: &Ctx, rule: &ResolvedRule) -> BTreeMap<u128, Vec<ContainerPort>> {
    let mut out: BTreeMap<u128, Vec<ContainerPort>> = BTreeMap::new();
    let mut add = |ip: u128| {
        if out.contains_key(&ip) {
            return;
        }
        out.insert(ip, ctx.index.ports_at(ctx.state, ip));
    };
    if rule.all {
        ctx.index.by_ip.keys().for_each(|&ip| add(ip));
    } else {
        for b in &rule.blocks {
            let (base, bits) = b.cidr.key();
            let last = base | if bits >= 128 { 0 } else { u128::MAX >> bits };
            for (&ip, pods) in ctx.index.by_ip.range(base..=last) {
                let addr = pods
                    .iter()
                    .filter_map(|k| ctx.state.pods.get(k))
                    .flat_map(|p| p.ips.iter())
                    .find(|a| key_of(**a) == ip)
                    .copied();
                if addr.is_some_and(|a: IpAddr| b.contains(a)) {
                    add(ip);
                }
            }
        }
    }
    rule.pod_ips.iter().flat_map(|ips| ips.iter()).for_each(|&ip| add(ip));
    out
}
