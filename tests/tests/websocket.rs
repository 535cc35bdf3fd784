//! veil behind an ordinary website: a real nginx (or Caddy) in the
//! gateway's namespace ends the website's TLS on its own port with its own
//! certificate, serves a static page at `/` and proxies `/veil` to the
//! gateway's `--ws-listen`; clients have `wss://` profiles.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use tungstenite::client::IntoClientRequest;
use veil_tests::{
    proc::{rss_bytes, workspace_bin, Proc},
    raw::tls_without_certificate,
    web::{Server, Site, Website, PAGE},
    world::{download_data, sha256, World, PUBLIC},
};

const SITE: Site = Site {
    name: "proxy.test",
    listen: "10.200.1.1:8443",
    ws_path: "/veil",
    upstream: "127.0.0.1:8080",
};
const URL: &str = "wss://proxy.test:8443/veil";

/// The world with its gateway taking WebSockets, `server` in front of it,
/// and client 1's namespace resolving the website's name.
fn behind(server: Server) -> (World, Website) {
    let world = World::new(1, &["--ws-listen", SITE.upstream]);
    let web = Website::start(server, &world.gw, &world.dir.join("web"), &SITE);
    // `ip netns exec` shows the namespace this file as /etc/hosts (removed
    // with the namespace).
    let etc = PathBuf::from("/etc/netns").join(world.client(1).name());
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("hosts"), "10.200.1.1 proxy.test\n").unwrap();
    (world, web)
}

/// veil-client in client 1's namespace as `ip netns exec` runs it (its
/// /etc/hosts knows the website), connected.
fn start_client(world: &World, profile: &PathBuf) -> Proc {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", world.client(1).name()])
        .arg(workspace_bin("veil-client"))
        .arg("--profile")
        .arg(profile)
        .args(["--keepalive", "1", "--no-dns"]);
    let mut client = Proc::start("veil-client", cmd, world.dir.join("client-ws.log"));
    client.wait_for_log("connected", Duration::from_secs(15));
    client
}

/// `curl` in namespace `ns`: its stdout.
fn curl(ns: &str, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{ns}"))
        .args(["curl", "-sS", "--max-time", "5"])
        .args(args)
        .output()
        .expect("running curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_wss_client_downloads_through_nginx_and_the_website_stays_a_website() {
    through(Server::Nginx);
}

#[test]
fn a_wss_client_downloads_through_caddy_and_the_website_stays_a_website() {
    through(Server::Caddy);
}

fn through(server: Server) {
    let (world, web) = behind(server);
    let profile = web.profile(&world, "alice", URL);
    let text = std::fs::read_to_string(&profile).unwrap();
    assert!(text.contains(URL) && text.contains("endpoint_ca"), "{text}");
    let mut client = start_client(&world, &profile);

    let got = world.download(1).expect("download through the WebSocket");
    assert_eq!(got, sha256(&download_data()), "the bytes arrived intact");
    assert_eq!(
        world.servers.seen(),
        [PUBLIC],
        "the remote saw the gateway's address only"
    );
    // The website, from the client's namespace while the tunnel is up
    // (the web server is its endpoint, let through the kill switch).
    let ca = web.ca.to_str().unwrap();
    let page = curl(
        world.client(1).name(),
        &[
            "--cacert",
            ca,
            "--resolve",
            "proxy.test:8443:10.200.1.1",
            "https://proxy.test:8443/",
        ],
    );
    assert_eq!(page, PAGE, "the static page is still served");

    // The gateway's listener itself: an upgrade elsewhere than its path is
    // not found.
    let status = curl(
        world.gw.name(),
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            "-H",
            "Sec-WebSocket-Version: 13",
            "-H",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "http://127.0.0.1:8080/other",
        ],
    );
    assert_eq!(status, "404");
    let status = world.status();
    assert_eq!(status["clients"][0]["name"], "alice", "{status}");

    // The web server logs a relayed WebSocket when it ends.
    client.stop();
    veil_tests::wait_until(
        "the web server's log of the upgrade",
        Duration::from_secs(5),
        || web.logged_upgrade(SITE.ws_path),
    );
}

#[test]
fn a_websocket_upgrade_without_a_client_certificate_gets_no_tunnel() {
    let (mut world, mut web) = behind(Server::Nginx);
    let ca = std::fs::read_to_string(&web.ca).unwrap();
    let gateway_ca = std::fs::read_to_string(world.state.join("ca.crt")).unwrap();
    let answer = world
        .client(1)
        .enter(|| without_certificate(&ca, &gateway_ca));
    eprintln!("without a certificate: {answer}");
    assert!(
        !answer.contains("HTTP/1.1 2") && !answer.contains(" 101"),
        "the CONNECT-IP request got an answer: {answer}"
    );
    let gateway = world.gateway();
    gateway.wait_for_log("session refused", Duration::from_secs(5));
    assert!(!gateway.log().contains("session started"));
    assert!(
        world.status()["refused"]
            .as_object()
            .unwrap()
            .contains_key("tls")
            || world.status()["refused"]
                .as_object()
                .unwrap()
                .contains_key("unknown_client"),
        "{}",
        world.status()
    );
    // Everyone else is served as before.
    assert!(web.is_running());
    let profile = web.profile(&world, "bob", URL);
    let _client = start_client(&world, &profile);
    assert!(world.fetch(1).unwrap().contains("198.18.0.1"));
}

/// A peer that upgrades, then only sends pings and never reads their
/// pongs (before any TLS, so before anyone knows who it is): once the
/// pongs cannot be written, the gateway stops reading it, and its memory
/// does not grow with what the peer sends. Straight to `--ws-listen`, as
/// the proxy would relay it.
#[test]
fn a_websocket_peer_that_pings_and_never_reads_cannot_grow_the_gateway() {
    let mut world = World::new(1, &["--ws-listen", SITE.upstream]);
    let pid = world.gateway().pid();
    let before = rss_bytes(pid);
    let (sent, took) = world.gw.enter(|| {
        let tcp = TcpStream::connect(SITE.upstream).unwrap();
        // Small buffers on our side: the pongs back up sooner.
        socket2::SockRef::from(&tcp)
            .set_recv_buffer_size(4096)
            .unwrap();
        tcp.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
        let url = format!("ws://{}{}", SITE.upstream, SITE.ws_path);
        let (mut ws, _) = tungstenite::client(url.as_str(), tcp).expect("the upgrade");
        let (started, mut sent) = (Instant::now(), 0u64);
        // Until the gateway takes no more (a write times out), 8 s at most.
        while started.elapsed() < Duration::from_secs(8) {
            if ws
                .send(tungstenite::Message::Ping(vec![7; 125].into()))
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        (sent, started.elapsed())
    });
    let after = rss_bytes(pid);
    eprintln!("{sent} pings in {took:?}; gateway RSS {before} -> {after} bytes");
    assert!(
        took < Duration::from_secs(8),
        "the gateway read {sent} pings for 8 s"
    );
    assert!(
        after <= before + (16 << 20),
        "the gateway grew from {before} to {after} bytes over {sent} pings"
    );
    assert!(world.gateway().is_running());
}

/// Peers that announce a large message and send most of it, then wait,
/// before any TLS: each is closed on the announcement, and the gateway does
/// not keep what they sent (with the 1 MiB limit before, 9 of 32 were
/// still held open, their bytes waiting for the rest of the frame).
#[test]
fn unauthenticated_websocket_peers_cannot_make_the_gateway_buffer_megabytes() {
    const PEERS: usize = 32;
    const ANNOUNCED: usize = 1 << 20;
    let mut world = World::new(1, &["--ws-listen", SITE.upstream]);
    let pid = world.gateway().pid();
    let before = rss_bytes(pid);
    let closed = world.gw.enter(|| {
        let peers: Vec<TcpStream> = (0..PEERS)
            .map(|_| {
                let tcp = TcpStream::connect(SITE.upstream).unwrap();
                let url = format!("ws://{}{}", SITE.upstream, SITE.ws_path);
                let (ws, _) = tungstenite::client(url.as_str(), tcp).expect("the upgrade");
                let mut tcp = ws.into_inner();
                // A masked binary frame of ANNOUNCED bytes, 90 % of it sent.
                let mut frame = vec![0x82, 0x80 | 127];
                frame.extend_from_slice(&(ANNOUNCED as u64).to_be_bytes());
                frame.extend_from_slice(&[1, 2, 3, 4]);
                tcp.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
                let _ = tcp.write_all(&frame);
                let _ = tcp.write_all(&vec![0x5a; ANNOUNCED * 9 / 10]);
                tcp
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        peers
            .into_iter()
            .filter(|tcp| {
                tcp.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                let mut buf = [0u8; 4096];
                let mut tcp = tcp;
                loop {
                    match tcp.read(&mut buf) {
                        Ok(0) => return true,
                        Ok(_) => continue,
                        Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
                    }
                }
            })
            .count()
    });
    let after = rss_bytes(pid);
    eprintln!("{closed} of {PEERS} closed; gateway RSS {before} -> {after} bytes");
    assert_eq!(
        closed, PEERS,
        "every peer announcing {ANNOUNCED} bytes is closed"
    );
    assert!(
        after <= before + (8 << 20),
        "the gateway grew from {before} to {after} bytes"
    );
    assert!(world.gateway().is_running());
}

/// A WebSocket upgrade straight to `--ws-listen` as the proxy relays it
/// for `client` (its `X-Forwarded-For`), then silence where the tunnel's
/// TLS would start: `None` if the gateway refused it, else whether it is
/// still held open a second later, and the WebSocket (its place stays
/// taken while it is kept).
fn parked_upgrade(client: &str) -> Option<(bool, tungstenite::WebSocket<TcpStream>)> {
    let tcp = TcpStream::connect(SITE.upstream).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut request = format!("ws://{}{}", SITE.upstream, SITE.ws_path)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("x-forwarded-for", client.parse().unwrap());
    let (mut ws, _) = tungstenite::client(request, tcp).ok()?;
    let open = match ws.read() {
        Err(tungstenite::Error::Io(e)) => matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        _ => false,
    };
    Some((open, ws))
}

/// The proxy relays every client from its one address: one client that
/// parks handshakes there holds no more places than a direct client may
/// (`--max-handshakes-per-source`, by the proxy's `X-Forwarded-For`), and
/// takes none from the direct listener's clients.
#[test]
fn one_client_behind_the_proxy_cannot_take_every_handshake_place() {
    let world = World::new(
        1,
        &[
            "--ws-listen",
            SITE.upstream,
            "--max-handshakes",
            "4",
            "--max-handshakes-per-source",
            "2",
        ],
    );
    let parked: Vec<_> = world
        .gw
        .enter(|| (0..6).map(|_| parked_upgrade("203.0.113.7")).collect());
    let open: Vec<Option<bool>> = parked.iter().map(|p| p.as_ref().map(|p| p.0)).collect();
    let held = open.iter().filter(|p| **p == Some(true)).count();
    assert_eq!(held, 2, "one client holds its 2 places: {open:?}");
    let other = world.gw.enter(|| parked_upgrade("198.51.100.9"));
    assert_eq!(
        other.as_ref().map(|o| o.0),
        Some(true),
        "another client behind the proxy gets in"
    );
    let profile = world.add_client("direct", 1);
    let mut direct = world.start_client(1, &profile, false);
    direct.wait_for_log("connected", Duration::from_secs(5));
    assert_eq!(
        world.status()["refused"]["source_busy"].as_u64(),
        Some(4),
        "the refusals are counted"
    );
}

/// Through the website's TLS and a WebSocket upgrade on its path, the
/// tunnel's TLS with no client certificate, then a CONNECT-IP request: what
/// came back (an error's description if the connection failed).
fn without_certificate(website_ca: &str, gateway_ca: &str) -> String {
    let tcp = TcpStream::connect("10.200.1.1:8443").unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let web = tls_without_certificate("proxy.test", website_ca, tcp);
    let (ws, response) = tungstenite::client(URL, web).expect("the upgrade through nginx");
    assert_eq!(response.status(), 101);
    let mut tunnel =
        tls_without_certificate("veil-gateway", gateway_ca, WsIo { ws, rx: Vec::new() });
    let request = "GET /.well-known/masque/ip/*/*/ HTTP/1.1\r\nHost: veil-gateway\r\n\
                   Connection: Upgrade\r\nUpgrade: connect-ip\r\nCapsule-Protocol: ?1\r\n\r\n";
    if let Err(e) = tunnel.write_all(request.as_bytes()) {
        return format!("write failed: {e}");
    }
    let mut answer = String::new();
    match tunnel.read_to_string(&mut answer) {
        Ok(_) => answer,
        Err(e) => format!("{answer}[read failed: {e}]"),
    }
}

/// A blocking WebSocket as a byte stream: one binary message per write.
struct WsIo<S: Read + Write> {
    ws: tungstenite::WebSocket<S>,
    rx: Vec<u8>,
}

impl<S: Read + Write> Read for WsIo<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.rx.is_empty() {
            match self.ws.read() {
                Ok(tungstenite::Message::Binary(b)) => self.rx = b.to_vec(),
                Ok(tungstenite::Message::Close(_)) => return Ok(0),
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed) => return Ok(0),
                Err(e) => return Err(std::io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.rx.len());
        buf[..n].copy_from_slice(&self.rx[..n]);
        self.rx.drain(..n);
        Ok(n)
    }
}

impl<S: Read + Write> Write for WsIo<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.ws
            .send(tungstenite::Message::binary(buf.to_vec()))
            .map_err(std::io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.ws.flush().map_err(std::io::Error::other)
    }
}
