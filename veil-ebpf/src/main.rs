//! veil's datapath: small programs around the NAT maps.
//!
//! - `veil_tun_tc` (TC ingress on the gateway's TUN device): client packets
//!   the daemon writes are translated to the public address and a NAT port
//!   and sent out of the WAN interface with `bpf_redirect_neigh`.
//! - `veil_wan_xdp` (XDP on the WAN interface): unsolicited packets to the
//!   NAT port range, forged client addresses and options are dropped before
//!   the kernel sees them; everything else passes. It also notes the first
//!   fragments of replies, for the fragments after them (`frag`).
//! - `veil_wan_tc` (TC ingress on the WAN interface): replies and ICMP
//!   errors for NATed flows are translated back to their client and handed
//!   to the TUN device, where the daemon reads them. It also translates
//!   forwarded connections (`forward`).
//! - `veil_gro_tc` (TC ingress on the far end of the GRO stage, a veth pair
//!   the gateway puts between the WAN and the TUN device when the WAN does
//!   no GRO): the replies the kernel merged there, into the TUN device.
//! - `veil_fwd_tc` (TC ingress on the interfaces forward targets are
//!   reached through): the targets' replies, back to the remotes.
//! - `veil_tun_steer` (the TUN device's steering program): the queue a
//!   reply is read from, its client's (`steer`).
//!
//! IPv6 (NAT66) runs in the same programs: each entry point hands an IPv6
//! packet to `egress6` or `ingress6` (by EtherType in XDP, by the skb's
//! protocol in TC), IPv4 to the modules above.
//!
//! Entry points stay thin: each calls its module and counts the outcome
//! under one [`Reason`] (once per packet across the programs).

#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod egress;
mod egress6;
mod forward;
mod frag;
mod frag6;
mod ingress;
mod ingress6;
mod maps;
mod normalize;
mod packet;
mod ratelimit;
mod rewrite;
mod rewrite6;
mod sources;
mod stats;
mod steer;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, socket_filter, xdp},
    programs::{SkBuffContext, TcContext, XdpContext},
    EbpfContext,
};
use aya_log_ebpf::{error, warn};
use veil_common::Reason;

/// An action for the kernel and the reason it is taken. `reason` is `None`
/// when a later program on the packet's path counts it.
pub struct Verdict {
    pub action: i32,
    pub reason: Option<Reason>,
}

impl Verdict {
    pub const fn counted(action: i32, reason: Reason) -> Self {
        Self {
            action,
            reason: Some(reason),
        }
    }

    pub const fn uncounted(action: i32) -> Self {
        Self {
            action,
            reason: None,
        }
    }
}

/// Counts the verdict (an error is a drop for that reason) and returns the
/// action for the kernel. The drops that mean something is wrong with the
/// gateway rather than the packet are also logged (aya-log, bridged into
/// the daemon's log); per-packet events are only counted.
#[inline(always)]
fn conclude<C: EbpfContext>(ctx: &C, verdict: Result<Verdict, Reason>, drop: i32, len: u32) -> i32 {
    let verdict = verdict.unwrap_or_else(|reason| Verdict::counted(drop, reason));
    if let Some(reason) = verdict.reason {
        stats::count(reason, len);
        match reason {
            Reason::DropHelperFailed => warn!(ctx, "a kernel helper refused a {}-byte packet", len),
            Reason::DropNotConfigured => error!(ctx, "VEIL_CONFIG is empty or invalid: dropping"),
            _ => {}
        }
    }
    verdict.action
}

// IPv4 and IPv6 each run in a BPF-to-BPF call of their own: inlined
// together their stacks would add up past the 512 bytes BPF allows.

#[xdp]
pub fn veil_wan_xdp(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u32;
    let verdict = if ingress6::is_ipv6_xdp(&ctx) {
        ingress6::filter(&ctx)
    } else {
        ingress::filter(&ctx)
    };
    conclude(&ctx, verdict, xdp_action::XDP_DROP as i32, len) as u32
}

#[classifier]
pub fn veil_wan_tc(ctx: TcContext) -> i32 {
    // With no XDP program in front (`--wan-filter tc`), its checks first.
    let admit_here = maps::config().is_ok_and(|cfg| cfg.wan_filter_in_tc());
    let verdict = if rewrite6::is_ipv6_skb(&ctx) {
        admitted(
            admit_here,
            || ingress6::admit_in_tc(&ctx),
            || ingress6::translate(&ctx),
        )
    } else {
        admitted(
            admit_here,
            || ingress::admit_in_tc(&ctx),
            || ingress::translate(&ctx),
        )
    };
    conclude(&ctx, verdict, TC_ACT_SHOT, ctx.len())
}

/// `translate`, after `admit` if TC does the admitting: the host's packet
/// then passes here, counted.
#[inline(always)]
fn admitted(
    admit_here: bool,
    admit: impl FnOnce() -> Result<ingress::Admit, Reason>,
    translate: impl FnOnce() -> Result<Verdict, Reason>,
) -> Result<Verdict, Reason> {
    if admit_here && admit()? == ingress::Admit::Host {
        return Ok(ingress::Admit::Host.verdict(TC_ACT_OK as i32));
    }
    translate()
}

#[classifier]
pub fn veil_gro_tc(ctx: TcContext) -> i32 {
    conclude(&ctx, ingress::from_gro_stage(), TC_ACT_SHOT, ctx.len())
}

#[classifier]
pub fn veil_fwd_tc(ctx: TcContext) -> i32 {
    conclude(&ctx, forward::from_target(&ctx), TC_ACT_SHOT, ctx.len())
}

#[classifier]
pub fn veil_tun_tc(ctx: TcContext) -> i32 {
    let verdict = if rewrite6::is_ipv6_skb(&ctx) {
        egress6::from_tunnel(&ctx)
    } else {
        egress::from_tunnel(&ctx)
    };
    conclude(&ctx, verdict, TC_ACT_SHOT, ctx.len())
}

#[socket_filter]
pub fn veil_tun_steer(ctx: SkBuffContext) -> i64 {
    i64::from(steer::client_of(&ctx))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // An infinite loop the verifier rejects: any reachable panic fails the
    // load instead of shipping.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
