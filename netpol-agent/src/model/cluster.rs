//! Cluster-scoped policies of the network-policy-api project: `ClusterNetworkPolicy`
//! (policy.networking.k8s.io/v1alpha2, Admin or Baseline tier) and the legacy v1alpha1
//! `AdminNetworkPolicy` (Admin tier) and `BaselineAdminNetworkPolicy` (Baseline tier), all three
//! in one shape.
//!
//! Evaluation order (`ClusterNetworkPolicySpec.tier`): Admin tier → NetworkPolicy → Baseline tier
//! → allow. Within a tier the rule of the policy with the lowest `priority` decides; within one
//! policy the first matching rule of the direction decides.

use std::fmt;

use super::{Cidr, Direction, LabelSelector, Labels, ObjectRef, PolicyPort, Tier};

/// The API kind a cluster policy was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClusterKind {
    /// policy.networking.k8s.io/v1alpha2 `ClusterNetworkPolicy`.
    ClusterNetworkPolicy,
    /// policy.networking.k8s.io/v1alpha1 `AdminNetworkPolicy` (Admin tier).
    AdminNetworkPolicy,
    /// policy.networking.k8s.io/v1alpha1 `BaselineAdminNetworkPolicy` (Baseline tier, the
    /// singleton `default`).
    BaselineAdminNetworkPolicy,
}

impl ClusterKind {
    /// Every kind.
    pub const ALL: [ClusterKind; 3] = [
        ClusterKind::ClusterNetworkPolicy,
        ClusterKind::AdminNetworkPolicy,
        ClusterKind::BaselineAdminNetworkPolicy,
    ];

    /// The API kind.
    pub const fn as_str(self) -> &'static str {
        match self {
            ClusterKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            ClusterKind::AdminNetworkPolicy => "AdminNetworkPolicy",
            ClusterKind::BaselineAdminNetworkPolicy => "BaselineAdminNetworkPolicy",
        }
    }

    /// Parses an API kind.
    pub fn parse(kind: &str) -> Option<Self> {
        ClusterKind::ALL.into_iter().find(|k| k.as_str() == kind)
    }
}

impl fmt::Display for ClusterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClusterAction {
    /// `Accept` (v1alpha1: `Allow`): allowed, no lower rule or tier is consulted.
    Accept,
    /// `Deny`: dropped, no lower rule or tier is consulted.
    Deny,
    /// `Pass`: lower rules of this tier are skipped, the next tier decides.
    Pass,
}

impl ClusterAction {
    /// The kernel's `ACTION_*` value.
    pub const fn kernel(self) -> u8 {
        use netpol_common::policy::{ACTION_ALLOW, ACTION_DENY, ACTION_PASS};
        match self {
            ClusterAction::Accept => ACTION_ALLOW,
            ClusterAction::Deny => ACTION_DENY,
            ClusterAction::Pass => ACTION_PASS,
        }
    }
}

impl fmt::Display for ClusterAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A set of pods: those matching `pod_selector` in the namespaces matching `namespace_selector`
/// (`subject.namespaces` and `namespaces` peers have an empty pod selector). Host-network pods
/// are never included.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NamespacedPods {
    /// Namespace labels (empty: every namespace).
    pub namespace_selector: LabelSelector,
    /// Pod labels (empty: every pod).
    pub pod_selector: LabelSelector,
}

impl NamespacedPods {
    /// Whether a pod with `labels` in a namespace with `ns_labels` belongs to the set.
    pub fn matches(&self, ns_labels: &Labels, labels: &Labels) -> bool {
        self.namespace_selector.matches(ns_labels) && self.pod_selector.matches(labels)
    }
}

/// One `from[]`/`to[]` entry of a cluster policy rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClusterPeer {
    /// `namespaces` or `pods`.
    Pods(NamespacedPods),
    /// `networks` (egress only): address ranges, cluster-internal ones included.
    Networks(Vec<Cidr>),
}

/// One `ports[]` (v1alpha1) or `protocols[]` (v1alpha2) entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClusterPort {
    /// A protocol with a number, a range (`end_port`) or every port (`port: None`).
    Numeric(PolicyPort),
    /// A container port name of the destination pod, with that container port's protocol.
    Named(String),
}

/// One ingress or egress rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterRule {
    /// `name` (may be empty).
    pub name: String,
    /// `action`.
    pub action: ClusterAction,
    /// `from`/`to` (at least one).
    pub peers: Vec<ClusterPeer>,
    /// Ports; empty = every protocol and port.
    pub ports: Vec<ClusterPort>,
}

/// A ClusterNetworkPolicy, AdminNetworkPolicy or BaselineAdminNetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterPolicy {
    /// The kind it was read from.
    pub kind: ClusterKind,
    /// `metadata.name`.
    pub name: String,
    /// [`Tier::Admin`] or [`Tier::Baseline`].
    pub tier: Tier,
    /// `spec.priority` (0..=1000, lower first); 0 for BaselineAdminNetworkPolicy.
    pub priority: u32,
    /// `spec.subject`.
    pub subject: NamespacedPods,
    /// `spec.ingress` in precedence order. "CNPs with no ingress rules do not affect ingress
    /// traffic."
    pub ingress: Vec<ClusterRule>,
    /// `spec.egress` in precedence order.
    pub egress: Vec<ClusterRule>,
}

impl ClusterPolicy {
    /// The policy's reference. Cluster policies have no namespace; the reference carries the
    /// kind in its namespace part, so it prints as `ClusterNetworkPolicy/name` and never equals a
    /// NetworkPolicy's (namespace names are lowercase DNS labels).
    pub fn key(&self) -> ObjectRef {
        cluster_ref(self.kind, &self.name)
    }

    /// The rules of one direction.
    pub fn rules(&self, dir: Direction) -> &[ClusterRule] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// The reference of cluster policy `name` of `kind` (see [`ClusterPolicy::key`]).
pub fn cluster_ref(kind: ClusterKind, name: &str) -> ObjectRef {
    ObjectRef::new(kind.as_str(), name)
}

/// Whether `r` is a cluster policy's reference.
pub fn is_cluster_ref(r: &ObjectRef) -> bool {
    ClusterKind::parse(&r.namespace).is_some()
}
