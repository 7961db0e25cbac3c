//! k8s-openapi objects → model, with the API server's validation of the fields policy uses.

use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::{
    AddressType, Cidr, ClusterKind, ClusterPolicy, ContainerPort, EndpointPort, EndpointSlice,
    IpBlock, LabelSelector, Labels, ModelError, Namespace, NetworkPolicy, Operator, Peer, Pod,
    PolicyPort, PolicyType, PortRef, Protocol, Requirement, Rule, Service, ServicePort,
    SliceEndpoint, AUDIT_KEY, NAMESPACE_NAME_LABEL, SERVICE_NAME_LABEL,
};

/// A converted object.
pub enum Object {
    Pod(Pod),
    Namespace(Namespace),
    Policy(NetworkPolicy),
    Service(Service),
    EndpointSlice(EndpointSlice),
    Cluster(ClusterPolicy),
}

/// Why an object was not converted.
pub enum Failure {
    /// It does not match the kind's schema.
    Decode(serde_json::Error),
    /// A field fails validation.
    Invalid { field: String, source: ModelError },
}

pub(super) fn invalid(field: impl Into<String>, source: ModelError) -> Failure {
    Failure::Invalid { field: field.into(), source }
}

/// `namespace/name` (or `name` for namespaces) read leniently from raw JSON, for messages.
pub fn object_name(kind: &str, v: &serde_json::Value) -> String {
    let meta = v.get("metadata");
    let get = |k: &str| meta.and_then(|m| m.get(k)).and_then(|x| x.as_str());
    let name = get("name").unwrap_or("<unnamed>");
    if kind == "Namespace" || ClusterKind::parse(kind).is_some() {
        name.to_string()
    } else {
        format!("{}/{name}", get("namespace").unwrap_or("default"))
    }
}

pub(super) fn name_of(m: &meta::ObjectMeta) -> Result<String, Failure> {
    match m.name.as_deref() {
        Some(n) if !n.is_empty() => Ok(n.to_string()),
        _ => Err(invalid("metadata.name", ModelError::Missing)),
    }
}

fn namespace_of(m: &meta::ObjectMeta) -> String {
    m.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".to_string())
}

pub(super) fn port_number(value: i64, field: &str) -> Result<u16, Failure> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(field, ModelError::PortOutOfRange { value }))
}

pub(super) fn protocol(value: Option<&str>, field: &str) -> Result<Protocol, Failure> {
    match value {
        None => Ok(Protocol::Tcp),
        // The API accepts exactly "TCP", "UDP" and "SCTP".
        Some(v @ ("TCP" | "UDP" | "SCTP")) => Protocol::parse(v).map_err(|e| invalid(field, e)),
        Some(v) => Err(invalid(field, ModelError::UnknownProtocol { value: v.to_string() })),
    }
}

/// IANA_SVC_NAME: at most 15 characters of `a-z0-9-`, at least one letter, no leading,
/// trailing or double `-`.
pub(super) fn valid_port_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 15
        && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && n.bytes().any(|b| b.is_ascii_lowercase())
        && !n.starts_with('-')
        && !n.ends_with('-')
        && !n.contains("--")
}

/// Converts a Pod.
pub fn pod(value: serde_json::Value) -> Result<Pod, Failure> {
    let p: core::Pod = serde_json::from_value(value).map_err(Failure::Decode)?;
    let name = name_of(&p.metadata)?;
    let namespace = namespace_of(&p.metadata);
    let labels = p.metadata.labels.clone().unwrap_or_default();
    let spec = p.spec.unwrap_or_default();
    let mut container_ports = Vec::new();
    let groups =
        [("containers", Some(&spec.containers)), ("initContainers", spec.init_containers.as_ref())];
    for (group, containers) in groups {
        for (ci, c) in containers.into_iter().flatten().enumerate() {
            for (pi, cp) in c.ports.iter().flatten().enumerate() {
                let field = format!("spec.{group}[{ci}].ports[{pi}]");
                let port =
                    port_number(i64::from(cp.container_port), &format!("{field}.containerPort"))?;
                let protocol = protocol(cp.protocol.as_deref(), &format!("{field}.protocol"))?;
                container_ports.push(ContainerPort { name: cp.name.clone(), port, protocol });
            }
        }
    }
    let status = p.status.unwrap_or_default();
    // "podIPs ... If this field is specified, the 0th entry must match the podIP field."
    let raw: Vec<(String, String)> = match (&status.pod_ips, &status.pod_ip) {
        (Some(ips), _) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, x)| (format!("status.podIPs[{i}].ip"), x.ip.clone()))
            .collect(),
        (_, Some(ip)) if !ip.is_empty() => vec![("status.podIP".to_string(), ip.clone())],
        _ => Vec::new(),
    };
    let mut ips = Vec::new();
    for (field, text) in raw {
        let ip: IpAddr = text
            .parse()
            .map_err(|_| invalid(field, ModelError::InvalidIp { value: text.clone() }))?;
        let ip = ip.to_canonical();
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(Pod {
        namespace,
        name,
        labels,
        node_name: spec.node_name.filter(|n| !n.is_empty()),
        ips,
        host_network: spec.host_network.unwrap_or(false),
        container_ports,
    })
}

/// Converts a Namespace (adding the `kubernetes.io/metadata.name` label the API server sets).
pub fn namespace(value: serde_json::Value) -> Result<Namespace, Failure> {
    let n: core::Namespace = serde_json::from_value(value).map_err(Failure::Decode)?;
    let name = name_of(&n.metadata)?;
    let audit = is_true(n.metadata.labels.as_ref()) || is_true(n.metadata.annotations.as_ref());
    let mut labels: Labels = n.metadata.labels.unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
    Ok(Namespace { name, labels, audit })
}

/// Whether `map` has [`AUDIT_KEY`] set to `"true"`.
fn is_true(map: Option<&std::collections::BTreeMap<String, String>>) -> bool {
    map.and_then(|m| m.get(AUDIT_KEY)).is_some_and(|v| v == "true")
}

pub(super) fn selector(s: &meta::LabelSelector, field: &str) -> Result<LabelSelector, Failure> {
    let mut out = LabelSelector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        match_expressions: Vec::new(),
    };
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        let op =
            Operator::parse(&e.operator).map_err(|err| invalid(format!("{f}.operator"), err))?;
        let r = Requirement::new(e.key.clone(), op, e.values.clone().unwrap_or_default())
            .map_err(|err| invalid(format!("{f}.values"), err))?;
        out.match_expressions.push(r);
    }
    Ok(out)
}

fn cidr(text: &str, field: &str) -> Result<Cidr, Failure> {
    text.parse::<Cidr>().map_err(|e| invalid(field, e))
}

fn peer(p: &net::NetworkPolicyPeer, field: &str) -> Result<Peer, Failure> {
    match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
        (Some(b), None, None) => {
            let f = format!("{field}.ipBlock");
            let c = cidr(&b.cidr, &format!("{f}.cidr"))?;
            let mut except = Vec::new();
            for (i, e) in b.except.iter().flatten().enumerate() {
                let ef = format!("{f}.except[{i}]");
                let e = cidr(e, &ef)?;
                IpBlock::new(c, vec![e]).map_err(|err| invalid(&ef, err))?;
                except.push(e);
            }
            IpBlock::new(c, except).map(Peer::IpBlock).map_err(|err| invalid(f, err))
        }
        (Some(_), _, _) => Err(invalid(field, ModelError::PeerKinds)),
        (None, None, None) => Err(invalid(field, ModelError::Missing)),
        (None, ns, pods) => Ok(Peer::Pods {
            namespace_selector: ns
                .as_ref()
                .map(|s| selector(s, &format!("{field}.namespaceSelector")))
                .transpose()?,
            pod_selector: pods
                .as_ref()
                .map(|s| selector(s, &format!("{field}.podSelector")))
                .transpose()?,
        }),
    }
}

fn policy_port(p: &net::NetworkPolicyPort, field: &str) -> Result<PolicyPort, Failure> {
    let protocol = protocol(p.protocol.as_deref(), &format!("{field}.protocol"))?;
    let port = match &p.port {
        None => None,
        Some(IntOrString::Int(n)) => {
            Some(PortRef::Number(port_number(i64::from(*n), &format!("{field}.port"))?))
        }
        Some(IntOrString::String(s)) if valid_port_name(s) => Some(PortRef::Name(s.clone())),
        Some(IntOrString::String(s)) => {
            return Err(invalid(
                format!("{field}.port"),
                ModelError::InvalidPortName { value: s.clone() },
            ))
        }
    };
    let end_field = format!("{field}.endPort");
    let end_port = match (p.end_port, &port) {
        (None, _) => None,
        (Some(e), Some(PortRef::Number(n))) => {
            let e16 = port_number(i64::from(e), &end_field)?;
            if e16 < *n {
                return Err(invalid(
                    end_field,
                    ModelError::EndPortBeforePort { port: *n, end_port: i64::from(e) },
                ));
            }
            Some(e16)
        }
        (Some(_), _) => return Err(invalid(end_field, ModelError::EndPortWithoutNumber)),
    };
    Ok(PolicyPort { protocol, port, end_port })
}

fn rule(
    peers: Option<&Vec<net::NetworkPolicyPeer>>,
    ports: Option<&Vec<net::NetworkPolicyPort>>,
    field: &str,
    peer_field: &str,
) -> Result<Rule, Failure> {
    let mut r = Rule::default();
    for (i, p) in peers.into_iter().flatten().enumerate() {
        r.peers.push(peer(p, &format!("{field}.{peer_field}[{i}]"))?);
    }
    for (i, p) in ports.into_iter().flatten().enumerate() {
        r.ports.push(policy_port(p, &format!("{field}.ports[{i}]"))?);
    }
    Ok(r)
}

/// Converts a NetworkPolicy.
pub fn policy(value: serde_json::Value) -> Result<NetworkPolicy, Failure> {
    let p: net::NetworkPolicy = serde_json::from_value(value).map_err(Failure::Decode)?;
    let name = name_of(&p.metadata)?;
    let namespace = namespace_of(&p.metadata);
    let spec = p.spec.unwrap_or_default();
    let pod_selector = match &spec.pod_selector {
        Some(s) => selector(s, "spec.podSelector")?,
        None => LabelSelector::default(),
    };
    let policy_types = match &spec.policy_types {
        None => None,
        Some(types) => Some(
            types
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    "Ingress" => Ok(PolicyType::Ingress),
                    "Egress" => Ok(PolicyType::Egress),
                    _ => Err(invalid(
                        format!("spec.policyTypes[{i}]"),
                        ModelError::UnknownPolicyType { value: t.clone() },
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        ingress.push(rule(
            r.from.as_ref(),
            r.ports.as_ref(),
            &format!("spec.ingress[{i}]"),
            "from",
        )?);
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        egress.push(rule(r.to.as_ref(), r.ports.as_ref(), &format!("spec.egress[{i}]"), "to")?);
    }
    let audit = is_true(p.metadata.annotations.as_ref());
    Ok(NetworkPolicy { namespace, name, pod_selector, policy_types, ingress, egress, audit })
}

fn ip_at(text: &str, field: &str) -> Result<IpAddr, Failure> {
    text.parse::<IpAddr>()
        .map(|ip| ip.to_canonical())
        .map_err(|_| invalid(field, ModelError::InvalidIp { value: text.to_string() }))
}

/// Converts a Service: its virtual addresses and ports. `targetPort` is not read: the
/// EndpointSlices carry each backend's resolved port.
pub fn service(value: serde_json::Value) -> Result<Service, Failure> {
    let s: core::Service = serde_json::from_value(value).map_err(Failure::Decode)?;
    let name = name_of(&s.metadata)?;
    let namespace = namespace_of(&s.metadata);
    let spec = s.spec.unwrap_or_default();
    // "clusterIPs ... If this field is specified, the 0th entry must match the clusterIP field."
    let raw: Vec<(String, String)> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.clone()))
            .collect(),
        (_, Some(ip)) => vec![("spec.clusterIP".to_string(), ip.clone())],
        _ => Vec::new(),
    };
    let mut cluster_ips = Vec::new();
    for (field, text) in raw {
        // Headless ("None") and ExternalName ("") Services have no virtual address.
        if text.is_empty() || text == "None" {
            continue;
        }
        cluster_ips.push(ip_at(&text, &field)?);
    }
    let mut external_ips = Vec::new();
    for (i, text) in spec.external_ips.iter().flatten().enumerate() {
        external_ips.push(ip_at(text, &format!("spec.externalIPs[{i}]"))?);
    }
    let mut load_balancer_ips = Vec::new();
    let ingress = s.status.and_then(|st| st.load_balancer).and_then(|lb| lb.ingress);
    for (i, ing) in ingress.iter().flatten().enumerate() {
        // `ipMode: Proxy`: the load balancer proxies; kube-proxy does not DNAT the address.
        if ing.ip_mode.as_deref() == Some("Proxy") {
            continue;
        }
        if let Some(text) = ing.ip.as_deref().filter(|t| !t.is_empty()) {
            let field = format!("status.loadBalancer.ingress[{i}].ip");
            load_balancer_ips.push(ip_at(text, &field)?);
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{i}]");
        let port = port_number(i64::from(p.port), &format!("{field}.port"))?;
        let protocol = protocol(p.protocol.as_deref(), &format!("{field}.protocol"))?;
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => Some(port_number(i64::from(n), &format!("{field}.nodePort"))?),
        };
        ports.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol,
            port,
            node_port,
        });
    }
    Ok(Service { namespace, name, cluster_ips, external_ips, load_balancer_ips, ports })
}

/// Converts an EndpointSlice (discovery.k8s.io/v1). FQDN slices convert without endpoints:
/// kube-proxy ignores them.
pub fn endpoint_slice(value: serde_json::Value) -> Result<EndpointSlice, Failure> {
    let s: discovery::EndpointSlice = serde_json::from_value(value).map_err(Failure::Decode)?;
    let name = name_of(&s.metadata)?;
    let namespace = namespace_of(&s.metadata);
    let service = s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).cloned();
    let address_type = match s.address_type.as_str() {
        "IPv4" => AddressType::Ipv4,
        "IPv6" => AddressType::Ipv6,
        "FQDN" => AddressType::Fqdn,
        other => {
            return Err(invalid(
                "addressType",
                ModelError::UnknownValue {
                    value: other.to_string(),
                    expected: "IPv4, IPv6 or FQDN",
                },
            ))
        }
    };
    let mut ports = Vec::new();
    for (i, p) in s.ports.iter().flatten().enumerate() {
        let field = format!("ports[{i}]");
        // "If this is not specified, ports are not restricted": kube-proxy skips such entries.
        let Some(n) = p.port else { continue };
        let port = port_number(i64::from(n), &format!("{field}.port"))?;
        let protocol = protocol(p.protocol.as_deref(), &format!("{field}.protocol"))?;
        ports.push(EndpointPort { name: p.name.clone().unwrap_or_default(), protocol, port });
    }
    let mut endpoints = Vec::new();
    if address_type != AddressType::Fqdn {
        let (want_v6, expected) = match address_type {
            AddressType::Ipv6 => (true, "IPv6"),
            _ => (false, "IPv4"),
        };
        for (i, e) in s.endpoints.iter().flatten().enumerate() {
            let mut addresses = Vec::new();
            for (j, text) in e.addresses.iter().enumerate() {
                let field = format!("endpoints[{i}].addresses[{j}]");
                let ip = ip_at(text, &field)?;
                if ip.is_ipv6() != want_v6 {
                    return Err(invalid(
                        field,
                        ModelError::AddressFamily { value: text.to_string(), expected },
                    ));
                }
                addresses.push(ip);
            }
            let c = e.conditions.clone().unwrap_or_default();
            endpoints.push(SliceEndpoint {
                addresses,
                // "ready ... A nil value should be interpreted as "true"" (serving likewise).
                ready: c.ready.unwrap_or(true),
                serving: c.serving.unwrap_or(true),
                terminating: c.terminating.unwrap_or(false),
            });
        }
    }
    Ok(EndpointSlice { namespace, name, service, address_type, ports, endpoints })
}

#[cfg(test)]
mod tests {
    use super::valid_port_name;

    #[test]
    fn port_names() {
        for (n, ok) in [
            ("http", true),
            ("h2c", true),
            ("web-1", true),
            ("80", false),
            ("-a", false),
            ("a--b", false),
            ("HTTP", false),
            ("abcdefghijklmnop", false),
            ("", false),
        ] {
            assert_eq!(valid_port_name(n), ok, "{n}");
        }
    }
}
