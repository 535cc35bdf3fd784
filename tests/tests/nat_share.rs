//! NAT ports and public addresses end to end: the real gateway and clients
//! in network namespaces (see `veil_tests::world`). One client at its share
//! of the ports toward an endpoint leaves the others room there; with two
//! public addresses each client leaves from its own, for all its flows.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use veil_tests::{
    wait_until,
    world::{World, PUBLIC, REMOTE},
};

/// The remote's UDP echo.
const ECHO: (Ipv4Addr, u16) = (REMOTE, 7);

fn vip_of(world: &World, name: &str) -> Ipv4Addr {
    world.vip_of(name)
}

fn counter(world: &World, name: &str) -> u64 {
    world.status()["counters"][name].as_u64().unwrap_or(0)
}

/// Opens `n` UDP sockets in client `i`'s namespace, each sending one
/// datagram to the remote's echo: the sockets (kept open, so their flows
/// stay) and, for each, whether the echo came back.
fn udp_echoes(world: &World, i: usize, n: usize) -> (Vec<UdpSocket>, Vec<bool>) {
    world.client(i).enter(|| {
        let sockets: Vec<UdpSocket> = (0..n)
            .map(|_| {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(Duration::from_millis(1500)))
                    .unwrap();
                s
            })
            .collect();
        let answered = sockets
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let msg = format!("client {i} socket {k}");
                s.send_to(msg.as_bytes(), ECHO).unwrap();
                let mut buf = [0u8; 64];
                matches!(s.recv_from(&mut buf), Ok((len, _)) if &buf[..len] == msg.as_bytes())
            })
            .collect();
        (sockets, answered)
    })
}

/// The UDP peers the remote's echo has seen since `from` (an index into
/// its log).
fn udp_peers_since(world: &World, from: usize) -> Vec<SocketAddr> {
    world.servers.peers.lock().unwrap()[from..]
        .iter()
        .filter(|a| a.port() >= 61000)
        .copied()
        .collect()
}

#[test]
fn a_client_at_its_share_of_an_endpoint_leaves_room_for_another() {
    // 8 NAT ports, 4 per client toward one endpoint: without the share the
    // first client would take all 8.
    let world = World::new(
        2,
        &[
            "--nat-ports",
            "61000-61007",
            "--max-ports-per-endpoint",
            "4",
        ],
    );
    let greedy = world.add_client("greedy", 1);
    let modest = world.add_client("modest", 2);
    let _g = world.start_client(1, &greedy, true);
    let _m = world.start_client(2, &modest, true);

    let seen = world.servers.peers.lock().unwrap().len();
    let (_held, answered) = udp_echoes(&world, 1, 4);
    assert_eq!(answered, vec![true; 4], "its share: four flows");
    let (_refused, answered) = udp_echoes(&world, 1, 2);
    assert_eq!(answered, vec![false; 2], "a fifth and sixth are refused");
    wait_until("the refusals to be counted", Duration::from_secs(5), || {
        counter(&world, "port_share_exceeded") >= 2
    });
    assert_eq!(counter(&world, "flow_errors"), 0, "counted apart");

    // The second client still gets ports toward the same endpoint.
    let (_theirs, answered) = udp_echoes(&world, 2, 4);
    assert_eq!(answered, vec![true; 4], "the other client's four flows");

    // Eight flows, eight NAT ports, all on the one public address.
    let peers = udp_peers_since(&world, seen);
    assert_eq!(peers.len(), 8, "{peers:?}");
    let mut ports: Vec<u16> = peers.iter().map(|p| p.port()).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports, (61000..=61007).collect::<Vec<_>>());
    assert!(peers.iter().all(|p| p.ip() == PUBLIC), "{peers:?}");

    // The greedy client is held back toward that endpoint only: the web
    // server (another endpoint) still answers it.
    let body = world.fetch(1).expect("fetching through the tunnel");
    assert!(body.contains(&PUBLIC.to_string()), "{body}");
}

#[test]
fn each_client_leaves_from_its_own_public_address_for_all_its_flows() {
    let mut world = World::bare(2);
    // Clients get 10.77.0.2 and 10.77.0.3 in the order they connect. A
    // second address (198.18.0.3 if it splits them) on the WAN, so that
    // each lands on another one.
    let (vip1, vip2) = (Ipv4Addr::new(10, 77, 0, 2), Ipv4Addr::new(10, 77, 0, 3));
    let second = (3..=50)
        .map(|i| Ipv4Addr::new(198, 18, 0, i))
        .find(|p| {
            let set = [PUBLIC, *p];
            veil_user::nat::public_addr_for(vip1, &set)
                != veil_user::nat::public_addr_for(vip2, &set)
        })
        .expect("an address that splits the two clients");
    let public = [PUBLIC, second];
    world
        .gw
        .ip(&["addr", "add", &format!("{second}/24"), "dev", "wan0"]);
    world.start_gateway(&[
        "--public-addr",
        &PUBLIC.to_string(),
        "--public-addr",
        &second.to_string(),
    ]);
    let first = world.add_client("first", 1);
    let later = world.add_client("later", 2);
    let _c1 = world.start_client(1, &first, true);
    assert_eq!(vip_of(&world, "first"), vip1);
    let _c2 = world.start_client(2, &later, true);
    assert_eq!(vip_of(&world, "later"), vip2);

    let mut used = Vec::new();
    for (i, vip) in [(1, vip1), (2, vip2)] {
        let want = veil_user::nat::public_addr_for(vip, &public).unwrap();
        used.push(want);
        // UDP from several sockets, TCP and ICMP: all from one address.
        let seen = world.servers.peers.lock().unwrap().len();
        let (_sockets, answered) = udp_echoes(&world, i, 3);
        assert_eq!(answered, vec![true; 3], "client {i}");
        let peers = udp_peers_since(&world, seen);
        assert_eq!(peers.len(), 3, "client {i}: {peers:?}");
        assert!(
            peers.iter().all(|p| p.ip() == want),
            "client {i} ({vip}) must leave from {want}: {peers:?}"
        );
        let body = world.fetch(i).expect("fetching through the tunnel");
        assert!(
            body.contains(&format!("Hello {want}:")),
            "client {i}: {body}"
        );
        assert!(world.ping(i, "198.18.0.2"), "client {i}: ping");
    }
    assert_ne!(used[0], used[1], "one client on each address");

    // Unsolicited traffic to the second address's NAT range gets no answer
    // (dropped in XDP), while its other ports are the host's as usual.
    world.remote.enter(|| {
        let started = Instant::now();
        let nat = TcpStream::connect_timeout(&(second, 61500).into(), Duration::from_secs(2));
        assert!(nat.is_err());
        assert!(
            started.elapsed() >= Duration::from_millis(1900),
            "no RST from the NAT range: {nat:?}"
        );
        let host = TcpStream::connect_timeout(&(second, 22).into(), Duration::from_secs(2));
        let refused = host
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
        assert!(refused, "the host answers outside the range: {host:?}");
    });
}

#[test]
fn a_bad_list_of_public_addresses_is_refused_at_start() {
    let world = World::bare(0);
    let (status, text) = world.failed_start(&[
        "--iface",
        "wan0",
        "--public-addr",
        "198.18.0.1",
        "--public-addr",
        "198.18.0.1",
    ]);
    assert!(!status.success());
    assert!(
        text.contains("public address 198.18.0.1 is given twice"),
        "{text}"
    );

    // From the configuration file: a list, checked the same way.
    let config = world.dir.join("veil.toml");
    std::fs::write(
        &config,
        "iface = \"wan0\"\npublic-addr = [\"198.18.0.1\", \"0.0.0.0\"]\n",
    )
    .unwrap();
    let (status, text) = world.failed_start(&["--config", config.to_str().unwrap()]);
    assert!(!status.success());
    assert!(
        text.contains("0.0.0.0 cannot be a public address"),
        "{text}"
    );
}
