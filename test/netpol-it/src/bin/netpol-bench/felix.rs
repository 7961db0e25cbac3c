//! An iptables + ipset rendering of a policy set in the style of Calico Felix's iptables
//! dataplane, for the `veth` benchmark's comparison.
//!
//! Like Felix: a dispatch chain jumps to a from-workload chain by input interface and a
//! to-workload chain by output interface; every workload chain accepts RELATED,ESTABLISHED
//! first and drops INVALID; a to-workload chain with policies clears the accept mark, jumps to
//! one chain per policy in order and returns as soon as one set the mark, and drops what no
//! policy accepted; a policy chain matches the peer against one ipset per selector (or
//! ipBlock) and the ports with multiport. Endpoints without policies accept (Felix's default
//! profile).
//!
//! Everything lives in chains and sets named `NPB<pid>-…`, reached only from FORWARD rules
//! that match the lab pods' host-side interfaces, and is removed on drop and on Ctrl-C.
use std::{io::Write as _, process::Command};

use anyhow::{Context as _, Result};

use crate::cleanup::{on_signal, Registration};

const ACCEPT_MARK: &str = "0x10000/0x10000";

/// One workload: its host-side interface and the ingress policies that select it.
pub struct Workload {
    pub iface: String,
    /// Policies in order; each is (peer CIDRs, TCP ports) of its one ingress rule.
    pub ingress: Vec<(Vec<String>, Vec<u16>)>,
}

/// The installed rendering, removed on drop.
pub struct Rendering {
    prefix: String,
    ifaces: Vec<String>,
    chains: Vec<String>,
    sets: Vec<String>,
    _signal: Registration,
}

fn restore(program: &str, args: &[&str], input: &str) -> Result<()> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Rendering {
    /// Installs the rendering of `workloads`.
    pub fn install(workloads: &[Workload]) -> Result<Rendering> {
        let prefix = format!("NPB{}", std::process::id() % 100_000);
        let mut chains = vec![format!("{prefix}-FWD")];
        let mut sets = Vec::new();
        let mut ipsets = String::new();
        let mut rules = String::new();
        let fwd = &chains[0].clone();
        rules.push_str(&format!("-A {fwd} -j MARK --set-xmark 0x0/0x10000\n"));
        for (k, w) in workloads.iter().enumerate() {
            let (fw, tw) = (format!("{prefix}-fw-{k}"), format!("{prefix}-tw-{k}"));
            rules.push_str(&format!("-A {fwd} -i {} -j {fw}\n", w.iface));
            for (chain, policies) in [(&fw, &[][..]), (&tw, &w.ingress[..])] {
                rules.push_str(&format!(
                    "-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
                     -A {chain} -m conntrack --ctstate INVALID -j DROP\n"
                ));
                if policies.is_empty() {
                    rules.push_str(&format!(
                        "-A {chain} -j MARK --set-xmark {ACCEPT_MARK}\n-A {chain} -j RETURN\n"
                    ));
                    continue;
                }
                rules.push_str(&format!("-A {chain} -j MARK --set-xmark 0x0/0x10000\n"));
                for (i, (cidrs, ports)) in policies.iter().enumerate() {
                    let (pi, set) = (format!("{prefix}-pi-{k}-{i}"), format!("{prefix}-s{k}-{i}"));
                    ipsets.push_str(&format!("create {set} hash:net family inet\n"));
                    for c in cidrs {
                        ipsets.push_str(&format!("add {set} {c}\n"));
                    }
                    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
                    rules.push_str(&format!(
                        "-A {pi} -p tcp -m set --match-set {set} src -m multiport --dports {} -j MARK --set-xmark {ACCEPT_MARK}\n\
                         -A {pi} -m mark --mark {ACCEPT_MARK} -j RETURN\n\
                         -A {chain} -j {pi}\n\
                         -A {chain} -m mark --mark {ACCEPT_MARK} -j RETURN\n",
                        ports.join(",")
                    ));
                    chains.push(pi);
                    sets.push(set);
                }
                rules.push_str(&format!("-A {chain} -j DROP\n"));
            }
            rules.push_str(&format!("-A {fwd} -o {} -j {tw}\n", w.iface));
            chains.push(fw);
            chains.push(tw);
        }
        rules.push_str(&format!(
            "-A {fwd} -m mark --mark {ACCEPT_MARK} -j ACCEPT\n-A {fwd} -j DROP\n"
        ));
        let ifaces: Vec<String> = workloads.iter().map(|w| w.iface.clone()).collect();
        let mut script = String::from("*filter\n");
        for c in &chains {
            script.push_str(&format!(":{c} - [0:0]\n"));
        }
        script.push_str(&rules);
        for i in &ifaces {
            script.push_str(&format!("-I FORWARD 1 -i {i} -j {fwd}\n"));
        }
        script.push_str("COMMIT\n");

        let signal = {
            let (p, i, c, s) = (prefix.clone(), ifaces.clone(), chains.clone(), sets.clone());
            on_signal(move || remove(&p, &i, &c, &s))
        };
        let r = Rendering { prefix, ifaces, chains, sets, _signal: signal };
        restore("ipset", &["restore"], &ipsets).context("creating the ipsets")?;
        restore("iptables-restore", &["--noflush"], &script).context("installing the chains")?;
        Ok(r)
    }

    /// Number of policy chains (one per policy per workload).
    pub fn policy_chains(&self) -> usize {
        self.sets.len()
    }
}

/// Removes the FORWARD jumps, the chains and the sets; best effort, errors printed.
fn remove(prefix: &str, ifaces: &[String], chains: &[String], sets: &[String]) {
    let fwd = format!("{prefix}-FWD");
    let mut script = String::from("*filter\n");
    for i in ifaces {
        script.push_str(&format!("-D FORWARD -i {i} -j {fwd}\n"));
    }
    for c in chains {
        script.push_str(&format!("-F {c}\n"));
    }
    for c in chains {
        script.push_str(&format!("-X {c}\n"));
    }
    script.push_str("COMMIT\n");
    if restore("iptables-restore", &["--noflush"], &script).is_err() {
        // Partly installed: remove piece by piece what exists.
        for i in ifaces {
            let _ = Command::new("iptables").args(["-D", "FORWARD", "-i", i, "-j", &fwd]).output();
        }
        for c in chains {
            let _ = Command::new("iptables").args(["-F", c]).output();
        }
        for c in chains {
            let _ = Command::new("iptables").args(["-X", c]).output();
        }
    }
    let destroy: String = sets.iter().map(|s| format!("destroy {s}\n")).collect();
    if restore("ipset", &["restore"], &destroy).is_err() {
        for s in sets {
            let _ = Command::new("ipset").args(["destroy", s]).output();
        }
    }
    let left = Command::new("iptables").args(["-S"]).output().map(|o| o.stdout).unwrap_or_default();
    if String::from_utf8_lossy(&left).contains(&format!("{prefix}-")) {
        eprintln!("iptables rendering: chains named {prefix}-* are left; remove them by hand");
    }
}

impl Drop for Rendering {
    fn drop(&mut self) {
        remove(&self.prefix, &self.ifaces, &self.chains, &self.sets);
    }
}
