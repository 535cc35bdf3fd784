//! The one loop both ends run: a session state machine between a
//! [`Transport`] (the tunnel's bytes) and its [`Local`] side (the client's
//! TUN device; the gateway's datapath and reply queue).
//!
//! Everything waits in one `select!`: bytes from the peer, writes making
//! progress, local work, the session's timer. Nothing waits on the peer
//! alone, so a local signal (stop, revocation) is seen however stuck the
//! peer is, and a peer that takes none of our bytes for
//! [`Limits::write_stall`] is let go.

use std::{io, time::Duration};

use veil_proto::session::{coalesce, CloseReason, Output, Session};

use crate::stream::{sleep_until_some, Event, Transport};

/// How much a pump buffers before it stops taking more. Local work (the
/// next packets for the peer) is taken only once everything taken before
/// is written: the backlog waits where it is bounded (the TUN device's
/// queue, the reply queue), not in the write buffer, where it only adds
/// latency (measured: RTT under load 7 ms with a 512 KiB allowance, 3.4 ms
/// without).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Unwritten bytes above which the peer is not read: a peer that sends
    /// but does not read cannot grow our buffer.
    pub read_limit: usize,
    /// A peer that takes none of our bytes for this long is gone.
    pub write_stall: Duration,
}

/// Datagrams taken from the transport per turn of the loop, at most.
const DATAGRAM_BATCH: usize = 64;

/// The side of a session that is not the tunnel.
pub trait Local<S> {
    /// Why this side ended the session.
    type End;

    /// Acts on an output of the session other than `Send` and `Close`
    /// (a packet, an address, routes); `Err` ends the pump.
    fn output(&mut self, session: &mut S, output: Output) -> Result<(), Self::End>;

    /// Acts on a packet from the peer that arrived in an HTTP datagram,
    /// borrowed from it, as on an [`Output::Packet`].
    fn packet(&mut self, session: &mut S, packet: &[u8]) -> Result<(), Self::End>;

    /// Waits for local work and does it: packets into the session (only
    /// when `room`: nothing is left to write), or a signal that ends the pump. Must be cancel-safe:
    /// the pump drops it whenever something else happens first.
    #[expect(
        async_fn_in_trait,
        reason = "implemented and called with concrete types, whose futures' Send-ness the compiler sees"
    )]
    async fn next(&mut self, session: &mut S, room: bool) -> Result<(), Self::End>;
}

/// Why a pump stopped.
#[derive(Debug)]
pub enum End<E> {
    /// The session closed itself (protocol error, timeout, refusal): what
    /// it queued before is worth sending.
    Closed(CloseReason),
    /// The peer closed the connection.
    PeerClosed,
    /// The transport failed.
    Failed(io::Error),
    /// The peer took none of our bytes for [`Limits::write_stall`].
    Stalled,
    /// The local side ended it.
    Local(E),
}

/// Runs `session` between `transport` and `local` until one of them ends
/// it. `buf` receives the peer's bytes.
pub async fn run<S, T, L>(
    session: &mut S,
    transport: &mut T,
    local: &mut L,
    limits: Limits,
    buf: &mut [u8],
) -> End<L::End>
where
    S: Session,
    T: Transport,
    L: Local<S>,
{
    loop {
        // Something happened (or the pump starts): see `busy`.
        crate::busy::touch();
        // QUIC's path MTU discovery moves this; a byte stream has none.
        session.set_max_datagram(transport.max_datagram());
        // Act on everything the state machine has to say.
        while let Some(output) = session.poll_output() {
            match output {
                Output::Send(bytes) => {
                    session.recycle_send_buffer(coalesce(transport.out_mut(), bytes))
                }
                Output::Datagram(datagram) => transport.send_datagram(datagram),
                Output::Close { reason } => return End::Closed(reason),
                other => {
                    if let Err(end) = local.output(session, other) {
                        return End::Local(end);
                    }
                }
            }
        }
        let deadline = session
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        let stall = transport
            .stalled_since()
            .map(|since| since + limits.write_stall);
        let pending = transport.pending();
        tokio::select! {
            event = transport.next(buf, pending < limits.read_limit) => match event {
                Ok(Event::Read(0)) => return End::PeerClosed,
                // A protocol error closes the session, which says so in
                // its Close output.
                Ok(Event::Read(n)) => {
                    let _ = session.receive(&buf[..n], std::time::Instant::now());
                }
                Ok(Event::Wrote) => {}
                Ok(Event::Datagram(first)) => {
                    let now = std::time::Instant::now();
                    // What else arrived meanwhile, in this turn: one pass
                    // of the loop per datagram would cost more than the
                    // datagram.
                    let rest = std::iter::from_fn(|| transport.try_datagram()).take(DATAGRAM_BATCH);
                    for datagram in std::iter::once(first).chain(rest) {
                        // The packet goes on straight from the datagram:
                        // neither queued nor copied.
                        let Some(packet) = session.receive_datagram(&datagram, now) else { continue };
                        if let Err(end) = local.packet(session, packet) {
                            return End::Local(end);
                        }
                    }
                }
                Err(e) => return End::Failed(e),
            },
            done = local.next(session, pending == 0) => {
                if let Err(end) = done {
                    return End::Local(end);
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                session.handle_timeout(std::time::Instant::now())
            }
            () = sleep_until_some(stall) => return End::Stalled,
        }
    }
}
