//! Fair use, the daemon's side: rates as people write them, each client's
//! limits (the gateway's defaults, or its own from the client registry),
//! and the `VEIL_RATE` map the datapath polices with
//! (`veil_common::ratelimit`).

use std::{
    collections::HashSet,
    fmt,
    net::Ipv4Addr,
    str::FromStr,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use aya::maps::{Array, HashMap, MapData, MapError};
use serde::{Deserialize, Serialize};
use veil_common::{
    ratelimit::{police, Direction, RateKey, RateLimit, MAX_RATE},
    Reason,
};

use crate::{net::monotonic_ns, size::ByteSize};

/// A rate in bytes per second, written in bits as `tc` does: `50mbit`,
/// `1gbit`, `800kbit`, `1000000bit` (decimal units).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rate {
    pub bytes_per_sec: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not a rate: expected a number of bits per second with kbit, mbit or gbit, such as 50mbit (at most 100gbit, at least 8bit)")]
pub struct RateError(String);

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || RateError(s.to_owned());
        let t = s.trim().to_ascii_lowercase();
        let t = t.strip_suffix("/s").unwrap_or(&t);
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits.parse().map_err(|_| err())?;
        let scale: u64 = match unit.trim() {
            "bit" => 1,
            "kbit" => 1_000,
            "mbit" => 1_000_000,
            "gbit" => 1_000_000_000,
            _ => return Err(err()),
        };
        let bits = n.checked_mul(scale).ok_or_else(err)?;
        if bits < 8 || bits / 8 > MAX_RATE {
            return Err(err());
        }
        Ok(Rate {
            bytes_per_sec: bits / 8,
        })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits = self.bytes_per_sec * 8;
        match bits {
            b if b % 1_000_000_000 == 0 => write!(f, "{}gbit", b / 1_000_000_000),
            b if b % 1_000_000 == 0 => write!(f, "{}mbit", b / 1_000_000),
            b if b % 1_000 == 0 => write!(f, "{}kbit", b / 1_000),
            b => write!(f, "{b}bit"),
        }
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One client's own limits, in its registry record (`[limits]`), each
/// overriding the gateway's default; `Some(0)`-like "none" is spelt with
/// [`Limit::Unlimited`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Limit<Rate>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Limit<ByteSize>>,
}

impl ClientLimits {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A limit, or explicitly none (`"none"`): a client exempt from the
/// gateway's default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit<T> {
    Unlimited,
    At(T),
}

impl<T: FromStr> FromStr for Limit<T> {
    type Err = T::Err;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "none" => Ok(Limit::Unlimited),
            other => other.parse().map(Limit::At),
        }
    }
}

impl<T: fmt::Display> fmt::Display for Limit<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Unlimited => f.write_str("none"),
            Limit::At(v) => v.fmt(f),
        }
    }
}

impl<T: fmt::Display> Serialize for Limit<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de, T: FromStr> Deserialize<'de> for Limit<T>
where
    T::Err: fmt::Display,
{
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The gateway's defaults: `--rate-limit`, `--quota`, `--quota-period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FairUse {
    pub rate: Option<Rate>,
    pub quota: Option<ByteSize>,
    pub period: Duration,
}

impl Default for FairUse {
    fn default() -> Self {
        Self {
            rate: None,
            quota: None,
            period: Duration::from_secs(86_400),
        }
    }
}

/// What one client is held to: its own limits over the defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Effective {
    pub rate: Option<Rate>,
    pub quota: Option<ByteSize>,
    pub period: Duration,
}

impl FairUse {
    pub fn for_client(&self, own: &ClientLimits) -> Effective {
        fn pick<T: Copy>(own: Option<Limit<T>>, default: Option<T>) -> Option<T> {
            match own {
                Some(Limit::Unlimited) => None,
                Some(Limit::At(v)) => Some(v),
                None => default,
            }
        }
        Effective {
            rate: pick(own.rate, self.rate),
            quota: pick(own.quota, self.quota),
            period: self.period,
        }
    }
}

/// The `VEIL_RATE` map: one entry per limited client, by virtual address;
/// and `VEIL_LIMITED`, its count, by which the datapath skips the lookup
/// while no client is limited.
pub struct RateLimits {
    map: HashMap<MapData, RateKey, RateLimit>,
    count: Array<MapData, u32>,
    /// The clients with an entry in `map`: those [`Self::charge`] looks
    /// up (no system call for the others), and their count.
    limited: HashSet<Ipv4Addr>,
    /// Whether `limited` has any, for readers without this table's
    /// lock: the daemon's own packets (DNS, client to client) skip the
    /// lock while no client is limited, as the datapath skips its lookup.
    anyone: Arc<AtomicBool>,
    /// What `count` holds, if it was written: a failed write is tried
    /// again at the next [`Self::apply`], whatever that one changes.
    written: Option<u32>,
}

fn key(vip: Ipv4Addr) -> RateKey {
    RateKey {
        client_addr: vip.octets(),
    }
}

impl RateLimits {
    pub fn new(
        map: HashMap<MapData, RateKey, RateLimit>,
        count: Array<MapData, u32>,
    ) -> Result<Self, MapError> {
        let limited = map
            .keys()
            .filter_map(Result::ok)
            .map(|k| Ipv4Addr::from(k.client_addr))
            .collect();
        let mut limits = Self {
            map,
            count,
            limited,
            anyone: Arc::default(),
            written: None,
        };
        limits.sync_count()?;
        Ok(limits)
    }

    /// Holds `vip` to `limits` from now on: an entry written (keeping the
    /// buckets, period and count of one already there) or, unlimited,
    /// removed.
    pub fn apply(&mut self, vip: Ipv4Addr, limits: Effective) -> Result<(), MapError> {
        let k = key(vip);
        if limits.rate.is_none() && limits.quota.is_none() {
            match self.map.remove(&k) {
                Ok(()) => {
                    self.limited.remove(&vip);
                }
                Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
            return self.sync_count();
        }
        let fresh = RateLimit::new(
            limits.rate.map_or(0, |r| r.bytes_per_sec),
            limits.quota.map_or(0, |q| q.0 as u64),
            limits.period.as_nanos().min(u64::MAX as u128) as u64,
            monotonic_ns(),
        );
        let value = match self.map.get(&k, 0) {
            Ok(old) if old.rate == fresh.rate && old.quota == fresh.quota => {
                return self.sync_count();
            }
            Ok(old) => fresh.with_state_of(&old),
            Err(_) => fresh,
        };
        // The entry first, then the count that makes the datapath look.
        self.map.insert(k, value, 0)?;
        self.limited.insert(vip);
        self.sync_count()
    }

    /// Whether any client is limited, readable without this table's lock
    /// (kept up to date by the table).
    pub fn anyone_limited(&self) -> Arc<AtomicBool> {
        self.anyone.clone()
    }

    /// Tells the datapath how many entries there are, unless it knows.
    fn sync_count(&mut self) -> Result<(), MapError> {
        let count = self.limited.len() as u32;
        self.anyone.store(count > 0, Relaxed);
        if self.written != Some(count) {
            self.count.set(0, count, 0)?;
            self.written = Some(count);
        }
        Ok(())
    }

    /// The datapath's state of `vip`'s limits, if it has any.
    pub fn get(&self, vip: Ipv4Addr) -> Option<RateLimit> {
        self.map.get(&key(vip), 0).ok()
    }

    /// Polices `len` bytes of `vip`'s going `dir` that never cross the
    /// datapath (a query to the gateway's DNS service and its answer, a
    /// packet to another client) as the datapath would: the same
    /// arithmetic on the same entry, counted in it. The entry is read and
    /// written back whole, so a datapath count made in between is lost:
    /// at most the bytes of a few packets, against a quota of megabytes.
    pub fn charge(
        &mut self,
        vip: Ipv4Addr,
        dir: Direction,
        len: u64,
        now_ns: u64,
    ) -> Result<(), Reason> {
        // Most clients are not limited: no system call for them.
        if !self.limited.contains(&vip) {
            return Ok(());
        }
        let k = key(vip);
        let Ok(mut limit) = self.map.get(&k, 0) else {
            return Ok(());
        };
        let verdict = police(&mut limit, dir, len, now_ns);
        match verdict {
            Ok(()) => limit.used += len,
            Err(Reason::DropQuotaExceeded) => limit.quota_dropped += 1,
            Err(_) => limit.rate_dropped += 1,
        }
        // Only over an entry still there: a client no longer limited
        // stays so.
        let _ = self.map.insert(k, limit, crate::flows::BPF_EXIST);
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_bits_per_second_like_tc() {
        for (text, bytes, shown) in [
            ("50mbit", 6_250_000, "50mbit"),
            ("50Mbit/s", 6_250_000, "50mbit"),
            ("1gbit", 125_000_000, "1gbit"),
            ("800kbit/s", 100_000, "800kbit"),
            ("8bit", 1, "8bit"),
        ] {
            let r: Rate = text.parse().unwrap();
            assert_eq!(r.bytes_per_sec, bytes, "{text}");
            assert_eq!(r.to_string(), shown);
        }
        for bad in ["50", "50mb", "fast", "0mbit", "200gbit", ""] {
            let err = bad.parse::<Rate>().unwrap_err();
            assert!(err.to_string().contains("such as 50mbit"), "{bad}");
        }
    }

    #[test]
    fn a_clients_own_limits_win_and_none_exempts_it() {
        let defaults = FairUse {
            rate: Some("10mbit".parse().unwrap()),
            quota: Some("1GiB".parse().unwrap()),
            ..FairUse::default()
        };
        let own: ClientLimits = toml::from_str("rate = \"50mbit\"\nquota = \"none\"\n").unwrap();
        let e = defaults.for_client(&own);
        assert_eq!(e.rate, Some("50mbit".parse().unwrap()));
        assert_eq!(e.quota, None);
        let e = defaults.for_client(&ClientLimits::default());
        assert_eq!(e.rate, defaults.rate);
        assert_eq!(e.quota, defaults.quota);
        assert_eq!(
            toml::to_string(&own).unwrap(),
            "rate = \"50mbit\"\nquota = \"none\"\n"
        );
    }
}
