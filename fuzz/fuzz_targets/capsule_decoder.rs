//! The capsule decoder on an arbitrary stream cut into arbitrary pieces.
//!
//! Input: two bytes seeding the cuts, one byte choosing the limits, then
//! the stream. Asserts, beyond "no panic":
//! - no loop: every capsule is backed by at least two bytes of input;
//! - bounded memory: after draining, at most one partial capsule (header
//!   and `max_capsule_len` of value) stays buffered, and the heap the
//!   decoder holds at its peak is bounded by its limits and the input;
//! - cut-invariance: the same capsules, then the same error or the same
//!   leftover, as decoding the stream in one piece;
//! - every decoded capsule encodes, and decodes back to itself;
//! - DNS_ASSIGN carries only names safe for a resolver configuration.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_fuzz::{assert_dns_safe, heap, Rng};
use veil_proto::{
    capsule::{Capsule, CapsuleDecoder, DEFAULT_MAX_CAPSULE_LEN, DEFAULT_MAX_SKIP_LEN},
    ProtoError,
};

const CAPSULE_LIMITS: [usize; 4] = [DEFAULT_MAX_CAPSULE_LEN, 1500, 40, 0];
const SKIP_LIMITS: [u64; 4] = [DEFAULT_MAX_SKIP_LEN, 1 << 10, 8, 0];
/// The longest capsule header: two 8-byte varints.
const MAX_HEADER: usize = 16;

#[derive(Debug, PartialEq)]
enum End {
    /// Decoding stopped for more bytes with this many buffered.
    NeedMore(usize),
    Error(ProtoError),
}

fuzz_target!(|data: &[u8]| {
    let Some((&[s0, s1, limits], stream)) = data.split_first_chunk::<3>() else {
        return;
    };
    let max = CAPSULE_LIMITS[usize::from(limits & 3)];
    let max_skip = SKIP_LIMITS[usize::from(limits >> 2 & 3)];
    let new = || CapsuleDecoder::new(max).with_max_skip_len(max_skip);

    let (whole, whole_end) = decode(new(), &[stream], max);
    let pieces = Rng::new(u16::from_le_bytes([s0, s1])).pieces(stream);
    let largest = pieces.iter().map(|p| p.len()).max().unwrap_or(0);
    // The buffer holds at most a partial capsule plus one piece, at twice
    // its size while growing; one decoded capsule is at most its value in
    // memory several times over (an address list of 40-byte entries).
    let limit = 4 * (MAX_HEADER + max + largest) + 8 * max + 4096;
    let (cut, cut_end) = heap::bounded("decoder", limit + 64 * stream.len(), || {
        decode(new(), &pieces, max)
    });
    assert_eq!(cut, whole, "capsules differ when the stream is cut");
    assert_eq!(cut_end, whole_end, "decoding ends differently when cut");

    for capsule in &whole {
        match capsule {
            Capsule::Unknown { .. } => continue,
            Capsule::DnsAssign(configs) => assert_dns_safe(configs),
            _ => {}
        }
        let mut bytes = Vec::new();
        capsule
            .encode(&mut bytes)
            .unwrap_or_else(|e| panic!("decoded {capsule:?} does not encode: {e}"));
        let mut decoder = CapsuleDecoder::new(bytes.len());
        decoder.feed(&bytes);
        assert_eq!(decoder.next().as_ref(), Ok(&Some(capsule.clone())));
        assert_eq!(decoder.next(), Ok(None));
        assert_eq!(decoder.buffered_len(), 0);
    }
});

fn decode(mut decoder: CapsuleDecoder, pieces: &[&[u8]], max: usize) -> (Vec<Capsule>, End) {
    let mut capsules = Vec::new();
    let mut fed = 0;
    for piece in pieces {
        decoder.feed(piece);
        fed += piece.len();
        loop {
            match decoder.next() {
                Ok(Some(capsule)) => capsules.push(capsule),
                Ok(None) => break,
                Err(e) => return (capsules, End::Error(e)),
            }
            assert!(
                2 * capsules.len() <= fed,
                "{} capsules from {fed} bytes: the decoder loops",
                capsules.len()
            );
        }
        assert!(
            decoder.buffered_len() < MAX_HEADER + max,
            "{} bytes buffered after draining, with a {max}-byte capsule limit",
            decoder.buffered_len()
        );
    }
    (capsules, End::NeedMore(decoder.buffered_len()))
}
