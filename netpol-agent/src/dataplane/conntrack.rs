//! The conntrack table (`np_ct` and its tags `np_ct_tags`, see `netpol_common::ct`): its size at
//! load time, dump and garbage collection. The programs create and refresh entries; the agent
//! expires them.
//!
//! The agent reads and frees ways through shared mappings of the two maps (both are mmapable),
//! not a syscall per set: a GC pass reads the tags (1 MiB at the default size) and only the ways
//! they mark taken. Freeing races with the datapath refreshing or reusing the same way, so GC is
//! two-phase: [`scan`] records the `last_seen_ns` of every expired way, [`sweep`] re-reads each
//! one and frees it only if it still holds that flow at that time (a packet in between keeps the
//! flow). A way is freed by zeroing its tag, one aligned 2-byte store.
use std::{
    collections::BTreeSet,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    ptr::NonNull,
};

use aya::maps::{Map, MapData, MapType};
use netpol_common::{
    ct::{sets_for, CtKey, CtSet, CtTags, CtValue, CtWay, Timeouts, CT_WAYS},
    maps,
};

use super::{map_err, DataplaneError};

/// An entry found expired by [`scan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired {
    /// Where it is: set × ways + way.
    pub way: usize,
    /// The flow.
    pub key: CtKey,
    /// Its last-seen time when scanned.
    pub last_seen_ns: u64,
}

/// What one GC pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Entries present at the scan.
    pub scanned: u64,
    /// Entries deleted.
    pub deleted: u64,
    /// Expired entries kept because a packet refreshed them between scan and sweep.
    pub refreshed: u64,
}

/// The current `CLOCK_MONOTONIC` time in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The programs' set mask for a table of `sets` sets (a power of two when the agent made it).
pub fn set_mask(sets: u32) -> u32 {
    sets_for(sets.saturating_mul(CT_WAYS as u32)) - 1
}

/// Sets of the table to load: those of the table pinned in `pin_dir` if it has this layout (a
/// pinned table outlives the agent, with its flows; its size wins over `requested`), else
/// enough for `requested` flows ([`maps::CT_MAX`] by default). A table pinned by an older
/// layout (the LRU hash of earlier versions), or only half of one, is unpinned, so the loader
/// creates this one: the programs still attached keep the old table until they are replaced,
/// and the flows it held are picked up again by the new programs' general path.
pub fn sets_to_load(pin_dir: &Path, requested: Option<u32>) -> Result<u32, DataplaneError> {
    let wanted = sets_for(requested.unwrap_or(maps::CT_MAX as u32));
    let (ways_pin, tags_pin) = (pin_dir.join(maps::CT), pin_dir.join(maps::CT_TAGS));
    if !ways_pin.exists() && !tags_pin.exists() {
        return Ok(wanted);
    }
    let shape = |pin: &Path, name: &'static str, value: usize| -> Result<Option<u32>, _> {
        if !pin.exists() {
            return Ok(None);
        }
        let info =
            MapData::from_pin(pin).and_then(|d| d.info()).map_err(map_err(name, "open pinned"))?;
        let fits = matches!(info.map_type(), Ok(MapType::Array))
            && info.key_size() as usize == size_of::<u32>()
            && info.value_size() as usize == value;
        Ok(fits.then_some(info.max_entries()))
    };
    let ways = shape(&ways_pin, maps::CT, size_of::<CtSet>())?;
    let tags = shape(&tags_pin, maps::CT_TAGS, size_of::<CtTags>())?;
    if let (Some(sets), Some(tag_sets)) = (ways, tags) {
        if sets == tag_sets {
            if sets != wanted && requested.is_some() {
                tracing::warn!(
                    pinned_flows = sets as u64 * CT_WAYS as u64,
                    requested_flows = requested,
                    "keeping the pinned conntrack table and its size; delete its pins to resize it"
                );
            }
            return Ok(sets);
        }
    }
    tracing::warn!(
        pin_dir = %pin_dir.display(),
        "replacing a conntrack table of an older layout; its flows are tracked again as they \
         send packets"
    );
    for pin in [ways_pin, tags_pin] {
        match std::fs::remove_file(&pin) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(DataplaneError::Unpin { path: pin, source: e });
            }
            _ => {}
        }
    }
    Ok(wanted)
}

/// One map mapped into this process.
struct Mapping<T> {
    base: NonNull<T>,
    len: usize,
    bytes: usize,
}

impl<T> Mapping<T> {
    fn new(map: &Map, name: &'static str) -> Result<Self, DataplaneError> {
        let Map::Array(data) = map else {
            return Err(DataplaneError::NotArray { name });
        };
        let len = data.info().map_err(map_err(name, "info"))?.max_entries() as usize;
        let bytes = len * size_of::<T>();
        // SAFETY: maps the map's fd shared, at most its size; the kernel refuses an fd that is
        // not an mmapable map. Unmapped in `Drop`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DataplaneError::Mmap { name, source: std::io::Error::last_os_error() });
        }
        let base = NonNull::new(ptr as *mut T).expect("mmap returned null without failing");
        Ok(Mapping { base, len, bytes })
    }

    /// Where the map is mapped in this process, and how many bytes.
    fn region(&self) -> (*const u8, usize) {
        (self.base.as_ptr() as *const u8, self.bytes)
    }

    fn at(&self, i: usize) -> *mut T {
        assert!(i < self.len, "index {i} beyond {} values", self.len);
        // SAFETY: within the mapping.
        unsafe { self.base.as_ptr().add(i) }
    }
}

impl<T> Drop for Mapping<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `Mapping::new`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

/// The table, mapped. Way `i` is way `i % CT_WAYS` of set `i / CT_WAYS`.
pub struct Table {
    ways: Mapping<CtSet>,
    tags: Mapping<CtTags>,
}

impl Table {
    /// Maps the table's two maps.
    pub fn open(ways: &Map, tags: &Map) -> Result<Table, DataplaneError> {
        let table =
            Table { ways: Mapping::new(ways, maps::CT)?, tags: Mapping::new(tags, maps::CT_TAGS)? };
        if table.ways.len != table.tags.len {
            return Err(DataplaneError::CtSizeMismatch {
                ways: table.ways.len,
                tags: table.tags.len,
            });
        }
        Ok(table)
    }

    fn len(&self) -> usize {
        self.ways.len * CT_WAYS
    }

    /// The memory of the ways and of the tags as this process maps them, for as long as the
    /// table lives (the datapath benchmark evicts it from the CPU caches). The programs write
    /// it meanwhile: read it only through raw pointers, never as a slice.
    pub fn regions(&self) -> [(*const u8, usize); 2] {
        [self.ways.region(), self.tags.region()]
    }

    /// Way `i`'s tag. Volatile: the programs write the table concurrently.
    fn tag(&self, i: usize) -> u16 {
        let set = self.tags.at(i / CT_WAYS);
        // SAFETY: within the mapping, 2-byte aligned (a page-aligned array of 8-byte values).
        unsafe { std::ptr::addr_of!((*set).tags[i % CT_WAYS]).read_volatile() }
    }

    /// The flow in way `i`, if any: a copy taken between two reads of its tag that agree (the
    /// programs clear the tag before they rewrite a way and set it after), so never half of
    /// one flow and half of another, unless a flow of the same 16-bit tag replaced it during
    /// the copy (1 in 32,768 such replacements). [`sweep`] may then free the new flow for the
    /// old one, as it may when a flow replaces the way between its read and its free: the new
    /// flow's next packet is decided afresh, as after an eviction.
    fn read(&self, i: usize) -> Option<(CtKey, CtValue)> {
        let tag = self.tag(i);
        if tag == 0 {
            return None;
        }
        let set = self.ways.at(i / CT_WAYS);
        // SAFETY: within the mapping; a CtWay is plain data, valid for any bits.
        let way: CtWay = unsafe { std::ptr::addr_of!((*set).ways[i % CT_WAYS]).read_volatile() };
        (self.tag(i) == tag).then_some((way.key, way.value))
    }

    /// Frees way `i`: zeroes its tag.
    fn free(&self, i: usize) {
        let set = self.tags.at(i / CT_WAYS);
        // SAFETY: as in `tag`.
        unsafe { std::ptr::addr_of_mut!((*set).tags[i % CT_WAYS]).write_volatile(0) };
    }

    /// Every flow: its way, key and entry.
    fn entries(&self) -> impl Iterator<Item = (usize, CtKey, CtValue)> + '_ {
        (0..self.len()).filter_map(|i| self.read(i).map(|(k, v)| (i, k, v)))
    }
}

/// Capacity of the table in flows.
pub fn capacity(ways: &Map) -> Result<u64, DataplaneError> {
    let Map::Array(data) = ways else {
        return Err(DataplaneError::NotArray { name: maps::CT });
    };
    let sets = data.info().map_err(map_err(maps::CT, "info"))?.max_entries();
    Ok(sets as u64 * CT_WAYS as u64)
}

/// Every entry of the conntrack table.
pub fn dump(table: &Table) -> Vec<(CtKey, CtValue)> {
    table.entries().map(|(_, k, v)| (k, v)).collect()
}

/// Phase one: entries idle for longer than their timeout at `now_ns`, and, when `enforced` is
/// given, every entry of an interface not in it (released: its pod is gone, and a later pod on
/// a reused ifindex must not find its flows). Returns the number of entries and the expired.
pub fn scan(
    table: &Table,
    now_ns: u64,
    timeouts: &Timeouts,
    enforced: Option<&BTreeSet<u32>>,
) -> (u64, Vec<Expired>) {
    let mut entries = 0;
    let mut expired = Vec::new();
    for (way, key, value) in table.entries() {
        entries += 1;
        let idle = now_ns.saturating_sub(value.last_seen_ns);
        if idle > timeouts.for_value(key.proto, &value).saturating_mul(1_000_000_000)
            || enforced.is_some_and(|e| !e.contains(&key.ifindex))
        {
            expired.push(Expired { way, key, last_seen_ns: value.last_seen_ns });
        }
    }
    (entries, expired)
}

/// Phase two: frees the scanned entries that still hold their flow, unrefreshed.
pub fn sweep(table: &Table, expired: &[Expired]) -> GcStats {
    let mut stats = GcStats::default();
    for e in expired {
        match table.read(e.way) {
            Some((key, value)) if key == e.key => {
                if value.last_seen_ns == e.last_seen_ns {
                    table.free(e.way);
                    stats.deleted += 1;
                } else {
                    stats.refreshed += 1;
                }
            }
            // Freed, or evicted and reused by another flow in the meantime: gone either way.
            _ => {}
        }
    }
    stats
}

/// Frees every entry (tests; `uninstall`); returns how many there were.
pub fn clear(table: &Table) -> u64 {
    let mut n = 0;
    for i in 0..table.len() {
        if table.tag(i) != 0 {
            table.free(i);
            n += 1;
        }
    }
    n
}
