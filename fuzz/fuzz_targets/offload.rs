//! The offload header a peer sends: `VnetHdr::split` (what a session
//! accepts), `VnetHdr::sanitize` (what the gateway reduces it to before its
//! kernel sees it) and the software segmentation that runs on either
//! (`segment`).
//!
//! Asserts, beyond "no panic":
//! - whatever `split` accepts, `segment` takes too (same checks), within a
//!   heap bound, and produces what `veil_fuzz::ip::assert_segmented`
//!   describes: for a super-packet, well-formed IPv4 (IPv6 for TCPv6)
//!   packets no larger than it, cutting its payload in order, with correct IP and transport
//!   checksums, sequence numbers and flags; otherwise the packet itself
//!   with its partial checksum completed;
//! - `sanitize` leaves the packet alone, but for the checksum field it
//!   completes when it drops the offload; the header it returns validates
//!   against the packet and means one thing: no DATA_VALID, a partial
//!   checksum only in the transport checksum field of the packet's own
//!   protocol (and never on a fragment), and segments (cut by `segment`,
//!   well-formed as above) or the one packet it lets through no larger
//!   than the MTU it was given.
//!
//! Each input runs twice: as is, and "repaired" into a header that agrees
//! with its packet (total length, protocol, checksum place, segment size),
//! so that most inputs reach segmentation rather than stopping at the
//! first check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_fuzz::{
    heap,
    ip::{assert_checksum_place, assert_segmented},
};
use veil_proto::gso::{segment, VnetHdr, MIN_GSO_SIZE, VNET_HDR_LEN};

/// The largest packet the sanitized header may make segments of.
const MTU: usize = 1400;

fuzz_target!(|data: &[u8]| {
    check(data);
    sanitized(data);
    if let Some(repaired) = repair(data) {
        check(&repaired);
        sanitized(&repaired);
    }
});

fn check(data: &[u8]) {
    let Ok((hdr, packet)) = VnetHdr::split(data) else {
        return;
    };
    assert_eq!(hdr.to_bytes(), data[..VNET_HDR_LEN]);
    assert_eq!(packet, &data[VNET_HDR_LEN..]);
    assert_eq!(VnetHdr::peel(data), Some((hdr, packet)));
    assert_eq!(hdr.validate(packet), Ok(()));

    let mut segments = Vec::new();
    let mut scratch = Vec::new();
    // Segments of at least MIN_GSO_SIZE bytes of payload each repeat at
    // most 120 bytes of headers, so all of them together are under three
    // times the packet; the copies kept here count too.
    let limit = 8 * packet.len() + 4096;
    let count = heap::bounded("segment", limit, || {
        segment(&hdr, packet, &mut scratch, |s| segments.push(s.to_vec()))
    })
    .unwrap_or_else(|e| panic!("split accepted {hdr:?} but segment refuses it: {e}"));
    assert_eq!(count, segments.len());
    assert_segmented(&hdr, packet, &segments);
}

/// What the gateway does with a client's offload datagram before its
/// kernel trusts the header: `sanitize`.
fn sanitized(data: &[u8]) {
    let Some((head, original)) = data.split_first_chunk::<VNET_HDR_LEN>() else {
        return;
    };
    let hdr = VnetHdr::from_bytes(*head);
    let mut packet = original.to_vec();
    let Ok(clean) = hdr.sanitize(&mut packet, MTU) else {
        assert_eq!(packet, original, "a refused header changed the packet");
        return;
    };
    if packet != original {
        // Only a checksum completed where the peer asked, offload dropped.
        assert_eq!(clean, VnetHdr::NONE, "changed the packet and kept offload");
        assert_ne!(hdr.flags & VnetHdr::F_NEEDS_CSUM, 0);
        let field = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset);
        assert_eq!(packet[..field], original[..field]);
        assert_eq!(packet[field + 2..], original[field + 2..]);
    }
    assert_eq!(clean.validate(&packet), Ok(()), "{clean:?}");
    assert_eq!(clean.flags & VnetHdr::F_DATA_VALID, 0);
    if clean.flags & VnetHdr::F_NEEDS_CSUM == 0 {
        assert_eq!(clean, VnetHdr::NONE);
    } else {
        assert_checksum_place(&clean, &packet);
    }
    let mut segments = Vec::new();
    segment(&clean, &packet, &mut Vec::new(), |s| {
        segments.push(s.to_vec())
    })
    .unwrap_or_else(|e| panic!("sanitize gave {clean:?}, which segment refuses: {e}"));
    assert_segmented(&clean, &packet, &segments);
    // Cut or not, nothing longer than the MTU goes on.
    let largest = segments.iter().map(Vec::len).max().unwrap_or(0);
    assert!(largest <= MTU, "a {largest}-byte packet or segment");
}

/// `repair` for TCPv6: an IPv6 header with TCP next, the payload length
/// the packet's, the checksum in the TCP field. `false` if too short.
fn repair6(mut hdr: VnetHdr, head: &mut [u8], packet: &mut [u8], gso_type: u8) -> bool {
    if packet.len() < 60 {
        return false;
    }
    let Ok(payload_len) = u16::try_from(packet.len() - 40) else {
        return false;
    };
    packet[0] = 0x60 | (packet[0] & 0x0f);
    packet[4..6].copy_from_slice(&payload_len.to_be_bytes());
    packet[6] = 6;
    hdr.gso_type = gso_type;
    hdr.flags |= VnetHdr::F_NEEDS_CSUM;
    hdr.csum_start = 40;
    hdr.csum_offset = 16;
    hdr.hdr_len = (u32::from(hdr.hdr_len) % (u32::from(payload_len) + 41)) as u16;
    hdr.gso_size = MIN_GSO_SIZE + hdr.gso_size % 1400;
    let room = (packet.len() - 40) / 4;
    let words = usize::from(packet[52] >> 4).clamp(5, room.clamp(5, 15));
    packet[52] = (words as u8) << 4 | (packet[52] & 0x0f);
    head.copy_from_slice(&hdr.to_bytes());
    true
}

/// The input with its header made to agree with its packet, if it is long
/// enough to hold both headers.
fn repair(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < VNET_HDR_LEN + 28 {
        return None;
    }
    let mut v = data.to_vec();
    let (head, packet) = v.split_at_mut(VNET_HDR_LEN);
    let mut hdr = VnetHdr::from_bytes(head.try_into().ok()?);
    hdr.flags &= VnetHdr::F_NEEDS_CSUM | VnetHdr::F_DATA_VALID;
    let (gso_type, protocol, offset) = match hdr.gso_type % 6 {
        0 => (VnetHdr::GSO_NONE, packet[9], hdr.csum_offset % 32),
        1 => (VnetHdr::GSO_TCPV4, 6, 16),
        2 => (VnetHdr::GSO_TCPV4 | VnetHdr::GSO_ECN, 6, 16),
        3 => (VnetHdr::GSO_UDP_L4, 17, 6),
        4 => return repair6(hdr, head, packet, VnetHdr::GSO_TCPV6).then_some(v),
        _ => {
            let ecn = VnetHdr::GSO_TCPV6 | VnetHdr::GSO_ECN;
            return repair6(hdr, head, packet, ecn).then_some(v);
        }
    };
    let len = u16::try_from(packet.len()).ok()?;
    packet[0] = 0x40 | (packet[0] & 0x0f).max(5);
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    packet[2..4].copy_from_slice(&len.to_be_bytes());
    packet[6] &= 0x40; // DF may stay; no fragment
    packet[7] = 0;
    packet[9] = protocol;
    hdr.gso_type = gso_type;
    hdr.csum_start = ihl as u16;
    hdr.csum_offset = offset;
    hdr.hdr_len = (u32::from(hdr.hdr_len) % (u32::from(len) + 1)) as u16;
    if hdr.is_gso() {
        hdr.flags |= VnetHdr::F_NEEDS_CSUM;
        // At least the minimum; mostly within the MTU `sanitize` allows.
        hdr.gso_size = MIN_GSO_SIZE + hdr.gso_size % 1400;
        if protocol == 6 && packet.len() >= ihl + 13 {
            // A data offset that fits, keeping what the input chose if it does.
            let room = (packet.len() - ihl) / 4;
            let words = usize::from(packet[ihl + 12] >> 4).clamp(5, room.clamp(5, 15));
            packet[ihl + 12] = (words as u8) << 4 | (packet[ihl + 12] & 0x0f);
        }
    }
    head.copy_from_slice(&hdr.to_bytes());
    Some(v)
}
