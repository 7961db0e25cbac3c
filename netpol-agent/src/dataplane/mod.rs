//! The kernel side of the agent: loads the embedded programs, pins their maps under
//! `/sys/fs/bpf/netpol/v1`, attaches the programs to pod interfaces and writes map entries.
//!
//! Everything that issues bpf() or netlink calls lives here, behind [`Dataplane`]; the compiler
//! never sees it.

mod bpffs;
pub mod conntrack;
mod counters;
mod object;
pub mod pinned;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcAttachType},
        LinkOrder, ProgramError, SchedClassifier,
    },
    util::KernelVersion,
    Btf, Ebpf, EbpfError, EbpfLoader, Pod,
};
pub use counters::{CounterSnapshot, Stats};
use netpol_common::{
    counters::{COUNTER_SLOTS, NO_COUNTER_SLOT},
    ep::{Endpoint, EndpointKey, SlotOwner},
    event::Config,
    maps,
    policy::{PeerData, PeerValue, PortData, PortValue, PEER_FULL_BITS, PORT_FULL_BITS},
};

/// Errors of the dataplane.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The binary was built with `AYA_BUILD_SKIP=1` and carries no programs.
    #[error("this netpol-agent was built without its eBPF programs (AYA_BUILD_SKIP); rebuild without it")]
    NoObject,
    /// bpffs is not mounted and could not be mounted.
    #[error("mounting bpffs at {path}")]
    Bpffs {
        /// Mount point.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Creating the pin directory failed.
    #[error("creating pin directory {path}")]
    PinDir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Removing a pinned map of an older layout failed.
    #[error("removing {path}, a map pinned by an older layout")]
    Unpin {
        /// The pin.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A map that should be an array is not (pinned by another build).
    #[error("map {name} is not an array")]
    NotArray {
        /// Map name.
        name: &'static str,
    },
    /// The conntrack table's two maps have different set counts (pinned apart by hand).
    #[error(
        "conntrack maps np_ct ({ways} sets) and np_ct_tags ({tags} sets) differ in size; \
         delete both pins (or run `netpol-agent uninstall`)"
    )]
    CtSizeMismatch {
        /// Sets of `np_ct`.
        ways: usize,
        /// Sets of `np_ct_tags`.
        tags: usize,
    },
    /// Mapping a map's memory into the agent failed.
    #[error("mapping map {name} into memory")]
    Mmap {
        /// Map name.
        name: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Loading the object (maps, BTF, relocations) failed.
    #[error("loading the eBPF object {object}")]
    Load {
        /// The file given with `--bpf-object`, or "built into netpol-agent".
        object: String,
        /// Cause.
        #[source]
        source: Box<EbpfError>,
    },
    /// A program is missing or failed verification.
    #[error("loading program {name}")]
    Program {
        /// Program name.
        name: &'static str,
        /// Cause.
        #[source]
        source: Box<ProgramError>,
    },
    /// A pinned map was created by a build with another layout.
    #[error(
        "pinned map {path} has a {what} of {found} bytes where this build needs {expected}: it \
         was created by an incompatible netpol build; run `netpol-agent uninstall` (or remove \
         the pin directory) and start again"
    )]
    IncompatiblePin {
        /// The pin.
        path: PathBuf,
        /// "key size" or "value size".
        what: &'static str,
        /// Size of the pinned map.
        found: u32,
        /// Size this build uses.
        expected: u32,
    },
    /// The number of possible CPUs (the per-CPU maps' width) could not be read.
    #[error("reading the possible CPUs from /sys/devices/system/cpu/possible")]
    Cpus(#[source] std::io::Error),
    /// A map is missing from the object.
    #[error("map {name} is missing from the eBPF object")]
    MissingMap {
        /// Map name.
        name: &'static str,
    },
    /// A map operation failed.
    #[error("map {name}: {op}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What was attempted.
        op: &'static str,
        /// Cause.
        #[source]
        source: Box<MapError>,
    },
    /// Attaching to or detaching from an interface failed.
    #[error("attaching {program} to {interface}")]
    Attach {
        /// Program name.
        program: &'static str,
        /// Interface name.
        interface: String,
        /// Cause.
        #[source]
        source: Box<ProgramError>,
    },
    /// A TCX attachment did not yield a link file descriptor.
    #[error("attachment on {interface} has no link fd")]
    LinkFd {
        /// Interface name.
        interface: String,
        /// Cause.
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },
    /// Pinning an attachment failed.
    #[error("pinning link {path}")]
    PinLink {
        /// Pin path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Box<aya::pin::PinError>,
    },
    /// The interface does not exist.
    #[error("interface {interface} not found")]
    NoInterface {
        /// Interface name.
        interface: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// Load-time settings.
#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    /// Where maps are pinned (one directory per layout version).
    pub pin_dir: PathBuf,
    /// Capacity of the conntrack table in flows when it is created (`None`: [`maps::CT_MAX`]).
    pub ct_max_entries: Option<u32>,
    /// An eBPF object file to load instead of the one built into the binary (`None`: the
    /// embedded one). It must define the programs and maps of this layout version.
    pub object: Option<PathBuf>,
    /// Deny events per second and CPU (0 disables events).
    pub events_per_sec: u32,
    /// Burst of the event rate limit.
    pub events_burst: u32,
}

impl Default for DataplaneOptions {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from(maps::PIN_DIR),
            ct_max_entries: None,
            object: None,
            events_per_sec: 100,
            events_burst: 200,
        }
    }
}

/// Links of one attached interface.
struct Attachment {
    name: String,
    from_pod: LinkHold,
    to_pod: LinkHold,
}

/// How this process holds one attachment.
enum LinkHold {
    /// A TCX link pinned in bpffs: it outlives the process, so a restarted agent adopts it and
    /// swaps its program in place (no window without enforcement).
    Pinned { link: PinnedLink },
    /// A netlink (clsact) filter on kernels without TCX: owned by the program, gone with the
    /// process.
    Owned(SchedClassifierLinkId),
}

/// The loaded programs and their maps.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    attached: BTreeMap<u32, Attachment>,
    /// Counters of released interfaces, folded under ifindex 0 when their entries were deleted
    /// ([`Dataplane::forget_counters`]), so node-level totals never go down.
    retired: BTreeMap<netpol_common::counters::CounterKey, netpol_common::counters::CounterValue>,
    /// Counter slot (`Endpoint::counter_slot`) of each interface that has one, from its endpoint
    /// entry being written until its counters are forgotten. Rebuilt from `np_ep` on load.
    slots: BTreeMap<u32, u32>,
}

impl Dataplane {
    /// Mounts bpffs if needed, loads the programs and creates (or re-opens) the pinned maps.
    pub fn load(opts: &DataplaneOptions) -> Result<Self> {
        let embedded = object::bytes();
        if opts.object.is_none() && embedded.is_none() {
            return Err(DataplaneError::NoObject);
        }
        bpffs::ensure_mounted(Path::new("/sys/fs/bpf"))?;
        std::fs::create_dir_all(&opts.pin_dir)
            .map_err(|source| DataplaneError::PinDir { path: opts.pin_dir.clone(), source })?;
        let btf = Btf::from_sys_fs().ok();
        let mut loader = EbpfLoader::new();
        loader.btf(btf.as_ref());
        let paths: Vec<(&'static str, PathBuf)> =
            maps::ALL.iter().map(|name| (*name, opts.pin_dir.join(name))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        // The conntrack table's size is fixed when it is created; its set mask reaches the
        // programs as a load-time constant.
        let ct_sets = conntrack::sets_to_load(&opts.pin_dir, opts.ct_max_entries)?;
        let ct_mask = conntrack::set_mask(ct_sets);
        loader.map_max_entries(maps::CT, ct_sets);
        loader.map_max_entries(maps::CT_TAGS, ct_sets);
        loader.override_global("CT_SET_MASK", &ct_mask, true);
        let loaded = match (&opts.object, embedded) {
            (Some(path), _) => loader.load_file(path),
            (None, bytes) => loader.load(bytes.unwrap_or_default()),
        };
        let mut ebpf = loaded.map_err(|e| DataplaneError::Load {
            object: opts
                .object
                .as_ref()
                .map_or_else(|| "built into netpol-agent".to_owned(), |p| p.display().to_string()),
            source: Box::new(e),
        })?;
        check_pinned_layout(&opts.pin_dir)?;
        for name in [
            maps::PROG_FROM_POD,
            maps::PROG_TO_POD,
            maps::PROG_BENCH_FLOOR,
            maps::PROG_BENCH_NEW_FLOWS,
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::Program { name, source: Box::new(ProgramError::NotLoaded) })?
                .try_into()
                .map_err(|e| DataplaneError::Program { name, source: Box::new(e) })?;
            prog.load().map_err(|e| DataplaneError::Program { name, source: Box::new(e) })?;
        }
        let mut dp = Self {
            ebpf,
            pin_dir: opts.pin_dir.clone(),
            attached: BTreeMap::new(),
            retired: BTreeMap::new(),
            slots: BTreeMap::new(),
        };
        dp.slots = dp.endpoint_slots()?;
        dp.sync_slot_owners()?;
        dp.set_config(Config {
            events_per_sec: opts.events_per_sec,
            events_burst: opts.events_burst,
        })?;
        Ok(dp)
    }

    /// Directory of the pinned maps.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap { name })
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf.map(name).ok_or(DataplaneError::MissingMap { name })
    }

    fn set_config(&mut self, cfg: Config) -> Result<()> {
        let name = maps::CONFIG;
        let mut arr: Array<&mut MapData, Config> =
            self.map_mut(name)?.try_into().map_err(map_err(name, "open"))?;
        arr.set(0, cfg, 0).map_err(map_err(name, "set"))
    }

    /// Attaches both programs to `interface` (a pod's host-side interface): `from_pod` at TC
    /// ingress, `to_pod` at TC egress. Uses TCX links on kernels ≥ 6.6 and a clsact qdisc with
    /// netlink filters below. Returns the interface index.
    pub fn attach(&mut self, interface: &str) -> Result<u32> {
        let ifindex = ifindex(interface)?;
        if self.attached.contains_key(&ifindex) {
            return Ok(ifindex);
        }
        // Needed only on the netlink path (kernels < 6.6); harmless if it already exists.
        if let Err(e) = tc::qdisc_add_clsact(interface) {
            tracing::debug!(interface, error = %e, "clsact qdisc not added (exists or TCX in use)");
        }
        let from_pod =
            self.attach_one(maps::PROG_FROM_POD, interface, ifindex, TcAttachType::Ingress)?;
        let to_pod =
            match self.attach_one(maps::PROG_TO_POD, interface, ifindex, TcAttachType::Egress) {
                Ok(hold) => hold,
                Err(e) => {
                    match from_pod {
                        LinkHold::Pinned { link } => {
                            let _ = link.unpin();
                        }
                        LinkHold::Owned(id) => {
                            let _ = self.classifier(maps::PROG_FROM_POD).map(|p| p.detach(id));
                        }
                    }
                    return Err(e);
                }
            };
        self.attached.insert(ifindex, Attachment { name: interface.to_owned(), from_pod, to_pod });
        Ok(ifindex)
    }

    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier> {
        self.ebpf
            .program_mut(name)
            .ok_or(DataplaneError::Program { name, source: Box::new(ProgramError::NotLoaded) })?
            .try_into()
            .map_err(|e| DataplaneError::Program { name, source: Box::new(e) })
    }

    fn attach_one(
        &mut self,
        program: &'static str,
        interface: &str,
        ifindex: u32,
        at: TcAttachType,
    ) -> Result<LinkHold> {
        let err = |e: ProgramError| DataplaneError::Attach {
            program,
            interface: interface.to_owned(),
            source: Box::new(e),
        };
        // TCX links (kernel 6.6+) can be pinned; older kernels get netlink filters.
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        if !tcx {
            return self
                .classifier(program)?
                .attach(interface, at)
                .map(LinkHold::Owned)
                .map_err(err);
        }
        let dir = self.pin_dir.join("links");
        std::fs::create_dir_all(&dir)
            .map_err(|source| DataplaneError::PinDir { path: dir.clone(), source })?;
        let path = dir.join(format!("{ifindex}_{program}"));
        let prog = self.classifier(program)?;
        // A previous agent's attachment: swap this process's program into the existing link
        // atomically, so packets never pass unenforced during a restart or upgrade.
        let adopted = PinnedLink::from_pin(&path)
            .ok()
            .and_then(|old| SchedClassifierLink::try_from(FdLink::from(old)).ok())
            .and_then(|link| prog.attach_to_link(link).ok());
        let id = match adopted {
            Some(id) => id,
            // None, or a stale pin whose interface is gone: attach anew.
            None => prog
                .attach_with_options(interface, at, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .map_err(err)?,
        };
        let link: FdLink = prog.take_link(id).map_err(err)?.try_into().map_err(|e| {
            DataplaneError::LinkFd { interface: interface.to_owned(), source: Box::new(e) }
        })?;
        // Re-pin under the same name (the old pin names the same link or a dead one).
        let _ = std::fs::remove_file(&path);
        let link = link
            .pin(&path)
            .map_err(|e| DataplaneError::PinLink { path: path.clone(), source: Box::new(e) })?;
        Ok(LinkHold::Pinned { link })
    }

    /// What counts as netpol's own on an interface: this process's `from_pod`/`to_pod`, and
    /// programs using the maps pinned in this agent's pin directory ([`crate::foreign`]).
    pub fn ownership(&mut self) -> Result<crate::foreign::Ownership> {
        let mut own = crate::foreign::Ownership::default();
        for name in [maps::PROG_FROM_POD, maps::PROG_TO_POD] {
            let info = self
                .classifier(name)?
                .info()
                .map_err(|e| DataplaneError::Program { name, source: Box::new(e) })?;
            own.program_ids.insert(info.id());
        }
        for name in maps::ALL {
            let Ok(m) = MapData::from_pin(self.pin_dir.join(name)) else { continue };
            if let Ok(info) = m.info() {
                own.map_ids.insert(info.id());
            }
        }
        Ok(own)
    }

    /// Attaches one program of the object to `interface`, held by this process only (not
    /// pinned, not tracked as an endpoint): for tests and benchmarks that need some other
    /// program on an interface, such as `bench_floor` standing in for another enforcer's.
    /// `netlink` selects a legacy clsact filter instead of TCX. Detached when `self` drops.
    pub fn attach_unmanaged(
        &mut self,
        program: &'static str,
        interface: &str,
        at: TcAttachType,
        netlink: bool,
    ) -> Result<()> {
        let err = |e: ProgramError| DataplaneError::Attach {
            program,
            interface: interface.to_owned(),
            source: Box::new(e),
        };
        let options = if netlink {
            let _ = tc::qdisc_add_clsact(interface);
            TcAttachOptions::Netlink(tc::NlOptions::default())
        } else {
            TcAttachOptions::TcxOrder(LinkOrder::default())
        };
        self.classifier(program)?.attach_with_options(interface, at, options).map_err(err)?;
        Ok(())
    }

    /// Detaches both programs from the interface with index `ifindex`, if attached.
    pub fn detach(&mut self, ifindex: u32) -> Result<()> {
        let Some(a) = self.attached.remove(&ifindex) else {
            return Ok(());
        };
        for (program, hold) in [(maps::PROG_FROM_POD, a.from_pod), (maps::PROG_TO_POD, a.to_pod)] {
            match hold {
                // Unpinning removes the last reference besides our fd, which is closed here:
                // the kernel detaches the link.
                LinkHold::Pinned { link } => {
                    let _ = link.unpin();
                }
                LinkHold::Owned(id) => {
                    self.classifier(program)?.detach(id).map_err(|e| DataplaneError::Attach {
                        program,
                        interface: a.name.clone(),
                        source: Box::new(e),
                    })?
                }
            }
        }
        Ok(())
    }

    /// Whether this process's programs are really attached to interface `ifindex` (both
    /// directions), as the kernel reports it. Always `true` for netlink filters, which the kernel
    /// cannot be asked about by program id here.
    pub fn verify_attached(&mut self, ifindex: u32) -> Result<bool> {
        let Some(a) = self.attached.get(&ifindex) else { return Ok(false) };
        if !matches!(a.from_pod, LinkHold::Pinned { .. }) {
            return Ok(true);
        }
        let name = a.name.clone();
        for (program, at) in [
            (maps::PROG_FROM_POD, TcAttachType::Ingress),
            (maps::PROG_TO_POD, TcAttachType::Egress),
        ] {
            let ours = self
                .classifier(program)?
                .info()
                .map_err(|e| DataplaneError::Program { name: program, source: Box::new(e) })?
                .id();
            let attached = match SchedClassifier::query_tcx(&name, at) {
                Ok((_, progs)) => progs.iter().any(|p| p.id() == ours),
                // The interface is gone: not attached.
                Err(_) => false,
            };
            if !attached {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Removes pinned attachments (and endpoint entries) left by a previous agent for
    /// interfaces this process did not claim: pods that went away while no agent ran.
    pub fn release_unclaimed(&mut self) -> Result<Vec<u32>> {
        let dir = self.pin_dir.join("links");
        let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(Vec::new()) };
        let mut released = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(ifindex) = name.split('_').next().and_then(|i| i.parse::<u32>().ok()) else {
                continue;
            };
            if self.attached.contains_key(&ifindex) {
                continue;
            }
            // Dropping the opened link after removing the pin detaches it.
            let _ = std::fs::remove_file(e.path());
            self.remove_endpoint(ifindex)?;
            self.forget_counters(ifindex)?;
            if !released.contains(&ifindex) {
                released.push(ifindex);
            }
        }
        Ok(released)
    }

    /// Interfaces this process attached to, by ifindex.
    pub fn attached(&self) -> impl Iterator<Item = (u32, &str)> {
        self.attached.iter().map(|(i, a)| (*i, a.name.as_str()))
    }

    /// Every entry of `np_ep` (pinned: a previous agent's included).
    fn endpoints(&self) -> Result<Vec<(u32, Endpoint)>> {
        let name = maps::EP;
        let m: HashMap<&MapData, EndpointKey, Endpoint> =
            self.map(name)?.try_into().map_err(map_err(name, "open"))?;
        let mut out = Vec::new();
        for item in m.iter() {
            match item {
                Ok((k, v)) => out.push((k.ifindex, v)),
                // Deleted while iterating.
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_err(name, "iterate")(e)),
            }
        }
        Ok(out)
    }

    /// Interfaces with an endpoint entry.
    fn endpoint_ifindexes(&self) -> Result<std::collections::BTreeSet<u32>> {
        Ok(self.endpoints()?.into_iter().map(|(i, _)| i).collect())
    }

    /// Counter slots of the endpoint entries in `np_ep`.
    fn endpoint_slots(&self) -> Result<BTreeMap<u32, u32>> {
        Ok(self
            .endpoints()?
            .into_iter()
            .filter(|(_, ep)| ep.counter_slot != NO_COUNTER_SLOT)
            .map(|(i, ep)| (i, ep.counter_slot))
            .collect())
    }

    /// The counter slot of `ifindex`: the one it holds, else the lowest free one, its counters
    /// zeroed (an agent that died between removing an endpoint and forgetting its counters
    /// left them behind), else none (the programs then count in the per-CPU hash `np_cnt`).
    fn counter_slot(&mut self, ifindex: u32) -> Result<u32> {
        if let Some(slot) = self.slots.get(&ifindex) {
            return Ok(*slot);
        }
        let used: std::collections::BTreeSet<u32> = self.slots.values().copied().collect();
        let Some(slot) = (1..COUNTER_SLOTS).find(|s| !used.contains(s)) else {
            tracing::warn!(
                ifindex,
                "all {} counter slots are taken; counting this interface in np_cnt",
                COUNTER_SLOTS - 1
            );
            return Ok(NO_COUNTER_SLOT);
        };
        self.zero_slot(slot)?;
        self.slots.insert(ifindex, slot);
        Ok(slot)
    }

    /// Rewrites every entry of `np_slot` from `np_ep`: the owner of each slot in use, zeros
    /// for the others. An agent that died between writing an endpoint entry and its slot's
    /// owner, or between removing them, left them out of step; maps pinned before `np_slot`
    /// existed start with it empty.
    fn sync_slot_owners(&mut self) -> Result<()> {
        let owners: BTreeMap<u32, SlotOwner> = self
            .endpoints()?
            .into_iter()
            .filter(|(i, ep)| self.slots.get(i) == Some(&ep.counter_slot))
            .map(|(ifindex, ep)| {
                (ep.counter_slot, SlotOwner { ifindex, generation: ep.generation })
            })
            .collect();
        for slot in 1..COUNTER_SLOTS {
            self.set_slot_owner(slot, owners.get(&slot).copied().unwrap_or_default())?;
        }
        Ok(())
    }

    fn set_slot_owner(&mut self, slot: u32, owner: SlotOwner) -> Result<()> {
        let name = maps::SLOT;
        let mut arr: Array<&mut MapData, SlotOwner> =
            self.map_mut(name)?.try_into().map_err(map_err(name, "open"))?;
        arr.set(slot, owner, 0).map_err(map_err(name, "set"))
    }

    fn zero_slot(&mut self, slot: u32) -> Result<()> {
        use aya::maps::{PerCpuArray, PerCpuValues};
        use netpol_common::counters::{slot_counter_index, CounterValue, Reason};
        let name = maps::SLOT_COUNTERS;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e))?;
        let mut a: PerCpuArray<&mut MapData, CounterValue> =
            self.map_mut(name)?.try_into().map_err(map_err(name, "open"))?;
        for dir in [netpol_common::DIR_INGRESS, netpol_common::DIR_EGRESS] {
            for reason in Reason::ALL {
                let zeros = PerCpuValues::try_from(vec![CounterValue::default(); cpus])
                    .map_err(|e| DataplaneError::Cpus(std::io::Error::other(e)))?;
                a.set(slot_counter_index(slot, dir, reason), zeros, 0)
                    .map_err(map_err(name, "update"))?;
            }
        }
        Ok(())
    }

    /// Writes the endpoint entry of `ifindex` (one map update: a packet sees the old or the new
    /// value, never a mix), then its slot's owner with the new generation. Its `counter_slot` is
    /// this dataplane's to assign, whatever `ep` says.
    ///
    /// Between the two writes the fast path still accepts flows decided under the previous
    /// generation, as it did a moment earlier; the general path already stamps the new one,
    /// which the fast path accepts once the owner is written.
    pub fn set_endpoint(&mut self, ifindex: u32, mut ep: Endpoint) -> Result<()> {
        ep.counter_slot = self.counter_slot(ifindex)?;
        let name = maps::EP;
        let mut m: HashMap<&mut MapData, EndpointKey, Endpoint> =
            self.map_mut(name)?.try_into().map_err(map_err(name, "open"))?;
        m.insert(EndpointKey { ifindex }, ep, 0).map_err(map_err(name, "insert"))?;
        if ep.counter_slot != NO_COUNTER_SLOT {
            let owner = SlotOwner { ifindex, generation: ep.generation };
            self.set_slot_owner(ep.counter_slot, owner)?;
        }
        Ok(())
    }

    /// Reads the endpoint entry of `ifindex`.
    pub fn endpoint(&self, ifindex: u32) -> Result<Option<Endpoint>> {
        let name = maps::EP;
        let m: HashMap<&MapData, EndpointKey, Endpoint> =
            self.map(name)?.try_into().map_err(map_err(name, "open"))?;
        match m.get(&EndpointKey { ifindex }, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(name, "get")(e)),
        }
    }

    /// Removes the endpoint entry of `ifindex` and frees its slot's owner, so the fast path no
    /// longer accepts the interface's flows (its counters stay until
    /// [`Dataplane::forget_counters`]).
    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<()> {
        if let Some(slot) = self.slots.get(&ifindex).copied() {
            self.set_slot_owner(slot, SlotOwner::default())?;
        }
        let name = maps::EP;
        let mut m: HashMap<&mut MapData, EndpointKey, Endpoint> =
            self.map_mut(name)?.try_into().map_err(map_err(name, "open"))?;
        match m.remove(&EndpointKey { ifindex }) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(map_err(name, "remove")(e)),
        }
    }

    /// Inserts or replaces a peer entry (stage 1 of the policy lookup): a full-length one in the
    /// exact-match hash, a shorter one in the trie.
    pub fn upsert_peer(&mut self, prefix_len: u32, data: PeerData, value: PeerValue) -> Result<()> {
        if prefix_len == PEER_FULL_BITS {
            return self.hash_insert(maps::PEER_EXACT, data, value);
        }
        self.trie_insert(maps::PEER, prefix_len, data, value)
    }

    /// Removes a peer entry.
    pub fn remove_peer(&mut self, prefix_len: u32, data: PeerData) -> Result<()> {
        if prefix_len == PEER_FULL_BITS {
            return self.hash_remove::<PeerData, PeerValue>(maps::PEER_EXACT, data);
        }
        self.trie_remove::<PeerData, PeerValue>(maps::PEER, prefix_len, data)
    }

    /// Inserts or replaces a port entry (stage 2 of the policy lookup): a full-length one in the
    /// exact-match hash, a shorter one in the trie.
    pub fn upsert_port(&mut self, prefix_len: u32, data: PortData, value: PortValue) -> Result<()> {
        if prefix_len == PORT_FULL_BITS {
            return self.hash_insert(maps::PORT_EXACT, data, value);
        }
        self.trie_insert(maps::PORTS, prefix_len, data, value)
    }

    /// Removes a port entry.
    pub fn remove_port(&mut self, prefix_len: u32, data: PortData) -> Result<()> {
        if prefix_len == PORT_FULL_BITS {
            return self.hash_remove::<PortData, PortValue>(maps::PORT_EXACT, data);
        }
        self.trie_remove::<PortData, PortValue>(maps::PORTS, prefix_len, data)
    }

    fn hash_insert<K: Pod, V: Pod>(&mut self, name: &'static str, key: K, value: V) -> Result<()> {
        let mut m: HashMap<&mut MapData, K, V> =
            self.map_mut(name)?.try_into().map_err(map_err(name, "open"))?;
        m.insert(key, value, 0).map_err(map_err(name, "insert"))
    }

    /// Removes `key`; a missing key is not an error (the entry is gone either way).
    fn hash_remove<K: Pod, V: Pod>(&mut self, name: &'static str, key: K) -> Result<()> {
        let mut m: HashMap<&mut MapData, K, V> =
            self.map_mut(name)?.try_into().map_err(map_err(name, "open"))?;
        match m.remove(&key) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(map_err(name, "remove")(e)),
        }
    }

    fn trie_insert<K: Pod, V: Pod>(
        &mut self,
        name: &'static str,
        prefix_len: u32,
        data: K,
        value: V,
    ) -> Result<()> {
        let mut m: LpmTrie<&mut MapData, K, V> =
            self.map_mut(name)?.try_into().map_err(map_err(name, "open"))?;
        m.insert(&Key::new(prefix_len, data), value, 0).map_err(map_err(name, "insert"))
    }

    /// Removes a prefix; a missing one is not an error.
    fn trie_remove<K: Pod, V: Pod>(
        &mut self,
        name: &'static str,
        prefix_len: u32,
        data: K,
    ) -> Result<()> {
        let mut m: LpmTrie<&mut MapData, K, V> =
            self.map_mut(name)?.try_into().map_err(map_err(name, "open"))?;
        match m.remove(&Key::new(prefix_len, data)) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(map_err(name, "remove")(e)),
        }
    }

    /// Sums the per-CPU counters of every (endpoint, direction, reason) and the global stats.
    pub fn counters(&self) -> Result<CounterSnapshot> {
        let mut snap = counters::read(
            self.map(maps::COUNTERS)?,
            self.map(maps::SLOT_COUNTERS)?,
            self.slots.iter().map(|(i, s)| (*i, *s)),
            self.map(maps::RULE_COUNTERS)?,
            self.map(maps::STATS)?,
        )?;
        for (k, v) in &self.retired {
            let e = snap.by_reason.entry(*k).or_default();
            e.packets += v.packets;
            e.bytes += v.bytes;
        }
        Ok(snap)
    }

    /// Retires the counters of interface `ifindex` (released: detached and without an endpoint
    /// entry), adding their values to those of interface 0 so node-level totals stay
    /// monotonic: its `np_cnt` entries are deleted (without this, every pod that ever ran on the
    /// node would keep up to 20 entries until the map filled) and its counter slot is zeroed and
    /// freed. Returns how many non-zero counters were retired.
    pub fn forget_counters(&mut self, ifindex: u32) -> Result<usize> {
        use aya::maps::{PerCpuArray, PerCpuHashMap};
        use netpol_common::counters::{CounterKey, CounterValue};
        let mut retired = 0;
        if let Some(slot) = self.slots.get(&ifindex).copied() {
            let name = maps::SLOT_COUNTERS;
            let a: PerCpuArray<&MapData, CounterValue> =
                self.map(name)?.try_into().map_err(map_err(name, "open"))?;
            let values = counters::read_slot(&a, ifindex, slot)?;
            self.set_slot_owner(slot, SlotOwner::default())?;
            self.zero_slot(slot)?;
            self.slots.remove(&ifindex);
            for (k, v) in &values {
                let e = self.retired.entry(CounterKey { ifindex: 0, ..*k }).or_default();
                e.packets += v.packets;
                e.bytes += v.bytes;
            }
            retired += values.len();
        }
        let name = maps::COUNTERS;
        let mut m: PerCpuHashMap<&mut MapData, CounterKey, CounterValue> = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap { name })?
            .try_into()
            .map_err(map_err(name, "open"))?;
        let mut gone = Vec::new();
        for item in m.iter() {
            let (k, v) = item.map_err(map_err(name, "iterate"))?;
            if k.ifindex == ifindex {
                gone.push((k, v.iter().fold((0, 0), |a, c| (a.0 + c.packets, a.1 + c.bytes))));
            }
        }
        for (k, (packets, bytes)) in &gone {
            m.remove(k).map_err(map_err(name, "delete"))?;
            let e = self.retired.entry(CounterKey { ifindex: 0, ..*k }).or_default();
            e.packets += packets;
            e.bytes += bytes;
        }
        Ok(retired + gone.len())
    }

    /// Runs a program once per `repeat` on `packet` with BPF_PROG_TEST_RUN (no interface
    /// involved; `skb->ifindex` is the loopback's, 1). Returns the program's return value and the
    /// kernel-measured mean duration per run. Used by the datapath tests and benchmarks.
    pub fn test_run(
        &mut self,
        program: &'static str,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, std::time::Duration)> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let prog = self.classifier(program)?;
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.repeat = repeat.max(1);
        let r = prog
            .test_run(opts)
            .map_err(|e| DataplaneError::Program { name: program, source: Box::new(e) })?;
        Ok((r.return_value as i32, r.duration))
    }

    /// Points the benchmark's `bench_new_flows` at `program` (one of this object's), which then
    /// receives each packet it sees with the TCP source port bumped: a new flow per run.
    pub fn set_bench_next(&mut self, program: &'static str) -> Result<()> {
        use aya::maps::ProgramArray;
        let prog_err =
            |e: ProgramError| DataplaneError::Program { name: program, source: Box::new(e) };
        let fd = self.classifier(program)?.fd().map_err(prog_err)?;
        let fd = fd.try_clone().map_err(|e| prog_err(ProgramError::IOError(e)))?;
        let name = maps::BENCH_NEXT;
        let mut slots: ProgramArray<&mut MapData> =
            self.map_mut(name)?.try_into().map_err(map_err(name, "open"))?;
        slots.set(0, &fd, 0).map_err(map_err(name, "set"))
    }

    /// Capacity of the conntrack table in flows.
    pub fn conntrack_capacity(&self) -> Result<u64> {
        conntrack::capacity(self.map(maps::CT)?)
    }

    /// The conntrack table, mapped (for the GC's phases one by one).
    pub fn conntrack_table(&self) -> Result<conntrack::Table> {
        conntrack::Table::open(self.map(maps::CT)?, self.map(maps::CT_TAGS)?)
    }

    /// Every conntrack entry.
    pub fn conntrack(&self) -> Result<Vec<(netpol_common::ct::CtKey, netpol_common::ct::CtValue)>> {
        Ok(conntrack::dump(&self.conntrack_table()?))
    }

    /// One garbage-collection pass over the conntrack map at time `now_ns` (monotonic clock).
    pub fn gc_conntrack(
        &mut self,
        now_ns: u64,
        timeouts: &netpol_common::ct::Timeouts,
    ) -> Result<conntrack::GcStats> {
        // Entries of interfaces without an endpoint entry go too: the agent removes the entry
        // when it releases an interface, after detaching the programs, so nothing refreshes them.
        let enforced = self.endpoint_ifindexes()?;
        let table = self.conntrack_table()?;
        let (scanned, expired) = conntrack::scan(&table, now_ns, timeouts, Some(&enforced));
        let mut stats = conntrack::sweep(&table, &expired);
        stats.scanned = scanned;
        Ok(stats)
    }

    /// Deletes every conntrack entry; returns how many.
    pub fn clear_conntrack(&mut self) -> Result<u64> {
        Ok(conntrack::clear(&self.conntrack_table()?))
    }

    /// Takes the deny-event ring buffer (`np_events`) out of the loaded object, for a reader
    /// task ([`crate::events::run`]). Works once; later calls report the map as missing.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let name = maps::EVENTS;
        let map = self.ebpf.take_map(name).ok_or(DataplaneError::MissingMap { name })?;
        RingBuf::try_from(map).map_err(map_err(name, "open"))
    }

    /// Mutable access to a map by name, for callers that need a map type not wrapped here.
    pub fn raw_map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.map_mut(name)
    }

    /// Detaches every interface this process attached (their link pins go too). Pinned maps
    /// stay; [`remove_pins`] deletes them.
    pub fn detach_all(&mut self) -> Result<()> {
        let ifindexes: Vec<u32> = self.attached.keys().copied().collect();
        for i in ifindexes {
            self.detach(i)?;
        }
        Ok(())
    }
}

/// Key and value sizes of every map whose entries the agent or the programs interpret.
fn layout() -> [(&'static str, usize, usize); 15] {
    use core::mem::size_of;
    use netpol_common::{counters::*, ct::*, event::*};
    let lpm = |data: usize| size_of::<u32>() + data;
    [
        (maps::EP, size_of::<EndpointKey>(), size_of::<Endpoint>()),
        (maps::SLOT, size_of::<u32>(), size_of::<SlotOwner>()),
        (maps::PEER, lpm(size_of::<PeerData>()), size_of::<PeerValue>()),
        (maps::PEER_EXACT, size_of::<PeerData>(), size_of::<PeerValue>()),
        (maps::PORTS, lpm(size_of::<PortData>()), size_of::<PortValue>()),
        (maps::PORT_EXACT, size_of::<PortData>(), size_of::<PortValue>()),
        (maps::CT, size_of::<u32>(), size_of::<CtSet>()),
        (maps::CT_TAGS, size_of::<u32>(), size_of::<CtTags>()),
        (maps::FRAG, size_of::<FragKey>(), size_of::<FragValue>()),
        (maps::COUNTERS, size_of::<CounterKey>(), size_of::<CounterValue>()),
        (maps::SLOT_COUNTERS, size_of::<u32>(), size_of::<CounterValue>()),
        (maps::RULE_COUNTERS, size_of::<RuleCounterKey>(), size_of::<CounterValue>()),
        (maps::STATS, size_of::<u32>(), size_of::<u64>()),
        (maps::EVENT_RATE, size_of::<u32>(), size_of::<RateState>()),
        (maps::CONFIG, size_of::<u32>(), size_of::<Config>()),
    ]
}

/// Refuses maps pinned by a build with another layout. aya reuses a pinned map by name without
/// comparing it with the object's definition, so the programs would otherwise fail
/// verification with an obscure out-of-bounds error, or the agent misread the entries.
fn check_pinned_layout(pin_dir: &Path) -> Result<()> {
    for (name, key, value) in layout() {
        let path = pin_dir.join(name);
        let data = MapData::from_pin(&path).map_err(map_err(name, "open pinned"))?;
        let info = data.info().map_err(map_err(name, "info"))?;
        for (what, found, expected) in
            [("key size", info.key_size(), key), ("value size", info.value_size(), value)]
        {
            if found as usize != expected {
                return Err(DataplaneError::IncompatiblePin {
                    path,
                    what,
                    found,
                    expected: expected as u32,
                });
            }
        }
    }
    Ok(())
}

/// Deletes the pinned maps in `pin_dir` and the directory itself (uninstall, tests).
pub fn remove_pins(pin_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(pin_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Deleting a missing key is not an error for us (it is gone either way); aya reports it as
/// `KeyNotFound` or as the raw ENOENT of bpf_map_delete_elem.
pub(crate) fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn map_err(name: &'static str, op: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |e| DataplaneError::Map { name, op, source: Box::new(e) }
}

fn ifindex(interface: &str) -> Result<u32> {
    let c = std::ffi::CString::new(interface).map_err(|e| DataplaneError::NoInterface {
        interface: interface.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(DataplaneError::NoInterface {
            interface: interface.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(i)
}
