//! Control-plane metrics: updated by the agent as events happen (no kernel reads).

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use super::gauge_value;

/// Buckets of `policy_apply_duration_seconds`: 1 ms (a small diff on an idle node) to 10 s (a
/// full resync of a large node), roughly 1-2.5-5 per decade.
const APPLY_BUCKETS: [f64; 13] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Endpoint states of `endpoints{state}`.
pub(super) const STATE_ENFORCED: &str = "enforced";
pub(super) const STATE_PENDING: &str = "pending";
pub(super) const STATE_ERROR: &str = "error";

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// The metrics the agent updates directly. Each field is a shared handle (the registry holds a
/// clone), so updates need only `&self`.
#[derive(Debug)]
pub(super) struct ControlMetrics {
    map_entries: Family<MapLabels, Gauge>,
    map_max_entries: Family<MapLabels, Gauge>,
    gc_deleted: Counter,
    gc_runs: Counter,
    reconcile_errors: Family<KindLabels, Counter>,
    apply_duration: Histogram,
    endpoints: Family<StateLabels, Gauge>,
    source_up: Gauge,
    manifest_errors: Gauge,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        let endpoints = Family::<StateLabels, Gauge>::default();
        // All three states are exported from the start, so "0 pending" is visible as a value.
        for state in [STATE_ENFORCED, STATE_PENDING, STATE_ERROR] {
            let _ = endpoints.get_or_create(&StateLabels { state });
        }
        ControlMetrics {
            map_entries: Family::default(),
            map_max_entries: Family::default(),
            gc_deleted: Counter::default(),
            gc_runs: Counter::default(),
            reconcile_errors: Family::default(),
            apply_duration: Histogram::new(APPLY_BUCKETS),
            endpoints,
            source_up: Gauge::default(),
            manifest_errors: Gauge::default(),
        }
    }
}

impl ControlMetrics {
    pub(super) fn register(&self, r: &mut Registry) {
        r.register("bpf_map_entries", "Entries in a BPF map", self.map_entries.clone());
        r.register("bpf_map_max_entries", "Capacity of a BPF map", self.map_max_entries.clone());
        r.register(
            "conntrack_gc_deleted",
            "Conntrack entries deleted by the garbage collector",
            self.gc_deleted.clone(),
        );
        r.register("conntrack_gc_runs", "Conntrack garbage collector runs", self.gc_runs.clone());
        r.register(
            "reconcile_errors",
            "Failed reconciles, by kind of failure",
            self.reconcile_errors.clone(),
        );
        r.register_with_unit(
            "policy_apply_duration",
            "Time from an object change to the BPF maps being written",
            Unit::Seconds,
            self.apply_duration.clone(),
        );
        r.register("endpoints", "Local endpoints by enforcement state", self.endpoints.clone());
        r.register(
            "source_up",
            "1 if the policy source is connected and synced, else 0",
            self.source_up.clone(),
        );
        r.register(
            "manifest_errors",
            "Objects currently rejected by the manifest loader",
            self.manifest_errors.clone(),
        );
    }

    pub(super) fn observe_apply(&self, elapsed: Duration) {
        self.apply_duration.observe(elapsed.as_secs_f64());
    }

    pub(super) fn reconcile_error(&self, kind: &str) {
        self.reconcile_errors.get_or_create(&KindLabels { kind: kind.to_owned() }).inc();
    }

    pub(super) fn set_endpoints(&self, enforced: usize, pending: usize, error: usize) {
        for (state, n) in
            [(STATE_ENFORCED, enforced), (STATE_PENDING, pending), (STATE_ERROR, error)]
        {
            self.endpoints.get_or_create(&StateLabels { state }).set(gauge_value(n));
        }
    }

    pub(super) fn set_map_fill(&self, map: &str, entries: usize, max_entries: usize) {
        let labels = MapLabels { map: map.to_owned() };
        self.map_entries.get_or_create(&labels).set(gauge_value(entries));
        self.map_max_entries.get_or_create(&labels).set(gauge_value(max_entries));
    }

    pub(super) fn gc(&self, deleted: u64) {
        self.gc_runs.inc();
        self.gc_deleted.inc_by(deleted);
    }

    pub(super) fn set_source_up(&self, up: bool) {
        self.source_up.set(i64::from(up));
    }

    pub(super) fn set_manifest_errors(&self, n: usize) {
        self.manifest_errors.set(gauge_value(n));
    }
}
