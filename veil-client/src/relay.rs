//! One local TCP connection carried over one connection through the
//! tunnel, both ways, half-closes passed on: what the SOCKS server and
//! the redirect do once their connection is open.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use tokio::{io::AsyncWrite, net::TcpStream};

use crate::netstack::TcpConn;

/// Rounds one direction may take in one turn of the task, before the
/// other direction and the runtime's other tasks get theirs.
const ROUNDS: usize = 8;

/// Copies until both directions ended. A side that shuts its write half
/// has the other side's write half shut (a FIN for a FIN) while the other
/// direction goes on; a reset on either side resets the other. (An
/// `io::Error`, not an `anyhow` one: a reset is routine, and `anyhow` may
/// capture a backtrace for each.)
///
/// The bytes move between the kernel's socket and the stack's buffers
/// directly ([`TcpConn::poll_send_from`], [`TcpConn::poll_recv_into`]):
/// no buffer of ours between them, one copy less each way than through
/// `AsyncRead`/`AsyncWrite`.
pub async fn both_ways(mut local: TcpStream, remote: TcpConn) -> io::Result<()> {
    let (mut up, mut down) = (Open, Open);
    // Whether the FIN for the remote's has been handed to `local`: a
    // shutdown that pends is polled again, not forgotten.
    let mut local_shut = false;
    let ended = poll_fn(|cx| {
        if up == Open {
            up = turn(cx, |cx| remote.poll_send_from(cx, &local))?;
            if up == Ended {
                remote.shutdown();
            }
        }
        if down == Open {
            down = turn(cx, |cx| remote.poll_recv_into(cx, &local))?;
        }
        if down == Ended && !local_shut {
            ready!(Pin::new(&mut local).poll_shutdown(cx))?;
            local_shut = true;
        }
        if up == Ended && local_shut {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    if ended.is_err() {
        remote.abort();
        reset(&local);
    }
    ended
}

/// Where one direction is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Open,
    Ended,
}
use Direction::{Ended, Open};

/// Moves one direction's bytes until it waits (a waker registered) or
/// ends (`0` bytes: an end of stream), at most [`ROUNDS`] times.
fn turn(
    cx: &mut Context<'_>,
    mut step: impl FnMut(&mut Context<'_>) -> Poll<io::Result<usize>>,
) -> io::Result<Direction> {
    for _ in 0..ROUNDS {
        match step(cx) {
            Poll::Ready(Ok(0)) => return Ok(Ended),
            Poll::Ready(Ok(_)) => {}
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok(Open),
        }
    }
    // More to do: come back after the others had their turn.
    cx.waker().wake_by_ref();
    Ok(Open)
}

/// Makes closing `stream` send a reset instead of a FIN.
pub fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}
