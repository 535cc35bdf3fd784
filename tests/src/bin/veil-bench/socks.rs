//! `socks`: veil's SOCKS5 mode (user-space TCP/IP stack, no TUN) beside
//! veil's TUN mode and shadowsocks (`ss-local` → `ss-server`, Debian's
//! shadowsocks-libev), on one topology, in one run.
//!
//! Client namespace → gateway namespace → remote namespace, as in
//! `veil_tests::world`. shadowsocks' server runs in the gateway namespace
//! and dials the remote itself. One TCP stream each way, the same SOCKS5
//! client code for veil and shadowsocks, the same servers on the remote.
//! veil runs over TLS over TCP, as shadowsocks does;
//! `VEIL_BENCH_TRANSPORT=h3` runs veil's two modes over HTTP/3 instead.

#[allow(unused_imports, reason = "one import list for the benchmark's modules")]
use super::*;

use std::{
    io::Read,
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

const VEIL_SOCKS: &str = "127.0.0.1:1080";
const SS_LOCAL: &str = "127.0.0.1:1081";
const SS_SERVER: (&str, u16) = ("10.200.1.1", 8388);
/// The remote's endless source and bottomless sink.
const SOURCE_PORT: u16 = 5001;
const SINK_PORT: u16 = 5002;
/// Answers one byte with one byte, then closes.
const REPLY_PORT: u16 = 5003;
/// Threads serving [`REPLY_PORT`]: one per connecting thread.
const CONNECTING: usize = 16;
const CHUNK: usize = 256 << 10;

/// How a connection reaches the remote.
#[derive(Clone, Copy)]
enum Via {
    Direct,
    Socks(&'static str),
}

/// One figure, read off a path's [`Figures`].
type Figure = fn(&Figures) -> f64;

struct Figures {
    down: f64,
    up: f64,
    conns: f64,
    /// CPU seconds the client-side process (veil-client, ss-local) used
    /// per GB carried, both directions' streams together.
    cpu_per_gb: f64,
}

pub(crate) fn socks(quick: bool) {
    use veil_tests::{proc::Proc, world::World};

    let (secs, conn_secs) = if quick { (2, 1) } else { (5, 3) };
    let transport = Transport::from_env();
    println!("## SOCKS5: veil beside shadowsocks\n");
    println!(
        "kernel {}, {} CPUs; one TCP stream for {secs} s each way, new connections for {conn_secs} s \
         ({CONNECTING} at a time: each opened (a SOCKS handshake and CONNECT for the proxies), one byte sent \
         and the remote's one-byte answer read, then reset).\n",
        kernel(),
        num_cpus()
    );
    println!(
        "veil SOCKS5: `veil-client --socks` (smoltcp on the tunnel's address, no TUN). \
         veil TUN: the same client with its TUN device. Both over {}. shadowsocks: ss-local → ss-server \
         (aes-256-gcm: its fastest here, AES-NI through libsodium), ss-server in the gateway namespace.\n",
        transport.name()
    );
    // The gateway as the peers benchmark sets it up: its default caps on
    // flows per client and ports per remote endpoint would measure
    // themselves.
    let mut world = World::bare(1);
    veil_tests::peers::veil_gateway(&mut world, &[]);
    let _servers = start_servers(&world.remote);
    let profile = world.add_client("bench", 1);

    // By default both over TLS over TCP, as shadowsocks runs over TCP:
    // the transport is not what this compares (`bench peers` has veil-h3
    // beside veil).
    let over = ["--transport", transport.flag()];
    eprintln!("measuring veil SOCKS5 ...");
    let client = world.start_client_with(
        1,
        &profile,
        true,
        &["--socks", VEIL_SOCKS, over[0], over[1]],
    );
    let veil_socks = figures(
        &world,
        Via::Socks(VEIL_SOCKS),
        client.pid(),
        secs,
        conn_secs,
    );
    drop(client);

    eprintln!("measuring veil TUN ...");
    let client = world.start_client_with(1, &profile, true, &over);
    let veil_tun = figures(&world, Via::Direct, client.pid(), secs, conn_secs);
    drop(client);

    eprintln!("measuring shadowsocks ...");
    let ns_exec = |ns: &str, args: &[&str]| {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{ns}")).args(args);
        cmd
    };
    let port = SS_SERVER.1.to_string();
    let server = Proc::start(
        "ss-server",
        ns_exec(
            world.gw.name(),
            &[
                "ss-server",
                "-s",
                SS_SERVER.0,
                "-p",
                &port,
                "-k",
                "bench",
                "-m",
                "aes-256-gcm",
            ],
        ),
        world.dir.join("ss-server.log"),
    );
    let (host, local_port) = SS_LOCAL.split_once(':').unwrap();
    let local = Proc::start(
        "ss-local",
        ns_exec(
            world.client(1).name(),
            &[
                "ss-local",
                "-s",
                SS_SERVER.0,
                "-p",
                &port,
                "-b",
                host,
                "-l",
                local_port,
                "-k",
                "bench",
                "-m",
                "aes-256-gcm",
            ],
        ),
        world.dir.join("ss-local.log"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let shadowsocks = figures(&world, Via::Socks(SS_LOCAL), local.pid(), secs, conn_secs);
    drop(local);
    drop(server);
    let _ = world.gateway();

    println!("| figure | veil SOCKS5 | veil TUN | shadowsocks | veil SOCKS5 ÷ shadowsocks |");
    println!("|---|---:|---:|---:|---:|");
    let rows: [(&str, Figure); 4] = [
        ("TCP remote → client (Gbit/s)", |f| f.down / 1e9),
        ("TCP client → remote (Gbit/s)", |f| f.up / 1e9),
        (
            "new TCP connections/s, each with a one-byte request and answer (thousands)",
            |f| f.conns / 1e3,
        ),
        (
            "client process CPU seconds per GB (streams; TUN: without the kernel's TCP)",
            |f| f.cpu_per_gb,
        ),
    ];
    for (label, get) in rows {
        let (s, t, ss) = (get(&veil_socks), get(&veil_tun), get(&shadowsocks));
        let ratio = if ss > 0.0 {
            format!("{:.2}", s / ss)
        } else {
            "–".into()
        };
        println!("| {label} | {s:.2} | {t:.2} | {ss:.2} | {ratio} |");
    }
}

fn figures(
    world: &veil_tests::world::World,
    via: Via,
    pid: u32,
    secs: u32,
    conn_secs: u32,
) -> Figures {
    let run = Duration::from_secs(secs.into());
    world.client(1).enter(|| {
        let down = throughput(via, run, false, pid);
        let up = throughput(via, run, true, pid);
        let bytes = down.bytes + up.bytes;
        Figures {
            down: down.bits_per_sec,
            up: up.bits_per_sec,
            conns: connections(via, Duration::from_secs(conn_secs.into())),
            cpu_per_gb: if bytes > 0 {
                (down.cpu_secs + up.cpu_secs) / (bytes as f64 / 1e9)
            } else {
                0.0
            },
        }
    })
}

/// One stream's measurement.
struct Stream {
    bits_per_sec: f64,
    /// Counted after the warm-up, and the CPU seconds `pid` used meanwhile.
    bytes: u64,
    cpu_secs: f64,
}

/// Opens a connection to the remote's `port`, through the SOCKS server
/// or directly.
fn open(via: Via, port: u16) -> std::io::Result<TcpStream> {
    use std::io::Write;
    let dst = SocketAddr::from((veil_tests::world::REMOTE, port));
    let Via::Socks(proxy) = via else {
        return TcpStream::connect_timeout(&dst, Duration::from_secs(1));
    };
    let mut s = TcpStream::connect(proxy)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    s.write_all(&[5, 1, 0])?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice)?;
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&veil_tests::world::REMOTE.octets());
    request.extend_from_slice(&port.to_be_bytes());
    s.write_all(&request)?;
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply)?;
    if reply[1] != 0 {
        return Err(std::io::Error::other(format!("SOCKS reply {}", reply[1])));
    }
    Ok(s)
}

/// Bits per second over one connection, after a quarter second of
/// warm-up: from the remote, or to it; and the CPU `pid` used meanwhile.
fn throughput(via: Via, run: Duration, up: bool, pid: u32) -> Stream {
    use std::io::Write;
    let mut s = open(via, if up { SINK_PORT } else { SOURCE_PORT }).expect("opening the stream");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; CHUNK];
    let warmup = Instant::now() + Duration::from_millis(250);
    let mut counted = 0u64;
    // Counting starts once the warm-up is over.
    let mut from: Option<Instant> = None;
    let mut cpu_from = 0.0;
    loop {
        let now = Instant::now();
        match from {
            Some(f) if now - f >= run => break,
            None if now >= warmup => {
                from = Some(now);
                cpu_from = measure::process_cpu_secs(pid);
                counted = 0;
            }
            _ => {}
        }
        let n = if up {
            s.write(&buf).expect("writing")
        } else {
            s.read(&mut buf).expect("reading")
        };
        if n == 0 {
            break;
        }
        counted += n as u64;
    }
    let cpu_secs = measure::process_cpu_secs(pid) - cpu_from;
    let elapsed = from.map_or(1e-9, |f| f.elapsed().as_secs_f64());
    // A reset, so that no backlog keeps flowing into the next figure.
    let _ = socket2_linger_zero(&s);
    drop(s);
    std::thread::sleep(Duration::from_millis(300));
    Stream {
        bits_per_sec: counted as f64 * 8.0 / elapsed,
        bytes: counted,
        cpu_secs,
    }
}

/// Connections per second that reached the remote, [`CONNECTING`] at a
/// time: each sends a byte and reads the remote's answer before it is
/// reset. The answer is what makes the proxies comparable: `ss-local`
/// answers a SOCKS CONNECT at once, before it has dialled anything, and
/// dials only once the application sends (or 50 ms later), so a
/// connection reset right after the SOCKS reply never leaves the client.
/// veil answers once the remote's SYN-ACK is back.
fn connections(via: Via, run: Duration) -> f64 {
    use std::io::Write;
    let count = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..CONNECTING {
            scope.spawn(|| {
                while start.elapsed() < run {
                    let Ok(mut s) = open(via, REPLY_PORT) else {
                        continue;
                    };
                    let mut answer = [0u8; 1];
                    if s.write_all(&[1]).is_ok() && s.read_exact(&mut answer).is_ok() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = socket2_linger_zero(&s);
                }
            });
        }
    });
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// The remote's source and sink, on threads; stopped on drop.
struct Servers(Arc<AtomicBool>);

impl Drop for Servers {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn start_servers(remote: &veil_tests::netns::NetNs) -> Servers {
    use std::io::Write;
    let stop = Arc::new(AtomicBool::new(false));
    let (source, sink, reply) = remote.enter(|| {
        (
            TcpListener::bind((veil_tests::world::REMOTE, SOURCE_PORT)).unwrap(),
            TcpListener::bind((veil_tests::world::REMOTE, SINK_PORT)).unwrap(),
            TcpListener::bind((veil_tests::world::REMOTE, REPLY_PORT)).unwrap(),
        )
    });
    let serve = |listener: TcpListener, write: bool, stop: Arc<AtomicBool>| {
        std::thread::spawn(move || {
            for s in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let mut buf = vec![0x5au8; CHUNK];
                    loop {
                        let ok = if write {
                            s.write_all(&buf).is_ok()
                        } else {
                            matches!(s.read(&mut buf), Ok(n) if n > 0)
                        };
                        if !ok {
                            break;
                        }
                    }
                });
            }
        });
    };
    serve(source, true, stop.clone());
    serve(sink, false, stop.clone());
    serve_replies(reply);
    Servers(stop)
}

/// One thread per connecting thread, all blocked in `accept` on one
/// listener with a deep queue (a full queue drops SYNs, and each drop
/// costs its client a 1 s retransmission). The threads end with the
/// benchmark's process.
fn serve_replies(listener: TcpListener) {
    use std::{io::Write, os::fd::AsRawFd};
    // SAFETY: listen() again on a listening socket only resizes its queue.
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    let listener = Arc::new(listener);
    for _ in 0..CONNECTING {
        let listener = listener.clone();
        std::thread::spawn(move || {
            while let Ok((mut s, _)) = listener.accept() {
                let mut request = [0u8; 1];
                if s.read_exact(&mut request).is_ok() {
                    let _ = s.write_all(&request);
                }
            }
        });
    }
}
