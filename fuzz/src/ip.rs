//! IPv4 properties checked on everything veil emits, with an RFC 1071 sum
//! written here rather than borrowed from veil (a shared bug would hide
//! itself), and builders for the packets the seeds and the coalescer
//! target start from.

use veil_proto::gso::VnetHdr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const CWR: u8 = 0x80;

/// Ones' complement sum of `data` as big-endian words (an odd last byte
/// padded with zero), folded to 16 bits, not complemented.
pub fn ones_sum(data: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    for pair in data.chunks(2) {
        let hi = u64::from(pair[0]) << 8;
        let lo = pair.get(1).map_or(0, |&b| u64::from(b));
        sum += hi | lo;
    }
    fold(sum)
}

pub fn ones_add(a: u16, b: u16) -> u16 {
    fold(u64::from(a) + u64::from(b))
}

fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

pub fn be16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

pub fn be32(p: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

/// The pseudo-header sum of `p`'s transport segment (RFC 9293 §3.1).
pub fn pseudo_sum(p: &[u8], ihl: usize) -> u16 {
    let mut ph = p[12..20].to_vec();
    ph.extend_from_slice(&[0, p[9]]);
    ph.extend_from_slice(&((p.len() - ihl) as u16).to_be_bytes());
    ones_sum(&ph)
}

/// The IPv6 pseudo-header sum (RFC 8200 §8.1) of `p`'s TCP segment,
/// right after a 40-byte header.
pub fn pseudo_sum6(p: &[u8]) -> u16 {
    let mut ph = p[8..40].to_vec();
    ph.extend_from_slice(&((p.len() - 40) as u32).to_be_bytes());
    ph.extend_from_slice(&[0, 0, 0, p[6]]);
    ones_sum(&ph)
}

/// `p`, an IPv4 TCP packet built by [`Builder`] (its checksum partial or
/// complete), as the same TCP segment behind an IPv6 header: the IPv4
/// TOS as traffic class, TTL as hop limit, the addresses in a
/// documentation and a ULA prefix, the checksum of the same kind over the
/// IPv6 pseudo-header.
pub fn to_ipv6(p: &[u8], partial: bool) -> Vec<u8> {
    let ihl = usize::from(p[0] & 0xf) * 4;
    let l4 = &p[ihl..];
    let mut v6 = vec![0x60 | p[1] >> 4, p[1] << 4, 0, 0];
    v6.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    v6.extend_from_slice(&[p[9], p[8]]);
    v6.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0]);
    v6.extend_from_slice(&p[12..16]);
    v6.extend_from_slice(&[0xfd, 0, 0x76, 0x65, 0, 0, 0, 0, 0, 0, 0, 0]);
    v6.extend_from_slice(&p[16..20]);
    v6.extend_from_slice(l4);
    if l4.len() >= 18 && p[9] == TCP {
        v6[56..58].copy_from_slice(&[0, 0]);
        let sum = if partial {
            pseudo_sum6(&v6)
        } else {
            !ones_add(pseudo_sum6(&v6), ones_sum(&v6[40..]))
        };
        v6[56..58].copy_from_slice(&sum.to_be_bytes());
    }
    v6
}

/// Asserts that `p` is a whole, well-formed IPv4 packet: version 4, a
/// header length that fits, a total length equal to its size, a correct
/// header checksum. Returns the header length.
#[track_caller]
pub fn assert_ipv4(p: &[u8]) -> usize {
    assert!(p.len() >= 20, "IPv4 packet of {} bytes", p.len());
    assert_eq!(p[0] >> 4, 4, "IP version");
    let ihl = usize::from(p[0] & 0xf) * 4;
    assert!(ihl >= 20 && ihl <= p.len(), "IPv4 header length {ihl}");
    assert_eq!(usize::from(be16(p, 2)), p.len(), "IPv4 total length");
    assert_eq!(ones_sum(&p[..ihl]), 0xffff, "IPv4 header checksum");
    ihl
}

/// Asserts that `p`'s TCP or UDP checksum verifies over the pseudo-header.
#[track_caller]
pub fn assert_l4_checksum(p: &[u8], ihl: usize) {
    if p[9] == UDP {
        assert_ne!(be16(p, ihl + 6), 0, "UDP checksum left out");
    }
    let sum = ones_add(pseudo_sum(p, ihl), ones_sum(&p[ihl..]));
    assert_eq!(sum, 0xffff, "transport checksum");
}

/// What `veil_proto::gso::segment` must have produced from a packet whose
/// header it accepted: for a super-packet, well-formed IPv4 packets no
/// larger than it, each carrying the next `gso_size` bytes of its payload
/// behind its headers with only the fields segmentation owns changed and
/// every checksum correct; otherwise the packet itself, its checksum
/// completed if it was partial.
#[track_caller]
pub fn assert_segmented(hdr: &VnetHdr, packet: &[u8], segments: &[Vec<u8>]) {
    if !hdr.is_gso() {
        assert_eq!(segments.len(), 1, "a packet without GSO stays one packet");
        let out = &segments[0];
        assert_eq!(out.len(), packet.len());
        if hdr.flags & VnetHdr::F_NEEDS_CSUM == 0 {
            assert_eq!(out, packet, "nothing to do, nothing done");
            return;
        }
        let start = usize::from(hdr.csum_start);
        let field = start + usize::from(hdr.csum_offset);
        assert_eq!(out[..field], packet[..field]);
        assert_eq!(out[field + 2..], packet[field + 2..]);
        // What the kernel's skb_checksum_help stores: the complemented sum
        // from csum_start to the end, the field included (it holds the
        // pseudo-header sum); UDP's zero sent as 0xffff.
        let mut want = !ones_sum(&packet[start..]);
        if hdr.csum_offset == 6 && want == 0 {
            want = 0xffff;
        }
        assert_eq!(be16(out, field), want, "completed checksum");
        if (field - start) % 2 == 0 {
            // A field on a word boundary of the summed region then makes
            // the region, with the pseudo-header sum it replaced, verify.
            let partial = be16(packet, field);
            assert_eq!(ones_add(ones_sum(&out[start..]), partial), 0xffff);
        }
        return;
    }
    if packet[0] >> 4 == 6 {
        return assert_segmented6(hdr, packet, segments);
    }
    // The packet's own header checksum is not segmentation's business
    // (each segment gets a fresh one); its layout was validated.
    let ihl = usize::from(packet[0] & 0xf) * 4;
    let tcp = hdr.gso_type & !VnetHdr::GSO_ECN == VnetHdr::GSO_TCPV4;
    let l4_len = if tcp {
        usize::from(packet[ihl + 12] >> 4) * 4
    } else {
        8
    };
    let headers = ihl + l4_len;
    let payload = &packet[headers..];
    let size = usize::from(hdr.gso_size);
    assert!(size >= 1);
    let count = payload.len().div_ceil(size).max(1);
    assert_eq!(segments.len(), count, "segment count");
    for (i, seg) in segments.iter().enumerate() {
        assert!(
            seg.len() <= packet.len(),
            "a segment larger than its packet"
        );
        assert_eq!(assert_ipv4(seg), ihl, "IPv4 header length changed");
        assert_eq!(seg[9], if tcp { TCP } else { UDP }, "protocol");
        assert_eq!(be16(seg, 6) & 0x3fff, 0, "a segment is no fragment");
        assert_eq!(seg[..2], packet[..2]);
        assert_eq!(seg[6..10], packet[6..10]);
        assert_eq!(seg[12..ihl], packet[12..ihl], "addresses and options");
        assert_eq!(
            be16(seg, 4),
            be16(packet, 4).wrapping_add(i as u16),
            "IP ID of segment {i}"
        );
        let end = payload.len().min((i + 1) * size);
        assert_eq!(&seg[headers..], &payload[i * size..end], "payload of {i}");
        let (o, s) = (&packet[ihl..], &seg[ihl..]);
        if tcp {
            assert_tcp_segment(o, s, l4_len, (i, count), size);
        } else {
            assert_eq!(s[..4], o[..4], "ports");
            assert_eq!(usize::from(be16(s, 4)), s.len(), "UDP length");
        }
        assert_l4_checksum(seg, ihl);
    }
}

/// [`assert_segmented`] for a TCPv6 super-packet: IPv6 segments with the
/// payload length their own, everything else of the IPv6 header as it
/// was, and the TCP fields as for IPv4.
#[track_caller]
fn assert_segmented6(hdr: &VnetHdr, packet: &[u8], segments: &[Vec<u8>]) {
    assert_eq!(hdr.gso_type & !VnetHdr::GSO_ECN, VnetHdr::GSO_TCPV6);
    assert_eq!(packet[6], TCP, "TCPv6 only, no extension headers");
    let l4_len = usize::from(packet[40 + 12] >> 4) * 4;
    let headers = 40 + l4_len;
    let payload = &packet[headers..];
    let size = usize::from(hdr.gso_size);
    let count = payload.len().div_ceil(size).max(1);
    assert_eq!(segments.len(), count, "segment count");
    for (i, seg) in segments.iter().enumerate() {
        assert!(
            seg.len() <= packet.len(),
            "a segment larger than its packet"
        );
        assert!(seg.len() >= headers);
        assert_eq!(usize::from(be16(seg, 4)), seg.len() - 40, "payload length");
        assert_eq!(seg[..4], packet[..4], "version, class, flow label");
        assert_eq!(
            seg[6..40],
            packet[6..40],
            "next header, hop limit, addresses"
        );
        let end = payload.len().min((i + 1) * size);
        assert_eq!(&seg[headers..], &payload[i * size..end], "payload of {i}");
        assert_tcp_segment(&packet[40..], &seg[40..], l4_len, (i, count), size);
        assert_l4_checksum6(seg);
    }
}

/// The TCP header of segment `i` of `count` (`s`) against the
/// super-packet's (`o`): sequence advanced, FIN/PSH on the last only, CWR
/// on the first only, the rest unchanged.
#[track_caller]
fn assert_tcp_segment(o: &[u8], s: &[u8], l4_len: usize, (i, count): (usize, usize), size: usize) {
    assert_eq!(
        be32(s, 4),
        be32(o, 4).wrapping_add((i * size) as u32),
        "sequence number of segment {i}"
    );
    let mut flags = o[13];
    if i + 1 != count {
        flags &= !(FIN | PSH);
    }
    if i != 0 {
        flags &= !CWR;
    }
    assert_eq!(s[13], flags, "TCP flags of segment {i} of {count}");
    assert_eq!(s[..4], o[..4], "ports");
    assert_eq!(s[8..13], o[8..13], "ack and data offset");
    assert_eq!(s[14..16], o[14..16], "window");
    assert_eq!(s[18..l4_len], o[18..l4_len], "urgent pointer and options");
}

/// Asserts that the TCP checksum of IPv6 packet `p` (no extension
/// headers) verifies over the IPv6 pseudo-header (RFC 8200 §8.1).
#[track_caller]
pub fn assert_l4_checksum6(p: &[u8]) {
    let mut ph = p[8..40].to_vec();
    ph.extend_from_slice(&((p.len() - 40) as u32).to_be_bytes());
    ph.extend_from_slice(&[0, 0, 0, p[6]]);
    let sum = ones_add(ones_sum(&ph), ones_sum(&p[40..]));
    assert_eq!(sum, 0xffff, "transport checksum");
}

/// Where a sanitized header may keep a partial checksum: in the transport
/// checksum field of the packet's own protocol, right after an IPv4
/// header (TCP or UDP, not on a fragment) or a bare IPv6 one (TCP).
#[track_caller]
pub fn assert_checksum_place(hdr: &VnetHdr, pkt: &[u8]) {
    let version = pkt[0] >> 4;
    let (start, proto) = match version {
        4 => {
            assert_eq!(be16(pkt, 6) & 0x3fff, 0, "a partial checksum on a fragment");
            (usize::from(pkt[0] & 0xf) * 4, pkt[9])
        }
        6 => (40, pkt[6]),
        v => panic!("a partial checksum on IP version {v}"),
    };
    let field = match (version, proto) {
        (_, TCP) => 16,
        (4, UDP) => 6,
        (v, p) => panic!("a partial checksum left on protocol {p} over IPv{v}"),
    };
    assert_eq!(
        (usize::from(hdr.csum_start), hdr.csum_offset),
        (start, field),
        "a partial checksum outside the transport checksum field"
    );
}

/// An IPv4 packet to build: TCP (`flags` apply) or UDP.
#[derive(Clone, Debug)]
pub struct Builder {
    pub proto: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub tos: u8,
    pub ttl: u8,
    pub id: u16,
    pub df: bool,
    pub ip_options: Vec<u8>,
    pub tcp_options: Vec<u8>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            proto: TCP,
            src: [198, 18, 0, 7],
            dst: [10, 77, 0, 2],
            sport: 443,
            dport: 40000,
            seq: 1000,
            ack: 77,
            flags: ACK,
            window: 0xfff0,
            tos: 0,
            ttl: 64,
            id: 0x1234,
            df: true,
            ip_options: Vec::new(),
            tcp_options: Vec::new(),
        }
    }
}

/// Timestamps (kind 8, length 10) after two NOPs: 12 bytes.
pub const TS_OPTION: [u8; 12] = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];

impl Builder {
    pub fn tcp() -> Self {
        Builder::default()
    }

    pub fn udp() -> Self {
        Builder {
            proto: UDP,
            sport: 53,
            ..Builder::default()
        }
    }

    pub fn ihl(&self) -> usize {
        20 + self.ip_options.len()
    }

    pub fn l4_header_len(&self) -> usize {
        match self.proto {
            TCP => 20 + self.tcp_options.len(),
            UDP => 8,
            _ => 0,
        }
    }

    /// The packet with a correct IPv4 header checksum and a zero transport
    /// checksum. Options are padded to whole words; the total length
    /// field wraps for payloads past 64 KiB (the caller's business).
    pub fn raw(&self, payload: &[u8]) -> Vec<u8> {
        let mut ip_options = self.ip_options.clone();
        ip_options.resize(ip_options.len().next_multiple_of(4).min(40), 0);
        let mut tcp_options = self.tcp_options.clone();
        tcp_options.resize(tcp_options.len().next_multiple_of(4).min(40), 0);
        let ihl = 20 + ip_options.len();
        let mut p = vec![0x40 | (ihl / 4) as u8, self.tos, 0, 0];
        p.extend_from_slice(&self.id.to_be_bytes());
        p.extend_from_slice(&[
            if self.df { 0x40 } else { 0 },
            0,
            self.ttl,
            self.proto,
            0,
            0,
        ]);
        p.extend_from_slice(&self.src);
        p.extend_from_slice(&self.dst);
        p.extend_from_slice(&ip_options);
        p.extend_from_slice(&self.sport.to_be_bytes());
        p.extend_from_slice(&self.dport.to_be_bytes());
        match self.proto {
            TCP => {
                p.extend_from_slice(&self.seq.to_be_bytes());
                p.extend_from_slice(&self.ack.to_be_bytes());
                p.push((((20 + tcp_options.len()) / 4) as u8) << 4);
                p.push(self.flags);
                p.extend_from_slice(&self.window.to_be_bytes());
                p.extend_from_slice(&[0, 0, 0, 0]);
                p.extend_from_slice(&tcp_options);
            }
            _ => {
                let len = (8 + payload.len()) as u16;
                p.extend_from_slice(&len.to_be_bytes());
                p.extend_from_slice(&[0, 0]);
            }
        }
        p.extend_from_slice(payload);
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        let csum = !ones_sum(&p[..ihl]);
        p[10..12].copy_from_slice(&csum.to_be_bytes());
        p
    }

    fn csum_field(&self) -> usize {
        self.ihl() + if self.proto == TCP { 16 } else { 6 }
    }

    /// As a TUN device with offloads hands it over: the transport checksum
    /// field holds the pseudo-header sum (CHECKSUM_PARTIAL).
    pub fn partial(&self, payload: &[u8]) -> Vec<u8> {
        let mut p = self.raw(payload);
        let at = self.csum_field();
        let sum = pseudo_sum(&p, self.ihl());
        p[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        p
    }

    /// As it goes on the wire: a complete transport checksum.
    pub fn complete(&self, payload: &[u8]) -> Vec<u8> {
        let mut p = self.raw(payload);
        let at = self.csum_field();
        let ihl = self.ihl();
        let mut csum = !ones_add(pseudo_sum(&p, ihl), ones_sum(&p[ihl..]));
        if self.proto == UDP && csum == 0 {
            csum = 0xffff;
        }
        p[at..at + 2].copy_from_slice(&csum.to_be_bytes());
        p
    }

    /// The header for [`Builder::partial`]: checksum to finish and, with
    /// `gso_size`, a super-packet to cut.
    pub fn offload_hdr(&self, gso_size: Option<u16>) -> VnetHdr {
        let gso_type = match (gso_size, self.proto) {
            (None, _) => VnetHdr::GSO_NONE,
            (Some(_), TCP) => VnetHdr::GSO_TCPV4,
            (Some(_), _) => VnetHdr::GSO_UDP_L4,
        };
        VnetHdr {
            flags: VnetHdr::F_NEEDS_CSUM,
            gso_type,
            hdr_len: (self.ihl() + self.l4_header_len()) as u16,
            gso_size: gso_size.unwrap_or(0),
            csum_start: self.ihl() as u16,
            csum_offset: if self.proto == TCP { 16 } else { 6 },
        }
    }
}

/// `n` bytes of recognisable payload: `tag`, then a counter.
pub fn payload(n: usize, tag: u8) -> Vec<u8> {
    (0..n).map(|i| tag.wrapping_add(i as u8)).collect()
}

/// Header then packet, as an offload datagram carries them.
pub fn joined(hdr: &VnetHdr, packet: &[u8]) -> Vec<u8> {
    let mut v = hdr.to_bytes().to_vec();
    v.extend_from_slice(packet);
    v
}
