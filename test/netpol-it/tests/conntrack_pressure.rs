//! Conntrack pressure: the real agent with `--conntrack-size 256` and ten times more flows than
//! that. The server pod may not send anything on its own (egress denied), so its replies on an
//! established TCP connection pass only through conntrack — or, once the table evicted the
//! entry (its set filled with newer flows), through mid-flow pickup. The connection must keep working through the flood, the
//! map never exceeds its capacity, and the fill level shows in the agent's metrics.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use netpol_common::ct::CtKey;
use netpol_it::{
    agent::{sample, AgentProcess, RemovePins},
    lab::Lab,
    manifests::{namespace, pod_with_protocols, ManifestDir},
    netns::in_netns,
    probe::{TcpServer, UdpServer},
};

const NODE: &str = "lab-node";
const CT_SIZE: u32 = 256;
const FLOWS: u16 = 2_560;
const POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server, namespace: prod}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {matchLabels: {app: client}}
    ports:
    - {port: 80, protocol: TCP}
    - {port: 5003, protocol: UDP}
";

/// The distinct keys in the pinned conntrack table, as `netpol-agent conntrack` reads them, and
/// its capacity in flows, as `netpol-agent inspect` reports it.
fn ct_keys(pins: &std::path::Path) -> (std::collections::HashSet<CtKey>, u32) {
    let pinned = netpol_agent::dataplane::pinned::PinnedMaps::open(pins).expect("pinned maps");
    let keys = pinned.conntrack().expect("conntrack").into_iter().map(|(k, _)| k).collect();
    let fill = pinned.fill().expect("fill levels");
    let ct = fill.iter().find(|m| m.name == netpol_common::maps::CT).expect("np_ct");
    (keys, ct.max_entries)
}

/// Entries in the pinned conntrack map and its capacity.
fn ct_fill(pins: &std::path::Path) -> (usize, u32) {
    let (keys, max) = ct_keys(pins);
    (keys.len(), max)
}

fn echoes(c: &mut TcpStream, round: u32) -> bool {
    let msg = format!("ping{:06}\n", round % 1_000_000);
    let mut buf = vec![0u8; msg.len()];
    c.write_all(msg.as_bytes()).is_ok() && c.read_exact(&mut buf).is_ok() && buf == msg.as_bytes()
}

#[test]
fn established_flows_survive_eviction_and_the_map_stays_bounded() {
    let mut lab = Lab::new().unwrap();
    let client = lab.add_pod("client").unwrap();
    let server = lab.add_pod("server").unwrap();
    let _tcp = TcpServer::start(&server.netns, 80).unwrap();
    let _udp = UdpServer::start(&server.netns, 5003).unwrap();
    let dir = ManifestDir::new("ct-pressure").unwrap();
    dir.write("ns.yaml", &namespace("prod", &[])).unwrap();
    dir.write("client.yaml", &pod_with_protocols(&client, "prod", NODE, &[("app", "client")], &[]))
        .unwrap();
    let ports = [("http", 80, "TCP"), ("", 5003, "UDP")];
    dir.write(
        "server.yaml",
        &pod_with_protocols(&server, "prod", NODE, &[("app", "server")], &ports),
    )
    .unwrap();
    dir.write("policy.yaml", POLICY).unwrap();
    let pins = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/netpol-test-{}-ctpressure",
        std::process::id()
    ));
    let _ = netpol_agent::dataplane::remove_pins(&pins);
    let _cleanup = RemovePins(pins.clone());
    let mut agent =
        AgentProcess::start(&dir, NODE, &pins, &["--conntrack-size", &CT_SIZE.to_string()]);
    agent.wait_ready();
    let to = SocketAddr::from((server.ip, 80));
    netpol_it::probe::eventually(&client, to, true, "client allowed");

    let mut conn =
        in_netns(&client.netns, || TcpStream::connect_timeout(&to, Duration::from_secs(1)))
            .unwrap()
            .expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert!(echoes(&mut conn, 0));

    // The flood: one UDP flow per source port, 256 new flows (512 entries: both pods'
    // interfaces) between two uses of the established connection, so its entries are evicted
    // and its next packets are picked up mid-flow. Each of the table's 64 sets receives 8 new
    // entries per batch on average; one that receives fewer than its 4 ways keeps the
    // connection's entry (a chance of ~4 % per set): a batch need not evict them, but most do.
    let udp_to = SocketAddr::from((server.ip, 5003));
    let conn_port = conn.local_addr().unwrap().port();
    let tracked = |pins: &std::path::Path| {
        ct_keys(pins)
            .0
            .iter()
            .any(|k| k.proto == 6 && (k.local_port == conn_port || k.remote_port == conn_port))
    };
    let started = Instant::now();
    let (mut rounds, mut max_seen, mut evicted) = (1u32, 0usize, 0u32);
    for batch in 0..(FLOWS / 256) {
        for _ in 0..4 {
            let sockets: Vec<UdpSocket> = in_netns(&client.netns, || {
                (0..64).map(|_| UdpSocket::bind("0.0.0.0:0").expect("bind")).collect()
            })
            .unwrap();
            for s in &sockets {
                s.send_to(b"x", udp_to).expect("send");
            }
            // Counted once the flows' packets (and the echo server's replies) went through.
            std::thread::sleep(Duration::from_millis(50));
            let (entries, max) = ct_fill(&pins);
            assert!(entries <= max as usize, "{entries} entries in a map of {max}");
            max_seen = max_seen.max(entries);
        }
        if !tracked(&pins) {
            evicted += 1;
        }
        assert!(echoes(&mut conn, rounds), "established connection broke at batch {batch}");
        rounds += 1;
    }
    let (entries, max) = ct_fill(&pins);
    assert_eq!(max, CT_SIZE, "the agent sized the map as asked");
    println!(
        "conntrack pressure: {} UDP flows through a map of {max} in {:?}; the established \
         connection's entries were evicted {evicted} times and it was picked up mid-flow each \
         time; entries max {max_seen}, now {entries}",
        FLOWS,
        started.elapsed()
    );
    let batches = u32::from(FLOWS / 256);
    assert!(
        evicted * 2 >= batches,
        "the established connection's entries were evicted in {evicted} of {batches} batches, \
         expected most"
    );
    assert!(max_seen as u32 >= CT_SIZE * 3 / 4, "the map was under pressure: {max_seen}");

    // The fill level shows in the metrics after the next GC pass (every 10 s), and the
    // evictions: 2,560 flows of two entries each (the client's and the server's interface) into
    // 256 ways, nothing expired meanwhile, make at least 4,864, less any two CPUs' inserts that
    // raced for one free way.
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let m = agent.metrics();
        let fill = sample(&m, "netpol_bpf_map_entries", &[("map", "np_ct")]);
        let cap = sample(&m, "netpol_bpf_map_max_entries", &[("map", "np_ct")]);
        let evictions = sample(&m, "netpol_conntrack_evictions_total", &[]);
        if cap == CT_SIZE as f64 && fill >= (CT_SIZE / 2) as f64 && evictions >= 4_096.0 {
            println!(
                "metrics: netpol_bpf_map_entries{{map=\"np_ct\"}} {fill} of {cap}, \
                 netpol_conntrack_evictions_total {evictions}"
            );
            assert!(fill <= cap);
            break;
        }
        assert!(Instant::now() < deadline, "np_ct fill level not in the metrics: {fill} / {cap}");
        // Keep the connection busy (the echo server drops connections idle for 10 s).
        assert!(echoes(&mut conn, rounds), "the connection works while the GC runs");
        rounds += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(echoes(&mut conn, rounds), "the connection still works after the flood");
    // And a connection the server would open itself stays denied (egress isolated).
    let back = SocketAddr::from((client.ip, 80));
    let _client_http = TcpServer::start(&client.netns, 80).unwrap();
    assert!(!netpol_it::probe::tcp_echo(&server.netns, back, Duration::from_millis(500)).unwrap());
}
