//! `cargo xtask lab`: a local lab node for scenario files, with no cluster.
//!
//! `run` plays scenarios step by step (every shipped one by default, in both topologies) and
//! prints their reachability matrices; `up` builds one scenario's node, optionally plays its
//! steps, and keeps it running for you to poke at until Ctrl-C. Either way everything is torn
//! down at the end, also on Ctrl-C and on failure.
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use netpol_it::{
    interrupt,
    lab::Topology,
    scenario::{self, Node, Scenario},
};

#[derive(Parser)]
#[command(
    name = "netpol-lab",
    about = "A local lab node: pods as network namespaces, enforced by the real agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Play scenarios and check every expectation (default: all shipped, both topologies).
    Run {
        /// Scenario files (default: test/netpol-it/scenarios/*.yaml).
        files: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = Wiring::Both)]
        topology: Wiring,
    },
    /// Build one scenario's node and keep it up until Ctrl-C.
    Up {
        /// The scenario file (its namespaces and pods; steps only with --steps).
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = Wiring::Routed)]
        topology: Wiring,
        /// Play the scenario's steps before holding the node.
        #[arg(long)]
        steps: bool,
    },
    /// List the shipped scenarios.
    List,
}

#[derive(Clone, Copy, ValueEnum)]
enum Wiring {
    /// A /32 host route per pod veth with proxy ARP (Calico, Azure CNI transparent mode).
    Routed,
    /// Pods on a Linux bridge (kubenet's cbr0).
    Bridged,
    /// Routed, then bridged.
    Both,
}

impl Wiring {
    fn topologies(self) -> Vec<Topology> {
        match self {
            Wiring::Routed => vec![Topology::Routed],
            Wiring::Bridged => vec![Topology::Bridged],
            Wiring::Both => vec![Topology::Routed, Topology::Bridged],
        }
    }
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("netpol-lab: {e:#}");
        std::process::exit(if interrupt::interrupted() { 130 } else { 1 });
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    interrupt::install()?;
    match cli.command {
        Command::List => {
            for f in scenario::shipped()? {
                let s = Scenario::load(&f)?;
                println!("{:<44} {}", f.display(), s.name);
            }
            Ok(())
        }
        Command::Run { files, topology } => {
            let files = if files.is_empty() { scenario::shipped()? } else { files };
            let mut failed = Vec::new();
            for f in &files {
                let s = Scenario::load(f)?;
                for t in topology.topologies() {
                    if let Err(e) = scenario::run(&s, t) {
                        if interrupt::interrupted() {
                            return Err(e);
                        }
                        eprintln!("{e:#}");
                        failed.push(format!("{} ({t:?})", f.display()));
                    }
                }
            }
            if !failed.is_empty() {
                bail!("{} scenario run(s) failed: {}", failed.len(), failed.join(", "));
            }
            println!("lab: every scenario met every expectation");
            Ok(())
        }
        Command::Up { file, topology, steps } => {
            let s = Scenario::load(&file)?;
            let t = match topology {
                Wiring::Both => bail!("`up` builds one node: --topology routed or bridged"),
                w => w.topologies()[0],
            };
            println!("== lab node for {:?} ({t:?} topology)", s.name);
            let mut node = Node::start(&s, t).context("building the lab node")?;
            if steps {
                for i in 0..s.steps.len() {
                    for w in node.step(i)? {
                        println!("   UNEXPECTED: {w}");
                    }
                }
            }
            let agent = node.agent();
            let first = node.pods().next().map(|(_, p)| p.netns.clone()).unwrap_or_default();
            println!(
                "\n== the node is up; the agent enforces the manifests in {}\n\
                 \x20  add, edit or delete NetworkPolicy files there and probe again:\n\
                 \x20    ip netns exec {first} nc -zv -w1 <pod IP> <port>\n\
                 \x20    curl -s http://{}/metrics | grep netpol_drop\n\
                 \x20    netpol-agent inspect --pin-dir {} --status-file {}\n\
                 \x20    netpol-agent explain --manifests {} --from NS/POD --to NS/POD --port PORT/PROTO\n\
                 \x20  press Ctrl-C to tear everything down",
                node.manifests().display(),
                agent.metrics_addr,
                agent.pin_dir.display(),
                agent.status_file.display(),
                node.manifests().display(),
            );
            node.hold();
            println!("lab: tearing down");
            Ok(())
        }
    }
}
