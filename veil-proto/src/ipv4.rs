//! Where the IPv4, IPv6, TCP and UDP header fields sit, and big-endian access to
//! them: what [`crate::gso`], [`crate::gro`] and [`crate::packet`] read and
//! rewrite, named once.

use std::ops::Range;

use veil_common::csum::Checksum;

// IPv6 header (RFC 8200): what the offload code needs of it.
pub const IPV6_HDR_LEN: usize = 40;
pub const IPV6_PAYLOAD_LEN: usize = 4;
pub const IPV6_NEXT: usize = 6;
pub const IPV6_HOP_LIMIT: usize = 7;
/// The traffic class straddles the first two bytes.
pub const IPV6_FLOW: Range<usize> = 0..4;
pub const IPV6_ADDRS: Range<usize> = 8..40;

// IPv4 header (RFC 791).
pub const IPV4_MIN_HDR_LEN: usize = 20;
pub const IP_TOS: usize = 1;
pub const IP_TOTAL_LEN: usize = 2;
pub const IP_ID: usize = 4;
pub const IP_FRAG: usize = 6;
pub const IP_TTL: usize = 8;
pub const IP_PROTO: usize = 9;
pub const IP_CSUM: usize = 10;
pub const IP_ADDRS: Range<usize> = 12..20;
/// The MF flag and the fragment offset: either set means a fragment.
pub const IP_FRAG_MASK: u16 = 0x3fff;
pub const IP_DF: u16 = 0x4000;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

// TCP header (RFC 9293).
pub const TCP_MIN_HDR_LEN: usize = 20;
pub const TCP_SEQ: usize = 4;
pub const TCP_ACK_NUM: Range<usize> = 8..12;
pub const TCP_DATA_OFFSET: usize = 12;
pub const TCP_FLAGS: usize = 13;
pub const TCP_WINDOW: Range<usize> = 14..16;
pub const TCP_CSUM: usize = 16;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_CWR: u8 = 0x80;

// UDP header (RFC 768).
pub const UDP_HDR_LEN: usize = 8;
pub const UDP_LEN: usize = 4;
pub const UDP_CSUM: usize = 6;

pub fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

pub fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

pub fn put16(bytes: &mut [u8], at: usize, value: u16) {
    bytes[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

/// The IPv4 pseudo-header (RFC 9293 §3.1, RFC 768) of `packet`'s transport
/// header: addresses, protocol and the transport length `l4_len`.
pub fn pseudo_header(packet: &[u8], protocol: u8, l4_len: u16) -> Checksum {
    let mut sum = Checksum::default();
    sum.add(&packet[IP_ADDRS]);
    sum.add_u16(u16::from(protocol));
    sum.add_u16(l4_len);
    sum
}

/// The IPv6 pseudo-header (RFC 8200 §8.1) of `packet`'s upper-layer
/// header: addresses, the upper-layer length `l4_len` and next header.
pub fn pseudo_header6(packet: &[u8], next: u8, l4_len: u16) -> Checksum {
    let mut sum = Checksum::default();
    sum.add(&packet[IPV6_ADDRS]);
    sum.add_u16(l4_len);
    sum.add_u16(u16::from(next));
    sum
}

/// Recomputes the IPv4 header checksum over the first `ihl` bytes.
pub fn set_header_checksum(packet: &mut [u8], ihl: usize) {
    put16(packet, IP_CSUM, 0);
    put16(packet, IP_CSUM, Checksum::of(&packet[..ihl]));
}
