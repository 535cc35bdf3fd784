//! The gateway daemon: tunnels in, datapath out.
//!
//! One task accepts TLS connections and runs a session per client; one
//! reads replies from the TUN device and hands each to its client's session
//! by destination address; one expires idle flows; one watches the client
//! registry for revocations. The protocol itself is `veil_proto`'s state
//! machine: this module only moves bytes and packets between it, the
//! socket, the flow table and the TUN device.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};
use veil_proto::{
    gro::Coalescer,
    gso::{VnetHdr, VNET_HDR_LEN},
    session::{coalesce, Output, ServerConfig, ServerSession},
};

use crate::{
    admission::{Admission, Permit},
    control::{self, ClientStatus, FlowCounts, PacketCount, Status},
    datapath::{Datapath, DatapathConfig},
    flows::{FlowError, FlowTable, PortRange, Timeouts},
    net::{iface_ipv4s, ifindex, monotonic_ns, Ipv4Net},
    packet::{self, unreachable},
    policy::EgressPolicy,
    preflight,
    queue::{self, reply_queue, ReplyReceiver, ReplySender},
    state::{fingerprint, ClientRecord, StateDir},
    stream::{sleep_until_some, Event, Stream},
    tls,
    tun::{self, Tun},
};

/// Everything `veil-user` is told on its command line.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub iface: String,
    pub listen: SocketAddr,
    pub endpoint: Option<String>,
    /// The addresses remote hosts see; empty: the interface's first.
    pub public_addrs: Vec<Ipv4Addr>,
    pub state_dir: PathBuf,
    pub pool: Ipv4Net,
    pub nat_ports: PortRange,
    pub tun_name: String,
    pub pin_root: PathBuf,
    pub max_clients: usize,
    pub max_flows: usize,
    pub max_flows_per_client: usize,
    /// Ports one client may hold toward one remote endpoint; `None`: a
    /// quarter of the NAT range.
    pub max_ports_per_endpoint: Option<std::num::NonZeroU32>,
    pub grace: Duration,
    pub allow: Vec<Ipv4Net>,
    pub deny: Vec<Ipv4Net>,
    pub client_to_client: bool,
    pub timeouts: Timeouts,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Bytes of replies one client may have waiting; beyond, replies are
    /// dropped (and counted) rather than buffered.
    pub client_buffer: usize,
    /// Connections not yet authenticated, at most, overall and per source
    /// address.
    pub max_handshakes: usize,
    pub max_handshakes_per_source: usize,
}

/// The TUN device's MTU, and the largest IP packet a client may send.
pub const MTU: u16 = 1400;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that sends nothing (not even a keepalive) for this long is
/// dead. veil clients announce their PING interval and get twice that
/// instead; this is for clients that do not.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);
const GC_INTERVAL: Duration = Duration::from_secs(10);
/// Flows read per hold of the flow-table lock during a sweep or a status.
const GC_SLICE: usize = 1024;
const REGISTRY_INTERVAL: Duration = Duration::from_secs(1);
/// A client that takes none of our bytes for this long has stopped reading:
/// its session ends (the kernel's TCP_USER_TIMEOUT would end the connection
/// later; this frees the session, its queue and its socket now).
const WRITE_STALL: Duration = Duration::from_secs(15);
/// How long closing a connection may take (the last bytes, close_notify).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Unwritten bytes above which a session stops taking replies off its queue
/// (they wait there, bounded, instead of in the write buffer).
const OUT_HIGH_WATER: usize = 256 * 1024;
/// Unwritten bytes above which a session stops reading from its client: a
/// client that sends but does not read cannot grow our buffer.
const OUT_LIMIT: usize = 1024 * 1024;
/// Descriptors kept free for the state directory, the control socket and
/// the datapath: revocations and leases must never fail for want of one.
const FD_RESERVE: u64 = 256;
/// Packets read from the TUN device per wake-up, at most.
const TUN_BATCH: usize = 64;

/// Why a client packet went no further, counted for `status` and metrics.
#[derive(Default)]
pub struct Counters {
    pub forged_source: AtomicU64,
    pub policy_refused: AtomicU64,
    pub ttl_expired: AtomicU64,
    pub untranslatable: AtomicU64,
    pub malformed: AtomicU64,
    pub not_ipv4: AtomicU64,
    pub flow_errors: AtomicU64,
    /// New flows refused because the client holds its share of the ports
    /// toward that endpoint (`--max-ports-per-endpoint`).
    pub port_share_exceeded: AtomicU64,
    pub client_queue_full: AtomicU64,
    pub no_session: AtomicU64,
    /// Packets one client sent to another (`--allow-client-to-client`).
    pub client_to_client: AtomicU64,
    /// Connections refused before a session, by cause.
    pub refusals: Mutex<BTreeMap<&'static str, u64>>,
}

impl Counters {
    fn refused(&self, cause: &'static str) {
        *self
            .refusals
            .lock()
            .expect("refusals lock")
            .entry(cause)
            .or_default() += 1;
    }
}

struct Live {
    vip: Ipv4Addr,
    generation: u64,
    close: watch::Sender<Option<&'static str>>,
    peer: SocketAddr,
    since: SystemTime,
    bytes: Arc<Bytes>,
}

/// Bytes through one session, each way.
#[derive(Default)]
struct Bytes {
    from_client: AtomicU64,
    to_client: AtomicU64,
}

#[derive(Default)]
struct Clients {
    leases: BTreeMap<String, Ipv4Addr>,
    live: HashMap<String, Live>,
    /// Each client's most recent session: a grace timer only removes flows
    /// if no session came after the one it was started for.
    latest: HashMap<String, u64>,
    generation: u64,
}

/// The state every task shares.
struct Shared {
    cfg: GatewayConfig,
    /// The gateway's own address in the pool: where its ICMP errors to
    /// clients come from.
    inner_addr: Ipv4Addr,
    tun: Tun,
    flows: Mutex<FlowTable>,
    policy: EgressPolicy,
    state: StateDir,
    clients: Mutex<Clients>,
    /// Client address -> its session's packet queue: the reply hot path.
    sessions: RwLock<HashMap<Ipv4Addr, ReplySender>>,
    /// Caps on connections that have not authenticated yet.
    admission: Admission,
    registry: RwLock<HashMap<String, ClientRecord>>,
    counters: Counters,
    /// Taken at shutdown: dropping it detaches the programs and unpins.
    datapath: Mutex<Option<Datapath>>,
}

/// Runs the gateway until `shutdown` resolves.
pub async fn run(cfg: GatewayConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    preflight::check(&cfg.iface, cfg.nat_ports)?;
    for advice in preflight::advice(&cfg.iface) {
        warn!("{advice}");
    }
    // Bound first: a port in use is the most common start-up failure.
    let listener = TcpListener::bind(cfg.listen).await.with_context(|| {
        format!(
            "listening on {} (another veil-user or a web server on that port? pick one with --listen)",
            cfg.listen
        )
    })?;
    let metrics = match cfg.metrics {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("serving metrics on {addr}"))?,
        ),
        None => None,
    };
    let state = StateDir::open(&cfg.state_dir)
        .with_context(|| format!("opening the state directory {}", cfg.state_dir.display()))?;
    let ca = state.ca().context("loading the gateway's CA")?;
    let (cert, key) = state
        .server_identity(&ca)
        .context("loading the server certificate")?;
    let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(&ca.cert_pem, &cert, &key)?));

    let public_addrs = public_addrs(&cfg)?;
    let endpoint = cfg
        .endpoint
        .clone()
        .unwrap_or_else(|| format!("{}:{}", public_addrs[0], cfg.listen.port()));
    state.record_endpoint(&endpoint)?;
    let inner_addr = first_host(cfg.pool)?;

    let tun = Tun::create(&cfg.tun_name, MTU)
        .with_context(|| format!("creating the TUN device {}", cfg.tun_name))?;
    // The kernel would otherwise send IPv6 router solicitations into it.
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tun.name()),
        "1",
    );
    let mut datapath = Datapath::load()?;
    datapath.configure(&DatapathConfig {
        public_addrs: public_addrs.clone(),
        vip_pool: cfg.pool,
        nat_ports: cfg.nat_ports,
        wan_ifindex: ifindex(&cfg.iface)
            .with_context(|| format!("interface {} not found", cfg.iface))?,
        tun_ifindex: ifindex(tun.name())?,
        tun_l2_len: 0,
    })?;
    let pins = datapath.pin(&cfg.pin_root)?;
    let datapath_log = datapath.logger(log::logger())?;
    let flows = datapath
        .flow_table(cfg.nat_ports, cfg.timeouts)?
        .with_capacity(cfg.max_flows)
        .with_client_limit(cfg.max_flows_per_client);
    let flows = match cfg.max_ports_per_endpoint {
        Some(share) => flows.with_port_share(share.get()),
        None => flows,
    };
    datapath.attach(&cfg.iface, tun.name())?;

    let policy = EgressPolicy::new(
        public_addrs.iter().copied().chain([inner_addr]).collect(),
        cfg.pool,
        cfg.client_to_client,
        cfg.allow.clone(),
        cfg.deny.clone(),
    );
    let leases = state.leases()?;
    let admission = Admission::new(handshake_cap(&cfg)?, cfg.max_handshakes_per_source);
    let shared = Arc::new(Shared {
        inner_addr,
        tun,
        flows: Mutex::new(flows),
        policy,
        clients: Mutex::new(Clients {
            leases,
            ..Default::default()
        }),
        sessions: RwLock::new(HashMap::new()),
        registry: RwLock::new(HashMap::new()),
        admission,
        counters: Counters::default(),
        datapath: Mutex::new(Some(datapath)),
        state,
        cfg,
    });
    shared.reload_registry()?;
    info!(
        iface = %shared.cfg.iface, public_addrs = ?public_addrs, listen = %shared.cfg.listen, %endpoint,
        pool = %shared.cfg.pool, nat_ports = %shared.cfg.nat_ports, pins = %pins.display(),
        "gateway up"
    );

    let control = control::bind(&shared.cfg.state_dir)?;
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let snap = shared.clone();
    tasks.spawn(async move { control::serve(control, || snap.status()).await });
    if let Some(listener) = metrics {
        let snap = shared.clone();
        tasks.spawn(async move { crate::metrics::serve(listener, || snap.status()).await });
    }
    tasks.spawn(tun_reader(shared.clone()));
    tasks.spawn(flow_gc(shared.clone()));
    tasks.spawn(registry_watch(shared.clone()));
    tasks.spawn(forward_datapath_log(datapath_log));
    let accept = accept_loop(shared.clone(), listener, acceptor, stopped);
    tokio::select! {
        () = shutdown => {}
        r = accept => r?,
        Some(r) = tasks.join_next() => r??,
    }
    let _ = stop.send(true);
    // Let sessions say goodbye (TLS close_notify) before the datapath goes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    tasks.abort_all();
    let _ = std::fs::remove_file(shared.cfg.state_dir.join(control::SOCKET));
    drop(shared.datapath.lock().expect("datapath lock").take());
    info!("gateway stopped: programs detached, pins removed");
    Ok(())
}

/// `--max-handshakes`, lowered if the descriptor limit could not hold it
/// beside `--max-clients` sessions and the daemon's own files.
fn handshake_cap(cfg: &GatewayConfig) -> Result<usize> {
    let limit = crate::net::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    let sessions = cfg.max_clients as u64;
    let room = limit.saturating_sub(sessions + FD_RESERVE);
    if room < cfg.max_handshakes as u64 {
        warn!(
            limit, max_clients = cfg.max_clients, max_handshakes = cfg.max_handshakes,
            "the open-file limit cannot hold every client and handshake: handshakes capped at {room} \
             (raise LimitNOFILE, or lower --max-clients)"
        );
    }
    if room == 0 {
        bail!("the open-file limit ({limit}) leaves no room for handshakes beside --max-clients {sessions}: raise it (ulimit -n, LimitNOFILE) or lower --max-clients");
    }
    Ok(cfg.max_handshakes.min(room as usize))
}

/// The public addresses: those configured, or the interface's first. One
/// that is not on the interface is allowed (the upstream may route it to
/// the gateway) but warned about: usually replies to it never arrive.
fn public_addrs(cfg: &GatewayConfig) -> Result<Vec<Ipv4Addr>> {
    let on_iface = iface_ipv4s(&cfg.iface)
        .with_context(|| format!("finding the addresses of {}", cfg.iface))?;
    if cfg.public_addrs.is_empty() {
        let first = on_iface.first().copied().with_context(|| {
            format!(
                "interface {} has no IPv4 address: give one with --public-addr",
                cfg.iface
            )
        })?;
        return Ok(vec![first]);
    }
    crate::nat::check_public_addrs(&cfg.public_addrs)?;
    for addr in cfg.public_addrs.iter().filter(|a| !on_iface.contains(a)) {
        warn!(
            "public address {addr} is not an address of {}: replies to it reach the gateway only if the network routes it here",
            cfg.iface
        );
    }
    Ok(cfg.public_addrs.clone())
}

fn first_host(pool: Ipv4Net) -> Result<Ipv4Addr> {
    if pool.prefix() > 30 {
        bail!("the pool {pool} is too small: it needs the gateway's address and clients'");
    }
    Ok(Ipv4Addr::from_bits(pool.addr().to_bits() + 1))
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    stopped: watch::Receiver<bool>,
) -> Result<()> {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of fds and the like: back off, keep serving.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Closed at once if over a cap: a flood of connections costs an
        // accept each, not a task, a buffer and a descriptor for seconds.
        let permit = match shared.admission.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(turned) => {
                shared.counters.refused(turned.cause());
                debug!(%peer, "connection turned away: {turned}");
                continue;
            }
        };
        crate::net::tune_tunnel_socket(&tcp, crate::net::TUNNEL_LOWAT);
        let (shared, acceptor, stopped) = (shared.clone(), acceptor.clone(), stopped.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            match connection(&shared, tcp, peer, permit, acceptor, stopped).await {
                Ok(end) => {
                    info!(client = %end.name, vip = %end.vip,
                        secs = started.elapsed().as_secs(), "session ended: {}", end.reason);
                }
                Err(e) => {
                    shared.counters.refused(e.cause());
                    info!("session refused: {e}");
                    debug!(%peer, "the refused connection came from here");
                }
            }
        });
    }
}

struct SessionEnd {
    name: String,
    vip: Ipv4Addr,
    reason: String,
}

/// Why a connection never became a session, by cause for the metrics.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] std::io::Error),
    #[error("no client certificate")]
    NoCertificate,
    #[error("certificate not issued by this gateway's registry")]
    UnknownClient,
    #[error("client `{0}` is revoked")]
    Revoked(String),
    #[error("client `{name}`: --max-clients {max} reached")]
    Full { name: String, max: usize },
    #[error("client `{name}`: {source:#}")]
    Internal {
        name: String,
        #[source]
        source: anyhow::Error,
    },
}

impl Refused {
    /// The `cause` label of `veil_handshake_failures_total`.
    fn cause(&self) -> &'static str {
        match self {
            Refused::HandshakeTimeout => "timeout",
            Refused::Tls(_) => "tls",
            Refused::NoCertificate | Refused::UnknownClient => "unknown_client",
            Refused::Revoked(_) => "revoked",
            Refused::Full { .. } => "full",
            Refused::Internal { .. } => "internal",
        }
    }
}

/// A client's TLS stream, over a read-buffered socket.
type TlsStream = tokio_rustls::server::TlsStream<crate::tls::BufferedTcp>;

/// One client connection, from TCP accept to close. `permit` holds its
/// place among the unauthenticated until it becomes a session.
async fn connection(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    permit: Permit,
    acceptor: TlsAcceptor,
    mut stopped: watch::Receiver<bool>,
) -> Result<SessionEnd, Refused> {
    let tcp = crate::tls::buffered(tcp);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| Refused::HandshakeTimeout)?
        .map_err(Refused::Tls)?;
    let mut stream = Stream::new(tls);
    let record = shared.authenticate(stream.get_ref())?;
    let name = record.name.clone();
    if record.revoked.is_some() {
        stream.close(CLOSE_TIMEOUT).await;
        return Err(Refused::Revoked(name));
    }
    let internal = |name: &str| {
        let name = name.to_owned();
        move |source: anyhow::Error| Refused::Internal { name, source }
    };
    let vip = shared.lease(&name).map_err(internal(&name))?;
    let mut session = ServerSession::new(
        ServerConfig {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            keepalive_timeout: PEER_TIMEOUT,
            offload: true,
            max_packet_len: MTU,
            ..ServerConfig::new(vip)
        },
        Instant::now(),
    )
    .map_err(|e| internal(&name)(e.into()))?;

    let (tx, mut rx) = reply_queue(shared.cfg.client_buffer);
    let bytes = Arc::new(Bytes::default());
    let Some((generation, mut closed)) = shared.attach(&name, vip, peer, bytes.clone(), tx) else {
        session.refuse(503, "the gateway is full");
        while let Some(output) = session.poll_output() {
            if let Output::Send(bytes) = output {
                stream.out_mut().extend_from_slice(&bytes);
            }
        }
        linger(&mut stream).await;
        return Err(Refused::Full {
            name,
            max: shared.cfg.max_clients,
        });
    };
    // Authenticated and admitted: `--max-clients` bounds it from now on,
    // and it reads through a full-size buffer.
    drop(permit);
    stream
        .get_mut()
        .get_mut()
        .0
        .grow(crate::tls::TUNNEL_READ_BUFFER);
    info!(client = %name, %vip, "session started");
    debug!(client = %name, %peer, "the session's connection comes from here");
    let mut io = SessionIo {
        stream: &mut stream,
        rx: &mut rx,
        closed: &mut closed,
        stopped: &mut stopped,
        bytes: &bytes,
    };
    let end = pump(shared, &mut session, vip, &mut io).await;
    shared.detach(&name, vip, generation);
    // Its queue and buffers go now, not after the goodbye.
    drop((rx, session));
    if !end.flush {
        stream.discard();
    }
    stream.close(CLOSE_TIMEOUT).await;
    Ok(SessionEnd {
        name,
        vip,
        reason: end.reason,
    })
}

/// What a session's pump reads from and writes to.
struct SessionIo<'a> {
    stream: &'a mut Stream<TlsStream>,
    /// Replies from the TUN reader: offload header and packet, joined.
    rx: &'a mut ReplyReceiver,
    /// Revocation or replacement.
    closed: &'a mut watch::Receiver<Option<&'static str>>,
    stopped: &'a mut watch::Receiver<bool>,
    bytes: &'a Bytes,
}

/// Why a pump stopped, and whether what it has queued is still worth
/// sending (a protocol error's response is; a stalled, replaced or revoked
/// client's backlog is not).
struct PumpEnd {
    reason: String,
    flush: bool,
}

impl PumpEnd {
    fn flush(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            flush: true,
        }
    }

    fn drop(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            flush: false,
        }
    }
}

/// Moves bytes and packets until the session ends; returns why it ended.
/// Nothing in here waits on the client alone: writes progress inside the
/// `select!`, beside the control signals, and a client that stops reading
/// is let go after [`WRITE_STALL`].
async fn pump(
    shared: &Arc<Shared>,
    session: &mut ServerSession,
    vip: Ipv4Addr,
    io: &mut SessionIo<'_>,
) -> PumpEnd {
    let SessionIo {
        stream,
        rx,
        closed,
        stopped,
        bytes,
    } = io;
    let mut buf = vec![0u8; 64 * 1024];
    let mut gro = Coalescer::new();
    loop {
        // Act on everything the state machine has to say.
        while let Some(output) = session.poll_output() {
            match output {
                Output::Send(bytes) => {
                    session.recycle_send_buffer(coalesce(stream.out_mut(), bytes))
                }
                Output::Packet(packet) => {
                    bytes.from_client.fetch_add(packet.len() as u64, Relaxed);
                    if let Some(reply) = shared.client_packet(vip, &VnetHdr::NONE, &packet) {
                        session.send_packet(&reply);
                    }
                }
                Output::OffloadPacket(joined) => {
                    // The session replaced the client's header with the
                    // only one its packet can mean.
                    if let Some((hdr, packet)) = VnetHdr::peel(&joined) {
                        bytes.from_client.fetch_add(packet.len() as u64, Relaxed);
                        if let Some(reply) = shared.client_packet(vip, &hdr, packet) {
                            session.send_packet(&reply);
                        }
                    }
                }
                Output::Close { reason } => return PumpEnd::flush(reason.to_string()),
                // Client-side outputs.
                Output::Assigned { .. } | Output::Routes(_) => {}
            }
        }
        let deadline = session
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        let stall = stream.stalled_since().map(|since| since + WRITE_STALL);
        let pending = stream.pending();
        tokio::select! {
            event = stream.next(&mut buf, pending < OUT_LIMIT) => match event {
                Ok(Event::Read(0)) => return PumpEnd::flush("client closed the connection"),
                Ok(Event::Read(n)) => {
                    if let Err(e) = session.receive(&buf[..n], Instant::now()) {
                        debug!(%vip, "protocol error: {e}");
                    }
                }
                Ok(Event::Wrote) => {}
                Err(e) => return PumpEnd::drop(format!("connection failed: {e}")),
            },
            Some(joined) = rx.recv(), if pending < OUT_HIGH_WATER => {
                let mut taken = joined.len();
                to_client(session, bytes, &mut gro, &joined);
                // Take more of what is queued: one TLS write for the lot,
                // and consecutive segments of a flow merged. Up to the high
                // water mark only: the queue is where replies wait, bounded,
                // not the write buffer.
                while taken < OUT_HIGH_WATER {
                    let Some(joined) = rx.try_recv() else { break };
                    taken += joined.len();
                    to_client(session, bytes, &mut gro, &joined);
                }
                gro.flush(|hdr, packet| session.send_offload_packet(hdr, packet));
            }
            () = tokio::time::sleep_until(deadline) => session.handle_timeout(Instant::now()),
            () = sleep_until_some(stall) => {
                return PumpEnd::drop(format!("client read nothing for {}s", WRITE_STALL.as_secs()));
            }
            _ = closed.changed() => {
                let why = closed.borrow().unwrap_or("closed");
                return PumpEnd::drop(why);
            }
            _ = stopped.changed() => return PumpEnd::flush("gateway shutting down"),
        }
    }
}

/// A reply as the TUN reader queued it (offload header, packet), into the
/// session: through `gro` when the client takes offload datagrams, so that
/// it gets one super-packet where the WAN delivered a run of segments.
fn to_client(session: &mut ServerSession, bytes: &Bytes, gro: &mut Coalescer, joined: &[u8]) {
    // Our kernel's header; the coalescer and `segment` check what they use.
    let Some((hdr, packet)) = VnetHdr::peel(joined) else {
        return;
    };
    bytes.to_client.fetch_add(packet.len() as u64, Relaxed);
    if session.offload() {
        gro.push(&hdr, packet, |hdr, packet| {
            session.send_offload_packet(hdr, packet)
        });
    } else {
        session.send_offload_packet(&hdr, packet);
    }
}

/// Writes what is queued, closes our side and reads until the client
/// closes its own (for a second at most): closing with unread input would
/// reset the connection and could destroy a refusal before the client
/// reads it (RFC 9112 §9.6).
async fn linger(stream: &mut Stream<TlsStream>) {
    stream.close(CLOSE_TIMEOUT).await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(stream.get_mut().read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

impl Shared {
    /// The registry's record of the client behind this TLS stream. A
    /// client added since the last registry reload (at most a second ago)
    /// is looked up on disk rather than refused.
    fn authenticate(&self, tls: &TlsStream) -> Result<ClientRecord, Refused> {
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or(Refused::NoCertificate)?;
        let fingerprint = fingerprint(cert);
        let known = self
            .registry
            .read()
            .expect("registry lock")
            .get(&fingerprint)
            .cloned();
        match known {
            Some(record) => Ok(record),
            None => self
                .state
                .clients()
                .ok()
                .and_then(|all| all.into_iter().find(|r| r.fingerprint == fingerprint))
                .ok_or(Refused::UnknownClient),
        }
    }

    /// The client's address: the one it had before, or the next free one.
    fn lease(&self, name: &str) -> Result<Ipv4Addr> {
        let mut clients = self.clients.lock().expect("clients lock");
        if let Some(vip) = clients.leases.get(name) {
            if self.cfg.pool.contains(*vip) {
                return Ok(*vip);
            }
        }
        let taken: std::collections::HashSet<Ipv4Addr> = clients.leases.values().copied().collect();
        let base = self.inner_addr.to_bits() + 1;
        let last = self.cfg.pool.addr().to_bits() | !self.cfg.pool.mask().to_bits();
        let vip = (base..last)
            .map(Ipv4Addr::from_bits)
            .find(|a| !taken.contains(a))
            .with_context(|| format!("the address pool {} is exhausted", self.cfg.pool))?;
        clients.leases.insert(name.to_owned(), vip);
        self.state.save_leases(&clients.leases)?;
        Ok(vip)
    }

    /// Registers a live session; an older one of the same client (a
    /// reconnect after a network change) is closed, its flows kept. `None`
    /// if `--max-clients` sessions of other clients are live: the check and
    /// the registration are one step, so racing connections cannot both
    /// take the last place.
    fn attach(
        &self,
        name: &str,
        vip: Ipv4Addr,
        peer: SocketAddr,
        bytes: Arc<Bytes>,
        tx: ReplySender,
    ) -> Option<(u64, watch::Receiver<Option<&'static str>>)> {
        let (close, closed) = watch::channel(None);
        let mut clients = self.clients.lock().expect("clients lock");
        if clients.live.len() >= self.cfg.max_clients && !clients.live.contains_key(name) {
            return None;
        }
        clients.generation += 1;
        let generation = clients.generation;
        clients.latest.insert(name.to_owned(), generation);
        if let Some(old) = clients.live.insert(
            name.to_owned(),
            Live {
                vip,
                generation,
                close,
                peer,
                since: SystemTime::now(),
                bytes,
            },
        ) {
            let _ = old
                .close
                .send(Some("replaced by a new connection of the same client"));
        }
        self.sessions
            .write()
            .expect("sessions lock")
            .insert(vip, tx);
        Some((generation, closed))
    }

    /// Unregisters a session that ended; its flows stay for the grace period
    /// in case the client comes back.
    fn detach(self: &Arc<Self>, name: &str, vip: Ipv4Addr, generation: u64) {
        let mut clients = self.clients.lock().expect("clients lock");
        if clients
            .live
            .get(name)
            .is_some_and(|l| l.generation == generation)
        {
            clients.live.remove(name);
            self.sessions.write().expect("sessions lock").remove(&vip);
        } else {
            return; // Replaced: the new session owns the flows.
        }
        drop(clients);
        let (shared, name) = (self.clone(), name.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(shared.cfg.grace).await;
            // A map syscall per flow: off the async workers.
            let _ =
                tokio::task::spawn_blocking(move || shared.end_grace(&name, vip, generation)).await;
        });
    }

    /// Removes the flows of a client whose session `generation` ended a
    /// grace period ago, unless it came back since. The clients lock is
    /// held throughout, so a reconnect either comes before the check (and
    /// keeps its flows) or after the removal (and makes new ones).
    fn end_grace(&self, name: &str, vip: Ipv4Addr, generation: u64) {
        let clients = self.clients.lock().expect("clients lock");
        if clients
            .latest
            .get(name)
            .is_some_and(|latest| *latest != generation)
        {
            return;
        }
        match self.flows.lock().expect("flows lock").delete_client(vip) {
            Ok(n) => info!(client = %name, %vip, flows = n, "grace period over: flows removed"),
            Err(e) => warn!(client = %name, %vip, "removing flows: {e:#}"),
        }
        drop(clients);
    }

    /// A packet from client `vip`: forwarded into the datapath, or refused.
    /// Returns an ICMP error to send back to the client, if one is due.
    /// `hdr` is the packet's offload header: a super-packet is checked by
    /// its first header, which every segment cut from it repeats.
    fn client_packet(&self, vip: Ipv4Addr, hdr: &VnetHdr, pkt: &[u8]) -> Option<Vec<u8>> {
        let count = |c: &AtomicU64| {
            c.fetch_add(1, Relaxed);
        };
        let info = match packet::parse(pkt) {
            Ok(info) => info,
            Err(e @ packet::PacketError::NotIpv4(_)) => {
                count(&self.counters.not_ipv4);
                debug!(%vip, "dropped: {e}");
                return None;
            }
            Err(e) => {
                count(&self.counters.malformed);
                debug!(%vip, "dropped: {e}");
                return None;
            }
        };
        if info.src != vip {
            count(&self.counters.forged_source);
            debug!(%vip, src = %info.src, "dropped: source address is not the client's");
            return None;
        }
        // No ICMP error about a fragment after the first (RFC 1122 3.2.2):
        // the first one already had its answer.
        let later_fragment = info.fragment == packet::Fragment::Later;
        if let Err(refusal) = self.policy.check(info.dst) {
            count(&self.counters.policy_refused);
            debug!(%vip, dst = %info.dst, "refused by the egress policy: {refusal}");
            return (!later_fragment).then(|| {
                packet::icmp_error(self.inner_addr, pkt, 3, unreachable::ADMIN_PROHIBITED)
            });
        }
        if info.ttl <= 1 {
            count(&self.counters.ttl_expired);
            return (!later_fragment).then(|| packet::icmp_error(self.inner_addr, pkt, 11, 0));
        }
        if self.cfg.pool.contains(info.dst) {
            // Only reached with --allow-client-to-client (the policy refuses
            // the pool otherwise): handed to the other client's session
            // here, never NATed out of the WAN.
            // Fragments too: the other client reassembles.
            return self.to_other_client(info.dst, hdr, pkt);
        }
        if later_fragment {
            // No ports, no flow to create: the datapath translates it as
            // its first fragment, or drops it (drop_orphan_fragment).
            if let Err(e) = self.tun.send(hdr, pkt) {
                debug!(%vip, "writing to the TUN device: {e}");
            }
            return None;
        }
        let Some(key) = info.flow_key() else {
            count(&self.counters.untranslatable);
            debug!(%vip, proto = info.proto, "dropped: not translated");
            return None;
        };
        let created = {
            let mut flows = self.flows.lock().expect("flows lock");
            match flows.get(&key) {
                Some(_) => Ok(()),
                None => flows.create(key, monotonic_ns()).map(|_| ()),
            }
        };
        if let Err(e) = created {
            count(match e {
                FlowError::ShareExhausted { .. } => &self.counters.port_share_exceeded,
                _ => &self.counters.flow_errors,
            });
            match e {
                FlowError::PortsExhausted { .. }
                | FlowError::ShareExhausted { .. }
                | FlowError::TableFull(_)
                | FlowError::ClientFull { .. } => {
                    debug!(%vip, "dropped: {e}")
                }
                e => warn!(%vip, "creating a flow: {e:#}"),
            }
            return None;
        }
        if let Err(e) = self.tun.send(hdr, pkt) {
            debug!(%vip, "writing to the TUN device: {e}");
        }
        None
    }

    /// A packet from one client to another's address: into that client's
    /// reply queue as if it came from the datapath, TTL decremented as any
    /// router would. No session there: ICMP host unreachable.
    fn to_other_client(&self, dst: Ipv4Addr, hdr: &VnetHdr, pkt: &[u8]) -> Option<Vec<u8>> {
        let mut joined = Vec::with_capacity(VNET_HDR_LEN + pkt.len());
        joined.extend_from_slice(&hdr.to_bytes());
        joined.extend_from_slice(pkt);
        packet::decrement_ttl(&mut joined[VNET_HDR_LEN..]);
        let sessions = self.sessions.read().expect("sessions lock");
        let Some(tx) = sessions.get(&dst) else {
            self.counters.no_session.fetch_add(1, Relaxed);
            return Some(packet::icmp_error(
                self.inner_addr,
                pkt,
                3,
                unreachable::HOST,
            ));
        };
        match tx.push(joined) {
            Ok(()) => self.counters.client_to_client.fetch_add(1, Relaxed),
            Err(_) => self.counters.client_queue_full.fetch_add(1, Relaxed),
        };
        None
    }

    fn status(&self) -> Status {
        let clients = {
            let clients = self.clients.lock().expect("clients lock");
            let mut list: Vec<ClientStatus> = clients
                .live
                .iter()
                .map(|(name, l)| ClientStatus {
                    name: name.clone(),
                    vip: l.vip,
                    peer: l.peer.to_string(),
                    connected_since: l
                        .since
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                    bytes_from_client: l.bytes.from_client.load(Relaxed),
                    bytes_to_client: l.bytes.to_client.load(Relaxed),
                })
                .collect();
            list.sort_by(|a, b| a.name.cmp(&b.name));
            list
        };
        let flows = self.flow_counts();
        let c = &self.counters;
        let counters = [
            ("forged_source", &c.forged_source),
            ("policy_refused", &c.policy_refused),
            ("ttl_expired", &c.ttl_expired),
            ("untranslatable", &c.untranslatable),
            ("malformed", &c.malformed),
            ("not_ipv4", &c.not_ipv4),
            ("flow_errors", &c.flow_errors),
            ("port_share_exceeded", &c.port_share_exceeded),
            ("client_queue_full", &c.client_queue_full),
            ("no_session", &c.no_session),
            ("client_to_client", &c.client_to_client),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.load(Relaxed)))
        .collect();
        let datapath = self
            .datapath
            .lock()
            .expect("datapath lock")
            .as_ref()
            .and_then(|dp| dp.stats().ok())
            .unwrap_or_default()
            .into_iter()
            .map(|(reason, c)| {
                let count = PacketCount {
                    packets: c.packets,
                    bytes: c.bytes,
                };
                (reason.name().to_owned(), count)
            })
            .collect();
        let refused = self
            .counters
            .refusals
            .lock()
            .expect("refusals lock")
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect();
        Status {
            clients,
            flows,
            refused,
            counters,
            datapath,
        }
    }

    fn flow_counts(&self) -> FlowCounts {
        let (mut counts, keys) = {
            let table = self.flows.lock().expect("flows lock");
            let counts = FlowCounts {
                nat_ports: table.ports().to_string(),
                nat_ports_in_use: table.nat_ports_in_use(),
                ..Default::default()
            };
            (counts, table.keys().copied().collect::<Vec<_>>())
        };
        // Two map lookups per flow, in slices: sessions creating flows wait
        // for one slice at most, not for the whole table.
        let mut list = Vec::with_capacity(keys.len());
        for slice in keys.chunks(GC_SLICE) {
            let table = self.flows.lock().expect("flows lock");
            list.extend(table.list_some(slice).unwrap_or_default());
        }
        let now = monotonic_ns();
        let brief = |f: &crate::flows::Flow| control::FlowBrief {
            flow: f.to_string(),
            age_secs: now.saturating_sub(f.created_ns) / 1_000_000_000,
            packets: f.egress.packets + f.reverse.packets,
            bytes: f.egress.bytes + f.reverse.bytes,
        };
        for f in &list {
            counts.total += 1;
            match f.key.proto {
                veil_common::proto::TCP => counts.tcp += 1,
                veil_common::proto::UDP => counts.udp += 1,
                _ => counts.icmp += 1,
            }
        }
        counts.oldest = list.iter().min_by_key(|f| f.created_ns).map(brief);
        let mut by_packets: Vec<_> = list.iter().collect();
        by_packets.sort_by_key(|f| std::cmp::Reverse(f.egress.packets + f.reverse.packets));
        counts.busiest = by_packets.into_iter().take(3).map(brief).collect();
        counts
    }

    /// A reply from the datapath, to the session of its destination.
    /// `sessions` is the session table, read-locked once per batch of
    /// replies rather than once per packet.
    fn to_session(&self, sessions: &HashMap<Ipv4Addr, ReplySender>, joined: &[u8]) {
        // Only the destination is read here; `to_client` does the rest.
        let Some((_, pkt)) = VnetHdr::peel(joined) else {
            self.counters.malformed.fetch_add(1, Relaxed);
            return;
        };
        if pkt.len() < 20 || pkt[0] >> 4 != 4 {
            return;
        }
        let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
        let dropped = match sessions.get(&dst) {
            Some(tx) => match tx.push(joined.to_vec()) {
                Ok(()) => None,
                Err(queue::Dropped::Full) => Some(&self.counters.client_queue_full),
                Err(queue::Dropped::Closed) => Some(&self.counters.no_session),
            },
            None => Some(&self.counters.no_session),
        };
        if let Some(counter) = dropped {
            counter.fetch_add(1, Relaxed);
        }
    }

    /// Re-reads the client registry from the state directory. A record
    /// that does not read is left out and every other one applies: one bad
    /// file must not freeze the registry (and with it later revocations).
    /// Its client fails closed: refused as unknown from the next handshake,
    /// its live session closed now.
    fn reload_registry(&self) -> Result<()> {
        let found = self.state.client_records()?;
        for bad in found.unreadable.iter().filter(|u| u.new) {
            warn!("reading the client registry: {bad}");
        }
        *self.registry.write().expect("registry lock") = found
            .records
            .into_iter()
            .map(|r| (r.fingerprint.clone(), r))
            .collect();
        let clients = self.clients.lock().expect("clients lock");
        for name in found.unreadable.iter().filter_map(|u| u.name.as_ref()) {
            if let Some(live) = clients.live.get(name) {
                if live.close.borrow().is_none() {
                    info!(client = %name, "record unreadable: closing its session");
                    let _ = live.close.send(Some("client record unreadable"));
                }
            }
        }
        Ok(())
    }

    /// Closes every live session whose client is revoked.
    fn close_revoked(&self) {
        let revoked: std::collections::HashSet<String> = self
            .registry
            .read()
            .expect("registry lock")
            .values()
            .filter(|r| r.revoked.is_some())
            .map(|r| r.name.clone())
            .collect();
        let clients = self.clients.lock().expect("clients lock");
        for (name, live) in &clients.live {
            if revoked.contains(name) && live.close.borrow().is_none() {
                info!(client = %name, "revoked: closing its session");
                let _ = live.close.send(Some("client revoked"));
            }
        }
    }
}

/// Replies from the datapath, to the session of their destination. A read
/// error is logged and the reader goes on: every client's replies depend on
/// this task.
async fn tun_reader(shared: Arc<Shared>) -> Result<()> {
    let mut buf = vec![0u8; tun::MAX_READ];
    loop {
        let n = match shared.tun.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                tun_read_failed(&e).await;
                continue;
            }
        };
        // Sessions that start or end meanwhile wait for one batch at most.
        let sessions = shared.sessions.read().expect("sessions lock");
        shared.to_session(&sessions, &buf[..n]);
        // Drain what else is waiting before going back to the reactor.
        for _ in 0..TUN_BATCH {
            match shared.tun.try_recv(&mut buf) {
                Ok(Some(n)) => shared.to_session(&sessions, &buf[..n]),
                Ok(None) => break,
                Err(e) => {
                    warn!("reading the TUN device: {e}");
                    break;
                }
            }
        }
    }
}

/// Logs a failed TUN read and pauses briefly, so that an error that
/// repeats (say, out of memory) neither spins nor floods the log.
async fn tun_read_failed(e: &std::io::Error) {
    warn!("reading the TUN device: {e}");
    tokio::time::sleep(Duration::from_millis(10)).await;
}

async fn flow_gc(shared: Arc<Shared>) -> Result<()> {
    let mut tick = tokio::time::interval(GC_INTERVAL);
    loop {
        tick.tick().await;
        let shared = shared.clone();
        // Two map lookups per flow: off the async workers, and in slices so
        // that sessions creating flows wait for one slice at most.
        let sweep = tokio::task::spawn_blocking(move || {
            let keys: Vec<_> = shared
                .flows
                .lock()
                .expect("flows lock")
                .keys()
                .copied()
                .collect();
            let now = monotonic_ns();
            let mut expired = 0;
            for slice in keys.chunks(GC_SLICE) {
                let report = shared
                    .flows
                    .lock()
                    .expect("flows lock")
                    .expire(slice, now)?;
                expired += report.expired.len();
            }
            Ok::<_, FlowError>((keys.len(), expired))
        })
        .await?;
        match sweep {
            Ok((examined, expired)) if expired > 0 => debug!(examined, expired, "flow gc"),
            Ok(_) => {}
            Err(e) => warn!("flow gc: {e:#}"),
        }
    }
}

/// The eBPF programs' aya-log records, into the daemon's log.
async fn forward_datapath_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> Result<()> {
    // SAFETY: the logger owns its ring buffer fd until the AsyncFd drops it.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(std::io::Error::from)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// Closes the sessions of clients revoked while connected.
async fn registry_watch(shared: Arc<Shared>) -> Result<()> {
    let mut tick = tokio::time::interval(REGISTRY_INTERVAL);
    loop {
        tick.tick().await;
        match shared.reload_registry() {
            Ok(()) => shared.close_revoked(),
            Err(e) => warn!("reloading the client registry: {e:#}"),
        }
    }
}
