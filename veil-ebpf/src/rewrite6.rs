//! IPv6 helpers shared by `egress6` and `ingress6`: header offsets, the
//! extension-header decision, and the endpoint rewrite.
//!
//! IPv6 has no header checksum; the transport checksums (TCP, UDP and,
//! unlike ICMPv4, ICMPv6) cover a pseudo-header with both addresses. So an
//! address rewrite is four 32-bit `bpf_l4_csum_replace` calls with
//! `BPF_F_PSEUDO_HDR` for every protocol, which keeps partial checksums
//! (CHECKSUM_PARTIAL super-packets) right, as on the IPv4 path.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use veil_common::{csum::L4Sum, Reason};

use crate::packet::ETH_LEN;

pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPV6_LEN: usize = 40;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
/// Destination Unreachable, Packet Too Big, Time Exceeded, Parameter
/// Problem: the errors (types 1-4) translated for the client whose flow
/// caused them.
pub const ICMPV6_ERROR_MAX: u8 = 4;

/// Extension headers the WAN filter walks past to find the ports (to tell
/// veil's packets from the host's): hop-by-hop, routing, destination
/// options, fragment.
pub const NH_HOP_BY_HOP: u8 = 0;
pub const NH_ROUTING: u8 = 43;
pub const NH_FRAGMENT: u8 = 44;
pub const NH_DEST_OPTS: u8 = 60;

/// Headers read at most: Ethernet, IPv6, ICMPv6, the quoted IPv6 header
/// and the quoted TCP header up to its checksum.
pub const MAX_HEADERS6: u32 = (ETH_LEN + IPV6_LEN + 8 + IPV6_LEN + 20) as u32;

/// The reason an IPv6 packet whose next header is `nh` (not TCP, UDP or
/// ICMPv6) is not translated.
#[inline(always)]
pub fn not_translated(nh: u8) -> Reason {
    match nh {
        NH_FRAGMENT => Reason::DropIpv6Fragment,
        // Hop-by-hop, routing, destination options, ESP, AH, mobility,
        // HIP, shim6: extension headers.
        NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS | 50 | 51 | 135 | 139 | 140 => {
            Reason::DropIpv6ExtHeader
        }
        _ => Reason::DropUnsupported,
    }
}

/// Whether an skb is IPv6, by its protocol: set from the EtherType on the
/// WAN (and under BPF_PROG_TEST_RUN), from the version nibble by the TUN
/// device.
#[inline(always)]
pub fn is_ipv6_skb(ctx: &TcContext) -> bool {
    u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16) == ETH_P_IPV6
}

/// Makes the IPv6 headers directly readable (see `packet::pull_headers`).
#[inline(always)]
pub fn pull_headers6(ctx: &TcContext) -> Result<(), Reason> {
    let want = MAX_HEADERS6.min(ctx.len());
    if ctx.data() + want as usize > ctx.data_end() {
        ctx.pull_data(want).map_err(|_| Reason::DropHelperFailed)?;
    }
    Ok(())
}

/// Where one endpoint of an IPv6 packet sits, as offsets from the skb's
/// data.
pub struct Endpoint6 {
    pub kind: L4Sum,
    /// The source or destination address.
    pub addr: usize,
    /// The matching port, or the ICMPv6 echo identifier.
    pub port: usize,
    /// The transport checksum.
    pub l4_check: usize,
}

/// The `i`th 32-bit word of an address, as raw (network-order) bits.
#[inline(always)]
pub fn word32(a: &[u8; 16], i: usize) -> u32 {
    u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
}

/// Moves one endpoint from `old_addr:old_port` (as read from the packet)
/// to `addr:port`, with the transport checksum that covers both.
#[inline(always)]
pub fn move_endpoint6_skb(
    ctx: &TcContext,
    at: &Endpoint6,
    old_addr: &[u8; 16],
    old_port: [u8; 2],
    addr: &[u8; 16],
    port: u16,
) -> Result<(), Reason> {
    let failed = |_| Reason::DropHelperFailed;
    // UDP: a zero checksum is sent as 0xffff (IPv6 requires one).
    let mangled = match at.kind {
        L4Sum::Udp => BPF_F_MARK_MANGLED_0 as u64,
        _ => 0,
    };
    let flags = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
    for i in 0..4 {
        let (old, new) = (word32(old_addr, i), word32(addr, i));
        if old != new {
            ctx.l4_csum_replace(at.l4_check, old as u64, new as u64, flags)
                .map_err(failed)?;
        }
    }
    let port = port.to_be_bytes();
    let (old, new) = (u16::from_ne_bytes(old_port), u16::from_ne_bytes(port));
    ctx.l4_csum_replace(at.l4_check, old as u64, new as u64, mangled | 2)
        .map_err(failed)?;
    ctx.store(at.addr, addr, 0).map_err(failed)?;
    ctx.store(at.port, &port, 0).map_err(failed)
}

/// Patches a complete checksum for a 16-byte field changed from `old` to
/// `new` (pure arithmetic: an ICMPv6 error's checksums).
#[inline(always)]
pub fn replace128(check: u16, old: &[u8; 16], new: &[u8; 16]) -> u16 {
    let mut sum = check;
    for i in 0..4 {
        sum = veil_common::csum::replace32(sum, word32(old, i), word32(new, i));
    }
    sum
}
