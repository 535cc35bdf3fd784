//! `--socks ADDR`: a SOCKS5 server (RFC 1928) whose connections and
//! datagrams go through the tunnel on the user-space stack
//! ([`crate::netstack`]): CONNECT and UDP ASSOCIATE, IPv4 destinations
//! and host names, which are resolved through the tunnel
//! ([`crate::resolve`]), never by the local network's resolver.
//!
//! Username/password authentication (RFC 1929) is offered when
//! `--socks-users` is given, and then required of everyone; a listener
//! beyond loopback without it is refused at start: anyone who can reach
//! it could otherwise use the tunnel.
//!
//! Every byte a SOCKS client sends is bounded by the protocol (lengths
//! are single bytes) and the handshake has a deadline.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};
use tracing::{debug, info, warn};

use crate::{
    netstack::{ConnectError, Netstack},
    relay, resolve,
};

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0x00;
const USER_PASSWORD: u8 = 0x02;
const NO_ACCEPTABLE: u8 = 0xff;
const CONNECT: u8 = 1;
const UDP_ASSOCIATE: u8 = 3;
const ATYP_IPV4: u8 = 1;
const ATYP_NAME: u8 = 3;
const ATYP_IPV6: u8 = 4;
/// How long a client may take from connecting to its request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// RFC 1928 §6 reply codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    NetworkUnreachable = 3,
    HostUnreachable = 4,
    Refused = 5,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

impl From<&ConnectError> for Reply {
    fn from(e: &ConnectError) -> Reply {
        match e {
            ConnectError::Refused => Reply::Refused,
            ConnectError::NotAllowed => Reply::NotAllowed,
            ConnectError::Unreachable | ConnectError::Unaddressable | ConnectError::TimedOut => {
                Reply::HostUnreachable
            }
            ConnectError::NoTunnel => Reply::NetworkUnreachable,
            ConnectError::NoPort => Reply::GeneralFailure,
        }
    }
}

/// Where a request or datagram goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Ip(SocketAddrV4),
    Name(String, u16),
    /// The tunnel carries IPv4 only.
    Ipv6,
}

/// The accounts `--socks-users` lists, one `user:password` per line.
pub struct Users(Vec<(Vec<u8>, Vec<u8>)>);

impl Users {
    pub fn load(path: &Path) -> Result<Users> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the SOCKS accounts {}", path.display()))?;
        Users::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    fn parse(text: &str) -> Result<Users> {
        let mut users = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, password)) = line.split_once(':') else {
                bail!("line {}: expected user:password", n + 1);
            };
            // RFC 1929 carries each in at most 255 bytes.
            if user.is_empty() || user.len() > 255 || password.is_empty() || password.len() > 255 {
                bail!("line {}: user and password must be 1 to 255 bytes", n + 1);
            }
            users.push((user.as_bytes().to_vec(), password.as_bytes().to_vec()));
        }
        if users.is_empty() {
            bail!("no account listed");
        }
        Ok(Users(users))
    }

    fn admits(&self, user: &[u8], password: &[u8]) -> bool {
        // Every account is compared in full, so the time taken says
        // nothing about how close a guess came.
        self.0.iter().fold(false, |found, (u, p)| {
            found | (constant_time_eq(u, user) & constant_time_eq(p, password))
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuses a listener beyond loopback that would let anyone in.
pub fn check_exposure(addr: SocketAddr, users: Option<&Users>) -> Result<()> {
    if !addr.ip().is_loopback() && users.is_none() {
        bail!(
            "--socks {addr} listens beyond loopback: anyone reaching it would use the tunnel; \
             give --socks-users FILE (user:password lines) or listen on 127.0.0.1"
        );
    }
    Ok(())
}

/// Accepts SOCKS clients until the task is dropped.
pub async fn serve(listener: TcpListener, stack: Netstack, users: Option<Arc<Users>>) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: the listener stays.
                warn!("SOCKS accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (stack, users) = (stack.clone(), users.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(client, stack, users.as_deref()).await {
                debug!("SOCKS client: {e:#}");
            }
        });
    }
}

/// What a client asked for, once authenticated.
enum Request {
    Connect(Target),
    Associate,
}

async fn handle(mut client: TcpStream, stack: Netstack, users: Option<&Users>) -> Result<()> {
    let _ = client.set_nodelay(true);
    let request = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut client, users))
        .await
        .context("the SOCKS handshake timed out")??;
    let Some(request) = request else {
        return Ok(());
    };
    match request {
        Request::Connect(target) => connect(client, &stack, target).await,
        Request::Associate => associate(client, &stack).await,
    }
}

/// Method selection, authentication and the request; `None` when the
/// client was answered with a refusal.
async fn handshake(client: &mut TcpStream, users: Option<&Users>) -> Result<Option<Request>> {
    let [version, n] = read_array(client).await?;
    if version != VERSION {
        bail!("SOCKS version {version}");
    }
    let mut methods = vec![0u8; usize::from(n)];
    client.read_exact(&mut methods).await?;
    let wanted = if users.is_some() {
        USER_PASSWORD
    } else {
        NO_AUTH
    };
    if !methods.contains(&wanted) {
        client.write_all(&[VERSION, NO_ACCEPTABLE]).await?;
        return Ok(None);
    }
    client.write_all(&[VERSION, wanted]).await?;
    if let Some(users) = users {
        // RFC 1929: VER 1, ULEN, UNAME, PLEN, PASSWD.
        let [_, ulen] = read_array(client).await?;
        let mut user = vec![0u8; usize::from(ulen)];
        client.read_exact(&mut user).await?;
        let [plen] = read_array(client).await?;
        let mut password = vec![0u8; usize::from(plen)];
        client.read_exact(&mut password).await?;
        if !users.admits(&user, &password) {
            client.write_all(&[1, 1]).await?;
            bail!("wrong SOCKS user or password");
        }
        client.write_all(&[1, 0]).await?;
    }
    let [version, command, _reserved] = read_array(client).await?;
    if version != VERSION {
        bail!("SOCKS version {version} in the request");
    }
    let target = read_target(client).await?;
    match command {
        CONNECT => Ok(Some(Request::Connect(target))),
        UDP_ASSOCIATE => Ok(Some(Request::Associate)),
        _ => {
            reply(client, Reply::CommandNotSupported, None).await?;
            Ok(None)
        }
    }
}

async fn read_array<const N: usize>(client: &mut TcpStream) -> io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    client.read_exact(&mut buf).await?;
    Ok(buf)
}

/// ATYP, DST.ADDR, DST.PORT.
async fn read_target(client: &mut TcpStream) -> Result<Target> {
    let [atyp] = read_array(client).await?;
    let target = match atyp {
        ATYP_IPV4 => {
            let [a, b, c, d, p0, p1] = read_array(client).await?;
            Target::Ip(SocketAddrV4::new(
                Ipv4Addr::new(a, b, c, d),
                u16::from_be_bytes([p0, p1]),
            ))
        }
        ATYP_NAME => {
            let [len] = read_array(client).await?;
            let mut name = vec![0u8; usize::from(len)];
            client.read_exact(&mut name).await?;
            let port: [u8; 2] = read_array(client).await?;
            // A name that is not text is not a host name: the resolver
            // refuses it.
            Target::Name(
                String::from_utf8_lossy(&name).into_owned(),
                u16::from_be_bytes(port),
            )
        }
        ATYP_IPV6 => {
            let _: [u8; 18] = read_array(client).await?;
            Target::Ipv6
        }
        other => {
            reply(client, Reply::AddressTypeNotSupported, None).await?;
            bail!("address type {other}");
        }
    };
    Ok(target)
}

async fn reply(client: &mut TcpStream, code: Reply, bound: Option<SocketAddrV4>) -> io::Result<()> {
    let bound = bound.unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let mut out = vec![VERSION, code as u8, 0, ATYP_IPV4];
    out.extend_from_slice(&bound.ip().octets());
    out.extend_from_slice(&bound.port().to_be_bytes());
    client.write_all(&out).await
}

/// The IPv4 address and port `target` stands for, names resolved through
/// the tunnel; the reply code when there is none.
async fn resolve_target(stack: &Netstack, target: &Target) -> Result<SocketAddrV4, Reply> {
    match target {
        Target::Ip(addr) => Ok(*addr),
        Target::Name(name, port) => match resolve::lookup(stack, name).await {
            Ok(ip) => Ok(SocketAddrV4::new(ip, *port)),
            Err(e) => {
                debug!("resolving a SOCKS destination: {e}");
                Err(match e {
                    resolve::LookupError::Socket(ConnectError::NoTunnel) => {
                        Reply::NetworkUnreachable
                    }
                    _ => Reply::HostUnreachable,
                })
            }
        },
        Target::Ipv6 => Err(Reply::AddressTypeNotSupported),
    }
}

async fn connect(mut client: TcpStream, stack: &Netstack, target: Target) -> Result<()> {
    let dst = match resolve_target(stack, &target).await {
        Ok(dst) => dst,
        Err(code) => {
            reply(&mut client, code, None).await?;
            return Ok(());
        }
    };
    let conn = match stack.connect(dst).await {
        Ok(conn) => conn,
        Err(e) => {
            reply(&mut client, Reply::from(&e), None).await?;
            return Ok(());
        }
    };
    reply(&mut client, Reply::Succeeded, conn.local()).await?;
    if let Err(e) = relay::both_ways(client, conn).await {
        debug!("SOCKS connection: {e}");
    }
    Ok(())
}

/// UDP ASSOCIATE: a UDP relay on the control connection's local address,
/// for as long as the control connection stays open. Only the client's
/// own address may use it.
async fn associate(mut control: TcpStream, stack: &Netstack) -> Result<()> {
    let local = control.local_addr()?;
    let client_ip = control.peer_addr()?.ip();
    let relay = UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await?;
    let tunnel = match stack.udp().await {
        Ok(socket) => socket,
        Err(e) => {
            reply(&mut control, Reply::from(&e), None).await?;
            return Ok(());
        }
    };
    let bound = match relay.local_addr()? {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => bail!("the SOCKS listener must be IPv4"),
    };
    reply(&mut control, Reply::Succeeded, Some(bound)).await?;
    info!("SOCKS UDP association open");

    let mut from_client = vec![0u8; 65536];
    let mut from_tunnel = vec![0u8; 65536];
    let mut peer: Option<SocketAddr> = None;
    let mut control_buf = [0u8; 64];
    loop {
        tokio::select! {
            // The association lives as long as its TCP connection.
            read = control.read(&mut control_buf) => match read {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            },
            received = relay.recv_from(&mut from_client) => {
                let (n, from) = received?;
                if from.ip() != client_ip || peer.is_some_and(|p| p != from) {
                    continue;
                }
                peer = Some(from);
                let Some((target, payload)) = parse_datagram(&from_client[..n]) else {
                    continue;
                };
                let Ok(dst) = resolve_target(stack, &target).await else {
                    continue;
                };
                tunnel.send_to(payload, dst);
            }
            (n, from) = tunnel.recv_from(&mut from_tunnel) => {
                let Some(peer) = peer else { continue };
                let datagram = datagram_header(from, &from_tunnel[..n]);
                let _ = relay.send_to(&datagram, peer).await;
            }
        }
    }
}

/// A client's UDP datagram (RFC 1928 §7): where it goes and its payload;
/// `None` for fragments (not supported: dropped, as the RFC allows) and
/// malformed ones.
pub fn parse_datagram(bytes: &[u8]) -> Option<(Target, &[u8])> {
    let (&[0, 0, frag, atyp], rest) = bytes.split_first_chunk::<4>()? else {
        return None;
    };
    if frag != 0 {
        return None;
    }
    let (target, rest) = match atyp {
        ATYP_IPV4 => {
            let (a, rest) = rest.split_first_chunk::<6>()?;
            let addr = SocketAddrV4::new(
                Ipv4Addr::new(a[0], a[1], a[2], a[3]),
                u16::from_be_bytes([a[4], a[5]]),
            );
            (Target::Ip(addr), rest)
        }
        ATYP_NAME => {
            let (&len, rest) = rest.split_first()?;
            let name = rest.get(..usize::from(len))?;
            let port = rest.get(usize::from(len)..usize::from(len) + 2)?;
            let name = std::str::from_utf8(name).ok()?.to_owned();
            (
                Target::Name(name, u16::from_be_bytes([port[0], port[1]])),
                &rest[usize::from(len) + 2..],
            )
        }
        _ => return None,
    };
    Some((target, rest))
}

/// The header a datagram from `from` gets on its way back to the client.
pub fn datagram_header(from: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + payload.len());
    out.extend_from_slice(&[0, 0, 0, ATYP_IPV4]);
    out.extend_from_slice(&from.ip().octets());
    out.extend_from_slice(&from.port().to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The address a listener flag names, IPv4 (the tunnel's family).
pub fn listen_addr(addr: SocketAddr) -> Result<SocketAddr> {
    match addr.ip() {
        IpAddr::V4(_) => Ok(addr),
        IpAddr::V6(_) => bail!("{addr}: listen on an IPv4 address"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_parse_and_junk_is_dropped() {
        let d = [0, 0, 0, 1, 198, 18, 0, 2, 0, 53, b'h', b'i'];
        assert_eq!(
            parse_datagram(&d),
            Some((Target::Ip("198.18.0.2:53".parse().unwrap()), &b"hi"[..]))
        );
        let n = [0, 0, 0, 3, 3, b'a', b'.', b'b', 0, 53, b'x'];
        assert_eq!(
            parse_datagram(&n),
            Some((Target::Name("a.b".into(), 53), &b"x"[..]))
        );
        // A fragment, an unknown type, every truncation.
        assert_eq!(parse_datagram(&[0, 0, 1, 1, 1, 2, 3, 4, 0, 1]), None);
        assert_eq!(parse_datagram(&[0, 0, 0, 9, 1, 2, 3, 4, 0, 1]), None);
        for cut in 0..n.len() - 1 {
            assert_eq!(parse_datagram(&n[..cut]), None, "cut at {cut}");
        }
        assert_eq!(
            datagram_header("198.18.0.2:53".parse().unwrap(), b"hi"),
            d.to_vec()
        );
    }

    #[test]
    fn accounts_parse_and_compare() {
        let users = Users::parse("# comment\nalice:s3cret\nbob:x:y\n").unwrap();
        assert!(users.admits(b"alice", b"s3cret"));
        assert!(users.admits(b"bob", b"x:y"));
        assert!(!users.admits(b"alice", b"s3cre"));
        assert!(!users.admits(b"", b""));
        assert!(Users::parse("").is_err());
        assert!(Users::parse("nocolon\n").is_err());
    }

    #[test]
    fn a_listener_beyond_loopback_needs_accounts() {
        let users = Users::parse("a:b").unwrap();
        assert!(check_exposure("127.0.0.1:1080".parse().unwrap(), None).is_ok());
        assert!(check_exposure("0.0.0.0:1080".parse().unwrap(), None).is_err());
        assert!(check_exposure("10.0.0.1:1080".parse().unwrap(), Some(&users)).is_ok());
    }
}
