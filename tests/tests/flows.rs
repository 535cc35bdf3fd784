//! The flow API against the real kernel maps: port claiming, endpoint-
//! independent mapping, exhaustion, deletion and expiry, checked through the
//! pinned maps and through what the datapath then does with packets.

use std::{net::Ipv4Addr, time::Duration};

use veil_common::{proto, EgressFlow, FlowKey, Reason, ReverseFlow, ReverseKey};
use veil_tests::{
    bed::*,
    packet::{frame, L4},
};
use veil_user::{
    flows::{FlowError, PortRange},
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
    assert_eq!(reverse[0].0, k.reverse(nat));
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
        "no free NAT port toward 198.18.0.2:443 (tcp): all 4 ports of 61000-61003 are in use for that endpoint"
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
    let udp = key(proto::UDP, CLIENT, 40000, REMOTE, 53);
    let half_open = key(proto::TCP, CLIENT, 50001, REMOTE, 443);
    let established = key(proto::TCP, CLIENT, 50000, REMOTE, 443);
    for k in [icmp, udp, half_open, established] {
        bed.flows.create(k, t0).unwrap();
    }
    // A real handshake through the datapath: SYN out, SYN-ACK back.
    let nat = bed.flows.get(&established).unwrap();
    let syn = frame(
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
    let syn_ack = frame(
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
    assert_eq!(bed.tun(&syn).0, TC_ACT_REDIRECT);
    assert!(bed.wan(&syn_ack).delivered());
    let seen = monotonic_ns();

    let after = |d: Duration| seen + d.as_nanos() as u64;
    let gc = |bed: &mut Bed, d| {
        let mut expired = bed.flows.gc(after(d)).unwrap().expired;
        expired.sort();
        expired
    };
    assert_eq!(gc(&mut bed, Duration::from_secs(59)), vec![]);
    assert_eq!(gc(&mut bed, Duration::from_secs(61)), vec![icmp]);
    assert_eq!(gc(&mut bed, Duration::from_secs(121)), vec![udp]);
    assert_eq!(gc(&mut bed, Duration::from_secs(241)), vec![half_open]);
    assert_eq!(gc(&mut bed, Duration::from_secs(2 * 3600)), vec![]);
    assert_eq!(
        gc(&mut bed, Duration::from_secs(2 * 3600 + 4 * 60 + 1)),
        vec![established]
    );
    assert!(bed.flows.is_empty());
}
