//! HTTP/3 on UDP at the tunnel listener's address: the QUIC handshake with
//! the same certificates and CA as TLS over TCP, the HTTP/3 control
//! streams, the client's request stream, then the same session, lease,
//! admission and pump as over TCP ([`super::accept::run_session`]).

use std::{net::SocketAddr, sync::Arc, time::Instant};

use anyhow::{Context, Result};
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tracing::{debug, info};
use veil_proto::session::ServerSession;
use veil_tunnel::quic::{self, QuicTransport};

use super::{
    accept::{run_session, Refused, SessionTransport},
    Shared, CLOSE_TIMEOUT, HANDSHAKE_TIMEOUT,
};
use crate::admission::Permit;

/// The `veil_handshake_failures_total` cause of a QUIC handshake asked to
/// prove its address (a Retry) because the handshake places were crowded.
const UNPROVEN: &str = "address_unproven";

/// The QUIC endpoint on UDP at `listen`, with the gateway's TLS identity,
/// and its driver, for the accept loop's task.
pub(super) fn endpoint(
    listen: SocketAddr,
    tls: rustls::ServerConfig,
) -> Result<(quinn::Endpoint, quic::Driver)> {
    let config = quic::server_config(tls)?;
    let socket = quic::udp_socket(listen).with_context(|| {
        format!(
            "serving HTTP/3 on UDP {listen} (something else on that port? --no-h3 turns it off)"
        )
    })?;
    let (endpoint, driver) = quic::Driver::capture(|| {
        quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(config),
            socket,
            Arc::new(quic::Runtime),
        )
    });
    Ok((endpoint.context("starting the QUIC endpoint")?, driver))
}

/// Accepts QUIC connections, each into a task of its own, with the
/// endpoint's driver (which receives for every connection) polled here.
pub(super) async fn accept_loop(
    shared: Arc<Shared>,
    (endpoint, mut driver): (quinn::Endpoint, quic::Driver),
    stopped: watch::Receiver<bool>,
) -> Result<()> {
    driver.beside(accept_each(shared, endpoint, stopped)).await
}

async fn accept_each(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    stopped: watch::Receiver<bool>,
) -> Result<()> {
    while let Some(incoming) = endpoint.accept().await {
        if incoming.may_retry() && shared.admission.crowded() {
            // The address must first answer a Retry (quinn's stateless
            // address validation: one round trip more); a forged one
            // never does, so forged handshakes cannot fill the places.
            shared.counters.refused(UNPROVEN);
            let _ = incoming.retry();
            continue;
        }
        let peer = super::accept::canonical(incoming.remote_address());
        // The same caps on strangers as over TCP.
        let permit = match shared.admission.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(turned) => {
                shared.counters.refused(turned.cause());
                debug!(%peer, "QUIC connection turned away: {turned}");
                incoming.refuse();
                continue;
            }
        };
        let (shared, stopped) = (shared.clone(), stopped.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            // The connection's driver runs in this task, beside its
            // session: no hand-over between tasks per packet.
            let (accepted, mut driver) = quic::Driver::capture(|| incoming.accept());
            let session = connection(&shared, accepted, peer, permit, stopped);
            match driver.beside(session).await {
                Ok(end) => {
                    info!(client = %end.name, vip = %end.vip, transport = "h3",
                        secs = started.elapsed().as_secs(), "session ended: {}", end.reason);
                }
                Err(e) => {
                    shared.counters.refused(e.cause());
                    info!(transport = "h3", "session refused: {e}");
                    debug!(%peer, "the refused connection came from here");
                }
            }
        });
    }
    // Nothing closes the endpoint but its driver failing (its UDP socket):
    // an error, so that the daemon exits as failed and is restarted.
    anyhow::bail!("the QUIC endpoint stopped: its UDP socket failed")
}

/// One QUIC connection, from its first packet to close.
async fn connection(
    shared: &Arc<Shared>,
    accepted: Result<quinn::Connecting, quinn::ConnectionError>,
    peer: SocketAddr,
    permit: Permit,
    stopped: watch::Receiver<bool>,
) -> Result<super::accept::SessionEnd, Refused> {
    let tls_failed = |e: &dyn std::fmt::Display| Refused::Tls(std::io::Error::other(e.to_string()));
    let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        accepted
            .map_err(|e| tls_failed(&e))?
            .await
            .map_err(|e| tls_failed(&e))
    })
    .await
    .map_err(|_| Refused::HandshakeTimeout)??;
    let record = {
        let identity = conn.peer_identity();
        let cert = identity
            .as_ref()
            .and_then(|any| any.downcast_ref::<Vec<CertificateDer<'static>>>())
            .and_then(|certs| certs.first())
            .ok_or(Refused::NoCertificate)?;
        shared.authenticate_cert(cert)?
    };
    // Before the HTTP/3 setup, which a revoked client could otherwise
    // stretch to the handshake timeout, holding its handshake place.
    if record.revoked.is_some() {
        conn.close(quic::H3_REQUEST_REJECTED.into(), b"");
        return Err(Refused::Revoked(record.name));
    }
    // The HTTP/3 setup and the request stream: within the handshake time.
    let setup = async {
        let control = quic::control(&conn).await?;
        quic::check_peer(&conn, &control.settings, false)?;
        let (send, recv, id) = quic::accept_request(&conn).await?;
        Ok::<_, quic::QuicError>((control, send, recv, id))
    };
    let setup = quic::discarding_datagrams(&conn, tokio::time::timeout(HANDSHAKE_TIMEOUT, setup));
    let (control, send, recv, id) = match setup.await {
        Ok(Ok(parts)) => parts,
        Ok(Err(e)) => {
            conn.close(quic::H3_GENERAL_PROTOCOL_ERROR.into(), b"");
            return Err(tls_failed(&format!("HTTP/3 setup: {e}")));
        }
        Err(_) => {
            conn.close(quic::H3_GENERAL_PROTOCOL_ERROR.into(), b"");
            return Err(Refused::HandshakeTimeout);
        }
    };
    let transport =
        QuicTransport::new(conn, control, send, recv, shared.counters.datagrams.clone());
    run_session(
        shared,
        record,
        peer,
        permit,
        transport,
        |config, now| ServerSession::new_h3(config, now, id),
        stopped,
    )
    .await
}

impl SessionTransport for QuicTransport {
    async fn refuse(&mut self) {
        veil_tunnel::stream::Transport::close(self, CLOSE_TIMEOUT).await
    }
}
