//! Everything that can go wrong on the wire, as structured variants.
//!
//! Each message is written to be read in a log line without context: it says
//! which field or header was wrong and what was expected instead. The same
//! text goes into the body of the `400 Bad Request` the gateway answers a
//! malformed upgrade request with, so a client operator sees it too.

use std::net::IpAddr;

use crate::capsule::IpAddressRange;

/// A protocol violation, by either peer or by a local caller asking to encode
/// something the peer would have to reject.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    // --- Variable-length integers -------------------------------------
    /// A value too large for a QUIC variable-length integer.
    #[error("{value} does not fit in a variable-length integer (maximum 2^62-1)")]
    VarintTooLarge { value: u64 },

    // --- Capsule framing ----------------------------------------------
    /// A known capsule larger than the decoder's limit, reported as soon as
    /// its header is read so that its body is never buffered.
    #[error("capsule of {len} bytes exceeds the {max}-byte limit")]
    CapsuleTooLarge { len: u64, max: usize },
    /// An unknown capsule larger than the skip limit.
    #[error(
        "unknown capsule type {capsule_type:#x} of {len} bytes exceeds the {max}-byte skip limit"
    )]
    UnknownCapsuleTooLarge {
        capsule_type: u64,
        len: u64,
        max: u64,
    },
    /// A capsule's value ended before one of its fields did.
    #[error("{capsule} capsule ends inside its {field} field")]
    Truncated {
        capsule: &'static str,
        field: &'static str,
    },
    /// A capsule's value went on after its last field.
    #[error("{capsule} capsule has {extra} unexpected trailing bytes")]
    TrailingBytes { capsule: &'static str, extra: usize },
    /// `Capsule::Unknown` only records what was skipped; it has no body.
    #[error(
        "cannot encode an unknown capsule (type {capsule_type:#x}): its body was skipped, not kept"
    )]
    EncodeUnknown { capsule_type: u64 },

    // --- Addresses and routes (RFC 9484 §4.7) -------------------------
    /// An IP Version field that is neither 4 nor 6.
    #[error("{capsule} capsule has IP version {version}, expected 4 or 6")]
    BadIpVersion { capsule: &'static str, version: u8 },
    /// A prefix length longer than the address.
    #[error("prefix length {prefix_len} is longer than the {max} bits of {ip}")]
    PrefixTooLong { ip: IpAddr, prefix_len: u8, max: u8 },
    /// An address with bits set past its prefix length.
    #[error("{ip}/{prefix_len} has bits set after the prefix")]
    HostBitsSet { ip: IpAddr, prefix_len: u8 },
    /// ADDRESS_REQUEST request IDs must be non-zero (zero marks unsolicited
    /// assignments).
    #[error("ADDRESS_REQUEST uses request ID 0, which is reserved for unsolicited assignments")]
    ZeroRequestId,
    /// ADDRESS_REQUEST must request at least one address.
    #[error("ADDRESS_REQUEST contains no requested address")]
    EmptyAddressRequest,
    /// A range whose start and end are of different IP versions.
    #[error("route range {start}-{end} mixes IPv4 and IPv6")]
    RangeFamilyMismatch { start: IpAddr, end: IpAddr },
    /// A range whose start is after its end.
    #[error("route range {start}-{end} starts after it ends")]
    RangeInverted { start: IpAddr, end: IpAddr },
    /// Ranges not sorted by IP version, then protocol, then address.
    #[error("route {range} comes after {previous}: ranges must be sorted by IP version, then protocol, then address")]
    RoutesUnordered {
        previous: IpAddressRange,
        range: IpAddressRange,
    },
    /// Two ranges that cover a common address for a common protocol.
    #[error("route {range} overlaps {other}")]
    RoutesOverlap {
        other: IpAddressRange,
        range: IpAddressRange,
    },
    /// A gateway configured to hand out an address no host can have.
    #[error("cannot assign {addr} to a client")]
    UnassignableAddress { addr: std::net::IpAddr },
    /// The gateway's ADDRESS_ASSIGN leaves the client without an address.
    #[error("the gateway's ADDRESS_ASSIGN contains no IPv4 address")]
    NoIpv4Assigned,

    // --- DNS configuration (draft-ietf-masque-connect-ip-dns) ---------
    /// A domain name that is not presentation-format A-labels.
    #[error("\"{name}\" is not a valid domain name (letters, digits, '-', '_' in dot-separated labels of 1-63, 253 in all)")]
    InvalidDomainName { name: String },
    /// A nameserver entry the draft rules out.
    #[error("DNS_ASSIGN nameserver: {reason}")]
    BadNameserver { reason: &'static str },

    // --- HTTP/1.1 upgrade (RFC 9484 §3) --------------------------------
    /// The header block did not end within the limit.
    #[error("{what} header too large (more than {limit} bytes)")]
    HeaderTooLarge { what: &'static str, limit: usize },
    /// The first byte of a TLS handshake record where HTTP was expected:
    /// usually TLS applied twice, or a client pointed at the wrong port.
    #[error("received a TLS handshake record instead of an HTTP request (TLS applied twice?)")]
    TlsInsteadOfHttp,
    /// A request line that is not `METHOD SP target SP version`.
    #[error("malformed request line \"{line}\"")]
    MalformedRequestLine { line: String },
    /// CONNECT-IP over HTTP/1.1 is a GET with an Upgrade.
    #[error("method \"{method}\" is not allowed: CONNECT-IP over HTTP/1.1 uses GET")]
    MethodNotGet { method: String },
    /// Only HTTP/1.1 has the Upgrade mechanism this protocol uses.
    #[error("HTTP version \"{version}\" is not supported: expected HTTP/1.1")]
    HttpVersion { version: String },
    /// A header line that is not `name: value`, or uses obsolete folding.
    #[error("malformed header line \"{line}\"")]
    MalformedHeaderLine { line: String },
    /// A required header is absent.
    #[error("missing {name} header (expected \"{name}: {expected}\")")]
    MissingHeader {
        name: &'static str,
        expected: &'static str,
    },
    /// A header that must appear once appears more than once.
    #[error("duplicate {name} header")]
    DuplicateHeader { name: &'static str },

    // --- HTTP/3 ---------------------------------------------------------
    /// An HTTP/3 frame that may not appear where it did, or is malformed.
    #[error("HTTP/3 frame of type {frame_type:#x} {problem}")]
    H3Frame {
        frame_type: u64,
        problem: &'static str,
    },
    /// A QPACK field section veil cannot or may not decode.
    #[error("QPACK field section {problem}")]
    Qpack { problem: &'static str },
    /// A header with the wrong value.
    #[error("{name} header is \"{found}\", expected {expected}")]
    BadHeaderValue {
        name: &'static str,
        found: String,
        expected: &'static str,
    },
    /// The upgrade request announced a body; the bytes after the request
    /// belong to the capsule stream, so it must not have one.
    #[error("the upgrade request must not carry a body (it has a {header} header)")]
    UnexpectedBody { header: &'static str },
    /// A host or path that cannot be put in a request line or Host header.
    #[error("invalid {what} \"{value}\" for the upgrade request: it must be non-empty visible ASCII without spaces")]
    InvalidRequestTarget { what: &'static str, value: String },
    /// More interim (1xx) responses than a gateway has any reason to send
    /// before its answer: a broken or hostile gateway would otherwise keep
    /// the client reading (and buffering) them for ever.
    #[error(
        "more than {limit} interim (1xx) responses before the gateway's answer to the upgrade"
    )]
    TooManyInterimResponses { limit: usize },
    /// A status line that is not `HTTP/1.x SP 3DIGIT [SP reason]`.
    #[error("malformed status line \"{line}\"")]
    MalformedStatusLine { line: String },
    /// The gateway answered the upgrade with something other than 101.
    #[error("gateway refused: {}", describe_refusal(*.status, .reason, .message))]
    Refused {
        status: u16,
        reason: String,
        /// The start of the response body, cleaned up for a log line.
        message: Option<String>,
    },
}

/// A short, printable rendering of peer bytes for an error message: at most
/// 64 bytes, with anything non-printable escaped, so junk cannot forge log
/// lines or flood them.
pub(crate) fn printable(bytes: &[u8]) -> String {
    const MAX: usize = 64;
    let shown = &bytes[..bytes.len().min(MAX)];
    let mut s = shown.escape_ascii().to_string();
    if bytes.len() > MAX {
        s.push_str("...");
    }
    s
}

/// "503 Service Unavailable (gateway full)", leaving out what is empty.
fn describe_refusal(status: u16, reason: &str, message: &Option<String>) -> String {
    let mut s = status.to_string();
    if !reason.is_empty() {
        s.push(' ');
        s.push_str(reason);
    }
    if let Some(message) = message {
        s.push_str(&format!(" ({message})"));
    }
    s
}
