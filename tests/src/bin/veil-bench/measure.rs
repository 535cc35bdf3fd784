//! How each figure is taken: iperf3, ping, UDP packet rates, connection
//! rates, CPU and memory.

#[allow(unused_imports, reason = "one import list for the benchmark's modules")]
use super::*;

/// The tunnel veil's clients take where a benchmark lets
/// `VEIL_BENCH_TRANSPORT` choose (`tcp`, the default, or `h3`).
#[derive(Clone, Copy)]
pub(crate) enum Transport {
    Tcp,
    H3,
}

impl Transport {
    /// From `VEIL_BENCH_TRANSPORT`; any other value stops the benchmark,
    /// so that a typo does not measure the default under another name.
    pub(crate) fn from_env() -> Self {
        match std::env::var("VEIL_BENCH_TRANSPORT").as_deref() {
            Err(_) | Ok("tcp") => Transport::Tcp,
            Ok("h3") => Transport::H3,
            Ok(other) => {
                eprintln!("VEIL_BENCH_TRANSPORT={other}: expected tcp or h3");
                std::process::exit(2);
            }
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "TLS/TCP",
            Transport::H3 => "HTTP/3",
        }
    }

    /// The client's `--transport` value.
    pub(crate) fn flag(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::H3 => "h3",
        }
    }
}

pub(crate) fn iperf3(ns: &str, secs: u32, streams: u32, reverse: bool) -> f64 {
    iperf3_to(ns, (REMOTE, 5201).into(), secs, streams, reverse)
}

/// [`iperf3`] with one stream: bits per second received and the sender's
/// TCP retransmissions.
pub(crate) fn iperf3_retransmits(ns: &str, secs: u32, reverse: bool) -> (f64, u64) {
    let v = iperf3_json(ns, (REMOTE, 5201).into(), secs, 1, reverse, &[]);
    (
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0),
        v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    )
}

/// TCP bits per second received, from namespace `ns` to an iperf3 server
/// at `server` (or back with `reverse`).
pub(crate) fn iperf3_to(
    ns: &str,
    server: std::net::SocketAddr,
    secs: u32,
    streams: u32,
    reverse: bool,
) -> f64 {
    iperf3_json(ns, server, secs, streams, reverse, &[])["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
}

/// iperf3's JSON report of one run (`Null` if it did not run), `extra`
/// added to its client's arguments.
pub(crate) fn iperf3_json(
    ns: &str,
    server: std::net::SocketAddr,
    secs: u32,
    streams: u32,
    reverse: bool,
    extra: &[&str],
) -> serde_json::Value {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{ns}")).args([
        "iperf3",
        "-c",
        &server.ip().to_string(),
        "-p",
        &server.port().to_string(),
        "-J",
        "-t",
        &secs.to_string(),
        "-P",
        &streams.to_string(),
    ]);
    cmd.args(extra);
    if reverse {
        cmd.arg("-R");
    }
    // A run right after another may find the server still busy with it
    // (on a lossy link, its control connection lost): again after a
    // pause, saying why.
    for attempt in 0..3 {
        let out = cmd.output().expect("running iperf3");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        match v["error"].as_str() {
            Some(e) if attempt < 2 => eprintln!("iperf3: {e}; again"),
            _ => return v,
        }
        std::thread::sleep(Duration::from_millis(500 << (2 * attempt)));
    }
    serde_json::Value::Null
}

/// Round-trip times in µs of `n` pings 10 ms apart.
pub(crate) fn ping_times(ns: &str, n: u32) -> Vec<f64> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{ns}"))
        .args([
            "ping",
            "-n",
            "-c",
            &n.to_string(),
            "-i",
            "0.01",
            "198.18.0.2",
        ])
        .output()
        .expect("running ping");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.trim_end_matches(" ms").parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect()
}

pub(crate) fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

pub(crate) fn p99(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)]
}

/// Busy CPU time of the whole machine so far (user + nice + system + irq +
/// softirq + steal), in seconds.
pub(crate) fn cpu_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: f64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| cpu.get(i)).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    busy / hz
}

/// UDP datagrams of `len` bytes per second that reached the remote.
pub(crate) fn udp_pps(ns: &str, secs: u32, len: u32) -> f64 {
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{ns}"))
        .args(["iperf3", "-c", "198.18.0.2", "-J", "-u", "-b", "0"])
        .args(["-l", &len.to_string(), "-t", &secs.to_string()])
        .output()
        .expect("running iperf3");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let sum = &v["end"]["sum"];
    let (packets, lost, seconds) = (
        sum["packets"].as_f64().unwrap_or(0.0),
        sum["lost_packets"].as_f64().unwrap_or(0.0),
        sum["seconds"].as_f64().unwrap_or(1.0),
    );
    ((packets - lost) / seconds.max(1e-9)).max(0.0)
}

/// New TCP connections per second from the client to the remote's discard
/// port (see [`connections_per_sec_to`]).
pub(crate) fn connections_per_sec(world: &veil_tests::world::World, secs: u32) -> f64 {
    connections_per_sec_to(world.client(1), (REMOTE, 9).into(), secs)
}

/// New TCP connections per second from namespace `from` to `to` (a server
/// that accepts and closes): 16 connecting threads (one thread's rate is
/// bound by the round trip, not by the gateway), each connection reset on
/// close (no TIME_WAIT to run out of ports).
pub(crate) fn connections_per_sec_to(from: &NetNs, to: std::net::SocketAddr, secs: u32) -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    let done = AtomicU64::new(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(secs as u64);
    let start = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                from.enter(|| {
                    while std::time::Instant::now() < deadline {
                        let c = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1));
                        if let Ok(c) = c {
                            let _ = socket2_linger_zero(&c);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            });
        }
    });
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

pub(crate) fn socket2_linger_zero(s: &std::net::TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and option.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// veil only: the gateway's memory (daemon RSS plus its maps) after `n`
/// UDP flows from the client, beyond what it used before; and how many
/// flows it holds.
pub(crate) fn memory_with_flows(world: &veil_tests::world::World, n: u32) -> (f64, f64) {
    let pid = world
        .gateway
        .as_ref()
        .map(|g| g.pid())
        .expect("gateway running");
    let rss = || rss_bytes(pid) as f64;
    let before = rss();
    // Distinct flows: 1,000 sockets (source ports), each toward n / 1,000
    // remote ports, in paced rounds of 200 so that no queue on the way
    // (the client's TUN queue holds 500) overflows.
    world.client(1).enter(|| {
        let sockets: Vec<UdpSocket> = (0..1000)
            .filter_map(|_| UdpSocket::bind("0.0.0.0:0").ok())
            .collect();
        let per_socket = n.div_ceil(sockets.len().max(1) as u32);
        for dport in (20000u16..).take(per_socket as usize) {
            for round in sockets.chunks(200) {
                for s in round {
                    let _ = s.send_to(b"x", (REMOTE, dport));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    let flows = world.status()["flows"]["total"].as_f64().unwrap_or(0.0);
    let after = rss();
    // The flow maps are preallocated: their size does not change with the
    // number of flows; the daemon's index does.
    ((after - before).max(0.0) / 1e6, flows)
}

/// The datapath's counters that are not zero, from a gateway's status:
/// `reason packets, ...`, for reading the figures.
pub(crate) fn datapath_counts(status: &serde_json::Value) -> String {
    let counted: Vec<String> = status["datapath"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, c)| c["packets"].as_u64().unwrap_or(0) > 0)
        .map(|(reason, c)| format!("{reason} {}", c["packets"]))
        .collect();
    counted.join(", ")
}

/// CPU seconds process `pid` has used (user + system, every thread), from
/// /proc.
pub(crate) fn process_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Past the command name, which may hold spaces: utime and stime are
    // the 12th and 13th fields after it.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: f64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}
