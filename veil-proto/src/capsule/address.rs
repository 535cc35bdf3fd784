//! The address and route entries of RFC 9484 §4.7 and their validation.
//!
//! Validation runs on both paths: decoding rejects what the RFC says a
//! receiver must reject, and encoding refuses to produce it, so the two
//! sides of veil can never disagree about what is well-formed.

use std::{fmt, net::IpAddr};

use super::wire::{self, Reader};
use crate::{varint, ProtoError};

/// One entry of an ADDRESS_ASSIGN capsule (RFC 9484 §4.7.1): an address or
/// prefix the sender assigns to the receiver.
///
/// `request_id` is 0 for an unsolicited assignment, otherwise the ID of the
/// ADDRESS_REQUEST entry it answers. An all-zero address with a full-length
/// prefix (`0.0.0.0/32`, `::/128`) is a rejection of that request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AssignedAddress {
    pub request_id: u64,
    pub ip: IpAddr,
    pub prefix_len: u8,
}

/// One entry of an ADDRESS_REQUEST capsule (RFC 9484 §4.7.2). An all-zero
/// address asks for any address of that family. `request_id` must not be 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestedAddress {
    pub request_id: u64,
    pub ip: IpAddr,
    pub prefix_len: u8,
}

impl AssignedAddress {
    /// Whether this entry is the RFC's "not assigned" answer to a request.
    pub fn is_rejection(&self) -> bool {
        self.ip.is_unspecified() && self.prefix_len == wire::ip_width(self.ip)
    }
}

/// Shared layout of both entry kinds: Request ID (i), IP Version (8),
/// IP Address (32..128), IP Prefix Length (8).
pub(crate) fn entry_len(request_id: u64, ip: IpAddr) -> usize {
    varint::len(request_id) + 1 + wire::ip_len(ip) + 1
}

pub(crate) fn write_entry(request_id: u64, ip: IpAddr, prefix_len: u8, out: &mut Vec<u8>) {
    varint::encode_unchecked(request_id, out);
    out.push(wire::ip_version(ip));
    wire::write_ip(ip, out);
    out.push(prefix_len);
}

pub(crate) fn read_entry(r: &mut Reader<'_>) -> Result<(u64, IpAddr, u8), ProtoError> {
    let request_id = r.varint("Request ID")?;
    let version = r.ip_version()?;
    let ip = r.ip(version, "IP Address")?;
    let prefix_len = r.u8("IP Prefix Length")?;
    check_prefix(ip, prefix_len)?;
    Ok((request_id, ip, prefix_len))
}

/// The prefix fits the address and no bit past it is set (RFC 9484
/// §4.7.1, "the lower bits ... MUST all be set to 0").
pub(crate) fn check_prefix(ip: IpAddr, prefix_len: u8) -> Result<(), ProtoError> {
    let width = wire::ip_width(ip);
    if prefix_len > width {
        return Err(ProtoError::PrefixTooLong {
            ip,
            prefix_len,
            max: width,
        });
    }
    let host_bits = u32::from(width - prefix_len);
    let host_mask = match host_bits {
        0 => 0,
        n => u128::MAX >> (128 - n),
    };
    if wire::ip_bits(ip) & host_mask != 0 {
        return Err(ProtoError::HostBitsSet { ip, prefix_len });
    }
    Ok(())
}

/// One entry of a ROUTE_ADVERTISEMENT capsule (RFC 9484 §4.7.3): the sender
/// will route packets to `start..=end` for `ip_protocol` (0 = any protocol;
/// ICMP is always allowed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpAddressRange {
    pub start: IpAddr,
    pub end: IpAddr,
    pub ip_protocol: u8,
}

impl IpAddressRange {
    /// The whole IPv4 space for every protocol: what a full-tunnel gateway
    /// advertises.
    pub const ALL_IPV4: IpAddressRange = IpAddressRange {
        start: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        end: IpAddr::V4(std::net::Ipv4Addr::BROADCAST),
        ip_protocol: 0,
    };

    /// The whole IPv6 space for every protocol: what a full-tunnel gateway
    /// that carries IPv6 advertises after [`Self::ALL_IPV4`] (RFC 9484
    /// §4.7.3 orders ranges by IP version first).
    pub const ALL_IPV6: IpAddressRange = IpAddressRange {
        start: IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        end: IpAddr::V6(std::net::Ipv6Addr::from_bits(u128::MAX)),
        ip_protocol: 0,
    };

    /// Checks one range on its own: same family at both ends, start ≤ end.
    pub fn validate(&self) -> Result<(), ProtoError> {
        let (start, end) = (self.start, self.end);
        if start.is_ipv4() != end.is_ipv4() {
            return Err(ProtoError::RangeFamilyMismatch { start, end });
        }
        if wire::ip_bits(start) > wire::ip_bits(end) {
            return Err(ProtoError::RangeInverted { start, end });
        }
        Ok(())
    }

    /// Sort key of RFC 9484 §4.7.3: IP version, then protocol, then start.
    fn key(&self) -> (u8, u8, u128) {
        (
            wire::ip_version(self.start),
            self.ip_protocol,
            wire::ip_bits(self.start),
        )
    }

    fn overlaps(&self, other: &IpAddressRange) -> bool {
        wire::ip_bits(self.start) <= wire::ip_bits(other.end)
            && wire::ip_bits(other.start) <= wire::ip_bits(self.end)
    }

    pub(crate) fn encoded_len(&self) -> usize {
        1 + 2 * wire::ip_len(self.start) + 1
    }

    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        out.push(wire::ip_version(self.start));
        wire::write_ip(self.start, out);
        wire::write_ip(self.end, out);
        out.push(self.ip_protocol);
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        let version = r.ip_version()?;
        let range = IpAddressRange {
            start: r.ip(version, "Start IP Address")?,
            end: r.ip(version, "End IP Address")?,
            ip_protocol: r.u8("IP Protocol")?,
        };
        range.validate()?;
        Ok(range)
    }
}

impl fmt::Display for IpAddressRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)?;
        match self.ip_protocol {
            0 => f.write_str(" (all protocols)"),
            p => write!(f, " (protocol {p})"),
        }
    }
}

/// Checks a whole ROUTE_ADVERTISEMENT list against RFC 9484 §4.7.3: every
/// range valid; sorted by IP version, then protocol, then address; ranges
/// with the same version and protocol strictly disjoint; and (the RFC's
/// optional check, cheap here) no specific-protocol range overlapping an
/// all-protocols range of the same version.
pub fn validate_routes(routes: &[IpAddressRange]) -> Result<(), ProtoError> {
    for range in routes {
        range.validate()?;
    }
    for pair in routes.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let (ka, kb) = (a.key(), b.key());
        if ka > kb {
            return Err(ProtoError::RoutesUnordered {
                previous: *a,
                range: *b,
            });
        }
        if (ka.0, ka.1) == (kb.0, kb.1) && a.overlaps(b) {
            return Err(ProtoError::RoutesOverlap {
                other: *a,
                range: *b,
            });
        }
    }
    // Within one version, protocol 0 sorts first, so the all-protocols
    // ranges are a sorted, disjoint prefix of that version's slice: a binary
    // search finds the only one a later range could overlap.
    for version in [4, 6] {
        let family: Vec<&IpAddressRange> = routes
            .iter()
            .filter(|r| wire::ip_version(r.start) == version)
            .collect();
        let any_proto = family.partition_point(|r| r.ip_protocol == 0);
        let (all, specific) = family.split_at(any_proto);
        for range in specific {
            let start = wire::ip_bits(range.start);
            let i = all.partition_point(|r| wire::ip_bits(r.end) < start);
            if let Some(other) = all.get(i).filter(|other| other.overlaps(range)) {
                return Err(ProtoError::RoutesOverlap {
                    other: **other,
                    range: **range,
                });
            }
        }
    }
    Ok(())
}
