//! `datapath`: per-packet cost of the real programs through BPF_PROG_TEST_RUN, with the policy
//! maps filled by the real compiler and layout, against an empty TC program measured in the
//! same run (the floor).
//!
//! For each (rules per endpoint, peer IPs) the cluster of [`one_endpoint`] is compiled for its
//! node, laid out, and written to the maps the way the agent writes a first snapshot (port
//! entries, peer entries, then the endpoint). Three packets to the server are measured:
//! - established: an ACK of an established flow, which after the first run of a tick is a hit
//!   in the fast path's per-CPU flow cache (netpol-ebpf's `flowcache`);
//! - established, uncached: a FIN-ACK of an established flow, which always takes the conntrack
//!   lookup (FIN and RST bypass the flow cache): the cost of a flow's first packet in a tick,
//!   or of a flow whose cache entry another flow took;
//! - new denied: a SYN from an address no rule allows (peer lookups miss, no insert), the same
//!   packet every run: its conntrack lookup misses in the same, cached, bucket each time;
//! - new denied, stream: SYNs of new flows from that address through `bench_new_flows` (see
//!   below), each looking up another bucket, as a scan would; the endpoint's counters must
//!   show one policy drop per run;
//! - new allowed: SYNs of new flows from an allowed peer (lookups + conntrack insert). Every
//!   run must be a new flow, but a test run repeats one packet. So the batch goes through
//!   `bench_new_flows` (netpol-ebpf's `bench`), which bumps the packet's source port and
//!   tail-calls `to_pod`; its floor is the same program tail-calling the empty one. The
//!   endpoint's counters must show exactly one new allowed flow per run. Measured twice: with
//!   the conntrack table as the row's earlier visits left it in the CPU caches ("not
//!   evicted"), then, conntrack emptied, with the table flushed from the caches first (the
//!   figure the target is checked on; why: [`crate::evict`]).
//! - new allowed, one packet per run: the same SYNs, one per BPF_PROG_TEST_RUN (a round's
//!   figure is the median of its runs), against the empty program measured the same way. Each
//!   run starts from a syscall, with whatever the caches lost meanwhile: the figure of a new
//!   flow arriving alone on an idle CPU, not of a stream of them.
//!
//! The rows of one peer count are measured together, round by round, in one dataplane loaded
//! for them: each visit writes the row's maps over the previous row's, as the agent applies a
//! policy change, and empties conntrack. Each packet kind is measured right after its floor:
//! ns figures are medians over the rounds, ratios medians of each round's ratio to its floor.
//! So the host's load, which moves from second to second on a shared machine, is the same for
//! the rows compared for flatness. (Until the eighth session each row's visit loaded a fresh
//! dataplane: ~3 s of verifier each, 108 loads for 9 rounds; now 3 loads, and 27 rounds take
//! half a minute.)
use std::{net::Ipv4Addr, time::Duration, time::Instant};

use anyhow::{Context as _, Result};
use netpol_agent::{
    compile::{compile, CompileOptions},
    dataplane::{conntrack::Table, DataplaneOptions},
    layout::{KernelMaps, Layout},
};
use netpol_common::{
    counters::Reason,
    ct::{sets_for, CtSet, CtTags, CT_WAYS},
    maps, DIR_INGRESS,
};
use netpol_it::{
    fixture::{Fixture, DROP, PASS, TEST_IFINDEX},
    packet::{tcp, Frame, L4},
    synth::{one_endpoint, peer_ip, FIRST_RULE_PORT, ONE_ENDPOINT_NODE, SERVER_IP},
};
use serde_json::json;

use crate::{evict::evict, median, memory::Baseline, Size};

/// Targets of the benchmark issue.
const TARGET_ESTABLISHED_NS: f64 = 60.0;
const TARGET_NEW_NS: f64 = 200.0;
const TARGET_FLAT: f64 = 0.10;

struct Plan {
    rules: &'static [u32],
    peers: &'static [u32],
    repeat: u32,
    /// Runs of a new-flow batch: fresh source ports above [`NEW_FLOW_BASE`] (< 65,536).
    new_repeat: u32,
    single_runs: u32,
    rounds: usize,
    /// Dependent loads of a memory latency sample (`crate::memory`).
    chase_loads: usize,
}

/// The new-flow batches' source ports start above this one, clear of the ports the round's
/// other flows use (1, 3, and the single runs' from 1,024).
const NEW_FLOW_BASE: u16 = 10_000;

const FULL: Plan = Plan {
    rules: &[1, 100, 1_000, 10_000],
    peers: &[10, 1_000, 100_000],
    repeat: 100_000,
    new_repeat: 50_000,
    single_runs: 2_000,
    rounds: 27,
    chase_loads: 2_000_000,
};
const QUICK: Plan = Plan {
    rules: &[1, 10],
    peers: &[10],
    repeat: 1_000,
    new_repeat: 1_000,
    single_runs: 20,
    rounds: 1,
    chase_loads: 10_000,
};

/// The programs under test: the object built into the agent, or the one named by
/// `NETPOL_BENCH_OBJECT` (to compare a variant build against the floor of the same run), with a
/// conntrack table of `ct_flows` flows.
fn fixture(name: &str, ct_flows: u32) -> Fixture {
    let object = std::env::var_os("NETPOL_BENCH_OBJECT").map(std::path::PathBuf::from);
    let opts = DataplaneOptions {
        events_per_sec: 1000,
        events_burst: 1000,
        object,
        ct_max_entries: Some(ct_flows),
        ..Default::default()
    };
    Fixture::with_options(name, opts)
}

/// Flows of the conntrack table the agent creates when asked for `requested` (its default
/// without): whole sets, a power of two of them.
fn conntrack_flows(requested: Option<u32>) -> u32 {
    sets_for(requested.unwrap_or(maps::CT_MAX as u32)) * CT_WAYS as u32
}

fn frame(src: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    Frame::new(src, SERVER_IP, L4::Tcp { sport, dport, flags }).bytes()
}

/// Opens the TCP flow `peer:sport → server:dport` as a real connection does: the peer's SYN
/// through `to_pod`, the server's SYN-ACK through `from_pod`, so its conntrack entry is
/// established (a flow whose reply was never seen is not, and its packets skip the flow cache).
fn open_flow(f: &mut Fixture, peer: Ipv4Addr, sport: u16, dport: u16) -> Result<()> {
    let (r, _) = f.dp.test_run(maps::PROG_TO_POD, &frame(peer, sport, dport, tcp::SYN), 1)?;
    anyhow::ensure!(r == PASS, "opening SYN from {peer}:{sport} not passed");
    let reply = Frame::new(
        SERVER_IP,
        peer,
        L4::Tcp { sport: dport, dport: sport, flags: tcp::SYN | tcp::ACK },
    );
    let (r, _) = f.dp.test_run(maps::PROG_FROM_POD, &reply.bytes(), 1)?;
    anyhow::ensure!(r == PASS, "SYN-ACK to {peer}:{sport} not passed");
    Ok(())
}

fn ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

/// Turns the fixture's policy maps from `old` into `new` in the agent's order (upsert ports,
/// peers, the endpoint — here on the test interface, at `generation` — then delete peers and
/// ports), as the agent applies a policy change to its running dataplane.
fn write_maps(f: &mut Fixture, old: &KernelMaps, new: &KernelMaps, generation: u32) -> Result<()> {
    let diff = KernelMaps::diff(old, new);
    for ((len, data), v) in &diff.ports.upserts {
        f.dp.upsert_port(*len, *data, *v)?;
    }
    for ((len, data), v) in &diff.peers.upserts {
        f.dp.upsert_peer(*len, *data, *v)?;
    }
    let entry = new.endpoints.values().next().context("the server has no endpoint")?;
    let mut value = entry.value;
    value.generation = generation;
    f.dp.set_endpoint(TEST_IFINDEX, value)?;
    for (len, data) in &diff.peers.deletes {
        f.dp.remove_peer(*len, *data)?;
    }
    for (len, data) in &diff.ports.deletes {
        f.dp.remove_port(*len, *data)?;
    }
    Ok(())
}

/// Median kernel-measured ns per packet of `runs` single-packet test runs. The median, not the
/// mean: a run of about a microsecond that an interrupt or a preemption lands in takes tens of
/// microseconds, and a few of those in a round moved its mean by a tenth.
fn single_runs(
    f: &mut Fixture,
    prog: &'static str,
    runs: u32,
    mut packet: impl FnMut(u32) -> Vec<u8>,
    expect: i32,
) -> Result<f64> {
    let mut v = Vec::with_capacity(runs as usize);
    for i in 0..runs {
        let (ret, d) = f.dp.test_run(prog, &packet(i), 1)?;
        anyhow::ensure!(ret == expect, "{prog} returned {ret}, expected {expect}");
        v.push(ns(d));
    }
    Ok(median(&mut v))
}

/// Kernel-measured ns per packet of a batch of `repeat` new flows through `bench_new_flows`
/// into `prog`, the first with source port `NEW_FLOW_BASE + 1`, checking the verdict. Returns
/// the figure and how many packets the endpoint counted for `reason` meanwhile.
fn new_flows(
    f: &mut Fixture,
    prog: &'static str,
    pkt: &[u8],
    repeat: u32,
    expect: i32,
    reason: Reason,
) -> Result<(f64, u64)> {
    anyhow::ensure!(u32::from(NEW_FLOW_BASE) + repeat <= u32::from(u16::MAX), "too many new flows");
    let counted = |f: &Fixture| -> Result<u64> {
        Ok(f.dp.counters()?.packets(TEST_IFINDEX, DIR_INGRESS, reason))
    };
    f.dp.set_bench_next(prog)?;
    let before = counted(f)?;
    let ns = batched(f, maps::PROG_BENCH_NEW_FLOWS, pkt, repeat, expect)?;
    Ok((ns, counted(f)? - before))
}

/// Batched kernel-measured ns per packet, checking the verdict.
fn batched(
    f: &mut Fixture,
    prog: &'static str,
    pkt: &[u8],
    repeat: u32,
    expect: i32,
) -> Result<f64> {
    let (ret, d) = f.dp.test_run(prog, pkt, repeat)?;
    anyhow::ensure!(ret == expect, "{prog} returned {ret}, expected {expect}");
    Ok(ns(d))
}

struct Row {
    rules: u32,
    peers: u32,
    peer_entries: usize,
    port_entries: usize,
    compile_ms: f64,
    floor: f64,
    established: f64,
    uncached: f64,
    denied: f64,
    new_floor: f64,
    denied_stream: f64,
    /// A stream of new allowed flows with the conntrack table evicted from the caches first.
    allowed: f64,
    /// The same flows with the table as the row's earlier visits left it in the caches.
    allowed_not_evicted: f64,
    floor_single: f64,
    allowed_single: f64,
    /// Medians of the per-round ratios to the floor measured just before in the same round.
    established_ratio: f64,
    uncached_ratio: f64,
    denied_ratio: f64,
    denied_stream_ratio: f64,
    allowed_ratio: f64,
    allowed_not_evicted_ratio: f64,
    allowed_single_ratio: f64,
}

/// One row's maps and its samples, one per round.
struct Subject {
    rules: u32,
    peers: u32,
    compile_ms: f64,
    maps: KernelMaps,
    samples: [Vec<f64>; SAMPLES],
}

const FLOOR: usize = 0;
const ESTABLISHED: usize = 1;
const DENIED: usize = 2;
const FLOOR_SINGLE: usize = 3;
const ALLOWED: usize = 4;
const UNCACHED: usize = 5;
const NEW_FLOOR: usize = 6;
const ALLOWED_SINGLE: usize = 7;
const DENIED_STREAM: usize = 8;
const ALLOWED_NOT_EVICTED: usize = 9;
const SAMPLES: usize = 10;

impl Subject {
    /// Compiles `one_endpoint(rules, peers)` and lays it out.
    fn new(rules: u32, peers: u32) -> Result<Subject> {
        let t = Instant::now();
        let state = one_endpoint(rules, peers);
        let compiled = compile(&state, &CompileOptions::new(ONE_ENDPOINT_NODE));
        let maps = Layout::new().update(&compiled)?;
        let compile_ms = t.elapsed().as_secs_f64() * 1e3;
        Ok(Subject { rules, peers, compile_ms, maps, samples: Default::default() })
    }

    /// This row's part of a round: its maps written over the previous row's in `f`, the
    /// dataplane its peer count shares (`loaded`: what `f` holds now; `table`: its conntrack
    /// table), conntrack emptied, then each packet kind right after its floor. A `warm_up`
    /// visit's figures are dropped.
    fn round(
        &mut self,
        plan: &Plan,
        f: &mut Fixture,
        table: &Table,
        loaded: &mut KernelMaps,
        generation: u32,
        warm_up: bool,
    ) -> Result<()> {
        anyhow::ensure!(
            1024 + 2 * plan.single_runs <= u32::from(NEW_FLOW_BASE),
            "the single runs' source ports reach the new-flow batches'"
        );
        write_maps(f, loaded, &self.maps, generation)?;
        *loaded = self.maps.clone();
        f.dp.clear_conntrack()?;
        let allowed = peer_ip(0);
        open_flow(f, allowed, 1, FIRST_RULE_PORT)?;
        open_flow(f, allowed, 3, FIRST_RULE_PORT)?;
        let ack = frame(allowed, 1, FIRST_RULE_PORT, tcp::ACK);
        let fin = frame(allowed, 3, FIRST_RULE_PORT, tcp::FIN | tcp::ACK);
        let denied = frame(Ipv4Addr::new(10, 200, 0, 1), 2, FIRST_RULE_PORT, tcp::SYN);
        let s = &mut self.samples;
        s[FLOOR].push(batched(f, maps::PROG_BENCH_FLOOR, &ack, plan.repeat, PASS)?);
        s[ESTABLISHED].push(batched(f, maps::PROG_TO_POD, &ack, plan.repeat, PASS)?);
        s[UNCACHED].push(batched(f, maps::PROG_TO_POD, &fin, plan.repeat, PASS)?);
        s[DENIED].push(batched(f, maps::PROG_TO_POD, &denied, plan.repeat, DROP)?);
        let syn = frame(allowed, NEW_FLOW_BASE, FIRST_RULE_PORT, tcp::SYN);
        let n = plan.new_repeat;
        let (floor, _) = new_flows(f, maps::PROG_BENCH_FLOOR, &syn, n, PASS, Reason::AllowPolicy)?;
        s[NEW_FLOOR].push(floor);
        // The stream with the conntrack table as the earlier visits left it in the caches, then
        // the same flows, emptied from conntrack, with the table evicted first (`crate::evict`).
        let (ns, opened) = new_flows(f, maps::PROG_TO_POD, &syn, n, PASS, Reason::AllowPolicy)?;
        anyhow::ensure!(opened == u64::from(n), "{n} new flows counted {opened} new allowed flows");
        s[ALLOWED_NOT_EVICTED].push(ns);
        f.dp.clear_conntrack()?;
        evict(table)?;
        let (ns, opened) = new_flows(f, maps::PROG_TO_POD, &syn, n, PASS, Reason::AllowPolicy)?;
        anyhow::ensure!(opened == u64::from(n), "{n} new flows counted {opened} new allowed flows");
        s[ALLOWED].push(ns);
        let scan = frame(Ipv4Addr::new(10, 200, 0, 1), NEW_FLOW_BASE, FIRST_RULE_PORT, tcp::SYN);
        let (ns, dropped) = new_flows(f, maps::PROG_TO_POD, &scan, n, DROP, Reason::DenyPolicy)?;
        anyhow::ensure!(dropped == u64::from(n), "{n} denied new flows counted {dropped} drops");
        s[DENIED_STREAM].push(ns);
        let syn = |i: u32| frame(allowed, (1024 + i) as u16, FIRST_RULE_PORT, tcp::SYN);
        s[FLOOR_SINGLE].push(single_runs(f, maps::PROG_BENCH_FLOOR, plan.single_runs, syn, PASS)?);
        // Fresh ports for the program: the floor's runs opened no flows, but keep them apart.
        let base = 1024 + plan.single_runs;
        let syn = |i: u32| frame(allowed, (base + i) as u16, FIRST_RULE_PORT, tcp::SYN);
        s[ALLOWED_SINGLE].push(single_runs(f, maps::PROG_TO_POD, plan.single_runs, syn, PASS)?);
        if warm_up {
            for v in s.iter_mut() {
                v.pop();
            }
        }
        Ok(())
    }

    fn row(mut self) -> Row {
        let ratios = |s: &[Vec<f64>; SAMPLES], x: usize, floor: usize| {
            let mut v: Vec<f64> = s[x].iter().zip(&s[floor]).map(|(a, b)| a / b).collect();
            median(&mut v)
        };
        let established_ratio = ratios(&self.samples, ESTABLISHED, FLOOR);
        let uncached_ratio = ratios(&self.samples, UNCACHED, FLOOR);
        let denied_ratio = ratios(&self.samples, DENIED, FLOOR);
        let allowed_ratio = ratios(&self.samples, ALLOWED, NEW_FLOOR);
        let allowed_not_evicted_ratio = ratios(&self.samples, ALLOWED_NOT_EVICTED, NEW_FLOOR);
        let denied_stream_ratio = ratios(&self.samples, DENIED_STREAM, NEW_FLOOR);
        let allowed_single_ratio = ratios(&self.samples, ALLOWED_SINGLE, FLOOR_SINGLE);
        let [fl, est, den, fl1, new, unc, new_fl, new1, den_stream, new_not_evicted] =
            &mut self.samples;
        Row {
            rules: self.rules,
            peers: self.peers,
            peer_entries: self.maps.peers.len(),
            port_entries: self.maps.ports.len(),
            compile_ms: self.compile_ms,
            floor: median(fl),
            established: median(est),
            uncached: median(unc),
            denied: median(den),
            new_floor: median(new_fl),
            denied_stream: median(den_stream),
            allowed: median(new),
            allowed_not_evicted: median(new_not_evicted),
            floor_single: median(fl1),
            allowed_single: median(new1),
            established_ratio,
            uncached_ratio,
            denied_ratio,
            denied_stream_ratio,
            allowed_ratio,
            allowed_not_evicted_ratio,
            allowed_single_ratio,
        }
    }
}

/// The rows of one peer count, measured together in one dataplane loaded for them: every round
/// visits each row (starting one further each time) and writes its maps over the previous
/// row's, as the agent applies a policy change, so a change in the host's load between rounds
/// reaches every row alike and does not pass for a difference between rule counts. The first
/// visit is a warm-up whose figures are dropped: in a dataplane just loaded, the first row's
/// one-packet-per-run figure was 250–280 ns where the rows after it took ~180 ns.
fn measure_peers(plan: &Plan, peers: u32, ct_flows: u32) -> Result<Vec<Row>> {
    let mut subjects = plan
        .rules
        .iter()
        .map(|&rules| {
            Subject::new(rules, peers).with_context(|| format!("{rules} rules, {peers} peers"))
        })
        .collect::<Result<Vec<_>>>()?;
    let n = subjects.len();
    let mut f = fixture(&format!("bench-{peers}"), ct_flows);
    let table = f.dp.conntrack_table()?;
    let mut loaded = KernelMaps::default();
    let visits = (0..plan.rounds).flat_map(|round| (0..n).map(move |i| (round + i) % n));
    for (generation, (i, warm_up)) in
        std::iter::once((0, true)).chain(visits.map(|i| (i, false))).enumerate()
    {
        let s = &mut subjects[i];
        let (rules, peers) = (s.rules, s.peers);
        s.round(plan, &mut f, &table, &mut loaded, generation as u32 + 1, warm_up)
            .with_context(|| format!("{rules} rules, {peers} peers"))?;
    }
    Ok(subjects.into_iter().map(Subject::row).collect())
}

/// Which packets [`spin`] sends.
#[derive(Clone, Copy, Debug)]
pub enum Spin {
    /// ACKs of an established flow.
    Established,
    /// SYNs from a peer no rule allows.
    Denied,
    /// SYNs of new allowed flows, batched through `bench_new_flows` (each opens a conntrack
    /// entry; the table is emptied between batches).
    Allowed,
    /// SYNs of new allowed flows, one per BPF_PROG_TEST_RUN.
    AllowedSingle,
}

/// For profiling (`perf record -a` meanwhile): `packets` through `to_pod` for `secs` seconds,
/// 1,000 rules and 1,000 peers. Returns the mean ns per packet.
pub fn spin(secs: u64, packets: Spin) -> Result<serde_json::Value> {
    let state = one_endpoint(1_000, 1_000);
    let maps = Layout::new().update(&compile(&state, &CompileOptions::new(ONE_ENDPOINT_NODE)))?;
    let mut f = fixture("bench-spin", conntrack_flows(None));
    write_maps(&mut f, &KernelMaps::default(), &maps, 1)?;
    let allowed = peer_ip(0);
    open_flow(&mut f, allowed, 1, FIRST_RULE_PORT)?;
    let until = Instant::now() + Duration::from_secs(secs);
    let mut v = Vec::new();
    if let Spin::Allowed = packets {
        let syn = frame(allowed, NEW_FLOW_BASE, FIRST_RULE_PORT, tcp::SYN);
        while Instant::now() < until {
            v.push(
                new_flows(&mut f, maps::PROG_TO_POD, &syn, 50_000, PASS, Reason::AllowPolicy)?.0,
            );
            f.dp.clear_conntrack()?;
            open_flow(&mut f, allowed, 1, FIRST_RULE_PORT)?;
        }
    } else if let Spin::AllowedSingle = packets {
        // Fresh source ports of peer 0, then of peer j to port FIRST_RULE_PORT + j (rule j
        // allows peer j there): every run is a new flow, as in `measure`.
        let mut n = 0u32;
        while Instant::now() < until {
            let j = n / 60_000;
            anyhow::ensure!(j < 1_000, "out of flows");
            let (peer, dport) = (peer_ip(j), FIRST_RULE_PORT + j as u16);
            let sport = 1024 + (n % 60_000) as u16;
            let syn = |i: u32| frame(peer, sport + i as u16, dport, tcp::SYN);
            v.push(single_runs(&mut f, maps::PROG_TO_POD, 1_000, syn, PASS)?);
            n += 1_000;
        }
    } else {
        let (pkt, expect) = match packets {
            Spin::Established => (frame(allowed, 1, FIRST_RULE_PORT, tcp::ACK), PASS),
            _ => (frame(Ipv4Addr::new(10, 200, 0, 1), 2, FIRST_RULE_PORT, tcp::SYN), DROP),
        };
        while Instant::now() < until {
            v.push(batched(&mut f, maps::PROG_TO_POD, &pkt, 1_000_000, expect)?);
        }
    }
    let ns = median(&mut v);
    println!("{packets:?}: {ns:.1} ns/packet (median of {} batches)", v.len());
    Ok(json!({ "benchmark": "spin", "packets": format!("{packets:?}"), "ns": ns }))
}

/// The largest deviation, over `measures`, of a row's ratio to its floor from the median of the
/// rows of its peer count (relative, so machine drift between rows cancels).
fn largest_deviation(plan: &Plan, rows: &[Row], measures: &[fn(&Row) -> f64]) -> f64 {
    let mut spread = 0.0f64;
    for &peers in plan.peers {
        for m in measures {
            let mut v: Vec<f64> = rows.iter().filter(|r| r.peers == peers).map(m).collect();
            let mid = median(&mut v.clone());
            spread = v.drain(..).fold(spread, |s, x| s.max((x / mid - 1.0).abs()));
        }
    }
    spread
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

/// Runs the benchmark with a conntrack table of `conntrack_size` flows (the agent's default
/// without).
pub fn run(size: Size, conntrack_size: Option<u32>) -> Result<serde_json::Value> {
    let plan = match size {
        Size::Full => &FULL,
        Size::Quick => &QUICK,
    };
    let ct_flows = conntrack_flows(conntrack_size);
    let ct_sets = ct_flows / CT_WAYS as u32;
    println!("netpol datapath benchmark: BPF_PROG_TEST_RUN, kernel-measured ns/packet");
    println!("maps filled by the real compiler + layout; floor = empty TC program in the same run");
    println!(
        "conntrack table: {ct_flows} flows ({} KiB of ways, {} KiB of tags), {}",
        ct_sets as usize * size_of::<CtSet>() / 1024,
        ct_sets as usize * size_of::<CtTags>() / 1024,
        if conntrack_size.is_some() { "--conntrack-size" } else { "the agent's default" }
    );
    println!(
        "rows of a peer count interleaved; median of {} rounds; (×) = median of program / floor per round\n",
        plan.rounds
    );
    println!(
        "{:>6} {:>7} {:>8} {:>7}  {:>8} {:>18} {:>18} {:>18}  {:>8} {:>18} {:>18} {:>18}  {:>8} {:>18}",
        "rules",
        "peers",
        "peer ent",
        "port ent",
        "floor",
        "established",
        "est. uncached",
        "new denied",
        "floor(→)",
        "new denied →",
        "new allowed →",
        "→ not evicted",
        "floor(1)",
        "new allowed (1)"
    );
    // The memory latency baseline (`crate::memory`), sampled before the first peer count and
    // after each, as the host's speed moves during a run.
    let mut memory = Baseline::new(ct_sets as usize * size_of::<CtSet>(), plan.chase_loads)?;
    memory.sample();
    let mut rows = Vec::new();
    for &peers in plan.peers {
        let measured = measure_peers(plan, peers, ct_flows)?;
        memory.sample();
        for r in measured {
            let cell = |v: f64, ratio: f64| format!("{v:6.1} ns ({ratio:5.2}×)");
            println!(
                "{:>6} {:>7} {:>8} {:>7}  {:>5.1} ns {:>18} {:>18} {:>18}  {:>5.1} ns {:>18} {:>18} {:>18}  {:>5.1} ns {:>18}",
                r.rules,
                r.peers,
                r.peer_entries,
                r.port_entries,
                r.floor,
                cell(r.established, r.established_ratio),
                cell(r.uncached, r.uncached_ratio),
                cell(r.denied, r.denied_ratio),
                r.new_floor,
                cell(r.denied_stream, r.denied_stream_ratio),
                cell(r.allowed, r.allowed_ratio),
                cell(r.allowed_not_evicted, r.allowed_not_evicted_ratio),
                r.floor_single,
                cell(r.allowed_single, r.allowed_single_ratio)
            );
            rows.push(r);
        }
    }

    // Targets: absolute ns as the issue states them, and flatness across rule counts (below).
    let worst = |f: &dyn Fn(&Row) -> f64| rows.iter().map(f).fold(f64::MIN, f64::max);
    let est_worst = worst(&|r| r.established);
    let unc_worst = worst(&|r| r.uncached);
    let new_worst = worst(&|r| r.allowed.max(r.denied).max(r.denied_stream));
    let not_evicted_worst = worst(&|r| r.allowed_not_evicted);
    let single_worst = worst(&|r| r.allowed_single);
    // Flatness across rule counts, of the batched measures (a packet repeated, or a stream of
    // new flows, in one test run) and, apart, of the one-packet-per-run column: each of its
    // runs starts cold from a syscall and pays memory latency, which moves with the host's
    // load (one row's rounds spanned 180–400 ns in one run) and not with the rule count.
    let spread = largest_deviation(
        plan,
        &rows,
        &[
            |r| r.established_ratio,
            |r| r.uncached_ratio,
            |r| r.denied_ratio,
            |r| r.denied_stream_ratio,
            |r| r.allowed_ratio,
            |r| r.allowed_not_evicted_ratio,
        ],
    );
    let single_spread = largest_deviation(plan, &rows, &[|r| r.allowed_single_ratio]);
    let allowed_worst = worst(&|r| r.allowed);
    let base = memory.base();
    let (huge, huge_share) = memory.huge()?;
    println!(
        "\nmemory latency, a dependent load of a random line of {} KiB (as large as the conntrack ways):",
        ct_sets as usize * size_of::<CtSet>() / 1024
    );
    println!(
        "  4 KiB pages (as the conntrack array's): {:.1} ns (median of {} samples, {:.1}–{:.1})",
        base.median_ns,
        base.samples_ns.len(),
        base.min_ns,
        base.max_ns
    );
    match &huge {
        Some(h) => println!(
            "  2 MiB pages ({:.0} % of the buffer):     {:.1} ns ({:.1}–{:.1})",
            huge_share * 100.0,
            h.median_ns,
            h.min_ns,
            h.max_ns
        ),
        None => println!(
            "  2 MiB pages: not granted ({:.0} % of the buffer; transparent huge pages off?)",
            huge_share * 100.0
        ),
    }
    println!(
        "  new allowed (table evicted, worst row) − memory latency (4 KiB pages): {:.1} ns",
        allowed_worst - base.median_ns
    );
    println!("\ntarget                                   measured (worst row)   verdict");
    println!(
        "established ≤ {TARGET_ESTABLISHED_NS} ns                       {est_worst:8.1} ns            {}",
        verdict(est_worst <= TARGET_ESTABLISHED_NS)
    );
    println!(
        "  the same, uncached (conntrack lookup)   {unc_worst:8.1} ns            {}",
        verdict(unc_worst <= TARGET_ESTABLISHED_NS)
    );
    println!(
        "new flow ≤ {TARGET_NEW_NS} ns                         {new_worst:8.1} ns            {}",
        verdict(new_worst <= TARGET_NEW_NS)
    );
    println!(
        "  new allowed, conntrack table not evicted {not_evicted_worst:8.1} ns            {}",
        verdict(not_evicted_worst <= TARGET_NEW_NS)
    );
    println!(
        "  new allowed, one packet per run (cold)   {single_worst:8.1} ns            {}",
        verdict(single_worst <= TARGET_NEW_NS)
    );
    println!(
        "flat within ±{:.0} % across rule counts        {:+7.1} %             {}",
        TARGET_FLAT * 100.0,
        spread * 100.0,
        verdict(spread <= TARGET_FLAT)
    );
    println!(
        "  the same, one packet per run (cold)      {:+7.1} %             {}",
        single_spread * 100.0,
        verdict(single_spread <= TARGET_FLAT)
    );
    let rows_json: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "rules": r.rules, "peers": r.peers,
                "peer_entries": r.peer_entries, "port_entries": r.port_entries,
                "compile_and_layout_ms": r.compile_ms,
                "floor_ns": r.floor, "established_ns": r.established, "established_uncached_ns": r.uncached, "new_denied_ns": r.denied,
                "new_flow_floor_ns": r.new_floor, "new_denied_stream_ns": r.denied_stream,
                "new_allowed_ns": r.allowed, "new_allowed_not_evicted_ns": r.allowed_not_evicted,
                "floor_single_ns": r.floor_single, "new_allowed_single_ns": r.allowed_single,
                "established_ratio": r.established_ratio,
                "established_uncached_ratio": r.uncached_ratio,
                "new_denied_ratio": r.denied_ratio,
                "new_denied_stream_ratio": r.denied_stream_ratio,
                "new_allowed_ratio": r.allowed_ratio,
                "new_allowed_not_evicted_ratio": r.allowed_not_evicted_ratio,
                "new_allowed_single_ratio": r.allowed_single_ratio,
            })
        })
        .collect();
    Ok(json!({
        "benchmark": "datapath",
        "method": "BPF_PROG_TEST_RUN, kernel-measured; maps from compile() + Layout of synth::one_endpoint; established (an ACK: flow cache hit), established uncached (a FIN-ACK: conntrack lookup) and new denied (one SYN repeated) batched; new denied and new allowed as streams of new flows (new allowed: first with the conntrack table as the earlier visits left it in the CPU caches, then, conntrack emptied, the same flows with the table's ways and tags flushed from the caches first), batched through bench_new_flows (source port bumped per run, tail call into to_pod; floor: the same into the empty program; the endpoint's counters checked for one policy drop or new allowed flow per run) and one packet per run against the empty program run the same way; the rows of a peer count interleaved round by round in one dataplane (each visit writes the row's maps over the previous row's and empties conntrack; a first visit is a warm-up, dropped); single runs: median of a round's runs; ns = median over rounds, ratio = median over rounds of the ratio to the floor measured just before; flatness over the batched measures, and apart over the one-per-run column",
        "conntrack_flows": ct_flows, "conntrack_default": conntrack_size.is_none(),
        "repeat": plan.repeat, "new_flow_repeat": plan.new_repeat, "single_runs": plan.single_runs, "rounds": plan.rounds,
        "targets": {
            "established_ns": TARGET_ESTABLISHED_NS, "new_ns": TARGET_NEW_NS, "flat": TARGET_FLAT,
            "established_worst_ns": est_worst, "established_met": est_worst <= TARGET_ESTABLISHED_NS,
            "established_uncached_worst_ns": unc_worst, "established_uncached_met": unc_worst <= TARGET_ESTABLISHED_NS,
            "new_worst_ns": new_worst, "new_met": new_worst <= TARGET_NEW_NS,
            "new_allowed_not_evicted_worst_ns": not_evicted_worst, "new_allowed_not_evicted_met": not_evicted_worst <= TARGET_NEW_NS,
            "new_allowed_single_worst_ns": single_worst, "new_allowed_single_met": single_worst <= TARGET_NEW_NS,
            "largest_deviation": spread, "flat_met": spread <= TARGET_FLAT,
            "largest_deviation_single": single_spread, "flat_single_met": single_spread <= TARGET_FLAT,
        },
        "memory_latency": {
            "buffer_bytes": ct_sets as usize * size_of::<CtSet>(),
            "pages_4k": base, "pages_2m": huge, "pages_2m_share": huge_share,
        },
        "new_allowed_worst_minus_memory_latency_ns": allowed_worst - base.median_ns,
        "machine": crate::machine(),
        "rows": rows_json,
    }))
}
