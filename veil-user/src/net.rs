//! Small network vocabulary: IPv4 prefixes, interface indexes, the clock
//! the datapath stamps flows with.

use std::{ffi::CString, fmt, io, net::Ipv4Addr, str::FromStr};

/// An IPv4 network such as `10.77.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetParseError {
    #[error("`{0}` is not an IPv4 network: expected ADDRESS/PREFIX, such as 10.77.0.0/16")]
    Syntax(String),
    #[error("prefix length {0} is longer than 32")]
    Prefix(u8),
}

impl Ipv4Net {
    /// The network containing `addr`; host bits are cleared.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, NetParseError> {
        if prefix > 32 {
            return Err(NetParseError::Prefix(prefix));
        }
        let mask = Self::mask_bits(prefix);
        Ok(Self {
            addr: Ipv4Addr::from_bits(addr.to_bits() & mask),
            prefix,
        })
    }

    fn mask_bits(prefix: u8) -> u32 {
        u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0)
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from_bits(Self::mask_bits(self.prefix))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        ip.to_bits() & Self::mask_bits(self.prefix) == self.addr.to_bits()
    }
}

impl FromStr for Ipv4Net {
    type Err = NetParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || NetParseError::Syntax(s.to_owned());
        let (addr, prefix) = s.split_once('/').ok_or_else(syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        Self::new(addr, prefix)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

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
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `addrs`; freed below.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut cur = addrs;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || unsafe { (*ifa.ifa_addr).sa_family } as i32 != libc::AF_INET {
            continue;
        }
        // SAFETY: a NUL-terminated interface name.
        let ifname = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if ifname.to_bytes() == name.as_bytes() {
            // SAFETY: AF_INET addresses are sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            found.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
        }
    }
    // SAFETY: the list from getifaddrs.
    unsafe { libc::freeifaddrs(addrs) };
    Ok(found)
}

/// Tunes a tunnel's TCP socket: no Nagle delay, and at most `lowat` bytes
/// queued unsent in the kernel (TCP_NOTSENT_LOWAT), so that packets wait
/// (and, when the tunnel is full, are dropped) where the inner TCP flows
/// can see it rather than deep in a send buffer that only adds latency.
pub fn tune_tunnel_socket(socket: &impl std::os::fd::AsRawFd, lowat: u32) {
    let fd = socket.as_raw_fd();
    let set = |level, name, value: i32| {
        // SAFETY: a valid socket fd and an int option.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const i32).cast(),
                std::mem::size_of::<i32>() as u32,
            )
        };
    };
    set(libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
    set(libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, lowat as i32);
    // Data the peer does not acknowledge for this long (a vanished peer, or
    // one whose window stays shut) ends the connection in the kernel, even
    // if the process never notices.
    set(
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        TUNNEL_USER_TIMEOUT.as_millis() as i32,
    );
}

/// `TCP_USER_TIMEOUT` of tunnel sockets: as long as a keepalive timeout.
pub const TUNNEL_USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

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

/// Whether generic receive offload is on for `iface` (`ethtool -k`'s
/// `generic-receive-offload`).
pub fn gro_enabled(iface: &str) -> std::io::Result<bool> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GGRO: u32 = 0x2b;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    if iface.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_GGRO,
        data: 0,
    };
    // SAFETY: an all-zero ifreq is valid; the name fits (checked above).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(iface.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: a plain datagram socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCETHTOOL reads the ifreq and writes `value`, both live.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req) };
    let result = if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(value.data != 0)
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
    fn parses_and_normalises() {
        let n: Ipv4Net = "10.77.3.4/16".parse().unwrap();
        assert_eq!(n.to_string(), "10.77.0.0/16");
        assert_eq!(n.mask(), Ipv4Addr::new(255, 255, 0, 0));
        assert!(n.contains(Ipv4Addr::new(10, 77, 200, 1)));
        assert!(!n.contains(Ipv4Addr::new(10, 78, 0, 1)));
        assert!("0.0.0.0/0"
            .parse::<Ipv4Net>()
            .unwrap()
            .contains(Ipv4Addr::BROADCAST));
    }

    #[test]
    fn finds_the_loopback_address() {
        assert_eq!(iface_ipv4("lo").unwrap(), Ipv4Addr::LOCALHOST);
        assert_eq!(
            iface_ipv4("no-such-if").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn refuses_typos() {
        assert!(matches!(
            "10.77.0.0".parse::<Ipv4Net>(),
            Err(NetParseError::Syntax(_))
        ));
        assert!(matches!(
            "10.77.0/16".parse::<Ipv4Net>(),
            Err(NetParseError::Syntax(_))
        ));
        assert_eq!(
            "10.0.0.0/33".parse::<Ipv4Net>(),
            Err(NetParseError::Prefix(33))
        );
    }
}
