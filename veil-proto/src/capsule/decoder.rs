//! Incremental capsule decoding from a byte stream that may be split
//! anywhere.
//!
//! Memory is bounded by what the peer is allowed to make us hold: a known
//! capsule is buffered whole only if its declared length is within
//! `max_capsule_len` (checked as soon as the two header varints are in),
//! and an unknown capsule is never buffered at all, only counted down as
//! its bytes go by. Consumed bytes are dropped by advancing an offset and
//! compacting the buffer once at least half of it is dead, so decoding is
//! amortised O(1) per byte whatever the capsule sizes.

use super::{is_known, Capsule};
use crate::{varint, ProtoError};

/// Default limit on a known capsule: a one-byte context ID plus the largest
/// IPv6 packet without jumbograms (40-byte header + 65535-byte payload).
pub const DEFAULT_MAX_CAPSULE_LEN: usize = 1 + 40 + 65_535;

/// Default limit on an unknown capsule. Skipping costs no memory, so this
/// only needs to stop absurd lengths (up to 2^62) from stalling the stream.
pub const DEFAULT_MAX_SKIP_LEN: u64 = 16 << 20;

/// An unknown capsule being streamed past.
#[derive(Debug)]
struct Skip {
    capsule_type: u64,
    length: u64,
    remaining: u64,
}

/// Turns stream bytes into [`Capsule`]s: [`feed`](Self::feed) what arrives,
/// then call [`next`](Self::next) until it returns `Ok(None)`.
///
/// After an error the stream has lost framing and the decoder must not be
/// used further; the connection is to be closed (RFC 9297 §3.3).
#[derive(Debug)]
pub struct CapsuleDecoder {
    max_capsule_len: usize,
    max_skip_len: u64,
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    pos: usize,
    skip: Option<Skip>,
    /// Known types this end has no use for, skipped as unknown ones are.
    ignored: &'static [u64],
}

impl Default for CapsuleDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_CAPSULE_LEN)
    }
}

impl CapsuleDecoder {
    /// A decoder refusing known capsules longer than `max_capsule_len`
    /// bytes of value, and unknown ones longer than [`DEFAULT_MAX_SKIP_LEN`].
    pub fn new(max_capsule_len: usize) -> Self {
        CapsuleDecoder {
            max_capsule_len,
            max_skip_len: DEFAULT_MAX_SKIP_LEN,
            buf: Vec::new(),
            pos: 0,
            skip: None,
            ignored: &[],
        }
    }

    /// Skips capsules of `types` unread, as unknown ones (returned as
    /// [`Capsule::Unknown`]): an end that would only throw them away does
    /// not build them, nor buffer them (a client's configuration
    /// capsules, at the gateway).
    pub fn ignore(&mut self, types: &'static [u64]) {
        self.ignored = types;
    }

    /// Sets the limit on unknown capsules, which are skipped unbuffered.
    pub fn with_max_skip_len(mut self, max_skip_len: u64) -> Self {
        self.max_skip_len = max_skip_len;
        self
    }

    pub fn max_capsule_len(&self) -> usize {
        self.max_capsule_len
    }

    /// Bytes received but not yet decoded. Never more than one capsule
    /// header and value plus whatever the last [`feed`](Self::feed) brought.
    pub fn buffered_len(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Memory held by the buffer, for tests of its bounds.
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Adds received bytes. Bytes that belong to an unknown capsule being
    /// skipped are dropped here without being copied.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        if let Some(skip) = &mut self.skip {
            // Only reachable with nothing buffered: `next` drains the buffer
            // into the skip before it reports needing more bytes.
            if self.pos == self.buf.len() {
                let n = clamp(skip.remaining, bytes.len());
                skip.remaining -= n as u64;
                bytes = &bytes[n..];
            }
        }
        if bytes.is_empty() {
            return;
        }
        self.compact();
        self.buf.extend_from_slice(bytes);
    }

    /// Drops consumed bytes once they are at least half the buffer, so each
    /// byte is moved at most about once.
    fn compact(&mut self) {
        if self.pos == 0 {
            return;
        }
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    /// The next complete capsule, `Ok(None)` if more bytes are needed.
    // Not an `Iterator`: a decode error has to be told apart from the end
    // of the buffered bytes, and the decoder is unusable after one.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Capsule>, ProtoError> {
        if self.skip.is_none() && !self.start_capsule()? {
            return self.take_known();
        }
        Ok(self.continue_skip())
    }

    /// Streams past the unknown capsule in progress, buffered bytes first,
    /// and reports it once the last of it has gone by.
    fn continue_skip(&mut self) -> Option<Capsule> {
        let skip = self.skip.as_mut()?;
        let n = clamp(skip.remaining, self.buf.len() - self.pos);
        self.pos += n;
        skip.remaining -= n as u64;
        if skip.remaining > 0 {
            return None;
        }
        let Skip {
            capsule_type,
            length,
            ..
        } = self.skip.take()?;
        Some(Capsule::Unknown {
            capsule_type,
            length,
        })
    }

    /// Reads a capsule header if one is complete and, for an unknown type,
    /// starts skipping it. Returns whether a skip is now in progress; for a
    /// known type the header is left in place for [`take_known`].
    ///
    /// Both limits are enforced here, before any of the value is buffered.
    fn start_capsule(&mut self) -> Result<bool, ProtoError> {
        let Some((capsule_type, length, header_len)) = self.header() else {
            return Ok(false);
        };
        if is_known(capsule_type) && !self.ignored.contains(&capsule_type) {
            if length > self.max_capsule_len as u64 {
                return Err(ProtoError::CapsuleTooLarge {
                    len: length,
                    max: self.max_capsule_len,
                });
            }
            return Ok(false);
        }
        if length > self.max_skip_len {
            return Err(ProtoError::UnknownCapsuleTooLarge {
                capsule_type,
                len: length,
                max: self.max_skip_len,
            });
        }
        self.pos += header_len;
        self.skip = Some(Skip {
            capsule_type,
            length,
            remaining: length,
        });
        Ok(true)
    }

    /// Type, length and header size of the capsule at the front, if both
    /// varints have arrived.
    fn header(&self) -> Option<(u64, u64, usize)> {
        let pending = &self.buf[self.pos..];
        let (capsule_type, n1) = varint::decode(pending)?;
        let (length, n2) = varint::decode(&pending[n1..])?;
        Some((capsule_type, length, n1 + n2))
    }

    /// Decodes the known capsule at the front once all of it has arrived.
    fn take_known(&mut self) -> Result<Option<Capsule>, ProtoError> {
        let Some((capsule_type, length, header_len)) = self.header() else {
            return Ok(None);
        };
        // `start_capsule` checked `length` against `max_capsule_len`.
        let total = header_len + length as usize;
        let Some(value) = self.buf[self.pos..].get(header_len..total) else {
            // Make room for the rest now rather than in several steps.
            self.buf.reserve(total - self.buffered_len());
            return Ok(None);
        };
        let capsule = Capsule::decode_value(capsule_type, value)?;
        self.pos += total;
        Ok(Some(capsule))
    }
}

/// `min(remaining, available)` as a `usize`.
fn clamp(remaining: u64, available: usize) -> usize {
    usize::try_from(remaining).map_or(available, |r| r.min(available))
}
