//! The client's modes without a TUN device: `--socks` (SOCKS5) and
//! `--redirect` (kernel-redirected connections), carried through the
//! tunnel by its user-space TCP/IP stack. The real `veil-user` and
//! `veil-client` in network namespaces (see `veil_tests::world`); the
//! SOCKS client runs as `nobody`, as nothing in that mode needs root.
//!
//! The client namespace has no TUN device and a default route to the
//! gateway namespace, which does not forward: whatever reaches the remote
//! went through the tunnel.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RData, RecordType},
};
use veil_tests::{
    dns::DnsServer,
    netns::NetNs,
    proc::{workspace_bin, Proc},
    world::{ip_out, pseudo_random, sha256, World, PUBLIC, REMOTE},
};

const PROXY: &str = "127.0.0.1:1080";
const NAME: &str = "files.veil-socks-test.example.";
/// What the local network's resolver answers: seeing it used is a leak.
const LEAKED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 66);
/// The client's local network's resolver (on its router).
const LOCAL_RESOLVER: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
const BIG_PORT: u16 = 8000;
const BIG_LEN: usize = 50 << 20;
/// Answers once the client has closed its side: how many bytes it sent.
const COUNT_PORT: u16 = 8001;
/// Closes its side first, then counts what the client still sends.
const FIRST_PORT: u16 = 8002;
/// Answers once the client has closed its side: the sha256 of what it sent.
const HASH_PORT: u16 = 8003;
/// Nothing listens there: the remote answers with a reset.
const CLOSED_PORT: u16 = 8009;
const UNPRIVILEGED: u32 = 65534;

/// The remote's extra servers for these tests, with who connected.
struct Remote {
    peers: Arc<Mutex<Vec<Ipv4Addr>>>,
    /// What [`FIRST_PORT`] received after closing its side.
    received_after_close: Arc<Mutex<Option<usize>>>,
}

fn big_file() -> Vec<u8> {
    pseudo_random(BIG_LEN, 0x2545_f491_4f6c_dd1d)
}

impl Remote {
    fn start(ns: &NetNs) -> Remote {
        let (big, count, first, hash) = ns.enter(|| {
            (
                TcpListener::bind((REMOTE, BIG_PORT)).unwrap(),
                TcpListener::bind((REMOTE, COUNT_PORT)).unwrap(),
                TcpListener::bind((REMOTE, FIRST_PORT)).unwrap(),
                TcpListener::bind((REMOTE, HASH_PORT)).unwrap(),
            )
        });
        let peers = Arc::new(Mutex::new(Vec::new()));
        let received_after_close = Arc::new(Mutex::new(None));
        let data = Arc::new(big_file());
        let p = peers.clone();
        // One HTTP response, whatever was asked: the 50 MB file.
        accept_each(big, p.clone(), move |mut s| {
            let mut head = [0u8; 4096];
            let _ = s.read(&mut head);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                data.len()
            );
            let _ = s.write_all(&data);
        });
        accept_each(count, p.clone(), |mut s| {
            let mut all = Vec::new();
            let _ = s.read_to_end(&mut all);
            let _ = write!(s, "got {} bytes", all.len());
        });
        accept_each(hash, p.clone(), |mut s| {
            let mut all = Vec::new();
            let _ = s.read_to_end(&mut all);
            let _ = s.write_all(&sha256(&all));
        });
        let r = received_after_close.clone();
        accept_each(first, p, move |mut s| {
            let _ = s.write_all(b"ready");
            let _ = s.shutdown(Shutdown::Write);
            let mut all = Vec::new();
            let _ = s.read_to_end(&mut all);
            *r.lock().unwrap() = Some(all.len());
        });
        Remote {
            peers,
            received_after_close,
        }
    }

    fn seen(&self) -> Vec<Ipv4Addr> {
        self.peers.lock().unwrap().clone()
    }
}

/// Serves each connection on a thread of its own; the listener's thread
/// ends with the test process.
fn accept_each(
    listener: TcpListener,
    peers: Arc<Mutex<Vec<Ipv4Addr>>>,
    serve: impl Fn(TcpStream) + Send + Sync + Clone + 'static,
) {
    thread::spawn(move || {
        for s in listener.incoming().flatten() {
            if let Ok(std::net::SocketAddr::V4(from)) = s.peer_addr() {
                peers.lock().unwrap().push(*from.ip());
            }
            let serve = serve.clone();
            thread::spawn(move || serve(s));
        }
    });
}

/// A world whose gateway announces the "internet" resolver, which knows
/// [`NAME`]; the client's local network has a resolver of its own, which
/// the client namespace's resolv.conf names.
fn world() -> (World, DnsServer, DnsServer, Remote) {
    let world = World::new(1, &["--dns", &REMOTE.to_string()]);
    let internet = DnsServer::start(&world.remote, REMOTE, &[(NAME, REMOTE)]);
    let local = DnsServer::start(&world.gw, LOCAL_RESOLVER, &[(NAME, LEAKED)]);
    world.client(1).set_resolv_conf(&format!(
        "nameserver {LOCAL_RESOLVER}\noptions timeout:1 attempts:1\n"
    ));
    let remote = Remote::start(&world.remote);
    (world, internet, local, remote)
}

/// `veil-client ARGS` in client namespace 1 as `nobody` (the profile
/// given to it), waiting until connected.
fn start_unprivileged(world: &World, extra: &[&str]) -> Proc {
    start_client(world, true, extra)
}

/// `veil-client ARGS` in client namespace 1 as root.
fn start_root(world: &World, extra: &[&str]) -> Proc {
    start_client(world, false, extra)
}

fn start_client(world: &World, as_nobody: bool, extra: &[&str]) -> Proc {
    let profile = world.add_client("alice", 1);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", world.client(1).name()]);
    if as_nobody {
        std::os::unix::fs::chown(&profile, Some(UNPRIVILEGED), Some(UNPRIVILEGED)).unwrap();
        cmd.args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ]);
    }
    cmd.arg(workspace_bin("veil-client"))
        .arg("--profile")
        .arg(&profile)
        .args(["--keepalive", "1"])
        .args(extra);
    start(world, cmd)
}

fn start(world: &World, cmd: Command) -> Proc {
    let mut p = Proc::start("veil-client", cmd, world.dir.join("client.log"));
    p.wait_for_log("connected", Duration::from_secs(15));
    p
}

fn curl(ns: &NetNs, args: &[&str]) -> std::process::Output {
    ns.netns_exec("curl", args)
}

fn file_sha256(path: &Path) -> Vec<u8> {
    sha256(&std::fs::read(path).expect("the downloaded file"))
}

/// A SOCKS5 request (no authentication) from inside the namespace:
/// the reply code, the address it names, and the connection.
fn socks_request(cmd: u8, target: &[u8]) -> (u8, SocketAddrV4, TcpStream) {
    let mut s = TcpStream::connect(PROXY).expect("connecting to the SOCKS server");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).unwrap();
    assert_eq!(choice, [5, 0], "no authentication on loopback");
    let mut request = vec![5, cmd, 0];
    request.extend_from_slice(target);
    s.write_all(&request).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).expect("the SOCKS reply");
    assert_eq!((reply[0], reply[3]), (5, 1), "an IPv4 reply: {reply:?}");
    let bound = SocketAddrV4::new(
        Ipv4Addr::new(reply[4], reply[5], reply[6], reply[7]),
        u16::from_be_bytes([reply[8], reply[9]]),
    );
    (reply[1], bound, s)
}

fn ipv4_target(addr: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut t = vec![1];
    t.extend_from_slice(&addr.octets());
    t.extend_from_slice(&port.to_be_bytes());
    t
}

fn tempfile(world: &World, name: &str) -> PathBuf {
    world.dir.join(name)
}

#[test]
fn socks_fetches_a_big_file_by_name_through_the_tunnel_without_tun_or_root() {
    let (world, internet, local, remote) = world();
    let links_before = ip_out(world.client(1), &["-o", "link"]);
    let routes_before = ip_out(world.client(1), &["route"]);
    // Without veil, the client's own resolver answers (and would see the
    // name), and the remote is out of reach.
    let found = world.client(1).netns_exec("getent", &["hosts", NAME]);
    assert!(String::from_utf8_lossy(&found.stdout).contains(&LEAKED.to_string()));
    let asked_locally = local.seen().len();

    let mut client = start_unprivileged(&world, &["--socks", PROXY]);
    assert_eq!(
        ip_out(world.client(1), &["-o", "link"]),
        links_before,
        "no TUN device"
    );
    assert_eq!(
        ip_out(world.client(1), &["route"]),
        routes_before,
        "no route changed"
    );

    let out = tempfile(&world, "big");
    let url = format!("http://{}:{BIG_PORT}/big", NAME.trim_end_matches('.'));
    let fetched = curl(
        world.client(1),
        &[
            "-sS",
            "--max-time",
            "60",
            "--socks5-hostname",
            PROXY,
            "-o",
            out.to_str().unwrap(),
            &url,
        ],
    );
    assert!(
        fetched.status.success(),
        "curl: {}\n{}",
        String::from_utf8_lossy(&fetched.stderr),
        client.log()
    );
    assert_eq!(file_sha256(&out), sha256(&big_file()), "50 MB intact");
    assert_eq!(
        remote.seen(),
        vec![PUBLIC],
        "the remote saw only the gateway"
    );
    assert_eq!(
        local.seen().len(),
        asked_locally,
        "the local resolver saw nothing"
    );
    let asked = internet.seen();
    assert!(
        asked.iter().any(|(_, n)| n == NAME) && asked.iter().all(|(f, _)| f.ip() == PUBLIC),
        "the name was resolved through the tunnel: {asked:?}"
    );
    client.stop();
}

#[test]
fn socks_udp_associate_carries_a_dns_query() {
    let (world, internet, _local, _remote) = world();
    let _client = start_unprivileged(&world, &["--socks", PROXY]);
    let answer = world.client(1).enter(|| {
        let (code, relay, control) = socks_request(3, &ipv4_target(Ipv4Addr::UNSPECIFIED, 0));
        assert_eq!(code, 0, "UDP ASSOCIATE granted");
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut query = Message::new(0x5e11, MessageType::Query, OpCode::Query);
        query.metadata.recursion_desired = true;
        query
            .queries
            .push(Query::query(Name::from_ascii(NAME).unwrap(), RecordType::A));
        let mut datagram = vec![0, 0, 0];
        datagram.extend_from_slice(&ipv4_target(REMOTE, 53));
        datagram.extend_from_slice(&query.to_vec().unwrap());
        udp.send_to(&datagram, relay).unwrap();
        let mut buf = [0u8; 1500];
        let (n, _) = udp
            .recv_from(&mut buf)
            .expect("an answer through the relay");
        drop(control);
        assert_eq!(
            &buf[..10],
            &[0, 0, 0, 1, 198, 18, 0, 2, 0, 53],
            "from the resolver"
        );
        Message::from_vec(&buf[10..n]).expect("a DNS answer")
    });
    assert_eq!(answer.metadata.id, 0x5e11);
    let addrs: Vec<Ipv4Addr> = answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    assert_eq!(addrs, vec![REMOTE]);
    assert!(internet.seen().iter().all(|(f, _)| f.ip() == PUBLIC));
}

/// Over HTTP/3 a packet must fit a QUIC datagram: the stack's segments
/// are sized to it, or full-size ones would be lost (smoltcp does no
/// path MTU discovery) and an upload would stall. Not a speed test: a
/// stalled upload times out.
#[test]
fn socks_uploads_20_mb_intact_over_http3() {
    let (world, _internet, _local, remote) = world();
    let client = start_unprivileged(&world, &["--socks", PROXY, "--transport", "h3"]);
    assert!(
        client.log().contains("transport up: h3"),
        "{}",
        client.log()
    );
    let data = pseudo_random(20 << 20, 0x9e37_79b9_7f4a_7c15);
    let hash = world.client(1).enter(|| {
        let (code, _, mut s) = socks_request(1, &ipv4_target(REMOTE, HASH_PORT));
        assert_eq!(code, 0);
        s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(&data).expect("the upload");
        s.shutdown(Shutdown::Write).unwrap();
        let mut hash = Vec::new();
        s.read_to_end(&mut hash).expect("the remote's sha256");
        hash
    });
    assert_eq!(hash, sha256(&data), "20 MB intact\n{}", client.log());
    assert_eq!(
        remote.seen(),
        vec![PUBLIC],
        "the remote saw only the gateway"
    );
}

#[test]
fn socks_reports_a_closed_port_within_a_second_and_half_closes_both_ways() {
    let (world, _internet, _local, remote) = world();
    let _client = start_unprivileged(&world, &["--socks", PROXY]);
    world.client(1).enter(|| {
        let started = Instant::now();
        let (code, _, _) = socks_request(1, &ipv4_target(REMOTE, CLOSED_PORT));
        assert_eq!(code, 5, "connection refused");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "reported in {:?}",
            started.elapsed()
        );

        // The client closes its side first and still reads the answer.
        let (code, _, mut s) = socks_request(1, &ipv4_target(REMOTE, COUNT_PORT));
        assert_eq!(code, 0);
        s.write_all(&vec![7u8; 100_000]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "got 100000 bytes");

        // The remote closes its side first and still reads the client.
        let (code, _, mut s) = socks_request(1, &ipv4_target(REMOTE, FIRST_PORT));
        assert_eq!(code, 0);
        let mut first = String::new();
        s.read_to_string(&mut first).unwrap();
        assert_eq!(first, "ready", "then end of stream");
        s.write_all(&vec![7u8; 50_000]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
    });
    veil_tests::wait_until(
        "the remote to read the client after closing its side",
        Duration::from_secs(5),
        || *remote.received_after_close.lock().unwrap() == Some(50_000),
    );
}

#[test]
fn redirect_rules_carry_an_unmodified_curl_and_leave_the_ruleset_as_it_was() {
    let (world, _internet, _local, remote) = world();
    let ruleset = || {
        String::from_utf8_lossy(&world.client(1).exec("nft", &["list", "ruleset"]).stdout)
            .into_owned()
    };
    // Something of the user's own, which must survive untouched.
    world
        .client(1)
        .exec("nft", &["add", "table", "inet", "users_own"]);
    let before = ruleset();
    let mut client = start_root(
        &world,
        &[
            "--redirect",
            "127.0.0.1:4333",
            "--redirect-rules",
            "--no-dns",
        ],
    );
    assert!(ruleset().contains("veil_redirect"));
    let links = ip_out(world.client(1), &["-o", "link"]);
    assert!(!links.contains("veil0"), "no TUN device: {links}");

    let fetched = curl(
        world.client(1),
        &["-sS", "--max-time", "10", "http://198.18.0.2/"],
    );
    assert!(
        fetched.status.success(),
        "curl: {}\n{}",
        String::from_utf8_lossy(&fetched.stderr),
        client.log()
    );
    let body = String::from_utf8_lossy(&fetched.stdout);
    assert!(body.contains("Hello 198.18.0.1"), "{body}");

    // Half-close through the redirect too, and a refused destination is
    // a reset, not a hang.
    world.client(1).enter(|| {
        let mut s = TcpStream::connect((REMOTE, COUNT_PORT)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&[1u8; 4096]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "got 4096 bytes");

        let started = Instant::now();
        let mut s = TcpStream::connect((REMOTE, CLOSED_PORT)).expect("accepted locally");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let e = s.read(&mut [0u8; 16]);
        assert!(
            matches!(&e, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{e:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    });
    assert!(remote.seen().iter().all(|a| *a == PUBLIC));
    assert_eq!(
        world.servers.seen(),
        vec![PUBLIC],
        "the web server saw the gateway"
    );

    client.stop();
    assert_eq!(ruleset(), before, "the ruleset exactly as before");
}

/// A redirect listener on 0.0.0.0 carries only what the kernel redirected
/// to it: a connection made straight to it, at the machine's own address,
/// is closed, not carried through the tunnel to that address (on a host
/// with a public address the gateway sent it back to the same listener,
/// which carried it again: a loop one connection from anyone started).
/// Here the gateway's policy refuses the private address: before, the
/// refusal was counted; now nothing reaches the gateway. The user's own
/// redirect (web traffic only) makes netfilter track connections, as any
/// redirect does: without it nothing has an original destination.
#[test]
fn a_connection_straight_to_the_redirect_listener_is_not_carried() {
    let (world, _internet, _local, _remote) = world();
    let nft = |rule: &str| {
        let out = world.client(1).exec("nft", &[rule]);
        assert!(out.status.success(), "{rule}: {out:?}");
    };
    nft("add table ip users_nat");
    nft("add chain ip users_nat out { type nat hook output priority -100 ; }");
    nft("add rule ip users_nat out tcp dport 80 redirect to :4333");
    let mut client = start_root(&world, &["--redirect", "0.0.0.0:4333", "--no-dns"]);
    let refused = || {
        world.status()["counters"]["policy_refused"]
            .as_u64()
            .unwrap()
    };
    let before = refused();
    world.client(1).enter(|| {
        let mut s = TcpStream::connect(("10.200.1.2", 4333)).expect("accepted");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let got = s.read(&mut [0u8; 1]);
        assert!(!matches!(got, Ok(n) if n > 0), "closed: {got:?}");
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(refused(), before, "nothing went into the tunnel");
    client.stop();
}

/// Sends `msg` to an echo server and reads it back.
fn echo(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).unwrap();
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn beside_the_tun_device_both_kinds_of_stream_survive_a_reconnect() {
    let world = World::new(1, &["--grace", "10"]);
    let profile = world.add_client("both", 1);
    // Over TCP: the reconnect below is forced by resetting its connection.
    let mut client = world.start_client_with(
        1,
        &profile,
        true,
        &["--socks", PROXY, "--tun", "veil0", "--transport", "tcp"],
    );
    let (mut via_socks, mut via_tun) = world.client(1).enter(|| {
        let (code, bound, s) = socks_request(1, &ipv4_target(REMOTE, 7));
        assert_eq!(code, 0);
        assert!(
            bound.port() >= 61000,
            "the stack's ports are above the kernel's: {bound}"
        );
        let t = TcpStream::connect_timeout(&(REMOTE, 7).into(), Duration::from_secs(5)).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        (s, t)
    });
    assert_eq!(echo(&mut via_socks, b"socks before"), b"socks before");
    assert_eq!(echo(&mut via_tun, b"tun before"), b"tun before");

    // The tunnel's connection breaks (a reset, as a NAT box forgetting it
    // would cause): the client reconnects, the streams carry on.
    let killed = world
        .client(1)
        .exec("ss", &["-K", "dst", "10.200.1.1", "dport", "=", "443"]);
    assert!(killed.status.success(), "ss -K: {killed:?}");
    veil_tests::wait_until("the tunnel to break", Duration::from_secs(5), || {
        client.log().contains("reconnecting")
    });
    assert_eq!(echo(&mut via_socks, b"socks after"), b"socks after");
    assert_eq!(echo(&mut via_tun, b"tun after"), b"tun after");
    assert!(world.servers.seen().iter().all(|a| *a == PUBLIC));
    client.stop();
}
