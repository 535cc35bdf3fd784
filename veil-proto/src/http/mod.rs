//! The HTTP/1.1 upgrade that opens a tunnel (RFC 9484 §3.2-3.3).
//!
//! The client sends one `GET` with `Connection: Upgrade`, `Upgrade:
//! connect-ip` and `Capsule-Protocol: ?1`; the gateway answers `101
//! Switching Protocols` and from the byte after the response's blank line
//! both directions carry capsules. Anything other than a 101 is a refusal,
//! sent with a short plain-text body and `Connection: close`.
//!
//! Nothing else of HTTP is spoken, so nothing else is parsed: no bodies on
//! requests, no chunked encoding, no keep-alive.
use std::time::Duration;

mod head;
mod request;
mod response;

pub use head::MAX_HEADER_LEN;
pub use request::{parse_keepalive, parse_request, Request};
pub use response::{parse_response, Response, MAX_INTERIM_RESPONSES};

use crate::ProtoError;

/// The default URI template of RFC 9484 §2, expanded with the `target` and
/// `ipproto` wildcards: any destination, any protocol.
pub const WELL_KNOWN_PATH: &str = "/.well-known/masque/ip/*/*/";

/// The upgrade request for `host` (the gateway's name, with `:port` if not
/// 443) and `path` (usually [`WELL_KNOWN_PATH`]).
///
/// Both are copied verbatim; check them first with [`validate_target`]
/// (which [`crate::session::ClientSession::new`] does).
///
/// `keepalive` is the client's PING interval, announced in `Veil-Keepalive`
/// (whole seconds, at least 1) so the gateway waits twice as long before it
/// declares the client dead. Other peers ignore the header.
///
/// `offload` announces `Veil-Offload: ?1`: the client reads and writes
/// offload datagrams ([`crate::capsule::OFFLOAD_CONTEXT`]); the gateway
/// uses them only if its 101 says so too.
pub fn request(host: &str, path: &str, keepalive: Duration, offload: bool) -> Vec<u8> {
    let secs = keepalive_secs(keepalive);
    let offload = if offload {
        format!("{OFFLOAD_HEADER}: ?1\r\n")
    } else {
        String::new()
    };
    format!(
        "GET {path} HTTP/1.1\r\n\
         Host: {host}\r\n\
         Connection: Upgrade\r\n\
         Upgrade: connect-ip\r\n\
         Capsule-Protocol: ?1\r\n\
         {KEEPALIVE_HEADER}: {secs}\r\n\
         {offload}\
         \r\n"
    )
    .into_bytes()
}

/// The header both ends announce offload datagrams with (a structured
/// boolean, like `Capsule-Protocol`). Other peers ignore it and never see
/// an offload datagram.
pub const OFFLOAD_HEADER: &str = "Veil-Offload";

/// Reads `Veil-Offload`: absent or `?0` is false, `?1` true.
fn offload_header(head: &head::Head<'_>) -> Result<bool, ProtoError> {
    match head.single(OFFLOAD_HEADER)? {
        None | Some(b"?0") => Ok(false),
        Some(b"?1") => Ok(true),
        Some(found) => Err(ProtoError::BadHeaderValue {
            name: OFFLOAD_HEADER,
            found: crate::error::printable(found),
            expected: "?1 or ?0",
        }),
    }
}

/// The header a veil client announces its keepalive interval in.
pub const KEEPALIVE_HEADER: &str = "Veil-Keepalive";
/// The longest keepalive interval a gateway honours.
pub const MAX_KEEPALIVE: Duration = Duration::from_secs(3600);

/// The keepalive interval as announced: whole seconds, rounded up, 1 to
/// [`MAX_KEEPALIVE`].
pub fn keepalive_secs(d: Duration) -> u64 {
    d.as_secs()
        .saturating_add(u64::from(d.subsec_nanos() > 0))
        .clamp(1, MAX_KEEPALIVE.as_secs())
}

/// Checks that `host` and `path` can go into [`request`] unchanged: non-empty
/// visible ASCII, and a path starting with `/`. Anything else could break
/// the request line or inject headers.
pub fn validate_target(host: &str, path: &str) -> Result<(), ProtoError> {
    if !head::is_visible(host.as_bytes()) {
        return Err(ProtoError::InvalidRequestTarget {
            what: "host",
            value: host.escape_default().to_string(),
        });
    }
    if !path.starts_with('/') || !head::is_visible(path.as_bytes()) {
        return Err(ProtoError::InvalidRequestTarget {
            what: "path",
            value: path.escape_default().to_string(),
        });
    }
    Ok(())
}

/// The gateway's answer to a valid upgrade request; `offload` confirms
/// `Veil-Offload` to a client that announced it.
pub fn switching_protocols(offload: bool) -> Vec<u8> {
    let mut response = b"HTTP/1.1 101 Switching Protocols\r\n\
      Connection: Upgrade\r\n\
      Upgrade: connect-ip\r\n\
      Capsule-Protocol: ?1\r\n"
        .to_vec();
    if offload {
        response.extend_from_slice(format!("{OFFLOAD_HEADER}: ?1\r\n").as_bytes());
    }
    response.extend_from_slice(b"\r\n");
    response
}

/// A complete refusal, sent instead of the 101: `status` and `reason` on the
/// status line, `message` as a one-line plain-text body the client shows its
/// operator, and `Connection: close` since the connection ends with it.
///
/// Control characters in `reason` are replaced so it stays one line; a
/// `status` outside 100-599 becomes 500.
pub fn refusal(status: u16, reason: &str, message: &str) -> Vec<u8> {
    let status = if (100..=599).contains(&status) {
        status
    } else {
        500
    };
    let reason: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let body = format!("{message}\n");
    format!(
        "HTTP/1.1 {status} {reason}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n\
         \r\n\
         {body}",
        body.len()
    )
    .into_bytes()
}

/// The standard reason phrase for the statuses a gateway refuses with.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        421 => "Misdirected Request",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}
