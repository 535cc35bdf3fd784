//! IPv6 inside and outside the tunnel, end to end: the real `veil-user`
//! and `veil-client`s in namespaces numbered with IPv6 from 2001:2::/48
//! (see `veil_tests::world`'s `add_ipv6`), checked as a user would: the
//! bytes arrive, the remote sees only the gateway's IPv6 address, nothing
//! answers what nobody asked for, and the client leaves its IPv6 as it
//! found it.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use etherparse::PacketBuilder;
use veil_tests::{
    netns::NetNs,
    raw::{Capture, RawClient},
    wait_until,
    world::{
        client6, download_data, gateway6_for, ip_out, sha256, World, PUBLIC, PUBLIC6, REMOTE6,
    },
};

const ETH_P_IPV6: u16 = libc::ETH_P_IPV6 as u16;
/// ICMPv6 Packet Too Big.
const PACKET_TOO_BIG: u8 = 2;

/// A world with IPv6 on every link and a gateway on its default listener
/// (`[::]:443`, both families), started with `extra` flags.
fn dual_stack(clients: usize, extra: &[&str]) -> World {
    let mut world = World::bare(clients);
    world.add_ipv6();
    world.start_gateway(extra);
    world
}

/// The IPv6 address `status` shows for client `name`.
fn vip6_of(world: &World, name: &str) -> Option<Ipv6Addr> {
    let status = world.status();
    let c = status["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in status: {status}"))
        .clone();
    c["vip6"].as_str().map(|a| a.parse().unwrap())
}

/// Waits until client `i` carries IPv6 through the tunnel: the address on
/// its TUN device, then the last route added (`8000::/1`).
fn wait_for_ipv6(world: &World, i: usize) {
    wait_until("IPv6 through veil0", Duration::from_secs(10), || {
        let c = world.client(i);
        ip_out(c, &["-6", "addr", "show", "dev", "veil0"]).contains("scope global")
            && ip_out(c, &["-6", "route", "show", "table", "7670"]).contains("8000::/1")
    });
}

/// The remote's web page over IPv6 from client `i`: the address it saw.
fn seen_by_remote6(world: &World, i: usize) -> String {
    use std::io::{Read, Write};
    world.client(i).enter(|| {
        let to = SocketAddr::from((REMOTE6, 80));
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: [2001:2::2]\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        response.split_once("\r\n\r\n").unwrap().1.to_owned()
    })
}

#[test]
fn ping_download_and_udp_echo_over_ipv6_and_the_remote_sees_only_the_gateway() {
    let world = dual_stack(1, &["--metrics", "9477"]);
    let profile = world.add_client("six", 1);
    let mut client = world.start_client(1, &profile, true);
    wait_for_ipv6(&world, 1);
    let vip6 = vip6_of(&world, "six").expect("an IPv6 lease in status");
    assert_eq!(vip6, "fd00:7665:696c::a4d:2".parse::<Ipv6Addr>().unwrap());
    let addrs = ip_out(world.client(1), &["-6", "addr", "show", "dev", "veil0"]);
    assert!(addrs.contains(&format!("{vip6}/128")), "{addrs}");
    let text = world.veil_user(&["status"]);
    assert!(text.contains(&format!("IPv6 {vip6}")), "{text}");
    let metrics = world.metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l == "veil_connected_clients_ipv6 1"),
        "{metrics}"
    );
    assert!(!metrics.contains("fd00:7665"), "no address in metrics");

    assert!(
        world.ping6(1, &REMOTE6.to_string()),
        "ping6 through the tunnel"
    );
    assert_eq!(
        world.download6(1).expect("download over IPv6"),
        sha256(&download_data()),
        "8 MiB over IPv6 intact"
    );
    let msg = b"an IPv6 datagram through veil";
    assert_eq!(world.udp_echo6(1, msg).expect("UDP echo"), msg);
    assert_eq!(
        seen_by_remote6(&world, 1),
        format!("Hello {PUBLIC6}: that is the address this web server sees.\n")
    );
    let seen = world.servers6.as_ref().unwrap().seen_ips();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|ip| *ip == IpAddr::V6(PUBLIC6)),
        "the remote saw only the gateway's IPv6 address: {seen:?}"
    );
    // IPv4 beside it, unchanged.
    assert_eq!(
        world.fetch(1).expect("GET / over IPv4"),
        format!("Hello {PUBLIC}: that is the address this web server sees.\n")
    );
    assert!(client.stop().unwrap().success(), "{}", client.log());
}

/// Packets the gateway's datapath counted under `reason`.
fn datapath(world: &World, reason: &str) -> u64 {
    world.status()["datapath"][reason]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no datapath counter {reason}"))
}

#[test]
fn udp_datagrams_larger_than_the_tunnel_echo_intact_over_ipv6_in_fragments() {
    let world = dual_stack(1, &[]);
    let profile = world.add_client("big", 1);
    let mut client = world.start_client(1, &profile, true);
    wait_for_ipv6(&world, 1);
    let (out_before, in_before) = (
        datapath(&world, "egress_forwarded"),
        datapath(&world, "ingress_forwarded"),
    );

    // The tunnel's MTU is 1400 and the WAN's 1500: the client's kernel
    // cuts these on the way out, the remote's on the way back, and the
    // datapath translates them fragment by fragment.
    for len in [3000, 8000] {
        let sent: Vec<u8> = (0..len).map(|i| ((i * 7 + len) % 251) as u8).collect();
        let echoed = world.client(1).enter(|| {
            let s = UdpSocket::bind("[::]:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.send_to(&sent, (REMOTE6, 7)).unwrap();
            let mut buf = vec![0u8; 65536];
            let (n, from) = s.recv_from(&mut buf).ok()?;
            assert_eq!(from, SocketAddr::from((REMOTE6, 7)));
            buf.truncate(n);
            Some(buf)
        });
        let echoed = echoed
            .unwrap_or_else(|| panic!("no echo of {len} bytes; gateway: {:#}", world.status()));
        assert_eq!(echoed.len(), len, "{len} bytes back");
        assert!(echoed == sent, "{len} bytes intact both ways");
    }

    let seen = world.servers6.as_ref().unwrap().seen_ips();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen.iter().all(|ip| *ip == IpAddr::V6(PUBLIC6)),
        "the remote saw only the gateway's IPv6 address: {seen:?}"
    );
    // In fragments both ways, every one translated: at least 3 + 6 each
    // way.
    let out = datapath(&world, "egress_forwarded") - out_before;
    let back = datapath(&world, "ingress_forwarded") - in_before;
    assert!(out >= 9, "{out} packets out");
    assert!(back >= 9, "{back} packets back");
    assert_eq!(datapath(&world, "drop_orphan_fragment"), 0);
    assert_eq!(datapath(&world, "drop_ipv6_fragment"), 0);
    assert!(client.stop().unwrap().success(), "{}", client.log());
}

#[test]
fn ipv6_tcp_crosses_the_tunnel_as_super_packets_and_arrives_intact() {
    let world = dual_stack(1, &[]);
    let profile = world.add_client("six", 1);
    // Offload datagrams are the TCP transport's; without them (and over
    // HTTP/3, where a datagram carries one packet) the client cuts what
    // its TUN device reads into packets first.
    for extra in [
        &["--transport", "tcp"][..],
        &["--transport", "tcp", "--no-offload"][..],
        &["--transport", "h3"][..],
    ] {
        let offload = !extra.contains(&"--no-offload") && !extra.contains(&"h3");
        let mut client = world.start_client_with(1, &profile, true, extra);
        wait_for_ipv6(&world, 1);
        // What `ethtool -k veil0` shows a user: the kernel may hand the
        // client whole IPv6 TCP segments.
        let features = world.client(1).exec("ethtool", &["-k", "veil0"]);
        let features = String::from_utf8_lossy(&features.stdout);
        assert!(features.contains("tx-tcp6-segmentation: on"), "{features}");
        let (packets, bytes) = world.egress_forwarded();
        let upload = download_data();
        let echoed = world.echo_bulk(1, (REMOTE6, 7).into(), &upload);
        assert_eq!(echoed.len(), upload.len(), "offload {offload}");
        assert_eq!(
            sha256(&echoed),
            sha256(&upload),
            "8 MiB up and back over IPv6 intact (offload {offload})"
        );
        assert_eq!(
            world.download6(1).expect("download over IPv6"),
            sha256(&download_data()),
            "8 MiB down over IPv6 intact (offload {offload})"
        );
        // Whole IPv6 TCP super-packets reached the datapath either way:
        // the client's own with offload, the gateway's merge without.
        world.assert_super_packets_since((packets, bytes), true);
        assert!(client.stop().unwrap().success(), "{}", client.log());
        wait_until("the session to end", Duration::from_secs(10), || {
            world.status()["clients"].as_array().unwrap().is_empty()
        });
    }
}

#[test]
fn an_unsolicited_ipv6_syn_to_the_gateway_gets_no_answer() {
    let world = dual_stack(1, &[]);
    let profile = world.add_client("quiet", 1);
    let _client = world.start_client(1, &profile, true);
    wait_for_ipv6(&world, 1);
    // A flow exists, so the NAT range is in use.
    assert_eq!(world.udp_echo6(1, b"x").expect("UDP echo"), b"x");
    for port in [61000, 63000, 65535] {
        let to = SocketAddr::from((PUBLIC6, port));
        let got = world
            .remote
            .enter(|| TcpStream::connect_timeout(&to, Duration::from_secs(1)));
        let e = got.expect_err("nothing listens there");
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::TimedOut,
            "no answer at all, not even a reset, to port {port}: {e}"
        );
    }
}

/// An ICMPv6 message sent from `ns` to `dst` on a raw socket (the kernel
/// adds the IPv6 header and the checksum).
fn send_icmpv6(ns: &NetNs, dst: Ipv6Addr, message: &[u8]) {
    ns.enter(|| {
        // SAFETY: plain socket creation.
        let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_in6 is valid; the fields set are plain.
        let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        addr.sin6_family = libc::AF_INET6 as u16;
        addr.sin6_addr.s6_addr = dst.octets();
        // SAFETY: a valid socket, buffer and address of the right size.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
                (&addr as *const libc::sockaddr_in6).cast(),
                size_of::<libc::sockaddr_in6>() as u32,
            )
        };
        assert_eq!(
            n as usize,
            message.len(),
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    });
}

/// ICMPv6 Packet Too Big (MTU `mtu`) quoting `invoking`.
fn packet_too_big(mtu: u32, invoking: &[u8]) -> Vec<u8> {
    let mut m = vec![PACKET_TOO_BIG, 0, 0, 0];
    m.extend_from_slice(&mtu.to_be_bytes());
    m.extend_from_slice(invoking);
    m
}

/// The ICMPv6 Packet Too Big messages among captured IPv6 packets: each
/// one's MTU.
fn too_bigs(packets: &[Vec<u8>]) -> Vec<u32> {
    packets
        .iter()
        .filter(|p| p.len() >= 48 && p[0] >> 4 == 6 && p[6] == 58 && p[40] == PACKET_TOO_BIG)
        .map(|p| u32::from_be_bytes([p[44], p[45], p[46], p[47]]))
        .collect()
}

#[test]
fn a_packet_too_big_reaches_the_client_whose_flow_caused_it_and_only_it() {
    let world = dual_stack(2, &[]);
    let mut clients = Vec::new();
    for (i, name) in [(1, "big"), (2, "bystander")] {
        let profile = world.add_client(name, i);
        clients.push(world.start_client(i, &profile, true));
        wait_for_ipv6(&world, i);
    }
    // Each client's UDP flow to the remote's echo, from known ports.
    let payload = [0x5a; 1200];
    let mut nat_ports = Vec::new();
    for i in [1, 2] {
        let socket = world
            .client(i)
            .enter(|| UdpSocket::bind("[::]:40000").expect("bind"));
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        socket.send_to(&payload, (REMOTE6, 7)).unwrap();
        let mut buf = [0u8; 2048];
        socket.recv_from(&mut buf).expect("the echo");
        let seen = world
            .servers6
            .as_ref()
            .unwrap()
            .peers
            .lock()
            .unwrap()
            .clone();
        let SocketAddr::V6(from) = *seen.last().unwrap() else {
            panic!("an IPv4 peer")
        };
        assert_eq!(*from.ip(), PUBLIC6);
        nat_ports.push(from.port());
    }
    assert_ne!(nat_ports[0], nat_ports[1]);

    let captures: Vec<Capture> = [1, 2]
        .iter()
        .map(|&i| Capture::of(world.client(i), "veil0", ETH_P_IPV6))
        .collect();
    // The remote (as a router on the path would) says client 1's
    // datagram, as it arrived translated, was too big for the next link.
    let mut invoking = Vec::new();
    PacketBuilder::ipv6(PUBLIC6.octets(), REMOTE6.octets(), 64)
        .udp(nat_ports[0], 7)
        .write(&mut invoking, &payload)
        .unwrap();
    invoking.truncate(1232 - 8);
    send_icmpv6(&world.remote, PUBLIC6, &packet_too_big(1280, &invoking));

    let to_first = too_bigs(&captures[0].packets(Duration::from_secs(2)));
    assert_eq!(to_first, [1280], "client 1 learns the path MTU");
    let to_second = too_bigs(&captures[1].packets(Duration::from_millis(200)));
    assert!(
        to_second.is_empty(),
        "client 2 hears nothing: {to_second:?}"
    );
    drop(clients);
}

#[test]
fn a_forged_ipv6_source_is_dropped() {
    let world = dual_stack(1, &[]);
    let profile = world.add_client("forger", 1);
    let mut raw = RawClient::connect(world.client(1), &profile, false);
    let vip6 = raw.vip6().expect("an IPv6 address");
    let udp = |src: Ipv6Addr, msg: &[u8]| {
        let mut p = Vec::new();
        PacketBuilder::ipv6(src.octets(), REMOTE6.octets(), 64)
            .udp(40001, 7)
            .write(&mut p, msg)
            .unwrap();
        p
    };
    let forged: Ipv6Addr = "fd00:7665:696c::a4d:99".parse().unwrap();
    for src in [forged, "2001:db8::66".parse().unwrap(), client6(1)] {
        raw.send(&udp(src, b"forged"));
    }
    raw.send(&udp(vip6, b"genuine"));
    raw.pump(Duration::from_secs(1));
    let seen = world.servers6.as_ref().unwrap().seen_ips();
    assert_eq!(
        seen,
        [IpAddr::V6(PUBLIC6)],
        "only the genuine datagram reached the remote"
    );
    let echoed: Vec<&Vec<u8>> = raw
        .received
        .iter()
        .filter(|p| p[0] >> 4 == 6 && p.ends_with(b"genuine"))
        .collect();
    assert_eq!(echoed.len(), 1, "its echo came back");
    let counters = &world.status()["counters"];
    assert_eq!(counters["ipv6_forged_source"], 3, "{counters}");
}

#[test]
fn a_client_reaches_the_gateway_over_an_ipv6_only_uplink() {
    let world = dual_stack(1, &[]);
    world.ipv6_only_uplink(1);
    let endpoint = format!("[{}]:443", gateway6_for(1));
    let profile = world.add_client_at("v6only", &endpoint, &[]);
    for transport in ["tcp", "h3"] {
        let mut client = world.start_client_with(1, &profile, true, &["--transport", transport]);
        // Inner IPv4 through a tunnel that runs over IPv6.
        assert_eq!(
            world.download(1).expect("download over IPv4"),
            sha256(&download_data()),
            "8 MiB intact over {transport}"
        );
        assert_eq!(
            world.fetch(1).expect("GET /"),
            format!("Hello {PUBLIC}: that is the address this web server sees.\n")
        );
        let log = client.log();
        assert!(log.contains(&format!("transport up: {transport}")), "{log}");
        assert!(client.stop().unwrap().success(), "{}", client.log());
    }
}

#[test]
fn the_clients_ipv6_is_restored_on_exit() {
    let world = dual_stack(1, &[]);
    let c = world.client(1);
    let gw6 = gateway6_for(1).to_string();
    let rules6 = || ip_out(c, &["-6", "rule"]);
    let routes6 = || ip_out(c, &["-6", "route", "show", "table", "all"]);
    wait_until("IPv6 DAD on the uplink", Duration::from_secs(5), || {
        ip_out(c, &["-6", "addr", "show", "tentative"])
            .trim()
            .is_empty()
    });
    assert!(world.ping6(1, &gw6), "IPv6 on the uplink before");
    let (rules_before, routes_before) = (rules6(), routes6());

    let profile = world.add_client("tidy6", 1);
    let mut client = world.start_client(1, &profile, true);
    wait_for_ipv6(&world, 1);
    let during = routes6();
    for route in ["::/1 dev veil0 table 7670", "8000::/1 dev veil0 table 7670"] {
        assert!(during.contains(route), "{route} in\n{during}");
    }
    assert!(
        rules6().contains("7673:\tfrom all lookup 7670"),
        "{}",
        rules6()
    );
    assert!(
        !world.ping6(1, &gw6),
        "the uplink's IPv6 router is not reached outside the tunnel"
    );

    assert!(client.stop().unwrap().success(), "{}", client.log());
    assert_eq!(rules6(), rules_before);
    assert_eq!(routes6(), routes_before);
    assert!(world.ping6(1, &gw6), "IPv6 on the uplink works again");
}

#[test]
fn without_pool6_the_client_keeps_ipv6_blocked() {
    let world = dual_stack(1, &["--pool6", "none"]);
    ipv6_stays_blocked(&world);
}

#[test]
fn a_gateway_without_a_public_ipv6_address_assigns_none() {
    // No IPv6 on the WAN side: nothing to translate IPv6 to.
    let world = World::new(1, &[]);
    ipv6_stays_blocked(&world);
}

/// Client 1 connects, gets no IPv6 address, and reaches nothing over IPv6.
fn ipv6_stays_blocked(world: &World) {
    let profile = world.add_client("four", 1);
    let mut client = world.start_client(1, &profile, true);
    assert_eq!(vip6_of(world, "four"), None);
    let addrs = ip_out(world.client(1), &["-6", "addr", "show", "dev", "veil0"]);
    assert!(!addrs.contains("inet6"), "{addrs}");
    assert!(!world.ping6(1, &REMOTE6.to_string()), "no IPv6 anywhere");
    assert!(world.ping(1, "198.18.0.2"), "IPv4 through the tunnel");
    assert!(client.stop().unwrap().success(), "{}", client.log());
}

#[test]
fn happy_eyeballs_passes_over_a_silent_ipv6_address_of_the_gateways_name() {
    let world = dual_stack(1, &[]);
    let c = world.client(1);
    // The name has an IPv6 address that swallows everything (a blackhole
    // route in the gateway's namespace: no answer, not even an error) and
    // the gateway's IPv4 address.
    world
        .gw
        .ip(&["-6", "route", "add", "blackhole", "2001:2:dead::/48"]);
    c.set_resolv_conf("nameserver 127.0.0.1\n");
    let hosts = std::path::Path::new("/etc/netns")
        .join(c.name())
        .join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n2001:2:dead::1 gateway.test\n10.200.1.1 gateway.test\n",
    )
    .unwrap();
    let profile = world.add_client_at("eyeballs", "gateway.test:443", &[]);
    for transport in ["tcp", "h3"] {
        let started = std::time::Instant::now();
        let mut client =
            world.start_client_dns(1, &profile, &["--no-dns", "--transport", transport]);
        // Waiting for the IPv6 attempt's connect timeout (2 s) first would
        // take longer than this.
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(1900),
            "connected after {took:?} over {transport}"
        );
        let log = client.log();
        assert!(
            log.contains("10.200.1.1:443") && !log.contains("tunnel down"),
            "{log}"
        );
        assert_eq!(
            world.fetch(1).expect("GET /"),
            format!("Hello {PUBLIC}: that is the address this web server sees.\n")
        );
        assert!(client.stop().unwrap().success(), "{}", client.log());
    }
}
