//! `cargo xtask image`: builds the agent's container image (Dockerfile at the workspace root)
//! with docker or podman, whichever is installed and working. Arguments after `--` go to
//! `<engine> build` unchanged, for what only some machines need (`--network host` where the
//! engine has no bridge network, `--build-arg`, `--cpu-shares`, `--no-cache`).
use anyhow::{bail, Result};

use crate::exec::{output, run_status, workspace_root};

/// Container engines tried in this order.
const ENGINES: &[&str] = &["docker", "podman"];

#[derive(clap::Args)]
pub struct ImageArgs {
    /// Image name and tag (default: netpol-agent:<workspace version>, as deploy/ expects).
    #[arg(long)]
    pub tag: Option<String>,
    /// Use this engine instead of the first of docker, podman that works.
    #[arg(long)]
    pub engine: Option<String>,
    /// Extra arguments for `<engine> build`, after `--`: e.g.
    /// `cargo xtask image -- --network host --build-arg RUST_VERSION=1.95.0`.
    #[arg(last = true)]
    pub build_args: Vec<String>,
}

/// Picks the engine: the first installed one whose `info` answers (for docker: the daemon
/// runs). Says exactly what is missing otherwise.
fn engine(wanted: Option<&str>) -> Result<&str> {
    let candidates: Vec<&str> = match wanted {
        Some(e) => vec![e],
        None => ENGINES.to_vec(),
    };
    let mut not_working = Vec::new();
    for e in candidates {
        if output(e, &["--version"]).is_none() {
            continue;
        }
        if output(e, &["info"]).is_some() {
            return Ok(e);
        }
        not_working.push(e);
    }
    if let (Some(e), true) = (wanted, not_working.is_empty()) {
        bail!("container engine `{e}` (--engine) is not installed or `{e} --version` fails");
    }
    if not_working.is_empty() {
        bail!(
            "no container engine: neither docker nor podman is installed. Install one (Debian: \
             `apt-get install podman` or `docker.io`), or build the image elsewhere from the \
             Dockerfile at the workspace root"
        );
    }
    bail!(
        "{} installed but `{} info` fails: the engine cannot run here (for docker: is the daemon \
         started and its socket reachable?)",
        not_working.join(" and "),
        not_working[0]
    )
}

pub fn run(args: &ImageArgs) -> Result<()> {
    let engine = engine(args.engine.as_deref())?;
    let tag =
        args.tag.clone().unwrap_or_else(|| format!("netpol-agent:{}", env!("CARGO_PKG_VERSION")));
    let root = workspace_root();
    println!("xtask image: building {tag} with {engine}");
    let dockerfile = root.join("Dockerfile").to_string_lossy().into_owned();
    let context = root.to_string_lossy();
    let mut build: Vec<&str> = vec!["build", "-t", &tag, "-f", &dockerfile];
    build.extend(args.build_args.iter().map(String::as_str));
    build.push(&context);
    run_status(engine, &build)?;
    println!(
        "xtask image: built {tag}; on kind: `kind load docker-image {tag}` (docs/deploy-kind.md)"
    );
    Ok(())
}
