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
use tracing::{info, warn};
use veil_proto::{
    gro::Coalescer,
    gso::VnetHdr,
    session::{Output, ServerSession},
};
use veil_tunnel::pump::{End, Limits, Local};

use super::{
    accept::{Carrier, TlsStream},
    clients::{Attached, Bytes},
    Shared, CLOSE_TIMEOUT, OUT_HIGH_WATER, OUT_LIMIT, WRITE_STALL,
};
use crate::{
    queue::{ReplyReceiver, ReplySender},
    stream::Stream,
};

/// The gateway's side of a session: the client's packets into the
/// datapath, replies from its queue into the session, and the signals that
/// end it.
pub(super) struct GatewaySide<'a> {
    pub(super) shared: &'a Arc<Shared>,
    pub(super) vip: Ipv4Addr,
    /// Replies from the TUN reader: offload header and packet, joined.
    pub(super) rx: &'a mut ReplyReceiver,
    /// Revocation or replacement.
    pub(super) closed: &'a mut watch::Receiver<Option<&'static str>>,
    pub(super) stopped: &'a mut watch::Receiver<bool>,
    pub(super) bytes: &'a Bytes,
    pub(super) gro: Coalescer,
    /// The client's single packets (over HTTP/3, every packet; over TCP,
    /// what its kernel did not send as a super-packet, small UDP datagrams
    /// among them), merged per flow before they enter the TUN device: one
    /// write and one pass through the datapath for a run of them. `None`
    /// for a client with a rate limit, which gets no super-packets (see
    /// `offload_for`). UDP datagrams merge too where the TUN device takes
    /// UDP super-packets.
    pub(super) up: Option<Coalescer>,
    /// The ICMP errors the gateway answers the client's refused packets
    /// with, rate-limited as a router's are.
    pub(super) answers: AnswerBudget,
}

/// A token bucket for the gateway's own answers to one client (ICMP
/// errors for packets it refuses): an answer is larger than a refused
/// packet can be, so without a limit a client could make the gateway send
/// it two or three times what it sends, encrypted, at the gateway's cost.
/// [`ANSWERS_PER_SEC`] a second, as many at once; Linux limits its own
/// ICMP errors the same way.
#[derive(Debug)]
pub(super) struct AnswerBudget {
    tokens: u32,
    refilled: Instant,
}

/// Answers a client gets a second, at most.
pub(super) const ANSWERS_PER_SEC: u32 = 100;

impl AnswerBudget {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            tokens: ANSWERS_PER_SEC,
            refilled: now,
        }
    }

    /// Whether an answer may go at `now` (taking it if so).
    fn take(&mut self, now: Instant) -> bool {
        let earned = now.saturating_duration_since(self.refilled).as_millis() as u64
            * u64::from(ANSWERS_PER_SEC)
            / 1000;
        if earned > 0 {
            self.tokens = (u64::from(self.tokens) + earned).min(u64::from(ANSWERS_PER_SEC)) as u32;
            self.refilled = now;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// Why the gateway's side ended a session.
pub(super) enum Ended {
    /// Replaced, revoked: the reason, for the log.
    Closed(&'static str),
    Shutdown,
}

/// How much a session buffers: see [`Limits`].
pub(super) const LIMITS: Limits = Limits {
    read_limit: OUT_LIMIT,
    write_stall: WRITE_STALL,
};

/// Why a session ended, for the log, and whether what it has queued is
/// still worth sending (a protocol error's response is; a stalled,
/// replaced or revoked client's backlog is not).
pub(super) fn describe(end: End<Ended>) -> (String, bool) {
    match end {
        End::Closed(reason) => (reason.to_string(), true),
        End::PeerClosed => ("client closed the connection".into(), true),
        End::Failed(e) => (format!("connection failed: {e}"), false),
        End::Stalled => (
            format!("client read nothing for {}s", WRITE_STALL.as_secs()),
            false,
        ),
        End::Local(Ended::Closed(why)) => (why.into(), false),
        End::Local(Ended::Shutdown) => ("gateway shutting down".into(), true),
    }
}

impl Local<ServerSession> for GatewaySide<'_> {
    type End = Ended;

    fn output(&mut self, session: &mut ServerSession, output: Output) -> Result<(), Ended> {
        let joined = match &output {
            Output::Packet(packet) => return self.packet(session, packet),
            Output::OffloadPacket(joined) => joined,
            // Client-side outputs.
            _ => return Ok(()),
        };
        // The session replaced the client's header with the only one its
        // packet can mean.
        let Some((hdr, packet)) = VnetHdr::peel(joined) else {
            return Ok(());
        };
        self.bytes
            .from_client
            .fetch_add(packet.len() as u64, Relaxed);
        let (shared, vip, answers) = (self.shared, self.vip, &mut self.answers);
        let mut into_datapath = |hdr: &VnetHdr, packet: &[u8]| {
            forward(shared, vip, session, answers, hdr, packet);
        };
        match self.up.as_mut() {
            // One packet (a small UDP datagram, say): it may merge.
            Some(up) if !hdr.is_gso() => up.push(&hdr, packet, into_datapath),
            // A super-packet already, not copied into a slot: whatever of
            // the client's was pending goes first.
            Some(up) => {
                up.flush(&mut into_datapath);
                into_datapath(&hdr, packet);
            }
            None => into_datapath(&hdr, packet),
        }
        Ok(())
    }

    fn packet(&mut self, session: &mut ServerSession, packet: &[u8]) -> Result<(), Ended> {
        let (shared, vip, answers) = (self.shared, self.vip, &mut self.answers);
        let mut into_datapath = |hdr: &VnetHdr, packet: &[u8]| {
            forward(shared, vip, session, answers, hdr, packet);
        };
        self.bytes
            .from_client
            .fetch_add(packet.len() as u64, Relaxed);
        match self.up.as_mut() {
            Some(up) => up.push_plain(packet, into_datapath),
            None => into_datapath(&VnetHdr::NONE, packet),
        }
        Ok(())
    }

    async fn next(&mut self, session: &mut ServerSession, room: bool) -> Result<(), Ended> {
        // What the last turn's packets left pending goes in now; if that
        // earned an ICMP error, the pump gets a turn to send it before
        // this waits.
        if self.flush_up(session) {
            return Ok(());
        }
        let Self {
            shared,
            rx,
            closed,
            stopped,
            bytes,
            gro,
            ..
        } = self;
        tokio::select! {
            Some(replies) = rx.recv(), if room => {
                let mut taken = replies.len();
                to_client(session, bytes, gro, replies.iter());
                shared.big.give_back(replies.into_buffer());
                // Take more of what is queued: one TLS write for the lot,
                // and consecutive segments of a flow merged. Up to the high
                // water mark only: the queue is where replies wait, bounded,
                // not the write buffer.
                while taken < OUT_HIGH_WATER {
                    let Some(replies) = rx.try_recv() else { break };
                    taken += replies.len();
                    to_client(session, bytes, gro, replies.iter());
                    shared.big.give_back(replies.into_buffer());
                }
                gro.flush(|hdr, packet| session.send_offload_packet(hdr, packet));
                Ok(())
            }
            _ = closed.changed() => Err(Ended::Closed(closed.borrow().unwrap_or("closed"))),
            _ = stopped.changed() => Err(Ended::Shutdown),
        }
    }
}

impl GatewaySide<'_> {
    /// Hands on whatever of the client's packets the coalescer holds (at
    /// the end of a turn, and when the session ends); whether that earned
    /// an ICMP error for the client.
    pub(super) fn flush_up(&mut self, session: &mut ServerSession) -> bool {
        let (shared, vip, answers) = (self.shared, self.vip, &mut self.answers);
        let mut replied = false;
        if let Some(up) = &mut self.up {
            up.flush(|hdr, packet| replied |= forward(shared, vip, session, answers, hdr, packet));
        }
        replied
    }
}

/// A client's packet (or a super-packet of its segments) into the
/// datapath; an ICMP error it earns goes back to the client (and then
/// `true`).
fn forward(
    shared: &Arc<Shared>,
    vip: Ipv4Addr,
    session: &mut ServerSession,
    answers: &mut AnswerBudget,
    hdr: &VnetHdr,
    packet: &[u8],
) -> bool {
    match shared.client_packet(vip, hdr, packet) {
        Some(reply) if answers.take(Instant::now()) => {
            session.send_packet(&reply);
            true
        }
        _ => false,
    }
}

/// Replies as the TUN reader queued them (offload header, packet), into
/// the session: through `gro` when the client takes offload datagrams, so
/// that it gets one super-packet where the WAN delivered a run of segments.
fn to_client<'a>(
    session: &mut ServerSession,
    bytes: &Bytes,
    gro: &mut Coalescer,
    replies: impl Iterator<Item = &'a [u8]>,
) {
    for joined in replies {
        // Our kernel's header; the coalescer and `segment` check what they use.
        let Some((hdr, packet)) = VnetHdr::peel(joined) else {
            continue;
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
}

/// Writes what is queued, closes our side and reads until the client
/// closes its own (for a second at most): closing with unread input would
/// reset the connection and could destroy a refusal before the client
/// reads it (RFC 9112 §9.6).
pub(super) async fn linger<S: Carrier>(stream: &mut Stream<TlsStream<S>>) {
    stream.close(CLOSE_TIMEOUT).await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(stream.get_mut().read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

impl Shared {
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
            // Back already: nothing to remove, and no blocking task (10,000
            // clients coming back at once would start a thread each).
            // `end_grace` checks again under the lock that decides.
            let back = shared
                .clients
                .lock()
                .expect("clients lock")
                .came_back(&name, generation);
            if back {
                return;
            }
            // A map syscall per flow: off the async workers.
            let _ =
                tokio::task::spawn_blocking(move || shared.end_grace(&name, vip, generation)).await;
        });
    }

    /// Removes the flows of a client whose session `generation` ended a
    /// grace period ago, unless it came back since. The clients lock is
    /// held throughout, so a reconnect either comes before the check (and
    /// keeps its flows) or after the removal (and makes new ones). The
    /// flow tables' locks are taken a slice at a time: up to 64k map
    /// deletions would otherwise hold every other client's new flows.
    fn end_grace(&self, name: &str, vip: Ipv4Addr, generation: u64) {
        let clients = self.clients.lock().expect("clients lock");
        if clients.came_back(name, generation) {
            return;
        }
        let keys = self.flows.lock().expect("flows lock").client_keys(vip);
        match super::delete_in_slices(&self.flows, &keys, crate::flows::FlowTable::delete) {
            Ok(()) => {
                info!(client = %name, %vip, flows = keys.len(), "grace period over: flows removed")
            }
            Err(e) => warn!(client = %name, %vip, "removing flows: {e:#}"),
        }
        self.v6_delete_client(vip);
        drop(clients);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_a_hundred_a_second_and_as_many_at_once() {
        let t0 = Instant::now();
        let mut budget = AnswerBudget::new(t0);
        let at_once = (0..1000).filter(|_| budget.take(t0)).count();
        assert_eq!(at_once, ANSWERS_PER_SEC as usize);
        // Then one each 10 ms.
        let ms = |n| t0 + Duration::from_millis(n);
        assert!(!budget.take(ms(5)));
        assert!(budget.take(ms(10)));
        assert!(!budget.take(ms(10)));
        let over_a_second = (11..=1010).filter(|n| budget.take(ms(*n))).count();
        assert_eq!(over_a_second, 100);
    }
}
