//! The tunnels users would pick instead of veil, set up on the same
//! namespaces (`World::bare`: client 10.200.1.2 — gateway — remote
//! 198.18.0.2), each reaching the remote through the gateway's address:
//!
//! - direct routing (no tunnel, no NAT: the practical limit), with the veth
//!   offloads on and off;
//! - routing + MASQUERADE;
//! - OpenVPN (TLS, AES-256-GCM) over UDP and over TCP, with MASQUERADE;
//! - boringtun (userspace WireGuard) with MASQUERADE, at its default and
//!   with `--threads 1`;
//! - veil, and veil-ws: the same gateway behind a real nginx (TLS on
//!   its own port, `/veil` proxied to `--ws-listen`), the client on a
//!   `wss://` profile.
//!
//! Every path is brought up by [`up`] and torn down when its [`Path`] and
//! the world drop.

use std::{fs, path::Path as FsPath, process::Command, time::Duration};

use crate::{
    netns::NetNs,
    proc::Proc,
    web::{Server, Site, Website},
    world::World,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Direct,
    DirectNoOffload,
    Masquerade,
    OpenVpnUdp,
    OpenVpnTcp,
    Boringtun,
    BoringtunThreads1,
    Veil,
    VeilWs,
    /// veil over HTTP/3 (`--transport h3`); `Veil` is TLS over TCP.
    VeilH3,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Direct,
        Kind::DirectNoOffload,
        Kind::Masquerade,
        Kind::OpenVpnUdp,
        Kind::OpenVpnTcp,
        Kind::Boringtun,
        Kind::BoringtunThreads1,
        Kind::Veil,
        Kind::VeilWs,
        Kind::VeilH3,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::DirectNoOffload => "direct-no-offload",
            Kind::Masquerade => "masquerade",
            Kind::OpenVpnUdp => "openvpn-udp",
            Kind::OpenVpnTcp => "openvpn-tcp",
            Kind::Boringtun => "boringtun",
            Kind::BoringtunThreads1 => "boringtun-threads1",
            Kind::Veil => "veil",
            Kind::VeilWs => "veil-ws",
            Kind::VeilH3 => "veil-h3",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// A path that is up: its processes, stopped on drop.
pub struct Path {
    pub kind: Kind,
    pub procs: Vec<Proc>,
    /// The web server in front of the gateway (veil-ws).
    pub web: Option<Website>,
}

/// veil-ws's website, in the gateway's namespace.
const WEB: Site = Site {
    name: "proxy.test",
    listen: "10.200.1.1:8443",
    ws_path: "/veil",
    upstream: "127.0.0.1:8080",
};

/// Brings `kind` up on `world` (fresh, without a gateway).
pub fn up(world: &mut World, kind: Kind) -> Path {
    let mut procs = Vec::new();
    let mut web = None;
    match kind {
        Kind::Direct | Kind::DirectNoOffload => {
            forward(world);
            world
                .remote
                .ip(&["route", "add", "10.200.0.0/16", "via", "198.18.0.1"]);
            if kind == Kind::DirectNoOffload {
                offloads_off(world);
            }
        }
        Kind::Masquerade => {
            forward(world);
            masquerade(world, "10.200.0.0/16");
        }
        Kind::OpenVpnUdp | Kind::OpenVpnTcp => {
            forward(world);
            masquerade(world, "10.8.0.0/24");
            procs = openvpn(world, kind == Kind::OpenVpnTcp);
        }
        Kind::Boringtun | Kind::BoringtunThreads1 => {
            forward(world);
            masquerade(world, "10.9.0.0/24");
            procs = boringtun(world, kind == Kind::BoringtunThreads1);
        }
        Kind::Veil | Kind::VeilH3 => {
            veil_gateway(world, &[]);
            let profile = world.add_client("bench", 1);
            let transport = if kind == Kind::VeilH3 { "h3" } else { "tcp" };
            procs.push(world.start_client_with(1, &profile, true, &["--transport", transport]));
        }
        Kind::VeilWs => {
            veil_gateway(world, &["--ws-listen", WEB.upstream]);
            let nginx = Website::start(Server::Nginx, &world.gw, &world.dir.join("nginx"), &WEB);
            // By the website's address (its certificate has it): the
            // client's namespace has no name for it.
            let url = format!("wss://{}{}", WEB.listen, WEB.ws_path);
            let profile = nginx.profile(world, "bench", &url);
            procs.push(world.start_client(1, &profile, true));
            web = Some(nginx);
        }
    }
    assert!(
        world.ping(1, "198.18.0.2"),
        "{}: the remote is unreachable",
        kind.name()
    );
    Path { kind, procs, web }
}

/// veil's gateway as one for many short connections would be set up: the
/// NAT range widened (with the kernel's own ports moved out of its way)
/// and no per-client flow or per-endpoint port cap (the benchmark's one
/// client opens every connection to one remote port), so the connection
/// and flow figures measure the gateway, not its defaults.
pub fn veil_gateway(world: &mut World, extra: &[&str]) {
    world.gw.exec(
        "sysctl",
        &["-qw", "net.ipv4.ip_local_port_range=10000 19999"],
    );
    let mut args = vec![
        "--nat-ports",
        "20000-65535",
        "--max-flows-per-client",
        "262144",
        "--max-ports-per-endpoint",
        "65535",
    ];
    args.extend_from_slice(extra);
    world.start_gateway(&args);
}

fn forward(world: &World) {
    world.gw.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
}

fn masquerade(world: &World, source: &str) {
    world.gw.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            source,
            "-o",
            "wan0",
            "-j",
            "MASQUERADE",
        ],
    );
}

/// Segmentation and receive offloads off on every veth of the path.
fn offloads_off(world: &World) {
    let set = |ns: &NetNs, dev: &str| {
        ns.exec(
            "ethtool",
            &[
                "-K", dev, "tso", "off", "gso", "off", "gro", "off", "tx", "off",
            ],
        );
    };
    set(world.client(1), "eth0");
    set(&world.gw, "c1");
    set(&world.gw, "wan0");
    set(&world.remote, "eth0");
}

fn nsenter(ns: &NetNs, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{}", ns.name()))
        .arg(program);
    cmd
}

/// OpenVPN 2.6, TLS with certificates from veil's own CA code, AES-256-GCM.
fn openvpn(world: &World, tcp: bool) -> Vec<Proc> {
    let dir = world.dir.join("openvpn");
    fs::create_dir_all(&dir).unwrap();
    let state = veil_user::state::StateDir::open(dir.join("pki")).unwrap();
    let ca = state.ca().unwrap();
    let (cert, key) = state.server_identity(&ca).unwrap();
    state.record_endpoint("10.200.1.1:1194").unwrap();
    let client = state.add_client("client", &[]).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (ca_path, cert_path, key_path) = (
        write("ca.crt", &ca.cert_pem),
        write("server.crt", &cert),
        write("server.key", &key),
    );
    let (ccert, ckey) = (
        write("client.crt", &client.cert),
        write("client.key", &client.key),
    );
    let proto = if tcp {
        ("tcp-server", "tcp-client")
    } else {
        ("udp", "udp")
    };
    let common =
        "dev tun\nport 1194\ndh none\ndata-ciphers AES-256-GCM\ncipher AES-256-GCM\nverb 3\n";
    let server = write(
        "server.conf",
        &format!(
            "{common}proto {}\nca {ca_path}\ncert {cert_path}\nkey {key_path}\ndh none\nserver 10.8.0.0 255.255.255.0\ntopology subnet\n",
            proto.0
        ),
    );
    let client_conf = write(
        "client.conf",
        &format!(
            "{common}client\nproto {}\nremote 10.200.1.1 1194\nca {ca_path}\ncert {ccert}\nkey {ckey}\nremote-cert-eku \"TLS Web Server Authentication\"\nroute-nopull\nroute 198.18.0.0 255.255.255.0\nnobind\n",
            proto.1
        ),
    );
    let mut s = nsenter(&world.gw, "openvpn");
    s.args(["--config", &server]);
    let mut server = Proc::start("openvpn server", s, dir.join("server.log"));
    server.wait_for_log("Initialization Sequence Completed", Duration::from_secs(15));
    let mut c = nsenter(world.client(1), "openvpn");
    c.args(["--config", &client_conf]);
    let mut client = Proc::start("openvpn client", c, dir.join("client.log"));
    client.wait_for_log("Initialization Sequence Completed", Duration::from_secs(20));
    vec![client, server]
}

/// boringtun (userspace WireGuard) on both ends, configured with `wg`.
fn boringtun(world: &World, one_thread: bool) -> Vec<Proc> {
    let dir = world.dir.join("wireguard");
    fs::create_dir_all(&dir).unwrap();
    let key = |name: &str| -> (String, String) {
        let private =
            String::from_utf8(Command::new("wg").arg("genkey").output().unwrap().stdout).unwrap();
        let public = {
            use std::io::Write;
            let mut child = Command::new("wg")
                .arg("pubkey")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(private.as_bytes())
                .unwrap();
            String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
        };
        let path = dir.join(format!("{name}.key"));
        fs::write(&path, private.trim()).unwrap();
        (path.display().to_string(), public.trim().to_owned())
    };
    let (gw_key, gw_pub) = key("gw");
    let (cl_key, cl_pub) = key("client");
    // Interface names are also the names of the UAPI sockets in the host's
    // /var/run/wireguard: unique per run.
    let suffix = std::process::id() % 10000;
    let (gw_if, cl_if) = (format!("wgg{suffix}"), format!("wgc{suffix}"));
    let start = |ns: &NetNs, ifname: &str, log: &str| {
        let mut cmd = nsenter(ns, "boringtun-cli");
        cmd.args([ifname, "--foreground", "--disable-drop-privileges"]);
        if one_thread {
            cmd.args(["--threads", "1"]);
        }
        Proc::start("boringtun", cmd, dir.join(log))
    };
    let gw = start(&world.gw, &gw_if, "gw.log");
    let cl = start(world.client(1), &cl_if, "client.log");
    wait_for(&FsPath::new("/var/run/wireguard").join(format!("{gw_if}.sock")));
    wait_for(&FsPath::new("/var/run/wireguard").join(format!("{cl_if}.sock")));
    let wg = |args: &[&str]| crate::netns::run("wg", args);
    wg(&[
        "set",
        &gw_if,
        "listen-port",
        "51820",
        "private-key",
        &gw_key,
        "peer",
        &cl_pub,
        "allowed-ips",
        "10.9.0.2/32",
    ]);
    wg(&[
        "set",
        &cl_if,
        "private-key",
        &cl_key,
        "peer",
        &gw_pub,
        "endpoint",
        "10.200.1.1:51820",
        "allowed-ips",
        "10.9.0.0/24,198.18.0.0/24",
    ]);
    world.gw.ip(&["addr", "add", "10.9.0.1/24", "dev", &gw_if]);
    world.gw.ip(&["link", "set", &gw_if, "up"]);
    world
        .client(1)
        .ip(&["addr", "add", "10.9.0.2/24", "dev", &cl_if]);
    world.client(1).ip(&["link", "set", &cl_if, "up"]);
    world
        .client(1)
        .ip(&["route", "add", "198.18.0.0/24", "dev", &cl_if]);
    vec![cl, gw]
}

fn wait_for(path: &FsPath) {
    for _ in 0..100 {
        if path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} never appeared", path.display());
}
