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
use veil_common::ratelimit::Direction;
use veil_proto::gso::{segment, VnetHdr, VNET_HDR_LEN};

use super::{
    bigbuf,
    check::{Dropped, Verdict},
    Shared, TUN_BATCH,
};
use crate::{
    flows::FlowError,
    net::monotonic_ns,
    packet::{self, unreachable},
    queue::{self, Replies, ReplySender, REPLY_PREFIX},
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
            Verdict::Client(dst) => {
                if !self.fair(vip, Direction::Up, pkt.len())
                    || !self.fair(dst, Direction::Down, pkt.len())
                {
                    return None;
                }
                self.to_other_client(dst, hdr, pkt)
            }
            Verdict::Dns { .. } if !self.fair(vip, Direction::Up, pkt.len()) => None,
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
        let mut replies = Replies::with_capacity(REPLY_PREFIX + VNET_HDR_LEN + pkt.len());
        let mut add = |hdr: &VnetHdr, pkt: &[u8]| {
            let joined = replies.push(&[&hdr.to_bytes(), pkt]);
            packet::decrement_ttl(&mut joined[VNET_HDR_LEN..]);
        };
        if hdr.gso_type & !VnetHdr::GSO_ECN == VnetHdr::GSO_UDP_L4 {
            // Datagrams merged here (or sent with UDP GSO) go on one by
            // one: no client is handed a UDP super-packet, which kernels
            // before 6.2 refuse and a user-space stack would take whole.
            let _ = segment(hdr, pkt, &mut Vec::new(), |datagram| {
                add(&VnetHdr::NONE, datagram)
            });
        } else {
            add(hdr, pkt);
        }
        let sessions = self.sessions.read().expect("sessions lock");
        match self.deliver(&sessions, dst, replies) {
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

    /// The client a reply from the datapath is for: its destination. Only
    /// that is read here; the session does the rest.
    fn reply_client(&self, joined: &[u8]) -> Option<Ipv4Addr> {
        let Some((_, pkt)) = VnetHdr::peel(joined) else {
            self.counters.malformed.fetch_add(1, Relaxed);
            return None;
        };
        if pkt.first().is_some_and(|b| b >> 4 == 6) {
            self.reply6_client(pkt)
        } else if pkt.len() < 20 || pkt[0] >> 4 != 4 {
            self.counters.malformed.fetch_add(1, Relaxed);
            None
        } else {
            Some(Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]))
        }
    }

    /// Replies into the queue of the client at `dst`: the one way anything
    /// reaches a session from the gateway's side (datapath replies, other
    /// clients, DNS answers). What does not get there is counted here, a
    /// packet at a time.
    pub(super) fn deliver(
        &self,
        sessions: &HashMap<Ipv4Addr, ReplySender>,
        dst: Ipv4Addr,
        replies: Replies,
    ) -> Delivery {
        let (delivery, unsent) = match sessions.get(&dst) {
            None => (Delivery::NoSession, replies),
            Some(tx) => match tx.push(replies) {
                Ok(()) => return Delivery::Queued,
                Err(refused) => match refused.why {
                    queue::Dropped::Full => (Delivery::QueueFull, refused.replies),
                    queue::Dropped::Closed => (Delivery::NoSession, refused.replies),
                },
            },
        };
        let counter = match delivery {
            Delivery::QueueFull => &self.counters.client_queue_full,
            _ => &self.counters.no_session,
        };
        counter.fetch_add(unsent.count(), Relaxed);
        // A kept buffer goes back rather than be unmapped: queues overflow
        // when the gateway is busiest.
        self.big.give_back(unsent.into_buffer());
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
    let mut gathered = Gathered::default();
    let tun = shared.tun.queue(queue);
    loop {
        let n = match tun.recv(bigbuf::read_area(&mut buf)).await {
            Ok(n) => n,
            Err(e) => {
                tun_read_failed(&e).await;
                continue;
            }
        };
        veil_tunnel::busy::touch();
        // Sessions that start or end meanwhile wait for one batch at most.
        let sessions = shared.sessions.read().expect("sessions lock");
        let mut deliver = |dst, replies| {
            shared.deliver(&sessions, dst, replies);
        };
        shared.gather(&mut gathered, &mut buf, n, &mut deliver);
        // Drain what else is waiting before going back to the reactor.
        for _ in 0..TUN_BATCH {
            match tun.try_recv(bigbuf::read_area(&mut buf)) {
                Ok(Some(n)) => shared.gather(&mut gathered, &mut buf, n, &mut deliver),
                Ok(None) => break,
                Err(e) => {
                    warn!("reading the TUN device: {e}");
                    break;
                }
            }
        }
        gathered.flush(&mut deliver);
    }
}

impl Shared {
    /// The reply a read left in `buf` (`n` bytes), into its client's share
    /// of the batch; a large one goes on at once, in its read buffer.
    fn gather(
        &self,
        gathered: &mut Gathered,
        buf: &mut Vec<u8>,
        n: usize,
        deliver: &mut impl FnMut(Ipv4Addr, Replies),
    ) {
        let Some(dst) = self.reply_client(bigbuf::read_reply(buf, n)) else {
            return;
        };
        match self.big.take(buf, n) {
            Some(large) => {
                // After what was gathered before it: a client's replies
                // keep their order.
                gathered.flush_one(dst, deliver);
                deliver(dst, large);
            }
            None => gathered.push(dst, bigbuf::read_reply(buf, n), deliver),
        }
    }
}

/// Bytes one client's share of a batch holds at most (unless a single
/// reply is larger): below the allocator's mmap threshold ([`super::trim`]),
/// so that it is arena memory, not pages mapped and faulted in per batch.
const GATHER_BYTES: usize = 32 * 1024;

/// A batch of replies, gathered per client until the batch ends, so that
/// a client gets one queue entry per batch rather than one per packet.
#[derive(Default)]
struct Gathered {
    /// Few clients have replies in one batch: a scan finds a client's.
    entries: Vec<(Ipv4Addr, Replies)>,
}

impl Gathered {
    /// Adds `reply` to `dst`'s share, after handing that share on if it
    /// is full.
    fn push(&mut self, dst: Ipv4Addr, reply: &[u8], deliver: &mut impl FnMut(Ipv4Addr, Replies)) {
        let fresh = || Replies::with_capacity(GATHER_BYTES.max(REPLY_PREFIX + reply.len()));
        let replies = match self.entries.iter_mut().find(|(to, _)| *to == dst) {
            Some((_, replies)) => {
                if !replies.has_room(reply.len()) {
                    hand_on(dst, std::mem::replace(replies, fresh()), deliver);
                }
                replies
            }
            None => {
                self.entries.push((dst, fresh()));
                &mut self.entries.last_mut().expect("just pushed").1
            }
        };
        replies.push(&[reply]);
    }

    /// Hands on `dst`'s share, if it has one.
    fn flush_one(&mut self, dst: Ipv4Addr, deliver: &mut impl FnMut(Ipv4Addr, Replies)) {
        if let Some(at) = self.entries.iter().position(|(to, _)| *to == dst) {
            let (dst, replies) = self.entries.swap_remove(at);
            hand_on(dst, replies, deliver);
        }
    }

    /// Hands on every share: the batch is over.
    fn flush(&mut self, deliver: &mut impl FnMut(Ipv4Addr, Replies)) {
        for (dst, replies) in self.entries.drain(..) {
            hand_on(dst, replies, deliver);
        }
    }
}

/// A share, to its client's queue, with what it did not use given back.
fn hand_on(dst: Ipv4Addr, mut replies: Replies, deliver: &mut impl FnMut(Ipv4Addr, Replies)) {
    replies.trim();
    deliver(dst, replies);
}

/// Logs a failed TUN read and pauses briefly, so that an error that
/// repeats (say, out of memory) neither spins nor floods the log.
async fn tun_read_failed(e: &std::io::Error) {
    warn!("reading the TUN device: {e}");
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 7, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 7, 0, 3);

    /// What `deliver` was handed, an entry at a time.
    fn entries(delivered: &[(Ipv4Addr, Replies)]) -> Vec<(Ipv4Addr, Vec<Vec<u8>>)> {
        delivered
            .iter()
            .map(|(to, r)| (*to, r.iter().map(<[u8]>::to_vec).collect()))
            .collect()
    }

    #[test]
    fn a_batch_gives_each_client_one_entry_in_the_order_read() {
        let mut gathered = Gathered::default();
        let mut delivered = Vec::new();
        let mut deliver = |to, replies| delivered.push((to, replies));
        gathered.push(A, b"a1", &mut deliver);
        gathered.push(B, b"b1", &mut deliver);
        gathered.push(A, b"a2", &mut deliver);
        gathered.flush(&mut deliver);
        gathered.flush(&mut deliver);
        let mut got = entries(&delivered);
        got.sort();
        assert_eq!(
            got,
            [
                (A, vec![b"a1".to_vec(), b"a2".to_vec()]),
                (B, vec![b"b1".to_vec()])
            ]
        );
    }

    #[test]
    fn a_full_share_goes_on_and_a_flushed_one_goes_before_what_follows() {
        let mut gathered = Gathered::default();
        let delivered = std::cell::RefCell::new(Vec::new());
        let mut deliver = |to, replies| delivered.borrow_mut().push((to, replies));
        let reply = vec![1u8; 1500];
        let fit = GATHER_BYTES / (REPLY_PREFIX + reply.len());
        for _ in 0..=fit {
            gathered.push(A, &reply, &mut deliver);
        }
        assert_eq!(delivered.borrow().len(), 1, "the share that filled went on");
        assert_eq!(delivered.borrow()[0].1.count(), fit as u64);
        gathered.flush_one(A, &mut deliver);
        gathered.flush_one(B, &mut deliver);
        assert_eq!(delivered.borrow().len(), 2, "the rest, and nothing for B");
        assert_eq!(delivered.borrow()[1].1.count(), 1);
        gathered.flush(&mut deliver);
        assert_eq!(delivered.borrow().len(), 2, "nothing left");
    }

    #[test]
    fn a_reply_larger_than_a_share_has_one_of_its_own_size() {
        let mut gathered = Gathered::default();
        let mut delivered = Vec::new();
        let mut deliver = |to, replies| delivered.push((to, replies));
        let large = vec![2u8; GATHER_BYTES + 100];
        gathered.push(A, &large, &mut deliver);
        gathered.flush(&mut deliver);
        assert_eq!(entries(&delivered), [(A, vec![large])]);
    }
}
