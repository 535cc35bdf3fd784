//! `peers`: veil beside OpenVPN, boringtun, MASQUERADE and direct routing,
//! on one topology, as one table.

#[allow(unused_imports, reason = "one import list for the benchmark's modules")]
use super::*;

/// `--only a,b`: the peer paths to measure.
pub(crate) fn only() -> Vec<veil_tests::peers::Kind> {
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
pub(crate) struct Figure {
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
pub(crate) const PEER_FIGURES: [(&str, &str, bool); 14] = [
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

pub(crate) fn peers(quick: bool, kinds: Vec<veil_tests::peers::Kind>) {
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
            if matches!(
                kind,
                peers::Kind::Veil | peers::Kind::VeilH3 | peers::Kind::VeilWs
            ) {
                // What the gateway dropped, for reading the figures.
                let status = world.status();
                eprintln!("veil gateway counters: {}", status["counters"]);
                eprintln!("veil datapath: {}", datapath_counts(&status));
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

pub(crate) fn peers_table(
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
        "Topology: client — gateway — remote namespaces over veth pairs, MTU 1500. Offloads: as the kernel sets them, plus GRO on the gateway's WAN veth (NIC drivers default to it); direct-no-offload turns TSO, GSO, GRO and TX checksumming off on every veth. veil: TUN devices with TSO (offload datagrams), the WAN filter it picks for a veth (TC).\n"
    );
    let _ = write!(out, "| figure |");
    for n in &order {
        let _ = write!(out, " {n} |");
    }
    // veil-h3 and veil-ws (when measured) have their own columns.
    let extra: Vec<&str> = ["veil-h3", "veil-ws"]
        .into_iter()
        .filter(|p| order.contains(p))
        .collect();
    let mut head = String::new();
    for p in &extra {
        let _ = write!(head, " {p} ÷ best peer | {p} ÷ veil |");
    }
    let _ = writeln!(out, " veil ÷ direct | veil ÷ best peer |{head}");
    let _ = writeln!(
        out,
        "|---|{}---:|---:|{}",
        "---:|".repeat(order.len()),
        "---:|---:|".repeat(extra.len())
    );
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
        let median = |path: &str| results.get(path).and_then(|r| r.get(key)).map(|f| f.median);
        let veil = median("veil");
        let direct = median("direct");
        let best_peer = peers.iter().filter_map(|p| median(p)).reduce(|a, b| {
            if higher_better == (a > b) {
                a
            } else {
                b
            }
        });
        let ratio = |ours: Option<f64>, other: Option<f64>| match (ours, other) {
            (Some(v), Some(o)) if o > 0.0 => format!("{:.2}", v / o),
            _ => "–".into(),
        };
        let _ = write!(
            out,
            " {} | {} |",
            ratio(veil, direct),
            ratio(veil, best_peer)
        );
        for p in &extra {
            let _ = write!(
                out,
                " {} | {} |",
                ratio(median(p), best_peer),
                ratio(median(p), veil)
            );
        }
        let _ = writeln!(out);
    }
    out
}
