//! Plain domain types: the parts of Pods, Namespaces and NetworkPolicies that policy enforcement
//! needs, trimmed from the Kubernetes API (k8s-openapi types stay in [`crate::manifest`] and the
//! API sources). Everything is ordered (`BTreeMap`) so the compiler's output is deterministic.

pub mod build;
mod cluster;
mod net;
mod selector;
mod service;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

pub use cluster::{
    cluster_ref, is_cluster_ref, ClusterAction, ClusterKind, ClusterPeer, ClusterPolicy,
    ClusterPort, ClusterRule, NamespacedPods,
};
pub(crate) use net::mask;
pub use net::{key_of, Cidr, IpBlock};
pub use netpol_common::ep::Tier;
pub use selector::{LabelSelector, Operator, Requirement};
pub use service::{
    AddressType, EndpointPort, EndpointSlice, Service, ServicePort, ServiceRef, SliceEndpoint,
    SERVICE_NAME_LABEL,
};

/// Labels of an object.
pub type Labels = BTreeMap<String, String>;

/// The label the API server puts on every namespace (immutable, equal to the namespace name).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Label or annotation key that puts endpoints in audit mode when its value is `"true"`: on a
/// Namespace (label or annotation) every local pod of the namespace, on a NetworkPolicy
/// (annotation) every pod the policy selects. See [`Namespace::audit`] and
/// [`NetworkPolicy::audit`].
pub const AUDIT_KEY: &str = "netpol.io/audit";

/// Errors of building model values from untrusted input (manifests, API objects).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A CIDR string that does not parse or whose prefix is too long for its family.
    #[error("invalid CIDR {value:?}")]
    InvalidCidr {
        /// The offending text.
        value: String,
    },
    /// An IPv6 CIDR inside `::ffff:0:0/96`; IPv4 ranges must be written as IPv4.
    #[error("IPv4-mapped IPv6 CIDR {value:?} is not supported; write it as IPv4")]
    MappedCidr {
        /// The offending text.
        value: String,
    },
    /// An `except` entry that is not a strict subset of the block's `cidr`.
    #[error("except {except} is not a strict subset of cidr {cidr}")]
    ExceptOutsideCidr {
        /// The block's CIDR.
        cidr: Cidr,
        /// The offending except entry.
        except: Cidr,
    },
    /// An IP address string that does not parse.
    #[error("invalid IP address {value:?}")]
    InvalidIp {
        /// The offending text.
        value: String,
    },
    /// A protocol other than TCP, UDP and SCTP.
    #[error("unknown protocol {value:?} (expected TCP, UDP or SCTP)")]
    UnknownProtocol {
        /// The offending text.
        value: String,
    },
    /// A port number outside `1..=65535`.
    #[error("port {value} is out of range 1-65535")]
    PortOutOfRange {
        /// The offending number.
        value: i64,
    },
    /// `endPort` smaller than `port`.
    #[error("endPort {end_port} is smaller than port {port}")]
    EndPortBeforePort {
        /// `port`.
        port: u16,
        /// `endPort`.
        end_port: i64,
    },
    /// `endPort` given together with a named port or without a port.
    #[error("endPort requires a numeric port")]
    EndPortWithoutNumber,
    /// A port name that is not a valid IANA service name.
    #[error("invalid port name {value:?}")]
    InvalidPortName {
        /// The offending text.
        value: String,
    },
    /// A label selector operator other than In, NotIn, Exists, DoesNotExist.
    #[error("unknown label selector operator {value:?}")]
    UnknownOperator {
        /// The offending text.
        value: String,
    },
    /// In/NotIn without values, or Exists/DoesNotExist with values.
    #[error("operator {operator} {problem}")]
    SelectorValues {
        /// The operator.
        operator: Operator,
        /// What is wrong.
        problem: &'static str,
    },
    /// A policy type other than Ingress and Egress.
    #[error("unknown policy type {value:?} (expected Ingress or Egress)")]
    UnknownPolicyType {
        /// The offending text.
        value: String,
    },
    /// A required field is missing or empty.
    #[error("missing required field")]
    Missing,
    /// An address of the wrong family (an IPv6 address in an IPv4 EndpointSlice, ...).
    #[error("address {value} is not {expected}")]
    AddressFamily {
        /// The offending address.
        value: String,
        /// `IPv4` or `IPv6`.
        expected: &'static str,
    },
    /// A peer with `ipBlock` and a selector: "Exactly one of ipBlock or the selectors must be
    /// set".
    #[error("ipBlock may not be combined with podSelector or namespaceSelector")]
    PeerKinds,
    /// A cluster policy field that must set exactly one of several fields sets none or several.
    #[error("exactly one of {fields} must be set")]
    ExactlyOne {
        /// The alternatives.
        fields: &'static str,
    },
    /// A value outside its enumeration (tier, action, an EndpointSlice `addressType`).
    #[error("unknown value {value:?} (expected {expected})")]
    UnknownValue {
        /// The offending text.
        value: String,
        /// The allowed values.
        expected: &'static str,
    },
    /// `spec.priority` outside 0..=1000.
    #[error("priority {value} is out of range 0-1000")]
    PriorityOutOfRange {
        /// The offending number.
        value: i64,
    },
    /// A port range whose end is before its start.
    #[error("range end {end} is before start {start}")]
    RangeBackwards {
        /// `start`.
        start: i64,
        /// `end`.
        end: i64,
    },
    /// A field netpol does not enforce; the whole object is rejected rather than enforced
    /// partially (a partially enforced Deny would fail open).
    #[error("{what} is not supported")]
    Unsupported {
        /// What.
        what: &'static str,
    },
    /// A rule combines named ports with `networks` or `nodes` peers, which have no named ports.
    #[error("named ports cannot be combined with networks or nodes peers")]
    NamedPortWithNetworks,
    /// A BaselineAdminNetworkPolicy not named `default` (the API allows only the singleton).
    #[error("only one BaselineAdminNetworkPolicy, named \"default\", may exist")]
    BaselineName,
}

/// Traffic direction relative to a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic entering the pod.
    Ingress,
    /// Traffic leaving the pod.
    Egress,
}

impl Direction {
    /// Both directions, ingress first.
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    /// The kernel's direction constant (`netpol_common::DIR_*`).
    pub const fn as_u8(self) -> u8 {
        match self {
            Direction::Ingress => netpol_common::DIR_INGRESS,
            Direction::Egress => netpol_common::DIR_EGRESS,
        }
    }

    /// `"ingress"` or `"egress"`.
    pub const fn name(self) -> &'static str {
        netpol_common::direction_name(self.as_u8())
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A namespaced object name (`namespace/name`), used for pods and policies.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectRef {
    /// Builds a reference.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectRef { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Reference to a pod.
pub type PodRef = ObjectRef;
/// Reference to a (namespaced) policy.
pub type PolicyRef = ObjectRef;

/// Transport protocols a NetworkPolicy port can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Protocol {
    /// TCP (6), the API default.
    #[default]
    Tcp,
    /// UDP (17).
    Udp,
    /// SCTP (132).
    Sctp,
}

impl Protocol {
    /// IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// Parses the API spelling (`TCP`, `UDP`, `SCTP`; case-insensitive for CLI convenience).
    pub fn parse(value: &str) -> Result<Self, ModelError> {
        match value.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            _ => Err(ModelError::UnknownProtocol { value: value.to_string() }),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// A namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Name.
    pub name: String,
    /// Labels (including [`NAMESPACE_NAME_LABEL`]).
    pub labels: Labels,
    /// [`AUDIT_KEY`] is `"true"` as a label or an annotation: every pod of the namespace is an
    /// audit endpoint (`EP_FLAG_AUDIT`): its would-be policy drops pass and are counted and
    /// reported as `audit`.
    pub audit: bool,
}

/// A container port of a pod, the target of named ports.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerPort {
    /// `name`, if any.
    pub name: Option<String>,
    /// `containerPort`.
    pub port: u16,
    /// `protocol` (default TCP).
    pub protocol: Protocol,
}

/// A pod, as far as policy is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: Labels,
    /// `spec.nodeName` (`None`: not scheduled yet).
    pub node_name: Option<String>,
    /// `status.podIPs` (at most one per family in practice).
    pub ips: Vec<IpAddr>,
    /// `spec.hostNetwork`: such pods are neither policed nor selected by pod selectors.
    pub host_network: bool,
    /// Ports of all containers, the targets of named ports.
    pub container_ports: Vec<ContainerPort>,
}

impl Pod {
    /// The pod's reference.
    pub fn key(&self) -> PodRef {
        ObjectRef::new(&self.namespace, &self.name)
    }

    /// Whether NetworkPolicy applies to this pod at all, as a policed endpoint or as a peer
    /// matched by pod selectors: "podSelector ... selects particular Pods"; host-network pods share
    /// the node's address and are out of NetworkPolicy's scope, and a pod without an address
    /// can neither send nor receive.
    pub fn in_scope(&self) -> bool {
        !self.host_network && !self.ips.is_empty()
    }
}

/// `spec.policyTypes` entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyType {
    /// `Ingress`.
    Ingress,
    /// `Egress`.
    Egress,
}

/// A port of a NetworkPolicy rule: a number or an IANA name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortRef {
    /// A port number.
    Number(u16),
    /// A named container port.
    Name(String),
}

/// One `ports[]` entry of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyPort {
    /// `protocol` (default TCP).
    pub protocol: Protocol,
    /// `port`; `None` = all ports of the protocol.
    pub port: Option<PortRef>,
    /// `endPort`: with a numeric `port`, the inclusive end of a range.
    pub end_port: Option<u16>,
}

/// One `from[]`/`to[]` entry of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// `podSelector` and/or `namespaceSelector` (at least one is `Some`).
    Pods {
        /// `namespaceSelector`: `None` = the policy's own namespace, `Some({})` = all namespaces.
        namespace_selector: Option<LabelSelector>,
        /// `podSelector`: `None` = all pods of the selected namespaces.
        pod_selector: Option<LabelSelector>,
    },
    /// `ipBlock`.
    IpBlock(IpBlock),
}

/// One ingress or egress rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Rule {
    /// `from`/`to`; empty = all peers.
    pub peers: Vec<Peer>,
    /// `ports`; empty = all ports and protocols.
    pub ports: Vec<PolicyPort>,
}

/// A NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NetworkPolicy {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.podSelector` (empty = every pod of the namespace).
    pub pod_selector: LabelSelector,
    /// `spec.policyTypes` as written (`None` = omitted, see [`NetworkPolicy::affects`]).
    pub policy_types: Option<Vec<PolicyType>>,
    /// `spec.ingress` (absent and `[]` are the same: nothing allowed).
    pub ingress: Vec<Rule>,
    /// `spec.egress`.
    pub egress: Vec<Rule>,
    /// Annotation [`AUDIT_KEY`] is `"true"`: the pods this policy selects become audit endpoints.
    ///
    /// The kernel's audit flag is per endpoint, not per rule: every would-be policy drop of such a
    /// pod passes and is counted and reported as `audit`, including drops that *other* policies
    /// selecting the same pod would cause. Verdicts (what the rules allow) are unchanged.
    pub audit: bool,
}

impl NetworkPolicy {
    /// The policy's reference.
    pub fn key(&self) -> PolicyRef {
        ObjectRef::new(&self.namespace, &self.name)
    }

    /// Whether this policy isolates selected pods in `dir`.
    ///
    /// API defaulting (`SetDefaults_NetworkPolicySpec`): when `policyTypes` is empty it becomes
    /// `[Ingress]`, plus `Egress` "if len(obj.Egress) != 0" — so `egress: []` without
    /// `policyTypes` does not isolate egress.
    pub fn affects(&self, dir: Direction) -> bool {
        match &self.policy_types {
            Some(types) if !types.is_empty() => types.contains(&match dir {
                Direction::Ingress => PolicyType::Ingress,
                Direction::Egress => PolicyType::Egress,
            }),
            _ => match dir {
                Direction::Ingress => true,
                Direction::Egress => !self.egress.is_empty(),
            },
        }
    }

    /// The rules of one direction.
    pub fn rules(&self, dir: Direction) -> &[Rule] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// Everything the compiler looks at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterState {
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Pods by `namespace/name`.
    pub pods: BTreeMap<PodRef, Pod>,
    /// NetworkPolicies by `namespace/name`.
    pub policies: BTreeMap<PolicyRef, NetworkPolicy>,
    /// Services by `namespace/name`: their addresses decide pod egress to them
    /// (`compile::services`).
    pub services: BTreeMap<ServiceRef, Service>,
    /// EndpointSlices by `namespace/name`: the Services' backends.
    pub endpoint_slices: BTreeMap<ObjectRef, EndpointSlice>,
    /// Cluster-scoped policies (Admin and Baseline tiers) by [`ClusterPolicy::key`].
    pub cluster_policies: BTreeMap<PolicyRef, ClusterPolicy>,
}

impl ClusterState {
    /// Labels of namespace `name`. A namespace without an object (manifests that omit it) still
    /// carries the label every namespace gets from the API server, [`NAMESPACE_NAME_LABEL`].
    pub fn namespace_labels(&self, name: &str) -> Cow<'_, Labels> {
        match self.namespaces.get(name) {
            Some(ns) => Cow::Borrowed(&ns.labels),
            None => {
                Cow::Owned(Labels::from([(NAMESPACE_NAME_LABEL.to_string(), name.to_string())]))
            }
        }
    }
}
