//! `apply`: time from a policy or label change written to the manifests directory until the
//! first packet gets the new verdict, with the real agent on a lab node.
//!
//! A client pod sends a UDP datagram from a fresh socket (a new flow) to a server pod every
//! ~1 ms; each carries its sequence number, and the send time of every sequence number is
//! recorded. The namespace denies ingress by default; the server is allowed from pods labelled
//! `role=client` on the probe port. Changes cycle through: delete the allow policy (deny),
//! write it again (allow), relabel the client `role=other` (deny), relabel it back (allow).
//! After the run, for each change written at `t`:
//! - to allow: the first probe sent after `t` that arrived;
//! - to deny: the first probe sent after the last probe (sent after `t`) that arrived;
//!
//! and the latency is that probe's send time minus `t` (resolution: the probe interval).
//! Baseline in the same run: the file source's debounce (a constant wait after the first file
//! event) and the agent's own mean apply duration from its metrics.
use std::{
    collections::BTreeSet,
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use netpol_agent::source::files::FilesSourceOptions;
use netpol_it::{
    agent::{get, RunningAgent},
    lab::Lab,
    manifests::{namespace, pod, ManifestDir},
    netns::in_netns,
};
use serde_json::json;

use crate::{median, percentile, Size};

const NODE: &str = "bench-node";
const PORT: u16 = 9999;
const TARGET_P99_MS: f64 = 250.0;
/// Changes whose flip was not seen within this time count as this long (and are reported).
const FLIP_TIMEOUT: Duration = Duration::from_secs(5);

const DENY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: default-deny\n  namespace: lab\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n";

fn allow() -> String {
    format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: allow-client\n  namespace: lab\nspec:\n  podSelector:\n    matchLabels: {{app: server}}\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels: {{role: client}}\n    ports:\n    - protocol: UDP\n      port: {PORT}\n")
}

/// A policy of the background load: selects no lab pod, but the agent compiles it every time.
fn filler(i: u32) -> String {
    format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: filler-{i}\n  namespace: lab\nspec:\n  podSelector:\n    matchLabels: {{app: filler{}}}\n  ingress:\n  - from:\n    - ipBlock: {{cidr: 10.64.{}.0/24}}\n    ports:\n    - port: {}\n", i % 50, i % 250, 1000 + i)
}

/// What the probe threads share: send times by sequence number, and what arrived.
#[derive(Default)]
struct Record {
    sent: Vec<Instant>,
    received: BTreeSet<u64>,
}

/// The client's sender and the server's receiver, stopped on drop.
struct Prober {
    stop: Arc<AtomicBool>,
    record: Arc<Mutex<Record>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(client_ns: &str, server_ns: &str, to: SocketAddr) -> Result<Prober> {
        let stop = Arc::new(AtomicBool::new(false));
        let record = Arc::new(Mutex::new(Record::default()));
        let rx = in_netns(server_ns, || UdpSocket::bind(("0.0.0.0", PORT)))?
            .context("binding the probe receiver")?;
        rx.set_read_timeout(Some(Duration::from_millis(50)))?;
        let (s, r) = (stop.clone(), record.clone());
        let receiver = std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            while !s.load(Ordering::Relaxed) {
                if let Ok((8, _)) = rx.recv_from(&mut buf) {
                    let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
                    r.lock().expect("record").received.insert(seq);
                }
            }
        });
        let (s, r, ns) = (stop.clone(), record.clone(), client_ns.to_owned());
        let sender = std::thread::spawn(move || {
            let res = in_netns(&ns, || {
                while !s.load(Ordering::Relaxed) {
                    // A fresh socket per probe: every probe is a new flow.
                    if let Ok(sock) = UdpSocket::bind("0.0.0.0:0") {
                        let mut rec = r.lock().expect("record");
                        let seq = rec.sent.len() as u64;
                        rec.sent.push(Instant::now());
                        drop(rec);
                        let _ = sock.send_to(&seq.to_be_bytes(), to);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            if let Err(e) = res {
                eprintln!("prober: {e:#}");
            }
        });
        Ok(Prober { stop, record, threads: vec![receiver, sender] })
    }

    /// Whether the verdict seen after `t` is `allowed` (for waiting; the exact flip time is
    /// computed afterwards).
    fn flipped(&self, t: Instant, allowed: bool) -> bool {
        let rec = self.record.lock().expect("record");
        if allowed {
            let first = rec.sent.partition_point(|s| *s < t) as u64;
            return rec.received.range(first..).next().is_some();
        }
        // Denied: the last 20 probes (~20 ms), all sent after t, were lost.
        let lost_from = rec.received.last().map_or(0, |l| l + 1) as usize;
        let n = rec.sent.len();
        n >= lost_from + 20 && rec.sent[n - 20] >= t
    }

    /// The flip latency of the change written at `t` before `next` (`None`: no flip seen).
    fn latency(&self, t: Instant, next: Instant, allowed: bool) -> Option<Duration> {
        let rec = self.record.lock().expect("record");
        let a = rec.sent.partition_point(|s| *s < t) as u64;
        let b = rec.sent.partition_point(|s| *s < next) as u64;
        let flip = if allowed {
            rec.received.range(a..b).next().copied()?
        } else {
            match rec.received.range(a..b).next_back() {
                Some(&last) => last + 1,
                None => a,
            }
        };
        if std::env::var_os("NETPOL_BENCH_DEBUG").is_some() {
            let pattern: String = (a..b.min(a + 120))
                .map(|i| if rec.received.contains(&i) { '+' } else { '.' })
                .collect();
            eprintln!("allowed={allowed} a={a} b={b} flip={flip} {pattern}");
        }
        (flip < b).then(|| rec.sent[flip as usize] - t)
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The agent's apply-duration histogram: (sum in seconds, count).
fn apply_durations(agent: &RunningAgent) -> (f64, f64) {
    let text = get(agent.metrics_addr, "/metrics");
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    (
        value("netpol_policy_apply_duration_seconds_sum"),
        value("netpol_policy_apply_duration_seconds_count"),
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Policy,
    Label,
}

pub fn run(size: Size) -> Result<serde_json::Value> {
    let (changes, fillers) = match size {
        Size::Full => (100u32, 100u32),
        Size::Quick => (4, 2),
    };
    let debounce = FilesSourceOptions::new("/").debounce;
    let mut lab = Lab::new()?;
    let client = lab.add_pod("client")?;
    let server = lab.add_pod("server")?;
    let dir = ManifestDir::new("bench-apply")?;
    dir.write("ns.yaml", &namespace("lab", &[]))?;
    let client_yaml = |role: &str| pod(&client, "lab", NODE, &[("role", role)], &[]);
    dir.write("client.yaml", &client_yaml("client"))?;
    dir.write("server.yaml", &pod(&server, "lab", NODE, &[("app", "server")], &[]))?;
    dir.write("deny.yaml", DENY)?;
    dir.write("allow.yaml", &allow())?;
    for i in 0..fillers {
        dir.write(&format!("filler-{i}.yaml"), &filler(i))?;
    }
    let agent = RunningAgent::start(&dir, NODE, "bench-apply");
    agent.wait_ready();
    let prober = Prober::start(&client.netns, &server.netns, SocketAddr::from((server.ip, PORT)))?;
    let t0 = Instant::now();
    while !prober.flipped(t0, true) {
        anyhow::ensure!(t0.elapsed() < FLIP_TIMEOUT, "the probes never got through at start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (sum0, count0) = apply_durations(&agent);

    // (write time, kind, allowed after)
    let mut written: Vec<(Instant, Kind, bool)> = Vec::new();
    let mut timeouts = 0;
    for k in 0..changes {
        let (kind, allowed) = match k % 4 {
            0 => (Kind::Policy, false),
            1 => (Kind::Policy, true),
            2 => (Kind::Label, false),
            _ => (Kind::Label, true),
        };
        let t = Instant::now();
        match k % 4 {
            0 => dir.remove("allow.yaml")?,
            1 => dir.write("allow.yaml", &allow())?,
            2 => dir.write("client.yaml", &client_yaml("other"))?,
            _ => dir.write("client.yaml", &client_yaml("client"))?,
        }
        written.push((t, kind, allowed));
        while !prober.flipped(t, allowed) {
            if t.elapsed() > FLIP_TIMEOUT {
                timeouts += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Let the new verdict settle so the next change starts from a clean state.
        std::thread::sleep(Duration::from_millis(60));
    }
    let end = Instant::now();
    std::thread::sleep(Duration::from_millis(20));
    let (sum1, count1) = apply_durations(&agent);
    let applies = count1 - count0;
    let mean_apply_ms = if applies > 0.0 { (sum1 - sum0) / applies * 1e3 } else { 0.0 };

    let mut all = Vec::new();
    let mut by_kind = [Vec::new(), Vec::new()];
    let mut missing = 0;
    for (i, &(t, kind, allowed)) in written.iter().enumerate() {
        let next = written.get(i + 1).map_or(end, |w| w.0);
        match prober.latency(t, next, allowed) {
            Some(d) => {
                let ms = d.as_secs_f64() * 1e3;
                all.push(ms);
                by_kind[(kind == Kind::Label) as usize].push(ms);
            }
            None => {
                missing += 1;
                all.push(FLIP_TIMEOUT.as_secs_f64() * 1e3);
            }
        }
    }
    let probes = prober.record.lock().expect("record").sent.len();
    drop(prober);
    drop(agent);

    let debounce_ms = debounce.as_secs_f64() * 1e3;
    println!("netpol apply benchmark: manifest change → first packet with the new verdict");
    println!(
        "real agent on a lab node; {changes} changes (policy delete/create, pod relabel), {fillers} other policies; UDP probe every ~1 ms ({probes} probes)"
    );
    println!(
        "baseline (same run): file-source debounce {debounce_ms:.0} ms (constant); agent's mean apply {mean_apply_ms:.2} ms over {applies} applies\n"
    );
    println!(
        "{:<22} {:>6} {:>10} {:>10} {:>10} {:>22}",
        "changes", "n", "p50", "p99", "max", "target"
    );
    let mut rows = Vec::new();
    for (what, v) in [("all", &all), ("policy", &by_kind[0]), ("label", &by_kind[1])] {
        let mut v = v.clone();
        let (p50, p99) = (median(&mut v), percentile(&mut v, 99.0));
        let max = v.last().copied().unwrap_or(0.0);
        let target = if what == "all" {
            format!(
                "p99 ≤ {TARGET_P99_MS} ms {}",
                if p99 <= TARGET_P99_MS { "met" } else { "MISSED" }
            )
        } else {
            String::new()
        };
        println!(
            "{what:<22} {:>6} {p50:>7.1} ms {p99:>7.1} ms {max:>7.1} ms {target:>22}",
            v.len()
        );
        rows.push(
            json!({"changes": what, "n": v.len(), "p50_ms": p50, "p99_ms": p99, "max_ms": max,
            "p50_vs_debounce": p50 / debounce_ms}),
        );
    }
    println!(
        "\np50 = {:.2}× the debounce; flips not seen within {} s: {missing} (waits timed out: {timeouts})",
        rows[0]["p50_ms"].as_f64().unwrap_or(0.0) / debounce_ms,
        FLIP_TIMEOUT.as_secs()
    );
    let mut sorted = all.clone();
    let p99 = percentile(&mut sorted, 99.0);
    Ok(json!({
        "benchmark": "apply",
        "method": "real agent, manifests dir, UDP probe per ~1 ms from a fresh socket; latency = send time of the first probe with the new verdict - write time",
        "changes": changes, "filler_policies": fillers, "probes": probes,
        "debounce_ms": debounce_ms, "mean_apply_ms": mean_apply_ms, "applies": applies,
        "missing_flips": missing,
        "rows": rows,
        "latencies_ms": all,
        "targets": { "p99_ms": TARGET_P99_MS, "p99_met": p99 <= TARGET_P99_MS },
        "machine": crate::machine(),
    }))
}
