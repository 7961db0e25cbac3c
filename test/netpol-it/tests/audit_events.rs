//! Audit mode and deny-event logs end to end: the real agent (in this process) on a routed lab
//! node. A deny-all policy annotated `netpol.io/audit: "true"` lets the denied connection pass
//! and counts it as `audit`; without the annotation the connection is blocked; a namespace
//! labelled for audit lets it pass again. Every would-be drop and drop is logged (target
//! `netpol::deny`) with the pod names, captured here as JSON lines.
use std::{
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
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

/// The agent running on a thread of its own until dropped.
struct RunningAgent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    pin_dir: PathBuf,
}

impl RunningAgent {
    fn start(dir: &ManifestDir, test: &str, metrics_addr: SocketAddr) -> RunningAgent {
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
    let metrics_addr =
        SocketAddr::from(([127, 0, 0, 1], 20000 + (std::process::id() % 20000) as u16));
    let _agent = RunningAgent::start(&dir, "audit", metrics_addr);
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

/// GET `path` over loopback; the whole response (status line, headers, body).
fn scrape(addr: SocketAddr, path: &str) -> String {
    use std::io::Read;
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

/// The sum of the samples of `name` whose labels include `labels` (0 if none).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
