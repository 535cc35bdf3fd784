//! `forward`: a port forwarded by veil's datapath (`--forward`) beside
//! direct routing and beside the user-space relays users pick for the job
//! (HAProxy and socat, Debian's), on one topology, in one run.
//!
//! The remote namespace (the internet side) reaches a host in the lan
//! namespace behind the gateway: directly by the gateway's kernel routing
//! (ip_forward on, the lan host's address), or through a port of the
//! gateway's public address: veil, HAProxy or socat. The gateway runs
//! throughout, so every path sees the same offload settings (XDP on the
//! WAN veth turns segmentation offload off on its peer).

#[allow(unused_imports, reason = "one import list for the benchmark's modules")]
use super::*;

/// A path from the remote to the lan host's iperf3 server and discard
/// port.
struct Path {
    name: &'static str,
    iperf: std::net::SocketAddr,
    discard: std::net::SocketAddr,
}

const LAN: Ipv4Addr = Ipv4Addr::new(10, 200, 9, 2);
const GW_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

const PATHS: [Path; 4] = [
    Path {
        name: "direct routing",
        iperf: std::net::SocketAddr::new(std::net::IpAddr::V4(LAN), 5201),
        discard: std::net::SocketAddr::new(std::net::IpAddr::V4(LAN), 9),
    },
    Path {
        name: "veil forward",
        iperf: std::net::SocketAddr::new(std::net::IpAddr::V4(GW_PUBLIC), 5201),
        discard: std::net::SocketAddr::new(std::net::IpAddr::V4(GW_PUBLIC), 9009),
    },
    Path {
        name: "haproxy",
        iperf: std::net::SocketAddr::new(std::net::IpAddr::V4(GW_PUBLIC), 6201),
        discard: std::net::SocketAddr::new(std::net::IpAddr::V4(GW_PUBLIC), 6009),
    },
    Path {
        name: "socat",
        iperf: std::net::SocketAddr::new(std::net::IpAddr::V4(GW_PUBLIC), 7201),
        discard: std::net::SocketAddr::new(std::net::IpAddr::V4(GW_PUBLIC), 7009),
    },
];

/// HAProxy's configuration: plain TCP relays. `maxconn` within the
/// machine's open-file limit (HAProxy refuses to start otherwise).
const HAPROXY_CFG: &str = "global
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
listen iperf
    bind 198.18.0.1:6201
    server lan 10.200.9.2:5201
listen discard
    bind 198.18.0.1:6009
    server lan 10.200.9.2:9
";

#[derive(Default, Clone, Copy)]
struct Figures {
    up: f64,
    down: f64,
    conns: f64,
}

pub(crate) fn forwarding(quick: bool) {
    use veil_tests::{proc::Proc, world::World};

    let (secs, short, runs) = if quick { (2, 1, 1) } else { (5, 3, 3) };
    let mut world = World::bare(0);
    let rules = world.dir.join("forward.csv");
    std::fs::write(&rules, "5201,10.200.9.2,5201\n9009,10.200.9.2,9\n").unwrap();
    world.start_gateway(&["--forward", rules.to_str().unwrap()]);

    // The lan host: an iperf3 server and a discard port.
    let _iperf = {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", world.lan.name()))
            .args(["iperf3", "-s", "-B", "10.200.9.2"]);
        Proc::start("iperf3 -s", cmd, world.dir.join("iperf3.log"))
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let discard = world
        .lan
        .enter(|| std::net::TcpListener::bind((LAN, 9)).unwrap());
    veil_tests::world::discard_forever(discard, stop.clone());

    // Direct routing: the gateway's kernel forwards between its links.
    world.gw.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    world
        .remote
        .ip(&["route", "add", "10.200.9.0/24", "via", "198.18.0.1"]);
    world
        .lan
        .ip(&["route", "add", "default", "via", "10.200.9.1"]);

    // The relays, in the gateway namespace.
    let cfg = world.dir.join("haproxy.cfg");
    std::fs::write(&cfg, HAPROXY_CFG).unwrap();
    let relay = |name: &str, args: &[&str]| {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", world.gw.name()))
            .args(args);
        Proc::start(name, cmd, world.dir.join(format!("{name}.log")))
    };
    let _haproxy = relay("haproxy", &["haproxy", "-db", "-f", cfg.to_str().unwrap()]);
    let _socat = relay(
        "socat",
        &[
            "socat",
            "TCP-LISTEN:7201,bind=198.18.0.1,fork,reuseaddr",
            "TCP:10.200.9.2:5201",
        ],
    );
    let _socat_discard = relay(
        "socat-discard",
        &[
            "socat",
            "TCP-LISTEN:7009,bind=198.18.0.1,fork,reuseaddr",
            "TCP:10.200.9.2:9",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));

    let ns = world.remote.name().to_owned();
    let mut results: Vec<Vec<Figures>> = vec![Vec::new(); PATHS.len()];
    for _ in 0..runs {
        for (i, path) in PATHS.iter().enumerate() {
            eprintln!("measuring {} ...", path.name);
            let f = Figures {
                up: iperf3_to(&ns, path.iperf, secs, 1, false),
                down: iperf3_to(&ns, path.iperf, secs, 1, true),
                conns: connections_per_sec_to(&world.remote, path.discard, short),
            };
            results[i].push(f);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let status = world.status();
    eprintln!("veil forwards: {}", status["forwards"]);
    eprintln!("veil datapath: {}", datapath_counts(&status));
    let median = |v: &[Figures], f: fn(&Figures) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(|a, b| a.partial_cmp(b).unwrap());
        x[x.len() / 2]
    };
    let figures: Vec<Figures> = results
        .iter()
        .map(|r| Figures {
            up: median(r, |f| f.up),
            down: median(r, |f| f.down),
            conns: median(r, |f| f.conns),
        })
        .collect();
    print!("{}", table(&figures, secs, short, runs));
}

fn table(f: &[Figures], secs: u32, short: u32, runs: usize) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## veil port forwarding beside direct routing and user-space relays\n"
    );
    let _ = writeln!(
        out,
        "kernel {}, {} CPUs. Remote namespace → gateway → lan host over veth pairs, MTU 1500; \
         iperf3 {secs} s one stream, new connections/s over {short} s from 16 threads \
         (reset on close); median of {runs} run(s).\n",
        kernel(),
        num_cpus()
    );
    let _ = writeln!(
        out,
        "| path | remote → lan (Gbit/s) | lan → remote (Gbit/s) | new connections/s (thousands) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for (path, f) in PATHS.iter().zip(f) {
        let _ = writeln!(
            out,
            "| {} | {:.2} | {:.2} | {:.2} |",
            path.name,
            f.up / 1e9,
            f.down / 1e9,
            f.conns / 1e3
        );
    }
    let (direct, veil) = (f[0], f[1]);
    let best = |g: fn(&Figures) -> f64| g(&f[2]).max(g(&f[3]));
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let _ = writeln!(
        out,
        "| veil ÷ direct | {:.2} | {:.2} | {:.2} |",
        ratio(veil.up, direct.up),
        ratio(veil.down, direct.down),
        ratio(veil.conns, direct.conns)
    );
    let _ = writeln!(
        out,
        "| veil ÷ faster relay | {:.2} | {:.2} | {:.2} |",
        ratio(veil.up, best(|x| x.up)),
        ratio(veil.down, best(|x| x.down)),
        ratio(veil.conns, best(|x| x.conns))
    );
    out
}
