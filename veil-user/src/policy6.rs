//! The egress policy for IPv6: which IPv6 destinations a client may reach
//! through the gateway. By default the public internet only: the
//! special-purpose ranges below (RFC 6890's IPv6 registry) and the
//! gateway's own addresses are refused; `--allow` opens an IPv6 prefix
//! (a `--deny` still wins), `--deny` closes one.

use std::{fmt, net::Ipv6Addr};

use ipnet::Ipv6Net;

use crate::{
    net::Ipv4Net,
    policy::{Policy, Refusal},
};

/// An `--allow` / `--deny` prefix: IPv4 or IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefix {
    V4(Ipv4Net),
    V6(Ipv6Net),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not an IPv4 or IPv6 prefix: expected ADDRESS/LENGTH, such as 10.20.0.0/16 or 2001:db8::/32")]
pub struct PrefixError(String);

impl std::str::FromStr for Prefix {
    type Err = PrefixError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            let net: Ipv6Net = s.parse().map_err(|_| PrefixError(s.to_owned()))?;
            // As for IPv4: host bits past the prefix are cleared.
            return Ok(Prefix::V6(net.trunc()));
        }
        s.parse()
            .map(Prefix::V4)
            .map_err(|_| PrefixError(s.to_owned()))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Prefix::V4(n) => n.fmt(f),
            Prefix::V6(n) => n.fmt(f),
        }
    }
}

/// The IPv4 prefixes of a list.
pub fn v4_of(list: &[Prefix]) -> Vec<Ipv4Net> {
    list.iter()
        .filter_map(|p| match p {
            Prefix::V4(n) => Some(*n),
            Prefix::V6(_) => None,
        })
        .collect()
}

/// The IPv6 prefixes of a list.
pub fn v6_of(list: &[Prefix]) -> Vec<Ipv6Net> {
    list.iter()
        .filter_map(|p| match p {
            Prefix::V6(n) => Some(*n),
            Prefix::V4(_) => None,
        })
        .collect()
}

/// Ranges refused by default, with why.
const DEFAULT_DENY6: &[(&str, &str)] = &[
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("::/96", "IPv4-compatible (deprecated)"),
    (
        "64:ff9b:1::/48",
        "local-use IPv4/IPv6 translation (RFC 8215)",
    ),
    ("100::/64", "discard-only (RFC 6666)"),
    ("2001:db8::/32", "documentation (RFC 3849)"),
    ("fc00::/7", "unique local (RFC 4193)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
];

/// Why an IPv6 destination is refused.
pub type Refusal6 = Refusal<Ipv6Net>;

/// The IPv6 egress policy: the IPv4 one's rules, except that clients never
/// reach each other over IPv6.
pub type EgressPolicy6 = Policy<Ipv6Net>;

impl EgressPolicy6 {
    /// `gateway`: the gateway's own IPv6 addresses; `pool`: the clients'
    /// prefix.
    pub fn new(
        gateway: Vec<Ipv6Addr>,
        pool: Option<Ipv6Net>,
        allow: Vec<Ipv6Net>,
        deny: Vec<Ipv6Net>,
    ) -> Self {
        Self::with_defaults(gateway, pool, false, allow, deny, DEFAULT_DENY6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy6 {
        EgressPolicy6::new(
            vec![ip("2001:2::1"), ip("fd00:7665:696c::a4d:1")],
            Some("fd00:7665:696c::/64".parse().unwrap()),
            allow.iter().map(|s| s.parse().unwrap()).collect(),
            deny.iter().map(|s| s.parse().unwrap()).collect(),
        )
    }

    #[test]
    fn allow_and_deny_take_either_family() {
        let list: Vec<Prefix> = ["10.20.0.0/16", "fd12::/16", "2001:db8::/32"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(
            v4_of(&list),
            vec!["10.20.0.0/16".parse::<Ipv4Net>().unwrap()]
        );
        assert_eq!(v6_of(&list).len(), 2);
        assert_eq!(list[1].to_string(), "fd12::/16");
        assert_eq!("fd12::1/16".parse::<Prefix>().unwrap(), list[1]);
        for bad in ["fd12::/129", "nonsense", "10.0.0.0/33", "fd12::"] {
            let err = bad.parse::<Prefix>().unwrap_err();
            assert!(err.to_string().contains("prefix"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_public_ipv6_internet_is_allowed_by_default() {
        let p = policy(&[], &[]);
        for a in [
            "2001:2::2",
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
            "64:ff9b::c000:201",
        ] {
            assert_eq!(p.check(ip(a)), Ok(()), "{a}");
        }
    }

    #[test]
    fn special_ranges_are_refused_by_default() {
        let p = policy(&[], &[]);
        for a in [
            "::",
            "::1",
            "::ffff:10.0.0.1",
            "::ffff:8.8.8.8",
            "2001:db8::1",
            "fd12::1",
            "fc00::1",
            "fe80::1",
            "ff02::1",
            "ff0e::fb",
            "100::1",
        ] {
            assert!(
                matches!(p.check(ip(a)), Err(Refusal6::Default { .. })),
                "{a}"
            );
        }
    }

    #[test]
    fn the_gateway_and_other_clients_are_refused() {
        let p = policy(&["fd00::/8"], &[]);
        assert_eq!(p.check(ip("2001:2::1")), Err(Refusal6::Gateway));
        assert_eq!(p.check(ip("fd00:7665:696c::a4d:1")), Err(Refusal6::Gateway));
        assert_eq!(
            p.check(ip("fd00:7665:696c::a4d:3")),
            Err(Refusal6::OtherClient),
            "--allow does not open the pool"
        );
    }

    #[test]
    fn allow_opens_a_default_range_and_deny_wins() {
        let p = policy(&["fd12::/16"], &["fd12:1::/32", "2001:2:0:9::/64"]);
        assert_eq!(p.check(ip("fd12:2::1")), Ok(()));
        assert!(matches!(
            p.check(ip("fd12:1::1")),
            Err(Refusal6::Configured(_))
        ));
        assert!(matches!(
            p.check(ip("2001:2:0:9::5")),
            Err(Refusal6::Configured(_))
        ));
        assert_eq!(p.check(ip("2001:2:0:8::5")), Ok(()));
    }
}
