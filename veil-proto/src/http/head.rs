//! The part of HTTP/1.1 message syntax (RFC 9112 §2-5) both directions
//! need: finding the end of a header block and splitting it into a start
//! line and fields. Deliberately strict where leniency has bitten HTTP
//! before (no obsolete line folding, no space before the colon, no control
//! characters in values), lenient where it is harmless (bare LF line ends,
//! optional whitespace around values).

use crate::{error::printable, ProtoError};

/// Upper bound on a request or response header block, blank line included.
pub const MAX_HEADER_LEN: usize = 8192;

/// The length of the header block at the front of `buf`, blank line
/// included, or `None` if the blank line has not arrived yet.
pub(crate) fn find_end(buf: &[u8]) -> Option<usize> {
    buf.iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'\n')
        .find_map(|(i, _)| match &buf[i + 1..] {
            [b'\n', ..] => Some(i + 2),
            [b'\r', b'\n', ..] => Some(i + 3),
            _ => None,
        })
}

/// The first line of `buf` without its line end, if complete.
pub(crate) fn first_line(buf: &[u8]) -> Option<&[u8]> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    Some(strip_cr(&buf[..end]))
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `tchar` of RFC 9110 §5.6.2: the characters of methods and header names.
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Visible ASCII, as in a request target or a host.
pub(crate) fn is_visible(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|b| (0x21..=0x7e).contains(b))
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if !is_ows(*first) {
            break;
        }
        s = rest;
    }
    while let [rest @ .., last] = s {
        if !is_ows(*last) {
            break;
        }
        s = rest;
    }
    s
}

/// A parsed header block, borrowing from the received bytes.
#[derive(Debug)]
pub(crate) struct Head<'a> {
    pub(crate) start_line: &'a [u8],
    fields: Vec<(&'a [u8], &'a [u8])>,
}

impl<'a> Head<'a> {
    /// Parses a complete header block as delimited by [`find_end`].
    pub(crate) fn parse(block: &'a [u8]) -> Result<Self, ProtoError> {
        let mut lines = block.split(|&b| b == b'\n').map(strip_cr);
        let start_line = lines.next().unwrap_or_default();
        let mut fields = Vec::new();
        for line in lines.take_while(|line| !line.is_empty()) {
            fields.push(parse_field(line)?);
        }
        Ok(Head { start_line, fields })
    }

    /// Every value of header `name`, in order.
    pub(crate) fn all<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'a [u8]> + 's {
        self.fields
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|&(_, v)| v)
    }

    /// The value of a header that may appear at most once.
    pub(crate) fn single(&self, name: &'static str) -> Result<Option<&'a [u8]>, ProtoError> {
        let mut values = self.all(name);
        let first = values.next();
        if values.next().is_some() {
            return Err(ProtoError::DuplicateHeader { name });
        }
        Ok(first)
    }

    /// Whether any value of list header `name` has `token` as one of its
    /// comma-separated elements (case-insensitive, RFC 9110 §5.6.1).
    fn list_contains(&self, name: &str, token: &str) -> bool {
        self.all(name).any(|v| {
            v.split(|&b| b == b',')
                .any(|el| trim_ows(el).eq_ignore_ascii_case(token.as_bytes()))
        })
    }

    /// The three headers that turn an HTTP/1.1 exchange into a CONNECT-IP
    /// tunnel (RFC 9484 §3.2-3.3, RFC 9297 §3.4), checked the same way on
    /// the request and on the 101 response.
    pub(crate) fn check_upgrade_headers(&self) -> Result<(), ProtoError> {
        if !self.list_contains("Connection", "upgrade") {
            return Err(match self.all("Connection").next() {
                None => ProtoError::MissingHeader {
                    name: "Connection",
                    expected: "Upgrade",
                },
                Some(found) => ProtoError::BadHeaderValue {
                    name: "Connection",
                    found: printable(found),
                    expected: "a list containing Upgrade",
                },
            });
        }
        match self.single("Upgrade")? {
            None => {
                return Err(ProtoError::MissingHeader {
                    name: "Upgrade",
                    expected: "connect-ip",
                })
            }
            Some(v) if v.eq_ignore_ascii_case(b"connect-ip") => {}
            Some(found) => {
                return Err(ProtoError::BadHeaderValue {
                    name: "Upgrade",
                    found: printable(found),
                    expected: "connect-ip",
                })
            }
        }
        // A Structured Fields boolean (RFC 8941); parameters are allowed and
        // ignored.
        match self.single("Capsule-Protocol")? {
            None => Err(ProtoError::MissingHeader {
                name: "Capsule-Protocol",
                expected: "?1",
            }),
            Some(v) if trim_ows(v.split(|&b| b == b';').next().unwrap_or_default()) == b"?1" => {
                Ok(())
            }
            Some(found) => Err(ProtoError::BadHeaderValue {
                name: "Capsule-Protocol",
                found: printable(found),
                expected: "?1",
            }),
        }
    }
}

/// `name ":" OWS value OWS` (RFC 9112 §5).
fn parse_field(line: &[u8]) -> Result<(&[u8], &[u8]), ProtoError> {
    let malformed = || ProtoError::MalformedHeaderLine {
        line: printable(line),
    };
    let colon = line.iter().position(|&b| b == b':').ok_or_else(malformed)?;
    let (name, value) = (&line[..colon], trim_ows(&line[colon + 1..]));
    // An empty or non-token name also catches obsolete line folding (a line
    // starting with whitespace) and whitespace before the colon, both of
    // which RFC 9112 §5.1-5.2 tells servers to reject.
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(malformed());
    }
    // Field values: visible characters, spaces, tabs and obs-text; any
    // other control character (a stray CR, NUL) is malformed.
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(malformed());
    }
    Ok((name, value))
}

/// Peer text (a reason phrase, a refusal body) made safe for one log line:
/// lossy UTF-8, control characters as spaces, trimmed, at most `max` chars.
pub(crate) fn sanitize_text(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let cleaned: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    cleaned.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_blank_line_with_either_line_end() {
        assert_eq!(find_end(b"A\r\nB: c\r\n\r\nrest"), Some(11));
        assert_eq!(find_end(b"A\nB: c\n\nrest"), Some(8));
        assert_eq!(find_end(b"A\r\nB: c\r\n\r"), None);
        assert_eq!(find_end(b"A\r\nB: c\r\n"), None);
    }

    #[test]
    fn fields_are_trimmed_and_case_insensitive() {
        let head = Head::parse(b"GET / HTTP/1.1\r\nhOsT: \t example \t\r\n\r\n").expect("valid");
        assert_eq!(head.start_line, b"GET / HTTP/1.1");
        assert_eq!(head.single("Host"), Ok(Some(&b"example"[..])));
    }

    #[test]
    fn rejects_folding_space_before_colon_and_controls() {
        for block in [
            &b"X\r\nA: b\r\n folded\r\n\r\n"[..],
            b"X\r\nA : b\r\n\r\n",
            b"X\r\nA: b\rc\r\n\r\n",
            b"X\r\nno colon\r\n\r\n",
        ] {
            assert!(
                matches!(
                    Head::parse(block),
                    Err(ProtoError::MalformedHeaderLine { .. })
                ),
                "{block:?}"
            );
        }
    }
}
