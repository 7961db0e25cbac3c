//! Table tests of egress to Service addresses, checked by querying the laid-out maps the
//! kernel's way.

use std::collections::BTreeMap;

use netpol_common::policy::{ACTION_ALLOW, ACTION_DENY};

use super::peers::PeerSet;
use super::ports::{PortKey, PortRule, PortSet};
use super::services::{admin_set, Destination, EgressSets};
use super::*;
use crate::layout::{evaluate, Layout};
use crate::model::build::*;
use crate::model::{key_of, Protocol};

const TCP: u8 = 6;
const UDP: u8 = 17;

fn opts() -> CompileOptions {
    CompileOptions {
        node_name: "node-a".into(),
        node_addrs: vec!["192.168.0.1".parse().unwrap()],
        allow_host_to_pods: true,
    }
}

/// `client` (local, egress policed by the policies given), web backends with a named port
/// `http` on different numbers, and a denied pod `other`.
fn cluster(egress: Vec<PolicyBuilder>) -> ClusterState {
    state(
        vec![namespace("prod", &[])],
        vec![
            pod("client", "prod").label("app", "client").ip("10.0.0.10").ip("fd00::10"),
            pod("free", "prod").label("app", "free").ip("10.0.0.11"),
            pod("web-1", "prod")
                .label("app", "web")
                .ip("10.0.1.1")
                .ip("fd00::1:1")
                .port(Some("http"), 8080, Protocol::Tcp)
                .node(Some("node-b")),
            pod("web-2", "prod")
                .label("app", "web")
                .ip("10.0.1.2")
                .port(Some("http"), 9090, Protocol::Tcp)
                .node(Some("node-b")),
            pod("other", "prod").label("app", "other").ip("10.0.2.1").node(Some("node-b")),
        ],
        egress,
    )
    .with_service(
        service("web", "prod")
            .cluster_ip("10.96.0.1")
            .cluster_ip("fd00:96::1")
            .external_ip("192.0.2.1")
            .lb_ip("198.51.100.1")
            .port("http", Protocol::Tcp, 80, Some(30080))
            .port("metrics", Protocol::Tcp, 9100, None),
    )
    .with_service(service("headless", "prod").port("http", Protocol::Tcp, 80, None))
    .with_slice(
        slice("web-a", "prod", "web")
            .port("http", Protocol::Tcp, 8080)
            .port("metrics", Protocol::Tcp, 9100)
            .endpoint("10.0.1.1", true)
            .endpoint("10.0.2.1", false),
    )
    // The named targetPort resolves to another number on web-2: its own slice.
    .with_slice(
        slice("web-b", "prod", "web").port("http", Protocol::Tcp, 9090).endpoint("10.0.1.2", true),
    )
    .with_slice(
        slice("web-v6", "prod", "web")
            .v6()
            .port("http", Protocol::Tcp, 8080)
            .endpoint("fd00::1:1", true),
    )
    .with_slice(
        slice("headless-a", "prod", "headless")
            .port("http", Protocol::Tcp, 8080)
            .endpoint("10.0.2.1", true),
    )
}

fn to_web(ports: &[u16]) -> PolicyBuilder {
    let mut r = rule().peer(pods(None, Some(sel(&[("app", "web")]))));
    for p in ports {
        r = r.port(port(Protocol::Tcp, *p));
    }
    policy("client-out", "prod")
        .select(sel(&[("app", "client")]))
        .types(&[PolicyType::Egress])
        .egress(r)
}

fn check(
    s: &ClusterState,
    o: &CompileOptions,
    pod: &str,
    remote: &str,
    proto: u8,
    port: u16,
) -> netpol_common::policy::Decision {
    let c = compile(s, o);
    let maps = Layout::new().update(&c).unwrap();
    let ep = &maps.endpoints[&PodRef::new("prod", pod)];
    evaluate(&maps, &ep.value, Direction::Egress, remote.parse().unwrap(), proto, port)
}

use crate::model::PolicyType;

#[test]
fn service_addresses_follow_their_backends() {
    // (policy, remote, proto, port, allowed)
    type Case = (&'static str, Vec<PolicyBuilder>, &'static str, u8, u16, bool);
    let cases: Vec<Case> = vec![
        (
            "port != targetPort: both backend ports allowed",
            vec![to_web(&[8080, 9090])],
            "10.96.0.1",
            TCP,
            80,
            true,
        ),
        (
            "named targetPort: one backend's number denied",
            vec![to_web(&[8080])],
            "10.96.0.1",
            TCP,
            80,
            false,
        ),
        (
            "the Service port itself is not what policy sees",
            vec![to_web(&[80])],
            "10.96.0.1",
            TCP,
            80,
            false,
        ),
        (
            "egress named port resolves per backend pod",
            vec![policy("client-out", "prod")
                .select(sel(&[("app", "client")]))
                .types(&[PolicyType::Egress])
                .egress(
                    rule()
                        .peer(pods(None, Some(sel(&[("app", "web")]))))
                        .port(named(Protocol::Tcp, "http")),
                )],
            "10.96.0.1",
            TCP,
            80,
            true,
        ),
        (
            "not-ready endpoint (other) ignored",
            vec![to_web(&[8080, 9090, 9100])],
            "10.96.0.1",
            TCP,
            9100,
            true,
        ),
        ("external IP", vec![to_web(&[8080, 9090])], "192.0.2.1", TCP, 80, true),
        ("load-balancer IP", vec![to_web(&[8080])], "198.51.100.1", TCP, 80, false),
        (
            "node port on the node's address",
            vec![to_web(&[8080, 9090])],
            "192.168.0.1",
            TCP,
            30080,
            true,
        ),
        (
            "node port denied with a backend",
            vec![to_web(&[8080])],
            "192.168.0.1",
            TCP,
            30080,
            false,
        ),
        (
            "not a Service port: plain address, no rule",
            vec![to_web(&[8080, 9090])],
            "10.96.0.1",
            TCP,
            8080,
            false,
        ),
        (
            "other protocol on the Service address",
            vec![to_web(&[8080, 9090])],
            "10.96.0.1",
            UDP,
            80,
            false,
        ),
        (
            "dual stack: v6 address uses the v6 slice only",
            vec![to_web(&[8080])],
            "fd00:96::1",
            TCP,
            80,
            true,
        ),
        (
            "an ipBlock for the Service range does not open it",
            vec![policy("client-out", "prod")
                .select(sel(&[("app", "client")]))
                .types(&[PolicyType::Egress])
                .egress(rule().peer(block("10.96.0.0/16", &[])))],
            "10.96.0.1",
            TCP,
            80,
            false,
        ),
    ];
    for (name, policies, remote, proto, port, want) in cases {
        let s = cluster(policies);
        let d = check(&s, &opts(), "client", remote, proto, port);
        assert_eq!(d.allow, want, "{name}");
        assert!(d.policed, "{name}");
    }
}

#[test]
fn verdicts_name_the_service() {
    let s = cluster(vec![to_web(&[8080])]);
    let c = compile(&s, &opts());
    let d = check(&s, &opts(), "client", "10.96.0.1", TCP, 80);
    assert!(!d.allow);
    let origin = RuleOrigin::Service {
        service: PodRef::new("prod", "web"),
        protocol: Protocol::Tcp,
        port: 80,
    };
    assert_eq!(c.rules.get(&d.rule_id), Some(&origin));
}

#[test]
fn pods_without_egress_policy_and_headless_services_are_untouched() {
    let s = cluster(vec![to_web(&[8080])]);
    let c = compile(&s, &opts());
    let free = &c.endpoints[&PodRef::new("prod", "free")];
    assert!(free.sets.is_empty(), "no tier polices free's egress: {:?}", free.sets);
    let d = check(&s, &opts(), "free", "10.96.0.1", TCP, 80);
    assert!(d.allow && !d.policed);
    // The headless Service has no address: its port 80 backend (other, denied) changes nothing;
    // the client's admin set holds entries for web's addresses only.
    let client = &c.endpoints[&PodRef::new("prod", "client")];
    let admin = &c.peer_sets[&client.sets[&(Direction::Egress, Tier::Admin)]];
    let addrs: Vec<u128> = admin.entries.keys().map(|(a, _)| *a).collect();
    let want: Vec<u128> = ["10.96.0.1", "fd00:96::1", "192.0.2.1", "198.51.100.1", "192.168.0.1"]
        .iter()
        .map(|a| key_of(a.parse().unwrap()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(addrs, want);
}

#[test]
fn backends_added_and_removed_flip_the_verdict_incrementally() {
    let s = cluster(vec![to_web(&[8080, 9090])]);
    let mut c = Compiler::new(s.clone(), opts());
    let verdict = |c: &Compiler| {
        let maps = Layout::new().update(c.compiled()).unwrap();
        let ep = &maps.endpoints[&PodRef::new("prod", "client")];
        evaluate(&maps, &ep.value, Direction::Egress, "10.96.0.1".parse().unwrap(), TCP, 80).allow
    };
    assert!(verdict(&c));
    // `other` becomes ready: the client may not reach it, so not the Service either.
    let ready = slice("web-a", "prod", "web")
        .port("http", Protocol::Tcp, 8080)
        .port("metrics", Protocol::Tcp, 9100)
        .endpoint("10.0.1.1", true)
        .endpoint("10.0.2.1", true)
        .build();
    let touched = c.apply(Change::UpsertEndpointSlice(ready));
    assert!(touched.contains(&PodRef::new("prod", "client")));
    assert!(!verdict(&c));
    assert_eq!(c.compiled(), &compile(c.state(), &opts()));
    // The slice goes: only web-2 (9090) is left, allowed.
    c.apply(Change::DeleteEndpointSlice(ObjectRef::new("prod", "web-a")));
    assert!(verdict(&c));
    assert_eq!(c.compiled(), &compile(c.state(), &opts()));
    // The Service goes: the address is a plain address again, which no rule allows.
    c.apply(Change::DeleteService(ObjectRef::new("prod", "web")));
    assert!(!verdict(&c));
    assert_eq!(c.compiled(), &compile(c.state(), &opts()));
    let client = &c.compiled().endpoints[&PodRef::new("prod", "client")];
    assert!(!client.sets.contains_key(&(Direction::Egress, Tier::Admin)));
}

use crate::model::ObjectRef;

/// An Admin-tier prefix covering a Service address keeps deciding the address's other ports
/// (LPM shadowing), and the Service entry decides its own port.
#[test]
fn service_entries_carry_the_enclosing_admin_prefix() {
    let mut base_ports = PortSet::default();
    base_ports
        .entries
        .insert(PortKey::new(40, TCP, 0), PortRule { rule_id: 7, action: ACTION_DENY });
    base_ports
        .entries
        .insert(PortKey::new(56, UDP, 53), PortRule { rule_id: 8, action: ACTION_ALLOW });
    let ph = base_ports.content_hash();
    let port_sets: BTreeMap<u64, PortSet> = BTreeMap::from([(ph, base_ports)]);
    let mut admin = PeerSet::default();
    admin.entries.insert("10.96.0.0/16".parse::<crate::model::Cidr>().unwrap().key(), ph);
    let mut np = PeerSet::default();
    let allow_all = PortSet { entries: BTreeMap::from([(PortKey::ANY, PortRule::allow(3))]) };
    let ah = allow_all.content_hash();
    np.entries.insert((key_of("10.0.1.1".parse().unwrap()), 128), ah);
    let mut all_ports = port_sets.clone();
    all_ports.insert(ah, allow_all);
    let resolve = |h: u64| all_ports.get(&h);
    let sets = EgressSets::new([Some(&admin), Some(&np), None], &resolve);
    // The backend itself is allowed by the NetworkPolicy tier.
    assert!(sets.decide(key_of("10.0.1.1".parse().unwrap()), TCP, 8080).allow);
    let vip = key_of("10.96.0.1".parse().unwrap());
    let dests = [Destination {
        addr: vip,
        proto: TCP,
        port: 80,
        rule_id: 42,
        backends: vec![(key_of("10.0.1.1".parse().unwrap()), 8080)],
    }];
    let mut out_ports = all_ports.clone();
    let merged = admin_set(&sets, &dests, &mut out_ports).unwrap();
    let resolve = |h: u64| out_ports.get(&h);
    let after = EgressSets::new([Some(&merged), Some(&np), None], &resolve);
    let d = after.decide(vip, TCP, 80);
    assert!(d.allow && d.rule_id == 42, "{d:?}");
    let d = after.decide(vip, TCP, 81);
    assert!(!d.allow && d.rule_id == 7, "other TCP ports: the /16's deny: {d:?}");
    let d = after.decide(vip, UDP, 53);
    assert!(d.allow && d.rule_id == 8, "{d:?}");
    let d = after.decide(key_of("10.96.0.2".parse().unwrap()), TCP, 80);
    assert!(!d.allow && d.rule_id == 7, "other addresses unchanged: {d:?}");
}

/// The case the property test `compiled_maps_agree_with_reference` found: a slice listing the
/// Service port's name twice (8080, then 1000). Only the first was a backend, so egress that
/// allows 8080 reached the node port, which kube-proxy may send to 1000.
#[test]
fn a_slice_listing_a_port_name_twice_is_allowed_only_if_both_ports_are() {
    let with_twice = |s: ClusterState| {
        s.with_slice(
            slice("web-twice", "prod", "web")
                .port("http", Protocol::Tcp, 8080)
                .port("http", Protocol::Tcp, 1000)
                .endpoint("10.0.1.1", true),
        )
    };
    let o = opts();
    let s = with_twice(cluster(vec![to_web(&[8080, 9090])]));
    assert!(!check(&s, &o, "client", "192.168.0.1", TCP, 30080).allow, "port 1000 is not allowed");
    assert!(!check(&s, &o, "client", "10.96.0.1", TCP, 80).allow);
    let s = with_twice(cluster(vec![to_web(&[8080, 9090, 1000])]));
    assert!(check(&s, &o, "client", "192.168.0.1", TCP, 30080).allow);
}
