//! IPv6 TCP super-packets (`GSO_TCPV6`): validation of hostile headers,
//! sanitizing, and software segmentation checked against an independent
//! checksum.

use super::*;

const SRC: [u8; 16] = [0xfd, 0, 0, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const DST: [u8; 16] = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
const CWR: u8 = 0x80;
/// Timestamps option (kind 8, length 10) padded with two NOPs to 12 bytes.
const TS_OPTION: [u8; 12] = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
/// The IPv6 header's traffic class and flow label: kept on every segment.
const FLOW: [u8; 4] = [0x60, 0x0a, 0xbc, 0xde];

// --- An independent RFC 1071 / RFC 8200 checksum ----------------------

/// Ones' complement sum of `data` as big-endian words, folded to 16 bits
/// (also what the IPv6 GRO tests check against).
pub(crate) fn ones_sum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        let lo = pair.get(1).copied().unwrap_or(0);
        sum += u32::from(u16::from_be_bytes([pair[0], lo]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn pseudo_header6(next: u8, l4_len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&SRC);
    p.extend_from_slice(&DST);
    p.extend_from_slice(&(l4_len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, next]);
    p
}

/// Whether the TCP checksum of an IPv6 packet (no extension headers)
/// verifies.
fn tcp6_checksum_ok(packet: &[u8]) -> bool {
    let mut all = pseudo_header6(6, packet.len() - 40);
    all.extend_from_slice(&packet[40..]);
    !ones_sum(&all) == 0
}

// --- Packet builders --------------------------------------------------

/// An IPv6 packet around `l4` (next header `next`).
fn ipv6(next: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = FLOW.to_vec();
    p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&SRC);
    p.extend_from_slice(&DST);
    p.extend_from_slice(l4);
    p
}

/// An IPv6/TCP packet with the partial checksum Linux leaves (the
/// pseudo-header sum, folded, not complemented).
fn tcp6_packet(seq: u32, flags: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
    let doff = (20 + options.len()) / 4;
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&40000u16.to_be_bytes());
    tcp.extend_from_slice(&443u16.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&77u32.to_be_bytes());
    tcp.push((doff as u8) << 4);
    tcp.push(flags);
    tcp.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    tcp.extend_from_slice(options);
    tcp.extend_from_slice(payload);
    let mut p = ipv6(PROTO_TCP, &tcp);
    let partial = ones_sum(&pseudo_header6(PROTO_TCP, p.len() - 40));
    p[56..58].copy_from_slice(&partial.to_be_bytes());
    p
}

fn tcp6(payload: &[u8]) -> Vec<u8> {
    tcp6_packet(1000, ACK, &TS_OPTION, payload)
}

fn gso6(gso_size: u16) -> VnetHdr {
    VnetHdr {
        flags: VnetHdr::F_NEEDS_CSUM,
        gso_type: VnetHdr::GSO_TCPV6,
        hdr_len: 72,
        gso_size,
        csum_start: 40,
        csum_offset: 16,
    }
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 13 + 5) as u8).collect()
}

fn run(hdr: &VnetHdr, packet: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let n = segment(hdr, packet, &mut Vec::new(), |p| out.push(p.to_vec())).unwrap();
    assert_eq!(n, out.len());
    out
}

fn err(hdr: &VnetHdr, packet: &[u8]) -> GsoError {
    let mut joined = hdr.to_bytes().to_vec();
    joined.extend_from_slice(packet);
    let e = VnetHdr::split(&joined).unwrap_err();
    // The same answer from every door a peer's header comes through, and
    // nothing changed on the way out.
    let mut copy = packet.to_vec();
    assert_eq!(hdr.sanitize(&mut copy, 65_535), Err(e.clone()));
    assert_eq!(copy, packet);
    assert_eq!(
        segment(hdr, packet, &mut Vec::new(), |_| {}),
        Err(e.clone())
    );
    e
}

fn be32_at(p: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

/// What a NIC would have sent for `packet` cut at `mss`: checked field by
/// field against the original.
fn assert_segments(packet: &[u8], segments: &[Vec<u8>], mss: usize) {
    let headers = 40 + usize::from(packet[52] >> 4) * 4;
    let data = &packet[headers..];
    assert_eq!(segments.len(), data.len().div_ceil(mss).max(1));
    let mut joined = Vec::new();
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        assert!(seg.len() <= headers + mss);
        assert_eq!(usize::from(be16(seg, 4)), seg.len() - 40, "payload length");
        // Version, class, flow label, next header, hop limit, addresses.
        assert_eq!(seg[..4], packet[..4]);
        assert_eq!(seg[6..40], packet[6..40]);
        assert_eq!(be32_at(seg, 44), 1000 + (i * mss) as u32, "sequence");
        let mut flags = packet[53];
        if !last {
            flags &= !(FIN | PSH);
        }
        if i != 0 {
            flags &= !CWR;
        }
        assert_eq!(seg[53], flags, "flags of segment {i}");
        // Ports, ack, window, options unchanged.
        assert_eq!(seg[40..44], packet[40..44]);
        assert_eq!(seg[48..53], packet[48..53]);
        assert_eq!(seg[54..56], packet[54..56]);
        assert_eq!(seg[58..headers], packet[58..headers]);
        assert!(tcp6_checksum_ok(seg), "checksum of segment {i}");
        joined.extend_from_slice(&seg[headers..]);
    }
    assert_eq!(joined, data);
}

// --- Segmentation -----------------------------------------------------

#[test]
fn a_tcpv6_super_packet_is_cut_as_a_nic_would() {
    let packet = tcp6_packet(1000, ACK | PSH | FIN, &TS_OPTION, &payload(4000));
    let segments = run(&gso6(1368), &packet);
    assert_eq!(segments.len(), 3);
    assert_eq!(segments[0].len(), 40 + 32 + 1368);
    assert_eq!(segments[2].len(), 40 + 32 + 4000 - 2 * 1368);
    assert_segments(&packet, &segments, 1368);
}

#[test]
fn cwr_goes_on_the_first_segment_only() {
    let packet = tcp6_packet(1000, ACK | CWR, &[], &payload(3000));
    let hdr = VnetHdr {
        gso_type: VnetHdr::GSO_TCPV6 | VnetHdr::GSO_ECN,
        hdr_len: 60,
        ..gso6(1000)
    };
    let segments = run(&hdr, &packet);
    assert_eq!(segments.len(), 3);
    assert_eq!(segments[0][53], ACK | CWR);
    assert_eq!(segments[1][53], ACK);
    assert_segments(&packet, &segments, 1000);
}

#[test]
fn an_exact_multiple_and_a_bare_header_make_the_right_count() {
    let packet = tcp6(&payload(2 * 700));
    assert_segments(&packet, &run(&gso6(700), &packet), 700);
    // A FIN alone, no payload: one packet, its checksum completed.
    let fin = tcp6_packet(1000, ACK | FIN, &TS_OPTION, &[]);
    let segments = run(&gso6(700), &fin);
    assert_eq!(segments.len(), 1);
    assert_segments(&fin, &segments, 700);
}

#[test]
fn a_partial_checksum_alone_is_completed_for_a_plain_peer() {
    let packet = tcp6(&payload(500));
    let hdr = VnetHdr {
        flags: VnetHdr::F_NEEDS_CSUM,
        csum_start: 40,
        csum_offset: 16,
        ..VnetHdr::NONE
    };
    let out = run(&hdr, &packet);
    assert_eq!(out.len(), 1);
    assert!(tcp6_checksum_ok(&out[0]));
    assert_eq!(out[0][..56], packet[..56]);
    assert_eq!(out[0][58..], packet[58..]);
}

// --- Hostile headers --------------------------------------------------

#[test]
fn tcpv6_is_a_known_type_and_takes_the_ecn_bit() {
    let packet = tcp6(&payload(3000));
    assert_eq!(gso6(1400).validate(&packet), Ok(()));
    let ecn = VnetHdr {
        gso_type: VnetHdr::GSO_TCPV6 | VnetHdr::GSO_ECN,
        ..gso6(1400)
    };
    assert!(ecn.is_gso());
    assert_eq!(ecn.validate(&packet), Ok(()));
}

#[test]
fn the_gso_type_must_match_the_ip_version() {
    let v6 = tcp6(&payload(3000));
    let as_v4 = VnetHdr {
        gso_type: VnetHdr::GSO_TCPV4,
        ..gso6(1400)
    };
    let e = err(&as_v4, &v6);
    assert_eq!(
        e,
        GsoError::NotGsoPacket {
            gso: "TCPv4",
            expected: "IPv4/TCP"
        }
    );
    // An IPv4 packet under a TCPv6 header.
    let mut v4 = ipv6(PROTO_TCP, &[0; 100]);
    v4[0] = 0x45;
    assert_eq!(
        err(&gso6(1400), &v4),
        GsoError::NotGsoPacket {
            gso: "TCPv6",
            expected: "IPv6/TCP"
        }
    );
    // UDP over IPv6 under a TCPv6 header, and UDP_L4 on IPv6 (not taken).
    let udp = ipv6(PROTO_UDP, &payload(1500));
    assert!(matches!(
        err(&gso6(1400), &udp),
        GsoError::NotGsoPacket { gso: "TCPv6", .. }
    ));
    let uso6 = VnetHdr {
        gso_type: VnetHdr::GSO_UDP_L4,
        csum_offset: 6,
        ..gso6(1400)
    };
    assert!(matches!(
        err(&uso6, &udp),
        GsoError::NotGsoPacket { gso: "UDP_L4", .. }
    ));
}

#[test]
fn short_packets_are_refused() {
    for len in [2, 20, 39] {
        let packet = &tcp6(&[])[..len];
        let hdr = VnetHdr {
            hdr_len: 0,
            csum_start: 0,
            csum_offset: 0,
            ..gso6(1400)
        };
        let e = err(&hdr, packet);
        assert!(matches!(e, GsoError::NotGsoPacket { .. }), "{len}: {e}");
    }
    // A complete IPv6 header with a TCP header cut short.
    let mut cut = tcp6(&[]);
    cut.truncate(40 + 19);
    cut[4..6].copy_from_slice(&19u16.to_be_bytes());
    let hdr = VnetHdr {
        hdr_len: 0,
        ..gso6(1400)
    };
    assert!(matches!(err(&hdr, &cut), GsoError::BadTcpHeader { .. }));
}

#[test]
fn the_payload_length_must_be_the_packets() {
    let good = tcp6(&payload(3000));
    for claimed in [0u16, 1, 3000 + 32 - 1, 3000 + 32 + 1, u16::MAX] {
        let mut packet = good.clone();
        packet[4..6].copy_from_slice(&claimed.to_be_bytes());
        let e = err(&gso6(1400), &packet);
        assert_eq!(
            e,
            GsoError::PayloadLengthMismatch {
                payload_len: claimed,
                len: 3032
            }
        );
    }
    let mut zero = good.clone();
    zero[4..6].copy_from_slice(&[0, 0]);
    assert_eq!(
        err(&gso6(1400), &zero).to_string(),
        "offload header: GSO packet's IPv6 payload length 0 differs from the 3032 bytes after its header"
    );
}

#[test]
fn extension_headers_are_refused() {
    // Hop-by-hop, routing, fragment, destination options, AH, mobility.
    for next in [0u8, 43, 44, 60, 51, 135] {
        let mut packet = tcp6(&payload(3000));
        packet[6] = next;
        let e = err(&gso6(1400), &packet);
        assert_eq!(e, GsoError::ExtensionHeader { gso: "TCPv6", next });
    }
    let mut frag = tcp6(&payload(3000));
    frag[6] = 44;
    assert_eq!(
        err(&gso6(1400), &frag).to_string(),
        "offload header: GSO type TCPv6 on an IPv6 packet with extension header 44"
    );
}

#[test]
fn the_checksum_must_be_in_the_tcp_field_after_40_bytes() {
    let packet = tcp6(&payload(3000));
    for (start, offset) in [(20, 16), (40, 6), (41, 16), (56, 0), (0, 56), (72, 0)] {
        let hdr = VnetHdr {
            csum_start: start,
            csum_offset: offset,
            ..gso6(1400)
        };
        assert_eq!(
            err(&hdr, &packet),
            GsoError::ChecksumMisplaced {
                gso: "TCPv6",
                start,
                offset,
                want_start: 40,
                want_offset: 16
            }
        );
    }
}

#[test]
fn the_tcp_header_must_fit() {
    for doff in [0u8, 4] {
        let mut packet = tcp6(&payload(100));
        packet[52] = doff << 4;
        assert_eq!(
            err(&gso6(1400), &packet),
            GsoError::BadTcpHeader {
                data_offset: doff,
                available: 132
            }
        );
    }
    // Fifteen words claimed, eight there.
    let mut packet = tcp6_packet(1000, ACK, &TS_OPTION, &[]);
    packet[52] = 15 << 4;
    assert_eq!(
        err(&gso6(1400), &packet),
        GsoError::BadTcpHeader {
            data_offset: 15,
            available: 32
        }
    );
}

#[test]
fn segment_size_and_flags_are_bounded_as_for_ipv4() {
    let packet = tcp6(&payload(3000));
    let tiny = gso6(MIN_GSO_SIZE - 1);
    assert_eq!(err(&tiny, &packet), GsoError::GsoSizeTooSmall { size: 63 });
    let no_csum = VnetHdr {
        flags: VnetHdr::F_DATA_VALID,
        ..gso6(1400)
    };
    assert_eq!(
        err(&no_csum, &packet),
        GsoError::GsoWithoutChecksum { gso: "TCPv6" }
    );
    let odd_flags = VnetHdr {
        flags: 0x81,
        ..gso6(1400)
    };
    assert_eq!(
        err(&odd_flags, &packet),
        GsoError::UnknownFlags { flags: 0x81 }
    );
}

// --- Sanitizing -------------------------------------------------------

#[test]
fn sanitize_rebuilds_a_tcpv6_header_from_the_packet() {
    let packet = tcp6(&payload(3000));
    let sloppy = VnetHdr {
        flags: VnetHdr::F_NEEDS_CSUM | VnetHdr::F_DATA_VALID,
        hdr_len: 3,
        ..gso6(1300)
    };
    let mut copy = packet.clone();
    let clean = sloppy.sanitize(&mut copy, 1400).unwrap();
    assert_eq!(copy, packet);
    assert_eq!(clean, gso6(1300));
    let ecn = VnetHdr {
        gso_type: VnetHdr::GSO_TCPV6 | VnetHdr::GSO_ECN,
        ..gso6(1000)
    };
    assert_eq!(ecn.sanitize(&mut copy, 1400).unwrap().gso_type, 0x84);
}

#[test]
fn sanitize_bounds_segments_by_the_mtu_with_the_ipv6_header() {
    let packet = tcp6(&payload(3000));
    // 1400 bytes of IP hold 1400 - 40 - 32 bytes of payload.
    let mut copy = packet.clone();
    assert!(gso6(1328).sanitize(&mut copy, 1400).is_ok());
    assert_eq!(
        gso6(1329).sanitize(&mut copy, 1400),
        Err(GsoError::GsoSizeTooLarge {
            size: 1329,
            max: 1328
        })
    );
    assert_eq!(copy, packet);
}

#[test]
fn sanitize_keeps_a_tcpv6_partial_checksum_only_in_its_field() {
    let packet = tcp6(&payload(600));
    let in_place = VnetHdr {
        flags: VnetHdr::F_NEEDS_CSUM,
        csum_start: 40,
        csum_offset: 16,
        hdr_len: 9,
        ..VnetHdr::NONE
    };
    let mut copy = packet.clone();
    let clean = in_place.sanitize(&mut copy, 1400).unwrap();
    assert_eq!(copy, packet);
    assert_eq!(
        clean,
        VnetHdr {
            hdr_len: 72,
            ..in_place
        }
    );
    // Anywhere else (here: over the source port) it is completed where
    // asked and the packet goes on plain.
    let elsewhere = VnetHdr {
        csum_start: 40,
        csum_offset: 0,
        ..in_place
    };
    let mut copy = packet.clone();
    assert_eq!(elsewhere.sanitize(&mut copy, 1400), Ok(VnetHdr::NONE));
    assert_eq!(copy[..40], packet[..40]);
    assert_eq!(copy[42..], packet[42..]);
    // IPv6 UDP: completed too, never passed on as partial.
    let udp = ipv6(PROTO_UDP, &payload(200));
    let mut copy = udp.clone();
    let hdr = VnetHdr {
        csum_offset: 6,
        ..in_place
    };
    assert_eq!(hdr.sanitize(&mut copy, 1400), Ok(VnetHdr::NONE));
}
