//! IPv4 fragments, translated without reassembly.
//!
//! Only a datagram's first fragment carries its ports; the fragments after
//! it share with it the source, destination, protocol and IP ID (RFC 791).
//! So the first fragment is translated by its flow, like a whole packet,
//! and what it was translated to is remembered in `VEIL_FRAGS` under that
//! quadruple; the later fragments are translated by that entry (Cilium's
//! datapath does the same, `bpf/lib/ipv4.h`). Entries expire
//! ([`FRAG_TIMEOUT_NS`]) and are removed with the datagram's last fragment,
//! so a later reuse of the IP ID cannot pick up a stale one.
//!
//! The transport checksum covers the whole datagram but sits in the first
//! fragment: the incremental update of that fragment's checksum field is
//! the update of the datagram's. Later fragments only get their IP header
//! rewritten.
//!
//! IP IDs on the way out. The gateway's clients share one public address,
//! and a receiver reassembles by (source, destination, protocol, ID): two
//! clients sending fragmented datagrams with the same ID to the same host
//! would have their fragments mixed. So a fragmented datagram leaves with
//! an ID the gateway picks at random and reserves toward that host for as
//! long as the host may hold an incomplete datagram under it
//! ([`FRAG_ID_HOLD_NS`]). The random pick also keeps a client's own ID
//! sequence, which can tell hosts behind a NAT apart, from the remote.
//!
//! Fragments are rare, so this module favours plain code over speed.

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::TcContext,
};
use veil_common::{frag_kind, FragEntry, FragKey, Reason, FRAG_ID_HOLD_NS, FRAG_TIMEOUT_NS};

use network_types::ip::Ipv4Hdr;

use crate::{
    maps::VEIL_FRAGS,
    packet::{Packet, IP_MF, IP_OFFSET},
    rewrite::{dword, word},
};

/// Random IDs tried before settling for one still reserved.
const ID_TRIES: u32 = 4;

/// Where a packet stands among the fragments of its datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// Offset 0, more fragments: it carries the ports.
    First,
    /// A non-zero offset; `last` when no more fragments follow.
    Later { last: bool },
}

impl Fragment {
    /// From the host-order flags/offset word of the IPv4 header.
    #[inline(always)]
    pub fn of(frags: u16) -> Self {
        if frags & IP_OFFSET != 0 {
            Fragment::Later {
                last: frags & IP_MF == 0,
            }
        } else if frags & IP_MF != 0 {
            Fragment::First
        } else {
            Fragment::Whole
        }
    }
}

/// The entry under `key`, if it is younger than `lifetime_ns`.
#[inline(always)]
fn live(key: &FragKey, lifetime_ns: u64) -> Option<FragEntry> {
    let entry = unsafe { *VEIL_FRAGS.get_ptr(key)? };
    let now = unsafe { bpf_ktime_get_ns() };
    entry.is_live(now, lifetime_ns).then_some(entry)
}

#[inline(always)]
fn record(key: &FragKey, addr: [u8; 4], id: u16, now: u64) -> Result<(), Reason> {
    let entry = FragEntry {
        first_seen_ns: now,
        addr,
        id,
        _pad: [0; 2],
    };
    VEIL_FRAGS
        .insert(key, entry, BPF_ANY as u64)
        .map_err(|_| Reason::DropHelperFailed)
}

// ---- egress: TC on the TUN device ----

/// The first fragment of a client's datagram, already translated by its
/// flow: gives it the gateway's IP ID and remembers both for the fragments
/// after it. `ip` is the IPv4 header's offset; `client` and `id` as the
/// client sent them; `public` the address its flow leaves from.
#[inline(always)]
pub fn egress_first(
    ctx: &TcContext,
    ip: usize,
    client: [u8; 4],
    remote: [u8; 4],
    id: u16,
    proto: u8,
    public: [u8; 4],
) -> Result<(), Reason> {
    let now = unsafe { bpf_ktime_get_ns() };
    let wan_id = reserve_id(public, remote, proto, client, id, now)?;
    let key = FragKey::new(frag_kind::EGRESS, client, remote, id, proto);
    record(&key, public, wan_id, now)?;
    set_id(ctx, ip, id, wan_id)
}

/// A later fragment of a client's datagram: the source address and IP ID
/// its first fragment got. Without a live entry nothing says whose flow it
/// belongs to: dropped.
#[inline(always)]
pub fn egress_later(
    ctx: &TcContext,
    ip: usize,
    client: [u8; 4],
    remote: [u8; 4],
    id: u16,
    proto: u8,
    last: bool,
) -> Result<(), Reason> {
    let key = FragKey::new(frag_kind::EGRESS, client, remote, id, proto);
    let entry = live(&key, FRAG_TIMEOUT_NS).ok_or(Reason::DropOrphanFragment)?;
    set_addr(ctx, ip, ip + 12, client, entry.addr)?;
    set_id(ctx, ip, id, entry.id)?;
    if last {
        // The ID reservation stays: the remote may still be reassembling.
        let _ = VEIL_FRAGS.remove(key);
    }
    Ok(())
}

/// An IP ID for a datagram from `public` to `remote` that no other
/// datagram there carries within [`FRAG_ID_HOLD_NS`], reserved for the
/// client's (`client`, `client_id`). After [`ID_TRIES`] reserved picks
/// (thousands of fragmented datagrams to one host within the hold) the
/// last pick is used anyway: the chance of a clash is then what the
/// remote host would see from any busy sender.
#[inline(always)]
fn reserve_id(
    public: [u8; 4],
    remote: [u8; 4],
    proto: u8,
    client: [u8; 4],
    client_id: u16,
    now: u64,
) -> Result<u16, Reason> {
    let mut wan_id = 0;
    for _ in 0..ID_TRIES {
        wan_id = unsafe { bpf_get_prandom_u32() } as u16;
        let key = FragKey::new(frag_kind::ID, public, remote, wan_id, proto);
        let taken = match VEIL_FRAGS.get_ptr(key) {
            Some(e) => unsafe { (*e).is_live(now, FRAG_ID_HOLD_NS) },
            None => false,
        };
        if !taken {
            record(&key, client, client_id, now)?;
            return Ok(wan_id);
        }
    }
    Ok(wan_id)
}

// ---- ingress: XDP and TC on the WAN interface ----

/// Where a packet from the WAN (its IPv4 header at `ip`) stands among its
/// datagram's fragments, and the datagram's key.
#[inline(always)]
pub fn datagram(pkt: &Packet, ip: usize) -> Result<(Fragment, FragKey), Reason> {
    let h: *mut Ipv4Hdr = pkt.at(ip)?;
    let (frags, key) = unsafe {
        (
            u16::from_be_bytes((*h).frags),
            FragKey::new(
                frag_kind::INGRESS,
                (*h).src_addr,
                (*h).dst_addr,
                u16::from_be_bytes((*h).id),
                (*h).proto,
            ),
        )
    };
    Ok((Fragment::of(frags), key))
}

/// XDP, the first fragment of a reply on a flow of `client`'s. XDP records
/// it, not TC: XDP sees a batch of frames before TC sees any of them, so
/// the datagram's later fragments reach XDP before TC has translated the
/// first.
#[inline(always)]
pub fn remember(key: &FragKey, client: [u8; 4]) -> Result<(), Reason> {
    record(key, client, 0, unsafe { bpf_ktime_get_ns() })
}

/// XDP, the first fragment of a datagram that is not veil's: whatever an
/// earlier datagram with the same ID left is dropped, so that this one's
/// later fragments reach the host and no client.
#[inline(always)]
pub fn forget(key: &FragKey) {
    let _ = VEIL_FRAGS.remove(key);
}

/// The client a later fragment from the WAN goes to, if its first one was
/// translated: whether the datagram is veil's.
#[inline(always)]
pub fn ingress_client(key: &FragKey) -> Option<[u8; 4]> {
    live(key, FRAG_TIMEOUT_NS).map(|entry| entry.addr)
}

/// TC, a later fragment from the WAN: to the client its first fragment
/// went to. `false` when the datagram is not veil's (the host's own).
#[inline(always)]
pub fn ingress_later(
    ctx: &TcContext,
    ip: usize,
    key: &FragKey,
    last: bool,
) -> Result<bool, Reason> {
    let Some(entry) = live(key, FRAG_TIMEOUT_NS) else {
        return Ok(false);
    };
    set_addr(ctx, ip, ip + 16, key.dst_addr, entry.addr)?;
    if last {
        let _ = VEIL_FRAGS.remove(key);
    }
    Ok(true)
}

// ---- header rewrites (the IP header checksum only) ----

/// Replaces the address at `at` (source or destination of the IPv4 header
/// at `ip`), which holds `old`, with `new`.
#[inline(always)]
fn set_addr(
    ctx: &TcContext,
    ip: usize,
    at: usize,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), Reason> {
    let failed = |_| Reason::DropHelperFailed;
    ctx.l3_csum_replace(ip + 10, dword(old) as u64, dword(new) as u64, 4)
        .map_err(failed)?;
    ctx.store(at, &new, 0).map_err(failed)
}

/// Replaces the IP ID (host order) of the IPv4 header at `ip`.
#[inline(always)]
fn set_id(ctx: &TcContext, ip: usize, old: u16, new: u16) -> Result<(), Reason> {
    let failed = |_| Reason::DropHelperFailed;
    let new = new.to_be_bytes();
    ctx.l3_csum_replace(ip + 10, word(old.to_be_bytes()) as u64, word(new) as u64, 2)
        .map_err(failed)?;
    ctx.store(ip + 4, &new, 0).map_err(failed)
}
