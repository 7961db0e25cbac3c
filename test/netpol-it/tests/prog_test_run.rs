//! The programs on crafted packets through BPF_PROG_TEST_RUN: verdict and counted reason for
//! every parsing and policy path, conntrack, policy changes, mid-flow pickup, audit and events.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netpol_common::{
    counters::{
        slot_counter_index,
        Reason::{self, *},
        COUNTER_SLOTS, NO_COUNTER_SLOT,
    },
    ct::{CT_TCP_ESTABLISHED, CT_TCP_SYN_SENT},
    ep::{Endpoint, EP_FLAG_AUDIT},
    maps::{PROG_FROM_POD as FROM, PROG_TO_POD as TO},
    policy::{PortData, PORT_FULL_BITS},
    DIR_EGRESS as EG, DIR_INGRESS as IN,
};
use netpol_it::{
    fixture::{Fixture, DROP, PASS, TEST_IFINDEX},
    packet::{arp, tcp, Frame, L4},
};

const POD: [u8; 4] = [10, 0, 0, 9];
const ALLOWED: [u8; 4] = [10, 0, 0, 1];
const ANY_PROTO: [u8; 4] = [10, 0, 0, 2];
const STRANGER: [u8; 4] = [10, 0, 0, 3];
const POD6: &str = "fd00:9::9";
const ALLOWED6: &str = "fd00:1::1";

const INGRESS_SET: u32 = 1;
const EGRESS_SET: u32 = 2;

/// Pod 10.0.0.9 (and fd00:9::9) behind ifindex 1.
/// Ingress: 10.0.0.1 and fd00:1::1 may open TCP 80, UDP 53, SCTP 5000 (rule 10);
/// 10.0.0.2 anything (rule 11); 10.1.0.0/16 TCP 8000-8099 (rule 12).
/// Egress: only UDP 53 to 10.0.0.1 (rule 13).
fn fixture(name: &str) -> Fixture {
    with_policy(Fixture::new(name))
}

/// [`fixture`] with a conntrack table of `flows` flows.
fn fixture_with_ct(name: &str, flows: u32) -> Fixture {
    let opts = netpol_agent::dataplane::DataplaneOptions {
        ct_max_entries: Some(flows),
        events_per_sec: 1000,
        events_burst: 1000,
        ..Default::default()
    };
    with_policy(Fixture::with_options(name, opts))
}

/// The policy of [`fixture`] on the dataplane of `f`.
fn with_policy(mut f: Fixture) -> Fixture {
    f.peer(INGRESS_SET, "10.0.0.1", 10);
    f.peer(INGRESS_SET, ALLOWED6, 10);
    f.ports(10, 6, 80, 80, 10);
    f.ports(10, 17, 53, 53, 10);
    f.ports(10, 132, 5000, 5000, 10);
    f.peer(INGRESS_SET, "10.0.0.2", 11);
    f.ports(11, 0, 0, 0, 11);
    f.peer(INGRESS_SET, "10.1.0.0/16", 12);
    f.ports(12, 6, 8000, 8099, 12);
    f.peer(EGRESS_SET, "10.0.0.1", 13);
    f.ports(13, 17, 53, 53, 13);
    set_endpoint(&mut f, 1, 0);
    f
}

fn set_endpoint(f: &mut Fixture, generation: u32, flags: u32) {
    f.dp.set_endpoint(
        TEST_IFINDEX,
        Endpoint {
            generation,
            flags,
            ingress_np: INGRESS_SET,
            egress_np: EGRESS_SET,
            ..Default::default()
        },
    )
    .expect("endpoint");
}

fn v4(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}
fn v6(a: &str) -> IpAddr {
    IpAddr::V6(a.parse::<Ipv6Addr>().unwrap())
}
fn syn(sport: u16, dport: u16) -> L4 {
    L4::Tcp { sport, dport, flags: tcp::SYN }
}
fn ack(sport: u16, dport: u16) -> L4 {
    L4::Tcp { sport, dport, flags: tcp::ACK }
}
fn udp(sport: u16, dport: u16) -> L4 {
    L4::Udp { sport, dport }
}
fn echo_request() -> L4 {
    L4::Icmp { kind: 8, code: 0, rest: [0, 7, 0, 1], payload: vec![] }
}

#[track_caller]
fn expect(
    f: &mut Fixture,
    prog: &'static str,
    frame: Frame,
    verdict: i32,
    dir: u8,
    reason: Reason,
) {
    let got = f.run_frame(prog, &frame);
    assert_eq!(got, (verdict, Some((dir, reason))), "{prog} {frame:?}");
}

#[test]
fn ingress_policy_per_protocol_port_and_peer() {
    let mut f = fixture("ingress");
    let to = |src: [u8; 4], l4| Frame::new(v4(src), v4(POD), l4);
    expect(&mut f, TO, to(ALLOWED, syn(40000, 80)), PASS, IN, AllowPolicy);
    expect(&mut f, TO, to(ALLOWED, syn(40001, 81)), DROP, IN, DenyPolicy);
    expect(&mut f, TO, to(ALLOWED, udp(40002, 53)), PASS, IN, AllowPolicy);
    expect(&mut f, TO, to(ALLOWED, udp(40003, 54)), DROP, IN, DenyPolicy);
    expect(
        &mut f,
        TO,
        to(ALLOWED, L4::Sctp { sport: 7, dport: 5000, chunk: 1 }),
        PASS,
        IN,
        AllowPolicy,
    );
    expect(
        &mut f,
        TO,
        to(ALLOWED, L4::Sctp { sport: 7, dport: 5001, chunk: 1 }),
        DROP,
        IN,
        DenyPolicy,
    );
    // A rule with ports never allows ICMP; a rule without ports allows every protocol.
    expect(&mut f, TO, to(ALLOWED, echo_request()), DROP, IN, DenyPolicy);
    expect(&mut f, TO, to(ANY_PROTO, echo_request()), PASS, IN, AllowPolicy);
    expect(
        &mut f,
        TO,
        to(ANY_PROTO, L4::Raw { proto: 47, bytes: vec![0; 8] }),
        PASS,
        IN,
        AllowPolicy,
    );
    expect(&mut f, TO, to(STRANGER, syn(40004, 80)), DROP, IN, DenyPolicy);
    // endPort range 8000-8099 from a /16.
    expect(&mut f, TO, to([10, 1, 2, 3], syn(1, 8000)), PASS, IN, AllowPolicy);
    expect(&mut f, TO, to([10, 1, 2, 3], syn(2, 8099)), PASS, IN, AllowPolicy);
    expect(&mut f, TO, to([10, 1, 2, 3], syn(3, 8100)), DROP, IN, DenyPolicy);
    expect(&mut f, TO, to([10, 1, 2, 3], syn(4, 7999)), DROP, IN, DenyPolicy);
    expect(&mut f, TO, to([10, 2, 0, 1], syn(5, 8000)), DROP, IN, DenyPolicy);
    // 802.1Q-tagged frames are parsed through the tag.
    expect(&mut f, TO, to(ALLOWED, syn(40005, 80)).vlan(42), PASS, IN, AllowPolicy);
    expect(&mut f, TO, to(ALLOWED, syn(40006, 81)).vlan(42), DROP, IN, DenyPolicy);
    let c = f.dp.counters().unwrap();
    assert!(c.by_rule.get(&10).is_some_and(|v| v.packets >= 4), "rule 10 counted: {:?}", c.by_rule);
    assert!(c.by_rule.get(&12).is_some_and(|v| v.packets == 2), "rule 12 counted: {:?}", c.by_rule);
}

#[test]
fn ipv6_with_extension_headers() {
    let mut f = fixture("ipv6");
    let to = |l4| Frame::new(v6(ALLOWED6), v6(POD6), l4);
    expect(&mut f, TO, to(syn(1, 80)), PASS, IN, AllowPolicy);
    expect(&mut f, TO, to(syn(2, 81)), DROP, IN, DenyPolicy);
    expect(&mut f, TO, to(syn(3, 80)).ext(0).ext(60), PASS, IN, AllowPolicy);
    expect(&mut f, TO, to(syn(4, 81)).ext(0).ext(43).ext(60), DROP, IN, DenyPolicy);
    expect(&mut f, TO, Frame::new(v6("fd00:3::3"), v6(POD6), syn(5, 80)), DROP, IN, DenyPolicy);
    // Longer chains than the bounded walk are refused, not guessed.
    let mut long = to(syn(6, 80));
    for _ in 0..7 {
        long = long.ext(60);
    }
    expect(&mut f, TO, long, DROP, IN, DenyMalformed);
    // Neighbour solicitation passes even though the pod's ingress is isolated.
    let ns = L4::Icmp { kind: 135, code: 0, rest: [0; 4], payload: vec![0; 16] };
    expect(&mut f, TO, Frame::new(v6("fe80::1"), v6(POD6), ns), PASS, IN, AllowNonIp);
}

#[test]
fn malformed_and_non_ip_frames() {
    let mut f = fixture("malformed");
    // (Frames with a truncated IPv4 header are refused by BPF_PROG_TEST_RUN itself; the
    // injection tests in tests/traffic.rs send those through a real interface.)
    let good = Frame::new(v4(ALLOWED), v4(POD), syn(1, 80)).bytes();
    expect_raw(&mut f, &truncated_tcp(&good), DROP, DenyMalformed);
    // Total length larger than the frame.
    let mut lie = good.clone();
    lie[14 + 2..14 + 4].copy_from_slice(&1500u16.to_be_bytes());
    expect_raw(&mut f, &lie, DROP, DenyMalformed);
    // Header length below 20 bytes.
    let mut ihl = good.clone();
    ihl[14] = 0x44;
    expect_raw(&mut f, &ihl, DROP, DenyMalformed);
    // Wrong IP version under the IPv4 ethertype.
    let mut ver = good.clone();
    ver[14] = 0x65;
    expect_raw(&mut f, &ver, DROP, DenyMalformed);
    // TCP data offset below 5.
    let mut doff = good.clone();
    doff[14 + 20 + 12] = 0x40;
    expect_raw(&mut f, &doff, DROP, DenyMalformed);
    // Truncated SCTP (no chunk).
    let sctp =
        Frame::new(v4(ALLOWED), v4(POD), L4::Sctp { sport: 1, dport: 5000, chunk: 1 }).bytes();
    let mut cut = sctp[..14 + 20 + 12].to_vec();
    cut[14 + 2..14 + 4].copy_from_slice(&32u16.to_be_bytes());
    expect_raw(&mut f, &cut, DROP, DenyMalformed);
    // More VLAN tags than the parser walks (two): refused, not passed as non-IP (found by
    // tests/fuzz_packets.rs: a triple-tagged IPv4 frame passed unpoliced).
    let mut stacked = good[..12].to_vec();
    for tag in [7u16, 8, 9] {
        stacked.extend_from_slice(&0x8100u16.to_be_bytes());
        stacked.extend_from_slice(&tag.to_be_bytes());
    }
    stacked.extend_from_slice(&good[12..]);
    expect_raw(&mut f, &stacked, DROP, DenyMalformed);
    let qinq = Frame::new(v4(ALLOWED), v4(POD), syn(2, 80)).vlan(5).bytes();
    let mut qinq = [&qinq[..12], &[0x88, 0xa8, 0, 6][..], &qinq[12..]].concat();
    expect_raw(&mut f, &qinq, PASS, AllowPolicy);
    qinq[12 + 4 + 4..12 + 4 + 4 + 2].copy_from_slice(&0x8100u16.to_be_bytes());
    expect_raw(&mut f, &qinq, DROP, DenyMalformed);
    // ARP is never policed.
    expect_raw(&mut f, &arp(), PASS, AllowNonIp);
    // The intact frame still passes: the drops above came from the corruption.
    expect_raw(&mut f, &good, PASS, AllowPolicy);
}

/// The frame cut in the middle of its TCP header, with an IP total length that agrees.
fn truncated_tcp(good: &[u8]) -> Vec<u8> {
    let mut cut = good[..14 + 20 + 10].to_vec();
    cut[14 + 2..14 + 4].copy_from_slice(&30u16.to_be_bytes());
    cut
}

#[track_caller]
fn expect_raw(f: &mut Fixture, frame: &[u8], verdict: i32, reason: Reason) {
    assert_eq!(f.run(TO, frame), (verdict, Some((IN, reason))), "frame {frame:02x?}");
}

#[test]
fn fragments_follow_their_first_fragment() {
    let mut f = fixture("fragments");
    let to = |src: [u8; 4], l4| Frame::new(v4(src), v4(POD), l4);
    // A non-first fragment of an unknown datagram carries no ports: dropped.
    expect(&mut f, TO, to(ALLOWED, udp(1, 53)).fragment(77, false, 64), DROP, IN, DenyFragment);
    // First fragment allowed by policy, then the rest of the same datagram passes.
    expect(&mut f, TO, to(ALLOWED, udp(2, 53)).fragment(78, true, 0), PASS, IN, AllowPolicy);
    expect(&mut f, TO, to(ALLOWED, udp(2, 53)).fragment(78, true, 8), PASS, IN, AllowConntrack);
    expect(&mut f, TO, to(ALLOWED, udp(2, 53)).fragment(78, false, 16), PASS, IN, AllowConntrack);
    // A denied first fragment does not open the door for its followers.
    expect(&mut f, TO, to(STRANGER, udp(3, 53)).fragment(79, true, 0), DROP, IN, DenyPolicy);
    expect(&mut f, TO, to(STRANGER, udp(3, 53)).fragment(79, false, 8), DROP, IN, DenyFragment);
}

/// RFC 8200: the fragmentable part may start with an extension header (destination options
/// here), so the fragment header's Next Header names it, not the transport protocol. Later
/// fragments carry only the fragment header; they must still find their first fragment.
#[test]
fn ipv6_fragments_with_an_extension_header_after_the_fragment_header() {
    let mut f = fixture("frag6");
    let to = |l4| Frame::new(v6(ALLOWED6), v6(POD6), l4);
    // The rest of a datagram whose fragmentable part starts with destination options (60).
    let later = |id, port| {
        let mut b = to(syn(9, port)).fragment6(id, false, 16).bytes();
        // Ethernet 14 + IPv6 40: the fragment header's Next Header, as in the first fragment.
        b[14 + 40] = 60;
        b
    };
    expect(&mut f, TO, to(syn(9, 80)).fragment6(900, true, 0).ext(60), PASS, IN, AllowPolicy);
    expect_raw(&mut f, &later(900, 80), PASS, Reason::AllowConntrack);
    // A denied datagram's later fragments stay dropped.
    expect(&mut f, TO, to(syn(9, 81)).fragment6(901, true, 0).ext(60), DROP, IN, DenyPolicy);
    expect_raw(&mut f, &later(901, 81), DROP, Reason::DenyFragment);
    // Without the extension header, as before.
    expect(&mut f, TO, to(syn(10, 80)).fragment6(902, true, 0), PASS, IN, AllowPolicy);
    expect(&mut f, TO, to(syn(10, 80)).fragment6(902, false, 16), PASS, IN, AllowConntrack);
}

#[test]
fn conntrack_replies_pickup_and_policy_changes() {
    let mut f = fixture("conntrack");
    let to = |src: [u8; 4], l4| Frame::new(v4(src), v4(POD), l4);
    let from = |dst: [u8; 4], l4| Frame::new(v4(POD), v4(dst), l4);

    // Ingress connection, then its reply leaves the pod although egress allows only UDP 53.
    expect(&mut f, TO, to(ALLOWED, syn(40000, 80)), PASS, IN, AllowPolicy);
    let synack = L4::Tcp { sport: 80, dport: 40000, flags: tcp::SYN | tcp::ACK };
    expect(&mut f, FROM, from(ALLOWED, synack), PASS, EG, AllowConntrack);
    expect(&mut f, TO, to(ALLOWED, ack(40000, 80)), PASS, IN, AllowConntrack);
    // The pod cannot open TCP to that peer.
    expect(&mut f, FROM, from(ALLOWED, syn(45000, 80)), DROP, EG, DenyPolicy);

    // Mid-flow pickup: an ACK of a connection conntrack never saw (agent restart, eviction)
    // passes because the connection is allowed the other way round.
    expect(&mut f, FROM, from(ALLOWED, ack(80, 41111)), PASS, EG, AllowConntrack);
    // ...but not for a peer that may not connect either way.
    expect(&mut f, FROM, from(STRANGER, ack(80, 41112)), DROP, EG, DenyPolicy);

    // UDP: the pod's DNS query is allowed; a late reply is picked up through the explicit egress
    // rule; a "reply" from a peer the pod never may talk to is not.
    expect(&mut f, FROM, from(ALLOWED, udp(33333, 53)), PASS, EG, AllowPolicy);
    expect(&mut f, TO, to(ALLOWED, udp(53, 33333)), PASS, IN, AllowConntrack);
    expect(&mut f, TO, to(ALLOWED, udp(53, 34444)), PASS, IN, AllowConntrack);
    expect(&mut f, TO, to(STRANGER, udp(53, 34445)), DROP, IN, DenyPolicy);

    // ICMP errors about a tracked flow pass; about an unknown flow from a stranger they do not.
    let unreachable = |sport| {
        let inner = Frame::new(v4(POD), v4(ALLOWED), udp(sport, 53)).ip_packet();
        L4::Icmp { kind: 3, code: 3, rest: [0; 4], payload: inner[..28].to_vec() }
    };
    expect(&mut f, TO, to(ALLOWED, unreachable(33333)), PASS, IN, AllowConntrack);
    expect(&mut f, TO, to(STRANGER, unreachable(39999)), DROP, IN, DenyPolicy);

    // Policy change: TCP 80 is no longer allowed. The established flow is cut at its next
    // packet, in either orientation.
    disallow_tcp_80(&mut f);
    expect(&mut f, TO, to(ALLOWED, ack(40000, 80)), DROP, IN, DenyPolicyChanged);
    // The UDP flow is still allowed under generation 2 and keeps passing.
    expect(&mut f, FROM, from(ALLOWED, udp(33333, 53)), PASS, EG, AllowConntrack);
}

/// The policy change both conntrack tests make: rule 10's port set loses TCP 80, and the
/// endpoint moves to generation 2.
fn disallow_tcp_80(f: &mut Fixture) {
    f.dp.remove_port(
        PORT_FULL_BITS,
        PortData { portset_id: 10, proto: 6, port: 80u16.to_be_bytes(), _pad: 0 },
    )
    .unwrap();
    set_endpoint(f, 2, 0);
}

/// A TCP SYN is decided by policy before conntrack is consulted (netpol-ebpf's `decide_flow`):
/// allowed, its entry is inserted unless its key is there, and a key that is there decides as
/// before; denied, it is dropped without touching conntrack.
#[test]
fn a_syn_is_decided_by_policy_before_conntrack() {
    let mut f = fixture("syn-first");
    let to = |src: [u8; 4], l4| Frame::new(v4(src), v4(POD), l4);
    let from = |dst: [u8; 4], l4| Frame::new(v4(POD), v4(dst), l4);
    let states = |f: &Fixture| -> Vec<u8> {
        f.dp.conntrack().unwrap().iter().map(|(_, v)| v.state).collect()
    };
    let opened_by_rule_10 = |f: &Fixture| f.dp.counters().unwrap().by_rule[&10].packets;

    expect(&mut f, TO, to(STRANGER, syn(1000, 80)), DROP, IN, DenyPolicy);
    assert!(states(&f).is_empty(), "a denied SYN is not tracked");

    // A retransmitted SYN keeps its flow's entry: a tracked packet, not a second new flow.
    expect(&mut f, TO, to(ALLOWED, syn(1001, 80)), PASS, IN, AllowPolicy);
    assert_eq!((states(&f), opened_by_rule_10(&f)), (vec![CT_TCP_SYN_SENT], 1));
    expect(&mut f, TO, to(ALLOWED, syn(1001, 80)), PASS, IN, AllowConntrack);
    assert_eq!((states(&f), opened_by_rule_10(&f)), (vec![CT_TCP_SYN_SENT], 1));

    // Simultaneous open: the pod's own SYN on that 4-tuple, which egress does not allow, is
    // dropped although conntrack knows the flow. Its SYN-ACK passes, and completes the
    // handshake as a simultaneous open completes on both sides.
    expect(&mut f, FROM, from(ALLOWED, syn(80, 1001)), DROP, EG, DenyPolicy);
    let synack = L4::Tcp { sport: 80, dport: 1001, flags: tcp::SYN | tcp::ACK };
    expect(&mut f, FROM, from(ALLOWED, synack), PASS, EG, AllowConntrack);
    assert_eq!(states(&f), [CT_TCP_ESTABLISHED]);

    // A SYN on the ports of a flow past its handshake opens a new connection: decided by
    // policy, its entry replaces the old one.
    expect(&mut f, TO, to(ALLOWED, syn(1001, 80)), PASS, IN, AllowPolicy);
    assert_eq!((states(&f), opened_by_rule_10(&f)), (vec![CT_TCP_SYN_SENT], 2));

    // TCP 80 no longer allowed: the retransmitted SYN is dropped by policy, and the flow's
    // entry is cut by its next packet.
    disallow_tcp_80(&mut f);
    expect(&mut f, TO, to(ALLOWED, syn(1001, 80)), DROP, IN, DenyPolicy);
    expect(&mut f, TO, to(ALLOWED, ack(1001, 80)), DROP, IN, DenyPolicyChanged);

    // Audit mode: a would-be-denied SYN is tracked and reported once; its retransmission is a
    // tracked packet, not reported again.
    set_endpoint(&mut f, 3, EP_FLAG_AUDIT);
    let sent = |f: &Fixture| f.dp.counters().unwrap().stats.events_sent;
    let before = sent(&f);
    expect(&mut f, TO, to(STRANGER, syn(1002, 80)), PASS, IN, Audit);
    expect(&mut f, TO, to(STRANGER, syn(1002, 80)), PASS, IN, Audit);
    assert_eq!(sent(&f), before + 1);
}

#[test]
fn audit_mode_passes_and_reports_would_be_drops() {
    let mut f = fixture("audit");
    set_endpoint(&mut f, 1, EP_FLAG_AUDIT);
    let to = |src: [u8; 4], l4| Frame::new(v4(src), v4(POD), l4);
    expect(&mut f, TO, to(STRANGER, syn(1, 80)), PASS, IN, Audit);
    expect(&mut f, TO, to(STRANGER, ack(1, 80)), PASS, IN, Audit);
    expect(&mut f, TO, to(ALLOWED, syn(2, 80)), PASS, IN, AllowPolicy);
    // Malformed frames are not a policy matter: still dropped.
    let good = Frame::new(v4(ALLOWED), v4(POD), syn(3, 80)).bytes();
    expect_raw(&mut f, &truncated_tcp(&good), DROP, DenyMalformed);
}

#[test]
fn deny_events_reach_the_ring_buffer() {
    use aya::maps::RingBuf;
    use netpol_common::event::DenyEvent;

    let mut f = fixture("events");
    expect(&mut f, TO, Frame::new(v4(STRANGER), v4(POD), syn(4321, 81)), DROP, IN, DenyPolicy);
    let stats = f.dp.counters().unwrap().stats;
    assert_eq!(stats.events_sent, 1, "{stats:?}");
    let map = f.dp.raw_map_mut(netpol_common::maps::EVENTS).unwrap();
    let mut ring = RingBuf::try_from(map).unwrap();
    let item = ring.next().expect("one event");
    assert_eq!(item.len(), std::mem::size_of::<DenyEvent>());
    // SAFETY: the program writes exactly one DenyEvent per entry (size checked above).
    let ev: DenyEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
    assert_eq!(
        (ev.ifindex, ev.direction, ev.reason, ev.proto),
        (TEST_IFINDEX, IN, DenyPolicy as u8, 6)
    );
    assert_eq!((ev.src_port, ev.dst_port), (4321, 81));
    assert_eq!(&ev.src_addr[12..], &STRANGER);
}

#[test]
fn unknown_endpoint_passes_and_is_counted() {
    let mut f = fixture("noendpoint");
    f.dp.remove_endpoint(TEST_IFINDEX).unwrap();
    let frame = Frame::new(v4(STRANGER), v4(POD), syn(1, 81)).bytes();
    let before = f.dp.counters().unwrap().stats.no_endpoint;
    assert_eq!(f.run(TO, &frame).0, PASS);
    assert_eq!(f.dp.counters().unwrap().stats.no_endpoint, before + 1);
}

#[test]
fn the_fast_path_accepts_a_flow_only_while_its_interface_holds_the_slot() {
    let mut f = fixture("fast-slot");
    expect(&mut f, TO, Frame::new(v4(ALLOWED), v4(POD), syn(1, 80)), PASS, IN, AllowPolicy);
    let ack = Frame::new(v4(ALLOWED), v4(POD), ack(1, 80));
    expect(&mut f, TO, ack.clone(), PASS, IN, AllowConntrack);
    let no_endpoint = |f: &Fixture| f.dp.counters().unwrap().stats.no_endpoint;
    // Released: the flow's conntrack entry is still there (until the next collection), but
    // its packets find no endpoint, so neither path decides or counts them for the pod.
    f.dp.remove_endpoint(TEST_IFINDEX).unwrap();
    f.dp.forget_counters(TEST_IFINDEX).unwrap();
    let before = no_endpoint(&f);
    assert_eq!(f.run_frame(TO, &ack), (PASS, None));
    assert_eq!(no_endpoint(&f), before + 1, "decided as if the pod were still there");
    // Another interface takes the slot, with the same generation: still not this flow's.
    f.dp.set_endpoint(77, Endpoint { generation: 1, ..Default::default() }).unwrap();
    assert_eq!(f.dp.endpoint(77).unwrap().unwrap().counter_slot, 1);
    assert_eq!(f.run_frame(TO, &ack), (PASS, None));
    assert_eq!(no_endpoint(&f), before + 2, "accepted through a slot another interface holds");
    // The interface is enforced again, on another slot, under a new generation whose policy
    // no longer allows the peer: the general path re-decides the flow and cuts it.
    f.dp.set_endpoint(
        TEST_IFINDEX,
        Endpoint {
            generation: 2,
            ingress_np: EGRESS_SET,
            egress_np: EGRESS_SET,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(f.dp.endpoint(TEST_IFINDEX).unwrap().unwrap().counter_slot, 2);
    expect(&mut f, TO, ack, DROP, IN, DenyPolicyChanged);
}

#[test]
fn established_packets_refresh_their_flow_once_a_timer_tick_passed() {
    use netpol_agent::dataplane::conntrack::monotonic_ns;
    let mut f = fixture("ct-refresh");
    expect(&mut f, TO, Frame::new(v4(ALLOWED), v4(POD), syn(1, 80)), PASS, IN, AllowPolicy);
    let seen = |f: &Fixture| f.dp.conntrack().unwrap()[0].1.last_seen_ns;
    let opened = seen(&f);
    // 50 ms: several ticks at any HZ from 100 up.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let ack = Frame::new(v4(ALLOWED), v4(POD), ack(1, 80));
    expect(&mut f, TO, ack, PASS, IN, AllowConntrack);
    let refreshed = seen(&f);
    assert!(refreshed >= opened + 40_000_000, "opened {opened}, then seen at {refreshed}");
    assert!(refreshed <= monotonic_ns(), "the coarse clock is not ahead of CLOCK_MONOTONIC");
}

#[test]
fn the_flow_cache_decides_a_flow_within_its_tick_and_never_past_a_policy_change() {
    // A small conntrack table: emptying it between two packets fits in one tick.
    let mut f = fixture_with_ct("flow-cache", 64);
    let dns = || Frame::new(v4(ALLOWED), v4(POD), udp(3000, 53));
    expect(&mut f, TO, dns(), PASS, IN, AllowPolicy);
    // A flow's packet through the fast path writes this CPU's cache entry; with its conntrack
    // entry gone, the next packet in the same tick on the same CPU is still decided from the
    // cache (a conntrack miss would make it a new flow, tracked again). The test thread may
    // change CPU, or a tick may end, between two runs: a few attempts are enough.
    let packet = dns().bytes();
    let cached = (0..50).any(|_| {
        let (first, _) = f.dp.test_run(TO, &packet, 1).unwrap();
        f.dp.clear_conntrack().unwrap();
        let (second, _) = f.dp.test_run(TO, &packet, 1).unwrap();
        assert_eq!((first, second), (PASS, PASS));
        f.dp.conntrack().unwrap().is_empty()
    });
    assert!(cached, "no packet was decided from the flow cache");
    // Once the tick ends, the loss shows: the flow is decided and tracked afresh.
    std::thread::sleep(std::time::Duration::from_millis(25));
    expect(&mut f, TO, dns(), PASS, IN, AllowPolicy);
    assert_eq!(f.dp.conntrack().unwrap().len(), 1, "tracked again");

    // A policy change reaches a cached flow at once: the new generation fails the slot check.
    expect(&mut f, TO, dns(), PASS, IN, AllowConntrack);
    f.dp.set_endpoint(
        TEST_IFINDEX,
        Endpoint { generation: 2, ingress_np: 99, egress_np: EGRESS_SET, ..Default::default() },
    )
    .unwrap();
    expect(&mut f, TO, dns(), DROP, IN, DenyPolicyChanged);
}

#[test]
fn unpoliced_direction_allows_everything() {
    let mut f = fixture("unpoliced");
    f.dp.set_endpoint(
        TEST_IFINDEX,
        Endpoint { generation: 1, ingress_np: INGRESS_SET, ..Default::default() },
    )
    .unwrap();
    expect(&mut f, FROM, Frame::new(v4(POD), v4(STRANGER), syn(1, 443)), PASS, EG, AllowUnpoliced);
    expect(&mut f, TO, Frame::new(v4(STRANGER), v4(POD), syn(2, 443)), DROP, IN, DenyPolicy);
}

#[test]
fn a_deny_flood_is_rate_limited_in_the_kernel() {
    use netpol_agent::dataplane::DataplaneOptions;
    let mut f = Fixture::with_options(
        "ratelimit",
        DataplaneOptions { events_per_sec: 1, events_burst: 2, ..Default::default() },
    );
    f.peer(INGRESS_SET, "10.0.0.1", 10);
    f.ports(10, 6, 80, 80, 10);
    set_endpoint(&mut f, 1, 0);
    for port in 0..50u16 {
        expect(
            &mut f,
            TO,
            Frame::new(v4(STRANGER), v4(POD), syn(1000 + port, 81)),
            DROP,
            IN,
            DenyPolicy,
        );
    }
    let s = f.dp.counters().unwrap().stats;
    // Burst of 2, plus at most a token or two refilled during the run at 1 per second.
    assert!((2..=4).contains(&s.events_sent), "{s:?}");
    assert_eq!(s.events_sent + s.events_rate_limited, 50, "{s:?}");
    assert_eq!(s.events_lost, 0, "{s:?}");
}

#[test]
fn pinned_maps_carry_btf_field_names_for_bpftool() {
    let mut f = fixture("btf");
    expect(&mut f, TO, Frame::new(v4(ALLOWED), v4(POD), syn(1, 80)), PASS, IN, AllowPolicy);
    let dump = |map: &str| {
        let path = f.pin_dir().join(map);
        netpol_it::cmd::run("bpftool", &["map", "dump", "pinned", &path.to_string_lossy()]).unwrap()
    };
    let ep = dump("np_ep");
    assert!(ep.contains("\"ifindex\": 1") && ep.contains("\"ingress_np\": 1"), "{ep}");
    // The conntrack table is looked up by set: the one the flow's key hashes to in the
    // default-sized table (a whole dump prints every set of every way).
    let flows = f.dp.conntrack().unwrap();
    assert_eq!(flows.len(), 1, "{flows:?}");
    let mask = (netpol_common::maps::CT_MAX / netpol_common::ct::CT_WAYS) as u32 - 1;
    let set =
        netpol_common::ct::set_of(&flows[0].0.words(), mask).to_le_bytes().map(|b| b.to_string());
    let path = f.pin_dir().join("np_ct");
    let mut args = vec!["map".to_owned(), "lookup".into(), "pinned".into()];
    args.extend([path.to_string_lossy().into_owned(), "key".into()]);
    args.extend(set);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ct = netpol_it::cmd::run("bpftool", &args).unwrap();
    assert!(ct.contains("\"local_port\": 80") && ct.contains("\"generation\": 1"), "{ct}");
    assert!(ct.contains("\"slot\": 1"), "{ct}");
    assert!(ep.contains("\"counter_slot\": 1"), "{ep}");
    // Slot 1's owner, which the fast path checks a conntrack hit against.
    let path = f.pin_dir().join("np_slot");
    let owner = netpol_it::cmd::run(
        "bpftool",
        &["map", "lookup", "pinned", &path.to_string_lossy(), "key", "1", "0", "0", "0"],
    )
    .unwrap();
    assert!(owner.contains("\"ifindex\": 1") && owner.contains("\"generation\": 1"), "{owner}");
    // The endpoint's counters: slot 1, ingress, policy_allow (the index docs/ARCHITECTURE.md
    // tells operators to compute), one packet on one of the CPUs.
    let index = slot_counter_index(1, IN, AllowPolicy);
    assert_eq!(index, 20);
    let path = f.pin_dir().join("np_cnt_slot");
    let cnt = netpol_it::cmd::run(
        "bpftool",
        &["map", "lookup", "pinned", &path.to_string_lossy(), "key", "20", "0", "0", "0"],
    )
    .unwrap();
    assert!(cnt.contains("\"packets\": 1"), "{cnt}");
}

/// The maps the agent replaces entries of while programs read them are allocated per entry: a
/// preallocated hash reuses a replaced element at once, so a program could read half of one
/// endpoint version and half of the next (datapath::decide relies on this, not on a copy).
#[test]
fn maps_replaced_under_the_programs_are_allocated_per_entry() {
    let f = fixture("noprealloc");
    for map in ["np_ep", "np_peer_exact", "np_port_exact"] {
        let path = f.pin_dir().join(map);
        let show = netpol_it::cmd::run(
            "bpftool",
            &["-j", "map", "show", "pinned", &path.to_string_lossy()],
        )
        .unwrap();
        let info: serde_json::Value = serde_json::from_str(&show).unwrap();
        let flags = info["flags"].as_u64().unwrap_or_else(|| panic!("{map}: {show}"));
        const BPF_F_NO_PREALLOC: u64 = 1;
        assert_ne!(
            flags & BPF_F_NO_PREALLOC,
            0,
            "{map} is preallocated (flags {flags:#x}): {show}"
        );
    }
}

#[test]
fn endpoints_beyond_the_counter_slots_are_counted_in_the_hash_map() {
    let mut f = fixture("slots-full");
    // The test interface holds slot 1; other endpoints take the remaining ones.
    for ifindex in 0..COUNTER_SLOTS - 2 {
        f.dp.set_endpoint(100_000 + ifindex, Endpoint { generation: 1, ..Default::default() })
            .unwrap();
    }
    // Forgetting the test interface frees slot 1; the next endpoint takes it.
    f.dp.remove_endpoint(TEST_IFINDEX).unwrap();
    f.dp.forget_counters(TEST_IFINDEX).unwrap();
    f.dp.set_endpoint(99_999, Endpoint { generation: 1, ..Default::default() }).unwrap();
    assert_eq!(f.dp.endpoint(99_999).unwrap().unwrap().counter_slot, 1);
    // Every slot is taken now: the test interface is counted in np_cnt, as exactly as before.
    set_endpoint(&mut f, 2, 0);
    assert_eq!(f.dp.endpoint(TEST_IFINDEX).unwrap().unwrap().counter_slot, NO_COUNTER_SLOT);
    expect(&mut f, TO, Frame::new(v4(ALLOWED), v4(POD), syn(1, 80)), PASS, IN, AllowPolicy);
    expect(&mut f, TO, Frame::new(v4(ALLOWED), v4(POD), ack(1, 80)), PASS, IN, AllowConntrack);
    expect(&mut f, TO, Frame::new(v4(STRANGER), v4(POD), syn(2, 80)), DROP, IN, DenyPolicy);
    let path = f.pin_dir().join("np_cnt");
    let cnt = netpol_it::cmd::run("bpftool", &["map", "dump", "pinned", &path.to_string_lossy()])
        .unwrap();
    assert!(cnt.contains("\"reason\": 2") && cnt.contains("\"reason\": 16"), "{cnt}");
    // Forgetting it deletes those entries and keeps the node's totals.
    f.dp.remove_endpoint(TEST_IFINDEX).unwrap();
    assert_eq!(f.dp.forget_counters(TEST_IFINDEX).unwrap(), 3);
    let after = f.dp.counters().unwrap();
    assert_eq!(after.packets(0, IN, AllowConntrack), 1);
    assert_eq!(after.packets(TEST_IFINDEX, IN, AllowConntrack), 0);
}

#[test]
fn a_reused_counter_slot_starts_from_zero() {
    let mut f = fixture("slot-reuse");
    expect(&mut f, TO, Frame::new(v4(ALLOWED), v4(POD), syn(1, 80)), PASS, IN, AllowPolicy);
    f.dp.remove_endpoint(TEST_IFINDEX).unwrap();
    assert_eq!(f.dp.forget_counters(TEST_IFINDEX).unwrap(), 1);
    // Another interface gets the freed slot, with none of the old interface's counts.
    f.dp.set_endpoint(77, Endpoint { generation: 1, ..Default::default() }).unwrap();
    assert_eq!(f.dp.endpoint(77).unwrap().unwrap().counter_slot, 1);
    let c = f.dp.counters().unwrap();
    assert!(c.by_reason.keys().all(|k| k.ifindex != 77), "{:?}", c.by_reason);
    assert_eq!(c.packets(0, IN, AllowPolicy), 1, "retired into the node's totals");
}

#[test]
fn forgetting_an_interface_deletes_its_counters_and_keeps_the_totals() {
    let mut f = fixture("forget");
    expect(&mut f, TO, Frame::new(v4(ALLOWED), v4(POD), syn(1, 80)), PASS, IN, AllowPolicy);
    expect(&mut f, TO, Frame::new(v4(STRANGER), v4(POD), syn(2, 80)), DROP, IN, DenyPolicy);
    let total = |c: &netpol_agent::dataplane::CounterSnapshot| -> u64 {
        c.by_reason.values().map(|v| v.packets).sum()
    };
    let before = f.dp.counters().unwrap();
    assert_eq!(f.dp.forget_counters(TEST_IFINDEX).unwrap(), 2);
    let after = f.dp.counters().unwrap();
    assert_eq!(total(&after), total(&before), "node totals unchanged");
    assert_eq!(after.packets(0, IN, DenyPolicy), 1, "folded into interface 0");
    assert_eq!(after.packets(TEST_IFINDEX, IN, DenyPolicy), 0, "its own entries are gone");
    let cnt = netpol_it::cmd::run(
        "bpftool",
        &["map", "dump", "pinned", &f.pin_dir().join("np_cnt").to_string_lossy()],
    )
    .unwrap();
    assert!(cnt.trim() == "[]" || cnt.contains("Found 0 elements"), "{cnt}");
}

#[test]
fn maps_pinned_with_another_layout_are_refused_by_name() {
    netpol_it::require_root();
    let (dir, _cleanup) = scratch_pins("layout");
    // np_ep as an earlier build pinned it: 32-byte values, before `counter_slot`.
    let pin = dir.join("np_ep");
    netpol_it::cmd::run(
        "bpftool",
        &[
            "map",
            "create",
            &pin.to_string_lossy(),
            "type",
            "hash",
            "key",
            "4",
            "value",
            "32",
            "entries",
            "16",
            "name",
            "np_ep",
        ],
    )
    .unwrap();
    let opts =
        netpol_agent::dataplane::DataplaneOptions { pin_dir: dir.clone(), ..Default::default() };
    let err = match netpol_agent::dataplane::Dataplane::load(&opts) {
        Ok(_) => panic!("a dataplane loaded over an incompatible np_ep"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&pin.display().to_string())
            && err.contains("value size of 32 bytes")
            && err.contains("needs 36")
            && err.contains("netpol-agent uninstall"),
        "{err}"
    );
}

/// A table of one set: four flows fill it, and a fifth takes the way of the flow seen least
/// recently, not of one refreshed since; the evicted flow's next packet is decided afresh.
#[test]
fn a_full_conntrack_set_evicts_the_flow_seen_least_recently() {
    let mut f = fixture_with_ct("ct-evict", 4);
    assert_eq!(f.dp.conntrack_capacity().unwrap(), 4);
    // The coarse clock moves once per tick (at most 10 ms): a pause orders the flows' times.
    let tick = || std::thread::sleep(std::time::Duration::from_millis(25));
    let tracked = |f: &Fixture| {
        let mut ports: Vec<u16> =
            f.dp.conntrack().unwrap().iter().map(|(k, _)| k.remote_port).collect();
        ports.sort_unstable();
        ports
    };
    for port in 1..=4 {
        expect(&mut f, TO, Frame::new(v4(ALLOWED), v4(POD), syn(port, 80)), PASS, IN, AllowPolicy);
        tick();
    }
    assert_eq!(tracked(&f), [1, 2, 3, 4]);
    // Flow 1's next packet refreshes it: flow 2 is now the least recently seen.
    let ack1 = Frame::new(v4(ALLOWED), v4(POD), ack(1, 80));
    expect(&mut f, TO, ack1, PASS, IN, AllowConntrack);
    tick();
    let evicted = |f: &Fixture| f.dp.counters().unwrap().stats.ct_evicted;
    assert_eq!(evicted(&f), 0, "free ways are not evictions");
    expect(&mut f, TO, Frame::new(v4(ALLOWED), v4(POD), syn(5, 80)), PASS, IN, AllowPolicy);
    assert_eq!(tracked(&f), [1, 3, 4, 5], "flow 2 evicted");
    assert_eq!(evicted(&f), 1);
    // Flow 2 goes on: its next packet is decided by policy and tracked again (over flow 3, now
    // the least recently seen).
    let ack2 = Frame::new(v4(ALLOWED), v4(POD), ack(2, 80));
    expect(&mut f, TO, ack2, PASS, IN, AllowPolicy);
    assert_eq!(tracked(&f), [1, 2, 4, 5], "flow 2 tracked again");
    assert_eq!(evicted(&f), 2);
}

/// Earlier versions pinned conntrack as an LRU hash: the agent replaces that pin with its table
/// (rather than refusing to start, as for other maps of another layout), and enforces.
#[test]
fn a_conntrack_map_of_the_older_layout_is_replaced() {
    let (dir, _cleanup) = scratch_pins("ct-lru");
    let pin = dir.join("np_ct");
    let pin_arg = pin.to_string_lossy();
    let old = ["map", "create", &pin_arg, "type", "lru_hash", "key", "28", "value", "24"];
    netpol_it::cmd::run("bpftool", &[&old[..], &["entries", "64", "name", "np_ct"]].concat())
        .unwrap();
    let opts =
        netpol_agent::dataplane::DataplaneOptions { pin_dir: dir.clone(), ..Default::default() };
    let dp = netpol_agent::dataplane::Dataplane::load(&opts).expect("loads over the old pin");
    let info = aya::maps::MapData::from_pin(&pin).unwrap().info().unwrap();
    assert!(matches!(info.map_type(), Ok(aya::maps::MapType::Array)), "{:?}", info.map_type());
    assert_eq!(dp.conntrack_capacity().unwrap(), netpol_common::maps::CT_MAX as u64);
    assert!(dp.conntrack().unwrap().is_empty());
    // A restart keeps the table it created.
    drop(dp);
    let dp = netpol_agent::dataplane::Dataplane::load(&opts).expect("reloads");
    let again = aya::maps::MapData::from_pin(&pin).unwrap().info().unwrap();
    assert_eq!(again.id(), info.id(), "the same table");
    drop(dp);
}

/// A pin directory of this test process under bpffs, named after `test`, removed when the
/// guard drops (also when the test fails).
fn scratch_pins(test: &str) -> (std::path::PathBuf, netpol_it::agent::RemovePins) {
    let dir =
        std::path::PathBuf::from(format!("/sys/fs/bpf/netpol-test-{}-{test}", std::process::id()));
    let guard = netpol_it::agent::RemovePins(dir.clone());
    std::fs::create_dir_all(&dir).unwrap();
    (dir, guard)
}

/// Pins a map `name` of `kind` (4-byte keys, `value`-byte values, `entries`, map `flags`) in
/// `dir`, as a build of another layout, or a hand, would have left it.
fn pin_map(dir: &std::path::Path, name: &str, kind: &str, value: &str, entries: &str, flags: &str) {
    let pin = dir.join(name).to_string_lossy().into_owned();
    let args = ["map", "create", &pin, "type", kind, "key", "4", "value", value, "entries"];
    let rest = [entries, "name", name, "flags", flags];
    netpol_it::cmd::run("bpftool", &[&args[..], &rest[..]].concat()).unwrap();
}

/// Until the ninth session a set's tags were four 32-bit words: an agent finding such a table
/// pinned replaces both of its maps (rather than refusing to start over the tags' value size).
#[test]
fn a_conntrack_table_with_32_bit_tags_is_replaced() {
    let (dir, _cleanup) = scratch_pins("ct-tags32");
    pin_map(&dir, "np_ct", "array", "256", "1024", "1024");
    pin_map(&dir, "np_ct_tags", "array", "16", "1024", "1024");
    let old_ways = aya::maps::MapData::from_pin(dir.join("np_ct")).unwrap().info().unwrap().id();
    let opts =
        netpol_agent::dataplane::DataplaneOptions { pin_dir: dir.clone(), ..Default::default() };
    let dp = netpol_agent::dataplane::Dataplane::load(&opts).expect("loads over the old pins");
    let tags = aya::maps::MapData::from_pin(dir.join("np_ct_tags")).unwrap().info().unwrap();
    let ways = aya::maps::MapData::from_pin(dir.join("np_ct")).unwrap().info().unwrap();
    assert_eq!(tags.value_size() as usize, size_of::<netpol_common::ct::CtTags>());
    assert_ne!(ways.id(), old_ways, "the ways were replaced with the tags");
    assert_eq!(dp.conntrack_capacity().unwrap(), netpol_common::maps::CT_MAX as u64);
    assert!(dp.conntrack().unwrap().is_empty());
    drop(dp);
}

/// The CLI reading a conntrack table whose two maps were pinned with different sizes (only by
/// hand: the agent replaces such a pair) names both and the way out, instead of misreading it.
#[test]
fn conntrack_maps_of_different_sizes_are_refused_by_the_cli() {
    let (dir, _cleanup) = scratch_pins("ct-sizes");
    pin_map(&dir, "np_ep", "hash", "36", "16", "0");
    pin_map(&dir, "np_ct", "array", "256", "4", "1024");
    pin_map(&dir, "np_ct_tags", "array", "8", "8", "1024");
    let pinned = netpol_agent::dataplane::pinned::PinnedMaps::open(&dir).unwrap();
    let err = match pinned.conntrack() {
        Ok(flows) => panic!("read a mismatched table: {flows:?}"),
        Err(e) => e,
    };
    let mut chain = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        chain = format!("{chain}: {s}");
        source = s.source();
    }
    assert!(
        chain.starts_with("reading the conntrack table")
            && chain.contains("np_ct (4 sets)")
            && chain.contains("np_ct_tags (8 sets)")
            && chain.contains("uninstall"),
        "{chain}"
    );
}

#[test]
fn conntrack_entries_of_a_released_interface_are_collected_at_once() {
    use netpol_agent::dataplane::conntrack::monotonic_ns;
    let mut f = fixture("ct-released");
    expect(&mut f, TO, Frame::new(v4(ALLOWED), v4(POD), syn(1, 80)), PASS, IN, AllowPolicy);
    assert_eq!(f.dp.conntrack().unwrap().len(), 1);
    let timeouts = netpol_common::ct::Timeouts::DEFAULT;
    // Fresh and its interface enforced: kept.
    let stats = f.dp.gc_conntrack(monotonic_ns(), &timeouts).unwrap();
    assert_eq!((stats.deleted, f.dp.conntrack().unwrap().len()), (0, 1), "{stats:?}");
    // Released (the agent detaches, then removes the endpoint entry): collected by the next
    // pass although fresh, so a pod that later gets the same ifindex cannot inherit the flow.
    f.dp.remove_endpoint(TEST_IFINDEX).unwrap();
    let stats = f.dp.gc_conntrack(monotonic_ns(), &timeouts).unwrap();
    assert_eq!((stats.deleted, f.dp.conntrack().unwrap().len()), (1, 0), "{stats:?}");
}

/// The datapath benchmark's new-flow source: each run of a batch through `bench_new_flows`
/// reaches the program in its slot as a new flow (one conntrack entry and one new allowed flow
/// per run), anything but IPv4 TCP is dropped, and an empty slot drops.
#[test]
fn bench_new_flows_makes_every_run_a_new_flow() {
    use netpol_common::maps::{PROG_BENCH_FLOOR, PROG_BENCH_NEW_FLOWS as NEW};
    let mut f = fixture("bench-new-flows");
    let syn80 = Frame::new(v4(ALLOWED), v4(POD), syn(1000, 80)).bytes();
    let (ret, _) = f.dp.test_run(NEW, &syn80, 1).unwrap();
    assert_eq!(ret, DROP, "an empty slot drops");

    f.dp.set_bench_next(TO).unwrap();
    let (ret, _) = f.dp.test_run(NEW, &syn80, 100).unwrap();
    assert_eq!(ret, PASS);
    let mut ports: Vec<u16> =
        f.dp.conntrack().unwrap().iter().map(|(k, _)| k.remote_port).collect();
    ports.sort_unstable();
    assert_eq!(ports, (1001..=1100).collect::<Vec<u16>>(), "one entry per run, ports bumped");
    assert_eq!(f.dp.counters().unwrap().packets(TEST_IFINDEX, IN, AllowPolicy), 100);

    // The floor's runs reach the empty program: no flow opened, nothing counted.
    f.dp.set_bench_next(PROG_BENCH_FLOOR).unwrap();
    let (ret, _) = f.dp.test_run(NEW, &syn80, 100).unwrap();
    assert_eq!(ret, PASS);
    assert_eq!(f.dp.conntrack().unwrap().len(), 100);
    assert_eq!(f.dp.counters().unwrap().packets(TEST_IFINDEX, IN, AllowPolicy), 100);

    // Only IPv4 TCP is bumped and handed on.
    f.dp.set_bench_next(TO).unwrap();
    for frame in [
        Frame::new(v4(ALLOWED), v4(POD), udp(1000, 53)),
        Frame::new(v6(ALLOWED6), v6(POD6), syn(1000, 80)),
    ] {
        let (ret, _) = f.dp.test_run(NEW, &frame.bytes(), 1).unwrap();
        assert_eq!(ret, DROP, "{frame:?}");
    }
    assert_eq!(f.dp.conntrack().unwrap().len(), 100);
}
