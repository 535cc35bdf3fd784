//! The virtio-net header a Linux TUN device opened with `IFF_VNET_HDR` puts in
//! front of every packet, and the software segmentation that stands in for a
//! NIC when the peer cannot take offloaded packets.
//!
//! With `TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)` the kernel hands
//! the TUN reader unsegmented TCP "super-packets" of up to 64 KiB (and takes
//! UDP ones, `GSO_UDP_L4`, written to it from Linux 6.2 on) whose transport
//! checksum is only partial, each described by a 10-byte
//! [`VnetHdr`] (virtio 1.x layout, little-endian). Carrying header and packet
//! through the tunnel as they are lets both ends encrypt and frame one large
//! packet instead of dozens of MTU-sized ones; the receiving end writes them
//! to its own TUN device, whose kernel finishes the job.
//!
//! A peer that did not negotiate this (a plain RFC 9484 client) expects
//! ordinary, complete IP packets, so for it the sender runs [`segment`]: it
//! completes the checksum and cuts the super-packet into the packets a NIC
//! would have put on the wire.
//!
//! A header that arrives from a peer is untrusted: [`VnetHdr::split`] and
//! [`VnetHdr::validate`] apply the checks Linux's `virtio_net_hdr_to_skb`
//! makes, plus the IPv4 sanity [`segment`] relies on.

use veil_common::csum::Checksum;

use crate::ipv4::*;

mod segment;
#[cfg(test)]
pub(crate) mod tests6;

pub use segment::{segment, segment_framed};

/// Size of `struct virtio_net_hdr` (without the `num_buffers` field of the
/// mergeable-buffers variant, which TUN does not use).
pub const VNET_HDR_LEN: usize = 10;

/// The smallest segment size accepted: no real MSS is smaller (Linux's
/// floor is 48 bytes of TCP payload plus options), and it bounds how many
/// segments one 64 KiB packet can become.
pub const MIN_GSO_SIZE: u16 = 64;

/// `struct virtio_net_hdr`: how the kernel describes the offload work still
/// to be done on the packet that follows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// [`VnetHdr::F_NEEDS_CSUM`] and/or [`VnetHdr::F_DATA_VALID`].
    pub flags: u8,
    /// [`VnetHdr::GSO_NONE`], [`VnetHdr::GSO_TCPV4`],
    /// [`VnetHdr::GSO_TCPV6`] or [`VnetHdr::GSO_UDP_L4`], the TCP ones
    /// possibly with [`VnetHdr::GSO_ECN`].
    pub gso_type: u8,
    /// Length of the headers repeated in every segment; advisory only (Linux
    /// recomputes it), so validation only bounds it by the packet length.
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS for TCP).
    pub gso_size: u16,
    /// Where the checksummed region starts: the transport header.
    pub csum_start: u16,
    /// Where the checksum field sits, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// The transport checksum is partial: the field at
    /// `csum_start + csum_offset` holds the pseudo-header sum and the sum
    /// over `packet[csum_start..]` remains to be folded in.
    pub const F_NEEDS_CSUM: u8 = 1;
    /// The checksum has already been verified; nothing to do for it.
    pub const F_DATA_VALID: u8 = 2;
    /// Not a super-packet: no segmentation to do.
    pub const GSO_NONE: u8 = 0;
    /// An IPv4 TCP super-packet, to be cut into `gso_size`-byte segments.
    pub const GSO_TCPV4: u8 = 1;
    /// An IPv6 TCP super-packet (no extension headers), likewise.
    pub const GSO_TCPV6: u8 = 4;
    /// An IPv4 UDP super-packet, to be cut into `gso_size`-byte datagrams.
    pub const GSO_UDP_L4: u8 = 5;
    /// The TCP flow uses ECN: CWR goes on the first segment only.
    pub const GSO_ECN: u8 = 0x80;
    /// No offload: a complete packet with a correct checksum.
    pub const NONE: VnetHdr = VnetHdr {
        flags: 0,
        gso_type: Self::GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Decodes the 10 wire bytes: `flags`, `gso_type`, then four
    /// little-endian `u16`s (virtio 1.x is little-endian regardless of host).
    pub fn from_bytes(bytes: [u8; VNET_HDR_LEN]) -> Self {
        let le16 = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        VnetHdr {
            flags: bytes[0],
            gso_type: bytes[1],
            hdr_len: le16(2),
            gso_size: le16(4),
            csum_start: le16(6),
            csum_offset: le16(8),
        }
    }

    /// Encodes the header in the layout [`VnetHdr::from_bytes`] reads.
    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut out = [0; VNET_HDR_LEN];
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        out
    }

    /// Whether the packet is a super-packet that needs segmenting (ignoring
    /// the ECN bit, which only qualifies the type).
    pub fn is_gso(&self) -> bool {
        self.gso_type & !Self::GSO_ECN != Self::GSO_NONE
    }

    /// Splits header+packet (the tunnel payload) and validates the header
    /// against the packet, so that a peer's header is never trusted as is.
    pub fn split(payload: &[u8]) -> Result<(VnetHdr, &[u8]), GsoError> {
        let (head, packet) = payload
            .split_first_chunk::<VNET_HDR_LEN>()
            .ok_or(GsoError::ShortPayload { len: payload.len() })?;
        let hdr = Self::from_bytes(*head);
        hdr.validate(packet)?;
        Ok((hdr, packet))
    }

    /// Splits header+packet without checking the header: for bytes whose
    /// header was already validated ([`crate::session::Output::OffloadPacket`])
    /// or comes from this end's own kernel, and whose consumers
    /// ([`segment`], the peer's session) validate anyway. `None` if
    /// shorter than a header.
    pub fn peel(joined: &[u8]) -> Option<(VnetHdr, &[u8])> {
        let (head, packet) = joined.split_first_chunk::<VNET_HDR_LEN>()?;
        Some((Self::from_bytes(*head), packet))
    }

    /// The checks `split` does, for a header and packet already apart.
    pub fn validate(&self, packet: &[u8]) -> Result<(), GsoError> {
        self.check(packet).map(|_| ())
    }

    fn needs_csum(&self) -> bool {
        self.flags & Self::F_NEEDS_CSUM != 0
    }

    /// Validates, and for a GSO packet returns where its headers end so that
    /// [`segment`] can slice without checking again.
    fn check(&self, packet: &[u8]) -> Result<Option<GsoLayout>, GsoError> {
        self.check_flags()?;
        let transport = self.check_gso_type()?;
        self.check_bounds(packet.len())?;
        match transport {
            None => Ok(None),
            Some(transport) => self.check_gso(transport, packet).map(Some),
        }
    }

    fn check_flags(&self) -> Result<(), GsoError> {
        let known = Self::F_NEEDS_CSUM | Self::F_DATA_VALID;
        if self.flags & !known != 0 {
            return Err(GsoError::UnknownFlags { flags: self.flags });
        }
        Ok(())
    }

    /// The transport the GSO type asks to segment, `None` for no GSO.
    fn check_gso_type(&self) -> Result<Option<Transport>, GsoError> {
        let transport = match self.gso_type & !Self::GSO_ECN {
            Self::GSO_NONE => None,
            Self::GSO_TCPV4 => Some(Transport::Tcp),
            Self::GSO_TCPV6 => Some(Transport::Tcp6),
            Self::GSO_UDP_L4 => Some(Transport::Udp),
            _ => {
                return Err(GsoError::UnknownGsoType {
                    gso_type: self.gso_type,
                })
            }
        };
        // ECN only describes how TCP's CWR flag is spread over segments.
        if self.gso_type & Self::GSO_ECN != 0 && !transport.is_some_and(Transport::is_tcp) {
            return Err(GsoError::EcnWithoutTcp {
                gso_type: self.gso_type,
            });
        }
        Ok(transport)
    }

    /// Offsets that must lie inside the packet whatever the packet is.
    fn check_bounds(&self, len: usize) -> Result<(), GsoError> {
        if usize::from(self.hdr_len) > len {
            return Err(GsoError::HdrLenBeyondPacket {
                hdr_len: self.hdr_len,
                len,
            });
        }
        // In usize: two u16s plus 2 cannot overflow it.
        let csum_end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
        if self.needs_csum() && csum_end > len {
            return Err(GsoError::ChecksumBeyondPacket {
                start: self.csum_start,
                offset: self.csum_offset,
                len,
            });
        }
        Ok(())
    }

    /// What segmenting needs: an unfragmented IPv4 packet of the right
    /// protocol, a partial checksum where that protocol keeps it, and a
    /// transport header that fits.
    fn check_gso(&self, transport: Transport, packet: &[u8]) -> Result<GsoLayout, GsoError> {
        if !self.needs_csum() {
            return Err(GsoError::GsoWithoutChecksum {
                gso: transport.gso_name(),
            });
        }
        if self.gso_size < MIN_GSO_SIZE {
            return Err(GsoError::GsoSizeTooSmall {
                size: self.gso_size,
            });
        }
        let ip_hdr_len = match transport {
            Transport::Tcp6 => ipv6_header_len(packet, transport)?,
            Transport::Tcp | Transport::Udp => ipv4_header_len(packet, transport)?,
        };
        self.check_checksum_place(transport, ip_hdr_len)?;
        let l4_hdr_len = transport_header_len(packet, ip_hdr_len, transport)?;
        Ok(GsoLayout {
            transport,
            ip_hdr_len,
            l4_hdr_len,
            gso_size: usize::from(self.gso_size),
        })
    }

    /// Reduces a header that came from the peer to the one meaning it can
    /// have, before the packet reaches a kernel. The kernel (and, after the
    /// datapath's NAT, a NIC) trusts `csum_start`/`csum_offset`: left as the
    /// peer sent them, they would let it write 16 bits of its choosing
    /// anywhere in the packet *after* the gateway checked and translated it
    /// (its source port, the destination, an address). So:
    ///
    /// - a GSO packet must be IPv4 TCP or UDP, or IPv6 TCP without
    ///   extension headers, with the checksum in its own
    ///   transport field and a segment size between [`MIN_GSO_SIZE`] and
    ///   what fits in `max_packet` bytes of IP; anything else is an error;
    /// - a packet that only needs its checksum keeps the offload when the
    ///   checksum is where its protocol keeps it; otherwise the checksum is
    ///   completed here, in `packet`, where the peer asked (that only
    ///   changes bytes the peer could have sent itself, *before* any check)
    ///   and the packet goes on as a plain one;
    /// - `DATA_VALID` is dropped: the receiving kernel verifies for itself;
    /// - a packet that is not to be cut is at most `max_packet` bytes, as
    ///   one without an offload header must be.
    ///
    /// Returns the header to write in front of `packet`; every field of it
    /// is derived from the packet, except the segment size.
    pub fn sanitize(&self, packet: &mut [u8], max_packet: usize) -> Result<VnetHdr, GsoError> {
        if let Some(layout) = self.check(packet)? {
            let max_size = max_packet.saturating_sub(layout.headers_len());
            if layout.gso_size > max_size {
                return Err(GsoError::GsoSizeTooLarge {
                    size: self.gso_size,
                    max: max_size,
                });
            }
            return Ok(layout.header(self.gso_type & Self::GSO_ECN));
        }
        // One packet, not to be cut: held to the limit a packet without
        // an offload header has.
        if packet.len() > max_packet {
            return Err(GsoError::PacketTooLong {
                len: packet.len(),
                max: max_packet,
            });
        }
        if !self.needs_csum() {
            return Ok(Self::NONE);
        }
        if let Some(layout) = checksum_layout(packet) {
            if usize::from(self.csum_start) == layout.ip_hdr_len
                && self.csum_offset == layout.transport.csum_offset()
            {
                return Ok(VnetHdr {
                    gso_type: Self::GSO_NONE,
                    gso_size: 0,
                    ..layout.header(0)
                });
            }
        }
        // Bounds were checked: the field lies inside the packet.
        complete_in_place(self, packet);
        Ok(Self::NONE)
    }

    fn check_checksum_place(
        &self,
        transport: Transport,
        ip_hdr_len: usize,
    ) -> Result<(), GsoError> {
        let want_offset = transport.csum_offset();
        if usize::from(self.csum_start) != ip_hdr_len || self.csum_offset != want_offset {
            return Err(GsoError::ChecksumMisplaced {
                gso: transport.gso_name(),
                start: self.csum_start,
                offset: self.csum_offset,
                want_start: ip_hdr_len,
                want_offset,
            });
        }
        Ok(())
    }
}

/// Why an offload header cannot be used with its packet.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GsoError {
    /// The tunnel payload cannot even hold the header.
    #[error(
        "offload header: payload of {len} bytes is shorter than the {VNET_HDR_LEN}-byte header"
    )]
    ShortPayload { len: usize },
    /// Flag bits other than NEEDS_CSUM and DATA_VALID.
    #[error("offload header: unknown flags {flags:#x}")]
    UnknownFlags { flags: u8 },
    /// A GSO type other than none, TCPv4, TCPv6 and UDP_L4 (ECN bit aside).
    #[error("offload header: unknown GSO type {gso_type:#x}")]
    UnknownGsoType { gso_type: u8 },
    /// The ECN bit on anything but TCP.
    #[error("offload header: ECN bit in GSO type {gso_type:#x}, allowed only with TCP")]
    EcnWithoutTcp { gso_type: u8 },
    /// A header length past the end of the packet.
    #[error("offload header: header length {hdr_len} exceeds the {len}-byte packet")]
    HdrLenBeyondPacket { hdr_len: u16, len: usize },
    /// A checksum field that does not fit in the packet.
    #[error("offload header: checksum at {start}+{offset} lies beyond the {len}-byte packet")]
    ChecksumBeyondPacket { start: u16, offset: u16, len: usize },
    /// Segments need their checksums computed, so GSO implies NEEDS_CSUM.
    #[error("offload header: GSO type {gso} without the NEEDS_CSUM flag")]
    GsoWithoutChecksum { gso: &'static str },
    /// Tiny segments would turn one packet into thousands (and zero-byte
    /// ones would never end).
    #[error("offload header: GSO size {size} is below the minimum of {MIN_GSO_SIZE}")]
    GsoSizeTooSmall { size: u16 },
    /// Segments larger than the tunnel's MTU allows: the kernel would
    /// send packets nobody on the path asked for.
    #[error("offload header: GSO size {size} exceeds the {max} bytes of payload the MTU allows")]
    GsoSizeTooLarge { size: u16, max: usize },
    /// A packet without GSO longer than the tunnel's MTU allows.
    #[error("offload header: a {len}-byte packet without GSO exceeds the {max}-byte limit")]
    PacketTooLong { len: usize, max: usize },
    /// A GSO packet that is not of the GSO type's IP version and protocol.
    #[error("offload header: GSO type {gso} on a packet that is not {expected}")]
    NotGsoPacket {
        gso: &'static str,
        expected: &'static str,
    },
    /// A GSO packet whose IPv4 total length disagrees with its size.
    #[error(
        "offload header: GSO packet's IPv4 total length {total_len} differs from its {len} bytes"
    )]
    TotalLengthMismatch { total_len: u16, len: usize },
    /// An IPv4 fragment cannot be segmented: it has no complete transport payload.
    #[error("offload header: GSO type {gso} on an IPv4 fragment")]
    Fragment { gso: &'static str },
    /// A GSO packet whose IPv6 payload length disagrees with its size (a
    /// jumbogram's 0 included: there is no hop-by-hop header to carry it).
    #[error(
        "offload header: GSO packet's IPv6 payload length {payload_len} differs from the {len} bytes after its header"
    )]
    PayloadLengthMismatch { payload_len: u16, len: usize },
    /// An IPv6 super-packet with extension headers (next header
    /// `next`): neither Linux's TCP nor any NIC segments through them, so
    /// such a header was not made by a kernel and is refused.
    #[error("offload header: GSO type {gso} on an IPv6 packet with extension header {next}")]
    ExtensionHeader { gso: &'static str, next: u8 },
    /// A partial checksum somewhere other than the transport's checksum field.
    #[error(
        "offload header: GSO type {gso} needs the checksum at {want_start}+{want_offset}, not {start}+{offset}"
    )]
    ChecksumMisplaced {
        gso: &'static str,
        start: u16,
        offset: u16,
        want_start: usize,
        want_offset: u16,
    },
    /// A TCP data offset below 5 words or past the end of the packet.
    #[error(
        "offload header: TCP data offset {data_offset} does not fit the {available} bytes after the IP header"
    )]
    BadTcpHeader { data_offset: u8, available: usize },
}

/// The transport a GSO type segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    /// TCP over IPv4.
    Tcp,
    /// TCP over IPv6, the TCP header right after the 40-byte IPv6 header.
    Tcp6,
    /// UDP over IPv4.
    Udp,
}

impl Transport {
    fn gso_name(self) -> &'static str {
        match self {
            Transport::Tcp => "TCPv4",
            Transport::Tcp6 => "TCPv6",
            Transport::Udp => "UDP_L4",
        }
    }

    fn expected_packet(self) -> &'static str {
        match self {
            Transport::Tcp => "IPv4/TCP",
            Transport::Tcp6 => "IPv6/TCP",
            Transport::Udp => "IPv4/UDP",
        }
    }

    fn is_tcp(self) -> bool {
        matches!(self, Transport::Tcp | Transport::Tcp6)
    }

    fn protocol(self) -> u8 {
        match self {
            Transport::Tcp | Transport::Tcp6 => PROTO_TCP,
            Transport::Udp => PROTO_UDP,
        }
    }

    fn csum_offset(self) -> u16 {
        match self {
            Transport::Tcp | Transport::Tcp6 => TCP_CSUM as u16,
            Transport::Udp => UDP_CSUM as u16,
        }
    }
}

/// Where a validated GSO packet's headers end. Every offset here has been
/// checked against the packet, so segmenting can index without panicking.
struct GsoLayout {
    transport: Transport,
    ip_hdr_len: usize,
    l4_hdr_len: usize,
    gso_size: usize,
}

impl GsoLayout {
    fn headers_len(&self) -> usize {
        self.ip_hdr_len + self.l4_hdr_len
    }

    /// The canonical header for this packet: the checksum in the
    /// transport's own field, the headers' true length.
    fn header(&self, ecn: u8) -> VnetHdr {
        let gso_type = match self.transport {
            Transport::Tcp => VnetHdr::GSO_TCPV4 | ecn,
            Transport::Tcp6 => VnetHdr::GSO_TCPV6 | ecn,
            Transport::Udp => VnetHdr::GSO_UDP_L4,
        };
        VnetHdr {
            flags: VnetHdr::F_NEEDS_CSUM,
            gso_type,
            // Both fit: they were checked against a packet of u16 length.
            hdr_len: self.headers_len() as u16,
            gso_size: self.gso_size as u16,
            csum_start: self.ip_hdr_len as u16,
            csum_offset: self.transport.csum_offset(),
        }
    }
}

/// Where an unsegmented IPv4 TCP or UDP packet, or IPv6 TCP packet, keeps
/// its checksum, if it is one whose checksum the kernel may be asked to
/// finish; `gso_size` is 0. (IPv6 UDP has its checksum completed by the
/// sanitizer instead: the segmentation code knows no IPv6 UDP.)
fn checksum_layout(packet: &[u8]) -> Option<GsoLayout> {
    let version = packet.first()? >> 4;
    let transport = match (version, packet.get(IP_PROTO), packet.get(IPV6_NEXT)) {
        (4, Some(&PROTO_TCP), _) => Transport::Tcp,
        (4, Some(&PROTO_UDP), _) => Transport::Udp,
        (6, _, Some(&PROTO_TCP)) => Transport::Tcp6,
        _ => return None,
    };
    let ip_hdr_len = match transport {
        Transport::Tcp6 => ipv6_header_len(packet, transport).ok()?,
        Transport::Tcp | Transport::Udp => ipv4_header_len(packet, transport).ok()?,
    };
    let l4_hdr_len = transport_header_len(packet, ip_hdr_len, transport).ok()?;
    Some(GsoLayout {
        transport,
        ip_hdr_len,
        l4_hdr_len,
        gso_size: 0,
    })
}

/// The IPv4 header length of a packet fit for `transport` segmentation.
fn ipv4_header_len(packet: &[u8], transport: Transport) -> Result<usize, GsoError> {
    let not_it = GsoError::NotGsoPacket {
        gso: transport.gso_name(),
        expected: transport.expected_packet(),
    };
    if packet.len() < IPV4_MIN_HDR_LEN || packet[0] >> 4 != 4 {
        return Err(not_it);
    }
    let ip_hdr_len = usize::from(packet[0] & 0x0f) * 4;
    if ip_hdr_len < IPV4_MIN_HDR_LEN || ip_hdr_len > packet.len() {
        return Err(not_it);
    }
    if packet[IP_PROTO] != transport.protocol() {
        return Err(not_it);
    }
    // Segment lengths are derived from the packet's size, so the two must agree.
    let total_len = be16(packet, IP_TOTAL_LEN);
    if usize::from(total_len) != packet.len() {
        return Err(GsoError::TotalLengthMismatch {
            total_len,
            len: packet.len(),
        });
    }
    if be16(packet, IP_FRAG) & IP_FRAG_MASK != 0 {
        return Err(GsoError::Fragment {
            gso: transport.gso_name(),
        });
    }
    Ok(ip_hdr_len)
}

/// The IPv6 header length (always [`IPV6_HDR_LEN`]: extension headers
/// are refused) of a packet fit for `transport` segmentation.
fn ipv6_header_len(packet: &[u8], transport: Transport) -> Result<usize, GsoError> {
    if packet.len() < IPV6_HDR_LEN || packet[0] >> 4 != 6 {
        return Err(GsoError::NotGsoPacket {
            gso: transport.gso_name(),
            expected: transport.expected_packet(),
        });
    }
    let next = packet[IPV6_NEXT];
    if next != transport.protocol() {
        return Err(if is_ipv6_extension(next) {
            GsoError::ExtensionHeader {
                gso: transport.gso_name(),
                next,
            }
        } else {
            GsoError::NotGsoPacket {
                gso: transport.gso_name(),
                expected: transport.expected_packet(),
            }
        });
    }
    // Segment lengths are derived from the packet's size, so the two must agree.
    let payload_len = be16(packet, IPV6_PAYLOAD_LEN);
    if usize::from(payload_len) != packet.len() - IPV6_HDR_LEN {
        return Err(GsoError::PayloadLengthMismatch {
            payload_len,
            len: packet.len() - IPV6_HDR_LEN,
        });
    }
    Ok(IPV6_HDR_LEN)
}

/// The IPv6 extension headers (RFC 8200 4, RFC 7045): hop-by-hop,
/// routing, fragment, ESP, AH, destination options, mobility, HIP, shim6
/// and the two experimental values.
fn is_ipv6_extension(next: u8) -> bool {
    matches!(
        next,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}

/// The transport header length, checked to fit after the IP header.
fn transport_header_len(
    packet: &[u8],
    ip_hdr_len: usize,
    transport: Transport,
) -> Result<usize, GsoError> {
    let available = packet.len() - ip_hdr_len;
    let l4_hdr_len = match transport {
        Transport::Udp => UDP_HDR_LEN,
        Transport::Tcp | Transport::Tcp6 => {
            let data_offset = packet
                .get(ip_hdr_len + TCP_DATA_OFFSET)
                .map_or(0, |byte| byte >> 4);
            let len = usize::from(data_offset) * 4;
            if len < TCP_MIN_HDR_LEN || len > available {
                return Err(GsoError::BadTcpHeader {
                    data_offset,
                    available,
                });
            }
            len
        }
    };
    // Already implied by the checksum bounds; kept so slicing never depends
    // on the order of checks.
    if l4_hdr_len > available {
        return Err(GsoError::NotGsoPacket {
            gso: transport.gso_name(),
            expected: transport.expected_packet(),
        });
    }
    Ok(l4_hdr_len)
}

/// [`complete_checksum`] on the packet itself. The caller has checked that
/// the field lies inside the packet.
fn complete_in_place(hdr: &VnetHdr, packet: &mut [u8]) {
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    let mut sum = Checksum::default();
    sum.add(&packet[start..]);
    let mut csum = sum.finish();
    // In UDP a zero checksum means "none"; 0xffff is the same value in
    // ones' complement.
    if usize::from(hdr.csum_offset) == UDP_CSUM && csum == 0 {
        csum = 0xffff;
    }
    put16(packet, field, csum);
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: [u8; 4] = [10, 77, 0, 2];
    const DST: [u8; 4] = [192, 0, 2, 7];
    const FIN: u8 = 0x01;
    const PSH: u8 = 0x08;
    const ACK: u8 = 0x10;
    const CWR: u8 = 0x80;
    /// Timestamps option (kind 8, length 10) padded with two NOPs to 12 bytes.
    const TS_OPTION: [u8; 12] = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];

    // --- An independent RFC 1071 checksum -----------------------------

    /// Ones' complement sum of `data` as big-endian words, folded to 16 bits.
    fn ones_sum(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        let mut i = 0;
        while i < data.len() {
            let hi = u32::from(data[i]) << 8;
            let lo = data.get(i + 1).map_or(0, |&b| u32::from(b));
            sum += hi | lo;
            i += 2;
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    fn pseudo_header(proto: u8, l4_len: usize) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&SRC);
        p.extend_from_slice(&DST);
        p.push(0);
        p.push(proto);
        p.extend_from_slice(&(l4_len as u16).to_be_bytes());
        p
    }

    /// Whether the IPv4 header checksum of `packet` verifies.
    fn ip_checksum_ok(packet: &[u8]) -> bool {
        let ihl = usize::from(packet[0] & 0xf) * 4;
        !ones_sum(&packet[..ihl]) == 0
    }

    /// Whether the transport checksum of `packet` verifies: the sum over
    /// pseudo-header and segment complements to zero.
    fn l4_checksum_ok(packet: &[u8]) -> bool {
        let ihl = usize::from(packet[0] & 0xf) * 4;
        let mut all = pseudo_header(packet[9], packet.len() - ihl);
        all.extend_from_slice(&packet[ihl..]);
        !ones_sum(&all) == 0
    }

    // --- Packet builders ----------------------------------------------

    /// An IPv4 packet with a correct header checksum around `l4`.
    fn ipv4(proto: u8, id: u16, ip_options: &[u8], l4: &[u8]) -> Vec<u8> {
        assert_eq!(ip_options.len() % 4, 0);
        let ihl = 20 + ip_options.len();
        let total = ihl + l4.len();
        let mut p = vec![0x40 | (ihl / 4) as u8, 0];
        p.extend_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&[0x40, 0]); // DF
        p.extend_from_slice(&[64, proto, 0, 0]);
        p.extend_from_slice(&SRC);
        p.extend_from_slice(&DST);
        p.extend_from_slice(ip_options);
        p.extend_from_slice(l4);
        let csum = !ones_sum(&p[..ihl]);
        p[10..12].copy_from_slice(&csum.to_be_bytes());
        p
    }

    /// Stores the partial checksum Linux leaves for CHECKSUM_PARTIAL: the
    /// pseudo-header sum, folded but not complemented.
    fn set_partial(packet: &mut [u8], csum_at: usize) {
        let ihl = usize::from(packet[0] & 0xf) * 4;
        let partial = ones_sum(&pseudo_header(packet[9], packet.len() - ihl));
        packet[csum_at..csum_at + 2].copy_from_slice(&partial.to_be_bytes());
    }

    struct Tcp<'a> {
        seq: u32,
        flags: u8,
        id: u16,
        ip_options: &'a [u8],
        tcp_options: &'a [u8],
    }

    impl Default for Tcp<'_> {
        fn default() -> Self {
            Tcp {
                seq: 1000,
                flags: ACK,
                id: 0x1234,
                ip_options: &[],
                tcp_options: &[],
            }
        }
    }

    impl Tcp<'_> {
        /// An IPv4/TCP packet carrying `payload` with a partial checksum.
        fn packet(&self, payload: &[u8]) -> Vec<u8> {
            assert_eq!(self.tcp_options.len() % 4, 0);
            let doff = (20 + self.tcp_options.len()) / 4;
            let mut tcp = Vec::new();
            tcp.extend_from_slice(&40000u16.to_be_bytes());
            tcp.extend_from_slice(&443u16.to_be_bytes());
            tcp.extend_from_slice(&self.seq.to_be_bytes());
            tcp.extend_from_slice(&77u32.to_be_bytes()); // ack
            tcp.push((doff as u8) << 4);
            tcp.push(self.flags);
            tcp.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, csum, urgent
            tcp.extend_from_slice(self.tcp_options);
            tcp.extend_from_slice(payload);
            let mut p = ipv4(PROTO_TCP, self.id, self.ip_options, &tcp);
            let ihl = 20 + self.ip_options.len();
            set_partial(&mut p, ihl + 16);
            p
        }
    }

    fn tcp_packet(payload: &[u8]) -> Vec<u8> {
        Tcp::default().packet(payload)
    }

    /// An IPv4/UDP packet carrying `payload` with a partial checksum.
    fn udp_packet(payload: &[u8]) -> Vec<u8> {
        let mut udp = Vec::new();
        udp.extend_from_slice(&5353u16.to_be_bytes());
        udp.extend_from_slice(&4433u16.to_be_bytes());
        udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        let mut p = ipv4(PROTO_UDP, 0x0100, &[], &udp);
        set_partial(&mut p, 26);
        p
    }

    fn tcp_gso(gso_size: u16, ihl: u16, doff_bytes: u16) -> VnetHdr {
        VnetHdr {
            flags: VnetHdr::F_NEEDS_CSUM,
            gso_type: VnetHdr::GSO_TCPV4,
            hdr_len: ihl + doff_bytes,
            gso_size,
            csum_start: ihl,
            csum_offset: 16,
        }
    }

    fn udp_gso(gso_size: u16) -> VnetHdr {
        VnetHdr {
            flags: VnetHdr::F_NEEDS_CSUM,
            gso_type: VnetHdr::GSO_UDP_L4,
            hdr_len: 28,
            gso_size,
            csum_start: 20,
            csum_offset: 6,
        }
    }

    fn csum_only(csum_start: u16, csum_offset: u16) -> VnetHdr {
        VnetHdr {
            flags: VnetHdr::F_NEEDS_CSUM,
            csum_start,
            csum_offset,
            ..VnetHdr::NONE
        }
    }

    fn payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    fn run(hdr: &VnetHdr, packet: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        let n = segment(hdr, packet, &mut scratch, |p| out.push(p.to_vec())).unwrap();
        assert_eq!(n, out.len());
        out
    }

    fn with_header(hdr: &VnetHdr, packet: &[u8]) -> Vec<u8> {
        let mut v = hdr.to_bytes().to_vec();
        v.extend_from_slice(packet);
        v
    }

    fn split_err(hdr: &VnetHdr, packet: &[u8]) -> GsoError {
        VnetHdr::split(&with_header(hdr, packet)).unwrap_err()
    }

    fn u16_at(p: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([p[at], p[at + 1]])
    }

    fn u32_at(p: &[u8], at: usize) -> u32 {
        u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
    }

    // --- Header encoding ----------------------------------------------

    #[test]
    fn header_bytes_are_little_endian_and_round_trip() {
        let hdr = VnetHdr {
            flags: 1,
            gso_type: 0x81,
            hdr_len: 0x0102,
            gso_size: 0x0304,
            csum_start: 0x0506,
            csum_offset: 0x0708,
        };
        let bytes = hdr.to_bytes();
        assert_eq!(bytes, [1, 0x81, 2, 1, 4, 3, 6, 5, 8, 7]);
        assert_eq!(VnetHdr::from_bytes(bytes), hdr);
        assert_eq!(VnetHdr::NONE.to_bytes(), [0; VNET_HDR_LEN]);
        assert_eq!(VnetHdr::NONE, VnetHdr::default());
    }

    #[test]
    fn is_gso_ignores_the_ecn_bit() {
        assert!(!VnetHdr::NONE.is_gso());
        assert!(!csum_only(20, 16).is_gso());
        assert!(tcp_gso(1400, 20, 20).is_gso());
        assert!(udp_gso(1400).is_gso());
        let ecn = VnetHdr {
            gso_type: VnetHdr::GSO_TCPV4 | VnetHdr::GSO_ECN,
            ..VnetHdr::NONE
        };
        assert!(ecn.is_gso());
    }

    // --- Validation ---------------------------------------------------

    #[test]
    fn split_returns_header_and_packet() {
        let packet = tcp_packet(&payload(3000));
        let hdr = tcp_gso(1400, 20, 20);
        let payload = with_header(&hdr, &packet);
        let (got, rest) = VnetHdr::split(&payload).unwrap();
        assert_eq!(got, hdr);
        assert_eq!(rest, &packet[..]);
    }

    #[test]
    fn split_rejects_a_short_payload() {
        let err = VnetHdr::split(&[0; 7]).unwrap_err();
        assert_eq!(err, GsoError::ShortPayload { len: 7 });
        assert_eq!(
            err.to_string(),
            "offload header: payload of 7 bytes is shorter than the 10-byte header"
        );
        // A bare header with an empty packet is fine.
        assert_eq!(VnetHdr::split(&[0; 10]).unwrap(), (VnetHdr::NONE, &[][..]));
    }

    #[test]
    fn split_rejects_unknown_flags() {
        let hdr = VnetHdr {
            flags: 4,
            ..VnetHdr::NONE
        };
        assert_eq!(
            split_err(&hdr, &[0; 40]),
            GsoError::UnknownFlags { flags: 4 }
        );
        let valid = VnetHdr {
            flags: VnetHdr::F_DATA_VALID,
            ..VnetHdr::NONE
        };
        assert!(valid.validate(&[0; 40]).is_ok());
    }

    #[test]
    fn split_rejects_an_unknown_gso_type() {
        let hdr = VnetHdr {
            gso_type: 3,
            ..tcp_gso(1400, 20, 20)
        };
        let err = split_err(&hdr, &tcp_packet(&payload(3000)));
        assert_eq!(err, GsoError::UnknownGsoType { gso_type: 3 });
        assert_eq!(err.to_string(), "offload header: unknown GSO type 0x3");
        // GSO_UDP (UFO, 3) is not ours either.
        for gso_type in [2, 6, 0x7f] {
            let hdr = VnetHdr {
                gso_type,
                ..VnetHdr::NONE
            };
            assert_eq!(
                hdr.validate(&[]),
                Err(GsoError::UnknownGsoType { gso_type })
            );
        }
    }

    #[test]
    fn ecn_is_allowed_only_with_tcp() {
        let udp = VnetHdr {
            gso_type: VnetHdr::GSO_UDP_L4 | VnetHdr::GSO_ECN,
            ..udp_gso(500)
        };
        let err = split_err(&udp, &udp_packet(&payload(1200)));
        assert_eq!(err, GsoError::EcnWithoutTcp { gso_type: 0x85 });
        assert_eq!(
            err.to_string(),
            "offload header: ECN bit in GSO type 0x85, allowed only with TCP"
        );
        let none = VnetHdr {
            gso_type: VnetHdr::GSO_ECN,
            ..VnetHdr::NONE
        };
        assert_eq!(
            none.validate(&[]),
            Err(GsoError::EcnWithoutTcp { gso_type: 0x80 })
        );
        let tcp = VnetHdr {
            gso_type: VnetHdr::GSO_TCPV4 | VnetHdr::GSO_ECN,
            ..tcp_gso(1400, 20, 20)
        };
        assert!(tcp.validate(&tcp_packet(&payload(3000))).is_ok());
    }

    #[test]
    fn split_rejects_a_checksum_beyond_the_packet() {
        let hdr = csum_only(1500, 16);
        let err = split_err(&hdr, &[0; 1400]);
        assert_eq!(
            err,
            GsoError::ChecksumBeyondPacket {
                start: 1500,
                offset: 16,
                len: 1400
            }
        );
        assert_eq!(
            err.to_string(),
            "offload header: checksum at 1500+16 lies beyond the 1400-byte packet"
        );
        // The last two bytes are still inside; one more is not.
        assert!(csum_only(20, 16).validate(&[0; 38]).is_ok());
        assert!(csum_only(20, 16).validate(&[0; 37]).is_err());
        // Offsets at u16::MAX do not overflow.
        assert!(csum_only(u16::MAX, u16::MAX).validate(&[0; 100]).is_err());
        // Without NEEDS_CSUM the offsets mean nothing.
        let ignored = VnetHdr {
            flags: 0,
            ..csum_only(u16::MAX, u16::MAX)
        };
        assert!(ignored.validate(&[0; 100]).is_ok());
    }

    #[test]
    fn split_rejects_a_header_length_beyond_the_packet() {
        let hdr = VnetHdr {
            hdr_len: 41,
            ..VnetHdr::NONE
        };
        let err = split_err(&hdr, &[0; 40]);
        assert_eq!(
            err,
            GsoError::HdrLenBeyondPacket {
                hdr_len: 41,
                len: 40
            }
        );
        assert_eq!(
            err.to_string(),
            "offload header: header length 41 exceeds the 40-byte packet"
        );
        // Not required to match the real headers: Linux recomputes it.
        let loose = VnetHdr {
            hdr_len: 10,
            ..tcp_gso(1400, 20, 20)
        };
        assert!(loose.validate(&tcp_packet(&payload(3000))).is_ok());
    }

    #[test]
    fn gso_requires_needs_csum() {
        let hdr = VnetHdr {
            flags: VnetHdr::F_DATA_VALID,
            ..tcp_gso(1400, 20, 20)
        };
        let err = split_err(&hdr, &tcp_packet(&payload(3000)));
        assert_eq!(err, GsoError::GsoWithoutChecksum { gso: "TCPv4" });
        assert_eq!(
            err.to_string(),
            "offload header: GSO type TCPv4 without the NEEDS_CSUM flag"
        );
    }

    #[test]
    fn gso_requires_a_sensible_size() {
        let err = split_err(&tcp_gso(0, 20, 20), &tcp_packet(&payload(3000)));
        assert_eq!(err, GsoError::GsoSizeTooSmall { size: 0 });
        assert_eq!(
            err.to_string(),
            "offload header: GSO size 0 is below the minimum of 64"
        );
        let err = split_err(&udp_gso(63), &udp_packet(&payload(3000)));
        assert_eq!(err, GsoError::GsoSizeTooSmall { size: 63 });
    }

    #[test]
    fn gso_requires_ipv4() {
        let mut packet = tcp_packet(&payload(3000));
        packet[0] = 0x65; // version 6
        let err = split_err(&tcp_gso(1400, 20, 20), &packet);
        assert_eq!(
            err,
            GsoError::NotGsoPacket {
                gso: "TCPv4",
                expected: "IPv4/TCP"
            }
        );
        assert_eq!(
            err.to_string(),
            "offload header: GSO type TCPv4 on a packet that is not IPv4/TCP"
        );
        // IHL below 5.
        let mut packet = tcp_packet(&payload(3000));
        packet[0] = 0x44;
        assert!(matches!(
            tcp_gso(1400, 20, 20).validate(&packet),
            Err(GsoError::NotGsoPacket { .. })
        ));
        // IHL past the end of a tiny packet (checksum bounds aside).
        let tiny = [
            0x4f, 0, 0, 22, 0, 0, 0, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let hdr = VnetHdr {
            hdr_len: 0,
            csum_start: 0,
            csum_offset: 0,
            ..tcp_gso(1400, 20, 20)
        };
        assert!(matches!(
            hdr.validate(&tiny),
            Err(GsoError::NotGsoPacket { .. })
        ));
    }

    #[test]
    fn gso_requires_the_matching_protocol() {
        // TCPv4 on a UDP packet (checksum placed as TCP would want it).
        let udp = udp_packet(&payload(3000));
        let err = tcp_gso(1400, 20, 20).validate(&udp).unwrap_err();
        assert_eq!(
            err,
            GsoError::NotGsoPacket {
                gso: "TCPv4",
                expected: "IPv4/TCP"
            }
        );
        // UDP_L4 on a TCP packet.
        let tcp = tcp_packet(&payload(3000));
        let err = udp_gso(1400).validate(&tcp).unwrap_err();
        assert_eq!(
            err,
            GsoError::NotGsoPacket {
                gso: "UDP_L4",
                expected: "IPv4/UDP"
            }
        );
    }

    #[test]
    fn gso_rejects_fragments() {
        let hdr = tcp_gso(1400, 20, 20);
        let mut more_fragments = tcp_packet(&payload(3000));
        more_fragments[6] = 0x20;
        let err = split_err(&hdr, &more_fragments);
        assert_eq!(err, GsoError::Fragment { gso: "TCPv4" });
        assert_eq!(
            err.to_string(),
            "offload header: GSO type TCPv4 on an IPv4 fragment"
        );
        let mut offset = tcp_packet(&payload(3000));
        offset[7] = 0x01;
        assert_eq!(
            split_err(&hdr, &offset),
            GsoError::Fragment { gso: "TCPv4" }
        );
    }

    #[test]
    fn gso_requires_total_length_to_match() {
        let mut packet = tcp_packet(&payload(3000));
        packet.push(0);
        let err = split_err(&tcp_gso(1400, 20, 20), &packet);
        assert_eq!(
            err,
            GsoError::TotalLengthMismatch {
                total_len: 3040,
                len: 3041
            }
        );
        assert_eq!(
            err.to_string(),
            "offload header: GSO packet's IPv4 total length 3040 differs from its 3041 bytes"
        );
    }

    #[test]
    fn gso_requires_the_checksum_in_the_transport_field() {
        let packet = tcp_packet(&payload(3000));
        let hdr = VnetHdr {
            csum_offset: 6,
            ..tcp_gso(1400, 20, 20)
        };
        let err = hdr.validate(&packet).unwrap_err();
        assert_eq!(
            err.to_string(),
            "offload header: GSO type TCPv4 needs the checksum at 20+16, not 20+6"
        );
        let hdr = VnetHdr {
            csum_start: 24,
            ..tcp_gso(1400, 20, 20)
        };
        assert!(matches!(
            hdr.validate(&packet),
            Err(GsoError::ChecksumMisplaced { .. })
        ));
        let udp = udp_packet(&payload(3000));
        let hdr = VnetHdr {
            csum_offset: 16,
            ..udp_gso(1400)
        };
        assert!(matches!(
            hdr.validate(&udp),
            Err(GsoError::ChecksumMisplaced { .. })
        ));
    }

    #[test]
    fn gso_requires_a_sane_tcp_header() {
        let hdr = tcp_gso(1400, 20, 20);
        let mut short = tcp_packet(&payload(3000));
        short[32] = 0x40; // data offset 4
        assert_eq!(
            hdr.validate(&short),
            Err(GsoError::BadTcpHeader {
                data_offset: 4,
                available: 3020
            })
        );
        // Data offset 15 (60 bytes) in a packet with 2 payload bytes.
        let mut long = tcp_packet(&[1, 2]);
        long[32] = 0xf0;
        let err = hdr.validate(&long).unwrap_err();
        assert_eq!(
            err.to_string(),
            "offload header: TCP data offset 15 does not fit the 22 bytes after the IP header"
        );
    }

    #[test]
    fn non_gso_packets_need_not_be_ipv4() {
        let ipv6ish = [0x60; 64];
        assert!(VnetHdr::NONE.validate(&ipv6ish).is_ok());
        assert!(csum_only(40, 16).validate(&ipv6ish).is_ok());
        assert!(VnetHdr::NONE.validate(&[]).is_ok());
    }

    // --- Checksum completion ------------------------------------------

    #[test]
    fn none_without_needs_csum_emits_the_packet_unchanged() {
        let packet = [0x60; 77];
        assert_eq!(run(&VnetHdr::NONE, &packet), vec![packet.to_vec()]);
    }

    #[test]
    fn needs_csum_completes_a_tcp_checksum() {
        let packet = tcp_packet(&payload(1001));
        assert!(!l4_checksum_ok(&packet));
        let out = run(&csum_only(20, 16), &packet);
        assert_eq!(out.len(), 1);
        assert!(l4_checksum_ok(&out[0]));
        // Only the checksum field changed.
        assert_eq!(out[0][..36], packet[..36]);
        assert_eq!(out[0][38..], packet[38..]);
    }

    #[test]
    fn needs_csum_completes_a_udp_checksum() {
        let packet = udp_packet(&payload(333));
        let out = run(&csum_only(20, 6), &packet);
        assert_eq!(out.len(), 1);
        assert!(l4_checksum_ok(&out[0]));
        assert_eq!(out[0][..26], packet[..26]);
        assert_eq!(out[0][28..], packet[28..]);
    }

    /// A UDP payload whose last two bytes make the sum 0xffff, so that the
    /// checksum computes to 0 and must be sent as 0xffff.
    fn udp_summing_to_zero_checksum() -> Vec<u8> {
        let mut packet = udp_packet(&[0x12, 0x34, 0, 0]);
        let ihl = 20;
        let mut all = pseudo_header(PROTO_UDP, packet.len() - ihl);
        let field = all.len() + 6;
        all.extend_from_slice(&packet[ihl..]);
        all[field..field + 2].copy_from_slice(&[0, 0]); // drop the partial value
        let sum = ones_sum(&all);
        let n = packet.len();
        packet[n - 2..].copy_from_slice(&(!sum).to_be_bytes());
        packet
    }

    #[test]
    fn a_zero_udp_checksum_is_sent_as_ffff() {
        let packet = udp_summing_to_zero_checksum();
        let out = run(&csum_only(20, 6), &packet);
        assert_eq!(u16_at(&out[0], 26), 0xffff);
        assert!(l4_checksum_ok(&out[0]));
        let out = run(&udp_gso(100), &packet);
        assert_eq!(out.len(), 1);
        assert_eq!(u16_at(&out[0], 26), 0xffff);
    }

    // --- TCP segmentation ---------------------------------------------

    #[test]
    fn tcp_super_packet_splits_into_segments() {
        let data = payload(3 * 1000 + 500);
        let tcp = Tcp {
            seq: 5000,
            flags: ACK | PSH | FIN | CWR,
            ..Tcp::default()
        };
        let packet = tcp.packet(&data);
        let hdr = VnetHdr {
            gso_type: VnetHdr::GSO_TCPV4 | VnetHdr::GSO_ECN,
            ..tcp_gso(1000, 20, 20)
        };
        let out = run(&hdr, &packet);
        assert_eq!(out.len(), 4);
        let mut joined = Vec::new();
        for (i, seg) in out.iter().enumerate() {
            let len = if i == 3 { 500 } else { 1000 };
            assert_eq!(seg.len(), 40 + len);
            assert_eq!(u16_at(seg, 2) as usize, seg.len());
            assert_eq!(u16_at(seg, 4), 0x1234 + i as u16);
            assert!(ip_checksum_ok(seg), "IP checksum of segment {i}");
            assert!(l4_checksum_ok(seg), "TCP checksum of segment {i}");
            assert_eq!(u32_at(seg, 24), 5000 + 1000 * i as u32);
            let flags = seg[33];
            assert_eq!(flags & (FIN | PSH) != 0, i == 3, "FIN/PSH on segment {i}");
            assert_eq!(flags & (FIN | PSH), if i == 3 { FIN | PSH } else { 0 });
            assert_eq!(flags & CWR != 0, i == 0, "CWR on segment {i}");
            assert_ne!(flags & ACK, 0);
            // Unchanged header fields: addresses, ports, ack, window.
            assert_eq!(seg[8..10], packet[8..10]);
            assert_eq!(seg[12..24], packet[12..24]);
            assert_eq!(seg[28..33], packet[28..33]);
            assert_eq!(seg[34..36], packet[34..36]);
            joined.extend_from_slice(&seg[40..]);
        }
        assert_eq!(joined, data);
    }

    #[test]
    fn tcp_payload_of_exactly_gso_size_is_one_segment() {
        let data = payload(1448);
        let packet = Tcp {
            flags: ACK | PSH,
            ..Tcp::default()
        }
        .packet(&data);
        let out = run(&tcp_gso(1448, 20, 20), &packet);
        assert_eq!(out.len(), 1);
        assert!(ip_checksum_ok(&out[0]));
        assert!(l4_checksum_ok(&out[0]));
        assert_eq!(out[0][33], ACK | PSH);
        // The same bytes checksum completion alone would give.
        assert_eq!(out, run(&csum_only(20, 16), &packet));
    }

    #[test]
    fn tcp_header_without_payload_is_one_segment() {
        let packet = Tcp {
            flags: ACK | FIN,
            ..Tcp::default()
        }
        .packet(&[]);
        let out = run(&tcp_gso(1448, 20, 20), &packet);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), 40);
        assert!(l4_checksum_ok(&out[0]));
        assert_eq!(out[0][33], ACK | FIN);
    }

    #[test]
    fn tcp_and_ip_options_are_copied_to_every_segment() {
        let ip_options = [0x94, 4, 0, 0]; // router alert
        let data = payload(2500);
        let packet = Tcp {
            ip_options: &ip_options,
            tcp_options: &TS_OPTION,
            ..Tcp::default()
        }
        .packet(&data);
        let (ihl, thl) = (24, 32);
        let out = run(&tcp_gso(1000, ihl as u16, thl as u16), &packet);
        assert_eq!(out.len(), 3);
        let mut joined = Vec::new();
        for seg in &out {
            assert_eq!(seg[0], 0x46);
            assert_eq!(seg[20..24], ip_options);
            assert_eq!(seg[ihl + 12] >> 4, 8);
            assert_eq!(seg[ihl + 20..ihl + thl], TS_OPTION);
            assert!(ip_checksum_ok(seg));
            assert!(l4_checksum_ok(seg));
            assert_eq!(u16_at(seg, 2) as usize, seg.len());
            joined.extend_from_slice(&seg[ihl + thl..]);
        }
        assert_eq!(out[2].len(), ihl + thl + 500);
        assert_eq!(joined, data);
    }

    #[test]
    fn tcp_sequence_numbers_and_ip_ids_wrap() {
        let packet = Tcp {
            seq: u32::MAX - 1499,
            id: 0xfffe,
            ..Tcp::default()
        }
        .packet(&payload(4000));
        let out = run(&tcp_gso(1000, 20, 20), &packet);
        let seqs: Vec<u32> = out.iter().map(|s| u32_at(s, 24)).collect();
        assert_eq!(seqs, [u32::MAX - 1499, u32::MAX - 499, 500, 1500]);
        let ids: Vec<u16> = out.iter().map(|s| u16_at(s, 4)).collect();
        assert_eq!(ids, [0xfffe, 0xffff, 0, 1]);
        assert!(out.iter().all(|s| ip_checksum_ok(s) && l4_checksum_ok(s)));
    }

    #[test]
    fn the_partial_checksum_in_the_input_is_ignored() {
        let mut packet = tcp_packet(&payload(2000));
        packet[36..38].copy_from_slice(&[0xde, 0xad]);
        let out = run(&tcp_gso(1000, 20, 20), &packet);
        assert!(out.iter().all(|s| l4_checksum_ok(s)));
    }

    // --- UDP segmentation ---------------------------------------------

    #[test]
    fn udp_super_packet_splits_into_datagrams() {
        let data = payload(3 * 1200 + 7);
        let packet = udp_packet(&data);
        let out = run(&udp_gso(1200), &packet);
        assert_eq!(out.len(), 4);
        let mut joined = Vec::new();
        for (i, seg) in out.iter().enumerate() {
            let len = if i == 3 { 7 } else { 1200 };
            assert_eq!(seg.len(), 28 + len);
            assert_eq!(u16_at(seg, 2) as usize, seg.len());
            assert_eq!(u16_at(seg, 4), 0x0100 + i as u16);
            assert_eq!(u16_at(seg, 24) as usize, 8 + len);
            assert_eq!(seg[20..24], packet[20..24]); // ports
            assert!(ip_checksum_ok(seg), "IP checksum of datagram {i}");
            assert!(l4_checksum_ok(seg), "UDP checksum of datagram {i}");
            assert_ne!(u16_at(seg, 26), 0);
            joined.extend_from_slice(&seg[28..]);
        }
        assert_eq!(joined, data);
    }

    // --- The segment() contract ---------------------------------------

    #[test]
    fn segment_rejects_an_invalid_header_without_emitting() {
        let packet = tcp_packet(&payload(3000));
        let mut emitted = 0;
        let result = segment(&tcp_gso(0, 20, 20), &packet, &mut Vec::new(), |_| {
            emitted += 1
        });
        assert_eq!(result, Err(GsoError::GsoSizeTooSmall { size: 0 }));
        assert_eq!(emitted, 0);
    }

    #[test]
    fn segments_are_built_in_the_reused_scratch_buffer() {
        let packet = tcp_packet(&payload(60_000));
        let mut scratch = Vec::with_capacity(2000);
        let buffer = scratch.as_ptr();
        let mut pointers = Vec::new();
        let n = segment(&tcp_gso(1448, 20, 20), &packet, &mut scratch, |seg| {
            pointers.push(seg.as_ptr())
        })
        .unwrap();
        assert_eq!(n, 60_000usize.div_ceil(1448));
        assert!(pointers.iter().all(|&p| p == buffer));
    }

    // --- sanitize: a peer's header reduced to its one meaning -----------

    const MTU: usize = 1400;

    fn sanitized(hdr: &VnetHdr, packet: &[u8]) -> Result<(VnetHdr, Vec<u8>), GsoError> {
        let mut packet = packet.to_vec();
        hdr.sanitize(&mut packet, MTU).map(|hdr| (hdr, packet))
    }

    #[test]
    fn sanitize_keeps_a_checksum_offload_in_the_transport_field() {
        let packet = tcp_packet(b"hello");
        let (hdr, out) = sanitized(&csum_only(20, 16), &packet).unwrap();
        assert_eq!(out, packet, "nothing to do in user space");
        assert_eq!(hdr.flags, VnetHdr::F_NEEDS_CSUM);
        assert_eq!((hdr.csum_start, hdr.csum_offset), (20, 16));
        assert_eq!(hdr.gso_type, VnetHdr::GSO_NONE);
        assert_eq!(hdr.hdr_len, 40);
        let udp = udp_packet(b"hello");
        let (hdr, _) = sanitized(&csum_only(20, 6), &udp).unwrap();
        assert_eq!((hdr.csum_start, hdr.csum_offset), (20, 6));
    }

    #[test]
    fn sanitize_completes_a_checksum_aimed_anywhere_else_before_any_check() {
        // The attack: the checksum "field" on the source port (20+0), the
        // destination port (20+2) or the addresses (0+12, 0+16), to be
        // written by the kernel after the gateway translated the packet.
        let packet = udp_packet(b"payload!");
        for (start, offset) in [(20, 0), (20, 2), (0, 12), (0, 16), (24, 0), (21, 5)] {
            let (hdr, out) = sanitized(&csum_only(start, offset), &packet).unwrap();
            assert_eq!(hdr, VnetHdr::NONE, "{start}+{offset}: no offload left");
            // What the kernel would have done, done now: the gateway's checks
            // see the final bytes.
            let mut expected = packet.clone();
            let at = usize::from(start + offset);
            let sum = ones_sum(&packet[usize::from(start)..]);
            let mut want = !sum;
            if offset == 6 && want == 0 {
                want = 0xffff;
            }
            expected[at..at + 2].copy_from_slice(&want.to_be_bytes());
            assert_eq!(out, expected, "{start}+{offset}");
        }
    }

    #[test]
    fn sanitize_completes_the_checksum_of_protocols_it_does_not_offload() {
        // ICMP, or a fragment: the kernel must not be asked to finish them.
        let mut icmp = ipv4(1, 7, &[], &[8, 0, 0, 0, 0, 1, 0, 1, b'x', b'y']);
        let sum = ones_sum(&icmp[20..]);
        let (hdr, out) = sanitized(&csum_only(20, 2), &icmp).unwrap();
        assert_eq!(hdr, VnetHdr::NONE);
        icmp[22..24].copy_from_slice(&(!sum).to_be_bytes());
        assert_eq!(out, icmp);
        let mut fragment = udp_packet(b"first part");
        fragment[6] |= 0x20; // MF
        let (hdr, _) = sanitized(&csum_only(20, 6), &fragment).unwrap();
        assert_eq!(hdr, VnetHdr::NONE);
    }

    #[test]
    fn sanitize_drops_data_valid_and_plain_headers_mean_nothing() {
        let packet = tcp_packet(b"x");
        let valid = VnetHdr {
            flags: VnetHdr::F_DATA_VALID,
            ..VnetHdr::NONE
        };
        assert_eq!(
            sanitized(&valid, &packet).unwrap(),
            (VnetHdr::NONE, packet.clone())
        );
        let junk = VnetHdr {
            hdr_len: 7,
            csum_start: 3,
            csum_offset: 999,
            ..VnetHdr::NONE
        };
        assert_eq!(sanitized(&junk, &packet).unwrap(), (VnetHdr::NONE, packet));
    }

    #[test]
    fn sanitize_rebuilds_a_gso_header_from_the_packet() {
        let packet = tcp_packet(&payload(3000));
        let peer = VnetHdr {
            hdr_len: 0,
            flags: VnetHdr::F_NEEDS_CSUM | VnetHdr::F_DATA_VALID,
            ..tcp_gso(1360, 20, 20)
        };
        let (hdr, out) = sanitized(&peer, &packet).unwrap();
        assert_eq!(out, packet);
        assert_eq!(hdr, tcp_gso(1360, 20, 20));
        let ecn = VnetHdr {
            gso_type: VnetHdr::GSO_TCPV4 | VnetHdr::GSO_ECN,
            ..tcp_gso(1000, 20, 20)
        };
        assert_eq!(sanitized(&ecn, &packet).unwrap().0, ecn);
        let udp = udp_packet(&payload(3000));
        assert_eq!(sanitized(&udp_gso(1372), &udp).unwrap().0, udp_gso(1372));
    }

    #[test]
    fn sanitize_refuses_segments_that_do_not_fit_the_mtu_or_are_tiny() {
        let packet = tcp_packet(&payload(3000));
        assert_eq!(
            sanitized(&tcp_gso(1361, 20, 20), &packet),
            Err(GsoError::GsoSizeTooLarge {
                size: 1361,
                max: 1360
            })
        );
        assert_eq!(
            sanitized(&tcp_gso(63, 20, 20), &packet),
            Err(GsoError::GsoSizeTooSmall { size: 63 })
        );
        let udp = udp_packet(&payload(3000));
        assert!(matches!(
            sanitized(&udp_gso(1373), &udp),
            Err(GsoError::GsoSizeTooLarge { .. })
        ));
        // The same 3,000 bytes as one packet, plain or checksum-only: over
        // the MTU, refused; at the MTU, let through.
        for hdr in [VnetHdr::NONE, csum_only(20, 16)] {
            assert_eq!(
                sanitized(&hdr, &packet),
                Err(GsoError::PacketTooLong {
                    len: 3040,
                    max: MTU
                })
            );
        }
        let full = tcp_packet(&payload(MTU - 40));
        assert!(sanitized(&csum_only(20, 16), &full).is_ok());
    }

    #[test]
    fn sanitize_refuses_a_gso_header_with_a_misplaced_checksum() {
        let packet = tcp_packet(&payload(3000));
        let misplaced = VnetHdr {
            csum_offset: 0,
            ..tcp_gso(1000, 20, 20)
        };
        assert!(matches!(
            sanitized(&misplaced, &packet),
            Err(GsoError::ChecksumMisplaced { .. })
        ));
    }
}
