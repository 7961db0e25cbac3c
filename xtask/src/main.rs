//! `cargo xtask <command>`: everything needed to set up, build, test and demonstrate netpol.
mod exec;
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
    /// The long reliability runs: 1,000,000 fuzzed frames (fresh seed), restarts under traffic,
    /// conntrack pressure, 10 minutes of pod and policy churn.
    Soak,
    /// rustfmt check and clippy (host crates, then the eBPF crate for its BPF target).
    Lint,
    /// Run a benchmark; prints a table and writes JSON under bench/results/.
    Bench {
        /// Which benchmark: `datapath` (BPF_PROG_TEST_RUN cost per packet vs an empty program)
        /// or `compile` (the pure compiler on 10,000 pods / 2,000 policies / 500 namespaces).
        name: String,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
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
        Command::Bench { name } => {
            setup::run()?;
            anyhow::ensure!(
                ["datapath", "compile"].contains(&name.as_str()),
                "unknown benchmark {name:?}; available: datapath, compile"
            );
            exec::cargo(&["build", "--release", "-p", "netpol-it", "--bin", "netpol-bench"])?;
            let out = exec::workspace_root().join(format!("bench/results/{name}.json"));
            exec::run_status(
                exec::target_dir().join("release/netpol-bench"),
                &[std::ffi::OsStr::new(&name), out.as_os_str()],
            )
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
            exec::run_status(exec::target_dir().join("debug/netpol-demo"), &[] as &[&str])
        }
    }
}
