//! Capsules (RFC 9297 §3.2): after the upgrade, both directions of the
//! connection are a sequence of `Type (i), Length (i), Value (..)` records.
//!
//! veil uses the DATAGRAM capsule for IP packets, the three configuration
//! capsules of RFC 9484 §4.7 for the address and routes, DNS_ASSIGN of
//! draft-ietf-masque-connect-ip-dns for the resolver, and two private
//! capsule types for liveness. RFC 9297 §3.2 makes receivers skip capsule
//! types they do not know, so the private types are invisible to any other
//! CONNECT-IP implementation.

mod address;
mod decoder;
mod dns;
#[cfg(test)]
mod tests;
mod wire;

pub use address::{validate_routes, AssignedAddress, IpAddressRange, RequestedAddress};
pub use decoder::{CapsuleDecoder, DEFAULT_MAX_CAPSULE_LEN, DEFAULT_MAX_SKIP_LEN};
pub use dns::{svc_key, DnsConfiguration, DomainName, Nameserver, SvcParam, DNS_ASSIGN};

use crate::{varint, ProtoError};
use wire::Reader;

/// DATAGRAM (RFC 9297 §3.5): an HTTP Datagram carried in the stream.
pub const DATAGRAM: u64 = 0x00;
/// ADDRESS_ASSIGN (RFC 9484 §4.7.1).
pub const ADDRESS_ASSIGN: u64 = 0x01;
/// ADDRESS_REQUEST (RFC 9484 §4.7.2).
pub const ADDRESS_REQUEST: u64 = 0x02;
/// ROUTE_ADVERTISEMENT (RFC 9484 §4.7.3).
pub const ROUTE_ADVERTISEMENT: u64 = 0x03;
/// veil-private liveness probe: "VEIL" then 0x00. Value: an 8-byte nonce.
pub const VEIL_PING: u64 = 0x56_45_49_4c_00;
/// veil-private answer to [`VEIL_PING`], echoing its nonce.
pub const VEIL_PONG: u64 = 0x56_45_49_4c_01;

/// The HTTP Datagram context ID that carries a whole IP packet
/// (RFC 9484 §6).
pub const IP_PACKET_CONTEXT: u64 = 0;
/// veil's offload context, used only when both ends announced
/// `Veil-Offload` in the upgrade: a Linux `virtio_net_hdr` (see
/// [`crate::gso`]) then the IP packet, which may be a TCP or UDP
/// super-packet not yet segmented, with a partial checksum. Even, as
/// RFC 9484 §6 asks of client-allocated context IDs.
pub const OFFLOAD_CONTEXT: u64 = 2;

/// One decoded capsule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capsule {
    /// An HTTP Datagram: a context ID, then its payload. Context
    /// [`IP_PACKET_CONTEXT`] carries a full IP packet.
    Datagram { context_id: u64, payload: Vec<u8> },
    /// The full list of addresses the sender assigns to the receiver.
    AddressAssign(Vec<AssignedAddress>),
    /// Addresses the sender would like assigned.
    AddressRequest(Vec<RequestedAddress>),
    /// The full list of ranges the sender will route for the receiver.
    RouteAdvertisement(Vec<IpAddressRange>),
    /// The DNS configurations the sender asks the receiver to use; each
    /// DNS_ASSIGN replaces the previous one.
    DnsAssign(Vec<DnsConfiguration>),
    /// veil liveness probe with its nonce.
    Ping(u64),
    /// Answer to a [`Capsule::Ping`], echoing its nonce.
    Pong(u64),
    /// A capsule of a type this crate does not know, already skipped: only
    /// its type and length are reported.
    Unknown { capsule_type: u64, length: u64 },
}

/// Whether the decoder parses capsules of this type (and so buffers them);
/// all others are streamed past.
pub(crate) fn is_known(capsule_type: u64) -> bool {
    matches!(
        capsule_type,
        DATAGRAM
            | ADDRESS_ASSIGN
            | ADDRESS_REQUEST
            | ROUTE_ADVERTISEMENT
            | DNS_ASSIGN
            | VEIL_PING
            | VEIL_PONG
    )
}

/// The name of a known capsule type, for error messages.
fn type_name(capsule_type: u64) -> &'static str {
    match capsule_type {
        DATAGRAM => "DATAGRAM",
        ADDRESS_ASSIGN => "ADDRESS_ASSIGN",
        ADDRESS_REQUEST => "ADDRESS_REQUEST",
        ROUTE_ADVERTISEMENT => "ROUTE_ADVERTISEMENT",
        DNS_ASSIGN => "DNS_ASSIGN",
        VEIL_PING => "VEIL_PING",
        VEIL_PONG => "VEIL_PONG",
        _ => "unknown",
    }
}

/// Appends the DATAGRAM capsule carrying `packet` as a full IP packet: type
/// 0, length, context ID 0, then the packet, with one reservation and one
/// copy. This is the per-packet path toward the peer.
pub fn encode_ip_datagram(packet: &[u8], out: &mut Vec<u8>) {
    encode_datagram(IP_PACKET_CONTEXT, &[packet], out);
}

/// Appends a DATAGRAM capsule for one of the one-byte context IDs
/// ([`IP_PACKET_CONTEXT`], [`OFFLOAD_CONTEXT`]) whose payload is `parts`
/// back to back, so a header and a packet need no joining copy first.
pub fn encode_datagram(context_id: u64, parts: &[&[u8]], out: &mut Vec<u8>) {
    debug_assert!(context_id < 64, "one-byte context IDs only");
    // A one-byte context ID; slices are never 2^62 bytes long.
    let payload: usize = parts.iter().map(|p| p.len()).sum();
    let length = 1 + payload as u64;
    out.reserve(1 + varint::len(length) + 1 + payload);
    out.push(DATAGRAM as u8);
    varint::encode_unchecked(length, out);
    out.push(context_id as u8);
    for part in parts {
        out.extend_from_slice(part);
    }
}

impl Capsule {
    /// The capsule type on the wire.
    pub fn capsule_type(&self) -> u64 {
        match self {
            Capsule::Datagram { .. } => DATAGRAM,
            Capsule::AddressAssign(_) => ADDRESS_ASSIGN,
            Capsule::AddressRequest(_) => ADDRESS_REQUEST,
            Capsule::RouteAdvertisement(_) => ROUTE_ADVERTISEMENT,
            Capsule::DnsAssign(_) => DNS_ASSIGN,
            Capsule::Ping(_) => VEIL_PING,
            Capsule::Pong(_) => VEIL_PONG,
            Capsule::Unknown { capsule_type, .. } => *capsule_type,
        }
    }

    /// Appends the capsule (type, length, value) to `out`.
    ///
    /// Refuses, leaving `out` untouched, anything the decoder would reject
    /// (an invalid address or route list, an empty ADDRESS_REQUEST, a value
    /// too large for a varint) and [`Capsule::Unknown`], which has no body.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        self.validate()?;
        let value_len = self.value_len();
        out.reserve(varint::len(self.capsule_type()) + varint::len(value_len as u64) + value_len);
        varint::encode_unchecked(self.capsule_type(), out);
        varint::encode_unchecked(value_len as u64, out);
        let start = out.len();
        self.write_value(out);
        debug_assert_eq!(
            out.len() - start,
            value_len,
            "value_len disagrees with write_value"
        );
        Ok(())
    }

    fn validate(&self) -> Result<(), ProtoError> {
        match self {
            Capsule::Datagram { context_id, .. } => varint::check(*context_id),
            Capsule::AddressAssign(list) => list.iter().try_for_each(|a| {
                varint::check(a.request_id)?;
                address::check_prefix(a.ip, a.prefix_len)
            }),
            Capsule::AddressRequest(list) => {
                if list.is_empty() {
                    return Err(ProtoError::EmptyAddressRequest);
                }
                list.iter().try_for_each(|a| {
                    if a.request_id == 0 {
                        return Err(ProtoError::ZeroRequestId);
                    }
                    varint::check(a.request_id)?;
                    address::check_prefix(a.ip, a.prefix_len)
                })
            }
            Capsule::RouteAdvertisement(routes) => validate_routes(routes),
            Capsule::DnsAssign(configs) => configs.iter().try_for_each(DnsConfiguration::check),
            Capsule::Ping(_) | Capsule::Pong(_) => Ok(()),
            Capsule::Unknown { capsule_type, .. } => Err(ProtoError::EncodeUnknown {
                capsule_type: *capsule_type,
            }),
        }
    }

    fn value_len(&self) -> usize {
        match self {
            Capsule::Datagram {
                context_id,
                payload,
            } => varint::len(*context_id) + payload.len(),
            Capsule::AddressAssign(list) => list
                .iter()
                .map(|a| address::entry_len(a.request_id, a.ip))
                .sum(),
            Capsule::AddressRequest(list) => list
                .iter()
                .map(|a| address::entry_len(a.request_id, a.ip))
                .sum(),
            Capsule::RouteAdvertisement(routes) => routes.iter().map(|r| r.encoded_len()).sum(),
            Capsule::DnsAssign(configs) => configs.iter().map(DnsConfiguration::encoded_len).sum(),
            Capsule::Ping(_) | Capsule::Pong(_) => 8,
            Capsule::Unknown { .. } => 0,
        }
    }

    fn write_value(&self, out: &mut Vec<u8>) {
        match self {
            Capsule::Datagram {
                context_id,
                payload,
            } => {
                varint::encode_unchecked(*context_id, out);
                out.extend_from_slice(payload);
            }
            Capsule::AddressAssign(list) => {
                for a in list {
                    address::write_entry(a.request_id, a.ip, a.prefix_len, out);
                }
            }
            Capsule::AddressRequest(list) => {
                for a in list {
                    address::write_entry(a.request_id, a.ip, a.prefix_len, out);
                }
            }
            Capsule::RouteAdvertisement(routes) => {
                for r in routes {
                    r.write(out);
                }
            }
            Capsule::DnsAssign(configs) => {
                for c in configs {
                    c.write(out);
                }
            }
            Capsule::Ping(nonce) | Capsule::Pong(nonce) => {
                out.extend_from_slice(&nonce.to_be_bytes())
            }
            Capsule::Unknown { .. } => {}
        }
    }

    /// Parses the value of a capsule of a known type. The value is exactly
    /// the declared length: a field running past it or bytes left after the
    /// last field are malformed (RFC 9297 §3.3).
    pub(crate) fn decode_value(capsule_type: u64, value: &[u8]) -> Result<Capsule, ProtoError> {
        let mut r = Reader::new(value, type_name(capsule_type));
        let capsule = match capsule_type {
            DATAGRAM => Capsule::Datagram {
                context_id: r.varint("Context ID")?,
                payload: r.rest().to_vec(),
            },
            ADDRESS_ASSIGN => {
                let mut list = Vec::new();
                while !r.is_empty() {
                    let (request_id, ip, prefix_len) = address::read_entry(&mut r)?;
                    list.push(AssignedAddress {
                        request_id,
                        ip,
                        prefix_len,
                    });
                }
                Capsule::AddressAssign(list)
            }
            ADDRESS_REQUEST => {
                let mut list = Vec::new();
                while !r.is_empty() {
                    let (request_id, ip, prefix_len) = address::read_entry(&mut r)?;
                    if request_id == 0 {
                        return Err(ProtoError::ZeroRequestId);
                    }
                    list.push(RequestedAddress {
                        request_id,
                        ip,
                        prefix_len,
                    });
                }
                if list.is_empty() {
                    return Err(ProtoError::EmptyAddressRequest);
                }
                Capsule::AddressRequest(list)
            }
            ROUTE_ADVERTISEMENT => {
                let mut routes = Vec::new();
                while !r.is_empty() {
                    routes.push(IpAddressRange::read(&mut r)?);
                }
                validate_routes(&routes)?;
                Capsule::RouteAdvertisement(routes)
            }
            DNS_ASSIGN => {
                let mut configs = Vec::new();
                while !r.is_empty() {
                    configs.push(DnsConfiguration::read(&mut r)?);
                }
                Capsule::DnsAssign(configs)
            }
            VEIL_PING => Capsule::Ping(u64::from_be_bytes(r.bytes::<8>("Nonce")?)),
            VEIL_PONG => Capsule::Pong(u64::from_be_bytes(r.bytes::<8>("Nonce")?)),
            // The decoder streams past unknown types and never gets here.
            other => {
                return Ok(Capsule::Unknown {
                    capsule_type: other,
                    length: value.len() as u64,
                })
            }
        };
        r.finish()?;
        Ok(capsule)
    }
}
