//! The client leaks nothing: the real `veil-client` in a namespace (see
//! `veil_tests::world`), and what actually leaves its uplink, captured
//! below the firewall with an `AF_PACKET` socket.

use std::{
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use veil_tests::{
    netns::NetNs,
    proc::workspace_bin,
    raw::Capture,
    wait_until,
    world::{ip_out, World, LAN_HOST, PUBLIC, REMOTE},
};

/// The gateway's address on client 1's link, and the tunnel's port.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
const ENDPOINT_PORT: u16 = 443;
const ETH_P_ALL: u16 = libc::ETH_P_ALL as u16;
const ETH_P_IP: u16 = libc::ETH_P_IP as u16;
const ETH_P_ARP: u16 = libc::ETH_P_ARP as u16;
const ETH_P_IPV6: u16 = libc::ETH_P_IPV6 as u16;

/// Runs `cmd args` in `ns`, whatever its exit status.
fn exec(ns: &NetNs, cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", ns.name()))
        .arg(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `veil-client ARGS` in client 1's namespace, to its end.
fn veil_client(world: &World, args: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", world.client(1).name()))
        .arg(workspace_bin("veil-client"))
        .args(args)
        .output()
        .expect("running veil-client")
}

/// Everything veil-client may change in a namespace: the firewall, the
/// routing rules, every routing table.
fn network_state(ns: &NetNs) -> String {
    // A new link's IPv6 address joins the local table only after duplicate
    // address detection: the snapshot waits for it, or a comparison would
    // catch the kernel at work rather than the client.
    wait_until("IPv6 addresses to settle", Duration::from_secs(10), || {
        !ip_out(ns, &["-6", "addr"]).contains("tentative")
    });
    format!(
        "{}\n--- rules\n{}\n--- routes\n{}{}",
        stdout(&exec(ns, "nft", &["list", "ruleset"])),
        ip_out(ns, &["rule"]),
        ip_out(ns, &["route", "show", "table", "all"]),
        ip_out(ns, &["-6", "route", "show", "table", "all"]),
    )
}

fn veil_table(ns: &NetNs) -> Option<String> {
    let out = exec(ns, "nft", &["list", "table", "inet", "veil"]);
    out.status.success().then(|| stdout(&out))
}

/// One quick ICMP echo: did an answer come back?
fn ping(ns: &NetNs, dst: &str) -> bool {
    exec(ns, "ping", &["-c", "1", "-W", "1", dst])
        .status
        .success()
}

/// What a leaking application would try: UDP, TCP and ICMP to the
/// remote, the LAN host and the gateway's other ports.
fn try_everything(ns: &NetNs) {
    for dst in [REMOTE, LAN_HOST, GATEWAY] {
        ns.enter(|| {
            if let Ok(s) = UdpSocket::bind("0.0.0.0:0") {
                let _ = s.send_to(b"leak?", (dst, 7));
                let _ = s.send_to(b"leak?", (dst, 53));
            }
            for port in [80, 22] {
                let _ = TcpStream::connect_timeout(&(dst, port).into(), Duration::from_millis(500));
            }
        });
        ping(ns, &dst.to_string());
    }
}

/// Describes each captured frame that is neither ARP nor the tunnel's own
/// connection (TCP from the client to the gateway's endpoint).
fn leaks(frames: &[(u16, Vec<u8>)]) -> Vec<String> {
    frames
        .iter()
        .filter(|(ethertype, p)| !(*ethertype == ETH_P_ARP || is_tunnel(*ethertype, p)))
        .map(|(ethertype, p)| match *ethertype {
            ETH_P_IP if p.len() >= 20 => format!(
                "IPv4 proto {} {} -> {}",
                p[9],
                Ipv4Addr::new(p[12], p[13], p[14], p[15]),
                Ipv4Addr::new(p[16], p[17], p[18], p[19])
            ),
            _ => format!("ethertype {ethertype:#06x}, {} bytes", p.len()),
        })
        .collect()
}

fn is_tunnel(ethertype: u16, p: &[u8]) -> bool {
    if ethertype != ETH_P_IP || p.len() < 20 {
        return false;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    // TCP (TLS) or UDP (HTTP/3) to the endpoint's port.
    matches!(p[9], 6 | 17)
        && dst == GATEWAY
        && p.len() >= ihl + 4
        && u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]) == ENDPOINT_PORT
}

/// The remote's web page from client 1: the address it saw.
fn seen_by_remote(world: &World) -> String {
    world.fetch(1).expect("GET / on the remote")
}

#[test]
fn ipv6_never_leaves_outside_the_tunnel_and_works_again_after_exit() {
    let world = World::new(1, &[]);
    let c = world.client(1);
    // IPv6 on the client's uplink, and an IPv6 host behind the gateway's
    // namespace, which routes IPv6 (only IPv6: IPv4 still reaches the
    // remote through veil's datapath alone).
    world.gw.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:200:1::1/64",
        "dev",
        "c1",
        "nodad",
    ]);
    c.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:200:1::2/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    c.ip(&["-6", "route", "add", "default", "via", "fd00:200:1::1"]);
    world.gw.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:200:18::1/64",
        "dev",
        "wan0",
        "nodad",
    ]);
    world.remote.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:200:18::2/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    world.remote.ip(&[
        "-6",
        "route",
        "add",
        "fd00:200:1::/64",
        "via",
        "fd00:200:18::1",
    ]);
    world
        .gw
        .exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
    let listener = world
        .remote
        .enter(|| TcpListener::bind("[fd00:200:18::2]:8081"))
        .expect("IPv6 listener");
    listener.set_nonblocking(true).unwrap();
    let connect6 = || {
        c.enter(|| {
            TcpStream::connect_timeout(
                &"[fd00:200:18::2]:8081".parse().unwrap(),
                Duration::from_secs(2),
            )
        })
    };
    wait_until(
        "IPv6 to work before the client",
        Duration::from_secs(10),
        || connect6().is_ok(),
    );

    let profile = world.add_client("dual", 1);
    let mut client = world.start_client(1, &profile, true);
    let capture = Capture::outgoing(c, "eth0", ETH_P_IPV6);
    let refused = connect6();
    assert!(refused.is_err(), "IPv6 while connected: {refused:?}");
    assert!(!ping(c, "fd00:200:18::2"), "ICMPv6 while connected");
    assert!(
        !ping(c, "fd00:200:1::1"),
        "ICMPv6 to the router while connected"
    );
    let left = capture.packets(Duration::from_millis(500));
    assert!(
        left.is_empty(),
        "{} IPv6 packets left the uplink while connected",
        left.len()
    );
    assert!(ping(c, "198.18.0.2"), "IPv4 goes through the tunnel");
    assert_eq!(
        seen_by_remote(&world),
        format!("Hello {PUBLIC}: that is the address this web server sees.\n")
    );

    assert!(client.stop().unwrap().success(), "{}", client.log());
    let capture = Capture::outgoing(c, "eth0", ETH_P_IPV6);
    assert!(
        connect6().is_ok(),
        "IPv6 works again after the client exits"
    );
    assert!(
        !capture.packets(Duration::from_millis(100)).is_empty(),
        "the same capture sees IPv6 leave when it may"
    );
    assert!(veil_table(c).is_none());
}

#[test]
fn a_clean_exit_leaves_nothing_behind_and_a_crash_fails_closed() {
    let world = World::new(1, &[]);
    let c = world.client(1);
    let before = network_state(c);
    assert!(
        !before.contains("veil"),
        "a fresh namespace has no veil table: {before}"
    );
    let profile = world.add_client("tidy", 1);
    let mut client = world.start_client(1, &profile, true);

    let table = veil_table(c).expect("the kill switch while connected");
    assert!(table.contains("policy drop"), "{table}");
    assert!(
        ip_out(c, &["rule"]).contains("lookup 7670"),
        "{}",
        ip_out(c, &["rule"])
    );
    let tunnel_routes = ip_out(c, &["route", "show", "table", "7670"]);
    assert!(
        tunnel_routes.contains("default dev veil0"),
        "{tunnel_routes}"
    );
    assert!(
        !ip_out(c, &["route", "show"]).contains("veil0"),
        "main is left alone"
    );

    // One client per namespace: a second would undo the first's kill
    // switch when it exits; and --unlock is refused while one runs.
    let second = veil_client(
        &world,
        &["--profile", profile.to_str().unwrap(), "--keepalive", "1"],
    );
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another veil-client is running"),
        "{second:?}"
    );
    let unlock = veil_client(&world, &["--unlock"]);
    assert!(!unlock.status.success(), "{unlock:?}");
    assert!(veil_table(c).is_some(), "still protected");

    for (signal, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        client.signal(signal);
        let status = wait_for_exit(&mut client);
        assert!(status.success(), "{name}: {status:?}\n{}", client.log());
        assert_eq!(network_state(c), before, "after {name}");
        assert!(ping(c, &GATEWAY.to_string()), "direct traffic after {name}");
        client = world.start_client(1, &profile, true);
    }

    // SIGKILL: nothing can remove the block, so it stays (fail closed)...
    client.kill();
    assert!(
        veil_table(c).is_some(),
        "the block outlives a killed client"
    );
    assert!(!ping(c, &GATEWAY.to_string()), "and still blocks");
    // ...until the next client takes it over and removes it on its exit.
    let mut next = world.start_client(1, &profile, true);
    assert!(ping(c, "198.18.0.2"));
    assert!(next.stop().unwrap().success());
    assert_eq!(network_state(c), before, "after a crash and a clean run");
}

#[test]
fn a_fatal_error_leaves_nothing_behind() {
    let world = World::new(1, &[]);
    let c = world.client(1);
    // A device already named veil0 that is no TUN device: the client
    // connects, cannot create its own and gives up.
    c.ip(&[
        "link", "add", "veil0", "type", "veth", "peer", "name", "veil0p",
    ]);
    let before = network_state(c);
    let profile = world.add_client("doomed", 1);
    let mut client = world.start_client(1, &profile, false);
    client.wait_for_log("kill switch on", Duration::from_secs(10));
    let status = wait_for_exit(&mut client);
    assert!(!status.success(), "{}", client.log());
    assert!(
        client.log().contains("creating the TUN device"),
        "{}",
        client.log()
    );
    assert_eq!(network_state(c), before, "after a fatal error");
}

fn wait_for_exit(p: &mut veil_tests::proc::Proc) -> std::process::ExitStatus {
    p.wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("did not exit:\n{}", p.log()))
}

#[test]
fn lockdown_holds_after_exit_and_kill_9_until_unlock() {
    let world = World::new(1, &[]);
    let c = world.client(1);
    let before = network_state(c);
    let profile = world.add_client("locked", 1);

    // A clean exit under --lockdown keeps the block.
    let mut client = world.start_client_with(1, &profile, true, &["--lockdown"]);
    assert!(ping(c, "198.18.0.2"));
    assert!(client.stop().unwrap().success(), "{}", client.log());
    let table = veil_table(c).expect("the block stays after a clean exit");
    assert!(table.contains("veil-client lockdown"), "{table}");
    assert!(!ping(c, &GATEWAY.to_string()), "blocked after the exit");

    // So does SIGKILL: then nothing leaves the uplink but the tunnel's own
    // connection, which the next start needs.
    let mut client = world.start_client_with(1, &profile, true, &["--lockdown"]);
    assert!(ping(c, "198.18.0.2"));
    client.kill();
    let capture = Capture::outgoing(c, "eth0", ETH_P_ALL);
    try_everything(c);
    let endpoint = c.enter(|| {
        TcpStream::connect_timeout(&(GATEWAY, ENDPOINT_PORT).into(), Duration::from_secs(2))
    });
    assert!(
        endpoint.is_ok(),
        "the endpoint stays reachable: {endpoint:?}"
    );
    drop(endpoint);
    let frames = capture.frames(Duration::from_millis(500));
    assert_eq!(leaks(&frames), Vec::<String>::new(), "left the uplink");
    assert!(
        frames.iter().any(|(t, p)| is_tunnel(*t, p)),
        "the capture saw the endpoint's packets: {} frames",
        frames.len()
    );

    let unlock = veil_client(&world, &["--unlock"]);
    assert!(unlock.status.success(), "{unlock:?}");
    assert!(
        String::from_utf8_lossy(&unlock.stderr).contains("kill switch removed"),
        "{unlock:?}"
    );
    assert_eq!(network_state(c), before, "--unlock restores everything");
    assert!(
        ping(c, &GATEWAY.to_string()),
        "direct traffic after --unlock"
    );
    let again = veil_client(&world, &["--unlock"]);
    assert!(again.status.success(), "unlocking twice is fine: {again:?}");
}

#[test]
fn the_kill_switch_holds_before_the_first_connection_and_while_reconnecting() {
    let mut world = World::new(1, &[]);
    let profile = world.add_client("patient", 1);
    world.gateway().stop();

    // No gateway: the client retries, with no TUN device and no route
    // into the tunnel, and nothing leaves but its attempts to connect.
    let mut client = world.start_client(1, &profile, false);
    client.wait_for_log("kill switch on", Duration::from_secs(10));
    // Refused (no listener): the profile's one endpoint did not answer.
    client.wait_for_log("no endpoint answered", Duration::from_secs(10));
    let capture = Capture::outgoing(world.client(1), "eth0", ETH_P_ALL);
    try_everything(world.client(1));
    let frames = capture.frames(Duration::from_millis(500));
    assert_eq!(leaks(&frames), Vec::<String>::new(), "before connecting");

    world.start_gateway(&[]);
    wait_until("the tunnel to come up", Duration::from_secs(30), || {
        ping(world.client(1), "198.18.0.2")
    });
    // Down again: the routes stay, the kill switch too.
    world.gateway().stop();
    client.wait_for_log("reconnecting", Duration::from_secs(10));
    let capture = Capture::outgoing(world.client(1), "eth0", ETH_P_ALL);
    try_everything(world.client(1));
    let frames = capture.frames(Duration::from_millis(500));
    assert_eq!(leaks(&frames), Vec::<String>::new(), "while reconnecting");
    assert!(client.is_running(), "{}", client.log());
}

#[test]
fn local_routes_and_networks_do_not_pull_traffic_out_of_the_tunnel() {
    let world = World::new(1, &[]);
    let c = world.client(1);
    let profile = world.add_client("wary", 1);
    let _client = world.start_client_with(1, &profile, true, &["--allow-lan"]);
    let hello = format!("Hello {PUBLIC}: that is the address this web server sees.\n");
    assert_eq!(seen_by_remote(&world), hello);

    // --allow-lan: the private network on the uplink is reached directly
    // (through the tunnel the gateway would refuse its own address).
    assert!(ping(c, &GATEWAY.to_string()), "the LAN, directly");

    // TunnelVision: a route more specific than the tunnel's, as a DHCP
    // server's option 121 would push, pointing out the uplink.
    c.ip(&["route", "add", "198.18.0.0/25", "via", "10.200.1.1"]);
    let capture = Capture::outgoing(c, "eth0", ETH_P_IP);
    assert_eq!(seen_by_remote(&world), hello, "with a more specific route");
    assert!(ping(c, "198.18.0.2"));
    let out: Vec<_> = capture
        .frames(Duration::from_millis(300))
        .into_iter()
        .filter(|(t, p)| !is_tunnel(*t, p))
        .collect();
    assert_eq!(leaks(&out), Vec::<String>::new());
    c.ip(&["route", "del", "198.18.0.0/25", "via", "10.200.1.1"]);

    // TunnelCrack's LocalNet: the local network claims the remote's public
    // range as its own (a directly connected 198.18.0.0/24); --allow-lan
    // lets only private networks through.
    c.ip(&["addr", "add", "198.18.0.200/24", "dev", "eth0"]);
    let capture = Capture::outgoing(c, "eth0", ETH_P_IP);
    assert_eq!(seen_by_remote(&world), hello, "with a public 'LAN'");
    let echoed = c.enter(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send_to(b"local?", (REMOTE, 7)).unwrap();
        let mut buf = [0u8; 16];
        s.recv_from(&mut buf).map(|(n, _)| buf[..n].to_vec())
    });
    assert_eq!(echoed.expect("UDP echo through the tunnel"), b"local?");
    let out: Vec<_> = capture
        .frames(Duration::from_millis(300))
        .into_iter()
        .filter(|(t, p)| !is_tunnel(*t, p))
        .collect();
    assert_eq!(leaks(&out), Vec::<String>::new());
    assert!(
        world.servers.seen().iter().all(|a| *a == PUBLIC),
        "the remote saw only the gateway: {:?}",
        world.servers.seen()
    );
}

#[test]
fn a_new_uplink_address_reconnects_within_two_seconds_keeping_address_and_flows() {
    let world = World::new(1, &[]);
    let c = world.client(1);
    let profile = world.add_client("roamer", 1);
    let mut client = world.start_client(1, &profile, true);
    let vip = world.vip_of("roamer");

    let mut echo = world.echo_connection(1);
    assert_eq!(echo(b"before"), b"before");

    // A new address on the uplink, the old one gone (a new DHCP lease).
    world.renumber_uplink(1);
    let moved = Instant::now();
    let udp = c.enter(|| UdpSocket::bind("0.0.0.0:0")).unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let back = loop {
        assert!(
            moved.elapsed() < Duration::from_secs(10),
            "no answer through the tunnel 10 s after the move:\n{}",
            client.log()
        );
        let _ = udp.send_to(b"moved", (REMOTE, 7));
        let mut buf = [0u8; 16];
        if udp.recv_from(&mut buf).is_ok() {
            break moved.elapsed();
        }
    };
    assert!(
        back < Duration::from_secs(2),
        "the tunnel came back after {back:?}"
    );
    assert!(ping(c, "198.18.0.2"));
    // Over HTTP/3 the tunnel may carry traffic again before the client
    // notices (the kernel picks the new source address for the QUIC
    // socket), so its note of the move can come just after.
    client.wait_for_log("the uplink changed", Duration::from_secs(2));
    assert_eq!(world.vip_of("roamer"), vip, "the same tunnel address");
    assert_eq!(
        echo(b"after the move"),
        b"after the move",
        "the TCP connection survived"
    );
    eprintln!("tunnel back {back:?} after the address change");
}
