//! `datapath`: per-packet cost of the real programs through BPF_PROG_TEST_RUN, with the policy
//! maps filled by the real compiler and layout, against an empty TC program measured in the
//! same run (the floor).
//!
//! For each (rules per endpoint, peer IPs) the cluster of [`one_endpoint`] is compiled for its
//! node, laid out, and written to the maps the way the agent writes a first snapshot (port
//! entries, peer entries, then the endpoint). Three packets to the server are measured:
//! - established: an ACK of a tracked flow (conntrack hit);
//! - new denied: a SYN from an address no rule allows (peer lookups miss, no insert);
//! - new allowed: a SYN of a new flow from an allowed peer (lookups + conntrack insert). Every
//!   run must be a new flow, so it is measured one packet per BPF_PROG_TEST_RUN with a fresh
//!   source port, and compared with the floor measured the same way.
//!
//! Every figure is the median over several rounds, the floor interleaved with the program.
use std::{net::Ipv4Addr, time::Duration, time::Instant};

use anyhow::{Context as _, Result};
use netpol_agent::{
    compile::{compile, CompileOptions},
    dataplane::DataplaneOptions,
    layout::{KernelMaps, Layout},
};
use netpol_common::maps;
use netpol_it::{
    fixture::{Fixture, DROP, PASS, TEST_IFINDEX},
    packet::{tcp, Frame, L4},
    synth::{one_endpoint, peer_ip, FIRST_RULE_PORT, ONE_ENDPOINT_NODE, SERVER_IP},
};
use serde_json::json;

use crate::{median, Size};

/// Targets of the benchmark issue.
const TARGET_ESTABLISHED_NS: f64 = 60.0;
const TARGET_NEW_NS: f64 = 200.0;
const TARGET_FLAT: f64 = 0.10;

struct Plan {
    rules: &'static [u32],
    peers: &'static [u32],
    repeat: u32,
    single_runs: u32,
    rounds: usize,
}

const FULL: Plan = Plan {
    rules: &[1, 100, 1_000, 10_000],
    peers: &[10, 1_000, 100_000],
    repeat: 100_000,
    single_runs: 2_000,
    rounds: 5,
};
const QUICK: Plan =
    Plan { rules: &[1, 10], peers: &[10], repeat: 1_000, single_runs: 20, rounds: 1 };

/// The programs under test: the object built into the agent, or the one named by
/// `NETPOL_BENCH_OBJECT` (to compare a variant build against the floor of the same run).
fn fixture(name: &str) -> Fixture {
    let object = std::env::var_os("NETPOL_BENCH_OBJECT").map(std::path::PathBuf::from);
    let opts =
        DataplaneOptions { events_per_sec: 1000, events_burst: 1000, object, ..Default::default() };
    Fixture::with_options(name, opts)
}

fn frame(src: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    Frame::new(src, SERVER_IP, L4::Tcp { sport, dport, flags }).bytes()
}

fn ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

/// Writes `maps` into the fixture's dataplane in the agent's order for a first snapshot:
/// ports, peers, then the endpoint (here on the test interface).
fn write_maps(f: &mut Fixture, maps: &KernelMaps) -> Result<()> {
    let diff = KernelMaps::diff(&KernelMaps::default(), maps);
    for ((len, data), v) in &diff.ports.upserts {
        f.dp.upsert_port(*len, *data, *v)?;
    }
    for ((len, data), v) in &diff.peers.upserts {
        f.dp.upsert_peer(*len, *data, *v)?;
    }
    let entry = maps.endpoints.values().next().context("the server has no endpoint")?;
    let mut value = entry.value;
    value.generation = 1;
    f.dp.set_endpoint(TEST_IFINDEX, value)?;
    Ok(())
}

/// Mean kernel-measured ns per packet over `runs` single-packet test runs.
fn single_runs(
    f: &mut Fixture,
    prog: &'static str,
    runs: u32,
    mut packet: impl FnMut(u32) -> Vec<u8>,
    expect: i32,
) -> Result<f64> {
    let mut total = 0.0;
    for i in 0..runs {
        let (ret, d) = f.dp.test_run(prog, &packet(i), 1)?;
        anyhow::ensure!(ret == expect, "{prog} returned {ret}, expected {expect}");
        total += ns(d);
    }
    Ok(total / runs as f64)
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
    denied: f64,
    floor_single: f64,
    allowed: f64,
}

fn measure(plan: &Plan, rules: u32, peers: u32) -> Result<Row> {
    let t = Instant::now();
    let state = one_endpoint(rules, peers);
    let compiled = compile(&state, &CompileOptions::new(ONE_ENDPOINT_NODE));
    let maps = Layout::new().update(&compiled)?;
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut f = fixture(&format!("bench-{rules}-{peers}"));
    write_maps(&mut f, &maps)?;

    let allowed = peer_ip(0);
    let stranger = Ipv4Addr::new(10, 200, 0, 1);
    // Established: open the flow once, then measure its ACKs.
    let (r, _) =
        f.dp.test_run(maps::PROG_TO_POD, &frame(allowed, 1, FIRST_RULE_PORT, tcp::SYN), 1)?;
    anyhow::ensure!(r == PASS, "opening SYN from an allowed peer not passed");
    let ack = frame(allowed, 1, FIRST_RULE_PORT, tcp::ACK);
    let denied = frame(stranger, 2, FIRST_RULE_PORT, tcp::SYN);
    let (mut fl, mut est, mut den, mut fl1, mut new) = (vec![], vec![], vec![], vec![], vec![]);
    let mut sport = 1024u32;
    for _ in 0..plan.rounds {
        fl.push(batched(&mut f, maps::PROG_BENCH_FLOOR, &ack, plan.repeat, PASS)?);
        est.push(batched(&mut f, maps::PROG_TO_POD, &ack, plan.repeat, PASS)?);
        den.push(batched(&mut f, maps::PROG_TO_POD, &denied, plan.repeat, DROP)?);
        let base = sport;
        let syn = |i: u32| frame(allowed, (base + i) as u16, FIRST_RULE_PORT, tcp::SYN);
        fl1.push(single_runs(&mut f, maps::PROG_BENCH_FLOOR, plan.single_runs, syn, PASS)?);
        // Fresh ports for the program: the floor's runs opened no flows, but keep them apart.
        let base = sport + plan.single_runs;
        let syn = |i: u32| frame(allowed, (base + i) as u16, FIRST_RULE_PORT, tcp::SYN);
        new.push(single_runs(&mut f, maps::PROG_TO_POD, plan.single_runs, syn, PASS)?);
        sport += 2 * plan.single_runs;
        anyhow::ensure!(sport < u16::MAX as u32, "out of source ports");
    }
    Ok(Row {
        rules,
        peers,
        peer_entries: maps.peers.len(),
        port_entries: maps.ports.len(),
        compile_ms,
        floor: median(&mut fl),
        established: median(&mut est),
        denied: median(&mut den),
        floor_single: median(&mut fl1),
        allowed: median(&mut new),
    })
}

/// Which packets [`spin`] sends.
#[derive(Clone, Copy, Debug)]
pub enum Spin {
    /// ACKs of an established flow.
    Established,
    /// SYNs from a peer no rule allows.
    Denied,
}

/// For profiling (`perf record -a` meanwhile): `packets` through `to_pod` for `secs` seconds,
/// 1,000 rules and 1,000 peers. Returns the mean ns per packet.
pub fn spin(secs: u64, packets: Spin) -> Result<serde_json::Value> {
    let state = one_endpoint(1_000, 1_000);
    let maps = Layout::new().update(&compile(&state, &CompileOptions::new(ONE_ENDPOINT_NODE)))?;
    let mut f = fixture("bench-spin");
    write_maps(&mut f, &maps)?;
    let allowed = peer_ip(0);
    let (r, _) =
        f.dp.test_run(maps::PROG_TO_POD, &frame(allowed, 1, FIRST_RULE_PORT, tcp::SYN), 1)?;
    anyhow::ensure!(r == PASS, "opening SYN not passed");
    let (pkt, expect) = match packets {
        Spin::Established => (frame(allowed, 1, FIRST_RULE_PORT, tcp::ACK), PASS),
        Spin::Denied => (frame(Ipv4Addr::new(10, 200, 0, 1), 2, FIRST_RULE_PORT, tcp::SYN), DROP),
    };
    let until = Instant::now() + Duration::from_secs(secs);
    let mut v = Vec::new();
    while Instant::now() < until {
        v.push(batched(&mut f, maps::PROG_TO_POD, &pkt, 1_000_000, expect)?);
    }
    let ns = median(&mut v);
    println!("{packets:?}: {ns:.1} ns/packet (median of {} runs of 1,000,000)", v.len());
    Ok(json!({ "benchmark": "spin", "packets": format!("{packets:?}"), "ns": ns }))
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

pub fn run(size: Size) -> Result<serde_json::Value> {
    let plan = match size {
        Size::Full => &FULL,
        Size::Quick => &QUICK,
    };
    println!("netpol datapath benchmark: BPF_PROG_TEST_RUN, kernel-measured ns/packet");
    println!("maps filled by the real compiler + layout; floor = empty TC program in the same run");
    println!("median of {} rounds; (×) = program / floor\n", plan.rounds);
    println!(
        "{:>6} {:>7} {:>8} {:>7}  {:>8} {:>18} {:>18}  {:>8} {:>18}",
        "rules",
        "peers",
        "peer ent",
        "port ent",
        "floor",
        "established",
        "new denied",
        "floor(1)",
        "new allowed"
    );
    let mut rows = Vec::new();
    for &peers in plan.peers {
        for &rules in plan.rules {
            let r = measure(plan, rules, peers)
                .with_context(|| format!("{rules} rules, {peers} peers"))?;
            let cell = |v: f64, fl: f64| format!("{v:6.1} ns ({:5.2}×)", v / fl);
            println!(
                "{:>6} {:>7} {:>8} {:>7}  {:>5.1} ns {:>18} {:>18}  {:>5.1} ns {:>18}",
                r.rules,
                r.peers,
                r.peer_entries,
                r.port_entries,
                r.floor,
                cell(r.established, r.floor),
                cell(r.denied, r.floor),
                r.floor_single,
                cell(r.allowed, r.floor_single)
            );
            rows.push(r);
        }
    }

    // Targets: absolute ns as the issue states them, and flatness across rule counts at each
    // peer count: the largest deviation of a row's floor-relative cost from the median of its
    // peer count (relative, so machine drift between rows cancels).
    let worst = |f: &dyn Fn(&Row) -> f64| rows.iter().map(f).fold(f64::MIN, f64::max);
    let est_worst = worst(&|r| r.established);
    let new_worst = worst(&|r| r.allowed.max(r.denied));
    let mut spread = 0.0f64;
    for &peers in plan.peers {
        for m in [
            &(|r: &Row| r.established / r.floor) as &dyn Fn(&Row) -> f64,
            &|r: &Row| r.denied / r.floor,
            &|r: &Row| r.allowed / r.floor_single,
        ] {
            let mut v: Vec<f64> = rows.iter().filter(|r| r.peers == peers).map(m).collect();
            let mid = median(&mut v.clone());
            spread = v.drain(..).fold(spread, |s, x| s.max((x / mid - 1.0).abs()));
        }
    }
    println!("\ntarget                                   measured (worst row)   verdict");
    println!(
        "established ≤ {TARGET_ESTABLISHED_NS} ns                       {est_worst:8.1} ns            {}",
        verdict(est_worst <= TARGET_ESTABLISHED_NS)
    );
    println!(
        "new flow ≤ {TARGET_NEW_NS} ns                         {new_worst:8.1} ns            {}",
        verdict(new_worst <= TARGET_NEW_NS)
    );
    println!(
        "flat within ±{:.0} % across rule counts        {:+7.1} %             {}",
        TARGET_FLAT * 100.0,
        spread * 100.0,
        verdict(spread <= TARGET_FLAT)
    );
    let rows_json: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "rules": r.rules, "peers": r.peers,
                "peer_entries": r.peer_entries, "port_entries": r.port_entries,
                "compile_and_layout_ms": r.compile_ms,
                "floor_ns": r.floor, "established_ns": r.established, "new_denied_ns": r.denied,
                "floor_single_ns": r.floor_single, "new_allowed_ns": r.allowed,
                "established_ratio": r.established / r.floor,
                "new_denied_ratio": r.denied / r.floor,
                "new_allowed_ratio": r.allowed / r.floor_single,
            })
        })
        .collect();
    Ok(json!({
        "benchmark": "datapath",
        "method": "BPF_PROG_TEST_RUN, kernel-measured; maps from compile() + Layout of synth::one_endpoint; established and new denied batched, new allowed one packet per run; median of rounds",
        "repeat": plan.repeat, "single_runs": plan.single_runs, "rounds": plan.rounds,
        "targets": {
            "established_ns": TARGET_ESTABLISHED_NS, "new_ns": TARGET_NEW_NS, "flat": TARGET_FLAT,
            "established_worst_ns": est_worst, "established_met": est_worst <= TARGET_ESTABLISHED_NS,
            "new_worst_ns": new_worst, "new_met": new_worst <= TARGET_NEW_NS,
            "largest_deviation": spread, "flat_met": spread <= TARGET_FLAT,
        },
        "machine": crate::machine(),
        "rows": rows_json,
    }))
}
