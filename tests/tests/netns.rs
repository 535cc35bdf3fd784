//! The datapath attached for real: a gateway namespace with a TUN device and
//! a WAN veth, a remote namespace on the other end. Packets written into the
//! TUN (as the daemon will) must reach the remote from the gateway's
//! address, replies must come back out of the TUN addressed to the client,
//! and unsolicited connections to the NAT range must get no answer at all.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    process::Command,
    time::{Duration, Instant},
};

use veil_common::{proto, FlowKey, Reason};
use veil_tests::{
    bpffs::BpfFs,
    netns::{gateway_and_remote, readable, NetNs},
    packet::{assert_checksums, frame, ip_of, L4},
};
use veil_user::{
    datapath::WanFilter,
    flows::{FlowTable, PortRange, Timeouts},
    net::{ifindex, Ipv4Net},
    Datapath, DatapathConfig,
};

const GW_WAN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const PORTS: PortRange = PortRange::DEFAULT;

struct Gateway {
    tun: tun::Device,
    flows: FlowTable,
    dp: Datapath,
    /// Someone else's program on the WAN, attached before veil's.
    _other: Option<Datapath>,
    pins: std::path::PathBuf,
    // Dropped last: namespaces go after the programs and pins.
    _bpffs: BpfFs,
    remote: NetNs,
    gw_ns: NetNs,
}

fn gateway() -> Gateway {
    gateway_with(WanFilter::Xdp)
}

fn gateway_with(wan_filter: WanFilter) -> Gateway {
    gateway_after(wan_filter, false)
}

/// A gateway; with `another_first`, another program is on the WAN's
/// ingress before veil attaches (a second copy of `veil_fwd_tc`, which
/// passes whatever it does not forward).
fn gateway_after(wan_filter: WanFilter, another_first: bool) -> Gateway {
    let (gw, remote) = gateway_and_remote("gw", "remote");
    let bpffs = BpfFs::new();
    let (tun, dp, other, flows, pins) = gw.enter(|| {
        let mut cfg = tun::Configuration::default();
        cfg.tun_name("veilgw").up();
        let tun = tun::create(&cfg).expect("creating the TUN device");
        let config = DatapathConfig {
            public_addrs: vec![GW_WAN],
            vip_pool: "10.77.0.0/16".parse::<Ipv4Net>().unwrap(),
            nat_ports: PORTS,
            wan_ifindex: ifindex("wan0").unwrap(),
            tun_ifindex: ifindex("veilgw").unwrap(),
            tun_l2_len: 0,
            wan_filter,
            gro_stage: None,
            fwd_per_source: 0,
        };
        let mut dp = Datapath::load().expect("loading the datapath");
        dp.configure(&config).unwrap();
        let pins = dp.pin(&bpffs.path().join("veil")).unwrap();
        let flows = dp.flow_table(PORTS, Timeouts::default()).unwrap();
        let other = another_first.then(|| {
            let mut other = Datapath::load().expect("loading another copy");
            other.configure(&config).unwrap();
            other.attach_forward("wan0").expect("attaching it");
            other
        });
        dp.attach("wan0", "veilgw").expect("attaching");
        (tun, dp, other, flows, pins)
    });
    Gateway {
        tun,
        flows,
        dp,
        _other: other,
        pins,
        _bpffs: bpffs,
        remote,
        gw_ns: gw,
    }
}

impl Gateway {
    /// The next IPv4 packet the datapath hands to the TUN device.
    fn read_tun(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if !readable(self.tun.as_raw_fd(), left) {
                return None;
            }
            let n = self.tun.read(&mut buf).expect("reading the TUN device");
            if n > 0 && buf[0] >> 4 == 4 {
                return Some(buf[..n].to_vec());
            }
        }
        None
    }

    fn count(&self, reason: Reason) -> u64 {
        let stats = self.dp.stats().unwrap();
        stats.iter().find(|(r, _)| *r == reason).unwrap().1.packets
    }
}

#[test]
fn udp_goes_out_as_the_gateway_and_the_reply_comes_back_to_the_client() {
    udp_round_trip(&mut gateway());
}

/// `--wan-filter tc`: no XDP program on the WAN, and TC there keeps the
/// promises XDP makes: replies reach their client, an unsolicited
/// connection to the NAT range gets no answer, the host's own traffic
/// (its ping, its listeners) goes on as before.
#[test]
fn with_the_wan_filter_in_tc_replies_come_back_and_strangers_get_no_answer() {
    let mut gw = gateway_with(WanFilter::Tc);
    let link = String::from_utf8_lossy(&gw.gw_ns.ip(&["link", "show", "wan0"]).stdout).into_owned();
    assert!(!link.contains("xdp"), "no XDP program: {link}");
    udp_round_trip(&mut gw);
    unsolicited_connections_get_no_answer(&gw);
    let remote = REMOTE.to_string();
    let id = (PORTS.min + 3).to_string();
    let ping = gw
        .gw_ns
        .exec("ping", &["-c", "1", "-W", "2", "-e", &id, &remote]);
    assert!(ping.status.success(), "the gateway's own ping is answered");
    assert!(gw.count(Reason::PassToHost) >= 1);
}

/// With the filter in TC, veil's program goes first in the WAN's TCX
/// chain, whatever was attached before it: there a program that passes a
/// packet (`TC_ACT_OK`) ends the chain, and a stranger's SYN would reach
/// the host unchecked (and get its RST) behind one.
#[test]
fn with_the_wan_filter_in_tc_veil_checks_before_programs_attached_earlier() {
    let mut gw = gateway_after(WanFilter::Tc, true);
    unsolicited_connections_get_no_answer(&gw);
    udp_round_trip(&mut gw);
}

fn udp_round_trip(gw: &mut Gateway) {
    let echo = gw
        .remote
        .enter(|| UdpSocket::bind((REMOTE, 7)).expect("binding the echo socket"));
    echo.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let key = FlowKey::new(proto::UDP, CLIENT, 40000, REMOTE, 7);
    let nat = gw.flows.create(key, 0).unwrap();

    let payload: Vec<u8> = (0..1200u32).map(|i| (i * 7) as u8).collect();
    let packet = frame(
        CLIENT,
        REMOTE,
        64,
        L4::Udp {
            src: 40000,
            dst: 7,
            payload: &payload,
        },
    );
    gw.tun.write_all(ip_of(&packet)).unwrap();

    let mut buf = [0u8; 2048];
    let (n, from) = echo.recv_from(&mut buf).expect("the remote got nothing");
    assert_eq!(
        from,
        SocketAddr::from((GW_WAN, nat)),
        "the remote sees the gateway"
    );
    assert_eq!(&buf[..n], &payload[..], "bytes intact");
    echo.send_to(&buf[..n], from).unwrap();

    let reply = gw
        .read_tun(Duration::from_secs(3))
        .expect("no reply on the TUN");
    let expected = frame(
        REMOTE,
        CLIENT,
        64,
        L4::Udp {
            src: 7,
            dst: 40000,
            payload: &payload,
        },
    );
    assert_checksums(&reply);
    assert_eq!(
        &reply[12..20],
        &ip_of(&expected)[12..20],
        "remote -> client"
    );
    assert_eq!(
        &reply[20..24],
        &ip_of(&expected)[20..24],
        "ports back to the client's"
    );
    assert_eq!(&reply[28..], &payload[..], "bytes intact");
    assert_eq!(gw.count(Reason::EgressForwarded), 1);
    assert_eq!(gw.count(Reason::IngressForwarded), 1);

    let flow = gw.flows.list().unwrap().pop().unwrap();
    assert_eq!((flow.egress.packets, flow.reverse.packets), (1, 1));
}

#[test]
fn ping_through_the_gateway() {
    let mut gw = gateway();
    gw.flows
        .create(FlowKey::new(proto::ICMP, CLIENT, 0x4242, REMOTE, 0), 0)
        .unwrap();
    let ping = frame(
        CLIENT,
        REMOTE,
        64,
        L4::EchoRequest {
            id: 0x4242,
            seq: 1,
            payload: b"veil ping",
        },
    );
    gw.tun.write_all(ip_of(&ping)).unwrap();

    let reply = gw.read_tun(Duration::from_secs(3)).expect("no echo reply");
    let expected = frame(
        REMOTE,
        CLIENT,
        64,
        L4::EchoReply {
            id: 0x4242,
            seq: 1,
            payload: b"veil ping",
        },
    );
    assert_checksums(&reply);
    assert_eq!(&reply[12..20], &ip_of(&expected)[12..20]);
    assert_eq!(
        &reply[20..],
        &ip_of(&expected)[20..],
        "echo reply with the client's id"
    );
}

#[test]
fn the_gateways_own_ping_is_answered_whatever_its_identifier() {
    let gw = gateway();
    // An identifier inside the NAT range: its echo reply has no flow, and
    // must still reach the gateway's own ping (`exec` fails without one).
    let id = (PORTS.min + 3).to_string();
    let remote = REMOTE.to_string();
    gw.gw_ns
        .exec("ping", &["-c", "1", "-W", "2", "-e", &id, &remote]);
    assert!(gw.count(Reason::PassToHost) >= 1);
    assert_eq!(gw.count(Reason::DropNoIngressFlow), 0);
}

#[test]
fn unsolicited_connections_to_the_nat_range_get_no_answer() {
    unsolicited_connections_get_no_answer(&gateway());
}

fn unsolicited_connections_get_no_answer(gw: &Gateway) {
    let (nat_range, outside) = gw.remote.enter(|| {
        let nat = TcpStream::connect_timeout(
            &(GW_WAN, PORTS.min + 17).into(),
            Duration::from_millis(1500),
        );
        let outside = TcpStream::connect_timeout(&(GW_WAN, 22).into(), Duration::from_millis(1500));
        (nat.map(|_| ()), outside.map(|_| ()))
    });
    assert_eq!(
        nat_range.unwrap_err().kind(),
        ErrorKind::TimedOut,
        "a RST would mean the kernel saw the SYN"
    );
    assert_eq!(
        outside.unwrap_err().kind(),
        ErrorKind::ConnectionRefused,
        "outside the range the host answers as usual"
    );
    assert!(gw.count(Reason::DropNoIngressFlow) >= 1);
}

#[test]
fn bpftool_shows_a_live_flow_with_named_fields() {
    let mut gw = gateway();
    let key = FlowKey::new(proto::TCP, CLIENT, 50000, REMOTE, 443);
    let nat = gw.flows.create(key, 0).unwrap();

    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(gw.pins.join("egress"))
        .output()
        .expect("running bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entry = &dump[0]["formatted"];
    assert_eq!(
        entry["key"]["client_addr"],
        serde_json::json!([10, 77, 0, 2]),
        "{dump}"
    );
    assert_eq!(entry["key"]["remote_port"], 443, "{dump}");
    assert_eq!(entry["key"]["proto"], 6, "{dump}");
    assert_eq!(entry["value"]["nat_port"], nat, "{dump}");
    assert_eq!(entry["value"]["stats"]["packets"], 0, "{dump}");
}

/// A TUN device with several queues and veil's steering program hands
/// each packet it carries to the queue of the client it is addressed to:
/// the queue the gateway writes that client's packets on. Six clients'
/// packets over three queues; the kernel's own choice (a flow hash) would
/// place all six as the daemon does once in 729 tries.
#[test]
fn a_multi_queue_tun_device_hands_each_client_its_own_queue() {
    use veil_common::steer::queue_of;
    use veil_tunnel::tun::{Tun, MAX_READ};

    const QUEUES: usize = 3;
    let ns = NetNs::new("steer");
    let seen = ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _in_runtime = rt.enter();
        let queues = Tun::create_queues("veilq", 1500, QUEUES).expect("creating the queues");
        let mut dp = Datapath::load().expect("loading the datapath");
        queues[0]
            .set_steering_program(dp.tun_steering().unwrap())
            .expect("attaching the steering program");
        let out = Command::new("ip")
            .args(["addr", "add", "10.77.0.1/16", "dev", "veilq"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let sock = UdpSocket::bind("10.77.0.1:0").unwrap();
        let clients: Vec<Ipv4Addr> = (2..8).map(|i| Ipv4Addr::new(10, 77, 0, i)).collect();
        for client in &clients {
            sock.send_to(b"to a client", (*client, 9)).unwrap();
        }
        // (client, queue) for each datagram, read off whichever queue has it.
        let mut seen = Vec::new();
        let mut buf = vec![0u8; MAX_READ];
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.len() < clients.len() && Instant::now() < deadline {
            for (queue, tun) in queues.iter().enumerate() {
                while let Some(n) = tun.try_recv(&mut buf).unwrap() {
                    let ip = &buf[veil_proto::gso::VNET_HDR_LEN..n];
                    if ip[0] >> 4 == 4 && ip[9] == proto::UDP {
                        seen.push((Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]), queue));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        seen
    });
    assert_eq!(seen.len(), 6, "every datagram read once: {seen:?}");
    for (client, queue) in seen {
        assert_eq!(queue, queue_of(client.to_bits(), QUEUES), "{client}");
    }
}
