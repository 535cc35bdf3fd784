//! Counters: per reason (per CPU) and per flow (shared, atomic).

use core::intrinsics::{atomic_or, atomic_xadd, atomic_xor, AtomicOrdering::Relaxed};

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use network_types::tcp::TcpHdr;
use veil_common::{acked_of, tcp_flags, FlowStats, FwdCounters, Reason};

use crate::maps::VEIL_STATS;

#[inline(always)]
pub fn count(reason: Reason, bytes: u32) {
    if let Some(c) = VEIL_STATS.get_ptr_mut(reason as u32) {
        // Per-CPU slot: no other writer, plain adds are enough.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

/// Notes one packet of a flow: last-seen time, counters and the TCP flags
/// the daemon's expiry needs. The same flow can be hit on several CPUs.
///
/// The last-seen time is the coarse monotonic clock (the last tick: a few
/// ms behind at most, against expiry timeouts of seconds), read for a
/// fraction of the precise clock's cost, and written only when it moved.
#[inline(always)]
pub fn touch(stats: *mut FlowStats, bytes: u32, flags: u64) {
    unsafe {
        let now = bpf_ktime_get_coarse_ns();
        if now > (*stats).last_seen_ns {
            (*stats).last_seen_ns = now;
        }
        // The bpfel target exposes no `Atomic*::fetch_*`; the intrinsics
        // lower to BPF_ATOMIC add/or.
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*stats).packets, 1);
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*stats).bytes, bytes as u64);
        let seen = flags & tcp_flags::TRACKED;
        // Only write when something new shows up: the common packet (a bare
        // ACK on an established flow) leaves the cache line alone.
        if seen & !(*stats).tcp_flags != 0 {
            atomic_or::<u64, u64, { Relaxed }>(&raw mut (*stats).tcp_flags, seen);
        }
    }
}

/// A TCP header's flags (the low byte) and, when ACK is set, its
/// acknowledgment number (the high 32 bits) in one word: one register
/// through a translation, where the verifier's 512-byte stack has no room
/// for another. [`touch`] reads the flags, [`note_acked`] the number.
#[inline(always)]
pub fn flags_and_ack(tcp: *const TcpHdr) -> u64 {
    let flags = unsafe { *(tcp as *const u8).add(13) } as u64;
    if flags & tcp_flags::ACK == 0 {
        return flags;
    }
    flags | (u32::from_be_bytes(unsafe { (*tcp).ack_seq }) as u64) << 32
}

/// Keeps what a TCP packet's sender acknowledged (from
/// [`flags_and_ack`]) in its flow's `acked` ([`acked_of`]), for the other
/// end's RSTs and FINs to be checked against. Written only when it moves
/// (every 64 KiB): the entry's cache line stays shared between CPUs.
#[inline(always)]
pub fn note_acked(acked: *mut u16, flags: u64) {
    if flags & tcp_flags::ACK == 0 {
        return;
    }
    let now = acked_of((flags >> 32) as u32);
    unsafe {
        if *acked != now {
            *acked = now;
        }
    }
}

/// One packet of a forward rule's connections.
#[inline(always)]
pub fn fwd_packet(c: *mut FwdCounters, bytes: u32) {
    unsafe {
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*c).packets, 1);
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*c).bytes, bytes as u64);
    }
}

/// A forward rule's connection ended unassured for a newer one.
#[inline(always)]
pub fn fwd_evicted(c: *mut FwdCounters) {
    unsafe {
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*c).evicted, 1);
    }
}

/// One new connection of a forward rule.
#[inline(always)]
pub fn fwd_connection(c: *mut FwdCounters) {
    unsafe {
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*c).connections, 1);
    }
}

/// Notes on a forwarded connection's inbound entry what the remote's
/// handshake ACK must acknowledge (the target's SYN-ACK sequence number
/// + 1), whole, in the high half of its flags word
/// ([`veil_common::handshake_ack`]), which [`touch`] never writes. The
/// latest SYN-ACK's, as `acked` keeps its low 16 bits (a target may answer
/// a retransmitted SYN with a new one). An atomic XOR of the difference,
/// not a store, so that flags ORed in meanwhile by another CPU stay.
#[inline(always)]
pub fn note_handshake(stats: *mut FlowStats, next: u32) {
    unsafe {
        let noted = ((*stats).tcp_flags >> 32) as u32;
        if noted != next {
            atomic_xor::<u64, u64, { Relaxed }>(
                &raw mut (*stats).tcp_flags,
                ((noted ^ next) as u64) << 32,
            );
        }
    }
}
