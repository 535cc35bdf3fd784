//! The real eBPF programs under BPF_PROG_TEST_RUN: for every path, the
//! action, the exact output bytes (against packets etherparse builds from
//! scratch), the checksums (recomputed from scratch) and the map state.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN). Run through `cargo xtask test`.

use std::net::Ipv4Addr;

use veil_common::{proto, tcp_flags, Reason};
use veil_tests::{
    bed::*,
    packet::{assert_checksums, edit_ip, frame, icmp_error, ip_of, ETH_LEN, L4},
};

/// Adds 4 bytes of IP options (NOP NOP NOP EOL) to a frame.
fn with_options(mut f: Vec<u8>) -> Vec<u8> {
    f.splice(ETH_LEN + 20..ETH_LEN + 20, [1, 1, 1, 0]);
    edit_ip(&mut f, |f| {
        f[ETH_LEN] = 0x46;
        let len = u16::from_be_bytes([f[ETH_LEN + 2], f[ETH_LEN + 3]]) + 4;
        f[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&len.to_be_bytes());
    });
    f
}

// ---- egress: client -> internet (TC on the TUN device) ----

#[test]
fn egress_udp_is_rewritten_to_the_public_address() {
    let mut bed = Bed::new();
    let (key, nat) = bed.flow(proto::UDP, 40000, 53);
    let payload = b"a DNS question, more or less";
    let input = frame(CLIENT, REMOTE, 64, L4::udp(40000, 53, payload));

    let (action, out) = bed.tun(&input);

    assert_eq!(
        action, TC_ACT_REDIRECT,
        "sent to the WAN with redirect_neigh"
    );
    let expected = frame(PUBLIC, REMOTE, 63, L4::udp(nat, 53, payload));
    assert_eq!(
        out, expected,
        "source = public:nat port, TTL - 1, all else intact"
    );
    assert_checksums(ip_of(&out));
    let flow = bed.listed(&key);
    assert_eq!(flow.egress.packets, 1);
    assert_eq!(flow.egress.bytes, input.len() as u64);
    assert!(flow.egress.last_seen_ns > 0, "last-seen stamped");
    assert_eq!(bed.count(Reason::EgressForwarded), 1);
}

#[test]
fn egress_tcp_records_flags_and_fixes_checksum() {
    let mut bed = Bed::new();
    let (key, nat) = bed.flow(proto::TCP, 50000, 443);
    let input = frame(CLIENT, REMOTE, 64, L4::tcp(50000, 443, "S", b""));

    let (action, out) = bed.tun(&input);

    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(out, frame(PUBLIC, REMOTE, 63, L4::tcp(nat, 443, "S", b"")));
    assert_checksums(ip_of(&out));
    assert_eq!(bed.listed(&key).egress.tcp_flags, tcp_flags::SYN);
}

#[test]
fn egress_icmp_echo_uses_the_identifier_as_port() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::ICMP, 0x1234, 0);
    let input = frame(CLIENT, REMOTE, 64, L4::echo_request(0x1234, 7, b"ping!"));

    let (action, out) = bed.tun(&input);

    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(
        out,
        frame(PUBLIC, REMOTE, 63, L4::echo_request(nat, 7, b"ping!"))
    );
    assert_checksums(ip_of(&out));
}

#[test]
fn egress_keeps_a_zero_udp_checksum_zero() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    let mut input = frame(CLIENT, REMOTE, 64, L4::udp(40000, 53, b"x"));
    input[ETH_LEN + 26..ETH_LEN + 28].copy_from_slice(&[0, 0]);

    let (action, out) = bed.tun(&input);

    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(
        &out[ETH_LEN + 26..ETH_LEN + 28],
        &[0, 0],
        "no checksum stays no checksum"
    );
    assert_eq!(
        u16::from_be_bytes([out[ETH_LEN + 20], out[ETH_LEN + 21]]),
        nat
    );
    assert_checksums(ip_of(&out));
}

#[test]
fn egress_without_a_flow_is_dropped_and_counted() {
    let mut bed = Bed::new();
    let input = frame(CLIENT, REMOTE, 64, L4::udp(40000, 53, b"x"));

    let (action, _) = bed.tun(&input);

    assert_eq!(action, TC_ACT_SHOT);
    assert_eq!(bed.count(Reason::DropNoEgressFlow), 1);
    assert_eq!(bed.count(Reason::EgressForwarded), 0);
}

#[test]
fn egress_refuses_what_it_cannot_translate_with_a_reason() {
    let mut bed = Bed::new();
    bed.flow(proto::UDP, 40000, 53);
    let good = frame(CLIENT, REMOTE, 64, L4::udp(40000, 53, b"hello"));
    let mut fragment = good.clone();
    edit_ip(&mut fragment, |f| f[ETH_LEN + 6] |= 0x20); // MF
    let options = with_options(good.clone());
    let expiring = frame(CLIENT, REMOTE, 1, L4::udp(40000, 53, b"x"));
    let truncated = good[..ETH_LEN + 24].to_vec();
    let mut gre = good.clone();
    edit_ip(&mut gre, |f| f[ETH_LEN + 9] = 47);
    let mut icmp_error_from_client = frame(CLIENT, REMOTE, 64, L4::echo_request(1, 1, b""));
    icmp_error_from_client[ETH_LEN + 20] = 3;

    for (input, reason) in [
        (&fragment, Reason::DropFragment),
        (&options, Reason::DropIpOptions),
        (&expiring, Reason::DropTtlExpired),
        (&truncated, Reason::DropMalformed),
        (&gre, Reason::DropUnsupported),
        (&icmp_error_from_client, Reason::DropUnsupported),
    ] {
        let before = bed.count(reason);
        let (action, _) = bed.tun(input);
        assert_eq!(action, TC_ACT_SHOT, "{reason:?}");
        assert_eq!(bed.count(reason), before + 1, "{reason:?} counted once");
    }
    assert_eq!(bed.count(Reason::EgressForwarded), 0);
}

// ---- ingress: internet -> client (XDP, then TC, on the WAN) ----

#[test]
fn ingress_udp_reply_goes_back_to_the_client() {
    let mut bed = Bed::new();
    let (key, nat) = bed.flow(proto::UDP, 40000, 53);
    let payload = b"an answer";
    let input = frame(REMOTE, PUBLIC, 57, L4::udp(53, nat, payload));

    let wan = bed.wan(&input);

    assert!(wan.delivered(), "{wan:?}");
    assert_eq!(
        wan.out,
        frame(REMOTE, CLIENT, 57, L4::udp(53, 40000, payload))
    );
    assert_checksums(ip_of(&wan.out));
    let flow = bed.listed(&key);
    assert_eq!(
        (flow.reverse.packets, flow.reverse.bytes),
        (1, input.len() as u64)
    );
    assert_eq!(bed.count(Reason::IngressForwarded), 1);
    assert_eq!(bed.count(Reason::PassToHost), 0, "counted once, not twice");
}

#[test]
fn ingress_keeps_a_zero_udp_checksum_zero() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    let mut input = frame(REMOTE, PUBLIC, 57, L4::udp(53, nat, b"x"));
    input[ETH_LEN + 26..ETH_LEN + 28].copy_from_slice(&[0, 0]);

    let wan = bed.wan(&input);

    assert!(wan.delivered(), "{wan:?}");
    assert_eq!(&wan.out[ETH_LEN + 26..ETH_LEN + 28], &[0, 0]);
    assert_checksums(ip_of(&wan.out));
}

#[test]
fn ingress_tcp_reply_records_flags() {
    let mut bed = Bed::new();
    let (key, nat) = bed.flow(proto::TCP, 50000, 443);
    let input = frame(REMOTE, PUBLIC, 57, L4::tcp(443, nat, "SA", b""));

    let wan = bed.wan(&input);

    assert!(wan.delivered(), "{wan:?}");
    assert_eq!(
        wan.out,
        frame(REMOTE, CLIENT, 57, L4::tcp(443, 50000, "SA", b""))
    );
    assert_checksums(ip_of(&wan.out));
    let flags = bed.listed(&key).reverse.tcp_flags;
    assert_eq!(flags, tcp_flags::SYN | tcp_flags::ACK);
}

#[test]
fn ingress_echo_reply_gets_its_identifier_back() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::ICMP, 0x1234, 0);
    let input = frame(REMOTE, PUBLIC, 57, L4::echo_reply(nat, 7, b"pong"));

    let wan = bed.wan(&input);

    assert!(wan.delivered(), "{wan:?}");
    assert_eq!(
        wan.out,
        frame(REMOTE, CLIENT, 57, L4::echo_reply(0x1234, 7, b"pong"))
    );
    assert_checksums(ip_of(&wan.out));
}

#[test]
fn unsolicited_packets_to_the_nat_range_are_dropped_in_xdp() {
    let mut bed = Bed::new();
    bed.flow(proto::TCP, 50000, 443);
    let syn = frame(REMOTE, PUBLIC, 57, L4::tcp(4444, PORTS.min + 5, "S", b""));
    let udp = frame(REMOTE, PUBLIC, 57, L4::udp(4444, PORTS.max, b"?"));

    for input in [&syn, &udp] {
        let wan = bed.wan(input);
        assert_eq!((wan.xdp, wan.tc), (XDP_DROP, None));
    }
    assert_eq!(bed.count(Reason::DropNoIngressFlow), 2);
}

#[test]
fn an_echo_reply_without_a_flow_goes_to_the_host() {
    // The gateway's own ping, whose identifier happens to be in the NAT
    // range: its answer must reach the host's ping, untouched.
    let mut bed = Bed::new();
    let ping = frame(REMOTE, PUBLIC, 57, L4::echo_reply(PORTS.min, 1, b""));
    let wan = bed.wan(&ping);
    assert!(wan.passed_untouched(&ping), "{wan:?}");
    assert_eq!(bed.count(Reason::PassToHost), 1);
    assert_eq!(bed.count(Reason::DropNoIngressFlow), 0);
}

#[test]
fn traffic_for_the_host_passes_untouched() {
    let mut bed = Bed::new();
    let ssh = frame(REMOTE, PUBLIC, 57, L4::tcp(4444, 22, "S", b""));
    let tunnel = frame(REMOTE, PUBLIC, 57, L4::tcp(4444, 443, "S", b""));
    let ping_gateway = frame(REMOTE, PUBLIC, 57, L4::echo_request(PORTS.min, 1, b""));
    let elsewhere = frame(
        REMOTE,
        Ipv4Addr::new(198, 18, 0, 9),
        57,
        L4::udp(1, PORTS.min, b""),
    );
    let mut arp = ssh.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);

    for input in [&ssh, &tunnel, &ping_gateway, &elsewhere, &arp] {
        let wan = bed.wan(input);
        assert!(wan.passed_untouched(input), "{wan:?}");
    }
    assert_eq!(bed.count(Reason::PassToHost), 5);
}

#[test]
fn wan_packets_addressed_to_a_client_are_dropped_as_spoofed() {
    let mut bed = Bed::new();
    bed.flow(proto::UDP, 40000, 53);
    let forged = frame(REMOTE, CLIENT, 57, L4::udp(53, 40000, b"hi"));

    assert_eq!(bed.wan(&forged).xdp, XDP_DROP);
    assert_eq!(bed.count(Reason::DropSpoofedVip), 1);
}

#[test]
fn ingress_fragments_and_options_in_the_nat_range_are_dropped_with_a_reason() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    let reply = frame(REMOTE, PUBLIC, 57, L4::udp(53, nat, b"answer"));
    let mut first_fragment = reply.clone();
    edit_ip(&mut first_fragment, |f| f[ETH_LEN + 6] |= 0x20);
    let mut later_fragment = reply.clone();
    edit_ip(&mut later_fragment, |f| f[ETH_LEN + 7] = 0x10);
    let options = with_options(reply.clone());

    assert_eq!(bed.wan(&first_fragment).xdp, XDP_DROP);
    assert_eq!(bed.count(Reason::DropFragment), 1);
    assert_eq!(bed.wan(&options).xdp, XDP_DROP);
    assert_eq!(bed.count(Reason::DropIpOptions), 1);
    // No ports to read: the host's reassembly gets it and, without the
    // first fragment, never completes or answers.
    assert!(bed.wan(&later_fragment).passed_untouched(&later_fragment));
    assert_eq!(bed.count(Reason::IngressForwarded), 0);
}

#[test]
fn malformed_frames_are_dropped_not_mangled() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    let reply = frame(REMOTE, PUBLIC, 57, L4::udp(53, nat, b"answer"));
    let truncated = reply[..ETH_LEN + 22].to_vec();
    let mut bad_version = reply.clone();
    edit_ip(&mut bad_version, |f| f[ETH_LEN] = 0x65);
    let mut short_ihl = reply.clone();
    edit_ip(&mut short_ihl, |f| f[ETH_LEN] = 0x44);

    for input in [&truncated, &bad_version, &short_ihl] {
        assert_eq!(bed.wan(input).xdp, XDP_DROP);
    }
    assert_eq!(bed.count(Reason::DropMalformed), 3);
}

// ---- ICMP errors about NATed flows ----

/// Checks a translated ICMP error: outer to the client, the quote restored
/// to the client's original packet, every checksum valid from scratch.
fn assert_icmp_error_translated(out: &[u8], quoted_by_client: &[u8]) {
    let ip = ip_of(out);
    assert_eq!(
        &ip[16..20],
        &CLIENT.octets(),
        "outer destination is the client"
    );
    assert_eq!(&ip[12..16], &ROUTER.octets(), "outer source untouched");
    assert_checksums(ip);
    assert_eq!(
        &ip[28..],
        quoted_by_client,
        "the quote is what the client sent"
    );
}

#[test]
fn port_unreachable_for_a_udp_flow_reaches_its_client() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    let sent = frame(PUBLIC, REMOTE, 63, L4::udp(nat, 53, b"question"));
    let as_client = frame(CLIENT, REMOTE, 63, L4::udp(40000, 53, b"question"));
    let input = icmp_error(ROUTER, PUBLIC, 3, 3, [0; 4], ip_of(&sent));

    let wan = bed.wan(&input);

    assert!(wan.delivered(), "{wan:?}");
    assert_icmp_error_translated(&wan.out, ip_of(&as_client));
    // The quoted datagram, its UDP checksum included.
    assert_checksums(&ip_of(&wan.out)[28..]);
    assert_eq!(bed.count(Reason::IcmpErrorForwarded), 1);
}

#[test]
fn fragmentation_needed_for_a_tcp_flow_keeps_its_mtu() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::TCP, 50000, 443);
    let data = [0xabu8; 64];
    let sent = frame(PUBLIC, REMOTE, 63, L4::tcp(nat, 443, "PA", &data));
    let as_client = frame(CLIENT, REMOTE, 63, L4::tcp(50000, 443, "PA", &data));
    let mtu = 1280u16.to_be_bytes();
    let input = icmp_error(ROUTER, PUBLIC, 3, 4, [0, 0, mtu[0], mtu[1]], ip_of(&sent));

    let wan = bed.wan(&input);

    assert!(wan.delivered(), "{wan:?}");
    assert_icmp_error_translated(&wan.out, ip_of(&as_client));
    let rest = &ip_of(&wan.out)[24..28];
    assert_eq!(rest, &[0, 0, mtu[0], mtu[1]], "next-hop MTU kept");
}

#[test]
fn fragmentation_needed_with_a_short_tcp_quote() {
    // RFC 792 promises only 8 bytes of the transport header: no TCP
    // checksum in the quote, which must not stop the translation.
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::TCP, 50000, 443);
    let sent = frame(PUBLIC, REMOTE, 63, L4::tcp(nat, 443, "A", b""));
    let as_client = frame(CLIENT, REMOTE, 63, L4::tcp(50000, 443, "A", b""));
    let input = icmp_error(ROUTER, PUBLIC, 3, 4, [0, 0, 5, 0], &ip_of(&sent)[..28]);

    let wan = bed.wan(&input);

    assert!(wan.delivered(), "{wan:?}");
    let ip = ip_of(&wan.out);
    assert_eq!(&ip[16..20], &CLIENT.octets());
    assert_checksums(ip);
    let client = ip_of(&as_client);
    assert_eq!(
        &ip[28..48],
        &client[..20],
        "quoted IP header is the client's"
    );
    assert_eq!(
        &ip[48..56],
        &client[20..28],
        "quoted ports are the client's"
    );
}

#[test]
fn time_exceeded_for_a_ping_reaches_its_client() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::ICMP, 0x1234, 0);
    let sent = frame(PUBLIC, REMOTE, 1, L4::echo_request(nat, 3, b"trace"));
    let as_client = frame(CLIENT, REMOTE, 1, L4::echo_request(0x1234, 3, b"trace"));
    let input = icmp_error(ROUTER, PUBLIC, 11, 0, [0; 4], ip_of(&sent));

    let wan = bed.wan(&input);

    assert!(wan.delivered(), "{wan:?}");
    assert_icmp_error_translated(&wan.out, ip_of(&as_client));
}

#[test]
fn icmp_errors_without_a_flow_are_dropped_and_the_hosts_own_pass() {
    let mut bed = Bed::new();
    let unknown = frame(PUBLIC, REMOTE, 63, L4::udp(PORTS.min + 1, 53, b"q"));
    let hosts = frame(PUBLIC, REMOTE, 63, L4::tcp(443, 5555, "A", b""));
    let for_unknown = icmp_error(ROUTER, PUBLIC, 3, 3, [0; 4], ip_of(&unknown));
    let for_host = icmp_error(ROUTER, PUBLIC, 3, 4, [0, 0, 5, 0], ip_of(&hosts));

    assert_eq!(bed.wan(&for_unknown).xdp, XDP_DROP);
    assert_eq!(bed.count(Reason::DropNoIngressFlow), 1);
    assert!(
        bed.wan(&for_host).passed_untouched(&for_host),
        "the host's own error"
    );
}

// ---- several public addresses ----

/// A bed translating to PUBLIC and PUBLIC2, and a client whose flows leave
/// from PUBLIC2.
fn second_address_bed() -> (Bed, Ipv4Addr) {
    let public = [PUBLIC, PUBLIC2];
    let bed = Bed::with_public(&public, PORTS);
    let client = client_on(PUBLIC2, &public, &[]);
    (bed, client)
}

#[test]
fn egress_leaves_from_the_flows_public_address() {
    let (mut bed, client) = second_address_bed();
    let (_, nat) = bed.flow_of(client, proto::UDP, 40000, 53);
    let input = frame(client, REMOTE, 64, L4::udp(40000, 53, b"question"));

    let (action, out) = bed.tun(&input);

    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(
        out,
        frame(PUBLIC2, REMOTE, 63, L4::udp(nat, 53, b"question")),
        "source = the second public address, not the first"
    );
    assert_checksums(ip_of(&out));
}

#[test]
fn a_reply_to_the_second_public_address_is_translated() {
    let (mut bed, client) = second_address_bed();
    let (key, nat) = bed.flow_of(client, proto::TCP, 50000, 443);
    let input = frame(REMOTE, PUBLIC2, 57, L4::tcp(443, nat, "SA", b""));

    let wan = bed.wan(&input);

    assert!(wan.delivered(), "{wan:?}");
    assert_eq!(
        wan.out,
        frame(REMOTE, client, 57, L4::tcp(443, 50000, "SA", b""))
    );
    assert_checksums(ip_of(&wan.out));
    assert_eq!(bed.listed(&key).reverse.packets, 1);

    // The same port on the other public address is another mapping, which
    // does not exist: unsolicited.
    let wrong = frame(REMOTE, PUBLIC, 57, L4::tcp(443, nat, "SA", b""));
    assert_eq!(bed.wan(&wrong).xdp, XDP_DROP);
    assert_eq!(bed.count(Reason::DropNoIngressFlow), 1);
    assert_eq!(bed.count(Reason::IngressForwarded), 1);
}

#[test]
fn an_icmp_error_about_a_flow_on_the_second_address_reaches_its_client() {
    let (mut bed, client) = second_address_bed();
    let (_, nat) = bed.flow_of(client, proto::UDP, 40000, 53);
    let sent = frame(PUBLIC2, REMOTE, 63, L4::udp(nat, 53, b"question"));
    let as_client = frame(client, REMOTE, 63, L4::udp(40000, 53, b"question"));
    let input = icmp_error(ROUTER, PUBLIC2, 3, 3, [0; 4], ip_of(&sent));

    let wan = bed.wan(&input);

    assert!(wan.delivered(), "{wan:?}");
    let ip = ip_of(&wan.out);
    assert_eq!(&ip[16..20], &client.octets(), "outer destination");
    assert_checksums(ip);
    assert_eq!(&ip[28..], ip_of(&as_client), "the quote is the client's");
}

#[test]
fn unsolicited_packets_to_the_second_addresses_nat_range_are_dropped_in_xdp() {
    let (mut bed, client) = second_address_bed();
    bed.flow_of(client, proto::TCP, 50000, 443);
    let syn = frame(REMOTE, PUBLIC2, 57, L4::tcp(4444, PORTS.min + 5, "S", b""));
    let udp = frame(REMOTE, PUBLIC2, 57, L4::udp(4444, PORTS.max, b"?"));
    for input in [&syn, &udp] {
        let wan = bed.wan(input);
        assert_eq!((wan.xdp, wan.tc), (XDP_DROP, None));
    }
    assert_eq!(bed.count(Reason::DropNoIngressFlow), 2);

    // Outside the NAT range the second address is the host's, as the first.
    let ssh = frame(REMOTE, PUBLIC2, 57, L4::tcp(4444, 22, "S", b""));
    assert!(bed.wan(&ssh).passed_untouched(&ssh));
    // An address that is not a public one stays the host's in the range too.
    let not_ours = frame(
        REMOTE,
        Ipv4Addr::new(198, 18, 0, 4),
        57,
        L4::udp(4444, PORTS.min, b"?"),
    );
    assert!(bed.wan(&not_ours).passed_untouched(&not_ours));
    assert_eq!(bed.count(Reason::PassToHost), 2);
}

// ---- the datapath's own log ----

/// Collects log records (aya-log hands them to a `log::Log`).
#[derive(Clone, Default)]
struct Collect(std::sync::Arc<std::sync::Mutex<Vec<(log::Level, String)>>>);

impl log::Log for Collect {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        self.0
            .lock()
            .unwrap()
            .push((r.level(), r.args().to_string()));
    }
    fn flush(&self) {}
}

#[test]
fn an_unconfigured_datapath_drops_everything_and_says_so() {
    let mut dp = veil_user::Datapath::load().unwrap();
    let records = Collect::default();
    let mut logger = dp.logger(records.clone()).unwrap();
    let prog: &mut aya::programs::Xdp = dp.program(veil_common::PROG_WAN_XDP).unwrap();
    let input = frame(REMOTE, PUBLIC, 57, L4::udp(53, 61000, b"x"));

    assert_eq!(run(prog, &input).0, XDP_DROP);
    let stats = dp.stats().unwrap();
    let not_configured = stats
        .iter()
        .find(|(r, _)| *r == Reason::DropNotConfigured)
        .unwrap();
    assert_eq!(not_configured.1.packets, 1, "dropped for the right reason");

    logger.flush();
    let records = records.0.lock().unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].0, log::Level::Error);
    assert!(records[0].1.contains("VEIL_CONFIG is empty"), "{records:?}");
}
