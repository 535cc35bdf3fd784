//! The gateway end of a tunnel.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use super::{
    link::{self, Link},
    CloseReason, Output, Stats, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_MAX_PACKET_LEN,
};
use crate::{
    capsule::{
        self, validate_routes, Capsule, DnsConfiguration, IpAddressRange, DEFAULT_MAX_CAPSULE_LEN,
    },
    gso::VnetHdr,
    h3::{self, Part},
    http::{self, Request},
    ProtoError,
};

/// The configuration capsules a client may send and the gateway ignores.
const CLIENT_CONFIGURATION: [u64; 3] = [
    capsule::ADDRESS_ASSIGN,
    capsule::ROUTE_ADVERTISEMENT,
    capsule::DNS_ASSIGN,
];

/// What the gateway tells one client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// The client's virtual address, assigned as a /32.
    pub assigned: Ipv4Addr,
    /// The client's IPv6 address, assigned as a /128 beside the IPv4 one
    /// in the same ADDRESS_ASSIGN; `None`: the tunnel carries IPv4 only.
    /// Routing IPv6 is up to `routes` ([`IpAddressRange::ALL_IPV6`]).
    pub assigned6: Option<Ipv6Addr>,
    /// The ranges the gateway routes for the client, in RFC 9484 order.
    /// Empty advertises no routes at all.
    pub routes: Vec<IpAddressRange>,
    /// A client that sends nothing (no packet, no PING) for this long is
    /// dead. Should be twice the client's PING interval.
    pub keepalive_timeout: Duration,
    /// Time allowed for a complete upgrade request after the connection is
    /// accepted.
    pub handshake_timeout: Duration,
    /// Largest capsule accepted from the client.
    pub max_capsule_len: usize,
    /// The largest IP packet the client may send, plain or as a segment of
    /// its offload super-packets (the gateway's TUN MTU); a longer one is
    /// dropped and counted (`packets_too_long`).
    pub max_packet_len: u16,
    /// Offer offload datagrams to a client that announces them: the caller
    /// must then handle [`Output::OffloadPacket`].
    pub offload: bool,
    /// The resolvers the client should use, sent as DNS_ASSIGN right after
    /// the routes (the draft asks for it never to come before them, so a
    /// client never points its DNS at a resolver outside the tunnel).
    /// Empty: no DNS_ASSIGN.
    pub dns: Vec<DnsConfiguration>,
}

impl ServerConfig {
    /// Defaults: all of IPv4 routed, [`DEFAULT_KEEPALIVE_TIMEOUT`],
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`], [`DEFAULT_MAX_CAPSULE_LEN`].
    pub fn new(assigned: Ipv4Addr) -> Self {
        ServerConfig {
            assigned,
            assigned6: None,
            routes: vec![IpAddressRange::ALL_IPV4],
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_capsule_len: DEFAULT_MAX_CAPSULE_LEN,
            max_packet_len: DEFAULT_MAX_PACKET_LEN,
            offload: false,
            dns: Vec::new(),
        }
    }

    /// Checks what the client would otherwise reject mid-handshake: an
    /// address that cannot be a host's (including the unspecified address
    /// of [`ServerConfig::default`], which on the wire means "no address"),
    /// and routes out of RFC 9484 §4.7.3 order.
    pub fn validate(&self) -> Result<(), ProtoError> {
        let addr = self.assigned;
        if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
            return Err(ProtoError::UnassignableAddress {
                addr: IpAddr::V4(addr),
            });
        }
        if let Some(addr) = self.assigned6 {
            if addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() {
                return Err(ProtoError::UnassignableAddress {
                    addr: IpAddr::V6(addr),
                });
            }
        }
        validate_routes(&self.routes)?;
        Capsule::DnsAssign(self.dns.clone()).encode(&mut Vec::new())
    }
}

impl ServerConfig {
    /// The unsolicited ADDRESS_ASSIGN entries: the IPv4 address, then the
    /// IPv6 one if any.
    fn assignments(&self) -> Vec<crate::capsule::AssignedAddress> {
        let v6 = self.assigned6.map(IpAddr::V6);
        std::iter::once(IpAddr::V4(self.assigned))
            .chain(v6)
            .map(link::unsolicited)
            .collect()
    }
}

/// [`ServerConfig::new`] with no address: `assigned` must be set.
impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig::new(Ipv4Addr::UNSPECIFIED)
    }
}

#[derive(Debug)]
enum Phase {
    /// Collecting the upgrade request.
    AwaitingRequest {
        buf: Vec<u8>,
        deadline: Instant,
    },
    Established,
}

/// One client connection on the gateway.
///
/// Awaits the upgrade request; answers a valid one with `101 Switching
/// Protocols`, then ADDRESS_ASSIGN (the VIP /32 and, if configured, the
/// IPv6 /128, Request ID 0),
/// ROUTE_ADVERTISEMENT (the configured routes) and, if configured,
/// DNS_ASSIGN, all in one [`Output::Send`]. From then on DATAGRAM capsules with context ID 0
/// become [`Output::Packet`]s (and, with offload negotiated, context 2
/// [`Output::OffloadPacket`]s), PINGs are answered with PONGs, and
/// ADDRESS_REQUESTs are answered with the same fixed VIP.
#[derive(Debug)]
pub struct ServerSession {
    config: ServerConfig,
    /// The configuration capsules that follow the 101, encoded once.
    greeting: Vec<u8>,
    phase: Phase,
    request: Option<Request>,
    link: Link,
}

impl ServerSession {
    /// A session for a connection accepted at `now`. Fails only if the
    /// configuration does not pass [`ServerConfig::validate`].
    pub fn new(config: ServerConfig, now: Instant) -> Result<Self, ProtoError> {
        config.validate()?;
        let mut greeting = Vec::new();
        Capsule::AddressAssign(config.assignments()).encode(&mut greeting)?;
        Capsule::RouteAdvertisement(config.routes.clone()).encode(&mut greeting)?;
        if !config.dns.is_empty() {
            Capsule::DnsAssign(config.dns.clone()).encode(&mut greeting)?;
        }
        let mut link = Link::new(
            config.max_capsule_len,
            config.max_packet_len,
            config.keepalive_timeout,
            now,
        );
        // A client's configuration capsules are ignored here (see
        // `receive_capsules`): skipped unread rather than built, since a
        // capsule of one-byte domain names would make a vector 24 times
        // its size only to be dropped.
        link.ignore_capsules(&CLIENT_CONFIGURATION);
        Ok(ServerSession {
            phase: Phase::AwaitingRequest {
                buf: Vec::new(),
                deadline: link::deadline(now, config.handshake_timeout),
            },
            greeting,
            request: None,
            link,
            config,
        })
    }

    /// A session over HTTP/3 for the request on `stream_id`, accepted at
    /// `now`: the request stream's bytes go to [`Self::receive`], QUIC
    /// DATAGRAM payloads to [`Self::receive_datagram`]; packets toward the
    /// client come out as [`Output::Datagram`], everything else as the
    /// request stream's bytes in [`Output::Send`].
    pub fn new_h3(config: ServerConfig, now: Instant, stream_id: u64) -> Result<Self, ProtoError> {
        let mut session = Self::new(config, now)?;
        session.link.set_h3(stream_id);
        Ok(session)
    }

    /// An HTTP datagram from the client (HTTP/3 only), received at `now`.
    ///
    /// Returns the packet it carries, for the caller to act on at once as
    /// on an [`Output::Packet`]: nothing is queued, nor copied.
    #[must_use = "the datagram's packet is returned, not queued"]
    pub fn receive_datagram<'a>(&mut self, datagram: &'a [u8], now: Instant) -> Option<&'a [u8]> {
        if self.link.is_closed() {
            return None;
        }
        self.link.heard_from_peer(now);
        let up = matches!(self.phase, Phase::Established);
        self.link.receive_datagram(datagram, up)
    }

    /// Over HTTP/3: the largest HTTP datagram the path takes now (from
    /// QUIC), so that a larger packet is not handed over only to be
    /// dropped.
    pub fn set_max_datagram(&mut self, max: Option<usize>) {
        self.link.set_max_datagram(max, false);
    }

    /// Bytes received from the client at `now`.
    ///
    /// An `Err` means the session just closed because of these bytes (a
    /// malformed request, a protocol violation). It is for logging only:
    /// keep draining [`Self::poll_output`], which still holds the `400 Bad
    /// Request` to write and the [`Output::Close`]. Bytes received after
    /// the close are ignored.
    pub fn receive(&mut self, bytes: &[u8], now: Instant) -> Result<(), ProtoError> {
        if self.link.is_closed() || bytes.is_empty() {
            return Ok(());
        }
        self.link.heard_from_peer(now);
        if self.link.is_h3() {
            self.receive_h3(bytes);
            return self.link.error_if_closed();
        }
        match &mut self.phase {
            Phase::AwaitingRequest { buf, .. } => {
                buf.extend_from_slice(bytes);
                match http::parse_request(buf) {
                    Ok(None) => {}
                    Ok(Some((request, used))) => {
                        let rest = buf.split_off(used);
                        self.upgrade(request, &rest);
                    }
                    Err(e) => self.bad_request(e),
                }
            }
            Phase::Established => self.receive_capsules(bytes),
        }
        self.link.error_if_closed()
    }

    /// Answers a malformed request with 400 and its reason, and closes.
    fn bad_request(&mut self, e: ProtoError) {
        let body = e.to_string();
        if self.link.is_h3() {
            self.link.send(&h3::refusal(400, &body));
        } else {
            self.link
                .send(&http::refusal(400, http::reason_phrase(400), &body));
        }
        self.link.close(CloseReason::BadRequest(e));
    }

    /// The request stream over HTTP/3: the request's HEADERS, then DATA
    /// frames carrying capsules.
    fn receive_h3(&mut self, bytes: &[u8]) {
        let (parts, error) = self.link.h3_frames(bytes);
        for part in parts {
            if self.link.is_closed() {
                return;
            }
            match (&self.phase, part) {
                (Phase::AwaitingRequest { .. }, Part::Headers(block)) => {
                    match h3::parse_request(&block) {
                        Ok(request) => self.upgrade(request, &[]),
                        Err(e) => self.bad_request(e),
                    }
                }
                (Phase::AwaitingRequest { .. }, Part::Data(_)) => {
                    self.bad_request(ProtoError::H3Frame {
                        frame_type: h3::FRAME_DATA,
                        problem: "came before the request's HEADERS",
                    })
                }
                (Phase::Established, Part::Data(data)) => self.receive_capsules(&data),
                // Trailers: nothing in them for a tunnel.
                (Phase::Established, Part::Headers(_)) => {}
            }
        }
        match error {
            Some(e) if matches!(self.phase, Phase::AwaitingRequest { .. }) => self.bad_request(e),
            Some(e) => self.link.close(CloseReason::Protocol(e)),
            None => {}
        }
    }

    fn upgrade(&mut self, request: Request, rest: &[u8]) {
        // A client that announces its PING interval is dead after two
        // silent intervals; others get the configured timeout. The client
        // chooses the wait, within bounds: `parse_request` refuses an
        // interval above MAX_KEEPALIVE, and the cap here keeps that true
        // (and the arithmetic panic-free) whatever produced the request.
        if let Some(interval) = request.keepalive {
            let interval = interval.min(http::MAX_KEEPALIVE);
            self.link.set_keepalive_timeout(interval.saturating_mul(2));
        }
        let h3 = self.link.is_h3();
        let offload = self.config.offload && request.offload && !h3;
        self.link.set_offload(offload);
        self.request = Some(request);
        if h3 {
            self.link.send(&h3::ok_response());
        } else {
            self.link.send(&http::switching_protocols(offload));
        }
        self.link.send_capsules(&self.greeting);
        self.phase = Phase::Established;
        // The client may have sent capsules right behind its request.
        self.receive_capsules(rest);
    }

    fn receive_capsules(&mut self, bytes: &[u8]) {
        self.link.feed(bytes);
        while let Some(capsule) = self.link.next_config_capsule() {
            // A client assigning addresses, advertising routes or
            // announcing resolvers to the gateway (network-to-network use)
            // is not supported: those capsules are well-formed and
            // harmless, so they are ignored (the DNS draft, §3.5: a proxy
            // ignores DNS configuration from its clients).
            if let Capsule::AddressRequest(requests) = capsule {
                self.link.answer_address_request(
                    &requests,
                    Some(self.config.assigned),
                    self.config.assigned6,
                );
            }
        }
    }

    /// The client closed its side of the connection.
    pub fn receive_eof(&mut self) {
        let during_handshake = matches!(self.phase, Phase::AwaitingRequest { .. });
        self.link
            .close(CloseReason::PeerClosed { during_handshake });
    }

    /// Refuses this client with `status` (e.g. 503 when the gateway is
    /// full, 403 when it is not allowed) and `message` as the explanation:
    /// the refusal and then [`Output::Close`] come out of
    /// [`Self::poll_output`] at once. No effect once the tunnel is up or the
    /// session closed.
    ///
    /// For the client to read the refusal, do not close the socket with
    /// unread input: its request may arrive just after the refusal is
    /// written, and closing a socket with unread data makes the kernel
    /// send a reset that can destroy the refusal in flight (RFC 9112 §9.6).
    /// Shut down the write side, then read and discard until the client
    /// closes or a second or so has passed.
    pub fn refuse(&mut self, status: u16, message: &str) {
        if self.link.is_closed() || !matches!(self.phase, Phase::AwaitingRequest { .. }) {
            return;
        }
        let response = if self.link.is_h3() {
            h3::refusal(status, message)
        } else {
            http::refusal(status, http::reason_phrase(status), message)
        };
        self.link.send(&response);
        self.link.close(CloseReason::RefusedClient {
            status,
            message: message.to_owned(),
        });
    }

    /// Queues an IP packet toward the client (DATAGRAM, context ID 0).
    /// Dropped, and counted, if the tunnel is not up.
    pub fn send_packet(&mut self, packet: &[u8]) {
        let up = matches!(self.phase, Phase::Established);
        self.link.send_packet(packet, up);
    }

    /// Queues a packet read from a TUN device opened with `IFF_VNET_HDR`:
    /// an offload datagram if the client takes them, otherwise completed
    /// and segmented here into plain packets.
    pub fn send_offload_packet(&mut self, hdr: &VnetHdr, packet: &[u8]) {
        let up = matches!(self.phase, Phase::Established);
        self.link.send_offload_packet(hdr, packet, up);
    }

    /// Both ends agreed on offload datagrams (known once established).
    pub fn offload(&self) -> bool {
        self.link.offload()
    }

    /// The next thing to do, `None` when there is nothing left.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.link.poll_output()
    }

    /// Returns a written [`Output::Send`] buffer for reuse.
    pub fn recycle_send_buffer(&mut self, buf: Vec<u8>) {
        self.link.recycle(buf);
    }

    /// When [`Self::handle_timeout`] must next be called; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.link.is_closed() {
            return None;
        }
        Some(match &self.phase {
            Phase::AwaitingRequest { deadline, .. } => *deadline,
            Phase::Established => self.link.peer_deadline(),
        })
    }

    /// Fires whatever timer is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.phase {
            Phase::AwaitingRequest { deadline, .. } => {
                if now >= *deadline {
                    let after = self.config.handshake_timeout;
                    self.link.close(CloseReason::HandshakeTimeout { after });
                }
            }
            Phase::Established => self.link.check_peer_alive(now),
        }
    }

    /// The client's upgrade request, once read.
    pub fn request(&self) -> Option<&Request> {
        self.request.as_ref()
    }

    pub fn is_established(&self) -> bool {
        matches!(self.phase, Phase::Established) && !self.link.is_closed()
    }

    pub fn is_closed(&self) -> bool {
        self.link.is_closed()
    }

    /// Why the session closed, once it has.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.link.close_reason()
    }

    pub fn stats(&self) -> &Stats {
        &self.link.stats
    }
}
