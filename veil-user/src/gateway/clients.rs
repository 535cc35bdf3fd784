//! Who is connected, under which address, and which of a client's
//! connections is the current one. Pure bookkeeping under one lock: the
//! gateway's tasks call it, the tests drive it without root.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;

use crate::{control::ClientStatus, net::Ipv4Net};

/// Why a session is told to close, as the log line says it.
pub type CloseSignal = watch::Receiver<Option<&'static str>>;

/// Bytes through one session, each way.
#[derive(Debug, Default)]
pub struct Bytes {
    pub from_client: AtomicU64,
    pub to_client: AtomicU64,
}

#[derive(Debug)]
struct Live {
    vip: Ipv4Addr,
    /// The certificate the session authenticated with (SHA-256, hex): a
    /// name re-issued after a revocation has a new one, and the session of
    /// the revoked one must still close.
    fingerprint: String,
    generation: u64,
    close: watch::Sender<Option<&'static str>>,
    peer: SocketAddr,
    since: SystemTime,
    bytes: Arc<Bytes>,
}

/// The address pool ran out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the address pool {0} is exhausted")]
pub struct PoolExhausted(pub Ipv4Net);

/// A session registered by [`Clients::attach`].
#[derive(Debug)]
pub struct Attached {
    /// Tells this connection apart from the client's earlier and later ones.
    pub generation: u64,
    /// Fires when the session must end (replaced, revoked).
    pub closed: CloseSignal,
}

/// The live sessions, and every client's address.
#[derive(Debug, Default)]
pub struct Clients {
    leases: BTreeMap<String, Ipv4Addr>,
    /// Every leased address, and where the search for a free one resumes:
    /// leases are never taken back, so every address below `free_from` is
    /// taken and a new lease costs no walk over all the others.
    taken: HashSet<Ipv4Addr>,
    free_from: u32,
    /// Leases made and not yet handed to the writer ([`Self::take_unsaved`]).
    unsaved: Vec<(String, Ipv4Addr)>,
    live: HashMap<String, Live>,
    /// Each client's most recent session: a grace timer only removes flows
    /// if no session came after the one it was started for.
    latest: HashMap<String, u64>,
    generation: u64,
    /// Sessions detached so far.
    ended: u64,
}

impl Clients {
    /// Starts from the leases saved in the state directory.
    pub fn with_leases(leases: BTreeMap<String, Ipv4Addr>) -> Self {
        Self {
            taken: leases.values().copied().collect(),
            leases,
            ..Default::default()
        }
    }

    /// The leases made since the last call, oldest first, for the writer.
    pub fn take_unsaved(&mut self) -> Vec<(String, Ipv4Addr)> {
        std::mem::take(&mut self.unsaved)
    }

    /// Leases the writer could not save: first in line for the next write.
    pub fn unsaved_again(&mut self, mut failed: Vec<(String, Ipv4Addr)>) {
        failed.append(&mut self.unsaved);
        self.unsaved = failed;
    }

    pub fn leases(&self) -> &BTreeMap<String, Ipv4Addr> {
        &self.leases
    }

    /// The client's address: the one it had before (if still in `pool`),
    /// or the lowest free one above `gateway` (the gateway's own address in
    /// the pool). The second value says whether the lease is not on disk
    /// yet: new, or put back after a failed write, so that a client
    /// that comes back after a refusal waits for the write again.
    pub fn lease(
        &mut self,
        name: &str,
        pool: Ipv4Net,
        gateway: Ipv4Addr,
    ) -> Result<(Ipv4Addr, bool), PoolExhausted> {
        if let Some(vip) = self.leases.get(name) {
            if pool.contains(*vip) {
                let unsaved = self.unsaved.iter().any(|(n, _)| n == name);
                return Ok((*vip, unsaved));
            }
        }
        let first = gateway.to_bits() + 1;
        // The pool's broadcast address is never handed out.
        let last = pool.addr().to_bits() | !pool.mask().to_bits();
        let from = self.free_from.max(first);
        let vip = (from..last)
            .map(Ipv4Addr::from_bits)
            .find(|a| !self.taken.contains(a))
            .ok_or(PoolExhausted(pool))?;
        self.free_from = vip.to_bits() + 1;
        self.taken.insert(vip);
        self.leases.insert(name.to_owned(), vip);
        self.unsaved.push((name.to_owned(), vip));
        Ok((vip, true))
    }

    /// Registers a live session; an older one of the same client (a
    /// reconnect after a network change) is told to close, its flows kept.
    /// `None` if `max` sessions of other clients are live: the check and the
    /// registration are one step, so racing connections cannot both take
    /// the last place.
    pub fn attach(
        &mut self,
        name: &str,
        fingerprint: &str,
        vip: Ipv4Addr,
        peer: SocketAddr,
        bytes: Arc<Bytes>,
        max: usize,
    ) -> Option<Attached> {
        if self.live.len() >= max && !self.live.contains_key(name) {
            return None;
        }
        let (close, closed) = watch::channel(None);
        self.generation += 1;
        let generation = self.generation;
        self.latest.insert(name.to_owned(), generation);
        let live = Live {
            vip,
            fingerprint: fingerprint.to_owned(),
            generation,
            close,
            peer,
            since: SystemTime::now(),
            bytes,
        };
        if let Some(old) = self.live.insert(name.to_owned(), live) {
            let _ = old
                .close
                .send(Some("replaced by a new connection of the same client"));
        }
        Some(Attached { generation, closed })
    }

    /// Unregisters session `generation` of `name`; `false` if it had been
    /// replaced already (the newer session owns the address and flows).
    pub fn detach(&mut self, name: &str, generation: u64) -> bool {
        let current = self
            .live
            .get(name)
            .is_some_and(|l| l.generation == generation);
        if current {
            self.live.remove(name);
            self.ended += 1;
        }
        current
    }

    /// How many sessions started (attached) and ended (were detached) so
    /// far.
    pub fn started_and_ended(&self) -> (u64, u64) {
        (self.generation, self.ended)
    }

    /// Whether `name` connected again after its session `generation`.
    pub fn came_back(&self, name: &str, generation: u64) -> bool {
        self.latest
            .get(name)
            .is_some_and(|latest| *latest != generation)
    }

    /// Tells the live sessions of these clients to close; their names.
    pub fn close(&self, names: &HashSet<String>, why: &'static str) -> Vec<String> {
        let mut closed = Vec::new();
        for (name, live) in &self.live {
            if names.contains(name) && live.close.borrow().is_none() {
                let _ = live.close.send(Some(why));
                closed.push(name.clone());
            }
        }
        closed
    }

    /// Tells the live sessions that authenticated with one of these
    /// certificates (fingerprints) to close; their names.
    pub fn close_certificates(
        &self,
        fingerprints: &HashSet<String>,
        why: &'static str,
    ) -> Vec<String> {
        let mut closed = Vec::new();
        for (name, live) in &self.live {
            if fingerprints.contains(&live.fingerprint) && live.close.borrow().is_none() {
                let _ = live.close.send(Some(why));
                closed.push(name.clone());
            }
        }
        closed
    }

    /// The live sessions' names and certificates (fingerprints).
    pub fn certificates(&self) -> Vec<(String, String)> {
        self.live
            .iter()
            .map(|(name, l)| (name.clone(), l.fingerprint.clone()))
            .collect()
    }

    /// The live sessions, by name, as `status` shows them.
    pub fn status(&self) -> Vec<ClientStatus> {
        let mut list: Vec<ClientStatus> = self
            .live
            .iter()
            .map(|(name, l)| ClientStatus {
                name: name.clone(),
                vip: l.vip,
                // Derived from `vip` by the caller, which knows the pool.
                vip6: None,
                peer: Some(l.peer.to_string()),
                connected_since: l
                    .since
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                bytes_from_client: l.bytes.from_client.load(Relaxed),
                bytes_to_client: l.bytes.to_client.load(Relaxed),
                rate_limit: None,
                quota: None,
                quota_used: 0,
                rate_dropped: 0,
                quota_dropped: 0,
                // Read from the session's queue by the caller.
                replies_queued: 0,
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

    fn pool() -> Ipv4Net {
        "10.77.0.0/29".parse().unwrap()
    }

    fn peer() -> SocketAddr {
        "192.0.2.1:40000".parse().unwrap()
    }

    fn attach(c: &mut Clients, name: &str, max: usize) -> Option<Attached> {
        c.attach(
            name,
            &format!("{name}-cert"),
            Ipv4Addr::new(10, 77, 0, 2),
            peer(),
            Arc::default(),
            max,
        )
    }

    #[test]
    fn a_client_keeps_its_address_and_the_pool_runs_out_cleanly() {
        let mut c = Clients::default();
        // 10.77.0.0/29: .1 is the gateway, .7 the broadcast: .2 to .6.
        let mut got = Vec::new();
        for name in ["a", "b", "c", "d", "e"] {
            let (vip, new) = c.lease(name, pool(), GATEWAY).unwrap();
            assert!(new);
            got.push(vip.octets()[3]);
        }
        assert_eq!(got, [2, 3, 4, 5, 6]);
        let saving = c.take_unsaved();
        assert_eq!(saving.len(), 5);
        assert_eq!(
            c.lease("c", pool(), GATEWAY),
            Ok((Ipv4Addr::new(10, 77, 0, 4), false))
        );
        assert_eq!(c.lease("f", pool(), GATEWAY), Err(PoolExhausted(pool())));
    }

    #[test]
    fn a_lease_whose_write_failed_is_waited_for_again() {
        let mut c = Clients::default();
        let (vip, new) = c.lease("a", pool(), GATEWAY).unwrap();
        assert!(new);
        assert_eq!(
            c.lease("a", pool(), GATEWAY),
            Ok((vip, true)),
            "not taken yet"
        );
        let saving = c.take_unsaved();
        assert_eq!(
            c.lease("a", pool(), GATEWAY),
            Ok((vip, false)),
            "being written"
        );
        c.unsaved_again(saving);
        assert_eq!(
            c.lease("a", pool(), GATEWAY),
            Ok((vip, true)),
            "the write failed"
        );
        assert_eq!(c.take_unsaved(), [("a".to_owned(), vip)], "once, not twice");
    }

    #[test]
    fn a_lease_outside_a_changed_pool_is_replaced() {
        let mut leases = BTreeMap::new();
        leases.insert("a".to_owned(), Ipv4Addr::new(10, 99, 0, 9));
        let mut c = Clients::with_leases(leases);
        let (vip, new) = c.lease("a", pool(), GATEWAY).unwrap();
        assert_eq!((vip, new), (Ipv4Addr::new(10, 77, 0, 2), true));
        assert_eq!(c.leases()["a"], vip);
    }

    #[test]
    fn a_reconnect_replaces_the_old_session_which_is_told_to_close() {
        let mut c = Clients::default();
        let first = attach(&mut c, "a", 10).unwrap();
        let second = attach(&mut c, "a", 10).unwrap();
        assert_eq!(
            *first.closed.borrow(),
            Some("replaced by a new connection of the same client")
        );
        assert_eq!(*second.closed.borrow(), None);
        assert!(!c.detach("a", first.generation), "the old one owns nothing");
        assert!(c.came_back("a", first.generation));
        assert_eq!(c.status().len(), 1);
        assert!(c.detach("a", second.generation));
        assert!(!c.came_back("a", second.generation), "gone: grace may end");
        assert!(c.status().is_empty());
    }

    #[test]
    fn max_clients_counts_other_clients_only() {
        let mut c = Clients::default();
        let _a = attach(&mut c, "a", 2).unwrap();
        let _b = attach(&mut c, "b", 2).unwrap();
        assert!(attach(&mut c, "c", 2).is_none(), "full");
        assert!(attach(&mut c, "a", 2).is_some(), "a reconnect still fits");
    }

    #[test]
    fn closing_revoked_clients_signals_each_once() {
        let mut c = Clients::default();
        let a = attach(&mut c, "a", 10).unwrap();
        let b = attach(&mut c, "b", 10).unwrap();
        let revoked: HashSet<String> = ["a".to_owned()].into();
        assert_eq!(c.close(&revoked, "client revoked"), ["a"]);
        assert!(c.close(&revoked, "client revoked").is_empty(), "once");
        assert_eq!(*a.closed.borrow(), Some("client revoked"));
        assert_eq!(*b.closed.borrow(), None);
    }

    #[test]
    fn a_revoked_certificate_closes_its_session_not_its_names_next_one() {
        let mut c = Clients::default();
        let old = attach(&mut c, "a", 10).unwrap();
        let revoked: HashSet<String> = ["a-cert".to_owned()].into();
        // The name was issued again; its new certificate connects.
        let new = c
            .attach(
                "a",
                "a-new-cert",
                Ipv4Addr::new(10, 77, 0, 2),
                peer(),
                Arc::default(),
                10,
            )
            .unwrap();
        assert!(c.close_certificates(&revoked, "client revoked").is_empty());
        assert_eq!(*new.closed.borrow(), None);
        assert!(old.closed.borrow().is_some(), "replaced already");
        let again = attach(&mut c, "a", 10).unwrap();
        assert_eq!(c.close_certificates(&revoked, "client revoked"), ["a"]);
        assert_eq!(*again.closed.borrow(), Some("client revoked"));
    }
}
