//! HTTP/3 lanes: one QUIC endpoint per thread, each on its own UDP socket
//! of one `SO_REUSEPORT` group, so that a connection's packets, its quinn
//! tasks and its session all run on one thread.
//!
//! Why: on one endpoint in a multi-threaded runtime, quinn's chain of tasks
//! per packet (endpoint, connection, session) outgrew tokio's LIFO slot and
//! the two workers handed each ping back and forth six times, a futex wake
//! and a context switch each (docs/performance.md, "Where HTTP/3's idle
//! round trip goes"). A lane is a current-thread runtime: the chain runs
//! to its end where it started.
//!
//! Which lane: the kernel asks a classic BPF program of the group
//! ([`LANE_FILTER`]), which returns the first byte of the packet's
//! destination connection ID modulo the number of lanes. The IDs a lane
//! gives its connections ([`LaneCids`]) all have that byte congruent to the
//! lane's number, so every packet after the client's first flight reaches
//! the lane that holds the connection, also from a client whose address
//! changed (migration), which a hash of addresses would send elsewhere. The
//! client's first flight carries an ID of its own choosing: the lane it
//! picks is the one that accepts the connection.

use std::{
    future::Future,
    hash::{Hash, Hasher},
    io,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::Arc,
    thread::JoinHandle,
    time::Duration,
};

use quinn::ConnectionId;
use quinn::{ConnectionIdGenerator, EndpointConfig, ServerConfig};
use quinn_proto::InvalidCid;
use rand::RngCore;
use thiserror::Error;
use tokio::sync::mpsc;

/// Most lanes: the lane is one byte of the connection ID modulo their count.
pub const MAX_LANES: usize = 256;

/// Why the lanes could not be set up.
#[derive(Debug, Error)]
pub enum LaneError {
    #[error("UDP {addr}: {source}")]
    Socket { addr: SocketAddr, source: io::Error },
    #[error("steering the UDP {addr} group by connection ID (SO_ATTACH_REUSEPORT_CBPF): {source}")]
    Filter { addr: SocketAddr, source: io::Error },
    #[error("starting HTTP/3 lane {lane}: {source}")]
    Start { lane: usize, source: io::Error },
}

/// Connection IDs of one lane: 8 bytes, the first congruent to the lane's
/// number modulo the lane count and otherwise random, two more random, the
/// last five a keyed hash of the first three. The hash lets quinn tell an
/// ID of ours from noise cheaply (no stateless reset for garbage), as its
/// default generator does.
pub struct LaneCids {
    lane: u8,
    lanes: u8,
    key: u64,
}

const CID_LEN: usize = 8;
const NONCE_LEN: usize = 3;

impl LaneCids {
    /// IDs for `lane` of `lanes` (at most [`MAX_LANES`]), signed with `key`
    /// (one key for all lanes of an endpoint group).
    pub fn new(lane: usize, lanes: usize, key: u64) -> Self {
        assert!(lane < lanes && lanes <= MAX_LANES, "lane {lane} of {lanes}");
        // 256 lanes are stored as 0: `x % 256` is the byte itself, which
        // `lane_of` and the filter both treat as "the byte".
        Self {
            lane: lane as u8,
            lanes: lanes as u8,
            key,
        }
    }

    fn signature(&self, nonce: &[u8]) -> [u8; CID_LEN - NONCE_LEN] {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.key.hash(&mut hasher);
        nonce.hash(&mut hasher);
        let sum = hasher.finish().to_le_bytes();
        sum[..CID_LEN - NONCE_LEN].try_into().expect("5 of 8 bytes")
    }
}

/// The lane a connection ID's first byte picks among `lanes` (the
/// filter's arithmetic, for tests and logs).
pub fn lane_of(first: u8, lanes: usize) -> usize {
    usize::from(first) % lanes
}

impl ConnectionIdGenerator for LaneCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut cid = [0u8; CID_LEN];
        rand::rng().fill_bytes(&mut cid[..NONCE_LEN]);
        cid[0] = match self.lanes {
            0 => self.lane, // 256 lanes: the byte is the lane.
            lanes => {
                // A random byte among those congruent to the lane.
                let stride = u16::from(lanes);
                let slots = 256 / stride; // At least 1: lanes <= 255.
                let pick = u16::from(cid[0]) % slots;
                (pick * stride + u16::from(self.lane)) as u8
            }
        };
        let signature = self.signature(&cid[..NONCE_LEN]);
        cid[NONCE_LEN..].copy_from_slice(&signature);
        ConnectionId::new(&cid)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        let ours = cid.len() == CID_LEN
            && self.signature(&cid[..NONCE_LEN])[..] == cid[NONCE_LEN..]
            && match self.lanes {
                0 => cid[0] == self.lane,
                lanes => lane_of(cid[0], lanes.into()) == usize::from(self.lane),
            };
        match ours {
            true => Ok(()),
            false => Err(InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The classic BPF program that picks a lane for a datagram. The kernel
/// runs it with the UDP payload at offset 0 (`reuseport_select_sock`
/// pulls the UDP header) and takes its result as the index of a socket in
/// the group, in the order they were bound:
///
/// - long header (first bit set): the destination ID starts at byte 6,
///   after the flags, the 4-byte version and the ID's length;
/// - short header: it starts at byte 1.
///
/// A datagram too short to read returns 0 (classic BPF's load failure):
/// lane 0, whose quinn drops it.
pub fn lane_filter(lanes: usize) -> [libc::sock_filter; 7] {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    use libc::{
        BPF_A, BPF_ABS, BPF_ALU, BPF_B, BPF_JA, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_MOD, BPF_RET,
    };
    [
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 0),
        op(BPF_JMP | BPF_JSET | BPF_K, 0, 2, 0x80),
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 6),
        op(BPF_JMP | BPF_JA, 0, 0, 1),
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 1),
        op(BPF_ALU | BPF_MOD | BPF_K, 0, 0, lanes as u32),
        op(BPF_RET | BPF_A, 0, 0, 0),
    ]
}

/// `lanes` UDP sockets bound to `addr` in one `SO_REUSEPORT` group, the
/// lane filter attached (socket `i` is lane `i`).
///
/// Only a process of the same user can join the group, and the gateway
/// runs as root: nobody who could not already read its packets.
pub fn bind_group(addr: SocketAddr, lanes: usize) -> Result<Vec<UdpSocket>, LaneError> {
    assert!((1..=MAX_LANES).contains(&lanes), "{lanes} lanes");
    let mut sockets = Vec::with_capacity(lanes);
    let mut at = addr;
    for _ in 0..lanes {
        let socket = veil_tunnel::quic::udp_socket_shared(at)
            .map_err(|source| LaneError::Socket { addr, source })?;
        // Port 0 asks for any port once: the others join the group there.
        at = socket
            .local_addr()
            .map_err(|source| LaneError::Socket { addr, source })?;
        sockets.push(socket);
    }
    attach_filter(&sockets[0], lanes).map_err(|source| LaneError::Filter { addr, source })?;
    Ok(sockets)
}

/// Attaches [`lane_filter`] to the group `socket` is in.
fn attach_filter(socket: &UdpSocket, lanes: usize) -> io::Result<()> {
    let mut program = lane_filter(lanes);
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: a valid socket; the kernel copies the program during the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// The endpoint configuration of lane `lane` of `lanes`: `base` (its
/// stateless-reset key shared by all lanes) with the lane's IDs.
pub fn endpoint_config(
    base: &EndpointConfig,
    lane: usize,
    lanes: usize,
    key: u64,
) -> EndpointConfig {
    let mut config = base.clone();
    config.cid_generator(move || Box::new(LaneCids::new(lane, lanes, key)));
    config
}

/// Running lanes: a thread each, until its `serve` returns.
pub struct Lanes {
    threads: Vec<JoinHandle<()>>,
    ends: mpsc::UnboundedReceiver<(usize, anyhow::Result<()>)>,
}

/// A lane's report of its end, sent also when its thread unwinds.
struct Report {
    lane: usize,
    to: mpsc::UnboundedSender<(usize, anyhow::Result<()>)>,
    result: Option<anyhow::Result<()>>,
}

impl Report {
    /// Reports `result` as the lane's end.
    fn finish(mut self, result: anyhow::Result<()>) {
        self.result = Some(result);
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        let lane = self.lane;
        let result = self
            .result
            .take()
            .unwrap_or_else(|| Err(anyhow::anyhow!("its thread panicked")));
        let _ = self.to.send((lane, result));
    }
}

impl Lanes {
    /// Starts a thread per socket, each with a current-thread runtime and
    /// a quinn endpoint on its socket, and runs `serve(lane, endpoint)` on
    /// it. The endpoints are made before this returns, so an error in
    /// making one is the caller's.
    pub fn start<F, Fut>(
        sockets: Vec<UdpSocket>,
        base: &EndpointConfig,
        server: &ServerConfig,
        serve: F,
    ) -> Result<Self, LaneError>
    where
        F: Fn(usize, quinn::Endpoint) -> Fut + Send + Clone + 'static,
        Fut: Future<Output = anyhow::Result<()>> + 'static,
    {
        let lanes = sockets.len();
        let key: u64 = rand::random();
        let (to, ends) = mpsc::unbounded_channel();
        let mut started = Self {
            threads: Vec::with_capacity(lanes),
            ends,
        };
        for (lane, socket) in sockets.into_iter().enumerate() {
            let config = endpoint_config(base, lane, lanes, key);
            let (server, serve) = (server.clone(), serve.clone());
            let report = Report {
                lane,
                to: to.clone(),
                result: None,
            };
            let (up_tx, up_rx) = std::sync::mpsc::sync_channel(1);
            let run = move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                let runtime = match runtime {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = up_tx.send(Err(e));
                        return report.finish(Ok(()));
                    }
                };
                let result = runtime.block_on(async move {
                    // Made inside the runtime: its socket and driver are
                    // this thread's.
                    let made = quinn::Endpoint::new(
                        config,
                        Some(server),
                        socket,
                        Arc::new(quinn::TokioRuntime),
                    );
                    match made {
                        Ok(endpoint) => {
                            let _ = up_tx.send(Ok(()));
                            serve(lane, endpoint).await
                        }
                        Err(e) => {
                            let _ = up_tx.send(Err(e));
                            Ok(())
                        }
                    }
                });
                report.finish(result);
            };
            let thread = std::thread::Builder::new()
                .name(format!("veil-h3-{lane}"))
                .spawn(run)
                .map_err(|source| LaneError::Start { lane, source })?;
            started.threads.push(thread);
            let up = up_rx.recv().unwrap_or_else(|_| {
                Err(io::Error::other("the lane's thread ended while starting"))
            });
            up.map_err(|source| LaneError::Start { lane, source })?;
        }
        Ok(started)
    }

    /// How many lanes run.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// Whether no lane runs (never, once started).
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// Waits for the first lane to end and says how: what its `serve`
    /// returned, or that its thread panicked.
    pub async fn first_end(&mut self) -> anyhow::Result<()> {
        use anyhow::Context;
        match self.ends.recv().await {
            Some((lane, result)) => result.with_context(|| format!("HTTP/3 lane {lane}")),
            None => Ok(()), // No lanes.
        }
    }

    /// Waits (blocking) for every lane's thread to end.
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::*;

    const LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

    #[test]
    fn a_lanes_ids_pick_that_lane_and_only_its_own_validate() {
        for lanes in [1, 2, 3, 7, 255, 256] {
            let key = 0x5eed;
            for lane in [0, lanes / 2, lanes - 1] {
                let mut ids = LaneCids::new(lane, lanes, key);
                let other = LaneCids::new((lane + 1) % lanes, lanes, key);
                for _ in 0..64 {
                    let cid = ids.generate_cid();
                    assert_eq!(cid.len(), ids.cid_len());
                    assert_eq!(lane_of(cid[0], lanes), lane, "{lanes} lanes");
                    assert!(ids.validate(&cid).is_ok());
                    if lanes > 1 {
                        assert!(other.validate(&cid).is_err(), "another lane's ID");
                    }
                    let mut forged = cid.to_vec();
                    forged[7] ^= 1;
                    assert!(ids.validate(&ConnectionId::new(&forged)).is_err());
                }
                // The first byte is random among the lane's: not one value.
                let firsts: std::collections::HashSet<u8> =
                    (0..64).map(|_| ids.generate_cid()[0]).collect();
                assert!(
                    lanes >= 128 || firsts.len() > 1,
                    "{lanes} lanes: {firsts:?}"
                );
            }
        }
    }

    /// A QUIC packet's first bytes with `dcid_first` as the destination
    /// ID's first byte: long header (an Initial) or short.
    fn packet(long: bool, dcid_first: u8) -> Vec<u8> {
        let mut p = match long {
            true => vec![0xc0, 0, 0, 0, 1, 8],
            false => vec![0x40],
        };
        p.push(dcid_first);
        p.extend_from_slice(&[0xaa; 40]);
        p
    }

    #[test]
    fn the_kernel_hands_each_datagram_to_the_lane_its_connection_id_names() {
        let lanes = 3;
        let group = bind_group(LOOPBACK, lanes).expect("binding the group");
        let at = group[0].local_addr().unwrap();
        assert!(group.iter().all(|s| s.local_addr().unwrap() == at));
        for s in &group {
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        }
        let sender = UdpSocket::bind(LOOPBACK).unwrap();
        for first in [0u8, 1, 2, 3, 4, 5, 128, 254, 255] {
            for long in [true, false] {
                let sent = packet(long, first);
                sender.send_to(&sent, at).unwrap();
                let lane = lane_of(first, lanes);
                let mut buf = [0u8; 64];
                let (n, _) = group[lane]
                    .recv_from(&mut buf)
                    .unwrap_or_else(|e| panic!("lane {lane} for {first} (long {long}): {e}"));
                assert_eq!(&buf[..n], &sent[..]);
            }
        }
        // Nothing reached another lane.
        for s in &group {
            s.set_nonblocking(true).unwrap();
            assert!(s.recv_from(&mut [0u8; 64]).is_err());
        }
    }

    fn identity() -> (rustls::ServerConfig, rustls::ClientConfig) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = CertificateDer::from(made.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
        let provider = Arc::new(veil_tunnel::tls::crypto_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (server, client)
    }

    /// Each connection's streams are answered with the lane's number.
    async fn answer_with_lane(lane: usize, endpoint: quinn::Endpoint) -> anyhow::Result<()> {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, _recv)) = conn.accept_bi().await {
                    let _ = send.write_all(&[lane as u8]).await;
                    let _ = send.finish();
                }
            });
        }
        Ok(())
    }

    async fn ask(conn: &quinn::Connection) -> u8 {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"?").await.unwrap();
        let answer = recv.read_to_end(4).await.unwrap();
        answer[0]
    }

    #[tokio::test]
    async fn connections_spread_over_lanes_and_keep_theirs_when_the_client_moves() {
        let (server_tls, client_tls) = identity();
        let server = veil_tunnel::quic::server_config(server_tls).unwrap();
        let group = bind_group(LOOPBACK, 2).unwrap();
        let at = group[0].local_addr().unwrap();
        let mut lanes = Lanes::start(group, &EndpointConfig::default(), &server, answer_with_lane)
            .expect("starting the lanes");
        assert_eq!(lanes.len(), 2);

        let mut client = quinn::Endpoint::client(LOOPBACK).unwrap();
        client.set_default_client_config(veil_tunnel::quic::client_config(client_tls).unwrap());
        let mut seen = [0usize; 2];
        let mut conns = Vec::new();
        // 16 connections: all on one lane has odds of 2^-15.
        for _ in 0..16 {
            let conn = client.connect(at, "localhost").unwrap().await.unwrap();
            let lane = ask(&conn).await;
            seen[usize::from(lane)] += 1;
            conns.push((conn, lane));
        }
        assert!(seen.iter().all(|n| *n > 0), "both lanes serve: {seen:?}");
        // The client's address changes (a new socket, a new port): every
        // connection is still answered, by the same lane.
        client.rebind(UdpSocket::bind(LOOPBACK).unwrap()).unwrap();
        for (conn, lane) in &conns {
            assert_eq!(ask(conn).await, *lane, "migrated to another lane");
        }
        assert!(lanes.ends.try_recv().is_err(), "no lane has ended");
    }

    #[tokio::test]
    async fn a_lane_that_panics_is_reported() {
        let (server_tls, _) = identity();
        let server = veil_tunnel::quic::server_config(server_tls).unwrap();
        let group = bind_group(LOOPBACK, 2).unwrap();
        let serve = |lane: usize, _endpoint: quinn::Endpoint| async move {
            match lane {
                1 => panic!("lane 1 fails"),
                _ => std::future::pending().await,
            }
        };
        let mut lanes = Lanes::start(group, &EndpointConfig::default(), &server, serve).unwrap();
        let end = tokio::time::timeout(Duration::from_secs(5), lanes.first_end())
            .await
            .expect("the panic is reported");
        let message = format!("{:#}", end.unwrap_err());
        assert!(
            message.contains("lane 1") && message.contains("panicked"),
            "{message}"
        );
    }
}
