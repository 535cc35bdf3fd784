//! The real eBPF programs' IPv6 paths (NAT66) under BPF_PROG_TEST_RUN: for
//! every path the action, the exact output bytes against packets etherparse
//! builds, the checksums recomputed from scratch, the map state and the
//! reason counted.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN). Run through `cargo xtask test`.

use std::net::Ipv6Addr;

use veil_common::{frag_kind, proto, tcp_flags, FragEntry6, FragKey6, Reason, IPPROTO_ICMPV6};
use veil_tests::{
    bed::{port_besides, Bed, PORTS, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS},
    bed6::*,
    packet::{ETH_LEN, L4},
    packet6::{
        assert_checksums6, fragment6, fragment_id, frame6, icmp6_error, raw_frame6, reassemble6,
        with_ext_header, IPV6_LEN,
    },
};

fn ip(frame: &[u8]) -> &[u8] {
    &frame[ETH_LEN..]
}

// ---- egress: client -> internet (TC on the TUN device) ----

#[test]
fn egress_udp6_leaves_from_the_public_ipv6_address() {
    let mut bed = Bed6::new();
    let (key, nat) = bed.flow(proto::UDP, 40000, 53);
    let input = frame6(CLIENT6, REMOTE6, 64, L4::udp(40000, 53, b"a question"));

    let (action, out) = bed.tun(&input);

    assert_eq!(
        action, TC_ACT_REDIRECT,
        "sent to the WAN with redirect_neigh"
    );
    assert_eq!(
        out,
        frame6(PUBLIC6, REMOTE6, 63, L4::udp(nat, 53, b"a question")),
        "source = public:nat port, hop limit - 1, all else intact"
    );
    assert_checksums6(ip(&out));
    let flow = bed.listed(&key);
    assert_eq!(flow.egress.packets, 1);
    assert_eq!(flow.egress.bytes, input.len() as u64);
    assert!(flow.egress.last_seen_ns > 0);
    assert_eq!(bed.count(Reason::EgressForwarded), 1);
}

#[test]
fn egress_tcp6_records_flags_and_fixes_its_checksum() {
    let mut bed = Bed6::new();
    let (key, nat) = bed.flow(proto::TCP, 50000, 443);
    let input = frame6(CLIENT6, REMOTE6, 64, L4::tcp(50000, 443, "S", b""));

    let (action, out) = bed.tun(&input);

    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(
        out,
        frame6(PUBLIC6, REMOTE6, 63, L4::tcp(nat, 443, "S", b""))
    );
    assert_checksums6(ip(&out));
    assert_eq!(bed.listed(&key).egress.tcp_flags, tcp_flags::SYN);

    let data = frame6(
        CLIENT6,
        REMOTE6,
        64,
        L4::tcp(50000, 443, "PA", &[0xab; 1000]),
    );
    let (action, out) = bed.tun(&data);
    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(
        out,
        frame6(PUBLIC6, REMOTE6, 63, L4::tcp(nat, 443, "PA", &[0xab; 1000]))
    );
    assert_checksums6(ip(&out));
}

#[test]
fn egress_echo6_uses_the_identifier_as_port() {
    let mut bed = Bed6::new();
    let (_, nat) = bed.flow(IPPROTO_ICMPV6, 0x1234, 0);
    let input = frame6(CLIENT6, REMOTE6, 64, L4::echo_request(0x1234, 7, b"ping!"));

    let (action, out) = bed.tun(&input);

    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(
        out,
        frame6(PUBLIC6, REMOTE6, 63, L4::echo_request(nat, 7, b"ping!"))
    );
    assert_checksums6(ip(&out));
}

#[test]
fn egress6_without_a_flow_is_dropped_and_counted() {
    let mut bed = Bed6::new();
    let (action, _) = bed.tun(&frame6(CLIENT6, REMOTE6, 64, L4::udp(40000, 53, b"x")));
    assert_eq!(action, TC_ACT_SHOT);
    assert_eq!(bed.count(Reason::DropNoEgressFlow), 1);
    // Another client's source on this client's flow: no flow either.
    bed.flow(proto::UDP, 40000, 53);
    let (action, _) = bed.tun(&frame6(CLIENT6_2, REMOTE6, 64, L4::udp(40000, 53, b"x")));
    assert_eq!(action, TC_ACT_SHOT);
    assert_eq!(bed.count(Reason::DropNoEgressFlow), 2);
    assert_eq!(bed.count(Reason::EgressForwarded), 0);
}

#[test]
fn egress6_refuses_what_it_cannot_translate_with_a_reason() {
    let mut bed = Bed6::new();
    bed.flow(proto::UDP, 40000, 53);
    let good = frame6(CLIENT6, REMOTE6, 64, L4::udp(40000, 53, b"hello"));
    let hop_by_hop = with_ext_header(&good, 0, 0);
    let dest_opts = with_ext_header(&good, 60, 0);
    // A fragment whose upper layer is another fragment header.
    let fragment = with_ext_header(&with_ext_header(&good, 44, 1), 44, 1);
    let expiring = frame6(CLIENT6, REMOTE6, 1, L4::udp(40000, 53, b"x"));
    let mut echo_reply = frame6(CLIENT6, REMOTE6, 64, L4::echo_reply(1, 1, b""));
    echo_reply[ETH_LEN + IPV6_LEN] = 129;
    let gre = raw_frame6(CLIENT6, REMOTE6, 47, 64, &[0; 8]);
    let truncated = good[..ETH_LEN + IPV6_LEN + 4].to_vec();

    for (input, reason) in [
        (&hop_by_hop, Reason::DropIpv6ExtHeader),
        (&dest_opts, Reason::DropIpv6ExtHeader),
        (&fragment, Reason::DropIpv6Fragment),
        (&expiring, Reason::DropTtlExpired),
        (&echo_reply, Reason::DropUnsupported),
        (&gre, Reason::DropUnsupported),
        (&truncated, Reason::DropMalformed),
    ] {
        let before = bed.count(reason);
        let (action, _) = bed.tun(input);
        assert_eq!(action, TC_ACT_SHOT, "{reason:?}");
        assert_eq!(bed.count(reason), before + 1, "{reason:?}");
    }
    assert_eq!(bed.count(Reason::EgressForwarded), 0);
}

#[test]
fn without_ipv6_configured_the_tunnels_ipv6_is_dropped_and_the_wans_passes() {
    let mut bed = Bed::new();
    let (action, _) = bed.tun(&frame6(CLIENT6, REMOTE6, 64, L4::udp(40000, 53, b"x")));
    assert_eq!(action, TC_ACT_SHOT);
    assert_eq!(bed.count(Reason::DropUnsupported), 1);
    let syn = frame6(REMOTE6, PUBLIC6, 64, L4::tcp(443, PORTS.min, "S", b""));
    assert!(bed.wan(&syn).passed_untouched(&syn), "the host's business");
}

// ---- ingress: internet -> client (XDP + TC on the WAN) ----

#[test]
fn ingress_udp6_reply_goes_back_to_the_client() {
    let mut bed = Bed6::new();
    let (key, nat) = bed.flow(proto::UDP, 40000, 53);
    let reply = frame6(REMOTE6, PUBLIC6, 60, L4::udp(53, nat, b"the answer"));

    let wan = bed.wan(&reply);

    assert!(wan.delivered(), "{wan:?}");
    assert_eq!(
        wan.out,
        frame6(REMOTE6, CLIENT6, 60, L4::udp(53, 40000, b"the answer"))
    );
    assert_checksums6(ip(&wan.out));
    assert_eq!(bed.listed(&key).reverse.packets, 1);
    assert_eq!(bed.count(Reason::IngressForwarded), 1);
}

#[test]
fn ingress_tcp6_reply_records_flags() {
    let mut bed = Bed6::new();
    let (key, nat) = bed.flow(proto::TCP, 50000, 443);
    let reply = frame6(REMOTE6, PUBLIC6, 60, L4::tcp(443, nat, "SA", b""));

    let wan = bed.wan(&reply);

    assert!(wan.delivered(), "{wan:?}");
    assert_eq!(
        wan.out,
        frame6(REMOTE6, CLIENT6, 60, L4::tcp(443, 50000, "SA", b""))
    );
    assert_checksums6(ip(&wan.out));
    assert_eq!(
        bed.listed(&key).reverse.tcp_flags,
        tcp_flags::SYN | tcp_flags::ACK
    );
}

#[test]
fn ingress_echo6_reply_gets_its_identifier_back() {
    let mut bed = Bed6::new();
    let (_, nat) = bed.flow(IPPROTO_ICMPV6, 0x1234, 0);
    let reply = frame6(REMOTE6, PUBLIC6, 60, L4::echo_reply(nat, 7, b"pong"));

    let wan = bed.wan(&reply);

    assert!(wan.delivered(), "{wan:?}");
    assert_eq!(
        wan.out,
        frame6(REMOTE6, CLIENT6, 60, L4::echo_reply(0x1234, 7, b"pong"))
    );
    assert_checksums6(ip(&wan.out));
}

#[test]
fn an_unsolicited_syn6_to_the_nat_range_is_dropped_in_xdp() {
    let mut bed = Bed6::new();
    let (_, nat) = bed.flow(proto::TCP, 50000, 443);
    for syn in [
        // No flow on that port at all.
        frame6(
            REMOTE6,
            PUBLIC6,
            64,
            L4::tcp(443, port_besides(nat), "S", b""),
        ),
        // The flow's port, but from another remote port: filtering is
        // address-and-port dependent.
        frame6(REMOTE6, PUBLIC6, 64, L4::tcp(444, nat, "S", b"")),
        // The flow's port from another host.
        frame6(ROUTER6, PUBLIC6, 64, L4::tcp(443, nat, "S", b"")),
    ] {
        let wan = bed.wan(&syn);
        assert_eq!(wan.xdp, XDP_DROP, "dropped before the kernel could answer");
    }
    assert_eq!(bed.count(Reason::DropNoIngressFlow6), 3);
    let udp = frame6(REMOTE6, PUBLIC6, 64, L4::udp(53, PORTS.max, b"x"));
    assert_eq!(bed.wan(&udp).xdp, XDP_DROP);
    assert_eq!(bed.count(Reason::DropNoIngressFlow6), 4);
}

#[test]
fn the_hosts_own_ipv6_traffic_passes_untouched() {
    let mut bed = Bed6::new();
    bed.flow(proto::TCP, 50000, 443);
    let ssh = frame6(REMOTE6, PUBLIC6, 64, L4::tcp(50000, 22, "S", b""));
    let ping = frame6(
        REMOTE6,
        PUBLIC6,
        64,
        L4::echo_request(PORTS.min, 1, b"hi gateway"),
    );
    // An echo reply in the NAT range without a flow: the host's own ping.
    let pong = frame6(REMOTE6, PUBLIC6, 64, L4::echo_reply(PORTS.min + 3, 1, b""));
    // Neighbour solicitation for the public address.
    let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
    ns.extend_from_slice(&PUBLIC6.octets());
    let ns = raw_frame6(
        "fe80::2".parse().unwrap(),
        "ff02::1:ff00:1".parse().unwrap(),
        58,
        255,
        &ns,
    );
    let elsewhere = frame6(REMOTE6, ROUTER6, 64, L4::udp(53, PORTS.min, b"x"));
    for input in [&ssh, &ping, &pong, &ns, &elsewhere] {
        let wan = bed.wan(input);
        assert!(wan.passed_untouched(input), "{wan:?}");
    }
    assert_eq!(bed.count(Reason::PassToHost), 5);
}

#[test]
fn wan_packets6_addressed_to_a_client_are_dropped_as_forged() {
    let mut bed = Bed6::new();
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    for forged in [
        frame6(REMOTE6, CLIENT6, 64, L4::udp(53, 40000, b"x")),
        frame6(REMOTE6, CLIENT6_2, 64, L4::tcp(443, nat, "S", b"")),
    ] {
        let wan = bed.wan(&forged);
        assert_eq!(wan.xdp, XDP_DROP);
    }
    assert_eq!(bed.count(Reason::DropSpoofedV6), 2);
}

#[test]
fn wan_extension_headers_to_the_nat_range_are_dropped_with_a_reason() {
    let mut bed = Bed6::new();
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    let reply = frame6(REMOTE6, PUBLIC6, 60, L4::udp(53, nat, b"the answer"));
    for (n, kind) in [0, 60, 43].into_iter().enumerate() {
        let input = with_ext_header(&reply, kind, 1);
        let wan = bed.wan(&input);
        assert_eq!(wan.xdp, XDP_DROP, "next header {kind}");
        assert_eq!(bed.count(Reason::DropIpv6ExtHeader) as usize, n + 1);
    }
    // A fragment header after another extension header: not translated.
    let late_fragment = with_ext_header(&with_ext_header(&reply, 44, 1), 60, 0);
    assert_eq!(bed.wan(&late_fragment).xdp, XDP_DROP);
    assert_eq!(bed.count(Reason::DropIpv6Fragment), 1);
    // Two headers in a chain are walked too.
    let twice = with_ext_header(&with_ext_header(&reply, 60, 0), 0, 0);
    assert_eq!(bed.wan(&twice).xdp, XDP_DROP);
    // The same headers outside the NAT range are the host's.
    let ssh = with_ext_header(
        &frame6(REMOTE6, PUBLIC6, 64, L4::tcp(50000, 22, "S", b"")),
        60,
        0,
    );
    assert!(bed.wan(&ssh).passed_untouched(&ssh));
    // A later fragment has no ports: the host's, as for IPv4.
    let later = with_ext_header(&reply, 44, 0x00a8);
    assert!(bed.wan(&later).passed_untouched(&later));
    // A chain longer than the walk (five headers) hides its port: dropped,
    // where it went to the host, whose kernel answered one to a NAT port
    // with an RST or port unreachable.
    let chain = |packet: &[u8]| (0..5).fold(packet.to_vec(), |p, _| with_ext_header(&p, 60, 0));
    let dropped = bed.count(Reason::DropIpv6ExtHeader);
    assert_eq!(bed.wan(&chain(&reply)).xdp, XDP_DROP);
    let syn = frame6(REMOTE6, PUBLIC6, 64, L4::tcp(50000, nat, "S", b""));
    assert_eq!(bed.wan(&chain(&syn)).xdp, XDP_DROP);
    assert_eq!(bed.count(Reason::DropIpv6ExtHeader), dropped + 2);
    // Four are walked, and what is behind them judged as usual.
    let four = (0..4).fold(reply.clone(), |p, _| with_ext_header(&p, 60, 0));
    assert_eq!(bed.wan(&four).xdp, XDP_DROP);
    assert_eq!(bed.count(Reason::DropIpv6ExtHeader), dropped + 3);
}

// ---- ICMPv6 errors about NATed flows ----

/// The packet the remote side saw (translated), as a quote.
fn sent(bed: &mut Bed6, input: &[u8]) -> Vec<u8> {
    let (action, out) = bed.tun(input);
    assert_eq!(action, TC_ACT_REDIRECT);
    out[ETH_LEN..].to_vec()
}

#[test]
fn packet_too_big_reaches_the_client_whose_flow_caused_it_and_only_it() {
    let mut bed = Bed6::new();
    let (_, nat_a) = bed.flow_of(VIP, CLIENT6, proto::TCP, 50000, 443);
    let (_, nat_b) = bed.flow_of(VIP2, CLIENT6_2, proto::TCP, 50000, 443);
    assert_ne!(nat_a, nat_b);
    let big = frame6(
        CLIENT6_2,
        REMOTE6,
        64,
        L4::tcp(50000, 443, "PA", &[7; 1300]),
    );
    let on_the_wire = sent(&mut bed, &big);
    // A router quotes what fits in 1280 bytes.
    let quote = &on_the_wire[..1280 - 48];
    let ptb = icmp6_error(ROUTER6, PUBLIC6, 2, 0, 1280, quote);

    let wan = bed.wan(&ptb);

    assert!(wan.delivered(), "{wan:?}");
    assert_eq!(bed.count(Reason::IcmpErrorForwarded), 1);
    // What the client's kernel gets: the error to it, the MTU kept, and
    // the quote its own packet as it sent it (hop limit as it left).
    let mut mine = big[ETH_LEN..].to_vec();
    mine[7] = 63;
    let expected = icmp6_error(ROUTER6, CLIENT6_2, 2, 0, 1280, &mine[..1280 - 48]);
    assert_eq!(wan.out, expected);
    assert_checksums6(ip(&wan.out));
}

#[test]
fn destination_unreachable_for_a_udp6_flow_and_time_exceeded_for_a_ping() {
    let mut bed = Bed6::new();
    bed.flow(proto::UDP, 40000, 9999);
    bed.flow(IPPROTO_ICMPV6, 0x4242, 0);
    let udp = frame6(CLIENT6, REMOTE6, 64, L4::udp(40000, 9999, b"anyone?"));
    let ping = frame6(CLIENT6, REMOTE6, 64, L4::echo_request(0x4242, 3, b"hello"));
    for (input, icmp_type, code, from) in [(&udp, 1, 4, REMOTE6), (&ping, 3, 0, ROUTER6)] {
        let quote = sent(&mut bed, input);
        let error = icmp6_error(from, PUBLIC6, icmp_type, code, 0, &quote);
        let wan = bed.wan(&error);
        assert!(wan.delivered(), "{wan:?}");
        let mut mine = input[ETH_LEN..].to_vec();
        mine[7] = 63;
        assert_eq!(
            wan.out,
            icmp6_error(from, CLIENT6, icmp_type, code, 0, &mine)
        );
        assert_checksums6(ip(&wan.out));
    }
    assert_eq!(bed.count(Reason::IcmpErrorForwarded), 2);
}

#[test]
fn a_short_tcp6_quote_is_translated_without_its_checksum() {
    let mut bed = Bed6::new();
    bed.flow(proto::TCP, 50000, 443);
    let input = frame6(CLIENT6, REMOTE6, 64, L4::tcp(50000, 443, "S", b""));
    let quote = sent(&mut bed, &input);
    // Only 8 bytes of the TCP header quoted: ports and sequence number.
    let error = icmp6_error(ROUTER6, PUBLIC6, 1, 0, 0, &quote[..IPV6_LEN + 8]);
    let wan = bed.wan(&error);
    assert!(wan.delivered(), "{wan:?}");
    let mut mine = input[ETH_LEN..ETH_LEN + IPV6_LEN + 8].to_vec();
    mine[7] = 63;
    assert_eq!(wan.out, icmp6_error(ROUTER6, CLIENT6, 1, 0, 0, &mine));
    assert_checksums6(ip(&wan.out));
}

#[test]
fn icmp6_errors_without_a_flow_are_dropped_and_the_hosts_own_pass() {
    let mut bed = Bed6::new();
    // A flow's quote, but no such flow: the NAT range stays closed.
    let stray = frame6(PUBLIC6, REMOTE6, 63, L4::udp(PORTS.min + 5, 53, b"x"));
    let error = icmp6_error(ROUTER6, PUBLIC6, 1, 4, 0, &stray[ETH_LEN..]);
    assert_eq!(bed.wan(&error).xdp, XDP_DROP);
    assert_eq!(bed.count(Reason::DropNoIngressFlow6), 1);
    // About the host's own packet (port 22, outside the NAT range).
    let ssh = frame6(PUBLIC6, REMOTE6, 64, L4::tcp(22, 50000, "SA", b""));
    let error = icmp6_error(ROUTER6, PUBLIC6, 2, 0, 1400, &ssh[ETH_LEN..]);
    let wan = bed.wan(&error);
    assert!(wan.passed_untouched(&error), "{wan:?}");
    assert_eq!(wan.tc, Some(TC_ACT_OK));
}

#[test]
fn reply_hop_limit_and_counters_and_expiry_of_v6_flows() {
    let mut bed = Bed6::new();
    let (key, _) = bed.flow(proto::UDP, 40000, 53);
    assert_eq!(bed.flows6.len(), 1);
    // Not idle yet at creation time; long after, expired and gone from
    // both maps.
    assert!(bed.flows6.gc(2).unwrap().is_empty());
    let known = bed.flows6.known();
    assert!(known.contains(&key), "a new flow is known without the lock");
    let expired = bed.flows6.gc(u64::MAX / 2).unwrap();
    assert_eq!(expired, vec![key]);
    assert_eq!(bed.flows6.len(), 0);
    assert!(!known.contains(&key), "an expired flow is no longer known");
    let (action, _) = bed.tun(&frame6(CLIENT6, REMOTE6, 64, L4::udp(40000, 53, b"x")));
    assert_eq!(action, TC_ACT_SHOT, "the egress entry went with it");
    let _ = XDP_PASS;
}

#[test]
fn bpftool_shows_the_ipv6_maps_with_named_fields() {
    let (mut bed, dir, _fs) = Bed6::pinned();
    let (_, nat) = bed.flow(proto::TCP, 50000, 443);
    let dump = |file: &str| -> serde_json::Value {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(dir.join(file))
            .output()
            .expect("running bpftool");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let octets = |a: std::net::Ipv6Addr| serde_json::json!(a.octets());
    let egress = dump("egress6");
    let e = &egress[0]["formatted"];
    assert_eq!(e["key"]["client_addr"], octets(CLIENT6), "{egress}");
    assert_eq!(e["key"]["remote_addr"], octets(REMOTE6));
    assert_eq!(e["key"]["client_port"], 50000);
    assert_eq!(e["key"]["remote_port"], 443);
    assert_eq!(e["key"]["proto"], proto::TCP);
    assert_eq!(e["value"]["public_addr"], octets(PUBLIC6));
    assert_eq!(e["value"]["nat_port"], nat);
    assert_eq!(e["value"]["client_vip"], serde_json::json!(VIP.octets()));
    let reverse = dump("reverse6");
    let r = &reverse[0]["formatted"];
    assert_eq!(r["key"]["nat_port"], nat, "{reverse}");
    assert_eq!(r["value"]["client_addr"], octets(CLIENT6));
    let config = dump("config6");
    assert_eq!(
        config[0]["formatted"]["value"]["public_addr"],
        octets(PUBLIC6),
        "{config}"
    );
    assert_eq!(config[0]["formatted"]["value"]["enabled"], 1);
    // A reply's first fragment, noted for the fragments after it.
    let (_, udp_nat) = bed.flow(proto::UDP, 50001, 443);
    let first = &udp_fragments(REMOTE6, PUBLIC6, 60, 443, udp_nat)[0];
    assert!(bed.wan(first).delivered());
    let fragments = dump("fragments6");
    let f = &fragments[0]["formatted"];
    assert_eq!(f["key"]["src_addr"], octets(REMOTE6), "{fragments}");
    assert_eq!(f["key"]["dst_addr"], octets(PUBLIC6));
    assert_eq!(f["key"]["id"], CLIENT_ID);
    assert_eq!(f["key"]["kind"], frag_kind::INGRESS);
    assert_eq!(f["value"]["addr"], octets(CLIENT6));
    assert_eq!(f["value"]["client_vip"], serde_json::json!(VIP.octets()));
}

#[test]
fn v6_flows_keep_a_sockets_port_respect_the_share_and_go_with_their_client() {
    let mut bed = Bed6::new();
    let other: std::net::Ipv6Addr = "2001:2::9".parse().unwrap();
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    // Endpoint-independent mapping: the same client socket toward another
    // remote keeps its NAT port.
    let key = veil_common::FlowKey6::new(proto::UDP, CLIENT6, 40000, other, 53);
    assert_eq!(bed.flows6.create(key, VIP, 1).unwrap(), nat);
    // A second client's socket gets a port of its own toward the same remote.
    let (_, nat2) = bed.flow_of(VIP2, CLIENT6_2, proto::UDP, 40000, 53);
    assert_ne!(nat2, nat);
    // The share: a quarter of the range toward one endpoint, per client.
    let share = PORTS.len() / 4;
    for port in 0..share as u16 {
        let key = veil_common::FlowKey6::new(proto::UDP, CLIENT6, 1000 + port, REMOTE6, 443);
        bed.flows6.create(key, VIP, 1).unwrap();
    }
    let over = veil_common::FlowKey6::new(proto::UDP, CLIENT6, 9999, REMOTE6, 443);
    let err = bed.flows6.create(over, VIP, 1).unwrap_err();
    assert!(err.to_string().contains("its share"), "{err}");
    // Its session over: every IPv6 flow of that client goes, the other's stays.
    let before = bed.flows6.len();
    assert_eq!(bed.flows6.delete_client(VIP).unwrap(), before - 1);
    assert_eq!(bed.flows6.len(), 1);
    assert_eq!(
        bed.flows6.known().len(),
        1,
        "a departed client's flows are not known"
    );
    let reply = frame6(REMOTE6, PUBLIC6, 60, L4::udp(53, nat, b"late"));
    assert_eq!(bed.wan(&reply).xdp, XDP_DROP, "the reverse entry went too");
}

/// `mapping = "address-dependent"` (the gateway's default) holds for IPv6
/// as for IPv4: two sites do not see one client socket behind one port.
#[test]
fn v6_flows_of_one_socket_toward_other_addresses_get_other_ports_when_address_dependent() {
    let mut bed = Bed6::new().with_mapping(veil_user::nat::Mapping::AddressDependent);
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    // The same remote address on another port: the same port.
    let key = veil_common::FlowKey6::new(proto::UDP, CLIENT6, 40000, REMOTE6, 123);
    assert_eq!(bed.flows6.create(key, VIP, 1).unwrap(), nat);
    // Other addresses: a draw each (endpoint-independent mapping would
    // show one port twenty times).
    let ports: std::collections::HashSet<u16> = (1..=20u16)
        .map(|i| {
            let remote = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, i);
            let key = veil_common::FlowKey6::new(proto::UDP, CLIENT6, 40000, remote, 53);
            bed.flows6.create(key, VIP, 1).unwrap()
        })
        .collect();
    assert!(ports.len() >= 18, "{} distinct ports", ports.len());
}

// ---- fragments (a fragment header right after the IPv6 header) ----

/// The client's identification in every test datagram.
const CLIENT_ID: u32 = 0x1234_5678;

/// A UDP datagram of 3000 bytes of payload in three fragments.
fn udp_fragments(src: Ipv6Addr, dst: Ipv6Addr, hop: u8, sport: u16, dport: u16) -> Vec<Vec<u8>> {
    fragment6(
        &frame6(src, dst, hop, L4::udp(sport, dport, &payload())),
        CLIENT_ID,
        1232,
    )
}

fn payload() -> Vec<u8> {
    (0..3000u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn send_fragments6(bed: &mut Bed6, sent: &[Vec<u8>]) -> Vec<Vec<u8>> {
    sent.iter()
        .map(|f| {
            let (action, out) = bed.tun(f);
            assert_eq!(action, TC_ACT_REDIRECT, "every fragment goes out");
            out
        })
        .collect()
}

/// Fragments from the WAN: each must be translated to its client.
fn receive_fragments6(bed: &mut Bed6, arrived: &[Vec<u8>]) -> Vec<Vec<u8>> {
    arrived
        .iter()
        .map(|f| {
            let wan = bed.wan(f);
            assert!(wan.delivered(), "{wan:?}");
            wan.out
        })
        .collect()
}

fn fragment_entries6(bed: &mut Bed6) -> Vec<(FragKey6, FragEntry6)> {
    let map = bed.dp.fragments6().unwrap();
    map.iter().map(|r| r.unwrap()).collect()
}

#[test]
fn egress_fragments6_leave_as_their_first_did_under_an_identification_of_the_gateways() {
    let mut bed = Bed6::new();
    let (key, nat) = bed.flow(proto::UDP, 40000, 53);
    let sent = udp_fragments(CLIENT6, REMOTE6, 64, 40000, 53);
    assert_eq!(sent.len(), 3);

    let out = send_fragments6(&mut bed, &sent);

    let wan_id = fragment_id(&out[0]);
    assert_ne!(
        wan_id, CLIENT_ID,
        "the client's identification stays hidden"
    );
    for f in &out {
        assert_eq!(
            &f[ETH_LEN + 8..ETH_LEN + 24],
            &PUBLIC6.octets(),
            "from the public address"
        );
        assert_eq!(
            fragment_id(f),
            wan_id,
            "one identification for the datagram"
        );
        assert_eq!(f[ETH_LEN + 7], 63, "hop limit - 1");
    }
    // What the remote reassembles: the datagram from public:nat, its
    // checksum right (updated on the first fragment only).
    let datagram = reassemble6(&out);
    assert_eq!(
        datagram,
        frame6(PUBLIC6, REMOTE6, 63, L4::udp(nat, 53, &payload()))
    );
    assert_checksums6(ip(&datagram));
    assert_eq!(bed.count(Reason::EgressForwarded), 3);
    assert_eq!(
        bed.listed(&key).egress.packets,
        1,
        "the flow counts the first"
    );
    // The last fragment took the datagram's entry away; the
    // identification stays reserved toward the remote.
    let entries = fragment_entries6(&mut bed);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let (k, _) = entries[0];
    assert_eq!(
        (k.kind, k.src_addr, k.dst_addr, k.id),
        (frag_kind::ID, PUBLIC6.octets(), REMOTE6.octets(), wan_id)
    );
}

#[test]
fn reply_fragments6_return_to_the_client_their_first_went_to() {
    let mut bed = Bed6::new();
    let (key, nat) = bed.flow(proto::UDP, 40000, 53);
    let arrived = udp_fragments(REMOTE6, PUBLIC6, 60, 53, nat);

    let delivered = receive_fragments6(&mut bed, &arrived);

    for f in &delivered {
        assert_eq!(&f[ETH_LEN + 24..ETH_LEN + 40], &CLIENT6.octets());
        assert_eq!(
            fragment_id(f),
            CLIENT_ID,
            "the remote's identification kept"
        );
    }
    let datagram = reassemble6(&delivered);
    assert_eq!(
        datagram,
        frame6(REMOTE6, CLIENT6, 60, L4::udp(53, 40000, &payload()))
    );
    assert_checksums6(ip(&datagram));
    assert_eq!(bed.count(Reason::IngressForwarded), 3);
    assert_eq!(bed.listed(&key).reverse.packets, 1);
    assert!(fragment_entries6(&mut bed).is_empty(), "gone with the last");
}

#[test]
fn a_later_fragment6_without_its_first_is_dropped_going_out_and_left_to_the_host_coming_in() {
    let mut bed = Bed6::new();
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    let sent = udp_fragments(CLIENT6, REMOTE6, 64, 40000, 53);
    let (action, _) = bed.tun(&sent[1]);
    assert_eq!(action, TC_ACT_SHOT);
    assert_eq!(bed.count(Reason::DropOrphanFragment), 1);
    assert_eq!(bed.count(Reason::EgressForwarded), 0);

    let arrived = udp_fragments(REMOTE6, PUBLIC6, 60, 53, nat);
    assert!(bed.wan(&arrived[2]).passed_untouched(&arrived[2]));
    assert_eq!(bed.count(Reason::PassToHost), 1);
}

#[test]
fn two_clients6_fragmenting_under_one_identification_leave_under_different_ones() {
    let mut bed = Bed6::new();
    bed.flow(proto::UDP, 40000, 53);
    bed.flow_of(VIP2, CLIENT6_2, proto::UDP, 40000, 53);
    let one = udp_fragments(CLIENT6, REMOTE6, 64, 40000, 53);
    let two = udp_fragments(CLIENT6_2, REMOTE6, 64, 40000, 53);

    // Interleaved, as two clients' datagrams would be.
    let (a0, b0) = (bed.tun(&one[0]).1, bed.tun(&two[0]).1);
    let (a1, b1) = (bed.tun(&one[1]).1, bed.tun(&two[1]).1);
    let (a2, b2) = (bed.tun(&one[2]).1, bed.tun(&two[2]).1);

    let (ida, idb) = (fragment_id(&a0), fragment_id(&b0));
    assert_ne!(ida, idb, "the remote must not mix them");
    let a = reassemble6(&[a0, a1, a2]);
    let b = reassemble6(&[b0, b1, b2]);
    assert_checksums6(ip(&a));
    assert_checksums6(ip(&b));
    assert_ne!(
        &a[ETH_LEN + IPV6_LEN..ETH_LEN + IPV6_LEN + 2],
        &b[ETH_LEN + IPV6_LEN..ETH_LEN + IPV6_LEN + 2],
        "different NAT ports"
    );
    assert_eq!(bed.count(Reason::EgressForwarded), 6);
}

#[test]
fn a_large_ping6_in_fragments_is_translated_both_ways() {
    let mut bed = Bed6::new();
    let (_, nat) = bed.flow(IPPROTO_ICMPV6, 0x1234, 0);
    let data = payload();
    let sent = fragment6(
        &frame6(CLIENT6, REMOTE6, 64, L4::echo_request(0x1234, 1, &data)),
        CLIENT_ID,
        1232,
    );
    let out = send_fragments6(&mut bed, &sent);
    let request = reassemble6(&out);
    assert_eq!(
        request,
        frame6(PUBLIC6, REMOTE6, 63, L4::echo_request(nat, 1, &data))
    );
    assert_checksums6(ip(&request));

    let arrived = fragment6(
        &frame6(REMOTE6, PUBLIC6, 60, L4::echo_reply(nat, 1, &data)),
        77,
        1232,
    );
    let delivered = receive_fragments6(&mut bed, &arrived);
    let reply = reassemble6(&delivered);
    assert_eq!(
        reply,
        frame6(REMOTE6, CLIENT6, 60, L4::echo_reply(0x1234, 1, &data))
    );
    assert_checksums6(ip(&reply));
}

#[test]
fn the_hosts_own_fragments6_reach_the_host() {
    let mut bed = Bed6::new();
    bed.flow(proto::UDP, 40000, 53);
    // To a port outside the NAT range: the host's datagram, all of it.
    let arrived = udp_fragments(REMOTE6, PUBLIC6, 60, 53, 22);
    for f in &arrived {
        assert!(bed.wan(f).passed_untouched(f));
    }
    assert_eq!(bed.count(Reason::PassToHost), 3);
    assert!(fragment_entries6(&mut bed).is_empty());
}

#[test]
fn an_expired_fragment6_entry_is_not_used() {
    let mut bed = Bed6::new();
    bed.flow(proto::UDP, 40000, 53);
    let sent = udp_fragments(CLIENT6, REMOTE6, 64, 40000, 53);
    // An entry for this datagram from long ago (boot time + 1 ns).
    let key = FragKey6::new(
        frag_kind::EGRESS,
        CLIENT6.octets(),
        REMOTE6.octets(),
        CLIENT_ID,
    );
    let stale = FragEntry6 {
        first_seen_ns: 1,
        addr: PUBLIC6.octets(),
        id: 99,
        client_vip: VIP.octets(),
    };
    bed.dp.fragments6().unwrap().insert(key, stale, 0).unwrap();

    let (action, _) = bed.tun(&sent[1]);

    assert_eq!(action, TC_ACT_SHOT);
    assert_eq!(bed.count(Reason::DropOrphanFragment), 1);
}

#[test]
fn an_icmp6_error_in_fragments_is_dropped_with_its_reason() {
    let mut bed = Bed6::new();
    bed.flow(proto::UDP, 40000, 53);
    let out = sent(
        &mut bed,
        &frame6(CLIENT6, REMOTE6, 64, L4::udp(40000, 53, &[7; 1200])),
    );
    let error = icmp6_error(ROUTER6, PUBLIC6, 1, 4, 0, &out);
    let pieces = fragment6(&error, 5, 1000);

    let wan = bed.wan(&pieces[0]);

    assert_eq!(wan.xdp, XDP_DROP);
    assert_eq!(bed.count(Reason::DropIpv6Fragment), 1);
    assert_eq!(bed.count(Reason::IcmpErrorForwarded), 0);
}
