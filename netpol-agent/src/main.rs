use clap::{Parser, Subcommand};

/// netpol node agent: Kubernetes NetworkPolicy enforcement with eBPF.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the verdict for a connection and the policies and rules that decide it.
    Explain(netpol_agent::explain::ExplainArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Explain(args) => netpol_agent::explain::run(args),
    }
}
