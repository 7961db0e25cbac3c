//! The netpol node agent's command line: only parsing and wiring; the work is in the library.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use netpol_agent::{
    agent::{AgentOptions, SourceConfig},
    dataplane::DataplaneOptions,
};

/// netpol node agent: Kubernetes NetworkPolicy enforcement with eBPF.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Enforce the policies of this node's pods (the DaemonSet process).
    Run(RunArgs),
    /// Print the verdict for a connection and the policies and rules that decide it (from
    /// manifests, or with --live from this node's maps).
    Explain(netpol_agent::explain::ExplainArgs),
    /// Show this node's endpoints, their generations, policies, counters and map fill levels.
    Inspect(netpol_agent::inspect::InspectArgs),
    /// Dump the connection-tracking table.
    Conntrack(netpol_agent::inspect::ConntrackArgs),
    /// Detach netpol from every interface and remove its pinned maps and status file.
    Uninstall(netpol_agent::uninstall::UninstallArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// This node's name (the DaemonSet sets NODE_NAME from the downward API).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Read Namespaces, Pods and NetworkPolicies from this directory (YAML or JSON, watched)
    /// instead of the Kubernetes API.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the Kubernetes API (default: in-cluster, then ~/.kube/config).
    #[arg(long, value_name = "FILE", conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// Where the maps are pinned.
    #[arg(long, default_value = netpol_common::maps::PIN_DIR)]
    pin_dir: PathBuf,
    /// Capacity of the conntrack map.
    #[arg(long, default_value_t = netpol_common::maps::CT_MAX as u32)]
    conntrack_size: u32,
    /// Deny events per second and CPU sent to user space (0: none).
    #[arg(long, default_value_t = 100)]
    events_per_second: u32,
    /// Do not allow traffic from the node's own addresses to its pods (kubelet probes).
    #[arg(long)]
    no_host_to_pods: bool,
    /// Address of the metrics and health endpoints (/metrics, /healthz, /readyz).
    #[arg(long, default_value = "0.0.0.0:9808")]
    metrics_addr: SocketAddr,
    /// Label drop counters with namespace and pod (one series per pod: mind the cardinality).
    #[arg(long)]
    per_pod_metrics: bool,
    /// Where to publish what is enforced, for `inspect`, `conntrack` and `explain --live`.
    #[arg(long, default_value = netpol_agent::status::DEFAULT_PATH)]
    status_file: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cli.log_json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    match cli.command {
        Command::Explain(args) => netpol_agent::explain::run(args),
        Command::Inspect(args) => netpol_agent::inspect::run_inspect(args),
        Command::Conntrack(args) => netpol_agent::inspect::run_conntrack(args),
        Command::Uninstall(args) => netpol_agent::uninstall::run(args),
        Command::Run(args) => {
            tracing::info!(?args, "starting");
            let source = match args.manifests {
                Some(dir) => SourceConfig::Manifests(dir),
                None => SourceConfig::Kubernetes { kubeconfig: args.kubeconfig },
            };
            let opts = AgentOptions {
                node_name: args.node_name,
                source,
                dataplane: DataplaneOptions {
                    pin_dir: args.pin_dir,
                    ct_max_entries: Some(args.conntrack_size),
                    events_per_sec: args.events_per_second,
                    events_burst: args.events_per_second.saturating_mul(2),
                },
                allow_host_to_pods: !args.no_host_to_pods,
                retry_interval: Duration::from_secs(1),
                gc_interval: Duration::from_secs(10),
                reconcile_interval: Duration::from_secs(30),
                metrics_addr: Some(args.metrics_addr),
                per_pod_labels: args.per_pod_metrics,
                status_file: Some(args.status_file),
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the tokio runtime")?
                .block_on(netpol_agent::agent::run(opts))
        }
    }
}
