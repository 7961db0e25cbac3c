//! API server loss, end to end: the real agent watches a fake Kubernetes API server (plain HTTP
//! on loopback) and enforces on lab pods. While the API server is down the agent keeps
//! enforcing the last state (allowed stays allowed, denied stays denied, established flows keep
//! working) and reports the source down; changes made during the outage (a policy replaced, a
//! pod relabelled) are enforced once it is back.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use netpol_it::{
    agent::RunningAgent,
    fake_api::FakeApi,
    lab::{Lab, Pod},
    manifests::ManifestDir,
    netns::in_netns,
    probe::{tcp_echo, TcpServer},
};
use serde_json::{json, Value};

const NODE: &str = "lab-node";
const T: Duration = Duration::from_millis(400);

fn pod_obj(p: &Pod, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": p.name, "namespace": "prod", "labels": {"app": app}, "resourceVersion": "1"},
           "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "x",
                    "ports": [{"name": "http", "containerPort": 80}]}]},
           "status": {"phase": "Running", "podIP": p.ip.to_string(), "podIPs": [{"ip": p.ip.to_string()}]}})
}

fn policy_obj(from_app: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "allow", "namespace": "prod", "resourceVersion": "1"},
           "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": from_app}}}],
                                 "ports": [{"port": 80}]}]}})
}

fn source_up(agent: &RunningAgent) -> f64 {
    let m = netpol_it::agent::get(agent.metrics_addr, "/metrics");
    m.lines()
        .find(|l| l.starts_with("netpol_source_up"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(-1.0)
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what} not within {secs} s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn api_server_loss_keeps_the_last_state_and_converges_after() {
    let mut lab = Lab::new().unwrap();
    let client = lab.add_pod("client").unwrap();
    let other = lab.add_pod("other").unwrap();
    let server = lab.add_pod("server").unwrap();
    let _http = TcpServer::start(&server.netns, 80).unwrap();
    let dir = ManifestDir::new("api-outage").unwrap();
    let api = FakeApi::start(dir.path());
    api.put(json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": "prod", "resourceVersion": "1"}}));
    api.put(pod_obj(&client, "client"));
    api.put(pod_obj(&other, "other"));
    api.put(pod_obj(&server, "server"));
    api.put(policy_obj("client"));

    let pins =
        std::path::PathBuf::from(format!("/sys/fs/bpf/netpol-test-{}-apiout", std::process::id()));
    let _ = netpol_agent::dataplane::remove_pins(&pins);
    let kubeconfig = api.kubeconfig().to_owned();
    let agent = RunningAgent::start_with(&dir, NODE, pins, |o| {
        o.source = netpol_agent::agent::SourceConfig::Kubernetes { kubeconfig: Some(kubeconfig) };
    });
    agent.wait_ready();
    let to = SocketAddr::from((server.ip, 80));
    netpol_it::probe::eventually(&client, to, true, "client allowed");
    netpol_it::probe::eventually(&other, to, false, "other denied");
    let mut conn = in_netns(&client.netns, || TcpStream::connect_timeout(&to, T)).unwrap().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let echo = |c: &mut TcpStream| {
        let mut b = [0u8; 5];
        c.write_all(b"ping\n").is_ok() && c.read_exact(&mut b).is_ok()
    };
    assert!(echo(&mut conn));

    // Outage; meanwhile the cluster changes: the policy now admits `other`, not `client`.
    api.set_down(true);
    wait_for("netpol_source_up 0", 30, || source_up(&agent) == 0.0);
    api.put(policy_obj("other"));
    let outage = Instant::now();
    let mut checks = 0;
    while outage.elapsed() < Duration::from_secs(6) {
        assert!(tcp_echo(&client.netns, to, T).unwrap(), "client still allowed during the outage");
        assert!(!tcp_echo(&other.netns, to, T).unwrap(), "other still denied during the outage");
        assert!(echo(&mut conn), "the established connection works during the outage");
        checks += 1;
    }
    assert_eq!(source_up(&agent), 0.0, "still reported down");

    // Back: the agent relists and enforces the changed state.
    let lists = api.lists_per_kind();
    api.set_down(false);
    let back = Instant::now();
    // Every watcher relists on its own backoff schedule; until the Pod watcher has, a pod change
    // cannot reach the agent (the last check below relabels a pod).
    wait_for("every kind relisted", 60, || {
        api.lists_per_kind().iter().zip(&lists).all(|(now, before)| *before == 0 || now > before)
    });
    wait_for("netpol_source_up 1", 60, || source_up(&agent) == 1.0);
    netpol_it::probe::eventually(&other, to, true, "other allowed after the outage");
    netpol_it::probe::eventually(&client, to, false, "client denied after the outage");
    println!(
        "API outage: {checks} rounds of checks during 6 s of outage, all as before; converged {:?} \
         after the API server returned",
        back.elapsed()
    );
    // And the source is live again: a change after the outage applies too.
    api.put(pod_obj(&client, "other"));
    netpol_it::probe::eventually(&client, to, true, "client relabelled to other");
}
