//! What both ends share once the tunnel is up: the output queue, the
//! capsule decoder, liveness bookkeeping, and the capsules both ends handle
//! the same way (packets, PING/PONG, unknown types).

use std::{
    collections::VecDeque,
    mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use super::{CloseReason, Output, Stats};
use crate::{
    capsule::{self, AssignedAddress, Capsule, CapsuleDecoder, RequestedAddress},
    gso::{self, VnetHdr, VNET_HDR_LEN},
    h3::{self, FrameDecoder, Part},
    varint, ProtoError,
};

/// What a session over HTTP/3 needs beyond the capsule stream: capsules
/// travel in DATA frames on the request stream, packets as HTTP datagrams.
#[derive(Debug)]
struct H3 {
    /// The request's Quarter Stream ID, which every datagram starts with.
    quarter: u64,
    /// What every packet's datagram starts with: the Quarter Stream ID
    /// and context 0.
    prefix: Vec<u8>,
    frames: FrameDecoder,
    /// Request-stream bytes already framed, in order.
    framed: Vec<u8>,
    /// The largest HTTP datagram the path takes now, once known.
    max_datagram: Option<usize>,
    /// Answer a packet too large for a datagram with ICMP "fragmentation
    /// needed" toward its sender (the client: its TCP then sends smaller
    /// segments), rather than only dropping it.
    frag_needed: bool,
}

/// A returned send buffer is kept for reuse only up to this capacity, so
/// one burst does not pin a large allocation for the session's lifetime.
/// What a turn adds to the send buffer must stay below it (see
/// [`super::batch_bytes`]): a buffer that outgrew it is freed after
/// each write and grown again, by doubling, from nothing: a copy at each
/// step, and pages of its own (glibc maps blocks from 64 KiB up) faulted in
/// on every turn.
pub(super) const MAX_RECYCLED_CAPACITY: usize = 256 * 1024;

#[derive(Debug)]
pub(super) struct Link {
    /// Bytes for the peer not yet handed out as [`Output::Send`].
    tx: Vec<u8>,
    events: VecDeque<Output>,
    decoder: CapsuleDecoder,
    pub(super) stats: Stats,
    /// Set once, when the session ends.
    close_reason: Option<CloseReason>,
    /// When the last byte arrived from the peer.
    last_rx: Instant,
    keepalive_timeout: Duration,
    /// Both ends announced `Veil-Offload`: offload datagrams may flow.
    offload: bool,
    /// Where packets are segmented for a peer without offload.
    scratch: Vec<u8>,
    /// The largest IP packet the peer may send: a plain one, or a segment
    /// of a super-packet.
    max_packet_len: usize,
    /// Set for a session over HTTP/3.
    h3: Option<H3>,
}

impl Link {
    pub(super) fn new(
        max_capsule_len: usize,
        max_packet_len: u16,
        keepalive_timeout: Duration,
        now: Instant,
    ) -> Self {
        Link {
            tx: Vec::new(),
            events: VecDeque::new(),
            decoder: CapsuleDecoder::new(max_capsule_len),
            stats: Stats::default(),
            close_reason: None,
            last_rx: now,
            keepalive_timeout,
            offload: false,
            scratch: Vec::new(),
            max_packet_len: usize::from(max_packet_len),
            h3: None,
        }
    }

    /// Carries the session over HTTP/3, on the request stream `stream_id`.
    /// Offload datagrams are never negotiated there (a datagram holds one
    /// packet), so super-packets are segmented here.
    pub(super) fn set_h3(&mut self, stream_id: u64) {
        self.h3 = Some(H3 {
            quarter: stream_id / 4,
            prefix: {
                let mut prefix = h3::datagram_prefix(stream_id);
                prefix.push(capsule::IP_PACKET_CONTEXT as u8);
                prefix
            },
            frames: FrameDecoder::default(),
            framed: Vec::new(),
            max_datagram: None,
            frag_needed: false,
        });
    }

    /// Over HTTP/3: the largest datagram the path takes now (QUIC's path
    /// MTU discovery changes it), and whether a packet too large for it
    /// gets ICMP "fragmentation needed".
    pub(super) fn set_max_datagram(&mut self, max: Option<usize>, frag_needed: bool) {
        if let Some(h3) = &mut self.h3 {
            h3.max_datagram = max;
            h3.frag_needed = frag_needed;
        }
    }

    pub(super) fn is_h3(&self) -> bool {
        self.h3.is_some()
    }

    /// Splits request-stream bytes into frames (HTTP/3 only).
    pub(super) fn h3_frames(&mut self, bytes: &[u8]) -> (Vec<Part>, Option<ProtoError>) {
        match &mut self.h3 {
            Some(h3) => h3.frames.decode(bytes),
            None => (Vec::new(), None),
        }
    }

    /// Moves the capsules queued so far into one DATA frame.
    fn frame_capsules(&mut self) {
        if let Some(h3) = &mut self.h3 {
            if !self.tx.is_empty() {
                h3::data_frame_header(self.tx.len(), &mut h3.framed);
                h3.framed.extend_from_slice(&self.tx);
                self.tx.clear();
            }
        }
    }

    /// An HTTP datagram from the peer: the packet in it if it belongs to
    /// this request and carries context 0, dropped and counted otherwise
    /// (and before the tunnel is `up`: datagrams may overtake the request).
    pub(super) fn receive_datagram<'a>(
        &mut self,
        datagram: &'a [u8],
        up: bool,
    ) -> Option<&'a [u8]> {
        if self.is_closed() {
            return None;
        }
        let Some(h3) = &self.h3 else {
            self.stats.datagrams_dropped += 1;
            return None;
        };
        let packet = varint::decode(datagram)
            .filter(|&(quarter, _)| quarter == h3.quarter)
            .and_then(|(_, n)| varint::decode(&datagram[n..]).map(|(ctx, m)| (ctx, n + m)))
            .filter(|&(ctx, _)| ctx == capsule::IP_PACKET_CONTEXT && up)
            .map(|(_, at)| &datagram[at..]);
        match packet {
            Some(packet) if packet.len() > self.max_packet_len => {
                self.stats.packets_too_long += 1;
                return None;
            }
            Some(packet) => {
                self.stats.packets_received += 1;
                self.stats.bytes_received += packet.len() as u64;
            }
            None => self.stats.datagrams_dropped += 1,
        }
        packet
    }

    pub(super) fn set_offload(&mut self, offload: bool) {
        self.offload = offload;
    }

    pub(super) fn offload(&self) -> bool {
        self.offload
    }

    pub(super) fn set_keepalive_timeout(&mut self, timeout: Duration) {
        self.keepalive_timeout = timeout;
    }

    pub(super) fn is_closed(&self) -> bool {
        self.close_reason.is_some()
    }

    pub(super) fn close_reason(&self) -> Option<&CloseReason> {
        self.close_reason.as_ref()
    }

    /// What `receive` returns: the protocol error the session closed on, if
    /// it is closed because of one. Only called right after input that
    /// found the session open, so an error here was caused by that input.
    pub(super) fn error_if_closed(&self) -> Result<(), ProtoError> {
        match &self.close_reason {
            Some(CloseReason::BadRequest(e) | CloseReason::Protocol(e)) => Err(e.clone()),
            Some(CloseReason::Refused {
                status,
                reason,
                message,
            }) => Err(ProtoError::Refused {
                status: *status,
                reason: reason.clone(),
                message: message.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Queues raw bytes (HTTP heads, pre-encoded capsules).
    pub(super) fn send(&mut self, bytes: &[u8]) {
        if self.is_closed() {
            return;
        }
        self.frame_capsules();
        match &mut self.h3 {
            Some(h3) => h3.framed.extend_from_slice(bytes),
            None => self.tx.extend_from_slice(bytes),
        }
    }

    /// Queues capsules already encoded (over HTTP/3 they go into a DATA
    /// frame, unlike the heads of [`Self::send`]).
    pub(super) fn send_capsules(&mut self, encoded: &[u8]) {
        if !self.is_closed() {
            self.tx.extend_from_slice(encoded);
        }
    }

    /// Queues a capsule. Encoding only fails for invalid local data, which
    /// the session constructors rule out; if it happens anyway the session
    /// closes with the error instead of sending something malformed.
    pub(super) fn send_capsule(&mut self, capsule: &Capsule) {
        if self.is_closed() {
            return;
        }
        if let Err(e) = capsule.encode(&mut self.tx) {
            self.close(CloseReason::Protocol(e));
        }
    }

    /// The per-packet path: one DATAGRAM capsule appended to the pending
    /// output, no intermediate buffer.
    pub(super) fn send_packet(&mut self, packet: &[u8], up: bool) {
        if self.is_closed() || !up {
            self.stats.packets_not_sent += 1;
            return;
        }
        emit_packet(
            &mut self.tx,
            &mut self.events,
            self.h3.as_ref(),
            &mut self.stats,
            packet,
        );
    }

    /// A packet as an offload-capable TUN device gives it: as is when the
    /// peer takes offload datagrams, otherwise checksummed and segmented
    /// here into plain packets, as a NIC would have.
    pub(super) fn send_offload_packet(&mut self, hdr: &VnetHdr, packet: &[u8], up: bool) {
        if self.is_closed() || !up {
            self.stats.packets_not_sent += 1;
            return;
        }
        if self.offload {
            let hdr = hdr.to_bytes();
            capsule::encode_datagram(capsule::OFFLOAD_CONTEXT, &[&hdr, packet], &mut self.tx);
            self.stats.packets_sent += 1;
            self.stats.bytes_sent += packet.len() as u64;
            return;
        }
        let Link {
            tx,
            events,
            h3,
            stats,
            scratch,
            ..
        } = self;
        let segmented = match h3 {
            // Each segment built behind the datagram's prefix, and the
            // buffer sent as it is: one copy of the bytes fewer.
            Some(h3) => {
                let prefix = h3.prefix.len();
                gso::segment_framed(&h3.prefix, hdr, packet, scratch, |datagram| {
                    let segment = &datagram[prefix..];
                    if too_big(h3, segment) {
                        return emit_packet(tx, events, Some(h3), stats, segment);
                    }
                    stats.packets_sent += 1;
                    stats.bytes_sent += segment.len() as u64;
                    // The segments of a run are alike: the next buffer is
                    // this one's size, and this one (the first of a run may
                    // have grown larger before) no larger than its bytes.
                    let next = Vec::with_capacity(datagram.len());
                    let mut sent = mem::replace(datagram, next);
                    sent.shrink_to_fit();
                    events.push_back(Output::Datagram(sent));
                })
            }
            None => gso::segment(hdr, packet, scratch, |segment| {
                emit_packet(tx, events, None, stats, segment)
            }),
        };
        if segmented.is_err() {
            self.stats.packets_not_sent += 1;
        }
    }

    pub(super) fn push(&mut self, output: Output) {
        if !self.is_closed() {
            self.events.push_back(output);
        }
    }

    /// Ends the session; the first reason wins and nothing is queued after.
    pub(super) fn close(&mut self, reason: CloseReason) {
        if self.close_reason.is_none() {
            self.events.push_back(Output::Close {
                reason: reason.clone(),
            });
            self.close_reason = Some(reason);
        }
    }

    pub(super) fn poll_output(&mut self) -> Option<Output> {
        // Pending bytes go first: a Close must never overtake them.
        self.frame_capsules();
        if let Some(h3) = &mut self.h3 {
            if !h3.framed.is_empty() {
                return Some(Output::Send(mem::take(&mut h3.framed)));
            }
        }
        if !self.tx.is_empty() {
            return Some(Output::Send(mem::take(&mut self.tx)));
        }
        self.events.pop_front()
    }

    pub(super) fn recycle(&mut self, mut buf: Vec<u8>) {
        // Growing by doubling from an odd size can overshoot the cap by up
        // to twice; such a buffer is trimmed back, which copies nothing
        // since it is empty.
        if self.tx.is_empty()
            && buf.capacity() > self.tx.capacity()
            && buf.capacity() <= 2 * MAX_RECYCLED_CAPACITY
        {
            buf.clear();
            buf.shrink_to(MAX_RECYCLED_CAPACITY);
            self.tx = buf;
        }
    }

    /// Notes that bytes arrived: the peer is alive.
    pub(super) fn heard_from_peer(&mut self, now: Instant) {
        self.last_rx = self.last_rx.max(now);
    }

    /// When the peer is declared dead if nothing arrives before.
    pub(super) fn peer_deadline(&self) -> Instant {
        deadline(self.last_rx, self.keepalive_timeout)
    }

    /// Closes with [`CloseReason::PeerDead`] if the deadline has passed.
    pub(super) fn check_peer_alive(&mut self, now: Instant) {
        if now >= self.peer_deadline() {
            let silent_for = now.saturating_duration_since(self.last_rx);
            self.close(CloseReason::PeerDead { silent_for });
        }
    }

    /// Skips capsules of `types` unread ([`CapsuleDecoder::ignore`]).
    pub(super) fn ignore_capsules(&mut self, types: &'static [u64]) {
        self.decoder.ignore(types);
    }

    /// Feeds post-upgrade bytes to the capsule decoder; follow with
    /// [`Self::next_config_capsule`] until it returns `None`.
    pub(super) fn feed(&mut self, bytes: &[u8]) {
        self.decoder.feed(bytes);
    }

    /// Decodes what has been fed, handling every capsule both ends treat
    /// alike. Configuration capsules, whose meaning depends on the end, are
    /// returned one at a time in stream order. A decode error closes the
    /// session.
    pub(super) fn next_config_capsule(&mut self) -> Option<Capsule> {
        while !self.is_closed() {
            match self.decoder.next() {
                Ok(None) => return None,
                Ok(Some(capsule)) => {
                    if let Some(config) = self.handle_common(capsule) {
                        return Some(config);
                    }
                }
                Err(e) => self.close(CloseReason::Protocol(e)),
            }
        }
        None
    }

    fn handle_common(&mut self, capsule: Capsule) -> Option<Capsule> {
        match capsule {
            Capsule::Datagram {
                context_id: capsule::IP_PACKET_CONTEXT,
                payload,
            } if payload.len() > self.max_packet_len => self.stats.packets_too_long += 1,
            Capsule::Datagram {
                context_id: capsule::IP_PACKET_CONTEXT,
                payload,
            } => {
                self.stats.packets_received += 1;
                self.stats.bytes_received += payload.len() as u64;
                self.push(Output::Packet(payload));
            }
            Capsule::Datagram {
                context_id: capsule::OFFLOAD_CONTEXT,
                payload,
            } if self.offload => self.receive_offload(payload),
            Capsule::Datagram { .. } => self.stats.datagrams_dropped += 1,
            Capsule::Ping(nonce) => {
                self.send_capsule(&Capsule::Pong(nonce));
                self.stats.pongs_sent += 1;
            }
            Capsule::Pong(_) => self.stats.pongs_received += 1,
            Capsule::Unknown { .. } => self.stats.unknown_capsules += 1,
            config => return Some(config),
        }
        None
    }

    /// An offload datagram from the peer: its header is replaced by the
    /// only one it may mean ([`VnetHdr::sanitize`]) before anyone hands it
    /// to a kernel; one that means nothing sane is dropped and counted.
    fn receive_offload(&mut self, mut payload: Vec<u8>) {
        let Some((head, packet)) = payload.split_first_chunk_mut::<VNET_HDR_LEN>() else {
            self.stats.offload_invalid += 1;
            return;
        };
        match VnetHdr::from_bytes(*head).sanitize(packet, self.max_packet_len) {
            Ok(hdr) => {
                *head = hdr.to_bytes();
                self.stats.packets_received += 1;
                self.stats.bytes_received += (payload.len() - VNET_HDR_LEN) as u64;
                self.push(Output::OffloadPacket(payload));
            }
            Err(gso::GsoError::PacketTooLong { .. }) => self.stats.packets_too_long += 1,
            Err(_) => self.stats.offload_invalid += 1,
        }
    }

    /// Answers an ADDRESS_REQUEST as RFC 9484 §4.7.2 asks: one entry per
    /// request with its Request ID. `assigned` is the one IPv4 address this
    /// end hands out, if any: IPv4 requests get it, whatever they asked for;
    /// everything else gets the "not assigned" answer (all-zero address,
    /// full-length prefix). Since an ADDRESS_ASSIGN lists *all* current
    /// assignments, the address is kept (with Request ID 0) even when no
    /// IPv4 request came in.
    pub(super) fn answer_address_request(
        &mut self,
        requests: &[RequestedAddress],
        assigned: Option<Ipv4Addr>,
        assigned6: Option<Ipv6Addr>,
    ) {
        let mut answer: Vec<AssignedAddress> = requests
            .iter()
            .map(|req| {
                let ip = match (req.ip, assigned, assigned6) {
                    (IpAddr::V4(_), Some(addr), _) => IpAddr::V4(addr),
                    (IpAddr::V4(_), None, _) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    (IpAddr::V6(_), _, Some(addr)) => IpAddr::V6(addr),
                    (IpAddr::V6(_), _, None) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                };
                AssignedAddress {
                    request_id: req.request_id,
                    ip,
                    prefix_len: host_prefix(ip),
                }
            })
            .collect();
        // The capsule is the full set of assignments (RFC 9484 §4.7.1):
        // what was not asked for is repeated, unsolicited.
        let unasked = [assigned.map(IpAddr::V4), assigned6.map(IpAddr::V6)];
        for ip in unasked.into_iter().flatten() {
            if !requests.iter().any(|r| r.ip.is_ipv4() == ip.is_ipv4()) {
                answer.push(unsolicited(ip));
            }
        }
        self.send_capsule(&Capsule::AddressAssign(answer));
    }
}

/// One packet toward the peer: a DATAGRAM capsule appended to the stream's
/// bytes, or over HTTP/3 an HTTP datagram of its own (Quarter Stream ID,
/// context 0, packet).
fn emit_packet(
    tx: &mut Vec<u8>,
    events: &mut VecDeque<Output>,
    h3: Option<&H3>,
    stats: &mut Stats,
    packet: &[u8],
) {
    match h3 {
        Some(h3) if too_big(h3, packet) => {
            // Fragmented as a router would (no DF); with DF refused with
            // ICMP "fragmentation needed" on the client, whose stack then
            // sends smaller packets. The gateway cannot tell a remote
            // sender (ICMP errors from clients are not translated), so it
            // fragments over DF rather than lose the packet.
            let room = h3.max_datagram.unwrap_or(0).saturating_sub(h3.prefix.len());
            let over_df = !h3.frag_needed;
            let mut emit = |piece: &[u8]| {
                events.push_back(http_datagram(h3, piece));
                stats.packets_sent += 1;
                stats.bytes_sent += piece.len() as u64;
            };
            // IPv6: only a datagram already in fragments is cut further
            // (same identification); a whole packet is never fragmented
            // on the way.
            let fragmented = match packet.first().map(|b| b >> 4) {
                Some(6) => crate::packet6::refragment6(packet, room, &mut emit),
                _ => crate::packet::fragment(packet, room, over_df, &mut emit),
            };
            if !fragmented {
                stats.packets_not_sent += 1;
                if let Some(icmp) = frag_needed(h3, packet) {
                    events.push_back(Output::Packet(icmp));
                }
            }
            return;
        }
        Some(h3) => events.push_back(http_datagram(h3, packet)),
        None => capsule::encode_ip_datagram(packet, tx),
    }
    stats.packets_sent += 1;
    stats.bytes_sent += packet.len() as u64;
}

/// One packet as an HTTP datagram of this request.
fn http_datagram(h3: &H3, packet: &[u8]) -> Output {
    let mut datagram = Vec::with_capacity(h3.prefix.len() + packet.len());
    datagram.extend_from_slice(&h3.prefix);
    datagram.extend_from_slice(packet);
    Output::Datagram(datagram)
}

fn too_big(h3: &H3, packet: &[u8]) -> bool {
    h3.max_datagram
        .is_some_and(|max| h3.prefix.len() + packet.len() > max)
}

/// The ICMP error for an IPv4 packet with DF set too large for a datagram,
/// if this end sends them; from the packet's destination, which the
/// sender's stack accepts as the hop that could not carry it.
fn frag_needed(h3: &H3, packet: &[u8]) -> Option<Vec<u8>> {
    let max = h3.max_datagram?;
    if packet.first()? >> 4 == 6 {
        return packet_too_big(h3, packet, max);
    }
    let df = packet.len() >= 20 && packet[0] >> 4 == 4 && packet[6] & 0x40 != 0;
    // Never an ICMP error about an ICMP error (RFC 1812 §4.3.2.7).
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let icmp_error = packet[9] == veil_common::proto::ICMP
        && packet
            .get(ihl)
            .is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12));
    if !h3.frag_needed || !df || icmp_error {
        return None;
    }
    let mtu = max
        .saturating_sub(h3.prefix.len())
        .min(usize::from(u16::MAX)) as u16;
    let from = std::net::Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    Some(crate::packet::icmp_frag_needed(from, packet, mtu))
}

/// IPv6's "fragmentation needed": Packet Too Big (RFC 8201) for an IPv6
/// packet too large for a datagram, if this end sends them, from the
/// packet's destination. IPv6 routers never fragment, so there is no DF to
/// look at; never about an ICMPv6 error (types below 128, RFC 4443 2.4).
fn packet_too_big(h3: &H3, packet: &[u8], max: usize) -> Option<Vec<u8>> {
    let info = crate::packet6::parse6(packet).ok()?;
    let icmp_error = info.icmp_type.is_some_and(|t| t < 128);
    if !h3.frag_needed || icmp_error {
        return None;
    }
    let mtu = max.saturating_sub(h3.prefix.len()) as u32;
    Some(crate::packet6::icmp6_packet_too_big(info.dst, packet, mtu))
}

/// `now + d` without the overflow panic: a timeout configured as
/// `Duration::MAX` means "never", so it is capped at a century.
pub(super) fn deadline(now: Instant, d: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
    now.checked_add(d.min(CENTURY)).unwrap_or(now)
}

/// The unsolicited assignment of one host address, a /32 or a /128
/// (Request ID 0).
pub(super) fn unsolicited(ip: IpAddr) -> AssignedAddress {
    AssignedAddress {
        request_id: 0,
        ip,
        prefix_len: host_prefix(ip),
    }
}

/// The prefix length of one host: 32 for IPv4, 128 for IPv6.
fn host_prefix(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}
