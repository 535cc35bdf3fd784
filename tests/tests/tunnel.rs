//! veil end to end: the real `veil-user` gateway and `veil-client`s in
//! network namespaces (see `veil_tests::world`), as a user would check it.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    time::{Duration, Instant},
};

use veil_tests::{
    proc::Proc,
    wait_until,
    world::{download_data, ip_out, sha256, World, LAN_HOST, PUBLIC, REMOTE},
};

fn vip_of(world: &World, name: &str) -> Ipv4Addr {
    world.vip_of(name)
}

fn flows(world: &World) -> u64 {
    world.status()["flows"]["total"].as_u64().unwrap()
}

/// Sends `data` to the remote's TCP echo server from client `i` and
/// returns what came back.
fn echo_through(world: &World, i: usize, data: &[u8]) -> Vec<u8> {
    world.echo_bulk(i, (REMOTE, 7).into(), data)
}

#[test]
fn bulk_data_arrives_intact_with_offload_and_without() {
    let world = World::new(1, &[]);
    let profile = world.add_client("alice", 1);
    let upload = download_data();
    // Offload datagrams are the TCP transport's (over HTTP/3 a datagram
    // carries one packet).
    for extra in [
        &["--transport", "tcp"][..],
        &["--transport", "tcp", "--no-offload"][..],
    ] {
        let offload = !extra.contains(&"--no-offload");
        let mut client = world.start_client_with(1, &profile, true, extra);
        let (packets, bytes) = world.egress_forwarded();
        assert_eq!(
            world.download(1).expect("download"),
            sha256(&download_data()),
            "8 MiB down intact (offload {offload})"
        );
        let echoed = echo_through(&world, 1, &upload);
        assert_eq!(echoed.len(), upload.len(), "offload {offload}");
        assert!(
            echoed == upload,
            "8 MiB up and back intact (offload {offload})"
        );
        // Whole TCP super-packets reach the datapath either way: with
        // offload the client's own cross the tunnel whole; without, its
        // MTU-sized segments are merged by the gateway before the TUN
        // device (as over HTTP/3).
        world.assert_super_packets_since((packets, bytes), true);
        client.stop();
        wait_until("the session to end", Duration::from_secs(10), || {
            world.status()["clients"].as_array().unwrap().is_empty()
        });
    }
}

/// Packets `dev` in namespace `ns` has sent: for the gateway's TUN device,
/// those its daemon read.
fn tx_packets(ns: &veil_tests::netns::NetNs, dev: &str) -> u64 {
    let out = ns.ip(&["-s", "-j", "link", "show", "dev", dev]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["stats64"]["tx"]["packets"].as_u64().unwrap()
}

/// A WAN without GRO, and a remote that sends each segment on its own (no
/// TSO, as through a NIC without GRO): by default the gateway puts its GRO
/// stage in front of the TUN device, so that the download arrives intact
/// while the daemon reads a fraction of the packets the remote sent; a ping
/// still answers (it bypasses the stage), and the stage goes with the
/// gateway (one a killed gateway left is replaced at the next start). With
/// `--gro-stage off` the daemon reads every segment.
#[test]
fn without_gro_on_the_wan_the_kernel_merges_replies_before_the_daemon_reads_them() {
    for (extra, staged) in [(&[][..], true), (&["--gro-stage", "off"][..], false)] {
        let mut world = World::bare(1);
        world.gw.exec("ethtool", &["-K", "wan0", "gro", "off"]);
        world
            .remote
            .exec("ethtool", &["-K", "eth0", "tso", "off", "gso", "off"]);
        world.start_gateway(extra);
        let links = ip_out(&world.gw, &["-br", "link"]);
        assert_eq!(links.contains("veilgw-gi"), staged, "{links}");
        let profile = world.add_client("alice", 1);
        let _client = world.start_client(1, &profile, true);
        assert!(world.ping(1, "198.18.0.2"));

        let (sent, read) = (
            tx_packets(&world.remote, "eth0"),
            tx_packets(&world.gw, "veilgw"),
        );
        assert_eq!(
            world.download(1).expect("download"),
            sha256(&download_data()),
            "8 MiB down intact (stage {staged})"
        );
        let sent = tx_packets(&world.remote, "eth0") - sent;
        let read = tx_packets(&world.gw, "veilgw") - read;
        assert!(sent > 5000, "the remote sent {sent} segments");
        if staged {
            assert!(read * 4 < sent, "{read} reads for {sent} segments, merged");
        } else {
            assert!(read * 10 > sent * 9, "{read} reads for {sent} segments");
        }
        assert_eq!(world.status()["counters"]["gro_stage_full"], 0);

        if staged {
            // A killed gateway leaves its stage; the next one replaces it.
            world.gateway().kill();
            world.start_gateway(extra);
            assert!(ip_out(&world.gw, &["-br", "link"]).contains("veilgw-gi"));
            let log = world.gateway().log();
            assert!(
                log.contains("removed the GRO stage a previous run left"),
                "{log}"
            );
            assert_eq!(world.status()["gro_stage"], "in");

            // Deleted under the gateway, the stage would swallow every
            // reply: the gateway notices, and replies bypass it.
            world.gw.ip(&["link", "del", "veilgw-gi"]);
            wait_until("the stage noticed lost", Duration::from_secs(5), || {
                world.status()["gro_stage"] == "lost"
            });
            // The client is back from the kill before the bytes are counted.
            wait_until("the client back", Duration::from_secs(20), || {
                world.ping(1, "198.18.0.2")
            });
            assert_eq!(
                world.download(1).expect("download without the stage"),
                sha256(&download_data()),
                "8 MiB down intact around the lost stage"
            );
            let log = world.gateway().log();
            assert!(log.contains("GRO stage lost (veilgw-gi is gone)"), "{log}");
        }
        world.gateway().stop();
        let links = ip_out(&world.gw, &["-br", "link"]);
        assert!(!links.contains("veilgw-g"), "the stage is gone: {links}");
    }
}

/// A link named as the GRO stage that is not a veth is someone else's: the
/// gateway leaves it alone, runs without a stage when none was asked for,
/// and refuses to start, saying why, when `--gro-stage on` was.
#[test]
fn a_link_that_only_shares_the_stages_name_is_left_alone() {
    let mut world = World::bare(1);
    world.gw.exec("ethtool", &["-K", "wan0", "gro", "off"]);
    // A persistent TUN device: there is no dummy driver on this kernel.
    world.gw.ip(&["tuntap", "add", "veilgw-gi", "mode", "tun"]);

    world.start_gateway(&[]);
    let log = world.gateway().log();
    assert!(log.contains("is not a veth (its driver: tun)"), "{log}");
    assert!(world.status().get("gro_stage").is_none());
    let profile = world.add_client("alice", 1);
    let _client = world.start_client(1, &profile, true);
    assert!(world.ping(1, "198.18.0.2"), "served without a stage");
    world.gateway().stop();

    let (code, out) = world.failed_start(&["--iface", "wan0", "--gro-stage", "on"]);
    assert!(!code.success());
    assert!(out.contains("--gro-stage on"), "{out}");
    assert!(out.contains("veilgw-gi exists and is not a veth"), "{out}");
    let links = ip_out(&world.gw, &["-d", "link", "show", "veilgw-gi"]);
    assert!(links.contains("tun type tun"), "still there: {links}");
}

/// `--tun-queues`: the gateway's TUN device has that many queues, each
/// with its reader, and clients on different queues (leases .2 and .3 take
/// queues 2 and 0 of 3) get their bytes intact both ways.
#[test]
fn a_multi_queue_tun_device_carries_every_clients_bytes_both_ways() {
    let world = World::new(2, &["--tun-queues", "3"]);
    let link = ip_out(&world.gw, &["-d", "link", "show", "veilgw"]);
    assert!(link.contains("multi_queue"), "{link}");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", world.gw.name(), "ls"])
        .arg("/sys/class/net/veilgw/queues")
        .output()
        .unwrap();
    let queues = String::from_utf8_lossy(&out.stdout);
    let tx: Vec<&str> = queues
        .split_whitespace()
        .filter(|q| q.starts_with("tx-"))
        .collect();
    assert_eq!(tx, ["tx-0", "tx-1", "tx-2"], "one transmit queue per fd");

    let upload = download_data();
    let _clients: Vec<Proc> = (1..=2)
        .map(|i| {
            let profile = world.add_client(&format!("q{i}"), i);
            world.start_client(i, &profile, true)
        })
        .collect();
    std::thread::scope(|s| {
        for i in 1..=2 {
            let (world, upload) = (&world, &upload);
            s.spawn(move || {
                assert_eq!(
                    world.download(i).expect("download"),
                    sha256(upload),
                    "client {i}: 8 MiB down intact"
                );
                assert!(
                    echo_through(world, i, upload) == *upload,
                    "client {i}: 8 MiB up and back intact"
                );
            });
        }
    });
    let counters = &world.status()["counters"];
    for c in ["tun_write_failed", "tun_queue_full", "no_session"] {
        assert_eq!(counters[c], 0, "{c}");
    }
    // The gateway loaded the steering program, which it does only to give
    // it to a device of several queues (and stops if that fails): one
    // socket filter among its descriptors.
    let pid = world.gateway.as_ref().expect("the gateway").pid();
    let socket_filters = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .filter(|info| info.lines().any(|l| l == "prog_type:\t1"))
        .count();
    assert_eq!(socket_filters, 1, "the steering program");
}

#[test]
fn a_client_reaches_the_internet_as_the_gateway() {
    let world = World::new(1, &[]);
    let profile = world.add_client("alice", 1);
    let _client = world.start_client(1, &profile, true);

    reaches_the_internet_as_the_gateway(&world);
    let vip = vip_of(&world, "alice");
    assert!("10.77.0.0/16"
        .parse::<veil_user::net::Ipv4Net>()
        .unwrap()
        .contains(vip));
    assert!(flows(&world) >= 3, "tcp, udp and icmp flows in the maps");
}

/// Client 1 pings the remote, downloads 8 MiB intact and gets a UDP echo,
/// and the remote saw only the gateway's address.
fn reaches_the_internet_as_the_gateway(world: &World) {
    assert!(world.ping(1, "198.18.0.2"), "ping through the tunnel");
    assert_eq!(
        world.download(1).expect("download"),
        sha256(&download_data()),
        "8 MiB arrive intact"
    );
    assert_eq!(world.udp_echo(1, b"veil udp echo"), b"veil udp echo");
    let seen = world.servers.seen();
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(
        seen.iter().all(|a| *a == PUBLIC),
        "the remote saw only the gateway: {seen:?}"
    );
}

/// `--wan-filter xdp`, as on a NIC: the XDP program on the interface, and
/// the client reaches the internet as the gateway, bytes intact both ways,
/// while a stranger's connection to the NAT range gets no answer at all.
#[test]
fn with_xdp_on_the_wan_a_client_reaches_the_internet_and_strangers_get_no_answer() {
    let world = World::new(1, &["--wan-filter", "xdp"]);
    let link = ip_out(&world.gw, &["link", "show", "wan0"]);
    assert!(link.contains("xdp"), "an XDP program on the WAN: {link}");
    let profile = world.add_client("alice", 1);
    let _client = world.start_client(1, &profile, true);

    reaches_the_internet_as_the_gateway(&world);
    let upload = download_data();
    assert!(
        echo_through(&world, 1, &upload) == upload,
        "8 MiB up and back intact"
    );
    assert_strangers_get_no_answer(&world);
}

/// With no `--wan-filter`, a veth WAN gets the filter in TC (XDP on a veth
/// costs its peer's offloads and saves nothing), and says so; strangers
/// still get no answer.
#[test]
fn on_a_veth_wan_the_filter_is_in_tc_unless_named_and_strangers_get_no_answer() {
    let mut world = World::new(1, &[]);
    let link = ip_out(&world.gw, &["link", "show", "wan0"]);
    assert!(!link.contains("xdp"), "no XDP program on the WAN: {link}");
    let log = world.gateway().log();
    assert!(
        log.contains("WAN filter picked for the interface's driver")
            && log.contains("driver=veth")
            && log.contains("filter=tc"),
        "{log}"
    );
    assert_strangers_get_no_answer(&world);
}

/// A stranger's TCP connection to a port of the NAT range gets neither a
/// SYN-ACK nor a RST: the datapath dropped the SYN before the kernel saw it.
fn assert_strangers_get_no_answer(world: &World) {
    let nat_port = veil_user::flows::PortRange::DEFAULT.min + 17;
    let knock = world.remote.enter(|| {
        TcpStream::connect_timeout(&(PUBLIC, nat_port).into(), Duration::from_millis(1500))
    });
    assert_eq!(
        knock.map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::TimedOut,
        "a RST would mean the kernel saw the SYN"
    );
}

#[test]
fn clients_get_their_own_address_and_cannot_reach_each_other_or_private_networks() {
    let world = World::new(2, &[]);
    let a = world.add_client("a", 1);
    let b = world.add_client("b", 2);
    let _ca = world.start_client(1, &a, true);
    let _cb = world.start_client(2, &b, true);
    let (va, vb) = (vip_of(&world, "a"), vip_of(&world, "b"));
    assert_ne!(va, vb);

    assert!(world.ping(1, "198.18.0.2"));
    assert!(world.ping(2, "198.18.0.2"));
    for dst in [
        vb.to_string(),
        LAN_HOST.to_string(),
        PUBLIC.to_string(),
        "10.77.0.1".into(),
    ] {
        assert!(!world.ping(1, &dst), "client a must not reach {dst}");
    }
    // Refused destinations fail fast (ICMP administratively prohibited),
    // not after a timeout.
    let started = Instant::now();
    let lan = world
        .client(1)
        .enter(|| TcpStream::connect_timeout(&(LAN_HOST, 22).into(), Duration::from_secs(5)));
    assert!(lan.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once: {lan:?}"
    );
    assert!(
        world.status()["counters"]["policy_refused"]
            .as_u64()
            .unwrap()
            >= 5
    );
}

#[test]
fn a_forged_source_address_is_dropped_and_counted() {
    let world = World::new(1, &[]);
    let p = world.add_client("mallory", 1);
    let _c = world.start_client(1, &p, true);
    let before = world.servers.seen().len();

    world.client(1).enter(|| {
        // A UDP packet from an address that is not the client's, written
        // with a raw socket: the kernel routes it into the tunnel.
        let raw = veil_tests::raw::RawIp::new();
        let forged = veil_tests::packet::frame(
            Ipv4Addr::new(10, 77, 200, 200),
            REMOTE,
            64,
            veil_tests::packet::L4::udp(5555, 7, b"forged"),
        );
        let ip = veil_tests::packet::ip_of(&forged);
        for _ in 0..3 {
            raw.send(ip, REMOTE);
        }
    });
    wait_until(
        "the forged packets to be counted",
        Duration::from_secs(5),
        || {
            world.status()["counters"]["forged_source"]
                .as_u64()
                .unwrap()
                >= 3
        },
    );
    assert_eq!(
        world.servers.seen().len(),
        before,
        "nothing reached the remote"
    );
}

#[test]
fn unknown_and_revoked_certificates_are_refused() {
    // The stranger runs in a namespace of its own: one veil-client per
    // namespace.
    let mut world = World::new(3, &[]);
    let good = world.add_client("good", 1);
    let doomed = world.add_client("doomed", 2);
    let _g = world.start_client(1, &good, true);
    let mut d = world.start_client(2, &doomed, true);
    assert!(world.ping(2, "198.18.0.2"));

    // A profile from another gateway's CA.
    let stranger = world.foreign_profile();
    let mut s = world.start_client(3, &stranger, false);
    world
        .gateway()
        .wait_for_log("TLS handshake failed", Duration::from_secs(10));
    assert!(!s.log().contains("connected"), "{}", s.log());
    s.stop();

    world.veil_user(&["client", "revoke", "doomed"]);
    world
        .gateway()
        .wait_for_log("revoked: closing its session", Duration::from_secs(10));
    d.wait_for_log("tunnel down", Duration::from_secs(10));
    world
        .gateway()
        .wait_for_log("client `doomed` is revoked", Duration::from_secs(10));
    assert!(
        !world.ping(2, "198.18.0.2"),
        "a revoked client gets nowhere"
    );
    assert!(world.ping(1, "198.18.0.2"), "the others are unaffected");
    d.stop();
}

#[test]
fn a_malformed_client_record_refuses_its_client_and_blocks_no_revocation() {
    let mut world = World::new(2, &[]);
    let broken = world.add_client("broken", 1);
    let doomed = world.add_client("doomed", 2);
    let mut b = world.start_client(1, &broken, true);
    let mut d = world.start_client(2, &doomed, true);
    assert!(world.ping(1, "198.18.0.2"));

    // One bad file: its client is dropped and refused (fail closed)...
    std::fs::write(world.state.join("clients/broken.toml"), "fingerprint = [").unwrap();
    world
        .gateway()
        .wait_for_log("client `broken` is refused until", Duration::from_secs(10));
    world.gateway().wait_for_log(
        "record unreadable: closing its session",
        Duration::from_secs(10),
    );
    b.wait_for_log("tunnel down", Duration::from_secs(10));
    world.gateway().wait_for_log(
        "certificate not issued by this gateway's registry",
        Duration::from_secs(10),
    );
    // ...and every other record still applies: a revocation takes effect.
    world.veil_user(&["client", "revoke", "doomed"]);
    world
        .gateway()
        .wait_for_log("revoked: closing its session", Duration::from_secs(10));
    d.wait_for_log("tunnel down", Duration::from_secs(10));
    assert!(
        !world.ping(1, "198.18.0.2"),
        "the broken client gets nowhere"
    );
    assert!(!world.ping(2, "198.18.0.2"), "the revoked one neither");
    let log = world.gateway().log();
    assert_eq!(
        log.matches("client `broken` is refused until").count(),
        1,
        "warned once, not at every reload:\n{log}"
    );
    b.stop();
    d.stop();
}

/// Deleting a client's record (the obvious way to remove one) closes its
/// live session within seconds and refuses it after, where before the
/// session went on until it next reconnected.
#[test]
fn a_deleted_client_record_ends_its_session() {
    let mut world = World::new(2, &[]);
    let gone = world.add_client("gone", 1);
    let stays = world.add_client("stays", 2);
    let mut g = world.start_client(1, &gone, true);
    let mut s = world.start_client(2, &stays, true);
    assert!(world.ping(1, "198.18.0.2"));
    std::fs::remove_file(world.state.join("clients/gone.toml")).unwrap();
    world.gateway().wait_for_log(
        "record removed: closing its session",
        Duration::from_secs(10),
    );
    g.wait_for_log("tunnel down", Duration::from_secs(10));
    world.gateway().wait_for_log(
        "certificate not issued by this gateway's registry",
        Duration::from_secs(15),
    );
    assert!(
        !world.ping(1, "198.18.0.2"),
        "the removed client gets nowhere"
    );
    assert!(world.ping(2, "198.18.0.2"), "the other one is untouched");
    g.stop();
    s.stop();
}

#[test]
fn garbage_on_the_socket_leaves_other_clients_intact() {
    let mut world = World::new(2, &[]);
    let p = world.add_client("steady", 2);
    let _c = world.start_client(2, &p, true);

    let download = std::thread::scope(|s| {
        let dl = s.spawn(|| world.download(2));
        // Meanwhile, from client 1's namespace (no profile): junk of every
        // kind at the listener.
        world.client(1).enter(|| {
            let junk: [&[u8]; 4] = [
                b"\x00\x01\x02 not tls at all \xff\xfe",
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                &[0x16, 0x03, 0x01, 0x40, 0x00, 0x01], // a TLS header promising 16 KiB
                &[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00],
            ];
            for bytes in junk {
                if let Ok(mut t) = TcpStream::connect(("10.200.1.1", 443)) {
                    let _ = t.write_all(bytes);
                    let _ = t.shutdown(std::net::Shutdown::Write);
                    let mut sink = Vec::new();
                    t.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                    let _ = t.read_to_end(&mut sink);
                }
            }
        });
        dl.join().unwrap()
    });
    assert_eq!(download.expect("download"), sha256(&download_data()));
    world
        .gateway()
        .wait_for_log("TLS handshake failed", Duration::from_secs(5));
    assert!(world.gateway().is_running());
    assert!(world.ping(2, "198.18.0.2"));
}

#[test]
fn a_quick_reconnect_keeps_the_address_and_connections_and_flows_expire_after_the_grace_period() {
    let world = World::new(1, &["--grace", "4"]);
    let p = world.add_client("roamer", 1);
    let mut c = world.start_client(1, &p, true);
    let vip = vip_of(&world, "roamer");

    let mut conn = world
        .client(1)
        .enter(|| TcpStream::connect_timeout(&(REMOTE, 7).into(), Duration::from_secs(5)))
        .expect("echo connection");
    conn.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut echo = |msg: &[u8]| {
        conn.write_all(msg).unwrap();
        let mut buf = vec![0u8; msg.len()];
        conn.read_exact(&mut buf).unwrap();
        buf
    };
    assert_eq!(echo(b"before"), b"before");

    // The client dies without a word (a network change, a crash) and comes
    // back within the grace period.
    c.kill();
    let _c2 = world.start_client(1, &p, true);
    assert_eq!(vip_of(&world, "roamer"), vip, "the same address");
    assert_eq!(
        echo(b"after the reconnect"),
        b"after the reconnect",
        "the TCP connection survived"
    );

    let c2 = _c2;
    drop(c2); // a clean exit this time; the flows stay for the grace period
    assert!(flows(&world) >= 1);
    wait_until("the flows to be removed", Duration::from_secs(10), || {
        flows(&world) == 0
    });
    let dump = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(
            world
                .pins()
                .join(format!("v{}/egress", veil_common::LAYOUT_VERSION)),
        )
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&dump.stdout).trim(),
        "[]",
        "gone from the BPF map"
    );
}

#[test]
fn the_clients_routes_are_restored_when_it_exits() {
    let world = World::new(1, &[]);
    let p = world.add_client("tidy", 1);
    let routes = || ip_out(world.client(1), &["route", "show", "table", "all"]);
    let rules = || ip_out(world.client(1), &["rule"]);
    // The uplink's IPv6 link-local address gets its local route only once
    // duplicate address detection is done: a client that connects quickly
    // (HTTP/3) would otherwise see the table change under it.
    wait_until("IPv6 DAD on the uplink", Duration::from_secs(5), || {
        ip_out(world.client(1), &["-6", "addr", "show", "tentative"])
            .trim()
            .is_empty()
    });
    let (routes_before, rules_before) = (routes(), rules());
    let mut c = world.start_client(1, &p, true);
    // The tunnel's own table, ahead of main for everything but the
    // gateway (see leaks.rs for why).
    let during = routes();
    assert!(during.contains("default dev veil0 table 7670"), "{during}");
    let during = rules();
    assert!(
        during.contains("7670:\tfrom all to 10.200.1.1 lookup main"),
        "{during}"
    );
    assert!(during.contains("7673:\tfrom all lookup 7670"), "{during}");
    assert!(c.stop().unwrap().success(), "{}", c.log());
    assert_eq!(routes(), routes_before);
    assert_eq!(rules(), rules_before);
}

#[test]
fn a_full_gateway_refuses_cleanly_before_the_upgrade() {
    let mut world = World::new(2, &["--max-clients", "1"]);
    let a = world.add_client("first", 1);
    let b = world.add_client("second", 2);
    let _a = world.start_client(1, &a, true);
    let mut second: Proc = world.start_client(2, &b, false);
    second.wait_for_log("503", Duration::from_secs(10));
    world
        .gateway()
        .wait_for_log("--max-clients 1 reached", Duration::from_secs(5));
    assert!(world.ping(1, "198.18.0.2"));
}

#[test]
fn the_client_reconnects_when_the_gateway_restarts() {
    let mut world = World::new(1, &[]);
    let p = world.add_client("patient", 1);
    let mut c = world.start_client(1, &p, true);
    let vip = vip_of(&world, "patient");
    assert!(world.ping(1, "198.18.0.2"));

    world.gateway().stop();
    c.wait_for_log("tunnel down", Duration::from_secs(10));
    world.start_gateway(&[]);
    wait_until("the tunnel to come back", Duration::from_secs(30), || {
        world.ping(1, "198.18.0.2")
    });
    assert_eq!(
        vip_of(&world, "patient"),
        vip,
        "the same address after a restart"
    );
    assert!(c.is_running(), "the client kept going: {}", c.log());
}
