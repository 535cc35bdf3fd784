//! The real eBPF programs under BPF_PROG_TEST_RUN: for every path, the
//! action, the exact output bytes (against packets etherparse builds from
//! scratch), the checksums (recomputed from scratch) and the map state.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN). Run through `cargo xtask test`.

use std::net::Ipv4Addr;

use veil_common::{
    frag_kind, proto, tcp_flags, FlowKey, FragEntry, FragKey, Reason, FRAG_TIMEOUT_NS,
};
use veil_tests::{
    bed::*,
    packet::{assert_checksums, edit_ip, fragments, frame, icmp_error, ip_of, ETH_LEN, L4},
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
    let mut later_fragment = good.clone();
    edit_ip(&mut later_fragment, |f| {
        f[ETH_LEN + 6..ETH_LEN + 8].copy_from_slice(&[0, 1])
    });
    let options = with_options(good.clone());
    let expiring = frame(CLIENT, REMOTE, 1, L4::udp(40000, 53, b"x"));
    let truncated = good[..ETH_LEN + 24].to_vec();
    let mut gre = good.clone();
    edit_ip(&mut gre, |f| f[ETH_LEN + 9] = 47);
    let mut icmp_error_from_client = frame(CLIENT, REMOTE, 64, L4::echo_request(1, 1, b""));
    icmp_error_from_client[ETH_LEN + 20] = 3;

    for (input, reason) in [
        (&later_fragment, Reason::DropOrphanFragment),
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
fn ingress_options_unsolicited_first_fragments_and_fragmented_errors_are_dropped_with_a_reason() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    let reply = frame(REMOTE, PUBLIC, 57, L4::udp(53, nat, b"answer"));
    let options = with_options(reply.clone());
    let unsolicited = frame(REMOTE, PUBLIC, 57, L4::udp(53, port_besides(nat), &[7; 64]));
    let unsolicited_first = fragments(&unsolicited, 0x4242, 32).remove(0);
    let sent = frame(PUBLIC, REMOTE, 63, L4::udp(nat, 53, &[1; 600]));
    let error = icmp_error(ROUTER, PUBLIC, 3, 3, [0; 4], ip_of(&sent));
    let error_first = fragments(&error, 0x4343, 512).remove(0);

    assert_eq!(bed.wan(&options).xdp, XDP_DROP);
    assert_eq!(bed.count(Reason::DropIpOptions), 1);
    assert_eq!(bed.wan(&unsolicited_first).xdp, XDP_DROP);
    assert_eq!(bed.count(Reason::DropNoIngressFlow), 1);
    assert_eq!(bed.wan(&error_first).xdp, XDP_DROP);
    assert_eq!(bed.count(Reason::DropFragment), 1);
    assert_eq!(bed.count(Reason::IngressForwarded), 0);
    assert!(fragment_entries(&mut bed).is_empty(), "nothing noted");
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

// ---- IPv4 fragments ----

/// The IP ID the client's kernel gave its datagram.
const CLIENT_ID: u16 = 0x1234;
/// The IP ID the remote's kernel gave its reply.
const REMOTE_ID: u16 = 0xbeef;
const CLIENT2: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

fn ip_id(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[ETH_LEN + 4], frame[ETH_LEN + 5]])
}

fn egress_key(client: Ipv4Addr, id: u16, proto: u8) -> FragKey {
    FragKey::new(
        frag_kind::EGRESS,
        client.octets(),
        REMOTE.octets(),
        id,
        proto,
    )
}

fn ingress_key(id: u16, proto: u8) -> FragKey {
    FragKey::new(
        frag_kind::INGRESS,
        REMOTE.octets(),
        PUBLIC.octets(),
        id,
        proto,
    )
}

fn id_key(wan_id: u16, proto: u8) -> FragKey {
    FragKey::new(
        frag_kind::ID,
        PUBLIC.octets(),
        REMOTE.octets(),
        wan_id,
        proto,
    )
}

fn fragment_entries(bed: &mut Bed) -> Vec<(FragKey, FragEntry)> {
    let map = bed.dp.fragments().unwrap();
    map.iter().map(|r| r.unwrap()).collect()
}

fn fragment_entry(bed: &mut Bed, key: &FragKey) -> Option<FragEntry> {
    bed.dp.fragments().unwrap().get(key, 0).ok()
}

fn seed(bed: &mut Bed, key: &FragKey, first_seen_ns: u64, addr: Ipv4Addr, id: u16) {
    let entry = FragEntry {
        first_seen_ns,
        addr: addr.octets(),
        id,
        _pad: [0; 2],
    };
    bed.dp.fragments().unwrap().insert(key, entry, 0).unwrap();
}

/// Sends a client's fragments through the TUN program: each must go out.
fn send_fragments(bed: &mut Bed, sent: &[Vec<u8>]) -> Vec<Vec<u8>> {
    sent.iter()
        .map(|f| {
            let (action, out) = bed.tun(f);
            assert_eq!(action, TC_ACT_REDIRECT, "every fragment goes out");
            out
        })
        .collect()
}

/// Receives a remote's fragments as the kernel runs the WAN programs on a
/// batch: XDP on every frame first, then TC on each. Each must be
/// delivered to the tunnel.
fn receive_fragments(bed: &mut Bed, arrived: &[Vec<u8>]) -> Vec<Vec<u8>> {
    for f in arrived {
        assert_eq!(bed.xdp(f), (XDP_PASS, f.clone()), "XDP passes, untouched");
    }
    arrived
        .iter()
        .map(|f| {
            let (action, out) = bed.wan_tc(f);
            assert_eq!(action, TC_ACT_REDIRECT, "every fragment to the tunnel");
            out
        })
        .collect()
}

#[test]
fn egress_fragments_leave_as_their_first_did_under_an_ip_id_of_the_gateways() {
    let mut bed = Bed::new();
    let (key, nat) = bed.flow(proto::UDP, 40000, 53);
    let data = payload(3000);
    let sent = fragments(
        &frame(CLIENT, REMOTE, 64, L4::udp(40000, 53, &data)),
        CLIENT_ID,
        1200,
    );
    assert_eq!(sent.len(), 3);

    let first = send_fragments(&mut bed, &sent[..1]).remove(0);
    let wan_id = ip_id(&first);
    let entry = fragment_entry(&mut bed, &egress_key(CLIENT, CLIENT_ID, proto::UDP))
        .expect("the first fragment noted for the later ones");
    assert_eq!(
        (entry.addr, entry.id),
        (PUBLIC.octets(), wan_id),
        "later fragments: the public address and the WAN IP ID"
    );
    let reserved = fragment_entry(&mut bed, &id_key(wan_id, proto::UDP))
        .expect("the WAN IP ID reserved toward the remote");
    assert_eq!(
        (reserved.addr, reserved.id),
        (CLIENT.octets(), CLIENT_ID),
        "reserved for the client's datagram"
    );
    let mut out = vec![first];
    out.extend(send_fragments(&mut bed, &sent[1..]));

    // The client's datagram, translated as a whole packet would be, cut
    // where the client cut it. The first fragment's UDP checksum is the
    // whole datagram's, computed here from scratch.
    let expected = fragments(
        &frame(PUBLIC, REMOTE, 63, L4::udp(nat, 53, &data)),
        wan_id,
        1200,
    );
    assert_eq!(
        out, expected,
        "public address, NAT port, TTL - 1, WAN IP ID"
    );
    assert_eq!(
        fragment_entry(&mut bed, &egress_key(CLIENT, CLIENT_ID, proto::UDP)),
        None,
        "forgotten with the last fragment"
    );
    assert!(
        fragment_entry(&mut bed, &id_key(wan_id, proto::UDP)).is_some(),
        "the IP ID stays reserved while the remote may reassemble"
    );
    assert_eq!(bed.count(Reason::EgressForwarded), 3);
    // The flow's counters see the datagram once, by its first fragment.
    assert_eq!(bed.listed(&key).egress.packets, 1);
}

#[test]
fn ingress_fragments_return_to_the_client_their_first_went_to() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    let data = payload(3000);
    let arrived = fragments(
        &frame(REMOTE, PUBLIC, 57, L4::udp(53, nat, &data)),
        REMOTE_ID,
        1480,
    );
    assert_eq!(arrived.len(), 3);

    let out = receive_fragments(&mut bed, &arrived);

    let expected = fragments(
        &frame(REMOTE, CLIENT, 57, L4::udp(53, 40000, &data)),
        REMOTE_ID,
        1480,
    );
    assert_eq!(out, expected, "to the client's address and port, ID kept");
    assert_eq!(
        fragment_entry(&mut bed, &ingress_key(REMOTE_ID, proto::UDP)),
        None,
        "forgotten with the last fragment"
    );
    assert_eq!(bed.count(Reason::IngressForwarded), 3);
    assert_eq!(bed.count(Reason::PassToHost), 0, "counted once, not twice");
}

#[test]
fn ping_fragments_are_translated_both_ways() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::ICMP, 0x4242, 0);
    let data = payload(2000);
    let sent = fragments(
        &frame(CLIENT, REMOTE, 64, L4::echo_request(0x4242, 1, &data)),
        CLIENT_ID,
        1400,
    );
    let out = send_fragments(&mut bed, &sent);
    let expected = fragments(
        &frame(PUBLIC, REMOTE, 63, L4::echo_request(nat, 1, &data)),
        ip_id(&out[0]),
        1400,
    );
    assert_eq!(out, expected, "the identifier is the NAT port's");

    let arrived = fragments(
        &frame(REMOTE, PUBLIC, 57, L4::echo_reply(nat, 1, &data)),
        REMOTE_ID,
        1480,
    );
    let back = receive_fragments(&mut bed, &arrived);
    let expected = fragments(
        &frame(REMOTE, CLIENT, 57, L4::echo_reply(0x4242, 1, &data)),
        REMOTE_ID,
        1480,
    );
    assert_eq!(back, expected, "the client's identifier back");
}

#[test]
fn two_clients_fragmenting_under_one_ip_id_leave_under_different_ones() {
    // Both clients' kernels picked the same ID toward the same remote.
    // Behind one public address the remote would reassemble the two
    // datagrams as one: each leaves under an ID of its own.
    let mut bed = Bed::new();
    let (_, nat1) = bed.flow(proto::UDP, 40000, 53);
    let key2 = FlowKey::new(proto::UDP, CLIENT2, 40000, REMOTE, 53);
    let nat2 = bed.flows.create(key2, 1).unwrap();
    let data = payload(2000);
    let cut = |client| {
        let datagram = frame(client, REMOTE, 64, L4::udp(40000, 53, &data));
        fragments(&datagram, CLIENT_ID, 1200)
    };
    let (a, b) = (cut(CLIENT), cut(CLIENT2));

    // Interleaved, as two sessions write them.
    let out_a1 = send_fragments(&mut bed, &a[..1]).remove(0);
    let out_b1 = send_fragments(&mut bed, &b[..1]).remove(0);
    let out_a2 = send_fragments(&mut bed, &a[1..]).remove(0);
    let out_b2 = send_fragments(&mut bed, &b[1..]).remove(0);

    let (id_a, id_b) = (ip_id(&out_a1), ip_id(&out_b1));
    assert_ne!(id_a, id_b, "one IP ID per datagram toward the remote");
    let expected = |nat, id| {
        fragments(
            &frame(PUBLIC, REMOTE, 63, L4::udp(nat, 53, &data)),
            id,
            1200,
        )
    };
    assert_eq!(vec![out_a1, out_a2], expected(nat1, id_a));
    assert_eq!(vec![out_b1, out_b2], expected(nat2, id_b));
}

#[test]
fn a_later_fragment_without_its_first_is_dropped_going_out_and_left_to_the_host_coming_in() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    let data = payload(3000);
    let sent = fragments(
        &frame(CLIENT, REMOTE, 64, L4::udp(40000, 53, &data)),
        CLIENT_ID,
        1200,
    );
    let arrived = fragments(
        &frame(REMOTE, PUBLIC, 57, L4::udp(53, nat, &data)),
        REMOTE_ID,
        1480,
    );

    // From a client: no ports, no first fragment, nobody to translate to.
    assert_eq!(bed.tun(&sent[1]).0, TC_ACT_SHOT);
    assert_eq!(bed.count(Reason::DropOrphanFragment), 1);
    assert_eq!(bed.count(Reason::EgressForwarded), 0);

    // From the WAN: nothing says it is not the host's own (it may be);
    // if it was veil's, the host's reassembly never completes and, without
    // the first fragment, answers nothing.
    let wan = bed.wan(&arrived[1]);
    assert!(wan.passed_untouched(&arrived[1]), "{wan:?}");
    assert_eq!(bed.count(Reason::PassToHost), 1);
    assert_eq!(bed.count(Reason::IngressForwarded), 0);
}

#[test]
fn an_expired_fragment_entry_is_not_used() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    let data = payload(3000);
    let sent = fragments(
        &frame(CLIENT, REMOTE, 64, L4::udp(40000, 53, &data)),
        CLIENT_ID,
        1200,
    );
    let arrived = fragments(
        &frame(REMOTE, PUBLIC, 57, L4::udp(53, nat, &data)),
        REMOTE_ID,
        1480,
    );
    let now = veil_user::net::monotonic_ns();
    let stale = now
        .checked_sub(FRAG_TIMEOUT_NS + 1_000_000_000)
        .expect("the machine has been up longer than the fragment timeout");
    let out_key = egress_key(CLIENT, CLIENT_ID, proto::UDP);
    let in_key = ingress_key(REMOTE_ID, proto::UDP);

    seed(&mut bed, &out_key, stale, PUBLIC, 0x0bad);
    seed(&mut bed, &in_key, stale, CLIENT, 0);
    assert_eq!(bed.tun(&sent[1]).0, TC_ACT_SHOT, "expired: dropped");
    assert_eq!(bed.count(Reason::DropOrphanFragment), 1);
    let wan = bed.wan(&arrived[1]);
    assert!(
        wan.passed_untouched(&arrived[1]),
        "expired: the host's {wan:?}"
    );

    // The same entries, fresh, are used: the seeding is right.
    seed(&mut bed, &out_key, now, PUBLIC, 0x0bad);
    seed(&mut bed, &in_key, now, CLIENT, 0);
    let (action, out) = bed.tun(&sent[1]);
    assert_eq!(action, TC_ACT_REDIRECT, "fresh: translated");
    assert_eq!(ip_id(&out), 0x0bad);
    assert_eq!(&out[ETH_LEN + 12..ETH_LEN + 16], &PUBLIC.octets());
    assert!(bed.wan(&arrived[1]).delivered(), "fresh: to the client");
}

#[test]
fn the_hosts_own_fragments_reach_the_host_even_under_a_reused_ip_id() {
    // A veil datagram left an entry (its last fragment was lost); the
    // remote's ID counter comes round to that ID on a datagram for the
    // host itself. Its fragments are the host's, not the client's.
    let mut bed = Bed::new();
    bed.flow(proto::UDP, 40000, 53);
    let in_key = ingress_key(REMOTE_ID, proto::UDP);
    seed(&mut bed, &in_key, veil_user::net::monotonic_ns(), CLIENT, 0);
    let hosts = fragments(
        &frame(REMOTE, PUBLIC, 57, L4::udp(53, 5353, &payload(3000))),
        REMOTE_ID,
        1480,
    );

    for f in &hosts {
        let wan = bed.wan(f);
        assert!(wan.passed_untouched(f), "{wan:?}");
    }
    assert_eq!(fragment_entry(&mut bed, &in_key), None, "stale entry gone");
    assert_eq!(bed.count(Reason::PassToHost), hosts.len() as u64);
    assert_eq!(bed.count(Reason::IngressForwarded), 0);
}

#[test]
fn bpftool_shows_fragment_entries_with_named_fields() {
    let (mut bed, dir, _fs) = Bed::pinned();
    bed.flow(proto::UDP, 40000, 53);
    let sent = fragments(
        &frame(CLIENT, REMOTE, 64, L4::udp(40000, 53, &payload(3000))),
        CLIENT_ID,
        1200,
    );
    let wan_id = ip_id(&send_fragments(&mut bed, &sent[..1])[0]);

    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(dir.join("fragments"))
        .output()
        .expect("running bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries: Vec<&serde_json::Value> = dump
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["formatted"])
        .collect();
    let egress = entries
        .iter()
        .find(|e| e["key"]["kind"] == frag_kind::EGRESS)
        .unwrap_or_else(|| panic!("no egress entry: {dump}"));
    assert_eq!(egress["key"]["src_addr"], serde_json::json!([10, 77, 0, 2]));
    assert_eq!(egress["key"]["id"], CLIENT_ID);
    assert_eq!(egress["key"]["proto"], proto::UDP);
    assert_eq!(egress["value"]["addr"], serde_json::json!([198, 18, 0, 1]));
    assert_eq!(egress["value"]["id"], wan_id);
    assert!(egress["value"]["first_seen_ns"].as_u64().unwrap() > 0);
    let reserved = entries
        .iter()
        .find(|e| e["key"]["kind"] == frag_kind::ID)
        .unwrap_or_else(|| panic!("no ID reservation: {dump}"));
    assert_eq!(reserved["key"]["id"], wan_id);
    assert_eq!(reserved["value"]["id"], CLIENT_ID);
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

// ---- the WAN filter in TC (`--wan-filter tc`: no XDP program) ----

/// TC alone does what XDP did in front of it: a stranger's packet to the
/// NAT range is dropped with its reason, a reply in fragments is noted by
/// its first fragment and translated whole, the host's traffic passes,
/// counted once.
#[test]
fn with_the_wan_filter_in_tc_tc_alone_drops_strangers_and_translates_fragments() {
    let mut bed = Bed::new();
    bed.wan_filter_in_tc();
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);

    let stranger = frame(REMOTE, PUBLIC, 60, L4::udp(53, port_besides(nat), b"knock"));
    assert_eq!(bed.wan_tc(&stranger).0, TC_ACT_SHOT);
    assert_eq!(bed.count(Reason::DropNoIngressFlow), 1);

    let host = frame(REMOTE, PUBLIC, 60, L4::udp(5353, 22, b"the host's"));
    assert_eq!(bed.wan_tc(&host), (TC_ACT_OK, host.clone()), "untouched");
    assert_eq!(bed.count(Reason::PassToHost), 1);

    let data = payload(3000);
    let arrived = fragments(
        &frame(REMOTE, PUBLIC, 57, L4::udp(53, nat, &data)),
        REMOTE_ID,
        1480,
    );
    let out: Vec<Vec<u8>> = arrived
        .iter()
        .map(|f| {
            let (action, out) = bed.wan_tc(f);
            assert_eq!(action, TC_ACT_REDIRECT, "every fragment to the tunnel");
            out
        })
        .collect();
    let expected = fragments(
        &frame(REMOTE, CLIENT, 57, L4::udp(53, 40000, &data)),
        REMOTE_ID,
        1480,
    );
    assert_eq!(out, expected, "to the client's address and port, ID kept");
    assert_eq!(bed.count(Reason::IngressForwarded), 3);
    assert_eq!(bed.count(Reason::PassToHost), 1, "still the host's one");
}

/// A limited client's downloads are policed in TC when XDP is absent.
#[test]
fn with_the_wan_filter_in_tc_a_limited_clients_replies_are_policed_there() {
    let mut bed = Bed::new();
    bed.wan_filter_in_tc();
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    let mut limits = bed.dp.rate_limits().unwrap();
    limits.apply(CLIENT, held_to("8bit")).unwrap();
    // 1,000 IP bytes each: the 128 KiB burst lets 132 through.
    let down = frame(REMOTE, PUBLIC, 60, L4::udp(53, nat, &[7u8; 972]));
    let delivered = (0..200)
        .take_while(|_| bed.wan_tc(&down).0 == TC_ACT_REDIRECT)
        .count();
    assert_eq!(delivered, 132);
    assert_eq!(bed.wan_tc(&down).0, TC_ACT_SHOT);
    assert!(bed.count(Reason::DropRateLimited) >= 1);
}

/// A limited client's fragmented download counts every fragment against
/// its rate, not only the first (each has its own bytes on the wire).
#[test]
fn every_fragment_of_a_limited_clients_reply_is_policed() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    let mut limits = bed.dp.rate_limits().unwrap();
    limits.apply(CLIENT, held_to("1gbit")).unwrap();
    let arrived = fragments(
        &frame(REMOTE, PUBLIC, 57, L4::udp(53, nat, &payload(3000))),
        REMOTE_ID,
        1480,
    );
    receive_fragments(&mut bed, &arrived);
    let ip_bytes: u64 = arrived.iter().map(|f| (f.len() - ETH_LEN) as u64).sum();
    assert_eq!(
        limits.get(CLIENT).unwrap().used,
        ip_bytes,
        "all three counted"
    );
}

/// A rate limit alone, each way.
fn held_to(rate: &str) -> veil_user::ratelimit::Effective {
    veil_user::ratelimit::Effective {
        rate: Some(rate.parse().unwrap()),
        quota: None,
        period: std::time::Duration::from_secs(86_400),
    }
}

/// The TUN device's steering program answers with a reply's client: its
/// IPv4 destination, or the last 32 bits of an IPv6 one (the client's
/// IPv4 lease). The kernel takes that modulo the queue count, as the
/// daemon does to pick the queue it writes the client's packets on.
#[test]
fn the_steering_program_names_each_replys_client() {
    use std::net::Ipv6Addr;

    use aya::programs::{SocketFilter, TestRun, TestRunOptions};
    use veil_common::{steer::queue_of, PROG_TUN_STEER};
    use veil_tests::packet6::frame6;

    let mut bed = Bed::new();
    bed.dp.tun_steering().expect("loading the steering program");
    let prog: &mut SocketFilter = bed.dp.program(PROG_TUN_STEER).unwrap();
    let client = Ipv4Addr::new(10, 77, 1, 5);
    let reply = frame(REMOTE, client, 63, L4::udp(53, 40000, b"an answer"));
    // A socket filter returns a number, not a packet (the kernel refuses
    // an output buffer for one).
    let answer_for = |frame: &[u8]| {
        let run = TestRunOptions {
            data_in: Some(frame),
            ..Default::default()
        };
        prog.test_run(run).expect("BPF_PROG_TEST_RUN").return_value
    };
    let answer = answer_for(&reply);
    assert_eq!(answer, client.to_bits());

    let client6 = Ipv6Addr::new(0xfd00, 0x7665, 0x696c, 0, 0, 0, 0x0a4d, 0x0105);
    let remote6 = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
    let reply6 = frame6(remote6, client6, 63, L4::udp(53, 40000, b"an answer"));
    let answer6 = answer_for(&reply6);
    assert_eq!(answer6, client.to_bits(), "the same client, the same queue");
    // What the kernel makes of it: the low 16 bits (0x0105) modulo the
    // queue count, as the daemon computes the queue it writes on.
    assert_eq!([2, 3, 4].map(|n| queue_of(answer, n)), [1, 0, 1]);

    // Too short to hold an address (the kernel would take no such IP
    // packet to test: an ARP frame's length): the first queue.
    let mut short = reply[..ETH_LEN + 12].to_vec();
    short[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(answer_for(&short), 0);
}
