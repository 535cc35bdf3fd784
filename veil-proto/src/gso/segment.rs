//! Software segmentation: what a NIC would put on the wire for a
//! super-packet, for a peer that cannot take offload datagrams.

use super::{complete_in_place, GsoError, GsoLayout, Transport, VnetHdr};
use crate::ipv4::*;

/// Software fallback: emits the packet(s) a NIC would have put on the wire:
/// checksum completed (if NEEDS_CSUM) and, for GSO, one packet per segment.
/// Returns the number of packets emitted. `scratch` is reused between calls
/// to avoid allocating per segment.
///
/// The header is validated first, so a peer's header may be passed as is;
/// on error nothing is emitted.
pub fn segment(
    hdr: &VnetHdr,
    packet: &[u8],
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, GsoError> {
    match hdr.check(packet)? {
        Some(layout) => Ok(segment_gso(&layout, &[], packet, scratch, &mut |seg| {
            emit(seg)
        })),
        None if hdr.needs_csum() => {
            complete_checksum(hdr, packet, scratch);
            emit(scratch);
            Ok(1)
        }
        None => {
            emit(packet);
            Ok(1)
        }
    }
}

/// As [`segment`], but each packet is built in `buf` after `prefix` (an
/// HTTP datagram's Quarter Stream ID and context) and handed over with it,
/// mutably: the caller may take the buffer as the datagram instead of
/// copying the packet once more. A packet that needs no change is copied
/// once, behind the prefix, like the rest.
pub fn segment_framed(
    prefix: &[u8],
    hdr: &VnetHdr,
    packet: &[u8],
    buf: &mut Vec<u8>,
    mut emit: impl FnMut(&mut Vec<u8>),
) -> Result<usize, GsoError> {
    match hdr.check(packet)? {
        Some(layout) => Ok(segment_gso(&layout, prefix, packet, buf, &mut emit)),
        None => {
            buf.clear();
            buf.extend_from_slice(prefix);
            buf.extend_from_slice(packet);
            if hdr.needs_csum() {
                complete_in_place(hdr, &mut buf[prefix.len()..]);
            }
            emit(buf);
            Ok(1)
        }
    }
}

/// Finishes a CHECKSUM_PARTIAL packet as `skb_checksum_help` would: the
/// field already holds the pseudo-header sum, so summing from `csum_start`
/// through the end covers pseudo-header, header and payload at once.
fn complete_checksum(hdr: &VnetHdr, packet: &[u8], scratch: &mut Vec<u8>) {
    scratch.clear();
    scratch.extend_from_slice(packet);
    complete_in_place(hdr, scratch);
}

/// Cuts a validated super-packet into segments, each built in `buf` after
/// `prefix`.
fn segment_gso(
    layout: &GsoLayout,
    prefix: &[u8],
    packet: &[u8],
    buf: &mut Vec<u8>,
    emit: &mut impl FnMut(&mut Vec<u8>),
) -> usize {
    let (headers, payload) = packet.split_at(layout.headers_len());
    let count = segment_count(payload.len(), layout.gso_size);
    for index in 0..count {
        let start = index * layout.gso_size;
        let end = payload.len().min(start + layout.gso_size);
        buf.clear();
        buf.extend_from_slice(prefix);
        buf.extend_from_slice(headers);
        buf.extend_from_slice(&payload[start..end]);
        let seg = &mut buf[prefix.len()..];
        match layout.transport {
            Transport::Tcp6 => fix_ipv6_header(seg),
            Transport::Tcp | Transport::Udp => fix_ipv4_header(seg, layout.ip_hdr_len, index),
        }
        match layout.transport {
            Transport::Tcp | Transport::Tcp6 => fix_tcp_header(seg, layout, index, count),
            Transport::Udp => fix_udp_header(seg, layout.ip_hdr_len),
        }
        emit(buf);
    }
    count
}

/// How many segments `payload_len` bytes make; an empty payload (a bare
/// header, e.g. a FIN) still makes one packet.
fn segment_count(payload_len: usize, gso_size: usize) -> usize {
    payload_len.div_ceil(gso_size).max(1)
}

/// Total length, ID and header checksum for segment `index`. The ID
/// increments per segment as Linux does without TCP_FIXEDID.
fn fix_ipv4_header(seg: &mut [u8], ip_hdr_len: usize, index: usize) {
    // A segment is never longer than the packet, whose length came from a u16.
    put16(seg, IP_TOTAL_LEN, seg.len() as u16);
    let id = be16(seg, IP_ID).wrapping_add(index as u16);
    put16(seg, IP_ID, id);
    set_header_checksum(seg, ip_hdr_len);
}

/// Payload length for an IPv6 segment: there is no ID (that lives in the
/// fragment header, which a TCP segment has none of) and no header checksum.
fn fix_ipv6_header(seg: &mut [u8]) {
    // A segment is never longer than the packet, whose length came from a u16.
    put16(seg, IPV6_PAYLOAD_LEN, (seg.len() - IPV6_HDR_LEN) as u16);
}

/// Sequence number, flags and checksum for TCP segment `index` of `count`,
/// following `tcp_gso_segment`: FIN and PSH end the data so they belong to
/// the last segment, CWR answers ECE once so it belongs to the first.
fn fix_tcp_header(seg: &mut [u8], layout: &GsoLayout, index: usize, count: usize) {
    let tcp = layout.ip_hdr_len;
    let advance = (index as u32).wrapping_mul(layout.gso_size as u32);
    let seq = be32(seg, tcp + TCP_SEQ).wrapping_add(advance);
    seg[tcp + TCP_SEQ..tcp + TCP_SEQ + 4].copy_from_slice(&seq.to_be_bytes());
    if index + 1 != count {
        seg[tcp + TCP_FLAGS] &= !(TCP_FIN | TCP_PSH);
    }
    if index != 0 {
        seg[tcp + TCP_FLAGS] &= !TCP_CWR;
    }
    let ipv6 = layout.transport == Transport::Tcp6;
    let csum = transport_checksum(seg, tcp, PROTO_TCP, TCP_CSUM, ipv6);
    put16(seg, tcp + TCP_CSUM, csum);
}

/// Length and checksum for a UDP datagram cut from a UDP super-packet.
fn fix_udp_header(seg: &mut [u8], ip_hdr_len: usize) {
    let udp = ip_hdr_len;
    put16(seg, udp + UDP_LEN, (seg.len() - udp) as u16);
    let mut csum = transport_checksum(seg, udp, PROTO_UDP, UDP_CSUM, false);
    // Zero would mean "no checksum"; 0xffff is the same value.
    if csum == 0 {
        csum = 0xffff;
    }
    put16(seg, udp + UDP_CSUM, csum);
}

/// The transport checksum computed from scratch over the IPv4 (or, with
/// `ipv6`, the IPv6) pseudo-header and `seg[l4..]`, ignoring whatever the
/// field held.
fn transport_checksum(
    seg: &mut [u8],
    l4: usize,
    protocol: u8,
    csum_offset: usize,
    ipv6: bool,
) -> u16 {
    put16(seg, l4 + csum_offset, 0);
    // A segment is never longer than the packet, whose length came from a u16.
    let l4_len = (seg.len() - l4) as u16;
    let mut sum = if ipv6 {
        pseudo_header6(seg, protocol, l4_len)
    } else {
        pseudo_header(seg, protocol, l4_len)
    };
    sum.add(&seg[l4..]);
    sum.finish()
}
