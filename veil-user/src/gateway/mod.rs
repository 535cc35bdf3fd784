//! The gateway daemon: tunnels in, datapath out.
//!
//! One task accepts TLS connections and runs a session per client
//! ([`accept`], [`session`]), another the same inside WebSockets relayed
//! by a web server, if asked to ([`ws`]); one per TUN queue reads replies from the
//! TUN device ([`tun_queues`]) and hands each to its client's session by
//! destination address ([`packets`]); one expires idle flows; one watches the client registry
//! for revocations ([`registry`]). The protocol itself is `veil_proto`'s
//! state machine, and what is decided about a client or a packet is pure
//! ([`clients`], [`check`]): these modules only move bytes and packets
//! between them, the socket, the flow table and the TUN device.

mod accept;
mod bigbuf;
pub mod check;
pub mod check6;
pub mod clients;
mod dns;
mod fairuse;
pub mod fallback;
mod forward;
mod h3;
mod leases;
mod packets;
mod packets6;
mod registry;
mod revocations;
mod session;
mod status;
mod trim;
mod tun_queues;
mod ws;

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use self::{check::Checks, clients::Clients};
use crate::{
    admission::Admission,
    control,
    datapath::{Datapath, DatapathConfig, WanFilter},
    flows::{FlowError, FlowTable, PortRange, Timeouts},
    gro_stage::{self, GroStage, StageSetting},
    net::{iface_ipv4s, ifindex, monotonic_ns, Ipv4Net},
    policy::EgressPolicy,
    preflight,
    queue::ReplySender,
    state::{ClientRecord, StateDir},
    tls,
};

/// What the gateway runs with: [`crate::settings::Settings`] resolved,
/// every default applied.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub iface: String,
    pub listen: SocketAddr,
    /// Serve HTTP/3 on UDP at the `listen` address too.
    pub h3: bool,
    pub endpoint: Option<String>,
    /// The plain-HTTP listener for WebSocket upgrades, if any, and the
    /// path they are taken on.
    pub ws_listen: Option<SocketAddr>,
    pub ws_path: String,
    /// The addresses remote hosts see; empty: the interface's first.
    pub public_addrs: Vec<Ipv4Addr>,
    pub state_dir: PathBuf,
    pub pool: Ipv4Net,
    /// The clients' IPv6 addresses, or none (`--pool6`).
    pub pool6: crate::pool6::Pool6,
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
    /// The IPv6 prefixes of `--allow` and `--deny`.
    pub allow6: Vec<ipnet::Ipv6Net>,
    pub deny6: Vec<ipnet::Ipv6Net>,
    /// The address remote hosts see over IPv6 (`--public6`); `None`: the
    /// WAN interface's first global IPv6 address.
    pub public6: Option<std::net::Ipv6Addr>,
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
    /// Worker threads for tunnels; `None`: one per CPU.
    pub threads: Option<u16>,
    /// Queues of the TUN device, each with its reader; `None`: one per
    /// worker thread.
    pub tun_queues: Option<u16>,
    /// How long to busy-poll after each packet (zero: never).
    pub busy_poll: Duration,
    /// Where the WAN's first checks run; `None`: picked for the
    /// interface's driver ([`crate::datapath::WanFilter::for_driver`]).
    pub wan_filter: Option<crate::datapath::WanFilter>,
    /// The GRO stage in front of the TUN device; `None`: there when the
    /// WAN does no GRO ([`crate::gro_stage::wanted`]).
    pub gro_stage: Option<crate::gro_stage::StageSetting>,
    /// Upstream resolvers of the DNS service clients get on the gateway's
    /// pool address; empty: the nameservers of the gateway's own
    /// /etc/resolv.conf.
    pub dns: Vec<std::net::IpAddr>,
    /// The port forwarding rules file, if any.
    pub forward: Option<PathBuf>,
    /// Established forwarded TCP connections one remote address may hold at once.
    pub max_forward_per_source: u32,
    /// The operator's certificate chain and key files (`--cert`, `--key`);
    /// `None`: the gateway's own.
    pub operator_cert: Option<(PathBuf, PathBuf)>,
    /// Which flows of one client socket share a NAT port.
    pub mapping: crate::nat::Mapping,
    /// TTL and IP ID normalisation of outgoing packets.
    pub normalize: veil_common::normalize::Normalize,
    /// Default rate limit and quota of every client.
    pub fair_use: crate::ratelimit::FairUse,
    /// Where strangers are proxied to; `None`: the built-in page.
    pub fallback: Option<SocketAddr>,
    pub fallback_page: Option<PathBuf>,
    /// The revocation list several gateways share (a file, or an
    /// http(s):// URL), if any: see [`revocations`].
    pub revocations: Option<String>,
}

/// The TUN device's MTU, and the largest IP packet a client may send.
pub const MTU: u16 = 1400;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TLS handshake may take while the handshake places are not
/// crowded: nginx's `ssl_handshake_timeout`, so that when a silent or slow
/// stranger is cut off does not tell veil from a web server. Crowded (a
/// quarter of the places taken, `Admission::crowded`), a new connection
/// gets [`HANDSHAKE_TIMEOUT`]: places then matter more than looks.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// A client that sends nothing (not even a keepalive) for this long is
/// dead. veil clients announce their PING interval and get twice that
/// instead; this is for clients that do not.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);
const GC_INTERVAL: Duration = Duration::from_secs(10);
/// Flows read per hold of the flow-table lock during a sweep or a status.
const GC_SLICE: usize = 1024;

/// Deletes `keys` from the flow table behind `table`, [`GC_SLICE`] at a
/// time: a client's new flow, which waits for the lock, waits for one
/// slice at most, not for thousands of map deletions.
fn delete_in_slices<T, K, E>(
    table: &Mutex<T>,
    keys: &[K],
    delete: impl Fn(&mut T, &K) -> Result<bool, E>,
) -> Result<(), E> {
    keys.chunks(GC_SLICE).try_for_each(|slice| {
        let mut table = table.lock().expect("flow table lock");
        slice
            .iter()
            .try_for_each(|key| delete(&mut table, key).map(drop))
    })
}
const REGISTRY_INTERVAL: Duration = Duration::from_secs(1);
/// A client that takes none of our bytes for this long has stopped reading:
/// its session ends (the kernel's TCP_USER_TIMEOUT would end the connection
/// later; this frees the session, its queue and its socket now).
const WRITE_STALL: Duration = Duration::from_secs(15);
/// How long closing a connection may take (the last bytes, close_notify).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Bytes of replies a session takes off its queue for one write, at most
/// (the rest wait there, bounded, instead of in the write buffer); the
/// session's send buffer, kept between writes, holds that many.
const OUT_HIGH_WATER: usize = veil_proto::session::batch_bytes(veil_tunnel::tun::MAX_READ);
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
    /// HTTP/3 datagrams for clients dropped by every session's transport.
    pub datagrams: Arc<veil_tunnel::quic::DatagramDrops>,
    pub no_session: AtomicU64,
    /// Client packets the TUN device refused (a failed write).
    pub tun_write_failed: AtomicU64,
    /// Packets one client sent to another (`--allow-client-to-client`).
    pub client_to_client: AtomicU64,
    /// DNS queries to the gateway's resolver service: taken, answered,
    /// answered with SERVFAIL (no upstream in time), and refused (not a
    /// standard query, or too many in flight).
    pub dns_queries: AtomicU64,
    pub dns_answered: AtomicU64,
    pub dns_failed: AtomicU64,
    pub dns_refused: AtomicU64,
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

/// The state every task shares.
struct Shared {
    cfg: GatewayConfig,
    /// What every client packet is checked against.
    checks: Checks,
    /// The DNS service, if the gateway has upstreams for it.
    resolver: Option<Arc<dns::Resolver>>,
    tun: tun_queues::TunQueues,
    /// The GRO stage, if the gateway has one.
    stage: Option<gro_stage::StageWatch>,
    flows: Mutex<FlowTable>,
    /// The flows that exist, read without `flows`' lock by every client
    /// packet ([`crate::flows::KnownFlows`]).
    known_flows: crate::flows::KnownFlows<veil_common::FlowKey>,
    state: StateDir,
    clients: Mutex<Clients>,
    /// Client address -> its session's packet queue: the reply hot path.
    sessions: RwLock<HashMap<Ipv4Addr, ReplySender>>,
    /// Caps on connections that have not authenticated yet.
    admission: Admission,
    /// The same caps on connections the fallback site serves (no client
    /// certificate): apart, so that its visitors, or a prober parked on
    /// it for hours, take no place from clients' handshakes.
    visitors: Admission,
    /// The same caps on connections a reverse proxy relays
    /// (`--ws-listen`): apart, so that a flood through the proxy takes no
    /// place from clients reaching the listeners directly; per client as
    /// the proxy names it ([`veil_tunnel::ws::relayed_for`]).
    relayed: Admission,
    registry: RwLock<HashMap<String, ClientRecord>>,
    counters: Counters,
    /// Taken at shutdown: dropping it detaches the programs and unpins.
    datapath: Mutex<Option<Datapath>>,
    /// Port forwarding (`--forward`), if configured.
    forwarding: Option<Arc<forward::Forwarding>>,
    /// What connections without a client certificate get.
    fallback: fallback::Fallback,
    /// Each limited client's token buckets and quota in the datapath.
    rate_limits: Mutex<crate::ratelimit::RateLimits>,
    /// Whether any client is limited (`rate_limits`' own flag, read
    /// without its lock).
    anyone_limited: Arc<std::sync::atomic::AtomicBool>,
    /// NAT66, when the gateway carries IPv6 ([`packets6`]).
    v6: Option<packets6::V6>,
    counters6: packets6::Counters6,
    /// The shared revocation list (`--revocations`), if any.
    revocations: Option<revocations::Revocations>,
    /// Saves new leases, in groups.
    lease_writer: leases::LeaseWriter,
    /// Kept buffers for the largest replies.
    big: bigbuf::BigBuffers,
}

/// Runs the gateway until `shutdown` resolves.
pub async fn run(cfg: GatewayConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    trim::large_blocks_on_their_own_pages();
    preflight::check(&cfg.iface, cfg.nat_ports)?;
    veil_tunnel::busy::start(cfg.busy_poll);
    let stage_off = cfg.gro_stage == Some(StageSetting::Off);
    for advice in preflight::advice(&cfg.iface, stage_off) {
        warn!("{advice}");
    }
    // Bound first: a port in use is the most common start-up failure.
    let listener = veil_tunnel::net::listener_socket(cfg.listen, socket2::Type::STREAM)
        .and_then(|s| TcpListener::from_std(s.into()))
        .with_context(|| {
        format!(
            "listening on {} (another veil-user or a web server on that port? pick one with --listen)",
            cfg.listen
        )
    })?;
    let ws_listener = match cfg.ws_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
            format!("listening for WebSocket upgrades on {addr} (pick another with --ws-listen)")
        })?),
        None => None,
    };
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
    let (cert, key, operator) = server_identity(&cfg, &state, &ca)?;
    let tls_config = tls::server_config(&ca.cert_pem, &cert, &key)?;
    let quic = match cfg.h3 {
        true => Some(h3::endpoint(cfg.listen, tls_config.clone())?),
        false => None,
    };
    let acceptor = TlsAcceptor::from(Arc::new(tls_config));
    let fallback = fallback::Fallback::from_settings(cfg.fallback, cfg.fallback_page.as_deref())
        .context("reading --fallback-page")?;

    let public_addrs = public_addrs(&cfg)?;
    let endpoint = cfg
        .endpoint
        .clone()
        .unwrap_or_else(|| format!("{}:{}", public_addrs[0], cfg.listen.port()));
    state.record_gateway(&endpoint, operator)?;
    let inner_addr = first_host(cfg.pool)?;
    check_pool(cfg.pool, &cfg.tun_name)?;

    let queues = cfg
        .tun_queues
        .map_or_else(tun_queues::default_queues, usize::from);
    let tun = tun_queues::TunQueues::create(&cfg.tun_name, MTU, queues)
        .with_context(|| format!("creating the TUN device {}", cfg.tun_name))?;
    tun.set_queue_len(veil_tunnel::tun::GATEWAY_QUEUE_LEN)
        .context("setting the TUN device's queue length")?;
    let max_flows = u32::try_from(cfg.max_flows)
        .ok()
        .filter(|n| *n > 0)
        .context("--max-flows must be between 1 and 4294967295")?;
    let stage = gro_stage(&cfg.iface, tun.name(), cfg.gro_stage)?;
    let mut datapath = Datapath::load_sized(max_flows)?;
    if tun.len() > 1 {
        tun.steer(datapath.tun_steering()?)
            .context("giving the TUN device its steering program")?;
    }
    datapath.configure(&DatapathConfig {
        public_addrs: public_addrs.clone(),
        vip_pool: cfg.pool,
        nat_ports: cfg.nat_ports,
        wan_ifindex: ifindex(&cfg.iface)
            .with_context(|| format!("interface {} not found", cfg.iface))?,
        tun_ifindex: ifindex(tun.name())?,
        tun_l2_len: 0,
        wan_filter: wan_filter(&cfg.iface, cfg.wan_filter),
        gro_stage: stage.as_ref().map(GroStage::near_ifindex),
        fwd_per_source: cfg.max_forward_per_source,
    })?;
    datapath.normalize(cfg.normalize)?;
    let pins = datapath.pin(&cfg.pin_root)?;
    let datapath_log = datapath.logger(log::logger())?;
    let flows = datapath
        .flow_table(cfg.nat_ports, cfg.timeouts)?
        .with_capacity(cfg.max_flows)
        .with_client_limit(cfg.max_flows_per_client)
        .with_mapping(cfg.mapping);
    let flows = match cfg.forward {
        Some(_) => flows,
        None => flows.without_forwarding(),
    };
    let flows = match cfg.max_ports_per_endpoint {
        Some(share) => flows.with_port_share(share.get()),
        None => flows,
    };
    let forwarding = match &cfg.forward {
        Some(path) => Some(Arc::new(forward::Forwarding::new(
            path.clone(),
            // The packet path's handle first: the forwarder takes the map.
            {
                let replies = datapath.forward_replies()?;
                (datapath.forwarder(cfg.timeouts)?, replies)
            },
            crate::forward::Gateway {
                own: crate::forward::own_addrs()
                    .into_iter()
                    .chain(public_addrs.iter().copied())
                    .chain([inner_addr])
                    .collect(),
                pool: cfg.pool,
                nat_ports: cfg.nat_ports,
                tun_ifindex: ifindex(tun.name())?,
            },
            ifindex(&cfg.iface)?,
            (ifindex(tun.name())?, inner_addr),
        ))),
        None => None,
    };
    let rate_limits = datapath.rate_limits()?;
    let policy = EgressPolicy::new(
        public_addrs.iter().copied().chain([inner_addr]).collect(),
        cfg.pool,
        cfg.client_to_client,
        cfg.allow.clone(),
        cfg.deny.clone(),
    );
    let v6 = packets6::V6::setup(&cfg, &mut datapath, inner_addr, &policy)?;
    datapath.attach(&cfg.iface, tun.name())?;
    if let Some(stage) = &stage {
        datapath.attach_gro_stage(stage.far())?;
    }

    let upstreams = dns_upstreams(&cfg);
    let leases = state.leases()?;
    let places = handshake_cap(&cfg)?;
    let admission = Admission::new(places, cfg.max_handshakes_per_source);
    let shared = Arc::new(Shared {
        checks: Checks {
            policy,
            pool: cfg.pool,
            gateway: inner_addr,
            dns: !upstreams.is_empty(),
        },
        resolver: (!upstreams.is_empty()).then(|| dns::Resolver::new(upstreams.clone())),
        tun,
        stage: stage.as_ref().map(GroStage::watch),
        known_flows: flows.known(),
        flows: Mutex::new(flows),
        clients: Mutex::new(Clients::with_leases(leases)),
        sessions: RwLock::new(HashMap::new()),
        registry: RwLock::new(HashMap::new()),
        visitors: Admission::new(places, cfg.max_handshakes_per_source),
        relayed: Admission::new(places, cfg.max_handshakes_per_source),
        admission,
        counters: Counters::default(),
        fallback,
        anyone_limited: rate_limits.anyone_limited(),
        rate_limits: Mutex::new(rate_limits),
        v6,
        counters6: Default::default(),
        datapath: Mutex::new(Some(datapath)),
        forwarding,
        lease_writer: Default::default(),
        big: Default::default(),
        revocations: cfg.revocations.clone().map(|source| {
            revocations::Revocations::new(revocations::Source::parse(&source), ca.cert_pem.clone())
        }),
        state,
        cfg,
    });
    shared.reload_registry()?;
    if let Some(list) = &shared.revocations {
        revocations::first_read(list).await;
    }
    if let Some(fwd) = &shared.forwarding {
        fwd.load(&shared.datapath, &|name| shared.lease_of(name))?;
    }
    info!(
        iface = %shared.cfg.iface, public_addrs = ?public_addrs, listen = %shared.cfg.listen,
        ws_listen = ?shared.cfg.ws_listen.map(|a| format!("{a}{}", shared.cfg.ws_path)), %endpoint,
        pool = %shared.cfg.pool, nat_ports = %shared.cfg.nat_ports, mapping = %shared.cfg.mapping,
        pins = %pins.display(), tun_queues = shared.tun.len(),
        dns = ?upstreams, "gateway up"
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
    for queue in 0..shared.tun.len() {
        tasks.spawn(packets::tun_reader(shared.clone(), queue));
    }
    tasks.spawn(flow_gc(shared.clone()));
    tasks.spawn(registry::watch(shared.clone()));
    tasks.spawn(revocations::watch(shared.clone()));
    tasks.spawn(leases::writer(shared.clone()));
    tasks.spawn(trim::watch(shared.clone()));
    tasks.spawn(watch_gro_stage(shared.clone()));
    tasks.spawn(forward_datapath_log(datapath_log));
    if let Some(fwd) = shared.forwarding.clone() {
        tasks.spawn(forward::watch(shared.clone(), fwd));
    }
    if let Some(listener) = ws_listener {
        let path = shared.cfg.ws_path.as_str().into();
        tasks.spawn(ws::accept_loop(
            shared.clone(),
            listener,
            path,
            acceptor.clone(),
            stopped.clone(),
        ));
    }
    if let Some(quic) = quic {
        tasks.spawn(h3::accept_loop(shared.clone(), quic, stopped.clone()));
    }
    let accept = accept::accept_loop(shared.clone(), listener, acceptor, stopped);
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

/// The server certificate and key (PEM) the listener presents: the
/// operator's (`--cert`, `--key`), with the name and pin profiles get, or
/// the gateway's own.
fn server_identity(
    cfg: &GatewayConfig,
    state: &StateDir,
    ca: &crate::state::Ca,
) -> Result<(String, String, Option<crate::state::OperatorIdentity>)> {
    let Some((cert_path, key_path)) = &cfg.operator_cert else {
        let (cert, key) = state
            .server_identity(ca)
            .context("loading the server certificate")?;
        return Ok((cert, key, None));
    };
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let (cert, key) = (read(cert_path)?, read(key_path)?);
    let server_name = tls::dns_names_pem(&cert)
        .with_context(|| format!("reading the certificate {}", cert_path.display()))?
        .into_iter()
        .next()
        .with_context(|| {
            format!(
                "the certificate {} names no DNS name: profiles need one to check it",
                cert_path.display()
            )
        })?;
    let pin = tls::spki_pin_pem(&cert)?;
    Ok((
        cert,
        key,
        Some(crate::state::OperatorIdentity { server_name, pin }),
    ))
}

/// The GRO stage, if the operator asked for it or the WAN does no GRO
/// (logged either way). A stage that cannot be made stops the gateway only
/// if it was asked for: without it, replies are read one by one.
fn gro_stage(iface: &str, tun: &str, setting: Option<StageSetting>) -> Result<Option<GroStage>> {
    let wan_gro = crate::net::gro_enabled(iface);
    if !gro_stage::wanted(setting, &wan_gro) {
        info!(%iface, wan_gro = ?wan_gro.ok(), setting = ?setting, "no GRO stage: replies go straight to the TUN device");
        return Ok(None);
    }
    let made = crate::net::mtu(iface)
        .with_context(|| format!("reading the MTU of {iface}"))
        .and_then(|mtu| Ok(GroStage::create(tun, mtu)?));
    match made {
        Ok(stage) => {
            let why = match setting {
                Some(_) => "as configured",
                None => "the WAN does no GRO",
            };
            info!(
                %iface, near = stage.near(), far = stage.far(),
                "GRO stage in ({why}): the kernel merges replies in front of the TUN device"
            );
            Ok(Some(stage))
        }
        Err(e) if setting.is_none() => {
            warn!("no GRO stage: {e:#}; replies reach the TUN device unmerged (`--gro-stage off` silences this)");
            Ok(None)
        }
        Err(e) => Err(e).context("--gro-stage on"),
    }
}

/// The WAN filter the operator named, or the one for the interface's
/// driver (XDP if the driver cannot be read), logged either way.
fn wan_filter(iface: &str, named: Option<WanFilter>) -> WanFilter {
    if let Some(filter) = named {
        info!(%iface, %filter, "WAN filter as configured");
        return filter;
    }
    match crate::net::driver(iface) {
        Ok(driver) => {
            let filter = WanFilter::for_driver(&driver);
            info!(%iface, %driver, %filter, "WAN filter picked for the interface's driver");
            filter
        }
        Err(e) => {
            warn!(
                %iface,
                "could not read the interface's driver ({e}): the WAN filter runs in XDP; \
                 `--wan-filter tc` or `xdp` chooses"
            );
            WanFilter::Xdp
        }
    }
}

/// `--max-handshakes`, lowered if the descriptor limit could not hold it
/// once for each pool (handshakes, visitors of the fallback site, relayed
/// handshakes with `--ws-listen`) beside `--max-clients` sessions and the
/// daemon's own files.
fn handshake_cap(cfg: &GatewayConfig) -> Result<usize> {
    let limit = crate::net::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    let sessions = cfg.max_clients as u64;
    let pools = if cfg.ws_listen.is_some() { 3 } else { 2 };
    let room = limit.saturating_sub(sessions + FD_RESERVE) / pools;
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

/// The DNS service's upstreams: `--dns`, or the gateway's own resolvers.
/// None found: no service (and none announced), with a warning.
fn dns_upstreams(cfg: &GatewayConfig) -> Vec<SocketAddr> {
    if !cfg.dns.is_empty() {
        return cfg.dns.iter().map(|ip| SocketAddr::new(*ip, 53)).collect();
    }
    let found = std::fs::read_to_string("/etc/resolv.conf")
        .map(|text| crate::dns::nameservers(&text))
        .unwrap_or_default();
    if found.is_empty() {
        warn!("no nameserver in /etc/resolv.conf and no --dns: clients get no DNS service from the gateway");
    }
    found
}

/// A regular file, read only up to `max` bytes: a file that grew huge costs
/// the gateway no more memory than it may take, and a FIFO or a device
/// (which could block the read for good, or never end) is refused. Opened
/// without blocking and checked through the handle: what is read is what
/// was checked.
pub(super) fn read_bounded(path: &std::path::Path, max: usize) -> Result<Vec<u8>> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        bail!("not a regular file");
    }
    let mut bytes = Vec::new();
    file.take(max as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > max {
        bail!("larger than {max} bytes");
    }
    Ok(bytes)
}

/// Refuses a client pool that holds an address of the gateway's own
/// (other than on its TUN device, `tun`, left from a run before): the
/// datapath drops packets from the WAN to pool addresses as forged, so
/// the gateway would go deaf on that address (a `pool = "0.0.0.0/0"`
/// typo on all of them).
fn check_pool(pool: Ipv4Net, tun: &str) -> Result<()> {
    let own = crate::forward::ifaces().into_iter().flat_map(|(_, name)| {
        let addrs = crate::net::iface_ipv4s(&name).unwrap_or_default();
        addrs.into_iter().map(move |a| (name.clone(), a))
    });
    match pool_holds_own(pool, tun, own) {
        Some((name, addr)) => bail!(
            "the client pool {pool} holds {addr}, an address of {name}: packets to it from \
             the WAN would be dropped as forged; pick a pool of addresses the gateway does not use"
        ),
        None => Ok(()),
    }
}

/// The first of `own` (interface, address) inside `pool`, but for `tun`'s.
fn pool_holds_own(
    pool: Ipv4Net,
    tun: &str,
    own: impl IntoIterator<Item = (String, Ipv4Addr)>,
) -> Option<(String, Ipv4Addr)> {
    own.into_iter()
        .find(|(name, addr)| name != tun && pool.contains(*addr))
}

fn first_host(pool: Ipv4Net) -> Result<Ipv4Addr> {
    if pool.prefix() > 30 {
        bail!("the pool {pool} is too small: it needs the gateway's address and clients'");
    }
    Ok(Ipv4Addr::from_bits(pool.addr().to_bits() + 1))
}

/// How often the gateway checks that its GRO stage is still there.
const STAGE_CHECK: Duration = Duration::from_secs(1);

/// Watches the GRO stage. Replies sent into a stage that was deleted or
/// set down would be lost without a count, so once it is, replies go
/// straight to the TUN device (unmerged) until the gateway restarts and
/// makes a new one.
async fn watch_gro_stage(shared: Arc<Shared>) -> Result<()> {
    let Some(stage) = &shared.stage else {
        // No stage, nothing to watch (a task that ends stops the gateway).
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(STAGE_CHECK);
    let why = loop {
        tick.tick().await;
        if let Err(why) = stage.check() {
            break why;
        }
    };
    if let Some(datapath) = shared.datapath.lock().expect("datapath lock").as_mut() {
        datapath
            .bypass_gro_stage()
            .context("sending replies around the lost GRO stage")?;
    }
    stage.set_lost();
    warn!(
        near = stage.near(),
        "GRO stage lost ({why}): replies go straight to the TUN device, unmerged, until the gateway restarts"
    );
    // A task that ends stops the gateway.
    std::future::pending().await
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
            let expired = expired + shared.v6_flows_gc(now)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_regular_file_is_read_and_only_so_far() {
        let dir = std::env::temp_dir().join(format!("veil-read-bounded-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("rules");
        std::fs::write(&file, b"12345").unwrap();
        assert_eq!(read_bounded(&file, 5).unwrap(), b"12345");
        let err = read_bounded(&file, 4).unwrap_err();
        assert!(err.to_string().contains("larger than 4 bytes"), "{err}");
        // A FIFO nobody writes to would block the read for good.
        let fifo = dir.join("fifo");
        let path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let err = read_bounded(&fifo, 4).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        assert!(read_bounded(std::path::Path::new("/dev/zero"), 4).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_pool_holding_an_address_of_the_gateway_is_refused() {
        let own = || {
            [
                ("lo", Ipv4Addr::LOCALHOST),
                ("eth0", Ipv4Addr::new(198, 18, 0, 1)),
                ("veilgw", Ipv4Addr::new(10, 77, 0, 1)),
            ]
            .map(|(n, a)| (n.to_string(), a))
        };
        let pool = |p: &str| p.parse::<Ipv4Net>().unwrap();
        assert_eq!(pool_holds_own(pool("10.77.0.0/16"), "veilgw", own()), None);
        assert_eq!(
            pool_holds_own(pool("0.0.0.0/0"), "veilgw", own()),
            Some(("lo".into(), Ipv4Addr::LOCALHOST)),
            "a typo that takes every address"
        );
        assert_eq!(
            pool_holds_own(pool("198.18.0.0/24"), "veilgw", own()),
            Some(("eth0".into(), Ipv4Addr::new(198, 18, 0, 1)))
        );
    }
}
