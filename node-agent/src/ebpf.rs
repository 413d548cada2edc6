//! The BPF object built by build.rs.

/// The ELF object holding every weft program and map, 8-byte aligned as the
/// ELF parser requires.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft"));
