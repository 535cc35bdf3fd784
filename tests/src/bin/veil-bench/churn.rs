//! `churn`: thousands of real sessions against one gateway (the release
//! `veil-user`), opened from a client namespace with veil's own library
//! code: TLS with each client's certificate, CONNECT-IP
//! (`veil_proto::session::ClientSession`), the leased address, a UDP echo
//! through the datapath; no TUN device per client. Then they churn
//! (disconnect, reconnect, send) for a while, and leave.
//!
//! Measured: new sessions per second, the gateway's memory per idle client
//! (its RSS with every client connected less before, over N), its
//! descriptors and memory before and after, whether each client got the
//! same address back, and whether departed clients' flows are gone after
//! the grace period.

use std::{net::SocketAddrV4, sync::Arc};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{client::TlsStream, TlsConnector};
use veil_proto::session::{ClientConfig, ClientSession, Output};
use veil_tests::world::World;

#[allow(unused_imports, reason = "one import list for the benchmark's modules")]
use super::*;

/// The gateway on the client's link.
const GATEWAY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 200, 1, 1), 443);
/// Seconds a departed client keeps its flows (`--grace`).
const GRACE: u64 = 5;
/// Sessions in their handshake at once.
const IN_FLIGHT: usize = 256;

/// One client: its TLS configuration (certificate and key).
struct Identity {
    tls: Arc<rustls::ClientConfig>,
}

/// An established session: the connection and its state machine.
struct Live {
    tls: TlsStream<tokio::net::TcpStream>,
    session: ClientSession,
    vip: Ipv4Addr,
    /// Whether its TLS handshake resumed an earlier session (a ticket).
    resumed: bool,
    /// When it was done with TCP, TLS, the upgrade (its address) and the
    /// echo, from the start.
    phases: [Duration; 4],
}

/// Writes what the session has to send; packets that arrived, returned.
async fn flush(
    live_tls: &mut TlsStream<tokio::net::TcpStream>,
    session: &mut ClientSession,
) -> std::io::Result<Vec<Output>> {
    let mut other = Vec::new();
    while let Some(out) = session.poll_output() {
        match out {
            Output::Send(bytes) => {
                live_tls.write_all(&bytes).await?;
                session.recycle_send_buffer(bytes);
            }
            o => other.push(o),
        }
    }
    live_tls.flush().await?;
    Ok(other)
}

/// Reads once (up to `timeout`) into the session; false on EOF.
async fn read_into(
    tls: &mut TlsStream<tokio::net::TcpStream>,
    session: &mut ClientSession,
    buf: &mut [u8],
    timeout: Duration,
) -> std::io::Result<bool> {
    match tokio::time::timeout(timeout, tls.read(buf)).await {
        Ok(Ok(0)) => Ok(false),
        Ok(Ok(n)) => {
            session
                .receive(&buf[..n], Instant::now())
                .map_err(std::io::Error::other)?;
            Ok(true)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Ok(true),
    }
}

/// Connects, upgrades, waits for the address, and sends one UDP packet
/// to the remote's echo server until its echo comes back.
async fn connect(id: &Identity) -> std::io::Result<Live> {
    let began = Instant::now();
    let tcp = tokio::net::TcpStream::connect(GATEWAY).await?;
    let tcp_done = began.elapsed();
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from("veil-gateway").unwrap();
    let mut tls = TlsConnector::from(id.tls.clone())
        .connect(name, tcp)
        .await?;
    let tls_done = began.elapsed();
    let mut session = ClientSession::new(ClientConfig::new("veil-gateway"), Instant::now())
        .map_err(std::io::Error::other)?;
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut vip = None;
    while vip.is_none() {
        for out in flush(&mut tls, &mut session).await? {
            match out {
                Output::Assigned { addr, .. } => vip = Some(addr),
                Output::Close { reason } => {
                    return Err(std::io::Error::other(format!("{reason:?}")))
                }
                _ => {}
            }
        }
        if vip.is_some() {
            break;
        }
        if Instant::now() > deadline
            || !read_into(&mut tls, &mut session, &mut buf, Duration::from_secs(5)).await?
        {
            return Err(std::io::Error::other("no address assigned"));
        }
    }
    let resumed = live_resumed(&tls);
    let upgraded = began.elapsed();
    let mut live = Live {
        tls,
        session,
        vip: vip.unwrap(),
        resumed,
        phases: [tcp_done, tls_done, upgraded, Duration::ZERO],
    };
    echo(&mut live, &mut buf).await?;
    live.phases[3] = began.elapsed();
    Ok(live)
}

fn live_resumed(tls: &TlsStream<tokio::net::TcpStream>) -> bool {
    tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
}

/// A UDP datagram to the remote's echo server and its echo back.
async fn echo(live: &mut Live, buf: &mut [u8]) -> std::io::Result<()> {
    let mut packet = Vec::new();
    veil_proto::packet::append_udp(
        &mut packet,
        SocketAddrV4::new(live.vip, 40000),
        SocketAddrV4::new(REMOTE, 7),
        b"churn",
    );
    for _ in 0..3 {
        live.session.send_packet(&packet);
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            for out in flush(&mut live.tls, &mut live.session).await? {
                match out {
                    Output::Packet(p) if p.ends_with(b"churn") => return Ok(()),
                    Output::Close { reason } => {
                        return Err(std::io::Error::other(format!("{reason:?}")))
                    }
                    _ => {}
                }
            }
            if !read_into(
                &mut live.tls,
                &mut live.session,
                buf,
                Duration::from_millis(200),
            )
            .await?
            {
                return Err(std::io::Error::other("closed before the echo"));
            }
        }
    }
    Err(std::io::Error::other("no echo"))
}

/// Holds a session open (answering the gateway's PINGs, sending its own)
/// until told to leave; then closes it cleanly.
async fn hold(mut live: Live, mut leave: tokio::sync::oneshot::Receiver<()>) {
    let mut buf = vec![0u8; 4096];
    loop {
        if flush(&mut live.tls, &mut live.session).await.is_err() {
            return;
        }
        let wake = live
            .session
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
        tokio::select! {
            _ = &mut leave => break,
            r = live.tls.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => { let _ = live.session.receive(&buf[..n], Instant::now()); }
            },
            () = tokio::time::sleep_until(wake.into()) => live.session.handle_timeout(Instant::now()),
        }
    }
    let _ = live.tls.shutdown().await;
}

/// Holds `live` open in a task of `holders`; what tells it to leave.
fn keep(live: Live, holders: &mut tokio::task::JoinSet<()>) -> tokio::sync::oneshot::Sender<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    holders.spawn(hold(live, rx));
    tx
}

pub(crate) fn churn(quick: bool) {
    let n: usize = std::env::var("VEIL_CHURN_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 500 } else { 10_000 });
    let churn_secs: u32 = std::env::var("VEIL_CHURN_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 5 } else { 60 });
    println!("## {n} clients, churning (`cargo xtask bench churn`)\n");
    println!(
        "kernel {}, {} CPUs. Real sessions (TCP, TLS 1.3 with each client's certificate, CONNECT-IP, a leased address, a UDP echo through the datapath) from one client namespace, veil's library code, no TUN per client; the gateway is the release `veil-user` with `--max-clients {} --max-handshakes {IN_FLIGHT} --max-handshakes-per-source {IN_FLIGHT} --grace {GRACE} --nat-ports 20000-65535`, pool 10.77.0.0/16.\n",
        kernel(),
        num_cpus(),
        n + 16
    );
    let mut world = World::bare(1);
    // Issue the profiles in-process (the same code as `client add`).
    let started = Instant::now();
    let state = veil_user::state::StateDir::open(&world.state).unwrap();
    let ids: Vec<Identity> = (0..n)
        .map(|i| {
            let profile = state
                .add_client(&format!("c{i}"), &[GATEWAY.to_string()])
                .expect("issuing a profile");
            let (config, _) = veil_tunnel::tls::client_config(&profile).unwrap();
            Identity {
                tls: Arc::new(config),
            }
        })
        .collect();
    eprintln!(
        "{n} profiles issued in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    world.gw.exec(
        "sysctl",
        &["-qw", "net.ipv4.ip_local_port_range=10000 19999"],
    );
    let max_clients = (n + 16).to_string();
    let in_flight = IN_FLIGHT.to_string();
    let grace = GRACE.to_string();
    world.start_gateway_logging(
        &[
            "--max-clients",
            &max_clients,
            "--max-handshakes",
            &in_flight,
            "--max-handshakes-per-source",
            &in_flight,
            "--grace",
            &grace,
            "--no-h3",
            // Every client's echo goes to one remote endpoint: the NAT
            // ports toward it bound the flows (docs/operations.md, "Sizing
            // the NAT"), so the wide range, as for a busy gateway.
            "--nat-ports",
            "20000-65535",
        ],
        // "gateway up", not a line per session.
        "warn,veil_user::gateway=info,veil_user::gateway::accept=warn,veil_user::gateway::session=warn",
    );
    let pid = world.gateway.as_ref().unwrap().pid();
    std::thread::sleep(Duration::from_secs(2));
    let (rss_0, fds_0) = (rss_bytes(pid), fd_count(pid));

    let report = world.client(1).enter(|| {
        // SAFETY: raising our own soft limit to the hard one.
        unsafe {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(ids, pid, churn_secs, &world))
    });
    // Every client gone: after the grace period and a flow sweep.
    std::thread::sleep(Duration::from_secs(GRACE + 12));
    let status = world.status();
    let flows_after = status["flows"]["total"].as_u64().unwrap_or(u64::MAX);
    let clients_after = status["clients"].as_array().map_or(0, |c| c.len());
    let (rss_end, fds_end) = (rss_bytes(pid), fd_count(pid));

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!("| what | figure |");
    println!("|---|---:|");
    let (cold, back) = (&report.cold, &report.back);
    println!("| clients connected at once | {} of {n} |", cold.up);
    println!(
        "| new sessions per second (all {n} from cold, {IN_FLIGHT} in flight) | {:.0} |",
        cold.per_sec()
    );
    println!(
        "| CPU per new session from cold: gateway, clients' process | {:.2} ms, {:.2} ms |",
        cold.ms_each().0,
        cold.ms_each().1
    );
    println!(
        "| gateway CPU with every client connected, idle | {:.1} % of a core |",
        report.idle_cpu * 100.0
    );
    println!(
        "| gateway memory per idle client (RSS with all − RSS before, ÷ N) | {:.1} KiB |",
        (report.rss_all.saturating_sub(rss_0)) as f64 / 1024.0 / cold.up.max(1) as f64
    );
    println!(
        "| sessions per second, all {n} coming back at once (leases known) | {:.0} ({} up, {} resumed TLS) |",
        back.per_sec(),
        back.up,
        back.resumed
    );
    println!(
        "| CPU per returning session: gateway, clients' process | {:.2} ms, {:.2} ms |",
        back.ms_each().0,
        back.ms_each().1
    );
    println!(
        "| same address after everyone came back | {} of {} |",
        report.kept, back.up
    );
    println!(
        "| churn: reconnects in {churn_secs} s | {} ({:.0}/s) |",
        report.reconnects,
        report.reconnects as f64 / f64::from(churn_secs)
    );
    println!(
        "| churn: reconnects that failed, that resumed TLS | {}, {} |",
        report.failures, report.churn_resumed
    );
    println!(
        "| same address after reconnecting | {} of {} |",
        report.same_vip, report.reconnects
    );
    println!(
        "| gateway descriptors: before, all connected, after | {fds_0}, {}, {fds_end} |",
        report.fds_all
    );
    println!(
        "| gateway RSS: before, all connected, after the churn, after all left | {:.0}, {:.0}, {:.0}, {:.0} MiB |",
        mib(rss_0),
        mib(report.rss_all),
        mib(report.rss_churned),
        mib(rss_end)
    );
    println!(
        "| clients and flows left {}s after everyone left (grace {GRACE} s) | {clients_after} clients, {flows_after} flows (of {} while connected) |",
        GRACE + 12,
        report.flows_all
    );
}

struct Report {
    /// Every client connecting from cold (no lease, no TLS session yet).
    cold: Wave,
    /// Every client coming back at once (lease known, TLS resumed).
    back: Wave,
    /// The gateway's CPU (cores) with every client connected and idle.
    idle_cpu: f64,
    /// Clients that had the same address after everyone came back.
    kept: usize,
    rss_all: u64,
    rss_churned: u64,
    fds_all: usize,
    flows_all: u64,
    reconnects: usize,
    failures: usize,
    same_vip: usize,
    /// Reconnects whose TLS handshake resumed.
    churn_resumed: usize,
}

/// One wave of connections: every client without a session, at once.
struct Wave {
    up: usize,
    secs: f64,
    /// Handshakes that resumed an earlier TLS session.
    resumed: usize,
    /// CPU seconds the gateway and the clients' process spent meanwhile.
    gateway_cpu: f64,
    client_cpu: f64,
}

impl Wave {
    fn per_sec(&self) -> f64 {
        self.up as f64 / self.secs
    }

    /// CPU milliseconds per session up: the gateway's, the clients'.
    fn ms_each(&self) -> (f64, f64) {
        let n = self.up.max(1) as f64;
        (self.gateway_cpu * 1e3 / n, self.client_cpu * 1e3 / n)
    }
}

/// Connects every client without a session, `IN_FLIGHT` at a time; each
/// one up is held open.
async fn connect_all(
    ids: &Arc<Vec<Identity>>,
    pid: u32,
    leave: &mut [Option<tokio::sync::oneshot::Sender<()>>],
    vips: &mut [Option<Ipv4Addr>],
    holders: &mut tokio::task::JoinSet<()>,
) -> Wave {
    let gate = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let (gw_cpu, own_cpu) = (
        measure::process_cpu_secs(pid),
        measure::process_cpu_secs(std::process::id()),
    );
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in (0..ids.len()).filter(|i| leave[*i].is_none()) {
        let (ids, gate) = (ids.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            (i, connect(&ids[i]).await)
        });
    }
    let (mut up, mut errors, mut resumed) = (0, 0, 0);
    let mut took = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done.unwrap() {
            (i, Ok(live)) => {
                up += 1;
                took.push(live.phases);
                resumed += usize::from(live.resumed);
                vips[i] = Some(live.vip);
                leave[i] = Some(keep(live, holders));
            }
            (_, Err(e)) => {
                errors += 1;
                if errors <= 3 {
                    eprintln!("a session failed: {e}");
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    for (k, phase) in ["TCP", "TLS", "address", "echo"].iter().enumerate() {
        let mut t: Vec<Duration> = took.iter().map(|p| p[k]).collect();
        t.sort();
        let at = |q: f64| {
            t.get(((t.len() as f64 * q) as usize).min(t.len().saturating_sub(1)))
                .map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        eprintln!(
            "  done with {phase} after: p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            at(0.5),
            at(0.9),
            at(0.99),
            at(1.0)
        );
    }
    let wave = Wave {
        up,
        secs,
        resumed,
        gateway_cpu: measure::process_cpu_secs(pid) - gw_cpu,
        client_cpu: measure::process_cpu_secs(std::process::id()) - own_cpu,
    };
    let (gw_ms, own_ms) = wave.ms_each();
    eprintln!(
        "{up} sessions up in {secs:.1} s ({errors} failed, {resumed} resumed): {:.0}/s, CPU per session {gw_ms:.2} ms gateway, {own_ms:.2} ms clients",
        wave.per_sec()
    );
    wave
}

async fn run(ids: Vec<Identity>, pid: u32, churn_secs: u32, world: &World) -> Report {
    let ids: Arc<Vec<Identity>> = Arc::new(ids);
    let n = ids.len();
    let mut leave: Vec<Option<tokio::sync::oneshot::Sender<()>>> = (0..n).map(|_| None).collect();
    let mut vips: Vec<Option<Ipv4Addr>> = vec![None; n];
    let mut holders = tokio::task::JoinSet::new();
    let cold = connect_all(&ids, pid, &mut leave, &mut vips, &mut holders).await;
    // Idle: every client connected, sending only keepalives.
    let idle_from = measure::process_cpu_secs(pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_cpu = (measure::process_cpu_secs(pid) - idle_from) / 10.0;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss_all, fds_all) = (rss_bytes(pid), fd_count(pid));
    let flows_all =
        tokio::task::block_in_place(|| world.status()["flows"]["total"].as_u64().unwrap_or(0));

    // Churn: random clients leave and come back, each sending again.
    let end = Instant::now() + Duration::from_secs(u64::from(churn_secs));
    let (mut reconnects, mut failures, mut same_vip, mut churn_resumed) = (0, 0, 0, 0);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while Instant::now() < end {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x % n as u64) as usize;
            let Some(tx) = leave[i].take() else { continue };
            let _ = tx.send(());
            let ids = ids.clone();
            batch.spawn(async move {
                // The gateway notices the close, then the client is back.
                tokio::time::sleep(Duration::from_millis(50)).await;
                (i, connect(&ids[i]).await)
            });
        }
        while let Some(done) = batch.join_next().await {
            reconnects += 1;
            match done.unwrap() {
                (i, Ok(live)) => {
                    if Some(live.vip) == vips[i] {
                        same_vip += 1;
                    }
                    churn_resumed += usize::from(live.resumed);
                    leave[i] = Some(keep(live, &mut holders));
                }
                (_, Err(e)) => {
                    failures += 1;
                    if failures <= 3 {
                        eprintln!("a reconnect failed: {e}");
                    }
                }
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_churned = rss_bytes(pid);
    // Everyone leaves, and comes back at once: returning clients, their
    // leases known.
    for tx in leave.iter_mut().filter_map(Option::take) {
        let _ = tx.send(());
    }
    while holders.join_next().await.is_some() {}
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = vips.clone();
    let back = connect_all(&ids, pid, &mut leave, &mut vips, &mut holders).await;
    let kept = (0..n)
        .filter(|i| leave[*i].is_some() && before[*i].is_some() && before[*i] == vips[*i])
        .count();
    for tx in leave.iter_mut().filter_map(Option::take) {
        let _ = tx.send(());
    }
    while holders.join_next().await.is_some() {}
    Report {
        cold,
        back,
        idle_cpu,
        kept,
        rss_all,
        rss_churned,
        fds_all,
        flows_all,
        reconnects,
        failures,
        same_vip,
        churn_resumed,
    }
}
