//! The command line of `netpol-agent`, in the library so tests can parse what the deployment
//! manifests pass (deploy/base/daemonset.yaml) with the real parser.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    agent::{AgentOptions, SourceConfig},
    dataplane::DataplaneOptions,
};

/// netpol node agent: Kubernetes NetworkPolicy enforcement with eBPF.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Enforce the policies of this node's pods (the DaemonSet process).
    Run(RunArgs),
    /// Print the verdict for a connection and the policies and rules that decide it (from
    /// manifests, or with --live from this node's maps).
    Explain(crate::explain::ExplainArgs),
    /// Show this node's endpoints, their generations, policies, counters and map fill levels.
    Inspect(crate::inspect::InspectArgs),
    /// Dump the connection-tracking table.
    Conntrack(crate::inspect::ConntrackArgs),
    /// Detach netpol from every interface and remove its pinned maps and status file.
    Uninstall(crate::uninstall::UninstallArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// This node's name (the DaemonSet sets NODE_NAME from the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Read Namespaces, Pods and NetworkPolicies from this directory (YAML or JSON, watched)
    /// instead of the Kubernetes API.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for the Kubernetes API (default: in-cluster, then ~/.kube/config).
    #[arg(long, value_name = "FILE", conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,
    /// Where the maps are pinned.
    #[arg(long, default_value = netpol_common::maps::PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Capacity of the conntrack table in flows: rounded down to a power of two of 4-flow sets.
    /// Applies when the table is created; a pinned table keeps its size across restarts.
    #[arg(long, default_value_t = netpol_common::maps::CT_MAX as u32)]
    pub conntrack_size: u32,
    /// Load the eBPF programs from this object file instead of the ones built into the binary
    /// (a patched datapath, or the upgrade test's changed object). It must be built from the
    /// same layout version: the same map names and types, pinned under --pin-dir.
    #[arg(long, value_name = "FILE")]
    pub bpf_object: Option<PathBuf>,
    /// Deny events per second and CPU sent to user space (0: none).
    #[arg(long, default_value_t = 100)]
    pub events_per_second: u32,
    /// Do not allow traffic from the node's own addresses to its pods (kubelet probes).
    #[arg(long)]
    pub no_host_to_pods: bool,
    /// Address of the metrics and health endpoints (/metrics, /healthz, /readyz).
    #[arg(long, default_value = "0.0.0.0:9808")]
    pub metrics_addr: SocketAddr,
    /// Label drop counters with namespace and pod (one series per pod: mind the cardinality).
    #[arg(long)]
    pub per_pod_metrics: bool,
    /// Where to publish what is enforced, for `inspect`, `conntrack` and `explain --live`.
    #[arg(long, default_value = crate::status::DEFAULT_PATH)]
    pub status_file: PathBuf,
    /// Attach to a pod's interface even when other programs sit at its TC hooks (another
    /// policy enforcer such as Cilium or Calico's eBPF dataplane). Without it the agent refuses
    /// to start when it finds them while enforcing its first snapshot, and later leaves such a
    /// pod unenforced with an error.
    #[arg(long)]
    pub allow_foreign_programs: bool,
}

impl RunArgs {
    /// The agent's settings for these arguments.
    pub fn into_options(self) -> AgentOptions {
        let source = match self.manifests {
            Some(dir) => SourceConfig::Manifests(dir),
            None => SourceConfig::Kubernetes { kubeconfig: self.kubeconfig },
        };
        AgentOptions {
            node_name: self.node_name,
            source,
            dataplane: DataplaneOptions {
                pin_dir: self.pin_dir,
                ct_max_entries: Some(self.conntrack_size),
                object: self.bpf_object,
                events_per_sec: self.events_per_second,
                events_burst: self.events_per_second.saturating_mul(2),
            },
            allow_host_to_pods: !self.no_host_to_pods,
            retry_interval: Duration::from_secs(1),
            gc_interval: Duration::from_secs(10),
            reconcile_interval: Duration::from_secs(30),
            metrics_addr: Some(self.metrics_addr),
            per_pod_labels: self.per_pod_metrics,
            status_file: Some(self.status_file),
            allow_foreign_programs: self.allow_foreign_programs,
        }
    }
}
