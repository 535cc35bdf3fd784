//! `tunnel`: TCP throughput and round trips through veil beside direct
//! routing, on the real binaries.

#[allow(unused_imports, reason = "one import list for the benchmark's modules")]
use super::*;

/// TCP throughput and round-trip time from a client namespace to the
/// remote, through veil and, on the same topology, by plain routing through
/// the gateway namespace.
pub(crate) fn tunnel(quick: bool) {
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

pub(crate) struct Measured {
    up: f64,
    down: f64,
    rtt_mean_us: f64,
    rtt_max_us: f64,
}

pub(crate) fn measure(world: &veil_tests::world::World, secs: u32) -> Measured {
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
