//! `netpol-agent run --manifests DIR` end to end: the real agent (in this process) on a lab node,
//! with pods, namespaces and policies created, relabelled and deleted while traffic runs.
use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use netpol_agent::{
    agent::{run_until, AgentOptions, SourceConfig},
    dataplane::{remove_pins, DataplaneOptions},
};
use netpol_it::{
    lab::{Lab, Pod, Topology},
    manifests::{namespace, pod, ManifestDir},
    probe::{tcp_echo, TcpServer},
};

const NODE: &str = "lab-node";
const T: Duration = Duration::from_millis(400);

/// The agent running on a thread of its own until dropped.
struct RunningAgent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    pin_dir: PathBuf,
}

impl RunningAgent {
    fn start(dir: &ManifestDir, test: &str, metrics_addr: SocketAddr) -> RunningAgent {
        let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("info").try_init();
        let pin_dir =
            PathBuf::from(format!("/sys/fs/bpf/netpol-test-{}-{test}", std::process::id()));
        let opts = AgentOptions {
            node_name: NODE.into(),
            source: SourceConfig::Manifests(dir.path().to_owned()),
            dataplane: DataplaneOptions { pin_dir: pin_dir.clone(), ..Default::default() },
            allow_host_to_pods: true,
            retry_interval: Duration::from_millis(200),
            gc_interval: Duration::from_secs(10),
            metrics_addr: Some(metrics_addr),
            per_pod_labels: true,
            status_file: None,
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?
                .block_on(run_until(opts, async move {
                    let _ = rx.await;
                }))
        });
        RunningAgent { stop: Some(tx), thread: Some(thread), pin_dir }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("agent failed: {e:#}"),
                Err(_) => eprintln!("agent thread panicked"),
            }
        }
        let _ = remove_pins(&self.pin_dir);
    }
}

/// Polls until `from` reaching `to` equals `want` (policy changes take effect asynchronously).
#[track_caller]
fn eventually(from: &Pod, to: SocketAddr, want: bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = tcp_echo(&from.netns, to, T).unwrap();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} -> {to} expected {}",
            from.name,
            if want { "reach" } else { "blocked" }
        );
    }
}

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
        // Metrics on loopback, on a port derived from the process id to avoid collisions.
        let metrics_addr =
            SocketAddr::from(([127, 0, 0, 1], 20000 + (std::process::id() % 20000) as u16));
        let _agent = RunningAgent::start(&dir, &format!("agent{topology:?}"), metrics_addr);

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

/// GET `path` over loopback; the whole response (status line, headers, body).
fn scrape(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, T) {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let req =
                format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
            if s.write_all(req.as_bytes()).is_ok() {
                let mut out = String::new();
                if s.read_to_string(&mut out).is_ok() && !out.is_empty() {
                    return out;
                }
            }
        }
        assert!(Instant::now() < deadline, "no answer from {addr}{path}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of the first sample of `name` whose labels include `labels` (0 if none).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
