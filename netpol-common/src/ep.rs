//! The endpoint map: which policy sets apply to the pod behind an interface.

/// Key of [`crate::maps::EP`]: the ifindex of a pod's host-side interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    /// Interface index in the host network namespace.
    pub ifindex: u32,
}

/// Set id meaning "no policy of this tier applies in this direction".
///
/// For the NetworkPolicy tier this is the Kubernetes notion of a pod that is not isolated: every
/// packet is allowed by that tier. An isolated pod whose policies allow nothing points at a set id
/// that has no entries, so every lookup misses and the default deny applies.
pub const SET_NONE: u32 = 0;

/// Would-be drops of this endpoint pass and are counted and reported as `audit`.
pub const EP_FLAG_AUDIT: u32 = 1;

/// Lowest bit of the peer sets' lookup skip bits in [`Endpoint::flags`]: two per set
/// ([`crate::policy::SKIP_EXACT`], [`crate::policy::SKIP_TRIE`]), in the order ingress Admin,
/// NetworkPolicy, Baseline, then egress. Peer sets never change under their id, so the bits
/// change only with the set ids beside them, in the same map update.
pub const EP_PEER_SKIPS_SHIFT: u32 = 8;

/// Value of [`crate::maps::EP`]: written by the agent, read by both programs for every packet.
///
/// The agent replaces the whole value in one map update when a pod's rules change, so a packet
/// sees either the old or the new sets, never a mix. `generation` changes with every such update;
/// conntrack entries decided under another generation are re-evaluated.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Bumped on every change of this endpoint's sets or flags.
    pub generation: u32,
    /// [`EP_FLAG_AUDIT`], and the peer sets' lookup skip bits from [`EP_PEER_SKIPS_SHIFT`].
    pub flags: u32,
    /// Admin-tier set for traffic entering the pod ([`SET_NONE`] if none).
    pub ingress_admin: u32,
    /// NetworkPolicy set for traffic entering the pod ([`SET_NONE`]: not isolated).
    pub ingress_np: u32,
    /// Baseline-tier set for traffic entering the pod ([`SET_NONE`] if none).
    pub ingress_baseline: u32,
    /// Admin-tier set for traffic leaving the pod.
    pub egress_admin: u32,
    /// NetworkPolicy set for traffic leaving the pod ([`SET_NONE`]: not isolated).
    pub egress_np: u32,
    /// Baseline-tier set for traffic leaving the pod.
    pub egress_baseline: u32,
    /// This endpoint's slot, assigned by the agent's dataplane (not the compiler) for as long
    /// as the interface is enforced: its block of counters in [`crate::maps::SLOT_COUNTERS`]
    /// and its [`SlotOwner`] entry in [`crate::maps::SLOT`].
    /// [`crate::counters::NO_COUNTER_SLOT`]: counted in [`crate::maps::COUNTERS`] instead, and
    /// every packet takes the general path.
    pub counter_slot: u32,
}
const _: () = assert!(core::mem::size_of::<Endpoint>() == 36);
// Conntrack entries record the slot in 16 bits.
const _: () = assert!(crate::counters::COUNTER_SLOTS <= 1 << 16);

/// Value of [`crate::maps::SLOT`] at an endpoint's slot: which interface holds the slot and
/// the generation of its endpoint entry, written by the agent together with that entry.
///
/// It lets the established-flow fast path validate a conntrack hit with an indexed array load
/// (inlined by the verifier) instead of a hash lookup of the endpoint by ifindex, which cost
/// about a third of the path. A free slot is all zeros, so no conntrack entry matches it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotOwner {
    /// Interface that holds the slot; 0: free.
    pub ifindex: u32,
    /// [`Endpoint::generation`] of that interface's entry.
    pub generation: u32,
}
const _: () = assert!(core::mem::size_of::<SlotOwner>() == 8);

/// Which tier a set belongs to; index into [`Endpoint::sets`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// ClusterNetworkPolicy Admin tier (AdminNetworkPolicy), evaluated first.
    Admin = 0,
    /// Namespaced NetworkPolicy.
    NetworkPolicy = 1,
    /// ClusterNetworkPolicy Baseline tier (BaselineAdminNetworkPolicy), evaluated last.
    Baseline = 2,
}

impl Endpoint {
    /// The three set ids of one direction, in evaluation order (admin, netpol, baseline).
    #[inline(always)]
    pub const fn sets(&self, dir: u8) -> [u32; 3] {
        if dir == crate::DIR_INGRESS {
            [self.ingress_admin, self.ingress_np, self.ingress_baseline]
        } else {
            [self.egress_admin, self.egress_np, self.egress_baseline]
        }
    }

    /// The lookup skip bits of the three peer sets of one direction, in evaluation order.
    #[inline(always)]
    pub const fn peer_skips(&self, dir: u8) -> [u32; 3] {
        let base = Self::skips_shift(dir, 0);
        [(self.flags >> base) & 3, (self.flags >> (base + 2)) & 3, (self.flags >> (base + 4)) & 3]
    }

    /// Sets the lookup skip bits of one tier's peer set and direction.
    pub fn set_peer_skips(&mut self, dir: u8, tier: Tier, skips: u32) {
        let shift = Self::skips_shift(dir, tier as u32);
        self.flags = (self.flags & !(3 << shift)) | (skips & 3) << shift;
    }

    #[inline(always)]
    const fn skips_shift(dir: u8, tier: u32) -> u32 {
        EP_PEER_SKIPS_SHIFT + if dir == crate::DIR_INGRESS { 0 } else { 6 } + 2 * tier
    }

    /// Sets the id of one tier and direction.
    pub fn set_tier(&mut self, dir: u8, tier: Tier, id: u32) {
        let slot = match (dir == crate::DIR_INGRESS, tier) {
            (true, Tier::Admin) => &mut self.ingress_admin,
            (true, Tier::NetworkPolicy) => &mut self.ingress_np,
            (true, Tier::Baseline) => &mut self.ingress_baseline,
            (false, Tier::Admin) => &mut self.egress_admin,
            (false, Tier::NetworkPolicy) => &mut self.egress_np,
            (false, Tier::Baseline) => &mut self.egress_baseline,
        };
        *slot = id;
    }
}
