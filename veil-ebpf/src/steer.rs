//! `veil_tun_steer`: which queue of the gateway's TUN device a reply is
//! read from (see `veil_common::steer`). The kernel runs it as the packet
//! enters the device, where the packet starts at its IP header.

use aya_ebpf::programs::SkBuffContext;
use veil_common::steer::{V4_CLIENT_AT, V6_CLIENT_AT};

/// The reply's client, as its IPv4 address's bits; 0 (the first queue)
/// for a packet too short to say.
#[inline(always)]
pub fn client_of(ctx: &SkBuffContext) -> u32 {
    let at = match ctx.load::<u8>(0) {
        Ok(first) if first >> 4 == 6 => V6_CLIENT_AT,
        _ => V4_CLIENT_AT,
    };
    ctx.load::<u32>(at).map(u32::from_be).unwrap_or(0)
}
