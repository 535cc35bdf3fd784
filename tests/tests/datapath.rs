//! The real eBPF programs under BPF_PROG_TEST_RUN: for every path, the
//! action, the exact output bytes (against packets etherparse builds from
//! scratch), the checksums (recomputed from scratch) and the map state.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN). Run through `cargo xtask test`.

use std::net::Ipv4Addr;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp};
use veil_common::{proto, tcp_flags, FlowKey, Reason, PROG_TUN_TC, PROG_WAN_TC, PROG_WAN_XDP};
use veil_tests::packet::{assert_checksums, edit_ip, frame, icmp_error, ip_of, ETH_LEN, L4};
use veil_user::{
    flows::{Flow, FlowTable, PortRange, Timeouts},
    net::Ipv4Net,
    Datapath, DatapathConfig,
};

const PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 7);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const PORTS: PortRange = PortRange {
    min: 61000,
    max: 61999,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

/// The loaded programs with fresh maps, configured as a gateway.
struct Bed {
    dp: Datapath,
    flows: FlowTable,
}

impl Bed {
    fn new() -> Self {
        let mut dp = Datapath::load().expect("loading the datapath (are you root?)");
        dp.configure(&DatapathConfig {
            public_addr: PUBLIC,
            vip_pool: "10.77.0.0/16".parse::<Ipv4Net>().unwrap(),
            nat_ports: PORTS,
            wan_ifindex: 4242,
            tun_ifindex: 4343,
            // BPF_PROG_TEST_RUN gives TC programs an Ethernet header.
            tun_l2_len: ETH_LEN as u32,
        })
        .unwrap();
        let flows = dp.flow_table(PORTS, Timeouts::default()).unwrap();
        Self { dp, flows }
    }

    fn flow(&mut self, proto: u8, client_port: u16, remote_port: u16) -> (FlowKey, u16) {
        let key = FlowKey::new(proto, CLIENT, client_port, REMOTE, remote_port);
        let nat = self.flows.create(key, 1).expect("creating a flow");
        assert!(PORTS.contains(nat), "NAT port {nat} outside {PORTS}");
        (key, nat)
    }

    fn tun(&mut self, input: &[u8]) -> (i32, Vec<u8>) {
        let prog: &mut SchedClassifier = self.dp.program(PROG_TUN_TC).unwrap();
        let (rc, out) = run(prog, input);
        (rc as i32, out)
    }

    fn wan_tc(&mut self, input: &[u8]) -> i32 {
        let prog: &mut SchedClassifier = self.dp.program(PROG_WAN_TC).unwrap();
        run(prog, input).0 as i32
    }

    fn xdp(&mut self, input: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut Xdp = self.dp.program(PROG_WAN_XDP).unwrap();
        run(prog, input)
    }

    fn count(&self, reason: Reason) -> u64 {
        let stats = self.dp.stats().unwrap();
        stats.iter().find(|(r, _)| *r == reason).unwrap().1.packets
    }

    fn listed(&self, key: &FlowKey) -> Flow {
        let all = self.flows.list().unwrap();
        all.into_iter()
            .find(|f| f.key == *key)
            .expect("flow listed")
    }
}

fn run<P>(prog: &P, input: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; input.len() + 256];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

// ---- egress: client -> internet (TC on the TUN device) ----

#[test]
fn egress_udp_is_rewritten_to_the_public_address() {
    let mut bed = Bed::new();
    let (key, nat) = bed.flow(proto::UDP, 40000, 53);
    let payload = b"a DNS question, more or less";
    let input = frame(
        CLIENT,
        REMOTE,
        64,
        L4::Udp {
            src: 40000,
            dst: 53,
            payload,
        },
    );

    let (action, out) = bed.tun(&input);

    assert_eq!(
        action, TC_ACT_REDIRECT,
        "sent to the WAN with redirect_neigh"
    );
    let expected = frame(
        PUBLIC,
        REMOTE,
        63,
        L4::Udp {
            src: nat,
            dst: 53,
            payload,
        },
    );
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
    let input = frame(
        CLIENT,
        REMOTE,
        64,
        L4::Tcp {
            src: 50000,
            dst: 443,
            flags: "S",
            payload: b"",
        },
    );

    let (action, out) = bed.tun(&input);

    assert_eq!(action, TC_ACT_REDIRECT);
    let expected = frame(
        PUBLIC,
        REMOTE,
        63,
        L4::Tcp {
            src: nat,
            dst: 443,
            flags: "S",
            payload: b"",
        },
    );
    assert_eq!(out, expected);
    assert_checksums(ip_of(&out));
    assert_eq!(bed.listed(&key).egress.tcp_flags, tcp_flags::SYN);
}

#[test]
fn egress_icmp_echo_uses_the_identifier_as_port() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::ICMP, 0x1234, 0);
    let input = frame(
        CLIENT,
        REMOTE,
        64,
        L4::EchoRequest {
            id: 0x1234,
            seq: 7,
            payload: b"ping!",
        },
    );

    let (action, out) = bed.tun(&input);

    assert_eq!(action, TC_ACT_REDIRECT);
    let expected = frame(
        PUBLIC,
        REMOTE,
        63,
        L4::EchoRequest {
            id: nat,
            seq: 7,
            payload: b"ping!",
        },
    );
    assert_eq!(out, expected);
    assert_checksums(ip_of(&out));
}

#[test]
fn egress_keeps_a_zero_udp_checksum_zero() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    let mut input = frame(
        CLIENT,
        REMOTE,
        64,
        L4::Udp {
            src: 40000,
            dst: 53,
            payload: b"x",
        },
    );
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
    let input = frame(
        CLIENT,
        REMOTE,
        64,
        L4::Udp {
            src: 40000,
            dst: 53,
            payload: b"x",
        },
    );

    let (action, _) = bed.tun(&input);

    assert_eq!(action, TC_ACT_SHOT);
    assert_eq!(bed.count(Reason::DropNoEgressFlow), 1);
    assert_eq!(bed.count(Reason::EgressForwarded), 0);
}

#[test]
fn egress_refuses_what_it_cannot_translate_with_a_reason() {
    let mut bed = Bed::new();
    bed.flow(proto::UDP, 40000, 53);
    let good = frame(
        CLIENT,
        REMOTE,
        64,
        L4::Udp {
            src: 40000,
            dst: 53,
            payload: b"hello",
        },
    );

    let mut fragment = good.clone();
    edit_ip(&mut fragment, |f| f[ETH_LEN + 6] |= 0x20); // MF
    let mut options = good.clone();
    options.splice(ETH_LEN + 20..ETH_LEN + 20, [1, 1, 1, 0]); // NOP NOP NOP EOL
    edit_ip(&mut options, |f| {
        f[ETH_LEN] = 0x46;
        let len = u16::from_be_bytes([f[ETH_LEN + 2], f[ETH_LEN + 3]]) + 4;
        f[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&len.to_be_bytes());
    });
    let expiring = frame(
        CLIENT,
        REMOTE,
        1,
        L4::Udp {
            src: 40000,
            dst: 53,
            payload: b"x",
        },
    );
    let truncated = good[..ETH_LEN + 24].to_vec();
    let gre = {
        let mut f = good.clone();
        edit_ip(&mut f, |f| f[ETH_LEN + 9] = 47);
        f
    };

    for (input, reason) in [
        (&fragment, Reason::DropFragment),
        (&options, Reason::DropIpOptions),
        (&expiring, Reason::DropTtlExpired),
        (&truncated, Reason::DropMalformed),
        (&gre, Reason::DropUnsupported),
    ] {
        let (action, _) = bed.tun(input);
        assert_eq!(action, TC_ACT_SHOT, "{reason:?}");
        assert_eq!(bed.count(reason), 1, "{reason:?} counted once");
    }
    assert_eq!(bed.count(Reason::EgressForwarded), 0);
}

// ---- ingress: internet -> client (XDP on the WAN) ----

#[test]
fn ingress_udp_reply_goes_back_to_the_client() {
    let mut bed = Bed::new();
    let (key, nat) = bed.flow(proto::UDP, 40000, 53);
    let payload = b"an answer";
    let input = frame(
        REMOTE,
        PUBLIC,
        57,
        L4::Udp {
            src: 53,
            dst: nat,
            payload,
        },
    );

    let (action, out) = bed.xdp(&input);

    assert_eq!(
        action, XDP_PASS,
        "passed up for veil_wan_tc to hand to the TUN"
    );
    let expected = frame(
        REMOTE,
        CLIENT,
        57,
        L4::Udp {
            src: 53,
            dst: 40000,
            payload,
        },
    );
    assert_eq!(out, expected);
    assert_checksums(ip_of(&out));
    let flow = bed.listed(&key);
    assert_eq!(
        (flow.reverse.packets, flow.reverse.bytes),
        (1, input.len() as u64)
    );
    assert_eq!(bed.count(Reason::IngressForwarded), 1);
    assert_eq!(
        bed.wan_tc(&out),
        TC_ACT_REDIRECT,
        "a client's packet goes to the TUN"
    );
}

#[test]
fn ingress_tcp_reply_records_flags() {
    let mut bed = Bed::new();
    let (key, nat) = bed.flow(proto::TCP, 50000, 443);
    let input = frame(
        REMOTE,
        PUBLIC,
        57,
        L4::Tcp {
            src: 443,
            dst: nat,
            flags: "SA",
            payload: b"",
        },
    );

    let (action, out) = bed.xdp(&input);

    assert_eq!(action, XDP_PASS);
    let expected = frame(
        REMOTE,
        CLIENT,
        57,
        L4::Tcp {
            src: 443,
            dst: 50000,
            flags: "SA",
            payload: b"",
        },
    );
    assert_eq!(out, expected);
    assert_checksums(ip_of(&out));
    assert_eq!(
        bed.listed(&key).reverse.tcp_flags,
        tcp_flags::SYN | tcp_flags::ACK
    );
}

#[test]
fn ingress_echo_reply_gets_its_identifier_back() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::ICMP, 0x1234, 0);
    let input = frame(
        REMOTE,
        PUBLIC,
        57,
        L4::EchoReply {
            id: nat,
            seq: 7,
            payload: b"pong",
        },
    );

    let (action, out) = bed.xdp(&input);

    assert_eq!(action, XDP_PASS);
    let expected = frame(
        REMOTE,
        CLIENT,
        57,
        L4::EchoReply {
            id: 0x1234,
            seq: 7,
            payload: b"pong",
        },
    );
    assert_eq!(out, expected);
    assert_checksums(ip_of(&out));
}

#[test]
fn unsolicited_packets_to_the_nat_range_are_dropped_in_xdp() {
    let mut bed = Bed::new();
    bed.flow(proto::TCP, 50000, 443);
    let syn = frame(
        REMOTE,
        PUBLIC,
        57,
        L4::Tcp {
            src: 4444,
            dst: PORTS.min + 5,
            flags: "S",
            payload: b"",
        },
    );
    let udp = frame(
        REMOTE,
        PUBLIC,
        57,
        L4::Udp {
            src: 4444,
            dst: PORTS.max,
            payload: b"?",
        },
    );
    let ping = frame(
        REMOTE,
        PUBLIC,
        57,
        L4::EchoReply {
            id: PORTS.min,
            seq: 1,
            payload: b"",
        },
    );

    for input in [&syn, &udp, &ping] {
        assert_eq!(bed.xdp(input).0, XDP_DROP);
    }
    assert_eq!(bed.count(Reason::DropNoIngressFlow), 3);
}

#[test]
fn traffic_for_the_host_passes_untouched() {
    let mut bed = Bed::new();
    let ssh = frame(
        REMOTE,
        PUBLIC,
        57,
        L4::Tcp {
            src: 4444,
            dst: 22,
            flags: "S",
            payload: b"",
        },
    );
    let tunnel = frame(
        REMOTE,
        PUBLIC,
        57,
        L4::Tcp {
            src: 4444,
            dst: 443,
            flags: "S",
            payload: b"",
        },
    );
    let ping_gateway = frame(
        REMOTE,
        PUBLIC,
        57,
        L4::EchoRequest {
            id: PORTS.min,
            seq: 1,
            payload: b"",
        },
    );
    let elsewhere = frame(
        REMOTE,
        Ipv4Addr::new(198, 18, 0, 9),
        57,
        L4::Udp {
            src: 1,
            dst: PORTS.min,
            payload: b"",
        },
    );
    let mut arp = ssh.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);

    for input in [&ssh, &tunnel, &ping_gateway, &elsewhere, &arp] {
        let (action, out) = bed.xdp(input);
        assert_eq!(action, XDP_PASS);
        assert_eq!(&out, input, "not modified");
        assert_eq!(bed.wan_tc(input), TC_ACT_OK, "not redirected");
    }
    assert_eq!(bed.count(Reason::PassToHost), 5);
}

#[test]
fn wan_packets_addressed_to_a_client_are_dropped_as_spoofed() {
    let mut bed = Bed::new();
    bed.flow(proto::UDP, 40000, 53);
    let forged = frame(
        REMOTE,
        CLIENT,
        57,
        L4::Udp {
            src: 53,
            dst: 40000,
            payload: b"hi",
        },
    );

    assert_eq!(bed.xdp(&forged).0, XDP_DROP);
    assert_eq!(bed.count(Reason::DropSpoofedVip), 1);
}

#[test]
fn ingress_fragments_and_options_in_the_nat_range_are_dropped_with_a_reason() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    let reply = frame(
        REMOTE,
        PUBLIC,
        57,
        L4::Udp {
            src: 53,
            dst: nat,
            payload: b"answer",
        },
    );
    let mut first_fragment = reply.clone();
    edit_ip(&mut first_fragment, |f| f[ETH_LEN + 6] |= 0x20);
    let mut later_fragment = reply.clone();
    edit_ip(&mut later_fragment, |f| f[ETH_LEN + 7] = 0x10);
    let mut options = reply.clone();
    options.splice(ETH_LEN + 20..ETH_LEN + 20, [1, 1, 1, 0]);
    edit_ip(&mut options, |f| {
        f[ETH_LEN] = 0x46;
        let len = u16::from_be_bytes([f[ETH_LEN + 2], f[ETH_LEN + 3]]) + 4;
        f[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&len.to_be_bytes());
    });

    assert_eq!(bed.xdp(&first_fragment).0, XDP_DROP);
    assert_eq!(bed.count(Reason::DropFragment), 1);
    assert_eq!(bed.xdp(&options).0, XDP_DROP);
    assert_eq!(bed.count(Reason::DropIpOptions), 1);
    // No ports to read: the host's reassembly gets it and, without the
    // first fragment, never completes or answers.
    let (action, out) = bed.xdp(&later_fragment);
    assert_eq!((action, &out), (XDP_PASS, &later_fragment));
    assert_eq!(bed.count(Reason::IngressForwarded), 0);
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
    let sent = frame(
        PUBLIC,
        REMOTE,
        63,
        L4::Udp {
            src: nat,
            dst: 53,
            payload: b"question",
        },
    );
    let as_client = frame(
        CLIENT,
        REMOTE,
        63,
        L4::Udp {
            src: 40000,
            dst: 53,
            payload: b"question",
        },
    );
    let input = icmp_error(ROUTER, PUBLIC, 3, 3, [0; 4], ip_of(&sent));

    let (action, out) = bed.xdp(&input);

    assert_eq!(action, XDP_PASS);
    assert_icmp_error_translated(&out, ip_of(&as_client));
    assert_checksums(&ip_of(&out)[28..]); // the quoted datagram, UDP checksum included
    assert_eq!(bed.count(Reason::IcmpErrorForwarded), 1);
    assert_eq!(bed.wan_tc(&out), TC_ACT_REDIRECT);
}

#[test]
fn fragmentation_needed_for_a_tcp_flow_keeps_its_mtu() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::TCP, 50000, 443);
    let data = [0xabu8; 64];
    let sent = frame(
        PUBLIC,
        REMOTE,
        63,
        L4::Tcp {
            src: nat,
            dst: 443,
            flags: "PA",
            payload: &data,
        },
    );
    let as_client = frame(
        CLIENT,
        REMOTE,
        63,
        L4::Tcp {
            src: 50000,
            dst: 443,
            flags: "PA",
            payload: &data,
        },
    );
    let mtu = 1280u16.to_be_bytes();
    let input = icmp_error(ROUTER, PUBLIC, 3, 4, [0, 0, mtu[0], mtu[1]], ip_of(&sent));

    let (action, out) = bed.xdp(&input);

    assert_eq!(action, XDP_PASS);
    assert_icmp_error_translated(&out, ip_of(&as_client));
    assert_eq!(
        &ip_of(&out)[24..28],
        &[0, 0, mtu[0], mtu[1]],
        "next-hop MTU kept"
    );
}

#[test]
fn fragmentation_needed_with_a_short_tcp_quote() {
    // RFC 792 promises only 8 bytes of the transport header: no TCP
    // checksum in the quote, which must not stop the translation.
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::TCP, 50000, 443);
    let sent = frame(
        PUBLIC,
        REMOTE,
        63,
        L4::Tcp {
            src: nat,
            dst: 443,
            flags: "A",
            payload: b"",
        },
    );
    let as_client = frame(
        CLIENT,
        REMOTE,
        63,
        L4::Tcp {
            src: 50000,
            dst: 443,
            flags: "A",
            payload: b"",
        },
    );
    let input = icmp_error(ROUTER, PUBLIC, 3, 4, [0, 0, 5, 0], &ip_of(&sent)[..28]);

    let (action, out) = bed.xdp(&input);

    assert_eq!(action, XDP_PASS);
    let ip = ip_of(&out);
    assert_eq!(&ip[16..20], &CLIENT.octets());
    assert_checksums(ip);
    assert_eq!(
        &ip[28..48],
        &ip_of(&as_client)[..20],
        "quoted IP header is the client's"
    );
    assert_eq!(
        &ip[48..56],
        &ip_of(&as_client)[20..28],
        "quoted ports are the client's"
    );
}

#[test]
fn time_exceeded_for_a_ping_reaches_its_client() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::ICMP, 0x1234, 0);
    let sent = frame(
        PUBLIC,
        REMOTE,
        1,
        L4::EchoRequest {
            id: nat,
            seq: 3,
            payload: b"trace",
        },
    );
    let as_client = frame(
        CLIENT,
        REMOTE,
        1,
        L4::EchoRequest {
            id: 0x1234,
            seq: 3,
            payload: b"trace",
        },
    );
    let input = icmp_error(ROUTER, PUBLIC, 11, 0, [0; 4], ip_of(&sent));

    let (action, out) = bed.xdp(&input);

    assert_eq!(action, XDP_PASS);
    assert_icmp_error_translated(&out, ip_of(&as_client));
}

#[test]
fn icmp_errors_without_a_flow_are_dropped_and_the_hosts_own_pass() {
    let mut bed = Bed::new();
    let unknown = frame(
        PUBLIC,
        REMOTE,
        63,
        L4::Udp {
            src: PORTS.min + 1,
            dst: 53,
            payload: b"q",
        },
    );
    let hosts = frame(
        PUBLIC,
        REMOTE,
        63,
        L4::Tcp {
            src: 443,
            dst: 5555,
            flags: "A",
            payload: b"",
        },
    );
    let for_unknown = icmp_error(ROUTER, PUBLIC, 3, 3, [0; 4], ip_of(&unknown));
    let for_host = icmp_error(ROUTER, PUBLIC, 3, 4, [0, 0, 5, 0], ip_of(&hosts));

    assert_eq!(bed.xdp(&for_unknown).0, XDP_DROP);
    assert_eq!(bed.count(Reason::DropNoIngressFlow), 1);
    let (action, out) = bed.xdp(&for_host);
    assert_eq!(
        (action, &out),
        (XDP_PASS, &for_host),
        "the host's own error, untouched"
    );
}

#[test]
fn malformed_frames_are_dropped_not_mangled() {
    let mut bed = Bed::new();
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    let reply = frame(
        REMOTE,
        PUBLIC,
        57,
        L4::Udp {
            src: 53,
            dst: nat,
            payload: b"answer",
        },
    );

    let truncated = reply[..ETH_LEN + 22].to_vec();
    let mut bad_version = reply.clone();
    edit_ip(&mut bad_version, |f| f[ETH_LEN] = 0x65);
    let mut short_ihl = reply.clone();
    edit_ip(&mut short_ihl, |f| f[ETH_LEN] = 0x44);

    for input in [&truncated, &bad_version, &short_ihl] {
        assert_eq!(bed.xdp(input).0, XDP_DROP);
    }
    assert_eq!(bed.count(Reason::DropMalformed), 3);
}
