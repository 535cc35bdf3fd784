//! The user-space GRO coalescer fed a sequence of (header, packet) pushes
//! and flushes derived from the input (`veil_fuzz::gro_ops`).
//!
//! Asserts, beyond "no panic", on every packet emitted:
//! - it is either an input exactly as pushed, or the merge of two or more
//!   consecutive inputs of one flow (TCP, or IPv4 UDP: at most
//!   `MAX_UDP_SEGMENTS` datagrams): the first one's headers (with its
//!   length, checksums and PSH fixed), every payload after them in order,
//!   a header that validates, and segmentation of it gives well-formed
//!   packets with correct checksums;
//! - per-flow order: a flow's inputs come out in the order they went in,
//!   and a packet whose flow is unknown (fragment, truncated) comes out
//!   only after every earlier packet between the same addresses;
//! - nothing is lost or duplicated: after the final flush every input has
//!   come out exactly once, and a second flush emits nothing.
#![no_main]

use libfuzzer_sys::{arbitrary::Unstructured, fuzz_target};
use veil_fuzz::{
    gro_ops::{Generator, Op},
    heap,
    ip::{self, assert_ipv4, assert_segmented, be16, ones_sum, pseudo_sum, pseudo_sum6},
};
use veil_proto::{
    gro::{Coalescer, MAX_MERGED_LEN, MAX_UDP_SEGMENTS},
    gso::{segment, VnetHdr, MIN_GSO_SIZE},
};

/// Inputs per run and bytes per run: enough to fill every slot to the
/// merge limit, few enough to keep runs fast.
const MAX_OPS: usize = 256;
const MAX_BYTES: usize = 512 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let mut gen = Generator::default();
    let mut tracker = Tracker::default();
    // With UDP merging (the gateway toward its datapath) or without (the
    // rest), as the input's first byte says.
    let udp = u.arbitrary::<bool>().unwrap_or(true);
    let mut gro = if udp {
        Coalescer::with_udp()
    } else {
        Coalescer::new()
    };
    tracker.udp = udp;
    // Eight slots of at most 64 KiB, twice over while growing, plus what
    // the checks copy.
    let limit = 4 << 20;
    for _ in 0..MAX_OPS {
        if tracker.bytes > MAX_BYTES {
            break;
        }
        let Some(op) = gen.next(&mut u) else { break };
        match op {
            Op::Flush => heap::bounded("flush", limit, || {
                gro.flush(|hdr, packet| tracker.emitted(hdr, packet))
            }),
            Op::Push(hdr, packet) => {
                tracker.pushing(hdr, &packet);
                heap::bounded("push", limit, || {
                    gro.push(&hdr, &packet, |hdr, packet| tracker.emitted(hdr, packet))
                });
            }
        }
    }
    gro.flush(|hdr, packet| tracker.emitted(hdr, packet));
    if let Some(lost) = tracker.inputs.iter().position(|i| !i.out) {
        panic!("input {lost} never came out");
    }
    gro.flush(|_, _| panic!("a second flush emitted a packet"));
});

// --- What must come out -------------------------------------------------

/// How `Coalescer` sorts a packet (the same rules, written again here).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Other,
    Addrs(Addrs),
    /// Addresses, ports and protocol.
    Flow(Addrs, [u8; 4], u8),
}

/// The IP version and the addresses (IPv4's padded).
type Addrs = (u8, [u8; 32]);

impl Class {
    fn of(p: &[u8], udp: bool) -> Class {
        match p.first().map(|b| b >> 4) {
            Some(4) => Self::of4(p, udp),
            Some(6) => Self::of6(p),
            _ => Class::Other,
        }
    }

    /// IPv4: TCP is a flow, and UDP when the coalescer merges it; a
    /// fragment or truncated header of either may be of any flow between
    /// its addresses.
    fn of4(p: &[u8], udp: bool) -> Class {
        if p.len() < 20 || (p[9] != ip::TCP && !(udp && p[9] == ip::UDP)) {
            return Class::Other;
        }
        let addrs = addrs(4, &p[12..20]);
        let ihl = usize::from(p[0] & 0xf) * 4;
        if ihl < 20 || be16(p, 6) & 0x3fff != 0 || p.len() < ihl + 4 {
            return Class::Addrs(addrs);
        }
        Class::Flow(addrs, p[ihl..ihl + 4].try_into().unwrap(), p[9])
    }

    /// IPv6: TCP right after the header is a flow; UDP and ICMPv6 are of
    /// none; behind an extension header it may be TCP of any flow.
    fn of6(p: &[u8]) -> Class {
        if p.len() < 40 {
            return Class::Other;
        }
        let addrs = addrs(6, &p[8..40]);
        match p[6] {
            ip::TCP if p.len() >= 44 => Class::Flow(addrs, p[40..44].try_into().unwrap(), ip::TCP),
            ip::UDP | 58 => Class::Other,
            _ => Class::Addrs(addrs),
        }
    }

    fn addrs(self) -> Option<Addrs> {
        match self {
            Class::Other => None,
            Class::Addrs(a) | Class::Flow(a, ..) => Some(a),
        }
    }
}

fn addrs(version: u8, bytes: &[u8]) -> Addrs {
    let mut a = [0; 32];
    a[..bytes.len()].copy_from_slice(bytes);
    (version, a)
}

struct Input {
    hdr: VnetHdr,
    packet: Vec<u8>,
    class: Class,
    out: bool,
}

#[derive(Default)]
struct Tracker {
    /// Whether the coalescer under test merges UDP.
    udp: bool,
    inputs: Vec<Input>,
    bytes: usize,
    scratch: Vec<u8>,
}

impl Tracker {
    fn pushing(&mut self, hdr: VnetHdr, packet: &[u8]) {
        self.bytes += packet.len();
        self.inputs.push(Input {
            hdr,
            packet: packet.to_vec(),
            class: Class::of(packet, self.udp),
            out: false,
        });
    }

    fn emitted(&mut self, hdr: &VnetHdr, packet: &[u8]) {
        let class = Class::of(packet, self.udp);
        let Class::Flow(..) = class else {
            // Never held: it is the packet being pushed, after everything
            // pending between its addresses.
            let current = self.inputs.len() - 1;
            let input = &self.inputs[current];
            assert!(
                !input.out && input.hdr == *hdr && input.packet == packet,
                "a packet of no flow came out that is not the one pushed"
            );
            if let Some(addrs) = class.addrs() {
                let ahead = self.inputs[..current]
                    .iter()
                    .position(|i| !i.out && i.class.addrs() == Some(addrs));
                assert_eq!(ahead, None, "overtook an earlier packet of its addresses");
            }
            self.inputs[current].out = true;
            return;
        };
        let pending: Vec<usize> = (0..self.inputs.len())
            .filter(|&i| !self.inputs[i].out && self.inputs[i].class == class)
            .collect();
        let Some(&first) = pending.first() else {
            panic!("a packet came out of a flow with nothing pending");
        };
        let input = &self.inputs[first];
        if input.hdr == *hdr && input.packet == packet {
            self.inputs[first].out = true;
            return;
        }
        let used = self.merged(hdr, packet, &pending);
        for &i in &pending[..used] {
            self.inputs[i].out = true;
        }
    }

    /// Checks a packet that must be the merge of the first inputs of
    /// `pending`, and returns how many it took.
    fn merged(&mut self, hdr: &VnetHdr, packet: &[u8], pending: &[usize]) -> usize {
        let first = &self.inputs[pending[0]];
        assert!(packet.len() <= MAX_MERGED_LEN);
        let v6 = packet[0] >> 4 == 6;
        if !v6 && packet[9] == ip::UDP {
            assert!(self.udp, "UDP merged by a coalescer without UDP");
            return self.merged_udp(hdr, packet, pending);
        }
        // IPv4 without options or IPv6 without extension headers.
        let ip = if v6 {
            assert_eq!(usize::from(be16(packet, 4)), packet.len() - 40);
            assert_eq!(
                packet[6],
                ip::TCP,
                "merged packets have no extension headers"
            );
            40
        } else {
            assert_eq!(assert_ipv4(packet), 20, "merged packets have no IP options");
            20
        };
        let thl = usize::from(packet[ip + 12] >> 4) * 4;
        let headers = ip + thl;
        assert_eq!(
            *hdr,
            VnetHdr {
                flags: VnetHdr::F_NEEDS_CSUM,
                gso_type: if v6 {
                    VnetHdr::GSO_TCPV6
                } else {
                    VnetHdr::GSO_TCPV4
                },
                hdr_len: headers as u16,
                gso_size: hdr.gso_size,
                csum_start: ip as u16,
                csum_offset: 16,
            },
            "header of a merged packet"
        );
        assert!(hdr.gso_size >= MIN_GSO_SIZE);
        assert_eq!(hdr.validate(packet), Ok(()));
        let pseudo = if v6 {
            pseudo_sum6(packet)
        } else {
            pseudo_sum(packet, 20)
        };
        assert_eq!(be16(packet, ip + 16), pseudo, "partial checksum");

        // The payload is the pending inputs' payloads, in order.
        let payload = &packet[headers..];
        let mut at = 0;
        let mut used = 0;
        let mut psh = false;
        while at < payload.len() {
            let Some(&i) = pending.get(used) else {
                panic!("a merged packet carries more than its flow's pending inputs");
            };
            let p = &self.inputs[i].packet;
            let plain = if v6 {
                p.len() > 60 && p[0] >> 4 == 6 && p[6] == ip::TCP
            } else {
                p.len() > 40 && p[0] == 0x45
            };
            assert!(
                plain,
                "merged input {i}, which is no plain TCP segment of its version"
            );
            let part = &p[ip + usize::from(p[ip + 12] >> 4) * 4..];
            assert!(
                payload[at..].starts_with(part),
                "merged payload differs from input {i}'s"
            );
            psh |= p[ip + 13] & ip::PSH != 0;
            at += part.len();
            used += 1;
        }
        assert!(used >= 2, "a packet came out changed but not merged");
        assert_eq!(at, payload.len());

        // The first input's headers, with what merging owns fixed.
        let f = &first.packet;
        let same = |r: std::ops::Range<usize>| packet[r.clone()] == f[r];
        if v6 {
            assert!(same(0..4) && same(6..40), "IPv6 header");
        } else {
            assert!(same(0..2) && same(4..10) && same(12..20), "IPv4 header");
        }
        assert!(same(ip..ip + 13) && same(ip + 14..ip + 16), "TCP header");
        assert!(same(ip + 18..headers), "urgent pointer and options");
        let flags = f[ip + 13] | if psh { ip::PSH } else { 0 };
        assert_eq!(packet[ip + 13], flags, "flags");

        let mut segments = Vec::new();
        segment(hdr, packet, &mut self.scratch, |s| {
            segments.push(s.to_vec())
        })
        .expect("a merged packet segments");
        assert_segmented(hdr, packet, &segments);
        if !v6 {
            assert_eq!(ones_sum(&packet[..20]), 0xffff);
        }
        used
    }

    /// [`Tracker::merged`] for IPv4 UDP: a UDP super-packet whose
    /// datagrams are the pending inputs', each of the first one's size but
    /// the last.
    fn merged_udp(&mut self, hdr: &VnetHdr, packet: &[u8], pending: &[usize]) -> usize {
        assert_eq!(assert_ipv4(packet), 20, "merged packets have no IP options");
        assert_eq!(
            *hdr,
            VnetHdr {
                flags: VnetHdr::F_NEEDS_CSUM,
                gso_type: VnetHdr::GSO_UDP_L4,
                hdr_len: 28,
                gso_size: hdr.gso_size,
                csum_start: 20,
                csum_offset: 6,
            },
            "header of a merged UDP packet"
        );
        assert!(hdr.gso_size >= MIN_GSO_SIZE);
        assert_eq!(hdr.validate(packet), Ok(()));
        assert_eq!(
            usize::from(be16(packet, 24)),
            packet.len() - 20,
            "UDP length"
        );
        assert_eq!(be16(packet, 26), pseudo_sum(packet, 20), "partial checksum");
        let payload = &packet[28..];
        let (mut at, mut used) = (0, 0);
        while at < payload.len() {
            let Some(&i) = pending.get(used) else {
                panic!("a merged packet carries more than its flow's pending inputs");
            };
            let p = &self.inputs[i].packet;
            assert!(
                p.len() > 28 && p[0] == 0x45 && p[9] == ip::UDP,
                "merged input {i}, which is no plain UDP datagram"
            );
            // What the gateway's checks read of each must be the first's:
            // TOS, DF, TTL (and, by the flow, addresses and ports).
            let f = &self.inputs[pending[0]].packet;
            assert!(
                p[1] == f[1] && p[6] & 0x40 == f[6] & 0x40 && p[8] == f[8],
                "input {i} merged with other TOS, DF or TTL"
            );
            let part = &p[28..];
            assert!(
                part.len() == usize::from(hdr.gso_size) || at + part.len() == payload.len(),
                "datagram {i} of another size, not the last"
            );
            assert!(
                payload[at..].starts_with(part),
                "merged payload differs from input {i}'s"
            );
            at += part.len();
            used += 1;
        }
        assert!(used >= 2, "a packet came out changed but not merged");
        assert!(used <= MAX_UDP_SEGMENTS, "{used} datagrams in one");
        let f = &self.inputs[pending[0]].packet;
        let same = |r: std::ops::Range<usize>| packet[r.clone()] == f[r];
        assert!(
            same(0..2) && same(4..10) && same(12..24),
            "IPv4 and UDP header"
        );
        let mut segments = Vec::new();
        segment(hdr, packet, &mut self.scratch, |s| {
            segments.push(s.to_vec())
        })
        .expect("a merged packet segments");
        assert_segmented(hdr, packet, &segments);
        assert_eq!(ones_sum(&packet[..20]), 0xffff);
        used
    }
}
