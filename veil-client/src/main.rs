//! `veil-client --profile FILE`: sends this machine's traffic through a
//! veil gateway.
//!
//! It connects, creates the TUN device `veil0` with the address the gateway
//! assigns, and routes everything (or the `--route` ranges) into it. When
//! the tunnel breaks it reconnects with backoff, keeping the TUN device and
//! the routes, so applications see a pause rather than an error. On exit
//! (SIGINT, SIGTERM, SIGHUP, a fatal error) the routing table is restored.
//!
//! Nothing leaks outside the tunnel meanwhile (docs/client.md): a kill
//! switch (`firewall`) installed before the first connection, routing
//! rules that no local route can override (`rules`), a reconnect as soon
//! as the uplink changes (`watch`), and one client per network namespace
//! (`instance`).

mod firewall;
mod instance;
mod routes;
mod rules;
mod uplink;
mod watch;

use std::{
    net::{Ipv4Addr, SocketAddr, ToSocketAddrs},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};
use veil_proto::{
    gso::VnetHdr,
    session::{coalesce, ClientConfig, ClientSession, Output},
};
use veil_tunnel::{
    net::{self, Ipv4Net},
    profile::Profile,
    stream::{sleep_until_some, Event, Stream},
    tls, tun,
};

use crate::{
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
    /// The TUN device to create.
    #[arg(long, default_value = "veil0", value_name = "NAME")]
    tun: String,
    #[arg(long, default_value_t = 1400)]
    mtu: u16,
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

const CONNECT_TIMEOUT: Duration = Duration::from_millis(2500);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Packets read from the TUN device per TLS write, at most.
const TUN_BATCH: usize = 64;
/// ...and at most this many bytes of them: with offload one read can be a
/// 64 KiB super-packet, and a huge write only delays what follows it.
const TUN_BATCH_BYTES: usize = 256 * 1024;
/// Unwritten bytes above which the TUN device is left unread.
const OUT_HIGH_WATER: usize = 512 * 1024;
/// A gateway that takes none of our bytes for this long is gone: reconnect.
const WRITE_STALL: Duration = Duration::from_secs(15);
/// How long closing the connection may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

fn main() -> Result<()> {
    veil_tunnel::init_logging();
    let cli = Cli::parse();
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

/// `--unlock`: takes back what a lockdown, or a client killed with
/// SIGKILL, left in force.
fn unlock() -> Result<()> {
    let _instance = instance::claim().map_err(|e| match e {
        instance::Error::Busy => anyhow::anyhow!(
            "a veil-client is running in this network namespace: stop it instead \
             (without --lockdown its exit removes the kill switch)"
        ),
        e => e.into(),
    })?;
    rules::clear();
    if firewall::remove().context("removing the kill switch")? {
        info!("kill switch removed: traffic leaves directly again");
    } else {
        info!("no kill switch was in force");
    }
    Ok(())
}

async fn run(cli: Cli, profile: Profile) -> Result<()> {
    let _instance = instance::claim()?;
    let (config, server_name) = tls::client_config(&profile)?;
    let connector = TlsConnector::from(Arc::new(config));
    let gateway = resolve(&profile.endpoint)?;
    let SocketAddr::V4(endpoint) = gateway else {
        unreachable!("resolved to IPv4")
    };
    let routes: Vec<Ipv4Net> = if cli.routes.is_empty() {
        FULL_TUNNEL
            .iter()
            .map(|r| r.parse().expect("valid"))
            .collect()
    } else {
        cli.routes.clone()
    };

    // Fail closed from here on: the kill switch and the routing rules are
    // in force before the first connection and until this function
    // returns (dropped in reverse order: the network, the rules, then
    // the kill switch).
    let lan = allowed_lan(&cli, gateway);
    let mut firewall = Firewall::install(Policy {
        tun: cli.tun.clone(),
        endpoint,
        ranges: (!cli.routes.is_empty()).then(|| routes.clone()),
        lan: lan.clone(),
        lockdown: cli.lockdown,
    })
    .context("installing the kill switch")?;
    let mut rules = Rules::install(*endpoint.ip(), lan_v4(&lan))
        .context("installing the routing rules: is iproute2 installed?")?;
    info!(
        lockdown = cli.lockdown,
        allow_lan = cli.allow_lan,
        "kill switch on"
    );
    let mut watch = Watch::new(gateway);

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
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        let tunnel = Tunnel {
            cli: &cli,
            connector: &connector,
            server_name: server_name.clone(),
            gateway,
            routes: &routes,
        };
        match tunnel.run(&mut network, &mut stopped, &mut watch).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is::<Fatal>() => return Err(e),
            Err(e) if e.is::<Moved>() => {
                info!("the uplink changed: reconnecting");
                backoff = BACKOFF_MIN;
            }
            Err(e) => {
                if started.elapsed() > BACKOFF_MAX {
                    backoff = BACKOFF_MIN;
                }
                warn!("tunnel down: {e:#}; reconnecting in {backoff:?}");
                let from = uplink::source_for(gateway);
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
        if cli.allow_lan {
            let lan = allowed_lan(&cli, gateway);
            if let Err(e) = firewall.set_lan(lan.clone()) {
                warn!("updating the kill switch for the new LAN: {e}");
            }
            if let Err(e) = rules.set_lan(lan_v4(&lan)) {
                warn!("updating the routing rules for the new LAN: {e:#}");
            }
        }
    }
}

/// `--allow-lan`'s networks now (none when the uplink is unknown).
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

fn lan_v4(lan: &Option<Lan>) -> &[Ipv4Net] {
    lan.as_ref().map_or(&[], |l| &l.v4)
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

fn resolve(endpoint: &str) -> Result<SocketAddr> {
    endpoint
        .to_socket_addrs()
        .with_context(|| format!("resolving the gateway {endpoint}"))?
        .find(SocketAddr::is_ipv4)
        .with_context(|| format!("the gateway {endpoint} has no IPv4 address"))
}

/// A packet read from the TUN device (offload header first), into the
/// session; returns its size.
fn from_tun(session: &mut ClientSession, joined: &[u8]) -> usize {
    match VnetHdr::split(joined) {
        Ok((hdr, packet)) => session.send_offload_packet(&hdr, packet),
        Err(e) => debug!("dropped a packet from the TUN device: {e}"),
    }
    joined.len()
}

struct Tunnel<'a> {
    cli: &'a Cli,
    connector: &'a TlsConnector,
    server_name: tokio_rustls::rustls::pki_types::ServerName<'static>,
    gateway: SocketAddr,
    routes: &'a [Ipv4Net],
}

impl Tunnel<'_> {
    /// One connection, until it breaks (`Err`) or we are told to stop.
    async fn run(
        &self,
        network: &mut Option<Network>,
        stopped: &mut tokio::sync::watch::Receiver<bool>,
        uplink: &mut Watch,
    ) -> Result<()> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.gateway))
            .await
            .with_context(|| format!("connecting to {} timed out", self.gateway))?
            .with_context(|| format!("connecting to {}", self.gateway))?;
        let local = tcp.local_addr().ok().map(|a| a.ip());
        net::tune_tunnel_socket(&tcp, net::TUNNEL_LOWAT);
        let mut tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            self.connector
                .connect(self.server_name.clone(), tls::buffered(tcp)),
        )
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake")?;

        tls.get_mut().0.grow(tls::TUNNEL_READ_BUFFER);
        let mut stream = Stream::new(tls);

        let keepalive = Duration::from_secs(self.cli.keepalive);
        let mut session = ClientSession::new(
            ClientConfig {
                keepalive_interval: keepalive,
                // Bounded by the parser; saturating all the same, since a
                // panic here would take the whole client down.
                keepalive_timeout: keepalive.saturating_mul(3),
                handshake_timeout: HANDSHAKE_TIMEOUT,
                offload: !self.cli.no_offload,
                ..ClientConfig::new(self.gateway.to_string())
            },
            Instant::now(),
        )?;
        let mut net_buf = vec![0u8; 64 * 1024];
        let mut tun_buf = vec![0u8; tun::MAX_READ];
        loop {
            while let Some(output) = session.poll_output() {
                match output {
                    Output::Send(bytes) => {
                        session.recycle_send_buffer(coalesce(stream.out_mut(), bytes))
                    }
                    Output::Packet(packet) => {
                        if let Some(net) = network {
                            let _ = net.tun.send(&VnetHdr::NONE, &packet);
                        }
                    }
                    Output::OffloadPacket(joined) => {
                        if let Some(net) = network {
                            let _ = net.tun.send_joined(&joined);
                        }
                    }
                    Output::Assigned { addr, .. } => self.assigned(network, addr)?,
                    Output::Routes(_) => {}
                    Output::Close { reason } => {
                        stream.close(CLOSE_TIMEOUT).await;
                        bail!("{reason}");
                    }
                }
            }
            let deadline = session
                .poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            let stall = stream.stalled_since().map(|since| since + WRITE_STALL);
            // The TUN device is read only while the gateway takes what we
            // already have: the kernel's queue holds the rest, bounded.
            let room = stream.pending() < OUT_HIGH_WATER;
            let tun_read = async {
                match network {
                    Some(net) if room => net.tun.recv(&mut tun_buf).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                event = stream.next(&mut net_buf, true) => {
                    match event.context("the connection to the gateway")? {
                        Event::Read(0) => bail!("the gateway closed the connection"),
                        Event::Read(n) => session.receive(&net_buf[..n], Instant::now())?,
                        Event::Wrote => {}
                    }
                }
                read = tun_read => {
                    let n = read.context("reading the TUN device")?;
                    let mut batch = from_tun(&mut session, &tun_buf[..n]);
                    // Whatever else is waiting goes in the same TLS write.
                    if let Some(net) = network {
                        for _ in 0..TUN_BATCH {
                            if batch >= TUN_BATCH_BYTES {
                                break;
                            }
                            match net.tun.try_recv(&mut tun_buf)? {
                                Some(n) => batch += from_tun(&mut session, &tun_buf[..n]),
                                None => break,
                            }
                        }
                    }
                }
                () = tokio::time::sleep_until(deadline) => session.handle_timeout(Instant::now()),
                () = sleep_until_some(stall) => {
                    bail!("the gateway read nothing for {}s", WRITE_STALL.as_secs())
                }
                _ = uplink.moved(local) => return Err(Moved.into()),
                _ = stopped.changed() => {
                    stream.close(CLOSE_TIMEOUT).await;
                    return Ok(());
                }
            }
        }
    }

    fn assigned(&self, network: &mut Option<Network>, addr: Ipv4Addr) -> Result<()> {
        match network {
            Some(net) if net.addr == addr => Ok(()),
            Some(net) => Err(Fatal(format!(
                "the gateway assigned {addr} after {}: restart the client",
                net.addr
            ))
            .into()),
            None => {
                *network = Some(
                    Network::up(&self.cli.tun, self.cli.mtu, addr, self.routes)
                        .map_err(|e| Fatal(format!("{e:#}")))?,
                );
                info!(%addr, gateway = %self.gateway, "connected");
                Ok(())
            }
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
