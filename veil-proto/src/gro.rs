//! Generic receive offload in user space: merging consecutive, in-order TCP
//! segments of one flow into one super-packet, as Linux's `tcp_gro_receive`
//! does, before they cross the tunnel.
//!
//! The gateway reads reply packets from its TUN device one at a time, many
//! of them single MTU-sized TCP segments. Each costs a read, a framing, an
//! encryption on this end and a decryption and a TUN write on the other.
//! Handing the peer one 64 KiB super-packet with a [`VnetHdr`] of type
//! TCPv4 (or TCPv6: IPv6 without extension headers merges the same way)
//! instead lets its kernel take the whole run at once, the way it
//! takes what a NIC's GRO built.
//!
//! The same merge runs after the tunnel, where packets arrive one by one
//! (HTTP/3 carries one per datagram; a client may send without offload):
//! the client merges the gateway's before its TUN device, the gateway a
//! client's before the datapath. Such a packet comes with no offload
//! header; [`verified`] checks its sums and gives it the header that lets
//! it merge.
//!
//! [`Coalescer`] keeps up to [`MAX_FLOWS`] pending packets, one per flow. A
//! packet joins its flow's pending packet only when nothing the receiver
//! could observe is lost: the same headers but for the sequence number, no
//! gap, segments of one size with at most a short last one, and a checksum
//! the kernel has either verified or still has to compute (a packet whose
//! checksum state is unknown is never merged, since the merged packet's
//! checksum is computed afresh and would hide a corrupt one). Anything else
//! goes out as it came in, after whatever of its flow was pending, so each
//! flow's order is kept.
//!
//! The merged packet is what [`crate::gso::segment`] expects: the first
//! segment's headers, every payload after them, `NEEDS_CSUM` with the
//! partial checksum in the TCP checksum field, and `gso_size` the segment
//! size; cutting it again gives back the original segments.

use crate::{
    gso::{VnetHdr, MIN_GSO_SIZE},
    ipv4::*,
};

/// Largest merged packet: IPv4's total length field; an IPv6 packet is
/// held to the same (its payload length could say 40 bytes more).
pub const MAX_MERGED_LEN: usize = 65_535;

/// How many flows may have a packet pending at once: enough for the few
/// bulk flows a batch interleaves, few enough that a linear scan is cheap.
pub const MAX_FLOWS: usize = 8;

/// The IP version, then source and destination addresses as they sit in
/// the packet (IPv4's padded with zeros): what a packet whose ports cannot
/// be read is known by.
type AddrKey = (u8, [u8; 32]);

/// [`AddrKey`], source and destination ports, then the protocol.
type FlowKey = (AddrKey, [u8; 4], u8);

/// The most datagrams one UDP super-packet may carry: the kernel refuses
/// more (`UDP_MAX_SEGMENTS`, 64 before Linux 6.9).
pub const MAX_UDP_SEGMENTS: usize = 64;

/// Merges consecutive TCP segments per flow (and, if made
/// [`Coalescer::with_udp`], UDP datagrams); see the module documentation.
/// Feed it every packet of a batch with [`Coalescer::push`], then call
/// [`Coalescer::flush`].
pub struct Coalescer {
    slots: [Slot; MAX_FLOWS],
    /// Stamps slots in the order their packets started, so the oldest goes
    /// first when a slot is needed and on flush.
    clock: u64,
    /// Whether IPv4 UDP datagrams merge too.
    udp: bool,
}

impl Coalescer {
    /// An empty coalescer that merges TCP segments. Slot buffers grow on
    /// first use and are reused from then on, so the steady state does not
    /// allocate.
    pub fn new() -> Self {
        Coalescer {
            slots: std::array::from_fn(|_| Slot::default()),
            clock: 0,
            udp: false,
        }
    }

    /// One that merges IPv4 UDP datagrams into UDP super-packets too. Only
    /// for packets bound for a kernel that takes them (a TUN device on
    /// Linux 6.2 on, which knows `TUN_F_USO4`: older ones refuse the
    /// write) and for no
    /// reader that would take a super-packet for one datagram (a
    /// user-space stack, a DNS server).
    pub fn with_udp() -> Self {
        Coalescer {
            udp: true,
            ..Coalescer::new()
        }
    }

    /// Offers one packet as read from a TUN device (already split from its
    /// header, which is valid per [`VnetHdr::validate`]).
    ///
    /// Either merges it into the pending super-packet of its flow, or emits
    /// (through `emit`) what must go out first and keeps or emits this one.
    /// Per-flow order is preserved; packets of different flows may be
    /// reordered relative to each other.
    pub fn push(&mut self, hdr: &VnetHdr, packet: &[u8], mut emit: impl FnMut(&VnetHdr, &[u8])) {
        match classify(hdr, packet, self.udp) {
            Class::Other => emit(hdr, packet),
            Class::Addrs(addrs) => {
                // Which flow it belongs to is unknown: let out everything
                // that might be ahead of it.
                self.emit_oldest_while(&mut emit, |slot| slot.key.0 == addrs);
                emit(hdr, packet);
            }
            Class::Flow(key, None) => {
                if let Some(index) = self.find(&key) {
                    self.emit_slot(index, &mut emit);
                }
                emit(hdr, packet);
            }
            Class::Flow(key, Some(seg)) => {
                let index = match self.find(&key) {
                    Some(index) if self.slots[index].can_join(&seg, packet) => {
                        self.slots[index].append(&seg, packet);
                        return;
                    }
                    Some(index) => {
                        self.emit_slot(index, &mut emit);
                        index
                    }
                    None if seg.is_full(packet) => {
                        // Nothing would join it: out at once, not copied
                        // into a slot (a 64 KiB super-packet from the TUN
                        // device, a segment with PSH).
                        emit(hdr, packet);
                        return;
                    }
                    None => self.free_slot(&mut emit),
                };
                self.clock += 1;
                self.slots[index].start(self.clock, key, hdr, &seg, packet);
            }
        }
    }

    /// [`Coalescer::push`] for a packet that arrived with no offload header
    /// (an HTTP/3 datagram, a plain capsule): its sums are checked
    /// ([`verified`]) so that it may merge, unless it is UDP and this
    /// coalescer does not merge UDP.
    pub fn push_plain(&mut self, packet: &[u8], emit: impl FnMut(&VnetHdr, &[u8])) {
        let udp4 =
            packet.first().is_some_and(|b| b >> 4 == 4) && packet.get(IP_PROTO) == Some(&PROTO_UDP);
        let hdr = if udp4 && !self.udp {
            VnetHdr::NONE
        } else {
            verified(packet)
        };
        self.push(&hdr, packet, emit);
    }

    /// Emits every pending packet (call at the end of each batch), oldest
    /// first, so nothing waits for a packet that may never come.
    pub fn flush(&mut self, mut emit: impl FnMut(&VnetHdr, &[u8])) {
        self.emit_oldest_while(&mut emit, |_| true);
    }

    fn find(&self, key: &FlowKey) -> Option<usize> {
        self.slots
            .iter()
            .position(|slot| slot.busy && slot.key == *key)
    }

    /// A slot for a new flow: a free one, else the oldest, emptied first.
    fn free_slot(&mut self, emit: &mut impl FnMut(&VnetHdr, &[u8])) -> usize {
        if let Some(index) = self.slots.iter().position(|slot| !slot.busy) {
            return index;
        }
        let index = self.oldest(|_| true).unwrap_or(0);
        self.emit_slot(index, emit);
        index
    }

    /// The busy slot with the oldest packet among those `wanted` accepts.
    fn oldest(&self, wanted: impl Fn(&Slot) -> bool) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.busy && wanted(slot))
            .min_by_key(|(_, slot)| slot.age)
            .map(|(index, _)| index)
    }

    /// Emits, oldest first, every pending packet `wanted` accepts.
    fn emit_oldest_while(
        &mut self,
        emit: &mut impl FnMut(&VnetHdr, &[u8]),
        wanted: impl Fn(&Slot) -> bool,
    ) {
        while let Some(index) = self.oldest(&wanted) {
            self.emit_slot(index, emit);
        }
    }

    fn emit_slot(&mut self, index: usize, emit: &mut impl FnMut(&VnetHdr, &[u8])) {
        let slot = &mut self.slots[index];
        let hdr = slot.finish();
        emit(&hdr, &slot.packet);
        slot.busy = false;
    }
}

impl Default for Coalescer {
    /// The same as [`Coalescer::new`].
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Coalescer {
    /// Only how many packets are pending: the buffers are too big to print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pending = self.slots.iter().filter(|slot| slot.busy).count();
        f.debug_struct("Coalescer")
            .field("pending", &pending)
            .finish_non_exhaustive()
    }
}

/// One flow's pending packet.
#[derive(Default)]
struct Slot {
    /// Whether the slot holds a packet; the buffer is kept either way.
    busy: bool,
    /// The stamp of the packet that started it.
    age: u64,
    key: FlowKey,
    /// The header the first packet came with, emitted as is when nothing
    /// joined it.
    hdr: VnetHdr,
    /// The first packet's IP and TCP headers, then every payload so far.
    packet: Vec<u8>,
    /// 20 (IPv4 without options) or 40 (IPv6 without extension headers).
    ip_hdr_len: usize,
    /// TCP's header with options, or UDP's 8 bytes.
    l4_hdr_len: usize,
    /// The sequence number a joining segment must carry.
    next_seq: u32,
    /// Payload bytes per segment: `gso_size` of a super-packet, else the
    /// first payload's length.
    mss: usize,
    payload_len: usize,
    /// Whether anything joined the first packet.
    merged: bool,
    /// A PSH segment is in: the sender wants this delivered, so nothing
    /// more joins.
    psh: bool,
}

impl Slot {
    /// UDP datagrams rather than TCP segments (the flow's protocol): no
    /// sequence to follow, each datagram's boundary kept by the segment
    /// size.
    fn is_udp(&self) -> bool {
        self.key.2 == PROTO_UDP
    }

    fn start(&mut self, age: u64, key: FlowKey, hdr: &VnetHdr, seg: &Segment, packet: &[u8]) {
        self.busy = true;
        self.age = age;
        self.key = key;
        self.hdr = *hdr;
        self.packet.clear();
        self.packet.extend_from_slice(packet);
        self.ip_hdr_len = seg.ip_hdr_len;
        self.l4_hdr_len = seg.l4_hdr_len;
        self.next_seq = seg.next_seq();
        self.mss = seg.gso_size.unwrap_or(seg.payload_len);
        self.payload_len = seg.payload_len;
        self.merged = false;
        self.psh = seg.psh;
    }

    /// The join conditions of `tcp_gro_receive`, plus the segment size
    /// floor [`VnetHdr::validate`] sets for the receiving end.
    fn can_join(&self, seg: &Segment, packet: &[u8]) -> bool {
        let size_fits = match seg.gso_size {
            Some(gso_size) => gso_size == self.mss,
            None => seg.payload_len <= self.mss,
        };
        if self.mss < usize::from(MIN_GSO_SIZE) {
            return false;
        }
        let follows = if self.is_udp() {
            self.payload_len / self.mss < MAX_UDP_SEGMENTS
                && same_ip(&self.packet, packet, self.ip_hdr_len)
        } else {
            seg.seq == self.next_seq
                && same_headers(
                    &self.packet,
                    packet,
                    self.ip_hdr_len,
                    self.l4_hdr_len,
                    seg.l4_hdr_len,
                )
        };
        !self.psh
            // A short segment can only be the last one.
            && self.payload_len.is_multiple_of(self.mss)
            && size_fits
            && self.packet.len() + seg.payload_len <= MAX_MERGED_LEN
            && seg.ip_hdr_len == self.ip_hdr_len
            && follows
    }

    fn append(&mut self, seg: &Segment, packet: &[u8]) {
        self.packet
            .extend_from_slice(&packet[seg.ip_hdr_len + seg.l4_hdr_len..]);
        self.payload_len += seg.payload_len;
        self.next_seq = seg.next_seq();
        self.merged = true;
        if seg.psh {
            self.packet[self.ip_hdr_len + TCP_FLAGS] |= TCP_PSH;
            self.psh = true;
        }
    }

    /// The header to emit with the packet, after fixing up the packet's
    /// headers if segments were merged.
    fn finish(&mut self) -> VnetHdr {
        if !self.merged {
            return self.hdr;
        }
        let udp = self.is_udp();
        let packet = &mut self.packet[..];
        let ip = self.ip_hdr_len;
        // At most MAX_MERGED_LEN, checked on every append.
        let len = packet.len() as u16;
        let l4_len = len - ip as u16;
        let (proto, csum_field) = if udp {
            // Linux's UDP super-packet: the length of the whole, each
            // datagram's set when it is cut.
            put16(packet, ip + UDP_LEN, l4_len);
            (PROTO_UDP, UDP_CSUM)
        } else {
            (PROTO_TCP, TCP_CSUM)
        };
        let (gso, partial) = if ip == IPV6_HDR_LEN {
            put16(packet, IPV6_PAYLOAD_LEN, l4_len);
            (VnetHdr::GSO_TCPV6, pseudo_header6(packet, proto, l4_len))
        } else {
            put16(packet, IP_TOTAL_LEN, len);
            set_header_checksum(packet, IPV4_MIN_HDR_LEN);
            (VnetHdr::GSO_TCPV4, pseudo_header(packet, proto, l4_len))
        };
        // What Linux keeps in the field of a `CHECKSUM_PARTIAL` packet:
        // the pseudo-header sum, folded but not complemented.
        put16(packet, ip + csum_field, !partial.finish());
        let gso_type = match (self.payload_len > self.mss, udp) {
            (false, _) => self.hdr.gso_type,
            (true, false) => gso,
            (true, true) => VnetHdr::GSO_UDP_L4,
        };
        let headers_len = ip + self.l4_hdr_len;
        VnetHdr {
            flags: VnetHdr::F_NEEDS_CSUM,
            gso_type,
            // Headers and segment sizes are bounded by the packet length.
            hdr_len: headers_len as u16,
            gso_size: self.mss as u16,
            csum_start: ip as u16,
            csum_offset: csum_field as u16,
        }
    }
}

/// What [`Coalescer::push`] needs to know about a packet.
enum Class {
    /// Not TCP: of no flow that can be pending.
    Other,
    /// TCP, or possibly TCP (behind IPv6 extension headers), whose ports
    /// cannot be read (a fragment, a truncated header): it may belong to
    /// any pending flow between these addresses.
    Addrs(AddrKey),
    /// TCP of a known flow, with what merging needs if it can merge.
    Flow(FlowKey, Option<Segment>),
}

/// A mergeable TCP segment (or super-packet of them), or UDP datagram.
struct Segment {
    /// TCP's sequence number; 0 for UDP.
    seq: u32,
    ip_hdr_len: usize,
    l4_hdr_len: usize,
    payload_len: usize,
    psh: bool,
    /// The segment size of a TCPv4 super-packet; `None` for one segment.
    gso_size: Option<usize>,
}

impl Segment {
    fn next_seq(&self) -> u32 {
        // Sequence numbers wrap; a payload is under 64 KiB.
        self.seq.wrapping_add(self.payload_len as u32)
    }

    /// Whether a slot started with `packet` (this segment) would take no
    /// other segment of its size ([`Slot::can_join`]): it ends with PSH
    /// or a short segment, its segments are below the floor, or one more
    /// would pass [`MAX_MERGED_LEN`]. (Only a shorter last segment could
    /// still join the last case: not worth a copy of up to 64 KiB.)
    fn is_full(&self, packet: &[u8]) -> bool {
        let mss = self.gso_size.unwrap_or(self.payload_len);
        self.psh
            || mss < usize::from(MIN_GSO_SIZE)
            || !self.payload_len.is_multiple_of(mss)
            || packet.len() + mss > MAX_MERGED_LEN
    }
}

fn classify(hdr: &VnetHdr, packet: &[u8], udp: bool) -> Class {
    match packet.first().map(|b| b >> 4) {
        Some(4) => classify4(hdr, packet, udp),
        Some(6) => classify6(hdr, packet),
        _ => Class::Other,
    }
}

/// IPv4: TCP is always a flow; UDP is one when `udp` datagrams merge.
fn classify4(hdr: &VnetHdr, packet: &[u8], udp: bool) -> Class {
    if packet.len() < IPV4_MIN_HDR_LEN {
        return Class::Other;
    }
    let proto = packet[IP_PROTO];
    if !(proto == PROTO_TCP || proto == PROTO_UDP && udp) {
        return Class::Other;
    }
    let addrs = addr_key(4, &packet[IP_ADDRS]);
    let ip_hdr_len = usize::from(packet[0] & 0x0f) * 4;
    let fragment = be16(packet, IP_FRAG) & IP_FRAG_MASK != 0;
    if ip_hdr_len < IPV4_MIN_HDR_LEN || fragment || packet.len() < ip_hdr_len + 4 {
        return Class::Addrs(addrs);
    }
    let key = flow_key(&addrs, &packet[ip_hdr_len..ip_hdr_len + 4], proto);
    // Only a packet without options whose length field agrees merges.
    let whole =
        ip_hdr_len == IPV4_MIN_HDR_LEN && usize::from(be16(packet, IP_TOTAL_LEN)) == packet.len();
    let segment = match (whole, proto) {
        (false, _) => None,
        (true, PROTO_TCP) => mergeable(hdr, packet, IPV4_MIN_HDR_LEN, VnetHdr::GSO_TCPV4),
        (true, _) => mergeable_udp4(hdr, packet),
    };
    Class::Flow(key, segment)
}

/// IPv6: TCP right after the header is a flow; anything behind an
/// extension header may be TCP whose ports cannot be read (a fragment) and
/// is never merged.
fn classify6(hdr: &VnetHdr, packet: &[u8]) -> Class {
    if packet.len() < IPV6_HDR_LEN {
        return Class::Other;
    }
    let addrs = addr_key(6, &packet[IPV6_ADDRS]);
    match packet[IPV6_NEXT] {
        PROTO_TCP if packet.len() >= IPV6_HDR_LEN + 4 => {
            let key = flow_key(&addrs, &packet[IPV6_HDR_LEN..IPV6_HDR_LEN + 4], PROTO_TCP);
            let whole = usize::from(be16(packet, IPV6_PAYLOAD_LEN)) == packet.len() - IPV6_HDR_LEN;
            let segment = whole
                .then(|| mergeable(hdr, packet, IPV6_HDR_LEN, VnetHdr::GSO_TCPV6))
                .flatten();
            Class::Flow(key, segment)
        }
        PROTO_UDP | 58 => Class::Other,
        _ => Class::Addrs(addrs),
    }
}

fn addr_key(version: u8, addrs: &[u8]) -> AddrKey {
    let mut key = [0; 32];
    key[..addrs.len()].copy_from_slice(addrs);
    (version, key)
}

fn flow_key(addrs: &AddrKey, ports: &[u8], proto: u8) -> FlowKey {
    let mut key = [0; 4];
    key.copy_from_slice(ports);
    (*addrs, key, proto)
}

/// The datagram a whole IPv4 UDP packet (no options) is, if it may merge:
/// its UDP length agrees, it carries at least [`MIN_GSO_SIZE`] bytes (a
/// smaller one could never be joined: it goes out at once rather than wait
/// in a slot), a checksum the kernel verified or left partial (a zero one,
/// "no checksum", would gain one), and it is not already a super-packet.
/// IPv6 UDP is left as it is: veil's offload header takes UDP
/// super-packets over IPv4 only.
fn mergeable_udp4(hdr: &VnetHdr, packet: &[u8]) -> Option<Segment> {
    let ip = IPV4_MIN_HDR_LEN;
    let payload_len = packet.len().checked_sub(ip + UDP_HDR_LEN)?;
    let mergeable = payload_len >= usize::from(MIN_GSO_SIZE)
        && usize::from(be16(packet, ip + UDP_LEN)) == packet.len() - ip
        && hdr.gso_type == VnetHdr::GSO_NONE
        && checksum_known(hdr, ip, UDP_CSUM)
        && (hdr.flags & VnetHdr::F_NEEDS_CSUM != 0 || be16(packet, ip + UDP_CSUM) != 0);
    mergeable.then_some(Segment {
        seq: 0,
        ip_hdr_len: ip,
        l4_hdr_len: UDP_HDR_LEN,
        payload_len,
        psh: false,
        gso_size: None,
    })
}

/// The segment a TCP packet is, if it may be merged at all: `ip` is its
/// IP header's length (IPv4 without options or IPv6 without extension
/// headers, its length field checked), `tcp_gso` the GSO type of its
/// version.
fn mergeable(hdr: &VnetHdr, packet: &[u8], ip: usize, tcp_gso: u8) -> Option<Segment> {
    let data_offset = packet.get(ip + TCP_DATA_OFFSET)? >> 4;
    let l4_hdr_len = usize::from(data_offset) * 4;
    let headers_len = ip + l4_hdr_len;
    if l4_hdr_len < TCP_MIN_HDR_LEN || headers_len >= packet.len() {
        // A header that does not fit, or no payload to merge.
        return None;
    }
    // No SYN, FIN, RST, URG, ECE or CWR: each means something on its own
    // segment that merging would move or duplicate.
    let flags = packet[ip + TCP_FLAGS];
    if flags != TCP_ACK && flags != TCP_ACK | TCP_PSH {
        return None;
    }
    if !checksum_known(hdr, ip, TCP_CSUM) {
        return None;
    }
    let gso_size = match hdr.gso_type {
        VnetHdr::GSO_NONE => None,
        t if t == tcp_gso
            && hdr.flags & VnetHdr::F_NEEDS_CSUM != 0
            && hdr.gso_size >= MIN_GSO_SIZE =>
        {
            Some(usize::from(hdr.gso_size))
        }
        // ECN (CWR on the first segment only), UDP, or a header that would
        // not validate.
        _ => return None,
    };
    Some(Segment {
        seq: be32(packet, ip + TCP_SEQ),
        ip_hdr_len: ip,
        l4_hdr_len,
        payload_len: packet.len() - headers_len,
        psh: flags & TCP_PSH != 0,
        gso_size,
    })
}

/// The offload header for a packet that arrived with none (an HTTP/3
/// datagram, a plain capsule): `F_DATA_VALID` when it is a whole TCP
/// segment, or IPv4 UDP datagram with a checksum, whose sums verify here,
/// so [`Coalescer::push`] may merge it; [`VnetHdr::NONE`] otherwise, and
/// the receiving kernel checks it.
///
/// The tunnel's AEAD already vouches for the bytes since the gateway; the
/// sum catches what was corrupt before it, which a merge would hide. One
/// pass over the packet costs far less than the TUN write per segment it
/// saves.
pub fn verified(packet: &[u8]) -> VnetHdr {
    let sums_ok = match packet.first().map(|b| b >> 4) {
        Some(4) => sums_verify4(packet),
        Some(6) => sums_verify6(packet),
        _ => false,
    };
    if sums_ok {
        VnetHdr {
            flags: VnetHdr::F_DATA_VALID,
            ..VnetHdr::NONE
        }
    } else {
        VnetHdr::NONE
    }
}

/// [`verified`] for IPv4: a whole TCP segment or UDP datagram whose IP
/// header checksum (a merge rewrites it) and transport checksum verify.
fn sums_verify4(packet: &[u8]) -> bool {
    if packet.len() < IPV4_MIN_HDR_LEN {
        return false;
    }
    let proto = packet[IP_PROTO];
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let l4_min = match proto {
        PROTO_TCP => TCP_MIN_HDR_LEN,
        PROTO_UDP => UDP_HDR_LEN,
        _ => return false,
    };
    let whole = usize::from(be16(packet, IP_TOTAL_LEN)) == packet.len();
    let fragment = be16(packet, IP_FRAG) & IP_FRAG_MASK != 0;
    if !whole || fragment || ihl < IPV4_MIN_HDR_LEN || packet.len() <= ihl + l4_min {
        return false;
    }
    let l4 = &packet[ihl..];
    // A zero UDP checksum is none at all: nothing to vouch for. A UDP
    // length short of the IP payload would leave bytes the sum covers
    // that the datagram does not.
    if proto == PROTO_UDP
        && (be16(packet, ihl + UDP_CSUM) == 0
            || usize::from(be16(packet, ihl + UDP_LEN)) != l4.len())
    {
        return false;
    }
    // Bounded by the total length field.
    let mut sum = pseudo_header(packet, proto, l4.len() as u16);
    sum.add(l4);
    crate::packet::checksum(&packet[..ihl]) == 0 && sum.finish() == 0
}

/// [`verified`] for IPv6: TCP right after the header, checksum verified.
fn sums_verify6(packet: &[u8]) -> bool {
    if packet.len() <= IPV6_HDR_LEN + TCP_MIN_HDR_LEN || packet[IPV6_NEXT] != PROTO_TCP {
        return false;
    }
    let l4 = &packet[IPV6_HDR_LEN..];
    if usize::from(be16(packet, IPV6_PAYLOAD_LEN)) != l4.len() {
        return false;
    }
    let mut sum = pseudo_header6(packet, PROTO_TCP, l4.len() as u16);
    sum.add(l4);
    sum.finish() == 0
}

/// Whether the kernel either verified the checksum or left it to compute
/// in the transport's checksum field (`csum_field` past the IP header),
/// the only two states a recomputed checksum cannot make worse.
fn checksum_known(hdr: &VnetHdr, ip: usize, csum_field: usize) -> bool {
    let known = VnetHdr::F_NEEDS_CSUM | VnetHdr::F_DATA_VALID;
    if hdr.flags & !known != 0 {
        return false;
    }
    if hdr.flags & VnetHdr::F_NEEDS_CSUM != 0 {
        return usize::from(hdr.csum_start) == ip && usize::from(hdr.csum_offset) == csum_field;
    }
    hdr.flags & VnetHdr::F_DATA_VALID != 0
}

/// Whether the fields that must agree for two segments to be one stream's
/// consecutive data do: TOS, TTL, DF (IPv4) or traffic class, flow label,
/// hop limit (IPv6), then ack, window and options. Both packets have an
/// `ip`-byte IP header.
fn same_headers(
    first: &[u8],
    next: &[u8],
    ip: usize,
    first_tcp_len: usize,
    next_tcp_len: usize,
) -> bool {
    let tcp = |range: std::ops::Range<usize>| ip + range.start..ip + range.end;
    let options = tcp(TCP_MIN_HDR_LEN..first_tcp_len);
    first_tcp_len == next_tcp_len
        && same_ip(first, next, ip)
        && first[tcp(TCP_ACK_NUM)] == next[tcp(TCP_ACK_NUM)]
        && first[tcp(TCP_WINDOW)] == next[tcp(TCP_WINDOW)]
        && first[options.clone()] == next[options]
}

/// Whether the IP fields every packet of a merged run repeats agree: TOS,
/// TTL, DF (IPv4) or traffic class, flow label, hop limit (IPv6).
fn same_ip(first: &[u8], next: &[u8], ip: usize) -> bool {
    if ip == IPV6_HDR_LEN {
        first[IPV6_FLOW] == next[IPV6_FLOW] && first[IPV6_HOP_LIMIT] == next[IPV6_HOP_LIMIT]
    } else {
        first[IP_TOS] == next[IP_TOS]
            && first[IP_TTL] == next[IP_TTL]
            && be16(first, IP_FRAG) & IP_DF == be16(next, IP_FRAG) & IP_DF
    }
}

#[cfg(test)]
#[path = "gro_tests6.rs"]
mod tests6;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gso::segment;

    const SRC: [u8; 4] = [192, 0, 2, 7];
    const DST: [u8; 4] = [10, 77, 0, 2];
    const FIN: u8 = 0x01;
    const PSH: u8 = 0x08;
    const ACK: u8 = 0x10;
    /// Timestamps option (kind 8, length 10) padded with two NOPs to 12 bytes.
    const TS_OPTION: [u8; 12] = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];

    // --- An independent RFC 1071 sum ----------------------------------

    /// Ones' complement sum of `data` as big-endian words, folded to 16 bits.
    fn ones_sum(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for pair in data.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            let lo = pair.get(1).map_or(0, |&b| u32::from(b));
            sum += hi | lo;
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    fn ihl(packet: &[u8]) -> usize {
        usize::from(packet[0] & 0xf) * 4
    }

    fn pseudo_header(packet: &[u8]) -> Vec<u8> {
        let mut p = packet[12..20].to_vec();
        p.extend_from_slice(&[0, packet[9]]);
        p.extend_from_slice(&((packet.len() - ihl(packet)) as u16).to_be_bytes());
        p
    }

    fn ip_checksum_ok(packet: &[u8]) -> bool {
        ones_sum(&packet[..ihl(packet)]) == 0xffff
    }

    /// The sum over pseudo-header and segment, checksum included, is all ones.
    fn tcp_checksum_ok(packet: &[u8]) -> bool {
        let mut all = pseudo_header(packet);
        all.extend_from_slice(&packet[ihl(packet)..]);
        ones_sum(&all) == 0xffff
    }

    fn u16_at(p: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([p[at], p[at + 1]])
    }

    fn u32_at(p: &[u8], at: usize) -> u32 {
        u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
    }

    // --- Packet builder -----------------------------------------------

    #[derive(Clone)]
    struct Tcp {
        src: [u8; 4],
        sport: u16,
        seq: u32,
        ack: u32,
        window: u16,
        flags: u8,
        tos: u8,
        ttl: u8,
        df: bool,
        id: u16,
        ip_options: Vec<u8>,
        tcp_options: Vec<u8>,
    }

    impl Default for Tcp {
        fn default() -> Self {
            Tcp {
                src: SRC,
                sport: 443,
                seq: 1000,
                ack: 77,
                window: 0xfff0,
                flags: ACK,
                tos: 0,
                ttl: 64,
                df: true,
                id: 0x1234,
                ip_options: Vec::new(),
                tcp_options: Vec::new(),
            }
        }
    }

    impl Tcp {
        fn at(seq: u32) -> Self {
            Tcp {
                seq,
                ..Tcp::default()
            }
        }

        /// IPv4/TCP around `payload` with a valid IP header checksum and
        /// the TCP checksum field zeroed.
        fn raw(&self, payload: &[u8]) -> Vec<u8> {
            assert_eq!(self.ip_options.len() % 4, 0);
            assert_eq!(self.tcp_options.len() % 4, 0);
            let ihl = 20 + self.ip_options.len();
            let thl = 20 + self.tcp_options.len();
            let total = ihl + thl + payload.len();
            let mut p = vec![0x40 | (ihl / 4) as u8, self.tos];
            p.extend_from_slice(&(total as u16).to_be_bytes());
            p.extend_from_slice(&self.id.to_be_bytes());
            p.extend_from_slice(&[if self.df { 0x40 } else { 0 }, 0]);
            p.extend_from_slice(&[self.ttl, 6, 0, 0]);
            p.extend_from_slice(&self.src);
            p.extend_from_slice(&DST);
            p.extend_from_slice(&self.ip_options);
            p.extend_from_slice(&self.sport.to_be_bytes());
            p.extend_from_slice(&40000u16.to_be_bytes());
            p.extend_from_slice(&self.seq.to_be_bytes());
            p.extend_from_slice(&self.ack.to_be_bytes());
            p.push(((thl / 4) as u8) << 4);
            p.push(self.flags);
            p.extend_from_slice(&self.window.to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
            p.extend_from_slice(&self.tcp_options);
            p.extend_from_slice(payload);
            let csum = !ones_sum(&p[..ihl]);
            p[10..12].copy_from_slice(&csum.to_be_bytes());
            p
        }

        /// As the kernel hands it over with NEEDS_CSUM: the TCP checksum
        /// field holds the pseudo-header sum.
        fn packet(&self, payload: &[u8]) -> Vec<u8> {
            let mut p = self.raw(payload);
            let at = ihl(&p) + 16;
            let partial = ones_sum(&pseudo_header(&p));
            p[at..at + 2].copy_from_slice(&partial.to_be_bytes());
            p
        }

        /// As it goes on the wire: a complete TCP checksum.
        fn complete(&self, payload: &[u8]) -> Vec<u8> {
            let mut p = self.raw(payload);
            let at = ihl(&p) + 16;
            let mut all = pseudo_header(&p);
            all.extend_from_slice(&p[ihl(&p)..]);
            let csum = !ones_sum(&all);
            p[at..at + 2].copy_from_slice(&csum.to_be_bytes());
            assert!(tcp_checksum_ok(&p));
            p
        }

        /// The NEEDS_CSUM header that goes with [`Tcp::packet`].
        fn hdr(&self) -> VnetHdr {
            let ihl = 20 + self.ip_options.len() as u16;
            VnetHdr {
                flags: VnetHdr::F_NEEDS_CSUM,
                gso_type: VnetHdr::GSO_NONE,
                hdr_len: ihl + 20 + self.tcp_options.len() as u16,
                gso_size: 0,
                csum_start: ihl,
                csum_offset: 16,
            }
        }

        /// The header of a TCPv4 super-packet of `gso_size`-byte segments.
        fn gso_hdr(&self, gso_size: u16) -> VnetHdr {
            VnetHdr {
                gso_type: VnetHdr::GSO_TCPV4,
                gso_size,
                ..self.hdr()
            }
        }
    }

    fn data_valid() -> VnetHdr {
        VnetHdr {
            flags: VnetHdr::F_DATA_VALID,
            ..VnetHdr::NONE
        }
    }

    fn data(len: usize, salt: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + salt * 31 + 3) as u8).collect()
    }

    /// A UDP datagram between the same addresses and ports as the TCP flow.
    fn udp_packet() -> Vec<u8> {
        let mut p = Tcp::default().raw(&data(100, 9));
        p[9] = 17;
        p[10..12].copy_from_slice(&[0, 0]);
        let csum = !ones_sum(&p[..20]);
        p[10..12].copy_from_slice(&csum.to_be_bytes());
        p
    }

    // --- Harness --------------------------------------------------------

    type Out = Vec<(VnetHdr, Vec<u8>)>;

    fn push(c: &mut Coalescer, hdr: &VnetHdr, packet: &[u8]) -> Out {
        let mut out = Vec::new();
        c.push(hdr, packet, |h, p| out.push((*h, p.to_vec())));
        out
    }

    fn flush(c: &mut Coalescer) -> Out {
        let mut out = Vec::new();
        c.flush(|h, p| out.push((*h, p.to_vec())));
        out
    }

    /// Everything emitted, in order, for `inputs` pushed then flushed.
    fn run(inputs: &[(VnetHdr, Vec<u8>)]) -> Out {
        run_with(Coalescer::new(), inputs)
    }

    /// [`run`] through a coalescer that merges UDP too.
    fn run_udp(inputs: &[(VnetHdr, Vec<u8>)]) -> Out {
        run_with(Coalescer::with_udp(), inputs)
    }

    fn run_with(mut c: Coalescer, inputs: &[(VnetHdr, Vec<u8>)]) -> Out {
        let mut out = Vec::new();
        for (hdr, packet) in inputs {
            out.extend(push(&mut c, hdr, packet));
        }
        out.extend(flush(&mut c));
        out
    }

    /// The segments `gso::segment` cuts a packet into.
    fn resegment(hdr: &VnetHdr, packet: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        segment(hdr, packet, &mut Vec::new(), |s| out.push(s.to_vec())).unwrap();
        out
    }

    /// Checks what a merged packet must be and returns its payload.
    fn check_merged(hdr: &VnetHdr, packet: &[u8], mss: u16) -> Vec<u8> {
        assert_eq!(
            *hdr,
            VnetHdr {
                flags: VnetHdr::F_NEEDS_CSUM,
                gso_type: VnetHdr::GSO_TCPV4,
                hdr_len: 20 + (packet[32] >> 4) as u16 * 4,
                gso_size: mss,
                csum_start: 20,
                csum_offset: 16,
            }
        );
        assert!(packet.len() <= MAX_MERGED_LEN);
        assert_eq!(usize::from(u16_at(packet, 2)), packet.len());
        assert!(ip_checksum_ok(packet));
        assert_eq!(u16_at(packet, 36), ones_sum(&pseudo_header(packet)));
        assert_eq!(hdr.validate(packet), Ok(()));
        packet[usize::from(hdr.hdr_len)..].to_vec()
    }

    // --- Merging ----------------------------------------------------------

    #[test]
    fn three_segments_merge_and_segment_back_into_the_originals() {
        let payloads: Vec<Vec<u8>> = (0..3).map(|i| data(1000, i)).collect();
        let originals: Vec<Tcp> = (0..3)
            .map(|i| Tcp {
                seq: 5000 + 1000 * i as u32,
                id: 0x1234 + i as u16,
                ..Tcp::default()
            })
            .collect();
        let mut c = Coalescer::new();
        for (tcp, payload) in originals.iter().zip(&payloads) {
            assert!(push(&mut c, &tcp.hdr(), &tcp.packet(payload)).is_empty());
        }
        let out = flush(&mut c);
        assert_eq!(out.len(), 1);
        let (hdr, merged) = &out[0];
        assert_eq!(merged.len(), 3040);
        assert_eq!(check_merged(hdr, merged, 1000), payloads.concat());
        // The first packet's headers, but for length and checksums.
        let first = originals[0].packet(&payloads[0]);
        assert_eq!(merged[..2], first[..2]);
        assert_eq!(merged[4..10], first[4..10]); // ID, DF, TTL, protocol
        assert_eq!(merged[12..36], first[12..36]);
        assert_eq!(merged[38..40], first[38..40]);

        // The key property: segmenting gives back the packets that would
        // have gone on the wire without merging, checksums and all.
        let segments = resegment(hdr, merged);
        assert_eq!(segments.len(), 3);
        for ((seg, tcp), payload) in segments.iter().zip(&originals).zip(&payloads) {
            assert_eq!(&seg[40..], &payload[..]);
            assert!(ip_checksum_ok(seg));
            assert!(tcp_checksum_ok(seg));
            assert_eq!(u32_at(seg, 24), tcp.seq);
            assert_eq!(*seg, tcp.complete(payload));
        }
    }

    #[test]
    fn a_short_last_segment_merges_and_closes_the_packet() {
        let sizes = [1000, 1000, 400];
        let mut c = Coalescer::new();
        let mut seq = 1000;
        for (i, &size) in sizes.iter().enumerate() {
            let tcp = Tcp::at(seq);
            assert!(push(&mut c, &tcp.hdr(), &tcp.packet(&data(size, i))).is_empty());
            seq += size as u32;
        }
        // In sequence and full-sized, but after a short segment.
        let next = Tcp::at(seq);
        let next_packet = next.packet(&data(1000, 3));
        let out = push(&mut c, &next.hdr(), &next_packet);
        assert_eq!(out.len(), 1);
        let (hdr, merged) = &out[0];
        assert_eq!(merged.len(), 40 + 2400);
        let expected: Vec<u8> = (0..3).flat_map(|i| data(sizes[i], i)).collect();
        assert_eq!(check_merged(hdr, merged, 1000), expected);
        let lens: Vec<usize> = resegment(hdr, merged).iter().map(Vec::len).collect();
        assert_eq!(lens, [1040, 1040, 440]);
        assert_eq!(flush(&mut c), vec![(next.hdr(), next_packet)]);
    }

    #[test]
    fn a_longer_segment_does_not_join() {
        let (a, b) = (Tcp::at(1000), Tcp::at(2000));
        let inputs = vec![
            (a.hdr(), a.packet(&data(1000, 0))),
            (b.hdr(), b.packet(&data(1001, 1))),
        ];
        assert_eq!(run(&inputs), inputs);
    }

    #[test]
    fn psh_closes_the_packet() {
        let tcps = [
            Tcp::at(1000),
            Tcp {
                flags: ACK | PSH,
                ..Tcp::at(2000)
            },
            Tcp::at(3000),
        ];
        let packets: Vec<Vec<u8>> = tcps
            .iter()
            .enumerate()
            .map(|(i, t)| t.packet(&data(1000, i)))
            .collect();
        let mut c = Coalescer::new();
        assert!(push(&mut c, &tcps[0].hdr(), &packets[0]).is_empty());
        assert!(push(&mut c, &tcps[1].hdr(), &packets[1]).is_empty());
        let out = push(&mut c, &tcps[2].hdr(), &packets[2]);
        assert_eq!(out.len(), 1);
        let (hdr, merged) = &out[0];
        assert_eq!(merged[33], ACK | PSH);
        assert_eq!(
            check_merged(hdr, merged, 1000),
            [data(1000, 0), data(1000, 1)].concat()
        );
        let flags: Vec<u8> = resegment(hdr, merged).iter().map(|s| s[33]).collect();
        assert_eq!(flags, [ACK, ACK | PSH]);
        assert_eq!(flush(&mut c), vec![(tcps[2].hdr(), packets[2].clone())]);
    }

    #[test]
    fn a_psh_segment_alone_stays_as_it_came() {
        let tcp = Tcp {
            flags: ACK | PSH,
            ..Tcp::default()
        };
        let next = Tcp::at(2000);
        let inputs = vec![
            (tcp.hdr(), tcp.packet(&data(1000, 0))),
            (next.hdr(), next.packet(&data(1000, 1))),
        ];
        assert_eq!(run(&inputs), inputs);
    }

    #[test]
    fn what_differs_prevents_merging_and_keeps_the_order() {
        let first = Tcp::default();
        let next = Tcp::at(2000);
        let ts = |tsval: u8| {
            let mut options = TS_OPTION.to_vec();
            options[7] = tsval;
            options
        };
        let cases: Vec<(&str, Tcp, VnetHdr, Tcp, VnetHdr)> = vec![
            ("gap", first.clone(), first.hdr(), Tcp::at(2001), next.hdr()),
            (
                "ack",
                first.clone(),
                first.hdr(),
                Tcp {
                    ack: 78,
                    ..next.clone()
                },
                next.hdr(),
            ),
            (
                "window",
                first.clone(),
                first.hdr(),
                Tcp {
                    window: 1000,
                    ..next.clone()
                },
                next.hdr(),
            ),
            (
                "timestamps",
                Tcp {
                    tcp_options: ts(1),
                    ..first.clone()
                },
                Tcp {
                    tcp_options: ts(1),
                    ..first.clone()
                }
                .hdr(),
                Tcp {
                    tcp_options: ts(2),
                    ..next.clone()
                },
                Tcp {
                    tcp_options: ts(2),
                    ..next.clone()
                }
                .hdr(),
            ),
            (
                "options against none",
                first.clone(),
                first.hdr(),
                Tcp {
                    tcp_options: ts(1),
                    ..next.clone()
                },
                Tcp {
                    tcp_options: ts(1),
                    ..next.clone()
                }
                .hdr(),
            ),
            (
                "ttl",
                first.clone(),
                first.hdr(),
                Tcp {
                    ttl: 63,
                    ..next.clone()
                },
                next.hdr(),
            ),
            (
                "tos",
                first.clone(),
                first.hdr(),
                Tcp {
                    tos: 0x03, // CE
                    ..next.clone()
                },
                next.hdr(),
            ),
            (
                "df",
                first.clone(),
                first.hdr(),
                Tcp {
                    df: false,
                    ..next.clone()
                },
                next.hdr(),
            ),
            (
                "next without checksum state",
                first.clone(),
                first.hdr(),
                next.clone(),
                VnetHdr::NONE,
            ),
            (
                "first without checksum state",
                first.clone(),
                VnetHdr::NONE,
                next.clone(),
                next.hdr(),
            ),
            (
                "fin",
                first.clone(),
                first.hdr(),
                Tcp {
                    flags: ACK | FIN,
                    ..next.clone()
                },
                next.hdr(),
            ),
            (
                "ip options",
                first.clone(),
                first.hdr(),
                Tcp {
                    ip_options: vec![0x94, 4, 0, 0],
                    ..next.clone()
                },
                Tcp {
                    ip_options: vec![0x94, 4, 0, 0],
                    ..next.clone()
                }
                .hdr(),
            ),
            (
                "checksum elsewhere",
                first.clone(),
                first.hdr(),
                next.clone(),
                VnetHdr {
                    csum_offset: 6,
                    ..next.hdr()
                },
            ),
            (
                "ecn",
                first.clone(),
                first.hdr(),
                next.clone(),
                VnetHdr {
                    gso_type: VnetHdr::GSO_TCPV4 | VnetHdr::GSO_ECN,
                    ..next.gso_hdr(1000)
                },
            ),
        ];
        for (name, a, a_hdr, b, b_hdr) in cases {
            let complete = |tcp: &Tcp, hdr: &VnetHdr, payload: &[u8]| -> Vec<u8> {
                if hdr.flags == 0 {
                    tcp.complete(payload)
                } else {
                    tcp.packet(payload)
                }
            };
            let a_packet = complete(&a, &a_hdr, &data(1000, 0));
            let b_packet = complete(&b, &b_hdr, &data(1000, 1));
            let mut c = Coalescer::new();
            let mut out = push(&mut c, &a_hdr, &a_packet);
            out.extend(push(&mut c, &b_hdr, &b_packet));
            // The first is out by the time the second is in.
            assert_eq!(out[0], (a_hdr, a_packet.clone()), "{name}");
            out.extend(flush(&mut c));
            assert_eq!(out, vec![(a_hdr, a_packet), (b_hdr, b_packet)], "{name}");
        }
    }

    #[test]
    fn a_gap_starts_a_new_packet_that_merges_what_follows() {
        let (a, b, c) = (Tcp::at(1000), Tcp::at(2500), Tcp::at(3500));
        let out = run(&[
            (a.hdr(), a.packet(&data(1000, 0))),
            (b.hdr(), b.packet(&data(1000, 1))),
            (c.hdr(), c.packet(&data(1000, 2))),
        ]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], (a.hdr(), a.packet(&data(1000, 0))));
        assert_eq!(
            check_merged(&out[1].0, &out[1].1, 1000),
            [data(1000, 1), data(1000, 2)].concat()
        );
        assert_eq!(u32_at(&out[1].1, 24), 2500);
    }

    #[test]
    fn unmergeable_packets_go_out_at_once_after_their_flow() {
        let a = Tcp::default();
        let a_packet = a.packet(&data(1000, 0));
        let fin = Tcp {
            flags: ACK | FIN,
            ..Tcp::at(2000)
        };
        let bare_ack = Tcp::at(2000);
        for (hdr, packet) in [
            (fin.hdr(), fin.packet(&[])),
            (bare_ack.hdr(), bare_ack.packet(&[])),
        ] {
            let mut c = Coalescer::new();
            assert!(push(&mut c, &a.hdr(), &a_packet).is_empty());
            let out = push(&mut c, &hdr, &packet);
            assert_eq!(out, vec![(a.hdr(), a_packet.clone()), (hdr, packet)]);
            assert!(flush(&mut c).is_empty());
        }
    }

    #[test]
    fn other_protocols_pass_through_and_leave_tcp_pending() {
        let (a1, a2) = (Tcp::at(1000), Tcp::at(2000));
        let mut c = Coalescer::new();
        assert!(push(&mut c, &a1.hdr(), &a1.packet(&data(1000, 0))).is_empty());
        // UDP between the same addresses and ports is another flow.
        let udp = udp_packet();
        assert_eq!(
            push(&mut c, &data_valid(), &udp),
            vec![(data_valid(), udp.clone())]
        );
        let ipv6 = [0x60; 60];
        assert_eq!(
            push(&mut c, &VnetHdr::NONE, &ipv6),
            vec![(VnetHdr::NONE, ipv6.to_vec())]
        );
        let runt = [0x45, 0, 0];
        assert_eq!(
            push(&mut c, &VnetHdr::NONE, &runt),
            vec![(VnetHdr::NONE, runt.to_vec())]
        );
        assert!(push(&mut c, &a2.hdr(), &a2.packet(&data(1000, 1))).is_empty());
        let out = flush(&mut c);
        assert_eq!(out.len(), 1);
        assert_eq!(
            check_merged(&out[0].0, &out[0].1, 1000),
            [data(1000, 0), data(1000, 1)].concat()
        );
    }

    #[test]
    fn a_fragment_lets_out_every_flow_between_its_addresses_first() {
        let a = Tcp::default();
        let b = Tcp {
            sport: 444,
            ..Tcp::default()
        };
        let other = Tcp {
            src: [198, 51, 100, 1],
            ..Tcp::default()
        };
        let mut c = Coalescer::new();
        for t in [&a, &other, &b] {
            assert!(push(&mut c, &t.hdr(), &t.packet(&data(1000, 0))).is_empty());
        }
        let mut fragment = Tcp::at(2000).complete(&data(1000, 1));
        fragment[6] |= 0x20; // MF
        let out = push(&mut c, &data_valid(), &fragment);
        assert_eq!(
            out,
            vec![
                (a.hdr(), a.packet(&data(1000, 0))),
                (b.hdr(), b.packet(&data(1000, 0))),
                (data_valid(), fragment),
            ]
        );
        assert_eq!(
            flush(&mut c),
            vec![(other.hdr(), other.packet(&data(1000, 0)))]
        );
    }

    #[test]
    fn interleaved_flows_merge_separately() {
        let flow = |sport: u16, seq: u32| Tcp {
            sport,
            seq,
            ..Tcp::default()
        };
        let (a1, b1, a2, b2) = (flow(1, 1000), flow(2, 7000), flow(1, 2000), flow(2, 8000));
        let out = run(&[
            (a1.hdr(), a1.packet(&data(1000, 0))),
            (b1.hdr(), b1.packet(&data(1000, 1))),
            (a2.hdr(), a2.packet(&data(1000, 2))),
            (b2.hdr(), b2.packet(&data(1000, 3))),
        ]);
        assert_eq!(out.len(), 2);
        assert_eq!(u16_at(&out[0].1, 20), 1);
        assert_eq!(
            check_merged(&out[0].0, &out[0].1, 1000),
            [data(1000, 0), data(1000, 2)].concat()
        );
        assert_eq!(u16_at(&out[1].1, 20), 2);
        assert_eq!(
            check_merged(&out[1].0, &out[1].1, 1000),
            [data(1000, 1), data(1000, 3)].concat()
        );
    }

    #[test]
    fn a_flow_beyond_max_flows_lets_out_the_oldest() {
        let flows: Vec<(VnetHdr, Vec<u8>)> = (0..=MAX_FLOWS)
            .map(|i| {
                let t = Tcp {
                    sport: 1000 + i as u16,
                    ..Tcp::default()
                };
                (t.hdr(), t.packet(&data(1000, i)))
            })
            .collect();
        let mut c = Coalescer::new();
        for (hdr, packet) in &flows[..MAX_FLOWS] {
            assert!(push(&mut c, hdr, packet).is_empty());
        }
        let (hdr, packet) = &flows[MAX_FLOWS];
        assert_eq!(push(&mut c, hdr, packet), flows[..1]);
        assert_eq!(flush(&mut c), flows[1..]);
    }

    #[test]
    fn a_restarted_flow_counts_as_new() {
        let flow = |sport: u16, seq: u32| Tcp {
            sport,
            seq,
            ..Tcp::default()
        };
        let mut c = Coalescer::new();
        for i in 0..MAX_FLOWS as u16 {
            let t = flow(i, 1000);
            assert!(push(&mut c, &t.hdr(), &t.packet(&data(1000, 0))).is_empty());
        }
        // Flow 0 after a gap: its packet goes out, a new one starts.
        let restart = flow(0, 5000);
        let out = push(&mut c, &restart.hdr(), &restart.packet(&data(1000, 1)));
        assert_eq!(u16_at(&out[0].1, 20), 0);
        // So flow 1 is now the oldest.
        let newcomer = flow(99, 1000);
        let out = push(&mut c, &newcomer.hdr(), &newcomer.packet(&data(1000, 2)));
        assert_eq!(out.len(), 1);
        assert_eq!(u16_at(&out[0].1, 20), 1);
        let order: Vec<u16> = flush(&mut c).iter().map(|(_, p)| u16_at(p, 20)).collect();
        assert_eq!(order, [2, 3, 4, 5, 6, 7, 0, 99]);
    }

    // --- Super-packets as input -------------------------------------------

    #[test]
    fn a_segment_joins_a_super_packet() {
        let big = Tcp::at(1000);
        let next = Tcp::at(6000);
        let out = run(&[
            (big.gso_hdr(1000), big.packet(&data(5000, 0))),
            (next.hdr(), next.packet(&data(1000, 1))),
        ]);
        assert_eq!(out.len(), 1);
        let (hdr, merged) = &out[0];
        assert_eq!(merged.len(), 40 + 6000);
        assert_eq!(
            check_merged(hdr, merged, 1000),
            [data(5000, 0), data(1000, 1)].concat()
        );
        let segments = resegment(hdr, merged);
        assert_eq!(segments.len(), 6);
        assert!(segments
            .iter()
            .all(|s| s.len() == 1040 && ip_checksum_ok(s) && tcp_checksum_ok(s)));
    }

    #[test]
    fn super_packets_of_the_same_size_merge() {
        let (a, b) = (Tcp::at(1000), Tcp::at(2000));
        let out = run(&[
            (a.hdr(), a.packet(&data(1000, 0))),
            (b.gso_hdr(1000), b.packet(&data(2500, 1))),
        ]);
        assert_eq!(out.len(), 1);
        assert_eq!(
            check_merged(&out[0].0, &out[0].1, 1000),
            [data(1000, 0), data(2500, 1)].concat()
        );
    }

    #[test]
    fn a_super_packet_of_another_size_does_not_merge() {
        let (a, b) = (Tcp::at(1000), Tcp::at(6000));
        let inputs = vec![
            (a.gso_hdr(1000), a.packet(&data(5000, 0))),
            (b.gso_hdr(1400), b.packet(&data(2800, 1))),
        ];
        assert_eq!(run(&inputs), inputs);
        let (a, b) = (Tcp::at(1000), Tcp::at(2000));
        let inputs = vec![
            (a.hdr(), a.packet(&data(1000, 0))),
            (b.gso_hdr(1400), b.packet(&data(2800, 1))),
        ];
        assert_eq!(run(&inputs), inputs);
    }

    #[test]
    fn verified_segments_from_a_tunnel_merge_and_corrupt_ones_do_not() {
        // What arrives over HTTP/3: complete checksums, no offload header.
        let tcp: Vec<Tcp> = (0..3).map(|i| Tcp::at(1000 + 1000 * i)).collect();
        let packets: Vec<Vec<u8>> = tcp
            .iter()
            .enumerate()
            .map(|(i, t)| t.complete(&data(1000, i)))
            .collect();
        for p in &packets {
            assert_eq!(verified(p), data_valid());
        }
        let inputs: Vec<_> = packets.iter().map(|p| (verified(p), p.clone())).collect();
        let out = run(&inputs);
        assert_eq!(out.len(), 1, "one super-packet");
        check_merged(&out[0].0, &out[0].1, 1000);
        assert_eq!(resegment(&out[0].0, &out[0].1).len(), 3);

        // A flipped bit fails the sum: it goes out alone, unmerged, for
        // the kernel to drop, and the segments around it stay apart.
        let mut corrupt = packets[1].clone();
        corrupt[60] ^= 0x10;
        assert_eq!(verified(&corrupt), VnetHdr::NONE);
        let inputs = vec![
            (verified(&packets[0]), packets[0].clone()),
            (verified(&corrupt), corrupt.clone()),
            (verified(&packets[2]), packets[2].clone()),
        ];
        assert_eq!(run(&inputs), inputs);
    }

    #[test]
    fn verified_vouches_only_for_whole_tcp_segments() {
        let whole = Tcp::at(1000).complete(&data(500, 0));
        // Cut short, its length field no longer matches.
        assert_eq!(verified(&whole[..whole.len() - 1]), VnetHdr::NONE);
        // A fragment is not a whole segment, whatever its sums.
        let mut fragment = whole.clone();
        fragment[6] |= 0x20;
        set_header_checksum(&mut fragment, 20);
        assert_eq!(verified(&fragment), VnetHdr::NONE);
        // Nor is a packet whose IP header does not add up.
        let mut header = whole.clone();
        header[8] -= 1;
        assert_eq!(verified(&header), VnetHdr::NONE);
        assert_eq!(verified(&udp_packet()), VnetHdr::NONE);
        assert_eq!(verified(&[]), VnetHdr::NONE);
        assert_eq!(verified(&whole[..20]), VnetHdr::NONE);
        // The partial sum the kernel leaves with NEEDS_CSUM is no checksum.
        assert_eq!(
            verified(&Tcp::at(1000).packet(&data(500, 0))),
            VnetHdr::NONE
        );
    }

    // --- UDP ------------------------------------------------------------

    /// IPv4 UDP around `payload`, between the TCP flow's addresses and
    /// ports, the `n`th of its socket (the IP ID counts them): as the
    /// kernel hands it over with NEEDS_CSUM (`partial`, the pseudo-header
    /// sum in the field), else as on the wire.
    fn udp_nth(n: u16, payload: &[u8], partial: bool) -> Vec<u8> {
        let mut p = vec![0x45, 0];
        p.extend_from_slice(&((28 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&(0x1234 + n).to_be_bytes());
        p.extend_from_slice(&[0x40, 0, 64, 17, 0, 0]);
        p.extend_from_slice(&SRC);
        p.extend_from_slice(&DST);
        p.extend_from_slice(&443u16.to_be_bytes());
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        let ip = !ones_sum(&p[..20]);
        p[10..12].copy_from_slice(&ip.to_be_bytes());
        let mut all = pseudo_header(&p);
        let csum = if partial {
            ones_sum(&all)
        } else {
            all.extend_from_slice(&p[20..]);
            !ones_sum(&all)
        };
        p[26..28].copy_from_slice(&csum.to_be_bytes());
        p
    }

    fn udp(payload: &[u8], partial: bool) -> Vec<u8> {
        udp_nth(0, payload, partial)
    }

    fn udp_partial_hdr() -> VnetHdr {
        VnetHdr {
            flags: VnetHdr::F_NEEDS_CSUM,
            gso_type: VnetHdr::GSO_NONE,
            hdr_len: 28,
            gso_size: 0,
            csum_start: 20,
            csum_offset: 6,
        }
    }

    #[test]
    fn udp_datagrams_of_a_flow_merge_and_segment_back_into_the_originals() {
        let payloads: Vec<Vec<u8>> = (0..5).map(|i| data(64, i)).collect();
        let inputs: Vec<_> = (0..5)
            .map(|i| (udp_partial_hdr(), udp_nth(i as u16, &payloads[i], true)))
            .collect();
        let out = run_udp(&inputs);
        assert_eq!(out.len(), 1, "one super-packet");
        let (hdr, merged) = &out[0];
        assert_eq!(
            *hdr,
            VnetHdr {
                gso_type: VnetHdr::GSO_UDP_L4,
                gso_size: 64,
                ..udp_partial_hdr()
            }
        );
        assert_eq!(hdr.validate(merged), Ok(()));
        assert_eq!(usize::from(u16_at(merged, 2)), merged.len());
        assert_eq!(usize::from(u16_at(merged, 24)), merged.len() - 20);
        assert!(ip_checksum_ok(merged));
        assert_eq!(u16_at(merged, 26), ones_sum(&pseudo_header(merged)));
        // Cut again, each datagram is the one that went in, complete.
        let wire: Vec<Vec<u8>> = (0..5)
            .map(|i| udp_nth(i as u16, &payloads[i], false))
            .collect();
        assert_eq!(resegment(hdr, merged), wire);

        // Verified on arrival (over HTTP/3), the same.
        let inputs: Vec<_> = wire.iter().map(|p| (verified(p), p.clone())).collect();
        assert_eq!(inputs[0].0, data_valid());
        let out = run_udp(&inputs);
        assert_eq!(out.len(), 1);
        assert_eq!(resegment(&out[0].0, &out[0].1), wire);
    }

    #[test]
    fn a_udp_run_keeps_its_datagrams_apart_where_it_must() {
        let (full, short, long) = (data(200, 0), data(100, 1), data(300, 2));
        let input = |p: &[u8]| (udp_partial_hdr(), udp(p, true));
        // A shorter datagram ends the run; a longer one starts another.
        let out = run_udp(&[input(&full), input(&short), input(&full)]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0.gso_size, 200);
        assert_eq!(out[0].1.len(), 28 + 300);
        let out = run_udp(&[input(&full), input(&long)]);
        assert_eq!(out, vec![input(&full), input(&long)]);
        // At most MAX_UDP_SEGMENTS datagrams in one.
        let many: Vec<_> = (0..MAX_UDP_SEGMENTS + 1)
            .map(|_| input(&data(64, 3)))
            .collect();
        let out = run_udp(&many);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].1.len(), 28 + 64 * MAX_UDP_SEGMENTS);
        // A UDP length short of the IP payload is not vouched for.
        let mut short_len = udp(&full, false);
        short_len[24..26].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(verified(&short_len), VnetHdr::NONE);
        // No checksum (zero) is not a verified one: it stays as it came.
        let mut none = udp(&full, false);
        none[26..28].copy_from_slice(&[0, 0]);
        assert_eq!(verified(&none), VnetHdr::NONE);
        let inputs = [(data_valid(), none.clone()), (data_valid(), none.clone())];
        assert_eq!(run_udp(&inputs), inputs.to_vec());
    }

    #[test]
    fn without_udp_merging_datagrams_pass_as_they_came() {
        let inputs: Vec<_> = (0..3).map(|i| input_udp(&data(200, i))).collect();
        assert_eq!(run(&inputs), inputs);
        // Nor does a datagram too short to be joined wait for one.
        let mut c = Coalescer::with_udp();
        let short = input_udp(&data(usize::from(MIN_GSO_SIZE) - 1, 0));
        assert_eq!(push(&mut c, &short.0, &short.1), vec![short.clone()]);
    }

    #[test]
    fn udp_and_tcp_on_the_same_ports_are_different_flows() {
        let t = Tcp::at(1000);
        let inputs = [
            (t.hdr(), t.packet(&data(1000, 0))),
            input_udp(&data(100, 1)),
            (Tcp::at(2000).hdr(), Tcp::at(2000).packet(&data(1000, 2))),
            input_udp(&data(100, 3)),
        ];
        let out = run_udp(&inputs);
        assert_eq!(out.len(), 2, "one run each");
        assert_eq!(out[0].0.gso_type, VnetHdr::GSO_TCPV4);
        assert_eq!(out[1].0.gso_type, VnetHdr::GSO_UDP_L4);
    }

    fn input_udp(payload: &[u8]) -> (VnetHdr, Vec<u8>) {
        (udp_partial_hdr(), udp(payload, true))
    }

    #[test]
    fn a_super_packet_ending_short_takes_nothing_more() {
        let (a, b) = (Tcp::at(1000), Tcp::at(5500));
        let inputs = vec![
            (a.gso_hdr(1000), a.packet(&data(4500, 0))),
            (b.hdr(), b.packet(&data(500, 1))),
        ];
        assert_eq!(run(&inputs), inputs);
    }

    // --- Limits -----------------------------------------------------------

    #[test]
    fn merged_packets_stay_within_the_maximum_length() {
        let payloads: Vec<Vec<u8>> = (0..60).map(|i| data(1400, i)).collect();
        let inputs: Vec<(VnetHdr, Vec<u8>)> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let t = Tcp::at(1000 + 1400 * i as u32);
                (t.hdr(), t.packet(p))
            })
            .collect();
        let out = run(&inputs);
        // 40 + 46 × 1400 = 64440; a 47th segment would make 65840.
        let lens: Vec<usize> = out.iter().map(|(_, p)| p.len()).collect();
        assert_eq!(lens, [40 + 46 * 1400, 40 + 14 * 1400]);
        let mut joined = Vec::new();
        let mut segments = 0;
        for (hdr, packet) in &out {
            joined.extend(check_merged(hdr, packet, 1400));
            let segs = resegment(hdr, packet);
            assert!(segs.iter().all(|s| tcp_checksum_ok(s) && ip_checksum_ok(s)));
            segments += segs.len();
        }
        assert_eq!(joined, payloads.concat());
        assert_eq!(segments, 60);
        assert_eq!(u32_at(&out[1].1, 24), 1000 + 46 * 1400);
    }

    #[test]
    fn segments_below_the_minimum_gso_size_are_not_merged() {
        let (a, b) = (Tcp::at(1000), Tcp::at(1050));
        let inputs = vec![
            (a.hdr(), a.packet(&data(50, 0))),
            (b.hdr(), b.packet(&data(50, 1))),
        ];
        assert_eq!(run(&inputs), inputs);
    }

    #[test]
    fn sequence_numbers_wrap() {
        let (a, b) = (Tcp::at(u32::MAX - 499), Tcp::at(500));
        let out = run(&[
            (a.hdr(), a.packet(&data(1000, 0))),
            (b.hdr(), b.packet(&data(1000, 1))),
        ]);
        assert_eq!(out.len(), 1);
        let seqs: Vec<u32> = resegment(&out[0].0, &out[0].1)
            .iter()
            .map(|s| u32_at(s, 24))
            .collect();
        assert_eq!(seqs, [u32::MAX - 499, 500]);
    }

    // --- Checksum states and pass-through -------------------------------------

    #[test]
    fn verified_segments_merge_into_a_partial_checksum() {
        let (a, b) = (Tcp::at(1000), Tcp::at(2000));
        let originals = [a.complete(&data(1000, 0)), b.complete(&data(1000, 1))];
        let out = run(&[
            (data_valid(), originals[0].clone()),
            (data_valid(), originals[1].clone()),
        ]);
        assert_eq!(out.len(), 1);
        check_merged(&out[0].0, &out[0].1, 1000);
        let mut segments = resegment(&out[0].0, &out[0].1);
        // The receiver's kernel would increment the IP ID per segment.
        segments[1][4..6].copy_from_slice(&originals[1][4..6]);
        segments[1][10..12].copy_from_slice(&originals[1][10..12]);
        assert_eq!(segments, originals);
    }

    #[test]
    fn a_lone_packet_is_emitted_unchanged() {
        let t = Tcp::default();
        let odd_hdr = VnetHdr {
            hdr_len: 12, // advisory, and kept as it came
            ..t.hdr()
        };
        for (hdr, packet) in [
            (t.hdr(), t.packet(&data(1000, 0))),
            (odd_hdr, t.packet(&data(1000, 0))),
            (data_valid(), t.complete(&data(1400, 1))),
            (t.gso_hdr(1000), t.packet(&data(5000, 2))),
            (t.gso_hdr(1000), t.packet(&data(700, 3))),
        ] {
            assert_eq!(run(&[(hdr, packet.clone())]), vec![(hdr, packet)]);
        }
    }

    #[test]
    fn buffers_are_reused_across_batches() {
        let mut c = Coalescer::new();
        let batch = |c: &mut Coalescer| {
            for i in 0..3u32 {
                let t = Tcp::at(1000 + 1000 * i);
                push(c, &t.hdr(), &t.packet(&data(1000, 0)));
            }
            flush(c)
        };
        let first = batch(&mut c);
        let buffer = (c.slots[0].packet.as_ptr(), c.slots[0].packet.capacity());
        let second = batch(&mut c);
        assert_eq!(first, second);
        assert_eq!(
            (c.slots[0].packet.as_ptr(), c.slots[0].packet.capacity()),
            buffer
        );
        assert_eq!(format!("{c:?}"), "Coalescer { pending: 0, .. }");
    }
}
