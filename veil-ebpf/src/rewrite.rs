//! In-place header rewrites. The checksum arithmetic is in
//! `veil_common::csum` (pure, unit-tested on the host); this module only
//! loads and stores the fields.

use network_types::ip::Ipv4Hdr;
use veil_common::csum::{self, L4Sum};

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

/// Counts one router hop: TTL minus one, header checksum patched.
///
/// # Safety
/// `ip` is a bounds-checked packet pointer.
#[inline(always)]
pub unsafe fn decrement_ttl(ip: *mut Ipv4Hdr) {
    unsafe {
        let old = word([(*ip).ttl, (*ip).proto]);
        (*ip).ttl -= 1;
        let new = word([(*ip).ttl, (*ip).proto]);
        (*ip).check = csum::replace16(word((*ip).check), old, new).to_ne_bytes();
    }
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
