//! `cargo xtask bench <name>`: `datapath`, `compile`, `apply` and `veth`.
//!
//! `netpol-bench <name> [OUT.json] [--quick] [--conntrack-size FLOWS]`: runs one benchmark,
//! prints its table and writes its JSON to OUT (default `bench/results/<name>.json`). `--quick`
//! runs tiny sizes, for the smoke test that checks each benchmark's code path (its figures mean
//! nothing). `--conntrack-size` runs `datapath` with another conntrack table than the agent's
//! default, to see what the table's size costs a new flow on the host at hand.
mod apply;
mod cleanup;
mod compile;
mod datapath;
mod evict;
mod felix;
mod memory;
mod veth;

use anyhow::{Context as _, Result};

/// A cache line, the unit `evict` flushes and `memory` chases.
pub const LINE: usize = 64;

/// Full benchmark, or tiny sizes for a smoke test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    Full,
    Quick,
}

/// The median (sorts `v`); 0 for an empty slice.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `p`-th percentile (0..=100, nearest rank; sorts `v`).
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// What the figures were measured on.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    serde_json::json!({
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu,
    })
}

/// `netpol-bench`: runs one benchmark, prints its table and writes its JSON.
#[derive(clap::Parser)]
#[command(about)]
struct Args {
    /// datapath, compile, apply or veth (or spin, spin-denied, spin-allowed,
    /// spin-allowed-single: a steady load to profile with `perf record -a` meanwhile).
    name: String,
    /// Where to write the JSON [default: bench/results/<name>.json, or
    /// bench/results/datapath-conntrack-<flows>.json with --conntrack-size].
    out: Option<String>,
    /// Tiny sizes: checks the benchmark's code path; the figures mean nothing.
    #[arg(long)]
    quick: bool,
    /// datapath only: capacity of the conntrack table in flows, as the agent's
    /// --conntrack-size (rounded down the same way) [default: the agent's default].
    #[arg(long, value_name = "FLOWS")]
    conntrack_size: Option<u32>,
}

/// Where a run's JSON goes by default: a run with another conntrack size than the agent's
/// default never overwrites the published `datapath.json`.
fn default_out(name: &str, conntrack_size: Option<u32>) -> String {
    match conntrack_size {
        Some(flows) => format!("bench/results/{name}-conntrack-{flows}.json"),
        None => format!("bench/results/{name}.json"),
    }
}

fn main() -> Result<()> {
    let args = <Args as clap::Parser>::parse();
    cleanup::install()?;
    let size = if args.quick { Size::Quick } else { Size::Full };
    let name = args.name.as_str();
    if args.conntrack_size.is_some() && name != "datapath" {
        anyhow::bail!("--conntrack-size applies to the datapath benchmark only, not to {name:?}");
    }
    let out = args.out.clone().unwrap_or_else(|| default_out(name, args.conntrack_size));
    let doc = match name {
        "datapath" => datapath::run(size, args.conntrack_size)?,
        "compile" => compile::run(size)?,
        "apply" => apply::run(size)?,
        "veth" => veth::run(size)?,
        // Not benchmarks: a steady load to profile with `perf record -a` meanwhile.
        "spin" => datapath::spin(10, datapath::Spin::Established)?,
        "spin-denied" => datapath::spin(10, datapath::Spin::Denied)?,
        "spin-allowed" => datapath::spin(10, datapath::Spin::Allowed)?,
        "spin-allowed-single" => datapath::spin(10, datapath::Spin::AllowedSingle)?,
        other => {
            anyhow::bail!("unknown benchmark {other:?}; available: datapath, compile, apply, veth")
        }
    };
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {out}"))?;
    println!("results written to {out}");
    Ok(())
}
