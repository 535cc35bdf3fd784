//! Both session state machines fed an arbitrary peer byte stream, cut into
//! arbitrary pieces, on virtual time that advances between pieces
//! (sometimes by hours), with timeouts handled when due and packets sent
//! now and then.
//!
//! Input: two bytes seeding cuts and time steps, a mode byte (bit 0:
//! client instead of gateway; 1: offload; 2: a 1500-byte capsule limit;
//! 3: one-second timeouts; 4: send packets; 5: end with EOF), then the
//! stream: an upgrade request and capsules for the gateway, a response and
//! capsules for the client.
//!
//! Asserts, beyond "no panic":
//! - a peer is declared dead only after the silence the session
//!   reports, really that long, and a handshake timed out only after the
//!   time allowed;
//! - `receive` fails only by closing the session; `Close` comes out once,
//!   last, with the session's close reason, and nothing after it;
//!   `poll_timeout` is `None` exactly when closed; after the peer's long
//!   silence the session is closed;
//! - outputs belong to their end (no `Assigned` from a gateway), packets
//!   respect the capsule limit and are counted, offload packets carry a
//!   header that validates, routes validate, DNS configurations carry only
//!   names safe for a resolver configuration and re-encode;
//! - everything a session sends is understood by a real peer: a gateway's
//!   bytes go into a `ClientSession` and a client's into a
//!   `ServerSession`, which must never close for a protocol error (a
//!   refusal is fine);
//! - the heap held stays within a bound of the input's size.
#![no_main]

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use libfuzzer_sys::fuzz_target;
use veil_fuzz::{
    assert_dns_safe, heap,
    ip::{self, Builder},
    Rng,
};
use veil_proto::{
    capsule::{validate_routes, Capsule},
    gso::VnetHdr,
    session::{ClientConfig, ClientSession, CloseReason, Output, ServerConfig, ServerSession},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const HOST: &str = "gateway.example";

#[derive(Clone, Copy)]
struct Mode(u8);

impl Mode {
    fn client(self) -> bool {
        self.0 & 1 != 0
    }
    fn offload(self) -> bool {
        self.0 & 2 != 0
    }
    fn max_capsule_len(self) -> Option<usize> {
        (self.0 & 4 != 0).then_some(1500)
    }
    fn short_timeouts(self) -> bool {
        self.0 & 8 != 0
    }
    fn send(self) -> bool {
        self.0 & 16 != 0
    }
    fn eof(self) -> bool {
        self.0 & 32 != 0
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&[s0, s1, mode], stream)) = data.split_first_chunk::<3>() else {
        return;
    };
    let mut rng = Rng::new(u16::from_le_bytes([s0, s1]));
    let mode = Mode(mode);
    let pieces = rng.pieces(stream);
    // What a session holds: the request or response being read (8 KiB at
    // most), one partial capsule, one piece, what it queued since the
    // last drain; all of it twice over while vectors grow. The peer
    // alongside holds as much again.
    let limit = 16 * (64 * 1024 + stream.len()) + (1 << 20);
    heap::bounded("session", limit, || {
        if mode.client() {
            Run::<ClientSession>::new(mode).run(&mut rng, &pieces, mode)
        } else {
            Run::<ServerSession>::new(mode).run(&mut rng, &pieces, mode)
        }
    });
});

/// What both sessions offer, so one loop drives either.
trait Session: Sized {
    type Peer: Session;
    const GATEWAY: bool;
    fn create(mode: Mode, now: Instant) -> Self;
    fn receive(&mut self, bytes: &[u8], now: Instant) -> Result<(), veil_proto::ProtoError>;
    fn receive_eof(&mut self);
    fn poll_output(&mut self) -> Option<Output>;
    fn recycle(&mut self, buf: Vec<u8>);
    fn poll_timeout(&self) -> Option<Instant>;
    fn handle_timeout(&mut self, now: Instant);
    fn send_packet(&mut self, packet: &[u8]);
    fn send_offload_packet(&mut self, hdr: &VnetHdr, packet: &[u8]);
    fn offload(&self) -> bool;
    fn is_closed(&self) -> bool;
    fn close_reason(&self) -> Option<&CloseReason>;
    fn packets_received(&self) -> u64;
    fn offload_invalid(&self) -> u64;
    fn max_capsule_len(mode: Mode) -> usize {
        mode.max_capsule_len()
            .unwrap_or(veil_proto::capsule::DEFAULT_MAX_CAPSULE_LEN)
    }
}

macro_rules! forward {
    () => {
        fn receive(&mut self, b: &[u8], now: Instant) -> Result<(), veil_proto::ProtoError> {
            Self::receive(self, b, now)
        }
        fn receive_eof(&mut self) {
            Self::receive_eof(self)
        }
        fn poll_output(&mut self) -> Option<Output> {
            Self::poll_output(self)
        }
        fn recycle(&mut self, buf: Vec<u8>) {
            self.recycle_send_buffer(buf)
        }
        fn poll_timeout(&self) -> Option<Instant> {
            Self::poll_timeout(self)
        }
        fn handle_timeout(&mut self, now: Instant) {
            Self::handle_timeout(self, now)
        }
        fn send_packet(&mut self, p: &[u8]) {
            Self::send_packet(self, p)
        }
        fn send_offload_packet(&mut self, hdr: &VnetHdr, p: &[u8]) {
            Self::send_offload_packet(self, hdr, p)
        }
        fn offload(&self) -> bool {
            Self::offload(self)
        }
        fn is_closed(&self) -> bool {
            Self::is_closed(self)
        }
        fn close_reason(&self) -> Option<&CloseReason> {
            Self::close_reason(self)
        }
        fn packets_received(&self) -> u64 {
            self.stats().packets_received
        }
        fn offload_invalid(&self) -> u64 {
            self.stats().offload_invalid
        }
    };
}

impl Session for ServerSession {
    type Peer = ClientSession;
    const GATEWAY: bool = true;
    fn create(mode: Mode, now: Instant) -> Self {
        let mut config = ServerConfig::new(VIP);
        config.offload = mode.offload();
        config.max_capsule_len = Self::max_capsule_len(mode);
        if mode.short_timeouts() {
            config.keepalive_timeout = Duration::from_secs(1);
            config.handshake_timeout = Duration::from_secs(1);
        }
        ServerSession::new(config, now).expect("valid configuration")
    }
    forward!();
}

impl Session for ClientSession {
    type Peer = ServerSession;
    const GATEWAY: bool = false;
    fn create(mode: Mode, now: Instant) -> Self {
        let mut config = ClientConfig::new(HOST);
        config.offload = mode.offload();
        config.max_capsule_len = Self::max_capsule_len(mode);
        if mode.short_timeouts() {
            config.keepalive_interval = Duration::from_secs(1);
            config.keepalive_timeout = Duration::from_secs(2);
            config.handshake_timeout = Duration::from_secs(1);
        }
        ClientSession::new(config, now).expect("valid configuration")
    }
    forward!();
}

/// The session under test, and a real peer that reads what it sends.
struct Run<S: Session> {
    session: S,
    peer: S::Peer,
    now: Instant,
    /// When the session started, and last heard from its peer.
    start: Instant,
    heard: Instant,
    closed: bool,
    packets: u64,
    /// Whether the session sent its first bytes yet.
    sent: bool,
    max_capsule_len: usize,
}

impl<S: Session> Run<S> {
    fn new(mode: Mode) -> Self {
        let now = Instant::now();
        // The peer's own settings only matter for what it accepts: the
        // default limits, and offload if the session may use it.
        let peer_mode = Mode(mode.0 & 2);
        let mut run = Run {
            session: S::create(mode, now),
            peer: S::Peer::create(peer_mode, now),
            now,
            start: now,
            heard: now,
            closed: false,
            packets: 0,
            sent: false,
            max_capsule_len: S::max_capsule_len(mode),
        };
        // The peer's own first bytes (a client's request) are not the
        // session's business: the fuzz input plays the peer toward it.
        while run.peer.poll_output().is_some() {}
        run.drain();
        run
    }

    fn run(mut self, rng: &mut Rng, pieces: &[&[u8]], mode: Mode) {
        let (hdr, super_packet) = offload_packet();
        let udp = Builder::udp().complete(b"one datagram");
        for piece in pieces {
            if !self.session.is_closed() {
                self.heard = self.now;
            }
            let result = self.session.receive(piece, self.now);
            if let Err(e) = result {
                assert!(
                    self.session.is_closed(),
                    "receive failed ({e}) but did not close"
                );
            }
            self.drain();
            if mode.send() && rng.below(3) == 0 {
                self.session.send_packet(&udp);
                self.session.send_offload_packet(&hdr, &super_packet);
                self.drain();
            }
            self.advance(rng);
        }
        if mode.eof() {
            self.session.receive_eof();
            self.drain();
            assert!(self.session.is_closed(), "still open after EOF");
        }
        // A peer silent for a day is dead, whatever the state.
        self.now += Duration::from_secs(86_400);
        self.timeouts();
        assert!(
            self.session.is_closed(),
            "still open after a day of silence"
        );
        assert!(self.closed, "closed without a Close output");
        self.session.send_packet(&udp);
        self.session
            .handle_timeout(self.now + Duration::from_secs(3600));
        assert_eq!(self.session.poll_output(), None, "output after Close");
    }

    /// Moves virtual time on: often not at all, sometimes by milliseconds,
    /// seconds or an hour; then handles whatever timeout fell due.
    fn advance(&mut self, rng: &mut Rng) {
        let step = match rng.below(8) {
            0..=3 => Duration::ZERO,
            4 | 5 => Duration::from_millis(rng.below(1000)),
            6 => Duration::from_secs(rng.below(20)),
            _ => Duration::from_secs(3600),
        };
        self.now += step;
        self.timeouts();
    }

    fn timeouts(&mut self) {
        // As the I/O loop does: sleep until the deadline, handle it, ask
        // again. A deadline is never in the past twice in a row.
        for _ in 0..4 {
            match self.session.poll_timeout() {
                Some(at) if at <= self.now => {
                    self.session.handle_timeout(self.now);
                    self.drain();
                }
                Some(_) => return,
                None => {
                    assert!(self.session.is_closed(), "no timeout while open");
                    return;
                }
            }
        }
        let next = self.session.poll_timeout();
        assert!(
            next.is_none_or(|at| at > self.now),
            "a deadline that stays due"
        );
    }

    fn drain(&mut self) {
        while let Some(output) = self.session.poll_output() {
            assert!(!self.closed, "{output:?} after Close");
            match output {
                Output::Send(bytes) => {
                    assert!(!bytes.is_empty(), "an empty Send");
                    if S::GATEWAY && !self.sent {
                        assert!(bytes.starts_with(b"HTTP/1.1 "), "a gateway answers in HTTP");
                    }
                    self.sent = true;
                    self.feed_peer(&bytes);
                    self.session.recycle(bytes);
                }
                Output::Packet(packet) => {
                    assert!(packet.len() < self.max_capsule_len);
                    self.packets += 1;
                }
                Output::OffloadPacket(joined) => {
                    assert!(self.session.offload(), "an offload packet without offload");
                    assert!(
                        VnetHdr::split(&joined).is_ok(),
                        "an offload header that fails"
                    );
                    self.packets += 1;
                }
                Output::Datagram(_) => panic!("an HTTP datagram from a session over HTTP/1.1"),
                Output::Assigned { prefix, .. } => {
                    assert!(!S::GATEWAY, "a gateway is assigned an address");
                    assert!(prefix <= 32);
                }
                Output::Assigned6 { prefix, .. } => {
                    assert!(!S::GATEWAY, "a gateway is assigned an address");
                    assert!(prefix <= 128);
                }
                Output::Dns(configs) => {
                    assert!(!S::GATEWAY, "a gateway is given DNS servers");
                    assert_dns_safe(&configs);
                    Capsule::DnsAssign(configs)
                        .encode(&mut Vec::new())
                        .expect("the DNS configuration announced re-encodes");
                }
                Output::Routes(routes) => {
                    assert!(!S::GATEWAY, "a gateway is given routes");
                    assert_eq!(validate_routes(&routes), Ok(()));
                }
                Output::Close { reason } => {
                    assert!(self.session.is_closed(), "Close while open");
                    assert_eq!(self.session.close_reason(), Some(&reason));
                    self.check_timing(&reason);
                    self.closed = true;
                }
            }
        }
        assert_eq!(
            self.session.packets_received(),
            self.packets,
            "packets counted"
        );
        assert_eq!(
            self.closed,
            self.session.is_closed(),
            "closed without a Close"
        );
    }

    /// A session gives up on its peer only after the silence it reports,
    /// which is at least the shortest timeout any configuration has (1 s),
    /// and on a handshake only after the time allowed.
    fn check_timing(&self, reason: &CloseReason) {
        match reason {
            CloseReason::PeerDead { silent_for } => {
                assert_eq!(*silent_for, self.now - self.heard, "silence reported");
                assert!(
                    *silent_for >= Duration::from_secs(1),
                    "dead after {silent_for:?}"
                );
            }
            CloseReason::HandshakeTimeout { after } => {
                assert!(self.now - self.start >= *after, "handshake cut short");
                assert!(*after >= Duration::from_secs(1));
            }
            _ => {}
        }
    }

    /// The session's bytes into the real peer, which must take them.
    fn feed_peer(&mut self, bytes: &[u8]) {
        let _ = self.peer.receive(bytes, self.now);
        while let Some(output) = self.peer.poll_output() {
            if let Output::Close {
                reason: CloseReason::Protocol(e) | CloseReason::BadRequest(e),
            } = output
            {
                panic!("the peer rejects what the session sent: {e}")
            }
        }
        assert_eq!(
            self.peer.offload_invalid(),
            0,
            "an invalid offload header sent"
        );
    }
}

/// A TCP super-packet of three segments as the gateway's kernel hands it
/// over, with its header.
fn offload_packet() -> (VnetHdr, Vec<u8>) {
    let b = Builder {
        flags: ip::ACK | ip::PSH,
        ..Builder::tcp()
    };
    (b.offload_hdr(Some(100)), b.partial(&ip::payload(250, 0)))
}
