//! Where the cluster state comes from: the Kubernetes API ([`kube`]) or a directory of
//! manifests ([`files`]). Both are level-triggered: they send the whole current state as a
//! [`SourceEvent::Snapshot`] whenever it changed (coalesced), and the sync loop diffs it against
//! what it enforces. A source that loses its backend says so with [`SourceEvent::Degraded`];
//! the agent keeps enforcing the last good state meanwhile.
use crate::model::ClusterState;

pub mod files;
pub mod kube;

/// What a source reports to the agent's sync loop.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// The complete current state. The first one is sent only after the initial lists synced.
    Snapshot {
        /// Namespaces, pods and policies.
        state: ClusterState,
        /// Objects that could not be used, each naming the object and field; the rest of the
        /// state is valid and enforced.
        errors: Vec<String>,
        /// When the earliest change this snapshot includes was observed: the agent measures
        /// its apply latency from here ("object change to maps written").
        since: std::time::Instant,
    },
    /// The backend is unreachable or failing; the last snapshot stays enforced.
    Degraded {
        /// Human-readable cause.
        reason: String,
    },
}
