//! Clients that do what `veil-client` never would, against the real
//! gateway: forged offload headers, a client that stops reading, floods of
//! connections that never authenticate, QUIC handshakes from forged
//! addresses. Each promise is checked where a
//! user would check it: on the remote's wire, in the other clients' data,
//! in the daemon's descriptors and memory.

use std::{
    io::{BufRead, BufReader, ErrorKind, Read},
    net::{Ipv4Addr, TcpStream, UdpSocket},
    process::Stdio,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use veil_proto::gso::VnetHdr;
use veil_tests::{
    interop,
    netns::NetNs,
    packet::{frame, ip_of, ones_sum, L4},
    proc::{fd_count, rss_bytes},
    raw::{tls_without_certificate, Capture, RawClient},
    wait_until,
    world::{download_data, sha256, World, PUBLIC, REMOTE},
};

const NAT_PORTS: std::ops::RangeInclusive<u16> = 61000..=65535;

/// An IPv4/UDP packet whose checksum is left partial, as a kernel hands
/// it over with CHECKSUM_PARTIAL: the field holds the pseudo-header sum.
fn partial_udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut ip = ip_of(&frame(src, dst, 64, L4::udp(sport, dport, payload))).to_vec();
    let l4_len = (ip.len() - 20) as u16;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&l4_len.to_be_bytes());
    let partial = ones_sum(&pseudo);
    ip[26..28].copy_from_slice(&partial.to_be_bytes());
    ip
}

fn csum_at(start: u16, offset: u16) -> VnetHdr {
    VnetHdr {
        flags: VnetHdr::F_NEEDS_CSUM,
        csum_start: start,
        csum_offset: offset,
        ..VnetHdr::NONE
    }
}

/// (source, source port, destination port, payload) of each UDP packet.
fn udp_seen(packets: &[Vec<u8>]) -> Vec<(Ipv4Addr, u16, u16, Vec<u8>)> {
    packets
        .iter()
        .filter(|p| p.len() >= 28 && p[9] == 17 && p[6] & 0x3f == 0 && p[7] == 0)
        .map(|p| {
            let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
            let sport = u16::from_be_bytes([p[20], p[21]]);
            let dport = u16::from_be_bytes([p[22], p[23]]);
            (src, sport, dport, p[28..].to_vec())
        })
        .collect()
}

#[test]
fn forged_offload_headers_never_change_what_the_remote_sees() {
    let world = World::new(1, &[]);
    let profile = world.add_client("mallory", 1);
    let mut raw = RawClient::connect(world.client(1), &profile, true);
    assert!(raw.session.offload(), "offload negotiated");
    let vip = raw.vip();
    let capture = Capture::new(&world.remote, "eth0");
    let lan = Capture::new(&world.lan, "eth0");

    // Where the kernel would write the checksum after the datapath's NAT:
    // the source port, the destination port, the source and destination
    // addresses, the UDP length, inside the payload.
    let aims: [(u16, u16); 6] = [(20, 0), (20, 2), (0, 12), (0, 16), (20, 4), (24, 0)];
    for (i, (start, offset)) in aims.iter().enumerate() {
        let payload = format!("aimed at {start}+{offset}");
        let pkt = partial_udp(vip, 40000 + i as u16, REMOTE, 5555, payload.as_bytes());
        raw.send_offload(&csum_at(*start, *offset), &pkt);
    }
    // Segment sizes that are tiny or do not fit the MTU: refused.
    let big = partial_udp(vip, 41000, REMOTE, 5555, &[b't'; 3000]);
    for gso_size in [1, 16, 1373, 4000] {
        let hdr = VnetHdr {
            gso_type: VnetHdr::GSO_UDP_L4,
            gso_size,
            hdr_len: 28,
            ..csum_at(20, 6)
        };
        raw.send_offload(&hdr, &big);
    }
    // The honest case still works: the checksum where UDP keeps it.
    let honest = partial_udp(vip, 42000, REMOTE, 5555, b"honest");
    raw.send_offload(&csum_at(20, 6), &honest);
    raw.pump(Duration::from_millis(500));

    let seen = udp_seen(&capture.packets(Duration::from_secs(1)));
    assert!(!seen.is_empty(), "something reached the remote");
    for (src, sport, dport, payload) in &seen {
        assert_eq!(*src, PUBLIC, "the remote sees only the gateway");
        assert!(
            NAT_PORTS.contains(sport),
            "source port {sport} is outside the NAT range: the client placed a checksum after NAT"
        );
        assert!(
            !payload.starts_with(b"ttt"),
            "a refused super-packet got through (to port {dport})"
        );
    }
    let honest_seen = seen
        .iter()
        .find(|s| s.3 == b"honest")
        .expect("honest packet");
    assert_eq!(honest_seen.2, 5555);
    // What the source-address aim made is a forged source: refused by the
    // gateway's check, which saw the final bytes.
    assert!(
        world.status()["counters"]["forged_source"]
            .as_u64()
            .unwrap()
            >= 1
    );
    // Nothing reached a private network, whatever the aim made of the
    // destination.
    let leaked = udp_seen(&lan.packets(Duration::from_millis(100)));
    assert!(leaked.is_empty(), "reached the LAN: {leaked:?}");
    // And the session is alive and well.
    raw.send_offload(
        &csum_at(20, 6),
        &partial_udp(vip, 42001, REMOTE, 7, b"echo?"),
    );
    raw.pump(Duration::from_secs(1));
    assert!(
        raw.received.iter().any(|p| p.ends_with(b"echo?")),
        "the echo came back"
    );
}

/// A UDP sender in the remote's namespace: once a datagram arrives on
/// `port`, it answers its source with datagrams as fast as it can until
/// stopped, always toward the latest source.
struct Flood {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Flood {
    fn start(remote: &NetNs, port: u16) -> Self {
        let socket = remote.enter(|| UdpSocket::bind((REMOTE, port)).unwrap());
        socket.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let target = Arc::new(Mutex::new(None));
        let st = stop.clone();
        let thread = thread::spawn(move || {
            let chunk = [0x5a; 1200];
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                while let Ok((_, from)) = socket.recv_from(&mut buf) {
                    *target.lock().unwrap() = Some(from);
                }
                let to = *target.lock().unwrap();
                match to {
                    Some(to) => {
                        for _ in 0..64 {
                            let _ = socket.send_to(&chunk, to);
                        }
                        thread::sleep(Duration::from_millis(2));
                    }
                    None => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Flood {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_client_that_stops_reading_cannot_hold_the_gateway_or_the_others() {
    let mut world = World::new(2, &[]);
    let staller = world.add_client("staller", 1);
    let steady = world.add_client("steady", 2);
    let _c2 = world.start_client(2, &steady, true);
    let _flood = Flood::start(&world.remote, 5556);
    let pid = world.gateway().pid();

    // Connects, asks the remote for a flood of replies, never reads again,
    // keeps the connection open: then does it again (a reconnect replaces
    // the session it stalled).
    let mut held: Vec<TcpStream> = Vec::new();
    let mut stall_once = |world: &World| {
        let mut raw = RawClient::connect(world.client(1), &staller, false);
        let vip = raw.vip();
        raw.send(ip_of(&frame(
            vip,
            REMOTE,
            64,
            L4::udp(40000, 5556, b"flood me"),
        )));
        thread::sleep(Duration::from_millis(300));
        held.push(raw.into_socket());
    };
    for _ in 0..5 {
        stall_once(&world);
    }
    thread::sleep(Duration::from_secs(2));
    let (fds, rss) = (fd_count(pid), rss_bytes(pid) / 1024);
    for _ in 0..25 {
        stall_once(&world);
    }
    thread::sleep(Duration::from_secs(2));
    let (fds_after, rss_after) = (fd_count(pid), rss_bytes(pid) / 1024);
    eprintln!("after 5 stalls: {fds} fds, {rss} KiB; after 30: {fds_after} fds, {rss_after} KiB");
    assert!(
        fds_after <= fds + 2,
        "descriptors grew from {fds} to {fds_after} over 25 stalled reconnects"
    );
    assert!(
        rss_after <= rss + 16 * 1024,
        "memory grew from {rss} KiB to {rss_after} KiB over 25 stalled reconnects"
    );

    // While the client stalls, another client's download completes.
    assert_eq!(
        world.download(2).expect("download"),
        sha256(&download_data())
    );
    // `status` shows the stalled client's replies waiting, its buffer
    // (4 MiB by default) about full.
    let status = world.status();
    let clients = status["clients"].as_array().unwrap();
    let staller = clients.iter().find(|c| c["name"] == "staller").unwrap();
    let queued = staller["replies_queued"].as_u64().unwrap();
    assert!(
        (1 << 20..=4 << 20).contains(&queued),
        "{queued} bytes queued"
    );

    // The last connection is stalled and live: revoking it closes it.
    world.gateway().wait_for_log(
        "session ended: replaced by a new connection",
        Duration::from_secs(5),
    );
    let revoked = Instant::now();
    world.veil_user(&["client", "revoke", "staller"]);
    world
        .gateway()
        .wait_for_log("session ended: client revoked", Duration::from_secs(10));
    assert!(
        revoked.elapsed() < Duration::from_secs(5),
        "revocation took {:?}",
        revoked.elapsed()
    );
    assert!(world.gateway().is_running());
    assert!(world.ping(2, "198.18.0.2"), "the others are unaffected");
    drop(held);
}

#[test]
fn thousands_of_idle_connections_do_not_keep_a_client_out() {
    let mut world = World::new(2, &[]);
    let late = world.add_client("late", 2);
    let pid = world.gateway().pid();
    let fds = fd_count(pid);

    let idle: Vec<TcpStream> = world.client(1).enter(|| {
        (0..3000)
            .filter_map(|_| TcpStream::connect(("10.200.1.1", 443)).ok())
            .collect()
    });
    assert!(idle.len() > 2900, "only {} connections opened", idle.len());
    let started = Instant::now();
    let _c = world.start_client(2, &late, true);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "connecting took {:?} beside 3,000 idle connections",
        started.elapsed()
    );
    assert!(world.ping(2, "198.18.0.2"));
    let turned = world.status()["refused"]["source_busy"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        turned > 2000,
        "connections over the per-source cap are closed at once ({turned})"
    );
    drop(idle);
    // The client's session holds one descriptor; everything else returns.
    wait_until(
        "descriptors back to normal",
        Duration::from_secs(15),
        || fd_count(pid) <= fds + 1,
    );
}

/// QUIC handshakes from 80 addresses that never answer, as forged ones
/// would not, against a gateway with 64 handshake places (each would hold
/// its place for 10 s). Once a quarter of the places are taken the gateway
/// asks unproven addresses to answer a Retry first, so the flood holds no
/// more than that quarter, and clients still connect at once, over HTTP/3
/// and over TCP.
#[test]
fn a_flood_of_quic_handshakes_from_forged_addresses_keeps_no_one_out() {
    const FORGED: usize = 80;
    let world = World::new(2, &["--max-handshakes", "64"]);
    let h3 = world.add_client("h3", 2);
    let tcp = world.add_client("tcp", 1);
    // The flood's addresses, beside client 1's own on its link.
    for i in 0..FORGED {
        let addr = format!("10.200.1.{}/24", 100 + i);
        world.client(1).ip(&["addr", "add", &addr, "dev", "eth0"]);
    }
    let mut flood = interop::script(
        world.client(1),
        "quic_initials.py",
        &["10.200.1.1:443", "10.200.1.100", &FORGED.to_string(), "30"],
    )
    .stdout(Stdio::piped())
    .spawn()
    .expect(interop::NOT_INSTALLED);
    let mut said = String::new();
    BufReader::new(flood.stdout.take().expect("piped"))
        .read_line(&mut said)
        .expect("the flood's output");
    assert!(said.starts_with("sent "), "{said}");

    let started = Instant::now();
    let _c = world.start_client_with(2, &h3, true, &["--transport", "h3"]);
    let h3_took = started.elapsed();
    let started = Instant::now();
    let raw = RawClient::connect(world.client(1), &tcp, false);
    let tcp_took = started.elapsed();
    eprintln!("beside the flood: HTTP/3 connected in {h3_took:?}, TCP in {tcp_took:?}");
    assert!(h3_took < Duration::from_secs(5), "HTTP/3 took {h3_took:?}");
    assert!(tcp_took < Duration::from_secs(2), "TCP took {tcp_took:?}");
    assert!(world.ping(2, "198.18.0.2"));
    let refused = &world.status()["refused"];
    eprintln!("refused: {refused}");
    let retried = refused["address_unproven"].as_u64().unwrap_or(0);
    assert!(
        retried >= (FORGED - 16) as u64,
        "the flood past a quarter of the places was asked to prove its addresses ({retried})"
    );
    assert_eq!(
        refused["handshakes_busy"].as_u64().unwrap_or(0),
        0,
        "{refused}"
    );
    drop(raw);
    let _ = flood.kill();
    let _ = flood.wait();
}

/// Strangers that complete TLS without a client certificate, then park on
/// the fallback site (which waits 60 s for a request), as many as there
/// are handshake places: they hold places among the site's visitors, not
/// among handshakes, so a client still connects at once; one more stranger
/// than there are visitors' places is closed without the site.
#[test]
fn strangers_parked_on_the_fallback_site_keep_no_client_out() {
    const PLACES: usize = 8;
    let world = World::new(2, &["--max-handshakes", &PLACES.to_string()]);
    let late = world.add_client("late", 2);
    let tcp = world.add_client("tcp", 1);
    let profile = veil_user::state::Profile::load(&tcp).expect("profile");
    // Parked: TLS done, then nothing (the site waits for a request head).
    let park = || {
        let tcp = TcpStream::connect(profile.endpoints[0].as_str()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut tls = tls_without_certificate(&profile.server_name, &profile.ca, tcp);
        // A read completes the handshake; the site says nothing first.
        let mut byte = [0u8; 1];
        let read = tls.read(&mut byte);
        (tls, read)
    };
    let parked: Vec<_> = world
        .client(1)
        .enter(|| (0..PLACES).map(|_| park()).collect());
    for (_, read) in &parked {
        let waited = read.as_ref().map_err(|e| e.kind());
        assert_eq!(waited.unwrap_err(), ErrorKind::WouldBlock, "the site waits");
    }
    let (_, extra) = world.client(1).enter(park);
    assert!(
        matches!(extra, Ok(0)) || extra.is_err_and(|e| e.kind() != ErrorKind::WouldBlock),
        "over the visitors' cap: closed at once"
    );

    let started = Instant::now();
    let _c = world.start_client_with(2, &late, true, &["--transport", "tcp"]);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "connecting took {took:?}");
    assert!(world.ping(2, "198.18.0.2"));
    let refused = &world.status()["refused"];
    assert_eq!(
        refused["handshakes_busy"].as_u64().unwrap_or(0),
        0,
        "{refused}"
    );
    drop(parked);
}

#[test]
fn clients_reach_each_other_with_allow_client_to_client_and_nothing_leaves_the_wan() {
    let world = World::new(2, &["--allow-client-to-client"]);
    let a = world.add_client("a", 1);
    let b = world.add_client("b", 2);
    let _ca = world.start_client(1, &a, true);
    let _cb = world.start_client(2, &b, true);
    let (va, vb) = (world.vip_of("a"), world.vip_of("b"));
    let capture = Capture::new(&world.remote, "eth0");

    assert!(world.ping(1, &vb.to_string()), "a reaches b");
    assert!(world.ping(2, &va.to_string()), "b reaches a");
    // UDP both ways, bytes intact.
    let server = world
        .client(2)
        .enter(|| UdpSocket::bind((vb, 6000)).unwrap());
    server
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    world.client(1).enter(|| {
        let c = UdpSocket::bind((va, 0)).unwrap();
        c.send_to(b"hello b", (vb, 6000)).unwrap();
    });
    let mut buf = [0u8; 64];
    let (n, from) = server.recv_from(&mut buf).expect("b got a's datagram");
    assert_eq!(&buf[..n], b"hello b");
    assert_eq!(
        from.ip(),
        std::net::IpAddr::V4(va),
        "b sees a's own address"
    );

    let pool_on_wan: Vec<_> = capture
        .packets(Duration::from_millis(200))
        .into_iter()
        .filter(|p| p[16] == 10 && p[17] == 77)
        .collect();
    assert!(pool_on_wan.is_empty(), "client traffic left the WAN");
    assert!(
        world.status()["counters"]["client_to_client"]
            .as_u64()
            .unwrap()
            >= 3
    );
}

/// A burst of datagrams from one client to another, which the gateway
/// merges into one UDP super-packet before its checks (as the sender's
/// kernel may hand it one, with UDP_SEGMENT), reaches the other client
/// as the datagrams it was: each whole, none merged, over either
/// transport. (A receiving kernel before 6.2 refuses a UDP super-packet
/// from a TUN device; a user-space stack would take it as one datagram.)
#[test]
fn a_burst_of_datagrams_between_clients_arrives_as_the_datagrams_it_was() {
    const SIZE: usize = 200;
    const COUNT: usize = 20;
    let world = World::new(2, &["--allow-client-to-client"]);
    let a = world.add_client("a", 1);
    let b = world.add_client("b", 2);
    for transport in ["tcp", "h3"] {
        let mut ca = world.start_client_with(1, &a, true, &["--transport", transport]);
        let mut cb = world.start_client_with(2, &b, true, &["--transport", transport]);
        let (va, vb) = (world.vip_of("a"), world.vip_of("b"));
        let server = world
            .client(2)
            .enter(|| UdpSocket::bind((vb, 6001)).unwrap());
        server
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        // What b's kernel is handed: a super-packet would show here whole,
        // before the kernel cut it.
        let handed = Capture::new(world.client(2), "veil0");
        let sent: Vec<Vec<u8>> = (0..COUNT)
            .map(|i| vec![b'a' + (i % 26) as u8; SIZE])
            .collect();
        world.client(1).enter(|| {
            let c = UdpSocket::bind((va, 0)).unwrap();
            veil_tests::udp_segment(&c, SIZE);
            c.send_to(&sent.concat(), (vb, 6001)).unwrap();
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        while got.len() < COUNT {
            let Ok(n) = server.recv(&mut buf) else { break };
            got.push(buf[..n].to_vec());
        }
        got.sort();
        let mut want = sent.clone();
        want.sort();
        assert_eq!(
            got.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![SIZE; COUNT],
            "over {transport}: {COUNT} datagrams of {SIZE} bytes"
        );
        assert_eq!(got, want, "over {transport}: each intact");
        let to_b: Vec<usize> = handed
            .packets(Duration::from_millis(200))
            .iter()
            .filter(|p| p.len() > 20 && p[9] == 17)
            .map(Vec::len)
            .collect();
        assert_eq!(
            to_b,
            vec![20 + 8 + SIZE; COUNT],
            "over {transport}: b's TUN device was handed each datagram alone"
        );
        ca.stop();
        cb.stop();
        wait_until("the sessions to end", Duration::from_secs(10), || {
            world.status()["clients"].as_array().unwrap().is_empty()
        });
    }
}

/// A flood of refused packets gets at most 100 ICMP answers a second:
/// each answer is larger than the packet it answers, and the gateway
/// would otherwise send a client more than it sends.
#[test]
fn a_flood_of_refused_packets_gets_a_limited_number_of_answers() {
    let world = World::new(1, &[]);
    let profile = world.add_client("mallory", 1);
    let mut raw = RawClient::connect(world.client(1), &profile, false);
    let vip = raw.vip();
    let started = Instant::now();
    for i in 0..2_000u16 {
        // To the gateway's own address: refused by the egress policy.
        let refused = frame(vip, PUBLIC, 64, L4::udp(40_000 + i % 100, 9, b"no"));
        raw.send(ip_of(&refused));
    }
    raw.pump(Duration::from_millis(500));
    let secs = started.elapsed().as_secs_f64();
    let answers = raw
        .received
        .iter()
        .filter(|p| p.len() >= 28 && p[9] == 1 && p[20] == 3)
        .count();
    assert!(
        answers >= 100,
        "{answers} answers: refusals are still answered"
    );
    assert!(
        answers as f64 <= 100.0 * (1.0 + secs) + 5.0,
        "{answers} answers in {secs:.2} s"
    );
    let refused = world.status()["counters"]["policy_refused"]
        .as_u64()
        .unwrap();
    assert!(refused >= 2_000, "{refused} refused");
}
