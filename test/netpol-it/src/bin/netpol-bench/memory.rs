//! The host's memory latency: the baseline a new allowed flow's figure is read against.
//!
//! A new allowed flow writes one way of a conntrack set that, in a table of the default size,
//! no packet touched for a long time: a line neither the caches nor the TLB hold. Throwaway
//! builds of the programs split a stream of such flows (241–256 ns, table evicted) into the
//! work without the conntrack insert (75–81 ns), the insert's read of the set's tags (30–35 ns
//! more) and the write of the way (130–145 ns more; README, "What a new allowed flow costs"). A store does not stall by itself, but the
//! store buffer commits in order, and a program that keeps storing fills it behind the missing
//! line within a fraction of that line's latency. So the stream costs about the program's own
//! work plus one memory round trip, and this module measures that round trip in the same run:
//! a chase of dependent loads through a random cycle over the lines of a buffer as large as the
//! table's ways, in 4 KiB pages as the kernel allocates a BPF array.
use anyhow::{bail, Result};

const LINE: usize = 64;

/// An anonymous mapping, unmapped on drop.
struct Mapping {
    base: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> Result<Mapping> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            bail!(
                "mmap of {len} bytes for the memory latency baseline: {}",
                std::io::Error::last_os_error()
            );
        }
        let map = Mapping { base: base as *mut u8, len };
        // 4 KiB pages, as vmalloc gives the conntrack array: a transparent huge page would
        // spare the chase the TLB misses the programs pay.
        // SAFETY: advice on our own mapping.
        if unsafe { libc::madvise(base, len, libc::MADV_NOHUGEPAGE) } != 0 {
            bail!("madvise(MADV_NOHUGEPAGE): {}", std::io::Error::last_os_error());
        }
        Ok(map)
    }

    fn line(&self, i: usize) -> *mut u32 {
        debug_assert!(i * LINE < self.len);
        // SAFETY: inside the mapping (callers index lines below len / LINE).
        unsafe { self.base.add(i * LINE) as *mut u32 }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer referenced.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// A buffer whose lines each hold the index of the next line of one random cycle through all
/// of them.
pub struct Chase {
    map: Mapping,
    lines: usize,
}

impl Chase {
    /// A buffer of `bytes` (rounded down to whole lines, at least two).
    pub fn new(bytes: usize) -> Result<Chase> {
        let lines = (bytes / LINE).max(2);
        if lines > u32::MAX as usize {
            bail!("a memory latency buffer of {bytes} bytes has more lines than a u32 indexes");
        }
        let map = Mapping::new(lines * LINE)?;
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

    /// Nanoseconds per load over `loads` dependent loads (after a first pass over the buffer,
    /// so that page faults and first touches are not counted).
    pub fn latency_ns(&self, loads: usize) -> f64 {
        let mut i = self.walk(0, self.lines);
        let start = std::time::Instant::now();
        i = self.walk(i, loads);
        let elapsed = start.elapsed();
        std::hint::black_box(i);
        elapsed.as_nanos() as f64 / loads as f64
    }

    fn walk(&self, mut i: u32, loads: usize) -> u32 {
        for _ in 0..loads {
            // SAFETY: every stored index is a line of the mapping.
            i = unsafe { self.map.line(i as usize).read_volatile() };
        }
        i
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
        let chase = Chase::new(1000 * LINE).unwrap();
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
}
