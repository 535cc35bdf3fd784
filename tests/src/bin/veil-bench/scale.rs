//! `scale`: aggregate TCP throughput through one gateway with 1, 2, 4 and
//! 8 clients at once (each its own session, namespace and iperf3 stream to
//! a server of its own on the remote), with the TUN device's default
//! queues (one per worker thread) and, in the same run on a fresh
//! topology, with one queue (`--tun-queues 1`, the gateway before
//! multi-queue); and the gateway's CPU time per GB carried.
//! `VEIL_BENCH_TRANSPORT=h3` runs the clients over HTTP/3 instead of
//! TLS/TCP.

#[allow(unused_imports, reason = "one import list for the benchmark's modules")]
use super::*;

/// Clients at once, in the order measured.
const CLIENTS: [usize; 4] = [1, 2, 4, 8];
/// Client `i`'s iperf3 server listens on `BASE_PORT + i`.
const BASE_PORT: u16 = 5300;

/// Aggregate throughput of `n` clients, one way.
struct Point {
    down: f64,
    up: f64,
}

/// One gateway setting over every client count, and what it cost.
struct Series {
    queues: String,
    points: Vec<Point>,
    /// Gateway CPU seconds (user + system, every thread) per GB carried.
    cpu_per_gb: f64,
    /// The gateway's counters of replies it could not queue, and the TUN
    /// device's queue drops, over the whole series.
    drops: String,
}

pub(crate) fn scale(quick: bool) {
    let secs = if quick { 3 } else { 8 };
    let transport = Transport::from_env();
    let cpus = num_cpus();
    println!("## veil across cores: clients at once\n");
    println!(
        "kernel {}, {cpus} CPUs shared by the gateway, every client and the remote; iperf3 {secs} s per run, \
         one TCP stream per client, all clients at once, each to a server of its own; \
         {} transport; a fresh topology per setting.\n",
        kernel(),
        transport.name(),
    );
    let multi = format!("default ({cpus}, one per worker)");
    let series = [
        measure_series(&multi, &[], transport, secs),
        measure_series(
            "1 (`--tun-queues 1`)",
            &["--tun-queues", "1"],
            transport,
            secs,
        ),
    ];
    println!(
        "| TUN queues | clients | down (Gbit/s) | up (Gbit/s) | down ÷ 1 client | up ÷ 1 client |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for s in &series {
        let (down1, up1) = (s.points[0].down.max(1.0), s.points[0].up.max(1.0));
        for (n, p) in CLIENTS.iter().zip(&s.points) {
            println!(
                "| {} | {n} | {:.2} | {:.2} | {:.2} | {:.2} |",
                s.queues,
                p.down / 1e9,
                p.up / 1e9,
                p.down / down1,
                p.up / up1
            );
        }
    }
    println!("\n| TUN queues | gateway CPU s per GB | drops (gateway counters, TUN queue) |");
    println!("|---|---:|---|");
    for s in &series {
        println!("| {} | {:.2} | {} |", s.queues, s.cpu_per_gb, s.drops);
    }
    println!("\nmulti-queue ÷ one queue, aggregate down and up, by clients:\n");
    println!("| clients | down | up |");
    println!("|---:|---:|---:|");
    for (i, n) in CLIENTS.iter().enumerate() {
        let (m, o) = (&series[0].points[i], &series[1].points[i]);
        println!(
            "| {n} | {:.2} | {:.2} |",
            m.down / o.down.max(1.0),
            m.up / o.up.max(1.0)
        );
    }
}

/// Every client count against a gateway started with `flags`.
fn measure_series(queues: &str, flags: &[&str], transport: Transport, secs: u32) -> Series {
    use veil_tests::{proc::Proc, world::World};

    let most = *CLIENTS.last().expect("client counts");
    let mut world = World::bare(most);
    let _servers: Vec<Proc> = (1..=most)
        .map(|i| {
            let port = (BASE_PORT + i as u16).to_string();
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net=/var/run/netns/{}", world.remote.name()))
                .args(["iperf3", "-s", "-B", "198.18.0.2", "-p", &port]);
            Proc::start("iperf3 -s", cmd, world.dir.join(format!("iperf3-{i}.log")))
        })
        .collect();
    veil_tests::peers::veil_gateway(&mut world, flags);
    let _clients: Vec<Proc> = (1..=most)
        .map(|i| {
            let profile = world.add_client(&format!("scale{i}"), i);
            world.start_client_with(i, &profile, true, &["--transport", transport.flag()])
        })
        .collect();
    let pid = world.gateway().pid();
    let cpu_before = process_cpu_secs(pid);
    let before = reply_drops(&world);
    let mut bytes = 0.0;
    let points = CLIENTS
        .iter()
        .map(|&n| {
            let down = all_at_once(&world, n, secs, true);
            let up = all_at_once(&world, n, secs, false);
            bytes += (down + up) * f64::from(secs) / 8.0;
            eprintln!(
                "{queues}: {n} clients, down {:.2} up {:.2} Gbit/s",
                down / 1e9,
                up / 1e9
            );
            Point { down, up }
        })
        .collect();
    let cpu = process_cpu_secs(pid) - cpu_before;
    let after = reply_drops(&world);
    let drops: Vec<String> = after
        .iter()
        .zip(&before)
        .map(|((name, a), (_, b))| format!("{name} {}", a - b))
        .collect();
    Series {
        queues: queues.into(),
        points,
        cpu_per_gb: cpu / (bytes / 1e9).max(1e-9),
        drops: drops.join(", "),
    }
}

/// Aggregate bits per second of clients 1..=`n`, each running iperf3 to
/// its own server at the same time (downloads with `reverse`).
fn all_at_once(world: &veil_tests::world::World, n: usize, secs: u32, reverse: bool) -> f64 {
    std::thread::scope(|s| {
        let runs: Vec<_> = (1..=n)
            .map(|i| {
                let ns = world.client(i).name().to_owned();
                let server = (REMOTE, BASE_PORT + i as u16).into();
                s.spawn(move || iperf3_to(&ns, server, secs, 1, reverse))
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap_or(0.0)).sum()
    })
}

/// The counts of replies lost on the way to a session: the gateway's
/// (a session's queue full, no session) and the TUN device's queue drops.
fn reply_drops(world: &veil_tests::world::World) -> Vec<(&'static str, u64)> {
    let status = world.status();
    let c = &status["counters"];
    ["client_queue_full", "no_session", "tun_queue_full"]
        .into_iter()
        .map(|k| (k, c[k].as_u64().unwrap_or(0)))
        .collect()
}
