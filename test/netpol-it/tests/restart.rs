//! The agent restarts without a gap: its TCX attachments and maps stay pinned while no agent
//! runs, the kernel keeps enforcing, and the next agent adopts them and swaps its programs in.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use netpol_it::{
    agent::RunningAgent,
    lab::Lab,
    manifests::{namespace, pod, ManifestDir},
    netns::in_netns,
    probe::{tcp_echo, TcpServer},
};

const NODE: &str = "lab-node";
const T: Duration = Duration::from_millis(500);
const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: allow-client\n  namespace: prod\nspec:\n  podSelector:\n    matchLabels: {app: server}\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels: {app: client}\n    ports:\n    - port: 80\n";

/// A connection to the echo server, opened now and used later.
fn open(from: &netpol_it::lab::Pod, to: SocketAddr) -> TcpStream {
    let c = in_netns(&from.netns, || TcpStream::connect_timeout(&to, T)).unwrap().unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c
}

/// Sends a line on an established connection and expects it echoed.
fn echoes(c: &mut TcpStream) -> bool {
    let mut buf = [0u8; 5];
    c.write_all(b"ping\n").is_ok() && c.read_exact(&mut buf).is_ok() && &buf == b"ping\n"
}

#[test]
fn restart_keeps_enforcing_and_keeps_established_flows() {
    let mut lab = Lab::new().unwrap();
    let client = lab.add_pod("client").unwrap();
    let stranger = lab.add_pod("stranger").unwrap();
    let server = lab.add_pod("server").unwrap();
    let _http = TcpServer::start(&server.netns, 80).unwrap();
    let dir = ManifestDir::new("restart").unwrap();
    dir.write("ns.yaml", &namespace("prod", &[])).unwrap();
    dir.write("client.yaml", &pod(&client, "prod", NODE, &[("app", "client")], &[])).unwrap();
    dir.write("stranger.yaml", &pod(&stranger, "prod", NODE, &[("app", "stranger")], &[])).unwrap();
    dir.write("server.yaml", &pod(&server, "prod", NODE, &[("app", "server")], &[("http", 80)]))
        .unwrap();
    dir.write("policy.yaml", POLICY).unwrap();
    let to = SocketAddr::from((server.ip, 80));

    let first = RunningAgent::start(&dir, NODE, "restart");
    first.wait_ready();
    netpol_it::probe::eventually(&client, to, true, "client allowed");
    netpol_it::probe::eventually(&stranger, to, false, "stranger denied");
    let mut before = open(&client, to);

    let pins = first.stop_keeping_pins();
    // No agent runs: the kernel keeps enforcing the last state, no fail-open window.
    assert!(!tcp_echo(&stranger.netns, to, T).unwrap(), "stranger denied without an agent");
    assert!(tcp_echo(&client.netns, to, T).unwrap(), "client allowed without an agent");
    assert!(echoes(&mut before), "a connection from before the stop still works");
    let mut during = open(&client, to);

    let second = RunningAgent::start_on(&dir, NODE, pins);
    second.wait_ready();
    assert!(echoes(&mut during), "a connection opened without an agent survives the adoption");
    assert!(!tcp_echo(&stranger.netns, to, T).unwrap(), "stranger denied after the restart");
    assert!(tcp_echo(&client.netns, to, T).unwrap(), "client allowed after the restart");
}

#[test]
fn attachments_removed_behind_the_agents_back_are_restored() {
    let mut lab = Lab::new().unwrap();
    let stranger = lab.add_pod("stranger").unwrap();
    let server = lab.add_pod("server").unwrap();
    let _http = TcpServer::start(&server.netns, 80).unwrap();
    let dir = ManifestDir::new("reconcile").unwrap();
    dir.write("ns.yaml", &namespace("prod", &[])).unwrap();
    dir.write("stranger.yaml", &pod(&stranger, "prod", NODE, &[("app", "stranger")], &[])).unwrap();
    dir.write("server.yaml", &pod(&server, "prod", NODE, &[("app", "server")], &[("http", 80)]))
        .unwrap();
    dir.write("policy.yaml", POLICY).unwrap();
    let to = SocketAddr::from((server.ip, 80));
    let pins = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/netpol-test-{}-reconcile",
        std::process::id()
    ));
    let agent = RunningAgent::start_with(&dir, NODE, pins, |o| {
        o.reconcile_interval = Duration::from_secs(3)
    });
    agent.wait_ready();
    netpol_it::probe::eventually(&stranger, to, false, "enforced");

    // An operator runs `netpol-agent uninstall` while the agent runs: the programs are detached
    // from every interface.
    let report = netpol_agent::uninstall::uninstall(&agent.pin_dir, &agent.status_file).unwrap();
    assert!(report.detached.len() >= 2, "something was detached: {report:?}");
    assert!(tcp_echo(&stranger.netns, to, T).unwrap(), "unenforced once detached");
    // The agent notices at its next check (every 3 s here) and attaches again.
    netpol_it::probe::eventually(&stranger, to, false, "enforced again after the reconcile");
}
