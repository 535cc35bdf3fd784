//! From TCP accept to a running session: the caps on strangers, the TLS
//! handshake, who the client is, its address and its place among the
//! clients, then the pump until the session ends. The same for a session
//! carried in a WebSocket ([`super::ws`]): from its TLS handshake on, the
//! connection is generic over what carries it ([`Carrier`]).

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use anyhow::Result;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};
use veil_proto::{
    capsule::IpAddressRange,
    gro::Coalescer,
    session::{Output, ServerConfig, ServerSession},
    ProtoError,
};
use veil_tunnel::{pump, stream::Transport};

use super::{
    clients::{Attached, Bytes},
    session::{describe, linger, AnswerBudget, GatewaySide, LIMITS},
    Shared, CLOSE_TIMEOUT, HANDSHAKE_TIMEOUT, MTU, PEER_TIMEOUT, TLS_HANDSHAKE_TIMEOUT,
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
    accept_each(&shared, &listener, Sources::Clients, |tcp, peer, permit| {
        let io = crate::tls::buffered(tcp);
        let (shared, acceptor, stopped) = (shared.clone(), acceptor.clone(), stopped.clone());
        tokio::spawn(serve(shared, io, peer, permit, acceptor, stopped));
    })
    .await
}

/// Who a listener's connections come from, as the handshake caps see it.
#[derive(Clone, Copy)]
pub(super) enum Sources {
    /// The clients themselves: capped overall and per source address.
    Clients,
    /// A reverse proxy relaying them all: capped overall only.
    Proxy,
}

/// An IPv4 client of a dual-stack listener (`--listen [::]:443`) as the
/// IPv4 address it is, not `::ffff:a.b.c.d`: one source for the caps on
/// strangers whichever listener it reached, and logs that read the same.
pub(super) fn canonical(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

/// Accepts connections on `listener` for ever, each admitted under the
/// caps on strangers, tuned, and handed to `start` with its place.
pub(super) async fn accept_each(
    shared: &Shared,
    listener: &TcpListener,
    sources: Sources,
    mut start: impl FnMut(TcpStream, SocketAddr, Permit),
) -> Result<()> {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok((tcp, peer)) => (tcp, canonical(peer)),
            Err(e) => {
                let name = match sources {
                    Sources::Clients => "tunnel listener",
                    Sources::Proxy => "WebSocket listener",
                };
                crate::net::accept_failed(name, &e).await;
                continue;
            }
        };
        // Closed at once if over a cap: a flood of connections costs an
        // accept each, not a task, a buffer and a descriptor for seconds.
        let admitted = match sources {
            Sources::Clients => shared.admission.admit(peer.ip()),
            Sources::Proxy => shared.relayed.admit_relayed(),
        };
        let permit = match admitted {
            Ok(permit) => permit,
            Err(turned) => {
                shared.counters.refused(turned.cause());
                debug!(%peer, "connection turned away: {turned}");
                continue;
            }
        };
        crate::net::tune_tunnel_socket(&tcp, crate::net::TUNNEL_LOWAT);
        start(tcp, peer, permit);
    }
}

/// What a client's TLS runs on: its TCP socket, or a WebSocket that a web
/// server relays ([`super::ws`]).
pub(super) trait Carrier: AsyncRead + AsyncWrite + Unpin + Send {
    /// The client authenticated: its reads may take a full-size buffer now.
    fn authenticated(&mut self) {}
}

impl Carrier for crate::tls::BufferedTcp {
    fn authenticated(&mut self) {
        self.grow(crate::tls::TUNNEL_READ_BUFFER);
    }
}

/// One connection's task: its session, and what the log says of its end.
pub(super) async fn serve<S: Carrier>(
    shared: Arc<Shared>,
    io: S,
    peer: SocketAddr,
    permit: Permit,
    acceptor: TlsAcceptor,
    stopped: watch::Receiver<bool>,
) {
    let started = Instant::now();
    match connection(&shared, io, peer, permit, acceptor, stopped).await {
        Ok(end) => {
            info!(client = %end.name, vip = %end.vip,
                secs = started.elapsed().as_secs(), "session ended: {}", end.reason);
        }
        Err(e) => refused(&shared, peer, e),
    }
}

/// A connection that did not become a session: counted and logged.
pub(super) fn refused(shared: &Shared, peer: SocketAddr, e: Refused) {
    shared.counters.refused(e.cause());
    info!("session refused: {e}");
    debug!(%peer, "the refused connection came from here");
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
    #[error("WebSocket upgrade failed: {0}")]
    WebSocket(#[source] veil_tunnel::ws::WsError),
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
            Refused::WebSocket(_) => "websocket",
            Refused::NoCertificate | Refused::UnknownClient => "unknown_client",
            Refused::Revoked(_) => "revoked",
            Refused::Full { .. } => "full",
            Refused::Internal { .. } => "internal",
        }
    }
}

/// A client's TLS stream, over a read-buffered socket or another carrier.
pub(super) type TlsStream<S = crate::tls::BufferedTcp> = tokio_rustls::server::TlsStream<S>;

/// One client connection, from TCP accept to close. `permit` holds its
/// place among the unauthenticated until it becomes a session.
async fn connection<S: Carrier>(
    shared: &Arc<Shared>,
    io: S,
    peer: SocketAddr,
    permit: Permit,
    acceptor: TlsAcceptor,
    stopped: watch::Receiver<bool>,
) -> Result<SessionEnd, Refused> {
    let limit = match shared.admission.crowded() {
        true => HANDSHAKE_TIMEOUT,
        false => TLS_HANDSHAKE_TIMEOUT,
    };
    let tls = tokio::time::timeout(limit, acceptor.accept(io))
        .await
        .map_err(|_| Refused::HandshakeTimeout)?
        .map_err(Refused::Tls)?;
    // Probe resistance: whoever is not a client gets the web site.
    let record = match shared.authenticate(&tls) {
        Ok(record) => record,
        Err(stranger) => {
            // The handshake's place goes back; the visit takes one of the
            // visitors' (closed at once when they are full).
            match shared.visitors.admit_as(&permit) {
                Ok(visit) => {
                    drop(permit);
                    super::fallback::serve(&shared.fallback, tls).await;
                    drop(visit);
                }
                Err(turned) => debug!(%peer, "no fallback site for this one: {turned}"),
            }
            return Err(stranger);
        }
    };
    run_session(
        shared,
        record,
        peer,
        permit,
        Stream::new(tls),
        ServerSession::new,
        stopped,
    )
    .await
}

/// What differs between the transports once a client is authenticated.
pub(super) trait SessionTransport: Transport {
    /// Authenticated and admitted: full-size buffers from now on.
    fn admitted(&mut self) {}
    /// Writes what is queued (a refusal) and lets go of the connection.
    async fn refuse(&mut self);
}

impl<S: Carrier> SessionTransport for Stream<TlsStream<S>> {
    fn admitted(&mut self) {
        self.get_mut().get_mut().0.authenticated();
    }

    async fn refuse(&mut self) {
        linger(self).await
    }
}

/// An authenticated client on any transport: revocation, its address, its
/// place among the clients, then the pump until the session ends.
/// `new_session` makes the transport's session.
pub(super) async fn run_session<T: SessionTransport>(
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
    let vip = shared.lease(&name).await.map_err(internal(&name))?;
    let vip6 = shared.vip6_of(vip);
    // The limits as the registry has them now (a change may have come
    // while the client authenticated and its lease was saved): they decide
    // whether its session carries offload packets.
    let record = shared.with_current_limits(record);
    let mut session = new_session(
        ServerConfig {
            assigned6: vip6,
            routes: routes_for(vip6.is_some()),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            keepalive_timeout: PEER_TIMEOUT,
            offload: shared.offload_for(&record),
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
    // Attached: any later change reaches it through `reapply_limits`, and
    // `hold_to_limits` reads the registry again under the limits' lock.
    shared.hold_to_limits(&record, vip);
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
        up: shared.offload_for(&record).then(|| {
            if shared.tun.takes_udp_gso() {
                Coalescer::with_udp()
            } else {
                Coalescer::new()
            }
        }),
        answers: AnswerBudget::new(std::time::Instant::now()),
    };
    let mut buf = vec![0u8; 64 * 1024];
    let end = pump::run(&mut session, &mut transport, &mut side, LIMITS, &mut buf).await;
    // The client's last packets, if the coalescer still held some.
    side.flush_up(&mut session);
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

/// What a client is told to route through the tunnel: all of IPv4, and
/// all of IPv6 when it has an IPv6 address.
fn routes_for(ipv6: bool) -> Vec<IpAddressRange> {
    let mut routes = vec![IpAddressRange::ALL_IPV4];
    if ipv6 {
        routes.push(IpAddressRange::ALL_IPV6);
    }
    routes
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
    fn authenticate<S>(&self, tls: &TlsStream<S>) -> Result<ClientRecord, Refused> {
        let conn = tls.get_ref().1;
        if !crate::tls::is_tunnel_grade(conn) {
            return Err(Refused::NoCertificate);
        }
        let cert = conn
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
        let mut record = match known {
            Some(record) => record,
            None => match self
                .state
                .clients()
                .ok()
                .and_then(|all| all.into_iter().find(|r| r.fingerprint == fingerprint))
            {
                Some(record) => record,
                // Issued on another host by the same CA (`--revocations`).
                None => self.issued_elsewhere(cert)?,
            },
        };
        self.check_revocation_list(cert, &mut record);
        Ok(record)
    }
}
