//! A loaded dataplane with private pins, for BPF_PROG_TEST_RUN tests and benchmarks.
use std::path::PathBuf;

use netpol_agent::dataplane::{remove_pins, CounterSnapshot, Dataplane, DataplaneOptions};
use netpol_common::{
    counters::{CounterKey, Reason},
    policy::{
        for_each_port_prefix, PeerData, PeerValue, PortData, PortValue, ACTION_ALLOW,
        PEER_SET_BITS, PORT_ANY_PORT_BITS, PORT_ANY_PROTO_BITS,
    },
    v4_mapped,
};

use crate::packet::Frame;

/// `skb->ifindex` under BPF_PROG_TEST_RUN: the loopback device.
pub const TEST_IFINDEX: u32 = 1;
/// Program return value for "pass" (TC_ACT_UNSPEC).
pub const PASS: i32 = -1;
/// Program return value for "drop" (TC_ACT_SHOT).
pub const DROP: i32 = 2;

/// A dataplane whose maps are pinned in a directory of its own, removed on drop.
pub struct Fixture {
    pub dp: Dataplane,
    pin_dir: PathBuf,
}

impl Fixture {
    /// Loads the programs with private pins named after `test`.
    pub fn new(test: &str) -> Fixture {
        Fixture::with_options(
            test,
            DataplaneOptions { events_per_sec: 1000, events_burst: 1000, ..Default::default() },
        )
    }

    /// Loads the programs with `opts` (its pin directory is replaced by a private one).
    pub fn with_options(test: &str, mut opts: DataplaneOptions) -> Fixture {
        crate::require_root();
        let pin_dir =
            PathBuf::from(format!("/sys/fs/bpf/netpol-test-{}-{test}", std::process::id()));
        let _ = remove_pins(&pin_dir);
        opts.pin_dir = pin_dir.clone();
        let dp = match Dataplane::load(&opts) {
            Ok(dp) => dp,
            Err(e) => {
                // Maps pinned before the failure would otherwise outlive the test.
                let _ = remove_pins(&pin_dir);
                panic!("loading the eBPF programs: {e:?}");
            }
        };
        Fixture { dp, pin_dir }
    }

    /// Runs `program` on `frame`; returns the verdict and the one reason counted for it.
    pub fn run(&mut self, program: &'static str, frame: &[u8]) -> (i32, Option<(u8, Reason)>) {
        let before = self.dp.counters().expect("counters");
        let (ret, _) = self.dp.test_run(program, frame, 1).expect("test run");
        let after = self.dp.counters().expect("counters");
        (ret, counted(&before, &after))
    }

    /// The directory of the pinned maps.
    pub fn pin_dir(&self) -> &std::path::Path {
        &self.pin_dir
    }

    /// Runs a [`Frame`].
    pub fn run_frame(
        &mut self,
        program: &'static str,
        frame: &Frame,
    ) -> (i32, Option<(u8, Reason)>) {
        self.run(program, &frame.bytes())
    }

    /// Adds a peer prefix (IPv4 or IPv6 CIDR) to a set, pointing at a port set.
    pub fn peer(&mut self, set_id: u32, cidr: &str, portset_id: u32) {
        // No skip bits: the port set may hold any mix of entries.
        self.peer_with_skips(set_id, cidr, portset_id, 0)
    }

    /// [`Fixture::peer`] with the port set's lookup skip bits (`policy::SKIP_*`).
    pub fn peer_with_skips(&mut self, set_id: u32, cidr: &str, portset_id: u32, skips: u32) {
        let (addr, len) = cidr.split_once('/').unwrap_or((cidr, ""));
        let ip: std::net::IpAddr = addr.parse().expect("address");
        let (bytes, bits) = match ip {
            std::net::IpAddr::V4(a) => (v4_mapped(a.octets()), 96 + len.parse().unwrap_or(32)),
            std::net::IpAddr::V6(a) => (a.octets(), len.parse().unwrap_or(128)),
        };
        self.dp
            .upsert_peer(
                PEER_SET_BITS + bits,
                PeerData { set_id, addr: bytes },
                PeerValue { portset_id, flags: skips },
            )
            .expect("peer entry");
    }

    /// Allows `proto` ports `lo..=hi` in a port set (proto 0: every protocol and port).
    pub fn ports(&mut self, portset_id: u32, proto: u8, lo: u16, hi: u16, rule_id: u32) {
        let value = PortValue { rule_id, action: ACTION_ALLOW, _pad: [0; 3] };
        self.port_entries(portset_id, proto, lo, hi, |dp, bits, data| {
            dp.upsert_port(bits, data, value).expect("port entry")
        });
    }

    /// Removes what [`Fixture::ports`] added for the same arguments.
    pub fn remove_ports(&mut self, portset_id: u32, proto: u8, lo: u16, hi: u16) {
        self.port_entries(portset_id, proto, lo, hi, |dp, bits, data| {
            dp.remove_port(bits, data).expect("removing port entry")
        });
    }

    /// Calls `f` with every port-map key that encodes `proto` ports `lo..=hi`.
    fn port_entries(
        &mut self,
        portset_id: u32,
        proto: u8,
        lo: u16,
        hi: u16,
        mut f: impl FnMut(&mut Dataplane, u32, PortData),
    ) {
        let dp = &mut self.dp;
        for_each_port_key(proto, lo, hi, |bits, proto, port| {
            f(dp, bits, PortData { portset_id, proto, port: port.to_be_bytes(), _pad: 0 })
        });
    }
}

/// Calls `f(prefix_len, proto, first_port)` for every port-map key that encodes `proto` ports
/// `lo..=hi` (proto 0: every protocol and port), as [`Fixture::ports`] writes them.
pub fn for_each_port_key(proto: u8, lo: u16, hi: u16, mut f: impl FnMut(u32, u8, u16)) {
    if proto == 0 {
        f(PORT_ANY_PROTO_BITS, 0, 0);
    } else if lo == 0 && hi == u16::MAX {
        f(PORT_ANY_PORT_BITS, proto, 0);
    } else {
        for_each_port_prefix(lo, hi, |p, bits| f(PORT_ANY_PORT_BITS + bits, proto, p));
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = remove_pins(&self.pin_dir);
    }
}

/// The (direction, reason) whose packet count grew between two snapshots, if exactly one did.
pub fn counted(before: &CounterSnapshot, after: &CounterSnapshot) -> Option<(u8, Reason)> {
    let grown: Vec<&CounterKey> = after
        .by_reason
        .iter()
        .filter(|(k, v)| before.by_reason.get(k).map_or(0, |b| b.packets) < v.packets)
        .map(|(k, _)| k)
        .collect();
    match grown.as_slice() {
        [k] => Some((k.direction, Reason::from_u8(k.reason)?)),
        _ => None,
    }
}
