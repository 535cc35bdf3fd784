//! Internet to client over IPv6: what arrives on the WAN interface with
//! EtherType IPv6, from `ingress::filter` (XDP) and `ingress::translate`
//! (TC). The same split as IPv4:
//!
//! - XDP ([`filter`]) drops packets to the gateway's IPv6 address in the
//!   NAT range with no reverse mapping (`drop_no_ingress_flow6`: the
//!   kernel never answers them), packets addressed into the clients' IPv6
//!   prefix (`drop_spoofed_v6`), and veil's packets carrying extension
//!   headers (`drop_ipv6_ext_header`) or a fragment header anywhere but
//!   right after the IPv6 header (`drop_ipv6_fragment`). To tell veil's
//!   from the host's it walks up to [`MAX_EXT`] hop-by-hop, routing,
//!   destination-options and fragment headers to the ports (a longer
//!   chain is dropped: its port is out of sight). It notes a
//!   reply's first fragment for the fragments after it (`frag6`).
//!   Neighbour discovery, the host's own traffic, later fragments nobody
//!   noted (no ports: the host's, as far as anyone can tell) pass.
//! - TC ([`translate`]) rewrites replies (TCP, UDP, ICMPv6 echo, and
//!   their fragments) to their client, and ICMPv6 errors (Destination
//!   Unreachable, Packet Too Big, Time Exceeded, Parameter Problem)
//!   quoting a NATed packet: the quote's source and the outer destination
//!   become the client's, with the quote's transport checksum and the
//!   outer ICMPv6 checksum (which covers the pseudo-header) patched. Then
//!   to the TUN device, as IPv4's replies go (`ingress::to_tun`).

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK},
    programs::{TcContext, XdpContext},
};
use network_types::{ip::Ipv6Hdr, tcp::TcpHdr, udp::UdpHdr};
use veil_common::{
    counted_flags,
    csum::{self, L4Sum},
    frag_kind, proto,
    ratelimit::Direction,
    tcp_flags::{FIN, RST},
    Config, Config6, Reason, ReverseFlow6, ReverseKey6, FRAG_TIMEOUT_NS, IPPROTO_ICMPV6,
};

use crate::{
    frag::Fragment,
    frag6::{self, FragHdr, FRAG_HDR_LEN},
    ingress::Admit,
    maps::{config, config6, VEIL_EGRESS6, VEIL_REVERSE6},
    packet::{Packet, Ports, ETH_LEN},
    rewrite6::{
        move_endpoint6_skb, pull_headers6, replace128, Endpoint6, PortChange, ICMPV6_ECHO_REPLY,
        ICMPV6_ECHO_REQUEST, ICMPV6_ERROR_MAX, IPV6_LEN, NH_DEST_OPTS, NH_FRAGMENT, NH_HOP_BY_HOP,
        NH_ROUTING,
    },
    stats, Verdict,
};

const IP: usize = ETH_LEN;
const L4_AT: usize = ETH_LEN + IPV6_LEN;
const ICMP_HDR_LEN: usize = 8;
const INNER_IP: usize = L4_AT + ICMP_HDR_LEN;
const INNER_L4: usize = INNER_IP + IPV6_LEN;

/// Extension headers walked at most before the ports (RFC 8200's usual
/// order: hop-by-hop, destination options, routing, fragment).
pub const MAX_EXT: usize = 4;
/// Where the upper-layer header may start at the latest: a bound the
/// verifier can see, and more than any sane chain of headers.
const MAX_UPPER_AT: usize = 512;

/// Whether a WAN frame is IPv6, by its EtherType.
#[inline(always)]
pub fn is_ipv6_xdp(ctx: &XdpContext) -> bool {
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    match pkt.at::<[u8; 2]>(12) {
        Ok(t) => u16::from_be_bytes(unsafe { *t }) == crate::rewrite6::ETH_P_IPV6,
        Err(_) => false,
    }
}

/// What an IPv6 WAN packet is to veil.
enum Wan6 {
    Host,
    /// The first fragment of a datagram to the public address that is not
    /// veil's (its fragment header's identification).
    HostFirstFragment(u32),
    /// A fragment after the first, to the public address: veil's when its
    /// first fragment was (`frag6`), the host's otherwise.
    LaterFragment {
        id: u32,
        last: bool,
    },
    /// A reply, whole or its first fragment (`first_fragment`: the
    /// identification); its transport header at `at`.
    Reply {
        key: ReverseKey6,
        kind: L4Sum,
        tcp_flags: u64,
        at: usize,
        first_fragment: Option<u32>,
    },
    IcmpError {
        key: ReverseKey6,
    },
}

/// The upper-layer header past any extension headers.
struct Upper {
    proto: u8,
    at: usize,
    /// Extension headers other than one fragment header were passed.
    ext: bool,
    /// The fragment header's fields, if there is one. A later fragment has
    /// no upper-layer header: the walk stops at it.
    frag: Option<FragHdr>,
}

/// Walks the extension headers from the IPv6 header's `next`.
#[inline(always)]
fn upper(pkt: &Packet, next: u8) -> Result<Upper, Reason> {
    let mut u = Upper {
        proto: next,
        at: L4_AT,
        ext: false,
        frag: None,
    };
    for _ in 0..MAX_EXT {
        match u.proto {
            NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS => {
                let h: *mut [u8; 2] = pkt.at(u.at)?;
                let (nh, len) = unsafe { ((*h)[0], (*h)[1]) };
                u.proto = nh;
                u.at += (len as usize + 1) * 8;
                u.ext = true;
            }
            NH_FRAGMENT => {
                let frag = frag6::read(pkt, u.at)?;
                // A fragment header after others: not translated.
                u.ext |= u.at != L4_AT;
                u.frag = Some(frag);
                if let Fragment::Later { .. } = frag.fragment {
                    return Ok(u);
                }
                u.proto = frag.next;
                u.at += FRAG_HDR_LEN;
            }
            _ => return Ok(u),
        }
        if u.at > MAX_UPPER_AT {
            return Err(Reason::DropIpv6ExtHeader);
        }
    }
    // A chain longer than the walk: which port it is for cannot be read,
    // so neither can whether it is veil's (passed to the host, one to a
    // NAT port would draw an RST or port unreachable from the kernel).
    match u.proto {
        NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS | NH_FRAGMENT => Err(Reason::DropIpv6ExtHeader),
        _ => Ok(u),
    }
}

#[inline(never)]
fn classify(pkt: &Packet, cfg: &Config, cfg6: &Config6) -> Result<Wan6, Reason> {
    let ip: *mut Ipv6Hdr = pkt.at(IP)?;
    let (vcf, next, src, dst) =
        unsafe { ((*ip).vcf[0], (*ip).next_hdr, (*ip).src_addr, (*ip).dst_addr) };
    if !cfg6.is_public(&dst) {
        // Client addresses exist only behind the tunnel.
        if cfg6.in_client_net(&dst) {
            return Err(Reason::DropSpoofedV6);
        }
        return Ok(Wan6::Host);
    }
    if vcf >> 4 != 6 {
        return Err(Reason::DropMalformed);
    }
    let up = upper(pkt, next)?;
    // Later fragments carry no ports: whose they are, their first
    // fragment said.
    let frag_id = match up.frag {
        Some(FragHdr {
            fragment: Fragment::Later { last },
            id,
            ..
        }) => return Ok(Wan6::LaterFragment { id, last }),
        Some(FragHdr {
            fragment: Fragment::First,
            id,
            ..
        }) => Some(id),
        _ => None,
    };
    let at = if up.at > MAX_UPPER_AT {
        return Err(Reason::DropIpv6ExtHeader);
    } else {
        up.at
    };
    // Is it in the NAT range (veil's)?
    let ours = match up.proto {
        proto::TCP | proto::UDP => {
            let ports: *mut Ports = pkt.at(at)?;
            cfg.in_nat_range(u16::from_be_bytes(unsafe { (*ports).dst }))
        }
        IPPROTO_ICMPV6 => {
            let icmp: *mut [u8; 8] = pkt.at(at)?;
            let (t, id) = unsafe { ((*icmp)[0], u16::from_be_bytes([(*icmp)[4], (*icmp)[5]])) };
            match t {
                ICMPV6_ECHO_REPLY => cfg.in_nat_range(id),
                1..=ICMPV6_ERROR_MAX => true,
                // Neighbour discovery, echo requests to the gateway, MLD:
                // the host's.
                _ => false,
            }
        }
        _ => false,
    };
    if !ours {
        return Ok(match frag_id {
            Some(id) => Wan6::HostFirstFragment(id),
            None => Wan6::Host,
        });
    }
    if up.ext {
        return Err(if up.frag.is_some() {
            Reason::DropIpv6Fragment
        } else {
            Reason::DropIpv6ExtHeader
        });
    }
    let upper = up.proto;
    let reply = |kind, remote_port: [u8; 2], nat_port: [u8; 2], tcp_flags| Wan6::Reply {
        key: ReverseKey6 {
            remote_addr: src,
            public_addr: dst,
            remote_port: u16::from_be_bytes(remote_port),
            nat_port: u16::from_be_bytes(nat_port),
            proto: upper,
            _pad: [0; 3],
        },
        kind,
        tcp_flags,
        at,
        first_fragment: frag_id,
    };
    match upper {
        proto::TCP => {
            let tcp: *mut TcpHdr = pkt.at(at)?;
            let flags = unsafe { *(tcp as *const u8).add(13) } as u64;
            Ok(unsafe { reply(L4Sum::Tcp, (*tcp).source, (*tcp).dest, flags) })
        }
        proto::UDP => {
            let udp: *mut UdpHdr = pkt.at(at)?;
            Ok(unsafe { reply(L4Sum::Udp, (*udp).src, (*udp).dst, 0) })
        }
        _ => {
            let icmp: *mut [u8; 8] = pkt.at(at)?;
            let (t, id) = unsafe { ((*icmp)[0], [(*icmp)[4], (*icmp)[5]]) };
            if t == ICMPV6_ECHO_REPLY {
                Ok(reply(L4Sum::Icmp, [0, 0], id, 0))
            } else if up.frag.is_some() {
                // Errors quote at most 1280 bytes: one in fragments is
                // odd, and its quote is not where the walk expects it.
                Err(Reason::DropIpv6Fragment)
            } else {
                classify_icmp_error(pkt, cfg, cfg6)
            }
        }
    }
}

/// An ICMPv6 error is veil's when it quotes `public:nat_port -> remote`
/// with the upper-layer header right after the quoted IPv6 header (veil
/// sends no extension headers).
#[inline(always)]
fn classify_icmp_error(pkt: &Packet, cfg: &Config, cfg6: &Config6) -> Result<Wan6, Reason> {
    let inner: *mut Ipv6Hdr = pkt.at(INNER_IP)?;
    let (next, src, dst) = unsafe { ((*inner).next_hdr, (*inner).src_addr, (*inner).dst_addr) };
    if !cfg6.is_public(&src) {
        return Ok(Wan6::Host);
    }
    let (nat_port, remote_port) = match next {
        proto::TCP | proto::UDP => {
            let ports: *mut Ports = pkt.at(INNER_L4)?;
            unsafe { ((*ports).src, (*ports).dst) }
        }
        IPPROTO_ICMPV6 => {
            let echo: *mut [u8; 8] = pkt.at(INNER_L4)?;
            if unsafe { (*echo)[0] } != ICMPV6_ECHO_REQUEST {
                return Ok(Wan6::Host);
            }
            (unsafe { [(*echo)[4], (*echo)[5]] }, [0, 0])
        }
        _ => return Ok(Wan6::Host),
    };
    let nat_port = u16::from_be_bytes(nat_port);
    if !cfg.in_nat_range(nat_port) {
        return Ok(Wan6::Host);
    }
    Ok(Wan6::IcmpError {
        key: ReverseKey6 {
            remote_addr: dst,
            public_addr: src,
            remote_port: u16::from_be_bytes(remote_port),
            nat_port,
            proto: next,
            _pad: [0; 3],
        },
    })
}

#[inline(always)]
fn flow(key: &ReverseKey6) -> Result<*mut ReverseFlow6, Reason> {
    VEIL_REVERSE6
        .get_ptr_mut(key)
        .ok_or(Reason::DropNoIngressFlow6)
}

/// The flow of a reply; `None` for an echo reply without one (the host's
/// own ping whose identifier falls in the NAT range).
#[inline(always)]
fn reply_flow(key: &ReverseKey6, kind: L4Sum) -> Result<Option<*mut ReverseFlow6>, Reason> {
    match (flow(key), kind) {
        (Ok(flow), _) => Ok(Some(flow)),
        (Err(_), L4Sum::Icmp) => Ok(None),
        (Err(e), _) => Err(e),
    }
}

/// XDP, for an IPv6 frame: drop early what veil must not let through.
// A call of its own beside the IPv4 path's (see main.rs).
#[inline(never)]
pub fn filter(ctx: &XdpContext) -> Result<Verdict, Reason> {
    let cfg = config()?;
    let pkt = &Packet::new(ctx.data(), ctx.data_end());
    let ip_len = || ((ctx.data_end() - ctx.data()) as u32).saturating_sub(ETH_LEN as u32);
    Ok(admit(pkt, cfg, ip_len)?.verdict(xdp_action::XDP_PASS as i32))
}

/// The checks before any translation (IPv4's `ingress::admit`, for IPv6).
#[inline(always)]
fn admit(pkt: &Packet, cfg: &Config, ip_len: impl Fn() -> u32) -> Result<Admit, Reason> {
    let Some(cfg6) = config6() else {
        return Ok(Admit::Host);
    };
    let datagram = |id| frag6::key(pkt, IP, frag_kind::INGRESS, id);
    match classify(pkt, cfg, cfg6)? {
        Wan6::Host => Ok(Admit::Host),
        Wan6::HostFirstFragment(id) => {
            frag6::forget(&datagram(id)?);
            Ok(Admit::Host)
        }
        // A later fragment nobody noted is the host's, as far as anyone
        // can tell (as for IPv4).
        Wan6::LaterFragment { id, .. } => match frag6::live(&datagram(id)?, FRAG_TIMEOUT_NS) {
            Some(entry) => {
                crate::ratelimit::police(entry.client_vip, ip_len(), Direction::Down)?;
                Ok(Admit::Translate)
            }
            None => Ok(Admit::Host),
        },
        Wan6::Reply {
            key,
            kind,
            first_fragment,
            ..
        } => match reply_flow(&key, kind)? {
            Some(flow) => {
                let vip = unsafe { (*flow).client_vip };
                crate::ratelimit::police(vip, ip_len(), Direction::Down)?;
                if let Some(id) = first_fragment {
                    frag6::remember(&datagram(id)?, unsafe { &(*flow).client_addr }, vip)?;
                }
                Ok(Admit::Translate)
            }
            None => {
                if let Some(id) = first_fragment {
                    frag6::forget(&datagram(id)?);
                }
                Ok(Admit::Host)
            }
        },
        Wan6::IcmpError { key } => {
            flow(&key)?;
            Ok(Admit::Translate)
        }
    }
}

/// TC, for an IPv6 frame, before `translate`: XDP's checks when there is
/// no XDP program (`ingress::admit_in_tc`).
#[inline(never)]
pub fn admit_in_tc(ctx: &TcContext) -> Result<Admit, Reason> {
    let cfg = config()?;
    pull_headers6(ctx)?;
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    admit(&pkt, cfg, || ctx.len().saturating_sub(ETH_LEN as u32))
}

/// TC, for an IPv6 frame: translate what `filter` let through and hand it
/// to the TUN device.
// A call of its own beside the IPv4 path's (see main.rs).
#[inline(never)]
pub fn translate(ctx: &TcContext) -> Result<Verdict, Reason> {
    let cfg = config()?;
    let Some(cfg6) = config6() else {
        return Ok(Verdict::uncounted(TC_ACT_OK as i32));
    };
    pull_headers6(ctx)?;
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    // Whether the reply is TCP, which the GRO stage may merge.
    let mut tcp = false;
    let reason = match classify(&pkt, cfg, cfg6)? {
        // Counted by `filter` already.
        Wan6::Host | Wan6::HostFirstFragment(_) => return Ok(Verdict::uncounted(TC_ACT_OK as i32)),
        Wan6::LaterFragment { id, last } => {
            if !frag6::ingress_later(ctx, &pkt, IP, id, last)? {
                // The host's (counted by `filter`).
                return Ok(Verdict::uncounted(TC_ACT_OK as i32));
            }
            Reason::IngressForwarded
        }
        Wan6::Reply {
            key,
            kind,
            tcp_flags,
            at: l4,
            ..
        } => {
            let Some(flow) = reply_flow(&key, kind)? else {
                return Ok(Verdict::uncounted(TC_ACT_OK as i32));
            };
            let (client_addr, client_port) = unsafe { ((*flow).client_addr, (*flow).client_port) };
            let tcp_flags = reply_flags(&pkt, l4, &key, client_addr, client_port, tcp_flags)?;
            stats::touch(unsafe { &raw mut (*flow).stats }, ctx.len(), tcp_flags);
            tcp = matches!(kind, L4Sum::Tcp);
            let at = match kind {
                L4Sum::Tcp => reply_at(kind, l4 + 2, l4 + 16),
                L4Sum::Udp => reply_at(kind, l4 + 2, l4 + 6),
                L4Sum::Icmp => reply_at(kind, l4 + 4, l4 + 2),
            };
            let ports = PortChange {
                old: key.nat_port.to_be_bytes(),
                new: client_port,
            };
            move_endpoint6_skb(ctx, &at, &key.public_addr, &client_addr, &ports)?;
            Reason::IngressForwarded
        }
        Wan6::IcmpError { key } => {
            let flow = flow(&key)?;
            icmp_error(&pkt, cfg6, flow)?;
            Reason::IcmpErrorForwarded
        }
    };
    crate::ingress::to_tun(ctx, cfg, reason, tcp)
}

#[inline(always)]
const fn reply_at(kind: L4Sum, port: usize, l4_check: usize) -> Endpoint6 {
    Endpoint6 {
        kind,
        addr: IP + 24,
        port,
        l4_check,
    }
}

/// Rewrites an ICMPv6 error for its client: the quote's source address and
/// port back to the client's, its transport checksum patched when quoted;
/// the outer destination to the client, and the ICMPv6 checksum for both
/// (it covers the pseudo-header and the quote). ICMPv6 checksums are
/// always complete, so the pure helpers patch them directly.
#[inline(never)]
fn icmp_error(pkt: &Packet, cfg6: &Config6, flow: *mut ReverseFlow6) -> Result<(), Reason> {
    let ip: *mut Ipv6Hdr = pkt.at(IP)?;
    let icmp: *mut [u8; 8] = pkt.at(L4_AT)?;
    let inner: *mut Ipv6Hdr = pkt.at(INNER_IP)?;
    let inner_proto = unsafe { (*inner).next_hdr };
    // (the quoted port or identifier, the quoted checksum if quoted)
    let (port, check): (*mut [u8; 2], Option<*mut [u8; 2]>) = match inner_proto {
        proto::UDP => {
            let udp: *mut UdpHdr = pkt.at(INNER_L4)?;
            unsafe { (&raw mut (*udp).src, Some(&raw mut (*udp).check)) }
        }
        proto::TCP => {
            let ports: *mut Ports = pkt.at(INNER_L4)?;
            let check = pkt
                .at::<TcpHdr>(INNER_L4)
                .ok()
                .map(|tcp| unsafe { &raw mut (*tcp).check });
            (unsafe { &raw mut (*ports).src }, check)
        }
        _ => {
            let echo: *mut [u8; 8] = pkt.at(INNER_L4)?;
            let base = echo as *mut u8;
            unsafe { (base.add(4).cast(), Some(base.add(2).cast())) }
        }
    };
    unsafe {
        // The quote's source and the outer destination are both the public
        // address (`classify` checked): read from the map value, aligned,
        // rather than byte by byte from the packet (which spills registers
        // past the stack BPF allows).
        let public = &cfg6.public_addr;
        let client = &(*flow).client_addr;
        let old_port = u16::from_ne_bytes(*port);
        let new_port = u16::from_ne_bytes((*flow).client_port.to_be_bytes());
        let mut outer = u16::from_ne_bytes([(*icmp)[2], (*icmp)[3]]);
        if let Some(check) = check {
            let old = u16::from_ne_bytes(*check);
            let mut new = replace128(old, public, client);
            new = csum::replace16(new, old_port, new_port);
            *check = new.to_ne_bytes();
            outer = csum::replace16(outer, old, new);
        }
        // Twice: the quote's source (data) and the outer destination
        // (pseudo-header).
        outer = replace128(outer, public, client);
        outer = replace128(outer, public, client);
        outer = csum::replace16(outer, old_port, new_port);
        (*inner).src_addr = *client;
        *port = new_port.to_ne_bytes();
        (*ip).dst_addr = *client;
        let o = outer.to_ne_bytes();
        (*icmp)[2] = o[0];
        (*icmp)[3] = o[1];
    }
    Ok(())
}

/// As IPv4's (`ingress::reply_flags`): a reply's RST or FIN counts only
/// near what the client acknowledged.
#[inline(always)]
fn reply_flags(
    pkt: &Packet,
    l4: usize,
    key: &ReverseKey6,
    client_addr: [u8; 16],
    client_port: u16,
    tcp_flags: u64,
) -> Result<u64, Reason> {
    // The bound again, for the verifier: it lost it on the way here.
    if tcp_flags & (RST | FIN) == 0 || l4 > MAX_UPPER_AT {
        return Ok(tcp_flags);
    }
    let tcp: *mut TcpHdr = pkt.at(l4)?;
    Ok(
        match VEIL_EGRESS6.get_ptr(&key.client_flow(client_addr, client_port)) {
            Some(out) => counted_flags(
                tcp_flags,
                u32::from_be_bytes(unsafe { (*tcp).seq }),
                unsafe { (*out).acked },
            ),
            None => tcp_flags,
        },
    )
}
