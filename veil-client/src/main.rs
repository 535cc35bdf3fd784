//! `veil-client --profile FILE`: sends this machine's traffic through a
//! veil gateway.
//!
//! It connects, creates the TUN device `veil0` with the address the gateway
//! assigns, and routes everything (or the `--route` ranges) into it. When
//! the tunnel breaks it reconnects with backoff, keeping the TUN device and
//! the routes, so applications see a pause rather than an error. On exit
//! (SIGINT, SIGTERM, SIGHUP, a fatal error) the routing table is restored.
//!
//! The profile may list several endpoints: one that does not answer within
//! the connect timeout is left for the next. The resolver the gateway
//! announces becomes the system's while connected (see [`dns`]).
//!
//! An endpoint may be a `wss://` URL: the tunnel then runs in a WebSocket
//! through the web server in front of the gateway (see [`dial`]).
//!
//! Nothing leaks outside the tunnel meanwhile (docs/client.md): a kill
//! switch (`firewall`) installed before the first connection, routing
//! rules that no local route can override (`rules`), both letting every
//! endpoint of the profile through so that failover works; a reconnect
//! as soon as the uplink toward the endpoint in use changes (`watch`);
//! and one client per network namespace (`instance`).
//!
//! `--socks` and `--redirect` carry applications' connections without a
//! TUN device, through a user-space TCP/IP stack on the same session
//! (`proxy`, docs/client.md); alone they create no device, change no
//! route, DNS setting or firewall, and need no root.

mod dial;
mod dns;
mod firewall;
mod h3;
mod instance;
mod netstack;
mod proxy;
mod redirect;
mod relay;
mod resolve;
mod routes;
mod rules;
mod socks;
mod uplink;
mod watch;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tracing::{debug, info, warn};
use veil_proto::{
    gro::Coalescer,
    gso::{VnetHdr, VNET_HDR_LEN},
    session::{ClientConfig, ClientSession, Output},
};
use veil_tunnel::{
    net::Ipv4Net,
    profile::Profile,
    pump::{self, End, Limits, Local},
    stream::{Stream, Transport},
    tun,
};

use crate::{
    dial::{Dialer, Target, Unanswered},
    firewall::{Firewall, Policy},
    routes::{Network, FULL_TUNNEL},
    rules::Rules,
    uplink::Lan,
    watch::Watch,
};

#[derive(Parser)]
#[command(
    version,
    about = "veil client: this machine's traffic through a veil gateway"
)]
struct Cli {
    /// The profile `veil-user client add` wrote.
    #[arg(long, value_name = "FILE", required_unless_present = "unlock")]
    profile: Option<PathBuf>,
    /// Send only this range through the tunnel (repeatable); default:
    /// everything.
    #[arg(long = "route", value_name = "CIDR")]
    routes: Vec<Ipv4Net>,
    /// The TUN device to create (default veil0). With --socks or
    /// --redirect, a TUN device is created only when this is given.
    #[arg(long, value_name = "NAME")]
    tun: Option<String>,
    /// Serve SOCKS5 (CONNECT, UDP ASSOCIATE) here, through the tunnel;
    /// alone: no TUN device, no root.
    #[arg(long, value_name = "ADDR")]
    socks: Option<SocketAddr>,
    /// `user:password` lines: SOCKS clients must log in (required when
    /// --socks listens beyond loopback).
    #[arg(long, value_name = "FILE", requires = "socks")]
    socks_users: Option<PathBuf>,
    /// Carry connections the kernel redirected here (nftables/iptables
    /// REDIRECT) through the tunnel, to their original destination.
    #[arg(long, value_name = "ADDR")]
    redirect: Option<SocketAddr>,
    /// Install the redirect rules for --redirect (every TCP connection of
    /// this machine but the client's own), removed on exit.
    #[arg(long, requires = "redirect")]
    redirect_rules: bool,
    #[arg(long, default_value_t = 1400)]
    mtu: u16,
    /// How to reach the gateway: HTTP/3 over UDP (packets in datagrams,
    /// no TCP-over-TCP stalls on a lossy path), TLS over TCP, or `auto`:
    /// HTTP/3 if UDP gets through, TCP otherwise.
    #[arg(long, value_enum, default_value_t = h3::Choice::Auto)]
    transport: h3::Choice,
    /// Do not offer offload datagrams (whole 64 KiB TCP segments with
    /// partial checksums): every packet crosses the tunnel segmented and
    /// checksummed, as with any RFC 9484 peer. For diagnosis; slower.
    #[arg(long)]
    no_offload: bool,
    /// Seconds between keepalives (1 to 3600); the gateway declares the
    /// client dead after twice as long without a word, the client the
    /// gateway after three times.
    #[arg(
        long,
        default_value = "10",
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u64).range(1..=veil_proto::http::MAX_KEEPALIVE.as_secs())
    )]
    keepalive: u64,
    /// Keep polling the tunnel and the TUN device for this many
    /// microseconds after each packet before sleeping: lower round-trip
    /// time for a core kept busy meanwhile [default: 0, off].
    #[arg(long, value_name = "MICROS", default_value = "0")]
    busy_poll: u64,
    /// Leave the system's DNS settings alone (by default they point at the
    /// resolver the gateway announces, reached through the tunnel, and are
    /// restored on exit).
    #[arg(long)]
    no_dns: bool,
    /// Keep the kill switch after the client exits or is killed: nothing
    /// leaves outside the tunnel until `veil-client --unlock`.
    #[arg(long)]
    lockdown: bool,
    /// Let the uplink's private, directly connected networks (the LAN's
    /// printers, file shares) bypass the tunnel; public ranges a local
    /// network claims are never let through.
    #[arg(long)]
    allow_lan: bool,
    /// Remove the kill switch and routing rules a `--lockdown` (or a
    /// client killed with SIGKILL) left behind, and exit.
    #[arg(long, conflicts_with_all = ["profile", "lockdown", "allow_lan", "routes"])]
    unlock: bool,
}

impl Cli {
    /// The TUN device to run, if any: by default, unless only the modes
    /// without one are asked for.
    fn tun(&self) -> Option<&str> {
        match &self.tun {
            Some(name) => Some(name),
            None if self.socks.is_none() && self.redirect.is_none() => Some("veil0"),
            None => None,
        }
    }

    /// Whether this run changes the machine's configuration (and so must
    /// be the namespace's only client).
    fn configures_system(&self) -> bool {
        self.unlock || self.tun().is_some() || self.redirect_rules
    }
}

/// A gateway that has not taken the TCP connection by then (a SYN and one
/// retransmission) is left for the profile's next endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Packets read from the TUN device per TLS write, at most.
const TUN_BATCH: usize = 64;
/// ...and at most this many bytes of them: with offload one read can be a
/// 64 KiB super-packet, and a huge write only delays what follows it; the
/// session's send buffer, kept between writes, holds that many.
const TUN_BATCH_BYTES: usize = veil_proto::session::batch_bytes(veil_tunnel::tun::MAX_READ);
/// How long closing the connection may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

fn main() -> Result<()> {
    veil_tunnel::init_logging();
    let cli = Cli::parse();
    // The namespace is ours before anything in it is touched: a second
    // client must not take back the first one's DNS settings.
    let _instance = if !cli.configures_system() {
        None
    } else if cli.unlock {
        Some(instance::claim().map_err(|e| match e {
            instance::Error::Busy => anyhow::anyhow!(
                "a veil-client is running in this network namespace: stop it instead \
                 (without --lockdown its exit removes the kill switch)"
            ),
            e => e.into(),
        })?)
    } else {
        Some(instance::claim()?)
    };
    // A resolv.conf left by a run that was killed goes back first.
    if cli.configures_system() {
        dns::recover();
    }
    if cli.unlock {
        return unlock();
    }
    let path = cli.profile.as_ref().expect("clap requires --profile");
    let profile =
        Profile::load(path).with_context(|| format!("loading the profile {}", path.display()))?;
    // One connection, one TUN device: a single thread saves the cross-thread
    // wakeups that cost round-trip time (measured: ~460 µs RTT overhead
    // instead of ~800 µs with two workers).
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(cli, profile))
}

/// `--unlock` (the namespace claimed): takes back what a lockdown, or a
/// client killed with SIGKILL, left in force.
fn unlock() -> Result<()> {
    rules::clear();
    if firewall::remove().context("removing the kill switch")? {
        info!("kill switch removed: traffic leaves directly again");
    } else {
        info!("no kill switch was in force");
    }
    Ok(())
}

async fn run(cli: Cli, profile: Profile) -> Result<()> {
    veil_tunnel::busy::start(Duration::from_micros(cli.busy_poll));
    let mut dialer = Dialer::new(&profile)?;
    dialer.mark = cli.redirect_rules.then_some(redirect::MARK);
    let targets = dial::resolve_all(&profile.endpoints)?;
    // Every address of every endpoint, either family: the kill switch and
    // the routing rules let each through, so that happy eyeballs and
    // failover need no change to either.
    let endpoints: Vec<SocketAddr> = targets.iter().flat_map(|t| t.addrs.clone()).collect();
    let routes: Vec<Ipv4Net> = if cli.routes.is_empty() {
        FULL_TUNNEL
            .iter()
            .map(|r| r.parse().expect("valid"))
            .collect()
    } else {
        cli.routes.clone()
    };

    // Which endpoint, and how many in a row did not answer.
    let (mut current, mut unanswered) = (0, 0);

    // The modes without a TUN device, listening before the first
    // connection; stopped (redirect rules removed) when this returns.
    let proxies = proxy::Proxies::start(proxy::Options {
        socks: cli.socks,
        socks_users: cli.socks_users.clone(),
        redirect: cli.redirect,
        redirect_rules: cli.redirect_rules,
        mtu: cli.mtu,
        beside_tun: cli.tun().is_some(),
    })?;
    let stack = proxies.as_ref().map(|p| &p.stack);

    // Fail closed from here on: the kill switch and the routing rules are
    // in force before the first connection and until this function
    // returns (dropped in reverse order: DNS, the network, the rules, then
    // the kill switch). Both let every endpoint through, so that failing
    // over to the next one needs no change to either.
    // Without a TUN device nothing of the machine's is routed or
    // filtered: only what the proxies carry goes through the tunnel.
    let (mut firewall, mut rules) = match cli.tun() {
        Some(tun) => {
            let lan = allowed_lan(&cli, targets[current].primary());
            let firewall = Firewall::install(Policy {
                tun: tun.to_owned(),
                endpoints: endpoints.clone(),
                ranges: (!cli.routes.is_empty()).then(|| routes.clone()),
                lan: lan.clone(),
                lockdown: cli.lockdown,
            })
            .context("installing the kill switch")?;
            let gateway_ips: Vec<IpAddr> = endpoints.iter().map(|e| e.ip()).collect();
            let rules = Rules::install(&gateway_ips, &lan.clone().unwrap_or_default())
                .context("installing the routing rules: is iproute2 installed?")?;
            info!(
                lockdown = cli.lockdown,
                allow_lan = cli.allow_lan,
                endpoints = endpoints.len(),
                "kill switch on"
            );
            (Some(firewall), Some(rules))
        }
        None => (None, None),
    };
    // Follows the endpoint in use (retargeted on failover).
    let mut watch = Watch::new(targets[current].primary());

    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .expect("installing a SIGHUP handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => info!("SIGINT: disconnecting"),
            _ = term.recv() => info!("SIGTERM: disconnecting"),
            _ = hup.recv() => info!("SIGHUP: disconnecting"),
        }
        let _ = stop.send(true);
    });

    // Created on the first address assignment, kept across reconnects,
    // dropped (routes restored) when this function returns.
    let mut network: Option<Network> = None;
    // Declared after `network`, so dropped (restored) before it.
    let mut system_dns: Option<dns::SystemDns> = None;
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        let gateway = targets[current].primary();
        watch.follow(gateway);
        let mut tunnel = Tunnel {
            cli: &cli,
            dialer: &dialer,
            target: &targets[current],
            quic_name: &profile.server_name,
            gateway,
            routes: &routes,
            stack,
        };
        match tunnel
            .run(&mut network, &mut system_dns, &mut stopped, &mut watch)
            .await
        {
            Ok(()) => return Ok(()),
            Err(e) if e.is::<Fatal>() => return Err(e),
            Err(e) if e.is::<Moved>() => {
                // The same endpoint again, over the new uplink.
                info!("the uplink changed: reconnecting");
                unanswered = 0;
                backoff = BACKOFF_MIN;
            }
            Err(e) if e.is::<Unanswered>() => {
                // Straight on to the next endpoint; the backoff only once
                // every one of them was tried.
                current = (current + 1) % targets.len();
                unanswered += 1;
                if unanswered < targets.len() {
                    warn!("{e:#}; trying the next endpoint");
                    continue;
                }
                unanswered = 0;
                warn!("{e:#}; no endpoint answered, retrying in {backoff:?}");
                let from = uplink::source_for(targets[current].primary());
                watch.follow(targets[current].primary());
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    // A new uplink is worth trying at once.
                    _ = watch.moved(from) => info!("the uplink changed: reconnecting"),
                    _ = stopped.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(e) => {
                unanswered = 0;
                if started.elapsed() > BACKOFF_MAX {
                    backoff = BACKOFF_MIN;
                }
                warn!("tunnel down: {e:#}; reconnecting in {backoff:?}");
                let from = uplink::source_for(tunnel.gateway);
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    // A new uplink is worth trying at once.
                    _ = watch.moved(from) => info!("the uplink changed: reconnecting"),
                    _ = stopped.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        // The LAN may be another one now.
        if let (true, Some(firewall), Some(rules)) = (cli.allow_lan, &mut firewall, &mut rules) {
            let lan = allowed_lan(&cli, targets[current].primary());
            if let Err(e) = firewall.set_lan(lan.clone()) {
                warn!("updating the kill switch for the new LAN: {e}");
            }
            if let Err(e) = rules.set_lan(&lan.unwrap_or_default()) {
                warn!("updating the routing rules for the new LAN: {e:#}");
            }
        }
    }
}

/// `--allow-lan`'s networks now, on the uplink toward `gateway` (none
/// when that uplink is unknown).
fn allowed_lan(cli: &Cli, gateway: SocketAddr) -> Option<Lan> {
    let SocketAddr::V4(gw) = gateway else {
        return None;
    };
    cli.allow_lan.then(|| {
        uplink::lan(*gw.ip()).unwrap_or_else(|e| {
            warn!("finding the local network: {e:#}; none allowed for now");
            Lan::default()
        })
    })
}

/// The connection left from an address the machine no longer prefers
/// for the gateway: reconnect now, not after a timeout.
#[derive(Debug, thiserror::Error)]
#[error("the uplink changed")]
struct Moved;

/// An error reconnecting cannot fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Fatal(String);

/// A packet read from the TUN device (offload header first), into the
/// session; returns its size.
fn from_tun(session: &mut ClientSession, joined: &[u8]) -> usize {
    match VnetHdr::split(joined) {
        Ok((hdr, packet)) => session.send_offload_packet(&hdr, packet),
        Err(e) => debug!("dropped a packet from the TUN device: {e}"),
    }
    joined.len()
}

/// What a session's client side borrows from the connect loop.
type Sides<'a> = (
    &'a mut Option<Network>,
    &'a mut Option<dns::SystemDns>,
    &'a mut tokio::sync::watch::Receiver<bool>,
    &'a mut Watch,
);

struct Tunnel<'a> {
    cli: &'a Cli,
    dialer: &'a Dialer,
    target: &'a Target,
    /// The name QUIC checks the gateway's certificate against.
    quic_name: &'a str,
    /// The first hop of the endpoint this connection goes to (the others
    /// are reachable outside the tunnel too: see `rules`): its first
    /// address, then the one happy eyeballs connected to.
    gateway: SocketAddr,
    routes: &'a [Ipv4Net],
    /// The user-space stack of `--socks` and `--redirect`.
    stack: Option<&'a netstack::Netstack>,
}

impl Tunnel<'_> {
    /// One connection, until it breaks (`Err`) or we are told to stop.
    async fn run(
        &mut self,
        network: &mut Option<Network>,
        system_dns: &mut Option<dns::SystemDns>,
        stopped: &mut tokio::sync::watch::Receiver<bool>,
        uplink: &mut Watch,
    ) -> Result<()> {
        let quic = async {
            let connect = |addr| {
                h3::connect(
                    self.dialer.quic(),
                    addr,
                    self.quic_name,
                    CONNECT_TIMEOUT,
                    HANDSHAKE_TIMEOUT,
                    self.cli.mtu,
                )
            };
            dial::happy_eyeballs(&self.target.addrs, dial::ATTEMPT_DELAY, connect)
                .await
                .map(|(h3, _)| h3)
                .map_err(|e| Unanswered(format!("{e:#}")).into())
        };
        let tcp = async {
            let (tls, local, gateway) = self.dialer.dial(self.target).await?;
            Ok((Stream::new(tls), local, gateway))
        };
        // A wss:// endpoint is a web server's: only the WebSocket reaches
        // the gateway through it.
        let choice = match self.target.is_websocket() {
            true => h3::Choice::Tcp,
            false => self.cli.transport,
        };
        let dialed = h3::dial(choice, quic, tcp).await?;
        self.gateway = match &dialed {
            h3::Dialed::Tcp((_, _, gateway)) => *gateway,
            h3::Dialed::H3(h3) => h3.gateway,
        };
        uplink.follow(self.gateway);
        let transport = match self.target.is_websocket() {
            true => "websocket",
            false => dialed.name(),
        };
        info!(gateway = %self.gateway, "transport up: {transport}");
        let keepalive = Duration::from_secs(self.cli.keepalive);
        let config = ClientConfig {
            keepalive_interval: keepalive,
            // Bounded by the parser; saturating all the same, since a
            // panic here would take the whole client down.
            keepalive_timeout: keepalive.saturating_mul(3),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            offload: !self.cli.no_offload,
            ..ClientConfig::new(self.gateway.to_string())
        };
        let sides = (network, system_dns, stopped, uplink);
        match dialed {
            h3::Dialed::Tcp((stream, local, _)) => {
                let session = ClientSession::new(config, Instant::now())?;
                self.pump(session, stream, local, None, sides).await
            }
            h3::Dialed::H3(h3) => {
                let h3::H3 {
                    transport,
                    stream_id,
                    endpoint,
                    mut driver,
                    ..
                } = *h3;
                let session = ClientSession::new_h3(config, Instant::now(), stream_id)?;
                let local = uplink::source_for(self.gateway);
                let pump = self.pump(session, transport, local, Some(endpoint.clone()), sides);
                let end = driver.beside(pump).await;
                driver.beside(endpoint.wait_idle()).await;
                end
            }
        }
    }

    /// The session over `transport` until it ends.
    async fn pump<T: Transport>(
        &self,
        mut session: ClientSession,
        mut transport: T,
        local: Option<IpAddr>,
        migrate: Option<quinn::Endpoint>,
        (network, system_dns, stopped, uplink): Sides<'_>,
    ) -> Result<()> {
        let mut side = ClientSide {
            tunnel: self,
            network,
            system_dns,
            stopped,
            uplink,
            local,
            migrate,
            tun_buf: vec![0u8; tun::MAX_READ],
            gro: Coalescer::new(),
        };
        let mut net_buf = vec![0u8; 64 * 1024];
        let end = pump::run(
            &mut session,
            &mut transport,
            &mut side,
            LIMITS,
            &mut net_buf,
        )
        .await;
        if let Some(net) = side.network.as_ref() {
            // The gateway's last packets, if the coalescer still held some.
            side.gro.flush(|hdr, packet| {
                let _ = net.tun.send(hdr, packet);
            });
            // Packets lost at the TUN device so far, both ways.
            let (refused, overflowed) = (net.tun.write_failures(), net.tun.queue_drops());
            if refused + overflowed > 0 {
                info!(
                    "TUN device: {refused} packets from the gateway refused, \
                     {overflowed} toward it dropped (its queue full)"
                );
            }
        }
        match end {
            End::Local(Ended::Stop) => {
                transport.close(CLOSE_TIMEOUT).await;
                Ok(())
            }
            End::Local(Ended::Moved) => Err(Moved.into()),
            End::Local(Ended::Failed(e)) => Err(e),
            End::Closed(reason) => {
                transport.close(CLOSE_TIMEOUT).await;
                bail!("{reason}")
            }
            End::PeerClosed => bail!("the gateway closed the connection"),
            End::Failed(e) => Err(e).context("the connection to the gateway"),
            End::Stalled => bail!(
                "the gateway read nothing for {}s",
                LIMITS.write_stall.as_secs()
            ),
        }
    }

    /// The gateway's resolver becomes the system's (unless `--no-dns`):
    /// kept across reconnects while the announcement stays the same.
    fn dns_announced(
        &self,
        network: &Option<Network>,
        system_dns: &mut Option<dns::SystemDns>,
        configs: &[veil_proto::capsule::DnsConfiguration],
    ) {
        let plan = dns::Plan::from_announcement(configs);
        // Names the proxies are given are resolved there too, always.
        if let Some(stack) = self.stack {
            stack.set_resolvers(plan.as_ref().map(|p| p.servers.clone()).unwrap_or_default());
        }
        let (false, Some(net)) = (self.cli.no_dns, network) else {
            return;
        };
        if system_dns.as_ref().map(|d| d.plan()) == plan.as_ref() {
            return;
        }
        // The old settings go back before new ones are made.
        *system_dns = None;
        if let Some(plan) = plan {
            match dns::SystemDns::apply(net.tun.name(), plan) {
                Ok(applied) => *system_dns = Some(applied),
                Err(e) => warn!("pointing the system at the gateway's resolver: {e:#}"),
            }
        }
    }

    fn assigned(&self, network: &mut Option<Network>, addr: Ipv4Addr) -> Result<()> {
        if let Some(stack) = self.stack {
            // The stack's connections are bound to the address.
            stack.assign(addr).map_err(|old| {
                Fatal(format!(
                    "the gateway assigned {addr} after {old}: restart the client"
                ))
            })?;
        }
        let Some(tun) = self.cli.tun() else {
            info!(%addr, gateway = %self.gateway, "connected");
            return Ok(());
        };
        match network {
            Some(net) if net.addr == addr => Ok(()),
            // Another gateway (failover), another slice of addresses.
            Some(net) => {
                net.readdress(addr).map_err(|e| Fatal(format!("{e:#}")))?;
                info!(%addr, gateway = %self.gateway, "connected");
                Ok(())
            }
            None => {
                *network = Some(
                    Network::up(tun, self.cli.mtu, addr, self.routes)
                        .map_err(|e| Fatal(format!("{e:#}")))?,
                );
                info!(%addr, gateway = %self.gateway, "connected");
                Ok(())
            }
        }
    }
}

impl Tunnel<'_> {
    /// The gateway carries IPv6: the TUN device gets `addr` and, for a full
    /// tunnel, IPv6's routes, so that the kill switch's IPv6 block becomes
    /// IPv6 through the tunnel. Without a TUN device (`--socks`,
    /// `--redirect` alone) the proxies carry IPv4 only.
    fn assigned6(&self, network: &mut Option<Network>, addr: Ipv6Addr) -> Result<()> {
        let Some(net) = network else {
            return Ok(());
        };
        match net.addr6 {
            Some(old) if old == addr => Ok(()),
            // Another gateway (failover), another slice of addresses.
            Some(_) => net
                .readdress6(addr)
                .map_err(|e| Fatal(format!("{e:#}")).into()),
            None => {
                net.carry_ipv6(addr, self.cli.routes.is_empty())
                    .map_err(|e| Fatal(format!("{e:#}")))?;
                info!(%addr, "IPv6 through the tunnel");
                Ok(())
            }
        }
    }
}

/// How much the client buffers: it always reads the gateway, and a gateway
/// that takes nothing for 15 s is gone. (The TUN device is read only once
/// what was read before is written; the kernel's queue, bounded by TCP
/// small queues, holds the rest.)
const LIMITS: Limits = Limits {
    read_limit: usize::MAX,
    write_stall: Duration::from_secs(15),
};

/// The client's side of a session: the TUN device and the machine's
/// network configuration.
struct ClientSide<'a> {
    tunnel: &'a Tunnel<'a>,
    network: &'a mut Option<Network>,
    /// The system's resolver configuration while the gateway's applies.
    system_dns: &'a mut Option<dns::SystemDns>,
    stopped: &'a mut tokio::sync::watch::Receiver<bool>,
    /// The uplink toward the endpoint in use, and the local address this
    /// connection left from.
    uplink: &'a mut Watch,
    local: Option<IpAddr>,
    /// Over HTTP/3: the endpoint whose socket moves to a new uplink (QUIC
    /// connection migration) instead of reconnecting.
    migrate: Option<quinn::Endpoint>,
    tun_buf: Vec<u8>,
    /// Plain packets from the gateway (over HTTP/3 every packet is one),
    /// merged per flow into super-packets: one TUN write for a run of
    /// segments rather than one each.
    gro: Coalescer,
}

/// Why the client's side ended a connection.
enum Ended {
    /// Told to stop (SIGINT, SIGTERM, SIGHUP).
    Stop,
    /// The uplink changed: reconnect at once ([`Moved`]).
    Moved,
    /// Something failed here: reconnect, unless it is [`Fatal`].
    Failed(anyhow::Error),
}

impl Local<ClientSession> for ClientSide<'_> {
    type End = Ended;

    fn output(&mut self, session: &mut ClientSession, output: Output) -> Result<(), Ended> {
        match output {
            Output::Packet(packet) => return self.packet(session, &packet),
            Output::OffloadPacket(joined) => match self.tunnel.stack {
                Some(stack) if stack.wants(joined.get(VNET_HDR_LEN..).unwrap_or_default()) => {
                    stack.deliver(joined, true)
                }
                _ => {
                    if let Some(net) = self.network {
                        let _ = net.tun.send_joined(&joined);
                    }
                }
            },
            Output::Assigned { addr, .. } => self
                .tunnel
                .assigned(self.network, addr)
                .map_err(Ended::Failed)?,
            Output::Assigned6 { addr, .. } => self
                .tunnel
                .assigned6(self.network, addr)
                .map_err(Ended::Failed)?,
            Output::Dns(configs) => {
                self.tunnel
                    .dns_announced(self.network, self.system_dns, &configs)
            }
            _ => {}
        }
        Ok(())
    }

    fn packet(&mut self, _: &mut ClientSession, packet: &[u8]) -> Result<(), Ended> {
        match self.tunnel.stack {
            Some(stack) if stack.wants(packet) => stack.deliver(packet.to_vec(), false),
            _ => {
                if let Some(net) = self.network {
                    self.gro.push_plain(packet, |hdr, packet| {
                        let _ = net.tun.send(hdr, packet);
                    });
                }
            }
        }
        Ok(())
    }

    async fn next(&mut self, session: &mut ClientSession, room: bool) -> Result<(), Ended> {
        let Self {
            tunnel,
            network,
            stopped,
            uplink,
            local,
            migrate,
            tun_buf,
            gro,
            ..
        } = self;
        // What the last turn's packets left in the coalescer goes out now,
        // before waiting.
        if let Some(net) = network {
            gro.flush(|hdr, packet| {
                let _ = net.tun.send(hdr, packet);
            });
        }
        // Packets sent before the session is up would be lost: they wait.
        let up = session.is_established();
        let stack_out = async {
            match tunnel.stack {
                Some(stack) if room && up => stack.outgoing().await,
                _ => std::future::pending().await,
            }
        };
        let tun_read = async {
            match network {
                Some(net) if room => net.tun.recv(tun_buf).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            read = tun_read => {
                let failed = |e: std::io::Error| Ended::Failed(anyhow::Error::new(e).context("reading the TUN device"));
                let n = read.map_err(failed)?;
                let mut batch = from_tun(session, &tun_buf[..n]);
                // Whatever else is waiting goes in the same TLS write.
                if let Some(net) = network {
                    for _ in 0..TUN_BATCH {
                        if batch >= TUN_BATCH_BYTES {
                            break;
                        }
                        match net.tun.try_recv(tun_buf).map_err(failed)? {
                            Some(n) => batch += from_tun(session, &tun_buf[..n]),
                            None => break,
                        }
                    }
                }
                Ok(())
            }
            now = uplink.moved(*local) => match migrate {
                Some(endpoint) => {
                    h3::migrate(endpoint).map_err(Ended::Failed)?;
                    info!("the uplink changed: the QUIC connection moves with it");
                    *local = Some(now);
                    Ok(())
                }
                None => Err(Ended::Moved),
            },
            () = stack_out => {
                if let Some(stack) = tunnel.stack {
                    stack.drain_into(session, TUN_BATCH_BYTES);
                }
                Ok(())
            }
            _ = stopped.changed() => Err(Ended::Stop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(keepalive: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from([
            "veil-client",
            "--profile",
            "p.veil",
            "--keepalive",
            keepalive,
        ])
    }

    #[test]
    fn keepalive_is_bounded_when_parsed() {
        for bad in ["0", "3601", "6148914691236517206", "18446744073709551615"] {
            let err = parse(bad).err().unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(err.to_string().contains("1..=3600"), "{bad}: {err}");
        }
        assert_eq!(parse("3600").expect("the longest").keepalive, 3600);
        assert_eq!(parse("1").expect("the shortest").keepalive, 1);
    }
}
