//! veil's datapath: three small programs around the NAT maps.
//!
//! - `veil_tun_tc` (TC ingress on the gateway's TUN device): client packets
//!   the daemon writes are translated to the public address and a NAT port
//!   and sent out of the WAN interface with `bpf_redirect_neigh`.
//! - `veil_wan_xdp` (XDP on the WAN interface): replies and ICMP errors for
//!   NATed flows are translated back to the client; unsolicited packets to
//!   the NAT port range are dropped before the kernel can answer them.
//! - `veil_wan_tc` (TC ingress on the WAN interface): hands the translated
//!   replies to the TUN device, where the daemon reads them. XDP cannot
//!   redirect into a TUN device (EOPNOTSUPP), so this one step lives in TC.
//!
//! Entry points stay thin: each calls its module and counts the outcome
//! under one [`Reason`].

#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod deliver;
mod egress;
mod ingress;
mod maps;
mod packet;
mod rewrite;
mod stats;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use veil_common::Reason;

/// An action for the kernel and the reason it is taken.
pub struct Verdict {
    pub action: i32,
    pub reason: Reason,
}

#[xdp]
pub fn veil_wan_xdp(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u32;
    let verdict = ingress::from_wan(&ctx).unwrap_or_else(|reason| Verdict {
        action: xdp_action::XDP_DROP as i32,
        reason,
    });
    stats::count(verdict.reason, len);
    verdict.action as u32
}

#[classifier]
pub fn veil_tun_tc(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let verdict = egress::from_tunnel(&ctx).unwrap_or_else(|reason| Verdict {
        action: TC_ACT_SHOT,
        reason,
    });
    stats::count(verdict.reason, len);
    verdict.action
}

#[classifier]
pub fn veil_wan_tc(ctx: TcContext) -> i32 {
    match deliver::to_tunnel(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            stats::count(reason, ctx.len());
            TC_ACT_SHOT
        }
    }
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
