//! Names resolved through the tunnel: an A query to the resolver the
//! gateway announced, over the user-space stack, never the local network's
//! resolver (which would learn every name the client visits).

use std::{net::Ipv4Addr, time::Duration};

use smoltcp::wire::{
    DnsFlags, DnsOpcode, DnsPacket, DnsQueryType, DnsQuestion, DnsRcode, DnsRecord, DnsRecordData,
    DnsRepr,
};

use crate::netstack::{ConnectError, Netstack};

/// How long each try waits for its answer, and how many rounds over the
/// resolvers are made.
const TRY_TIMEOUT: Duration = Duration::from_millis(1500);
const ROUNDS: usize = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LookupError {
    #[error("not a valid host name")]
    BadName,
    #[error("the gateway announced no resolver")]
    NoResolver,
    #[error("the name does not exist")]
    NotFound,
    #[error("the resolver did not answer")]
    TimedOut,
    #[error("opening a socket through the tunnel: {0}")]
    Socket(#[source] ConnectError),
}

/// `name`'s first IPv4 address, asked through the tunnel. An IPv4
/// literal is returned as is.
pub async fn lookup(stack: &Netstack, name: &str) -> Result<Ipv4Addr, LookupError> {
    if let Ok(addr) = name.parse() {
        return Ok(addr);
    }
    let encoded = encode_name(name).ok_or(LookupError::BadName)?;
    let servers = stack.resolvers();
    if servers.is_empty() {
        return Err(LookupError::NoResolver);
    }
    let socket = stack.udp().await.map_err(LookupError::Socket)?;
    let mut answer = vec![0u8; 1500];
    for round in 0..ROUNDS * servers.len() {
        let server = servers[round % servers.len()];
        let id = transaction_id();
        socket.send_to(
            &query(id, &encoded),
            std::net::SocketAddrV4::new(server, 53),
        );
        let deadline = tokio::time::Instant::now() + TRY_TIMEOUT;
        loop {
            let received = tokio::time::timeout_at(deadline, socket.recv_from(&mut answer)).await;
            let Ok((n, from)) = received else { break };
            if *from.ip() != server || from.port() != 53 {
                continue;
            }
            match parse_answer(&answer[..n], id) {
                Some(result) => return result,
                // Not the answer to this query: keep waiting.
                None => continue,
            }
        }
    }
    Err(LookupError::TimedOut)
}

fn transaction_id() -> u16 {
    let mut id = [0u8; 2];
    // SAFETY: getrandom writes at most `len` bytes into the buffer.
    unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    u16::from_ne_bytes(id)
}

/// A host name in DNS wire form (labels, then the root), or `None` if it
/// is not one.
fn encode_name(name: &str) -> Option<Vec<u8>> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return None;
    }
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.split('.') {
        let ok = (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return None;
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    Some(out)
}

fn query(id: u16, name: &[u8]) -> Vec<u8> {
    let repr = DnsRepr {
        transaction_id: id,
        opcode: DnsOpcode::Query,
        flags: DnsFlags::RECURSION_DESIRED,
        question: DnsQuestion {
            name,
            type_: DnsQueryType::A,
        },
    };
    let mut buf = vec![0u8; repr.buffer_len()];
    repr.emit(&mut DnsPacket::new_unchecked(&mut buf[..]));
    buf
}

/// The outcome an answer to query `id` gives, or `None` if the bytes are
/// not such an answer (a stale or forged reply is ignored, not believed).
fn parse_answer(bytes: &[u8], id: u16) -> Option<Result<Ipv4Addr, LookupError>> {
    let packet = DnsPacket::new_checked(bytes).ok()?;
    if packet.transaction_id() != id
        || !packet.flags().contains(DnsFlags::RESPONSE)
        || packet.question_count() != 1
    {
        return None;
    }
    if packet.rcode() != DnsRcode::NoError {
        return Some(Err(LookupError::NotFound));
    }
    let (mut rest, _) = DnsQuestion::parse(packet.payload()).ok()?;
    for _ in 0..packet.answer_record_count() {
        let Ok((next, record)) = DnsRecord::parse(rest) else {
            break;
        };
        rest = next;
        if let DnsRecordData::A(addr) = record.data {
            return Some(Ok(addr));
        }
    }
    Some(Err(LookupError::NotFound))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_encoded_or_refused() {
        assert_eq!(
            encode_name("a.example.").unwrap(),
            b"\x01a\x07example\x00".to_vec()
        );
        for bad in ["", ".", "a..b", "a b", &"x".repeat(64), "\u{e9}.fr"] {
            assert_eq!(encode_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_answer_gives_its_address_and_anything_else_is_ignored() {
        let q = query(0x1234, &encode_name("a.example").unwrap());
        // The answer: the query with QR set, one A record by pointer.
        let mut a = q.clone();
        a[2] |= 0x80;
        a[7] = 1;
        a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 18, 0, 77]);
        assert_eq!(
            parse_answer(&a, 0x1234),
            Some(Ok(Ipv4Addr::new(198, 18, 0, 77)))
        );
        assert_eq!(parse_answer(&a, 0x4321), None, "another query's");
        assert_eq!(parse_answer(&q, 0x1234), None, "not a response");
        let mut nx = q.clone();
        nx[2] |= 0x80;
        nx[3] |= 3;
        assert_eq!(parse_answer(&nx, 0x1234), Some(Err(LookupError::NotFound)));
        for cut in 0..a.len() {
            let _ = parse_answer(&a[..cut], 0x1234);
        }
    }
}
