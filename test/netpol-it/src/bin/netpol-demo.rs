//! `cargo xtask demo`: the AKS vote-app walkthrough (seed 000) on a local lab node, enforced by
//! the real agent, narrated step by step.
//!
//! Two namespaces, `development` and `production`, each with a vote frontend and a Redis
//! backend (network namespaces behind routed host veths, as Calico or Azure CNI wire pods). The
//! agent reads the same kind of manifests `kubectl apply` would send; each step writes one and
//! shows who can reach whom, the kernel's drop counters in `/metrics`, and the pinned maps as
//! bpftool prints them. Every expected result is checked: the demo fails if one is wrong.
use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Result};
use netpol_it::{
    agent::{get, sample, RunningAgent},
    cmd::run,
    lab::{Lab, Pod},
    manifests::{namespace, pod, ManifestDir},
    probe::{tcp_echo, TcpServer},
};

const NODE: &str = "aks-nodepool1-0";
const REDIS: u16 = 6379;

const PRODUCTION_POLICY: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: backend-policy
  namespace: production
spec:
  podSelector:
    matchLabels:
      app: azure-vote-back
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          name: production
      podSelector:
        matchLabels:
          app: azure-vote-front
    ports:
    - protocol: TCP
      port: 6379
";

fn development_policy() -> String {
    PRODUCTION_POLICY.replace("production", "development")
}

struct Cell<'a> {
    from: &'a Pod,
    from_ns: &'a str,
    to: &'a Pod,
    to_ns: &'a str,
}

/// Prints who reaches which Redis and checks it against `expect` (row-major).
fn matrix(cells: &[Cell], expect: &[bool]) -> Result<()> {
    println!("   {:<32} {:<34} result", "from", "to");
    let mut wrong = Vec::new();
    for (c, want) in cells.iter().zip(expect) {
        netpol_it::interrupt::check()?;
        // Policy changes take effect within milliseconds; allow a moment before judging.
        let mut got = false;
        for _ in 0..10 {
            got = tcp_echo(
                &c.from.netns,
                SocketAddr::from((c.to.ip, REDIS)),
                Duration::from_millis(400),
            )?;
            if got == *want {
                break;
            }
        }
        let mark = if got == *want { "" } else { "   <-- UNEXPECTED" };
        println!(
            "   {:<32} {:<34} {}{mark}",
            format!("{}/{}", c.from_ns, c.from.name),
            format!("{}/{}:{REDIS}", c.to_ns, c.to.name),
            if got { "connected" } else { "BLOCKED" }
        );
        if got != *want {
            wrong.push(format!("{}/{} -> {}/{}", c.from_ns, c.from.name, c.to_ns, c.to.name));
        }
    }
    if !wrong.is_empty() {
        bail!("unexpected reachability: {}", wrong.join(", "));
    }
    Ok(())
}

/// The drop counters from `/metrics`, once at least `min_denied` policy drops are published
/// (the agent publishes the kernel counters every second).
fn drops(agent: &RunningAgent, min_denied: f64) -> Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = get(agent.metrics_addr, "/metrics");
        if sample(&text, "netpol_drop_count_total", &[("reason", "policy_deny")]) >= min_denied {
            break text;
        }
        if std::time::Instant::now() > deadline {
            bail!("expected at least {min_denied} policy_deny drops in /metrics:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("netpol_drop_count_total{") && !l.ends_with(" 0"))
        .collect();
    Ok(lines.iter().map(|l| format!("   {l}")).collect::<Vec<_>>().join("\n"))
}

fn main() -> Result<()> {
    netpol_it::require_root();
    // Ctrl-C ends the demo at the next probe; the lab is torn down on the way out.
    netpol_it::interrupt::install()?;
    println!("== netpol demo: the AKS vote app (Calico walkthrough) on a local lab node\n");
    let mut lab = Lab::new()?;
    let dev_front = lab.add_pod("azure-vote-front")?;
    let dev_back = lab.add_pod("azure-vote-back")?;
    let prod_front = lab.add_pod("azure-vote-front")?;
    let prod_back = lab.add_pod("azure-vote-back")?;
    let _redis =
        [TcpServer::start(&dev_back.netns, REDIS)?, TcpServer::start(&prod_back.netns, REDIS)?];
    let dir = ManifestDir::new("demo")?;
    dir.write(
        "namespaces.yaml",
        &format!(
            "{}---\n{}",
            namespace("development", &[("name", "development")]),
            namespace("production", &[("name", "production")])
        ),
    )?;
    for (p, ns, app, ports) in [
        (&dev_front, "development", "azure-vote-front", &[][..]),
        (&dev_back, "development", "azure-vote-back", &[("redis", REDIS)][..]),
        (&prod_front, "production", "azure-vote-front", &[][..]),
        (&prod_back, "production", "azure-vote-back", &[("redis", REDIS)][..]),
    ] {
        dir.write(&format!("{ns}-{app}.yaml"), &pod(p, ns, NODE, &[("app", app)], ports))?;
        println!("   pod {ns}/{app:<18} {:<15} host interface {}", p.ip, p.host_if);
    }
    println!("\n   the agent runs as node {NODE}, reading manifests from {}", dir.path().display());
    let agent = RunningAgent::start(&dir, NODE, "demo");
    agent.wait_ready();
    println!(
        "   agent ready: programs attached to every pod's host interface, maps pinned in {}",
        agent.pin_dir.display()
    );

    let cells = [
        Cell { from: &dev_front, from_ns: "development", to: &dev_back, to_ns: "development" },
        Cell { from: &dev_front, from_ns: "development", to: &prod_back, to_ns: "production" },
        Cell { from: &prod_front, from_ns: "production", to: &prod_back, to_ns: "production" },
        Cell { from: &prod_front, from_ns: "production", to: &dev_back, to_ns: "development" },
    ];

    println!(
        "\n== 1. no NetworkPolicy yet: every frontend reaches every Redis (the security flaw)"
    );
    matrix(&cells, &[true, true, true, true])?;

    println!("\n== 2. kubectl apply -f network-policy-production.yaml\n");
    println!(
        "{}",
        PRODUCTION_POLICY.lines().map(|l| format!("   | {l}")).collect::<Vec<_>>().join("\n")
    );
    let applied = agent.applies();
    dir.write("network-policy-production.yaml", PRODUCTION_POLICY)?;
    agent.wait_applied(applied);
    println!();
    matrix(&cells, &[true, false, true, true])?;
    println!(
        "\n   drop counters in /metrics (from the kernel's per-CPU maps):\n{}",
        drops(&agent, 1.0)?
    );

    println!(
        "\n== 3. kubectl apply -f network-policy-development.yaml (the mirror for development)"
    );
    let applied = agent.applies();
    dir.write("network-policy-development.yaml", &development_policy())?;
    agent.wait_applied(applied);
    matrix(&cells, &[true, false, true, false])?;
    println!("\n   drop counters in /metrics, now also for development:\n{}", drops(&agent, 2.0)?);

    println!("\n== 4. what the kernel holds, as an operator sees it with bpftool");
    let ep = agent.pin_dir.join("np_ep");
    // The production Redis pod's entry: the key is its host interface's ifindex (u32, little
    // endian as the map stores it).
    let ifindex = netpol_it::lab::ifindex(&prod_back.host_if)?;
    let key: Vec<String> = ifindex.to_le_bytes().iter().map(|b| b.to_string()).collect();
    let mut args = vec!["map", "lookup", "pinned"];
    let ep_path = ep.to_string_lossy().into_owned();
    args.push(&ep_path);
    args.push("key");
    args.extend(key.iter().map(String::as_str));
    println!(
        "$ bpftool {}   (production/azure-vote-back: its ingress set is isolated)",
        args.join(" ")
    );
    println!("{}", run("bpftool", &args)?.trim_end());
    println!("$ bpftool prog show name to_pod   (one program for every pod; per-pod state lives in maps)");
    println!("{}", run("bpftool", &["prog", "show", "name", "to_pod"])?.trim_end());
    // Debian's bpftool 7.1 does not list TCX links; their pins (which let a restarted agent
    // take over without a gap) are files of their own.
    let links = agent.pin_dir.join("links");
    let mut pins: Vec<String> = std::fs::read_dir(&links)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    pins.sort();
    println!("$ ls {}   (pinned TCX links: two per pod interface)", links.display());
    println!("{}", pins.join("  "));
    println!("\n== 5. cleaning up: the agent stops, its pins are removed (which detaches the programs), namespaces, veths and routes go");
    drop(agent);
    drop(lab);
    println!("   done. What this showed is covered by cargo xtask test (test/netpol-it/tests/agent.rs and friends).");
    Ok(())
}
