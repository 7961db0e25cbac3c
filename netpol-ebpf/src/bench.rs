//! The datapath benchmark's source of new flows (`cargo xtask bench datapath`); never attached.
//!
//! `BPF_PROG_TEST_RUN` runs a program `repeat` times on one packet, so a batch of the real
//! program sees one flow: after the first run it is established. `bench_new_flows` makes every
//! run a new flow: it bumps the TCP source port of the frame in place (the test run keeps the
//! packet between runs) and tail-calls the program the benchmark put in slot 0 of
//! `np_bench_next`: `to_pod`, or `bench_floor` for the floor of the same harness. A batch then
//! measures a stream of new flows the way the other packet kinds are measured, instead of one
//! packet per syscall.
use aya_ebpf::{
    bindings::TC_ACT_SHOT, btf_maps::ProgramArray, macros::btf_map, programs::TcContext,
};

use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::parse::{at, bounds, ETH_P_IP, PROTO_TCP};

/// Slot 0: the program each packet goes on to, written by the benchmark before each batch.
#[btf_map(name = "np_bench_next")]
pub static BENCH_NEXT: ProgramArray<1> = ProgramArray::new();

const ETH_LEN: usize = EthHdr::LEN;
/// End of the TCP source port in an IPv4 frame without options.
const SPORT_END: usize = ETH_LEN + Ipv4Hdr::LEN + 2;

/// Bumps the source port of an Ethernet + IPv4 (20-byte header) + TCP frame and hands it on.
/// Anything else is dropped: the benchmark only sends such frames, and a drop fails its check.
#[inline(always)]
pub fn new_flows(ctx: &TcContext) -> i32 {
    let (start, end) = bounds(ctx);
    if start + SPORT_END > end {
        return TC_ACT_SHOT;
    }
    // SAFETY: each access lies below `start + SPORT_END`, checked against `end` above.
    unsafe {
        let ethertype = u16::from_be(at(start + 12));
        let vihl: u8 = at(start + ETH_LEN);
        let proto: u8 = at(start + ETH_LEN + 9);
        if ethertype != ETH_P_IP || vihl != 0x45 || proto != PROTO_TCP {
            return TC_ACT_SHOT;
        }
        // Aligned for a u16 in the verifier's model of packet data (see `at`).
        let sport: u16 = at(start + SPORT_END - 2);
        let bumped = u16::from_be(sport).wrapping_add(1).to_be();
        core::ptr::write((start + SPORT_END - 2) as *mut u16, bumped);
        BENCH_NEXT.tail_call(ctx, 0);
    }
    // The slot is empty: the benchmark checks the verdict and stops.
    TC_ACT_SHOT
}
