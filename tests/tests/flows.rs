//! The flow API against the real kernel maps: port claiming, endpoint-
//! independent mapping, exhaustion, each client's share of an endpoint,
//! public addresses, deletion and expiry, checked through the pinned maps
//! and through what the datapath then does with packets.

use std::{net::Ipv4Addr, time::Duration};

use veil_common::{
    fwd_dir, proto, EgressFlow, FlowKey, FlowStats, FwdFlow, FwdKey, FwdRuleKey, Reason,
    ReverseFlow, ReverseKey,
};
use veil_tests::{
    bed::*,
    packet::{frame, ETH_LEN as ETH, L4},
};
use veil_user::{
    flows::{FlowError, PortRange, Timeouts},
    net::monotonic_ns,
};

const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);

fn key(proto: u8, client: Ipv4Addr, port: u16, remote: Ipv4Addr, rport: u16) -> FlowKey {
    FlowKey::new(proto, client, port, remote, rport)
}

#[test]
fn a_flow_is_two_map_entries_that_point_at_each_other() {
    let (mut bed, dir, _fs) = Bed::pinned();
    let k = key(proto::UDP, CLIENT, 40000, REMOTE, 53);

    let nat = bed.flows.create(k, 1).unwrap();
    assert_eq!(bed.flows.create(k, 2).unwrap(), nat, "create is idempotent");

    let egress: Vec<(FlowKey, EgressFlow)> = pinned_keys(&dir.join("egress"));
    let reverse: Vec<(ReverseKey, ReverseFlow)> = pinned_keys(&dir.join("reverse"));
    assert_eq!(egress.len(), 1);
    assert_eq!(egress[0].0, k);
    assert_eq!(egress[0].1.nat_port, nat);
    assert_eq!(reverse.len(), 1);
    assert_eq!(reverse[0].0, k.reverse(PUBLIC, nat));
    assert_eq!(egress[0].1.public_addr, PUBLIC.octets());
    assert_eq!(reverse[0].1.client_addr, CLIENT.octets());
    assert_eq!(reverse[0].1.client_port, 40000);
}

#[test]
fn a_client_endpoint_keeps_its_nat_port_toward_every_remote() {
    let mut bed = Bed::new();
    let a = bed
        .flows
        .create(key(proto::UDP, CLIENT, 40000, REMOTE, 53), 1)
        .unwrap();
    let b = bed
        .flows
        .create(key(proto::UDP, CLIENT, 40000, OTHER, 53), 1)
        .unwrap();
    let c = bed
        .flows
        .create(key(proto::UDP, CLIENT, 40000, OTHER, 123), 1)
        .unwrap();
    assert_eq!(
        (a, a),
        (b, c),
        "endpoint-independent mapping (RFC 4787 REQ-1)"
    );

    // Another client's endpoint toward the same remote gets another port.
    let other_client = Ipv4Addr::new(10, 77, 0, 3);
    let d = bed
        .flows
        .create(key(proto::UDP, other_client, 40000, REMOTE, 53), 1)
        .unwrap();
    assert_ne!(a, d);
}

#[test]
fn exhausting_the_ports_toward_one_endpoint_is_a_clear_error_and_nothing_else() {
    let ports = PortRange {
        min: 61000,
        max: 61003,
    };
    let mut bed = Bed::with_ports(ports);
    let mut taken = Vec::new();
    for i in 0..4u8 {
        let client = Ipv4Addr::new(10, 77, 1, i);
        taken.push(
            bed.flows
                .create(key(proto::TCP, client, 1234, REMOTE, 443), 1)
                .unwrap(),
        );
    }
    taken.sort();
    assert_eq!(taken, vec![61000, 61001, 61002, 61003]);

    let fifth = key(proto::TCP, Ipv4Addr::new(10, 77, 1, 9), 1234, REMOTE, 443);
    let err = bed.flows.create(fifth, 1).unwrap_err();
    assert!(matches!(err, FlowError::PortsExhausted { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "no free NAT port toward 198.18.0.2:443 (tcp) on 198.18.0.1: all 4 ports of 61000-61003 are in use for that endpoint"
    );
    assert_eq!(bed.flows.len(), 4, "the failure left nothing behind");

    // The same ports are free toward any other endpoint.
    bed.flows
        .create(
            key(proto::TCP, Ipv4Addr::new(10, 77, 1, 9), 1234, REMOTE, 80),
            1,
        )
        .unwrap();
}

#[test]
fn a_full_table_is_a_clear_error() {
    let mut bed = Bed::new();
    bed.flows = std::mem::replace(&mut bed.flows, dummy_table()).with_capacity(2);
    bed.flows
        .create(key(proto::UDP, CLIENT, 1, REMOTE, 53), 1)
        .unwrap();
    bed.flows
        .create(key(proto::UDP, CLIENT, 2, REMOTE, 53), 1)
        .unwrap();
    let err = bed
        .flows
        .create(key(proto::UDP, CLIENT, 3, REMOTE, 53), 1)
        .unwrap_err();
    assert_eq!(err.to_string(), "the flow table is full (2 flows)");
}

#[test]
fn one_client_cannot_take_every_flow() {
    let mut bed = Bed::new();
    bed.flows = std::mem::replace(&mut bed.flows, dummy_table()).with_client_limit(2);
    let greedy = CLIENT;
    bed.flows
        .create(key(proto::UDP, greedy, 1, REMOTE, 53), 1)
        .unwrap();
    bed.flows
        .create(key(proto::UDP, greedy, 2, REMOTE, 53), 1)
        .unwrap();
    let err = bed
        .flows
        .create(key(proto::UDP, greedy, 3, REMOTE, 53), 1)
        .unwrap_err();
    assert_eq!(err.to_string(), "client 10.77.0.2 has 2 flows, its limit");
    let other = Ipv4Addr::new(10, 77, 0, 3);
    bed.flows
        .create(key(proto::UDP, other, 1, REMOTE, 53), 1)
        .unwrap();
    // Freed by a delete.
    assert!(bed
        .flows
        .delete(&key(proto::UDP, greedy, 1, REMOTE, 53))
        .unwrap());
    bed.flows
        .create(key(proto::UDP, greedy, 3, REMOTE, 53), 1)
        .unwrap();
}

/// Entries in the pinned egress and reverse maps.
fn entries(dir: &std::path::Path) -> (usize, usize) {
    (
        pinned_keys::<FlowKey, EgressFlow>(&dir.join("egress")).len(),
        pinned_keys::<ReverseKey, ReverseFlow>(&dir.join("reverse")).len(),
    )
}

/// A stand-in table for `mem::replace` (from a bed of its own).
fn dummy_table() -> veil_user::FlowTable {
    Bed::new().flows
}

#[test]
fn a_deleted_flow_is_gone_from_the_maps_and_the_datapath() {
    let (mut bed, dir, _fs) = Bed::pinned();
    let k = key(proto::UDP, CLIENT, 40000, REMOTE, 53);
    let nat = bed.flows.create(k, 1).unwrap();
    let reply = frame(
        REMOTE,
        PUBLIC,
        57,
        L4::Udp {
            src: 53,
            dst: nat,
            payload: b"a",
        },
    );
    assert!(bed.wan(&reply).delivered());

    assert!(bed.flows.delete(&k).unwrap());
    assert!(
        !bed.flows.delete(&k).unwrap(),
        "a second delete finds nothing"
    );

    assert!(pinned_keys::<FlowKey, EgressFlow>(&dir.join("egress")).is_empty());
    assert!(pinned_keys::<ReverseKey, ReverseFlow>(&dir.join("reverse")).is_empty());
    assert_eq!(bed.xdp(&reply).0, XDP_DROP, "the reply is now unsolicited");
    let out = frame(
        CLIENT,
        REMOTE,
        64,
        L4::Udp {
            src: 40000,
            dst: 53,
            payload: b"a",
        },
    );
    assert_eq!(
        bed.tun(&out).0,
        TC_ACT_SHOT,
        "and the client's packet has no flow"
    );
    assert_eq!(bed.count(Reason::DropNoEgressFlow), 1);
}

#[test]
fn removing_a_client_removes_all_its_flows_and_only_those() {
    let mut bed = Bed::new();
    let other = Ipv4Addr::new(10, 77, 0, 3);
    for port in [1000, 1001, 1002] {
        bed.flows
            .create(key(proto::TCP, CLIENT, port, REMOTE, 443), 1)
            .unwrap();
    }
    bed.flows
        .create(key(proto::TCP, other, 1000, REMOTE, 443), 1)
        .unwrap();

    assert_eq!(bed.flows.delete_client(CLIENT).unwrap(), 3);
    let left = bed.flows.list().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].key.client(), other);
}

#[test]
fn expiry_follows_protocol_and_tcp_state() {
    let mut bed = Bed::new();
    let t0 = monotonic_ns();
    let icmp = key(proto::ICMP, CLIENT, 7, REMOTE, 0);
    let dns = key(proto::UDP, CLIENT, 40001, REMOTE, 53);
    let udp = key(proto::UDP, CLIENT, 40000, REMOTE, 123);
    let half_open = key(proto::TCP, CLIENT, 50001, REMOTE, 443);
    let answered = key(proto::TCP, CLIENT, 50002, REMOTE, 443);
    let established = key(proto::TCP, CLIENT, 50000, REMOTE, 443);
    for k in [icmp, dns, udp, half_open, answered, established] {
        bed.flows.create(k, t0).unwrap();
    }
    // Through the datapath: SYN out, SYN-ACK back, and the client's ACK
    // for `established` only (`answered` is where a forged SYN gets).
    let tcp =
        |src, dst, sport, dport, flags| frame(src, dst, 64, L4::tcp(sport, dport, flags, b""));
    for (client_port, ack) in [(50000, true), (50002, false)] {
        let flow = key(proto::TCP, CLIENT, client_port, REMOTE, 443);
        let nat = bed.flows.get(&flow).unwrap();
        assert_eq!(
            bed.tun(&tcp(CLIENT, REMOTE, client_port, 443, "S")).0,
            TC_ACT_REDIRECT
        );
        assert!(bed.wan(&tcp(REMOTE, PUBLIC, 443, nat, "SA")).delivered());
        if ack {
            assert_eq!(
                bed.tun(&tcp(CLIENT, REMOTE, client_port, 443, "A")).0,
                TC_ACT_REDIRECT
            );
        }
    }
    let seen = monotonic_ns();

    let after = |d: Duration| seen + d.as_nanos() as u64;
    let gc = |bed: &mut Bed, d| {
        let mut expired = bed.flows.gc(after(d)).unwrap().expired;
        expired.sort();
        expired
    };
    assert_eq!(gc(&mut bed, Duration::from_secs(29)), vec![]);
    assert_eq!(gc(&mut bed, Duration::from_secs(31)), vec![dns]);
    assert_eq!(gc(&mut bed, Duration::from_secs(59)), vec![]);
    assert_eq!(gc(&mut bed, Duration::from_secs(61)), vec![icmp]);
    assert_eq!(gc(&mut bed, Duration::from_secs(121)), vec![udp]);
    let mut transitory = vec![half_open, answered];
    transitory.sort();
    assert_eq!(gc(&mut bed, Duration::from_secs(241)), transitory);
    assert_eq!(gc(&mut bed, Duration::from_secs(2 * 3600)), vec![]);
    assert_eq!(
        gc(&mut bed, Duration::from_secs(2 * 3600 + 4 * 60 + 1)),
        vec![established]
    );
    assert!(bed.flows.is_empty());
}

/// Replies keep a flow alive only up to one timeout past the client's last
/// packet: a forger sending with a popular server's address to every NAT
/// port would otherwise keep those ports from all clients for good.
#[test]
fn replies_alone_keep_a_flow_only_a_timeout_past_the_clients_last_packet() {
    let mut bed = Bed::new();
    let now = monotonic_ns();
    let mins = |m: u64| m * 60_000_000_000;
    // The client's last packets 10 minutes and 1 minute ago (the UDP
    // timeout is 2): replies since, through the datapath, on both.
    let left = key(proto::UDP, CLIENT, 40000, REMOTE, 123);
    let talking = key(proto::UDP, CLIENT, 40001, REMOTE, 123);
    for (k, made) in [(left, now - mins(10)), (talking, now - mins(1))] {
        let nat = bed.flows.create(k, made).unwrap();
        let reply = frame(REMOTE, PUBLIC, 64, L4::udp(123, nat, b"forged or not"));
        assert!(bed.wan(&reply).delivered());
    }
    let expired = bed.flows.gc(monotonic_ns()).unwrap().expired;
    assert_eq!(expired, vec![left]);
    // The one the client spoke on a minute ago: a reply keeps it past the
    // client's own timeout, up to one more.
    assert!(bed.flows.get(&talking).is_some());
    let mut later = |secs: u64| bed.flows.gc(now + secs * 1_000_000_000).unwrap().expired;
    assert_eq!(later(90), vec![], "a reply a moment ago");
    assert_eq!(later(180), vec![talking], "idle past the timeout since");
}

/// An RST or FIN with a remote's address but a sequence number far from
/// what the client acknowledged is no proof that the connection ended:
/// anyone can send one, guessing only the NAT port. It still reaches the
/// client (whose stack ignores it, RFC 5961) but does not shorten the
/// flow's timeout to the closed connection's 4 minutes; one near the
/// client's acknowledgment does.
#[test]
fn a_blind_rst_with_a_remotes_address_does_not_close_a_clients_flow() {
    let mut bed = Bed::new();
    let k = key(proto::TCP, CLIENT, 50000, REMOTE, 443);
    let nat = bed.flows.create(k, monotonic_ns()).unwrap();
    // What the client has acknowledged: the remote's next sequence number.
    const NEXT: u32 = 0x7d31_0000;
    let out = |bed: &mut Bed, seq, ack, flags| {
        let verdict = bed
            .tun(&frame(
                CLIENT,
                REMOTE,
                64,
                L4::tcp_numbered(50000, 443, flags, seq, ack),
            ))
            .0;
        assert_eq!(verdict, TC_ACT_REDIRECT);
    };
    let back = |bed: &mut Bed, seq, flags| {
        let packet = frame(
            REMOTE,
            PUBLIC,
            64,
            L4::tcp_numbered(443, nat, flags, seq, 2),
        );
        assert!(bed.wan(&packet).delivered(), "the client gets it, to judge");
    };
    out(&mut bed, 1, 0, "S");
    back(&mut bed, NEXT - 1, "SA");
    out(&mut bed, 2, NEXT, "A");
    let seen = |bed: &Bed| bed.flows.list().unwrap()[0].reverse.tcp_flags;
    let closing = veil_common::tcp_flags::RST | veil_common::tcp_flags::FIN;

    back(&mut bed, NEXT.wrapping_add(1 << 31), "R");
    back(&mut bed, NEXT.wrapping_add(1 << 30), "FA");
    assert_eq!(seen(&bed) & closing, 0, "blind guesses count for nothing");
    let after_transitory = monotonic_ns() + 241_000_000_000;
    assert!(bed.flows.gc(after_transitory).unwrap().expired.is_empty());

    back(&mut bed, NEXT + 1460, "R");
    assert_ne!(seen(&bed) & closing, 0, "an RST in the window ends it");
    assert_eq!(bed.flows.gc(after_transitory).unwrap().expired, vec![k]);
}

/// The lock-free index the packet path asks "is this flow known" must
/// lose a flow when the table does, whatever removes it: otherwise a
/// client's packet would skip creating a flow that is gone from the maps.
#[test]
fn the_known_flows_index_follows_creation_expiry_deletion_and_a_clients_end() {
    let mut bed = Bed::new();
    let known = bed.flows.known();
    let t0 = monotonic_ns();
    let dns = key(proto::UDP, CLIENT, 40001, REMOTE, 53);
    let udp = key(proto::UDP, CLIENT, 40000, REMOTE, 123);
    let tcp = key(proto::TCP, CLIENT, 50000, REMOTE, 443);
    let other = key(proto::TCP, Ipv4Addr::new(10, 77, 0, 3), 50000, REMOTE, 443);
    assert!(!known.contains(&dns), "nothing known before it is made");
    for k in [dns, udp, tcp, other] {
        bed.flows.create(k, t0).unwrap();
    }
    assert!([dns, udp, tcp, other].iter().all(|k| known.contains(k)));
    assert_eq!(known.len(), bed.flows.len());

    // The sweep: the DNS flow expires (30 s), the others stay.
    let expired = bed.flows.gc(t0 + 31_000_000_000).unwrap().expired;
    assert_eq!(expired, vec![dns]);
    assert!(!known.contains(&dns), "an expired flow is no longer known");
    assert!(known.contains(&udp));
    // And in slices, as the gateway sweeps.
    let late = t0 + 121_000_000_000;
    assert_eq!(bed.flows.expire(&[udp], late).unwrap().expired, vec![udp]);
    assert!(!known.contains(&udp));
    // A packet after expiry makes the flow anew, and it is known again.
    bed.flows.create(udp, late).unwrap();
    assert!(known.contains(&udp));

    assert!(bed.flows.delete(&udp).unwrap());
    assert!(!known.contains(&udp), "a deleted flow is no longer known");
    assert_eq!(bed.flows.delete_client(CLIENT).unwrap(), 1);
    assert!(!known.contains(&tcp), "nor a departed client's");
    assert!(known.contains(&other), "another client's flow stays");
    assert_eq!(known.len(), bed.flows.len());
}

// ---- each client's share of an endpoint ----

#[test]
fn one_client_at_its_share_leaves_the_endpoint_to_the_others() {
    let ports = PortRange {
        min: 61000,
        max: 61007,
    };
    let (mut bed, dir, _fs) = Bed::pinned_with(&[PUBLIC], ports);
    bed.flows = std::mem::replace(&mut bed.flows, dummy_table()).with_port_share(3);
    let greedy = CLIENT;
    let other = Ipv4Addr::new(10, 77, 0, 3);
    for port in 1..=3 {
        bed.flows
            .create(key(proto::UDP, greedy, port, REMOTE, 53), 1)
            .unwrap();
    }

    let err = bed
        .flows
        .create(key(proto::UDP, greedy, 4, REMOTE, 53), 1)
        .unwrap_err();
    assert!(
        matches!(err, FlowError::ShareExhausted { share: 3, .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "client 10.77.0.2 holds 3 NAT ports toward 198.18.0.2:53 (udp), its share of that endpoint (--max-ports-per-endpoint)"
    );
    assert_eq!(bed.flows.len(), 3, "the refusal left nothing behind");
    assert_eq!(entries(&dir), (3, 3), "nor in the maps");

    // The other client still opens flows toward the same endpoint, and its
    // packets go out on them.
    let mut others = Vec::new();
    for port in 1..=3 {
        let nat = bed
            .flows
            .create(key(proto::UDP, other, port, REMOTE, 53), 1)
            .unwrap();
        others.push(nat);
    }
    let out = frame(
        other,
        REMOTE,
        64,
        L4::Udp {
            src: 2,
            dst: 53,
            payload: b"q",
        },
    );
    let (action, sent) = bed.tun(&out);
    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(
        u16::from_be_bytes([sent[34], sent[35]]),
        others[1],
        "sent from the other client's NAT port"
    );
    // The greedy client is held back toward that endpoint only.
    bed.flows
        .create(key(proto::UDP, greedy, 4, REMOTE, 123), 1)
        .unwrap();
    // And a flow that ends gives its port back to its share.
    assert!(bed
        .flows
        .delete(&key(proto::UDP, greedy, 1, REMOTE, 53))
        .unwrap());
    bed.flows
        .create(key(proto::UDP, greedy, 4, REMOTE, 53), 1)
        .unwrap();
}

#[test]
fn the_default_share_is_a_quarter_of_the_range() {
    let bed = Bed::with_ports(PortRange::DEFAULT);
    assert_eq!(bed.flows.port_share(), 1134);
}

// ---- several public addresses ----

#[test]
fn a_clients_flows_all_leave_from_its_public_address() {
    let public = [PUBLIC, PUBLIC2];
    let mut bed = Bed::with_public(&public, PORTS);
    let on_first = client_on(PUBLIC, &public, &[]);
    let on_second = client_on(PUBLIC2, &public, &[]);
    let flows = |c| {
        [
            key(proto::UDP, c, 40000, REMOTE, 53),
            key(proto::TCP, c, 50000, REMOTE, 443),
            key(proto::TCP, c, 50001, OTHER, 80),
            key(proto::ICMP, c, 7, OTHER, 0),
        ]
    };
    for (client, public) in [(on_first, PUBLIC), (on_second, PUBLIC2)] {
        assert_eq!(bed.flows.public_addr_of(client), public);
        for k in flows(client) {
            bed.flows.create(k, 1).unwrap();
            assert_eq!(bed.flows.nat(&k).unwrap().addr, public, "{k:?}");
        }
    }
    // What the kernel holds agrees, in both maps.
    for flow in bed.flows.list().unwrap() {
        let want = bed.flows.public_addr_of(flow.key.client());
        assert_eq!(flow.public_addr, want, "{flow}");
        assert!(flow.to_string().contains(&format!("via {want}:")), "{flow}");
    }
    // And the packets: the second client's leave from the second address.
    let out = frame(on_second, REMOTE, 64, L4::tcp(50000, 443, "S", b""));
    let (action, sent) = bed.tun(&out);
    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(&sent[26..30], &PUBLIC2.octets(), "source address");
}

#[test]
fn the_same_nat_port_toward_one_endpoint_serves_each_public_address() {
    let public = [PUBLIC, PUBLIC2];
    let one_port = PortRange {
        min: 61000,
        max: 61000,
    };
    let (mut bed, dir, _fs) = Bed::pinned_with(&public, one_port);
    let a = client_on(PUBLIC, &public, &[]);
    let b = client_on(PUBLIC2, &public, &[]);
    let (ka, kb) = (
        key(proto::UDP, a, 40000, REMOTE, 53),
        key(proto::UDP, b, 41000, REMOTE, 53),
    );
    assert_eq!(bed.flows.create(ka, 1).unwrap(), 61000);
    assert_eq!(bed.flows.create(kb, 1).unwrap(), 61000);
    assert_eq!(entries(&dir), (2, 2));
    let mut reverse: Vec<ReverseKey> = pinned_keys::<ReverseKey, ReverseFlow>(&dir.join("reverse"))
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    reverse.sort();
    assert_eq!(
        reverse,
        {
            let mut want = vec![ka.reverse(PUBLIC, 61000), kb.reverse(PUBLIC2, 61000)];
            want.sort();
            want
        },
        "one port, one endpoint, two reverse entries told apart by the public address"
    );

    // Replies to the same port on each address reach their own client.
    for (public, client, port) in [(PUBLIC, a, 40000), (PUBLIC2, b, 41000)] {
        let reply = frame(
            REMOTE,
            public,
            57,
            L4::Udp {
                src: 53,
                dst: 61000,
                payload: b"answer",
            },
        );
        let wan = bed.wan(&reply);
        assert!(wan.delivered(), "{public}: {wan:?}");
        let ip = &wan.out[ETH..];
        assert_eq!(&ip[16..20], &client.octets(), "{public}");
        assert_eq!(u16::from_be_bytes([ip[22], ip[23]]), port, "{public}");
    }

    // The one port is taken on the first address: another client there is
    // refused, naming the address.
    let a2 = client_on(PUBLIC, &public, &[a]);
    let err = bed
        .flows
        .create(key(proto::UDP, a2, 40000, REMOTE, 53), 1)
        .unwrap_err();
    assert!(
        matches!(err, FlowError::PortsExhausted { public: PUBLIC, .. }),
        "{err:?}"
    );
}

/// One forwarded UDP connection's entries, from `remote_port` through the
/// public address's port 5353 to a target, made at `made` and last used
/// then.
fn forwarded(remote_port: u16, nat_port: u16, made: u64) -> [(FwdKey, FwdFlow); 2] {
    let rule = FwdRuleKey::new(proto::UDP, 5353);
    let key = FwdKey {
        src_addr: REMOTE.octets(),
        dst_addr: PUBLIC.octets(),
        src_port: remote_port,
        dst_port: 5353,
        proto: proto::UDP,
        _pad: [0; 3],
    };
    let stats = FlowStats {
        last_seen_ns: made,
        packets: 1,
        ..Default::default()
    };
    let inbound = FwdFlow {
        stats,
        created_ns: made,
        src_addr: [10, 200, 9, 1],
        dst_addr: [10, 200, 9, 2],
        src_port: nat_port,
        dst_port: 5300,
        rule,
        dir: fwd_dir::INBOUND,
        ..Default::default()
    };
    let reply = FwdFlow {
        stats,
        created_ns: made,
        src_addr: key.dst_addr,
        dst_addr: key.src_addr,
        src_port: key.dst_port,
        dst_port: key.src_port,
        rule,
        dir: fwd_dir::REPLY,
        ..Default::default()
    };
    [(key, inbound), (inbound.partner(), reply)]
}

/// The forwarder's expiry looks at the whole table, then removes: what
/// changed in between (a packet came, the datapath gave the NAT port to a
/// new connection) is not removed with the connection it once was.
#[test]
fn forwarded_connections_expire_only_as_they_were_seen() {
    let (mut bed, dir, _fs) = Bed::pinned();
    let mut fwd = bed.dp.forwarder(Timeouts::default()).unwrap();
    let data = aya::maps::MapData::from_pin(dir.join("forward_flows")).unwrap();
    let mut table: aya::maps::HashMap<_, FwdKey, FwdFlow> =
        aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap();
    let secs = |s: u64| s * 1_000_000_000;
    let [used, taken, idle] = [40001, 40002, 40003].map(|port| forwarded(port, port + 20000, 1));
    for (k, v) in [used, taken, idle].iter().flatten() {
        table.insert(k, v, 0).unwrap();
    }
    let now = secs(1000);
    let expired = fwd.expired(now);
    assert_eq!(expired.len(), 3, "{expired:?}");

    // Meanwhile a packet came on one, and another's NAT port went to a
    // new connection (its reply entry on the same key).
    let (k, mut v) = used[0];
    v.stats.last_seen_ns = secs(999);
    table.insert(k, v, 0).unwrap();
    let newcomer = forwarded(40004, taken[0].1.src_port, secs(999))[1];
    assert_eq!(newcomer.0, taken[1].0, "the same reply key");
    table.insert(newcomer.0, newcomer.1, 0).unwrap();

    assert_eq!(fwd.remove(expired).unwrap(), 1, "only the idle one went");
    let left = |k: &FwdKey| table.get(k, 0).ok();
    assert_eq!(left(&idle[0].0), None);
    assert_eq!(left(&idle[1].0), None);
    assert_eq!(left(&used[0].0), Some(v), "used since");
    assert_eq!(left(&used[1].0), Some(used[1].1));
    assert_eq!(left(&newcomer.0), Some(newcomer.1), "the new connection's");

    // Looked at again: the connection whose port went is one entry now,
    // idle, and goes; the new one stays.
    assert_eq!(fwd.gc(now).unwrap(), 1);
    assert_eq!(left(&taken[0].0), None);
    assert_eq!(left(&newcomer.0), Some(newcomer.1));
    assert_eq!(left(&used[0].0), Some(v));
}

/// A target the forwarder reaches through the WAN answers to NAT ports on
/// the gateway's public address, as remotes do for clients' flows: a port
/// a forwarded connection holds toward it is not given to a client's flow
/// toward the same endpoint, which would take that connection's replies
/// (and could write into it).
#[test]
fn a_client_flow_never_takes_a_port_a_forwarded_connection_holds() {
    let ports = PortRange {
        min: 61000,
        max: 61001,
    };
    let (mut bed, dir, _fs) = Bed::pinned_with(&[PUBLIC], ports);
    let data = aya::maps::MapData::from_pin(dir.join("forward_flows")).unwrap();
    let mut table: aya::maps::HashMap<_, FwdKey, FwdFlow> =
        aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap();
    // A forwarded connection to REMOTE:443 on NAT port 61000.
    let reply_key = FwdKey {
        src_addr: REMOTE.octets(),
        dst_addr: PUBLIC.octets(),
        src_port: 443,
        dst_port: 61000,
        proto: proto::UDP,
        _pad: [0; 3],
    };
    let reply = FwdFlow {
        created_ns: monotonic_ns(),
        dir: fwd_dir::REPLY,
        rule: FwdRuleKey::new(proto::UDP, 5353),
        ..Default::default()
    };
    table.insert(reply_key, reply, 0).unwrap();

    for i in 1..=3 {
        let client = Ipv4Addr::new(10, 77, 1, i);
        let nat = bed
            .flows
            .create(key(proto::UDP, client, 40000, REMOTE, 443), 1);
        match i {
            1 => assert_eq!(nat.unwrap(), 61001, "the port left"),
            _ => assert!(
                matches!(nat, Err(FlowError::PortsExhausted { .. })),
                "{nat:?}"
            ),
        }
    }
    let reverse: Vec<(ReverseKey, ReverseFlow)> = pinned_keys(&dir.join("reverse"));
    assert_eq!(
        reverse.iter().map(|(k, _)| k.nat_port).collect::<Vec<_>>(),
        [61001],
        "no client entry left on the forwarded connection's port"
    );
    assert_eq!(table.get(&reply_key, 0).unwrap(), reply);
    // Toward another endpoint the port is free.
    let other = bed.flows.create(
        key(proto::UDP, Ipv4Addr::new(10, 77, 1, 2), 40000, REMOTE, 444),
        1,
    );
    assert!(other.is_ok(), "{other:?}");
}
