//! IPv4 fragments end to end: the real `veil-user` and `veil-client` in
//! network namespaces (see `veil_tests::world`). The client's tunnel MTU is
//! 1400 and the WAN's 1500, so every datagram here crosses in fragments one
//! way or both: cut by the client's kernel on the way out, by the remote's
//! on the way back, and translated fragment by fragment by the datapath.

use std::{
    net::UdpSocket,
    process::Command,
    time::{Duration, Instant},
};

use veil_tests::world::{World, LAN_HOST, PUBLIC, REMOTE};

/// Packets the gateway's datapath counted under `reason`.
fn datapath(world: &World, reason: &str) -> u64 {
    world.status()["datapath"][reason]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no datapath counter {reason}"))
}

fn counter(world: &World, name: &str) -> u64 {
    world.status()["counters"][name].as_u64().unwrap()
}

/// A payload whose every byte depends on its size and position, so that a
/// fragment put in the wrong place or datagram shows.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 7 + len) % 251) as u8).collect()
}

#[test]
fn large_udp_datagrams_echo_intact_through_the_tunnel() {
    let world = World::new(1, &[]);
    let profile = world.add_client("alice", 1);
    let _client = world.start_client(1, &profile, true);
    let (out_before, in_before) = (
        datapath(&world, "egress_forwarded"),
        datapath(&world, "ingress_forwarded"),
    );

    for len in [1400, 3000, 8000] {
        let sent = payload(len);
        let echoed = world.client(1).enter(|| {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.send_to(&sent, (REMOTE, 7)).unwrap();
            let mut buf = vec![0u8; 65536];
            let (n, from) = s
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("no echo of {len} bytes: {e}"));
            assert_eq!(from, (REMOTE, 7).into());
            buf.truncate(n);
            buf
        });
        assert_eq!(echoed.len(), len, "{len} bytes back");
        assert!(echoed == sent, "{len} bytes intact both ways");
    }

    let seen = world.servers.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.iter().all(|a| *a == PUBLIC),
        "the remote saw only the gateway: {seen:?}"
    );
    // In fragments, every one translated. Out (MTU 1400): 2 + 3 + 6;
    // back (MTU 1500): 1 + 3 + 6.
    let out = datapath(&world, "egress_forwarded") - out_before;
    let back = datapath(&world, "ingress_forwarded") - in_before;
    assert!(out >= 11, "{out} packets out");
    assert!(back >= 10, "{back} packets back");
    assert_eq!(datapath(&world, "drop_orphan_fragment"), 0);
    assert_eq!(datapath(&world, "drop_fragment"), 0);
}

#[test]
fn a_large_ping_is_answered_through_the_tunnel() {
    let world = World::new(1, &[]);
    let profile = world.add_client("alice", 1);
    let _client = world.start_client(1, &profile, true);

    let ping = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", world.client(1).name()))
        .args(["ping", "-c", "1", "-W", "3", "-s", "4000"])
        .arg(REMOTE.to_string())
        .output()
        .expect("running ping");
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    assert_eq!(datapath(&world, "drop_orphan_fragment"), 0);
}

#[test]
fn a_fragmented_datagram_to_a_refused_destination_is_refused_whole() {
    let world = World::new(1, &[]);
    let profile = world.add_client("alice", 1);
    let _client = world.start_client(1, &profile, true);
    let before = counter(&world, "policy_refused");
    let started = Instant::now();

    let refused = world.client(1).enter(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect((LAN_HOST, 7)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send(&payload(3000)).unwrap();
        // The ICMP error (administratively prohibited, about the first
        // fragment) reaches the connected socket as an error.
        s.recv(&mut [0u8; 64])
    });

    assert!(refused.is_err(), "{refused:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once: {refused:?}"
    );
    // Every fragment refused (3 at MTU 1400), the later ones without an
    // error of their own (RFC 1122 3.2.2).
    assert_eq!(counter(&world, "policy_refused") - before, 3);
}
