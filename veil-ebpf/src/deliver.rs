//! Hands translated replies to the TUN device (TC ingress on the WAN).
//!
//! `veil_wan_xdp` has already rewritten them to a client address and
//! dropped anything from the WAN that was addressed to one, so a packet for
//! the client pool here is a translated reply. The daemon reads it from the
//! TUN device and picks the client by destination address.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT},
    helpers::bpf_redirect,
    programs::TcContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use veil_common::Reason;

use crate::{
    maps::config,
    packet::{Packet, ETH_LEN, ETH_P_IP},
};

#[inline(always)]
pub fn to_tunnel(ctx: &TcContext) -> Result<i32, Reason> {
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let Ok(eth) = pkt.at::<EthHdr>(0) else {
        return Ok(TC_ACT_OK as i32);
    };
    if unsafe { (*eth).ether_type } != ETH_P_IP.to_be() {
        return Ok(TC_ACT_OK as i32);
    }
    let Ok(ip) = pkt.at::<Ipv4Hdr>(ETH_LEN) else {
        return Ok(TC_ACT_OK as i32);
    };
    let cfg = config()?;
    if !cfg.in_vip_pool(unsafe { (*ip).dst_addr }) {
        return Ok(TC_ACT_OK as i32);
    }
    let action = unsafe { bpf_redirect(cfg.tun_ifindex, 0) } as i32;
    if action != TC_ACT_REDIRECT as i32 {
        return Err(Reason::DropHelperFailed);
    }
    Ok(action)
}
