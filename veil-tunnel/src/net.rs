//! Network vocabulary both ends share: IPv4 prefixes, how a tunnel's
//! socket is tuned, and the gateway's dual-stack listener sockets.

use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
    time::Duration,
};

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
pub const TUNNEL_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Unsent bytes the kernel may hold for a tunnel socket
/// (`TCP_NOTSENT_LOWAT`): enough to keep the pipe full, little enough that
/// what the pump writes next is not stuck behind seconds of backlog.
pub const TUNNEL_LOWAT: u32 = 128 * 1024;

/// The tunnel listener's default: every family on one socket.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 443);

/// A socket bound to `addr` (listening, for a stream socket), made so that
/// `[::]` takes IPv4 as well: `IPV6_V6ONLY` off whatever
/// `net.ipv6.bindv6only` says, and on a kernel without IPv6
/// (`ipv6.disable=1`) `0.0.0.0` on the same port instead.
pub fn listener_socket(addr: SocketAddr, ty: socket2::Type) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Socket};
    let any6 = addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    let (socket, addr) = match Socket::new(Domain::for_address(addr), ty, None) {
        Ok(socket) => (socket, addr),
        Err(e) if any6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port());
            (Socket::new(Domain::IPV4, ty, None)?, v4)
        }
        Err(e) => return Err(e),
    };
    if addr.is_ipv6() && any6 {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    if ty == socket2::Type::STREAM {
        // As tokio's `TcpListener::bind`: a restart finds the port free
        // while the last run's connections are in TIME_WAIT.
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
    } else {
        socket.bind(&addr.into())?;
    }
    Ok(socket)
}

/// Turns IPv6 off on `iface`, so that the kernel sends nothing of its own
/// through it (router solicitations, MLD reports) once it is up. A kernel
/// without IPv6 has nothing to turn off.
pub fn disable_ipv6(iface: &str) -> io::Result<()> {
    match std::fs::write(format!("/proc/sys/net/ipv6/conf/{iface}/disable_ipv6"), "1") {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Packets the kernel dropped on their way out of `iface` (its
/// `tx_dropped`), read from `/proc/net/dev`: that follows the reading
/// thread's network namespace, where `/sys/class/net` shows the one sysfs
/// was mounted in (a daemon started with `nsenter --net` sees the host's).
/// 0 if the interface is not there.
pub fn tx_dropped(iface: &str) -> u64 {
    let dev = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    tx_dropped_in(&dev, iface).unwrap_or(0)
}

/// The transmit drops of `iface` in `/proc/net/dev`'s text: after its
/// `name:`, eight receive columns, then transmit bytes, packets, errors
/// and drops.
fn tx_dropped_in(dev: &str, iface: &str) -> Option<u64> {
    dev.lines().find_map(|line| {
        let (name, columns) = line.split_once(':')?;
        if name.trim() != iface {
            return None;
        }
        columns.split_whitespace().nth(11)?.parse().ok()
    })
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

    #[test]
    fn transmit_drops_are_read_from_their_column() {
        let dev = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0
veilgw: 5000 50 1 2 3 4 5 6 7000 70 8 93 10 11 12 13
";
        assert_eq!(tx_dropped_in(dev, "veilgw"), Some(93));
        assert_eq!(tx_dropped_in(dev, "lo"), Some(0));
        assert_eq!(tx_dropped_in(dev, "veil"), None);
    }
}
