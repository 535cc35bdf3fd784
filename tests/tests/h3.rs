//! The HTTP/3 transport end to end: the real gateway serving QUIC beside
//! TCP, real clients choosing it (or falling back to TCP), as a user
//! would check it.

use std::time::Duration;

use veil_tests::{
    lossy::Loss,
    proc::Proc,
    world::{download_data, sha256, World, PUBLIC},
};

fn transport_of(client: &Proc) -> &'static str {
    let log = client.log();
    if log.contains("transport up: h3") {
        "h3"
    } else if log.contains("transport up: tcp") {
        "tcp"
    } else {
        panic!("no transport in the log: {log}")
    }
}

#[test]
fn a_download_over_http3_arrives_intact_and_the_remote_sees_only_the_gateway() {
    let world = World::new(1, &[]);
    let profile = world.add_client("alice", 1);
    let client = world.start_client_with(1, &profile, true, &["--transport", "h3"]);
    assert_eq!(transport_of(&client), "h3");

    assert!(world.ping(1, "198.18.0.2"), "ping through the tunnel");
    assert_eq!(
        world.download(1).expect("download"),
        sha256(&download_data()),
        "8 MiB arrive intact"
    );
    let echoed = world.udp_echo(1, b"veil udp echo");
    assert_eq!(echoed, b"veil udp echo");
    let seen = world.servers.seen();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|a| *a == PUBLIC),
        "the remote saw only the gateway: {seen:?}"
    );
    assert!(!client.log().contains("reconnecting"), "{}", client.log());
}

#[test]
fn unknown_and_revoked_clients_are_refused_over_http3() {
    let mut world = World::new(3, &[]);
    let good = world.add_client("good", 1);
    let doomed = world.add_client("doomed", 2);
    let h3 = ["--transport", "h3"];
    let g = world.start_client_with(1, &good, true, &h3);
    let mut d = world.start_client_with(2, &doomed, true, &h3);
    assert_eq!(transport_of(&d), "h3");
    assert!(world.ping(2, "198.18.0.2"));

    // A profile from another gateway's CA: its QUIC handshake fails.
    let stranger = world.foreign_profile();
    let mut s = world.start_client_with(3, &stranger, false, &h3);
    world
        .gateway()
        .wait_for_log("TLS handshake failed", Duration::from_secs(10));
    assert!(!s.log().contains("connected"), "{}", s.log());
    s.stop();

    world.veil_user(&["client", "revoke", "doomed"]);
    d.wait_for_log("tunnel down", Duration::from_secs(10));
    world
        .gateway()
        .wait_for_log("client `doomed` is revoked", Duration::from_secs(10));
    assert!(
        !world.ping(2, "198.18.0.2"),
        "a revoked client gets nowhere"
    );
    assert!(world.ping(1, "198.18.0.2"), "the others are unaffected");
    assert_eq!(transport_of(&g), "h3");
    d.stop();
}

#[test]
fn auto_connects_over_tcp_within_two_seconds_when_udp_is_dropped() {
    let world = World::new(1, &[]);
    let profile = world.add_client("alice", 1);
    // Inside the client's namespace only: its UDP to the gateway's port
    // is dropped, as on a network that blocks QUIC.
    let nft = |script: &str| {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", world.client(1).name()))
            .args(["nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(script.as_bytes())?;
                c.wait()
            })
            .unwrap();
        assert!(out.success(), "nft {script}");
    };
    nft("table inet blockquic {\n chain out {\n type filter hook output priority -10;\n udp dport 443 drop\n }\n}\n");
    let started = std::time::Instant::now();
    let mut client = world.start_client_with(1, &profile, false, &["--transport", "auto"]);
    client.wait_for_log("connected", Duration::from_secs(2));
    let took = started.elapsed();
    assert_eq!(transport_of(&client), "tcp");
    assert!(took < Duration::from_secs(2), "connected after {took:?}");
    assert_eq!(
        world.download(1).expect("download"),
        sha256(&download_data())
    );
    client.stop();

    // UDP allowed again: auto takes HTTP/3.
    nft("delete table inet blockquic\n");
    let client = world.start_client_with(1, &profile, true, &["--transport", "auto"]);
    assert_eq!(transport_of(&client), "h3");
}

#[test]
fn a_new_uplink_address_keeps_the_quic_connection_and_its_flows() {
    let world = World::new(1, &[]);
    let profile = world.add_client("roamer", 1);
    let client = world.start_client_with(1, &profile, true, &["--transport", "h3"]);
    assert_eq!(transport_of(&client), "h3");
    let mut echo = world.echo_connection(1);
    assert_eq!(echo(b"before"), b"before");

    // A new address on the uplink, the old one gone (a new DHCP lease).
    world.renumber_uplink(1);
    let mut client = client;
    client.wait_for_log("the QUIC connection moves with it", Duration::from_secs(5));
    // The same TCP connection, through the same session: a download
    // in full after the move as well.
    assert_eq!(echo(b"after the move"), b"after the move");
    assert_eq!(
        world.download(1).expect("download"),
        sha256(&download_data())
    );
    let log = client.log();
    assert_eq!(
        log.matches("transport up").count(),
        1,
        "no reconnect: {log}"
    );
    let mut world = world;
    let gateway = world.gateway().log();
    assert_eq!(
        gateway.matches("session started").count(),
        1,
        "one session throughout: {gateway}"
    );
}

/// Megabits per second of the 8 MiB download from client 1.
fn goodput(world: &World) -> f64 {
    let started = std::time::Instant::now();
    assert_eq!(
        world.download(1).expect("download"),
        sha256(&download_data())
    );
    (download_data().len() * 8) as f64 / started.elapsed().as_secs_f64() / 1e6
}

/// Both transports deliver intact through 1 % and 3 % loss each way. The
/// goodputs are printed for reading, not asserted: speed is compared in
/// `cargo xtask bench` (release builds), not in a debug test on a busy
/// machine.
#[test]
fn on_a_lossy_uplink_both_transports_deliver_intact() {
    let world = World::new(1, &[]);
    let profile = world.add_client("lossy", 1);
    for percent in [0, 1, 3] {
        let mut rates = Vec::new();
        for transport in ["h3", "tcp"] {
            let mut client =
                world.start_client_with(1, &profile, true, &["--transport", transport]);
            assert_eq!(transport_of(&client), transport);
            let loss =
                (percent > 0).then(|| Loss::new(world.client(1), "eth0", &world.dir, percent));
            rates.push(goodput(&world));
            drop(loss);
            client.stop();
        }
        eprintln!(
            "{percent}% loss each way: h3 {:.0} Mbit/s, tcp {:.0} Mbit/s ({:.1}x)",
            rates[0],
            rates[1],
            rates[0] / rates[1]
        );
    }
}
