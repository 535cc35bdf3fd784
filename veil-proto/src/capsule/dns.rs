//! DNS_ASSIGN (draft-ietf-masque-connect-ip-dns-05 §3): the resolvers,
//! internal domains and search domains one end tells the other to use.
//!
//! ```text
//! DNS_ASSIGN Capsule { Type (i) = 0x1ACE79EC, Length (i), DNS Configuration (..) ... }
//! DNS Configuration  { Nameserver Count (i), Nameserver (..) ...,
//!                      Internal Domain Count (i), Domain (..) ...,
//!                      Search Domain Count (i), Domain (..) ... }
//! Nameserver         { Service Priority (16),
//!                      IPv4 Address Count (i), IPv4 Address (32) ...,
//!                      IPv6 Address Count (i), IPv6 Address (128) ...,
//!                      Authentication Domain Name (Domain),
//!                      Service Parameters Length (i), Service Parameters (..) }
//! Domain             { Domain Length (i), Domain Name (..) }
//! ```
//!
//! The type is the draft's provisional one (it is to be replaced by a
//! smaller value on publication; receivers that do not know it skip it, as
//! RFC 9297 requires). Everything the client may write into its resolver
//! configuration is checked here, on both paths: domain names are DNS
//! presentation-format A-labels (letters, digits, `-`, `_`, dots; labels of
//! 1–63 bytes, 253 at most in all), so no newline or option can ride into
//! `/etc/resolv.conf`. Counts are never trusted for allocation: every
//! element consumes bytes of a value the decoder already bounded.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

use super::wire::Reader;
use crate::{varint, ProtoError};

/// The draft's provisional capsule type for DNS_ASSIGN.
pub const DNS_ASSIGN: u64 = 0x1ACE_79EC;

/// SvcParamKeys (RFC 9460 §14.3.2) the draft gives a meaning here.
pub mod svc_key {
    pub const ALPN: u16 = 1;
    pub const NO_DEFAULT_ALPN: u16 = 2;
    pub const PORT: u16 = 3;
    pub const IPV4HINT: u16 = 4;
    pub const IPV6HINT: u16 = 6;
}

/// A domain name in DNS presentation format, checked: empty (the root),
/// or dot-separated labels of 1 to 63 letters, digits, `-` (not first or
/// last) or `_`, 253 bytes at most (a trailing dot allowed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DomainName(String);

impl DomainName {
    /// The root: "every name", as an internal domain.
    pub fn root() -> Self {
        DomainName(String::new())
    }

    pub fn new(name: &str) -> Result<Self, ProtoError> {
        if valid_domain(name.as_bytes()) {
            Ok(DomainName(name.to_owned()))
        } else {
            Err(ProtoError::InvalidDomainName {
                name: crate::error::printable(name.as_bytes()),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty() || self.0 == "."
    }

    fn encoded_len(&self) -> usize {
        varint::len(self.0.len() as u64) + self.0.len()
    }

    fn write(&self, out: &mut Vec<u8>) {
        varint::encode_unchecked(self.0.len() as u64, out);
        out.extend_from_slice(self.0.as_bytes());
    }

    fn read(r: &mut Reader<'_>, field: &'static str) -> Result<Self, ProtoError> {
        let len = r.varint(field)?;
        let bytes = r.slice(len, field)?;
        if !valid_domain(bytes) {
            return Err(ProtoError::InvalidDomainName {
                name: crate::error::printable(bytes),
            });
        }
        // ASCII only, checked above.
        Ok(DomainName(String::from_utf8_lossy(bytes).into_owned()))
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "." } else { &self.0 })
    }
}

/// The longest name in presentation format without its trailing dot.
const MAX_DOMAIN_LEN: usize = 253;

fn valid_domain(name: &[u8]) -> bool {
    if name.is_empty() || name == b"." {
        return true;
    }
    let name = name.strip_suffix(b".").unwrap_or(name);
    name.len() <= MAX_DOMAIN_LEN
        && name.split(|&b| b == b'.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with(b"-")
                && !label.ends_with(b"-")
                && label
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// One SvcParam (RFC 9460 §2.2): a key and its value, kept as bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SvcParam {
    pub key: u16,
    pub value: Vec<u8>,
}

/// A nameserver: where it is, and how it may be spoken to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nameserver {
    /// SVCB priority (ServiceMode): 1 is the most preferred; never 0.
    pub priority: u16,
    pub ipv4: Vec<Ipv4Addr>,
    pub ipv6: Vec<Ipv6Addr>,
    /// For encrypted transports; empty for plain DNS on port 53.
    pub auth_domain: DomainName,
    /// Sorted by key, each key once (RFC 9460 §2.2).
    pub params: Vec<SvcParam>,
}

impl Nameserver {
    /// Plain DNS (UDP and TCP port 53) at these IPv4 addresses.
    pub fn plain(priority: u16, ipv4: Vec<Ipv4Addr>) -> Self {
        Nameserver {
            priority,
            ipv4,
            ipv6: Vec::new(),
            auth_domain: DomainName::root(),
            params: Vec::new(),
        }
    }

    /// The port, from the "port" parameter; 53 without one.
    pub fn port(&self) -> u16 {
        self.params
            .iter()
            .find(|p| p.key == svc_key::PORT)
            .and_then(|p| <[u8; 2]>::try_from(&p.value[..]).ok())
            .map_or(53, u16::from_be_bytes)
    }

    /// Whether it speaks unencrypted DNS: it does unless "no-default-alpn"
    /// says otherwise (the draft, §3.2).
    pub fn plain_dns(&self) -> bool {
        !self
            .params
            .iter()
            .any(|p| p.key == svc_key::NO_DEFAULT_ALPN)
    }

    fn check(&self) -> Result<(), ProtoError> {
        let bad = |reason| Err(ProtoError::BadNameserver { reason });
        if self.priority == 0 {
            return bad("service priority 0 (AliasMode) is not allowed");
        }
        if self.plain_dns() && self.ipv4.is_empty() && self.ipv6.is_empty() {
            return bad("a nameserver for unencrypted DNS without any address");
        }
        let mut previous: Option<u16> = None;
        for p in &self.params {
            if previous.is_some_and(|k| k >= p.key) {
                return bad("service parameters out of order or repeated");
            }
            previous = Some(p.key);
            if p.value.len() > usize::from(u16::MAX) {
                return bad("a service parameter longer than 65535 bytes");
            }
            match p.key {
                svc_key::IPV4HINT | svc_key::IPV6HINT => {
                    return bad("ipv4hint and ipv6hint are not allowed (the addresses are given)")
                }
                svc_key::ALPN | svc_key::NO_DEFAULT_ALPN if self.auth_domain.is_root() => {
                    return bad("alpn without an authentication domain name")
                }
                svc_key::NO_DEFAULT_ALPN if !p.value.is_empty() => {
                    return bad("no-default-alpn with a value")
                }
                svc_key::PORT if p.value.len() != 2 => return bad("a port that is not 2 bytes"),
                _ => {}
            }
        }
        Ok(())
    }

    fn params_len(&self) -> usize {
        self.params.iter().map(|p| 4 + p.value.len()).sum()
    }

    fn encoded_len(&self) -> usize {
        let params = self.params_len();
        2 + varint::len(self.ipv4.len() as u64)
            + 4 * self.ipv4.len()
            + varint::len(self.ipv6.len() as u64)
            + 16 * self.ipv6.len()
            + self.auth_domain.encoded_len()
            + varint::len(params as u64)
            + params
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.priority.to_be_bytes());
        varint::encode_unchecked(self.ipv4.len() as u64, out);
        for a in &self.ipv4 {
            out.extend_from_slice(&a.octets());
        }
        varint::encode_unchecked(self.ipv6.len() as u64, out);
        for a in &self.ipv6 {
            out.extend_from_slice(&a.octets());
        }
        self.auth_domain.write(out);
        varint::encode_unchecked(self.params_len() as u64, out);
        for p in &self.params {
            out.extend_from_slice(&p.key.to_be_bytes());
            // Checked by `check`: at most u16::MAX.
            out.extend_from_slice(&(p.value.len() as u16).to_be_bytes());
            out.extend_from_slice(&p.value);
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        let priority = u16::from_be_bytes(r.bytes::<2>("Service Priority")?);
        let mut ipv4 = Vec::new();
        for _ in 0..r.varint("IPv4 Address Count")? {
            ipv4.push(Ipv4Addr::from(r.bytes::<4>("IPv4 Address")?));
        }
        let mut ipv6 = Vec::new();
        for _ in 0..r.varint("IPv6 Address Count")? {
            ipv6.push(Ipv6Addr::from(r.bytes::<16>("IPv6 Address")?));
        }
        let auth_domain = DomainName::read(r, "Authentication Domain Name")?;
        let len = r.varint("Service Parameters Length")?;
        let mut params_reader = Reader::new(r.slice(len, "Service Parameters")?, "DNS_ASSIGN");
        let mut params = Vec::new();
        while !params_reader.is_empty() {
            let key = u16::from_be_bytes(params_reader.bytes::<2>("SvcParamKey")?);
            let len = u16::from_be_bytes(params_reader.bytes::<2>("SvcParamValue length")?);
            let value = params_reader
                .slice(u64::from(len), "SvcParamValue")?
                .to_vec();
            params.push(SvcParam { key, value });
        }
        let ns = Nameserver {
            priority,
            ipv4,
            ipv6,
            auth_domain,
            params,
        };
        ns.check()?;
        Ok(ns)
    }
}

/// One DNS configuration: these nameservers resolve these internal
/// domains (and their subdomains; the root means every name), with these
/// search domains.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsConfiguration {
    pub nameservers: Vec<Nameserver>,
    pub internal_domains: Vec<DomainName>,
    pub search_domains: Vec<DomainName>,
}

impl DnsConfiguration {
    /// Every name resolved by plain DNS at these addresses: what a
    /// full-tunnel gateway announces.
    pub fn full_tunnel(resolvers: Vec<Ipv4Addr>) -> Self {
        DnsConfiguration {
            nameservers: vec![Nameserver::plain(1, resolvers)],
            internal_domains: vec![DomainName::root()],
            search_domains: Vec::new(),
        }
    }

    pub(crate) fn check(&self) -> Result<(), ProtoError> {
        self.nameservers.iter().try_for_each(Nameserver::check)
    }

    pub(crate) fn encoded_len(&self) -> usize {
        let domains = |list: &[DomainName]| {
            varint::len(list.len() as u64) + list.iter().map(DomainName::encoded_len).sum::<usize>()
        };
        varint::len(self.nameservers.len() as u64)
            + self
                .nameservers
                .iter()
                .map(Nameserver::encoded_len)
                .sum::<usize>()
            + domains(&self.internal_domains)
            + domains(&self.search_domains)
    }

    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        varint::encode_unchecked(self.nameservers.len() as u64, out);
        for ns in &self.nameservers {
            ns.write(out);
        }
        for list in [&self.internal_domains, &self.search_domains] {
            varint::encode_unchecked(list.len() as u64, out);
            for d in list {
                d.write(out);
            }
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        let mut nameservers = Vec::new();
        for _ in 0..r.varint("Nameserver Count")? {
            nameservers.push(Nameserver::read(r)?);
        }
        let mut internal_domains = Vec::new();
        for _ in 0..r.varint("Internal Domain Count")? {
            internal_domains.push(DomainName::read(r, "Internal Domain")?);
        }
        let mut search_domains = Vec::new();
        for _ in 0..r.varint("Search Domain Count")? {
            search_domains.push(DomainName::read(r, "Search Domain")?);
        }
        Ok(DnsConfiguration {
            nameservers,
            internal_domains,
            search_domains,
        })
    }
}
