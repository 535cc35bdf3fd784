use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().expect("test address"))
}

fn range(start: IpAddr, end: IpAddr, ip_protocol: u8) -> IpAddressRange {
    IpAddressRange {
        start,
        end,
        ip_protocol,
    }
}

/// A capsule with an arbitrary (possibly malformed) value.
fn raw(capsule_type: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint::encode(capsule_type, &mut out).expect("type");
    varint::encode(value.len() as u64, &mut out).expect("length");
    out.extend_from_slice(value);
    out
}

fn encode(capsule: &Capsule) -> Vec<u8> {
    let mut out = Vec::new();
    capsule.encode(&mut out).expect("encodable");
    out
}

/// Feeds `chunks` one after the other, collecting capsules after each.
fn decode_chunks<'a>(
    decoder: &mut CapsuleDecoder,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<Capsule>, ProtoError> {
    let mut out = Vec::new();
    for chunk in chunks {
        decoder.feed(chunk);
        while let Some(c) = decoder.next()? {
            out.push(c);
        }
    }
    Ok(out)
}

fn decode_all(bytes: &[u8]) -> Result<Vec<Capsule>, ProtoError> {
    decode_chunks(&mut CapsuleDecoder::default(), [bytes])
}

fn decode_one(bytes: &[u8]) -> Result<Capsule, ProtoError> {
    let mut all = decode_all(bytes)?;
    assert_eq!(all.len(), 1, "exactly one capsule in {bytes:02x?}");
    Ok(all.remove(0))
}

/// One of every capsule type, with both address families where it matters.
fn samples() -> Vec<Capsule> {
    vec![
        Capsule::Datagram {
            context_id: 0,
            payload: vec![0x45, 0, 0, 20, 1, 2, 3, 4],
        },
        Capsule::Datagram {
            context_id: 0,
            payload: Vec::new(),
        },
        Capsule::Datagram {
            context_id: 1_000_000,
            payload: vec![0xaa; 300],
        },
        Capsule::AddressAssign(vec![
            AssignedAddress {
                request_id: 0,
                ip: v4(10, 77, 0, 2),
                prefix_len: 32,
            },
            AssignedAddress {
                request_id: 7,
                ip: v6("fd00:77::"),
                prefix_len: 64,
            },
        ]),
        Capsule::AddressAssign(Vec::new()),
        Capsule::AddressRequest(vec![
            RequestedAddress {
                request_id: 1,
                ip: v4(0, 0, 0, 0),
                prefix_len: 32,
            },
            RequestedAddress {
                request_id: 300,
                ip: v6("::"),
                prefix_len: 128,
            },
        ]),
        Capsule::RouteAdvertisement(vec![
            range(v4(0, 0, 0, 0), v4(9, 255, 255, 255), 0),
            range(v4(11, 0, 0, 0), v4(255, 255, 255, 255), 0),
            range(
                v6("2000::"),
                v6("3fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
                0,
            ),
        ]),
        Capsule::RouteAdvertisement(Vec::new()),
        Capsule::DnsAssign(vec![DnsConfiguration::full_tunnel(vec![Ipv4Addr::new(
            10, 77, 0, 1,
        )])]),
        Capsule::DnsAssign(vec![dns_split_tunnel(), DnsConfiguration::default()]),
        Capsule::DnsAssign(Vec::new()),
        Capsule::Ping(0x0123_4567_89ab_cdef),
        Capsule::Pong(u64::MAX),
    ]
}

/// The draft's split-tunnel example (§3.6.2), with an encrypted resolver
/// beside it.
fn dns_split_tunnel() -> DnsConfiguration {
    let domain = |d: &str| DomainName::new(d).expect("valid");
    DnsConfiguration {
        nameservers: vec![
            Nameserver {
                priority: 1,
                ipv4: vec![Ipv4Addr::new(192, 0, 2, 33)],
                ipv6: vec!["2001:db8::1".parse().unwrap()],
                auth_domain: DomainName::root(),
                params: Vec::new(),
            },
            Nameserver {
                priority: 2,
                ipv4: Vec::new(),
                ipv6: Vec::new(),
                auth_domain: domain("dns.corp.example"),
                params: vec![
                    SvcParam {
                        key: svc_key::ALPN,
                        value: b"\x03dot".to_vec(),
                    },
                    SvcParam {
                        key: svc_key::NO_DEFAULT_ALPN,
                        value: Vec::new(),
                    },
                    SvcParam {
                        key: svc_key::PORT,
                        value: 853u16.to_be_bytes().to_vec(),
                    },
                ],
            },
        ],
        internal_domains: vec![domain("internal.corp.example")],
        search_domains: vec![domain("internal.corp.example"), domain("corp.example.")],
    }
}

#[test]
fn every_type_round_trips() {
    for capsule in samples() {
        let bytes = encode(&capsule);
        assert_eq!(decode_one(&bytes), Ok(capsule.clone()), "{bytes:02x?}");
    }
}

#[test]
fn exact_encodings() {
    let mut out = Vec::new();
    encode_ip_datagram(&[0x45, 0x00, 0x00, 0x14], &mut out);
    assert_eq!(out, [0x00, 0x05, 0x00, 0x45, 0x00, 0x00, 0x14]);
    // A 100-byte packet needs a two-byte length (101 = 0x4065).
    out.clear();
    encode_ip_datagram(&[0; 100], &mut out);
    assert_eq!(out[..4], [0x00, 0x40, 0x65, 0x00]);
    assert_eq!(out.len(), 4 + 100);
    // PING: the type is an 8-byte varint spelling "VEIL\0".
    assert_eq!(
        encode(&Capsule::Ping(1)),
        [
            0xc0, 0x00, 0x00, 0x56, 0x45, 0x49, 0x4c, 0x00, // type
            0x08, // length
            0, 0, 0, 0, 0, 0, 0, 1, // nonce
        ]
    );
    assert_eq!(
        encode(&Capsule::AddressAssign(vec![AssignedAddress {
            request_id: 0,
            ip: v4(10, 77, 0, 2),
            prefix_len: 32,
        }])),
        [0x01, 0x07, 0x00, 0x04, 10, 77, 0, 2, 32]
    );
    assert_eq!(
        encode(&Capsule::RouteAdvertisement(vec![IpAddressRange::ALL_IPV4])),
        [0x03, 0x0a, 0x04, 0, 0, 0, 0, 255, 255, 255, 255, 0]
    );
}

#[test]
fn dns_assign_exact_encoding() {
    // One configuration: nameserver priority 1 at 10.77.0.1, plain DNS,
    // every name (the root as the internal domain), no search domain.
    let gateway = DnsConfiguration::full_tunnel(vec![Ipv4Addr::new(10, 77, 0, 1)]);
    assert_eq!(
        encode(&Capsule::DnsAssign(vec![gateway.clone()])),
        [
            0x9a, 0xce, 0x79, 0xec, // type 0x1ACE79EC, a 4-byte varint
            0x0e, // length 14
            0x01, // one nameserver
            0x00, 0x01, // priority 1
            0x01, 10, 77, 0, 1,    // one IPv4 address
            0x00, // no IPv6 address
            0x00, // empty authentication domain name
            0x00, // no service parameters
            0x01, 0x00, // one internal domain: the root
            0x00, // no search domain
        ]
    );
    let ns = &gateway.nameservers[0];
    assert_eq!((ns.port(), ns.plain_dns()), (53, true));
    let encrypted = &dns_split_tunnel().nameservers[1];
    assert_eq!((encrypted.port(), encrypted.plain_dns()), (853, false));
}

#[test]
fn malformed_dns_assign_rejected() {
    // Nameserver with priority 0, then one with no address at all.
    let zero = [
        0x01, 0x00, 0x00, 0x01, 10, 77, 0, 1, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];
    assert!(matches!(
        decode_all(&raw(DNS_ASSIGN, &zero)),
        Err(ProtoError::BadNameserver { .. })
    ));
    let nowhere = [0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00];
    assert!(matches!(
        decode_all(&raw(DNS_ASSIGN, &nowhere)),
        Err(ProtoError::BadNameserver { .. })
    ));
    // A count far beyond the value: truncated, nothing allocated for it.
    let huge = [
        0x01, 0x00, 0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ];
    assert_eq!(
        decode_all(&raw(DNS_ASSIGN, &huge)),
        Err(ProtoError::Truncated {
            capsule: "DNS_ASSIGN",
            field: "IPv4 Address"
        })
    );
    // Search domains that would smuggle a line into resolv.conf.
    for bad in [
        &b"corp.example\noptions ndots:15"[..],
        b"a..b",
        b"-",
        b"x y",
        &[b'a'; 64],
    ] {
        let mut value = vec![0x00, 0x00, 0x01];
        varint::encode(bad.len() as u64, &mut value).unwrap();
        value.extend_from_slice(bad);
        assert!(
            matches!(
                decode_all(&raw(DNS_ASSIGN, &value)),
                Err(ProtoError::InvalidDomainName { .. })
            ),
            "{bad:?}"
        );
        assert!(DomainName::new(&String::from_utf8_lossy(bad)).is_err());
    }
    let long = vec!["a".repeat(63); 4].join(".");
    assert!(DomainName::new(&long).is_err(), "255 bytes");
    assert!(DomainName::new(&long[..253]).is_ok());
    // Service parameters out of order, a hint, a bad port, alpn without a
    // name: refused when encoding as when decoding.
    let with = |auth: &str, params: Vec<SvcParam>| {
        Capsule::DnsAssign(vec![DnsConfiguration {
            nameservers: vec![Nameserver {
                priority: 1,
                ipv4: vec![Ipv4Addr::new(192, 0, 2, 1)],
                ipv6: vec![],
                auth_domain: DomainName::new(auth).unwrap(),
                params,
            }],
            ..DnsConfiguration::default()
        }])
    };
    let p = |key, value: &[u8]| SvcParam {
        key,
        value: value.to_vec(),
    };
    for capsule in [
        with(
            "",
            vec![p(svc_key::PORT, &[0, 53]), p(svc_key::PORT, &[0, 53])],
        ),
        with(
            "dns.example",
            vec![p(svc_key::PORT, &[0, 53]), p(svc_key::ALPN, b"\x02h2")],
        ),
        with("", vec![p(svc_key::IPV4HINT, &[192, 0, 2, 1])]),
        with("", vec![p(svc_key::PORT, &[53])]),
        with("", vec![p(svc_key::ALPN, b"\x02h2")]),
        with("dns.example", vec![p(svc_key::NO_DEFAULT_ALPN, b"x")]),
    ] {
        let mut out = Vec::new();
        assert!(matches!(
            capsule.encode(&mut out),
            Err(ProtoError::BadNameserver { .. })
        ));
        assert!(out.is_empty());
        let Capsule::DnsAssign(configs) = &capsule else {
            unreachable!()
        };
        let mut value = Vec::new();
        configs[0].write(&mut value);
        assert!(matches!(
            decode_all(&raw(DNS_ASSIGN, &value)),
            Err(ProtoError::BadNameserver { .. })
        ));
    }
    // Trailing bytes inside the service parameters.
    let mut value = vec![
        0x01, 0x00, 0x01, 0x01, 10, 0, 0, 1, 0x00, 0x00, 0x03, 0x00, 0x03, 0x00,
    ];
    value.extend_from_slice(&[0x00, 0x00]);
    assert_eq!(
        decode_all(&raw(DNS_ASSIGN, &value)),
        Err(ProtoError::Truncated {
            capsule: "DNS_ASSIGN",
            field: "SvcParamValue length"
        })
    );
}

#[test]
fn ip_datagram_helper_matches_the_generic_encoder() {
    let packet: Vec<u8> = (0..=255).collect();
    let mut fast = Vec::new();
    encode_ip_datagram(&packet, &mut fast);
    let generic = encode(&Capsule::Datagram {
        context_id: IP_PACKET_CONTEXT,
        payload: packet,
    });
    assert_eq!(fast, generic);
}

#[test]
fn any_split_yields_the_same_capsules() {
    let expected = samples();
    let stream: Vec<u8> = expected.iter().flat_map(encode).collect();

    // Byte by byte.
    let got = decode_chunks(&mut CapsuleDecoder::default(), stream.chunks(1));
    assert_eq!(got.as_ref(), Ok(&expected));

    // Every single cut, and every pair of cuts over a shorter stream.
    for cut in 0..=stream.len() {
        let (a, b) = stream.split_at(cut);
        let got = decode_chunks(&mut CapsuleDecoder::default(), [a, b]);
        assert_eq!(got.as_ref(), Ok(&expected), "cut at {cut}");
    }
    let short: Vec<u8> = expected[3..].iter().flat_map(encode).collect();
    for i in 0..=short.len() {
        for j in i..=short.len() {
            let got = decode_chunks(
                &mut CapsuleDecoder::default(),
                [&short[..i], &short[i..j], &short[j..]],
            );
            assert_eq!(
                got.as_ref(),
                Ok(&expected[3..].to_vec()),
                "cuts at {i}, {j}"
            );
        }
    }
}

#[test]
fn buffer_is_compacted_not_grown() {
    // Many small capsules through one decoder in chunks that cut them
    // anywhere: the buffer never holds more than about one chunk.
    const CAPSULES: usize = 5000;
    const CHUNK: usize = 1000;
    let mut one = Vec::new();
    encode_ip_datagram(&[7; 40], &mut one);
    let stream = one.repeat(CAPSULES);
    let mut decoder = CapsuleDecoder::default();
    let mut count = 0;
    for chunk in stream.chunks(CHUNK) {
        count += decode_chunks(&mut decoder, [chunk]).expect("valid").len();
        assert!(decoder.buffered_len() < one.len());
        assert!(decoder.capacity() <= 2 * CHUNK, "{}", decoder.capacity());
    }
    assert_eq!(count, CAPSULES);
}

#[test]
fn oversize_capsule_rejected_from_its_header() {
    let mut decoder = CapsuleDecoder::new(65_535);
    // DATAGRAM, length 70000 (4-byte varint), and not one byte of value.
    let mut header = vec![0x00];
    varint::encode(70_000, &mut header).expect("length");
    decoder.feed(&header);
    let e = decoder.next().expect_err("too large");
    assert_eq!(
        e,
        ProtoError::CapsuleTooLarge {
            len: 70_000,
            max: 65_535
        }
    );
    assert_eq!(
        e.to_string(),
        "capsule of 70000 bytes exceeds the 65535-byte limit"
    );

    // Exactly at the limit is fine.
    let mut decoder = CapsuleDecoder::new(101);
    let mut ok = Vec::new();
    encode_ip_datagram(&[0; 100], &mut ok);
    assert_eq!(
        decode_chunks(&mut decoder, [&ok[..]]).map(|v| v.len()),
        Ok(1)
    );
}

/// A reserved capsule type (RFC 9297 §5.4: 0x29 * N + 0x17), which no
/// implementation knows.
const GREASE: u64 = 0x29 * 3 + 0x17;

#[test]
fn unknown_capsules_are_skipped() {
    let mut stream = raw(GREASE, b"whatever is in here");
    stream.extend(raw(GREASE, b""));
    stream.extend(encode(&Capsule::Ping(9)));
    let expected = vec![
        Capsule::Unknown {
            capsule_type: GREASE,
            length: 19,
        },
        Capsule::Unknown {
            capsule_type: GREASE,
            length: 0,
        },
        Capsule::Ping(9),
    ];
    assert_eq!(decode_all(&stream), Ok(expected.clone()));
    let got = decode_chunks(&mut CapsuleDecoder::default(), stream.chunks(1));
    assert_eq!(got, Ok(expected));
}

#[test]
fn huge_unknown_capsules_are_streamed_not_buffered() {
    const BODY: usize = 4 << 20;
    const CHUNK: usize = 4096;
    // Known capsules are limited to 1 KiB, yet a 4 MiB unknown one passes.
    let mut decoder = CapsuleDecoder::new(1024);
    let mut header = Vec::new();
    varint::encode(GREASE, &mut header).expect("type");
    varint::encode(BODY as u64, &mut header).expect("length");
    let mut tail = encode(&Capsule::Pong(5));
    tail.extend(encode(&Capsule::Ping(6)));

    let mut got = decode_chunks(&mut decoder, [&header[..]]).expect("header");
    let zeros = [0u8; CHUNK];
    let mut sent = 0;
    while sent < BODY {
        let n = CHUNK.min(BODY - sent);
        got.extend(decode_chunks(&mut decoder, [&zeros[..n]]).expect("body"));
        sent += n;
        assert_eq!(decoder.buffered_len(), 0, "nothing of the body is kept");
        assert!(decoder.capacity() <= CHUNK);
    }
    got.extend(decode_chunks(&mut decoder, tail.chunks(3)).expect("tail"));
    assert_eq!(
        got,
        [
            Capsule::Unknown {
                capsule_type: GREASE,
                length: BODY as u64
            },
            Capsule::Pong(5),
            Capsule::Ping(6),
        ]
    );
}

#[test]
fn unknown_capsules_still_have_a_limit() {
    let mut decoder = CapsuleDecoder::new(1024).with_max_skip_len(1 << 20);
    let mut header = Vec::new();
    varint::encode(GREASE, &mut header).expect("type");
    varint::encode((1 << 20) + 1, &mut header).expect("length");
    decoder.feed(&header);
    assert_eq!(
        decoder.next(),
        Err(ProtoError::UnknownCapsuleTooLarge {
            capsule_type: GREASE,
            len: (1 << 20) + 1,
            max: 1 << 20
        })
    );
}

#[test]
fn malformed_datagram_and_liveness_capsules() {
    assert_eq!(
        decode_all(&raw(DATAGRAM, b"")),
        Err(ProtoError::Truncated {
            capsule: "DATAGRAM",
            field: "Context ID"
        })
    );
    // A two-byte context ID cut after one byte.
    assert_eq!(
        decode_all(&raw(DATAGRAM, &[0x40])),
        Err(ProtoError::Truncated {
            capsule: "DATAGRAM",
            field: "Context ID"
        })
    );
    assert_eq!(
        decode_all(&raw(VEIL_PING, &[0; 7])),
        Err(ProtoError::Truncated {
            capsule: "VEIL_PING",
            field: "Nonce"
        })
    );
    assert_eq!(
        decode_all(&raw(VEIL_PONG, &[0; 9])),
        Err(ProtoError::TrailingBytes {
            capsule: "VEIL_PONG",
            extra: 1
        })
    );
}

#[test]
fn malformed_address_assign_rejected() {
    let cases: &[(&[u8], ProtoError)] = &[
        // IPv4 address cut short.
        (
            &[0x00, 0x04, 10, 77, 0],
            ProtoError::Truncated {
                capsule: "ADDRESS_ASSIGN",
                field: "IP Address",
            },
        ),
        // Missing prefix length.
        (
            &[0x00, 0x04, 10, 77, 0, 2],
            ProtoError::Truncated {
                capsule: "ADDRESS_ASSIGN",
                field: "IP Prefix Length",
            },
        ),
        // A second entry that stops after its request ID.
        (
            &[0x00, 0x04, 10, 77, 0, 2, 32, 0x05],
            ProtoError::Truncated {
                capsule: "ADDRESS_ASSIGN",
                field: "IP Version",
            },
        ),
        (
            &[0x00, 0x05, 10, 77, 0, 2, 32],
            ProtoError::BadIpVersion {
                capsule: "ADDRESS_ASSIGN",
                version: 5,
            },
        ),
        (
            &[0x00, 0x04, 10, 77, 0, 2, 33],
            ProtoError::PrefixTooLong {
                ip: v4(10, 77, 0, 2),
                prefix_len: 33,
                max: 32,
            },
        ),
        (
            &[0x00, 0x04, 10, 77, 0, 2, 24],
            ProtoError::HostBitsSet {
                ip: v4(10, 77, 0, 2),
                prefix_len: 24,
            },
        ),
    ];
    for (value, expected) in cases {
        assert_eq!(
            decode_all(&raw(ADDRESS_ASSIGN, value)).as_ref(),
            Err(expected),
            "{value:02x?}"
        );
    }
    // IPv6 uses 16 bytes: a v4-sized address under version 6 is truncated.
    assert_eq!(
        decode_all(&raw(ADDRESS_ASSIGN, &[0x00, 0x06, 10, 77, 0, 2, 32])),
        Err(ProtoError::Truncated {
            capsule: "ADDRESS_ASSIGN",
            field: "IP Address"
        })
    );
    // The rejection entry is valid.
    assert!(decode_all(&raw(ADDRESS_ASSIGN, &[0x01, 0x04, 0, 0, 0, 0, 32])).is_ok());
}

#[test]
fn malformed_address_request_rejected() {
    assert_eq!(
        decode_all(&raw(ADDRESS_REQUEST, b"")),
        Err(ProtoError::EmptyAddressRequest)
    );
    assert_eq!(
        decode_all(&raw(ADDRESS_REQUEST, &[0x00, 0x04, 0, 0, 0, 0, 32])),
        Err(ProtoError::ZeroRequestId)
    );
}

#[test]
fn malformed_route_advertisement_rejected() {
    let routes = |list: &[IpAddressRange]| {
        let mut value = Vec::new();
        for r in list {
            r.write(&mut value);
        }
        decode_all(&raw(ROUTE_ADVERTISEMENT, &value))
    };
    let a = range(v4(10, 0, 0, 0), v4(10, 255, 255, 255), 0);
    let b = range(v4(11, 0, 0, 0), v4(11, 255, 255, 255), 0);
    let overlapping = range(v4(10, 128, 0, 0), v4(11, 0, 0, 0), 0);
    let tcp_inside_a = range(v4(10, 1, 0, 0), v4(10, 1, 255, 255), 6);
    let v6_all = range(v6("::"), v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), 0);

    assert!(routes(&[a, b, v6_all]).is_ok());
    assert_eq!(
        routes(&[range(v4(10, 0, 0, 1), v4(10, 0, 0, 0), 0)]),
        Err(ProtoError::RangeInverted {
            start: v4(10, 0, 0, 1),
            end: v4(10, 0, 0, 0)
        })
    );
    assert_eq!(
        routes(&[b, a]),
        Err(ProtoError::RoutesUnordered {
            previous: b,
            range: a
        })
    );
    assert_eq!(
        routes(&[v6_all, a]),
        Err(ProtoError::RoutesUnordered {
            previous: v6_all,
            range: a
        })
    );
    assert_eq!(
        routes(&[a, overlapping]),
        Err(ProtoError::RoutesOverlap {
            other: a,
            range: overlapping
        })
    );
    // Adjacent is fine; touching (end == next start) is not.
    let touching = range(v4(10, 255, 255, 255), v4(11, 0, 0, 0), 0);
    assert!(matches!(
        routes(&[a, touching]),
        Err(ProtoError::RoutesOverlap { .. })
    ));
    // Sorted and disjoint per protocol, but TCP inside an all-protocols
    // range: the RFC's optional check.
    assert_eq!(
        routes(&[a, tcp_inside_a]),
        Err(ProtoError::RoutesOverlap {
            other: a,
            range: tcp_inside_a
        })
    );
    let tcp_elsewhere = range(v4(12, 0, 0, 0), v4(12, 0, 0, 255), 6);
    assert!(routes(&[a, b, tcp_elsewhere]).is_ok());
    // Bad version, and a range cut short.
    assert_eq!(
        decode_all(&raw(ROUTE_ADVERTISEMENT, &[4 + 1, 0, 0, 0, 0])),
        Err(ProtoError::BadIpVersion {
            capsule: "ROUTE_ADVERTISEMENT",
            version: 5
        })
    );
    assert_eq!(
        decode_all(&raw(
            ROUTE_ADVERTISEMENT,
            &[4, 0, 0, 0, 0, 255, 255, 255, 255]
        )),
        Err(ProtoError::Truncated {
            capsule: "ROUTE_ADVERTISEMENT",
            field: "IP Protocol"
        })
    );
    assert_eq!(
        a.to_string() + " / " + &tcp_elsewhere.to_string(),
        "10.0.0.0-10.255.255.255 (all protocols) / 12.0.0.0-12.0.0.255 (protocol 6)"
    );
}

#[test]
fn encoder_refuses_what_the_decoder_would_reject() {
    let mut out = Vec::new();
    let refused = [
        (
            Capsule::Unknown {
                capsule_type: GREASE,
                length: 3,
            },
            ProtoError::EncodeUnknown {
                capsule_type: GREASE,
            },
        ),
        (
            Capsule::Datagram {
                context_id: varint::MAX + 1,
                payload: vec![],
            },
            ProtoError::VarintTooLarge {
                value: varint::MAX + 1,
            },
        ),
        (
            Capsule::AddressRequest(vec![]),
            ProtoError::EmptyAddressRequest,
        ),
        (
            Capsule::RouteAdvertisement(vec![range(v4(0, 0, 0, 0), v6("::1"), 0)]),
            ProtoError::RangeFamilyMismatch {
                start: v4(0, 0, 0, 0),
                end: v6("::1"),
            },
        ),
        (
            Capsule::AddressAssign(vec![AssignedAddress {
                request_id: 0,
                ip: v6("fd00::1"),
                prefix_len: 64,
            }]),
            ProtoError::HostBitsSet {
                ip: v6("fd00::1"),
                prefix_len: 64,
            },
        ),
    ];
    for (capsule, expected) in refused {
        assert_eq!(capsule.encode(&mut out), Err(expected));
        assert!(out.is_empty(), "nothing written for {capsule:?}");
    }
}

/// A tiny deterministic generator, so junk tests need no dependency.
fn junk(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn junk_never_panics() {
    for seed in 0..3000 {
        let bytes = junk(seed, (seed % 200) as usize);
        let mut decoder = CapsuleDecoder::new(512).with_max_skip_len(4096);
        let _ = decode_chunks(&mut decoder, bytes.chunks(7));
        // Junk behind a valid capsule header of each known type.
        for capsule_type in [
            DATAGRAM,
            ADDRESS_ASSIGN,
            ADDRESS_REQUEST,
            ROUTE_ADVERTISEMENT,
            DNS_ASSIGN,
        ] {
            let _ = decode_all(&raw(capsule_type, &bytes));
        }
        let _ = crate::http::parse_request(&bytes);
        let _ = crate::http::parse_response(&bytes);
    }
}
