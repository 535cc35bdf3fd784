//! The flow table: the daemon's side of the NAT maps.
//!
//! The daemon owns every flow. Each has two entries in the kernel: egress
//! (the client's 5-tuple to its NAT port) and reverse (the remote's view
//! back to the client). The reverse entry goes in first with `BPF_NOEXIST`,
//! which claims the NAT port toward that remote endpoint atomically; the
//! same port may serve other remote endpoints at once.
//!
//! A mirror in user space ([`NatBook`]) answers "does this flow exist" and
//! "is this port taken toward that endpoint" without a syscall, so the
//! per-packet check in the session layer costs a hash lookup; it also
//! chooses each client's public address and keeps each client to its share
//! of the ports toward one endpoint. The datapath writes last-seen times,
//! counters and TCP flags into the map values; [`FlowTable::gc`] reads them
//! to expire flows.
//!
//! The table lives behind one lock; what every client packet asks of it,
//! "does this flow exist", is answered without that lock by
//! [`KnownFlows`], a concurrent set the table keeps in step.

use std::{fmt, hash::Hash, net::Ipv4Addr, str::FromStr, sync::Arc, time::Duration};

use aya::maps::{HashMap, MapData, MapError};
use rand::Rng;
use veil_common::{
    proto, tcp_flags, EgressFlow, FlowKey, FlowStats, FwdFlow, FwdKey, ReverseFlow, ReverseKey,
    MAX_FLOWS,
};

use crate::nat::{Mapped, Nat, NatBook, PublicAddrError};

pub(crate) const BPF_NOEXIST: u64 = 1;
/// `BPF_EXIST`: update only an entry that is there.
pub(crate) const BPF_EXIST: u64 = 2;

/// An inclusive range of NAT ports (ICMP identifiers share it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    /// The default: the top of the dynamic range. Linux's default
    /// `ip_local_port_range` is 32768-60999, so this stays clear of it.
    pub const DEFAULT: PortRange = PortRange {
        min: 61000,
        max: 65535,
    };

    pub fn len(&self) -> u32 {
        self.max as u32 - self.min as u32 + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.min..=self.max).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not a port range: expected MIN-MAX with 1 <= MIN <= MAX <= 65535, such as 61000-65535")]
pub struct PortRangeError(String);

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PortRangeError(s.to_owned());
        let (min, max) = s.split_once('-').ok_or_else(err)?;
        let min: u16 = min.trim().parse().map_err(|_| err())?;
        let max: u16 = max.trim().parse().map_err(|_| err())?;
        if min == 0 || min > max {
            return Err(err());
        }
        Ok(PortRange { min, max })
    }
}

/// The remote port of plain DNS.
pub const DNS_PORT: u16 = 53;

/// How long an idle flow lives, by protocol and state. The defaults are the
/// minimums of RFC 5382 (TCP), RFC 4787 (UDP) and RFC 5508 (ICMP), except
/// for DNS over UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// The handshake is over (the opener acknowledged the answer's SYN:
    /// [`tcp_flags::handshake_done`]) and neither FIN nor RST was seen.
    pub tcp_established: Duration,
    /// Opening, closing or reset TCP.
    pub tcp_transitory: Duration,
    pub udp: Duration,
    /// UDP to remote port 53. RFC 4787 REQ-5 lets well-known destination
    /// ports have shorter timers than 2 minutes; a DNS exchange is over in
    /// seconds (resolvers give up on an answer after 5-10 s), and each
    /// query from a new source port holds a NAT port for this long: the
    /// default 30 s (Linux conntrack's for unanswered UDP) lets four times
    /// as many queries per second through one port range as 120 s would.
    pub udp_dns: Duration,
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_secs(2 * 3600 + 4 * 60),
            tcp_transitory: Duration::from_secs(4 * 60),
            udp: Duration::from_secs(2 * 60),
            udp_dns: Duration::from_secs(30),
            icmp: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error(
        "no free NAT port toward {remote}:{remote_port} ({proto}) on {public}: all {ports} ports of {range} are in use for that endpoint"
    )]
    PortsExhausted {
        proto: ProtoName,
        remote: Ipv4Addr,
        remote_port: u16,
        /// The public address the client leaves from.
        public: Ipv4Addr,
        ports: u32,
        range: PortRange,
    },
    /// The client holds its share of the ports toward this endpoint; other
    /// clients may still get theirs.
    #[error(
        "client {client} holds {share} NAT ports toward {remote}:{remote_port} ({proto}), its share of that endpoint (--max-ports-per-endpoint)"
    )]
    ShareExhausted {
        client: Ipv4Addr,
        proto: ProtoName,
        remote: Ipv4Addr,
        remote_port: u16,
        share: u32,
    },
    #[error("the flow table is full ({0} flows)")]
    TableFull(usize),
    #[error("client {client} has {limit} flows, its limit")]
    ClientFull { client: Ipv4Addr, limit: usize },
    #[error("protocol {0} is not translated (only TCP, UDP and ICMP echo)")]
    Unsupported(u8),
    #[error("{op} on BPF map `{map}`")]
    Map {
        op: &'static str,
        map: &'static str,
        #[source]
        source: MapError,
    },
}

/// A protocol number that prints as its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProtoName(pub u8);

impl fmt::Display for ProtoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            proto::TCP => f.write_str("tcp"),
            proto::UDP => f.write_str("udp"),
            proto::ICMP => f.write_str("icmp"),
            p => write!(f, "proto {p}"),
        }
    }
}

/// One flow as [`FlowTable::list`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub key: FlowKey,
    /// The public address it leaves from.
    pub public_addr: Ipv4Addr,
    pub nat_port: u16,
    pub created_ns: u64,
    /// Client to remote.
    pub egress: FlowStats,
    /// Remote to client.
    pub reverse: FlowStats,
}

impl fmt::Display for Flow {
    /// `tcp 10.77.0.2:50000 -> 198.18.0.2:443 via 198.18.0.1:61377`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = &self.key;
        write!(
            f,
            "{} {}:{} -> {}:{} via {}:{}",
            ProtoName(k.proto),
            k.client(),
            k.client_port,
            k.remote(),
            k.remote_port,
            self.public_addr,
            self.nat_port
        )
    }
}

impl Flow {
    pub fn last_seen_ns(&self) -> u64 {
        self.created_ns
            .max(self.egress.last_seen_ns)
            .max(self.reverse.last_seen_ns)
    }

    /// Whether the flow is past its timeout at `now_ns` ([`expired`]).
    pub fn expired(&self, now_ns: u64, t: &Timeouts) -> bool {
        expired(
            self.created_ns,
            &self.egress,
            &self.reverse,
            self.timeout(t),
            now_ns,
        )
    }

    /// How long this flow may stay idle, given what the datapath saw.
    pub fn timeout(&self, t: &Timeouts) -> Duration {
        idle_timeout(
            self.key.proto,
            self.key.remote_port,
            &self.egress,
            &self.reverse,
            t,
        )
    }
}

/// Whether a flow made at `created_ns`, whose two directions the datapath
/// saw as `egress` (the client's packets) and `reverse` (the replies), has
/// been idle past `timeout` at `now_ns` (IPv4 and IPv6 alike). Replies
/// keep it only up to one timeout past the client's last packet: anyone
/// can send with a remote's address, and a forger refreshing each NAT
/// port toward a popular server would keep those ports from every client
/// for good (RFC 4787 REQ-6 requires refresh by outbound packets; by
/// inbound ones it is a MAY).
pub fn expired(
    created_ns: u64,
    egress: &FlowStats,
    reverse: &FlowStats,
    timeout: Duration,
    now_ns: u64,
) -> bool {
    let timeout = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
    let out = created_ns.max(egress.last_seen_ns);
    let alive = out.max(reverse.last_seen_ns.min(out.saturating_add(timeout)));
    now_ns.saturating_sub(alive) > timeout
}

/// How long a flow may stay idle, by protocol and what the datapath saw of
/// it both ways (IPv4 and IPv6 alike; ICMP and ICMPv6 get `t.icmp`).
pub fn idle_timeout(
    proto: u8,
    remote_port: u16,
    egress: &FlowStats,
    reverse: &FlowStats,
    t: &Timeouts,
) -> Duration {
    match proto {
        proto::TCP => {
            let (out, back) = (egress.tcp_flags, reverse.tcp_flags);
            let closing = (out | back) & (tcp_flags::RST | tcp_flags::FIN) != 0;
            if tcp_flags::handshake_done(out, back) && !closing {
                t.tcp_established
            } else {
                t.tcp_transitory
            }
        }
        proto::UDP if remote_port == DNS_PORT => t.udp_dns,
        proto::UDP => t.udp,
        _ => t.icmp,
    }
}

/// The keys of the flows that exist, shared between a flow table (the
/// one writer, under its lock) and the packet path (every session, no
/// lock). A sharded concurrent set (`dashmap`): a lookup takes one shard's
/// read lock among many, so sessions on different cores do not wait for
/// each other or for a flow being created. Its hasher is keyed per
/// process, as std's, so clients cannot choose keys that collide.
///
/// Kept in step by the table: a key goes in once the flow's map entries
/// are written, and out before they are removed (on expiry, deletion or a
/// client's end). A packet that found its key just before the removal is
/// written to the TUN device, where the datapath finds no flow and drops
/// it, as when it raced the table's lock.
#[derive(Debug)]
pub struct KnownFlows<K: Eq + Hash>(Arc<dashmap::DashSet<K>>);

impl<K: Eq + Hash> Clone for KnownFlows<K> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<K: Eq + Hash + Clone> Default for KnownFlows<K> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

impl<K: Eq + Hash + Clone> KnownFlows<K> {
    pub fn contains(&self, key: &K) -> bool {
        self.0.contains(key)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn insert(&self, key: K) {
        self.0.insert(key);
    }

    pub(crate) fn remove(&self, key: &K) {
        self.0.remove(key);
    }
}

/// What one [`FlowTable::gc`] pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub examined: usize,
    pub expired: Vec<FlowKey>,
}

pub struct FlowTable {
    egress: HashMap<MapData, FlowKey, EgressFlow>,
    reverse: HashMap<MapData, ReverseKey, ReverseFlow>,
    /// The forwarder's connections (read only here): a NAT port one of
    /// them holds toward a target is not a client's to take. `None` on a
    /// gateway without port forwarding, which then saves the lookup (a
    /// system call per new flow).
    forwarded: Option<HashMap<MapData, FwdKey, FwdFlow>>,
    timeouts: Timeouts,
    book: NatBook,
    /// The keys of `book`, for lookups without the table's lock.
    known: KnownFlows<FlowKey>,
    /// Entries each flow map holds ([`crate::Datapath::load_sized`]).
    map_size: usize,
}

impl FlowTable {
    /// A table over the flow maps, translating to `public` (not empty).
    pub fn new(
        egress: HashMap<MapData, FlowKey, EgressFlow>,
        reverse: HashMap<MapData, ReverseKey, ReverseFlow>,
        forwarded: HashMap<MapData, FwdKey, FwdFlow>,
        public: Vec<Ipv4Addr>,
        ports: PortRange,
        timeouts: Timeouts,
    ) -> Result<Self, PublicAddrError> {
        let map_size = aya::maps::IterableMap::map(&egress)
            .info()
            .map_or(MAX_FLOWS as usize, |i| i.max_entries() as usize);
        Ok(Self {
            egress,
            reverse,
            forwarded: Some(forwarded),
            timeouts,
            book: NatBook::new(public, ports, map_size)?,
            known: KnownFlows::default(),
            map_size,
        })
    }

    /// The flows that exist, readable without this table's lock (see
    /// [`KnownFlows`]): a handle the table keeps up to date.
    pub fn known(&self) -> KnownFlows<FlowKey> {
        self.known.clone()
    }

    /// For a gateway that forwards no port (no `--forward`): no forwarded
    /// connection can ever hold a NAT port, so new flows do not look.
    pub fn without_forwarding(mut self) -> Self {
        self.forwarded = None;
        self
    }

    /// Caps the table below the maps' size (`--max-flows`).
    pub fn with_capacity(mut self, flows: usize) -> Self {
        self.book.set_capacity(flows.min(self.map_size));
        self
    }

    /// Caps the flows of each client (`--max-flows-per-client`).
    pub fn with_client_limit(mut self, flows: usize) -> Self {
        self.book.set_client_limit(flows);
        self
    }

    /// Which flows of one client socket share a NAT port.
    pub fn with_mapping(mut self, mapping: crate::nat::Mapping) -> Self {
        self.book.set_mapping(mapping);
        self
    }

    /// Caps the ports one client may hold toward one remote endpoint
    /// (`--max-ports-per-endpoint`; default a quarter of the range).
    pub fn with_port_share(mut self, ports: u32) -> Self {
        self.book.set_share(ports);
        self
    }

    pub fn capacity(&self) -> usize {
        self.book.capacity()
    }

    pub fn len(&self) -> usize {
        self.book.len()
    }

    pub fn is_empty(&self) -> bool {
        self.book.is_empty()
    }

    pub fn ports(&self) -> PortRange {
        self.book.ports()
    }

    /// Ports one client may hold toward one remote endpoint.
    pub fn port_share(&self) -> u32 {
        self.book.share()
    }

    pub fn public_addrs(&self) -> &[Ipv4Addr] {
        self.book.public_addrs()
    }

    /// The public address every flow of `client` leaves from.
    pub fn public_addr_of(&self, client: Ipv4Addr) -> Ipv4Addr {
        self.book.public_addr_of(client)
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Every flow's key (from the user-space index: no syscalls).
    pub fn keys(&self) -> impl Iterator<Item = &FlowKey> {
        self.book.iter().map(|(k, _)| k)
    }

    /// How many distinct (public address, NAT port) pairs the flows use.
    pub fn nat_ports_in_use(&self) -> usize {
        self.book.nat_ports_in_use()
    }

    /// The flow's NAT port, if it exists.
    pub fn get(&self, key: &FlowKey) -> Option<u16> {
        self.book.get(key).map(|m| m.nat.port)
    }

    /// The flow's public address and NAT port, if it exists.
    pub fn nat(&self, key: &FlowKey) -> Option<Nat> {
        self.book.get(key).map(|m| m.nat)
    }

    /// Makes sure `key` has a flow and returns its NAT port (on the
    /// client's public address, [`Self::public_addr_of`]). How the port is
    /// chosen and which limits apply: [`NatBook::allocate`].
    pub fn create(&mut self, key: FlowKey, now_ns: u64) -> Result<u16, FlowError> {
        if let Some(m) = self.book.get(&key) {
            return Ok(m.nat.port);
        }
        let n = self.book.ports().len();
        let mut rng = rand::rng();
        let draws: [u32; crate::nat::RANDOM_TRIES] =
            std::array::from_fn(|_| rng.random_range(0..n));
        let capacity = self.book.capacity();
        let value = ReverseFlow {
            client_addr: key.client_addr,
            client_port: key.client_port,
            ..Default::default()
        };
        let (reverse, forwarded) = (&mut self.reverse, self.forwarded.as_ref());
        // The reverse entry first, with BPF_NOEXIST: it claims the port
        // toward that endpoint on that address atomically. Then a
        // forwarded connection's reply entry on the same port is looked
        // for, as the datapath does the other way round: a target behind
        // the WAN answers to NAT ports on the gateway's public address.
        let nat = self.book.allocate(&key, &draws, |rkey| {
            match reverse.insert(rkey, value, BPF_NOEXIST) {
                Ok(())
                    if forwarded.is_some_and(|f| f.get(&rkey.as_forwarded_reply(), 0).is_ok()) =>
                {
                    let _ = reverse.remove(&rkey);
                    Ok(false)
                }
                Ok(()) => Ok(true),
                // Taken behind our back (a flow we don't know): skip it.
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
                {
                    Ok(false)
                }
                Err(source) => Err(map_error(
                    "insert",
                    veil_common::REVERSE_MAP,
                    source,
                    capacity,
                )),
            }
        })?;
        let egress = EgressFlow {
            public_addr: nat.addr.octets(),
            nat_port: nat.port,
            ..Default::default()
        };
        if let Err(source) = self.egress.insert(key, egress, BPF_NOEXIST) {
            let _ = self.reverse.remove(&key.reverse(nat.addr, nat.port));
            return Err(map_error(
                "insert",
                veil_common::EGRESS_MAP,
                source,
                capacity,
            ));
        }
        self.book.insert(key, nat, now_ns);
        self.known.insert(key);
        Ok(nat.port)
    }

    /// Removes a flow; `false` if there was none.
    pub fn delete(&mut self, key: &FlowKey) -> Result<bool, FlowError> {
        let Some(mapped) = self.book.remove(key) else {
            return Ok(false);
        };
        // Out of the index first: no packet is let through without the
        // lock once the entries start going.
        self.known.remove(key);
        let rkey = key.reverse(mapped.nat.addr, mapped.nat.port);
        // Egress first: the client's packets stop before replies do.
        let r1 = remove_ignoring_missing(&mut self.egress, key, veil_common::EGRESS_MAP);
        let r2 = remove_ignoring_missing(&mut self.reverse, &rkey, veil_common::REVERSE_MAP);
        r1.and(r2).map(|()| true)
    }

    /// Removes every flow of one client; returns how many.
    pub fn delete_client(&mut self, client: Ipv4Addr) -> Result<usize, FlowError> {
        let keys = self.client_keys(client);
        for key in &keys {
            self.delete(key)?;
        }
        Ok(keys.len())
    }

    /// The keys of one client's flows (from the user-space index: no
    /// syscalls), for a caller that removes them in slices.
    pub fn client_keys(&self, client: Ipv4Addr) -> Vec<FlowKey> {
        let addr = client.octets();
        self.keys()
            .filter(|k| k.client_addr == addr)
            .copied()
            .collect()
    }

    /// Every flow with the datapath's view of it.
    pub fn list(&self) -> Result<Vec<Flow>, FlowError> {
        self.book
            .iter()
            .map(|(key, mapped)| self.flow(key, mapped))
            .collect()
    }

    /// [`Self::list`] for some flows only (those of `keys` that still
    /// exist): lets a caller read a large table in slices, releasing its
    /// lock in between.
    pub fn list_some(&self, keys: &[FlowKey]) -> Result<Vec<Flow>, FlowError> {
        keys.iter()
            .filter_map(|key| self.book.get(key).map(|m| self.flow(key, &m)))
            .collect()
    }

    fn flow(&self, key: &FlowKey, mapped: &Mapped) -> Result<Flow, FlowError> {
        let egress = lookup(&self.egress, key, veil_common::EGRESS_MAP)?;
        let reverse = lookup(
            &self.reverse,
            &key.reverse(mapped.nat.addr, mapped.nat.port),
            veil_common::REVERSE_MAP,
        )?;
        Ok(Flow {
            key: *key,
            public_addr: mapped.nat.addr,
            nat_port: mapped.nat.port,
            created_ns: mapped.created_ns,
            egress: egress.map(|v| v.stats).unwrap_or_default(),
            reverse: reverse.map(|v| v.stats).unwrap_or_default(),
        })
    }

    /// Expires the flows idle for longer than their protocol and state allow.
    pub fn gc(&mut self, now_ns: u64) -> Result<GcReport, FlowError> {
        let keys: Vec<FlowKey> = self.keys().copied().collect();
        self.expire(&keys, now_ns)
    }

    /// [`Self::gc`] for some flows only (those of `keys` that still exist):
    /// lets a caller sweep a large table in slices, releasing its lock in
    /// between.
    pub fn expire(&mut self, keys: &[FlowKey], now_ns: u64) -> Result<GcReport, FlowError> {
        let mut report = GcReport::default();
        for key in keys {
            let Some(mapped) = self.book.get(key) else {
                continue;
            };
            report.examined += 1;
            let flow = self.flow(key, &mapped)?;
            if flow.expired(now_ns, &self.timeouts) {
                report.expired.push(*key);
            }
        }
        for key in &report.expired {
            self.delete(key)?;
        }
        Ok(report)
    }
}

pub(crate) fn lookup<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<Option<V>, FlowError> {
    match map.get(key, 0) {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(FlowError::Map {
            op: "lookup",
            map: name,
            source,
        }),
    }
}

pub(crate) fn remove_ignoring_missing<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<(), FlowError> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(FlowError::Map {
            op: "delete",
            map: name,
            source,
        }),
    }
}

pub(crate) fn map_error(
    op: &'static str,
    map: &'static str,
    source: MapError,
    capacity: usize,
) -> FlowError {
    match &source {
        MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
            FlowError::TableFull(capacity)
        }
        _ => FlowError::Map { op, map, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_flows_are_one_set_shared_by_every_handle() {
        let known = KnownFlows::<u32>::default();
        let reader = known.clone();
        known.insert(7);
        assert!(reader.contains(&7) && !reader.contains(&8));
        assert_eq!(reader.len(), 1);
        known.remove(&7);
        assert!(!reader.contains(&7) && reader.is_empty());
    }

    #[test]
    fn port_range_parses() {
        assert_eq!(
            "61000-65535".parse::<PortRange>().unwrap(),
            PortRange::DEFAULT
        );
        assert_eq!(PortRange::DEFAULT.len(), 4536);
        for bad in ["", "61000", "0-10", "10-9", "1-70000", "a-b"] {
            let err = bad.parse::<PortRange>().unwrap_err();
            assert!(err.to_string().contains("MIN-MAX"), "{bad}: {err}");
        }
    }

    fn flow(proto: u8, out: u64, back: u64) -> Flow {
        flow_to(proto, 2, out, back)
    }

    fn flow_to(proto: u8, remote_port: u16, out: u64, back: u64) -> Flow {
        Flow {
            key: FlowKey::new(
                proto,
                Ipv4Addr::LOCALHOST,
                1,
                Ipv4Addr::LOCALHOST,
                remote_port,
            ),
            public_addr: Ipv4Addr::new(198, 18, 0, 1),
            nat_port: 61000,
            created_ns: 0,
            egress: FlowStats {
                tcp_flags: out,
                ..Default::default()
            },
            reverse: FlowStats {
                tcp_flags: back,
                ..Default::default()
            },
        }
    }

    #[test]
    fn timeouts_follow_protocol_and_tcp_state() {
        use tcp_flags::*;
        let t = Timeouts::default();
        assert_eq!(flow(proto::UDP, 0, 0).timeout(&t), Duration::from_secs(120));
        // Plain DNS: shorter (RFC 4787 REQ-5 allows it for well-known ports).
        assert_eq!(
            flow_to(proto::UDP, 53, 0, 0).timeout(&t),
            Duration::from_secs(30)
        );
        assert_eq!(
            flow_to(proto::TCP, 53, SYN, 0).timeout(&t),
            t.tcp_transitory
        );
        assert_eq!(flow(proto::ICMP, 0, 0).timeout(&t), Duration::from_secs(60));
        // SYN sent, no answer yet: transitory.
        assert_eq!(flow(proto::TCP, SYN, 0).timeout(&t), t.tcp_transitory);
        // Answered but never acknowledged (a forged source's SYN): still
        // transitory.
        assert_eq!(
            flow(proto::TCP, SYN, SYN | ACK).timeout(&t),
            t.tcp_transitory
        );
        // Handshake done: established.
        assert_eq!(
            flow(proto::TCP, SYN | ACK, SYN | ACK).timeout(&t),
            Duration::from_secs(7440)
        );
        // One FIN or any RST: closing.
        assert_eq!(
            flow(proto::TCP, SYN | ACK | FIN, SYN | ACK).timeout(&t),
            t.tcp_transitory
        );
        assert_eq!(
            flow(proto::TCP, SYN | ACK, SYN | ACK | RST).timeout(&t),
            t.tcp_transitory
        );
    }
}
