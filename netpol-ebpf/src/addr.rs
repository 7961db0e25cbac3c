//! Addresses in the programs: 16 bytes (IPv6, or IPv4-mapped IPv6 for IPv4) held as four
//! native-endian words, in the byte order of the packet.
//!
//! Why words: the shared key types (`CtKey`, `PeerData`, `FragKey`) declare their addresses as
//! `[u8; 16]`, whose alignment is 1, so LLVM's BPF target copies them byte by byte: sixteen
//! loads and sixteen stores per copy. The general path copied each address several times
//! (packet → `Flow` → conntrack key → peer key), a third of the parser's instructions, and the
//! kernel's hash then read the keys back as words, which on x86 cannot be forwarded from the
//! byte stores still in flight: a stall per word. Every such field sits at a 4-byte aligned
//! offset of a 4-byte aligned `repr(C)` struct (asserted below), so it is written as words.
use netpol_common::{ct::CtKey, ct::FragKey, policy::PeerData};

/// An address as the words of its 16 bytes.
pub type Addr = [u32; 4];

/// IPv4 `word` (as read from the packet) in IPv4-mapped IPv6 form, like
/// `netpol_common::v4_mapped`.
#[inline(always)]
pub fn v4_mapped(word: u32) -> Addr {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), word]
}

/// The layouts [`write`] and [`remote`] rely on: each address field at a 4-byte aligned offset
/// of a 4-byte aligned struct.
const _: () = {
    use core::mem::{align_of, offset_of};
    assert!(align_of::<CtKey>() >= 4 && offset_of!(CtKey, remote_addr) % 4 == 0);
    assert!(align_of::<PeerData>() >= 4 && offset_of!(PeerData, addr) % 4 == 0);
    assert!(align_of::<FragKey>() >= 4);
    assert!(offset_of!(FragKey, src_addr) % 4 == 0 && offset_of!(FragKey, dst_addr) % 4 == 0);
};

/// Writes `a` as four words to an address field of a shared key.
///
/// # Safety
/// `at` must be valid for writes and 4-byte aligned: a field asserted above, in a key that is
/// itself where its type says (a map value, a reference, a `MaybeUninit` of the key).
#[inline(always)]
pub unsafe fn write(at: *mut [u8; 16], a: &Addr) {
    // SAFETY: see above.
    unsafe { (at as *mut Addr).write(*a) }
}

/// The remote address of a conntrack key, as words.
#[inline(always)]
pub fn remote(key: &CtKey) -> &Addr {
    // SAFETY: a 4-byte aligned field (asserted above) of 16 bytes; every bit pattern is a
    // valid `Addr`.
    unsafe { &*(&key.remote_addr as *const [u8; 16] as *const Addr) }
}

/// `a` as the bytes of a shared type's address field (for values written whole, such as an
/// event).
#[inline(always)]
pub fn bytes(a: &Addr) -> [u8; 16] {
    // SAFETY: arrays of plain integers of the same size; every bit pattern is valid.
    unsafe { core::mem::transmute::<Addr, [u8; 16]>(*a) }
}
