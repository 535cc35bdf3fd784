//! Gateway side: reading the client's upgrade request.

use std::time::Duration;

use super::head::{self, Head, MAX_HEADER_LEN};
use crate::{error::printable, ProtoError};

/// A valid CONNECT-IP upgrade request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The Host header: the gateway name the client dialled.
    pub host: String,
    /// The request target as sent (origin form like
    /// [`super::WELL_KNOWN_PATH`], or absolute form). Only logged: veil's
    /// gateway is full-tunnel and ignores the `target`/`ipproto` scope.
    pub target: String,
    /// The client's PING interval, from `Veil-Keepalive`, if it sent one.
    pub keepalive: Option<Duration>,
    /// The client announced `Veil-Offload: ?1`.
    pub offload: bool,
}

/// Reads the upgrade request at the front of `buf`.
///
/// `Ok(None)`: the header block is incomplete, call again with more bytes.
/// `Ok(Some((request, n)))`: the request used the first `n` bytes; anything
/// after them is already the client's capsule stream.
///
/// Junk is rejected as early as it can be recognised, without waiting for a
/// blank line that may never come: a TLS record, or a first byte that
/// cannot start a method, fails on the first byte; a bad request line fails
/// as soon as its line end arrives. Header blocks over [`MAX_HEADER_LEN`]
/// fail with "request header too large".
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, ProtoError> {
    reject_early(buf)?;
    let window = &buf[..buf.len().min(MAX_HEADER_LEN)];
    let Some(len) = head::find_end(window) else {
        if buf.len() >= MAX_HEADER_LEN {
            return Err(ProtoError::HeaderTooLarge {
                what: "request",
                limit: MAX_HEADER_LEN,
            });
        }
        return Ok(None);
    };
    let head = Head::parse(&buf[..len])?;
    let target = request_line(head.start_line)?;
    let host = match head.single("Host")? {
        None => {
            return Err(ProtoError::MissingHeader {
                name: "Host",
                expected: "the gateway's host name",
            })
        }
        Some(host) if head::is_visible(host) => host,
        Some(found) => {
            return Err(ProtoError::BadHeaderValue {
                name: "Host",
                found: printable(found),
                expected: "a host name",
            })
        }
    };
    head.check_upgrade_headers()?;
    // The bytes after the blank line are capsules; a request body would be
    // parsed as capsules (or smuggle data past us), so none is allowed.
    if head.all("Transfer-Encoding").next().is_some() {
        return Err(ProtoError::UnexpectedBody {
            header: "Transfer-Encoding",
        });
    }
    if head.all("Content-Length").any(|v| v != b"0") {
        return Err(ProtoError::UnexpectedBody {
            header: "Content-Length",
        });
    }
    let keepalive = match head.single(super::KEEPALIVE_HEADER)? {
        None => None,
        Some(v) => Some(parse_keepalive(v)?),
    };
    let request = Request {
        host: String::from_utf8_lossy(host).into_owned(),
        target: String::from_utf8_lossy(target).into_owned(),
        keepalive,
        offload: super::offload_header(&head)?,
    };
    Ok(Some((request, len)))
}

/// A `Veil-Keepalive` value: whole seconds from 1 to [`super::MAX_KEEPALIVE`].
pub fn parse_keepalive(v: &[u8]) -> Result<Duration, ProtoError> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| (1..=super::MAX_KEEPALIVE.as_secs()).contains(s))
        .map(Duration::from_secs)
        .ok_or_else(|| ProtoError::BadHeaderValue {
            name: super::KEEPALIVE_HEADER,
            found: printable(v),
            expected: "whole seconds from 1 to 3600",
        })
}

/// Fails fast on input that cannot become a valid request, whatever
/// follows: a TLS handshake record, a method with a non-token byte, or a
/// complete but invalid request line.
fn reject_early(buf: &[u8]) -> Result<(), ProtoError> {
    if buf.first() == Some(&0x16) {
        return Err(ProtoError::TlsInsteadOfHttp);
    }
    if let Some(line) = head::first_line(buf) {
        return request_line(line).map(|_| ());
    }
    let method = buf.split(|&b| b == b' ').next().unwrap_or_default();
    if !method.iter().all(|&b| head::is_tchar(b)) {
        return Err(ProtoError::MalformedRequestLine {
            line: printable(buf),
        });
    }
    Ok(())
}

/// `GET SP request-target SP HTTP/1.1`; returns the target.
fn request_line(line: &[u8]) -> Result<&[u8], ProtoError> {
    let malformed = || ProtoError::MalformedRequestLine {
        line: printable(line),
    };
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    if method.is_empty() || !method.iter().all(|&b| head::is_tchar(b)) {
        return Err(malformed());
    }
    if !head::is_visible(target) {
        return Err(malformed());
    }
    if method != b"GET" {
        return Err(ProtoError::MethodNotGet {
            method: printable(method),
        });
    }
    if version != b"HTTP/1.1" {
        return Err(ProtoError::HttpVersion {
            version: printable(version),
        });
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{request, WELL_KNOWN_PATH};

    fn parse(text: &str) -> Result<Option<(Request, usize)>, ProtoError> {
        parse_request(text.as_bytes())
    }

    fn err(text: &str) -> ProtoError {
        parse(text).expect_err(text)
    }

    #[test]
    fn accepts_our_request_and_reports_its_length() {
        let mut bytes = request(
            "gateway.example",
            WELL_KNOWN_PATH,
            Duration::from_secs(15),
            false,
        );
        let len = bytes.len();
        bytes.extend_from_slice(b"\x00\x05\x00capsules");
        let (req, used) = parse_request(&bytes).expect("valid").expect("complete");
        assert_eq!(used, len);
        assert_eq!(req.host, "gateway.example");
        assert_eq!(req.target, WELL_KNOWN_PATH);
    }

    #[test]
    fn every_prefix_is_incomplete_not_wrong() {
        let bytes = request(
            "gateway.example",
            WELL_KNOWN_PATH,
            Duration::from_secs(15),
            false,
        );
        for cut in 0..bytes.len() {
            assert_eq!(parse_request(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn tolerates_case_whitespace_lf_and_absolute_form() {
        let text = "GET https://gw.example/.well-known/masque/ip/*/*/ HTTP/1.1\n\
                    host:gw.example\n\
                    CONNECTION: keep-alive ,  UPGRADE\n\
                    upgrade:\tConnect-IP \n\
                    capsule-protocol: ?1;foo=bar\n\
                    \n";
        let (req, used) = parse(text).expect("valid").expect("complete");
        assert_eq!(used, text.len());
        assert_eq!(req.host, "gw.example");
    }

    #[test]
    fn precise_errors() {
        let ok_headers =
            "Host: h\r\nConnection: Upgrade\r\nUpgrade: connect-ip\r\nCapsule-Protocol: ?1\r\n";
        assert_eq!(
            err(&format!("POST / HTTP/1.1\r\n{ok_headers}\r\n")),
            ProtoError::MethodNotGet {
                method: "POST".into()
            }
        );
        assert_eq!(
            err(&format!("GET / HTTP/1.0\r\n{ok_headers}\r\n")),
            ProtoError::HttpVersion {
                version: "HTTP/1.0".into()
            }
        );
        assert_eq!(
            err("GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nCapsule-Protocol: ?1\r\n\r\n"),
            ProtoError::MissingHeader {
                name: "Upgrade",
                expected: "connect-ip"
            }
        );
        assert_eq!(
            err("GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nCapsule-Protocol: ?1\r\n\r\n")
                .to_string(),
            "Upgrade header is \"websocket\", expected connect-ip"
        );
        assert_eq!(
            err("GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\nUpgrade: connect-ip\r\nCapsule-Protocol: ?1\r\n\r\n")
                .to_string(),
            "Connection header is \"keep-alive\", expected a list containing Upgrade"
        );
        assert_eq!(
            err("GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: connect-ip\r\n\r\n"),
            ProtoError::MissingHeader {
                name: "Capsule-Protocol",
                expected: "?1"
            }
        );
        assert_eq!(
            err("GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: connect-ip\r\nCapsule-Protocol: ?0\r\n\r\n")
                .to_string(),
            "Capsule-Protocol header is \"?0\", expected ?1"
        );
        assert_eq!(
            err("GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: connect-ip\r\nCapsule-Protocol: ?1\r\n\r\n")
                .to_string(),
            "missing Host header (expected \"Host: the gateway's host name\")"
        );
        assert_eq!(
            err(&format!("GET / HTTP/1.1\r\n{ok_headers}Host: h2\r\n\r\n")),
            ProtoError::DuplicateHeader { name: "Host" }
        );
        assert_eq!(
            err(&format!(
                "GET / HTTP/1.1\r\n{ok_headers}Content-Length: 5\r\n\r\n"
            )),
            ProtoError::UnexpectedBody {
                header: "Content-Length"
            }
        );
        assert!(parse(&format!(
            "GET / HTTP/1.1\r\n{ok_headers}Content-Length: 0\r\n\r\n"
        ))
        .is_ok());
    }

    #[test]
    fn junk_fails_before_any_line_end() {
        // A TLS ClientHello record header.
        assert_eq!(
            parse_request(&[0x16, 0x03, 0x01, 0x02, 0x00]),
            Err(ProtoError::TlsInsteadOfHttp)
        );
        assert_eq!(
            parse_request(&[0x00, 0xff, 0x13]),
            Err(ProtoError::MalformedRequestLine {
                line: "\\x00\\xff\\x13".into()
            })
        );
        // The wrong method is known at the end of the first line.
        assert_eq!(
            parse("POST / HTTP/1.1\r\n"),
            Err(ProtoError::MethodNotGet {
                method: "POST".into()
            })
        );
    }

    #[test]
    fn header_block_is_capped() {
        let mut text = String::from("GET / HTTP/1.1\r\n");
        while text.len() < MAX_HEADER_LEN {
            text.push_str("X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let e = err(&text);
        assert_eq!(
            e.to_string(),
            "request header too large (more than 8192 bytes)"
        );
    }

    /// A valid request with `extra` (complete header lines) added.
    fn with_headers(extra: &str) -> String {
        format!(
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: connect-ip\r\n\
             Capsule-Protocol: ?1\r\n{extra}\r\n"
        )
    }

    fn offload_of(text: &str) -> Result<bool, ProtoError> {
        parse(text).map(|parsed| parsed.expect("complete").0.offload)
    }

    #[test]
    fn offload_is_announced_in_one_line_and_read_back() {
        let bytes = request(
            "gateway.example",
            WELL_KNOWN_PATH,
            Duration::from_secs(15),
            true,
        );
        let text = String::from_utf8(bytes.clone()).expect("ASCII");
        assert_eq!(text.matches("Veil-Offload: ?1\r\n").count(), 1, "{text}");
        assert_eq!(text.matches("Veil-Offload").count(), 1, "{text}");
        assert!(text.ends_with("Veil-Offload: ?1\r\n\r\n"), "{text}");
        let (req, used) = parse_request(&bytes).expect("valid").expect("complete");
        assert_eq!(used, bytes.len());
        assert!(req.offload);
        assert_eq!(req.keepalive, Some(Duration::from_secs(15)));

        let bytes = request(
            "gateway.example",
            WELL_KNOWN_PATH,
            Duration::from_secs(15),
            false,
        );
        assert!(!String::from_utf8_lossy(&bytes).contains("Veil-Offload"));
        let (req, _) = parse_request(&bytes).expect("valid").expect("complete");
        assert!(!req.offload);
    }

    #[test]
    fn offload_header_is_a_structured_boolean() {
        assert_eq!(offload_of(&with_headers("")), Ok(false));
        assert_eq!(offload_of(&with_headers("Veil-Offload: ?1\r\n")), Ok(true));
        assert_eq!(offload_of(&with_headers("Veil-Offload: ?0\r\n")), Ok(false));
        // Header names are case-insensitive; whitespace around the value is not part of it.
        assert_eq!(
            offload_of(&with_headers("veil-offload:  ?1 \r\n")),
            Ok(true)
        );
        let e = err(&with_headers("Veil-Offload: yes\r\n"));
        assert_eq!(
            e,
            ProtoError::BadHeaderValue {
                name: "Veil-Offload",
                found: "yes".into(),
                expected: "?1 or ?0"
            }
        );
        assert_eq!(
            e.to_string(),
            "Veil-Offload header is \"yes\", expected ?1 or ?0"
        );
        for bad in ["?2", "1", "true", "?10"] {
            assert!(
                matches!(
                    err(&with_headers(&format!("Veil-Offload: {bad}\r\n"))),
                    ProtoError::BadHeaderValue {
                        name: "Veil-Offload",
                        ..
                    }
                ),
                "{bad}"
            );
        }
        assert_eq!(
            err(&with_headers("Veil-Offload: ?1\r\nVeil-Offload: ?1\r\n")),
            ProtoError::DuplicateHeader {
                name: "Veil-Offload"
            }
        );
    }
}
