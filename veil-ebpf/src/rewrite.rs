//! Header rewrites, two ways.
//!
//! Transport checksums are updated with the kernel's checksum helpers
//! ([`move_endpoint_skb`]): only the skb knows whether a transport checksum
//! is complete or, for a packet sent by a local socket over veth or written
//! into the TUN device with an offload header (CHECKSUM_PARTIAL), just the
//! pseudo-header sum that the sender's "NIC" will finish. An update written
//! for a complete checksum corrupts the second kind; the helpers handle
//! both. The rest of the rewrite (addresses, ports, TTL, the IPv4 header
//! checksum, which is always complete) is written directly: a helper call
//! per field costs more than the whole arithmetic (docs/performance.md).
//!
//! Checksums that cover a header as plain data (the outer ICMP checksum of
//! an ICMP error and the quote inside it) are patched directly with the
//! pure arithmetic of `veil_common::csum` ([`move_endpoint`], [`cover`]).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use network_types::ip::Ipv4Hdr;
use veil_common::{
    csum::{self, L4Sum},
    Reason,
};

use crate::packet::Packet;

/// Where one endpoint of a packet sits, as offsets from the skb's data.
pub struct SkbEndpoint {
    pub kind: L4Sum,
    /// The IPv4 header's checksum.
    pub ip_check: usize,
    /// The source or destination address.
    pub addr: usize,
    /// The matching port, or the ICMP echo identifier.
    pub port: usize,
    /// The transport checksum.
    pub l4_check: usize,
}

/// Moves one endpoint from `old_addr:old_port` (raw words, as read from the
/// packet) to `addr:port`, with every checksum that covers it.
///
/// The transport checksum goes through the kernel's helper, which knows
/// whether it is complete or partial (two calls: the pseudo-header's
/// address, then the port, which a partial checksum does not cover yet).
/// Everything else is written directly: the address, the port and the IPv4
/// header checksum, which is always complete (RFC 1624 arithmetic). A
/// header rewritten with its checksum leaves the header's sum, and so a
/// CHECKSUM_COMPLETE skb's `csum`, unchanged.
#[inline(always)]
pub fn move_endpoint_skb(
    ctx: &TcContext,
    at: &SkbEndpoint,
    old_addr: u32,
    old_port: u16,
    addr: [u8; 4],
    port: u16,
) -> Result<(), Reason> {
    let new_addr = dword(addr);
    let port = port.to_be_bytes();
    let new_port = word(port);
    l4_csum_replace(ctx, at, old_addr, new_addr, old_port, new_port)?;
    // The helpers may move the packet: its pointers are taken afterwards.
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let ip_check: *mut [u8; 2] = pkt.at(at.ip_check)?;
    let addr_at: *mut [u8; 4] = pkt.at(at.addr)?;
    let port_at: *mut [u8; 2] = pkt.at(at.port)?;
    unsafe {
        *ip_check = csum::replace32(word(*ip_check), old_addr, new_addr).to_ne_bytes();
        *addr_at = addr;
        *port_at = port;
    }
    Ok(())
}

/// The transport checksum's part of [`move_endpoint_skb`].
#[inline(always)]
fn l4_csum_replace(
    ctx: &TcContext,
    at: &SkbEndpoint,
    old_addr: u32,
    new_addr: u32,
    old_port: u16,
    new_port: u16,
) -> Result<(), Reason> {
    // UDP: a zero checksum means none and stays zero; a computed zero is
    // sent as 0xffff.
    let mangled = match at.kind {
        L4Sum::Udp => BPF_F_MARK_MANGLED_0 as u64,
        _ => 0,
    };
    let failed = |_| Reason::DropHelperFailed;
    if at.kind != L4Sum::Icmp {
        ctx.l4_csum_replace(
            at.l4_check,
            old_addr as u64,
            new_addr as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled | 4,
        )
        .map_err(failed)?;
    }
    ctx.l4_csum_replace(at.l4_check, old_port as u64, new_port as u64, mangled | 2)
        .map_err(failed)?;
    Ok(())
}

#[inline(always)]
pub fn word(b: [u8; 2]) -> u16 {
    u16::from_ne_bytes(b)
}

#[inline(always)]
pub fn dword(b: [u8; 4]) -> u32 {
    u32::from_ne_bytes(b)
}

/// The transport fields that travel with an IP address: the port (or ICMP
/// identifier) and the checksum, when the packet holds it.
pub struct L4 {
    pub kind: L4Sum,
    pub port: *mut [u8; 2],
    pub check: Option<*mut [u8; 2]>,
}

/// The raw words an endpoint rewrite changed, for checksums that cover the
/// rewritten header as data (the outer ICMP checksum of an ICMP error).
pub struct Changed {
    pub addr: (u32, u32),
    pub ip_check: (u16, u16),
    pub port: (u16, u16),
    pub l4_check: Option<(u16, u16)>,
}

/// Moves one endpoint of a packet to `addr:port`: the address at `addr_at`
/// (source or destination of `ip`), the port in `l4`, and every checksum
/// that covers them.
///
/// # Safety
/// All pointers are bounds-checked packet pointers.
#[inline(always)]
pub unsafe fn move_endpoint(
    ip: *mut Ipv4Hdr,
    addr_at: *mut [u8; 4],
    l4: &L4,
    addr: [u8; 4],
    port: u16,
) -> Changed {
    unsafe {
        let old_addr = dword(*addr_at);
        let new_addr = dword(addr);
        let old_port = word(*l4.port);
        let new_port = word(port.to_be_bytes());
        let old_ip_check = word((*ip).check);
        let old_l4_check = match l4.check {
            Some(c) => word(*c),
            None => 0,
        };
        let (ip_check, l4_check) = csum::endpoint(
            l4.kind,
            old_ip_check,
            old_l4_check,
            old_addr,
            new_addr,
            old_port,
            new_port,
        );
        *addr_at = addr;
        (*ip).check = ip_check.to_ne_bytes();
        *l4.port = new_port.to_ne_bytes();
        if let Some(c) = l4.check {
            *c = l4_check.to_ne_bytes();
        }
        Changed {
            addr: (old_addr, new_addr),
            ip_check: (old_ip_check, ip_check),
            port: (old_port, new_port),
            l4_check: l4.check.map(|_| (old_l4_check, l4_check)),
        }
    }
}

/// Counts one router hop: TTL minus one, header checksum patched. `ip` is
/// the offset of the IPv4 header; `ttl` and `proto` its current values.
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext, ip: usize, ttl: u8, proto: u8) -> Result<(), Reason> {
    set_ttl(ctx, ip, ttl, ttl - 1, proto)
}

/// Rewrites the TTL of the IPv4 header at `ip` from `old` to `new`, written
/// directly with the header checksum (always complete) patched.
#[inline(always)]
pub fn set_ttl(ctx: &TcContext, ip: usize, old: u8, new: u8, proto: u8) -> Result<(), Reason> {
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let hdr: *mut Ipv4Hdr = pkt.at(ip)?;
    unsafe {
        let check = csum::replace16(word((*hdr).check), word([old, proto]), word([new, proto]));
        (*hdr).ttl = new;
        (*hdr).check = check.to_ne_bytes();
    }
    Ok(())
}

/// Patches a checksum that covers the rewritten header as plain data.
#[inline(always)]
pub fn cover(check: u16, c: &Changed) -> u16 {
    let mut sum = csum::replace32(check, c.addr.0, c.addr.1);
    sum = csum::replace16(sum, c.ip_check.0, c.ip_check.1);
    sum = csum::replace16(sum, c.port.0, c.port.1);
    if let Some((old, new)) = c.l4_check {
        sum = csum::replace16(sum, old, new);
    }
    sum
}
