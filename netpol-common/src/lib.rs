//! Types shared by netpol's kernel programs and its user-space agent.
//!
//! Every map key and value is `#[repr(C)]`, has explicit padding fields and a size locked by a
//! compile-time assertion, so both sides agree byte for byte and `bpftool map dump` shows the
//! field names (the maps are BTF-typed). Pure helpers that touch no map live here too, so they are
//! unit-tested on the host (`cargo test -p netpol-common`).
#![no_std]
#![deny(missing_docs)]

pub mod counters;
pub mod ct;
pub mod ep;
pub mod event;
pub mod maps;
pub mod policy;

/// Packets entering the pod (checked at TC egress of the host-side interface): its ingress policy.
pub const DIR_INGRESS: u8 = 0;
/// Packets leaving the pod (checked at TC ingress of the host-side interface): its egress policy.
pub const DIR_EGRESS: u8 = 1;

/// The name of a direction as used in metrics labels and CLI output.
pub const fn direction_name(dir: u8) -> &'static str {
    match dir {
        DIR_INGRESS => "ingress",
        DIR_EGRESS => "egress",
        _ => "unknown",
    }
}

/// Turns an IPv4 address into the IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) used in every key, so
/// one map serves both families.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    // Assembled from words: written byte by byte, the BPF target zeroes the first ten bytes
    // with a call to `memset` (a BPF-to-BPF call per address on the general path).
    let words: [u32; 4] =
        [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), u32::from_ne_bytes(octets)];
    // SAFETY: arrays of plain integers of the same size; every bit pattern is valid.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
}

/// Bits before the IPv4 part of an IPv4-mapped address.
pub const V4_MAPPED_PREFIX_BITS: u32 = 96;

#[cfg(feature = "user")]
mod pod_impls {
    //! `aya::Pod` marks types as plain old data for user-space map access. Sound because every
    //! type below is `#[repr(C)]`, `Copy`, and has no implicit padding (asserted next to each).
    use crate::{counters::*, ct::*, ep::*, event::*, policy::*};
    macro_rules! pod {
        ($($t:ty),* $(,)?) => { $(unsafe impl aya::Pod for $t {})* };
    }
    pod!(
        EndpointKey,
        Endpoint,
        SlotOwner,
        PeerData,
        PeerValue,
        PortData,
        PortValue,
        CtKey,
        CtValue,
        CtWay,
        CtSet,
        CtTags,
        FragKey,
        FragValue,
        CounterKey,
        CounterValue,
        RuleCounterKey,
        DenyEvent,
        Config,
        RateState,
    );
}
