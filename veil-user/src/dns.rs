//! The gateway's DNS service for its clients, the pure part: which queries
//! it takes, which upstream answers it accepts, the reply packet it writes
//! into the tunnel, and where its upstreams come from. The forwarding
//! itself (sockets, deadlines, bounds) is in `gateway::dns`.
//!
//! Clients reach the service at the gateway's own address in their pool,
//! which only exists inside the tunnel: a query for it can never leave by
//! the client's local network. The gateway asks its upstreams from its own
//! sockets, so they see the gateway's address, never the client's.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};

/// The largest query taken from a client: a question and an EDNS record
/// fit many times over (RFC 9619 queries carry one question).
pub const MAX_QUERY: usize = 1232;
/// The largest answer passed back: the EDNS buffer size DNS flag day 2020
/// settled on is 1232; 4096 leaves room for resolvers that offer more.
pub const MAX_REPLY: usize = 4096;

/// Why a query or an answer was not used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DnsError {
    #[error("{0} bytes: larger than {1}")]
    TooLarge(usize, usize),
    #[error("not a DNS message")]
    Unparsable,
    #[error("not a standard query with one question")]
    NotAQuery,
    #[error("the answer does not match the query (ID or question)")]
    Mismatch,
}

/// A client's query, checked: what the gateway needs to answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The client's message ID: the answer must carry it back.
    pub id: u16,
    message: Message,
}

impl Query {
    /// A DNS query from a client: a standard query (not an update, a
    /// notify or a response) with exactly one question, of bounded size.
    pub fn parse(payload: &[u8]) -> Result<Self, DnsError> {
        if payload.len() > MAX_QUERY {
            return Err(DnsError::TooLarge(payload.len(), MAX_QUERY));
        }
        let message = Message::from_vec(payload).map_err(|_| DnsError::Unparsable)?;
        let m = &message.metadata;
        if m.message_type != MessageType::Query
            || m.op_code != OpCode::Query
            || message.queries.len() != 1
        {
            return Err(DnsError::NotAQuery);
        }
        Ok(Query { id: m.id, message })
    }

    /// An answer from upstream to this query sent with ID `sent_id`: a
    /// response with that ID and the same question, of bounded size.
    pub fn check_answer(&self, answer: &[u8], sent_id: u16) -> Result<(), DnsError> {
        if answer.len() > MAX_REPLY {
            return Err(DnsError::TooLarge(answer.len(), MAX_REPLY));
        }
        let message = Message::from_vec(answer).map_err(|_| DnsError::Unparsable)?;
        if message.metadata.id != sent_id
            || message.metadata.message_type != MessageType::Response
            || message.queries != self.message.queries
        {
            return Err(DnsError::Mismatch);
        }
        Ok(())
    }

    /// SERVFAIL for this query: what the client gets when no upstream
    /// answered in time, so that it does not wait out its own timeouts.
    pub fn servfail(&self) -> Vec<u8> {
        let mut m = Message::error_msg(self.id, OpCode::Query, ResponseCode::ServFail);
        m.metadata.recursion_desired = self.message.metadata.recursion_desired;
        m.metadata.recursion_available = true;
        m.queries = self.message.queries.clone();
        m.to_vec().unwrap_or_default()
    }
}

/// Replaces a DNS message's ID (its first two bytes).
pub fn set_id(message: &mut [u8], id: u16) {
    if let Some(head) = message.get_mut(..2) {
        head.copy_from_slice(&id.to_be_bytes());
    }
}

/// The nameservers of a `resolv.conf`, in order, as upstreams on port 53.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            // A scope (fe80::1%eth0) is not an IpAddr: such a line is skipped.
            words.next()?.parse::<IpAddr>().ok()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The address clients send their queries to: the gateway's own in the
/// pool, port 53.
pub fn service(gateway: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(gateway, 53)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use hickory_proto::{
        op::Query as Question,
        rr::{Name, RecordType},
    };

    use super::*;

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.queries.push(Question::query(
            Name::from_str(name).unwrap(),
            RecordType::A,
        ));
        m.to_vec().unwrap()
    }

    fn answer_to(query: &[u8]) -> Vec<u8> {
        let mut m = Message::from_vec(query).unwrap();
        m.metadata.message_type = MessageType::Response;
        m.to_vec().unwrap()
    }

    #[test]
    fn a_standard_query_is_taken_and_its_answer_checked() {
        let bytes = query(0x1234, "example.com.");
        let q = Query::parse(&bytes).unwrap();
        assert_eq!(q.id, 0x1234);
        // Sent upstream under another ID: the answer must carry that one.
        let mut sent = bytes.clone();
        set_id(&mut sent, 0xbeef);
        let answer = answer_to(&sent);
        assert_eq!(q.check_answer(&answer, 0xbeef), Ok(()));
        assert_eq!(q.check_answer(&answer, 0x1234), Err(DnsError::Mismatch));
        // An answer to another question, or a query echoed back, is not one.
        let other = answer_to(&query(0xbeef, "example.org."));
        assert_eq!(q.check_answer(&other, 0xbeef), Err(DnsError::Mismatch));
        assert_eq!(q.check_answer(&sent, 0xbeef), Err(DnsError::Mismatch));
        assert_eq!(q.check_answer(b"\x00", 0xbeef), Err(DnsError::Unparsable));
        let mut huge = answer.clone();
        huge.resize(MAX_REPLY + 1, 0);
        assert!(matches!(
            q.check_answer(&huge, 0xbeef),
            Err(DnsError::TooLarge(..))
        ));
    }

    #[test]
    fn what_is_not_one_standard_query_is_refused() {
        assert_eq!(Query::parse(b"junk"), Err(DnsError::Unparsable));
        assert_eq!(
            Query::parse(&answer_to(&query(1, "example.com."))),
            Err(DnsError::NotAQuery)
        );
        let mut notify = Message::new(1, MessageType::Query, OpCode::Notify);
        notify
            .queries
            .push(Question::query(Name::root(), RecordType::SOA));
        assert_eq!(
            Query::parse(&notify.to_vec().unwrap()),
            Err(DnsError::NotAQuery)
        );
        let none = Message::new(1, MessageType::Query, OpCode::Query);
        assert_eq!(
            Query::parse(&none.to_vec().unwrap()),
            Err(DnsError::NotAQuery)
        );
        let mut big = query(1, "example.com.");
        big.resize(MAX_QUERY + 1, 0);
        assert!(matches!(Query::parse(&big), Err(DnsError::TooLarge(..))));
    }

    #[test]
    fn servfail_answers_the_question_with_the_clients_id() {
        let q = Query::parse(&query(77, "example.com.")).unwrap();
        let m = Message::from_vec(&q.servfail()).unwrap();
        assert_eq!(m.metadata.id, 77);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(m.queries, q.message.queries);
    }

    #[test]
    fn upstreams_are_the_nameservers_of_resolv_conf() {
        let text = "# generated\nsearch example.com\nnameserver 192.0.2.53\nnameserver  2001:db8::53 \n\
                    nameserver fe80::1%eth0\nnameserver\noptions edns0\nnameserver 198.51.100.1 # second\n";
        assert_eq!(
            nameservers(text),
            [
                "192.0.2.53:53".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap(),
                "198.51.100.1:53".parse().unwrap(),
            ]
        );
        assert!(nameservers("").is_empty());
    }
}
