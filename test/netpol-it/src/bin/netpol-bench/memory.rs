//! The host's memory latency: the baseline a new allowed flow's figure is read against.
//!
//! A new allowed flow writes one way of a conntrack set that, in a table of the default size,
//! no packet touched for a long time: a line neither the caches nor the TLB hold. Throwaway
//! builds of the programs split a stream of such flows (241–256 ns, table evicted) into the
//! work without the conntrack insert (75–81 ns), the insert's read of the set's tags (30–35 ns
//! more) and the write of the way (130–145 ns more; README, "What a new allowed flow costs").
//! A store does not stall by itself, but the store buffer commits in order, and a program that
//! keeps storing fills it behind the missing line within a fraction of that line's latency. So
//! the stream costs about the program's own work plus one memory round trip, and this module
//! measures that round trip in the same run: a chase of dependent loads through a random cycle
//! over the lines of a buffer as large as the table's ways, in 4 KiB pages as the kernel
//! allocates a BPF array. The same chase in 2 MiB pages (transparent huge pages, where the
//! kernel grants them) shows what the TLB misses add, which is what a conntrack array in huge
//! pages could save at most.
use anyhow::{bail, Result};

use crate::LINE;

/// Size of a huge page (x86_64 and aarch64 with 4 KiB base pages).
const HUGE: usize = 2 << 20;

/// The pages a chase's buffer is mapped with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pages {
    /// 4 KiB pages, as vmalloc gives the conntrack array.
    Base,
    /// Transparent huge pages, if the kernel grants them ([`Chase::huge_share`]).
    Huge,
}

/// An anonymous mapping aligned to a huge page, unmapped on drop.
struct Mapping {
    raw: *mut libc::c_void,
    raw_len: usize,
    base: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize, pages: Pages) -> Result<Mapping> {
        let raw_len = len + HUGE;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                raw_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            bail!(
                "mmap of {raw_len} bytes for the memory latency baseline: {}",
                std::io::Error::last_os_error()
            );
        }
        let offset = (raw as usize).next_multiple_of(HUGE) - raw as usize;
        // SAFETY: `offset` < HUGE, so the window lies inside the mapping.
        let base = unsafe { (raw as *mut u8).add(offset) };
        let map = Mapping { raw, raw_len, base, len };
        let advice = match pages {
            Pages::Base => libc::MADV_NOHUGEPAGE,
            Pages::Huge => libc::MADV_HUGEPAGE,
        };
        // SAFETY: advice on our own mapping.
        if unsafe { libc::madvise(base as *mut libc::c_void, len, advice) } != 0 {
            bail!("madvise({pages:?} pages): {}", std::io::Error::last_os_error());
        }
        Ok(map)
    }

    fn line(&self, i: usize) -> *mut u32 {
        debug_assert!(i * LINE < self.len);
        // SAFETY: inside the mapping (callers index lines below len / LINE).
        unsafe { self.base.add(i * LINE) as *mut u32 }
    }

    /// Bytes of the window that the kernel backs with huge pages (the advice gave the window
    /// a mapping of its own).
    fn huge_bytes(&self) -> Result<usize> {
        anon_huge_bytes(&std::fs::read_to_string("/proc/self/smaps")?, self.base as usize)
    }
}

/// `AnonHugePages` of the mapping that holds `addr`, in bytes, from the text of
/// `/proc/<pid>/smaps`: each mapping's `start-end perms ...` line, then its `Key: value` lines.
fn anon_huge_bytes(smaps: &str, addr: usize) -> Result<usize> {
    let mut inside = false;
    for line in smaps.lines() {
        let range = line.split_once(' ').and_then(|(range, _)| range.split_once('-'));
        if let Some((Ok(from), Ok(to))) =
            range.map(|(from, to)| (usize::from_str_radix(from, 16), usize::from_str_radix(to, 16)))
        {
            inside = from <= addr && addr < to;
            continue;
        }
        if let Some(kb) = line.strip_prefix("AnonHugePages:").filter(|_| inside) {
            let kb = kb.trim().trim_end_matches("kB").trim();
            return Ok(kb.parse::<usize>()? * 1024);
        }
    }
    bail!("no AnonHugePages for the mapping at {addr:#x} in /proc/self/smaps")
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer referenced.
        unsafe { libc::munmap(self.raw, self.raw_len) };
    }
}

/// A buffer whose lines each hold the index of the next line of one random cycle through all
/// of them.
pub struct Chase {
    map: Mapping,
    lines: usize,
}

impl Chase {
    /// A buffer of `bytes` (rounded down to whole lines, at least two) in `pages`.
    pub fn new(bytes: usize, pages: Pages) -> Result<Chase> {
        let lines = (bytes / LINE).max(2);
        if lines > u32::MAX as usize {
            bail!("a memory latency buffer of {bytes} bytes has more lines than a u32 indexes");
        }
        let map = Mapping::new(lines * LINE, pages)?;
        // The lines in a random order (Fisher–Yates), chained in that order into one cycle:
        // the chase visits every line before it returns to one, in an order no prefetcher
        // follows.
        let mut order: Vec<u32> = (0..lines as u32).collect();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for i in (1..lines).rev() {
            let j = (rng.next() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        for k in 0..lines {
            // SAFETY: a line of the mapping, written before any read.
            unsafe { map.line(order[k] as usize).write(order[(k + 1) % lines]) };
        }
        Ok(Chase { map, lines })
    }

    /// Nanoseconds per load over `loads` dependent loads, after a pass over the whole buffer:
    /// the benchmark's packets run between samples, and that pass makes each sample start from
    /// what a chase itself leaves in the caches and TLB, not from what they left.
    pub fn latency_ns(&self, loads: usize) -> f64 {
        let mut i = self.walk(0, self.lines);
        let start = std::time::Instant::now();
        i = self.walk(i, loads);
        let elapsed = start.elapsed();
        std::hint::black_box(i);
        elapsed.as_nanos() as f64 / loads as f64
    }

    /// The share of the buffer in huge pages (after it was written, in [`Chase::new`]).
    pub fn huge_share(&self) -> Result<f64> {
        Ok(self.map.huge_bytes()? as f64 / self.map.len as f64)
    }

    fn walk(&self, mut i: u32, loads: usize) -> u32 {
        for _ in 0..loads {
            // SAFETY: every stored index is a line of the mapping.
            i = unsafe { self.map.line(i as usize).read_volatile() };
        }
        i
    }
}

/// Share of a buffer in huge pages below which its figure is not reported as theirs.
const HUGE_GRANTED: f64 = 0.9;

/// A run's memory latency baseline: the chase in both page sizes, sampled together.
pub struct Baseline {
    base: Chase,
    huge: Chase,
    loads: usize,
    base_ns: Vec<f64>,
    huge_ns: Vec<f64>,
}

/// Median and range of one page size's samples.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Latency {
    pub median_ns: f64,
    pub min_ns: f64,
    pub max_ns: f64,
    pub samples_ns: Vec<f64>,
}

impl Latency {
    fn of(samples: &[f64]) -> Latency {
        Latency {
            median_ns: crate::median(&mut samples.to_vec()),
            min_ns: samples.iter().copied().fold(f64::MAX, f64::min),
            max_ns: samples.iter().copied().fold(f64::MIN, f64::max),
            samples_ns: samples.to_vec(),
        }
    }
}

impl Baseline {
    /// Buffers of `bytes` each, chased `loads` loads per sample.
    pub fn new(bytes: usize, loads: usize) -> Result<Baseline> {
        Ok(Baseline {
            base: Chase::new(bytes, Pages::Base)?,
            huge: Chase::new(bytes, Pages::Huge)?,
            loads,
            base_ns: Vec::new(),
            huge_ns: Vec::new(),
        })
    }

    /// One sample of each page size.
    pub fn sample(&mut self) {
        self.base_ns.push(self.base.latency_ns(self.loads));
        self.huge_ns.push(self.huge.latency_ns(self.loads));
    }

    /// The 4 KiB pages' samples.
    pub fn base(&self) -> Latency {
        Latency::of(&self.base_ns)
    }

    /// The huge pages' samples and the share of the buffer the kernel backed with them; no
    /// samples where it granted less than [`HUGE_GRANTED`] of it (transparent huge pages off,
    /// or memory too fragmented), as they would be the small pages' figure again.
    pub fn huge(&self) -> Result<(Option<Latency>, f64)> {
        let share = self.huge.huge_share()?;
        Ok(((share >= HUGE_GRANTED).then(|| Latency::of(&self.huge_ns)), share))
    }
}

/// Marsaglia's xorshift64: enough to shuffle, and no dependency for it.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chase_is_one_cycle_through_every_line() {
        let chase = Chase::new(1000 * LINE, Pages::Base).unwrap();
        let mut seen = vec![false; chase.lines];
        let mut i = 0u32;
        for _ in 0..chase.lines {
            assert!(!seen[i as usize], "line {i} visited twice before the cycle closed");
            seen[i as usize] = true;
            i = unsafe { chase.map.line(i as usize).read() };
        }
        assert_eq!(i, 0, "the cycle returns to its start after every line");
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn huge_pages_are_read_from_the_mapping_that_holds_the_address() {
        let smaps = "\
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Size:               4096 kB
AnonHugePages:      2048 kB
7f0000400000-7f0002400000 rw-p 00000000 00:00 0
Size:              32768 kB
AnonHugePages:     30720 kB
7f0002400000-7f0002401000 rw-p 00000000 00:00 0
AnonHugePages:         0 kB
";
        assert_eq!(anon_huge_bytes(smaps, 0x7f00_0040_0000).unwrap(), 30 << 20);
        assert_eq!(anon_huge_bytes(smaps, 0x7f00_003f_ffff).unwrap(), 2 << 20);
        assert_eq!(anon_huge_bytes(smaps, 0x7f00_0240_0000).unwrap(), 0);
        assert!(anon_huge_bytes(smaps, 0x7f00_0300_0000).is_err(), "no mapping holds it");
    }

    #[test]
    fn a_base_page_buffer_has_no_huge_pages() {
        let chase = Chase::new(2 * HUGE, Pages::Base).unwrap();
        assert_eq!(chase.huge_share().unwrap(), 0.0);
    }
}
