//! IPv6 helpers shared by `egress6` and `ingress6`: header offsets, the
//! extension-header decision, and the endpoint rewrite.
//!
//! IPv6 has no header checksum; the transport checksums (TCP, UDP and,
//! unlike ICMPv4, ICMPv6) cover a pseudo-header with both addresses. So an
//! address rewrite is one `bpf_l4_csum_replace` call with
//! `BPF_F_PSEUDO_HDR` and the address's whole diff for every protocol,
//! which keeps partial checksums (CHECKSUM_PARTIAL super-packets) right,
//! as on the IPv4 path.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use veil_common::{
    csum::{self, L4Sum},
    Reason,
};

use crate::packet::{Packet, ETH_LEN};

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

/// A port (or ICMPv6 echo identifier) rewrite: `old` as read from the
/// packet, `new` in host order.
pub struct PortChange {
    pub old: [u8; 2],
    pub new: u16,
}

/// The `i`th 32-bit word of an address, as raw (network-order) bits.
#[inline(always)]
pub fn word32(a: &[u8; 16], i: usize) -> u32 {
    u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
}

/// Moves one endpoint from `old_addr:old_port` (as read from the packet)
/// to `addr:port`, with the transport checksum that covers both.
///
/// Two helper calls, as on the IPv4 path (`rewrite::move_endpoint_skb`):
/// the address's change to the pseudo-header, summed here first and handed
/// over as one diff, then the port's; the address and port are written
/// directly. A call of its own: inlined, its stack would add up with its
/// callers' past the 512 bytes BPF allows (and BPF calls take at most five
/// arguments: the ports come as one).
#[inline(never)]
pub fn move_endpoint6_skb(
    ctx: &TcContext,
    at: &Endpoint6,
    old_addr: &[u8; 16],
    addr: &[u8; 16],
    ports: &PortChange,
) -> Result<(), Reason> {
    let (old_port, port) = (ports.old, ports.new);
    let failed = |_| Reason::DropHelperFailed;
    // UDP: a zero checksum is sent as 0xffff (IPv6 requires one).
    let mangled = match at.kind {
        L4Sum::Udp => BPF_F_MARK_MANGLED_0 as u64,
        _ => 0,
    };
    let mut diff = 0;
    for i in 0..4 {
        diff = csum::diff32(diff, word32(old_addr, i), word32(addr, i));
    }
    // A zero diff (either zero of one's complement) changes no sum.
    if diff != 0 && diff != 0xffff {
        // Size 0: `to` is a diff, applied to a partial checksum too.
        ctx.l4_csum_replace(
            at.l4_check,
            0,
            diff as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled,
        )
        .map_err(failed)?;
    }
    let port = port.to_be_bytes();
    let (old, new) = (u16::from_ne_bytes(old_port), u16::from_ne_bytes(port));
    ctx.l4_csum_replace(at.l4_check, old as u64, new as u64, mangled | 2)
        .map_err(failed)?;
    // The offsets come from the caller, unbounded as far as the verifier
    // knows in this call: bounded here for direct access.
    if at.addr > MAX_HEADERS6 as usize || at.port > MAX_HEADERS6 as usize {
        return Err(Reason::DropMalformed);
    }
    // The helpers may move the packet: its pointers are taken afterwards.
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let addr_at: *mut [u8; 16] = pkt.at(at.addr)?;
    let port_at: *mut [u8; 2] = pkt.at(at.port)?;
    unsafe {
        *addr_at = *addr;
        *port_at = port;
    }
    Ok(())
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
