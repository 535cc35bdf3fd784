//! Client to internet: packets the daemon writes into the TUN device.
//!
//! Each one must belong to a flow the daemon created (`VEIL_EGRESS`); it is
//! rewritten to the public address and the flow's NAT port, counted, given
//! a link-layer header and sent out of the WAN interface. `bpf_redirect_neigh`
//! resolves the next hop, so neither the kernel's forwarding path nor
//! netfilter sees the packet.

use aya_ebpf::{
    bindings::TC_ACT_REDIRECT,
    helpers::{bpf_redirect_neigh, bpf_skb_change_head},
    programs::TcContext,
};
use network_types::{
    eth::{EthHdr, EtherType},
    icmp::Icmpv4Hdr,
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};
use veil_common::{csum::L4Sum, proto, FlowKey, Reason};

use crate::{
    maps::{config, VEIL_EGRESS},
    packet::{Packet, ETH_LEN, IPV4_LEN, IP_MF, IP_OFFSET},
    rewrite::{decrement_ttl, move_endpoint, L4},
    stats, Verdict,
};

const ICMP_ECHO_REQUEST: u8 = 8;

#[inline(always)]
pub fn from_tunnel(ctx: &TcContext) -> Result<Verdict, Reason> {
    let cfg = config()?;
    // TUN is an L3 device (no link-layer header); a TAP device or
    // BPF_PROG_TEST_RUN puts an Ethernet header in front.
    let l2 = match cfg.tun_l2_len {
        0 => 0,
        14 => ETH_LEN,
        _ => return Err(Reason::DropNotConfigured),
    };
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let ip: *mut Ipv4Hdr = pkt.at(l2)?;
    let (ihl, frags, ttl, protocol) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).frags),
            (*ip).ttl,
            (*ip).proto,
        )
    };
    if ihl >> 4 != 4 {
        return Err(Reason::DropUnsupported);
    }
    if ihl & 0x0f != 5 {
        return Err(Reason::DropIpOptions);
    }
    if frags & (IP_MF | IP_OFFSET) != 0 {
        return Err(Reason::DropFragment);
    }
    if ttl <= 1 {
        return Err(Reason::DropTtlExpired);
    }

    let at = l2 + IPV4_LEN;
    let (l4, remote_port, flags) = match protocol {
        proto::TCP => {
            let tcp: *mut TcpHdr = pkt.at(at)?;
            let tcp_flags = unsafe { *(tcp as *const u8).add(13) } as u64;
            let l4 = unsafe {
                L4 {
                    kind: L4Sum::Tcp,
                    port: &raw mut (*tcp).source,
                    check: Some(&raw mut (*tcp).check),
                }
            };
            (l4, unsafe { u16::from_be_bytes((*tcp).dest) }, tcp_flags)
        }
        proto::UDP => {
            let udp: *mut UdpHdr = pkt.at(at)?;
            let l4 = unsafe {
                L4 {
                    kind: L4Sum::Udp,
                    port: &raw mut (*udp).src,
                    check: Some(&raw mut (*udp).check),
                }
            };
            (l4, unsafe { u16::from_be_bytes((*udp).dst) }, 0)
        }
        proto::ICMP => {
            let icmp: *mut Icmpv4Hdr = pkt.at(at)?;
            if unsafe { (*icmp).type_ } != ICMP_ECHO_REQUEST {
                return Err(Reason::DropUnsupported);
            }
            let l4 = unsafe {
                L4 {
                    kind: L4Sum::Icmp,
                    // The echo identifier: first half of the rest-of-header.
                    port: (&raw mut (*icmp).data).cast(),
                    check: Some(&raw mut (*icmp).check),
                }
            };
            (l4, 0, 0)
        }
        _ => return Err(Reason::DropUnsupported),
    };

    let key = unsafe {
        FlowKey {
            client_addr: (*ip).src_addr,
            remote_addr: (*ip).dst_addr,
            client_port: u16::from_be_bytes(*l4.port),
            remote_port,
            proto: protocol,
            _pad: [0; 3],
        }
    };
    let flow = VEIL_EGRESS
        .get_ptr_mut(&key)
        .ok_or(Reason::DropNoEgressFlow)?;

    unsafe {
        move_endpoint(
            ip,
            &raw mut (*ip).src_addr,
            &l4,
            cfg.public_addr,
            (*flow).nat_port,
        );
        decrement_ttl(ip);
        stats::touch(&raw mut (*flow).stats, ctx.len(), flags);
    }

    send_to_wan(ctx, l2, cfg.wan_ifindex)
}

/// Gives the packet an Ethernet header (the MACs are filled in by
/// `bpf_redirect_neigh`) and sends it out of the WAN interface.
#[inline(always)]
fn send_to_wan(ctx: &TcContext, l2: usize, wan_ifindex: u32) -> Result<Verdict, Reason> {
    if l2 == 0 && unsafe { bpf_skb_change_head(ctx.skb.skb, ETH_LEN as u32, 0) } != 0 {
        return Err(Reason::DropHelperFailed);
    }
    let eth = EthHdr {
        dst_addr: [0; 6],
        src_addr: [0; 6],
        ether_type: EtherType::Ipv4 as u16,
    };
    ctx.store(0, &eth, 0)
        .map_err(|_| Reason::DropHelperFailed)?;
    let action = unsafe { bpf_redirect_neigh(wan_ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    if action != TC_ACT_REDIRECT as i32 {
        return Err(Reason::DropHelperFailed);
    }
    Ok(Verdict {
        action,
        reason: Reason::EgressForwarded,
    })
}
