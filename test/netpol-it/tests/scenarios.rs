//! Every scenario under `scenarios/` (the seed walkthroughs), in both topologies, enforced by the
//! real agent; each prints its reachability matrices and fails listing the unexpected cells.
use netpol_it::{
    lab::Topology,
    scenario::{run, shipped, Scenario},
};

fn check(file: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios").join(file);
    let scenario = Scenario::load(&path).unwrap_or_else(|e| panic!("{e:#}"));
    for topology in [Topology::Routed, Topology::Bridged] {
        run(&scenario, topology).unwrap_or_else(|e| panic!("{e:#}"));
    }
}

#[test]
fn every_scenario_file_has_a_test() {
    let files: Vec<String> = shipped()
        .unwrap()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        files,
        [
            "000-vote-app.yaml",
            "001-namespace-isolation.yaml",
            "002-global-default-deny.yaml",
            "003-guestbook.yaml",
            "004-http-echo.yaml",
            "010-protocols.yaml"
        ]
    );
}

#[test]
fn vote_app_000() {
    check("000-vote-app.yaml");
}

#[test]
fn namespace_isolation_001() {
    check("001-namespace-isolation.yaml");
}

#[test]
fn global_default_deny_002() {
    check("002-global-default-deny.yaml");
}

#[test]
fn guestbook_003() {
    check("003-guestbook.yaml");
}

#[test]
fn http_echo_004() {
    check("004-http-echo.yaml");
}

#[test]
fn protocols_010() {
    check("010-protocols.yaml");
}
