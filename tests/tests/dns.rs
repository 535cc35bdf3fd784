//! DNS through the tunnel, and failover between endpoints: the real
//! `veil-user` and `veil-client` in network namespaces (see
//! `veil_tests::world`), with a resolver on the client's local network
//! and another on the "internet".
//!
//! The client runs under `ip netns exec`, which bind-mounts
//! `/etc/netns/NS/resolv.conf` on `/etc/resolv.conf` in a mount namespace
//! of its own: the client manages that file and the host's is never
//! touched (`nsenter --net`, which the other tests use, keeps the host's
//! mounts, so those clients run with `--no-dns`).

use std::{
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use veil_tests::{
    dns::DnsServer,
    wait_until,
    world::{ip_out, World, PUBLIC, REMOTE},
};

const NAME: &str = "veil-dns-test.example.";
/// What the internet's resolver answers for [`NAME`].
const THROUGH_TUNNEL: &str = "198.18.0.77";
/// What the local network's resolver answers: seeing it is a leak.
const LEAKED: &str = "192.0.2.66";
/// The local network's resolver: the client's router.
const LOCAL_RESOLVER: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
/// The namespace's resolv.conf before the client starts.
const BEFORE: &str =
    "# the local network's resolver\nnameserver 10.200.1.1\noptions timeout:1 attempts:1\n";

/// `getent hosts NAME` in client namespace 1, as its applications resolve.
fn getent(world: &World) -> String {
    let out = world.client(1).netns_exec("getent", &["hosts", NAME]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn resolvers(world: &World) -> (DnsServer, DnsServer) {
    let internet = DnsServer::start(
        &world.remote,
        REMOTE,
        &[(NAME, THROUGH_TUNNEL.parse().unwrap())],
    );
    let local = DnsServer::start(
        &world.gw,
        LOCAL_RESOLVER,
        &[(NAME, LEAKED.parse().unwrap())],
    );
    (internet, local)
}

fn replaced(path: &PathBuf) -> bool {
    fs::read_to_string(path).is_ok_and(|t| t.contains("nameserver 10.77.0.1"))
}

#[test]
fn dns_names_resolve_through_the_tunnel_and_resolv_conf_comes_back_exactly() {
    let world = World::new(1, &["--dns", &REMOTE.to_string()]);
    let (internet, local) = resolvers(&world);
    let path = world.client(1).set_resolv_conf(BEFORE);
    // Without veil, the local network answers.
    assert!(
        getent(&world).contains(LEAKED),
        "the test bed's own resolver"
    );
    let asked_locally = local.seen().len();
    assert!(asked_locally >= 1);

    let profile = world.add_client("alice", 1);
    let mut client = world.start_client_dns(1, &profile, &[]);
    wait_until(
        "resolv.conf to point at the tunnel",
        Duration::from_secs(5),
        || replaced(&path),
    );
    let found = getent(&world);
    assert!(
        found.contains(THROUGH_TUNNEL),
        "resolved through the tunnel: {found:?}"
    );
    assert_eq!(
        local.seen().len(),
        asked_locally,
        "the local resolver saw nothing"
    );
    let seen = internet.seen();
    assert!(
        seen.iter().any(|(_, name)| name == NAME),
        "the internet's resolver was asked: {seen:?}"
    );
    assert!(
        seen.iter().all(|(from, _)| from.ip() == PUBLIC),
        "only ever by the gateway itself: {seen:?}"
    );
    let counters = &world.status()["counters"];
    assert!(
        counters["dns_answered"].as_u64().unwrap() >= 1,
        "{counters}"
    );

    client.stop();
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        BEFORE,
        "byte for byte after exit"
    );
}

/// Queries that reach the gateway's DNS service as one UDP super-packet
/// (sent here as one buffer with UDP_SEGMENT; the client's kernel cuts it
/// up for `veil0`, and the gateway merges the datagrams again before its
/// checks) are each a query of their own, and each gets its answer, over
/// either transport.
#[test]
fn dns_queries_in_one_udp_super_packet_are_each_answered() {
    use hickory_proto::op::Message;
    const LONG: &str = "a-name-long-enough-for-queries-to-be-merged.veil-dns-test.example.";
    const QUERIES: u16 = 16;
    let world = World::new(1, &["--dns", &REMOTE.to_string()]);
    let _internet = DnsServer::start(
        &world.remote,
        REMOTE,
        &[(LONG, THROUGH_TUNNEL.parse().unwrap())],
    );
    let profile = world.add_client("burst", 1);
    for transport in ["tcp", "h3"] {
        let mut client = world.start_client_with(1, &profile, true, &["--transport", transport]);
        let answered = world.client(1).enter(|| {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            // Queries of one length (ids differ), sent as one buffer the
            // kernel cuts into datagrams of that size (UDP_SEGMENT).
            let queries: Vec<Vec<u8>> = (1..=QUERIES)
                .map(|id| veil_tests::dns::a_query(id, LONG))
                .collect();
            veil_tests::udp_segment(&socket, queries[0].len());
            socket
                .send_to(&queries.concat(), ("10.77.0.1", 53))
                .unwrap();
            let mut answered = std::collections::BTreeSet::new();
            let mut buf = [0u8; 1500];
            while answered.len() < usize::from(QUERIES) {
                let Ok(n) = socket.recv(&mut buf) else { break };
                if let Ok(answer) = Message::from_vec(&buf[..n]) {
                    answered.insert(answer.metadata.id);
                }
            }
            answered
        });
        assert_eq!(
            answered,
            (1..=QUERIES).collect(),
            "over {transport}: every query answered ({})",
            world.status()["counters"]
        );
        client.stop();
        wait_until("the session to end", Duration::from_secs(10), || {
            world.status()["clients"].as_array().unwrap().is_empty()
        });
    }
}

#[test]
fn dns_settings_left_by_a_killed_client_are_restored_at_its_next_start() {
    let world = World::new(1, &["--dns", &REMOTE.to_string()]);
    let (_internet, _local) = resolvers(&world);
    let path = world.client(1).set_resolv_conf(BEFORE);
    let profile = world.add_client("alice", 1);
    let mut client = world.start_client_dns(1, &profile, &[]);
    wait_until(
        "resolv.conf to point at the tunnel",
        Duration::from_secs(5),
        || replaced(&path),
    );
    client.kill();
    let left = fs::read_to_string(&path).unwrap();
    assert!(
        left.contains("# veil-original"),
        "the original travels inside: {left}"
    );
    // The next start puts it back before anything else, --no-dns or not.
    let mut again = world.start_client_dns(1, &profile, &["--no-dns"]);
    assert!(again.log().contains("restored"), "{}", again.log());
    assert_eq!(fs::read_to_string(&path).unwrap(), BEFORE);
    again.stop();
    assert_eq!(fs::read_to_string(&path).unwrap(), BEFORE);
}

#[test]
fn dns_a_client_with_no_dns_leaves_resolv_conf_alone() {
    let world = World::new(1, &["--dns", &REMOTE.to_string()]);
    let (_internet, _local) = resolvers(&world);
    let path = world.client(1).set_resolv_conf(BEFORE);
    let profile = world.add_client("alice", 1);
    let mut client = world.start_client_dns(1, &profile, &["--no-dns"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fs::read_to_string(&path).unwrap(), BEFORE);
    client.stop();
}

#[test]
fn dns_failover_a_dead_first_endpoint_is_passed_over_within_3_seconds() {
    let world = World::new(1, &[]);
    // The first endpoint is reached through a neighbour that never
    // answers: the connection hangs, it is not refused.
    let dead = "198.51.100.1";
    world.client(1).ip(&[
        "route",
        "add",
        &format!("{dead}/32"),
        "via",
        "10.200.1.99",
        "dev",
        "eth0",
    ]);
    let out = world.dir.join("two.veil");
    world.veil_user(&[
        "client",
        "add",
        "two",
        "--out",
        out.to_str().unwrap(),
        "--endpoint",
        &format!("{dead}:443"),
        "--endpoint",
        "10.200.1.1:443",
    ]);
    let text = fs::read_to_string(&out).unwrap();
    assert!(text.contains("endpoints = ["), "{text}");
    let started = Instant::now();
    let mut client = world.start_client_with(1, &out, false, &[]);
    client.wait_for_log("connected", Duration::from_secs(10));
    let took = started.elapsed();
    eprintln!("connected through the second endpoint after {took:?}");
    assert!(took < Duration::from_secs(3), "connected after {took:?}");
    assert!(
        client.log().contains("trying the next endpoint"),
        "{}",
        client.log()
    );
    assert!(world.ping(1, &REMOTE.to_string()), "through the second");
    // Under the kill switch, which lets both endpoints through, and the
    // routing rules, which send both to the uplink.
    let nft = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", world.client(1).name()))
        .args(["nft", "list", "table", "inet", "veil"])
        .output()
        .unwrap();
    let nft = String::from_utf8_lossy(&nft.stdout);
    for endpoint in [dead, "10.200.1.1"] {
        assert!(
            nft.contains(&format!(
                "ip daddr {endpoint} meta l4proto {{ tcp, udp }} th dport 443 accept"
            )),
            "{nft}"
        );
        let rules = ip_out(world.client(1), &["rule"]);
        assert!(
            rules.contains(&format!("7670:\tfrom all to {endpoint} lookup main")),
            "{rules}"
        );
    }
}

#[test]
fn dns_a_revoked_name_is_issued_again_and_only_the_new_profile_connects() {
    // The stale profile runs in a namespace of its own: one veil-client
    // per namespace.
    let world = World::new(2, &[]);
    let first = world.add_client("carol", 1);
    let mut old = world.start_client(1, &first, true);
    world.veil_user(&["client", "revoke", "carol"]);
    wait_until("the revoked session to end", Duration::from_secs(5), || {
        world.status()["clients"].as_array().unwrap().is_empty()
    });
    old.stop();
    let second = world.dir.join("carol2.veil");
    world.veil_user(&[
        "client",
        "add",
        "carol",
        "--out",
        second.to_str().unwrap(),
        "--endpoint",
        "10.200.1.1:443",
    ]);
    let _new = world.start_client(1, &second, true);
    assert!(world.ping(1, &REMOTE.to_string()));
    // The first profile is still refused, as revoked.
    let mut stale = world.start_client(2, &first, false);
    let log = world.gateway.as_ref().unwrap().log();
    wait_until(
        "the old profile to be refused",
        Duration::from_secs(10),
        || {
            world.gateway.as_ref().unwrap().log().len() > log.len()
                && world
                    .gateway
                    .as_ref()
                    .unwrap()
                    .log()
                    .contains("client `carol` is revoked")
        },
    );
    stale.stop();
    assert_eq!(world.status()["clients"].as_array().unwrap().len(), 1);
}
