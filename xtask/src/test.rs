//! `cargo xtask test`: every test, privileged ones included. Fails if they cannot run.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{exec::workspace_root, preflight};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Only the unprivileged unit and property tests.
    #[arg(long)]
    pub unit_only: bool,
}

/// Totals over every `cargo test` run.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

pub fn run(args: &TestArgs) -> Result<()> {
    let needs = preflight::Needs { build: true, privileged: !args.unit_only };
    let missing = preflight::missing(needs);
    if !missing.is_empty() {
        // Privileged tests that cannot run are a failure, never a silent skip.
        return preflight::report(&missing);
    }
    let mut tally = Tally::default();
    println!("xtask test: unit and property tests");
    let unit = cargo_test(
        &[
            "test",
            "--no-fail-fast",
            "--workspace",
            "--exclude",
            "netpol-ebpf",
            "--exclude",
            "netpol-it",
        ],
        &mut tally,
    );
    let privileged = if args.unit_only || unit.is_err() {
        Ok(())
    } else {
        println!("xtask test: privileged datapath and end-to-end tests (real packets between namespaces)");
        // The restart and pressure tests run the real agent binary as a child process (to kill
        // it with SIGKILL).
        crate::exec::cargo(&["build", "-p", "netpol-agent", "--bin", "netpol-agent"]).and_then(
            |()| {
                // One at a time: they attach programs and create namespaces and routes on this host.
                cargo_test(
                    &["test", "--no-fail-fast", "-p", "netpol-it", "--", "--test-threads=1"],
                    &mut tally,
                )
            },
        )
    };
    println!("summary: {} passed, {} failed", tally.passed, tally.failed);
    unit?;
    privileged?;
    if tally.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// `cargo xtask soak`: the long versions of the reliability tests — 1,000,000 fuzzed frames
/// with a fresh seed, restarts and upgrades under traffic, conntrack pressure and 10 minutes of
/// churn.
pub fn soak() -> Result<()> {
    let missing = preflight::missing(preflight::Needs { build: true, privileged: true });
    if !missing.is_empty() {
        return preflight::report(&missing);
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs());
    // SAFETY (of the environment change): single-threaded at this point.
    std::env::set_var("NETPOL_FUZZ_FRAMES", "1000000");
    std::env::set_var("NETPOL_FUZZ_SEED", seed.to_string());
    std::env::set_var("NETPOL_CHURN_SECS", "600");
    println!("xtask soak: NETPOL_FUZZ_SEED={seed} (rerun a failure with this seed)");
    crate::exec::cargo(&["build", "-p", "netpol-agent", "--bin", "netpol-agent"])?;
    let mut tally = Tally::default();
    let mut args = vec!["test", "-p", "netpol-it"];
    for t in SOAK_TESTS {
        args.extend(["--test", t]);
    }
    args.extend(["--", "--test-threads=1", "--nocapture"]);
    let r = cargo_test(&args, &mut tally);
    println!("summary: {} passed, {} failed", tally.passed, tally.failed);
    r
}

/// The test binaries whose size `cargo xtask soak` turns up.
const SOAK_TESTS: &[&str] = &["fuzz_packets", "restart_traffic", "conntrack_pressure", "churn"];

/// Runs cargo, echoing its output and adding up its `test result:` lines.
fn cargo_test(args: &[&str], tally: &mut Tally) -> Result<()> {
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `cargo {}`", args.join(" ")))?;
    let stdout = child.stdout.take().context("cargo stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some((p, f)) = parse_result(&line) {
            tally.passed += p;
            tally.failed += f;
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Parses `test result: ok. 5 passed; 0 failed; ...`.
fn parse_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let mut passed = None;
    let mut failed = None;
    for part in rest.split([';', '.']) {
        let mut words = part.split_whitespace();
        if let (Some(n), Some(what)) = (words.next(), words.next()) {
            match what {
                "passed" => passed = n.parse().ok(),
                "failed" => failed = n.parse().ok(),
                _ => {}
            }
        }
    }
    Some((passed?, failed?))
}

#[cfg(test)]
mod tests {
    use super::parse_result;

    #[test]
    fn parses_cargo_test_result_lines() {
        let ok = "test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.05s";
        assert_eq!(parse_result(ok), Some((5, 0)));
        let bad = "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(parse_result(bad), Some((3, 2)));
        assert_eq!(parse_result("running 5 tests"), None);
    }
}
