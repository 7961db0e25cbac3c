//! The decision for one packet: the established-flow fast path, or endpoint → parse →
//! conntrack → policy → counters and events.
use core::{mem::MaybeUninit, ptr::addr_of_mut};

use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use netpol_common::{
    counters::{Reason, STAT_NO_ENDPOINT},
    ct::{
        tcp_next_state, CtKey, CtValue, FragKey, FragValue, CT_ACTIVE, CT_TCP_ESTABLISHED,
        CT_TCP_SYN_SENT, CT_VERDICT_ALLOW, CT_VERDICT_AUDIT, CT_VERDICT_DENY,
    },
    ep::{Endpoint, EndpointKey, EP_FLAG_AUDIT},
    policy::RULE_NONE,
    DIR_EGRESS, DIR_INGRESS,
};

use crate::{
    addr::{self, Addr},
    clock,
    counters::{count, count_rule, stat},
    ct::{self, NotInserted},
    events::emit,
    fastpath,
    maps::{Scratch, EP_MAP, FRAG_MAP, SCRATCH_MAP},
    parse::{parse, Flow, FlowKind, Packet, PROTO_TCP, PROTO_UDP},
    policy::{evaluate, evaluate_outlined},
};

/// Pass, and let later TC programs (if any) and the stack carry on.
const TC_PASS: i32 = TC_ACT_UNSPEC;
const TC_DROP: i32 = TC_ACT_SHOT;

/// The one fail-open/fail-closed choice: a packet on an interface that carries our programs but
/// has no endpoint entry (the agent is attaching or detaching it) passes. The agent writes the
/// endpoint entry before it attaches and removes it after it detaches, so this is a short window.
const UNKNOWN_ENDPOINT_VERDICT: i32 = TC_PASS;

#[inline(always)]
pub fn handle(ctx: &TcContext, dir: u8) -> i32 {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // Most packets belong to an established flow: the fast path decides and counts them from
    // the conntrack entry and the endpoint's slot, without looking the endpoint up.
    let fast = if dir == DIR_EGRESS {
        fastpath::established::<DIR_EGRESS>(ctx.skb.skb, ifindex)
    } else {
        fastpath::established::<DIR_INGRESS>(ctx.skb.skb, ifindex)
    };
    let reason = match fast {
        Some(reason) => reason,
        None => {
            let Some(ep) = (unsafe { EP_MAP.get(EndpointKey { ifindex }) }) else {
                stat(STAT_NO_ENDPOINT);
                return UNKNOWN_ENDPOINT_VERDICT;
            };
            let slot = ep.counter_slot;
            let reason = decide(ctx.skb.skb, ifindex, dir, ep);
            count(slot, ifindex, dir, reason, ctx.len());
            reason
        }
    };
    #[cfg(feature = "upgrade-variant")]
    if let Some(v) = crate::maps::VARIANT_MAP.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot, written only by this CPU.
        unsafe { *v += 1 };
    }
    if reason.is_drop() {
        TC_DROP
    } else {
        TC_PASS
    }
}

/// The general path: parses any frame and decides it from conntrack and the policy maps.
///
/// Inlined into the programs, with the parser, `decide_flow` and the policy lookups: a call
/// to a BPF subprogram and its return (through the kernel's return thunk on this class of
/// machine) measured ~13 ns each, and a new flow took four of them. One frame then holds all
/// of it, which fits BPF's 512 bytes of stack because the `Flow`, the conntrack key and a new
/// flow's entry live in this CPU's scratch entry. Only ICMP errors call a subprogram, for
/// their policy lookups ([`decide_icmp_error`]): the deepest chain of frames, the program's and
/// that one's, must stay within 512 bytes (336 + 52 when this was written).
#[inline(always)]
fn decide(skb: *mut __sk_buff, ifindex: u32, dir: u8, ep: &Endpoint) -> Reason {
    // One version of the entry, however the agent updates it meanwhile: `np_ep` is allocated
    // per entry, and a replaced element is freed only after an RCU grace period.
    // Never missing (index 0 of a one-entry array); the verifier wants the check.
    let Some(scratch) = SCRATCH_MAP.get_ptr_mut(0) else {
        return Reason::DenyMalformed;
    };
    // SAFETY: this CPU's entry, used by this invocation alone (see `SCRATCH_MAP`).
    let scratch = unsafe { &mut *scratch };
    scratch.flow = Flow::EMPTY;
    let flow = &mut scratch.flow;
    match parse(skb, flow) {
        Packet::Malformed => Reason::DenyMalformed,
        Packet::Control => Reason::AllowNonIp,
        Packet::Ip => match flow.kind {
            FlowKind::Normal => decide_flow(ifindex, dir, ep, scratch),
            FlowKind::Fragment => decide_fragment(ifindex, flow),
            FlowKind::IcmpError => decide_icmp_error(ifindex, dir, ep, scratch),
        },
    }
}

/// Writes to `k` the conntrack key of a packet seen in direction `dir`, oriented from the pod's
/// side, field by field (no key built on the stack and copied).
///
/// # Safety
/// `k` must be valid for writes of a `CtKey`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn write_ct_key(
    k: *mut CtKey,
    ifindex: u32,
    dir: u8,
    src: &Addr,
    dst: &Addr,
    sport: u16,
    dport: u16,
    proto: u8,
) {
    let (remote, ports) =
        if dir == DIR_EGRESS { (dst, (sport, dport)) } else { (src, (dport, sport)) };
    // SAFETY: pointers to the fields of a key the caller lets us write.
    unsafe {
        addr_of_mut!((*k).ifindex).write(ifindex);
        addr_of_mut!((*k).local_port).write(ports.0);
        addr_of_mut!((*k).remote_port).write(ports.1);
        addr::write(addr_of_mut!((*k).remote_addr), remote);
        write_proto_and_pad(addr_of_mut!((*k).proto), proto);
    }
}

/// Writes `proto` and the three zero padding bytes after it as one word. (Written as a
/// `[0; 3]` field, the padding costs a call to `memset` on the BPF target.)
///
/// # Safety
/// `at` must point at a 4-byte aligned `proto` field followed by three padding bytes, as in
/// `CtKey` and `FragKey`.
#[inline(always)]
unsafe fn write_proto_and_pad(at: *mut u8, proto: u8) {
    // The layouts that promise makes: `proto` word-aligned and last, three bytes before the end.
    const _: () = assert!(
        core::mem::offset_of!(CtKey, proto) % 4 == 0
            && core::mem::offset_of!(CtKey, proto) + 4 == core::mem::size_of::<CtKey>()
            && core::mem::offset_of!(FragKey, proto) % 4 == 0
            && core::mem::offset_of!(FragKey, proto) + 4 == core::mem::size_of::<FragKey>()
    );
    unsafe { (at as *mut u32).write(u32::from_ne_bytes([proto, 0, 0, 0])) }
}

/// Destination port of a connection opened in direction `origin`: the peer's port for egress,
/// the pod's own port for ingress.
#[inline(always)]
fn service_port(key: &CtKey, origin: u8) -> u16 {
    if origin == DIR_EGRESS {
        key.remote_port
    } else {
        key.local_port
    }
}

/// The conntrack key and a new flow's entry are built in this CPU's scratch entry, beside the
/// parsed `Flow`, rather than on the stack (see [`decide`]).
///
/// A TCP SYN (without ACK) nearly always opens a new connection, so it is decided by policy
/// before conntrack is consulted, and a new flow searches its conntrack set once, not twice:
/// - allowed, its entry is inserted only if its key is not there yet: the insert searches the
///   set as a lookup would (`crate::ct::insert`). Only if the key is there (a retransmitted SYN,
///   or a new connection on a finished flow's ports) is the entry looked up, and decided as
///   below;
/// - denied, it is dropped without touching conntrack. A flow's first SYN would only have
///   missed there, on a set no packet touched (a cache miss: a stream of such SYNs cost ~250 ns
///   each with the lookup, ~100 ns without, in `bench datapath`, when conntrack was the
///   kernel's LRU hash). A SYN the policy
///   denies although its flow is tracked is dropped too: a retransmission under a policy that
///   now denies it (the flow's next packet cuts the entry), or, in a simultaneous open, the SYN
///   of the side the policy does not let open the connection. TCP completes the handshake
///   without that SYN: each side answers the other's SYN with a SYN-ACK, which conntrack passes.
#[inline(always)]
fn decide_flow(ifindex: u32, dir: u8, ep: &Endpoint, scratch: &mut Scratch) -> Reason {
    let Scratch { flow, ct_key: key, ct_value: value, .. } = scratch;
    // SAFETY: `key` is a valid, exclusive reference.
    unsafe {
        write_ct_key(key, ifindex, dir, &flow.src, &flow.dst, flow.sport, flow.dport, flow.proto)
    };
    let key = &*key;
    let audit = ep.flags & EP_FLAG_AUDIT != 0;

    let syn = flow.proto == PROTO_TCP && flow.initiates;
    // One call site each for `new_flow` and `track`, however a packet reaches them: each is
    // inlined, and a second copy would double its share of the programs' instructions.
    let mut ct = if syn { None } else { ct::lookup(ct::words(key)) };
    let mut reopen = None;
    if ct.is_none() {
        match new_flow(ifindex, dir, ep, flow, key, value, audit, !syn) {
            Opened::Decided(reason) => return reason,
            Opened::Exists(reason) => {
                // A retransmitted SYN of a connection being opened keeps its entry. A SYN on the
                // 4-tuple of a finished or cut flow is a new connection reusing the ports (Linux
                // reuses ephemeral ports): decided afresh, not by the old flow's verdict.
                ct = ct::lookup(ct::words(key))
                    .filter(|&c| unsafe { (*c).state } == CT_TCP_SYN_SENT);
                reopen = Some(reason);
            }
        }
    }
    if let Some(ct) = ct {
        return track(ifindex, dir, ep, flow, key, unsafe { &mut *ct }, audit);
    }
    // A SYN whose key held another flow (or whose entry was evicted since the insert found it):
    // its entry, prepared in `value`, replaces the old one.
    let Some(reason) = reopen else {
        return Reason::DenyConntrackFull;
    };
    if ct::insert(ct::words(key), value, true).is_err() {
        return Reason::DenyConntrackFull;
    }
    opened(ifindex, dir, ep, flow, value, reason)
}

/// A packet of a tracked flow.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn track(
    ifindex: u32,
    dir: u8,
    ep: &Endpoint,
    flow: &Flow,
    key: &CtKey,
    ct: &mut CtValue,
    audit: bool,
) -> Reason {
    if ct.generation != ep.generation {
        // The endpoint's policy changed since this flow was decided: check it again in the
        // orientation it was opened, so a policy change cuts established connections.
        let d = evaluate(ep, ct.origin, addr::remote(key), key.proto, service_port(key, ct.origin));
        let cut = ct.verdict != CT_VERDICT_DENY;
        ct.verdict = if d.allow {
            CT_VERDICT_ALLOW
        } else if audit {
            CT_VERDICT_AUDIT
        } else {
            // Keep a tombstone rather than deleting the entry: the flow's retransmissions
            // would otherwise look untracked and be picked up again by the reverse check.
            if cut {
                emit(ifindex, dir, ep.generation, d.rule_id, Reason::DenyPolicyChanged, flow);
            }
            CT_VERDICT_DENY
        };
        ct.generation = ep.generation;
        ct.rule_id = d.rule_id;
    }
    // The fast path validates the entry through this slot (an entry written before conntrack
    // recorded slots holds 0, and a re-bound endpoint may hold another slot).
    ct.slot = ep.counter_slot as u16;
    clock::refresh(ct);
    if ct.verdict == CT_VERDICT_DENY {
        return Reason::DenyPolicyChanged;
    }
    if flow.proto == PROTO_TCP {
        ct.state = tcp_next_state(ct.state, flow.tcp_flags, ct.origin != dir);
    }
    if flow.first_fragment {
        remember_fragment(ifindex, flow, ct.last_seen_ns);
    }
    if ct.verdict == CT_VERDICT_AUDIT {
        Reason::Audit
    } else {
        Reason::AllowConntrack
    }
}

/// What [`new_flow`] came to.
enum Opened {
    /// The packet's verdict: its flow's entry is written, or it is dropped.
    Decided(Reason),
    /// The verdict of a new flow whose entry, prepared in the scratch value, was not written:
    /// an insert without replacement (a SYN's) found the key there.
    Exists(Reason),
}

/// A packet conntrack does not know (or a new connection reusing a finished flow's ports): a new
/// flow, or one whose tracking started late (agent restart, eviction). Its entry is written
/// over an entry of the same key only if `replace` (not for a SYN not looked up yet, see
/// [`decide_flow`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn new_flow(
    ifindex: u32,
    dir: u8,
    ep: &Endpoint,
    flow: &Flow,
    key: &CtKey,
    value: &mut CtValue,
    audit: bool,
    replace: bool,
) -> Opened {
    let remote = addr::remote(key);
    let fwd = evaluate(ep, dir, remote, key.proto, service_port(key, dir));
    let (origin, rule_id, verdict, reason) = if fwd.allow {
        let reason = if fwd.policed { Reason::AllowPolicy } else { Reason::AllowUnpoliced };
        (dir, fwd.rule_id, CT_VERDICT_ALLOW, reason)
    } else {
        // Mid-flow pickup: a packet that cannot open a connection (TCP without SYN, SCTP without
        // INIT, ICMP echo reply) passes if the connection is allowed the other way round. UDP
        // cannot tell, so the reverse orientation counts only when a rule explicitly allows it
        // (a DNS reply to a pod whose egress allows DNS), never merely because the reverse
        // direction is unpoliced (that would void every ingress-only policy for UDP) or because
        // no rule of a cluster tier matched it (a Baseline set that misses allows, with no rule:
        // a pod's UDP to a denied Service address would pass as a "reply" from that address).
        let rev_dir = dir ^ 1;
        let rev = if !flow.initiates || flow.proto == PROTO_UDP {
            let d = evaluate(ep, rev_dir, remote, key.proto, service_port(key, rev_dir));
            d.allow && (flow.proto != PROTO_UDP || (d.policed && d.rule_id != RULE_NONE))
        } else {
            false
        };
        if rev {
            (rev_dir, 0, CT_VERDICT_ALLOW, Reason::AllowConntrack)
        } else if audit {
            (dir, fwd.rule_id, CT_VERDICT_AUDIT, Reason::Audit)
        } else {
            emit(ifindex, dir, ep.generation, fwd.rule_id, Reason::DenyPolicy, flow);
            return Opened::Decided(Reason::DenyPolicy);
        }
    };

    let state = if flow.proto != PROTO_TCP {
        CT_ACTIVE
    } else if flow.initiates {
        CT_TCP_SYN_SENT
    } else {
        CT_TCP_ESTABLISHED
    };
    // Read only for a flow that will be tracked: a clock helper call, and every call costs (a
    // denied flow reads the clock once, in `emit`). The coarse clock (CLOCK_MONOTONIC_COARSE,
    // one tick of resolution): conntrack only needs idle times in seconds, and the precise
    // clock costs ~30 ns per packet in a VM (read_tsc under kvm-clock). It lags
    // CLOCK_MONOTONIC, which the agent's garbage collection reads, by at most a tick: entries
    // look at most that much older.
    let now = clock::now_ns();
    *value = CtValue {
        last_seen_ns: now,
        generation: ep.generation,
        rule_id,
        origin,
        state,
        verdict,
        _pad0: 0,
        slot: ep.counter_slot as u16,
        tick: clock::tick(),
    };
    match ct::insert(ct::words(key), value, replace) {
        Ok(()) => Opened::Decided(opened(ifindex, dir, ep, flow, value, reason)),
        Err(NotInserted::Exists) => Opened::Exists(reason),
        Err(NotInserted::NoSet) => Opened::Decided(Reason::DenyConntrackFull),
    }
}

/// What follows the insert of a new flow's entry `value`, whose packets get `reason`.
#[inline(always)]
fn opened(
    ifindex: u32,
    dir: u8,
    ep: &Endpoint,
    flow: &Flow,
    value: &CtValue,
    reason: Reason,
) -> Reason {
    count_rule(value.rule_id, 1);
    if reason == Reason::Audit {
        emit(ifindex, dir, ep.generation, value.rule_id, Reason::Audit, flow);
    }
    if flow.first_fragment {
        remember_fragment(ifindex, flow, value.last_seen_ns);
    }
    reason
}

#[inline(always)]
fn frag_key(ifindex: u32, flow: &Flow) -> FragKey {
    let mut key = MaybeUninit::<FragKey>::uninit();
    let k = key.as_mut_ptr();
    // SAFETY: every byte of the key is written below, as in `ct_key`.
    unsafe {
        addr_of_mut!((*k).ifindex).write(ifindex);
        addr_of_mut!((*k).id).write(flow.frag_id);
        addr::write(addr_of_mut!((*k).src_addr), &flow.src);
        addr::write(addr_of_mut!((*k).dst_addr), &flow.dst);
        write_proto_and_pad(addr_of_mut!((*k).proto), flow.frag_proto);
        key.assume_init()
    }
}

#[inline(always)]
fn remember_fragment(ifindex: u32, flow: &Flow, now: u64) {
    let _ = FRAG_MAP.insert(frag_key(ifindex, flow), FragValue { first_seen_ns: now }, 0);
}

/// Non-first fragments carry no ports: they follow their first fragment, or are dropped.
#[inline(always)]
fn decide_fragment(ifindex: u32, flow: &Flow) -> Reason {
    if FRAG_MAP.get_ptr(frag_key(ifindex, flow)).is_some() {
        Reason::AllowConntrack
    } else {
        Reason::DenyFragment
    }
}

/// ICMP errors pass if they concern a tracked flow of this endpoint; others are ordinary ICMP.
/// Their policy lookups are BPF subprograms, rare enough to pay for the calls: inlined, three
/// more copies of them would not fit the programs' frame (see [`decide`]).
#[inline(always)]
fn decide_icmp_error(ifindex: u32, dir: u8, ep: &Endpoint, scratch: &mut Scratch) -> Reason {
    let Scratch { flow, ct_key: key, .. } = scratch;
    // The offending packet travelled the other way through this interface.
    let t = &flow.inner;
    // SAFETY: `key` is a valid, exclusive reference.
    unsafe { write_ct_key(key, ifindex, dir ^ 1, &t.src, &t.dst, t.sport, t.dport, t.proto) };
    if ct::tracked_unless_cut(ct::words(key)) {
        return Reason::AllowConntrack;
    }
    let remote = if dir == DIR_EGRESS { &flow.dst } else { &flow.src };
    let d = evaluate_outlined(ep, dir, remote, flow.proto, 0);
    if d.allow {
        if d.policed {
            Reason::AllowPolicy
        } else {
            Reason::AllowUnpoliced
        }
    } else if ep.flags & EP_FLAG_AUDIT != 0 {
        Reason::Audit
    } else {
        emit(ifindex, dir, ep.generation, d.rule_id, Reason::DenyPolicy, flow);
        Reason::DenyPolicy
    }
}
