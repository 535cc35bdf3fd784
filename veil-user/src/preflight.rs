//! Start-up checks: what would otherwise fail later, or worse, half-work,
//! is refused at once with what to do about it.

use std::{fs, net::SocketAddr, path::Path};

use crate::{
    flows::PortRange,
    net::{gro_enabled, ifindex},
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreflightError {
    #[error(
        "veil-user needs root, or the capabilities CAP_BPF, CAP_NET_ADMIN and CAP_NET_BIND_SERVICE: run it with sudo (or see dist/veil-user.service)"
    )]
    Privileges,
    #[error(
        "this kernel has no BTF (/sys/kernel/btf/vmlinux is missing): veil needs a kernel built with CONFIG_DEBUG_INFO_BTF=y, as Debian, Ubuntu and Fedora ship"
    )]
    NoBtf,
    #[error("interface `{0}` not found: `ip -br link` lists this machine's interfaces")]
    NoInterface(String),
    #[error(
        "the NAT port range {nat} overlaps net.ipv4.ip_local_port_range ({low}-{high}): the kernel could give a NAT port to one of the gateway's own connections. Fix it with `sysctl -w net.ipv4.ip_local_port_range=\"{low} {fix}\"` (and in /etc/sysctl.d/ to keep it), or pick --nat-ports above {high}"
    )]
    PortRangeOverlap {
        nat: PortRange,
        low: u16,
        high: u16,
        fix: u16,
    },
    #[error(
        "the {what} {addr} ({flag}) has its port inside the NAT port range {nat} (--nat-ports): the datapath drops packets to those ports that belong to no flow, so nothing would reach it. Pick a port outside {nat} with {flag} (or move --nat-ports)"
    )]
    PortInNatRange {
        what: &'static str,
        flag: &'static str,
        addr: SocketAddr,
        nat: PortRange,
    },
}

/// Runs every check for a gateway on `iface` with NAT ports `nat`.
pub fn check(iface: &str, nat: PortRange) -> Result<(), PreflightError> {
    privileges()?;
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(PreflightError::NoBtf);
    }
    if ifindex(iface).is_err() {
        return Err(PreflightError::NoInterface(iface.to_owned()));
    }
    if let Ok(text) = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") {
        if let Some((low, high)) = parse_range(&text) {
            port_range(nat, low, high)?;
        }
    }
    Ok(())
}

/// Checks that the gateway's own listeners (`--listen`, `--metrics`) are
/// reachable: the datapath drops unsolicited packets to a NAT port before
/// the kernel's sockets see them. Loopback is exempt (the datapath sits on
/// the WAN interface only).
pub fn listeners(
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
    nat: PortRange,
) -> Result<(), PreflightError> {
    let inside =
        |addr: SocketAddr| !addr.ip().is_loopback() && (nat.min..=nat.max).contains(&addr.port());
    if inside(listen) {
        return Err(PreflightError::PortInNatRange {
            what: "tunnel listener",
            flag: "--listen",
            addr: listen,
            nat,
        });
    }
    match metrics {
        Some(addr) if inside(addr) => Err(PreflightError::PortInNatRange {
            what: "metrics listener",
            flag: "--metrics",
            addr,
            nat,
        }),
        _ => Ok(()),
    }
}

/// [`listeners`]' check for `--ws-listen` (usually on loopback, behind a
/// web server on the same host, and so exempt).
pub fn ws_listener(addr: Option<SocketAddr>, nat: PortRange) -> Result<(), PreflightError> {
    match addr {
        Some(addr) if !addr.ip().is_loopback() && (nat.min..=nat.max).contains(&addr.port()) => {
            Err(PreflightError::PortInNatRange {
                what: "WebSocket listener",
                flag: "--ws-listen",
                addr,
                nat,
            })
        }
        _ => Ok(()),
    }
}

/// What works but slower than it should, with the fix: logged as warnings
/// at start-up, never fatal. With the GRO stage turned off (`stage_off`), a
/// WAN without GRO hands the daemon every reply on its own.
pub fn advice(iface: &str, stage_off: bool) -> Vec<String> {
    let mut advice = Vec::new();
    if stage_off && matches!(gro_enabled(iface), Ok(false)) {
        advice.push(format!(
            "generic receive offload is off on {iface} and so is the GRO stage: the daemon reads replies one packet at a time, which caps download throughput; turn GRO on with `ethtool -K {iface} gro on`, or the stage with `--gro-stage on`"
        ));
    }
    advice
}

fn privileges() -> Result<(), PreflightError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_BPF: u32 = 39;
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_BPF) && has(CAP_NET_ADMIN) {
        Ok(())
    } else {
        Err(PreflightError::Privileges)
    }
}

fn parse_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(|v| v.parse::<u16>().ok());
    Some((it.next()??, it.next()??))
}

fn port_range(nat: PortRange, low: u16, high: u16) -> Result<(), PreflightError> {
    if nat.max < low || nat.min > high {
        return Ok(());
    }
    Err(PreflightError::PortRangeOverlap {
        nat,
        low,
        high,
        fix: nat.min.saturating_sub(1).max(low),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_ranges_do_not_overlap() {
        assert_eq!(port_range(PortRange::DEFAULT, 32768, 60999), Ok(()));
        assert_eq!(parse_range("32768\t60999\n"), Some((32768, 60999)));
    }

    #[test]
    fn a_listener_inside_the_nat_range_is_refused_with_the_fix() {
        let nat = PortRange::DEFAULT;
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(listeners(addr("0.0.0.0:443"), None, nat), Ok(()));
        assert_eq!(
            listeners(addr("0.0.0.0:60999"), Some(addr("0.0.0.0:9477")), nat),
            Ok(())
        );
        // The datapath is not on loopback.
        assert_eq!(
            listeners(addr("0.0.0.0:443"), Some(addr("127.0.0.1:61000")), nat),
            Ok(())
        );

        let err = listeners(addr("0.0.0.0:61000"), None, nat).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("tunnel listener 0.0.0.0:61000 (--listen) has its port inside the NAT port range 61000-65535"),
            "{text}"
        );
        assert!(
            text.contains("Pick a port outside 61000-65535 with --listen"),
            "{text}"
        );
        let err =
            listeners(addr("198.18.0.1:443"), Some(addr("198.18.0.1:65535")), nat).unwrap_err();
        assert!(err.to_string().contains("metrics listener"), "{err}");
        assert_eq!(ws_listener(Some(addr("127.0.0.1:61000")), nat), Ok(()));
        let err = ws_listener(Some(addr("0.0.0.0:61000")), nat).unwrap_err();
        assert!(err.to_string().contains("--ws-listen"), "{err}");
    }

    #[test]
    fn an_overlap_says_how_to_fix_it() {
        let err = port_range(PortRange::DEFAULT, 32768, 65000).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("61000-65535 overlaps"), "{text}");
        assert!(
            text.contains("ip_local_port_range=\"32768 60999\""),
            "{text}"
        );
        assert!(text.contains("--nat-ports above 65000"), "{text}");
    }
}
