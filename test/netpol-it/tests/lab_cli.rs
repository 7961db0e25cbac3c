//! `cargo xtask lab` (the netpol-lab binary): `up` builds a scenario's node and tears all of it
//! down on Ctrl-C.
use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const LAB: &str = env!("CARGO_BIN_EXE_netpol-lab");

fn scenario(file: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios").join(file).display().to_string()
}

#[test]
fn list_names_every_shipped_scenario() {
    let out = Command::new(LAB).arg("list").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for f in netpol_it::scenario::shipped().unwrap() {
        assert!(text.contains(&f.display().to_string()), "{} missing in:\n{text}", f.display());
    }
}

/// The lab process, interrupted and waited for on drop: a failing assertion must not leave a
/// lab running.
struct Lab(Child);

impl Lab {
    fn interrupt(&self) {
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) }, 0);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.interrupt();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn up_tears_everything_down_on_ctrl_c() {
    netpol_it::require_root();
    let mut child = Lab(Command::new(LAB)
        .args(["up", &scenario("004-http-echo.yaml"), "--topology", "bridged"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap());
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let (mut netns, mut pins, mut manifests) = (Vec::new(), None, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    for line in lines.by_ref() {
        let line = line.unwrap();
        println!("{line}");
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"pod") {
            netns.extend(words.iter().filter(|w| w.starts_with("npt-")).map(|w| w.to_string()));
        }
        if let Some(i) = words.iter().position(|w| *w == "--pin-dir") {
            pins = Some(words[i + 1].to_owned());
        }
        if let Some(rest) = line.split("the agent enforces the manifests in ").nth(1) {
            manifests = Some(rest.trim().to_owned());
        }
        if line.contains("press Ctrl-C") {
            break;
        }
        assert!(Instant::now() < deadline, "the lab did not come up");
    }
    let (pins, manifests) = (pins.expect("pin dir printed"), manifests.expect("dir printed"));
    // Both pods of the scenario (plus the bridge) exist while the node is up.
    assert_eq!(netns.len(), 2, "{netns:?}");
    let listed =
        String::from_utf8(Command::new("ip").args(["netns", "list"]).output().unwrap().stdout)
            .unwrap();
    for ns in &netns {
        assert!(listed.contains(ns.as_str()), "{ns} not in `ip netns list`:\n{listed}");
    }
    assert!(Path::new(&pins).join("np_ep").exists());
    assert!(Path::new(&manifests).is_dir());

    child.interrupt();
    let status = child.0.wait().unwrap();
    for line in lines {
        println!("{}", line.unwrap());
    }
    assert!(status.success(), "netpol-lab up exited with {status}");
    let listed =
        String::from_utf8(Command::new("ip").args(["netns", "list"]).output().unwrap().stdout)
            .unwrap();
    for ns in &netns {
        assert!(!listed.contains(ns.as_str()), "{ns} left behind:\n{listed}");
    }
    assert!(!Path::new(&pins).exists(), "pins left in {pins}");
    assert!(!Path::new(&manifests).exists(), "manifests left in {manifests}");
}
