//! The user-space GRO coalescer fed a sequence of (header, packet) pushes
//! and flushes derived from the input (`veil_fuzz::gro_ops`).
//!
//! Asserts, beyond "no panic", on every packet emitted:
//! - it is either an input exactly as pushed, or the merge of two or more
//!   consecutive inputs of one flow: the first one's headers (with its
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
    ip::{self, assert_ipv4, assert_segmented, be16, ones_sum, pseudo_sum},
};
use veil_proto::{
    gro::{Coalescer, MAX_MERGED_LEN},
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
    let mut gro = Coalescer::new();
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
    Addrs([u8; 8]),
    Flow([u8; 12]),
}

impl Class {
    fn of(p: &[u8]) -> Class {
        if p.len() < 20 || p[0] >> 4 != 4 || p[9] != ip::TCP {
            return Class::Other;
        }
        let addrs: [u8; 8] = p[12..20].try_into().unwrap();
        let ihl = usize::from(p[0] & 0xf) * 4;
        if ihl < 20 || be16(p, 6) & 0x3fff != 0 || p.len() < ihl + 4 {
            return Class::Addrs(addrs);
        }
        let mut key = [0; 12];
        key[..8].copy_from_slice(&addrs);
        key[8..].copy_from_slice(&p[ihl..ihl + 4]);
        Class::Flow(key)
    }

    fn addrs(self) -> Option<[u8; 8]> {
        match self {
            Class::Other => None,
            Class::Addrs(a) => Some(a),
            Class::Flow(k) => Some(k[..8].try_into().unwrap()),
        }
    }
}

struct Input {
    hdr: VnetHdr,
    packet: Vec<u8>,
    class: Class,
    out: bool,
}

#[derive(Default)]
struct Tracker {
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
            class: Class::of(packet),
            out: false,
        });
    }

    fn emitted(&mut self, hdr: &VnetHdr, packet: &[u8]) {
        let class = Class::of(packet);
        let Class::Flow(_) = class else {
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
        assert_eq!(assert_ipv4(packet), 20, "merged packets have no IP options");
        let thl = usize::from(packet[32] >> 4) * 4;
        let headers = 20 + thl;
        assert_eq!(
            *hdr,
            VnetHdr {
                flags: VnetHdr::F_NEEDS_CSUM,
                gso_type: VnetHdr::GSO_TCPV4,
                hdr_len: headers as u16,
                gso_size: hdr.gso_size,
                csum_start: 20,
                csum_offset: 16,
            },
            "header of a merged packet"
        );
        assert!(hdr.gso_size >= MIN_GSO_SIZE);
        assert_eq!(hdr.validate(packet), Ok(()));
        assert_eq!(be16(packet, 36), pseudo_sum(packet, 20), "partial checksum");

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
            assert!(
                p.len() > 40 && p[0] == 0x45,
                "merged input {i}, which is no plain IPv4/TCP segment"
            );
            let part = &p[20 + usize::from(p[32] >> 4) * 4..];
            assert!(
                payload[at..].starts_with(part),
                "merged payload differs from input {i}'s"
            );
            psh |= p[33] & ip::PSH != 0;
            at += part.len();
            used += 1;
        }
        assert!(used >= 2, "a packet came out changed but not merged");
        assert_eq!(at, payload.len());

        // The first input's headers, with what merging owns fixed.
        let f = &first.packet;
        let same = |r: std::ops::Range<usize>| packet[r.clone()] == f[r];
        assert!(same(0..2) && same(4..10) && same(12..33) && same(34..36));
        assert!(same(38..headers), "urgent pointer and options");
        assert_eq!(packet[33], f[33] | if psh { ip::PSH } else { 0 }, "flags");

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
