//! Operating a gateway: start-up refusals that say what to do, status and
//! metrics against known traffic, and shutdowns (clean or not) that leave
//! nothing behind.

use std::{process::Command, time::Duration};

use veil_tests::world::{World, DOWNLOAD_LEN};

/// What the gateway namespace shows of veil: BPF programs on wan0, the
/// TUN device, pins.
fn leftovers(world: &World) -> Vec<String> {
    let mut found = Vec::new();
    let link = Command::new("ip")
        .args(["-n", world.gw.name(), "-d", "link", "show"])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    if link.contains("xdp") {
        found.push(format!("an XDP program: {link}"));
    }
    if link.contains("veilgw") {
        found.push("the TUN device veilgw".into());
    }
    let net = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", world.gw.name()))
        .args(["bpftool", "net", "show"])
        .output()
        .unwrap();
    let net = String::from_utf8_lossy(&net.stdout);
    if net.contains("veil_") {
        found.push(format!("attached programs: {net}"));
    }
    if world.pins().exists() {
        found.push(format!("pins under {}", world.pins().display()));
    }
    if world.state.join("control.sock").exists() {
        found.push("the control socket".into());
    }
    found
}

#[test]
fn start_up_refusals_say_what_is_wrong() {
    let world = World::bare(0);

    let (status, text) = world.failed_start(&["--iface", "eth9"]);
    assert!(!status.success());
    assert!(text.contains("interface `eth9` not found"), "{text}");

    let (_, text) = world.failed_start(&[]);
    assert!(text.contains("--iface is required"), "{text}");

    // Not root, no capabilities.
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", world.gw.name()))
        .args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(veil_tests::proc::workspace_bin("veil-user"))
        .args(["--iface", "wan0", "--state-dir", "/nonexistent"])
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("veil-user needs root, or the capabilities"),
        "{text}"
    );

    // The port is taken.
    let _squatter = world
        .gw
        .enter(|| std::net::TcpListener::bind("0.0.0.0:443").unwrap());
    let (_, text) = world.failed_start(&["--iface", "wan0"]);
    // The default listener takes both families: an IPv4 squatter is enough.
    assert!(text.contains("listening on [::]:443"), "{text}");
    assert!(text.contains("Address already in use"), "{text}");

    // A client pool that holds one of the gateway's own addresses.
    let elsewhere = ["--iface", "wan0", "--listen", "0.0.0.0:8443"];
    let (_, text) = world.failed_start(&[&elsewhere[..], &["--pool", "198.18.0.0/16"]].concat());
    assert!(
        text.contains("the client pool 198.18.0.0/16 holds 198.18.0.1, an address of wan0"),
        "{text}"
    );
    // A 0 that would turn everyone away.
    let (_, text) = world.failed_start(&[&elsewhere[..], &["--max-clients", "0"]].concat());
    assert!(
        text.contains("max-clients = 0 is out of range: it takes 1 or more"),
        "{text}"
    );

    // The NAT range collides with the kernel's own source ports.
    world.gw.exec(
        "sysctl",
        &["-qw", "net.ipv4.ip_local_port_range=32768 65000"],
    );
    let (_, text) = world.failed_start(&["--iface", "wan0", "--listen", "0.0.0.0:8443"]);
    assert!(
        text.contains("overlaps net.ipv4.ip_local_port_range"),
        "{text}"
    );
    assert!(
        text.contains("sysctl -w net.ipv4.ip_local_port_range=\"32768 60999\""),
        "{text}"
    );

    // The listener inside the NAT range: the datapath would drop its packets.
    let (_, text) = world.failed_start(&["--iface", "wan0", "--listen", "0.0.0.0:61443"]);
    assert!(
        text.contains("has its port inside the NAT port range 61000-65535"),
        "{text}"
    );
    assert!(text.contains("Pick a port outside"), "{text}");

    // A typo in the configuration file.
    let config = world.dir.join("veil.toml");
    std::fs::write(&config, "iface = \"wan0\"\nmax-clinets = 5\n").unwrap();
    let (_, text) = world.failed_start(&["--config", config.to_str().unwrap()]);
    assert!(text.contains("veil.toml"), "{text}");
    assert!(text.contains("unknown field `max-clinets`"), "{text}");
    assert!(text.contains("line 2"), "{text}");
    assert!(leftovers(&world).is_empty(), "{:?}", leftovers(&world));
}

#[test]
fn a_config_file_works_and_flags_win() {
    let mut world = World::bare(1);
    let config = world.dir.join("veil.toml");
    std::fs::write(
        &config,
        "iface = \"wan0\"\nlisten = \"0.0.0.0:443\"\nmax-clients = 0\n",
    )
    .unwrap();
    world.start_gateway(&["--config", config.to_str().unwrap(), "--max-clients", "5"]);
    let p = world.add_client("configured", 1);
    let _c = world.start_client(1, &p, true);
    assert!(
        world.ping(1, "198.18.0.2"),
        "max-clients 5 from the flag, not 0 from the file"
    );
}

#[test]
fn status_and_metrics_count_what_went_through() {
    // A port alone: served on loopback.
    let world = World::new(2, &["--metrics", "9477"]);
    let a = world.add_client("alpha", 1);
    let b = world.add_client("beta", 2);
    let _a = world.start_client(1, &a, true);
    let _b = world.start_client(2, &b, true);
    world.download(1).expect("alpha downloads");
    assert!(world.ping(2, "198.18.0.2"));

    let status = world.status();
    let clients = status["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 2);
    let alpha = clients.iter().find(|c| c["name"] == "alpha").unwrap();
    assert!(
        alpha["bytes_to_client"].as_u64().unwrap() >= DOWNLOAD_LEN as u64,
        "{alpha}"
    );
    assert!(status["flows"]["tcp"].as_u64().unwrap() >= 1);
    assert!(status["flows"]["icmp"].as_u64().unwrap() >= 1);
    // Super-packets make packet counts small; the bytes are all there.
    let forwarded = |reason: &str| status["datapath"][reason]["bytes"].as_u64().unwrap();
    assert!(forwarded("ingress_forwarded") >= DOWNLOAD_LEN as u64);
    assert!(forwarded("egress_forwarded") > 0);
    // Nothing dropped: not even what a new TUN device's kernel sends on
    // its own (IPv6 router solicitations), which is no client's packet.
    let dropped: Vec<_> = status["counters"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, n)| n.as_u64() != Some(0) && !name.starts_with("dns_"))
        .collect();
    assert!(dropped.is_empty(), "{dropped:?}");

    let metrics = world.metrics();
    assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
    let value = |line_start: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(line_start))
            .unwrap_or_else(|| panic!("no {line_start} in\n{metrics}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value("veil_clients "), 2);
    assert!(value("veil_connected_clients_bytes{direction=\"to_client\"}") >= DOWNLOAD_LEN as u64);
    assert!(
        !metrics.contains("alpha") && !metrics.contains("beta"),
        "no client is named:\n{metrics}"
    );
    assert!(value("veil_datapath_packets_total{reason=\"ingress_forwarded\"}") > 0);
    assert!(
        value("veil_datapath_bytes_total{reason=\"ingress_forwarded\"}") >= DOWNLOAD_LEN as u64
    );
    assert!(value("veil_nat_ports_in_use{range=\"61000-65535\"}") >= 1);
    assert!(metrics.contains("# TYPE veil_handshake_failures_total counter"));
    // Both clients idle now: nothing waits to be sent to them.
    assert_eq!(value("veil_replies_queued_bytes "), 0);
}

#[test]
fn sigterm_and_a_crash_leave_nothing_behind() {
    // With XDP on the WAN, as on a NIC: a program attached by the crashed
    // gateway is one more thing the restart must clean up.
    let xdp = ["--wan-filter", "xdp"];
    let mut world = World::new(1, &xdp);
    let p = world.add_client("survivor", 1);
    let mut c = world.start_client(1, &p, true);
    assert!(world.ping(1, "198.18.0.2"));

    // A crash: pins, a control socket and a lease stay behind; the restart
    // must clean up and serve again.
    world.gateway().kill();
    c.wait_for_log("tunnel down", Duration::from_secs(15));
    world.start_gateway(&xdp);
    let mut ok = false;
    for _ in 0..60 {
        if world.ping(1, "198.18.0.2") {
            ok = true;
            break;
        }
    }
    assert!(ok, "the client is back after the restart");

    // SIGTERM: sessions closed cleanly, programs detached, pins removed.
    let status = world.gateway().stop().unwrap();
    assert!(status.success(), "{}", world.gateway().log());
    let log = world.gateway().log();
    assert!(
        log.contains("gateway stopped: programs detached, pins removed"),
        "{log}"
    );
    assert!(
        log.contains("session ended: gateway shutting down"),
        "{log}"
    );
    assert!(leftovers(&world).is_empty(), "{:?}", leftovers(&world));
    c.stop();
}

/// A tmpfs mounted for a test, unmounted when dropped (also when the test
/// fails), before the world that holds it is removed.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let opts = format!("size={size},mode=0700");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &opts, "veil-test"])
            .arg(at)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs on {}", at.display());
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system `dir` is on: a file of zeros written until the
/// disk refuses more.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 16 * 1024];
    while f.write_all(&chunk).and_then(|()| f.sync_data()).is_ok() {}
    path
}

/// A full state disk: a new client, whose lease cannot be saved, is
/// refused (the log says why, once) while the client already connected
/// keeps being served; once there is room again, the new client gets in
/// and its lease is on disk.
#[test]
fn a_full_state_disk_refuses_new_leases_and_serves_everyone_else() {
    let mut world = World::bare(2);
    let _disk = Tmpfs::mount(&world.state, "2m");
    // Alice's lease from an earlier run: her session writes nothing, and
    // the lease log, not yet made, needs a block of its own for Bob's.
    std::fs::write(world.state.join("leases.toml"), "alice = \"10.77.0.2\"\n").unwrap();
    world.start_gateway(&[]);
    let alice = world.add_client("alice", 1);
    let bob = world.add_client("bob", 2);
    let _alice = world.start_client(1, &alice, true);
    assert!(world.ping(1, "198.18.0.2"));

    let filler = fill(&world.state);
    let _bob = world.start_client(2, &bob, false);
    veil_tests::wait_until("the failed save logged", Duration::from_secs(20), || {
        world.gateway().log().contains("saving the leases")
    });
    assert!(world.ping(1, "198.18.0.2"), "alice is still served");
    assert!(!world.ping(2, "198.18.0.2"), "bob has no session");
    let names: Vec<_> = world.status()["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["alice"]);

    std::fs::remove_file(filler).unwrap();
    veil_tests::wait_until("bob in once there is room", Duration::from_secs(30), || {
        world.ping(2, "198.18.0.2")
    });
    let log = world.gateway().log();
    assert!(log.contains("saving the leases works again"), "{log}");
    let warned = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("saving the leases"))
        .count();
    assert_eq!(warned, 1, "one warning for the run of failed saves: {log}");
    let leases = std::fs::read_to_string(world.state.join("leases.log")).unwrap();
    assert!(leases.contains("bob = "), "{leases}");
    assert!(world.ping(1, "198.18.0.2"), "alice throughout");
}
