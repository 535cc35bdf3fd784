//! HTTP/3 as CONNECT-IP needs it, bytes only: the frames of a request
//! stream (RFC 9114 §7), SETTINGS on the control stream, QPACK field
//! sections (RFC 9204) with the static table only, and the HTTP datagram
//! framing of RFC 9297 §2.1.
//!
//! Why not the `h3` crate: its latest release (0.0.8) cannot send or accept
//! `:protocol = connect-ip` (its `Protocol` knows only `webtransport` and
//! `connect-udp`), which is the whole request. What CONNECT-IP uses of
//! HTTP/3 is small: one request stream carrying one HEADERS frame each
//! way then DATA frames with capsules, a control stream with SETTINGS, and
//! datagrams. Both ends announce a QPACK dynamic table of 0 bytes, so no
//! encoder or decoder stream state exists; field sections use the static
//! table and literals.

mod frame;
mod qpack;

pub use frame::{FrameDecoder, Part};
pub use qpack::{decode_fields, encode_fields, Field};

use std::time::Duration;

use crate::{error::printable, http, varint, ProtoError};

/// The ALPN token of HTTP/3.
pub const ALPN: &[u8] = b"h3";

/// Frame types (RFC 9114 §7.2).
pub const FRAME_DATA: u64 = 0x00;
pub const FRAME_HEADERS: u64 = 0x01;
pub const FRAME_SETTINGS: u64 = 0x04;

/// Unidirectional stream types (RFC 9114 §6.2, RFC 9204 §4.2).
pub const STREAM_CONTROL: u64 = 0x00;

/// Settings (RFC 9114 §7.2.4.1, RFC 8441 §3 via RFC 9220, RFC 9297 §5.1).
pub const SETTINGS_QPACK_MAX_TABLE_CAPACITY: u64 = 0x01;
pub const SETTINGS_MAX_FIELD_SECTION_SIZE: u64 = 0x06;
pub const SETTINGS_ENABLE_CONNECT_PROTOCOL: u64 = 0x08;
pub const SETTINGS_H3_DATAGRAM: u64 = 0x33;

/// The largest field section either end accepts, announced as
/// SETTINGS_MAX_FIELD_SECTION_SIZE: the HTTP/1.1 head limit.
pub const MAX_FIELD_SECTION: usize = http::MAX_HEADER_LEN;

/// The `:protocol` of RFC 9484.
pub const PROTOCOL: &str = "connect-ip";

/// The start of this end's control stream: its type, then SETTINGS
/// announcing extended CONNECT, HTTP datagrams and the field section limit
/// (no dynamic QPACK table: the default capacity 0 is left unsaid).
pub fn control_stream_preface() -> Vec<u8> {
    let mut settings = Vec::new();
    for (id, value) in [
        (SETTINGS_MAX_FIELD_SECTION_SIZE, MAX_FIELD_SECTION as u64),
        (SETTINGS_ENABLE_CONNECT_PROTOCOL, 1),
        (SETTINGS_H3_DATAGRAM, 1),
    ] {
        varint::encode_unchecked(id, &mut settings);
        varint::encode_unchecked(value, &mut settings);
    }
    let mut out = Vec::new();
    varint::encode_unchecked(STREAM_CONTROL, &mut out);
    frame::encode(FRAME_SETTINGS, &settings, &mut out);
    out
}

/// What the peer's SETTINGS said that matters here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// SETTINGS_H3_DATAGRAM = 1: it takes HTTP datagrams.
    pub datagram: bool,
    /// SETTINGS_ENABLE_CONNECT_PROTOCOL = 1 (only a server's counts).
    pub extended_connect: bool,
}

/// Reads the peer's control stream up to its SETTINGS frame.
///
/// Feed it what the stream delivers; `Ok(Some)` once SETTINGS is complete
/// (the rest of the stream can be read and discarded: GOAWAY and unknown
/// frames change nothing for one long-lived request). The stream type
/// must already have been read.
#[derive(Debug, Default)]
pub struct ControlReader {
    buf: Vec<u8>,
}

impl ControlReader {
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<Settings>, ProtoError> {
        self.buf.extend_from_slice(bytes);
        let Some((kind, a)) = varint::decode(&self.buf) else {
            return Ok(None);
        };
        let Some((len, b)) = varint::decode(&self.buf[a..]) else {
            return Ok(None);
        };
        // RFC 9114 §6.2.1: the first frame of a control stream is SETTINGS.
        if kind != FRAME_SETTINGS {
            return Err(ProtoError::H3Frame {
                frame_type: kind,
                problem: "is not SETTINGS, which must open a control stream",
            });
        }
        if len > 1024 {
            return Err(ProtoError::H3Frame {
                frame_type: kind,
                problem: "is longer than 1024 bytes",
            });
        }
        let Some(payload) = self.buf.get(a + b..a + b + len as usize) else {
            return Ok(None);
        };
        parse_settings(payload).map(Some)
    }
}

fn parse_settings(mut payload: &[u8]) -> Result<Settings, ProtoError> {
    let truncated = ProtoError::H3Frame {
        frame_type: FRAME_SETTINGS,
        problem: "ends inside a setting",
    };
    let mut settings = Settings::default();
    while !payload.is_empty() {
        let (id, a) = varint::decode(payload).ok_or_else(|| truncated.clone())?;
        let (value, b) = varint::decode(&payload[a..]).ok_or_else(|| truncated.clone())?;
        payload = &payload[a + b..];
        match id {
            SETTINGS_H3_DATAGRAM => settings.datagram = value == 1,
            SETTINGS_ENABLE_CONNECT_PROTOCOL => settings.extended_connect = value == 1,
            // HTTP/2 settings have no meaning in HTTP/3 (RFC 9114 §7.2.4.1).
            0x02..=0x05 => {
                return Err(ProtoError::H3Frame {
                    frame_type: FRAME_SETTINGS,
                    problem: "carries an HTTP/2 setting",
                })
            }
            _ => {}
        }
    }
    Ok(settings)
}

/// The client's extended CONNECT (RFC 9484 §4.1, RFC 9220), as one HEADERS
/// frame: `host` and `path` as [`http::request`] takes them (check them
/// with [`http::validate_target`]), the keepalive interval announced as
/// in HTTP/1.1.
pub fn request(host: &str, path: &str, keepalive: Duration) -> Vec<u8> {
    let secs = http::keepalive_secs(keepalive).to_string();
    let fields = [
        Field::new(":method", "CONNECT"),
        Field::new(":protocol", PROTOCOL),
        Field::new(":scheme", "https"),
        Field::new(":authority", host),
        Field::new(":path", path),
        Field::new("capsule-protocol", "?1"),
        Field::new("veil-keepalive", &secs),
    ];
    headers_frame(&fields)
}

/// The gateway's answer to a valid request: `200` with `capsule-protocol`.
pub fn ok_response() -> Vec<u8> {
    headers_frame(&[
        Field::new(":status", "200"),
        Field::new("capsule-protocol", "?1"),
    ])
}

/// A refusal: `status` then `message` as a one-line plain-text body, the
/// same text the HTTP/1.1 refusal carries. The caller ends the stream.
pub fn refusal(status: u16, message: &str) -> Vec<u8> {
    let status = if (100..=599).contains(&status) {
        status
    } else {
        500
    };
    let mut out = headers_frame(&[
        Field::new(":status", &status.to_string()),
        Field::new("content-type", "text/plain;charset=utf-8"),
    ]);
    frame::encode(FRAME_DATA, format!("{message}\n").as_bytes(), &mut out);
    out
}

fn headers_frame(fields: &[Field]) -> Vec<u8> {
    let mut block = Vec::new();
    encode_fields(fields, &mut block);
    let mut out = Vec::new();
    frame::encode(FRAME_HEADERS, &block, &mut out);
    out
}

/// A DATA frame's header for `len` bytes of payload.
pub fn data_frame_header(len: usize, out: &mut Vec<u8>) {
    varint::encode_unchecked(FRAME_DATA, out);
    varint::encode_unchecked(len as u64, out);
}

/// Reads the client's request from its field section: an extended CONNECT
/// for `connect-ip` over `https` with `capsule-protocol: ?1`. Offload is
/// never negotiated over HTTP/3: each datagram carries one packet.
pub fn parse_request(block: &[u8]) -> Result<http::Request, ProtoError> {
    let fields = decode_fields(block)?;
    let expect = |name: &'static str, want: &'static str| -> Result<(), ProtoError> {
        match single(&fields, name)? {
            Some(v) if v == want.as_bytes() => Ok(()),
            Some(v) => Err(ProtoError::BadHeaderValue {
                name,
                found: printable(v),
                expected: want,
            }),
            None => Err(ProtoError::MissingHeader {
                name,
                expected: want,
            }),
        }
    };
    expect(":method", "CONNECT")?;
    expect(":protocol", PROTOCOL)?;
    expect(":scheme", "https")?;
    expect("capsule-protocol", "?1")?;
    let visible = |name: &'static str, expected: &'static str| match single(&fields, name)? {
        Some(v) if !v.is_empty() && v.iter().all(|b| b.is_ascii_graphic()) => {
            Ok(String::from_utf8_lossy(v).into_owned())
        }
        Some(v) => Err(ProtoError::BadHeaderValue {
            name,
            found: printable(v),
            expected,
        }),
        None => Err(ProtoError::MissingHeader { name, expected }),
    };
    let host = visible(":authority", "the gateway's host name")?;
    let target = visible(":path", "a request path")?;
    let keepalive = match single(&fields, "veil-keepalive")? {
        None => None,
        Some(v) => Some(http::parse_keepalive(v)?),
    };
    Ok(http::Request {
        host,
        target,
        keepalive,
        offload: false,
    })
}

/// The status of the gateway's response.
pub fn parse_status(block: &[u8]) -> Result<u16, ProtoError> {
    let fields = decode_fields(block)?;
    let expected = "a three-digit status";
    match single(&fields, ":status")? {
        Some(v) => std::str::from_utf8(v)
            .ok()
            .filter(|s| s.len() == 3)
            .and_then(|s| s.parse().ok())
            .filter(|s| (100..=599).contains(s))
            .ok_or_else(|| ProtoError::BadHeaderValue {
                name: ":status",
                found: printable(v),
                expected,
            }),
        None => Err(ProtoError::MissingHeader {
            name: ":status",
            expected,
        }),
    }
}

fn single<'a>(fields: &'a [Field], name: &'static str) -> Result<Option<&'a [u8]>, ProtoError> {
    let mut found = fields.iter().filter(|f| f.name == name.as_bytes());
    match (found.next(), found.next()) {
        (None, _) => Ok(None),
        (Some(f), None) => Ok(Some(&f.value)),
        (Some(_), Some(_)) => Err(ProtoError::DuplicateHeader { name }),
    }
}

/// The start of every HTTP datagram of the request on `stream_id`: its
/// Quarter Stream ID (RFC 9297 §2.1).
pub fn datagram_prefix(stream_id: u64) -> Vec<u8> {
    let mut out = Vec::new();
    varint::encode_unchecked(stream_id / 4, &mut out);
    out
}

#[cfg(test)]
mod tests;
