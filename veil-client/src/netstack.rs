//! A user-space TCP/IP stack (smoltcp) on the tunnel's leased address:
//! what the SOCKS5 server ([`crate::socks`]) and the transparent redirect
//! ([`crate::redirect`]) open their connections on, so that they travel
//! as IP packets through the same CONNECT-IP session as the TUN mode's.
//! The gateway cannot tell the difference: its NAT, policy and flows are
//! the same.
//!
//! The stack outlives the tunnel's connections: its device is two queues
//! that the session of the moment drains ([`Netstack::drain_into`]) and fills
//! ([`Netstack::deliver`]). The leased address is stable per client, so a
//! reconnect is a pause for the stack's TCP, which retransmits as over
//! any lossy link.
//!
//! Next to the TUN device the stack takes the replies to its own ports
//! only ([`Ports::BESIDE_KERNEL`], above the kernel's ephemeral range);
//! alone it takes every packet.
//!
//! One poll task drives the stack (timers, ingress, egress); a
//! connection's bytes move between a local socket and the stack's buffers
//! ([`TcpConn::poll_send_from`], [`TcpConn::poll_recv_into`], driven by
//! [`crate::relay`]), each step holding the stack's lock briefly and
//! waking the poll task when it changed something.

use std::{
    collections::{HashSet, VecDeque},
    future::poll_fn,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex, MutexGuard},
    task::{ready, Context, Poll},
    time::Duration,
};

use smoltcp::{
    iface::{Config, Interface, SocketHandle, SocketSet},
    phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium},
    socket::{tcp, udp},
    time::Instant,
    wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint},
};
use tokio::{
    net::TcpStream,
    sync::{watch, Notify},
};
use veil_proto::{
    gro::Coalescer,
    gso::{VnetHdr, VNET_HDR_LEN},
    ipv4::{be16, IP_PROTO, PROTO_TCP, PROTO_UDP},
    session::ClientSession,
};

/// Packets from the tunnel waiting for the stack, at most (beyond, they
/// are dropped as a full NIC ring would: TCP recovers).
const RX_QUEUE: usize = 4096;
/// Packets from the stack waiting for the tunnel, at most: beyond, the
/// stack keeps the data in its sockets (which is what makes a broken
/// tunnel a pause, not a loss). Short, so that a new connection's SYN
/// does not wait behind a bulk transfer's backlog (measured: 1024 packets
/// made each new connection wait ~50 ms behind an upload).
const TX_QUEUE: usize = 128;
/// Each connection's receive and send buffers: a window that covers a
/// fast path's bandwidth-delay product.
const TCP_RX_BUFFER: usize = 1 << 20;
const TCP_TX_BUFFER: usize = 512 << 10;
/// Closed TCP sockets kept for new connections, at most: each holds its
/// buffers, which a new socket would otherwise allocate and zero (1.5 MiB:
/// in a profile of `cargo xtask bench socks`, memset and the page faults
/// behind it were a third of the stack thread's time while connections
/// opened). Worst case this keeps 24 MiB that no connection uses.
const SPARE_SOCKETS: usize = 16;
/// The most one read or write on a local socket moves while it holds the
/// stack's lock, which the poll task and every other connection wait on.
const LOCKED_IO: usize = 64 << 10;
/// Datagrams a UDP socket holds each way, and their bytes.
const UDP_PACKETS: usize = 64;
const UDP_BYTES: usize = 256 << 10;
/// How long an opening waits for the tunnel's address, then for the
/// destination's answer.
const ADDRESS_WAIT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection both sides closed, or whose owner is gone, is dropped
/// after this long even if the peer never finishes closing.
const LINGER: Duration = Duration::from_secs(30);

/// The local ports the stack opens its connections from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    first: u16,
    last: u16,
    /// Whether every packet is the stack's (no TUN device beside it).
    all: bool,
}

impl Ports {
    /// Alone: every port above the privileged ones, every packet.
    pub const ALONE: Ports = Ports {
        first: 1024,
        last: u16::MAX,
        all: true,
    };
    /// Beside the TUN device: above Linux's default ephemeral range
    /// (32768–60999), so the kernel's connections and the stack's never
    /// share a port on the leased address.
    pub const BESIDE_KERNEL: Ports = Ports {
        first: 61000,
        last: u16::MAX,
        all: false,
    };

    fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

/// Why a connection could not be opened.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnectError {
    #[error("the tunnel has no address yet")]
    NoTunnel,
    #[error("connection refused")]
    Refused,
    #[error("the destination is unreachable")]
    Unreachable,
    #[error("the gateway does not allow this destination")]
    NotAllowed,
    #[error("no answer from the destination")]
    TimedOut,
    #[error("every local port is in use")]
    NoPort,
    #[error("an address the stack cannot open a connection to")]
    Unaddressable,
}

/// The stack, shared by the poll task, the tunnel and every connection.
#[derive(Clone)]
pub struct Netstack {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Packets between the tunnel's thread and the stack's, each way
    /// behind a lock of its own, held only to move them: the tunnel never
    /// waits for the stack's work.
    inbox: Mutex<VecDeque<Received>>,
    outbox: Mutex<VecDeque<Vec<u8>>>,
    /// The tunnel's alone.
    coalescer: Mutex<Coalescer>,
    /// Wakes the poll task: a packet arrived, a socket changed.
    poke: Notify,
    /// Wakes the tunnel: packets wait in the transmit queue.
    outgoing: Notify,
    /// The leased address, once assigned.
    address: watch::Sender<Option<Ipv4Addr>>,
    /// The resolvers the gateway announced, reached through the tunnel.
    resolvers: Mutex<Vec<Ipv4Addr>>,
    ports: Ports,
}

struct State {
    iface: Option<Interface>,
    device: Queues,
    sockets: SocketSet<'static>,
    used: HashSet<u16>,
    next_port: u16,
    /// TCP sockets whose owner is gone: removed once closed.
    orphans: Vec<SocketHandle>,
    /// Sockets an ICMP error ended while opening, and what it said.
    failed: Vec<(SocketHandle, ConnectError)>,
    /// Closed TCP sockets to open new connections with ([`SPARE_SOCKETS`]).
    spare: Vec<tcp::Socket<'static>>,
    mtu: usize,
}

impl Netstack {
    /// A stack whose packets are at most `mtu` bytes, and its poll task.
    pub fn spawn(mtu: u16, ports: Ports) -> Netstack {
        let (address, _) = watch::channel(None);
        let stack = Netstack {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    iface: None,
                    device: Queues::default(),
                    sockets: SocketSet::new(Vec::new()),
                    used: HashSet::new(),
                    next_port: ports.first,
                    orphans: Vec::new(),
                    failed: Vec::new(),
                    spare: Vec::new(),
                    mtu: usize::from(mtu),
                }),
                inbox: Mutex::new(VecDeque::new()),
                outbox: Mutex::new(VecDeque::new()),
                coalescer: Mutex::new(Coalescer::new()),
                poke: Notify::new(),
                outgoing: Notify::new(),
                address,
                resolvers: Mutex::new(Vec::new()),
                ports,
            }),
        };
        tokio::spawn(stack.clone().poll_loop());
        stack
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.shared.state)
    }

    fn poke(&self) {
        self.shared.poke.notify_one();
    }

    async fn poll_loop(self) {
        let shared = &self.shared;
        loop {
            let delay = {
                let mut state = self.lock();
                state.device.rx.append(&mut lock(&shared.inbox));
                state.device.room = TX_QUEUE.saturating_sub(lock(&shared.outbox).len());
                let delay = state.poll();
                if !state.device.tx.is_empty() {
                    lock(&shared.outbox).append(&mut state.device.tx);
                    shared.outgoing.notify_one();
                }
                delay
            };
            // The connections' tasks run before the next round, so that
            // one round serves all they did, rather than a round per poke.
            tokio::task::yield_now().await;
            let sleep = delay.unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                () = self.shared.poke.notified() => {}
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// The tunnel's address: the first assignment sets the stack up;
    /// `Err` with the old one if the gateway assigns another (the stack's
    /// connections cannot move).
    pub fn assign(&self, addr: Ipv4Addr) -> Result<(), Ipv4Addr> {
        let mut state = self.lock();
        match state.iface.as_ref().and_then(Interface::ipv4_addr) {
            Some(old) if old == addr => return Ok(()),
            Some(old) => return Err(old),
            None => {}
        }
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = random_seed();
        let State { device, mtu, .. } = &mut *state;
        device.mtu = *mtu;
        let mut iface = Interface::new(config, device, Instant::now());
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(addr), 32));
        });
        // Everything goes out through the one "link": the tunnel.
        let _ = iface.routes_mut().add_default_ipv4_route(addr);
        state.iface = Some(iface);
        drop(state);
        self.shared.address.send_replace(Some(addr));
        self.poke();
        Ok(())
    }

    /// The resolvers the gateway announced (empty: none, or withdrawn).
    pub fn set_resolvers(&self, servers: Vec<Ipv4Addr>) {
        *self
            .shared
            .resolvers
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = servers;
    }

    pub fn resolvers(&self) -> Vec<Ipv4Addr> {
        lock(&self.shared.resolvers).clone()
    }

    /// Whether a packet from the gateway is for this stack rather than
    /// for the TUN device beside it.
    pub fn wants(&self, packet: &[u8]) -> bool {
        self.shared.ports.all || local_port(packet).is_some_and(|p| self.shared.ports.contains(p))
    }

    /// A packet from the gateway (an offload header first when `joined`).
    pub fn deliver(&self, packet: Vec<u8>, joined: bool) {
        // With checksums not verified on receipt (the tunnel is
        // authenticated), smoltcp takes a super-packet whole: one
        // segment of many MSS, which is what it stands for. Its offload
        // header is skipped, not cut (that would move 64 KiB).
        let start = if joined { VNET_HDR_LEN } else { 0 };
        let Some(ip) = packet.get(start..) else {
            return;
        };
        if let Some(error) = unreachable_port(ip) {
            self.lock().icmp_error(error);
        }
        let mut inbox = lock(&self.shared.inbox);
        if inbox.len() < RX_QUEUE {
            inbox.push_back(Received { packet, start });
        }
        drop(inbox);
        self.poke();
    }

    /// Waits until packets for the gateway are queued. Cancel-safe.
    pub async fn outgoing(&self) {
        loop {
            if !lock(&self.shared.outbox).is_empty() {
                return;
            }
            self.shared.outgoing.notified().await;
        }
    }

    /// Hands queued packets to the session, up to about `max_bytes`. When
    /// the gateway takes offload datagrams, a connection's consecutive
    /// segments go as one super-packet (as the TUN mode's kernel sends
    /// them): one datagram, one write into the gateway's TUN device,
    /// instead of one per segment.
    pub fn drain_into(&self, session: &mut ClientSession, max_bytes: usize) {
        let mut batch = Vec::new();
        let mut outbox = lock(&self.shared.outbox);
        let mut taken = 0;
        while taken < max_bytes {
            let Some(packet) = outbox.pop_front() else {
                break;
            };
            taken += packet.len();
            batch.push(packet);
        }
        drop(outbox);
        let mut coalescer = lock(&self.shared.coalescer);
        let offload = session.offload();
        // smoltcp computed the checksums: the coalescer may merge them.
        let valid = VnetHdr {
            flags: VnetHdr::F_DATA_VALID,
            ..VnetHdr::NONE
        };
        let mut send = |hdr: &VnetHdr, packet: &[u8]| session.send_offload_packet(hdr, packet);
        for packet in batch {
            if offload {
                coalescer.push(&valid, &packet, &mut send);
            } else {
                send(&VnetHdr::NONE, &packet);
            }
        }
        coalescer.flush(&mut send);
        drop(coalescer);
        // Room in the queue: the sockets may send more.
        self.poke();
    }

    async fn address(&self) -> Result<Ipv4Addr, ConnectError> {
        let mut rx = self.shared.address.subscribe();
        let found = tokio::time::timeout(ADDRESS_WAIT, rx.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|addr| *addr));
        found.ok_or(ConnectError::NoTunnel)
    }

    /// Opens a TCP connection to `dst` through the tunnel.
    pub async fn connect(&self, dst: SocketAddrV4) -> Result<TcpConn, ConnectError> {
        self.address().await?;
        let handle = {
            let mut state = self.lock();
            let port = state.take_port(self.shared.ports)?;
            let mut socket = state.spare.pop().unwrap_or_else(|| {
                tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; TCP_RX_BUFFER]),
                    tcp::SocketBuffer::new(vec![0; TCP_TX_BUFFER]),
                )
            });
            // A spare's settings are its last connection's (connecting
            // resets its state and empties its buffers, nothing else).
            socket.set_timeout(None);
            // A proxy relays what it is given as it comes: the
            // application did its own batching.
            socket.set_nagle_enabled(false);
            // Without congestion control smoltcp sends the whole window
            // the remote offers: fine over TLS over TCP (lossless), but
            // HTTP/3 datagrams are lost when the path or a buffer is
            // full, and then every round trip loses again (an upload
            // over HTTP/3 crawled at 0.01 Gbit/s). Cubic, like the kernel.
            socket.set_congestion_control(tcp::CongestionControl::Cubic);
            let State { iface, sockets, .. } = &mut *state;
            let iface = iface.as_mut().ok_or(ConnectError::NoTunnel)?;
            if socket.connect(iface.context(), dst, port).is_err() {
                state.used.remove(&port);
                return Err(ConnectError::Unaddressable);
            }
            sockets.add(socket)
        };
        self.poke();
        let conn = TcpConn {
            stack: self.clone(),
            handle,
        };
        let opened = poll_fn(|cx| conn.poll_established(cx));
        match tokio::time::timeout(CONNECT_TIMEOUT, opened).await {
            Ok(Ok(())) => Ok(conn),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                conn.abort();
                Err(ConnectError::TimedOut)
            }
        }
    }

    /// A UDP socket on the tunnel's address.
    pub async fn udp(&self) -> Result<UdpConn, ConnectError> {
        self.address().await?;
        let handle = {
            let mut state = self.lock();
            let port = state.take_port(self.shared.ports)?;
            let buffer = || {
                udp::PacketBuffer::new(
                    vec![udp::PacketMetadata::EMPTY; UDP_PACKETS],
                    vec![0; UDP_BYTES],
                )
            };
            let mut socket = udp::Socket::new(buffer(), buffer());
            socket.bind(port).map_err(|_| ConnectError::Unaddressable)?;
            state.sockets.add(socket)
        };
        Ok(UdpConn {
            stack: self.clone(),
            handle,
        })
    }

    /// A TCP socket whose owner is gone: freed once closed.
    fn release(&self, handle: SocketHandle) {
        let mut state = self.lock();
        state.orphans.push(handle);
        drop(state);
        self.poke();
    }
}

impl State {
    /// One round: timers, every received packet, everything to send.
    /// Returns when to come back.
    fn poll(&mut self) -> Option<Duration> {
        let State {
            iface,
            device,
            sockets,
            ..
        } = self;
        let iface = iface.as_mut()?;
        let now = Instant::now();
        iface.poll(now, device, sockets);
        self.reap();
        let iface = self.iface.as_mut()?;
        iface
            .poll_delay(Instant::now(), &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
    }

    /// Frees the TCP sockets of gone owners once they are closed.
    fn reap(&mut self) {
        let mut i = 0;
        while i < self.orphans.len() {
            let handle = self.orphans[i];
            let socket = self.sockets.get::<tcp::Socket>(handle);
            if matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait) {
                self.orphans.swap_remove(i);
                self.remove(handle);
            } else {
                i += 1;
            }
        }
    }

    /// Removes a socket and frees its port; a TCP socket is kept as a
    /// spare.
    fn remove(&mut self, handle: SocketHandle) {
        let port = match self.sockets.remove(handle) {
            smoltcp::socket::Socket::Tcp(mut s) => {
                let port = s.local_endpoint().map(|e| e.port);
                if self.spare.len() < SPARE_SOCKETS {
                    // Closed (from time-wait, say): nothing more to send.
                    s.abort();
                    self.spare.push(s);
                }
                port
            }
            smoltcp::socket::Socket::Udp(s) => s.endpoint().port.into(),
            _ => None,
        };
        if let Some(port) = port {
            self.used.remove(&port);
        }
        self.failed.retain(|(h, _)| *h != handle);
    }

    fn take_port(&mut self, ports: Ports) -> Result<u16, ConnectError> {
        let span = usize::from(ports.last - ports.first) + 1;
        for _ in 0..span {
            let port = self.next_port;
            self.next_port = if port == ports.last {
                ports.first
            } else {
                port + 1
            };
            if self.used.insert(port) {
                return Ok(port);
            }
        }
        Err(ConnectError::NoPort)
    }

    /// An ICMP error about one of our openings ends it at once, with the
    /// reason, rather than after the connect timeout.
    fn icmp_error(&mut self, (port, dst, error): (u16, SocketAddrV4, ConnectError)) {
        let found = self.sockets.iter_mut().find_map(|(h, s)| match s {
            smoltcp::socket::Socket::Tcp(s)
                if s.state() == tcp::State::SynSent
                    && s.local_endpoint().map(|e| e.port) == Some(port)
                    && s.remote_endpoint() == Some(IpEndpoint::from(dst)) =>
            {
                s.abort();
                Some(h)
            }
            _ => None,
        });
        if let Some(handle) = found {
            self.failed.push((handle, error));
        }
    }

    fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }
}

/// A panic while holding a lock leaves what it guards as it was between
/// two calls (smoltcp's state, a queue): still consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn random_seed() -> u64 {
    let mut seed = [0u8; 8];
    // Sequence numbers and DNS ids start from it: unpredictable is best,
    // the time will do if the kernel has no randomness for us.
    // SAFETY: getrandom writes at most `len` bytes into the buffer.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    if n != 8 {
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
    }
    u64::from_ne_bytes(seed)
}

/// The local port a packet from the gateway is for: the destination port
/// of TCP and UDP, the quoted source port of an ICMP error. (Read
/// directly: an offload super-packet's length fields are not a plain
/// packet's.)
fn local_port(packet: &[u8]) -> Option<u16> {
    if packet.first()? >> 4 != 4 {
        return None;
    }
    let l4 = packet.get(usize::from(packet[0] & 0x0f) * 4..)?;
    match *packet.get(IP_PROTO)? {
        PROTO_TCP | PROTO_UDP if l4.len() >= 4 => Some(be16(l4, 2)),
        PROTO_ICMP => quoted(l4).map(|(port, _, _)| port),
        _ => None,
    }
}

/// What an ICMP error quotes: our source port, the destination, and the
/// protocol (for destination unreachable and time exceeded).
fn quoted(icmp: &[u8]) -> Option<(u16, SocketAddrV4, u8)> {
    if !matches!(icmp.first()?, 3 | 11) {
        return None;
    }
    let inner = icmp.get(8..)?;
    let ihl = usize::from(inner.first()? & 0x0f) * 4;
    let l4 = inner.get(ihl..ihl + 4)?;
    let dst = Ipv4Addr::new(
        *inner.get(16)?,
        *inner.get(17)?,
        *inner.get(18)?,
        *inner.get(19)?,
    );
    Some((be16(l4, 0), SocketAddrV4::new(dst, be16(l4, 2)), inner[9]))
}

const PROTO_ICMP: u8 = 1;

/// An ICMP destination unreachable about a TCP connection of ours: the
/// port it came from, where it went, and what to report.
fn unreachable_port(packet: &[u8]) -> Option<(u16, SocketAddrV4, ConnectError)> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    if *packet.get(IP_PROTO)? != PROTO_ICMP {
        return None;
    }
    let icmp = packet.get(ihl..)?;
    let (port, dst, proto) = quoted(icmp)?;
    if icmp[0] != 3 || proto != PROTO_TCP {
        return None;
    }
    let error = match icmp[1] {
        // Port unreachable is what a closed port says for UDP; for TCP a
        // firewall may send it instead of a reset.
        3 => ConnectError::Refused,
        9 | 10 | 13 => ConnectError::NotAllowed,
        _ => ConnectError::Unreachable,
    };
    Some((port, dst, error))
}

/// The stack's device: packets in from the tunnel, packets out to it
/// (moved to and from the mailboxes around each poll).
#[derive(Default)]
struct Queues {
    rx: VecDeque<Received>,
    tx: VecDeque<Vec<u8>>,
    /// How many more packets the outbox takes.
    room: usize,
    mtu: usize,
}

impl phy::Device for Queues {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((RxToken(packet), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        (self.tx.len() < self.room).then_some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // What arrives came through the authenticated tunnel: verifying
        // checksums again would only cost time (and offload packets
        // carry partial ones). What leaves is checksummed.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        checksum.udp = Checksum::Tx;
        checksum.icmpv4 = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}

/// A packet from the tunnel, the IP packet from `start` on.
struct Received {
    packet: Vec<u8>,
    start: usize,
}

struct RxToken(Received);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0.packet[self.0.start..])
    }
}

struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0; len];
        let r = f(&mut packet);
        self.0.push_back(packet);
        r
    }
}

/// A TCP connection through the tunnel. Dropping it closes it gracefully
/// (its data still goes out); [`TcpConn::abort`] resets it.
pub struct TcpConn {
    stack: Netstack,
    handle: SocketHandle,
}

impl TcpConn {
    fn poll_established(&self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        let mut state = self.stack.lock();
        if let Some((_, e)) = state.failed.iter().find(|(h, _)| *h == self.handle) {
            return Poll::Ready(Err(e.clone()));
        }
        let socket = state.tcp(self.handle);
        match socket.state() {
            tcp::State::SynSent | tcp::State::SynReceived => {
                socket.register_send_waker(cx.waker());
                socket.register_recv_waker(cx.waker());
                Poll::Pending
            }
            // A reset answered the SYN.
            tcp::State::Closed => Poll::Ready(Err(ConnectError::Refused)),
            _ => Poll::Ready(Ok(())),
        }
    }

    /// The address the connection leaves from (the tunnel's) and port.
    pub fn local(&self) -> Option<SocketAddrV4> {
        let mut state = self.stack.lock();
        match state.tcp(self.handle).local_endpoint()? {
            IpEndpoint {
                addr: IpAddress::Ipv4(a),
                port,
            } => Some(SocketAddrV4::new(a, port)),
        }
    }

    /// Writes what the connection received straight from its receive
    /// buffer into `local`, with no buffer of ours between them: the
    /// bytes written, `0` once the peer's FIN came after all its data.
    pub fn poll_recv_into(
        &self,
        cx: &mut Context<'_>,
        local: &TcpStream,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(local.poll_write_ready(cx))?;
            let mut state = self.stack.lock();
            let socket = state.tcp(self.handle);
            let written = socket.recv(|data| {
                if data.is_empty() {
                    return (0, Ok(0));
                }
                taken(local.try_write(&data[..data.len().min(LOCKED_IO)]))
            });
            match written {
                Ok(Ok(0)) => {
                    socket.register_recv_waker(cx.waker());
                    return Poll::Pending;
                }
                Ok(Ok(n)) => {
                    drop(state);
                    // The window opened: the peer may be waiting to hear it.
                    self.stack.poke();
                    return Poll::Ready(Ok(n));
                }
                // `local` was not writable after all (its readiness is
                // cleared): wait for it again.
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(tcp::RecvError::Finished) => return Poll::Ready(Ok(0)),
                Err(_) => return Poll::Ready(Err(reset())),
            }
        }
    }

    /// Reads from `local` straight into the connection's send buffer: the
    /// bytes taken, `0` at `local`'s end of stream.
    pub fn poll_send_from(
        &self,
        cx: &mut Context<'_>,
        local: &TcpStream,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(local.poll_read_ready(cx))?;
            let mut state = self.stack.lock();
            let socket = state.tcp(self.handle);
            if !socket.may_send() {
                return Poll::Ready(Err(closed_for_writing()));
            }
            if socket.send_queue() == socket.send_capacity() {
                socket.register_send_waker(cx.waker());
                return Poll::Pending;
            }
            // Not full: the free space offered is not empty.
            let read = socket.send(|room| {
                let len = room.len().min(LOCKED_IO);
                taken(local.try_read(&mut room[..len]))
            });
            match read {
                Ok(Ok(n)) => {
                    drop(state);
                    if n > 0 {
                        self.stack.poke();
                    }
                    return Poll::Ready(Ok(n));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_) => return Poll::Ready(Err(reset())),
            }
        }
    }

    /// Half-close: a FIN after the data, reading goes on.
    pub fn shutdown(&self) {
        self.stack.lock().tcp(self.handle).close();
        self.stack.poke();
    }

    /// Ends the connection with a reset.
    pub fn abort(&self) {
        self.stack.lock().tcp(self.handle).abort();
        self.stack.poke();
    }
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        {
            let mut state = self.stack.lock();
            let socket = state.tcp(self.handle);
            socket.close();
            // A peer that never finishes closing does not keep it.
            socket.set_timeout(Some(smoltcp::time::Duration::from_secs(LINGER.as_secs())));
        }
        self.stack.release(self.handle);
    }
}

/// What a system call on the local socket moved, as smoltcp's buffer
/// closures return it: the bytes the buffer gave or took, and the result.
fn taken(moved: io::Result<usize>) -> (usize, io::Result<usize>) {
    match moved {
        Ok(n) => (n, Ok(n)),
        Err(e) => (0, Err(e)),
    }
}

fn closed_for_writing() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the connection is closed for writing",
    )
}

fn reset() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "the connection was reset")
}

/// A UDP socket through the tunnel.
pub struct UdpConn {
    stack: Netstack,
    handle: SocketHandle,
}

impl UdpConn {
    /// Queues a datagram to `dst` (dropped if the socket's buffer is full,
    /// as UDP may).
    pub fn send_to(&self, data: &[u8], dst: SocketAddrV4) {
        let mut state = self.stack.lock();
        let socket = state.sockets.get_mut::<udp::Socket>(self.handle);
        let _ = socket.send_slice(data, IpEndpoint::from(dst));
        drop(state);
        self.stack.poke();
    }

    /// The next datagram: its length in `buf` (truncated to fit) and
    /// where it came from.
    pub async fn recv_from(&self, buf: &mut [u8]) -> (usize, SocketAddrV4) {
        poll_fn(|cx| {
            let mut state = self.stack.lock();
            let socket = state.sockets.get_mut::<udp::Socket>(self.handle);
            match socket.recv() {
                Ok((data, meta)) => {
                    let n = data.len().min(buf.len());
                    buf[..n].copy_from_slice(&data[..n]);
                    let IpAddress::Ipv4(addr) = meta.endpoint.addr;
                    Poll::Ready((n, SocketAddrV4::new(addr, meta.endpoint.port)))
                }
                Err(_) => {
                    socket.register_recv_waker(cx.waker());
                    Poll::Pending
                }
            }
        })
        .await
    }
}

impl Drop for UdpConn {
    fn drop(&mut self) {
        // Nothing to finish: gone at once.
        self.stack.lock().remove(self.handle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        p.extend_from_slice(l4);
        let len = p.len() as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p
    }

    #[test]
    fn packets_are_told_apart_by_their_local_port() {
        let tcp = ipv4(6, &[0, 80, 0xee, 0x48, 0, 0, 0, 0]);
        assert_eq!(local_port(&tcp), Some(61000));
        let udp = ipv4(17, &[0, 53, 0x80, 0x00, 0, 8, 0, 0]);
        assert_eq!(local_port(&udp), Some(32768));
        assert!(Ports::BESIDE_KERNEL.contains(61000));
        assert!(!Ports::BESIDE_KERNEL.contains(32768));
        assert_eq!(local_port(&[0x45]), None);
    }

    #[test]
    fn an_icmp_error_names_the_opening_it_ends() {
        // Our SYN from port 61001 to 198.18.0.2:80, quoted.
        let mut quoted_syn = vec![
            0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 2, 198, 18, 0, 2,
        ];
        quoted_syn.extend_from_slice(&[0xee, 0x49, 0, 80, 0, 0, 0, 0]);
        let mut icmp = vec![3, 13, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&quoted_syn);
        let packet = ipv4(1, &icmp);
        assert_eq!(local_port(&packet), Some(61001));
        assert_eq!(
            unreachable_port(&packet),
            Some((
                61001,
                "198.18.0.2:80".parse().unwrap(),
                ConnectError::NotAllowed
            ))
        );
        icmp[1] = 1;
        let packet = ipv4(1, &icmp);
        assert_eq!(
            unreachable_port(&packet).unwrap().2,
            ConnectError::Unreachable
        );
        // Truncated quotes are ignored, not read past.
        let packet = ipv4(1, &icmp[..12]);
        assert_eq!(unreachable_port(&packet), None);
    }
}
