//! `datapath`: the per-packet cost of the real programs, forwarding rates
//! beside routing + MASQUERADE, and flow setup through the flow API.

#[allow(unused_imports, reason = "one import list for the benchmark's modules")]
use super::*;

pub(crate) fn datapath(quick: bool) {
    let runs = if quick { 2_000 } else { 20_000 };
    println!("## veil datapath benchmark\n");
    println!("kernel {}, {} CPUs\n", kernel(), num_cpus());

    println!("### Per-packet cost (BPF_PROG_TEST_RUN, {runs} kernel-timed runs, median of 9 batch means)\n");
    println!(
        "Each figure includes the kernel's timing overhead; the pass-to-host row is the floor.\n"
    );
    let costs = rewrite_costs(runs);
    let base = costs[0].1;
    println!("| path | ns/packet | × XDP pass-to-host |");
    println!("|---|---:|---:|");
    for (name, ns) in &costs {
        println!("| {name} | {ns:.1} | {:.2} |", ns / base);
    }

    let secs = if quick { 1.0 } else { 3.0 };
    println!("\n### Forwarding: generator → gateway TUN → WAN veth → remote sink\n");
    println!("64-byte frames (50-byte IP/UDP), one flow, {secs} s per run, median of 3 runs;");
    println!(
        "veth offloads as the kernel sets them with XDP attached (GSO off on the WAN peer).\n"
    );
    let veil = median(3, || forward(Path::Veil, secs));
    let masq = median(3, || forward(Path::Masquerade, secs));
    println!("| path | packets/s | × masquerade |");
    println!("|---|---:|---:|");
    println!(
        "| veil (TC on TUN + redirect_neigh) | {veil:.0} | {:.2} |",
        veil / masq
    );
    println!("| routing + MASQUERADE | {masq:.0} | 1.00 |");

    let n = if quick { 20_000 } else { 100_000 };
    println!("\n### Flow setup through the flow API ({n} flows)\n");
    let (create, delete) = flow_setup(n);
    println!("| operation | per second | × goal (100,000/s) |");
    println!("|---|---:|---:|");
    println!("| create | {create:.0} | {:.2} |", create / 100_000.0);
    println!("| delete | {delete:.0} | {:.2} |", delete / 100_000.0);
}

pub(crate) fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

pub(crate) fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub(crate) fn median(n: usize, mut f: impl FnMut() -> f64) -> f64 {
    let mut v: Vec<f64> = (0..n).map(|_| f()).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[n / 2]
}

/// Kernel-timed cost of one run of `prog` on a fresh copy of `input` (a
/// repeated run would feed a program its own rewritten output): the median
/// of 9 batch means, so a burst of noise on the machine moves nothing.
pub(crate) fn mean_ns<P>(prog: &P, input: &[u8], runs: u32) -> f64
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; input.len() + 256];
    let batch = (runs / 9).max(1);
    median(9, || {
        let mut total = Duration::ZERO;
        for _ in 0..batch {
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(input),
                    data_out: Some(&mut out),
                    ..Default::default()
                })
                .expect("BPF_PROG_TEST_RUN");
            total += r.duration;
        }
        total.as_nanos() as f64 / batch as f64
    })
}

pub(crate) fn rewrite_costs(runs: u32) -> Vec<(&'static str, f64)> {
    let mut bed = Bed::new();
    let (_, udp_nat) = bed.flow(proto::UDP, 40000, 53);
    let (_, tcp_nat) = bed.flow(proto::TCP, 50000, 443);
    let (_, icmp_nat) = bed.flow(proto::ICMP, 7, 0);
    let payload = [0u8; 22];
    let egress_udp = frame(CLIENT, REMOTE, 64, L4::udp(40000, 53, &payload));
    let egress_tcp = frame(CLIENT, REMOTE, 64, L4::tcp(50000, 443, "A", &payload));
    let egress_ping = frame(CLIENT, REMOTE, 64, L4::echo_request(7, 1, &payload));
    let reply_udp = frame(REMOTE, PUBLIC, 60, L4::udp(53, udp_nat, &payload));
    let reply_tcp = frame(REMOTE, PUBLIC, 60, L4::tcp(443, tcp_nat, "A", &payload));
    let reply_ping = frame(REMOTE, PUBLIC, 60, L4::echo_reply(icmp_nat, 1, &payload));
    let sent = frame(PUBLIC, REMOTE, 63, L4::udp(udp_nat, 53, &payload));
    let unreachable = icmp_error(ROUTER, PUBLIC, 3, 3, [0; 4], ip_of(&sent));
    let unsolicited = frame(REMOTE, PUBLIC, 60, L4::tcp(4444, PORTS.min + 9, "S", b""));
    let host = frame(REMOTE, PUBLIC, 60, L4::tcp(4444, 22, "S", b""));

    let mut costs = Vec::new();
    {
        let xdp: &mut Xdp = bed.dp.program(PROG_WAN_XDP).unwrap();
        costs.push(("XDP: pass to host (ssh)", mean_ns(xdp, &host, runs)));
        costs.push((
            "XDP: drop unsolicited SYN",
            mean_ns(xdp, &unsolicited, runs),
        ));
        costs.push(("XDP: admit UDP reply", mean_ns(xdp, &reply_udp, runs)));
    }
    let tc: &mut SchedClassifier = bed.dp.program(PROG_WAN_TC).unwrap();
    costs.push(("TC WAN: translate UDP reply", mean_ns(tc, &reply_udp, runs)));
    costs.push(("TC WAN: translate TCP reply", mean_ns(tc, &reply_tcp, runs)));
    costs.push((
        "TC WAN: translate echo reply",
        mean_ns(tc, &reply_ping, runs),
    ));
    costs.push((
        "TC WAN: translate ICMP error",
        mean_ns(tc, &unreachable, runs),
    ));
    let tun: &mut SchedClassifier = bed.dp.program(PROG_TUN_TC).unwrap();
    costs.push((
        "TC TUN: translate UDP egress",
        mean_ns(tun, &egress_udp, runs),
    ));
    costs.push((
        "TC TUN: translate TCP egress",
        mean_ns(tun, &egress_tcp, runs),
    ));
    costs.push((
        "TC TUN: translate echo request",
        mean_ns(tun, &egress_ping, runs),
    ));
    // The same packets for a client held to a rate and a quota (both far
    // above what the runs send, so every packet passes through the whole
    // check): the rate limiter's cost is the difference.
    let mut limits = bed.dp.rate_limits().unwrap();
    limits
        .apply(
            CLIENT,
            veil_user::ratelimit::Effective {
                rate: Some("100gbit".parse().unwrap()),
                quota: Some(veil_user::size::ByteSize(1 << 40)),
                period: Duration::from_secs(86_400),
            },
        )
        .unwrap();
    {
        let xdp: &mut Xdp = bed.dp.program(PROG_WAN_XDP).unwrap();
        costs.push((
            "XDP: admit UDP reply, rate-limited client",
            mean_ns(xdp, &reply_udp, runs),
        ));
    }
    let tun: &mut SchedClassifier = bed.dp.program(PROG_TUN_TC).unwrap();
    costs.push((
        "TC TUN: translate UDP egress, rate-limited client",
        mean_ns(tun, &egress_udp, runs),
    ));
    costs.extend(rewrite_costs6(runs));
    costs
}

/// The IPv6 (NAT66) paths, the same packets as IPv4's above.
fn rewrite_costs6(runs: u32) -> Vec<(&'static str, f64)> {
    use veil_tests::{
        bed6::*,
        packet6::{frame6, icmp6_error},
    };
    let mut bed = Bed6::new();
    let (_, udp_nat) = bed.flow(proto::UDP, 40000, 53);
    let (_, tcp_nat) = bed.flow(proto::TCP, 50000, 443);
    let payload = [0u8; 22];
    let egress_udp = frame6(CLIENT6, REMOTE6, 64, L4::udp(40000, 53, &payload));
    let egress_tcp = frame6(CLIENT6, REMOTE6, 64, L4::tcp(50000, 443, "A", &payload));
    let reply_udp = frame6(REMOTE6, PUBLIC6, 60, L4::udp(53, udp_nat, &payload));
    let reply_tcp = frame6(REMOTE6, PUBLIC6, 60, L4::tcp(443, tcp_nat, "A", &payload));
    let sent = frame6(PUBLIC6, REMOTE6, 63, L4::tcp(tcp_nat, 443, "A", &payload));
    let too_big = icmp6_error(ROUTER6, PUBLIC6, 2, 0, 1280, ip_of(&sent));
    let unsolicited = frame6(REMOTE6, PUBLIC6, 60, L4::tcp(4444, PORTS.min + 9, "S", b""));
    let mut costs = Vec::new();
    {
        let xdp: &mut Xdp = bed.dp.program(PROG_WAN_XDP).unwrap();
        costs.push((
            "IPv6 XDP: drop unsolicited SYN",
            mean_ns(xdp, &unsolicited, runs),
        ));
        costs.push(("IPv6 XDP: admit UDP reply", mean_ns(xdp, &reply_udp, runs)));
    }
    let tc: &mut SchedClassifier = bed.dp.program(PROG_WAN_TC).unwrap();
    costs.push((
        "IPv6 TC WAN: translate UDP reply",
        mean_ns(tc, &reply_udp, runs),
    ));
    costs.push((
        "IPv6 TC WAN: translate TCP reply",
        mean_ns(tc, &reply_tcp, runs),
    ));
    costs.push((
        "IPv6 TC WAN: translate Packet Too Big",
        mean_ns(tc, &too_big, runs),
    ));
    let tun: &mut SchedClassifier = bed.dp.program(PROG_TUN_TC).unwrap();
    costs.push((
        "IPv6 TC TUN: translate UDP egress",
        mean_ns(tun, &egress_udp, runs),
    ));
    costs.push((
        "IPv6 TC TUN: translate TCP egress",
        mean_ns(tun, &egress_tcp, runs),
    ));
    costs
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Path {
    Veil,
    Masquerade,
}

/// Packets per second delivered to the remote namespace.
pub(crate) fn forward(path: Path, secs: f64) -> f64 {
    let (gw, remote) = gateway_and_remote("bgw", "brem");
    // The sink: a bound socket nobody reads, so the remote never answers
    // with port unreachable; the interface counter says what arrived.
    let _sink = remote.enter(|| UdpSocket::bind((REMOTE, 9)).unwrap());
    let (mut tun, _dp) = gw.enter(|| {
        let mut cfg = tun::Configuration::default();
        cfg.tun_name("veilgw").up();
        let tun = tun::create(&cfg).expect("creating the TUN device");
        let dp = match path {
            Path::Veil => {
                let mut dp = Datapath::load().unwrap();
                dp.configure(&DatapathConfig {
                    public_addrs: vec![PUBLIC],
                    vip_pool: "10.77.0.0/16".parse::<Ipv4Net>().unwrap(),
                    nat_ports: PortRange::DEFAULT,
                    wan_ifindex: ifindex("wan0").unwrap(),
                    tun_ifindex: ifindex("veilgw").unwrap(),
                    tun_l2_len: 0,
                })
                .unwrap();
                let mut flows = dp
                    .flow_table(PortRange::DEFAULT, Timeouts::default())
                    .unwrap();
                flows
                    .create(
                        FlowKey::new(proto::UDP, CLIENT, 40000, REMOTE, 9),
                        monotonic_ns(),
                    )
                    .unwrap();
                dp.attach("wan0", "veilgw").unwrap();
                Some((dp, flows))
            }
            Path::Masquerade => None,
        };
        (tun, dp)
    });
    if path == Path::Masquerade {
        gw.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        gw.ip(&["route", "add", "10.77.0.0/16", "dev", "veilgw"]);
        gw.exec(
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "wan0",
                "-j",
                "MASQUERADE",
            ],
        );
    }
    let packet = frame(CLIENT, REMOTE, 64, L4::udp(40000, 9, &[0u8; 22]));
    let packet = ip_of(&packet).to_vec();
    // Warm up the neighbour entry and conntrack.
    for _ in 0..100 {
        let _ = tun.write(&packet);
    }
    std::thread::sleep(Duration::from_millis(200));

    let before = rx_packets(&remote);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    while Instant::now() < deadline {
        for _ in 0..256 {
            let _ = tun.write(&packet);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(100));
    let delivered = rx_packets(&remote) - before;
    delivered as f64 / elapsed
}

pub(crate) fn rx_packets(ns: &NetNs) -> u64 {
    let out = Command::new("ip")
        .args(["-n", ns.name(), "-s", "-j", "link", "show", "eth0"])
        .output()
        .expect("ip link");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .expect("rx packets")
}

/// Creations and deletions per second of `n` flows (distinct clients and
/// ports toward a handful of remotes, as a busy gateway sees them).
pub(crate) fn flow_setup(n: u32) -> (f64, f64) {
    let mut dp = Datapath::load().unwrap();
    let mut flows = gateway_flow_table(&mut dp);
    let keys: Vec<FlowKey> = (0..n)
        .map(|i| {
            let client = Ipv4Addr::from_bits(0x0a4d_0000 | (i % 4096));
            // 64 remote endpoints: about 1,600 flows each, well inside
            // the 4,536 NAT ports every endpoint has.
            let remote = Ipv4Addr::new(198, 18, 1, (i % 64) as u8);
            FlowKey::new(proto::TCP, client, 1024 + (i / 4096) as u16, remote, 443)
        })
        .collect();
    let now = monotonic_ns();
    let start = Instant::now();
    for k in &keys {
        flows.create(*k, now).expect("creating a flow");
    }
    let create = n as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    for k in &keys {
        flows.delete(k).expect("deleting a flow");
    }
    let delete = n as f64 / start.elapsed().as_secs_f64();
    (create, delete)
}
