//! The egress policy for IPv6: which IPv6 destinations a client may reach
//! through the gateway. By default the public internet only: the
//! special-purpose ranges below (RFC 6890's IPv6 registry) and the
//! gateway's own addresses are refused; `--allow` opens an IPv6 prefix
//! (a `--deny` still wins), `--deny` closes one.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::Ipv6Net;

use crate::{
    net::Ipv4Net,
    policy::{EgressPolicy, Policy, Refusal},
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

/// The IPv4 address a destination in NAT64's well-known prefix
/// (`64:ff9b::/96`, RFC 6052 §2.1) stands for: a NAT64 on the gateway's
/// network sends what is addressed there to it.
pub fn nat64_embedded(dst: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(dst);
    (bits & !u128::from(u32::MAX) == NAT64_PREFIX).then(|| Ipv4Addr::from(bits as u32))
}

/// `64:ff9b::/96`, as bits.
const NAT64_PREFIX: u128 = 0x0064_ff9b << 96;

/// The IPv4 policy's verdict on the address a NAT64 destination stands
/// for (nothing to say of any other destination), as an IPv6 refusal: a
/// private range, the cloud's metadata address, a `--deny` or the gateway
/// itself is as closed behind `64:ff9b::` as it is over IPv4, where a
/// NAT64 on the gateway's network would carry it. A range is named by its
/// place in the prefix (`10.0.0.0/8` as `64:ff9b::a00:0/104`).
pub fn check_nat64(ipv4: &EgressPolicy, dst: Ipv6Addr) -> Result<(), Refusal6> {
    let Some(addr) = nat64_embedded(dst) else {
        return Ok(());
    };
    let within = |net: Ipv4Net| {
        let addr = Ipv6Addr::from(NAT64_PREFIX | u128::from(u32::from(net.addr())));
        Ipv6Net::new(addr, 96 + net.prefix()).expect("at most 128 bits")
    };
    ipv4.check(addr).map_err(|refusal| match refusal {
        Refusal::Gateway => Refusal::Gateway,
        Refusal::OtherClient => Refusal::OtherClient,
        Refusal::Default { net, why } => Refusal::Default {
            net: within(net),
            why,
        },
        Refusal::Configured(net) => Refusal::Configured(within(net)),
    })
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

    /// What the IPv4 policy refuses stays refused behind NAT64's
    /// well-known prefix, where a NAT64 on the gateway's network would
    /// carry it; the rest of the prefix is the IPv4 internet, allowed.
    #[test]
    fn nat64_addresses_are_held_to_the_ipv4_policy() {
        let ipv4 = EgressPolicy::new(
            vec![Ipv4Addr::new(198, 18, 0, 1)],
            "10.77.0.0/16".parse().unwrap(),
            false,
            vec![],
            vec!["203.0.113.0/24".parse().unwrap()],
        );
        assert_eq!(check_nat64(&ipv4, ip("64:ff9b::c000:201")), Ok(()));
        assert_eq!(check_nat64(&ipv4, ip("2001:2::2")), Ok(()));
        let refused = |a| check_nat64(&ipv4, ip(a)).unwrap_err();
        assert!(matches!(
            refused("64:ff9b::a00:5"),
            Refusal6::Default { net, .. } if net == "64:ff9b::a00:0/104".parse().unwrap()
        ));
        assert!(matches!(
            refused("64:ff9b::a9fe:a9fe"),
            Refusal6::Default { .. }
        ));
        assert!(matches!(
            refused("64:ff9b::7f00:1"),
            Refusal6::Default { .. }
        ));
        assert_eq!(
            refused("64:ff9b::cb00:7107"),
            Refusal6::Configured("64:ff9b::cb00:7100/120".parse().unwrap())
        );
        assert_eq!(refused("64:ff9b::c612:1"), Refusal6::Gateway);
        assert_eq!(refused("64:ff9b::a4d:9"), Refusal6::OtherClient);
        assert_eq!(nat64_embedded(ip("64:ff9b:1::a00:5")), None);
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
