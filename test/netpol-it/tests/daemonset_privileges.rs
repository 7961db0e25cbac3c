//! The DaemonSet's privileges, for real: the agent and the uninstall job run with exactly the
//! capabilities `deploy/` gives their containers — read from the manifests, so the two cannot
//! drift apart — as the only capabilities in the process's bounding set (what a container
//! runtime does with `drop: [ALL]` plus `add:`), with no_new_privs for
//! `allowPrivilegeEscalation: false`. Against a lab pod under policy, with real traffic.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use netpol_it::{
    agent::{agent_binary, sample, AgentProcess},
    lab::Lab,
    manifests::{namespace, pod, ManifestDir},
    probe::{eventually, TcpServer},
};
use serde_yaml::Value;

const NODE: &str = "lab-node";
const POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: prod}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: client}}
    ports:
    - {port: 80}
";

/// The security context of container `name` (init or regular) of the DaemonSet in `file`
/// (relative to the workspace root): its added capabilities and whether it forbids privilege
/// escalation. Panics if the manifest does not drop every other capability.
fn container_privileges(file: &str, name: &str) -> (Vec<String>, bool) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(file);
    let text = std::fs::read_to_string(&path).expect("reading the DaemonSet");
    let ds: Value = serde_yaml::from_str(&text).expect("DaemonSet YAML");
    let spec = &ds["spec"]["template"]["spec"];
    let container = ["initContainers", "containers"]
        .iter()
        .filter_map(|k| spec[*k].as_sequence())
        .flatten()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("{file}: no container {name}"));
    let sc = &container["securityContext"];
    assert_eq!(sc["privileged"].as_bool(), Some(false), "{file}/{name} is not privileged");
    let caps = &sc["capabilities"];
    let drop: Vec<&str> =
        caps["drop"].as_sequence().into_iter().flatten().filter_map(Value::as_str).collect();
    assert_eq!(drop, ["ALL"], "{file}/{name} drops every capability it does not add");
    let add = caps["add"]
        .as_sequence()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().expect("capability name").to_owned())
        .collect();
    (add, sc["allowPrivilegeEscalation"].as_bool() == Some(false))
}

/// `setpriv` arguments that leave exactly `caps` (Kubernetes names, e.g. `NET_ADMIN`) to a root
/// process: for uid 0 the effective set after exec is the bounding set.
fn setpriv(caps: &[String], no_new_privs: bool) -> Vec<String> {
    let mut bounding = String::from("-all");
    for c in caps {
        bounding.push_str(&format!(",+{}", c.to_lowercase()));
    }
    let mut args = vec![
        "setpriv".to_owned(),
        "--bounding-set".to_owned(),
        bounding,
        "--inh-caps".to_owned(),
        "-all".to_owned(),
    ];
    if no_new_privs {
        args.push("--no-new-privs".to_owned());
    }
    args.push("--".to_owned());
    args
}

struct Node {
    pins: PathBuf,
    dir: ManifestDir,
    client: netpol_it::lab::Pod,
    server: netpol_it::lab::Pod,
    _servers: [TcpServer; 2],
    _lab: Lab,
}

impl Node {
    fn new(test: &str) -> Node {
        let mut lab = Lab::new().unwrap();
        let client = lab.add_pod("client").unwrap();
        let server = lab.add_pod("server").unwrap();
        let servers = [
            TcpServer::start(&server.netns, 80).unwrap(),
            TcpServer::start(&server.netns, 81).unwrap(),
        ];
        let dir = ManifestDir::new(test).unwrap();
        dir.write("ns.yaml", &namespace("prod", &[])).unwrap();
        dir.write("client.yaml", &pod(&client, "prod", NODE, &[("app", "client")], &[])).unwrap();
        dir.write(
            "server.yaml",
            &pod(&server, "prod", NODE, &[("app", "server")], &[("http", 80), ("alt", 81)]),
        )
        .unwrap();
        dir.write("policy.yaml", POLICY).unwrap();
        let pins = PathBuf::from(format!("/sys/fs/bpf/netpol-test-{}-{test}", std::process::id()));
        let _ = netpol_agent::dataplane::remove_pins(&pins);
        Node { pins, dir, client, server, _servers: servers, _lab: lab }
    }

    fn to(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.server.ip, port))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = netpol_agent::dataplane::remove_pins(&self.pins);
    }
}

#[test]
fn agent_and_uninstall_work_with_exactly_the_daemonset_capabilities() {
    netpol_it::require_root();
    let (caps, no_new_privs) = container_privileges("deploy/base/daemonset.yaml", "agent");
    assert!(no_new_privs, "the agent container sets allowPrivilegeEscalation: false");
    println!("agent container capabilities: {caps:?}");
    let node = Node::new("caps");
    let wrapper = setpriv(&caps, no_new_privs);
    let mut agent = AgentProcess::start_wrapped(&node.dir, NODE, &node.pins, &[], &wrapper);
    agent.wait_ready();
    eventually(&node.client, node.to(80), true, "the allowed port");
    eventually(&node.client, node.to(81), false, "the denied port");
    assert_eq!(
        netpol_it::lab::tcx_programs(&node.server.host_if),
        (1, 1),
        "attached with these capabilities"
    );
    // Counters are published once a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let drops = loop {
        let drops = sample(
            &agent.metrics(),
            "netpol_drop_count_total",
            &[("direction", "ingress"), ("reason", "policy_deny")],
        );
        if drops >= 1.0 || std::time::Instant::now() > deadline {
            break drops;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(drops >= 1.0, "the denied SYNs were counted: {drops}");
    // A restart with the same privileges adopts the pinned links (reading the attached
    // programs by id to recognise them as its predecessor's).
    assert!(agent.terminate().success(), "the agent stops cleanly on SIGTERM");
    let mut agent = AgentProcess::start_wrapped(&node.dir, NODE, &node.pins, &[], &wrapper);
    agent.wait_ready();
    assert_eq!(
        netpol_it::lab::tcx_programs(&node.server.host_if),
        (1, 1),
        "adopted, not attached twice"
    );
    eventually(&node.client, node.to(81), false, "denied after the restart");
    assert!(agent.terminate().success(), "the agent stops cleanly on SIGTERM");
    eventually(&node.client, node.to(81), false, "still denied after the agent stopped");

    // The uninstall DaemonSet's init container, with its own declared privileges.
    let (caps, no_new_privs) = container_privileges("deploy/uninstall/daemonset.yaml", "uninstall");
    let wrapper = setpriv(&caps, no_new_privs);
    let out = Command::new(&wrapper[0])
        .args(&wrapper[1..])
        .arg(agent_binary())
        .arg("uninstall")
        .arg("--pin-dir")
        .arg(&node.pins)
        .arg("--status-file")
        // Where AgentProcess had the agent write it.
        .arg(std::env::temp_dir().join(format!(
            "{}.status.json",
            node.pins.file_name().unwrap_or_default().to_string_lossy()
        )))
        .output()
        .expect("running uninstall");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "uninstall with the DaemonSet's capabilities: {log}");
    assert!(!node.pins.exists(), "uninstall removed the pins");
    assert_eq!(
        netpol_it::lab::tcx_programs(&node.server.host_if),
        (0, 0),
        "uninstall detached the programs"
    );
    eventually(&node.client, node.to(81), true, "reachable once netpol is gone");
}

/// Which of the granted capabilities matter. SYS_ADMIN cannot be dropped: an agent that finds
/// programs on a pod's interface (its predecessor's, after every restart or upgrade) reads them
/// by id to tell its own from another enforcer's, which takes CAP_SYS_ADMIN. The kernel's
/// `bpf_capable`, `perfmon_capable` and `bpf_net_capable` all accept SYS_ADMIN too, so on
/// these kernels it alone also covers what BPF, PERFMON and NET_ADMIN grant.
#[test]
fn sys_admin_is_needed_to_restart_and_covers_the_other_three() {
    netpol_it::require_root();
    let (caps, no_new_privs) = container_privileges("deploy/base/daemonset.yaml", "agent");
    assert!(caps.iter().any(|c| c == "SYS_ADMIN"), "the DaemonSet grants SYS_ADMIN");
    let node = Node::new("sysadmin");

    let only = setpriv(&["SYS_ADMIN".to_owned()], no_new_privs);
    let mut first = AgentProcess::start_wrapped(&node.dir, NODE, &node.pins, &[], &only);
    first.wait_ready();
    eventually(&node.client, node.to(81), false, "denied by an agent with SYS_ADMIN alone");
    assert_eq!(
        netpol_it::lab::tcx_programs(&node.server.host_if),
        (1, 1),
        "attached with SYS_ADMIN alone"
    );
    assert!(first.terminate().success());

    let fewer: Vec<String> = caps.iter().filter(|c| *c != "SYS_ADMIN").cloned().collect();
    let mut second = AgentProcess::start_wrapped(
        &node.dir,
        NODE,
        &node.pins,
        &[],
        &setpriv(&fewer, no_new_privs),
    );
    // Loading and verifying the programs alone takes ~3 s on the test machines: wait for the
    // agent to get as far as the attached programs (or to exit) rather than a fixed time.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline
        && !second.log_text().contains("Operation not permitted")
        && second.try_exit_status().is_none()
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = second.log_text();
    let ready = netpol_it::agent::get(second.metrics_addr, "/readyz").starts_with("HTTP/1.1 200");
    println!(
        "restart without SYS_ADMIN ({fewer:?}): ready={ready}, exited={:?}",
        second.try_exit_status()
    );
    println!("{}", log.lines().find(|l| l.contains("ERROR")).unwrap_or_default());
    assert!(!ready, "without SYS_ADMIN a restarted agent must not report ready:\n{log}");
    assert!(
        log.contains("Operation not permitted"),
        "the log says why (EPERM reading the attached programs):\n{log}"
    );
    // The predecessor's programs stay attached and keep enforcing.
    assert_eq!(netpol_it::lab::tcx_programs(&node.server.host_if), (1, 1));
    eventually(&node.client, node.to(81), false, "still denied");
    eventually(&node.client, node.to(80), true, "still allowed");
}
