//! What the gateway needs to know about a client's IPv4 packet, and the
//! ICMP errors it answers with. Pure functions over bytes, on the field
//! offsets of [`crate::ipv4`].

use std::net::{Ipv4Addr, SocketAddrV4};

use veil_common::{proto, FlowKey};

use crate::ipv4::{
    be16, pseudo_header, set_header_checksum, IPV4_MIN_HDR_LEN, IP_ADDRS, IP_CSUM, IP_FRAG,
    IP_PROTO, IP_TOTAL_LEN, IP_TTL, UDP_CSUM, UDP_HDR_LEN,
};

const ICMP_ECHO_REQUEST: u8 = 8;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("{0} bytes is too short for an IPv4 header")]
    TooShort(usize),
    #[error("IP version {0}: only IPv4 is carried")]
    NotIpv4(u8),
    #[error("IPv4 header length {0} is invalid")]
    BadHeaderLength(usize),
    #[error("IPv4 total length {total} does not match the {actual} bytes received")]
    LengthMismatch { total: usize, actual: usize },
}

/// Where a packet stands among the fragments of its IPv4 datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// Offset 0 with more fragments to come: it carries the ports.
    First,
    /// A non-zero offset: no ports. The datapath translates it as it did
    /// the first fragment, or drops it.
    Later,
}

/// The fields of an IPv4 packet that decide its fate at the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Info {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub ttl: u8,
    pub header_len: usize,
    pub fragment: Fragment,
    /// Source and destination port (TCP, UDP), or the echo identifier and 0
    /// (ICMP echo request); `None` when the packet does not carry them
    /// (a later fragment never does).
    pub ports: Option<(u16, u16)>,
}

impl Ipv4Info {
    /// The flow this packet belongs to, if the datapath translates it by
    /// its ports (whole packets and first fragments).
    pub fn flow_key(&self) -> Option<FlowKey> {
        let (sport, dport) = self.ports?;
        Some(FlowKey::new(self.proto, self.src, sport, self.dst, dport))
    }
}

pub fn parse(pkt: &[u8]) -> Result<Ipv4Info, PacketError> {
    if pkt.len() < IPV4_MIN_HDR_LEN {
        return Err(PacketError::TooShort(pkt.len()));
    }
    if pkt[0] >> 4 != 4 {
        return Err(PacketError::NotIpv4(pkt[0] >> 4));
    }
    let header_len = ((pkt[0] & 0x0f) as usize) * 4;
    if header_len < IPV4_MIN_HDR_LEN || header_len > pkt.len() {
        return Err(PacketError::BadHeaderLength(header_len));
    }
    let total = usize::from(be16(pkt, IP_TOTAL_LEN));
    if total != pkt.len() {
        return Err(PacketError::LengthMismatch {
            total,
            actual: pkt.len(),
        });
    }
    let frags = be16(pkt, IP_FRAG);
    let fragment = match (frags & 0x1fff, frags & 0x2000) {
        (0, 0) => Fragment::Whole,
        (0, _) => Fragment::First,
        _ => Fragment::Later,
    };
    let l4 = &pkt[header_len..];
    let protocol = pkt[IP_PROTO];
    let ports = match protocol {
        _ if fragment == Fragment::Later => None,
        proto::TCP | proto::UDP if l4.len() >= 8 => Some((be16(l4, 0), be16(l4, 2))),
        proto::ICMP if l4.len() >= 8 && l4[0] == ICMP_ECHO_REQUEST => Some((be16(l4, 4), 0)),
        _ => None,
    };
    Ok(Ipv4Info {
        src: addr(pkt, IP_ADDRS.start),
        dst: addr(pkt, IP_ADDRS.start + 4),
        proto: protocol,
        ttl: pkt[IP_TTL],
        header_len,
        fragment,
        ports,
    })
}

fn addr(pkt: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(pkt[at], pkt[at + 1], pkt[at + 2], pkt[at + 3])
}

/// Appends an IPv4/UDP packet from `from` to `to` carrying `payload`,
/// checksums filled in, to `out` (which may already hold, say, an offload
/// header): a DNS answer as the client's kernel expects it from the tunnel.
pub fn append_udp(out: &mut Vec<u8>, from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) {
    let at = out.len();
    let udp_len = UDP_HDR_LEN + payload.len();
    let total = IPV4_MIN_HDR_LEN + udp_len;
    out.reserve(total);
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&(total as u16).to_be_bytes());
    // ID 0 with DF: an atomic datagram (RFC 6864).
    out.extend_from_slice(&[0, 0, 0x40, 0, 64, proto::UDP, 0, 0]);
    out.extend_from_slice(&from.ip().octets());
    out.extend_from_slice(&to.ip().octets());
    out.extend_from_slice(&from.port().to_be_bytes());
    out.extend_from_slice(&to.port().to_be_bytes());
    out.extend_from_slice(&(udp_len as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    let p = &mut out[at..];
    set_header_checksum(p, IPV4_MIN_HDR_LEN);
    let mut sum = pseudo_header(p, proto::UDP, udp_len as u16);
    sum.add(&p[IPV4_MIN_HDR_LEN..]);
    let check = match sum.finish() {
        0 => 0xffff, // 0 means "no checksum" in UDP.
        c => c,
    };
    p[IPV4_MIN_HDR_LEN + UDP_CSUM..][..2].copy_from_slice(&check.to_be_bytes());
}

/// ICMP destination unreachable codes the gateway sends.
pub mod unreachable {
    /// No such host: a client address with no session.
    pub const HOST: u8 = 1;
    /// The egress policy refuses the destination (RFC 1812 §5.2.7.1).
    pub const ADMIN_PROHIBITED: u8 = 13;
}

/// Decrements the TTL of a parsed IPv4 packet (whose TTL is above 1) and
/// patches its header checksum (RFC 1624): what a router does to a packet
/// it forwards.
pub fn decrement_ttl(pkt: &mut [u8]) {
    if pkt.len() < IPV4_MIN_HDR_LEN || pkt[IP_TTL] == 0 {
        return;
    }
    // TTL and protocol share a 16-bit word of the header checksum.
    let old = be16(pkt, IP_TTL);
    pkt[IP_TTL] -= 1;
    let new = be16(pkt, IP_TTL);
    let check = veil_common::csum::replace16(be16(pkt, IP_CSUM), old, new);
    pkt[IP_CSUM..IP_CSUM + 2].copy_from_slice(&check.to_be_bytes());
}

/// An ICMP error from `from` to the sender of `original` (RFC 792),
/// quoting its header and first bytes as RFC 1812 §4.3.2.3 allows (up to
/// 576 bytes in all).
pub fn icmp_error(from: Ipv4Addr, original: &[u8], icmp_type: u8, code: u8) -> Vec<u8> {
    let quote = &original[..original.len().min(576 - 28)];
    let total = 28 + quote.len();
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&[0x45, 0xc0]);
    out.extend_from_slice(&(total as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 64, proto::ICMP, 0, 0]);
    out.extend_from_slice(&from.octets());
    out.extend_from_slice(&original[12..16]);
    let check = checksum(&out[..20]);
    out[10..12].copy_from_slice(&check.to_be_bytes());
    out.extend_from_slice(&[icmp_type, code, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(quote);
    let check = checksum(&out[20..]);
    out[22..24].copy_from_slice(&check.to_be_bytes());
    out
}

/// ICMP "fragmentation needed" (type 3 code 4, RFC 1191) from `from` to
/// the sender of `original`, announcing `mtu` as the next hop's: what a
/// router says of a packet with DF set that its next link cannot carry.
pub fn icmp_frag_needed(from: Ipv4Addr, original: &[u8], mtu: u16) -> Vec<u8> {
    let mut out = icmp_error(from, original, 3, 4);
    out[26..28].copy_from_slice(&mtu.to_be_bytes());
    out[22..24].copy_from_slice(&[0, 0]);
    let check = checksum(&out[20..]);
    out[22..24].copy_from_slice(&check.to_be_bytes());
    out
}

/// Splits an IPv4 packet without DF into fragments of at most `mtu`
/// bytes, as a router before a smaller link does (RFC 791): each gets the
/// header, its share of the payload (a multiple of 8 bytes but the last),
/// its offset and MF. A packet that is already a fragment is split
/// further with its offset and MF kept. Returns `false`, emitting nothing,
/// when the packet is not IPv4, has DF set (unless `over_df`: for a hop
/// that has no way to tell the sender), is malformed (a fragment ending
/// past 65,535 bytes among them), or `mtu` leaves no room for 8 bytes of
/// payload.
pub fn fragment(packet: &[u8], mtu: usize, over_df: bool, mut emit: impl FnMut(&[u8])) -> bool {
    if packet.len() < IPV4_MIN_HDR_LEN || packet[0] >> 4 != 4 {
        return false;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let flags_offset = be16(packet, 6);
    let df = flags_offset & 0x4000 != 0 && !over_df;
    if df
        || ihl < IPV4_MIN_HDR_LEN
        || packet.len() < ihl
        || usize::from(be16(packet, 2)) != packet.len()
    {
        return false;
    }
    let chunk = mtu.saturating_sub(ihl) / 8 * 8;
    if chunk == 0 {
        return false;
    }
    let first_offset = usize::from(flags_offset & 0x1fff) * 8;
    let more_after = flags_offset & 0x2000 != 0;
    let payload = &packet[ihl..];
    // A fragment reaching past the largest datagram: its pieces' offsets
    // would wrap the 13-bit field onto data before it.
    if first_offset + payload.len() > usize::from(u16::MAX) {
        return false;
    }
    let mut piece = Vec::with_capacity(ihl + chunk);
    for (i, part) in payload.chunks(chunk).enumerate() {
        let last = (i + 1) * chunk >= payload.len();
        let offset = (first_offset + i * chunk) / 8;
        let mf = if last { more_after } else { true };
        piece.clear();
        piece.extend_from_slice(&packet[..ihl]);
        piece.extend_from_slice(part);
        piece[2..4].copy_from_slice(&((ihl + part.len()) as u16).to_be_bytes());
        let field = (offset as u16 & 0x1fff) | if mf { 0x2000 } else { 0 };
        piece[6..8].copy_from_slice(&field.to_be_bytes());
        piece[10..12].copy_from_slice(&[0, 0]);
        let check = checksum(&piece[..ihl]);
        piece[10..12].copy_from_slice(&check.to_be_bytes());
        emit(&piece);
    }
    true
}

/// The Internet checksum (RFC 1071) of `bytes`.
pub fn checksum(bytes: &[u8]) -> u16 {
    veil_common::csum::Checksum::of(bytes)
}

#[cfg(test)]
mod fragment_tests {
    use super::*;

    fn packet(len: usize, flags: u16) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[..20].copy_from_slice(&[
            0x45, 0, 0, 0, 0x12, 0x34, 0, 0, 64, 17, 0, 0, 198, 18, 0, 2, 10, 77, 0, 2,
        ]);
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[6..8].copy_from_slice(&flags.to_be_bytes());
        for (i, b) in p[20..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        p
    }

    #[test]
    fn fragments_carry_the_payload_in_order_with_offsets_and_mf() {
        let p = packet(1500, 0);
        let mut pieces = Vec::new();
        assert!(fragment(&p, 1400, false, |f| pieces.push(f.to_vec())));
        assert_eq!(pieces.len(), 2);
        let mut payload = Vec::new();
        for (i, f) in pieces.iter().enumerate() {
            assert!(f.len() <= 1400);
            assert_eq!(usize::from(be16(f, 2)), f.len());
            assert_eq!(checksum(&f[..20]), 0);
            let field = be16(f, 6);
            assert_eq!(usize::from(field & 0x1fff) * 8, payload.len());
            assert_eq!(field & 0x2000 != 0, i == 0);
            payload.extend_from_slice(&f[20..]);
        }
        assert_eq!(payload, &p[20..]);
        // A middle fragment keeps MF on its last piece, and its offset.
        let mid = packet(1500, 0x2000 | 100);
        let mut last = Vec::new();
        assert!(fragment(&mid, 800, false, |f| last = f.to_vec()));
        assert!(be16(&last, 6) & 0x2000 != 0);
        assert!(be16(&last, 6) & 0x1fff > 100);
    }

    #[test]
    fn df_and_junk_are_not_fragmented() {
        assert!(!fragment(&packet(1500, 0x4000), 1400, false, |_| panic!()));
        assert!(!fragment(&[0x45; 10], 1400, false, |_| panic!()));
        assert!(!fragment(&packet(1500, 0), 27, false, |_| panic!()));
        // A last fragment at the largest offset whose data reaches past
        // 65,535: its second piece's offset would wrap to 146.
        assert!(!fragment(&packet(1420, 0x1fff), 1400, false, |_| panic!()));
        let mut n = 0;
        assert!(fragment(&packet(27, 0x1fff), 1400, false, |_| n += 1));
        assert_eq!(n, 1, "7 bytes at 65,528 end at 65,535");
        // Over DF when asked: DF goes, as on every fragment.
        let mut n = 0;
        assert!(fragment(&packet(1500, 0x4000), 1400, true, |f| {
            assert_eq!(be16(f, 6) & 0x4000, 0);
            n += 1;
        }));
        assert_eq!(n, 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 32, 0, 1, 0x40, 0, 64, 17, 0, 0, src[0], src[1], src[2], src[3], dst[0],
            dst[1], dst[2], dst[3], 0x9c, 0x40, 0, 53, 0, 12, 0, 0, b'a', b'b', b'c', b'd',
        ];
        let c = checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn parses_a_udp_packet_into_its_flow() {
        let p = udp([10, 77, 0, 2], [198, 18, 0, 2]);
        let info = parse(&p).unwrap();
        assert_eq!(info.ttl, 64);
        let key = info.flow_key().unwrap();
        assert_eq!(
            key,
            FlowKey::new(
                17,
                Ipv4Addr::new(10, 77, 0, 2),
                40000,
                Ipv4Addr::new(198, 18, 0, 2),
                53
            )
        );
    }

    #[test]
    fn refuses_what_is_not_a_whole_ipv4_packet() {
        let p = udp([10, 77, 0, 2], [198, 18, 0, 2]);
        assert_eq!(parse(&p[..10]), Err(PacketError::TooShort(10)));
        let mut v6 = p.clone();
        v6[0] = 0x60;
        assert_eq!(parse(&v6), Err(PacketError::NotIpv4(6)));
        let mut short = p.clone();
        short[0] = 0x44;
        assert_eq!(parse(&short), Err(PacketError::BadHeaderLength(16)));
        assert_eq!(
            parse(&p[..30]),
            Err(PacketError::LengthMismatch {
                total: 32,
                actual: 30
            })
        );
    }

    #[test]
    fn a_first_fragment_has_its_flow_and_later_ones_none() {
        let whole = udp([10, 77, 0, 2], [198, 18, 0, 2]);
        let mut first = whole.clone();
        first[6] |= 0x20; // MF
        let mut later = whole.clone();
        later[6..8].copy_from_slice(&[0x20, 0x10]); // MF, offset 128
        let mut last = whole.clone();
        last[6..8].copy_from_slice(&[0x40, 0x20]); // DF (ignored), offset 256

        assert_eq!(parse(&whole).unwrap().fragment, Fragment::Whole);
        let info = parse(&first).unwrap();
        assert_eq!(info.fragment, Fragment::First);
        assert_eq!(info.flow_key(), parse(&whole).unwrap().flow_key());
        for p in [&later, &last] {
            let info = parse(p).unwrap();
            assert_eq!(info.fragment, Fragment::Later);
            assert_eq!(info.ports, None, "bytes at the L4 offset are payload");
            assert_eq!(info.flow_key(), None);
        }
    }

    #[test]
    fn admin_prohibited_quotes_the_packet_with_valid_checksums() {
        let p = udp([10, 77, 0, 2], [10, 200, 0, 5]);
        let gw = Ipv4Addr::new(10, 77, 0, 1);
        let e = icmp_error(gw, &p, 3, unreachable::ADMIN_PROHIBITED);
        assert_eq!(e.len(), 28 + p.len());
        assert_eq!(&e[12..16], &gw.octets());
        assert_eq!(&e[16..20], &[10, 77, 0, 2], "back to the sender");
        assert_eq!((e[20], e[21]), (3, 13));
        assert_eq!(&e[28..], &p[..]);
        assert_eq!(checksum(&e[..20]), 0, "IP header checksum");
        assert_eq!(checksum(&e[20..]), 0, "ICMP checksum");
    }

    #[test]
    fn decrementing_the_ttl_keeps_the_header_checksum_right() {
        let mut pkt = vec![
            0x45, 0, 0, 20, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 10, 77, 0, 2, 10, 77, 0, 3,
        ];
        let check = checksum(&pkt);
        pkt[10..12].copy_from_slice(&check.to_be_bytes());
        decrement_ttl(&mut pkt);
        assert_eq!(pkt[8], 63);
        assert_eq!(checksum(&pkt), 0, "a valid header sums to zero");
    }

    #[test]
    fn a_udp_packet_is_appended_with_valid_checksums() {
        let from = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 53);
        let to = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 2), 40000);
        // After an offload header, as the gateway queues it.
        let mut out = vec![0xaa; 10];
        append_udp(&mut out, from, to, b"answer");
        assert_eq!(&out[..10], &[0xaa; 10], "what was there stays");
        let p = &out[10..];
        assert_eq!(p.len(), 20 + 8 + 6);
        assert_eq!(checksum(&p[..20]), 0, "IP header checksum");
        let info = parse(p).unwrap();
        assert_eq!((info.src, info.dst), (*from.ip(), *to.ip()));
        assert_eq!(info.ports, Some((53, 40000)));
        let mut pseudo = p[12..20].to_vec();
        pseudo.extend_from_slice(&[0, 17, 0, 14]);
        pseudo.extend_from_slice(&p[20..]);
        assert_eq!(checksum(&pseudo), 0, "UDP checksum");
    }
}
