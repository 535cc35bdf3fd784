//! The pushes and flushes the coalescer target derives from its input:
//! mostly TCP segments of four flows (two of them between the same
//! addresses) that could merge, varied in sequence, size, flags, checksum
//! state, headers and options, plus raw packets with raw headers (the
//! gateway passes its kernel's headers unchecked) and flushes. Shared with
//! the seed generator, which keeps inputs that merge.

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use veil_proto::gso::{VnetHdr, MIN_GSO_SIZE};

use crate::ip::{self, Builder};

/// The flow whose segments go as IPv6 (the others are IPv4).
const IPV6_FLOW: usize = 3;

/// The IPv4 segment `packet` (with an `ihl`-byte header) and its header
/// as the same segment over IPv6: a header [`Builder::offload_hdr`] made
/// follows the TCP header to its new place.
fn as_ipv6(hdr: VnetHdr, packet: &[u8], ihl: usize) -> (VnetHdr, Vec<u8>) {
    let made = hdr.flags & VnetHdr::F_NEEDS_CSUM != 0 && usize::from(hdr.csum_start) == ihl;
    let partial = made || hdr.flags & VnetHdr::F_DATA_VALID == 0 && hdr != VnetHdr::NONE;
    let v6 = ip::to_ipv6(packet, partial);
    if !made {
        return (hdr, v6);
    }
    let gso_type = match hdr.gso_type {
        VnetHdr::GSO_TCPV4 => VnetHdr::GSO_TCPV6,
        t => t,
    };
    let hdr = VnetHdr {
        gso_type,
        // Arbitrary headers (case 4 below) may claim a `hdr_len` short of
        // the IP header: shifted all the same, never below zero.
        hdr_len: (usize::from(hdr.hdr_len) + 40).saturating_sub(ihl) as u16,
        csum_start: 40,
        ..hdr
    };
    (hdr, v6)
}

pub enum Op {
    Push(VnetHdr, Vec<u8>),
    Flush,
}

#[derive(Default)]
pub struct Generator {
    /// Per flow: the next in-order sequence number and its segment size,
    /// once started.
    flows: [Option<(u32, usize)>; 4],
}

impl Generator {
    /// The next operation, `None` once the input is used up (from then
    /// on `Unstructured` would only repeat zeros).
    pub fn next(&mut self, u: &mut Unstructured<'_>) -> Option<Op> {
        if u.is_empty() {
            return None;
        }
        self.op(u).ok()
    }

    fn op(&mut self, u: &mut Unstructured<'_>) -> Result<Op> {
        let tag: u8 = u.arbitrary()?;
        Ok(match tag % 16 {
            0 => Op::Flush,
            1 => {
                let hdr = VnetHdr::from_bytes(u.arbitrary()?);
                let len = u.int_in_range(0..=200)?;
                Op::Push(hdr, u.bytes(len)?.to_vec())
            }
            2 => self.segment(u, true)?,
            _ => self.segment(u, false)?,
        })
    }

    fn segment(&mut self, u: &mut Unstructured<'_>, udp: bool) -> Result<Op> {
        let flow = u.int_in_range(0..=3)?;
        let mut b = if udp { Builder::udp() } else { Builder::tcp() };
        // Flows 0 and 1 share their addresses; 2 and 3 have others each.
        b.sport = 443 + flow as u16;
        b.src[3] = [7, 7, 8, 9][flow];
        let (next_seq, mss) = match self.flows[flow] {
            Some(state) => state,
            None => {
                let mss = if u.ratio(1, 8)? {
                    u.int_in_range(1..=200)?
                } else {
                    u.int_in_range(usize::from(MIN_GSO_SIZE)..=1460)?
                };
                (u.arbitrary()?, mss)
            }
        };
        let in_order = !u.ratio(1, 8)?;
        b.seq = if in_order { next_seq } else { u.arbitrary()? };
        let gso = u.ratio(1, 4)?;
        let len = match u.int_in_range(0..=7)? {
            0..=3 => mss,
            4 => u.int_in_range(1..=mss)?,
            5 => 0,
            6 if gso => mss * u.int_in_range(2..=8)?,
            _ => u.int_in_range(0..=3000)?,
        };
        b.flags = match u.int_in_range(0..=15)? {
            0..=9 => ip::ACK,
            10 | 11 => ip::ACK | ip::PSH,
            12 => ip::ACK | ip::FIN,
            13 => ip::SYN,
            14 => ip::ACK | ip::CWR,
            _ => u.arbitrary()?,
        };
        if u.ratio(1, 8)? {
            b.tcp_options = ip::TS_OPTION.to_vec();
        }
        if u.ratio(1, 16)? {
            b.ip_options = vec![1, 1, 1, 0];
        }
        if u.ratio(1, 16)? {
            b.ttl = u.arbitrary()?;
        }
        if u.ratio(1, 16)? {
            b.tos = u.arbitrary()?;
        }
        if u.ratio(1, 16)? {
            b.ack = u.arbitrary()?;
        }
        if u.ratio(1, 16)? {
            b.window = u.arbitrary()?;
        }
        if u.ratio(1, 16)? {
            b.df = !b.df;
        }
        b.id = u.arbitrary()?;
        let body = ip::payload(len, b.seq as u8);
        let (mut hdr, mut packet) = match u.int_in_range(0..=5)? {
            0 | 1 => {
                let gso_size = gso.then(|| mss.clamp(1, 65535) as u16);
                (b.offload_hdr(gso_size), b.partial(&body))
            }
            2 => (
                VnetHdr {
                    flags: VnetHdr::F_DATA_VALID,
                    ..VnetHdr::NONE
                },
                b.complete(&body),
            ),
            3 => (VnetHdr::NONE, b.complete(&body)),
            4 => (VnetHdr::from_bytes(u.arbitrary()?), b.partial(&body)),
            _ => (b.offload_hdr(None), b.partial(&body)),
        };
        if flow == IPV6_FLOW {
            (hdr, packet) = as_ipv6(hdr, &packet, b.ihl());
        }
        if u.ratio(1, 32)? {
            packet[6] |= 0x20; // more fragments
        }
        if u.ratio(1, 32)? {
            let keep = u.int_in_range(0..=packet.len())?;
            packet.truncate(keep);
        }
        if u.ratio(1, 16)? && !packet.is_empty() {
            let at = u.int_in_range(0..=packet.len() - 1)?;
            packet[at] ^= u.arbitrary::<u8>()?;
        }
        let seq = if in_order { next_seq } else { b.seq };
        self.flows[flow] = Some((seq.wrapping_add(len as u32), mss));
        Ok(Op::Push(hdr, packet))
    }
}
