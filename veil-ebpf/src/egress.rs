//! Client to internet: packets the daemon writes into the TUN device.
//!
//! Each one must belong to a flow the daemon created (`VEIL_EGRESS`); it is
//! rewritten to the flow's public address and NAT port, counted, given
//! a link-layer header and sent out of the WAN interface. `bpf_redirect_neigh`
//! resolves the next hop, so neither the kernel's forwarding path nor
//! netfilter sees the packet. A fragment after the first has no ports: it
//! follows its first fragment (`frag`).

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
use veil_common::{csum::L4Sum, proto, ratelimit::Direction, FlowKey, Reason};

use crate::{
    forward,
    frag::{self, Fragment},
    maps::{config, VEIL_EGRESS},
    packet::{pull_headers, Packet, ETH_LEN, IPV4_LEN},
    rewrite::{decrement_ttl, dword, move_endpoint_skb, word, SkbEndpoint},
    stats, Verdict,
};

const ICMP_ECHO_REQUEST: u8 = 8;

// Not inlined: the IPv6 path is a call of its own beside it (see main.rs).
#[inline(never)]
pub fn from_tunnel(ctx: &TcContext) -> Result<Verdict, Reason> {
    let cfg = config()?;
    // TUN is an L3 device (no link-layer header); a TAP device or
    // BPF_PROG_TEST_RUN puts an Ethernet header in front.
    let l2 = match cfg.tun_l2_len {
        0 => 0,
        14 => ETH_LEN,
        _ => return Err(Reason::DropNotConfigured),
    };
    pull_headers(ctx)?;
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let ip: *mut Ipv4Hdr = pkt.at(l2)?;
    let (vihl, id, frags, ttl, protocol, src, dst) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).id),
            u16::from_be_bytes((*ip).frags),
            (*ip).ttl,
            (*ip).proto,
            (*ip).src_addr,
            (*ip).dst_addr,
        )
    };
    if vihl >> 4 != 4 {
        return Err(Reason::DropUnsupported);
    }
    if vihl & 0x0f != 5 {
        return Err(Reason::DropIpOptions);
    }
    if ttl <= 1 {
        return Err(Reason::DropTtlExpired);
    }
    let fragment = Fragment::of(frags);
    if let Fragment::Later { last } = fragment {
        crate::ratelimit::police(src, ctx.len() - l2 as u32, Direction::Up)?;
        // No ports: translated as its first fragment was.
        frag::egress_later(ctx, l2, src, dst, id, protocol, last)?;
        decrement_ttl(ctx, l2, ttl, protocol)?;
        crate::normalize::outgoing(ctx, l2, ttl - 1, protocol, id, false)?;
        return send_to_wan(ctx, l2, cfg.wan_ifindex);
    }

    let l4 = l2 + IPV4_LEN;
    // (kind, offset of the client's port, of the checksum, remote port, TCP
    // flags and acknowledgment)
    let (kind, port_at, check_at, remote_port, flags) = match protocol {
        proto::TCP => {
            let tcp: *mut TcpHdr = pkt.at(l4)?;
            (
                L4Sum::Tcp,
                l4,
                l4 + 16,
                unsafe { (*tcp).dest },
                stats::flags_and_ack(tcp),
            )
        }
        proto::UDP => {
            let udp: *mut UdpHdr = pkt.at(l4)?;
            (L4Sum::Udp, l4, l4 + 6, unsafe { (*udp).dst }, 0)
        }
        proto::ICMP => {
            let icmp: *mut Icmpv4Hdr = pkt.at(l4)?;
            if unsafe { (*icmp).type_ } != ICMP_ECHO_REQUEST {
                return Err(Reason::DropUnsupported);
            }
            // The echo identifier plays the port; there is no remote port.
            (L4Sum::Icmp, l4 + 4, l4 + 2, [0, 0], 0)
        }
        _ => return Err(Reason::DropUnsupported),
    };
    let client_port: *mut [u8; 2] = pkt.at(port_at)?;
    let client_port = unsafe { *client_port };

    let key = FlowKey {
        client_addr: src,
        remote_addr: dst,
        client_port: u16::from_be_bytes(client_port),
        remote_port: u16::from_be_bytes(remote_port),
        proto: protocol,
        _pad: [0; 3],
    };
    // Clients' own flows first: they are nearly all the traffic here. A
    // packet of none may answer a forwarded connection to a client.
    let Some(flow) = VEIL_EGRESS.get_ptr_mut(&key) else {
        return match forward::from_client(ctx, cfg, l2)? {
            Some(verdict) => Ok(verdict),
            None => Err(Reason::DropNoEgressFlow),
        };
    };
    let (public_addr, nat_port) = unsafe { ((*flow).public_addr, (*flow).nat_port) };
    crate::ratelimit::police(src, ctx.len() - l2 as u32, Direction::Up)?;
    stats::touch(unsafe { &raw mut (*flow).stats }, ctx.len(), flags);
    stats::note_acked(unsafe { &raw mut (*flow).acked }, flags);

    let at = SkbEndpoint {
        kind,
        ip_check: l2 + 10,
        addr: l2 + 12,
        port: port_at,
        l4_check: check_at,
    };
    move_endpoint_skb(
        ctx,
        &at,
        dword(src),
        word(client_port),
        public_addr,
        nat_port,
    )?;
    if fragment == Fragment::First {
        frag::egress_first(ctx, l2, src, dst, id, protocol, public_addr)?;
    }
    decrement_ttl(ctx, l2, ttl, protocol)?;
    let whole = fragment == Fragment::Whole;
    crate::normalize::outgoing(ctx, l2, ttl - 1, protocol, id, whole)?;
    send_to_wan(ctx, l2, cfg.wan_ifindex)
}

/// Gives the packet an Ethernet header (the MACs are filled in by
/// `bpf_redirect_neigh`) and sends it out of the WAN interface.
#[inline(always)]
fn send_to_wan(ctx: &TcContext, l2: usize, wan_ifindex: u32) -> Result<Verdict, Reason> {
    send_to_wan_as(ctx, l2, wan_ifindex, EtherType::Ipv4)
}

/// [`send_to_wan`] for a packet of `ether_type`.
#[inline(always)]
pub fn send_to_wan_as(
    ctx: &TcContext,
    l2: usize,
    wan_ifindex: u32,
    ether_type: EtherType,
) -> Result<Verdict, Reason> {
    ethernet_header(ctx, l2, ether_type)?;
    let action = unsafe { bpf_redirect_neigh(wan_ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    if action != TC_ACT_REDIRECT as i32 {
        return Err(Reason::DropHelperFailed);
    }
    Ok(Verdict::counted(action, Reason::EgressForwarded))
}

/// Writes an Ethernet header in front of the packet, making room for it
/// when there is none (`l2` 0: a TUN device's bare IP packet), for
/// `bpf_redirect_neigh` to fill in.
#[inline(always)]
pub fn ethernet_header(ctx: &TcContext, l2: usize, ether_type: EtherType) -> Result<(), Reason> {
    if l2 == 0 && unsafe { bpf_skb_change_head(ctx.skb.skb, ETH_LEN as u32, 0) } != 0 {
        return Err(Reason::DropHelperFailed);
    }
    // Written directly: the header is linear (pulled, or just made).
    let eth: *mut EthHdr = Packet::new(ctx.data(), ctx.data_end()).at(0)?;
    unsafe {
        *eth = EthHdr {
            dst_addr: [0; 6],
            src_addr: [0; 6],
            ether_type: ether_type as u16,
        };
    }
    Ok(())
}
