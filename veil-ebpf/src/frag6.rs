//! IPv6 fragments, translated without reassembly as `frag` does for IPv4.
//!
//! Only the sending host fragments in IPv6, with a fragment header (RFC
//! 8200 4.5). The datapath translates fragments whose fragment header
//! directly follows the IPv6 header (what Linux and every common stack
//! send); a fragment header after other extension headers stays refused
//! (`drop_ipv6_fragment`). As for IPv4: the first fragment (offset 0)
//! carries the transport header and is translated by its flow (the
//! transport checksum covers the whole datagram, so its incremental update
//! on the first fragment is the datagram's); what it became is noted in
//! `VEIL_FRAGS6` under (source, destination, identification) and the
//! later fragments get the same. IPv6 has no header checksum: a later
//! fragment's rewrite is two stores.
//!
//! Identifications on the way out: as for IPv4 (see `frag`), a random
//! one reserved toward the remote for [`FRAG_ID_HOLD_NS`], so that two
//! clients' fragments to one host are never reassembled together, and a
//! client's own sequence stays hidden.

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::TcContext,
};
use veil_common::{frag_kind, FragEntry6, FragKey6, Reason, FRAG_ID_HOLD_NS, FRAG_TIMEOUT_NS};

use crate::{frag::Fragment, maps::VEIL_FRAGS6, packet::Packet};

/// The fragment header's length.
pub const FRAG_HDR_LEN: usize = 8;
/// Where the identification sits in the fragment header.
const ID_AT: usize = 4;
/// Random identifications tried before settling for one still reserved.
const ID_TRIES: u32 = 4;

/// A fragment header's fields.
#[derive(Clone, Copy)]
pub struct FragHdr {
    /// The header after it (meaningful in the first fragment only).
    pub next: u8,
    pub fragment: Fragment,
    pub id: u32,
}

/// Reads the fragment header at `at`. Offset 0 without more fragments
/// (an atomic fragment, RFC 6946) is a whole datagram.
#[inline(always)]
pub fn read(pkt: &Packet, at: usize) -> Result<FragHdr, Reason> {
    let h: *mut [u8; FRAG_HDR_LEN] = pkt.at(at)?;
    let (next, off, id) = unsafe {
        let h = &*h;
        (
            h[0],
            u16::from_be_bytes([h[2], h[3]]),
            u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
        )
    };
    let more = off & 1 != 0;
    let fragment = if off & 0xfff8 != 0 {
        Fragment::Later { last: !more }
    } else if more {
        Fragment::First
    } else {
        Fragment::Whole
    };
    Ok(FragHdr { next, fragment, id })
}

/// The key of the datagram the packet whose IPv6 header is at `ip`
/// belongs to, as `kind`.
#[inline(always)]
pub fn key(pkt: &Packet, ip: usize, kind: u8, id: u32) -> Result<FragKey6, Reason> {
    let h: *mut network_types::ip::Ipv6Hdr = pkt.at(ip)?;
    Ok(unsafe { FragKey6::new(kind, (*h).src_addr, (*h).dst_addr, id) })
}

/// The entry under `key`, if it is younger than `lifetime_ns`.
#[inline(always)]
pub fn live(key: &FragKey6, lifetime_ns: u64) -> Option<FragEntry6> {
    let entry = unsafe { *VEIL_FRAGS6.get_ptr(key)? };
    let now = unsafe { bpf_ktime_get_ns() };
    entry.is_live(now, lifetime_ns).then_some(entry)
}

#[inline(always)]
fn record(key: &FragKey6, entry: &FragEntry6) -> Result<(), Reason> {
    VEIL_FRAGS6
        .insert(key, entry, BPF_ANY as u64)
        .map_err(|_| Reason::DropHelperFailed)
}

// ---- egress: TC on the TUN device ----

/// The first fragment of a client's datagram (fragment header at `frag`),
/// already translated by its flow: gives it a gateway-chosen
/// identification and notes both for the fragments after it.
#[inline(always)]
pub fn egress_first(
    ctx: &TcContext,
    frag: usize,
    key: &FragKey6,
    public: &[u8; 16],
    vip: [u8; 4],
) -> Result<(), Reason> {
    let now = unsafe { bpf_ktime_get_ns() };
    let wan_id = reserve_id(public, &key.dst_addr, now)?;
    let entry = FragEntry6 {
        first_seen_ns: now,
        addr: *public,
        id: wan_id,
        client_vip: vip,
    };
    record(key, &entry)?;
    ctx.store(frag + ID_AT, &wan_id.to_be_bytes(), 0)
        .map_err(|_| Reason::DropHelperFailed)
}

/// A later fragment of a client's datagram (IPv6 header at `ip`, fragment
/// header at `frag`): the source address and identification its first
/// fragment got, and the client's rate-limit key. Without a live entry
/// nothing says whose flow it belongs to: dropped.
#[inline(always)]
pub fn egress_later(
    ctx: &TcContext,
    ip: usize,
    frag: usize,
    key: &FragKey6,
    last: bool,
) -> Result<[u8; 4], Reason> {
    let entry = live(key, FRAG_TIMEOUT_NS).ok_or(Reason::DropOrphanFragment)?;
    let failed = |_| Reason::DropHelperFailed;
    ctx.store(ip + 8, &entry.addr, 0).map_err(failed)?;
    ctx.store(frag + ID_AT, &entry.id.to_be_bytes(), 0)
        .map_err(failed)?;
    if last {
        // The identification's reservation stays: the remote may still be
        // reassembling.
        let _ = VEIL_FRAGS6.remove(key);
    }
    Ok(entry.client_vip)
}

/// An identification for a datagram from `public` to `remote` that no
/// other datagram there carries within [`FRAG_ID_HOLD_NS`] (see
/// `frag::reserve_id`: after [`ID_TRIES`] taken picks, the last is used).
#[inline(always)]
fn reserve_id(public: &[u8; 16], remote: &[u8; 16], now: u64) -> Result<u32, Reason> {
    let mut wan_id = 0;
    for _ in 0..ID_TRIES {
        wan_id = unsafe { bpf_get_prandom_u32() };
        let key = FragKey6::new(frag_kind::ID, *public, *remote, wan_id);
        let taken = match VEIL_FRAGS6.get_ptr(&key) {
            Some(e) => unsafe { (*e).is_live(now, FRAG_ID_HOLD_NS) },
            None => false,
        };
        if !taken {
            let entry = FragEntry6 {
                first_seen_ns: now,
                ..FragEntry6::default()
            };
            record(&key, &entry)?;
            return Ok(wan_id);
        }
    }
    Ok(wan_id)
}

// ---- ingress: XDP and TC on the WAN interface ----

/// XDP, the first fragment of a reply on a flow of the client at
/// `client` (rate-limit key `vip`). XDP notes it, not TC, for the reason
/// `frag::remember` gives.
#[inline(always)]
pub fn remember(key: &FragKey6, client: &[u8; 16], vip: [u8; 4]) -> Result<(), Reason> {
    let entry = FragEntry6 {
        first_seen_ns: unsafe { bpf_ktime_get_ns() },
        addr: *client,
        id: 0,
        client_vip: vip,
    };
    record(key, &entry)
}

/// XDP, the first fragment of a datagram that is not veil's: whatever an
/// earlier datagram with the same identification left is dropped.
#[inline(always)]
pub fn forget(key: &FragKey6) {
    let _ = VEIL_FRAGS6.remove(key);
}

/// TC, a later fragment from the WAN (IPv6 header at `ip`, its fragment
/// header's identification `id`): to the client its first fragment went
/// to. `false` when the datagram is not veil's.
// A call of its own: its key would add to the stack of `ingress6`'s
// `translate`, which is near the limit.
#[inline(never)]
pub fn ingress_later(
    ctx: &TcContext,
    pkt: &Packet,
    ip: usize,
    id: u32,
    last: bool,
) -> Result<bool, Reason> {
    let key = &key(pkt, ip, frag_kind::INGRESS, id)?;
    let Some(entry) = live(key, FRAG_TIMEOUT_NS) else {
        return Ok(false);
    };
    ctx.store(ip + 24, &entry.addr, 0)
        .map_err(|_| Reason::DropHelperFailed)?;
    if last {
        let _ = VEIL_FRAGS6.remove(key);
    }
    Ok(true)
}
