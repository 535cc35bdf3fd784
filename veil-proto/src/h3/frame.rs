//! HTTP/3 frames on a request stream: DATA passed on as it arrives (the
//! capsule decoder bounds what it buffers), HEADERS collected whole up to
//! the field section limit, unknown and reserved types skipped without
//! buffering, and the frames that have no place on a request stream
//! refused (RFC 9114 §7.2).

use super::{FRAME_DATA, FRAME_HEADERS, MAX_FIELD_SECTION};
use crate::{varint, ProtoError};

/// Appends a frame of `kind` with `payload`.
pub(super) fn encode(kind: u64, payload: &[u8], out: &mut Vec<u8>) {
    varint::encode_unchecked(kind, out);
    varint::encode_unchecked(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// What a request stream carried, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// Some of a DATA frame's payload.
    Data(Vec<u8>),
    /// A complete HEADERS frame's field section.
    Headers(Vec<u8>),
}

#[derive(Debug, Default)]
enum State {
    /// Collecting a frame header (type and length, 16 bytes at most).
    #[default]
    Header,
    Data {
        left: u64,
    },
    Headers {
        left: usize,
    },
    Skip {
        left: u64,
    },
}

/// Splits a request stream into [`Part`]s.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    state: State,
    /// A partial frame header, or a partial HEADERS payload.
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// Decodes what `bytes` completes. The parts come back even when an
    /// error follows them: act on them, then on the error, after which the
    /// stream is not to be read any further.
    pub fn decode(&mut self, mut bytes: &[u8]) -> (Vec<Part>, Option<ProtoError>) {
        let mut parts = Vec::new();
        while !bytes.is_empty() {
            match &mut self.state {
                State::Header => {
                    let take = bytes.len().min(16 - self.buf.len());
                    self.buf.extend_from_slice(&bytes[..take]);
                    let Some((kind, a)) = varint::decode(&self.buf) else {
                        bytes = &bytes[take..];
                        continue;
                    };
                    let Some((len, b)) = varint::decode(&self.buf[a..]) else {
                        bytes = &bytes[take..];
                        continue;
                    };
                    // Give back what was copied past the header.
                    let used = take - (self.buf.len() - (a + b));
                    bytes = &bytes[used..];
                    self.buf.clear();
                    match self.start(kind, len) {
                        Ok(state) => self.state = state,
                        Err(e) => return (parts, Some(e)),
                    }
                    if let State::Headers { left: 0 } = self.state {
                        parts.push(Part::Headers(Vec::new()));
                        self.state = State::Header;
                    }
                }
                State::Data { left } => {
                    let take = bytes
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    parts.push(Part::Data(bytes[..take].to_vec()));
                    *left -= take as u64;
                    bytes = &bytes[take..];
                    if *left == 0 {
                        self.state = State::Header;
                    }
                }
                State::Headers { left } => {
                    let take = bytes.len().min(*left);
                    self.buf.extend_from_slice(&bytes[..take]);
                    *left -= take;
                    bytes = &bytes[take..];
                    if *left == 0 {
                        parts.push(Part::Headers(std::mem::take(&mut self.buf)));
                        self.state = State::Header;
                    }
                }
                State::Skip { left } => {
                    let take = bytes
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= take as u64;
                    bytes = &bytes[take..];
                    if *left == 0 {
                        self.state = State::Header;
                    }
                }
            }
        }
        if let State::Data { left: 0 } = self.state {
            self.state = State::Header;
        }
        (parts, None)
    }

    fn start(&self, kind: u64, len: u64) -> Result<State, ProtoError> {
        match kind {
            FRAME_DATA if len == 0 => Ok(State::Header),
            FRAME_DATA => Ok(State::Data { left: len }),
            FRAME_HEADERS if len > MAX_FIELD_SECTION as u64 => Err(ProtoError::H3Frame {
                frame_type: kind,
                problem: "carries a field section over 8192 bytes",
            }),
            FRAME_HEADERS => Ok(State::Headers { left: len as usize }),
            // CANCEL_PUSH, SETTINGS, PUSH_PROMISE, GOAWAY, MAX_PUSH_ID, and
            // HTTP/2's PRIORITY, PING, WINDOW_UPDATE, CONTINUATION.
            0x02..=0x09 | 0x0d => Err(ProtoError::H3Frame {
                frame_type: kind,
                problem: "is not allowed on a request stream",
            }),
            // Unknown and reserved (0x1f * N + 0x21) types are ignored.
            _ => Ok(State::Skip { left: len }),
        }
    }
}
