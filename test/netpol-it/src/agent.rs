//! The real agent (`netpol_agent::agent::run_until`) running in this process on a thread of
//! its own, on a lab node, fed by a manifest directory; plus a tiny loopback HTTP client for its
//! metrics and health endpoints.
use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use netpol_agent::{
    agent::{run_until, AgentOptions, SourceConfig},
    dataplane::{remove_pins, DataplaneOptions},
};

use crate::manifests::ManifestDir;

/// The agent, stopped and its pins removed on drop.
pub struct RunningAgent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    /// Where its maps are pinned.
    pub pin_dir: PathBuf,
    /// Its metrics and health endpoints (loopback).
    pub metrics_addr: SocketAddr,
    /// Its status file (what `netpol-agent inspect` reads).
    pub status_file: PathBuf,
}

impl RunningAgent {
    /// Starts the agent for node `node` on the manifests in `dir`, with maps pinned in a
    /// directory named after `name` and metrics on a loopback port of its own.
    pub fn start(dir: &ManifestDir, node: &str, name: &str) -> RunningAgent {
        let pin_dir =
            PathBuf::from(format!("/sys/fs/bpf/netpol-test-{}-{name}", std::process::id()));
        let _ = remove_pins(&pin_dir);
        RunningAgent::start_on(dir, node, pin_dir)
    }

    /// Starts the agent on the pins in `pin_dir`, adopting what a previous agent left there.
    pub fn start_on(dir: &ManifestDir, node: &str, pin_dir: PathBuf) -> RunningAgent {
        RunningAgent::start_with(dir, node, pin_dir, |_| {})
    }

    /// Like [`RunningAgent::start_on`], with options adjusted by `tweak`.
    pub fn start_with(
        dir: &ManifestDir,
        node: &str,
        pin_dir: PathBuf,
        tweak: impl FnOnce(&mut AgentOptions),
    ) -> RunningAgent {
        let metrics_addr = free_loopback_port();
        let status_file = pin_dir.with_extension("status.json");
        let status_file = std::env::temp_dir().join(status_file.file_name().unwrap_or_default());
        let mut opts = AgentOptions {
            node_name: node.into(),
            source: SourceConfig::Manifests(dir.path().to_owned()),
            dataplane: DataplaneOptions { pin_dir: pin_dir.clone(), ..Default::default() },
            allow_host_to_pods: true,
            retry_interval: Duration::from_millis(200),
            gc_interval: Duration::from_secs(10),
            reconcile_interval: Duration::from_secs(1),
            metrics_addr: Some(metrics_addr),
            per_pod_labels: true,
            status_file: Some(status_file.clone()),
            allow_foreign_programs: false,
        };
        tweak(&mut opts);
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
        RunningAgent { stop: Some(tx), thread: Some(thread), pin_dir, metrics_addr, status_file }
    }

    /// How many snapshots the agent has applied (the count of its apply-duration histogram).
    pub fn applies(&self) -> f64 {
        let text = get(self.metrics_addr, "/metrics");
        text.lines()
            .find(|l| l.starts_with("netpol_policy_apply_duration_seconds_count"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until the agent applied more than `before` snapshots (see [`RunningAgent::applies`]).
    pub fn wait_applied(&self, before: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.applies() <= before {
            assert!(Instant::now() < deadline, "the agent applied no new snapshot within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `/readyz` answers 200 (the first snapshot is enforced).
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !get(self.metrics_addr, "/readyz").starts_with("HTTP/1.1 200") {
            assert!(Instant::now() < deadline, "agent not ready within 10 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl RunningAgent {
    /// Waits up to `within` for the agent to stop by itself and returns how it ended; panics if
    /// it is still running then (for agents expected to refuse to start).
    pub fn wait_exit(mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let thread = self.thread.take().expect("the agent thread");
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                self.thread = Some(thread);
                panic!("the agent still runs after {within:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        thread.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the agent thread panicked")))
    }

    /// Stops the agent like a restart does: its attachments and maps stay pinned. Returns the
    /// pin directory for the next agent.
    pub fn stop_keeping_pins(mut self) -> PathBuf {
        self.stop_thread();
        std::mem::take(&mut self.pin_dir)
    }

    fn stop_thread(&mut self) {
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
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.stop_thread();
        // Removing the pins detaches the programs (this process no longer holds the links).
        if !self.pin_dir.as_os_str().is_empty() {
            let _ = remove_pins(&self.pin_dir);
            let _ = std::fs::remove_file(&self.status_file);
        }
    }
}

/// A loopback address with a port nobody listens on right now.
fn free_loopback_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 29808)))
}

/// GET `path` over loopback: the whole response (status line, headers, body); empty if the
/// agent does not answer within 5 s.
pub fn get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let req =
                format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
            if s.write_all(req.as_bytes()).is_ok() {
                let mut out = String::new();
                if s.read_to_string(&mut out).is_ok() && !out.is_empty() {
                    return out;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    String::new()
}

/// The sum of the samples of metric `name` whose labels include all of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
