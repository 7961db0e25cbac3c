//! The netpol node agent's command line: only parsing and wiring; the work is in the library.
use anyhow::Context as _;
use clap::Parser as _;
use netpol_agent::cli::{Cli, Command};

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
            let opts = args.into_options();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the tokio runtime")?
                .block_on(netpol_agent::agent::run(opts))
        }
    }
}
