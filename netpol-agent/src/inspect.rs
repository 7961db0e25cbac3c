//! `netpol-agent inspect` and `netpol-agent conntrack`: what the node enforces, read from the
//! pinned maps (the kernel's truth) and the agent's status file (names, policies, rule origins).
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};

use netpol_common::{
    counters::Reason,
    ct::{self, CtKey, CtValue},
    direction_name, maps, DIR_EGRESS,
};
use serde::Serialize;

use crate::dataplane::pinned::{MapFill, PinnedError, PinnedMaps};
use crate::explain::OutputFormat;
use crate::status::{AppliedPolicy, Status, StatusError};

/// Errors of `inspect` and `conntrack`.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Reading the maps failed.
    #[error(transparent)]
    Pinned(#[from] PinnedError),
    /// Reading the status file failed (other than a missing file).
    #[error(transparent)]
    Status(#[from] StatusError),
}

/// Arguments of `netpol-agent inspect`.
#[derive(clap::Args, Debug, Clone)]
pub struct InspectArgs {
    /// Where the maps are pinned.
    #[arg(long, default_value = maps::PIN_DIR)]
    pub pin_dir: PathBuf,
    /// The agent's status file.
    #[arg(long, default_value = crate::status::DEFAULT_PATH)]
    pub status_file: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// Arguments of `netpol-agent conntrack`: the same as `inspect` (the status file supplies pod
/// names).
pub type ConntrackArgs = InspectArgs;

/// Packets of one endpoint, direction and reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CounterRow {
    /// `ingress` or `egress`.
    pub direction: &'static str,
    /// Reason name.
    pub reason: String,
    /// Whether packets with this reason are dropped.
    pub drop: bool,
    /// Packets, summed over CPUs.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// One endpoint as seen by the kernel and the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointReport {
    /// `NAMESPACE/POD` (`None`: in `np_ep` but not in the status file).
    pub pod: Option<String>,
    /// Host-side interface.
    pub interface: Option<String>,
    /// Its index.
    pub ifindex: u32,
    /// Pod addresses.
    pub ips: Vec<IpAddr>,
    /// Generation in the status file.
    pub status_generation: Option<u32>,
    /// Generation in `np_ep` (`None`: no kernel entry).
    pub kernel_generation: Option<u32>,
    /// The two generations differ or one side is missing.
    pub mismatch: bool,
    /// Audit mode.
    pub audit: bool,
    /// Policies selecting the pod.
    pub policies: Vec<AppliedPolicy>,
    /// Non-zero counters.
    pub counters: Vec<CounterRow>,
    /// Dropped packets, both directions.
    pub dropped: u64,
}

/// The answer of `inspect`.
#[derive(Clone, Debug, Serialize)]
pub struct InspectReport {
    /// Node name from the status file.
    pub node: Option<String>,
    /// Pin directory read.
    pub pin_dir: PathBuf,
    /// Why the status file could not be used, if so.
    pub status_warning: Option<String>,
    /// When the status file was written (Unix seconds).
    pub status_written_at: Option<u64>,
    /// Endpoints.
    pub endpoints: Vec<EndpointReport>,
    /// Pods waiting for their interface.
    pub pending: Vec<String>,
    /// Map fill levels.
    pub maps: Vec<MapFill>,
    /// Packets on attached interfaces without an endpoint entry.
    pub no_endpoint_packets: u64,
    /// Deny events lost (ring buffer full).
    pub events_lost: u64,
}

fn load_status(path: &Path) -> Result<(Option<Status>, Option<String>), StatusError> {
    match Status::read(path) {
        Ok(s) => Ok((Some(s), None)),
        Err(e @ StatusError::Missing { .. }) => Ok((None, Some(e.to_string()))),
        Err(e) => Err(e),
    }
}

/// Reads everything `inspect` shows.
pub fn inspect(pin_dir: &Path, status_file: &Path) -> Result<InspectReport, InspectError> {
    let pinned = PinnedMaps::open(pin_dir)?;
    let (status, status_warning) = load_status(status_file)?;
    let kernel = pinned.endpoints()?;
    let counters = pinned.counters()?;
    let mut ifindexes: Vec<u32> = kernel.iter().map(|(i, _)| *i).collect();
    if let Some(s) = &status {
        ifindexes.extend(s.endpoints.iter().map(|e| e.ifindex));
    }
    ifindexes.sort_unstable();
    ifindexes.dedup();
    let endpoints = ifindexes
        .into_iter()
        .map(|ifindex| {
            let st = status.as_ref().and_then(|s| s.endpoint_by_ifindex(ifindex));
            let k = kernel.iter().find(|(i, _)| *i == ifindex).map(|(_, e)| e);
            let rows: Vec<CounterRow> = counters
                .by_reason
                .iter()
                .filter(|(key, v)| key.ifindex == ifindex && v.packets > 0)
                .map(|(key, v)| {
                    let reason = Reason::from_u8(key.reason);
                    CounterRow {
                        direction: direction_name(key.direction),
                        reason: reason.map_or_else(|| key.reason.to_string(), |r| r.name().into()),
                        drop: reason.is_some_and(Reason::is_drop),
                        packets: v.packets,
                        bytes: v.bytes,
                    }
                })
                .collect();
            let status_generation = st.map(|e| e.generation);
            let kernel_generation = k.map(|e| e.generation);
            EndpointReport {
                pod: st.map(|e| e.pod()),
                interface: st.map(|e| e.interface.clone()).or_else(|| if_name(ifindex)),
                ifindex,
                ips: st.map(|e| e.ips.clone()).unwrap_or_default(),
                status_generation,
                kernel_generation,
                mismatch: status.is_some() && status_generation != kernel_generation,
                audit: k.is_some_and(|e| e.flags & netpol_common::ep::EP_FLAG_AUDIT != 0),
                policies: st.map(|e| e.policies.clone()).unwrap_or_default(),
                dropped: rows.iter().filter(|r| r.drop).map(|r| r.packets).sum(),
                counters: rows,
            }
        })
        .collect();
    Ok(InspectReport {
        node: status.as_ref().map(|s| s.node.clone()),
        pin_dir: pin_dir.to_owned(),
        status_warning,
        status_written_at: status.as_ref().map(|s| s.written_at),
        endpoints,
        pending: status.as_ref().map(|s| s.pending.clone()).unwrap_or_default(),
        maps: pinned.fill()?,
        no_endpoint_packets: counters.stats.no_endpoint,
        events_lost: counters.stats.events_lost,
    })
}

fn if_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// Renders `inspect` for an operator.
pub fn render_inspect(r: &InspectReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "node: {}   maps: {}",
        r.node.as_deref().unwrap_or("(unknown)"),
        r.pin_dir.display()
    );
    if let Some(w) = &r.status_warning {
        let _ = writeln!(s, "warning: {w}");
    }
    let _ = writeln!(s, "\nendpoints ({}):", r.endpoints.len());
    for e in &r.endpoints {
        let gen = |g: Option<u32>| g.map_or_else(|| "-".to_string(), |g| g.to_string());
        let _ = writeln!(
            s,
            "  {:<30} {:<16} ifindex {:<5} generation {} (kernel {}){}{}",
            e.pod.as_deref().unwrap_or("(not in status file)"),
            e.interface.as_deref().unwrap_or("?"),
            e.ifindex,
            gen(e.status_generation),
            gen(e.kernel_generation),
            if e.audit { " audit" } else { "" },
            if e.mismatch { "  MISMATCH" } else { "" },
        );
        if !e.ips.is_empty() {
            let ips: Vec<String> = e.ips.iter().map(ToString::to_string).collect();
            let _ = writeln!(s, "      ips: {}", ips.join(", "));
        }
        if e.policies.is_empty() {
            let _ = writeln!(s, "      policies: none (not isolated)");
        }
        for p in &e.policies {
            let _ = writeln!(s, "      policy {} ({})", p.policy, p.directions.join(", "));
        }
        for c in &e.counters {
            let _ = writeln!(
                s,
                "      {:<7} {:<15} {:>10} packets {:>12} bytes{}",
                c.direction,
                c.reason,
                c.packets,
                c.bytes,
                if c.drop { "  (dropped)" } else { "" }
            );
        }
    }
    if !r.pending.is_empty() {
        let _ = writeln!(s, "\npending (no interface yet): {}", r.pending.join(", "));
    }
    let _ = writeln!(s, "\nmaps:");
    for m in &r.maps {
        match m.entries {
            Some(n) => {
                let pct =
                    if m.max_entries > 0 { n as f64 * 100.0 / m.max_entries as f64 } else { 0.0 };
                let _ = writeln!(s, "  {:<12} {:>9} / {:<9} ({pct:.1}%)", m.name, n, m.max_entries);
            }
            None => {
                let _ = writeln!(s, "  {:<12} {:>9}   {:<9}", m.name, "-", m.max_entries);
            }
        }
    }
    let _ = writeln!(
        s,
        "\npackets without endpoint: {}   deny events lost: {}",
        r.no_endpoint_packets, r.events_lost
    );
    s
}

/// One conntrack entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowReport {
    /// `NAMESPACE/POD` of the endpoint, if known.
    pub pod: Option<String>,
    /// Host-side interface index.
    pub ifindex: u32,
    /// Protocol name.
    pub protocol: String,
    /// The pod's address of the peer's family, from the status file (conntrack keys do not
    /// hold it: the interface identifies the pod, and policy never depends on which of its
    /// addresses a packet uses).
    pub local_addr: Option<IpAddr>,
    /// The pod's port.
    pub local_port: u16,
    /// The peer's address.
    pub remote_addr: IpAddr,
    /// The peer's port.
    pub remote_port: u16,
    /// `outbound` (the pod opened it) or `inbound`.
    pub origin: &'static str,
    /// State name.
    pub state: &'static str,
    /// `allow`, `audit` or `deny`.
    pub verdict: &'static str,
    /// Seconds since the last packet.
    pub age_secs: u64,
    /// Generation the flow was decided under.
    pub generation: u32,
    /// The deciding rule, if known.
    pub rule: Option<String>,
}

/// An address from a map key (IPv4-mapped shown as IPv4).
pub fn key_addr(a: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(a).to_canonical()
}

/// Protocol name.
pub fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

fn flow(k: &CtKey, v: &CtValue, status: Option<&Status>, now_ns: u64) -> FlowReport {
    let endpoint = status.and_then(|s| s.endpoint_by_ifindex(k.ifindex));
    let remote = key_addr(k.remote_addr);
    FlowReport {
        pod: endpoint.map(|e| e.pod()),
        ifindex: k.ifindex,
        protocol: proto_name(k.proto),
        local_addr: endpoint
            .and_then(|e| e.ips.iter().find(|ip| ip.is_ipv4() == remote.is_ipv4()).copied()),
        local_port: k.local_port,
        remote_addr: remote,
        remote_port: k.remote_port,
        origin: if v.origin == DIR_EGRESS { "outbound" } else { "inbound" },
        state: match v.state {
            ct::CT_TCP_SYN_SENT => "syn_sent",
            ct::CT_TCP_ESTABLISHED => "established",
            ct::CT_TCP_CLOSING => "closing",
            ct::CT_TCP_CLOSED => "closed",
            ct::CT_ACTIVE => "active",
            _ => "unknown",
        },
        verdict: match v.verdict {
            ct::CT_VERDICT_ALLOW => "allow",
            ct::CT_VERDICT_AUDIT => "audit",
            ct::CT_VERDICT_DENY => "deny",
            _ => "unknown",
        },
        age_secs: now_ns.saturating_sub(v.last_seen_ns) / 1_000_000_000,
        generation: v.generation,
        rule: status.and_then(|s| s.rules.get(&v.rule_id)).map(|r| r.describe()),
    }
}

/// Every conntrack entry, with pod names and rules from the status file when it exists.
pub fn conntrack(pin_dir: &Path, status_file: &Path) -> Result<Vec<FlowReport>, InspectError> {
    let pinned = PinnedMaps::open(pin_dir)?;
    let (status, _) = load_status(status_file)?;
    let now = crate::dataplane::conntrack::monotonic_ns();
    let mut flows: Vec<FlowReport> =
        pinned.conntrack()?.iter().map(|(k, v)| flow(k, v, status.as_ref(), now)).collect();
    flows.sort_by(|a, b| {
        (a.ifindex, a.local_addr, a.local_port, a.remote_addr, a.remote_port).cmp(&(
            b.ifindex,
            b.local_addr,
            b.local_port,
            b.remote_addr,
            b.remote_port,
        ))
    });
    Ok(flows)
}

/// Renders the conntrack table.
pub fn render_conntrack(flows: &[FlowReport]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<24} {:<6} {:<22} {:<22} {:<8} {:<11} {:<7} {:>6}  rule",
        "pod", "proto", "local", "remote", "origin", "state", "verdict", "age"
    );
    for f in flows {
        let ep = |a: Option<IpAddr>, p: u16| match a {
            Some(a @ IpAddr::V6(_)) => format!("[{a}]:{p}"),
            Some(a @ IpAddr::V4(_)) => format!("{a}:{p}"),
            None => format!("*:{p}"),
        };
        let _ = writeln!(
            s,
            "{:<24} {:<6} {:<22} {:<22} {:<8} {:<11} {:<7} {:>5}s  {}",
            f.pod.clone().unwrap_or_else(|| format!("ifindex {}", f.ifindex)),
            f.protocol,
            ep(f.local_addr, f.local_port),
            ep(Some(f.remote_addr), f.remote_port),
            f.origin,
            f.state,
            f.verdict,
            f.age_secs,
            f.rule.as_deref().unwrap_or("-"),
        );
    }
    let _ = writeln!(s, "{} flows", flows.len());
    s
}

/// Runs `netpol-agent inspect`.
pub fn run_inspect(args: InspectArgs) -> anyhow::Result<()> {
    crate::uninstall::require_root()?;
    let r = inspect(&args.pin_dir, &args.status_file)?;
    match args.output {
        OutputFormat::Text => print!("{}", render_inspect(&r)),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&r)?),
    }
    Ok(())
}

/// Runs `netpol-agent conntrack`.
pub fn run_conntrack(args: ConntrackArgs) -> anyhow::Result<()> {
    crate::uninstall::require_root()?;
    let flows = conntrack(&args.pin_dir, &args.status_file)?;
    match args.output {
        OutputFormat::Text => print!("{}", render_conntrack(&flows)),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&flows)?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> InspectReport {
        InspectReport {
            node: Some("n1".into()),
            pin_dir: PathBuf::from("/sys/fs/bpf/netpol/v1"),
            status_warning: None,
            status_written_at: Some(1),
            endpoints: vec![EndpointReport {
                pod: Some("prod/db".into()),
                interface: Some("veth7".into()),
                ifindex: 7,
                ips: vec!["10.0.0.2".parse().unwrap()],
                status_generation: Some(3),
                kernel_generation: Some(4),
                mismatch: true,
                audit: false,
                policies: vec![AppliedPolicy {
                    policy: "prod/db-in".into(),
                    directions: vec!["ingress".into()],
                }],
                counters: vec![CounterRow {
                    direction: "ingress",
                    reason: "policy_deny".into(),
                    drop: true,
                    packets: 5,
                    bytes: 300,
                }],
                dropped: 5,
            }],
            pending: vec!["prod/late".into()],
            maps: vec![
                MapFill { name: "np_ep", entries: Some(1), max_entries: 16384 },
                MapFill { name: "np_cfg", entries: None, max_entries: 1 },
            ],
            no_endpoint_packets: 0,
            events_lost: 0,
        }
    }

    #[test]
    fn inspect_text_names_everything_an_operator_needs() {
        let t = render_inspect(&report());
        for want in [
            "node: n1",
            "prod/db",
            "veth7",
            "ifindex 7",
            "generation 3 (kernel 4)",
            "MISMATCH",
            "ips: 10.0.0.2",
            "policy prod/db-in (ingress)",
            "policy_deny",
            "(dropped)",
            "pending (no interface yet): prod/late",
            "np_ep",
            "1 / 16384",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
        let json = serde_json::to_value(report()).unwrap();
        assert_eq!(json["endpoints"][0]["kernel_generation"], 4);
        assert_eq!(json["maps"][1]["entries"], serde_json::Value::Null);
    }

    #[test]
    fn conntrack_rows_use_status_names() {
        let status = crate::status::tests::sample();
        let k = CtKey {
            ifindex: 7,
            local_port: 80,
            remote_port: 40000,
            remote_addr: netpol_common::v4_mapped([10, 0, 0, 1]),
            proto: 6,
            _pad: [0; 3],
        };
        let v = CtValue {
            last_seen_ns: 1_000_000_000,
            generation: 3,
            rule_id: 0xdead_beef,
            origin: netpol_common::DIR_INGRESS,
            state: ct::CT_TCP_ESTABLISHED,
            verdict: ct::CT_VERDICT_ALLOW,
            slot: 1,
            ..Default::default()
        };
        let f = flow(&k, &v, Some(&status), 6_000_000_000);
        assert_eq!(f.pod.as_deref(), Some("prod/db"));
        assert_eq!(f.age_secs, 5);
        assert_eq!(f.origin, "inbound");
        assert_eq!(f.rule.as_deref(), Some("prod/db-in ingress rule 0"));
        let t = render_conntrack(&[f]);
        assert!(t.contains("10.0.0.2:80") && t.contains("10.0.0.1:40000"), "{t}");
        assert!(t.contains("established") && t.contains("allow") && t.contains("1 flows"), "{t}");
    }
}
