//! Packets between the sessions and the datapath: a client's packet into
//! the TUN device (after [`super::check`]), on its client's queue; the
//! datapath's replies from each queue to the session of their destination.
//!
//! Nothing global is locked per packet: a client's packet for a flow that
//! exists is checked against [`crate::flows::KnownFlows`] (a concurrent
//! set), and takes the flow table's lock only to create a flow.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use anyhow::Result;
use tracing::{debug, warn};
use veil_proto::gso::{segment, VnetHdr, VNET_HDR_LEN};

use super::{
    check::{Dropped, Verdict},
    Shared, TUN_BATCH,
};
use crate::{
    flows::FlowError,
    net::monotonic_ns,
    packet::{self, unreachable},
    queue::{self, ReplySender},
};

impl Shared {
    /// A packet from client `vip`: forwarded into the datapath or to
    /// another client, or refused. Returns an ICMP error to send back to
    /// the client, if one is due. `hdr` is the packet's offload header.
    pub(super) fn client_packet(
        self: &Arc<Self>,
        vip: Ipv4Addr,
        hdr: &VnetHdr,
        pkt: &[u8],
    ) -> Option<Vec<u8>> {
        if pkt.first().is_some_and(|b| b >> 4 == 6) {
            return self.client_packet6(vip, hdr, pkt);
        }
        if let Some(fwd) = &self.forwarding {
            if fwd.is_client_reply(vip, pkt) {
                self.to_tun(vip, hdr, pkt);
                return None;
            }
        }
        match self.checks.check(vip, pkt) {
            Verdict::Datapath { flow } => {
                if let Some(flow) = flow {
                    self.ensure_flow(vip, flow).ok()?;
                }
                // A fragment after the first has no flow of its own: the
                // datapath translates it as its first, or drops it.
                self.to_tun(vip, hdr, pkt);
                None
            }
            Verdict::Client(dst) => self.to_other_client(dst, hdr, pkt),
            Verdict::Dns { port, payload } => {
                if hdr.is_gso() {
                    // A UDP super-packet (merged here, or the client's own
                    // GSO): every datagram in it is a query of its own.
                    let _ = segment(hdr, pkt, &mut Vec::new(), |datagram| {
                        self.dns_query(vip, port, datagram.get(payload..).unwrap_or_default())
                    });
                } else {
                    self.dns_query(vip, port, &pkt[payload..]);
                }
                None
            }
            Verdict::Dropped { why, answer } => {
                self.dropped(vip, &why);
                answer
            }
        }
    }

    /// A client's packet into the TUN device, toward the datapath. A write
    /// the kernel refuses (its memory short, the device down) is counted.
    pub(super) fn to_tun(&self, vip: Ipv4Addr, hdr: &VnetHdr, pkt: &[u8]) {
        if let Err(e) = self.tun.send(vip, hdr, pkt) {
            self.counters.tun_write_failed.fetch_add(1, Relaxed);
            debug!(%vip, "writing to the TUN device: {e}");
        }
    }

    /// Counts a refused client packet and says why at debug level (where
    /// a destination may be logged).
    fn dropped(&self, vip: Ipv4Addr, why: &Dropped) {
        let c = &self.counters;
        let counter: &AtomicU64 = match why {
            Dropped::NotIpv4 => &c.not_ipv4,
            Dropped::Malformed(_) => &c.malformed,
            Dropped::ForgedSource(_) => &c.forged_source,
            Dropped::Policy(_) => &c.policy_refused,
            Dropped::TtlExpired => &c.ttl_expired,
            Dropped::Untranslatable { .. } => &c.untranslatable,
        };
        counter.fetch_add(1, Relaxed);
        debug!(%vip, "dropped a client packet: {why:?}");
    }

    /// Makes sure the flow exists (creating it on a client's first packet).
    /// A known flow costs a lookup in the concurrent index, not the table's
    /// lock; the sweep removes a flow from the index before its map entries.
    fn ensure_flow(&self, vip: Ipv4Addr, key: veil_common::FlowKey) -> Result<(), FlowError> {
        if self.known_flows.contains(&key) {
            return Ok(());
        }
        let created = {
            let mut flows = self.flows.lock().expect("flows lock");
            match flows.get(&key) {
                Some(_) => Ok(()),
                None => flows.create(key, monotonic_ns()).map(|_| ()),
            }
        };
        if let Err(e) = &created {
            let counter = match e {
                FlowError::ShareExhausted { .. } => &self.counters.port_share_exceeded,
                _ => &self.counters.flow_errors,
            };
            counter.fetch_add(1, Relaxed);
            match e {
                FlowError::PortsExhausted { .. }
                | FlowError::ShareExhausted { .. }
                | FlowError::TableFull(_)
                | FlowError::ClientFull { .. } => debug!(%vip, "dropped: {e}"),
                e => warn!(%vip, "creating a flow: {e:#}"),
            }
        }
        created
    }

    /// A packet from one client to another's address: into that client's
    /// reply queue as if it came from the datapath, TTL decremented as any
    /// router would. No session there: ICMP host unreachable.
    fn to_other_client(&self, dst: Ipv4Addr, hdr: &VnetHdr, pkt: &[u8]) -> Option<Vec<u8>> {
        let mut joined = Vec::with_capacity(VNET_HDR_LEN + pkt.len());
        joined.extend_from_slice(&hdr.to_bytes());
        joined.extend_from_slice(pkt);
        packet::decrement_ttl(&mut joined[VNET_HDR_LEN..]);
        let sessions = self.sessions.read().expect("sessions lock");
        match self.deliver(&sessions, dst, joined) {
            Delivery::Queued => {
                self.counters.client_to_client.fetch_add(1, Relaxed);
                None
            }
            Delivery::NoSession => Some(packet::icmp_error(
                self.checks.gateway,
                pkt,
                3,
                unreachable::HOST,
            )),
            Delivery::QueueFull => None,
        }
    }

    /// A reply from the datapath (the TUN reader's `buf[..n]`), to the
    /// session of its destination. `sessions` is the session table,
    /// read-locked once per batch of replies rather than once per packet.
    fn to_session(&self, sessions: &HashMap<Ipv4Addr, ReplySender>, buf: &mut Vec<u8>, n: usize) {
        // Only the destination is read here; the session does the rest.
        let Some((_, pkt)) = VnetHdr::peel(&buf[..n]) else {
            self.counters.malformed.fetch_add(1, Relaxed);
            return;
        };
        let dst = if pkt.first().is_some_and(|b| b >> 4 == 6) {
            self.reply6_client(pkt)
        } else if pkt.len() < 20 || pkt[0] >> 4 != 4 {
            self.counters.malformed.fetch_add(1, Relaxed);
            None
        } else {
            Some(Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]))
        };
        if let Some(dst) = dst {
            self.deliver(sessions, dst, self.big.take(buf, n));
        }
    }

    /// Offload header and packet, joined, into the reply queue of the
    /// client at `dst`: the one way anything reaches a session from the
    /// gateway's side (datapath replies, other clients, DNS answers). What
    /// does not get there is counted here.
    pub(super) fn deliver(
        &self,
        sessions: &HashMap<Ipv4Addr, ReplySender>,
        dst: Ipv4Addr,
        joined: Vec<u8>,
    ) -> Delivery {
        let (delivery, unsent) = match sessions.get(&dst) {
            None => (Delivery::NoSession, joined),
            Some(tx) => match tx.push(joined) {
                Ok(()) => return Delivery::Queued,
                Err(refused) => match refused.why {
                    queue::Dropped::Full => (Delivery::QueueFull, refused.packet),
                    queue::Dropped::Closed => (Delivery::NoSession, refused.packet),
                },
            },
        };
        // A kept buffer goes back rather than be unmapped: queues overflow
        // when the gateway is busiest.
        self.big.give_back(unsent);
        let counter = match delivery {
            Delivery::QueueFull => &self.counters.client_queue_full,
            _ => &self.counters.no_session,
        };
        counter.fetch_add(1, Relaxed);
        delivery
    }
}

/// What became of a packet for a client's session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Delivery {
    Queued,
    /// Its queue was full: dropped, counted as `client_queue_full`.
    QueueFull,
    /// No live session at that address: counted as `no_session`.
    NoSession,
}

/// Replies from the datapath on TUN queue `queue`, to the session of their
/// destination. A read error is logged and the reader goes on: the replies
/// of every client on this queue depend on this task.
pub(super) async fn tun_reader(shared: Arc<Shared>, queue: usize) -> Result<()> {
    // A kept buffer: a large reply leaves in it, and another takes its place.
    let mut buf = shared.big.read_buffer();
    let tun = shared.tun.queue(queue);
    loop {
        let n = match tun.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                tun_read_failed(&e).await;
                continue;
            }
        };
        veil_tunnel::busy::touch();
        // Sessions that start or end meanwhile wait for one batch at most.
        let sessions = shared.sessions.read().expect("sessions lock");
        shared.to_session(&sessions, &mut buf, n);
        // Drain what else is waiting before going back to the reactor.
        for _ in 0..TUN_BATCH {
            match tun.try_recv(&mut buf) {
                Ok(Some(n)) => shared.to_session(&sessions, &mut buf, n),
                Ok(None) => break,
                Err(e) => {
                    warn!("reading the TUN device: {e}");
                    break;
                }
            }
        }
    }
}

/// Logs a failed TUN read and pauses briefly, so that an error that
/// repeats (say, out of memory) neither spins nor floods the log.
async fn tun_read_failed(e: &std::io::Error) {
    warn!("reading the TUN device: {e}");
    tokio::time::sleep(Duration::from_millis(10)).await;
}
