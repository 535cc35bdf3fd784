//! Every gateway setting, declared once: a field of [`Settings`] is both a
//! flag of `veil-user` (`--nat-ports`) and a key of the `--config` TOML
//! file (`nat-ports = "61000-65535"`). A flag given on the command line
//! wins over the file; what neither gives takes the default that
//! [`Settings::resolve`] states. Unknown keys and bad values are refused
//! at start, naming the file, the line, the key and what was expected.
//!
//! ```toml
//! iface = "eth0"
//! listen = "[::]:443"
//! pool = "10.77.0.0/16"
//! pool6 = "fd00:7665:696c::/64"  # or "none": no IPv6 through the tunnel
//! nat-ports = "61000-65535"
//! max-clients = 1024
//! grace = 30
//! allow = ["10.20.0.0/16"]
//! metrics = 9477                 # 127.0.0.1:9477; "0.0.0.0:9477" to expose it
//! timeout-udp = 120
//! public-addr = ["203.0.113.10", "203.0.113.11"]   # or one: "203.0.113.10"
//! max-ports-per-endpoint = 1134
//! client-buffer = "4MiB"
//! dns = ["192.0.2.53", "192.0.2.54"]   # or one: "192.0.2.53"
//! forward = "/etc/veil/forward.csv"
//! ws-listen = "127.0.0.1:8080"   # behind a web server: docs/operations.md
//! ws-path = "/veil"
//! cert = "/etc/letsencrypt/live/www.example.org/fullchain.pem"
//! key = "/etc/letsencrypt/live/www.example.org/privkey.pem"
//! fallback = "127.0.0.1:8080"          # strangers see this web server
//! mapping = "address-dependent"        # or "endpoint-independent"
//! rate-limit = "50mbit"                # each client, each way
//! quota = "10GiB"                      # each client, per quota-period
//! wan-filter = "tc"                    # default: tc on a veth, else xdp
//! gro-stage = "off"                    # default: on when the WAN's GRO is off
//! ```
//!
//! Adding a setting: a field here (its doc comment is the `--help` text,
//! its default written there too), and where [`Settings::resolve`] turns
//! it into the [`GatewayConfig`] the daemon runs with.

use std::{
    net::{Ipv4Addr, SocketAddr},
    num::NonZeroU32,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::{
    flows::{PortRange, Timeouts},
    gateway::GatewayConfig,
    net::Ipv4Net,
    pool6::Pool6,
    size::ByteSize,
};

/// The gateway's settings as given: every one optional (lists empty), so
/// that the command line and the file can be told apart and merged.
#[derive(clap::Args, Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Settings {
    /// The WAN interface: where the datapath attaches and whose address
    /// remote hosts see. Required.
    #[arg(long, value_name = "IFACE")]
    pub iface: Option<String>,
    /// The tunnel listener [default: [::]:443, IPv4 and IPv6 on one socket].
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Do not serve HTTP/3 (QUIC on UDP at the --listen port): clients
    /// then connect over TCP only.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub no_h3: Option<bool>,
    /// The address profiles point clients at [default: the first public
    /// address and the listener's port].
    #[arg(long, value_name = "HOST:PORT")]
    pub endpoint: Option<String>,
    /// Also take tunnels as WebSocket upgrades on this plain-HTTP listener,
    /// for a TLS-terminating web server or CDN to proxy to (e.g.
    /// 127.0.0.1:8080; see docs/operations.md) [default: none].
    #[arg(long, value_name = "ADDR:PORT")]
    pub ws_listen: Option<SocketAddr>,
    /// The path WebSocket upgrades are taken on; other paths get 404
    /// [default: /veil].
    #[arg(long, value_name = "PATH")]
    pub ws_path: Option<String>,
    /// A public address: what remote hosts see (repeatable, up to 16; each
    /// client keeps one for all its flows) [default: the interface's first
    /// IPv4 address].
    #[arg(long, value_name = "IP")]
    #[serde(deserialize_with = "one_or_many")]
    pub public_addr: Vec<Ipv4Addr>,
    /// The clients' virtual addresses; the first is the gateway's
    /// [default: 10.77.0.0/16].
    #[arg(long, value_name = "CIDR")]
    #[serde(with = "text")]
    pub pool: Option<Ipv4Net>,
    /// The clients' IPv6 addresses: a prefix of at most /96 whose last 32
    /// bits are each client's IPv4 lease, or `none` to carry no IPv6
    /// [default: fd00:7665:696c::/64].
    #[arg(long, value_name = "CIDR|none")]
    #[serde(with = "text")]
    pub pool6: Option<Pool6>,
    /// NAT ports; keep them out of net.ipv4.ip_local_port_range
    /// [default: 61000-65535].
    #[arg(long, value_name = "MIN-MAX")]
    #[serde(with = "text")]
    pub nat_ports: Option<PortRange>,
    /// The gateway's TUN device [default: veilgw].
    #[arg(long, value_name = "NAME")]
    pub tun: Option<String>,
    /// Where the BPF maps are pinned [default: /sys/fs/bpf/veil].
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Where the CA, certificates, clients and leases live (the file's
    /// key; the flag is `--state-dir`, for every command).
    #[arg(skip)]
    pub state_dir: Option<PathBuf>,
    /// Most clients connected at once; more are refused before the upgrade
    /// [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_clients: Option<usize>,
    /// Most connections still in their TLS handshake (not authenticated)
    /// at once; more are closed as they arrive [default: 256].
    #[arg(long, value_name = "N")]
    pub max_handshakes: Option<usize>,
    /// Most connections in their handshake from one address at once
    /// [default: 16].
    #[arg(long, value_name = "N")]
    pub max_handshakes_per_source: Option<usize>,
    /// Replies waiting for one client, at most (bytes, or with KiB/MiB);
    /// beyond, replies are dropped and counted [default: 4MiB].
    #[arg(long, value_name = "SIZE")]
    #[serde(with = "text")]
    pub client_buffer: Option<ByteSize>,
    /// Most flows at once: the size of the flow maps, which the kernel
    /// allocates whole at start (about 200 bytes a flow; 1048576 for a
    /// million) [default: 262144].
    #[arg(long, value_name = "N")]
    pub max_flows: Option<usize>,
    /// Most flows one client may hold, so that one client cannot fill the
    /// table for everyone [default: 32768].
    #[arg(long, value_name = "N")]
    pub max_flows_per_client: Option<usize>,
    /// Most NAT ports one client may hold toward one remote address and
    /// port, so that one client cannot take every port toward a popular
    /// server [default: a quarter of --nat-ports].
    #[arg(long, value_name = "PORTS")]
    pub max_ports_per_endpoint: Option<NonZeroU32>,
    /// How long a disconnected client keeps its flows, for a quick
    /// reconnect, in seconds [default: 30].
    #[arg(long, value_name = "SECONDS")]
    pub grace: Option<u64>,
    /// Open a range the default egress policy closes, IPv4 or IPv6
    /// (repeatable).
    #[arg(long, value_name = "CIDR")]
    #[serde(with = "text_list")]
    pub allow: Vec<crate::policy6::Prefix>,
    /// Close a range, IPv4 or IPv6 (repeatable; wins over --allow).
    #[arg(long, value_name = "CIDR")]
    #[serde(with = "text_list")]
    pub deny: Vec<crate::policy6::Prefix>,
    /// The gateway's IPv6 address remote hosts see (NAT66) [default: the
    /// interface's first global IPv6 address].
    #[arg(long, value_name = "IPV6")]
    pub public6: Option<std::net::Ipv6Addr>,
    /// Let clients reach each other's virtual addresses.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub allow_client_to_client: Option<bool>,
    /// An upstream resolver of the DNS service clients get on the pool's
    /// first address (repeatable, asked in order) [default: the
    /// nameservers of this machine's /etc/resolv.conf].
    #[arg(long, value_name = "IP")]
    #[serde(deserialize_with = "one_or_many")]
    pub dns: Vec<std::net::IpAddr>,
    /// Worker threads for tunnels (TLS and packet handling) [default: one
    /// per CPU].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// Queues of the TUN device, each read by a task of its own (at most
    /// 256) [default: one per worker thread].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub tun_queues: Option<u16>,
    /// Keep polling the tunnels and the TUN device for this many
    /// microseconds after each packet before sleeping: lower round-trip
    /// time for a core kept busy meanwhile (best with `--threads 1`; see
    /// docs/performance.md) [default: 0, off].
    #[arg(long, value_name = "MICROS")]
    pub busy_poll: Option<u64>,
    /// Where the WAN's admission checks run: `xdp`, per packet before the
    /// kernel builds an skb, or `tc`, after GRO, for an interface where an
    /// XDP program costs offloads (see docs/operations.md) [default: tc on
    /// a veth WAN, xdp on any other].
    #[arg(long, value_name = "xdp|tc")]
    #[serde(with = "text")]
    pub wan_filter: Option<crate::datapath::WanFilter>,
    /// A veth pair in front of the TUN device where the kernel's GRO merges
    /// replies before the daemon reads them: `on`, `off` (see
    /// docs/datapath.md) [default: on when the WAN interface's GRO is off].
    #[arg(long, value_name = "on|off")]
    #[serde(with = "text")]
    pub gro_stage: Option<crate::gro_stage::StageSetting>,
    /// Serve Prometheus metrics (GET /metrics) on this port of 127.0.0.1,
    /// or on ADDR:PORT to expose them (aggregates only: no client names).
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = crate::metrics::parse_addr)]
    #[serde(deserialize_with = "metrics_addr")]
    pub metrics: Option<SocketAddr>,
    /// Idle timeout of established TCP flows, in seconds (RFC 5382: at
    /// least 7440) [default: 7440].
    #[arg(long, value_name = "SECONDS")]
    pub timeout_tcp_established: Option<u64>,
    /// Idle timeout of opening and closing TCP flows [default: 240].
    #[arg(long, value_name = "SECONDS")]
    pub timeout_tcp_transitory: Option<u64>,
    /// Idle timeout of UDP flows (RFC 4787: at least 120) [default: 120].
    #[arg(long, value_name = "SECONDS")]
    pub timeout_udp: Option<u64>,
    /// Idle timeout of UDP flows to port 53 (DNS; RFC 4787 allows shorter
    /// timers for well-known ports) [default: 30].
    #[arg(long, value_name = "SECONDS")]
    pub timeout_udp_dns: Option<u64>,
    /// Idle timeout of ICMP echo flows (RFC 5508: at least 60) [default: 60].
    #[arg(long, value_name = "SECONDS")]
    pub timeout_icmp: Option<u64>,
    /// Port forwarding rules, one a line:
    /// `listen_port,target_host,target_port[,tcp|udp]` (reloaded on SIGHUP
    /// and when the file changes).
    #[arg(long, value_name = "FILE")]
    pub forward: Option<PathBuf>,
    /// Most established forwarded TCP connections one remote address may
    /// hold at once; its new ones beyond are dropped, so that one host
    /// cannot take a rule's NAT ports from everyone else [default: 512].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_forward_per_source: Option<u32>,
    /// Which flows of one client socket share a NAT port:
    /// endpoint-independent (toward every remote: peer-to-peer and STUN
    /// work) or address-dependent (one port per remote address: two sites
    /// cannot tie a client's socket together by its port)
    /// [default: address-dependent].
    #[arg(long, value_name = "MAPPING")]
    #[serde(with = "text")]
    pub mapping: Option<crate::nat::Mapping>,
    /// Each client's rate, each way, policed in the datapath (bits per
    /// second: 50mbit, 1gbit); a client's own (`client limit`) wins
    /// [default: none].
    #[arg(long, value_name = "RATE")]
    #[serde(with = "text")]
    pub rate_limit: Option<crate::ratelimit::Rate>,
    /// Each client's bytes (both ways) per --quota-period, beyond which
    /// its packets are dropped; a client's own wins [default: none].
    #[arg(long, value_name = "SIZE")]
    #[serde(with = "text")]
    pub quota: Option<ByteSize>,
    /// The quota's period, in seconds [default: 86400].
    #[arg(long, value_name = "SECONDS")]
    pub quota_period: Option<u64>,
    /// The TTL every packet leaves the WAN interface with, whatever the
    /// client's system started it at (64 is Linux's and macOS's)
    /// [default: the client's, less one hop].
    #[arg(long, value_name = "TTL", value_parser = clap::value_parser!(u8).range(2..))]
    pub normalize_ttl: Option<u8>,
    /// Give each unfragmented packet leaving the WAN interface a random
    /// IPv4 ID (a client's own ID counter can tie its flows together).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub random_ip_id: Option<bool>,
    /// The server certificate chain (PEM) everyone sees, e.g. from ACME
    /// for the gateway's real name; with --key. Profiles issued after the
    /// gateway ran with it name it and pin its key [default: the gateway's
    /// own, named veil-gateway].
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// A web server that connections without a client certificate are
    /// proxied to, decrypted [default: a built-in static page].
    #[arg(long, value_name = "ADDR:PORT")]
    pub fallback: Option<SocketAddr>,
    /// An HTML file the built-in fallback serves at `/` (without
    /// --fallback).
    #[arg(long, value_name = "FILE")]
    pub fallback_page: Option<PathBuf>,
    /// The revocation list several gateways share, signed by the CA (a
    /// file, or an http:// or https:// URL), re-read every second or two:
    /// clients the CA issued elsewhere are let in unless it revokes them
    /// (docs/operations.md, "More than one gateway") [default: none].
    #[arg(long, value_name = "FILE|URL")]
    pub revocations: Option<String>,
    /// This gateway's part of --pool, when several share one: I/N takes
    /// part I (from 0) of N equal parts (N a power of two)
    /// [default: the whole pool].
    #[arg(long, value_name = "I/N")]
    #[serde(with = "text")]
    pub pool_slice: Option<crate::slice::PoolSlice>,
}

/// Why the settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("reading the configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    /// A setting that cannot be carried from the command line or the
    /// file into the other (a path that is not UTF-8, say).
    #[error("combining the command line with the configuration file: {0}")]
    Merge(String),
    #[error("--ws-path `{0}` is not a path: it starts with `/` and has no spaces, e.g. /veil")]
    WsPath(String),
    #[error("--cert and --key go together: the certificate chain and its private key (PEM)")]
    CertWithoutKey,
    #[error("--pool-slice: {0}")]
    Slice(#[from] crate::slice::SliceError),
    /// A number the command line bounds (clap) that the file set beyond
    /// those bounds.
    #[error("{setting} = {value} is out of range: it takes {range}")]
    OutOfRange {
        setting: &'static str,
        value: u64,
        range: &'static str,
    },
    #[error("--iface is required to run the gateway: the WAN interface, e.g. --iface eth0 (or `iface = \"eth0\"` in the --config file)")]
    NoIface,
}

impl Settings {
    /// The settings of a configuration file.
    pub fn load(path: &Path) -> Result<Self, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| SettingsError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses a file's text; the error names the key, the place and what
    /// was expected (toml's message, with the offending line).
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// These settings, with `file`'s wherever these leave one unset: every
    /// setting is merged the same way, so no list of them is kept here.
    pub fn or_file(self, file: Settings) -> Result<Settings, SettingsError> {
        let merge = |e: &dyn std::fmt::Display| SettingsError::Merge(e.to_string());
        let table = |s: &Settings| match toml::Value::try_from(s) {
            Ok(toml::Value::Table(t)) => Ok(t),
            Ok(other) => Err(merge(&format!("not a table: {other}"))),
            Err(e) => Err(merge(&e)),
        };
        let mut merged = table(&file)?;
        // Unset options do not serialize; unset lists are empty.
        merged.extend(
            table(&self)?
                .into_iter()
                .filter(|(_, v)| v.as_array().is_none_or(|a| !a.is_empty())),
        );
        toml::Value::Table(merged).try_into().map_err(|e| merge(&e))
    }

    /// What the daemon runs with: every default applied.
    pub fn resolve(self, state_dir: PathBuf) -> Result<GatewayConfig, SettingsError> {
        let secs = |v: Option<u64>, default| Duration::from_secs(v.unwrap_or(default));
        Ok(GatewayConfig {
            iface: self.iface.ok_or(SettingsError::NoIface)?,
            listen: self.listen.unwrap_or(veil_tunnel::net::DEFAULT_LISTEN),
            h3: !self.no_h3.unwrap_or(false),
            endpoint: self.endpoint,
            ws_listen: self.ws_listen,
            ws_path: ws_path(self.ws_path)?,
            public_addrs: self.public_addr,
            state_dir,
            pool: pool(self.pool, self.pool_slice)?,
            pool6: self.pool6.unwrap_or(Pool6::DEFAULT),
            nat_ports: self.nat_ports.unwrap_or(PortRange::DEFAULT),
            tun_name: self.tun.unwrap_or_else(|| "veilgw".into()),
            pin_root: self
                .pin_dir
                .unwrap_or_else(|| crate::datapath::DEFAULT_PIN_ROOT.into()),
            max_clients: at_least_one("max-clients", self.max_clients, 1024)?,
            max_flows: at_least_one("max-flows", self.max_flows, veil_common::MAX_FLOWS as usize)?,
            max_flows_per_client: at_least_one(
                "max-flows-per-client",
                self.max_flows_per_client,
                32768,
            )?,
            max_ports_per_endpoint: self.max_ports_per_endpoint,
            grace: secs(self.grace, 30),
            allow: crate::policy6::v4_of(&self.allow),
            deny: crate::policy6::v4_of(&self.deny),
            allow6: crate::policy6::v6_of(&self.allow),
            deny6: crate::policy6::v6_of(&self.deny),
            public6: self.public6,
            client_to_client: self.allow_client_to_client.unwrap_or(false),
            timeouts: Timeouts {
                tcp_established: secs(self.timeout_tcp_established, 7440),
                tcp_transitory: secs(self.timeout_tcp_transitory, 240),
                udp: secs(self.timeout_udp, 120),
                udp_dns: secs(self.timeout_udp_dns, 30),
                icmp: secs(self.timeout_icmp, 60),
            },
            metrics: self.metrics,
            client_buffer: at_least_one("client-buffer", self.client_buffer.map(|b| b.0), 4 << 20)?,
            max_handshakes: at_least_one("max-handshakes", self.max_handshakes, 256)?,
            max_handshakes_per_source: at_least_one(
                "max-handshakes-per-source",
                self.max_handshakes_per_source,
                16,
            )?,
            threads: within("threads", self.threads, 1, u16::MAX, "1 or more")?,
            tun_queues: within("tun-queues", self.tun_queues, 1, 256, "1 to 256")?,
            busy_poll: Duration::from_micros(self.busy_poll.unwrap_or(0)),
            wan_filter: self.wan_filter,
            gro_stage: self.gro_stage,
            dns: self.dns,
            forward: self.forward,
            max_forward_per_source: within(
                "max-forward-per-source",
                self.max_forward_per_source,
                1,
                veil_common::MAX_FWD_SOURCES,
                "1 to 65536",
            )?
            .unwrap_or(512),
            operator_cert: match (self.cert, self.key) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                _ => return Err(SettingsError::CertWithoutKey),
            },
            fair_use: crate::ratelimit::FairUse {
                rate: self.rate_limit,
                // 0 would mean no quota at all: said so rather than taken.
                quota: match self.quota {
                    Some(ByteSize(0)) => {
                        return Err(SettingsError::OutOfRange {
                            setting: "quota",
                            value: 0,
                            range: "1 byte or more (leave it out for no quota)",
                        })
                    }
                    q => q,
                },
                period: secs(self.quota_period, 86_400).max(Duration::from_secs(1)),
            },
            normalize: veil_common::normalize::Normalize {
                // 0 would turn it off and 1 would die at the first router.
                ttl: within("normalize-ttl", self.normalize_ttl, 2, u8::MAX, "2 to 255")?
                    .map_or(0, u32::from),
                random_id: u32::from(self.random_ip_id.unwrap_or(false)),
            },
            mapping: self
                .mapping
                .unwrap_or(crate::nat::Mapping::AddressDependent),
            fallback: self.fallback,
            fallback_page: self.fallback_page,
            revocations: self.revocations,
        })
    }
}

/// `--pool`, or its `--pool-slice`.
fn pool(
    pool: Option<Ipv4Net>,
    slice: Option<crate::slice::PoolSlice>,
) -> Result<Ipv4Net, SettingsError> {
    let pool = pool.unwrap_or_else(|| "10.77.0.0/16".parse().expect("valid"));
    match slice {
        Some(slice) => Ok(slice.of(pool)?),
        None => Ok(pool),
    }
}

/// `value` if it lies in `min..=max`: the bounds `--help` gives, which
/// clap checks on the command line and this checks for the file.
fn within<T: Copy + PartialOrd + Into<u64>>(
    setting: &'static str,
    value: Option<T>,
    min: T,
    max: T,
    range: &'static str,
) -> Result<Option<T>, SettingsError> {
    match value {
        Some(v) if !(min..=max).contains(&v) => Err(SettingsError::OutOfRange {
            setting,
            value: v.into(),
            range,
        }),
        v => Ok(v),
    }
}

/// `value`, or `default` when it is not given, if it is 1 or more: 0 of
/// these would start a gateway that refuses or drops everything, silently.
fn at_least_one(
    setting: &'static str,
    value: Option<usize>,
    default: usize,
) -> Result<usize, SettingsError> {
    match value {
        Some(0) => Err(SettingsError::OutOfRange {
            setting,
            value: 0,
            range: "1 or more",
        }),
        v => Ok(v.unwrap_or(default)),
    }
}

/// `--ws-path`, checked: what a request line can carry.
fn ws_path(path: Option<String>) -> Result<String, SettingsError> {
    match path {
        None => Ok("/veil".into()),
        Some(p) if p.starts_with('/') && !p.contains(|c: char| c.is_whitespace() || c == '?') => {
            Ok(p)
        }
        Some(p) => Err(SettingsError::WsPath(p)),
    }
}

/// A value that is a string in the file, read with `FromStr` and written
/// with `Display`: `pool = "10.77.0.0/16"`.
mod text {
    use super::*;

    pub fn serialize<T: std::fmt::Display, S: Serializer>(
        v: &Option<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        let s = String::deserialize(d)?;
        s.parse().map(Some).map_err(de::Error::custom)
    }
}

/// [`text`] for a list: `allow = ["10.20.0.0/16"]`.
mod text_list {
    use super::*;

    pub fn serialize<T: std::fmt::Display, S: Serializer>(
        v: &[T],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|v| v.to_string()))
    }

    pub fn deserialize<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| s.parse().map_err(de::Error::custom))
            .collect()
    }
}

/// `key = "x"` or `key = ["x", "y"]`, each parsed with `FromStr`.
fn one_or_many<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: std::fmt::Display,
{
    struct Visitor<T>(std::marker::PhantomData<T>);

    impl<'de, T> de::Visitor<'de> for Visitor<T>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string or a list of strings")
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            s.parse().map(|v| vec![v]).map_err(E::custom)
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(s) = seq.next_element::<String>()? {
                out.push(s.parse().map_err(de::Error::custom)?);
            }
            Ok(out)
        }
    }

    d.deserialize_any(Visitor(std::marker::PhantomData))
}

/// A port number or a string, as `--metrics` takes them.
fn metrics_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    struct Visitor;
    impl de::Visitor<'_> for Visitor {
        type Value = SocketAddr;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("PORT (served on 127.0.0.1) or \"ADDR:PORT\"")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<SocketAddr, E> {
            u16::try_from(v)
                .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
                .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<SocketAddr, E> {
            u16::try_from(v)
                .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
                .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<SocketAddr, E> {
            crate::metrics::parse_addr(v).map_err(E::custom)
        }
    }
    d.deserialize_any(Visitor).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, String> {
        Settings::parse(text)
    }

    #[test]
    fn reads_every_key() {
        let c = parse(
            r#"
            iface = "eth0"
            listen = "0.0.0.0:8443"
            pool = "10.90.0.0/16"
            nat-ports = "62000-63000"
            max-clients = 10
            grace = 5
            allow = ["10.20.0.0/16"]
            deny = ["198.51.100.0/24"]
            allow-client-to-client = true
            metrics = "127.0.0.1:9477"
            timeout-udp = 300
            timeout-udp-dns = 10
            public-addr = ["198.18.0.1", "198.18.0.3"]
            max-ports-per-endpoint = 100
            "#,
        )
        .unwrap();
        assert_eq!(c.iface.as_deref(), Some("eth0"));
        assert_eq!(c.listen, Some("0.0.0.0:8443".parse().unwrap()));
        assert_eq!(c.pool, Some("10.90.0.0/16".parse().unwrap()));
        assert_eq!(
            c.nat_ports,
            Some(PortRange {
                min: 62000,
                max: 63000
            })
        );
        assert_eq!(c.allow.len(), 1);
        assert_eq!(c.timeout_udp, Some(300));
        assert_eq!(c.timeout_udp_dns, Some(10));
        assert_eq!(
            c.public_addr,
            vec![Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 3)]
        );
        assert_eq!(c.max_ports_per_endpoint, NonZeroU32::new(100));
        assert_eq!(c.allow_client_to_client, Some(true));
    }

    #[test]
    fn pool6_is_a_prefix_or_none_and_on_by_default() {
        let c = parse("pool6 = \"fd00:1::/64\"\n").unwrap();
        assert_eq!(c.pool6, Some("fd00:1::/64".parse().unwrap()));
        let off = parse("pool6 = \"none\"\n").unwrap();
        assert_eq!(off.pool6, Some(Pool6::Off));
        let err = parse("pool6 = \"fd00::/120\"\n").unwrap_err();
        assert!(err.contains("at most /96"), "{err}");
        let resolved = parse("iface = \"eth0\"\n")
            .unwrap()
            .resolve("/tmp/unused".into())
            .unwrap();
        assert_eq!(resolved.pool6, Pool6::DEFAULT);
    }

    #[test]
    fn the_wan_filter_is_picked_for_the_driver_unless_named() {
        use crate::datapath::WanFilter;
        let resolve = |text: &str| parse(text).unwrap().resolve("/tmp/unused".into()).unwrap();
        assert_eq!(resolve("iface = \"eth0\"\n").wan_filter, None);
        let tc = resolve("iface = \"eth0\"\nwan-filter = \"tc\"\n");
        assert_eq!(tc.wan_filter, Some(WanFilter::Tc));
        let xdp = resolve("iface = \"eth0\"\nwan-filter = \"xdp\"\n");
        assert_eq!(xdp.wan_filter, Some(WanFilter::Xdp));
        for (driver, picked) in [
            ("veth", WanFilter::Tc),
            ("virtio_net", WanFilter::Xdp),
            ("mlx5_core", WanFilter::Xdp),
            ("ixgbe", WanFilter::Xdp),
            ("", WanFilter::Xdp),
        ] {
            assert_eq!(WanFilter::for_driver(driver), picked, "{driver}");
        }
        let err = parse("wan-filter = \"xpd\"\n").unwrap_err();
        assert!(err.contains("xdp or tc"), "{err}");
    }

    #[test]
    fn the_gro_stage_is_automatic_unless_named_and_a_typo_says_what_is_expected() {
        use crate::gro_stage::StageSetting;
        let resolve = |text: &str| parse(text).unwrap().resolve("/tmp/unused".into()).unwrap();
        assert_eq!(resolve("iface = \"eth0\"\n").gro_stage, None);
        let off = resolve("iface = \"eth0\"\ngro-stage = \"off\"\n");
        assert_eq!(off.gro_stage, Some(StageSetting::Off));
        let err = parse("gro-stage = \"yes\"\n").unwrap_err();
        assert!(err.contains("on or off"), "{err}");
    }

    #[test]
    fn one_public_address_is_a_list_of_one() {
        let c = parse("public-addr = \"203.0.113.10\"\n").unwrap();
        assert_eq!(c.public_addr, vec![Ipv4Addr::new(203, 0, 113, 10)]);
        let err = parse("public-addr = [\"198.18.0.1\", \"nowhere\"]\n").unwrap_err();
        assert!(err.contains("invalid IPv4 address"), "{err}");
        assert!(
            parse("max-ports-per-endpoint = 0\n").is_err(),
            "0 would refuse every flow"
        );
    }

    #[test]
    fn metrics_alone_is_a_loopback_port() {
        let loopback = Some("127.0.0.1:9477".parse().unwrap());
        assert_eq!(parse("metrics = 9477").unwrap().metrics, loopback);
        assert_eq!(parse("metrics = \"9477\"").unwrap().metrics, loopback);
        assert_eq!(
            parse("metrics = \"0.0.0.0:9477\"").unwrap().metrics,
            Some("0.0.0.0:9477".parse().unwrap())
        );
        let err = parse("metrics = 70000").unwrap_err();
        assert!(err.contains("PORT (served on 127.0.0.1)"), "{err}");
        let err = parse("metrics = \"eth0\"").unwrap_err();
        assert!(err.contains("ADDR:PORT"), "{err}");
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let c = parse(include_str!("../../dist/veil.toml")).unwrap();
        assert_eq!(c.iface.as_deref(), Some("eth0"));
        assert_eq!(c.nat_ports, Some(PortRange::DEFAULT));
    }

    #[test]
    fn a_typo_names_the_key_and_what_is_known() {
        let err = parse("ifcae = \"eth0\"\n").unwrap_err();
        assert!(err.contains("unknown field `ifcae`"), "{err}");
        assert!(err.contains("expected one of"), "{err}");
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn a_bad_value_says_what_was_expected() {
        let err = parse("pool = \"10.90.0.0\"\n").unwrap_err();
        assert!(err.contains("expected ADDRESS/PREFIX"), "{err}");
        let err = parse("nat-ports = \"65000-1000\"\n").unwrap_err();
        assert!(err.contains("MIN-MAX"), "{err}");
        let err = parse("max-clients = \"many\"\n").unwrap_err();
        assert!(
            err.contains("max-clients") || err.contains("invalid type"),
            "{err}"
        );
        let err = parse("listen = \"0.0.0.0\"\n").unwrap_err();
        assert!(
            err.contains("listen") || err.contains("socket address"),
            "{err}"
        );
    }

    #[test]
    fn a_count_beyond_the_flags_bounds_in_the_file_is_refused_by_name() {
        for (text, key, range) in [
            (
                "iface = \"eth0\"\ntun-queues = 300\n",
                "tun-queues = 300",
                "1 to 256",
            ),
            (
                "iface = \"eth0\"\ntun-queues = 0\n",
                "tun-queues = 0",
                "1 to 256",
            ),
            (
                "iface = \"eth0\"\nthreads = 0\n",
                "threads = 0",
                "1 or more",
            ),
            (
                "iface = \"eth0\"\nnormalize-ttl = 1\n",
                "normalize-ttl = 1",
                "2 to 255",
            ),
            // A 0 that would start a gateway refusing or dropping everything.
            (
                "iface = \"eth0\"\nmax-clients = 0\n",
                "max-clients = 0",
                "1 or more",
            ),
            (
                "iface = \"eth0\"\nmax-handshakes = 0\n",
                "max-handshakes = 0",
                "1 or more",
            ),
            (
                "iface = \"eth0\"\nmax-handshakes-per-source = 0\n",
                "max-handshakes-per-source = 0",
                "1 or more",
            ),
            (
                "iface = \"eth0\"\nclient-buffer = \"0\"\n",
                "client-buffer = 0",
                "1 or more",
            ),
            (
                "iface = \"eth0\"\nmax-flows-per-client = 0\n",
                "max-flows-per-client = 0",
                "1 or more",
            ),
            (
                "iface = \"eth0\"\nmax-forward-per-source = 0\n",
                "max-forward-per-source = 0",
                "1 to 65536",
            ),
            (
                "iface = \"eth0\"\nquota = \"0\"\n",
                "quota = 0",
                "leave it out for no quota",
            ),
        ] {
            let err = parse(text)
                .unwrap()
                .resolve(PathBuf::from("/var/lib/veil"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(range), "{err}");
        }
        let ok = parse("iface = \"eth0\"\ntun-queues = 256\nthreads = 1\n").unwrap();
        let cfg = ok.resolve(PathBuf::from("/var/lib/veil")).unwrap();
        assert_eq!((cfg.tun_queues, cfg.threads), (Some(256), Some(1)));
    }

    #[test]
    fn a_flag_wins_over_the_file_and_the_file_over_the_defaults() {
        let file = parse(
            "iface = \"eth0\"\nmax-clients = 5\nallow = [\"10.20.0.0/16\"]\ndeny = [\"198.51.100.0/24\"]\n",
        )
        .unwrap();
        let flags = Settings {
            max_clients: Some(7),
            deny: vec!["203.0.113.0/24".parse().unwrap()],
            ..Default::default()
        };
        let cfg = flags
            .or_file(file)
            .unwrap()
            .resolve("/tmp/state".into())
            .unwrap();
        assert_eq!(cfg.iface, "eth0", "from the file");
        assert_eq!(cfg.max_clients, 7, "the flag wins");
        assert_eq!(
            cfg.allow,
            ["10.20.0.0/16".parse().unwrap()],
            "a list from the file"
        );
        assert_eq!(
            cfg.deny,
            ["203.0.113.0/24".parse().unwrap()],
            "the flag's list replaces the file's"
        );
        assert_eq!(cfg.listen, "[::]:443".parse().unwrap(), "the default");
        assert_eq!(cfg.client_buffer, 4 << 20);
        assert_eq!(cfg.nat_ports, PortRange::DEFAULT);
    }

    #[test]
    fn every_setting_survives_the_merge() {
        let all = parse(
            r#"
            iface = "eth0"
            listen = "0.0.0.0:8443"
            endpoint = "gw.example:8443"
            ws-listen = "127.0.0.1:8080"
            ws-path = "/tunnel"
            public-addr = ["198.18.0.1", "198.18.0.3"]
            pool = "10.90.0.0/16"
            nat-ports = "62000-63000"
            tun = "gw0"
            pin-dir = "/sys/fs/bpf/x"
            state-dir = "/var/lib/x"
            max-clients = 10
            max-handshakes = 20
            max-handshakes-per-source = 2
            client-buffer = "1MiB"
            max-flows = 1000
            max-flows-per-client = 100
            max-ports-per-endpoint = 50
            grace = 5
            allow = ["10.20.0.0/16"]
            deny = ["198.51.100.0/24"]
            allow-client-to-client = true
            dns = ["198.18.0.2", "2001:db8::53"]
            threads = 3
            metrics = 9477
            timeout-tcp-established = 8000
            timeout-tcp-transitory = 200
            timeout-udp = 300
            timeout-udp-dns = 10
            timeout-icmp = 70
            forward = "/etc/veil/forward.csv"
            cert = "/etc/veil/fullchain.pem"
            key = "/etc/veil/privkey.pem"
            fallback = "127.0.0.1:8080"
            fallback-page = "/etc/veil/index.html"
            mapping = "endpoint-independent"
            rate-limit = "50mbit"
            quota = "10GiB"
            quota-period = 3600
            normalize-ttl = 64
            random-ip-id = true
            "#,
        )
        .unwrap();
        assert_eq!(Settings::default().or_file(all.clone()).unwrap(), all);
        assert_eq!(all.clone().or_file(Settings::default()).unwrap(), all);
    }

    #[test]
    fn the_websocket_listener_is_off_unless_asked_for_and_its_path_checked() {
        let base = || parse("iface = \"eth0\"\n").unwrap();
        let cfg = base().resolve("/tmp".into()).unwrap();
        assert_eq!((cfg.ws_listen, cfg.ws_path.as_str()), (None, "/veil"));
        let on = parse("iface = \"eth0\"\nws-listen = \"127.0.0.1:8080\"\nws-path = \"/t\"\n")
            .unwrap()
            .resolve("/tmp".into())
            .unwrap();
        assert_eq!(on.ws_listen, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(on.ws_path, "/t");
        for bad in ["veil", "/a b", "/a?b", ""] {
            let s = Settings {
                ws_path: Some(bad.into()),
                ..base()
            };
            let err = s.resolve("/tmp".into()).unwrap_err().to_string();
            assert!(err.contains("--ws-path"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_certificate_needs_its_key() {
        let err = parse("iface = \"eth0\"\ncert = \"/x.pem\"\n")
            .unwrap()
            .resolve("/tmp".into())
            .unwrap_err();
        assert!(
            err.to_string().contains("--cert and --key go together"),
            "{err}"
        );
    }

    #[test]
    fn without_an_interface_the_gateway_does_not_start() {
        let err = Settings::default().resolve("/tmp".into()).unwrap_err();
        assert!(err.to_string().contains("--iface eth0"), "{err}");
    }
}
