//! `tunnel`: TCP throughput (with the download's retransmissions), round
//! trips, small packets and new connections through veil beside direct
//! routing, on the real binaries, with GRO on and off on the gateway's WAN
//! veth; and every counter of a packet lost on veil's path.

use std::collections::BTreeMap;

#[allow(unused_imports, reason = "one import list for the benchmark's modules")]
use super::*;

/// The paths the tunnel benchmark compares: a name, and what
/// `VEIL_BENCH_PATHS` calls it (for veil: the transport).
const PATHS: [(&str, &str); 5] = [
    ("direct routing", "direct"),
    ("routing + MASQUERADE", "masquerade"),
    ("veil (TLS/TCP)", "tcp"),
    ("veil (TLS/TCP, `--wan-filter xdp`)", "tcp-xdp"),
    ("veil (HTTP/3)", "h3"),
];

/// TCP throughput, retransmissions and round trips from a client namespace
/// to the remote, through veil over both transports and, on the same
/// topology, by plain routing through the gateway namespace; each with GRO
/// on the gateway's WAN veth (as NIC drivers have it) and without.
/// `VEIL_BENCH_PATHS=direct,masquerade,tcp,tcp-xdp,h3` narrows the paths;
/// `VEIL_BENCH_GRO=on` or `off` one setting;
/// `VEIL_BENCH_GATEWAY` and `VEIL_BENCH_CLIENT` add flags to veil's ends.
pub(crate) fn tunnel(quick: bool) {
    let secs = if quick { 2 } else { 5 };
    let wanted = std::env::var("VEIL_BENCH_PATHS").ok();
    let paths: Vec<_> = PATHS
        .into_iter()
        .filter(|(_, t)| match &wanted {
            Some(w) => w.split(',').any(|p| p == *t),
            None => true,
        })
        .collect();
    println!("## veil tunnel benchmark\n");
    println!(
        "kernel {}, {} CPUs; iperf3 {secs} s per run, one stream; UDP 64 B and connections {secs} s;",
        kernel(),
        num_cpus()
    );
    println!("ping: 50 echoes 10 ms apart. A fresh topology per path and setting.\n");
    let mut drops = Vec::new();
    println!("| WAN GRO | path | up (Gbit/s) | down (Gbit/s) | down ÷ up | retransmits down | RTT mean (µs) | RTT p99 (µs) | CPUs busy during pings | UDP 64 B (kpps) | connections/s (k) |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let settings: Vec<bool> = match std::env::var("VEIL_BENCH_GRO").as_deref() {
        Ok("on") => vec![true],
        Ok("off") => vec![false],
        _ => vec![true, false],
    };
    for gro in settings {
        for (name, transport) in &paths {
            let (m, lost) = tunnel_path(gro, transport, secs);
            println!(
                "| {} | {name} | {:.2} | {:.2} | {:.2} | {} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} |",
                if gro { "on" } else { "off" },
                m.up / 1e9,
                m.down / 1e9,
                m.down / m.up.max(1.0),
                m.retransmits_down,
                m.rtt_mean_us,
                m.rtt_p99_us,
                m.ping_cpu,
                m.udp64_pps / 1e3,
                m.conn_per_s / 1e3,
            );
            if !matches!(*transport, "direct" | "masquerade") {
                drops.push((gro, *name, lost));
            }
        }
    }
    println!("\nveil's drop counters (the gateway's own, the datapath's drop reasons, `ip -s link` drops of veilgw, wan0, c1, the client's veil0 and eth0, and the remote's eth0, whose transmit drops are the WAN veth's receive ring overflowing) that moved: during the TCP runs and pings, which must be none; and in all, with the unpaced UDP flood (faster than any tunnel: its excess is dropped at the client's TUN queue, as a NIC's ring would) and the connections:\n");
    println!("| WAN GRO | path | TCP up, down, pings | in all |");
    println!("|---|---|---|---|");
    for (gro, name, lost) in drops {
        println!(
            "| {} | {name} | {} | {} |",
            if gro { "on" } else { "off" },
            describe(&lost.tcp),
            describe(&lost.flood)
        );
    }
}

/// One path on a fresh topology: its figures and the drops counted on it.
fn tunnel_path(gro: bool, path: &str, secs: u32) -> (Measured, Lost) {
    use veil_tests::{proc::Proc, world::World};

    let mut world = World::bare(1);
    if !gro {
        // A NIC without GRO: every reply reaches the gateway as its own
        // packet. The remote sends MTU-sized ones whatever the path (an
        // XDP program on wan0 already takes its TSO; without one its
        // 64 KiB TSO packets would cross the veth whole).
        world.gw.exec("ethtool", &["-K", "wan0", "gro", "off"]);
        world
            .remote
            .exec("ethtool", &["-K", "eth0", "tso", "off", "gso", "off"]);
    }
    let _iperf = {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", world.remote.name()))
            .args(["iperf3", "-s", "-B", "198.18.0.2"]);
        Proc::start("iperf3 -s", cmd, world.dir.join("iperf3.log"))
    };
    std::thread::sleep(Duration::from_millis(300));
    let kernel = match path {
        "direct" => Some(veil_tests::peers::Kind::Direct),
        "masquerade" => Some(veil_tests::peers::Kind::Masquerade),
        _ => None,
    };
    if let Some(kind) = kernel {
        // Direct routing with veil's gateway (and so its WAN filter)
        // running, as in the tests: the same veth offloads as veil's
        // path. MASQUERADE without: the filter would drop the replies
        // to its ports, which fall in veil's NAT range.
        if kind == veil_tests::peers::Kind::Direct {
            veil_tests::peers::veil_gateway(&mut world, &[]);
        }
        let _path = veil_tests::peers::up(&mut world, kind);
        return (measure(&world, secs, || ()), Lost::default());
    }
    // veil picks the WAN filter for the veth (TC); `tcp-xdp`: the TLS/TCP
    // transport with XDP on the WAN, as on a NIC.
    let (transport, xdp) = match path {
        "tcp-xdp" => ("tcp", true),
        other => (other, false),
    };
    // Extra flags of either end, for trying options (say `--busy-poll`).
    let flags = |var: &str| std::env::var(var).unwrap_or_default();
    let (gw_flags, client_flags) = (flags("VEIL_BENCH_GATEWAY"), flags("VEIL_BENCH_CLIENT"));
    let mut gw_flags: Vec<&str> = gw_flags.split_whitespace().collect();
    if xdp {
        gw_flags.extend(["--wan-filter", "xdp"]);
    }
    veil_tests::peers::veil_gateway(&mut world, &gw_flags);
    let profile = world.add_client("bench", 1);
    let mut client_args = vec!["--transport", transport];
    client_args.extend(client_flags.split_whitespace());
    let _client = world.start_client_with(1, &profile, true, &client_args);
    if let Ok(q) = std::env::var("VEIL_BENCH_TXQLEN") {
        world.gw.ip(&["link", "set", "veilgw", "txqueuelen", &q]);
        world
            .client(1)
            .ip(&["link", "set", "veil0", "txqueuelen", &q]);
    }
    if let Ok(secs) = std::env::var("VEIL_BENCH_HOLD") {
        eprintln!(
            "holding: client namespace {}, gateway {}",
            world.client(1).name(),
            world.gw.name()
        );
        std::thread::sleep(Duration::from_secs(secs.parse().unwrap_or(60)));
    }
    let before = veil_drops(&world);
    let mut tcp = BTreeMap::new();
    let m = measure(&world, secs, || tcp = since(&before, veil_drops(&world)));
    let flood = since(&before, veil_drops(&world));
    (m, Lost { tcp, flood })
}

/// Drops counted on a path: during the TCP runs and pings, and in all
/// (the UDP flood and the connections included).
#[derive(Default)]
struct Lost {
    tcp: BTreeMap<String, u64>,
    flood: BTreeMap<String, u64>,
}

fn since(before: &BTreeMap<String, u64>, now: BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    now.into_iter()
        .map(|(k, v)| {
            let d = v.saturating_sub(before.get(&k).copied().unwrap_or(0));
            (k, d)
        })
        .filter(|(_, d)| *d > 0)
        .collect()
}

fn describe(lost: &BTreeMap<String, u64>) -> String {
    if lost.is_empty() {
        return "none".into();
    }
    let all: Vec<String> = lost.iter().map(|(k, v)| format!("{k} {v}")).collect();
    all.join(", ")
}

pub(crate) struct Measured {
    up: f64,
    down: f64,
    retransmits_down: u64,
    rtt_mean_us: f64,
    rtt_p99_us: f64,
    /// Busy CPUs (whole machine) while the pings ran: what busy-polling
    /// costs shows here.
    ping_cpu: f64,
    udp64_pps: f64,
    conn_per_s: f64,
}

/// The figures of one path; `between` runs after the TCP runs (and the
/// pings), before the UDP flood: the drops counted up to there are the
/// ones that must be zero.
pub(crate) fn measure(
    world: &veil_tests::world::World,
    secs: u32,
    mut between: impl FnMut(),
) -> Measured {
    let ns = world.client(1).name();
    let up = iperf3(ns, secs, 1, false);
    let (down, retransmits_down) = iperf3_retransmits(ns, secs, true);
    let busy = cpu_busy_secs();
    let started = std::time::Instant::now();
    let rtt = ping_times(ns, 50);
    let ping_cpu = (cpu_busy_secs() - busy) / started.elapsed().as_secs_f64();
    between();
    Measured {
        up,
        down,
        retransmits_down,
        rtt_mean_us: mean(&rtt),
        rtt_p99_us: p99(&rtt),
        ping_cpu,
        udp64_pps: udp_pps(ns, secs, 64),
        conn_per_s: connections_per_sec(world, secs),
    }
}

/// Every count of a packet lost on veil's path, not zero: the gateway's
/// own counters (user space), the datapath's drop reasons, and the drops
/// of the interfaces on the way (the TUN devices' queues among them).
pub(crate) fn veil_drops(world: &veil_tests::world::World) -> BTreeMap<String, u64> {
    let status = world.status();
    let mut lost: BTreeMap<String, u64> = status["counters"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| !k.starts_with("dns_") && *k != "client_to_client")
        .map(|(k, v)| (format!("gateway {k}"), v.as_u64().unwrap_or(0)))
        .collect();
    lost.extend(
        status["datapath"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(reason, _)| reason.contains("drop"))
            .map(|(reason, c)| {
                let n = c["packets"].as_u64().unwrap_or(0);
                (format!("datapath {reason}"), n)
            }),
    );
    // The remote's end of the WAN veth counts as its own transmit drops
    // what `wan0`'s receive ring (256 packets, there with XDP or GRO on
    // the veth) had no room for: where a NIC would count missed packets.
    let links = [
        (&world.gw, "veilgw", "veilgw"),
        (&world.gw, "wan0", "wan0"),
        (&world.gw, "c1", "c1"),
        (world.client(1), "veil0", "veil0"),
        (world.client(1), "eth0", "eth0"),
        (&world.remote, "eth0", "remote eth0"),
    ];
    for (ns, dev, label) in links {
        for (dir, n) in link_drops(ns, dev) {
            lost.insert(format!("{label} {dir} dropped"), n);
        }
    }
    // Socket buffers: HTTP/3's datagrams can overflow either end's.
    for (ns, end) in [(&world.gw, "gateway"), (world.client(1), "client")] {
        for (counter, n) in udp_buffer_errors(ns) {
            lost.insert(format!("{end} UDP {counter}"), n);
        }
    }
    lost
}

/// A namespace's UDP receive and send buffer errors (`/proc/net/snmp`).
fn udp_buffer_errors(ns: &NetNs) -> Vec<(String, u64)> {
    let out = ns.exec("cat", &["/proc/net/snmp"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return Vec::new();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter(|(name, _)| matches!(*name, "RcvbufErrors" | "SndbufErrors"))
        .map(|(name, v)| (name.to_owned(), v.parse().unwrap_or(0)))
        .collect()
}

/// An interface's receive and transmit drops.
fn link_drops(ns: &NetNs, dev: &str) -> Vec<(&'static str, u64)> {
    let out = ns.ip(&["-s", "-j", "link", "show", "dev", dev]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let stats = &v[0]["stats64"];
    [("rx", &stats["rx"]), ("tx", &stats["tx"])]
        .into_iter()
        .map(|(dir, s)| (dir, s["dropped"].as_u64().unwrap_or(0)))
        .collect()
}
