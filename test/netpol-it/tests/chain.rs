//! Proves the whole chain: the embedded programs load, attach to the host end of a pod's veth,
//! let an allowed TCP connection through, drop a denied one, and count the drop per CPU.
use std::{net::SocketAddr, time::Duration};

use netpol_agent::dataplane::{remove_pins, Dataplane, DataplaneOptions};
use netpol_common::{
    counters::Reason,
    ep::Endpoint,
    policy::{PeerData, PeerValue, PortData, PortValue, ACTION_ALLOW, PEER_SET_BITS},
    v4_mapped, DIR_INGRESS,
};
use netpol_it::{
    lab::Lab,
    probe::{tcp_echo, TcpServer},
};

const TIMEOUT: Duration = Duration::from_millis(700);

#[test]
fn allowed_tcp_passes_denied_tcp_is_dropped_and_counted() {
    netpol_it::require_root();
    let mut lab = Lab::new().expect("lab");
    let client = lab.add_pod("client").expect("client pod");
    let server = lab.add_pod("server").expect("server pod");
    let _http = TcpServer::start(&server.netns, 80).expect("server :80");
    let _alt = TcpServer::start(&server.netns, 81).expect("server :81");
    let to = |port| SocketAddr::from((server.ip, port));

    // Before enforcement both ports answer: the topology itself works.
    // (A fresh topology may need a moment: retried.)
    for port in [80, 81] {
        let ok = (0..5).any(|_| tcp_echo(&client.netns, to(port), TIMEOUT).unwrap());
        assert!(ok, "port {port} before enforcement");
    }

    let pin_dir = std::path::Path::new("/sys/fs/bpf")
        .join(format!("netpol-test-{}-chain", std::process::id()));
    let _cleanup = PinCleanup(pin_dir.clone());
    let mut dp = Dataplane::load(&DataplaneOptions { pin_dir, ..Default::default() })
        .expect("load programs");

    // The server's ingress: only the client, only TCP/80 (set 7, port set 9, rule 42).
    let set = 7;
    let addr = v4_mapped(client.ip.octets());
    dp.upsert_peer(
        PEER_SET_BITS + 128,
        PeerData { set_id: set, addr },
        PeerValue { portset_id: 9, flags: netpol_common::policy::SKIP_TRIE },
    )
    .unwrap();
    dp.upsert_port(
        netpol_common::policy::PORT_FULL_BITS,
        PortData { portset_id: 9, proto: 6, port: 80u16.to_be_bytes(), _pad: 0 },
        PortValue { rule_id: 42, action: ACTION_ALLOW, _pad: [0; 3] },
    )
    .unwrap();
    let ifindex = netpol_it::lab::ifindex(&server.host_if).unwrap();
    dp.set_endpoint(ifindex, Endpoint { generation: 1, ingress_np: set, ..Default::default() })
        .unwrap();
    assert_eq!(dp.attach(&server.host_if).unwrap(), ifindex);

    assert!(tcp_echo(&client.netns, to(80), TIMEOUT).unwrap(), "port 80 must stay allowed");
    assert!(!tcp_echo(&client.netns, to(81), TIMEOUT).unwrap(), "port 81 must be dropped");

    let c = dp.counters().unwrap();
    let denied = c.packets(ifindex, DIR_INGRESS, Reason::DenyPolicy);
    assert!(denied >= 1, "the dropped SYN(s) must be counted, got {denied}: {c:?}");
    assert!(c.packets(ifindex, DIR_INGRESS, Reason::AllowPolicy) >= 1, "{c:?}");
    assert!(c.by_rule.get(&42).is_some_and(|v| v.packets >= 1), "rule 42 counted: {c:?}");

    // Detached, port 81 works again: the drop came from our program and nothing else.
    dp.detach(ifindex).unwrap();
    assert!(tcp_echo(&client.netns, to(81), TIMEOUT).unwrap(), "port 81 after detach");
}

struct PinCleanup(std::path::PathBuf);
impl Drop for PinCleanup {
    fn drop(&mut self) {
        let _ = remove_pins(&self.0);
    }
}
