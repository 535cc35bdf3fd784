//! One local TCP connection carried over one connection through the
//! tunnel, both ways, half-closes passed on: what the SOCKS server and
//! the redirect do once their connection is open.

use anyhow::Result;
use tokio::net::TcpStream;

use crate::netstack::TcpConn;

/// Bytes read at once each way.
const BUFFER: usize = 64 << 10;

/// Copies until both directions ended. A side that shuts its write half
/// has the other side's write half shut (a FIN for a FIN) while the other
/// direction goes on; a reset on either side resets the other.
pub async fn both_ways(mut local: TcpStream, mut remote: TcpConn) -> Result<()> {
    match tokio::io::copy_bidirectional_with_sizes(&mut local, &mut remote, BUFFER, BUFFER).await {
        Ok(_) => Ok(()),
        Err(e) => {
            remote.abort();
            reset(&local);
            Err(e.into())
        }
    }
}

/// Makes closing `stream` send a reset instead of a FIN.
pub fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}
