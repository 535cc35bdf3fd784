//! Harder to spot, harder to correlate: whoever connects without a client
//! certificate meets an ordinary HTTPS site (the operator's certificate, a
//! normal handshake, the fallback site's pages and errors), while clients
//! with a profile still connect; the default log level keeps no address
//! that ties a client to a place or a destination; and NAT ports are drawn
//! at random, one per remote address, so that sites cannot tie a client's
//! socket together by its port.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use veil_common::{proto, EgressFlow, FlowKey, LAYOUT_VERSION};
use veil_tests::{
    bed::pinned_keys,
    world::{World, REMOTE},
};

const SITE: &str = "www.example.test";

/// A web PKI of our own: a root (what "system roots" will hold) and the
/// site's certificate from it, as an operator gets one from ACME.
struct Pki {
    root: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        let root_key = KeyPair::generate().unwrap();
        let mut root = CertificateParams::default();
        root.distinguished_name
            .push(DnType::CommonName, "Example Test Root");
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root_cert = root.self_signed(&root_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec![SITE.to_owned()]).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, SITE);
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = leaf.signed_by(&key, &Issuer::new(root, &root_key)).unwrap();
        let pki = Pki {
            root: dir.join("root.pem"),
            cert: dir.join("site.pem"),
            key: dir.join("site.key"),
        };
        std::fs::write(&pki.root, root_cert.pem()).unwrap();
        std::fs::write(&pki.cert, leaf.pem()).unwrap();
        std::fs::write(&pki.key, key.serialize_pem()).unwrap();
        pki
    }

    fn flags(&self) -> Vec<String> {
        vec![
            "--cert".into(),
            self.cert.display().to_string(),
            "--key".into(),
            self.key.display().to_string(),
        ]
    }
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `curl` from client namespace `i` (where no veil client runs), to the
/// gateway on that link: `-w` writes the status code last.
fn curl(world: &World, i: usize, extra: &[&str], url: &str) -> (String, String) {
    let resolve = format!("{SITE}:443:10.200.{i}.1");
    let mut args = vec!["-sS", "--max-time", "10", "--resolve", &resolve];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-w", "\n%{http_code}", url]);
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", world.client(i).name()))
        .arg("curl")
        .args(&args)
        .output()
        .unwrap();
    let all = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = all.rsplit_once('\n').unwrap_or(("", &all));
    assert!(out.status.success(), "curl {args:?}: {}", text(&out));
    (body.to_owned(), code.to_owned())
}

/// `openssl s_client` from client namespace `i`, sending `request`: all it
/// printed.
fn s_client(world: &World, i: usize, root: &Path, request: &str) -> String {
    let connect = format!("10.200.{i}.1:443");
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", world.client(i).name()))
        .args(["openssl", "s_client", "-connect", &connect])
        .args(["-servername", SITE, "-verify_return_error", "-ign_eof"])
        .arg("-CAfile")
        .arg(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "s_client: {}", text(&out));
    text(&out)
}

/// A stranger that opens a connection and says nothing is given nginx's
/// 60 s for its TLS handshake, not cut off at 10 s (a cheap, stable sign
/// that the server is not a web server); once a quarter of the handshake
/// places are taken, a new one gets 10 s.
#[test]
fn a_silent_stranger_is_given_a_web_servers_time_unless_places_are_short() {
    let world = World::new(1, &["--max-handshakes", "8"]);
    let connect = || {
        world.client(1).enter(|| {
            let s = std::net::TcpStream::connect(("10.200.1.1", 443)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(13))).unwrap();
            s
        })
    };
    let mut calm = connect();
    std::thread::sleep(Duration::from_millis(200));
    let mut crowded = connect();
    let started = std::time::Instant::now();
    let mut byte = [0u8; 1];
    let cut = crowded.read(&mut byte);
    let after = started.elapsed();
    assert!(
        matches!(cut, Ok(0))
            || matches!(&cut, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the second, with 2 of 8 places taken, is cut: {cut:?}"
    );
    assert!(
        after >= Duration::from_secs(9) && after < Duration::from_secs(12),
        "{after:?}"
    );
    // Past the 10 s it would have had before.
    calm.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let still = calm.read(&mut byte);
    assert!(
        matches!(&still, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "the first is still waiting after {:?}: {still:?}",
        started.elapsed()
    );
}

#[test]
fn a_stranger_meets_the_fallback_site_and_a_client_still_connects() {
    let mut world = World::bare(2);
    let pki = Pki::new(&world.dir);
    let mut flags = pki.flags();
    // The fallback: the remote's web server, which says whom it sees.
    flags.extend(["--fallback".into(), format!("{REMOTE}:80")]);
    // And what leaves says less about the client's system.
    flags.extend([
        "--normalize-ttl".into(),
        "64".into(),
        "--random-ip-id".into(),
    ]);
    world.start_gateway(&flags.iter().map(String::as_str).collect::<Vec<_>>());

    // A client whose profile names the site and pins its key.
    let profile = world.add_client("alice", 1);
    let written = std::fs::read_to_string(&profile).unwrap();
    assert!(
        written.contains(&format!("server_name = \"{SITE}\""))
            && written.contains("server_pin = \"sha256/"),
        "{written}"
    );
    let _alice = world.start_client(1, &profile, true);
    assert!(world.fetch(1).unwrap().starts_with("Hello 198.18.0.1:"));

    // curl, with the site's root as its trust store: a normal handshake
    // for the real name, then the fallback site's page.
    let url = format!("https://{SITE}/");
    let (body, code) = curl(&world, 2, &["--cacert", pki.root.to_str().unwrap()], &url);
    assert_eq!(code, "200", "{body}");
    assert!(
        body.starts_with("Hello 198.18.0.1:"),
        "the decrypted request went on to the fallback site: {body}"
    );
    // Over TLS 1.2 too, as most sites still allow.
    let (_, code) = curl(
        &world,
        2,
        &["--cacert", pki.root.to_str().unwrap(), "--tls-max", "1.2"],
        &url,
    );
    assert_eq!(code, "200");

    // openssl: the chain verifies, the certificate request names no CA,
    // nothing says veil, and the request is answered.
    let seen = s_client(
        &world,
        2,
        &pki.root,
        &format!("GET / HTTP/1.1\r\nHost: {SITE}\r\nConnection: close\r\n\r\n"),
    );
    assert!(seen.contains("Verify return code: 0 (ok)"), "{seen}");
    assert!(
        seen.contains("No client certificate CA names sent"),
        "{seen}"
    );
    assert!(seen.contains("HTTP/1.1 200 OK"), "{seen}");
    assert!(seen.contains("Hello 198.18.0.1:"), "{seen}");
    assert!(!seen.to_lowercase().contains("veil"), "{seen}");

    // Strangers are counted, not served a session.
    let refused = &world.status()["refused"]["unknown_client"];
    assert!(refused.as_u64().unwrap_or(0) >= 3, "{refused}");
    // And the client's tunnel outlived them.
    assert!(world.fetch(1).unwrap().starts_with("Hello 198.18.0.1:"));
}

#[test]
fn without_a_fallback_site_a_static_page_answers_as_a_web_server_would() {
    let mut world = World::bare(1);
    let pki = Pki::new(&world.dir);
    let flags = pki.flags();
    world.start_gateway(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    let root = pki.root.to_str().unwrap();

    let (page, code) = curl(&world, 1, &["--cacert", root], &format!("https://{SITE}/"));
    assert_eq!(code, "200");
    assert!(page.contains("<title>Welcome</title>"), "{page}");
    let (_, code) = curl(
        &world,
        1,
        &["--cacert", root],
        &format!("https://{SITE}/admin"),
    );
    assert_eq!(code, "404");
    let (_, code) = curl(
        &world,
        1,
        &["--cacert", root, "-X", "POST", "-d", "x=1"],
        &format!("https://{SITE}/"),
    );
    assert_eq!(code, "405");
    // A stranger's CONNECT-IP upgrade is only a GET for a missing page.
    let (_, code) = curl(
        &world,
        1,
        &[
            "--cacert",
            root,
            "-H",
            "Upgrade: connect-ip",
            "-H",
            "Capsule-Protocol: ?1",
        ],
        &format!("https://{SITE}/.well-known/masque/ip/*/*/"),
    );
    assert_eq!(code, "404");
    // Two requests on one connection: keep-alive, as HTTP/1.1 has it.
    let first = format!("https://{SITE}/");
    let (both, _) = curl(
        &world,
        1,
        &["--cacert", root, &first],
        &format!("https://{SITE}/index.html"),
    );
    assert_eq!(both.matches("<title>Welcome</title>").count(), 2, "{both}");
}

#[test]
fn a_profile_may_trust_the_system_roots_instead_of_the_pin() {
    let mut world = World::bare(1);
    let pki = Pki::new(&world.dir);
    let flags = pki.flags();
    world.start_gateway(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    let out = world.dir.join("bob.veil");
    world.veil_user(&[
        "client",
        "add",
        "bob",
        "--out",
        out.to_str().unwrap(),
        "--endpoint",
        "10.200.1.1:443",
        "--system-roots",
    ]);
    // A key the gateway never had: only the roots can vouch now (as after
    // an ACME renewal with a new key).
    let text = std::fs::read_to_string(&out).unwrap();
    let pin = text
        .lines()
        .find(|l| l.starts_with("server_pin"))
        .expect("a pin")
        .to_owned();
    let stale = "server_pin = \"sha256/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"";
    std::fs::write(&out, text.replace(&pin, stale)).unwrap();
    assert!(text.contains("system_roots = true"), "{text}");
    let _bob = world.start_client_env(1, &out, &[("SSL_CERT_FILE", pki.root.to_str().unwrap())]);
    assert!(world.fetch(1).unwrap().starts_with("Hello 198.18.0.1:"));
}

#[test]
fn the_default_log_level_keeps_no_client_address_and_no_destination() {
    let mut world = World::bare(1);
    world.start_gateway_logging(&[], "info");
    let profile = world.add_client("carol", 1);
    let mut carol = world.start_client(1, &profile, true);
    // TCP, UDP and ICMP through the tunnel; a refused destination too.
    assert!(world.fetch(1).unwrap().starts_with("Hello 198.18.0.1:"));
    assert!(world.ping(1, &REMOTE.to_string()));
    let refused = world.client(1).enter(|| {
        std::net::TcpStream::connect_timeout(
            &("10.200.9.2:80".parse().unwrap()),
            Duration::from_millis(500),
        )
        .is_err()
    });
    assert!(refused, "the LAN behind the gateway is closed by default");
    // Status: no public address unless asked for.
    let status = world.veil_user(&["status", "--json"]);
    assert!(!status.contains("10.200.1.2"), "{status}");
    let status = world.veil_user(&["status", "--json", "--addresses"]);
    assert!(status.contains("10.200.1.2"), "{status}");
    carol.stop();
    world
        .gateway()
        .wait_for_log("session ended", Duration::from_secs(10));

    let log = world.gateway().log();
    assert!(log.contains("session started"), "{log}");
    for (what, addr) in [
        ("the client's uplink address", "10.200.1.2"),
        ("the remote's address", "198.18.0.2"),
        ("a refused destination", "10.200.9.2"),
    ] {
        assert!(!log.contains(addr), "{what} ({addr}) in the log:\n{log}");
    }
}

#[test]
fn outgoing_packets_may_leave_with_one_ttl_and_random_ids() {
    use veil_tests::{
        bed::{Bed, CLIENT, REMOTE as BED_REMOTE, TC_ACT_REDIRECT},
        packet::{assert_checksums, frame, ip_of, L4},
    };
    let mut bed = Bed::new();
    bed.flow(proto::UDP, 40000, 53);
    let send = |bed: &mut Bed, ttl: u8| {
        let input = frame(CLIENT, BED_REMOTE, ttl, L4::udp(40000, 53, b"hello"));
        let (action, out) = bed.tun(&input);
        assert_eq!(action, TC_ACT_REDIRECT);
        assert_checksums(ip_of(&out));
        let ip = ip_of(&out);
        (ip[8], u16::from_be_bytes([ip[4], ip[5]]))
    };
    // Off by default: one hop less, the client's ID.
    let (ttl, id) = send(&mut bed, 128);
    assert_eq!(ttl, 127);
    let (_, again) = send(&mut bed, 128);
    assert_eq!(id, again, "the client's own ID");

    bed.dp
        .normalize(veil_common::normalize::Normalize {
            ttl: 64,
            random_id: 1,
        })
        .unwrap();
    let seen: Vec<(u8, u16)> = (0..20).map(|i| send(&mut bed, 100 + i)).collect();
    assert!(seen.iter().all(|(ttl, _)| *ttl == 64), "{seen:?}");
    let mut ids: Vec<u16> = seen.iter().map(|(_, id)| *id).collect();
    ids.sort();
    ids.dedup();
    assert!(ids.len() >= 18, "random IDs: {ids:?}");
}

/// χ² of `samples` over `bins` equal slices of `min..=max`.
fn chi_squared(samples: &[u16], min: u16, max: u16, bins: usize) -> f64 {
    let len = usize::from(max - min) + 1;
    let mut counts = vec![0usize; bins];
    for p in samples {
        counts[usize::from(p - min) * bins / len] += 1;
    }
    let expected = samples.len() as f64 / bins as f64;
    counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum()
}

#[test]
fn nat_ports_of_one_client_socket_are_uniform_and_unlinked_with_address_dependent_mapping() {
    const FLOWS: usize = 1000;
    const CLIENT_PORT: u16 = 40000;
    let mut world = World::bare(1);
    // 1000 remote addresses, all behind the remote's link (which drops
    // them: only the gateway's choice of ports matters here).
    world
        .gw
        .ip(&["route", "add", "198.18.0.0/15", "via", &REMOTE.to_string()]);
    world.start_gateway(&["--mapping", "address-dependent"]);
    let profile = world.add_client("dave", 1);
    let _dave = world.start_client(1, &profile, true);
    let vip = world.vip_of("dave");

    world.client(1).enter(|| {
        let socket = std::net::UdpSocket::bind(("0.0.0.0", CLIENT_PORT)).unwrap();
        for i in 0..FLOWS {
            let remote = std::net::Ipv4Addr::new(198, 18, 1 + (i / 250) as u8, 1 + (i % 250) as u8);
            socket.send_to(b"which port?", (remote, 9)).unwrap();
            if i % 50 == 49 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    let egress = world
        .pins()
        .join(format!("v{LAYOUT_VERSION}"))
        .join("egress");
    let mut ports: Vec<([u8; 4], u16)> = Vec::new();
    for _ in 0..100 {
        ports = pinned_keys::<FlowKey, EgressFlow>(&egress)
            .into_iter()
            .filter(|(k, _)| {
                k.proto == proto::UDP && k.client_port == CLIENT_PORT && k.client() == vip
            })
            .map(|(k, v)| (k.remote_addr, v.nat_port))
            .collect::<Vec<_>>();
        // In the order the flows were made: by remote address.
        ports.sort();
        if ports.len() >= FLOWS {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ports.len(), FLOWS, "one flow per remote address");
    let ports: Vec<u16> = ports.into_iter().map(|(_, p)| p).collect();

    // Address-dependent: each remote address its own draw (endpoint-
    // independent mapping would show one port 1000 times).
    let mut distinct = ports.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() > 850, "{} distinct ports", distinct.len());
    assert!(
        ports.iter().all(|p| (61000..=65535).contains(p)) && !ports.contains(&CLIENT_PORT),
        "in the NAT range, never the client's own port"
    );
    // Uniform over the range: χ² over 20 slices (19 degrees of freedom)
    // under 50, which a uniform draw exceeds about once in 10^4 runs; a
    // sequential allocator scores in the thousands.
    let chi2 = chi_squared(&ports, 61000, 65535, 20);
    assert!(chi2 < 50.0, "χ² = {chi2:.1} over 20 slices: not uniform");
    // And no order: successive flows are not neighbours in the range.
    let neighbours = ports
        .windows(2)
        .filter(|w| w[0].abs_diff(w[1]) <= 2)
        .count();
    assert!(
        neighbours < 20,
        "{neighbours} successive flows on neighbouring ports"
    );
}
