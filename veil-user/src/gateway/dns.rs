//! The gateway's resolver service: a client's query (see
//! [`super::check::Verdict::Dns`]) is asked of the upstreams from the
//! gateway's own sockets, and the answer goes back into the client's
//! session as a UDP packet from the gateway's pool address.
//!
//! Bounded everywhere: queries in flight overall and per client (beyond,
//! queries are dropped and counted: a client's resolver retries), one
//! socket per query (a fresh random port and a fresh random ID toward the
//! upstream, so an off-path answer has both to guess), a deadline per
//! upstream and per query (then SERVFAIL, so the client does not wait out
//! its own timeouts), and answers of bounded size that must match the
//! question.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{atomic::Ordering::Relaxed, Arc, Mutex},
    time::Duration,
};

use tokio::{
    net::UdpSocket,
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tracing::debug;
use veil_common::ratelimit::Direction;
use veil_proto::gso::{VnetHdr, VNET_HDR_LEN};

use super::Shared;
use crate::{
    dns::{self, Query},
    packet,
    queue::Replies,
};

/// Queries in flight at once, all clients together.
pub const MAX_IN_FLIGHT: usize = 512;
/// Queries in flight at once for one client.
pub const MAX_IN_FLIGHT_PER_CLIENT: usize = 32;
/// Queries a client may have in flight however few places are left.
const FAIR_FLOOR: usize = 4;
/// How long one upstream has to answer before the next is asked.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a query may take in all; then the client gets SERVFAIL.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The upstreams and what is in flight.
pub struct Resolver {
    upstreams: Vec<SocketAddr>,
    slots: Arc<Semaphore>,
    per_client: Mutex<HashMap<Ipv4Addr, usize>>,
}

/// A query's place among those in flight, given back on drop.
struct Slot {
    resolver: Arc<Resolver>,
    vip: Ipv4Addr,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per_client = self.resolver.per_client.lock().expect("dns lock");
        if let Some(n) = per_client.get_mut(&self.vip) {
            *n -= 1;
            if *n == 0 {
                per_client.remove(&self.vip);
            }
        }
    }
}

/// Whether a client holding `held` queries in flight may start another
/// while `free` places are left: never past its own cap, and past a few
/// only while it leaves the others more than twice what it holds. Clients
/// whose questions never get answers (a black-holed domain, on purpose or
/// not) so hold fewer each as places run out, and together cannot take
/// the last ones from a client with few (16 of them at their caps left
/// none before).
const fn may_take(held: usize, free: usize) -> bool {
    held < MAX_IN_FLIGHT_PER_CLIENT && free > 0 && (held < FAIR_FLOOR || free > 2 * held)
}

impl Resolver {
    pub fn new(upstreams: Vec<SocketAddr>) -> Arc<Self> {
        Arc::new(Resolver {
            upstreams,
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            per_client: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more query of `vip`, if [`may_take`] says so.
    fn admit(self: &Arc<Self>, vip: Ipv4Addr) -> Option<Slot> {
        let mut per_client = self.per_client.lock().expect("dns lock");
        let held = per_client.get(&vip).copied().unwrap_or(0);
        if !may_take(held, self.slots.available_permits()) {
            return None;
        }
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        *per_client.entry(vip).or_default() += 1;
        Some(Slot {
            resolver: self.clone(),
            vip,
            _permit: permit,
        })
    }

    /// The answer to `query` (the client's bytes, `sent` as received),
    /// with the client's ID; `None` if no upstream gave one in time.
    async fn resolve(&self, query: &Query, mut sent: Vec<u8>) -> Option<Vec<u8>> {
        let deadline = Instant::now() + QUERY_TIMEOUT;
        for &upstream in &self.upstreams {
            let id = rand::random::<u16>();
            dns::set_id(&mut sent, id);
            let until = deadline.min(Instant::now() + ATTEMPT_TIMEOUT);
            match tokio::time::timeout_at(until, ask(upstream, &sent, query, id)).await {
                Ok(Ok(mut answer)) => {
                    dns::set_id(&mut answer, query.id);
                    return Some(answer);
                }
                Ok(Err(e)) => debug!(%upstream, "DNS upstream: {e}"),
                Err(_) => debug!(%upstream, "DNS upstream did not answer in time"),
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        None
    }
}

/// One query to one upstream from a fresh socket; waits for an answer
/// that matches (anything else arriving on the socket is ignored).
async fn ask(upstream: SocketAddr, query: &[u8], q: &Query, id: u16) -> std::io::Result<Vec<u8>> {
    let any: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(any).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; dns::MAX_REPLY + 1];
    loop {
        let n = socket.recv(&mut buf).await?;
        match q.check_answer(&buf[..n], id) {
            Ok(()) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) => debug!(%upstream, "ignored a DNS answer: {e}"),
        }
    }
}

impl Shared {
    /// A DNS query from client `vip` (source port `port`): answered later,
    /// into its session, or dropped and counted.
    pub(super) fn dns_query(self: &Arc<Self>, vip: Ipv4Addr, port: u16, payload: &[u8]) {
        let Some(resolver) = &self.resolver else {
            return;
        };
        let c = &self.counters;
        // A place first: a client at its cap costs no parse.
        let Some(slot) = resolver.admit(vip) else {
            c.dns_refused.fetch_add(1, Relaxed);
            debug!(%vip, "DNS query dropped: too many in flight");
            return;
        };
        let query = match Query::parse(payload) {
            Ok(q) => q,
            Err(e) => {
                c.dns_refused.fetch_add(1, Relaxed);
                debug!(%vip, "refused a DNS query: {e}");
                return;
            }
        };
        c.dns_queries.fetch_add(1, Relaxed);
        let (shared, resolver, sent) = (self.clone(), resolver.clone(), payload.to_vec());
        tokio::spawn(async move {
            let answer = match resolver.resolve(&query, sent).await {
                Some(answer) => {
                    shared.counters.dns_answered.fetch_add(1, Relaxed);
                    answer
                }
                None => {
                    shared.counters.dns_failed.fetch_add(1, Relaxed);
                    query.servfail()
                }
            };
            drop(slot);
            shared.dns_answer(vip, port, &answer);
        });
    }

    /// The answer, as a UDP packet from the gateway's resolver service,
    /// into the client's reply queue like any reply from the datapath.
    fn dns_answer(&self, vip: Ipv4Addr, port: u16, answer: &[u8]) {
        let mut joined = VnetHdr::NONE.to_bytes().to_vec();
        packet::append_udp(
            &mut joined,
            dns::service(self.checks.gateway),
            SocketAddrV4::new(vip, port),
            answer,
        );
        if !self.fair(vip, Direction::Down, joined.len() - VNET_HDR_LEN) {
            return;
        }
        let sessions = self.sessions.read().expect("sessions lock");
        self.deliver(&sessions, vip, Replies::one(&joined));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_holding_many_queries_leave_places_to_one_holding_few() {
        let resolver = Resolver::new(Vec::new());
        let mut held = Vec::new();
        for i in 0..16 {
            let vip = Ipv4Addr::new(10, 77, 1, i);
            while let Some(slot) = resolver.admit(vip) {
                held.push(slot);
            }
        }
        let free = resolver.slots.available_permits();
        assert!(free > 2 * FAIR_FLOOR, "{free} places left by 16 clients");
        let newcomer = Ipv4Addr::new(10, 77, 2, 1);
        let theirs: Vec<Slot> = (0..FAIR_FLOOR)
            .map(|_| {
                resolver
                    .admit(newcomer)
                    .expect("a client holding few gets a place")
            })
            .collect();
        // One client alone stops at its own cap.
        drop((held, theirs));
        let alone: Vec<Slot> = std::iter::from_fn(|| resolver.admit(newcomer)).collect();
        assert_eq!(alone.len(), MAX_IN_FLIGHT_PER_CLIENT);
        drop(alone);
        assert!(resolver.per_client.lock().unwrap().is_empty(), "no residue");
    }
}
