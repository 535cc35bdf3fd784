//! Routing policy: the tunnel's routes live in a table of their own
//! ([`TABLE`]), consulted by an `ip rule` ahead of `main`. Routes in
//! `main` — however specific, a DHCP server's option 121 (TunnelVision)
//! or a local network that claims a public range (TunnelCrack's LocalNet)
//! — are never consulted for traffic the tunnel claims. Only the gateway
//! itself is looked up in `main` (every endpoint of the profile, so that
//! failover reaches the next one), so the tunnel's own connection follows
//! whatever uplink the machine has now, and `--allow-lan`'s private,
//! directly connected networks.
//!
//! WireGuard's wg-quick adds a rule that lets `main` win for everything
//! but its default route (`suppress_prefixlength 0`), which is exactly
//! what TunnelVision exploits; veil has none.
//!
//! ```text
//! 7670: to GATEWAY lookup main         the tunnel's connection: the uplink
//!                                      (one rule per endpoint address, in
//!                                      its family's rules: `ip -6 rule`)
//! 7671: to GATEWAY unreachable         ...and no uplink: fail at once
//!                                      (one per endpoint address)
//! 7672: to LAN lookup main             --allow-lan, private subnets only
//!                                      (IPv4 and IPv6)
//! 7672: to fe80::/10, ff00::/8         IPv6 link-local and multicast: the
//!       lookup main                    uplink's neighbour discovery, never
//!                                      the tunnel's (the kill switch still
//!                                      decides what leaves)
//! 7673: lookup 7670                    everything the tunnel claims
//!                                      (IPv4 and IPv6 each)
//! ```
//!
//! IPv6 reaches the tunnel's table too: without an IPv6 address from the
//! gateway it holds no IPv6 route and the kill switch drops IPv6; with one
//! it holds `::/1` and `8000::/1` through the tunnel.

use std::net::IpAddr;

use crate::{routes::ip, uplink::Lan};
use anyhow::Result;
use tracing::warn;

/// The routing table that holds the tunnel's routes.
pub const TABLE: u32 = 7670;
const PRIO_GATEWAY: u32 = 7670;
const PRIO_GATEWAY_ONLY: u32 = 7671;
const PRIO_LAN: u32 = 7672;
const PRIO_TUNNEL: u32 = 7673;
const PRIORITIES: [u32; 4] = [PRIO_GATEWAY, PRIO_GATEWAY_ONLY, PRIO_LAN, PRIO_TUNNEL];

/// The rules while they are in force; dropping this deletes them.
pub struct Rules {
    /// `ip rule add` arguments of each rule in force.
    added: Vec<Vec<String>>,
    /// `--allow-lan`'s networks in force, as `(family, "ADDR/LEN")`.
    lan: Vec<(Family, String)>,
}

impl Rules {
    /// Clears what an earlier run left (a `kill -9` leaves its rules),
    /// then installs the rules for `gateways` (every endpoint's address,
    /// in the profile's order) and `lan`.
    pub fn install(gateways: &[IpAddr], lan: &Lan) -> Result<Self> {
        clear();
        let mut rules = Rules {
            added: Vec::new(),
            lan: Vec::new(),
        };
        // Two endpoints may share an address (other ports): one rule.
        let mut seen = Vec::new();
        for gateway in gateways {
            if seen.contains(gateway) {
                continue;
            }
            seen.push(*gateway);
            let (family, gw) = match gateway {
                IpAddr::V4(v4) => (Family::V4, format!("{v4}/32")),
                IpAddr::V6(v6) => (Family::V6, format!("{v6}/128")),
            };
            rules.add(family, &["to", &gw, "lookup", "main"], PRIO_GATEWAY)?;
            rules.add(family, &["to", &gw, "unreachable"], PRIO_GATEWAY_ONLY)?;
        }
        let table = TABLE.to_string();
        rules.add(Family::V4, &["lookup", &table], PRIO_TUNNEL)?;
        // A kernel without IPv6 has no IPv6 to route (or leak).
        if let Err(e) = rules.add(Family::V6, &["lookup", &table], PRIO_TUNNEL) {
            warn!("no IPv6 routing rule ({e:#}): IPv6 stays blocked");
        }
        // The tunnel's ::/1 and 8000::/1 would cover these too.
        for link in LINK_SCOPE6 {
            if let Err(e) = rules.add(Family::V6, &["to", link, "lookup", "main"], PRIO_LAN) {
                warn!("no IPv6 link-scope rule ({e:#})");
            }
        }
        rules.set_lan(lan)?;
        Ok(rules)
    }

    /// Lets `lan` bypass the tunnel instead of the networks before.
    pub fn set_lan(&mut self, lan: &Lan) -> Result<()> {
        let v4 = lan.v4.iter().map(|n| (Family::V4, n.to_string()));
        let v6 = lan.v6.iter().map(|(a, p)| (Family::V6, format!("{a}/{p}")));
        let wanted: Vec<(Family, String)> = v4.chain(v6).collect();
        if self.lan == wanted {
            return Ok(());
        }
        for (family, to) in std::mem::take(&mut self.lan) {
            self.remove(family, &["to", &to, "lookup", "main"], PRIO_LAN);
        }
        for (family, to) in wanted {
            self.add(family, &["to", &to, "lookup", "main"], PRIO_LAN)?;
            self.lan.push((family, to));
        }
        Ok(())
    }

    fn add(&mut self, family: Family, selector: &[&str], priority: u32) -> Result<()> {
        let args = rule(family, "add", selector, priority);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ip(&refs)?;
        self.added.push(args);
        Ok(())
    }

    fn remove(&mut self, family: Family, selector: &[&str], priority: u32) {
        let args = rule(family, "add", selector, priority);
        self.added.retain(|a| *a != args);
        delete(args);
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        for args in std::mem::take(&mut self.added).into_iter().rev() {
            delete(args);
        }
    }
}

/// IPv6 that is never the tunnel's: link-local and multicast.
const LINK_SCOPE6: [&str; 2] = ["fe80::/10", "ff00::/8"];

/// Which family's rules: `ip rule` or `ip -6 rule`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

fn rule(family: Family, verb: &str, selector: &[&str], priority: u32) -> Vec<String> {
    let flag = match family {
        Family::V4 => "-4",
        Family::V6 => "-6",
    };
    let mut args = vec![flag.to_owned(), "rule".to_owned(), verb.to_owned()];
    args.extend(selector.iter().map(|s| (*s).to_owned()));
    args.extend(["priority".to_owned(), priority.to_string()]);
    args
}

fn delete(mut args: Vec<String>) {
    args[2] = "del".into();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    if let Err(e) = ip(&refs) {
        warn!("restoring routing rules: {e:#}");
    }
}

/// Deletes every rule at veil's priorities and the routes in its table:
/// what a client killed with SIGKILL left (`--unlock`, and each start).
pub fn clear() {
    for family in ["-4", "-6"] {
        for priority in PRIORITIES {
            let p = priority.to_string();
            // One rule per call; a bound in case deletion keeps "succeeding".
            for _ in 0..1024 {
                if ip(&[family, "rule", "del", "priority", &p]).is_err() {
                    break;
                }
            }
        }
        let _ = ip(&[family, "route", "flush", "table", &TABLE.to_string()]);
    }
}
