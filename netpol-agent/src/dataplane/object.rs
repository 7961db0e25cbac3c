//! The eBPF object, built by build.rs (aya-build) and embedded in the binary.

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netpol"));

/// The object's bytes, or `None` if the agent was built with `AYA_BUILD_SKIP=1`.
pub fn bytes() -> Option<&'static [u8]> {
    (!OBJECT.is_empty()).then_some(OBJECT)
}
