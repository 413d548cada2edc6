//! weft's data path: one program per hook.
//!
//! - `weft_encap_tc`: TC egress of `--iface`. IPv4 packets to a remote node's
//!   subnet are wrapped in VXLAN or IP-in-IP, or routed directly (host-gw),
//!   and sent towards that node.
//! - `weft_decap_xdp`: XDP on `--iface`. VXLAN or IP-in-IP for this node loses
//!   its outer headers and goes up the stack as the inner packet.
//! - `weft_decap_tc`: the same at TC ingress, where XDP cannot attach.
//!   With `--host-routing bpf` it and `weft_slowpath_rx_tc` hand the inner
//!   packet straight to the container's bridge (see `host_route`).
//! - `weft_mark_tc`: TC ingress next to `weft_decap_xdp`, turning XDP's
//!   "decapsulated" tag into the firewall mark (see `mark`).
//! - `weft_slowpath_rx_tc`: TC ingress of the agent's collect-metadata VXLAN
//!   device. What the kernel decapsulated there (reassembled outer
//!   fragments, GRO aggregates) is checked like fast-path traffic and
//!   re-injected into `--iface`'s ingress.
//! - `weft_slowpath_ipip_tc`: TC ingress of the agent's `weft.ipip` tap,
//!   into which the agent writes reassembled IP-in-IP packets; decapsulated
//!   as on the fast path and re-injected into `--iface`'s ingress.
//!
//! Each entry calls `try_*` and turns its `Result<action, Reason>` into a
//! verdict plus a per-CPU counter of packets and bytes per (program, reason),
//! so every outcome is visible in `COUNTERS`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod decap;
#[cfg(target_arch = "bpf")]
mod encap_tc;
#[cfg(target_arch = "bpf")]
mod host_route;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod mark;
#[cfg(target_arch = "bpf")]
mod packet;

#[cfg(target_arch = "bpf")]
mod entries {
    use aya_ebpf::{
        bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
        macros::{classifier, xdp},
        programs::{TcContext, XdpContext},
    };
    use aya_log_ebpf::error;
    use weft_common::{Program, Reason};

    use crate::{
        decap, encap_tc,
        maps::{Limited, admit, count},
        mark,
    };

    #[classifier]
    pub fn weft_encap_tc(ctx: TcContext) -> i32 {
        match encap_tc::try_encap(&ctx) {
            Ok((reason, action)) => {
                count(Program::EncapTc, reason, ctx.len());
                action
            }
            Err(reason) => tc_verdict(&ctx, Program::EncapTc, reason),
        }
    }

    #[xdp]
    pub fn weft_decap_xdp(ctx: XdpContext) -> u32 {
        match decap::try_decap_xdp(&ctx) {
            Ok(action) => {
                count(Program::DecapXdp, Reason::Decapsulated, xdp_len(&ctx));
                action
            }
            Err(reason) => {
                count(Program::DecapXdp, reason, xdp_len(&ctx));
                if worth_a_log(reason) && admit(Limited::Log) {
                    error!(
                        &ctx,
                        "weft_decap_xdp: helper failed, reason {}", reason as u32
                    );
                }
                if reason.is_drop() {
                    xdp_action::XDP_DROP
                } else {
                    xdp_action::XDP_PASS
                }
            }
        }
    }

    #[classifier]
    pub fn weft_decap_tc(ctx: TcContext) -> i32 {
        match decap::try_decap_tc(&ctx) {
            Ok((reason, action)) => {
                count(Program::DecapTc, reason, ctx.len());
                action
            }
            Err(reason) => tc_verdict(&ctx, Program::DecapTc, reason),
        }
    }

    #[classifier]
    pub fn weft_mark_tc(ctx: TcContext) -> i32 {
        mark::mark_tagged(&ctx);
        TC_ACT_OK
    }

    #[classifier]
    pub fn weft_slowpath_rx_tc(ctx: TcContext) -> i32 {
        match decap::try_slowpath_rx(&ctx) {
            Ok((reason, action)) => {
                count(Program::SlowpathRxTc, reason, ctx.len());
                action
            }
            Err(reason) => tc_verdict(&ctx, Program::SlowpathRxTc, reason),
        }
    }

    #[classifier]
    pub fn weft_slowpath_ipip_tc(ctx: TcContext) -> i32 {
        match decap::try_slowpath_ipip_rx(&ctx) {
            Ok(action) => {
                count(
                    Program::SlowpathIpipTc,
                    Reason::DecapsulatedSlowPath,
                    ctx.len(),
                );
                action
            }
            Err(reason) => {
                // Dropped whatever the reason: passed up from the tap, an
                // IP-in-IP packet would go back to the agent's raw socket.
                count(Program::SlowpathIpipTc, reason, ctx.len());
                TC_ACT_SHOT
            }
        }
    }

    #[inline(always)]
    fn tc_verdict(ctx: &TcContext, program: Program, reason: Reason) -> i32 {
        count(program, reason, ctx.len());
        if worth_a_log(reason) && admit(Limited::Log) {
            error!(ctx, "weft tc: helper failed, reason {}", reason as u32);
        }
        if reason.is_drop() {
            TC_ACT_SHOT
        } else {
            TC_ACT_OK
        }
    }

    /// Failures that mean a kernel helper refused a well-formed packet: worth
    /// a log line, unlike per-packet outcomes such as "no remote". Still at
    /// most `LOGS_PER_SECOND` per CPU: a flow that keeps failing must not
    /// flood the log; the counter has the full count.
    #[inline(always)]
    fn worth_a_log(reason: Reason) -> bool {
        matches!(reason, Reason::DropAdjustRoom | Reason::DropStoreBytes)
    }

    /// The XDP frame's length, for the byte counters.
    #[inline(always)]
    fn xdp_len(ctx: &XdpContext) -> u32 {
        (ctx.data_end() - ctx.data()) as u32
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // A plain loop, as aya's ebpf-panic does, not `unreachable_unchecked`:
    // that would let LLVM treat every path into a panic as impossible and
    // delete it, hiding a bounds check's failure branch from the verifier.
    // The loop keeps the path in the program, where the verifier rejects it
    // (no unbounded loops), so a reachable panic fails to load.
    #[expect(
        clippy::empty_loop,
        reason = "the verifier rejects the loop, see above"
    )]
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // The programs only exist for the bpfel-unknown-none target; the host
    // build of this crate is for the library's unit tests.
}
