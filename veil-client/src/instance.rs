//! One veil-client per network namespace: two would replace each other's
//! kill switch and routing rules, and the first to exit would take the
//! other's protection with it.
//!
//! The claim is an abstract unix socket: such names belong to the network
//! namespace, and the kernel releases one the moment its process ends,
//! however it ends, so a client killed with SIGKILL never blocks the next.

use std::os::unix::net::UnixListener;
use std::os::{linux::net::SocketAddrExt, unix::net::SocketAddr as UnixAddr};

const NAME: &[u8] = b"veil-client";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "another veil-client is running in this network namespace: stop it first \
         (two would undo each other's kill switch)"
    )]
    Busy,
    #[error("claiming the client's name in this network namespace")]
    Claim(#[source] std::io::Error),
}

/// Held for as long as this process is the namespace's client.
pub struct Instance {
    _socket: UnixListener,
}

/// Claims the namespace, or says who holds it.
pub fn claim() -> Result<Instance, Error> {
    let addr = UnixAddr::from_abstract_name(NAME).map_err(Error::Claim)?;
    match UnixListener::bind_addr(&addr) {
        Ok(socket) => Ok(Instance { _socket: socket }),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(Error::Busy),
        Err(e) => Err(Error::Claim(e)),
    }
}
