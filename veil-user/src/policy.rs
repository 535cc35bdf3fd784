//! The egress policy: which destinations a client may reach through the
//! gateway. By default the public internet only. The rules are one
//! generic over the address family; [`crate::policy6`] has IPv6's defaults.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use ipnet::Ipv6Net;

use crate::net::Ipv4Net;

/// Ranges refused by default, with why (RFC 6890 and friends).
const DEFAULT_DENY: &[(&str, &str)] = &[
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared address space (RFC 6598)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved and broadcast"),
];

/// A prefix of one address family, as the policy uses it: the same rules
/// apply to IPv4 and IPv6, over different types.
pub trait Net: Copy + fmt::Display + fmt::Debug + PartialEq + FromStr<Err: fmt::Debug> {
    type Addr: Copy + PartialEq;

    fn has(&self, addr: Self::Addr) -> bool;
}

impl Net for Ipv4Net {
    type Addr = Ipv4Addr;

    fn has(&self, addr: Ipv4Addr) -> bool {
        self.contains(addr)
    }
}

impl Net for Ipv6Net {
    type Addr = Ipv6Addr;

    fn has(&self, addr: Ipv6Addr) -> bool {
        self.contains(&addr)
    }
}

/// Why a destination is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal<N = Ipv4Net> {
    /// One of the gateway's own addresses.
    Gateway,
    /// Another client (the address pool), without
    /// `--allow-client-to-client`.
    OtherClient,
    /// A default-denied range.
    Default { net: N, why: &'static str },
    /// A `--deny` range.
    Configured(N),
}

impl<N: fmt::Display> fmt::Display for Refusal<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Gateway => f.write_str("the gateway itself"),
            Refusal::OtherClient => f.write_str("another client"),
            Refusal::Default { net, why } => write!(f, "{net}, {why}"),
            Refusal::Configured(net) => write!(f, "{net}, denied by configuration"),
        }
    }
}

/// Which destinations of one address family clients may reach.
#[derive(Clone, Debug)]
pub struct Policy<N: Net> {
    gateway: Vec<N::Addr>,
    pool: Option<N>,
    client_to_client: bool,
    allow: Vec<N>,
    deny: Vec<N>,
    defaults: Vec<(N, &'static str)>,
}

/// The IPv4 egress policy.
pub type EgressPolicy = Policy<Ipv4Net>;

impl<N: Net> Policy<N> {
    /// `gateway`: the gateway's own addresses (never reachable through
    /// it); `pool`: the clients' addresses. `allow` opens ranges the
    /// defaults close (a `--deny` still wins); `deny` closes more.
    pub(crate) fn with_defaults(
        gateway: Vec<N::Addr>,
        pool: Option<N>,
        client_to_client: bool,
        allow: Vec<N>,
        deny: Vec<N>,
        defaults: &[(&str, &'static str)],
    ) -> Self {
        let defaults = defaults
            .iter()
            .map(|(net, why)| (net.parse().expect("valid built-in range"), *why))
            .collect();
        Self {
            gateway,
            pool,
            client_to_client,
            allow,
            deny,
            defaults,
        }
    }

    pub fn check(&self, dst: N::Addr) -> Result<(), Refusal<N>> {
        if self.gateway.contains(&dst) {
            return Err(Refusal::Gateway);
        }
        if let Some(net) = self.deny.iter().find(|n| n.has(dst)) {
            return Err(Refusal::Configured(*net));
        }
        if self.pool.is_some_and(|p| p.has(dst)) {
            return if self.client_to_client {
                Ok(())
            } else {
                Err(Refusal::OtherClient)
            };
        }
        if self.allow.iter().any(|n| n.has(dst)) {
            return Ok(());
        }
        match self.defaults.iter().find(|(n, _)| n.has(dst)) {
            Some((net, why)) => Err(Refusal::Default { net: *net, why }),
            None => Ok(()),
        }
    }
}

impl EgressPolicy {
    pub fn new(
        gateway: Vec<Ipv4Addr>,
        pool: Ipv4Net,
        client_to_client: bool,
        allow: Vec<Ipv4Net>,
        deny: Vec<Ipv4Net>,
    ) -> Self {
        Self::with_defaults(
            gateway,
            Some(pool),
            client_to_client,
            allow,
            deny,
            DEFAULT_DENY,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str], c2c: bool) -> EgressPolicy {
        EgressPolicy::new(
            vec![Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(10, 77, 0, 1)],
            "10.77.0.0/16".parse().unwrap(),
            c2c,
            allow.iter().map(|s| s.parse().unwrap()).collect(),
            deny.iter().map(|s| s.parse().unwrap()).collect(),
        )
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn the_public_internet_is_allowed_by_default() {
        let p = policy(&[], &[], false);
        for a in ["1.1.1.1", "198.18.0.2", "8.8.8.8", "203.0.113.9"] {
            assert_eq!(p.check(ip(a)), Ok(()), "{a}");
        }
    }

    #[test]
    fn private_and_special_ranges_are_refused_by_default() {
        let p = policy(&[], &[], false);
        for a in [
            "10.200.0.5",
            "172.20.1.1",
            "192.168.1.1",
            "100.64.0.1",
            "127.0.0.1",
            "169.254.169.254",
            "224.0.0.251",
            "255.255.255.255",
            "0.1.2.3",
        ] {
            assert!(
                matches!(p.check(ip(a)), Err(Refusal::Default { .. })),
                "{a}"
            );
        }
    }

    #[test]
    fn clients_and_the_gateway_are_out_of_reach() {
        let p = policy(&["10.0.0.0/8"], &[], false);
        assert_eq!(p.check(ip("10.77.0.3")), Err(Refusal::OtherClient));
        assert_eq!(p.check(ip("198.18.0.1")), Err(Refusal::Gateway));
        assert_eq!(p.check(ip("10.77.0.1")), Err(Refusal::Gateway));
        let open = policy(&[], &[], true);
        assert_eq!(open.check(ip("10.77.0.3")), Ok(()));
        assert_eq!(open.check(ip("10.77.0.1")), Err(Refusal::Gateway));
    }

    #[test]
    fn allow_opens_and_deny_closes() {
        let p = policy(
            &["10.200.0.0/16"],
            &["198.51.100.0/24", "10.200.9.0/24"],
            false,
        );
        assert_eq!(p.check(ip("10.200.0.5")), Ok(()));
        assert!(matches!(
            p.check(ip("10.200.9.1")),
            Err(Refusal::Configured(_))
        ));
        assert!(matches!(
            p.check(ip("198.51.100.7")),
            Err(Refusal::Configured(_))
        ));
        assert_eq!(
            p.check(ip("198.51.100.7")).unwrap_err().to_string(),
            "198.51.100.0/24, denied by configuration"
        );
    }
}
