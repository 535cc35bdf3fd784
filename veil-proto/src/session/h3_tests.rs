//! Both ends over HTTP/3, back to back in memory: the request stream's
//! bytes one way, HTTP datagrams the other, on virtual time.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use super::*;
use crate::{
    capsule::{Capsule, IpAddressRange},
    gso::VnetHdr,
    h3,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const SECOND: Duration = Duration::from_secs(1);

struct Pair {
    client: ClientSession,
    server: ServerSession,
    now: Instant,
    client_out: Vec<Output>,
    server_out: Vec<Output>,
    client_wire: Vec<u8>,
    server_wire: Vec<u8>,
}

fn split(outputs: Vec<Output>) -> (Vec<u8>, Vec<Vec<u8>>, Vec<Output>) {
    let (mut bytes, mut datagrams, mut other) = (Vec::new(), Vec::new(), Vec::new());
    for o in outputs {
        match o {
            Output::Send(b) => bytes.extend_from_slice(&b),
            Output::Datagram(d) => datagrams.push(d),
            o => other.push(o),
        }
    }
    (bytes, datagrams, other)
}

fn drain(mut poll: impl FnMut() -> Option<Output>) -> Vec<Output> {
    std::iter::from_fn(&mut poll).collect()
}

impl Pair {
    fn new() -> Self {
        let now = Instant::now();
        Pair {
            client: ClientSession::new_h3(ClientConfig::new("gw.example"), now, 0).unwrap(),
            server: ServerSession::new_h3(ServerConfig::new(VIP), now, 0).unwrap(),
            now,
            client_out: Vec::new(),
            server_out: Vec::new(),
            client_wire: Vec::new(),
            server_wire: Vec::new(),
        }
    }

    fn pump(&mut self) {
        loop {
            let (c_bytes, c_dgrams, c_other) = split(drain(|| self.client.poll_output()));
            let (s_bytes, s_dgrams, s_other) = split(drain(|| self.server.poll_output()));
            self.client_out.extend(c_other);
            self.server_out.extend(s_other);
            if c_bytes.is_empty()
                && s_bytes.is_empty()
                && c_dgrams.is_empty()
                && s_dgrams.is_empty()
            {
                return;
            }
            self.client_wire.extend_from_slice(&c_bytes);
            self.server_wire.extend_from_slice(&s_bytes);
            let _ = self.server.receive(&c_bytes, self.now);
            let _ = self.client.receive(&s_bytes, self.now);
            for d in c_dgrams {
                let packet = self.server.receive_datagram(&d, self.now);
                self.server_out
                    .extend(packet.map(|p| Output::Packet(p.to_vec())));
            }
            for d in s_dgrams {
                let packet = self.client.receive_datagram(&d, self.now);
                self.client_out
                    .extend(packet.map(|p| Output::Packet(p.to_vec())));
            }
        }
    }

    fn packets(outputs: &mut Vec<Output>) -> Vec<Vec<u8>> {
        let mut packets = Vec::new();
        outputs.retain(|o| match o {
            Output::Packet(p) => {
                packets.push(p.clone());
                false
            }
            _ => true,
        });
        packets
    }
}

#[test]
fn the_handshake_assigns_the_address_and_its_first_bytes_are_the_documented_ones() {
    let mut p = Pair::new();
    p.pump();
    assert!(p.client.is_established() && p.server.is_established());
    assert_eq!(p.client.assigned(), Some((VIP, 32)));
    assert_eq!(p.server.request().unwrap().host, "gw.example");
    assert!(!p.client.offload() && !p.server.offload());
    // The client's stream: the request, then one DATA frame with its
    // ADDRESS_REQUEST.
    let request = h3::request(
        "gw.example",
        crate::http::WELL_KNOWN_PATH,
        DEFAULT_KEEPALIVE_INTERVAL,
    );
    assert_eq!(&p.client_wire[..request.len()], &request[..]);
    assert_eq!(
        &p.client_wire[request.len()..],
        b"\x00\x09\x02\x07\x01\x04\x00\x00\x00\x00\x20"
    );
    // The gateway's: 200, then one DATA frame with ADDRESS_ASSIGN and
    // ROUTE_ADVERTISEMENT (as over HTTP/1.1), then the answer.
    let ok = h3::ok_response();
    assert_eq!(&p.server_wire[..ok.len()], &ok[..]);
    assert_eq!(
        &p.server_wire[ok.len()..ok.len() + 2 + 21],
        b"\x00\x15\x01\x07\x00\x04\x0a\x4d\x00\x02\x20\
          \x03\x0a\x04\x00\x00\x00\x00\xff\xff\xff\xff\x00"
    );
    assert!(p
        .client_out
        .contains(&Output::Routes(vec![IpAddressRange::ALL_IPV4])));
}

#[test]
fn packets_travel_as_http_datagrams_with_context_zero() {
    let mut p = Pair::new();
    p.pump();
    p.client.send_packet(b"\x45up");
    let datagram = drain(|| p.client.poll_output());
    assert_eq!(datagram, vec![Output::Datagram(b"\x00\x00\x45up".to_vec())]);
    let up = p.server.receive_datagram(b"\x00\x00\x45up", p.now);
    assert_eq!(up, Some(&b"\x45up"[..]));
    p.server.send_packet(b"\x45down");
    p.pump();
    assert_eq!(Pair::packets(&mut p.client_out), vec![b"\x45down".to_vec()]);
    assert_eq!(p.client.stats().packets_received, 1);
}

#[test]
fn a_super_packet_reaches_the_client_as_one_datagram_per_segment() {
    use super::tests::{assert_segmented, super_payload, tcp_super_packet, tso_header};
    let mut p = Pair::new();
    p.pump();
    let payload = super_payload();
    p.server
        .send_offload_packet(&tso_header(), &tcp_super_packet(&payload));
    let (_, datagrams, _) = split(drain(|| p.server.poll_output()));
    assert_eq!(datagrams.len(), 3, "one datagram per segment");
    for d in &datagrams {
        assert_eq!(&d[..2], b"\x00\x00", "Quarter Stream ID 0, context 0");
        // Built in place behind the prefix: no spare room carried along.
        assert_eq!(d.capacity(), d.len());
    }
    let segments: Vec<&[u8]> = datagrams
        .iter()
        .filter_map(|d| p.client.receive_datagram(d, p.now))
        .collect();
    assert_segmented(&segments, &payload);
}

#[test]
fn a_short_last_segment_and_a_checksum_only_packet_go_as_datagrams_of_their_size() {
    use super::tests::{ip_checksum_ok, tcp_checksum_ok, tcp_super_packet, tso_header};
    let mut p = Pair::new();
    p.pump();
    // Two full segments and a short one.
    let payload: Vec<u8> = (0..2 * 1000 + 300).map(|i| (i % 251) as u8).collect();
    p.server
        .send_offload_packet(&tso_header(), &tcp_super_packet(&payload));
    // One packet whose checksum the sender's kernel left to the NIC.
    let small = tcp_super_packet(b"just one");
    let csum_only = VnetHdr {
        gso_type: VnetHdr::GSO_NONE,
        gso_size: 0,
        ..tso_header()
    };
    p.server.send_offload_packet(&csum_only, &small);
    let (_, datagrams, _) = split(drain(|| p.server.poll_output()));
    let sizes: Vec<usize> = datagrams.iter().map(Vec::len).collect();
    assert_eq!(sizes, [2 + 1040, 2 + 1040, 2 + 340, 2 + 48]);
    let mut joined = Vec::new();
    for d in &datagrams {
        assert_eq!(d.capacity(), d.len(), "no spare room carried along");
        let packet = p.client.receive_datagram(d, p.now).expect("a packet");
        assert!(ip_checksum_ok(packet) && tcp_checksum_ok(packet));
        joined.extend_from_slice(&packet[40..]);
    }
    assert_eq!(joined[..payload.len()], payload[..]);
    assert_eq!(&joined[payload.len()..], b"just one");
}

#[test]
fn a_segment_too_large_for_a_datagram_is_fragmented_by_the_gateway() {
    use super::tests::{super_payload, tcp_super_packet, tso_header};
    let mut p = Pair::new();
    p.pump();
    p.server.set_max_datagram(Some(600));
    p.server
        .send_offload_packet(&tso_header(), &tcp_super_packet(&super_payload()));
    let (_, datagrams, _) = split(drain(|| p.server.poll_output()));
    assert!(datagrams.len() > 3, "each segment in fragments");
    assert!(datagrams.iter().all(|d| d.len() <= 600));
    assert_eq!(p.server.stats().packets_sent, datagrams.len() as u64);
    // Every byte of the three segments is there, in fragments.
    let carried: usize = datagrams.iter().map(|d| d.len() - 2 - 20).sum();
    assert_eq!(carried, 3 * (20 + 1000));
}

#[test]
fn datagrams_for_another_request_or_context_are_dropped_and_counted() {
    let mut p = Pair::new();
    // Before the request: the tunnel is not up.
    assert_eq!(p.server.receive_datagram(b"\x00\x00\x45early", p.now), None);
    p.pump();
    for bad in [
        &b"\x01\x00\x45x"[..],
        b"\x00\x02\x45x",
        b"\x00",
        b"",
        b"\x40",
    ] {
        assert_eq!(p.server.receive_datagram(bad, p.now), None);
    }
    // The same Quarter Stream ID in a longer encoding is the same request.
    let ok = p.server.receive_datagram(b"\x40\x00\x00\x45ok", p.now);
    assert_eq!(ok, Some(&b"\x45ok"[..]));
    p.pump();
    assert!(
        Pair::packets(&mut p.server_out).is_empty(),
        "nothing queued"
    );
    assert_eq!(p.server.stats().datagrams_dropped, 6);
    assert!(!p.server.is_closed());
}

#[test]
fn a_datagram_longer_than_the_mtu_is_dropped_and_counted() {
    let mut p = Pair::new();
    p.pump();
    let mut long = b"\x00\x00".to_vec();
    long.resize(2 + usize::from(DEFAULT_MAX_PACKET_LEN) + 1, 0x45);
    assert_eq!(p.server.receive_datagram(&long, p.now), None);
    long.pop();
    assert_eq!(p.server.receive_datagram(&long, p.now), Some(&long[2..]));
    assert_eq!(p.server.stats().packets_too_long, 1);
    assert_eq!(p.server.stats().packets_received, 1);
}

#[test]
fn a_refusal_reaches_the_client_with_its_message() {
    let mut p = Pair::new();
    p.server.refuse(503, "the gateway is full");
    p.pump();
    assert_eq!(
        p.client.close_reason(),
        Some(&CloseReason::Refused {
            status: 503,
            reason: "Service Unavailable".into(),
            message: Some("the gateway is full".into()),
        })
    );
}

#[test]
fn a_request_that_is_not_connect_ip_gets_400_with_the_reason() {
    let now = Instant::now();
    let mut server = ServerSession::new_h3(ServerConfig::new(VIP), now, 0).unwrap();
    let mut block = Vec::new();
    h3::encode_fields(
        &[
            h3::Field::new(":method", "GET"),
            h3::Field::new(":scheme", "https"),
        ],
        &mut block,
    );
    let mut frame = vec![0x01, block.len() as u8];
    frame.extend_from_slice(&block);
    assert!(server.receive(&frame, now).is_err());
    let (bytes, _, other) = split(drain(|| server.poll_output()));
    assert!(matches!(
        other.last(),
        Some(Output::Close {
            reason: CloseReason::BadRequest(_)
        })
    ));
    let mut client = ClientSession::new_h3(ClientConfig::new("gw"), now, 0).unwrap();
    drain(|| client.poll_output());
    let _ = client.receive(&bytes, now);
    client.receive_eof();
    assert!(matches!(
        client.close_reason(),
        Some(CloseReason::Refused { status: 400, message: Some(m), .. }) if m.contains(":method")
    ));
}

#[test]
fn data_before_the_request_or_a_settings_frame_closes_the_session() {
    let now = Instant::now();
    let mut server = ServerSession::new_h3(ServerConfig::new(VIP), now, 0).unwrap();
    assert!(server.receive(b"\x00\x01\x00", now).is_err());
    let mut p = Pair::new();
    p.pump();
    assert!(p.server.receive(b"\x04\x00", p.now).is_err());
    assert!(p.server.is_closed());
}

#[test]
fn keepalive_and_capsules_ride_data_frames() {
    let mut p = Pair::new();
    p.pump();
    p.now += DEFAULT_KEEPALIVE_INTERVAL + SECOND;
    p.client.handle_timeout(p.now);
    p.pump();
    assert_eq!(p.client.stats().pongs_received, 1);
    // A capsule split across DATA frames and stream reads arrives whole.
    let mut ping = Vec::new();
    Capsule::Ping(9).encode(&mut ping).unwrap();
    let mut stream = Vec::new();
    for half in ping.chunks(ping.len() / 2 + 1) {
        h3::data_frame_header(half.len(), &mut stream);
        stream.extend_from_slice(half);
    }
    for b in stream.chunks(3) {
        p.server.receive(b, p.now).unwrap();
    }
    p.pump();
    assert_eq!(p.server.stats().pongs_sent, 2);
    // Silence past the timeout is a dead peer, as over TCP.
    p.now += DEFAULT_KEEPALIVE_TIMEOUT + SECOND;
    p.server.handle_timeout(p.now);
    assert!(matches!(
        p.server.close_reason(),
        Some(CloseReason::PeerDead { .. })
    ));
}

#[test]
fn a_packet_with_df_too_large_for_a_datagram_gets_frag_needed_on_the_client_and_fragments_on_the_gateway(
) {
    let mut p = Pair::new();
    p.pump();
    // An IPv4/TCP packet of 1400 bytes with DF, from 10.77.0.2 to 198.18.0.2.
    let mut packet = vec![0u8; 1400];
    packet[..20].copy_from_slice(&[
        0x45, 0, 0x05, 0x78, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 77, 0, 2, 198, 18, 0, 2,
    ]);
    p.client.set_max_datagram(Some(1202));
    p.client.send_packet(&packet);
    let out = drain(|| p.client.poll_output());
    let [Output::Packet(icmp)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!((icmp[20], icmp[21]), (3, 4), "fragmentation needed");
    assert_eq!(
        u16::from_be_bytes([icmp[26], icmp[27]]),
        1200,
        "next-hop MTU"
    );
    assert_eq!(&icmp[12..16], &[198, 18, 0, 2]);
    assert_eq!(&icmp[16..20], &[10, 77, 0, 2]);
    assert_eq!(crate::packet::checksum(&icmp[20..]), 0);
    assert_eq!(p.client.stats().packets_not_sent, 1);
    // One that fits goes as before.
    p.client.send_packet(&packet[..1200]);
    assert!(matches!(
        &drain(|| p.client.poll_output())[..],
        [Output::Datagram(d)] if d.len() == 1202
    ));
    // The gateway, which cannot tell the sender, fragments it over DF.
    p.server.set_max_datagram(Some(1202));
    p.server.send_packet(&packet);
    assert_eq!(drain(|| p.server.poll_output()).len(), 2);
}

#[test]
fn a_packet_without_df_too_large_for_a_datagram_is_fragmented_on_either_end() {
    let mut p = Pair::new();
    p.pump();
    // A UDP reply of 1500 bytes without DF, from 198.18.0.2 to 10.77.0.2.
    let mut packet = vec![7u8; 1500];
    packet[..20].copy_from_slice(&[
        0x45, 0, 0x05, 0xdc, 0, 1, 0, 0, 64, 17, 0, 0, 198, 18, 0, 2, 10, 77, 0, 2,
    ]);
    p.server.set_max_datagram(Some(1202));
    p.server.send_packet(&packet);
    let out = drain(|| p.server.poll_output());
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out
        .iter()
        .all(|o| matches!(o, Output::Datagram(d) if d.len() <= 1202)));
    assert_eq!(p.server.stats().packets_sent, 2);
}

#[test]
fn an_ipv6_packet_too_large_for_a_datagram_gets_packet_too_big_on_the_client() {
    let mut p = Pair::new();
    p.pump();
    // An IPv6/TCP packet of 1400 bytes from the client's ULA to 2001:2::2.
    let src: std::net::Ipv6Addr = "fd00:7665:696c::a4d:2".parse().unwrap();
    let dst: std::net::Ipv6Addr = "2001:2::2".parse().unwrap();
    let mut packet = vec![0u8; 1400];
    packet[..8].copy_from_slice(&[0x60, 0, 0, 0, 0x05, 0x50, 6, 64]);
    packet[8..24].copy_from_slice(&src.octets());
    packet[24..40].copy_from_slice(&dst.octets());
    p.client.set_max_datagram(Some(1302));
    p.client.send_packet(&packet);
    let out = drain(|| p.client.poll_output());
    let [Output::Packet(icmp)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(icmp[40], 2, "Packet Too Big");
    assert_eq!(
        u32::from_be_bytes([icmp[44], icmp[45], icmp[46], icmp[47]]),
        1300,
        "MTU"
    );
    assert_eq!(&icmp[8..24], &dst.octets(), "from the destination");
    assert_eq!(&icmp[24..40], &src.octets(), "to the sender");
    assert_eq!(crate::packet6::checksum6(dst, src, 58, &icmp[40..]), 0);
    assert_eq!(p.client.stats().packets_not_sent, 1);
}

#[test]
fn an_ipv6_fragment_too_large_for_a_datagram_is_cut_further_a_whole_packet_is_not() {
    let mut p = Pair::new();
    p.pump();
    // A reply's first fragment of 1496 bytes (a remote on a 1500-byte
    // path), from 2001:2::2 to the client's ULA.
    let src: std::net::Ipv6Addr = "2001:2::2".parse().unwrap();
    let dst: std::net::Ipv6Addr = "fd00:7665:696c::a4d:2".parse().unwrap();
    let mut fragment = vec![7u8; 1496];
    fragment[..8].copy_from_slice(&[0x60, 0, 0, 0, 0x05, 0xb0, 44, 64]);
    fragment[8..24].copy_from_slice(&src.octets());
    fragment[24..40].copy_from_slice(&dst.octets());
    fragment[40..48].copy_from_slice(&[17, 0, 0, 1, 0, 0, 0, 9]);
    p.server.set_max_datagram(Some(1302));
    p.server.send_packet(&fragment);
    let out = drain(|| p.server.poll_output());
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out
        .iter()
        .all(|o| matches!(o, Output::Datagram(d) if d.len() <= 1302)));
    assert_eq!(p.server.stats().packets_sent, 2);
    // The same bytes as a whole UDP packet: IPv6 is never fragmented on
    // the way, and the gateway sends no Packet Too Big: lost.
    let mut whole = fragment.clone();
    whole[6] = 17;
    p.server.send_packet(&whole);
    assert!(drain(|| p.server.poll_output()).is_empty());
    assert_eq!(p.server.stats().packets_not_sent, 1);
}
