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
