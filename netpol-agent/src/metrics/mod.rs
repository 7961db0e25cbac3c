//! The agent's Prometheus metrics (prefix `netpol_`) and its HTTP endpoints.
//!
//! Two sources feed one [`Registry`]:
//! - `kernel`: the datapath's per-CPU counters, summed by the dataplane into a
//!   [`CounterSnapshot`]. They are cumulative since the maps were created (the maps are pinned, so
//!   they survive agent restarts), and are exported as they are at scrape time through a
//!   [`prometheus_client::collector::Collector`]: the agent never adds deltas by hand, so a scrape
//!   shows exactly what the kernel counted up to the last snapshot.
//! - `control`: control-plane metrics the agent updates as things happen (apply latency,
//!   reconcile errors, endpoint states, map fill levels, conntrack GC).
//!
//! [`serve`] exposes `/metrics`, `/healthz` and `/readyz`; [`Health`] is the handle the sync
//! loop uses to report liveness and readiness. Names follow docs/anchors.md §5.6.

mod control;
#[cfg(test)]
mod exposition;
mod health;
mod http;
mod kernel;

use std::{sync::Arc, time::Duration};

use prometheus_client::{encoding::text, registry::Registry};

use crate::dataplane::CounterSnapshot;
use control::ControlMetrics;
use kernel::KernelCollector;

pub use health::{Health, Liveness};
pub use http::{serve, serve_on, CONTENT_TYPE_OPENMETRICS};
pub use kernel::{EndpointLabels, PodRef};

/// Prefix of every metric name.
pub const PREFIX: &str = "netpol";

/// Errors of the metrics module.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The HTTP listener could not be bound.
    #[error("bind the metrics endpoint on {addr}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The registry could not be written as text (a metric's encoder failed).
    #[error("encode the metrics exposition")]
    Encode(#[source] std::fmt::Error),
}

/// Choices fixed for the life of the process (changing them changes the set of series).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricsOptions {
    /// Add `namespace` and `pod` labels to the drop counters. Off by default: one series per pod,
    /// direction and reason can be many thousands of series on a busy node.
    pub per_pod_labels: bool,
}

/// All metrics of the agent. Cheap to share: wrap it in an [`Arc`]; every method takes `&self`
/// and is safe to call from any task.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    kernel: Arc<KernelCollector>,
    control: ControlMetrics,
}

impl Metrics {
    /// Creates the metrics and registers them under [`PREFIX`].
    pub fn new(opts: MetricsOptions) -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let kernel = Arc::new(KernelCollector::new(opts.per_pod_labels));
        kernel.register(&mut registry);
        let control = ControlMetrics::default();
        control.register(&mut registry);
        Metrics { registry, kernel, control }
    }

    /// Replaces the kernel counters shown at the next scrape with `snapshot`. `endpoints` names the
    /// pod behind each ifindex; it is only used when `per_pod_labels` is on. Call it after every
    /// counter read (e.g. each sync or a short timer); the aggregation happens here, not at scrape.
    pub fn set_counters(&self, snapshot: &CounterSnapshot, endpoints: &EndpointLabels) {
        self.kernel.set(snapshot, endpoints);
    }

    /// Records the time from an object change to the maps being written.
    pub fn observe_apply(&self, elapsed: Duration) {
        self.control.observe_apply(elapsed);
    }

    /// Counts one reconcile error. `kind` becomes a label value: pass one of a small fixed set
    /// (e.g. `"compile"`, `"dataplane"`), never an error message.
    pub fn reconcile_error(&self, kind: &str) {
        self.control.reconcile_error(kind);
    }

    /// Sets the number of endpoints in each state.
    pub fn set_endpoints(&self, enforced: usize, pending: usize, error: usize) {
        self.control.set_endpoints(enforced, pending, error);
    }

    /// Sets the fill level of one BPF map (`map` is its kernel name, e.g. `np_ct`).
    pub fn set_map_fill(&self, map: &str, entries: usize, max_entries: usize) {
        self.control.set_map_fill(map, entries, max_entries);
    }

    /// Records one conntrack GC run that deleted `deleted` entries.
    pub fn gc(&self, deleted: u64) {
        self.control.gc(deleted);
    }

    /// Sets whether the policy source (API watch or manifest directory) is connected and synced.
    pub fn set_source_up(&self, up: bool) {
        self.control.set_source_up(up);
    }

    /// Sets the number of objects currently rejected by the manifest loader.
    pub fn set_manifest_errors(&self, n: usize) {
        self.control.set_manifest_errors(n);
    }

    /// The OpenMetrics text exposition of every metric, ending in `# EOF`.
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut out = String::new();
        text::encode(&mut out, &self.registry).map_err(MetricsError::Encode)?;
        Ok(out)
    }
}

/// Converts a count to a gauge value; counts above `i64::MAX` cannot happen on a real node, and
/// saturating keeps the conversion total instead of panicking.
fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{
        exposition::{labels, parse, series, Labels},
        *,
    };

    #[test]
    fn control_metrics_show_what_the_agent_set() {
        let m = Metrics::new(MetricsOptions::default());
        let s = parse(&m.encode().expect("encode"));
        let state = |s: &str| labels(&[("state", s)]);
        // Before any update: endpoint states exist at zero, the source is down.
        assert_eq!(
            series(&s, "netpol_endpoints"),
            BTreeMap::from([
                (state("enforced"), 0.0),
                (state("pending"), 0.0),
                (state("error"), 0.0)
            ])
        );
        assert_eq!(series(&s, "netpol_source_up")[&Labels::new()], 0.0);

        m.set_endpoints(7, 2, 1);
        m.set_map_fill("np_ct", 120, 524_288);
        m.set_map_fill("np_ep", 9, 16_384);
        m.set_map_fill("np_ct", 130, 524_288);
        m.gc(5);
        m.gc(0);
        m.reconcile_error("compile");
        m.reconcile_error("dataplane");
        m.reconcile_error("compile");
        m.set_source_up(true);
        m.set_manifest_errors(3);
        let s = parse(&m.encode().expect("encode"));
        assert_eq!(
            series(&s, "netpol_endpoints"),
            BTreeMap::from([
                (state("enforced"), 7.0),
                (state("pending"), 2.0),
                (state("error"), 1.0)
            ])
        );
        let map = |n: &str| labels(&[("map", n)]);
        assert_eq!(
            series(&s, "netpol_bpf_map_entries"),
            BTreeMap::from([(map("np_ct"), 130.0), (map("np_ep"), 9.0)])
        );
        assert_eq!(
            series(&s, "netpol_bpf_map_max_entries"),
            BTreeMap::from([(map("np_ct"), 524_288.0), (map("np_ep"), 16_384.0)])
        );
        assert_eq!(series(&s, "netpol_conntrack_gc_deleted_total")[&Labels::new()], 5.0);
        assert_eq!(series(&s, "netpol_conntrack_gc_runs_total")[&Labels::new()], 2.0);
        let kind = |k: &str| labels(&[("kind", k)]);
        assert_eq!(
            series(&s, "netpol_reconcile_errors_total"),
            BTreeMap::from([(kind("compile"), 2.0), (kind("dataplane"), 1.0)])
        );
        assert_eq!(series(&s, "netpol_source_up")[&Labels::new()], 1.0);
        assert_eq!(series(&s, "netpol_manifest_errors")[&Labels::new()], 3.0);
        m.set_source_up(false);
        let s = parse(&m.encode().expect("encode"));
        assert_eq!(series(&s, "netpol_source_up")[&Labels::new()], 0.0);
    }

    #[test]
    fn apply_duration_histogram_buckets_are_cumulative() {
        let m = Metrics::new(MetricsOptions::default());
        m.observe_apply(Duration::from_millis(3));
        m.observe_apply(Duration::from_millis(20));
        m.observe_apply(Duration::from_secs(20));
        let text = m.encode().expect("encode");
        assert!(text.contains("# TYPE netpol_policy_apply_duration_seconds histogram\n"), "{text}");
        assert!(text.contains("# UNIT netpol_policy_apply_duration_seconds seconds\n"), "{text}");
        let s = parse(&text);
        let base = "netpol_policy_apply_duration_seconds";
        assert_eq!(series(&s, &format!("{base}_count"))[&Labels::new()], 3.0);
        let sum = series(&s, &format!("{base}_sum"))[&Labels::new()];
        assert!((sum - 20.023).abs() < 1e-9, "sum {sum}");
        let buckets: BTreeMap<String, f64> = series(&s, &format!("{base}_bucket"))
            .into_iter()
            .map(|(l, v)| (l["le"].clone(), v))
            .collect();
        // 13 bounds from 1 ms to 10 s, plus +Inf.
        assert_eq!(buckets.len(), 14, "{buckets:?}");
        let at = |le: f64| {
            buckets
                .iter()
                .find(|(k, _)| {
                    let b =
                        if k.as_str() == "+Inf" { f64::INFINITY } else { k.parse().expect("le") };
                    b == le
                })
                .map(|(_, v)| *v)
                .unwrap_or_else(|| panic!("no bucket le={le}: {buckets:?}"))
        };
        assert_eq!(at(0.001), 0.0);
        assert_eq!(at(0.0025), 0.0);
        assert_eq!(at(0.005), 1.0);
        assert_eq!(at(0.01), 1.0);
        assert_eq!(at(0.025), 2.0);
        assert_eq!(at(10.0), 2.0);
        assert_eq!(at(f64::INFINITY), 3.0);
    }
}
