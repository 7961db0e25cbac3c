//! Scenario files: namespaces, pods with ports, and steps (apply or delete a policy, relabel a
//! pod or namespace, expect who reaches whom), run against a lab node enforced by the real agent.
//!
//! ```yaml
//! name: http-echo
//! namespaces:
//! - name: ns-1
//!   labels: {}
//! pods:
//! - {namespace: ns-1, name: http-echo, labels: {app: http-echo}, ports: [{port: 80, protocol: TCP}]}
//! - {namespace: ns-1, name: busybox, labels: {run: busybox}}
//! steps:
//! - expect: {port: 80/TCP, reach: [[ns-1/busybox, ns-1/http-echo, true]]}
//! - apply: |
//!     kind: NetworkPolicy
//!     ...
//!   namespace: ns-1          # like `kubectl apply -n`, when the manifest names none
//! - delete: ns-1/deny-all    # a NetworkPolicy, as namespace/name
//! - delete: ClusterNetworkPolicy/default-deny   # a cluster-scoped policy, as kind/name
//! - label_pod: {pod: ns-1/busybox, labels: {app: busybox}}       # null removes a label
//! - label_namespace: {namespace: ns-1, labels: {purpose: dev}}
//! - expect: {port: 80/TCP, reach: [[ns-1/busybox, svc:ns-1/http-echo, true]]}   # via a Service
//! - expect:
//!     port: 80/TCP
//!     matrix: |               # rows: from, columns: to; `.` reached, `X` blocked, `?` any
//!       from\to        ns-1/http-echo
//!       ns-1/busybox   .
//! - full_matrix: true         # every pod to every pod on every declared port and protocol,
//!                             # each cell checked against the compiler's verdict (`explain`);
//!                             # pods only: Service columns belong in `expect` steps
//! ```
//!
//! Services (optional) get a Service address in a blackholed lab /24, an EndpointSlice per
//! resolved target port computed from the pods their selector matches (as the EndpointSlice
//! controller does; recomputed when a pod is relabelled), and a kube-proxy-style DNAT in the
//! host namespace ([`crate::services::ServiceNat`]):
//!
//! ```yaml
//! services:
//! - {namespace: ns-1, name: http-echo, selector: {app: http-echo}, ports: [{port: 8080, targetPort: 80}]}
//! ```
//!
//! A column `svc:NAMESPACE/NAME` probes the Service address at the expectation's port (a
//! Service port; TCP or UDP).
//!
//! Each step may have a `name`. The lab starts a TCP echo server on every TCP port and a UDP echo
//! server on every UDP port of a pod; SCTP probes are INIT chunks received by a raw socket in the
//! destination pod.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;

use netpol_agent::explain;

use crate::{
    agent::RunningAgent,
    interrupt,
    lab::{Lab, Pod, Topology},
    manifests::{namespace, pod_with_protocols, ManifestDir},
    probe::{sctp_init, tcp_echo, udp_echo, TcpServer, UdpServer},
    services::{service_manifest, slice_manifest, Backend, ServiceNat},
};

/// The node the scenario's pods run on.
pub const NODE: &str = "lab-node";
/// How long one probe waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(400);
/// How long a wrong cell is probed again before it counts as a mismatch (policy changes are
/// asynchronous, even after the agent reported the apply).
const SETTLE: Duration = Duration::from_secs(3);

/// A scenario file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// What it shows.
    pub name: String,
    /// Where it comes from and what it leaves out.
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub namespaces: Vec<NamespaceSpec>,
    pub pods: Vec<PodSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    pub steps: Vec<Step>,
    /// The file it was read from (set by [`Scenario::load`]).
    #[serde(skip)]
    pub file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

/// A Service: ClusterIP type, selector-based endpoints.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePortSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePortSpec {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    /// A number or a container port name; default: `port`.
    #[serde(default, rename = "targetPort")]
    pub target_port: Option<PortRef>,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    #[default]
    TCP,
    UDP,
    SCTP,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::TCP => 6,
            Protocol::UDP => 17,
            Protocol::SCTP => 132,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

/// One step: exactly one of `apply`, `delete`, `label_pod`, `label_namespace`, `expect`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    #[serde(default)]
    pub name: Option<String>,
    /// NetworkPolicy YAML (one or more documents), or the path of a file holding it (relative
    /// to the scenario file).
    #[serde(default)]
    pub apply: Option<String>,
    /// The namespace for `apply` manifests that name none.
    #[serde(default)]
    pub namespace: Option<String>,
    /// A NetworkPolicy to delete, as namespace/name.
    #[serde(default)]
    pub delete: Option<String>,
    #[serde(default)]
    pub label_pod: Option<LabelPod>,
    #[serde(default)]
    pub label_namespace: Option<LabelNamespace>,
    #[serde(default)]
    pub expect: Option<Expect>,
    /// Probe every pod to every other pod on every port a pod declares (TCP, UDP and SCTP) and
    /// check each cell against the verdict the compiler gives for the same manifests.
    #[serde(default)]
    pub full_matrix: bool,
}

/// New labels for a running pod: merged into its labels; `null` removes one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelPod {
    pub pod: String,
    pub labels: BTreeMap<String, Option<String>>,
}

/// New labels for a namespace: merged into its labels; `null` removes one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelNamespace {
    pub namespace: String,
    pub labels: BTreeMap<String, Option<String>>,
}

/// Expected reachability on one port: listed pairs, or a full matrix.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// `6379/TCP`, `53/UDP`, `80` (TCP).
    pub port: PortRef,
    #[serde(default)]
    pub reach: Option<Vec<(String, String, bool)>>,
    #[serde(default)]
    pub matrix: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Text(String),
}

impl PortRef {
    fn parse(&self) -> Result<(u16, Protocol)> {
        match self {
            PortRef::Number(n) => Ok((*n, Protocol::TCP)),
            PortRef::Text(t) => {
                let (port, proto) = t.split_once('/').unwrap_or((t, "TCP"));
                let port = port.trim().parse().with_context(|| format!("bad port {t:?}"))?;
                let proto = match proto.trim().to_ascii_uppercase().as_str() {
                    "TCP" => Protocol::TCP,
                    "UDP" => Protocol::UDP,
                    "SCTP" => Protocol::SCTP,
                    other => bail!("unknown protocol {other:?} in {t:?} (TCP, UDP or SCTP)"),
                };
                Ok((port, proto))
            }
        }
    }
}

/// What one expectation checks: the rows (from) and columns (to) of its matrix, and the
/// expected value of each checked cell.
struct Checks {
    port: u16,
    proto: Protocol,
    rows: Vec<String>,
    cols: Vec<String>,
    want: BTreeMap<(usize, usize), bool>,
}

impl Expect {
    fn checks(&self) -> Result<Checks> {
        let (port, proto) = self.port.parse().context("port")?;
        let mut c = Checks { port, proto, rows: vec![], cols: vec![], want: BTreeMap::new() };
        let index = |v: &mut Vec<String>, s: &str| match v.iter().position(|x| x == s) {
            Some(i) => i,
            None => {
                v.push(s.to_owned());
                v.len() - 1
            }
        };
        match (&self.reach, &self.matrix) {
            (Some(reach), None) => {
                for (from, to, want) in reach {
                    let (r, k) = (index(&mut c.rows, from), index(&mut c.cols, to));
                    c.want.insert((r, k), *want);
                }
            }
            (None, Some(m)) => {
                let mut lines = m.lines().filter(|l| !l.trim().is_empty());
                let header = lines.next().context("matrix: no header line (the `to` pods)")?;
                // An optional corner word (`from\to`: pods are always namespace/name).
                c.cols = header
                    .split_whitespace()
                    .enumerate()
                    .filter(|(i, w)| *i > 0 || w.contains('/'))
                    .map(|(_, w)| w.to_owned())
                    .collect();
                for line in lines {
                    let mut words = line.split_whitespace();
                    let from = words.next().unwrap_or_default();
                    let cells: Vec<&str> = words.collect();
                    if cells.len() != c.cols.len() {
                        bail!(
                            "matrix: row {from:?} has {} cells for {} columns",
                            cells.len(),
                            c.cols.len()
                        );
                    }
                    let r = index(&mut c.rows, from);
                    for (k, cell) in cells.iter().enumerate() {
                        let want = match *cell {
                            "." => true,
                            "X" | "x" => false,
                            "?" | "-" => continue,
                            other => bail!("matrix: row {from:?}: cell {other:?} is not . X or ?"),
                        };
                        c.want.insert((r, k), want);
                    }
                }
            }
            _ => bail!("expect needs exactly one of `reach` and `matrix`"),
        }
        if c.want.is_empty() {
            bail!("expect checks nothing");
        }
        Ok(c)
    }
}

/// A step's action, validated.
enum Action<'a> {
    Apply(Vec<(String, String, String)>),
    Delete(&'a str, &'a str),
    LabelPod(&'a LabelPod),
    LabelNamespace(&'a LabelNamespace),
    Expect(Checks),
    FullMatrix,
}

impl Step {
    fn describe(&self, i: usize) -> String {
        match &self.name {
            Some(n) => format!("steps[{i}] ({n})"),
            None => format!("steps[{i}]"),
        }
    }
}

/// Cluster-scoped policy kinds steps may apply; they are named `kind/name` in steps.
const CLUSTER_KINDS: [&str; 3] =
    ["ClusterNetworkPolicy", "AdminNetworkPolicy", "BaselineAdminNetworkPolicy"];

/// Policy manifests of an `apply`: (namespace, name, YAML) per document; a cluster-scoped
/// policy has its kind in place of the namespace.
fn policies(text: &str, default_ns: Option<&str>) -> Result<Vec<(String, String, String)>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let mut v = serde_yaml::Value::deserialize(doc).context("policy YAML")?;
        if v.is_null() {
            continue;
        }
        let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_owned();
        let cluster = CLUSTER_KINDS.contains(&kind.as_str());
        if kind != "NetworkPolicy" && !cluster {
            bail!("apply: kind {kind:?}; only NetworkPolicy and {CLUSTER_KINDS:?} manifests are applied by steps");
        }
        let meta = v
            .get_mut("metadata")
            .and_then(|m| m.as_mapping_mut())
            .context("apply: a NetworkPolicy without metadata")?;
        let name = meta
            .get("name")
            .and_then(|n| n.as_str())
            .context("apply: no metadata.name")?
            .to_owned();
        let ns = match meta.get("namespace").and_then(|n| n.as_str()) {
            _ if cluster => kind,
            Some(ns) => ns.to_owned(),
            None => {
                let ns = default_ns.with_context(|| {
                    format!(
                        "apply: policy {name} names no namespace and the step has no `namespace`"
                    )
                })?;
                meta.insert("namespace".into(), ns.into());
                ns.to_owned()
            }
        };
        out.push((ns, name, serde_yaml::to_string(&v)?));
    }
    if out.is_empty() {
        bail!("apply: no manifest");
    }
    Ok(out)
}

impl Scenario {
    /// Reads and validates a scenario file; errors name the file and the field.
    pub fn load(path: &Path) -> Result<Scenario> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut s: Scenario = serde_yaml::from_str(&text)
            .with_context(|| format!("{}: not a valid scenario", path.display()))?;
        s.file = path.to_owned();
        s.validate().with_context(|| format!("{}: invalid scenario", path.display()))?;
        Ok(s)
    }

    fn pod_key(p: &PodSpec) -> String {
        format!("{}/{}", p.namespace, p.name)
    }

    fn validate(&self) -> Result<()> {
        for (i, p) in self.pods.iter().enumerate() {
            if !self.namespaces.iter().any(|n| n.name == p.namespace) {
                bail!("pods[{i}] ({}): namespace {:?} is not declared", p.name, p.namespace);
            }
            if self.pods[..i].iter().any(|q| Scenario::pod_key(q) == Scenario::pod_key(p)) {
                bail!("pods[{i}]: {} declared twice", Scenario::pod_key(p));
            }
        }
        if self.pods.is_empty() {
            bail!("pods: none");
        }
        for (i, svc) in self.services.iter().enumerate() {
            if !self.namespaces.iter().any(|n| n.name == svc.namespace) {
                bail!(
                    "services[{i}] ({}): namespace {:?} is not declared",
                    svc.name,
                    svc.namespace
                );
            }
            if svc.ports.is_empty() {
                bail!("services[{i}] ({}): no ports", svc.name);
            }
            if svc.ports.iter().any(|p| p.protocol == Protocol::SCTP) {
                bail!("services[{i}] ({}): SCTP Services are not probed by the lab", svc.name);
            }
        }
        for (i, step) in self.steps.iter().enumerate() {
            self.action(step).with_context(|| step.describe(i))?;
        }
        Ok(())
    }

    fn has_pod(&self, key: &str) -> Result<()> {
        if self.pods.iter().any(|p| Scenario::pod_key(p) == key) {
            Ok(())
        } else {
            bail!("no pod {key:?} (pods are named namespace/name)")
        }
    }

    /// The Service a `svc:namespace/name` column names.
    fn service(&self, key: &str) -> Option<&ServiceSpec> {
        let key = key.strip_prefix("svc:")?;
        self.services.iter().find(|s| format!("{}/{}", s.namespace, s.name) == key)
    }

    fn action<'a>(&self, step: &'a Step) -> Result<Action<'a>> {
        let set = [
            step.apply.is_some(),
            step.delete.is_some(),
            step.label_pod.is_some(),
            step.label_namespace.is_some(),
            step.expect.is_some(),
            step.full_matrix,
        ];
        if set.iter().filter(|b| **b).count() != 1 {
            bail!(
                "needs exactly one of apply, delete, label_pod, label_namespace, expect, full_matrix"
            );
        }
        if step.namespace.is_some() && step.apply.is_none() {
            bail!("`namespace` only goes with `apply`");
        }
        if let Some(apply) = &step.apply {
            let text = if !apply.contains('\n') && apply.trim_end().ends_with(".yaml") {
                let base = self.file.parent().unwrap_or(Path::new("."));
                let f = base.join(apply.trim());
                std::fs::read_to_string(&f).with_context(|| format!("apply: {}", f.display()))?
            } else {
                apply.clone()
            };
            return Ok(Action::Apply(policies(&text, step.namespace.as_deref())?));
        }
        if let Some(d) = &step.delete {
            let (ns, name) = d.split_once('/').context("delete: expected namespace/name")?;
            return Ok(Action::Delete(ns, name));
        }
        if let Some(l) = &step.label_pod {
            self.has_pod(&l.pod).context("label_pod.pod")?;
            return Ok(Action::LabelPod(l));
        }
        if let Some(l) = &step.label_namespace {
            if !self.namespaces.iter().any(|n| n.name == l.namespace) {
                bail!("label_namespace.namespace: no namespace {:?}", l.namespace);
            }
            return Ok(Action::LabelNamespace(l));
        }
        if step.full_matrix {
            return Ok(Action::FullMatrix);
        }
        let Some(e) = &step.expect else { unreachable!("one action is set") };
        let c = e.checks().context("expect")?;
        for p in &c.rows {
            self.has_pod(p).context("expect")?;
        }
        for p in &c.cols {
            if p.starts_with("svc:") {
                let svc = self.service(p).with_context(|| format!("expect: no Service {p:?}"))?;
                if !svc.ports.iter().any(|sp| sp.port == c.port && sp.protocol == c.proto) {
                    bail!("expect: Service {p} has no port {}/{}", c.port, c.proto);
                }
            } else {
                self.has_pod(p).context("expect")?;
            }
        }
        Ok(Action::Expect(c))
    }
}

/// A scenario's lab node: the lab with its pods and servers, the manifests and the agent.
pub struct Node<'s> {
    scenario: &'s Scenario,
    topology: Topology,
    // Dropped in this order: agent, servers, manifests, lab.
    agent: RunningAgent,
    _tcp: Vec<TcpServer>,
    _udp: Vec<UdpServer>,
    dir: ManifestDir,
    pods: BTreeMap<String, (Pod, BTreeMap<String, String>)>,
    ns_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Per Service (`svc:namespace/name`): its DNAT and how many slices it has now.
    services: BTreeMap<String, (ServiceNat, usize)>,
    _lab: Lab,
    /// The /24 the Service addresses come from.
    _vips: Lab,
}

fn pairs(m: &BTreeMap<String, String>) -> Vec<(&str, &str)> {
    m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn merge(into: &mut BTreeMap<String, String>, labels: &BTreeMap<String, Option<String>>) {
    for (k, v) in labels {
        match v {
            Some(v) => into.insert(k.clone(), v.clone()),
            None => into.remove(k),
        };
    }
}

fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::TCP => "TCP",
        Protocol::UDP => "UDP",
        Protocol::SCTP => "SCTP",
    }
}

/// A short name for files and pins.
fn slug(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect();
    s.chars().take(24).collect()
}

impl Node<'_> {
    fn pod_manifest(&self, key: &str) -> Result<String> {
        let spec = self
            .scenario
            .pods
            .iter()
            .find(|p| Scenario::pod_key(p) == key)
            .context(key.to_owned())?;
        let (pod, labels) = &self.pods[key];
        let ports: Vec<(&str, u16, &str)> = spec
            .ports
            .iter()
            .map(|p| {
                let proto = match p.protocol {
                    Protocol::TCP => "TCP",
                    Protocol::UDP => "UDP",
                    Protocol::SCTP => "SCTP",
                };
                (p.name.as_deref().unwrap_or(""), p.port, proto)
            })
            .collect();
        Ok(pod_with_protocols(pod, &spec.namespace, NODE, &pairs(labels), &ports))
    }

    /// What the EndpointSlice controller and kube-proxy would make of `svc` now: per distinct
    /// set of resolved target ports, the ready pods (slices), and the backends of each port.
    #[allow(clippy::type_complexity)]
    fn endpoints(
        &self,
        svc: &ServiceSpec,
    ) -> (Vec<(Vec<(String, Protocol, u16)>, Vec<std::net::Ipv4Addr>)>, Vec<Vec<Backend>>) {
        let mut slices: BTreeMap<Vec<(String, Protocol, u16)>, Vec<std::net::Ipv4Addr>> =
            BTreeMap::new();
        let mut backends = vec![Vec::new(); svc.ports.len()];
        for spec in self.scenario.pods.iter().filter(|p| p.namespace == svc.namespace) {
            let (pod, labels) = &self.pods[&Scenario::pod_key(spec)];
            if !svc.selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
                continue;
            }
            let mut ports = Vec::new();
            for (i, sp) in svc.ports.iter().enumerate() {
                // A named targetPort resolves per pod; a pod without it serves no such port.
                let target = match &sp.target_port {
                    None => Some(sp.port),
                    Some(PortRef::Number(n)) => Some(*n),
                    Some(PortRef::Text(t)) => t.parse().ok().or_else(|| {
                        spec.ports
                            .iter()
                            .find(|cp| cp.name.as_deref() == Some(t) && cp.protocol == sp.protocol)
                            .map(|cp| cp.port)
                    }),
                };
                if let Some(t) = target {
                    ports.push((sp.name.clone().unwrap_or_default(), sp.protocol, t));
                    backends[i].push(Backend { ip: pod.ip, port: t });
                }
            }
            slices.entry(ports).or_default().push(pod.ip);
        }
        (slices.into_iter().collect(), backends)
    }

    /// Writes every Service's manifests and programs its DNAT for the current pod labels;
    /// returns whether a manifest changed.
    fn sync_services(&mut self) -> Result<bool> {
        let mut changed = false;
        let write = |dir: &ManifestDir, file: &str, text: &str| -> Result<bool> {
            let path = dir.path().join(file);
            if std::fs::read_to_string(&path).ok().as_deref() == Some(text) {
                return Ok(false);
            }
            dir.write(file, text)?;
            Ok(true)
        };
        for svc in &self.scenario.services {
            let key = format!("svc:{}/{}", svc.namespace, svc.name);
            let (slices, backends) = self.endpoints(svc);
            let (nat, count) = &self.services[&key];
            let ports: Vec<(&str, &str, u16, String)> = svc
                .ports
                .iter()
                .map(|p| {
                    let target = match &p.target_port {
                        None => p.port.to_string(),
                        Some(PortRef::Number(n)) => n.to_string(),
                        Some(PortRef::Text(t)) => t.clone(),
                    };
                    (p.name.as_deref().unwrap_or(""), proto_name(p.protocol), p.port, target)
                })
                .collect();
            let ports: Vec<(&str, &str, u16, &str)> =
                ports.iter().map(|(n, pr, p, t)| (*n, *pr, *p, t.as_str())).collect();
            let base = format!("{}-{}", svc.namespace, svc.name);
            changed |= write(
                &self.dir,
                &format!("svc-{base}.yaml"),
                &service_manifest(&svc.namespace, &svc.name, nat.vip(), &ports),
            )?;
            for (i, (ports, ips)) in slices.iter().enumerate() {
                let ports: Vec<(&str, &str, u16)> =
                    ports.iter().map(|(n, pr, p)| (n.as_str(), proto_name(*pr), *p)).collect();
                let eps: Vec<(std::net::Ipv4Addr, bool)> =
                    ips.iter().map(|ip| (*ip, true)).collect();
                let name = format!("{}-{i}", svc.name);
                let text = slice_manifest(&svc.namespace, &name, &svc.name, &ports, &eps);
                changed |= write(&self.dir, &format!("slice-{base}-{i}.yaml"), &text)?;
            }
            for i in slices.len()..*count {
                self.dir.remove(&format!("slice-{base}-{i}.yaml"))?;
                changed = true;
            }
            let rules: Vec<(&str, u16, Vec<Backend>)> = svc
                .ports
                .iter()
                .zip(backends)
                .map(|(p, b)| (proto_name(p.protocol), p.port, b))
                .map(|(pr, p, b)| (if pr == "TCP" { "tcp" } else { "udp" }, p, b))
                .collect();
            nat.set(&rules)?;
            let n = slices.len();
            self.services.get_mut(&key).expect("exists").1 = n;
        }
        Ok(changed)
    }

    /// Writes (or removes, `text` None) a manifest and waits until the agent applied it.
    fn change(&self, file: &str, text: Option<&str>) -> Result<()> {
        let before = self.agent.applies();
        match text {
            Some(t) => self.dir.write(file, t)?,
            None => self.dir.remove(file)?,
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.agent.applies() <= before {
            if Instant::now() > deadline {
                bail!("the agent applied no new snapshot within 10 s after writing {file}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn probe(&self, from: &str, to: &str, port: u16, proto: Protocol) -> Result<bool> {
        let from = &self.pods[from].0;
        if let Some((nat, _)) = self.services.get(to) {
            let addr = SocketAddr::from((nat.vip(), port));
            return match proto {
                Protocol::TCP => tcp_echo(&from.netns, addr, PROBE_TIMEOUT),
                Protocol::UDP => udp_echo(&from.netns, addr, PROBE_TIMEOUT),
                Protocol::SCTP => bail!("SCTP probes to Services are not supported"),
            };
        }
        let to = &self.pods[to].0;
        let addr = SocketAddr::from((to.ip, port));
        match proto {
            Protocol::TCP => tcp_echo(&from.netns, addr, PROBE_TIMEOUT),
            Protocol::UDP => udp_echo(&from.netns, addr, PROBE_TIMEOUT),
            Protocol::SCTP => sctp_init(&from.netns, &to.netns, addr, PROBE_TIMEOUT),
        }
    }

    /// Probes every cell of the matrix (TCP and UDP in parallel; SCTP one at a time, its probes
    /// share a source port), probing wrong cells again until they settle or [`SETTLE`] passes.
    fn observe(&self, c: &Checks) -> Result<BTreeMap<(usize, usize), bool>> {
        let cells: Vec<(usize, usize)> =
            (0..c.rows.len()).flat_map(|r| (0..c.cols.len()).map(move |k| (r, k))).collect();
        let probe_all = |cells: &[(usize, usize)]| -> Result<Vec<((usize, usize), bool)>> {
            if c.proto == Protocol::SCTP {
                return cells
                    .iter()
                    .map(|&(r, k)| {
                        Ok(((r, k), self.probe(&c.rows[r], &c.cols[k], c.port, c.proto)?))
                    })
                    .collect();
            }
            std::thread::scope(|s| {
                let handles: Vec<_> = cells
                    .iter()
                    .map(|&(r, k)| {
                        s.spawn(move || {
                            Ok(((r, k), self.probe(&c.rows[r], &c.cols[k], c.port, c.proto)?))
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("probe thread")).collect()
            })
        };
        let mut got: BTreeMap<_, _> = probe_all(&cells)?.into_iter().collect();
        let deadline = Instant::now() + SETTLE;
        loop {
            let wrong: Vec<(usize, usize)> = c
                .want
                .iter()
                .filter(|(cell, w)| got[*cell] != **w)
                .map(|(cell, _)| *cell)
                .collect();
            if wrong.is_empty() || Instant::now() > deadline {
                return Ok(got);
            }
            interrupt::check()?;
            std::thread::sleep(Duration::from_millis(100));
            got.extend(probe_all(&wrong)?);
        }
    }
}

/// Formats an observed matrix e2e-style (rows from, columns to; `.` reached, `X` blocked, `!`
/// after a cell that differs from the expectation, lower case for cells not checked) and
/// returns it with the mismatches.
fn print_matrix(c: &Checks, got: &BTreeMap<(usize, usize), bool>) -> (String, Vec<String>) {
    let width = c.rows.iter().map(String::len).max().unwrap_or(0);
    let mut out = format!("   {:width$}", format!("{}/{}", c.port, c.proto));
    for (k, col) in c.cols.iter().enumerate() {
        let _ = write!(out, "  [{k}] {col}");
    }
    out.push('\n');
    let mut wrong = Vec::new();
    for (r, row) in c.rows.iter().enumerate() {
        let _ = write!(out, "   {row:width$}");
        for (k, col) in c.cols.iter().enumerate() {
            let g = got[&(r, k)];
            let mark = if g { '.' } else { 'X' };
            let cell = match c.want.get(&(r, k)) {
                None => format!("{}", mark.to_ascii_lowercase()),
                Some(w) if *w == g => format!("{mark}"),
                Some(w) => {
                    wrong.push(format!(
                        "{row} -> {col} {}/{}: expected {}, observed {}",
                        c.port,
                        c.proto,
                        if *w { "reached" } else { "blocked" },
                        if g { "reached" } else { "blocked" }
                    ));
                    format!("{mark}!")
                }
            };
            let _ = write!(out, "  {cell:<width$}", width = col.len() + 4);
        }
        out.push('\n');
    }
    (out, wrong)
}

impl<'s> Node<'s> {
    /// Builds the scenario's node in a fresh lab of `topology`: one network namespace per pod
    /// with servers on its declared ports, the Namespace and Pod manifests, and the agent
    /// enforcing them (ready when this returns).
    pub fn start(scenario: &'s Scenario, topology: Topology) -> Result<Node<'s>> {
        let tag = format!("{}-{topology:?}", slug(&scenario.name));
        let mut lab = Lab::with_topology(topology)?;
        let mut pods = BTreeMap::new();
        let (mut tcp, mut udp) = (Vec::new(), Vec::new());
        for spec in &scenario.pods {
            interrupt::check()?;
            let pod = lab.add_pod(&spec.name)?;
            for p in &spec.ports {
                match p.protocol {
                    Protocol::TCP => tcp.push(TcpServer::start(&pod.netns, p.port)?),
                    Protocol::UDP => udp.push(UdpServer::start(&pod.netns, p.port)?),
                    Protocol::SCTP => {}
                }
            }
            let ports: Vec<String> =
                spec.ports.iter().map(|p| format!("{}/{}", p.port, p.protocol)).collect();
            println!(
                "   pod {:<28} {:<15} {:<18} ports {:<20} labels {:?}",
                Scenario::pod_key(spec),
                pod.ip,
                pod.netns,
                ports.join(","),
                spec.labels
            );
            pods.insert(Scenario::pod_key(spec), (pod, spec.labels.clone()));
        }
        let dir = ManifestDir::new(&tag)?;
        let mut ns_labels = BTreeMap::new();
        for ns in &scenario.namespaces {
            dir.write(&format!("ns-{}.yaml", ns.name), &namespace(&ns.name, &pairs(&ns.labels)))?;
            ns_labels.insert(ns.name.clone(), ns.labels.clone());
        }
        // Service addresses come from a /24 of their own, blackholed like every lab range.
        let vips = Lab::new()?;
        let mut services = BTreeMap::new();
        for (i, svc) in scenario.services.iter().enumerate() {
            let vip = vips.address(10 + i as u8);
            println!(
                "   service {:<24} {vip:<15} {:?}",
                format!("{}/{}", svc.namespace, svc.name),
                svc.selector
            );
            let nat = ServiceNat::new(vip)?;
            nat.route_from(&lab)?;
            services.insert(format!("svc:{}/{}", svc.namespace, svc.name), (nat, 0));
        }
        let agent = RunningAgent::start(&dir, NODE, &tag);
        let mut node = Node {
            scenario,
            topology,
            agent,
            _tcp: tcp,
            _udp: udp,
            dir,
            pods,
            ns_labels,
            services,
            _lab: lab,
            _vips: vips,
        };
        for key in node.pods.keys() {
            node.dir
                .write(&format!("pod-{}.yaml", key.replace('/', "-")), &node.pod_manifest(key)?)?;
        }
        node.sync_services()?;
        node.agent.wait_ready();
        Ok(node)
    }

    /// The manifests directory the agent watches.
    pub fn manifests(&self) -> &Path {
        self.dir.path()
    }

    /// The agent (metrics address, pin directory, status file).
    pub fn agent(&self) -> &RunningAgent {
        &self.agent
    }

    /// The lab pods by `namespace/name`.
    pub fn pods(&self) -> impl Iterator<Item = (&str, &Pod)> {
        self.pods.iter().map(|(k, (p, _))| (k.as_str(), p))
    }

    /// Runs step `i`, printing what it does and, for expectations, the observed matrix; returns
    /// the unexpected cells.
    pub fn step(&mut self, i: usize) -> Result<Vec<String>> {
        interrupt::check()?;
        let scenario = self.scenario;
        let step = &scenario.steps[i];
        let what = step.describe(i);
        let action = scenario.action(step).with_context(|| what.clone())?;
        let mut failures = Vec::new();
        match action {
            Action::Apply(docs) => {
                for (ns, name, text) in docs {
                    println!("-- {what}: apply {ns}/{name}");
                    self.change(&format!("netpol-{ns}-{name}.yaml"), Some(&text))?;
                }
            }
            Action::Delete(ns, name) => {
                println!("-- {what}: delete {ns}/{name}");
                self.change(&format!("netpol-{ns}-{name}.yaml"), None)
                    .with_context(|| format!("{what}: no policy {ns}/{name} was applied"))?;
            }
            Action::LabelPod(l) => {
                println!("-- {what}: label pod {} {:?}", l.pod, l.labels);
                merge(&mut self.pods.get_mut(&l.pod).expect("validated").1, &l.labels);
                let text = self.pod_manifest(&l.pod)?;
                self.change(&format!("pod-{}.yaml", l.pod.replace('/', "-")), Some(&text))?;
                // Selectors may match differently now: new slices and DNAT.
                let before = self.agent.applies();
                if self.sync_services()? {
                    self.agent.wait_applied(before);
                }
            }
            Action::LabelNamespace(l) => {
                println!("-- {what}: label namespace {} {:?}", l.namespace, l.labels);
                let labels = self.ns_labels.get_mut(&l.namespace).expect("validated");
                merge(labels, &l.labels);
                let text = namespace(&l.namespace, &pairs(labels));
                self.change(&format!("ns-{}.yaml", l.namespace), Some(&text))?;
            }
            Action::Expect(c) => {
                println!("-- {what}: expect (rows from, columns to; . reached, X blocked, ! unexpected, lower case not checked)");
                let got = self.observe(&c)?;
                let (text, wrong) = print_matrix(&c, &got);
                print!("{text}");
                failures.extend(wrong.into_iter().map(|w| format!("{what}: {w}")));
            }
            Action::FullMatrix => {
                println!("-- {what}: every pod to every pod on every declared port, checked against the compiler's verdict (explain)");
                for c in self.full_checks()? {
                    let got = self.observe(&c)?;
                    let (text, wrong) = print_matrix(&c, &got);
                    print!("{text}");
                    failures.extend(wrong.into_iter().map(|w| format!("{what}: {w}")));
                }
            }
        }
        Ok(failures)
    }

    /// One check per declared (port, protocol): every pod to every pod serving it (not itself:
    /// that traffic never leaves the pod), expected cells from `explain` over the manifests the
    /// agent reads right now.
    fn full_checks(&self) -> Result<Vec<Checks>> {
        let (state, errors) = netpol_agent::manifest::load_dir(self.dir.path());
        if let Some(e) = errors.first() {
            bail!("the lab's own manifests do not load: {e}");
        }
        let mut ports: Vec<(u16, Protocol)> = self
            .scenario
            .pods
            .iter()
            .flat_map(|p| p.ports.iter().map(|q| (q.port, q.protocol)))
            .collect();
        ports.sort_by_key(|&(port, proto)| (port, proto as u8));
        ports.dedup();
        let rows: Vec<String> = self.pods.keys().cloned().collect();
        let mut out = Vec::new();
        for (port, proto) in ports {
            let cols: Vec<String> = self
                .scenario
                .pods
                .iter()
                .filter(|p| p.ports.iter().any(|q| q.port == port && q.protocol == proto))
                .map(Scenario::pod_key)
                .collect();
            let mut c = Checks { port, proto, rows: rows.clone(), cols, want: BTreeMap::new() };
            for (r, from) in c.rows.iter().enumerate() {
                for (k, to) in c.cols.iter().enumerate() {
                    if from == to {
                        continue;
                    }
                    let q = explain::Query {
                        from: explain::Peer::Pod(pod_ref(from)),
                        to: explain::Peer::Pod(pod_ref(to)),
                        proto: proto.number(),
                        port,
                        node: Some(NODE.to_owned()),
                        node_addrs: Vec::new(),
                        allow_host_to_pods: true,
                    };
                    let report = explain::explain(&state, &q)
                        .with_context(|| format!("explain {from} -> {to} {port}/{proto}"))?;
                    c.want.insert((r, k), report.allow);
                }
            }
            out.push(c);
        }
        Ok(out)
    }

    /// Waits for Ctrl-C (see [`interrupt`]), for `cargo xtask lab up`.
    pub fn hold(&self) {
        while !interrupt::interrupted() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn pod_ref(key: &str) -> netpol_agent::model::PodRef {
    let (ns, name) = key.split_once('/').expect("pod keys are namespace/name");
    netpol_agent::model::PodRef::new(ns, name)
}

/// Runs a scenario in a fresh lab of `topology`, printing every step and its matrix; fails with
/// the list of mismatched cells (all steps run, so that the whole story is printed).
pub fn run(scenario: &Scenario, topology: Topology) -> Result<()> {
    println!(
        "== scenario {:?} ({}), {topology:?} topology",
        scenario.name,
        scenario.file.display()
    );
    let mut node = Node::start(scenario, topology)?;
    let mut failures = Vec::new();
    for i in 0..scenario.steps.len() {
        failures.extend(node.step(i)?);
    }
    if !failures.is_empty() {
        bail!(
            "scenario {:?} ({:?}): {} unexpected cell(s):\n  {}",
            scenario.name,
            node.topology,
            failures.len(),
            failures.join("\n  ")
        );
    }
    println!("== scenario {:?} ({topology:?}): every expectation met", scenario.name);
    Ok(())
}

/// The scenario files shipped with the crate (`scenarios/*.yaml`), sorted.
pub fn shipped() -> Result<Vec<PathBuf>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Scenario> {
        let s: Scenario = serde_yaml::from_str(text)?;
        s.validate()?;
        Ok(s)
    }

    const BASE: &str = "name: t\nnamespaces: [{name: a}]\npods: [{namespace: a, name: p, ports: [{port: 80}]}, {namespace: a, name: q}]\n";

    #[test]
    fn matrix_and_reach_parse() {
        let s = parse(&format!(
            "{BASE}steps:\n- expect: {{port: 80/TCP, reach: [[a/q, a/p, true]]}}\n- expect:\n    port: 53/udp\n    matrix: |\n      from\\\\to a/p a/q\n      a/q X   ?\n"
        ))
        .unwrap();
        let Action::Expect(c) = s.action(&s.steps[1]).unwrap() else { panic!() };
        assert_eq!((c.port, c.proto), (53, Protocol::UDP));
        assert_eq!(c.want.len(), 1);
        assert!(!c.want[&(0, 0)]);
    }

    #[test]
    fn errors_name_the_field() {
        let e =
            parse(&format!("{BASE}steps:\n- expect: {{port: 80, reach: [[a/x, a/p, true]]}}\n"))
                .unwrap_err();
        assert!(format!("{e:#}").contains("steps[0]: expect: no pod \"a/x\""), "{e:#}");
        let e =
            parse(&format!("{BASE}steps:\n- delete: a/x\n  expect: {{port: 80}}\n")).unwrap_err();
        assert!(format!("{e:#}").contains("exactly one of"), "{e:#}");
        let e = parse(&format!("{BASE}steps:\n- aply: x\n")).unwrap_err();
        assert!(format!("{e:#}").contains("unknown field `aply`"), "{e:#}");
        let e = parse(&format!(
            "{BASE}steps:\n- apply: |\n    kind: NetworkPolicy\n    metadata: {{name: x}}\n"
        ))
        .unwrap_err();
        assert!(format!("{e:#}").contains("names no namespace"), "{e:#}");
    }

    #[test]
    fn service_columns_are_checked() {
        let svc = "services: [{namespace: a, name: web, selector: {app: p}, ports: [{port: 8080, targetPort: 80}]}]\n";
        let s = parse(&format!(
            "{BASE}{svc}steps:\n- expect: {{port: 8080, reach: [[a/q, svc:a/web, true]]}}\n"
        ))
        .unwrap();
        assert!(s.service("svc:a/web").is_some());
        let e = parse(&format!(
            "{BASE}{svc}steps:\n- expect: {{port: 80, reach: [[a/q, svc:a/web, true]]}}\n"
        ))
        .unwrap_err();
        assert!(format!("{e:#}").contains("Service svc:a/web has no port 80/TCP"), "{e:#}");
        let e = parse(&format!(
            "{BASE}{svc}steps:\n- expect: {{port: 8080, reach: [[a/q, svc:a/nope, true]]}}\n"
        ))
        .unwrap_err();
        assert!(format!("{e:#}").contains("no Service \"svc:a/nope\""), "{e:#}");
    }

    #[test]
    fn full_matrix_is_a_step_of_its_own() {
        let s = parse(&format!("{BASE}steps:\n- full_matrix: true\n")).unwrap();
        assert!(matches!(s.action(&s.steps[0]).unwrap(), Action::FullMatrix));
        let e = parse(&format!("{BASE}steps:\n- full_matrix: true\n  delete: a/x\n")).unwrap_err();
        assert!(format!("{e:#}").contains("exactly one of"), "{e:#}");
    }

    #[test]
    fn cluster_scoped_policies_are_named_by_kind() {
        let s = parse(&format!(
            "{BASE}steps:\n- apply: |\n    kind: ClusterNetworkPolicy\n    metadata: {{name: deny}}\n- delete: ClusterNetworkPolicy/deny\n"
        ))
        .unwrap();
        match s.action(&s.steps[0]).unwrap() {
            Action::Apply(docs) => {
                assert_eq!(
                    (docs[0].0.as_str(), docs[0].1.as_str()),
                    ("ClusterNetworkPolicy", "deny")
                );
                assert!(!docs[0].2.contains("namespace"), "{}", docs[0].2);
            }
            _ => panic!("expected an apply"),
        }
        assert!(matches!(
            s.action(&s.steps[1]).unwrap(),
            Action::Delete("ClusterNetworkPolicy", "deny")
        ));
        let e = parse(&format!(
            "{BASE}steps:\n- apply: |\n    kind: Deployment\n    metadata: {{name: x}}\n"
        ))
        .unwrap_err();
        assert!(format!("{e:#}").contains("kind \"Deployment\""), "{e:#}");
    }

    #[test]
    fn shipped_scenarios_are_valid() {
        for f in shipped().unwrap() {
            Scenario::load(&f).unwrap();
        }
    }
}
