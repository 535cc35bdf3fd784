//! IPv6 maps: NAT66 with port translation, beside the IPv4 maps of
//! [`crate::maps`] and shaped like them.
//!
//! Public API (used by the daemon's `flows6` and the eBPF `egress6` /
//! `ingress6` modules):
//! - [`EGRESS6_MAP`]: [`FlowKey6`] → [`EgressFlow6`], the client's 5-tuple
//!   to the gateway's IPv6 address and a NAT port.
//! - [`REVERSE6_MAP`]: [`ReverseKey6`] → [`ReverseFlow6`], the remote's
//!   view back to the client.
//! - [`CONFIG6_MAP`]: one [`Config6`]: the gateway's public IPv6 address
//!   and the clients' IPv6 prefix. All zero: IPv6 is not translated.
//!
//! The NAT port range is the IPv4 one ([`crate::Config::nat_port_min`]).
//! Addresses are the sixteen wire bytes; ports host order. Each flow value
//! also carries the client's IPv4 address (its session's key), so that the
//! per-client rate limit and quota (`ratelimit`, keyed by IPv4 address)
//! cover its IPv6 packets too.

use core::net::Ipv6Addr;

use crate::FlowStats;

/// ICMPv6's protocol number (Next Header).
pub const IPPROTO_ICMPV6: u8 = 58;

/// IPv6 egress flows. Hash, key [`FlowKey6`], value [`EgressFlow6`].
pub const EGRESS6_MAP: &str = "VEIL_EGRESS6";
/// IPv6 reverse flows. Hash, key [`ReverseKey6`], value [`ReverseFlow6`].
pub const REVERSE6_MAP: &str = "VEIL_REVERSE6";
/// One [`Config6`] at index 0.
pub const CONFIG6_MAP: &str = "VEIL_CONFIG6";
/// IPv6 fragments, as [`crate::FRAG_MAP`] for IPv4: LRU hash, key
/// [`FragKey6`], value [`FragEntry6`], the datapath's own. Sized like
/// the IPv4 one (`MAX_FRAGS`).
pub const FRAG6_MAP: &str = "VEIL_FRAGS6";

/// Capacity of each IPv6 flow map (two entries a flow). Smaller than the
/// IPv4 maps': their keys are 2.5 times as large and most flows are IPv4.
pub const MAX_FLOWS6: u32 = 65_536;

/// An IPv6 flow as the client sees it; the IPv6 egress map's key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey6 {
    /// The client's leased IPv6 address.
    pub client_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Source port, or the ICMPv6 echo identifier.
    pub client_port: u16,
    /// Destination port; 0 for ICMPv6.
    pub remote_port: u16,
    /// TCP, UDP or [`IPPROTO_ICMPV6`].
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey6 {
    pub const fn new(
        proto: u8,
        client: Ipv6Addr,
        client_port: u16,
        remote: Ipv6Addr,
        remote_port: u16,
    ) -> Self {
        Self {
            client_addr: client.octets(),
            remote_addr: remote.octets(),
            client_port,
            remote_port,
            proto,
            _pad: [0; 3],
        }
    }

    pub const fn client(&self) -> Ipv6Addr {
        Ipv6Addr::from_octets(self.client_addr)
    }

    pub const fn remote(&self) -> Ipv6Addr {
        Ipv6Addr::from_octets(self.remote_addr)
    }

    /// The reverse map's key once the flow owns `nat_port` on `public`.
    pub const fn reverse(&self, public: Ipv6Addr, nat_port: u16) -> ReverseKey6 {
        ReverseKey6 {
            remote_addr: self.remote_addr,
            public_addr: public.octets(),
            remote_port: self.remote_port,
            nat_port,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// The IPv6 egress map's value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressFlow6 {
    /// Client to remote.
    pub stats: FlowStats,
    /// The gateway's IPv6 address the flow leaves from.
    pub public_addr: [u8; 16],
    /// The client's IPv4 address: its rate limit's key.
    pub client_vip: [u8; 4],
    pub nat_port: u16,
    /// As [`crate::EgressFlow::acked`].
    pub acked: u16,
}

/// An IPv6 flow as the remote sees it; the IPv6 reverse map's key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReverseKey6 {
    pub remote_addr: [u8; 16],
    pub public_addr: [u8; 16],
    pub remote_port: u16,
    /// The gateway's port (or ICMPv6 identifier) the remote answers to.
    pub nat_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl ReverseKey6 {
    /// The key of the client's flow whose replies this key takes, given
    /// its client (the reverse entry's value).
    pub const fn client_flow(&self, client_addr: [u8; 16], client_port: u16) -> FlowKey6 {
        FlowKey6 {
            client_addr,
            remote_addr: self.remote_addr,
            client_port,
            remote_port: self.remote_port,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// The IPv6 reverse map's value: whom a reply belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReverseFlow6 {
    /// Remote to client.
    pub stats: FlowStats,
    pub client_addr: [u8; 16],
    /// The client's IPv4 address: its rate limit's key.
    pub client_vip: [u8; 4],
    pub client_port: u16,
    pub _pad: [u8; 2],
}

/// The IPv6 fragment map's key: what the fragments of one datagram share
/// (RFC 8200 4.5: source, destination and identification; not the next
/// header, which may differ between fragments), and what the entry is
/// for (one of [`crate::frag_kind`], which mean for IPv6 what they mean
/// for IPv4).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey6 {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// The fragment header's identification, host order.
    pub id: u32,
    pub kind: u8,
    pub _pad: [u8; 3],
}

impl FragKey6 {
    pub const fn new(kind: u8, src: [u8; 16], dst: [u8; 16], id: u32) -> Self {
        Self {
            src_addr: src,
            dst_addr: dst,
            id,
            kind,
            _pad: [0; 3],
        }
    }
}

/// The IPv6 fragment map's value, as [`crate::FragEntry`] with an IPv6
/// address and a 32-bit identification.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragEntry6 {
    /// `bpf_ktime_get_ns()` when the first fragment was seen.
    pub first_seen_ns: u64,
    /// The address the fragments are translated to.
    pub addr: [u8; 16],
    /// An identification, host order; 0 where unused.
    pub id: u32,
    /// The client's IPv4 address (its rate limit's key, as in the flow
    /// maps): later fragments have no flow to find it by. Zero in an ID
    /// reservation.
    pub client_vip: [u8; 4],
}

impl FragEntry6 {
    /// As [`crate::FragEntry::is_live`].
    pub const fn is_live(&self, now_ns: u64, lifetime_ns: u64) -> bool {
        now_ns >= self.first_seen_ns && now_ns - self.first_seen_ns <= lifetime_ns
    }
}

/// The IPv6 side of the datapath's settings, written by the daemon before
/// it attaches. `enabled` 0 (the array's initial zeroes): IPv6 from the
/// tunnel is dropped (`drop_unsupported`) and IPv6 on the WAN left to the
/// host.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config6 {
    /// The gateway's IPv6 address on the WAN: what remote hosts see.
    pub public_addr: [u8; 16],
    /// The clients' IPv6 prefix (network and mask): WAN packets addressed
    /// into it are forged.
    pub client_net: [u8; 16],
    pub client_mask: [u8; 16],
    pub enabled: u32,
    pub _pad: u32,
}

impl Config6 {
    #[inline(always)]
    pub fn is_public(&self, addr: &[u8; 16]) -> bool {
        eq16(&self.public_addr, addr)
    }

    #[inline(always)]
    pub fn in_client_net(&self, addr: &[u8; 16]) -> bool {
        let (a, n, m) = (
            words(addr),
            words(&self.client_net),
            words(&self.client_mask),
        );
        (a[0] & m[0]) == n[0] && (a[1] & m[1]) == n[1]
    }
}

/// Two 64-bit halves, for compares the verifier likes (no byte loops).
#[inline(always)]
pub fn words(a: &[u8; 16]) -> [u64; 2] {
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&a[..8]);
    hi.copy_from_slice(&a[8..]);
    [u64::from_ne_bytes(lo), u64::from_ne_bytes(hi)]
}

#[inline(always)]
pub fn eq16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let (a, b) = (words(a), words(b));
    a[0] == b[0] && a[1] == b[1]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `repr(C)`, integers and byte arrays, every padding byte an
    // explicit field.
    unsafe impl aya::Pod for super::FlowKey6 {}
    unsafe impl aya::Pod for super::EgressFlow6 {}
    unsafe impl aya::Pod for super::ReverseKey6 {}
    unsafe impl aya::Pod for super::ReverseFlow6 {}
    unsafe impl aya::Pod for super::Config6 {}
    unsafe impl aya::Pod for super::FragKey6 {}
    unsafe impl aya::Pod for super::FragEntry6 {}
}

const _: () = {
    assert!(size_of::<FlowKey6>() == 40);
    assert!(size_of::<EgressFlow6>() == 56);
    assert!(size_of::<ReverseKey6>() == 40);
    assert!(size_of::<ReverseFlow6>() == 56);
    assert!(size_of::<Config6>() == 56);
    assert!(size_of::<FragKey6>() == 40);
    assert!(size_of::<FragEntry6>() == 32);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_prefix_and_the_public_address_are_recognised() {
        let net: Ipv6Addr = "fd00:7765::".parse().unwrap();
        let mask: Ipv6Addr = "ffff:ffff:ffff:ffff::".parse().unwrap();
        let cfg = Config6 {
            public_addr: "2001:2::1".parse::<Ipv6Addr>().unwrap().octets(),
            client_net: net.octets(),
            client_mask: mask.octets(),
            enabled: 1,
            _pad: 0,
        };
        let ip = |s: &str| s.parse::<Ipv6Addr>().unwrap().octets();
        assert!(cfg.in_client_net(&ip("fd00:7765::2")));
        assert!(!cfg.in_client_net(&ip("fd00:7766::2")));
        assert!(cfg.is_public(&ip("2001:2::1")));
        assert!(!cfg.is_public(&ip("2001:2::2")));
    }
}
