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

    // `VEIL_BENCH_FORWARD_SECS` lengthens the runs (to profile one);
    // `VEIL_BENCH_GENERATORS=write` or `in-kernel` keeps one generator.
    let secs = std::env::var("VEIL_BENCH_FORWARD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 1.0 } else { 3.0 });
    let wanted = std::env::var("VEIL_BENCH_GENERATORS").ok();
    let queues = num_cpus().max(2);
    println!("\n### Forwarding: generator → gateway TUN → WAN veth → remote sink\n");
    println!(
        "64-byte frames (50-byte IP/UDP), one flow, {secs} s per run; 3 runs of each path,\n\
         alternating: medians, and the median of the 3 pairs' ratios;"
    );
    println!(
        "veth offloads as the kernel sets them with XDP attached (GSO off on the WAN peer).\n\
         Two generators. `write()`: one packet per system call, from one thread into a\n\
         one-queue TUN, then from {queues} threads, each on its own queue of a\n\
         multi-queue TUN (`IFF_MULTI_QUEUE`). In-kernel: an XDP program that writes\n\
         the frame and passes it, run by `BPF_PROG_TEST_RUN` in live-frames mode, which\n\
         hands each frame to the stack as received on a TAP device standing in for the\n\
         TUN device (veil's programs read its Ethernet header): no system call or\n\
         allocation per packet; from one thread, then {queues}. The remote's sink drops\n\
         in its first netfilter hook (raw PREROUTING), after the interface counted the\n\
         packet, so neither path pays for a UDP socket.\n"
    );
    println!("| generator | path | packets/s | × masquerade |");
    println!("|---|---|---:|---:|");
    let mut in_situ = None;
    let generators = [
        Generator::Writes(1),
        Generator::Writes(queues),
        Generator::Live(1),
        Generator::Live(queues),
        Generator::LiveReplies(1),
        Generator::LiveReplies(queues),
    ];
    for generator in generators {
        let kind = generator.to_string();
        if wanted
            .as_ref()
            .is_some_and(|w| !kind.starts_with(w.as_str()))
        {
            continue;
        }
        // Runs alternate between the paths and each pair gives a ratio, so
        // that a neighbour's load moving between runs moves both sides.
        let (mut veil, mut masq, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            let run = forward(Path::Veil, secs, generator);
            if generator == Generator::Writes(queues) {
                in_situ = run.programs;
            }
            let m = forward(Path::Masquerade, secs, generator).pps;
            ratio.push(run.pps / m);
            veil.push(run.pps);
            masq.push(m);
        }
        let mid = |mut v: Vec<f64>| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        };
        let veil_path = match generator {
            Generator::Writes(_) => "veil (TC on TUN + redirect_neigh)",
            Generator::Live(_) => "veil (TC on TAP + redirect_neigh)",
            Generator::LiveReplies(_) => "veil (TC on WAN + redirect to TAP)",
        };
        println!(
            "| {kind} | {veil_path} | {:.0} | {:.2} |",
            mid(veil),
            mid(ratio)
        );
        println!(
            "| {kind} | routing + MASQUERADE | {:.0} | 1.00 |",
            mid(masq)
        );
    }
    if let Some(p) = in_situ {
        println!("\n### In situ: the kernel's own run-time statistics (BPF_ENABLE_STATS)\n");
        println!(
            "Enabled through a file descriptor the benchmark holds (not the global\n\
             `kernel.bpf_stats_enabled` sysctl) during the last veil forwarding run\n\
             and two reverse runs from the remote: replies to the flow's NAT port\n\
             (translated to the TUN) and datagrams to a closed port of the host\n\
             (passed to the host: the floor). run_time_ns / run_cnt per program.\n"
        );
        println!("| program | traffic | packets | ns/packet | × XDP pass-to-host |");
        println!("|---|---|---:|---:|---:|");
        let floor = p.host_xdp.ns();
        for (prog, traffic, s) in [
            ("TC TUN", "egress: SNAT + redirect_neigh", p.tun),
            ("XDP WAN", "replies: admit", p.reply_xdp),
            ("TC WAN", "replies: DNAT + redirect to TUN", p.reply_tc),
            ("XDP WAN", "host's: pass to host", p.host_xdp),
            ("TC WAN", "host's: pass to host", p.host_tc),
        ] {
            println!(
                "| {prog} | {traffic} | {} | {:.1} | {:.2} |",
                s.count,
                s.ns(),
                s.ns() / floor
            );
        }
    }

    let n = if quick { 20_000 } else { 100_000 };
    println!("\n### Flow setup through the flow API ({n} flows)\n");
    let (create, delete) = flow_setup(n, false);
    // With `--forward`, each new flow also looks for a forwarded
    // connection on its NAT port.
    let (create_fwd, _) = flow_setup(n, true);
    println!("| operation | per second | × goal (100,000/s) |");
    println!("|---|---:|---:|");
    println!("| create | {create:.0} | {:.2} |", create / 100_000.0);
    println!(
        "| create, with `--forward` | {create_fwd:.0} | {:.2} |",
        create_fwd / 100_000.0
    );
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
    // TTL and IP ID normalisation on: two more IPv4 header fields
    // rewritten per packet (and a random number drawn). What that adds is
    // what two header-field rewrites cost.
    bed.dp
        .normalize(veil_common::normalize::Normalize {
            ttl: 64,
            random_id: 1,
        })
        .unwrap();
    let tun: &mut SchedClassifier = bed.dp.program(PROG_TUN_TC).unwrap();
    costs.push((
        "TC TUN: translate UDP egress, rate-limited, TTL and ID normalised",
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

/// What feeds the gateway's client side in a forwarding run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Generator {
    /// That many threads, each `write()`ing one packet at a time into its
    /// own queue of a TUN device.
    Writes(usize),
    /// That many threads injecting frames in the kernel
    /// ([`livegen::LiveFrames`]) as received on a TAP device.
    Live(usize),
    /// Likewise, replies from the remote as received on the WAN
    /// interface, forwarded to the client side (a TAP device), where they
    /// are counted.
    LiveReplies(usize),
}

impl std::fmt::Display for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, n) = match self {
            Generator::Writes(n) => ("write()", n),
            Generator::Live(n) => ("in-kernel", n),
            Generator::LiveReplies(n) => ("in-kernel replies", n),
        };
        match n {
            1 => write!(f, "{kind}, 1 thread"),
            n => write!(f, "{kind}, {n} threads"),
        }
    }
}

/// One forwarding run: what arrived, and for veil what its programs cost
/// in situ.
pub(crate) struct Forwarded {
    pub pps: f64,
    pub programs: Option<InSitu>,
}

/// The kernel's run-time statistics of one program over one phase.
#[derive(Clone, Copy, Default)]
pub(crate) struct RunStats {
    pub ns: u64,
    pub count: u64,
}

impl RunStats {
    fn read<P>(prog: &P) -> Self
    where
        P: ProgInfo,
    {
        let info = prog.prog_info();
        Self {
            ns: info.run_time().as_nanos() as u64,
            count: info.run_count(),
        }
    }

    fn since(self, before: Self) -> Self {
        Self {
            ns: self.ns - before.ns,
            count: self.count - before.count,
        }
    }

    pub fn ns(&self) -> f64 {
        self.ns as f64 / self.count.max(1) as f64
    }
}

/// Programs whose `bpf_prog_info` the benchmark reads.
pub(crate) trait ProgInfo {
    fn prog_info(&self) -> aya::programs::ProgramInfo;
}

impl ProgInfo for SchedClassifier {
    fn prog_info(&self) -> aya::programs::ProgramInfo {
        self.info().expect("bpf_prog_info")
    }
}

impl ProgInfo for Xdp {
    fn prog_info(&self) -> aya::programs::ProgramInfo {
        self.info().expect("bpf_prog_info")
    }
}

/// Per-packet cost of veil's programs on real traffic.
#[derive(Clone, Copy)]
pub(crate) struct InSitu {
    pub tun: RunStats,
    pub reply_xdp: RunStats,
    pub reply_tc: RunStats,
    pub host_xdp: RunStats,
    pub host_tc: RunStats,
}

/// The three programs' statistics at one moment.
fn snapshot(dp: &mut Datapath) -> [RunStats; 3] {
    let tun = RunStats::read(&*dp.program::<SchedClassifier>(PROG_TUN_TC).unwrap());
    let tc = RunStats::read(&*dp.program::<SchedClassifier>(PROG_WAN_TC).unwrap());
    let xdp = RunStats::read(&*dp.program::<Xdp>(PROG_WAN_XDP).unwrap());
    [tun, tc, xdp]
}

/// A multi-queue TUN device `name` (TAP, with Ethernet frames, if `tap`)
/// with `queues` queues: one fd each (`IFF_MULTI_QUEUE`), so that as many
/// threads write without sharing one.
pub(crate) fn mq_tun(name: &str, queues: usize, tap: bool) -> Vec<std::fs::File> {
    use std::os::fd::FromRawFd;
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    (0..queues)
        .map(|_| {
            // SAFETY: a path literal; the fd is owned by the File below.
            let fd =
                unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
            assert!(
                fd >= 0,
                "open /dev/net/tun: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: a zeroed ifreq is valid.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
                *d = s as libc::c_char;
            }
            let kind = if tap { libc::IFF_TAP } else { libc::IFF_TUN };
            req.ifr_ifru.ifru_flags = (kind | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE) as i16;
            // SAFETY: a valid fd and ifreq.
            let rc = unsafe { libc::ioctl(fd, TUNSETIFF, &mut req) };
            assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
            // SAFETY: fd is open and ours.
            unsafe { std::fs::File::from_raw_fd(fd) }
        })
        .collect()
}

/// Writes `packet` into each of `queues` from a thread of its own until
/// `secs` have passed; returns how long they wrote.
fn generate(queues: &[std::fs::File], packet: &[u8], secs: f64) -> f64 {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    std::thread::scope(|s| {
        for q in queues {
            s.spawn(move || {
                let mut q = q;
                while Instant::now() < deadline {
                    for _ in 0..256 {
                        let _ = q.write(packet);
                    }
                }
            });
        }
    });
    start.elapsed().as_secs_f64()
}

/// Injects `frame` as received on `iface` of namespace `ns` from `threads`
/// threads of its own until `secs` have passed; returns how long they ran.
fn inject(ns: &NetNs, iface: &str, frame: &[u8], threads: usize, secs: f64) -> f64 {
    let generator = livegen::LiveFrames::load(frame).expect("loading the generator's program");
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    std::thread::scope(|s| {
        for _ in 0..threads {
            let generator = &generator;
            s.spawn(move || {
                ns.enter(|| {
                    let ifindex = ifindex(iface).expect("the generator's interface");
                    while Instant::now() < deadline {
                        generator
                            .inject(ifindex, 50_000)
                            .expect("BPF_PROG_TEST_RUN in live-frames mode");
                    }
                })
            });
        }
    });
    start.elapsed().as_secs_f64()
}

/// Sends `packet`'s payload from the remote to `to` for `secs`, from a
/// plain UDP socket (the remote's own stack builds the frames).
fn from_remote(remote: &NetNs, to: (Ipv4Addr, u16), secs: f64) {
    remote.enter(|| {
        let sock = UdpSocket::bind((REMOTE, 9)).unwrap();
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        while Instant::now() < deadline {
            for _ in 0..256 {
                let _ = sock.send_to(&[0u8; 22], to);
            }
        }
    });
}

/// Packets per second forwarded from `generator`: through the gateway's
/// client-side device to the remote namespace, or for
/// [`Generator::LiveReplies`] from the WAN to the client side.
pub(crate) fn forward(path: Path, secs: f64, generator: Generator) -> Forwarded {
    // The client side's MAC, for frames the in-kernel generator injects
    // (the stack forwards only frames addressed to the interface), and the
    // client's, for the kernel's replies to it.
    const CLIENT_SIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
    const CLIENT_MAC: &str = "02:00:00:00:00:02";
    let (writers, tap) = match generator {
        Generator::Writes(n) => (n, false),
        // One queue: its fd keeps the TAP device's carrier on.
        Generator::Live(_) | Generator::LiveReplies(_) => (1, true),
    };
    let replies = matches!(generator, Generator::LiveReplies(_));
    let (gw, remote) = gateway_and_remote("bgw", "brem");
    // The sink: dropped by the remote's first netfilter hook (raw
    // PREROUTING), after its interface counted the packet, so that neither
    // path pays for a socket; the interface counter says what arrived.
    // (This kernel has no TC classifier but BPF's for a plain drop.)
    remote.exec("iptables", &["-t", "raw", "-A", "PREROUTING", "-j", "DROP"]);
    let (queues, mut dp) = gw.enter(|| {
        let queues = mq_tun("veilgw", writers, tap);
        let dp = match path {
            Path::Veil => {
                let mut dp = Datapath::load().unwrap();
                dp.configure(&DatapathConfig {
                    public_addrs: vec![PUBLIC],
                    vip_pool: "10.77.0.0/16".parse::<Ipv4Net>().unwrap(),
                    nat_ports: PortRange::DEFAULT,
                    wan_ifindex: ifindex("wan0").unwrap(),
                    tun_ifindex: ifindex("veilgw").unwrap(),
                    tun_l2_len: if tap { 14 } else { 0 },
                    // Injected replies skip the XDP hook: the filter's
                    // checks run in TC then, as on a veth by default.
                    wan_filter: match replies {
                        true => veil_user::datapath::WanFilter::Tc,
                        false => veil_user::datapath::WanFilter::Xdp,
                    },
                    gro_stage: None,
                    fwd_per_source: 0,
                })
                .unwrap();
                let mut flows = dp
                    .flow_table(PortRange::DEFAULT, Timeouts::default())
                    .unwrap();
                let nat = flows
                    .create(
                        FlowKey::new(proto::UDP, CLIENT, 40000, REMOTE, 9),
                        monotonic_ns(),
                    )
                    .unwrap();
                dp.attach("wan0", "veilgw").unwrap();
                Some((dp, flows, nat))
            }
            Path::Masquerade => None,
        };
        (queues, dp)
    });
    if tap {
        let mac = CLIENT_SIDE_MAC.map(|b| format!("{b:02x}")).join(":");
        gw.ip(&["link", "set", "veilgw", "address", &mac]);
    }
    gw.ip(&["link", "set", "veilgw", "up"]);
    if path == Path::Masquerade {
        gw.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        gw.ip(&["route", "add", "10.77.0.0/16", "dev", "veilgw"]);
        // The client answers no ARP on a TAP device nobody reads.
        let client = CLIENT.to_string();
        let neigh = ["neigh", "replace", &client, "lladdr", CLIENT_MAC];
        gw.ip(&[&neigh[..], &["dev", "veilgw", "nud", "permanent"]].concat());
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
    let mut ethernet = frame(CLIENT, REMOTE, 64, L4::udp(40000, 9, &[0u8; 22]));
    ethernet[..6].copy_from_slice(&CLIENT_SIDE_MAC);
    let packet = match tap {
        true => ethernet.clone(),
        false => ip_of(&ethernet).to_vec(),
    };
    // Warm up the neighbour entry and conntrack.
    for _ in 0..100 {
        let _ = (&queues[0]).write(&packet);
    }
    std::thread::sleep(Duration::from_millis(200));

    // The kernel's per-program statistics, on only while this fd is open,
    // and only for the in-situ table: they cost two clock reads a run,
    // which on this VM is a tenth of the path's time.
    let in_situ = matches!(generator, Generator::Writes(_));
    let stats = dp
        .as_ref()
        .filter(|_| in_situ)
        .map(|_| aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS"));
    let before_progs = dp.as_mut().map(|(dp, ..)| snapshot(dp));
    // Replies go to the flow's NAT port through veil, and to the client's
    // own port, which MASQUERADE kept, through the kernel.
    let reply_port = dp.as_ref().map_or(40000, |(_, _, nat)| *nat);
    let mut reply = frame(REMOTE, PUBLIC, 64, L4::udp(9, reply_port, &[0u8; 22]));
    reply[..6].copy_from_slice(&veil_tests::lossy::mac_of(&gw, "wan0"));
    let delivered = || match replies {
        true => tx_handled(&gw, "veilgw"),
        false => rx_packets(&remote),
    };
    let before = delivered();
    let elapsed = match generator {
        Generator::Writes(_) => generate(&queues, &packet, secs),
        Generator::Live(threads) => inject(&gw, "veilgw", &packet, threads, secs),
        Generator::LiveReplies(threads) => inject(&gw, "wan0", &reply, threads, secs),
    };
    std::thread::sleep(Duration::from_millis(100));
    let delivered = delivered() - before;
    let programs = dp.as_mut().filter(|_| in_situ).map(|(dp, _, nat)| {
        let tun = snapshot(dp)[0].since(before_progs.unwrap()[0]);
        // The WAN programs on replies (translated to the TUN, whose queue
        // nobody reads: they are dropped there) and on the host's own
        // traffic (the XDP floor), each a phase of its own.
        let phase = |dp: &mut Datapath, port: u16| {
            let before = snapshot(dp);
            from_remote(&remote, (PUBLIC, port), secs.min(1.0));
            let after = snapshot(dp);
            (after[1].since(before[1]), after[2].since(before[2]))
        };
        let (reply_tc, reply_xdp) = phase(dp, *nat);
        let (host_tc, host_xdp) = phase(dp, 5555);
        InSitu {
            tun,
            reply_xdp,
            reply_tc,
            host_xdp,
            host_tc,
        }
    });
    drop(stats);
    Forwarded {
        pps: delivered as f64 / elapsed,
        programs,
    }
}

/// Packets `dev` of `ns` took to send: sent and dropped (a TAP device
/// nobody reads drops what its queue has no room for).
fn tx_handled(ns: &NetNs, dev: &str) -> u64 {
    let v = link_json(ns, dev);
    let tx = &v[0]["stats64"]["tx"];
    tx["packets"].as_u64().expect("tx packets") + tx["dropped"].as_u64().expect("tx dropped")
}

/// `ip -s -j link show dev` in `ns`, parsed.
fn link_json(ns: &NetNs, dev: &str) -> serde_json::Value {
    let out = Command::new("ip")
        .args(["-n", ns.name(), "-s", "-j", "link", "show", dev])
        .output()
        .expect("ip link");
    serde_json::from_slice(&out.stdout).expect("ip -j output")
}

pub(crate) fn rx_packets(ns: &NetNs) -> u64 {
    link_json(ns, "eth0")[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .expect("rx packets")
}

/// Creations and deletions per second of `n` flows (distinct clients and
/// ports toward a handful of remotes, as a busy gateway sees them).
pub(crate) fn flow_setup(n: u32, forwarding: bool) -> (f64, f64) {
    let mut dp = Datapath::load().unwrap();
    let flows = gateway_flow_table(&mut dp);
    let mut flows = if forwarding {
        flows
    } else {
        flows.without_forwarding()
    };
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
