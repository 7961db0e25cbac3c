use super::*;
use crate::compile::{compile, CompileOptions};
use crate::model::build::*;
use crate::model::Protocol;
use netpol_common::policy::TierLookup;

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
    let set = maps.endpoints[&PodRef::new("prod", "web")].value.ingress_np;
    assert_ne!(set, 0);
    assert!(matches!(lookup(&maps, set, "10.2.0.1".parse().unwrap(), 6, 80), TierLookup::Hit(_)));
    assert_eq!(lookup(&maps, set, "10.1.0.1".parse().unwrap(), 6, 80), TierLookup::Miss);
    assert_eq!(lookup(&maps, set, "10.2.0.1".parse().unwrap(), 6, 81), TierLookup::Miss);
    assert_eq!(lookup(&maps, 0, "10.2.0.1".parse().unwrap(), 6, 81), TierLookup::NoSet);
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
