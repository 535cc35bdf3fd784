//! Small network vocabulary: IPv4 prefixes, interface indexes, the clock
//! the datapath stamps flows with.

use std::{ffi::CString, io, net::Ipv4Addr};

pub use veil_tunnel::net::{
    tune_tunnel_socket, Ipv4Net, NetParseError, TUNNEL_LOWAT, TUNNEL_USER_TIMEOUT,
};

/// The index of interface `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i),
    }
}

/// The first IPv4 address of interface `name` (in the calling thread's
/// network namespace).
pub fn iface_ipv4(name: &str) -> io::Result<Ipv4Addr> {
    iface_ipv4s(name)?.first().copied().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("interface {name} has no IPv4 address"),
        )
    })
}

/// The IPv4 addresses of interface `name`, in the kernel's order (in the
/// calling thread's network namespace); empty if it has none.
pub fn iface_ipv4s(name: &str) -> io::Result<Vec<Ipv4Addr>> {
    let mut found = Vec::new();
    each_iface_addr(name, |sa| {
        // SAFETY: a socket address getifaddrs gave, of its family's size.
        if unsafe { (*sa).sa_family } as i32 == libc::AF_INET {
            // SAFETY: AF_INET addresses are sockaddr_in.
            let sin = unsafe { &*(sa as *const libc::sockaddr_in) };
            found.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
        }
    })?;
    Ok(found)
}

/// The first global unicast IPv6 address of interface `name` (not
/// link-local, unique-local, loopback or multicast), if it has one: the
/// default public IPv6 address of NAT66.
pub fn iface_global_ipv6(name: &str) -> io::Result<Option<std::net::Ipv6Addr>> {
    let mut found = Vec::new();
    each_iface_addr(name, |sa| {
        // SAFETY: as above.
        if unsafe { (*sa).sa_family } as i32 == libc::AF_INET6 {
            // SAFETY: AF_INET6 addresses are sockaddr_in6.
            let sin6 = unsafe { &*(sa as *const libc::sockaddr_in6) };
            found.push(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr));
        }
    })?;
    Ok(found.into_iter().find(|a| {
        !(a.is_loopback()
            || a.is_multicast()
            || a.is_unspecified()
            || a.is_unicast_link_local()
            || a.is_unique_local())
    }))
}

/// Calls `f` with each address of interface `name` (getifaddrs).
fn each_iface_addr(name: &str, mut f: impl FnMut(*const libc::sockaddr)) -> io::Result<()> {
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `addrs`; freed below.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cur = addrs;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated interface name.
        let ifname = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if ifname.to_bytes() == name.as_bytes() {
            f(ifa.ifa_addr);
        }
    }
    // SAFETY: the list from getifaddrs.
    unsafe { libc::freeifaddrs(addrs) };
    Ok(())
}

/// What every listener of the daemon does when `accept` fails (out of file
/// descriptors, mostly): say so, wait a moment, keep serving. A listener
/// that gave up would take the daemon's other duties down with it.
pub async fn accept_failed(listener: &str, e: &io::Error) {
    tracing::warn!("accept on the {listener}: {e}");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

/// Raises the soft limit on open files to the hard one: a gateway holds a
/// socket per client and per handshake. Returns the limit now in force.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// `struct ethtool_value`: a command and one number.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// One get or set of an offload that `struct ethtool_value` carries.
fn ethtool_value(iface: &str, cmd: u32, data: u32) -> std::io::Result<u32> {
    let mut value = EthtoolValue { cmd, data };
    // SAFETY: the commands passed here read and write a `struct ethtool_value`.
    unsafe { ethtool(iface, &mut value)? };
    Ok(value.data)
}

/// Whether generic receive offload is on for `iface` (`ethtool -k`'s
/// `generic-receive-offload`).
pub fn gro_enabled(iface: &str) -> std::io::Result<bool> {
    const ETHTOOL_GGRO: u32 = 0x2b;
    Ok(ethtool_value(iface, ETHTOOL_GGRO, 0)? != 0)
}

/// `ethtool -K iface gro on|off`.
pub fn set_gro(iface: &str, on: bool) -> std::io::Result<()> {
    const ETHTOOL_SGRO: u32 = 0x2c;
    ethtool_value(iface, ETHTOOL_SGRO, on.into()).map(drop)
}

/// `ethtool -K iface tso on|off`.
pub fn set_tso(iface: &str, on: bool) -> std::io::Result<()> {
    const ETHTOOL_STSO: u32 = 0x1f;
    ethtool_value(iface, ETHTOOL_STSO, on.into()).map(drop)
}

/// `iface`'s MTU (`SIOCGIFMTU`: the calling thread's namespace, where
/// `/sys/class/net` shows the namespace sysfs was mounted in).
pub fn mtu(iface: &str) -> std::io::Result<u32> {
    let req = if_ioctl(iface, libc::SIOCGIFMTU, |_| {})?;
    // SAFETY: SIOCGIFMTU answers in `ifru_mtu`.
    Ok(unsafe { req.ifr_ifru.ifru_mtu } as u32)
}

/// Whether `iface` is administratively up (`SIOCGIFFLAGS`'s `IFF_UP`).
pub fn is_up(iface: &str) -> std::io::Result<bool> {
    let req = if_ioctl(iface, libc::SIOCGIFFLAGS, |_| {})?;
    // SAFETY: SIOCGIFFLAGS answers in `ifru_flags`.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    Ok(flags & libc::IFF_UP as libc::c_short != 0)
}

/// The name of `iface`'s driver (`ethtool -i`): `veth`, `virtio_net`,
/// `mlx5_core`, ...
pub fn driver(iface: &str) -> std::io::Result<String> {
    const ETHTOOL_GDRVINFO: u32 = 0x03;
    /// `struct ethtool_drvinfo`.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        counts: [u32; 5],
    }
    // SAFETY: all-zero bytes are a valid DrvInfo.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    // SAFETY: ETHTOOL_GDRVINFO reads and writes a `struct ethtool_drvinfo`.
    unsafe { ethtool(iface, &mut info)? };
    let len = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..len]).into_owned())
}

/// One `SIOCETHTOOL` request on `iface`: `data` starts with the command,
/// and the kernel fills in the rest.
///
/// # Safety
///
/// `T` must be the `#[repr(C)]` structure of the command in its first
/// field: the kernel writes that command's structure, whatever `T` is.
unsafe fn ethtool<T>(iface: &str, data: &mut T) -> std::io::Result<()> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    if_ioctl(iface, SIOCETHTOOL, |req| {
        req.ifr_ifru.ifru_data = (data as *mut T).cast();
    })
    .map(drop)
}

/// One interface request on `iface` (an `ifreq` that `fill` completes),
/// and the `ifreq` the kernel answered with. The caller of a request that
/// carries a pointer (`SIOCETHTOOL`) vouches for what it points to.
fn if_ioctl(
    iface: &str,
    request: libc::c_ulong,
    fill: impl FnOnce(&mut libc::ifreq),
) -> std::io::Result<libc::ifreq> {
    if iface.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: an all-zero ifreq is valid; the name fits (checked above).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(iface.bytes()) {
        *dst = src as libc::c_char;
    }
    fill(&mut req);
    // SAFETY: a plain datagram socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel reads and writes the ifreq, which is live; what
    // it points to is the caller's promise.
    let rc = unsafe { libc::ioctl(fd, request as _, &mut req) };
    let result = if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(req)
    };
    // SAFETY: our own fd.
    unsafe { libc::close(fd) };
    result
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns()` reads, so
/// flow timestamps and the daemon's "now" compare directly.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_loopback_address() {
        assert_eq!(iface_ipv4("lo").unwrap(), Ipv4Addr::LOCALHOST);
        assert_eq!(
            iface_ipv4("no-such-if").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn loopback_is_up_and_a_missing_link_is_an_error() {
        assert!(is_up("lo").unwrap());
        assert!(is_up("no-such-if").is_err());
    }
}
