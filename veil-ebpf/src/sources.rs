//! How many established forwarded TCP connections each remote address
//! holds (`--max-forward-per-source`). A connection counts from its
//! handshake's last ACK, which a forged source never sends (so forging an
//! address cannot use up its share), until the datapath sees it end
//! (reset, or closed both ways) or a SYN reopens its entries; the daemon
//! sets each count to what the table holds at every expiry, which covers
//! the ends the datapath does not see. Unlocked: two CPUs may both see
//! one end, or count one handshake, and the daemon may overwrite a change
//! made while it counted; the error lasts until the next expiry.

use core::intrinsics::{atomic_xadd, AtomicOrdering::Relaxed};

use aya_ebpf::bindings::BPF_NOEXIST;
use veil_common::{Config, Reason};

use crate::maps::VEIL_FWD_SOURCES;

/// The key of a remote address.
#[inline(always)]
fn key(addr: [u8; 4]) -> u32 {
    u32::from_ne_bytes(addr)
}

/// `Err` if `addr` holds as many established connections as it may.
#[inline(always)]
pub fn may_open(addr: [u8; 4], cfg: &Config) -> Result<(), Reason> {
    if cfg.fwd_per_source == 0 {
        return Ok(());
    }
    match VEIL_FWD_SOURCES.get_ptr(key(addr)) {
        // Read as signed: a count taken below 0 (an end seen twice) lets
        // in until the daemon sets it right.
        Some(n) if unsafe { *n } as i64 >= cfg.fwd_per_source as i64 => {
            Err(Reason::FwdDropSourceBusy)
        }
        _ => Ok(()),
    }
}

/// One more connection of `addr`.
#[inline(always)]
pub fn opened(addr: [u8; 4]) {
    add(addr, 1);
}

/// One connection of `addr` fewer.
#[inline(always)]
pub fn ended(addr: [u8; 4]) {
    add(addr, u64::MAX);
}

#[inline(always)]
fn add(addr: [u8; 4], n: u64) {
    let k = key(addr);
    if let Some(count) = VEIL_FWD_SOURCES.get_ptr_mut(k) {
        unsafe { atomic_xadd::<u64, u64, { Relaxed }>(count, n) };
        return;
    }
    if n != 1 {
        // Nothing to take from: evicted, or never counted.
        return;
    }
    // The first: another CPU may insert meanwhile, then add to its entry.
    if VEIL_FWD_SOURCES.insert(k, 1, BPF_NOEXIST as u64).is_err() {
        if let Some(count) = VEIL_FWD_SOURCES.get_ptr_mut(k) {
            unsafe { atomic_xadd::<u64, u64, { Relaxed }>(count, 1) };
        }
    }
}
