//! Test packets. They are built with etherparse and checked with a plain
//! RFC 1071 sum written here, so a checksum bug in veil's incremental
//! helpers cannot hide behind the same helper.

use std::net::Ipv4Addr;

use etherparse::PacketBuilder;

pub const ETH_LEN: usize = 14;

/// One's-complement sum of `bytes`, folded, not inverted.
pub fn ones_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Asserts that every checksum in an IPv4 packet is right, recomputing each
/// from scratch: the IP header, and TCP, UDP or ICMP over the whole packet.
/// `ip` starts at the IP header.
pub fn assert_checksums(ip: &[u8]) {
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    assert_eq!(
        ones_sum(&ip[..ihl]),
        0xffff,
        "IPv4 header checksum is wrong"
    );
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let l4 = &ip[ihl..total];
    match ip[9] {
        1 => assert_eq!(ones_sum(l4), 0xffff, "ICMP checksum is wrong"),
        proto @ (6 | 17) => {
            if proto == 17 && l4[6..8] == [0, 0] {
                return; // UDP without checksum
            }
            let mut pseudo = Vec::with_capacity(12 + l4.len());
            pseudo.extend_from_slice(&ip[12..20]);
            pseudo.extend_from_slice(&[0, proto]);
            pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            pseudo.extend_from_slice(l4);
            let name = if proto == 6 { "TCP" } else { "UDP" };
            assert_eq!(ones_sum(&pseudo), 0xffff, "{name} checksum is wrong");
        }
        p => panic!("unexpected protocol {p}"),
    }
}

/// What a test packet carries.
#[derive(Clone, Copy, Debug)]
pub enum L4<'a> {
    Udp {
        src: u16,
        dst: u16,
        payload: &'a [u8],
    },
    /// A TCP segment with the given flags (`"S"`, `"SA"`, `"A"`, `"F"`,
    /// `"R"`, `"P"`), sequence number and acknowledgment number (the
    /// latter sent with `A` only).
    Tcp {
        src: u16,
        dst: u16,
        flags: &'a str,
        seq: u32,
        ack: u32,
        payload: &'a [u8],
    },
    EchoRequest {
        id: u16,
        seq: u16,
        payload: &'a [u8],
    },
    EchoReply {
        id: u16,
        seq: u16,
        payload: &'a [u8],
    },
}

impl<'a> L4<'a> {
    pub fn udp(src: u16, dst: u16, payload: &'a [u8]) -> Self {
        L4::Udp { src, dst, payload }
    }

    /// A TCP segment numbered 1000, acknowledging 2000.
    pub fn tcp(src: u16, dst: u16, flags: &'a str, payload: &'a [u8]) -> Self {
        L4::Tcp {
            src,
            dst,
            flags,
            seq: 1000,
            ack: 2000,
            payload,
        }
    }

    /// An empty TCP segment with the sequence and acknowledgment numbers
    /// given.
    pub fn tcp_numbered(src: u16, dst: u16, flags: &'a str, seq: u32, ack: u32) -> Self {
        L4::Tcp {
            src,
            dst,
            flags,
            seq,
            ack,
            payload: b"",
        }
    }

    pub fn echo_request(id: u16, seq: u16, payload: &'a [u8]) -> Self {
        L4::EchoRequest { id, seq, payload }
    }

    pub fn echo_reply(id: u16, seq: u16, payload: &'a [u8]) -> Self {
        L4::EchoReply { id, seq, payload }
    }
}

/// An Ethernet frame (zero MACs, as veil's egress writes them) around an
/// IPv4 packet with every checksum computed by etherparse.
pub fn frame(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, l4: L4<'_>) -> Vec<u8> {
    let ip = PacketBuilder::ethernet2([0; 6], [0; 6]).ipv4(src.octets(), dst.octets(), ttl);
    write_l4(ip, l4, false)
}

/// `l4` after the IP header of `ip` (IPv6 when `v6`: ICMPv6 echo then).
pub fn write_l4(
    ip: etherparse::PacketBuilderStep<etherparse::IpHeaders>,
    l4: L4<'_>,
    v6: bool,
) -> Vec<u8> {
    let mut out = Vec::new();
    match l4 {
        L4::Udp { src, dst, payload } => ip.udp(src, dst).write(&mut out, payload),
        L4::Tcp {
            src,
            dst,
            flags,
            seq,
            ack,
            payload,
        } => {
            let mut b = ip.tcp(src, dst, seq, 64240);
            for f in flags.chars() {
                b = match f {
                    'S' => b.syn(),
                    'A' => b.ack(ack),
                    'F' => b.fin(),
                    'R' => b.rst(),
                    'P' => b.psh(),
                    other => panic!("unknown TCP flag {other}"),
                };
            }
            b.write(&mut out, payload)
        }
        L4::EchoRequest { id, seq, payload } if v6 => {
            ip.icmpv6_echo_request(id, seq).write(&mut out, payload)
        }
        L4::EchoReply { id, seq, payload } if v6 => {
            ip.icmpv6_echo_reply(id, seq).write(&mut out, payload)
        }
        L4::EchoRequest { id, seq, payload } => {
            ip.icmpv4_echo_request(id, seq).write(&mut out, payload)
        }
        L4::EchoReply { id, seq, payload } => {
            ip.icmpv4_echo_reply(id, seq).write(&mut out, payload)
        }
    }
    .expect("building a test packet");
    out
}

/// The IP packet inside a frame from [`frame`].
pub fn ip_of(frame: &[u8]) -> &[u8] {
    &frame[ETH_LEN..]
}

/// An ICMP error from `router` to `to`, quoting `quoted` (an IP packet),
/// built by hand: type, code, 4 bytes of rest-of-header, the quote.
pub fn icmp_error(
    router: Ipv4Addr,
    to: Ipv4Addr,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    quoted: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![icmp_type, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(quoted);
    let c = !ones_sum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());

    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0xc0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&router.octets());
    ip.extend_from_slice(&to.octets());
    let c = !ones_sum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());

    let mut out = vec![0u8; 12];
    out.extend_from_slice(&[0x08, 0x00]);
    out.extend_from_slice(&ip);
    out.extend_from_slice(&icmp);
    out
}

/// Rewrites the IPv4 header of `frame` in place with `f`, then recomputes
/// its checksum (for building deliberately odd packets).
pub fn edit_ip(frame: &mut Vec<u8>, f: impl FnOnce(&mut Vec<u8>)) {
    f(frame);
    let ip = &mut frame[ETH_LEN..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    ip[10] = 0;
    ip[11] = 0;
    let c = !ones_sum(&ip[..ihl]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Cuts the IPv4 packet in `frame` into fragments carrying at most `size`
/// bytes of its payload each (a multiple of 8), as a sender's kernel does:
/// the header repeated with identification `id`, DF cleared, MF and the
/// offset set, the total length and the header checksum recomputed.
pub fn fragments(frame: &[u8], id: u16, size: usize) -> Vec<Vec<u8>> {
    assert_eq!(size % 8, 0, "fragment payloads are multiples of 8 bytes");
    let ip = &frame[ETH_LEN..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let chunks: Vec<&[u8]> = ip[ihl..total].chunks(size).collect();
    assert!(chunks.len() > 1, "{total} bytes fit in one fragment");
    chunks
        .iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut f = frame[..ETH_LEN + ihl].to_vec();
            let h = &mut f[ETH_LEN..];
            h[2..4].copy_from_slice(&((ihl + chunk.len()) as u16).to_be_bytes());
            h[4..6].copy_from_slice(&id.to_be_bytes());
            let more = if i + 1 < chunks.len() { 0x2000 } else { 0 };
            let offset = (i * size / 8) as u16;
            h[6..8].copy_from_slice(&(more | offset).to_be_bytes());
            h[10..12].copy_from_slice(&[0, 0]);
            let c = !ones_sum(&h[..ihl]);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(chunk);
            f
        })
        .collect()
}
