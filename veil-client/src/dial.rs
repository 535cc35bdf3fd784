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

use std::{
    io,
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use anyhow::{bail, Context as _, Result};
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

/// An endpoint of the profile and the address its first hop (the gateway,
/// or the web server) resolved to.
pub struct Target {
    pub addr: SocketAddr,
    endpoint: Endpoint,
}

impl Target {
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

    /// Connects to `target` and runs the TLS handshakes (and the WebSocket
    /// upgrade) up to the tunnel's; also the local address the connection
    /// left from. A first hop that does not take the TCP connection is
    /// [`Unanswered`].
    pub async fn dial(&self, target: &Target) -> Result<(TunnelTls, Option<IpAddr>)> {
        let connect = crate::redirect::dial(target.addr, self.mark);
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                return Err(Unanswered(format!("connecting to {}: {e}", target.addr)).into())
            }
            Err(_) => {
                return Err(Unanswered(format!(
                    "connecting to {} timed out after {CONNECT_TIMEOUT:?}",
                    target.addr
                ))
                .into())
            }
        };
        // Where it left from: another address later means another uplink.
        let local = tcp.local_addr().ok().map(|a| a.ip());
        net::tune_tunnel_socket(&tcp, net::TUNNEL_LOWAT);
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshakes(target, tcp))
            .await
            .context("the handshake timed out")??;
        Ok((tls, local))
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
    let addr = first_hop
        .to_socket_addrs()
        .with_context(|| format!("resolving the gateway {first_hop}"))?
        .find(SocketAddr::is_ipv4)
        .with_context(|| format!("the gateway {first_hop} has no IPv4 address"))?;
    Ok(Target { addr, endpoint })
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
        assert_eq!(t.addr, "127.0.0.1:443".parse().unwrap());
        let t = resolve("127.0.0.1:8443").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8443".parse().unwrap());
        assert!(resolve("ws://127.0.0.1/veil").is_err());
        let found = resolve_all(&["nonsense".into(), "wss://127.0.0.2:8443/v".into()]).unwrap();
        assert_eq!(found.len(), 1, "the bad one skipped");
    }
}
