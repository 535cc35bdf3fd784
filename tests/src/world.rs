//! A whole veil deployment in network namespaces, running the real
//! binaries:
//!
//! ```text
//!  client1 (10.200.1.2) ──┐                      ┌── remote (198.18.0.2): servers
//!  client2 (10.200.2.2) ──┤ gw (veil-user)       │
//!                         └─ c1/c2 ─ gw ─ wan0 ──┘   198.18.0.1 = the gateway's public address
//!                                     └─ lan0 ── lan (10.200.9.2): a private network behind it
//! ```
//!
//! The gateway namespace does not forward (ip_forward stays 0): whatever
//! reaches the remote went through veil's datapath. Everything is torn
//! down on drop: processes by PID, then namespaces, pins and files.
//!
//! [`World::add_ipv6`] numbers the same links with IPv6 from 2001:2::/48
//! (reserved for benchmarking, RFC 5180): the gateway's public address
//! 2001:2::1, the remote 2001:2::2 with the same servers, client `i`'s
//! uplink 2001:2:0:i::2 (the gateway's end 2001:2:0:i::1);
//! [`World::ipv6_only_uplink`] then takes client `i`'s IPv4 away.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use crate::{
    bpffs::BpfFs,
    netns::{gateway_and_remote, run, veth, NetNs},
    proc::{workspace_bin, Proc},
};

pub const PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const LAN_HOST: Ipv4Addr = Ipv4Addr::new(10, 200, 9, 2);
/// The gateway's public IPv6 address and the remote's ([`World::add_ipv6`]).
pub const PUBLIC6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
pub const REMOTE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);

/// The gateway's IPv6 address on client `i`'s link.
pub fn gateway6_for(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, i as u16, 0, 0, 0, 1)
}

/// Client `i`'s IPv6 address on its uplink.
pub fn client6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, i as u16, 0, 0, 0, 2)
}

/// Bytes the download server sends, and their SHA-256.
pub const DOWNLOAD_LEN: usize = 8 << 20;

pub struct World {
    pub dir: PathBuf,
    pub state: PathBuf,
    pub gateway: Option<Proc>,
    pub servers: Servers,
    /// The same servers on the remote's IPv6 address, once
    /// [`World::add_ipv6`] gave it one.
    pub servers6: Option<Servers>,
    pub clients: Vec<NetNs>,
    pub lan: NetNs,
    pub remote: NetNs,
    pub gw: NetNs,
    pub bpffs: BpfFs,
}

impl World {
    /// `clients` client namespaces, the gateway started with `extra` flags.
    pub fn new(clients: usize, extra: &[&str]) -> Self {
        let mut world = Self::bare(clients);
        world.start_gateway(extra);
        world
    }

    /// The namespaces and servers, no gateway yet.
    pub fn bare(clients: usize) -> Self {
        let (gw, remote) = gateway_and_remote("gw", "rem");
        let lan = NetNs::new("lan");
        veth(&gw, "lan0", "10.200.9.1/24", &lan, "eth0", "10.200.9.2/24");
        let clients: Vec<NetNs> = (1..=clients)
            .map(|i| {
                let c = NetNs::new(&format!("c{i}"));
                veth(
                    &gw,
                    &format!("c{i}"),
                    &format!("10.200.{i}.1/24"),
                    &c,
                    "eth0",
                    &format!("10.200.{i}.2/24"),
                );
                c.ip(&["route", "add", "default", "via", &format!("10.200.{i}.1")]);
                c
            })
            .collect();
        let dir = std::env::temp_dir().join(format!("veil-world-{}", gw.name()));
        let state = dir.join("state");
        std::fs::create_dir_all(&dir).unwrap();
        let servers = Servers::start(&remote, REMOTE.into());
        World {
            dir,
            state,
            gateway: None,
            servers,
            servers6: None,
            clients,
            lan,
            remote,
            gw,
            bpffs: BpfFs::new(),
        }
    }

    /// Runs the gateway with `args` expecting it to refuse to start: its
    /// exit status and what it printed.
    pub fn failed_start(&self, args: &[&str]) -> (std::process::ExitStatus, String) {
        let mut cmd = self.nsenter(&self.gw, "veil-user");
        cmd.args(args)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--pin-dir")
            .arg(self.pins())
            .env_remove("RUST_BACKTRACE");
        let out = cmd.output().expect("running veil-user");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, text)
    }

    pub fn pins(&self) -> PathBuf {
        self.bpffs.path().join("veil")
    }

    pub fn start_gateway(&mut self, extra: &[&str]) {
        self.start_gateway_logging(extra, "info,veil_user=debug");
    }

    /// [`Self::start_gateway`] with `RUST_LOG=log` (`"info"`: the
    /// default level, as operators run it).
    pub fn start_gateway_logging(&mut self, extra: &[&str], log: &str) {
        let mut cmd = self.nsenter(&self.gw, "veil-user");
        cmd.env("RUST_LOG", log);
        cmd.args(["--iface", "wan0"]);
        cmd.arg("--state-dir")
            .arg(&self.state)
            .arg("--pin-dir")
            .arg(self.pins())
            .args(extra);
        let mut gateway = Proc::start("veil-user", cmd, self.dir.join("gateway.log"));
        gateway.wait_for_log("gateway up", Duration::from_secs(20));
        self.gateway = Some(gateway);
    }

    pub fn gateway(&mut self) -> &mut Proc {
        self.gateway.as_mut().expect("gateway running")
    }

    fn nsenter(&self, ns: &NetNs, bin: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", ns.name()))
            .arg(workspace_bin(bin));
        cmd
    }

    /// `veil-user ARGS --state-dir STATE`, its stdout.
    pub fn veil_user(&self, args: &[&str]) -> String {
        let out = Command::new(workspace_bin("veil-user"))
            .args(args)
            .arg("--state-dir")
            .arg(&self.state)
            .output()
            .expect("running veil-user");
        assert!(
            out.status.success(),
            "veil-user {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Issues a profile for client `i` (1-based), pointing at the gateway's
    /// address on that client's link.
    pub fn add_client(&self, name: &str, i: usize) -> PathBuf {
        self.add_client_at(name, &format!("10.200.{i}.1:443"), &[])
    }

    /// Issues a profile for `endpoint`, with more `client add` arguments.
    pub fn add_client_at(&self, name: &str, endpoint: &str, extra: &[&str]) -> PathBuf {
        let out = self.dir.join(format!("{name}.veil"));
        let mut args = vec![
            "client",
            "add",
            name,
            "--out",
            out.to_str().unwrap(),
            "--endpoint",
            endpoint,
        ];
        args.extend_from_slice(extra);
        self.veil_user(&args);
        out
    }

    /// Starts `veil-client` in client namespace `i`; waits until connected
    /// when `wait` is set.
    pub fn start_client(&self, i: usize, profile: &PathBuf, wait: bool) -> Proc {
        self.start_client_with(i, profile, wait, &[])
    }

    /// [`Self::start_client`] with more command-line arguments.
    ///
    /// Started with `nsenter`, which keeps the host's mounts: the client's
    /// `/etc/resolv.conf` would be the host's own, so these clients run
    /// with `--no-dns` (see [`Self::start_client_dns`]).
    pub fn start_client_with(
        &self,
        i: usize,
        profile: &PathBuf,
        wait: bool,
        extra: &[&str],
    ) -> Proc {
        let mut cmd = self.nsenter(&self.clients[i - 1], "veil-client");
        cmd.arg("--profile")
            .arg(profile)
            .args(["--keepalive", "1", "--no-dns"])
            .args(extra)
            .args(transport_override(extra));
        self.spawn_client(i, cmd, wait)
    }

    /// Starts `veil-client` in client namespace `i` as `ip netns exec`
    /// does, so that it manages DNS: `ip netns exec` runs it in a mount
    /// namespace of its own where `/etc/netns/NS/resolv.conf` is bind-mounted
    /// on `/etc/resolv.conf` (`nsenter --net` does not: there the client
    /// would see, and change, the host's). Give the namespace its file
    /// first ([`crate::netns::NetNs::set_resolv_conf`]).
    pub fn start_client_dns(&self, i: usize, profile: &PathBuf, extra: &[&str]) -> Proc {
        let ns = self.clients[i - 1].name();
        assert!(
            std::path::Path::new(&format!("/etc/netns/{ns}/resolv.conf")).exists(),
            "without its own resolv.conf the client would manage the host's"
        );
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.clients[i - 1].name()])
            .arg(workspace_bin("veil-client"))
            .arg("--profile")
            .arg(profile)
            .args(["--keepalive", "1"])
            .args(extra)
            .args(transport_override(extra));
        self.spawn_client(i, cmd, true)
    }

    /// [`Self::start_client_with`] with environment variables set (say,
    /// `SSL_CERT_FILE` for the system's roots).
    pub fn start_client_env(&self, i: usize, profile: &PathBuf, env: &[(&str, &str)]) -> Proc {
        let mut cmd = self.nsenter(&self.clients[i - 1], "veil-client");
        cmd.arg("--profile")
            .arg(profile)
            .args(["--keepalive", "1", "--no-dns"])
            .envs(env.iter().copied());
        self.spawn_client(i, cmd, true)
    }

    fn spawn_client(&self, i: usize, cmd: Command, wait: bool) -> Proc {
        let log = self
            .dir
            .join(format!("client{i}-{}.log", std::process::id()));
        let mut p = Proc::start(&format!("veil-client {i}"), cmd, log);
        if wait {
            p.wait_for_log("connected", Duration::from_secs(15));
        }
        p
    }

    pub fn client(&self, i: usize) -> &NetNs {
        &self.clients[i - 1]
    }

    /// `veil-user status --json`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.veil_user(&["status", "--json"])).expect("status JSON")
    }

    /// The gateway's Prometheus metrics (started with `--metrics 9477`):
    /// the whole HTTP response.
    pub fn metrics(&self) -> String {
        self.gw.enter(|| {
            let mut s = TcpStream::connect("127.0.0.1:9477").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            text
        })
    }

    /// The virtual address of the connected client `name`, from `status`.
    pub fn vip_of(&self, name: &str) -> Ipv4Addr {
        let status = self.status();
        let clients = status["clients"].as_array().unwrap();
        let c = clients
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in status: {status}"));
        c["vip"].as_str().unwrap().parse().unwrap()
    }

    /// Downloads the remote's test file from client `i`; its SHA-256.
    pub fn download(&self, i: usize) -> std::io::Result<Vec<u8>> {
        self.client(i).enter(|| {
            let mut s = TcpStream::connect_timeout(&(REMOTE, 8080).into(), Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut data = Vec::with_capacity(DOWNLOAD_LEN);
            s.read_to_end(&mut data)?;
            Ok(sha256(&data))
        })
    }

    /// `GET /` on the remote's web server from client `i`: the body.
    pub fn fetch(&self, i: usize) -> std::io::Result<String> {
        self.client(i).enter(|| {
            let mut s = TcpStream::connect_timeout(&(REMOTE, 80).into(), Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: 198.18.0.2\r\nConnection: close\r\n\r\n")?;
            let mut response = String::new();
            s.read_to_string(&mut response)?;
            Ok(response
                .split_once("\r\n\r\n")
                .map_or(response.clone(), |(_, body)| body.to_owned()))
        })
    }

    /// A profile issued by another gateway's CA (its own state directory
    /// under this world's), pointing at this gateway: a stranger.
    pub fn foreign_profile(&self) -> PathBuf {
        let other = self.dir.join("other-state");
        std::fs::create_dir_all(&other).unwrap();
        let stranger = self.dir.join("stranger.veil");
        let out = Command::new(workspace_bin("veil-user"))
            .args([
                "client",
                "add",
                "stranger",
                "--endpoint",
                "10.200.1.1:443",
                "--out",
            ])
            .arg(&stranger)
            .arg("--state-dir")
            .arg(&other)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stranger
    }

    /// A TCP connection from client `i` to the remote's echo server, and a
    /// function that sends a message on it and returns the echo.
    pub fn echo_connection(&self, i: usize) -> impl FnMut(&[u8]) -> Vec<u8> {
        let mut conn = self
            .client(i)
            .enter(|| TcpStream::connect_timeout(&(REMOTE, 7).into(), Duration::from_secs(5)))
            .expect("echo connection");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        move |msg: &[u8]| {
            conn.write_all(msg).unwrap();
            let mut buf = vec![0u8; msg.len()];
            conn.read_exact(&mut buf).unwrap();
            buf
        }
    }

    /// Sends `data` to the TCP echo server at `to` from client `i`, then
    /// closes its side; what came back.
    pub fn echo_bulk(&self, i: usize, to: SocketAddr, data: &[u8]) -> Vec<u8> {
        self.client(i).enter(|| {
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut reader = s.try_clone().unwrap();
            let back = thread::spawn(move || {
                let mut back = Vec::new();
                let _ = reader.read_to_end(&mut back);
                back
            });
            let mut s = s;
            s.write_all(data).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            back.join().unwrap()
        })
    }

    /// Packets and bytes the gateway's datapath has forwarded from clients
    /// (IPv4 and IPv6 alike), from `status`.
    pub fn egress_forwarded(&self) -> (u64, u64) {
        let dp = &self.status()["datapath"]["egress_forwarded"];
        (
            dp["packets"].as_u64().unwrap(),
            dp["bytes"].as_u64().unwrap(),
        )
    }

    /// Asserts what crossed the datapath from clients since `before` (an
    /// [`World::egress_forwarded`]): whole TCP super-packets if `merged`
    /// (the client's own with offload, else the gateway's merge of its
    /// segments), nothing larger than the client's MTU (1400) if not (a
    /// client with a rate limit). The datapath counts the packets it sends
    /// on, Ethernet header included.
    #[track_caller]
    pub fn assert_super_packets_since(&self, before: (u64, u64), merged: bool) {
        let (p, b) = self.egress_forwarded();
        assert!(
            p > before.0,
            "nothing crossed the datapath since {before:?}"
        );
        let per_packet = (b - before.1) / (p - before.0);
        if merged {
            assert!(per_packet > 1500, "{per_packet} B per packet, merged");
        } else {
            assert!(
                per_packet <= 1400 + 14,
                "{per_packet} B per packet, unmerged"
            );
        }
    }

    /// `msg` to the remote's UDP echo server from client `i`: what came
    /// back (within 3 s).
    pub fn udp_echo(&self, i: usize, msg: &[u8]) -> Vec<u8> {
        self.client(i).enter(|| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.send_to(msg, (REMOTE, 7)).unwrap();
            let mut buf = [0u8; 1500];
            let (n, _) = s.recv_from(&mut buf).expect("UDP echo reply");
            buf[..n].to_vec()
        })
    }

    /// Client `i`'s uplink gets a new address (`10.200.i.3`) and loses its
    /// first one, as with a new DHCP lease.
    pub fn renumber_uplink(&self, i: usize) {
        let c = self.client(i);
        c.exec(
            "sysctl",
            &["-qw", "net.ipv4.conf.eth0.promote_secondaries=1"],
        );
        c.ip(&["addr", "add", &format!("10.200.{i}.3/24"), "dev", "eth0"]);
        c.ip(&["addr", "del", &format!("10.200.{i}.2/24"), "dev", "eth0"]);
    }

    /// Pings `dst` from client `i`: did an answer come back?
    pub fn ping(&self, i: usize, dst: &str) -> bool {
        Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.client(i).name()))
            .args(["ping", "-c", "1", "-W", "2", dst])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

/// IPv6 in the world ([`World::add_ipv6`]).
impl World {
    /// Numbers every link with IPv6 too (see the module's docs) and starts
    /// the remote's servers on 2001:2::2. The gateway's namespace still
    /// forwards nothing: IPv6 reaches the remote through veil or not at
    /// all.
    pub fn add_ipv6(&mut self) {
        let add = |ns: &NetNs, addr: String, dev: &str| {
            ns.ip(&["-6", "addr", "add", &addr, "dev", dev, "nodad"]);
        };
        add(&self.gw, format!("{PUBLIC6}/64"), "wan0");
        add(&self.remote, format!("{REMOTE6}/64"), "eth0");
        for i in 1..=self.clients.len() {
            add(
                &self.gw,
                format!("{}/64", gateway6_for(i)),
                &format!("c{i}"),
            );
            let c = self.client(i);
            add(c, format!("{}/64", client6(i)), "eth0");
            c.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &gateway6_for(i).to_string(),
            ]);
        }
        self.servers6 = Some(Servers::start(&self.remote, REMOTE6.into()));
    }

    /// Client `i`'s uplink loses IPv4 (its address and default route): it
    /// reaches the gateway over IPv6 alone.
    pub fn ipv6_only_uplink(&self, i: usize) {
        let c = self.client(i);
        c.ip(&["-4", "route", "flush", "table", "main"]);
        c.ip(&["-4", "addr", "flush", "dev", "eth0"]);
    }

    /// Downloads the remote's test file over IPv6 from client `i`; its
    /// SHA-256.
    pub fn download6(&self, i: usize) -> std::io::Result<Vec<u8>> {
        self.client(i).enter(|| {
            let to = SocketAddr::from((REMOTE6, 8080));
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut data = Vec::with_capacity(DOWNLOAD_LEN);
            s.read_to_end(&mut data)?;
            Ok(sha256(&data))
        })
    }

    /// `msg` to the remote's UDP echo server on its IPv6 address from
    /// client `i`: what came back (within 3 s), if anything.
    pub fn udp_echo6(&self, i: usize, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        self.client(i).enter(|| {
            let s = UdpSocket::bind("[::]:0")?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.send_to(msg, (REMOTE6, 7))?;
            let mut buf = [0u8; 1500];
            let (n, _) = s.recv_from(&mut buf)?;
            Ok(buf[..n].to_vec())
        })
    }

    /// Pings `dst` (IPv6) from client `i`: did an answer come back?
    pub fn ping6(&self, i: usize, dst: &str) -> bool {
        Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.client(i).name()))
            .args(["ping", "-6", "-c", "1", "-W", "2", dst])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut g) = self.gateway.take() {
            g.stop();
            if thread::panicking() {
                eprintln!("---- gateway log ----\n{}", g.log());
            }
        }
        self.servers.stop.store(true, Ordering::Relaxed);
        if let Some(s) = &self.servers6 {
            s.stop.store(true, Ordering::Relaxed);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `--transport X` when `VEIL_TEST_TRANSPORT=X` is set and the test did
/// not choose one: the same suite over another transport (`cargo xtask
/// test` runs the tunnel suite again with `tcp`; by default clients take
/// HTTP/3).
fn transport_override(extra: &[&str]) -> Vec<String> {
    match std::env::var("VEIL_TEST_TRANSPORT") {
        Ok(t) if !extra.contains(&"--transport") => vec!["--transport".into(), t],
        _ => Vec::new(),
    }
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// The download's content: deterministic, incompressible enough.
pub fn download_data() -> Vec<u8> {
    pseudo_random(DOWNLOAD_LEN, 0x9e37_79b9_7f4a_7c15)
}

/// `len` deterministic bytes that do not compress (xorshift from `seed`,
/// which must not be 0).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The remote's servers: a web server that tells visitors their address
/// (:80), a TCP download (:8080), a TCP echo (:7), a TCP discard that
/// closes every connection at once (:9) and a UDP echo (:7).
/// Each notes who connected.
pub struct Servers {
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
}

impl Servers {
    fn start(remote: &NetNs, at: IpAddr) -> Self {
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (discard, web, download, echo, udp) = remote.enter(|| {
            (
                TcpListener::bind((at, 9)).unwrap(),
                TcpListener::bind((at, 80)).unwrap(),
                TcpListener::bind((at, 8080)).unwrap(),
                TcpListener::bind((at, 7)).unwrap(),
                UdpSocket::bind((at, 7)).unwrap(),
            )
        });
        discard_forever(discard, stop.clone());
        serve_tcp(web, peers.clone(), stop.clone(), |mut s| {
            let peer = s
                .peer_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let body = format!("Hello {peer}: that is the address this web server sees.\n");
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        });
        let data = Arc::new(download_data());
        serve_tcp(download, peers.clone(), stop.clone(), move |mut s| {
            let _ = s.write_all(&data);
        });
        serve_tcp(echo, peers.clone(), stop.clone(), |mut s| {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let (p, st) = (peers.clone(), stop.clone());
        udp.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !st.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    p.lock().unwrap().push(from);
                    let _ = udp.send_to(&buf[..n], from);
                }
            }
        });
        Servers { peers, stop }
    }

    /// The addresses the remote saw, without ports.
    pub fn seen(&self) -> Vec<Ipv4Addr> {
        self.peers
            .lock()
            .unwrap()
            .iter()
            .map(|a| match a.ip() {
                std::net::IpAddr::V4(ip) => ip,
                std::net::IpAddr::V6(_) => panic!("IPv6 peer"),
            })
            .collect()
    }

    /// The addresses the remote saw, either family.
    pub fn seen_ips(&self) -> Vec<IpAddr> {
        self.peers.lock().unwrap().iter().map(|a| a.ip()).collect()
    }
}

/// Accepts connections on `listener` and closes each at once, as fast as
/// they come (the new-connections benchmarks), until `stop`: woken by
/// poll, not by a sleep, with a deep accept queue (std listens with 128):
/// a full queue drops SYNs, and each drop costs its client a 1 s
/// retransmission, which made that figure swing with the server rather
/// than the path.
pub fn discard_forever(discard: TcpListener, stop: Arc<AtomicBool>) {
    use std::os::fd::AsRawFd;
    // SAFETY: listen() again on a listening socket only resizes its queue.
    unsafe { libc::listen(discard.as_raw_fd(), 4096) };
    discard.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if crate::netns::readable(discard.as_raw_fd(), Duration::from_millis(100)) {
                while discard.accept().is_ok() {}
            }
        }
    });
}

fn serve_tcp(
    listener: TcpListener,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    handle: impl Fn(TcpStream) + Send + Sync + Clone + 'static,
) {
    listener.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((s, from)) => {
                    peers.lock().unwrap().push(from);
                    s.set_nonblocking(false).unwrap();
                    let h = handle.clone();
                    thread::spawn(move || h(s));
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    });
}

/// Runs `ip` in a namespace and returns its stdout.
pub fn ip_out(ns: &NetNs, args: &[&str]) -> String {
    let mut all = vec!["-n", ns.name()];
    all.extend_from_slice(args);
    String::from_utf8_lossy(&run("ip", &all).stdout).into_owned()
}
