//! veil's tunnel protocol: CONNECT-IP (RFC 9484) over HTTP/1.1, with the
//! Capsule Protocol (RFC 9297), spoken inside a TLS stream.
//!
//! This crate is pure logic: it is fed bytes and time and produces bytes,
//! packets and decisions. TLS, sockets, the TUN device and timers live with
//! the callers, so everything here is tested in memory on virtual time.
//!
//! - [`varint`]: QUIC variable-length integers.
//! - [`capsule`]: capsule types, encoding, and an incremental decoder.
//! - [`gso`]: the offload header of offload datagrams, and segmentation in
//!   software for a peer without them.
//! - [`http`]: the HTTP/1.1 upgrade handshake.
//! - [`session`]: the client and gateway state machines.
//! - [`ProtoError`]: everything that can be wrong on the wire.
//!
//! # The first bytes of a session
//!
//! Client and gateway `gateway.example` handing out `10.77.0.2`, with the
//! default configuration. `\r\n` ends every HTTP line.
//!
//! ```text
//! client → gateway: the upgrade request
//!   GET /.well-known/masque/ip/*/*/ HTTP/1.1
//!   Host: gateway.example
//!   Connection: Upgrade
//!   Upgrade: connect-ip
//!   Capsule-Protocol: ?1
//!   Veil-Keepalive: 15
//!   (empty line)
//!
//! gateway → client: the 101, then two capsules in the same write
//!   HTTP/1.1 101 Switching Protocols
//!   Connection: Upgrade
//!   Upgrade: connect-ip
//!   Capsule-Protocol: ?1
//!   (empty line)
//!   01 07 00 04 0a 4d 00 02 20              ADDRESS_ASSIGN, length 7: request ID 0,
//!                                           IPv4, 10.77.0.2, prefix 32
//!   03 0a 04 00 00 00 00 ff ff ff ff 00     ROUTE_ADVERTISEMENT, length 10: IPv4,
//!                                           0.0.0.0 to 255.255.255.255, protocol 0 (all)
//!
//! client → gateway, on the 101
//!   02 07 01 04 00 00 00 00 20              ADDRESS_REQUEST, length 7: request ID 1,
//!                                           IPv4, 0.0.0.0 (any address), prefix 32
//! gateway → client
//!   01 07 01 04 0a 4d 00 02 20              ADDRESS_ASSIGN: request ID 1, 10.77.0.2/32
//!
//! either way, per IP packet
//!   00 LL.. 00 <packet>                     DATAGRAM, length 1 + packet length (varint),
//!                                           context ID 0, the packet
//!
//! client → gateway, every 15 s; gateway → client, the answer
//!   c0 00 00 56 45 49 4c 00 08 <8-byte nonce>   VEIL_PING (type 0x5645494c00, "VEIL\0")
//!   c0 00 00 56 45 49 4c 01 08 <same nonce>     VEIL_PONG (type 0x5645494c01)
//! ```
//!
//! The same exchange, checked:
//!
//! ```
//! use std::{net::Ipv4Addr, time::Instant};
//! use veil_proto::session::{ClientConfig, ClientSession, Output, ServerConfig, ServerSession};
//!
//! let now = Instant::now();
//! let vip = Ipv4Addr::new(10, 77, 0, 2);
//! let mut client = ClientSession::new(ClientConfig::new("gateway.example"), now)?;
//! let mut server = ServerSession::new(ServerConfig::new(vip), now)?;
//!
//! let Some(Output::Send(request)) = client.poll_output() else { panic!() };
//! assert_eq!(
//!     request,
//!     b"GET /.well-known/masque/ip/*/*/ HTTP/1.1\r\n\
//!       Host: gateway.example\r\n\
//!       Connection: Upgrade\r\n\
//!       Upgrade: connect-ip\r\n\
//!       Capsule-Protocol: ?1\r\n\
//!       Veil-Keepalive: 15\r\n\
//!       \r\n"
//! );
//!
//! server.receive(&request, now)?;
//! let Some(Output::Send(response)) = server.poll_output() else { panic!() };
//! assert_eq!(
//!     response,
//!     b"HTTP/1.1 101 Switching Protocols\r\n\
//!       Connection: Upgrade\r\n\
//!       Upgrade: connect-ip\r\n\
//!       Capsule-Protocol: ?1\r\n\
//!       \r\n\
//!       \x01\x07\x00\x04\x0a\x4d\x00\x02\x20\
//!       \x03\x0a\x04\x00\x00\x00\x00\xff\xff\xff\xff\x00"
//! );
//!
//! client.receive(&response, now)?;
//! let Some(Output::Send(address_request)) = client.poll_output() else { panic!() };
//! assert_eq!(address_request, b"\x02\x07\x01\x04\x00\x00\x00\x00\x20");
//! assert_eq!(client.poll_output(), Some(Output::Assigned { addr: vip, prefix: 32 }));
//! assert!(matches!(client.poll_output(), Some(Output::Routes(_))));
//!
//! server.receive(&address_request, now)?;
//! let Some(Output::Send(answer)) = server.poll_output() else { panic!() };
//! assert_eq!(answer, b"\x01\x07\x01\x04\x0a\x4d\x00\x02\x20");
//! # Ok::<(), veil_proto::ProtoError>(())
//! ```

pub mod capsule;
mod error;
pub mod gro;
pub mod gso;
pub mod h3;
pub mod http;
pub mod ipv4;
pub mod packet;
pub mod packet6;
pub mod session;
pub mod varint;

pub use error::ProtoError;
