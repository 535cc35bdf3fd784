//! Reaching the gateway, as each endpoint of the profile says
//! ([`Endpoint`]):
//!
//! - `HOST:PORT`: TCP to the gateway, the tunnel's TLS on it;
//! - `wss://HOST[:PORT]/PATH`: TCP to a web server or CDN in front of the
//!   gateway, the website's TLS (SNI HOST, checked against the profile's
//!   `endpoint_ca` or else the system's roots), a WebSocket upgrade on PATH
//!   (`Host: HOST`), and the tunnel's TLS inside it, end to end.
//!
//! Either way what comes out is the tunnel's TLS stream, for the same
//! session and pump: nothing past this module knows the difference.
//!
//! A host name with both IPv6 and IPv4 addresses is dialed with happy
//! eyeballs (RFC 8305): the addresses interleaved by family, IPv6 first,
//! a new attempt started every [`ATTEMPT_DELAY`] (or as soon as one fails)
//! while earlier ones continue, the first connection taken.

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{
    rustls::{self, pki_types::ServerName},
    TlsConnector,
};
use tracing::warn;
use veil_tunnel::{
    net,
    profile::{Endpoint, Profile},
    tls::{self, BufferedTcp},
    ws::{self, WsStream},
};

use crate::{CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT};

/// An endpoint of the profile and the addresses its first hop (the
/// gateway, or the web server) resolved to, in the order they are tried.
pub struct Target {
    pub addrs: Vec<SocketAddr>,
    endpoint: Endpoint,
}

impl Target {
    /// The address tried first: the one followed while nothing is
    /// connected.
    pub fn primary(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// A `wss://` endpoint: a web server, reached only over TCP.
    pub fn is_websocket(&self) -> bool {
        matches!(self.endpoint, Endpoint::WebSocket { .. })
    }
}

/// The endpoint did not take the connection in time (or refused it): the
/// next one is tried at once.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unanswered(pub String);

/// What the tunnel's TLS runs on.
pub enum Carrier {
    Tcp(BufferedTcp),
    WebSocket(Box<WsStream<tokio_rustls::client::TlsStream<BufferedTcp>>>),
}

/// The tunnel's TLS stream, whatever carries it.
pub type TunnelTls = tokio_rustls::client::TlsStream<Carrier>;

/// How to reach the gateway: the tunnel's TLS, and the websites' for
/// `wss://` endpoints.
pub struct Dialer {
    tunnel: TlsConnector,
    server_name: ServerName<'static>,
    /// The same identity and trust for HTTP/3.
    quic: quinn::ClientConfig,
    /// Built only if the profile has a `wss://` endpoint.
    web: Option<TlsConnector>,
    /// The firewall mark of the connection to the gateway
    /// (`--redirect-rules` lets it pass: [`crate::redirect::MARK`]).
    pub mark: Option<u32>,
}

impl Dialer {
    pub fn new(profile: &Profile) -> Result<Self> {
        let (config, server_name) = tls::client_config(profile)?;
        let websocket = profile.endpoints.iter().any(|e| e.starts_with("wss://"));
        let web = websocket
            .then(|| web_tls(profile.endpoint_ca.as_deref()))
            .transpose()?;
        Ok(Self {
            quic: crate::h3::client_config(&config)?,
            tunnel: TlsConnector::from(Arc::new(config)),
            server_name,
            web,
            mark: None,
        })
    }

    /// The QUIC client configuration, for HTTP/3 to the gateway.
    pub fn quic(&self) -> &quinn::ClientConfig {
        &self.quic
    }

    /// Connects to `target` (happy eyeballs over its addresses) and runs
    /// the TLS handshakes (and the WebSocket upgrade) up to the tunnel's;
    /// also the local address the connection left from and the address it
    /// went to. A first hop that takes the TCP connection at none of its
    /// addresses is [`Unanswered`].
    pub async fn dial(&self, target: &Target) -> Result<(TunnelTls, Option<IpAddr>, SocketAddr)> {
        let connect = |addr: SocketAddr| async move {
            match tokio::time::timeout(CONNECT_TIMEOUT, crate::redirect::dial(addr, self.mark))
                .await
            {
                Ok(Ok(tcp)) => Ok(tcp),
                Ok(Err(e)) => Err(anyhow::anyhow!("connecting to {addr}: {e}")),
                Err(_) => Err(anyhow::anyhow!(
                    "connecting to {addr} timed out after {CONNECT_TIMEOUT:?}"
                )),
            }
        };
        let (tcp, gateway) = happy_eyeballs(&target.addrs, ATTEMPT_DELAY, connect)
            .await
            .map_err(|e| Unanswered(format!("{e:#}")))?;
        // Where it left from: another address later means another uplink.
        let local = tcp.local_addr().ok().map(|a| a.ip());
        net::tune_tunnel_socket(&tcp, net::TUNNEL_LOWAT);
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshakes(target, tcp))
            .await
            .context("the handshake timed out")??;
        Ok((tls, local, gateway))
    }

    async fn handshakes(&self, target: &Target, tcp: TcpStream) -> Result<TunnelTls> {
        let carrier = match &target.endpoint {
            Endpoint::Tcp(_) => Carrier::Tcp(tls::buffered(tcp)),
            Endpoint::WebSocket { host, .. } => {
                let web = self.web.as_ref().expect("built for wss:// endpoints");
                let name = ServerName::try_from(host.clone())
                    .with_context(|| format!("`{host}` is not a valid server name"))?;
                let mut tcp = tls::buffered(tcp);
                // The web server's stream reads in large pieces from the
                // start: it is no stranger's.
                tcp.grow(tls::TUNNEL_READ_BUFFER);
                let https = web
                    .connect(name, tcp)
                    .await
                    .with_context(|| format!("TLS handshake with the web server {host}"))?;
                let url = target.endpoint.url().expect("a WebSocket endpoint");
                let ws = ws::connect(https, &url)
                    .await
                    .with_context(|| format!("WebSocket upgrade at {url}"))?;
                Carrier::WebSocket(Box::new(ws))
            }
        };
        let mut tls = self
            .tunnel
            .connect(self.server_name.clone(), carrier)
            .await
            .context("TLS handshake")?;
        if let Carrier::Tcp(tcp) = tls.get_mut().0 {
            tcp.grow(tls::TUNNEL_READ_BUFFER);
        }
        Ok(tls)
    }
}

/// The website's TLS as a browser's: the profile's endpoint CA, or the
/// system's roots (rustls-native-certs: what the machine trusts, kept up to
/// date by its packages, an organisation's own CA included).
fn web_tls(endpoint_ca: Option<&str>) -> Result<TlsConnector> {
    let roots = match endpoint_ca {
        Some(pem) => tls::roots(pem).context("the profile's endpoint CA")?,
        None => tls::system_roots()
            .context("the web server's certificate is checked against the system's roots (or issue the profile with --endpoint-ca)")?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Every endpoint's first hop, in the profile's order; one that does not
/// parse or resolve is skipped (with a warning) as long as one does.
pub fn resolve_all(endpoints: &[String]) -> Result<Vec<Target>> {
    let mut found = Vec::new();
    for endpoint in endpoints {
        match resolve(endpoint) {
            Ok(target) => found.push(target),
            Err(e) if endpoints.len() > 1 => warn!("{e:#}: skipped"),
            Err(e) => return Err(e),
        }
    }
    if found.is_empty() {
        bail!("no endpoint of the profile resolves");
    }
    Ok(found)
}

fn resolve(text: &str) -> Result<Target> {
    let endpoint = Endpoint::parse(text).map_err(anyhow::Error::msg)?;
    let first_hop = endpoint.address();
    let found: Vec<SocketAddr> = first_hop
        .to_socket_addrs()
        .with_context(|| format!("resolving the gateway {first_hop}"))?
        .collect();
    if found.is_empty() {
        bail!("the gateway {first_hop} has no address");
    }
    Ok(Target {
        addrs: interleave(found),
        endpoint,
    })
}

/// RFC 8305's Connection Attempt Delay: how long one attempt has alone
/// before the next address is tried beside it.
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// The order addresses are tried in (RFC 8305 §4): families alternating,
/// IPv6 first, each family in the resolver's order; duplicates once.
pub fn interleave(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let mut unique = Vec::new();
    for a in addrs {
        if !unique.contains(&a) {
            unique.push(a);
        }
    }
    let (v6, v4): (Vec<_>, Vec<_>) = unique.into_iter().partition(SocketAddr::is_ipv6);
    let (mut v6, mut v4) = (v6.into_iter(), v4.into_iter());
    let mut out = Vec::new();
    loop {
        match (v6.next(), v4.next()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

/// Happy eyeballs (RFC 8305 §5): `connect` to `addrs` in order, starting
/// the next attempt after `delay` or as soon as the last one failed,
/// earlier attempts continuing; the first success wins (the others are
/// dropped, which closes them) with the address it reached. Fails with
/// the last error once every attempt has.
pub async fn happy_eyeballs<T, Fut>(
    addrs: &[SocketAddr],
    delay: Duration,
    connect: impl Fn(SocketAddr) -> Fut,
) -> Result<(T, SocketAddr)>
where
    Fut: Future<Output = Result<T>>,
{
    let mut next = addrs.iter();
    let mut attempts = FuturesUnordered::new();
    let mut last_error = None;
    loop {
        if let Some(&addr) = next.next() {
            let attempt = connect(addr);
            attempts.push(async move { (attempt.await, addr) });
        }
        if attempts.is_empty() {
            return Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no address to connect to")));
        }
        let more = next.len() > 0;
        tokio::select! {
            Some((result, addr)) = attempts.next() => match result {
                Ok(conn) => return Ok((conn, addr)),
                Err(e) => last_error = Some(e),
            },
            () = tokio::time::sleep(delay), if more => {}
        }
    }
}

impl AsyncRead for Carrier {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Carrier::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Carrier::WebSocket(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Carrier {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Carrier::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Carrier::WebSocket(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Carrier::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Carrier::WebSocket(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Carrier::Tcp(s) => s.is_write_vectored(),
            Carrier::WebSocket(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Carrier::Tcp(s) => Pin::new(s).poll_flush(cx),
            Carrier::WebSocket(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Carrier::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Carrier::WebSocket(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_websocket_endpoint_resolves_to_its_web_server() {
        let t = resolve("wss://127.0.0.1/veil").unwrap();
        assert_eq!(t.addrs, ["127.0.0.1:443".parse().unwrap()]);
        let t = resolve("127.0.0.1:8443").unwrap();
        assert_eq!(t.addrs, ["127.0.0.1:8443".parse().unwrap()]);
        let t = resolve("[2001:2::1]:443").unwrap();
        assert_eq!(t.addrs, ["[2001:2::1]:443".parse().unwrap()]);
        assert!(resolve("ws://127.0.0.1/veil").is_err());
        let found = resolve_all(&["nonsense".into(), "wss://127.0.0.2:8443/v".into()]).unwrap();
        assert_eq!(found.len(), 1, "the bad one skipped");
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn families_alternate_ipv6_first() {
        let got = interleave(addrs(&[
            "192.0.2.1:443",
            "192.0.2.2:443",
            "[2001:db8::1]:443",
            "192.0.2.1:443",
            "192.0.2.3:443",
        ]));
        assert_eq!(
            got,
            addrs(&[
                "[2001:db8::1]:443",
                "192.0.2.1:443",
                "192.0.2.2:443",
                "192.0.2.3:443"
            ])
        );
    }

    /// Attempts that answer (or fail) after the given delays.
    fn after(
        outcomes: &[(&str, u64, bool)],
    ) -> impl Fn(SocketAddr) -> Pin<Box<dyn Future<Output = Result<SocketAddr>>>> {
        let outcomes: Vec<(SocketAddr, u64, bool)> = outcomes
            .iter()
            .map(|(a, ms, ok)| (a.parse().unwrap(), *ms, *ok))
            .collect();
        move |addr| {
            let (_, ms, ok) = *outcomes.iter().find(|o| o.0 == addr).unwrap();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                match ok {
                    true => Ok(addr),
                    false => Err(anyhow::anyhow!("{addr} refused")),
                }
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_ipv6_address_costs_the_attempt_delay() {
        let start = tokio::time::Instant::now();
        let list = addrs(&["[2001:db8::1]:443", "192.0.2.1:443"]);
        let connect = after(&[
            ("[2001:db8::1]:443", 60_000, true),
            ("192.0.2.1:443", 10, true),
        ]);
        let (conn, addr) = happy_eyeballs(&list, ATTEMPT_DELAY, connect).await.unwrap();
        assert_eq!((conn, addr), (list[1], list[1]));
        assert_eq!(start.elapsed(), ATTEMPT_DELAY + Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_wins_when_it_answers_first_and_a_failure_starts_the_next_at_once() {
        let list = addrs(&["[2001:db8::1]:443", "192.0.2.1:443"]);
        let connect = after(&[("[2001:db8::1]:443", 30, true), ("192.0.2.1:443", 1, true)]);
        let (_, addr) = happy_eyeballs(&list, ATTEMPT_DELAY, connect).await.unwrap();
        assert_eq!(addr, list[0]);

        let start = tokio::time::Instant::now();
        let connect = after(&[("[2001:db8::1]:443", 5, false), ("192.0.2.1:443", 1, true)]);
        let (_, addr) = happy_eyeballs(&list, ATTEMPT_DELAY, connect).await.unwrap();
        assert_eq!(addr, list[1]);
        assert_eq!(start.elapsed(), Duration::from_millis(6));
    }

    #[tokio::test(start_paused = true)]
    async fn every_address_failing_is_the_last_error() {
        let list = addrs(&["[2001:db8::1]:443", "192.0.2.1:443"]);
        let connect = after(&[("[2001:db8::1]:443", 5, false), ("192.0.2.1:443", 1, false)]);
        let e = happy_eyeballs(&list, ATTEMPT_DELAY, connect)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("192.0.2.1:443 refused"), "{e}");
    }
}
