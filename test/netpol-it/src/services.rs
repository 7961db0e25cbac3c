//! kube-proxy in the lab: Service addresses DNATed to backend pods by iptables in the host
//! namespace, the way kube-proxy's iptables mode does it (nat table, PREROUTING, one random
//! backend per new connection), plus the Service and EndpointSlice manifests the agent reads.
//!
//! Each [`ServiceNat`] owns one nat chain named `NPT-SVC-<pid>-<n>`, jumped to from PREROUTING
//! only for packets from the lab range to its own Service address (itself inside a blackholed
//! lab /24, so nothing un-NATed leaves the machine). The chain's rules are replaced atomically
//! (`iptables-restore --noflush`), like kube-proxy does, so backends can change while traffic
//! runs. Drop removes the jump and the chain; chains of runs that were killed are removed by the
//! next one.
use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context as _, Result};

use crate::{cmd::run, lab::LAB_PREFIX};

const CHAIN_PREFIX: &str = "NPT-SVC-";
static NEXT: AtomicU32 = AtomicU32::new(0);

/// One backend: address and the port the Service port resolves to on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// The backend pod's address.
    pub ip: Ipv4Addr,
    /// The resolved target port.
    pub port: u16,
}

/// One Service address in the host's nat table, removed on drop.
pub struct ServiceNat {
    chain: String,
    jump: Vec<String>,
    vip: Ipv4Addr,
}

fn lab_source() -> String {
    format!("{}.{}.0.0/16", LAB_PREFIX[0], LAB_PREFIX[1])
}

impl ServiceNat {
    /// Creates the chain and its PREROUTING jump for `vip` (which must be a lab address).
    pub fn new(vip: Ipv4Addr) -> Result<ServiceNat> {
        crate::require_root();
        let o = vip.octets();
        if [o[0], o[1]] != LAB_PREFIX {
            bail!("Service address {vip} is outside the lab range");
        }
        reap_stale()?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let chain = format!("{CHAIN_PREFIX}{}-{n}", std::process::id());
        run("iptables", &["-w", "-t", "nat", "-N", &chain])?;
        let mut nat = ServiceNat { chain, jump: Vec::new(), vip };
        let jump: Vec<String> = ["-s", &lab_source(), "-d", &format!("{vip}/32"), "-j", &nat.chain]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut args = vec!["-w", "-t", "nat", "-I", "PREROUTING"];
        args.extend(jump.iter().map(String::as_str));
        run("iptables", &args)?;
        nat.jump = jump;
        Ok(nat)
    }

    /// Lets the host route DNATed packets that arrive on `lab`'s bridge (bridged topology;
    /// per interface, never the global switch). Routed labs forward on every pod interface
    /// already.
    pub fn route_from(&self, lab: &crate::lab::Lab) -> Result<()> {
        if let Some(br) = lab.bridge() {
            crate::cmd::sysctl(&format!("net.ipv4.conf.{br}.forwarding"), "1")?;
        }
        Ok(())
    }

    /// The Service address.
    pub fn vip(&self) -> Ipv4Addr {
        self.vip
    }

    /// Replaces the rules atomically: `(protocol, port) → backends` (protocol `tcp`, `udp` or
    /// `sctp`). Like kube-proxy, each backend but the last gets a `statistic` rule with the
    /// probability that spreads new connections evenly; a port without backends is rejected.
    pub fn set(&self, ports: &[(&str, u16, Vec<Backend>)]) -> Result<()> {
        let mut text = format!("*nat\n:{} - [0:0]\n", self.chain);
        for (proto, port, backends) in ports {
            let head = format!(
                "-A {} -d {}/32 -p {proto} -m {proto} --dport {port}",
                self.chain, self.vip
            );
            if backends.is_empty() {
                // kube-proxy rejects in the filter table; dropping here keeps the rule in our
                // own chain (a DNAT to nothing: the blackhole drops it).
                continue;
            }
            for (i, b) in backends.iter().enumerate() {
                let left = backends.len() - i;
                let stat = if left > 1 {
                    format!(" -m statistic --mode random --probability {:.5}", 1.0 / left as f64)
                } else {
                    String::new()
                };
                text.push_str(&format!(
                    "{head}{stat} -j DNAT --to-destination {}:{}\n",
                    b.ip, b.port
                ));
            }
        }
        text.push_str("COMMIT\n");
        let mut child = Command::new("iptables-restore")
            .args(["-w", "--noflush"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting iptables-restore")?;
        child.stdin.take().context("iptables-restore stdin")?.write_all(text.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "iptables-restore failed: {}\n{text}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for ServiceNat {
    fn drop(&mut self) {
        if !self.jump.is_empty() {
            let mut args = vec!["-w", "-t", "nat", "-D", "PREROUTING"];
            args.extend(self.jump.iter().map(String::as_str));
            if let Err(e) = run("iptables", &args) {
                eprintln!("service nat teardown: {e:#}");
            }
        }
        for op in ["-F", "-X"] {
            if let Err(e) = run("iptables", &["-w", "-t", "nat", op, &self.chain]) {
                eprintln!("service nat teardown: {e:#}");
            }
        }
    }
}

/// Removes chains (and their jumps) left by harness processes that no longer exist.
fn reap_stale() -> Result<()> {
    let rules = run("iptables", &["-w", "-t", "nat", "-S"]).context("listing the nat table")?;
    let me = std::process::id();
    let dead = |chain: &str| {
        chain
            .strip_prefix(CHAIN_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| pid != me && !std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    for line in rules.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"-A")
            && words.get(1) == Some(&"PREROUTING")
            && words.iter().any(|w| dead(w))
        {
            let mut args = vec!["-w", "-t", "nat", "-D"];
            args.extend(&words[1..]);
            let _ = run("iptables", &args);
        }
    }
    for line in rules.lines() {
        if let Some(chain) = line.strip_prefix("-N ") {
            if dead(chain) {
                let _ = run("iptables", &["-w", "-t", "nat", "-F", chain]);
                let _ = run("iptables", &["-w", "-t", "nat", "-X", chain]);
            }
        }
    }
    Ok(())
}

/// A Service manifest: `clusterIP`, and ports as (name, protocol, port, targetPort).
pub fn service_manifest(
    namespace: &str,
    name: &str,
    cluster_ip: Ipv4Addr,
    ports: &[(&str, &str, u16, &str)],
) -> String {
    let ports: String = ports
        .iter()
        .map(|(n, proto, port, target)| {
            format!("  - name: \"{n}\"\n    protocol: {proto}\n    port: {port}\n    targetPort: {target}\n")
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  clusterIP: {cluster_ip}\n  ports:\n{ports}"
    )
}

/// An IPv4 EndpointSlice manifest of Service `service`: ports as (name, protocol, port), and
/// endpoints as (address, ready).
pub fn slice_manifest(
    namespace: &str,
    name: &str,
    service: &str,
    ports: &[(&str, &str, u16)],
    endpoints: &[(Ipv4Addr, bool)],
) -> String {
    let ports: String = ports
        .iter()
        .map(|(n, proto, port)| format!("- name: \"{n}\"\n  protocol: {proto}\n  port: {port}\n"))
        .collect();
    let endpoints: String = endpoints
        .iter()
        .map(|(ip, ready)| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: {ready}}}\n"))
        .collect();
    let endpoints =
        if endpoints.is_empty() { "[]\n".to_string() } else { format!("\n{endpoints}") };
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n{ports}endpoints: {endpoints}"
    )
}
