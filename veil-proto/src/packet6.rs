//! What the gateway needs to know about a client's IPv6 packet, and the
//! ICMPv6 errors it answers with (RFC 4443). Pure functions over bytes,
//! the IPv6 counterpart of [`crate::packet`].
//!
//! Public API: [`parse6`] → [`Ipv6Info`] (with [`Ipv6Info::flow_key`]),
//! [`icmp6_error`], [`icmp6_packet_too_big`], [`checksum6`].

use std::net::Ipv6Addr;

use veil_common::{proto, FlowKey6, IPPROTO_ICMPV6};

pub use crate::packet::Fragment;

pub const IPV6_HDR_LEN: usize = 40;
/// The fragment header's Next Header value, and its length.
pub const NEXT_FRAGMENT: u8 = 44;
pub const FRAGMENT_HDR_LEN: usize = 8;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
/// ICMPv6 types (RFC 4443).
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
/// Destination Unreachable code 1: "communication with destination
/// administratively prohibited" (the egress policy); code 3: address
/// unreachable.
pub const UNREACH_ADMIN_PROHIBITED: u8 = 1;
pub const UNREACH_ADDRESS: u8 = 3;
/// IPv6's minimum link MTU: an ICMPv6 error is never longer (RFC 4443 2.4).
pub const IPV6_MIN_MTU: usize = 1280;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Packet6Error {
    #[error("{0} bytes is too short for an IPv6 header")]
    TooShort(usize),
    #[error("IP version {0}, not 6")]
    NotIpv6(u8),
    #[error(
        "IPv6 payload length {payload} does not match the {actual} bytes received after the header"
    )]
    LengthMismatch { payload: usize, actual: usize },
    #[error("a {proto} header cut short")]
    Truncated { proto: u8 },
}

/// The fields of an IPv6 packet that decide its fate at the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Info {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    /// The IPv6 header's Next Header: TCP, UDP, ICMPv6 or an extension
    /// header (not walked: the gateway translates none). Past a fragment
    /// header right after the IPv6 header, the fragment header's.
    pub next: u8,
    /// Where the packet stands among its datagram's fragments, by a
    /// fragment header right after the IPv6 header (`Whole` without one,
    /// and for an atomic fragment). A later fragment has no ports.
    pub fragment: Fragment,
    pub hop_limit: u8,
    /// Source and destination port (TCP, UDP), or the identifier and 0
    /// (ICMPv6 echo request); `None` otherwise.
    pub ports: Option<(u16, u16)>,
    /// The ICMPv6 type, for ICMPv6.
    pub icmp_type: Option<u8>,
}

impl Ipv6Info {
    /// The flow this packet belongs to, if the datapath translates it.
    pub fn flow_key(&self) -> Option<FlowKey6> {
        let (sport, dport) = self.ports?;
        Some(FlowKey6::new(self.next, self.src, sport, self.dst, dport))
    }
}

fn addr(b: &[u8]) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    Ipv6Addr::from(a)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Reads an IPv6 packet's header and, for TCP, UDP and ICMPv6, the start
/// of its transport header. A super-packet (GSO) has its real length in
/// the payload length field too, so the lengths must agree.
pub fn parse6(pkt: &[u8]) -> Result<Ipv6Info, Packet6Error> {
    if pkt.len() < IPV6_HDR_LEN {
        return Err(Packet6Error::TooShort(pkt.len()));
    }
    if pkt[0] >> 4 != 6 {
        return Err(Packet6Error::NotIpv6(pkt[0] >> 4));
    }
    let payload = usize::from(be16(pkt, 4));
    if payload != pkt.len() - IPV6_HDR_LEN {
        return Err(Packet6Error::LengthMismatch {
            payload,
            actual: pkt.len() - IPV6_HDR_LEN,
        });
    }
    let (next, fragment, l4) = match pkt[6] {
        NEXT_FRAGMENT => {
            let f = &pkt[IPV6_HDR_LEN..];
            if f.len() < FRAGMENT_HDR_LEN {
                return Err(Packet6Error::Truncated {
                    proto: NEXT_FRAGMENT,
                });
            }
            let word = be16(f, 2);
            let fragment = if word & 0xfff8 != 0 {
                Fragment::Later
            } else if word & 1 != 0 {
                Fragment::First
            } else {
                Fragment::Whole
            };
            (f[0], fragment, &f[FRAGMENT_HDR_LEN..])
        }
        next => (next, Fragment::Whole, &pkt[IPV6_HDR_LEN..]),
    };
    let need = |n: usize| {
        if l4.len() < n {
            Err(Packet6Error::Truncated { proto: next })
        } else {
            Ok(())
        }
    };
    let (ports, icmp_type) = match next {
        _ if fragment == Fragment::Later => (None, None),
        proto::TCP => {
            need(20)?;
            (Some((be16(l4, 0), be16(l4, 2))), None)
        }
        proto::UDP => {
            need(8)?;
            (Some((be16(l4, 0), be16(l4, 2))), None)
        }
        IPPROTO_ICMPV6 => {
            need(8)?;
            let ports = (l4[0] == ICMPV6_ECHO_REQUEST).then(|| (be16(l4, 4), 0));
            (ports, Some(l4[0]))
        }
        _ => (None, None),
    };
    Ok(Ipv6Info {
        src: addr(&pkt[8..]),
        dst: addr(&pkt[24..]),
        next,
        fragment,
        hop_limit: pkt[7],
        ports,
        icmp_type,
    })
}

/// Splits an IPv6 fragment (a fragment header right after the IPv6
/// header) too large for `mtu` bytes into smaller fragments of the same
/// datagram: each gets the headers, its share of the fragment's data (a
/// multiple of 8 bytes but the last), its offset, the identification, and
/// M set but on the last piece, which keeps the fragment's own. The
/// receiver reassembles them as it would have the fragment. Returns
/// `false`, emitting nothing, for a packet that is not such a fragment
/// (IPv6 forbids fragmenting on the way: a whole packet is left alone),
/// is malformed, or when `mtu` leaves no room for 8 bytes of data.
pub fn refragment6(packet: &[u8], mtu: usize, mut emit: impl FnMut(&[u8])) -> bool {
    const HEADERS: usize = IPV6_HDR_LEN + FRAGMENT_HDR_LEN;
    if packet.len() <= HEADERS
        || packet[0] >> 4 != 6
        || packet[6] != NEXT_FRAGMENT
        || usize::from(be16(packet, 4)) != packet.len() - IPV6_HDR_LEN
    {
        return false;
    }
    let chunk = mtu.saturating_sub(HEADERS) & !7;
    let word = be16(packet, IPV6_HDR_LEN + 2);
    let (offset, more) = (usize::from(word & 0xfff8), word & 1);
    let data = &packet[HEADERS..];
    if chunk == 0 || offset + data.len() > usize::from(u16::MAX) {
        return false;
    }
    let mut piece = Vec::with_capacity(HEADERS + chunk);
    for (i, part) in data.chunks(chunk).enumerate() {
        let last = (i + 1) * chunk >= data.len();
        let word = (offset + i * chunk) as u16 | if last { more } else { 1 };
        piece.clear();
        piece.extend_from_slice(&packet[..HEADERS]);
        piece[4..6].copy_from_slice(&((FRAGMENT_HDR_LEN + part.len()) as u16).to_be_bytes());
        piece[IPV6_HDR_LEN + 2..IPV6_HDR_LEN + 4].copy_from_slice(&word.to_be_bytes());
        piece.extend_from_slice(part);
        emit(&piece);
    }
    true
}

/// The ICMPv6 (or TCP, UDP) checksum of `payload` from `src` to `dst`:
/// RFC 8200 8.1's pseudo-header, then the payload.
pub fn checksum6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> u16 {
    let mut sum = veil_common::csum::Checksum::default();
    sum.add(&src.octets());
    sum.add(&dst.octets());
    sum.add(&(payload.len() as u32).to_be_bytes());
    sum.add(&[0, 0, 0, next]);
    sum.add(payload);
    sum.finish()
}

/// An ICMPv6 error from `from` to the sender of `original`, quoting as
/// much of it as fits in 1280 bytes (RFC 4443 2.4 (c)); `param` is the
/// type-specific word (the MTU of Packet Too Big, 0 for the others).
pub fn icmp6_error(
    from: Ipv6Addr,
    original: &[u8],
    icmp_type: u8,
    code: u8,
    param: u32,
) -> Vec<u8> {
    let quote = &original[..original.len().min(IPV6_MIN_MTU - IPV6_HDR_LEN - 8)];
    let to = if original.len() >= IPV6_HDR_LEN {
        addr(&original[8..])
    } else {
        Ipv6Addr::UNSPECIFIED
    };
    let mut out = Vec::with_capacity(IPV6_HDR_LEN + 8 + quote.len());
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&((8 + quote.len()) as u16).to_be_bytes());
    out.extend_from_slice(&[IPPROTO_ICMPV6, 64]);
    out.extend_from_slice(&from.octets());
    out.extend_from_slice(&to.octets());
    out.extend_from_slice(&[icmp_type, code, 0, 0]);
    out.extend_from_slice(&param.to_be_bytes());
    out.extend_from_slice(quote);
    let check = checksum6(from, to, IPPROTO_ICMPV6, &out[IPV6_HDR_LEN..]);
    out[IPV6_HDR_LEN + 2..IPV6_HDR_LEN + 4].copy_from_slice(&check.to_be_bytes());
    out
}

/// Packet Too Big (RFC 8201) from `from` to the sender of `original`,
/// announcing `mtu`.
pub fn icmp6_packet_too_big(from: Ipv6Addr, original: &[u8], mtu: u32) -> Vec<u8> {
    icmp6_error(from, original, ICMPV6_PACKET_TOO_BIG, 0, mtu)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7665, 0x696c, 0, 0, 0, 0x0a4d, 2);
    const B: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
    const GW: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7665, 0x696c, 0, 0, 0, 0x0a4d, 1);

    fn udp6(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
        let mut l4 = vec![0x9c, 0x40, 0, 53];
        l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        l4.extend_from_slice(payload);
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        p.extend_from_slice(&[17, 64]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&l4);
        p
    }

    #[test]
    fn a_udp_packet_parses_to_its_flow() {
        let info = parse6(&udp6(A, B, b"hi")).unwrap();
        assert_eq!(info.flow_key(), Some(FlowKey6::new(17, A, 40000, B, 53)));
        assert_eq!(info.hop_limit, 64);
    }

    #[test]
    fn bad_packets_are_refused() {
        let good = udp6(A, B, b"hi");
        assert_eq!(parse6(&good[..30]), Err(Packet6Error::TooShort(30)));
        let mut v4 = good.clone();
        v4[0] = 0x45;
        assert_eq!(parse6(&v4), Err(Packet6Error::NotIpv6(4)));
        assert!(matches!(
            parse6(&good[..good.len() - 1]),
            Err(Packet6Error::LengthMismatch { .. })
        ));
        let mut short = good[..44].to_vec();
        short[4..6].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(parse6(&short), Err(Packet6Error::Truncated { proto: 17 }));
    }

    #[test]
    fn an_icmp6_error_is_addressed_to_the_sender_and_checks_out() {
        let original = udp6(A, B, &[7; 2000]);
        let e = icmp6_packet_too_big(GW, &original, 1280);
        assert_eq!(e.len(), IPV6_MIN_MTU, "never longer than the minimum MTU");
        let info = parse6(&e).unwrap();
        assert_eq!((info.src, info.dst), (GW, A));
        assert_eq!(info.icmp_type, Some(ICMPV6_PACKET_TOO_BIG));
        assert_eq!(&e[44..48], &1280u32.to_be_bytes());
        assert_eq!(
            checksum6(GW, A, IPPROTO_ICMPV6, &e[40..]),
            0,
            "checksum verifies"
        );
        assert_eq!(&e[48..88], &original[..40], "the original header is quoted");
    }

    /// An IPv6 fragment of `data` at `offset` with M = `more`, id 9.
    fn fragment_of(offset: u16, more: bool, data: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[NEXT_FRAGMENT, 64]);
        p.extend_from_slice(&[0x20; 32]);
        p.extend_from_slice(&[17, 0]);
        p.extend_from_slice(&(offset | u16::from(more)).to_be_bytes());
        p.extend_from_slice(&9u32.to_be_bytes());
        p.extend_from_slice(data);
        p
    }

    #[test]
    fn a_fragment_too_large_is_cut_into_smaller_ones_of_the_same_datagram() {
        let data: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8).collect();
        for (offset, more) in [(0, true), (1448, false)] {
            let mut pieces = Vec::new();
            assert!(refragment6(&fragment_of(offset, more, &data), 1000, |p| {
                pieces.push(p.to_vec())
            }));
            assert_eq!(pieces.len(), 3);
            let mut joined = Vec::new();
            for (i, p) in pieces.iter().enumerate() {
                assert!(p.len() <= 1000);
                assert_eq!(usize::from(be16(p, 4)), p.len() - IPV6_HDR_LEN);
                assert_eq!(p[6..40], fragment_of(offset, more, &data)[6..40], "{i}");
                assert_eq!(p[40], 17);
                assert_eq!(p[44..48], 9u32.to_be_bytes(), "same identification");
                let word = be16(p, 42);
                assert_eq!(
                    usize::from(word & 0xfff8),
                    usize::from(offset) + joined.len()
                );
                let m = word & 1 == 1;
                assert_eq!(m, if i == 2 { more } else { true });
                joined.extend_from_slice(&p[48..]);
            }
            assert_eq!(joined, data);
        }
        // A whole packet, a fragment that fits no 8 bytes: left alone.
        let whole = {
            let mut p = fragment_of(0, false, &data);
            p[6] = 17;
            p
        };
        assert!(!refragment6(&whole, 1000, |_| panic!("emitted")));
        assert!(!refragment6(&fragment_of(0, true, &data), 55, |_| panic!(
            "emitted"
        )));
    }
}
