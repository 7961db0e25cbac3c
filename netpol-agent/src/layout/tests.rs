use super::*;
use crate::compile::{compile, CompileOptions};
use crate::model::build::*;
use crate::model::Protocol;
use netpol_common::policy::{TierLookup, SKIP_EXACT, SKIP_TRIE};
use netpol_common::{DIR_EGRESS, DIR_INGRESS};

fn opts() -> CompileOptions {
    CompileOptions::new("node-a")
}

#[test]
fn lookup_semantics_and_ids() {
    let s = state(
        vec![],
        vec![pod("web", "prod").ip("10.0.0.1"), pod("free", "prod").label("x", "y").ip("10.0.0.3")],
        vec![policy("p", "prod")
            .select(sel(&[("app", "")]).expr("x", crate::model::Operator::DoesNotExist, &[]))
            .ingress(
                rule().peer(block("10.0.0.0/8", &["10.1.0.0/16"])).port(port(Protocol::Tcp, 80)),
            )],
    );
    let c = compile(&s, &opts());
    let maps = Layout::new().update(&c).unwrap();
    let web = maps.endpoints[&PodRef::new("prod", "web")].value;
    assert_eq!(
        web.ingress_np, 0,
        "selector with matchLabels app= does not select a pod without app"
    );
    let s2 = state(
        vec![],
        vec![pod("web", "prod").ip("10.0.0.1")],
        vec![policy("p", "prod").ingress(
            rule().peer(block("10.0.0.0/8", &["10.1.0.0/16"])).port(port(Protocol::Tcp, 80)),
        )],
    );
    let maps = Layout::new().update(&compile(&s2, &opts())).unwrap();
    let web = maps.endpoints[&PodRef::new("prod", "web")].value;
    let (set, skips) = (web.ingress_np, web.peer_skips(DIR_INGRESS)[1]);
    assert_ne!(set, 0);
    // An ipBlock and no pod: nothing in the peers' exact-match hash.
    assert_eq!(skips, SKIP_EXACT);
    let look = |set, ip: &str, port| lookup(&maps, set, skips, ip.parse().unwrap(), 6, port);
    assert!(matches!(look(set, "10.2.0.1", 80), TierLookup::Hit(_)));
    assert_eq!(look(set, "10.1.0.1", 80), TierLookup::Miss);
    assert_eq!(look(set, "10.2.0.1", 81), TierLookup::Miss);
    assert_eq!(look(0, "10.2.0.1", 81), TierLookup::NoSet);
}

#[test]
fn diff_writes_only_changes_and_keeps_ids() {
    let pods = vec![
        pod("a", "prod").label("app", "a").ip("10.0.0.1"),
        pod("b", "prod").label("app", "b").ip("10.0.0.2"),
    ];
    let pa = policy("pa", "prod")
        .select(sel(&[("app", "a")]))
        .ingress(rule().port(port(Protocol::Tcp, 80)));
    let pb = policy("pb", "prod")
        .select(sel(&[("app", "b")]))
        .ingress(rule().port(port(Protocol::Tcp, 81)));
    let mut layout = Layout::new();
    let s1 = state(vec![], pods.clone(), vec![pa.clone()]);
    let m1 = layout.update(&compile(&s1, &opts())).unwrap();
    let s2 = state(vec![], pods, vec![pa, pb]);
    let m2 = layout.update(&compile(&s2, &opts())).unwrap();
    let a = PodRef::new("prod", "a");
    assert_eq!(m1.endpoints[&a], m2.endpoints[&a], "unchanged pod keeps its set id");
    let d = KernelMaps::diff(&m1, &m2);
    assert_eq!(d.endpoints.upserts.len(), 1);
    assert!(d.peers.deletes.is_empty() && d.ports.deletes.is_empty());
    assert_eq!(d.ports.upserts.len(), 1);
    assert!(KernelMaps::diff(&m2, &m2).is_empty());
}

/// The skip bits say which of a set's two maps (exact-match hash, trie) hold its entries, so the
/// lookup can leave the other out. They must never change a verdict: every lookup with them
/// equals the lookup of both maps, for sets of pods only, ipBlocks only, both, any-port rules,
/// single ports and port ranges.
#[test]
fn skip_bits_name_the_maps_a_set_uses_and_never_change_a_verdict() {
    let client = |name: &str, ip: &str| pod(name, "prod").label("role", "client").ip(ip);
    let s = state(
        vec![],
        vec![
            pod("pods-only", "prod").label("app", "a").ip("10.0.0.1"),
            pod("blocks-only", "prod").label("app", "b").ip("10.0.0.2"),
            pod("both", "prod").label("app", "c").ip("10.0.0.3"),
            client("c1", "10.0.1.1"),
            client("c2", "10.0.1.2"),
            pod("other", "prod").ip("10.0.2.1"),
        ],
        vec![
            policy("a", "prod")
                .select(sel(&[("app", "a")]))
                .ingress(
                    rule()
                        .peer(pods(None, Some(sel(&[("role", "client")]))))
                        .port(port(Protocol::Tcp, 80)),
                )
                .egress(rule().peer(pods(None, Some(sel(&[("role", "client")]))))),
            policy("b", "prod").select(sel(&[("app", "b")])).ingress(
                rule().peer(block("10.0.0.0/16", &["10.0.1.0/24"])).port(range(
                    Protocol::Udp,
                    1000,
                    1999,
                )),
            ),
            policy("c", "prod")
                .select(sel(&[("app", "c")]))
                .ingress(
                    rule()
                        .peer(pods(None, Some(sel(&[("role", "client")]))))
                        .peer(block("10.0.2.0/24", &[]))
                        .port(port(Protocol::Tcp, 80))
                        .port(range(Protocol::Tcp, 8000, 8100)),
                )
                .egress(rule().peer(block("0.0.0.0/0", &[]))),
        ],
    );
    let maps = Layout::new().update(&compile(&s, &opts())).unwrap();
    let ep = |name: &str| maps.endpoints[&PodRef::new("prod", name)].value;
    // Peer sets: pods only → no trie; ipBlocks only → no hash; both → both.
    assert_eq!(ep("pods-only").peer_skips(DIR_INGRESS)[1], SKIP_TRIE);
    assert_eq!(ep("blocks-only").peer_skips(DIR_INGRESS)[1], SKIP_EXACT);
    assert_eq!(ep("both").peer_skips(DIR_INGRESS)[1], 0);
    // Port sets: one port → no trie; a range and an any-port rule → their trie entries.
    let port_skips = |name: &str, dir: u8, remote: &str| {
        let e = ep(name);
        let set = e.sets(dir)[1];
        let addr = netpol_common::v4_mapped(remote.parse::<std::net::Ipv4Addr>().unwrap().octets());
        maps.peers
            .iter()
            .find(|((bits, d), _)| *bits == PEER_FULL_BITS && d.set_id == set && d.addr == addr)
            .map(|(_, v)| v.flags)
    };
    assert_eq!(port_skips("pods-only", DIR_INGRESS, "10.0.1.1"), Some(SKIP_TRIE));
    assert_eq!(port_skips("pods-only", DIR_EGRESS, "10.0.1.1"), Some(SKIP_EXACT));
    assert_eq!(port_skips("both", DIR_INGRESS, "10.0.1.1"), Some(0));

    // Both maps of both stages: every skip bit cleared, also the port sets'.
    let mut all = maps.clone();
    all.peers.values_mut().for_each(|v| v.flags = 0);
    let remotes = ["10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.2.1", "10.0.0.9", "10.9.0.1"];
    let (mut compared, mut hits) = (0, 0);
    for name in ["pods-only", "blocks-only", "both"] {
        let e = ep(name);
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            for (set, skips) in e.sets(dir).into_iter().zip(e.peer_skips(dir)) {
                for remote in remotes {
                    for (proto, port) in
                        [(6, 79), (6, 80), (6, 8050), (6, 8101), (17, 1500), (17, 2000)]
                    {
                        let ip = remote.parse().unwrap();
                        let with = lookup(&maps, set, skips, ip, proto, port);
                        let without = lookup(&all, set, 0, ip, proto, port);
                        assert_eq!(with, without, "{name} dir {dir} {remote} {proto}/{port}");
                        compared += 1;
                        hits += matches!(with, TierLookup::Hit(_)) as usize;
                    }
                }
            }
        }
    }
    assert_eq!(compared, 3 * 2 * 3 * 6 * 6);
    // Allowed lookups through each kind of entry: pod ports, ranges, blocks, any port.
    assert!(hits >= 10, "only {hits} hits");
}
