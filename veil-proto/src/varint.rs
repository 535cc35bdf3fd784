//! QUIC variable-length integers (RFC 9000 §16), the integer encoding of
//! every capsule header and of most capsule fields.
//!
//! The two high bits of the first byte give the length (1, 2, 4 or 8 bytes);
//! the remaining bits are the value, big-endian. Encoders here always use the
//! shortest form; decoders accept any form, as RFC 9484 §2 requires
//! ("values do not need to be encoded on the minimum number of bytes").

use crate::ProtoError;

/// The largest value a variable-length integer can carry: 2^62 - 1.
pub const MAX: u64 = (1 << 62) - 1;

/// How many bytes [`encode`] writes for `value`: 1, 2, 4 or 8.
///
/// Values above [`MAX`] report 8, the size they would need if they were
/// encodable; [`encode`] rejects them.
pub const fn len(value: u64) -> usize {
    if value < 1 << 6 {
        1
    } else if value < 1 << 14 {
        2
    } else if value < 1 << 30 {
        4
    } else {
        8
    }
}

/// Whether `value` is encodable, as an error naming it if not.
pub fn check(value: u64) -> Result<(), ProtoError> {
    if value > MAX {
        Err(ProtoError::VarintTooLarge { value })
    } else {
        Ok(())
    }
}

/// Appends `value` to `out` in its shortest form.
pub fn encode(value: u64, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    check(value)?;
    encode_unchecked(value, out);
    Ok(())
}

/// [`encode`] for values known to be in range (lengths of in-memory buffers,
/// constants). Out-of-range values are a bug in this crate, caught in debug
/// builds.
pub(crate) fn encode_unchecked(value: u64, out: &mut Vec<u8>) {
    debug_assert!(value <= MAX, "varint {value} out of range");
    match len(value) {
        1 => out.push(value as u8),
        2 => out.extend_from_slice(&(value as u16 | 0x4000).to_be_bytes()),
        4 => out.extend_from_slice(&(value as u32 | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(value | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

/// Reads one integer from the front of `buf`: `Some((value, bytes used))`,
/// or `None` if `buf` ends before the integer does.
///
/// Every byte sequence is a valid integer once complete, so there is no
/// error case: the only question is whether enough bytes have arrived.
pub fn decode(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let n = 1usize << (first >> 6);
    let bytes = buf.get(..n)?;
    let value = bytes[1..]
        .iter()
        .fold(u64::from(first & 0x3f), |acc, &b| (acc << 8) | u64::from(b));
    Some((value, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        encode(v, &mut out).expect("in range");
        out
    }

    #[test]
    fn rfc9000_examples() {
        // RFC 9000 Appendix A.1.
        assert_eq!(
            decode(&[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c]),
            Some((151_288_809_941_952_652, 8))
        );
        assert_eq!(decode(&[0x9d, 0x7f, 0x3e, 0x7d]), Some((494_878_333, 4)));
        assert_eq!(decode(&[0x7b, 0xbd]), Some((15_293, 2)));
        assert_eq!(decode(&[0x25]), Some((37, 1)));
        // A non-minimal two-byte encoding of 37 is still 37.
        assert_eq!(decode(&[0x40, 0x25]), Some((37, 2)));
        assert_eq!(
            enc(151_288_809_941_952_652),
            [0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c]
        );
        assert_eq!(enc(494_878_333), [0x9d, 0x7f, 0x3e, 0x7d]);
        assert_eq!(enc(15_293), [0x7b, 0xbd]);
        assert_eq!(enc(37), [0x25]);
    }

    #[test]
    fn boundaries_round_trip() {
        for v in [0, 63, 64, 16_383, 16_384, (1 << 30) - 1, 1 << 30, MAX] {
            let bytes = enc(v);
            assert_eq!(bytes.len(), len(v), "len({v})");
            assert_eq!(decode(&bytes), Some((v, bytes.len())), "round trip {v}");
            // Every strict prefix is incomplete, never wrong.
            for cut in 0..bytes.len() {
                assert_eq!(decode(&bytes[..cut]), None, "{v} cut at {cut}");
            }
        }
    }

    #[test]
    fn too_large_is_an_error() {
        let mut out = Vec::new();
        assert_eq!(
            encode(MAX + 1, &mut out),
            Err(ProtoError::VarintTooLarge { value: MAX + 1 })
        );
        assert!(out.is_empty(), "nothing written on error");
    }
}
