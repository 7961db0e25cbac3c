//! Property tests: the compiled maps, queried the kernel's way, must give the verdict of a
//! reference evaluator written here directly from the NetworkPolicy API reference, the
//! network-policy-api ClusterNetworkPolicy reference (Admin tier → NetworkPolicy → Baseline tier
//! → allow, lowest priority first, rule order within a policy) and, for egress to a Service
//! address, the rule "allowed iff every backend kube-proxy may pick is allowed"; the
//! incremental compiler must produce exactly what a full compile produces, change by change and
//! from a snapshot's diff; and the map updates of a long-lived layout must give every packet
//! the old verdict or the new one at each point of the dataplane's write order.
//!
//! The reference evaluator deliberately shares no code with the compiler (not even label
//! selector or CIDR matching).

use std::net::IpAddr;

use netpol_agent::compile::{compile, Change, CompileOptions, Compiler, RuleOrigin};
use netpol_agent::layout::{evaluate, KernelMaps, Layout};
use netpol_agent::model::{
    AddressType, Cidr, ClusterAction, ClusterKind, ClusterPeer, ClusterPolicy, ClusterPort,
    ClusterRule, ClusterState, ContainerPort, Direction, EndpointPort, EndpointSlice, IpBlock,
    LabelSelector, Labels, Namespace, NamespacedPods, NetworkPolicy, Operator, Peer, Pod,
    PolicyPort, PolicyType, PortRef, Protocol, Requirement, Rule, Service, ServicePort,
    SliceEndpoint, Tier, NAMESPACE_NAME_LABEL,
};
use netpol_common::policy::Decision;
use proptest::prelude::*;
use proptest::sample::select;

// ---------------------------------------------------------------------------------------------
// Generators

const NAMESPACES: [&str; 3] = ["a", "b", "c"];
const NODE: &str = "node-a";

fn labels_strategy(
    keys: &'static [(&'static str, &'static [&'static str])],
) -> impl Strategy<Value = Labels> {
    proptest::collection::vec(proptest::option::of(0usize..3), keys.len()).prop_map(move |choice| {
        keys.iter()
            .zip(choice)
            .filter_map(|((k, vals), c)| {
                c.map(|c| (k.to_string(), vals[c % vals.len()].to_string()))
            })
            .collect()
    })
}

const POD_LABELS: &[(&str, &[&str])] = &[("app", &["web", "db", "cli"]), ("tier", &["fe", "be"])];
const NS_LABELS: &[(&str, &[&str])] = &[("env", &["prod", "dev"]), ("team", &["x"])];

fn selector_strategy(
    keys: &'static [(&'static str, &'static [&'static str])],
) -> impl Strategy<Value = LabelSelector> {
    let expr = (0..keys.len(), 0..4u8, 0usize..3).prop_map(move |(k, op, v)| {
        let (key, vals) = keys[k];
        let values = vec![vals[v % vals.len()].to_string()];
        match op {
            0 => Requirement { key: key.into(), operator: Operator::In, values },
            1 => Requirement { key: key.into(), operator: Operator::NotIn, values },
            2 => Requirement { key: key.into(), operator: Operator::Exists, values: vec![] },
            _ => Requirement { key: key.into(), operator: Operator::DoesNotExist, values: vec![] },
        }
    });
    (labels_strategy(keys), proptest::collection::vec(expr, 0..2), any::<bool>()).prop_map(
        |(ml, me, empty)| {
            if empty {
                LabelSelector::default()
            } else {
                LabelSelector {
                    match_labels: ml.into_iter().take(1).collect(),
                    match_expressions: me,
                }
            }
        },
    )
}

const CONTAINER_PORTS: [(Option<&str>, u16, Protocol); 5] = [
    (Some("http"), 80, Protocol::Tcp),
    (Some("http"), 8080, Protocol::Tcp),
    (Some("dns"), 53, Protocol::Udp),
    (Some("s"), 1000, Protocol::Sctp),
    (None, 81, Protocol::Tcp),
];

/// Pod `i`: addresses are derived from `i` so they are unique in the cluster.
fn pod_strategy(i: usize) -> impl Strategy<Value = Pod> {
    (
        select(&NAMESPACES[..]),
        labels_strategy(POD_LABELS),
        0u8..4,  // family: none, v4, v6, dual
        0u8..4,  // subnet
        0u8..10, // node / host network
        proptest::collection::vec(0usize..CONTAINER_PORTS.len(), 0..3),
    )
        .prop_map(move |(ns, labels, fam, subnet, node, ports)| {
            let v4: IpAddr = format!("10.0.{subnet}.{}", i + 1).parse().unwrap();
            let v6: IpAddr = format!("fd00:0:0:{subnet}::{}", i + 1).parse().unwrap();
            let ips = match fam {
                0 => vec![],
                1 => vec![v4],
                2 => vec![v6],
                _ => vec![v4, v6],
            };
            let mut container_ports: Vec<ContainerPort> = ports
                .into_iter()
                .map(|p| {
                    let (name, port, protocol) = CONTAINER_PORTS[p];
                    ContainerPort { name: name.map(Into::into), port, protocol }
                })
                .collect();
            container_ports.dedup();
            Pod {
                namespace: ns.to_string(),
                name: format!("p{i}"),
                labels,
                node_name: match node {
                    0..=5 => Some(NODE.into()),
                    6 | 7 => Some("node-b".into()),
                    8 => None,
                    _ => Some(NODE.into()),
                },
                ips,
                host_network: node == 9,
                container_ports,
            }
        })
}

const BLOCKS: [(&str, &[&str]); 7] = [
    ("10.0.0.0/16", &["10.0.1.0/24", "10.0.2.0/25"]),
    ("10.0.2.0/24", &["10.0.2.0/30"]),
    ("0.0.0.0/0", &["10.0.0.0/8"]),
    ("::/0", &["fd00:0:0:1::/64"]),
    ("fd00::/48", &["fd00:0:0:2::/64", "fd00:0:0:3::/96"]),
    ("10.0.1.2/32", &[]),
    ("fd00:0:0:1::/64", &[]),
];

fn peer_strategy() -> impl Strategy<Value = Peer> {
    prop_oneof![
        (
            proptest::option::of(selector_strategy(NS_LABELS)),
            proptest::option::of(selector_strategy(POD_LABELS))
        )
            .prop_map(|(ns, pod)| match (ns, pod) {
                (None, None) => Peer::Pods {
                    namespace_selector: None,
                    pod_selector: Some(LabelSelector::default())
                },
                (n, p) => Peer::Pods { namespace_selector: n, pod_selector: p },
            }),
        (0..BLOCKS.len(), proptest::collection::vec(any::<bool>(), 2)).prop_map(|(b, keep)| {
            let (cidr, except) = BLOCKS[b];
            let except = except
                .iter()
                .zip(keep)
                .filter(|(_, k)| *k)
                .map(|(e, _)| e.parse::<Cidr>().unwrap())
                .collect();
            Peer::IpBlock(IpBlock::new(cidr.parse().unwrap(), except).unwrap())
        }),
    ]
}

fn port_strategy() -> impl Strategy<Value = PolicyPort> {
    (
        select(&[Protocol::Tcp, Protocol::Udp, Protocol::Sctp][..]),
        0u8..4,
        select(&[53u16, 80, 81, 1000][..]),
        select(&["http", "dns", "s", "none"][..]),
        proptest::option::of(0u16..30),
    )
        .prop_map(|(protocol, kind, n, name, end)| match kind {
            0 => PolicyPort { protocol, port: None, end_port: None },
            1 => PolicyPort {
                protocol,
                port: Some(PortRef::Number(n)),
                end_port: end.map(|e| n + e),
            },
            2 => PolicyPort { protocol, port: Some(PortRef::Number(n)), end_port: None },
            _ => PolicyPort { protocol, port: Some(PortRef::Name(name.into())), end_port: None },
        })
}

fn rule_strategy() -> impl Strategy<Value = Rule> {
    (
        proptest::collection::vec(peer_strategy(), 0..3),
        proptest::collection::vec(port_strategy(), 0..3),
    )
        .prop_map(|(peers, ports)| Rule { peers, ports })
}

fn policy_strategy(i: usize) -> impl Strategy<Value = NetworkPolicy> {
    (
        select(&NAMESPACES[..]),
        selector_strategy(POD_LABELS),
        0u8..5,
        proptest::collection::vec(rule_strategy(), 0..3),
        proptest::collection::vec(rule_strategy(), 0..3),
        proptest::bool::weighted(0.2),
    )
        .prop_map(move |(ns, sel, types, ingress, egress, audit)| NetworkPolicy {
            namespace: ns.into(),
            name: format!("np{i}"),
            pod_selector: sel,
            policy_types: match types {
                0 | 1 => None,
                2 => Some(vec![PolicyType::Ingress]),
                3 => Some(vec![PolicyType::Egress]),
                _ => Some(vec![PolicyType::Ingress, PolicyType::Egress]),
            },
            ingress,
            egress,
            audit,
        })
}

/// Service `i`: ClusterIP `10.96.0.i` (and `fd00:96::i`), or an external IP `192.0.2.i`
/// (covered by the `0.0.0.0/0` blocks), or headless; one or two ports, maybe a node port.
fn service_strategy(i: usize) -> impl Strategy<Value = Service> {
    (
        select(&NAMESPACES[..]),
        0u8..4, // headless, v4, dual stack, external IP
        proptest::collection::vec(
            (select(&["", "a", "b"][..]), select(&PROTOCOLS[..]), select(&[53u16, 80, 81][..])),
            1..3,
        ),
        any::<bool>(),
    )
        .prop_map(move |(ns, kind, ports, node_port)| {
            let j = i + 1;
            let (cluster_ips, external_ips): (Vec<IpAddr>, Vec<IpAddr>) = match kind {
                0 => (vec![], vec![]),
                1 => (vec![format!("10.96.0.{j}").parse().unwrap()], vec![]),
                2 => (
                    vec![
                        format!("10.96.0.{j}").parse().unwrap(),
                        format!("fd00:96::{j}").parse().unwrap(),
                    ],
                    vec![],
                ),
                _ => (vec![], vec![format!("192.0.2.{j}").parse().unwrap()]),
            };
            let mut seen = Vec::new();
            let ports = ports
                .into_iter()
                .enumerate()
                .filter(|(_, (_, proto, port))| {
                    let fresh = !seen.contains(&(*proto, *port));
                    seen.push((*proto, *port));
                    fresh
                })
                .map(|(k, (name, protocol, port))| ServicePort {
                    name: name.into(),
                    protocol,
                    port,
                    node_port: (node_port && k == 0).then_some(30000 + j as u16),
                })
                .collect();
            Service {
                namespace: ns.into(),
                name: format!("s{i}"),
                cluster_ips,
                external_ips,
                load_balancer_ips: vec![],
                ports,
            }
        })
}

const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

/// A slice of Service `s{svc}` (resolved against the generated objects in
/// [`cluster_strategy`]): (service pick, IPv6, ports as (name, protocol, target port),
/// endpoints as (address pick, ready, serving, terminating)).
type SliceSpec = (usize, bool, Vec<(&'static str, Protocol, u16)>, Vec<(usize, bool, bool, bool)>);

fn slice_strategy() -> impl Strategy<Value = SliceSpec> {
    (
        any::<usize>(),
        any::<bool>(),
        proptest::collection::vec(
            (
                select(&["", "a", "b"][..]),
                select(&PROTOCOLS[..]),
                select(&[53u16, 80, 81, 1000, 8080][..]),
            ),
            1..3,
        ),
        proptest::collection::vec(
            (any::<usize>(), proptest::bool::weighted(0.8), any::<bool>(), any::<bool>()),
            0..4,
        ),
    )
}

/// Backend addresses that are not pods: inside and outside the test's ipBlocks.
const EXTRA_BACKENDS: [&str; 4] = ["10.0.1.200", "1.2.3.4", "fd00:0:0:1::99", "2001:db8::1"];

fn slices_of(specs: Vec<SliceSpec>, services: &[Service], pods: &[Pod]) -> Vec<EndpointSlice> {
    if services.is_empty() {
        return vec![];
    }
    let mut candidates: Vec<IpAddr> = pods.iter().flat_map(|p| p.ips.iter().copied()).collect();
    candidates.extend(EXTRA_BACKENDS.iter().map(|a| a.parse::<IpAddr>().unwrap()));
    specs
        .into_iter()
        .enumerate()
        .map(|(n, (svc, v6, ports, endpoints))| {
            let svc = &services[svc % services.len()];
            let family: Vec<IpAddr> =
                candidates.iter().copied().filter(|a| a.is_ipv6() == v6).collect();
            EndpointSlice {
                namespace: svc.namespace.clone(),
                name: format!("{}-{n}", svc.name),
                service: Some(svc.name.clone()),
                address_type: if v6 { AddressType::Ipv6 } else { AddressType::Ipv4 },
                ports: ports
                    .into_iter()
                    .map(|(name, protocol, port)| EndpointPort {
                        name: name.into(),
                        protocol,
                        port,
                    })
                    .collect(),
                endpoints: endpoints
                    .into_iter()
                    .filter(|_| !family.is_empty())
                    .map(|(a, ready, serving, terminating)| SliceEndpoint {
                        addresses: vec![family[a % family.len()]],
                        ready,
                        serving,
                        terminating,
                    })
                    .collect(),
            }
        })
        .collect()
}

const NETWORKS: [&str; 5] = ["10.0.0.0/16", "10.0.1.0/24", "0.0.0.0/0", "::/0", "fd00:0:0:1::/64"];

fn cluster_rule_strategy(egress: bool) -> impl Strategy<Value = ClusterRule> {
    let peer = prop_oneof![
        (selector_strategy(NS_LABELS), selector_strategy(POD_LABELS)).prop_map(|(n, p)| {
            ClusterPeer::Pods(NamespacedPods { namespace_selector: n, pod_selector: p })
        }),
        proptest::collection::vec(select(&NETWORKS[..]), 1..3).prop_map(|n| {
            ClusterPeer::Networks(n.iter().map(|c| c.parse::<Cidr>().unwrap()).collect())
        }),
    ];
    (
        select(&[ClusterAction::Accept, ClusterAction::Deny, ClusterAction::Pass][..]),
        proptest::collection::vec(peer, 1..3),
        proptest::collection::vec(port_strategy(), 0..3),
    )
        .prop_map(move |(action, mut peers, ports)| {
            if !egress {
                peers.retain(|p| matches!(p, ClusterPeer::Pods(_)));
                if peers.is_empty() {
                    peers.push(ClusterPeer::Pods(NamespacedPods::default()));
                }
            }
            let networks = peers.iter().any(|p| matches!(p, ClusterPeer::Networks(_)));
            let ports = ports
                .into_iter()
                .filter_map(|p| match p.port {
                    // Named ports are invalid beside networks peers (CRD validation).
                    Some(PortRef::Name(n)) => (!networks).then_some(ClusterPort::Named(n)),
                    _ => Some(ClusterPort::Numeric(p)),
                })
                .collect();
            ClusterRule { name: String::new(), action, peers, ports }
        })
}

fn cluster_policy_strategy(i: usize) -> impl Strategy<Value = ClusterPolicy> {
    (
        0u8..4,
        0u32..3, // few priorities: ties are common
        selector_strategy(NS_LABELS),
        selector_strategy(POD_LABELS),
        proptest::collection::vec(cluster_rule_strategy(false), 0..3),
        proptest::collection::vec(cluster_rule_strategy(true), 0..3),
    )
        .prop_map(move |(kind, priority, ns, pods, ingress, egress)| {
            let (kind, tier, name) = match kind {
                0 => (ClusterKind::ClusterNetworkPolicy, Tier::Admin, format!("c{i}")),
                1 => (ClusterKind::ClusterNetworkPolicy, Tier::Baseline, format!("c{i}")),
                2 => (ClusterKind::AdminNetworkPolicy, Tier::Admin, format!("c{i}")),
                _ => (ClusterKind::BaselineAdminNetworkPolicy, Tier::Baseline, "default".into()),
            };
            let mut p = ClusterPolicy {
                kind,
                name,
                tier,
                priority,
                subject: NamespacedPods { namespace_selector: ns, pod_selector: pods },
                ingress,
                egress,
            };
            if kind == ClusterKind::BaselineAdminNetworkPolicy {
                p.priority = 0;
                for r in p.ingress.iter_mut().chain(p.egress.iter_mut()) {
                    if r.action == ClusterAction::Pass {
                        r.action = ClusterAction::Deny; // Allow|Deny only
                    }
                }
            }
            p
        })
}

fn cluster_strategy() -> impl Strategy<Value = ClusterState> {
    (
        cluster_np_strategy(),
        (0usize..4).prop_flat_map(|n| (0..n).map(cluster_policy_strategy).collect::<Vec<_>>()),
    )
        .prop_map(|(mut s, cps)| {
            for p in cps {
                s.cluster_policies.insert(p.key(), p);
            }
            s
        })
}

fn cluster_np_strategy() -> impl Strategy<Value = ClusterState> {
    let namespaces = proptest::collection::vec(
        (labels_strategy(NS_LABELS), any::<bool>(), proptest::bool::weighted(0.2)),
        3,
    );
    let pods = (0usize..8).prop_flat_map(|n| (0..n).map(pod_strategy).collect::<Vec<_>>());
    let policies = (0usize..5).prop_flat_map(|n| (0..n).map(policy_strategy).collect::<Vec<_>>());
    let services = (0usize..3).prop_flat_map(|n| (0..n).map(service_strategy).collect::<Vec<_>>());
    let slices = proptest::collection::vec(slice_strategy(), 0..4);
    (namespaces, pods, policies, services, slices).prop_map(
        |(nss, pods, policies, services, slices)| {
            let mut state = ClusterState::default();
            for (name, (mut labels, declared, audit)) in NAMESPACES.iter().zip(nss) {
                // Some namespaces have no object: they still carry the name label.
                if declared {
                    labels.insert(NAMESPACE_NAME_LABEL.into(), name.to_string());
                    state.namespaces.insert(
                        name.to_string(),
                        Namespace { name: name.to_string(), labels, audit },
                    );
                }
            }
            for p in policies {
                state.policies.insert(p.key(), p);
            }
            for s in slices_of(slices, &services, &pods) {
                state.endpoint_slices.insert(s.key(), s);
            }
            for p in pods {
                state.pods.insert(p.key(), p);
            }
            for s in services {
                state.services.insert(s.key(), s);
            }
            state
        },
    )
}

fn options_strategy() -> impl Strategy<Value = CompileOptions> {
    any::<bool>().prop_map(|allow| CompileOptions {
        node_name: NODE.into(),
        node_addrs: vec!["192.168.0.1".parse().unwrap(), "fd00:ffff::1".parse().unwrap()],
        allow_host_to_pods: allow,
    })
}

const EXTRA_REMOTES: [&str; 8] = [
    "10.0.1.200",
    "10.0.2.2",
    "10.0.2.77",
    "1.2.3.4",
    "fd00:0:0:1::99",
    "fd00:0:0:3::1",
    "2001:db8::1",
    "192.168.0.1",
];
const PROTOS: [u8; 4] = [6, 17, 132, 1];
const PORTS: [u16; 8] = [53, 80, 81, 1000, 1001, 1029, 8080, 0];

/// (local pod pick, direction, remote pick, protocol, port)
type Flow = (usize, bool, usize, u8, u16);

fn flows_strategy() -> impl Strategy<Value = Vec<Flow>> {
    proptest::collection::vec(
        (any::<usize>(), any::<bool>(), any::<usize>(), select(&PROTOS[..]), select(&PORTS[..])),
        24,
    )
}

// ---------------------------------------------------------------------------------------------
// Reference evaluator, straight from the API reference.

fn ref_selector(sel: &LabelSelector, labels: &Labels) -> bool {
    for (k, v) in &sel.match_labels {
        if labels.get(k) != Some(v) {
            return false;
        }
    }
    for r in &sel.match_expressions {
        let ok = match r.operator {
            Operator::In => labels.get(&r.key).map(|v| r.values.contains(v)).unwrap_or(false),
            Operator::NotIn => labels.get(&r.key).map(|v| !r.values.contains(v)).unwrap_or(true),
            Operator::Exists => labels.contains_key(&r.key),
            Operator::DoesNotExist => !labels.contains_key(&r.key),
        };
        if !ok {
            return false;
        }
    }
    true
}

fn ref_in_cidr(c: &Cidr, ip: IpAddr) -> bool {
    match (c.addr(), ip) {
        (IpAddr::V4(net), IpAddr::V4(a)) => {
            let p = u32::from(c.prefix());
            p == 0 || (u32::from(net) >> (32 - p)) == (u32::from(a) >> (32 - p))
        }
        (IpAddr::V6(net), IpAddr::V6(a)) => {
            let p = u32::from(c.prefix());
            p == 0 || (u128::from(net) >> (128 - p)) == (u128::from(a) >> (128 - p))
        }
        _ => false,
    }
}

fn ref_ns_labels(s: &ClusterState, ns: &str) -> Labels {
    s.namespaces
        .get(ns)
        .map(|n| n.labels.clone())
        .unwrap_or_else(|| Labels::from([(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())]))
}

/// The (non-host-network) pod owning `ip`, if any.
fn ref_pod_at(s: &ClusterState, ip: IpAddr) -> Option<&Pod> {
    s.pods.values().find(|p| !p.host_network && p.ips.contains(&ip))
}

fn ref_types(p: &NetworkPolicy) -> (bool, bool) {
    match &p.policy_types {
        Some(t) if !t.is_empty() => {
            (t.contains(&PolicyType::Ingress), t.contains(&PolicyType::Egress))
        }
        _ => (true, !p.egress.is_empty()),
    }
}

fn ref_peer(s: &ClusterState, policy: &NetworkPolicy, peer: &Peer, remote: IpAddr) -> bool {
    match peer {
        Peer::IpBlock(b) => {
            ref_in_cidr(&b.cidr, remote) && !b.except.iter().any(|e| ref_in_cidr(e, remote))
        }
        Peer::Pods { namespace_selector, pod_selector } => {
            let Some(pod) = ref_pod_at(s, remote) else {
                return false;
            };
            let ns_ok = match namespace_selector {
                None => pod.namespace == policy.namespace,
                Some(sel) => ref_selector(sel, &ref_ns_labels(s, &pod.namespace)),
            };
            ns_ok && pod_selector.as_ref().map(|sel| ref_selector(sel, &pod.labels)).unwrap_or(true)
        }
    }
}

fn ref_port(p: &PolicyPort, proto: u8, port: u16, target: Option<&Pod>) -> bool {
    let pnum = match p.protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    };
    if pnum != proto {
        return false;
    }
    match &p.port {
        None => true,
        Some(PortRef::Number(n)) => match p.end_port {
            None => port == *n,
            Some(e) => *n <= port && port <= e,
        },
        Some(PortRef::Name(name)) => target.is_some_and(|t| {
            t.container_ports.iter().any(|c| {
                c.name.as_deref() == Some(name) && c.protocol == p.protocol && c.port == port
            })
        }),
    }
}

/// One direction of one connection as seen by a local pod.
#[derive(Clone, Copy, Debug)]
struct Conn {
    dir: Direction,
    remote: IpAddr,
    proto: u8,
    port: u16,
}

/// Whether `rule` of `policy` allows `c` for local pod `pod`.
fn ref_rule_allows(
    s: &ClusterState,
    policy: &NetworkPolicy,
    rule: &Rule,
    pod: &Pod,
    c: Conn,
) -> bool {
    let Conn { dir, remote, proto, port } = c;
    let peer_ok =
        rule.peers.is_empty() || rule.peers.iter().any(|p| ref_peer(s, policy, p, remote));
    // Named ports: ingress → the protected pod's ports; egress → the destination pod's ports.
    let target = match dir {
        Direction::Ingress => Some(pod),
        Direction::Egress => ref_pod_at(s, remote),
    };
    let port_ok =
        rule.ports.is_empty() || rule.ports.iter().any(|p| ref_port(p, proto, port, target));
    peer_ok && port_ok
}

/// Whether cluster rule `rule` matches `c` for local pod `pod`.
fn ref_cluster_rule_matches(s: &ClusterState, rule: &ClusterRule, pod: &Pod, c: Conn) -> bool {
    let Conn { dir, remote, proto, port } = c;
    let peer_ok = rule.peers.iter().any(|p| match p {
        ClusterPeer::Pods(np) => ref_pod_at(s, remote).is_some_and(|rp| {
            ref_selector(&np.namespace_selector, &ref_ns_labels(s, &rp.namespace))
                && ref_selector(&np.pod_selector, &rp.labels)
        }),
        ClusterPeer::Networks(cs) => cs.iter().any(|c| ref_in_cidr(c, remote)),
    });
    let target = match dir {
        Direction::Ingress => Some(pod),
        Direction::Egress => ref_pod_at(s, remote),
    };
    let port_ok = rule.ports.is_empty()
        || rule.ports.iter().any(|p| match p {
            ClusterPort::Numeric(pp) => ref_port(pp, proto, port, None),
            ClusterPort::Named(n) => target.is_some_and(|t| {
                t.container_ports.iter().any(|cp| {
                    cp.name.as_deref() == Some(n.as_str())
                        && ref_port(
                            &PolicyPort {
                                protocol: cp.protocol,
                                port: Some(PortRef::Number(cp.port)),
                                end_port: None,
                            },
                            proto,
                            port,
                            None,
                        )
                })
            }),
        });
    peer_ok && port_ok
}

/// One cluster tier for `c`: (some policy of the tier selects the pod with rules in this
/// direction, the first matching rule in precedence order with its policy and index).
fn ref_tier<'a>(
    s: &'a ClusterState,
    tier: Tier,
    pod: &Pod,
    c: Conn,
) -> (bool, Option<(&'a ClusterPolicy, usize, ClusterAction)>) {
    let mut pols: Vec<&ClusterPolicy> = s
        .cluster_policies
        .values()
        .filter(|p| {
            p.tier == tier
                && !p.rules(c.dir).is_empty()
                && !pod.host_network
                && ref_selector(&p.subject.namespace_selector, &ref_ns_labels(s, &pod.namespace))
                && ref_selector(&p.subject.pod_selector, &pod.labels)
        })
        .collect();
    // Equal priorities: any order is allowed by the API; the compiler orders by reference.
    pols.sort_by_key(|p| (p.priority, p.key()));
    let hit = pols.iter().find_map(|p| {
        p.rules(c.dir)
            .iter()
            .position(|r| ref_cluster_rule_matches(s, r, pod, c))
            .map(|i| (*p, i, p.rules(c.dir)[i].action))
    });
    (!pols.is_empty(), hit)
}

/// (policed, allowed) over all tiers.
fn reference(s: &ClusterState, o: &CompileOptions, pod: &Pod, c: Conn) -> (bool, bool) {
    let (admin_sel, admin) = ref_tier(s, Tier::Admin, pod, c);
    match admin {
        Some((_, _, ClusterAction::Accept)) => return (true, true),
        Some((_, _, ClusterAction::Deny)) => return (true, false),
        _ => {}
    }
    let (np_policed, np_allowed) = reference_np(s, o, pod, c);
    if np_policed {
        return (true, np_allowed);
    }
    let (base_sel, base) = ref_tier(s, Tier::Baseline, pod, c);
    let allowed = !matches!(base, Some((_, _, ClusterAction::Deny)));
    (admin_sel || base_sel, allowed)
}

/// (policed, allowed) of the NetworkPolicy tier alone.
fn reference_np(s: &ClusterState, o: &CompileOptions, pod: &Pod, c: Conn) -> (bool, bool) {
    let Conn { dir, remote, .. } = c;
    let mut policed = false;
    let mut allowed = false;
    for policy in s.policies.values() {
        if policy.namespace != pod.namespace || !ref_selector(&policy.pod_selector, &pod.labels) {
            continue;
        }
        let (ing, eg) = ref_types(policy);
        let rules = match dir {
            Direction::Ingress if ing => &policy.ingress,
            Direction::Egress if eg => &policy.egress,
            _ => continue,
        };
        policed = true;
        allowed |= rules.iter().any(|r| ref_rule_allows(s, policy, r, pod, c));
    }
    if policed
        && dir == Direction::Ingress
        && o.allow_host_to_pods
        && o.node_addrs.contains(&remote)
    {
        allowed = true;
    }
    (policed, !policed || allowed)
}

/// The backends of every Service destination `(remote, proto, port)` matches (a Service
/// address at a Service port, or a node address at a node port), written from kube-proxy's
/// behaviour: the ready endpoints of the slices of the address's family whose port has the
/// Service port's name and protocol, at that slice port; serving terminating endpoints only when
/// none is ready. `None` if no Service has this destination.
fn ref_service_backends(
    s: &ClusterState,
    o: &CompileOptions,
    remote: IpAddr,
    proto: u8,
    port: u16,
) -> Option<Vec<(IpAddr, u16)>> {
    let mut found = false;
    let mut out = Vec::new();
    for svc in s.services.values() {
        for sp in &svc.ports {
            let pnum = match sp.protocol {
                Protocol::Tcp => 6,
                Protocol::Udp => 17,
                Protocol::Sctp => 132,
            };
            if pnum != proto {
                continue;
            }
            let vip = svc
                .cluster_ips
                .iter()
                .chain(&svc.external_ips)
                .chain(&svc.load_balancer_ips)
                .any(|a| *a == remote)
                && sp.port == port;
            let node = o.node_addrs.contains(&remote) && sp.node_port == Some(port);
            if !vip && !node {
                continue;
            }
            found = true;
            let (mut ready, mut draining) = (Vec::new(), Vec::new());
            for slice in s.endpoint_slices.values() {
                let family_ok = match slice.address_type {
                    AddressType::Ipv4 => remote.is_ipv4(),
                    AddressType::Ipv6 => remote.is_ipv6(),
                    AddressType::Fqdn => false,
                };
                if slice.namespace != svc.namespace
                    || slice.service.as_deref() != Some(svc.name.as_str())
                    || !family_ok
                {
                    continue;
                }
                for ep_port in &slice.ports {
                    if ep_port.name != sp.name || ep_port.protocol != sp.protocol {
                        continue;
                    }
                    for ep in &slice.endpoints {
                        for a in &ep.addresses {
                            if ep.ready {
                                ready.push((*a, ep_port.port));
                            } else if ep.serving && ep.terminating {
                                draining.push((*a, ep_port.port));
                            }
                        }
                    }
                }
            }
            out.extend(if ready.is_empty() { draining } else { ready });
        }
    }
    found.then_some(out)
}

/// (policed, allowed), Services included: a pod whose egress is policed may open a connection
/// to a Service destination iff its egress policy allows every backend.
fn reference_with_services(
    s: &ClusterState,
    o: &CompileOptions,
    pod: &Pod,
    c: Conn,
) -> (bool, bool) {
    let (policed, allowed) = reference(s, o, pod, c);
    if c.dir != Direction::Egress || !policed {
        return (policed, allowed);
    }
    match ref_service_backends(s, o, c.remote, c.proto, c.port) {
        Some(backends) => (
            true,
            backends
                .iter()
                .all(|&(remote, port)| reference(s, o, pod, Conn { remote, port, ..c }).1),
        ),
        None => (policed, allowed),
    }
}

// ---------------------------------------------------------------------------------------------
// Properties

fn check_cluster(
    s: &ClusterState,
    o: &CompileOptions,
    flows: &[Flow],
) -> Result<(), TestCaseError> {
    let compiled = compile(s, o);
    let maps = Layout::new().update(&compiled).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let local: Vec<&Pod> = s
        .pods
        .values()
        .filter(|p| !p.host_network && !p.ips.is_empty() && p.node_name.as_deref() == Some(NODE))
        .collect();
    let have: Vec<String> = maps.endpoints.keys().map(|k| k.to_string()).collect();
    let want: Vec<String> = local.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect();
    prop_assert_eq!(have, want);
    if local.is_empty() {
        return Ok(());
    }
    let mut remotes: Vec<IpAddr> = s.pods.values().flat_map(|p| p.ips.iter().copied()).collect();
    remotes.extend(EXTRA_REMOTES.iter().map(|r| r.parse::<IpAddr>().unwrap()));
    remotes.extend(o.node_addrs.iter().copied());
    for svc in s.services.values() {
        remotes.extend(svc.cluster_ips.iter().chain(&svc.external_ips).copied());
    }
    let svc_ports: Vec<u16> = s
        .services
        .values()
        .flat_map(|svc| svc.ports.iter().flat_map(|p| [Some(p.port), p.node_port]))
        .flatten()
        .collect();
    for &(pi, egress, ri, proto, port) in flows {
        let pod = local[pi % local.len()];
        let dir = if egress { Direction::Egress } else { Direction::Ingress };
        let remote = remotes[ri % remotes.len()];
        // Every other flow aims at a Service port, when there are any.
        let port = match (ri % 2, svc_ports.is_empty()) {
            (0, false) => svc_ports[pi % svc_ports.len()],
            _ => port,
        };
        let port = if proto == 1 { 0 } else { port };
        let ep = &maps.endpoints[&pod.key()].value;
        let got = evaluate(&maps, ep, dir, remote, proto, port);
        let conn = Conn { dir, remote, proto, port };
        let (policed, allowed) = reference_with_services(s, o, pod, conn);
        let ctx = format!("pod {} {dir} remote {remote} proto {proto} port {port}", pod.key());
        prop_assert_eq!(got.allow, allowed, "verdict: {}", ctx);
        prop_assert_eq!(got.policed, policed, "policed: {}", ctx);
        if got.rule_id == netpol_common::policy::RULE_NONE {
            // No rule decided: a NetworkPolicy default deny, or no rule of any tier matched.
            prop_assert!(!got.allow || !reference_np(s, o, pod, conn).0, "no rule: {}", ctx);
        } else if let Some(RuleOrigin::Policy { tier, policy, direction, index }) =
            maps.rules.get(&got.rule_id).filter(|o| {
                !matches!(
                    o,
                    RuleOrigin::Policy { tier: Tier::NetworkPolicy, .. } | RuleOrigin::NodeToPod
                )
            })
        {
            // A cluster rule decided: it matches the flow and its action is the verdict.
            prop_assert_eq!(*direction, dir);
            let p = &s.cluster_policies[policy];
            prop_assert_eq!(p.tier, *tier);
            let rule = &p.rules(dir)[*index as usize];
            prop_assert!(
                ref_cluster_rule_matches(s, rule, pod, conn),
                "rule {} does not match {}",
                policy,
                ctx
            );
            prop_assert_eq!(
                rule.action == ClusterAction::Deny,
                !got.allow,
                "action of {}: {}",
                policy,
                ctx
            );
        } else if got.allow && policed {
            // The reported rule must itself allow the flow.
            match maps.rules.get(&got.rule_id) {
                Some(RuleOrigin::NodeToPod) => {
                    prop_assert!(
                        o.allow_host_to_pods && o.node_addrs.contains(&remote),
                        "host rule: {}",
                        ctx
                    )
                }
                Some(RuleOrigin::Policy { policy, direction, index, .. }) => {
                    prop_assert_eq!(*direction, dir);
                    let p = &s.policies[policy];
                    let rule = &p.rules(dir)[*index as usize];
                    prop_assert!(
                        ref_rule_allows(s, p, rule, pod, conn),
                        "rule {} does not allow {}",
                        policy,
                        ctx
                    );
                }
                Some(RuleOrigin::Service { service, protocol, port: svc_port }) => {
                    let svc = &s.services[service];
                    let sp =
                        svc.ports.iter().find(|p| p.protocol == *protocol && p.port == *svc_port);
                    prop_assert!(sp.is_some(), "no such Service port: {}", ctx);
                    prop_assert!(
                        ref_service_backends(s, o, remote, proto, port).is_some(),
                        "not a Service destination: {}",
                        ctx
                    );
                }
                None => prop_assert!(false, "unknown rule id {}: {}", got.rule_id, ctx),
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6000, failure_persistence: None, ..ProptestConfig::default() })]

    /// 6,000 cases × 24 flows.
    #[test]
    fn compiled_maps_agree_with_reference(s in cluster_strategy(), o in options_strategy(), flows in flows_strategy()) {
        check_cluster(&s, &o, &flows)?;
    }
}

fn pick_change(s: &ClusterState, pool: &ClusterState, op: u8) -> Option<Change> {
    let n = op as usize;
    match op % 12 {
        6 => pool
            .services
            .values()
            .nth(n % pool.services.len().max(1))
            .cloned()
            .map(Change::UpsertService),
        7 => s.services.keys().nth(n % s.services.len().max(1)).cloned().map(Change::DeleteService),
        8 => pool
            .endpoint_slices
            .values()
            .nth(n % pool.endpoint_slices.len().max(1))
            .cloned()
            .map(Change::UpsertEndpointSlice),
        9 => s
            .endpoint_slices
            .keys()
            .nth(n % s.endpoint_slices.len().max(1))
            .cloned()
            .map(Change::DeleteEndpointSlice),
        10 => pool
            .cluster_policies
            .values()
            .nth(n % pool.cluster_policies.len().max(1))
            .cloned()
            .map(Change::UpsertClusterPolicy),
        11 => s
            .cluster_policies
            .keys()
            .nth(n % s.cluster_policies.len().max(1))
            .cloned()
            .map(Change::DeleteClusterPolicy),
        0 => pool.pods.values().nth(n % pool.pods.len().max(1)).cloned().map(Change::UpsertPod),
        1 => s.pods.keys().nth(n % s.pods.len().max(1)).cloned().map(Change::DeletePod),
        2 => pool
            .policies
            .values()
            .nth(n % pool.policies.len().max(1))
            .cloned()
            .map(Change::UpsertPolicy),
        3 => s.policies.keys().nth(n % s.policies.len().max(1)).cloned().map(Change::DeletePolicy),
        4 => pool
            .namespaces
            .values()
            .nth(n % pool.namespaces.len().max(1))
            .cloned()
            .map(Change::UpsertNamespace),
        _ => Some(Change::DeleteNamespace(NAMESPACES[n % NAMESPACES.len()].to_string())),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, failure_persistence: None, ..ProptestConfig::default() })]

    /// 4,000 cases: a random cluster, then up to 8 random changes (drawn from a second random
    /// cluster); after each, the incremental result equals a full compile.
    #[test]
    fn incremental_equals_full(start in cluster_strategy(), pool in cluster_strategy(), o in options_strategy(), ops in proptest::collection::vec(any::<u8>(), 1..8)) {
        let mut c = Compiler::new(start.clone(), o.clone());
        for op in ops {
            let Some(change) = pick_change(c.state(), &pool, op) else { continue };
            c.apply(change.clone());
            let full = compile(c.state(), &o);
            prop_assert_eq!(c.compiled(), &full, "after {:?}", change);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    /// 2,000 cases: the agent turns each snapshot into the changes from the previous one
    /// (`agent::changes`, in its order: policies, cluster policies, namespaces, pods, Services,
    /// slices); applied to a compiler at a random cluster, those of another random cluster
    /// reach that cluster's state and its full compile.
    #[test]
    fn snapshot_changes_reach_the_full_compile(from in cluster_strategy(), to in cluster_strategy(), o in options_strategy()) {
        let mut c = Compiler::new(from.clone(), o.clone());
        for change in netpol_agent::agent::changes(&from, &to) {
            c.apply(change);
        }
        prop_assert_eq!(c.state(), &to);
        prop_assert_eq!(c.compiled(), &compile(&to, &o));
    }
}

/// The peer and port maps the kernel holds between the writes that take it from `old` to `new`,
/// in the dataplane's order: upsert ports; upsert peers; switch endpoints; delete peers; delete
/// ports. Endpoints are `old`'s before the switch and `new`'s after it.
fn write_order(old: &KernelMaps, new: &KernelMaps) -> [KernelMaps; 3] {
    let mut ports_up =
        KernelMaps { peers: old.peers.clone(), ports: old.ports.clone(), ..KernelMaps::default() };
    ports_up.ports.extend(new.ports.iter().map(|(k, v)| (*k, *v)));
    let mut both_up = ports_up.clone();
    both_up.peers.extend(new.peers.iter().map(|(k, v)| (*k, *v)));
    let peers_gone = KernelMaps {
        peers: new.peers.clone(),
        ports: ports_up.ports.clone(),
        ..KernelMaps::default()
    };
    [ports_up, both_up, peers_gone]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    /// 2,000 cases: a random cluster, then up to 8 random changes, each compiled incrementally
    /// and laid out by one long-lived `Layout`, as the agent does. At every point of the write
    /// order a packet sees the old verdicts or the new ones, never a mix (no set changes under
    /// its id, and upserts precede the endpoint switch); and the long-lived layout's ids give
    /// the verdicts of a fresh layout's.
    #[test]
    fn map_updates_are_hitless(start in cluster_strategy(), pool in cluster_strategy(), o in options_strategy(), ops in proptest::collection::vec(any::<u8>(), 1..8), flows in flows_strategy()) {
        let mut c = Compiler::new(start.clone(), o.clone());
        let mut layout = Layout::new();
        let mut old = layout.update(c.compiled()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut remotes: Vec<IpAddr> = start.pods.values().chain(pool.pods.values()).flat_map(|p| p.ips.iter().copied()).collect();
        remotes.extend(EXTRA_REMOTES.iter().map(|r| r.parse::<IpAddr>().unwrap()));
        let verdicts = |maps: &KernelMaps, eps: &KernelMaps| -> Vec<(String, Decision)> {
            let mut out = Vec::new();
            for (pod, ep) in &eps.endpoints {
                for &(_, egress, ri, proto, port) in &flows {
                    let dir = if egress { Direction::Egress } else { Direction::Ingress };
                    let remote = remotes[ri % remotes.len()];
                    let port = if proto == 1 { 0 } else { port };
                    let d = evaluate(maps, &ep.value, dir, remote, proto, port);
                    out.push((format!("{pod} {dir:?} {remote} {proto}/{port}"), d));
                }
            }
            out
        };
        let mut before = verdicts(&old, &old);
        for op in ops {
            let Some(change) = pick_change(c.state(), &pool, op) else { continue };
            c.apply(change.clone());
            let new = layout.update(c.compiled()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let fresh = Layout::new().update(c.compiled()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let after = verdicts(&new, &new);
            prop_assert_eq!(&after, &verdicts(&fresh, &fresh), "after {:?}", change);
            let [ports_up, both_up, peers_gone] = write_order(&old, &new);
            prop_assert_eq!(&verdicts(&ports_up, &old), &before, "ports upserted, after {:?}", change);
            prop_assert_eq!(&verdicts(&both_up, &old), &before, "peers upserted, after {:?}", change);
            prop_assert_eq!(&verdicts(&both_up, &new), &after, "endpoints switched, after {:?}", change);
            prop_assert_eq!(&verdicts(&peers_gone, &new), &after, "peers deleted, after {:?}", change);
            (old, before) = (new, after);
        }
    }
}
