//! Fair use: each client's token buckets (one each way) and byte quota,
//! kept by the datapath in `VEIL_RATE` and set by the daemon.
//!
//! A client with no entry is not limited. While no client has one (the
//! common case), the datapath skips the lookup: [`LIMITED_MAP`] holds the
//! count of entries. The daemon writes [`RateLimit::rate`], [`RateLimit::burst`],
//! [`RateLimit::quota`] and [`RateLimit::period_ns`]; the datapath keeps
//! the rest. The datapath polices: a packet over the rate or the quota is
//! dropped (there is no queue in XDP/TC to delay it in), and TCP backs off
//! to the rate as it would behind any policer.
//!
//! The buckets are updated without a lock: two CPUs policing one client's
//! packets at once may both take from the same tokens, so the rate can be
//! overshot by a packet per CPU. The quota's byte count is added
//! atomically by the datapath.

use crate::Reason;

/// Per-client limits. Hash, key [`RateKey`], value [`RateLimit`].
pub const RATE_MAP: &str = "VEIL_RATE";

/// How many entries [`RATE_MAP`] holds. Array, one `u32`, written by the
/// daemon after each entry it adds and after each it removes: 0 lets the
/// datapath skip the hash lookup for every packet.
pub const LIMITED_MAP: &str = "VEIL_LIMITED";

/// Clients with a limit at once, at most.
pub const MAX_LIMITED: u32 = 65_536;

/// A second, in the datapath's clock (`bpf_ktime_get_ns`).
pub const SECOND_NS: u64 = 1_000_000_000;

/// The fastest rate a bucket holds, bytes per second (100 Gbit/s): keeps
/// `elapsed * rate` within a `u64` for the up to one second refilled.
pub const MAX_RATE: u64 = 12_500_000_000;

/// A client's virtual address (the wire's four bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RateKey {
    pub client_addr: [u8; 4],
}

/// One direction's token bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Bytes that may pass now; below zero, the debt of the last packet
    /// (one that found any tokens passed whole: a 64 KiB GSO packet is
    /// not dropped for want of its last bytes, and the debt is paid before
    /// the next one passes).
    pub tokens: i64,
    /// When `tokens` was last brought up to date.
    pub last_ns: u64,
}

/// Which way a packet goes, for its bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the client (TC on the TUN device).
    Up,
    /// To the client (TC on the WAN interface).
    Down,
}

/// A client's limits and the datapath's state of them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Bytes per second each way; 0: no rate limit.
    pub rate: u64,
    /// Bytes a bucket holds: how much may pass at once after a pause.
    pub burst: u64,
    /// Bytes both ways per period; 0: no quota.
    pub quota: u64,
    /// The quota's period.
    pub period_ns: u64,
    pub up: Bucket,
    pub down: Bucket,
    /// When the current period began.
    pub period_start_ns: u64,
    /// Bytes both ways in the current period.
    pub used: u64,
    /// Packets dropped over the rate, over the quota.
    pub rate_dropped: u64,
    pub quota_dropped: u64,
}

/// The bucket depth for `rate` bytes per second: 250 ms of traffic, at
/// least 128 KiB (two of the largest GSO packets). A policer drops rather
/// than queues, and TCP through it reaches the rate only if its
/// sawtooth fits in the bucket: with 50 ms a download through the tunnel
/// measured 38-40 Mbit/s under a 50 Mbit/s limit, with 250 ms 47-48.
pub const fn burst_for(rate: u64) -> u64 {
    let burst = rate / 4;
    if burst < 128 * 1024 {
        128 * 1024
    } else {
        burst
    }
}

impl RateLimit {
    /// A new entry: buckets full, a period beginning at `now_ns`.
    pub const fn new(rate: u64, quota: u64, period_ns: u64, now_ns: u64) -> Self {
        let rate = if rate > MAX_RATE { MAX_RATE } else { rate };
        let burst = burst_for(rate);
        let full = Bucket {
            tokens: burst as i64,
            last_ns: now_ns,
        };
        Self {
            rate,
            burst,
            quota,
            period_ns,
            up: full,
            down: full,
            period_start_ns: now_ns,
            used: 0,
            rate_dropped: 0,
            quota_dropped: 0,
        }
    }

    /// These limits with `other`'s state (buckets, period, counts): a
    /// changed limit applies from now without resetting the quota.
    pub const fn with_state_of(self, other: &RateLimit) -> Self {
        Self {
            up: other.up,
            down: other.down,
            period_start_ns: other.period_start_ns,
            used: other.used,
            rate_dropped: other.rate_dropped,
            quota_dropped: other.quota_dropped,
            ..self
        }
    }

    /// The quota left in this period, if there is a quota.
    pub const fn quota_left(&self) -> Option<u64> {
        if self.quota == 0 {
            None
        } else {
            Some(self.quota.saturating_sub(self.used))
        }
    }
}

/// The verdict on a `len`-byte packet going `dir` at `now_ns`: the quota
/// first (a new period starts it again), then the direction's bucket. The
/// caller adds `len` to [`RateLimit::used`] when it passes (atomically, in
/// the datapath) and counts a drop.
#[inline(always)]
pub fn police(limit: &mut RateLimit, dir: Direction, len: u64, now_ns: u64) -> Result<(), Reason> {
    if limit.quota != 0 {
        if now_ns.wrapping_sub(limit.period_start_ns) >= limit.period_ns {
            limit.period_start_ns = now_ns;
            limit.used = 0;
        }
        if limit.used + len > limit.quota {
            // Used up: small packets must not trickle through the last
            // bytes a large one could not take.
            limit.used = limit.quota;
            return Err(Reason::DropQuotaExceeded);
        }
    }
    if limit.rate != 0 {
        let (rate, burst) = (limit.rate, limit.burst as i64);
        let bucket = match dir {
            Direction::Up => &mut limit.up,
            Direction::Down => &mut limit.down,
        };
        let elapsed = now_ns.saturating_sub(bucket.last_ns);
        let tokens = if elapsed >= SECOND_NS {
            burst
        } else {
            let rate = if rate > MAX_RATE { MAX_RATE } else { rate };
            // Unsigned: BPF has no signed division.
            let refill = (elapsed * rate / SECOND_NS) as i64;
            let t = bucket.tokens + refill;
            if t > burst {
                burst
            } else {
                t
            }
        };
        // Time is only spent when it bought whole bytes: many small
        // packets in a row must not each round their refill down to zero.
        if tokens != bucket.tokens || elapsed >= SECOND_NS {
            bucket.last_ns = now_ns;
        }
        if tokens <= 0 {
            bucket.tokens = tokens;
            return Err(Reason::DropRateLimited);
        }
        bucket.tokens = tokens - len as i64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_bucket_passes_its_rate_and_drops_the_rest() {
        // 1 MB/s, burst 250 kB.
        let mut l = RateLimit::new(1_000_000, 0, 0, 0);
        assert_eq!(l.burst, 250_000);
        assert_eq!(burst_for(100_000), 128 * 1024, "never under 128 KiB");
        let mut passed = 0u64;
        // 1500-byte packets every 0.5 ms for 2 s: 6 MB/s offered.
        for i in 0..4000u64 {
            if police(&mut l, Direction::Down, 1500, i * MS / 2).is_ok() {
                passed += 1500;
            }
        }
        // 2 s at 1 MB/s plus the burst, within a packet.
        let want = 2_000_000 + 250_000;
        assert!(
            passed.abs_diff(want) <= 3000,
            "{passed} passed, want {want}"
        );
        // The other direction has its own bucket.
        assert!(police(&mut l, Direction::Up, 1500, 2000 * MS).is_ok());
    }

    #[test]
    fn tiny_packets_close_together_still_refill() {
        // 10 kB/s: 100 ns buys a thousandth of a byte.
        let mut l = RateLimit::new(10_000, 0, 0, 0);
        l.down.tokens = 0;
        let mut passed = 0;
        for i in 1..=100_000u64 {
            if police(&mut l, Direction::Down, 1, i * 10_000).is_ok() {
                passed += 1;
            }
        }
        // 1 s at 10 kB/s.
        assert!((9_900..=10_000).contains(&passed), "{passed}");
    }

    #[test]
    fn the_quota_counts_both_ways_and_a_new_period_starts_it_again() {
        let mut l = RateLimit::new(0, 3000, 10 * SECOND_NS, 0);
        for now in [1, 2] {
            police(&mut l, Direction::Up, 1000, now).unwrap();
            l.used += 1000;
        }
        police(&mut l, Direction::Down, 1000, 3).unwrap();
        l.used += 1000;
        assert_eq!(l.quota_left(), Some(0));
        assert_eq!(
            police(&mut l, Direction::Down, 1, 4),
            Err(Reason::DropQuotaExceeded)
        );
        police(&mut l, Direction::Down, 1000, 10 * SECOND_NS).unwrap();
        assert_eq!(l.used, 0, "a new period");
    }

    #[test]
    fn a_changed_limit_keeps_the_count() {
        let mut old = RateLimit::new(1000, 5000, SECOND_NS, 7);
        old.used = 4000;
        let new = RateLimit::new(2000, 10_000, SECOND_NS, 99).with_state_of(&old);
        assert_eq!((new.rate, new.quota, new.used), (2000, 10_000, 4000));
        assert_eq!(new.period_start_ns, 7);
    }
}
