//! `netpol-agent uninstall`: detaches netpol's programs from every interface and removes the
//! pinned maps and the status file. Idempotent: a second run finds nothing and says so.
//!
//! The agent owns its TCX links in its process, so with no agent running nothing is attached.
//! With an agent (or a leftover) running, its links are found through the kernel: the programs
//! attached to each interface (TCX query) that are netpol's — named `from_pod`/`to_pod` and,
//! when maps are pinned, using those maps — and the TCX links holding them, which are detached
//! with `BPF_LINK_DETACH`. Legacy clsact filters (kernels before 6.6) are removed by name.
use std::{
    collections::BTreeSet,
    os::fd::{FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::MapData,
    programs::{
        links::LinkType,
        loaded_links,
        tc::{qdisc_detach_program, TcAttachType},
        SchedClassifier,
    },
};
use netpol_common::maps;
use serde::Serialize;

/// Errors of `uninstall` (and the root check shared by the CLI commands).
#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    /// Not running as root.
    #[error("this command reads and changes bpf() state and needs root (try sudo)")]
    NotRoot,
    /// Listing interfaces failed.
    #[error("listing interfaces in /sys/class/net")]
    Interfaces(#[source] std::io::Error),
    /// A bpf() call failed.
    #[error("{what}")]
    Bpf {
        /// What was attempted.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Removing a file or directory failed.
    #[error("removing {path}")]
    Remove {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Fails unless the effective user is root.
pub fn require_root() -> Result<(), UninstallError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(UninstallError::NotRoot);
    }
    Ok(())
}

/// Arguments of `netpol-agent uninstall`.
#[derive(clap::Args, Debug, Clone)]
pub struct UninstallArgs {
    /// The pin directory to remove (all layout versions below it).
    #[arg(long, default_value = maps::PIN_ROOT)]
    pub pin_dir: PathBuf,
    /// The agent's status file.
    #[arg(long, default_value = crate::status::DEFAULT_PATH)]
    pub status_file: PathBuf,
}

/// What `uninstall` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UninstallReport {
    /// Attachments removed: `interface direction program how`.
    pub detached: Vec<String>,
    /// Programs of ours still attached afterwards (not held by a link; should not happen).
    pub still_attached: Vec<String>,
    /// The pin directory, if it existed and was removed.
    pub removed_pins: Option<PathBuf>,
    /// The status file, if it existed and was removed.
    pub removed_status_file: Option<PathBuf>,
}

impl UninstallReport {
    /// For the operator.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for d in &self.detached {
            s.push_str(&format!("detached {d}\n"));
        }
        for d in &self.still_attached {
            s.push_str(&format!("still attached (detach by hand): {d}\n"));
        }
        if self.detached.is_empty() {
            s.push_str("no netpol programs attached\n");
        }
        match &self.removed_pins {
            Some(p) => s.push_str(&format!("removed pinned maps {}\n", p.display())),
            None => s.push_str("no pinned maps\n"),
        }
        match &self.removed_status_file {
            Some(p) => s.push_str(&format!("removed status file {}\n", p.display())),
            None => s.push_str("no status file\n"),
        }
        s
    }
}

/// Ids of the maps pinned in `dir` or in its layout subdirectories.
fn pinned_map_ids(dir: &Path) -> BTreeSet<u32> {
    let mut dirs = vec![dir.to_owned()];
    if let Ok(rd) = std::fs::read_dir(dir) {
        dirs.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    let mut ids = BTreeSet::new();
    for d in dirs {
        for name in maps::ALL {
            let Ok(m) = MapData::from_pin(d.join(name)) else { continue };
            if let Ok(info) = m.info() {
                ids.insert(info.id());
            }
        }
    }
    ids
}

fn interfaces() -> Result<Vec<String>, UninstallError> {
    let mut out: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map_err(UninstallError::Interfaces)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    Ok(out)
}

/// One raw bpf() call with an attribute whose first field is a u32 (the only ones used here).
fn bpf_u32(cmd: libc::c_long, value: u32) -> std::io::Result<i64> {
    // bpf_attr is a union of at most 144 bytes in current kernels; zero the rest.
    let mut attr = [0u64; 18];
    attr[0] = u64::from(value);
    // SAFETY: attr is a valid, zero-initialised bpf_attr whose first u32 is set (little
    // endian: the low half of attr[0]); the kernel reads at most `size` bytes.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(&attr))
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_DETACH: libc::c_long = 34;

fn detach_link(link_id: u32) -> std::io::Result<()> {
    let fd = bpf_u32(BPF_LINK_GET_FD_BY_ID, link_id)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    use std::os::fd::AsRawFd as _;
    bpf_u32(BPF_LINK_DETACH, fd.as_raw_fd() as u32).map(|_| ())
}

/// Our programs attached to interfaces: (interface, direction, program name, program id).
fn attached_programs(
    ours: &BTreeSet<u32>,
) -> Result<Vec<(String, &'static str, String, u32)>, UninstallError> {
    let mut out = Vec::new();
    for iface in interfaces()? {
        for (at, dir) in [(TcAttachType::Ingress, "ingress"), (TcAttachType::Egress, "egress")] {
            // Fails for interfaces without TCX support or kernels before 6.6: nothing there.
            let Ok((_, progs)) = SchedClassifier::query_tcx(&iface, at) else { continue };
            for p in progs {
                let name = p.name_as_str().unwrap_or_default().to_owned();
                if name != maps::PROG_FROM_POD && name != maps::PROG_TO_POD {
                    continue;
                }
                let uses_ours = match p.map_ids() {
                    Ok(Some(ids)) => ids.iter().any(|i| ours.contains(i)),
                    _ => false,
                };
                if ours.is_empty() || uses_ours {
                    out.push((iface.clone(), dir, name, p.id()));
                }
            }
        }
    }
    Ok(out)
}

/// Detaches netpol's programs, removes `pin_dir` and `status_file`.
///
/// With maps pinned in `pin_dir`, only programs that use those maps are detached (so a test
/// instance with a private pin directory never touches another). With nothing pinned, every
/// attached `from_pod`/`to_pod` program counts as netpol's. Legacy clsact filters carry only a
/// name, so they are removed only for the default pin directory.
pub fn uninstall(pin_dir: &Path, status_file: &Path) -> Result<UninstallReport, UninstallError> {
    require_root()?;
    let mut report = UninstallReport::default();
    let ours = pinned_map_ids(pin_dir);
    let attached = attached_programs(&ours)?;
    let prog_ids: BTreeSet<u32> = attached.iter().map(|a| a.3).collect();
    if !prog_ids.is_empty() {
        for link in loaded_links() {
            let Ok(link) = link else { continue };
            if !matches!(link.link_type(), Ok(LinkType::Tcx))
                || !prog_ids.contains(&link.program_id())
            {
                continue;
            }
            detach_link(link.id()).map_err(|source| UninstallError::Bpf {
                what: format!("detaching TCX link {}", link.id()),
                source,
            })?;
            let (iface, dir, name, _) =
                attached.iter().find(|a| a.3 == link.program_id()).cloned().unwrap_or_default();
            report.detached.push(format!("{iface} {dir} {name} (tcx link {})", link.id()));
        }
    }
    report.still_attached = attached_programs(&ours)?
        .into_iter()
        .map(|(iface, dir, name, id)| format!("{iface} {dir} {name} (program {id})"))
        .collect();
    if pin_dir == Path::new(maps::PIN_ROOT) || pin_dir == Path::new(maps::PIN_DIR) {
        for iface in interfaces()? {
            for (at, dir, name) in [
                (TcAttachType::Ingress, "ingress", maps::PROG_FROM_POD),
                (TcAttachType::Egress, "egress", maps::PROG_TO_POD),
            ] {
                if qdisc_detach_program(&iface, at, name).is_ok() {
                    report.detached.push(format!("{iface} {dir} {name} (clsact filter)"));
                }
            }
        }
    }
    if pin_dir.exists() {
        std::fs::remove_dir_all(pin_dir)
            .map_err(|source| UninstallError::Remove { path: pin_dir.to_owned(), source })?;
        report.removed_pins = Some(pin_dir.to_owned());
    }
    match std::fs::remove_file(status_file) {
        Ok(()) => report.removed_status_file = Some(status_file.to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(UninstallError::Remove { path: status_file.to_owned(), source }),
    }
    Ok(report)
}

/// Runs `netpol-agent uninstall`.
pub fn run(args: UninstallArgs) -> anyhow::Result<()> {
    let r = uninstall(&args.pin_dir, &args.status_file)?;
    print!("{}", r.render());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_says_what_happened() {
        let empty = UninstallReport::default().render();
        assert!(empty.contains("no netpol programs attached") && empty.contains("no pinned maps"));
        let r = UninstallReport {
            detached: vec!["veth1 ingress from_pod (tcx link 4)".into()],
            still_attached: vec![],
            removed_pins: Some(PathBuf::from("/sys/fs/bpf/netpol")),
            removed_status_file: Some(PathBuf::from("/run/netpol/status.json")),
        }
        .render();
        assert!(r.contains("detached veth1 ingress from_pod"), "{r}");
        assert!(r.contains("removed pinned maps /sys/fs/bpf/netpol"), "{r}");
        assert!(r.contains("removed status file /run/netpol/status.json"), "{r}");
    }
}
