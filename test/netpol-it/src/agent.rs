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
        applies_at(self.metrics_addr)
    }

    /// Waits until the agent applied more than `before` snapshots (see [`RunningAgent::applies`]).
    pub fn wait_applied(&self, before: f64) {
        wait_applied_at(self.metrics_addr, before)
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
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Removes a test's pin directory (maps and links) when dropped, also when the test fails.
pub struct RemovePins(pub PathBuf);

impl Drop for RemovePins {
    fn drop(&mut self) {
        let _ = netpol_agent::dataplane::remove_pins(&self.0);
    }
}

/// The real `netpol-agent run` binary as a child process, so a test can `kill -9` it: the
/// crash an in-process agent cannot simulate. Killed (SIGKILL) on drop; pins are left for the
/// caller (a restart adopts them), and removed by [`AgentProcess::remove_pins`].
pub struct AgentProcess {
    child: std::process::Child,
    /// Where its maps are pinned.
    pub pin_dir: PathBuf,
    /// Its metrics and health endpoints (loopback).
    pub metrics_addr: SocketAddr,
    /// Its log (stderr).
    pub log: PathBuf,
    /// Its status file (a killed agent leaves it behind).
    status: PathBuf,
}

/// The `netpol-agent` binary next to the test binaries (`target/debug/netpol-agent`), or
/// `NETPOL_AGENT_BIN`. `cargo xtask test` builds it first; a missing binary fails loudly.
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NETPOL_AGENT_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/<test> → target/debug/netpol-agent
    let bin = exe.parent().and_then(|d| d.parent()).expect("target dir").join("netpol-agent");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p netpol-agent` (cargo xtask test does)",
        bin.display()
    );
    bin
}

impl AgentProcess {
    /// Starts `netpol-agent run` for `node` on the manifests in `dir`, pinning in `pin_dir`,
    /// with `extra` arguments (e.g. `--conntrack-size`).
    pub fn start(dir: &ManifestDir, node: &str, pin_dir: &std::path::Path, extra: &[&str]) -> Self {
        Self::start_wrapped(dir, node, pin_dir, extra, &[])
    }

    /// [`AgentProcess::start`] through `wrapper` (a command that execs the rest of its
    /// arguments, e.g. `setpriv` with a capability set), as a container runtime would start it.
    pub fn start_wrapped(
        dir: &ManifestDir,
        node: &str,
        pin_dir: &std::path::Path,
        extra: &[&str],
        wrapper: &[String],
    ) -> Self {
        let metrics_addr = free_loopback_port();
        let log = std::env::temp_dir().join(format!(
            "{}-agent-{}.log",
            pin_dir.file_name().unwrap_or_default().to_string_lossy(),
            metrics_addr.port()
        ));
        let status = std::env::temp_dir().join(format!(
            "{}.status.json",
            pin_dir.file_name().unwrap_or_default().to_string_lossy()
        ));
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = std::process::Command::new(program);
                c.args(args).arg(agent_binary());
                c
            }
            None => std::process::Command::new(agent_binary()),
        };
        let child = cmd
            .args(["run", "--node-name", node, "--manifests"])
            .arg(dir.path())
            .arg("--pin-dir")
            .arg(pin_dir)
            .arg("--status-file")
            .arg(&status)
            .args(["--metrics-addr", &metrics_addr.to_string(), "--per-pod-metrics"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log file"))
            .spawn()
            .expect("starting netpol-agent");
        AgentProcess { child, pin_dir: pin_dir.to_owned(), metrics_addr, log, status }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`: no shutdown code runs; the pinned maps and links are all that survives.
    pub fn kill(mut self) {
        self.kill_now();
    }

    /// SIGTERM, as the kubelet stops a DaemonSet pod in a rolling update; waits until the agent
    /// exited and returns its exit status (panics with its log after 10 s).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        self.wait_exit(Duration::from_secs(10))
    }

    /// The exit status if the agent has exited, without waiting.
    pub fn try_exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits until the agent exits by itself and returns its exit status (panics with its log
    /// if it still runs after `within`).
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent still running after {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until `/readyz` answers 200; panics with the agent's log otherwise.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !get(self.metrics_addr, "/readyz").starts_with("HTTP/1.1 200") {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("agent exited ({status}):\n{}", self.log_text());
            }
            assert!(Instant::now() < deadline, "agent not ready within 20 s:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's `/metrics` text.
    pub fn metrics(&self) -> String {
        get(self.metrics_addr, "/metrics")
    }

    /// How many snapshots the agent has applied (see [`RunningAgent::applies`]).
    pub fn applies(&self) -> f64 {
        applies_at(self.metrics_addr)
    }

    /// Waits until the agent applied more than `before` snapshots.
    pub fn wait_applied(&self, before: f64) {
        wait_applied_at(self.metrics_addr, before)
    }

    /// The agent's resident set size in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill_now();
        let _ = std::fs::remove_file(&self.status);
        if std::thread::panicking() {
            // The test failed: the agent's log is the first thing to read.
            eprintln!("agent log kept: {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// How many snapshots the agent serving metrics at `addr` has applied (the count of its
/// apply-duration histogram).
fn applies_at(addr: SocketAddr) -> f64 {
    get(addr, "/metrics")
        .lines()
        .find(|l| l.starts_with("netpol_policy_apply_duration_seconds_count"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until the agent at `addr` applied more than `before` snapshots.
fn wait_applied_at(addr: SocketAddr, before: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while applies_at(addr) <= before {
        assert!(Instant::now() < deadline, "the agent applied no new snapshot within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}
