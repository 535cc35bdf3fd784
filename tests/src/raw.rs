//! A CONNECT-IP client under the test's control, for what `veil-client`
//! would never do: forged offload headers, a client that stops reading,
//! connections that never finish their handshake. And a packet capture,
//! to see what actually left a namespace.
//!
//! The client is the real protocol (`veil_proto`'s session over rustls),
//! with a valid profile: an authenticated client is still untrusted.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::{ClientConnection, StreamOwned};
use veil_proto::{
    gso::VnetHdr,
    session::{ClientConfig, ClientSession, Output},
};
use veil_user::{state::Profile, tls};

use crate::netns::NetNs;

pub struct RawClient {
    pub session: ClientSession,
    tls: StreamOwned<ClientConnection, TcpStream>,
    /// Packets the gateway sent, oldest first.
    pub received: Vec<Vec<u8>>,
}

impl RawClient {
    /// Connects from namespace `ns` to the profile's endpoint and completes
    /// the upgrade (announcing offload if `offload`).
    pub fn connect(ns: &NetNs, profile: &Path, offload: bool) -> Self {
        let profile = Profile::load(profile).expect("profile");
        let tcp = ns.enter(|| TcpStream::connect(profile.endpoints[0].as_str()).expect("connect"));
        tcp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let (config, name) = tls::client_config(&profile).expect("TLS config");
        let conn = ClientConnection::new(Arc::new(config), name).expect("TLS client");
        let session = ClientSession::new(
            ClientConfig {
                offload,
                ..ClientConfig::new(profile.endpoints[0].clone())
            },
            Instant::now(),
        )
        .expect("session");
        let mut client = RawClient {
            session,
            tls: StreamOwned::new(conn, tcp),
            received: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.session.assigned().is_none() {
            assert!(Instant::now() < deadline, "no address assigned");
            client.pump(Duration::from_millis(50));
        }
        client
    }

    /// The IPv6 address the gateway assigned, if it carries IPv6.
    pub fn vip6(&self) -> Option<std::net::Ipv6Addr> {
        self.session.assigned6().map(|(addr, _)| addr)
    }

    /// The address the gateway assigned.
    pub fn vip(&self) -> Ipv4Addr {
        self.session.assigned().expect("assigned").0
    }

    /// Sends a plain packet.
    pub fn send(&mut self, packet: &[u8]) {
        self.session.send_packet(packet);
        self.flush();
    }

    /// Sends an offload datagram with whatever header the test chose.
    pub fn send_offload(&mut self, hdr: &VnetHdr, packet: &[u8]) {
        self.session.send_offload_packet(hdr, packet);
        self.flush();
    }

    /// Writes what the session has to say.
    pub fn flush(&mut self) {
        while let Some(output) = self.session.poll_output() {
            match output {
                Output::Send(bytes) => self.write(&bytes),
                Output::Packet(p) => self.received.push(p),
                Output::OffloadPacket(p) => self.received.push(p[10..].to_vec()),
                Output::Close { reason } => panic!("session closed: {reason}"),
                Output::Assigned { .. }
                | Output::Assigned6 { .. }
                | Output::Routes(_)
                | Output::Dns(_)
                | Output::Datagram(_) => {}
            }
        }
    }

    /// Encrypts and writes `bytes` without reading anything (rustls'
    /// `Write` would also read, and the socket has a read timeout).
    fn write(&mut self, bytes: &[u8]) {
        self.tls
            .conn
            .writer()
            .write_all(bytes)
            .expect("TLS plaintext");
        while self.tls.conn.wants_write() {
            match self.tls.conn.write_tls(&mut self.tls.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("writing to the gateway: {e}"),
            }
        }
    }

    /// Reads from the gateway for up to `time`, handling what arrives.
    pub fn pump(&mut self, time: Duration) {
        let end = Instant::now() + time;
        let mut buf = [0u8; 16384];
        while Instant::now() < end {
            self.flush();
            match self.tls.read(&mut buf) {
                Ok(0) => panic!("the gateway closed the connection"),
                Ok(n) => self.session.receive(&buf[..n], Instant::now()).unwrap(),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("reading from the gateway: {e}"),
            }
            self.session.handle_timeout(Instant::now());
        }
        self.flush();
    }

    /// The socket, to hold open without reading.
    pub fn into_socket(self) -> TcpStream {
        self.tls.sock
    }
}

/// Everything IPv4 that arrives on one interface of a namespace, from the
/// moment this is created (an `AF_PACKET` socket: below the firewall and
/// the sockets, so it sees packets no application would accept).
pub struct Capture {
    fd: OwnedFd,
    /// Only what the interface sends, not what it receives.
    outgoing_only: bool,
    /// The ethertype kept (`ETH_P_ALL`: every one).
    ethertype: u16,
}

impl Capture {
    pub fn new(ns: &NetNs, iface: &str) -> Self {
        Self::open(ns, iface, libc::ETH_P_IP as u16, false)
    }

    /// Both directions on `iface`, of one ethertype (`ETH_P_IPV6`...).
    pub fn of(ns: &NetNs, iface: &str, ethertype: u16) -> Self {
        Self::open(ns, iface, ethertype, false)
    }

    /// What leaves through `iface` (after the firewall: what the network
    /// sees), of one ethertype (`ETH_P_IP`, `ETH_P_IPV6`, `ETH_P_ALL`).
    pub fn outgoing(ns: &NetNs, iface: &str, ethertype: u16) -> Self {
        Self::open(ns, iface, ethertype, true)
    }

    fn open(ns: &NetNs, iface: &str, ethertype: u16, outgoing_only: bool) -> Self {
        // The kernel hands outgoing packets to ETH_P_ALL sockets only
        // (dev_queue_xmit_nit): those are filtered here instead.
        let bound = if outgoing_only {
            libc::ETH_P_ALL as u16
        } else {
            ethertype
        };
        let ifindex = ns.enter(|| veil_user::net::ifindex(iface).expect("interface"));
        let fd = ns.enter(|| {
            let proto = bound.to_be();
            // SAFETY: plain socket creation.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(proto)) };
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: a fresh descriptor we own.
            unsafe { OwnedFd::from_raw_fd(fd) }
        });
        // SAFETY: a zeroed sockaddr_ll is valid; the fields set are plain.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = bound.to_be();
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: a valid socket and address of the right size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        Capture {
            fd,
            outgoing_only,
            ethertype,
        }
    }

    /// The IP packets seen so far and over the next `wait`.
    pub fn packets(&self, wait: Duration) -> Vec<Vec<u8>> {
        self.frames(wait).into_iter().map(|(_, p)| p).collect()
    }

    /// [`Self::packets`] with each one's ethertype (IP packets, ARP
    /// messages: what follows the link-layer header).
    pub fn frames(&self, wait: Duration) -> Vec<(u16, Vec<u8>)> {
        let end = Instant::now() + wait;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if !crate::netns::readable(self.fd.as_raw_fd(), left) {
                return out;
            }
            // SAFETY: a zeroed sockaddr_ll is valid.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: a valid socket, buffer and address of the right size.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            let outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
            let ethertype = u16::from_be(from.sll_protocol);
            let wanted = self.ethertype == libc::ETH_P_ALL as u16 || ethertype == self.ethertype;
            if n > 0 && wanted && (outgoing || !self.outgoing_only) {
                out.push((ethertype, buf[..n as usize].to_vec()));
            }
        }
    }
}

/// A blocking TLS client for `name`, trusting `ca` (PEM) only, with no
/// client certificate: a stranger, to the gateway.
pub fn tls_without_certificate<S: Read + Write>(
    name: &str,
    ca: &str,
    io: S,
) -> StreamOwned<ClientConnection, S> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        ClientConnection::new(Arc::new(config), name.to_owned().try_into().unwrap()).unwrap();
    StreamOwned::new(conn, io)
}

/// A raw IPv4 socket (`IPPROTO_RAW`): sends whole IP packets, whatever
/// their source address says, routed by their destination. Made in the
/// namespace it is created in.
pub struct RawIp(OwnedFd);

impl RawIp {
    pub fn new() -> Self {
        // SAFETY: a plain socket call; the fd is owned at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        RawIp(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Sends `ip` (an IPv4 packet, header included) toward `dst`.
    pub fn send(&self, ip: &[u8], dst: Ipv4Addr) {
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: a valid socket, buffer and address.
        let sent = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                ip.as_ptr().cast(),
                ip.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        assert_eq!(
            sent,
            ip.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }
}

impl Default for RawIp {
    fn default() -> Self {
        Self::new()
    }
}
