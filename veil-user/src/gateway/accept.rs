//! From TCP accept to a running session: the caps on strangers, the TLS
//! handshake, who the client is, its address and its place among the
//! clients, then the pump until the session ends.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use anyhow::Result;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};
use veil_proto::{
    gro::Coalescer,
    session::{Output, ServerConfig, ServerSession},
    ProtoError,
};
use veil_tunnel::{pump, stream::Transport};

use super::{
    clients::{Attached, Bytes},
    session::{describe, linger, GatewaySide, LIMITS},
    Shared, CLOSE_TIMEOUT, HANDSHAKE_TIMEOUT, MTU, PEER_TIMEOUT,
};
use crate::{
    admission::Permit,
    queue::reply_queue,
    state::{fingerprint, ClientRecord},
    stream::Stream,
};

pub(super) async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    stopped: watch::Receiver<bool>,
) -> Result<()> {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                crate::net::accept_failed("tunnel listener", &e).await;
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

pub(super) struct SessionEnd {
    pub(super) name: String,
    pub(super) vip: Ipv4Addr,
    pub(super) reason: String,
}

/// Why a connection never became a session, by cause for the metrics.
#[derive(Debug, thiserror::Error)]
pub(super) enum Refused {
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
    pub(super) fn cause(&self) -> &'static str {
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
pub(super) type TlsStream = tokio_rustls::server::TlsStream<crate::tls::BufferedTcp>;

/// One client connection, from TCP accept to close. `permit` holds its
/// place among the unauthenticated until it becomes a session.
async fn connection(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    permit: Permit,
    acceptor: TlsAcceptor,
    stopped: watch::Receiver<bool>,
) -> Result<SessionEnd, Refused> {
    let tcp = crate::tls::buffered(tcp);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| Refused::HandshakeTimeout)?
        .map_err(Refused::Tls)?;
    let stream = Stream::new(tls);
    let record = shared.authenticate(stream.get_ref())?;
    serve(
        shared,
        record,
        peer,
        permit,
        stream,
        ServerSession::new,
        stopped,
    )
    .await
}

/// What differs between the transports once a client is authenticated.
pub(super) trait Carrier: Transport {
    /// Authenticated and admitted: full-size buffers from now on.
    fn admitted(&mut self) {}
    /// Writes what is queued (a refusal) and lets go of the connection.
    async fn refuse(&mut self);
}

impl Carrier for Stream<TlsStream> {
    fn admitted(&mut self) {
        self.get_mut()
            .get_mut()
            .0
            .grow(crate::tls::TUNNEL_READ_BUFFER);
    }

    async fn refuse(&mut self) {
        linger(self).await
    }
}

/// An authenticated client on any transport: revocation, its address, its
/// place among the clients, then the pump until the session ends.
/// `new_session` makes the transport's session.
pub(super) async fn serve<T: Carrier>(
    shared: &Arc<Shared>,
    record: ClientRecord,
    peer: SocketAddr,
    permit: Permit,
    mut transport: T,
    new_session: impl FnOnce(ServerConfig, Instant) -> Result<ServerSession, ProtoError>,
    mut stopped: watch::Receiver<bool>,
) -> Result<SessionEnd, Refused> {
    let name = record.name.clone();
    if record.revoked.is_some() {
        transport.close(CLOSE_TIMEOUT).await;
        return Err(Refused::Revoked(name));
    }
    let internal = |name: &str| {
        let name = name.to_owned();
        move |source: anyhow::Error| Refused::Internal { name, source }
    };
    let vip = shared.lease(&name).map_err(internal(&name))?;
    let mut session = new_session(
        ServerConfig {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            keepalive_timeout: PEER_TIMEOUT,
            offload: true,
            max_packet_len: MTU,
            dns: shared.announced_dns(),
            ..ServerConfig::new(vip)
        },
        Instant::now(),
    )
    .map_err(|e| internal(&name)(e.into()))?;

    let (tx, mut rx) = reply_queue(shared.cfg.client_buffer);
    let bytes = Arc::new(Bytes::default());
    let Some(Attached {
        generation,
        mut closed,
    }) = shared.attach(&name, &record.fingerprint, vip, peer, bytes.clone(), tx)
    else {
        session.refuse(503, "the gateway is full");
        while let Some(output) = session.poll_output() {
            if let Output::Send(bytes) = output {
                transport.out_mut().extend_from_slice(&bytes);
            }
        }
        transport.refuse().await;
        return Err(Refused::Full {
            name,
            max: shared.cfg.max_clients,
        });
    };
    // Authenticated and admitted: `--max-clients` bounds it from now on,
    // and it reads through a full-size buffer.
    drop(permit);
    transport.admitted();
    info!(client = %name, %vip, "session started");
    debug!(client = %name, %peer, "the session's connection comes from here");
    let mut side = GatewaySide {
        shared,
        vip,
        rx: &mut rx,
        closed: &mut closed,
        stopped: &mut stopped,
        bytes: &bytes,
        gro: Coalescer::new(),
    };
    let mut buf = vec![0u8; 64 * 1024];
    let end = pump::run(&mut session, &mut transport, &mut side, LIMITS, &mut buf).await;
    shared.detach(&name, vip, generation);
    // Its queue and buffers go now, not after the goodbye.
    drop(side);
    drop((rx, session, buf));
    let (reason, flush) = describe(end);
    if !flush {
        transport.discard();
    }
    transport.close(CLOSE_TIMEOUT).await;
    Ok(SessionEnd { name, vip, reason })
}

impl Shared {
    /// What clients are told about DNS: the gateway's own resolver
    /// service, if it has one.
    fn announced_dns(&self) -> Vec<veil_proto::capsule::DnsConfiguration> {
        match self.resolver {
            Some(_) => vec![veil_proto::capsule::DnsConfiguration::full_tunnel(vec![
                self.checks.gateway,
            ])],
            None => Vec::new(),
        }
    }

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
        self.authenticate_cert(cert)
    }

    /// The registry's record of the client with this certificate.
    pub(super) fn authenticate_cert(
        &self,
        cert: &rustls::pki_types::CertificateDer<'_>,
    ) -> Result<ClientRecord, Refused> {
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
}
