//! What the gateway decides about a packet a client sent, before any map,
//! device or socket is touched: pure, so the tests (and the fuzzer) run it
//! on any bytes without root.

use std::net::Ipv4Addr;

use veil_common::FlowKey;

use crate::{
    net::Ipv4Net,
    packet::{self, unreachable, Fragment, PacketError},
    policy::{EgressPolicy, Refusal},
};

/// Why a client packet went no further; each is a counter in `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dropped {
    NotIpv4,
    Malformed(PacketError),
    /// The source is not the client's own address.
    ForgedSource(Ipv4Addr),
    Policy(Refusal),
    TtlExpired,
    /// A protocol the datapath does not translate.
    Untranslatable {
        proto: u8,
    },
}

/// What to do with a client packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Into the datapath. `flow` is the flow to make sure of first; a
    /// fragment after the first has none (the datapath matches it to its
    /// first fragment).
    Datapath { flow: Option<FlowKey> },
    /// To another client's session (`--allow-client-to-client`).
    Client(Ipv4Addr),
    /// A DNS query to the gateway's own resolver service: answered in user
    /// space. The query is `pkt[payload..]`, from the client's `port`.
    Dns { port: u16, payload: usize },
    /// Not sent; `answer` is the ICMP error the client gets, if any.
    Dropped {
        why: Dropped,
        answer: Option<Vec<u8>>,
    },
}

/// The rules a client packet is checked against.
#[derive(Clone, Debug)]
pub struct Checks {
    pub policy: EgressPolicy,
    /// The client address pool: another client, if the policy lets it in.
    pub pool: Ipv4Net,
    /// The gateway's address in the pool: the source of its ICMP errors,
    /// and of its DNS service.
    pub gateway: Ipv4Addr,
    /// Whether the gateway serves DNS on `gateway` port 53 (UDP).
    pub dns: bool,
}

impl Checks {
    /// The fate of `pkt` from the client at `vip`. A super-packet is
    /// checked by its first header, which every segment cut from it
    /// repeats.
    pub fn check(&self, vip: Ipv4Addr, pkt: &[u8]) -> Verdict {
        let drop = |why| Verdict::Dropped { why, answer: None };
        let info = match packet::parse(pkt) {
            Ok(info) => info,
            Err(PacketError::NotIpv4(_)) => return drop(Dropped::NotIpv4),
            Err(e) => return drop(Dropped::Malformed(e)),
        };
        if info.src != vip {
            return drop(Dropped::ForgedSource(info.src));
        }
        // No ICMP error about a fragment after the first (RFC 1122 3.2.2):
        // the first one already had its answer.
        let later = info.fragment == Fragment::Later;
        let answer = |icmp_type, code| {
            (!later).then(|| packet::icmp_error(self.gateway, pkt, icmp_type, code))
        };
        // Before the policy, which refuses the gateway itself: this one
        // service of the gateway's is for its clients. Whole datagrams
        // only; a fragmented query is refused below like any other packet
        // to the gateway.
        if self.dns
            && info.dst == self.gateway
            && info.proto == veil_common::proto::UDP
            && info.fragment == Fragment::Whole
        {
            if let Some((port, 53)) = info.ports {
                let udp = &pkt[info.header_len..];
                let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
                if udp_len != udp.len() {
                    return drop(Dropped::Malformed(PacketError::LengthMismatch {
                        total: udp_len,
                        actual: udp.len(),
                    }));
                }
                return Verdict::Dns {
                    port,
                    payload: info.header_len + 8,
                };
            }
        }
        if let Err(refusal) = self.policy.check(info.dst) {
            return Verdict::Dropped {
                why: Dropped::Policy(refusal),
                answer: answer(3, unreachable::ADMIN_PROHIBITED),
            };
        }
        if info.ttl <= 1 {
            return Verdict::Dropped {
                why: Dropped::TtlExpired,
                answer: answer(11, 0),
            };
        }
        if self.pool.contains(info.dst) {
            // Only reached when the policy lets clients reach each other:
            // never NATed out of the WAN. Fragments too: the other client
            // reassembles.
            return Verdict::Client(info.dst);
        }
        if later {
            return Verdict::Datapath { flow: None };
        }
        match info.flow_key() {
            Some(flow) => Verdict::Datapath { flow: Some(flow) },
            None => drop(Dropped::Untranslatable { proto: info.proto }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    const OTHER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
    const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

    fn checks(client_to_client: bool) -> Checks {
        let pool: Ipv4Net = "10.77.0.0/16".parse().unwrap();
        Checks {
            policy: EgressPolicy::new(
                vec![Ipv4Addr::new(198, 18, 0, 1), GATEWAY],
                pool,
                client_to_client,
                vec![],
                vec![],
            ),
            pool,
            gateway: GATEWAY,
            dns: true,
        }
    }

    /// An IPv4 packet with `l4` after a 20-byte header (checksum not
    /// needed: the gateway does not verify it).
    fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, ttl: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0];
        p.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 1]);
        p.extend_from_slice(&frag.to_be_bytes());
        p.extend_from_slice(&[ttl, proto, 0, 0]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(l4);
        p
    }

    fn udp(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        ipv4(src, dst, 17, 64, 0, &[0x9c, 0x40, 0, 53, 0, 9, 0, 0, b'x'])
    }

    #[test]
    fn a_packet_to_the_internet_goes_to_the_datapath_with_its_flow() {
        let v = checks(false).check(VIP, &udp(VIP, REMOTE));
        let flow = FlowKey::new(17, VIP, 40000, REMOTE, 53);
        assert_eq!(v, Verdict::Datapath { flow: Some(flow) });
    }

    #[test]
    fn a_forged_source_is_dropped_without_an_answer() {
        let v = checks(false).check(VIP, &udp(OTHER, REMOTE));
        assert_eq!(
            v,
            Verdict::Dropped {
                why: Dropped::ForgedSource(OTHER),
                answer: None
            }
        );
    }

    #[test]
    fn refusals_are_answered_from_the_gateway_except_for_later_fragments() {
        let lan = Ipv4Addr::new(10, 200, 9, 2);
        let Verdict::Dropped {
            why: Dropped::Policy(_),
            answer: Some(icmp),
        } = checks(false).check(VIP, &udp(VIP, lan))
        else {
            panic!("refused with an answer");
        };
        assert_eq!(&icmp[12..16], &GATEWAY.octets(), "from the gateway");
        assert_eq!(&icmp[16..20], &VIP.octets(), "to the client");
        assert_eq!((icmp[20], icmp[21]), (3, 13), "administratively prohibited");
        let later = ipv4(VIP, lan, 17, 64, 185, b"rest of it");
        assert!(matches!(
            checks(false).check(VIP, &later),
            Verdict::Dropped {
                why: Dropped::Policy(_),
                answer: None
            }
        ));
    }

    #[test]
    fn an_expiring_ttl_gets_time_exceeded() {
        let p = ipv4(VIP, REMOTE, 17, 1, 0, &[0; 8]);
        let Verdict::Dropped {
            why: Dropped::TtlExpired,
            answer: Some(icmp),
        } = checks(false).check(VIP, &p)
        else {
            panic!("time exceeded");
        };
        assert_eq!(icmp[20], 11);
    }

    #[test]
    fn other_clients_only_with_client_to_client_and_never_through_the_datapath() {
        assert!(matches!(
            checks(false).check(VIP, &udp(VIP, OTHER)),
            Verdict::Dropped {
                why: Dropped::Policy(Refusal::OtherClient),
                answer: Some(_)
            }
        ));
        assert_eq!(
            checks(true).check(VIP, &udp(VIP, OTHER)),
            Verdict::Client(OTHER)
        );
        let later = ipv4(VIP, OTHER, 17, 64, 185, b"rest");
        assert_eq!(checks(true).check(VIP, &later), Verdict::Client(OTHER));
    }

    #[test]
    fn a_dns_query_to_the_gateway_is_answered_by_it_and_nothing_else_is() {
        let query = udp(VIP, GATEWAY);
        assert_eq!(
            checks(false).check(VIP, &query),
            Verdict::Dns {
                port: 40000,
                payload: 28
            }
        );
        // Not served: refused like the rest of the gateway.
        let off = Checks {
            dns: false,
            ..checks(false)
        };
        assert!(matches!(
            off.check(VIP, &query),
            Verdict::Dropped {
                why: Dropped::Policy(Refusal::Gateway),
                ..
            }
        ));
        // Other ports, TCP, fragments, other addresses: the policy decides.
        let ntp = ipv4(
            VIP,
            GATEWAY,
            17,
            64,
            0,
            &[0x9c, 0x40, 0, 123, 0, 9, 0, 0, b'x'],
        );
        let tcp = ipv4(
            VIP,
            GATEWAY,
            6,
            64,
            0,
            &[
                0x9c, 0x40, 0, 53, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 2, 0, 0, 0, 0, 0, 0,
            ],
        );
        let first = ipv4(
            VIP,
            GATEWAY,
            17,
            64,
            0x2000,
            &[0x9c, 0x40, 0, 53, 0, 9, 0, 0, b'x'],
        );
        for refused in [ntp, tcp, first] {
            assert!(matches!(
                checks(false).check(VIP, &refused),
                Verdict::Dropped {
                    why: Dropped::Policy(Refusal::Gateway),
                    answer: Some(_)
                }
            ));
        }
        // A query to a resolver elsewhere goes out like any packet: it is
        // the client's choice (its own system points at the gateway's).
        assert!(matches!(
            checks(false).check(VIP, &udp(VIP, REMOTE)),
            Verdict::Datapath { .. }
        ));
        // A forged source is still a forged source; a lying UDP length is
        // malformed.
        assert!(matches!(
            checks(false).check(VIP, &udp(OTHER, GATEWAY)),
            Verdict::Dropped {
                why: Dropped::ForgedSource(_),
                ..
            }
        ));
        let lying = ipv4(
            VIP,
            GATEWAY,
            17,
            64,
            0,
            &[0x9c, 0x40, 0, 53, 0, 99, 0, 0, b'x'],
        );
        assert!(matches!(
            checks(false).check(VIP, &lying),
            Verdict::Dropped {
                why: Dropped::Malformed(_),
                ..
            }
        ));
    }

    #[test]
    fn a_later_fragment_goes_to_the_datapath_without_a_flow() {
        let later = ipv4(VIP, REMOTE, 17, 64, 185, b"rest of it");
        assert_eq!(
            checks(false).check(VIP, &later),
            Verdict::Datapath { flow: None }
        );
    }

    #[test]
    fn what_is_not_ipv4_or_not_translated_is_dropped() {
        let c = checks(false);
        let mut v6 = udp(VIP, REMOTE);
        v6[0] = 0x60;
        assert!(matches!(
            c.check(VIP, &v6),
            Verdict::Dropped {
                why: Dropped::NotIpv4,
                ..
            }
        ));
        assert!(matches!(
            c.check(VIP, &[0x45, 0, 0]),
            Verdict::Dropped {
                why: Dropped::Malformed(_),
                ..
            }
        ));
        let gre = ipv4(VIP, REMOTE, 47, 64, 0, &[0; 8]);
        assert_eq!(
            c.check(VIP, &gre),
            Verdict::Dropped {
                why: Dropped::Untranslatable { proto: 47 },
                answer: None
            }
        );
    }
}
