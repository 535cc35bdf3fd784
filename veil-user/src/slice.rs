//! `--pool-slice I/N`: gateways that share one configuration each take
//! their own part of the address pool, so that no two of them hand a
//! client the same address (a client's address says which gateway it is
//! on, and logs of the gateways never mix two clients up).

use std::{fmt, str::FromStr};

use crate::net::Ipv4Net;

/// Part `index` (0-based) of the pool cut into `count` equal parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSlice {
    pub index: u32,
    pub count: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SliceError {
    #[error("`{0}` is not a pool slice: write I/N, e.g. 0/2 and 1/2 for two gateways (N a power of two, I below N)")]
    Syntax(String),
    #[error("the pool {pool} cut into {count} parts leaves each fewer than 4 addresses: use a larger --pool")]
    TooSmall { pool: Ipv4Net, count: u32 },
}

impl FromStr for PoolSlice {
    type Err = SliceError;

    fn from_str(s: &str) -> Result<Self, SliceError> {
        let bad = || SliceError::Syntax(s.to_owned());
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (u32, u32) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if !count.is_power_of_two() || index >= count || count > 1 << 16 {
            return Err(bad());
        }
        Ok(PoolSlice { index, count })
    }
}

impl fmt::Display for PoolSlice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl PoolSlice {
    /// This slice of `pool`: a prefix `log2(count)` bits longer.
    pub fn of(&self, pool: Ipv4Net) -> Result<Ipv4Net, SliceError> {
        let bits = self.count.trailing_zeros() as u8;
        let prefix = pool.prefix() + bits;
        if prefix > 30 {
            return Err(SliceError::TooSmall {
                pool,
                count: self.count,
            });
        }
        let size = 1u32 << (32 - prefix);
        let base = pool.addr().to_bits() & u32::from(pool.mask());
        let addr = std::net::Ipv4Addr::from_bits(base + self.index * size);
        Ok(Ipv4Net::new(addr, prefix).expect("a valid prefix"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cut_the_pool_into_disjoint_parts() {
        let pool: Ipv4Net = "10.77.0.0/16".parse().unwrap();
        let parts: Vec<String> = (0..4)
            .map(|i| {
                PoolSlice { index: i, count: 4 }
                    .of(pool)
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            parts,
            [
                "10.77.0.0/18",
                "10.77.64.0/18",
                "10.77.128.0/18",
                "10.77.192.0/18"
            ]
        );
        let whole = "0/1".parse::<PoolSlice>().unwrap().of(pool).unwrap();
        assert_eq!(whole, pool);
    }

    #[test]
    fn bad_slices_are_refused_with_the_syntax() {
        for bad in ["1/1", "2/2", "0/3", "x/2", "1", "-1/2"] {
            let err = bad.parse::<PoolSlice>().unwrap_err();
            assert!(err.to_string().contains("I/N"), "{bad}: {err}");
        }
        let tiny: Ipv4Net = "10.77.0.0/29".parse().unwrap();
        assert!(matches!(
            "1/4".parse::<PoolSlice>().unwrap().of(tiny),
            Err(SliceError::TooSmall { .. })
        ));
    }
}
