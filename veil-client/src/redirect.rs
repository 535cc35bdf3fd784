//! `--redirect ADDR`: connections the kernel redirected to this listener
//! (nftables or iptables `REDIRECT`) are carried through the tunnel to
//! where they were going, which the socket keeps (`SO_ORIGINAL_DST`). A
//! destination that refuses or cannot be reached has its connection reset.
//!
//! `--redirect-rules` installs the redirect itself, as a table of its own
//! (`ip veil_redirect`) removed on exit, so the ruleset is left exactly as
//! it was: every TCP connection this machine opens is redirected, except
//! to loopback and the client's own connection to the gateway, which
//! carries [`MARK`].

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, info, warn};

use crate::{firewall, netstack::Netstack, relay};

/// The firewall mark of the client's own connections to the gateway
/// ("veil"): the redirect rules let them pass.
pub const MARK: u32 = 0x7665_696c;
const TABLE: &str = "veil_redirect";

/// Accepts redirected connections until the task is dropped.
pub async fn serve(listener: TcpListener, stack: Netstack) {
    loop {
        let (local, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!("redirect accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let stack = stack.clone();
        tokio::spawn(async move {
            let _ = local.set_nodelay(true);
            let dst = match original_dst(&local) {
                // Not redirected: connected to the listener itself (its
                // original destination is where it arrived). Carried, it
                // could come back here (a listener on 0.0.0.0 reached at
                // a public address, which the gateway's NAT sends back
                // to), again and again.
                Ok(dst) if local.local_addr().ok() == Some(SocketAddr::V4(dst)) => return,
                Ok(dst) => dst,
                Err(e) => {
                    debug!("a connection without its original destination: {e}");
                    return;
                }
            };
            match stack.connect(dst).await {
                Ok(remote) => {
                    if let Err(e) = relay::both_ways(local, remote).await {
                        debug!("redirected connection: {e:#}");
                    }
                }
                Err(e) => {
                    debug!("redirected connection not opened: {e}");
                    relay::reset(&local);
                }
            }
        });
    }
}

/// Where a redirected connection was going (netfilter keeps it).
fn original_dst(stream: &TcpStream) -> io::Result<SocketAddrV4> {
    // SAFETY: sockaddr_in is plain data; getsockopt writes at most `len`
    // bytes into it.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a valid socket, a buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&raw mut addr).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

/// Connects to the gateway, marked when the redirect rules are in force
/// so that they let the connection pass.
pub async fn dial(addr: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(mark) = mark {
        // SAFETY: a valid socket and a u32 option value.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&raw const mark).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    socket.connect(addr).await
}

/// The redirect rules, removed on drop.
pub struct Rules(());

impl Rules {
    /// Redirects this machine's TCP connections to `listen`'s port.
    pub fn install(listen: SocketAddr) -> Result<Rules> {
        let ip = listen.ip();
        if !(ip.is_loopback() || ip.is_unspecified()) {
            bail!(
                "--redirect-rules redirects to 127.0.0.1: listen there (or on 0.0.0.0), not on {ip}"
            );
        }
        firewall::nft(&ruleset(listen.port())).context("installing the redirect rules")?;
        info!(port = listen.port(), "redirect rules installed");
        Ok(Rules(()))
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        match firewall::nft(&format!("delete table ip {TABLE}\n")) {
            Ok(()) => info!("redirect rules removed"),
            Err(e) => warn!("removing the redirect rules (nft delete table ip {TABLE}): {e}"),
        }
    }
}

/// The table, replacing one a killed client left.
fn ruleset(port: u16) -> String {
    format!(
        "table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         \t\tmeta mark {MARK:#x} return\n\
         \t\tip daddr 127.0.0.0/8 return\n\
         \t\tmeta l4proto tcp redirect to :{port}\n\
         \t}}\n\
         }}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_skip_our_own_traffic_and_loopback() {
        let r = ruleset(4333);
        assert!(r.starts_with("table ip veil_redirect\ndelete table ip veil_redirect\n"));
        assert!(r.contains("meta mark 0x7665696c return"));
        assert!(r.contains("ip daddr 127.0.0.0/8 return"));
        assert!(r.contains("redirect to :4333"));
    }
}
