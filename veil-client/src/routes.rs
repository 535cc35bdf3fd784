//! The client's side of the network: the TUN device with the address the
//! gateway assigned, and the routes that send traffic into it (in the
//! tunnel's own table, see `rules`). Everything added is remembered and
//! taken back on drop; the kernel deletes the routes with the device when
//! the client is killed.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    process::Command,
};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};
use veil_tunnel::{net::Ipv4Net, tun::Tun};

use crate::rules::TABLE;

pub struct Network {
    pub tun: Tun,
    pub addr: Ipv4Addr,
    /// The IPv6 address, once the gateway assigned one.
    pub addr6: Option<Ipv6Addr>,
    /// `ip route` arguments of each route added, to delete them in reverse.
    added: Vec<Vec<String>>,
}

/// Everything through the tunnel: the default route of the tunnel's table.
pub const FULL_TUNNEL: [&str; 1] = ["0.0.0.0/0"];

/// All of IPv6 through the tunnel, as two halves: more specific than any
/// default route, so they win even in a table that has one.
pub const FULL_TUNNEL6: [&str; 2] = ["::/1", "8000::/1"];

impl Network {
    /// Creates the TUN device, gives it `addr` and routes `routes` into
    /// the tunnel.
    pub fn up(name: &str, mtu: u16, addr: Ipv4Addr, routes: &[Ipv4Net]) -> Result<Self> {
        let tun =
            Tun::create(name, mtu).with_context(|| format!("creating the TUN device {name}"))?;
        let mut net = Network {
            tun,
            addr,
            addr6: None,
            added: Vec::new(),
        };
        let dev = net.tun.name().to_owned();
        // IPv6 stays off (as `Tun::create` left it) until the gateway
        // assigns an address (`carry_ipv6`).
        ip(&["addr", "add", &format!("{addr}/32"), "dev", &dev])?;
        // Fair queueing with a delay target: a bulk upload must not make
        // everything else on the machine wait behind it in the TUN queue.
        if let Err(e) = tc(&["qdisc", "replace", "dev", &dev, "root", "fq_codel"]) {
            warn!("no fq_codel on {dev} ({e:#}): the tunnel may queue more under load");
        }
        // Into the tunnel's own table, which an `ip rule` puts ahead of
        // `main` (see `rules`): the gateway itself is looked up in `main`,
        // and no route there can pull traffic out of the tunnel.
        let table = TABLE.to_string();
        for r in routes {
            net.add(vec![
                "route".into(),
                "add".into(),
                r.to_string(),
                "dev".into(),
                dev.clone(),
                "table".into(),
                table.clone(),
            ])?;
        }
        info!(tun = %dev, %addr, routes = ?routes.iter().map(|r| r.to_string()).collect::<Vec<_>>(), "tunnel network up");
        Ok(net)
    }

    /// The gateway carries IPv6: `addr` on the device and, when `full`,
    /// all of IPv6 ([`FULL_TUNNEL6`]) into the tunnel's table, where the
    /// routing rules keep the gateway itself out of it.
    pub fn carry_ipv6(&mut self, addr: Ipv6Addr, full: bool) -> Result<()> {
        let dev = self.tun.name().to_owned();
        // No link-local address, router solicitation or autoconfiguration
        // on a tunnel: its one address is the gateway's to give.
        for (key, value) in [
            ("accept_ra", "0"),
            ("autoconf", "0"),
            ("router_solicitations", "0"),
            ("addr_gen_mode", "1"),
            ("disable_ipv6", "0"),
        ] {
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/{key}"), value)
                .with_context(|| format!("setting net.ipv6.conf.{dev}.{key}"))?;
        }
        // No duplicate address detection: nobody else is on a TUN link,
        // and the address would stay unusable ("tentative") meanwhile.
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{addr}/128"),
            "dev",
            &dev,
            "nodad",
        ])?;
        self.addr6 = Some(addr);
        if full {
            let table = TABLE.to_string();
            for r in FULL_TUNNEL6 {
                self.add(
                    ["-6", "route", "add", r, "dev", &dev, "table", &table]
                        .map(String::from)
                        .to_vec(),
                )?;
            }
        }
        info!(tun = %dev, %addr, full, "IPv6 through the tunnel");
        Ok(())
    }

    /// Moves the device to `addr`, the address another gateway assigned
    /// (failover): the routes name the device, not the address, and stay.
    /// Connections bound to the old address end, as they would anyway:
    /// the new gateway holds none of their NAT state.
    pub fn readdress(&mut self, addr: Ipv4Addr) -> Result<()> {
        let dev = self.tun.name().to_owned();
        ip(&["addr", "add", &format!("{addr}/32"), "dev", &dev])?;
        ip(&["addr", "del", &format!("{}/32", self.addr), "dev", &dev])?;
        info!(tun = %dev, old = %self.addr, %addr, "tunnel address changed");
        self.addr = addr;
        Ok(())
    }

    /// [`Self::readdress`] for the IPv6 address: the routes name the
    /// device and stay.
    pub fn readdress6(&mut self, addr: Ipv6Addr) -> Result<()> {
        let dev = self.tun.name().to_owned();
        let new = format!("{addr}/128");
        ip(&["-6", "addr", "add", &new, "dev", &dev, "nodad"])?;
        if let Some(old) = self.addr6.replace(addr) {
            ip(&["-6", "addr", "del", &format!("{old}/128"), "dev", &dev])?;
        }
        info!(tun = %dev, %addr, "tunnel IPv6 address changed");
        Ok(())
    }

    fn add(&mut self, args: Vec<String>) -> Result<()> {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ip(&refs)?;
        let mut del = args;
        if let Some(verb) = del.iter_mut().find(|a| *a == "add") {
            *verb = "del".into();
        }
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

fn tc(args: &[&str]) -> Result<()> {
    command("tc", args)
}

pub fn ip(args: &[&str]) -> Result<()> {
    command("ip", args)
}

/// Runs `program args`; a failure carries the command and what it said.
pub fn command(program: &str, args: &[&str]) -> Result<()> {
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
