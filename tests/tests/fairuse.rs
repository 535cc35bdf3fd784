//! Fair use: a client held to a rate gets that rate, through the real
//! datapath's token bucket, while another client beside it is not slowed;
//! a client over its quota is cut off; both are shown in status and
//! metrics.

use std::{net::Ipv4Addr, process::Command, time::Duration};

use veil_common::{proto, Reason};
use veil_tests::{
    bed::{Bed, CLIENT, PUBLIC, REMOTE as BED_REMOTE, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP},
    packet::{frame, L4},
    proc::Proc,
    world::{World, REMOTE},
};
use veil_user::ratelimit::Effective;

/// Held to `rate`, with no quota.
fn at(rate: &str) -> Effective {
    Effective {
        rate: Some(rate.parse().unwrap()),
        quota: None,
        period: Duration::from_secs(86_400),
    }
}

#[test]
fn the_datapath_lets_a_limited_client_its_burst_then_drops_and_no_one_else() {
    let mut bed = Bed::new();
    let other = Ipv4Addr::new(10, 77, 0, 3);
    let (_, nat) = bed.flow(proto::UDP, 40000, 53);
    bed.flow_of(other, proto::UDP, 40000, 53);
    let mut limits = bed.dp.rate_limits().unwrap();
    // 8 bit/s: nothing refills during the test; the burst is 128 KiB.
    limits.apply(CLIENT, at("8bit")).unwrap();
    let payload = [7u8; 972];
    let up = frame(CLIENT, BED_REMOTE, 64, L4::udp(40000, 53, &payload));
    let ip_len = (up.len() - veil_tests::packet::ETH_LEN) as u64;
    assert_eq!(ip_len, 1000);

    let passed = (0..200)
        .take_while(|_| bed.tun(&up).0 == TC_ACT_REDIRECT)
        .count();
    // A packet passes while any token is left: 131 take 131,000 of the
    // 131,072 bytes, the 132nd the rest and a debt.
    assert_eq!(passed, 132, "the burst, then drops");
    assert_eq!(bed.tun(&up).0, TC_ACT_SHOT);
    assert!(bed.count(Reason::DropRateLimited) >= 1);
    // The other client is not held to it.
    let theirs = frame(other, BED_REMOTE, 64, L4::udp(40000, 53, &payload));
    assert!((0..300).all(|_| bed.tun(&theirs).0 == TC_ACT_REDIRECT));
    // Replies have a bucket of their own, checked in XDP per wire packet.
    let down = frame(BED_REMOTE, PUBLIC, 60, L4::udp(53, nat, &payload));
    let delivered = (0..200).take_while(|_| bed.wan(&down).delivered()).count();
    assert_eq!(delivered, 132);
    assert_eq!(bed.wan(&down).xdp, XDP_DROP);

    let state = limits.get(CLIENT).unwrap();
    assert_eq!(state.used, 2 * 132 * 1000, "both ways count");
    assert!(state.rate_dropped >= 2);
    // Lifted: the entry goes, and with it every check.
    limits
        .apply(
            CLIENT,
            Effective {
                rate: None,
                ..at("8bit")
            },
        )
        .unwrap();
    assert!(limits.get(CLIENT).is_none());
    assert_eq!(bed.tun(&up).0, TC_ACT_REDIRECT);
    // Held again after no client was limited (the datapath skipped the
    // lookup meanwhile): policed again, from a fresh burst.
    limits.apply(CLIENT, at("8bit")).unwrap();
    let passed = (0..200)
        .take_while(|_| bed.tun(&up).0 == TC_ACT_REDIRECT)
        .count();
    assert_eq!(passed, 132, "a fresh burst, then drops");
}

/// Starts an iperf3 server on the remote at `port`.
fn iperf_server(world: &World, port: u16) -> Proc {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{}", world.remote.name()))
        .args([
            "iperf3",
            "-s",
            "--forceflush",
            "-B",
            &REMOTE.to_string(),
            "-p",
        ])
        .arg(port.to_string());
    let mut p = Proc::start(
        "iperf3 -s",
        cmd,
        world.dir.join(format!("iperf3-{port}.log")),
    );
    p.wait_for_log("Server listening", Duration::from_secs(5));
    p
}

/// Which way [`iperf_mbit`] measures.
#[derive(Clone, Copy)]
enum Way {
    Down,
    Up,
}

/// Client `i` against the remote's iperf3 server on `port`, `way`, sent
/// at `offered` (iperf3's -b, "0": as fast as it goes): Mbit/s received,
/// the first second (the bucket's burst, TCP's slow start) left out.
fn iperf_mbit(world: &World, i: usize, port: u16, secs: u32, way: Way, offered: &str) -> f64 {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{}", world.client(i).name()))
        .args(["iperf3", "-c", &REMOTE.to_string(), "-J", "-O", "1"])
        .args([
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-b",
            offered,
        ]);
    if let Way::Down = way {
        cmd.arg("-R");
    }
    let out = cmd.output().expect("running iperf3");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3: {}", String::from_utf8_lossy(&out.stdout)))
        / 1e6
}

#[test]
fn a_client_held_to_50_mbits_gets_50_and_the_other_is_not_slowed() {
    let mut world = World::bare(2);
    world.start_gateway(&[]);
    let slow = world.add_client("slow", 1);
    let fast = world.add_client("fast", 2);
    world.veil_user(&["client", "limit", "slow", "--rate", "50mbit"]);
    // Over TCP: the limit is the datapath's, the same for every transport,
    // and a debug build's HTTP/3 client costs enough CPU on two cores to
    // slow the unlimited one by itself.
    let tcp = ["--transport", "tcp"];
    let _slow = world.start_client_with(1, &slow, true, &tcp);
    let _fast = world.start_client_with(2, &fast, true, &tcp);
    let _s1 = iperf_server(&world, 5201);
    let _s2 = iperf_server(&world, 5202);

    // Both at once: the limited one at its rate, the other at the 100
    // Mbit/s it asks for. (Not as fast as it goes: on two cores, a debug
    // build's gigabit would take the CPU from the limited client and
    // measure the machine, not the limit.)
    let (limited, free) = std::thread::scope(|s| {
        let limited = s.spawn(|| iperf_mbit(&world, 1, 5201, 8, Way::Down, "0"));
        let free = s.spawn(|| iperf_mbit(&world, 2, 5202, 8, Way::Down, "100M"));
        (limited.join().unwrap(), free.join().unwrap())
    });
    eprintln!("held to 50 Mbit/s: {limited:.1} Mbit/s down; beside it: {free:.1} of 100");
    assert!(
        (45.0..=55.0).contains(&limited),
        "the client held to 50 Mbit/s got {limited:.1} Mbit/s down"
    );
    assert!(
        free > 90.0,
        "the client without a limit got {free:.1} of the 100 Mbit/s it asked for beside it"
    );
    // The other way too: each direction has its bucket. Its segments
    // reach the datapath one by one, to be policed one by one: neither
    // its offload nor the gateway's merging applies to a limited client.
    let before = world.egress_forwarded();
    let up = iperf_mbit(&world, 1, 5201, 6, Way::Up, "0");
    world.assert_super_packets_since(before, false);
    eprintln!("held to 50 Mbit/s: {up:.1} Mbit/s up");
    assert!((45.0..=55.0).contains(&up), "{up:.1} Mbit/s up");

    let status = world.status();
    let clients = status["clients"].as_array().unwrap();
    let slow = clients.iter().find(|c| c["name"] == "slow").unwrap();
    assert_eq!(slow["rate_limit"], "50mbit", "{slow}");
    assert!(slow["rate_dropped"].as_u64().unwrap() > 0, "{slow}");
    let fast = clients.iter().find(|c| c["name"] == "fast").unwrap();
    assert!(fast.get("rate_limit").is_none(), "{fast}");
    assert_eq!(fast["rate_dropped"], 0);
    assert!(
        status["datapath"]["drop_rate_limited"]["packets"]
            .as_u64()
            .unwrap()
            > 0
    );

    // Lifted while connected: within a second or two it runs free.
    world.veil_user(&["client", "limit", "slow", "--rate", "none"]);
    std::thread::sleep(Duration::from_millis(2500));
    let lifted = iperf_mbit(&world, 1, 5201, 3, Way::Down, "0");
    // Well past the limit and its tolerance. (Not as fast as the free
    // client: the session keeps the no-offload it was set up with until it
    // reconnects, and a debug build without offload makes ~100 Mbit/s on a
    // busy two-core machine.)
    assert!(lifted > 70.0, "{lifted:.1} Mbit/s once lifted");
}

/// Whether a DNS question to the gateway's own resolver service (its
/// address inside the tunnel), asked from client namespace 1, is answered.
fn gateway_dns_answers(world: &World) -> bool {
    world.client(1).enter(|| {
        let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        let q = veil_tests::dns::a_query(0x1234, "meter.example.");
        (0..2).any(|_| {
            s.send_to(&q, (Ipv4Addr::new(10, 77, 0, 1), 53)).unwrap();
            let mut buf = [0u8; 512];
            s.recv(&mut buf)
                .is_ok_and(|n| n >= 12 && buf[..2] == [0x12, 0x34])
        })
    })
}

#[test]
fn a_client_over_its_quota_is_cut_off_until_the_period_ends() {
    let mut world = World::bare(1);
    let _resolver = veil_tests::dns::DnsServer::start(
        &world.remote,
        REMOTE,
        &[("meter.example.", Ipv4Addr::new(198, 18, 0, 99))],
    );
    // 4 MiB a client per hour; the download is 8 MiB.
    world.start_gateway(&[
        "--quota",
        "4MiB",
        "--quota-period",
        "3600",
        "--dns",
        &REMOTE.to_string(),
    ]);
    let p = world.add_client("meter", 1);
    let _c = world.start_client(1, &p, true);
    assert!(
        gateway_dns_answers(&world),
        "the gateway's resolver answers"
    );
    assert!(
        world.download(1).is_err(),
        "8 MiB cannot arrive through a 4 MiB quota"
    );
    let status = world.status();
    let c = &status["clients"][0];
    assert_eq!(c["quota"], 4 << 20, "{c}");
    let used = c["quota_used"].as_u64().unwrap();
    assert_eq!(used, 4 << 20, "used up");
    assert!(c["quota_dropped"].as_u64().unwrap() > 0, "{c}");
    // Everything is refused now, not only the big download: also what
    // never crosses the datapath, such as the gateway's DNS service (a
    // DNS tunnel would carry anything).
    assert!(!world.ping(1, &REMOTE.to_string()));
    assert!(!gateway_dns_answers(&world), "no DNS past the quota");
    // An exemption (`client limit --quota none`) lets it through again.
    world.veil_user(&["client", "limit", "meter", "--quota", "none"]);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(world.ping(1, &REMOTE.to_string()));
    assert!(gateway_dns_answers(&world));
}
