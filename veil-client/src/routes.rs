//! The client's side of the network: the TUN device with the address the
//! gateway assigned, and the routes that send traffic into it. Everything
//! added is remembered and taken back on drop, so the routing table is as
//! it was after the client exits, however it exits.

use std::{net::Ipv4Addr, process::Command};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};
use veil_tunnel::{net::Ipv4Net, tun::Tun};

pub struct Network {
    pub tun: Tun,
    pub addr: Ipv4Addr,
    /// `ip route` arguments of each route added, to delete them in reverse.
    added: Vec<Vec<String>>,
}

/// Everything through the tunnel, without replacing the default route:
/// two halves that are more specific than it.
pub const FULL_TUNNEL: [&str; 2] = ["0.0.0.0/1", "128.0.0.0/1"];

impl Network {
    /// Creates the TUN device, gives it `addr`, keeps the gateways (every
    /// endpoint of the profile, for failover) reachable the way they are
    /// now, and routes `routes` into the tunnel.
    pub fn up(
        name: &str,
        mtu: u16,
        addr: Ipv4Addr,
        gateways: &[Ipv4Addr],
        routes: &[Ipv4Net],
    ) -> Result<Self> {
        let tun =
            Tun::create(name, mtu).with_context(|| format!("creating the TUN device {name}"))?;
        let mut net = Network {
            tun,
            addr,
            added: Vec::new(),
        };
        let dev = net.tun.name().to_owned();
        // The tunnel carries IPv4; without this the kernel would send IPv6
        // router solicitations into it.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"), "1");
        ip(&["addr", "add", &format!("{addr}/32"), "dev", &dev])?;
        // Fair queueing with a delay target: a bulk upload must not make
        // everything else on the machine wait behind it in the TUN queue.
        if let Err(e) = tc(&["qdisc", "replace", "dev", &dev, "root", "fq_codel"]) {
            warn!("no fq_codel on {dev} ({e:#}): the tunnel may queue more under load");
        }
        // The tunnel itself must not go into the tunnel.
        for gateway in gateways {
            let via = current_route(*gateway)?;
            let mut host = vec!["route".into(), "replace".into(), format!("{gateway}/32")];
            host.extend(via);
            net.add(host)?;
        }
        for r in routes {
            net.add(vec![
                "route".into(),
                "add".into(),
                r.to_string(),
                "dev".into(),
                dev.clone(),
            ])?;
        }
        info!(tun = %dev, %addr, routes = ?routes.iter().map(|r| r.to_string()).collect::<Vec<_>>(), "tunnel network up");
        Ok(net)
    }

    fn add(&mut self, args: Vec<String>) -> Result<()> {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ip(&refs)?;
        let mut del = args;
        del[1] = "del".into();
        self.added.push(del);
        Ok(())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for args in self.added.iter().rev() {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            if let Err(e) = ip(&refs) {
                warn!("restoring routes: {e:#}");
            }
        }
        info!("routes restored");
    }
}

/// How `dst` is reached now: `via GW dev IF` or `dev IF`.
fn current_route(dst: Ipv4Addr) -> Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["-j", "route", "get", &dst.to_string()])
        .output()
        .context("running ip route get")?;
    if !out.status.success() {
        bail!(
            "no route to the gateway {dst}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing ip -j route get")?;
    let route = &v[0];
    let mut args = Vec::new();
    if let Some(gw) = route["gateway"].as_str() {
        args.extend(["via".to_owned(), gw.to_owned()]);
    }
    let dev = route["dev"]
        .as_str()
        .context("ip route get gave no device")?;
    args.extend(["dev".to_owned(), dev.to_owned()]);
    Ok(args)
}

fn tc(args: &[&str]) -> Result<()> {
    command("tc", args)
}

fn ip(args: &[&str]) -> Result<()> {
    command("ip", args)
}

/// Runs `program args`; a failure carries the command and what it said.
fn command(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
