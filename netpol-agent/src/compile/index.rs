//! Indexes over the cluster state and the per-policy resolution of rule peers, shared by the full
//! and the incremental compile.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::ports::has_named;
use super::rule_ids::RuleOrigin;
use crate::model::{
    key_of, ClusterState, ContainerPort, Direction, IpBlock, LabelSelector, Labels, NetworkPolicy,
    Peer, Pod, PodRef, PolicyPort, PolicyRef, Tier,
};

/// Lookups the compiler needs that `ClusterState` alone would answer by scanning everything.
#[derive(Clone, Debug, Default)]
pub struct Index {
    /// In-scope pods (not host-network, with an address) by namespace.
    pub pods_by_ns: BTreeMap<String, BTreeSet<PodRef>>,
    /// In-scope pods by address key.
    pub by_ip: BTreeMap<u128, BTreeSet<PodRef>>,
    /// In-scope pods on this node, by namespace.
    pub local_by_ns: BTreeMap<String, BTreeSet<PodRef>>,
    /// Policies by namespace.
    pub policies_by_ns: BTreeMap<String, BTreeSet<PolicyRef>>,
    /// In-scope pods by label `(key, value)`: selectors with `matchLabels` only visit the pods
    /// that carry one of their labels instead of every pod of every selected namespace.
    pub by_label: HashMap<(String, String), BTreeSet<PodRef>>,
}

impl Index {
    /// Container ports of the in-scope pods at address key `ip`: what an egress rule's named
    /// port resolves to for that destination.
    pub fn ports_at(&self, state: &ClusterState, ip: u128) -> Vec<ContainerPort> {
        self.by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .filter_map(|k| state.pods.get(k))
            .flat_map(|p| p.container_ports.iter().cloned())
            .collect()
    }

    /// The other in-scope pods at one of `pod`'s addresses. What an egress named port resolves
    /// to at an address is the union of their container ports ([`Index::ports_at`]: the maps
    /// key on addresses, which cannot tell two pods claiming one apart), so a change of `pod`
    /// also changes it for rules whose peers select one of these.
    pub fn sharers<'s>(&self, state: &'s ClusterState, pod: &Pod) -> Vec<&'s Pod> {
        let key = pod.key();
        let mut keys: BTreeSet<&PodRef> = BTreeSet::new();
        for ip in &pod.ips {
            keys.extend(self.by_ip.get(&key_of(*ip)).into_iter().flatten().filter(|k| **k != key));
        }
        keys.into_iter().filter_map(|k| state.pods.get(k)).collect()
    }

    /// Indexes `state` for node `node`.
    pub fn new(state: &ClusterState, node: &str) -> Self {
        let mut index = Index::default();
        for pod in state.pods.values() {
            index.add_pod(pod, node);
        }
        for key in state.policies.keys() {
            index.policies_by_ns.entry(key.namespace.clone()).or_default().insert(key.clone());
        }
        index
    }

    /// Adds a pod (no-op for out-of-scope pods).
    pub fn add_pod(&mut self, pod: &Pod, node: &str) {
        if !pod.in_scope() {
            return;
        }
        let key = pod.key();
        self.pods_by_ns.entry(pod.namespace.clone()).or_default().insert(key.clone());
        for ip in &pod.ips {
            self.by_ip.entry(key_of(*ip)).or_default().insert(key.clone());
        }
        for (k, v) in &pod.labels {
            let label = (k.clone(), v.clone());
            self.by_label.entry(label).or_default().insert(key.clone());
        }
        if pod.node_name.as_deref() == Some(node) {
            self.local_by_ns.entry(pod.namespace.clone()).or_default().insert(key);
        }
    }

    /// Removes a pod added with [`Index::add_pod`].
    pub fn remove_pod(&mut self, pod: &Pod) {
        let key = pod.key();
        fn remove<K: Ord>(map: &mut BTreeMap<K, BTreeSet<PodRef>>, k: K, pod: &PodRef) {
            if let Some(set) = map.get_mut(&k) {
                set.remove(pod);
                if set.is_empty() {
                    map.remove(&k);
                }
            }
        }
        remove(&mut self.pods_by_ns, pod.namespace.clone(), &key);
        remove(&mut self.local_by_ns, pod.namespace.clone(), &key);
        for ip in &pod.ips {
            remove(&mut self.by_ip, key_of(*ip), &key);
        }
        for (k, v) in &pod.labels {
            let label = (k.clone(), v.clone());
            if let Some(set) = self.by_label.get_mut(&label) {
                set.remove(&key);
                if set.is_empty() {
                    self.by_label.remove(&label);
                }
            }
        }
    }

    /// Every namespace that exists as an object or holds an in-scope pod.
    pub fn namespaces<'a>(&'a self, state: &'a ClusterState) -> BTreeSet<&'a str> {
        state.namespaces.keys().chain(self.pods_by_ns.keys()).map(String::as_str).collect()
    }

    /// Local in-scope pods of `policy`'s namespace that its `podSelector` selects.
    pub fn selected_local(&self, state: &ClusterState, policy: &NetworkPolicy) -> Vec<PodRef> {
        let Some(pods) = self.local_by_ns.get(&policy.namespace) else {
            return Vec::new();
        };
        pods.iter()
            .filter(|k| state.pods.get(*k).is_some_and(|p| policy.pod_selector.matches(&p.labels)))
            .cloned()
            .collect()
    }

    /// Addresses of the in-scope pods a pods peer of a policy in `policy_ns` selects.
    pub(super) fn peer_ips(
        &self,
        state: &ClusterState,
        policy_ns: &str,
        namespace_selector: Option<&LabelSelector>,
        pod_selector: Option<&LabelSelector>,
    ) -> Vec<u128> {
        let mut ips = BTreeSet::new();
        let mut add = |pod: &Pod| ips.extend(pod.ips.iter().map(|ip| key_of(*ip)));
        let pod_ok = |pod: &Pod| pod_selector.is_none_or(|s| s.matches(&pod.labels));
        // The rarest `matchLabels` pair bounds the candidates.
        let by_label = pod_selector.and_then(|s| {
            s.match_labels
                .iter()
                .map(|(k, v)| self.by_label.get(&(k.clone(), v.clone())))
                .min_by_key(|set| set.map_or(0, BTreeSet::len))
        });
        match (namespace_selector, by_label) {
            (_, Some(None)) => {} // a required label that no pod has
            (None, Some(Some(candidates))) => {
                let pods = candidates.iter().filter(|k| k.namespace == policy_ns);
                let pods = pods.filter_map(|k| state.pods.get(k));
                pods.filter(|p| pod_ok(p)).for_each(&mut add);
            }
            (Some(ns_sel), Some(Some(candidates))) => {
                let mut ns_ok: HashMap<&str, bool> = HashMap::new();
                for pod in candidates.iter().filter_map(|k| state.pods.get(k)) {
                    let ok = *ns_ok
                        .entry(pod.namespace.as_str())
                        .or_insert_with(|| ns_sel.matches(&ns_labels(state, &pod.namespace)));
                    if ok && pod_ok(pod) {
                        add(pod);
                    }
                }
            }
            (ns_sel, None) => {
                let namespaces: Vec<&str> = match ns_sel {
                    None => vec![policy_ns],
                    Some(sel) => self
                        .namespaces(state)
                        .into_iter()
                        .filter(|ns| sel.matches(&ns_labels(state, ns)))
                        .collect(),
                };
                for ns in namespaces {
                    let pods = self.pods_by_ns.get(ns).into_iter().flatten();
                    let pods = pods.filter_map(|k| state.pods.get(k));
                    pods.filter(|p| pod_ok(p)).for_each(&mut add);
                }
            }
        }
        ips.into_iter().collect()
    }
}

/// Resolved addresses of identical pods peers, shared within one compile step (many policies
/// name the same peers, e.g. "from the monitoring namespace").
pub type PeerMemo =
    HashMap<(Option<String>, Option<LabelSelector>, Option<LabelSelector>), Arc<Vec<u128>>>;

/// Labels of a namespace, including the implicit name label when there is no object.
pub fn ns_labels<'a>(state: &'a ClusterState, ns: &str) -> Cow<'a, Labels> {
    state.namespace_labels(ns)
}

/// Whether a pods peer of a policy in `policy_ns` selects a pod in `pod_ns` with `labels`.
/// "If namespaceSelector is also set, then the NetworkPolicyPeer as a whole selects the pods
/// matching podSelector in the Namespaces selected by NamespaceSelector. Otherwise it selects
/// the pods matching podSelector in the policy's own namespace."
pub fn pods_peer_matches(
    state: &ClusterState,
    policy_ns: &str,
    namespace_selector: Option<&LabelSelector>,
    pod_selector: Option<&LabelSelector>,
    pod: &Pod,
) -> bool {
    let ns_ok = match namespace_selector {
        None => pod.namespace == policy_ns,
        Some(sel) => sel.matches(&ns_labels(state, &pod.namespace)),
    };
    ns_ok && pod_selector.is_none_or(|s| s.matches(&pod.labels))
}

/// One rule with its pod-selector peers resolved to addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedRule {
    /// Rule id.
    pub id: u32,
    /// No `from`/`to`: every address.
    pub all: bool,
    /// `ipBlock` peers.
    pub blocks: Vec<IpBlock>,
    /// Address keys of the in-scope pods each selector peer selects (sorted, unique per peer).
    pub pod_ips: Vec<Arc<Vec<u128>>>,
    /// The rule's `ports`.
    pub ports: Vec<PolicyPort>,
    /// Whether `ports` contains a named port.
    pub named: bool,
}

/// A policy's rules, resolved against the current pods and namespaces.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PolicyInfo {
    /// Rules by direction (empty when the policy does not affect that direction).
    pub rules: [Vec<ResolvedRule>; 2],
    /// Whether the policy isolates selected pods, by direction.
    pub affects: [bool; 2],
    /// Egress rules with named ports whose peers include ranges (all addresses or ipBlocks):
    /// their entries depend on every pod's address and container ports.
    pub broad_named_egress: bool,
}

/// Index of a direction in per-direction arrays.
pub fn di(dir: Direction) -> usize {
    match dir {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// Resolves `policy` against `state`.
pub fn resolve(
    state: &ClusterState,
    index: &Index,
    policy: &NetworkPolicy,
    ids: &BTreeMap<RuleOrigin, u32>,
    memo: &mut PeerMemo,
) -> PolicyInfo {
    let mut info = PolicyInfo::default();
    let key = policy.key();
    for dir in Direction::ALL {
        info.affects[di(dir)] = policy.affects(dir);
        if !policy.affects(dir) {
            continue;
        }
        for (i, rule) in policy.rules(dir).iter().enumerate() {
            let origin = RuleOrigin::Policy {
                tier: Tier::NetworkPolicy,
                policy: key.clone(),
                direction: dir,
                index: i as u32,
            };
            let id = ids.get(&origin).copied().unwrap_or(netpol_common::policy::RULE_NONE);
            let mut resolved = ResolvedRule {
                id,
                all: rule.peers.is_empty(),
                blocks: Vec::new(),
                pod_ips: Vec::new(),
                ports: rule.ports.clone(),
                named: has_named(&rule.ports),
            };
            for peer in &rule.peers {
                match peer {
                    Peer::IpBlock(b) => resolved.blocks.push(b.clone()),
                    Peer::Pods { namespace_selector, pod_selector } => {
                        // Without a namespace selector the result depends on the policy's namespace.
                        let memo_key = (
                            namespace_selector.is_none().then(|| policy.namespace.clone()),
                            namespace_selector.clone(),
                            pod_selector.clone(),
                        );
                        let ips = memo.entry(memo_key).or_insert_with(|| {
                            Arc::new(index.peer_ips(
                                state,
                                &policy.namespace,
                                namespace_selector.as_ref(),
                                pod_selector.as_ref(),
                            ))
                        });
                        if !ips.is_empty() {
                            resolved.pod_ips.push(Arc::clone(ips));
                        }
                    }
                }
            }
            if dir == Direction::Egress
                && resolved.named
                && (resolved.all || !resolved.blocks.is_empty())
            {
                info.broad_named_egress = true;
            }
            info.rules[di(dir)].push(resolved);
        }
    }
    info
}

/// Whether any pods peer of `policy` selects `pod` (so a change of `pod` changes the policy's
/// resolved addresses).
pub fn peers_match_pod(state: &ClusterState, policy: &NetworkPolicy, pod: &Pod) -> bool {
    pod.in_scope()
        && Direction::ALL.iter().any(|&dir| {
            policy.rules(dir).iter().flat_map(|r| &r.peers).any(|peer| match peer {
                Peer::Pods { namespace_selector, pod_selector } => pods_peer_matches(
                    state,
                    &policy.namespace,
                    namespace_selector.as_ref(),
                    pod_selector.as_ref(),
                    pod,
                ),
                Peer::IpBlock(_) => false,
            })
        })
}

/// Whether any namespace selector of `policy` matches `labels`.
pub fn ns_selectors_match(policy: &NetworkPolicy, labels: &Labels) -> bool {
    Direction::ALL.iter().any(|&dir| {
        policy.rules(dir).iter().flat_map(|r| &r.peers).any(|peer| {
            matches!(peer, Peer::Pods { namespace_selector: Some(sel), .. } if sel.matches(labels))
        })
    })
}
