//! Table tests of the Admin and Baseline tiers (ClusterNetworkPolicy, AdminNetworkPolicy,
//! BaselineAdminNetworkPolicy) together with NetworkPolicy, checked by querying the laid-out maps
//! the kernel's way (`layout::evaluate`, which runs `netpol_common::policy::decide`).

use super::*;
use crate::layout::{evaluate, Layout};
use crate::model::build::*;
use crate::model::{
    cluster_ref, ClusterAction, ClusterKind, ClusterRule, ClusterState, Operator, PolicyType,
    Protocol, Tier,
};
use netpol_common::policy::Decision;

use ClusterAction::{Accept, Deny, Pass};
use Direction::{Egress as E, Ingress as I};

const TCP: u8 = 6;
const UDP: u8 = 17;

const WEB: &str = "10.0.0.1";
const DB: &str = "10.0.0.2";
const CLI: &str = "10.0.1.1";
const DNS: &str = "10.0.2.53";

fn base() -> ClusterState {
    state(
        vec![
            namespace("prod", &[("env", "prod")]),
            namespace("dev", &[("env", "dev")]),
            namespace("kube-system", &[]),
        ],
        vec![
            pod("web", "prod").label("app", "web").ip(WEB).port(Some("http"), 8080, Protocol::Tcp),
            pod("db", "prod").label("app", "db").ip(DB).port(Some("pg"), 5432, Protocol::Tcp),
            pod("cli", "dev").label("app", "cli").ip(CLI),
            pod("dns", "kube-system")
                .label("k8s-app", "kube-dns")
                .ip(DNS)
                .port(Some("dns"), 53, Protocol::Udp)
                .port(Some("dns-tcp"), 53, Protocol::Tcp),
        ],
        vec![],
    )
}

fn decide_for(
    s: &ClusterState,
    pod: &str,
    dir: Direction,
    remote: &str,
    proto: u8,
    port: u16,
) -> Decision {
    let (ns, name) = pod.split_once('/').unwrap();
    let c = compile(s, &CompileOptions::new("node-a"));
    let maps = Layout::new().update(&c).unwrap();
    let ep = &maps.endpoints[&PodRef::new(ns, name)];
    evaluate(&maps, &ep.value, dir, remote.parse().unwrap(), proto, port)
}

fn allowed(
    s: &ClusterState,
    pod: &str,
    dir: Direction,
    remote: &str,
    proto: u8,
    port: u16,
) -> bool {
    decide_for(s, pod, dir, remote, proto, port).allow
}

fn ns(name: &str) -> crate::model::LabelSelector {
    sel(&[(crate::model::NAMESPACE_NAME_LABEL, name)])
}

fn any() -> crate::model::LabelSelector {
    sel(&[])
}

/// NetworkPolicy in prod: db accepts everything (ingress).
fn np_db_allow_all() -> PolicyBuilder {
    policy("db-all", "prod").select(sel(&[("app", "db")])).ingress(rule())
}

/// NetworkPolicy in prod: db accepts nothing (ingress isolation).
fn np_db_deny_all() -> PolicyBuilder {
    policy("db-none", "prod").select(sel(&[("app", "db")])).types(&[PolicyType::Ingress])
}

fn with_np(s: ClusterState, p: PolicyBuilder) -> ClusterState {
    let mut s = s;
    s.policies.insert(p.0.key(), p.0);
    s
}

#[test]
fn precedence_table() {
    let from_dev = |a| crule(a).pods(ns("dev"), any());
    let admin = |a| cnp("a", Tier::Admin, 10).ingress(from_dev(a));
    let baseline = |a| cnp("b", Tier::Baseline, 10).ingress(from_dev(a));
    // (name, state, cli → db TCP/5432 allowed?)
    let cases: Vec<(&str, ClusterState, bool)> = vec![
        ("no policy: default allow", base(), true),
        ("Admin Deny beats NP allow", with_np(base(), np_db_allow_all()).with(admin(Deny)), false),
        ("Admin Accept beats NP deny", with_np(base(), np_db_deny_all()).with(admin(Accept)), true),
        (
            "Admin Pass defers to NP allow",
            with_np(base(), np_db_allow_all()).with(admin(Pass)),
            true,
        ),
        (
            "Admin Pass defers to NP deny",
            with_np(base(), np_db_deny_all()).with(admin(Pass)),
            false,
        ),
        ("Admin Pass, no NP: Baseline Deny", base().with(admin(Pass)).with(baseline(Deny)), false),
        (
            "Admin no match, no NP: Baseline Deny",
            base()
                .with(cnp("a", Tier::Admin, 1).ingress(crule(Deny).pods(ns("kube-system"), any())))
                .with(baseline(Deny)),
            false,
        ),
        ("no NP isolation: Baseline Deny decides", base().with(baseline(Deny)), false),
        ("no NP isolation: Baseline Accept", base().with(baseline(Accept)), true),
        (
            "NP allow beats Baseline Deny",
            with_np(base(), np_db_allow_all()).with(baseline(Deny)),
            true,
        ),
        (
            "NP deny beats Baseline Accept",
            with_np(base(), np_db_deny_all()).with(baseline(Accept)),
            false,
        ),
        (
            "Admin Deny beats Baseline Accept",
            base().with(admin(Deny)).with(baseline(Accept)),
            false,
        ),
        ("Admin Accept beats Baseline Deny", base().with(admin(Accept)).with(baseline(Deny)), true),
        ("Baseline Pass: default allow", base().with(baseline(Pass)), true),
    ];
    for (name, s, want) in cases {
        assert_eq!(allowed(&s, "prod/db", I, CLI, TCP, 5432), want, "{name}");
        // The same state seen from the client's egress: no cluster egress rules, no NP egress.
        assert!(allowed(&s, "dev/cli", E, DB, TCP, 5432), "{name}: egress untouched");
        // web (prod) is not selected by the NetworkPolicies; the cluster rules still apply.
    }
}

#[test]
fn priorities_between_policies_and_rule_order_within_one() {
    let deny_dev = cnp("deny-dev", Tier::Admin, 10).ingress(crule(Deny).pods(ns("dev"), any()));
    let accept_cli = |prio| {
        cnp("accept-cli", Tier::Admin, prio)
            .ingress(crule(Accept).pods(any(), sel(&[("app", "cli")])))
    };
    let s = base().with(deny_dev.clone()).with(accept_cli(5));
    assert!(allowed(&s, "prod/web", I, CLI, TCP, 80), "priority 5 Accept before priority 10 Deny");
    let s = base().with(deny_dev).with(accept_cli(20));
    assert!(
        !allowed(&s, "prod/web", I, CLI, TCP, 80),
        "priority 10 Deny before priority 20 Accept"
    );

    // Within one policy the first matching rule decides.
    let ordered = |first: ClusterRule, second: ClusterRule| {
        base().with(cnp("p", Tier::Admin, 1).ingress(first).ingress(second))
    };
    let accept80 = crule(Accept).pods(ns("dev"), any()).port(port(Protocol::Tcp, 80));
    let deny_all = crule(Deny).pods(ns("dev"), any());
    let s = ordered(accept80.clone(), deny_all.clone());
    assert!(allowed(&s, "prod/web", I, CLI, TCP, 80));
    assert!(!allowed(&s, "prod/web", I, CLI, TCP, 81));
    let s = ordered(deny_all, accept80);
    assert!(
        !allowed(&s, "prod/web", I, CLI, TCP, 80),
        "an earlier broader Deny shadows a later port Accept"
    );
}

#[test]
fn overlapping_cidrs_with_different_priorities() {
    let s = base()
        .with(cnp("p1", Tier::Admin, 1).egress(crule(Deny).networks(&["10.0.0.0/24"])))
        .with(cnp("p2", Tier::Admin, 2).egress(crule(Accept).networks(&["10.0.0.0/16"])))
        .with(cnp("p3", Tier::Admin, 3).egress(crule(Deny).networks(&["0.0.0.0/0"])));
    assert!(!allowed(&s, "dev/cli", E, "10.0.0.5", TCP, 80));
    assert!(allowed(&s, "dev/cli", E, "10.0.5.5", TCP, 80));
    assert!(!allowed(&s, "dev/cli", E, "8.8.8.8", TCP, 80));
    assert!(allowed(&s, "dev/cli", E, "fd00::1", TCP, 80), "IPv4 networks do not match IPv6");

    // A longer address prefix with a specific port must not shadow a higher-priority broad Deny.
    let s = base()
        .with(cnp("broad", Tier::Admin, 1).egress(crule(Deny).networks(&["10.0.0.0/8"])))
        .with(
            cnp("narrow", Tier::Admin, 2)
                .egress(crule(Accept).networks(&["10.0.0.2/32"]).port(port(Protocol::Tcp, 5432))),
        );
    assert!(!allowed(&s, "dev/cli", E, DB, TCP, 5432));
    // The reverse priorities: the narrow Accept wins for its port only.
    let s = base()
        .with(cnp("broad", Tier::Admin, 2).egress(crule(Deny).networks(&["10.0.0.0/8"])))
        .with(
            cnp("narrow", Tier::Admin, 1)
                .egress(crule(Accept).networks(&["10.0.0.2/32"]).port(port(Protocol::Tcp, 5432))),
        );
    assert!(allowed(&s, "dev/cli", E, DB, TCP, 5432));
    assert!(!allowed(&s, "dev/cli", E, DB, TCP, 5433), "other ports fall to the /8 Deny");
    assert!(!allowed(&s, "dev/cli", E, DB, UDP, 5432));
    // Port ranges against single ports, both orders.
    let s = base().with(
        cnp("r", Tier::Admin, 1)
            .egress(crule(Pass).networks(&["10.0.0.0/8"]).port(range(Protocol::Tcp, 1000, 2000)))
            .egress(crule(Deny).networks(&["10.0.0.0/8"]).port(port(Protocol::Tcp, 1500))),
    );
    assert!(
        allowed(&s, "dev/cli", E, DB, TCP, 1500),
        "Pass (earlier, range) shadows Deny (later, single port)"
    );
    let s = base().with(
        cnp("r", Tier::Admin, 1)
            .egress(crule(Deny).networks(&["10.0.0.0/8"]).port(port(Protocol::Tcp, 1500)))
            .egress(crule(Accept).networks(&["10.0.0.0/8"]).port(range(Protocol::Tcp, 1000, 2000))),
    );
    assert!(!allowed(&s, "dev/cli", E, DB, TCP, 1500));
    assert!(allowed(&s, "dev/cli", E, DB, TCP, 1501));
    // "::/0" matches IPv6 only.
    let s = base().with(cnp("v6", Tier::Admin, 1).egress(crule(Deny).networks(&["::/0"])));
    assert!(allowed(&s, "dev/cli", E, "8.8.8.8", TCP, 80));
    assert!(!allowed(&s, "dev/cli", E, "2001:db8::1", TCP, 80));
}

#[test]
fn named_ports() {
    // Ingress: the protected pod's own container ports.
    let s =
        base().with(cnp("n", Tier::Admin, 1).ingress(crule(Deny).pods(any(), any()).named("http")));
    assert!(!allowed(&s, "prod/web", I, CLI, TCP, 8080));
    assert!(allowed(&s, "prod/web", I, CLI, TCP, 80));
    assert!(allowed(&s, "prod/db", I, CLI, TCP, 8080), "db has no port named http");
    // Egress: each destination pod's ports, with the container port's protocol.
    let s = base()
        .with(cnp("dns", Tier::Admin, 1).egress(
            crule(Accept).pods(ns("kube-system"), sel(&[("k8s-app", "kube-dns")])).named("dns"),
        ))
        .with(cnp("default-deny", Tier::Baseline, 1).egress(crule(Deny).networks(&["0.0.0.0/0"])));
    assert!(allowed(&s, "dev/cli", E, DNS, UDP, 53));
    assert!(!allowed(&s, "dev/cli", E, DNS, TCP, 53), "dns is UDP; dns-tcp is not listed");
    assert!(!allowed(&s, "dev/cli", E, WEB, TCP, 8080));
}

#[test]
fn subjects_and_rule_origins() {
    let s = base().with(
        cnp("db-only", Tier::Admin, 1)
            .subject(sel(&[("env", "prod")]), sel(&[("app", "db")]))
            .ingress(crule(Accept).pods(ns("dev"), any()))
            .ingress(crule(Deny).pods(any(), any())),
    );
    let c = compile(&s, &CompileOptions::new("node-a"));
    let db = &c.endpoints[&PodRef::new("prod", "db")];
    assert!(db.sets.contains_key(&(I, Tier::Admin)));
    assert!(!db.sets.contains_key(&(E, Tier::Admin)), "no egress rules: egress unaffected");
    assert!(!c.endpoints[&PodRef::new("prod", "web")].sets.contains_key(&(I, Tier::Admin)));
    let d = decide_for(&s, "prod/db", I, WEB, TCP, 1);
    assert!(!d.allow);
    assert_eq!(
        c.rules[&d.rule_id],
        RuleOrigin::Policy {
            tier: Tier::Admin,
            policy: cluster_ref(ClusterKind::ClusterNetworkPolicy, "db-only"),
            direction: I,
            index: 1
        }
    );
    let d = decide_for(&s, "prod/db", I, CLI, TCP, 1);
    assert!(d.allow);
    assert!(matches!(&c.rules[&d.rule_id], RuleOrigin::Policy { index: 0, .. }));

    // Legacy kinds: AdminNetworkPolicy and BaselineAdminNetworkPolicy of the same name coexist.
    let s = base()
        .with(
            cnp("x", Tier::Admin, 1)
                .kind(ClusterKind::AdminNetworkPolicy)
                .ingress(crule(Pass).pods(ns("dev"), any())),
        )
        .with(
            cnp("default", Tier::Baseline, 0)
                .kind(ClusterKind::BaselineAdminNetworkPolicy)
                .ingress(crule(Deny).pods(ns("dev"), any())),
        );
    let d = decide_for(&s, "prod/web", I, CLI, TCP, 1);
    let c = compile(&s, &CompileOptions::new("node-a"));
    assert!(!d.allow);
    assert!(
        matches!(&c.rules[&d.rule_id], RuleOrigin::Policy { tier: Tier::Baseline, policy, .. } if policy.to_string() == "BaselineAdminNetworkPolicy/default")
    );
    // Subject by namespace expression; host-network pods are never subjects.
    let mut s = base().with(
        cnp("not-system", Tier::Baseline, 1)
            .subject(
                sel(&[]).expr(
                    crate::model::NAMESPACE_NAME_LABEL,
                    Operator::NotIn,
                    &["kube-system"],
                ),
                any(),
            )
            .egress(crule(Deny).networks(&["0.0.0.0/0"])),
    );
    let hn = pod("hn", "prod").ip("192.168.0.9").host_network().build();
    s.pods.insert(hn.key(), hn);
    assert!(!allowed(&s, "prod/web", E, "1.1.1.1", TCP, 443));
    assert!(allowed(&s, "kube-system/dns", E, "1.1.1.1", TCP, 443));
}

/// Cases of kubernetes-sigs/network-policy-api `conformance/tests`, run against the compiler with
/// the conformance pods reduced to one per house (names of the upstream `t.Run` cases quoted).
mod conformance {
    use super::*;

    fn houses() -> ClusterState {
        let house = |h: &str| {
            namespace(&format!("network-policy-conformance-{h}"), &[("conformance-house", h)])
        };
        state(
            vec![house("gryffindor"), house("slytherin"), house("hufflepuff"), house("ravenclaw")],
            vec![
                pod("harry-potter-0", "network-policy-conformance-gryffindor")
                    .label("conformance-house", "gryffindor")
                    .ip("10.1.0.1"),
                pod("draco-malfoy-0", "network-policy-conformance-slytherin")
                    .label("conformance-house", "slytherin")
                    .ip("10.1.1.1"),
                pod("cedric-diggory-0", "network-policy-conformance-hufflepuff")
                    .label("conformance-house", "hufflepuff")
                    .ip("10.1.2.1"),
                pod("luna-lovegood-0", "network-policy-conformance-ravenclaw")
                    .label("conformance-house", "ravenclaw")
                    .ip("10.1.3.1"),
            ],
            vec![],
        )
    }
    const HARRY: &str = "network-policy-conformance-gryffindor/harry-potter-0";
    const DRACO_IP: &str = "10.1.1.1";
    const CEDRIC_IP: &str = "10.1.2.1";

    fn house(h: &str) -> (crate::model::LabelSelector, crate::model::LabelSelector) {
        (sel(&[("conformance-house", h)]), sel(&[("conformance-house", h)]))
    }

    /// `conformance/base/admin_tier/standard-priority-field.yaml`.
    fn priority_field(pass_priority: u32) -> ClusterState {
        let (gn, gp) = house("gryffindor");
        let (sn, sp) = house("slytherin");
        houses()
            .with(
                cnp("priority-50-example", Tier::Admin, 50)
                    .subject(gn.clone(), gp.clone())
                    .ingress(crule(Deny).pods(sn.clone(), sp.clone()))
                    .egress(crule(Deny).pods(sn.clone(), sp.clone())),
            )
            .with(
                cnp("old-priority-60-new-priority-40-example", Tier::Admin, pass_priority)
                    .subject(gn.clone(), gp.clone())
                    .ingress(crule(Pass).pods(sn.clone(), sp.clone()))
                    .egress(crule(Pass).pods(sn.clone(), sp.clone())),
            )
            .with(
                cnp("default", Tier::Baseline, 10)
                    .subject(gn, gp)
                    .ingress(crule(Accept).pods(sn.clone(), sp.clone()))
                    .egress(crule(Accept).pods(sn, sp)),
            )
    }

    #[test]
    fn cnp_admin_tier_priority_field() {
        // "Should Deny traffic from slytherin to gryffindor respecting admin CNP"
        let s = priority_field(60);
        assert!(!allowed(&s, HARRY, I, DRACO_IP, TCP, 80));
        assert!(!allowed(&s, HARRY, I, DRACO_IP, TCP, 8080));
        // "Should Deny traffic to slytherin from gryffindor respecting admin CNP"
        assert!(!allowed(&s, HARRY, E, DRACO_IP, TCP, 80));
        // "Should respect admin CNP priority field; thus passing both ingress and egress traffic
        // over to baseline CNP" (priority patched from 60 to 40)
        let s = priority_field(40);
        assert!(allowed(&s, HARRY, I, DRACO_IP, TCP, 80));
        assert!(allowed(&s, HARRY, E, DRACO_IP, TCP, 8080));
        let d = decide_for(&s, HARRY, I, DRACO_IP, TCP, 80);
        let c = compile(&s, &CompileOptions::new("node-a"));
        assert!(
            matches!(&c.rules[&d.rule_id], RuleOrigin::Policy { tier: Tier::Baseline, .. }),
            "the baseline Accept decides"
        );
    }

    /// `conformance/base/api_integration/standard-anp-np-banp.yaml`, reduced: an admin CNP on
    /// gryffindor, a NetworkPolicy allowing slytherin, a baseline CNP denying it.
    fn integration(admin_action: ClusterAction, with_np: bool) -> ClusterState {
        let (gn, gp) = house("gryffindor");
        let (sn, sp) = house("slytherin");
        let mut s = houses()
            .with(
                cnp("pass-example", Tier::Admin, 16)
                    .subject(gn.clone(), gp.clone())
                    .ingress(crule(admin_action).pods(sn.clone(), sp.clone()))
                    .egress(crule(admin_action).pods(sn.clone(), sp.clone())),
            )
            .with(
                cnp("default", Tier::Baseline, 10)
                    .subject(gn, gp)
                    .ingress(crule(Deny).pods(sn.clone(), sp.clone()))
                    .egress(crule(Deny).pods(sn.clone(), sp.clone())),
            );
        if with_np {
            let np = policy(
                "allow-gress-from-to-slytherin-to-gryffindor",
                "network-policy-conformance-gryffindor",
            )
            .types(&[PolicyType::Ingress, PolicyType::Egress])
            .ingress(rule().peer(pods(Some(sn.clone()), Some(sp.clone()))))
            .egress(rule().peer(pods(Some(sn), Some(sp))));
            s.policies.insert(np.0.key(), np.0);
        }
        s
    }

    #[test]
    fn cnp_admin_tier_integration() {
        // "Should Deny traffic from slytherin to gryffindor respecting admin CNP"
        let s = integration(Deny, true);
        assert!(!allowed(&s, HARRY, I, DRACO_IP, TCP, 80));
        // "Should Deny traffic to slytherin from gryffindor respecting admin CNP"
        assert!(!allowed(&s, HARRY, E, DRACO_IP, TCP, 80));
        // "Should support a 'pass-ingress' policy for admin CNP and respect the match for network
        // policy" / "... 'pass-egress' ..."
        let s = integration(Pass, true);
        assert!(allowed(&s, HARRY, I, DRACO_IP, TCP, 80));
        assert!(allowed(&s, HARRY, E, DRACO_IP, TCP, 8080));
        assert!(!allowed(&s, HARRY, I, CEDRIC_IP, TCP, 80), "the NetworkPolicy isolates harry");
        // "Should support a 'pass-ingress' policy for admin CNP and respect the match for baseline
        // cluster network policy" (the NetworkPolicy deleted) / "... 'pass-egress' ..."
        let s = integration(Pass, false);
        assert!(!allowed(&s, HARRY, I, DRACO_IP, TCP, 80));
        assert!(!allowed(&s, HARRY, E, DRACO_IP, TCP, 80));
        assert!(allowed(&s, HARRY, I, CEDRIC_IP, TCP, 80), "hufflepuff: no rule of any tier");
    }

    #[test]
    fn cnp_admin_tier_egress_inline_cidr_peers() {
        // "Should support a 'deny-egress' rule policy for egress-cidr-peer": deny all egress to
        // 0.0.0.0/0 after accepting the pods peers it still allows.
        let (gn, gp) = house("gryffindor");
        let (sn, sp) = house("slytherin");
        let s = houses().with(
            cnp("egress-cidr", Tier::Admin, 70)
                .subject(gn, gp)
                .egress(crule(Accept).pods(sn, sp))
                .egress(crule(Deny).networks(&["0.0.0.0/0"])),
        );
        assert!(allowed(&s, HARRY, E, DRACO_IP, TCP, 80));
        assert!(!allowed(&s, HARRY, E, CEDRIC_IP, TCP, 80));
        assert!(!allowed(&s, HARRY, E, "1.1.1.1", UDP, 53));
        // "Should support an 'allow-egress' rule policy for egress-cidr-peer"
        // ("allow-egress-to-specific-podIPs", inserted first).
        let (gn, gp) = house("gryffindor");
        let mut s2 = s.clone();
        let p = s2.cluster_policies.values_mut().next().unwrap();
        p.subject = crate::model::NamespacedPods { namespace_selector: gn, pod_selector: gp };
        p.egress.insert(0, crule(Accept).networks(&["10.1.2.1/32"]));
        assert!(allowed(&s2, HARRY, E, CEDRIC_IP, TCP, 80));
    }
}

#[test]
fn incremental_matches_full_compile() {
    let o = CompileOptions::new("node-a");
    let start = base().with(cnp("dns", Tier::Admin, 1).egress(
        crule(Accept).pods(ns("kube-system"), sel(&[("k8s-app", "kube-dns")])).named("dns"),
    ));
    let mut c = Compiler::new(start.clone(), o.clone());
    let changes = vec![
        Change::UpsertClusterPolicy(
            cnp("deny", Tier::Baseline, 3).egress(crule(Deny).networks(&["0.0.0.0/0"])).build(),
        ),
        Change::UpsertPod(
            pod("dns2", "kube-system")
                .label("k8s-app", "kube-dns")
                .ip("10.0.2.54")
                .port(Some("dns"), 5353, Protocol::Udp)
                .build(),
        ),
        Change::UpsertNamespace(namespace("kube-system", &[("x", "y")])),
        Change::UpsertClusterPolicy(
            cnp("dns", Tier::Admin, 1)
                .subject(sel(&[("env", "dev")]), any())
                .egress(crule(Deny).pods(any(), any()))
                .build(),
        ),
        Change::UpsertPod(pod("cli", "dev").label("app", "other").ip(CLI).build()),
        Change::DeletePod(PodRef::new("kube-system", "dns")),
        Change::DeleteClusterPolicy(cluster_ref(ClusterKind::ClusterNetworkPolicy, "deny")),
        Change::UpsertNamespace(namespace("dev", &[("env", "prod")])),
    ];
    for ch in changes {
        c.apply(ch.clone());
        assert_eq!(c.compiled(), &compile(c.state(), &o), "after {ch:?}");
    }
}

/// A cluster rule's egress named port resolves against every pod at the destination address,
/// like a NetworkPolicy's (`tests.rs`): a pod the rule does not select, at the address of one it
/// selects, changes it, and the incremental compiler must see that.
#[test]
fn a_pod_at_a_selected_peers_address_changes_cluster_named_ports_incrementally() {
    let o = CompileOptions::new("node-a");
    let start = base()
        .with(cnp("dns", Tier::Admin, 1).egress(
            crule(Accept).pods(ns("kube-system"), sel(&[("k8s-app", "kube-dns")])).named("dns"),
        ))
        .with(cnp("default-deny", Tier::Baseline, 1).egress(crule(Deny).networks(&["0.0.0.0/0"])));
    let mut c = Compiler::new(start, o.clone());
    // Not selected (namespace dev, no k8s-app label), at the DNS pod's address.
    let stale = |ip, port| pod("stale", "dev").ip(ip).port(Some("dns"), port, Protocol::Udp);
    let cli_to_dns = |c: &Compiler, port| {
        let maps = Layout::new().update(c.compiled()).unwrap();
        let ep = &maps.endpoints[&PodRef::new("dev", "cli")];
        evaluate(&maps, &ep.value, E, DNS.parse().unwrap(), UDP, port).allow
    };
    assert!(!cli_to_dns(&c, 5353));
    let changes = [
        (Change::UpsertPod(stale(DNS, 5353).build()), 5353, true),
        (Change::UpsertPod(stale(DNS, 5354).build()), 5353, false),
        (Change::UpsertPod(stale("10.0.1.9", 5354).build()), 5354, false),
        (Change::UpsertPod(stale(DNS, 5354).build()), 5354, true),
        (Change::DeletePod(PodRef::new("dev", "stale")), 5354, false),
    ];
    for (ch, port, want) in changes {
        let what = format!("{ch:?}");
        c.apply(ch);
        assert_eq!(c.compiled(), &compile(c.state(), &o), "after {what}");
        assert_eq!(cli_to_dns(&c, port), want, "cli to dns:{port} after {what}");
    }
}
