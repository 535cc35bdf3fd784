//! The kill switch: an nftables table of veil's own (`inet veil`) that
//! lets nothing leave the machine except through the TUN device or to the
//! gateway's endpoints (TCP and UDP to each address and port of the profile, so
//! that failing over to the next needs no change). It is installed before the first connection and
//! stays through every reconnect, so a tunnel that is down, or not up
//! yet, fails closed instead of letting traffic out the uplink.
//!
//! One table, replaced whole in one nft transaction: installing it again
//! (a new LAN after a network change, a client started after a crash)
//! never opens a gap, and removing it restores exactly what was there
//! before, since nothing outside the table is touched. IPv6 follows the
//! same rule while the tunnel claims all traffic: through the TUN device
//! when the gateway assigned an IPv6 address (the client then routes
//! IPv6 into the tunnel), dropped otherwise, so a dual-stack host behind
//! an IPv4-only gateway loses IPv6 rather than leaking it, and gets it
//! back when the table goes.
//!
//! Only the output and forward hooks are filtered: what leaves is what
//! leaks. Packets the kernel sends for the host (TCP resets, ICMP errors,
//! neighbour discovery) go through the output hook too. ARP is not seen
//! by `inet` tables and stays allowed: it is needed to reach the next hop
//! toward the gateway and tells the local segment only what it already
//! knows. Its IPv6 counterpart, neighbour discovery, is ICMPv6 and so is
//! let through explicitly (hop limit 255: it never leaves the link) when
//! an endpoint is an IPv6 address.

use std::{
    io::Write,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    process::{Command, Stdio},
};

use tracing::{info, warn};
use veil_tunnel::net::Ipv4Net;

use crate::uplink::Lan;

/// The table's name in the `inet` family.
pub const TABLE: &str = "veil";
/// The table's comment when it is to outlive the client.
const LOCKDOWN: &str = "veil-client lockdown";
const TRANSIENT: &str = "veil-client";

/// What the kill switch lets out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The TUN device: everything may leave through it.
    pub tun: String,
    /// The gateway's endpoints (TCP and UDP), every address of every one
    /// of the profile's, either family: the tunnel itself, wherever it
    /// fails over to.
    pub endpoints: Vec<SocketAddr>,
    /// `None`: the tunnel claims everything (IPv6 included, which is
    /// dropped). Otherwise only these ranges must not leave outside it.
    pub ranges: Option<Vec<Ipv4Net>>,
    /// `--allow-lan`: the uplink's private, directly connected networks.
    pub lan: Option<Lan>,
    /// `--lockdown`: the table stays after the client exits.
    pub lockdown: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "nft is not installed: install nftables (`apt-get install nftables`); \
         veil-client's kill switch and redirect rules need it"
    )]
    Missing(#[source] std::io::Error),
    #[error("running nft")]
    Run(#[source] std::io::Error),
    #[error("nft refused the rules ({0}): is this kernel built with nf_tables?")]
    Refused(String),
}

/// The kill switch while it is installed. Dropping it removes the table,
/// unless it is to stay (`--lockdown`, now or left by an earlier run).
pub struct Firewall {
    policy: Policy,
    keep: bool,
}

impl Firewall {
    /// Installs `policy`, atomically replacing any table an earlier run
    /// left behind. A lockdown left by an earlier run stays a lockdown.
    pub fn install(policy: Policy) -> Result<Self, Error> {
        let inherited = matches!(current()?, Some(comment) if comment == LOCKDOWN);
        let keep = policy.lockdown || inherited;
        let fw = Firewall { policy, keep };
        nft(&ruleset(&fw.policy, keep))?;
        if inherited && !fw.policy.lockdown {
            info!("a lockdown from an earlier run is in force: it stays after this client exits, until `veil-client --unlock`");
        }
        Ok(fw)
    }

    /// Lets a new LAN through (`--allow-lan` after a network change).
    pub fn set_lan(&mut self, lan: Option<Lan>) -> Result<(), Error> {
        if self.policy.lan == lan {
            return Ok(());
        }
        self.policy.lan = lan;
        nft(&ruleset(&self.policy, self.keep))
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        if self.keep {
            info!("lockdown: nothing leaves outside the tunnel until `veil-client --unlock`");
            return;
        }
        match remove() {
            Ok(_) => info!("kill switch removed"),
            Err(e) => warn!("removing the kill switch: {e}: `veil-client --unlock` removes it"),
        }
    }
}

/// Removes the table, whoever left it: whether there was one.
pub fn remove() -> Result<bool, Error> {
    let existed = current()?.is_some();
    // Declaring the table first makes the deletion succeed either way.
    nft(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n"))?;
    Ok(existed)
}

/// The comment of the table in force, if there is one.
fn current() -> Result<Option<String>, Error> {
    let out = Command::new("nft")
        .args(["list", "table", "inet", TABLE])
        .output()
        .map_err(spawn_error)?;
    if !out.status.success() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(Some(
        text.lines()
            .find_map(|l| l.trim().strip_prefix("comment \""))
            .map(|c| c.trim_end_matches('"').to_owned())
            .unwrap_or_default(),
    ))
}

fn spawn_error(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::Missing(e)
    } else {
        Error::Run(e)
    }
}

/// Runs `nft -f -` with `script`: one transaction, all or nothing.
pub(crate) fn nft(script: &str) -> Result<(), Error> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(Error::Run)?;
    let out = child.wait_with_output().map_err(Error::Run)?;
    if !out.status.success() {
        return Err(Error::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

/// The whole table, as one `nft -f` script that replaces any earlier one.
pub fn ruleset(policy: &Policy, keep: bool) -> String {
    let tun = &policy.tun;
    let mut allow = vec![format!("oifname \"{tun}\" accept")];
    // One rule per endpoint (each its own address and port), in the
    // profile's order; the same endpoint twice is one rule.
    // TCP for TLS, UDP for HTTP/3 (QUIC), at the same port.
    for endpoint in &policy.endpoints {
        let family = match endpoint {
            SocketAddr::V4(_) => "ip",
            SocketAddr::V6(_) => "ip6",
        };
        let rule = format!(
            "{family} daddr {} meta l4proto {{ tcp, udp }} th dport {} accept",
            endpoint.ip(),
            endpoint.port()
        );
        if !allow.contains(&rule) {
            allow.push(rule);
        }
    }
    if policy.endpoints.iter().any(SocketAddr::is_ipv6) {
        // The next hop toward an IPv6 gateway is found, and answers, with
        // neighbour discovery: link-local by its hop limit.
        allow.push(
            "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } \
             ip6 hoplimit 255 accept"
                .into(),
        );
    }
    if let Some(lan) = &policy.lan {
        if !lan.v4.is_empty() {
            allow.push(format!("ip daddr {} accept", set(&lan.v4)));
        }
        let mut v6: Vec<String> = lan.v6.iter().map(|(a, p)| format!("{a}/{p}")).collect();
        if policy.ranges.is_none() {
            // Link-local IPv6, neighbour discovery included: the LAN's
            // printers and file shares, never the internet.
            v6.extend(["fe80::/10".into(), "ff02::/16".into()]);
        }
        if !v6.is_empty() {
            allow.push(format!("ip6 daddr {} accept", set(&v6)));
        }
    }
    let (policy_verdict, last) = match &policy.ranges {
        // Everything else is dropped by the chains' policy, IPv6 too.
        None => {
            // The uplink's DHCP lease is renewed (client port 68 to server
            // port 67): without it the machine would lose its address,
            // and with it the way to the gateway.
            allow.insert(1, "oifname \"lo\" accept".into());
            allow.push("udp sport 68 udp dport 67 accept".into());
            ("drop", None)
        }
        Some(ranges) => ("accept", Some(format!("ip daddr {} drop", set(ranges)))),
    };
    let comment = if keep { LOCKDOWN } else { TRANSIENT };
    let mut out = format!(
        "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n\tcomment \"{comment}\"\n"
    );
    for (chain, extra) in [
        ("output", None),
        // A machine that routes for others (containers, VMs) gets the
        // same: their traffic leaves through the tunnel or not at all.
        ("forward", Some(format!("iifname \"{tun}\" accept"))),
    ] {
        out.push_str(&format!(
            "\tchain {chain} {{\n\t\ttype filter hook {chain} priority filter; policy {policy_verdict};\n"
        ));
        for rule in extra.iter().chain(&allow).chain(&last) {
            out.push_str(&format!("\t\t{rule}\n"));
        }
        out.push_str("\t}\n");
    }
    out.push_str("}\n");
    out
}

fn set<T: ToString>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(T::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

/// Whether `net` lies inside one of the private IPv4 ranges a LAN uses
/// (RFC 1918 and link-local): a "local network" that claims a public
/// range is no LAN (TunnelCrack's LocalNet attack).
pub fn private_v4(net: &Ipv4Net) -> bool {
    const PRIVATE: [(Ipv4Addr, u8); 4] = [
        (Ipv4Addr::new(10, 0, 0, 0), 8),
        (Ipv4Addr::new(172, 16, 0, 0), 12),
        (Ipv4Addr::new(192, 168, 0, 0), 16),
        (Ipv4Addr::new(169, 254, 0, 0), 16),
    ];
    PRIVATE.iter().any(|&(addr, prefix)| {
        net.prefix() >= prefix
            && Ipv4Net::new(addr, prefix).is_ok_and(|range| range.contains(net.addr()))
    })
}

/// The IPv6 counterpart: unique local (fc00::/7) and link-local networks.
pub fn private_v6(addr: Ipv6Addr, prefix: u8) -> bool {
    (addr.is_unique_local() && prefix >= 7) || (addr.is_unicast_link_local() && prefix >= 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            tun: "veil0".into(),
            endpoints: vec!["192.0.2.1:443".parse().unwrap()],
            ranges: None,
            lan: None,
            lockdown: false,
        }
    }

    #[test]
    fn full_tunnel_drops_everything_else_ipv6_included() {
        let text = ruleset(&policy(), false);
        assert!(text.starts_with(
            "table inet veil\ndelete table inet veil\ntable inet veil {\n\tcomment \"veil-client\"\n"
        ));
        let output = "\tchain output {\n\
            \t\ttype filter hook output priority filter; policy drop;\n\
            \t\toifname \"veil0\" accept\n\
            \t\toifname \"lo\" accept\n\
            \t\tip daddr 192.0.2.1 meta l4proto { tcp, udp } th dport 443 accept\n\
            \t\tudp sport 68 udp dport 67 accept\n\
            \t}\n";
        assert!(text.contains(output), "{text}");
        assert!(
            text.contains(
                "hook forward priority filter; policy drop;\n\t\tiifname \"veil0\" accept\n"
            ),
            "{text}"
        );
        assert!(!text.contains("ip6"), "no IPv6 exception: {text}");
    }

    #[test]
    fn every_endpoint_is_let_through_for_failover() {
        let mut p = policy();
        p.endpoints = vec![
            "192.0.2.1:443".parse().unwrap(),
            "198.51.100.7:8443".parse().unwrap(),
            "192.0.2.1:443".parse().unwrap(),
        ];
        let text = ruleset(&p, false);
        let output = "\t\toifname \"veil0\" accept\n\
            \t\toifname \"lo\" accept\n\
            \t\tip daddr 192.0.2.1 meta l4proto { tcp, udp } th dport 443 accept\n\
            \t\tip daddr 198.51.100.7 meta l4proto { tcp, udp } th dport 8443 accept\n\
            \t\tudp sport 68 udp dport 67 accept\n";
        assert!(text.contains(output), "{text}");
        assert_eq!(
            text.matches("192.0.2.1 meta l4proto { tcp, udp } th dport 443")
                .count(),
            2,
            "once per chain: {text}"
        );
        // A split tunnel lets them through before its ranges are dropped.
        p.ranges = Some(vec!["198.51.100.0/24".parse().unwrap()]);
        let text = ruleset(&p, false);
        let endpoint = text
            .find("ip daddr 198.51.100.7 meta l4proto { tcp, udp } th dport 8443 accept")
            .unwrap();
        let drop = text.find("ip daddr { 198.51.100.0/24 } drop").unwrap();
        assert!(endpoint < drop, "{text}");
    }

    #[test]
    fn an_ipv6_endpoint_is_let_through_with_neighbour_discovery() {
        let mut p = policy();
        p.endpoints.push("[2001:2::1]:443".parse().unwrap());
        let text = ruleset(&p, false);
        let output = "\t\tip daddr 192.0.2.1 meta l4proto { tcp, udp } th dport 443 accept\n\
            \t\tip6 daddr 2001:2::1 meta l4proto { tcp, udp } th dport 443 accept\n\
            \t\ticmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } ip6 hoplimit 255 accept\n";
        assert!(text.contains(output), "{text}");
        assert!(
            text.contains("policy drop;"),
            "everything else still dropped: {text}"
        );
    }

    #[test]
    fn lockdown_is_marked_in_the_table() {
        assert!(ruleset(&policy(), true).contains("comment \"veil-client lockdown\""));
    }

    #[test]
    fn the_lan_is_allowed_only_when_asked() {
        let mut p = policy();
        p.lan = Some(Lan {
            v4: vec!["10.200.1.0/24".parse().unwrap()],
            v6: vec![("fd00:200:1::".parse().unwrap(), 64)],
        });
        let text = ruleset(&p, false);
        assert!(text.contains("ip daddr { 10.200.1.0/24 } accept"), "{text}");
        assert!(
            text.contains("ip6 daddr { fd00:200:1::/64, fe80::/10, ff02::/16 } accept"),
            "{text}"
        );
    }

    #[test]
    fn split_tunnel_guards_only_its_ranges() {
        let mut p = policy();
        p.ranges = Some(vec!["198.51.100.0/24".parse().unwrap()]);
        let text = ruleset(&p, false);
        assert!(text.contains("policy accept;"), "{text}");
        assert!(!text.contains("policy drop;"), "{text}");
        assert!(
            text.contains("\t\tip daddr { 198.51.100.0/24 } drop\n\t}\n"),
            "the ranges are dropped last, after the exceptions: {text}"
        );
    }

    #[test]
    fn only_private_networks_count_as_a_lan() {
        for lan in [
            "10.200.1.0/24",
            "192.168.1.0/24",
            "172.16.0.0/12",
            "169.254.0.0/16",
        ] {
            assert!(private_v4(&lan.parse().unwrap()), "{lan}");
        }
        for public in [
            "198.18.0.0/24",
            "8.8.8.0/24",
            "172.0.0.0/8",
            "10.0.0.0/7",
            "0.0.0.0/0",
        ] {
            assert!(!private_v4(&public.parse().unwrap()), "{public}");
        }
        assert!(private_v6("fd00:200:1::".parse().unwrap(), 64));
        assert!(private_v6("fe80::".parse().unwrap(), 64));
        assert!(!private_v6("2001:db8::".parse().unwrap(), 64));
        assert!(!private_v6("fc00::".parse().unwrap(), 6));
    }
}
