//! The uplink: the interface and local address the connection to the
//! gateway leaves from, and the local networks directly connected to it.
//! The kernel answers both without sending anything.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    process::Command,
};

use anyhow::{bail, Context, Result};
use veil_tunnel::net::Ipv4Net;

use crate::firewall::{private_v4, private_v6};

/// The uplink's private, directly connected networks (`--allow-lan`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lan {
    pub v4: Vec<Ipv4Net>,
    pub v6: Vec<(Ipv6Addr, u8)>,
}

/// The local address a new connection to `gateway` would leave from now,
/// or `None` while there is no route to it. A connected UDP socket makes
/// the kernel choose, with the routing rules in force; no packet is sent.
pub fn source_for(gateway: SocketAddr) -> Option<IpAddr> {
    let any: IpAddr = match gateway {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind((any, 0)).ok()?;
    socket.connect(gateway).ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}

/// The networks the uplink toward `gateway` is directly connected to
/// (the kernel's own routes for its addresses, not routes a DHCP server
/// pushed), keeping only private ones: a local network that claims a
/// public range is refused, not trusted.
pub fn lan(gateway: Ipv4Addr) -> Result<Lan> {
    let route = ip_json(&["route", "get", &gateway.to_string()])?;
    let dev = route[0]["dev"]
        .as_str()
        .context("ip route get gave no device")?
        .to_owned();
    let mut lan = Lan::default();
    for family in ["-4", "-6"] {
        let routes = ip_json(&[
            family, "route", "show", "table", "main", "dev", &dev, "proto", "kernel",
        ])?;
        for dst in routes
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["dst"].as_str())
        {
            if let Ok(net) = dst.parse::<Ipv4Net>() {
                if private_v4(&net) && !lan.v4.contains(&net) {
                    lan.v4.push(net);
                }
            } else if let Some((addr, prefix)) = dst.split_once('/') {
                if let (Ok(addr), Ok(prefix)) = (addr.parse::<Ipv6Addr>(), prefix.parse::<u8>()) {
                    if private_v6(addr, prefix) && !lan.v6.contains(&(addr, prefix)) {
                        lan.v6.push((addr, prefix));
                    }
                }
            }
        }
    }
    Ok(lan)
}

fn ip_json(args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if out.stdout.trim_ascii().is_empty() {
        return Ok(serde_json::Value::Array(Vec::new()));
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("parsing ip -j {}", args.join(" ")))
}
