//! The egress policy: which destinations a client may reach through the
//! gateway. By default the public internet only.

use std::{fmt, net::Ipv4Addr};

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

/// Why a destination is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// One of the gateway's own addresses.
    Gateway,
    /// Another client (the VIP pool), without `--allow-client-to-client`.
    OtherClient,
    /// A default-denied range.
    Default { net: Ipv4Net, why: &'static str },
    /// A `--deny` range.
    Configured(Ipv4Net),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Gateway => f.write_str("the gateway itself"),
            Refusal::OtherClient => f.write_str("another client"),
            Refusal::Default { net, why } => write!(f, "{net}, {why}"),
            Refusal::Configured(net) => write!(f, "{net}, denied by configuration"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct EgressPolicy {
    gateway: Vec<Ipv4Addr>,
    pool: Ipv4Net,
    client_to_client: bool,
    allow: Vec<Ipv4Net>,
    deny: Vec<Ipv4Net>,
    defaults: Vec<(Ipv4Net, &'static str)>,
}

impl EgressPolicy {
    /// `gateway`: the gateway's own addresses (never reachable through it).
    /// `allow` opens ranges the defaults close (a `--deny` still wins);
    /// `deny` closes more.
    pub fn new(
        gateway: Vec<Ipv4Addr>,
        pool: Ipv4Net,
        client_to_client: bool,
        allow: Vec<Ipv4Net>,
        deny: Vec<Ipv4Net>,
    ) -> Self {
        let defaults = DEFAULT_DENY
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

    pub fn check(&self, dst: Ipv4Addr) -> Result<(), Refusal> {
        if self.gateway.contains(&dst) {
            return Err(Refusal::Gateway);
        }
        if let Some(net) = self.deny.iter().find(|n| n.contains(dst)) {
            return Err(Refusal::Configured(*net));
        }
        if self.pool.contains(dst) {
            return if self.client_to_client {
                Ok(())
            } else {
                Err(Refusal::OtherClient)
            };
        }
        if self.allow.iter().any(|n| n.contains(dst)) {
            return Ok(());
        }
        match self.defaults.iter().find(|(n, _)| n.contains(dst)) {
            Some((net, why)) => Err(Refusal::Default { net: *net, why }),
            None => Ok(()),
        }
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
