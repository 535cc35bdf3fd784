//! The HTTP/3 transport, shared by client and gateway: QUIC (quinn) with
//! the same TLS identities as the TCP transport, the HTTP/3 control
//! streams, and [`QuicTransport`], the [`Transport`] a pump runs on: the
//! request stream's bytes through a [`Stream`], packets as QUIC DATAGRAM
//! frames (RFC 9221) carrying HTTP datagrams (RFC 9297).
//!
//! The HTTP/3 bytes themselves (frames, SETTINGS, QPACK) are
//! `veil_proto::h3`'s; the session state machine is the same one the TCP
//! transport runs.

use std::{
    collections::VecDeque,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use quinn::{
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
    Connection, RecvStream, SendDatagramError, SendStream, TransportConfig, VarInt,
};
use tokio::{io::Join, time::Instant};
use veil_proto::h3::{self, ControlReader, Settings};

use crate::stream::{Event, Stream, Transport};

mod driver;
mod socket;
pub use driver::{Driver, Runtime};

/// HTTP/3's "no error" code, for a connection closed at the end of a
/// session (RFC 9114 §8.1).
pub const H3_NO_ERROR: u32 = 0x100;
/// HTTP/3's "request rejected": refused before anything was done for it
/// (a revoked client).
pub const H3_REQUEST_REJECTED: u32 = 0x10b;
/// HTTP/3's "general protocol error", for a peer that broke the rules.
pub const H3_GENERAL_PROTOCOL_ERROR: u32 = 0x101;
/// How much quinn buffers of our datagrams before we stop taking packets
/// from the local side: what a gigabit carries in a millisecond. It is a
/// queue in front of every packet (and ping) that follows: 512 KiB made
/// RTT under load 12 ms (see docs/performance.md).
const DATAGRAM_SEND_BUFFER: usize = 128 * 1024;
/// How much of the peer's datagrams quinn holds until the pump reads them.
const DATAGRAM_RECEIVE_BUFFER: usize = 4 * 1024 * 1024;
/// What a peer may send on one stream before we read it. The streams carry
/// capsules (an address, routes, keepalives) and HTTP/3's SETTINGS: a few
/// KiB. quinn's default (1.25 MB a stream) would let a client park that
/// much on each stream the gateway never reads again (its control stream
/// after SETTINGS, the unidirectional streams it may open later).
const STREAM_RECEIVE_WINDOW: u32 = 64 * 1024;
/// What a peer may send on all streams together before we read it: what
/// one hostile client can make the gateway hold (quinn's default has no
/// limit). Datagrams are not flow-controlled; their buffer is below.
pub const RECEIVE_WINDOW: u32 = 256 * 1024;
/// Stream bytes quinn keeps until the peer acknowledges them (its default:
/// 10 MB). Ours are capsules; a peer that asks for answers (PING) and
/// acknowledges none makes the stream's writes wait, and the pump lets it
/// go, once this much waits.
const SEND_WINDOW: u64 = 1024 * 1024;
/// QUIC's own idle timeout: longer than any session's keepalive timeout,
/// which decides first (and says why).
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Why an HTTP/3 connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("TLS configuration not usable for QUIC: {0}")]
    Crypto(String),
    #[error("the connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("a stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("the peer's control stream: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("the peer's control stream: {0}")]
    Protocol(#[from] veil_proto::ProtoError),
    #[error("the peer closed its control stream before its SETTINGS")]
    NoSettings,
    #[error("the peer does not take HTTP datagrams (SETTINGS_H3_DATAGRAM)")]
    NoDatagrams,
    #[error("the gateway does not take extended CONNECT (SETTINGS_ENABLE_CONNECT_PROTOCOL)")]
    NoExtendedConnect,
    #[error("the peer's QUIC connection does not take DATAGRAM frames")]
    NoQuicDatagrams,
    #[error("the peer takes HTTP datagrams of at most {max} bytes, fewer than the {MIN_PEER_DATAGRAM} a tunnel needs")]
    DatagramsTooSmall { max: usize },
}

/// The smallest datagram a peer must take (its QUIC `max_datagram_frame_size`
/// as quinn reports it, less the frame's own bytes): a 576-byte IPv4
/// packet, which every host must be able to receive (RFC 791), with room
/// for its prefix. A peer that announced less would have every packet
/// toward it cut into fragments of a few bytes: a hundred and more
/// datagrams for one packet, work it could make the other end do for
/// every byte it receives.
pub const MIN_PEER_DATAGRAM: usize = 576 + 8;

/// The transport parameters both ends use.
pub fn transport_config() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(
        IDLE_TIMEOUT.try_into().expect("idle timeout in range"),
    ))
    .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
    .receive_window(VarInt::from_u32(RECEIVE_WINDOW))
    .send_window(SEND_WINDOW)
    .datagram_send_buffer_size(DATAGRAM_SEND_BUFFER)
    .datagram_receive_buffer_size(Some(DATAGRAM_RECEIVE_BUFFER))
    // One request stream and the HTTP/3 control and QPACK streams.
    .max_concurrent_bidi_streams(VarInt::from_u32(1))
    .max_concurrent_uni_streams(VarInt::from_u32(3))
    // BBR, not quinn's default CUBIC: what the connection carries is
    // packets of connections with congestion control of their own, which
    // back off on their losses; CUBIC halving the tunnel's window on the
    // same random losses throttled TCP through it to 10 Mbit/s at 1 %
    // loss and 20 ms (docs/performance.md).
    .congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    t
}

/// The gateway's QUIC configuration from its TLS one (same CA, same
/// certificate, client certificates required), with ALPN `h3`.
pub fn server_config(mut tls: rustls::ServerConfig) -> Result<quinn::ServerConfig, QuicError> {
    tls.alpn_protocols = vec![h3::ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Crypto(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    // A client whose address changes keeps its connection.
    config.migration(true);
    Ok(config)
}

/// The client's QUIC configuration from its TLS one, with ALPN `h3`.
pub fn client_config(mut tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, QuicError> {
    tls.alpn_protocols = vec![h3::ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Crypto(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = transport_config();
    // A session's keepalive may be up to an hour apart (`--keepalive`);
    // QUIC's idle timeout would end a connection quiet for two minutes.
    transport.keep_alive_interval(Some(IDLE_TIMEOUT / 4));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// An HTTP/3 connection's control streams: ours, kept open for the
/// connection's life (closing it is a connection error), and the peer's,
/// read up to its SETTINGS.
pub struct Control {
    _ours: SendStream,
    _theirs: RecvStream,
    pub settings: Settings,
}

/// Opens our control stream with SETTINGS and reads the peer's SETTINGS.
/// Other unidirectional streams the peer opens first are refused (QPACK
/// streams carry nothing with a dynamic table of 0 bytes).
pub async fn control(conn: &Connection) -> Result<Control, QuicError> {
    let mut ours = conn.open_uni().await?;
    ours.write_all(&h3::control_stream_preface()).await?;
    loop {
        let mut theirs = conn.accept_uni().await?;
        let mut buf = [0u8; 256];
        let mut head = Vec::new();
        let mut reader: Option<ControlReader> = None;
        loop {
            let Some(n) = theirs.read(&mut buf).await? else {
                break;
            };
            let bytes = &buf[..n];
            let bytes = match &mut reader {
                Some(_) => bytes,
                None => {
                    head.extend_from_slice(bytes);
                    let Some((kind, used)) = veil_proto::varint::decode(&head) else {
                        continue;
                    };
                    if kind != h3::STREAM_CONTROL {
                        break; // Not the control stream: dropped.
                    }
                    reader = Some(ControlReader::default());
                    let rest = head.split_off(used);
                    head = rest;
                    &head[..]
                }
            };
            let r = reader.as_mut().expect("set above");
            if let Some(settings) = r.feed(bytes)? {
                return Ok(Control {
                    _ours: ours,
                    _theirs: theirs,
                    settings,
                });
            }
        }
        if reader.is_some() {
            return Err(QuicError::NoSettings);
        }
    }
}

/// The request stream, as a byte stream for [`Stream`].
pub type RequestStream = Join<RecvStream, SendStream>;

/// A session's transport over HTTP/3.
pub struct QuicTransport {
    conn: Connection,
    stream: Stream<RequestStream>,
    _control: Control,
    outbox: Outbox,
}

/// quinn taking one datagram once its buffer has room.
type Sending = Pin<Box<dyn Future<Output = Result<(), SendDatagramError>> + Send>>;

/// Bytes, and datagrams, waiting for room in quinn's send buffer, at most.
/// The pump takes no local work while any wait, but a peer's own datagrams
/// still make answers (ICMP errors): a peer that acknowledges nothing
/// would otherwise grow this queue for as long as it sends. Twice what
/// one turn of local work may hand over (a read and a batch, about 240
/// KB; of 64-byte packets, about 3,000), so that only such a peer meets
/// it. The count bounds the memory of tiny datagrams, each an allocation.
const OUTBOX_LIMIT: usize = 512 * 1024;
const OUTBOX_DATAGRAMS: usize = 6 * 1024;

/// Datagrams on their way into quinn's send buffer.
struct Outbox {
    conn: Connection,
    /// Waiting for room, and their bytes.
    queued: VecDeque<Bytes>,
    queued_bytes: usize,
    /// The datagram being handed to quinn once it has room.
    sending: Option<Sending>,
    /// Since when datagrams have waited with the peer acknowledging
    /// nothing, and how many ACK frames it had sent then. A datagram
    /// handed to quinn is no progress on its own: quinn's loss probes take
    /// some from its buffer whether or not the peer reads.
    waiting: Option<(Instant, u64)>,
    drops: Arc<DatagramDrops>,
}

/// Datagrams for the peer that were dropped, by why; one set may be shared
/// by every session of a gateway.
#[derive(Debug, Default)]
pub struct DatagramDrops {
    /// Larger than the path takes now (it shrank meanwhile): lost, as on a
    /// link with a smaller MTU.
    pub too_large: AtomicU64,
    /// The outbox was full ([`OUTBOX_LIMIT`], [`OUTBOX_DATAGRAMS`]): lost,
    /// as on a link whose queue is full.
    pub queue_full: AtomicU64,
}

impl DatagramDrops {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// How often, at most, waiting datagrams look at the peer's ACK count: it
/// is read under the connection's lock, and a stall is 15 s.
const ACKS_LOOKED_AT: Duration = Duration::from_secs(1);

impl Outbox {
    fn push(&mut self, datagram: Bytes) {
        // Straight to quinn while it has room and nothing waits before it.
        if self.queued.is_empty()
            && self.sending.is_none()
            && self.conn.datagram_send_buffer_space() >= datagram.len()
        {
            if let Err(SendDatagramError::TooLarge) = self.conn.send_datagram(datagram) {
                DatagramDrops::count(&self.drops.too_large);
            }
            // Other errors show on the next read: the connection is gone.
            return;
        }
        // Lost, as on a link whose queue is full.
        if self.queued_bytes + datagram.len() > OUTBOX_LIMIT
            || self.queued.len() >= OUTBOX_DATAGRAMS
        {
            DatagramDrops::count(&self.drops.queue_full);
            return;
        }
        if self.waiting.is_none() {
            self.waiting = Some((Instant::now(), self.acks()));
        }
        self.queued_bytes += datagram.len();
        self.queued.push_back(datagram);
    }

    /// Hands queued datagrams to quinn as it makes room; completes once
    /// one went, never if none is queued. Cancel-safe: the datagram being
    /// handed over is kept in `self`.
    async fn send_queued(&mut self) -> io::Result<()> {
        loop {
            if let Some(sending) = &mut self.sending {
                let r = sending.await;
                self.sending = None;
                // One went: if the peer acknowledged anything since the
                // clock started, it starts again for the rest.
                self.waiting = match self.waiting {
                    _ if self.queued.is_empty() => None,
                    Some((since, acks))
                        if since.elapsed() < ACKS_LOOKED_AT || acks == self.acks() =>
                    {
                        Some((since, acks))
                    }
                    _ => Some((Instant::now(), self.acks())),
                };
                return match r {
                    Ok(()) => Ok(()),
                    // Larger than the path takes now: the packet is lost,
                    // as on a link with a smaller MTU.
                    Err(SendDatagramError::TooLarge) => {
                        DatagramDrops::count(&self.drops.too_large);
                        Ok(())
                    }
                    Err(e) => Err(io::Error::other(e)),
                };
            }
            let Some(front) = self.queued.pop_front() else {
                return std::future::pending().await;
            };
            self.queued_bytes -= front.len();
            let conn = self.conn.clone();
            self.sending = Some(Box::pin(
                async move { conn.send_datagram_wait(front).await },
            ));
        }
    }

    fn pending(&self) -> usize {
        self.queued_bytes + usize::from(self.sending.is_some())
    }

    /// ACK frames the peer has sent so far.
    fn acks(&self) -> u64 {
        self.conn.stats().frame_rx.acks
    }

    fn clear(&mut self) {
        self.queued.clear();
        self.queued_bytes = 0;
        self.waiting = None;
    }
}

impl QuicTransport {
    /// A session's transport; its dropped datagrams are counted in
    /// `drops`.
    pub fn new(
        conn: Connection,
        control: Control,
        send: SendStream,
        recv: RecvStream,
        drops: Arc<DatagramDrops>,
    ) -> Self {
        QuicTransport {
            stream: Stream::new(tokio::io::join(recv, send)),
            _control: control,
            outbox: Outbox {
                conn: conn.clone(),
                queued: VecDeque::new(),
                queued_bytes: 0,
                sending: None,
                waiting: None,
                drops,
            },
            conn,
        }
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Closes the connection at once, telling the peer why (`code`).
    pub fn close_connection(&self, code: u32) {
        self.conn.close(VarInt::from_u32(code), b"");
    }
}

impl Transport for QuicTransport {
    fn out_mut(&mut self) -> &mut Vec<u8> {
        self.stream.out_mut()
    }

    fn pending(&self) -> usize {
        self.stream.pending() + self.outbox.pending()
    }

    fn stalled_since(&self) -> Option<Instant> {
        // A peer that takes no datagram stalls as one that reads nothing
        // on the stream: the datagrams are most of what we send it.
        let datagrams = self.outbox.waiting.map(|(since, _)| since);
        self.stream
            .stalled_since()
            .into_iter()
            .chain(datagrams)
            .min()
    }

    async fn next(&mut self, buf: &mut [u8], read: bool) -> io::Result<Event> {
        let QuicTransport {
            conn,
            stream,
            outbox,
            ..
        } = self;
        tokio::select! {
            d = conn.read_datagram() => d.map(Event::Datagram).map_err(io::Error::other),
            r = outbox.send_queued() => r.map(|()| Event::Wrote),
            e = stream.next(buf, read) => e,
        }
    }

    fn send_datagram(&mut self, datagram: Vec<u8>) {
        self.outbox.push(Bytes::from(datagram));
    }

    fn max_datagram(&self) -> Option<usize> {
        self.conn.max_datagram_size()
    }

    fn try_datagram(&mut self) -> Option<Bytes> {
        // Polled once, never waited on: a datagram already queued comes
        // back, otherwise nothing (and no wake-up is left registered).
        let read = std::pin::pin!(self.conn.read_datagram());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match read.poll(&mut cx) {
            std::task::Poll::Ready(Ok(datagram)) => Some(datagram),
            _ => None,
        }
    }

    fn discard(&mut self) {
        self.stream.discard();
        self.outbox.clear();
    }

    async fn close(&mut self, timeout: Duration) {
        // The request stream ends (FIN) once its bytes are written; the
        // connection closes when the peer closes it or after `timeout`.
        let QuicTransport { conn, stream, .. } = self;
        discarding_datagrams(conn, async {
            stream.close(timeout).await;
            let _ = tokio::time::timeout(timeout, conn.closed()).await;
        })
        .await;
        self.close_connection(H3_NO_ERROR);
    }
}

/// Runs `work` while the peer's datagrams are read and discarded: before
/// the session reads them (the HTTP/3 setup) and after (closing), quinn
/// would keep them, and it counts an empty datagram as 32 bytes however
/// large the packet it keeps for it (quinn issue 2862).
pub async fn discarding_datagrams<T>(conn: &Connection, work: impl Future<Output = T>) -> T {
    let discard = async {
        while conn.read_datagram().await.is_ok() {}
        // The connection is gone: `work` sees it too, and ends.
        std::future::pending::<T>().await
    };
    tokio::select! {
        biased;
        done = work => done,
        never = discard => never,
    }
}

/// Opens the request stream and returns its id (for the datagrams' Quarter
/// Stream ID).
pub async fn open_request(conn: &Connection) -> Result<(SendStream, RecvStream, u64), QuicError> {
    let (send, recv) = conn.open_bi().await?;
    let id = VarInt::from(send.id()).into_inner();
    Ok((send, recv, id))
}

/// Accepts the client's request stream and returns its id.
pub async fn accept_request(conn: &Connection) -> Result<(SendStream, RecvStream, u64), QuicError> {
    let (send, recv) = conn.accept_bi().await?;
    let id = VarInt::from(send.id()).into_inner();
    Ok((send, recv, id))
}

/// Checks what both ends need of the peer: HTTP datagrams at both layers,
/// large enough to carry packets ([`MIN_PEER_DATAGRAM`]), and, from a
/// gateway, extended CONNECT.
pub fn check_peer(
    conn: &Connection,
    settings: &Settings,
    peer_is_server: bool,
) -> Result<(), QuicError> {
    if !settings.datagram {
        return Err(QuicError::NoDatagrams);
    }
    if peer_is_server && !settings.extended_connect {
        return Err(QuicError::NoExtendedConnect);
    }
    match conn.max_datagram_size() {
        None => Err(QuicError::NoQuicDatagrams),
        Some(max) if max < MIN_PEER_DATAGRAM => Err(QuicError::DatagramsTooSmall { max }),
        Some(_) => Ok(()),
    }
}

/// A UDP socket for a QUIC endpoint at `addr`.
pub fn udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket: std::net::UdpSocket =
        crate::net::listener_socket(addr, socket2::Type::DGRAM)?.into();
    set_buffers(&socket, SOCKET_BUFFER);
    Ok(socket)
}

/// Bytes of datagrams the kernel may hold for a QUIC socket each way.
/// With the default (about 200 KiB) a download over HTTP/3 overflowed
/// both ends' receive buffers (120–180 `RcvbufErrors` per 2 s run, each a
/// lost packet of the tunnel) whenever the reading task was late.
const SOCKET_BUFFER: libc::c_int = 8 << 20;

/// Asks for `bytes` of receive and send buffer: beyond `net.core.rmem_max`
/// (`wmem_max`) where privileged (`SO_*BUFFORCE`), up to it otherwise.
fn set_buffers(socket: &std::net::UdpSocket, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    let set = |option: libc::c_int| {
        // SAFETY: a valid socket; the option reads an int.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    for (forced, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // Best effort: the defaults work, only with more loss under load.
        let _ = set(forced) || set(plain);
    }
}
