//! Churn: pods (real network namespaces) and policies created, relabelled and deleted at a high
//! rate while traffic runs, against the real agent binary. After every change the reachability
//! of every churn pod must converge to what the policies say; a long-lived flow between two
//! pods no change touches never fails; and when the churn is over, the policy and endpoint maps,
//! the pinned links and the agent's RSS are back at their baseline, no counter entry of a
//! deleted interface is left, and every remaining interface carries exactly our two programs.
//!
//! `NETPOL_CHURN_SECS` (default 40; `cargo xtask soak` runs 600) and `NETPOL_CHURN_SEED`.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use netpol_it::{
    agent::{AgentProcess, RemovePins},
    lab::{self, Lab},
    manifests::{namespace, pod, ManifestDir},
    netns::in_netns,
    probe::{tcp_echo, TcpServer},
};

const NODE: &str = "lab-node";
const ROLES: [&str; 3] = ["a", "b", "c"];
const MAX_PODS: usize = 6;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `iso-R` isolates pods with role R (no ingress rule); `allow-R` lets `app: client` reach
/// their port 80.
fn policy(name: &str) -> String {
    let (kind, role) = name.split_once('-').unwrap();
    let ingress = if kind == "allow" {
        "  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: client}}\n    ports:\n    - {port: 80}\n"
    } else {
        ""
    };
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: prod}}\nspec:\n  podSelector: {{matchLabels: {{role: \"{role}\"}}}}\n  policyTypes: [Ingress]\n{ingress}"
    )
}

/// NetworkPolicy semantics for this small family: selected by any policy → isolated; then
/// reachable only if some selecting policy allows the client.
fn reachable(policies: &BTreeSet<String>, role: &str) -> bool {
    policies.contains(&format!("allow-{role}")) || !policies.contains(&format!("iso-{role}"))
}

/// Entries of a pinned map as bpftool sees them (JSON), with each key's `ifindex` if it has one.
fn map_keys(pins: &std::path::Path, map: &str) -> Vec<Option<u64>> {
    let path = pins.join(map);
    let out =
        netpol_it::cmd::run("bpftool", &["-j", "map", "dump", "pinned", &path.to_string_lossy()])
            .expect("bpftool map dump");
    let v: serde_json::Value = serde_json::from_str(&out).expect("bpftool JSON");
    v.as_array()
        .expect("array")
        .iter()
        .map(|e| {
            // The raw key bytes ("0x01", ...): every keyed-by-interface map starts with the
            // ifindex as a little-endian u32. Or, formatted through BTF, its field.
            if let Some(bytes) = e.get("key").and_then(|k| k.as_array()) {
                let b: Vec<u8> = bytes
                    .iter()
                    .filter_map(|x| {
                        u8::from_str_radix(x.as_str()?.trim_start_matches("0x"), 16).ok()
                    })
                    .collect();
                return b.get(..4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as u64);
            }
            let key = e.get("key").or_else(|| e.get("formatted").and_then(|f| f.get("key")));
            key.and_then(|k| k.get("ifindex")).and_then(|i| i.as_u64())
        })
        .collect()
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Footprint {
    endpoints: usize,
    peers: usize,
    ports: usize,
    links: usize,
}

fn footprint(pins: &std::path::Path) -> Footprint {
    Footprint {
        endpoints: map_keys(pins, "np_ep").len(),
        // Each stage's entries: full-length ones in its hash, shorter ones in its trie.
        peers: map_keys(pins, "np_peer").len() + map_keys(pins, "np_peer_exact").len(),
        ports: map_keys(pins, "np_ports").len() + map_keys(pins, "np_port_exact").len(),
        links: std::fs::read_dir(pins.join("links")).map_or(0, |d| d.count()),
    }
}

struct ChurnPod {
    pod: lab::Pod,
    role: &'static str,
    _server: TcpServer,
}

#[test]
fn churn_converges_and_leaves_nothing_behind() {
    let secs = env_u64("NETPOL_CHURN_SECS", 40);
    let seed = env_u64("NETPOL_CHURN_SEED", 7);
    println!("churn: {secs} s, NETPOL_CHURN_SEED={seed}");
    let mut rng = seed;
    let mut rand = move |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };

    let mut lab = Lab::new().unwrap();
    let client = lab.add_pod("client").unwrap();
    let keeper = lab.add_pod("keeper").unwrap();
    let _keeper_srv = TcpServer::start(&keeper.netns, 80).unwrap();
    let dir = ManifestDir::new("churn").unwrap();
    dir.write("ns.yaml", &namespace("prod", &[])).unwrap();
    dir.write("client.yaml", &pod(&client, "prod", NODE, &[("app", "client")], &[])).unwrap();
    dir.write("keeper.yaml", &pod(&keeper, "prod", NODE, &[("app", "keeper")], &[("http", 80)]))
        .unwrap();
    let pins =
        std::path::PathBuf::from(format!("/sys/fs/bpf/netpol-test-{}-churn", std::process::id()));
    let _ = netpol_agent::dataplane::remove_pins(&pins);
    let _cleanup = RemovePins(pins.clone());
    let mut agent = AgentProcess::start(&dir, NODE, &pins, &[]);
    agent.wait_ready();
    let keeper_to = SocketAddr::from((keeper.ip, 80));
    netpol_it::probe::eventually(&client, keeper_to, true, "keeper reachable");
    // Let the agent settle before the baseline (first publish, first GC).
    std::thread::sleep(Duration::from_secs(2));
    let base = footprint(&pins);
    let base_rss = agent.rss_kib();

    // The long-lived flow no change touches: an echo every 10 ms on one connection.
    let stop = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicU64::new(0));
    let flow = {
        let (stop, echoed) = (stop.clone(), echoed.clone());
        let mut c = in_netns(&client.netns, || {
            TcpStream::connect_timeout(&keeper_to, Duration::from_secs(1))
        })
        .unwrap()
        .expect("connect to keeper");
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 5];
            while !stop.load(Ordering::Relaxed) {
                if c.write_all(b"ping\n").is_err() || c.read_exact(&mut buf).is_err() {
                    return Err(format!("broke after {} echoes", echoed.load(Ordering::Relaxed)));
                }
                echoed.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        })
    };

    let mut pods: BTreeMap<String, ChurnPod> = BTreeMap::new();
    let mut policies: BTreeSet<String> = BTreeSet::new();
    let all_policies: Vec<String> =
        ROLES.iter().flat_map(|r| [format!("iso-{r}"), format!("allow-{r}")]).collect();
    let (mut changes, mut probes, mut created, mut deleted) = (0u64, 0u64, 0u64, 0u64);
    let mut serial = 0;
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let before = agent.applies();
        match rand(4) {
            0 if pods.len() < MAX_PODS => {
                serial += 1;
                let name = format!("w{serial}");
                let p = lab.add_pod(&name).unwrap();
                let server = TcpServer::start(&p.netns, 80).unwrap();
                let role = ROLES[rand(3)];
                dir.write(
                    &format!("{name}.yaml"),
                    &pod(&p, "prod", NODE, &[("role", role)], &[("http", 80)]),
                )
                .unwrap();
                pods.insert(name, ChurnPod { pod: p, role, _server: server });
                created += 1;
            }
            1 if !pods.is_empty() => {
                let name = pods.keys().nth(rand(pods.len())).unwrap().clone();
                let p = pods.remove(&name).unwrap();
                // As in a cluster: the pod object goes, then its sandbox and interface.
                dir.remove(&format!("{name}.yaml")).unwrap();
                lab.remove_pod(&p.pod.netns).unwrap();
                deleted += 1;
            }
            2 if !pods.is_empty() => {
                let name = pods.keys().nth(rand(pods.len())).unwrap().clone();
                let p = pods.get_mut(&name).unwrap();
                // Always a different role: an unchanged state would apply nothing.
                let i = ROLES.iter().position(|r| *r == p.role).unwrap();
                p.role = ROLES[(i + 1 + rand(2)) % 3];
                dir.write(
                    &format!("{name}.yaml"),
                    &pod(&p.pod, "prod", NODE, &[("role", p.role)], &[("http", 80)]),
                )
                .unwrap();
            }
            _ => {
                let name = all_policies[rand(all_policies.len())].clone();
                if policies.remove(&name) {
                    dir.remove(&format!("{name}.yaml")).unwrap();
                } else {
                    dir.write(&format!("{name}.yaml"), &policy(&name)).unwrap();
                    policies.insert(name);
                }
            }
        }
        changes += 1;
        agent.wait_applied(before);
        // Every pod's reachability converges to what the policies say.
        for p in pods.values() {
            let want = reachable(&policies, p.role);
            let what = format!("{} (role {}) under {policies:?}", p.pod.name, p.role);
            netpol_it::probe::eventually(&client, SocketAddr::from((p.pod.ip, 80)), want, &what);
            probes += 1;
        }
    }

    // Everything the churn created goes away.
    for (name, p) in std::mem::take(&mut pods) {
        dir.remove(&format!("{name}.yaml")).unwrap();
        lab.remove_pod(&p.pod.netns).unwrap();
    }
    for name in std::mem::take(&mut policies) {
        dir.remove(&format!("{name}.yaml")).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let after = loop {
        let f = footprint(&pins);
        if f == base || Instant::now() > deadline {
            break f;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    stop.store(true, Ordering::Relaxed);
    flow.join().unwrap().expect("the long-lived flow never failed");
    std::thread::sleep(Duration::from_secs(2));
    let rss = agent.rss_kib();
    let live: BTreeSet<u64> =
        lab.pods().iter().map(|p| lab::ifindex(&p.host_if).unwrap() as u64).collect();
    let counters = map_keys(&pins, "np_cnt");
    assert!(counters.iter().all(Option::is_some), "every counter key names its ifindex");
    let stale_counters = counters.iter().filter(|i| i.is_some_and(|i| !live.contains(&i))).count();
    println!(
        "churn: {changes} changes ({created} pods created, {deleted} deleted) in {secs} s, \
         {probes} converged probes, {} echoes on the untouched flow; maps before {base:?}, \
         after {after:?}; counter entries {} ({stale_counters} of deleted interfaces); \
         agent RSS {base_rss} KiB before, {rss} KiB after",
        echoed.load(Ordering::Relaxed),
        counters.len()
    );
    assert!(created >= 3 && deleted >= 1, "the churn created and deleted pods");
    assert_eq!(after, base, "policy/endpoint maps and pinned links back at the baseline");
    assert_eq!(stale_counters, 0, "counter entries of deleted interfaces were removed");
    for p in lab.pods() {
        assert_eq!(lab::tcx_programs(&p.host_if), (1, 1), "exactly our programs on {}", p.host_if);
    }
    // The allocator keeps some memory; growth beyond half the baseline would be a leak.
    assert!(rss <= base_rss + base_rss / 2, "agent RSS {base_rss} KiB → {rss} KiB");
    assert!(tcp_echo(&client.netns, keeper_to, Duration::from_millis(500)).unwrap());
}
