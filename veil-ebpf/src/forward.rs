//! Port forwarding (`--forward FILE`): connections to a listen port on a
//! public address, translated to a target and back, in TC.
//!
//! A packet is the forwarder's when its 5-tuple is a connection in
//! `VEIL_FWD_FLOWS` (either direction), or when it opens one: it goes to a
//! public address on a port with a rule in `VEIL_FWD_RULES` (a TCP SYN, or
//! any UDP datagram). The first packet makes both entries ([`open`]): the
//! reply entry first with `BPF_NOEXIST`, which claims the NAT port toward
//! the target atomically, as the daemon does for clients' flows. Every
//! packet then has both addresses and ports rewritten with the kernel's
//! checksum helpers (`rewrite`), its TTL counted, and is sent out of the
//! entry's interface with `bpf_redirect_neigh`: the gateway's kernel does
//! not forward (ip_forward may be 0) and netfilter never sees the packet.
//!
//! A new connection takes a random place among those not yet assured
//! ([`hold_place`]), ending the unassured one there: what a flood of
//! half-open connections can hold is bounded, and the connections that
//! completed keep the rest of the table.
//!
//! XDP on the WAN only asks [`claims`] so that it lets such packets through
//! to TC uncounted; TC ([`translate`]) counts them.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_REDIRECT},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use network_types::{
    eth::{EthHdr, EtherType},
    icmp::Icmpv4Hdr,
    ip::Ipv4Hdr,
};
use veil_common::{
    acked_of, assured,
    csum::{self, L4Sum},
    fwd_dir, handshake_ack, handshake_mark, holds_share, idle_since, may_take, proto,
    ratelimit::Direction,
    rst_plausible, tcp_flags, tcp_over, Config, FwdFlow, FwdKey, FwdOpening, FwdRule, FwdRuleKey,
    Reason, FWD_OPENING_SLOTS,
};

use crate::{
    egress::ethernet_header,
    maps::{
        config, VEIL_FWD_FLOWS, VEIL_FWD_OPENING, VEIL_FWD_RULES, VEIL_FWD_STATS, VEIL_REVERSE,
    },
    packet::{pull_headers, Packet, Ports, ETH_LEN, ETH_P_IP, IPV4_LEN},
    rewrite::{
        cover, decrement_ttl, dword, move_endpoint, move_endpoint_skb, word, SkbEndpoint, L4,
    },
    sources, stats, Verdict,
};

const IP: usize = ETH_LEN;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const L4_AT: usize = ETH_LEN + IPV4_LEN;
/// NAT ports tried for a new connection before it is refused: a random
/// start, then its neighbours. Collisions need the same target endpoint.
const PORT_TRIES: u32 = 8;

/// A TCP or UDP packet that may be a forwarded connection's.
struct Candidate {
    key: FwdKey,
    kind: L4Sum,
    ttl: u8,
    tcp_flags: u64,
    /// TCP's sequence and acknowledgment numbers (0 for UDP).
    seq: u32,
    ack: u32,
}

/// Reads the 5-tuple of an unfragmented TCP or UDP packet without IP
/// options (a forwarded connection's packets are such); `None` for
/// anything else, which is left to the rest of the datapath.
#[inline(always)]
fn candidate(pkt: &Packet, l2: usize) -> Option<Candidate> {
    if l2 != 0 {
        let eth: *mut EthHdr = pkt.at(0).ok()?;
        if unsafe { (*eth).ether_type } != ETH_P_IP.to_be() {
            return None;
        }
    }
    let ip: *mut Ipv4Hdr = pkt.at(l2).ok()?;
    let (vihl, frags, protocol, ttl, src, dst) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
            (*ip).ttl,
            (*ip).src_addr,
            (*ip).dst_addr,
        )
    };
    // Options and fragments are not forwarded.
    if vihl != 0x45 || frags & 0x3fff != 0 {
        return None;
    }
    let kind = match protocol {
        proto::TCP => L4Sum::Tcp,
        proto::UDP => L4Sum::Udp,
        _ => return None,
    };
    let ports: *mut Ports = pkt.at(l2 + IPV4_LEN).ok()?;
    let (tcp_flags, seq, ack) = match kind {
        L4Sum::Tcp => {
            let tcp: *mut [u8; 14] = pkt.at(l2 + IPV4_LEN).ok()?;
            let at = |i: usize| unsafe {
                u32::from_be_bytes([(*tcp)[i], (*tcp)[i + 1], (*tcp)[i + 2], (*tcp)[i + 3]])
            };
            (unsafe { (*tcp)[13] as u64 }, at(4), at(8))
        }
        _ => (0, 0, 0),
    };
    Some(Candidate {
        key: FwdKey {
            src_addr: src,
            dst_addr: dst,
            src_port: u16::from_be_bytes(unsafe { (*ports).src }),
            dst_port: u16::from_be_bytes(unsafe { (*ports).dst }),
            proto: protocol,
            _pad: [0; 3],
        },
        kind,
        ttl,
        tcp_flags,
        seq,
        ack,
    })
}

/// The header bytes of an ICMP error that say what it is about: the quoted
/// IPv4 header and the first 8 bytes of its transport header.
const ICMP_HDR_LEN: usize = 8;
const INNER_IP: usize = L4_AT + ICMP_HDR_LEN;
const INNER_L4: usize = INNER_IP + IPV4_LEN;

/// What an ICMP error quotes of a TCP or UDP packet.
struct Quote {
    /// The quoted packet's 5-tuple, reversed: the key of the connection
    /// entry it answers to.
    key: FwdKey,
    kind: L4Sum,
    /// The error's own TTL.
    ttl: u8,
}

/// Reads an ICMP error's quote; `None` for any other packet.
#[inline(always)]
fn quote(pkt: &Packet) -> Option<Quote> {
    let eth: *mut EthHdr = pkt.at(0).ok()?;
    if unsafe { (*eth).ether_type } != ETH_P_IP.to_be() {
        return None;
    }
    let ip: *mut Ipv4Hdr = pkt.at(IP).ok()?;
    let (vihl, frags, protocol, ttl) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
            (*ip).ttl,
        )
    };
    if vihl != 0x45 || frags & 0x3fff != 0 || protocol != proto::ICMP {
        return None;
    }
    let icmp: *mut Icmpv4Hdr = pkt.at(L4_AT).ok()?;
    match unsafe { (*icmp).type_ } {
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM => {}
        _ => return None,
    }
    let inner: *mut Ipv4Hdr = pkt.at(INNER_IP).ok()?;
    let (inner_vihl, inner_proto, quoted_src, quoted_dst) = unsafe {
        (
            (*inner).vihl,
            (*inner).proto,
            (*inner).src_addr,
            (*inner).dst_addr,
        )
    };
    let kind = match inner_proto {
        proto::TCP => L4Sum::Tcp,
        proto::UDP => L4Sum::Udp,
        _ => return None,
    };
    if inner_vihl != 0x45 {
        return None;
    }
    let ports: *mut Ports = pkt.at(INNER_L4).ok()?;
    let (quoted_sport, quoted_dport) = unsafe { ((*ports).src, (*ports).dst) };
    Some(Quote {
        key: FwdKey {
            src_addr: quoted_dst,
            dst_addr: quoted_src,
            src_port: u16::from_be_bytes(quoted_dport),
            dst_port: u16::from_be_bytes(quoted_sport),
            proto: inner_proto,
            _pad: [0; 3],
        },
        kind,
        ttl,
    })
}

/// An ICMP error about a packet of a forwarded connection (a target's
/// port unreachable, a router's "fragmentation needed" on either side):
/// translated for the other side, as the connection's packets are, so
/// that it reaches whoever sent the packet it quotes, about that packet
/// as they sent it. `None` when it is about something else.
///
/// The quote `a -> b` is what the gateway sent; the connection entry
/// keyed `b -> a` translates to `x -> y`, and `a -> b` was made from
/// `y -> x`. So the quote becomes `y -> x` and the error goes from `x` to
/// `y`, out of that entry's interface.
#[inline(always)]
fn icmp_error(ctx: &TcContext, pkt: &Packet, cfg: &Config) -> Result<Option<Verdict>, Reason> {
    let Some(Quote { key, kind, ttl }) = quote(pkt) else {
        return Ok(None);
    };
    let ip: *mut Ipv4Hdr = pkt.at(IP)?;
    let icmp: *mut Icmpv4Hdr = pkt.at(L4_AT)?;
    let inner: *mut Ipv4Hdr = pkt.at(INNER_IP)?;
    let ports: *mut Ports = pkt.at(INNER_L4)?;
    let Some(flow) = VEIL_FWD_FLOWS.get_ptr(key) else {
        return Ok(None);
    };
    if ttl <= 1 {
        return Err(Reason::DropTtlExpired);
    }
    let (x, x_port, y, y_port, ifindex, rule) = unsafe {
        (
            (*flow).src_addr,
            (*flow).src_port,
            (*flow).dst_addr,
            (*flow).dst_port,
            (*flow).ifindex,
            (*flow).rule,
        )
    };
    // RFC 792 promises 8 bytes of the quoted transport header: TCP's
    // checksum is patched when it was quoted.
    let check = match kind {
        L4Sum::Tcp => pkt
            .at::<[u8; 18]>(INNER_L4)
            .ok()
            .map(|tcp| unsafe { (tcp as *mut u8).add(16) as *mut [u8; 2] }),
        _ => pkt
            .at::<[u8; 8]>(INNER_L4)
            .ok()
            .map(|udp| unsafe { (udp as *mut u8).add(6) as *mut [u8; 2] }),
    };
    unsafe {
        let src = L4 {
            kind,
            port: &raw mut (*ports).src,
            check,
        };
        let moved_src = move_endpoint(inner, &raw mut (*inner).src_addr, &src, y, y_port);
        let dst = L4 {
            kind,
            port: &raw mut (*ports).dst,
            check,
        };
        let moved_dst = move_endpoint(inner, &raw mut (*inner).dst_addr, &dst, x, x_port);
        let sum = cover(word((*icmp).check), &moved_src);
        (*icmp).check = cover(sum, &moved_dst).to_ne_bytes();
        let mut ip_check = word((*ip).check);
        ip_check = csum::replace32(ip_check, dword((*ip).src_addr), dword(x));
        ip_check = csum::replace32(ip_check, dword((*ip).dst_addr), dword(y));
        (*ip).src_addr = x;
        (*ip).dst_addr = y;
        (*ip).check = ip_check.to_ne_bytes();
    }
    if let Some(counters) = VEIL_FWD_STATS.get_ptr_mut(rule) {
        stats::fwd_packet(counters, ctx.len());
    }
    decrement_ttl(ctx, IP, ttl, proto::ICMP)?;
    send(cfg, ifindex)
}

/// Sends the translated packet (with its Ethernet header) out of
/// `ifindex`: the kernel fills in the link-layer addresses for the next
/// hop; into the TUN device (a `client:NAME` target) it goes bare.
#[inline(always)]
fn send(cfg: &Config, ifindex: u32) -> Result<Option<Verdict>, Reason> {
    let action = if ifindex == cfg.tun_ifindex {
        unsafe { bpf_redirect(ifindex, 0) }
    } else {
        unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) }
    } as i32;
    if action != TC_ACT_REDIRECT as i32 {
        return Err(Reason::DropHelperFailed);
    }
    Ok(Some(Verdict::counted(action, Reason::FwdForwarded)))
}

/// The rule a packet to a public address opens a connection under.
#[inline(always)]
fn rule_for(key: &FwdKey, cfg: &Config) -> Option<(FwdRuleKey, *const FwdRule)> {
    // No rule listens in the NAT range (the daemon refuses one there):
    // replies to clients' flows need no lookup.
    if !cfg.is_public(key.dst_addr) || cfg.in_nat_range(key.dst_port) {
        return None;
    }
    let rule = FwdRuleKey::new(key.proto, key.dst_port);
    VEIL_FWD_RULES.get_ptr(rule).map(|r| (rule, r))
}

/// XDP: whether TC's [`translate`] will take this packet.
#[inline(always)]
pub fn claims(pkt: &Packet, cfg: &Config) -> bool {
    match candidate(pkt, ETH_LEN) {
        // A client's address on the WAN is forged (`drop_spoofed_vip`),
        // never the answer of a connection to a client, which comes from
        // the TUN device.
        Some(c) if cfg.in_vip_pool(c.key.src_addr) => false,
        Some(c) => VEIL_FWD_FLOWS.get_ptr(c.key).is_some() || rule_for(&c.key, cfg).is_some(),
        None => quote(pkt).is_some_and(|q| VEIL_FWD_FLOWS.get_ptr(q.key).is_some()),
    }
}

/// TC: translates and sends on a forwarded connection's packet; `None`
/// when the packet is not one (the caller goes on with it).
#[inline(always)]
pub fn translate(ctx: &TcContext, cfg: &Config) -> Result<Option<Verdict>, Reason> {
    translate_at(ctx, cfg, ETH_LEN, true)
}

/// TC on the TUN device: a connected client's answer on a connection a
/// `client:NAME` rule made (the daemon writes only those here, beside its
/// clients' own flows). Never opens one: a client cannot use a rule.
#[inline(always)]
pub fn from_client(ctx: &TcContext, cfg: &Config, l2: usize) -> Result<Option<Verdict>, Reason> {
    translate_at(ctx, cfg, l2, false)
}

/// [`translate`] for a packet whose IPv4 header is at `l2` (0 on the TUN
/// device); `may_open`: whether it may open a connection under a rule.
#[inline(always)]
fn translate_at(
    ctx: &TcContext,
    cfg: &Config,
    l2: usize,
    may_open: bool,
) -> Result<Option<Verdict>, Reason> {
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let Some(c) = candidate(&pkt, l2) else {
        if l2 != ETH_LEN {
            return Ok(None);
        }
        return icmp_error(ctx, &pkt, cfg);
    };
    // As in `claims`: from the WAN, a client's address is not the
    // forwarder's to translate.
    if may_open && cfg.in_vip_pool(c.key.src_addr) {
        return Ok(None);
    }
    let syn = c.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
    let known = match VEIL_FWD_FLOWS.get_ptr_mut(c.key) {
        Some(flow) if c.kind == L4Sum::Tcp && syn => reopen(&c.key, flow, cfg)?,
        known => known,
    };
    let flow = match known {
        Some(flow) => flow,
        None if !may_open => return Ok(None),
        None => {
            let Some((rule_key, rule)) = rule_for(&c.key, cfg) else {
                return Ok(None);
            };
            // Only a SYN opens a TCP connection: anything else of one the
            // gateway does not know (its rule removed, or it expired) is
            // dropped, as the target would not know it either.
            if c.kind == L4Sum::Tcp && !syn {
                return Err(Reason::FwdDropNoFlow);
            }
            // Refused early; counted once its handshake is over.
            if c.kind == L4Sum::Tcp {
                sources::may_open(c.key.src_addr, cfg)?;
            }
            let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
            open(&c.key, rule_key, unsafe { &*rule }, ingress, cfg)?
        }
    };
    if c.ttl <= 1 {
        return Err(Reason::DropTtlExpired);
    }
    let (to, rule, ifindex) = unsafe {
        (
            (
                (*flow).src_addr,
                (*flow).src_port,
                (*flow).dst_addr,
                (*flow).dst_port,
            ),
            (*flow).rule,
            (*flow).ifindex,
        )
    };
    // A client's limits hold for what it serves through a rule too: its
    // answers (from the TUN device), and what reaches it.
    let client = match (may_open, ifindex == cfg.tun_ifindex) {
        (false, _) => Some((c.key.src_addr, Direction::Up)),
        (true, true) => Some((to.2, Direction::Down)),
        _ => None,
    };
    if let Some((client, dir)) = client {
        crate::ratelimit::police(client, ctx.len() - l2 as u32, dir)?;
    }
    let flags = match c.kind {
        L4Sum::Tcp => tcp_state(flow, &c, cfg)?,
        _ => c.tcp_flags,
    };
    stats::touch(unsafe { &raw mut (*flow).stats }, ctx.len(), flags);
    if let Some(counters) = VEIL_FWD_STATS.get_ptr_mut(rule) {
        stats::fwd_packet(counters, ctx.len());
    }
    let l4 = l2 + IPV4_LEN;
    let check = match c.kind {
        L4Sum::Tcp => l4 + 16,
        _ => l4 + 6,
    };
    let src = SkbEndpoint {
        kind: c.kind,
        ip_check: l2 + 10,
        addr: l2 + 12,
        port: l4,
        l4_check: check,
    };
    let dst = SkbEndpoint {
        addr: l2 + 16,
        port: l4 + 2,
        ..src
    };
    let k = &c.key;
    move_endpoint_skb(
        ctx,
        &src,
        dword(k.src_addr),
        word(k.src_port.to_be_bytes()),
        to.0,
        to.1,
    )?;
    move_endpoint_skb(
        ctx,
        &dst,
        dword(k.dst_addr),
        word(k.dst_port.to_be_bytes()),
        to.2,
        to.3,
    )?;
    decrement_ttl(ctx, l2, c.ttl, k.proto)?;
    if l2 == 0 {
        ethernet_header(ctx, l2, EtherType::Ipv4)?;
    }
    send(cfg, ifindex)
}

/// What a TCP packet says of its connection, as far as a blind attacker
/// (who guessed the tuple, and never sees the target's packets) cannot
/// have said it. The target's acknowledgment is noted on the reply entry,
/// and its SYN-ACK's sequence number on the inbound one, then the
/// remote's acknowledgment. A remote's ACK completes the handshake only
/// if it acknowledges that SYN-ACK whole ([`handshake_mark`],
/// [`handshake_ack`]); an RST or FIN far from what the other side
/// acknowledged ([`rst_plausible`]) is forwarded (the receiver judges it)
/// but not taken as the end, which would free the connection's NAT port
/// and place for others. The flags to record; `Err` for a handshake ACK
/// held back while its remote is at its share.
#[inline(always)]
fn tcp_state(flow: *mut FwdFlow, c: &Candidate, cfg: &Config) -> Result<u64, Reason> {
    let (dir, seen) = unsafe { ((*flow).dir, (*flow).stats.tcp_flags) };
    let syn_ack = tcp_flags::SYN | tcp_flags::ACK;
    if dir == fwd_dir::REPLY {
        // Written when it moves (every 64 KiB acknowledged), not per
        // packet: the entry's cache line stays shared between CPUs.
        let acked = acked_of(c.ack);
        if c.tcp_flags & tcp_flags::ACK != 0 && unsafe { (*flow).acked } != acked {
            unsafe { (*flow).acked = acked };
        }
        let ends = tcp_flags::RST | tcp_flags::FIN;
        if c.tcp_flags & (tcp_flags::SYN | ends) == 0 {
            return Ok(c.tcp_flags);
        }
        let Some(inbound) = VEIL_FWD_FLOWS.get_ptr_mut(unsafe { (*flow).partner() }) else {
            return Ok(c.tcp_flags);
        };
        // The remote's ACK on the inbound entry says its handshake is
        // over; its `acked` then follows what the remote acknowledged.
        let done = unsafe { (*inbound).stats.tcp_flags } & tcp_flags::ACK != 0;
        if c.tcp_flags & syn_ack == syn_ack && !done {
            let next = c.seq.wrapping_add(1);
            unsafe { (*inbound).acked = handshake_mark(next) };
            stats::note_handshake(unsafe { &raw mut (*inbound).stats }, next);
        }
        // The target's address can be forged as well as the remote's.
        if c.tcp_flags & ends != 0 && done && !rst_plausible(c.seq, unsafe { (*inbound).acked }) {
            return Ok(0);
        }
        let (out, back) = unsafe { ((*inbound).stats.tcp_flags, (*flow).stats.tcp_flags) };
        if holds_share(out, back) && !holds_share(out, back | c.tcp_flags) {
            // The remote is where this entry's packets go.
            sources::ended(unsafe { (*flow).dst_addr });
        }
        return Ok(c.tcp_flags);
    }
    let flags = c.tcp_flags;
    if flags & (tcp_flags::RST | tcp_flags::FIN) != 0 {
        let (acked, back) = match VEIL_FWD_FLOWS.get_ptr(unsafe { (*flow).partner() }) {
            Some(reply) => unsafe { ((*reply).acked, (*reply).stats.tcp_flags) },
            None => (0, 0),
        };
        if !rst_plausible(c.seq, acked) {
            return Ok(0);
        }
        if holds_share(seen, back) && !holds_share(seen | flags, back) {
            sources::ended(c.key.src_addr);
        }
    }
    if flags & tcp_flags::ACK != 0 {
        let acked = unsafe { (*flow).acked };
        if seen & tcp_flags::ACK == 0 {
            if acked != handshake_mark(c.ack) || handshake_ack(seen) != c.ack {
                return Ok(flags & !tcp_flags::ACK);
            }
            // The handshake is over: the remote owns its address, and
            // the connection counts against it from now on unless it is
            // over already (a forged source does not get here, so it
            // cannot use up an address's share). Over the share (several
            // handshakes let in at once), the ACK is held back, and the
            // packets after it that would complete the handshake, until
            // the remote has a place again: the target sends nothing but
            // its SYN-ACK meanwhile, so the connection's NAT port can go
            // to a newer one (`reclaim`) without the target's data going
            // with it. An RST still goes through.
            if sources::may_open(c.key.src_addr, cfg).is_err() {
                if flags & tcp_flags::RST != 0 {
                    return Ok(flags & !tcp_flags::ACK);
                }
                return Err(Reason::FwdDropSourceBusy);
            }
            let back = match VEIL_FWD_FLOWS.get_ptr(unsafe { (*flow).partner() }) {
                Some(reply) => unsafe { (*reply).stats.tcp_flags },
                None => 0,
            };
            if holds_share(seen | flags, back) {
                sources::opened(c.key.src_addr);
            }
        }
        // From the handshake's ACK on: what the remote acknowledged, for
        // the target's RSTs and FINs. Written when it moves.
        if acked != acked_of(c.ack) {
            unsafe { (*flow).acked = acked_of(c.ack) };
        }
    }
    Ok(flags)
}

/// Makes a new connection's two entries: a NAT port on the gateway's
/// address toward the target, claimed by inserting the reply entry with
/// `BPF_NOEXIST`. `ingress` is where the remote's packets come from, and
/// so where the replies go.
#[inline(always)]
fn open(
    key: &FwdKey,
    rule_key: FwdRuleKey,
    rule: &FwdRule,
    ingress: u32,
    cfg: &Config,
) -> Result<*mut FwdFlow, Reason> {
    let now = unsafe { bpf_ktime_get_ns() };
    let inbound = |nat_port| FwdFlow {
        created_ns: now,
        src_addr: rule.snat_addr,
        dst_addr: rule.target_addr,
        src_port: nat_port,
        dst_port: rule.target_port,
        ifindex: rule.ifindex,
        rule: rule_key,
        dir: fwd_dir::INBOUND,
        ..Default::default()
    };
    let reply = FwdFlow {
        created_ns: now,
        src_addr: key.dst_addr,
        dst_addr: key.src_addr,
        src_port: key.dst_port,
        dst_port: key.src_port,
        ifindex: ingress,
        rule: rule_key,
        dir: fwd_dir::REPLY,
        ..Default::default()
    };
    let span = (cfg.nat_port_max - cfg.nat_port_min) as u32 + 1;
    let start = unsafe { bpf_get_prandom_u32() };
    for i in 0..PORT_TRIES {
        let nat_port = cfg.nat_port_min + (start.wrapping_add(i) % span) as u16;
        let forward = inbound(nat_port);
        let reply_key = forward.partner();
        if VEIL_FWD_FLOWS
            .insert(reply_key, reply, BPF_NOEXIST as u64)
            .is_err()
            && !reclaim(&reply_key, &reply, now)
        {
            continue;
        }
        // Toward a target behind the WAN the gateway's address there is a
        // public one, whose NAT ports clients' flows use too. Looked for
        // after the port is taken, as the daemon does for a client's flow:
        // of two made at once, at least one sees the other and gives back.
        if VEIL_REVERSE.get_ptr(reply_key.as_client_flow()).is_some() {
            let _ = VEIL_FWD_FLOWS.remove(reply_key);
            continue;
        }
        if VEIL_FWD_FLOWS
            .insert(*key, forward, BPF_NOEXIST as u64)
            .is_err()
        {
            // Another CPU opened it meanwhile (a retransmitted SYN): use
            // that one, give this port back.
            let _ = VEIL_FWD_FLOWS.remove(reply_key);
            return VEIL_FWD_FLOWS.get_ptr_mut(key).ok_or(Reason::FwdDropNoRoom);
        }
        if let Some(counters) = VEIL_FWD_STATS.get_ptr_mut(rule_key) {
            stats::fwd_connection(counters);
        }
        hold_place(key, now);
        return VEIL_FWD_FLOWS.get_ptr_mut(key).ok_or(Reason::FwdDropNoRoom);
    }
    Err(Reason::FwdDropNoRoom)
}

/// Gives the connection just made (its inbound entry's `key`, made at
/// `now`) a random place among those not yet assured, and ends the
/// connection that held it unless that one is assured by now. Random, not
/// oldest first: no shared counter to contend on, and a handshake of one
/// round trip survives a flood of `r` connections a second with
/// probability `exp(-r * rtt / FWD_OPENING_SLOTS)`.
#[inline(always)]
fn hold_place(key: &FwdKey, now: u64) {
    let slot = unsafe { bpf_get_prandom_u32() } % FWD_OPENING_SLOTS;
    let Some(place) = VEIL_FWD_OPENING.get_ptr_mut(slot) else {
        return;
    };
    let held = unsafe { *place };
    unsafe {
        *place = FwdOpening {
            key: *key,
            created_ns: now,
        }
    };
    // An empty place, or one whose connection has gone (expired, or a
    // later connection on the same key: another `created_ns`).
    let Some(inbound) = VEIL_FWD_FLOWS.get_ptr(held.key) else {
        return;
    };
    // Read in place: the verifier's stack is too small for copies.
    let inbound = unsafe { &*inbound };
    if inbound.created_ns != held.created_ns || inbound.dir != fwd_dir::INBOUND {
        return;
    }
    let (partner, rule) = (inbound.partner(), inbound.rule);
    // Its reply entry is the one made with it: the port may since have
    // gone to another connection, whose entry is not to be touched. One
    // the target may still send on stays (its remote still gets them)
    // until `reclaim` or the daemon's expiry finds it idle: the port is
    // not handed on under a live reply.
    let drop_reply = match VEIL_FWD_FLOWS.get_ptr(partner) {
        Some(reply) if unsafe { (*reply).created_ns } == held.created_ns => {
            let reply = unsafe { &*reply };
            if assured(inbound, reply) {
                return;
            }
            may_take(inbound, reply, now)
        }
        _ => false,
    };
    // The inbound entry first, as the daemon's expiry does: no new packet
    // reaches the target on a NAT port given back. Whoever removes it ends
    // the connection; another CPU may have been first.
    if VEIL_FWD_FLOWS.remove(held.key).is_err() {
        return;
    }
    if drop_reply {
        let _ = VEIL_FWD_FLOWS.remove(partner);
    }
    if let Some(counters) = VEIL_FWD_STATS.get_ptr_mut(rule) {
        stats::fwd_evicted(counters);
    }
}

/// A SYN on a connection that is over (the remote reuses its port, a
/// connection after a reset): a new connection on the same entries, if
/// the rule that made them still sends there. Its flags start again, so
/// that neither expiry nor [`reclaim`] takes it for the closed one.
/// Entries of a rule since removed or changed are deleted instead, and
/// `None` says the SYN is as if they had never been: it opens under the
/// rule in force, if any.
#[inline(always)]
fn reopen(key: &FwdKey, flow: *mut FwdFlow, cfg: &Config) -> Result<Option<*mut FwdFlow>, Reason> {
    let closed = tcp_flags::RST | tcp_flags::FIN;
    let (seen, partner, rule_key, dir) = unsafe {
        (
            (*flow).stats.tcp_flags,
            (*flow).partner(),
            (*flow).rule,
            (*flow).dir,
        )
    };
    let reply = VEIL_FWD_FLOWS.get_ptr_mut(partner);
    let seen_back = match reply {
        Some(reply) => unsafe { (*reply).stats.tcp_flags },
        None => 0,
    };
    if (seen | seen_back) & closed == 0 {
        return Ok(Some(flow));
    }
    let ((out, back), remote) = match dir {
        fwd_dir::INBOUND => ((seen, seen_back), key.src_addr),
        _ => ((seen_back, seen), unsafe { (*flow).dst_addr }),
    };
    // Half closed is not over: one FIN leaves the other way open, and a
    // SYN anyone can send with the remote's tuple must not start the
    // entries again under a live connection.
    if !tcp_over(out, back) {
        return Ok(Some(flow));
    }
    // The old connection stops counting against its remote: the
    // entries' flags start again below, or the entries go.
    if holds_share(out, back) {
        sources::ended(remote);
    }
    if dir == fwd_dir::INBOUND && !still_ruled(unsafe { &*flow }, rule_key) {
        let _ = VEIL_FWD_FLOWS.remove(key);
        let _ = VEIL_FWD_FLOWS.remove(partner);
        return Ok(None);
    }
    // The new one counts once its handshake is over, as any; refused
    // early if its remote has its share already.
    if dir == fwd_dir::INBOUND {
        sources::may_open(remote, cfg)?;
    }
    unsafe {
        (*flow).stats.tcp_flags = 0;
        (*flow).acked = 0;
    }
    if let Some(reply) = reply {
        unsafe {
            (*reply).stats.tcp_flags = 0;
            (*reply).acked = 0;
        }
    }
    if let Some(counters) = VEIL_FWD_STATS.get_ptr_mut(rule_key) {
        stats::fwd_connection(counters);
    }
    Ok(Some(flow))
}

/// Whether the rule an inbound entry was made under still sends its
/// connections where the entry does.
#[inline(always)]
fn still_ruled(inbound: &FwdFlow, rule_key: FwdRuleKey) -> bool {
    match VEIL_FWD_RULES.get_ptr(rule_key) {
        Some(rule) => unsafe {
            (*rule).target_addr == inbound.dst_addr
                && (*rule).target_port == inbound.dst_port
                && (*rule).snat_addr == inbound.src_addr
        },
        None => false,
    }
}

/// Takes over the NAT port of a connection that is over (reset, or closed
/// both ways) for a new one: as conntrack reuses a closed tuple, so that
/// a burst of short connections toward one target is not limited by the
/// daemon's expiry. Also of one not yet [`assured`] that [`may_take`]
/// allows (its handshake not done, or idle a second): the NAT ports toward
/// one target are few (4,536 by default), and a flood of SYNs from forged
/// sources would hold them all for the transitory timeout; the ports it
/// holds go to whoever comes next, and the connections that completed
/// keep theirs. A reply entry left alone (its inbound entry evicted or
/// never made) goes once it has been idle as long. `false` if the port's
/// connection keeps it.
#[inline(always)]
fn reclaim(reply_key: &FwdKey, reply: &FwdFlow, now: u64) -> bool {
    let Some(old) = VEIL_FWD_FLOWS.get_ptr(reply_key) else {
        return false;
    };
    let old = unsafe { &*old };
    let old_inbound = old.partner();
    // Its inbound entry is the one made with it (a later connection from
    // the same remote tuple is another one's, on another port); without
    // one it is an orphan, unless another CPU is making it right now.
    let (over, evicted, paired) = match VEIL_FWD_FLOWS.get_ptr(old_inbound) {
        Some(inbound) if unsafe { (*inbound).created_ns } == old.created_ns => {
            let inbound = unsafe { &*inbound };
            let over = tcp_over(inbound.stats.tcp_flags, old.stats.tcp_flags);
            let evicted = !over && !assured(inbound, old) && may_take(inbound, old, now);
            (over, evicted, true)
        }
        _ => (idle_since(old, now), false, false),
    };
    if !over && !evicted {
        return false;
    }
    // One CPU takes the port: the one whose removal of the old
    // connection's inbound entry succeeded, then whose insertion does.
    if paired && VEIL_FWD_FLOWS.remove(old_inbound).is_err() {
        return false;
    }
    if evicted {
        if let Some(counters) = VEIL_FWD_STATS.get_ptr_mut(old.rule) {
            stats::fwd_evicted(counters);
        }
    }
    let _ = VEIL_FWD_FLOWS.remove(reply_key);
    VEIL_FWD_FLOWS
        .insert(reply_key, reply, BPF_NOEXIST as u64)
        .is_ok()
}

/// TC on an interface targets are reached through: their replies go back
/// to the remotes; everything else is left alone (and uncounted: it is
/// not veil's).
#[inline(always)]
pub fn from_target(ctx: &TcContext) -> Result<Verdict, Reason> {
    pull_headers(ctx)?;
    let cfg = config()?;
    Ok(translate(ctx, cfg)?.unwrap_or(Verdict::uncounted(TC_ACT_OK as i32)))
}
