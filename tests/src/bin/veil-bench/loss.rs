//! `loss`: TCP goodput through veil over HTTP/3 and over TLS/TCP on a
//! lossy link between client and gateway, without and with a round trip
//! (this kernel has no netem: a user-space delay line at each end of the
//! client's veth drops a fraction of the packets at random and holds the
//! rest): what TCP over TCP costs, and what carrying packets in QUIC
//! datagrams saves.

#[allow(unused_imports, reason = "one import list for the benchmark's modules")]
use super::*;

use veil_tests::lossy::{mac_of, DelayLine};

/// Loss each way, in percent.
const LOSSES: [f64; 3] = [0.0, 1.0, 3.0];

/// `VEIL_BENCH_RTT_MS=0,20` sets the round trips (ms) measured,
/// `VEIL_BENCH_TCP_CC=bbr,cubic` the TCP congestion controls (every TCP
/// on the path: iperf3's, the TLS/TCP tunnel's).
pub(crate) fn loss(quick: bool) {
    let secs = if quick { 4 } else { 10 };
    let rtts: Vec<u64> = std::env::var("VEIL_BENCH_RTT_MS")
        .unwrap_or_else(|_| "0,20".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let ccs: Vec<String> = std::env::var("VEIL_BENCH_TCP_CC")
        .unwrap_or_else(|_| "cubic,bbr".into())
        .split(',')
        .map(|c| c.trim().to_owned())
        .collect();
    println!("## veil on a lossy path: HTTP/3 beside TLS/TCP\n");
    println!(
        "kernel {}, {} CPUs; iperf3, one TCP stream, {secs} s per run. The client's link to the gateway (a veth pair) runs through a delay line at each end: a TUN device whose reader drops that fraction of the packets each way at random (per packet: the kernel segments offload super-packets for a TUN device without offloads) and holds the rest for half the round trip before it sends them on with an AF_PACKET socket. veil's QUIC connection runs BBR (quinn's); the TCP congestion control is that of every TCP on the path (iperf3's `-C` and, by a route's `congctl`, the TLS/TCP tunnel's; the host's default is BBR).\n",
        kernel(),
        num_cpus()
    );
    println!("| TCP congestion control | RTT (ms) | loss each way | direction | HTTP/3 (Mbit/s) | TLS/TCP (Mbit/s) | HTTP/3 ÷ TLS/TCP |");
    println!("|---|---:|---:|---|---:|---:|---:|");
    for (cc, rtt) in ccs
        .iter()
        .flat_map(|cc| rtts.iter().map(move |rtt| (cc.as_str(), *rtt)))
    {
        let world = lossy_world();
        let (client, gateway) = (Ipv4Addr::new(10, 200, 1, 2), Ipv4Addr::new(10, 200, 1, 1));
        let half = Duration::from_micros(rtt * 500);
        // The tunnel's TCP connection runs `cc` by its route (a network
        // namespace may only default to the algorithms the host allows).
        let congctl = ["congctl", cc];
        let lines = [
            DelayLine::new(
                world.client(1),
                "eth0",
                (client, gateway),
                mac_of(&world.gw, "c1"),
                half,
                &congctl,
            ),
            DelayLine::new(
                &world.gw,
                "c1",
                (gateway, client),
                mac_of(world.client(1), "eth0"),
                half,
                &congctl,
            ),
        ];
        let profile = world.add_client("lossy", 1);
        // figures[transport][(loss, direction)]
        let mut figures: Vec<Vec<f64>> = Vec::new();
        for transport in ["h3", "tcp"] {
            eprintln!("{cc}, RTT {rtt} ms, {transport} ...");
            for line in &lines {
                line.set_loss(0.0);
            }
            let mut veil = world.start_client_with(1, &profile, true, &["--transport", transport]);
            let ns = world.client(1).name();
            let mut rates = Vec::new();
            for percent in LOSSES {
                for line in &lines {
                    line.set_loss(percent);
                }
                for reverse in [true, false] {
                    let server = (Ipv4Addr::new(198, 18, 0, 2), 5201).into();
                    let report = iperf3_json(ns, server, secs, 1, reverse, &["-C", cc]);
                    let rate = report["end"]["sum_received"]["bits_per_second"]
                        .as_f64()
                        .unwrap_or(0.0)
                        / 1e6;
                    eprintln!("  {percent} % loss, reverse {reverse}: {rate:.1} Mbit/s");
                    rates.push(rate);
                }
            }
            veil.stop();
            figures.push(rates);
        }
        drop(lines);
        let mut i = 0;
        for percent in LOSSES {
            for direction in ["remote→client", "client→remote"] {
                let (h3, tcp) = (figures[0][i], figures[1][i]);
                // A run iperf3 could not finish (its control connection
                // lost too) shows as such, not as a ratio.
                let shown = |v: f64| {
                    if v > 0.0 {
                        format!("{v:.1}")
                    } else {
                        "failed".into()
                    }
                };
                let ratio = if h3 > 0.0 && tcp > 0.0 {
                    format!("{:.2}", h3 / tcp)
                } else {
                    "–".into()
                };
                println!(
                    "| {cc} | {rtt} | {percent} % | {direction} | {} | {} | {ratio} |",
                    shown(h3),
                    shown(tcp)
                );
                i += 1;
            }
        }
    }
}

/// One client, the gateway and the remote's iperf3 server.
fn lossy_world() -> LossyWorld {
    use veil_tests::{proc::Proc, world::World};
    let mut world = World::bare(1);
    let iperf = {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", world.remote.name()))
            .args(["iperf3", "-s", "-B", "198.18.0.2"]);
        Proc::start("iperf3 -s", cmd, world.dir.join("iperf3.log"))
    };
    std::thread::sleep(Duration::from_millis(300));
    veil_tests::peers::veil_gateway(&mut world, &[]);
    LossyWorld {
        _iperf: iperf,
        world,
    }
}

struct LossyWorld {
    _iperf: veil_tests::proc::Proc,
    world: veil_tests::world::World,
}

impl std::ops::Deref for LossyWorld {
    type Target = veil_tests::world::World;
    fn deref(&self) -> &Self::Target {
        &self.world
    }
}
