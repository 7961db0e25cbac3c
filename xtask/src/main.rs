//! `cargo xtask <command>`: everything needed to set up, build, test and demonstrate netpol.
mod exec;
mod image;
mod preflight;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "netpol build, setup, test and demo tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the build and the tests need (idempotent): Debian packages, bpf-linker
    /// built against LLVM 22, nightly rust-src, bpffs.
    Setup,
    /// Report what is missing for building and for the privileged tests, without changing anything.
    Check,
    /// Set up, build, and run every test: unit, property, privileged datapath and end-to-end.
    Test(test::TestArgs),
    /// Set up, build, and run the demo on a local lab node.
    Demo,
    /// A local lab node for scenario files: `lab run [FILES] [--topology routed|bridged|both]`,
    /// `lab up FILE [--steps]` (keeps the node up until Ctrl-C), `lab list`.
    Lab {
        /// Arguments for netpol-lab (`cargo xtask lab -- --help` lists them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the agent's container image (Dockerfile) with docker or podman.
    Image(image::ImageArgs),
    /// Write `kubectl kustomize` of every kustomization in deploy/ to
    /// netpol-agent/tests/data/kustomize, which the deploy_manifests test compares its own
    /// renderer with (needs kubectl >= 1.21; run it after changing deploy/).
    KustomizeGolden,
    /// The long reliability runs: 1,000,000 fuzzed frames (fresh seed), restarts under traffic,
    /// conntrack pressure, 10 minutes of pod and policy churn.
    Soak,
    /// rustfmt check and clippy (host crates, then the eBPF crate for its BPF target).
    Lint,
    /// Run a benchmark; prints a table and writes JSON under bench/results/.
    Bench {
        /// Which benchmark: `datapath` (BPF_PROG_TEST_RUN cost per packet of the compiled maps vs
        /// an empty program), `compile` (the pure compiler on 10,000 pods / 2,000 policies / 500
        /// namespaces), `apply` (manifest change to first packet with the new verdict, real
        /// agent in the lab) or `veth` (throughput and latency between lab pods: no program,
        /// netpol, Felix-style iptables+ipset).
        name: String,
        /// Tiny sizes: checks the benchmark's code path; the figures mean nothing.
        #[arg(long)]
        quick: bool,
        /// datapath only: capacity of the conntrack table in flows, as the agent's
        /// --conntrack-size [default: the agent's default]. The JSON then goes to
        /// bench/results/datapath-conntrack-<FLOWS>.json, beside the published datapath.json.
        #[arg(long, value_name = "FLOWS")]
        conntrack_size: Option<u32>,
    },
}

/// What `cargo xtask bench` runs.
const BENCHMARKS: [&str; 4] = ["datapath", "compile", "apply", "veth"];

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Image(args) => image::run(&args),
        Command::KustomizeGolden => kustomize_golden(),
        Command::Check => {
            let missing = preflight::missing(preflight::Needs::ALL);
            if missing.is_empty() {
                println!("xtask: everything needed is installed");
                Ok(())
            } else {
                preflight::report(&missing)
            }
        }
        Command::Test(args) => {
            setup::run()?;
            test::run(&args)
        }
        Command::Soak => {
            setup::run()?;
            test::soak()
        }
        Command::Bench { name, quick, conntrack_size } => {
            anyhow::ensure!(
                BENCHMARKS.contains(&name.as_str()),
                "unknown benchmark {name:?}; available: {}",
                BENCHMARKS.join(", ")
            );
            anyhow::ensure!(
                conntrack_size.is_none() || name == "datapath",
                "--conntrack-size applies to the datapath benchmark only, not to {name:?}"
            );
            setup::run()?;
            exec::cargo(&["build", "--release", "-p", "netpol-it", "--bin", "netpol-bench"])?;
            // A quick run's figures mean nothing: never over the published results.
            let file = match conntrack_size {
                Some(flows) => format!("{name}-conntrack-{flows}.json"),
                None => format!("{name}.json"),
            };
            let out = if quick {
                exec::target_dir().join("bench-quick").join(file)
            } else {
                exec::workspace_root().join("bench/results").join(file)
            };
            let mut args = vec![std::ffi::OsString::from(&name), out.into_os_string()];
            if quick {
                args.push("--quick".into());
            }
            if let Some(flows) = conntrack_size {
                args.extend(["--conntrack-size".into(), flows.to_string().into()]);
            }
            exec::run_status(exec::target_dir().join("release/netpol-bench"), &args)
        }
        Command::Lint => {
            exec::cargo(&["fmt", "--all", "--check"])?;
            exec::cargo(&[
                "clippy",
                "--workspace",
                "--exclude",
                "netpol-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])?;
            // The eBPF crate alone: unifying netpol-common's `user` feature would pull in std.
            exec::run_status(
                "rustup",
                &[
                    "run",
                    preflight::EBPF_TOOLCHAIN,
                    "cargo",
                    "clippy",
                    "-p",
                    "netpol-ebpf",
                    // The upgrade test's variant code too (a feature only adds code).
                    "--all-features",
                    "--release",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--",
                    "-D",
                    "warnings",
                ],
            )
        }
        Command::Demo => {
            setup::run()?;
            exec::cargo(&["build", "-p", "netpol-it", "--bin", "netpol-demo"])?;
            exec::run_lab_tool(exec::target_dir().join("debug/netpol-demo"), &[] as &[&str])
        }
        Command::Lab { args } => {
            setup::run()?;
            exec::cargo(&["build", "-p", "netpol-it", "--bin", "netpol-lab"])?;
            exec::run_lab_tool(exec::target_dir().join("debug/netpol-lab"), &args)
        }
    }
}

/// See [`Command::KustomizeGolden`]. The list matches `KUSTOMIZATIONS` in
/// netpol-agent/tests/deploy_manifests.rs, which fails if a file is missing.
fn kustomize_golden() -> anyhow::Result<()> {
    use anyhow::Context as _;
    anyhow::ensure!(
        preflight::kubectl_ok(),
        "kubectl >= 1.21 (with its built-in kustomize) is needed; Debian's kubernetes-client is too old"
    );
    let root = exec::workspace_root();
    let out_dir = root.join("netpol-agent/tests/data/kustomize");
    std::fs::create_dir_all(&out_dir)?;
    for k in [".", "overlays/kind", "overlays/aks", "uninstall", "overlays/aks/uninstall"] {
        let dir = root.join("deploy").join(k);
        let out = std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(&dir)
            .output()
            .context("running kubectl kustomize")?;
        anyhow::ensure!(
            out.status.success(),
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let name = if k == "." { "deploy".to_owned() } else { k.replace('/', "_") };
        let file = out_dir.join(format!("{name}.yaml"));
        std::fs::write(&file, &out.stdout)?;
        println!("wrote {}", file.display());
    }
    Ok(())
}
