//! Client and gateway wired back-to-back in memory, on virtual time.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use super::*;
use crate::capsule::{
    encode_ip_datagram, AssignedAddress, Capsule, DnsConfiguration, IpAddressRange,
    RequestedAddress,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const HOST: &str = "gateway.example";
const INTERVAL: Duration = Duration::from_secs(15);
const SECOND: Duration = Duration::from_secs(1);

/// The client's first frame: the upgrade request.
const CLIENT_FIRST_FRAME: &[u8] = b"GET /.well-known/masque/ip/*/*/ HTTP/1.1\r\n\
Host: gateway.example\r\n\
Connection: Upgrade\r\n\
Upgrade: connect-ip\r\n\
Capsule-Protocol: ?1\r\n\
Veil-Keepalive: 15\r\n\
\r\n";

/// The gateway's first frame: the 101, then ADDRESS_ASSIGN (10.77.0.2/32,
/// Request ID 0), then ROUTE_ADVERTISEMENT (0.0.0.0-255.255.255.255, all
/// protocols).
const SERVER_FIRST_FRAME: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\n\
Connection: Upgrade\r\n\
Upgrade: connect-ip\r\n\
Capsule-Protocol: ?1\r\n\
\r\n\
\x01\x07\x00\x04\x0a\x4d\x00\x02\x20\
\x03\x0a\x04\x00\x00\x00\x00\xff\xff\xff\xff\x00";

/// The client's second frame, sent on the 101: ADDRESS_REQUEST (Request ID
/// 1, any IPv4 address, /32).
const CLIENT_ADDRESS_REQUEST: &[u8] = b"\x02\x07\x01\x04\x00\x00\x00\x00\x20";

/// The gateway's answer: ADDRESS_ASSIGN (10.77.0.2/32, Request ID 1).
const SERVER_ADDRESS_ANSWER: &[u8] = b"\x01\x07\x01\x04\x0a\x4d\x00\x02\x20";

/// The first PING (nonce 1) and its PONG.
const CLIENT_FIRST_PING: &[u8] = b"\xc0\x00\x00\x56\x45\x49\x4c\x00\x08\0\0\0\0\0\0\0\x01";
const SERVER_FIRST_PONG: &[u8] = b"\xc0\x00\x00\x56\x45\x49\x4c\x01\x08\0\0\0\0\0\0\0\x01";

fn client_config() -> ClientConfig {
    ClientConfig {
        keepalive_interval: INTERVAL,
        keepalive_timeout: 2 * INTERVAL,
        ..ClientConfig::new(HOST)
    }
}

fn server_config() -> ServerConfig {
    ServerConfig {
        keepalive_timeout: 2 * INTERVAL,
        ..ServerConfig::new(VIP)
    }
}

/// Drains a session's outputs: the bytes it sent, and everything else.
fn drain(mut poll: impl FnMut() -> Option<Output>) -> (Vec<u8>, Vec<Output>) {
    let mut sent = Vec::new();
    let mut other = Vec::new();
    while let Some(output) = poll() {
        match output {
            Output::Send(bytes) => sent.extend_from_slice(&bytes),
            output => other.push(output),
        }
    }
    (sent, other)
}

fn close_reason(outputs: &[Output]) -> Option<&CloseReason> {
    outputs.iter().find_map(|o| match o {
        Output::Close { reason } => Some(reason),
        _ => None,
    })
}

/// Both ends, a virtual clock, and a wire that can be cut per direction.
struct Pair {
    client: ClientSession,
    server: ServerSession,
    now: Instant,
    client_out: Vec<Output>,
    server_out: Vec<Output>,
    /// Bytes each end wrote, in order, for exact-bytes assertions.
    client_wire: Vec<u8>,
    server_wire: Vec<u8>,
    /// Errors returned by `receive`.
    client_errors: Vec<ProtoError>,
    server_errors: Vec<ProtoError>,
    to_server: bool,
    to_client: bool,
}

impl Pair {
    fn new() -> Self {
        Self::with(client_config(), server_config())
    }

    fn with(client: ClientConfig, server: ServerConfig) -> Self {
        let now = Instant::now();
        Pair {
            client: ClientSession::new(client, now).expect("client config"),
            server: ServerSession::new(server, now).expect("server config"),
            now,
            client_out: Vec::new(),
            server_out: Vec::new(),
            client_wire: Vec::new(),
            server_wire: Vec::new(),
            client_errors: Vec::new(),
            server_errors: Vec::new(),
            to_server: true,
            to_client: true,
        }
    }

    /// Moves bytes both ways until both ends are quiet.
    fn pump(&mut self) {
        loop {
            let (c_sent, c_other) = drain(|| self.client.poll_output());
            let (s_sent, s_other) = drain(|| self.server.poll_output());
            self.client_out.extend(c_other);
            self.server_out.extend(s_other);
            if c_sent.is_empty() && s_sent.is_empty() {
                return;
            }
            self.client_wire.extend_from_slice(&c_sent);
            self.server_wire.extend_from_slice(&s_sent);
            if self.to_server {
                if let Err(e) = self.server.receive(&c_sent, self.now) {
                    self.server_errors.push(e);
                }
            }
            if self.to_client {
                if let Err(e) = self.client.receive(&s_sent, self.now) {
                    self.client_errors.push(e);
                }
            }
        }
    }

    /// Runs both ends until `until`, firing each timer at its exact time.
    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.pump();
        while let Some(t) = [self.client.poll_timeout(), self.server.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
            .filter(|&t| t <= until)
        {
            self.now = self.now.max(t);
            self.client.handle_timeout(self.now);
            self.server.handle_timeout(self.now);
            self.pump();
        }
        self.now = until;
    }

    fn packets(outputs: &[Output]) -> Vec<&[u8]> {
        outputs
            .iter()
            .filter_map(|o| match o {
                Output::Packet(p) => Some(&p[..]),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn first_frames_are_exactly_these_bytes() {
    let mut pair = Pair::new();
    pair.pump();
    let mut client_expected = CLIENT_FIRST_FRAME.to_vec();
    client_expected.extend_from_slice(CLIENT_ADDRESS_REQUEST);
    let mut server_expected = SERVER_FIRST_FRAME.to_vec();
    server_expected.extend_from_slice(SERVER_ADDRESS_ANSWER);
    assert_eq!(pair.client_wire, client_expected);
    assert_eq!(pair.server_wire, server_expected);
    // The builders agree with the literals.
    assert!(CLIENT_FIRST_FRAME == http::request(HOST, http::WELL_KNOWN_PATH, INTERVAL, false));
    assert!(SERVER_FIRST_FRAME.starts_with(&http::switching_protocols(false)));

    pair.client_wire.clear();
    pair.server_wire.clear();
    pair.run_for(INTERVAL);
    assert_eq!(pair.client_wire, CLIENT_FIRST_PING);
    assert_eq!(pair.server_wire, SERVER_FIRST_PONG);
}

#[test]
fn handshake_assigns_the_vip_and_routes() {
    let mut pair = Pair::new();
    assert!(!pair.client.is_established());
    pair.pump();
    assert!(pair.client.is_established() && pair.server.is_established());
    assert_eq!(
        pair.client_out,
        [
            Output::Assigned {
                addr: VIP,
                prefix: 32
            },
            Output::Routes(vec![IpAddressRange::ALL_IPV4]),
        ],
        "the answer to the ADDRESS_REQUEST repeats the VIP and is not reported again"
    );
    assert_eq!(pair.client.assigned(), Some((VIP, 32)));
    assert!(pair.server_out.is_empty());
    let request = pair.server.request().expect("request read");
    assert_eq!(request.host, HOST);
    assert_eq!(request.target, http::WELL_KNOWN_PATH);
    assert_eq!(pair.server.poll_timeout(), Some(pair.now + 2 * INTERVAL));
}

/// The gateway's DNS_ASSIGN: plain DNS at 10.77.0.1 for every name.
const SERVER_DNS_ASSIGN: &[u8] =
    b"\x9a\xce\x79\xec\x0e\x01\x00\x01\x01\x0a\x4d\x00\x01\x00\x00\x00\x01\x00\x00";

fn gateway_dns() -> Vec<DnsConfiguration> {
    vec![DnsConfiguration::full_tunnel(vec![Ipv4Addr::new(
        10, 77, 0, 1,
    )])]
}

#[test]
fn the_resolver_is_announced_after_the_routes_and_reported_once() {
    let mut pair = Pair::with(
        client_config(),
        ServerConfig {
            dns: gateway_dns(),
            ..server_config()
        },
    );
    pair.pump();
    let mut expected = SERVER_FIRST_FRAME.to_vec();
    expected.extend_from_slice(SERVER_DNS_ASSIGN);
    expected.extend_from_slice(SERVER_ADDRESS_ANSWER);
    assert_eq!(pair.server_wire, expected, "101, address, routes, DNS");
    assert_eq!(
        pair.client_out,
        [
            Output::Assigned {
                addr: VIP,
                prefix: 32
            },
            Output::Routes(vec![IpAddressRange::ALL_IPV4]),
            Output::Dns(gateway_dns()),
        ]
    );
    // The same configuration again is not news; a new one (or none) is.
    let mut again = Vec::new();
    Capsule::DnsAssign(gateway_dns())
        .encode(&mut again)
        .unwrap();
    Capsule::DnsAssign(Vec::new()).encode(&mut again).unwrap();
    pair.client.receive(&again, pair.now).unwrap();
    let (_, other) = drain(|| pair.client.poll_output());
    assert_eq!(other, [Output::Dns(Vec::new())]);
}

#[test]
fn without_dns_nothing_is_announced_and_a_clients_dns_assign_is_ignored() {
    let mut pair = Pair::new();
    pair.pump();
    assert!(!pair.client_out.iter().any(|o| matches!(o, Output::Dns(_))));
    let mut bytes = Vec::new();
    Capsule::DnsAssign(gateway_dns())
        .encode(&mut bytes)
        .unwrap();
    pair.server.receive(&bytes, pair.now).unwrap();
    let (sent, other) = drain(|| pair.server.poll_output());
    assert!(sent.is_empty() && other.is_empty());
    assert!(pair.server.is_established());
    // Skipped unread, however it is built: 65,570 one-byte domain names
    // would have been as many strings, 24 bytes of heap each.
    let mut value = vec![0u8];
    crate::varint::encode_unchecked(65_570, &mut value);
    value.extend(std::iter::repeat_n(0u8, 65_570));
    value.push(0);
    let mut big = Vec::new();
    crate::varint::encode_unchecked(crate::capsule::DNS_ASSIGN, &mut big);
    crate::varint::encode_unchecked(value.len() as u64, &mut big);
    big.extend_from_slice(&value);
    pair.server.receive(&big, pair.now).unwrap();
    assert_eq!(pair.server.stats().unknown_capsules, 2);
    assert!(pair.server.is_established());
}

#[test]
fn a_gateway_with_a_bad_dns_configuration_does_not_start() {
    let mut dns = gateway_dns();
    dns[0].nameservers[0].priority = 0;
    let config = ServerConfig {
        dns,
        ..server_config()
    };
    assert!(matches!(
        ServerSession::new(config, Instant::now()),
        Err(ProtoError::BadNameserver { .. })
    ));
}

#[test]
fn packets_flow_both_ways() {
    let mut pair = Pair::new();
    pair.pump();
    let up: Vec<Vec<u8>> = (0..50u8).map(|i| vec![0x45, i, 0, 20 + i]).collect();
    let down: Vec<Vec<u8>> = (0..50u8)
        .map(|i| vec![0x45; 1 + usize::from(i) * 29])
        .collect();
    for p in &up {
        pair.client.send_packet(p);
    }
    for p in &down {
        pair.server.send_packet(p);
    }
    pair.pump();
    assert_eq!(Pair::packets(&pair.server_out), up);
    assert_eq!(Pair::packets(&pair.client_out), down);
    assert_eq!(pair.server.stats().packets_received, 50);
    assert_eq!(pair.client.stats().packets_sent, 50);
    assert_eq!(
        pair.client.stats().bytes_received,
        down.iter().map(|p| p.len() as u64).sum::<u64>()
    );
}

#[test]
fn byte_by_byte_delivery_changes_nothing() {
    let mut whole = Pair::new();
    whole.pump();
    whole.server.send_packet(b"\x45downstream");
    whole.pump();

    let now = Instant::now();
    let mut client = ClientSession::new(client_config(), now).expect("config");
    let mut server = ServerSession::new(server_config(), now).expect("config");
    let (request, _) = drain(|| client.poll_output());
    for b in request.chunks(1) {
        server.receive(b, now).expect("valid request");
    }
    server.send_packet(b"\x45downstream");
    let (greeting, server_other) = drain(|| server.poll_output());
    for b in greeting.chunks(1) {
        client.receive(b, now).expect("valid response");
    }
    let (_, client_other) = drain(|| client.poll_output());
    assert!(server_other.is_empty());
    // Same outputs, minus the effect of the ADDRESS_REQUEST answer (which
    // does not produce an output anyway).
    assert_eq!(client_other, whole.client_out);
}

#[test]
fn keepalive_pings_every_interval_and_keeps_both_ends_up() {
    let mut pair = Pair::new();
    pair.pump();
    assert_eq!(pair.client.poll_timeout(), Some(pair.now + INTERVAL));
    pair.run_for(10 * INTERVAL);
    assert_eq!(pair.client.stats().pings_sent, 10);
    assert_eq!(pair.server.stats().pongs_sent, 10);
    assert_eq!(pair.client.stats().pongs_received, 10);
    assert!(pair.client.is_established() && pair.server.is_established());
    assert!(close_reason(&pair.client_out).is_none());
    assert!(close_reason(&pair.server_out).is_none());
}

#[test]
fn gateway_declares_a_silent_client_dead_after_twice_its_interval() {
    let mut pair = Pair::new();
    pair.pump();
    let last_heard = pair.now;
    pair.to_server = false; // The client's bytes stop arriving.
    pair.run_for(2 * INTERVAL - Duration::from_millis(1));
    assert!(pair.server.is_established(), "one missed PING is not fatal");
    pair.run_for(Duration::from_millis(1));
    assert!(pair.server.is_closed());
    let reason = close_reason(&pair.server_out).expect("closed");
    assert_eq!(
        *reason,
        CloseReason::PeerDead {
            silent_for: 2 * INTERVAL
        }
    );
    assert_eq!(reason.to_string(), "peer sent nothing for 30s");
    assert_eq!(pair.now, last_heard + 2 * INTERVAL);
    assert_eq!(pair.server.poll_timeout(), None);
}

#[test]
fn client_declares_a_silent_gateway_dead() {
    let mut pair = Pair::new();
    pair.pump();
    pair.to_client = false; // PONGs stop arriving.
    pair.run_for(2 * INTERVAL - Duration::from_millis(1));
    assert!(pair.client.is_established());
    pair.run_for(Duration::from_millis(1));
    assert_eq!(
        close_reason(&pair.client_out),
        Some(&CloseReason::PeerDead {
            silent_for: 2 * INTERVAL
        })
    );
    // Once closed, nothing more is produced and packets are not sent.
    pair.client.send_packet(b"\x45late");
    assert_eq!(pair.client.poll_output(), None);
    assert_eq!(pair.client.stats().packets_not_sent, 1);
}

#[test]
fn traffic_alone_keeps_the_gateway_side_alive() {
    // A client that never PINGs but sends packets is alive to the
    // gateway: any byte counts.
    let mut pair = Pair::with(
        ClientConfig {
            keepalive_interval: 3600 * SECOND,
            keepalive_timeout: 7200 * SECOND,
            ..client_config()
        },
        server_config(),
    );
    pair.pump();
    for _ in 0..10 {
        pair.run_for(20 * SECOND);
        pair.client.send_packet(b"\x45keep");
        pair.pump();
    }
    assert!(pair.server.is_established());
    assert_eq!(pair.client.stats().pings_sent, 0);
}

#[test]
fn handshake_timeouts() {
    // A gateway that never answers.
    let mut pair = Pair::new();
    pair.to_server = false;
    pair.run_for(10 * SECOND - Duration::from_millis(1));
    assert!(!pair.client.is_closed());
    pair.run_for(Duration::from_millis(1));
    let client_reason = close_reason(&pair.client_out).expect("client closed");
    assert_eq!(client_reason.to_string(), "handshake timed out after 10s");
    // The gateway heard nothing either, and gives up at the same time.
    assert_eq!(
        close_reason(&pair.server_out),
        Some(&CloseReason::HandshakeTimeout { after: 10 * SECOND })
    );

    // A client that sends half a request and stalls.
    let now = Instant::now();
    let mut server = ServerSession::new(server_config(), now).expect("config");
    server
        .receive(
            b"GET /.well-known/masque/ip/*/*/ HTTP/1.1\r\nHost: gate",
            now,
        )
        .expect("incomplete, not wrong");
    server.handle_timeout(now + 9 * SECOND);
    assert!(!server.is_closed());
    server.handle_timeout(now + 10 * SECOND);
    let (sent, other) = drain(|| server.poll_output());
    assert!(sent.is_empty());
    assert_eq!(
        close_reason(&other),
        Some(&CloseReason::HandshakeTimeout { after: 10 * SECOND })
    );
}

/// Feeds `input` to a fresh gateway; returns what it sent and why it
/// closed.
fn bad_request(input: &[u8]) -> (String, CloseReason) {
    let now = Instant::now();
    let mut server = ServerSession::new(server_config(), now).expect("config");
    let error = server.receive(input, now).expect_err("bad request");
    let (sent, other) = drain(|| server.poll_output());
    assert!(server.is_closed(), "closed on {input:02x?}");
    let reason = close_reason(&other).expect("a close").clone();
    assert_eq!(reason, CloseReason::BadRequest(error));
    assert_eq!(server.close_reason(), Some(&reason));
    (String::from_utf8_lossy(&sent).into_owned(), reason)
}

#[test]
fn garbage_instead_of_a_request_gets_a_400_and_a_reason() {
    let tls_client_hello = [
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    let cases: &[(&[u8], &str)] = &[
        (
            &tls_client_hello,
            "bad upgrade request: received a TLS handshake record instead of an HTTP request (TLS applied twice?)",
        ),
        (
            b"\x00\x00\x00\x01\xde\xad\xbe\xef",
            "bad upgrade request: malformed request line \"\\x00\\x00\\x00\\x01\\xde\\xad\\xbe\\xef\"",
        ),
        (
            b"POST /.well-known/masque/ip/*/*/ HTTP/1.1\r\n",
            "bad upgrade request: method \"POST\" is not allowed: CONNECT-IP over HTTP/1.1 uses GET",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: gateway.example\r\nConnection: Upgrade\r\nCapsule-Protocol: ?1\r\n\r\n",
            "bad upgrade request: missing Upgrade header (expected \"Upgrade: connect-ip\")",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: gateway.example\r\n\r\n",
            "bad upgrade request: missing Connection header (expected \"Connection: Upgrade\")",
        ),
    ];
    for (input, expected) in cases {
        let (sent, reason) = bad_request(input);
        assert!(matches!(reason, CloseReason::BadRequest(_)), "{reason:?}");
        assert_eq!(reason.to_string(), *expected);
        // The 400 carries the same explanation for the client's operator.
        let CloseReason::BadRequest(e) = &reason else {
            unreachable!()
        };
        let body = format!("{e}\n");
        assert_eq!(
            sent,
            format!(
                "HTTP/1.1 400 Bad Request\r\n\
                 Content-Type: text/plain; charset=utf-8\r\n\
                 Content-Length: {}\r\n\
                 Connection: close\r\n\
                 \r\n\
                 {body}",
                body.len()
            )
        );
    }
}

#[test]
fn request_header_too_large() {
    let mut input = b"GET / HTTP/1.1\r\n".to_vec();
    while input.len() <= http::MAX_HEADER_LEN {
        input.extend_from_slice(b"Cookie: 0123456789012345678901234567890123456789\r\n");
    }
    let (sent, reason) = bad_request(&input);
    assert!(sent.starts_with("HTTP/1.1 400 Bad Request\r\n"));
    assert_eq!(
        reason.to_string(),
        "bad upgrade request: request header too large (more than 8192 bytes)"
    );
}

#[test]
fn refusal_reaches_the_client_with_its_reason() {
    let mut pair = Pair::new();
    pair.server.refuse(503, "gateway full");
    // The refusal is ready at once, before the request is read.
    let Some(Output::Send(refusal)) = pair.server.poll_output() else {
        panic!("expected the refusal")
    };
    assert_eq!(
        refusal,
        b"HTTP/1.1 503 Service Unavailable\r\n\
          Content-Type: text/plain; charset=utf-8\r\n\
          Content-Length: 13\r\n\
          Connection: close\r\n\
          \r\n\
          gateway full\n"
    );
    pair.server_out.extend(pair.server.poll_output());
    pair.server_wire.extend_from_slice(&refusal);
    pair.client
        .receive(&refusal, pair.now)
        .expect_err("refused");
    pair.pump();
    assert_eq!(
        close_reason(&pair.server_out),
        Some(&CloseReason::RefusedClient {
            status: 503,
            message: "gateway full".into()
        })
    );
    let client_reason = close_reason(&pair.client_out).expect("client closed");
    assert_eq!(
        *client_reason,
        CloseReason::Refused {
            status: 503,
            reason: "Service Unavailable".into(),
            message: Some("gateway full".into())
        }
    );
    assert_eq!(
        client_reason.to_string(),
        "gateway refused: 503 Service Unavailable (gateway full)"
    );
    assert_eq!(
        close_reason(&pair.server_out).map(ToString::to_string),
        Some("refused the client: 503 Service Unavailable (gateway full)".into())
    );
    assert!(!pair.client.is_established());
    // The request arriving after the refusal is ignored.
    assert!(pair.server.request().is_none());
    assert_eq!(pair.server.poll_output(), None);
}

#[test]
fn refuse_after_the_upgrade_does_nothing() {
    let mut pair = Pair::new();
    pair.pump();
    pair.server.refuse(403, "too late");
    pair.pump();
    assert!(pair.server.is_established());
}

#[test]
fn gateway_handles_capsules_pipelined_behind_the_request() {
    let now = Instant::now();
    let mut server = ServerSession::new(server_config(), now).expect("config");
    let mut input = CLIENT_FIRST_FRAME.to_vec();
    encode_ip_datagram(b"\x45early", &mut input);
    Capsule::Ping(77).encode(&mut input).expect("ping");
    server.receive(&input, now).expect("valid");
    let (sent, other) = drain(|| server.poll_output());
    assert_eq!(other, [Output::Packet(b"\x45early".to_vec())]);
    let mut expected = SERVER_FIRST_FRAME.to_vec();
    Capsule::Pong(77).encode(&mut expected).expect("pong");
    assert_eq!(sent, expected);
}

#[test]
fn gateway_answers_address_requests_per_rfc() {
    let mut pair = Pair::new();
    pair.pump();
    let mut request = Vec::new();
    Capsule::AddressRequest(vec![RequestedAddress {
        request_id: 9,
        ip: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        prefix_len: 64,
    }])
    .encode(&mut request)
    .expect("request");
    pair.server.receive(&request, pair.now).expect("valid");
    let (sent, _) = drain(|| pair.server.poll_output());
    let mut decoder = crate::capsule::CapsuleDecoder::default();
    decoder.feed(&sent);
    // The IPv6 request is declined; the VIP stays in the full list.
    assert_eq!(
        decoder.next(),
        Ok(Some(Capsule::AddressAssign(vec![
            AssignedAddress {
                request_id: 9,
                ip: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                prefix_len: 128
            },
            AssignedAddress {
                request_id: 0,
                ip: IpAddr::V4(VIP),
                prefix_len: 32
            },
        ])))
    );
}

#[test]
fn odd_capsules_are_dropped_counted_or_skipped() {
    let mut pair = Pair::new();
    pair.pump();
    let mut input = Vec::new();
    Capsule::Datagram {
        context_id: 2,
        payload: b"compressed?".to_vec(),
    }
    .encode(&mut input)
    .expect("datagram");
    // An unknown capsule type (reserved for greasing, RFC 9297 §5.4).
    input.extend_from_slice(&[0x40, 0x29 * 2 + 0x17, 0x03, 1, 2, 3]);
    encode_ip_datagram(b"\x45after", &mut input);
    pair.server.receive(&input, pair.now).expect("valid");
    pair.pump();
    assert_eq!(Pair::packets(&pair.server_out), [b"\x45after"]);
    assert_eq!(pair.server.stats().datagrams_dropped, 1);
    assert_eq!(pair.server.stats().unknown_capsules, 1);
    assert!(pair.server.is_established());
}

#[test]
fn protocol_errors_close_with_the_error() {
    // An oversize capsule from the gateway, on a client with a 64 KiB limit.
    let mut pair = Pair::with(
        ClientConfig {
            max_capsule_len: 65_535,
            ..client_config()
        },
        server_config(),
    );
    pair.pump();
    pair.server.send_packet(&vec![0x45; 69_999]);
    pair.pump();
    let reason = close_reason(&pair.client_out).expect("closed");
    assert_eq!(
        reason.to_string(),
        "protocol error: capsule of 70000 bytes exceeds the 65535-byte limit"
    );
    // `receive` reported the same error when it happened.
    assert_eq!(
        pair.client_errors,
        [ProtoError::CapsuleTooLarge {
            len: 70_000,
            max: 65_535
        }]
    );

    // A malformed ADDRESS_REQUEST to the gateway (a client's
    // ROUTE_ADVERTISEMENT, say, is skipped unread: the gateway ignores it).
    let mut pair = Pair::new();
    pair.pump();
    assert_eq!(
        pair.server
            .receive(&[0x03, 0x0a, 0x04, 10, 0, 0, 1, 10, 0, 0, 0, 0], pair.now),
        Ok(())
    );
    let error = pair
        .server
        .receive(&[0x02, 0x00], pair.now)
        .expect_err("an empty request");
    assert_eq!(
        pair.server.close_reason(),
        Some(&CloseReason::Protocol(error))
    );
    // Input after the close is ignored.
    assert_eq!(pair.server.receive(b"\xff\xff", pair.now), Ok(()));
    pair.pump();
    assert_eq!(
        close_reason(&pair.server_out).map(ToString::to_string),
        Some(format!(
            "protocol error: {}",
            ProtoError::EmptyAddressRequest
        ))
    );
}

#[test]
fn client_needs_an_ipv4_address() {
    let now = Instant::now();
    let mut client = ClientSession::new(client_config(), now).expect("config");
    let mut input = http::switching_protocols(false);
    Capsule::AddressAssign(vec![])
        .encode(&mut input)
        .expect("assign");
    assert_eq!(client.receive(&input, now), Err(ProtoError::NoIpv4Assigned));
    let (_, other) = drain(|| client.poll_output());
    assert_eq!(
        close_reason(&other),
        Some(&CloseReason::Protocol(ProtoError::NoIpv4Assigned))
    );
}

#[test]
fn client_reports_a_bad_response() {
    let now = Instant::now();
    let mut client = ClientSession::new(client_config(), now).expect("config");
    assert!(client.receive(b"SSH-2.0-OpenSSH_9.6\r\n", now).is_err());
    let (_, other) = drain(|| client.poll_output());
    assert_eq!(
        close_reason(&other).map(ToString::to_string),
        Some("protocol error: malformed status line \"SSH-2.0-OpenSSH_9.6\"".into())
    );
}

#[test]
fn a_gateway_sending_only_interim_responses_is_cut_off() {
    let now = Instant::now();
    let mut client = ClientSession::new(client_config(), now).expect("client config");
    let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
    let mut fed = 0;
    while !client.is_closed() {
        assert!(
            fed <= http::MAX_INTERIM_RESPONSES,
            "still waiting for the 101 after {fed} interim responses"
        );
        let _ = client.receive(interim, now);
        fed += 1;
    }
    assert_eq!(fed, http::MAX_INTERIM_RESPONSES + 1);
    let error = ProtoError::TooManyInterimResponses {
        limit: http::MAX_INTERIM_RESPONSES,
    };
    assert_eq!(
        client.close_reason(),
        Some(&CloseReason::Protocol(error.clone()))
    );
    let (_, outputs) = drain(|| client.poll_output());
    assert_eq!(close_reason(&outputs), Some(&CloseReason::Protocol(error)));
}

#[test]
fn client_rejects_unsendable_hosts() {
    let now = Instant::now();
    for host in ["", "evil\r\nX-Injected: 1", "two words"] {
        let e = ClientSession::new(ClientConfig::new(host), now).expect_err(host);
        assert!(
            matches!(e, ProtoError::InvalidRequestTarget { what: "host", .. }),
            "{e}"
        );
    }
}

#[test]
fn default_configs_must_be_filled_in() {
    let now = Instant::now();
    assert_eq!(
        ServerSession::new(ServerConfig::default(), now).map(|_| ()),
        Err(ProtoError::UnassignableAddress {
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        })
    );
    assert!(matches!(
        ClientSession::new(ClientConfig::default(), now),
        Err(ProtoError::InvalidRequestTarget { what: "host", .. })
    ));
}

#[test]
fn gateway_rejects_invalid_routes_up_front() {
    let mut config = server_config();
    config.routes = vec![IpAddressRange::ALL_IPV4, IpAddressRange::ALL_IPV4];
    assert!(matches!(
        ServerSession::new(config, Instant::now()),
        Err(ProtoError::RoutesOverlap { .. })
    ));
}

#[test]
fn eof_closes_with_a_reason() {
    let mut pair = Pair::new();
    pair.client.receive_eof();
    let (_, other) = drain(|| pair.client.poll_output());
    assert_eq!(
        close_reason(&other).map(ToString::to_string),
        Some("peer closed the connection during the handshake".into())
    );
    let mut pair = Pair::new();
    pair.pump();
    pair.server.receive_eof();
    pair.pump();
    assert_eq!(
        close_reason(&pair.server_out),
        Some(&CloseReason::PeerClosed {
            during_handshake: false
        })
    );
}

#[test]
fn packets_before_the_upgrade_are_not_sent() {
    let mut pair = Pair::new();
    pair.client.send_packet(b"\x45early");
    pair.server.send_packet(b"\x45early");
    pair.pump();
    assert_eq!(pair.client.stats().packets_not_sent, 1);
    assert_eq!(pair.server.stats().packets_not_sent, 1);
    assert!(Pair::packets(&pair.client_out).is_empty());
    assert!(Pair::packets(&pair.server_out).is_empty());
}

#[test]
fn send_buffers_are_recycled() {
    let mut pair = Pair::new();
    pair.pump();
    pair.server.send_packet(&[0x45; 1000]);
    let Some(Output::Send(buf)) = pair.server.poll_output() else {
        panic!("expected bytes to send")
    };
    let capacity = buf.capacity();
    pair.server.recycle_send_buffer(buf);
    pair.server.send_packet(&[0x45; 10]);
    let Some(Output::Send(buf)) = pair.server.poll_output() else {
        panic!("expected bytes to send")
    };
    assert_eq!(buf.capacity(), capacity, "the same allocation came back");
    assert_eq!(buf.len(), 1 + 1 + 1 + 10);
}

#[test]
fn a_full_batch_fits_the_kept_send_buffer_whatever_its_packets() {
    const LARGEST: usize = 65_535;
    // The largest packets; and the smallest, where framing weighs most,
    // with the largest as the one that crosses the mark.
    for size in [LARGEST, 20] {
        let mut pair = Pair::new();
        pair.pump();
        let (packet, largest) = (vec![0x45; size], vec![0x45; LARGEST]);
        let turn = |server: &mut ServerSession| {
            let mut taken = 0;
            while taken < super::batch_bytes(LARGEST) {
                let next = if taken + size < super::batch_bytes(LARGEST) {
                    &packet
                } else {
                    &largest
                };
                server.send_packet(next);
                taken += next.len();
            }
            let Some(Output::Send(buf)) = server.poll_output() else {
                panic!("expected bytes to send")
            };
            assert!(buf.len() <= super::link::MAX_RECYCLED_CAPACITY, "{size}");
            buf
        };
        // The first turn grows a buffer from nothing, and may overshoot.
        let first = turn(&mut pair.server);
        pair.server.recycle_send_buffer(first);
        let second = turn(&mut pair.server);
        assert!(second.capacity() <= super::link::MAX_RECYCLED_CAPACITY);
        let at = second.as_ptr();
        pair.server.recycle_send_buffer(second);
        let third = turn(&mut pair.server);
        assert_eq!(third.as_ptr(), at, "{size}: kept, and not grown again");
    }
}

#[test]
fn unbounded_timeouts_mean_never_not_a_panic() {
    // The client's PINGs are capped at one an hour (what it announces), so
    // both ends stay up however long nothing else happens.
    let mut pair = Pair::with(
        ClientConfig {
            keepalive_interval: Duration::MAX,
            keepalive_timeout: Duration::MAX,
            handshake_timeout: Duration::MAX,
            ..client_config()
        },
        ServerConfig {
            keepalive_timeout: Duration::MAX,
            handshake_timeout: Duration::MAX,
            ..server_config()
        },
    );
    pair.pump();
    pair.run_for(1000 * 24 * 3600 * SECOND);
    assert!(pair.client.is_established() && pair.server.is_established());
    assert!(pair.client.poll_timeout().is_some());
}

#[test]
fn the_gateway_waits_twice_the_interval_the_client_announces() {
    let interval = 4 * SECOND;
    let mut pair = Pair::with(
        ClientConfig {
            keepalive_interval: interval,
            keepalive_timeout: Duration::MAX,
            ..client_config()
        },
        ServerConfig {
            keepalive_timeout: 3600 * SECOND,
            ..server_config()
        },
    );
    pair.pump();
    assert_eq!(pair.server.request().unwrap().keepalive, Some(interval));
    // The client goes silent (its pings are lost): the gateway gives up
    // after two intervals, not after its own hour.
    let start = pair.now;
    while !pair.server.is_closed() && pair.now - start < 60 * SECOND {
        pair.now += SECOND;
        pair.server.handle_timeout(pair.now);
    }
    assert!(pair.server.is_closed());
    assert_eq!(pair.now - start, 2 * interval);
}

#[test]
fn a_huge_announced_keepalive_is_refused_not_obeyed() {
    // Out of range (or beyond u64): a 400 naming the bounds, no panic.
    for value in ["3601", "18446744073709551615", "99999999999999999999999"] {
        let request = String::from_utf8_lossy(CLIENT_FIRST_FRAME)
            .replace("Veil-Keepalive: 15", &format!("Veil-Keepalive: {value}"));
        let (body, reason) = bad_request(request.as_bytes());
        assert!(body.contains("whole seconds from 1 to 3600"), "{body}");
        assert!(matches!(reason, CloseReason::BadRequest(_)), "{reason:?}");
    }
}

#[test]
fn the_longest_announced_keepalive_still_bounds_the_gateways_wait() {
    let now = Instant::now();
    let mut server = ServerSession::new(server_config(), now).expect("server config");
    let request = String::from_utf8_lossy(CLIENT_FIRST_FRAME)
        .replace("Veil-Keepalive: 15", "Veil-Keepalive: 3600");
    server.receive(request.as_bytes(), now).expect("valid");
    assert!(server.is_established());
    let cap = 2 * http::MAX_KEEPALIVE;
    assert_eq!(server.poll_timeout(), Some(now + cap));
    server.handle_timeout(now + cap);
    assert!(server.is_closed(), "dead after two hours of silence");
}

// --- Offload ---------------------------------------------------------

use crate::{
    capsule::{encode_datagram, OFFLOAD_CONTEXT},
    gso::VnetHdr,
};

/// The far end of the test flow (the client's VIP is the near end).
const PEER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const MSS: u16 = 1000;

fn offload_client() -> ClientConfig {
    ClientConfig {
        offload: true,
        ..client_config()
    }
}

fn offload_server() -> ServerConfig {
    ServerConfig {
        offload: true,
        ..server_config()
    }
}

/// RFC 1071: the ones' complement sum of `data` as big-endian 16-bit
/// words (an odd last byte padded with zero), folded, not complemented.
fn ones_sum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|w| u32::from(w[0]) << 8 | u32::from(w.get(1).copied().unwrap_or(0)))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The IPv4 pseudo-header of a TCP segment of `tcp_len` bytes from the
/// addresses of `packet`.
fn pseudo_header(packet: &[u8], tcp_len: usize) -> Vec<u8> {
    let mut p = packet[12..20].to_vec();
    p.extend_from_slice(&[0, 6]);
    p.extend_from_slice(&(tcp_len as u16).to_be_bytes());
    p
}

/// Whether the IPv4 header checksum (20-byte header) verifies.
pub(super) fn ip_checksum_ok(packet: &[u8]) -> bool {
    ones_sum(&packet[..20]) == 0xffff
}

/// Whether the TCP checksum of an IPv4 packet with a 20-byte header
/// verifies over pseudo-header, header and payload.
pub(super) fn tcp_checksum_ok(packet: &[u8]) -> bool {
    let mut all = pseudo_header(packet, packet.len() - 20);
    all.extend_from_slice(&packet[20..]);
    ones_sum(&all) == 0xffff
}

/// An IPv4/TCP packet VIP:40000 -> PEER:443 (ACK|PSH, seq 7000) around
/// `payload`, as a TUN device with TSO hands it over: the IP header
/// checksum complete, the TCP checksum field holding only the
/// pseudo-header sum.
pub(super) fn tcp_super_packet(payload: &[u8]) -> Vec<u8> {
    let total = 40 + payload.len();
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34, 0x40, 0]); // ID, DF
    p.extend_from_slice(&[64, 6, 0, 0]); // TTL, TCP, checksum
    p.extend_from_slice(&VIP.octets());
    p.extend_from_slice(&PEER.octets());
    let ip_csum = !ones_sum(&p);
    p[10..12].copy_from_slice(&ip_csum.to_be_bytes());
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&443u16.to_be_bytes());
    p.extend_from_slice(&7000u32.to_be_bytes()); // seq
    p.extend_from_slice(&1u32.to_be_bytes()); // ack
    p.extend_from_slice(&[0x50, 0x18]); // data offset 5, ACK|PSH
    p.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, checksum, urgent
    let partial = ones_sum(&pseudo_header(&p, 20 + payload.len()));
    p[36..38].copy_from_slice(&partial.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// The header for [`tcp_super_packet`]: TCPv4 GSO in `MSS`-byte segments.
pub(super) fn tso_header() -> VnetHdr {
    VnetHdr {
        flags: VnetHdr::F_NEEDS_CSUM,
        gso_type: VnetHdr::GSO_TCPV4,
        hdr_len: 40,
        gso_size: MSS,
        csum_start: 20,
        csum_offset: 16,
    }
}

/// 3 x MSS bytes of payload that are not all alike.
pub(super) fn super_payload() -> Vec<u8> {
    (0..3 * usize::from(MSS))
        .map(|i| (i * 7 % 251) as u8)
        .collect()
}

/// [`SERVER_FIRST_FRAME`] cut after its 101's blank line: the 101 and the
/// configuration capsules that follow it.
fn server_first_frame_parts() -> (&'static [u8], &'static [u8]) {
    let end = SERVER_FIRST_FRAME
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a blank line")
        + 4;
    SERVER_FIRST_FRAME.split_at(end)
}

/// The 10-byte header then the packet, as an offload datagram carries them.
fn header_and_packet(hdr: &VnetHdr, packet: &[u8]) -> Vec<u8> {
    let mut joined = hdr.to_bytes().to_vec();
    joined.extend_from_slice(packet);
    joined
}

fn offload_packets(outputs: &[Output]) -> Vec<&[u8]> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::OffloadPacket(p) => Some(&p[..]),
            _ => None,
        })
        .collect()
}

/// Checks what a peer without offload received for [`tcp_super_packet`]
/// of `payload`: complete MSS-sized segments that add up to it.
pub(super) fn assert_segmented(received: &[&[u8]], payload: &[u8]) {
    assert_eq!(received.len(), 3, "one packet per MSS");
    let mut joined = Vec::new();
    for (i, seg) in received.iter().enumerate() {
        assert_eq!(seg.len(), 40 + usize::from(MSS), "segment {i}");
        assert_eq!(u16::from_be_bytes([seg[2], seg[3]]) as usize, seg.len());
        assert!(ip_checksum_ok(seg), "IP checksum of segment {i}");
        assert!(tcp_checksum_ok(seg), "TCP checksum of segment {i}");
        let seq = u32::from_be_bytes([seg[24], seg[25], seg[26], seg[27]]);
        assert_eq!(seq, 7000 + u32::from(MSS) * i as u32);
        joined.extend_from_slice(&seg[40..]);
    }
    assert_eq!(joined, payload);
}

#[test]
fn offload_is_negotiated_when_both_ends_want_it() {
    let mut pair = Pair::with(offload_client(), offload_server());
    pair.pump();
    assert!(pair.client.is_established() && pair.server.is_established());
    assert!(pair.client.offload() && pair.server.offload());
    assert!(pair.server.request().expect("request read").offload);
    let mut request = CLIENT_FIRST_FRAME[..CLIENT_FIRST_FRAME.len() - 2].to_vec();
    request.extend_from_slice(b"Veil-Offload: ?1\r\n\r\n");
    assert!(pair.client_wire.starts_with(&request));
    let (head, capsules) = server_first_frame_parts();
    let mut response = head[..head.len() - 2].to_vec();
    response.extend_from_slice(b"Veil-Offload: ?1\r\n\r\n");
    response.extend_from_slice(capsules);
    assert!(pair.server_wire.starts_with(&response));
}

#[test]
fn negotiated_offload_carries_a_super_packet_whole_both_ways() {
    let mut pair = Pair::with(offload_client(), offload_server());
    pair.pump();
    let hdr = tso_header();
    let packet = tcp_super_packet(&super_payload());
    let expected = header_and_packet(&hdr, &packet);
    // The checksum is still partial: only the receiving kernel finishes it.
    assert!(!tcp_checksum_ok(&packet));

    pair.client_wire.clear();
    pair.client.send_offload_packet(&hdr, &packet);
    pair.pump();
    // One DATAGRAM capsule: type 0, length 1 + 10 + 3040 = 3051 as a
    // two-byte varint, context ID 2, header, packet.
    let mut wire = vec![0x00, 0x4b, 0xeb, 0x02];
    wire.extend_from_slice(&expected);
    assert_eq!(pair.client_wire, wire);
    assert_eq!(offload_packets(&pair.server_out), [&expected[..]]);
    assert!(Pair::packets(&pair.server_out).is_empty());
    assert_eq!(pair.client.stats().packets_sent, 1);
    assert_eq!(pair.client.stats().bytes_sent, packet.len() as u64);
    assert_eq!(pair.server.stats().packets_received, 1);
    assert_eq!(pair.server.stats().bytes_received, packet.len() as u64);

    pair.server.send_offload_packet(&hdr, &packet);
    pair.pump();
    assert_eq!(offload_packets(&pair.client_out), [&expected[..]]);
    assert!(Pair::packets(&pair.client_out).is_empty());
    assert_eq!(pair.client.stats().packets_received, 1);
    assert_eq!(pair.server.stats().packets_sent, 1);
    assert_eq!(pair.server.stats().offload_invalid, 0);
    assert_eq!(pair.client.stats().offload_invalid, 0);

    // Plain packets still travel as plain packets.
    pair.client.send_packet(b"\x45plain");
    pair.server.send_packet(b"\x45plain");
    pair.pump();
    assert_eq!(Pair::packets(&pair.server_out), [b"\x45plain"]);
    assert_eq!(Pair::packets(&pair.client_out), [b"\x45plain"]);
}

#[test]
fn a_gateway_without_offload_gets_the_super_packet_segmented() {
    let mut pair = Pair::with(offload_client(), server_config());
    pair.pump();
    assert!(pair.client.is_established() && pair.server.is_established());
    assert!(!pair.client.offload() && !pair.server.offload());
    assert!(pair.server.request().expect("request read").offload);
    assert!(pair.server_wire.starts_with(SERVER_FIRST_FRAME));

    let payload = super_payload();
    pair.client
        .send_offload_packet(&tso_header(), &tcp_super_packet(&payload));
    pair.pump();
    assert!(offload_packets(&pair.server_out).is_empty());
    assert_segmented(&Pair::packets(&pair.server_out), &payload);
    assert_eq!(pair.client.stats().packets_sent, 3);
    assert_eq!(pair.client.stats().bytes_sent, 3 * (40 + u64::from(MSS)));
    assert_eq!(pair.server.stats().packets_received, 3);
    assert_eq!(pair.server.stats().datagrams_dropped, 0);
}

#[test]
fn a_gateway_offering_offload_to_a_client_that_did_not_ask_does_not_confirm_it() {
    let mut pair = Pair::with(client_config(), offload_server());
    pair.pump();
    assert!(pair.client.is_established() && pair.server.is_established());
    assert!(!pair.client.offload() && !pair.server.offload());
    assert!(!pair.server.request().expect("request read").offload);
    // The exact frames of a pair without offload: no Veil-Offload anywhere.
    assert!(pair.client_wire.starts_with(CLIENT_FIRST_FRAME));
    assert!(pair.server_wire.starts_with(SERVER_FIRST_FRAME));

    // The gateway segments for this client.
    let payload = super_payload();
    pair.server
        .send_offload_packet(&tso_header(), &tcp_super_packet(&payload));
    pair.pump();
    assert!(offload_packets(&pair.client_out).is_empty());
    assert_segmented(&Pair::packets(&pair.client_out), &payload);
}

#[test]
fn a_101_confirming_offload_the_client_did_not_announce_is_ignored() {
    let now = Instant::now();
    let mut client = ClientSession::new(client_config(), now).expect("config");
    let mut input = http::switching_protocols(true);
    input.extend_from_slice(server_first_frame_parts().1);
    let packet = tcp_super_packet(&super_payload());
    encode_datagram(
        OFFLOAD_CONTEXT,
        &[&tso_header().to_bytes(), &packet],
        &mut input,
    );
    client.receive(&input, now).expect("valid");
    assert!(client.is_established());
    assert!(!client.offload());
    let (_, other) = drain(|| client.poll_output());
    assert!(offload_packets(&other).is_empty());
    assert_eq!(client.stats().datagrams_dropped, 1);
}

#[test]
fn a_bad_offload_value_gets_a_400() {
    let mut input = CLIENT_FIRST_FRAME[..CLIENT_FIRST_FRAME.len() - 2].to_vec();
    input.extend_from_slice(b"Veil-Offload: yes\r\n\r\n");
    let (sent, reason) = bad_request(&input);
    assert!(sent.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{sent}");
    assert_eq!(
        reason,
        CloseReason::BadRequest(ProtoError::BadHeaderValue {
            name: "Veil-Offload",
            found: "yes".into(),
            expected: "?1 or ?0"
        })
    );
    assert!(sent.ends_with("Veil-Offload header is \"yes\", expected ?1 or ?0\n"));
}

#[test]
fn a_101_with_a_bad_offload_value_closes_the_client() {
    let now = Instant::now();
    let mut client = ClientSession::new(offload_client(), now).expect("config");
    let input = b"HTTP/1.1 101 Switching Protocols\r\n\
        Connection: Upgrade\r\n\
        Upgrade: connect-ip\r\n\
        Capsule-Protocol: ?1\r\n\
        Veil-Offload: maybe\r\n\
        \r\n";
    let error = client.receive(input, now).expect_err("bad 101");
    assert_eq!(
        error,
        ProtoError::BadHeaderValue {
            name: "Veil-Offload",
            found: "maybe".into(),
            expected: "?1 or ?0"
        }
    );
    let (_, other) = drain(|| client.poll_output());
    assert_eq!(close_reason(&other), Some(&CloseReason::Protocol(error)));
    assert!(client.is_closed() && !client.is_established());
}

#[test]
fn offload_datagrams_without_negotiation_are_dropped_and_counted() {
    let mut pair = Pair::new();
    pair.pump();
    let packet = tcp_super_packet(&super_payload());
    let mut input = Vec::new();
    encode_datagram(
        OFFLOAD_CONTEXT,
        &[&tso_header().to_bytes(), &packet],
        &mut input,
    );
    encode_ip_datagram(b"\x45after", &mut input);
    pair.server.receive(&input, pair.now).expect("valid");
    pair.client.receive(&input, pair.now).expect("valid");
    pair.pump();
    for (stats, out) in [
        (pair.server.stats(), &pair.server_out),
        (pair.client.stats(), &pair.client_out),
    ] {
        assert_eq!(stats.datagrams_dropped, 1);
        assert_eq!(stats.offload_invalid, 0);
        assert_eq!(stats.packets_received, 1);
        assert!(offload_packets(out).is_empty());
        assert_eq!(Pair::packets(out), [b"\x45after"]);
    }
    assert!(pair.client.is_established() && pair.server.is_established());
}

/// A plain packet longer than the gateway's MTU is dropped and counted,
/// as an offload datagram cut into such segments is: nothing leaves the
/// gateway longer than its MTU, and no merged run of such packets gets a
/// segment size no offload header could carry.
#[test]
fn plain_packets_longer_than_the_mtu_are_dropped_and_counted() {
    let mut pair = Pair::with(
        client_config(),
        ServerConfig {
            max_packet_len: 1400,
            ..server_config()
        },
    );
    pair.pump();
    let mut input = Vec::new();
    let mut long = vec![0x45; 1401];
    encode_ip_datagram(&long, &mut input);
    long.resize(60_040, 0);
    encode_ip_datagram(&long, &mut input);
    encode_ip_datagram(&[0x45; 1400], &mut input);
    pair.server.receive(&input, pair.now).expect("valid");
    pair.pump();
    let stats = pair.server.stats();
    assert_eq!(stats.packets_too_long, 2);
    assert_eq!(stats.packets_received, 1);
    assert_eq!(Pair::packets(&pair.server_out), [&[0x45; 1400][..]]);
    assert!(pair.server.is_established(), "the session goes on");
}

#[test]
fn invalid_offload_datagrams_are_dropped_and_counted() {
    let mut pair = Pair::with(offload_client(), offload_server());
    pair.pump();
    let hdr = tso_header();
    let packet = tcp_super_packet(&super_payload());
    let mut input = Vec::new();
    // GSO type 3 (SCTP in virtio) is not one veil takes.
    let unknown_gso = VnetHdr { gso_type: 3, ..hdr };
    encode_datagram(
        OFFLOAD_CONTEXT,
        &[&unknown_gso.to_bytes(), &packet],
        &mut input,
    );
    // Too short to hold the header.
    encode_datagram(OFFLOAD_CONTEXT, &[&[1, 1, 40, 0, 0]], &mut input);
    // A segment size that would cut the packet into thousands.
    let tiny = VnetHdr { gso_size: 1, ..hdr };
    encode_datagram(OFFLOAD_CONTEXT, &[&tiny.to_bytes(), &packet], &mut input);
    // Then good ones.
    encode_datagram(OFFLOAD_CONTEXT, &[&hdr.to_bytes(), &packet], &mut input);
    encode_ip_datagram(b"\x45after", &mut input);
    for end in ["server", "client"] {
        let (result, stats, out) = if end == "server" {
            let result = pair.server.receive(&input, pair.now);
            pair.pump();
            (result, *pair.server.stats(), &pair.server_out)
        } else {
            let result = pair.client.receive(&input, pair.now);
            pair.pump();
            (result, *pair.client.stats(), &pair.client_out)
        };
        assert_eq!(result, Ok(()), "{end}");
        assert_eq!(stats.offload_invalid, 3, "{end}");
        assert_eq!(stats.datagrams_dropped, 0, "{end}");
        assert_eq!(stats.packets_received, 2, "{end}");
        assert_eq!(
            offload_packets(out),
            [&header_and_packet(&hdr, &packet)[..]],
            "{end}"
        );
        assert_eq!(Pair::packets(out), [b"\x45after"], "{end}");
        assert!(close_reason(out).is_none(), "{end}");
    }
    assert!(pair.client.is_established() && pair.server.is_established());
}

#[test]
fn offload_packets_before_the_upgrade_are_not_sent() {
    let mut pair = Pair::with(offload_client(), offload_server());
    let hdr = tso_header();
    let packet = tcp_super_packet(&super_payload());
    pair.client.send_offload_packet(&hdr, &packet);
    pair.server.send_offload_packet(&hdr, &packet);
    pair.pump();
    assert!(pair.client.offload() && pair.server.offload());
    assert_eq!(pair.client.stats().packets_not_sent, 1);
    assert_eq!(pair.server.stats().packets_not_sent, 1);
    assert_eq!(pair.client.stats().packets_sent, 0);
    assert_eq!(pair.server.stats().packets_sent, 0);
    assert!(offload_packets(&pair.client_out).is_empty());
    assert!(offload_packets(&pair.server_out).is_empty());
    // Without offload too: nothing is segmented for a tunnel not yet up.
    let mut pair = Pair::new();
    pair.client.send_offload_packet(&hdr, &packet);
    pair.pump();
    assert_eq!(pair.client.stats().packets_not_sent, 1);
    assert_eq!(pair.client.stats().packets_sent, 0);
    assert!(Pair::packets(&pair.server_out).is_empty());
}

/// A gateway that carries IPv6: the client's /128 beside its /32.
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7665, 0x696c, 0, 0, 0, 0x0a4d, 0x0002);

fn dual_stack_config() -> ServerConfig {
    ServerConfig {
        assigned6: Some(VIP6),
        routes: vec![IpAddressRange::ALL_IPV4, IpAddressRange::ALL_IPV6],
        ..server_config()
    }
}

#[test]
fn a_dual_stack_gateway_assigns_both_addresses_in_one_capsule() {
    let mut pair = Pair::with(client_config(), dual_stack_config());
    pair.pump();
    let v6 = VIP6.octets();
    // ADDRESS_ASSIGN, 26 bytes: 10.77.0.2/32 then fd00:7665:696c::a4d:2/128,
    // both Request ID 0.
    let mut assign = b"\x01\x1a\x00\x04\x0a\x4d\x00\x02\x20\x00\x06".to_vec();
    assign.extend_from_slice(&v6);
    assign.push(128);
    // ROUTE_ADVERTISEMENT, 44 bytes: all of IPv4, then all of IPv6.
    let mut routes = b"\x03\x2c\x04\x00\x00\x00\x00\xff\xff\xff\xff\x00\x06".to_vec();
    routes.extend_from_slice(&[0; 16]);
    routes.extend_from_slice(&[0xff; 16]);
    routes.push(0);
    // The answer to the client's request for IPv4 repeats the IPv6
    // address: each ADDRESS_ASSIGN is the full set.
    let mut answer = b"\x01\x1a\x01\x04\x0a\x4d\x00\x02\x20\x00\x06".to_vec();
    answer.extend_from_slice(&v6);
    answer.push(128);
    let head = http::switching_protocols(false);
    let expected = [&head[..], &assign, &routes, &answer].concat();
    assert_eq!(pair.server_wire, expected);

    assert_eq!(pair.client.assigned(), Some((VIP, 32)));
    assert_eq!(pair.client.assigned6(), Some((VIP6, 128)));
    let assigned: Vec<&Output> = pair
        .client_out
        .iter()
        .filter(|o| matches!(o, Output::Assigned { .. } | Output::Assigned6 { .. }))
        .collect();
    assert_eq!(
        assigned,
        [
            &Output::Assigned {
                addr: VIP,
                prefix: 32
            },
            &Output::Assigned6 {
                addr: VIP6,
                prefix: 128
            }
        ],
        "each reported once, IPv4 first"
    );
    assert!(pair.client_out.contains(&Output::Routes(vec![
        IpAddressRange::ALL_IPV4,
        IpAddressRange::ALL_IPV6
    ])));
}

/// The client asks for any IPv6 address (Request ID `id`): what the
/// gateway answers, and the ADDRESS_ASSIGN that answer should be: `v6`
/// for the request, then the IPv4 address unsolicited.
fn ask_for_ipv6(pair: &mut Pair, id: u64, v6: Ipv6Addr) -> (Vec<u8>, Vec<u8>) {
    pair.server_wire.clear();
    let mut request = Vec::new();
    Capsule::AddressRequest(vec![RequestedAddress {
        request_id: id,
        ip: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        prefix_len: 128,
    }])
    .encode(&mut request)
    .unwrap();
    pair.server.receive(&request, pair.now).unwrap();
    pair.pump();
    let mut expected = Vec::new();
    Capsule::AddressAssign(vec![
        AssignedAddress {
            request_id: id,
            ip: IpAddr::V6(v6),
            prefix_len: 128,
        },
        AssignedAddress {
            request_id: 0,
            ip: IpAddr::V4(VIP),
            prefix_len: 32,
        },
    ])
    .encode(&mut expected)
    .unwrap();
    (std::mem::take(&mut pair.server_wire), expected)
}

#[test]
fn an_ipv4_only_gateway_assigns_no_ipv6_and_refuses_a_request_for_it() {
    let mut pair = Pair::new();
    pair.pump();
    assert_eq!(pair.client.assigned6(), None);
    assert!(!pair
        .client_out
        .iter()
        .any(|o| matches!(o, Output::Assigned6 { .. })));
    // A client asking for IPv6 gets the RFC's "not assigned" (::/128).
    let (answer, expected) = ask_for_ipv6(&mut pair, 7, Ipv6Addr::UNSPECIFIED);
    assert_eq!(answer, expected);
}

#[test]
fn a_dual_stack_gateway_answers_a_request_for_ipv6_with_its_address() {
    let mut pair = Pair::with(client_config(), dual_stack_config());
    pair.pump();
    let (answer, expected) = ask_for_ipv6(&mut pair, 9, VIP6);
    assert_eq!(answer, expected);
    // The same addresses again: nothing new to report.
    let reports = pair
        .client_out
        .iter()
        .filter(|o| matches!(o, Output::Assigned6 { .. }))
        .count();
    assert_eq!(reports, 1);
}

#[test]
fn an_unassignable_ipv6_address_is_refused_at_start() {
    for bad in [
        Ipv6Addr::UNSPECIFIED,
        Ipv6Addr::LOCALHOST,
        "ff02::1".parse().unwrap(),
    ] {
        let config = ServerConfig {
            assigned6: Some(bad),
            ..server_config()
        };
        assert_eq!(
            ServerSession::new(config, Instant::now()).map(|_| ()),
            Err(ProtoError::UnassignableAddress {
                addr: IpAddr::V6(bad)
            })
        );
    }
}
