//! Kubernetes API source: reflectors over Pods, Namespaces, NetworkPolicies, Services,
//! EndpointSlices and the network-policy-api kinds (ClusterNetworkPolicy v1alpha2,
//! AdminNetworkPolicy and BaselineAdminNetworkPolicy v1alpha1, as dynamic objects), turned into
//! level-triggered [`SourceEvent`]s.
//!
//! The network-policy-api CRDs need not exist: a kind whose list answers `404 Not Found` counts
//! as synced and empty ("no such policies", logged once), so it never blocks the first snapshot
//! or readiness; the watcher keeps retrying with backoff and picks the CRD up once installed.
//!
//! - The watchers (`any_semantic` lists from the watch cache, default page size, bookmarks on)
//!   run with `.default_backoff()`; their objects are trimmed ([`trim`]) before they reach the
//!   stores, since the agent sees every pod of the cluster.
//! - Nothing is sent before the initial lists of all kinds completed (`InitDone`). Then
//!   every store change schedules one [`SourceEvent::Snapshot`] after `debounce`, so a burst of
//!   events gives one snapshot; a snapshot equal to the previous one is not sent (bookmarks and
//!   changes to trimmed-away fields, such as pod conditions, change nothing).
//! - An API error (other than `410 Gone`, the routine "relist" signal) starts an outage: its
//!   first error is reported as [`SourceEvent::Degraded`], the retries only logged. The stores
//!   keep their contents meanwhile (a relist replaces a store only once it completed). When every
//!   failed watcher delivered again, a snapshot is sent even if unchanged, so the agent learns
//!   that the source recovered. A watcher that resumes its watch without a relist and sees no
//!   event shows nothing to observe; it counts as recovered at its next event.

mod snapshot;
pub mod trim;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as net;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use snapshot::{snapshot, terminated, Converter};

use super::SourceEvent;

/// Errors of the Kubernetes API source.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// The kubeconfig file given with `--kubeconfig` could not be read or used.
    #[error("kubeconfig {}", path.display())]
    Kubeconfig {
        /// The path.
        path: PathBuf,
        /// kube's error.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// Neither `$KUBECONFIG`/`~/.kube/config` nor the in-cluster service account is usable.
    #[error("no cluster configuration (kubeconfig or in-cluster)")]
    Infer {
        /// kube's error.
        #[source]
        source: kube::config::InferConfigError,
    },
    /// The client could not be built from the configuration (TLS setup, proxy, ...).
    #[error("building the API client for {cluster_url}")]
    Client {
        /// The API server's URL.
        cluster_url: String,
        /// kube's error.
        #[source]
        source: kube::Error,
    },
    /// A watch stream ended, which kube's watchers never do while the client exists.
    #[error("the {kind} watch stream ended")]
    WatchEnded {
        /// The watched kind.
        kind: Kind,
    },
}

/// Options of the Kubernetes API source.
#[derive(Clone, Debug)]
pub struct KubeSourceOptions {
    /// A kubeconfig file; `None`: `$KUBECONFIG`, `~/.kube/config`, then the in-cluster config.
    pub kubeconfig: Option<PathBuf>,
    /// How long changes are collected before a snapshot is sent.
    pub debounce: Duration,
}

impl Default for KubeSourceOptions {
    fn default() -> Self {
        KubeSourceOptions { kubeconfig: None, debounce: Duration::from_millis(100) }
    }
}

/// A client for the configured cluster: the `kubeconfig` file if given, else kube's inference.
pub async fn client(opts: &KubeSourceOptions) -> Result<kube::Client, KubeSourceError> {
    let config = match &opts.kubeconfig {
        Some(path) => {
            let wrap = |source| KubeSourceError::Kubeconfig { path: path.clone(), source };
            let kubeconfig = Kubeconfig::read_from(path).map_err(wrap)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(wrap)?
        }
        None => kube::Config::infer().await.map_err(|source| KubeSourceError::Infer { source })?,
    };
    let cluster_url = config.cluster_url.to_string();
    info!(%cluster_url, "connecting to the Kubernetes API");
    kube::Client::try_from(config).map_err(|source| KubeSourceError::Client { cluster_url, source })
}

/// The watched kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `v1/Pod`.
    Pod = 0,
    /// `v1/Namespace`.
    Namespace = 1,
    /// `networking.k8s.io/v1/NetworkPolicy`.
    NetworkPolicy = 2,
    /// `v1/Service`.
    Service = 3,
    /// `discovery.k8s.io/v1/EndpointSlice`.
    EndpointSlice = 4,
    /// `policy.networking.k8s.io/v1alpha2/ClusterNetworkPolicy` (optional CRD).
    ClusterNetworkPolicy = 5,
    /// `policy.networking.k8s.io/v1alpha1/AdminNetworkPolicy` (optional CRD).
    AdminNetworkPolicy = 6,
    /// `policy.networking.k8s.io/v1alpha1/BaselineAdminNetworkPolicy` (optional CRD).
    BaselineAdminNetworkPolicy = 7,
}

/// Number of watched kinds.
const KINDS: usize = 8;

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            Kind::AdminNetworkPolicy => "AdminNetworkPolicy",
            Kind::BaselineAdminNetworkPolicy => "BaselineAdminNetworkPolicy",
        }
    }

    /// Whether the kind comes from a CRD that may not be installed.
    fn optional(self) -> bool {
        (self as usize) >= Kind::ClusterNetworkPolicy as usize
    }

    /// The API resource of an optional kind.
    fn api_resource(self) -> ApiResource {
        let (version, plural) = match self {
            Kind::ClusterNetworkPolicy => ("v1alpha2", "clusternetworkpolicies"),
            Kind::AdminNetworkPolicy => ("v1alpha1", "adminnetworkpolicies"),
            _ => ("v1alpha1", "baselineadminnetworkpolicies"),
        };
        let group = "policy.networking.k8s.io";
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: format!("{group}/{version}"),
            kind: self.name().into(),
            plural: plural.into(),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a watcher event means for the source, without the object (the store has it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// A (re)list started or delivered a page; the store is unchanged until it completes.
    Listing,
    /// A (re)list completed and replaced the store.
    Listed,
    /// An object was applied or deleted.
    Changed,
}

impl Step {
    fn of<K>(e: &watcher::Event<K>) -> Step {
        match e {
            watcher::Event::Init | watcher::Event::InitApply(_) => Step::Listing,
            watcher::Event::InitDone => Step::Listed,
            watcher::Event::Apply(_) | watcher::Event::Delete(_) => Step::Changed,
        }
    }
}

/// An update of one watcher; `None` once its stream ended.
type Update = (Kind, Option<Result<Step, watcher::Error>>);
type Updates = Pin<Box<dyn Stream<Item = Update> + Send>>;

fn watch_config() -> watcher::Config {
    // `any_semantic`: (re)lists are served from the API server's watch cache, like kubelet and
    // kube-proxy do; every node runs an agent, so lists must be cheap for the API server.
    watcher::Config::default().any_semantic()
}

fn reflect<K>(api: Api<K>, kind: Kind, trim: fn(&mut K)) -> (Store<K>, Updates)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let updates = watcher(api, watch_config())
        .default_backoff()
        .modify(trim)
        .reflect(writer)
        .map(move |r| (kind, Some(r.map(|e| Step::of(&e)))))
        // Marks the end, which the loop reports as an error.
        .chain(futures::stream::once(async move { (kind, None) }))
        .boxed();
    (reader, updates)
}

/// [`reflect`] for a network-policy-api kind, as dynamic objects.
fn reflect_dynamic(client: kube::Client, kind: Kind) -> (Store<DynamicObject>, Updates) {
    let ar = kind.api_resource();
    let writer = reflector::store::Writer::new(ar.clone());
    let reader = writer.as_reader();
    let updates = watcher(Api::<DynamicObject>::all_with(client, &ar), watch_config())
        .default_backoff()
        .modify(trim::cluster_policy)
        .reflect(writer)
        .map(move |r| (kind, Some(r.map(|e| Step::of(&e)))))
        .chain(futures::stream::once(async move { (kind, None) }))
        .boxed();
    (reader, updates)
}

/// The reflector stores of the watched kinds.
struct Stores {
    pods: Store<core::Pod>,
    namespaces: Store<core::Namespace>,
    policies: Store<net::NetworkPolicy>,
    services: Store<core::Service>,
    slices: Store<discovery::EndpointSlice>,
    /// ClusterNetworkPolicy, AdminNetworkPolicy, BaselineAdminNetworkPolicy.
    cluster: [Store<DynamicObject>; 3],
}

impl Stores {
    fn build(&self, converter: &mut Converter) -> (crate::model::ClusterState, Vec<String>) {
        let [a, b, c] = self.cluster.each_ref().map(Store::state);
        converter.build_all(
            &self.pods.state(),
            &self.namespaces.state(),
            &self.policies.state(),
            &self.services.state(),
            &self.slices.state(),
            [&a, &b, &c],
        )
    }
}

/// Starts nothing by itself: the stores fill as the returned stream is polled.
fn watch_all(client: kube::Client) -> (Stores, impl Stream<Item = Update> + Unpin + Send) {
    let (pods, pod_updates) = reflect(Api::all(client.clone()), Kind::Pod, trim::pod);
    let (namespaces, ns_updates) =
        reflect(Api::all(client.clone()), Kind::Namespace, trim::namespace);
    let (policies, policy_updates) =
        reflect(Api::all(client.clone()), Kind::NetworkPolicy, trim::policy);
    let (services, service_updates) =
        reflect(Api::all(client.clone()), Kind::Service, trim::service);
    let (slices, slice_updates) =
        reflect(Api::all(client.clone()), Kind::EndpointSlice, trim::endpoint_slice);
    let (cnp, cnp_updates) = reflect_dynamic(client.clone(), Kind::ClusterNetworkPolicy);
    let (anp, anp_updates) = reflect_dynamic(client.clone(), Kind::AdminNetworkPolicy);
    let (banp, banp_updates) = reflect_dynamic(client, Kind::BaselineAdminNetworkPolicy);
    let updates = futures::stream::select_all([
        pod_updates,
        ns_updates,
        policy_updates,
        service_updates,
        slice_updates,
        cnp_updates,
        anp_updates,
        banp_updates,
    ]);
    (Stores { pods, namespaces, policies, services, slices, cluster: [cnp, anp, banp] }, updates)
}

/// An error with its sources, `a: b: c`, skipping sources already quoted by their parent.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// `404 Not Found` from a list or watch: for the optional kinds, the CRD is not installed.
fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// `410 Gone` from a watch: the resource version expired and the watcher relists. Routine.
fn is_gone(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchError(status) if status.code == 410)
}

/// Watches the cluster and sends [`SourceEvent`]s to `tx` until the receiver is dropped.
pub async fn run(
    client: kube::Client,
    opts: KubeSourceOptions,
    tx: mpsc::Sender<SourceEvent>,
) -> Result<(), KubeSourceError> {
    let (stores, mut updates) = watch_all(client);
    let mut tracker = Tracker::default();
    let mut converter = Converter::default();
    let mut last: Option<(crate::model::ClusterState, Vec<String>)> = None;
    info!("watching Pods, Namespaces, NetworkPolicies, Services, EndpointSlices and the network-policy-api kinds");
    loop {
        let deadline = tracker.deadline();
        let event = tokio::select! {
            () = tx.closed() => break,
            update = updates.next() => {
                let Some((kind, Some(result))) = update else {
                    let kind = update.map_or(Kind::Pod, |(kind, _)| kind);
                    return Err(KubeSourceError::WatchEnded { kind });
                };
                tracker.observe(kind, result, Instant::now() + opts.debounce)
            }
            () = sleep_until(deadline), if deadline.is_some() => {
                let force = tracker.take_due();
                let built = stores.build(&mut converter);
                if !force && last.as_ref() == Some(&built) {
                    debug!("store change without effect on the snapshot");
                    None
                } else {
                    let (state, errors) = built.clone();
                    // Errors are sorted; each new one is logged once.
                    let before = last.as_ref().map(|(_, e)| e.as_slice()).unwrap_or_default();
                    for e in errors.iter().filter(|e| before.binary_search(e).is_err()) {
                        warn!(error = %e, "object left out of the cluster state");
                    }
                    last = Some(built);
                    debug!(
                        pods = state.pods.len(),
                        namespaces = state.namespaces.len(),
                        policies = state.policies.len(),
                        errors = errors.len(),
                        "sending snapshot"
                    );
                    // The snapshot was due `debounce` after the first change it includes.
                    let since = deadline.map_or_else(std::time::Instant::now, |d| {
                        d.into_std().checked_sub(opts.debounce).unwrap_or_else(std::time::Instant::now)
                    });
                    Some(SourceEvent::Snapshot { state, errors, since })
                }
            }
        };
        if let Some(event) = event {
            if tx.send(event).await.is_err() {
                break;
            }
        }
    }
    info!("receiver dropped; stopping the Kubernetes watchers");
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(d).await;
    }
}

/// The source's state machine, apart from the stores: initial sync, outage and debounce.
#[derive(Debug, Default)]
struct Tracker {
    /// Kinds whose initial list completed (or whose CRD is not installed).
    synced: [bool; KINDS],
    /// Kinds that failed and did not deliver since.
    failing: [bool; KINDS],
    /// Optional kinds whose CRD answered 404 (logged once per absence).
    absent: [bool; KINDS],
    /// `Degraded` was sent for the current outage.
    degraded: bool,
    /// A snapshot is due at this time (once all kinds synced).
    due: Option<Instant>,
    /// The next snapshot is sent even if unchanged (recovery).
    force: bool,
}

impl Tracker {
    /// When the next snapshot is due, if one is and the initial lists completed.
    fn deadline(&self) -> Option<Instant> {
        self.due.filter(|_| self.synced.iter().all(|s| *s))
    }

    /// Clears the due snapshot; returns whether it must be sent even if unchanged.
    fn take_due(&mut self) -> bool {
        self.due = None;
        std::mem::take(&mut self.force)
    }

    fn schedule(&mut self, at: Instant) {
        // Not pushed back by later changes: the first change of a burst bounds the latency.
        self.due.get_or_insert(at);
    }

    /// Records one watcher update; returns an event to send now, if any.
    fn observe(
        &mut self,
        kind: Kind,
        result: Result<Step, watcher::Error>,
        due: Instant,
    ) -> Option<SourceEvent> {
        let i = kind as usize;
        match result {
            Ok(Step::Listing) => None,
            Ok(step) => {
                if std::mem::take(&mut self.absent[i]) {
                    info!(%kind, "CRD installed; enforcing its policies");
                }
                if step == Step::Listed && !self.synced[i] {
                    self.synced[i] = true;
                    info!(%kind, "initial list synced");
                }
                if std::mem::take(&mut self.failing[i]) {
                    info!(%kind, "watch recovered");
                    if self.degraded && !self.failing.iter().any(|f| *f) {
                        info!("Kubernetes API source recovered");
                        self.degraded = false;
                        self.force = true;
                    }
                }
                self.schedule(due);
                None
            }
            Err(e) if kind.optional() && is_not_found(&e) => {
                // No CRD: no such policies. The store stays as it is (empty unless the CRD was
                // deleted after a list, which also deletes its objects as the API reports them).
                if !std::mem::replace(&mut self.absent[i], true) {
                    info!(%kind, "CRD not installed; treating it as no such policies");
                }
                if !self.synced[i] {
                    self.synced[i] = true;
                    self.schedule(due);
                }
                None
            }
            Err(e) if is_gone(&e) => {
                debug!(%kind, error = %chain(&e), "resource version expired; relisting");
                None
            }
            Err(e) => {
                self.failing[i] = true;
                let reason = format!("{kind} watch: {}", chain(&e));
                if self.degraded {
                    debug!(%reason, "still failing; retrying with backoff");
                    None
                } else {
                    warn!(%reason, "Kubernetes API source degraded; keeping the last state");
                    self.degraded = true;
                    Some(SourceEvent::Degraded { reason })
                }
            }
        }
    }
}

#[cfg(test)]
mod tracker_tests {
    use super::*;

    impl Kind {
        const ALL: [Kind; KINDS] = [
            Kind::Pod,
            Kind::Namespace,
            Kind::NetworkPolicy,
            Kind::Service,
            Kind::EndpointSlice,
            Kind::ClusterNetworkPolicy,
            Kind::AdminNetworkPolicy,
            Kind::BaselineAdminNetworkPolicy,
        ];
    }

    fn status(code: u16) -> watcher::Error {
        watcher::Error::WatchError(Box::new(kube::core::Status::failure("x", "y").with_code(code)))
    }

    #[test]
    fn nothing_due_before_all_kinds_synced() {
        let mut t = Tracker::default();
        let now = Instant::now();
        for kind in [Kind::Pod, Kind::Namespace] {
            assert!(t.observe(kind, Ok(Step::Listed), now).is_none());
        }
        // The CRDs are not installed: synced and empty, not an outage.
        for kind in Kind::ALL.iter().filter(|k| k.optional()) {
            assert!(t.observe(*kind, Err(status(404)), now).is_none());
            assert!(t.observe(*kind, Err(status(404)), now).is_none(), "logged and scheduled once");
        }
        assert!(!t.degraded);
        // A 404 of a built-in kind is an outage.
        let mut u = Tracker::default();
        assert!(u.observe(Kind::Pod, Err(status(404)), now).is_some());
        assert_eq!(t.deadline(), None);
        t.observe(Kind::NetworkPolicy, Ok(Step::Listing), now);
        assert_eq!(t.deadline(), None);
        t.observe(Kind::NetworkPolicy, Ok(Step::Listed), now);
        t.observe(Kind::Service, Ok(Step::Listed), now);
        assert_eq!(t.deadline(), None, "EndpointSlices not listed yet");
        t.observe(Kind::EndpointSlice, Ok(Step::Listed), now);
        assert_eq!(t.deadline(), Some(now));
        assert!(!t.take_due());
        assert_eq!(t.deadline(), None);
    }

    #[test]
    fn one_degraded_per_outage_and_forced_snapshot_on_recovery() {
        let mut t = Tracker::default();
        let now = Instant::now();
        for kind in Kind::ALL {
            t.observe(kind, Ok(Step::Listed), now);
        }
        t.take_due();
        let first = t.observe(Kind::Pod, Err(status(500)), now);
        assert!(
            matches!(first, Some(SourceEvent::Degraded { ref reason }) if reason.starts_with("Pod watch"))
        );
        assert!(t.observe(Kind::Pod, Err(status(500)), now).is_none());
        assert!(t.observe(Kind::Namespace, Err(status(503)), now).is_none());
        // 410 is routine, not an outage of its own.
        assert!(t.observe(Kind::NetworkPolicy, Err(status(410)), now).is_none());
        // Pods recovered, namespaces not yet: not forced.
        t.observe(Kind::Pod, Ok(Step::Listed), now);
        assert!(t.degraded);
        t.observe(Kind::Namespace, Ok(Step::Changed), now);
        assert!(!t.degraded);
        assert!(t.take_due(), "recovery forces a snapshot");
        // A new outage reports again.
        assert!(t.observe(Kind::Namespace, Err(status(500)), now).is_some());
    }

    #[test]
    fn gone_alone_is_not_an_outage() {
        let mut t = Tracker::default();
        assert!(t.observe(Kind::Pod, Err(status(410)), Instant::now()).is_none());
        assert!(!t.degraded);
    }

    #[test]
    fn burst_keeps_first_deadline() {
        let mut t = Tracker::default();
        let now = Instant::now();
        for kind in Kind::ALL {
            t.observe(kind, Ok(Step::Listed), now);
        }
        t.observe(Kind::Pod, Ok(Step::Changed), now + Duration::from_secs(5));
        assert_eq!(t.deadline(), Some(now));
    }
}
