//! Per-CPU packet and byte counters, keyed by endpoint, direction and reason.

/// Why a packet passed or was dropped. Every path through the programs ends in exactly one reason.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// A new flow allowed by a rule.
    AllowPolicy = 1,
    /// A packet of a tracked, allowed flow (either orientation).
    AllowConntrack = 2,
    /// No policy selects the endpoint in this direction.
    AllowUnpoliced = 3,
    /// Not IP (ARP, LLDP) or IPv6 neighbour discovery: never policed.
    AllowNonIp = 4,
    /// Would have been denied; passed because the endpoint is in audit mode.
    Audit = 5,
    /// No rule allows the flow.
    DenyPolicy = 16,
    /// A tracked flow that the current policy no longer allows (policy changed).
    DenyPolicyChanged = 17,
    /// Truncated or inconsistent headers.
    DenyMalformed = 18,
    /// A non-first IP fragment of a flow that is not tracked.
    DenyFragment = 19,
    /// The conntrack entry could not be created (the table evicts instead of filling up: only
    /// a table whose size the programs were not told can refuse one).
    DenyConntrackFull = 20,
}

impl Reason {
    /// Every reason, for iteration in user space.
    pub const ALL: [Reason; 10] = [
        Reason::AllowPolicy,
        Reason::AllowConntrack,
        Reason::AllowUnpoliced,
        Reason::AllowNonIp,
        Reason::Audit,
        Reason::DenyPolicy,
        Reason::DenyPolicyChanged,
        Reason::DenyMalformed,
        Reason::DenyFragment,
        Reason::DenyConntrackFull,
    ];

    /// `true` if packets with this reason are dropped.
    pub const fn is_drop(self) -> bool {
        (self as u8) >= 16
    }

    /// The label value used in metrics and CLI output.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::AllowPolicy => "policy_allow",
            Reason::AllowConntrack => "conntrack",
            Reason::AllowUnpoliced => "unpoliced",
            Reason::AllowNonIp => "non_ip",
            Reason::Audit => "audit",
            Reason::DenyPolicy => "policy_deny",
            Reason::DenyPolicyChanged => "policy_changed",
            Reason::DenyMalformed => "malformed",
            Reason::DenyFragment => "fragment",
            Reason::DenyConntrackFull => "conntrack_full",
        }
    }

    /// Position in [`Reason::ALL`]: the reason's counter within a direction's block of
    /// [`crate::maps::SLOT_COUNTERS`].
    pub const fn index(self) -> u32 {
        match self {
            Reason::AllowPolicy => 0,
            Reason::AllowConntrack => 1,
            Reason::AllowUnpoliced => 2,
            Reason::AllowNonIp => 3,
            Reason::Audit => 4,
            Reason::DenyPolicy => 5,
            Reason::DenyPolicyChanged => 6,
            Reason::DenyMalformed => 7,
            Reason::DenyFragment => 8,
            Reason::DenyConntrackFull => 9,
        }
    }

    /// The reason with this numeric value.
    pub const fn from_u8(v: u8) -> Option<Reason> {
        let mut i = 0;
        while i < Self::ALL.len() {
            if Self::ALL[i] as u8 == v {
                return Some(Self::ALL[i]);
            }
            i += 1;
        }
        None
    }
}

/// Key of [`crate::maps::COUNTERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    /// Host-side interface of the endpoint.
    pub ifindex: u32,
    /// `DIR_INGRESS` or `DIR_EGRESS`.
    pub direction: u8,
    /// A [`Reason`] as `u8`.
    pub reason: u8,
    /// Always zero.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CounterKey>() == 8);

/// Endpoints whose counters live in [`crate::maps::SLOT_COUNTERS`] (per-CPU array: one indexed
/// load per packet) rather than in [`crate::maps::COUNTERS`] (per-CPU hash: a hash lookup per
/// packet, ~25 ns). Slot 0 is never assigned; an endpoint beyond this many, on a node with more
/// pods than any kubelet runs, falls back to the hash map.
pub const COUNTER_SLOTS: u32 = 2048;
/// [`Endpoint::counter_slot`](crate::ep::Endpoint::counter_slot) of an endpoint counted in
/// [`crate::maps::COUNTERS`].
pub const NO_COUNTER_SLOT: u32 = 0;
/// Counters per slot: one per direction and [`Reason`].
pub const COUNTERS_PER_SLOT: u32 = 2 * Reason::ALL.len() as u32;

/// Index in [`crate::maps::SLOT_COUNTERS`] of the counter of `reason` in direction `dir` for the
/// endpoint in `slot`.
#[inline(always)]
pub const fn slot_counter_index(slot: u32, dir: u8, reason: Reason) -> u32 {
    slot * COUNTERS_PER_SLOT + (dir as u32 & 1) * Reason::ALL.len() as u32 + reason.index()
}

/// Value of [`crate::maps::COUNTERS`] and [`crate::maps::RULE_COUNTERS`] (one per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CounterValue {
    /// Packets.
    pub packets: u64,
    /// Bytes (length of the packet as seen by TC, link-layer header included).
    pub bytes: u64,
}

/// Key of [`crate::maps::RULE_COUNTERS`]: new flows decided by a rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleCounterKey {
    /// The rule id from [`crate::policy::PortValue`].
    pub rule_id: u32,
}

/// Index in [`crate::maps::STATS`]: events written to the ring buffer.
pub const STAT_EVENTS_SENT: u32 = 0;
/// Index in [`crate::maps::STATS`]: events lost because the ring buffer was full.
pub const STAT_EVENTS_LOST: u32 = 1;
/// Index in [`crate::maps::STATS`]: events suppressed by the rate limit.
pub const STAT_EVENTS_RATE_LIMITED: u32 = 2;
/// Index in [`crate::maps::STATS`]: packets on an interface that has no endpoint entry.
pub const STAT_NO_ENDPOINT: u32 = 3;
/// Index in [`crate::maps::STATS`]: conntrack entries a new flow took over because their set was
/// full (each the least recently seen flow of its set).
pub const STAT_CT_EVICTED: u32 = 4;
/// Number of slots in [`crate::maps::STATS`].
pub const STAT_SLOTS: u32 = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_and_classify() {
        for (i, r) in Reason::ALL.into_iter().enumerate() {
            assert_eq!(Reason::from_u8(r as u8), Some(r));
            assert_eq!(r.index() as usize, i);
        }
        assert_eq!(Reason::from_u8(0), None);
        assert!(Reason::DenyMalformed.is_drop());
        assert!(!Reason::Audit.is_drop());
    }

    #[test]
    fn slot_counter_indices_are_distinct_and_in_range() {
        // no_std: a fixed array instead of a set.
        let mut seen = [u32::MAX; 3 * COUNTERS_PER_SLOT as usize];
        let mut n = 0;
        for slot in [1, 2, COUNTER_SLOTS - 1] {
            for dir in [crate::DIR_INGRESS, crate::DIR_EGRESS] {
                for r in Reason::ALL {
                    let i = slot_counter_index(slot, dir, r);
                    assert!(i < COUNTER_SLOTS * COUNTERS_PER_SLOT);
                    assert!(!seen[..n].contains(&i), "{slot} {dir} {r:?}");
                    seen[n] = i;
                    n += 1;
                }
            }
        }
    }
}
