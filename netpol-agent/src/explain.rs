//! `netpol-agent explain`: the verdict for one connection and the rules that decide it.
//!
//! The verdict comes from the compiled maps queried the kernel's way ([`crate::layout::evaluate`]),
//! never from a separate evaluator, so `explain` cannot drift from the datapath. Both ends are
//! checked: the source pod's egress (compiled for its node) and the destination pod's ingress
//! (compiled for its node).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::compile::{compile, CompileOptions, RuleOrigin};
use crate::layout::{evaluate, KernelMaps, Layout, LayoutError};
use crate::model::{ClusterState, Direction, Pod, PodRef, Protocol, Tier};

/// Errors of `explain` (bad arguments, unknown objects).
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// `--from`/`--to` is neither `NAMESPACE/POD` nor an IP address.
    #[error("{flag}: {value:?} is neither NAMESPACE/POD nor an IP address")]
    BadEndpoint {
        /// The flag.
        flag: &'static str,
        /// Its value.
        value: String,
    },
    /// No pod of that name in the manifests.
    #[error("{flag}: pod {pod} not found in the manifests")]
    UnknownPod {
        /// The flag.
        flag: &'static str,
        /// The pod.
        pod: PodRef,
    },
    /// The pod has no address.
    #[error("{flag}: pod {pod} has no IP address (status.podIP)")]
    NoAddress {
        /// The flag.
        flag: &'static str,
        /// The pod.
        pod: PodRef,
    },
    /// The two ends share no address family.
    #[error("--from and --to have no address family in common")]
    NoCommonFamily,
    /// The pod is not scheduled and no `--node` was given.
    #[error("pod {pod} has no spec.nodeName; pass --node")]
    Unscheduled {
        /// The pod.
        pod: PodRef,
    },
    /// `--port`/`--proto` do not parse.
    #[error("invalid {flag} {value:?}: expected PORT[/TCP|UDP|SCTP] (1-65535) or icmp")]
    BadPort {
        /// The flag.
        flag: &'static str,
        /// Its value.
        value: String,
    },
    /// Neither `--port` nor `--proto icmp`.
    #[error("--port is required (or --proto icmp)")]
    MissingPort,
    /// `--live`: the pod is not an endpoint enforced on this node.
    #[error("{flag}: pod {pod} is not enforced on this node (not in the agent's status file)")]
    NotOnNode {
        /// The flag.
        flag: &'static str,
        /// The pod.
        pod: PodRef,
    },
    /// Neither `--manifests` nor `--live`.
    #[error("pass --manifests DIR (what the policies say) or --live (what this node enforces)")]
    NoSource,
    /// `--live`: reading the pinned maps failed.
    #[error(transparent)]
    Pinned(#[from] crate::dataplane::pinned::PinnedError),
    /// `--live`: reading the status file failed.
    #[error(transparent)]
    Status(#[from] crate::status::StatusError),
    /// Id allocation failed.
    #[error("laying out the maps failed")]
    Layout {
        /// The cause.
        #[source]
        source: LayoutError,
    },
}

/// Output format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object.
    Json,
}

/// Arguments of `netpol-agent explain`.
#[derive(clap::Args, Debug)]
pub struct ExplainArgs {
    /// Directory of manifests (*.yaml, *.yml, *.json: Namespaces, Pods, NetworkPolicies).
    #[arg(long, required_unless_present = "live", conflicts_with = "live")]
    pub manifests: Option<PathBuf>,
    /// Decide against this node's live pinned maps instead of manifests (needs root); pods are
    /// found in the agent's status file.
    #[arg(long)]
    pub live: bool,
    /// `--live`: where the maps are pinned.
    #[arg(long, default_value = netpol_common::maps::PIN_DIR)]
    pub pin_dir: PathBuf,
    /// `--live`: the agent's status file.
    #[arg(long, default_value = crate::status::DEFAULT_PATH)]
    pub status_file: PathBuf,
    /// Source: NAMESPACE/POD or an IP address.
    #[arg(long)]
    pub from: String,
    /// Destination: NAMESPACE/POD or an IP address.
    #[arg(long)]
    pub to: String,
    /// Destination port: PORT[/PROTO] (protocol TCP by default), e.g. 80, 80/TCP, 53/udp; or icmp.
    #[arg(long)]
    pub port: Option<String>,
    /// Protocol (tcp, udp, sctp, icmp); overrides the one in --port.
    #[arg(long)]
    pub proto: Option<String>,
    /// Compile for this node instead of each pod's own node.
    #[arg(long)]
    pub node: Option<String>,
    /// The node's own addresses (allowed to reach its pods unless --no-host-to-pods).
    #[arg(long = "node-addr")]
    pub node_addrs: Vec<IpAddr>,
    /// Do not allow the node's addresses to reach isolated pods.
    #[arg(long)]
    pub no_host_to_pods: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// One end of the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A pod from the manifests.
    Pod(PodRef),
    /// An address.
    Ip(IpAddr),
}

/// What to explain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// Source.
    pub from: Peer,
    /// Destination.
    pub to: Peer,
    /// IP protocol number.
    pub proto: u8,
    /// Destination port (0 for ICMP).
    pub port: u16,
    /// Node override.
    pub node: Option<String>,
    /// Node addresses.
    pub node_addrs: Vec<IpAddr>,
    /// Allow node addresses to local pods.
    pub allow_host_to_pods: bool,
}

/// The decision of one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectionReport {
    /// Egress of the source pod or ingress of the destination pod.
    pub direction: Direction,
    /// The pod whose policy this is.
    pub pod: PodRef,
    /// The node it was compiled for.
    pub node: String,
    /// The remote address looked up.
    pub remote: IpAddr,
    /// Whether any policy isolates the pod in this direction.
    pub policed: bool,
    /// Whether the connection is allowed in this direction.
    pub allow: bool,
    /// The deciding rule, if any.
    pub rule: Option<RuleOrigin>,
    /// Policies that isolate the pod in this direction (context for a deny).
    pub policies: Vec<PodRef>,
    /// Why, in words.
    pub reason: String,
}

/// The full answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Allowed in every checked direction.
    pub allow: bool,
    /// Source address used.
    pub from_ip: IpAddr,
    /// Destination address used.
    pub to_ip: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Destination port.
    pub port: u16,
    /// Per-direction decisions (source egress first).
    pub directions: Vec<DirectionReport>,
}

/// Parses `--port` / `--proto` into (protocol number, port).
pub fn parse_port(port: Option<&str>, proto: Option<&str>) -> Result<(u8, u16), ExplainError> {
    let bad = |flag, value: &str| ExplainError::BadPort { flag, value: value.to_string() };
    let proto_num = |flag, p: &str| -> Result<u8, ExplainError> {
        if p.eq_ignore_ascii_case("icmp") {
            return Ok(1);
        }
        Protocol::parse(p).map(Protocol::number).map_err(|_| bad(flag, p))
    };
    let (mut num, mut port_num) = (None, None);
    if let Some(p) = port {
        if p.eq_ignore_ascii_case("icmp") {
            num = Some(1);
        } else {
            let (n, pr) = match p.split_once('/') {
                Some((n, pr)) => (n, Some(pr)),
                None => (p, None),
            };
            let n: u16 = n.parse().ok().filter(|n| *n != 0).ok_or_else(|| bad("--port", p))?;
            port_num = Some(n);
            num = Some(match pr {
                Some(pr) => proto_num("--port", pr)?,
                None => 6,
            });
        }
    }
    if let Some(pr) = proto {
        num = Some(proto_num("--proto", pr)?);
    }
    match (num, port_num) {
        (Some(1), _) => Ok((1, 0)),
        (Some(n), Some(p)) => Ok((n, p)),
        _ => Err(ExplainError::MissingPort),
    }
}

fn parse_peer(flag: &'static str, value: &str) -> Result<Peer, ExplainError> {
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Ok(Peer::Ip(ip.to_canonical()));
    }
    match value.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(Peer::Pod(PodRef::new(ns, name)))
        }
        _ => Err(ExplainError::BadEndpoint { flag, value: value.to_string() }),
    }
}

fn find_pod<'a>(
    state: &'a ClusterState,
    flag: &'static str,
    p: &PodRef,
) -> Result<&'a Pod, ExplainError> {
    let pod = state.pods.get(p).ok_or_else(|| ExplainError::UnknownPod { flag, pod: p.clone() })?;
    if pod.ips.is_empty() {
        return Err(ExplainError::NoAddress { flag, pod: p.clone() });
    }
    Ok(pod)
}

/// Picks the addresses of both ends: the first family both have (IPv4 first).
fn addresses(from: &[IpAddr], to: &[IpAddr]) -> Result<(IpAddr, IpAddr), ExplainError> {
    for v4 in [true, false] {
        let f = from.iter().find(|a| a.is_ipv4() == v4);
        let t = to.iter().find(|a| a.is_ipv4() == v4);
        if let (Some(f), Some(t)) = (f, t) {
            return Ok((*f, *t));
        }
    }
    Err(ExplainError::NoCommonFamily)
}

/// Explains `q` over `state`.
pub fn explain(state: &ClusterState, q: &Query) -> Result<Report, ExplainError> {
    let from_pod = match &q.from {
        Peer::Pod(p) => Some(find_pod(state, "--from", p)?),
        Peer::Ip(_) => None,
    };
    let to_pod = match &q.to {
        Peer::Pod(p) => Some(find_pod(state, "--to", p)?),
        Peer::Ip(_) => None,
    };
    let ips = |peer: &Peer, pod: Option<&Pod>| match (peer, pod) {
        (Peer::Ip(ip), _) => vec![*ip],
        (_, Some(p)) => p.ips.clone(),
        _ => Vec::new(),
    };
    let (from_ip, to_ip) = addresses(&ips(&q.from, from_pod), &ips(&q.to, to_pod))?;
    let mut compiled: BTreeMap<String, KernelMaps> = BTreeMap::new();
    let mut directions = Vec::new();
    for (dir, pod, remote) in
        [(Direction::Egress, from_pod, to_ip), (Direction::Ingress, to_pod, from_ip)]
    {
        let Some(pod) = pod else { continue };
        directions.push(check(state, q, &mut compiled, pod, dir, remote)?);
    }
    Ok(Report {
        allow: directions.iter().all(|d| d.allow),
        from_ip,
        to_ip,
        proto: q.proto,
        port: q.port,
        directions,
    })
}

fn check(
    state: &ClusterState,
    q: &Query,
    compiled: &mut BTreeMap<String, KernelMaps>,
    pod: &Pod,
    dir: Direction,
    remote: IpAddr,
) -> Result<DirectionReport, ExplainError> {
    let node = match (&q.node, &pod.node_name) {
        (Some(n), _) | (None, Some(n)) => n.clone(),
        (None, None) => return Err(ExplainError::Unscheduled { pod: pod.key() }),
    };
    let ns_labels = state.namespace_labels(&pod.namespace);
    let cluster = state
        .cluster_policies
        .values()
        .filter(|p| !p.rules(dir).is_empty() && p.subject.matches(&ns_labels, &pod.labels));
    let policies: Vec<PodRef> = state
        .policies
        .values()
        .filter(|p| {
            p.namespace == pod.namespace && p.pod_selector.matches(&pod.labels) && p.affects(dir)
        })
        .map(|p| p.key())
        .chain(cluster.map(|p| p.key()))
        .collect();
    let mut report = DirectionReport {
        direction: dir,
        pod: pod.key(),
        node: node.clone(),
        remote,
        policed: false,
        allow: true,
        rule: None,
        policies,
        reason: String::new(),
    };
    if pod.host_network {
        report.reason = "host-network pods are not subject to NetworkPolicy".into();
        return Ok(report);
    }
    if !compiled.contains_key(&node) {
        let options = CompileOptions {
            node_name: node.clone(),
            node_addrs: q.node_addrs.clone(),
            allow_host_to_pods: q.allow_host_to_pods,
        };
        let maps = Layout::new()
            .update(&compile(state, &options))
            .map_err(|source| ExplainError::Layout { source })?;
        compiled.insert(node.clone(), maps);
    }
    let Some(maps) = compiled.get(&node) else {
        return Ok(report);
    };
    let Some(ep) = maps.endpoints.get(&pod.key()) else {
        report.reason = format!("pod has no endpoint on node {node} (not scheduled there)");
        return Ok(report);
    };
    let d = evaluate(maps, &ep.value, dir, remote, q.proto, q.port);
    report.policed = d.policed;
    report.allow = d.allow;
    report.rule = maps
        .rules
        .get(&d.rule_id)
        .cloned()
        .filter(|_| d.rule_id != netpol_common::policy::RULE_NONE);
    report.reason = reason_text(report.rule.as_ref(), d.policed, d.allow, dir);
    Ok(report)
}

fn reason_text(rule: Option<&RuleOrigin>, policed: bool, allow: bool, dir: Direction) -> String {
    let verdict = if allow { "allowed" } else { "denied" };
    match (rule, policed, allow) {
        (_, false, _) => format!("no policy of any tier selects the pod for {dir}: allowed"),
        (Some(RuleOrigin::NodeToPod), _, _) => {
            "traffic from the node's own address to its pods is allowed".into()
        }
        (Some(RuleOrigin::Policy { tier: Tier::NetworkPolicy, policy, direction, index }), ..) => {
            format!("{verdict} by NetworkPolicy {policy} {direction} rule {index}")
        }
        // Cluster policy references print as `Kind/name`.
        (Some(RuleOrigin::Policy { tier, policy, direction, index }), ..) => {
            format!("{verdict} by {tier:?} tier {policy} {direction} rule {index}")
        }
        (Some(RuleOrigin::Service { service, protocol, port }), _, true) => format!(
            "Service {service} port {port}/{protocol}: the pod's egress allows every backend: allowed"
        ),
        (Some(RuleOrigin::Service { service, protocol, port }), _, false) => format!(
            "Service {service} port {port}/{protocol}: the pod's egress denies a backend: denied"
        ),
        (None, true, true) => {
            format!("no rule of the Admin or Baseline tier matches for {dir}: allowed")
        }
        (None, true, false) => format!("isolated for {dir} and no rule allows it: denied"),
    }
}

/// Explains `q` against this node's live maps: each end that is an endpoint of this node (found
/// in `status`) is decided with its `np_ep` entry and the kernel's lookups in the pinned policy
/// maps (`np_peer_exact`, `np_peer`, `np_port_exact`, `np_ports`); rule ids are attributed
/// through the status file's rule origins.
pub fn explain_live(
    pinned: &crate::dataplane::pinned::PinnedMaps,
    status: &crate::status::Status,
    q: &Query,
) -> Result<Report, ExplainError> {
    use crate::status::EndpointStatus;
    let resolve = |flag: &'static str,
                   peer: &Peer|
     -> Result<(Vec<IpAddr>, Option<&EndpointStatus>), ExplainError> {
        match peer {
            Peer::Pod(p) => {
                let ep = status
                    .endpoint(&p.namespace, &p.name)
                    .ok_or_else(|| ExplainError::NotOnNode { flag, pod: p.clone() })?;
                if ep.ips.is_empty() {
                    return Err(ExplainError::NoAddress { flag, pod: p.clone() });
                }
                Ok((ep.ips.clone(), Some(ep)))
            }
            Peer::Ip(ip) => Ok((vec![*ip], status.endpoint_by_ip(*ip))),
        }
    };
    let (from_ips, from_ep) = resolve("--from", &q.from)?;
    let (to_ips, to_ep) = resolve("--to", &q.to)?;
    let (from_ip, to_ip) = addresses(&from_ips, &to_ips)?;
    let mut directions = Vec::new();
    for (dir, ep, remote) in
        [(Direction::Egress, from_ep, to_ip), (Direction::Ingress, to_ep, from_ip)]
    {
        let Some(ep) = ep else { continue };
        let policies: Vec<PodRef> = ep
            .policies
            .iter()
            .filter(|p| p.directions.iter().any(|d| d == dir.name()))
            .filter_map(|p| p.policy.split_once('/').map(|(ns, n)| PodRef::new(ns, n)))
            .collect();
        let mut report = DirectionReport {
            direction: dir,
            pod: PodRef::new(&ep.namespace, &ep.name),
            node: status.node.clone(),
            remote,
            policed: false,
            allow: true,
            rule: None,
            policies,
            reason: String::new(),
        };
        let Some(value) = pinned.endpoint(ep.ifindex)? else {
            report.reason = format!(
                "no np_ep entry for ifindex {} ({}): its traffic passes unchecked",
                ep.ifindex, ep.interface
            );
            directions.push(report);
            continue;
        };
        let addr = match remote {
            IpAddr::V4(v4) => netpol_common::v4_mapped(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        };
        let d = pinned.evaluate(&value, dir.as_u8(), addr, q.proto, q.port)?;
        report.policed = d.policed;
        report.allow = d.allow;
        report.rule = status
            .rules
            .get(&d.rule_id)
            .and_then(|r| r.origin())
            .filter(|_| d.rule_id != netpol_common::policy::RULE_NONE);
        report.reason = reason_text(report.rule.as_ref(), d.policed, d.allow, dir);
        directions.push(report);
    }
    Ok(Report {
        allow: directions.iter().all(|d| d.allow),
        from_ip,
        to_ip,
        proto: q.proto,
        port: q.port,
        directions,
    })
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        n => n.to_string(),
    }
}

/// Renders `r` as text.
pub fn render_text(r: &Report) -> String {
    let mut s = String::new();
    let verdict = if r.allow { "allow" } else { "deny" };
    let port = if r.proto == 1 { String::new() } else { format!(" port {}", r.port) };
    let _ = writeln!(
        s,
        "verdict: {verdict} ({} -> {} {}{port})",
        r.from_ip,
        r.to_ip,
        proto_name(r.proto)
    );
    for d in &r.directions {
        let _ =
            writeln!(s, "  {:<7} {} (node {}): {}", d.direction.name(), d.pod, d.node, d.reason);
        if d.policed && !d.allow {
            let names: Vec<String> = d.policies.iter().map(ToString::to_string).collect();
            let _ = writeln!(s, "          isolated by: {}", names.join(", "));
        }
    }
    s
}

/// Renders `r` as JSON.
pub fn render_json(r: &Report) -> serde_json::Value {
    let dirs: Vec<serde_json::Value> = r
        .directions
        .iter()
        .map(|d| {
            let (rule, tier) = match &d.rule {
                Some(RuleOrigin::Policy { tier, policy, direction, index }) => (
                    serde_json::json!({"policy": policy.to_string(), "direction": direction.name(), "index": index}),
                    serde_json::json!(format!("{tier:?}")),
                ),
                Some(RuleOrigin::Service { service, protocol, port }) => (
                    serde_json::json!({"service": service.to_string(), "protocol": protocol.to_string(), "port": port}),
                    serde_json::json!("Admin"),
                ),
                _ => (serde_json::Value::Null, if d.policed { serde_json::json!("NetworkPolicy") } else { serde_json::Value::Null }),
            };
            serde_json::json!({
                "direction": d.direction.name(),
                "pod": d.pod.to_string(),
                "node": d.node,
                "remote": d.remote.to_string(),
                "policed": d.policed,
                "allow": d.allow,
                "rule": rule,
                "node_to_pod": matches!(d.rule, Some(RuleOrigin::NodeToPod)),
                "tier": tier,
                "policies": d.policies.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "reason": d.reason,
            })
        })
        .collect();
    serde_json::json!({
        "verdict": if r.allow { "allow" } else { "deny" },
        "from": r.from_ip.to_string(),
        "to": r.to_ip.to_string(),
        "protocol": proto_name(r.proto),
        "port": r.port,
        "directions": dirs,
    })
}

/// Runs `netpol-agent explain`. Exit status 0 for both allow and deny (the verdict is in the
/// output); an error for unknown pods and bad arguments. Manifest errors are warnings.
pub fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let (proto, port) = parse_port(args.port.as_deref(), args.proto.as_deref())?;
    let query = Query {
        from: parse_peer("--from", &args.from)?,
        to: parse_peer("--to", &args.to)?,
        proto,
        port,
        node: args.node,
        node_addrs: args.node_addrs,
        allow_host_to_pods: !args.no_host_to_pods,
    };
    let report = if args.live {
        crate::uninstall::require_root()?;
        let pinned = crate::dataplane::pinned::PinnedMaps::open(&args.pin_dir)?;
        let status = crate::status::Status::read(&args.status_file)?;
        explain_live(&pinned, &status, &query)?
    } else {
        let manifests = args.manifests.ok_or(ExplainError::NoSource)?;
        if !manifests.is_dir() {
            anyhow::bail!("--manifests {}: not a directory", manifests.display());
        }
        let (state, errors) = crate::manifest::load_dir(&manifests);
        for e in &errors {
            eprintln!("warning: {e}");
        }
        explain(&state, &query)?
    };
    match args.output {
        OutputFormat::Text => print!("{}", render_text(&report)),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&render_json(&report))?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::build::{named, namespace, pod, pods, policy, rule, sel, state};

    fn cluster() -> ClusterState {
        state(
            vec![namespace("prod", &[])],
            vec![
                pod("web", "prod").label("app", "web").ip("10.0.0.1").node(Some("n1")),
                pod("db", "prod").label("app", "db").ip("10.0.0.2").node(Some("n2")).port(
                    Some("pg"),
                    5432,
                    Protocol::Tcp,
                ),
                pod("host", "prod")
                    .label("app", "web")
                    .ip("192.168.0.5")
                    .host_network()
                    .node(Some("n1")),
                pod("pending", "prod").node(None),
            ],
            vec![
                policy("db-in", "prod").select(sel(&[("app", "db")])).ingress(
                    rule()
                        .peer(pods(None, Some(sel(&[("app", "web")]))))
                        .port(named(Protocol::Tcp, "pg")),
                ),
                policy("web-out", "prod")
                    .select(sel(&[("app", "web")]))
                    .egress(rule().peer(pods(None, Some(sel(&[("app", "db")])))))
                    .types(&[crate::model::PolicyType::Egress]),
            ],
        )
    }

    fn query(from: &str, to: &str, port: &str) -> Query {
        let (proto, port) = parse_port(Some(port), None).unwrap();
        Query {
            from: parse_peer("--from", from).unwrap(),
            to: parse_peer("--to", to).unwrap(),
            proto,
            port,
            node: None,
            node_addrs: vec![],
            allow_host_to_pods: true,
        }
    }

    #[test]
    fn verdicts_and_attribution() {
        let s = cluster();
        let r = explain(&s, &query("prod/web", "prod/db", "5432/TCP")).unwrap();
        assert!(r.allow);
        assert_eq!(r.directions.len(), 2);
        assert_eq!(r.directions[0].node, "n1");
        assert_eq!(r.directions[1].node, "n2");
        assert!(
            matches!(&r.directions[1].rule, Some(RuleOrigin::Policy { policy, index: 0, .. }) if policy.name == "db-in")
        );
        let j = render_json(&r);
        assert_eq!(j["verdict"], "allow");
        assert_eq!(j["directions"][1]["rule"]["policy"], "prod/db-in");
        assert_eq!(j["directions"][1]["tier"], "NetworkPolicy");

        let r = explain(&s, &query("prod/web", "prod/db", "80")).unwrap();
        assert!(!r.allow);
        assert!(r.directions[0].allow && !r.directions[1].allow);
        assert_eq!(render_json(&r)["directions"][1]["rule"], serde_json::Value::Null);
        assert!(render_text(&r).contains("isolated by: prod/db-in"));

        let r = explain(&s, &query("prod/web", "8.8.8.8", "53/udp")).unwrap();
        assert!(
            !r.allow && r.directions.len() == 1 && r.directions[0].direction == Direction::Egress
        );

        let r = explain(&s, &query("10.9.9.9", "prod/web", "icmp")).unwrap();
        assert!(r.allow && !r.directions[0].policed);

        let r = explain(&s, &query("prod/host", "8.8.8.8", "80")).unwrap();
        assert!(r.allow && !r.directions[0].policed);
    }

    #[test]
    fn names_the_deciding_tier() {
        use crate::model::build::{cnp, crule};
        use crate::model::ClusterAction;
        let s = cluster()
            .with(
                cnp("no-dev", Tier::Admin, 5)
                    .egress(crule(ClusterAction::Deny).networks(&["8.8.0.0/16"])),
            )
            .with(
                cnp("default", Tier::Baseline, 1)
                    .ingress(crule(ClusterAction::Deny).networks(&["0.0.0.0/0"]))
                    .egress(crule(ClusterAction::Deny).networks(&["0.0.0.0/0"])),
            );
        let r = explain(&s, &query("prod/web", "8.8.8.8", "53/udp")).unwrap();
        assert!(!r.allow);
        assert_eq!(
            r.directions[0].reason,
            "denied by Admin tier ClusterNetworkPolicy/no-dev egress rule 0"
        );
        assert_eq!(render_json(&r)["directions"][0]["tier"], "Admin");
        assert_eq!(
            render_json(&r)["directions"][0]["rule"]["policy"],
            "ClusterNetworkPolicy/no-dev"
        );
        // web-out (NetworkPolicy) isolates web's egress: the Baseline tier is never reached.
        let r = explain(&s, &query("prod/web", "prod/db", "5432")).unwrap();
        assert!(
            r.directions[0].reason.contains("NetworkPolicy prod/web-out"),
            "{}",
            r.directions[0].reason
        );
        // db's egress is not isolated by a NetworkPolicy: the Baseline Deny decides.
        let r = explain(&s, &query("prod/db", "1.1.1.1", "443")).unwrap();
        assert_eq!(
            r.directions[0].reason,
            "denied by Baseline tier ClusterNetworkPolicy/default egress rule 0"
        );
        assert!(render_text(&r).contains("isolated by: ClusterNetworkPolicy/default"));
    }

    #[test]
    fn bad_input_is_an_error() {
        let s = cluster();
        assert!(matches!(
            explain(&s, &query("prod/nope", "prod/db", "80")),
            Err(ExplainError::UnknownPod { .. })
        ));
        assert!(matches!(
            explain(&s, &query("prod/pending", "prod/db", "80")),
            Err(ExplainError::NoAddress { .. })
        ));
        assert!(matches!(
            explain(&s, &query("prod/web", "fd00::1", "80")),
            Err(ExplainError::NoCommonFamily)
        ));
        assert!(parse_peer("--from", "justaname").is_err());
        for (port, proto) in [
            (Some("0"), None),
            (Some("70000"), None),
            (Some("80/ICMPX"), None),
            (None, None),
            (Some("x"), None),
            (None, Some("tcp")),
        ] {
            assert!(parse_port(port, proto).is_err(), "{port:?} {proto:?}");
        }
        assert_eq!(parse_port(Some("53/udp"), None).unwrap(), (17, 53));
        assert_eq!(parse_port(Some("80"), Some("sctp")).unwrap(), (132, 80));
        assert_eq!(parse_port(None, Some("icmp")).unwrap(), (1, 0));
    }
}
