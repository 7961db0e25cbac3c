//! `cargo xtask bench <name>`: `datapath` and `compile`.
//!
//! `datapath`: per-packet cost of the real programs through BPF_PROG_TEST_RUN, against an empty
//! TC program measured in the same run (the floor).
//!
//! For each rule count N the endpoint's ingress set holds N rules (N distinct peer /32s, each
//! with its own port set holding one TCP port), and three packets are measured:
//! - established: an ACK of a tracked flow (conntrack hit);
//! - new denied: a SYN from a peer no rule allows (two LPM lookups, no insert);
//! - new allowed: a SYN of a new flow from an allowed peer (lookups + conntrack insert). Every
//!   run must be a new flow, so it is measured one packet per BPF_PROG_TEST_RUN with a fresh
//!   source port, and compared with the floor measured the same way.
use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result};
use netpol_common::{ep::Endpoint, maps};
use netpol_it::{
    fixture::{Fixture, DROP, PASS, TEST_IFINDEX},
    packet::{tcp, Frame, L4},
};

const RULE_COUNTS: [u32; 4] = [1, 100, 1_000, 10_000];
const REPEAT: u32 = 200_000;
const SINGLE_RUNS: u32 = 4_000;
const POD: [u8; 4] = [10, 0, 0, 9];

fn peer(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a64_0000 + i) // 10.100.x.y
}

fn frame(src: Ipv4Addr, sport: u16, flags: u8) -> Vec<u8> {
    Frame::new(src, Ipv4Addr::from(POD), L4::Tcp { sport, dport: 8080, flags }).bytes()
}

fn ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

/// Mean kernel-measured ns per packet over `runs` single-packet test runs.
fn single_runs(
    f: &mut Fixture,
    prog: &'static str,
    mut packet: impl FnMut(u32) -> Vec<u8>,
    expect: i32,
) -> Result<f64> {
    let mut total = 0.0;
    for i in 0..SINGLE_RUNS {
        let (ret, d) = f.dp.test_run(prog, &packet(i), 1)?;
        anyhow::ensure!(ret == expect, "{prog} returned {ret}, expected {expect}");
        total += ns(d);
    }
    Ok(total / SINGLE_RUNS as f64)
}

fn main() -> Result<()> {
    let name = std::env::args().nth(1).unwrap_or_default();
    let out = std::env::args().nth(2).unwrap_or_else(|| format!("bench/results/{name}.json"));
    let doc = match name.as_str() {
        "datapath" => datapath()?,
        "compile" => compile::run()?,
        other => anyhow::bail!("unknown benchmark {other:?}; available: datapath, compile"),
    };
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {out}"))?;
    println!("results written to {out}");
    Ok(())
}

fn datapath() -> Result<serde_json::Value> {
    let mut rows = Vec::new();
    println!("netpol datapath benchmark: BPF_PROG_TEST_RUN, kernel-measured ns/packet");
    println!("floor = empty TC program in the same run; ratio = program / floor\n");
    println!("{:>7}  {:>22}  {:>22}  {:>22}", "rules", "established", "new denied", "new allowed");
    for n in RULE_COUNTS {
        let mut f = Fixture::new(&format!("bench{n}"));
        for i in 0..n {
            f.peer(1, &peer(i).to_string(), 1000 + i);
            f.ports(1000 + i, 6, 8080, 8080, 1 + i);
        }
        f.dp.set_endpoint(
            TEST_IFINDEX,
            Endpoint { generation: 1, ingress_np: 1, ..Default::default() },
        )?;
        let allowed = peer(n / 2);
        let stranger = Ipv4Addr::new(10, 200, 0, 1);

        // Established: open the flow once, then measure its ACKs.
        let (r, _) = f.dp.test_run(maps::PROG_TO_POD, &frame(allowed, 1, tcp::SYN), 1)?;
        anyhow::ensure!(r == PASS, "opening SYN not allowed");
        let ack = frame(allowed, 1, tcp::ACK);
        let floor = ns(f.dp.test_run(maps::PROG_BENCH_FLOOR, &ack, REPEAT)?.1);
        let (r, est) = f.dp.test_run(maps::PROG_TO_POD, &ack, REPEAT)?;
        anyhow::ensure!(r == PASS, "established ACK not passed");
        let est = ns(est);
        let denied_pkt = frame(stranger, 2, tcp::SYN);
        let (r, den) = f.dp.test_run(maps::PROG_TO_POD, &denied_pkt, REPEAT)?;
        anyhow::ensure!(r == DROP, "stranger SYN not dropped");
        let den = ns(den);
        let floor1 = single_runs(
            &mut f,
            maps::PROG_BENCH_FLOOR,
            |i| frame(allowed, 10_000 + i as u16, tcp::SYN),
            PASS,
        )?;
        let new = single_runs(
            &mut f,
            maps::PROG_TO_POD,
            |i| frame(allowed, 10_000 + i as u16, tcp::SYN),
            PASS,
        )?;
        let cell = |v: f64, fl: f64| format!("{v:6.1} ns ({:4.2}x floor)", v / fl);
        println!(
            "{n:>7}  {:>22}  {:>22}  {:>22}",
            cell(est, floor),
            cell(den, floor),
            cell(new, floor1)
        );
        rows.push(serde_json::json!({
            "rules": n,
            "floor_ns": floor, "established_ns": est, "new_denied_ns": den,
            "floor_single_ns": floor1, "new_allowed_ns": new,
        }));
    }
    println!(
        "\nfloor (batched, repeat {REPEAT}): {:.1} ns; floor (one packet per run): {:.1} ns",
        rows[0]["floor_ns"].as_f64().unwrap_or(0.0),
        rows[0]["floor_single_ns"].as_f64().unwrap_or(0.0)
    );
    Ok(serde_json::json!({
        "benchmark": "datapath",
        "method": "BPF_PROG_TEST_RUN, kernel-measured; established and new denied with repeat, new allowed one packet per run",
        "repeat": REPEAT, "single_runs": SINGLE_RUNS,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "rows": rows,
    }))
}

/// `compile`: the pure compiler on a synthetic cluster.
///
/// Baseline, measured in the same run: cloning the cluster model (every string and map the
/// compiler reads, copied once). Reported: full compile for one node's pods and for every pod,
/// layout (kernel ids and map contents), one pod relabel and one policy edit through the
/// incremental compiler, and the process's peak RSS per pod.
mod compile {
    use std::time::Instant;

    use anyhow::Result;
    use netpol_agent::{
        compile::{compile, Change, CompileOptions, Compiler},
        layout::Layout,
    };
    use netpol_it::synth::{cluster, edited_policy, node, Shape};

    const SHAPE: Shape = Shape { namespaces: 500, pods: 10_000, policies: 2_000, nodes: 50 };

    fn best_of<T>(n: usize, mut f: impl FnMut() -> T) -> (f64, T) {
        let mut best = f64::MAX;
        let mut out = None;
        for _ in 0..n {
            let t = Instant::now();
            let v = f();
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
            out = Some(v);
        }
        (best, out.expect("n > 0"))
    }

    fn peak_rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_owned))
            .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    }

    pub fn run() -> Result<serde_json::Value> {
        let state = cluster(SHAPE, 42);
        let (clone_ms, _) = best_of(5, || state.clone());
        let one_node = CompileOptions::new(node(7));
        let (full_ms, compiled) = best_of(3, || compile(&state, &one_node));
        let endpoints = compiled.endpoints.len();
        let (layout_ms, maps) = best_of(3, || Layout::new().update(&compiled));
        let maps = maps?;
        // Incremental: relabel one local pod, then edit one policy. Measured before the
        // all-pods stress case so the peak RSS below is that of a real node's agent.
        let mut compiler = Compiler::new(state.clone(), one_node.clone());
        let victim =
            state.pods.values().find(|p| p.node_name.as_deref() == Some("node-7")).cloned();
        let mut relabel = victim.expect("a local pod");
        relabel.labels.insert("app".into(), "app3".into());
        let t = Instant::now();
        let touched = compiler.apply(Change::UpsertPod(relabel));
        let relabel_ms = t.elapsed().as_secs_f64() * 1e3;
        let edit = edited_policy(&state, 4).expect("policy 4");
        let t = Instant::now();
        let touched_edit = compiler.apply(Change::UpsertPolicy(edit));
        let edit_ms = t.elapsed().as_secs_f64() * 1e3;
        let rss = peak_rss_kib();
        drop(compiler);

        // All pods local: every pod an endpoint (a stress case, not a real node).
        let mut all = state.clone();
        for p in all.pods.values_mut() {
            p.node_name = Some("everywhere".into());
        }
        let (all_ms, all_compiled) =
            best_of(1, || compile(&all, &CompileOptions::new("everywhere")));

        println!(
            "netpol compile benchmark: {} namespaces, {} pods, {} policies, {} nodes",
            SHAPE.namespaces, SHAPE.pods, SHAPE.policies, SHAPE.nodes
        );
        println!("baseline = cloning the cluster model in the same run: {clone_ms:.2} ms\n");
        let row = |what: String, ms: f64| {
            println!("{what:<62} {ms:>9.2} ms  {:>7.2}x baseline", ms / clone_ms)
        };
        row(format!("full compile, one node ({endpoints} endpoints)"), full_ms);
        row(
            format!("layout ({} peer, {} port entries)", maps.peers.len(), maps.ports.len()),
            layout_ms,
        );
        row(
            format!("full compile, all pods local ({} endpoints)", all_compiled.endpoints.len()),
            all_ms,
        );
        row(
            format!("incremental: one pod relabel ({} endpoints recompiled)", touched.len()),
            relabel_ms,
        );
        row(
            format!("incremental: one policy edit ({} endpoints recompiled)", touched_edit.len()),
            edit_ms,
        );
        println!(
            "\npeak RSS of a one-node compiler: {rss} KiB = {:.2} KiB per cluster pod (whole process)",
            rss as f64 / SHAPE.pods as f64
        );
        Ok(serde_json::json!({
            "benchmark": "compile",
            "shape": { "namespaces": SHAPE.namespaces, "pods": SHAPE.pods, "policies": SHAPE.policies, "nodes": SHAPE.nodes },
            "baseline_clone_ms": clone_ms,
            "full_compile_one_node_ms": full_ms, "endpoints_one_node": endpoints,
            "layout_ms": layout_ms, "peer_entries": maps.peers.len(), "port_entries": maps.ports.len(),
            "full_compile_all_local_ms": all_ms, "endpoints_all_local": all_compiled.endpoints.len(),
            "relabel_ms": relabel_ms, "relabel_endpoints": touched.len(),
            "policy_edit_ms": edit_ms, "policy_edit_endpoints": touched_edit.len(),
            "peak_rss_kib": rss, "rss_kib_per_pod": rss as f64 / SHAPE.pods as f64,
        }))
    }
}
