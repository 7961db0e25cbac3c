//! Other enforcers' programs on a pod's interface.
//!
//! Two policy engines on one interface overlap: each drops what its own policy denies, so a pod
//! gets the intersection of both, and removing a NetworkPolicy no longer opens what it seemed
//! to open. Cilium and Calico's eBPF dataplane attach TC programs to each pod's host-side veth,
//! the AWS network policy agent attaches tc filters there; kindnet and Calico's iptables mode do
//! not use TC. Before attaching, the agent asks the kernel what runs at both TC hooks of the
//! interface, both as TCX programs (kernel >= 6.6) and as legacy clsact `bpf` filters (dumped
//! over netlink), and counts everything that is not netpol's own as foreign.
//!
//! netpol's own: this process's programs, and `from_pod`/`to_pod` programs that use the maps
//! pinned in this agent's pin directory (a previous agent's attachments, adopted on restart).
//! A `from_pod` using other maps belongs to another netpol installation and is foreign too.
use std::{collections::BTreeSet, fmt};

use aya::programs::{tc::TcAttachType, ProgramInfo, SchedClassifier};
use futures::TryStreamExt as _;
use netpol_common::maps;
use rtnetlink::{
    packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption},
    Handle,
};

/// Errors of the foreign-program check.
#[derive(Debug, thiserror::Error)]
pub enum ForeignError {
    /// Dumping the interface's tc filters failed.
    #[error("dumping tc filters ({direction}) of {interface}")]
    Netlink {
        /// Interface name.
        interface: String,
        /// `ingress` or `egress`.
        direction: &'static str,
        /// Cause.
        #[source]
        source: rtnetlink::Error,
    },
    /// Reading an attached program's information failed.
    #[error("reading the TCX programs ({direction}) of {interface} by id (needs CAP_SYS_ADMIN)")]
    Query {
        /// Interface name.
        interface: String,
        /// `ingress` or `egress`.
        direction: &'static str,
        /// Cause.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
}

/// What counts as netpol's own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ownership {
    /// Ids of this process's programs.
    pub program_ids: BTreeSet<u32>,
    /// Ids of the maps pinned in this agent's pin directory.
    pub map_ids: BTreeSet<u32>,
}

impl Ownership {
    /// Whether a program with this id, name and maps is netpol's own (this process's, or a
    /// previous agent's on the same pinned maps).
    pub fn owns(&self, id: u32, name: &str, map_ids: &[u32]) -> bool {
        self.program_ids.contains(&id)
            || ((name == maps::PROG_FROM_POD || name == maps::PROG_TO_POD)
                && map_ids.iter().any(|m| self.map_ids.contains(m)))
    }
}

/// How a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// A TCX link or TCX multi-prog attachment (kernel >= 6.6).
    Tcx,
    /// A `bpf` filter on the clsact qdisc (netlink tc).
    Clsact,
}

/// A program of someone else at one of the interface's TC hooks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignProgram {
    /// `ingress` or `egress` (TC directions, seen from the host interface).
    pub direction: &'static str,
    /// How it is attached.
    pub hook: Hook,
    /// The program's name (TCX) or the filter's name (clsact).
    pub name: String,
    /// The kernel's program id (0 if a clsact filter did not report one).
    pub id: u32,
}

impl fmt::Display for ForeignProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hook = match self.hook {
            Hook::Tcx => "tcx",
            Hook::Clsact => "tc filter",
        };
        let name = if self.name.is_empty() { "(unnamed)" } else { &self.name };
        write!(f, "{} {hook} program {name} (id {})", self.direction, self.id)
    }
}

/// Joins programs for a log line or an error message.
pub fn describe(programs: &[ForeignProgram]) -> String {
    programs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

const DIRECTIONS: [(TcAttachType, &str); 2] =
    [(TcAttachType::Ingress, "ingress"), (TcAttachType::Egress, "egress")];

/// Every program at the TC hooks of `interface` (index `ifindex`) that is not netpol's own.
pub async fn find(
    handle: &Handle,
    interface: &str,
    ifindex: u32,
    ours: &Ownership,
) -> Result<Vec<ForeignProgram>, ForeignError> {
    let mut found = Vec::new();
    for (at, direction) in DIRECTIONS {
        match SchedClassifier::query_tcx(interface, at) {
            Ok((_, programs)) => {
                for p in programs {
                    let name = p.name_as_str().unwrap_or_default().to_owned();
                    let map_ids = p.map_ids().ok().flatten().unwrap_or_default();
                    if !ours.owns(p.id(), &name, &map_ids) {
                        found.push(ForeignProgram { direction, hook: Hook::Tcx, name, id: p.id() });
                    }
                }
            }
            // Kernels before 6.6 have no TCX (EINVAL): nothing can be attached that way. A
            // vanished interface is the caller's business (attaching fails with a clear error).
            // Anything else (EPERM: missing CAP_SYS_ADMIN to open programs by id) is an error:
            // a check that cannot look must not pass.
            Err(aya::programs::ProgramError::SyscallError(s))
                if matches!(
                    s.io_error.raw_os_error(),
                    Some(libc::EINVAL | libc::ENODEV | libc::ENOENT | libc::EOPNOTSUPP)
                ) => {}
            Err(aya::programs::ProgramError::TcError(_)) => {}
            Err(e) => {
                return Err(ForeignError::Query {
                    interface: interface.to_owned(),
                    direction,
                    source: Box::new(e),
                })
            }
        }
        for (name, id) in clsact_bpf_filters(handle, interface, ifindex, at, direction).await? {
            let map_ids = program_maps(id);
            if !ours.owns(id, &name, &map_ids) {
                found.push(ForeignProgram { direction, hook: Hook::Clsact, name, id });
            }
        }
    }
    Ok(found)
}

/// The `bpf` filters on the clsact qdisc of `ifindex` in one direction: (name, program id).
async fn clsact_bpf_filters(
    handle: &Handle,
    interface: &str,
    ifindex: u32,
    at: TcAttachType,
    direction: &'static str,
) -> Result<Vec<(String, u32)>, ForeignError> {
    let get = handle.traffic_filter(ifindex as i32).get();
    let get = match at {
        TcAttachType::Ingress => get.ingress(),
        _ => get.egress(),
    };
    let mut stream = get.execute();
    let mut out = Vec::new();
    loop {
        let msg = match stream.try_next().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            // No clsact qdisc (EINVAL) or the interface went away (ENODEV): no filters.
            Err(rtnetlink::Error::NetlinkError(e))
                if matches!(
                    e.raw_code().abs(),
                    libc::EINVAL | libc::ENOENT | libc::ENODEV | libc::EOPNOTSUPP
                ) =>
            {
                break
            }
            Err(source) => {
                return Err(ForeignError::Netlink {
                    interface: interface.to_owned(),
                    direction,
                    source,
                })
            }
        };
        let is_bpf = msg.attributes.iter().any(|a| matches!(a, TcAttribute::Kind(k) if k == "bpf"));
        if !is_bpf {
            continue;
        }
        let (mut name, mut id) = (String::new(), 0);
        for a in &msg.attributes {
            let TcAttribute::Options(options) = a else { continue };
            for o in options {
                match o {
                    TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => name = n.clone(),
                    TcOption::Bpf(TcFilterBpfOption::ProgId(i)) => id = *i,
                    _ => {}
                }
            }
        }
        // A filter dump also lists the chain/priority header entries without options.
        if id != 0 || !name.is_empty() {
            out.push((name, id));
        }
    }
    Ok(out)
}

/// The map ids of the loaded program `id` (empty if it cannot be read).
fn program_maps(id: u32) -> Vec<u32> {
    aya::programs::loaded_programs()
        .flatten()
        .find(|p: &ProgramInfo| p.id() == id)
        .and_then(|p| p.map_ids().ok().flatten())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours() -> Ownership {
        Ownership { program_ids: [10, 11].into(), map_ids: [100, 101].into() }
    }

    #[test]
    fn ownership_table() {
        let cases: &[(&str, u32, &str, &[u32], bool)] = &[
            ("this process's program", 10, "from_pod", &[100], true),
            ("a previous agent's from_pod on our maps", 7, "from_pod", &[101, 5], true),
            ("a previous agent's to_pod on our maps", 8, "to_pod", &[100], true),
            ("a from_pod of another netpol (other maps)", 9, "from_pod", &[200], false),
            ("another enforcer's program", 12, "cil_from_container", &[100], false),
            ("an unnamed filter", 13, "", &[], false),
        ];
        for (what, id, name, map_ids, want) in cases {
            assert_eq!(ours().owns(*id, name, map_ids), *want, "{what}");
        }
    }

    #[test]
    fn descriptions_name_direction_hook_program_and_id() {
        let p = [
            ForeignProgram {
                direction: "ingress",
                hook: Hook::Tcx,
                name: "cil_from_container".into(),
                id: 42,
            },
            ForeignProgram { direction: "egress", hook: Hook::Clsact, name: String::new(), id: 7 },
        ];
        assert_eq!(
            describe(&p),
            "ingress tcx program cil_from_container (id 42), egress tc filter program (unnamed) (id 7)"
        );
    }
}
