//! Fair use in the datapath: each limited client's packets through its
//! token bucket and quota (`veil_common::ratelimit`, where the arithmetic
//! is, tested on the host). Clients without an entry pass after one
//! lookup, or none while no client is limited.

use core::intrinsics::{atomic_xadd, AtomicOrdering::Relaxed};

use aya_ebpf::{
    btf_maps::{Array, HashMap},
    helpers::bpf_ktime_get_ns,
    macros::btf_map,
};
use veil_common::{
    ratelimit::{police as decide, Direction, RateKey, RateLimit, MAX_LIMITED},
    Reason,
};

#[btf_map]
pub static VEIL_RATE: HashMap<RateKey, RateLimit, { MAX_LIMITED as usize }> = HashMap::new();

/// `VEIL_RATE`'s entry count (`veil_common::ratelimit::LIMITED_MAP`): an
/// array lookup, which the verifier inlines, instead of a hash lookup that
/// misses.
#[btf_map]
pub static VEIL_LIMITED: Array<u32, 1> = Array::new();

/// Whether a `len`-byte packet of `client` going `dir` is within its
/// limits; the drop reason if not.
#[inline(always)]
pub fn police(client: [u8; 4], len: u32, dir: Direction) -> Result<(), Reason> {
    if VEIL_LIMITED.get(0).is_none_or(|n| *n == 0) {
        return Ok(());
    }
    let key = RateKey {
        client_addr: client,
    };
    let Some(limit) = VEIL_RATE.get_ptr_mut(&key) else {
        return Ok(());
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a map value, valid for this program run; other CPUs may
    // write it meanwhile (see veil_common::ratelimit on that race).
    let verdict = decide(unsafe { &mut *limit }, dir, len as u64, now);
    unsafe {
        match verdict {
            Ok(()) => atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*limit).used, len as u64),
            Err(Reason::DropQuotaExceeded) => {
                atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*limit).quota_dropped, 1)
            }
            Err(_) => atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*limit).rate_dropped, 1),
        };
    }
    verdict
}
