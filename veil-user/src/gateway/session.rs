//! A live session: the pump that moves bytes and packets between the
//! client's stream, its state machine, the datapath and its reply queue,
//! and the session's place among the clients.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{atomic::Ordering::Relaxed, Arc},
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::{io::AsyncReadExt, sync::watch};
use tracing::{debug, info, warn};
use veil_proto::{
    gro::Coalescer,
    gso::VnetHdr,
    session::{coalesce, Output, ServerSession},
};

use super::{
    accept::TlsStream,
    clients::{Attached, Bytes},
    Shared, CLOSE_TIMEOUT, OUT_HIGH_WATER, OUT_LIMIT, WRITE_STALL,
};
use crate::{
    queue::{ReplyReceiver, ReplySender},
    stream::{sleep_until_some, Event, Stream},
};

/// What a session's pump reads from and writes to.
pub(super) struct SessionIo<'a> {
    pub(super) stream: &'a mut Stream<TlsStream>,
    /// Replies from the TUN reader: offload header and packet, joined.
    pub(super) rx: &'a mut ReplyReceiver,
    /// Revocation or replacement.
    pub(super) closed: &'a mut watch::Receiver<Option<&'static str>>,
    pub(super) stopped: &'a mut watch::Receiver<bool>,
    pub(super) bytes: &'a Bytes,
}

/// Why a pump stopped, and whether what it has queued is still worth
/// sending (a protocol error's response is; a stalled, replaced or revoked
/// client's backlog is not).
pub(super) struct PumpEnd {
    pub(super) reason: String,
    pub(super) flush: bool,
}

impl PumpEnd {
    fn flush(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            flush: true,
        }
    }

    fn drop(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            flush: false,
        }
    }
}

/// Moves bytes and packets until the session ends; returns why it ended.
/// Nothing in here waits on the client alone: writes progress inside the
/// `select!`, beside the control signals, and a client that stops reading
/// is let go after [`WRITE_STALL`].
pub(super) async fn pump(
    shared: &Arc<Shared>,
    session: &mut ServerSession,
    vip: Ipv4Addr,
    io: &mut SessionIo<'_>,
) -> PumpEnd {
    let SessionIo {
        stream,
        rx,
        closed,
        stopped,
        bytes,
    } = io;
    let mut buf = vec![0u8; 64 * 1024];
    let mut gro = Coalescer::new();
    loop {
        // Act on everything the state machine has to say.
        while let Some(output) = session.poll_output() {
            match output {
                Output::Send(bytes) => {
                    session.recycle_send_buffer(coalesce(stream.out_mut(), bytes))
                }
                Output::Packet(packet) => {
                    bytes.from_client.fetch_add(packet.len() as u64, Relaxed);
                    if let Some(reply) = shared.client_packet(vip, &VnetHdr::NONE, &packet) {
                        session.send_packet(&reply);
                    }
                }
                Output::OffloadPacket(joined) => {
                    // The session replaced the client's header with the
                    // only one its packet can mean.
                    if let Some((hdr, packet)) = VnetHdr::peel(&joined) {
                        bytes.from_client.fetch_add(packet.len() as u64, Relaxed);
                        if let Some(reply) = shared.client_packet(vip, &hdr, packet) {
                            session.send_packet(&reply);
                        }
                    }
                }
                Output::Close { reason } => return PumpEnd::flush(reason.to_string()),
                // Client-side outputs.
                Output::Assigned { .. } | Output::Routes(_) | Output::Dns(_) => {}
            }
        }
        let deadline = session
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        let stall = stream.stalled_since().map(|since| since + WRITE_STALL);
        let pending = stream.pending();
        tokio::select! {
            event = stream.next(&mut buf, pending < OUT_LIMIT) => match event {
                Ok(Event::Read(0)) => return PumpEnd::flush("client closed the connection"),
                Ok(Event::Read(n)) => {
                    if let Err(e) = session.receive(&buf[..n], Instant::now()) {
                        debug!(%vip, "protocol error: {e}");
                    }
                }
                Ok(Event::Wrote) => {}
                Err(e) => return PumpEnd::drop(format!("connection failed: {e}")),
            },
            Some(joined) = rx.recv(), if pending < OUT_HIGH_WATER => {
                let mut taken = joined.len();
                to_client(session, bytes, &mut gro, &joined);
                // Take more of what is queued: one TLS write for the lot,
                // and consecutive segments of a flow merged. Up to the high
                // water mark only: the queue is where replies wait, bounded,
                // not the write buffer.
                while taken < OUT_HIGH_WATER {
                    let Some(joined) = rx.try_recv() else { break };
                    taken += joined.len();
                    to_client(session, bytes, &mut gro, &joined);
                }
                gro.flush(|hdr, packet| session.send_offload_packet(hdr, packet));
            }
            () = tokio::time::sleep_until(deadline) => session.handle_timeout(Instant::now()),
            () = sleep_until_some(stall) => {
                return PumpEnd::drop(format!("client read nothing for {}s", WRITE_STALL.as_secs()));
            }
            _ = closed.changed() => {
                let why = closed.borrow().unwrap_or("closed");
                return PumpEnd::drop(why);
            }
            _ = stopped.changed() => return PumpEnd::flush("gateway shutting down"),
        }
    }
}

/// A reply as the TUN reader queued it (offload header, packet), into the
/// session: through `gro` when the client takes offload datagrams, so that
/// it gets one super-packet where the WAN delivered a run of segments.
fn to_client(session: &mut ServerSession, bytes: &Bytes, gro: &mut Coalescer, joined: &[u8]) {
    // Our kernel's header; the coalescer and `segment` check what they use.
    let Some((hdr, packet)) = VnetHdr::peel(joined) else {
        return;
    };
    bytes.to_client.fetch_add(packet.len() as u64, Relaxed);
    if session.offload() {
        gro.push(&hdr, packet, |hdr, packet| {
            session.send_offload_packet(hdr, packet)
        });
    } else {
        session.send_offload_packet(&hdr, packet);
    }
}

/// Writes what is queued, closes our side and reads until the client
/// closes its own (for a second at most): closing with unread input would
/// reset the connection and could destroy a refusal before the client
/// reads it (RFC 9112 §9.6).
pub(super) async fn linger(stream: &mut Stream<TlsStream>) {
    stream.close(CLOSE_TIMEOUT).await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(stream.get_mut().read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

impl Shared {
    /// The client's address: the one it had before, or the next free one
    /// (saved before it is used).
    pub(super) fn lease(&self, name: &str) -> Result<Ipv4Addr> {
        let mut clients = self.clients.lock().expect("clients lock");
        let (vip, new) = clients.lease(name, self.cfg.pool, self.checks.gateway)?;
        if new {
            self.state.save_leases(clients.leases())?;
        }
        Ok(vip)
    }

    /// Registers a live session and its reply queue (see
    /// [`super::clients::Clients::attach`]); `None` if `--max-clients` is reached.
    pub(super) fn attach(
        &self,
        name: &str,
        fingerprint: &str,
        vip: Ipv4Addr,
        peer: SocketAddr,
        bytes: Arc<Bytes>,
        tx: ReplySender,
    ) -> Option<Attached> {
        let mut clients = self.clients.lock().expect("clients lock");
        let attached = clients.attach(name, fingerprint, vip, peer, bytes, self.cfg.max_clients)?;
        self.sessions
            .write()
            .expect("sessions lock")
            .insert(vip, tx);
        Some(attached)
    }

    /// Unregisters a session that ended; its flows stay for the grace period
    /// in case the client comes back.
    pub(super) fn detach(self: &Arc<Self>, name: &str, vip: Ipv4Addr, generation: u64) {
        let mut clients = self.clients.lock().expect("clients lock");
        if !clients.detach(name, generation) {
            return; // Replaced: the new session owns the address and flows.
        }
        self.sessions.write().expect("sessions lock").remove(&vip);
        drop(clients);
        let (shared, name) = (self.clone(), name.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(shared.cfg.grace).await;
            // A map syscall per flow: off the async workers.
            let _ =
                tokio::task::spawn_blocking(move || shared.end_grace(&name, vip, generation)).await;
        });
    }

    /// Removes the flows of a client whose session `generation` ended a
    /// grace period ago, unless it came back since. The clients lock is
    /// held throughout, so a reconnect either comes before the check (and
    /// keeps its flows) or after the removal (and makes new ones).
    fn end_grace(&self, name: &str, vip: Ipv4Addr, generation: u64) {
        let clients = self.clients.lock().expect("clients lock");
        if clients.came_back(name, generation) {
            return;
        }
        match self.flows.lock().expect("flows lock").delete_client(vip) {
            Ok(n) => info!(client = %name, %vip, flows = n, "grace period over: flows removed"),
            Err(e) => warn!(client = %name, %vip, "removing flows: {e:#}"),
        }
        drop(clients);
    }
}
