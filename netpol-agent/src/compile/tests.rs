//! Table tests of the NetworkPolicy semantics, checked by querying the laid-out maps the
//! kernel's way.

use super::*;
use crate::layout::{evaluate, Layout};
use crate::model::build::*;
use crate::model::{Namespace, Operator, PolicyType, Protocol};
use netpol_common::policy::Decision;

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
const ICMP: u8 = 1;

fn opts() -> CompileOptions {
    CompileOptions {
        node_name: "node-a".into(),
        node_addrs: vec!["192.168.0.1".parse().unwrap()],
        allow_host_to_pods: true,
    }
}

/// The verdict for `dir` traffic of local pod `ns/name` with `remote`, or `None` if the pod has no
/// endpoint.
fn verdict(
    s: &ClusterState,
    o: &CompileOptions,
    pod: &str,
    dir: Direction,
    remote: &str,
    proto: u8,
    port: u16,
) -> Option<Decision> {
    let (ns, name) = pod.split_once('/').unwrap();
    let c = compile(s, o);
    let maps = Layout::new().update(&c).unwrap();
    let ep = maps.endpoints.get(&PodRef::new(ns, name))?;
    Some(evaluate(&maps, &ep.value, dir, remote.parse().unwrap(), proto, port))
}

fn allowed(
    s: &ClusterState,
    pod: &str,
    dir: Direction,
    remote: &str,
    proto: u8,
    port: u16,
) -> bool {
    verdict(s, &opts(), pod, dir, remote, proto, port).expect("endpoint").allow
}

use Direction::{Egress as E, Ingress as I};

fn base_pods() -> Vec<PodBuilder> {
    vec![
        pod("web", "prod").label("app", "web").ip("10.0.0.1").port(
            Some("http"),
            8080,
            Protocol::Tcp,
        ),
        pod("db", "prod").label("app", "db").ip("10.0.0.2").port(Some("pg"), 5432, Protocol::Tcp),
        pod("client", "dev").label("app", "client").ip("10.0.1.1").node(Some("node-b")),
        pod("mon", "ops").label("app", "mon").ip("10.0.2.1").node(Some("node-b")),
    ]
}

fn base_ns() -> Vec<Namespace> {
    vec![
        namespace("prod", &[("env", "prod")]),
        namespace("dev", &[("env", "dev")]),
        namespace("ops", &[("team", "ops")]),
    ]
}

#[test]
fn unselected_pods_are_not_isolated() {
    let s = state(base_ns(), base_pods(), vec![policy("p", "prod").select(sel(&[("app", "db")]))]);
    let d = verdict(&s, &opts(), "prod/web", I, "1.2.3.4", TCP, 80).unwrap();
    assert!(d.allow && !d.policed);
    let d = verdict(&s, &opts(), "prod/db", I, "1.2.3.4", TCP, 80).unwrap();
    assert!(!d.allow && d.policed, "empty ingress = deny all");
    assert!(allowed(&s, "prod/db", E, "1.2.3.4", TCP, 80), "egress not in default policyTypes");
}

#[test]
fn policy_types_defaulting() {
    let deny_egress_rules = policy("p", "prod").egress(rule().peer(block("10.9.0.0/16", &[])));
    let cases: [(PolicyBuilder, bool, bool); 5] = [
        // (policy, ingress isolated, egress isolated)
        (policy("p", "prod"), true, false),
        (deny_egress_rules.clone(), true, true),
        (policy("p", "prod").types(&[PolicyType::Egress]), false, true),
        (deny_egress_rules.types(&[PolicyType::Ingress]), true, false),
        (policy("p", "prod").types(&[PolicyType::Ingress, PolicyType::Egress]), true, true),
    ];
    for (p, ing, eg) in cases {
        let s = state(base_ns(), base_pods(), vec![p.clone()]);
        assert_eq!(!allowed(&s, "prod/web", I, "1.2.3.4", TCP, 80), ing, "{p:?}");
        assert_eq!(!allowed(&s, "prod/web", E, "1.2.3.4", TCP, 80), eg, "{p:?}");
    }
}

#[test]
fn empty_rule_allows_everything_incl_icmp_and_v6() {
    let s = state(base_ns(), base_pods(), vec![policy("p", "prod").ingress(rule())]);
    for (remote, proto, port) in
        [("1.2.3.4", TCP, 1), ("fd00::9", UDP, 53), ("10.0.1.1", ICMP, 0), ("8.8.8.8", SCTP, 9)]
    {
        assert!(allowed(&s, "prod/web", I, remote, proto, port), "{remote} {proto}/{port}");
    }
}

#[test]
fn ports_protocols_and_ranges() {
    let p = policy("p", "prod")
        .ingress(rule().port(port(Protocol::Tcp, 80)))
        .ingress(rule().port(proto(Protocol::Udp)))
        .ingress(rule().port(range(Protocol::Sctp, 1000, 2000)));
    let s = state(base_ns(), base_pods(), vec![p]);
    let cases = [
        (TCP, 80, true),
        (TCP, 81, false),
        (UDP, 80, true),
        (UDP, 5353, true),
        (SCTP, 1000, true),
        (SCTP, 2000, true),
        (SCTP, 2001, false),
        (TCP, 1500, false),
        (ICMP, 0, false),
    ];
    for (proto, port, want) in cases {
        assert_eq!(allowed(&s, "prod/web", I, "1.2.3.4", proto, port), want, "{proto}/{port}");
    }
}

#[test]
fn peer_selectors() {
    let pol = |peer| {
        state(
            base_ns(),
            base_pods(),
            vec![policy("p", "prod").select(sel(&[("app", "db")])).ingress(rule().peer(peer))],
        )
    };
    let cases = [
        // podSelector alone: same namespace only.
        (pods(None, Some(sel(&[("app", "web")]))), "10.0.0.1", true),
        (pods(None, Some(sel(&[("app", "client")]))), "10.0.1.1", false),
        // namespaceSelector alone: all pods of matching namespaces.
        (pods(Some(sel(&[("env", "dev")])), None), "10.0.1.1", true),
        (pods(Some(sel(&[("env", "dev")])), None), "10.0.0.1", false),
        // both: AND.
        (pods(Some(sel(&[("env", "dev")])), Some(sel(&[("app", "client")]))), "10.0.1.1", true),
        (pods(Some(sel(&[("env", "dev")])), Some(sel(&[("app", "web")]))), "10.0.1.1", false),
        // namespaceSelector {} = every namespace.
        (pods(Some(sel(&[])), Some(sel(&[("app", "mon")]))), "10.0.2.1", true),
        (pods(Some(sel(&[])), None), "1.2.3.4", false),
        // expressions
        (pods(Some(sel(&[]).expr("team", Operator::Exists, &[])), None), "10.0.2.1", true),
        (pods(Some(sel(&[]).expr("env", Operator::NotIn, &["prod"])), None), "10.0.1.1", true),
        (pods(Some(sel(&[]).expr("env", Operator::NotIn, &["prod"])), None), "10.0.2.1", true),
        (pods(Some(sel(&[]).expr("env", Operator::In, &["prod"])), None), "10.0.2.1", false),
        (pods(Some(sel(&[]).expr("team", Operator::DoesNotExist, &[])), None), "10.0.2.1", false),
        // implicit namespace name label
        (pods(Some(sel(&[("kubernetes.io/metadata.name", "ops")])), None), "10.0.2.1", true),
    ];
    for (peer, remote, want) in cases {
        let s = pol(peer.clone());
        assert_eq!(allowed(&s, "prod/db", I, remote, TCP, 80), want, "{peer:?} from {remote}");
    }
}

#[test]
fn ip_block_except_and_other_rules() {
    let p = policy("p", "prod")
        .ingress(rule().peer(block("10.0.0.0/16", &["10.0.1.0/24"])).port(port(Protocol::Tcp, 80)))
        .ingress(rule().peer(block("10.0.1.0/25", &[])).port(port(Protocol::Tcp, 443)))
        .ingress(rule().peer(block("172.16.0.0/12", &["172.16.5.0/24"])));
    let s = state(base_ns(), base_pods(), vec![p]);
    let cases = [
        ("10.0.2.9", 80, true),
        ("10.0.1.1", 80, false), // excepted
        ("10.0.1.1", 443, true), // ... but another rule allows 443 for the /25
        ("10.0.1.200", 443, false),
        ("10.0.0.2", 80, true),    // ipBlocks also match pod IPs
        ("172.16.5.5", 22, false), // excepted, nothing else
        ("172.16.6.5", 22, true),
        ("11.0.0.1", 80, false),
    ];
    for (remote, p, want) in cases {
        assert_eq!(allowed(&s, "prod/web", I, remote, TCP, p), want, "{remote}:{p}");
    }
}

#[test]
fn ipv6_and_dual_stack() {
    let ps = vec![
        pod("web", "prod").label("app", "web").ip("10.0.0.1").ip("fd00::1"),
        pod("peer", "prod").label("app", "peer").ip("10.0.0.7").ip("fd00::7"),
    ];
    let p = policy("p", "prod")
        .select(sel(&[("app", "web")]))
        .ingress(rule().peer(pods(None, Some(sel(&[("app", "peer")])))))
        .ingress(rule().peer(block("::/0", &["fd00:bad::/32"])).port(port(Protocol::Tcp, 443)));
    let s = state(base_ns(), ps, vec![p]);
    let cases = [
        ("10.0.0.7", 22, true),
        ("fd00::7", 22, true),
        ("fd00::8", 22, false),
        ("fd00::8", 443, true),
        ("fd00:bad::1", 443, false),
        ("1.2.3.4", 443, false), // ::/0 does not contain IPv4
    ];
    for (remote, p, want) in cases {
        assert_eq!(allowed(&s, "prod/web", I, remote, TCP, p), want, "{remote}:{p}");
    }
}

#[test]
fn named_ports() {
    let ps = vec![
        pod("web", "prod").label("app", "web").ip("10.0.0.1").port(
            Some("http"),
            8080,
            Protocol::Tcp,
        ),
        pod("web2", "prod").label("app", "web").ip("10.0.0.3").port(
            Some("http"),
            9090,
            Protocol::Tcp,
        ),
        pod("db", "prod")
            .label("app", "db")
            .ip("10.0.0.2")
            .port(Some("pg"), 5432, Protocol::Tcp)
            .port(Some("pg"), 5433, Protocol::Udp),
        pod("other", "dev").ip("10.0.1.2").node(Some("node-b")).port(
            Some("pg"),
            6000,
            Protocol::Tcp,
        ),
    ];
    let ing = policy("in", "prod")
        .select(sel(&[("app", "web")]))
        .ingress(rule().port(named(Protocol::Tcp, "http")));
    let eg = policy("eg", "prod")
        .select(sel(&[("app", "web")]))
        .egress(
            rule().peer(pods(None, Some(sel(&[("app", "db")])))).port(named(Protocol::Tcp, "pg")),
        )
        .egress(rule().peer(block("10.0.1.0/24", &[])).port(named(Protocol::Tcp, "pg")))
        .egress(rule().port(named(Protocol::Tcp, "nowhere")));
    let s = state(base_ns(), ps, vec![ing, eg]);
    let cases = [
        ("prod/web", I, "1.2.3.4", 8080, true), // resolved on the pod itself
        ("prod/web", I, "1.2.3.4", 9090, false),
        ("prod/web2", I, "1.2.3.4", 9090, true), // per-pod resolution
        ("prod/web2", I, "1.2.3.4", 8080, false),
        ("prod/web", E, "10.0.0.2", 5432, true), // resolved on the destination pod
        ("prod/web", E, "10.0.0.2", 5433, false), // UDP pg is not TCP pg
        ("prod/web", E, "10.0.1.2", 6000, true), // ipBlock + named port: destination pod's port
        ("prod/web", E, "10.0.1.3", 6000, false), // not a pod: name resolves nowhere
        ("prod/web", E, "10.0.0.2", 6000, false),
    ];
    for (p, dir, remote, n, want) in cases {
        assert_eq!(allowed(&s, p, dir, remote, TCP, n), want, "{p} {dir} {remote}:{n}");
    }
}

#[test]
fn host_network_unscheduled_and_no_ip_pods() {
    let ps = vec![
        pod("web", "prod").label("app", "web").ip("10.0.0.1"),
        pod("hostnet", "prod").label("app", "web").ip("192.168.0.9").host_network(),
        pod("noip", "prod").label("app", "web"),
        pod("remote", "prod").label("app", "web").ip("10.0.3.3").node(Some("node-b")),
    ];
    let p = policy("p", "prod").ingress(rule().peer(pods(None, Some(sel(&[("app", "web")])))));
    let s = state(base_ns(), ps, vec![p]);
    let c = compile(&s, &opts());
    let eps: Vec<String> = c.endpoints.keys().map(|k| k.to_string()).collect();
    assert_eq!(eps, ["prod/web"], "host-network, IP-less and remote pods get no endpoint");
    assert!(allowed(&s, "prod/web", I, "10.0.3.3", TCP, 1), "remote pod is a peer by IP");
    assert!(
        !allowed(&s, "prod/web", I, "192.168.0.9", TCP, 1),
        "host-network pods are not selected by pod selectors"
    );
}

#[test]
fn node_addresses() {
    let s = state(base_ns(), base_pods(), vec![policy("p", "prod")]);
    assert!(allowed(&s, "prod/web", I, "192.168.0.1", TCP, 80));
    let d = verdict(&s, &opts(), "prod/web", I, "192.168.0.1", TCP, 80).unwrap();
    assert_eq!(d.rule_id, HOST_RULE_ID);
    assert!(!allowed(&s, "prod/web", I, "192.168.0.2", TCP, 80));
    let off = CompileOptions { allow_host_to_pods: false, ..opts() };
    assert!(!verdict(&s, &off, "prod/web", I, "192.168.0.1", TCP, 80).unwrap().allow);
    assert!(allowed(&s, "prod/web", E, "8.8.8.8", TCP, 80), "egress is not affected");
}

#[test]
fn replicas_share_one_set() {
    fn pods_sel(app: &str) -> crate::model::Peer {
        pods(None, Some(sel(&[("app", app)])))
    }
    let mut ps: Vec<PodBuilder> = (0..1000)
        .map(|i| {
            pod(&format!("web-{i}"), "prod").label("app", "web").ip(&format!(
                "10.1.{}.{}",
                i / 200,
                i % 200 + 1
            ))
        })
        .collect();
    ps.push(pod("client", "prod").label("app", "client").ip("10.2.0.1").node(Some("node-b")));
    let p = policy("p", "prod")
        .select(sel(&[("app", "web")]))
        .ingress(rule().peer(pods_sel("client")).port(port(Protocol::Tcp, 80)))
        .egress(rule().peer(pods_sel("web")));
    let s = state(base_ns(), ps, vec![p]);
    let c = compile(&s, &opts());
    assert_eq!(c.endpoints.len(), 1000);
    assert_eq!(c.peer_sets.len(), 2, "one ingress and one egress set for all replicas");
    let maps = Layout::new().update(&c).unwrap();
    let ids: std::collections::BTreeSet<u32> =
        maps.endpoints.values().map(|e| e.value.ingress_np).collect();
    assert_eq!(ids.len(), 1);
    // ingress: client + node address; egress: 1000 replica addresses.
    assert_eq!(maps.peers.len(), 2 + 1000);
}

#[test]
fn rule_ids_map_back_to_origins() {
    let p = policy("p", "prod")
        .ingress(rule().port(port(Protocol::Tcp, 80)))
        .ingress(rule().peer(block("1.2.3.0/24", &[])));
    let s = state(base_ns(), base_pods(), vec![p]);
    let c = compile(&s, &opts());
    let d = verdict(&s, &opts(), "prod/web", I, "1.2.3.4", UDP, 9).unwrap();
    assert!(d.allow);
    let origin = &c.rules[&d.rule_id];
    assert_eq!(
        origin,
        &RuleOrigin::Policy {
            tier: Tier::NetworkPolicy,
            policy: PodRef::new("prod", "p"),
            direction: I,
            index: 1
        }
    );
    let again = compile(&s, &opts());
    assert_eq!(c.rules, again.rules, "ids are stable across recompiles");
    assert!(!c.rules.contains_key(&0));
}

#[test]
fn incremental_matches_full_for_simple_changes() {
    let s = state(
        base_ns(),
        base_pods(),
        vec![policy("p", "prod").ingress(rule().peer(pods(None, Some(sel(&[("app", "x")])))))],
    );
    let mut c = Compiler::new(s.clone(), opts());
    let relabel = pod("db", "prod").label("app", "x").ip("10.0.0.2").build();
    let touched = c.apply(Change::UpsertPod(relabel));
    assert!(touched.contains(&PodRef::new("prod", "web")));
    assert_eq!(c.compiled(), &compile(c.state(), &opts()));
    c.apply(Change::DeletePolicy(PodRef::new("prod", "p")));
    assert_eq!(c.compiled(), &compile(c.state(), &opts()));
    assert!(
        c.compiled().peer_sets.is_empty() && c.compiled().port_sets.is_empty(),
        "unreferenced sets are dropped"
    );
}

/// An egress named port resolves against every pod at the destination address: the maps see
/// addresses, and two pods can claim one for a moment (a terminating pod and the pod its
/// address went to). A pod the rule does not select therefore changes what the port resolves
/// to when it takes or leaves the address of a pod the rule selects, and the incremental
/// compiler must see that. Found by `incremental_equals_full` in a long run.
#[test]
fn a_pod_at_a_selected_peers_address_changes_its_named_ports_incrementally() {
    let eg = policy("eg", "prod").select(sel(&[("app", "web")])).egress(
        rule().peer(pods(None, Some(sel(&[("app", "db")])))).port(named(Protocol::Tcp, "metrics")),
    );
    let start = state(base_ns(), base_pods(), vec![eg]);
    let mut c = Compiler::new(start, opts());
    // Not selected (namespace dev, no app label), at db's address.
    let stale = |ip, port| {
        pod("stale", "dev").ip(ip).node(Some("node-b")).port(Some("metrics"), port, Protocol::Tcp)
    };
    let web_to_db = |c: &Compiler, port| {
        let maps = Layout::new().update(c.compiled()).unwrap();
        let ep = &maps.endpoints[&PodRef::new("prod", "web")];
        evaluate(&maps, &ep.value, E, "10.0.0.2".parse().unwrap(), TCP, port).allow
    };
    assert!(!web_to_db(&c, 9100), "db has no port named metrics");
    let changes = [
        (Change::UpsertPod(stale("10.0.0.2", 9100).build()), 9100, true),
        (Change::UpsertPod(stale("10.0.0.2", 9200).build()), 9100, false),
        (Change::UpsertPod(stale("10.0.1.9", 9200).build()), 9200, false),
        (Change::UpsertPod(stale("10.0.0.2", 9200).build()), 9200, true),
        (Change::DeletePod(PodRef::new("dev", "stale")), 9200, false),
    ];
    for (ch, port, want) in changes {
        let what = format!("{ch:?}");
        c.apply(ch);
        assert_eq!(c.compiled(), &compile(c.state(), &opts()), "after {what}");
        assert_eq!(web_to_db(&c, port), want, "web to db:{port} after {what}");
    }
}

/// The endpoint map flags of every local pod, from a full compile and from a compiler that
/// reached `s` incrementally from `from` (both must agree).
fn audit_flags(from: &ClusterState, s: &ClusterState) -> BTreeMap<String, u32> {
    let full = Layout::new().update(&compile(s, &opts())).unwrap();
    let mut inc = Compiler::new(from.clone(), opts());
    for c in crate::agent::changes(from, s) {
        inc.apply(c);
    }
    let inc = Layout::new().update(inc.compiled()).unwrap();
    let flags = |m: &crate::layout::KernelMaps| -> BTreeMap<String, u32> {
        // The audit bit; the others are the peer sets' skip bits.
        let audit = netpol_common::ep::EP_FLAG_AUDIT;
        m.endpoints.iter().map(|(k, e)| (k.to_string(), e.value.flags & audit)).collect()
    };
    assert_eq!(flags(&full), flags(&inc), "incremental and full compiles disagree");
    flags(&full)
}

#[test]
fn audit_flag_from_namespace_and_policy() {
    use netpol_common::ep::EP_FLAG_AUDIT as A;
    let audited_ns = |name: &str| Namespace { audit: true, ..namespace(name, &[]) };
    let deny_db = || policy("deny-db", "prod").select(sel(&[("app", "db")]));
    let plain = state(base_ns(), base_pods(), vec![deny_db()]);
    let cases: [(&str, ClusterState, u32, u32); 5] = [
        ("no audit anywhere", plain.clone(), 0, 0),
        (
            "namespace audit: every pod of it",
            state(vec![audited_ns("prod")], base_pods(), vec![deny_db()]),
            A,
            A,
        ),
        (
            "another namespace in audit",
            state(vec![audited_ns("dev")], base_pods(), vec![deny_db()]),
            0,
            0,
        ),
        (
            "policy audit: only the pods it selects",
            state(base_ns(), base_pods(), vec![deny_db().audit(true)]),
            0,
            A,
        ),
        (
            "audit policy selecting nothing here",
            state(base_ns(), base_pods(), vec![deny_db(), policy("a", "dev").audit(true)]),
            0,
            0,
        ),
    ];
    for (what, s, web, db) in cases {
        for from in [&plain, &ClusterState::default()] {
            let flags = audit_flags(from, &s);
            assert_eq!((flags["prod/web"], flags["prod/db"]), (web, db), "{what}");
            // Turning audit off again clears the flag (incrementally too).
            let off = audit_flags(&s, &plain);
            assert_eq!((off["prod/web"], off["prod/db"]), (0, 0), "{what}: removed");
        }
        // Audit changes the flag only, never what the rules allow.
        assert_eq!(
            allowed(&s, "prod/db", I, "1.2.3.4", TCP, 80),
            allowed(&plain, "prod/db", I, "1.2.3.4", TCP, 80),
            "{what}"
        );
    }
}

#[test]
fn audit_flag_follows_pod_labels_and_namespace_deletion() {
    use netpol_common::ep::EP_FLAG_AUDIT as A;
    let audit_db = policy("audit-db", "prod").select(sel(&[("app", "db")])).audit(true);
    let s = state(base_ns(), base_pods(), vec![audit_db.clone()]);
    // The web pod gets the db label: now selected by the audit policy.
    let mut relabelled = s.clone();
    let web = relabelled.pods.get_mut(&PodRef::new("prod", "web")).unwrap();
    web.labels.insert("app".into(), "db".into());
    assert_eq!(audit_flags(&s, &relabelled)["prod/web"], A);
    // Deleting an audited namespace object ends the namespace's audit mode.
    let ns_audit =
        state(vec![Namespace { audit: true, ..namespace("prod", &[]) }], base_pods(), vec![]);
    let mut deleted = ns_audit.clone();
    deleted.namespaces.clear();
    assert_eq!(audit_flags(&ns_audit, &deleted)["prod/web"], 0);
    assert_eq!(audit_flags(&deleted, &ns_audit)["prod/web"], A);
}
