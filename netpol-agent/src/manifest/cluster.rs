//! The network-policy-api kinds (no k8s-openapi types exist for them): serde types as the API
//! defines them (`apis/v1alpha2/clusternetworkpolicy_types.go`, `apis/v1alpha1/*_types.go` of
//! kubernetes-sigs/network-policy-api) and their conversion to [`ClusterPolicy`] with the CRDs'
//! validation. An object that fails validation is rejected as a whole, with the field named: a
//! policy enforced without one of its rules could fail open.

use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use serde::Deserialize;

use super::convert::{invalid, name_of, port_number, protocol, selector, valid_port_name, Failure};
use crate::model::{
    Cidr, ClusterAction, ClusterKind, ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule,
    Direction, LabelSelector, ModelError, NamespacedPods, PolicyPort, PortRef, Protocol, Tier,
};

/// The three kinds share one envelope; fields of other kinds or versions are ignored here and
/// rejected in [`cluster_policy`] when they matter.
#[derive(Deserialize)]
struct Object {
    #[serde(default)]
    metadata: meta::ObjectMeta,
    spec: Option<Spec>,
}

#[derive(Deserialize, Default)]
struct Spec {
    tier: Option<String>,
    priority: Option<i64>,
    subject: Option<Subject>,
    #[serde(default)]
    ingress: Vec<RawRule>,
    #[serde(default)]
    egress: Vec<RawRule>,
}

/// `ClusterNetworkPolicySubject` / `AdminNetworkPolicySubject`, and also the ingress and egress
/// peer types (a superset: `nodes`, `networks`, `domainNames` exist only on egress peers).
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Subject {
    namespaces: Option<meta::LabelSelector>,
    pods: Option<NamespacedPod>,
    nodes: Option<meta::LabelSelector>,
    networks: Option<Vec<String>>,
    domain_names: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NamespacedPod {
    namespace_selector: Option<meta::LabelSelector>,
    pod_selector: Option<meta::LabelSelector>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRule {
    #[serde(default)]
    name: String,
    action: Option<String>,
    from: Option<Vec<Subject>>,
    to: Option<Vec<Subject>>,
    /// v1alpha2.
    protocols: Option<Vec<ProtocolV2>>,
    /// v1alpha1.
    ports: Option<Vec<PortV1>>,
}

/// v1alpha2 `ClusterNetworkPolicyProtocol`: exactly one field.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProtocolV2 {
    tcp: Option<ProtocolPorts>,
    udp: Option<ProtocolPorts>,
    sctp: Option<ProtocolPorts>,
    destination_named_port: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ProtocolPorts {
    destination_port: Option<PortV2>,
}

/// v1alpha2 `Port`: exactly one of `number` and `range`.
#[derive(Deserialize)]
struct PortV2 {
    number: Option<i64>,
    range: Option<RangeV2>,
}

#[derive(Deserialize)]
struct RangeV2 {
    start: Option<i64>,
    end: Option<i64>,
}

/// v1alpha1 `AdminNetworkPolicyPort`: exactly one field.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PortV1 {
    port_number: Option<PortNumberV1>,
    named_port: Option<String>,
    port_range: Option<RangeV1>,
}

#[derive(Deserialize)]
struct PortNumberV1 {
    protocol: Option<String>,
    port: Option<i64>,
}

#[derive(Deserialize)]
struct RangeV1 {
    protocol: Option<String>,
    start: Option<i64>,
    end: Option<i64>,
}

fn ns_pods(p: &NamespacedPod, field: &str) -> Result<NamespacedPods, Failure> {
    let namespace_selector = match &p.namespace_selector {
        Some(s) => selector(s, &format!("{field}.namespaceSelector"))?,
        None => LabelSelector::default(),
    };
    let pod_selector = match &p.pod_selector {
        Some(s) => selector(s, &format!("{field}.podSelector"))?,
        None => return Err(invalid(format!("{field}.podSelector"), ModelError::Missing)),
    };
    Ok(NamespacedPods { namespace_selector, pod_selector })
}

fn subject(s: Option<&Subject>) -> Result<NamespacedPods, Failure> {
    let field = "spec.subject";
    let Some(s) = s else {
        return Err(invalid(field, ModelError::Missing));
    };
    match (&s.namespaces, &s.pods) {
        (Some(ns), None) => Ok(NamespacedPods {
            namespace_selector: selector(ns, &format!("{field}.namespaces"))?,
            pod_selector: LabelSelector::default(),
        }),
        (None, Some(p)) => ns_pods(p, &format!("{field}.pods")),
        _ => Err(invalid(field, ModelError::ExactlyOne { fields: "namespaces, pods" })),
    }
}

fn peer(p: &Subject, dir: Direction, field: &str) -> Result<ClusterPeer, Failure> {
    let set = [
        p.namespaces.is_some(),
        p.pods.is_some(),
        p.nodes.is_some(),
        p.networks.is_some(),
        p.domain_names.is_some(),
    ];
    let fields = match dir {
        Direction::Ingress => "namespaces, pods",
        Direction::Egress => "namespaces, pods, nodes, networks, domainNames",
    };
    if set.iter().filter(|s| **s).count() != 1 {
        return Err(invalid(field, ModelError::ExactlyOne { fields }));
    }
    if let Some(ns) = &p.namespaces {
        return Ok(ClusterPeer::Pods(NamespacedPods {
            namespace_selector: selector(ns, &format!("{field}.namespaces"))?,
            pod_selector: LabelSelector::default(),
        }));
    }
    if let Some(pods) = &p.pods {
        return ns_pods(pods, &format!("{field}.pods")).map(ClusterPeer::Pods);
    }
    if dir == Direction::Ingress {
        return Err(invalid(field, ModelError::ExactlyOne { fields }));
    }
    if p.nodes.is_some() {
        return Err(invalid(format!("{field}.nodes"), ModelError::Unsupported { what: "nodes" }));
    }
    if p.domain_names.is_some() {
        return Err(invalid(
            format!("{field}.domainNames"),
            ModelError::Unsupported { what: "domainNames" },
        ));
    }
    let networks = p.networks.as_deref().unwrap_or_default();
    if networks.is_empty() {
        return Err(invalid(format!("{field}.networks"), ModelError::Missing));
    }
    let mut cidrs = Vec::new();
    for (i, n) in networks.iter().enumerate() {
        let f = format!("{field}.networks[{i}]");
        cidrs.push(n.parse::<Cidr>().map_err(|e| invalid(f, e))?);
    }
    Ok(ClusterPeer::Networks(cidrs))
}

fn range(
    proto: Protocol,
    start: Option<i64>,
    end: Option<i64>,
    f: &str,
) -> Result<PolicyPort, Failure> {
    let s = port_number(
        start.ok_or_else(|| invalid(format!("{f}.start"), ModelError::Missing))?,
        &format!("{f}.start"),
    )?;
    let e = port_number(
        end.ok_or_else(|| invalid(format!("{f}.end"), ModelError::Missing))?,
        &format!("{f}.end"),
    )?;
    if e < s {
        return Err(invalid(
            format!("{f}.end"),
            ModelError::RangeBackwards { start: i64::from(s), end: i64::from(e) },
        ));
    }
    Ok(PolicyPort { protocol: proto, port: Some(PortRef::Number(s)), end_port: Some(e) })
}

fn named(n: &str, f: &str) -> Result<ClusterPort, Failure> {
    if valid_port_name(n) {
        Ok(ClusterPort::Named(n.to_string()))
    } else {
        Err(invalid(f, ModelError::InvalidPortName { value: n.to_string() }))
    }
}

fn protocol_v2(p: &ProtocolV2, f: &str) -> Result<ClusterPort, Failure> {
    let set =
        [p.tcp.is_some(), p.udp.is_some(), p.sctp.is_some(), p.destination_named_port.is_some()];
    if set.iter().filter(|s| **s).count() != 1 {
        return Err(invalid(
            f,
            ModelError::ExactlyOne { fields: "tcp, udp, sctp, destinationNamedPort" },
        ));
    }
    if let Some(n) = &p.destination_named_port {
        return named(n, &format!("{f}.destinationNamedPort"));
    }
    let (proto, name, ports) = match (&p.tcp, &p.udp, &p.sctp) {
        (Some(t), _, _) => (Protocol::Tcp, "tcp", t),
        (_, Some(u), _) => (Protocol::Udp, "udp", u),
        (_, _, Some(s)) => (Protocol::Sctp, "sctp", s),
        _ => unreachable!("exactly one field is set"),
    };
    let pf = format!("{f}.{name}.destinationPort");
    let port = match &ports.destination_port {
        // "If unspecified, protocol-specific attributes will not be used": every port.
        None => PolicyPort { protocol: proto, port: None, end_port: None },
        Some(PortV2 { number: Some(n), range: None }) => PolicyPort {
            protocol: proto,
            port: Some(PortRef::Number(port_number(*n, &format!("{pf}.number"))?)),
            end_port: None,
        },
        Some(PortV2 { number: None, range: Some(r) }) => {
            range(proto, r.start, r.end, &format!("{pf}.range"))?
        }
        Some(_) => return Err(invalid(pf, ModelError::ExactlyOne { fields: "number, range" })),
    };
    Ok(ClusterPort::Numeric(port))
}

fn port_v1(p: &PortV1, f: &str) -> Result<ClusterPort, Failure> {
    match (&p.port_number, &p.named_port, &p.port_range) {
        (Some(n), None, None) => {
            let nf = format!("{f}.portNumber");
            let Some(proto) = &n.protocol else {
                return Err(invalid(format!("{nf}.protocol"), ModelError::Missing));
            };
            let proto = protocol(Some(proto), &format!("{nf}.protocol"))?;
            let port = n.port.ok_or_else(|| invalid(format!("{nf}.port"), ModelError::Missing))?;
            let port = port_number(port, &format!("{nf}.port"))?;
            Ok(ClusterPort::Numeric(PolicyPort {
                protocol: proto,
                port: Some(PortRef::Number(port)),
                end_port: None,
            }))
        }
        (None, Some(n), None) => named(n, &format!("{f}.namedPort")),
        (None, None, Some(r)) => {
            let rf = format!("{f}.portRange");
            let proto = protocol(r.protocol.as_deref(), &format!("{rf}.protocol"))?;
            range(proto, r.start, r.end, &rf).map(ClusterPort::Numeric)
        }
        _ => Err(invalid(f, ModelError::ExactlyOne { fields: "portNumber, namedPort, portRange" })),
    }
}

fn action(kind: ClusterKind, value: Option<&str>, f: &str) -> Result<ClusterAction, Failure> {
    let (accept, expected) = match kind {
        ClusterKind::ClusterNetworkPolicy => ("Accept", "Accept, Deny or Pass"),
        ClusterKind::AdminNetworkPolicy => ("Allow", "Allow, Deny or Pass"),
        ClusterKind::BaselineAdminNetworkPolicy => ("Allow", "Allow or Deny"),
    };
    match value {
        None => Err(invalid(f, ModelError::Missing)),
        Some(v) if v == accept => Ok(ClusterAction::Accept),
        Some("Deny") => Ok(ClusterAction::Deny),
        Some("Pass") if kind != ClusterKind::BaselineAdminNetworkPolicy => Ok(ClusterAction::Pass),
        Some(v) => Err(invalid(f, ModelError::UnknownValue { value: v.to_string(), expected })),
    }
}

fn rule(kind: ClusterKind, r: &RawRule, dir: Direction, f: &str) -> Result<ClusterRule, Failure> {
    let action = action(kind, r.action.as_deref(), &format!("{f}.action"))?;
    let (peers_name, raw_peers) = match dir {
        Direction::Ingress => ("from", &r.from),
        Direction::Egress => ("to", &r.to),
    };
    let raw_peers = raw_peers.as_deref().unwrap_or_default();
    if raw_peers.is_empty() {
        return Err(invalid(format!("{f}.{peers_name}"), ModelError::Missing));
    }
    let mut peers = Vec::new();
    for (i, p) in raw_peers.iter().enumerate() {
        peers.push(peer(p, dir, &format!("{f}.{peers_name}[{i}]"))?);
    }
    let mut ports = Vec::new();
    if kind == ClusterKind::ClusterNetworkPolicy {
        for (i, p) in r.protocols.iter().flatten().enumerate() {
            ports.push(protocol_v2(p, &format!("{f}.protocols[{i}]"))?);
        }
    } else {
        for (i, p) in r.ports.iter().flatten().enumerate() {
            ports.push(port_v1(p, &format!("{f}.ports[{i}]"))?);
        }
    }
    let has_named = ports.iter().any(|p| matches!(p, ClusterPort::Named(_)));
    if has_named && peers.iter().any(|p| matches!(p, ClusterPeer::Networks(_))) {
        return Err(invalid(f, ModelError::NamedPortWithNetworks));
    }
    Ok(ClusterRule { name: r.name.clone(), action, peers, ports })
}

/// Converts a ClusterNetworkPolicy, AdminNetworkPolicy or BaselineAdminNetworkPolicy.
pub fn cluster_policy(
    kind: ClusterKind,
    value: serde_json::Value,
) -> Result<ClusterPolicy, Failure> {
    let o: Object = serde_json::from_value(value).map_err(Failure::Decode)?;
    let name = name_of(&o.metadata)?;
    let Some(spec) = o.spec else {
        return Err(invalid("spec", ModelError::Missing));
    };
    let tier = match kind {
        ClusterKind::AdminNetworkPolicy => Tier::Admin,
        ClusterKind::BaselineAdminNetworkPolicy => Tier::Baseline,
        ClusterKind::ClusterNetworkPolicy => match spec.tier.as_deref() {
            Some("Admin") => Tier::Admin,
            Some("Baseline") => Tier::Baseline,
            Some(v) => {
                return Err(invalid(
                    "spec.tier",
                    ModelError::UnknownValue {
                        value: v.to_string(),
                        expected: "Admin or Baseline",
                    },
                ))
            }
            None => return Err(invalid("spec.tier", ModelError::Missing)),
        },
    };
    let priority = if kind == ClusterKind::BaselineAdminNetworkPolicy {
        // "Only one baseline admin network policy with metadata.name="default" can be created".
        if name != "default" {
            return Err(invalid("metadata.name", ModelError::BaselineName));
        }
        0
    } else {
        match spec.priority {
            Some(p @ 0..=1000) => p as u32,
            Some(value) => {
                return Err(invalid("spec.priority", ModelError::PriorityOutOfRange { value }))
            }
            None => return Err(invalid("spec.priority", ModelError::Missing)),
        }
    };
    let subject = subject(spec.subject.as_ref())?;
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().enumerate() {
        ingress.push(rule(kind, r, Direction::Ingress, &format!("spec.ingress[{i}]"))?);
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().enumerate() {
        egress.push(rule(kind, r, Direction::Egress, &format!("spec.egress[{i}]"))?);
    }
    Ok(ClusterPolicy { kind, name, tier, priority, subject, ingress, egress })
}
