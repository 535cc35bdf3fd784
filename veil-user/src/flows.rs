//! The flow table: the daemon's side of the NAT maps.
//!
//! The daemon owns every flow. Each has two entries in the kernel: egress
//! (the client's 5-tuple to its NAT port) and reverse (the remote's view
//! back to the client). The reverse entry goes in first with `BPF_NOEXIST`,
//! which claims the NAT port toward that remote endpoint atomically; the
//! same port may serve other remote endpoints at once.
//!
//! A mirror in user space answers "does this flow exist" and "is this port
//! taken toward that endpoint" without a syscall, so the per-packet check in
//! the session layer costs a hash lookup. The datapath writes last-seen
//! times, counters and TCP flags into the map values; [`FlowTable::gc`]
//! reads them to expire flows.

use std::{
    collections::{hash_map::Entry, HashMap as StdHashMap},
    fmt,
    net::Ipv4Addr,
    str::FromStr,
    time::Duration,
};

use aya::maps::{HashMap, MapData, MapError};
use rand::Rng;
use veil_common::{
    proto, tcp_flags, EgressFlow, FlowKey, FlowStats, ReverseFlow, ReverseKey, MAX_FLOWS,
};

const BPF_NOEXIST: u64 = 1;

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

/// How long an idle flow lives, by protocol and state. The defaults are the
/// minimums of RFC 5382 (TCP), RFC 4787 (UDP) and RFC 5508 (ICMP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Both sides have sent SYN and neither FIN nor RST was seen.
    pub tcp_established: Duration,
    /// Opening, closing or reset TCP.
    pub tcp_transitory: Duration,
    pub udp: Duration,
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_secs(2 * 3600 + 4 * 60),
            tcp_transitory: Duration::from_secs(4 * 60),
            udp: Duration::from_secs(2 * 60),
            icmp: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error(
        "no free NAT port toward {remote}:{remote_port} ({proto}): all {ports} ports of {range} are in use for that endpoint"
    )]
    PortsExhausted {
        proto: ProtoName,
        remote: Ipv4Addr,
        remote_port: u16,
        ports: u32,
        range: PortRange,
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
    pub nat_port: u16,
    pub created_ns: u64,
    /// Client to remote.
    pub egress: FlowStats,
    /// Remote to client.
    pub reverse: FlowStats,
}

impl fmt::Display for Flow {
    /// `tcp 10.77.0.2:50000 -> 198.18.0.2:443 via :61377`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = &self.key;
        write!(
            f,
            "{} {}:{} -> {}:{} via :{}",
            ProtoName(k.proto),
            k.client(),
            k.client_port,
            k.remote(),
            k.remote_port,
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

    /// How long this flow may stay idle, given what the datapath saw.
    pub fn timeout(&self, t: &Timeouts) -> Duration {
        match self.key.proto {
            proto::TCP => {
                let (out, back) = (self.egress.tcp_flags, self.reverse.tcp_flags);
                let opened = out & tcp_flags::SYN != 0 && back & tcp_flags::SYN != 0;
                let closing = (out | back) & (tcp_flags::RST | tcp_flags::FIN) != 0;
                if opened && !closing {
                    t.tcp_established
                } else {
                    t.tcp_transitory
                }
            }
            proto::UDP => t.udp,
            _ => t.icmp,
        }
    }
}

/// What one [`FlowTable::gc`] pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub examined: usize,
    pub expired: Vec<FlowKey>,
}

#[derive(Clone, Copy, Debug)]
struct Entry0 {
    nat_port: u16,
    created_ns: u64,
}

/// A client endpoint (proto, address, port): the unit of endpoint-independent
/// mapping.
type Endpoint = (u8, [u8; 4], u16);

#[derive(Clone, Copy, Debug)]
struct Mapping {
    nat_port: u16,
    flows: u32,
}

pub struct FlowTable {
    egress: HashMap<MapData, FlowKey, EgressFlow>,
    reverse: HashMap<MapData, ReverseKey, ReverseFlow>,
    ports: PortRange,
    timeouts: Timeouts,
    capacity: usize,
    /// Flows one client may hold, so that one cannot starve the others.
    per_client: usize,
    flows_of: StdHashMap<[u8; 4], usize>,
    flows: StdHashMap<FlowKey, Entry0>,
    claimed: StdHashMap<ReverseKey, FlowKey>,
    mappings: StdHashMap<Endpoint, Mapping>,
}

impl FlowTable {
    pub fn new(
        egress: HashMap<MapData, FlowKey, EgressFlow>,
        reverse: HashMap<MapData, ReverseKey, ReverseFlow>,
        ports: PortRange,
        timeouts: Timeouts,
    ) -> Self {
        Self {
            egress,
            reverse,
            ports,
            timeouts,
            capacity: MAX_FLOWS as usize,
            per_client: MAX_FLOWS as usize,
            flows_of: StdHashMap::new(),
            flows: StdHashMap::new(),
            claimed: StdHashMap::new(),
            mappings: StdHashMap::new(),
        }
    }

    /// Caps the table below the maps' size (`--max-flows`).
    pub fn with_capacity(mut self, flows: usize) -> Self {
        self.capacity = flows.min(MAX_FLOWS as usize);
        self
    }

    /// Caps the flows of each client (`--max-flows-per-client`).
    pub fn with_client_limit(mut self, flows: usize) -> Self {
        self.per_client = flows;
        self
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn ports(&self) -> PortRange {
        self.ports
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Every flow's key (from the user-space index: no syscalls).
    pub fn keys(&self) -> impl Iterator<Item = &FlowKey> {
        self.flows.keys()
    }

    /// How many distinct NAT ports the flows use.
    pub fn nat_ports_in_use(&self) -> usize {
        let ports: std::collections::HashSet<u16> =
            self.flows.values().map(|e| e.nat_port).collect();
        ports.len()
    }

    /// The flow's NAT port, if it exists.
    pub fn get(&self, key: &FlowKey) -> Option<u16> {
        self.flows.get(key).map(|e| e.nat_port)
    }

    /// Makes sure `key` has a flow and returns its NAT port. A client
    /// endpoint keeps the same NAT port toward every remote while it can
    /// (endpoint-independent mapping, RFC 4787 REQ-1); otherwise a random
    /// free port is taken (RFC 6056).
    pub fn create(&mut self, key: FlowKey, now_ns: u64) -> Result<u16, FlowError> {
        if let Some(e) = self.flows.get(&key) {
            return Ok(e.nat_port);
        }
        if !matches!(key.proto, proto::TCP | proto::UDP | proto::ICMP) {
            return Err(FlowError::Unsupported(key.proto));
        }
        if self.flows.len() >= self.capacity {
            return Err(FlowError::TableFull(self.capacity));
        }
        if self.flows_of.get(&key.client_addr).copied().unwrap_or(0) >= self.per_client {
            return Err(FlowError::ClientFull {
                client: key.client(),
                limit: self.per_client,
            });
        }
        let endpoint = (key.proto, key.client_addr, key.client_port);
        let preferred = self.mappings.get(&endpoint).map(|m| m.nat_port);
        let nat_port = self.claim(&key, preferred)?;
        let egress = EgressFlow {
            nat_port,
            ..Default::default()
        };
        if let Err(source) = self.egress.insert(key, egress, BPF_NOEXIST) {
            let _ = self.reverse.remove(&key.reverse(nat_port));
            return Err(map_error(
                "insert",
                veil_common::EGRESS_MAP,
                source,
                self.capacity,
            ));
        }
        *self.flows_of.entry(key.client_addr).or_default() += 1;
        self.flows.insert(
            key,
            Entry0 {
                nat_port,
                created_ns: now_ns,
            },
        );
        self.claimed.insert(key.reverse(nat_port), key);
        self.mappings
            .entry(endpoint)
            .and_modify(|m| m.flows += 1)
            .or_insert(Mapping { nat_port, flows: 1 });
        Ok(nat_port)
    }

    /// Claims a NAT port toward `key`'s remote endpoint: inserts the reverse
    /// entry with `BPF_NOEXIST`, trying `preferred` first, then the range
    /// from a random point.
    fn claim(&mut self, key: &FlowKey, preferred: Option<u16>) -> Result<u16, FlowError> {
        let reverse = ReverseFlow {
            client_addr: key.client_addr,
            client_port: key.client_port,
            ..Default::default()
        };
        let n = self.ports.len();
        let start = rand::rng().random_range(0..n);
        let candidates = preferred
            .into_iter()
            .chain((0..n).map(|i| self.ports.min + ((start + i) % n) as u16));
        for port in candidates {
            let rkey = key.reverse(port);
            if self.claimed.contains_key(&rkey) {
                continue;
            }
            match self.reverse.insert(rkey, reverse, BPF_NOEXIST) {
                Ok(()) => return Ok(port),
                // Taken behind our back (a flow we don't know): skip it.
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(source) => {
                    return Err(map_error(
                        "insert",
                        veil_common::REVERSE_MAP,
                        source,
                        self.capacity,
                    ))
                }
            }
        }
        Err(FlowError::PortsExhausted {
            proto: ProtoName(key.proto),
            remote: key.remote(),
            remote_port: key.remote_port,
            ports: n,
            range: self.ports,
        })
    }

    /// Removes a flow; `false` if there was none.
    pub fn delete(&mut self, key: &FlowKey) -> Result<bool, FlowError> {
        let Some(entry) = self.flows.remove(key) else {
            return Ok(false);
        };
        if let Entry::Occupied(mut n) = self.flows_of.entry(key.client_addr) {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
        let rkey = key.reverse(entry.nat_port);
        self.claimed.remove(&rkey);
        let endpoint = (key.proto, key.client_addr, key.client_port);
        if let Entry::Occupied(mut m) = self.mappings.entry(endpoint) {
            m.get_mut().flows -= 1;
            if m.get().flows == 0 {
                m.remove();
            }
        }
        // Egress first: the client's packets stop before replies do.
        let r1 = remove_ignoring_missing(&mut self.egress, key, veil_common::EGRESS_MAP);
        let r2 = remove_ignoring_missing(&mut self.reverse, &rkey, veil_common::REVERSE_MAP);
        r1.and(r2).map(|()| true)
    }

    /// Removes every flow of one client; returns how many.
    pub fn delete_client(&mut self, client: Ipv4Addr) -> Result<usize, FlowError> {
        let addr = client.octets();
        let keys: Vec<FlowKey> = self
            .flows
            .keys()
            .filter(|k| k.client_addr == addr)
            .copied()
            .collect();
        for key in &keys {
            self.delete(key)?;
        }
        Ok(keys.len())
    }

    /// Every flow with the datapath's view of it.
    pub fn list(&self) -> Result<Vec<Flow>, FlowError> {
        self.flows
            .iter()
            .map(|(key, entry)| self.flow(key, entry))
            .collect()
    }

    /// [`Self::list`] for some flows only (those of `keys` that still
    /// exist): lets a caller read a large table in slices, releasing its
    /// lock in between.
    pub fn list_some(&self, keys: &[FlowKey]) -> Result<Vec<Flow>, FlowError> {
        keys.iter()
            .filter_map(|key| self.flows.get(key).map(|entry| self.flow(key, entry)))
            .collect()
    }

    fn flow(&self, key: &FlowKey, entry: &Entry0) -> Result<Flow, FlowError> {
        let egress = lookup(&self.egress, key, veil_common::EGRESS_MAP)?;
        let reverse = lookup(
            &self.reverse,
            &key.reverse(entry.nat_port),
            veil_common::REVERSE_MAP,
        )?;
        Ok(Flow {
            key: *key,
            nat_port: entry.nat_port,
            created_ns: entry.created_ns,
            egress: egress.map(|v| v.stats).unwrap_or_default(),
            reverse: reverse.map(|v| v.stats).unwrap_or_default(),
        })
    }

    /// Expires the flows idle for longer than their protocol and state allow.
    pub fn gc(&mut self, now_ns: u64) -> Result<GcReport, FlowError> {
        let keys: Vec<FlowKey> = self.flows.keys().copied().collect();
        self.expire(&keys, now_ns)
    }

    /// [`Self::gc`] for some flows only (those of `keys` that still exist):
    /// lets a caller sweep a large table in slices, releasing its lock in
    /// between.
    pub fn expire(&mut self, keys: &[FlowKey], now_ns: u64) -> Result<GcReport, FlowError> {
        let mut report = GcReport::default();
        for key in keys {
            let Some(entry) = self.flows.get(key) else {
                continue;
            };
            report.examined += 1;
            let flow = self.flow(key, entry)?;
            let idle = Duration::from_nanos(now_ns.saturating_sub(flow.last_seen_ns()));
            if idle > flow.timeout(&self.timeouts) {
                report.expired.push(*key);
            }
        }
        for key in &report.expired {
            self.delete(key)?;
        }
        Ok(report)
    }
}

fn lookup<K: aya::Pod, V: aya::Pod>(
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

fn remove_ignoring_missing<K: aya::Pod, V: aya::Pod>(
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

fn map_error(op: &'static str, map: &'static str, source: MapError, capacity: usize) -> FlowError {
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
        Flow {
            key: FlowKey::new(proto, Ipv4Addr::LOCALHOST, 1, Ipv4Addr::LOCALHOST, 2),
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
        assert_eq!(flow(proto::ICMP, 0, 0).timeout(&t), Duration::from_secs(60));
        // SYN sent, no answer yet: transitory.
        assert_eq!(flow(proto::TCP, SYN, 0).timeout(&t), t.tcp_transitory);
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
