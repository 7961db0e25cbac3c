//! netpol's TC programs. One pair serves every pod: `from_pod` at TC ingress of the pod's
//! host-side interface (packets leaving the pod: its egress policy) and `to_pod` at TC egress
//! (packets entering the pod: its ingress policy). Each finds its endpoint by ifindex.
#![no_std]
#![no_main]
// Map keys are passed by reference on purpose: a by-value `impl Borrow<K>` argument may copy a
// 44-byte conntrack key onto the 512-byte BPF stack.
#![allow(clippy::needless_borrows_for_generic_args)]

mod addr;
mod bench;
mod clock;
mod counters;
mod ct;
mod datapath;
mod events;
mod fastpath;
mod flowcache;
mod maps;
mod parse;
mod policy;

use aya_ebpf::{macros::classifier, programs::TcContext};
use netpol_common::{DIR_EGRESS, DIR_INGRESS};

// `inline(always)` reaches the function the macro wraps: without it, LLVM left the body (the
// whole datapath, inlined) in a subprogram of its own, a call on every packet.
#[classifier]
#[inline(always)]
pub fn from_pod(ctx: TcContext) -> i32 {
    datapath::handle(&ctx, DIR_EGRESS)
}

#[classifier]
#[inline(always)]
pub fn to_pod(ctx: TcContext) -> i32 {
    datapath::handle(&ctx, DIR_INGRESS)
}

/// An empty classifier, never attached: the floor that `cargo xtask bench datapath` measures in
/// the same run as the real programs, so their cost is reported as a ratio on this machine.
#[classifier]
pub fn bench_floor(_ctx: TcContext) -> i32 {
    aya_ebpf::bindings::TC_ACT_UNSPEC
}

/// Never attached: the benchmark's stream of new flows into `to_pod` or `bench_floor` (see
/// `bench`).
#[classifier]
pub fn bench_new_flows(ctx: TcContext) -> i32 {
    bench::new_flows(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
