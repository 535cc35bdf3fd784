use std::time::Duration;

use super::*;

fn headers_of(frame: &[u8]) -> Vec<u8> {
    let (parts, err) = FrameDecoder::default().decode(frame);
    assert_eq!(err, None);
    match &parts[..] {
        [Part::Headers(block), ..] => block.clone(),
        other => panic!("no HEADERS: {other:?}"),
    }
}

#[test]
fn our_request_reads_back_and_has_the_documented_bytes() {
    let frame = request("gw.example", http::WELL_KNOWN_PATH, Duration::from_secs(15));
    let req = parse_request(&headers_of(&frame)).expect("valid");
    assert_eq!(req.host, "gw.example");
    assert_eq!(req.target, http::WELL_KNOWN_PATH);
    assert_eq!(req.keepalive, Some(Duration::from_secs(15)));
    assert!(!req.offload);
    // docs/protocol.md shows these bytes: HEADERS, a two-byte length, the
    // QPACK prefix, then :method CONNECT as static index 15.
    assert_eq!(&frame[..6], &[0x01, 0x40, 0x6b, 0x00, 0x00, 0xcf]);
}

#[test]
fn responses_read_back() {
    assert_eq!(parse_status(&headers_of(&ok_response())), Ok(200));
    let refusal = refusal(503, "the gateway is full");
    let (parts, err) = FrameDecoder::default().decode(&refusal);
    assert_eq!(err, None);
    let [Part::Headers(block), Part::Data(body)] = &parts[..] else {
        panic!("{parts:?}")
    };
    assert_eq!(parse_status(block), Ok(503));
    assert_eq!(body, b"the gateway is full\n");
}

#[test]
fn frames_split_anywhere_decode_the_same() {
    let mut stream = request("gw", "/", Duration::from_secs(1));
    stream.extend_from_slice(&[0x21, 3, 9, 9, 9]); // reserved type: skipped
    data_frame_header(4, &mut stream);
    stream.extend_from_slice(b"abcd");
    for cut in 0..stream.len() {
        let mut d = FrameDecoder::default();
        let (mut parts, e1) = d.decode(&stream[..cut]);
        let (more, e2) = d.decode(&stream[cut..]);
        assert_eq!((e1, e2), (None, None));
        parts.extend(more);
        let data: Vec<u8> = parts
            .iter()
            .filter_map(|p| match p {
                Part::Data(d) => Some(d.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(data, b"abcd", "cut at {cut}");
        assert_eq!(
            parts
                .iter()
                .filter(|p| matches!(p, Part::Headers(_)))
                .count(),
            1
        );
    }
}

#[test]
fn frames_that_have_no_place_on_a_request_stream_are_refused() {
    for kind in [0x04u8, 0x07, 0x0d, 0x02] {
        let (_, err) = FrameDecoder::default().decode(&[kind, 0]);
        assert!(matches!(err, Some(ProtoError::H3Frame { .. })), "{kind}");
    }
    // A field section over the limit is refused from its header alone.
    let (_, err) = FrameDecoder::default().decode(&[0x01, 0x80, 0x01, 0x00, 0x00]);
    assert!(matches!(err, Some(ProtoError::H3Frame { .. })));
}

#[test]
fn requests_that_are_not_connect_ip_are_refused() {
    let build = |fields: &[(&str, &str)]| {
        let fields: Vec<Field> = fields.iter().map(|(n, v)| Field::new(n, v)).collect();
        let mut block = Vec::new();
        encode_fields(&fields, &mut block);
        parse_request(&block)
    };
    let good = [
        (":method", "CONNECT"),
        (":protocol", "connect-ip"),
        (":scheme", "https"),
        (":authority", "gw"),
        (":path", "/"),
        ("capsule-protocol", "?1"),
    ];
    assert!(build(&good).is_ok());
    for (i, bad) in [
        (":method", "GET"),
        (":protocol", "connect-udp"),
        (":scheme", "http"),
        (":authority", "g w"),
        (":path", ""),
        ("capsule-protocol", "?0"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut fields = good;
        fields[i] = bad;
        assert!(build(&fields).is_err(), "{bad:?}");
        assert!(build(&fields[..i]).is_err(), "without {}", good[i].0);
    }
    let mut twice = good.to_vec();
    twice.push((":authority", "other"));
    assert_eq!(
        build(&twice),
        Err(ProtoError::DuplicateHeader { name: ":authority" })
    );
}

/// aioquic's (pylsqpack's) encoding of a CONNECT-IP request: Huffman
/// wherever shorter.
#[test]
fn qpack_decodes_huffman_coded_strings() {
    let block = [
        0x00, 0x00, 0xcf, 0x2f, 0x00, 0xb9, 0x5d, 0x87, 0x49, 0xc8, 0x7a, 0x3f, 0x87, 0x21, 0xea,
        0xa8, 0xa4, 0x4a, 0xc6, 0xaf, 0xd7, 0x50, 0x8b, 0x98, 0x69, 0x2f, 0x81, 0xfa, 0x5c, 0xbe,
        0x47, 0x4d, 0x74, 0x17, 0x51, 0x95, 0x61, 0x7f, 0x05, 0xa2, 0x85, 0xba, 0xd4, 0x7f, 0x15,
        0x31, 0x48, 0xd1, 0xda, 0xd2, 0xb0, 0x6a, 0xd8, 0xf9, 0x63, 0xe5, 0x8f, 0x2f, 0x04, 0x20,
        0xeb, 0x45, 0xb4, 0x15, 0x6a, 0xec, 0x3a, 0x4e, 0x43, 0xd1, 0x02, 0x3f, 0x31,
    ];
    assert_eq!(
        decode_fields(&block).unwrap(),
        vec![
            Field::new(":method", "CONNECT"),
            Field::new(":protocol", "connect-ip"),
            Field::new(":scheme", "https"),
            Field::new(":authority", "gateway.example"),
            Field::new(":path", "/.well-known/masque/ip/*/*/"),
            Field::new("capsule-protocol", "?1"),
        ]
    );
}

#[test]
fn qpack_refuses_what_needs_a_dynamic_table() {
    // Required Insert Count 1.
    assert!(decode_fields(&[0x01, 0x00]).is_err());
    // Indexed line, dynamic (T=0).
    assert!(decode_fields(&[0x00, 0x00, 0x80]).is_err());
    // Static index 99 is past the table.
    assert!(decode_fields(&[0x00, 0x00, 0xff, 0x24]).is_err());
    // Literal name with H=1 and a plain empty value: the name's byte 0x00
    // is `0` (5 bits) and 3 bits of padding that are not all ones, which
    // alone makes it invalid; with 0x1f (`a` and all-ones padding) the
    // same line reads back.
    assert!(decode_fields(&[0x00, 0x00, 0x29, 0x00, 0x00]).is_err());
    assert_eq!(
        decode_fields(&[0x00, 0x00, 0x29, 0x1f, 0x00]).unwrap(),
        vec![Field::new("a", "")]
    );
    // Truncated string.
    assert!(decode_fields(&[0x00, 0x00, 0x23, b'a']).is_err());
    // A long value needs a multi-byte prefixed integer and reads back.
    let long = "x".repeat(300);
    let mut block = Vec::new();
    encode_fields(&[Field::new("user-agent", &long)], &mut block);
    assert_eq!(
        decode_fields(&block).unwrap(),
        vec![Field::new("user-agent", &long)]
    );
}

#[test]
fn control_stream_settings_read_back() {
    let preface = control_stream_preface();
    assert_eq!(preface[0], STREAM_CONTROL as u8);
    let mut r = ControlReader::default();
    assert_eq!(r.feed(&preface[1..3]), Ok(None));
    assert_eq!(
        r.feed(&preface[3..]),
        Ok(Some(Settings {
            datagram: true,
            extended_connect: true
        }))
    );
    assert!(ControlReader::default().feed(&[0x00, 0x00]).is_err());
}

/// The bytes docs/protocol.md shows.
#[test]
fn the_documented_first_frames() {
    let request = request(
        "gateway.example",
        http::WELL_KNOWN_PATH,
        Duration::from_secs(15),
    );
    let mut expected = vec![0x01, 0x40, 0x70, 0x00, 0x00, 0xcf, 0x27, 0x02];
    expected.extend_from_slice(b":protocol\x0aconnect-ip\xd7\x50\x0fgateway.example\x51\x1b");
    expected.extend_from_slice(b"/.well-known/masque/ip/*/*/");
    expected.extend_from_slice(b"\x27\x09capsule-protocol\x02?1\x27\x07veil-keepalive\x0215");
    assert_eq!(request, expected);
    assert_eq!(request.len(), 115);
    let mut ok = vec![0x01, 0x18, 0x00, 0x00, 0xd9, 0x27, 0x09];
    ok.extend_from_slice(b"capsule-protocol\x02?1");
    assert_eq!(ok_response(), ok);
    assert_eq!(
        control_stream_preface(),
        [0x00, 0x04, 0x07, 0x06, 0x60, 0x00, 0x08, 0x01, 0x33, 0x01]
    );
}
