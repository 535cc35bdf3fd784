//! veil's measurements, run by `cargo xtask bench` (as root).
//!
//! `datapath`:
//! - ns per packet of each path through the real programs
//!   (BPF_PROG_TEST_RUN; the kernel times each run),
//! - packets per second from a generator writing into the gateway's TUN
//!   device to a sink in a remote namespace, through veil's datapath and,
//!   on the same topology, through the kernel's routing + MASQUERADE,
//! - flow creations and deletions per second through the flow API.

use std::{
    io::Write,
    net::{Ipv4Addr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp};
use veil_common::{proto, FlowKey, PROG_TUN_TC, PROG_WAN_TC, PROG_WAN_XDP};
use veil_tests::{
    bed::{Bed, CLIENT, PORTS, PUBLIC, REMOTE, ROUTER},
    netns::{gateway_and_remote, NetNs},
    packet::{frame, icmp_error, ip_of, L4},
};
use veil_user::{
    flows::{PortRange, Timeouts},
    net::{ifindex, monotonic_ns, Ipv4Net},
    Datapath, DatapathConfig,
};

fn main() {
    let what = std::env::args().nth(1).unwrap_or_else(|| "datapath".into());
    let quick = std::env::args().any(|a| a == "--quick");
    match what.as_str() {
        "datapath" => datapath(quick),
        "tunnel" => tunnel(quick),
        "peers" => peers(quick, only()),
        other => {
            eprintln!("unknown benchmark `{other}`; known: datapath, tunnel, peers");
            std::process::exit(2);
        }
    }
}

fn datapath(quick: bool) {
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

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn median(n: usize, mut f: impl FnMut() -> f64) -> f64 {
    let mut v: Vec<f64> = (0..n).map(|_| f()).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[n / 2]
}

/// Kernel-timed cost of one run of `prog` on a fresh copy of `input` (a
/// repeated run would feed a program its own rewritten output): the median
/// of 9 batch means, so a burst of noise on the machine moves nothing.
fn mean_ns<P>(prog: &P, input: &[u8], runs: u32) -> f64
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

fn rewrite_costs(runs: u32) -> Vec<(&'static str, f64)> {
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
    costs
}

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Veil,
    Masquerade,
}

/// Packets per second delivered to the remote namespace.
fn forward(path: Path, secs: f64) -> f64 {
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

fn rx_packets(ns: &NetNs) -> u64 {
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
fn flow_setup(n: u32) -> (f64, f64) {
    let mut dp = Datapath::load().unwrap();
    let mut flows = dp
        .flow_table(PortRange::DEFAULT, Timeouts::default())
        .unwrap();
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

/// TCP throughput and round-trip time from a client namespace to the
/// remote, through veil and, on the same topology, by plain routing through
/// the gateway namespace.
fn tunnel(quick: bool) {
    use veil_tests::{proc::Proc, world::World};

    let secs = if quick { 2 } else { 5 };
    println!("## veil tunnel benchmark\n");
    println!(
        "kernel {}, {} CPUs; iperf3 {secs} s per run, one stream;",
        kernel(),
        num_cpus()
    );
    println!("ping: 50 echoes 10 ms apart. Same namespaces and veth links for both paths.\n");
    let mut world = World::new(1, &[]);
    let iperf = {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", world.remote.name()))
            .args(["iperf3", "-s", "-B", "198.18.0.2"]);
        Proc::start("iperf3 -s", cmd, world.dir.join("iperf3.log"))
    };
    std::thread::sleep(Duration::from_millis(300));

    // Direct: the gateway namespace routes (no NAT needed: the remote
    // knows the way back).
    world.gw.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    world
        .remote
        .ip(&["route", "add", "10.200.0.0/16", "via", "198.18.0.1"]);
    let direct = measure(&world, secs);
    world
        .remote
        .ip(&["route", "del", "10.200.0.0/16", "via", "198.18.0.1"]);
    world.gw.exec("sysctl", &["-qw", "net.ipv4.ip_forward=0"]);

    let profile = world.add_client("bench", 1);
    let client = world.start_client(1, &profile, true);
    let veil = measure(&world, secs);
    drop(client);
    drop(iperf);
    let _ = world.gateway();

    println!("| path | client → remote (Gbit/s) | remote → client (Gbit/s) | RTT mean (µs) | RTT max (µs) |");
    println!("|---|---:|---:|---:|---:|");
    for (name, m) in [("direct routing", &direct), ("veil", &veil)] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.0} | {:.0} |",
            m.up / 1e9,
            m.down / 1e9,
            m.rtt_mean_us,
            m.rtt_max_us
        );
    }
    println!(
        "| veil ÷ direct | {:.2} | {:.2} | {:.2} | {:.2} |",
        veil.up / direct.up,
        veil.down / direct.down,
        veil.rtt_mean_us / direct.rtt_mean_us,
        veil.rtt_max_us / direct.rtt_max_us
    );
    println!(
        "\nRTT overhead of veil over direct: {:.0} µs",
        veil.rtt_mean_us - direct.rtt_mean_us
    );
}

struct Measured {
    up: f64,
    down: f64,
    rtt_mean_us: f64,
    rtt_max_us: f64,
}

fn measure(world: &veil_tests::world::World, secs: u32) -> Measured {
    let ns = world.client(1).name();
    let up = iperf3(ns, secs, 1, false);
    let down = iperf3(ns, secs, 1, true);
    let rtt = ping_times(ns, 50);
    Measured {
        up,
        down,
        rtt_mean_us: mean(&rtt),
        rtt_max_us: rtt.iter().copied().fold(0.0, f64::max),
    }
}

/// `--only a,b`: the peer paths to measure.
fn only() -> Vec<veil_tests::peers::Kind> {
    use veil_tests::peers::Kind;
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--only") {
        Some(i) => args
            .get(i + 1)
            .map(|list| {
                list.split(',')
                    .map(|n| {
                        Kind::from_name(n.trim()).unwrap_or_else(|| {
                            eprintln!(
                                "unknown path `{n}`; known: {}",
                                Kind::ALL.map(Kind::name).join(", ")
                            );
                            std::process::exit(2)
                        })
                    })
                    .collect()
            })
            .unwrap_or_default(),
        None => Kind::ALL.to_vec(),
    }
}

/// One path's figures: the median of the runs, and the spread (min, max).
#[derive(serde::Serialize, Default, Clone)]
struct Figure {
    median: f64,
    min: f64,
    max: f64,
}

impl Figure {
    fn of(mut v: Vec<f64>) -> Figure {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Figure {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }
}

/// The figures the peers comparison reports, by name, in table order.
const PEER_FIGURES: [(&str, &str, bool); 14] = [
    ("tcp1_up", "TCP 1 stream client→remote (Gbit/s)", true),
    ("tcp1_down", "TCP 1 stream remote→client (Gbit/s)", true),
    ("tcp4_up", "TCP 4 streams client→remote (Gbit/s)", true),
    ("tcp4_down", "TCP 4 streams remote→client (Gbit/s)", true),
    ("rtt_idle_mean", "RTT idle, mean (µs)", false),
    ("rtt_idle_p99", "RTT idle, p99 (µs)", false),
    ("rtt_load_mean", "RTT under load, mean (µs)", false),
    ("rtt_load_p99", "RTT under load, p99 (µs)", false),
    (
        "udp64_pps",
        "UDP 64-byte packets/s delivered (thousands)",
        true,
    ),
    (
        "udp1200_pps",
        "UDP 1200-byte packets/s delivered (thousands)",
        true,
    ),
    (
        "conn_per_s",
        "new TCP connections/s through the gateway (thousands)",
        true,
    ),
    (
        "cpu_s_per_gb",
        "CPU seconds per GB (whole machine, TCP 1 stream up)",
        false,
    ),
    (
        "mem_mb_100k_flows",
        "gateway memory with 100,000 flows (MB beyond idle)",
        false,
    ),
    (
        "flows_created",
        "flows created by the 100,000-flow burst",
        true,
    ),
];

fn peers(quick: bool, kinds: Vec<veil_tests::peers::Kind>) {
    use std::collections::BTreeMap;

    use veil_tests::{peers, proc::Proc, world::World};

    // --quick stays under 3 minutes for all eight paths: one run each,
    // 2 s of TCP, 1 s of UDP and of connections, 30 pings.
    let (secs, short, runs, pings) = if quick { (2, 1, 1, 30) } else { (5, 5, 3, 200) };
    let mut results: BTreeMap<&'static str, BTreeMap<&'static str, Figure>> = BTreeMap::new();
    for kind in &kinds {
        eprintln!("measuring {} ...", kind.name());
        let started = std::time::Instant::now();
        let mut samples: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
        for _ in 0..runs {
            let mut world = World::bare(1);
            let _iperf = {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net=/var/run/netns/{}", world.remote.name()))
                    .args(["iperf3", "-s", "-B", "198.18.0.2"]);
                Proc::start("iperf3 -s", cmd, world.dir.join("iperf3.log"))
            };
            let _path = peers::up(&mut world, *kind);
            let ns = world.client(1).name().to_owned();
            let iperf = |streams: u32, reverse: bool| iperf3(&ns, secs, streams, reverse);
            let mut push = |k: &'static str, v: f64| samples.entry(k).or_default().push(v);
            let busy = cpu_busy_secs();
            let up = iperf(1, false);
            let cpu = cpu_busy_secs() - busy;
            push("tcp1_up", up / 1e9);
            push("cpu_s_per_gb", cpu / (up * secs as f64 / 8e9).max(1e-9));
            push("tcp1_down", iperf(1, true) / 1e9);
            push("tcp4_up", iperf(4, false) / 1e9);
            push("tcp4_down", iperf(4, true) / 1e9);
            let idle = ping_times(&ns, pings);
            push("rtt_idle_mean", mean(&idle));
            push("rtt_idle_p99", p99(&idle));
            // Long enough to cover the pings after a 0.5 s start.
            let bulk_secs = (pings * 10 / 1000 + 2).max(secs);
            let load = std::thread::scope(|s| {
                let bulk = s.spawn(|| iperf3(&ns, bulk_secs, 1, false));
                std::thread::sleep(Duration::from_millis(500));
                let t = ping_times(&ns, pings);
                let _ = bulk.join();
                t
            });
            push("rtt_load_mean", mean(&load));
            push("rtt_load_p99", p99(&load));
            push("udp64_pps", udp_pps(&ns, short, 64) / 1e3);
            push("udp1200_pps", udp_pps(&ns, short, 1200) / 1e3);
            push("conn_per_s", connections_per_sec(&world, short) / 1e3);
            if *kind == peers::Kind::Veil {
                // What the gateway dropped, for reading the figures.
                let status = world.status();
                eprintln!("veil gateway counters: {}", status["counters"]);
                let counted: Vec<String> = status["datapath"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(_, c)| c["packets"].as_u64().unwrap_or(0) > 0)
                    .map(|(reason, c)| format!("{reason} {}", c["packets"]))
                    .collect();
                eprintln!("veil datapath: {}", counted.join(", "));
            }
            if *kind == peers::Kind::Veil {
                let (mb, flows) = memory_with_flows(&world, 100_000);
                push("mem_mb_100k_flows", mb);
                push("flows_created", flows);
            }
        }
        eprintln!("{}: {:.0} s", kind.name(), started.elapsed().as_secs_f64());
        results.insert(
            kind.name(),
            samples
                .into_iter()
                .map(|(k, v)| (k, Figure::of(v)))
                .collect(),
        );
    }
    let report = peers_table(&results);
    print!("{report}");
    let dir = std::path::Path::new("target/bench");
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::write(
        dir.join("peers.json"),
        serde_json::to_string_pretty(&results).unwrap(),
    );
}

fn peers_table(
    results: &std::collections::BTreeMap<
        &'static str,
        std::collections::BTreeMap<&'static str, Figure>,
    >,
) -> String {
    use std::fmt::Write as _;
    let order: Vec<&str> = veil_tests::peers::Kind::ALL
        .iter()
        .map(|k| k.name())
        .filter(|n| results.contains_key(n))
        .collect();
    let mut out = String::new();
    let _ = writeln!(out, "## veil beside the tunnels users would pick instead\n");
    let _ = writeln!(
        out,
        "kernel {}, {} CPUs. Median of the runs, [min–max] when more than one. Ratios: veil ÷ that path (for RTT, lower is better).\n",
        kernel(),
        num_cpus()
    );
    let _ = writeln!(
        out,
        "Topology: client — gateway — remote namespaces over veth pairs, MTU 1500. Offloads: as the kernel sets them, plus GRO on the gateway's WAN veth (NIC drivers default to it); direct-no-offload turns TSO, GSO, GRO and TX checksumming off on every veth. veil: TUN devices with TSO (offload datagrams), XDP on the WAN veth.\n"
    );
    let _ = write!(out, "| figure |");
    for n in &order {
        let _ = write!(out, " {n} |");
    }
    let _ = writeln!(out, " veil ÷ direct | veil ÷ best peer |");
    let _ = writeln!(out, "|---|{}---:|---:|", "---:|".repeat(order.len()));
    let peers = [
        "openvpn-udp",
        "openvpn-tcp",
        "boringtun",
        "boringtun-threads1",
    ];
    for (key, label, higher_better) in PEER_FIGURES {
        if !order.iter().any(|n| results[n].contains_key(key)) {
            continue;
        }
        let _ = write!(out, "| {label} |");
        for n in &order {
            let Some(f) = results[n].get(key) else {
                let _ = write!(out, " – |");
                continue;
            };
            if (f.max - f.min) > f64::EPSILON {
                let _ = write!(out, " {:.2} [{:.2}–{:.2}] |", f.median, f.min, f.max);
            } else {
                let _ = write!(out, " {:.2} |", f.median);
            }
        }
        let veil = results
            .get("veil")
            .and_then(|r| r.get(key))
            .map(|f| f.median);
        let direct = results
            .get("direct")
            .and_then(|r| r.get(key))
            .map(|f| f.median);
        let best_peer = peers
            .iter()
            .filter_map(|p| results.get(p).and_then(|r| r.get(key)).map(|f| f.median))
            .reduce(|a, b| if higher_better == (a > b) { a } else { b });
        let ratio = |other: Option<f64>| match (veil, other) {
            (Some(v), Some(o)) if o > 0.0 => format!("{:.2}", v / o),
            _ => "–".into(),
        };
        let _ = writeln!(out, " {} | {} |", ratio(direct), ratio(best_peer));
    }
    out
}

fn iperf3(ns: &str, secs: u32, streams: u32, reverse: bool) -> f64 {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{ns}")).args([
        "iperf3",
        "-c",
        "198.18.0.2",
        "-J",
        "-t",
        &secs.to_string(),
        "-P",
        &streams.to_string(),
    ]);
    if reverse {
        cmd.arg("-R");
    }
    let out = cmd.output().expect("running iperf3");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
}

/// Round-trip times in µs of `n` pings 10 ms apart.
fn ping_times(ns: &str, n: u32) -> Vec<f64> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{ns}"))
        .args([
            "ping",
            "-n",
            "-c",
            &n.to_string(),
            "-i",
            "0.01",
            "198.18.0.2",
        ])
        .output()
        .expect("running ping");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.trim_end_matches(" ms").parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

fn p99(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)]
}

/// Busy CPU time of the whole machine so far (user + nice + system + irq +
/// softirq + steal), in seconds.
fn cpu_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: f64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| cpu.get(i)).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    busy / hz
}

/// UDP datagrams of `len` bytes per second that reached the remote.
fn udp_pps(ns: &str, secs: u32, len: u32) -> f64 {
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{ns}"))
        .args(["iperf3", "-c", "198.18.0.2", "-J", "-u", "-b", "0"])
        .args(["-l", &len.to_string(), "-t", &secs.to_string()])
        .output()
        .expect("running iperf3");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let sum = &v["end"]["sum"];
    let (packets, lost, seconds) = (
        sum["packets"].as_f64().unwrap_or(0.0),
        sum["lost_packets"].as_f64().unwrap_or(0.0),
        sum["seconds"].as_f64().unwrap_or(1.0),
    );
    ((packets - lost) / seconds.max(1e-9)).max(0.0)
}

/// New TCP connections per second from the client to the remote's discard
/// port: 16 connecting threads (one thread's rate is bound by the round
/// trip, not by the gateway), each connection reset on close (no TIME_WAIT
/// to run out of ports).
fn connections_per_sec(world: &veil_tests::world::World, secs: u32) -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    let done = AtomicU64::new(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(secs as u64);
    let start = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                world.client(1).enter(|| {
                    while std::time::Instant::now() < deadline {
                        let c = std::net::TcpStream::connect_timeout(
                            &(REMOTE, 9).into(),
                            Duration::from_secs(1),
                        );
                        if let Ok(c) = c {
                            let _ = socket2_linger_zero(&c);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            });
        }
    });
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn socket2_linger_zero(s: &std::net::TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and option.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// veil only: the gateway's memory (daemon RSS plus its maps) after `n`
/// UDP flows from the client, beyond what it used before; and how many
/// flows it holds.
fn memory_with_flows(world: &veil_tests::world::World, n: u32) -> (f64, f64) {
    let pid = world
        .gateway
        .as_ref()
        .map(|g| g.pid())
        .expect("gateway running");
    let rss = || -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<f64>().ok())
            .unwrap_or(0.0)
            * 1024.0
    };
    let before = rss();
    // Distinct flows: 1,000 sockets (source ports), each toward n / 1,000
    // remote ports, in paced rounds of 200 so that no queue on the way
    // (the client's TUN queue holds 500) overflows.
    world.client(1).enter(|| {
        let sockets: Vec<UdpSocket> = (0..1000)
            .filter_map(|_| UdpSocket::bind("0.0.0.0:0").ok())
            .collect();
        let per_socket = n.div_ceil(sockets.len().max(1) as u32);
        for dport in (20000u16..).take(per_socket as usize) {
            for round in sockets.chunks(200) {
                for s in round {
                    let _ = s.send_to(b"x", (REMOTE, dport));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    let flows = world.status()["flows"]["total"].as_f64().unwrap_or(0.0);
    let after = rss();
    // The flow maps are preallocated: their size does not change with the
    // number of flows; the daemon's index does.
    ((after - before).max(0.0) / 1e6, flows)
}
