//! IPv6 test packets: built with etherparse, checked with the plain RFC 1071
//! sum of [`crate::packet::ones_sum`] over the pseudo-header.

use std::net::Ipv6Addr;

use etherparse::PacketBuilder;

use crate::packet::{ones_sum, write_l4, L4};

pub const IPV6_LEN: usize = 40;

/// An Ethernet frame (zero MACs) around an IPv6 packet with every checksum
/// computed by etherparse.
pub fn frame6(src: Ipv6Addr, dst: Ipv6Addr, hop: u8, l4: L4<'_>) -> Vec<u8> {
    let ip = PacketBuilder::ethernet2([0; 6], [0; 6]).ipv6(src.octets(), dst.octets(), hop);
    write_l4(ip, l4, true)
}

/// The pseudo-header sum check of an upper-layer packet `l4` (RFC 8200 8.1).
fn sum_ok(src: &[u8], dst: &[u8], next: u8, l4: &[u8]) -> bool {
    let mut pseudo = Vec::with_capacity(40 + l4.len());
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, next]);
    pseudo.extend_from_slice(l4);
    ones_sum(&pseudo) == 0xffff
}

/// Asserts that the transport checksum of an IPv6 packet (TCP, UDP or
/// ICMPv6, over the whole packet) is right, recomputed from scratch. `ip`
/// starts at the IPv6 header.
pub fn assert_checksums6(ip: &[u8]) {
    let len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    let l4 = &ip[IPV6_LEN..IPV6_LEN + len];
    let name = match ip[6] {
        6 => "TCP",
        17 => "UDP",
        58 => "ICMPv6",
        p => panic!("unexpected next header {p}"),
    };
    assert!(
        sum_ok(&ip[8..24], &ip[24..40], ip[6], l4),
        "{name} checksum is wrong"
    );
}

/// An ICMPv6 error frame from `router` to `to` quoting `quoted` (an IPv6
/// packet), built by hand: type, code, the 4-byte parameter, the quote.
pub fn icmp6_error(
    router: Ipv6Addr,
    to: Ipv6Addr,
    icmp_type: u8,
    code: u8,
    param: u32,
    quoted: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![icmp_type, code, 0, 0];
    icmp.extend_from_slice(&param.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let mut pseudo = router.octets().to_vec();
    pseudo.extend_from_slice(&to.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&icmp);
    let c = !ones_sum(&pseudo);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    raw_frame6(router, to, 58, 64, &icmp)
}

/// An Ethernet frame around an IPv6 header (`next`, `hop`) and `payload` as
/// given: for extension headers and other packets etherparse will not build.
pub fn raw_frame6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, hop: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 12];
    out.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(&[next, hop]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    out.extend_from_slice(payload);
    out
}

/// Puts an extension header (`kind`: 0, 43, 60 with 6 bytes of padding
/// options; 44: a fragment header with `frag_word` as offset and M flag)
/// between the IPv6 header and the upper layer of `frame`.
pub fn with_ext_header(frame: &[u8], kind: u8, frag_word: u16) -> Vec<u8> {
    let ip = 14;
    let next = frame[ip + 6];
    let ext: Vec<u8> = match kind {
        44 => {
            let w = frag_word.to_be_bytes();
            vec![next, 0, w[0], w[1], 0, 0, 0x12, 0x34]
        }
        // PadN option filling the 8 bytes.
        _ => vec![next, 0, 1, 4, 0, 0, 0, 0],
    };
    let mut out = frame[..ip + IPV6_LEN].to_vec();
    out.extend_from_slice(&ext);
    out.extend_from_slice(&frame[ip + IPV6_LEN..]);
    out[ip + 6] = kind;
    let len = u16::from_be_bytes([out[ip + 4], out[ip + 5]]) + 8;
    out[ip + 4..ip + 6].copy_from_slice(&len.to_be_bytes());
    out
}

/// Cuts the IPv6 frame `frame` (no extension headers) into fragments of
/// at most `size` bytes of its upper-layer part each (a multiple of 8),
/// as its sender would: a fragment header with `id` after each copy of
/// the IPv6 header (RFC 8200 4.5).
pub fn fragment6(frame: &[u8], id: u32, size: usize) -> Vec<Vec<u8>> {
    assert_eq!(size % 8, 0, "fragment sizes are multiples of 8");
    let ip = 14;
    let next = frame[ip + 6];
    let upper = &frame[ip + IPV6_LEN..];
    let chunks: Vec<&[u8]> = upper.chunks(size).collect();
    chunks
        .iter()
        .enumerate()
        .map(|(i, chunk)| {
            let more = u16::from(i + 1 < chunks.len());
            let word = ((i * size) as u16) | more;
            let mut out = frame[..ip + IPV6_LEN].to_vec();
            out[ip + 6] = 44;
            let len = (8 + chunk.len()) as u16;
            out[ip + 4..ip + 6].copy_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&[next, 0]);
            out.extend_from_slice(&word.to_be_bytes());
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(chunk);
            out
        })
        .collect()
}

/// The fragment header's identification of a fragment [`fragment6`] cut.
pub fn fragment_id(frame: &[u8]) -> u32 {
    let at = 14 + IPV6_LEN + 4;
    u32::from_be_bytes(frame[at..at + 4].try_into().unwrap())
}

/// The datagram the fragments (in order) make, as a frame with the first
/// fragment's headers; panics unless they share source, destination and
/// identification and fit end to end.
pub fn reassemble6(fragments: &[Vec<u8>]) -> Vec<u8> {
    let ip = 14;
    let first = &fragments[0];
    let mut out = first[..ip + IPV6_LEN].to_vec();
    out[ip + 6] = first[ip + IPV6_LEN];
    let mut upper = Vec::new();
    for f in fragments {
        assert_eq!(f[ip + 6], 44, "a fragment");
        assert_eq!(f[ip + 8..ip + 40], first[ip + 8..ip + 40], "same addresses");
        assert_eq!(fragment_id(f), fragment_id(first), "same identification");
        let word = u16::from_be_bytes([f[ip + IPV6_LEN + 2], f[ip + IPV6_LEN + 3]]);
        assert_eq!(usize::from(word & 0xfff8), upper.len(), "contiguous");
        upper.extend_from_slice(&f[ip + IPV6_LEN + 8..]);
    }
    out[ip + 4..ip + 6].copy_from_slice(&(upper.len() as u16).to_be_bytes());
    out.extend_from_slice(&upper);
    out
}
