//! Client to internet over IPv6 (NAT66): the IPv6 packets the daemon
//! writes into the TUN device, from `egress::from_tunnel`.
//!
//! Like IPv4: each must belong to a flow the daemon created
//! (`VEIL_EGRESS6`); its source becomes the gateway's IPv6 address and
//! the flow's NAT port (TCP, UDP, ICMPv6 echo with the identifier as the
//! port), its hop limit is decremented (or normalised), and it leaves
//! through the WAN with `bpf_redirect_neigh`. Fragments (a fragment
//! header right after the IPv6 header) are translated as for IPv4
//! (`frag6`); other extension headers are dropped with their reason: the
//! daemon already refuses them (`check6`), this is the datapath's own
//! guard.

use aya_ebpf::programs::TcContext;
use network_types::{eth::EtherType, ip::Ipv6Hdr, tcp::TcpHdr, udp::UdpHdr};
use veil_common::{
    csum::L4Sum, frag_kind, proto, ratelimit::Direction, FlowKey6, FragKey6, Reason, IPPROTO_ICMPV6,
};

use crate::{
    egress::send_to_wan_as,
    frag::Fragment,
    frag6::{self, FRAG_HDR_LEN},
    maps::{config, config6, VEIL_EGRESS6},
    normalize::VEIL_NORMALIZE,
    packet::{Packet, ETH_LEN},
    rewrite6::{
        move_endpoint6_skb, not_translated, pull_headers6, Endpoint6, PortChange,
        ICMPV6_ECHO_REQUEST, IPV6_LEN, NH_FRAGMENT,
    },
    stats, Verdict,
};

// A call of its own beside the IPv4 path's (see main.rs).
#[inline(never)]
pub fn from_tunnel(ctx: &TcContext) -> Result<Verdict, Reason> {
    let cfg = config()?;
    // As on the IPv4 path: TUN has no link-layer header; TAP and
    // BPF_PROG_TEST_RUN have an Ethernet one.
    let l2 = match cfg.tun_l2_len {
        0 => 0,
        14 => ETH_LEN,
        _ => return Err(Reason::DropNotConfigured),
    };
    // IPv6 not configured: nothing to translate to.
    config6().ok_or(Reason::DropUnsupported)?;
    pull_headers6(ctx)?;
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let ip: *mut Ipv6Hdr = pkt.at(l2)?;
    let (next, hop, src, dst) = unsafe {
        (
            (*ip).next_hdr,
            (*ip).hop_limit,
            (*ip).src_addr,
            (*ip).dst_addr,
        )
    };
    if hop <= 1 {
        return Err(Reason::DropTtlExpired);
    }
    // A fragment header right after the IPv6 header: the first fragment
    // carries the transport header after it; later fragments follow the
    // first (`frag6`).
    let mut l4 = l2 + IPV6_LEN;
    let mut upper = next;
    let mut first = None;
    if next == NH_FRAGMENT {
        let frag = frag6::read(&pkt, l4)?;
        let key = FragKey6::new(frag_kind::EGRESS, src, dst, frag.id);
        if let Fragment::Later { last } = frag.fragment {
            let vip = frag6::egress_later(ctx, l2, l4, &key, last)?;
            crate::ratelimit::police(vip, ctx.len() - l2 as u32, Direction::Up)?;
            set_hop_limit(ctx, l2, hop)?;
            return send_to_wan6(ctx, l2, cfg.wan_ifindex);
        }
        first = Some((l4, key));
        upper = frag.next;
        l4 += FRAG_HDR_LEN;
    }
    // (kind, offset of the client's port, of the checksum, remote port, TCP
    // flags and acknowledgment)
    let (kind, port_at, check_at, remote_port, flags) = match upper {
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
        IPPROTO_ICMPV6 => {
            let icmp: *mut [u8; 8] = pkt.at(l4)?;
            if unsafe { (*icmp)[0] } != ICMPV6_ECHO_REQUEST {
                return Err(Reason::DropUnsupported);
            }
            (L4Sum::Icmp, l4 + 4, l4 + 2, [0, 0], 0)
        }
        n => return Err(not_translated(n)),
    };
    let client_port: *mut [u8; 2] = pkt.at(port_at)?;
    let client_port = unsafe { *client_port };
    let key = FlowKey6 {
        client_addr: src,
        remote_addr: dst,
        client_port: u16::from_be_bytes(client_port),
        remote_port: u16::from_be_bytes(remote_port),
        proto: upper,
        _pad: [0; 3],
    };
    let flow = VEIL_EGRESS6
        .get_ptr_mut(&key)
        .ok_or(Reason::DropNoEgressFlow)?;
    let (public_addr, nat_port, vip) =
        unsafe { ((*flow).public_addr, (*flow).nat_port, (*flow).client_vip) };
    crate::ratelimit::police(vip, ctx.len() - l2 as u32, Direction::Up)?;
    stats::touch(unsafe { &raw mut (*flow).stats }, ctx.len(), flags);
    stats::note_acked(unsafe { &raw mut (*flow).acked }, flags);
    let at = Endpoint6 {
        kind,
        addr: l2 + 8,
        port: port_at,
        l4_check: check_at,
    };
    let ports = PortChange {
        old: client_port,
        new: nat_port,
    };
    move_endpoint6_skb(ctx, &at, &src, &public_addr, &ports)?;
    if let Some((frag, key)) = first {
        frag6::egress_first(ctx, frag, &key, &public_addr, vip)?;
    }
    set_hop_limit(ctx, l2, hop)?;
    send_to_wan6(ctx, l2, cfg.wan_ifindex)
}

/// One router hop; or the configured value (`--normalize-ttl`). The hop
/// limit is covered by no checksum.
#[inline(always)]
fn set_hop_limit(ctx: &TcContext, l2: usize, hop: u8) -> Result<(), Reason> {
    let hop = match VEIL_NORMALIZE.get(0) {
        Some(n) if n.ttl != 0 => n.ttl as u8,
        _ => hop - 1,
    };
    let ip: *mut Ipv6Hdr = Packet::new(ctx.data(), ctx.data_end()).at(l2)?;
    unsafe { (*ip).hop_limit = hop };
    Ok(())
}

/// Gives the packet an Ethernet header for IPv6 and sends it out of the
/// WAN interface (`bpf_redirect_neigh` resolves the neighbour by ND).
#[inline(always)]
fn send_to_wan6(ctx: &TcContext, l2: usize, wan_ifindex: u32) -> Result<Verdict, Reason> {
    send_to_wan_as(ctx, l2, wan_ifindex, EtherType::Ipv6)
}
