//! IPv6 flows (NAT66): the daemon's side of the IPv6 NAT maps
//! (`veil_common::maps6`), beside [`crate::flows::FlowTable`] for IPv4.
//!
//! Public API:
//! - [`FlowTable6::create`]`(key, vip, now_ns)`: makes sure the flow of
//!   `key` exists (the client is `vip`, its session's IPv4 address: the
//!   datapath polices its rate limit by it) and returns its NAT port.
//! - [`FlowTable6::get`], [`FlowTable6::delete`],
//!   [`FlowTable6::delete_client`]`(vip)`, [`FlowTable6::list`],
//!   [`FlowTable6::gc`]`(now_ns)`, [`FlowTable6::len`].
//!
//! The same rules as IPv4, kept smaller: one public IPv6 address (no
//! pooling to choose among), the reverse entry claimed first with
//! `BPF_NOEXIST`, endpoint-independent mapping (a client socket keeps its
//! NAT port toward every remote while it is free), random ports
//! otherwise (RFC 6056), a share of the ports per client and remote
//! endpoint, a per-client flow limit, and the IPv4 idle timeouts
//! ([`crate::flows::idle_timeout`]).

use std::{
    collections::{HashMap as StdMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use aya::maps::{HashMap, MapData, MapError};
use rand::Rng;
use veil_common::{
    proto, EgressFlow6, FlowKey6, FlowStats, ReverseFlow6, ReverseKey6, EGRESS6_MAP,
    IPPROTO_ICMPV6, MAX_FLOWS6, REVERSE6_MAP,
};

use crate::{
    flows::{
        expired, idle_timeout, lookup, map_error, remove_ignoring_missing, FlowError, KnownFlows,
        PortRange, ProtoName, Timeouts, BPF_NOEXIST,
    },
    nat::{decrement, default_share, Mapping, RANDOM_TRIES},
};

/// Why an IPv6 flow was not made.
#[derive(Debug, thiserror::Error)]
pub enum Flow6Error {
    #[error("no free NAT port toward [{remote}]:{remote_port} ({proto}): all {ports} ports of {range} are in use for that endpoint")]
    PortsExhausted {
        proto: ProtoName,
        remote: Ipv6Addr,
        remote_port: u16,
        ports: u32,
        range: PortRange,
    },
    #[error("client {client} holds {share} NAT ports toward [{remote}]:{remote_port}, its share of that endpoint (--max-ports-per-endpoint)")]
    ShareExhausted {
        client: Ipv6Addr,
        remote: Ipv6Addr,
        remote_port: u16,
        share: u32,
    },
    /// Table or client full, protocol not translated, a map error: as IPv4.
    #[error(transparent)]
    Flow(#[from] FlowError),
}

/// One IPv6 flow as [`FlowTable6::list`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow6 {
    pub key: FlowKey6,
    pub vip: Ipv4Addr,
    pub nat_port: u16,
    pub created_ns: u64,
    pub egress: FlowStats,
    pub reverse: FlowStats,
}

impl Flow6 {
    pub fn last_seen_ns(&self) -> u64 {
        self.created_ns
            .max(self.egress.last_seen_ns)
            .max(self.reverse.last_seen_ns)
    }
}

#[derive(Clone, Copy, Debug)]
struct Mapped6 {
    nat_port: u16,
    vip: Ipv4Addr,
    created_ns: u64,
}

/// A remote endpoint: (protocol, address, port).
type Remote6 = (u8, [u8; 16], u16);
/// A client socket: (protocol, address, port); its flows share a NAT port.
/// A client socket as [`crate::nat::Mapping`] tells its flows apart:
/// protocol, client address and port, and the remote address when the
/// mapping depends on it (all zeros otherwise).
type Socket6 = (u8, [u8; 16], u16, [u8; 16]);

pub struct FlowTable6 {
    egress: HashMap<MapData, FlowKey6, EgressFlow6>,
    reverse: HashMap<MapData, ReverseKey6, ReverseFlow6>,
    public: Ipv6Addr,
    ports: PortRange,
    timeouts: Timeouts,
    capacity: usize,
    per_client: usize,
    share: u32,
    flows: StdMap<FlowKey6, Mapped6>,
    /// The keys of `flows`, for lookups without the table's lock.
    known: KnownFlows<FlowKey6>,
    claimed: HashSet<ReverseKey6>,
    flows_of: StdMap<[u8; 16], usize>,
    held: StdMap<([u8; 16], Remote6), u32>,
    /// Each client socket's NAT port and how many flows use it.
    sockets: StdMap<Socket6, (u16, u32)>,
    mapping: Mapping,
}

impl FlowTable6 {
    pub fn new(
        egress: HashMap<MapData, FlowKey6, EgressFlow6>,
        reverse: HashMap<MapData, ReverseKey6, ReverseFlow6>,
        public: Ipv6Addr,
        ports: PortRange,
        timeouts: Timeouts,
    ) -> Self {
        Self {
            egress,
            reverse,
            public,
            ports,
            timeouts,
            capacity: MAX_FLOWS6 as usize,
            per_client: usize::MAX,
            share: default_share(ports),
            flows: StdMap::new(),
            known: KnownFlows::default(),
            claimed: HashSet::new(),
            flows_of: StdMap::new(),
            held: StdMap::new(),
            sockets: StdMap::new(),
            mapping: Mapping::default(),
        }
    }

    /// Which flows of one client socket share a NAT port, as for IPv4.
    pub fn with_mapping(mut self, mapping: Mapping) -> Self {
        self.mapping = mapping;
        self
    }

    fn socket(&self, key: &FlowKey6) -> Socket6 {
        let remote = match self.mapping {
            Mapping::EndpointIndependent => [0; 16],
            Mapping::AddressDependent => key.remote_addr,
        };
        (key.proto, key.client_addr, key.client_port, remote)
    }

    /// Caps the flows of each client (`--max-flows-per-client`).
    pub fn with_client_limit(mut self, flows: usize) -> Self {
        self.per_client = flows;
        self
    }

    /// Caps the ports one client holds toward one endpoint.
    pub fn with_port_share(mut self, ports: u32) -> Self {
        self.share = ports.max(1);
        self
    }

    pub fn public_addr(&self) -> Ipv6Addr {
        self.public
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// The flows that exist, readable without this table's lock (see
    /// [`KnownFlows`]): a handle the table keeps up to date.
    pub fn known(&self) -> KnownFlows<FlowKey6> {
        self.known.clone()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// The flow's NAT port, if it exists.
    pub fn get(&self, key: &FlowKey6) -> Option<u16> {
        self.flows.get(key).map(|m| m.nat_port)
    }

    fn admit(&self, key: &FlowKey6, vip: Ipv4Addr) -> Result<(), Flow6Error> {
        if !matches!(key.proto, proto::TCP | proto::UDP | IPPROTO_ICMPV6) {
            return Err(FlowError::Unsupported(key.proto).into());
        }
        if self.flows.len() >= self.capacity {
            return Err(FlowError::TableFull(self.capacity).into());
        }
        if self.flows_of.get(&key.client_addr).copied().unwrap_or(0) >= self.per_client {
            return Err(FlowError::ClientFull {
                client: vip,
                limit: self.per_client,
            }
            .into());
        }
        if self
            .held
            .get(&(key.client_addr, remote(key)))
            .copied()
            .unwrap_or(0)
            >= self.share
        {
            return Err(Flow6Error::ShareExhausted {
                client: key.client(),
                remote: key.remote(),
                remote_port: key.remote_port,
                share: self.share,
            });
        }
        Ok(())
    }

    /// Makes sure `key` (from the client whose session is `vip`) has a flow
    /// and returns its NAT port on [`Self::public_addr`].
    pub fn create(&mut self, key: FlowKey6, vip: Ipv4Addr, now_ns: u64) -> Result<u16, Flow6Error> {
        if let Some(m) = self.flows.get(&key) {
            return Ok(m.nat_port);
        }
        self.admit(&key, vip)?;
        let n = self.ports.len();
        let mut rng = rand::rng();
        let draws: [u32; RANDOM_TRIES] = std::array::from_fn(|_| rng.random_range(0..n));
        let port_at = |offset: u32| self.ports.min + (offset % n) as u16;
        let preferred = self.sockets.get(&self.socket(&key)).map(|s| s.0);
        let last = draws[RANDOM_TRIES - 1] % n + 1;
        let candidates = preferred
            .into_iter()
            .chain(draws.iter().map(|d| port_at(*d)))
            .chain((0..n).map(|i| port_at(last + i)));
        let value = ReverseFlow6 {
            client_addr: key.client_addr,
            client_vip: vip.octets(),
            client_port: key.client_port,
            ..Default::default()
        };
        let mut nat_port = None;
        for port in candidates {
            let rkey = key.reverse(self.public, port);
            if self.claimed.contains(&rkey) {
                continue;
            }
            match self.reverse.insert(rkey, value, BPF_NOEXIST) {
                Ok(()) => {
                    nat_port = Some(port);
                    break;
                }
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(source) => {
                    return Err(map_error("insert", REVERSE6_MAP, source, self.capacity).into())
                }
            }
        }
        let Some(nat_port) = nat_port else {
            return Err(Flow6Error::PortsExhausted {
                proto: ProtoName(key.proto),
                remote: key.remote(),
                remote_port: key.remote_port,
                ports: n,
                range: self.ports,
            });
        };
        let egress = EgressFlow6 {
            public_addr: self.public.octets(),
            client_vip: vip.octets(),
            nat_port,
            ..Default::default()
        };
        if let Err(source) = self.egress.insert(key, egress, BPF_NOEXIST) {
            let _ = self.reverse.remove(&key.reverse(self.public, nat_port));
            return Err(map_error("insert", EGRESS6_MAP, source, self.capacity).into());
        }
        self.record(key, nat_port, vip, now_ns);
        Ok(nat_port)
    }

    fn record(&mut self, key: FlowKey6, nat_port: u16, vip: Ipv4Addr, now_ns: u64) {
        let mapped = Mapped6 {
            nat_port,
            vip,
            created_ns: now_ns,
        };
        self.flows.insert(key, mapped);
        self.known.insert(key);
        *self.flows_of.entry(key.client_addr).or_default() += 1;
        *self
            .held
            .entry((key.client_addr, remote(&key)))
            .or_default() += 1;
        self.claimed.insert(key.reverse(self.public, nat_port));
        let socket = self.socket(&key);
        self.sockets
            .entry(socket)
            .and_modify(|s| s.1 += 1)
            .or_insert((nat_port, 1));
    }

    /// Removes a flow; `false` if there was none.
    pub fn delete(&mut self, key: &FlowKey6) -> Result<bool, FlowError> {
        let Some(mapped) = self.flows.remove(key) else {
            return Ok(false);
        };
        self.known.remove(key);
        let rkey = key.reverse(self.public, mapped.nat_port);
        self.claimed.remove(&rkey);
        decrement(&mut self.flows_of, key.client_addr);
        decrement(&mut self.held, (key.client_addr, remote(key)));
        let socket = self.socket(key);
        if let Some(s) = self.sockets.get_mut(&socket) {
            s.1 -= 1;
            if s.1 == 0 {
                self.sockets.remove(&socket);
            }
        }
        let r1 = remove_ignoring_missing(&mut self.egress, key, EGRESS6_MAP);
        let r2 = remove_ignoring_missing(&mut self.reverse, &rkey, REVERSE6_MAP);
        r1.and(r2).map(|()| true)
    }

    /// Removes every IPv6 flow of the client whose session is `vip`;
    /// returns how many.
    pub fn delete_client(&mut self, vip: Ipv4Addr) -> Result<usize, FlowError> {
        let keys = self.client_keys(vip);
        for key in &keys {
            self.delete(key)?;
        }
        Ok(keys.len())
    }

    /// The keys of the flows of the client whose session is `vip` (no
    /// syscalls), for a caller that removes them in slices.
    pub fn client_keys(&self, vip: Ipv4Addr) -> Vec<FlowKey6> {
        self.flows
            .iter()
            .filter(|(_, m)| m.vip == vip)
            .map(|(k, _)| *k)
            .collect()
    }

    /// Every flow's key (from the user-space index: no syscalls).
    pub fn keys(&self) -> Vec<FlowKey6> {
        self.flows.keys().copied().collect()
    }

    /// Every flow with the datapath's view of it.
    pub fn list(&self) -> Result<Vec<Flow6>, FlowError> {
        self.list_some(&self.keys())
    }

    /// [`Self::list`] for those of `keys` that still exist.
    pub fn list_some(&self, keys: &[FlowKey6]) -> Result<Vec<Flow6>, FlowError> {
        keys.iter()
            .filter_map(|key| self.flows.get(key).map(|m| (key, m)))
            .map(|(key, m)| {
                let egress = lookup(&self.egress, key, EGRESS6_MAP)?;
                let reverse = lookup(
                    &self.reverse,
                    &key.reverse(self.public, m.nat_port),
                    REVERSE6_MAP,
                )?;
                Ok(Flow6 {
                    key: *key,
                    vip: m.vip,
                    nat_port: m.nat_port,
                    created_ns: m.created_ns,
                    egress: egress.map(|v| v.stats).unwrap_or_default(),
                    reverse: reverse.map(|v| v.stats).unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Expires the flows idle longer than their protocol and state allow;
    /// returns the expired keys.
    pub fn gc(&mut self, now_ns: u64) -> Result<Vec<FlowKey6>, FlowError> {
        self.expire(&self.keys(), now_ns)
    }

    /// [`Self::gc`] for those of `keys` that still exist: a caller sweeps
    /// a large table in slices, releasing its lock in between.
    pub fn expire(&mut self, keys: &[FlowKey6], now_ns: u64) -> Result<Vec<FlowKey6>, FlowError> {
        let expired: Vec<FlowKey6> = self
            .list_some(keys)?
            .into_iter()
            .filter(|f| {
                let k = &f.key;
                let timeout = idle_timeout(
                    k.proto,
                    k.remote_port,
                    &f.egress,
                    &f.reverse,
                    &self.timeouts,
                );
                expired(f.created_ns, &f.egress, &f.reverse, timeout, now_ns)
            })
            .map(|f| f.key)
            .collect();
        for key in &expired {
            self.delete(key)?;
        }
        Ok(expired)
    }
}

fn remote(key: &FlowKey6) -> Remote6 {
    (key.proto, key.remote_addr, key.remote_port)
}
