//! The two ends of a tunnel as deterministic state machines.
//!
//! A session never touches a socket or a clock. The caller feeds it what
//! arrived ([`ServerSession::receive`]) together with the current
//! [`Instant`], hands it packets to send, and drains [`Output`]s with
//! `poll_output` until it returns `None`. Timers work the same way:
//! `poll_timeout` says when the session next needs attention and
//! `handle_timeout` is called then. Tests therefore run both ends
//! back-to-back on virtual time, and the I/O code around a session is a
//! plain loop.
//!
//! Every way a session ends comes out of `poll_output` as
//! [`Output::Close`], after any bytes that must still be written (such as a
//! `400 Bad Request`). `receive` also returns the protocol error that
//! closed the session, for logging; a caller that stops at that error
//! without draining `poll_output` drops the response that explains it.

mod client;
mod link;
mod server;

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

pub use client::{ClientConfig, ClientSession};
pub use server::{ServerConfig, ServerSession};

use crate::{
    capsule::{DnsConfiguration, IpAddressRange},
    http, ProtoError,
};

#[cfg(doc)]
use std::time::Instant;

/// How often the client sends a PING once the tunnel is up.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// How long either end waits for a byte before declaring its peer dead:
/// twice the PING interval, so one lost or late PING is not fatal.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest IP packet a client may send, unless the gateway says
/// otherwise: Ethernet's MTU, what most internet paths carry.
pub const DEFAULT_MAX_PACKET_LEN: u16 = 1500;
/// How long the upgrade may take: request on the gateway, 101 on the client.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Something the caller must act on, in the order produced.
///
/// Bytes to send are coalesced: all capsules queued since the last
/// [`Output::Send`] come out as one buffer, so a burst of packets costs one
/// write. [`Output::Close`] comes last, after every byte that was meant to
/// be sent before closing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Write these bytes to the TLS stream. Give the buffer back with
    /// `recycle_send_buffer` once written to spare an allocation.
    Send(Vec<u8>),
    /// An IP packet from the peer: for the datapath on the gateway, for the
    /// TUN device on the client. (Over HTTP/3 the peer's packets come back
    /// from `receive_datagram` instead, borrowed; this end's own ICMP
    /// errors still come out here.)
    Packet(Vec<u8>),
    /// HTTP/3 only: one HTTP datagram (Quarter Stream ID, context ID,
    /// packet) for a QUIC DATAGRAM frame.
    Datagram(Vec<u8>),
    /// Only when offload was negotiated: a [`crate::gso::VnetHdr`] (already
    /// validated) then an IP packet, ready for a TUN device opened with
    /// `IFF_VNET_HDR`.
    OffloadPacket(Vec<u8>),
    /// Client only: the gateway assigned this address. Emitted again only
    /// if the assignment changes.
    Assigned { addr: Ipv4Addr, prefix: u8 },
    /// Client only: the gateway also assigned this IPv6 address (it
    /// carries IPv6 through the tunnel). Follows [`Output::Assigned`];
    /// emitted again only if it changes. Never emitted by a gateway that
    /// assigns IPv4 only.
    Assigned6 { addr: Ipv6Addr, prefix: u8 },
    /// Client only: the gateway's full route list, replacing any earlier.
    Routes(Vec<IpAddressRange>),
    /// Client only: the DNS configuration the gateway announced
    /// (DNS_ASSIGN), replacing any earlier; emitted again only if it
    /// changes. Empty: the gateway withdrew it.
    Dns(Vec<DnsConfiguration>),
    /// The session is over: close the connection once the bytes already
    /// emitted are written. Nothing follows.
    Close { reason: CloseReason },
}

/// What a pump needs of either end's state machine: the same five calls
/// drive a [`ClientSession`] and a [`ServerSession`], whatever carries
/// their bytes.
pub trait Session {
    /// Feeds bytes that arrived from the peer (see the sessions' own docs).
    fn receive(&mut self, bytes: &[u8], now: std::time::Instant) -> Result<(), ProtoError>;
    /// The largest HTTP datagram the path takes now (HTTP/3 only).
    fn set_max_datagram(&mut self, max: Option<usize>);
    /// Feeds an HTTP datagram that arrived from the peer (HTTP/3 only);
    /// returns the packet in it, which is not queued as an output.
    fn receive_datagram<'a>(
        &mut self,
        datagram: &'a [u8],
        now: std::time::Instant,
    ) -> Option<&'a [u8]>;
    /// The next thing to do, `None` when there is nothing left.
    fn poll_output(&mut self) -> Option<Output>;
    /// Returns a written [`Output::Send`] buffer for reuse.
    fn recycle_send_buffer(&mut self, buf: Vec<u8>);
    /// When [`Session::handle_timeout`] must next be called.
    fn poll_timeout(&self) -> Option<std::time::Instant>;
    /// Fires whatever timer is due at `now`.
    fn handle_timeout(&mut self, now: std::time::Instant);
}

macro_rules! session_by_inherent_methods {
    ($($t:ty),*) => {$(
        impl Session for $t {
            fn receive(&mut self, bytes: &[u8], now: std::time::Instant) -> Result<(), ProtoError> {
                <$t>::receive(self, bytes, now)
            }
            fn set_max_datagram(&mut self, max: Option<usize>) {
                <$t>::set_max_datagram(self, max)
            }
            fn receive_datagram<'a>(
                &mut self,
                datagram: &'a [u8],
                now: std::time::Instant,
            ) -> Option<&'a [u8]> {
                <$t>::receive_datagram(self, datagram, now)
            }
            fn poll_output(&mut self) -> Option<Output> {
                <$t>::poll_output(self)
            }
            fn recycle_send_buffer(&mut self, buf: Vec<u8>) {
                <$t>::recycle_send_buffer(self, buf)
            }
            fn poll_timeout(&self) -> Option<std::time::Instant> {
                <$t>::poll_timeout(self)
            }
            fn handle_timeout(&mut self, now: std::time::Instant) {
                <$t>::handle_timeout(self, now)
            }
        }
    )*};
}

session_by_inherent_methods!(ClientSession, ServerSession);

/// The most bytes a caller should hand a session for one write, as whole
/// packets: it stops taking packets once this many are in, so a turn adds
/// at most this plus one largest packet (`largest`, offload header and
/// all), each with its capsule's framing, and that still fits the send
/// buffer the session keeps between writes.
///
/// A packet's framing is a capsule type, a length and a context ID: 3
/// bytes below 64 bytes of packet, at most 6 beyond. On the smallest
/// packet, a bare 20-byte IPv4 header, that is 3/20 more; on anything
/// larger, less.
pub const fn batch_bytes(largest: usize) -> usize {
    (link::MAX_RECYCLED_CAPACITY - largest - MAX_FRAMING) * 20 / 23
}

/// The most framing one packet's capsule adds (see [`batch_bytes`]).
const MAX_FRAMING: usize = 6;

/// Adds an [`Output::Send`] buffer to the bytes waiting for one write:
/// taken whole when nothing waits (no copy), appended otherwise. Returns
/// the buffer left over, for `recycle_send_buffer`.
pub fn coalesce(out: &mut Vec<u8>, bytes: Vec<u8>) -> Vec<u8> {
    if out.is_empty() {
        std::mem::replace(out, bytes)
    } else {
        out.extend_from_slice(&bytes);
        bytes
    }
}

/// Why a session ended, written to read well in a log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The upgrade did not complete in time (no full request on the
    /// gateway, no 101 on the client).
    HandshakeTimeout { after: Duration },
    /// Nothing at all arrived from the peer for this long.
    PeerDead { silent_for: Duration },
    /// Gateway: the upgrade request was malformed; a 400 carrying this
    /// error was sent.
    BadRequest(ProtoError),
    /// Gateway: the caller refused the client (see
    /// [`ServerSession::refuse`]); the refusal was sent.
    RefusedClient { status: u16, message: String },
    /// Client: the gateway answered the upgrade with something other than
    /// 101.
    Refused {
        status: u16,
        reason: String,
        message: Option<String>,
    },
    /// The peer broke the protocol.
    Protocol(ProtoError),
    /// The peer closed the connection (see `receive_eof`).
    PeerClosed { during_handshake: bool },
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::HandshakeTimeout { after } => {
                write!(f, "handshake timed out after {after:?}")
            }
            CloseReason::PeerDead { silent_for } => {
                write!(f, "peer sent nothing for {silent_for:?}")
            }
            CloseReason::BadRequest(e) => write!(f, "bad upgrade request: {e}"),
            CloseReason::RefusedClient { status, message } => write!(
                f,
                "refused the client: {status} {} ({message})",
                http::reason_phrase(*status)
            ),
            CloseReason::Refused {
                status,
                reason,
                message,
            } => {
                // Same wording as the error the response parser returns.
                let e = ProtoError::Refused {
                    status: *status,
                    reason: reason.clone(),
                    message: message.clone(),
                };
                write!(f, "{e}")
            }
            CloseReason::Protocol(e) => write!(f, "protocol error: {e}"),
            CloseReason::PeerClosed {
                during_handshake: false,
            } => f.write_str("peer closed the connection"),
            CloseReason::PeerClosed {
                during_handshake: true,
            } => f.write_str("peer closed the connection during the handshake"),
        }
    }
}

/// Per-session counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// IP packets received from the peer, and their bytes.
    pub packets_received: u64,
    pub bytes_received: u64,
    /// IP packets queued toward the peer, and their bytes.
    pub packets_sent: u64,
    pub bytes_sent: u64,
    /// Packets handed to `send_packet` before the tunnel was up or after it
    /// closed, and dropped.
    pub packets_not_sent: u64,
    /// DATAGRAM capsules with a context ID not in use (other than 0, or
    /// the offload context when offload was not negotiated), dropped.
    pub datagrams_dropped: u64,
    /// Offload datagrams whose header does not fit their packet, dropped.
    pub offload_invalid: u64,
    /// Plain packets longer than the largest this end takes (the
    /// gateway's MTU), dropped: what leaves the gateway never exceeds its
    /// MTU, and a run of them merged after the tunnel never gets a segment
    /// size an offload header could not have had.
    pub packets_too_long: u64,
    /// Capsules of unknown types, or of types this end ignores (a
    /// client's configuration capsules, at the gateway), skipped unread.
    pub unknown_capsules: u64,
    pub pings_sent: u64,
    pub pongs_sent: u64,
    pub pongs_received: u64,
}

#[cfg(test)]
mod h3_tests;
#[cfg(test)]
mod tests;
