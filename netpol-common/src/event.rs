//! Deny (and audit) events sent to user space through the ring buffer, and the program config.

/// One event in [`crate::maps::EVENTS`], emitted for the first packet of a denied (or audited)
/// flow, subject to a per-CPU token bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyEvent {
    /// `bpf_ktime_get_ns()`.
    pub timestamp_ns: u64,
    /// Host-side interface of the endpoint.
    pub ifindex: u32,
    /// Endpoint generation in force.
    pub generation: u32,
    /// Deciding rule ([`crate::policy::RULE_NONE`] for a default deny).
    pub rule_id: u32,
    /// Source port (host byte order).
    pub src_port: u16,
    /// Destination port (host byte order).
    pub dst_port: u16,
    /// Source address (IPv4-mapped for IPv4).
    pub src_addr: [u8; 16],
    /// Destination address.
    pub dst_addr: [u8; 16],
    /// IP protocol number.
    pub proto: u8,
    /// `DIR_INGRESS` or `DIR_EGRESS`.
    pub direction: u8,
    /// A [`crate::counters::Reason`] as `u8`.
    pub reason: u8,
    /// Always zero.
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<DenyEvent>() == 64);

/// Program settings in [`crate::maps::CONFIG`] (one slot), written by the agent at start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Events per second allowed per CPU (0 disables events).
    pub events_per_sec: u32,
    /// Burst size of the per-CPU token bucket.
    pub events_burst: u32,
}

/// Per-CPU token bucket state in [`crate::maps::EVENT_RATE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    /// Tokens available, scaled by 1e9 (token-nanoseconds) to avoid divisions in the kernel.
    pub tokens: u64,
    /// Time of the last refill.
    pub last_ns: u64,
}
