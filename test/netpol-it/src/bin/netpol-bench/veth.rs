//! `veth`: TCP throughput and request/response latency between two lab pods (routed topology,
//! forwarded by the host), four variants interleaved in every repetition:
//! - floor: no program, no rules;
//! - netpol: the real agent enforcing N policies that select the server;
//! - iptables: the same N policies rendered Felix-style (see [`crate::felix`]);
//! - empty: netpol's empty program `bench_floor` at the hooks netpol uses (TCX ingress and
//!   egress of both pods' host-side interfaces), no agent: what attaching any TC program there
//!   costs a round trip, the part of netpol's overhead its programs' logic cannot remove.
//!
//! The policy set: N policies select the server (`app=server`), each with one ingress rule;
//! policies 0..N-1 allow an ipBlock (a /28 outside the lab) on one port, and the last one allows
//! the client pod (`role=client`) on the benchmark ports. The client's policy is the last in
//! the iptables chain order: a new connection walks every policy chain (the worst case of
//! the iptables rendering; netpol's lookup does not depend on the position).
//!
//! Measured per variant: iperf3 throughput (Gbit/s), TCP_RR (one 32-byte request and reply on
//! an open connection; p50 round trip) and TCP_CRR (connect, request, reply, close; p50).
//! The client's and the server's threads of TCP_RR and TCP_CRR run on one CPU ([`BENCH_CPU`]):
//! a wakeup on another CPU costs an inter-processor interrupt, which in a VM costs more than
//! the whole datapath and varies from run to run, so unpinned round trips measured mostly
//! where the scheduler put the two threads.
//! With netpol, a further pass of TCP_RR runs with `kernel.bpf_stats_enabled` and reads the run
//! time the kernel accounted to the programs: their own cost per round trip, free of the noise
//! that moves the p50 columns by several percent between repetitions. The kernel's accounting
//! is not free: it reads `sched_clock` before and after every run, and a run's time includes
//! about one read's cost (under KVM a pvclock read, which a profile of this benchmark puts at
//! more than netpol's programs themselves). So the same pass also runs an empty program
//! (`bench_floor`) at both hooks of each pod's own interface, as many runs per round trip,
//! accounted the same way: netpol's net cost is its time minus that floor, as in `datapath`.
//! Each variant also checks that its enforcement is real: a port no policy allows must be
//! unreachable under netpol and iptables, and reachable under the floor.
//!
//! TCP_RR paired: the p50 of one TCP_RR pass moves between repetitions by more than the 2 %
//! target (here round trips take either ~17 or ~21 µs, and a pass lands in one or the other).
//! So each variant also runs TCP_RR on two pairs at once, alternating every [`PAIRED_CHUNK`]
//! round trips on one thread: the measured pair (client → server) and a reference pair
//! (`client-ref` → `server-ref`) that no variant enforces: not in the manifests, so the agent
//! attaches nothing to them, and not among the Felix rendering's workloads (its chains are
//! reached only from rules matching the workloads' interfaces; the reference pair's packets
//! still cross the FORWARD chain and, under iptables, conntrack). Both see the host's state of
//! the same milliseconds, so their ratio does not move with it; a variant's paired overhead is
//! its ratio over the floor's ratio in the same repetition. Every variant checks that the
//! reference pair's host interfaces carry no TCX program and that its closed port is reachable.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::programs::{tc::TcAttachType, SchedClassifier};
use netpol_agent::dataplane::{remove_pins, Dataplane, DataplaneOptions};
use netpol_common::maps::PROG_BENCH_FLOOR;
use netpol_it::{
    agent::RunningAgent,
    cpu::pin_to_cpu,
    lab::{Lab, Pod},
    manifests::{namespace, pod, ManifestDir},
    netns::in_netns,
};
use serde_json::json;

use crate::{
    cleanup::{on_signal, Registration},
    felix::{Rendering, Workload},
    median, percentile, Size,
};

const NODE: &str = "bench-node";
const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 7001;
const CLOSED_PORT: u16 = 7002;
const MSG: usize = 32;
const TARGET_RR_OVERHEAD: f64 = 0.02;
/// The CPU the request/response threads of both ends run on.
const BENCH_CPU: usize = 0;
/// Round trips on one pair before TCP_RR paired switches to the other (~2 ms).
const PAIRED_CHUNK: usize = 100;

struct Plan {
    policies: &'static [u32],
    reps: usize,
    iperf_secs: u32,
    rr: usize,
    crr: usize,
}

const FULL: Plan =
    Plan { policies: &[10, 100, 1_000], reps: 3, iperf_secs: 3, rr: 20_000, crr: 1_000 };
const QUICK: Plan = Plan { policies: &[3], reps: 1, iperf_secs: 1, rr: 200, crr: 20 };

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Floor,
    Netpol,
    Iptables,
    Empty,
}

impl Variant {
    const ALL: [Variant; 4] = [Variant::Floor, Variant::Netpol, Variant::Iptables, Variant::Empty];
    fn name(self) -> &'static str {
        match self {
            Variant::Floor => "floor (no program)",
            Variant::Netpol => "netpol",
            Variant::Iptables => "iptables+ipset (Felix-style)",
            Variant::Empty => "empty program (netpol hooks)",
        }
    }
}

/// The filler policy `i`'s ipBlock: a /28 in 10.64.0.0/12, outside the lab.
fn filler_cidr(i: u32) -> String {
    let a = Ipv4Addr::from(0x0a40_0000 + i * 16);
    format!("{a}/28")
}

fn filler_port(i: u32) -> u16 {
    8000 + (i % 1000) as u16
}

fn policy_yaml(i: u32, n: u32) -> String {
    let head = format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p{i:04}\n  namespace: lab\nspec:\n  podSelector:\n    matchLabels: {{app: server}}\n  ingress:\n  - from:\n");
    if i + 1 == n {
        format!("{head}    - podSelector:\n        matchLabels: {{role: client}}\n    ports:\n    - port: {IPERF_PORT}\n    - port: {RR_PORT}\n")
    } else {
        format!(
            "{head}    - ipBlock: {{cidr: {}}}\n    ports:\n    - port: {}\n",
            filler_cidr(i),
            filler_port(i)
        )
    }
}

/// A blocking TCP echo server for fixed-size messages, stopped on drop.
struct EchoServer {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    fn start(netns: &str, ip: Ipv4Addr, port: u16) -> Result<EchoServer> {
        let listener = in_netns(netns, || TcpListener::bind((ip, port)))?
            .with_context(|| format!("listening on {ip}:{port}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut s) = conn else { continue };
                std::thread::spawn(move || {
                    // Beside the client (see the module doc); a failure shows in the client's.
                    let _ = pin_to_cpu(BENCH_CPU);
                    let _ = s.set_nodelay(true);
                    let mut buf = [0u8; MSG];
                    while s.read_exact(&mut buf).is_ok() {
                        if s.write_all(&buf).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Ok(EchoServer { stop, addr: SocketAddr::from((ip, port)), thread: Some(thread) })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept (from the host namespace: routed to the pod).
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A child process killed on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    gbps: f64,
    rr_us: f64,
    rr_p99_us: f64,
    crr_us: f64,
    /// TCP_RR paired: p50 of the measured pair (µs) and of the reference pair (µs), and the
    /// first over the second.
    paired_us: f64,
    reference_us: f64,
    paired_ratio: f64,
    /// netpol only: the kernel-accounted run time of its programs per TCP_RR round trip (ns).
    prog_ns_per_rr: f64,
    /// netpol only: program runs per round trip (one per packet and host-side hook).
    prog_runs_per_rr: f64,
    /// netpol only: the accounted run time of an empty program per round trip, in the same
    /// pass, with as many runs (see [`EmptyPrograms`]).
    empty_ns_per_rr: f64,
    /// netpol only: the empty program's runs per round trip.
    empty_runs_per_rr: f64,
}

/// Round trips of the pass that reads the programs' own run time.
const STATS_RR: usize = 5_000;

/// `kernel.bpf_stats_enabled` on for as long as it lives, then back to what it was. The kernel
/// then accounts each program's run time (two clock reads per run), so the latency samples are
/// taken with it off.
struct BpfStats(String);

impl BpfStats {
    const SYSCTL: &'static str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> Result<BpfStats> {
        let was = std::fs::read_to_string(Self::SYSCTL).context("reading bpf_stats_enabled")?;
        std::fs::write(Self::SYSCTL, "1").context("enabling bpf_stats_enabled")?;
        Ok(BpfStats(was.trim().to_owned()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::SYSCTL, &self.0);
    }
}

/// Run time (ns) and runs the kernel accounted so far: to netpol's programs (`from_pod`,
/// `to_pod`; only the benchmark's agent runs them), and to the empty `bench_floor`.
#[derive(Clone, Copy, Default)]
struct Accounted {
    netpol: (u64, u64),
    empty: (u64, u64),
}

fn accounted() -> Result<Accounted> {
    let out = Command::new("bpftool").args(["prog", "show", "--json"]).output()?;
    anyhow::ensure!(out.status.success(), "bpftool prog show failed");
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut a = Accounted::default();
    for p in progs.as_array().into_iter().flatten() {
        let sum = match p["name"].as_str() {
            Some("from_pod" | "to_pod") => &mut a.netpol,
            Some("bench_floor") => &mut a.empty,
            _ => continue,
        };
        sum.0 += p["run_time_ns"].as_u64().unwrap_or(0);
        sum.1 += p["run_cnt"].as_u64().unwrap_or(0);
    }
    Ok(a)
}

/// Where [`EmptyPrograms`] go on each pod: TC ingress and egress of its own interface (`eth0`
/// in its namespace), or of its host-side interface, where netpol attaches.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Pod,
    Host,
}

/// The empty program `bench_floor` at TC ingress and egress of one interface of each pod
/// ([`Side`]), loaded from netpol's object by a separate dataplane with maps of its own: it runs
/// once per packet and hook like netpol's programs, two hooks per pod. On the pods' own
/// interfaces, beside netpol, its accounted time is the accounting's own cost plus an empty
/// program's; on the host side, instead of netpol, it is the `Empty` variant: what any TC
/// program there costs a round trip. Detached and unpinned on drop (and on Ctrl-C, with the
/// process).
struct EmptyPrograms {
    dp: Option<Dataplane>,
    pin_dir: PathBuf,
    _signal: Registration,
}

impl EmptyPrograms {
    fn attach(pods: &[&Pod], side: Side) -> Result<EmptyPrograms> {
        let suffix = if side == Side::Pod { "empty" } else { "empty-host" };
        let pin_dir =
            PathBuf::from(format!("/sys/fs/bpf/netpol-bench-{}-{suffix}", std::process::id()));
        let _ = remove_pins(&pin_dir);
        let unpin = pin_dir.clone();
        let _signal = on_signal(move || {
            let _ = remove_pins(&unpin);
        });
        let dp =
            Dataplane::load(&DataplaneOptions { pin_dir: pin_dir.clone(), ..Default::default() })
                .context("loading the empty program")?;
        let mut empty = EmptyPrograms { dp: Some(dp), pin_dir, _signal };
        for pod in pods {
            let dp = empty.dp.as_mut().expect("held until drop");
            let mut both = |iface: &str| -> Result<()> {
                for at in [TcAttachType::Ingress, TcAttachType::Egress] {
                    dp.attach_unmanaged(PROG_BENCH_FLOOR, iface, at, false)?;
                }
                Ok(())
            };
            match side {
                Side::Pod => in_netns(&pod.netns, || both("eth0"))?,
                Side::Host => both(&pod.host_if),
            }
            .with_context(|| format!("attaching the empty program for {}", pod.netns))?;
        }
        Ok(empty)
    }
}

impl Drop for EmptyPrograms {
    fn drop(&mut self) {
        drop(self.dp.take());
        let _ = remove_pins(&self.pin_dir);
    }
}

/// Per round trip, over `n` round trips with the kernel's accounting on: netpol's programs'
/// time and runs, and the empty program's time and runs.
fn program_cost_per_rr(client: &Pod, server: &Pod, to: SocketAddr, n: usize) -> Result<[f64; 4]> {
    let _empty = EmptyPrograms::attach(&[client, server], Side::Pod)?;
    let _stats = BpfStats::enable()?;
    let before = accounted()?;
    rr(client, to, n)?;
    let after = accounted()?;
    anyhow::ensure!(after.netpol.1 > before.netpol.1, "netpol's programs did not run");
    anyhow::ensure!(after.empty.1 > before.empty.1, "the empty program did not run");
    let per_rr = |a: u64, b: u64| (a - b) as f64 / n as f64;
    Ok([
        per_rr(after.netpol.0, before.netpol.0),
        per_rr(after.netpol.1, before.netpol.1),
        per_rr(after.empty.0, before.empty.0),
        per_rr(after.empty.1, before.empty.1),
    ])
}

fn iperf(client: &Pod, server: &Pod, secs: u32) -> Result<f64> {
    let port = IPERF_PORT.to_string();
    let _srv = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &server.netns, "iperf3", "-s", "-1", "-p", &port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?,
    );
    let mut last = String::new();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        let out = Command::new("ip")
            .args(["netns", "exec", &client.netns, "iperf3", "-c", &server.ip.to_string()])
            .args(["-p", &port, "-t", &secs.to_string(), "-J"])
            .output()
            .context("running iperf3 -c")?;
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(bps) = doc["end"]["sum_received"]["bits_per_second"].as_f64() {
            return Ok(bps / 1e9);
        }
        last = doc["error"].as_str().unwrap_or("no JSON").to_owned();
    }
    anyhow::bail!("iperf3 gave no result: {last}")
}

/// Round trips of `MSG` bytes on one connection: (p50, p99) in µs.
fn rr(client: &Pod, to: SocketAddr, n: usize) -> Result<(f64, f64)> {
    let mut v = in_netns(&client.netns, || -> Result<Vec<f64>> {
        pin_to_cpu(BENCH_CPU)?;
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = [7u8; MSG];
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            s.write_all(&buf)?;
            s.read_exact(&mut buf)?;
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(v)
    })??;
    Ok((median(&mut v), percentile(&mut v, 99.0)))
}

/// TCP_RR on the measured pair and the reference pair (client pod, server address each),
/// alternating every [`PAIRED_CHUNK`] round trips (in the order A B, then B A) on one thread
/// pinned like [`rr`]'s: the p50 of each, in µs, over `n` round trips each.
fn rr_paired(a: (&Pod, SocketAddr), b: (&Pod, SocketAddr), n: usize) -> Result<(f64, f64)> {
    let connect = |pod: &Pod, to: SocketAddr| -> Result<TcpStream> {
        let s = in_netns(&pod.netns, || TcpStream::connect_timeout(&to, Duration::from_secs(2)))?
            .with_context(|| format!("connecting from {} to {to}", pod.name))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(s)
    };
    let mut streams = [connect(a.0, a.1)?, connect(b.0, b.1)?];
    let [mut va, mut vb] = in_netns(&a.0.netns, move || -> Result<[Vec<f64>; 2]> {
        pin_to_cpu(BENCH_CPU)?;
        let mut v = [Vec::with_capacity(n), Vec::with_capacity(n)];
        let mut buf = [7u8; MSG];
        for chunk in 0..n.div_ceil(PAIRED_CHUNK) {
            let order = if chunk % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                for _ in 0..PAIRED_CHUNK {
                    let t = Instant::now();
                    streams[i].write_all(&buf)?;
                    streams[i].read_exact(&mut buf)?;
                    v[i].push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
        Ok(v)
    })??;
    Ok((median(&mut va), median(&mut vb)))
}

/// Connect, one round trip, close: p50 in µs.
fn crr(client: &Pod, to: SocketAddr, n: usize) -> Result<f64> {
    let mut v = in_netns(&client.netns, || -> Result<Vec<f64>> {
        pin_to_cpu(BENCH_CPU)?;
        let mut v = Vec::with_capacity(n);
        let mut buf = [7u8; MSG];
        for _ in 0..n {
            let t = Instant::now();
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(&buf)?;
            s.read_exact(&mut buf)?;
            drop(s);
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(v)
    })??;
    Ok(median(&mut v))
}

/// Whether a TCP connection to `to` from the client opens within 300 ms.
fn reachable(client: &Pod, to: SocketAddr) -> Result<bool> {
    in_netns(&client.netns, || TcpStream::connect_timeout(&to, Duration::from_millis(300)).is_ok())
}

/// Names of the TCX programs at both hooks of `interface` (the agent attaches with TCX on the
/// kernels this benchmark runs on).
fn tcx_programs(interface: &str) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for at in [TcAttachType::Ingress, TcAttachType::Egress] {
        let (_, progs) = SchedClassifier::query_tcx(interface, at)
            .with_context(|| format!("querying the TCX programs of {interface}"))?;
        names.extend(progs.iter().map(|p| p.name_as_str().unwrap_or_default().to_owned()));
    }
    Ok(names)
}

/// The measured pair (client, server) and the reference pair that no variant enforces.
struct Pods<'a> {
    client: &'a Pod,
    server: &'a Pod,
    client_ref: &'a Pod,
    server_ref: &'a Pod,
}

fn measure(plan: &Plan, pods: &Pods, enforced: bool) -> Result<Sample> {
    let (client, server) = (pods.client, pods.server);
    let to = SocketAddr::from((server.ip, RR_PORT));
    let closed = SocketAddr::from((server.ip, CLOSED_PORT));
    let to_ref = SocketAddr::from((pods.server_ref.ip, RR_PORT));
    for pod in [pods.client_ref, pods.server_ref] {
        let progs = tcx_programs(&pod.host_if)?;
        anyhow::ensure!(progs.is_empty(), "the reference pair's {} runs {progs:?}", pod.host_if);
    }
    anyhow::ensure!(
        reachable(pods.client_ref, SocketAddr::from((pods.server_ref.ip, CLOSED_PORT)))?,
        "the reference pair is enforced: its port {CLOSED_PORT} is unreachable"
    );
    anyhow::ensure!(reachable(client, to)?, "the client cannot reach the allowed port");
    anyhow::ensure!(
        reachable(client, closed)? != enforced,
        "port {CLOSED_PORT} (no policy allows it) is {} although enforcement is {}",
        if enforced { "reachable" } else { "unreachable" },
        if enforced { "on" } else { "off" }
    );
    let gbps = iperf(client, server, plan.iperf_secs)?;
    let (rr_us, rr_p99_us) = rr(client, to, plan.rr)?;
    let crr_us = crr(client, to, plan.crr)?;
    let (paired_us, reference_us) = rr_paired((client, to), (pods.client_ref, to_ref), plan.rr)?;
    Ok(Sample {
        gbps,
        rr_us,
        rr_p99_us,
        crr_us,
        paired_us,
        reference_us,
        paired_ratio: paired_us / reference_us,
        ..Sample::default()
    })
}

fn pct(v: f64, base: f64) -> String {
    format!("{:+.1} %", (v / base - 1.0) * 100.0)
}

pub fn run(size: Size) -> Result<serde_json::Value> {
    let plan = match size {
        Size::Full => &FULL,
        Size::Quick => &QUICK,
    };
    let mut lab = Lab::new()?;
    let client = lab.add_pod("client")?;
    let server = lab.add_pod("server")?;
    let client_ref = lab.add_pod("client-ref")?;
    let server_ref = lab.add_pod("server-ref")?;
    // Ctrl-C: remove the pods (and with them their veths) as the lab's drop would.
    let pods: Vec<Pod> = lab.pods().to_vec();
    let _lab_signal = on_signal(move || {
        for p in &pods {
            let _ = Command::new("ip").args(["link", "del", &p.host_if]).output();
            let _ = Command::new("ip").args(["netns", "del", &p.netns]).output();
        }
    });
    let _echo = EchoServer::start(&server.netns, server.ip, RR_PORT)?;
    let _closed = EchoServer::start(&server.netns, server.ip, CLOSED_PORT)?;
    let _echo_ref = EchoServer::start(&server_ref.netns, server_ref.ip, RR_PORT)?;
    let _closed_ref = EchoServer::start(&server_ref.netns, server_ref.ip, CLOSED_PORT)?;
    let pods =
        Pods { client: &client, server: &server, client_ref: &client_ref, server_ref: &server_ref };

    println!("netpol veth benchmark: two lab pods, routed through the host");
    println!(
        "iperf3 -t {} (Gbit/s), TCP_RR {} round trips of {MSG} B (p50 µs), TCP_CRR {} connections (p50 µs)",
        plan.iperf_secs, plan.rr, plan.crr
    );
    println!(
        "median of {} interleaved repetitions; % = vs the floor of the same policy count\n",
        plan.reps
    );
    println!("TCP_RR and TCP_CRR threads of client and server pinned to CPU {BENCH_CPU}");
    println!(
        "{:>8}  {:<28} {:>16} {:>18} {:>18} {:>18} {:>20}",
        "policies",
        "variant",
        "throughput",
        "TCP_RR p50",
        "TCP_RR p99",
        "TCP_CRR p50",
        "TCP_RR paired"
    );
    let mut rows = Vec::new();
    let mut verdicts = Vec::new();
    for &n in plan.policies {
        let dir = ManifestDir::new(&format!("bench-veth-{n}"))?;
        dir.write("ns.yaml", &namespace("lab", &[]))?;
        dir.write("client.yaml", &pod(&client, "lab", NODE, &[("role", "client")], &[]))?;
        dir.write("server.yaml", &pod(&server, "lab", NODE, &[("app", "server")], &[]))?;
        for i in 0..n {
            dir.write(&format!("p{i:04}.yaml"), &policy_yaml(i, n))?;
        }
        let workloads = [
            Workload { iface: client.host_if.clone(), ingress: vec![] },
            Workload {
                iface: server.host_if.clone(),
                ingress: (0..n)
                    .map(|i| {
                        if i + 1 == n {
                            (vec![format!("{}/32", client.ip)], vec![IPERF_PORT, RR_PORT])
                        } else {
                            (vec![filler_cidr(i)], vec![filler_port(i)])
                        }
                    })
                    .collect(),
            },
        ];
        let mut samples: [Vec<Sample>; Variant::ALL.len()] = Default::default();
        for rep in 0..plan.reps {
            for k in 0..Variant::ALL.len() {
                let v = Variant::ALL[(k + rep) % Variant::ALL.len()];
                let s = match v {
                    Variant::Floor => measure(plan, &pods, false),
                    Variant::Netpol => {
                        let agent = RunningAgent::start(&dir, NODE, &format!("bench-veth-{n}"));
                        agent.wait_ready();
                        let s = measure(plan, &pods, true)?;
                        let to = SocketAddr::from((server.ip, RR_PORT));
                        let n = STATS_RR.min(plan.rr);
                        let [ns, runs, empty_ns, empty_runs] =
                            program_cost_per_rr(&client, &server, to, n)?;
                        Ok(Sample {
                            prog_ns_per_rr: ns,
                            prog_runs_per_rr: runs,
                            empty_ns_per_rr: empty_ns,
                            empty_runs_per_rr: empty_runs,
                            ..s
                        })
                    }
                    Variant::Iptables => {
                        let r = Rendering::install(&workloads)?;
                        anyhow::ensure!(r.policy_chains() == n as usize, "rendering incomplete");
                        measure(plan, &pods, true)
                    }
                    Variant::Empty => {
                        let _empty = EmptyPrograms::attach(&[&client, &server], Side::Host)?;
                        for pod in [&client, &server] {
                            let progs = tcx_programs(&pod.host_if)?;
                            anyhow::ensure!(
                                progs == ["bench_floor", "bench_floor"],
                                "{} runs {progs:?}, not the empty program at both hooks",
                                pod.host_if
                            );
                        }
                        measure(plan, &pods, false)
                    }
                }
                .with_context(|| format!("{n} policies, {}", v.name()))?;
                samples[v as usize].push(s);
            }
        }
        let med =
            |v: &[Sample], f: fn(&Sample) -> f64| median(&mut v.iter().map(f).collect::<Vec<_>>());
        let m: Vec<Sample> = samples
            .iter()
            .map(|s| Sample {
                gbps: med(s, |x| x.gbps),
                rr_us: med(s, |x| x.rr_us),
                rr_p99_us: med(s, |x| x.rr_p99_us),
                crr_us: med(s, |x| x.crr_us),
                prog_ns_per_rr: med(s, |x| x.prog_ns_per_rr),
                prog_runs_per_rr: med(s, |x| x.prog_runs_per_rr),
                empty_ns_per_rr: med(s, |x| x.empty_ns_per_rr),
                empty_runs_per_rr: med(s, |x| x.empty_runs_per_rr),
                paired_us: med(s, |x| x.paired_us),
                reference_us: med(s, |x| x.reference_us),
                paired_ratio: med(s, |x| x.paired_ratio),
            })
            .collect();
        let floor = m[0];
        // Each repetition's paired ratio over the floor's of the same repetition, median.
        let paired_overhead = |v: Variant| {
            let floor = &samples[Variant::Floor as usize];
            let mut r: Vec<f64> = samples[v as usize]
                .iter()
                .zip(floor)
                .map(|(x, f)| x.paired_ratio / f.paired_ratio - 1.0)
                .collect();
            median(&mut r)
        };
        for v in Variant::ALL {
            let s = m[v as usize];
            let rel = |x: f64, b: f64| if v == Variant::Floor { String::new() } else { pct(x, b) };
            println!(
                "{n:>8}  {:<28} {:>6.2} {:>9} {:>7.1} {:>10} {:>7.1} {:>10} {:>7.1} {:>10} {:>7.3}× {:>10}",
                v.name(),
                s.gbps,
                rel(s.gbps, floor.gbps),
                s.rr_us,
                rel(s.rr_us, floor.rr_us),
                s.rr_p99_us,
                rel(s.rr_p99_us, floor.rr_p99_us),
                s.crr_us,
                rel(s.crr_us, floor.crr_us),
                s.paired_ratio,
                if v == Variant::Floor {
                    String::new()
                } else {
                    format!("{:+.1} %", paired_overhead(v) * 100.0)
                },
            );
            rows.push(json!({
                "policies": n, "variant": format!("{v:?}").to_lowercase(),
                "gbps": s.gbps, "rr_p50_us": s.rr_us, "rr_p99_us": s.rr_p99_us, "crr_p50_us": s.crr_us,
                "gbps_vs_floor": s.gbps / floor.gbps, "rr_p50_vs_floor": s.rr_us / floor.rr_us,
                "crr_p50_vs_floor": s.crr_us / floor.crr_us,
                "rr_paired_p50_us": s.paired_us, "rr_reference_p50_us": s.reference_us,
                "rr_paired_ratio": s.paired_ratio, "rr_paired_overhead": paired_overhead(v),
                "samples": samples[v as usize].iter().map(|x| json!({"gbps": x.gbps, "rr_p50_us": x.rr_us, "rr_p99_us": x.rr_p99_us, "crr_p50_us": x.crr_us, "rr_paired_p50_us": x.paired_us, "rr_reference_p50_us": x.reference_us, "prog_ns_per_rr": x.prog_ns_per_rr, "prog_runs_per_rr": x.prog_runs_per_rr, "empty_ns_per_rr": x.empty_ns_per_rr, "empty_runs_per_rr": x.empty_runs_per_rr})).collect::<Vec<_>>(),
            }));
        }
        let (np, ipt) = (m[Variant::Netpol as usize], m[Variant::Iptables as usize]);
        let overhead = np.rr_us / floor.rr_us - 1.0;
        let paired = paired_overhead(Variant::Netpol);
        // The programs' own share of the floor's round trip: what the measured overhead would
        // be without noise and without indirect costs (cache, TCX dispatch). As accounted, and
        // net of the accounting: minus the empty program's time per run, for as many runs.
        let per_run = |ns: f64, runs: f64| if runs > 0.0 { ns / runs } else { 0.0 };
        let empty_per_run = per_run(np.empty_ns_per_rr, np.empty_runs_per_rr);
        let net_ns_per_rr =
            (per_run(np.prog_ns_per_rr, np.prog_runs_per_rr) - empty_per_run) * np.prog_runs_per_rr;
        let prog_share = np.prog_ns_per_rr / (floor.rr_us * 1e3);
        let net_share = net_ns_per_rr / (floor.rr_us * 1e3);
        println!(
            "{n:>8}  netpol programs' own time (kernel bpf_stats): {:.0} ns per round trip in {:.1} runs ({:.0} ns per run), {:.2} % of the floor's p50",
            np.prog_ns_per_rr,
            np.prog_runs_per_rr,
            per_run(np.prog_ns_per_rr, np.prog_runs_per_rr),
            prog_share * 100.0
        );
        println!(
            "{n:>8}  an empty program, same pass: {empty_per_run:.0} ns per run in {:.1} runs per round trip; netpol net of it: {net_ns_per_rr:.0} ns per round trip, {:.2} % of the floor's p50",
            np.empty_runs_per_rr,
            net_share * 100.0
        );
        verdicts.push(json!({
            "policies": n, "rr_overhead": overhead, "rr_overhead_met": overhead <= TARGET_RR_OVERHEAD,
            "rr_paired_overhead": paired, "rr_paired_overhead_met": paired <= TARGET_RR_OVERHEAD,
            "iptables_rr_paired_overhead": paired_overhead(Variant::Iptables),
            "empty_rr_paired_overhead": paired_overhead(Variant::Empty),
            "prog_ns_per_rr": np.prog_ns_per_rr, "prog_runs_per_rr": np.prog_runs_per_rr, "prog_share_of_floor_rr": prog_share,
            "empty_ns_per_run": empty_per_run, "empty_runs_per_rr": np.empty_runs_per_rr,
            "net_prog_ns_per_rr": net_ns_per_rr, "net_prog_share_of_floor_rr": net_share,
            "ahead_of_iptables": {
                "gbps": np.gbps >= ipt.gbps, "rr": np.rr_us <= ipt.rr_us, "crr": np.crr_us <= ipt.crr_us,
            },
        }));
        println!();
    }
    println!("target                                        verdict");
    for v in &verdicts {
        let n = v["policies"].as_u64().unwrap_or(0);
        let o = v["rr_overhead"].as_f64().unwrap_or(0.0);
        let paired = v["rr_paired_overhead"].as_f64().unwrap_or(0.0);
        let net = v["net_prog_share_of_floor_rr"].as_f64().unwrap_or(0.0);
        let empty = v["empty_rr_paired_overhead"].as_f64().unwrap_or(0.0);
        println!(
            "TCP_RR p50 overhead ≤ 2 % ({n:>4} policies): {:+5.1} %   {}",
            o * 100.0,
            if o <= TARGET_RR_OVERHEAD { "met" } else { "MISSED" }
        );
        println!(
            "  the same, paired with the unenforced pair ({n:>4} policies): {:+5.1} %   {}",
            paired * 100.0,
            if paired <= TARGET_RR_OVERHEAD { "met" } else { "MISSED" }
        );
        println!(
            "  an empty program at netpol's hooks instead, paired ({n:>4} policies): {:+5.1} %",
            empty * 100.0
        );
        println!(
            "  programs' own time net of the accounting ({n:>4} policies): {:5.2} % of the floor's p50   {}",
            net * 100.0,
            if net <= TARGET_RR_OVERHEAD { "within 2 %" } else { "above 2 %" }
        );
    }
    if let Some(v) = verdicts.last() {
        let a = &v["ahead_of_iptables"];
        let yes = |k: &str| if a[k].as_bool().unwrap_or(false) { "ahead" } else { "BEHIND" };
        println!(
            "vs iptables at {} policies: throughput {}, TCP_RR {}, TCP_CRR {}",
            v["policies"],
            yes("gbps"),
            yes("rr"),
            yes("crr")
        );
    }
    Ok(json!({
        "benchmark": "veth",
        "method": "two routed lab pods; iperf3, TCP_RR and TCP_CRR from the client namespace, request/response threads of both ends pinned to one CPU; variants interleaved per repetition, medians; TCP_RR paired: the measured pair and an unenforced reference pair alternating every 100 round trips on one thread, the ratio of their p50s, a variant's overhead = its ratio over the floor's in the same repetition (median over repetitions)",
        "paired_chunk": PAIRED_CHUNK,
        "reps": plan.reps, "iperf_secs": plan.iperf_secs, "rr": plan.rr, "crr": plan.crr, "message_bytes": MSG,
        "rows": rows,
        "targets": { "rr_overhead": TARGET_RR_OVERHEAD, "by_policies": verdicts },
        "machine": crate::machine(),
    }))
}
