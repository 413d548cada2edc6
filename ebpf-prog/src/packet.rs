//! The only place that touches packet memory: bounds-checked pointers into
//! `[data, data_end)`. Every pointer is derived from the context at the time
//! of use; after `bpf_skb_adjust_room` or `bpf_xdp_adjust_head` callers must
//! ask again, because the verifier (rightly) invalidates older ones.

use core::mem::size_of;

/// Something with a linear packet window: `XdpContext` or `TcContext`.
pub trait PacketWindow {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
}

impl PacketWindow for aya_ebpf::programs::XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

impl PacketWindow for aya_ebpf::programs::TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

/// A `T` at `offset`, if the whole of it lies inside the packet.
#[inline(always)]
pub fn ptr_at<T>(pkt: &impl PacketWindow, offset: usize) -> Option<*const T> {
    let start = pkt.start();
    if start + offset + size_of::<T>() > pkt.end() {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Mutable variant of [`ptr_at`].
#[inline(always)]
pub fn ptr_at_mut<T>(pkt: &impl PacketWindow, offset: usize) -> Option<*mut T> {
    ptr_at::<T>(pkt, offset).map(|p| p as *mut T)
}

/// Reads a `T` at `offset` by value.
#[inline(always)]
pub fn read_at<T: Copy>(pkt: &impl PacketWindow, offset: usize) -> Option<T> {
    let p = ptr_at::<T>(pkt, offset)?;
    // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `p` are inside
    // the packet; `read_unaligned` because headers have no alignment.
    Some(unsafe { p.read_unaligned() })
}

/// Writes `value` into a fresh 4-byte XDP metadata area in front of the
/// frame (`bpf_xdp_adjust_meta`), which the kernel carries into the skb for
/// TC to read. Returns false when the driver keeps no metadata. Packet
/// pointers taken before this call are stale afterwards.
#[inline(always)]
pub fn write_xdp_meta(ctx: &aya_ebpf::programs::XdpContext, value: u32) -> bool {
    // SAFETY: helper on the program's own context; it only moves data_meta.
    if unsafe { aya_ebpf::helpers::bpf_xdp_adjust_meta(ctx.ctx, -(size_of::<u32>() as i32)) } != 0 {
        return false;
    }
    let meta = ctx.metadata();
    if meta + size_of::<u32>() > ctx.data() {
        return false;
    }
    // SAFETY: the 4 bytes at `meta` lie inside the metadata area, which ends
    // at `data` (checked just above, as the verifier requires).
    unsafe { (meta as *mut u32).write_unaligned(value) };
    true
}

/// The 4-byte XDP metadata in front of this skb's frame, if there is one.
#[inline(always)]
pub fn read_tc_meta(ctx: &aya_ebpf::programs::TcContext) -> Option<u32> {
    // SAFETY: reading a field of the context the kernel handed us; the
    // verifier rewrites it into the skb's metadata pointer.
    let meta = unsafe { (*ctx.skb.skb).data_meta } as usize;
    if meta + size_of::<u32>() > ctx.data() {
        return None;
    }
    // SAFETY: the 4 bytes at `meta` end at or before `data` (checked).
    Some(unsafe { (meta as *const u32).read_unaligned() })
}
