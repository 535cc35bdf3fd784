//! The WebSocket listener (`--ws-listen`): plain HTTP, for a web server or
//! CDN that ends the website's TLS to proxy one path (`--ws-path`) to.
//! An upgrade on that path becomes a WebSocket, and inside it the same
//! connection as on the TLS listener ([`super::accept`]): the tunnel's
//! own mutual TLS, end to end, then CONNECT-IP. The proxy sees neither the
//! client's certificate nor its packets.
//!
//! Every connection here comes from the proxy: the caps on handshakes
//! apply to them in a pool of their own (a flood through the proxy leaves
//! the direct listeners' places alone), per client as the proxy names it
//! in `X-Forwarded-For` (or `X-Real-IP`) once the upgrade is read; without
//! either, only the pool's overall cap applies.

use std::sync::Arc;

use anyhow::Result;
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::TlsAcceptor;
use tracing::debug;
use veil_tunnel::ws::WsStream;

use super::{
    accept::{accept_each, refused, serve, Carrier, Refused, Sources},
    Shared, HANDSHAKE_TIMEOUT,
};

/// A WebSocket has its read buffer from the start (tungstenite's), so
/// nothing grows once the client authenticates.
impl Carrier for WsStream<tokio::net::TcpStream> {}

pub(super) async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    path: Arc<str>,
    acceptor: TlsAcceptor,
    stopped: watch::Receiver<bool>,
) -> Result<()> {
    accept_each(&shared, &listener, Sources::Proxy, |tcp, peer, permit| {
        let (shared, path, acceptor, stopped) = (
            shared.clone(),
            path.clone(),
            acceptor.clone(),
            stopped.clone(),
        );
        tokio::spawn(async move {
            let upgrade =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, veil_tunnel::ws::accept(tcp, &path));
            let mut permit = permit;
            match upgrade.await {
                Ok(Ok((ws, client))) => {
                    if let Some(client) = client {
                        if let Err(turned) = shared.relayed.attribute(&mut permit, client) {
                            shared.counters.refused(turned.cause());
                            debug!("relayed connection turned away: {turned}");
                            return;
                        }
                    }
                    serve(shared, ws, peer, permit, acceptor, stopped).await
                }
                Ok(Err(e)) => refused(&shared, peer, Refused::WebSocket(e)),
                Err(_) => refused(&shared, peer, Refused::HandshakeTimeout),
            }
        });
    })
    .await
}
