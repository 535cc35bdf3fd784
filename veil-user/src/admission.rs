//! Who may hold a connection open before proving who they are.
//!
//! Anyone can open TCP connections to the listener, so the connections that
//! have not authenticated yet (TLS handshake, then the checks against the
//! registry) are capped in number, overall and per source ([`source_of`]:
//! an IPv4 address, an IPv6 /64). A connection over a cap is closed at
//! once, and costs nothing more than the accept. Authenticated sessions are
//! capped elsewhere (`--max-clients`).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex},
};

/// Why a connection was turned away before its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Turned {
    #[error("{0} handshakes in flight, the --max-handshakes limit")]
    Busy(usize),
    #[error("{0} handshakes in flight from that address (its /64 for IPv6), the --max-handshakes-per-source limit")]
    SourceBusy(usize),
}

impl Turned {
    /// The `cause` label of `veil_handshake_failures_total`.
    pub fn cause(&self) -> &'static str {
        match self {
            Turned::Busy(_) => "handshakes_busy",
            Turned::SourceBusy(_) => "source_busy",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// The caps, and who holds a place under them.
#[derive(Clone, Debug)]
pub struct Admission {
    max: usize,
    per_source: usize,
    counts: Arc<Mutex<Counts>>,
}

/// A place under the caps, given back when dropped.
#[derive(Debug)]
pub struct Permit {
    /// `None`: a connection relayed by a proxy, under the overall cap only.
    source: Option<IpAddr>,
    counts: Arc<Mutex<Counts>>,
}

impl Admission {
    pub fn new(max: usize, per_source: usize) -> Self {
        Self {
            max,
            per_source,
            counts: Arc::default(),
        }
    }

    /// A place for a connection from `source`, if both caps allow.
    pub fn admit(&self, source: IpAddr) -> Result<Permit, Turned> {
        let mut counts = self.counts.lock().expect("admission lock");
        if counts.total >= self.max {
            return Err(Turned::Busy(counts.total));
        }
        let source = self.charge(&mut counts, source)?;
        counts.total += 1;
        Ok(Permit {
            source: Some(source),
            counts: self.counts.clone(),
        })
    }

    /// A place for a connection a reverse proxy relays (the WebSocket
    /// listener): under the overall cap only, since its source address is
    /// the proxy's, the same for every client. Limit each client's
    /// connections at the proxy instead.
    pub fn admit_relayed(&self) -> Result<Permit, Turned> {
        let mut counts = self.counts.lock().expect("admission lock");
        if counts.total >= self.max {
            return Err(Turned::Busy(counts.total));
        }
        counts.total += 1;
        Ok(Permit {
            source: None,
            counts: self.counts.clone(),
        })
    }

    /// Charges a relayed connection's place (from [`Self::admit_relayed`])
    /// to the client the proxy says it relays, under the per-source cap:
    /// one client behind the proxy then holds no more places than one
    /// reaching the listener directly. On refusal the place is unchanged,
    /// for the caller to drop.
    pub fn attribute(&self, permit: &mut Permit, source: IpAddr) -> Result<(), Turned> {
        debug_assert!(Arc::ptr_eq(&permit.counts, &self.counts));
        if permit.source.is_some() {
            return Ok(());
        }
        let mut counts = self.counts.lock().expect("admission lock");
        permit.source = Some(self.charge(&mut counts, source)?);
        Ok(())
    }

    /// Counts one more place for the source of `addr` if its cap allows,
    /// and returns that source. A refused source leaves no entry behind.
    fn charge(&self, counts: &mut Counts, addr: IpAddr) -> Result<IpAddr, Turned> {
        let source = source_of(addr);
        let n = counts.by_source.get(&source).copied().unwrap_or(0);
        if n >= self.per_source {
            return Err(Turned::SourceBusy(n));
        }
        *counts.by_source.entry(source).or_default() += 1;
        Ok(source)
    }

    /// A place under these caps for the connection that holds `other` (a
    /// place under other caps), from the same source.
    pub fn admit_as(&self, other: &Permit) -> Result<Permit, Turned> {
        match other.source {
            Some(source) => self.admit(source),
            None => self.admit_relayed(),
        }
    }

    /// Connections holding a place now.
    pub fn in_flight(&self) -> usize {
        self.counts.lock().expect("admission lock").total
    }

    /// Whether a quarter of the places or more are taken. A QUIC handshake
    /// then gets a place only from an address that proved it receives
    /// (answered a Retry): a UDP source address costs a forger nothing,
    /// and each forged handshake would hold its place until it timed out.
    pub fn crowded(&self) -> bool {
        self.in_flight() * 4 >= self.max
    }
}

/// Whose places a connection from `addr` takes: an IPv4 address, or the
/// /64 of an IPv6 one. A host is routed a whole /64 (RFC 6177) and can
/// send from any of its 2^64 addresses: counted one by one, a single host
/// would take every place.
fn source_of(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
        v4 => v4,
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().expect("admission lock");
        counts.total -= 1;
        let Some(source) = self.source else { return };
        if let Some(n) = counts.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                counts.by_source.remove(&source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn relayed_connections_count_toward_the_overall_cap_only() {
        let a = Admission::new(3, 1);
        let relayed: Vec<_> = (0..2).map(|_| a.admit_relayed().unwrap()).collect();
        let direct = a.admit(ip(1)).expect("relayed ones hold no source's place");
        assert_eq!(a.admit_relayed().unwrap_err(), Turned::Busy(3));
        drop(relayed);
        drop(direct);
        assert_eq!(a.in_flight(), 0);
    }

    #[test]
    fn a_relayed_place_is_charged_to_the_client_the_proxy_names() {
        let a = Admission::new(8, 2);
        let mut places: Vec<Permit> = Vec::new();
        for _ in 0..2 {
            let mut p = a.admit_relayed().unwrap();
            a.attribute(&mut p, ip(7)).unwrap();
            places.push(p);
        }
        let mut third = a.admit_relayed().unwrap();
        assert_eq!(a.attribute(&mut third, ip(7)), Err(Turned::SourceBusy(2)));
        drop(third);
        // Another client, and one the proxy names no one for, still get in.
        let mut other = a.admit_relayed().unwrap();
        a.attribute(&mut other, ip(8)).unwrap();
        let _unnamed = a.admit_relayed().unwrap();
        assert_eq!(a.in_flight(), 4);
        places.clear();
        let mut again = a.admit_relayed().unwrap();
        a.attribute(&mut again, ip(7)).unwrap();
    }

    #[test]
    fn one_source_cannot_take_every_place() {
        let a = Admission::new(10, 3);
        let held: Vec<_> = (0..3).map(|_| a.admit(ip(1)).unwrap()).collect();
        assert_eq!(a.admit(ip(1)).unwrap_err(), Turned::SourceBusy(3));
        let other = a.admit(ip(2)).expect("another source still gets in");
        drop(held);
        assert_eq!(a.in_flight(), 1);
        a.admit(ip(1)).expect("places come back");
        drop(other);
    }

    #[test]
    fn one_ipv6_subnet_is_one_source() {
        let a = Admission::new(256, 16);
        let from = |i: u16| IpAddr::from([0x2001, 0xdb8, 0, 7, 0, 0, 0, i]);
        let held: Vec<_> = (1..=16).map(|i| a.admit(from(i)).unwrap()).collect();
        assert_eq!(
            a.admit(from(17)).unwrap_err(),
            Turned::SourceBusy(16),
            "another address of the same /64"
        );
        let next_subnet = IpAddr::from([0x2001, 0xdb8, 0, 8, 0, 0, 0, 1]);
        let other = a.admit(next_subnet).expect("another /64 is another source");
        // Relayed clients the proxy names are counted the same way.
        let mut relayed = a.admit_relayed().unwrap();
        assert_eq!(
            a.attribute(&mut relayed, from(99)),
            Err(Turned::SourceBusy(16))
        );
        drop((held, other, relayed));
        assert!(a.counts.lock().unwrap().by_source.is_empty(), "no residue");
        // An IPv4 address written as IPv6 is that IPv4 address.
        let mapped = Admission::new(4, 1);
        let _v4 = mapped.admit(ip(5)).unwrap();
        assert_eq!(
            mapped
                .admit(IpAddr::from(Ipv6Addr::from([
                    0, 0, 0, 0, 0, 0xffff, 0xc000, 0x0205
                ])))
                .unwrap_err(),
            Turned::SourceBusy(1)
        );
    }

    #[test]
    fn a_place_elsewhere_for_the_same_source() {
        let (handshakes, visitors) = (Admission::new(4, 1), Admission::new(4, 1));
        let first = handshakes.admit(ip(1)).unwrap();
        let visit = visitors.admit_as(&first).unwrap();
        drop(first);
        assert_eq!(handshakes.in_flight(), 0);
        let again = handshakes.admit(ip(1)).unwrap();
        assert_eq!(
            visitors.admit_as(&again).unwrap_err(),
            Turned::SourceBusy(1),
            "the source's place among visitors is taken"
        );
        drop(visit);
        let relayed = handshakes.admit_relayed().unwrap();
        assert!(visitors.admit_as(&relayed).is_ok());
    }

    #[test]
    fn crowded_from_a_quarter_of_the_places() {
        let a = Admission::new(8, 8);
        let first = a.admit(ip(1)).unwrap();
        assert!(!a.crowded());
        let second = a.admit(ip(1)).unwrap();
        assert!(a.crowded(), "2 of 8 places");
        drop((first, second));
        assert!(!a.crowded());
        assert!(!Admission::new(1, 1).crowded(), "no place taken");
    }

    #[test]
    fn the_total_is_capped_and_places_return_when_dropped() {
        let a = Admission::new(4, 4);
        let held: Vec<_> = (1..=4).map(|i| a.admit(ip(i)).unwrap()).collect();
        assert_eq!(a.admit(ip(9)).unwrap_err(), Turned::Busy(4));
        drop(held);
        assert_eq!(a.in_flight(), 0);
        assert!(a.counts.lock().unwrap().by_source.is_empty(), "no residue");
        a.admit(ip(9)).unwrap();
    }
}
