//! The client end of a tunnel.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use super::{
    link::{self, Link},
    CloseReason, Output, Stats, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_KEEPALIVE_TIMEOUT,
};
use crate::{
    capsule::{
        AssignedAddress, Capsule, DnsConfiguration, RequestedAddress, DEFAULT_MAX_CAPSULE_LEN,
    },
    gso::VnetHdr,
    h3::{self, Part},
    http, ProtoError,
};

/// How the client reaches and watches the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// The gateway's name for the Host header (`name` or `name:port`).
    pub host: String,
    /// The request path, normally [`http::WELL_KNOWN_PATH`].
    pub path: String,
    /// How often to PING the gateway once the tunnel is up.
    pub keepalive_interval: Duration,
    /// The gateway is dead if no byte arrives for this long. Twice the
    /// interval: every PING is answered, so a live gateway is heard from
    /// at least once per interval.
    pub keepalive_timeout: Duration,
    /// Time allowed for the 101 to arrive.
    pub handshake_timeout: Duration,
    /// Largest capsule accepted from the gateway.
    pub max_capsule_len: usize,
    /// The largest IP packet the gateway may send, plain or as a segment of
    /// its offload super-packets. The gateway's packets are sized by its
    /// internet side, which the client does not know: by default any.
    pub max_packet_len: u16,
    /// Announce offload datagrams: the caller must then handle
    /// [`Output::OffloadPacket`].
    pub offload: bool,
}

impl ClientConfig {
    /// Defaults: the well-known path, [`DEFAULT_KEEPALIVE_INTERVAL`],
    /// [`DEFAULT_KEEPALIVE_TIMEOUT`], [`DEFAULT_HANDSHAKE_TIMEOUT`],
    /// [`DEFAULT_MAX_CAPSULE_LEN`].
    pub fn new(host: impl Into<String>) -> Self {
        ClientConfig {
            host: host.into(),
            path: http::WELL_KNOWN_PATH.to_owned(),
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_capsule_len: DEFAULT_MAX_CAPSULE_LEN,
            max_packet_len: u16::MAX,
            offload: false,
        }
    }
}

/// [`ClientConfig::new`] with no host: `host` must be set.
impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig::new(String::new())
    }
}

/// The Request ID of the one ADDRESS_REQUEST the client sends.
const ADDRESS_REQUEST_ID: u64 = 1;

#[derive(Debug)]
enum Phase {
    /// The request is sent (or queued); collecting the response.
    AwaitingResponse {
        buf: Vec<u8>,
        deadline: Instant,
    },
    /// HTTP/3: a refusal's status arrived; collecting its one-line body.
    Refused {
        status: u16,
        body: Vec<u8>,
        deadline: Instant,
    },
    Established {
        next_ping: Instant,
    },
}

/// The most of a refusal's body kept for the log.
const MAX_REFUSAL_BODY: usize = 1024;

/// The client's connection to the gateway.
///
/// Queues the upgrade request on creation. On the 101 it sends an
/// ADDRESS_REQUEST for any IPv4 address (RFC 9484 §4.7.1 has a client
/// that needs an address ask for one; veil's gateway assigns it
/// unprompted as well, so either order works), then reports the
/// assignment as [`Output::Assigned`], the routes as [`Output::Routes`]
/// and the gateway's DNS configuration, if it sends one, as
/// [`Output::Dns`]. While up it PINGs every `keepalive_interval`.
#[derive(Debug)]
pub struct ClientSession {
    config: ClientConfig,
    phase: Phase,
    assigned: Option<(Ipv4Addr, u8)>,
    /// The IPv6 address assigned beside it, if the gateway carries IPv6.
    assigned6: Option<(Ipv6Addr, u8)>,
    /// The last DNS configuration reported.
    dns: Option<Vec<DnsConfiguration>>,
    next_nonce: u64,
    link: Link,
}

impl ClientSession {
    /// A session whose connection was established at `now`, with the
    /// upgrade request already queued. Fails if `host` or `path` cannot be
    /// sent as is.
    pub fn new(config: ClientConfig, now: Instant) -> Result<Self, ProtoError> {
        Self::with_binding(config, now, None)
    }

    /// A session over HTTP/3 whose QUIC connection was established at
    /// `now`, with the extended CONNECT queued for the request stream
    /// `stream_id`: its bytes come out as [`Output::Send`] and the
    /// stream's bytes go to [`Self::receive`], packets travel as
    /// [`Output::Datagram`] and [`Self::receive_datagram`].
    pub fn new_h3(config: ClientConfig, now: Instant, stream_id: u64) -> Result<Self, ProtoError> {
        Self::with_binding(config, now, Some(stream_id))
    }

    /// HTTP/1.1 without a stream id, HTTP/3 on the request stream given.
    fn with_binding(
        config: ClientConfig,
        now: Instant,
        h3_stream: Option<u64>,
    ) -> Result<Self, ProtoError> {
        http::validate_target(&config.host, &config.path)?;
        let mut link = Link::new(
            config.max_capsule_len,
            config.max_packet_len,
            config.keepalive_timeout,
            now,
        );
        let request = match h3_stream {
            Some(stream_id) => {
                link.set_h3(stream_id);
                h3::request(&config.host, &config.path, config.keepalive_interval)
            }
            None => http::request(
                &config.host,
                &config.path,
                config.keepalive_interval,
                config.offload,
            ),
        };
        link.send(&request);
        Ok(ClientSession {
            phase: Phase::AwaitingResponse {
                buf: Vec::new(),
                deadline: link::deadline(now, config.handshake_timeout),
            },
            assigned: None,
            assigned6: None,
            dns: None,
            next_nonce: 1,
            link,
            config,
        })
    }

    /// An HTTP datagram from the gateway (HTTP/3 only), received at `now`.
    ///
    /// Returns the packet it carries, for the caller to act on at once as
    /// on an [`Output::Packet`]: nothing is queued, nor copied.
    #[must_use = "the datagram's packet is returned, not queued"]
    pub fn receive_datagram<'a>(&mut self, datagram: &'a [u8], now: Instant) -> Option<&'a [u8]> {
        if self.link.is_closed() {
            return None;
        }
        self.link.heard_from_peer(now);
        let up = matches!(self.phase, Phase::Established { .. });
        self.link.receive_datagram(datagram, up)
    }

    /// The request stream over HTTP/3: the response's HEADERS (interim
    /// ones skipped), then DATA frames with capsules, or a refusal's body.
    fn receive_h3(&mut self, bytes: &[u8], now: Instant) {
        let (parts, error) = self.link.h3_frames(bytes);
        for part in parts {
            if self.link.is_closed() {
                return;
            }
            match (&mut self.phase, part) {
                (Phase::AwaitingResponse { deadline, .. }, Part::Headers(block)) => {
                    match h3::parse_status(&block) {
                        Ok(100..=199) => {}
                        Ok(200..=299) => self.upgraded(&[], now),
                        Ok(status) => {
                            self.phase = Phase::Refused {
                                status,
                                body: Vec::new(),
                                deadline: *deadline,
                            }
                        }
                        Err(e) => self.link.close(CloseReason::Protocol(e)),
                    }
                }
                (Phase::AwaitingResponse { .. }, Part::Data(_)) => {
                    self.link.close(CloseReason::Protocol(ProtoError::H3Frame {
                        frame_type: h3::FRAME_DATA,
                        problem: "came before the response's HEADERS",
                    }))
                }
                (Phase::Refused { body, .. }, Part::Data(data)) => {
                    let room = MAX_REFUSAL_BODY.saturating_sub(body.len());
                    body.extend_from_slice(&data[..data.len().min(room)]);
                    if body.contains(&b'\n') || body.len() >= MAX_REFUSAL_BODY {
                        self.refused();
                    }
                }
                (Phase::Established { .. }, Part::Data(data)) => self.receive_capsules(&data),
                (_, Part::Headers(_)) => {}
            }
        }
        if let Some(e) = error {
            self.link.close(CloseReason::Protocol(e));
        }
    }

    /// Closes with the refusal collected over HTTP/3.
    fn refused(&mut self) {
        if let Phase::Refused { status, body, .. } = &self.phase {
            let line = String::from_utf8_lossy(body);
            let line = line.lines().next().unwrap_or_default().trim();
            let message = (!line.is_empty()).then(|| crate::error::printable(line.as_bytes()));
            self.link.close(CloseReason::Refused {
                status: *status,
                reason: http::reason_phrase(*status).to_owned(),
                message,
            });
        }
    }

    /// Over HTTP/3: the largest HTTP datagram the path takes now (from
    /// QUIC), so that a larger packet is not handed over only to be
    /// dropped. On the client such a packet is answered with ICMP
    /// "fragmentation needed" (an [`Output::Packet`] for the TUN device),
    /// so that TCP through the tunnel finds the path MTU.
    pub fn set_max_datagram(&mut self, max: Option<usize>) {
        self.link.set_max_datagram(max, true);
    }

    /// Bytes received from the gateway at `now`.
    ///
    /// An `Err` means the session just closed because of these bytes: the
    /// gateway refused the upgrade ([`ProtoError::Refused`], which reads
    /// "gateway refused: 503 Service Unavailable (gateway full)") or broke
    /// the protocol. The same reason follows as [`Output::Close`], so
    /// either can be acted on. Bytes received after the close are ignored.
    pub fn receive(&mut self, bytes: &[u8], now: Instant) -> Result<(), ProtoError> {
        if self.link.is_closed() || bytes.is_empty() {
            return Ok(());
        }
        self.link.heard_from_peer(now);
        if self.link.is_h3() {
            self.receive_h3(bytes, now);
            return self.link.error_if_closed();
        }
        match &mut self.phase {
            // Only HTTP/3 has this phase.
            Phase::Refused { .. } => {}
            Phase::AwaitingResponse { buf, .. } => {
                buf.extend_from_slice(bytes);
                match http::parse_response(buf) {
                    Ok(None) => {}
                    Ok(Some((response, used))) => {
                        // Only what this end announced can be confirmed.
                        self.link
                            .set_offload(self.config.offload && response.offload);
                        let rest = buf.split_off(used);
                        self.upgraded(&rest, now);
                    }
                    Err(ProtoError::Refused {
                        status,
                        reason,
                        message,
                    }) => self.link.close(CloseReason::Refused {
                        status,
                        reason,
                        message,
                    }),
                    Err(e) => self.link.close(CloseReason::Protocol(e)),
                }
            }
            Phase::Established { .. } => self.receive_capsules(bytes),
        }
        self.link.error_if_closed()
    }

    fn upgraded(&mut self, rest: &[u8], now: Instant) {
        self.phase = Phase::Established {
            next_ping: link::deadline(now, ping_interval(&self.config)),
        };
        self.link
            .send_capsule(&Capsule::AddressRequest(vec![RequestedAddress {
                request_id: ADDRESS_REQUEST_ID,
                ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                prefix_len: 32,
            }]));
        // The gateway's capsules may have arrived with the 101.
        self.receive_capsules(rest);
    }

    fn receive_capsules(&mut self, bytes: &[u8]) {
        self.link.feed(bytes);
        while let Some(capsule) = self.link.next_config_capsule() {
            match capsule {
                Capsule::AddressAssign(list) => self.address_assigned(&list),
                Capsule::RouteAdvertisement(routes) => self.link.push(Output::Routes(routes)),
                Capsule::DnsAssign(configs) if self.dns.as_ref() != Some(&configs) => {
                    self.dns = Some(configs.clone());
                    self.link.push(Output::Dns(configs));
                }
                // The client assigns nothing: every request is declined.
                Capsule::AddressRequest(requests) => {
                    self.link.answer_address_request(&requests, None, None)
                }
                _ => {}
            }
        }
    }

    /// Takes the first IPv4 address that is not a rejection, and the first
    /// IPv6 one if there is one. The list is the gateway's full set of
    /// assignments, so one without any IPv4 address leaves the client
    /// nothing to send from; IPv6 is optional (a gateway that carries IPv4
    /// only assigns none).
    fn address_assigned(&mut self, list: &[AssignedAddress]) {
        let usable = list.iter().find_map(|a| match a.ip {
            IpAddr::V4(addr) if !a.is_rejection() => Some((addr, a.prefix_len)),
            _ => None,
        });
        let usable6 = list.iter().find_map(|a| match a.ip {
            IpAddr::V6(addr) if !a.is_rejection() => Some((addr, a.prefix_len)),
            _ => None,
        });
        match usable {
            None => {
                return self
                    .link
                    .close(CloseReason::Protocol(ProtoError::NoIpv4Assigned))
            }
            Some(current) if self.assigned == Some(current) => {}
            Some((addr, prefix)) => {
                self.assigned = Some((addr, prefix));
                self.link.push(Output::Assigned { addr, prefix });
            }
        }
        // A later list without IPv6 does not take it back: the routes and
        // the address stay until the client restarts.
        if let Some((addr, prefix)) = usable6 {
            if self.assigned6 != usable6 {
                self.assigned6 = usable6;
                self.link.push(Output::Assigned6 { addr, prefix });
            }
        }
    }

    /// The gateway closed its side of the connection.
    pub fn receive_eof(&mut self) {
        if matches!(self.phase, Phase::Refused { .. }) {
            return self.refused();
        }
        let during_handshake = matches!(self.phase, Phase::AwaitingResponse { .. });
        self.link
            .close(CloseReason::PeerClosed { during_handshake });
    }

    /// Queues an IP packet toward the gateway (DATAGRAM, context ID 0).
    /// Dropped, and counted, if the tunnel is not up.
    pub fn send_packet(&mut self, packet: &[u8]) {
        let up = matches!(self.phase, Phase::Established { .. });
        self.link.send_packet(packet, up);
    }

    /// Queues a packet read from a TUN device opened with `IFF_VNET_HDR`:
    /// an offload datagram if the gateway takes them, otherwise completed
    /// and segmented here into plain packets.
    pub fn send_offload_packet(&mut self, hdr: &VnetHdr, packet: &[u8]) {
        let up = matches!(self.phase, Phase::Established { .. });
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
            Phase::AwaitingResponse { deadline, .. } | Phase::Refused { deadline, .. } => *deadline,
            Phase::Established { next_ping } => (*next_ping).min(self.link.peer_deadline()),
        })
    }

    /// Fires whatever timer is due at `now`: the handshake deadline, the
    /// peer-dead deadline, or the next PING.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::AwaitingResponse { deadline, .. } => {
                if now >= *deadline {
                    let after = self.config.handshake_timeout;
                    self.link.close(CloseReason::HandshakeTimeout { after });
                }
            }
            Phase::Refused { deadline, .. } => {
                if now >= *deadline {
                    self.refused();
                }
            }
            Phase::Established { next_ping } => {
                self.link.check_peer_alive(now);
                if now >= *next_ping && !self.link.is_closed() {
                    // From now, not from the missed deadline: after a stall
                    // (a suspended laptop) send one PING, not a burst.
                    *next_ping = link::deadline(now, ping_interval(&self.config));
                    let nonce = self.next_nonce;
                    self.next_nonce = self.next_nonce.wrapping_add(1);
                    self.link.send_capsule(&Capsule::Ping(nonce));
                    self.link.stats.pings_sent += 1;
                }
            }
        }
    }

    /// The address the gateway assigned, once known.
    pub fn assigned(&self) -> Option<(Ipv4Addr, u8)> {
        self.assigned
    }

    /// The IPv6 address the gateway assigned, if it carries IPv6.
    pub fn assigned6(&self) -> Option<(Ipv6Addr, u8)> {
        self.assigned6
    }

    pub fn is_established(&self) -> bool {
        matches!(self.phase, Phase::Established { .. }) && !self.link.is_closed()
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

/// The interval actually used: the announced one, so the gateway's "twice
/// the interval" holds (capped at [`http::MAX_KEEPALIVE`]).
fn ping_interval(config: &ClientConfig) -> Duration {
    config.keepalive_interval.min(http::MAX_KEEPALIVE)
}
