//! Port forwarding rules (`--forward FILE`): the file, what each rule
//! resolves to, and the daemon's side of the forwarding maps.
//!
//! The file has one rule a line, `listen_port,target_host,target_port[,tcp|udp]`:
//!
//! ```text
//! # listen_port,target_host,target_port,proto
//! 8080,10.200.9.2,80
//! 2222,build.lan,22,tcp
//! 5353,10.200.9.3,53,udp
//! ```
//!
//! Comments (`#` to the end of the line), blank lines, CRLF line ends, a
//! header line and spaces around fields are fine. A bad line is reported
//! with its file, number and reason and skipped; the others still work.
//! Host names are resolved when the file is loaded (at start, on SIGHUP
//! and when it changes): a name that does not resolve, or a rule that
//! would open the gateway itself, affects only its own rule.
//!
//! [`parse`] is pure; [`resolve`] asks the system (DNS, routes, ports in
//! use); [`Forwarder`] writes the rules into the datapath and expires the
//! connections it made.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket},
    path::Path,
};

use aya::maps::{HashMap, MapData, MapError};
use veil_common::{
    fwd_dir, holds_share, proto, FlowKey, FwdCounters, FwdFlow, FwdKey, FwdRule, FwdRuleKey,
    FWD_FLOWS_MAP, FWD_RULES_MAP, FWD_SOURCES_MAP, FWD_STATS_MAP, MAX_FWD_RULES,
};

use crate::{
    flows::{Flow, PortRange, ProtoName, Timeouts},
    net::{iface_ipv4s, Ipv4Net},
};

/// Where a rule sends its connections, as written.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// An address or a host name.
    Host(String),
    /// A connected client, by name (`client:NAME`).
    Client(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Host(h) => f.write_str(h),
            Target::Client(c) => write!(f, "client:{c}"),
        }
    }
}

/// One line of the file, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Its line number, from 1.
    pub line: usize,
    pub proto: u8,
    pub listen_port: u16,
    pub target: Target,
    pub target_port: u16,
}

impl Rule {
    pub fn key(&self) -> FwdRuleKey {
        FwdRuleKey::new(self.proto, self.listen_port)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} -> {}:{}",
            ProtoName(self.proto),
            self.listen_port,
            self.target,
            self.target_port
        )
    }
}

/// Why a line or a rule is not used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("expected listen_port,target_host,target_port[,tcp|udp], found {0} field(s)")]
    Fields(usize),
    #[error("{field} `{value}` is not a port (1-65535)")]
    Port { field: &'static str, value: String },
    #[error("protocol `{0}` is neither tcp nor udp")]
    Proto(String),
    #[error("no target host")]
    NoHost,
    #[error("{0} is already forwarded by line {1}")]
    Repeated(String, usize),
    #[error("more than {0} rules: this one is skipped")]
    TooMany(u32),
    #[error("target host `{0}` does not resolve to an IPv4 address")]
    Unresolved(String),
    #[error("listen port {0} is in the NAT port range {1}")]
    InNatRange(u16, PortRange),
    #[error("listen port {0} ({1}) is in use on the gateway")]
    PortInUse(u16, ProtoName),
    #[error(
        "listen port {0} is in the gateway's ephemeral range {1} (net.ipv4.ip_local_port_range): \
         the gateway's own connections may draw it, and their replies would be forwarded; \
         reserve it (net.ipv4.ip_local_reserved_ports) or pick another"
    )]
    Ephemeral(u16, PortRange),
    #[error("target {0} is the gateway itself: a rule may not open the gateway's own services")]
    Gateway(Ipv4Addr),
    #[error("target {0} is a client address: name the client instead (client:NAME)")]
    ClientAddr(Ipv4Addr),
    #[error("target {0} cannot be forwarded to (unspecified, multicast or broadcast)")]
    Unusable(Ipv4Addr),
    #[error("no route to target {0}")]
    NoRoute(Ipv4Addr),
    #[error(
        "client `{0}` has no address yet (it has never connected): the rule applies once it does"
    )]
    ClientAbsent(String),
}

/// A line that was skipped, and why: `rules.csv:4: ...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub error: RuleError,
}

impl Problem {
    /// The report, naming the file.
    pub fn report(&self, path: &Path) -> String {
        format!("{}:{}: {}", path.display(), self.line, self.error)
    }
}

/// Parses a rule file's text: the rules, and the lines skipped.
pub fn parse(text: &str) -> (Vec<Rule>, Vec<Problem>) {
    let mut rules: Vec<Rule> = Vec::new();
    let mut problems = Vec::new();
    let mut seen_content = false;
    // A byte-order mark, as some Windows editors write: not part of the
    // first field.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, raw) in text.split('\n').enumerate() {
        let line = i + 1;
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let first = !seen_content;
        seen_content = true;
        let fields: Vec<&str> = content.split(',').map(str::trim).collect();
        // A header: the first line, names only. A rule with a typo in its
        // first field still has a number in its third, and is reported.
        let is_name = |f: &&str| f.parse::<u32>().is_err() && f.chars().any(char::is_alphabetic);
        if first && fields.iter().all(|f| f.is_empty() || is_name(f)) && is_name(&fields[0]) {
            continue;
        }
        match parse_line(line, &fields) {
            Ok(_) if rules.len() >= MAX_FWD_RULES as usize => problems.push(Problem {
                line,
                error: RuleError::TooMany(MAX_FWD_RULES),
            }),
            Ok(rule) => match rules.iter().find(|r| r.key() == rule.key()) {
                Some(earlier) => problems.push(Problem {
                    line,
                    error: RuleError::Repeated(
                        format!("{}/{}", ProtoName(rule.proto), rule.listen_port),
                        earlier.line,
                    ),
                }),
                None => rules.push(rule),
            },
            Err(error) => problems.push(Problem { line, error }),
        }
    }
    (rules, problems)
}

fn parse_line(line: usize, fields: &[&str]) -> Result<Rule, RuleError> {
    if !(3..=4).contains(&fields.len()) {
        return Err(RuleError::Fields(fields.len()));
    }
    let port = |field, value: &str| match value.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(RuleError::Port {
            field,
            value: value.to_owned(),
        }),
    };
    let listen_port = port("listen_port", fields[0])?;
    let target_port = port("target_port", fields[2])?;
    let host = fields[1];
    let target = match host.strip_prefix("client:") {
        Some(name) if !name.is_empty() => Target::Client(name.to_owned()),
        _ if host.is_empty() || host == "client:" => return Err(RuleError::NoHost),
        _ => Target::Host(host.to_owned()),
    };
    let proto = match fields.get(3).map(|p| p.to_ascii_lowercase()) {
        None => proto::TCP,
        Some(p) if p == "tcp" => proto::TCP,
        Some(p) if p == "udp" => proto::UDP,
        Some(p) if p.is_empty() => proto::TCP,
        Some(p) => return Err(RuleError::Proto(p)),
    };
    Ok(Rule {
        line,
        proto,
        listen_port,
        target,
        target_port,
    })
}

/// What the gateway is, for checking that a rule does not open it.
#[derive(Clone, Debug)]
pub struct Gateway {
    /// Every address of the gateway (all interfaces).
    pub own: Vec<Ipv4Addr>,
    pub pool: Ipv4Net,
    pub nat_ports: PortRange,
    /// The interface clients' tunnels end on (never a target's).
    pub tun_ifindex: u32,
}

impl Gateway {
    /// Why `addr` may not be a target, if it may not.
    pub fn refuses(&self, addr: Ipv4Addr) -> Option<RuleError> {
        if addr.is_loopback() || self.own.contains(&addr) {
            return Some(RuleError::Gateway(addr));
        }
        if addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() {
            return Some(RuleError::Unusable(addr));
        }
        if self.pool.contains(addr) {
            return Some(RuleError::ClientAddr(addr));
        }
        None
    }
}

/// A rule resolved against the system: what goes into the rules map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub rule: Rule,
    pub value: FwdRule,
}

impl Resolved {
    pub fn target(&self) -> SocketAddr {
        SocketAddr::from((self.value.target_addr, self.value.target_port))
    }
}

/// Resolves parsed rules (DNS, routes, ports in use; blocking): those that
/// can work, and why the others cannot. `clients` maps a connected client's
/// name to its address (for `client:NAME`); `client_route` is the interface
/// and the gateway's address toward clients.
pub fn resolve(
    rules: Vec<Rule>,
    gw: &Gateway,
    clients: &dyn Fn(&str) -> Option<Ipv4Addr>,
    client_route: (u32, Ipv4Addr),
) -> (Vec<Resolved>, Vec<Problem>) {
    let mut ok = Vec::new();
    let mut problems = Vec::new();
    let local = LocalPorts::read();
    for rule in rules {
        match resolve_one(&rule, gw, &local, clients, client_route) {
            Ok(value) => ok.push(Resolved { rule, value }),
            Err(error) => problems.push(Problem {
                line: rule.line,
                error,
            }),
        }
    }
    (ok, problems)
}

fn resolve_one(
    rule: &Rule,
    gw: &Gateway,
    local: &LocalPorts,
    clients: &dyn Fn(&str) -> Option<Ipv4Addr>,
    client_route: (u32, Ipv4Addr),
) -> Result<FwdRule, RuleError> {
    if gw.nat_ports.contains(rule.listen_port) {
        return Err(RuleError::InNatRange(rule.listen_port, gw.nat_ports));
    }
    if local.draws(rule.listen_port) {
        return Err(RuleError::Ephemeral(rule.listen_port, local.range));
    }
    if port_in_use(rule.proto, rule.listen_port) {
        return Err(RuleError::PortInUse(
            rule.listen_port,
            ProtoName(rule.proto),
        ));
    }
    let (addr, (ifindex, snat)) = match &rule.target {
        Target::Client(name) => {
            let addr = clients(name).ok_or_else(|| RuleError::ClientAbsent(name.clone()))?;
            (addr, client_route)
        }
        Target::Host(host) => {
            let addr = lookup(host)?;
            if let Some(e) = gw.refuses(addr) {
                return Err(e);
            }
            let route = route_to(addr).ok_or(RuleError::NoRoute(addr))?;
            if route.0 == gw.tun_ifindex {
                return Err(RuleError::ClientAddr(addr));
            }
            (addr, route)
        }
    };
    Ok(FwdRule {
        target_addr: addr.octets(),
        snat_addr: snat.octets(),
        ifindex,
        target_port: rule.target_port,
        _pad: [0; 2],
    })
}

/// An address, or the first IPv4 address a host name resolves to.
fn lookup(host: &str) -> Result<Ipv4Addr, RuleError> {
    if let Ok(addr) = host.parse() {
        return Ok(addr);
    }
    (host, 0)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| {
            addrs.find_map(|a| match a.ip() {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
        })
        .ok_or_else(|| RuleError::Unresolved(host.to_owned()))
}

/// The interface the gateway reaches `addr` through, and its own address
/// there: the kernel's route, asked by connecting a UDP socket (which
/// sends nothing).
fn route_to(addr: Ipv4Addr) -> Option<(u32, Ipv4Addr)> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    sock.connect((addr, 9)).ok()?;
    let IpAddr::V4(src) = sock.local_addr().ok()?.ip() else {
        return None;
    };
    Some((iface_with(src)?, src))
}

/// The index of the interface that has `addr`.
fn iface_with(addr: Ipv4Addr) -> Option<u32> {
    ifaces()
        .into_iter()
        .find(|(_, name)| iface_ipv4s(name).is_ok_and(|a| a.contains(&addr)))
        .map(|(index, _)| index)
}

/// Every address of every interface of the gateway (its network
/// namespace): what a rule's target may not be.
pub fn own_addrs() -> Vec<Ipv4Addr> {
    ifaces()
        .iter()
        .flat_map(|(_, name)| iface_ipv4s(name).unwrap_or_default())
        .collect()
}

/// The interfaces of the calling thread's network namespace, by index
/// and name (from the kernel, not /sys, which may be another namespace's).
pub fn ifaces() -> Vec<(u32, String)> {
    // SAFETY: if_nameindex returns a list ended by a zero entry, freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut cur = list;
    loop {
        // SAFETY: within the list, up to its terminator.
        let entry = unsafe { &*cur };
        if entry.if_index == 0 {
            break;
        }
        // SAFETY: a NUL-terminated name.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.if_name) };
        found.push((entry.if_index, name.to_string_lossy().into_owned()));
        // SAFETY: the terminator has not been reached.
        cur = unsafe { cur.add(1) };
    }
    // SAFETY: the list from if_nameindex.
    unsafe { libc::if_freenameindex(list) };
    found
}

/// The ports the gateway's kernel gives its own outgoing sockets: a listen
/// port among them would catch the replies to one of them (a DNS
/// service's upstream answer, say) and forward them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LocalPorts {
    range: PortRange,
    reserved: Vec<PortRange>,
}

impl LocalPorts {
    /// The kernel's settings, or none drawn when they cannot be read.
    fn read() -> Self {
        let read = |name| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"));
        let range = read("ip_local_port_range").ok();
        let reserved = read("ip_local_reserved_ports").unwrap_or_default();
        Self::parse(range.as_deref().unwrap_or(""), &reserved)
    }

    /// `range` as `ip_local_port_range` prints it (`32768\t60999`),
    /// `reserved` as `ip_local_reserved_ports` does (`8080,9000-9100`).
    fn parse(range: &str, reserved: &str) -> Self {
        let mut bounds = range.split_whitespace().map(str::parse::<u16>);
        let range = match (bounds.next(), bounds.next()) {
            (Some(Ok(min)), Some(Ok(max))) if min <= max => PortRange { min, max },
            // Nothing drawn: an empty range.
            _ => PortRange { min: 1, max: 0 },
        };
        let reserved = reserved
            .trim()
            .split(',')
            .filter_map(|part| match part.split_once('-') {
                Some(_) => part.parse().ok(),
                None => part
                    .trim()
                    .parse()
                    .ok()
                    .map(|p| PortRange { min: p, max: p }),
            })
            .collect();
        Self { range, reserved }
    }

    /// Whether the kernel may give `port` to an outgoing socket.
    fn draws(&self, port: u16) -> bool {
        self.range.contains(port) && !self.reserved.iter().any(|r| r.contains(port))
    }
}

/// Whether a socket of the gateway already has `port`: forwarding it would
/// hide that service (or, for the tunnel listener, break it).
fn port_in_use(proto: u8, port: u16) -> bool {
    let addr = (Ipv4Addr::UNSPECIFIED, port);
    let taken = |e: std::io::Error| e.kind() == std::io::ErrorKind::AddrInUse;
    match proto {
        proto::TCP => std::net::TcpListener::bind(addr).err().is_some_and(taken),
        _ => UdpSocket::bind(addr).err().is_some_and(taken),
    }
}

/// The key of the connection entry a client's packet answers, if it can
/// be one: TCP or UDP from the client's own address `vip` to the gateway's
/// address inside the tunnel (`gateway`), where `client:NAME` connections
/// come from. Anything else (and any forged source) is not.
pub fn client_reply_key(pkt: &[u8], vip: Ipv4Addr, gateway: Ipv4Addr) -> Option<FwdKey> {
    if pkt.len() < 24 || pkt[0] != 0x45 || u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0 {
        return None;
    }
    let proto = pkt[9];
    let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
    let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
    if !matches!(proto, proto::TCP | proto::UDP) || src != vip || dst != gateway {
        return None;
    }
    Some(FwdKey {
        src_addr: src.octets(),
        dst_addr: dst.octets(),
        src_port: u16::from_be_bytes([pkt[20], pkt[21]]),
        dst_port: u16::from_be_bytes([pkt[22], pkt[23]]),
        proto,
        _pad: [0; 3],
    })
}

/// One rule's counters, as `status` shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleStatus {
    pub rule: String,
    pub target: String,
    pub counters: FwdCounters,
    /// Connections with entries now.
    pub open: usize,
}

/// What one [`Forwarder::apply`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
    pub unchanged: usize,
}

/// The daemon's side of the forwarding maps.
pub struct Forwarder {
    rules: HashMap<MapData, FwdRuleKey, FwdRule>,
    flows: HashMap<MapData, FwdKey, FwdFlow>,
    stats: HashMap<MapData, FwdRuleKey, FwdCounters>,
    /// Connections per remote address (`FWD_SOURCES_MAP`), set right at
    /// each expiry.
    sources: HashMap<MapData, u32, u64>,
    /// What is in the rules map, with the rule as written.
    current: BTreeMap<FwdRuleKey, Resolved>,
    timeouts: Timeouts,
}

/// Lookups in the forwarded connections that never wait for the
/// [`Forwarder`], whose expiry walks the whole table under its lock: a
/// handle of their own on the map (its descriptor duplicated).
pub struct Replies(HashMap<MapData, FwdKey, FwdFlow>);

impl Replies {
    pub fn new(flows: HashMap<MapData, FwdKey, FwdFlow>) -> Self {
        Self(flows)
    }

    /// Whether `key` is the reply side of a forwarded connection.
    pub fn contains(&self, key: &FwdKey) -> bool {
        self.0.get(key, 0).is_ok_and(|f| f.dir == fwd_dir::REPLY)
    }
}

/// A map operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} on BPF map `{map}`")]
pub struct MapOpError {
    op: &'static str,
    map: &'static str,
    #[source]
    source: MapError,
}

fn op_err(op: &'static str, map: &'static str) -> impl FnOnce(MapError) -> MapOpError {
    move |source| MapOpError { op, map, source }
}

/// One entry of the connections map: its key and value.
type Entry = (FwdKey, FwdFlow);

/// A connection as a walk of the table saw it.
struct Seen {
    inbound: Entry,
    /// The reply entry made with it.
    reply: Option<Entry>,
}

impl Seen {
    /// The connection as the NAT's expiry sees a flow: the remote plays
    /// the client, the target the remote.
    fn as_flow(&self) -> Flow {
        let (key, inbound) = self.inbound;
        Flow {
            key: FlowKey::new(
                key.proto,
                Ipv4Addr::from(key.src_addr),
                key.src_port,
                Ipv4Addr::from(inbound.dst_addr),
                inbound.dst_port,
            ),
            public_addr: Ipv4Addr::from(key.dst_addr),
            nat_port: inbound.src_port,
            created_ns: inbound.created_ns,
            egress: inbound.stats,
            reverse: self.reply.map(|(_, r)| r.stats).unwrap_or_default(),
        }
    }
}

/// Entries found expired, as they were seen: a connection's inbound entry
/// and its reply entry, or an orphaned reply entry alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired(Entry, Option<Entry>);

impl Forwarder {
    pub fn new(
        rules: HashMap<MapData, FwdRuleKey, FwdRule>,
        flows: HashMap<MapData, FwdKey, FwdFlow>,
        stats: HashMap<MapData, FwdRuleKey, FwdCounters>,
        sources: HashMap<MapData, u32, u64>,
        timeouts: Timeouts,
    ) -> Self {
        Self {
            rules,
            flows,
            stats,
            sources,
            current: BTreeMap::new(),
            timeouts,
        }
    }

    /// Makes the rules map what `wanted` says: new and changed rules
    /// written, removed ones deleted (their connections keep going until
    /// they expire: the map entries of a connection do not depend on its
    /// rule), unchanged ones not touched at all.
    pub fn apply(&mut self, wanted: Vec<Resolved>) -> Result<Applied, MapOpError> {
        let mut report = Applied::default();
        let wanted: BTreeMap<FwdRuleKey, Resolved> =
            wanted.into_iter().map(|r| (r.rule.key(), r)).collect();
        let gone: Vec<FwdRuleKey> = self
            .current
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            self.rules
                .remove(&key)
                .or_else(ignore_missing)
                .map_err(op_err("delete", FWD_RULES_MAP))?;
            self.stats
                .remove(&key)
                .or_else(ignore_missing)
                .map_err(op_err("delete", FWD_STATS_MAP))?;
            self.current.remove(&key);
            report.removed += 1;
        }
        for (key, r) in wanted {
            match self.current.get(&key) {
                Some(old) if old.value == r.value => {
                    report.unchanged += 1;
                    // The line may have moved; the rule did not.
                    self.current.insert(key, r);
                    continue;
                }
                Some(_) => report.changed += 1,
                None => {
                    self.stats
                        .insert(key, FwdCounters::default(), 0)
                        .map_err(op_err("insert", FWD_STATS_MAP))?;
                    report.added += 1;
                }
            }
            self.rules
                .insert(key, r.value, 0)
                .map_err(op_err("insert", FWD_RULES_MAP))?;
            self.current.insert(key, r);
        }
        Ok(report)
    }

    /// The rules in force.
    pub fn rules(&self) -> impl Iterator<Item = &Resolved> {
        self.current.values()
    }

    /// Interfaces targets are reached through.
    pub fn target_ifaces(&self) -> BTreeSet<u32> {
        self.current.values().map(|r| r.value.ifindex).collect()
    }

    /// The table in one walk: each connection (its inbound entry, and the
    /// reply entry made with it, when there is one), and the reply entries
    /// no inbound one was made with.
    fn walk(&self) -> (Vec<Seen>, Vec<Entry>) {
        let entries: std::collections::HashMap<FwdKey, FwdFlow> =
            self.flows.iter().filter_map(Result::ok).collect();
        let mut paired = BTreeSet::new();
        let connections: Vec<Seen> = entries
            .iter()
            .filter(|(_, v)| v.dir == fwd_dir::INBOUND)
            .map(|(k, v)| {
                let partner = v.partner();
                // The same `created_ns`: the NAT port may since have gone
                // to another connection.
                let reply = entries
                    .get(&partner)
                    .filter(|r| r.dir == fwd_dir::REPLY && r.created_ns == v.created_ns)
                    .map(|r| (partner, *r));
                if reply.is_some() {
                    paired.insert(partner);
                }
                Seen {
                    inbound: (*k, *v),
                    reply,
                }
            })
            .collect();
        let orphans = entries
            .into_iter()
            .filter(|(k, v)| v.dir == fwd_dir::REPLY && !paired.contains(k))
            .collect();
        (connections, orphans)
    }

    /// The connections idle past their timeout (the same timeouts as
    /// clients' flows), and reply entries left without an inbound one (it
    /// failed to go in) for the transitory timeout, as they were seen.
    pub fn expired(&self, now_ns: u64) -> Vec<Expired> {
        let (connections, orphans) = self.walk();
        self.expired_of(&connections, orphans, now_ns)
    }

    /// [`Self::expired`] of a walk's connections and orphans.
    fn expired_of(&self, connections: &[Seen], orphans: Vec<Entry>, now_ns: u64) -> Vec<Expired> {
        let mut expired: Vec<Expired> = connections
            .iter()
            .filter(|c| c.as_flow().expired(now_ns, &self.timeouts))
            .map(|c| Expired(c.inbound, c.reply))
            .collect();
        expired.extend(
            orphans
                .into_iter()
                .filter(|(_, v)| {
                    now_ns.saturating_sub(v.created_ns.max(v.stats.last_seen_ns))
                        > self.timeouts.tcp_transitory.as_nanos() as u64
                })
                .map(|orphan| Expired(orphan, None)),
        );
        expired
    }

    /// Removes what [`Self::expired`] found, each only if its entries are
    /// still as they were seen: meanwhile the datapath may have used one (a
    /// packet came), or made its key another connection's (a NAT port
    /// taken over, a tuple opened again), and that one is not to go.
    /// Returns how many went.
    pub fn remove(&mut self, expired: Vec<Expired>) -> Result<usize, MapOpError> {
        let mut gone = 0;
        for Expired(first, second) in expired {
            let entries = [Some(first), second];
            let unchanged = entries
                .iter()
                .flatten()
                .all(|(k, seen)| self.flows.get(k, 0).is_ok_and(|now| now == *seen));
            if !unchanged {
                continue;
            }
            // The inbound entry first: no new packets toward the target.
            for (key, _) in entries.iter().flatten() {
                self.flows
                    .remove(key)
                    .or_else(ignore_missing)
                    .map_err(op_err("delete", FWD_FLOWS_MAP))?;
            }
            gone += 1;
        }
        Ok(gone)
    }

    /// Expires idle connections and orphaned entries; returns how many
    /// went. Then sets each remote address's count of connections to
    /// what the table holds: the datapath's own count misses the ends it
    /// does not see (expiry, eviction, UDP).
    pub fn gc(&mut self, now_ns: u64) -> Result<usize, MapOpError> {
        let (connections, orphans) = self.walk();
        let expired = self.expired_of(&connections, orphans, now_ns);
        let gone: BTreeSet<FwdKey> = expired.iter().map(|e| e.0 .0).collect();
        let removed = self.remove(expired)?;
        let left: Vec<Seen> = connections
            .into_iter()
            .filter(|c| !gone.contains(&c.inbound.0))
            .collect();
        self.set_sources(&per_source(&left))?;
        Ok(removed)
    }

    /// Makes each address's count `live`'s, writing only the counts that
    /// differ, and takes out the addresses it does not name. A write that
    /// fails is skipped (the next expiry tries again), then reported.
    fn set_sources(&mut self, live: &BTreeMap<u32, u64>) -> Result<(), MapOpError> {
        let sources = &mut self.sources;
        let now: BTreeMap<u32, u64> = sources.iter().filter_map(Result::ok).collect();
        let mut failed = None;
        for key in now.keys().filter(|k| !live.contains_key(k)) {
            if let Err(e) = sources.remove(key).or_else(ignore_missing) {
                failed = Some(op_err("delete", FWD_SOURCES_MAP)(e));
            }
        }
        for (key, n) in live.iter().filter(|(k, n)| now.get(k) != Some(n)) {
            if let Err(e) = sources.insert(key, n, 0) {
                failed = Some(op_err("update", FWD_SOURCES_MAP)(e));
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Each rule in force with its counters and open connections.
    pub fn status(&self) -> Vec<RuleStatus> {
        let mut open: BTreeMap<FwdRuleKey, usize> = BTreeMap::new();
        for c in self.walk().0 {
            *open.entry(c.inbound.1.rule).or_default() += 1;
        }
        self.current
            .iter()
            .map(|(key, r)| RuleStatus {
                rule: format!("{}/{}", ProtoName(key.proto), key.listen_port),
                target: format!("{}:{}", r.rule.target, r.rule.target_port),
                counters: self.stats.get(key, 0).unwrap_or_default(),
                open: open.get(key).copied().unwrap_or(0),
            })
            .collect()
    }
}

/// Connections each remote address holds, as the datapath counts them
/// (keyed as it keys them): TCP connections that [`holds_share`]. UDP
/// cannot show that a remote owns its address, so it is not counted.
fn per_source(connections: &[Seen]) -> BTreeMap<u32, u64> {
    let mut live = BTreeMap::new();
    for c in connections {
        let (key, inbound) = c.inbound;
        let back = c.reply.map_or(0, |(_, r)| r.stats.tcp_flags);
        if inbound.rule.proto == proto::TCP && holds_share(inbound.stats.tcp_flags, back) {
            *live.entry(u32::from_ne_bytes(key.src_addr)).or_default() += 1;
        }
    }
    live
}

fn ignore_missing(e: MapError) -> Result<(), MapError> {
    match &e {
        MapError::KeyNotFound => Ok(()),
        MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(line: usize, listen: u16, host: &str, port: u16, proto: u8) -> Rule {
        Rule {
            line,
            proto,
            listen_port: listen,
            target: Target::Host(host.into()),
            target_port: port,
        }
    }

    #[test]
    fn each_address_counts_its_established_tcp_connections_that_are_not_over() {
        use veil_common::{tcp_flags, FlowStats};
        let seen = |addr: [u8; 4], proto: u8, out: u64, back: u64| {
            let entry = |tcp_flags, dir| FwdFlow {
                stats: FlowStats {
                    tcp_flags,
                    ..Default::default()
                },
                rule: FwdRuleKey::new(proto, 80),
                dir,
                ..Default::default()
            };
            let key = FwdKey {
                src_addr: addr,
                proto,
                ..Default::default()
            };
            Seen {
                inbound: (key, entry(out, fwd_dir::INBOUND)),
                reply: Some((key, entry(back, fwd_dir::REPLY))),
            }
        };
        let (a, b) = ([198, 18, 0, 2], [198, 18, 0, 3]);
        let open = tcp_flags::SYN | tcp_flags::ACK;
        // The inbound entry's high half: the handshake's acknowledgment.
        let noted = 0x8000_0001u64 << 32;
        let connections = [
            seen(a, proto::TCP, noted | open, open),
            seen(a, proto::TCP, open | tcp_flags::FIN, open),
            seen(a, proto::TCP, open | tcp_flags::FIN, open | tcp_flags::FIN),
            seen(a, proto::TCP, open, tcp_flags::RST),
            seen(a, proto::UDP, 0, 0),
            seen(b, proto::TCP, tcp_flags::SYN, open),
            seen(b, proto::UDP, 0, 0),
        ];
        let live = per_source(&connections);
        // a's open and half closed connections; not those closed both
        // ways or reset, nor UDP, nor b's handshake that is not over.
        assert_eq!(live.get(&u32::from_ne_bytes(a)), Some(&2));
        assert_eq!(live.len(), 1);
    }

    #[test]
    fn a_plain_file_parses() {
        let (rules, problems) = parse("8080,10.200.9.2,80\n5353,dns.lan,53,udp\n");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            rules,
            [
                rule(1, 8080, "10.200.9.2", 80, proto::TCP),
                rule(2, 5353, "dns.lan", 53, proto::UDP),
            ]
        );
    }

    #[test]
    fn comments_blank_lines_crlf_a_header_and_spaces_are_fine() {
        let text = "listen_port, target_host, target_port, proto\r\n\
                    # the web server\r\n\
                    \r\n\
                    \t8080 , 10.200.9.2 , 80 , TCP  # inline comment\r\n\
                    2222,build.lan,22\r\n";
        let (rules, problems) = parse(text);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            rules,
            [
                rule(4, 8080, "10.200.9.2", 80, proto::TCP),
                rule(5, 2222, "build.lan", 22, proto::TCP),
            ]
        );
    }

    #[test]
    fn a_typo_on_the_first_line_is_reported_not_taken_for_a_header() {
        let (rules, problems) = parse("8o8o,10.200.9.2,80\n9090,10.200.9.2,90\n");
        assert_eq!(rules, [rule(2, 9090, "10.200.9.2", 90, proto::TCP)]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].line, 1);
        assert!(
            problems[0].error.to_string().contains("8o8o"),
            "{problems:?}"
        );
    }

    #[test]
    fn rules_beyond_the_maps_room_are_reported_and_the_first_ones_kept() {
        let text: String = (1..=MAX_FWD_RULES + 2)
            .map(|i| format!("{i},10.200.9.2,80\n"))
            .collect();
        let (rules, problems) = parse(&text);
        assert_eq!(rules.len(), MAX_FWD_RULES as usize);
        assert_eq!(
            problems.iter().map(|p| p.line).collect::<Vec<_>>(),
            [MAX_FWD_RULES as usize + 1, MAX_FWD_RULES as usize + 2]
        );
        assert!(problems[0].error.to_string().contains("more than 4096"));
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_rule() {
        let (rules, problems) = parse("\u{feff}8080,10.200.9.2,80\n");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(rules, [rule(1, 8080, "10.200.9.2", 80, proto::TCP)]);
        let (rules, problems) = parse("\u{feff}listen_port,target_host,target_port\n8080,h,80\n");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(rules.len(), 1);
    }

    #[test]
    fn a_bad_line_is_reported_by_number_and_the_others_work() {
        let text = "8080,10.200.9.2,80\nnot a rule\n9090,10.200.9.2,99999\n7070,10.200.9.3,70,sctp\n6060,,60\n5050,h,50,udp,extra\n4040,10.200.9.4,40\n";
        let (rules, problems) = parse(text);
        assert_eq!(
            rules.iter().map(|r| r.line).collect::<Vec<_>>(),
            [1, 7],
            "{problems:?}"
        );
        let lines: Vec<usize> = problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, [2, 3, 4, 5, 6]);
        let report = problems[1].report(Path::new("/etc/veil/forward.csv"));
        assert_eq!(
            report,
            "/etc/veil/forward.csv:3: target_port `99999` is not a port (1-65535)"
        );
        assert_eq!(problems[0].error, RuleError::Fields(1));
        assert_eq!(problems[2].error, RuleError::Proto("sctp".into()));
        assert_eq!(problems[3].error, RuleError::NoHost);
        assert_eq!(problems[4].error, RuleError::Fields(5));
    }

    #[test]
    fn a_header_is_only_the_first_line() {
        let (rules, problems) = parse("8080,a,80\nlisten_port,target_host,target_port\n");
        assert_eq!(rules.len(), 1);
        assert_eq!(problems[0].line, 2);
    }

    #[test]
    fn one_port_one_rule_per_protocol() {
        let (rules, problems) = parse("53,a,53,udp\n53,b,53,tcp\n53,c,53,udp\n");
        assert_eq!(rules.len(), 2);
        assert_eq!(
            problems,
            [Problem {
                line: 3,
                error: RuleError::Repeated("udp/53".into(), 1),
            }]
        );
    }

    #[test]
    fn a_client_target_is_named() {
        let (rules, problems) = parse("2222,client:laptop,22\n2223,client:,22\n");
        assert_eq!(rules[0].target, Target::Client("laptop".into()));
        assert_eq!(rules[0].to_string(), "tcp/2222 -> client:laptop:22");
        assert_eq!(problems[0].error, RuleError::NoHost);
    }

    #[test]
    fn a_listen_port_the_kernel_draws_for_outgoing_sockets_is_refused() {
        let local = LocalPorts::parse("32768\t60999\n", "51820,55000-55010\n");
        assert!(local.draws(40000));
        assert!(!local.draws(51820), "reserved");
        assert!(!local.draws(55005), "reserved range");
        assert!(!local.draws(8080) && !local.draws(61000));
        assert!(
            !LocalPorts::parse("", "").draws(40000),
            "unknown: nothing drawn"
        );
        let rule = &parse("40000,10.200.9.2,80,udp\n").0[0];
        let err = resolve_one(
            rule,
            &gateway(),
            &local,
            &|_| None,
            (1, Ipv4Addr::LOCALHOST),
        );
        assert_eq!(
            err.unwrap_err(),
            RuleError::Ephemeral(
                40000,
                PortRange {
                    min: 32768,
                    max: 60999
                }
            )
        );
    }

    fn gateway() -> Gateway {
        Gateway {
            own: vec![Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(10, 200, 9, 1)],
            pool: "10.77.0.0/16".parse().unwrap(),
            nat_ports: PortRange::DEFAULT,
            tun_ifindex: 99,
        }
    }

    #[test]
    fn a_rule_may_not_open_the_gateway_or_its_clients() {
        let gw = gateway();
        for (addr, want) in [
            ("198.18.0.1", RuleError::Gateway([198, 18, 0, 1].into())),
            ("127.0.0.1", RuleError::Gateway(Ipv4Addr::LOCALHOST)),
            ("10.77.0.5", RuleError::ClientAddr([10, 77, 0, 5].into())),
            ("0.0.0.0", RuleError::Unusable(Ipv4Addr::UNSPECIFIED)),
            ("224.0.0.1", RuleError::Unusable([224, 0, 0, 1].into())),
        ] {
            assert_eq!(gw.refuses(addr.parse().unwrap()), Some(want), "{addr}");
        }
        assert_eq!(gw.refuses(Ipv4Addr::new(10, 200, 9, 2)), None);
    }

    #[test]
    fn resolving_refuses_each_bad_rule_alone() {
        let gw = gateway();
        let rules = vec![
            rule(1, 61000, "127.0.0.2", 80, proto::TCP),
            rule(2, 8080, "no-such-host.invalid", 80, proto::TCP),
            rule(3, 8081, "127.0.0.1", 80, proto::TCP),
            Rule {
                target: Target::Client("absent".into()),
                ..rule(4, 8082, "", 22, proto::TCP)
            },
            Rule {
                target: Target::Client("laptop".into()),
                ..rule(5, 8083, "", 22, proto::TCP)
            },
        ];
        let clients = |name: &str| (name == "laptop").then_some(Ipv4Addr::new(10, 77, 0, 2));
        let (ok, problems) = resolve(rules, &gw, &clients, (99, Ipv4Addr::new(10, 77, 0, 1)));
        let errors: Vec<_> = problems.iter().map(|p| (p.line, p.error.clone())).collect();
        assert_eq!(
            errors,
            [
                (1, RuleError::InNatRange(61000, PortRange::DEFAULT)),
                (2, RuleError::Unresolved("no-such-host.invalid".into())),
                (3, RuleError::Gateway(Ipv4Addr::LOCALHOST)),
                (4, RuleError::ClientAbsent("absent".into())),
            ]
        );
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].value.target_addr, [10, 77, 0, 2]);
        assert_eq!(ok[0].value.snat_addr, [10, 77, 0, 1]);
        assert_eq!(ok[0].value.ifindex, 99);
    }

    #[test]
    fn only_a_clients_own_answer_to_the_gateway_can_be_a_reply() {
        let vip = Ipv4Addr::new(10, 77, 0, 2);
        let gw = Ipv4Addr::new(10, 77, 0, 1);
        let mut pkt = vec![0u8; 40];
        pkt[0] = 0x45;
        pkt[9] = proto::TCP;
        pkt[12..16].copy_from_slice(&vip.octets());
        pkt[16..20].copy_from_slice(&gw.octets());
        pkt[20..22].copy_from_slice(&7000u16.to_be_bytes());
        pkt[22..24].copy_from_slice(&61000u16.to_be_bytes());
        let key = client_reply_key(&pkt, vip, gw).unwrap();
        assert_eq!(
            (key.src_port, key.dst_port, key.proto),
            (7000, 61000, proto::TCP)
        );
        // Another client's address as source: forged.
        assert_eq!(
            client_reply_key(&pkt, Ipv4Addr::new(10, 77, 0, 3), gw),
            None
        );
        let mut to_remote = pkt.clone();
        to_remote[16..20].copy_from_slice(&[198, 18, 0, 2]);
        assert_eq!(client_reply_key(&to_remote, vip, gw), None);
        let mut icmp = pkt.clone();
        icmp[9] = proto::ICMP;
        assert_eq!(client_reply_key(&icmp, vip, gw), None);
        let mut fragment = pkt;
        fragment[6] = 0x20;
        assert_eq!(client_reply_key(&fragment, vip, gw), None);
    }

    #[test]
    fn a_port_the_gateway_uses_is_not_forwarded() {
        let held = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let port = held.local_addr().unwrap().port();
        assert!(port_in_use(proto::TCP, port));
        drop(held);
        assert!(!port_in_use(proto::TCP, port));
    }
}
