//! Deterministic synthetic clusters for benchmarks and soak tests: namespaces with team labels,
//! pods with app/tier labels and named ports spread over nodes, and policies of the shapes seen
//! in practice (same-namespace app rules, namespace-selector rules, ipBlocks with excepts,
//! named ports and ranges).
use netpol_agent::model::{
    build::{block, named, namespace, pod, pods, policy, port, range, rule, sel, state},
    ClusterState, NetworkPolicy, PolicyType, Protocol,
};

/// Size of a synthetic cluster.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub namespaces: u32,
    pub pods: u32,
    pub policies: u32,
    pub nodes: u32,
}

/// A small linear congruential generator: reproducible without a dependency.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u32) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as u32
    }
}

/// Name of node `i`.
pub fn node(i: u32) -> String {
    format!("node-{i}")
}

/// Builds the cluster of `shape` from `seed`.
pub fn cluster(shape: Shape, seed: u64) -> ClusterState {
    let mut r = Lcg(seed);
    let nss: Vec<_> = (0..shape.namespaces)
        .map(|i| {
            let team = format!("team{}", i % 25);
            let env = if i % 3 == 0 { "prod" } else { "dev" };
            namespace(&format!("ns{i}"), &[("team", team.as_str()), ("env", env)])
        })
        .collect();
    let pods_: Vec<_> = (0..shape.pods)
        .map(|i| {
            let ns = format!("ns{}", i % shape.namespaces);
            let app = format!("app{}", r.next(12));
            let tier = ["web", "api", "db"][r.next(3) as usize];
            let ip = format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256);
            let n = node(r.next(shape.nodes));
            pod(&format!("pod{i}"), &ns)
                .label("app", &app)
                .label("tier", tier)
                .ip(&ip)
                .node(Some(n.as_str()))
                .port(Some("http"), 8080, Protocol::Tcp)
                .port(Some("metrics"), 9090, Protocol::Tcp)
        })
        .collect();
    let pols: Vec<_> = (0..shape.policies).map(|i| synth_policy(&mut r, i, shape)).collect();
    state(nss, pods_, pols)
}

fn synth_policy(r: &mut Lcg, i: u32, shape: Shape) -> netpol_agent::model::build::PolicyBuilder {
    let ns = format!("ns{}", i % shape.namespaces);
    let app = format!("app{}", r.next(12));
    let from_app = format!("app{}", r.next(12));
    let team = format!("team{}", r.next(25));
    let p = policy(&format!("pol{i}"), &ns).select(sel(&[("app", app.as_str())]));
    match i % 4 {
        // Same-namespace clients on a named port.
        0 => p.ingress(
            rule()
                .peer(pods(None, Some(sel(&[("app", from_app.as_str())]))))
                .port(named(Protocol::Tcp, "http")),
        ),
        // Another team's namespaces, numeric port.
        1 => p.ingress(
            rule()
                .peer(pods(Some(sel(&[("team", team.as_str())])), Some(sel(&[("tier", "web")]))))
                .port(port(Protocol::Tcp, 8080)),
        ),
        // Egress to an external block with a hole, and DNS.
        2 => p
            .types(&[PolicyType::Egress])
            .egress(rule().peer(block("192.168.0.0/16", &["192.168.1.0/24"])).port(range(
                Protocol::Tcp,
                443,
                450,
            )))
            .egress(
                rule()
                    .peer(pods(Some(sel(&[])), Some(sel(&[("app", "dns")]))))
                    .port(port(Protocol::Udp, 53)),
            ),
        // Default deny ingress with metrics scraping from prod namespaces.
        _ => p.ingress(
            rule()
                .peer(pods(Some(sel(&[("env", "prod")])), None))
                .port(named(Protocol::Tcp, "metrics")),
        ),
    }
}

/// A changed copy of policy `i` (a different port), for incremental benchmarks.
pub fn edited_policy(state: &ClusterState, i: u32) -> Option<NetworkPolicy> {
    let mut p = state.policies.values().find(|p| p.name == format!("pol{i}"))?.clone();
    if let Some(r) = p.ingress.first_mut() {
        r.ports = vec![port(Protocol::Tcp, 8443)];
    }
    Some(p)
}

/// The local pod of [`one_endpoint`]: `bench/server`, on node [`ONE_ENDPOINT_NODE`].
pub const SERVER_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 0, 9);
/// The node of [`one_endpoint`]'s server pod.
pub const ONE_ENDPOINT_NODE: &str = "bench-node";
/// The first port of [`one_endpoint`]'s rules: rule `i` allows TCP port `FIRST_RULE_PORT + i`.
pub const FIRST_RULE_PORT: u16 = 10_000;

/// Address of peer pod `j` of [`one_endpoint`] (10.64.0.0 upwards).
pub fn peer_ip(j: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(0x0a40_0000 + j)
}

/// One local pod selected by `rules` policies of one ingress rule each, and `peers` remote pods.
///
/// The peers fall into `g = min(rules, peers)` groups (peer `j` in group `j % g`); rule `i`
/// allows group `i % g` on TCP port [`FIRST_RULE_PORT`]` + i`. So every rule has peers, every
/// peer is allowed by `rules / g` rules, and peer 0 may reach port [`FIRST_RULE_PORT`].
pub fn one_endpoint(rules: u32, peers: u32) -> ClusterState {
    assert!(rules >= 1 && peers >= 1 && rules <= 50_000, "sizes out of range");
    let groups = rules.min(peers);
    let server = pod("server", "bench")
        .label("app", "server")
        .ip(&SERVER_IP.to_string())
        .node(Some(ONE_ENDPOINT_NODE));
    let mut pods_ = vec![server];
    pods_.extend((0..peers).map(|j| {
        pod(&format!("peer{j}"), "bench")
            .label("grp", &format!("g{}", j % groups))
            .ip(&peer_ip(j).to_string())
            .node(Some("elsewhere"))
    }));
    let pols = (0..rules)
        .map(|i| {
            policy(&format!("r{i}"), "bench").select(sel(&[("app", "server")])).ingress(
                rule()
                    .peer(pods(None, Some(sel(&[("grp", format!("g{}", i % groups).as_str())]))))
                    .port(port(Protocol::Tcp, FIRST_RULE_PORT + i as u16)),
            )
        })
        .collect();
    state(vec![namespace("bench", &[])], pods_, pols)
}
