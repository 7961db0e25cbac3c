//! `netpol-agent explain` (being written).

/// Arguments of `netpol-agent explain`.
#[derive(clap::Args, Debug)]
pub struct ExplainArgs {}

/// Runs `netpol-agent explain`.
pub fn run(_args: ExplainArgs) -> anyhow::Result<()> {
    anyhow::bail!("explain is not available yet")
}
