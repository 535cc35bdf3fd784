//! [`super::Coalescer`] on IPv6 TCP: merged as IPv4 is, into TCPv6
//! super-packets that segment back into the originals.

use super::*;
use crate::gso::{segment, tests6::ones_sum};

const SRC: [u8; 16] = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const DST: [u8; 16] = [
    0xfd, 0, 0x76, 0x65, 0x69, 0x6c, 0, 0, 0, 0, 0, 0, 0x0a, 0x4d, 0, 2,
];
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
const TS_OPTION: [u8; 12] = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];

fn pseudo_header(packet: &[u8]) -> Vec<u8> {
    let mut p = packet[8..40].to_vec();
    p.extend_from_slice(&((packet.len() - 40) as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 6]);
    p
}

fn tcp_checksum_ok(packet: &[u8]) -> bool {
    let mut all = pseudo_header(packet);
    all.extend_from_slice(&packet[40..]);
    ones_sum(&all) == 0xffff
}

#[derive(Clone)]
struct Tcp6 {
    seq: u32,
    flags: u8,
    flow: [u8; 4],
    hop_limit: u8,
    sport: u16,
}

impl Tcp6 {
    fn at(seq: u32) -> Self {
        Tcp6 {
            seq,
            flags: ACK,
            flow: [0x60, 0, 0x12, 0x34],
            hop_limit: 63,
            sport: 443,
        }
    }

    /// IPv6/TCP around `payload`, the TCP checksum field holding what
    /// `csum` makes of the packet.
    fn build(&self, payload: &[u8], csum: fn(&[u8]) -> u16) -> Vec<u8> {
        let mut p = self.flow.to_vec();
        p.extend_from_slice(&((32 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[6, self.hop_limit]);
        p.extend_from_slice(&SRC);
        p.extend_from_slice(&DST);
        p.extend_from_slice(&self.sport.to_be_bytes());
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&self.seq.to_be_bytes());
        p.extend_from_slice(&77u32.to_be_bytes());
        p.extend_from_slice(&[8 << 4, self.flags, 0xff, 0xf0, 0, 0, 0, 0]);
        p.extend_from_slice(&TS_OPTION);
        p.extend_from_slice(payload);
        let c = csum(&p);
        p[56..58].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// As the kernel hands it over with NEEDS_CSUM.
    fn packet(&self, payload: &[u8]) -> Vec<u8> {
        self.build(payload, |p| ones_sum(&pseudo_header(p)))
    }

    /// As on the wire.
    fn complete(&self, payload: &[u8]) -> Vec<u8> {
        self.build(payload, |p| {
            let mut all = pseudo_header(p);
            all.extend_from_slice(&p[40..]);
            !ones_sum(&all)
        })
    }

    fn hdr(&self) -> VnetHdr {
        VnetHdr {
            flags: VnetHdr::F_NEEDS_CSUM,
            gso_type: VnetHdr::GSO_NONE,
            hdr_len: 72,
            gso_size: 0,
            csum_start: 40,
            csum_offset: 16,
        }
    }
}

fn data(len: usize, salt: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 11 + salt * 29 + 1) as u8).collect()
}

type Out = Vec<(VnetHdr, Vec<u8>)>;

fn run(inputs: &[(VnetHdr, Vec<u8>)]) -> Out {
    let mut c = Coalescer::new();
    let mut out = Vec::new();
    for (hdr, packet) in inputs {
        c.push(hdr, packet, |h, p| out.push((*h, p.to_vec())));
    }
    c.flush(|h, p| out.push((*h, p.to_vec())));
    out
}

fn resegment(hdr: &VnetHdr, packet: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    segment(hdr, packet, &mut Vec::new(), |s| out.push(s.to_vec())).unwrap();
    out
}

#[test]
fn ipv6_segments_merge_into_a_tcpv6_super_packet_and_segment_back() {
    let payloads: Vec<Vec<u8>> = (0..3).map(|i| data(1000, i)).collect();
    let mut inputs = Vec::new();
    let mut originals = Vec::new();
    for (i, payload) in payloads.iter().enumerate() {
        let mut t = Tcp6::at(5000 + 1000 * i as u32);
        if i == 2 {
            t.flags = ACK | PSH;
        }
        inputs.push((t.hdr(), t.packet(payload)));
        originals.push(t.complete(payload));
    }
    let out = run(&inputs);
    assert_eq!(out.len(), 1);
    let (hdr, packet) = &out[0];
    assert_eq!(
        *hdr,
        VnetHdr {
            flags: VnetHdr::F_NEEDS_CSUM,
            gso_type: VnetHdr::GSO_TCPV6,
            hdr_len: 72,
            gso_size: 1000,
            csum_start: 40,
            csum_offset: 16,
        }
    );
    assert_eq!(usize::from(be16(packet, 4)), packet.len() - 40);
    assert_eq!(be16(packet, 56), ones_sum(&pseudo_header(packet)));
    assert_eq!(packet[53], ACK | PSH);
    assert_eq!(hdr.validate(packet), Ok(()));
    let back = resegment(hdr, packet);
    assert!(back.iter().all(|s| tcp_checksum_ok(s)));
    assert_eq!(back, originals);
}

#[test]
fn a_different_flow_label_or_hop_limit_does_not_join() {
    let first = Tcp6::at(5000);
    let mut relabelled = Tcp6::at(6000);
    relabelled.flow = [0x60, 0, 0x56, 0x78];
    let mut hop = Tcp6::at(6000);
    hop.hop_limit = 62;
    for second in [relabelled, hop] {
        let inputs = [
            (first.hdr(), first.packet(&data(1000, 0))),
            (second.hdr(), second.packet(&data(1000, 1))),
        ];
        assert_eq!(run(&inputs), inputs.to_vec());
    }
}

#[test]
fn a_packet_behind_an_extension_header_lets_its_addresses_out_first() {
    let first = Tcp6::at(5000);
    let mut fragment = Tcp6::at(6000).packet(&data(100, 3));
    fragment[6] = 44;
    let other_flow = Tcp6 {
        sport: 444,
        ..Tcp6::at(9000)
    };
    let inputs = [
        (first.hdr(), first.packet(&data(1000, 0))),
        (VnetHdr::NONE, fragment),
        (other_flow.hdr(), other_flow.packet(&data(1000, 1))),
    ];
    assert_eq!(run(&inputs), inputs.to_vec());
}

#[test]
fn ipv4_and_ipv6_flows_with_alike_bytes_stay_apart() {
    // An IPv4 packet whose addresses are the IPv6 source's first bytes
    // and the same ports: another flow all the same.
    let v6 = Tcp6::at(5000);
    let mut v4 = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0];
    v4.extend_from_slice(&SRC[..8]);
    v4.extend_from_slice(&v6.packet(&[])[40..72]);
    v4.extend_from_slice(&data(1000, 1));
    let len = v4.len() as u16;
    v4[2..4].copy_from_slice(&len.to_be_bytes());
    set_header_checksum(&mut v4, 20);
    let hdr4 = VnetHdr {
        flags: VnetHdr::F_DATA_VALID,
        ..VnetHdr::NONE
    };
    // The IPv4 one carries the sequence number the IPv6 one would need next.
    v4[24..28].copy_from_slice(&6000u32.to_be_bytes());
    let inputs = [(v6.hdr(), v6.packet(&data(1000, 0))), (hdr4, v4)];
    let out = run(&inputs);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0], inputs[0]);
    assert_eq!(out[1], inputs[1]);
}

#[test]
fn a_tcpv4_header_on_an_ipv6_packet_is_not_merged() {
    let t = Tcp6::at(5000);
    let wrong = VnetHdr {
        gso_type: VnetHdr::GSO_TCPV4,
        gso_size: 500,
        ..t.hdr()
    };
    let next = Tcp6::at(6000);
    let inputs = [
        (wrong, t.packet(&data(1000, 0))),
        (next.hdr(), next.packet(&data(1000, 1))),
    ];
    assert_eq!(run(&inputs), inputs.to_vec());
}

#[test]
fn verified_ipv6_segments_from_a_tunnel_merge() {
    let (a, b) = (Tcp6::at(5000), Tcp6::at(6000));
    let (pa, pb) = (a.complete(&data(1000, 0)), b.complete(&data(1000, 1)));
    assert_eq!(verified(&pa).flags, VnetHdr::F_DATA_VALID);
    let out = run(&[(verified(&pa), pa.clone()), (verified(&pb), pb.clone())]);
    assert_eq!(out.len(), 1, "merged");
    assert_eq!(resegment(&out[0].0, &out[0].1).len(), 2);

    let mut corrupt = pb;
    corrupt[100] ^= 1;
    assert_eq!(verified(&corrupt), VnetHdr::NONE);
    // Cut short: the payload length no longer matches.
    assert_eq!(verified(&pa[..pa.len() - 1]), VnetHdr::NONE);
}
