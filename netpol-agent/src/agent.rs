//! `netpol-agent run`: the sync loop that keeps the kernel maps equal to the compiled policy.
//!
//! One task owns everything mutable (compiler, layout, dataplane). It reacts to source
//! snapshots, retries pods whose interface is not found yet, and garbage-collects conntrack.
//! Every snapshot is applied as a diff in an order that never shows a packet a half-written
//! rule set: new port and peer entries first, then each endpoint switches to its new sets in
//! one map update (with a new generation, so established flows are re-checked), then entries
//! nobody references any more are deleted.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use netpol_common::{ct::Timeouts, ep::Endpoint};
use tokio::sync::mpsc;

use crate::{
    compile::{Change, CompileOptions, Compiler},
    dataplane::{conntrack::monotonic_ns, Dataplane, DataplaneOptions},
    events::Names,
    iface::{Resolution, Resolver},
    layout::{KernelMaps, Layout},
    metrics::{EndpointLabels, Health, Metrics, MetricsOptions},
    model::{ClusterState, Direction, PodRef},
    source::{self, SourceEvent},
    status::{AppliedPolicy, EndpointStatus, RuleStatus, Status, TierSets},
};

/// Where the cluster state comes from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of manifests, watched for changes.
    Manifests(PathBuf),
    /// The Kubernetes API (in-cluster, or with a kubeconfig).
    Kubernetes {
        /// Path of a kubeconfig; `None`: in-cluster or the default kubeconfig.
        kubeconfig: Option<PathBuf>,
    },
}

/// Settings of `netpol-agent run`.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// This node's name: only its pods are enforced.
    pub node_name: String,
    /// The cluster-state source.
    pub source: SourceConfig,
    /// Kernel-side settings (pin directory, conntrack size, event rate).
    pub dataplane: DataplaneOptions,
    /// Allow traffic from the node's own addresses to its pods (kubelet probes).
    pub allow_host_to_pods: bool,
    /// How often pods whose interface was not found are retried.
    pub retry_interval: Duration,
    /// How often conntrack is garbage-collected.
    pub gc_interval: Duration,
    /// How often the kernel is asked whether every bound pod's programs are still attached.
    pub reconcile_interval: Duration,
    /// Address of `/metrics`, `/healthz` and `/readyz` (`None`: not served).
    pub metrics_addr: Option<SocketAddr>,
    /// Label drop counters with namespace and pod (higher cardinality).
    pub per_pod_labels: bool,
    /// Where the status file for the CLI is written after every applied snapshot (`None`: not
    /// written).
    pub status_file: Option<PathBuf>,
    /// Attach even where other programs already sit at an interface's TC hooks (another
    /// policy enforcer). Without it the agent refuses: see [`ForeignPrograms`].
    pub allow_foreign_programs: bool,
}

/// Another enforcer's programs on a local pod's interface ([`crate::foreign`]). Found while
/// enforcing the first snapshot, this stops the agent (it refuses to start); found later, on
/// an interface that appeared since, the agent leaves that pod unenforced, logs this error and
/// counts it (`netpol_reconcile_errors_total{kind="foreign_programs"}`,
/// `netpol_endpoints{state="error"}`), and checks again at every snapshot and every 30 s.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing to attach to {interface} (pod {pod}): other programs are attached to its TC hooks: \
     {programs}. Another policy enforcer (Cilium, Calico's eBPF dataplane, the AWS network \
     policy agent, another netpol installation, ...) seems to run on this node, and two \
     enforcers on one interface overlap. Remove it, or run netpol-agent with \
     --allow-foreign-programs to attach beside it"
)]
pub struct ForeignPrograms {
    /// The pod.
    pub pod: PodRef,
    /// Its host-side interface.
    pub interface: String,
    /// The programs, described.
    pub programs: String,
}

/// A local pod bound to its interface.
#[derive(Clone, Debug)]
struct Bound {
    ifindex: u32,
    name: String,
    ips: Vec<IpAddr>,
    /// The value in the endpoint map, generation included.
    value: Endpoint,
}

/// The agent's state, owned by the sync loop.
pub struct Agent {
    dp: Dataplane,
    resolver: Resolver,
    compiler: Compiler,
    layout: Layout,
    /// What the policy maps hold now.
    applied: KernelMaps,
    bound: BTreeMap<PodRef, Bound>,
    pending: BTreeSet<PodRef>,
    /// Local pods whose interface carries another enforcer's programs (not attached).
    refused: BTreeSet<PodRef>,
    /// Refusals since the metrics last took them.
    new_refusals: u64,
    /// What is netpol's own on an interface; `None`: foreign programs are allowed.
    ownership: Option<crate::foreign::Ownership>,
    synced: bool,
    node_name: String,
    status_file: Option<PathBuf>,
    /// Capacity of the conntrack table in flows, and its entries after the last GC (for the fill
    /// level).
    ct_max: usize,
    ct_entries: usize,
}

/// The changes that turn `old` into `new`, for the incremental compiler.
pub fn changes(old: &ClusterState, new: &ClusterState) -> Vec<Change> {
    let mut out = Vec::new();
    for (k, p) in &new.policies {
        if old.policies.get(k) != Some(p) {
            out.push(Change::UpsertPolicy(p.clone()));
        }
    }
    out.extend(
        old.policies
            .keys()
            .filter(|k| !new.policies.contains_key(*k))
            .cloned()
            .map(Change::DeletePolicy),
    );
    for (k, p) in &new.cluster_policies {
        if old.cluster_policies.get(k) != Some(p) {
            out.push(Change::UpsertClusterPolicy(p.clone()));
        }
    }
    out.extend(
        old.cluster_policies
            .keys()
            .filter(|k| !new.cluster_policies.contains_key(*k))
            .cloned()
            .map(Change::DeleteClusterPolicy),
    );
    for (k, n) in &new.namespaces {
        if old.namespaces.get(k) != Some(n) {
            out.push(Change::UpsertNamespace(n.clone()));
        }
    }
    out.extend(
        old.namespaces
            .keys()
            .filter(|k| !new.namespaces.contains_key(*k))
            .cloned()
            .map(Change::DeleteNamespace),
    );
    for (k, p) in &new.pods {
        if old.pods.get(k) != Some(p) {
            out.push(Change::UpsertPod(p.clone()));
        }
    }
    out.extend(
        old.pods.keys().filter(|k| !new.pods.contains_key(*k)).cloned().map(Change::DeletePod),
    );
    for (k, s) in &new.services {
        if old.services.get(k) != Some(s) {
            out.push(Change::UpsertService(s.clone()));
        }
    }
    out.extend(
        old.services
            .keys()
            .filter(|k| !new.services.contains_key(*k))
            .cloned()
            .map(Change::DeleteService),
    );
    for (k, s) in &new.endpoint_slices {
        if old.endpoint_slices.get(k) != Some(s) {
            out.push(Change::UpsertEndpointSlice(s.clone()));
        }
    }
    out.extend(
        old.endpoint_slices
            .keys()
            .filter(|k| !new.endpoint_slices.contains_key(*k))
            .cloned()
            .map(Change::DeleteEndpointSlice),
    );
    out
}

impl Agent {
    /// Loads the programs and prepares an agent that enforces nothing until the first snapshot.
    pub async fn new(opts: &AgentOptions) -> Result<Self> {
        let mut dp = Dataplane::load(&opts.dataplane).context("loading the eBPF programs")?;
        // The table's real capacity: a pinned table keeps its size, and a requested one is
        // rounded to whole sets.
        let ct_max = dp.conntrack_capacity().context("reading the conntrack table's size")?;
        let ownership = if opts.allow_foreign_programs {
            tracing::warn!(
                "--allow-foreign-programs: attaching also beside other enforcers' programs"
            );
            None
        } else {
            Some(dp.ownership().context("reading the ids of netpol's own programs and maps")?)
        };
        let resolver = Resolver::new().context("opening netlink")?;
        let mut compile = CompileOptions::new(opts.node_name.clone());
        compile.allow_host_to_pods = opts.allow_host_to_pods;
        compile.node_addrs =
            resolver.host_addresses().await.context("listing the node's addresses")?;
        tracing::info!(node = %opts.node_name, addresses = ?compile.node_addrs, "node addresses allowed to reach local pods: {}", opts.allow_host_to_pods);
        Ok(Self {
            dp,
            resolver,
            compiler: Compiler::new(ClusterState::default(), compile),
            layout: Layout::new(),
            applied: KernelMaps::default(),
            bound: BTreeMap::new(),
            pending: BTreeSet::new(),
            refused: BTreeSet::new(),
            new_refusals: 0,
            ownership,
            synced: false,
            node_name: opts.node_name.clone(),
            status_file: opts.status_file.clone(),
            ct_max: ct_max as usize,
            ct_entries: 0,
        })
    }

    /// The dataplane (for counters and inspection).
    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    /// Whether the first snapshot has been enforced.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// Local pods by state: (enforced, pending).
    pub fn endpoint_counts(&self) -> (usize, usize) {
        (self.bound.len(), self.pending.len())
    }

    /// Pod names by interface, for counters and events.
    pub fn endpoint_labels(&self) -> EndpointLabels {
        self.bound
            .iter()
            .map(|(p, b)| {
                (
                    b.ifindex,
                    crate::metrics::PodRef { namespace: p.namespace.clone(), name: p.name.clone() },
                )
            })
            .collect()
    }

    /// What the deny-event reader needs to name pods and rules in the state enforced now.
    pub fn event_names(&self) -> Names {
        let endpoints = self.bound.iter().map(|(p, b)| (b.ifindex, p.clone())).collect();
        Names::new(endpoints, self.compiler.state(), self.applied.rules.clone())
    }

    /// Publishes the kernel counters and fill levels.
    fn publish(&mut self, metrics: &Metrics) {
        match self.dp.counters() {
            Ok(c) => metrics.set_counters(&c, &self.endpoint_labels()),
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "reading counters failed");
                metrics.reconcile_error("counters");
            }
        }
        let (enforced, pending) = self.endpoint_counts();
        metrics.set_endpoints(enforced, pending, self.refused.len());
        for _ in 0..std::mem::take(&mut self.new_refusals) {
            metrics.reconcile_error("foreign_programs");
        }
        use netpol_common::{
            maps,
            policy::{PEER_FULL_BITS, PORT_FULL_BITS},
        };
        // Each stage's full-length entries live in its hash, the shorter ones in its trie.
        let peers = &self.applied.peers;
        let exact = peers.keys().filter(|(bits, _)| *bits == PEER_FULL_BITS).count();
        metrics.set_map_fill(maps::PEER, peers.len() - exact, maps::PEER_MAX);
        metrics.set_map_fill(maps::PEER_EXACT, exact, maps::PEER_EXACT_MAX);
        let ports = &self.applied.ports;
        let exact = ports.keys().filter(|(bits, _)| *bits == PORT_FULL_BITS).count();
        metrics.set_map_fill(maps::PORTS, ports.len() - exact, maps::PORTS_MAX);
        metrics.set_map_fill(maps::PORT_EXACT, exact, maps::PORT_EXACT_MAX);
        metrics.set_map_fill(maps::EP, enforced, maps::EP_MAX);
        // Conntrack pressure: entries left after the last GC pass against the capacity. Near
        // the capacity the kernel's LRU evicts the least recently used flows (which mid-flow
        // pickup re-admits if the policy allows them).
        metrics.set_map_fill(maps::CT, self.ct_entries, self.ct_max);
    }

    /// Enforces a new snapshot of the cluster.
    pub async fn apply_snapshot(&mut self, state: ClusterState) -> Result<()> {
        let started = Instant::now();
        let changes = changes(self.compiler.state(), &state);
        let n = changes.len();
        for c in changes {
            self.compiler.apply(c);
        }
        let maps = self.layout.update(self.compiler.compiled()).context("assigning kernel ids")?;
        if !self.synced {
            // Before the first write: an agent that refuses to start leaves nothing behind.
            self.check_foreign(&maps).await?;
        }
        let diff = KernelMaps::diff(&self.applied, &maps);
        for ((len, data), v) in &diff.ports.upserts {
            self.dp.upsert_port(*len, *data, *v)?;
        }
        for ((len, data), v) in &diff.peers.upserts {
            self.dp.upsert_peer(*len, *data, *v)?;
        }
        self.sync_endpoints(&maps).await?;
        for (len, data) in &diff.peers.deletes {
            self.dp.remove_peer(*len, *data)?;
        }
        for (len, data) in &diff.ports.deletes {
            self.dp.remove_port(*len, *data)?;
        }
        tracing::info!(
            changes = n,
            peers = maps.peers.len(),
            ports = maps.ports.len(),
            enforced = self.bound.len(),
            pending = self.pending.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "policy applied"
        );
        self.applied = maps;
        if !self.synced {
            self.synced = true;
            self.release_unclaimed()?;
        }
        self.write_status();
        Ok(())
    }

    /// What the agent enforces, for the CLI.
    pub fn status(&self) -> Status {
        let state = self.compiler.state();
        let endpoints = self
            .bound
            .iter()
            .map(|(pod, b)| {
                let policies = state
                    .pods
                    .get(pod)
                    .map(|p| {
                        state
                            .policies
                            .values()
                            .filter(|np| {
                                np.namespace == p.namespace && np.pod_selector.matches(&p.labels)
                            })
                            .map(|np| AppliedPolicy {
                                policy: np.key().to_string(),
                                directions: Direction::ALL
                                    .into_iter()
                                    .filter(|d| np.affects(*d))
                                    .map(|d| d.name().to_owned())
                                    .collect(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                EndpointStatus {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    ifindex: b.ifindex,
                    interface: b.name.clone(),
                    ips: b.ips.clone(),
                    generation: b.value.generation,
                    audit: b.value.flags & netpol_common::ep::EP_FLAG_AUDIT != 0,
                    ingress: TierSets::of(&b.value, netpol_common::DIR_INGRESS),
                    egress: TierSets::of(&b.value, netpol_common::DIR_EGRESS),
                    policies,
                }
            })
            .collect();
        let pin_dir = self.dp.pin_dir().to_owned();
        Status {
            node: self.node_name.clone(),
            written_at: crate::status::unix_now(),
            layout: pin_dir
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            pin_dir,
            endpoints,
            pending: self.pending.iter().map(ToString::to_string).collect(),
            rules: self.applied.rules.iter().map(|(id, o)| (*id, RuleStatus::from(o))).collect(),
            peer_entries: self.applied.peers.len(),
            port_entries: self.applied.ports.len(),
        }
    }

    /// Writes the status file, if configured; a failure is logged (enforcement goes on).
    fn write_status(&self) {
        let Some(path) = &self.status_file else {
            return;
        };
        if let Err(e) = self.status().write(path) {
            tracing::warn!(
                error = format!("{:#}", anyhow::Error::new(e)),
                "writing the status file failed"
            );
        }
    }

    /// Binds, updates and unbinds local pods so the endpoint map matches `maps`.
    async fn sync_endpoints(&mut self, maps: &KernelMaps) -> Result<()> {
        let gone: Vec<PodRef> =
            self.bound.keys().filter(|p| !maps.endpoints.contains_key(*p)).cloned().collect();
        for pod in gone {
            if let Some(b) = self.bound.remove(&pod) {
                self.unbind(&pod, &b)?;
            }
        }
        self.pending.retain(|p| maps.endpoints.contains_key(p));
        self.refused.retain(|p| maps.endpoints.contains_key(p));
        for (pod, entry) in &maps.endpoints {
            let mut wanted = entry.value;
            if let Some(b) = self.bound.get_mut(pod) {
                if b.ips == entry.ips {
                    wanted.generation = b.value.generation;
                    if wanted != b.value {
                        wanted.generation = b.value.generation.wrapping_add(1).max(1);
                        self.dp.set_endpoint(b.ifindex, wanted)?;
                        b.value = wanted;
                    }
                    continue;
                }
                // New addresses: find the interface again.
                let b = self.bound.remove(pod).expect("present");
                self.unbind(pod, &b)?;
            }
            self.bind(pod, &entry.ips, wanted).await?;
        }
        Ok(())
    }

    /// Fails with [`ForeignPrograms`] if the interface of a local pod in `maps` carries another
    /// enforcer's programs (unless those are allowed).
    async fn check_foreign(&self, maps: &KernelMaps) -> Result<()> {
        let Some(ours) = &self.ownership else { return Ok(()) };
        for (pod, entry) in &maps.endpoints {
            for ip in &entry.ips {
                let Resolution::Found(iface) = self.resolver.resolve(*ip).await? else { continue };
                let foreign =
                    crate::foreign::find(self.resolver.handle(), &iface.name, iface.ifindex, ours)
                        .await?;
                if !foreign.is_empty() {
                    return Err(anyhow::Error::new(ForeignPrograms {
                        pod: pod.clone(),
                        interface: iface.name,
                        programs: crate::foreign::describe(&foreign),
                    }));
                }
                break;
            }
        }
        Ok(())
    }

    async fn bind(&mut self, pod: &PodRef, ips: &[IpAddr], mut value: Endpoint) -> Result<()> {
        let mut found = None;
        for ip in ips {
            match self.resolver.resolve(*ip).await? {
                Resolution::Found(i) => {
                    found = Some(i);
                    break;
                }
                Resolution::Pending | Resolution::NotLocal => {}
            }
        }
        let Some(iface) = found else {
            if self.pending.insert(pod.clone()) {
                tracing::info!(%pod, ?ips, "no host interface for this pod yet; retrying");
            }
            return Ok(());
        };
        self.pending.remove(pod);
        if let Some(ours) = &self.ownership {
            let foreign =
                crate::foreign::find(self.resolver.handle(), &iface.name, iface.ifindex, ours)
                    .await?;
            if !foreign.is_empty() {
                let refusal = ForeignPrograms {
                    pod: pod.clone(),
                    interface: iface.name.clone(),
                    programs: crate::foreign::describe(&foreign),
                };
                // While enforcing the first snapshot: refuse to start.
                if !self.synced {
                    return Err(anyhow::Error::new(refusal));
                }
                if self.refused.insert(pod.clone()) {
                    self.new_refusals += 1;
                    tracing::error!("{refusal}");
                }
                return Ok(());
            }
        }
        if self.refused.remove(pod) {
            tracing::info!(%pod, interface = %iface.name, "the other programs are gone; attaching");
        }
        // A new generation, also over what a previous agent left in the pinned map, so that
        // conntrack entries decided under other rules are re-checked.
        let previous = self.dp.endpoint(iface.ifindex)?.map_or(0, |e| e.generation);
        value.generation = previous.wrapping_add(1).max(1);
        // Endpoint first, then attach: the programs never see this interface without rules.
        self.dp.set_endpoint(iface.ifindex, value)?;
        self.dp
            .attach(&iface.name)
            .with_context(|| format!("attaching to {} for {pod}", iface.name))?;
        tracing::info!(%pod, interface = %iface.name, ifindex = iface.ifindex, bridge = ?iface.bridge, "enforcing");
        self.bound.insert(
            pod.clone(),
            Bound { ifindex: iface.ifindex, name: iface.name, ips: ips.to_vec(), value },
        );
        Ok(())
    }

    fn unbind(&mut self, pod: &PodRef, b: &Bound) -> Result<()> {
        // Detach first, then remove the entry: never an attached interface without rules.
        self.dp.detach(b.ifindex)?;
        self.dp.remove_endpoint(b.ifindex)?;
        self.dp.forget_counters(b.ifindex)?;
        tracing::info!(%pod, interface = %b.name, "no longer enforced");
        Ok(())
    }

    /// A deleted interface: a pod bound to it loses its binding (the kernel removed the
    /// attachments with the device) and waits for its interface to come back.
    pub fn interface_removed(&mut self, ifindex: u32) -> Result<()> {
        let Some(pod) =
            self.bound.iter().find(|(_, b)| b.ifindex == ifindex).map(|(p, _)| p.clone())
        else {
            return Ok(());
        };
        if let Some(b) = self.bound.remove(&pod) {
            self.unbind(&pod, &b)?;
        }
        self.pending.insert(pod.clone());
        tracing::info!(%pod, ifindex, "interface deleted; waiting for the pod's interface");
        Ok(())
    }

    /// Checks that every bound pod's programs are still attached (someone may have removed them,
    /// or an interface was replaced under the same name) and binds again those that are not.
    pub async fn reconcile_attachments(&mut self) -> Result<()> {
        let pods: Vec<(PodRef, u32)> =
            self.bound.iter().map(|(p, b)| (p.clone(), b.ifindex)).collect();
        let mut lost = false;
        for (pod, ifindex) in pods {
            if self.dp.verify_attached(ifindex)? {
                continue;
            }
            tracing::warn!(%pod, ifindex, "programs no longer attached; attaching again");
            if let Some(b) = self.bound.remove(&pod) {
                self.unbind(&pod, &b)?;
            }
            self.pending.insert(pod);
            lost = true;
        }
        if lost {
            self.retry_pending().await?;
        }
        // Pods refused for other enforcers' programs: maybe those are gone now.
        if !self.refused.is_empty() {
            let maps = self.applied.clone();
            self.sync_endpoints(&maps).await?;
        }
        Ok(())
    }

    /// Whether some pod waits for its interface.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Retries pods whose interface was not found.
    pub async fn retry_pending(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let maps = self.applied.clone();
        let before = self.pending.len();
        let r = self.sync_endpoints(&maps).await;
        if self.pending.len() != before {
            self.write_status();
        }
        r
    }

    /// One conntrack garbage-collection pass.
    pub fn gc(&mut self) -> Result<u64> {
        let stats = self.dp.gc_conntrack(monotonic_ns(), &Timeouts::DEFAULT)?;
        self.ct_entries = stats.scanned.saturating_sub(stats.deleted) as usize;
        Ok(stats.deleted)
    }

    /// Stops enforcing changes but leaves the programs attached and the maps pinned: the
    /// kernel keeps enforcing the last state, and the next agent adopts the pinned attachments
    /// and swaps its programs in without a gap. (On kernels without TCX the netlink filters go
    /// with the process.) `netpol-agent uninstall` removes everything.
    pub fn shutdown(&mut self) -> Result<()> {
        tracing::info!(
            enforced = self.bound.len(),
            "leaving programs attached and maps pinned for the next agent"
        );
        Ok(())
    }

    /// After the first snapshot: releases attachments a previous agent left on interfaces no
    /// local pod has any more.
    fn release_unclaimed(&mut self) -> Result<()> {
        let released = self.dp.release_unclaimed()?;
        if !released.is_empty() {
            tracing::info!(?released, "released attachments of pods that left while no agent ran");
        }
        // Nothing is enforced any more: say so to the CLI.
        self.write_status();
        Ok(())
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(opts: AgentOptions) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let signals = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    run_until(opts, signals).await
}

/// Runs the agent until `shutdown` completes (tests and embedding).
pub async fn run_until(
    opts: AgentOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let mut agent = Agent::new(&opts).await?;
    // Deny and audit events are logged by a task of their own, which names pods with what the
    // sync loop publishes after every change.
    let (names, names_rx) = tokio::sync::watch::channel(Arc::new(Names::default()));
    let events = match agent.dataplane().take_events() {
        Ok(ring) => Some(tokio::spawn(async move {
            if let Err(e) = crate::events::run(ring, names_rx).await {
                tracing::error!(error = format!("{e:#}"), "deny events are no longer logged");
            }
        })),
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "deny events are not logged");
            None
        }
    };
    let metrics = Arc::new(Metrics::new(MetricsOptions { per_pod_labels: opts.per_pod_labels }));
    let health = Health::new(Duration::from_secs(30));
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http = opts.metrics_addr.map(|addr| {
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        tokio::spawn(crate::metrics::serve(addr, metrics.clone(), health.clone(), async move {
            let _ = http_stopped.await;
        }))
    });
    let (tx, mut rx) = mpsc::channel(4);
    let source = match opts.source.clone() {
        SourceConfig::Manifests(dir) => {
            tracing::info!(dir = %dir.display(), "reading cluster state from manifests");
            tokio::spawn(async move {
                source::files::run(source::files::FilesSourceOptions::new(dir), tx)
                    .await
                    .map_err(anyhow::Error::from)
            })
        }
        SourceConfig::Kubernetes { kubeconfig } => {
            let kopts = source::kube::KubeSourceOptions { kubeconfig, ..Default::default() };
            let client =
                source::kube::client(&kopts).await.context("connecting to the Kubernetes API")?;
            tracing::info!("watching Namespaces, Pods and NetworkPolicies; enforcing after the initial lists synced");
            tokio::spawn(async move {
                source::kube::run(client, kopts, tx).await.map_err(anyhow::Error::from)
            })
        }
    };
    let mut host = crate::iface::watch().context("subscribing to netlink link and route events")?;
    let mut retry = tokio::time::interval(opts.retry_interval);
    let mut gc = tokio::time::interval(opts.gc_interval);
    let mut publish = tokio::time::interval(Duration::from_secs(1));
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    let mut reconcile = tokio::time::interval(opts.reconcile_interval);
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(SourceEvent::Snapshot { state, errors, since }) => {
                    metrics.set_source_up(true);
                    metrics.set_manifest_errors(errors.len());
                    if !errors.is_empty() {
                        tracing::warn!(count = errors.len(), "objects ignored; the rest is enforced");
                    }
                    // A failed apply leaves the last good state in the kernel; the next snapshot
                    // or retry tries again.
                    let applied = agent.apply_snapshot(state).await;
                    names.send_replace(Arc::new(agent.event_names()));
                    match applied {
                        Ok(()) => {
                            // From the earliest object change in this snapshot to maps written.
                            metrics.observe_apply(since.elapsed());
                            health.set_ready();
                        }
                        // Another enforcer on this node's pod interfaces: refuse to start.
                        Err(e) if !agent.synced() && e.chain().any(|c| c.is::<ForeignPrograms>()) => {
                            break Err(e);
                        }
                        Err(e) => {
                            metrics.reconcile_error("apply");
                            tracing::error!(error = format!("{e:#}"), "applying policy failed; last good state stays enforced");
                        }
                    }
                }
                Some(SourceEvent::Degraded { reason }) => {
                    metrics.set_source_up(false);
                    tracing::warn!(%reason, "source degraded; enforcing the last state");
                }
                None => {
                    let r = source.await;
                    break Err(anyhow::anyhow!("the source stopped: {r:?}"));
                }
            },
            ev = host.recv() => {
                let had_pending = agent.has_pending();
                let result = match ev {
                    Some(crate::iface::HostEvent::LinkRemoved(i)) => agent.interface_removed(i),
                    Some(crate::iface::HostEvent::Changed) if agent.has_pending() => agent.retry_pending().await,
                    Some(crate::iface::HostEvent::Changed) => Ok(()),
                    None => Err(anyhow::anyhow!("netlink event stream ended")),
                };
                if let Err(e) = result {
                    metrics.reconcile_error("interface");
                    tracing::error!(error = format!("{e:#}"), "handling a netlink event failed");
                }
                // Bindings changed: deny events must name the right pods.
                if had_pending || agent.has_pending() {
                    names.send_replace(Arc::new(agent.event_names()));
                }
            }
            _ = heartbeat.tick() => health.beat(),
            _ = reconcile.tick() => {
                if let Err(e) = agent.reconcile_attachments().await {
                    metrics.reconcile_error("attachments");
                    tracing::error!(error = format!("{e:#}"), "checking attachments failed");
                }
            }
            _ = retry.tick() => {
                let had_pending = agent.has_pending();
                if let Err(e) = agent.retry_pending().await {
                    metrics.reconcile_error("interface");
                    tracing::error!(error = format!("{e:#}"), "retrying pending pods failed");
                }
                if had_pending {
                    names.send_replace(Arc::new(agent.event_names()));
                }
            }
            _ = publish.tick() => agent.publish(&metrics),
            _ = gc.tick() => match agent.gc() {
                Ok(n) => {
                    metrics.gc(n);
                    if n > 0 {
                        tracing::debug!(deleted = n, "conntrack GC");
                    }
                }
                Err(e) => {
                    metrics.reconcile_error("conntrack_gc");
                    tracing::error!(error = format!("{e:#}"), "conntrack GC failed");
                }
            },
            _ = &mut shutdown => break Ok(()),
        }
    };
    tracing::info!("shutting down");
    if let Some(events) = events {
        events.abort();
    }
    let _ = stop_http.send(());
    if let Some(h) = http {
        let _ = h.await;
    }
    agent.shutdown()?;
    result
}
