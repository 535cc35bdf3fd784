//! Client side: reading the gateway's answer to the upgrade request.

use super::head::{self, Head, MAX_HEADER_LEN};
use crate::{error::printable, ProtoError};

/// How much of a refusal body becomes the message shown to the operator.
const MAX_MESSAGE_LEN: usize = 256;

/// Interim (1xx) responses skipped before the answer, at most. A gateway
/// has no reason to send any (the request has no `Expect`); a few 103
/// Early Hints from a front end are tolerated. With each head bounded by
/// [`MAX_HEADER_LEN`], everything the client buffers before the 101 is
/// bounded too.
pub const MAX_INTERIM_RESPONSES: usize = 4;

/// A successful upgrade response (always status 101: anything else is
/// reported as [`ProtoError::Refused`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    /// The gateway confirmed `Veil-Offload: ?1`.
    pub offload: bool,
}

/// Reads the gateway's response at the front of `buf`.
///
/// `Ok(None)`: incomplete, call again with more bytes.
/// `Ok(Some((response, n)))`: a valid `101 Switching Protocols`, using the
/// first `n` bytes; anything after them is the gateway's capsule stream.
/// Interim 1xx responses before it are skipped and counted in `n`; more
/// than [`MAX_INTERIM_RESPONSES`] of them are an error, and so is more than
/// [`MAX_HEADER_LEN`] of them and the final head together.
/// `Err(ProtoError::Refused { .. })`: any final status other than 101, once
/// the start of its body (the gateway's explanation) has arrived, so the
/// client can print "gateway refused: 503 Service Unavailable (gateway
/// full)". Other errors: the response is not valid HTTP/1.1, or a 101 that
/// does not confirm the connect-ip upgrade.
pub fn parse_response(buf: &[u8]) -> Result<Option<(Response, usize)>, ProtoError> {
    let mut offset = 0;
    let mut interim = 0;
    loop {
        let rest = &buf[offset..];
        // Anything that does not start like a status line is not HTTP.
        let prefix = &rest[..rest.len().min(5)];
        if !b"HTTP/".starts_with(prefix) {
            return Err(ProtoError::MalformedStatusLine {
                line: printable(head::first_line(rest).unwrap_or(rest)),
            });
        }
        // Interim responses count toward the limit with the final one: the
        // client buffers them all until the 101 arrives.
        let window = &buf[offset..buf.len().min(MAX_HEADER_LEN)];
        let Some(len) = head::find_end(window) else {
            if buf.len() >= MAX_HEADER_LEN {
                return Err(ProtoError::HeaderTooLarge {
                    what: "response",
                    limit: MAX_HEADER_LEN,
                });
            }
            return Ok(None);
        };
        let head = Head::parse(&rest[..len])?;
        let (version, status, reason) = status_line(head.start_line)?;
        match status {
            101 => {
                if version != b"HTTP/1.1" {
                    return Err(ProtoError::HttpVersion {
                        version: printable(version),
                    });
                }
                head.check_upgrade_headers()?;
                let response = Response {
                    status,
                    reason: head::sanitize_text(reason, MAX_MESSAGE_LEN),
                    offload: super::offload_header(&head)?,
                };
                return Ok(Some((response, offset + len)));
            }
            // 100 Continue, 103 Early Hints: interim, no body, skip.
            100..=199 => {
                interim += 1;
                if interim > MAX_INTERIM_RESPONSES {
                    return Err(ProtoError::TooManyInterimResponses {
                        limit: MAX_INTERIM_RESPONSES,
                    });
                }
                offset += len;
            }
            _ => return refused(&head, status, reason, &rest[len..]),
        }
    }
}

/// `Err(Refused)` once enough of the body has arrived to explain the
/// refusal, `Ok(None)` until then. Without a usable `Content-Length` the
/// body's end is only known at connection close, so no message is waited
/// for.
fn refused(
    head: &Head<'_>,
    status: u16,
    reason: &[u8],
    body: &[u8],
) -> Result<Option<(Response, usize)>, ProtoError> {
    let declared = head
        .single("Content-Length")
        .ok()
        .flatten()
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<usize>().ok());
    let message = match declared {
        Some(n) => {
            let wanted = n.min(MAX_MESSAGE_LEN);
            let Some(body) = body.get(..wanted) else {
                return Ok(None);
            };
            Some(head::sanitize_text(body, MAX_MESSAGE_LEN)).filter(|m| !m.is_empty())
        }
        None => None,
    };
    Err(ProtoError::Refused {
        status,
        reason: head::sanitize_text(reason, MAX_MESSAGE_LEN),
        message,
    })
}

/// `HTTP/1.x SP 3DIGIT [SP reason-phrase]`: version, status, reason.
fn status_line(line: &[u8]) -> Result<(&[u8], u16, &[u8]), ProtoError> {
    let malformed = || ProtoError::MalformedStatusLine {
        line: printable(line),
    };
    let (version, rest) = split_space(line).ok_or_else(malformed)?;
    if !matches!(version, [b'H', b'T', b'T', b'P', b'/', b'1', b'.', d] if d.is_ascii_digit()) {
        return Err(malformed());
    }
    let (code, reason) = split_space(rest).unwrap_or((rest, b""));
    let status = match code {
        [a, b, c] if code.iter().all(u8::is_ascii_digit) => {
            u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
        }
        _ => return Err(malformed()),
    };
    Ok((version, status, reason))
}

fn split_space(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = s.iter().position(|&b| b == b' ')?;
    Some((&s[..i], &s[i + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{refusal, switching_protocols};

    #[test]
    fn accepts_our_101_and_leaves_the_capsules() {
        let mut bytes = switching_protocols(false);
        let len = bytes.len();
        bytes.extend_from_slice(&[0x01, 0x07]);
        let (resp, used) = parse_response(&bytes).expect("valid").expect("complete");
        assert_eq!(used, len);
        assert_eq!(resp.status, 101);
        assert_eq!(resp.reason, "Switching Protocols");
        for cut in 0..len {
            assert_eq!(parse_response(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn skips_interim_responses() {
        let mut bytes = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
        bytes.extend_from_slice(&switching_protocols(false));
        let (resp, used) = parse_response(&bytes).expect("valid").expect("complete");
        assert_eq!((resp.status, used), (101, bytes.len()));
    }

    #[test]
    fn a_stream_of_interim_responses_is_an_error() {
        let interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n";
        let mut bytes = interim.repeat(MAX_INTERIM_RESPONSES);
        assert_eq!(parse_response(&bytes), Ok(None), "a few are skipped");
        bytes.extend_from_slice(&switching_protocols(false));
        let (resp, used) = parse_response(&bytes).expect("valid").expect("complete");
        assert_eq!((resp.status, used), (101, bytes.len()));

        let bytes = interim.repeat(MAX_INTERIM_RESPONSES + 1);
        assert_eq!(
            parse_response(&bytes),
            Err(ProtoError::TooManyInterimResponses {
                limit: MAX_INTERIM_RESPONSES
            })
        );
        // However the stream goes on, the verdict comes at the same point.
        let endless = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(10_000);
        assert!(matches!(
            parse_response(&endless),
            Err(ProtoError::TooManyInterimResponses { .. })
        ));
    }

    #[test]
    fn refusal_carries_status_reason_and_message() {
        let bytes = refusal(503, "Service Unavailable", "gateway full");
        for cut in 0..bytes.len() {
            assert!(
                matches!(parse_response(&bytes[..cut]), Ok(None)),
                "cut at {cut} of {bytes:?}"
            );
        }
        let e = parse_response(&bytes).expect_err("refused");
        assert_eq!(
            e,
            ProtoError::Refused {
                status: 503,
                reason: "Service Unavailable".into(),
                message: Some("gateway full".into()),
            }
        );
        assert_eq!(
            e.to_string(),
            "gateway refused: 503 Service Unavailable (gateway full)"
        );
    }

    #[test]
    fn refusal_from_a_stranger_without_length_or_reason() {
        let e = parse_response(b"HTTP/1.0 404\r\n\r\n").expect_err("refused");
        assert_eq!(e.to_string(), "gateway refused: 404");
        // A hostile body cannot forge log lines.
        let e = parse_response(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 8\r\n\r\nno\nway\x1b!")
            .expect_err("refused");
        assert_eq!(e.to_string(), "gateway refused: 403 Forbidden (no way !)");
    }

    #[test]
    fn rejects_non_http_and_bad_101() {
        assert!(matches!(
            parse_response(b"SSH-2.0-OpenSSH\r\n"),
            Err(ProtoError::MalformedStatusLine { .. })
        ));
        assert!(matches!(
            parse_response(b"\x15\x03\x03"),
            Err(ProtoError::MalformedStatusLine { .. })
        ));
        assert_eq!(
            parse_response(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nCapsule-Protocol: ?1\r\n\r\n"),
            Err(ProtoError::BadHeaderValue {
                name: "Upgrade",
                found: "websocket".into(),
                expected: "connect-ip"
            })
        );
    }

    /// A 101 as ours, with `extra` (complete header lines) added.
    fn switching_with(extra: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\
             Upgrade: connect-ip\r\nCapsule-Protocol: ?1\r\n{extra}\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn offload_is_confirmed_only_by_a_101_that_says_so() {
        let bytes = switching_protocols(true);
        let text = String::from_utf8(bytes.clone()).expect("ASCII");
        assert_eq!(text.matches("Veil-Offload: ?1\r\n").count(), 1, "{text}");
        let (resp, used) = parse_response(&bytes).expect("valid").expect("complete");
        assert_eq!(used, bytes.len());
        assert_eq!(resp.status, 101);
        assert!(resp.offload);

        let bytes = switching_protocols(false);
        assert!(!String::from_utf8_lossy(&bytes).contains("Veil-Offload"));
        let (resp, _) = parse_response(&bytes).expect("valid").expect("complete");
        assert!(!resp.offload);

        let (resp, _) = parse_response(&switching_with("Veil-Offload: ?0\r\n"))
            .expect("valid")
            .expect("complete");
        assert!(!resp.offload);
    }

    #[test]
    fn a_101_with_a_bad_offload_value_is_an_error() {
        let e = parse_response(&switching_with("Veil-Offload: maybe\r\n")).expect_err("bad value");
        assert_eq!(
            e,
            ProtoError::BadHeaderValue {
                name: "Veil-Offload",
                found: "maybe".into(),
                expected: "?1 or ?0"
            }
        );
        assert_eq!(
            e.to_string(),
            "Veil-Offload header is \"maybe\", expected ?1 or ?0"
        );
    }

    #[test]
    fn interim_responses_count_toward_the_head_limit() {
        // Few interim responses, but large ones: together with the 101 they
        // are one head, bounded like any other.
        let big = format!(
            "HTTP/1.1 103 Early Hints\r\nLink: <{}>\r\n\r\n",
            "a".repeat(3000)
        );
        let bytes = big.repeat(3).into_bytes();
        assert_eq!(
            parse_response(&bytes),
            Err(ProtoError::HeaderTooLarge {
                what: "response",
                limit: MAX_HEADER_LEN
            })
        );
        let mut ok = big.repeat(2).into_bytes();
        ok.extend_from_slice(&switching_protocols(false));
        let (resp, used) = parse_response(&ok).expect("valid").expect("complete");
        assert_eq!((resp.status, used), (101, ok.len()));
    }
}
