//! The conntrack table: lookups and inserts into the set-associative array `np_ct` (its shape
//! and why it is not a kernel hash: `netpol_common::ct`).
//!
//! Concurrency: the programs of every CPU read and write the table without a lock, as they did
//! the LRU hash's entries (whose elements the kernel also reuses at once on eviction). An insert
//! clears the way's tag, writes the entry and key, then the new tag, so a reader on another CPU
//! (x86 keeps stores in order) matches the key only once the entry behind it is whole. Two CPUs
//! inserting into one set at the same instant may pick the same way: one of the two flows is
//! then not tracked, and its next packet is decided afresh by the general path (a reply by the
//! mid-flow pickup), as after an eviction.
use core::sync::atomic::{compiler_fence, Ordering};

use netpol_common::{
    ct::{set_and_tag, CtKey, CtSet, CtTags, CtValue, CtWay, CT_WAYS},
    maps::CT_MAX,
};

use crate::maps::{CT_MAP, CT_TAGS_MAP};

/// The conntrack key as the words of its `repr(C)` layout.
pub type KeyWords = [u32; 7];

/// Sets − 1 of the loaded table. The agent writes it at load time from the size of the table it
/// creates or finds pinned (`.rodata`, frozen before the programs load); the default is the
/// default table's.
#[no_mangle]
static CT_SET_MASK: u32 = (CT_MAX / CT_WAYS - 1) as u32;

#[inline(always)]
fn mask() -> u32 {
    // SAFETY: a static; read volatile so the compiler keeps the load the agent's value feeds.
    unsafe { core::ptr::read_volatile(&CT_SET_MASK) }
}

/// `key` as its words, in place.
#[inline(always)]
pub fn words(key: &CtKey) -> &KeyWords {
    const _: () = assert!(
        core::mem::size_of::<CtKey>() == core::mem::size_of::<KeyWords>()
            && core::mem::align_of::<CtKey>() == core::mem::align_of::<KeyWords>()
    );
    // SAFETY: CtKey is `repr(C)`, as large and as aligned as the words, without padding between
    // its fields, and every bit pattern is valid for both.
    unsafe { &*(key as *const CtKey as *const KeyWords) }
}

/// Whether `way` holds the flow `w`.
#[inline(always)]
fn holds(way: &CtWay, w: &KeyWords) -> bool {
    same_key(words(&way.key), w)
}

/// Whether two keys are equal. Word by word, written out: as an iterator's fold the compare
/// measured ~8 ns slower (in the flow cache, which uses it too).
#[inline(always)]
pub fn same_key(a: &KeyWords, w: &KeyWords) -> bool {
    let diff = (a[0] ^ w[0])
        | (a[1] ^ w[1])
        | (a[2] ^ w[2])
        | (a[3] ^ w[3])
        | (a[4] ^ w[4])
        | (a[5] ^ w[5])
        | (a[6] ^ w[6]);
    diff == 0
}

/// The tags and ways of the set of the flow `w`, and its tag.
#[inline(always)]
fn set(w: &KeyWords) -> Option<(&'static mut CtTags, &'static mut CtSet, u16)> {
    let (index, tag) = set_and_tag(w, mask());
    let tags = CT_TAGS_MAP.get_ptr_mut(index)?;
    let ways = CT_MAP.get_ptr_mut(index)?;
    // SAFETY: values of the two tables; concurrent writers: see the module doc.
    Some(unsafe { (&mut *tags, &mut *ways, tag) })
}

/// The entry of the flow `w`, if it is tracked.
#[inline(always)]
pub fn lookup(w: &KeyWords) -> Option<*mut CtValue> {
    let (tags, set, tag) = set(w)?;
    for (t, way) in tags.tags.iter().zip(set.ways.iter_mut()) {
        if *t == tag && holds(way, w) {
            return Some(&mut way.value);
        }
    }
    None
}

/// Whether the flow `w` is tracked and not cut by a policy change: for ICMP errors, rare enough
/// to pay for a call. A subprogram of its own: inlined into the ICMP error path beside that
/// path's policy subprogram calls, the lookup made LLVM keep a value in R5 across one of them,
/// which the verifier rejects (calls clobber R1–R5).
#[inline(never)]
pub fn tracked_unless_cut(w: &KeyWords) -> bool {
    match lookup(w) {
        // SAFETY: a value of the table, read once.
        Some(ct) => (unsafe { (*ct).verdict }) != netpol_common::ct::CT_VERDICT_DENY,
        None => false,
    }
}

/// Why [`insert`] wrote nothing.
pub enum NotInserted {
    /// The flow is tracked, and the insert was not to replace its entry.
    Exists,
    /// The set could not be read (an index beyond the table: a mask the agent did not match to
    /// the table; never with the agent's).
    NoSet,
}

/// Writes `value` as the entry of the flow `w`: over its own entry if it is tracked (or, with
/// `replace` false, not at all), else into a free way of its set, else over the way whose flow
/// was seen least recently.
#[inline(always)]
pub fn insert(w: &KeyWords, value: &CtValue, replace: bool) -> Result<(), NotInserted> {
    let (tags, set, tag) = set(w).ok_or(NotInserted::NoSet)?;
    let (mut own, mut free) = (CT_WAYS, CT_WAYS);
    for (i, (t, way)) in tags.tags.iter().zip(set.ways.iter()).enumerate() {
        if *t == tag && holds(way, w) {
            own = i;
            break;
        }
        if *t == 0 && free == CT_WAYS {
            free = i;
        }
    }
    // The flow's own way is rewritten like any other (tag cleared first), so a reader on another
    // CPU never sees half of the old entry and half of the new: the old one may be a deny
    // tombstone, the new one an allowed connection reusing its ports.
    let victim = if own < CT_WAYS {
        if !replace {
            return Err(NotInserted::Exists);
        }
        own
    } else if free < CT_WAYS {
        free
    } else {
        // A full set: the ways' times are read only now.
        let mut victim = 0;
        let mut oldest = u64::MAX;
        for (i, way) in set.ways.iter().enumerate() {
            if way.value.last_seen_ns < oldest {
                oldest = way.value.last_seen_ns;
                victim = i;
            }
        }
        crate::counters::stat(netpol_common::counters::STAT_CT_EVICTED);
        victim
    };
    let (Some(t), Some(way)) = (tags.tags.get_mut(victim), set.ways.get_mut(victim)) else {
        return Err(NotInserted::NoSet);
    };
    *t = 0;
    compiler_fence(Ordering::Release);
    way.value = *value;
    // SAFETY: the key's words, written as the words of its `repr(C)` layout (4-byte aligned
    // fields of a 4-byte aligned struct, no padding between them).
    unsafe { (&mut way.key as *mut CtKey as *mut KeyWords).write(*w) };
    compiler_fence(Ordering::Release);
    *t = tag;
    Ok(())
}
