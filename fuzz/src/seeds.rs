//! The seed corpus: a handful of real inputs per target, made with veil's
//! own encoders and state machines so that fuzzing starts from what the
//! code sees in use. Deterministic: `cargo xtask fuzz --seeds` rewrites
//! `fuzz/corpus/` with the same bytes unless the protocol changed.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use libfuzzer_sys::arbitrary::Unstructured;
use veil_proto::{
    capsule::{
        self, svc_key, AssignedAddress, Capsule, DnsConfiguration, DomainName, IpAddressRange,
        Nameserver, RequestedAddress, SvcParam, OFFLOAD_CONTEXT,
    },
    gro::Coalescer,
    gso::VnetHdr,
    http,
    session::{ClientConfig, ClientSession, Output, ServerConfig, ServerSession},
};

use crate::{
    gro_ops::{Generator, Op},
    ip::{self, joined, payload, Builder},
    Rng,
};

/// One seed: the target it is for, a file name, the bytes.
pub struct Seed {
    pub target: &'static str,
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

pub fn all() -> Vec<Seed> {
    let mut seeds = Vec::new();
    capsule_decoder(&mut seeds);
    http_heads(&mut seeds);
    offload(&mut seeds);
    coalescer(&mut seeds);
    session(&mut seeds);
    client_packet(&mut seeds);
    client_packet6(&mut seeds);
    seeds
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

fn seed(out: &mut Vec<Seed>, target: &'static str, name: &'static str, parts: &[&[u8]]) {
    out.push(Seed {
        target,
        name,
        bytes: parts.concat(),
    });
}

fn encode(capsules: &[Capsule]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in capsules {
        c.encode(&mut out).expect("seed capsules encode");
    }
    out
}

/// The packets the seeds carry: a UDP datagram and a TCP segment from the
/// client, and a TCP super-packet with its offload header.
fn client_udp() -> Vec<u8> {
    Builder {
        src: VIP.octets(),
        dst: [198, 18, 0, 2],
        sport: 40000,
        dport: 53,
        ..Builder::udp()
    }
    .complete(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00")
}

fn client_syn() -> Vec<u8> {
    Builder {
        src: VIP.octets(),
        dst: [198, 18, 0, 2],
        sport: 40001,
        dport: 80,
        flags: ip::SYN,
        tcp_options: vec![2, 4, 5, 0xb4],
        ..Builder::tcp()
    }
    .complete(&[])
}

/// What a full-tunnel gateway announces, and a richer configuration: an
/// encrypted resolver (DoT) for internal and search domains.
fn dns_configs() -> Vec<DnsConfiguration> {
    let name = |s: &str| DomainName::new(s).expect("valid name");
    vec![
        DnsConfiguration::full_tunnel(vec![Ipv4Addr::new(10, 77, 0, 1)]),
        DnsConfiguration {
            nameservers: vec![Nameserver {
                priority: 2,
                ipv4: vec![Ipv4Addr::new(198, 18, 0, 53)],
                ipv6: vec![Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x53)],
                auth_domain: name("dns.example"),
                params: vec![
                    SvcParam {
                        key: svc_key::ALPN,
                        value: b"\x03dot".to_vec(),
                    },
                    SvcParam {
                        key: svc_key::PORT,
                        value: 853u16.to_be_bytes().to_vec(),
                    },
                ],
            }],
            internal_domains: vec![name("corp.example"), name("_svc.example.")],
            search_domains: vec![name("example")],
        },
    ]
}

fn super_packet() -> (VnetHdr, Vec<u8>) {
    let b = Builder {
        flags: ip::ACK | ip::PSH,
        tcp_options: ip::TS_OPTION.to_vec(),
        ..Builder::tcp()
    };
    (b.offload_hdr(Some(100)), b.partial(&payload(250, 0)))
}

/// A TCPv6 super-packet of three segments: [`super_packet`]'s TCP header
/// and payload behind an IPv6 header, its partial checksum the IPv6
/// pseudo-header's.
fn super_packet6() -> (VnetHdr, Vec<u8>) {
    let b = Builder::tcp();
    let v4 = b.partial(&payload(250, 7));
    let l4 = &v4[b.ihl()..];
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    p.extend_from_slice(&[6, 64]);
    p.extend_from_slice(&[
        0xfd, 0, 0x76, 0x65, 0x69, 0x6c, 0, 0, 0, 0, 0, 0, 10, 77, 0, 2,
    ]);
    p.extend_from_slice(&[0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    p.extend_from_slice(l4);
    let mut pseudo = p[8..40].to_vec();
    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 6]);
    let partial = ip::ones_sum(&pseudo);
    p[56..58].copy_from_slice(&partial.to_be_bytes());
    let hdr = VnetHdr {
        flags: VnetHdr::F_NEEDS_CSUM,
        gso_type: VnetHdr::GSO_TCPV6,
        hdr_len: (40 + b.l4_header_len()) as u16,
        gso_size: 100,
        csum_start: 40,
        csum_offset: 16,
    };
    (hdr, p)
}

fn capsule_decoder(out: &mut Vec<Seed>) {
    const T: &str = "capsule_decoder";
    // Cut seeds (two bytes) and limits (one byte) come first.
    let greeting = encode(&[
        Capsule::AddressAssign(vec![AssignedAddress {
            request_id: 0,
            ip: IpAddr::V4(VIP),
            prefix_len: 32,
        }]),
        Capsule::RouteAdvertisement(vec![IpAddressRange::ALL_IPV4]),
    ]);
    seed(out, T, "greeting-bytewise", &[&[0, 0, 0], &greeting]);

    let mut stream = encode(&[Capsule::AddressRequest(vec![RequestedAddress {
        request_id: 1,
        ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        prefix_len: 32,
    }])]);
    capsule::encode_ip_datagram(&client_udp(), &mut stream);
    capsule::encode_ip_datagram(&client_syn(), &mut stream);
    stream.extend(encode(&[Capsule::Ping(7), Capsule::Pong(7)]));
    seed(out, T, "client-stream", &[&[1, 0, 0], &stream]);

    let (hdr, packet) = super_packet();
    let mut offload = Vec::new();
    capsule::encode_datagram(OFFLOAD_CONTEXT, &[&hdr.to_bytes(), &packet], &mut offload);
    seed(out, T, "offload-datagram", &[&[2, 0, 0], &offload]);

    let lists = encode(&[
        Capsule::AddressAssign(vec![
            AssignedAddress {
                request_id: 1,
                ip: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 0)),
                prefix_len: 24,
            },
            AssignedAddress {
                request_id: 2,
                ip: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                prefix_len: 128,
            },
        ]),
        // In the order RFC 9484 §4.7.3 requires: by family, protocol, start.
        Capsule::RouteAdvertisement(vec![
            IpAddressRange {
                start: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 0)),
                end: IpAddr::V4(Ipv4Addr::new(198, 19, 255, 255)),
                ip_protocol: 0,
            },
            IpAddressRange {
                start: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)),
                end: IpAddr::V4(Ipv4Addr::new(10, 255, 255, 255)),
                ip_protocol: 6,
            },
            IpAddressRange {
                start: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0)),
                end: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xffff)),
                ip_protocol: 17,
            },
        ]),
    ]);
    seed(out, T, "address-and-route-lists", &[&[3, 0, 0], &lists]);

    // An unknown type (skipped unbuffered), a non-minimal varint header, a
    // truncated tail; with a small skip limit.
    let unknown = [
        &[0x52, 0x34, 0x05][..],
        b"hello",
        &[0x40, 0x00, 0x40, 0x02, 0x00, 0x45],
    ];
    seed(
        out,
        T,
        "unknown-and-long-varints",
        &[&[6, 1, 0x04], &unknown.concat()],
    );

    seed(
        out,
        T,
        "dns-assign",
        &[&[5, 0, 0], &encode(&[Capsule::DnsAssign(dns_configs())])],
    );

    // A DATAGRAM declared longer than the 1500-byte limit.
    seed(
        out,
        T,
        "too-large",
        &[&[3, 1, 0x01], &[0x00, 0x47, 0xd0, 0x00], &[0; 32]],
    );
}

/// A real client and gateway's handshake bytes, and the gateway's bytes
/// right after it.
struct Exchange {
    request: Vec<u8>,
    response: Vec<u8>,
}

/// With `offload`, the gateway also announces DNS (DNS_ASSIGN in its
/// greeting).
fn exchange(offload: bool, keepalive: Duration) -> Exchange {
    let now = Instant::now();
    let mut config = ClientConfig::new("gateway.example");
    config.offload = offload;
    config.keepalive_interval = keepalive;
    let mut client = ClientSession::new(config, now).expect("client");
    let mut server_config = ServerConfig::new(VIP);
    server_config.offload = offload;
    if offload {
        server_config.dns = dns_configs();
    }
    let mut server = ServerSession::new(server_config, now).expect("server");
    let request = sent(client.poll_output());
    server.receive(&request, now).expect("request accepted");
    let response = sent(server.poll_output());
    Exchange { request, response }
}

fn sent(output: Option<Output>) -> Vec<u8> {
    match output {
        Some(Output::Send(bytes)) => bytes,
        other => panic!("expected bytes to send, got {other:?}"),
    }
}

fn http_heads(out: &mut Vec<Seed>) {
    const T: &str = "http_heads";
    let plain = exchange(false, Duration::from_secs(15));
    let offload = exchange(true, Duration::from_secs(1));
    seed(out, T, "request", &[&plain.request]);
    seed(out, T, "request-offload", &[&offload.request]);
    seed(
        out,
        T,
        "request-lf-absolute",
        &[b"GET https://gw.example/.well-known/masque/ip/*/*/ HTTP/1.1\nhost:gw.example\nconnection: keep-alive, upgrade\nupgrade: CONNECT-IP\ncapsule-protocol: ?1;x=1\ncontent-length: 0\n\n"],
    );
    seed(out, T, "response-101-greeting", &[&plain.response]);
    seed(out, T, "response-101-offload", &[&offload.response]);
    seed(
        out,
        T,
        "response-100-then-101",
        &[b"HTTP/1.1 100 Continue\r\n\r\n", &plain.response],
    );
    // Interim responses up to the head limit, which counts them all.
    let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
    seed(
        out,
        T,
        "response-100-flood",
        &[&interim.repeat(http::MAX_HEADER_LEN / interim.len() + 1)],
    );
    seed(
        out,
        T,
        "response-403",
        &[&http::refusal(
            403,
            "Forbidden",
            "client certificate revoked",
        )],
    );
    seed(
        out,
        T,
        "tls-record",
        &[&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]],
    );
}

fn offload(out: &mut Vec<Seed>) {
    const T: &str = "offload";
    let (hdr, packet) = super_packet();
    seed(out, T, "tcp-tso-3-segments", &[&joined(&hdr, &packet)]);
    let (hdr6, packet6) = super_packet6();
    seed(out, T, "tcp6-tso-3-segments", &[&joined(&hdr6, &packet6)]);

    let ecn = Builder {
        flags: ip::ACK | ip::CWR | ip::FIN,
        ..Builder::tcp()
    };
    let mut ecn_hdr = ecn.offload_hdr(Some(64));
    ecn_hdr.gso_type |= VnetHdr::GSO_ECN;
    seed(
        out,
        T,
        "tcp-tso-ecn-fin",
        &[&joined(&ecn_hdr, &ecn.partial(&payload(200, 9)))],
    );

    let options = Builder {
        ip_options: vec![1, 1, 1, 0],
        ..Builder::tcp()
    };
    seed(
        out,
        T,
        "tcp-tso-ip-options",
        &[&joined(
            &options.offload_hdr(Some(536)),
            &options.partial(&payload(1500, 3)),
        )],
    );

    let udp = Builder::udp();
    seed(
        out,
        T,
        "udp-uso",
        &[&joined(
            &udp.offload_hdr(Some(400)),
            &udp.partial(&payload(1000, 5)),
        )],
    );
    seed(
        out,
        T,
        "udp-needs-csum",
        &[&joined(
            &udp.offload_hdr(None),
            &udp.partial(&payload(30, 1)),
        )],
    );
    let tcp = Builder::tcp();
    seed(
        out,
        T,
        "tcp-needs-csum",
        &[&joined(
            &tcp.offload_hdr(None),
            &tcp.partial(&payload(100, 2)),
        )],
    );
    seed(
        out,
        T,
        "no-offload",
        &[&joined(&VnetHdr::NONE, &client_udp())],
    );

    // What the gateway's coalescer makes of four segments of a flow.
    let mut gro = Coalescer::new();
    let mut merged = Vec::new();
    for i in 0..4u32 {
        let b = Builder {
            seq: 1000 + i * 100,
            ..Builder::tcp()
        };
        let flags = VnetHdr {
            flags: VnetHdr::F_DATA_VALID,
            ..VnetHdr::NONE
        };
        gro.push(&flags, &b.complete(&payload(100, i as u8)), |h, p| {
            merged.push(joined(h, p))
        });
    }
    gro.flush(|h, p| merged.push(joined(h, p)));
    assert_eq!(merged.len(), 1, "four segments merge into one");
    seed(out, T, "gro-merged", &[&merged[0]]);
}

fn coalescer(out: &mut Vec<Seed>) {
    const T: &str = "coalescer";
    const NAMES: [&str; 5] = ["merges-1", "merges-2", "merges-3", "merges-4", "merges-5"];
    // The generator's input format is whatever `Unstructured` reads, so
    // rather than writing it by hand, try deterministic random inputs and
    // keep those that merge the most segments.
    let mut rng = Rng::new(0x5eed);
    let mut scored: Vec<(usize, Vec<u8>)> = (0..400)
        .map(|_| {
            let bytes: Vec<u8> = (0..600).map(|_| rng.next_u64() as u8).collect();
            (merges(&bytes), bytes)
        })
        .collect();
    scored.sort_by_key(|(merges, _)| std::cmp::Reverse(*merges));
    for (name, (merges, bytes)) in NAMES.iter().zip(scored) {
        assert!(merges > 0, "no random input merges");
        seed(out, T, name, &[&bytes]);
    }
}

/// How many packets fewer come out of the coalescer than went in.
fn merges(data: &[u8]) -> usize {
    let mut u = Unstructured::new(data);
    let mut gen = Generator::default();
    let mut gro = Coalescer::new();
    let (mut pushed, mut emitted) = (0, 0);
    while let Some(op) = gen.next(&mut u) {
        match op {
            Op::Flush => gro.flush(|_, _| emitted += 1),
            Op::Push(hdr, packet) => {
                pushed += 1;
                gro.push(&hdr, &packet, |_, _| emitted += 1);
            }
        }
    }
    gro.flush(|_, _| emitted += 1);
    pushed - emitted
}

fn session(out: &mut Vec<Seed>) {
    const T: &str = "session";
    // Two bytes of cut seed, a mode byte (bit 0 client, 1 offload,
    // 2 small capsule limit, 3 short timeouts, 4 send, 5 EOF), the stream.
    let plain = exchange(false, Duration::from_secs(15));
    let offload = exchange(true, Duration::from_secs(1));

    let mut to_gateway = encode(&[Capsule::AddressRequest(vec![RequestedAddress {
        request_id: 1,
        ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        prefix_len: 32,
    }])]);
    capsule::encode_ip_datagram(&client_udp(), &mut to_gateway);
    to_gateway.extend(encode(&[Capsule::Ping(1)]));
    capsule::encode_ip_datagram(&client_syn(), &mut to_gateway);
    seed(
        out,
        T,
        "gateway",
        &[&[2, 0, 0], &plain.request, &to_gateway],
    );
    seed(
        out,
        T,
        "gateway-bytewise-send",
        &[&[0, 0, 16], &plain.request, &to_gateway],
    );

    let (hdr, packet) = super_packet();
    let mut offload_stream = Vec::new();
    capsule::encode_datagram(
        OFFLOAD_CONTEXT,
        &[&hdr.to_bytes(), &packet],
        &mut offload_stream,
    );
    seed(
        out,
        T,
        "gateway-offload-eof",
        &[
            &[1, 0, 2 | 16 | 32],
            &offload.request,
            &offload_stream,
            &to_gateway,
        ],
    );
    seed(
        out,
        T,
        "gateway-bad-request",
        &[&[3, 0, 8], b"POST / HTTP/1.1\r\nHost: x\r\n\r\n"],
    );

    let mut to_client = Vec::new();
    capsule::encode_ip_datagram(&Builder::udp().complete(b"reply"), &mut to_client);
    to_client.extend(encode(&[
        Capsule::Pong(1),
        Capsule::Ping(99),
        Capsule::RouteAdvertisement(vec![IpAddressRange {
            start: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 0)),
            end: IpAddr::V4(Ipv4Addr::new(198, 19, 255, 255)),
            ip_protocol: 0,
        }]),
        Capsule::DnsAssign(vec![DnsConfiguration::full_tunnel(vec![Ipv4Addr::new(
            10, 77, 0, 1,
        )])]),
        Capsule::AddressRequest(vec![RequestedAddress {
            request_id: 5,
            ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            prefix_len: 32,
        }]),
    ]));
    seed(out, T, "client", &[&[2, 0, 1], &plain.response, &to_client]);
    seed(
        out,
        T,
        "client-offload-send",
        &[
            &[1, 0, 1 | 2 | 16],
            &offload.response,
            &offload_stream,
            &to_client,
        ],
    );
    seed(
        out,
        T,
        "client-interim-short-timeouts",
        &[
            &[7, 0, 1 | 8],
            b"HTTP/1.1 100 Continue\r\n\r\n",
            &plain.response,
            &to_client,
        ],
    );
    seed(
        out,
        T,
        "client-refused",
        &[
            &[3, 0, 1],
            &http::refusal(403, "Forbidden", "client certificate revoked"),
        ],
    );
}

fn client_packet(out: &mut Vec<Seed>) {
    const T: &str = "client_packet";
    seed(out, T, "udp-dns", &[&client_udp()]);
    seed(out, T, "tcp-syn", &[&client_syn()]);
    let echo = {
        let mut p = Builder {
            proto: 1,
            src: VIP.octets(),
            dst: [198, 18, 0, 2],
            ..Builder::udp()
        }
        .raw(&[]);
        // ICMP echo request, identifier 0x4242, sequence 1, 4 data bytes.
        p.truncate(20);
        p.extend_from_slice(&[8, 0, 0, 0, 0x42, 0x42, 0, 1, b'p', b'i', b'n', b'g']);
        let len = p.len() as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        let csum = !ip::ones_sum(&p[20..]);
        p[22..24].copy_from_slice(&csum.to_be_bytes());
        fix_ip_checksum(&mut p);
        p
    };
    seed(out, T, "icmp-echo", &[&echo]);
    let private = Builder {
        src: VIP.octets(),
        dst: [10, 200, 0, 5],
        ..Builder::udp()
    }
    .complete(b"refused by policy");
    seed(out, T, "udp-to-private", &[&private]);
    let ttl1 = Builder {
        src: VIP.octets(),
        dst: [198, 18, 0, 2],
        ttl: 1,
        ..Builder::udp()
    }
    .complete(b"traceroute");
    seed(out, T, "udp-ttl-1", &[&ttl1]);
    let mut fragment = client_udp();
    fragment[6] |= 0x20;
    fix_ip_checksum(&mut fragment);
    seed(out, T, "udp-fragment", &[&fragment]);
    let (hdr, packet) = super_packet();
    seed(out, T, "offload-tso", &[&joined(&hdr, &packet)]);
}

/// An IPv6 packet from the client's default address (`--pool6`) to
/// `dst`, `next` header and hop limit `hop`, `l4` as given.
fn ipv6(dst: [u8; 16], next: u8, hop: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next, hop]);
    p.extend_from_slice(&[
        0xfd, 0, 0x76, 0x65, 0x69, 0x6c, 0, 0, 0, 0, 0, 0, 10, 77, 0, 2,
    ]);
    p.extend_from_slice(&dst);
    p.extend_from_slice(l4);
    p
}

fn client_packet6(out: &mut Vec<Seed>) {
    const T: &str = "client_packet6";
    const REMOTE: [u8; 16] = [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let udp = [0x9c, 0x40, 0, 53, 0, 12, 0, 0, b'h', b'e', b'y', b'!'];
    seed(out, T, "udp-dns", &[&ipv6(REMOTE, 17, 64, &udp)]);
    let mut syn = vec![
        0xc3, 0x50, 1, 0xbb, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff,
    ];
    syn.extend_from_slice(&[0, 0, 0, 0]);
    seed(out, T, "tcp-syn", &[&ipv6(REMOTE, 6, 64, &syn)]);
    let echo = [128, 0, 0, 0, 0x42, 0x42, 0, 1, b'p', b'i', b'n', b'g'];
    seed(out, T, "icmpv6-echo", &[&ipv6(REMOTE, 58, 64, &echo)]);
    let mut ula = REMOTE;
    ula[..2].copy_from_slice(&[0xfd, 0x12]);
    seed(out, T, "udp-to-ula", &[&ipv6(ula, 17, 64, &udp)]);
    seed(out, T, "udp-hop-limit-1", &[&ipv6(REMOTE, 17, 1, &udp)]);
    let mut frag = vec![17, 0, 0, 1, 0, 0, 0x12, 0x34];
    frag.extend_from_slice(&udp);
    seed(out, T, "udp-fragment", &[&ipv6(REMOTE, 44, 64, &frag)]);
}

fn fix_ip_checksum(p: &mut [u8]) {
    let ihl = usize::from(p[0] & 0xf) * 4;
    p[10..12].copy_from_slice(&[0, 0]);
    let csum = !ip::ones_sum(&p[..ihl]);
    p[10..12].copy_from_slice(&csum.to_be_bytes());
}
