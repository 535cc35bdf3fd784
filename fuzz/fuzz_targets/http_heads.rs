//! The HTTP/1.1 upgrade request and response parsers on arbitrary bytes.
//!
//! Asserts, beyond "no panic": an accepted head reports a length within
//! the input that ends with its blank line, parses the same on its own,
//! and every shorter prefix of it is "incomplete", never an error (both
//! ends buffer what arrives and parse again, so a head cut anywhere must
//! not be refused); an incomplete input's prefixes are incomplete too, and
//! it is shorter than the head limit (interim responses included: the
//! client holds all of it); the text fields carry no control characters
//! and respect their limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_proto::{
    http::{parse_request, parse_response, MAX_HEADER_LEN, MAX_KEEPALIVE},
    ProtoError,
};

fuzz_target!(|data: &[u8]| {
    request(data);
    response(data);
});

/// Where to cut when checking prefixes: after each of the first line ends,
/// and just before `end`, which bounds them all.
fn cuts(data: &[u8], end: usize) -> impl Iterator<Item = usize> + '_ {
    let lines = data[..end]
        .iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'\n')
        .map(|(i, _)| i + 1)
        .take(24);
    lines
        .chain([end.saturating_sub(1), end.saturating_sub(2), end / 2])
        .filter(move |&cut| cut < end)
}

fn request(data: &[u8]) {
    let result = parse_request(data);
    let end = match &result {
        Ok(Some((req, used))) => {
            let used = *used;
            assert!(used <= data.len() && used <= MAX_HEADER_LEN);
            assert_eq!(data[used - 1], b'\n');
            assert_eq!(parse_request(&data[..used]), result);
            assert!(visible(&req.host), "host {:?}", req.host);
            assert!(req.target.chars().all(|c| !c.is_control()));
            if let Some(k) = req.keepalive {
                assert!(k.as_secs() >= 1 && k <= MAX_KEEPALIVE);
            }
            used
        }
        Ok(None) => {
            assert!(data.len() < MAX_HEADER_LEN);
            data.len()
        }
        Err(_) => return,
    };
    for cut in cuts(data, end) {
        assert_eq!(
            parse_request(&data[..cut]),
            Ok(None),
            "request prefix of {cut} bytes"
        );
    }
}

fn response(data: &[u8]) {
    let result = parse_response(data);
    let end = match &result {
        Ok(Some((resp, used))) => {
            let used = *used;
            assert!(used <= data.len());
            assert_eq!(data[used - 1], b'\n');
            assert_eq!(parse_response(&data[..used]), result);
            assert_eq!(resp.status, 101);
            assert!(clean(&resp.reason));
            used
        }
        Ok(None) => {
            // Interim responses included: the client buffers all of it.
            assert!(data.len() < MAX_HEADER_LEN);
            data.len()
        }
        Err(ProtoError::Refused {
            status,
            reason,
            message,
        }) => {
            assert!(*status <= 999);
            assert!(clean(reason));
            if let Some(m) = message {
                assert!(clean(m) && !m.is_empty());
            }
            return;
        }
        Err(_) => return,
    };
    for cut in cuts(data, end) {
        assert_eq!(
            parse_response(&data[..cut]),
            Ok(None),
            "response prefix of {cut} bytes"
        );
    }
}

fn visible(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// Text from the peer as it may reach a log: no control characters, no
/// surrounding space, at most 256 characters.
fn clean(s: &str) -> bool {
    s.chars().count() <= 256 && !s.chars().any(char::is_control) && s.trim() == s
}
