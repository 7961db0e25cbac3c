//! Incremental compilation: a change to one pod, namespace or policy recompiles only the policies
//! whose resolution it can change and the local endpoints those policies select; a change to a
//! Service or EndpointSlice redoes only the Service pass ([`super::services`]) of the endpoints
//! whose egress is policed.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::endpoint::{compile_pod, Built, Ctx, Memo, SetResult};
use super::index::{
    di, ns_labels, ns_selectors_match, peers_match_pod, resolve, Index, PeerMemo, PolicyInfo,
};
use super::rule_ids::{self, RuleOrigin};
use super::services::{self, Destination, EgressSets};
use super::tiers::{self, PodsMemo, TierCtx, TierMemo};
use super::{CompileOptions, Compiled, CompiledEndpoint, PeerSet, PortSet};
use crate::model::{
    ClusterPolicy, ClusterState, Direction, EndpointSlice, Labels, Namespace, NetworkPolicy,
    ObjectRef, Pod, PodRef, PolicyRef, Service, ServiceRef, Tier,
};

/// One change to the cluster state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A pod was created or updated.
    UpsertPod(Pod),
    /// A pod was deleted.
    DeletePod(PodRef),
    /// A namespace was created or updated.
    UpsertNamespace(Namespace),
    /// A namespace was deleted.
    DeleteNamespace(String),
    /// A policy was created or updated.
    UpsertPolicy(NetworkPolicy),
    /// A policy was deleted.
    DeletePolicy(PolicyRef),
    /// A Service was created or updated.
    UpsertService(Service),
    /// A Service was deleted.
    DeleteService(ServiceRef),
    /// An EndpointSlice was created or updated.
    UpsertEndpointSlice(EndpointSlice),
    /// An EndpointSlice was deleted.
    DeleteEndpointSlice(ObjectRef),
    /// A cluster policy (Admin or Baseline tier) was created or updated.
    UpsertClusterPolicy(ClusterPolicy),
    /// A cluster policy was deleted ([`ClusterPolicy::key`]).
    DeleteClusterPolicy(PolicyRef),
}

/// A local endpoint's egress sets as the policy tiers compiled them (Admin, NetworkPolicy,
/// Baseline), before the Service pass: the key of the Service pass's memo.
type EgressBase = [Option<u64>; 3];

/// Egress Admin-tier sets from policy that the Service pass replaced, kept to redo the pass.
#[derive(Clone, Debug)]
struct BaseAdmin {
    built: Built,
    /// Endpoints whose [`EgressBase`] names it.
    users: usize,
}

/// Reference-counted storage of the sets in [`Compiled`].
#[derive(Clone, Debug, Default)]
struct Refs {
    peer: HashMap<u64, usize>,
    port: HashMap<u64, usize>,
}

/// Holds the cluster state, its indexes and the current [`Compiled`] output, and updates them
/// per [`Change`].
#[derive(Clone, Debug)]
pub struct Compiler {
    options: CompileOptions,
    state: ClusterState,
    index: Index,
    rule_ids: BTreeMap<RuleOrigin, u32>,
    infos: BTreeMap<PolicyRef, PolicyInfo>,
    out: Compiled,
    refs: Refs,
    /// Every Service destination with its backends.
    dests: Vec<Destination>,
    /// Per local endpoint with policed egress: its sets before the Service pass.
    egress_base: BTreeMap<PodRef, EgressBase>,
    /// See [`BaseAdmin`], by hash.
    base_admin: HashMap<u64, BaseAdmin>,
    /// Service pass results: the egress Admin-tier set hash for a base (valid while `dests`
    /// is unchanged; the sets are content-addressed).
    service_memo: HashMap<EgressBase, Option<u64>>,
}

impl Compiler {
    /// Compiles `state` from scratch.
    pub fn new(state: ClusterState, options: CompileOptions) -> Self {
        let index = Index::new(&state, &options.node_name);
        let (rule_ids, rules) = rule_ids::assign(&state);
        let mut memo = PeerMemo::new();
        let infos = state
            .policies
            .iter()
            .map(|(k, p)| (k.clone(), resolve(&state, &index, p, &rule_ids, &mut memo)))
            .collect();
        let dests = services::destinations(&state, &options.node_addrs, &rule_ids);
        let mut c = Compiler {
            options,
            state,
            index,
            rule_ids,
            infos,
            out: Compiled { rules, ..Compiled::default() },
            refs: Refs::default(),
            dests,
            egress_base: BTreeMap::new(),
            base_admin: HashMap::new(),
            service_memo: HashMap::new(),
        };
        let local: Vec<PodRef> = c.index.local_by_ns.values().flatten().cloned().collect();
        c.recompile_endpoints(local);
        c
    }

    /// The current output.
    pub fn compiled(&self) -> &Compiled {
        &self.out
    }

    /// The output, without copying it (for one-shot compiles).
    pub fn into_compiled(self) -> Compiled {
        self.out
    }

    /// The current cluster state.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// The options this compiler was built with.
    pub fn options(&self) -> &CompileOptions {
        &self.options
    }

    /// Applies `change` and updates the output; returns the endpoints that were recompiled.
    pub fn apply(&mut self, change: Change) -> BTreeSet<PodRef> {
        let mut dirty_policies: BTreeSet<PolicyRef> = BTreeSet::new();
        let mut dirty_pods: BTreeSet<PodRef> = BTreeSet::new();
        let mut policies_changed = false;
        let mut services_changed = false;
        // A policy whose selector changed selects other pods even if its rules resolve the same.
        let mut upserted: Option<PolicyRef> = None;
        match change {
            Change::UpsertPod(pod) => {
                let old = self.state.pods.get(&pod.key()).cloned();
                self.pod_dirt(old.as_ref(), &mut dirty_policies, &mut dirty_pods);
                if let Some(old) = &old {
                    self.cluster_pod_dirt(old, &mut dirty_pods);
                }
                if let Some(old) = &old {
                    self.index.remove_pod(old);
                }
                self.index.add_pod(&pod, &self.options.node_name);
                self.state.pods.insert(pod.key(), pod.clone());
                self.pod_dirt(Some(&pod), &mut dirty_policies, &mut dirty_pods);
                self.cluster_pod_dirt(&pod, &mut dirty_pods);
            }
            Change::DeletePod(key) => {
                if let Some(old) = self.state.pods.get(&key).cloned() {
                    // Evaluated against the state that still has the pod.
                    self.pod_dirt(Some(&old), &mut dirty_policies, &mut dirty_pods);
                    self.cluster_pod_dirt(&old, &mut dirty_pods);
                    self.state.pods.remove(&key);
                    self.index.remove_pod(&old);
                }
            }
            Change::UpsertNamespace(ns) => {
                let old = ns_labels(&self.state, &ns.name).into_owned();
                self.ns_dirt(&old, &ns.labels, &mut dirty_policies);
                self.cluster_ns_dirt(&ns.name, &old, &ns.labels, &mut dirty_pods);
                if self.ns_audit(&ns.name) != ns.audit {
                    dirty_pods.extend(
                        self.index.local_by_ns.get(&ns.name).into_iter().flatten().cloned(),
                    );
                }
                self.state.namespaces.insert(ns.name.clone(), ns);
            }
            Change::DeleteNamespace(name) => {
                let old = ns_labels(&self.state, &name).into_owned();
                if self.ns_audit(&name) {
                    dirty_pods
                        .extend(self.index.local_by_ns.get(&name).into_iter().flatten().cloned());
                }
                self.state.namespaces.remove(&name);
                let new = ns_labels(&self.state, &name).into_owned();
                self.ns_dirt(&old, &new, &mut dirty_policies);
                self.cluster_ns_dirt(&name, &old, &new, &mut dirty_pods);
            }
            Change::UpsertPolicy(policy) => {
                let key = policy.key();
                if let Some(old) = self.state.policies.get(&key) {
                    dirty_pods.extend(self.index.selected_local(&self.state, old));
                }
                self.index
                    .policies_by_ns
                    .entry(key.namespace.clone())
                    .or_default()
                    .insert(key.clone());
                self.state.policies.insert(key.clone(), policy);
                dirty_policies.insert(key.clone());
                upserted = Some(key);
                policies_changed = true;
            }
            Change::DeletePolicy(key) => {
                if let Some(old) = self.state.policies.remove(&key) {
                    dirty_pods.extend(self.index.selected_local(&self.state, &old));
                    if let Some(set) = self.index.policies_by_ns.get_mut(&key.namespace) {
                        set.remove(&key);
                        if set.is_empty() {
                            self.index.policies_by_ns.remove(&key.namespace);
                        }
                    }
                    self.infos.remove(&key);
                    policies_changed = true;
                }
            }
            Change::UpsertService(svc) => {
                services_changed = true;
                self.state.services.insert(svc.key(), svc);
            }
            Change::DeleteService(key) => {
                services_changed = self.state.services.remove(&key).is_some();
            }
            Change::UpsertEndpointSlice(slice) => {
                services_changed = true;
                self.state.endpoint_slices.insert(slice.key(), slice);
            }
            Change::DeleteEndpointSlice(key) => {
                services_changed = self.state.endpoint_slices.remove(&key).is_some();
            }
            Change::UpsertClusterPolicy(policy) => {
                let key = policy.key();
                if let Some(old) = self.state.cluster_policies.get(&key) {
                    dirty_pods.extend(self.cluster_selected_local(old));
                }
                dirty_pods.extend(self.cluster_selected_local(&policy));
                self.state.cluster_policies.insert(key, policy);
                policies_changed = true;
            }
            Change::DeleteClusterPolicy(key) => {
                if let Some(old) = self.state.cluster_policies.remove(&key) {
                    dirty_pods.extend(self.cluster_selected_local(&old));
                    policies_changed = true;
                }
            }
        }
        if policies_changed || services_changed {
            // Ids are stable hashes; only a hash collision can move another policy's id.
            let (ids, rules) = rule_ids::assign(&self.state);
            let mut cluster_ids_moved = false;
            for (origin, id) in &ids {
                if let RuleOrigin::Policy { policy, tier, .. } = origin {
                    let old = self.rule_ids.get(origin);
                    if old != Some(id) && *tier == Tier::NetworkPolicy {
                        dirty_policies.insert(policy.clone());
                    } else if old.is_some_and(|o| o != id) {
                        cluster_ids_moved = true;
                    }
                }
            }
            if cluster_ids_moved {
                // A hash collision moved a cluster rule's id: rare, recompile every endpoint.
                dirty_pods.extend(self.index.local_by_ns.values().flatten().cloned());
            }
            self.rule_ids = ids;
            self.out.rules = rules;
            let dests =
                services::destinations(&self.state, &self.options.node_addrs, &self.rule_ids);
            if dests != self.dests {
                self.dests = dests;
                self.service_memo.clear();
                services_changed = true;
            } else {
                services_changed = false;
            }
        }
        let mut memo = PeerMemo::new();
        for key in &dirty_policies {
            let Some(policy) = self.state.policies.get(key) else {
                continue;
            };
            let info = resolve(&self.state, &self.index, policy, &self.rule_ids, &mut memo);
            // Endpoints only change if what the policy resolves to changed (a new or edited
            // policy has no previous info, so its endpoints always recompile) — or if it has
            // egress named ports, which resolve against peer pods' container ports that the
            // resolved info does not capture.
            let named_egress = info.rules[di(Direction::Egress)].iter().any(|r| r.named);
            if named_egress || upserted.as_ref() == Some(key) || self.infos.get(key) != Some(&info)
            {
                dirty_pods.extend(self.index.selected_local(&self.state, policy));
                self.infos.insert(key.clone(), info);
            }
        }
        self.recompile_endpoints(dirty_pods.iter().cloned().collect());
        if services_changed {
            let others: Vec<PodRef> =
                self.egress_base.keys().filter(|k| !dirty_pods.contains(*k)).cloned().collect();
            for key in others {
                self.redo_service_pass(&key);
                dirty_pods.insert(key);
            }
        }
        // Forget results no endpoint uses any more.
        let used: BTreeSet<&EgressBase> = self.egress_base.values().collect();
        self.service_memo.retain(|base, _| used.contains(base));
        dirty_pods
    }

    /// Policies and endpoints a pod (as it is before or after the change) touches: policies
    /// whose peers select it or a pod at one of its addresses (whose egress named ports it
    /// changes), or whose named egress ports reach ranges.
    fn pod_dirt(
        &self,
        pod: Option<&Pod>,
        policies: &mut BTreeSet<PolicyRef>,
        pods: &mut BTreeSet<PodRef>,
    ) {
        let Some(pod) = pod else { return };
        pods.insert(pod.key());
        if !pod.in_scope() {
            return;
        }
        let sharers = self.index.sharers(&self.state, pod);
        for (key, policy) in &self.state.policies {
            let broad = self.infos.get(key).is_some_and(|i| i.broad_named_egress);
            if broad
                || peers_match_pod(&self.state, policy, pod)
                || sharers.iter().any(|s| peers_match_pod(&self.state, policy, s))
            {
                policies.insert(key.clone());
            }
        }
    }

    /// Local pods that cluster policies whose peers contain `pod`, or a pod at one of its
    /// addresses, select (their tier sets hold the pod's addresses and, for egress named ports,
    /// the container ports of every pod at them).
    fn cluster_pod_dirt(&self, pod: &Pod, pods: &mut BTreeSet<PodRef>) {
        if !pod.in_scope() {
            return;
        }
        let sharers = self.index.sharers(&self.state, pod);
        for policy in self.state.cluster_policies.values() {
            if tiers::peers_match_pod(&self.state, policy, pod)
                || sharers.iter().any(|s| tiers::peers_match_pod(&self.state, policy, s))
            {
                pods.extend(self.cluster_selected_local(policy));
            }
        }
    }

    /// Local pods whose tier sets a namespace relabelling can change: those of the namespace
    /// (subject selection) and those selected by policies whose selectors match either labels.
    fn cluster_ns_dirt(&self, name: &str, old: &Labels, new: &Labels, pods: &mut BTreeSet<PodRef>) {
        if self.state.cluster_policies.is_empty() {
            return;
        }
        pods.extend(self.index.local_by_ns.get(name).into_iter().flatten().cloned());
        for policy in self.state.cluster_policies.values() {
            if tiers::ns_selectors_match(policy, old) || tiers::ns_selectors_match(policy, new) {
                pods.extend(self.cluster_selected_local(policy));
            }
        }
    }

    /// Local in-scope pods `policy`'s subject selects.
    fn cluster_selected_local(&self, policy: &ClusterPolicy) -> Vec<PodRef> {
        self.index
            .local_by_ns
            .values()
            .flatten()
            .filter(|k| {
                self.state
                    .pods
                    .get(*k)
                    .is_some_and(|p| tiers::subject_selects(&self.state, policy, p))
            })
            .cloned()
            .collect()
    }

    /// Whether namespace `name` is in audit mode.
    fn ns_audit(&self, name: &str) -> bool {
        self.state.namespaces.get(name).is_some_and(|n| n.audit)
    }

    /// Whether `pod` is an audit endpoint: its namespace is in audit mode, or an audit policy
    /// selects it (whatever its policy types; the flag is per endpoint).
    fn audited(&self, pod: &Pod) -> bool {
        self.ns_audit(&pod.namespace)
            || self
                .index
                .policies_by_ns
                .get(&pod.namespace)
                .into_iter()
                .flatten()
                .filter_map(|k| self.state.policies.get(k))
                .any(|p| p.audit && p.pod_selector.matches(&pod.labels))
    }

    /// Policies whose namespace selectors match a namespace's old or new labels.
    fn ns_dirt(
        &self,
        old: &crate::model::Labels,
        new: &crate::model::Labels,
        policies: &mut BTreeSet<PolicyRef>,
    ) {
        for (key, policy) in &self.state.policies {
            if ns_selectors_match(policy, old) || ns_selectors_match(policy, new) {
                policies.insert(key.clone());
            }
        }
    }

    /// Recompiles the given endpoints (removing those that no longer exist or are not local).
    fn recompile_endpoints(&mut self, pods: Vec<PodRef>) {
        let mut memo = Memo::new();
        let mut tier_memo = TierMemo::new();
        let mut pods_memo = PodsMemo::new();
        for key in pods {
            let new = match self.state.pods.get(&key) {
                Some(pod)
                    if pod.in_scope()
                        && pod.node_name.as_deref() == Some(self.options.node_name.as_str()) =>
                {
                    let ctx = Ctx {
                        state: &self.state,
                        index: &self.index,
                        infos: &self.infos,
                        options: &self.options,
                    };
                    let mut results = compile_pod(&ctx, pod, &mut memo);
                    let tctx =
                        TierCtx { state: &self.state, index: &self.index, ids: &self.rule_ids };
                    results.extend(tiers::compile_pod(&tctx, pod, &mut tier_memo, &mut pods_memo));
                    let mut ep = CompiledEndpoint {
                        ips: pod.ips.clone(),
                        sets: BTreeMap::new(),
                        audit: self.audited(pod),
                    };
                    let mut base: EgressBase = [None; 3];
                    for (slot, result) in results {
                        if slot == (Direction::Egress, Tier::Admin) {
                            // Kept aside: the Service pass decides the endpoint's Admin set.
                            let hash = match result {
                                SetResult::Known(h) => h,
                                SetResult::New(h, built) => {
                                    self.base_admin
                                        .entry(h)
                                        .or_insert(BaseAdmin { built: *built, users: 0 });
                                    h
                                }
                            };
                            base[0] = Some(hash);
                            continue;
                        }
                        let hash = match result {
                            SetResult::Known(h) => h,
                            SetResult::New(h, built) => {
                                self.add_set(h, built.set, built.port_sets);
                                h
                            }
                        };
                        self.acquire(hash);
                        ep.sets.insert(slot, hash);
                        if slot.0 == Direction::Egress {
                            base[slot.1 as usize] = Some(hash);
                        }
                    }
                    if base.iter().any(Option::is_some) {
                        if let Some(h) = base[0] {
                            if let Some(b) = self.base_admin.get_mut(&h) {
                                b.users += 1;
                            }
                        }
                        if let Some(h) = self.service_pass(&base) {
                            self.acquire(h);
                            ep.sets.insert((Direction::Egress, Tier::Admin), h);
                        }
                        Some((ep, Some(base)))
                    } else {
                        Some((ep, None))
                    }
                }
                _ => None,
            };
            let (old, old_base) = match new {
                Some((ep, base)) => {
                    let old_base = match base {
                        Some(b) => self.egress_base.insert(key.clone(), b),
                        None => self.egress_base.remove(&key),
                    };
                    (self.out.endpoints.insert(key, ep), old_base)
                }
                None => (self.out.endpoints.remove(&key), self.egress_base.remove(&key)),
            };
            for hash in old.into_iter().flat_map(|ep| ep.sets.into_values()) {
                self.release(hash);
            }
            if let Some(h) = old_base.and_then(|b| b[0]) {
                self.release_base_admin(h);
            }
        }
    }

    /// Drops a use of a base Admin-tier set; the set goes with its last user.
    fn release_base_admin(&mut self, hash: u64) {
        if let Some(b) = self.base_admin.get_mut(&hash) {
            b.users = b.users.saturating_sub(1);
            if b.users == 0 {
                self.base_admin.remove(&hash);
            }
        }
    }

    /// The egress Admin-tier set (hash; stored in the output, not yet acquired) of an endpoint
    /// whose sets before the Service pass are `base`: see [`services`].
    fn service_pass(&mut self, base: &EgressBase) -> Option<u64> {
        if let Some(&memo) = self.service_memo.get(base) {
            // The memo holds hashes only: a set released since must be built again.
            if memo.is_none_or(|h| self.out.peer_sets.contains_key(&h)) {
                return memo;
            }
        }
        let admin = base[0].and_then(|h| self.base_admin.get(&h)).map(|b| &b.built);
        let tiers = [
            admin.map(|b| &b.set),
            base[1].and_then(|h| self.out.peer_sets.get(&h)),
            base[2].and_then(|h| self.out.peer_sets.get(&h)),
        ];
        let out_ports = &self.out.port_sets;
        let resolve =
            |h: u64| out_ports.get(&h).or_else(|| admin.and_then(|b| b.port_sets.get(&h)));
        let sets = EgressSets::new(tiers, &resolve);
        let mut port_sets = admin.map(|b| b.port_sets.clone()).unwrap_or_default();
        let set = services::admin_set(&sets, &self.dests, &mut port_sets);
        let hash = set.map(|set| {
            let h = set.content_hash();
            self.add_set(h, set, port_sets);
            h
        });
        self.service_memo.insert(*base, hash);
        hash
    }

    /// Redoes the Service pass of one endpoint (after Services or EndpointSlices changed).
    fn redo_service_pass(&mut self, key: &PodRef) {
        let Some(base) = self.egress_base.get(key).copied() else { return };
        let new = self.service_pass(&base);
        if let Some(h) = new {
            self.acquire(h);
        }
        let slot = (Direction::Egress, Tier::Admin);
        let Some(ep) = self.out.endpoints.get_mut(key) else { return };
        let old = match new {
            Some(h) => ep.sets.insert(slot, h),
            None => ep.sets.remove(&slot),
        };
        if let Some(h) = old {
            self.release(h);
        }
    }

    /// Stores a new set (with refcount 0) unless its content is already present.
    fn add_set(&mut self, hash: u64, set: PeerSet, mut port_sets: BTreeMap<u64, PortSet>) {
        if self.out.peer_sets.contains_key(&hash) {
            return;
        }
        let used: BTreeSet<u64> = set.entries.values().copied().collect();
        for ph in used {
            *self.refs.port.entry(ph).or_default() += 1;
            if let Some(ps) = port_sets.remove(&ph) {
                self.out.port_sets.entry(ph).or_insert(ps);
            }
        }
        self.refs.peer.insert(hash, 0);
        self.out.peer_sets.insert(hash, set);
    }

    fn acquire(&mut self, hash: u64) {
        *self.refs.peer.entry(hash).or_default() += 1;
    }

    fn release(&mut self, hash: u64) {
        let Some(n) = self.refs.peer.get_mut(&hash) else {
            return;
        };
        *n = n.saturating_sub(1);
        if *n > 0 {
            return;
        }
        self.refs.peer.remove(&hash);
        let Some(set) = self.out.peer_sets.remove(&hash) else {
            return;
        };
        let used: BTreeSet<u64> = set.entries.values().copied().collect();
        for ph in used {
            if let Some(n) = self.refs.port.get_mut(&ph) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.refs.port.remove(&ph);
                    self.out.port_sets.remove(&ph);
                }
            }
        }
    }
}
