//! Deny and audit events: reads the `np_events` ring buffer and logs one structured `tracing`
//! event per [`DenyEvent`], naming the pod, the peer pod and the policy involved.
//!
//! The kernel emits an event for the first packet of a denied (or, on an audit endpoint, a
//! would-be denied) flow, behind a per-CPU token bucket; events it could not send are counted in
//! `np_stats` and exported by the metrics (`netpol_events_lost_total`), not here.
//!
//! Every event is logged at `warn` with target [`TARGET`] and these fields: `verdict` (`deny` or
//! `audit`), `reason` (the counter reason's name), `direction` (`ingress`: entering the pod),
//! `pod` (`namespace/name` of the endpoint, or `ifindex:N` if unknown), `peer` (`namespace/name`
//! when the remote address belongs to a known pod), `src`, `dst`, `proto`, `policy` and `rule`
//! (the deciding rule, when there is one), `isolated_by` (for a default deny: the policies that
//! isolate the pod in that direction) and `generation`. With `--log-json` each event is one JSON
//! line.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv6Addr},
    sync::Arc,
};

use aya::maps::{MapData, RingBuf};
use netpol_common::{counters::Reason, direction_name, event::DenyEvent, policy::RULE_NONE};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::watch,
};

use crate::{
    compile::RuleOrigin,
    model::{ClusterState, Direction, PodRef, PolicyRef},
};

/// `tracing` target of deny and audit events.
pub const TARGET: &str = "netpol::deny";

/// Errors of the event reader.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// Registering or polling the ring buffer's file descriptor failed.
    #[error("polling the event ring buffer")]
    Poll(#[source] std::io::Error),
}

/// What the event reader needs to name things, published by the sync loop after every change
/// of the enforced state (see [`Names::new`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    /// Enforced local pods by host-side ifindex.
    pub endpoints: BTreeMap<u32, PodRef>,
    /// In-scope pods by address (local or not), for the peer's name.
    pub pods_by_ip: HashMap<IpAddr, PodRef>,
    /// Rule id → origin.
    pub rules: BTreeMap<u32, RuleOrigin>,
    /// Per enforced pod and direction: the policies that isolate it (sorted).
    pub isolating: BTreeMap<(PodRef, Direction), Vec<PolicyRef>>,
}

impl Names {
    /// Names for the pods in `endpoints` (ifindex → pod), the pods and policies of `state` and
    /// the rule origins in `rules`.
    pub fn new(
        endpoints: BTreeMap<u32, PodRef>,
        state: &ClusterState,
        rules: BTreeMap<u32, RuleOrigin>,
    ) -> Self {
        let pods_by_ip = state
            .pods
            .values()
            .filter(|p| p.in_scope())
            .flat_map(|p| p.ips.iter().map(move |ip| (*ip, p.key())))
            .collect();
        let mut isolating = BTreeMap::new();
        for pod in endpoints.values() {
            let Some(p) = state.pods.get(pod) else { continue };
            for dir in Direction::ALL {
                let pols: Vec<PolicyRef> = state
                    .policies
                    .values()
                    .filter(|n| n.namespace == p.namespace)
                    .filter(|n| n.affects(dir) && n.pod_selector.matches(&p.labels))
                    .map(|n| n.key())
                    .collect();
                if !pols.is_empty() {
                    isolating.insert((pod.clone(), dir), pols);
                }
            }
        }
        Names { endpoints, pods_by_ip, rules, isolating }
    }
}

/// One event, decoded and named: the fields of the log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DenyRecord {
    /// `"deny"`, or `"audit"` for a would-be drop that passed on an audit endpoint.
    pub verdict: &'static str,
    /// The reason's name (`policy_deny`, `policy_changed`, `audit`, ...).
    pub reason: &'static str,
    /// `"ingress"` (entering the pod) or `"egress"` (leaving it).
    pub direction: &'static str,
    /// The endpoint's pod (`namespace/name`), or `ifindex:N` if no enforced pod has it.
    pub pod: String,
    /// The remote pod, when the remote address belongs to a known pod.
    pub peer: Option<String>,
    /// Source address.
    pub src_addr: IpAddr,
    /// Source port (0 without ports).
    pub src_port: u16,
    /// Destination address.
    pub dst_addr: IpAddr,
    /// Destination port (0 without ports).
    pub dst_port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// The policy of the deciding rule (`namespace/name`), if a rule decided.
    pub policy: Option<String>,
    /// The deciding rule (`ingress[0]`, `node-to-pod`), if one decided.
    pub rule: Option<String>,
    /// For a decision without a rule (default deny): the policies isolating the pod in this
    /// direction, comma-separated.
    pub isolated_by: Option<String>,
    /// Endpoint generation in force.
    pub generation: u32,
}

fn addr(bytes: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(bytes).to_canonical()
}

/// Decodes one ring-buffer record (`None` if it is too short).
pub fn decode(bytes: &[u8]) -> Option<DenyEvent> {
    if bytes.len() < std::mem::size_of::<DenyEvent>() {
        return None;
    }
    // SAFETY: the length is checked above and DenyEvent is plain old data (`#[repr(C)]`,
    // integers and byte arrays only, every bit pattern valid); the read tolerates misalignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DenyEvent>()) })
}

/// Names the parts of `ev` with `names`.
pub fn describe(ev: &DenyEvent, names: &Names) -> DenyRecord {
    let reason = Reason::from_u8(ev.reason);
    let (src_addr, dst_addr) = (addr(ev.src_addr), addr(ev.dst_addr));
    let dir = if ev.direction == netpol_common::DIR_INGRESS {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    // Entering the pod, the remote end is the source; leaving it, the destination.
    let remote = if dir == Direction::Ingress { src_addr } else { dst_addr };
    let pod = names.endpoints.get(&ev.ifindex);
    let origin = (ev.rule_id != RULE_NONE).then(|| names.rules.get(&ev.rule_id)).flatten();
    let (policy, rule) = match origin {
        Some(RuleOrigin::Policy { policy, direction, index, .. }) => {
            (Some(policy.to_string()), Some(format!("{direction}[{index}]")))
        }
        Some(RuleOrigin::NodeToPod) => (None, Some("node-to-pod".to_string())),
        Some(RuleOrigin::Service { service, protocol, port }) => {
            (Some(format!("Service {service}")), Some(format!("port {port}/{protocol}")))
        }
        None if ev.rule_id != RULE_NONE => (None, Some(format!("id:{}", ev.rule_id))),
        None => (None, None),
    };
    let isolated_by = (ev.rule_id == RULE_NONE)
        .then(|| pod.and_then(|p| names.isolating.get(&(p.clone(), dir))))
        .flatten()
        .map(|v| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(","));
    DenyRecord {
        verdict: if reason == Some(Reason::Audit) { "audit" } else { "deny" },
        reason: reason.map_or("unknown", Reason::name),
        direction: direction_name(ev.direction),
        pod: pod.map_or_else(|| format!("ifindex:{}", ev.ifindex), ToString::to_string),
        peer: names.pods_by_ip.get(&remote).map(ToString::to_string),
        src_addr,
        src_port: ev.src_port,
        dst_addr,
        dst_port: ev.dst_port,
        proto: ev.proto,
        policy,
        rule,
        isolated_by,
        generation: ev.generation,
    }
}

/// Logs `r` at `warn` with target [`TARGET`].
pub fn log(r: &DenyRecord) {
    tracing::warn!(
        target: TARGET,
        verdict = r.verdict,
        reason = r.reason,
        direction = r.direction,
        pod = %r.pod,
        peer = r.peer.as_deref(),
        src = %std::net::SocketAddr::new(r.src_addr, r.src_port),
        dst = %std::net::SocketAddr::new(r.dst_addr, r.dst_port),
        proto = r.proto,
        policy = r.policy.as_deref(),
        rule = r.rule.as_deref(),
        isolated_by = r.isolated_by.as_deref(),
        generation = r.generation,
        "{}",
        if r.verdict == "audit" { "would deny (audit)" } else { "denied" }
    );
}

/// Reads `ring` until an error, logging every event with the latest `names`.
pub async fn run(
    ring: RingBuf<MapData>,
    names: watch::Receiver<Arc<Names>>,
) -> Result<(), EventsError> {
    // SAFETY: the ring buffer owns its map's file descriptor, which stays open and unchanged
    // until the `RingBuf` is dropped, and the `AsyncFd` owns the `RingBuf`.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| EventsError::Poll(e.into()))?;
    loop {
        let mut guard = fd.readable_mut().await.map_err(EventsError::Poll)?;
        let current = names.borrow().clone();
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            match decode(&item) {
                Some(ev) => log(&describe(&ev, &current)),
                None => tracing::debug!(len = item.len(), "short record in the event ring buffer"),
            }
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::build::{namespace, pod, policy, rule, sel, state};
    use crate::model::Tier;
    use netpol_common::{DIR_EGRESS, DIR_INGRESS};

    fn mapped(ip: &str) -> [u8; 16] {
        match ip.parse::<IpAddr>().unwrap() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        }
    }

    fn event(dir: u8, reason: Reason, rule_id: u32, src: &str, dst: &str) -> DenyEvent {
        DenyEvent {
            timestamp_ns: 1,
            ifindex: 7,
            generation: 3,
            rule_id,
            src_port: 40000,
            dst_port: 80,
            src_addr: mapped(src),
            dst_addr: mapped(dst),
            proto: 6,
            direction: dir,
            reason: reason as u8,
            _pad: [0; 5],
        }
    }

    fn names() -> Names {
        let s = state(
            vec![namespace("prod", &[])],
            vec![
                pod("back", "prod").label("app", "back").ip("10.0.0.2"),
                pod("front", "prod").label("app", "front").ip("10.0.0.1"),
                pod("remote", "prod").ip("10.0.9.9").node(Some("other-node")),
            ],
            vec![
                policy("deny-all", "prod"),
                policy("allow-front", "prod").select(sel(&[("app", "back")])).ingress(rule().peer(
                    crate::model::Peer::Pods {
                        namespace_selector: None,
                        pod_selector: Some(sel(&[("app", "front")])),
                    },
                )),
            ],
        );
        let rules = BTreeMap::from([(
            42,
            RuleOrigin::Policy {
                tier: Tier::NetworkPolicy,
                policy: PolicyRef::new("prod", "allow-front"),
                direction: Direction::Ingress,
                index: 0,
            },
        )]);
        Names::new(BTreeMap::from([(7, PodRef::new("prod", "back"))]), &s, rules)
    }

    #[test]
    fn decode_round_trips_and_rejects_short_records() {
        let ev = event(DIR_INGRESS, Reason::DenyPolicy, 0, "10.0.0.1", "10.0.0.2");
        // SAFETY: DenyEvent is plain old data of 64 bytes.
        let bytes: [u8; 64] = unsafe { std::mem::transmute(ev) };
        assert_eq!(decode(&bytes), Some(ev));
        assert_eq!(decode(&bytes[..63]), None);
    }

    #[test]
    fn records_name_pods_policies_and_verdicts() {
        let n = names();
        let cases = [
            (
                "default deny entering back from front",
                event(DIR_INGRESS, Reason::DenyPolicy, RULE_NONE, "10.0.0.1", "10.0.0.2"),
                ("deny", "policy_deny", "ingress", "prod/back", Some("prod/front")),
                (None, None, Some("prod/allow-front,prod/deny-all")),
            ),
            (
                "audit of a would-be drop",
                event(DIR_INGRESS, Reason::Audit, RULE_NONE, "10.0.9.9", "10.0.0.2"),
                ("audit", "audit", "ingress", "prod/back", Some("prod/remote")),
                (None, None, Some("prod/allow-front,prod/deny-all")),
            ),
            (
                "egress to an address of no pod; back is not egress-isolated",
                event(DIR_EGRESS, Reason::DenyPolicyChanged, RULE_NONE, "10.0.0.2", "1.2.3.4"),
                ("deny", "policy_changed", "egress", "prod/back", None),
                (None, None, None),
            ),
            (
                "a deciding rule names its policy",
                event(DIR_INGRESS, Reason::DenyPolicyChanged, 42, "10.0.0.1", "10.0.0.2"),
                ("deny", "policy_changed", "ingress", "prod/back", Some("prod/front")),
                (Some("prod/allow-front"), Some("ingress[0]"), None),
            ),
        ];
        for (what, ev, (verdict, reason, direction, pod, peer), (policy, rule, isolated)) in cases {
            let r = describe(&ev, &n);
            assert_eq!(
                (r.verdict, r.reason, r.direction, r.pod.as_str(), r.peer.as_deref()),
                (verdict, reason, direction, pod, peer),
                "{what}"
            );
            assert_eq!(
                (r.policy.as_deref(), r.rule.as_deref(), r.isolated_by.as_deref()),
                (policy, rule, isolated),
                "{what}"
            );
            assert_eq!((r.src_port, r.dst_port, r.proto, r.generation), (40000, 80, 6, 3));
        }
    }

    #[test]
    fn unknown_endpoint_rule_and_v4_addresses() {
        let mut ev = event(DIR_INGRESS, Reason::DenyPolicy, 9999, "10.0.0.1", "fd00::2");
        ev.ifindex = 99;
        let r = describe(&ev, &names());
        assert_eq!(r.pod, "ifindex:99");
        assert_eq!(r.rule.as_deref(), Some("id:9999"));
        assert_eq!(r.src_addr, "10.0.0.1".parse::<IpAddr>().unwrap(), "IPv4-mapped → IPv4");
        assert_eq!(r.dst_addr, "fd00::2".parse::<IpAddr>().unwrap());
        assert_eq!(r.isolated_by, None, "a rule decided");
    }
}
