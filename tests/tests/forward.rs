//! Port forwarding (`--forward FILE`) with the real gateway: a host on the
//! internet side (the remote namespace) reaches a host on the gateway's
//! private side (the lan namespace) through a port of the gateway's public
//! address. The gateway namespace does not forward (ip_forward is 0), so
//! whatever arrives went through veil's datapath.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use veil_tests::{
    netns::NetNs,
    packet::{frame, ip_of, L4},
    raw::{Capture, RawIp},
    world::{pseudo_random, sha256, World, LAN_HOST, PUBLIC, REMOTE},
};

/// Bytes of the transfers: the 50 MB.
const BIG: usize = 50 << 20;
/// The gateway's own address on the lan side: forwarded connections come
/// from it.
const GW_LAN: Ipv4Addr = Ipv4Addr::new(10, 200, 9, 1);

fn data(len: usize, seed: u64) -> Vec<u8> {
    pseudo_random(len, seed)
}

/// A server in the lan namespace. On each connection it reads one command
/// byte: `D` sends [`BIG`] bytes and closes; `U` reads to the end (the
/// client's half-close), then answers the SHA-256 of what it read; `E`
/// echoes until the client closes. It notes who connected.
struct LanServer {
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
}

impl LanServer {
    fn start(lan: &NetNs, port: u16) -> Self {
        let listener = lan.enter(|| TcpListener::bind((LAN_HOST, port)).unwrap());
        listener.set_nonblocking(true).unwrap();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, st) = (peers.clone(), stop.clone());
        let download = Arc::new(data(BIG, 1));
        thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Ok((mut s, from)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                p.lock().unwrap().push(from);
                s.set_nonblocking(false).unwrap();
                let download = download.clone();
                thread::spawn(move || {
                    let mut cmd = [0u8];
                    if s.read_exact(&mut cmd).is_err() {
                        return;
                    }
                    match cmd[0] {
                        b'D' => {
                            let _ = s.write_all(&download);
                        }
                        b'U' => {
                            let mut got = Vec::new();
                            let _ = s.read_to_end(&mut got);
                            let _ = s.write_all(&sha256(&got));
                        }
                        _ => {
                            let mut buf = [0u8; 4096];
                            while let Ok(n) = s.read(&mut buf) {
                                if n == 0 || s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
        LanServer { peers, stop }
    }

    fn seen(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

impl Drop for LanServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A world whose gateway forwards with `rules` as its rule file.
fn world_with(rules: &str) -> (World, PathBuf) {
    world_of(0, rules, &[])
}

/// [`world_with`], with `clients` client namespaces and the gateway's
/// other `flags`.
fn world_of(clients: usize, rules: &str, flags: &[&str]) -> (World, PathBuf) {
    let mut world = World::bare(clients);
    let file = world.dir.join("forward.csv");
    std::fs::write(&file, rules).unwrap();
    let mut args = vec!["--forward", file.to_str().unwrap()];
    args.extend_from_slice(flags);
    world.start_gateway(&args);
    (world, file)
}

/// Connects from the remote (the internet side) to the gateway's public
/// address.
fn connect(world: &World, port: u16) -> std::io::Result<TcpStream> {
    world.remote.enter(|| {
        let s = TcpStream::connect_timeout(&(PUBLIC, port).into(), Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(s)
    })
}

fn download(world: &World, port: u16) -> Vec<u8> {
    let mut s = connect(world, port).expect("connecting through the forwarded port");
    s.write_all(b"D").unwrap();
    let mut got = Vec::with_capacity(BIG);
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), BIG, "the whole file arrived");
    sha256(&got)
}

fn upload(world: &World, port: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = connect(world, port).expect("connecting through the forwarded port");
    s.write_all(b"U").unwrap();
    s.write_all(payload).unwrap();
    // Half-close: the server reads to the end, then answers.
    s.shutdown(Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    answer
}

fn forwards(world: &World) -> Vec<serde_json::Value> {
    world.status()["forwards"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn fifty_megabytes_cross_a_forwarded_port_both_ways_intact() {
    let (world, _file) = world_with("8080,10.200.9.2,8000\n");
    let lan = LanServer::start(&world.lan, 8000);

    assert_eq!(download(&world, 8080), sha256(&data(BIG, 1)), "download");
    let payload = data(BIG, 7);
    assert_eq!(upload(&world, 8080, &payload), sha256(&payload), "upload");

    // The lan host saw the gateway's own address, never the remote's.
    let seen = lan.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for peer in &seen {
        assert_eq!(peer.ip(), std::net::IpAddr::V4(GW_LAN), "{seen:?}");
        assert!(
            (61000..=65535).contains(&peer.port()),
            "a NAT port from the range: {peer}"
        );
    }
    let f = &forwards(&world)[0];
    assert_eq!(f["rule"], "tcp/8080");
    assert_eq!(f["target"], "10.200.9.2:8000");
    assert_eq!(f["connections"], 2, "{f}");
    assert!(f["bytes"].as_u64().unwrap() > 2 * BIG as u64, "{f}");

    // The counters are in a pinned map bpftool reads.
    let dir = world
        .pins()
        .join(format!("v{}", veil_common::LAYOUT_VERSION));
    let out = world.gw.exec(
        "bpftool",
        &[
            "-j",
            "map",
            "dump",
            "pinned",
            dir.join("forward_stats").to_str().unwrap(),
        ],
    );
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entry = &dump[0]["formatted"];
    assert_eq!(entry["key"]["listen_port"], 8080, "{dump}");
    assert_eq!(entry["value"]["connections"], 2, "{dump}");
}

#[test]
fn a_messy_file_works_and_its_bad_line_is_reported_by_number() {
    let rules = "listen_port,target_host,target_port,proto\r\n\
                 # web\r\n\
                 \r\n\
                 8080 , 10.200.9.2 , 8000 , tcp\r\n\
                 9090,10.200.9.2,notaport\r\n\
                 7070,10.200.9.2,8000   # the same server again\r\n";
    let (mut world, file) = world_with(rules);
    let _lan = LanServer::start(&world.lan, 8000);
    let report = format!("{}:5: target_port `notaport` is not a port", file.display());
    world
        .gateway()
        .wait_for_log(&report, Duration::from_secs(5));

    for port in [8080, 7070] {
        let mut s = connect(&world, port).unwrap();
        s.write_all(b"Ehello").unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello", "port {port}");
    }
    let status = world.status();
    let problems = status["forward_problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{status}");
    assert!(
        problems[0].as_str().unwrap().starts_with(&report),
        "{status}"
    );
    assert_eq!(forwards(&world).len(), 2);
}

#[test]
fn a_rule_toward_a_closed_port_is_refused_at_once() {
    let (world, _file) = world_with("8080,10.200.9.2,8001\n");
    let started = Instant::now();
    let err = connect(&world, 8080).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

/// What each forged source sends.
#[derive(Clone, Copy, PartialEq)]
enum Forged {
    Syn,
    /// A SYN, then an ACK of a SYN-ACK it never saw (its number a guess),
    /// with a wrong TCP checksum: the target drops it without a word (a
    /// valid one would draw its RST, which ends the connection anyway).
    SynThenAck,
    Udp,
}

/// Sends to the gateway's public address on `port`, from each of `count`
/// forged sources in 100.64.0.0/10 from `first` on, what a flood would:
/// nobody is there to see the answers. From the remote namespace, through
/// a raw socket (the kernel sends whatever source it is given); paced a
/// little so that the veth ring in front of the gateway's XDP does not
/// drop them.
fn forged(world: &World, what: Forged, port: u16, first: u32, count: u32) {
    world.remote.enter(|| {
        let raw = RawIp::new();
        for i in first..first + count {
            let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i);
            let sport = 1024 + (i % 60000) as u16;
            let packet = |l4| ip_of(&frame(src, PUBLIC, 64, l4)).to_vec();
            match what {
                Forged::Udp => raw.send(&packet(L4::udp(sport, port, b"forged")), PUBLIC),
                Forged::Syn => raw.send(&packet(L4::tcp(sport, port, "S", &[])), PUBLIC),
                Forged::SynThenAck => {
                    raw.send(&packet(L4::tcp(sport, port, "S", &[])), PUBLIC);
                    let mut ack = packet(L4::tcp(sport, port, "A", &[]));
                    ack[20 + 16] ^= 0xff;
                    raw.send(&ack, PUBLIC);
                }
            }
            if i % 64 == 0 {
                thread::sleep(Duration::from_micros(100));
            }
        }
    });
}

fn echo(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).unwrap();
    let mut back = vec![0; msg.len()];
    s.read_exact(&mut back).unwrap();
    back
}

#[test]
fn a_flood_of_forged_syns_leaves_room_for_real_connections() {
    // Targets enough for the flood's connections to outnumber the table's
    // (each target has its own NAT ports, 4,536 by default).
    const FLOODED: u16 = 19;
    let mut rules = String::from("8080,10.200.9.2,8000\n");
    for i in 1..=FLOODED {
        rules += &format!("{},10.200.9.2,{}\n", 9000 + i, 8000 + i);
    }
    let (world, _file) = world_with(&rules);
    let _lan = LanServer::start(&world.lan, 8000);
    // Listeners that never accept: the target's kernel answers every SYN
    // (with a cookie once its queue is full), as a real server would.
    let _targets: Vec<TcpListener> = (1..=FLOODED)
        .map(|i| {
            world
                .lan
                .enter(|| TcpListener::bind((LAN_HOST, 8000 + i)).unwrap())
        })
        .collect();
    let mut before = connect(&world, 8080).unwrap();
    before.write_all(b"E").unwrap();
    assert_eq!(echo(&mut before, b"before"), b"before");

    // 4,400 forged SYNs at each flooded target, under its NAT ports, and
    // 20,000 at the real one, over its ports: 104k connections opened,
    // the table holds 65,536.
    let mut first = 0;
    for i in 1..=FLOODED {
        forged(&world, Forged::Syn, 9000 + i, first, 4_400);
        first += 4_400;
    }
    forged(&world, Forged::Syn, 8080, first, 20_000);

    // A connection made before the flood goes on; a new one gets in.
    assert_eq!(echo(&mut before, b"still here"), b"still here");
    let mut after = connect(&world, 8080).expect("a real connection after the flood");
    after.write_all(b"E").unwrap();
    assert_eq!(echo(&mut after, b"after"), b"after");

    let status = forwards(&world);
    let sum = |field: &str| -> u64 { status.iter().map(|f| f[field].as_u64().unwrap_or(0)).sum() };
    assert!(
        sum("connections") > u64::from(veil_common::MAX_FWD_FLOWS / 2),
        "the flood outgrew the table: {status:?}"
    );
    assert!(
        sum("open") <= u64::from(veil_common::FWD_OPENING_SLOTS) + 2,
        "unassured connections hold at most their places: {status:?}"
    );
    assert!(sum("evicted") > 0, "{status:?}");
}

/// A forged source cannot complete a handshake by acknowledging a SYN-ACK
/// it never saw: before, any ACK did, and 6,000 forged SYN+ACK pairs held
/// every NAT port toward the target as established, for 2 hours.
#[test]
fn forged_acks_do_not_make_forged_connections_established() {
    let (world, _file) = world_with("8080,10.200.9.2,8000\n");
    let _lan = LanServer::start(&world.lan, 8000);
    // More forged sources than the target has NAT ports (4,536).
    forged(&world, Forged::SynThenAck, 8080, 0, 6_000);
    let mut s = connect(&world, 8080).expect("a real connection after the flood");
    s.write_all(b"E").unwrap();
    assert_eq!(echo(&mut s, b"in"), b"in");
}

#[test]
fn forged_udp_sources_leave_room_for_real_ones() {
    let (world, _file) = world_with("5353,10.200.9.2,5300,udp\n");
    // The answers to forged sources leave as a real gateway's would, by its
    // route toward the internet (without one each costs the target's echo
    // milliseconds, and the real question waits behind thousands).
    world
        .gw
        .ip(&["route", "add", "100.64.0.0/10", "via", "198.18.0.2"]);
    let server = world
        .lan
        .enter(|| UdpSocket::bind((LAN_HOST, 5300)).unwrap());
    server
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    // The target answers everything, forged or not.
    let echo = thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while !st.load(Ordering::Relaxed) {
            if let Ok((n, from)) = server.recv_from(&mut buf) {
                let _ = server.send_to(&buf[..n], from);
            }
        }
    });
    // More forged sources than the target has NAT ports (4,536).
    forged(&world, Forged::Udp, 5353, 0, 6_000);
    let answer = world.remote.enter(|| {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        (0..3).find_map(|_| {
            s.send_to(b"real", (PUBLIC, 5353)).unwrap();
            let mut buf = [0u8; 1500];
            let (n, _) = s.recv_from(&mut buf).ok()?;
            Some(buf[..n].to_vec())
        })
    });
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap();
    assert_eq!(
        answer.as_deref(),
        Some(&b"real"[..]),
        "a real source got its answer"
    );
    let status = forwards(&world);
    assert!(status[0]["evicted"].as_u64().unwrap() > 0, "{status:?}");
}

/// A forged RST on a connection's tuple, its sequence number a blind
/// guess, does not make the gateway take the connection for over: a flood
/// of new connections afterwards takes neither its NAT port nor its place
/// (before, the flood took them, and the connection hung).
#[test]
fn a_blind_rst_does_not_end_a_forwarded_connection() {
    let (world, _file) = world_with("8080,10.200.9.2,8000\n");
    let _lan = LanServer::start(&world.lan, 8000);
    let sent = Capture::outgoing(&world.remote, "eth0", libc::ETH_P_IP as u16);
    let mut victim = connect(&world, 8080).unwrap();
    victim
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    victim.write_all(b"E").unwrap();
    assert_eq!(echo(&mut victim, b"hi"), b"hi");
    let port = victim.local_addr().unwrap().port();
    // The victim's sequence number as it left, to guess as far from it as
    // can be: a blind guess lands there as likely as anywhere.
    let seq = sent
        .packets(Duration::from_millis(200))
        .iter()
        .rev()
        .find_map(|ip| {
            let tcp = etherparse::TcpSlice::from_slice(&ip[usize::from(ip[0] & 0xf) * 4..]).ok()?;
            (ip[9] == 6 && tcp.source_port() == port).then(|| tcp.sequence_number())
        })
        .expect("a packet of the victim's");
    let mut rst = Vec::new();
    etherparse::PacketBuilder::ipv4(REMOTE.octets(), PUBLIC.octets(), 64)
        .tcp(port, 8080, seq.wrapping_add(1 << 31), 0)
        .rst()
        .write(&mut rst, &[])
        .unwrap();
    world.remote.enter(|| RawIp::new().send(&rst, PUBLIC));
    forged(&world, Forged::Syn, 8080, 0, 20_000);
    assert_eq!(echo(&mut victim, b"still"), b"still");
}

/// The same from the target's side: an RST forged with the target's
/// address (only the NAT port to guess: one per port of the range, as a
/// blind attacker would), from the internet, where any address can come
/// from. Before, it ended the connection in the gateway's state as the
/// remote's did.
#[test]
fn a_blind_rst_from_the_targets_address_does_not_end_a_forwarded_connection() {
    let (world, _file) = world_with("8080,10.200.9.2,8000\n");
    let _lan = LanServer::start(&world.lan, 8000);
    let sent = Capture::outgoing(&world.remote, "eth0", libc::ETH_P_IP as u16);
    let mut victim = connect(&world, 8080).unwrap();
    victim
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    victim.write_all(b"E").unwrap();
    assert_eq!(echo(&mut victim, b"hi"), b"hi");
    let port = victim.local_addr().unwrap().port();
    // What the remote acknowledged: the target's sequence number.
    let target_seq = sent
        .packets(Duration::from_millis(200))
        .iter()
        .rev()
        .find_map(|ip| {
            let tcp = etherparse::TcpSlice::from_slice(&ip[usize::from(ip[0] & 0xf) * 4..]).ok()?;
            (ip[9] == 6 && tcp.source_port() == port && tcp.ack())
                .then(|| tcp.acknowledgment_number())
        })
        .expect("a packet of the victim's");
    world.remote.enter(|| {
        let raw = RawIp::new();
        let nat = veil_user::flows::PortRange::DEFAULT;
        for nat_port in nat.min..=nat.max {
            let mut rst = Vec::new();
            etherparse::PacketBuilder::ipv4(LAN_HOST.octets(), GW_LAN.octets(), 64)
                .tcp(8000, nat_port, target_seq.wrapping_add(1 << 31), 0)
                .rst()
                .write(&mut rst, &[])
                .unwrap();
            raw.send(&rst, PUBLIC);
            if nat_port % 64 == 0 {
                thread::sleep(Duration::from_micros(100));
            }
        }
    });
    forged(&world, Forged::Syn, 8080, 0, 20_000);
    assert_eq!(echo(&mut victim, b"still"), b"still");
}

#[test]
fn a_half_closed_connection_still_gets_its_reply() {
    let (world, _file) = world_with("8080,10.200.9.2,8000\n");
    let _lan = LanServer::start(&world.lan, 8000);
    let payload = b"after my FIN, your answer".to_vec();
    assert_eq!(upload(&world, 8080, &payload), sha256(&payload));
}

#[test]
fn udp_is_forwarded_both_ways() {
    let (world, _file) = world_with("5353,10.200.9.2,5300,udp\n");
    let server = world
        .lan
        .enter(|| UdpSocket::bind((LAN_HOST, 5300)).unwrap());
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let echo = thread::spawn(move || {
        let mut buf = [0u8; 1500];
        let (n, from) = server.recv_from(&mut buf).unwrap();
        server.send_to(&buf[..n], from).unwrap();
        from
    });
    let answer = world.remote.enter(|| {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.send_to(b"ping", (PUBLIC, 5353)).unwrap();
        let mut buf = [0u8; 1500];
        let (n, from) = s.recv_from(&mut buf).unwrap();
        (buf[..n].to_vec(), from)
    });
    assert_eq!(answer.0, b"ping");
    assert_eq!(answer.1, SocketAddr::from((PUBLIC, 5353)));
    assert_eq!(echo.join().unwrap().ip(), std::net::IpAddr::V4(GW_LAN));
}

#[test]
fn a_reload_keeps_a_running_transfer_and_a_removed_rule_takes_no_new_connection() {
    let (mut world, file) = world_with("8080,10.200.9.2,8000\n9090,10.200.9.2,8000\n");
    let _lan = LanServer::start(&world.lan, 8000);

    // A transfer in progress on 8080, read slowly.
    let mut s = connect(&world, 8080).unwrap();
    s.write_all(b"D").unwrap();
    let mut got = vec![0u8; 1 << 20];
    s.read_exact(&mut got).unwrap();

    // 9090 removed, a comment added: 8080 unchanged. Reloaded on SIGHUP.
    std::fs::write(&file, "# edited\n8080,10.200.9.2,8000\n").unwrap();
    world.gateway().signal(libc::SIGHUP);
    world
        .gateway()
        .wait_for_log("1 removed, 1 unchanged", Duration::from_secs(5));

    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    got.extend_from_slice(&rest);
    assert_eq!(sha256(&got), sha256(&data(BIG, 1)), "the transfer went on");

    // No new connection on the removed rule: 9090 is the gateway's again,
    // which has nothing there.
    assert!(connect(&world, 9090).is_err());
    // And a change of the file alone is noticed.
    std::fs::write(&file, "8080,10.200.9.2,8000\n9191,10.200.9.2,8000\n").unwrap();
    world.gateway().wait_for_log(
        "1 added, 0 changed, 0 removed, 1 unchanged",
        Duration::from_secs(5),
    );
    let mut s = connect(&world, 9191).unwrap();
    s.write_all(b"Eok").unwrap();
    let mut buf = [0u8; 2];
    s.read_exact(&mut buf).unwrap();
}

/// Waits until the gateway has loaded the rule file `times` times.
fn loaded(world: &mut World, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while world
        .gateway()
        .log()
        .matches("forward rules loaded")
        .count()
        < times
    {
        assert!(Instant::now() < deadline, "{}", world.gateway().log());
        thread::sleep(Duration::from_millis(50));
    }
}

/// A connection from a fixed source port on the remote: the 5-tuple of
/// the one before it.
fn connect_from(world: &World, source_port: u16, port: u16) -> std::io::Result<TcpStream> {
    world.remote.enter(|| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, source_port)).into())?;
        s.connect_timeout(
            &SocketAddr::from((PUBLIC, port)).into(),
            Duration::from_secs(3),
        )?;
        Ok(s.into())
    })
}

/// A connection to port 8080 from `source_port` that echoed a byte; reset
/// when dropped (no TIME_WAIT on our side: the port may be used again at
/// once).
fn echoing_from(world: &World, source_port: u16) -> std::io::Result<TcpStream> {
    let mut s = connect_from(world, source_port, 8080)?;
    s.write_all(b"E")?;
    assert_eq!(echo(&mut s, b"x"), b"x");
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
    Ok(s)
}

#[test]
fn a_removed_rule_takes_no_new_connection_on_the_tuple_of_an_old_one() {
    let (mut world, file) = world_with("8080,10.200.9.2,8000\n");
    let lan = LanServer::start(&world.lan, 8000);
    drop(echoing_from(&world, 40404).unwrap());

    std::fs::write(&file, "# no rules\n").unwrap();
    world.gateway().signal(libc::SIGHUP);
    world
        .gateway()
        .wait_for_log("1 removed", Duration::from_secs(5));
    assert!(
        echoing_from(&world, 40404).is_err(),
        "the old connection's entries opened a new one"
    );
    assert_eq!(lan.seen().len(), 1, "{:?}", lan.seen());

    // A rule changed to another target: the same tuple goes there.
    let other = LanServer::start(&world.lan, 8001);
    std::fs::write(&file, "8080,10.200.9.2,8001\n").unwrap();
    loaded(&mut world, 3);
    drop(echoing_from(&world, 40405).unwrap());
    std::fs::write(&file, "8080,10.200.9.2,8000\n").unwrap();
    loaded(&mut world, 4);
    echoing_from(&world, 40405).unwrap();
    assert_eq!((lan.seen().len(), other.seen().len()), (2, 1));
}

/// A connection from `from` (an address of the remote namespace) to port
/// 8080 that echoed a byte; `Err` if its handshake got no answer.
fn echoing_source(world: &World, from: Ipv4Addr) -> std::io::Result<TcpStream> {
    let mut s = world.remote.enter(|| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.bind(&SocketAddr::from((from, 0)).into())?;
        s.connect_timeout(
            &SocketAddr::from((PUBLIC, 8080)).into(),
            Duration::from_millis(1500),
        )?;
        std::io::Result::Ok(TcpStream::from(s))
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"E")?;
    assert_eq!(echo(&mut s, b"x"), b"x");
    Ok(s)
}

/// Retries `connect` until it succeeds or `within` is over: a connection
/// just ended frees its place when its last packet has gone through.
fn connects_within(
    within: Duration,
    connect: impl Fn() -> std::io::Result<TcpStream>,
) -> Option<TcpStream> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Ok(s) = connect() {
            return Some(s);
        }
    }
    None
}

/// One host on the internet cannot take a rule's NAT ports from everyone
/// else: an address holds `--max-forward-per-source` connections at most,
/// its next SYNs are dropped and counted, another address still gets in,
/// and a connection that ends (reset, or closed both ways) gives its
/// place back at once, not at the next expiry (10 s).
#[test]
fn one_remote_address_holds_at_most_its_share_of_forwarded_connections() {
    const SECOND: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
    let (world, _file) = world_of(
        0,
        "8080,10.200.9.2,8000\n",
        &["--max-forward-per-source", "3"],
    );
    let _lan = LanServer::start(&world.lan, 8000);
    world
        .remote
        .ip(&["addr", "add", "198.18.0.3/24", "dev", "eth0"]);

    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| echoing_source(&world, REMOTE).expect("within its share"))
        .collect();
    let err = echoing_source(&world, REMOTE).expect_err("a fourth from the same address");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "dropped: {err}");
    let busy = world.status()["datapath"]["fwd_drop_source_busy"]["packets"]
        .as_u64()
        .unwrap();
    assert!(busy >= 1, "counted");
    let mut other = echoing_source(&world, SECOND).expect("another address gets in");
    assert_eq!(echo(&mut other, b"y"), b"y");

    // Reset: the place is free once the RST went through.
    let reset = held.pop().unwrap();
    socket2::SockRef::from(&reset)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(reset);
    let again = connects_within(Duration::from_secs(3), || echoing_source(&world, REMOTE))
        .expect("a reset connection's place is taken again at once");
    held.push(again);

    // Closed both ways: the server answers the FIN with its own.
    let mut closed = held.pop().unwrap();
    closed.shutdown(Shutdown::Write).unwrap();
    assert_eq!(closed.read(&mut [0; 1]).unwrap(), 0, "closed by the server");
    let again = connects_within(Duration::from_secs(3), || echoing_source(&world, REMOTE))
        .expect("a closed connection's place is taken again at once");
    held.push(again);

    // Those held are still served.
    for s in &mut held {
        assert_eq!(echo(s, b"z"), b"z");
    }
}

/// A connection that ends where the datapath does not see it (expiry,
/// here) gives its place back at the daemon's next expiry (every 10 s),
/// which sets each address's count to what the table holds.
#[test]
fn an_address_gets_its_places_back_when_its_connections_expire() {
    let (world, _file) = world_of(
        0,
        "8080,10.200.9.2,8000\n",
        &[
            "--max-forward-per-source",
            "2",
            "--timeout-tcp-established",
            "1",
        ],
    );
    let _lan = LanServer::start(&world.lan, 8000);
    let _idle: Vec<TcpStream> = (0..2)
        .map(|_| echoing_source(&world, REMOTE).expect("within its share"))
        .collect();
    echoing_source(&world, REMOTE).expect_err("a third, at once");
    connects_within(Duration::from_secs(15), || echoing_source(&world, REMOTE))
        .expect("a third, once the idle two expired");
}

/// Makes the remote drop TCP to `addr` on `ports` (`2000`, `2000-2019`)
/// without a word, as a NAT or a firewall in front of an address's owner
/// does with what it did not ask for: the target's SYN-ACKs to forged
/// connections then draw no RST that would end them.
fn silent(world: &World, addr: &str, ports: &str) {
    for args in [
        &["add", "table", "ip", "silent"][..],
        &[
            "add",
            "chain",
            "ip",
            "silent",
            "in",
            "{ type filter hook input priority 0 ; }",
        ],
        &[
            "add", "rule", "ip", "silent", "in", "ip", "daddr", addr, "tcp", "dport", ports, "drop",
        ],
    ] {
        world.remote.exec("nft", args);
    }
}

/// SYNs with a forged source address do not use up that address's share:
/// a connection counts once its handshake is over, which a forged source
/// never gets to. (Counted from the SYN, 20 forged SYNs would lock the
/// address out for the 4 minutes a half-open connection lives, the
/// target's SYN-ACKs going nowhere.)
#[test]
fn forged_syns_do_not_use_up_an_addresss_share() {
    const VICTIM: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 77);
    let (world, _file) = world_of(
        0,
        "8080,10.200.9.2,8000\n",
        &["--max-forward-per-source", "3"],
    );
    let _lan = LanServer::start(&world.lan, 8000);
    silent(&world, "198.18.0.77", "2000-2019");
    // Nobody has the address yet: the target's SYN-ACKs find no one.
    world.remote.enter(|| {
        let raw = RawIp::new();
        for sport in 2000..2020 {
            let syn = ip_of(&frame(VICTIM, PUBLIC, 64, L4::tcp(sport, 8080, "S", &[]))).to_vec();
            raw.send(&syn, PUBLIC);
        }
    });
    thread::sleep(Duration::from_millis(300));
    world
        .remote
        .ip(&["addr", "add", "198.18.0.77/24", "dev", "eth0"]);
    world.gw.ip(&["neigh", "flush", "198.18.0.77"]);
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| {
            connects_within(Duration::from_secs(5), || echoing_source(&world, VICTIM))
                .expect("the address's owner gets its share")
        })
        .collect();
    for s in &mut held {
        assert_eq!(echo(s, b"mine"), b"mine");
    }
}

/// A handshake ACK counts only if it acknowledges the target's SYN-ACK
/// whole, all 32 bits: here a forger who knows the low 16 (as a blind
/// one guesses them one time in 32,768) completes no handshake, and its
/// address's share of 1 is still there for its owner. (With the 16-bit
/// mark alone, the test fails.)
#[test]
fn an_ack_right_in_its_low_16_bits_alone_completes_no_handshake() {
    const VICTIM: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 77);
    let (world, _file) = world_of(
        0,
        "8080,10.200.9.2,8000\n",
        &["--max-forward-per-source", "1"],
    );
    let _lan = LanServer::start(&world.lan, 8000);
    let target_side = Capture::outgoing(&world.lan, "eth0", libc::ETH_P_IP as u16);
    let raw = world.remote.enter(RawIp::new);
    let packet = |flags, ack| {
        ip_of(&frame(
            VICTIM,
            PUBLIC,
            64,
            L4::tcp_numbered(2000, 8080, flags, 1000, ack),
        ))
        .to_vec()
    };
    silent(&world, "198.18.0.77", "2000");
    raw.send(&packet("S", 0), PUBLIC);
    let syn_ack = target_side
        .packets(Duration::from_millis(500))
        .into_iter()
        .find(|p| p.len() >= 40 && p[9] == 6 && p[20 + 13] & 0x12 == 0x12)
        .expect("the target's SYN-ACK");
    let next = u32::from_be_bytes(syn_ack[24..28].try_into().unwrap()).wrapping_add(1);
    let mut guess = packet("A", next ^ 0x8000_0000);
    // A wrong checksum: the target drops it without a word, as a blind
    // sender's guesses would be dropped.
    guess[20 + 16] ^= 0xff;
    raw.send(&guess, PUBLIC);
    thread::sleep(Duration::from_millis(200));

    world
        .remote
        .ip(&["addr", "add", "198.18.0.77/24", "dev", "eth0"]);
    world.gw.ip(&["neigh", "flush", "198.18.0.77"]);
    let mut s = connects_within(Duration::from_secs(5), || echoing_source(&world, VICTIM))
        .expect("the owner gets the address's one place");
    assert_eq!(echo(&mut s, b"mine"), b"mine");
}

#[test]
fn the_nat_range_still_drops_unsolicited_packets() {
    let (world, _file) = world_with("8080,10.200.9.2,8000\n");
    let _lan = LanServer::start(&world.lan, 8000);
    // A connection makes a NAT port; nothing else may use the range.
    let mut s = connect(&world, 8080).unwrap();
    s.write_all(b"Ex").unwrap();
    let started = Instant::now();
    let err = connect(&world, 61000).unwrap_err();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::TimedOut,
        "dropped, not refused: {err}"
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    let dropped = world.status()["datapath"]["drop_no_ingress_flow"]["packets"]
        .as_u64()
        .unwrap();
    assert!(dropped >= 1);
}

#[test]
fn a_rule_may_not_open_the_gateway_itself() {
    let (mut world, file) =
        world_with("2222,10.200.9.1,22\n2223,127.0.0.1,22\n443,10.200.9.2,8000\n");
    world.gateway().wait_for_log(
        &format!(
            "{}:3: listen port 443 (tcp) is in use on the gateway",
            file.display()
        ),
        Duration::from_secs(5),
    );
    let problems = world.status()["forward_problems"].clone();
    let problems: Vec<&str> = problems
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(problems[0].contains(":1: target 10.200.9.1 is the gateway itself"));
    assert!(problems[1].contains(":2: target 127.0.0.1 is the gateway itself"));
    assert!(forwards(&world).is_empty());
}

#[test]
fn a_rule_to_a_client_by_name_reaches_that_service_and_no_other() {
    let (mut world, file) = world_of(1, "7070,client:alpha,7000\n", &[]);
    // alpha has never connected: no address yet, the rule waits.
    world.gateway().wait_for_log(
        &format!("{}:1: client `alpha` has no address yet", file.display()),
        Duration::from_secs(5),
    );
    let profile = world.add_client("alpha", 1);
    let _client = world.start_client(1, &profile, true);
    world.gateway().wait_for_log(
        "1 added, 0 changed, 0 removed, 0 unchanged, 0 skipped",
        Duration::from_secs(5),
    );

    // A service on the client (all its addresses), and one that no rule names.
    let (service, other) = world.client(1).enter(|| {
        (
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, 7000)).unwrap(),
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, 7001)).unwrap(),
        )
    });
    let served = thread::spawn(move || {
        let (mut s, from) = service.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
        from
    });
    let mut s = connect(&world, 7070).expect("the client's service through the gateway");
    s.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    let from = served.join().unwrap();
    assert_eq!(
        from.ip(),
        std::net::IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1)),
        "the client sees the gateway's address inside the tunnel, not the remote's"
    );

    // The client's other ports stay closed: nothing reaches 7001.
    other.set_nonblocking(true).unwrap();
    assert!(connect(&world, 7001).is_err());
    thread::sleep(Duration::from_millis(200));
    assert!(
        other.accept().is_err(),
        "no connection reached the port no rule names"
    );
    let f = &forwards(&world)[0];
    assert_eq!(f["target"], "client:alpha:7000");
    assert_eq!(f["connections"], 1, "{f}");
}

/// A client's quota holds for what it serves through a rule, as for its
/// own traffic: a download from its service stops where the quota ends.
#[test]
fn a_clients_quota_holds_for_what_it_serves_through_a_rule() {
    let (mut world, _file) = world_of(
        1,
        "7070,client:alpha,7000\n",
        &["--quota", "256KiB", "--quota-period", "3600"],
    );
    let profile = world.add_client("alpha", 1);
    let _client = world.start_client(1, &profile, true);
    world.gateway().wait_for_log(
        "1 added, 0 changed, 0 removed, 0 unchanged, 0 skipped",
        Duration::from_secs(5),
    );
    let service = world
        .client(1)
        .enter(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, 7000)).unwrap());
    let served = thread::spawn(move || {
        let (mut s, _) = service.accept().unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&vec![7u8; 2 << 20]);
    });
    let mut s = connect(&world, 7070).expect("the client's service through the gateway");
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        got.len() < 256 << 10,
        "{} bytes through a 256 KiB quota",
        got.len()
    );
    served.join().unwrap();
    let status = world.status();
    let c = &status["clients"][0];
    assert_eq!(c["quota_used"], 256 << 10, "{c}");
    assert!(c["quota_dropped"].as_u64().unwrap() > 0, "{c}");
}

// ---- the translation itself, under BPF_PROG_TEST_RUN ----

mod bpf {
    use veil_common::{proto, FwdRule, Reason, PROG_FWD_TC};
    use veil_tests::{
        bed::*,
        packet::{assert_checksums, edit_ip, frame, icmp_error, ip_of, ETH_LEN, L4},
    };
    use veil_user::{
        forward::{Forwarder, Resolved, Rule, Target},
        Timeouts,
    };

    use super::{Ipv4Addr, GW_LAN, LAN_HOST};

    const TARGET: Ipv4Addr = LAN_HOST;
    const TARGET_IF: u32 = 77;
    const REMOTE2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);

    /// A bed forwarding TCP and UDP 8080 of the public address to the
    /// target's 8000.
    fn bed() -> (Bed, Forwarder) {
        let mut bed = Bed::new();
        let fwd = rules(&mut bed);
        (bed, fwd)
    }

    /// The two rules of [`bed`] on `bed`.
    fn rules(bed: &mut Bed) -> Forwarder {
        let mut fwd = bed.dp.forwarder(Timeouts::default()).unwrap();
        let rule = |proto| Resolved {
            rule: Rule {
                line: 1,
                proto,
                listen_port: 8080,
                target: Target::Host(TARGET.to_string()),
                target_port: 8000,
            },
            value: FwdRule {
                target_addr: TARGET.octets(),
                snat_addr: GW_LAN.octets(),
                ifindex: TARGET_IF,
                target_port: 8000,
                _pad: [0; 2],
            },
        };
        fwd.apply(vec![rule(proto::TCP), rule(proto::UDP)]).unwrap();
        fwd
    }

    /// [`bed`] with the one NAT port 61000: every new connection toward
    /// the target wants the port of the one before.
    fn one_port_bed() -> (Bed, Forwarder) {
        let mut bed = Bed::with_ports(veil_user::flows::PortRange {
            min: 61000,
            max: 61000,
        });
        let fwd = rules(&mut bed);
        (bed, fwd)
    }

    fn from_target(bed: &mut Bed, input: &[u8]) -> (i32, Vec<u8>) {
        let prog: &mut aya::programs::SchedClassifier = bed.dp.program(PROG_FWD_TC).unwrap();
        let (rc, out) = run(prog, input);
        (rc as i32, out)
    }

    /// The NAT port a translated frame leaves from.
    fn src_port(frame: &[u8]) -> u16 {
        u16::from_be_bytes([frame[ETH_LEN + 20], frame[ETH_LEN + 21]])
    }

    /// A client's answer on a connection a `client:NAME` rule made comes
    /// from the TUN device; the same packet arriving on the WAN (a forged
    /// client address from a host on the link) is dropped as spoofed, not
    /// sent on to the remote as the client's.
    #[test]
    fn a_clients_answer_forged_on_the_wan_is_dropped() {
        let mut bed = Bed::new();
        let mut fwd = bed.dp.forwarder(Timeouts::default()).unwrap();
        let inner = Ipv4Addr::new(10, 77, 0, 1);
        fwd.apply(vec![Resolved {
            rule: Rule {
                line: 1,
                proto: proto::UDP,
                listen_port: 7070,
                target: Target::Client("alpha".into()),
                target_port: 7000,
            },
            value: FwdRule {
                target_addr: CLIENT.octets(),
                snat_addr: inner.octets(),
                ifindex: 4343,
                target_port: 7000,
                _pad: [0; 2],
            },
        }])
        .unwrap();
        let wan = bed.wan(&frame(REMOTE, PUBLIC, 64, L4::udp(5000, 7070, b"hi")));
        assert_eq!(wan.tc, Some(TC_ACT_REDIRECT), "into the client's tunnel");
        let nat = src_port(&wan.out);

        let forged = frame(CLIENT, inner, 64, L4::udp(7000, nat, b"as alpha"));
        let wan = bed.wan(&forged);
        assert_eq!(wan.xdp, XDP_DROP, "{:?}", wan.tc);
        assert_eq!(bed.count(Reason::DropSpoofedVip), 1);
        // TC alone (`--wan-filter tc` checks there) lets it go no further.
        assert_ne!(bed.wan_tc(&forged).0, TC_ACT_REDIRECT);
    }

    #[test]
    fn a_syn_opens_a_connection_translated_both_ways() {
        let (mut bed, fwd) = bed();
        let syn = frame(REMOTE, PUBLIC, 64, L4::tcp(40000, 8080, "S", b""));

        let wan = bed.wan(&syn);
        assert_eq!(wan.xdp, XDP_PASS);
        assert_eq!(wan.tc, Some(TC_ACT_REDIRECT), "sent toward the target");
        let nat = src_port(&wan.out);
        assert!(PORTS.contains(nat), "NAT port {nat} from the range");
        assert_eq!(
            wan.out,
            frame(GW_LAN, TARGET, 63, L4::tcp(nat, 8000, "S", b"")),
            "both addresses and ports rewritten, TTL - 1, all else intact"
        );
        assert_checksums(ip_of(&wan.out));

        let synack = frame(TARGET, GW_LAN, 64, L4::tcp(8000, nat, "SA", b"hi"));
        let (action, out) = from_target(&mut bed, &synack);
        assert_eq!(action, TC_ACT_REDIRECT);
        assert_eq!(
            out,
            frame(PUBLIC, REMOTE, 63, L4::tcp(8080, 40000, "SA", b"hi"))
        );
        assert_checksums(ip_of(&out));

        // The same connection's next packet reuses its entries.
        let ack = frame(REMOTE, PUBLIC, 64, L4::tcp(40000, 8080, "A", b"x"));
        assert_eq!(
            bed.wan_tc(&ack).1,
            frame(GW_LAN, TARGET, 63, L4::tcp(nat, 8000, "A", b"x"))
        );
        assert_eq!(bed.count(Reason::FwdForwarded), 3);
        let status = fwd.status();
        let tcp = status.iter().find(|r| r.rule == "tcp/8080").unwrap();
        assert_eq!(tcp.counters.connections, 1);
        assert_eq!(tcp.counters.packets, 3);
        assert_eq!(tcp.open, 1);
    }

    #[test]
    fn udp_opens_on_any_datagram_and_a_zero_checksum_stays_zero() {
        let (mut bed, _fwd) = bed();
        let mut dgram = frame(REMOTE, PUBLIC, 64, L4::udp(5000, 8080, b"query"));
        // No UDP checksum.
        dgram[ETH_LEN + 26..ETH_LEN + 28].copy_from_slice(&[0, 0]);
        let wan = bed.wan(&dgram);
        assert_eq!(wan.tc, Some(TC_ACT_REDIRECT));
        let nat = src_port(&wan.out);
        let mut expected = frame(GW_LAN, TARGET, 63, L4::udp(nat, 8000, b"query"));
        expected[ETH_LEN + 26..ETH_LEN + 28].copy_from_slice(&[0, 0]);
        assert_eq!(wan.out, expected);
    }

    #[test]
    fn a_tcp_packet_of_no_connection_is_dropped_and_other_ports_are_the_hosts() {
        let (mut bed, _fwd) = bed();
        let stray = frame(REMOTE, PUBLIC, 64, L4::tcp(40000, 8080, "A", b""));
        assert_eq!(bed.wan(&stray).tc, Some(TC_ACT_SHOT));
        assert_eq!(bed.count(Reason::FwdDropNoFlow), 1);

        let ssh = frame(REMOTE, PUBLIC, 64, L4::tcp(40000, 22, "S", b""));
        let wan = bed.wan(&ssh);
        assert!(wan.passed_untouched(&ssh), "not a forwarded port");

        // The target's side: what is not a forwarded connection's passes.
        let other = frame(TARGET, GW_LAN, 64, L4::tcp(8000, 61000, "SA", b""));
        let (action, out) = from_target(&mut bed, &other);
        assert_eq!((action, out), (TC_ACT_OK, other));
    }

    #[test]
    fn an_icmp_error_from_the_target_reaches_the_remote_about_its_own_packet() {
        let (mut bed, _fwd) = bed();
        let dgram = frame(REMOTE, PUBLIC, 64, L4::udp(5000, 8080, b"query"));
        let sent = bed.wan(&dgram).out;
        let nat = src_port(&sent);

        // Port unreachable from the target, quoting what the gateway sent.
        let error = icmp_error(TARGET, GW_LAN, 3, 3, [0; 4], ip_of(&sent));
        let (action, out) = from_target(&mut bed, &error);
        assert_eq!(action, TC_ACT_REDIRECT);
        // About the remote's own datagram as the gateway got it (its TTL
        // one less: the quote is of what the gateway sent), from the
        // address it was sent to.
        let original = frame(REMOTE, PUBLIC, 63, L4::udp(5000, 8080, b"query"));
        let mut expected = icmp_error(PUBLIC, REMOTE, 3, 3, [0; 4], ip_of(&original));
        edit_ip(&mut expected, |f| f[ETH_LEN + 8] = 63);
        assert_eq!(out, expected, "NAT port {nat}");
        assert_checksums(ip_of(&out));
    }

    /// A UDP connection not yet assured (a lookup and its answer) keeps its
    /// NAT port while its target may still answer on it: a newer
    /// connection that took the port would get those answers (the target
    /// sends to the same NAT port either way). Once it has been idle a
    /// second, the port goes to whoever comes next.
    #[test]
    fn a_udp_connection_still_answered_keeps_its_port_from_newer_ones() {
        let (mut bed, fwd) = one_port_bed();
        let query = frame(REMOTE, PUBLIC, 64, L4::udp(5000, 8080, b"query"));
        let nat = src_port(&bed.wan(&query).out);
        let answer = frame(TARGET, GW_LAN, 64, L4::udp(8000, nat, b"answer"));
        assert_eq!(from_target(&mut bed, &answer).0, TC_ACT_REDIRECT);

        let other = frame(REMOTE2, PUBLIC, 64, L4::udp(6000, 8080, b"mine now?"));
        assert_eq!(bed.wan(&other).tc, Some(TC_ACT_SHOT), "no port for it yet");
        assert_eq!(bed.count(Reason::FwdDropNoRoom), 1);
        let late = frame(TARGET, GW_LAN, 64, L4::udp(8000, nat, b"more"));
        let (action, out) = from_target(&mut bed, &late);
        assert_eq!(action, TC_ACT_REDIRECT);
        assert_eq!(
            out,
            frame(PUBLIC, REMOTE, 63, L4::udp(8080, 5000, b"more")),
            "the target's answer reaches the remote that asked, no other"
        );

        std::thread::sleep(std::time::Duration::from_millis(1100));
        let wan = bed.wan(&other);
        assert_eq!(wan.tc, Some(TC_ACT_REDIRECT), "idle a second: taken");
        assert_eq!(src_port(&wan.out), nat);
        let (_, out) = from_target(&mut bed, &late);
        assert_eq!(
            out,
            frame(PUBLIC, REMOTE2, 63, L4::udp(8080, 6000, b"more"))
        );
        let status = fwd.status();
        let udp = status.iter().find(|r| r.rule == "udp/8080").unwrap();
        assert_eq!(udp.counters.evicted, 1);
    }

    /// One SYN with a remote's address and port, which anyone can send,
    /// does not start a half-closed connection's entries again: it stays
    /// established (and keeps its NAT port from newer connections), where
    /// before its state was wiped and the port went to the next comer.
    #[test]
    fn a_syn_on_a_half_closed_connection_does_not_reopen_it() {
        let (mut bed, _fwd) = one_port_bed();
        let nat = handshake(&mut bed, 40000, 1000, 5000);
        let fin = frame(
            REMOTE,
            PUBLIC,
            64,
            L4::tcp_numbered(40000, 8080, "FA", 1001, 5001),
        );
        assert_eq!(bed.wan_tc(&fin).0, TC_ACT_REDIRECT);
        let forged = frame(
            REMOTE,
            PUBLIC,
            64,
            L4::tcp_numbered(40000, 8080, "S", 777, 0),
        );
        bed.wan_tc(&forged);

        let other = frame(REMOTE2, PUBLIC, 64, L4::tcp(41000, 8080, "S", b""));
        assert_eq!(
            bed.wan(&other).tc,
            Some(TC_ACT_SHOT),
            "the port stays taken"
        );
        let data = frame(
            TARGET,
            GW_LAN,
            64,
            L4::tcp_numbered(8000, nat, "PA", 5001, 1002),
        );
        let (action, out) = from_target(&mut bed, &data);
        assert_eq!(action, TC_ACT_REDIRECT);
        assert_eq!(
            &out[ETH_LEN + 16..ETH_LEN + 20],
            &REMOTE.octets(),
            "to its own remote"
        );
    }

    /// A remote at its share (`--max-forward-per-source`) whose second
    /// handshake completes (both SYNs let in before either ACK) is held at
    /// its ACK: the target, which has not seen it, sends nothing but its
    /// SYN-ACK, so the connection's port can go to a newer one without
    /// the target's data following it. When the first connection ends,
    /// the held one's next ACK completes it.
    #[test]
    fn a_handshake_over_its_remotes_share_waits_at_its_ack() {
        let (mut bed, _fwd) = bed();
        bed.forward_per_source(1);
        let syn = |port, seq| {
            frame(
                REMOTE,
                PUBLIC,
                64,
                L4::tcp_numbered(port, 8080, "S", seq, 0),
            )
        };
        let first = src_port(&bed.wan(&syn(40000, 1000)).out);
        let second = src_port(&bed.wan(&syn(40001, 2000)).out);
        for (nat, port, isn, seq) in [(first, 40000, 1000, 5000), (second, 40001, 2000, 6000)] {
            let synack = frame(
                TARGET,
                GW_LAN,
                64,
                L4::tcp_numbered(8000, nat, "SA", seq, isn + 1),
            );
            assert_eq!(from_target(&mut bed, &synack).0, TC_ACT_REDIRECT, "{port}");
        }
        let ack = |port, seq, ack| {
            frame(
                REMOTE,
                PUBLIC,
                64,
                L4::tcp_numbered(port, 8080, "A", seq, ack),
            )
        };
        assert_eq!(bed.wan_tc(&ack(40000, 1001, 5001)).0, TC_ACT_REDIRECT);
        let held = ack(40001, 2001, 6001);
        assert_eq!(bed.wan_tc(&held).0, TC_ACT_SHOT, "over the share: held");
        assert_eq!(bed.count(Reason::FwdDropSourceBusy), 1);

        let rst = frame(
            REMOTE,
            PUBLIC,
            64,
            L4::tcp_numbered(40000, 8080, "R", 1001, 0),
        );
        assert_eq!(bed.wan_tc(&rst).0, TC_ACT_REDIRECT);
        let (action, out) = bed.wan_tc(&held);
        assert_eq!(action, TC_ACT_REDIRECT, "a place again: completed");
        assert_eq!(
            out,
            frame(
                GW_LAN,
                TARGET,
                63,
                L4::tcp_numbered(second, 8000, "A", 2001, 6001)
            )
        );
    }

    /// A whole handshake from REMOTE's `port` (its ISN `isn`, the target's
    /// `seq`): the NAT port.
    fn handshake(bed: &mut Bed, port: u16, isn: u32, seq: u32) -> u16 {
        let syn = frame(
            REMOTE,
            PUBLIC,
            64,
            L4::tcp_numbered(port, 8080, "S", isn, 0),
        );
        let nat = src_port(&bed.wan(&syn).out);
        let synack = frame(
            TARGET,
            GW_LAN,
            64,
            L4::tcp_numbered(8000, nat, "SA", seq, isn + 1),
        );
        assert_eq!(from_target(bed, &synack).0, TC_ACT_REDIRECT);
        let ack = frame(
            REMOTE,
            PUBLIC,
            64,
            L4::tcp_numbered(port, 8080, "A", isn + 1, seq + 1),
        );
        assert_eq!(bed.wan_tc(&ack).0, TC_ACT_REDIRECT);
        nat
    }
}
