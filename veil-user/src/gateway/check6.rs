//! What the gateway decides about an IPv6 packet a client sent (beside
//! [`super::check`] for IPv4): pure, run on any bytes without root.
//!
//! Public API: [`Checks6::check`]`(leased, pkt)` → [`Verdict6`].
//!
//! In order: the packet parses ([`veil_proto::packet6::parse6`]); its
//! source is the client's leased IPv6 address (anti-spoofing: anything
//! else is dropped unanswered); the egress policy ([`EgressPolicy6`])
//! lets the destination in (else Destination Unreachable, administratively
//! prohibited); the hop limit is above 1 (else Time Exceeded); and the
//! datapath translates it: TCP, UDP or an ICMPv6 echo request with no
//! extension header but a fragment header right after the IPv6 header
//! (else dropped, counted by cause). A fragment after the first has no
//! ports: it goes to the datapath without a flow, which translates it as
//! its first fragment was, as for IPv4 ([`super::check`]).

use std::net::Ipv6Addr;

use veil_common::FlowKey6;
use veil_proto::packet6::{
    self, icmp6_error, parse6, Fragment, Packet6Error, ICMPV6_DEST_UNREACH, ICMPV6_TIME_EXCEEDED,
    UNREACH_ADMIN_PROHIBITED,
};

use crate::{
    policy::EgressPolicy,
    policy6::{check_nat64, EgressPolicy6, Refusal6},
};

/// Why a client's IPv6 packet went no further.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dropped6 {
    Malformed(Packet6Error),
    /// The source is not the client's own IPv6 address.
    ForgedSource(Ipv6Addr),
    Policy(Refusal6),
    HopLimitExceeded,
    /// An extension header (other than one fragment header right after
    /// the IPv6 header): the datapath translates none.
    ExtensionHeader(u8),
    /// A protocol or ICMPv6 type the datapath does not translate.
    Untranslatable {
        next: u8,
    },
}

/// What to do with a client's IPv6 packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict6 {
    /// Into the datapath once `flow` exists; a fragment after the first
    /// has none (the datapath matches it to its first fragment).
    Datapath { flow: Option<FlowKey6> },
    /// Not sent; `answer` is the ICMPv6 error the client gets, if any.
    Dropped {
        why: Dropped6,
        answer: Option<Vec<u8>>,
    },
}

/// The rules a client's IPv6 packet is checked against.
#[derive(Clone, Debug)]
pub struct Checks6 {
    pub policy: EgressPolicy6,
    /// The IPv4 policy: for a destination in NAT64's prefix, the IPv4
    /// address it stands for is held to it ([`check_nat64`]).
    pub ipv4: EgressPolicy,
    /// The gateway's address in the clients' IPv6 prefix: the source of
    /// its ICMPv6 errors.
    pub gateway: Ipv6Addr,
}

/// Extension headers (RFC 8200 4, and the IANA list): named so that the
/// cause a packet is dropped for says which.
fn is_extension_header(next: u8) -> bool {
    matches!(
        next,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}

impl Checks6 {
    /// The fate of `pkt` from the client whose IPv6 address is `leased`.
    pub fn check(&self, leased: Ipv6Addr, pkt: &[u8]) -> Verdict6 {
        let drop = |why| Verdict6::Dropped { why, answer: None };
        let info = match parse6(pkt) {
            Ok(info) => info,
            Err(e) => return drop(Dropped6::Malformed(e)),
        };
        if info.src != leased {
            return drop(Dropped6::ForgedSource(info.src));
        }
        // As for IPv4: no error about a fragment after the first, whose
        // first fragment already had its answer.
        let later = info.fragment == Fragment::Later;
        let answer =
            |icmp_type, code| (!later).then(|| icmp6_error(self.gateway, pkt, icmp_type, code, 0));
        let allowed = self
            .policy
            .check(info.dst)
            .and_then(|()| check_nat64(&self.ipv4, info.dst));
        if let Err(refusal) = allowed {
            return Verdict6::Dropped {
                why: Dropped6::Policy(refusal),
                answer: answer(ICMPV6_DEST_UNREACH, UNREACH_ADMIN_PROHIBITED),
            };
        }
        if info.hop_limit <= 1 {
            return Verdict6::Dropped {
                why: Dropped6::HopLimitExceeded,
                answer: answer(ICMPV6_TIME_EXCEEDED, 0),
            };
        }
        if later {
            return Verdict6::Datapath { flow: None };
        }
        if is_extension_header(info.next) {
            return drop(Dropped6::ExtensionHeader(info.next));
        }
        match info.flow_key() {
            Some(flow) => Verdict6::Datapath { flow: Some(flow) },
            None => drop(Dropped6::Untranslatable { next: info.next }),
        }
    }
}

/// Packet Too Big from the gateway for a client packet larger than `mtu`
/// (what a router before a smaller link answers in IPv6: nobody on the
/// way fragments).
pub fn too_big(gateway: Ipv6Addr, pkt: &[u8], mtu: u32) -> Vec<u8> {
    packet6::icmp6_packet_too_big(gateway, pkt, mtu)
}

#[cfg(test)]
mod tests {
    use veil_common::{proto, IPPROTO_ICMPV6};
    use veil_proto::packet6::{checksum6, ICMPV6_ECHO_REQUEST};

    use super::*;

    const CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7665, 0x696c, 0, 0, 0, 0x0a4d, 2);
    const OTHER: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7665, 0x696c, 0, 0, 0, 0x0a4d, 3);
    const GATEWAY: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7665, 0x696c, 0, 0, 0, 0x0a4d, 1);
    const PUBLIC: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
    const REMOTE: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);

    fn checks() -> Checks6 {
        Checks6 {
            policy: EgressPolicy6::new(
                vec![PUBLIC, GATEWAY],
                Some("fd00:7665:696c::/64".parse().unwrap()),
                vec![],
                vec![],
            ),
            ipv4: crate::policy::EgressPolicy::new(
                vec![],
                "10.77.0.0/16".parse().unwrap(),
                false,
                vec![],
                vec![],
            ),
            gateway: GATEWAY,
        }
    }

    fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, hop: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        p.extend_from_slice(&[next, hop]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(l4);
        p
    }

    fn udp(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
        ipv6(
            src,
            dst,
            proto::UDP,
            64,
            &[0x9c, 0x40, 0, 53, 0, 9, 0, 0, b'x'],
        )
    }

    fn answer_of(v: &Verdict6) -> &[u8] {
        match v {
            Verdict6::Dropped {
                answer: Some(a), ..
            } => a,
            other => panic!("no answer: {other:?}"),
        }
    }

    #[test]
    fn a_packet_to_the_internet_goes_to_the_datapath_with_its_flow() {
        let v = checks().check(CLIENT, &udp(CLIENT, REMOTE));
        let flow = FlowKey6::new(proto::UDP, CLIENT, 40000, REMOTE, 53);
        assert_eq!(v, Verdict6::Datapath { flow: Some(flow) });
        let ping = ipv6(
            CLIENT,
            REMOTE,
            IPPROTO_ICMPV6,
            64,
            &[ICMPV6_ECHO_REQUEST, 0, 0, 0, 0x12, 0x34, 0, 1],
        );
        let flow = FlowKey6::new(IPPROTO_ICMPV6, CLIENT, 0x1234, REMOTE, 0);
        assert_eq!(
            checks().check(CLIENT, &ping),
            Verdict6::Datapath { flow: Some(flow) }
        );
    }

    #[test]
    fn a_forged_source_is_dropped_without_an_answer() {
        for forged in [OTHER, REMOTE, "fe80::1".parse().unwrap()] {
            assert_eq!(
                checks().check(CLIENT, &udp(forged, REMOTE)),
                Verdict6::Dropped {
                    why: Dropped6::ForgedSource(forged),
                    answer: None
                }
            );
        }
    }

    #[test]
    fn refused_destinations_get_an_admin_prohibited_from_the_gateway() {
        for dst in [
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "::1",
            "2001:db8::1",
            "::ffff:1.2.3.4",
            // NAT64's prefix: 10.0.0.5 and the metadata address.
            "64:ff9b::a00:5",
            "64:ff9b::a9fe:a9fe",
        ] {
            let dst: Ipv6Addr = dst.parse().unwrap();
            let pkt = udp(CLIENT, dst);
            let v = checks().check(CLIENT, &pkt);
            assert!(
                matches!(
                    &v,
                    Verdict6::Dropped {
                        why: Dropped6::Policy(_),
                        ..
                    }
                ),
                "{dst}: {v:?}"
            );
            let a = answer_of(&v);
            assert_eq!(
                (a[40], a[41]),
                (ICMPV6_DEST_UNREACH, UNREACH_ADMIN_PROHIBITED)
            );
            assert_eq!(&a[8..24], &GATEWAY.octets(), "from the gateway");
            assert_eq!(&a[24..40], &CLIENT.octets(), "to the client");
            assert_eq!(checksum6(GATEWAY, CLIENT, IPPROTO_ICMPV6, &a[40..]), 0);
            assert_eq!(&a[48..], &pkt[..], "quotes the packet");
        }
        let nat64: Ipv6Addr = "64:ff9b::c000:201".parse().unwrap();
        assert!(matches!(
            checks().check(CLIENT, &udp(CLIENT, nat64)),
            Verdict6::Datapath { .. }
        ));
        let v = checks().check(CLIENT, &udp(CLIENT, PUBLIC));
        assert!(matches!(
            v,
            Verdict6::Dropped {
                why: Dropped6::Policy(Refusal6::Gateway),
                ..
            }
        ));
    }

    #[test]
    fn hop_limit_one_gets_time_exceeded() {
        let pkt = ipv6(
            CLIENT,
            REMOTE,
            proto::UDP,
            1,
            &[0x9c, 0x40, 0, 53, 0, 8, 0, 0],
        );
        let v = checks().check(CLIENT, &pkt);
        assert!(matches!(
            &v,
            Verdict6::Dropped {
                why: Dropped6::HopLimitExceeded,
                ..
            }
        ));
        assert_eq!(answer_of(&v)[40], ICMPV6_TIME_EXCEEDED);
    }

    #[test]
    fn extension_headers_and_other_protocols_are_dropped_by_cause() {
        // A fragment header leading to a hop-by-hop one.
        let frag_hbh = ipv6(CLIENT, REMOTE, 44, 64, &fragment(0, 0, 1, &[0; 8]));
        assert_eq!(
            checks().check(CLIENT, &frag_hbh),
            Verdict6::Dropped {
                why: Dropped6::ExtensionHeader(0),
                answer: None
            }
        );
        let hbh = ipv6(CLIENT, REMOTE, 0, 64, &[17, 0, 1, 4, 0, 0, 0, 0]);
        assert!(matches!(
            checks().check(CLIENT, &hbh),
            Verdict6::Dropped {
                why: Dropped6::ExtensionHeader(0),
                ..
            }
        ));
        let gre = ipv6(CLIENT, REMOTE, 47, 64, &[0; 8]);
        assert!(matches!(
            checks().check(CLIENT, &gre),
            Verdict6::Dropped {
                why: Dropped6::Untranslatable { next: 47 },
                ..
            }
        ));
        let echo_reply = ipv6(
            CLIENT,
            REMOTE,
            IPPROTO_ICMPV6,
            64,
            &[129, 0, 0, 0, 0, 1, 0, 1],
        );
        assert!(matches!(
            checks().check(CLIENT, &echo_reply),
            Verdict6::Dropped {
                why: Dropped6::Untranslatable { .. },
                ..
            }
        ));
    }

    /// A fragment header (`next`, offset in 8-byte units, more flag,
    /// identification 7) and `rest`.
    fn fragment(next: u8, offset: u16, more: u16, rest: &[u8]) -> Vec<u8> {
        let word = (offset << 3) | more;
        let mut f = vec![next, 0];
        f.extend_from_slice(&word.to_be_bytes());
        f.extend_from_slice(&7u32.to_be_bytes());
        f.extend_from_slice(rest);
        f
    }

    #[test]
    fn fragments_go_to_the_datapath_the_first_with_its_flow_the_later_without() {
        let c = checks();
        let udp_head = [0x9c, 0x40, 0, 53, 0x0b, 0xc0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        let first = ipv6(CLIENT, REMOTE, 44, 64, &fragment(17, 0, 1, &udp_head));
        assert_eq!(
            c.check(CLIENT, &first),
            Verdict6::Datapath {
                flow: Some(FlowKey6::new(proto::UDP, CLIENT, 40000, REMOTE, 53))
            }
        );
        // No ports in a later fragment: its first fragment's flow.
        let later = ipv6(CLIENT, REMOTE, 44, 64, &fragment(17, 2, 0, &[0xab; 16]));
        assert_eq!(c.check(CLIENT, &later), Verdict6::Datapath { flow: None });
        // Its source and destination are checked as any packet's; refused
        // without an answer (the first fragment had it).
        let forged = ipv6(OTHER, REMOTE, 44, 64, &fragment(17, 2, 0, &[0xab; 16]));
        assert_eq!(
            c.check(CLIENT, &forged),
            Verdict6::Dropped {
                why: Dropped6::ForgedSource(OTHER),
                answer: None
            }
        );
        let refused = ipv6(CLIENT, GATEWAY, 44, 64, &fragment(17, 2, 0, &[0xab; 16]));
        assert!(matches!(
            c.check(CLIENT, &refused),
            Verdict6::Dropped {
                why: Dropped6::Policy(_),
                answer: None
            }
        ));
        let refused_first = ipv6(CLIENT, GATEWAY, 44, 64, &fragment(17, 0, 1, &udp_head));
        assert!(matches!(
            c.check(CLIENT, &refused_first),
            Verdict6::Dropped {
                why: Dropped6::Policy(_),
                answer: Some(_)
            }
        ));
        // A first fragment too short for its ports, a cut fragment header.
        let short = ipv6(CLIENT, REMOTE, 44, 64, &fragment(17, 0, 1, &udp_head[..4]));
        let cut = ipv6(CLIENT, REMOTE, 44, 64, &[17, 0, 0]);
        for bad in [short, cut] {
            assert!(matches!(
                c.check(CLIENT, &bad),
                Verdict6::Dropped {
                    why: Dropped6::Malformed(_),
                    ..
                }
            ));
        }
    }

    #[test]
    fn garbage_is_malformed_never_a_panic() {
        for junk in [
            &[][..],
            &[0x60; 39],
            &[0x45; 60],
            &[0x60, 0, 0, 0, 0xff, 0xff, 17, 64],
        ] {
            assert!(matches!(
                checks().check(CLIENT, junk),
                Verdict6::Dropped {
                    why: Dropped6::Malformed(_),
                    answer: None
                }
            ));
        }
    }
}
