//! The gateway's checks on a packet from a client, on arbitrary bytes: as
//! a plain IP packet, and as an offload datagram (header then packet) that
//! the session lets through only if `VnetHdr::split` accepts it.
//!
//! veil-user's `packet`, `policy` and `net` are compiled into the fuzz
//! crate from their source files (`veil_fuzz::veil_user`); depending on
//! veil-user itself would build tokio, rustls, ring and aya into every
//! fresh fuzz build.
//!
//! `gateway_check` mirrors `veil_user::gateway`'s `client_packet` without
//! its flow table and counters: parse, source check, egress policy, TTL,
//! ICMP errors, flow key. Point it at a single function once the gateway
//! has one for its whole per-packet check.
//!
//! Asserts, beyond "no panic": what `parse` accepts is a whole IPv4 packet
//! whose fields it reports faithfully; the flow key exists exactly for
//! unfragmented TCP, UDP and ICMP echo requests and carries those fields;
//! the gateway's own addresses are always refused; an ICMP error is a
//! well-formed IPv4 packet back to the sender, at most 576 bytes, with
//! correct checksums, quoting the packet's start.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use veil_common::proto;
use veil_fuzz::{
    ip::{assert_ipv4, be16, ones_sum},
    veil_user::{
        packet::{self, icmp_error, unreachable},
        policy::EgressPolicy,
    },
};
use veil_proto::gso::VnetHdr;

/// The gateway's tunnel-side address, and its public one.
const INNER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

fuzz_target!(|data: &[u8]| {
    let policy = EgressPolicy::new(
        vec![PUBLIC, INNER],
        "10.77.0.0/16".parse().unwrap(),
        false,
        Vec::new(),
        Vec::new(),
    );
    gateway_check(&policy, &VnetHdr::NONE, data);
    if let Ok((hdr, packet)) = VnetHdr::split(data) {
        gateway_check(&policy, &hdr, packet);
    }
});

/// What the gateway does with one client packet before its flow table:
/// the reply it owes the client, if any.
fn gateway_check(policy: &EgressPolicy, _hdr: &VnetHdr, pkt: &[u8]) -> Option<Vec<u8>> {
    let info = packet::parse(pkt).ok()?;
    // A whole IPv4 packet, reported as it is.
    assert!(pkt.len() >= 20 && pkt[0] >> 4 == 4);
    assert_eq!(info.header_len, usize::from(pkt[0] & 0xf) * 4);
    assert!(info.header_len >= 20 && info.header_len <= pkt.len());
    assert_eq!(usize::from(be16(pkt, 2)), pkt.len());
    assert_eq!(info.src.octets(), pkt[12..16]);
    assert_eq!(info.dst.octets(), pkt[16..20]);
    assert_eq!((info.proto, info.ttl), (pkt[9], pkt[8]));
    assert_eq!(info.fragment, be16(pkt, 6) & 0x3fff != 0);
    check_flow_key(&info, pkt);

    let vip = info.src;
    let refused = policy.check(info.dst);
    if info.dst == INNER || info.dst == PUBLIC {
        assert!(refused.is_err(), "the gateway itself is reachable");
    }
    if refused.is_err() {
        let reply = icmp_error(INNER, pkt, 3, unreachable::ADMIN_PROHIBITED);
        check_icmp_error(&reply, pkt, vip, 3, unreachable::ADMIN_PROHIBITED);
        return Some(reply);
    }
    if info.ttl <= 1 {
        let reply = icmp_error(INNER, pkt, 11, 0);
        check_icmp_error(&reply, pkt, vip, 11, 0);
        return Some(reply);
    }
    None
}

fn check_flow_key(info: &packet::Ipv4Info, pkt: &[u8]) {
    let l4 = &pkt[info.header_len..];
    let translatable = !info.fragment
        && l4.len() >= 8
        && match info.proto {
            proto::TCP | proto::UDP => true,
            proto::ICMP => l4[0] == 8,
            _ => false,
        };
    let Some(key) = info.flow_key() else {
        assert!(!translatable, "no flow for a translatable packet");
        return;
    };
    assert!(
        translatable,
        "a flow for a packet the datapath cannot translate"
    );
    assert_eq!(key.proto, info.proto);
    assert_eq!(key.client_addr, info.src.octets());
    assert_eq!(key.remote_addr, info.dst.octets());
    let ports = match info.proto {
        proto::ICMP => (be16(l4, 4), 0),
        _ => (be16(l4, 0), be16(l4, 2)),
    };
    assert_eq!((key.client_port, key.remote_port), ports);
}

fn check_icmp_error(reply: &[u8], pkt: &[u8], to: Ipv4Addr, icmp_type: u8, code: u8) {
    let quoted = pkt.len().min(576 - 28);
    assert_eq!(reply.len(), 28 + quoted);
    assert!(reply.len() <= 576);
    assert_eq!(assert_ipv4(reply), 20);
    assert_eq!(reply[9], proto::ICMP);
    assert_eq!(reply[12..16], INNER.octets());
    assert_eq!(reply[16..20], to.octets(), "back to the sender");
    assert_eq!((reply[20], reply[21]), (icmp_type, code));
    assert_eq!(ones_sum(&reply[20..]), 0xffff, "ICMP checksum");
    assert_eq!(&reply[28..], &pkt[..quoted]);
}
