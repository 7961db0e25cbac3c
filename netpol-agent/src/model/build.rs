//! Terse builders for model values, for tests and examples:
//! `pod("a", "ns").label("app", "x").ip("10.0.0.1")`.
//!
//! They take literals written by a programmer and panic on invalid ones (a bad literal is a bug
//! in the test); never feed them external input — [`crate::manifest`] validates that.

use std::net::IpAddr;

use super::*;

fn parse_ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|_| panic!("invalid IP literal {s:?}"))
}

/// Starts a pod in `namespace`, scheduled on node `"node-a"`, without addresses.
pub fn pod(name: &str, namespace: &str) -> PodBuilder {
    PodBuilder(Pod {
        namespace: namespace.into(),
        name: name.into(),
        labels: Labels::new(),
        node_name: Some("node-a".into()),
        ips: Vec::new(),
        host_network: false,
        container_ports: Vec::new(),
    })
}

/// Builder of [`Pod`].
#[derive(Clone, Debug)]
pub struct PodBuilder(pub Pod);

impl PodBuilder {
    /// Adds a label.
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.0.labels.insert(k.into(), v.into());
        self
    }
    /// Adds an address.
    pub fn ip(mut self, ip: &str) -> Self {
        self.0.ips.push(parse_ip(ip));
        self
    }
    /// Sets the node (`None`: unscheduled).
    pub fn node(mut self, node: Option<&str>) -> Self {
        self.0.node_name = node.map(Into::into);
        self
    }
    /// Marks the pod host-network.
    pub fn host_network(mut self) -> Self {
        self.0.host_network = true;
        self
    }
    /// Adds a container port.
    pub fn port(mut self, name: Option<&str>, port: u16, protocol: Protocol) -> Self {
        self.0.container_ports.push(ContainerPort { name: name.map(Into::into), port, protocol });
        self
    }
    /// The pod.
    pub fn build(self) -> Pod {
        self.0
    }
}

/// A namespace with the API server's name label plus `labels`.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    let mut l: Labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    l.insert(NAMESPACE_NAME_LABEL.into(), name.into());
    Namespace { name: name.into(), labels: l, audit: false }
}

/// A selector from `matchLabels` pairs.
pub fn sel(labels: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        match_expressions: Vec::new(),
    }
}

impl LabelSelector {
    /// Adds a `matchExpressions` entry (panics on an invalid one; builder use only).
    pub fn expr(mut self, key: &str, operator: Operator, values: &[&str]) -> Self {
        let r = Requirement::new(key, operator, values.iter().map(|v| v.to_string()).collect())
            .unwrap_or_else(|e| panic!("invalid requirement: {e}"));
        self.match_expressions.push(r);
        self
    }
}

/// Starts a policy selecting every pod of `namespace`, with `policyTypes` omitted and no rules.
pub fn policy(name: &str, namespace: &str) -> PolicyBuilder {
    PolicyBuilder(NetworkPolicy {
        namespace: namespace.into(),
        name: name.into(),
        pod_selector: LabelSelector::default(),
        policy_types: None,
        ingress: Vec::new(),
        egress: Vec::new(),
        audit: false,
    })
}

/// Builder of [`NetworkPolicy`].
#[derive(Clone, Debug)]
pub struct PolicyBuilder(pub NetworkPolicy);

impl PolicyBuilder {
    /// Sets `spec.podSelector`.
    pub fn select(mut self, s: LabelSelector) -> Self {
        self.0.pod_selector = s;
        self
    }
    /// Sets `spec.policyTypes`.
    pub fn types(mut self, types: &[PolicyType]) -> Self {
        self.0.policy_types = Some(types.to_vec());
        self
    }
    /// Adds an ingress rule.
    pub fn ingress(mut self, r: Rule) -> Self {
        self.0.ingress.push(r);
        self
    }
    /// Adds an egress rule.
    pub fn egress(mut self, r: Rule) -> Self {
        self.0.egress.push(r);
        self
    }
    /// Sets the audit annotation ([`NetworkPolicy::audit`]).
    pub fn audit(mut self, on: bool) -> Self {
        self.0.audit = on;
        self
    }
    /// The policy.
    pub fn build(self) -> NetworkPolicy {
        self.0
    }
}

/// A rule with no peers and no ports (allows everything).
pub fn rule() -> Rule {
    Rule::default()
}

impl Rule {
    /// Adds a peer.
    pub fn peer(mut self, p: Peer) -> Self {
        self.peers.push(p);
        self
    }
    /// Adds a port.
    pub fn port(mut self, p: PolicyPort) -> Self {
        self.ports.push(p);
        self
    }
}

/// A pods peer.
pub fn pods(
    namespace_selector: Option<LabelSelector>,
    pod_selector: Option<LabelSelector>,
) -> Peer {
    Peer::Pods { namespace_selector, pod_selector }
}

/// An ipBlock peer (panics on invalid literals).
pub fn block(cidr: &str, except: &[&str]) -> Peer {
    let c: Cidr = cidr.parse().unwrap_or_else(|e| panic!("{e}"));
    let ex = except.iter().map(|e| e.parse().unwrap_or_else(|e| panic!("{e}"))).collect();
    Peer::IpBlock(IpBlock::new(c, ex).unwrap_or_else(|e| panic!("{e}")))
}

/// A numeric port.
pub fn port(protocol: Protocol, port: u16) -> PolicyPort {
    PolicyPort { protocol, port: Some(PortRef::Number(port)), end_port: None }
}

/// A port range `port..=end`.
pub fn range(protocol: Protocol, port: u16, end: u16) -> PolicyPort {
    PolicyPort { protocol, port: Some(PortRef::Number(port)), end_port: Some(end) }
}

/// A named port.
pub fn named(protocol: Protocol, name: &str) -> PolicyPort {
    PolicyPort { protocol, port: Some(PortRef::Name(name.into())), end_port: None }
}

/// Every port of a protocol.
pub fn proto(protocol: Protocol) -> PolicyPort {
    PolicyPort { protocol, port: None, end_port: None }
}

/// Cluster state from parts.
pub fn state(
    namespaces: Vec<Namespace>,
    pods: Vec<PodBuilder>,
    policies: Vec<PolicyBuilder>,
) -> ClusterState {
    ClusterState {
        namespaces: namespaces.into_iter().map(|n| (n.name.clone(), n)).collect(),
        pods: pods.into_iter().map(|p| (p.0.key(), p.0)).collect(),
        policies: policies.into_iter().map(|p| (p.0.key(), p.0)).collect(),
        ..ClusterState::default()
    }
}

/// Starts a Service in `namespace` without addresses or ports.
pub fn service(name: &str, namespace: &str) -> ServiceBuilder {
    ServiceBuilder(Service {
        namespace: namespace.into(),
        name: name.into(),
        cluster_ips: Vec::new(),
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        ports: Vec::new(),
    })
}

/// Builder of [`Service`].
#[derive(Clone, Debug)]
pub struct ServiceBuilder(pub Service);

impl ServiceBuilder {
    /// Adds a cluster IP.
    pub fn cluster_ip(mut self, ip: &str) -> Self {
        self.0.cluster_ips.push(parse_ip(ip));
        self
    }
    /// Adds an external IP.
    pub fn external_ip(mut self, ip: &str) -> Self {
        self.0.external_ips.push(parse_ip(ip));
        self
    }
    /// Adds a load-balancer ingress IP.
    pub fn lb_ip(mut self, ip: &str) -> Self {
        self.0.load_balancer_ips.push(parse_ip(ip));
        self
    }
    /// Adds a port (`name` empty for an unnamed one).
    pub fn port(
        mut self,
        name: &str,
        protocol: Protocol,
        port: u16,
        node_port: Option<u16>,
    ) -> Self {
        self.0.ports.push(ServicePort { name: name.into(), protocol, port, node_port });
        self
    }
    /// The Service.
    pub fn build(self) -> Service {
        self.0
    }
}

/// Starts an IPv4 EndpointSlice of Service `service` in `namespace`.
pub fn slice(name: &str, namespace: &str, service: &str) -> SliceBuilder {
    SliceBuilder(EndpointSlice {
        namespace: namespace.into(),
        name: name.into(),
        service: Some(service.into()),
        address_type: AddressType::Ipv4,
        ports: Vec::new(),
        endpoints: Vec::new(),
    })
}

/// Builder of [`EndpointSlice`].
#[derive(Clone, Debug)]
pub struct SliceBuilder(pub EndpointSlice);

impl SliceBuilder {
    /// Makes it an IPv6 slice.
    pub fn v6(mut self) -> Self {
        self.0.address_type = AddressType::Ipv6;
        self
    }
    /// Adds a port (the Service port's name, and the backend port).
    pub fn port(mut self, name: &str, protocol: Protocol, port: u16) -> Self {
        self.0.ports.push(EndpointPort { name: name.into(), protocol, port });
        self
    }
    /// Adds an endpoint, ready or not (not ready: not serving either).
    pub fn endpoint(mut self, ip: &str, ready: bool) -> Self {
        self.0.endpoints.push(SliceEndpoint {
            addresses: vec![parse_ip(ip)],
            ready,
            serving: ready,
            terminating: false,
        });
        self
    }
    /// The slice.
    pub fn build(self) -> EndpointSlice {
        self.0
    }
}

impl ClusterState {
    /// Adds a Service (builder use).
    pub fn with_service(mut self, s: ServiceBuilder) -> Self {
        self.services.insert(s.0.key(), s.0);
        self
    }
    /// Adds an EndpointSlice (builder use).
    pub fn with_slice(mut self, s: SliceBuilder) -> Self {
        self.endpoint_slices.insert(s.0.key(), s.0);
        self
    }
}

/// Starts a ClusterNetworkPolicy of `tier` and `priority` whose subject is every pod, with no
/// rules.
pub fn cnp(name: &str, tier: Tier, priority: u32) -> ClusterPolicyBuilder {
    ClusterPolicyBuilder(ClusterPolicy {
        kind: ClusterKind::ClusterNetworkPolicy,
        name: name.into(),
        tier,
        priority,
        subject: NamespacedPods::default(),
        ingress: Vec::new(),
        egress: Vec::new(),
    })
}

/// Builder of [`ClusterPolicy`].
#[derive(Clone, Debug)]
pub struct ClusterPolicyBuilder(pub ClusterPolicy);

impl ClusterPolicyBuilder {
    /// Sets the kind (the reference and the rule origins follow it).
    pub fn kind(mut self, kind: ClusterKind) -> Self {
        self.0.kind = kind;
        self
    }
    /// Sets `spec.subject`.
    pub fn subject(
        mut self,
        namespace_selector: LabelSelector,
        pod_selector: LabelSelector,
    ) -> Self {
        self.0.subject = NamespacedPods { namespace_selector, pod_selector };
        self
    }
    /// Adds an ingress rule.
    pub fn ingress(mut self, r: ClusterRule) -> Self {
        self.0.ingress.push(r);
        self
    }
    /// Adds an egress rule.
    pub fn egress(mut self, r: ClusterRule) -> Self {
        self.0.egress.push(r);
        self
    }
    /// The policy.
    pub fn build(self) -> ClusterPolicy {
        self.0
    }
}

/// A cluster rule with `action`, no peers yet and every port.
pub fn crule(action: ClusterAction) -> ClusterRule {
    ClusterRule { name: String::new(), action, peers: Vec::new(), ports: Vec::new() }
}

impl ClusterRule {
    /// Adds a `pods` peer (`namespaces` peer: an empty pod selector).
    pub fn pods(mut self, namespace_selector: LabelSelector, pod_selector: LabelSelector) -> Self {
        self.peers.push(ClusterPeer::Pods(NamespacedPods { namespace_selector, pod_selector }));
        self
    }
    /// Adds a `networks` peer (panics on invalid literals).
    pub fn networks(mut self, cidrs: &[&str]) -> Self {
        let c = cidrs.iter().map(|c| c.parse().unwrap_or_else(|e| panic!("{e}"))).collect();
        self.peers.push(ClusterPeer::Networks(c));
        self
    }
    /// Adds a numeric port (see [`port`], [`range`], [`proto`]).
    pub fn port(mut self, p: PolicyPort) -> Self {
        self.ports.push(ClusterPort::Numeric(p));
        self
    }
    /// Adds a named port.
    pub fn named(mut self, name: &str) -> Self {
        self.ports.push(ClusterPort::Named(name.into()));
        self
    }
}

impl ClusterState {
    /// Adds a cluster policy (builder use).
    pub fn with(mut self, p: ClusterPolicyBuilder) -> Self {
        self.cluster_policies.insert(p.0.key(), p.0);
        self
    }
}
