//! `capsules`: how fast the tunnel's byte stream turns back into packets
//! (`veil_proto::capsule::CapsuleDecoder`, what both ends run on every
//! byte a TLS or WebSocket tunnel carries), in memory, one thread: no
//! root, no namespace.
//!
//! The stream is DATAGRAM capsules of one packet size, fed in pieces of
//! one read's size (what the pump gets from TLS: a record's 16 KiB, up to
//! its 64 KiB buffer); every capsule of a piece is taken before any is
//! dropped, as the session queues a read's packets before the pump acts
//! on them.

#[allow(unused_imports, reason = "one import list for the benchmark's modules")]
use super::*;

use veil_proto::capsule::{encode_ip_datagram, Capsule, CapsuleDecoder};

/// Packet sizes: a small packet, an MTU-sized one, an offload
/// super-packet.
const PACKETS: [usize; 3] = [64, 1400, 65_000];
/// Read sizes.
const PIECES: [usize; 2] = [16 << 10, 64 << 10];

pub(crate) fn capsules(quick: bool) {
    let stream_bytes: usize = if quick { 64 << 20 } else { 256 << 20 };
    println!("## The capsule decoder\n");
    println!(
        "{} MiB of DATAGRAM capsules per cell, in memory on one thread, through one decoder; \
         median of 5 passes after a first one.\n",
        stream_bytes >> 20
    );
    println!("| packet (bytes) | read (KiB) | GB/s of packets | packets/s (millions) |");
    println!("|---:|---:|---:|---:|");
    for packet in PACKETS {
        let mut one = Vec::new();
        encode_ip_datagram(&vec![0x45; packet], &mut one);
        let stream = one.repeat(stream_bytes / one.len());
        for piece in PIECES {
            // One decoder, as a session has, warmed by a first pass.
            let mut decoder = CapsuleDecoder::default();
            decode(&mut decoder, &stream, piece);
            let mut rates: Vec<(f64, f64)> = (0..5)
                .map(|_| decode(&mut decoder, &stream, piece))
                .collect();
            rates.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (bytes_per_s, packets_per_s) = rates[2];
            println!(
                "| {packet} | {} | {:.2} | {:.2} |",
                piece >> 10,
                bytes_per_s / 1e9,
                packets_per_s / 1e6
            );
        }
    }
}

/// Bytes and packets per second decoding `stream` in `piece`-sized reads.
fn decode(decoder: &mut CapsuleDecoder, stream: &[u8], piece: usize) -> (f64, f64) {
    let (mut bytes, mut packets) = (0usize, 0usize);
    let started = Instant::now();
    for read in stream.chunks(piece) {
        decoder.feed(read);
        let mut taken = Vec::new();
        while let Some(capsule) = decoder.next().expect("a valid stream") {
            taken.push(capsule);
        }
        for capsule in taken {
            if let Capsule::Datagram { payload, .. } = capsule {
                bytes += payload.len();
                packets += 1;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    (bytes as f64 / secs, packets as f64 / secs)
}
