//! Real packets between network namespaces, enforced by the real programs on the pods'
//! host-side interfaces: every protocol, replies, established flows cut by policy changes,
//! replies surviving conntrack loss, conntrack expiry, injected malformed packets and
//! fragments, IPv6.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use netpol_agent::dataplane::conntrack::{monotonic_ns, GcStats};
use netpol_common::{counters::Reason, ct::Timeouts, ep::Endpoint, DIR_EGRESS, DIR_INGRESS};
use netpol_it::{
    fixture::Fixture,
    lab::{ifindex, Lab, Pod, Topology},
    netns::in_netns,
    packet::{Frame, L4},
    probe::{inject, ping, sctp_init, tcp_echo, udp_echo, udp_echo_from, TcpServer, UdpServer},
};

const T: Duration = Duration::from_millis(600);

/// A probe that succeeds within a few attempts (for checking the topology before enforcement).
fn works(probe: impl Fn() -> anyhow::Result<bool>) -> bool {
    (0..5).any(|_| probe().unwrap())
}

/// Enforces an ingress (or egress) set on a pod's interface.
fn enforce(f: &mut Fixture, pod: &Pod, ep: Endpoint) -> u32 {
    let i = ifindex(&pod.host_if).unwrap();
    f.dp.set_endpoint(i, ep).unwrap();
    assert_eq!(f.dp.attach(&pod.host_if).unwrap(), i);
    i
}

fn cidr(pod: &Pod) -> String {
    pod.ip.to_string()
}

#[test]
fn tcp_udp_sctp_and_icmp_allowed_and_denied() {
    let mut lab = Lab::new().unwrap();
    let client = lab.add_pod("client").unwrap();
    let pinger = lab.add_pod("pinger").unwrap();
    let stranger = lab.add_pod("stranger").unwrap();
    let server = lab.add_pod("server").unwrap();
    let _tcp: Vec<_> =
        [80, 81].iter().map(|p| TcpServer::start(&server.netns, *p).unwrap()).collect();
    let _udp: Vec<_> =
        [53, 54].iter().map(|p| UdpServer::start(&server.netns, *p).unwrap()).collect();
    let at = |port| SocketAddr::from((server.ip, port));

    // The topology works for every protocol before any program is attached, so a "blocked"
    // below can only come from the programs. (A fresh topology may need a moment: retried.)
    for who in [&client, &stranger] {
        assert!(works(|| tcp_echo(&who.netns, at(81), T)), "tcp before, {}", who.name);
        assert!(works(|| udp_echo(&who.netns, at(54), T)), "udp before, {}", who.name);
        assert!(
            works(|| sctp_init(&who.netns, &server.netns, at(5001), T)),
            "sctp before, {}",
            who.name
        );
        assert!(works(|| ping(&who.netns, server.ip, T)), "ping before, {}", who.name);
    }

    let mut f = Fixture::new("protocols");
    f.peer(1, &cidr(&client), 10);
    f.ports(10, 6, 80, 80, 100);
    f.ports(10, 17, 53, 53, 100);
    f.ports(10, 132, 5000, 5000, 100);
    f.peer(1, &cidr(&pinger), 11);
    f.ports(11, 0, 0, 0, 101);
    let srv =
        enforce(&mut f, &server, Endpoint { generation: 1, ingress_np: 1, ..Default::default() });

    assert!(tcp_echo(&client.netns, at(80), T).unwrap(), "tcp 80 allowed");
    assert!(!tcp_echo(&client.netns, at(81), T).unwrap(), "tcp 81 denied");
    assert!(!tcp_echo(&stranger.netns, at(80), T).unwrap(), "stranger tcp denied");
    assert!(udp_echo(&client.netns, at(53), T).unwrap(), "udp 53 allowed, reply included");
    assert!(!udp_echo(&client.netns, at(54), T).unwrap(), "udp 54 denied");
    assert!(!udp_echo(&stranger.netns, at(53), T).unwrap(), "stranger udp denied");
    assert!(sctp_init(&client.netns, &server.netns, at(5000), T).unwrap(), "sctp 5000 allowed");
    assert!(!sctp_init(&client.netns, &server.netns, at(5001), T).unwrap(), "sctp 5001 denied");
    assert!(
        !sctp_init(&stranger.netns, &server.netns, at(5000), T).unwrap(),
        "stranger sctp denied"
    );
    assert!(ping(&pinger.netns, server.ip, T).unwrap(), "ping from an all-protocols peer");
    assert!(!ping(&client.netns, server.ip, T).unwrap(), "a ports-only rule does not allow ICMP");
    assert!(!ping(&stranger.netns, server.ip, T).unwrap(), "stranger ping denied");
    // Egress of the server is unpoliced: it may still reach the stranger.
    let _s = TcpServer::start(&stranger.netns, 8080).unwrap();
    assert!(tcp_echo(&server.netns, SocketAddr::from((stranger.ip, 8080)), T).unwrap());

    let c = f.dp.counters().unwrap();
    assert!(c.packets(srv, DIR_INGRESS, Reason::DenyPolicy) >= 8, "{c:?}");
    assert!(c.packets(srv, DIR_EGRESS, Reason::AllowConntrack) >= 3, "replies tracked: {c:?}");
    assert!(c.packets(srv, DIR_EGRESS, Reason::AllowUnpoliced) >= 1, "{c:?}");
}

/// An established connection: (client side, server side).
fn connect(client: &Pod, server: &Pod, port: u16) -> (TcpStream, TcpStream) {
    let listener =
        in_netns(&server.netns, || TcpListener::bind(("0.0.0.0", port))).unwrap().unwrap();
    let to = SocketAddr::from((server.ip, port));
    let c = in_netns(&client.netns, || TcpStream::connect_timeout(&to, T)).unwrap().unwrap();
    let (s, _) = listener.accept().unwrap();
    for x in [&c, &s] {
        x.set_read_timeout(Some(T)).unwrap();
    }
    (c, s)
}

fn delivered(from: &mut TcpStream, to: &mut TcpStream) -> bool {
    if from.write_all(b"ping").is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    to.read_exact(&mut buf).is_ok() && &buf == b"ping"
}

#[test]
fn policy_change_cuts_an_established_connection() {
    let mut lab = Lab::new().unwrap();
    let client = lab.add_pod("client").unwrap();
    let server = lab.add_pod("server").unwrap();
    let mut f = Fixture::new("cut");
    f.peer(1, &cidr(&client), 10);
    f.ports(10, 6, 7000, 7001, 100);
    let srv =
        enforce(&mut f, &server, Endpoint { generation: 1, ingress_np: 1, ..Default::default() });
    let (mut c, mut s) = connect(&client, &server, 7000);
    let (mut c2, mut s2) = connect(&client, &server, 7001);
    assert!(delivered(&mut c, &mut s) && delivered(&mut s, &mut c), "established, both ways");

    // Port 7000 is no longer allowed: the established flow dies at its next packet, the flow on
    // 7001 (still allowed) lives on.
    f.remove_ports(10, 6, 7000, 7001);
    f.ports(10, 6, 7001, 7001, 100);
    f.dp.set_endpoint(srv, Endpoint { generation: 2, ingress_np: 1, ..Default::default() })
        .unwrap();
    // Wait past a few retransmissions: they must stay dropped too.
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert!(!delivered(&mut c, &mut s), "data on the cut connection must not arrive");
    assert!(delivered(&mut c2, &mut s2), "the still-allowed connection keeps working");
    let n = f.dp.counters().unwrap().packets(srv, DIR_INGRESS, Reason::DenyPolicyChanged);
    assert!(n >= 1, "policy_changed counted: {n}");
    // Abort the cut connection: a graceful close would leave an orphaned socket retransmitting
    // its FIN into the tombstone for minutes, keeping the pod's namespace alive.
    for x in [&c, &s] {
        socket2::SockRef::from(x).set_linger(Some(Duration::ZERO)).unwrap();
    }
}

#[test]
fn replies_survive_conntrack_loss_and_new_connections_stay_denied() {
    let mut lab = Lab::new().unwrap();
    let client = lab.add_pod("client").unwrap();
    let server = lab.add_pod("server").unwrap();
    let mut f = Fixture::new("pickup");
    // The client may open TCP 7000 to the server; nothing may enter the client (set 2 is empty).
    f.peer(1, &cidr(&server), 10);
    f.ports(10, 6, 7000, 7000, 100);
    let cli = enforce(
        &mut f,
        &client,
        Endpoint { generation: 1, egress_np: 1, ingress_np: 2, ..Default::default() },
    );
    let (mut c, mut s) = connect(&client, &server, 7000);
    assert!(delivered(&mut s, &mut c), "server to client on the established connection");

    // Tracking lost (agent restart with fresh maps, LRU eviction): the server speaks first.
    let cleared = f.dp.clear_conntrack().unwrap();
    assert!(cleared >= 1, "there was an entry to lose");
    // The fast path's per-CPU flow cache keeps deciding a flow from its last conntrack lookup
    // for the rest of that timer tick (docs/ARCHITECTURE.md, "Per-packet decision"): wait for
    // the tick to end (two ticks even at HZ=100), so the next packets meet the loss.
    std::thread::sleep(Duration::from_millis(25));
    assert!(delivered(&mut s, &mut c), "a reply after conntrack loss must pass (mid-flow pickup)");
    assert!(delivered(&mut c, &mut s), "and the client's next packet too");
    assert!(f.dp.conntrack().unwrap().iter().any(|(k, _)| k.ifindex == cli), "re-tracked");

    // The server still cannot open a connection to the client.
    let _l = TcpServer::start(&client.netns, 9000).unwrap();
    assert!(!tcp_echo(&server.netns, SocketAddr::from((client.ip, 9000)), T).unwrap());
}

#[test]
fn conntrack_entries_expire_without_racing_the_datapath() {
    let mut lab = Lab::new().unwrap();
    let client = lab.add_pod("client").unwrap();
    let server = lab.add_pod("server").unwrap();
    let _udp = UdpServer::start(&server.netns, 53).unwrap();
    let mut f = Fixture::new("expiry");
    f.peer(1, &cidr(&client), 10);
    f.ports(10, 17, 53, 53, 100);
    enforce(&mut f, &server, Endpoint { generation: 1, ingress_np: 1, ..Default::default() });
    assert!(udp_echo(&client.netns, SocketAddr::from((server.ip, 53)), T).unwrap());
    let udp_entries =
        |f: &Fixture| f.dp.conntrack().unwrap().iter().filter(|(k, _)| k.proto == 17).count();
    assert_eq!(udp_entries(&f), 1);

    // Within the timeout nothing is collected.
    let stats = f.dp.gc_conntrack(monotonic_ns(), &Timeouts::DEFAULT).unwrap();
    assert_eq!((stats.deleted, udp_entries(&f)), (0, 1), "{stats:?}");
    // A minute later (UDP timeout 60 s) the idle flow goes.
    let later = monotonic_ns() + 61_000_000_000;
    let stats = f.dp.gc_conntrack(later, &Timeouts::DEFAULT).unwrap();
    assert_eq!(stats.deleted, 1, "{stats:?}");
    assert_eq!(udp_entries(&f), 0);

    // Race: an entry found expired but refreshed by a packet before the sweep is kept. The
    // probes use one fixed source port so they are one flow.
    let dns = SocketAddr::from((server.ip, 53));
    assert!(udp_echo_from(&client.netns, 40053, dns, T).unwrap());
    let table = f.dp.conntrack_table().unwrap();
    let (_, expired) = netpol_agent::dataplane::conntrack::scan(
        &table,
        later + 61_000_000_000,
        &Timeouts::DEFAULT,
        None,
    );
    assert_eq!(expired.len(), 1);
    std::thread::sleep(Duration::from_millis(5));
    assert!(udp_echo_from(&client.netns, 40053, dns, T).unwrap(), "refresh");
    let stats = netpol_agent::dataplane::conntrack::sweep(&table, &expired);
    assert_eq!(stats, GcStats { scanned: 0, deleted: 0, refreshed: 1 });
    assert_eq!(udp_entries(&f), 1);
}

#[test]
fn injected_malformed_packets_and_fragments_are_dropped_and_counted() {
    let mut lab = Lab::new().unwrap();
    let client = lab.add_pod("client").unwrap();
    let server = lab.add_pod("server").unwrap();
    let mut f = Fixture::new("inject");
    // The client's egress allows UDP 53 to the server.
    f.peer(1, &cidr(&server), 10);
    f.ports(10, 17, 53, 53, 100);
    let cli =
        enforce(&mut f, &client, Endpoint { generation: 1, egress_np: 1, ..Default::default() });
    let count = |f: &Fixture, r| f.dp.counters().unwrap().packets(cli, DIR_EGRESS, r);

    let good = Frame::new(client.ip, server.ip, L4::Udp { sport: 1000, dport: 53 });
    // Truncated IPv4 header: only possible to send raw, and never seen by BPF_PROG_TEST_RUN.
    let bytes = good.bytes();
    inject(&client.netns, &bytes[..14 + 12]).unwrap();
    // IP total length beyond the frame.
    let mut lie = bytes.clone();
    lie[16..18].copy_from_slice(&1400u16.to_be_bytes());
    inject(&client.netns, &lie).unwrap();
    // A non-first fragment of a datagram whose first fragment was never seen.
    inject(&client.netns, &good.clone().fragment(4242, false, 64).bytes()).unwrap();
    // The intact datagram passes.
    inject(&client.netns, &bytes).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(count(&f, Reason::DenyMalformed), 2);
    assert_eq!(count(&f, Reason::DenyFragment), 1);
    assert_eq!(count(&f, Reason::AllowPolicy), 1);
}

#[test]
fn ipv6_and_ipv4_on_a_bridge() {
    let mut lab = Lab::with_topology(Topology::Bridged).unwrap();
    let client = lab.add_pod("client").unwrap();
    let stranger = lab.add_pod("stranger").unwrap();
    let server = lab.add_pod("server").unwrap();
    let _s: Vec<_> = [80, 81].iter().map(|p| TcpServer6::start(&server, *p)).collect();
    let (c6, s6) = (client.ip6.unwrap(), server.ip6.unwrap());
    let at6 = |p| SocketAddr::from((s6, p));
    let at4 = |p| SocketAddr::from((server.ip, p));
    // Neighbour discovery on a bridge created a moment ago may take longer than one probe.
    assert!(works(|| tcp_echo(&stranger.netns, at6(80), T)), "v6 before enforcement");

    let mut f = Fixture::new("ipv6");
    f.peer(1, &c6.to_string(), 10);
    f.peer(1, &cidr(&client), 10);
    f.ports(10, 6, 80, 80, 100);
    let srv =
        enforce(&mut f, &server, Endpoint { generation: 1, ingress_np: 1, ..Default::default() });
    assert!(tcp_echo(&client.netns, at6(80), T).unwrap(), "v6 80 allowed");
    assert!(!tcp_echo(&client.netns, at6(81), T).unwrap(), "v6 81 denied");
    assert!(!tcp_echo(&stranger.netns, at6(80), T).unwrap(), "v6 stranger denied");
    assert!(tcp_echo(&client.netns, at4(80), T).unwrap(), "v4 80 allowed on the bridge");
    assert!(!tcp_echo(&stranger.netns, at4(80), T).unwrap(), "v4 stranger denied on the bridge");
    let c = f.dp.counters().unwrap();
    assert!(c.packets(srv, DIR_INGRESS, Reason::DenyPolicy) >= 3, "{c:?}");
    // Neighbour discovery kept working although ingress is isolated.
    assert!(c.packets(srv, DIR_INGRESS, Reason::AllowNonIp) >= 1, "{c:?}");
}

/// A dual-stack TCP echo server (binds `::`, which also accepts IPv4).
struct TcpServer6(#[allow(dead_code)] TcpServer);
impl TcpServer6 {
    fn start(pod: &Pod, port: u16) -> TcpServer6 {
        TcpServer6(TcpServer::start_on(&pod.netns, "::", port).unwrap())
    }
}
