//! Internet to client: what arrives on the WAN interface (XDP).
//!
//! Packets to the public address inside the NAT port range belong to veil:
//! a reply with a reverse mapping is translated back to its client (and then
//! handed to the TUN device by `veil_wan_tc`); one without is dropped here,
//! so the kernel never answers it with a RST or a port unreachable. ICMP
//! errors about a NATed flow are translated inside and out. Everything else
//! is the host's (ssh, the tunnel listener, ARP) and passes untouched.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use network_types::{eth::EthHdr, icmp::Icmpv4Hdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use veil_common::{csum::L4Sum, proto, Config, Reason, ReverseKey};

use crate::{
    maps::{config, VEIL_REVERSE},
    packet::{Packet, Ports, ETH_LEN, ETH_P_IP, IPV4_LEN, IP_MF, IP_OFFSET},
    rewrite::{cover, move_endpoint, word, L4},
    stats, Verdict,
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMP_HDR_LEN: usize = 8;

const PASS: Verdict = Verdict {
    action: xdp_action::XDP_PASS as i32,
    reason: Reason::PassToHost,
};

#[inline(always)]
pub fn from_wan(ctx: &XdpContext) -> Result<Verdict, Reason> {
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let eth: *mut EthHdr = pkt.at(0)?;
    if unsafe { (*eth).ether_type } != ETH_P_IP.to_be() {
        return Ok(PASS);
    }
    let ip: *mut Ipv4Hdr = pkt.at(ETH_LEN)?;
    let cfg = config()?;
    let dst = unsafe { (*ip).dst_addr };
    if dst != cfg.public_addr {
        // Client addresses exist only behind the tunnel: from the WAN they
        // are forged, and `veil_wan_tc` must never hand them to a client.
        if cfg.in_vip_pool(dst) {
            return Err(Reason::DropSpoofedVip);
        }
        return Ok(PASS);
    }

    let (vihl, frags, protocol) =
        unsafe { ((*ip).vihl, u16::from_be_bytes((*ip).frags), (*ip).proto) };
    if vihl >> 4 != 4 {
        return Err(Reason::DropMalformed);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < IPV4_LEN {
        return Err(Reason::DropMalformed);
    }
    // Later fragments carry no ports: they go to the host, whose reassembly
    // never completes without the first fragment (dropped below when it is
    // ours), so nothing is answered.
    if frags & IP_OFFSET != 0 {
        return Ok(PASS);
    }
    let l4_at = ETH_LEN + ihl;
    let ours = match protocol {
        proto::TCP | proto::UDP => {
            let ports: *mut Ports = pkt.at(l4_at)?;
            cfg.in_nat_range(u16::from_be_bytes(unsafe { (*ports).dst }))
        }
        proto::ICMP => {
            let icmp: *mut Icmpv4Hdr = pkt.at(l4_at)?;
            match unsafe { (*icmp).type_ } {
                ICMP_ECHO_REPLY => cfg.in_nat_range(echo_id(icmp)),
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM => true,
                _ => false,
            }
        }
        _ => false,
    };
    if !ours {
        return Ok(PASS);
    }
    if frags & IP_MF != 0 {
        return Err(Reason::DropFragment);
    }
    if ihl != IPV4_LEN {
        return Err(Reason::DropIpOptions);
    }

    let len = (ctx.data_end() - ctx.data()) as u32;
    match protocol {
        proto::TCP => {
            let tcp: *mut TcpHdr = pkt.at(ETH_LEN + IPV4_LEN)?;
            let flags = unsafe { *(tcp as *const u8).add(13) } as u64;
            let l4 = unsafe {
                L4 {
                    kind: L4Sum::Tcp,
                    port: &raw mut (*tcp).dest,
                    check: Some(&raw mut (*tcp).check),
                }
            };
            reply(ip, &l4, unsafe { (*tcp).source }, len, flags)
        }
        proto::UDP => {
            let udp: *mut UdpHdr = pkt.at(ETH_LEN + IPV4_LEN)?;
            let l4 = unsafe {
                L4 {
                    kind: L4Sum::Udp,
                    port: &raw mut (*udp).dst,
                    check: Some(&raw mut (*udp).check),
                }
            };
            reply(ip, &l4, unsafe { (*udp).src }, len, 0)
        }
        _ => {
            let icmp: *mut Icmpv4Hdr = pkt.at(ETH_LEN + IPV4_LEN)?;
            if unsafe { (*icmp).type_ } == ICMP_ECHO_REPLY {
                let l4 = icmp_echo_l4(icmp);
                reply(ip, &l4, [0, 0], len, 0)
            } else {
                icmp_error(&pkt, cfg, ip, icmp)
            }
        }
    }
}

#[inline(always)]
fn echo_id(icmp: *mut Icmpv4Hdr) -> u16 {
    let d = unsafe { (*icmp).data };
    u16::from_be_bytes([d[0], d[1]])
}

#[inline(always)]
fn icmp_echo_l4(icmp: *mut Icmpv4Hdr) -> L4 {
    unsafe {
        L4 {
            kind: L4Sum::Icmp,
            port: (&raw mut (*icmp).data).cast(),
            check: Some(&raw mut (*icmp).check),
        }
    }
}

/// A reply on a NATed flow: back to the client's address and port.
#[inline(always)]
fn reply(
    ip: *mut Ipv4Hdr,
    l4: &L4,
    remote_port: [u8; 2],
    len: u32,
    tcp_flags: u64,
) -> Result<Verdict, Reason> {
    let key = unsafe {
        ReverseKey {
            remote_addr: (*ip).src_addr,
            remote_port: u16::from_be_bytes(remote_port),
            nat_port: u16::from_be_bytes(*l4.port),
            proto: (*ip).proto,
            _pad: [0; 3],
        }
    };
    let flow = VEIL_REVERSE
        .get_ptr_mut(&key)
        .ok_or(Reason::DropNoIngressFlow)?;
    unsafe {
        move_endpoint(
            ip,
            &raw mut (*ip).dst_addr,
            l4,
            (*flow).client_addr,
            (*flow).client_port,
        );
        stats::touch(&raw mut (*flow).stats, len, tcp_flags);
    }
    Ok(Verdict {
        action: xdp_action::XDP_PASS as i32,
        reason: Reason::IngressForwarded,
    })
}

/// An ICMP error quoting a packet veil sent: the quoted header says
/// `public:nat_port -> remote`. Both it and the outer destination go back to
/// the client, and the outer ICMP checksum follows every quoted word changed.
#[inline(always)]
fn icmp_error(
    pkt: &Packet,
    cfg: &Config,
    ip: *mut Ipv4Hdr,
    icmp: *mut Icmpv4Hdr,
) -> Result<Verdict, Reason> {
    const INNER_IP: usize = ETH_LEN + IPV4_LEN + ICMP_HDR_LEN;
    const INNER_L4: usize = INNER_IP + IPV4_LEN;
    let inner: *mut Ipv4Hdr = pkt.at(INNER_IP)?;
    let (inner_vihl, inner_src, inner_proto) =
        unsafe { ((*inner).vihl, (*inner).src_addr, (*inner).proto) };
    // About a packet the host itself sent (ssh, the tunnel): the host's.
    if inner_src != cfg.public_addr {
        return Ok(PASS);
    }
    if inner_vihl != 0x45 {
        return Err(Reason::DropIpOptions);
    }

    let (l4, remote_port) = match inner_proto {
        proto::TCP | proto::UDP => {
            let ports: *mut Ports = pkt.at(INNER_L4)?;
            // The quote holds at least 8 bytes of transport header (RFC 792):
            // UDP's checksum always, TCP's only when more was quoted.
            let check = if inner_proto == proto::UDP {
                let udp: *mut UdpHdr = pkt.at(INNER_L4)?;
                Some(unsafe { &raw mut (*udp).check })
            } else {
                pkt.at::<TcpHdr>(INNER_L4)
                    .ok()
                    .map(|tcp| unsafe { &raw mut (*tcp).check })
            };
            let kind = if inner_proto == proto::UDP {
                L4Sum::Udp
            } else {
                L4Sum::Tcp
            };
            let l4 = unsafe {
                L4 {
                    kind,
                    port: &raw mut (*ports).src,
                    check,
                }
            };
            (l4, unsafe { u16::from_be_bytes((*ports).dst) })
        }
        proto::ICMP => {
            let echo: *mut Icmpv4Hdr = pkt.at(INNER_L4)?;
            if unsafe { (*echo).type_ } != ICMP_ECHO_REQUEST {
                return Err(Reason::DropUnsupported);
            }
            (icmp_echo_l4(echo), 0)
        }
        _ => return Err(Reason::DropUnsupported),
    };

    let nat_port = u16::from_be_bytes(unsafe { *l4.port });
    if !cfg.in_nat_range(nat_port) {
        return Ok(PASS);
    }
    let key = unsafe {
        ReverseKey {
            remote_addr: (*inner).dst_addr,
            remote_port,
            nat_port,
            proto: inner_proto,
            _pad: [0; 3],
        }
    };
    let flow = VEIL_REVERSE
        .get_ptr_mut(&key)
        .ok_or(Reason::DropNoIngressFlow)?;
    unsafe {
        let client_addr = (*flow).client_addr;
        let changed = move_endpoint(
            inner,
            &raw mut (*inner).src_addr,
            &l4,
            client_addr,
            (*flow).client_port,
        );
        (*icmp).check = cover(word((*icmp).check), &changed).to_ne_bytes();
        // The outer destination: only the IP header checksum covers it.
        let old = u32::from_ne_bytes((*ip).dst_addr);
        let new = u32::from_ne_bytes(client_addr);
        (*ip).dst_addr = client_addr;
        (*ip).check = veil_common::csum::replace32(word((*ip).check), old, new).to_ne_bytes();
    }
    Ok(Verdict {
        action: xdp_action::XDP_PASS as i32,
        reason: Reason::IcmpErrorForwarded,
    })
}
