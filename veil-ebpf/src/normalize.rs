//! The optional TTL and IP ID normalisation of outgoing packets
//! (`veil_common::normalize`), after the NAT rewrite and the hop's TTL.

use aya_ebpf::{btf_maps::Array, helpers::bpf_get_prandom_u32, macros::btf_map, programs::TcContext};
use veil_common::{normalize::Normalize, Reason};

use crate::rewrite::word;

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
    let failed = |_| Reason::DropHelperFailed;
    let target = cfg.ttl as u8;
    if cfg.ttl != 0 && target != ttl {
        let (old, new) = (word([ttl, proto]) as u64, word([target, proto]) as u64);
        ctx.l3_csum_replace(ip + 10, old, new, 2).map_err(failed)?;
        ctx.store(ip + 8, &target, 0).map_err(failed)?;
    }
    if cfg.random_id != 0 && whole {
        let new_id = (unsafe { bpf_get_prandom_u32() } as u16).to_be_bytes();
        let old = word(id.to_be_bytes()) as u64;
        ctx.l3_csum_replace(ip + 10, old, word(new_id) as u64, 2)
            .map_err(failed)?;
        ctx.store(ip + 4, &new_id, 0).map_err(failed)?;
    }
    Ok(())
}
