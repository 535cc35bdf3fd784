//! Counters: per reason (per CPU) and per flow (shared, atomic).

use core::intrinsics::{atomic_or, atomic_xadd, AtomicOrdering::Relaxed};

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use veil_common::{tcp_flags, FlowStats, FwdCounters, Reason};

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
