//! `cargo xtask demo`: netpol on a throwaway lab node, narrated.
//!
//! Three pods in network namespaces behind host-side veths. The programs are attached to the
//! backend's interface and given one rule — "backend accepts TCP 6379 from frontend only",
//! the shape of the AKS vote-app walkthrough — then real connections are tried and the kernel's
//! counters and pinned maps are shown. Everything is removed at the end, also on failure.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use netpol_agent::dataplane::{remove_pins, Dataplane, DataplaneOptions};
use netpol_common::{
    counters::Reason,
    ep::Endpoint,
    policy::{
        PeerData, PeerValue, PortData, PortValue, ACTION_ALLOW, PEER_SET_BITS, PORT_FULL_BITS,
    },
    v4_mapped, DIR_INGRESS,
};
use netpol_it::{
    cmd::run,
    lab::{ifindex, Lab, Pod},
    probe::{tcp_echo, TcpServer},
};

const PORTS: [u16; 2] = [6379, 80];

fn main() -> Result<()> {
    netpol_it::require_root();
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/netpol-demo-{}", std::process::id()));
    let result = demo(&pin_dir);
    let _ = remove_pins(&pin_dir);
    println!("\n== cleaned up: namespaces, veths, routes and pinned maps removed");
    result
}

fn matrix(pods: &[Pod], server: &Pod) -> Result<()> {
    print!("{:>12}", "from \\ to");
    for p in PORTS {
        print!("  {:>12}", format!("{}:{p}", server.name));
    }
    println!();
    for c in pods.iter().filter(|p| p.name != server.name) {
        print!("{:>12}", c.name);
        for p in PORTS {
            let ok =
                tcp_echo(&c.netns, SocketAddr::from((server.ip, p)), Duration::from_millis(500))?;
            print!("  {:>12}", if ok { "reach" } else { "BLOCKED" });
        }
        println!();
    }
    Ok(())
}

fn demo(pin_dir: &std::path::Path) -> Result<()> {
    println!("== netpol demo: a lab node with three pods (network namespaces, routed veths)");
    let mut lab = Lab::new()?;
    let front = lab.add_pod("frontend")?;
    let other = lab.add_pod("other")?;
    let back = lab.add_pod("backend")?;
    let _servers: Vec<TcpServer> =
        PORTS.iter().map(|p| TcpServer::start(&back.netns, *p)).collect::<Result<_>>()?;
    for p in lab.pods() {
        println!("   {:<9} {:<15} host interface {}", p.name, p.ip, p.host_if);
    }

    println!("\n== 1. no policy: every pod reaches the backend");
    matrix(lab.pods(), &back)?;

    println!("\n== 2. load the TC programs, pin maps in {}", pin_dir.display());
    let mut dp =
        Dataplane::load(&DataplaneOptions { pin_dir: pin_dir.to_owned(), ..Default::default() })
            .context("loading the eBPF programs")?;
    let back_if = ifindex(&back.host_if)?;
    println!("   policy: backend ingress allows TCP 6379 from frontend only (rule 1)");
    dp.upsert_peer(
        PEER_SET_BITS + 128,
        PeerData { set_id: 1, addr: v4_mapped(front.ip.octets()) },
        PeerValue { portset_id: 1 },
    )?;
    dp.upsert_port(
        PORT_FULL_BITS,
        PortData { portset_id: 1, proto: 6, port: 6379u16.to_be_bytes(), _pad: 0 },
        PortValue { rule_id: 1, action: ACTION_ALLOW, _pad: [0; 3] },
    )?;
    dp.set_endpoint(back_if, Endpoint { generation: 1, ingress_np: 1, ..Default::default() })?;
    dp.attach(&back.host_if)?;
    println!("   attached from_pod (TC ingress) and to_pod (TC egress) to {}", back.host_if);

    println!("\n== 3. enforced: who reaches whom now");
    matrix(lab.pods(), &back)?;

    println!("\n== 4. the kernel's per-CPU counters for the backend, read back from user space");
    let c = dp.counters()?;
    for r in Reason::ALL {
        let n = c.packets(back_if, DIR_INGRESS, r);
        if n > 0 {
            println!(
                "   ingress {:<16} {n:>4} packets{}",
                r.name(),
                if r.is_drop() { "  (dropped)" } else { "" }
            );
        }
    }
    println!("   rule 1 opened {} connection(s)", c.by_rule.get(&1).map_or(0, |v| v.packets));

    println!("\n== 5. the pinned maps, as an operator sees them with bpftool");
    let ep = pin_dir.join("np_ep");
    println!("$ bpftool map dump pinned {}", ep.display());
    print!("{}", run("bpftool", &["map", "dump", "pinned", &ep.to_string_lossy()])?);
    let ct = pin_dir.join("np_ct");
    println!("$ bpftool map dump pinned {}  (conntrack, first entry)", ct.display());
    let dump = run("bpftool", &["map", "dump", "pinned", &ct.to_string_lossy()])?;
    println!("{}", dump.lines().take(24).collect::<Vec<_>>().join("\n"));

    dp.detach_all()?;
    drop(other);
    Ok(())
}
