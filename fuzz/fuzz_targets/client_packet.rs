//! The gateway's verdict on a packet from a client, on arbitrary bytes:
//! as a plain IP packet, and as an offload datagram whose header the
//! session first reduces to its one meaning (`VnetHdr::sanitize`).
//!
//! The verdict is veil-user's own pure function
//! (`veil_user::gateway::check::Checks::check`), compiled into the fuzz
//! crate from its source file (`veil_fuzz::veil_user`).
//!
//! Asserts, beyond "no panic": what `parse` accepts is a whole IPv4 packet
//! whose fields it reports faithfully; a flow exists exactly for
//! unfragmented or first-fragment TCP, UDP and ICMP echo requests and
//! carries those fields; the gateway's own addresses and other clients are
//! always refused; an ICMP error is a well-formed IPv4 packet back to the
//! sender, at most 576 bytes, with correct checksums, quoting the packet's
//! start; a sanitized offload header keeps a partial checksum only in the
//! packet's own transport checksum field.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use veil_common::proto;
use veil_fuzz::{
    ip::{assert_checksum_place, assert_ipv4, be16, ones_sum},
    veil_user::{
        check::{Checks, Dropped, Verdict},
        packet::{self, Fragment},
        policy::EgressPolicy,
    },
};
use veil_proto::gso::{VnetHdr, VNET_HDR_LEN};

/// The gateway's tunnel-side address, and its public one.
const INNER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const MTU: usize = 1400;

fuzz_target!(|data: &[u8]| {
    let pool = "10.77.0.0/16".parse().unwrap();
    let checks = Checks {
        policy: EgressPolicy::new(vec![PUBLIC, INNER], pool, false, Vec::new(), Vec::new()),
        pool,
        gateway: INNER,
        dns: true,
    };
    verdict(&checks, data);
    if let Some((head, rest)) = data.split_first_chunk::<VNET_HDR_LEN>() {
        let mut packet = rest.to_vec();
        if let Ok(hdr) = VnetHdr::from_bytes(*head).sanitize(&mut packet, MTU) {
            check_sanitized(&hdr, &packet);
            verdict(&checks, &packet);
        }
    }
});

/// The header the kernel will trust: a partial checksum only where the
/// packet's own protocol keeps it, segments that fit the MTU.
fn check_sanitized(hdr: &VnetHdr, pkt: &[u8]) {
    assert_eq!(hdr.flags & VnetHdr::F_DATA_VALID, 0);
    if hdr.flags & VnetHdr::F_NEEDS_CSUM == 0 {
        assert_eq!(*hdr, VnetHdr::NONE);
        return;
    }
    assert_checksum_place(hdr, pkt);
    if hdr.is_gso() {
        assert!(usize::from(hdr.hdr_len) + usize::from(hdr.gso_size) <= MTU);
    }
}

fn verdict(checks: &Checks, pkt: &[u8]) {
    // The packet's own source as the client's address, so the checks go
    // past the source check.
    let vip = if pkt.len() >= 16 {
        Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15])
    } else {
        INNER
    };
    let verdict = checks.check(vip, pkt);
    let Ok(info) = packet::parse(pkt) else {
        assert!(matches!(
            verdict,
            Verdict::Dropped {
                why: Dropped::NotIpv4 | Dropped::Malformed(_),
                answer: None
            }
        ));
        return;
    };
    // A whole IPv4 packet, reported as it is.
    assert!(pkt.len() >= 20 && pkt[0] >> 4 == 4);
    assert_eq!(info.header_len, usize::from(pkt[0] & 0xf) * 4);
    assert!(info.header_len >= 20 && info.header_len <= pkt.len());
    assert_eq!(usize::from(be16(pkt, 2)), pkt.len());
    assert_eq!(info.src.octets(), pkt[12..16]);
    assert_eq!(info.dst.octets(), pkt[16..20]);
    assert_eq!((info.proto, info.ttl), (pkt[9], pkt[8]));
    let frag = be16(pkt, 6);
    let expected = match (frag & 0x1fff, frag & 0x2000) {
        (0, 0) => Fragment::Whole,
        (0, _) => Fragment::First,
        _ => Fragment::Later,
    };
    assert_eq!(info.fragment, expected);

    match &verdict {
        Verdict::Datapath { flow } => {
            assert!(
                !checks.pool.contains(info.dst),
                "a client's address NATed out"
            );
            assert!(info.ttl > 1);
            match flow {
                Some(key) => {
                    let l4 = &pkt[info.header_len..];
                    assert_ne!(info.fragment, Fragment::Later);
                    assert_eq!(key.proto, info.proto);
                    assert_eq!(key.client_addr, info.src.octets());
                    assert_eq!(key.remote_addr, info.dst.octets());
                    let ports = match info.proto {
                        proto::ICMP => {
                            assert_eq!(l4[0], 8, "a flow for an ICMP message other than echo");
                            (be16(l4, 4), 0)
                        }
                        proto::TCP | proto::UDP => (be16(l4, 0), be16(l4, 2)),
                        p => panic!("a flow for protocol {p}"),
                    };
                    assert_eq!((key.client_port, key.remote_port), ports);
                }
                None => assert_eq!(info.fragment, Fragment::Later),
            }
        }
        Verdict::Client(_) => panic!("client-to-client is off"),
        Verdict::Dns { .. } => {
            assert_eq!(info.dst, INNER);
            assert_eq!(info.proto, proto::UDP);
        }
        Verdict::Dropped { why, answer } => {
            if let Some(reply) = answer {
                let (icmp_type, code) = match why {
                    Dropped::Policy(_) => (3, 13),
                    Dropped::TtlExpired => (11, 0),
                    other => panic!("an ICMP error for {other:?}"),
                };
                check_icmp_error(reply, pkt, vip, icmp_type, code);
            }
        }
    }
    if info.dst == PUBLIC || (info.dst == INNER && !matches!(verdict, Verdict::Dns { .. })) {
        assert!(
            matches!(verdict, Verdict::Dropped { .. }),
            "the gateway itself is reachable: {verdict:?}"
        );
    }
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
