//! The agent refuses to attach beside another enforcer's TC programs. `bench_floor` (our empty
//! program, loaded by a separate dataplane with maps of its own) stands in for the other
//! enforcer's program on a lab pod's host-side interface, attached as a TCX program or as a
//! legacy clsact filter.
use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::programs::{tc::TcAttachType, SchedClassifier};
use netpol_agent::dataplane::{remove_pins, Dataplane, DataplaneOptions};
use netpol_common::maps;
use netpol_it::{
    agent::{get as scrape, sample, RunningAgent},
    lab::{Lab, Pod},
    manifests::{namespace, pod, ManifestDir},
    probe::{eventually, TcpServer},
};

const NODE: &str = "lab-node";
const DENY_STRANGER: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: only-client\n  namespace: prod\nspec:\n  podSelector:\n    matchLabels: {app: server}\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels: {app: client}\n";

/// Another "enforcer": a dataplane with its own pinned maps whose `bench_floor` program sits
/// on an interface. Detached and unpinned on drop.
struct Foreign {
    dp: Option<Dataplane>,
    pin_dir: PathBuf,
}

impl Foreign {
    fn attach(name: &str, interface: &str, netlink: bool) -> Foreign {
        let pin_dir =
            PathBuf::from(format!("/sys/fs/bpf/netpol-test-{}-foreign-{name}", std::process::id()));
        let _ = remove_pins(&pin_dir);
        let mut dp =
            Dataplane::load(&DataplaneOptions { pin_dir: pin_dir.clone(), ..Default::default() })
                .expect("loading the stand-in enforcer");
        dp.attach_unmanaged(maps::PROG_BENCH_FLOOR, interface, TcAttachType::Ingress, netlink)
            .expect("attaching bench_floor");
        Foreign { dp: Some(dp), pin_dir }
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        drop(self.dp.take());
        let _ = remove_pins(&self.pin_dir);
    }
}

/// Names of the TCX programs at the interface's ingress hook.
fn tcx_ingress(interface: &str) -> Vec<String> {
    let (_, progs) =
        SchedClassifier::query_tcx(interface, TcAttachType::Ingress).expect("query_tcx");
    progs.iter().map(|p| p.name_as_str().unwrap_or_default().to_owned()).collect()
}

fn setup(name: &str) -> (Lab, Pod, Pod, Pod, ManifestDir, TcpServer) {
    let mut lab = Lab::new().unwrap();
    let client = lab.add_pod("client").unwrap();
    let stranger = lab.add_pod("stranger").unwrap();
    let server = lab.add_pod("server").unwrap();
    let http = TcpServer::start(&server.netns, 80).unwrap();
    let dir = ManifestDir::new(name).unwrap();
    dir.write("ns.yaml", &namespace("prod", &[])).unwrap();
    dir.write("client.yaml", &pod(&client, "prod", NODE, &[("app", "client")], &[])).unwrap();
    dir.write("stranger.yaml", &pod(&stranger, "prod", NODE, &[("app", "stranger")], &[])).unwrap();
    dir.write("server.yaml", &pod(&server, "prod", NODE, &[("app", "server")], &[("http", 80)]))
        .unwrap();
    dir.write("policy.yaml", DENY_STRANGER).unwrap();
    (lab, client, stranger, server, dir, http)
}

#[test]
fn refuses_to_start_beside_a_foreign_program_tcx_or_clsact() {
    for (hook, netlink, described) in [
        ("tcx", false, "ingress tcx program bench_floor"),
        ("clsact", true, "ingress tc filter program bench_floor"),
    ] {
        let (_lab, client, _stranger, server, dir, _http) = setup(&format!("foreign-{hook}"));
        let foreign = Foreign::attach(hook, &server.host_if, netlink);
        let agent = RunningAgent::start(&dir, NODE, &format!("foreign-{hook}"));
        let err =
            agent.wait_exit(Duration::from_secs(15)).expect_err("the agent must refuse to start");
        let msg = format!("{err:#}");
        for want in [
            format!("refusing to attach to {} (pod prod/server)", server.host_if),
            described.to_owned(),
            "--allow-foreign-programs".to_owned(),
        ] {
            assert!(msg.contains(&want), "{hook}: message lacks {want:?}: {msg}");
        }
        // Refused before the first write: none of the pods got netpol's programs.
        for p in [&client, &server] {
            let names = tcx_ingress(&p.host_if);
            assert!(
                !names.iter().any(|n| n == maps::PROG_FROM_POD),
                "{hook}: {} carries from_pod after the refusal: {names:?}",
                p.host_if
            );
        }
        drop(foreign);
    }
}

#[test]
fn with_allow_foreign_programs_it_attaches_beside_them_and_enforces() {
    let (_lab, client, stranger, server, dir, _http) = setup("foreign-allowed");
    let _foreign = Foreign::attach("allowed", &server.host_if, false);
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/netpol-test-{}-foreign-allowed-agent",
        std::process::id()
    ));
    let _ = remove_pins(&pin_dir);
    let agent = RunningAgent::start_with(&dir, NODE, pin_dir, |o| o.allow_foreign_programs = true);
    agent.wait_ready();
    let names = tcx_ingress(&server.host_if);
    assert!(
        names.iter().any(|n| n == maps::PROG_BENCH_FLOOR)
            && names.iter().any(|n| n == maps::PROG_FROM_POD),
        "both programs attached: {names:?}"
    );
    let to = SocketAddr::from((server.ip, 80));
    eventually(&client, to, true, "client allowed");
    eventually(&stranger, to, false, "stranger denied");
}

#[test]
fn a_later_interface_with_a_foreign_program_is_refused_counted_and_retried() {
    let (mut lab, client, _stranger, server, dir, _http) = setup("foreign-later");
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/netpol-test-{}-foreign-later-agent",
        std::process::id()
    ));
    let _ = remove_pins(&pin_dir);
    let agent = RunningAgent::start_on(&dir, NODE, pin_dir);
    agent.wait_ready();
    let to = SocketAddr::from((server.ip, 80));
    eventually(&client, to, true, "client allowed");

    // A new pod whose interface already carries another enforcer's program.
    let late = lab.add_pod("late").unwrap();
    let foreign = Foreign::attach("later", &late.host_if, false);
    dir.write("late.yaml", &pod(&late, "prod", NODE, &[("app", "stranger")], &[])).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(agent.metrics_addr, "/metrics");
        let refused = sample(&m, "netpol_reconcile_errors_total", &[("kind", "foreign_programs")]);
        let error = sample(&m, "netpol_endpoints", &[("state", "error")]);
        if refused >= 1.0 && error >= 1.0 {
            assert_eq!(refused, 1.0, "one refusal, counted once while it lasts:\n{m}");
            break;
        }
        assert!(Instant::now() < deadline, "no refusal in /metrics:\n{m}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The agent keeps running and enforcing the other pods; the late pod stays unattached.
    assert!(scrape(agent.metrics_addr, "/healthz").starts_with("HTTP/1.1 200"));
    assert_eq!(tcx_ingress(&late.host_if), vec![maps::PROG_BENCH_FLOOR.to_owned()]);
    eventually(&client, to, true, "client still allowed");

    // The other enforcer leaves: the next check (every reconcile interval) attaches.
    drop(foreign);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tcx_ingress(&late.host_if).iter().any(|n| n == maps::PROG_FROM_POD) {
        assert!(
            Instant::now() < deadline,
            "the late pod was not attached after the foreign program left"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = scrape(agent.metrics_addr, "/metrics");
        if sample(&m, "netpol_endpoints", &[("state", "error")]) == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the error state did not clear:\n{m}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
