//! Which transport a connection takes: HTTP/3 (QUIC on UDP), TLS over TCP,
//! or, by default, HTTP/3 given a short head start and TCP raced against
//! it after that, as browsers do, so that a network that drops UDP costs
//! a fraction of a second, not a timeout.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use tracing::debug;
use veil_tunnel::quic::{self, QuicTransport};

/// `--transport`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// HTTP/3 when UDP gets through, TLS over TCP otherwise.
    #[default]
    Auto,
    /// HTTP/3 only: packets in QUIC datagrams, no TCP-over-TCP stalls.
    H3,
    /// TLS over TCP only.
    Tcp,
}

/// How long HTTP/3 has on its own before TCP starts racing it: a QUIC
/// handshake and the HTTP/3 setup take one or two round trips.
pub const HEAD_START: Duration = Duration::from_millis(300);

/// An HTTP/3 connection ready for its session: the transport and the
/// request stream's id.
pub struct H3 {
    pub transport: QuicTransport,
    pub stream_id: u64,
    /// The endpoint, which owns the UDP socket (kept with the connection).
    pub endpoint: quinn::Endpoint,
    /// The gateway's address this connection reached.
    pub gateway: SocketAddr,
    /// The endpoint's and the connection's drivers, for the task that
    /// runs the session.
    pub driver: quic::Driver,
}

/// What a connection attempt ended with.
pub enum Dialed<T> {
    H3(Box<H3>),
    Tcp(T),
}

impl<T> Dialed<T> {
    pub fn name(&self) -> &'static str {
        match self {
            Dialed::H3(_) => "h3",
            Dialed::Tcp(_) => "tcp",
        }
    }
}

/// The QUIC client configuration from the profile's TLS one.
pub fn client_config(tls: &rustls::ClientConfig) -> Result<quinn::ClientConfig> {
    Ok(quic::client_config(tls.clone())?)
}

/// A QUIC connection to `gateway` (its handshake within `connect`, as a
/// silent endpoint is given up on over TCP), then the HTTP/3 control
/// streams and the request stream within `setup`.
pub async fn connect(
    config: &quinn::ClientConfig,
    gateway: SocketAddr,
    server_name: &str,
    connect: Duration,
    setup: Duration,
    mtu: u16,
) -> Result<H3> {
    let socket = quic::udp_socket(any_port_of(gateway)).context("opening a UDP socket")?;
    // quinn's drivers, the endpoint's (receiving) and the connection's,
    // run in the task that uses the connection (quic::Driver): here, then
    // in the session's pump.
    let (endpoint, mut driver) = quic::Driver::capture(|| {
        quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            Arc::new(quic::Runtime),
        )
    });
    let endpoint = endpoint?;
    let connecting =
        driver.capture_more(|| endpoint.connect_with(config.clone(), gateway, server_name))?;
    let ready = async {
        let conn = tokio::time::timeout(connect, connecting)
            .await
            .map_err(|_| anyhow::anyhow!("no QUIC answer from {gateway} within {connect:?}"))?
            .context("QUIC handshake")?;
        let attempt = async {
            let control = quic::control(&conn).await?;
            quic::check_peer(&conn, &control.settings, true)?;
            let (send, recv, stream_id) = quic::open_request(&conn).await?;
            Ok::<_, anyhow::Error>((control, send, recv, stream_id))
        };
        let (control, send, recv, stream_id) =
            tokio::time::timeout(setup, attempt).await.map_err(|_| {
                anyhow::anyhow!("HTTP/3 setup with {gateway} timed out after {setup:?}")
            })??;
        wait_for_path_mtu(&conn, mtu).await;
        Ok::<_, anyhow::Error>((conn, control, send, recv, stream_id))
    };
    let (conn, control, send, recv, stream_id) = driver.beside(ready).await?;
    Ok(H3 {
        // Nothing shows them on the client yet; the gateway counts its own.
        transport: QuicTransport::new(conn, control, send, recv, Default::default()),
        stream_id,
        endpoint,
        gateway,
        driver,
    })
}

/// How long the client waits for QUIC's path MTU discovery to make room
/// for a full TUN packet before it carries traffic anyway.
const PATH_MTU_WAIT: Duration = Duration::from_secs(1);

/// Waits (briefly) until a datagram holds a packet of the TUN's `mtu`:
/// a connection starts at QUIC's minimum (1200 bytes) and discovers the
/// path's within a few round trips. Until then a larger packet would be
/// fragmented or refused with ICMP, and a single large UDP datagram sent
/// in that window lost.
async fn wait_for_path_mtu(conn: &quinn::Connection, mtu: u16) {
    // Quarter Stream ID and context ID: one byte each on stream 0.
    let want = usize::from(mtu) + 2;
    let deadline = tokio::time::Instant::now() + PATH_MTU_WAIT;
    while conn.max_datagram_size().is_some_and(|max| max < want)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    debug!(max_datagram = ?conn.max_datagram_size(), "path MTU");
}

/// Moves `endpoint` to a fresh UDP socket, which leaves from the new
/// uplink: QUIC connection migration keeps the connection, its session
/// and every flow through it.
pub fn migrate(endpoint: &quinn::Endpoint) -> Result<()> {
    let family = endpoint.local_addr().context("the QUIC socket's address")?;
    let socket = quic::udp_socket(any_port_of(family)).context("opening a UDP socket")?;
    endpoint
        .rebind(socket)
        .context("moving the QUIC connection to the new uplink")
}

/// Any local address and port of `addr`'s family: a UDP socket toward an
/// IPv6 gateway must be an IPv6 one.
fn any_port_of(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// Dials as `choice` says: `h3` and `tcp` alone, `auto` HTTP/3 first and
/// then both at once, the first to succeed taken (the other dropped).
pub async fn dial<T>(
    choice: Choice,
    h3: impl Future<Output = Result<H3>>,
    tcp: impl Future<Output = Result<T>>,
) -> Result<Dialed<T>> {
    match choice {
        Choice::H3 => Ok(Dialed::H3(Box::new(h3.await?))),
        Choice::Tcp => Ok(Dialed::Tcp(tcp.await?)),
        Choice::Auto => {
            tokio::pin!(h3);
            tokio::pin!(tcp);
            let h3_failed = tokio::select! {
                r = &mut h3 => match r {
                    Ok(c) => return Ok(Dialed::H3(Box::new(c))),
                    Err(e) => e,
                },
                () = tokio::time::sleep(HEAD_START) => {
                    tokio::select! {
                        r = &mut h3 => match r {
                            Ok(c) => return Ok(Dialed::H3(Box::new(c))),
                            Err(e) => e,
                        },
                        r = &mut tcp => match r {
                            Ok(c) => return Ok(Dialed::Tcp(c)),
                            // TCP failed: HTTP/3 may still come.
                            Err(tcp_failed) => {
                                debug!("TCP failed first: {tcp_failed:#}");
                                return Ok(Dialed::H3(Box::new(h3.await.map_err(|e| {
                                    tcp_failed.context(format!("and HTTP/3: {e:#}"))
                                })?)));
                            }
                        },
                    }
                }
            };
            debug!("HTTP/3 failed: {h3_failed:#}; TCP then");
            Ok(Dialed::Tcp(tcp.await?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn never<T>() -> Result<T> {
        std::future::pending().await
    }

    #[tokio::test(start_paused = true)]
    async fn auto_takes_tcp_after_the_head_start_when_udp_is_silent() {
        let started = tokio::time::Instant::now();
        let tcp = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(7)
        };
        let got = dial(Choice::Auto, never(), tcp).await.unwrap();
        assert!(matches!(got, Dialed::Tcp(7)));
        assert_eq!(started.elapsed(), HEAD_START + Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn auto_falls_to_tcp_at_once_when_h3_fails() {
        let h3 = async { Err(anyhow::anyhow!("no UDP")) };
        let got = dial(Choice::Auto, h3, async { Ok(1) }).await.unwrap();
        assert!(matches!(got, Dialed::Tcp(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn only_means_only() {
        let failed = dial::<u8>(Choice::H3, async { Err(anyhow::anyhow!("x")) }, async {
            Ok(1)
        })
        .await;
        assert!(failed.is_err());
        let tcp = dial(Choice::Tcp, never(), async { Ok(2) }).await.unwrap();
        assert!(matches!(tcp, Dialed::Tcp(2)));
    }
}
