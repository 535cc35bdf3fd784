//! `ipv6`: TCP through veil over IPv6 beside IPv4, each beside direct
//! routing of the same family, in one run on the same namespaces.

#[allow(unused_imports, reason = "one import list for the benchmark's modules")]
use super::*;

/// One family's TCP throughput each way, in bit/s.
struct Family {
    up: f64,
    down: f64,
}

fn both_ways(ns: &str, server: std::net::SocketAddr, secs: u32) -> Family {
    Family {
        up: one_run(ns, server, secs, false),
        down: one_run(ns, server, secs, true),
    }
}

/// One iperf3 run; a run that reports nothing (seen now and then on a
/// busy machine, either family, either path) is run once more, and said.
fn one_run(ns: &str, server: std::net::SocketAddr, secs: u32, reverse: bool) -> f64 {
    let first = iperf3_to(ns, server, secs, 1, reverse);
    if first > 0.0 {
        return first;
    }
    eprintln!("iperf3 to {server} (reverse {reverse}) reported nothing: once more");
    std::thread::sleep(Duration::from_secs(1));
    iperf3_to(ns, server, secs, 1, reverse)
}

/// iperf3 from client 1 to the remote over IPv4 and over IPv6, by direct
/// routing through the gateway's namespace and then through veil (inner
/// IPv6 NATed to 2001:2::1 by the datapath, as IPv4 is to 198.18.0.1).
pub(crate) fn ipv6(quick: bool) {
    use veil_tests::{
        proc::Proc,
        world::{World, REMOTE6},
    };

    let secs = if quick { 2 } else { 5 };
    println!("## veil over IPv6 beside IPv4\n");
    println!(
        "kernel {}, {} CPUs; iperf3 {secs} s per run, one TCP stream, the client's default transport;",
        kernel(),
        num_cpus()
    );
    println!("same namespaces and veth links for every path.\n");
    let mut world = World::bare(1);
    world.add_ipv6();
    world.start_gateway(&["--listen", "[::]:443"]);
    // One server for both families ([::] takes IPv4 too).
    let iperf = {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", world.remote.name()))
            .args(["iperf3", "-s"]);
        Proc::start("iperf3 -s", cmd, world.dir.join("iperf3.log"))
    };
    std::thread::sleep(Duration::from_millis(300));
    let ns = world.client(1).name().to_owned();
    let v4: std::net::SocketAddr = (REMOTE, 5201).into();
    let v6: std::net::SocketAddr = (REMOTE6, 5201).into();

    // Direct: the gateway's namespace routes both families (no NAT: the
    // remote knows the way back).
    let routes = [
        ["-4", "route", "add", "10.200.0.0/16", "via", "198.18.0.1"],
        ["-6", "route", "add", "2001:2:0:1::/64", "via", "2001:2::1"],
    ];
    world.gw.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    world
        .gw
        .exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
    for r in &routes {
        world.remote.ip(r);
    }
    let direct = (both_ways(&ns, v4, secs), both_ways(&ns, v6, secs));
    for r in &routes {
        let mut del = *r;
        del[2] = "del";
        world.remote.ip(&del);
    }
    world.gw.exec("sysctl", &["-qw", "net.ipv4.ip_forward=0"]);
    world
        .gw
        .exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=0"]);

    let profile = world.add_client("bench6", 1);
    let client = world.start_client(1, &profile, true);
    // IPv6 is configured right after the IPv4 address.
    std::thread::sleep(Duration::from_millis(500));
    let veil = (both_ways(&ns, v4, secs), both_ways(&ns, v6, secs));
    drop(client);
    drop(iperf);
    let _ = world.gateway();

    println!("| path | client → remote (Gbit/s) | remote → client (Gbit/s) |");
    println!("|---|---:|---:|");
    for (name, f) in [
        ("direct routing, IPv4", &direct.0),
        ("direct routing, IPv6", &direct.1),
        ("veil, IPv4", &veil.0),
        ("veil, IPv6", &veil.1),
    ] {
        println!("| {name} | {:.2} | {:.2} |", f.up / 1e9, f.down / 1e9);
    }
    let ratio = |a: &Family, b: &Family| (a.up / b.up, a.down / b.down);
    for (name, (up, down)) in [
        ("veil ÷ direct, IPv4", ratio(&veil.0, &direct.0)),
        ("veil ÷ direct, IPv6", ratio(&veil.1, &direct.1)),
        ("veil IPv6 ÷ veil IPv4", ratio(&veil.1, &veil.0)),
    ] {
        println!("| {name} | {up:.2} | {down:.2} |");
    }
}
