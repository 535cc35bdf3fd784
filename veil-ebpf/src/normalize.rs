//! The optional TTL and IP ID normalisation of outgoing packets
//! (`veil_common::normalize`), after the NAT rewrite and the hop's TTL.

use aya_ebpf::{
    btf_maps::Array, helpers::bpf_get_prandom_u32, macros::btf_map, programs::TcContext,
};
use network_types::ip::Ipv4Hdr;
use veil_common::{csum, normalize::Normalize, Reason};

use crate::{
    packet::Packet,
    rewrite::{set_ttl, word},
};

#[btf_map]
pub static VEIL_NORMALIZE: Array<Normalize, 1> = Array::new();

/// Rewrites the TTL (now `ttl`) and, for a `whole` packet, the ID (now
/// `id`) of the IPv4 header at `ip`, as configured; the header checksum
/// follows. (TCP and UDP checksums cover neither.)
#[inline(always)]
pub fn outgoing(
    ctx: &TcContext,
    ip: usize,
    ttl: u8,
    proto: u8,
    id: u16,
    whole: bool,
) -> Result<(), Reason> {
    let Some(cfg) = VEIL_NORMALIZE.get(0) else {
        return Ok(());
    };
    let target = cfg.ttl as u8;
    if cfg.ttl != 0 && target != ttl {
        set_ttl(ctx, ip, ttl, target, proto)?;
    }
    if cfg.random_id != 0 && whole {
        let new_id = (unsafe { bpf_get_prandom_u32() } as u16).to_be_bytes();
        let pkt = Packet::new(ctx.data(), ctx.data_end());
        let hdr: *mut Ipv4Hdr = pkt.at(ip)?;
        unsafe {
            let check = csum::replace16(word((*hdr).check), word(id.to_be_bytes()), word(new_id));
            (*hdr).id = new_id;
            (*hdr).check = check.to_ne_bytes();
        }
    }
    Ok(())
}
