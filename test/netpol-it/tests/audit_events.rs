//! Audit mode and deny-event logs end to end: the real agent (in this process) on a routed lab
//! node. A deny-all policy annotated `netpol.io/audit: "true"` lets the denied connection pass
//! and counts it as `audit`; without the annotation the connection is blocked; a namespace
//! labelled for audit lets it pass again. Every would-be drop and drop is logged (target
//! `netpol::deny`) with the pod names, captured here as JSON lines.
use std::{
    io::Write,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use netpol_it::{
    agent::{get as scrape, sample, RunningAgent},
    lab::{Lab, Topology},
    manifests::{namespace, pod, ManifestDir},
    probe::{eventually, tcp_echo, TcpServer},
};
use serde_json::Value;

const NODE: &str = "lab-node";
const T: Duration = Duration::from_millis(400);

/// Log lines written by every thread of this process (the agent runs on its own thread).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Installs the process-wide subscriber: JSON lines into the shared buffer.
    fn install() -> Captured {
        let c = Captured::default();
        let w = c.clone();
        tracing_subscriber::fmt()
            .json()
            .with_env_filter("info,netpol::deny=warn")
            .with_writer(move || w.clone())
            .try_init()
            .expect("the only subscriber of this test binary");
        c
    }

    /// The `fields` of every captured deny/audit event.
    fn deny_events(&self) -> Vec<Value> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "netpol::deny")
            .map(|v| v["fields"].clone())
            .collect()
    }

    /// Everything captured, for failure messages.
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Polls until some captured deny event has all of `fields`; returns it.
#[track_caller]
fn logged(log: &Captured, fields: &[(&str, &str)], what: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = log
            .deny_events()
            .into_iter()
            .find(|f| fields.iter().all(|(k, v)| f[*k].as_str() == Some(*v)));
        if let Some(f) = found {
            return f;
        }
        assert!(Instant::now() < deadline, "{what}: no event with {fields:?}:\n{}", log.text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn deny_all(audit: bool) -> String {
    let annotations = if audit { "  annotations:\n    netpol.io/audit: \"true\"\n" } else { "" };
    format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: default-deny\n  namespace: prod\n{annotations}spec:\n  podSelector: {{}}\n  policyTypes: [Ingress]\n")
}

#[test]
fn audit_annotation_passes_counts_and_logs_would_be_drops() {
    let log = Captured::install();
    let mut lab = Lab::with_topology(Topology::Routed).unwrap();
    let front = lab.add_pod("front").unwrap();
    let back = lab.add_pod("back").unwrap();
    let _srv = TcpServer::start(&back.netns, 80).unwrap();
    let dir = ManifestDir::new("audit-events").unwrap();
    dir.write("ns.yaml", &namespace("prod", &[("env", "prod")])).unwrap();
    dir.write("front.yaml", &pod(&front, "prod", NODE, &[("app", "frontend")], &[])).unwrap();
    dir.write("back.yaml", &pod(&back, "prod", NODE, &[("app", "backend")], &[("http", 80)]))
        .unwrap();
    let to = SocketAddr::from((back.ip, 80));
    let agent = RunningAgent::start(&dir, NODE, "audit");
    // Policy deadlines below start once the programs are loaded and the first snapshot enforced.
    agent.wait_ready();
    let metrics_addr = agent.metrics_addr;
    eventually(&front, to, true, "no policy");

    // Deny all ingress, in audit mode: the connection still succeeds, and once the policy is in
    // force it is counted as an audit verdict (counters are published every second: poll).
    dir.write("deny.yaml", &deny_all(true)).unwrap();
    let labels = [("direction", "ingress"), ("verdict", "audit")];
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        assert!(tcp_echo(&front.netns, to, T).unwrap(), "audit mode must not drop");
        let m = scrape(metrics_addr, "/metrics");
        if sample(&m, "netpol_policy_verdicts_total", &labels) > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no audit verdicts in /metrics:\n{m}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let audit = logged(
        &log,
        &[("verdict", "audit"), ("pod", "prod/back"), ("peer", "prod/front")],
        "audit event",
    );
    assert_eq!(audit["direction"], "ingress", "{audit}");
    assert_eq!(audit["isolated_by"], "prod/default-deny", "{audit}");
    assert_eq!(audit["dst"], to.to_string(), "{audit}");

    // Without the annotation the policy is enforced, and the drops are logged as denies.
    dir.write("deny.yaml", &deny_all(false)).unwrap();
    eventually(&front, to, false, "annotation removed");
    // The first blocked attempt may be a flow audited before (dropped as `policy_changed`); a
    // new connection is a plain `policy_deny`.
    assert!(!tcp_echo(&front.netns, to, T).unwrap(), "enforced");
    let deny = logged(
        &log,
        &[("verdict", "deny"), ("reason", "policy_deny"), ("pod", "prod/back")],
        "deny event",
    );
    assert_eq!(deny["peer"], "prod/front", "{deny}");
    assert_eq!(deny["isolated_by"], "prod/default-deny", "{deny}");

    // The namespace label puts every pod of the namespace in audit mode.
    dir.write("ns.yaml", &namespace("prod", &[("env", "prod"), ("netpol.io/audit", "true")]))
        .unwrap();
    eventually(&front, to, true, "namespace in audit mode");
    dir.write("ns.yaml", &namespace("prod", &[("env", "prod")])).unwrap();
    eventually(&front, to, false, "namespace audit label removed");
}
