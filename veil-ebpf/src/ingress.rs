//! Internet to client: what arrives on the WAN interface.
//!
//! Packets to one of the public addresses inside the NAT port range belong
//! to veil.
//! Both programs on the WAN sort packets the same way ([`classify`]):
//!
//! - XDP ([`filter`]) drops what must never reach the kernel: replies with
//!   no reverse mapping (so the kernel cannot answer them with a RST or a
//!   port unreachable), forged client addresses, options in the NAT range.
//!   The host's own traffic (ssh, the tunnel listener, ARP) passes
//!   untouched. It also notes where the first fragment of a reply goes,
//!   for the fragments after it (`frag`).
//! - TC ([`translate`]) rewrites replies back to their client and hands them
//!   to the TUN device. The rewrite is in TC because it needs the skb's
//!   checksum state (see `rewrite`), and the hand-off because XDP cannot
//!   redirect into a TUN device (EOPNOTSUPP).

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_REDIRECT},
    helpers::bpf_redirect,
    programs::{TcContext, XdpContext},
};
use network_types::{eth::EthHdr, icmp::Icmpv4Hdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use veil_common::{
    counted_flags,
    csum::L4Sum,
    proto,
    ratelimit::Direction,
    tcp_flags::{FIN, RST},
    Config, Reason, ReverseFlow, ReverseKey,
};

use crate::{
    forward,
    frag::{self, Fragment},
    maps::{config, VEIL_EGRESS, VEIL_REVERSE},
    packet::{pull_headers, Packet, Ports, ETH_LEN, ETH_P_IP, IPV4_LEN},
    rewrite::{cover, dword, move_endpoint, move_endpoint_skb, word, SkbEndpoint, L4},
    stats, Verdict,
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMP_HDR_LEN: usize = 8;

/// Offsets in a frame with a 20-byte IPv4 header (veil's paths have no
/// options: those are dropped first).
const IP: usize = ETH_LEN;
const L4_AT: usize = ETH_LEN + IPV4_LEN;
const INNER_IP: usize = L4_AT + ICMP_HDR_LEN;
const INNER_L4: usize = INNER_IP + IPV4_LEN;

/// What a WAN packet is to veil. The variants carry no fragment details
/// (`frag::datagram` reads them again where needed): a payload that only
/// some variants fill leaves registers that LLVM may still read on the
/// other paths, and the verifier refuses any read of an uninitialised
/// register.
enum Wan {
    /// Not veil's.
    Host,
    /// The first fragment of a datagram to the public address that is not
    /// veil's: the host's.
    HostFirstFragment,
    /// A reply on a (possibly) NATed flow, whole or its first fragment.
    Reply {
        key: ReverseKey,
        kind: L4Sum,
        tcp_flags: u64,
    },
    /// A fragment after the first, to the public address: veil's when its
    /// first fragment was (`frag`), the host's otherwise.
    LaterFragment,
    /// An ICMP error quoting a packet veil sent.
    IcmpError { key: ReverseKey },
}

#[inline(always)]
fn classify(pkt: &Packet, cfg: &Config) -> Result<Wan, Reason> {
    let Ok(eth) = pkt.at::<EthHdr>(0) else {
        return Ok(Wan::Host);
    };
    if unsafe { (*eth).ether_type } != ETH_P_IP.to_be() {
        return Ok(Wan::Host);
    }
    let ip: *mut Ipv4Hdr = pkt.at(IP)?;
    let (vihl, frags, protocol, src, dst) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
            (*ip).src_addr,
            (*ip).dst_addr,
        )
    };
    if !cfg.is_public(dst) {
        // Client addresses exist only behind the tunnel: from the WAN they
        // are forged.
        if cfg.in_vip_pool(dst) {
            return Err(Reason::DropSpoofedVip);
        }
        return Ok(Wan::Host);
    }
    if vihl >> 4 != 4 {
        return Err(Reason::DropMalformed);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < IPV4_LEN {
        return Err(Reason::DropMalformed);
    }
    // Later fragments carry no ports: whose they are, their first fragment
    // said.
    let fragment = Fragment::of(frags);
    if let Fragment::Later { .. } = fragment {
        return Ok(Wan::LaterFragment);
    }
    let first_fragment = fragment == Fragment::First;

    // Is it in the NAT range? Read at the real header length first.
    let at = ETH_LEN + ihl;
    let ours = match protocol {
        proto::TCP | proto::UDP => {
            let ports: *mut Ports = pkt.at(at)?;
            cfg.in_nat_range(u16::from_be_bytes(unsafe { (*ports).dst }))
        }
        proto::ICMP => {
            let icmp: *mut Icmpv4Hdr = pkt.at(at)?;
            match unsafe { (*icmp).type_ } {
                ICMP_ECHO_REPLY => cfg.in_nat_range(echo_id(icmp)),
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM => true,
                _ => false,
            }
        }
        _ => false,
    };
    if !ours {
        return Ok(if first_fragment {
            Wan::HostFirstFragment
        } else {
            Wan::Host
        });
    }
    if ihl != IPV4_LEN {
        return Err(Reason::DropIpOptions);
    }

    let reply = |kind, remote_port: [u8; 2], nat_port: [u8; 2], tcp_flags| Wan::Reply {
        key: ReverseKey {
            remote_addr: src,
            public_addr: dst,
            remote_port: u16::from_be_bytes(remote_port),
            nat_port: u16::from_be_bytes(nat_port),
            proto: protocol,
            _pad: [0; 3],
        },
        kind,
        tcp_flags,
    };
    match protocol {
        proto::TCP => {
            let tcp: *mut TcpHdr = pkt.at(L4_AT)?;
            let flags = unsafe { *(tcp as *const u8).add(13) } as u64;
            Ok(unsafe { reply(L4Sum::Tcp, (*tcp).source, (*tcp).dest, flags) })
        }
        proto::UDP => {
            let udp: *mut UdpHdr = pkt.at(L4_AT)?;
            Ok(unsafe { reply(L4Sum::Udp, (*udp).src, (*udp).dst, 0) })
        }
        _ => {
            let icmp: *mut Icmpv4Hdr = pkt.at(L4_AT)?;
            if unsafe { (*icmp).type_ } == ICMP_ECHO_REPLY {
                Ok(reply(L4Sum::Icmp, [0, 0], echo_id(icmp).to_be_bytes(), 0))
            } else if first_fragment {
                // Errors quote at most 576 bytes: one in fragments is odd,
                // and its quote is not all in the first one.
                Err(Reason::DropFragment)
            } else {
                classify_icmp_error(pkt, cfg)
            }
        }
    }
}

/// An ICMP error is veil's when it quotes `public:nat_port -> remote`, from
/// any of the public addresses.
#[inline(always)]
fn classify_icmp_error(pkt: &Packet, cfg: &Config) -> Result<Wan, Reason> {
    let inner: *mut Ipv4Hdr = pkt.at(INNER_IP)?;
    let (vihl, src, dst, protocol) = unsafe {
        (
            (*inner).vihl,
            (*inner).src_addr,
            (*inner).dst_addr,
            (*inner).proto,
        )
    };
    // About a packet the host itself sent (ssh, the tunnel): the host's.
    if !cfg.is_public(src) {
        return Ok(Wan::Host);
    }
    if vihl != 0x45 {
        return Err(Reason::DropIpOptions);
    }
    let (nat_port, remote_port) = match protocol {
        proto::TCP | proto::UDP => {
            let ports: *mut Ports = pkt.at(INNER_L4)?;
            unsafe { ((*ports).src, (*ports).dst) }
        }
        proto::ICMP => {
            let echo: *mut Icmpv4Hdr = pkt.at(INNER_L4)?;
            if unsafe { (*echo).type_ } != ICMP_ECHO_REQUEST {
                return Err(Reason::DropUnsupported);
            }
            (echo_id(echo).to_be_bytes(), [0, 0])
        }
        _ => return Err(Reason::DropUnsupported),
    };
    let nat_port = u16::from_be_bytes(nat_port);
    if !cfg.in_nat_range(nat_port) {
        return Ok(Wan::Host);
    }
    Ok(Wan::IcmpError {
        key: ReverseKey {
            remote_addr: dst,
            public_addr: src,
            remote_port: u16::from_be_bytes(remote_port),
            nat_port,
            proto: protocol,
            _pad: [0; 3],
        },
    })
}

#[inline(always)]
fn echo_id(icmp: *mut Icmpv4Hdr) -> u16 {
    let d = unsafe { (*icmp).data };
    u16::from_be_bytes([d[0], d[1]])
}

#[inline(always)]
fn flow(key: &ReverseKey) -> Result<*mut ReverseFlow, Reason> {
    VEIL_REVERSE
        .get_ptr_mut(key)
        .ok_or(Reason::DropNoIngressFlow)
}

/// The flow a reply belongs to; `None` for an echo reply without one.
///
/// Unsolicited TCP and UDP to the NAT range are dropped before the host
/// could answer them. An echo reply without a flow is the answer to the
/// host's own ping whose identifier happens to fall in the NAT range: the
/// host never answers an echo reply, so it goes to the host.
#[inline(always)]
fn reply_flow(key: &ReverseKey, kind: L4Sum) -> Result<Option<*mut ReverseFlow>, Reason> {
    match (flow(key), kind) {
        (Ok(flow), _) => Ok(Some(flow)),
        (Err(_), L4Sum::Icmp) => Ok(None),
        (Err(e), _) => Err(e),
    }
}

/// The flow of a reply to one of the clients' flows, looked up before the
/// forwarder is asked: nearly all of the WAN's traffic to the NAT range is
/// such replies, and they need none of its lookups. (A forwarded
/// connection's NAT port is never one a client's flow holds:
/// `forward::open` checks.)
#[inline(always)]
fn known_reply(wan: &Result<Wan, Reason>) -> Option<*mut ReverseFlow> {
    match wan {
        Ok(Wan::Reply { key, .. }) => flow(key).ok(),
        _ => None,
    }
}

/// What the WAN's first program decides about a packet it does not drop.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The host's: passed untouched (and counted as such).
    Host,
    /// veil's, or the forwarder's: TC translates it.
    Translate,
}

impl Admit {
    /// What the admitting program returns: the packet passes (`pass`),
    /// the host's counted here, the rest by `translate`, which finishes
    /// the job.
    #[inline(always)]
    pub fn verdict(self, pass: i32) -> Verdict {
        match self {
            Admit::Host => Verdict::counted(pass, Reason::PassToHost),
            Admit::Translate => Verdict::uncounted(pass),
        }
    }
}

/// XDP: drop early what veil must not let through; pass the rest.
// Not inlined: the IPv6 path is a call of its own beside it (see main.rs).
#[inline(never)]
pub fn filter(ctx: &XdpContext) -> Result<Verdict, Reason> {
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let ip_len = || ((ctx.data_end() - ctx.data()) as u32).saturating_sub(ETH_LEN as u32);
    Ok(admit(&pkt, config()?, ip_len)?.verdict(xdp_action::XDP_PASS as i32))
}

/// The checks that come before any translation, in XDP per packet on the
/// wire, or at the start of TC when there is no XDP program
/// (`Config::wan_filter_in_tc`). `ip_len` gives what the rate limit
/// counts, asked only where it polices.
#[inline(always)]
fn admit(pkt: &Packet, cfg: &Config, ip_len: impl Fn() -> u32) -> Result<Admit, Reason> {
    let wan = classify(pkt, cfg);
    let known = known_reply(&wan);
    if known.is_none() && forward::claims(pkt, cfg) {
        return Ok(Admit::Translate);
    }
    match wan? {
        Wan::Host => Ok(Admit::Host),
        Wan::HostFirstFragment => {
            frag::forget(&frag::datagram(pkt, IP)?.1);
            Ok(Admit::Host)
        }
        Wan::Reply { key, kind, .. } => {
            let flow = match known {
                Some(flow) => Some(flow),
                None => reply_flow(&key, kind)?,
            };
            let (fragment, frag) = frag::datagram(pkt, IP)?;
            match flow {
                Some(flow) => {
                    // In XDP, per packet on the wire rather than in TC
                    // after GRO: dropping a 64 KiB aggregate would lose
                    // 45 segments at once, and TCP backs off far below
                    // the rate (which `--wan-filter tc` accepts). IP
                    // bytes, as on the way up.
                    let client = unsafe { (*flow).client_addr };
                    crate::ratelimit::police(client, ip_len(), Direction::Down)?;
                    if fragment == Fragment::First {
                        frag::remember(&frag, unsafe { (*flow).client_addr })?;
                    }
                    Ok(Admit::Translate)
                }
                None => {
                    if fragment == Fragment::First {
                        frag::forget(&frag);
                    }
                    Ok(Admit::Host)
                }
            }
        }
        // A later fragment nobody noted is the host's, as far as anyone
        // can tell; if it was veil's, its first fragment went to a client
        // and the host's reassembly never completes, so it answers nothing.
        Wan::LaterFragment => match frag::ingress_client(&frag::datagram(pkt, IP)?.1) {
            Some(client) => {
                // Each fragment counts against the rate, as on IPv6.
                crate::ratelimit::police(client, ip_len(), Direction::Down)?;
                Ok(Admit::Translate)
            }
            None => Ok(Admit::Host),
        },
        Wan::IcmpError { key } => {
            flow(&key)?;
            Ok(Admit::Translate)
        }
    }
}

/// TC, before `translate`, when there is no XDP program in front
/// (`Config::wan_filter_in_tc`): its checks, on what GRO may have merged.
// A call of its own: inlined into `translate`, the two stacks would pass
// the 512 bytes BPF allows.
#[inline(never)]
pub fn admit_in_tc(ctx: &TcContext) -> Result<Admit, Reason> {
    let cfg = config()?;
    pull_headers(ctx)?;
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    admit(&pkt, cfg, || ctx.len().saturating_sub(ETH_LEN as u32))
}

/// TC: translate what `filter` let through and hand it to the TUN device.
// Not inlined: the IPv6 path is a call of its own beside it (see main.rs).
#[inline(never)]
pub fn translate(ctx: &TcContext) -> Result<Verdict, Reason> {
    pull_headers(ctx)?;
    let cfg = config()?;
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    // A reply on a client's flow first (see `known_reply`); the rest as the
    // forwarder leaves it.
    if let Ok(Wan::Reply {
        key,
        kind,
        tcp_flags,
    }) = classify(&pkt, cfg)
    {
        if let Ok(flow) = flow(&key) {
            reply(ctx, &pkt, flow, &key, kind, tcp_flags)?;
            let tcp = matches!(kind, L4Sum::Tcp);
            return to_tun(ctx, cfg, Reason::IngressForwarded, tcp);
        }
    }
    if let Some(verdict) = forward::translate(ctx, cfg)? {
        return Ok(verdict);
    }
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    // Whether the reply is TCP, which the GRO stage may merge.
    let mut tcp = false;
    let reason = match classify(&pkt, cfg)? {
        // Counted by `filter` already.
        Wan::Host | Wan::HostFirstFragment => return Ok(Verdict::uncounted(TC_ACT_OK as i32)),
        Wan::LaterFragment => {
            let (fragment, frag) = frag::datagram(&pkt, IP)?;
            let last = fragment == Fragment::Later { last: true };
            if !frag::ingress_later(ctx, IP, &frag, last)? {
                // The host's (counted by `filter`).
                return Ok(Verdict::uncounted(TC_ACT_OK as i32));
            }
            Reason::IngressForwarded
        }
        Wan::Reply {
            key,
            kind,
            tcp_flags,
        } => {
            let Some(flow) = reply_flow(&key, kind)? else {
                // The host's own (counted by `filter`).
                return Ok(Verdict::uncounted(TC_ACT_OK as i32));
            };
            reply(ctx, &pkt, flow, &key, kind, tcp_flags)?;
            tcp = matches!(kind, L4Sum::Tcp);
            Reason::IngressForwarded
        }
        Wan::IcmpError { key } => {
            let flow = flow(&key)?;
            icmp_error(&pkt, flow)?;
            Reason::IcmpErrorForwarded
        }
    };
    to_tun(ctx, cfg, reason, tcp)
}

/// Hands the translated packet to the TUN device: a TCP segment that
/// arrived alone through the GRO stage if there is one
/// ([`Config::reply_ifindex`]), where the kernel merges it with the rest of
/// its run; anything else straight. Already merged (the WAN's GRO, or a
/// local peer's TSO across a veth), the stage would only cut a packet up
/// and merge it again; and GRO merges nothing but TCP here, so other
/// packets (pings, DNS) would only pay the stage's hop.
#[inline(always)]
pub fn to_tun(ctx: &TcContext, cfg: &Config, reason: Reason, tcp: bool) -> Result<Verdict, Reason> {
    let merged = unsafe { (*ctx.skb.skb).gso_size } != 0;
    let to = if tcp && !merged {
        cfg.reply_ifindex
    } else {
        cfg.tun_ifindex
    };
    Ok(Verdict::counted(redirect(to)?, reason))
}

/// A reply the GRO stage's kernel merged (or passed on as it came), into
/// the TUN device. It was counted when it was translated.
pub fn from_gro_stage() -> Result<Verdict, Reason> {
    Ok(Verdict::uncounted(redirect(config()?.tun_ifindex)?))
}

/// `bpf_redirect` to `ifindex`'s egress: the action, or the drop reason if
/// the helper refused.
#[inline(always)]
fn redirect(ifindex: u32) -> Result<i32, Reason> {
    let action = unsafe { bpf_redirect(ifindex, 0) } as i32;
    if action != TC_ACT_REDIRECT as i32 {
        return Err(Reason::DropHelperFailed);
    }
    Ok(action)
}

/// The TCP flags a reply on a client's flow counts with: an RST or FIN far
/// from what the client last acknowledged ([`counted_flags`]) is left
/// out. The remote's address and the ports can be forged blind, and such
/// a packet would otherwise end the flow's NAT mapping early (a closed
/// flow expires after minutes, not hours); the client's own stack still
/// gets it, and judges it (RFC 5961).
#[inline(always)]
fn reply_flags(
    pkt: &Packet,
    key: &ReverseKey,
    client_addr: [u8; 4],
    client_port: u16,
    tcp_flags: u64,
) -> Result<u64, Reason> {
    if tcp_flags & (RST | FIN) == 0 {
        return Ok(tcp_flags);
    }
    let tcp: *mut TcpHdr = pkt.at(L4_AT)?;
    Ok(
        match VEIL_EGRESS.get_ptr(&key.client_flow(client_addr, client_port)) {
            Some(out) => counted_flags(
                tcp_flags,
                u32::from_be_bytes(unsafe { (*tcp).seq }),
                unsafe { (*out).acked },
            ),
            None => tcp_flags,
        },
    )
}

/// Translates a reply on `flow` back to its client.
#[inline(always)]
fn reply(
    ctx: &TcContext,
    pkt: &Packet,
    flow: *mut ReverseFlow,
    key: &ReverseKey,
    kind: L4Sum,
    tcp_flags: u64,
) -> Result<(), Reason> {
    let (client_addr, client_port) = unsafe { ((*flow).client_addr, (*flow).client_port) };
    let tcp_flags = reply_flags(pkt, key, client_addr, client_port, tcp_flags)?;
    stats::touch(unsafe { &raw mut (*flow).stats }, ctx.len(), tcp_flags);
    let ip: *mut Ipv4Hdr = pkt.at(IP)?;
    let old_addr = dword(unsafe { (*ip).dst_addr });
    let at = match kind {
        L4Sum::Tcp => reply_at(kind, L4_AT + 2, L4_AT + 16),
        L4Sum::Udp => reply_at(kind, L4_AT + 2, L4_AT + 6),
        L4Sum::Icmp => reply_at(kind, L4_AT + 4, L4_AT + 2),
    };
    move_endpoint_skb(
        ctx,
        &at,
        old_addr,
        word(key.nat_port.to_be_bytes()),
        client_addr,
        client_port,
    )
}

#[inline(always)]
const fn reply_at(kind: L4Sum, port: usize, l4_check: usize) -> SkbEndpoint {
    SkbEndpoint {
        kind,
        ip_check: IP + 10,
        addr: IP + 16,
        port,
        l4_check,
    }
}

/// Rewrites an ICMP error for its client: the quote back to the client's
/// own packet, the outer destination to the client. ICMP checksums are
/// always complete, so the pure helpers patch them directly.
#[inline(always)]
fn icmp_error(pkt: &Packet, flow: *mut ReverseFlow) -> Result<(), Reason> {
    let ip: *mut Ipv4Hdr = pkt.at(IP)?;
    let icmp: *mut Icmpv4Hdr = pkt.at(L4_AT)?;
    let inner: *mut Ipv4Hdr = pkt.at(INNER_IP)?;
    let inner_proto = unsafe { (*inner).proto };
    let l4 = match inner_proto {
        proto::UDP => {
            let udp: *mut UdpHdr = pkt.at(INNER_L4)?;
            unsafe {
                L4 {
                    kind: L4Sum::Udp,
                    port: &raw mut (*udp).src,
                    check: Some(&raw mut (*udp).check),
                }
            }
        }
        proto::TCP => {
            let ports: *mut Ports = pkt.at(INNER_L4)?;
            // RFC 792 promises only 8 bytes of the quoted transport header:
            // TCP's checksum is patched when it was quoted.
            let check = pkt
                .at::<TcpHdr>(INNER_L4)
                .ok()
                .map(|tcp| unsafe { &raw mut (*tcp).check });
            L4 {
                kind: L4Sum::Tcp,
                port: unsafe { &raw mut (*ports).src },
                check,
            }
        }
        _ => {
            let echo: *mut Icmpv4Hdr = pkt.at(INNER_L4)?;
            unsafe {
                L4 {
                    kind: L4Sum::Icmp,
                    port: (&raw mut (*echo).data).cast(),
                    check: Some(&raw mut (*echo).check),
                }
            }
        }
    };
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
        let old = dword((*ip).dst_addr);
        (*ip).dst_addr = client_addr;
        (*ip).check =
            veil_common::csum::replace32(word((*ip).check), old, dword(client_addr)).to_ne_bytes();
    }
    Ok(())
}
