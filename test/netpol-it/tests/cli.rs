//! The operator CLI against a live agent: `inspect`, `conntrack`, `explain --live` and
//! `uninstall`, through the library functions behind the subcommands, checked against the
//! traffic the lab actually sees.
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use netpol_agent::{
    compile::RuleOrigin,
    dataplane::pinned::PinnedMaps,
    explain::{explain_live, parse_port, Peer, Query},
    inspect::{conntrack, inspect},
    model::PodRef,
    status::Status,
    uninstall::uninstall,
};
use netpol_it::{
    agent::RunningAgent,
    lab::Lab,
    manifests::{namespace, pod, ManifestDir},
    probe::{eventually, tcp_echo, TcpServer},
};

const NODE: &str = "lab-node";
const T: Duration = Duration::from_millis(400);

fn wait_for_status(path: &Path, endpoints: usize) -> Status {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(s) = Status::read(path) {
            if s.endpoints.len() == endpoints && s.pending.is_empty() {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "status file {} never listed {endpoints} endpoints",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const DENY_ALL: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: default-deny\n  namespace: prod\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n";
const ALLOW_FRONT: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: allow-frontend\n  namespace: prod\nspec:\n  podSelector:\n    matchLabels: {app: backend}\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels: {app: frontend}\n    ports:\n    - port: http\n";

fn live(
    pinned: &PinnedMaps,
    status: &Status,
    from: &str,
    to: &str,
) -> netpol_agent::explain::Report {
    let (proto, port) = parse_port(Some("80/TCP"), None).unwrap();
    let q = Query {
        from: Peer::Pod(PodRef::new("prod", from)),
        to: Peer::Pod(PodRef::new("prod", to)),
        proto,
        port,
        node: None,
        node_addrs: vec![],
        allow_host_to_pods: true,
    };
    explain_live(pinned, status, &q).unwrap()
}

#[test]
fn cli_reads_what_the_live_agent_enforces() {
    netpol_it::require_root();
    let mut lab = Lab::new().unwrap();
    let front = lab.add_pod("front").unwrap();
    let other = lab.add_pod("other").unwrap();
    let back = lab.add_pod("back").unwrap();
    let _srv = TcpServer::start(&back.netns, 80).unwrap();
    let dir = ManifestDir::new("cli").unwrap();
    dir.write("ns.yaml", &namespace("prod", &[("env", "prod")])).unwrap();
    dir.write("front.yaml", &pod(&front, "prod", NODE, &[("app", "frontend")], &[])).unwrap();
    dir.write("other.yaml", &pod(&other, "prod", NODE, &[("app", "other")], &[])).unwrap();
    dir.write("back.yaml", &pod(&back, "prod", NODE, &[("app", "backend")], &[("http", 80)]))
        .unwrap();
    dir.write("deny.yaml", DENY_ALL).unwrap();
    dir.write("allow.yaml", ALLOW_FRONT).unwrap();
    let agent = RunningAgent::start(&dir, NODE, "cli");
    // Policy deadlines below start once the programs are loaded and the first snapshot enforced.
    agent.wait_ready();
    let to = SocketAddr::from((back.ip, 80));

    // Every pod bound (the status file is written after the interfaces are attached), then the
    // observed traffic: the frontend reaches the backend, the other pod does not.
    let status = wait_for_status(&agent.status_file, 3);
    eventually(&front, to, true, "frontend allowed");
    eventually(&other, to, false, "other denied");
    assert_eq!(status.node, NODE);
    assert!(status.rules.values().any(|r| r.describe() == "prod/allow-frontend ingress rule 0"));

    // inspect: every endpoint, generations equal in the kernel and the status file, the
    // backend's drops counted.
    let r = inspect(&agent.pin_dir, &agent.status_file).unwrap();
    assert_eq!(r.node.as_deref(), Some(NODE));
    for p in [&front, &other, &back] {
        let e = r
            .endpoints
            .iter()
            .find(|e| e.pod.as_deref() == Some(&format!("prod/{}", p.name)))
            .unwrap_or_else(|| panic!("{} not in inspect: {:?}", p.name, r.endpoints));
        assert_eq!(e.interface.as_deref(), Some(p.host_if.as_str()));
        assert_eq!(e.ifindex, netpol_it::lab::ifindex(&p.host_if).unwrap());
        assert!(
            e.kernel_generation.is_some() && e.kernel_generation == e.status_generation,
            "{e:?}"
        );
        assert!(!e.mismatch);
    }
    let b = r.endpoints.iter().find(|e| e.pod.as_deref() == Some("prod/back")).unwrap();
    assert!(b.dropped > 0, "no drops counted for the backend: {b:?}");
    assert!(b.counters.iter().any(|c| c.direction == "ingress" && c.reason == "policy_deny"));
    let names: Vec<&str> = b.policies.iter().map(|p| p.policy.as_str()).collect();
    assert!(
        names.contains(&"prod/allow-frontend") && names.contains(&"prod/default-deny"),
        "{names:?}"
    );
    let ep_fill = r.maps.iter().find(|m| m.name == "np_ep").unwrap();
    assert_eq!(ep_fill.entries, Some(3));
    assert_eq!(ep_fill.max_entries as usize, netpol_common::maps::EP_MAX);
    let text = netpol_agent::inspect::render_inspect(&r);
    assert!(text.contains("prod/back") && text.contains("policy_deny"), "{text}");

    // conntrack: the allowed flow, seen from the backend (inbound) with its rule.
    let flows = conntrack(&agent.pin_dir, &agent.status_file).unwrap();
    let inbound = flows
        .iter()
        .find(|f| {
            f.pod.as_deref() == Some("prod/back")
                && f.local_port == 80
                && f.remote_addr == IpAddr::V4(front.ip)
        })
        .unwrap_or_else(|| panic!("allowed flow missing: {flows:#?}"));
    assert_eq!(inbound.verdict, "allow");
    // The key holds no pod address; the report takes it from the status file.
    assert_eq!(inbound.local_addr, Some(IpAddr::V4(back.ip)));
    assert_eq!(inbound.origin, "inbound");
    assert_eq!(inbound.protocol, "tcp");
    assert_eq!(inbound.rule.as_deref(), Some("prod/allow-frontend ingress rule 0"));
    assert!(
        !flows.iter().any(|f| f.remote_addr == IpAddr::V4(other.ip) && f.verdict == "allow"),
        "a denied connection was tracked as allowed: {flows:#?}"
    );

    // explain --live agrees with the traffic and names the policy.
    let pinned = PinnedMaps::open(&agent.pin_dir).unwrap();
    let allowed = live(&pinned, &status, "front", "back");
    assert!(allowed.allow, "{allowed:?}");
    let ingress = allowed.directions.iter().find(|d| d.pod.name == "back").unwrap();
    assert!(
        matches!(&ingress.rule, Some(RuleOrigin::Policy { policy, index: 0, .. }) if policy.name == "allow-frontend"),
        "{ingress:?}"
    );
    let denied = live(&pinned, &status, "other", "back");
    assert!(!denied.allow, "{denied:?}");
    assert_eq!(
        netpol_agent::explain::render_json(&denied)["verdict"],
        "deny",
        "{}",
        netpol_agent::explain::render_text(&denied)
    );
    assert_eq!(tcp_echo(&front.netns, to, T).unwrap(), allowed.allow);
    assert_eq!(tcp_echo(&other.netns, to, T).unwrap(), denied.allow);
    drop(pinned);

    // A pin directory that does not exist is a clear error.
    let missing = PathBuf::from(format!("/sys/fs/bpf/netpol-test-{}-none", std::process::id()));
    let e = inspect(&missing, &agent.status_file).unwrap_err().to_string();
    assert!(e.contains("no netpol maps pinned at"), "{e}");

    // uninstall after the agent stopped: no programs left, no pins, no status file; twice.
    let status_file = agent.status_file.clone();
    let pin_dir = agent.stop_keeping_pins();
    assert!(pin_dir.exists(), "the agent keeps its pins when it stops");
    let u = uninstall(&pin_dir, &status_file).unwrap();
    assert!(u.still_attached.is_empty(), "{u:?}");
    assert_eq!(u.removed_pins.as_deref(), Some(pin_dir.as_path()));
    assert_eq!(u.removed_status_file.as_deref(), Some(status_file.as_path()));
    assert!(!pin_dir.exists());
    assert!(!status_file.exists());
    let again = uninstall(&pin_dir, &status_file).unwrap();
    assert!(
        again.removed_pins.is_none()
            && again.removed_status_file.is_none()
            && again.detached.is_empty()
    );
    // With the agent gone, traffic is no longer policed.
    eventually(&other, to, true, "after uninstall");
}
