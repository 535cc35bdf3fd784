//! The gateway's verdict on an IPv6 packet from a client, on arbitrary
//! bytes (`veil_user::gateway::check6::Checks6::check`, compiled into the
//! fuzz crate from its source file).
//!
//! Asserts, beyond "no panic": a packet goes to the datapath only if it is
//! a whole IPv6 packet from the client's leased address, to a destination
//! the policy allows (never the gateway, another client, a unique-local,
//! link-local or multicast address), with a hop limit above 1, and its
//! flow carries its fields; every ICMPv6 answer is a well-formed IPv6
//! packet from the gateway to the sender, at most 1280 bytes, with a
//! correct checksum, quoting the packet's start; a forged source gets no
//! answer.
#![no_main]

use std::net::Ipv6Addr;

use libfuzzer_sys::fuzz_target;
use veil_common::IPPROTO_ICMPV6;
use veil_fuzz::{
    ip::be16,
    veil_user::{
        check6::{Checks6, Dropped6, Verdict6},
        policy::EgressPolicy,
        policy6::EgressPolicy6,
    },
};
use veil_proto::packet6::{checksum6, parse6, Fragment};

const GATEWAY: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7665, 0x696c, 0, 0, 0, 0x0a4d, 1);
const PUBLIC: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);

fuzz_target!(|data: &[u8]| {
    let pool: ipnet::Ipv6Net = "fd00:7665:696c::/64".parse().unwrap();
    let checks = Checks6 {
        policy: EgressPolicy6::new(vec![PUBLIC, GATEWAY], Some(pool), Vec::new(), Vec::new()),
        ipv4: EgressPolicy::new(
            Vec::new(),
            "10.77.0.0/16".parse().unwrap(),
            false,
            Vec::new(),
            Vec::new(),
        ),
        gateway: GATEWAY,
    };
    // The packet's own source as the client's address, so the checks go
    // past the source check; and a fixed one, for the forged case.
    let own = data
        .get(8..24)
        .map(|a| Ipv6Addr::from(<[u8; 16]>::try_from(a).unwrap()));
    for leased in own.into_iter().chain([GATEWAY]) {
        verdict(&checks, &pool, leased, data);
    }
});

fn verdict(checks: &Checks6, pool: &ipnet::Ipv6Net, leased: Ipv6Addr, pkt: &[u8]) {
    let verdict = checks.check(leased, pkt);
    let Ok(info) = parse6(pkt) else {
        assert!(matches!(
            verdict,
            Verdict6::Dropped {
                why: Dropped6::Malformed(_),
                answer: None
            }
        ));
        return;
    };
    assert!(pkt.len() >= 40 && pkt[0] >> 4 == 6);
    assert_eq!(usize::from(be16(pkt, 4)) + 40, pkt.len());
    match &verdict {
        Verdict6::Datapath { flow } => {
            assert_eq!(info.src, leased);
            assert!(info.hop_limit > 1);
            let dst = info.dst;
            assert!(!pool.contains(&dst), "a client's address NATed out");
            assert!(dst != PUBLIC && dst != GATEWAY);
            assert!(!dst.is_multicast() && !dst.is_unicast_link_local());
            assert!(!dst.is_unique_local() && !dst.is_loopback());
            assert!(dst.to_ipv4_mapped().is_none());
            // A fragment after the first has no ports, so no flow.
            let Some(flow) = flow else {
                assert_eq!((pkt[6], info.fragment), (44, Fragment::Later));
                return;
            };
            assert_eq!(flow.client_addr, info.src.octets());
            assert_eq!(flow.remote_addr, dst.octets());
            // Past a fragment header right after the IPv6 header, or none.
            let (next, l4) = match pkt[6] {
                44 => (pkt[40], &pkt[48..]),
                n => (n, &pkt[40..]),
            };
            assert_eq!(flow.proto, next);
            let ports = match next {
                IPPROTO_ICMPV6 => {
                    assert_eq!(l4[0], 128, "a flow for an ICMPv6 message other than echo");
                    (be16(l4, 4), 0)
                }
                6 | 17 => (be16(l4, 0), be16(l4, 2)),
                p => panic!("a flow for next header {p}"),
            };
            assert_eq!((flow.client_port, flow.remote_port), ports);
        }
        Verdict6::Dropped { why, answer } => {
            if matches!(why, Dropped6::ForgedSource(_)) {
                assert_ne!(info.src, leased);
            }
            if let Some(a) = answer {
                assert!(a.len() <= 1280, "an ICMPv6 error of {} bytes", a.len());
                let reply = parse6(a).expect("a well-formed IPv6 answer");
                assert_eq!((reply.src, reply.dst), (GATEWAY, info.src));
                assert_eq!(reply.next, IPPROTO_ICMPV6);
                assert!(reply.icmp_type.is_some_and(|t| t < 128), "an error type");
                assert_eq!(checksum6(GATEWAY, info.src, IPPROTO_ICMPV6, &a[40..]), 0);
                let quote = &a[48..];
                assert_eq!(quote, &pkt[..quote.len()], "quotes the packet's start");
            }
        }
    }
}
