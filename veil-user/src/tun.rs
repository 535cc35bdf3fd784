//! A TUN device shared by tasks: one reader, many writers.

use std::{io, os::fd::AsRawFd};

use tokio::io::{unix::AsyncFd, Interest};

pub struct Tun {
    fd: AsyncFd<tun::Device>,
    name: String,
}

impl Tun {
    /// Creates (or opens) TUN device `name`, up, non-blocking; the address
    /// and MTU are the caller's business.
    pub fn create(name: &str, mtu: u16) -> io::Result<Self> {
        let mut cfg = tun::Configuration::default();
        cfg.tun_name(name).mtu(mtu).up();
        let dev = tun::create(&cfg).map_err(io::Error::other)?;
        dev.set_nonblock().map_err(io::Error::other)?;
        let name = tun::AbstractDevice::tun_name(&dev).map_err(io::Error::other)?;
        // SAFETY: the device owns its fd, open until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register_with_interest(dev, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { fd, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one packet.
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
    /// [`Self::recv`] without going back to the reactor.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match raw_read(self.fd.get_ref().as_raw_fd(), buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes one packet. A TUN device accepts writes without blocking;
    /// when its queue is full the kernel drops, as a NIC would.
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        let fd = self.fd.get_ref().as_raw_fd();
        // SAFETY: a valid fd and buffer.
        let n = unsafe { libc::write(fd, packet.as_ptr().cast(), packet.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn raw_read(fd: i32, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: a valid fd and buffer.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
