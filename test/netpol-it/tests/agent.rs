//! `netpol-agent run --manifests DIR` end to end: the real agent (in this process) on a lab node,
//! with pods, namespaces and policies created, relabelled and deleted while traffic runs.
use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use netpol_it::{
    agent::{get as scrape, sample, RunningAgent},
    lab::{Lab, Topology},
    manifests::{namespace, pod, ManifestDir},
    probe::{eventually, TcpServer},
};

const NODE: &str = "lab-node";

const DENY_ALL: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: default-deny\n  namespace: prod\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n";
const ALLOW_FRONT: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: allow-frontend\n  namespace: prod\nspec:\n  podSelector:\n    matchLabels: {app: backend}\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels: {app: frontend}\n    ports:\n    - port: http\n";

#[test]
fn manifests_drive_enforcement_while_traffic_runs() {
    for topology in [Topology::Routed, Topology::Bridged] {
        let mut lab = Lab::with_topology(topology).unwrap();
        let front = lab.add_pod("front").unwrap();
        let other = lab.add_pod("other").unwrap();
        let back = lab.add_pod("back").unwrap();
        let _srv = TcpServer::start(&back.netns, 80).unwrap();
        let dir = ManifestDir::new(&format!("agent-{topology:?}")).unwrap();
        dir.write("ns.yaml", &namespace("prod", &[("env", "prod")])).unwrap();
        dir.write("front.yaml", &pod(&front, "prod", NODE, &[("app", "frontend")], &[])).unwrap();
        dir.write("other.yaml", &pod(&other, "prod", NODE, &[("app", "other")], &[])).unwrap();
        dir.write("back.yaml", &pod(&back, "prod", NODE, &[("app", "backend")], &[("http", 80)]))
            .unwrap();
        let to = SocketAddr::from((back.ip, 80));
        let agent = RunningAgent::start(&dir, NODE, &format!("agent{topology:?}"));
        // Loading and verifying the programs takes seconds (more with the other topology's
        // agent loading beside it): start the 5 s policy deadlines once the first snapshot is
        // enforced, which also makes the first checks run through the attached programs.
        agent.wait_ready();
        let metrics_addr = agent.metrics_addr;

        // No policy: everyone reaches the backend.
        eventually(&front, to, true, "no policy");
        eventually(&other, to, true, "no policy");
        // Default deny for the namespace, then allow the frontend on the named port.
        dir.write("deny.yaml", DENY_ALL).unwrap();
        eventually(&front, to, false, "deny all");
        dir.write("allow.yaml", ALLOW_FRONT).unwrap();
        eventually(&front, to, true, "frontend allowed");
        eventually(&other, to, false, "other still denied");
        // The drops are visible in /metrics, attributed to the backend pod.
        // Counters are published every second: poll.
        let deadline = Instant::now() + Duration::from_secs(4);
        loop {
            let m = scrape(metrics_addr, "/metrics");
            let labels = [("direction", "ingress"), ("reason", "policy_deny"), ("pod", "back")];
            if sample(&m, "netpol_drop_count_total", &labels) >= 1.0 {
                break;
            }
            assert!(Instant::now() < deadline, "no backend drops in /metrics:\n{m}");
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(
            scrape(metrics_addr, "/readyz").starts_with("HTTP/1.1 200"),
            "ready after the first snapshot"
        );
        // Relabel the running "other" pod as a frontend: now it is allowed.
        dir.write("other.yaml", &pod(&other, "prod", NODE, &[("app", "frontend")], &[])).unwrap();
        eventually(&other, to, true, "relabelled pod allowed");
        // A broken file is reported and ignored; what was enforced stays enforced.
        dir.write("broken.yaml", "kind: NetworkPolicy\nmetadata: {name: x, namespace: prod}\nspec: {podSelector: {matchExpressions: [{key: a, operator: Sometimes}]}}\n").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        eventually(&other, to, true, "unchanged after a bad file");
        // Deleting the policies opens the namespace again.
        dir.remove("deny.yaml").unwrap();
        dir.remove("allow.yaml").unwrap();
        dir.write("other.yaml", &pod(&other, "prod", NODE, &[("app", "other")], &[])).unwrap();
        eventually(&other, to, true, "policies deleted");
        // A pod that leaves the node is no longer enforced.
        dir.write("deny.yaml", DENY_ALL).unwrap();
        eventually(&other, to, false, "deny again");
        dir.remove("back.yaml").unwrap();
        eventually(&other, to, true, "backend no longer on this node");
    }
}

#[test]
fn pods_are_attached_when_their_interface_appears_and_released_when_it_goes() {
    use netpol_it::cmd::ip;
    let mut lab = Lab::new().unwrap();
    let stranger = lab.add_pod("stranger").unwrap();
    let late = lab.next_pod("late");
    let dir = ManifestDir::new("late").unwrap();
    dir.write("ns.yaml", &namespace("prod", &[])).unwrap();
    dir.write("stranger.yaml", &pod(&stranger, "prod", NODE, &[("app", "stranger")], &[])).unwrap();
    dir.write("late.yaml", &pod(&late, "prod", NODE, &[("app", "late")], &[("http", 80)])).unwrap();
    dir.write("deny.yaml", DENY_ALL).unwrap();
    // The periodic retry is made too slow to matter: only netlink events can attach the pod.
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/netpol-test-{}-late", std::process::id()));
    let agent = RunningAgent::start_with(&dir, NODE, pin_dir, |o| {
        o.retry_interval = Duration::from_secs(600)
    });
    agent.wait_ready();
    let pending = |agent: &RunningAgent| {
        sample(&scrape(agent.metrics_addr, "/metrics"), "netpol_endpoints", &[("state", "pending")])
    };

    // The pod exists in the API but has no interface yet: pending.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pending(&agent) < 1.0 {
        assert!(Instant::now() < deadline, "the late pod should be pending");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its interface appears: enforced within moments, without waiting for the retry.
    let late = lab.add_pod("late").unwrap();
    let _srv = TcpServer::start(&late.netns, 80).unwrap();
    let to = SocketAddr::from((late.ip, 80));
    eventually(&stranger, to, false, "attached on the netlink event");
    // The interface is deleted out of band: the pod is pending again.
    ip(&format!("link del {}", late.host_if)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while pending(&agent) < 1.0 {
        assert!(Instant::now() < deadline, "a deleted interface should make the pod pending");
        std::thread::sleep(Duration::from_millis(100));
    }
}
