//! Map names (the kernel keeps at most 15 characters), sizes and pin locations.
//!
//! Every map is pinned under [`PIN_DIR`]; the `v1` in the path is the layout version, so a future
//! incompatible layout is installed beside this one and migrated explicitly.

/// Directory of the pinned maps, programs and links.
pub const PIN_ROOT: &str = "/sys/fs/bpf/netpol";
/// Directory of this layout version's pinned maps.
pub const PIN_DIR: &str = "/sys/fs/bpf/netpol/v1";

/// HASH ifindex → [`crate::ep::Endpoint`].
pub const EP: &str = "np_ep";
/// LPM (set id, remote address prefix) → port-set id: the peer-set entries shorter than a full
/// address (ipBlocks, their `except` holes).
pub const PEER: &str = "np_peer";
/// HASH (set id, remote address) → port-set id: the full-length peer-set entries (pods).
pub const PEER_EXACT: &str = "np_peer_exact";
/// LPM (port-set id, protocol, port prefix) → action and rule id: the port-set entries shorter
/// than a full key (any protocol, any port, `endPort` range blocks).
pub const PORTS: &str = "np_ports";
/// HASH (port-set id, protocol, port) → action and rule id: the full-length port-set entries.
pub const PORT_EXACT: &str = "np_port_exact";
/// ARRAY (mmapable) set index → [`crate::ct::CtSet`]: the conntrack table, [`crate::ct::CT_WAYS`]
/// flows per set.
pub const CT: &str = "np_ct";
/// ARRAY (mmapable) set index → [`crate::ct::CtTags`]: which ways of [`CT`] hold which flows.
pub const CT_TAGS: &str = "np_ct_tags";
/// LRU HASH [`crate::ct::FragKey`] → [`crate::ct::FragValue`]: datagrams whose first fragment passed.
pub const FRAG: &str = "np_frag";
/// PERCPU HASH (ifindex, direction, reason) → packets and bytes, of endpoints without a counter
/// slot.
pub const COUNTERS: &str = "np_cnt";
/// PERCPU ARRAY [`crate::counters::slot_counter_index`] → packets and bytes: the counters of
/// endpoints with a counter slot (all of them, up to [`crate::counters::COUNTER_SLOTS`]).
pub const SLOT_COUNTERS: &str = "np_cnt_slot";
/// ARRAY slot → [`crate::ep::SlotOwner`]: which interface holds each endpoint slot, and its
/// endpoint generation (for the established-flow fast path).
pub const SLOT: &str = "np_slot";
/// PERCPU HASH rule id → packets and bytes of the new flows it decided.
pub const RULE_COUNTERS: &str = "np_rule_cnt";
/// PERCPU ARRAY of global statistics (`STAT_*`).
pub const STATS: &str = "np_stats";
/// RINGBUF of [`crate::event::DenyEvent`].
pub const EVENTS: &str = "np_events";
/// PERCPU ARRAY token bucket of the event rate limit.
pub const EVENT_RATE: &str = "np_ev_rate";
/// ARRAY[1] of [`crate::event::Config`].
pub const CONFIG: &str = "np_cfg";

/// Every pinned map, for inspection and uninstall.
pub const ALL: [&str; 16] = [
    EP,
    SLOT,
    PEER,
    PEER_EXACT,
    PORTS,
    PORT_EXACT,
    CT,
    CT_TAGS,
    FRAG,
    COUNTERS,
    SLOT_COUNTERS,
    RULE_COUNTERS,
    STATS,
    EVENTS,
    EVENT_RATE,
    CONFIG,
];

/// Capacity of [`EP`]: pods per node.
pub const EP_MAX: usize = 16_384;
/// Capacity of [`PEER`].
pub const PEER_MAX: usize = 1 << 20;
/// Capacity of [`PEER_EXACT`].
pub const PEER_EXACT_MAX: usize = 1 << 20;
/// Capacity of [`PORTS`].
pub const PORTS_MAX: usize = 1 << 18;
/// Capacity of [`PORT_EXACT`].
pub const PORT_EXACT_MAX: usize = 1 << 18;
/// Default capacity of [`CT`] in flows (the agent can override it at load time); the map has
/// `CT_MAX / CT_WAYS` sets.
pub const CT_MAX: usize = 1 << 19;
/// Capacity of [`FRAG`].
pub const FRAG_MAX: usize = 1 << 14;
/// Capacity of [`COUNTERS`].
pub const COUNTERS_MAX: usize = 1 << 16;
/// Capacity of [`RULE_COUNTERS`].
pub const RULE_COUNTERS_MAX: usize = 1 << 16;
/// Size of [`EVENTS`] in bytes.
pub const EVENTS_BYTES: usize = 1 << 18;

/// Name of the program attached at TC ingress of the host-side interface (pod egress policy).
pub const PROG_FROM_POD: &str = "from_pod";
/// Name of the program attached at TC egress of the host-side interface (pod ingress policy).
pub const PROG_TO_POD: &str = "to_pod";
/// Name of the empty program measured as the floor by the datapath benchmark (never attached).
pub const PROG_BENCH_FLOOR: &str = "bench_floor";
/// Name of the datapath benchmark's source of new flows (never attached): bumps each packet's
/// TCP source port and tail-calls the program in slot 0 of [`BENCH_NEXT`].
pub const PROG_BENCH_NEW_FLOWS: &str = "bench_new_flows";
/// A one-slot PROG_ARRAY: where `bench_new_flows` hands its packets (not pinned; set by the
/// benchmark).
pub const BENCH_NEXT: &str = "np_bench_next";
