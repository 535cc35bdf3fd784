//! The HTTP/3 transport end to end: the real gateway serving QUIC beside
//! TCP, real clients choosing it (or falling back to TCP), as a user
//! would check it.

use std::{net::UdpSocket, time::Duration};

use veil_tests::{
    proc::Proc,
    world::{download_data, sha256, World, PUBLIC, REMOTE},
};

fn transport_of(client: &Proc) -> &'static str {
    let log = client.log();
    if log.contains("transport up: h3") {
        "h3"
    } else if log.contains("transport up: tcp") {
        "tcp"
    } else {
        panic!("no transport in the log: {log}")
    }
}

#[test]
fn a_download_over_http3_arrives_intact_and_the_remote_sees_only_the_gateway() {
    let world = World::new(1, &[]);
    let profile = world.add_client("alice", 1);
    let client = world.start_client_with(1, &profile, true, &["--transport", "h3"]);
    assert_eq!(transport_of(&client), "h3");

    assert!(world.ping(1, "198.18.0.2"), "ping through the tunnel");
    assert_eq!(
        world.download(1).expect("download"),
        sha256(&download_data()),
        "8 MiB arrive intact"
    );
    let echoed = world.client(1).enter(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send_to(b"veil udp echo", (REMOTE, 7)).unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = s.recv_from(&mut buf).expect("UDP echo reply");
        buf[..n].to_vec()
    });
    assert_eq!(echoed, b"veil udp echo");
    let seen = world.servers.seen();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|a| *a == PUBLIC),
        "the remote saw only the gateway: {seen:?}"
    );
    assert!(!client.log().contains("reconnecting"), "{}", client.log());
}
