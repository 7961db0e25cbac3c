//! Kernel counters: the last [`CounterSnapshot`], aggregated into the exported label sets and
//! written out at scrape time by a [`Collector`].
//!
//! The values are the kernel's own cumulative counters, never deltas: a key that is absent from
//! the counter map has counted nothing yet (the datapath only creates keys; user space deletes
//! only those of released interfaces, after folding them into interface 0 — see
//! `Dataplane::forget_counters`), so filling the known label combinations with zero is exact.

use std::{
    collections::BTreeMap,
    sync::{Arc, PoisonError, RwLock},
};

use netpol_common::{
    counters::{CounterValue, Reason},
    direction_name, DIR_EGRESS, DIR_INGRESS,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, MetricType},
    registry::Registry,
};

use crate::dataplane::{CounterSnapshot, Stats};

/// The pod behind one host-side interface.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    /// Namespace of the pod.
    pub namespace: String,
    /// Name of the pod.
    pub name: String,
}

/// Which pod each ifindex belongs to, for the optional `namespace`/`pod` labels. Interfaces
/// without an entry (not yet matched to a pod, or already gone) are labelled with empty values,
/// which Prometheus treats as "label absent", so their drops are still counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointLabels {
    pods: BTreeMap<u32, PodRef>,
}

impl EndpointLabels {
    /// No interfaces known.
    pub fn new() -> Self {
        Self::default()
    }

    /// Names the pod behind `ifindex`, replacing any previous entry.
    pub fn insert(&mut self, ifindex: u32, namespace: impl Into<String>, name: impl Into<String>) {
        self.pods.insert(ifindex, PodRef { namespace: namespace.into(), name: name.into() });
    }

    /// The pod behind `ifindex`, if known.
    pub fn get(&self, ifindex: u32) -> Option<&PodRef> {
        self.pods.get(&ifindex)
    }

    /// Number of interfaces with a known pod.
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// `true` if no interface has a known pod.
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }
}

impl FromIterator<(u32, PodRef)> for EndpointLabels {
    fn from_iter<I: IntoIterator<Item = (u32, PodRef)>>(iter: I) -> Self {
        EndpointLabels { pods: iter.into_iter().collect() }
    }
}

/// Reason label for counter keys whose reason code this agent does not know (a newer eBPF object
/// than the agent). They are still classified with the kernel's own rule, so nothing is lost.
const UNKNOWN_REASON: &str = "unknown";

/// Mirrors `Reason::is_drop` for raw codes: drop reasons are numbered from 16.
const FIRST_DROP_CODE: u8 = 16;

const DIRECTIONS: [u8; 2] = [DIR_INGRESS, DIR_EGRESS];

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
struct DropLabels {
    direction: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
struct PodDropLabels {
    direction: &'static str,
    reason: &'static str,
    namespace: String,
    pod: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
struct VerdictLabels {
    direction: &'static str,
    verdict: &'static str,
}

/// Drop counters keyed by the label set in use (the shape depends on `per_pod_labels`).
#[derive(Debug)]
enum Drops {
    Node(BTreeMap<DropLabels, CounterValue>),
    PerPod(BTreeMap<PodDropLabels, CounterValue>),
}

/// One snapshot, already aggregated into exported series, so a scrape only formats numbers.
#[derive(Debug)]
struct View {
    drops: Drops,
    forward: BTreeMap<DirectionLabels, CounterValue>,
    verdicts: BTreeMap<VerdictLabels, u64>,
    stats: Stats,
}

/// Policy verdict of a reason, for `policy_verdicts_total`: only reasons that are a policy
/// decision about a new (or re-evaluated) flow. `policy_changed` is a deny decided by the
/// current policy for a flow the previous policy allowed.
fn verdict(reason: Reason) -> Option<&'static str> {
    match reason {
        Reason::AllowPolicy => Some("allow"),
        Reason::DenyPolicy | Reason::DenyPolicyChanged => Some("deny"),
        Reason::Audit => Some("audit"),
        Reason::AllowConntrack
        | Reason::AllowUnpoliced
        | Reason::AllowNonIp
        | Reason::DenyMalformed
        | Reason::DenyFragment
        | Reason::DenyConntrackFull => None,
    }
}

const VERDICTS: [&str; 3] = ["allow", "deny", "audit"];

/// Adds `v` into `acc`. Saturating: a u64 of packets or bytes does not overflow in practice, and
/// saturating keeps a corrupt map value from panicking the agent.
fn add(acc: &mut CounterValue, v: &CounterValue) {
    acc.packets = acc.packets.saturating_add(v.packets);
    acc.bytes = acc.bytes.saturating_add(v.bytes);
}

impl View {
    fn build(snapshot: &CounterSnapshot, endpoints: &EndpointLabels, per_pod: bool) -> View {
        let mut node_drops = BTreeMap::new();
        let mut pod_drops = BTreeMap::new();
        let mut forward = BTreeMap::new();
        let mut verdicts: BTreeMap<VerdictLabels, u64> = BTreeMap::new();
        // Every fixed series exists from the first snapshot on, with zero where nothing was
        // counted, so `rate()` and alerts work before the first drop.
        for dir in DIRECTIONS {
            let direction = direction_name(dir);
            forward.insert(DirectionLabels { direction }, CounterValue::default());
            for verdict in VERDICTS {
                verdicts.insert(VerdictLabels { direction, verdict }, 0);
            }
            if !per_pod {
                for reason in Reason::ALL.into_iter().filter(|r| r.is_drop()) {
                    node_drops.insert(
                        DropLabels { direction, reason: reason.name() },
                        CounterValue::default(),
                    );
                }
            }
        }
        for (key, value) in &snapshot.by_reason {
            let direction = direction_name(key.direction);
            let known = Reason::from_u8(key.reason);
            let is_drop = known.map_or(key.reason >= FIRST_DROP_CODE, Reason::is_drop);
            if !is_drop {
                add(forward.entry(DirectionLabels { direction }).or_default(), value);
            }
            if let Some(verdict) = known.and_then(verdict) {
                let n = verdicts.entry(VerdictLabels { direction, verdict }).or_default();
                *n = (*n).saturating_add(value.packets);
            }
            if !is_drop {
                continue;
            }
            let reason = known.map_or(UNKNOWN_REASON, Reason::name);
            if per_pod {
                let pod = endpoints.get(key.ifindex).cloned().unwrap_or_default();
                let labels =
                    PodDropLabels { direction, reason, namespace: pod.namespace, pod: pod.name };
                add(pod_drops.entry(labels).or_default(), value);
            } else {
                add(node_drops.entry(DropLabels { direction, reason }).or_default(), value);
            }
        }
        let drops = if per_pod { Drops::PerPod(pod_drops) } else { Drops::Node(node_drops) };
        View { drops, forward, verdicts, stats: snapshot.stats }
    }
}

/// Holds the latest aggregated snapshot; registered as a collector.
#[derive(Debug)]
pub(super) struct KernelCollector {
    per_pod: bool,
    /// `None` until the first snapshot: until then the kernel's values are unknown, and exporting
    /// zeros would make the first real (possibly large, the maps outlive the agent) value look
    /// like an increase.
    view: RwLock<Option<Arc<View>>>,
}

impl KernelCollector {
    pub(super) fn new(per_pod: bool) -> Self {
        KernelCollector { per_pod, view: RwLock::new(None) }
    }

    pub(super) fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(Box::new(Arc::clone(self)));
    }

    pub(super) fn set(&self, snapshot: &CounterSnapshot, endpoints: &EndpointLabels) {
        let view = Arc::new(View::build(snapshot, endpoints, self.per_pod));
        // A poisoned lock only means a writer panicked between taking the lock and storing an
        // `Arc`, which cannot leave a half-written view behind: recover instead of panicking.
        *self.view.write().unwrap_or_else(PoisonError::into_inner) = Some(view);
    }

    fn current(&self) -> Option<Arc<View>> {
        self.view.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// Writes one counter family: `name` gets the `_total` suffix from the encoder.
/// The drop packet and byte families of one label kind (node-level or per pod).
fn drop_families<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    m: &BTreeMap<L, CounterValue>,
) -> Result<(), std::fmt::Error> {
    counter_family(encoder, "drop_count", DROP_COUNT_HELP, m.iter().map(|(l, v)| (l, v.packets)))?;
    counter_family(encoder, "drop_bytes", DROP_BYTES_HELP, m.iter().map(|(l, v)| (l, v.bytes)))
}

fn counter_family<'a, L: EncodeLabelSet + 'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl Iterator<Item = (&'a L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(metric)
}

const DROP_COUNT_HELP: &str = "Packets dropped by the datapath, by direction and reason.";
const DROP_BYTES_HELP: &str = "Bytes of packets dropped by the datapath, by direction and reason.";

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(view) = self.current() else { return Ok(()) };
        match &view.drops {
            Drops::Node(m) => drop_families(&mut encoder, m)?,
            Drops::PerPod(m) => drop_families(&mut encoder, m)?,
        }
        counter_family(
            &mut encoder,
            "forward_count",
            "Packets passed by the datapath (every non-drop reason), by direction.",
            view.forward.iter().map(|(l, v)| (l, v.packets)),
        )?;
        counter_family(
            &mut encoder,
            "forward_bytes",
            "Bytes of packets passed by the datapath (every non-drop reason), by direction.",
            view.forward.iter().map(|(l, v)| (l, v.bytes)),
        )?;
        counter_family(
            &mut encoder,
            "policy_verdicts",
            "Policy decisions on new or re-evaluated flows; deny includes policy_changed.",
            view.verdicts.iter().map(|(l, v)| (l, *v)),
        )?;
        counter(
            &mut encoder,
            "events_sent",
            "Flow events written to the ring buffer.",
            view.stats.events_sent,
        )?;
        counter(
            &mut encoder,
            "events_lost",
            "Flow events lost because the ring buffer was full.",
            view.stats.events_lost,
        )?;
        counter(
            &mut encoder,
            "events_rate_limited",
            "Flow events suppressed by the kernel-side rate limit.",
            view.stats.events_rate_limited,
        )?;
        counter(
            &mut encoder,
            "no_endpoint_packets",
            "Packets seen on an attached interface that has no endpoint entry.",
            view.stats.no_endpoint,
        )?;
        counter(
            &mut encoder,
            "conntrack_evictions",
            "Conntrack entries a new flow took over because their set of 4 was full (the flow \
             seen least recently there); such a flow is decided afresh at its next packet.",
            view.stats.ct_evicted,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use netpol_common::counters::CounterKey;

    use super::*;
    use crate::metrics::{
        exposition::{labels, parse, series, Labels},
        Metrics, MetricsOptions,
    };

    const IN: u8 = DIR_INGRESS;
    const EG: u8 = DIR_EGRESS;

    fn key(ifindex: u32, direction: u8, reason: u8) -> CounterKey {
        CounterKey { ifindex, direction, reason, _pad: [0; 2] }
    }

    /// ifindex 10 and 11 are pods, 12 has no known pod; reason 200 is unknown to this agent.
    fn snapshot(scale: u64) -> CounterSnapshot {
        let rows: [(u32, u8, u8, u64, u64); 9] = [
            (10, IN, Reason::DenyPolicy as u8, 3, 300),
            (10, EG, Reason::AllowPolicy as u8, 5, 500),
            (10, IN, Reason::Audit as u8, 4, 400),
            (10, IN, 200, 7, 70),
            (11, IN, Reason::DenyPolicy as u8, 2, 120),
            (11, IN, Reason::AllowConntrack as u8, 100, 10_000),
            (11, EG, Reason::DenyPolicyChanged as u8, 1, 60),
            (11, EG, Reason::AllowUnpoliced as u8, 6, 600),
            (12, EG, Reason::DenyMalformed as u8, 1, 40),
        ];
        let by_reason = rows
            .iter()
            .map(|&(i, d, r, p, b)| {
                (key(i, d, r), CounterValue { packets: p * scale, bytes: b * scale })
            })
            .collect();
        CounterSnapshot {
            by_reason,
            by_rule: BTreeMap::new(),
            stats: Stats {
                events_sent: 9 * scale,
                events_lost: 2 * scale,
                events_rate_limited: 5 * scale,
                no_endpoint: 1,
                ct_evicted: 3 * scale,
            },
        }
    }

    fn pods() -> EndpointLabels {
        let mut e = EndpointLabels::new();
        e.insert(10, "a", "p10");
        e.insert(11, "b", "p11");
        e
    }

    fn dr(direction: &str, reason: &str) -> Labels {
        labels(&[("direction", direction), ("reason", reason)])
    }

    fn scrape(m: &Metrics) -> Vec<crate::metrics::exposition::Sample> {
        parse(&m.encode().expect("encode"))
    }

    /// Node-level drop series: every known drop reason per direction, zero-filled, plus `unknown`.
    fn expected_node_drops(scale: f64, bytes: bool) -> BTreeMap<Labels, f64> {
        let mut want = BTreeMap::new();
        for d in ["ingress", "egress"] {
            for r in Reason::ALL.iter().filter(|r| r.is_drop()) {
                want.insert(dr(d, r.name()), 0.0);
            }
        }
        let v = |p: f64, b: f64| if bytes { b * scale } else { p * scale };
        want.insert(dr("ingress", "policy_deny"), v(5.0, 420.0));
        want.insert(dr("egress", "policy_changed"), v(1.0, 60.0));
        want.insert(dr("egress", "malformed"), v(1.0, 40.0));
        want.insert(dr("ingress", "unknown"), v(7.0, 70.0));
        want
    }

    #[test]
    fn nothing_before_the_first_snapshot() {
        let m = Metrics::new(MetricsOptions::default());
        let s = scrape(&m);
        for name in
            ["netpol_drop_count_total", "netpol_forward_count_total", "netpol_events_lost_total"]
        {
            assert!(series(&s, name).is_empty(), "{name} before any snapshot");
        }
    }

    #[test]
    fn node_level_drops_forwards_and_stats() {
        let m = Metrics::new(MetricsOptions::default());
        m.set_counters(&snapshot(1), &pods());
        let s = scrape(&m);
        assert_eq!(series(&s, "netpol_drop_count_total"), expected_node_drops(1.0, false));
        assert_eq!(series(&s, "netpol_drop_bytes_total"), expected_node_drops(1.0, true));
        let dir = |d: &str| labels(&[("direction", d)]);
        // Forward = every non-drop reason:
        // ingress conntrack 100 + audit 4, egress allow 5 + unpoliced 6.
        assert_eq!(
            series(&s, "netpol_forward_count_total"),
            BTreeMap::from([(dir("ingress"), 104.0), (dir("egress"), 11.0)])
        );
        assert_eq!(
            series(&s, "netpol_forward_bytes_total"),
            BTreeMap::from([(dir("ingress"), 10_400.0), (dir("egress"), 1_100.0)])
        );
        assert_eq!(series(&s, "netpol_events_sent_total"), BTreeMap::from([(Labels::new(), 9.0)]));
        assert_eq!(series(&s, "netpol_events_lost_total"), BTreeMap::from([(Labels::new(), 2.0)]));
        assert_eq!(
            series(&s, "netpol_events_rate_limited_total"),
            BTreeMap::from([(Labels::new(), 5.0)])
        );
        assert_eq!(
            series(&s, "netpol_no_endpoint_packets_total"),
            BTreeMap::from([(Labels::new(), 1.0)])
        );
        assert_eq!(
            series(&s, "netpol_conntrack_evictions_total"),
            BTreeMap::from([(Labels::new(), 3.0)])
        );
    }

    #[test]
    fn verdicts_map_reasons_to_allow_deny_audit() {
        let m = Metrics::new(MetricsOptions::default());
        m.set_counters(&snapshot(1), &EndpointLabels::new());
        let v = |d: &str, verdict: &str| labels(&[("direction", d), ("verdict", verdict)]);
        assert_eq!(
            series(&scrape(&m), "netpol_policy_verdicts_total"),
            BTreeMap::from([
                (v("ingress", "allow"), 0.0),
                (v("ingress", "deny"), 5.0),
                (v("ingress", "audit"), 4.0),
                (v("egress", "allow"), 5.0),
                // policy_changed counts as deny; malformed is not a policy decision.
                (v("egress", "deny"), 1.0),
                (v("egress", "audit"), 0.0),
            ])
        );
        assert_eq!(verdict(Reason::AllowConntrack), None);
        assert_eq!(verdict(Reason::DenyConntrackFull), None);
    }

    #[test]
    fn per_pod_labels_split_drops_by_pod_and_leave_unknown_interfaces_unlabelled() {
        let m = Metrics::new(MetricsOptions { per_pod_labels: true });
        m.set_counters(&snapshot(1), &pods());
        let s = scrape(&m);
        let l = |d: &str, r: &str, ns: &str, pod: &str| {
            labels(&[("direction", d), ("reason", r), ("namespace", ns), ("pod", pod)])
        };
        assert_eq!(
            series(&s, "netpol_drop_count_total"),
            BTreeMap::from([
                (l("ingress", "policy_deny", "a", "p10"), 3.0),
                (l("ingress", "unknown", "a", "p10"), 7.0),
                (l("ingress", "policy_deny", "b", "p11"), 2.0),
                (l("egress", "policy_changed", "b", "p11"), 1.0),
                (l("egress", "malformed", "", ""), 1.0),
            ])
        );
        assert_eq!(
            series(&s, "netpol_drop_bytes_total")[&l("ingress", "policy_deny", "b", "p11")],
            120.0
        );
        // Forward counters stay per direction only.
        assert!(series(&s, "netpol_forward_count_total").keys().all(|k| k.len() == 1));
    }

    #[test]
    fn a_new_snapshot_replaces_the_values() {
        let m = Metrics::new(MetricsOptions::default());
        m.set_counters(&snapshot(1), &pods());
        m.set_counters(&snapshot(3), &pods());
        let s = scrape(&m);
        assert_eq!(series(&s, "netpol_drop_count_total"), expected_node_drops(3.0, false));
        assert_eq!(series(&s, "netpol_events_lost_total")[&Labels::new()], 6.0);
    }

    #[test]
    fn declared_as_counters() {
        let m = Metrics::new(MetricsOptions::default());
        m.set_counters(&snapshot(1), &pods());
        let text = m.encode().expect("encode");
        for name in ["drop_count", "drop_bytes", "forward_count", "policy_verdicts", "events_lost"]
        {
            assert!(text.contains(&format!("# TYPE netpol_{name} counter\n")), "{name}: {text}");
        }
    }
}
