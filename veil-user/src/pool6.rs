//! The clients' IPv6 addresses (`--pool6`): a prefix whose low 32 bits
//! are each client's IPv4 lease, so a client's IPv6 address is as stable
//! as its IPv4 one and needs no lease file of its own. With the default
//! prefix, `10.77.0.2` gets `fd00:7665:696c::a4d:2`.
//!
//! The default is one fixed unique-local prefix, `fd00:7665:696c::/64`
//! ("veil" in its bytes), the same on every gateway: the address never
//! leaves the tunnel (the datapath translates it to the gateway's public
//! IPv6 address), so RFC 4193's random Global ID, which keeps sites that
//! merge their networks apart, buys nothing here, while a fixed one is the
//! same in every profile, log and test. `none` carries no IPv6: clients
//! get no IPv6 address and keep IPv6 blocked.

use std::{fmt, net::Ipv4Addr, net::Ipv6Addr, str::FromStr};

/// The `--pool6` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool6 {
    /// No IPv6 through the tunnel.
    Off,
    /// Clients' addresses are this prefix plus their IPv4 lease.
    Prefix { addr: Ipv6Addr, len: u8 },
}

/// The longest prefix that still leaves 32 bits for the IPv4 lease.
pub const MAX_PREFIX: u8 = 96;

impl Pool6 {
    /// `fd00:7665:696c::/64`.
    pub const DEFAULT: Pool6 = Pool6::Prefix {
        addr: Ipv6Addr::new(0xfd00, 0x7665, 0x696c, 0, 0, 0, 0, 0),
        len: 64,
    };

    /// The IPv6 address of the client (or the gateway) whose IPv4 address
    /// in the pool is `v4`; `None` when IPv6 is off.
    pub fn address_for(&self, v4: Ipv4Addr) -> Option<Ipv6Addr> {
        match *self {
            Pool6::Off => None,
            Pool6::Prefix { addr, .. } => Some(Ipv6Addr::from_bits(
                addr.to_bits() | u128::from(v4.to_bits()),
            )),
        }
    }

    /// Whether `ip` is in the pool.
    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        match *self {
            Pool6::Off => false,
            Pool6::Prefix { addr, len } => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                ip.to_bits() & mask == addr.to_bits()
            }
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Pool6Error {
    #[error("`{0}` is not an IPv6 prefix: expected ADDRESS/PREFIX, such as fd00:7665:696c::/64, or `none`")]
    Syntax(String),
    #[error("the IPv6 pool's prefix must be at most /{MAX_PREFIX} (its last 32 bits are each client's IPv4 lease), not /{0}")]
    TooLong(u8),
    #[error("{0} has bits set past its prefix length")]
    HostBits(String),
    #[error(
        "{0} cannot hold clients' addresses (multicast, loopback, link-local, or IPv4-mapped)"
    )]
    Unusable(String),
}

impl FromStr for Pool6 {
    type Err = Pool6Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if matches!(s, "none" | "off") {
            return Ok(Pool6::Off);
        }
        let syntax = || Pool6Error::Syntax(s.to_owned());
        let (addr, len) = s.split_once('/').ok_or_else(syntax)?;
        let addr: Ipv6Addr = addr.parse().map_err(|_| syntax())?;
        let len: u8 = len.parse().map_err(|_| syntax())?;
        if len > MAX_PREFIX {
            return Err(Pool6Error::TooLong(len));
        }
        let host = u128::MAX.checked_shr(u32::from(len)).unwrap_or(0);
        if addr.to_bits() & host != 0 {
            return Err(Pool6Error::HostBits(s.to_owned()));
        }
        if addr.is_multicast()
            || addr.is_unspecified()
            || addr.is_loopback()
            || addr.is_unicast_link_local()
            || addr.to_ipv4_mapped().is_some()
        {
            return Err(Pool6Error::Unusable(s.to_owned()));
        }
        Ok(Pool6::Prefix { addr, len })
    }
}

impl fmt::Display for Pool6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pool6::Off => f.write_str("none"),
            Pool6::Prefix { addr, len } => write!(f, "{addr}/{len}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clients_ipv6_address_follows_its_ipv4_lease() {
        let vip = Ipv4Addr::new(10, 77, 0, 2);
        let v6 = Pool6::DEFAULT.address_for(vip).unwrap();
        assert_eq!(v6, "fd00:7665:696c::a4d:2".parse::<Ipv6Addr>().unwrap());
        assert!(Pool6::DEFAULT.contains(v6));
        assert!(!Pool6::DEFAULT.contains("fd00:7665:696d::1".parse().unwrap()));
        assert_eq!(Pool6::Off.address_for(vip), None);
        let narrow: Pool6 = "2001:db8:1:2::/96".parse().unwrap();
        assert_eq!(
            narrow.address_for(vip),
            Some("2001:db8:1:2::a4d:2".parse().unwrap())
        );
    }

    #[test]
    fn parses_what_it_prints_and_refuses_the_rest() {
        for text in ["fd00:7665:696c::/64", "none", "2001:db8::/32"] {
            let pool: Pool6 = text.parse().unwrap();
            assert_eq!(pool.to_string(), text);
        }
        assert_eq!("off".parse(), Ok(Pool6::Off));
        assert_eq!("fd00::/112".parse::<Pool6>(), Err(Pool6Error::TooLong(112)));
        assert!(matches!(
            "fd00::1/64".parse::<Pool6>(),
            Err(Pool6Error::HostBits(_))
        ));
        for bad in ["ff02::/64", "fe80::/64", "::/64", "::ffff:0:0/96"] {
            assert!(
                matches!(bad.parse::<Pool6>(), Err(Pool6Error::Unusable(_))),
                "{bad}"
            );
        }
        for bad in ["fd00::", "10.0.0.0/8", "fd00::/x", ""] {
            assert!(
                matches!(bad.parse::<Pool6>(), Err(Pool6Error::Syntax(_))),
                "{bad}"
            );
        }
    }
}
