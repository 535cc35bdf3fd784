//! A TUN device shared by tasks: one reader, many writers; or, for the
//! gateway, several queues ([`Tun::create_queues`]), each its own `Tun`.
//!
//! The device is opened with `IFF_VNET_HDR` and TCP/UDP segmentation
//! offload, as a virtual machine's NIC would be: every read and write
//! carries a 10-byte [`VnetHdr`] before the packet, and the kernel hands
//! over (and takes) 64 KiB super-packets with partial checksums instead of
//! one `read()` per 1.4 KiB segment. The tunnel carries them whole to a
//! peer that negotiated offload; `veil_proto::gso` segments them for one
//! that did not.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd},
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use tokio::io::{unix::AsyncFd, Interest};
use veil_proto::gso::{VnetHdr, VNET_HDR_LEN};

/// `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `_IOW('T', 220, int)`.
const TUNSETVNETLE: libc::c_ulong = 0x4004_54dc;
/// `_IOR('T', 224, int)`.
const TUNSETSTEERINGEBPF: libc::c_ulong = 0x8004_54e0;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

/// A transmit queue (what the kernel holds for our reads) for a device
/// that carries other hosts' downloads, in packets: the gateway's. The
/// kernel's default, 500, overflowed during a download with GRO off on
/// the gateway's WAN side (every reply one MTU-sized packet there):
/// 8,000–12,000 drops, each a TCP retransmission, in 2 s. 4,096 covers a
/// TCP receive window's worth of MTU-sized packets (Linux's default
/// maximum of 6 MiB) plus bursts; TCP paces itself by its window, so a
/// longer queue is used only when the reader falls behind. The client
/// keeps the default: its queue holds its own uploads, where TCP small
/// queues bound each flow and a longer queue would only hold an
/// unpaced sender's excess in front of everything else.
pub const GATEWAY_QUEUE_LEN: u32 = 4096;

/// `SIOCSIFTXQLEN`.
const SIOCSIFTXQLEN: libc::c_ulong = 0x8943;

/// Room for the largest packet a read can return: the offload header and
/// an IPv4 super-packet of at most 64 KiB.
pub const MAX_READ: usize = VNET_HDR_LEN + 65_536;

pub struct Tun {
    fd: AsyncFd<tun::Device>,
    name: String,
    /// Packets a write failed to hand to the kernel (counted, not logged
    /// one by one: a failing device fails for every packet).
    write_failures: AtomicU64,
    /// The kernel knows UDP segmentation (Linux 6.2 on), and with it takes
    /// writes of UDP super-packets (`GSO_UDP_L4`), which older kernels
    /// refuse.
    udp_gso: bool,
}

impl Tun {
    /// Creates (or opens) TUN device `name` with offloads, up,
    /// non-blocking, and IPv6 off until its user turns it on; the address
    /// and MTU are the caller's business.
    pub fn create(name: &str, mtu: u16) -> io::Result<Self> {
        let mut cfg = tun::Configuration::default();
        cfg.tun_name(name).mtu(mtu);
        cfg.platform_config(|p| {
            p.vnet_hdr(true);
        });
        let mut dev = tun::create(&cfg).map_err(io::Error::other)?;
        let name = tun::AbstractDevice::tun_name(&dev).map_err(io::Error::other)?;
        up_without_ipv6(&mut dev, &name)?;
        dev.set_nonblock().map_err(io::Error::other)?;
        set_little_endian(dev.as_raw_fd())?;
        let udp_gso = set_offload(dev.as_raw_fd())?;
        Self::register(dev, name, udp_gso)
    }

    /// Creates (or opens) TUN device `name` with `queues` queues
    /// (`IFF_MULTI_QUEUE`), one per returned `Tun`, each with the offloads
    /// of [`Self::create`], up, non-blocking. The kernel hands a packet
    /// for the device to one queue (see docs/architecture.md, "Cores"), so
    /// each queue can have a reader of its own. One queue: [`Self::create`]
    /// (a device without `IFF_MULTI_QUEUE`, as before).
    pub fn create_queues(name: &str, mtu: u16, queues: usize) -> io::Result<Vec<Self>> {
        if queues <= 1 {
            return Ok(vec![Self::create(name, mtu)?]);
        }
        let mut name = name.to_owned();
        let mut out = Vec::with_capacity(queues);
        for _ in 0..queues {
            let (fd, attached) = open_queue(&name)?;
            // The kernel names a device asked for as `veil%d`: every
            // further queue attaches to the name it got.
            name = attached;
            set_little_endian(fd.as_raw_fd())?;
            let udp_gso = set_offload(fd.as_raw_fd())?;
            let mut cfg = tun::Configuration::default();
            cfg.raw_fd(fd.into_raw_fd()).tun_name(&name).mtu(mtu);
            let mut dev = tun::create(&cfg).map_err(io::Error::other)?;
            if out.is_empty() {
                tun::AbstractDevice::set_mtu(&mut dev, mtu).map_err(io::Error::other)?;
                up_without_ipv6(&mut dev, &name)?;
            }
            out.push(Self::register(dev, name.clone(), udp_gso)?);
        }
        Ok(out)
    }

    fn register(dev: tun::Device, name: String, udp_gso: bool) -> io::Result<Self> {
        // SAFETY: the device owns its fd, open until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register_with_interest(dev, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self {
            fd,
            name,
            write_failures: AtomicU64::new(0),
            udp_gso,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the device takes UDP super-packets (`GSO_UDP_L4`) written to
    /// it: only then may a writer merge datagrams
    /// (`veil_proto::gro::Coalescer::with_udp`).
    pub fn takes_udp_gso(&self) -> bool {
        self.udp_gso
    }

    /// Sets the device's transmit queue length (see
    /// [`GATEWAY_QUEUE_LEN`]).
    pub fn set_queue_len(&self, packets: u32) -> io::Result<()> {
        set_queue_len(&self.name, packets)
    }

    /// Has the kernel pick the queue of each packet it hands to the device
    /// with `program` (a socket filter whose answer, modulo the queue
    /// count, is the queue) instead of hashing its flow. One call serves
    /// the whole device; the kernel keeps its own reference to the
    /// program.
    pub fn set_steering_program(&self, program: BorrowedFd<'_>) -> io::Result<()> {
        let prog_fd: libc::c_int = program.as_raw_fd();
        // SAFETY: a valid TUN fd; the kernel reads one int from the pointer.
        let rc = unsafe {
            libc::ioctl(
                self.fd.get_ref().as_raw_fd(),
                TUNSETSTEERINGEBPF as _,
                &prog_fd as *const libc::c_int,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Packets our writes failed to hand to the kernel so far.
    pub fn write_failures(&self) -> u64 {
        self.write_failures.load(Relaxed)
    }

    /// Packets the kernel dropped because the device's queue was full (our
    /// reads fell behind): the interface's `tx_dropped`.
    pub fn queue_drops(&self) -> u64 {
        crate::net::tx_dropped(&self.name)
    }

    /// Reads one packet, its offload header first; `buf` should hold
    /// [`MAX_READ`] bytes.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|dev| raw_read(dev.get_ref().as_raw_fd(), buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads one more packet if one is already waiting: for batching after
    /// [`Self::recv`] without going back to the reactor. Through the
    /// reactor's readiness while it says readable, so that the read that
    /// finds the queue empty clears it and the next [`Self::recv`] waits,
    /// rather than try a read that would find it empty again (one system
    /// call less per wake-up).
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut tried = false;
        let mut read = self.fd.try_io(Interest::READABLE, |dev| {
            tried = true;
            raw_read(dev.as_raw_fd(), buf)
        });
        if !tried {
            // The reactor has not seen the device readable (no `recv`
            // before): ask the device itself.
            read = raw_read(self.fd.get_ref().as_raw_fd(), buf);
        }
        match read {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes one packet with its offload header ([`VnetHdr::NONE`] for a
    /// complete one). A TUN device accepts writes without blocking; when
    /// its queue is full the kernel drops, as a NIC would.
    pub fn send(&self, hdr: &VnetHdr, packet: &[u8]) -> io::Result<()> {
        let hdr = hdr.to_bytes();
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: packet.as_ptr() as *mut libc::c_void,
                iov_len: packet.len(),
            },
        ];
        let fd = self.fd.get_ref().as_raw_fd();
        // SAFETY: a valid fd; both buffers outlive the call and are only read.
        let n = unsafe { libc::syscall(libc::SYS_writev, fd, iov.as_ptr(), iov.len()) };
        if n < 0 {
            self.write_failures.fetch_add(1, Relaxed);
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Writes an offload header and packet already back to back, as an
    /// offload datagram carries them.
    pub fn send_joined(&self, hdr_and_packet: &[u8]) -> io::Result<()> {
        let fd = self.fd.get_ref().as_raw_fd();
        // SAFETY: a valid fd and buffer.
        let n = unsafe {
            libc::syscall(
                libc::SYS_write,
                fd,
                hdr_and_packet.as_ptr(),
                hdr_and_packet.len(),
            )
        };
        if n < 0 {
            self.write_failures.fetch_add(1, Relaxed);
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Brings device `name` up with IPv6 off: were it on, the kernel would
/// send its own router solicitation and MLD report into the new device at
/// once, which its reader would take for a client's packet or a reply.
/// A failure to turn it off is not one to bring the device down for.
fn up_without_ipv6(dev: &mut tun::Device, name: &str) -> io::Result<()> {
    let _ = crate::net::disable_ipv6(name);
    tun::AbstractDevice::enabled(dev, true).map_err(io::Error::other)
}

/// Opens one queue of multi-queue TUN device `name` (created by the first
/// call) with offload headers and no packet information, non-blocking;
/// returns its fd and the device's name.
fn open_queue(name: &str) -> io::Result<(OwnedFd, String)> {
    /// `struct ifreq` with the `ifr_flags` member of its union.
    #[repr(C)]
    struct IfReqFlags {
        name: [libc::c_char; libc::IFNAMSIZ],
        flags: libc::c_short,
        pad: [u8; 22],
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("TUN device name `{name}` is longer than 15 bytes"),
        ));
    }
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE)
            as libc::c_short,
        pad: [0; 22],
    };
    for (d, s) in req.name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: a constant path; the fd returned is ours.
    let raw = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: TUNSETIFF reads and writes a struct ifreq through the pointer.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = req
        .name
        .iter()
        .position(|c| *c == 0)
        .unwrap_or(libc::IFNAMSIZ);
    let attached = req.name[..len].iter().map(|c| *c as u8 as char).collect();
    Ok((fd, attached))
}

/// Sets the transmit queue length of interface `name`.
fn set_queue_len(name: &str, len: u32) -> io::Result<()> {
    /// `struct ifreq` with the `ifr_qlen` member of its union.
    #[repr(C)]
    struct IfReqQlen {
        name: [libc::c_char; libc::IFNAMSIZ],
        qlen: libc::c_int,
        pad: [u8; 20],
    }
    let mut req = IfReqQlen {
        name: [0; libc::IFNAMSIZ],
        qlen: len as libc::c_int,
        pad: [0; 20],
    };
    for (d, s) in req
        .name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    // SAFETY: a plain datagram socket, closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCSIFTXQLEN reads a struct ifreq through the pointer.
    let rc = unsafe { libc::ioctl(sock, SIOCSIFTXQLEN as _, &req) };
    let err = io::Error::last_os_error();
    // SAFETY: our socket, closed once.
    unsafe { libc::close(sock) };
    if rc != 0 {
        return Err(err);
    }
    Ok(())
}

/// The offload header is little-endian on the wire (virtio 1.x); the
/// kernel's default is the host's order, so say it on big-endian hosts too.
fn set_little_endian(fd: i32) -> io::Result<()> {
    let le: libc::c_int = 1;
    // SAFETY: TUNSETVNETLE reads an int through the pointer.
    if unsafe { libc::ioctl(fd, TUNSETVNETLE as _, &le) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lets the kernel hand over unsegmented IPv4 and IPv6 TCP super-packets
/// with partial checksums, falling back to fewer kinds if it refuses a
/// combination. Returns
/// whether the kernel knows UDP segmentation (`TUN_F_USO4 | TUN_F_USO6`,
/// Linux 6.2 on), which is when it also takes UDP super-packets written
/// to the device. The device itself is left without it: its readers would
/// get UDP super-packets, which a peer on an older kernel could not write.
fn set_offload(fd: i32) -> io::Result<bool> {
    let tcp4 = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN;
    let tcp = tcp4 | TUN_F_TSO6;
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    let set = |flags: libc::c_uint| unsafe {
        libc::ioctl(fd, TUNSETOFFLOAD as _, flags as libc::c_ulong) == 0
    };
    let udp_gso = set(tcp | TUN_F_USO4 | TUN_F_USO6);
    for flags in [tcp, tcp4] {
        if set(flags) {
            return Ok(udp_gso);
        }
    }
    Err(io::Error::last_os_error())
}

/// A packet's read. Like the writes above it calls the kernel directly:
/// glibc's `read` and `write` are cancellation points, which in a threaded
/// process set and clear the thread's cancel state around every call; with
/// a read per MTU-sized reply that was 4 % of the gateway's time, and
/// nothing here is ever cancelled.
fn raw_read(fd: i32, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: a valid fd and buffer.
    let n = unsafe { libc::syscall(libc::SYS_read, fd, buf.as_mut_ptr(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
