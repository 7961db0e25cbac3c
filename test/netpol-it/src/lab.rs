//! A lab node: pods as network namespaces behind host-side veths (routed topology).
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result};

use crate::cmd::{ip, run, sysctl};

/// First two octets of every lab address.
pub const LAB_PREFIX: [u8; 2] = [10, 213];
/// Prefix of every network namespace and interface the harness creates.
const NAME_PREFIX: &str = "npt";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// One pod of the lab.
#[derive(Clone, Debug)]
pub struct Pod {
    /// Short name given by the test.
    pub name: String,
    /// Network namespace name.
    pub netns: String,
    /// Host-side interface name (where the programs attach).
    pub host_if: String,
    /// The pod's IPv4 address.
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address (bridged topology only: routing IPv6 between veths would need the
    /// host-wide IPv6 forwarding switch, which the lab never touches).
    pub ip6: Option<Ipv6Addr>,
}

/// How pods are connected to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// A /32 host route per pod veth and proxy ARP (Calico, Azure CNI transparent mode).
    Routed,
    /// Host-side veths enslaved to a Linux bridge (kubenet's cbr0, Azure CNI bridge mode);
    /// dual-stack, pods in one /24 and one /64.
    Bridged,
}

/// A set of pods in one /24 of the lab range, torn down on drop.
pub struct Lab {
    id: String,
    subnet: u8,
    topology: Topology,
    bridge: Option<String>,
    pods: Vec<Pod>,
    blackhole: String,
    /// Next never-used pod index, and indexes freed by [`Lab::remove_pod`] (reused first, as a
    /// CNI reuses addresses).
    next_idx: usize,
    free: Vec<usize>,
}

impl Lab {
    /// Creates an empty routed lab with its own /24 (blackholed in the host namespace first).
    pub fn new() -> Result<Lab> {
        Lab::with_topology(Topology::Routed)
    }

    /// Creates an empty lab of the given topology.
    pub fn with_topology(topology: Topology) -> Result<Lab> {
        crate::require_root();
        reap_stale()?;
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = lab_id(pid, n);
        // Pick a free /24: an existing blackhole means another lab (or run) owns it.
        let mut subnet = ((pid.wrapping_mul(7) + n * 13) % 200 + 20) as u8;
        for _ in 0..200 {
            let net = format!("{}.{}.{subnet}.0/24", LAB_PREFIX[0], LAB_PREFIX[1]);
            if ip(&format!("route add blackhole {net}")).is_ok() {
                let mut lab = Lab {
                    id,
                    subnet,
                    topology,
                    bridge: None,
                    pods: Vec::new(),
                    blackhole: net,
                    next_idx: 2,
                    free: Vec::new(),
                };
                // The IPv6 range too, before any pod gets an address in it.
                ip(&format!("-6 route add blackhole {}", lab.blackhole6()))?;
                if topology == Topology::Bridged {
                    let br = format!("{NAME_PREFIX}{}br", lab.id);
                    lab.bridge = Some(br.clone());
                    ip(&format!("link add name {br} type bridge"))?;
                    ip(&format!("link set {br} up"))?;
                    // Like kubenet's cbr0: the bridge holds the pods' gateway address, and the
                    // host routes the pod range to it. `noprefixroute` plus two halves keeps
                    // these routes more specific than the blackhole for the same /24.
                    let (a, b, s) = (LAB_PREFIX[0], LAB_PREFIX[1], lab.subnet);
                    ip(&format!("addr add {a}.{b}.{s}.1/24 dev {br} noprefixroute"))?;
                    ip(&format!("route add {a}.{b}.{s}.0/25 dev {br}"))?;
                    ip(&format!("route add {a}.{b}.{s}.128/25 dev {br}"))?;
                    let v6 = format!("fd13:213:0:{s:x}");
                    ip(&format!("-6 addr add {v6}::1/64 dev {br} noprefixroute nodad"))?;
                    ip(&format!("-6 route add {v6}::/65 dev {br}"))?;
                    ip(&format!("-6 route add {v6}:8000::/65 dev {br}"))?;
                }
                return Ok(lab);
            }
            subnet = subnet % 200 + 21;
        }
        anyhow::bail!("no free /24 in {}.{}.0.0/16 for the lab", LAB_PREFIX[0], LAB_PREFIX[1])
    }

    /// Adds a pod: namespace, veth pair, address, routes, forwarding and proxy ARP on the host
    /// side (per interface: never the global ip_forward).
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        let pod = self.next_pod(name);
        self.create_pod(pod)
    }

    /// The pod [`Lab::add_pod`] would create next (names and addresses), without creating it:
    /// for manifests written before a pod's interface exists.
    pub fn next_pod(&self, name: &str) -> Pod {
        let idx = self.free.last().copied().unwrap_or(self.next_idx);
        Pod {
            name: name.to_owned(),
            netns: format!("{NAME_PREFIX}-{}-{idx}", self.id),
            host_if: format!("{NAME_PREFIX}{}h{idx:02x}", self.id),
            ip: Ipv4Addr::new(LAB_PREFIX[0], LAB_PREFIX[1], self.subnet, idx as u8),
            ip6: (self.topology == Topology::Bridged)
                .then(|| Ipv6Addr::new(0xfd13, 0x213, 0, self.subnet as u16, 0, 0, 0, idx as u16)),
        }
    }

    fn create_pod(&mut self, pod: Pod) -> Result<Pod> {
        let idx = pod.ip.octets()[3] as usize;
        if self.free.last() == Some(&idx) {
            self.free.pop();
        } else {
            self.next_idx = self.next_idx.max(idx + 1);
        }
        anyhow::ensure!(idx < 255, "lab subnet full");
        // Record first so that drop removes a half-built pod too.
        self.pods.push(pod.clone());
        let (ns, hif) = (&pod.netns, &pod.host_if);
        ip(&format!("netns add {ns}"))?;
        ip(&format!("link add {hif} type veth peer name eth0 netns {ns}"))?;
        let inside = |args: &str| ip(&format!("-n {ns} {args}"));
        inside("link set lo up")?;
        if let Some(br) = &self.bridge {
            inside(&format!("addr add {}/24 dev eth0", pod.ip))?;
            if let Some(ip6) = pod.ip6 {
                inside(&format!("-6 addr add {ip6}/64 dev eth0 nodad"))?;
            }
            inside("link set eth0 up")?;
            inside(&format!(
                "route add default via {}.{}.{}.1",
                LAB_PREFIX[0], LAB_PREFIX[1], self.subnet
            ))?;
            ip(&format!("link set {hif} master {br}"))?;
            ip(&format!("link set {hif} up"))?;
            return Ok(pod);
        }
        inside(&format!("addr add {}/32 dev eth0", pod.ip))?;
        inside("link set eth0 up")?;
        // Calico-style: the gateway is a fixed link-local address answered by proxy ARP.
        inside("route add 169.254.1.1 dev eth0 scope link")?;
        inside("route add default via 169.254.1.1 dev eth0")?;
        sysctl(&format!("net.ipv4.conf.{hif}.forwarding"), "1")?;
        sysctl(&format!("net.ipv4.conf.{hif}.proxy_arp"), "1")?;
        sysctl(&format!("net.ipv4.neigh.{hif}.proxy_delay"), "0")?;
        // Without this, a pod without a matching return route would be dropped by rp_filter.
        sysctl(&format!("net.ipv4.conf.{hif}.rp_filter"), "0")?;
        ip(&format!("link set {hif} up"))?;
        ip(&format!("route add {}/32 dev {hif}", pod.ip))?;
        Ok(pod)
    }

    fn blackhole6(&self) -> String {
        format!("fd13:213:0:{:x}::/64", self.subnet)
    }

    /// Deletes a pod: its veth pair (the host side goes with it, as when a CNI tears a pod
    /// down) and its namespace. Its index and addresses are reused by later pods.
    pub fn remove_pod(&mut self, netns: &str) -> Result<()> {
        let i = self.pods.iter().position(|p| p.netns == netns).context("no such lab pod")?;
        let pod = self.pods.remove(i);
        self.free.push(pod.ip.octets()[3] as usize);
        ip(&format!("link del {}", pod.host_if))?;
        ip(&format!("netns del {}", pod.netns)).map(drop)
    }

    /// Address `host` of the lab's /24 (blackholed: an empty lab is a range of addresses that
    /// never leave the machine, e.g. for Service addresses).
    pub fn address(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(LAB_PREFIX[0], LAB_PREFIX[1], self.subnet, host)
    }

    /// The bridge of the bridged topology.
    pub fn bridge(&self) -> Option<&str> {
        self.bridge.as_deref()
    }

    /// The pods added so far.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Removes everything this lab created. Called by drop; errors are reported, not fatal.
    fn teardown(&mut self) {
        for pod in self.pods.drain(..) {
            // Deleting the host end removes the veth pair (and the pod's /32 route) at once, even
            // if the namespace itself lingers because a socket in it is still closing.
            let _ = ip(&format!("link del {}", pod.host_if));
            if let Err(e) = ip(&format!("netns del {}", pod.netns)) {
                eprintln!("lab teardown: {e:#}");
            }
        }
        if let Some(br) = self.bridge.take() {
            if let Err(e) = ip(&format!("link del {br}")) {
                eprintln!("lab teardown: {e:#}");
            }
        }
        let _ = ip(&format!("-6 route del blackhole {}", self.blackhole6()));
        if let Err(e) = ip(&format!("route del blackhole {}", self.blackhole)) {
            eprintln!("lab teardown: {e:#}");
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Removes namespaces left behind by a harness process that no longer exists (killed run).
fn reap_stale() -> Result<()> {
    let list = run("ip", &["netns", "list"]).context("listing network namespaces")?;
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(&format!("{NAME_PREFIX}-")) else {
            continue;
        };
        let Some(id) = rest.split('-').next() else {
            continue;
        };
        let Some(pid) = owner(id) else {
            continue;
        };
        let mine = pid == std::process::id();
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        if !alive && !mine {
            let _ = ip(&format!("netns del {name}"));
            let _ = ip(&format!("link del {NAME_PREFIX}{id}br"));
        }
    }
    // Stale blackholes of dead runs are harmless (they only ever drop lab traffic) and get
    // reused by the next lab that picks the same /24.
    Ok(())
}

/// The id of a process's `n`th lab: its full pid and a two-digit counter, always two: owners
/// are found by cutting the counter off (a one-digit counter once made a run read another live
/// run's pid and reap its pods). Interface names (15 bytes at most) are `npt` + id + `h` + the
/// pod index in two hex digits.
fn lab_id(pid: u32, n: u32) -> String {
    format!("{pid}{:02}", n % 100)
}

/// The pid that owns lab id `id` (see [`lab_id`]).
fn owner(id: &str) -> Option<u32> {
    let pid = id.get(..id.len().checked_sub(2)?)?;
    pid.parse().ok().filter(|p| *p > 0)
}

/// Interface index of a host-side interface.
pub fn ifindex(name: &str) -> Result<u32> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .with_context(|| format!("reading the ifindex of {name}"))?;
    s.trim().parse().with_context(|| format!("parsing the ifindex of {name}"))
}

/// Programs attached with TCX to interface `iface` (ingress, egress); (0, 0) if it has none or
/// does not exist.
pub fn tcx_programs(iface: &str) -> (usize, usize) {
    use aya::programs::{tc::TcAttachType, SchedClassifier};
    let n = |at| SchedClassifier::query_tcx(iface, at).map_or(0, |(_, p)| p.len());
    (n(TcAttachType::Ingress), n(TcAttachType::Egress))
}

#[cfg(test)]
mod tests {
    use super::{lab_id, owner};

    #[test]
    fn the_owner_of_a_lab_id_is_its_pid() {
        // Full pids (pid_max can be 4194304), any counter, names short enough for interfaces.
        for pid in [1, 42, 20_764, 99_999, 100_000, 4_194_304] {
            for n in [0, 1, 9, 10, 99, 255, 256] {
                let id = lab_id(pid, n);
                assert_eq!(owner(&id), Some(pid), "{id}");
                assert!(format!("npt{id}h{:02x}", 254).len() <= 15, "{id}");
            }
        }
        assert_eq!(owner("7"), None);
    }
}
