//! The firewall mark on decapsulated packets.
//!
//! A decapsulated packet looks like any packet that arrived on `--iface`,
//! so a firewall could not tell what came through a tunnel. The programs
//! therefore OR the agent's `--decap-mark` into `skb->mark`. TC decap sets it
//! directly. XDP runs before an skb exists, so it leaves a tag in the frame's
//! metadata area, which the kernel carries into the skb, and `weft_mark_tc`
//! at TC ingress turns the tag into the mark. A driver without XDP metadata
//! support leaves XDP-decapsulated packets unmarked (`--decap-mode tc`
//! marks on every driver).

use aya_ebpf::programs::{TcContext, XdpContext};

use crate::packet::{read_tc_meta, write_xdp_meta};

/// The mark, written into `.rodata` by the agent's loader
/// (`EbpfLoader::set_global`) before the programs load; 0 disables marking,
/// and the verifier then prunes the marking code as dead.
#[unsafe(no_mangle)]
static DECAP_MARK: u32 = 0;

/// XDP metadata tag meaning "decapsulated by weft_decap_xdp": the bytes
/// "weft" in memory.
const META_DECAPSULATED: u32 = u32::from_ne_bytes(*b"weft");

#[inline(always)]
fn decap_mark() -> u32 {
    // SAFETY: a read of a static. Volatile, so the compiler cannot fold the
    // 0 it sees here: the loader patches the real value in.
    unsafe { core::ptr::read_volatile(&DECAP_MARK) }
}

/// Tags a frame XDP has just decapsulated. Stale packet pointers afterwards.
#[inline(always)]
pub fn tag_xdp(ctx: &XdpContext) {
    if decap_mark() != 0 {
        // Without metadata support the packet still goes up, unmarked.
        let _ = write_xdp_meta(ctx, META_DECAPSULATED);
    }
}

/// Marks a packet TC has just decapsulated.
#[inline(always)]
pub fn mark_tc(ctx: &TcContext) {
    let mark = decap_mark();
    if mark != 0 {
        // SAFETY: reading a field of the context the kernel handed us.
        let old = unsafe { (*ctx.skb.skb).mark };
        ctx.skb.set_mark(old | mark);
    }
}

/// `weft_mark_tc`: marks what XDP tagged. Nothing is decided here (XDP
/// counted the decapsulation), so there is no counter and every packet
/// passes.
#[inline(always)]
pub fn mark_tagged(ctx: &TcContext) {
    if decap_mark() != 0 && read_tc_meta(ctx) == Some(META_DECAPSULATED) {
        mark_tc(ctx);
    }
}
