//! Smoke test of `cargo xtask bench`: every benchmark's code path runs at tiny sizes (the real
//! programs, the real agent, the lab, the iptables rendering) and produces its table and JSON.
//! No figure is checked against a bound: benchmarks never make timed assertions.
use std::process::Command;

fn quick(name: &str, fields: &[&str]) -> serde_json::Value {
    quick_with(name, &[], fields)
}

/// [`quick`] with more arguments for the benchmark.
fn quick_with(name: &str, extra: &[&str], fields: &[&str]) -> serde_json::Value {
    let out = std::env::temp_dir().join(format!(
        "netpol-bench-{}-{name}{}.json",
        std::process::id(),
        extra.join("")
    ));
    let run = Command::new(env!("CARGO_BIN_EXE_netpol-bench"))
        .args([name, out.to_str().expect("utf-8 path"), "--quick"])
        .args(extra)
        .output()
        .expect("starting netpol-bench");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "netpol-bench {name} --quick failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("target"), "{name}: no targets in the table:\n{stdout}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("JSON written")).expect("JSON");
    let _ = std::fs::remove_file(&out);
    assert_eq!(doc["benchmark"], name);
    assert!(doc["machine"]["cpus"].as_u64().unwrap_or(0) > 0, "{name}: machine missing");
    assert!(doc["targets"].is_object(), "{name}: no target verdicts");
    let rows = doc["rows"].as_array().cloned().unwrap_or_default();
    for f in fields {
        assert!(
            !rows.is_empty() && rows.iter().all(|r| r[*f].as_f64().is_some_and(|v| v > 0.0)),
            "{name}: field {f} missing or not positive in {rows:?}"
        );
    }
    doc
}

#[test]
fn datapath_quick() {
    let fields = [
        "floor_ns",
        "established_ns",
        "new_denied_ns",
        "new_allowed_ns",
        "new_allowed_not_evicted_ns",
    ];
    let doc = quick("datapath", &fields);
    assert_eq!(doc["rows"].as_array().map(Vec::len), Some(2), "one row per rule count");
    assert_eq!(doc["conntrack_flows"], netpol_common::maps::CT_MAX as u64, "the agent's default");
    assert_eq!(doc["conntrack_default"], true);
    // The memory latency baseline: one sample before the peer count and one after it, in a
    // buffer as large as the default table's ways.
    let memory = &doc["memory_latency"];
    assert_eq!(memory["buffer_bytes"], netpol_common::maps::CT_MAX as u64 * 64, "{memory}");
    let samples = memory["pages_4k"]["samples_ns"].as_array().cloned().unwrap_or_default();
    assert_eq!(samples.len(), 2, "{memory}");
    assert!(samples.iter().all(|s| s.as_f64().is_some_and(|v| v > 0.0)), "{memory}");
    assert!(memory["pages_4k"]["median_ns"].as_f64().is_some_and(|v| v > 0.0), "{memory}");
    // Huge pages are the kernel's to grant: reported only where they were.
    let share = memory["pages_2m_share"].as_f64().expect("share of huge pages");
    assert_eq!(memory["pages_2m"].is_null(), share < 0.9, "{memory}");
}

/// `--conntrack-size` loads the table the agent would for that size (rounded down to whole sets,
/// a power of two of them), and says so in the JSON.
#[test]
fn datapath_quick_with_another_conntrack_size() {
    let doc = quick_with("datapath", &["--conntrack-size", "20000"], &["new_allowed_ns"]);
    assert_eq!(doc["conntrack_flows"], 16_384, "20,000 flows round down to 4,096 sets of 4");
    assert_eq!(doc["conntrack_default"], false);
}

/// The option is the datapath benchmark's: any other refuses it before running.
#[test]
fn conntrack_size_is_refused_by_other_benchmarks() {
    let run = Command::new(env!("CARGO_BIN_EXE_netpol-bench"))
        .args(["compile", "/dev/null", "--quick", "--conntrack-size", "1024"])
        .output()
        .expect("starting netpol-bench");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "compile ran with --conntrack-size");
    assert!(stderr.contains("--conntrack-size applies to the datapath benchmark only"), "{stderr}");
}

#[test]
fn compile_quick() {
    let doc = quick("compile", &[]);
    assert!(doc["full_compile_one_node_ms"].as_f64().is_some_and(|v| v > 0.0));
    assert!(doc["targets"]["incremental_met"].is_boolean());
}

#[test]
fn apply_quick() {
    let doc = quick("apply", &["n"]);
    assert_eq!(doc["latencies_ms"].as_array().map(Vec::len), Some(4), "one latency per change");
    assert_eq!(doc["missing_flips"], 0, "every change flipped the verdict");
}

#[test]
fn veth_quick() {
    quick("veth", &["gbps", "rr_p50_us", "crr_p50_us"]);
}
